//! The `QuotaService` gRPC API: admission (load the team's ledger → decide → append with the expected
//! version) and usage.

use std::sync::Arc;

use nsml_common::aggregate::{Aggregates, Outcome};
use nsml_common::caller::Caller;
use nsml_common::event::new_event;
use nsml_common::projection::Projection;
use nsml_common::{ServiceContext, now_ms, status};
use nsml_eventstore::NewEvent;
use nsml_proto::v1::quota_service_server::QuotaService as QuotaApi;
use nsml_proto::v1::{
    AdmissionDenied, AdmitRequest, DatasetSubmitState, Decision, Holding, QuotaUsage,
    QuotaUsageRequest, ResourcesGranted,
};
use tonic::{Request, Response, Status};

use crate::domain::{Ledger, decide};
use crate::projection::Policies;

/// The quota service.
#[derive(Clone)]
pub struct QuotaService {
    pub(crate) ledgers: Arc<Aggregates<Ledger>>,
    proj: Arc<Projection<Policies>>,
}

/// The ledger stream of a team.
pub fn ledger_stream(team: &str) -> String {
    format!("quota-{team}")
}

impl QuotaService {
    pub(crate) fn new(ctx: ServiceContext, proj: Arc<Projection<Policies>>) -> Self {
        Self {
            ledgers: Arc::new(Aggregates::new(ctx.store.clone())),
            proj,
        }
    }

    /// Appends `events` to a team's ledger if `pending` says they are still due (idempotent facts).
    pub(crate) async fn record(
        &self,
        team: &str,
        pending: impl Fn(&Ledger) -> Option<NewEvent>,
    ) -> Result<(), nsml_eventstore::StoreError> {
        self.ledgers
            .execute(&ledger_stream(team), |l, _| {
                Ok::<_, ()>(pending(l).into_iter().collect())
            })
            .await
            .map(|_| ())
    }
}

#[tonic::async_trait]
impl QuotaApi for QuotaService {
    async fn admit(&self, req: Request<AdmitRequest>) -> Result<Response<Decision>, Status> {
        let caller = Caller::of(&req)?;
        caller.require_service()?;
        let r = req.into_inner();
        if r.team.is_empty() || r.session.is_empty() || r.command_id.is_empty() {
            return Err(Status::invalid_argument(
                "an admission needs a team, a session and a command id",
            ));
        }
        let (policy, policy_version) = self
            .proj
            .read(|p| p.policies.get(&r.competition).cloned())
            .ok_or_else(|| {
                Status::failed_precondition(format!(
                    "competition `{}` has no policy yet",
                    r.competition
                ))
            })?;
        let actor = caller.actor();
        let mut made: Option<Decision> = None;
        let outcome = self
            .ledgers
            .execute(&ledger_stream(&r.team), |ledger, version| {
                if let Some(d) = ledger.decisions.get(&r.command_id) {
                    made = Some(d.clone());
                    return Ok::<_, Status>(vec![]);
                }
                let now = now_ms();
                let mut d = decide(ledger, &policy, &r, now);
                d.id = uuid::Uuid::now_v7().to_string();
                d.policy_version = policy_version;
                d.ledger_version = version;
                d.decided_at_ms = now;
                made = Some(d.clone());
                let ev = if d.granted {
                    new_event(
                        &ResourcesGranted {
                            request: Some(r.clone()),
                            decision: Some(d),
                        },
                        &actor,
                        &r.command_id,
                    )
                } else {
                    new_event(
                        &AdmissionDenied {
                            request: Some(r.clone()),
                            decision: Some(d),
                        },
                        &actor,
                        &r.command_id,
                    )
                };
                Ok(vec![ev])
            })
            .await
            .map_err(|e| status::store("recording an admission", e))?;
        if let Outcome::Rejected(s) = outcome {
            return Err(s);
        }
        made.map(Response::new)
            .ok_or_else(|| status::internal("deciding an admission", "no decision"))
    }

    async fn usage(&self, req: Request<QuotaUsageRequest>) -> Result<Response<QuotaUsage>, Status> {
        let caller = Caller::of(&req)?;
        caller.require_authenticated()?;
        let r = req.into_inner();
        let competition = r.competition.clone();
        let team = if r.team.is_empty() {
            caller
                .team_in(&competition)
                .map(str::to_string)
                .ok_or_else(|| {
                    Status::invalid_argument(format!(
                        "you are not in a team of competition `{competition}`"
                    ))
                })?
        } else {
            r.team.clone()
        };
        if !caller.may_access_team(&team, &competition) {
            return Err(Status::permission_denied(format!(
                "the quota of team `{team}` is visible to its members and hosts only"
            )));
        }
        let (policy, policy_version) = self
            .proj
            .read(|p| p.policies.get(&competition).cloned())
            .ok_or_else(|| Status::not_found(format!("competition `{competition}` not found")))?;
        let (ledger, _) = self
            .ledgers
            .load(&ledger_stream(&team))
            .await
            .map_err(|e| status::store("reading a ledger", e))?;
        let interval_ms = policy.submit_interval_secs as i64 * 1000;
        Ok(Response::new(QuotaUsage {
            team,
            competition,
            held: Some(ledger.held()),
            sessions: ledger.holdings.len() as u32,
            holdings: ledger
                .holdings
                .iter()
                .map(|(s, h)| Holding {
                    session: s.clone(),
                    resources: Some(h.resources),
                    kind: h.kind as i32,
                })
                .collect(),
            submits: ledger
                .submits
                .iter()
                .map(|(d, s)| DatasetSubmitState {
                    dataset: d.clone(),
                    last_success_ms: s.last_success_ms.unwrap_or(0),
                    next_allowed_ms: s.last_success_ms.map_or(0, |t| t + interval_ms),
                    in_flight: !s.in_flight.is_empty(),
                })
                .collect(),
            policy_version,
            limit_gpus: policy.team_gpus,
            limit_cpus: policy.team_cpus,
            limit_memory_bytes: policy.team_memory_bytes,
            limit_sessions: policy.team_sessions,
            submit_interval_secs: policy.submit_interval_secs,
        }))
    }
}
