//! Service tests: the real storage server on a free port over a fresh log, called as the gateway (for a user)
//! or as the runner would call it.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Result;
use flate2::Compression;
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use nsml_bus::{Bus, InProcessBus};
use nsml_common::ServiceContext;
use nsml_common::caller::{Caller, INTERNAL_SECRET_KEY, SERVICE_KEY};
use nsml_common::event::new_event;
use nsml_eventstore::{EventStore, ExpectedVersion, SqliteStore};
use nsml_proto::internal::v1::storage_internal_client::StorageInternalClient;
use nsml_proto::internal::v1::{
    CheckpointMeta, FetchDatasetPartRequest, SaveCheckpointChunk, save_checkpoint_chunk,
};
use nsml_proto::v1::storage_service_client::StorageServiceClient;
use nsml_proto::v1::{
    Competition, CompetitionApplied, DatasetMeta, DatasetPart, DeleteCheckpointRequest, Direction,
    DownloadCodeRequest, EventPayload, GetDatasetRequest, Identity, ListCheckpointsRequest,
    ListDatasetsRequest, Membership, Policy, PullCheckpointRequest, RegisterDatasetChunk,
    SessionStarted, UploadCodeChunk, UploadCodeMeta, UsageRequest, register_dataset_chunk,
    upload_code_chunk,
};
use nsml_storage::Limits;
use nsml_storage::domain::human_bytes;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

// --- the platform under test -------------------------------------------------------------------------

/// A running storage service and how to call it.
struct Service {
    client: StorageServiceClient<Channel>,
    internal: StorageInternalClient<Channel>,
    secret: String,
    store: Arc<dyn EventStore>,
    cancel: CancellationToken,
    server: tokio::task::JoinHandle<()>,
}

impl Service {
    /// Starts the service over `store`, keeping its files in `dir`.
    async fn start(dir: &Path, store: Arc<dyn EventStore>, limits: Limits) -> Result<Self> {
        let bus: Arc<dyn Bus> = InProcessBus::new();
        let cancel = CancellationToken::new();
        nsml_bus::spawn_relay(store.clone(), bus.clone(), cancel.clone());
        let secret = nsml_common::server::random_secret();
        let ctx = ServiceContext {
            store: store.clone(),
            bus,
            addrs: Default::default(),
            secret: secret.clone().into(),
            data_dir: dir.join("storage"),
            cancel: cancel.clone(),
            executor: None,
        };
        let started = nsml_storage::start_with_limits(ctx, limits).await?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr: SocketAddr = listener.local_addr()?;
        let serve_secret: Arc<str> = secret.clone().into();
        let serve_cancel = cancel.clone();
        let server = tokio::spawn(async move {
            nsml_common::server::serve(
                listener,
                (started.routes)(tonic::service::Routes::default()),
                &started.names,
                serve_secret,
                serve_cancel,
            )
            .await
            .expect("the storage service serves until cancelled");
        });
        let client = StorageServiceClient::connect(format!("http://{addr}")).await?;
        let internal = StorageInternalClient::connect(format!("http://{addr}")).await?;
        Ok(Self {
            client,
            internal,
            secret,
            store,
            cancel,
            server,
        })
    }

    /// Starts the service over a fresh log in `dir`.
    async fn fresh(dir: &Path, limits: Limits) -> Result<Self> {
        let store: Arc<dyn EventStore> = Arc::new(SqliteStore::open(&dir.join("log.db")).await?);
        Self::start(dir, store, limits).await
    }

    async fn stop(self) -> Arc<dyn EventStore> {
        self.cancel.cancel();
        let _ = self.server.await;
        self.store
    }

    fn internal<T>(&self, msg: T) -> Request<T> {
        let mut req = Request::new(msg);
        req.metadata_mut()
            .insert(INTERNAL_SECRET_KEY, self.secret.parse().unwrap());
        req
    }

    /// A request as the gateway sends it for a signed-in user.
    fn user<T>(&self, id: &Identity, msg: T) -> Request<T> {
        let mut req = self.internal(msg);
        Caller::attach_identity(req.metadata_mut(), id);
        req
    }

    /// A request from the runner.
    fn runner<T>(&self, msg: T) -> Request<T> {
        let mut req = self.internal(msg);
        req.metadata_mut()
            .insert(SERVICE_KEY, "runner".parse().unwrap());
        req
    }

    /// Appends an event as another service would.
    async fn record<P: EventPayload>(&self, stream: &str, payload: &P) -> Result<()> {
        self.store
            .append(
                stream,
                ExpectedVersion::Any,
                vec![new_event(payload, "service:test", "")],
            )
            .await?;
        Ok(())
    }
}

fn host() -> Identity {
    Identity {
        username: "host".into(),
        hosts: vec!["demo".into()],
        ..Default::default()
    }
}

fn other_host() -> Identity {
    Identity {
        username: "olga".into(),
        hosts: vec!["other".into()],
        ..Default::default()
    }
}

fn member(name: &str, team: &str, competition: &str) -> Identity {
    Identity {
        username: name.into(),
        memberships: vec![Membership {
            team: team.into(),
            competition: competition.into(),
        }],
        ..Default::default()
    }
}

fn alice() -> Identity {
    member("alice", "demo", "demo")
}

fn bob() -> Identity {
    member("bob", "rivals", "demo")
}

// --- archives ----------------------------------------------------------------------------------------

enum E<'a> {
    File(&'a str, &'a [u8]),
    Symlink(&'a str, &'a str),
}

/// A gzip'd tar written with raw names, so that tests can send what a careful archiver would refuse.
fn targz(entries: &[E]) -> Vec<u8> {
    let mut gz = GzEncoder::new(Vec::new(), Compression::fast());
    gz.write_all(&plain_raw(entries)).unwrap();
    gz.finish().unwrap()
}

