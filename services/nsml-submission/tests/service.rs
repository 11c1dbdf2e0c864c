//! Service tests: the submission service over a real log and the real storage service holding the hidden
//! labels. The runner's hand-over of predictions is answered before they are scored; and at start-up, a
//! submission whose predictions were taken but never scored (the service stopped in between) is scored from
//! its spooled predictions, or fails with the reason when they were lost.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use flate2::Compression;
use flate2::write::GzEncoder;
use nsml_bus::{Bus, InProcessBus};
use nsml_common::ServiceContext;
use nsml_common::caller::{Caller, INTERNAL_SECRET_KEY, SERVICE_KEY};
use nsml_common::clients::ServiceAddrs;
use nsml_common::event::{decode, new_event};
use nsml_eventstore::{EventStore, ExpectedVersion, SqliteStore};
use nsml_proto::internal::v1::RunnerPredictionsRequest;
use nsml_proto::internal::v1::submission_internal_client::SubmissionInternalClient;
use nsml_proto::v1::storage_service_client::StorageServiceClient;
use nsml_proto::v1::{
    DatasetMeta, Identity, RegisterDatasetChunk, SessionExited, Submission, SubmissionAdmitted,
    SubmissionFailed, SubmissionScored, SubmissionStatus, register_dataset_chunk,
};
use tokio_util::sync::CancellationToken;
use tonic::Request;

/// The hidden test labels: items 5 and 6 are private.
const TEST_LABEL: &[u8] = b"id,label\n4,0\n5,1\n6,2\n";

fn targz(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::fast()));
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        b.append_data(&mut h, name, *data).unwrap();
    }
    b.into_inner().unwrap().finish().unwrap()
}

/// A log, a bus, and the storage service serving one registered dataset, `t1-cls` of competition `demo`.
struct Platform {
    store: Arc<dyn EventStore>,
    bus: Arc<dyn Bus>,
    secret: String,
    storage_addr: String,
    cancel: CancellationToken,
}

