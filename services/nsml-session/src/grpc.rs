//! The `SessionService` gRPC API: participants' calls (run, ps, logs, stop, rm, memo) and the runner's reports.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use nsml_common::aggregate::{Aggregates, Outcome};
use nsml_common::caller::Caller;
use nsml_common::clients::Clients;
use nsml_common::event::new_event;
use nsml_common::executor::Executor;
use nsml_common::names::{SessionName, sessions_stream, wildcard_match};
use nsml_common::projection::Projection;
use nsml_common::{ServiceContext, now_ms, status};
use nsml_eventstore::NewEvent;
use nsml_proto::v1::session_service_server::SessionService as SessionApi;
use nsml_proto::v1::{
    AdmitRequest, DeleteCheckpointRequest, Empty, GetSessionRequest, ListSessionsRequest,
    ListSessionsResponse, LogLine, LogsRequest, MemoChanged, MemoRequest, MetricsReported,
    MetricsRequest, MetricsResponse, RemoveRequest, RemoveResponse, Resources, RunRequest,
    RunnerFinishedRequest, RunnerHeartbeatRequest, RunnerLogBatch, RunnerReportRequest,
    RunnerStartedRequest, Session, SessionAdmitted, SessionExited, SessionFailed, SessionKind,
    SessionRejected, SessionRemoved, SessionRequested, SessionStarted, SessionStatus,
    SessionStopRequested, SessionStopped, StartSubmitRequest,
};
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use crate::dispatch::Dispatcher;
use crate::domain::{TeamDataset, finish_status};
use crate::logs::{Live, LogStore};
use crate::projection::{Entry, Sessions, view};

const GIB: u64 = 1024 * 1024 * 1024;

/// The session service.
#[derive(Clone)]
pub struct SessionService {
    ctx: ServiceContext,
    proj: Arc<Projection<Sessions>>,
    clients: Clients,
    executor: Arc<dyn Executor>,
    logs: Arc<LogStore>,
    streams: Arc<Aggregates<TeamDataset>>,
    dispatch: Arc<Dispatcher>,
}

type LogStream = Pin<Box<dyn Stream<Item = Result<LogLine, Status>> + Send>>;

fn check_entry(entry: &str) -> Result<(), Status> {
    let bad = entry.is_empty()
        || entry.starts_with('/')
        || entry.split('/').any(|p| p == ".." || p.is_empty())
        || entry.contains('\0');
    if bad {
        return Err(Status::invalid_argument(format!(
            "invalid entry file `{entry}`: give a path inside your code directory, e.g. main.py"
        )));
    }
    Ok(())
}

/// The most GPUs one session may ask for: more than any single machine carries (eight or sixteen today).
/// Beyond it a request is a mistake or an attack on the quota arithmetic, not a workload.
pub const MAX_GPUS: u32 = 64;
/// The most CPUs one session may ask for: more than the cores of any single machine.
pub const MAX_CPUS: u32 = 1024;
/// The most memory one session may ask for, in bytes (16 TiB): more than any single machine has.
pub const MAX_MEMORY_BYTES: u64 = 16 * 1024 * GIB;
/// The most shared memory one session may ask for, in bytes: shared memory is carved out of memory, so no
/// more than [`MAX_MEMORY_BYTES`].
pub const MAX_SHM_BYTES: u64 = MAX_MEMORY_BYTES;

/// Refuses resources beyond what any machine has, naming the field and its maximum. The team's limits are the
/// quota service's to apply; this bound keeps absurd numbers out of the log and the quota arithmetic.
fn check_resources(r: &Resources) -> Result<(), Status> {
    let over = |field: &str, asked: String, max: String| {
        Err(Status::invalid_argument(format!(
            "resources.{field} is {asked}; a session may ask for at most {max}, more than any machine has: ask for what the job needs"
        )))
    };
    if r.gpus > MAX_GPUS {
        return over("gpus", r.gpus.to_string(), format!("{MAX_GPUS} GPUs"));
    }
    if r.cpus > MAX_CPUS {
        return over("cpus", r.cpus.to_string(), format!("{MAX_CPUS} CPUs"));
    }
    if r.memory_bytes > MAX_MEMORY_BYTES {
        return over(
            "memory_bytes",
            format!("{} bytes", r.memory_bytes),
            format!("{MAX_MEMORY_BYTES} bytes (16 TiB)"),
        );
    }
    if r.shm_bytes > MAX_SHM_BYTES {
        return over(
            "shm_bytes",
            format!("{} bytes", r.shm_bytes),
            format!("{MAX_SHM_BYTES} bytes (16 TiB)"),
        );
    }
    Ok(())
}