/// The entries of a gzip'd tar, as (path, content).
fn untar(bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut a = tar::Archive::new(GzDecoder::new(bytes));
    a.entries()
        .unwrap()
        .map(|e| {
            let mut e = e.unwrap();
            let path = e.path().unwrap().to_string_lossy().into_owned();
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            (path, data)
        })
        .collect()
}

const TEST_LABEL: &[u8] = b"id,label\n4,1\n5,0\n6,2\n";

fn dataset_archive() -> Vec<u8> {
    targz(&[
        E::File("train/train_data/data.csv", b"id,f1\n1,0.5\n2,0.1\n3,0.7\n"),
        E::File("train/train_label", b"id,label\n1,0\n2,1\n3,2\n"),
        E::File("test/test_data/data.csv", b"id,f1\n4,0.2\n5,0.3\n6,0.9\n"),
        E::File("test/test_label", TEST_LABEL),
        E::File("test_submit/test_data/data.csv", b"id,f1\n7,0.4\n"),
        E::File("test_submit/test_label", b"id,label\n7,1\n"),
        E::File("private_keys.txt", b"5\n6\n"),
    ])
}

fn dataset_meta(name: &str, competition: &str) -> DatasetMeta {
    DatasetMeta {
        name: name.into(),
        competition: competition.into(),
        description: "three points".into(),
        metric: "accuracy".into(),
        private_fraction: 0.5,
        ..Default::default()
    }
}

/// An upload's messages (owned: the stream outlives the archive it was cut from).
type Chunks<T> = futures::stream::Iter<std::vec::IntoIter<T>>;

fn register_chunks(meta: DatasetMeta, archive: &[u8]) -> Chunks<RegisterDatasetChunk> {
    let mut chunks = vec![RegisterDatasetChunk {
        kind: Some(register_dataset_chunk::Kind::Meta(meta)),
    }];
    chunks.extend(archive.chunks(7000).map(|c| RegisterDatasetChunk {
        kind: Some(register_dataset_chunk::Kind::Data(c.to_vec())),
    }));
    futures::stream::iter(chunks)
}

fn code_chunks(dataset: &str, archive: &[u8]) -> Chunks<UploadCodeChunk> {
    let mut chunks = vec![UploadCodeChunk {
        kind: Some(upload_code_chunk::Kind::Meta(UploadCodeMeta {
            dataset: dataset.into(),
        })),
    }];
    chunks.extend(archive.chunks(7000).map(|c| UploadCodeChunk {
        kind: Some(upload_code_chunk::Kind::Data(c.to_vec())),
    }));
    futures::stream::iter(chunks)
}

fn checkpoint_chunks(session: &str, name: &str, archive: &[u8]) -> Chunks<SaveCheckpointChunk> {
    let mut chunks = vec![SaveCheckpointChunk {
        kind: Some(save_checkpoint_chunk::Kind::Meta(CheckpointMeta {
            session: session.into(),
            checkpoint: name.into(),
            summary_json: r#"{"epoch":1,"val_acc":0.8}"#.into(),
        })),
    }];
    chunks.extend(archive.chunks(7000).map(|c| SaveCheckpointChunk {
        kind: Some(save_checkpoint_chunk::Kind::Data(c.to_vec())),
    }));
    futures::stream::iter(chunks)
}

/// Incompressible bytes, so that a checkpoint's stored size is about `n`.
fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn checkpoint_archive(bytes: &[u8]) -> Vec<u8> {
    let mut b = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::fast()));
    let mut h = tar::Header::new_gnu();
    h.set_size(bytes.len() as u64);
    h.set_mode(0o644);
    b.append_data(&mut h, "model.pt", bytes).unwrap();
    b.into_inner().unwrap().finish().unwrap()
}

async fn collect(mut s: tonic::Streaming<nsml_proto::v1::Chunk>) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(c) = s.message().await? {
        out.write_all(&c.data)?;
    }
    Ok(out)
}

fn assert_refused(result: Result<impl std::fmt::Debug, Status>, code: Code, needle: &str) {
    let status = result.expect_err("the call must be refused");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(needle),
        "`{}` does not mention `{needle}`",
        status.message()
    );
}

async fn register_demo_dataset(svc: &mut Service) -> Result<()> {
    let req = svc.user(
        &host(),
        register_chunks(dataset_meta("t1-cls", "demo"), &dataset_archive()),
    );
    svc.client.register_dataset(req).await?;
    Ok(())
}

// --- datasets ----------------------------------------------------------------------------------------

