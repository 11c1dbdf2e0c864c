//! Runs the `nsml` binary against an in-process mock of the gateway and checks what a user sees (output and exit
//! codes) and what the server receives (tokens, upload chunks, requests).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

use std::future::Future;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Output;
use std::sync::{Arc, Mutex};

use futures::Stream;
use nsml_proto::v1 as pb;
use nsml_proto::v1::auth_service_server::{AuthService, AuthServiceServer};
use nsml_proto::v1::leaderboard_service_server::{LeaderboardService, LeaderboardServiceServer};
use nsml_proto::v1::session_service_server::{SessionService, SessionServiceServer};
use nsml_proto::v1::storage_service_server::{StorageService, StorageServiceServer};
use nsml_proto::v1::submission_service_server::{SubmissionService, SubmissionServiceServer};
use tokio::io::AsyncWriteExt;
use tonic::{Request, Response, Status, Streaming};

const TOKEN: &str = "tok-alice";
const GIB: u64 = 1024 * 1024 * 1024;

type Rpc<T> = Result<Response<T>, Status>;
type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// What the mock received, and how it answers submits.
#[derive(Default)]
struct State {
    /// Lengths of the `data` chunks of the last code upload.
    upload_chunks: Vec<usize>,
    upload_dataset: String,
    upload: Vec<u8>,
    /// How many uploads came, and the snapshot ids (content hashes) they stored.
    uploads: usize,
    snapshots: Vec<String>,
    /// How many `FindCode` calls came.
    finds: usize,
    runs: Vec<pb::RunRequest>,
    removes: Vec<pb::RemoveRequest>,
    registered: Vec<(pb::DatasetMeta, Vec<u8>)>,
    applied: Option<pb::ApplyCompetitionRequest>,
    /// Statuses `SubmissionService.Get` returns, one per call; the last one repeats.
    submit_script: Vec<pb::Submission>,
    submit_refusal: Option<String>,
    gets: usize,
    /// How many `SubmissionService.Get` calls are answered `UNAVAILABLE` first, as while it restarts.
    get_outage: usize,
    /// `SubmissionService.Submit` records the submission, then answers `UNAVAILABLE`, as when the platform
    /// goes away before its answer is sent.
    submit_answer_lost: bool,
    /// `SubmissionService.Submit` answers `UNAVAILABLE` and records nothing.
    submit_never_arrives: bool,
    /// What `SubmissionService.List` returns.
    listed: Vec<pb::Submission>,
}

#[derive(Clone, Default)]
struct Mock(Arc<Mutex<State>>);

impl Mock {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap()
    }
}

fn authorized<T>(request: &Request<T>) -> Result<(), Status> {
    match request
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
    {
        Some(value) if value == format!("Bearer {TOKEN}") => Ok(()),
        _ => Err(Status::unauthenticated("invalid or expired token")),
    }
}

/// Implements the methods the client never calls, in the shape `async_trait` gives trait methods.
macro_rules! unused {
    ($($name:ident($req:ty) -> $resp:ty;)*) => {$(
        fn $name<'life0, 'async_trait>(
            &'life0 self,
            _request: Request<$req>,
        ) -> Pin<Box<dyn Future<Output = Rpc<$resp>> + Send + 'async_trait>>
        where
            'life0: 'async_trait,
            Self: 'async_trait,
        {
            Box::pin(async { Err(Status::unimplemented(stringify!($name))) })
        }
    )*};
}

fn session(name: &str, kind: pb::SessionKind, status: pb::SessionStatus) -> pb::Session {
    pb::Session {
        name: name.into(),
        team: "demo".into(),
        dataset: "t1-cls".into(),
        kind: kind as i32,
        status: status as i32,
        created_at_ms: 1,
        ..Default::default()
    }
}

#[tonic::async_trait]
impl AuthService for Mock {
    async fn login(&self, request: Request<pb::LoginRequest>) -> Rpc<pb::LoginResponse> {
        let login = request.into_inner();
        if login.username == "alice" && login.password == "alice-pass" {
            Ok(Response::new(pb::LoginResponse {
                token: TOKEN.into(),
                expires_at_ms: 0,
                username: "alice".into(),
            }))
        } else {
            Err(Status::unauthenticated("wrong user name or password"))
        }
    }

    async fn logout(&self, request: Request<pb::Empty>) -> Rpc<pb::Empty> {
        authorized(&request)?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn who_am_i(&self, request: Request<pb::Empty>) -> Rpc<pb::Identity> {
        authorized(&request)?;
        Ok(Response::new(pb::Identity {
            username: "alice".into(),
            admin: false,
            memberships: vec![pb::Membership {
                team: "demo".into(),
                competition: "demo".into(),
            }],
            hosts: vec![],
        }))
    }

    async fn apply_competition(
        &self,
        request: Request<pb::ApplyCompetitionRequest>,
    ) -> Rpc<pb::Competition> {
        authorized(&request)?;
        let apply = request.into_inner();
        let mut competition = apply.competition.clone().unwrap_or_default();
        competition.policy_version = 1;
        self.state().applied = Some(apply);
        Ok(Response::new(competition))
    }

    unused! {
        add_user(pb::AddUserRequest) -> pb::Empty;
        list_competitions(pb::Empty) -> pb::ListCompetitionsResponse;
        get_competition(pb::GetCompetitionRequest) -> pb::Competition;
        reveal_private(pb::RevealPrivateRequest) -> pb::Competition;
    }
}

#[tonic::async_trait]
impl StorageService for Mock {
    type DownloadCodeStream = BoxStream<pb::Chunk>;
    type PullCheckpointStream = BoxStream<pb::Chunk>;