fn with_defaults(r: Option<Resources>) -> Resources {
    let mut r = r.unwrap_or(Resources {
        gpus: 1,
        cpus: 2,
        memory_bytes: 24 * GIB,
        shm_bytes: GIB,
    });
    if r.cpus == 0 {
        r.cpus = 2;
    }
    if r.memory_bytes == 0 {
        r.memory_bytes = 24 * GIB;
    }
    if r.shm_bytes == 0 {
        r.shm_bytes = GIB;
    }
    r
}

impl SessionService {
    pub(crate) fn new(
        ctx: ServiceContext,
        proj: Arc<Projection<Sessions>>,
        clients: Clients,
        executor: Arc<dyn Executor>,
        logs: Arc<LogStore>,
    ) -> Self {
        let streams = Arc::new(Aggregates::new(ctx.store.clone()));
        Self {
            ctx,
            proj,
            clients,
            executor,
            logs,
            streams,
            dispatch: Arc::default(),
        }
    }

    async fn settle(&self, position: u64) {
        // Called after an append is stored: the caller must not repeat it, so a lag is logged, not returned.
        if let Err(lag) = self.proj.wait_for(position, Duration::from_secs(5)).await {
            tracing::warn!(%lag, "the session view did not show an append in time");
        }
    }

    /// Appends an event to a session's stream unless `skip` says the transition already happened, and waits
    /// until this service's view shows it.
    async fn transition(
        &self,
        name: &str,
        skip: impl Fn(&crate::domain::Lite) -> bool,
        event: NewEvent,
    ) -> Result<(), Status> {
        if let Some(position) = self.record(name, skip, event).await? {
            self.settle(position).await;
        }
        Ok(())
    }

    /// Appends an event to a session's stream unless `skip` says the transition already happened; returns the
    /// event's position when it was appended.
    async fn record(
        &self,
        name: &str,
        skip: impl Fn(&crate::domain::Lite) -> bool,
        event: NewEvent,
    ) -> Result<Option<u64>, Status> {
        let sn = SessionName::parse(name)?;
        let outcome = self
            .streams
            .execute(&sn.stream(), |state, _| {
                match state.sessions.get(&sn.number) {
                    None => Err(Status::not_found(format!("session `{name}` not found"))),
                    Some(l) if skip(l) => Ok(vec![]),
                    Some(_) => Ok(vec![event.clone()]),
                }
            })
            .await
            .map_err(|e| status::store("recording a session change", e))?;
        match outcome {
            Outcome::Committed { appended } => Ok(Some(appended.last_position)),
            Outcome::Unchanged { .. } => Ok(None),
            Outcome::Rejected(s) => Err(s),
        }
    }

    /// Allocates the next number on the team's dataset and records the request.
    async fn request(&self, mut template: Session, actor: &str) -> Result<Session, Status> {
        let stream = sessions_stream(&template.team, &template.dataset);
        let mut made = None;
        let outcome = self
            .streams
            .execute(&stream, |state, _| {
                let n = state.next_number();
                let mut s = template.clone();
                s.number = n;
                s.name = format!("{}/{}/{}", s.team, s.dataset, n);
                let ev = new_event(
                    &SessionRequested {
                        session: Some(s.clone()),
                    },
                    actor,
                    "",
                );
                made = Some(s);
                Ok::<_, Status>(vec![ev])
            })
            .await
            .map_err(|e| status::store("recording a session request", e))?;
        match outcome {
            Outcome::Committed { .. } => {}
            Outcome::Unchanged { .. } => {}
            Outcome::Rejected(s) => return Err(s),
        }
        template =
            made.ok_or_else(|| status::internal("requesting a session", "no session made"))?;
        Ok(template)
    }

