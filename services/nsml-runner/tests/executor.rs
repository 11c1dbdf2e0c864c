//! The local executor end to end against fake session, storage and submission services on a real
//! gRPC port: code and dataset download, layout, logs, checkpoints, predictions, failures and stop.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flate2::Compression;
use flate2::write::GzEncoder;
use nsml_common::clients::{Clients, ServiceAddrs};
use nsml_common::executor::Executor;
use nsml_proto::internal::v1::session_internal_server::{SessionInternal, SessionInternalServer};
use nsml_proto::internal::v1::storage_internal_server::{StorageInternal, StorageInternalServer};
use nsml_proto::internal::v1::submission_internal_server::{
    SubmissionInternal, SubmissionInternalServer,
};
use nsml_proto::internal::v1::*;
use nsml_proto::v1::storage_service_server::{StorageService, StorageServiceServer};
use nsml_proto::v1::*;
use nsml_runner::{GpuInventory, LocalExecutor, RunnerConfig};
use tokio::sync::Notify;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

#[derive(Default)]
struct State {
    code: HashMap<String, Vec<u8>>,
    parts: HashMap<(String, i32), Vec<u8>>,
    checkpoints: HashMap<(String, String), Vec<u8>>,
    fetched_parts: Vec<(String, i32)>,
    started: Vec<RunnerStartedRequest>,
    logs: Vec<LogLine>,
    log_streams_open: i32,
    finished: Vec<(RunnerFinishedRequest, i32)>,
    reports: Vec<RunnerReportRequest>,
    saved: Vec<(CheckpointMeta, Vec<u8>)>,
    predictions: Vec<RunnerPredictionsRequest>,
    heartbeats: Vec<Vec<String>>,
}

#[derive(Clone, Default)]
struct Fake {
    state: Arc<Mutex<State>>,
    finished: Arc<Notify>,
}

type ChunkStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<Chunk, Status>> + Send>>;

fn chunks(bytes: Vec<u8>) -> ChunkStream {
    let pieces: Vec<Result<Chunk, Status>> = bytes
        .chunks(1000)
        .map(|c| Ok(Chunk { data: c.to_vec() }))
        .collect();
    Box::pin(tokio_stream::iter(pieces))
}

fn nope<T>() -> Result<T, Status> {
    Err(Status::unimplemented("not in the fake"))
}

#[tonic::async_trait]
impl SessionInternal for Fake {
    async fn start_submit(
        &self,
        _: Request<StartSubmitRequest>,
    ) -> Result<Response<Session>, Status> {
        nope()
    }

    async fn runner_started(
        &self,
        r: Request<RunnerStartedRequest>,
    ) -> Result<Response<Empty>, Status> {
        self.state.lock().unwrap().started.push(r.into_inner());
        Ok(Response::new(Empty {}))
    }

    async fn runner_logs(
        &self,
        r: Request<Streaming<RunnerLogBatch>>,
    ) -> Result<Response<Empty>, Status> {
        self.state.lock().unwrap().log_streams_open += 1;
        let mut s = r.into_inner();
        while let Some(batch) = s.next().await {
            let batch = batch?;
            self.state.lock().unwrap().logs.extend(batch.lines);
        }
        self.state.lock().unwrap().log_streams_open -= 1;
        Ok(Response::new(Empty {}))
    }

    async fn runner_report(
        &self,
        r: Request<RunnerReportRequest>,
    ) -> Result<Response<Empty>, Status> {
        self.state.lock().unwrap().reports.push(r.into_inner());
        Ok(Response::new(Empty {}))
    }

    async fn runner_finished(
        &self,
        r: Request<RunnerFinishedRequest>,
    ) -> Result<Response<Empty>, Status> {
        let mut st = self.state.lock().unwrap();
        let open = st.log_streams_open;
        st.finished.push((r.into_inner(), open));
        self.finished.notify_waiters();
        Ok(Response::new(Empty {}))
    }

