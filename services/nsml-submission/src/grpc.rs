//! The `SubmissionService` gRPC API: submit, look up, list, and the runner's hand-over of predictions to
//! the scorer.

use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use nsml_common::aggregate::{Aggregates, Outcome};
use nsml_common::caller::Caller;
use nsml_common::clients::Clients;
use nsml_common::event::new_event;
use nsml_common::names::{SessionName, check_checkpoint};
use nsml_common::projection::Projection;
use nsml_common::{ServiceContext, now_ms, status};
use nsml_eventstore::NewEvent;
use nsml_proto::v1::submission_service_server::SubmissionService as SubmissionApi;
use nsml_proto::v1::{
    DatasetPart, FetchDatasetPartRequest, GetDatasetRequest, GetSessionRequest,
    GetSubmissionRequest, ListCheckpointsRequest, ListSubmissionsRequest, ListSubmissionsResponse,
    Resources, RunnerPredictionsRequest, RunnerPredictionsResponse, SessionKind,
    StartSubmitRequest, Submission, SubmissionAdmitted, SubmissionFailed, SubmissionRejected,
    SubmissionRequested, SubmissionScored, SubmissionStatus, SubmissionTimedOut, SubmitRequest,
};
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

use crate::domain::SubmitState;
use crate::projection::Submissions;
use crate::scoring;

/// The submission service.
#[derive(Clone)]
pub struct SubmissionService {
    proj: Arc<Projection<Submissions>>,
    clients: Clients,
    streams: Arc<Aggregates<SubmitState>>,
    python: String,
}

/// How a submission ended.
pub(crate) enum Ending {
    Scored { score: f64, private: Option<f64> },
    Failed(String),
    TimedOut(String),
}

fn stream_of(id: &str) -> String {
    format!("submission-{id}")
}

impl SubmissionService {
    pub(crate) fn new(
        ctx: ServiceContext,
        proj: Arc<Projection<Submissions>>,
        clients: Clients,
        python: String,
    ) -> Self {
        Self {
            streams: Arc::new(Aggregates::new(ctx.store.clone())),
            proj,
            clients,
            python,
        }
    }

    pub(crate) fn projection(&self) -> &Arc<Projection<Submissions>> {
        &self.proj
    }

    async fn append(
        &self,
        id: &str,
        ev: impl Fn(&SubmitState) -> Vec<NewEvent>,
    ) -> Result<(), Status> {
        let out = self
            .streams
            .execute(&stream_of(id), |s, _| Ok::<_, Status>(ev(s)))
            .await
            .map_err(|e| status::store("recording a submission", e))?;
        match out {
            Outcome::Committed { appended, .. } => {
                // Stored: the caller must not repeat it, so a lagging view is logged, not returned.
                if let Err(lag) = self
                    .proj
                    .wait_for(appended.last_position, Duration::from_secs(5))
                    .await
                {
                    tracing::warn!(%lag, "the submission view did not show an append in time");
                }
                Ok(())
            }
            Outcome::Unchanged { .. } => Ok(()),
            Outcome::Rejected(s) => Err(s),
        }
    }

    /// Records the submit session running a submission, unless it is known or the submission already ended.
    async fn record_session(&self, sub: &Submission, actor: &str) -> Result<(), Status> {
        self.append(&sub.id, |st| {
            let known = st
                .submission
                .as_ref()
                .is_some_and(|s| !s.session.is_empty());
            if st.ended() || known {
                return vec![];
            }
            vec![new_event(
                &SubmissionAdmitted {
                    submission: Some(sub.clone()),
                    decision_id: String::new(),
                },
                actor,
                "",
            )]
        })
        .await
    }