#[tokio::test]
async fn a_host_registers_a_dataset_that_everyone_can_list() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut svc = Service::fresh(dir.path(), Limits::default()).await?;

    let req = svc.user(
        &host(),
        register_chunks(dataset_meta("t1-cls", "demo"), &dataset_archive()),
    );
    let ds = svc.client.register_dataset(req).await?.into_inner();
    assert_eq!(ds.test_items, 3);
    assert!(ds.has_trial);
    assert_eq!(ds.author, "host");
    let meta = ds.meta.unwrap();
    assert_eq!(meta.direction, Direction::Descending as i32);
    assert_eq!(meta.private_keys, ["5", "6"]);

    // Participants see every dataset, but not which test items are private.
    let list = svc
        .client
        .list_datasets(svc.user(&bob(), ListDatasetsRequest::default()))
        .await?
        .into_inner()
        .datasets;
    assert_eq!(list.len(), 1);
    let seen = list[0].meta.as_ref().unwrap();
    assert_eq!(seen.name, "t1-cls");
    assert!(seen.private_keys.is_empty());
    let got = svc
        .client
        .get_dataset(svc.user(
            &host(),
            GetDatasetRequest {
                name: "t1-cls".into(),
            },
        ))
        .await?
        .into_inner();
    assert_eq!(got.meta.unwrap().private_keys, ["5", "6"]);
    let filtered = svc
        .client
        .list_datasets(svc.user(
            &alice(),
            ListDatasetsRequest {
                competition: "other".into(),
            },
        ))
        .await?
        .into_inner();
    assert!(filtered.datasets.is_empty());

    assert_refused(
        svc.client
            .get_dataset(svc.user(&alice(), GetDatasetRequest { name: "t9".into() }))
            .await,
        Code::NotFound,
        "dataset `t9` not found; `nsml dataset ls` lists them",
    );

    // Only the platform's services fetch parts; labels come back on their own.
    let labels = svc
        .internal
        .fetch_dataset_part(svc.runner(FetchDatasetPartRequest {
            name: "t1-cls".into(),
            part: DatasetPart::TestLabel as i32,
        }))
        .await?
        .into_inner();
    assert_eq!(
        untar(&collect(labels).await?),
        [("test/test_label".to_string(), TEST_LABEL.to_vec())]
    );
    let trial = svc
        .internal
        .fetch_dataset_part(svc.runner(FetchDatasetPartRequest {
            name: "t1-cls".into(),
            part: DatasetPart::TrialData as i32,
        }))
        .await?
        .into_inner();
    let trial = untar(&collect(trial).await?);
    assert_eq!(trial[0].0, "test/test_data/data.csv");
    assert_refused(
        svc.internal
            .fetch_dataset_part(svc.user(
                &host(),
                FetchDatasetPartRequest {
                    name: "t1-cls".into(),
                    part: DatasetPart::TestLabel as i32,
                },
            ))
            .await,
        Code::PermissionDenied,
        "internal call",
    );
    assert_refused(
        svc.internal
            .fetch_dataset_part(svc.runner(FetchDatasetPartRequest {
                name: "t1-cls".into(),
                part: DatasetPart::EvalScript as i32,
            }))
            .await,
        Code::NotFound,
        "dataset `t1-cls` has no evaluation script",
    );
    svc.stop().await;
    Ok(())
}

#[tokio::test]
async fn dataset_names_are_unique_across_competitions() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut svc = Service::fresh(dir.path(), Limits::default()).await?;
    register_demo_dataset(&mut svc).await?;

    assert_refused(
        svc.client
            .register_dataset(svc.user(
                &alice(),
                register_chunks(dataset_meta("t2", "demo"), &dataset_archive()),
            ))
            .await,
        Code::PermissionDenied,
        "only hosts of competition `demo`",
    );
    assert_refused(
        svc.client
            .register_dataset(svc.user(
                &other_host(),
                register_chunks(dataset_meta("t1-cls", "other"), &dataset_archive()),
            ))
            .await,
        Code::AlreadyExists,
        "dataset `t1-cls` already exists in competition `demo`",
    );

    // The owning competition's host replaces it with a new version.
    let mut meta = dataset_meta("t1-cls", "demo");
    meta.description = "version two".into();
    let archive = targz(&[
        E::File("train/train_label", b"id,label\n"),
        E::File("test/test_data/data.csv", b"id\n1\n"),
        E::File("test/test_label", b"id,label\n1,0\n"),
    ]);
    svc.client
        .register_dataset(svc.user(&host(), register_chunks(meta, &archive)))
        .await?;
    let got = svc
        .client
        .get_dataset(svc.user(
            &alice(),
            GetDatasetRequest {
                name: "t1-cls".into(),
            },
        ))
        .await?
        .into_inner();
    assert_eq!(got.meta.unwrap().description, "version two");
    assert_eq!(got.test_items, 1);
    assert!(!got.has_trial);
    svc.stop().await;
    Ok(())
}

#[tokio::test]
async fn malformed_dataset_archives_are_refused_and_lose_nothing() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut svc = Service::fresh(dir.path(), Limits::default()).await?;
    register_demo_dataset(&mut svc).await?;
    let before = svc
        .client
        .get_dataset(svc.user(
            &host(),
            GetDatasetRequest {
                name: "t1-cls".into(),
            },
        ))
        .await?
        .into_inner();

    let good = |extra: E<'static>| {
        let mut entries = vec![
            E::File("train/train_label", b"id,label\n"),
            E::File("test/test_data/data.csv", b"id\n1\n"),
            E::File("test/test_label", b"id,label\n1,0\n"),
        ];
        entries.push(extra);
        targz(&entries)
    };
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            good(E::File("/etc/cron.d/x", b"evil")),
            "dataset `t1-cls` archive refused: entry `/etc/cron.d/x` has an absolute path",
        ),
        (
            good(E::File("train/../../x", b"evil")),
            "entry `train/../../x` leaves the archive through `..`",
        ),
        (
            good(E::Symlink("train/link", "/etc/shadow")),
            "entry `train/link` is a link",
        ),
        (
            targz(&[
                E::File("train/train_label", b"id,label\n"),
                E::File("test/test_data/data.csv", b"id\n1\n"),
            ]),
            "dataset `t1-cls` archive lacks `test/test_label`",
        ),
        (
            targz(&[
                E::File("test/test_data/x", b""),
                E::File("test/test_label", b"id\n"),
            ]),
            "archive lacks `train/`",
        ),
        (b"not a tarball".to_vec(), "not a readable gzip'd tar"),
    ];
    for (archive, message) in cases {
        assert_refused(
            svc.client
                .register_dataset(svc.user(
                    &host(),
                    register_chunks(dataset_meta("t1-cls", "demo"), &archive),
                ))
                .await,
            Code::InvalidArgument,
            message,
        );
    }
    let mut bad_metric = dataset_meta("t3", "demo");
    bad_metric.metric = "auc".into();
    assert_refused(
        svc.client
            .register_dataset(svc.user(&host(), register_chunks(bad_metric, &dataset_archive())))
            .await,
        Code::InvalidArgument,
        "unknown metric `auc`",
    );

    // The dataset registered before is untouched, and its parts are still there.
    let after = svc
        .client
        .get_dataset(svc.user(
            &host(),
            GetDatasetRequest {
                name: "t1-cls".into(),
            },
        ))
        .await?
        .into_inner();
    assert_eq!(after, before);
    let labels = svc
        .internal
        .fetch_dataset_part(svc.runner(FetchDatasetPartRequest {
            name: "t1-cls".into(),
            part: DatasetPart::TestLabel as i32,
        }))
        .await?
        .into_inner();
    assert_eq!(untar(&collect(labels).await?)[0].1, TEST_LABEL);
    let list = svc
        .client
        .list_datasets(svc.user(&host(), ListDatasetsRequest::default()))
        .await?
        .into_inner();
    assert_eq!(list.datasets.len(), 1);
    svc.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_dataset_over_the_size_limit_is_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let limits = Limits {
        dataset_bytes: 200,
        ..Limits::default()
    };
    let mut svc = Service::fresh(dir.path(), limits).await?;
    let archive = dataset_archive();
    assert!(archive.len() > 200);
    assert_refused(
        svc.client
            .register_dataset(svc.user(
                &host(),
                register_chunks(dataset_meta("t1-cls", "demo"), &archive),
            ))
            .await,
        Code::InvalidArgument,
        "dataset `t1-cls` archive is larger than the 200 B limit",
    );
    svc.stop().await;
    Ok(())
}