    async fn runner_heartbeat(
        &self,
        r: Request<nsml_proto::internal::v1::RunnerHeartbeatRequest>,
    ) -> Result<Response<Empty>, Status> {
        self.state
            .lock()
            .unwrap()
            .heartbeats
            .push(r.into_inner().names);
        Ok(Response::new(Empty {}))
    }
}

#[tonic::async_trait]
impl StorageService for Fake {
    type DownloadCodeStream = ChunkStream;
    type PullCheckpointStream = ChunkStream;
    async fn register_dataset(
        &self,
        _: Request<Streaming<RegisterDatasetChunk>>,
    ) -> Result<Response<Dataset>, Status> {
        nope()
    }
    async fn list_datasets(
        &self,
        _: Request<ListDatasetsRequest>,
    ) -> Result<Response<ListDatasetsResponse>, Status> {
        nope()
    }
    async fn upload_code(
        &self,
        _: Request<Streaming<UploadCodeChunk>>,
    ) -> Result<Response<CodeSnapshot>, Status> {
        nope()
    }
    async fn find_code(
        &self,
        _: Request<nsml_proto::v1::FindCodeRequest>,
    ) -> Result<Response<CodeSnapshot>, Status> {
        nope()
    }
    async fn list_checkpoints(
        &self,
        _: Request<ListCheckpointsRequest>,
    ) -> Result<Response<ListCheckpointsResponse>, Status> {
        nope()
    }
    async fn delete_checkpoint(
        &self,
        _: Request<DeleteCheckpointRequest>,
    ) -> Result<Response<DeleteCheckpointResponse>, Status> {
        nope()
    }
    async fn usage(&self, _: Request<UsageRequest>) -> Result<Response<StorageUsage>, Status> {
        nope()
    }

    async fn get_dataset(
        &self,
        r: Request<GetDatasetRequest>,
    ) -> Result<Response<Dataset>, Status> {
        Ok(Response::new(Dataset {
            meta: Some(DatasetMeta {
                name: r.into_inner().name,
                ..Default::default()
            }),
            updated_at_ms: 1,
            ..Default::default()
        }))
    }

    async fn download_code(
        &self,
        r: Request<DownloadCodeRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        let id = r.into_inner().id;
        if id == "slow" {
            // A download that never progresses, to stop a session during its setup.
            return Ok(Response::new(Box::pin(tokio_stream::pending())));
        }
        let bytes = self.state.lock().unwrap().code.get(&id).cloned();
        let bytes =
            bytes.ok_or_else(|| Status::not_found(format!("code snapshot `{id}` not found")))?;
        Ok(Response::new(chunks(bytes)))
    }

    async fn pull_checkpoint(
        &self,
        r: Request<PullCheckpointRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        let r = r.into_inner();
        let bytes = self
            .state
            .lock()
            .unwrap()
            .checkpoints
            .get(&(r.session.clone(), r.checkpoint.clone()))
            .cloned();
        let bytes = bytes.ok_or_else(|| {
            Status::not_found(format!(
                "checkpoint {} of {} not found",
                r.checkpoint, r.session
            ))
        })?;
        Ok(Response::new(chunks(bytes)))
    }
}

#[tonic::async_trait]
impl StorageInternal for Fake {
    type FetchDatasetPartStream = ChunkStream;

    async fn fetch_dataset_part(
        &self,
        r: Request<FetchDatasetPartRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        let r = r.into_inner();
        let mut st = self.state.lock().unwrap();
        st.fetched_parts.push((r.name.clone(), r.part));
        let bytes = st
            .parts
            .get(&(r.name, r.part))
            .cloned()
            .ok_or_else(|| Status::not_found("no such part"))?;
        Ok(Response::new(chunks(bytes)))
    }