    /// Asks the quota service for the session's resources; records a grant on the session, and a rejection only
    /// where the quota service recorded no decision.
    /// `seen_position` is the log position the caller has seen (0 for none), for the quota service to catch up
    /// to before deciding.
    async fn admit(&self, s: &Session, actor: &str, seen_position: u64) -> Result<(), Status> {
        let req = AdmitRequest {
            team: s.team.clone(),
            competition: s.competition.clone(),
            kind: s.kind,
            session: s.name.clone(),
            dataset: s.dataset.clone(),
            resources: s.resources,
            submission_id: s.submission_id.clone(),
            command_id: s.name.clone(),
            seen_position,
        };
        let decision = self.clients.quota.clone().admit(req).await;
        let name = s.name.clone();
        match decision.map(|d| d.into_inner()) {
            Ok(d) if d.granted => {
                let ev = new_event(
                    &SessionAdmitted {
                        name: name.clone(),
                        decision_id: d.id,
                    },
                    actor,
                    "",
                );
                self.transition(&name, |_| false, ev).await
            }
            // The quota service recorded the refusal (`AdmissionDenied`, naming this session), and the read
            // model takes it as the session's rejection: a second event here would only repeat it.
            Ok(d) => Err(Status::failed_precondition(d.reason)),
            Err(st) => {
                // No decision was recorded: the rejection is, so the session does not linger as requested; the
                // caller gets the cause either way. A rejected session is never shown, so the caller need not
                // wait for the view to catch up.
                let ev = new_event(
                    &SessionRejected {
                        name: name.clone(),
                        reason: format!("admission failed: {}", st.message()),
                    },
                    actor,
                    "",
                );
                let _ = self.record(&name, |_| false, ev).await;
                Err(status::upstream("asking the quota service", st))
            }
        }
    }

    /// Hands an admitted session to the executor; a start failure fails the session.
    /// Queues an admitted session and starts whatever fits the cluster now; a start failure of this
    /// session is the caller's error.
    async fn launch(&self, s: &Session, time_limit_secs: u64) -> Result<(), Status> {
        self.dispatch.enqueue(s.clone(), time_limit_secs);
        self.pump().await;
        let failed = self.proj.read(|st| {
            st.sessions
                .get(&s.name)
                .filter(|e| e.session.status() == SessionStatus::Failed)
                .map(|e| e.session.reason.clone())
        });
        match failed {
            Some(reason) => Err(Status::failed_precondition(format!(
                "session {} could not start: {reason}",
                s.name
            ))),
            None => Ok(()),
        }
    }

    /// Hands every queued session that fits the cluster to the executor.
    async fn pump(&self) {
        loop {
            let ready = self.dispatch.take_ready(self.executor.capacity());
            if ready.is_empty() {
                return;
            }
            for w in ready {
                let name = w.session.name.clone();
                if let Err(reason) = self.executor.start(w.session, w.time_limit_secs).await {
                    if let Err(err) = self.record_failure(&name, -1, &reason).await {
                        tracing::error!(session = %name, %err, "could not record a failed start");
                    }
                    self.logs.end(&name);
                    self.dispatch.forget(&name);
                }
            }
        }
    }

    /// Fails the launched sessions whose runner stopped reporting, so that they hold nothing.
    pub(crate) async fn sweep_silent_runners(&self) {
        let timeout = nsml_common::executor::HEARTBEAT_TIMEOUT;
        for name in self.dispatch.silent(timeout, std::time::Instant::now()) {
            let reason = format!(
                "the runner stopped reporting: no heartbeat for {} seconds",
                timeout.as_secs()
            );
            tracing::warn!(session = %name, "{reason}");
            if let Err(err) = self.record_failure(&name, -1, &reason).await {
                tracing::error!(session = %name, %err, "could not fail a session whose runner is lost");
                continue;
            }
            self.executor.stop(&name).await;
            self.ended(&name).await;
        }
    }

    /// What every ended session needs: followers told, its cluster resources freed for the queue.
    async fn ended(&self, name: &str) {
        self.logs.end(name);
        self.dispatch.forget(name);
        self.pump().await;
    }

    async fn record_failure(&self, name: &str, exit_code: i32, reason: &str) -> Result<(), Status> {
        self.transition(
            name,
            |l| l.ended(),
            new_event(
                &SessionFailed {
                    name: name.to_string(),
                    exit_code,
                    reason: reason.to_string(),
                    at_ms: now_ms(),
                },
                "service:session",
                "",
            ),
        )
        .await
    }

    /// The session as the API shows it, saying why a queued session has not started.
    fn shown(&self, e: &Entry) -> Session {
        let mut s = view(e);
        if self.dispatch.is_waiting(&s.name) {
            s.reason = "Allocated, not created yet: waiting for free cluster capacity".into();
        }
        s
    }