    async fn register_dataset(
        &self,
        request: Request<Streaming<pb::RegisterDatasetChunk>>,
    ) -> Rpc<pb::Dataset> {
        authorized(&request)?;
        let mut stream = request.into_inner();
        let Some(pb::RegisterDatasetChunk {
            kind: Some(pb::register_dataset_chunk::Kind::Meta(meta)),
        }) = stream.message().await?
        else {
            return Err(Status::invalid_argument(
                "the first message must carry meta",
            ));
        };
        let mut data = Vec::new();
        while let Some(chunk) = stream.message().await? {
            match chunk.kind {
                Some(pb::register_dataset_chunk::Kind::Data(bytes))
                    if bytes.len() <= 256 * 1024 =>
                {
                    data.extend(bytes)
                }
                _ => return Err(Status::invalid_argument("bad chunk")),
            }
        }
        let size = data.len() as u64;
        self.state().registered.push((meta.clone(), data));
        Ok(Response::new(pb::Dataset {
            meta: Some(meta),
            size_bytes: size,
            ..Default::default()
        }))
    }

    async fn list_datasets(
        &self,
        request: Request<pb::ListDatasetsRequest>,
    ) -> Rpc<pb::ListDatasetsResponse> {
        authorized(&request)?;
        Ok(Response::new(pb::ListDatasetsResponse {
            datasets: vec![pb::Dataset {
                meta: Some(pb::DatasetMeta {
                    name: "t1-cls".into(),
                    description: "3-class classification".into(),
                    metric: "accuracy".into(),
                    direction: pb::Direction::Descending as i32,
                    ..Default::default()
                }),
                size_bytes: 2048,
                author: "host".into(),
                ..Default::default()
            }],
        }))
    }

    async fn upload_code(
        &self,
        request: Request<Streaming<pb::UploadCodeChunk>>,
    ) -> Rpc<pb::CodeSnapshot> {
        authorized(&request)?;
        let mut stream = request.into_inner();
        let Some(pb::UploadCodeChunk {
            kind: Some(pb::upload_code_chunk::Kind::Meta(meta)),
        }) = stream.message().await?
        else {
            return Err(Status::invalid_argument(
                "the first message must carry meta",
            ));
        };
        let mut chunks = Vec::new();
        let mut data = Vec::new();
        while let Some(chunk) = stream.message().await? {
            match chunk.kind {
                Some(pb::upload_code_chunk::Kind::Data(bytes)) => {
                    chunks.push(bytes.len());
                    data.extend(bytes);
                }
                _ => return Err(Status::invalid_argument("meta after data")),
            }
        }
        let mut state = self.state();
        state.upload_chunks = chunks;
        state.upload_dataset = meta.dataset;
        // As the platform names snapshots: by the archive's content.
        let id = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&data));
        state.upload = data;
        state.uploads += 1;
        state.snapshots.push(id.clone());
        Ok(Response::new(pb::CodeSnapshot {
            id,
            size_bytes: state.upload.len() as u64,
            team: "demo".into(),
        }))
    }

    async fn find_code(&self, request: Request<pb::FindCodeRequest>) -> Rpc<pb::CodeSnapshot> {
        authorized(&request)?;
        let id = request.into_inner().id;
        self.state().finds += 1;
        if !self.state().snapshots.contains(&id) {
            return Err(Status::not_found(format!("code snapshot `{id}` not found")));
        }
        Ok(Response::new(pb::CodeSnapshot {
            id,
            size_bytes: 1,
            team: "demo".into(),
        }))
    }

    async fn list_checkpoints(
        &self,
        request: Request<pb::ListCheckpointsRequest>,
    ) -> Rpc<pb::ListCheckpointsResponse> {
        authorized(&request)?;
        Ok(Response::new(pb::ListCheckpointsResponse {
            checkpoints: vec![pb::Checkpoint {
                session: request.get_ref().session.clone(),
                name: "0".into(),
                size_bytes: 628_536_033,
                saved_at_ms: 0,
                summary_json: r#"{"epoch":0,"train_loss":2.87,"val_cer":0.957}"#.into(),
                elapsed_secs: 6.261,
            }],
        }))
    }

    async fn pull_checkpoint(
        &self,
        request: Request<pb::PullCheckpointRequest>,
    ) -> Rpc<Self::PullCheckpointStream> {
        authorized(&request)?;
        let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
            Vec::new(),
            flate2::Compression::default(),
        ));
        let mut header = tar::Header::new_gnu();
        header.set_size(5);
        header.set_mode(0o644);
        builder
            .append_data(&mut header, "model/weights.bin", &b"12345"[..])
            .unwrap();
        let archive = builder.into_inner().unwrap().finish().unwrap();
        // Tiny chunks, so that the client reassembles a stream.
        let chunks: Vec<Result<pb::Chunk, Status>> = archive
            .chunks(7)
            .map(|c| Ok(pb::Chunk { data: c.to_vec() }))
            .collect();
        Ok(Response::new(Box::pin(futures::stream::iter(chunks))))
    }

    unused! {
        get_dataset(pb::GetDatasetRequest) -> pb::Dataset;
        download_code(pb::DownloadCodeRequest) -> Self::DownloadCodeStream;
        delete_checkpoint(pb::DeleteCheckpointRequest) -> pb::DeleteCheckpointResponse;
        usage(pb::UsageRequest) -> pb::StorageUsage;
    }
}