    async fn save_checkpoint(
        &self,
        r: Request<Streaming<SaveCheckpointChunk>>,
    ) -> Result<Response<Checkpoint>, Status> {
        let mut s = r.into_inner();
        let mut meta = None;
        let mut data = Vec::new();
        while let Some(c) = s.next().await {
            match c?.kind {
                Some(save_checkpoint_chunk::Kind::Meta(m)) => meta = Some(m),
                Some(save_checkpoint_chunk::Kind::Data(d)) => data.extend(d),
                None => {}
            }
        }
        let meta = meta.ok_or_else(|| Status::invalid_argument("no meta"))?;
        if meta.checkpoint == "huge" {
            return Err(Status::resource_exhausted(
                "team demo is over its checkpoint storage quota",
            ));
        }
        let mut st = self.state.lock().unwrap();
        st.checkpoints.insert(
            (meta.session.clone(), meta.checkpoint.clone()),
            data.clone(),
        );
        st.saved.push((meta.clone(), data));
        Ok(Response::new(Checkpoint {
            session: meta.session,
            name: meta.checkpoint,
            ..Default::default()
        }))
    }
}

#[tonic::async_trait]
impl SubmissionInternal for Fake {
    async fn runner_predictions(
        &self,
        r: Request<RunnerPredictionsRequest>,
    ) -> Result<Response<RunnerPredictionsResponse>, Status> {
        self.state.lock().unwrap().predictions.push(r.into_inner());
        Ok(Response::new(RunnerPredictionsResponse {}))
    }
}

/// A gzip'd tar of `(path, content)` files.
fn tar_gz(files: &[(&str, &str)]) -> Vec<u8> {
    let mut b = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::fast()));
    for (path, content) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(content.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, path, content.as_bytes()).unwrap();
    }
    b.into_inner().unwrap().finish().unwrap()
}

/// The files of a saved checkpoint, which the runner sends as a plain tar.
fn untar(bytes: &[u8]) -> Vec<(String, String)> {
    assert_ne!(
        &bytes[..2],
        [0x1f, 0x8b],
        "a checkpoint is sent uncompressed"
    );
    let mut out = Vec::new();
    let mut ar = tar::Archive::new(bytes);
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        if e.header().entry_type().is_file() {
            let mut s = String::new();
            e.read_to_string(&mut s).unwrap();
            out.push((e.path().unwrap().display().to_string(), s));
        }
    }
    out.sort();
    out
}

struct Env {
    fake: Fake,
    exec: Arc<LocalExecutor>,
    work: tempfile::TempDir,
}

fn sdk_path() -> PathBuf {
    let p = concat!(env!("CARGO_MANIFEST_DIR"), "/../../clients/python");
    std::fs::canonicalize(p).unwrap_or_else(|_| PathBuf::from(p))
}

async fn env(gpus: u32) -> Env {
    env_in(gpus, tempfile::tempdir().unwrap()).await
}