impl Platform {
    async fn start(dir: &Path) -> Result<Self> {
        let store: Arc<dyn EventStore> = Arc::new(SqliteStore::open(&dir.join("log.db")).await?);
        let bus: Arc<dyn Bus> = InProcessBus::new();
        let cancel = CancellationToken::new();
        nsml_bus::spawn_relay(store.clone(), bus.clone(), cancel.clone());
        let secret = nsml_common::server::random_secret();
        let ctx = ServiceContext {
            store: store.clone(),
            bus: bus.clone(),
            addrs: Default::default(),
            secret: secret.clone().into(),
            data_dir: dir.join("storage"),
            cancel: cancel.clone(),
            executor: None,
        };
        let started = nsml_storage::start(ctx).await?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let storage_addr = format!("http://{}", listener.local_addr()?);
        let (serve_secret, serve_cancel) = (secret.clone().into(), cancel.clone());
        tokio::spawn(async move {
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
        let platform = Self {
            store,
            bus,
            secret,
            storage_addr,
            cancel,
        };
        platform.register_dataset().await?;
        Ok(platform)
    }

    async fn register_dataset(&self) -> Result<()> {
        let archive = targz(&[
            ("train/train_data/data.csv", b"id,f1\n1,0.5\n2,0.1\n3,0.7\n"),
            ("train/train_label", b"id,label\n1,0\n2,1\n3,2\n"),
            ("test/test_data/data.csv", b"id,f1\n4,0.2\n5,0.3\n6,0.9\n"),
            ("test/test_label", TEST_LABEL),
            ("private_keys.txt", b"5\n6\n"),
        ]);
        let meta = DatasetMeta {
            name: "t1-cls".into(),
            competition: "demo".into(),
            metric: "accuracy".into(),
            private_fraction: 0.5,
            ..Default::default()
        };
        let mut chunks = vec![RegisterDatasetChunk {
            kind: Some(register_dataset_chunk::Kind::Meta(meta)),
        }];
        chunks.push(RegisterDatasetChunk {
            kind: Some(register_dataset_chunk::Kind::Data(archive)),
        });
        let mut req = Request::new(futures::stream::iter(chunks));
        req.metadata_mut()
            .insert(INTERNAL_SECRET_KEY, self.secret.parse()?);
        let host = Identity {
            username: "host".into(),
            hosts: vec!["demo".into()],
            ..Default::default()
        };
        Caller::attach_identity(req.metadata_mut(), &host);
        let mut client = StorageServiceClient::connect(self.storage_addr.clone()).await?;
        client.register_dataset(req).await?;
        Ok(())
    }

    /// Records submission `id` as its stream would hold it once its predictions were taken.
    async fn scoring(&self, id: &str) -> Result<()> {
        self.recorded(id, SubmissionStatus::Scoring).await
    }

    /// Records submission `id`, run by session `demo/t1-cls/9`, in `status`.
    async fn recorded(&self, id: &str, status: SubmissionStatus) -> Result<()> {
        let sub = Submission {
            id: id.into(),
            team: "demo".into(),
            dataset: "t1-cls".into(),
            competition: "demo".into(),
            session: "demo/t1-cls/9".into(),
            status: status as i32,
            submitted_at_ms: nsml_common::now_ms(),
            time_limit_secs: 3600,
            ..Default::default()
        };
        let ev = new_event(
            &SubmissionAdmitted {
                submission: Some(sub),
                decision_id: String::new(),
            },
            "service:submission",
            "",
        );
        self.store
            .append(&format!("submission-{id}"), ExpectedVersion::Any, vec![ev])
            .await?;
        Ok(())
    }

    /// Starts the submission service over the platform's log, keeping its files in `dir`; returns a client
    /// of it calling as the runner.
    async fn start_submission(&self, dir: &Path) -> Result<Runner> {
        let mut addrs = ServiceAddrs::default();
        for addr in [
            &mut addrs.auth,
            &mut addrs.storage,
            &mut addrs.session,
            &mut addrs.quota,
            &mut addrs.submission,
            &mut addrs.leaderboard,
        ] {
            addr.clone_from(&self.storage_addr);
        }
        let ctx = ServiceContext {
            store: self.store.clone(),
            bus: self.bus.clone(),
            addrs,
            secret: self.secret.clone().into(),
            data_dir: dir.to_path_buf(),
            cancel: self.cancel.clone(),
            executor: None,
        };
        let started = nsml_submission::start(ctx, "python3".into()).await?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = format!("http://{}", listener.local_addr()?);
        let (serve_secret, serve_cancel) = (self.secret.clone().into(), self.cancel.clone());
        tokio::spawn(async move {
            nsml_common::server::serve(
                listener,
                (started.routes)(tonic::service::Routes::default()),
                &started.names,
                serve_secret,
                serve_cancel,
            )
            .await
            .expect("the submission service serves until cancelled");
        });
        Ok(Runner {
            client: SubmissionInternalClient::connect(addr).await?,
            secret: self.secret.clone(),
        })
    }

    /// The outcome recorded for submission `id`, waiting for it up to 30 s.
    async fn outcome(&self, id: &str) -> Result<Submission> {
        for _ in 0..300 {
            for ev in self
                .store
                .read_stream(&format!("submission-{id}"), 0)
                .await?
            {
                if let Some(e) = decode::<SubmissionScored>(&ev) {
                    return Ok(e.submission.unwrap());
                }
                if let Some(e) = decode::<SubmissionFailed>(&ev) {
                    return Ok(e.submission.unwrap());
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::bail!("submission {id} never ended")
    }
}

/// The submission service as the runner calls it.
struct Runner {
    client: SubmissionInternalClient<tonic::transport::Channel>,
    secret: String,
}

impl Runner {
    /// Hands over the predictions of submit session `demo/t1-cls/9`.
    async fn predictions(&mut self, id: &str, json: &str) -> Result<(), tonic::Status> {
        let mut req = Request::new(RunnerPredictionsRequest {
            session: "demo/t1-cls/9".into(),
            predictions_json: json.into(),
            submission_id: id.into(),
        });
        req.metadata_mut()
            .insert(INTERNAL_SECRET_KEY, self.secret.parse().unwrap());
        req.metadata_mut()
            .insert(SERVICE_KEY, "runner".parse().unwrap());
        self.client.runner_predictions(req).await.map(|_| ())
    }
}

fn spooled(dir: &Path, id: &str) -> std::path::PathBuf {
    dir.join("submission")
        .join("predictions")
        .join(format!("{id}.json"))
}

#[tokio::test]
async fn predictions_taken_before_a_restart_are_scored_at_the_next_start() -> Result<()> {
    // Given a submission whose predictions were taken and spooled, but not scored, when the service stopped
    let dir = tempfile::tempdir()?;
    let platform = Platform::start(dir.path()).await?;
    platform.scoring("s1").await?;
    let file = spooled(dir.path(), "s1");
    std::fs::create_dir_all(file.parent().unwrap())?;
    std::fs::write(&file, r#"{"4": "0", "5": "1", "6": "0"}"#)?;

    // When the service starts
    platform.start_submission(dir.path()).await?;

    // Then the submission is scored: the public item right, one private item of two
    let sub = platform.outcome("s1").await?;
    assert_eq!(sub.status(), SubmissionStatus::Scored, "{}", sub.reason);
    assert_eq!((sub.score, sub.private_score), (1.0, Some(0.5)));
    // And its spooled predictions are gone
    for _ in 0..50 {
        if !file.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!file.exists(), "the spooled predictions were kept");
    platform.cancel.cancel();
    Ok(())
}

#[tokio::test]
async fn a_submission_whose_predictions_were_lost_fails_with_the_reason_at_the_next_start()
-> Result<()> {
    // Given a submission whose predictions were taken, and lost with the service's disk
    let dir = tempfile::tempdir()?;
    let platform = Platform::start(dir.path()).await?;
    platform.scoring("s2").await?;

    // When the service starts
    platform.start_submission(dir.path()).await?;

    // Then the submission fails, saying why and what to do
    let sub = platform.outcome("s2").await?;
    assert_eq!(sub.status(), SubmissionStatus::Failed);
    assert_eq!(
        sub.reason,
        "the submission service restarted before scoring the predictions, and they were lost; submit again"
    );
    platform.cancel.cancel();
    Ok(())
}

#[tokio::test]
async fn predictions_that_do_not_fit_the_test_set_fail_with_the_participant_s_reason() -> Result<()>
{
    // Given a submission whose spooled predictions miss a test item
    let dir = tempfile::tempdir()?;
    let platform = Platform::start(dir.path()).await?;
    platform.scoring("s3").await?;
    let file = spooled(dir.path(), "s3");
    std::fs::create_dir_all(file.parent().unwrap())?;
    std::fs::write(&file, r#"[1, 2]"#)?;

    // When the service starts and scores them
    platform.start_submission(dir.path()).await?;

    // Then the submission fails with the scorer's reason, as the participant reads it
    let sub = platform.outcome("s3").await?;
    assert_eq!(sub.status(), SubmissionStatus::Failed);
    assert_eq!(sub.reason, "predictions have 2 items, the test set has 3");
    platform.cancel.cancel();
    Ok(())
}

#[tokio::test]
async fn predictions_are_answered_before_they_are_scored_and_the_session_s_exit_does_not_fail_them()
-> Result<()> {
    // Given a running submission
    let dir = tempfile::tempdir()?;
    let platform = Platform::start(dir.path()).await?;
    platform.recorded("s4", SubmissionStatus::Running).await?;
    let mut runner = platform.start_submission(dir.path()).await?;

    // When its session hands over predictions, then exits at once
    runner
        .predictions("s4", r#"{"4": "0", "5": "2", "6": "2"}"#)
        .await?;
    let exited = new_event(
        &SessionExited {
            name: "demo/t1-cls/9".into(),
            exit_code: 0,
            at_ms: 0,
        },
        "runner",
        "",
    );
    platform
        .store
        .append("session-demo/t1-cls/9", ExpectedVersion::Any, vec![exited])
        .await?;

    // Then it is scored all the same
    let sub = platform.outcome("s4").await?;
    assert_eq!(sub.status(), SubmissionStatus::Scored, "{}", sub.reason);
    assert_eq!((sub.score, sub.private_score), (1.0, Some(0.5)));
    // And predictions are taken once
    let again = runner.predictions("s4", "{}").await.unwrap_err();
    assert_eq!(again.code(), tonic::Code::FailedPrecondition);
    assert_eq!(
        again.message(),
        "submission s4 already ended; predictions are taken once"
    );
    platform.cancel.cancel();
    Ok(())
}