    /// Requires `snapshot` to be code that `team` uploaded: another team's snapshot id must not run in this
    /// team's session, whose checkpoints and logs would hand that code over. The upload's event may reach this
    /// service's read model a moment after the upload returned, so a snapshot not known yet is waited for.
    async fn check_code(&self, team: &str, snapshot: &str) -> Result<(), Status> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let teams = self.proj.read(|s| s.code.get(snapshot).cloned());
            match teams {
                Some(t) if t.contains(team) => return Ok(()),
                Some(_) => {
                    return Err(Status::permission_denied(format!(
                        "code snapshot `{snapshot}` belongs to another team"
                    )));
                }
                None if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                None => {
                    return Err(Status::not_found(format!(
                        "code snapshot `{snapshot}` not found: upload the code first (the nsml CLI does this for you)"
                    )));
                }
            }
        }
    }

    /// Finds a session the caller may see.
    fn authorize(&self, caller: &Caller, name: &str) -> Result<Entry, Status> {
        caller.require_authenticated()?;
        SessionName::parse(name)?;
        let e = self.proj.read(|s| s.live(name).cloned()).ok_or_else(|| {
            Status::not_found(format!(
                "session `{name}` not found; `nsml ps -a` lists your sessions"
            ))
        })?;
        if !caller.may_access_team(&e.session.team, &e.session.competition) {
            return Err(Status::permission_denied(format!(
                "session `{name}` belongs to another team"
            )));
        }
        Ok(e)
    }

    /// Marks sessions whose runner is gone (the platform restarted under them) as failed, so that nothing
    /// stays held by a session that is not running.
    pub(crate) async fn recover_lost_runners(&self) {
        let running = self.executor.running().await;
        let (lost, waiting): (Vec<Entry>, Vec<Entry>) = self.proj.read(|s| {
            s.sessions
                .values()
                .filter(|e| !e.rejected && !e.removed)
                .filter(|e| {
                    matches!(
                        e.session.status(),
                        SessionStatus::Queued | SessionStatus::Running | SessionStatus::Stopping
                    )
                })
                .filter(|e| !running.contains(&e.session.name))
                .cloned()
                .partition(|e| !(e.admitted && e.session.status() == SessionStatus::Queued))
        });
        // Admitted sessions that were waiting for capacity wait again, in their original order.
        let mut waiting = waiting;
        waiting.sort_by_key(|e| (e.session.created_at_ms, e.session.name.clone()));
        for e in waiting {
            let limit = match e.session.kind() {
                SessionKind::Train => 0,
                _ => self.proj.read(|s| {
                    s.policies
                        .get(&e.session.competition)
                        .map_or(3600, |p| p.submit_time_limit_secs)
                }),
            };
            self.dispatch.enqueue(e.session, limit);
        }
        for e in lost {
            let name = e.session.name;
            let reason = if e.admitted {
                "the runner was lost when the platform restarted"
            } else {
                "the admission was interrupted by a platform restart; run it again"
            };
            tracing::warn!(session = %name, reason, "marking a session failed after a restart");
            if let Err(err) = self.record_failure(&name, -1, reason).await {
                tracing::error!(session = %name, %err, "could not mark a lost session");
            }
        }
        self.pump().await;
    }

    async fn stop_session(&self, caller: &Caller, name: &str) -> Result<(), Status> {
        let actor = caller.actor();
        let ended = self
            .proj
            .read(|s| s.live(name).map(|e| e.session.status()))
            .is_some_and(|st| {
                matches!(
                    st,
                    SessionStatus::Exited | SessionStatus::Failed | SessionStatus::Stopped
                )
            });
        if ended {
            return Ok(());
        }
        self.transition(
            name,
            |l| l.ended(),
            new_event(
                &SessionStopRequested {
                    name: name.to_string(),
                },
                &actor,
                "",
            ),
        )
        .await?;
        if !self.executor.stop(name).await {
            self.transition(
                name,
                |l| l.ended(),
                new_event(
                    &SessionStopped {
                        name: name.to_string(),
                        at_ms: now_ms(),
                    },
                    &actor,
                    "",
                ),
            )
            .await?;
            self.ended(name).await;
        }
        Ok(())
    }

    async fn wait_ended(&self, name: &str, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let ended = self.proj.read(|s| {
                s.sessions.get(name).is_none_or(|e| {
                    matches!(
                        e.session.status(),
                        SessionStatus::Exited | SessionStatus::Failed | SessionStatus::Stopped
                    )
                })
            });
            if ended {
                return true;
            }
            if tokio::time::Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tonic::async_trait]
