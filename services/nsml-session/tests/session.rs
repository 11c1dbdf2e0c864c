//! The session service served for real: a fresh SQLite log per test, the in-process bus and its relay, the
//! service on 127.0.0.1:0 behind the internal guard, a fake executor standing for the runners' machines and a
//! fake quota service that grants every admission. The test plays the participant and the runner.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use nsml_common::ServiceContext;
use nsml_common::caller::{Caller, INTERNAL_SECRET_KEY, SERVICE_KEY};
use nsml_common::clients::ServiceAddrs;
use nsml_common::error::ErrorCode;
use nsml_common::event::new_event;
use nsml_common::executor::{Capacity, Executor};
use nsml_common::server::{random_secret, serve};
use nsml_eventstore::{EventStore, ExpectedVersion, SqliteStore};
use nsml_proto::internal::v1::quota_internal_server::{QuotaInternal, QuotaInternalServer};
use nsml_proto::internal::v1::session_internal_client::SessionInternalClient;
use nsml_proto::internal::v1::{
    RunnerFinishedRequest, RunnerHeartbeatRequest, RunnerStartedRequest,
};
use nsml_proto::v1::session_service_client::SessionServiceClient;
use nsml_proto::v1::{
    AdmitRequest, CodeSnapshot, CodeUploaded, Dataset, DatasetMeta, DatasetRegistered, Decision,
    EventPayload, GetSessionRequest, Identity, Membership, Resources, RunRequest, Session,
    SessionStatus, StopRequest,
};
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

/// Stands for the machines that run sessions: remembers what it was asked and which runners are alive.
#[derive(Default)]
struct FakeExecutor {
    alive: Mutex<HashSet<String>>,
    started: Mutex<Vec<String>>,
    stopped: Mutex<Vec<String>>,
    capacity: Capacity,
}

impl FakeExecutor {
    fn with(alive: &[&str], capacity: Capacity) -> Arc<Self> {
        Arc::new(Self {
            alive: Mutex::new(alive.iter().map(|s| s.to_string()).collect()),
            capacity,
            ..Default::default()
        })
    }

    fn started(&self) -> Vec<String> {
        self.started.lock().clone()
    }

    fn stopped(&self) -> Vec<String> {
        self.stopped.lock().clone()
    }

    /// The runner of `name` is gone, as if its machine died.
    fn lose(&self, name: &str) {
        self.alive.lock().remove(name);
    }
}

#[async_trait::async_trait]
impl Executor for FakeExecutor {
    async fn start(&self, session: Session, _time_limit_secs: u64) -> Result<(), String> {
        self.started.lock().push(session.name.clone());
        self.alive.lock().insert(session.name);
        Ok(())
    }

    async fn stop(&self, name: &str) -> bool {
        self.stopped.lock().push(name.to_string());
        self.alive.lock().contains(name)
    }

    async fn running(&self) -> Vec<String> {
        self.alive.lock().iter().cloned().collect()
    }

    fn capacity(&self) -> Capacity {
        self.capacity
    }
}

/// A quota service that grants every admission.
struct GrantAll;

#[tonic::async_trait]
impl QuotaInternal for GrantAll {
    async fn admit(&self, req: Request<AdmitRequest>) -> Result<Response<Decision>, Status> {
        Ok(Response::new(Decision {
            id: format!("grant-{}", req.get_ref().session),
            granted: true,
            ..Default::default()
        }))
    }
}

/// How runners are watched in these tests: silence of a second fails a session.
const WATCH: nsml_session::Supervision = nsml_session::Supervision {
    sweep_every: Duration::from_millis(100),
    // Long against the tests' heartbeats every 100 ms, so that a busy machine never makes a live runner look
    // silent.
    heartbeat_timeout: Duration::from_secs(3),
};