#[tonic::async_trait]
impl SessionService for Mock {
    type LogsStream = BoxStream<pb::LogLine>;
    type WatchStream = BoxStream<pb::ListSessionsResponse>;
    type WatchMetricsStream = BoxStream<pb::MetricsResponse>;

    async fn run(&self, request: Request<pb::RunRequest>) -> Rpc<pb::Session> {
        authorized(&request)?;
        let run = request.into_inner();
        let name = format!("demo/{}/1", run.dataset);
        // As the session service answers a client that does not know whether it uploaded the code.
        if run.code_unconfirmed && !self.state().snapshots.contains(&run.code_snapshot) {
            return Err(Status::not_found(format!(
                "code snapshot `{}` not found",
                run.code_snapshot
            )));
        }
        self.state().runs.push(run);
        Ok(Response::new(session(
            &name,
            pb::SessionKind::Train,
            pb::SessionStatus::Queued,
        )))
    }

    async fn list(
        &self,
        request: Request<pb::ListSessionsRequest>,
    ) -> Rpc<pb::ListSessionsResponse> {
        authorized(&request)?;
        let mut failed = session(
            "demo/t1-cls/2",
            pb::SessionKind::Submit,
            pb::SessionStatus::Failed,
        );
        failed.exit_code = 137;
        failed.reason = "Killed (out of memory: limit 24G)".into();
        failed.source_session = "demo/t1-cls/1".into();
        Ok(Response::new(pb::ListSessionsResponse {
            sessions: vec![
                session(
                    "demo/t1-cls/1",
                    pb::SessionKind::Train,
                    pb::SessionStatus::Running,
                ),
                failed,
            ],
        }))
    }

    async fn get(&self, request: Request<pb::GetSessionRequest>) -> Rpc<pb::Session> {
        authorized(&request)?;
        let mut ended = session(
            &request.get_ref().name,
            pb::SessionKind::Train,
            pb::SessionStatus::Exited,
        );
        ended.exit_code = 0;
        Ok(Response::new(ended))
    }

    async fn logs(&self, request: Request<pb::LogsRequest>) -> Rpc<Self::LogsStream> {
        authorized(&request)?;
        if request.get_ref().name.ends_with("/9") {
            return Err(Status::permission_denied(
                "the logs of a real submit are hidden",
            ));
        }
        let line = |seq, stream: &str, text: &str| {
            Ok(pb::LogLine {
                seq,
                at_ms: 1,
                stream: stream.into(),
                text: text.into(),
            })
        };
        Ok(Response::new(Box::pin(futures::stream::iter(vec![
            line(1, "stdout", "epoch 0 loss 2.87"),
            line(2, "stderr", "warning: slow disk\n"),
            line(3, "stdout", "done"),
        ]))))
    }

    async fn remove(&self, request: Request<pb::RemoveRequest>) -> Rpc<pb::RemoveResponse> {
        authorized(&request)?;
        let remove = request.into_inner();
        let removed = match remove.pattern.as_str() {
            "demo/t1-cls/1*" => vec!["demo/t1-cls/1".into(), "demo/t1-cls/10".into()],
            "demo/t1-cls/1" => vec!["demo/t1-cls/1".into()],
            _ => vec![],
        };
        self.state().removes.push(remove);
        Ok(Response::new(pb::RemoveResponse {
            removed,
            kept: Vec::new(),
        }))
    }

    unused! {
        stop(pb::StopRequest) -> pb::Session;
        memo(pb::MemoRequest) -> pb::Session;
        metrics(pb::MetricsRequest) -> pb::MetricsResponse;
        watch(pb::ListSessionsRequest) -> Self::WatchStream;
        watch_metrics(pb::MetricsRequest) -> Self::WatchMetricsStream;
    }
}

#[tonic::async_trait]
impl SubmissionService for Mock {
    type WatchStream = BoxStream<pb::ListSubmissionsResponse>;