    /// Records how a submission ended, once.
    pub(crate) async fn end(&self, id: &str, ending: Ending) -> Result<(), Status> {
        self.append(id, |st| {
            if st.ended() {
                return vec![];
            }
            let Some(mut s) = st.submission.clone() else {
                return vec![];
            };
            s.finished_at_ms = now_ms();
            let ev = match &ending {
                Ending::Scored { score, private } => {
                    s.set_status(SubmissionStatus::Scored);
                    s.score = *score;
                    s.private_score = *private;
                    new_event(
                        &SubmissionScored {
                            submission: Some(s),
                        },
                        "service:submission",
                        "",
                    )
                }
                Ending::Failed(reason) => {
                    s.set_status(SubmissionStatus::Failed);
                    s.reason = reason.clone();
                    new_event(
                        &SubmissionFailed {
                            submission: Some(s),
                        },
                        "service:submission",
                        "",
                    )
                }
                Ending::TimedOut(reason) => {
                    s.set_status(SubmissionStatus::TimedOut);
                    s.reason = reason.clone();
                    new_event(
                        &SubmissionTimedOut {
                            submission: Some(s),
                        },
                        "service:submission",
                        "",
                    )
                }
            };
            vec![ev]
        })
        .await
    }

    fn visible(&self, caller: &Caller, mut s: Submission) -> Submission {
        let revealed = self
            .proj
            .read(|p| p.revealed.get(&s.competition).copied().unwrap_or(false));
        if !(caller.is_host_of(&s.competition) || revealed) {
            s.private_score = None;
        }
        s
    }

    async fn fetch_part(&self, dataset: &str, part: DatasetPart) -> Result<Vec<u8>, Status> {
        let mut stream = self
            .clients
            .storage
            .clone()
            .fetch_dataset_part(FetchDatasetPartRequest {
                name: dataset.to_string(),
                part: part as i32,
            })
            .await
            .map_err(|s| status::upstream("fetching hidden labels", s))?
            .into_inner();
        let mut buf = Vec::new();
        while let Some(c) = stream.next().await {
            buf.extend_from_slice(
                &c.map_err(|s| status::upstream("fetching hidden labels", s))?
                    .data,
            );
        }
        Ok(buf)
    }

    /// Scores predictions of a submission against the hidden labels, outside any participant process.
    async fn score(&self, sub: &Submission, predictions_json: &str) -> Result<Ending, Status> {
        let ds = self
            .clients
            .storage
            .clone()
            .get_dataset(GetDatasetRequest {
                name: sub.dataset.clone(),
            })
            .await
            .map_err(|s| status::upstream("looking up the dataset", s))?
            .into_inner();
        let meta = ds.meta.unwrap_or_default();
        let part = if sub.trial {
            DatasetPart::TrialLabel
        } else {
            DatasetPart::TestLabel
        };
        let archive = self.fetch_part(&sub.dataset, part).await?;
        let labels_csv =
            first_file(&archive).map_err(|e| status::internal("reading hidden labels", e))?;
        if !meta.eval_script.is_empty() {
            let script_archive = self
                .fetch_part(&sub.dataset, DatasetPart::EvalScript)
                .await?;
            let dir =
                tempfile::tempdir().map_err(|e| status::internal("preparing the scorer", e))?;
            let script = dir.path().join("eval.py");
            let code = first_file(&script_archive)
                .map_err(|e| status::internal("reading the evaluation script", e))?;
            std::fs::write(&script, code)
                .map_err(|e| status::internal("preparing the scorer", e))?;
            return Ok(
                match scoring::eval_script::run_eval_script(
                    &self.python,
                    &script,
                    predictions_json,
                    &labels_csv,
                    Duration::from_secs(600),
                )
                .await
                {
                    Ok(score) => Ending::Scored {
                        score,
                        private: None,
                    },
                    Err(e) => Ending::Failed(e.to_string()),
                },
            );
        }
        let Some(metric) = scoring::Metric::parse(&meta.metric) else {
            return Ok(Ending::Failed(format!(
                "dataset `{}` has an unknown metric `{}`",
                sub.dataset, meta.metric
            )));
        };
        let labels = scoring::parse_labels(&labels_csv)
            .map_err(|e| status::internal("parsing hidden labels", e))?;
        let partition = if sub.trial {
            scoring::Partition::Whole
        } else {
            scoring::Partition::PublicPrivate {
                private_keys: meta.private_keys.clone(),
                fraction: meta.private_fraction,
                seed: meta.split_seed,
            }
        };
        Ok(
            match scoring::score(&labels, predictions_json, &partition, metric) {
                Ok(s) => Ending::Scored {
                    score: s.public,
                    private: s.private,
                },
                Err(e) => Ending::Failed(e.to_string()),
            },
        )
    }
}

