//! Command handling: load what a decision needs (the submission's stream, the source session, the dataset),
//! decide by the rules of [`crate::domain`], append, then wait until the read model shows it (so a `Get`
//! right after sees the write).
//!
//! Predictions are taken in two steps: they are written to this service's spool, then the submission is
//! recorded as Scoring and handed to the scorer, which scores them on its own task. A crash in between
//! leaves either a spooled file nobody refers to (removed at the next start) or a Scoring submission whose
//! predictions are on disk (scored at the next start).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use nsml_common::aggregate::{Aggregates, Outcome};
use nsml_common::caller::Caller;
use nsml_common::clients::Clients;
use nsml_common::event::new_event;
use nsml_common::names::SessionName;
use nsml_common::projection::Projection;
use nsml_common::{ServiceContext, now_ms};
use nsml_eventstore::NewEvent;
use nsml_proto::internal::v1::StartSubmitRequest;
use nsml_proto::v1::{
    Dataset, GetDatasetRequest, GetSessionRequest, ListCheckpointsRequest, Resources, Session,
    SessionKind, Submission, SubmissionAdmitted, SubmissionFailed, SubmissionPredictionsTaken,
    SubmissionRejected, SubmissionRequested, SubmissionScored, SubmissionStatus,
    SubmissionTimedOut, SubmitRequest,
};
use tokio::sync::mpsc;

use crate::domain::{
    EndedBy, Ending, SubmitState, decide_end, decide_session, decide_take_predictions,
};
use crate::error::SubmissionError;
use crate::projection::Submissions;

/// How long a write waits for the read model to show it before answering anyway.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(5);
/// The actor of what the service records on its own.
pub(crate) const SERVICE_ACTOR: &str = "service:submission";

fn stream_of(id: &str) -> String {
    format!("submission-{id}")
}

/// The submission service's state and command handlers, shared by every call, the reactor and the scorer.
pub struct Handler {
    proj: Arc<Projection<Submissions>>,
    clients: Clients,
    streams: Aggregates<SubmitState>,
    python: String,
    spool: Spool,
    /// Submissions whose predictions were taken, for the scorer, with the trace context that took them.
    to_score: mpsc::UnboundedSender<(String, String)>,
}

impl Handler {
    /// Builds the handlers over a running projection; the receiver yields the submissions to score.
    pub fn new(
        ctx: &ServiceContext,
        proj: Arc<Projection<Submissions>>,
        clients: Clients,
        python: String,
    ) -> (Self, mpsc::UnboundedReceiver<(String, String)>) {
        let (to_score, queue) = mpsc::unbounded_channel();
        let handler = Self {
            streams: Aggregates::new(ctx.store.clone()),
            spool: Spool {
                dir: ctx.data_dir.join("submission").join("predictions"),
            },
            proj,
            clients,
            python,
            to_score,
        };
        (handler, queue)
    }

    /// Reads the read model.
    pub fn read<R>(&self, f: impl FnOnce(&Submissions) -> R) -> R {
        self.proj.read(f)
    }

    /// What a live view of the read model follows: its position, and when it stops.
    pub fn live(
        &self,
    ) -> (
        tokio::sync::watch::Receiver<u64>,
        tokio_util::sync::CancellationToken,
    ) {
        self.proj.live()
    }

    /// The log position the read model has reached.
    pub fn position(&self) -> u64 {
        self.proj.position()
    }

    pub fn clients(&self) -> &Clients {
        &self.clients
    }

    /// The Python interpreter evaluation scripts run with.
    pub fn python(&self) -> &str {
        &self.python
    }

    pub fn spool(&self) -> &Spool {
        &self.spool
    }

    /// The submission's state as its stream tells it.
    pub async fn load(&self, id: &str) -> Result<SubmitState, SubmissionError> {
        let (state, _) = self
            .streams
            .load(&stream_of(id))
            .await
            .map_err(SubmissionError::store("reading a submission"))?;
        Ok(state)
    }