    async fn submit(&self, request: Request<pb::SubmitRequest>) -> Rpc<pb::Submission> {
        authorized(&request)?;
        let mut state = self.state();
        if let Some(reason) = &state.submit_refusal {
            return Err(Status::failed_precondition(reason.clone()));
        }
        if state.submit_never_arrives {
            return Err(Status::unavailable("the gateway went away"));
        }
        let r = request.get_ref();
        let made = pb::Submission {
            id: "sub-1".into(),
            source_session: r.session.clone(),
            checkpoint: r.checkpoint.clone(),
            trial: r.trial,
            status: pb::SubmissionStatus::Running as i32,
            time_limit_secs: 3600,
            ..Default::default()
        };
        state.listed.push(made.clone());
        if state.submit_answer_lost {
            return Err(Status::unavailable("the gateway went away"));
        }
        Ok(Response::new(made))
    }

    async fn list(
        &self,
        request: Request<pb::ListSubmissionsRequest>,
    ) -> Rpc<pb::ListSubmissionsResponse> {
        authorized(&request)?;
        Ok(Response::new(pb::ListSubmissionsResponse {
            submissions: self.state().listed.clone(),
        }))
    }

    async fn get(&self, request: Request<pb::GetSubmissionRequest>) -> Rpc<pb::Submission> {
        authorized(&request)?;
        let mut state = self.state();
        if state.get_outage > 0 {
            state.get_outage -= 1;
            return Err(Status::unavailable(
                "the submission service is unavailable, retry shortly",
            ));
        }
        let i = state.gets.min(state.submit_script.len().saturating_sub(1));
        state.gets += 1;
        state
            .submit_script
            .get(i)
            .cloned()
            .map(Response::new)
            .ok_or_else(|| Status::not_found("no submission"))
    }

    unused! {
        watch(pb::ListSubmissionsRequest) -> Self::WatchStream;
    }
}

#[tonic::async_trait]
impl LeaderboardService for Mock {
    type WatchBoardStream = BoxStream<pb::BoardResponse>;
    type WatchOverallStream = BoxStream<pb::OverallResponse>;

    async fn board(&self, request: Request<pb::BoardRequest>) -> Rpc<pb::BoardResponse> {
        authorized(&request)?;
        Ok(Response::new(pb::BoardResponse {
            dataset: request.get_ref().dataset.clone(),
            competition: "demo".into(),
            metric: "accuracy".into(),
            direction: pb::Direction::Descending as i32,
            private: false,
            rows: vec![pb::BoardRow {
                rank: 1,
                team: "demo".into(),
                score: 0.855,
                model: "demo/t1-cls/1/0".into(),
                count: 2,
                last_submit_ms: 0,
                best_at_ms: 0,
            }],
        }))
    }

    async fn overall(&self, request: Request<pb::OverallRequest>) -> Rpc<pb::OverallResponse> {
        authorized(&request)?;
        Ok(Response::new(pb::OverallResponse {
            competition: request.get_ref().competition.clone(),
            datasets: vec!["t1-cls".into(), "t2-reg".into()],
            private: false,
            rows: vec![pb::OverallRow {
                rank: 1,
                team: "demo".into(),
                mean_rank: 1.0,
                ranks: vec![1, 1],
                submitted: vec![true, false],
            }],
        }))
    }

    unused! {
        history(pb::HistoryRequest) -> pb::HistoryResponse;
        watch_board(pb::BoardRequest) -> Self::WatchBoardStream;
        watch_overall(pb::OverallRequest) -> Self::WatchOverallStream;
    }
}

/// A running mock gateway and a private credentials directory.
struct Harness {
    mock: Mock,
    server: String,
    config: tempfile::TempDir,
}

