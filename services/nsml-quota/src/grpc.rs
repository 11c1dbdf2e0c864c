//! The `QuotaService` gRPC API: admission (load the team's ledger → adopt the competition's newer policy →
//! decide → append with the expected version), usage, hosts' overrides and the audit (replay, explain, verify,
//! export). Authorisation and conversion only: the rules live in `domain`, the audit in `audit`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use nsml_common::aggregate::{Aggregates, Outcome};
use nsml_common::caller::Caller;
use nsml_common::clients::Clients;
use nsml_common::event::new_event;
use nsml_common::names::SessionName;
use nsml_common::projection::Projection;
use nsml_common::{ServiceContext, now_ms, status};
use nsml_eventstore::{ChainBreakKind, EventStore, NewEvent, StoredEvent};
use nsml_proto::v1::quota_service_server::QuotaService as QuotaApi;
use nsml_proto::v1::{
    AdmissionDenied, AdmitRequest, DatasetSubmitState, Decision, EventPayload, ExplainRequest,
    Explanation, ExportRequest, ExportResponse, Holding, Override, OverrideGranted, OverrideKind,
    OverrideRequest, Policy, PolicyChanged, QuotaUsage, QuotaUsageRequest, ReplayMismatch,
    ReplayReport, ReplayRequest, ResourcesGranted, SubmitEnded, UsageRequest, VerifyReport,
    VerifyRequest,
};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::audit;
use crate::domain::{
    Ledger, LedgerEvent, ReopenRefused, SubmitState, decide, fmt_time, human_secs, interval_ms,
    ledger_stream,
};
use crate::projection::Catalog;
use crate::replay::Scope;

/// How long an admission that names a log position waits for the reactor to record the outcomes up to it
/// (see [`caught_up`]) before it answers UNAVAILABLE: the reactor is milliseconds behind the log when healthy, and a loaded
/// machine may hold it back for seconds.
const CATCH_UP: Duration = Duration::from_secs(10);

/// The quota service.
#[derive(Clone)]
pub struct QuotaService {
    pub(crate) ledgers: Arc<Aggregates<Ledger>>,
    proj: Arc<Projection<Catalog>>,
    store: Arc<dyn EventStore>,
    clients: Clients,
    /// The log position up to which the reactor has recorded every outside fact (sessions ended, submits'
    /// outcomes) in the ledgers.
    pub(crate) recorded: Arc<watch::Sender<u64>>,
}

impl QuotaService {
    pub(crate) fn new(
        ctx: ServiceContext,
        proj: Arc<Projection<Catalog>>,
    ) -> Result<Self, nsml_common::clients::ClientsError> {
        Ok(Self {
            ledgers: Arc::new(Aggregates::new(ctx.store.clone())),
            proj,
            store: ctx.store.clone(),
            clients: ctx.clients("quota")?,
            recorded: Arc::new(watch::Sender::new(0)),
        })
    }