/// An executor whose `WORK_DIR` is `work` (which may hold what an earlier runner left).
async fn env_in(gpus: u32, work: tempfile::TempDir) -> Env {
    let fake = Fake::default();
    {
        let mut st = fake.state.lock().unwrap();
        st.parts.insert(
            ("t1-cls".into(), DatasetPart::Train as i32),
            tar_gz(&[
                ("train/train_data/data.csv", "x\n1\n"),
                ("train/train_label", "y\n0\n"),
            ]),
        );
        st.parts.insert(
            ("t1-cls".into(), DatasetPart::TrialData as i32),
            tar_gz(&[("test_submit/test_data/data.csv", "x\n5\n")]),
        );
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    let server = tonic::transport::Server::builder()
        .add_service(SessionInternalServer::new(fake.clone()))
        .add_service(StorageServiceServer::new(fake.clone()))
        .add_service(StorageInternalServer::new(fake.clone()))
        .add_service(SubmissionInternalServer::new(fake.clone()))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
    tokio::spawn(server);
    let addrs = ServiceAddrs {
        auth: addr.clone(),
        storage: addr.clone(),
        session: addr.clone(),
        quota: addr.clone(),
        submission: addr.clone(),
        leaderboard: addr,
        local: None,
        tls: None,
    };
    let clients = Clients::new(&addrs, "secret", "runner").unwrap();
    let cfg = RunnerConfig {
        work_dir: work.path().to_path_buf(),
        python: "python3".into(),
        sdk_path: sdk_path(),
        gpus: GpuInventory::with_count(gpus),
        limits: Default::default(),
        cpus: None,
        env_cache: None,
    };
    Env {
        fake,
        exec: LocalExecutor::new(cfg, clients),
        work,
    }
}

impl Env {
    fn add_code(&self, id: &str, files: &[(&str, &str)]) {
        self.fake
            .state
            .lock()
            .unwrap()
            .code
            .insert(id.into(), tar_gz(files));
    }

    async fn finished(&self, name: &str) -> (RunnerFinishedRequest, i32) {
        tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                let notified = self.fake.finished.notified();
                if let Some(f) = self
                    .fake
                    .state
                    .lock()
                    .unwrap()
                    .finished
                    .iter()
                    .find(|(f, _)| f.name == name)
                {
                    return f.clone();
                }
                notified.await;
            }
        })
        .await
        .expect("the session did not finish")
    }

    fn lines(&self, stream: &str) -> Vec<String> {
        let st = self.fake.state.lock().unwrap();
        st.logs
            .iter()
            .filter(|l| l.stream == stream)
            .map(|l| l.text.clone())
            .collect()
    }
}

fn session(name: &str, kind: SessionKind, code: &str, gpus: u32) -> Session {
    let parts: Vec<&str> = name.split('/').collect();
    Session {
        name: name.into(),
        team: parts[0].into(),
        dataset: parts[1].into(),
        number: parts[2].parse().unwrap(),
        kind: kind as i32,
        entry: "main.py".into(),
        code_snapshot: code.into(),
        resources: Some(Resources {
            gpus,
            cpus: 2,
            memory_bytes: 1 << 30,
            shm_bytes: 1 << 20,
        }),
        ..Default::default()
    }
}

const TRAIN: &str = r#"
import json, os, socket, sys
root = os.environ["NSML_DATASET_PATH"]
found = sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)
for f in found:
    print("data", f, flush=True)
print("gpus", repr(os.environ["CUDA_VISIBLE_DEVICES"]), os.environ["NSML_GPU_NUM"], flush=True)
print("oops", file=sys.stderr, flush=True)
sock = socket.socket(socket.AF_UNIX); sock.connect(os.environ["NSML_SOCKET"]); f = sock.makefile("rwb")
def call(obj):
    f.write(json.dumps(obj).encode() + b"\n"); f.flush()
    r = json.loads(f.readline()); print("R", json.dumps(r), flush=True); return r
call({"op": "report", "summary": True, "scope": None, "step": 3, "metrics": {"acc": 0.75}})
d = os.path.join(os.environ["NSML_SESSION_DIR"], "ckpt-tmp", "a"); os.makedirs(d)
open(os.path.join(d, "model.txt"), "w").write("w=42")
call({"op": "save", "checkpoint": "best", "path": d})
os.makedirs(d, exist_ok=True)
call({"op": "save", "checkpoint": "huge", "path": d})
r = call({"op": "load", "checkpoint": "best", "session": None})
print("loaded", open(os.path.join(r["path"], "model.txt")).read(), flush=True)
for i in range(200):
    print("line", i)
"#;