impl Harness {
    async fn start() -> Self {
        let mock = Mock::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = format!("http://{}", listener.local_addr().unwrap());
        let router = tonic::transport::Server::builder()
            .add_service(AuthServiceServer::new(mock.clone()))
            .add_service(StorageServiceServer::new(mock.clone()))
            .add_service(SessionServiceServer::new(mock.clone()))
            .add_service(SubmissionServiceServer::new(mock.clone()))
            .add_service(LeaderboardServiceServer::new(mock.clone()));
        tokio::spawn(
            router.serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        Self {
            mock,
            server,
            config: tempfile::tempdir().unwrap(),
        }
    }

    /// Runs `nsml ARGS` in `dir` with `stdin`, against the mock unless `--server` is among the args.
    async fn nsml_in(&self, dir: &Path, args: &[&str], stdin: &str) -> Output {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_nsml"));
        command
            .args(args)
            .current_dir(dir)
            .env("NSML_CONFIG_DIR", self.config.path())
            .env_remove("NSML_TOKEN")
            .env_remove("NSML_SERVER")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        if !args.contains(&"--server") {
            command.env("NSML_SERVER", &self.server);
        }
        let mut child = command.spawn().unwrap();
        let mut input = child.stdin.take().unwrap();
        input.write_all(stdin.as_bytes()).await.unwrap();
        drop(input);
        child.wait_with_output().await.unwrap()
    }

    async fn nsml(&self, args: &[&str]) -> Output {
        self.nsml_in(self.config.path(), args, "").await
    }

    async fn login(&self) {
        let args = ["login", "-u", "alice", "--password-stdin"];
        let out = self
            .nsml_in(self.config.path(), &args, "alice-pass\n")
            .await;
        assert_eq!(code(&out), 0, "{}", stderr(&out));
    }
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn code(out: &Output) -> i32 {
    out.status.code().unwrap_or(-1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_stores_the_token_that_later_calls_carry() {
    let h = Harness::start().await;
    let out = h.nsml(&["ps"]).await;
    assert_eq!(code(&out), 1);
    assert!(
        stderr(&out).contains("Error: invalid or expired token"),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("nsml login"), "{}", stderr(&out));

    let out = h
        .nsml_in(
            h.config.path(),
            &["login", "-u", "alice", "--password-stdin"],
            "wrong\n",
        )
        .await;
    assert_eq!(code(&out), 1);
    assert!(stderr(&out).contains("wrong user name or password"));

    let out = h
        .nsml_in(
            h.config.path(),
            &["login", "-u", "alice", "--password-stdin"],
            "alice-pass\n",
        )
        .await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(stdout(&out), "Welcome to NSML!\n");
    let stored: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(h.config.path().join("credentials.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(stored["token"], TOKEN);
    assert_eq!(stored["username"], "alice");
    assert_eq!(stored["server"], h.server);

    let out = h.nsml(&["whoami"]).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(stdout(&out).contains("alice"));
    assert!(stdout(&out).contains("demo (competition demo)"));

    let out = h.nsml(&["logout"]).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(!h.config.path().join("credentials.json").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_before_login_says_once_how_to_log_in() {
    let h = Harness::start().await;
    let out = h.nsml(&["ps"]).await;
    assert_eq!(code(&out), 1);
    assert_eq!(
        stderr(&out).matches("nsml login").count(),
        1,
        "{}",
        stderr(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_is_named() {
    let h = Harness::start().await;
    let out = h.nsml(&["ps", "--server", "http://127.0.0.1:9"]).await;
    assert_eq!(code(&out), 1);
    assert_eq!(
        stderr(&out),
        "Error: cannot reach the NSML server at http://127.0.0.1:9 (is nsmld running?)\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_uploads_the_directory_without_ignored_files() {
    let h = Harness::start().await;
    h.login().await;
    let work = tempfile::tempdir().unwrap();
    std::fs::write(work.path().join("main.py"), "print('hi')\n").unwrap();
    std::fs::write(work.path().join(".nsmlignore"), "# data\ndata/\n*.ckpt\n").unwrap();
    std::fs::create_dir_all(work.path().join("data")).unwrap();
    std::fs::write(work.path().join("data/big.bin"), vec![0u8; 1024]).unwrap();
    std::fs::write(work.path().join("old.ckpt"), "x").unwrap();
    // Incompressible, so that the upload takes several chunks.
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let noise: Vec<u8> = (0..700_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(work.path().join("noise.bin"), &noise).unwrap();

    let out = h
        .nsml_in(
            work.path(),
            &[
                "run",
                "-d",
                "t1-cls",
                "-g",
                "0",
                "--shm-size",
                "512M",
                "-a",
                "--epochs 3",
                "-m",
                "first",
            ],
            "",
        )
        .await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        ".nsmlignore check - start\n.nsmlignore check - done\nSession demo/t1-cls/1 is started\n"
    );
    assert!(!stderr(&out).contains("Warning"), "{}", stderr(&out));

    let state = h.mock.state();
    assert_eq!(state.upload_dataset, "t1-cls");
    assert!(state.upload_chunks.len() >= 3, "{:?}", state.upload_chunks);
    assert!(state.upload_chunks.iter().all(|&n| n <= 256 * 1024));
    assert!(
        state.upload_chunks[..state.upload_chunks.len() - 1]
            .iter()
            .all(|&n| n == 256 * 1024)
    );
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(&state.upload[..]));
    let mut names = Vec::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        names.push(entry.path().unwrap().to_string_lossy().into_owned());
        let mut sink = Vec::new();
        entry.read_to_end(&mut sink).unwrap();
    }
    assert_eq!(names, [".nsmlignore", "main.py", "noise.bin"]);

    let run = &state.runs[0];
    assert_eq!(run.dataset, "t1-cls");
    assert_eq!(run.entry, "main.py");
    assert_eq!(run.args, "--epochs 3");
    assert_eq!(run.memo, "first");
    let uploaded = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&state.upload));
    assert_eq!(run.code_snapshot, uploaded);
    assert_eq!(
        run.resources,
        Some(pb::Resources {
            gpus: 0,
            cpus: 2,
            memory_bytes: 24 * GIB,
            shm_bytes: 512 * 1024 * 1024,
        })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_of_unchanged_code_uploads_nothing() {
    let h = Harness::start().await;
    h.login().await;
    let work = tempfile::tempdir().unwrap();
    std::fs::write(work.path().join("main.py"), "print('hi')\n").unwrap();
    let run = ["run", "-d", "t1-cls", "-g", "0"];
    let first = h.nsml_in(work.path(), &run, "").await;
    assert_eq!(code(&first), 0, "{}", stderr(&first));
    assert_eq!(h.mock.state().uploads, 1);

    let again = h.nsml_in(work.path(), &run, "").await;
    assert_eq!(code(&again), 0, "{}", stderr(&again));
    assert!(
        stdout(&again).contains("Code unchanged since it was last uploaded: nothing to upload\n"),
        "{}",
        stdout(&again)
    );
    {
        let state = h.mock.state();
        assert_eq!(state.uploads, 1, "unchanged code is not uploaded again");
        assert_eq!(state.runs[1].code_snapshot, state.runs[0].code_snapshot);
        // Named from what this machine packed before, checked and started in one call.
        assert!(!state.runs[0].code_unconfirmed);
        assert!(state.runs[1].code_unconfirmed);
        assert_eq!(state.finds, 1, "only the first run looked for its code");
    }

    // Whatever the archive records of a file is part of the code: its content, its mode, its name.
    let mut expected_uploads = 1;
    let mut snapshots = vec![h.mock.state().runs[0].code_snapshot.clone()];
    let changes: [&dyn Fn(&Path); 3] = [
        &|dir| std::fs::write(dir.join("main.py"), "print('changed')\n").unwrap(),
        &|dir| {
            use std::os::unix::fs::PermissionsExt as _;
            let file = dir.join("main.py");
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o755)).unwrap();
        },
        &|dir| std::fs::rename(dir.join("main.py"), dir.join("train.py")).unwrap(),
    ];
    let run_train = ["run", "-d", "t1-cls", "-g", "0", "-e", "train.py"];
    for (i, change) in changes.iter().enumerate() {
        change(work.path());
        let args: &[&str] = if i == 2 { &run_train } else { &run };
        let changed = h.nsml_in(work.path(), args, "").await;
        assert_eq!(code(&changed), 0, "{}", stderr(&changed));
        expected_uploads += 1;
        let state = h.mock.state();
        assert_eq!(state.uploads, expected_uploads, "change {i} is uploaded");
        let snapshot = state.runs.last().unwrap().code_snapshot.clone();
        assert!(!snapshots.contains(&snapshot), "change {i} is new code");
        snapshots.push(snapshot);
    }

    // A snapshot this machine remembers but the server does not have (another server, say) is uploaded.
    h.mock.state().snapshots.clear();
    let elsewhere = h.nsml_in(work.path(), &run_train, "").await;
    assert_eq!(code(&elsewhere), 0, "{}", stderr(&elsewhere));
    assert!(!stdout(&elsewhere).contains("nothing to upload"));
    let state = h.mock.state();
    assert_eq!(state.uploads, expected_uploads + 1);
    let last = state.runs.last().unwrap();
    assert_eq!(&last.code_snapshot, snapshots.last().unwrap());
    assert!(!last.code_unconfirmed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_refuses_a_missing_entry_before_uploading() {
    let h = Harness::start().await;
    h.login().await;
    let work = tempfile::tempdir().unwrap();
    std::fs::write(work.path().join("train.py"), "").unwrap();
    let out = h.nsml_in(work.path(), &["run", "-d", "t1-cls"], "").await;
    assert_eq!(code(&out), 1);
    assert_eq!(stderr(&out), "Error: entry file main.py not found in .\n");
    assert!(h.mock.state().runs.is_empty());
    assert!(h.mock.state().upload.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interactive_runs_follow_the_logs_and_remove_the_session() {
    let h = Harness::start().await;
    h.login().await;
    let work = tempfile::tempdir().unwrap();
    std::fs::write(work.path().join("main.py"), "").unwrap();
    let out = h
        .nsml_in(work.path(), &["run", "-d", "t1-cls", "-i"], "")
        .await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(
        stdout(&out).ends_with(
            "Session demo/t1-cls/1 is started\nepoch 0 loss 2.87\ndone\nRemoved demo/t1-cls/1\n"
        ),
        "{}",
        stdout(&out)
    );
    assert_eq!(stderr(&out), "warning: slow disk\n");
    assert!(h.mock.state().runs[0].interactive);
    assert!(h.mock.state().removes[0].force);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_print_tables_or_json() {
    let h = Harness::start().await;
    h.login().await;

    let out = h.nsml(&["ps", "-a"]).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.starts_with("Name "), "{text}");
    assert!(text.contains("Failed (exit 137)"), "{text}");
    assert!(text.contains("submit of demo/t1-cls/1"), "{text}");
    assert!(text.contains("--mode test --pause 1"), "{text}");
    assert!(
        text.ends_with("demo/t1-cls/2 failed: Killed (out of memory: limit 24G)\n"),
        "{text}"
    );

    let out = h.nsml(&["ps", "-j"]).await;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json[1]["status"], "failed");
    assert_eq!(json[1]["reason"], "Killed (out of memory: limit 24G)");

    let out = h.nsml(&["model", "ls", "demo/t1-cls/1"]).await;
    assert_eq!(
        stdout(&out),
        "Checkpoint  Last Modified  Elapsed  Summary                                  Size\n\
         0           -              6.261    epoch=0, train_loss=2.87, val_cer=0.957  599.42 MB\n"
    );

    let out = h.nsml(&["dataset", "board", "t1-cls"]).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(
        stdout(&out).starts_with("t1-cls · Accuracy · Descending\nRank  Team  Score  Model"),
        "{}",
        stdout(&out)
    );

    let out = h.nsml(&["board"]).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "demo · Overall\nRank  Team  Mean rank  t1-cls  t2-reg\n1     demo  1          1       no submission (1)\n\
         Mean rank: a team's ranks averaged over the 2 datasets; a dataset it has no submission on counts as the \
         last rank (1, the number of teams ranked).\n",
        "one team that submitted to one dataset is not ranked first on the other"
    );

    let out = h.nsml(&["dataset", "ls", "-j"]).await;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json[0]["name"], "t1-cls");
    assert_eq!(json[0]["direction"], "descending");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rm_prints_each_removed_session() {
    let h = Harness::start().await;
    h.login().await;
    let out = h.nsml(&["rm", "-f", "demo/t1-cls/1*"]).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "Removed demo/t1-cls/1\nRemoved demo/t1-cls/10\n"
    );
    assert_eq!(h.mock.state().removes[0].pattern, "demo/t1-cls/1*");

    let out = h.nsml(&["rm", "demo/t1-cls/7"]).await;
    assert_eq!(code(&out), 1);
    assert_eq!(stderr(&out), "No session matches demo/t1-cls/7\n");
}

fn submission(status: pb::SubmissionStatus, session: &str) -> pb::Submission {
    pb::Submission {
        id: "sub-1".into(),
        session: session.into(),
        status: status as i32,
        time_limit_secs: 3600,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_submit_is_narrated_until_scored() {
    let h = Harness::start().await;
    h.login().await;
    let mut scored = submission(pb::SubmissionStatus::Scored, "demo/t1-cls/9");
    scored.score = 0.855;
    h.mock.state().submit_script = vec![
        submission(pb::SubmissionStatus::Running, ""),
        submission(pb::SubmissionStatus::Running, "demo/t1-cls/9"),
        submission(pb::SubmissionStatus::Scoring, "demo/t1-cls/9"),
        scored,
    ];
    let out = h.nsml(&["submit", "demo/t1-cls/1", "0"]).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "Submit demo/t1-cls/1/0\n\
         Session demo/t1-cls/9 ready\n\
         Load model\n\
         Infer test set. The inference should be completed within 3600 seconds.\n\
         Scoring\n\
         Score: 0.855\n\
         Done\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submit_is_followed_through_an_outage_of_the_platform() {
    let h = Harness::start().await;
    h.login().await;
    let mut scored = submission(pb::SubmissionStatus::Scored, "demo/t1-cls/9");
    scored.score = 0.855;
    {
        let mut state = h.mock.state();
        state.submit_script = vec![
            submission(pb::SubmissionStatus::Running, "demo/t1-cls/9"),
            scored,
        ];
        state.get_outage = 6;
    }
    let out = h.nsml(&["submit", "demo/t1-cls/1", "0"]).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(
        stdout(&out).ends_with("Score: 0.855\nDone\n"),
        "{}",
        stdout(&out)
    );
    assert_eq!(
        stderr(&out),
        "The NSML server is unavailable (The service is currently unavailable); retrying following \
         the submission for up to 40 seconds\n",
        "one line says that it retries"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submit_whose_answer_is_lost_is_found_and_followed_not_sent_twice() {
    let h = Harness::start().await;
    h.login().await;
    let mut earlier = submission(pb::SubmissionStatus::Scored, "demo/t1-cls/4");
    earlier.id = "sub-0".into();
    earlier.source_session = "demo/t1-cls/1".into();
    earlier.checkpoint = "0".into();
    let mut scored = submission(pb::SubmissionStatus::Scored, "demo/t1-cls/9");
    scored.score = 0.855;
    {
        let mut state = h.mock.state();
        state.listed = vec![earlier];
        state.submit_answer_lost = true;
        state.submit_script = vec![scored];
    }
    let out = h.nsml(&["submit", "demo/t1-cls/1", "0"]).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(
        stdout(&out).ends_with("Score: 0.855\nDone\n"),
        "{}",
        stdout(&out)
    );
    assert_eq!(
        stderr(&out),
        "The answer to the submit was lost, but the submit reached the server as sub-1: following it\n"
    );
    assert_eq!(
        h.mock.state().listed.len(),
        2,
        "the submit was sent once: the earlier submission of the same checkpoint and this one"
    );

    // A submit that never arrived is still an error, and the earlier submissions are not taken for it.
    {
        let mut state = h.mock.state();
        state.submit_answer_lost = false;
        state.submit_never_arrives = true;
    }
    let out = h.nsml(&["submit", "demo/t1-cls/1", "0"]).await;
    assert_eq!(code(&out), 1, "{}", stdout(&out));
    assert!(!stderr(&out).contains("following it"), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trial_submit_shows_its_output() {
    let h = Harness::start().await;
    h.login().await;
    let mut scored = submission(pb::SubmissionStatus::Scored, "demo/t1-cls/3");
    scored.score = 1.0;
    scored.trial = true;
    h.mock.state().submit_script = vec![scored];
    let out = h.nsml(&["submit", "-t", "demo/t1-cls/1", "0"]).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.starts_with("Submit demo/t1-cls/1/0 (trial)\n"),
        "{text}"
    );
    assert!(text.contains("Score: 1\nDone\n"), "{text}");
    // The session's own log tells its stages; nothing is said twice.
    assert!(
        text.contains("Session demo/t1-cls/3 is started\n") && !text.contains("Load model"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_refused_and_timed_out_submits_exit_1() {
    let h = Harness::start().await;
    h.login().await;
    let mut failed = submission(pb::SubmissionStatus::Failed, "demo/t1-cls/9");
    failed.reason = "Killed (out of memory: limit 24G)".into();
    h.mock.state().submit_script = vec![failed];
    let out = h.nsml(&["submit", "demo/t1-cls/1", "0"]).await;
    assert_eq!(code(&out), 1);
    assert_eq!(
        stderr(&out),
        "Submit failed: Killed (out of memory: limit 24G)\n"
    );

    {
        let mut state = h.mock.state();
        state.gets = 0;
        state.submit_script = vec![submission(pb::SubmissionStatus::TimedOut, "demo/t1-cls/9")];
    }
    let out = h.nsml(&["submit", "demo/t1-cls/1", "0"]).await;
    assert_eq!(code(&out), 1);
    assert_eq!(stderr(&out), "Submit timed out after 3600 seconds\n");

    h.mock.state().submit_refusal =
        Some("one real submit per hour on t1-cls; the next is allowed at 12:00:00".into());
    let out = h.nsml(&["submit", "demo/t1-cls/1", "0"]).await;
    assert_eq!(code(&out), 1);
    assert_eq!(
        stderr(&out),
        "Error: one real submit per hour on t1-cls; the next is allowed at 12:00:00\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_pull_extracts_the_checkpoint() {
    let h = Harness::start().await;
    h.login().await;
    let work = tempfile::tempdir().unwrap();
    let out = h
        .nsml_in(work.path(), &["model", "pull", "demo/t1-cls/1", "best"], "")
        .await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let file: PathBuf = work.path().join("demo_t1-cls_1_best/model/weights.bin");
    assert_eq!(std::fs::read(file).unwrap(), b"12345");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_apply_registers_datasets_then_the_competition() {
    let h = Harness::start().await;
    h.login().await;
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/competition.toml");
    let out = h
        .nsml(&["admin", "competition", "apply", manifest.to_str().unwrap()])
        .await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("Datasets registered: 2\n  t1-cls (Accuracy)\n  t2-reg (MSE)\n"),
        "{text}"
    );
    assert!(
        text.contains("Teams: 2\n  demo: alice\n  rivals: bob\n"),
        "{text}"
    );
    assert!(text.contains("Users: 3\n  alice, bob, host\n"), "{text}");

    {
        let state = h.mock.state();
        let names: Vec<_> = state
            .registered
            .iter()
            .map(|(m, _)| m.name.as_str())
            .collect();
        assert_eq!(names, ["t1-cls", "t2-reg"]);
        assert!(
            state
                .registered
                .iter()
                .all(|(m, data)| m.competition == "demo" && !data.is_empty())
        );
        let applied = state.applied.as_ref().unwrap();
        assert_eq!(applied.competition.as_ref().unwrap().id, "demo");
    }

    let out = h
        .nsml(&["admin", "competition", "apply", "/nonexistent.toml"])
        .await;
    assert_eq!(code(&out), 1);
    assert!(
        stderr(&out).starts_with("Error: cannot read `/nonexistent.toml`"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_load_in_their_shells_and_a_wrong_call_exits_2() {
    let h = Harness::start().await;
    let bash = h.nsml(&["completion", "bash"]).await;
    assert_eq!(code(&bash), 0, "{}", stderr(&bash));
    assert!(
        stdout(&bash).contains("submit"),
        "the commands are completed"
    );
    // A real bash loads the script and registers the completion for `nsml`.
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("nsml.bash");
    std::fs::write(&script, stdout(&bash)).unwrap();
    let loaded = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!("source {} && complete -p nsml", script.display()))
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&loaded.stdout).contains("-F _nsml nsml"),
        "{}",
        String::from_utf8_lossy(&loaded.stderr)
    );
    let zsh = h.nsml(&["completion", "zsh"]).await;
    assert!(stdout(&zsh).starts_with("#compdef nsml"));
    let fish = h.nsml(&["completion", "fish"]).await;
    assert!(stdout(&fish).contains("complete -c nsml"));

    let wrong = h.nsml(&["completion", "tcsh"]).await;
    assert_eq!(code(&wrong), 2, "a usage error");
    assert!(
        stderr(&wrong).contains("possible values"),
        "{}",
        stderr(&wrong)
    );
}