// --- code --------------------------------------------------------------------------------------------

#[tokio::test]
async fn code_is_uploaded_by_a_team_and_downloaded_by_it_only() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let limits = Limits {
        code_bytes: 4096,
        ..Limits::default()
    };
    let mut svc = Service::fresh(dir.path(), limits).await?;
    register_demo_dataset(&mut svc).await?;

    let code = targz(&[
        E::File("main.py", b"import nsml\nprint('hello')\n"),
        E::File("model/net.py", b"class Net: pass\n"),
        E::Symlink("net.py", "model/net.py"),
    ]);
    let snap = svc
        .client
        .upload_code(svc.user(&alice(), code_chunks("t1-cls", &code)))
        .await?
        .into_inner();
    assert_eq!(snap.team, "demo");
    // A snapshot is as large as its files once unpacked.
    let files = b"import nsml\nprint('hello')\n".len() + b"class Net: pass\n".len();
    assert_eq!(snap.size_bytes, files as u64);
    assert_eq!(snap.id.len(), 64);
    // Identical code again is the same snapshot.
    let again = svc
        .client
        .upload_code(svc.user(&alice(), code_chunks("t1-cls", &code)))
        .await?
        .into_inner();
    assert_eq!(again, snap);

    let down = svc
        .client
        .download_code(svc.user(
            &alice(),
            DownloadCodeRequest {
                id: snap.id.clone(),
            },
        ))
        .await?
        .into_inner();
    assert_eq!(collect(down).await?, code);
    let down = svc
        .client
        .download_code(svc.runner(DownloadCodeRequest {
            id: snap.id.clone(),
        }))
        .await?
        .into_inner();
    assert_eq!(collect(down).await?, code);
    assert_refused(
        svc.client
            .download_code(svc.user(
                &bob(),
                DownloadCodeRequest {
                    id: snap.id.clone(),
                },
            ))
            .await,
        Code::PermissionDenied,
        "belongs to another team",
    );

    // Uploads that would unpack outside the session's directory.
    let escaping = targz(&[E::File("main.py", b""), E::Symlink("data", "../../../etc")]);
    assert_refused(
        svc.client
            .upload_code(svc.user(&alice(), code_chunks("t1-cls", &escaping)))
            .await,
        Code::InvalidArgument,
        "code archive refused: symlink `data` points outside the archive",
    );
    let absolute = targz(&[E::File("/root/.bashrc", b"")]);
    assert_refused(
        svc.client
            .upload_code(svc.user(&alice(), code_chunks("t1-cls", &absolute)))
            .await,
        Code::InvalidArgument,
        "entry `/root/.bashrc` has an absolute path",
    );
    let big = targz(&[E::File("weights.bin", &noise(10_000, 1))]);
    assert_refused(
        svc.client
            .upload_code(svc.user(&alice(), code_chunks("t1-cls", &big)))
            .await,
        Code::InvalidArgument,
        "code upload is larger than the 4 KB limit; leave data, checkpoints and environments out with `.nsmlignore`",
    );

    // Only members of a team in the dataset's competition upload code for it.
    assert_refused(
        svc.client
            .upload_code(svc.user(
                &member("carol", "lone", "other"),
                code_chunks("t1-cls", &code),
            ))
            .await,
        Code::PermissionDenied,
        "you are not in a team of competition `demo`, which dataset `t1-cls` belongs to",
    );
    assert_refused(
        svc.client
            .upload_code(svc.user(&alice(), code_chunks("t9", &code)))
            .await,
        Code::NotFound,
        "dataset `t9` not found",
    );

    let usage = svc
        .client
        .usage(svc.user(&alice(), UsageRequest::default()))
        .await?
        .into_inner();
    assert_eq!(
        (usage.team.as_str(), usage.code_bytes),
        ("demo", files as u64)
    );
    assert_refused(
        svc.client
            .usage(svc.user(
                &bob(),
                UsageRequest {
                    team: "demo".into(),
                },
            ))
            .await,
        Code::PermissionDenied,
        "not team `demo`",
    );
    svc.stop().await;
    Ok(())
}

// --- checkpoints -------------------------------------------------------------------------------------

