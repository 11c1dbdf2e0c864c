//! Command handling: load the team's ledger, decide with the rules of `domain`, append what they decided with
//! the expected version; and the reads the API serves (usage, the audit), loaded here and worded in `domain`.
//!
//! Every fact a decision depends on is in the team's ledger. What it depends on from outside (the
//! competition's current policy, the catalog of teams and datasets, storage's usage) is read first and passed
//! to the rules.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use nsml_common::aggregate::{Aggregates, Outcome};
use nsml_common::clients::Clients;
use nsml_common::event::new_event;
use nsml_common::names::SessionName;
use nsml_common::now_ms;
use nsml_common::projection::Projection;
use nsml_eventstore::{ChainBreak, EventStore, NewEvent};
use nsml_proto::v1::{
    AdmissionDenied, AdmitRequest, Decision, Explanation, Holding, Override, OverrideGranted,
    OverrideKind, OverrideRequest, Policy, QuotaUsage, ResourcesGranted, SessionKind, Submission,
    UsageRequest,
};
use tokio::sync::watch;

use crate::audit;
use crate::domain::{
    Granting, Ledger, LedgerEvent, Placement, SessionEnd, SubmitOutcome, adopt, check_placement,
    check_round, decide, failed_submit, ledger_stream, new_override, next_submit, on_schedule,
    override_competition, release, reopen_dataset, submit_outcome,
};
use crate::error::QuotaError;
use crate::projection::Catalog;
use crate::replay::{Report, Scope};

/// Who records the outside facts in a ledger.
pub(crate) const SERVICE_ACTOR: &str = "service:quota";

/// The quota service's state and command handlers, shared by every call and the reactor.
pub struct Quota {
    ledgers: Aggregates<Ledger>,
    proj: Arc<Projection<Catalog>>,
    store: Arc<dyn EventStore>,
    clients: Clients,
    /// The log position up to which the reactor has recorded every outside fact (sessions ended, submits'
    /// outcomes) in the ledgers.
    recorded: watch::Sender<u64>,
}

/// What an admission's decision step found: a decision taken now, or the ledger version of the one recorded
/// for the same command before.
pub(crate) enum Admission {
    Made(Decision),
    Repeated(u64),
}

/// A team's ledger as JSON lines, and the competitions whose hosts may read it.
pub struct Export {
    pub lines: Vec<String>,
    pub competitions: BTreeSet<String>,
}

impl Quota {
    /// Builds the handlers over a running catalog projection.
    pub fn new(
        store: Arc<dyn EventStore>,
        proj: Arc<Projection<Catalog>>,
        clients: Clients,
    ) -> Self {
        Self {
            ledgers: Aggregates::new(store.clone()),
            proj,
            store,
            clients,
            recorded: watch::Sender::new(0),
        }
    }

    /// Notes that the reactor has recorded every fact up to log position `position`.
    pub fn recorded_up_to(&self, position: u64) {
        self.recorded.send_if_modified(|at| {
            let later = position > *at;
            if later {
                *at = position;
            }
            later
        });
    }

    /// What a live view follows: the log position applied, and when it stops.
    pub fn live(
        &self,
    ) -> (
        tokio::sync::watch::Receiver<u64>,
        tokio_util::sync::CancellationToken,
    ) {
        self.proj.live()
    }

    /// Waits until the ledgers record every outside fact up to log position `seen` (see [`caught_up`]).
    pub async fn catch_up(&self, seen: u64, bound: Duration) -> Result<(), QuotaError> {
        caught_up(&self.recorded, seen, bound).await
    }