    /// Decides against the submission's stream and appends what was decided, then waits for the read
    /// model to show it.
    async fn append(
        &self,
        id: &str,
        decide: impl Fn(&SubmitState) -> Result<Vec<NewEvent>, SubmissionError>,
    ) -> Result<(), SubmissionError> {
        let out = self
            .streams
            .execute(&stream_of(id), |s, _| decide(s))
            .await
            .map_err(SubmissionError::store("recording a submission"))?;
        match out {
            Outcome::Committed { appended } => {
                // Stored: the caller must not repeat it, so a lagging view is logged, not returned.
                if let Err(lag) = self
                    .proj
                    .wait_for(appended.last_position, SETTLE_TIMEOUT)
                    .await
                {
                    tracing::warn!(%lag, "the submission view did not show an append in time");
                }
                Ok(())
            }
            Outcome::Unchanged { .. } => Ok(()),
            Outcome::Rejected(e) => Err(e),
        }
    }

    /// Submits a checkpoint of a training session: checks it, records the submission and starts its submit
    /// session. `seen_position` is how far the caller can have seen submissions (see the quota's admission).
    pub async fn submit(
        &self,
        caller: &Caller,
        r: SubmitRequest,
        seen_position: u64,
    ) -> Result<Submission, SubmissionError> {
        let src = self.source_session(caller, &r.session).await?;
        self.check_checkpoint(&r.session, &r.checkpoint).await?;
        let ds = self.dataset(&src.dataset).await?;
        if r.trial && !ds.has_trial {
            return Err(SubmissionError::NoTrialSet {
                dataset: src.dataset,
            });
        }
        let (sub, resources) = self.new_submission(&src, &r, ds);
        let actor = caller.actor();
        let requested = SubmissionRequested {
            submission: Some(sub.clone()),
        };
        self.append(&sub.id, |_| Ok(vec![new_event(&requested, &actor, "")]))
            .await?;
        let started = self
            .clients
            .session_internal
            .clone()
            .start_submit(StartSubmitRequest {
                submission_id: sub.id.clone(),
                source_session: r.session.clone(),
                checkpoint: r.checkpoint.clone(),
                trial: r.trial,
                resources: Some(resources),
                time_limit_secs: sub.time_limit_secs,
                seen_position,
            })
            .await;
        match started {
            Ok(session) => {
                let mut sub = sub;
                sub.session = session.into_inner().name;
                self.record_session(&sub, &actor).await?;
                Ok(sub)
            }
            Err(refused) => {
                self.record_rejected(sub, refused.message(), &actor).await?;
                Err(SubmissionError::upstream("starting the submit session")(
                    refused,
                ))
            }
        }
    }

    /// The training session a submit names, checked to be the caller's team's.
    async fn source_session(
        &self,
        caller: &Caller,
        session: &str,
    ) -> Result<Session, SubmissionError> {
        let src = self
            .clients
            .session
            .clone()
            .get(GetSessionRequest {
                name: session.to_string(),
            })
            .await
            .map_err(SubmissionError::upstream("looking up the session"))?
            .into_inner();
        // A submit spends the team's submits and quota: its members submit, not hosts or administrators.
        if caller.team_in(&src.competition) != Some(src.team.as_str()) {
            return Err(SubmissionError::OtherTeamSession {
                session: session.to_string(),
                team: src.team,
            });
        }
        if src.kind() != SessionKind::Train {
            return Err(SubmissionError::NotTrainSession {
                session: session.to_string(),
            });
        }
        Ok(src)
    }

    async fn check_checkpoint(
        &self,
        session: &str,
        checkpoint: &str,
    ) -> Result<(), SubmissionError> {
        let ckpts = self
            .clients
            .storage
            .clone()
            .list_checkpoints(ListCheckpointsRequest {
                session: session.to_string(),
            })
            .await
            .map_err(SubmissionError::upstream("listing checkpoints"))?
            .into_inner();
        if ckpts.checkpoints.iter().any(|c| c.name == checkpoint) {
            Ok(())
        } else {
            Err(SubmissionError::CheckpointNotFound {
                session: session.to_string(),
                checkpoint: checkpoint.to_string(),
            })
        }
    }