#[tokio::test]
async fn the_runner_saves_checkpoints_that_the_team_lists_pulls_and_deletes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut svc = Service::fresh(dir.path(), Limits::default()).await?;
    register_demo_dataset(&mut svc).await?;
    let started = nsml_common::now_ms() - 10_000;
    svc.record(
        "sessions-demo/t1-cls",
        &SessionStarted {
            name: "demo/t1-cls/1".into(),
            at_ms: started,
            ..Default::default()
        },
    )
    .await?;

    let first = checkpoint_archive(&noise(3000, 1));
    let saved = svc
        .internal
        .save_checkpoint(svc.runner(checkpoint_chunks("demo/t1-cls/1", "0", &first)))
        .await?
        .into_inner();
    assert_eq!(saved.size_bytes, 3000, "what the checkpoint unpacks to");
    assert!(saved.elapsed_secs >= 10.0, "elapsed {}", saved.elapsed_secs);
    assert_eq!(saved.summary_json, r#"{"epoch":1,"val_acc":0.8}"#);
    let best = checkpoint_archive(&noise(2000, 2));
    svc.internal
        .save_checkpoint(svc.runner(checkpoint_chunks("demo/t1-cls/1", "best", &best)))
        .await?;

    let list = |svc: &Service, who: &Identity| {
        let mut client = svc.client.clone();
        let req = svc.user(
            who,
            ListCheckpointsRequest {
                session: "demo/t1-cls/1".into(),
            },
        );
        async move {
            client
                .list_checkpoints(req)
                .await
                .map(|r| r.into_inner().checkpoints)
        }
    };
    let names: Vec<String> = list(&svc, &alice())
        .await?
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(names, ["0", "best"]);
    assert_refused(
        list(&svc, &bob()).await,
        Code::PermissionDenied,
        "session `demo/t1-cls/1` belongs to another team",
    );
    // The team's hosts see it too.
    assert_eq!(list(&svc, &host()).await?.len(), 2);

    let pulled = svc
        .client
        .pull_checkpoint(svc.user(
            &alice(),
            PullCheckpointRequest {
                session: "demo/t1-cls/1".into(),
                checkpoint: "best".into(),
            },
        ))
        .await?
        .into_inner();
    assert_eq!(collect(pulled).await?, best);
    assert_refused(
        svc.client
            .pull_checkpoint(svc.user(
                &alice(),
                PullCheckpointRequest {
                    session: "demo/t1-cls/1".into(),
                    checkpoint: "9".into(),
                },
            ))
            .await,
        Code::NotFound,
        "checkpoint `demo/t1-cls/1/9` not found",
    );

    // Users never save directly: the runner does, for their sessions.
    assert_refused(
        svc.internal
            .save_checkpoint(svc.user(&alice(), checkpoint_chunks("demo/t1-cls/1", "x", &best)))
            .await,
        Code::PermissionDenied,
        "internal call",
    );
    assert_refused(
        svc.internal
            .save_checkpoint(svc.runner(checkpoint_chunks("demo/t1-cls/1", "../x", &best)))
            .await,
        Code::InvalidArgument,
        "invalid checkpoint name",
    );

    // The same name overwrites (NSML semantics), and usage follows.
    let newer = checkpoint_archive(&noise(5000, 3));
    svc.internal
        .save_checkpoint(svc.runner(checkpoint_chunks("demo/t1-cls/1", "best", &newer)))
        .await?;
    let listed = list(&svc, &alice()).await?;
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[1].size_bytes, 5000);
    let usage = svc
        .client
        .usage(svc.user(
            &alice(),
            UsageRequest {
                team: "demo".into(),
            },
        ))
        .await?
        .into_inner();
    assert_eq!(usage.checkpoint_bytes, 3000 + 5000);

    let delete = |svc: &Service, who: &Identity, name: &str| {
        let mut client = svc.client.clone();
        let req = svc.user(
            who,
            DeleteCheckpointRequest {
                session: "demo/t1-cls/1".into(),
                checkpoint: name.into(),
            },
        );
        async move {
            client
                .delete_checkpoint(req)
                .await
                .map(|r| r.into_inner().deleted)
        }
    };
    assert_refused(
        delete(&svc, &bob(), "0").await,
        Code::PermissionDenied,
        "another team",
    );
    assert_eq!(delete(&svc, &alice(), "0").await?, ["0"]);
    assert_refused(
        delete(&svc, &alice(), "0").await,
        Code::NotFound,
        "checkpoint `demo/t1-cls/1/0` not found",
    );
    assert_eq!(delete(&svc, &alice(), "*").await?, ["best"]);
    assert!(list(&svc, &alice()).await?.is_empty());
    assert!(delete(&svc, &alice(), "*").await?.is_empty());
    let usage = svc
        .client
        .usage(svc.runner(UsageRequest {
            team: "demo".into(),
        }))
        .await?
        .into_inner();
    assert_eq!(usage.checkpoint_bytes, 0);
    svc.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_checkpoint_over_the_quota_is_refused_and_the_others_stay() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut svc = Service::fresh(dir.path(), Limits::default()).await?;
    register_demo_dataset(&mut svc).await?;
    limit_demo_storage(&svc, 20_000).await?;

    let kept = checkpoint_archive(&noise(12_000, 1));
    svc.internal
        .save_checkpoint(svc.runner(checkpoint_chunks("demo/t1-cls/1", "0", &kept)))
        .await?;
    let too_big = checkpoint_archive(&noise(9_000, 2));
    let status = svc
        .internal
        .save_checkpoint(svc.runner(checkpoint_chunks("demo/t1-cls/2", "0", &too_big)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(
        status.message(),
        format!(
            "storage quota exceeded for team `demo`: {} used of {}, this checkpoint expands to \
             more than {} once unpacked; delete checkpoints with `nsml model rm`",
            human_bytes(12_000),
            human_bytes(20_000),
            human_bytes(9_000)
        )
    );

    // Nothing stored is lost, and nothing was added.
    let listed = svc
        .client
        .list_checkpoints(svc.user(
            &alice(),
            ListCheckpointsRequest {
                session: "demo/t1-cls/1".into(),
            },
        ))
        .await?
        .into_inner()
        .checkpoints;
    assert_eq!(listed.len(), 1);
    let pulled = svc
        .client
        .pull_checkpoint(svc.user(
            &alice(),
            PullCheckpointRequest {
                session: "demo/t1-cls/1".into(),
                checkpoint: "0".into(),
            },
        ))
        .await?
        .into_inner();
    assert_eq!(collect(pulled).await?, kept);
    let other = svc
        .client
        .list_checkpoints(svc.runner(ListCheckpointsRequest {
            session: "demo/t1-cls/2".into(),
        }))
        .await?
        .into_inner();
    assert!(other.checkpoints.is_empty());

    // Overwriting frees the old checkpoint: a bigger `0` fits where a second one does not.
    let bigger = checkpoint_archive(&noise(16_000, 3));
    svc.internal
        .save_checkpoint(svc.runner(checkpoint_chunks("demo/t1-cls/1", "0", &bigger)))
        .await?;
    // Something larger than the whole quota is cut off while it is read.
    let huge = checkpoint_archive(&noise(50_000, 4));
    assert_refused(
        svc.internal
            .save_checkpoint(svc.runner(checkpoint_chunks("demo/t1-cls/1", "1", &huge)))
            .await,
        Code::FailedPrecondition,
        "storage quota exceeded for team `demo`",
    );
    svc.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_restarted_service_rebuilds_its_state_from_the_log() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut svc = Service::fresh(dir.path(), Limits::default()).await?;
    register_demo_dataset(&mut svc).await?;
    let archive = checkpoint_archive(&noise(4000, 7));
    svc.internal
        .save_checkpoint(svc.runner(checkpoint_chunks("demo/t1-cls/3", "best", &archive)))
        .await?;
    let code = targz(&[E::File("main.py", b"print(1)\n")]);
    let snap = svc
        .client
        .upload_code(svc.user(&alice(), code_chunks("t1-cls", &code)))
        .await?
        .into_inner();
    let store = svc.stop().await;

    let mut svc = Service::start(dir.path(), store, Limits::default()).await?;
    let listed = svc
        .client
        .list_checkpoints(svc.user(
            &alice(),
            ListCheckpointsRequest {
                session: "demo/t1-cls/3".into(),
            },
        ))
        .await?
        .into_inner()
        .checkpoints;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].name, "best");
    let pulled = svc
        .client
        .pull_checkpoint(svc.user(
            &alice(),
            PullCheckpointRequest {
                session: "demo/t1-cls/3".into(),
                checkpoint: "best".into(),
            },
        ))
        .await?
        .into_inner();
    assert_eq!(collect(pulled).await?, archive);
    let down = svc
        .client
        .download_code(svc.user(&alice(), DownloadCodeRequest { id: snap.id }))
        .await?
        .into_inner();
    assert_eq!(collect(down).await?, code);
    let usage = svc
        .client
        .usage(svc.user(&alice(), UsageRequest::default()))
        .await?
        .into_inner();
    assert_eq!(usage.checkpoint_bytes, 4000);
    assert_eq!(usage.code_bytes, b"print(1)\n".len() as u64);
    svc.stop().await;
    Ok(())
}