#[tokio::test]
async fn a_training_session_runs_end_to_end() {
    let e = env(2).await;
    e.add_code("c1", &[("main.py", TRAIN), ("lib/util.py", "")]);
    e.exec
        .start(session("demo/t1-cls/1", SessionKind::Train, "c1", 1), 0)
        .await
        .unwrap();
    let (fin, streams_open) = e.finished("demo/t1-cls/1").await;
    assert_eq!(
        (fin.exit_code, fin.reason.as_str(), fin.stopped),
        (0, "", false),
        "{:?}",
        e.lines("stderr")
    );
    assert_eq!(
        streams_open, 0,
        "the finish came before the log stream was closed"
    );

    let stdout = e.lines("stdout");
    assert_eq!(
        stdout[..2],
        ["data train/train_data/data.csv", "data train/train_label"]
    );
    assert_eq!(stdout[2], "gpus '0' 1");
    assert!(stdout.contains(&"loaded w=42".to_string()), "{stdout:?}");
    assert!(stdout.iter().any(|l| l.contains("over its checkpoint storage quota") && l.contains("\"ok\": false")));
    assert_eq!(stdout.last().unwrap(), "line 199");
    assert_eq!(e.lines("stderr"), ["oops"]);
    assert_eq!(
        e.lines("nsml")
            .iter()
            .filter(|l| *l == "Session ready")
            .count(),
        1
    );

    assert!(e.exec.running().await.is_empty());
    let st = e.fake.state.lock().unwrap();
    let seqs: Vec<u64> = st.logs.iter().map(|l| l.seq).collect();
    assert_eq!(
        seqs,
        (1..=seqs.len() as u64).collect::<Vec<_>>(),
        "seq runs from 1 without gaps"
    );
    assert_eq!(
        st.fetched_parts,
        [("t1-cls".to_string(), DatasetPart::Train as i32)]
    );
    assert_eq!(st.started.len(), 1);
    assert_eq!(st.started[0].gpu_ids, [0]);
    assert_eq!(st.reports.len(), 1);
    assert_eq!(
        st.reports[0].point.as_ref().unwrap().metrics_json,
        r#"{"acc":0.75}"#
    );
    assert_eq!(st.saved.len(), 1);
    assert_eq!(st.saved[0].0.summary_json, r#"{"acc":0.75}"#);
    assert_eq!(
        untar(&st.saved[0].1),
        [("model.txt".to_string(), "w=42".to_string())]
    );
    drop(st);

    assert!(
        !e.work.path().join("sessions/demo/t1-cls/1").exists(),
        "the session directory is removed"
    );
    assert_eq!(e.exec.gpus().free(), 2, "the GPU is given back");
}

const SUBMIT: &str = r#"
import json, os, socket, sys
print("args", sys.argv[1:], flush=True)
root = os.environ["NSML_DATASET_PATH"]
print("listing", sorted(os.listdir(root)), sorted(os.listdir(os.path.join(root, "test"))), flush=True)
x = open(os.path.join(root, "test", "test_data", "data.csv")).read().split()[1]
w = open(os.path.join(os.environ["NSML_CHECKPOINT_DIR"], "model.txt")).read()
sock = socket.socket(socket.AF_UNIX); sock.connect(os.environ["NSML_SOCKET"]); f = sock.makefile("rwb")
f.write(json.dumps({"op": "predictions", "predictions": [{"x": x, "w": w}]}).encode() + b"\n"); f.flush()
print("R", f.readline().decode().strip(), flush=True)
"#;

#[tokio::test]
async fn a_trial_submit_sees_only_trial_inputs_and_its_checkpoint() {
    let e = env(0).await;
    e.add_code("c2", &[("main.py", SUBMIT)]);
    e.fake.state.lock().unwrap().checkpoints.insert(
        ("demo/t1-cls/1".into(), "best".into()),
        tar_gz(&[("model.txt", "w=7")]),
    );
    let mut s = session("demo/t1-cls/2", SessionKind::TrialSubmit, "c2", 0);
    s.source_session = "demo/t1-cls/1".into();
    s.source_checkpoint = "best".into();
    e.exec.start(s, 600).await.unwrap();
    let (fin, _) = e.finished("demo/t1-cls/2").await;
    assert_eq!(
        (fin.exit_code, fin.reason.as_str()),
        (0, ""),
        "{:?}",
        e.lines("stderr")
    );
    let stdout = e.lines("stdout");
    assert_eq!(stdout[0], "args ['--mode', 'test', '--pause', '1']");
    assert_eq!(stdout[1], "listing ['test'] ['test_data']");
    assert_eq!(stdout[2], r#"R {"ok":true}"#);
    assert!(
        e.lines("nsml")
            .iter()
            .any(|l| l.contains("completed within 600 seconds"))
    );
    let st = e.fake.state.lock().unwrap();
    assert_eq!(
        st.fetched_parts,
        [("t1-cls".to_string(), DatasetPart::TrialData as i32)]
    );
    assert_eq!(st.predictions.len(), 1);
    assert_eq!(st.predictions[0].session, "demo/t1-cls/2");
    assert_eq!(
        st.predictions[0].predictions_json,
        r#"[{"w":"w=7","x":"5"}]"#
    );
}

#[tokio::test]
async fn setup_failures_finish_the_session_with_a_reason() {
    let e = env(1).await;
    e.add_code("no-entry", &[("train.py", "print(1)")]);
    e.add_code("escape", &[("main.py", "print(1)")]);
    // A code archive that tries to write outside its directory.
    {
        let mut b = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::fast()));
        let mut h = tar::Header::new_gnu();
        h.as_gnu_mut().unwrap().name[..9].copy_from_slice(b"../pwned!");
        h.set_size(1);
        h.set_cksum();
        b.append(&h, &b"x"[..]).unwrap();
        e.fake
            .state
            .lock()
            .unwrap()
            .code
            .insert("evil".into(), b.into_inner().unwrap().finish().unwrap());
    }
    let cases = [
        (
            "demo/t1-cls/1",
            "no-entry",
            0,
            "entry file main.py not found in the uploaded code",
        ),
        (
            "demo/t1-cls/2",
            "escape",
            2,
            "not enough free GPUs: asked 2, free 1 of 1",
        ),
        (
            "demo/t1-cls/3",
            "missing",
            0,
            "code snapshot `missing` not found",
        ),
        (
            "demo/t1-cls/4",
            "evil",
            0,
            "unsafe archive entry `../pwned!`: path contains `..`",
        ),
    ];
    for (name, code, gpus, _) in cases {
        e.exec
            .start(session(name, SessionKind::Train, code, gpus), 0)
            .await
            .unwrap();
    }
    for (name, _, _, reason) in cases {
        let (fin, _) = e.finished(name).await;
        assert_eq!(fin.exit_code, -1, "{name}");
        assert!(
            fin.reason.contains(reason),
            "{name}: `{}` lacks `{reason}`",
            fin.reason
        );
        assert!(
            e.lines("nsml").iter().any(|l| l.contains(reason)),
            "{name}: no nsml line with the reason"
        );
    }
    assert!(!e.work.path().join("sessions/demo/t1-cls/pwned!").exists());
    assert!(!e.work.path().join("sessions/demo/t1-cls/4/pwned!").exists());
    assert_eq!(e.exec.gpus().free(), 1);
}