/// The content of the first regular file in a gzip'd tar.
fn first_file(archive: &[u8]) -> Result<String, std::io::Error> {
    let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(archive));
    for entry in ar.entries()? {
        let mut e = entry?;
        if e.header().entry_type().is_file() {
            let mut s = String::new();
            e.read_to_string(&mut s)?;
            return Ok(s);
        }
    }
    Err(std::io::Error::other("the archive holds no file"))
}

#[tonic::async_trait]
impl SubmissionApi for SubmissionService {
    async fn submit(&self, req: Request<SubmitRequest>) -> Result<Response<Submission>, Status> {
        // What the caller can have seen of submissions so far (a `Get` reads this projection): every earlier
        // submit's outcome it saw is at or before this position. The admission waits for the quota ledger to
        // record them, so a submit the caller saw scored never counts as in flight against this one.
        let seen_position = self.proj.position();
        nsml_common::bounds::check(&req)?;
        let caller = Caller::of(&req)?;
        caller.user()?;
        let r = req.into_inner();
        SessionName::parse(&r.session)?;
        check_checkpoint(&r.checkpoint)?;
        let src = self
            .clients
            .session
            .clone()
            .get(GetSessionRequest {
                name: r.session.clone(),
            })
            .await
            .map_err(|s| status::upstream("looking up the session", s))?
            .into_inner();
        // A submit spends the team's submits and quota: its members submit, not hosts or administrators.
        if caller.team_in(&src.competition) != Some(src.team.as_str()) {
            return Err(Status::permission_denied(format!(
                "session `{}` belongs to another team: only team `{}` submits its checkpoints",
                r.session, src.team
            )));
        }
        if src.kind() != SessionKind::Train {
            return Err(Status::failed_precondition(format!(
                "`{}` is a submit session; submit a checkpoint of a training session",
                r.session
            )));
        }
        let ckpts = self
            .clients
            .storage
            .clone()
            .list_checkpoints(ListCheckpointsRequest {
                session: r.session.clone(),
            })
            .await
            .map_err(|s| status::upstream("listing checkpoints", s))?
            .into_inner();
        if !ckpts.checkpoints.iter().any(|c| c.name == r.checkpoint) {
            return Err(Status::not_found(format!(
                "checkpoint `{}` not found in session `{}`; `nsml model ls {}` lists them",
                r.checkpoint, r.session, r.session
            )));
        }
        let ds = self
            .clients
            .storage
            .clone()
            .get_dataset(GetDatasetRequest {
                name: src.dataset.clone(),
            })
            .await
            .map_err(|s| status::upstream("looking up the dataset", s))?
            .into_inner();
        if r.trial && !ds.has_trial {
            return Err(Status::failed_precondition(format!(
                "dataset `{}` has no trial set, so `submit -t` is not available",
                src.dataset
            )));
        }
        let policy = self
            .proj
            .read(|p| p.policies.get(&src.competition).cloned())
            .unwrap_or_default();
        let src_res = src.resources.unwrap_or_default();
        let max_cpus = policy.submit_max_cpus.max(1);
        let resources = Resources {
            gpus: src_res.gpus,
            cpus: src_res.cpus.clamp(1, max_cpus),
            memory_bytes: src_res.memory_bytes,
            shm_bytes: src_res.shm_bytes,
        };
        let time_limit = if policy.submit_time_limit_secs == 0 {
            3600
        } else {
            policy.submit_time_limit_secs
        };
        let id = uuid::Uuid::now_v7().to_string();
        let mut sub = Submission {
            id: id.clone(),
            team: src.team.clone(),
            dataset: src.dataset.clone(),
            competition: src.competition.clone(),
            source_session: r.session.clone(),
            checkpoint: r.checkpoint.clone(),
            trial: r.trial,
            status: SubmissionStatus::Running as i32,
            submitted_at_ms: now_ms(),
            time_limit_secs: time_limit,
            metric: ds.meta.map(|m| m.metric).unwrap_or_default(),
            ..Default::default()
        };
        let actor = caller.actor();
        let requested = sub.clone();
        self.append(&id, |_| {
            vec![new_event(
                &SubmissionRequested {
                    submission: Some(requested.clone()),
                },
                &actor,
                "",
            )]
        })
        .await?;
        let started = self
            .clients
            .session
            .clone()
            .start_submit(StartSubmitRequest {
                submission_id: id.clone(),
                source_session: r.session.clone(),
                checkpoint: r.checkpoint.clone(),
                trial: r.trial,
                resources: Some(resources),
                time_limit_secs: time_limit,
                seen_position,
            })
            .await;
        match started {
            Ok(session) => {
                sub.session = session.into_inner().name;
                self.record_session(&sub, &actor).await?;
                Ok(Response::new(self.visible(&caller, sub)))
            }
            Err(st) => {
                let mut rejected = sub.clone();
                rejected.set_status(SubmissionStatus::Failed);
                rejected.reason = st.message().to_string();
                rejected.finished_at_ms = now_ms();
                self.append(&id, |_| {
                    vec![new_event(
                        &SubmissionRejected {
                            submission: Some(rejected.clone()),
                            reason: rejected.reason.clone(),
                        },
                        &actor,
                        "",
                    )]
                })
                .await?;
                Err(status::upstream("starting the submit session", st))
            }
        }
    }