impl SessionApi for SessionService {
    async fn run(&self, req: Request<RunRequest>) -> Result<Response<Session>, Status> {
        nsml_common::bounds::check(&req)?;
        let caller = Caller::of(&req)?;
        caller.user()?;
        let r = req.into_inner();
        let competition = self
            .proj
            .read(|s| s.datasets.get(&r.dataset).cloned())
            .ok_or_else(|| {
                Status::not_found(format!(
                    "dataset `{}` not found; `nsml dataset ls` lists them",
                    r.dataset
                ))
            })?;
        let team = caller.team_in(&competition).ok_or_else(|| {
            Status::permission_denied(format!(
                "you are not in a team of competition `{competition}`, which dataset `{}` belongs to",
                r.dataset
            ))
        })?;
        let entry = if r.entry.is_empty() {
            "main.py".to_string()
        } else {
            r.entry
        };
        check_entry(&entry)?;
        if r.code_snapshot.is_empty() {
            return Err(Status::invalid_argument(
                "no code snapshot: upload the code first (the nsml CLI does this for you)",
            ));
        }
        let resources = with_defaults(r.resources);
        check_resources(&resources)?;
        self.check_code(team, &r.code_snapshot).await?;
        let actor = caller.actor();
        let template = Session {
            team: team.to_string(),
            dataset: r.dataset.clone(),
            kind: SessionKind::Train as i32,
            status: SessionStatus::Queued as i32,
            entry,
            args: r.args,
            resources: Some(resources),
            memo: r.memo,
            code_snapshot: r.code_snapshot,
            created_at_ms: now_ms(),
            competition,
            interactive: r.interactive,
            ..Default::default()
        };
        let s = self.request(template, &actor).await?;
        // No position to wait for: a training session's admission depends on no outcome the caller saw.
        self.admit(&s, &actor, 0).await?;
        self.launch(&s, 0).await?;
        let out = self
            .proj
            .read(|st| st.sessions.get(&s.name).map(|e| self.shown(e)))
            .unwrap_or(s);
        Ok(Response::new(out))
    }

    async fn list(
        &self,
        req: Request<ListSessionsRequest>,
    ) -> Result<Response<ListSessionsResponse>, Status> {
        nsml_common::bounds::check(&req)?;
        let caller = Caller::of(&req)?;
        caller.require_authenticated()?;
        let r = req.into_inner();
        let mut sessions: Vec<Session> = self.proj.read(|s| {
            s.sessions
                .values()
                .filter(|e| !e.removed && !e.rejected)
                .filter(|e| caller.may_access_team(&e.session.team, &e.session.competition))
                .filter(|e| {
                    r.all
                        || !matches!(
                            e.session.status(),
                            SessionStatus::Exited | SessionStatus::Failed | SessionStatus::Stopped
                        )
                })
                .filter(|e| r.dataset.is_empty() || e.session.dataset == r.dataset)
                .filter(|e| {
                    r.search.is_empty()
                        || e.session.name.contains(&r.search)
                        || e.session.memo.contains(&r.search)
                        || e.session.args.contains(&r.search)
                })
                .map(|e| as_seen_by(&caller, self.shown(e)))
                .collect()
        });
        sessions.sort_by_key(|s| (s.created_at_ms, s.name.clone()));
        if r.last > 0 && sessions.len() > r.last as usize {
            sessions = sessions.split_off(sessions.len() - r.last as usize);
        }
        Ok(Response::new(ListSessionsResponse { sessions }))
    }

    async fn get(&self, req: Request<GetSessionRequest>) -> Result<Response<Session>, Status> {
        nsml_common::bounds::check(&req)?;
        let caller = Caller::of(&req)?;
        let e = self.authorize(&caller, &req.get_ref().name)?;
        Ok(Response::new(as_seen_by(&caller, self.shown(&e))))
    }

    type LogsStream = LogStream;