    /// The dataset as storage registered it.
    pub async fn dataset(&self, name: &str) -> Result<Dataset, SubmissionError> {
        Ok(self
            .clients
            .storage
            .clone()
            .get_dataset(GetDatasetRequest {
                name: name.to_string(),
            })
            .await
            .map_err(SubmissionError::upstream("looking up the dataset"))?
            .into_inner())
    }

    /// A new submission of `src`'s checkpoint, and what its submit session may use, by the competition's
    /// policy (its round's submit rules where the dataset is in a round that sets them).
    fn new_submission(
        &self,
        src: &Session,
        r: &SubmitRequest,
        ds: Dataset,
    ) -> (Submission, Resources) {
        let policy = self
            .proj
            .read(|p| p.policies.get(&src.competition).cloned())
            .unwrap_or_default();
        let rules = policy.rules_for(&src.dataset);
        let src_res = src.resources.unwrap_or_default();
        let max_cpus = rules.submit_max_cpus.max(1);
        let resources = Resources {
            gpus: src_res.gpus,
            cpus: src_res.cpus.clamp(1, max_cpus),
            memory_bytes: src_res.memory_bytes,
            shm_bytes: src_res.shm_bytes,
        };
        let time_limit = if rules.submit_time_limit_secs == 0 {
            3600
        } else {
            rules.submit_time_limit_secs
        };
        let metric = ds.meta.map(|m| m.metric).unwrap_or_default();
        let sub = submission_of(src, r, metric, time_limit, now_ms());
        (sub, resources)
    }

    /// Records the submit session running a submission, unless it is known or the submission already ended.
    async fn record_session(&self, sub: &Submission, actor: &str) -> Result<(), SubmissionError> {
        self.append(&sub.id, |st| {
            Ok(decide_session(st, sub)
                .map(|s| admitted(s, actor))
                .into_iter()
                .collect())
        })
        .await
    }

    /// Records a submission whose submit session could not start.
    async fn record_rejected(
        &self,
        mut sub: Submission,
        reason: &str,
        actor: &str,
    ) -> Result<(), SubmissionError> {
        sub.set_status(SubmissionStatus::Failed);
        sub.reason = reason.to_string();
        sub.finished_at_ms = now_ms();
        let rejected = SubmissionRejected {
            reason: sub.reason.clone(),
            submission: Some(sub.clone()),
        };
        self.append(&sub.id, |_| Ok(vec![new_event(&rejected, actor, "")]))
            .await
    }

    /// Records how a submission ended, once, if `by` may end it in its present state.
    pub async fn end(&self, id: &str, ending: Ending, by: EndedBy) -> Result<(), SubmissionError> {
        self.append(id, |st| {
            Ok(decide_end(st, &ending, by, now_ms())
                .map(ended)
                .into_iter()
                .collect())
        })
        .await
    }

    /// Takes the predictions a submit session's `infer` returned: spools them, records the submission as
    /// Scoring and hands it to the scorer. Answers once they are recorded, before they are scored.
    pub async fn take_predictions(
        &self,
        session: &str,
        submission_id: &str,
        predictions_json: String,
    ) -> Result<(), SubmissionError> {
        let id = if submission_id.is_empty() {
            self.proj
                .read(|p| p.by_session.get(session).cloned())
                .ok_or_else(|| SubmissionError::NotSubmitSession {
                    session: session.to_string(),
                })?
        } else {
            submission_id.to_string()
        };
        // The submission's own stream, not the read model: predictions can arrive before the read model
        // (or even the submission) has recorded which session runs it.
        let state = self.load(&id).await?;
        let team = SessionName::parse(session)?.team;
        let team = team.as_str();
        decide_take_predictions(&state, session, team)?;
        self.spool.write(&id, predictions_json).await?;
        self.append(&id, |st| {
            let scoring = decide_take_predictions(st, session, team)?;
            Ok(vec![new_event(
                &SubmissionPredictionsTaken {
                    submission: Some(scoring),
                },
                SERVICE_ACTOR,
                "",
            )])
        })
        .await?;
        self.schedule(id);
        Ok(())
    }