    async fn get(
        &self,
        req: Request<GetSubmissionRequest>,
    ) -> Result<Response<Submission>, Status> {
        nsml_common::bounds::check(&req)?;
        let caller = Caller::of(&req)?;
        caller.require_authenticated()?;
        let id = req.into_inner().id;
        let s = self
            .proj
            .read(|p| p.by_id.get(&id).cloned())
            .ok_or_else(|| Status::not_found(format!("submission `{id}` not found")))?;
        if !caller.may_access_team(&s.team, &s.competition) {
            return Err(Status::permission_denied(format!(
                "submission `{id}` belongs to another team"
            )));
        }
        Ok(Response::new(self.visible(&caller, s)))
    }

    async fn list(
        &self,
        req: Request<ListSubmissionsRequest>,
    ) -> Result<Response<ListSubmissionsResponse>, Status> {
        nsml_common::bounds::check(&req)?;
        let caller = Caller::of(&req)?;
        caller.require_authenticated()?;
        let r = req.into_inner();
        let subs: Vec<Submission> = self.proj.read(|p| {
            p.by_id
                .values()
                .filter(|s| caller.may_access_team(&s.team, &s.competition))
                .filter(|s| r.dataset.is_empty() || s.dataset == r.dataset)
                .cloned()
                .collect()
        });
        let submissions = subs.into_iter().map(|s| self.visible(&caller, s)).collect();
        Ok(Response::new(ListSubmissionsResponse { submissions }))
    }

    async fn runner_predictions(
        &self,
        req: Request<RunnerPredictionsRequest>,
    ) -> Result<Response<RunnerPredictionsResponse>, Status> {
        Caller::of(&req)?.require_service()?;
        let r = req.into_inner();
        let not_submit =
            || Status::not_found(format!("session `{}` is not a submit session", r.session));
        let id = if r.submission_id.is_empty() {
            self.proj
                .read(|p| p.by_session.get(&r.session).cloned())
                .ok_or_else(not_submit)?
        } else {
            r.submission_id.clone()
        };
        // The submission's own stream, not the read model: predictions can arrive before the read model
        // (or even the submission) has recorded which session runs it.
        let (state, _) = self
            .streams
            .load(&stream_of(&id))
            .await
            .map_err(|e| status::store("reading a submission", e))?;
        let mut sub = state.submission.ok_or_else(not_submit)?;
        let team = SessionName::parse(&r.session)?.team;
        if sub.team != team || (!sub.session.is_empty() && sub.session != r.session) {
            return Err(not_submit());
        }
        if sub.session.is_empty() {
            sub.session = r.session.clone();
            self.record_session(&sub, "service:submission").await?;
        }
        if sub.status() != SubmissionStatus::Running {
            return Err(Status::failed_precondition(format!(
                "submission {} already ended; predictions are taken once",
                sub.id
            )));
        }
        let ending = self.score(&sub, &r.predictions_json).await?;
        let failure = match &ending {
            Ending::Failed(reason) => Some(reason.clone()),
            _ => None,
        };
        self.end(&sub.id, ending).await?;
        match failure {
            Some(reason) => Err(Status::invalid_argument(reason)),
            None => Ok(Response::new(RunnerPredictionsResponse {})),
        }
    }
}