    async fn logs(&self, req: Request<LogsRequest>) -> Result<Response<Self::LogsStream>, Status> {
        nsml_common::bounds::check(&req)?;
        let caller = Caller::of(&req)?;
        let r = req.into_inner();
        let e = self.authorize(&caller, &r.name)?;
        if hidden_output(&caller, &e.session) {
            return Err(Status::permission_denied(format!(
                "logs of real submit sessions are hidden from participants; `nsml submit -t {} {}` runs the same code on the trial set with visible logs",
                e.session.source_session, e.session.source_checkpoint
            )));
        }
        let name = r.name.clone();
        let mut live = self.logs.subscribe(&name);
        let stored = self
            .logs
            .read(&name)
            .map_err(|e| status::internal("reading a session log", e))?;
        let mut last_seq = stored.last().map_or(0, |l| l.seq);
        let ended = matches!(
            e.session.status(),
            SessionStatus::Exited | SessionStatus::Failed | SessionStatus::Stopped
        );
        let proj = self.proj.clone();
        let follow = r.follow && !ended;
        let out = async_stream_lines(stored, follow, move |tx| async move {
            loop {
                let item = tokio::time::timeout(Duration::from_millis(500), live.recv()).await;
                match item {
                    Ok(Ok(Live::Line(l))) => {
                        if l.seq > last_seq {
                            last_seq = l.seq;
                            if tx.send(Ok(l)).await.is_err() {
                                return;
                            }
                        }
                    }
                    Ok(Ok(Live::End)) => return,
                    Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => continue,
                    Ok(Err(_)) => return,
                    Err(_) => {
                        // No line for a while: end the follow once the session has ended.
                        let done = proj.read(|s| {
                            s.sessions.get(&name).is_none_or(|e| {
                                matches!(
                                    e.session.status(),
                                    SessionStatus::Exited
                                        | SessionStatus::Failed
                                        | SessionStatus::Stopped
                                )
                            })
                        });
                        if done {
                            return;
                        }
                    }
                }
            }
        });
        Ok(Response::new(out))
    }

    async fn stop(
        &self,
        req: Request<nsml_proto::v1::StopRequest>,
    ) -> Result<Response<Session>, Status> {
        nsml_common::bounds::check(&req)?;
        let caller = Caller::of(&req)?;
        let name = req.into_inner().name;
        self.authorize(&caller, &name)?;
        self.stop_session(&caller, &name).await?;
        let e = self.authorize(&caller, &name)?;
        Ok(Response::new(as_seen_by(&caller, self.shown(&e))))
    }

    async fn remove(
        &self,
        req: Request<RemoveRequest>,
    ) -> Result<Response<RemoveResponse>, Status> {
        nsml_common::bounds::check(&req)?;
        let caller = Caller::of(&req)?;
        caller.require_authenticated()?;
        let r = req.into_inner();
        let targets: Vec<Entry> = if r.pattern.contains('*') || r.pattern.contains('?') {
            self.proj.read(|s| {
                s.sessions
                    .values()
                    .filter(|e| !e.removed && !e.rejected)
                    .filter(|e| caller.may_access_team(&e.session.team, &e.session.competition))
                    .filter(|e| wildcard_match(&r.pattern, &e.session.name))
                    .cloned()
                    .collect()
            })
        } else {
            vec![self.authorize(&caller, &r.pattern)?]
        };
        if targets.is_empty() {
            return Err(Status::not_found(format!(
                "no session of yours matches `{}`",
                r.pattern
            )));
        }
        let running: Vec<&str> = targets
            .iter()
            .filter(|e| {
                !matches!(
                    e.session.status(),
                    SessionStatus::Exited | SessionStatus::Failed | SessionStatus::Stopped
                )
            })
            .map(|e| e.session.name.as_str())
            .collect();
        if !running.is_empty() && !r.force {
            return Err(Status::failed_precondition(format!(
                "session {} is still running: stop it first (`nsml stop`) or use `nsml rm -f`",
                running.join(", ")
            )));
        }
        let actor = caller.actor();
        let mut removed = Vec::new();
        for e in targets {
            let name = e.session.name.clone();
            self.stop_session(&caller, &name).await?;
            self.wait_ended(&name, Duration::from_secs(15)).await;
            // Best effort: the session's files hold nothing the platform needs, and a runner's
            // start removes whatever is left of sessions it no longer runs.
            if let Err(err) = self.executor.remove(&name).await {
                tracing::warn!(session = %name, %err, "cannot remove the session's files on its runner");
            }
            if !e.checkpoints.is_empty() {
                let del = self
                    .clients
                    .storage
                    .clone()
                    .delete_checkpoint(DeleteCheckpointRequest {
                        session: name.clone(),
                        checkpoint: "*".into(),
                    })
                    .await;
                if let Err(st) = del
                    && st.code() != tonic::Code::NotFound
                {
                    return Err(status::upstream("deleting the session's checkpoints", st));
                }
            }
            self.transition(
                &name,
                |l| l.removed,
                new_event(&SessionRemoved { name: name.clone() }, &actor, ""),
            )
            .await?;
            self.logs.remove(&name);
            removed.push(name);
        }
        Ok(Response::new(RemoveResponse { removed }))
    }