/// A gzip'd tar of one file of `n` zero bytes: a few kilobytes that unpack to `n`.
fn zeros_archive(name: &str, n: u64) -> Vec<u8> {
    let mut b = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::best()));
    let mut h = tar::Header::new_gnu();
    h.set_size(n);
    h.set_mode(0o644);
    b.append_data(&mut h, name, std::io::repeat(0).take(n))
        .unwrap();
    b.into_inner().unwrap().finish().unwrap()
}

/// Whether any blob is stored under the service's directory.
fn stored_blobs(dir: &Path) -> Vec<PathBuf> {
    fn walk(p: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
            let path = e.path();
            if path.is_dir() {
                walk(&path, out);
            } else {
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    walk(&dir.join("storage/blobs"), &mut out);
    out
}

/// Applies the demo competition with a team storage quota of `bytes`.
async fn limit_demo_storage(svc: &Service, bytes: u64) -> Result<()> {
    svc.record(
        "competition-demo",
        &CompetitionApplied {
            competition: Some(Competition {
                id: "demo".into(),
                policy: Some(Policy {
                    team_storage_bytes: bytes,
                    ..Default::default()
                }),
                ..Default::default()
            }),
        },
    )
    .await
}

#[tokio::test]
async fn a_checkpoint_is_charged_what_it_unpacks_to_and_a_bomb_is_refused_unstored() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut svc = Service::fresh(dir.path(), Limits::default()).await?;
    register_demo_dataset(&mut svc).await?;
    limit_demo_storage(&svc, 4 << 20).await?;
    let blobs_before = stored_blobs(dir.path());

    // 64 MiB of zeros: far under the quota compressed, sixteen times over it unpacked.
    let bomb = zeros_archive("model.pt", 64 << 20);
    assert!(bomb.len() < 1 << 20, "the bomb is {} bytes", bomb.len());
    let status = svc
        .internal
        .save_checkpoint(svc.runner(checkpoint_chunks("demo/t1-cls/1", "0", &bomb)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().starts_with(&format!(
            "storage quota exceeded for team `demo`: 0 B used of {}, this checkpoint expands to more than",
            human_bytes(4 << 20)
        )),
        "{}",
        status.message()
    );
    assert_eq!(stored_blobs(dir.path()), blobs_before, "nothing is stored");
    let listed = svc
        .client
        .list_checkpoints(svc.runner(ListCheckpointsRequest {
            session: "demo/t1-cls/1".into(),
        }))
        .await?
        .into_inner();
    assert!(listed.checkpoints.is_empty());

    // One that fits is charged its unpacked size, which the next save counts against.
    let fits = zeros_archive("model.pt", 3 << 20);
    let saved = svc
        .internal
        .save_checkpoint(svc.runner(checkpoint_chunks("demo/t1-cls/1", "0", &fits)))
        .await?
        .into_inner();
    assert_eq!(saved.size_bytes, 3 << 20);
    let usage = svc
        .client
        .usage(svc.runner(UsageRequest {
            team: "demo".into(),
        }))
        .await?
        .into_inner();
    assert_eq!(usage.checkpoint_bytes, 3 << 20);
    assert_refused(
        svc.internal
            .save_checkpoint(svc.runner(checkpoint_chunks("demo/t1-cls/1", "1", &fits)))
            .await,
        Code::FailedPrecondition,
        "storage quota exceeded for team `demo`: 3 MB used of 4 MB",
    );
    svc.stop().await;
    Ok(())
}

#[tokio::test]
async fn code_that_unpacks_past_the_per_archive_cap_is_refused_unstored() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut svc = Service::fresh(dir.path(), Limits::default()).await?;
    register_demo_dataset(&mut svc).await?;
    let blobs_before = stored_blobs(dir.path());
    let cap = nsml_storage::domain::MAX_CODE_EXPANDED_BYTES;
    let bomb = zeros_archive("main.py", cap + 1);
    assert!(bomb.len() < 8 << 20, "the bomb is {} bytes", bomb.len());
    assert_refused(
        svc.client
            .upload_code(svc.user(&alice(), code_chunks("t1-cls", &bomb)))
            .await,
        Code::InvalidArgument,
        &format!(
            "code expands to more than {} once unpacked, the most one code snapshot may hold",
            human_bytes(cap)
        ),
    );
    assert_eq!(stored_blobs(dir.path()), blobs_before, "nothing is stored");
    svc.stop().await;
    Ok(())
}

/// The runner sends a save again whole when a restart lost its answer: the repeat is answered with the save
/// it already made, and records nothing more.
#[tokio::test]
async fn a_checkpoint_saved_twice_alike_is_one_save() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut svc = Service::fresh(dir.path(), Limits::default()).await?;
    register_demo_dataset(&mut svc).await?;
    let archive = checkpoint_archive(&noise(3000, 7));
    let save = |svc: &Service| {
        let mut client = svc.internal.clone();
        let req = svc.runner(checkpoint_chunks("demo/t1-cls/1", "e1", &archive));
        async move { client.save_checkpoint(req).await }
    };
    let first = save(&svc).await?.into_inner();
    let head = svc.store.head_position().await?;
    let again = save(&svc).await?.into_inner();
    assert_eq!(again, first, "the repeat answers the first save");
    assert_eq!(
        svc.store.head_position().await?,
        head,
        "the repeat records no second event"
    );
    let usage = svc
        .client
        .usage(svc.runner(UsageRequest {
            team: "demo".into(),
        }))
        .await?
        .into_inner();
    assert_eq!(usage.checkpoint_bytes, 3000, "counted once");

    // Other content under the same name is a new save.
    let newer = checkpoint_archive(&noise(2000, 8));
    let mut client = svc.internal.clone();
    let saved = client
        .save_checkpoint(svc.runner(checkpoint_chunks("demo/t1-cls/1", "e1", &newer)))
        .await?
        .into_inner();
    assert_eq!(saved.size_bytes, 2000);
    assert!(svc.store.head_position().await? > head);
    svc.stop().await;
    Ok(())
}