#[tokio::test]
async fn stop_ends_a_running_session_and_the_dataset_is_fetched_once() {
    let e = env(0).await;
    e.add_code(
        "c3",
        &[(
            "main.py",
            "import time\nprint('up', flush=True)\ntime.sleep(300)\n",
        )],
    );
    e.exec
        .start(session("demo/t1-cls/7", SessionKind::Train, "c3", 0), 0)
        .await
        .unwrap();
    e.exec
        .start(session("demo/t1-cls/8", SessionKind::Train, "c3", 0), 0)
        .await
        .unwrap();
    let err = e
        .exec
        .start(session("demo/t1-cls/8", SessionKind::Train, "c3", 0), 0)
        .await
        .unwrap_err();
    assert!(err.contains("already running"), "{err}");
    tokio::time::timeout(Duration::from_secs(30), async {
        while e.lines("stdout").len() < 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the sessions did not start");
    assert_eq!(e.exec.running().await, ["demo/t1-cls/7", "demo/t1-cls/8"]);
    assert!(e.exec.stop("demo/t1-cls/7").await);
    assert!(e.exec.stop("demo/t1-cls/8").await);
    assert!(!e.exec.stop("demo/t1-cls/9").await);
    for name in ["demo/t1-cls/7", "demo/t1-cls/8"] {
        let (fin, _) = e.finished(name).await;
        assert!(fin.stopped, "{name}");
        assert_eq!(fin.exit_code, 128 + 15);
    }
    let st = e.fake.state.lock().unwrap();
    assert_eq!(
        st.fetched_parts.len(),
        1,
        "the second session used the cached part"
    );
    drop(st);
    assert!(is_empty_or_missing(
        &e.work.path().join("sessions/demo/t1-cls")
    ));
}

#[tokio::test]
async fn stop_during_setup_finishes_as_stopped() {
    let e = env(1).await;
    e.exec
        .start(session("demo/t1-cls/5", SessionKind::Train, "slow", 1), 0)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(e.exec.stop("demo/t1-cls/5").await);
    let (fin, _) = e.finished("demo/t1-cls/5").await;
    assert_eq!((fin.exit_code, fin.stopped), (-1, true));
    assert_eq!(fin.reason, "stopped before the process started");
    assert!(e.fake.state.lock().unwrap().started.is_empty());
    assert_eq!(e.exec.gpus().free(), 1);
}

fn is_empty_or_missing(p: &Path) -> bool {
    std::fs::read_dir(p)
        .map(|mut d| d.next().is_none())
        .unwrap_or(true)
}

#[tokio::test]
async fn the_runner_reports_its_live_sessions_by_heartbeat() {
    let e = env(0).await;
    e.add_code("hb", &[("main.py", "import time\ntime.sleep(300)\n")]);
    e.exec
        .start(session("demo/t1-cls/11", SessionKind::Train, "hb", 0), 0)
        .await
        .unwrap();
    let every = nsml_common::executor::HEARTBEAT_EVERY;
    tokio::time::timeout(every * 3, async {
        loop {
            let beat = e
                .fake
                .state
                .lock()
                .unwrap()
                .heartbeats
                .iter()
                .any(|names| names.iter().any(|n| n == "demo/t1-cls/11"));
            if beat {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("no heartbeat named the live session");
    assert!(e.exec.stop("demo/t1-cls/11").await);
    e.finished("demo/t1-cls/11").await;
}

/// Writes `content` at `rel` under `root`, making the directories on the way.
fn put(root: &Path, rel: &str, content: &str) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, content).unwrap();
}

/// Waits (generously) until `done` holds.
async fn until(what: &str, mut done: impl FnMut() -> bool) {
    tokio::time::timeout(Duration::from_secs(60), async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what}"));
}

#[tokio::test]
async fn what_a_killed_runner_left_is_removed_when_the_next_one_starts() {
    let work = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    put(outside.path(), "precious", "x");
    let w = work.path();
    put(w, "sessions/demo/t1-cls/3/code/main.py", "print(1)");
    put(w, "sessions/demo/t1-cls/3/tmp/scratch.bin", "0123456789");
    put(w, "sessions/rivals/t2-reg/9/out/model.pt", "w");
    std::os::unix::fs::symlink(outside.path(), w.join("sessions/demo/t1-cls/3/escape")).unwrap();
    put(w, "loads/demo.t1-cls.3.0a1b/model.txt", "w=1");
    put(w, "loads/0a1b2c/model.txt", "w=1");
    put(w, "staging/3c4d/model.txt", "w=2");
    put(w, "sockets/5e6f.sock", "");
    put(w, "datasets/t1-cls/.train-7a8b/archive/train/x", "1");
    put(w, "datasets/t1-cls/train-17/train/train_data/x", "1");

    let e = env_in(0, work).await;
    let w = e.work.path();
    until("what the killed runner left is still there", || {
        ["sessions", "loads", "staging", "sockets"]
            .iter()
            .all(|area| is_empty_or_missing(&w.join(area)))
    })
    .await;
    e.exec.swept().await;
    assert!(!w.join("datasets/t1-cls/.train-7a8b").exists());
    assert!(
        w.join("datasets/t1-cls/train-17/train/train_data/x")
            .exists(),
        "the dataset cache is kept"
    );
    assert_eq!(
        std::fs::read_to_string(outside.path().join("precious")).unwrap(),
        "x",
        "nothing is removed through a link"
    );

    // The runner goes on running sessions, under the same names too.
    e.add_code("again", &[("main.py", "print('again', flush=True)\n")]);
    e.exec
        .start(session("demo/t1-cls/3", SessionKind::Train, "again", 0), 0)
        .await
        .unwrap();
    let (fin, _) = e.finished("demo/t1-cls/3").await;
    assert_eq!((fin.exit_code, fin.reason.as_str()), (0, ""));
    assert_eq!(e.lines("stdout"), ["again"]);
}

#[tokio::test]
async fn removing_a_session_removes_what_is_left_of_it_and_nothing_else() {
    let e = env(0).await;
    e.exec.swept().await;
    let w = e.work.path();
    put(w, "sessions/demo/t1-cls/21/tmp/scratch.bin", "0123456789");
    put(w, "loads/demo.t1-cls.21.0a1b/model.txt", "w=1");
    put(w, "sessions/demo/t1-cls/2/tmp/scratch.bin", "x");
    put(w, "loads/demo.t1-cls.2.0a1b/model.txt", "w=1");
    put(w, "loads/demo.t1-cls.210.0a1b/model.txt", "w=1");

    e.exec.remove("demo/t1-cls/21").await.unwrap();
    assert!(!w.join("sessions/demo/t1-cls/21").exists());
    assert!(!w.join("loads/demo.t1-cls.21.0a1b").exists());
    for kept in [
        "sessions/demo/t1-cls/2/tmp/scratch.bin",
        "loads/demo.t1-cls.2.0a1b/model.txt",
        "loads/demo.t1-cls.210.0a1b/model.txt",
    ] {
        assert!(w.join(kept).exists(), "{kept} belongs to another session");
    }
    // Removing a session with nothing left is no error; a name that is not one is.
    e.exec.remove("demo/t1-cls/21").await.unwrap();
    for bad in ["demo/../2", "../../etc", "demo/t1-cls/02", "demo/t1-cls"] {
        let err = e.exec.remove(bad).await.unwrap_err();
        assert!(err.contains(bad), "{bad}: {err}");
    }
    assert!(w.join("sessions/demo/t1-cls/2/tmp/scratch.bin").exists());

    // A running session keeps its directory until its own end removes it.
    e.add_code(
        "live",
        &[(
            "main.py",
            "import time\nprint('up', flush=True)\ntime.sleep(300)\n",
        )],
    );
    e.exec
        .start(session("demo/t1-cls/22", SessionKind::Train, "live", 0), 0)
        .await
        .unwrap();
    until("the session did not start", || {
        !e.lines("stdout").is_empty()
    })
    .await;
    e.exec.remove("demo/t1-cls/22").await.unwrap();
    assert!(w.join("sessions/demo/t1-cls/22/code/main.py").exists());
    assert!(e.exec.stop("demo/t1-cls/22").await);
    e.finished("demo/t1-cls/22").await;
    assert!(!w.join("sessions/demo/t1-cls/22").exists());
}