    async fn memo(&self, req: Request<MemoRequest>) -> Result<Response<Session>, Status> {
        nsml_common::bounds::check(&req)?;
        let caller = Caller::of(&req)?;
        let r = req.into_inner();
        self.authorize(&caller, &r.name)?;
        let actor = caller.actor();
        self.transition(
            &r.name,
            |_| false,
            new_event(
                &MemoChanged {
                    name: r.name.clone(),
                    memo: r.memo.clone(),
                },
                &actor,
                "",
            ),
        )
        .await?;
        let e = self.authorize(&caller, &r.name)?;
        Ok(Response::new(as_seen_by(&caller, self.shown(&e))))
    }

    async fn metrics(
        &self,
        req: Request<MetricsRequest>,
    ) -> Result<Response<MetricsResponse>, Status> {
        nsml_common::bounds::check(&req)?;
        let caller = Caller::of(&req)?;
        let e = self.authorize(&caller, &req.get_ref().name)?;
        if hidden_output(&caller, &e.session) {
            return Err(Status::permission_denied(format!(
                "metrics of real submit sessions are hidden from participants, as their logs are; `nsml submit -t {} {}` runs the same code on the trial set with visible output",
                e.session.source_session, e.session.source_checkpoint
            )));
        }
        Ok(Response::new(MetricsResponse { points: e.metrics }))
    }

    async fn start_submit(
        &self,
        req: Request<StartSubmitRequest>,
    ) -> Result<Response<Session>, Status> {
        let caller = Caller::of(&req)?;
        caller.require_service()?;
        let r = req.into_inner();
        check_resources(&r.resources.unwrap_or_default())?;
        let src = self
            .proj
            .read(|s| s.live(&r.source_session).cloned())
            .ok_or_else(|| {
                Status::not_found(format!("session `{}` not found", r.source_session))
            })?;
        if src.session.kind() != SessionKind::Train {
            return Err(Status::failed_precondition(format!(
                "`{}` is a submit session; submit a checkpoint of a training session",
                r.source_session
            )));
        }
        let actor = caller.actor();
        let kind = if r.trial {
            SessionKind::TrialSubmit
        } else {
            SessionKind::Submit
        };
        let template = Session {
            team: src.session.team.clone(),
            dataset: src.session.dataset.clone(),
            kind: kind as i32,
            status: SessionStatus::Queued as i32,
            entry: src.session.entry.clone(),
            args: "--mode test --pause 1".into(),
            resources: r.resources,
            memo: String::new(),
            code_snapshot: src.session.code_snapshot.clone(),
            created_at_ms: now_ms(),
            competition: src.session.competition.clone(),
            source_session: r.source_session.clone(),
            source_checkpoint: r.checkpoint.clone(),
            submission_id: r.submission_id.clone(),
            ..Default::default()
        };
        let s = self.request(template, &actor).await?;
        self.admit(&s, &actor, r.seen_position).await?;
        self.launch(&s, r.time_limit_secs).await?;
        let out = self
            .proj
            .read(|st| st.sessions.get(&s.name).map(|e| self.shown(e)))
            .unwrap_or(s);
        Ok(Response::new(out))
    }

    async fn runner_started(
        &self,
        req: Request<RunnerStartedRequest>,
    ) -> Result<Response<Empty>, Status> {
        Caller::of(&req)?.require_service()?;
        let r = req.into_inner();
        self.transition(
            &r.name,
            |l| l.ended() || l.status == SessionStatus::Running,
            new_event(
                &SessionStarted {
                    name: r.name.clone(),
                    pid: r.pid,
                    gpu_ids: r.gpu_ids.clone(),
                    at_ms: now_ms(),
                },
                "runner",
                "",
            ),
        )
        .await?;
        Ok(Response::new(Empty {}))
    }

    async fn runner_logs(
        &self,
        req: Request<Streaming<RunnerLogBatch>>,
    ) -> Result<Response<Empty>, Status> {
        Caller::of(&req)?.require_service()?;
        let mut stream = req.into_inner();
        while let Some(batch) = stream.next().await {
            let batch = batch?;
            self.logs
                .append(&batch.name, &batch.lines)
                .map_err(|e| status::internal("writing a session log", e))?;
        }
        Ok(Response::new(Empty {}))
    }