// --- checkpoints as plain tars ------------------------------------------------------------------------

/// A plain tar of the given files, as the runner packs a checkpoint.
fn plain_checkpoint(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        b.append_data(&mut h, name, *data).unwrap();
    }
    b.into_inner().unwrap()
}

/// A plain tar written with raw names, as a hostile runner or session could send it.
fn plain_raw(entries: &[E]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        let (name, ty, data, link): (&str, tar::EntryType, &[u8], Option<&str>) = match e {
            E::File(n, d) => (n, tar::EntryType::Regular, d, None),
            E::Symlink(n, t) => (n, tar::EntryType::Symlink, b"", Some(t)),
        };
        h.set_entry_type(ty);
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        let gnu = h.as_gnu_mut().unwrap();
        gnu.name[..name.len()].copy_from_slice(name.as_bytes());
        if let Some(t) = link {
            gnu.linkname[..t.len()].copy_from_slice(t.as_bytes());
        }
        h.set_cksum();
        b.append(&h, data).unwrap();
    }
    b.into_inner().unwrap()
}

/// Sends `archive` as checkpoint `name` of `demo/t1-cls/1` in chunks of `chunk` bytes.
async fn save_plain(
    svc: &mut Service,
    name: &str,
    archive: &[u8],
    chunk: usize,
) -> Result<nsml_proto::v1::Checkpoint, Status> {
    let mut chunks = vec![SaveCheckpointChunk {
        kind: Some(save_checkpoint_chunk::Kind::Meta(CheckpointMeta {
            session: "demo/t1-cls/1".into(),
            checkpoint: name.into(),
            summary_json: String::new(),
        })),
    }];
    chunks.extend(archive.chunks(chunk).map(|c| SaveCheckpointChunk {
        kind: Some(save_checkpoint_chunk::Kind::Data(c.to_vec())),
    }));
    let req = svc.runner(futures::stream::iter(chunks));
    svc.internal
        .save_checkpoint(req)
        .await
        .map(|r| r.into_inner())
}