/// One life of the session service over a log that outlives it.
struct Harness {
    client: SessionServiceClient<Channel>,
    runner: SessionInternalClient<Channel>,
    secret: String,
    cancel: CancellationToken,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// The log and the service's directory, which survive a restart of the service.
struct Platform {
    store: Arc<dyn EventStore>,
    dir: tempfile::TempDir,
}

impl Platform {
    /// A fresh log holding dataset `mnist` of competition `demo` and code snapshot `code-ants` of team ants.
    async fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let store: Arc<dyn EventStore> = Arc::new(
            SqliteStore::open(&dir.path().join("log.db"))
                .await
                .expect("open the log"),
        );
        let p = Platform { store, dir };
        p.append(
            "dataset-mnist",
            &DatasetRegistered {
                dataset: Some(Dataset {
                    meta: Some(DatasetMeta {
                        name: "mnist".into(),
                        competition: "demo".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                blob: String::new(),
            },
        )
        .await;
        p.append(
            "code-code-ants",
            &CodeUploaded {
                snapshot: Some(CodeSnapshot {
                    id: "code-ants".into(),
                    team: "ants".into(),
                    size_bytes: 10,
                }),
                uploaded_by: "alice".into(),
            },
        )
        .await;
        p
    }

    async fn append<P: EventPayload>(&self, stream: &str, payload: &P) {
        self.store
            .append(
                stream,
                ExpectedVersion::Any,
                vec![new_event(payload, "test", "")],
            )
            .await
            .expect("append");
    }

    /// Starts the session service (and the fake quota service beside it) over this platform's log.
    async fn serve(&self, executor: Arc<FakeExecutor>) -> Harness {
        let bus = nsml_bus::InProcessBus::new();
        let cancel = CancellationToken::new();
        nsml_bus::spawn_relay(self.store.clone(), bus.clone(), cancel.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = format!("http://{}", listener.local_addr().expect("address"));
        let secret = random_secret();
        let ctx = ServiceContext {
            store: self.store.clone(),
            bus,
            addrs: ServiceAddrs::all_at(&addr),
            secret: secret.clone().into(),
            data_dir: self.dir.path().join("session"),
            cancel: cancel.clone(),
            executor: Some(executor),
        };
        let started = nsml_session::start_with(ctx, WATCH).await.expect("start");
        let routes = (started.routes)(tonic::service::Routes::default())
            .add_service(QuotaInternalServer::new(GrantAll));
        let mut names = started.names;
        names.push("nsml.internal.v1.QuotaInternal");
        let (serve_secret, serve_cancel): (Arc<str>, _) = (secret.clone().into(), cancel.clone());
        tokio::spawn(async move {
            serve(listener, routes, &names, serve_secret, serve_cancel)
                .await
                .expect("serve");
        });
        let channel = Channel::from_shared(addr)
            .expect("endpoint")
            .connect()
            .await
            .expect("connect");
        Harness {
            client: SessionServiceClient::new(channel.clone()),
            runner: SessionInternalClient::new(channel),
            secret,
            cancel,
        }
    }
}

fn alice() -> Identity {
    Identity {
        username: "alice".into(),
        memberships: vec![Membership {
            team: "ants".into(),
            competition: "demo".into(),
        }],
        ..Default::default()
    }
}

impl Harness {
    /// A request as the gateway sends it for alice.
    fn as_alice<T>(&self, msg: T) -> Request<T> {
        let mut req = self.internal(msg);
        Caller::attach_identity(req.metadata_mut(), &alice());
        req
    }

    /// A request as a runner sends it.
    fn as_runner<T>(&self, msg: T) -> Request<T> {
        let mut req = self.internal(msg);
        req.metadata_mut()
            .insert(SERVICE_KEY, "runner".parse().expect("ascii"));
        req
    }

    fn internal<T>(&self, msg: T) -> Request<T> {
        let mut req = Request::new(msg);
        req.metadata_mut().insert(
            INTERNAL_SECRET_KEY,
            self.secret.parse().expect("ascii secret"),
        );
        req
    }

    async fn run(&self, gpus: u32) -> Session {
        let req = RunRequest {
            dataset: "mnist".into(),
            code_snapshot: "code-ants".into(),
            resources: Some(Resources {
                gpus,
                ..Default::default()
            }),
            ..Default::default()
        };
        self.client
            .clone()
            .run(self.as_alice(req))
            .await
            .expect("run")
            .into_inner()
    }

    async fn get(&self, name: &str) -> Session {
        let req = GetSessionRequest { name: name.into() };
        self.client
            .clone()
            .get(self.as_alice(req))
            .await
            .expect("get")
            .into_inner()
    }

    async fn started(&self, name: &str) {
        let req = RunnerStartedRequest {
            name: name.into(),
            pid: 42,
            ..Default::default()
        };
        self.runner
            .clone()
            .runner_started(self.as_runner(req))
            .await
            .expect("runner started");
    }

    async fn finished(&self, name: &str, exit_code: i32, stopped: bool) {
        let req = RunnerFinishedRequest {
            name: name.into(),
            exit_code,
            stopped,
            ..Default::default()
        };
        self.runner
            .clone()
            .runner_finished(self.as_runner(req))
            .await
            .expect("runner finished");
    }

    async fn heartbeat(&self, names: &[&str]) {
        let req = RunnerHeartbeatRequest {
            names: names.iter().map(|n| n.to_string()).collect(),
        };
        self.runner
            .clone()
            .runner_heartbeat(self.as_runner(req))
            .await
            .expect("heartbeat");
    }

    /// Waits (up to 60 s: generous, for a busy machine) until `name` is in `status`, and answers it.
    async fn until(&self, name: &str, status: SessionStatus) -> Session {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let s = self.get(name).await;
            if s.status() == status {
                return s;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name} is {:?}, not {status:?}: {}",
                s.status(),
                s.reason
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A team's upload of code as storage records it.
fn code_uploaded(id: &str, team: &str) -> CodeUploaded {
    CodeUploaded {
        snapshot: Some(CodeSnapshot {
            id: id.into(),
            team: team.into(),
            size_bytes: 10,
        }),
        uploaded_by: "someone".into(),
    }
}

#[tokio::test]
async fn code_another_team_uploaded_too_runs_once_this_team_s_upload_is_recorded() {
    let p = Platform::new().await;
    let code_of = |team: &str| code_uploaded("code-shared", team);
    // Two teams upload the same code; the other team's upload is recorded first.
    p.append("code-code-shared", &code_of("bees")).await;
    let h = p.serve(Arc::new(FakeExecutor::default())).await;
    let req = RunRequest {
        dataset: "mnist".into(),
        code_snapshot: "code-shared".into(),
        resources: Some(Resources::default()),
        ..Default::default()
    };
    let mut client = h.client.clone();
    let run = tokio::spawn({
        let req = h.as_alice(req.clone());
        async move { client.run(req).await }
    });
    // This team's upload is recorded while the run waits (a moment later: the run is asked first).
    tokio::time::sleep(Duration::from_millis(500)).await;
    p.append("code-code-shared", &code_of("ants")).await;
    let session = run
        .await
        .unwrap()
        .expect("the run waits for its own upload");
    assert_eq!(session.into_inner().code_snapshot, "code-shared");

    // Code only another team uploaded is refused, after the wait for an upload of this team's.
    let mut req = req;
    req.code_snapshot = "code-bees-only".into();
    p.append(
        "code-code-bees-only",
        &code_uploaded("code-bees-only", "bees"),
    )
    .await;
    let err = h
        .client
        .clone()
        .run(h.as_alice(req))
        .await
        .expect_err("another team's code");
    assert!(err.message().contains("another team"), "{err:?}");
}

#[tokio::test]
async fn a_run_of_unconfirmed_code_starts_only_on_this_team_s_upload_and_hides_another_team_s() {
    let p = Platform::new().await;
    p.append(
        "code-code-bees-only",
        &code_uploaded("code-bees-only", "bees"),
    )
    .await;
    let executor = FakeExecutor::with(&[], Capacity::default());
    let h = p.serve(executor.clone()).await;
    let run = |snapshot: &str| RunRequest {
        dataset: "mnist".into(),
        code_snapshot: snapshot.into(),
        resources: Some(Resources::default()),
        code_unconfirmed: true,
        ..Default::default()
    };

    // Code the team never uploaded, and code only another team did, are alike unknown to the caller.
    for snapshot in ["code-never-uploaded", "code-bees-only"] {
        let err = h
            .client
            .clone()
            .run(h.as_alice(run(snapshot)))
            .await
            .expect_err(snapshot);
        assert_eq!(err.code(), tonic::Code::NotFound, "{snapshot}: {err:?}");
        assert!(err.message().contains("not found"), "{snapshot}: {err:?}");
    }
    assert!(executor.started().is_empty());

    // The team's own upload runs in the same call.
    let s = h
        .client
        .clone()
        .run(h.as_alice(run("code-ants")))
        .await
        .expect("the team's code runs")
        .into_inner();
    assert_eq!(s.code_snapshot, "code-ants");
    assert_eq!(executor.started(), [s.name.as_str()]);
}

#[tokio::test]
async fn a_run_is_started_by_the_executor_and_the_runners_finish_records_the_end() {
    let platform = Platform::new().await;
    let executor = FakeExecutor::with(&[], Capacity::default());
    let h = platform.serve(executor.clone()).await;

    let s = h.run(1).await;
    assert_eq!(s.name, "ants/mnist/1");
    assert_eq!(s.status(), SessionStatus::Queued);
    assert_eq!(executor.started(), ["ants/mnist/1"]);

    h.started(&s.name).await;
    let running = h.get(&s.name).await;
    assert_eq!(running.status(), SessionStatus::Running);
    assert!(running.started_at_ms > 0);

    h.finished(&s.name, 0, false).await;
    let ended = h.get(&s.name).await;
    assert_eq!(ended.status(), SessionStatus::Exited);
    assert_eq!(ended.exit_code, 0);
    assert!(ended.ended_at_ms >= running.started_at_ms);

    // A second session that fails says why, and a repeated report changes nothing.
    let s2 = h.run(0).await;
    assert_eq!(s2.name, "ants/mnist/2");
    h.started(&s2.name).await;
    h.finished(&s2.name, 3, false).await;
    h.finished(&s2.name, 0, false).await;
    let failed = h.get(&s2.name).await;
    assert_eq!(failed.status(), SessionStatus::Failed);
    assert_eq!(failed.reason, "exited with code 3");
}

#[tokio::test]
async fn a_stop_of_a_running_session_asks_its_runner_and_records_the_stop() {
    let platform = Platform::new().await;
    let executor = FakeExecutor::with(&[], Capacity::default());
    let h = platform.serve(executor.clone()).await;
    let s = h.run(0).await;
    h.started(&s.name).await;

    let stopping = h
        .client
        .clone()
        .stop(h.as_alice(StopRequest {
            name: s.name.clone(),
        }))
        .await
        .expect("stop")
        .into_inner();
    assert_eq!(stopping.status(), SessionStatus::Stopping);
    assert_eq!(executor.stopped(), [s.name.as_str()]);
    // The runner stops the process and reports it.
    h.finished(&s.name, 143, true).await;
    let stopped = h.get(&s.name).await;
    assert_eq!(stopped.status(), SessionStatus::Stopped);
    assert!(stopped.ended_at_ms > 0);

    // A session whose runner is gone is stopped at once.
    let s2 = h.run(0).await;
    h.started(&s2.name).await;
    executor.lose(&s2.name);
    let at_once = h
        .client
        .clone()
        .stop(h.as_alice(StopRequest {
            name: s2.name.clone(),
        }))
        .await
        .expect("stop")
        .into_inner();
    assert_eq!(at_once.status(), SessionStatus::Stopped);

    // Another team's caller may not stop it.
    let mut bob = h.internal(StopRequest {
        name: s2.name.clone(),
    });
    let bees = Identity {
        username: "bob".into(),
        memberships: vec![Membership {
            team: "bees".into(),
            competition: "demo".into(),
        }],
        ..Default::default()
    };
    Caller::attach_identity(bob.metadata_mut(), &bees);
    let refused = h.client.clone().stop(bob).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    assert_eq!(
        refused.message(),
        "session `ants/mnist/2` belongs to another team"
    );
    assert_eq!(ErrorCode::of(&refused), Some(ErrorCode::PermissionDenied));
}

#[tokio::test]
async fn a_runner_that_stops_heartbeating_fails_its_session_with_a_reason() {
    let platform = Platform::new().await;
    let executor = FakeExecutor::with(&[], Capacity::default());
    let h = platform.serve(executor.clone()).await;
    let alive = h.run(0).await;
    let silent = h.run(0).await;
    h.started(&alive.name).await;
    h.started(&silent.name).await;

    // One runner keeps reporting, the other falls silent.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let failed = loop {
        h.heartbeat(&[alive.name.as_str()]).await;
        let s = h.get(&silent.name).await;
        if s.status() == SessionStatus::Failed {
            break s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the silent session is still {:?}",
            s.status()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        failed.reason,
        "the runner stopped reporting: no heartbeat for 3 seconds"
    );
    assert!(executor.stopped().contains(&silent.name));
    assert_eq!(h.get(&alive.name).await.status(), SessionStatus::Running);
}

#[tokio::test]
async fn a_restart_fails_sessions_whose_runner_is_gone_and_queues_the_waiting_again() {
    let platform = Platform::new().await;
    let one_gpu = Capacity {
        gpus: Some(1),
        cpus: None,
    };
    let first = FakeExecutor::with(&[], one_gpu);
    let (kept, lost, waiting) = {
        let h = platform.serve(first.clone()).await;
        let kept = h.run(1).await;
        let lost = h.run(0).await;
        let waiting = h.run(1).await;
        h.started(&kept.name).await;
        h.started(&lost.name).await;
        assert_eq!(waiting.status(), SessionStatus::Queued);
        assert_eq!(
            waiting.reason,
            "Allocated, not created yet: waiting for free cluster capacity"
        );
        assert_eq!(first.started(), [kept.name.clone(), lost.name.clone()]);
        (kept.name, lost.name, waiting.name)
    };

    // The platform restarts; only the first session's runner survived.
    let second = FakeExecutor::with(&[kept.as_str()], one_gpu);
    let h = platform.serve(second.clone()).await;
    assert_eq!(h.get(&kept).await.status(), SessionStatus::Running);
    let failed = h.until(&lost, SessionStatus::Failed).await;
    assert_eq!(
        failed.reason,
        "the runner was lost when the platform restarted"
    );
    let still = h.get(&waiting).await;
    assert_eq!(still.status(), SessionStatus::Queued);
    assert_eq!(
        still.reason,
        "Allocated, not created yet: waiting for free cluster capacity"
    );
    assert!(second.started().is_empty(), "the GPU is still held");

    // Once the surviving session ends, the waiting one gets the GPU.
    h.heartbeat(&[kept.as_str()]).await;
    h.finished(&kept, 0, false).await;
    assert_eq!(second.started(), [waiting.as_str()]);
    h.started(&waiting).await;
    assert_eq!(h.get(&waiting).await.status(), SessionStatus::Running);
}
