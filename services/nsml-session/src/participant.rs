//! What participants ask of their sessions (run, ps, logs, stop, rm, memo, metrics), and the submit
//! sessions the submission service starts on a participant's behalf. The caller is checked at the gRPC
//! face; which sessions it may see is checked here, against the read model.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use nsml_common::caller::Caller;
use nsml_common::clients::Clients;
use nsml_common::event::new_event;
use nsml_common::live::{self, LiveStream};
use nsml_common::names::wildcard_match;
use nsml_common::now_ms;
use nsml_proto::internal::v1::StartSubmitRequest;
use nsml_proto::v1::{
    AdmitRequest, DeleteCheckpointRequest, ListSessionsRequest, ListSessionsResponse, LogLine,
    LogsRequest, MemoChanged, MetricPoint, MetricsResponse, RemoveRequest, RemoveResponse,
    RunRequest, Session, SessionAdmitted, SessionKind, SessionRejected, SessionRemoved,
    SessionStatus, SessionStopRequested, SessionStopped,
};
use tonic::Status;

use crate::dispatch::Launcher;
use crate::domain::{
    check_capacity, check_entry, check_resources, environment_python, is_ended, with_defaults,
};
use crate::error::SessionError;
use crate::logs::Live;
use crate::projection::Entry;

/// A session's log lines, as sent.
pub type LogStream = Pin<Box<dyn Stream<Item = Result<LogLine, Status>> + Send>>;

/// How long a removal waits for a stopped session to end before removing it anyway.
const REMOVE_WAIT: Duration = Duration::from_secs(15);

/// The participant API's handlers.
pub struct Participants {
    launcher: Arc<Launcher>,
    clients: Clients,
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

impl Participants {
    pub fn new(launcher: Arc<Launcher>, clients: Clients) -> Self {
        Self { launcher, clients }
    }

    /// A session as `caller` sees it now.
    fn seen(&self, caller: &Caller, name: &str) -> Result<Session, SessionError> {
        let e = self.launcher.handler.visible(caller, name)?;
        Ok(as_seen_by(caller, self.launcher.shown(&e)))
    }