async fn pull(svc: &Service, name: &str) -> Result<Vec<u8>> {
    let stream = svc
        .client
        .clone()
        .pull_checkpoint(svc.user(
            &alice(),
            PullCheckpointRequest {
                session: "demo/t1-cls/1".into(),
                checkpoint: name.into(),
            },
        ))
        .await?
        .into_inner();
    collect(stream).await
}

/// Files left in the staging area of uploads in flight.
fn staged_files(dir: &Path) -> usize {
    std::fs::read_dir(dir.join("storage/tmp"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_plain_checkpoint_is_stored_as_sent_under_the_sha256_of_its_bytes() -> Result<()> {
    use sha2::Digest;
    let dir = tempfile::tempdir()?;
    let mut svc = Service::fresh(dir.path(), Limits::default()).await?;
    register_demo_dataset(&mut svc).await?;

    // Several megabytes of weights that do not compress, sent in chunks that cut entries anywhere.
    let weights = noise(3 << 20, 7);
    let archive = plain_checkpoint(&[("model.pt", &weights), ("config.json", b"{\"lr\":0.1}")]);
    let saved = save_plain(&mut svc, "plain", &archive, 777_777).await?;
    assert_eq!(
        saved.size_bytes,
        weights.len() as u64 + 10,
        "charged what it unpacks to"
    );
    let pulled = pull(&svc, "plain").await?;
    assert!(pulled == archive, "pulled back byte for byte");
    // The blob's name is the SHA-256 of the bytes stored, which are the bytes sent.
    let id = hex::encode(sha2::Sha256::digest(&archive));
    let blob = dir.path().join("storage/blobs").join(&id[..2]).join(&id);
    assert!(std::fs::read(&blob)? == archive, "stored under its sha256");
    let mut entries = tar::Archive::new(&pulled[..]);
    let names: Vec<String> = entries
        .entries()?
        .map(|e| e.unwrap().path().unwrap().display().to_string())
        .collect();
    assert_eq!(names, ["model.pt", "config.json"]);

    // A checkpoint saved gzip'd, as every checkpoint was before, is still taken, and pulled back as stored.
    let old = checkpoint_archive(&noise(5000, 8));
    let saved = save_plain(&mut svc, "old", &old, 7000).await?;
    assert_eq!(saved.size_bytes, 5000);
    assert!(pull(&svc, "old").await? == old);
    assert_eq!(staged_files(dir.path()), 0, "nothing is left staged");
    svc.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_hostile_plain_checkpoint_is_refused_while_it_streams_and_nothing_is_stored() -> Result<()>
{
    let dir = tempfile::tempdir()?;
    let mut svc = Service::fresh(dir.path(), Limits::default()).await?;
    register_demo_dataset(&mut svc).await?;
    let blobs_before = stored_blobs(dir.path());
    let padding = noise(2 << 20, 9);
    let cases: [(Vec<u8>, &str); 4] = [
        (
            plain_raw(&[
                E::File("model.pt", &padding),
                E::File("../../etc/cron.d/x", b"x"),
            ]),
            "leaves the archive through `..`",
        ),
        (
            plain_raw(&[E::File("/etc/passwd", b"x")]),
            "has an absolute path",
        ),
        (
            plain_raw(&[
                E::Symlink("weights", "../../../etc/shadow"),
                E::File("model.pt", &padding),
            ]),
            "points outside the archive",
        ),
        (
            // Data after the end of the archive is not smuggled into the blob.
            [plain_checkpoint(&[("model.pt", b"w")]), padding.clone()].concat(),
            "not a readable tar",
        ),
    ];
    for (archive, needle) in cases {
        assert_refused(
            save_plain(&mut svc, "bad", &archive, 1 << 20).await,
            Code::InvalidArgument,
            needle,
        );
    }
    assert_eq!(stored_blobs(dir.path()), blobs_before, "nothing is stored");
    assert_eq!(staged_files(dir.path()), 0, "nothing is left staged");
    let listed = svc
        .client
        .list_checkpoints(svc.runner(ListCheckpointsRequest {
            session: "demo/t1-cls/1".into(),
        }))
        .await?
        .into_inner();
    assert!(listed.checkpoints.is_empty());
    svc.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_plain_checkpoint_over_the_quota_is_refused_and_leaves_nothing_stored() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut svc = Service::fresh(dir.path(), Limits::default()).await?;
    register_demo_dataset(&mut svc).await?;
    limit_demo_storage(&svc, 1 << 20).await?;
    let kept = plain_checkpoint(&[("model.pt", &noise(600 << 10, 10))]);
    save_plain(&mut svc, "0", &kept, 1 << 20).await?;
    let blobs_before = stored_blobs(dir.path());

    // Over the room left, found out from the entry's header.
    let over = plain_checkpoint(&[("model.pt", &noise(500 << 10, 11))]);
    assert_refused(
        save_plain(&mut svc, "1", &over, 64 << 10).await,
        Code::FailedPrecondition,
        "storage quota exceeded for team `demo`",
    );
    // Over the whole quota in bytes sent, cut off while it is read.
    let huge = plain_checkpoint(&[("a", &noise(900 << 10, 12)), ("b", &noise(900 << 10, 13))]);
    assert_refused(
        save_plain(&mut svc, "2", &huge, 64 << 10).await,
        Code::FailedPrecondition,
        "storage quota exceeded for team `demo`",
    );
    assert_eq!(stored_blobs(dir.path()), blobs_before, "nothing is stored");
    assert_eq!(staged_files(dir.path()), 0, "nothing is left staged");
    assert!(pull(&svc, "0").await? == kept, "what was stored stays");
    let usage = svc
        .client
        .usage(svc.runner(UsageRequest {
            team: "demo".into(),
        }))
        .await?
        .into_inner();
    assert_eq!(usage.checkpoint_bytes, 600 << 10);
    svc.stop().await;
    Ok(())
}