    /// Appends to a team's ledger what `pending` says is still due (idempotent facts).
    async fn record(
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

    /// Records that `session` of `team` ended so at `at_ms`, releasing what it held if it gives that back.
    pub async fn record_end(
        &self,
        team: &str,
        session: &str,
        end: SessionEnd,
        at_ms: i64,
    ) -> Result<(), nsml_eventstore::StoreError> {
        self.record(team, |l| {
            release(l, session, end, at_ms).map(|e| new_event(&e, SERVICE_ACTOR, ""))
        })
        .await
    }

    /// Records a real submit's outcome, if its ledger has it in flight.
    pub async fn record_outcome(
        &self,
        sub: &Submission,
        succeeded: bool,
    ) -> Result<(), nsml_eventstore::StoreError> {
        self.record(&sub.team, |l| {
            submit_outcome(l, sub, succeeded).map(|o| match o {
                SubmitOutcome::Succeeded(e) => new_event(&e, SERVICE_ACTOR, ""),
                SubmitOutcome::Ended(e) => new_event(&e, SERVICE_ACTOR, ""),
            })
        })
        .await
    }

    /// The competition's policy as the log has it now, with its version.
    fn current_policy(&self, competition: &str) -> Option<(Policy, u64)> {
        self.proj.read(|p| p.policies.get(competition).cloned())
    }

    /// Decides an admission on the team's ledger and records it (with the newer policy the ledger adopts
    /// first); a repeated command gets the decision recorded for it the first time.
    pub async fn admit(&self, r: &AdmitRequest, actor: &str) -> Result<Decision, QuotaError> {
        let current = self.current_policy(&r.competition);
        let stream = ledger_stream(&r.team);
        let mut found = None;
        let outcome = self
            .ledgers
            .execute(&stream, |ledger, version| {
                let current = current.as_ref().map(|(p, v)| (p, *v));
                let (admission, events) = admission(ledger, version, r, current, actor)?;
                found = Some(admission);
                Ok::<_, QuotaError>(events)
            })
            .await
            .map_err(QuotaError::store("recording an admission"))?;
        if let Outcome::Rejected(e) = outcome {
            return Err(e);
        }
        match found {
            Some(Admission::Made(d)) => {
                count_admission(r, &d);
                Ok(d)
            }
            Some(Admission::Repeated(version)) => self.recorded_decision(&stream, version).await,
            None => Err(QuotaError::Internal {
                context: "deciding an admission",
                detail: "no decision",
            }),
        }
    }

    /// The decision recorded at `version` of a ledger, read back.
    async fn recorded_decision(&self, stream: &str, version: u64) -> Result<Decision, QuotaError> {
        let events = self
            .store
            .read_stream(stream, version.saturating_sub(1))
            .await
            .map_err(QuotaError::store("reading a recorded admission"))?;
        events
            .first()
            .and_then(LedgerEvent::decode)
            .and_then(|e| e.decision().map(|(_, d)| d.clone()))
            .ok_or(QuotaError::Internal {
                context: "deciding an admission",
                detail: "no decision",
            })
    }

    /// A team's quota in a competition: the limits in force, what it holds, when its next submits are
    /// allowed, its overrides in force, and its checkpoints' storage as the storage service counts it.
    pub async fn usage(&self, team: String, competition: String) -> Result<QuotaUsage, QuotaError> {
        let current = self.current_policy(&competition);
        let (ledger, _) = self
            .ledgers
            .load(&ledger_stream(&team))
            .await
            .map_err(QuotaError::store("reading a ledger"))?;
        let (policy, policy_version, _) = adopt(
            &ledger,
            &competition,
            current.as_ref().map(|(p, v)| (p, *v)),
        )
        .ok_or_else(|| QuotaError::CompetitionNotFound {
            competition: competition.clone(),
        })?;
        let (storage_used_bytes, storage_known) = self.storage_used(&team).await;
        let mut datasets = self
            .proj
            .read(|c| c.datasets.get(&competition).cloned())
            .unwrap_or_default();
        if datasets.is_empty() {
            datasets = ledger.submits.keys().cloned().collect();
        }
        let now = now_ms();
        let limits = ledger.limits(&competition, &policy, now);
        Ok(QuotaUsage {
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
                .map(|d| {
                    let state = next_submit(&ledger, &policy, d, now);
                    on_schedule(state, &ledger, &policy, &competition, now)
                })
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
        })
    }

    /// The bytes of the team's checkpoints as storage counts them, and whether storage answered.
    async fn storage_used(&self, team: &str) -> (u64, bool) {
        let storage = self
            .clients
            .storage
            .clone()
            .usage(UsageRequest {
                team: team.to_string(),
            })
            .await;
        match storage {
            Ok(u) => (u.into_inner().checkpoint_bytes, true),
            Err(st) => {
                tracing::warn!(%st, team, "storage usage unavailable for `quota`");
                (0, false)
            }
        }
    }

    /// The dataset of the submit whose slot a host asks to re-open, as the team's ledger has it; when the
    /// ledger does not know the submit, the log says whether it failed.
    pub async fn reopen_target(
        &self,
        team: &str,
        submission: &str,
        dataset: &str,
    ) -> Result<String, QuotaError> {
        let stream = ledger_stream(team);
        let (ledger, _) = self
            .ledgers
            .load(&stream)
            .await
            .map_err(QuotaError::store("reading a ledger"))?;
        let known = ledger.reopenable(team, submission);
        let failed = match known {
            Err(crate::domain::ReopenRefused::Unknown { .. }) => {
                let events = self
                    .store
                    .read_stream(&stream, 0)
                    .await
                    .map_err(QuotaError::store("reading a ledger"))?;
                failed_submit(&events, submission)
            }
            _ => None,
        };
        Ok(reopen_dataset(known, failed, submission, dataset)?)
    }

    /// The competition an override falls under, as the catalog places it.
    pub fn override_competition(
        &self,
        r: &OverrideRequest,
        dataset: &str,
    ) -> Result<String, QuotaError> {
        let kind = r.kind();
        Ok(self.proj.read(|c| {
            override_competition(
                kind,
                &r.team,
                dataset,
                Placement {
                    requested: &r.competition,
                    dataset_competition: c.competition_of_dataset(dataset),
                    entered: c.competitions_of.get(&r.team),
                },
            )
        })?)
    }

    /// Checks that the catalog has the override's team, and for a per-dataset one its dataset, in
    /// `competition`.
    fn check_placed(
        &self,
        r: &OverrideRequest,
        competition: &str,
        dataset: &str,
    ) -> Result<(), QuotaError> {
        let placed = self.proj.read(|c| {
            let team_in = c
                .competitions_of
                .get(&r.team)
                .is_some_and(|cs| cs.contains(competition));
            let dataset_in = c
                .datasets
                .get(competition)
                .is_some_and(|ds| ds.iter().any(|d| d == dataset));
            (team_in, dataset_in)
        });
        let submission = r.submission_id.trim();
        Ok(check_placement(
            r.kind(),
            &r.team,
            submission,
            dataset,
            competition,
            placed,
        )?)
    }

    /// Grants a host's override in `competition` and records it in the team's ledger; a repeated command
    /// gets the override recorded for it the first time.
    pub async fn grant_override(
        &self,
        r: &OverrideRequest,
        competition: String,
        dataset: String,
        actor: String,
    ) -> Result<Override, QuotaError> {
        let kind = r.kind();
        let submission = r.submission_id.trim().to_string();
        self.check_placed(r, &competition, &dataset)?;
        let policy = self.current_policy(&competition);
        check_round(
            kind,
            r.round.trim(),
            &competition,
            policy.as_ref().map(|(p, _)| p),
        )?;
        let command_id = if r.command_id.is_empty() {
            uuid::Uuid::now_v7().to_string()
        } else {
            r.command_id.clone()
        };
        let grant = new_override(
            r,
            competition,
            &dataset,
            &submission,
            Granting {
                id: uuid::Uuid::now_v7().to_string(),
                command_id: command_id.clone(),
                granted_by: actor.clone(),
                granted_at_ms: now_ms(),
            },
        );
        let mut made = None;
        let outcome = self
            .ledgers
            .execute(&ledger_stream(&r.team), |l, _| {
                if let Some(o) = l.override_by_command(&command_id) {
                    made = Some(o.view());
                    return Ok::<_, QuotaError>(vec![]);
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
            .map_err(QuotaError::store("recording an override"))?;
        if let Outcome::Rejected(e) = outcome {
            return Err(e);
        }
        made.map(|mut o| {
            o.description = crate::domain::describe_override(&o);
            o
        })
        .ok_or(QuotaError::Internal {
            context: "recording an override",
            detail: "no override",
        })
    }

    /// Replays `team`'s ledger, or every ledger in scope.
    pub async fn replay(&self, scope: &Scope, team: Option<&str>) -> Result<Report, QuotaError> {
        audit::replay(self.store.as_ref(), scope, team)
            .await
            .map_err(QuotaError::store("replaying the ledgers"))
    }

    /// Explains the decision recorded for `id` (a session name, a submission id or a decision id).
    pub async fn explain(&self, id: &str) -> Result<Explanation, QuotaError> {
        let teams: Vec<String> = match SessionName::parse(id) {
            Ok(name) => vec![name.team],
            // The ledger the index names first; the others only if it does not hold the decision (an id the
            // index does not know, or one whose fingerprint another id shares).
            Err(_) => self.proj.read(|c| {
                let first = c.recorded_in.get(id);
                first
                    .map(str::to_string)
                    .into_iter()
                    .chain(
                        c.ledgers
                            .iter()
                            .filter(|t| Some(t.as_str()) != first)
                            .cloned(),
                    )
                    .collect()
            }),
        };
        for team in teams {
            let events = self
                .store
                .read_stream(&ledger_stream(&team), 0)
                .await
                .map_err(QuotaError::store("reading a ledger"))?;
            let Some(at) = audit::find_decision(&events, id) else {
                continue;
            };
            return audit::explain(&team, &events, at).ok_or(QuotaError::Internal {
                context: "explaining a decision",
                detail: "undecodable decision",
            });
        }
        Err(QuotaError::NoDecision { id: id.to_string() })
    }

    /// The number of events in the log, and the first break of its hash chain, if any.
    pub async fn verify(&self) -> Result<(u64, Option<ChainBreak>), QuotaError> {
        let events = self
            .store
            .head_position()
            .await
            .map_err(QuotaError::store("reading the log head"))?;
        let found = self
            .store
            .verify_chain()
            .await
            .map_err(QuotaError::store("verifying the log"))?;
        Ok((events, found))
    }

    /// A team's ledger as JSON lines, with the competitions it concerns.
    pub async fn export(&self, team: &str) -> Result<Export, QuotaError> {
        let stream = ledger_stream(team);
        let events = self
            .store
            .read_stream(&stream, 0)
            .await
            .map_err(QuotaError::store("reading a ledger"))?;
        if events.is_empty() {
            return Err(QuotaError::NoLedger {
                team: team.to_string(),
            });
        }
        let (ledger, _) = self
            .ledgers
            .load(&stream)
            .await
            .map_err(QuotaError::store("reading a ledger"))?;
        let mut competitions: BTreeSet<String> = ledger.policies.keys().cloned().collect();
        competitions.extend(
            self.proj
                .read(|c| c.competitions_of.get(team).cloned())
                .unwrap_or_default(),
        );
        Ok(Export {
            lines: events
                .iter()
                .map(|e| audit::event_json(e).to_string())
                .collect(),
            competitions,
        })
    }
}

/// Counts a decision taken (`nsml_admissions_total`) by the kind of session, its outcome and the rule that
/// refused it (empty when granted).
fn count_admission(r: &AdmitRequest, d: &Decision) {
    let kind = match r.kind() {
        SessionKind::Train => "train",
        SessionKind::TrialSubmit => "trial_submit",
        SessionKind::Submit => "submit",
        SessionKind::Unspecified => "unspecified",
    };
    let outcome = if d.granted { "granted" } else { "refused" };
    metrics::counter!(
        "nsml_admissions_total",
        "kind" => kind,
        "outcome" => outcome,
        "rule" => d.rule.clone()
    )
    .increment(1);
}

/// The decision step of an admission on the ledger at `version`: the decision recorded for the command
/// before, or a new one, with the events to append (the policy the ledger adopts first, then the decision).
pub(crate) fn admission(
    ledger: &Ledger,
    version: u64,
    r: &AdmitRequest,
    current: Option<(&Policy, u64)>,
    actor: &str,
) -> Result<(Admission, Vec<NewEvent>), QuotaError> {
    if let Some(v) = ledger.decisions.get(&r.command_id) {
        return Ok((Admission::Repeated(*v), vec![]));
    }
    let (policy, policy_version, change) =
        adopt(ledger, &r.competition, current).ok_or_else(|| QuotaError::NoPolicy {
            competition: r.competition.clone(),
        })?;
    let mut events = Vec::new();
    if let Some(change) = change {
        events.push(new_event(&change, SERVICE_ACTOR, ""));
    }
    let now = now_ms();
    let mut d = decide(ledger, &policy, r, now);
    d.id = uuid::Uuid::now_v7().to_string();
    d.policy_version = policy_version;
    // The state the decision saw: the ledger, and the policy it adopts first when it does.
    d.ledger_version = version + events.len() as u64;
    d.decided_at_ms = now;
    let request = Some(r.clone());
    events.push(if d.granted {
        new_event(
            &ResourcesGranted {
                request,
                decision: Some(d.clone()),
            },
            actor,
            &r.command_id,
        )
    } else {
        new_event(
            &AdmissionDenied {
                request,
                decision: Some(d.clone()),
            },
            actor,
            &r.command_id,
        )
    });
    Ok((Admission::Made(d), events))
}

/// Waits until the ledgers record every outside fact up to log position `seen`, as `recorded` tells: what the
/// caller saw of the log (a submit scored, a session ended) is then what the decision sees. Unavailable when
/// the reactor does not get there within `bound`, rather than a decision on a ledger the caller knows is stale.
async fn caught_up(
    recorded: &watch::Sender<u64>,
    seen: u64,
    bound: Duration,
) -> Result<(), QuotaError> {
    let mut rx = recorded.subscribe();
    match tokio::time::timeout(bound, rx.wait_for(|at| *at >= seen)).await {
        Ok(Ok(_)) => Ok(()),
        // `recorded` is borrowed, so its sender outlives the wait and the channel cannot close under it.
        Ok(Err(_)) => Err(QuotaError::ShuttingDown),
        Err(_) => {
            let at = *recorded.borrow();
            tracing::warn!(
                seen,
                at,
                "the quota reactor is behind the caller's log position"
            );
            Err(QuotaError::Behind { at, seen })
        }
    }
}
#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tonic::{Code, Status};

    use super::*;
    use crate::domain::ReopenRefused;
    use crate::synthetic::{Script, seed_policy};

    const CATCH_UP: Duration = Duration::from_secs(10);

    /// The status a caller gets for a refusal to re-open a slot.
    fn status(refused: ReopenRefused) -> Status {
        QuotaError::from(refused).into()
    }

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
        let st = Status::from(caught_up(&recorded, 9, CATCH_UP).await.unwrap_err());
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
            reopen_dataset(known, failed, sub, dataset).map_err(status)
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
        let raced = status(
            reopen_dataset(
                l.reopenable("demo", &bad),
                Some("t1-cls".into()),
                &bad,
                "t1-cls",
            )
            .unwrap_err(),
        );
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