    /// Asks the quota service for the session's resources; records a grant on the session, and a rejection
    /// only where the quota service recorded no decision. `seen_position` is the log position the caller has
    /// seen (0 for none), for the quota service to catch up to before deciding.
    async fn admit(
        &self,
        s: &Session,
        actor: &str,
        seen_position: u64,
    ) -> Result<(), SessionError> {
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
        let decision = self.clients.quota_internal.clone().admit(req).await;
        let name = s.name.clone();
        let handler = &self.launcher.handler;
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
                handler.transition(&name, |_| false, ev).await
            }
            // The quota service recorded the refusal (`AdmissionDenied`, naming this session), and the read
            // model takes it as the session's rejection: a second event here would only repeat it.
            Ok(d) => Err(SessionError::Denied {
                reason: d.reason,
                rule: d.rule,
                retry_after_ms: d.retry_after_ms,
            }),
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
                if let Err(err) = handler.record(&name, |_| false, ev).await {
                    tracing::warn!(session = %name, %err, "could not record a failed admission");
                }
                Err(SessionError::upstream("asking the quota service")(st))
            }
        }
    }

    /// Records a requested session, has it admitted and launches it; answers the session as shown.
    async fn request_admit_launch(
        &self,
        template: Session,
        actor: &str,
        seen_position: u64,
        time_limit_secs: u64,
    ) -> Result<Session, SessionError> {
        self.launcher
            .executor
            .available()
            .await
            .map_err(|why| SessionError::ClusterUnavailable { why })?;
        let s = self.launcher.handler.request(template, actor).await?;
        self.admit(&s, actor, seen_position).await?;
        self.launcher.launch(&s, time_limit_secs).await?;
        Ok(self.launcher.shown_or(&s.name.clone(), s))
    }

    /// Starts a training session of the caller's team on a dataset.
    pub async fn run(&self, caller: &Caller, r: RunRequest) -> Result<Session, SessionError> {
        let handler = &self.launcher.handler;
        let competition = handler
            .read(|s| s.datasets.get(&r.dataset).cloned())
            .ok_or_else(|| SessionError::DatasetNotFound {
                dataset: r.dataset.clone(),
            })?;
        let team = caller
            .team_in(&competition)
            .ok_or_else(|| SessionError::NotInCompetition {
                competition: competition.clone(),
                dataset: r.dataset.clone(),
            })?;
        let entry = if r.entry.is_empty() {
            "main.py".to_string()
        } else {
            r.entry
        };
        check_entry(&entry)?;
        if r.code_snapshot.is_empty() {
            return Err(SessionError::NoCodeSnapshot);
        }
        let resources = with_defaults(r.resources);
        check_resources(&resources)?;
        check_capacity(self.launcher.executor.capacity(), &resources)?;
        if r.code_unconfirmed {
            handler.check_code_now(team, &r.code_snapshot)?;
        } else {
            handler.check_code(team, &r.code_snapshot).await?;
        }
        let environment_python = handler.read(|s| {
            let envs = s.environments.get(&competition).map(Vec::as_slice);
            environment_python(envs.unwrap_or_default(), &competition, &r.environment)
        })?;
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
            environment: r.environment,
            environment_python,
            ..Default::default()
        };
        // No position to wait for: a training session's admission depends on no outcome the caller saw.
        self.request_admit_launch(template, &caller.actor(), 0, 0)
            .await
    }

    /// Starts a submit session of a training session's checkpoint, for the submission service.
    pub async fn start_submit(
        &self,
        caller: &Caller,
        r: StartSubmitRequest,
    ) -> Result<Session, SessionError> {
        check_resources(&r.resources.unwrap_or_default())?;
        let src = self
            .launcher
            .handler
            .read(|s| s.live(&r.source_session).cloned())
            .ok_or_else(|| SessionError::SessionNotFound {
                name: r.source_session.clone(),
            })?;
        if src.session.kind() != SessionKind::Train {
            return Err(SessionError::NotTraining {
                name: r.source_session.clone(),
            });
        }
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
            environment: src.session.environment.clone(),
            environment_python: src.session.environment_python.clone(),
            ..Default::default()
        };
        self.request_admit_launch(
            template,
            &caller.actor(),
            r.seen_position,
            r.time_limit_secs,
        )
        .await
    }

    /// The caller's sessions, filtered as `nsml ps` asks.
    pub fn list(&self, caller: &Caller, r: &ListSessionsRequest) -> Vec<Session> {
        let mut sessions: Vec<Session> = self.launcher.handler.read(|s| {
            s.sessions
                .values()
                .filter(|e| !e.removed)
                .filter(|e| caller.may_access_team(&e.session.team, &e.session.competition))
                .filter(|e| r.all || !is_ended(e.session.status()))
                .filter(|e| r.dataset.is_empty() || e.session.dataset == r.dataset)
                .filter(|e| {
                    r.search.is_empty()
                        || e.session.name.contains(&r.search)
                        || e.session.memo.contains(&r.search)
                        || e.session.args.contains(&r.search)
                })
                .map(|e| as_seen_by(caller, self.launcher.shown(e)))
                .collect()
        });
        sessions.sort_by_key(|s| (s.created_at_ms, s.name.clone()));
        if r.last > 0 && sessions.len() > r.last as usize {
            sessions = sessions.split_off(sessions.len() - r.last as usize);
        }
        sessions
    }

    /// One session the caller may see.
    pub fn get(&self, caller: &Caller, name: &str) -> Result<Session, SessionError> {
        self.seen(caller, name)
    }

    /// A session's stored log lines, then (when following a session that has not ended) the new ones.
    pub fn logs(&self, caller: &Caller, r: LogsRequest) -> Result<LogStream, SessionError> {
        let e = self.launcher.handler.visible(caller, &r.name)?;
        if hidden_output(caller, &e.session) {
            return Err(SessionError::LogsHidden {
                session: e.session.source_session,
                checkpoint: e.session.source_checkpoint,
            });
        }
        let name = r.name.clone();
        let follow = r.follow && !is_ended(e.session.status());
        // Subscribed before the stored lines are read, so no line falls between; only a follow holds a
        // live channel.
        let mut live = if follow {
            self.launcher.logs.subscribe(&name)
        } else {
            tokio::sync::broadcast::channel(1).1
        };
        let stored = self
            .launcher
            .logs
            .read(&name)
            .map_err(SessionError::internal("reading a session log"))?;
        let mut last_seq = stored.last().map_or(0, |l| l.seq);
        let handler = self.launcher.handler.clone();
        Ok(stream_lines(stored, follow, move |tx| async move {
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
                    // No line for a while: end the follow once the session has ended.
                    Err(_) if handler.has_ended(&name) => return,
                    Err(_) => {}
                }
            }
        }))
    }

    /// Stops a session the caller may see, and answers it as it is then.
    pub async fn stop(&self, caller: &Caller, name: &str) -> Result<Session, SessionError> {
        self.launcher.handler.visible(caller, name)?;
        self.stop_session(caller, name).await?;
        self.seen(caller, name)
    }

    /// Asks a session's runner to stop it; a session without a runner is recorded stopped at once.
    async fn stop_session(&self, caller: &Caller, name: &str) -> Result<(), SessionError> {
        let handler = &self.launcher.handler;
        let actor = caller.actor();
        let ended = handler
            .read(|s| s.live(name).map(|e| e.session.status()))
            .is_some_and(is_ended);
        if ended {
            return Ok(());
        }
        let requested = new_event(
            &SessionStopRequested {
                name: name.to_string(),
            },
            &actor,
            "",
        );
        handler.transition(name, |l| l.ended(), requested).await?;
        if !self.launcher.executor.stop(name).await {
            let stopped = new_event(
                &SessionStopped {
                    name: name.to_string(),
                    at_ms: now_ms(),
                },
                &actor,
                "",
            );
            handler.transition(name, |l| l.ended(), stopped).await?;
            self.launcher.ended(name).await;
        }
        Ok(())
    }

    /// The sessions a removal names: one, or those of the caller's that a wildcard pattern matches.
    fn removal_targets(&self, caller: &Caller, pattern: &str) -> Result<Vec<Entry>, SessionError> {
        let targets: Vec<Entry> = if pattern.contains('*') || pattern.contains('?') {
            self.launcher.handler.read(|s| {
                s.sessions
                    .values()
                    .filter(|e| !e.removed)
                    .filter(|e| caller.may_access_team(&e.session.team, &e.session.competition))
                    .filter(|e| wildcard_match(pattern, &e.session.name))
                    .cloned()
                    .collect()
            })
        } else {
            vec![self.launcher.handler.visible(caller, pattern)?]
        };
        if targets.is_empty() {
            return Err(SessionError::NoMatch {
                pattern: pattern.to_string(),
            });
        }
        Ok(targets)
    }

    /// Removes sessions: stops them (with `force`), deletes their files and checkpoints, records the removal.
    pub async fn remove(
        &self,
        caller: &Caller,
        r: &RemoveRequest,
    ) -> Result<RemoveResponse, SessionError> {
        let targets = self.removal_targets(caller, &r.pattern)?;
        let running: Vec<&str> = targets
            .iter()
            .filter(|e| !is_ended(e.session.status()))
            .map(|e| e.session.name.as_str())
            .collect();
        if !running.is_empty() && !r.force {
            return Err(SessionError::StillRunning {
                names: running.join(", "),
            });
        }
        let mut answer = RemoveResponse::default();
        for e in targets {
            let kept = self.remove_one(caller, &e).await?;
            answer
                .kept
                .extend(kept.iter().map(|c| format!("{}/{c}", e.session.name)));
            answer.removed.push(e.session.name);
        }
        Ok(answer)
    }

    /// Removes one session; returns the names of its checkpoints that storage keeps, each because it backs
    /// the team's best score on a board.
    async fn remove_one(&self, caller: &Caller, e: &Entry) -> Result<Vec<String>, SessionError> {
        let name = e.session.name.clone();
        self.stop_session(caller, &name).await?;
        self.launcher.handler.wait_ended(&name, REMOVE_WAIT).await;
        // Best effort: the session's files hold nothing the platform needs, and a runner's
        // start removes whatever is left of sessions it no longer runs.
        if let Err(err) = self.launcher.executor.remove(&name).await {
            tracing::warn!(session = %name, %err, "cannot remove the session's files on its runner");
        }
        let mut kept = Vec::new();
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
            match del {
                Ok(answer) => kept = answer.into_inner().kept,
                Err(st) if st.code() == tonic::Code::NotFound => {}
                Err(st) => {
                    return Err(SessionError::upstream("deleting the session's checkpoints")(st));
                }
            }
        }
        let ev = new_event(&SessionRemoved { name: name.clone() }, &caller.actor(), "");
        self.launcher
            .handler
            .transition(&name, |l| l.removed, ev)
            .await?;
        self.launcher.logs.remove(&name);
        Ok(kept)
    }

    /// Sets a session's memo.
    pub async fn memo(
        &self,
        caller: &Caller,
        name: &str,
        memo: &str,
    ) -> Result<Session, SessionError> {
        self.launcher.handler.visible(caller, name)?;
        let ev = new_event(
            &MemoChanged {
                name: name.to_string(),
                memo: memo.to_string(),
            },
            &caller.actor(),
            "",
        );
        self.launcher
            .handler
            .transition(name, |_| false, ev)
            .await?;
        self.seen(caller, name)
    }

    /// The metric points a session's program reported.
    pub fn metrics(&self, caller: &Caller, name: &str) -> Result<Vec<MetricPoint>, SessionError> {
        let e = self.launcher.handler.visible(caller, name)?;
        if hidden_output(caller, &e.session) {
            return Err(SessionError::MetricsHidden {
                session: e.session.source_session,
                checkpoint: e.session.source_checkpoint,
            });
        }
        Ok(e.metrics)
    }
}