    /// Notes that the reactor has recorded every fact up to log position `position`.
    pub(crate) fn recorded_up_to(&self, position: u64) {
        self.recorded.send_if_modified(|at| {
            let later = position > *at;
            if later {
                *at = position;
            }
            later
        });
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

    /// The competition's policy as the log has it now, with its version.
    fn current_policy(&self, competition: &str) -> Option<(Policy, u64)> {
        self.proj.read(|p| p.policies.get(competition).copied())
    }

    /// The competitions whose decisions the caller may audit (`None`: all of them).
    fn hosted(caller: &Caller) -> Result<Option<Vec<String>>, Status> {
        caller.require_authenticated()?;
        match caller {
            Caller::User(id) if id.admin => Ok(None),
            Caller::User(id) if !id.hosts.is_empty() => Ok(Some(id.hosts.clone())),
            Caller::Service(_) => Ok(None),
            _ => Err(Status::permission_denied(
                "the audit is for hosts: only hosts of a competition may do this",
            )),
        }
    }
}

/// The policy a decision uses: the ledger's, unless the log has a newer version, which the ledger adopts first.
fn adopt(
    ledger: &Ledger,
    competition: &str,
    current: Option<(Policy, u64)>,
) -> Option<(Policy, u64, Option<PolicyChanged>)> {
    match (ledger.policy(competition), current) {
        (Some(a), Some((_, v))) if a.version >= v => Some((a.policy, a.version, None)),
        (Some(a), None) => Some((a.policy, a.version, None)),
        (_, Some((p, v))) => Some((
            p,
            v,
            Some(PolicyChanged {
                competition: competition.to_string(),
                policy: Some(p),
                version: v,
            }),
        )),
        (None, None) => None,
    }
}

/// The dataset of a submit whose slot a host asks to re-open, given what the ledger knows of it (`known`) and,
/// when the ledger does not know it, the dataset of the submit of that id that ended without success
/// (`failed`); `dataset`, when given, must be the submit's. Else why its slot cannot be re-opened, as the
/// status the caller gets.
fn reopen_dataset(
    known: Result<&str, ReopenRefused>,
    failed: Option<String>,
    submission: &str,
    dataset: &str,
) -> Result<String, Status> {
    let found = match (known, failed) {
        (Ok(found), _) => found,
        (Err(ReopenRefused::Unknown { .. }), Some(failed)) => {
            return Err(Status::failed_precondition(
                ReopenRefused::Failed {
                    submission: submission.to_string(),
                    dataset: failed,
                }
                .to_string(),
            ));
        }
        (Err(e @ ReopenRefused::Unknown { .. }), None) => {
            return Err(Status::not_found(e.to_string()));
        }
        (Err(e), _) => return Err(Status::failed_precondition(e.to_string())),
    };
    if !dataset.is_empty() && dataset != found {
        return Err(Status::invalid_argument(format!(
            "submission {submission} is a submit on dataset `{found}`, not `{dataset}`: leave out the dataset or name `{found}`"
        )));
    }
    Ok(found.to_string())
}

/// The dataset of the real submit `submission` if the ledger's events record that it ended without success.
fn failed_submit(events: &[StoredEvent], submission: &str) -> Option<String> {
    events
        .iter()
        .filter(|ev| ev.event_type == SubmitEnded::TYPE)
        .filter_map(|ev| match LedgerEvent::decode(ev) {
            Some(LedgerEvent::Ended(e)) => Some(e),
            _ => None,
        })
        .find(|e| e.submission_id == submission)
        .map(|e| e.dataset)
}

/// When the next real submit on a dataset is allowed, and why.
fn next_submit(ledger: &Ledger, policy: &Policy, dataset: &str, now: i64) -> DatasetSubmitState {
    let empty = SubmitState::default();
    let st = ledger.submits.get(dataset).unwrap_or(&empty);
    let extra = ledger.extra_submits(dataset) as u32;
    let interval = interval_ms(policy);
    let last = st.last_success();
    let last_sub = last
        .map(|l| l.submission_id.to_string())
        .unwrap_or_default();
    let last_success_ms = last.map(|l| l.at_ms);
    let next = last_success_ms.map_or(0, |t| t.saturating_add(interval));
    let rule = format!(
        "one real submit per {} per dataset, counted from the last successful one",
        human_secs(policy.submit_interval_secs)
    );
    let in_flight = st
        .counted_in_flight()
        .next()
        .map(|(s, _)| s.clone())
        .unwrap_or_default();
    // Slots a host re-opened: they count neither as in flight nor towards the interval. Named in `why` while
    // they make a difference: the submit still runs, or its interval would not have passed.
    let spared: Vec<String> = st
        .reopened_in_flight
        .iter()
        .map(|(s, id)| format!("{s} (in flight, override {id})"))
        .chain(
            st.reopened_in_interval(interval, now)
                .map(|(_, s, id)| format!("{s} (succeeded, override {id})")),
        )
        .collect();
    let why = if !in_flight.is_empty() {
        format!(
            "not now: submission {in_flight} is in flight; the next real submit may be requested when it ends{}",
            if next > now {
                format!(" and the interval allows it (at {})", fmt_time(next))
            } else {
                String::new()
            }
        )
    } else if let Some(last) = last_success_ms.filter(|_| next > now) {
        if extra > 0 {
            format!(
                "now, once: a host granted an extra submit that waives the interval (otherwise at {}: {rule}; submission {last_sub} succeeded, submitted at {})",
                fmt_time(next),
                fmt_time(last)
            )
        } else {
            format!(
                "at {}: {rule}; submission {last_sub} succeeded, submitted at {}",
                fmt_time(next),
                fmt_time(last)
            )
        }
    } else if let Some(last) = last_success_ms {
        format!(
            "now: the last successful submit (submission {last_sub}, submitted at {}) is more than {} ago",
            fmt_time(last),
            human_secs(policy.submit_interval_secs)
        )
    } else if !st.reopened_successes.is_empty() {
        "now: no successful real submit counts (failed and timed-out submits do not count, nor those whose slot a host re-opened)".into()
    } else {
        "now: no successful real submit yet (failed and timed-out submits do not count)".into()
    };
    let why = if spared.is_empty() {
        why
    } else {
        format!(
            "{why}; not counted, as a host re-opened their slot: submission {}",
            spared.join(", submission ")
        )
    };
    DatasetSubmitState {
        dataset: dataset.to_string(),
        last_success_ms: last_success_ms.unwrap_or(0),
        next_allowed_ms: if next > now { next } else { 0 },
        in_flight: !in_flight.is_empty(),
        last_success_submission_id: last_sub,
        in_flight_submission_id: in_flight,
        extra_submits: extra,
        why,
        reopened_submission_ids: st
            .reopened_in_flight
            .keys()
            .cloned()
            .chain(st.reopened_successes.values().map(|(s, _)| s.clone()))
            .collect(),
    }
}

/// Waits until the ledgers record every outside fact up to log position `seen`, as `recorded` tells: what the
/// caller saw of the log (a submit scored, a session ended) is then what the decision sees. UNAVAILABLE when
/// the reactor does not get there within `bound`, rather than a decision on a ledger the caller knows is stale.
async fn caught_up(
    recorded: &watch::Sender<u64>,
    seen: u64,
    bound: Duration,
) -> Result<(), Status> {
    let mut rx = recorded.subscribe();
    match tokio::time::timeout(bound, rx.wait_for(|at| *at >= seen)).await {
        Ok(Ok(_)) => Ok(()),
        // `recorded` is borrowed, so its sender outlives the wait and the channel cannot close under it.
        Ok(Err(_)) => Err(Status::unavailable(
            "the quota service is shutting down; retry",
        )),
        Err(_) => {
            let at = *recorded.borrow();
            tracing::warn!(
                seen,
                at,
                "the quota reactor is behind the caller's log position"
            );
            Err(Status::unavailable(format!(
                "the quota ledgers have recorded outcomes up to log position {at}, not yet {seen} as the caller has seen; retry in a few seconds"
            )))
        }
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
        // Read-your-writes across services: a caller that saw a submit end must not be refused because the
        // ledger has not recorded that end yet. Only callers that name a position wait, so training sessions'
        // admissions do not.
        if r.seen_position > 0 {
            caught_up(&self.recorded, r.seen_position, CATCH_UP).await?;
        }
        let current = self.current_policy(&r.competition);
        let actor = caller.actor();
        let stream = ledger_stream(&r.team);
        let mut made: Option<Decision> = None;
        let mut repeated: Option<u64> = None;
        let outcome = self
            .ledgers
            .execute(&stream, |ledger, version| {
                if let Some(v) = ledger.decisions.get(&r.command_id) {
                    repeated = Some(*v);
                    return Ok::<_, Status>(vec![]);
                }
                let (policy, policy_version, change) = adopt(ledger, &r.competition, current)
                    .ok_or_else(|| {
                        Status::failed_precondition(format!(
                            "competition `{}` has no policy yet",
                            r.competition
                        ))
                    })?;
                let mut events = Vec::new();
                if let Some(change) = change {
                    events.push(new_event(&change, "service:quota", ""));
                }
                let now = now_ms();
                let mut d = decide(ledger, &policy, &r, now);
                d.id = uuid::Uuid::now_v7().to_string();
                d.policy_version = policy_version;
                // The state the decision saw: the ledger, and the policy it adopts first when it does.
                d.ledger_version = version + events.len() as u64;
                d.decided_at_ms = now;
                made = Some(d.clone());
                events.push(if d.granted {
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
                });
                Ok(events)
            })
            .await
            .map_err(|e| status::store("recording an admission", e))?;
        if let Outcome::Rejected(s) = outcome {
            return Err(s);
        }
        if let Some(version) = repeated {
            // A repeated command: the decision recorded for it the first time, read back from the ledger.
            let events = self
                .store
                .read_stream(&stream, version.saturating_sub(1))
                .await
                .map_err(|e| status::store("reading a recorded admission", e))?;
            made = events
                .first()
                .and_then(LedgerEvent::decode)
                .and_then(|e| e.decision().map(|(_, d)| d.clone()));
        }
        made.map(Response::new)
            .ok_or_else(|| status::internal("deciding an admission", "no decision"))
    }

    async fn usage(&self, req: Request<QuotaUsageRequest>) -> Result<Response<QuotaUsage>, Status> {
        nsml_common::bounds::check(&req)?;
        let caller = Caller::of(&req)?;
        caller.require_authenticated()?;
        let r = req.into_inner();
        let competition = if r.competition.is_empty() {
            let mine: std::collections::BTreeSet<String> = match &caller {
                Caller::User(id) => id
                    .memberships
                    .iter()
                    .map(|m| m.competition.clone())
                    .collect(),
                _ => Default::default(),
            };
            match mine.len() {
                1 => mine.into_iter().next().unwrap_or_default(),
                _ => {
                    return Err(Status::invalid_argument(
                        "name the competition: nsml quota COMPETITION",
                    ));
                }
            }
        } else {
            r.competition.clone()
        };
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
        let current = self.current_policy(&competition);
        let (ledger, _) = self
            .ledgers
            .load(&ledger_stream(&team))
            .await
            .map_err(|e| status::store("reading a ledger", e))?;
        let (policy, policy_version, _) = adopt(&ledger, &competition, current)
            .ok_or_else(|| Status::not_found(format!("competition `{competition}` not found")))?;
        let now = now_ms();
        let limits = ledger.limits(&competition, &policy, now);
        let storage = self
            .clients
            .storage
            .clone()
            .usage(UsageRequest { team: team.clone() })
            .await;
        let (storage_used_bytes, storage_known) = match storage {
            Ok(u) => (u.into_inner().checkpoint_bytes, true),
            Err(st) => {
                tracing::warn!(%st, team, "storage usage unavailable for `quota`");
                (0, false)
            }
        };
        let mut datasets = self
            .proj
            .read(|c| c.datasets.get(&competition).cloned())
            .unwrap_or_default();
        if datasets.is_empty() {
            datasets = ledger.submits.keys().cloned().collect();
        }
        Ok(Response::new(QuotaUsage {
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
            submits: datasets
                .iter()
                .map(|d| next_submit(&ledger, &policy, d, now))
                .collect(),
            policy_version,
            limit_gpus: limits.gpus,
            limit_cpus: limits.cpus,
            limit_memory_bytes: limits.memory_bytes,
            limit_sessions: limits.sessions,
            submit_interval_secs: policy.submit_interval_secs,
            limit_storage_bytes: policy.team_storage_bytes,
            storage_used_bytes,
            storage_known,
            submit_max_cpus: policy.submit_max_cpus,
            submit_time_limit_secs: policy.submit_time_limit_secs,
            overrides: ledger
                .overrides
                .values()
                .filter(|o| o.grant.competition == competition && o.in_force(now))
                .map(|o| o.view())
                .collect(),
            now_ms: now,
            policy: Some(policy),
            team,
            competition,
        }))
    }

    async fn grant_override(
        &self,
        req: Request<OverrideRequest>,
    ) -> Result<Response<Override>, Status> {
        nsml_common::bounds::check(&req)?;
        let caller = Caller::of(&req)?;
        caller.require_authenticated()?;
        let r = req.into_inner();
        if r.team.is_empty() {
            return Err(Status::invalid_argument("an override needs a team"));
        }
        if r.reason.trim().is_empty() {
            return Err(Status::invalid_argument(
                "an override needs a reason: it is recorded in the team's ledger",
            ));
        }
        let kind = r.kind();
        let now = now_ms();
        match kind {
            OverrideKind::ExtraSubmit if r.dataset.is_empty() => {
                return Err(Status::invalid_argument("an extra submit needs a dataset"));
            }
            OverrideKind::ReopenSubmit if r.submission_id.trim().is_empty() => {
                return Err(Status::invalid_argument(format!(
                    "re-opening a submit's slot needs the submission id: `nsml admin audit export --team {}` lists the team's submits",
                    r.team
                )));
            }
            OverrideKind::RaiseQuota => {
                let raise = r.raise.unwrap_or_default();
                if raise.gpus == 0
                    && raise.cpus == 0
                    && raise.memory_bytes == 0
                    && raise.sessions == 0
                {
                    return Err(Status::invalid_argument(
                        "a quota raise needs at least one new limit (GPUs, CPUs, memory or sessions)",
                    ));
                }
                if r.until_ms <= now {
                    return Err(Status::invalid_argument(format!(
                        "a quota raise needs an end in the future, not {}",
                        fmt_time(r.until_ms)
                    )));
                }
            }
            OverrideKind::Unspecified => {
                return Err(Status::invalid_argument(
                    "an override is an extra submit, a quota raise or a re-opened submit",
                ));
            }
            OverrideKind::ExtraSubmit | OverrideKind::ReopenSubmit => {}
        }
        let submission = r.submission_id.trim().to_string();
        // A re-opened submit's dataset is the submission's, as the team's ledger has it.
        let dataset = if kind == OverrideKind::ReopenSubmit {
            // Only hosts learn whether a team's submission exists.
            Self::hosted(&caller)?;
            let (ledger, _) = self
                .ledgers
                .load(&ledger_stream(&r.team))
                .await
                .map_err(|e| status::store("reading a ledger", e))?;
            let known = ledger.reopenable(&r.team, &submission);
            let failed = match known {
                Err(ReopenRefused::Unknown { .. }) => {
                    let events = self
                        .store
                        .read_stream(&ledger_stream(&r.team), 0)
                        .await
                        .map_err(|e| status::store("reading a ledger", e))?;
                    failed_submit(&events, &submission)
                }
                _ => None,
            };
            reopen_dataset(known, failed, &submission, &r.dataset)?
        } else {
            r.dataset.clone()
        };
        let per_dataset = kind != OverrideKind::RaiseQuota;
        let competition = self.proj.read(|c| {
            if !r.competition.is_empty() {
                return Ok(r.competition.clone());
            }
            if per_dataset {
                return c
                    .competition_of_dataset(&dataset)
                    .map(str::to_string)
                    .ok_or_else(|| Status::not_found(format!("dataset `{dataset}` not found")));
            }
            let entered = c.competitions_of.get(&r.team).cloned().unwrap_or_default();
            match entered.len() {
                1 => Ok(entered.into_iter().next().unwrap_or_default()),
                0 => Err(Status::not_found(format!(
                    "team `{}` is in no competition",
                    r.team
                ))),
                _ => Err(Status::invalid_argument(format!(
                    "team `{}` is in several competitions ({}): name one with --competition",
                    r.team,
                    entered.into_iter().collect::<Vec<_>>().join(", ")
                ))),
            }
        })?;
        caller.require_host_of(&competition)?;
        let known = self.proj.read(|c| {
            let team_in = c
                .competitions_of
                .get(&r.team)
                .is_some_and(|cs| cs.contains(&competition));
            let dataset_in = !per_dataset
                || c.datasets
                    .get(&competition)
                    .is_some_and(|ds| ds.contains(&dataset));
            (team_in, dataset_in)
        });
        match known {
            (false, _) => {
                return Err(Status::not_found(format!(
                    "team `{}` is not in competition `{competition}`",
                    r.team
                )));
            }
            (_, false) if kind == OverrideKind::ReopenSubmit => {
                return Err(Status::invalid_argument(format!(
                    "submission {submission} is a submit on dataset `{dataset}`, which is not in competition `{competition}`: leave out the competition to use the dataset's"
                )));
            }
            (_, false) => {
                return Err(Status::not_found(format!(
                    "dataset `{dataset}` is not in competition `{competition}`"
                )));
            }
            _ => {}
        }
        let command_id = if r.command_id.is_empty() {
            uuid::Uuid::now_v7().to_string()
        } else {
            r.command_id.clone()
        };
        let grant = Override {
            id: uuid::Uuid::now_v7().to_string(),
            competition,
            team: r.team.clone(),
            kind: kind as i32,
            dataset: if per_dataset {
                dataset.clone()
            } else {
                String::new()
            },
            submission_id: submission.clone(),
            raise: if kind == OverrideKind::RaiseQuota {
                r.raise
            } else {
                None
            },
            until_ms: if kind == OverrideKind::RaiseQuota {
                r.until_ms
            } else {
                0
            },
            reason: r.reason.trim().to_string(),
            granted_by: caller.actor(),
            granted_at_ms: now,
            command_id: command_id.clone(),
            used_by: String::new(),
            // Worded when shown, so the log keeps only the facts.
            description: String::new(),
        };
        let actor = caller.actor();
        let mut made = None;
        let outcome = self
            .ledgers
            .execute(&ledger_stream(&r.team), |l, _| {
                if let Some(o) = l.override_by_command(&command_id) {
                    made = Some(o.view());
                    return Ok::<_, Status>(vec![]);
                }
                // Checked again on the state the override is appended to: another host may have re-opened the
                // slot, or the submit may have failed (the ledger no longer knows it then), since.
                if kind == OverrideKind::ReopenSubmit {
                    reopen_dataset(
                        l.reopenable(&r.team, &submission),
                        Some(dataset.clone()),
                        &submission,
                        &dataset,
                    )?;
                }
                made = Some(grant.clone());
                Ok(vec![new_event(
                    &OverrideGranted {
                        grant: Some(grant.clone()),
                    },
                    &actor,
                    &command_id,
                )])
            })
            .await
            .map_err(|e| status::store("recording an override", e))?;
        if let Outcome::Rejected(s) = outcome {
            return Err(s);
        }
        made.map(|mut o| {
            o.description = crate::audit::describe_override(&o);
            Response::new(o)
        })
        .ok_or_else(|| status::internal("recording an override", "no override"))
    }

    async fn replay(&self, req: Request<ReplayRequest>) -> Result<Response<ReplayReport>, Status> {
        nsml_common::bounds::check(&req)?;
        let caller = Caller::of(&req)?;
        let hosted = Self::hosted(&caller)?;
        let r = req.into_inner();
        if !r.competition.is_empty() {
            caller.require_host_of(&r.competition)?;
        }
        let scope = Scope {
            competition: (!r.competition.is_empty()).then(|| r.competition.clone()),
            until_ms: (r.until_ms > 0).then_some(r.until_ms),
            hosted,
        };
        let started = Instant::now();
        let report = audit::replay(
            self.store.as_ref(),
            &scope,
            (!r.team.is_empty()).then_some(r.team.as_str()),
        )
        .await
        .map_err(|e| status::store("replaying the ledgers", e))?;
        Ok(Response::new(ReplayReport {
            ledgers: report.ledgers,
            events: report.events,
            decisions: report.decisions,
            matched: report.matched,
            mismatches: report
                .mismatches
                .into_iter()
                .map(|m| ReplayMismatch {
                    team: m.team,
                    position: m.position,
                    version: m.version,
                    decision_id: m.recorded.id.clone(),
                    session: m.request.session,
                    submission_id: m.request.submission_id,
                    recorded: Some(m.recorded),
                    replayed: Some(m.replayed),
                    differences: m.differences,
                })
                .collect(),
            elapsed_micros: started.elapsed().as_micros() as u64,
        }))
    }

    async fn explain(&self, req: Request<ExplainRequest>) -> Result<Response<Explanation>, Status> {
        nsml_common::bounds::check(&req)?;
        let caller = Caller::of(&req)?;
        Self::hosted(&caller)?;
        let id = req.into_inner().id.trim().to_string();
        if id.is_empty() {
            return Err(Status::invalid_argument(
                "explain needs a session name, a submission id or a decision id",
            ));
        }
        let teams: Vec<String> = match SessionName::parse(&id) {
            Ok(name) => vec![name.team],
            Err(_) => self.proj.read(|c| match c.recorded_in.get(&id) {
                Some(team) => vec![team.clone()],
                None => c.ledgers.iter().cloned().collect(),
            }),
        };
        for team in teams {
            let events = self
                .store
                .read_stream(&ledger_stream(&team), 0)
                .await
                .map_err(|e| status::store("reading a ledger", e))?;
            let Some(at) = audit::find_decision(&events, &id) else {
                continue;
            };
            let x = audit::explain(&team, &events, at)
                .ok_or_else(|| status::internal("explaining a decision", "undecodable decision"))?;
            let competition = x
                .request
                .as_ref()
                .map(|r| r.competition.clone())
                .unwrap_or_default();
            caller.require_host_of(&competition)?;
            return Ok(Response::new(x));
        }
        Err(Status::not_found(format!(
            "no admission decision recorded for `{id}`: give a session name (TEAM/DATASET/N), a submission id or a decision id"
        )))
    }

    async fn verify(&self, req: Request<VerifyRequest>) -> Result<Response<VerifyReport>, Status> {
        nsml_common::bounds::check(&req)?;
        let caller = Caller::of(&req)?;
        Self::hosted(&caller)?;
        let events = self
            .store
            .head_position()
            .await
            .map_err(|e| status::store("reading the log head", e))?;
        let found = self
            .store
            .verify_chain()
            .await
            .map_err(|e| status::store("verifying the log", e))?;
        Ok(Response::new(match found {
            None => VerifyReport {
                intact: true,
                events,
                ..Default::default()
            },
            Some(b) => VerifyReport {
                intact: false,
                events,
                position: b.position,
                stream: b.stream.clone(),
                version: b.version,
                event_id: b.event_id.clone(),
                kind: match b.kind {
                    ChainBreakKind::HashMismatch => "edited",
                    ChainBreakKind::PositionGap => "deleted",
                    ChainBreakKind::VersionGap => "version_gap",
                    ChainBreakKind::BrokenLink => "inserted_or_reordered",
                }
                .into(),
                message: b.to_string(),
            },
        }))
    }

    async fn export(
        &self,
        req: Request<ExportRequest>,
    ) -> Result<Response<ExportResponse>, Status> {
        nsml_common::bounds::check(&req)?;
        let caller = Caller::of(&req)?;
        Self::hosted(&caller)?;
        let team = req.into_inner().team;
        if team.is_empty() {
            return Err(Status::invalid_argument("export needs a team"));
        }
        let events = self
            .store
            .read_stream(&ledger_stream(&team), 0)
            .await
            .map_err(|e| status::store("reading a ledger", e))?;
        if events.is_empty() {
            return Err(Status::not_found(format!("team `{team}` has no ledger")));
        }
        let (ledger, _) = self
            .ledgers
            .load(&ledger_stream(&team))
            .await
            .map_err(|e| status::store("reading a ledger", e))?;
        let mut competitions: std::collections::BTreeSet<String> =
            ledger.policies.keys().cloned().collect();
        competitions.extend(
            self.proj
                .read(|c| c.competitions_of.get(&team).cloned())
                .unwrap_or_default(),
        );
        for c in &competitions {
            caller.require_host_of(c)?;
        }
        Ok(Response::new(ExportResponse {
            lines: events
                .iter()
                .map(|e| audit::event_json(e).to_string())
                .collect(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;
    use crate::synthetic::{Script, seed_policy};

    #[tokio::test(start_paused = true)]
    async fn an_admission_waits_until_the_outcomes_the_caller_saw_are_recorded() {
        let recorded = Arc::new(watch::Sender::new(7));
        // Already there: no wait.
        caught_up(&recorded, 7, CATCH_UP).await.unwrap();
        let wait = tokio::spawn({
            let recorded = recorded.clone();
            async move { caught_up(&recorded, 12, CATCH_UP).await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !wait.is_finished(),
            "decided before position 12 was recorded"
        );
        recorded.send_replace(11);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !wait.is_finished(),
            "decided before position 12 was recorded"
        );
        recorded.send_replace(13);
        wait.await.unwrap().unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn an_admission_whose_position_is_not_recorded_in_time_is_unavailable() {
        let recorded = watch::Sender::new(3);
        let st = caught_up(&recorded, 9, CATCH_UP).await.unwrap_err();
        assert_eq!(st.code(), Code::Unavailable);
        assert_eq!(
            st.message(),
            "the quota ledgers have recorded outcomes up to log position 3, not yet 9 as the caller has seen; retry in a few seconds"
        );
    }

    /// A ledger with a submit in flight, one succeeded, one failed and one already re-opened, on `t1-cls`.
    fn script() -> (Script, [String; 4]) {
        let mut s = Script::new("demo");
        let (ok, _) = s.at(0).submit("t1-cls");
        s.at(60_000).end(&ok, true);
        let (bad, _) = s.at(2 * 3_600_000).submit("t1-cls");
        s.at(2 * 3_600_000 + 60_000).end(&bad, false);
        let (again, _) = s.at(3 * 3_600_000).submit("t1-cls");
        s.reopen(&again);
        let (running, granted) = s.at(3 * 3_600_000 + 60_000).submit("t1-cls");
        assert!(granted);
        (s, [running, ok, bad, again])
    }

    #[test]
    fn a_slot_is_reopened_only_for_a_submit_in_flight_or_succeeded() {
        let (s, [running, ok, bad, again]) = script();
        let (l, events) = (s.ledger(), s.events());
        // As the service checks a request: the ledger first, the log when the ledger does not know the submit.
        let check = |sub: &str, dataset: &str| {
            let known = l.reopenable("demo", sub);
            let failed = match known {
                Err(ReopenRefused::Unknown { .. }) => failed_submit(events, sub),
                _ => None,
            };
            reopen_dataset(known, failed, sub, dataset)
        };
        assert_eq!(check(&running, "").unwrap(), "t1-cls");
        assert_eq!(check(&ok, "t1-cls").unwrap(), "t1-cls");

        let failed = check(&bad, "").unwrap_err();
        assert_eq!(failed.code(), Code::FailedPrecondition);
        assert!(
            failed.message().contains(&format!(
                "submission {bad} on `t1-cls` failed or timed out: failed submits never count"
            )),
            "{}",
            failed.message()
        );
        let twice = check(&again, "").unwrap_err();
        assert_eq!(twice.code(), Code::FailedPrecondition);
        assert!(
            twice
                .message()
                .contains("was already re-opened by override ovr-"),
            "{}",
            twice.message()
        );
        let unknown = check("sub-999", "").unwrap_err();
        assert_eq!(unknown.code(), Code::NotFound);
        assert!(
            unknown
                .message()
                .contains("`nsml admin audit export --team demo` lists the team's submits"),
            "{}",
            unknown.message()
        );
        let elsewhere = check(&ok, "t2-reg").unwrap_err();
        assert_eq!(elsewhere.code(), Code::InvalidArgument);
        assert!(
            elsewhere
                .message()
                .contains("is a submit on dataset `t1-cls`, not `t2-reg`"),
            "{}",
            elsewhere.message()
        );
        // A submit that failed while the override was being recorded is refused as failed.
        let raced = reopen_dataset(
            l.reopenable("demo", &bad),
            Some("t1-cls".into()),
            &bad,
            "t1-cls",
        )
        .unwrap_err();
        assert_eq!(raced.code(), Code::FailedPrecondition);
    }

    #[test]
    fn quota_names_the_reopened_submits() {
        let mut s = Script::new("demo");
        let (stuck, _) = s.at(0).submit("t1-cls");
        s.at(60_000).reopen(&stuck);
        let now = Script::time(120_000);
        let st = next_submit(s.ledger(), &seed_policy(), "t1-cls", now);
        assert!(!st.in_flight, "{st:?}");
        assert_eq!(st.reopened_submission_ids, vec![stuck.clone()]);
        assert!(
            st.why.starts_with("now: no successful real submit yet")
                && st.why.contains(&format!(
                    "not counted, as a host re-opened their slot: submission {stuck} (in flight, override ovr-"
                )),
            "{}",
            st.why
        );

        // Re-opened after it succeeded: no interval, and still named while its own interval runs.
        s.at(30 * 60_000).end(&stuck, true);
        let st = next_submit(
            s.ledger(),
            &seed_policy(),
            "t1-cls",
            Script::time(40 * 60_000),
        );
        assert_eq!((st.next_allowed_ms, st.last_success_ms), (0, 0));
        assert!(
            st.why.starts_with("now: no successful real submit counts")
                && st
                    .why
                    .contains(&format!("submission {stuck} (succeeded, override ovr-")),
            "{}",
            st.why
        );
    }
}