    /// Hands a submission to the scorer; its scoring joins the current trace.
    pub fn schedule(&self, id: String) {
        let traceparent = nsml_common::telemetry::current_traceparent();
        if self.to_score.send((id, traceparent)).is_err() {
            // The scorer stopped with the service; the next start scores what is left.
            tracing::warn!("the scorer has stopped; the submission is scored at the next start");
        }
    }
}

/// A new submission of `r`'s checkpoint of `src`, running, as `submit` records it when asked at `at_ms`.
pub(crate) fn submission_of(
    src: &Session,
    r: &SubmitRequest,
    metric: String,
    time_limit_secs: u64,
    at_ms: i64,
) -> Submission {
    Submission {
        id: uuid::Uuid::now_v7().to_string(),
        team: src.team.clone(),
        dataset: src.dataset.clone(),
        competition: src.competition.clone(),
        source_session: r.session.clone(),
        checkpoint: r.checkpoint.clone(),
        trial: r.trial,
        status: SubmissionStatus::Running as i32,
        submitted_at_ms: at_ms,
        time_limit_secs,
        metric,
        ..Default::default()
    }
}

pub(crate) fn admitted(sub: Submission, actor: &str) -> NewEvent {
    new_event(
        &SubmissionAdmitted {
            submission: Some(sub),
            decision_id: String::new(),
        },
        actor,
        "",
    )
}

/// The event recording a submission's outcome, by the status it ended in.
pub(crate) fn ended(sub: Submission) -> NewEvent {
    let submission = Some(sub);
    match submission.as_ref().map(Submission::status) {
        Some(SubmissionStatus::Scored) => {
            new_event(&SubmissionScored { submission }, SERVICE_ACTOR, "")
        }
        Some(SubmissionStatus::TimedOut) => {
            new_event(&SubmissionTimedOut { submission }, SERVICE_ACTOR, "")
        }
        _ => new_event(&SubmissionFailed { submission }, SERVICE_ACTOR, ""),
    }
}

/// Predictions taken but not scored yet, one file per submission under this service's data directory, so
/// that a restart finds them.
pub struct Spool {
    dir: PathBuf,
}

impl Spool {
    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// Writes a submission's predictions durably (a whole file or none).
    async fn write(&self, id: &str, predictions_json: String) -> Result<(), SubmissionError> {
        let (dir, path) = (self.dir.clone(), self.path(id));
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            use std::io::Write;
            std::fs::create_dir_all(&dir)?;
            let mut tmp = tempfile::NamedTempFile::new_in(&dir)?;
            tmp.write_all(predictions_json.as_bytes())?;
            tmp.as_file().sync_all()?;
            tmp.persist(&path).map_err(|e| e.error)?;
            Ok(())
        })
        .await
        .map_err(|e| SubmissionError::io("spooling predictions")(std::io::Error::other(e)))?
        .map_err(SubmissionError::io("spooling predictions"))
    }

    /// A submission's spooled predictions; `None` when there are none.
    pub async fn read(&self, id: &str) -> Result<Option<String>, SubmissionError> {
        match tokio::fs::read_to_string(self.path(id)).await {
            Ok(s) => Ok(Some(s)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(SubmissionError::io("reading spooled predictions")(e)),
        }
    }

    /// Removes a submission's spooled predictions, if any.
    pub async fn remove(&self, id: &str) {
        if let Err(err) = tokio::fs::remove_file(self.path(id)).await
            && err.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(%err, submission = %id, "could not remove spooled predictions");
        }
    }

    /// The submissions with spooled predictions.
    pub async fn ids(&self) -> Vec<String> {
        let Ok(mut entries) = tokio::fs::read_dir(&self.dir).await else {
            return vec![];
        };
        let mut ids = Vec::new();
        while let Ok(Some(e)) = entries.next_entry().await {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(id) = name.strip_suffix(".json") {
                ids.push(id.to_string());
            } else if name.starts_with(".tmp") {
                // A write cut short by a crash.
                let _ = tokio::fs::remove_file(e.path()).await;
            }
        }
        ids
    }
}