    async fn runner_report(
        &self,
        req: Request<RunnerReportRequest>,
    ) -> Result<Response<Empty>, Status> {
        Caller::of(&req)?.require_service()?;
        // The point comes from participant code: it is measured before it becomes an event.
        nsml_common::bounds::check(&req)?;
        let r = req.into_inner();
        let sn = SessionName::parse(&r.name)?;
        let ev = new_event(
            &MetricsReported {
                name: r.name.clone(),
                point: r.point,
            },
            "runner",
            "",
        );
        let a = self
            .ctx
            .store
            .append(
                &sn.stream(),
                nsml_eventstore::ExpectedVersion::Any,
                vec![ev],
            )
            .await
            .map_err(|e| status::store("recording metrics", e))?;
        self.settle(a.last_position).await;
        Ok(Response::new(Empty {}))
    }

    async fn runner_heartbeat(
        &self,
        req: Request<RunnerHeartbeatRequest>,
    ) -> Result<Response<Empty>, Status> {
        Caller::of(&req)?.require_service()?;
        self.dispatch
            .heard_from(&req.into_inner().names, std::time::Instant::now());
        Ok(Response::new(Empty {}))
    }

    async fn runner_finished(
        &self,
        req: Request<RunnerFinishedRequest>,
    ) -> Result<Response<Empty>, Status> {
        Caller::of(&req)?.require_service()?;
        let r = req.into_inner();
        let st = finish_status(r.exit_code, &r.reason, r.stopped);
        let at = now_ms();
        let ev = match st {
            SessionStatus::Exited => new_event(
                &SessionExited {
                    name: r.name.clone(),
                    exit_code: r.exit_code,
                    at_ms: at,
                },
                "runner",
                "",
            ),
            SessionStatus::Stopped => new_event(
                &SessionStopped {
                    name: r.name.clone(),
                    at_ms: at,
                },
                "runner",
                "",
            ),
            _ => new_event(
                &SessionFailed {
                    name: r.name.clone(),
                    exit_code: r.exit_code,
                    reason: if r.reason.is_empty() {
                        format!("exited with code {}", r.exit_code)
                    } else {
                        r.reason.clone()
                    },
                    at_ms: at,
                },
                "runner",
                "",
            ),
        };
        self.transition(&r.name, |l| l.ended(), ev).await?;
        self.ended(&r.name).await;
        Ok(Response::new(Empty {}))
    }
}

/// Whether what a session's program reported is hidden from `caller`: a real submit's program saw the hidden
/// test inputs, so its output (logs, metrics, summary) reaches the competition's hosts only.
fn hidden_output(caller: &Caller, s: &Session) -> bool {
    s.kind() == SessionKind::Submit && !caller.is_host_of(&s.competition)
}

/// A session as `caller` may see it (see [`hidden_output`]).
fn as_seen_by(caller: &Caller, mut s: Session) -> Session {
    if hidden_output(caller, &s) {
        s.summary_json.clear();
    }
    s
}

/// Streams stored lines, then (when following) whatever `follow` sends.
fn async_stream_lines<F, Fut>(stored: Vec<LogLine>, follow: bool, f: F) -> LogStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<LogLine, Status>>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    tokio::spawn(async move {
        for l in stored {
            if tx.send(Ok(l)).await.is_err() {
                return;
            }
        }
        if follow {
            f(tx).await;
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resources_beyond_any_machine_are_refused_naming_the_field_and_its_maximum() {
        let ok = with_defaults(None);
        assert!(check_resources(&ok).is_ok());
        let at_max = Resources {
            gpus: MAX_GPUS,
            cpus: MAX_CPUS,
            memory_bytes: MAX_MEMORY_BYTES,
            shm_bytes: MAX_SHM_BYTES,
        };
        assert!(check_resources(&at_max).is_ok());
        let cases = [
            (
                Resources {
                    cpus: u32::MAX,
                    ..ok
                },
                "resources.cpus is 4294967295; a session may ask for at most 1024 CPUs",
            ),
            (
                Resources {
                    gpus: MAX_GPUS + 1,
                    ..ok
                },
                "resources.gpus is 65; a session may ask for at most 64 GPUs",
            ),
            (
                Resources {
                    memory_bytes: u64::MAX - GIB + 1,
                    ..ok
                },
                "resources.memory_bytes is 18446744072635809792 bytes; a session may ask for at most 17592186044416 bytes (16 TiB)",
            ),
            (
                Resources {
                    shm_bytes: u64::MAX,
                    ..ok
                },
                "resources.shm_bytes is 18446744073709551615 bytes; a session may ask for at most 17592186044416 bytes (16 TiB)",
            ),
        ];
        for (r, want) in cases {
            let st = check_resources(&r).unwrap_err();
            assert_eq!(st.code(), tonic::Code::InvalidArgument);
            assert!(st.message().starts_with(want), "{}", st.message());
        }
    }
}