impl Participants {
    /// What [`Participants::list`] answers, now and on every change.
    pub fn watch(
        self: &Arc<Self>,
        caller: Caller,
        r: ListSessionsRequest,
    ) -> LiveStream<ListSessionsResponse> {
        let me = self.clone();
        let (changes, stopped) = self.launcher.handler.live();
        live::follow(changes, stopped, move || {
            let sessions = me.list(&caller, &r);
            std::future::ready(Ok(Some(ListSessionsResponse { sessions })))
        })
    }

    /// A session's metric points: all of them first, then only new ones; ends when the session is removed.
    pub fn watch_metrics(
        self: &Arc<Self>,
        caller: Caller,
        name: String,
    ) -> Result<LiveStream<MetricsResponse>, SessionError> {
        let points = self.metrics(&caller, &name)?;
        let me = self.clone();
        let (changes, stopped) = self.launcher.handler.live();
        let mut first = Some(points);
        let mut sent = 0;
        Ok(live::follow(changes, stopped, move || {
            let answer = match first.take() {
                Some(points) => {
                    sent = points.len();
                    Ok(Some(MetricsResponse { points }))
                }
                None => me
                    .launcher
                    .handler
                    .read(|s| {
                        s.live(&name)
                            .map(|e| e.metrics.get(sent..).unwrap_or_default().to_vec())
                    })
                    .ok_or_else(|| Status::from(SessionError::NotListed { name: name.clone() }))
                    .map(|points| {
                        sent += points.len();
                        (!points.is_empty()).then_some(MetricsResponse { points })
                    }),
            };
            std::future::ready(answer)
        }))
    }
}

/// Streams stored lines, then (when following) whatever `follow` sends.
fn stream_lines<F, Fut>(stored: Vec<LogLine>, follow: bool, f: F) -> LogStream
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
