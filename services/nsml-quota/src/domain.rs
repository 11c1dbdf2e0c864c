//! The team ledger and the pure admission rule: `decide(ledger, policy, request, now) -> Decision`.
//!
//! Everything a decision depends on is ledger state: the resources sessions hold, the submit history per
//! dataset, the competition policy the ledger adopted (`PolicyChanged`) and the hosts' overrides
//! (`OverrideGranted`). So folding one `quota-TEAM` stream alone re-derives every decision recorded in it.
//!
//! A host's override applies from its ledger version on: the decisions recorded before it saw a ledger without
//! it, and replay re-derives them so.

use std::collections::BTreeMap;

use nsml_common::aggregate::Aggregate;
use nsml_common::event::decode;
use nsml_eventstore::StoredEvent;
use nsml_proto::v1::{
    AdmissionDenied, AdmitRequest, Decision, EventPayload, Override, OverrideGranted, OverrideKind,
    Policy, PolicyChanged, Resources, ResourcesGranted, ResourcesReleased, SessionKind,
    SubmitEnded, SubmitSucceeded,
};

use crate::idmap::IdMap;

/// Every team ledger's stream name starts with this.
pub const LEDGER_PREFIX: &str = "quota-";

/// The ledger stream of a team.
pub fn ledger_stream(team: &str) -> String {
    format!("{LEDGER_PREFIX}{team}")
}

/// Resources summed in types twice as wide as a request's fields: a sum of fewer than 2^32 holdings of any
/// size cannot wrap, and the sums saturate beyond that, which still exceeds every limit a policy can set. So a
/// comparison of a wide sum with a limit is exact, where a sum in the request's own types could wrap below the
/// limit and grant what it must refuse.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Wide {
    pub gpus: u64,
    pub cpus: u64,
    pub memory_bytes: u128,
    pub shm_bytes: u128,
}

impl Wide {
    /// The resources of one request, widened.
    pub fn of(r: &Resources) -> Self {
        Self::default().plus(r)
    }

    /// This sum with `r` added.
    pub fn plus(self, r: &Resources) -> Self {
        Self {
            gpus: self.gpus.saturating_add(r.gpus.into()),
            cpus: self.cpus.saturating_add(r.cpus.into()),
            memory_bytes: self.memory_bytes.saturating_add(r.memory_bytes.into()),
            shm_bytes: self.shm_bytes.saturating_add(r.shm_bytes.into()),
        }
    }

    /// Memory including shared memory, which the memory limit counts together.
    pub fn memory_with_shm(&self) -> u128 {
        self.memory_bytes.saturating_add(self.shm_bytes)
    }
}

/// Memory including shared memory of one request, exact.
fn memory_with_shm(r: &Resources) -> u128 {
    u128::from(r.memory_bytes) + u128::from(r.shm_bytes)
}

/// A policy's submit interval in milliseconds; an interval too long to count in milliseconds is as long as
/// the clock can count, so it never passes, rather than wrapping into one that already has.
pub fn interval_ms(policy: &Policy) -> i64 {
    i64::try_from(policy.submit_interval_secs)
        .ok()
        .and_then(|s| s.checked_mul(1000))
        .unwrap_or(i64::MAX)
}

/// Resources held by one session.
#[derive(Debug, Clone, PartialEq)]
pub struct Holding {
    pub resources: Resources,
    pub kind: SessionKind,
    pub dataset: String,
    pub submission_id: String,
    /// Ledger version of the grant.
    pub since: u64,
}

/// Where a successful real submit sits in its dataset's history: when it was submitted, then the ledger version
/// that recorded its success (so of two submitted in the same millisecond, the later recorded is the last).
pub type SuccessKey = (i64, u64);

/// Submit history of one dataset.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SubmitState {
    /// Successful real submits whose slot no host re-opened, in key order. The last one starts the interval;
    /// the earlier ones are kept because re-opening the last makes the one before it the last. A vector, as
    /// successes come in submit order but for rare exceptions: replay appends, and reads the last, in O(1).
    pub successes: Vec<(SuccessKey, String)>,
    /// Real submits admitted and not yet ended → ledger version of their grant. Re-opened ones stay here until
    /// they end, as their outcome is still recorded; they do not count as in flight for a decision.
    pub in_flight: BTreeMap<String, u64>,
    /// Submits in flight whose slot a host re-opened → the override.
    pub reopened_in_flight: BTreeMap<String, String>,
    /// Successes whose slot a host re-opened (after they succeeded, or while they ran) → (submission, override).
    pub reopened_successes: BTreeMap<SuccessKey, (String, String)>,
}

/// The successful real submit that starts a dataset's interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LastSuccess<'a> {
    pub submission_id: &'a str,
    /// When it was submitted.
    pub at_ms: i64,
    /// Ledger version of its `SubmitSucceeded`.
    pub version: u64,
}

impl SubmitState {
    /// The last successful real submit whose slot no host re-opened.
    pub fn last_success(&self) -> Option<LastSuccess<'_>> {
        self.successes
            .last()
            .map(|((at_ms, version), sub)| LastSuccess {
                submission_id: sub,
                at_ms: *at_ms,
                version: *version,
            })
    }

    /// Records a success in key order.
    fn add_success(&mut self, key: SuccessKey, submission: String) {
        match self.successes.last() {
            Some((last, _)) if *last > key => {
                let at = self.successes.partition_point(|(k, _)| *k < key);
                self.successes.insert(at, (key, submission));
            }
            _ => self.successes.push((key, submission)),
        }
    }

    /// Takes `submission` out of the successes. Searched from the newest: the success a host re-opens is
    /// most often a recent one.
    fn take_success(&mut self, submission: &str) -> Option<SuccessKey> {
        let at = self.successes.iter().rposition(|(_, s)| s == submission)?;
        Some(self.successes.remove(at).0)
    }

    /// The override that re-opened the slot of `submission`, a success, if one did.
    fn reopened_success_by(&self, submission: &str) -> Option<&str> {
        self.reopened_successes
            .values()
            .find(|(s, _)| s == submission)
            .map(|(_, id)| id.as_str())
    }

    /// The submits in flight that count against the one-in-flight rule (those whose slot no host re-opened),
    /// with the ledger version of their grant.
    pub fn counted_in_flight(&self) -> impl Iterator<Item = (&String, &u64)> {
        self.in_flight
            .iter()
            .filter(|(sub, _)| !self.reopened_in_flight.contains_key(*sub))
    }

    /// The re-opened successes that would start a later interval than the last success does, and whose
    /// interval of `interval_ms` has not passed at `now_ms`: those whose re-opening spares a submit the wait.
    /// Each with (submitted at, submission, override), oldest first.
    pub fn reopened_in_interval(
        &self,
        interval_ms: i64,
        now_ms: i64,
    ) -> impl Iterator<Item = (i64, &str, &str)> {
        use std::ops::Bound;
        let from = match self.successes.last() {
            Some((k, _)) => Bound::Excluded(*k),
            None => Bound::Unbounded,
        };
        self.reopened_successes
            .range((from, Bound::Unbounded))
            .filter(move |((at, _), _)| at.saturating_add(interval_ms) > now_ms)
            .map(|((at, _), (sub, id))| (*at, sub.as_str(), id.as_str()))
    }
}

/// Why a host cannot re-open a submit's slot.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ReopenRefused {
    #[error(
        "team `{team}` has no admitted real submit `{submission}` (refused and trial submits take no slot): `nsml admin audit export --team {team}` lists the team's submits"
    )]
    Unknown { team: String, submission: String },
    #[error(
        "submission {submission} on `{dataset}` failed or timed out: failed submits never count against the submit limits, so there is no slot to re-open; to let the team submit before the interval ends, grant an extra submit (`nsml admin override submit`)"
    )]
    Failed { submission: String, dataset: String },
    #[error(
        "the slot of submission {submission} on `{dataset}` was already re-opened by override {by}: `nsml admin audit export --team {team}` shows it"
    )]
    AlreadyReopened {
        team: String,
        submission: String,
        dataset: String,
        by: String,
    },
}

/// A competition policy as the ledger adopted it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdoptedPolicy {
    pub policy: Policy,
    pub version: u64,
    /// Ledger version of the `PolicyChanged` event.
    pub since: u64,
}

/// A host's override and what became of it.
#[derive(Debug, Clone, PartialEq)]
pub struct OverrideState {
    pub grant: Override,
    /// Ledger version of the `OverrideGranted` event.
    pub since: u64,
    /// Extra submit: the admitted real submit using it (given back if that submit fails).
    pub used_by: Option<String>,
    /// Extra submit: used by a submit that succeeded.
    pub spent: bool,
}

impl OverrideState {
    /// The override with its use filled in, as the API shows it.
    pub fn view(&self) -> Override {
        let mut o = self.grant.clone();
        o.used_by = self.used_by.clone().unwrap_or_default();
        o.description = crate::audit::describe_override(&o);
        o
    }

    /// Whether it is an extra submit on `dataset` that no submit holds or spent.
    fn extra_available(&self, dataset: &str) -> bool {
        self.grant.kind() == OverrideKind::ExtraSubmit
            && self.grant.dataset == dataset
            && self.used_by.is_none()
            && !self.spent
    }

    /// Whether it raises limits of `competition` at `now_ms`.
    pub fn raises(&self, competition: &str, now_ms: i64) -> bool {
        self.grant.kind() == OverrideKind::RaiseQuota
            && self.grant.competition == competition
            && now_ms < self.grant.until_ms
    }

    /// Whether it still matters: an unspent extra submit, a raise not yet expired, or a re-opened slot (which
    /// stays re-opened).
    pub fn in_force(&self, now_ms: i64) -> bool {
        match self.grant.kind() {
            OverrideKind::ExtraSubmit => !self.spent,
            OverrideKind::RaiseQuota => now_ms < self.grant.until_ms,
            OverrideKind::ReopenSubmit => true,
            OverrideKind::Unspecified => false,
        }
    }
}

/// One team's ledger, folded from `quota-TEAM`.
#[derive(Debug, Clone, Default)]
pub struct Ledger {
    pub holdings: BTreeMap<String, Holding>,
    pub submits: BTreeMap<String, SubmitState>,
    /// Command id → ledger version of the decision taken for it, so a repeated request gets that first
    /// decision (read back from the ledger) rather than a new one. Versions, not decisions: a ledger keeps one
    /// entry per decision ever taken, and replay folds millions.
    pub decisions: IdMap<u64>,
    /// Submission id → (dataset, submitted-at time), for granted real submits not yet ended.
    pub granted_submits: IdMap<(String, i64)>,
    /// Competition → the policy the ledger adopted last.
    pub policies: BTreeMap<String, AdoptedPolicy>,
    /// Overrides by id (time-ordered ids, so iteration is in grant order).
    pub overrides: BTreeMap<String, OverrideState>,
    /// Indexes over `overrides`, so a decision never scans every override ever granted.
    index: OverrideIndex,
}

/// Where each override stands, by what a decision or a fact looks it up by.
#[derive(Debug, Clone, Default)]
struct OverrideIndex {
    /// Dataset → extra submits neither in use nor spent.
    extra_free: BTreeMap<String, std::collections::BTreeSet<String>>,
    /// Submission → the extra submit it uses.
    extra_in_use: IdMap<String>,
    /// Raises that had not ended when the ledger's latest decision was taken.
    raises: Vec<String>,
    /// Command id → override id.
    by_command: IdMap<String>,
    /// The time of the latest decision recorded: a raise that ended before it can matter to no later one, as a
    /// ledger's decisions are taken in order.
    clock_ms: i64,
}

/// An event of a team's ledger, decoded.
#[derive(Debug, Clone)]
pub enum LedgerEvent {
    Granted(ResourcesGranted),
    Denied(AdmissionDenied),
    Released(ResourcesReleased),
    Succeeded(SubmitSucceeded),
    Ended(SubmitEnded),
    PolicyChanged(PolicyChanged),
    Override(OverrideGranted),
}

impl LedgerEvent {
    /// Decodes a stored event of a ledger stream; `None` for other types.
    pub fn decode(ev: &StoredEvent) -> Option<Self> {
        Some(match ev.event_type.as_str() {
            ResourcesGranted::TYPE => Self::Granted(decode(ev)?),
            AdmissionDenied::TYPE => Self::Denied(decode(ev)?),
            ResourcesReleased::TYPE => Self::Released(decode(ev)?),
            SubmitSucceeded::TYPE => Self::Succeeded(decode(ev)?),
            SubmitEnded::TYPE => Self::Ended(decode(ev)?),
            PolicyChanged::TYPE => Self::PolicyChanged(decode(ev)?),
            OverrideGranted::TYPE => Self::Override(decode(ev)?),
            _ => return None,
        })
    }

    /// The recorded request and decision, when this is a decision.
    pub fn decision(&self) -> Option<(&AdmitRequest, &Decision)> {
        match self {
            Self::Granted(ResourcesGranted {
                request: Some(r),
                decision: Some(d),
            })
            | Self::Denied(AdmissionDenied {
                request: Some(r),
                decision: Some(d),
            }) => Some((r, d)),
            _ => None,
        }
    }
}

/// The limits a decision applies: the policy's, raised by overrides in force.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Limits {
    pub gpus: u32,
    pub cpus: u32,
    pub memory_bytes: u64,
    pub sessions: u32,
    /// For each raised limit, the override that raised it: (resource, override id, until).
    pub raised: Vec<(&'static str, String, i64)>,
}

impl Limits {
    /// How a limit reads in a refusal: the number, and the override behind it when raised.
    fn note(&self, resource: &str, policy_value: String) -> String {
        match self.raised.iter().find(|(r, _, _)| *r == resource) {
            Some((_, id, until)) => format!(
                " (raised from {policy_value} by override {id} until {})",
                fmt_time(*until)
            ),
            None => String::new(),
        }
    }

    /// Ids of the overrides that raised any limit, in grant order, without repeats.
    fn override_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.raised.iter().map(|(_, id, _)| id.clone()).collect();
        ids.sort();
        ids.dedup();
        ids
    }
}

impl Ledger {
    /// The sum of what the team holds, as usage reports it: each sum saturates at its field's maximum
    /// rather than wrap, so a report never shows a team holding less than it does. Decisions use
    /// [`Ledger::held_wide`], which is exact.
    pub fn held(&self) -> Resources {
        let w = self.held_wide();
        Resources {
            gpus: u32::try_from(w.gpus).unwrap_or(u32::MAX),
            cpus: u32::try_from(w.cpus).unwrap_or(u32::MAX),
            memory_bytes: u64::try_from(w.memory_bytes).unwrap_or(u64::MAX),
            shm_bytes: u64::try_from(w.shm_bytes).unwrap_or(u64::MAX),
        }
    }

    /// The sum of what the team holds, in types wide enough that no sum of its holdings wraps.
    pub fn held_wide(&self) -> Wide {
        self.holdings
            .values()
            .fold(Wide::default(), |acc, h| acc.plus(&h.resources))
    }

    fn holders(&self, f: impl Fn(&Resources) -> u128, unit: impl Fn(u128) -> String) -> String {
        let parts: Vec<String> = self
            .holdings
            .iter()
            .filter(|(_, h)| f(&h.resources) > 0)
            .map(|(s, h)| format!("{s}: {}", unit(f(&h.resources))))
            .collect();
        if parts.is_empty() {
            "nothing".into()
        } else {
            parts.join(", ")
        }
    }

    /// The policy the ledger adopted for `competition`.
    pub fn policy(&self, competition: &str) -> Option<&AdoptedPolicy> {
        self.policies.get(competition)
    }

    /// The limits in force for `competition` at `now_ms`: the policy's, each raised to the highest value an
    /// override in force sets for it.
    pub fn limits(&self, competition: &str, policy: &Policy, now_ms: i64) -> Limits {
        let mut l = Limits {
            gpus: policy.team_gpus,
            cpus: policy.team_cpus,
            memory_bytes: policy.team_memory_bytes,
            sessions: policy.team_sessions,
            raised: Vec::new(),
        };
        for id in &self.index.raises {
            let Some(o) = self.overrides.get(id) else {
                continue;
            };
            if !o.raises(competition, now_ms) {
                continue;
            }
            let r = o.grant.raise.unwrap_or_default();
            let until = o.grant.until_ms;
            let mut raise = |resource: &'static str, limit: u64, to: u64| -> Option<u64> {
                (to > limit).then(|| {
                    l.raised.retain(|(res, _, _)| *res != resource);
                    l.raised.push((resource, id.clone(), until));
                    to
                })
            };
            if let Some(v) = raise("gpus", l.gpus.into(), r.gpus.into()) {
                l.gpus = v as u32;
            }
            if let Some(v) = raise("cpus", l.cpus.into(), r.cpus.into()) {
                l.cpus = v as u32;
            }
            if let Some(v) = raise("memory", l.memory_bytes, r.memory_bytes) {
                l.memory_bytes = v;
            }
            if let Some(v) = raise("sessions", l.sessions.into(), r.sessions.into()) {
                l.sessions = v as u32;
            }
        }
        l
    }

    /// The first unused extra submit a host granted on `dataset`.
    pub fn extra_submit(&self, dataset: &str) -> Option<&str> {
        self.index
            .extra_free
            .get(dataset)
            .and_then(|ids| ids.first())
            .map(String::as_str)
    }

    /// Unused extra submits on `dataset`.
    pub fn extra_submits(&self, dataset: &str) -> usize {
        self.index
            .extra_free
            .get(dataset)
            .map_or(0, |ids| ids.len())
    }

    /// Whether a host may re-open the slot of `submission`, a real submit of `team`: its dataset when it is in
    /// flight or succeeded, else why not. The ledger keeps no failed submits (replay would pay for them on
    /// every submit), so one that failed is `Unknown` here; the caller tells the two apart from the log.
    pub fn reopenable(&self, team: &str, submission: &str) -> Result<&str, ReopenRefused> {
        if let Some((dataset, _)) = self.granted_submits.get(submission) {
            let by = self
                .submits
                .get(dataset)
                .and_then(|s| s.reopened_in_flight.get(submission));
            return match by {
                Some(by) => Err(ReopenRefused::AlreadyReopened {
                    team: team.to_string(),
                    submission: submission.to_string(),
                    dataset: dataset.clone(),
                    by: by.clone(),
                }),
                None => Ok(dataset),
            };
        }
        for (dataset, st) in &self.submits {
            if st.successes.iter().rev().any(|(_, s)| s == submission) {
                return Ok(dataset);
            }
            if let Some(by) = st.reopened_success_by(submission) {
                return Err(ReopenRefused::AlreadyReopened {
                    team: team.to_string(),
                    submission: submission.to_string(),
                    dataset: dataset.clone(),
                    by: by.to_string(),
                });
            }
        }
        Err(ReopenRefused::Unknown {
            team: team.to_string(),
            submission: submission.to_string(),
        })
    }

    /// The dataset of a granted real submit in flight or succeeded.
    pub fn submit_dataset(&self, submission: &str) -> Option<&str> {
        if let Some((dataset, _)) = self.granted_submits.get(submission) {
            return Some(dataset);
        }
        self.submits
            .iter()
            .find(|(_, st)| {
                st.successes.iter().any(|(_, s)| s == submission)
                    || st.reopened_success_by(submission).is_some()
            })
            .map(|(dataset, _)| dataset.as_str())
    }

    /// The override recorded for a command id, if any.
    pub fn override_by_command(&self, command_id: &str) -> Option<&OverrideState> {
        self.index
            .by_command
            .get(command_id)
            .and_then(|id| self.overrides.get(id))
    }

    /// Advances the ledger's clock to a decision's time, retiring the raises that ended before it.
    fn advance(&mut self, decided_at_ms: i64) {
        if decided_at_ms <= self.index.clock_ms {
            return;
        }
        self.index.clock_ms = decided_at_ms;
        let overrides = &self.overrides;
        self.index.raises.retain(|id| {
            overrides
                .get(id)
                .is_some_and(|o| o.grant.until_ms > decided_at_ms)
        });
    }

    /// Re-opens the slot of `submission` (a submit of `dataset`) by override `id`: in flight, it stops counting
    /// as in flight; succeeded, it stops starting the interval. A submit that failed, is unknown or was
    /// re-opened already is left as it is (the service refuses such an override before recording it).
    fn reopen(&mut self, dataset: &str, submission: &str, id: &str) {
        if let Some((dataset, _)) = self.granted_submits.get(submission) {
            self.submits
                .entry(dataset.clone())
                .or_default()
                .reopened_in_flight
                .entry(submission.to_string())
                .or_insert_with(|| id.to_string());
            return;
        }
        if let Some(s) = self.submits.get_mut(dataset)
            && let Some(key) = s.take_success(submission)
        {
            s.reopened_successes
                .insert(key, (submission.to_string(), id.to_string()));
        }
    }

    /// Applies one decoded ledger event recorded at `version`.
    pub fn apply_event(&mut self, event: LedgerEvent, version: u64) {
        match event {
            LedgerEvent::Granted(e) => {
                let (Some(req), Some(d)) = (e.request, e.decision) else {
                    return;
                };
                let kind = req.kind();
                let submit = kind == SessionKind::Submit;
                self.advance(d.decided_at_ms);
                if submit {
                    for id in &d.overrides {
                        if let Some(o) = self.overrides.get_mut(id)
                            && o.extra_available(&req.dataset)
                        {
                            o.used_by = Some(req.submission_id.clone());
                            if let Some(free) = self.index.extra_free.get_mut(&req.dataset) {
                                free.remove(id);
                            }
                            self.index
                                .extra_in_use
                                .insert(req.submission_id.clone(), id.clone());
                        }
                    }
                    self.submits
                        .entry(req.dataset.clone())
                        .or_default()
                        .in_flight
                        .insert(req.submission_id.clone(), version);
                    self.granted_submits.insert(
                        req.submission_id.clone(),
                        (req.dataset.clone(), d.decided_at_ms),
                    );
                }
                self.holdings.insert(
                    req.session,
                    Holding {
                        resources: req.resources.unwrap_or_default(),
                        kind,
                        dataset: req.dataset,
                        submission_id: req.submission_id,
                        since: version,
                    },
                );
                self.decisions.insert(req.command_id, version);
            }
            LedgerEvent::Denied(e) => {
                if let (Some(req), Some(d)) = (e.request, e.decision) {
                    self.advance(d.decided_at_ms);
                    self.decisions.insert(req.command_id, version);
                }
            }
            LedgerEvent::Released(e) => {
                self.holdings.remove(&e.session);
            }
            LedgerEvent::Succeeded(e) => {
                if let Some(id) = self.index.extra_in_use.remove(&e.submission_id)
                    && let Some(o) = self.overrides.get_mut(&id)
                {
                    o.spent = true;
                }
                self.granted_submits.remove(&e.submission_id);
                let key = (e.at_ms, version);
                let s = self.submits.entry(e.dataset).or_default();
                s.in_flight.remove(&e.submission_id);
                match s.reopened_in_flight.remove(&e.submission_id) {
                    // Re-opened while it ran: its success does not start the interval either.
                    Some(by) => {
                        s.reopened_successes.insert(key, (e.submission_id, by));
                    }
                    None => s.add_success(key, e.submission_id),
                }
            }
            LedgerEvent::Ended(e) => {
                // A failed or timed-out submit gives back the extra submit it used, as it spares the interval.
                if let Some(id) = self.index.extra_in_use.remove(&e.submission_id)
                    && let Some(o) = self.overrides.get_mut(&id)
                {
                    o.used_by = None;
                    self.index
                        .extra_free
                        .entry(o.grant.dataset.clone())
                        .or_default()
                        .insert(id);
                }
                self.granted_submits.remove(&e.submission_id);
                let s = self.submits.entry(e.dataset).or_default();
                s.in_flight.remove(&e.submission_id);
                s.reopened_in_flight.remove(&e.submission_id);
            }
            LedgerEvent::PolicyChanged(e) => {
                self.policies.insert(
                    e.competition,
                    AdoptedPolicy {
                        policy: e.policy.unwrap_or_default(),
                        version: e.version,
                        since: version,
                    },
                );
            }
            LedgerEvent::Override(e) => {
                if let Some(grant) = e.grant {
                    let id = grant.id.clone();
                    if !grant.command_id.is_empty() {
                        self.index
                            .by_command
                            .insert(grant.command_id.clone(), id.clone());
                    }
                    match grant.kind() {
                        OverrideKind::ExtraSubmit => {
                            self.index
                                .extra_free
                                .entry(grant.dataset.clone())
                                .or_default()
                                .insert(id.clone());
                        }
                        OverrideKind::RaiseQuota if grant.until_ms > self.index.clock_ms => {
                            self.index.raises.push(id.clone());
                        }
                        OverrideKind::ReopenSubmit => {
                            self.reopen(&grant.dataset, &grant.submission_id, &id);
                        }
                        _ => {}
                    }
                    self.overrides.insert(
                        grant.id.clone(),
                        OverrideState {
                            grant,
                            since: version,
                            used_by: None,
                            spent: false,
                        },
                    );
                }
            }
        }
    }
}

impl Aggregate for Ledger {
    fn apply(&mut self, ev: &StoredEvent) {
        if let Some(e) = LedgerEvent::decode(ev) {
            self.apply_event(e, ev.version);
        }
    }
}

/// Formats bytes as NSML showed memory (`24G`, `512M`).
pub fn gib(b: impl Into<u128>) -> String {
    const G: u128 = 1024 * 1024 * 1024;
    const M: u128 = 1024 * 1024;
    // Wide, so a sum of memory and shared memory formats as what it is.
    let b: u128 = b.into();
    if b.is_multiple_of(G) {
        format!("{}G", b / G)
    } else if b >= G {
        format!("{:.1}G", b as f64 / G as f64)
    } else {
        format!("{}M", b.div_ceil(M))
    }
}

/// Formats a recorded time as RFC 3339 UTC, seconds precision.
pub fn fmt_time(ms: i64) -> String {
    use chrono::{Datelike, Timelike};
    // Field by field rather than through a format string: replay formats a time for every refusal it re-derives.
    match chrono::DateTime::from_timestamp_millis(ms) {
        Some(t) => format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            t.year(),
            t.month(),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        None => format!("{ms} ms after the epoch"),
    }
}

/// Writes a reason into a string sized for it up front: replay re-derives every refusal's reason, and growing
/// the string piece by piece would cost it more than the rest of `decide`.
macro_rules! reason {
    ($($arg:tt)*) => {{
        let mut text = String::with_capacity(320);
        let _ = std::fmt::Write::write_fmt(&mut text, format_args!($($arg)*));
        text
    }};
}

/// A refusal: the rule, the explanation, when to retry, the overrides in force.
fn deny(rule: &str, reason: String, retry_after_ms: i64, limits: &Limits) -> Decision {
    Decision {
        granted: false,
        rule: rule.into(),
        reason,
        retry_after_ms,
        overrides: limits.override_ids(),
        ..Default::default()
    }
}

/// A refusal that also names the re-opened slots that spared the submit an earlier rule: without them it
/// would have been refused by that rule instead.
fn with_reopened(mut d: Decision, reopened: Vec<(String, String)>) -> Decision {
    d.overrides.extend(reopened.into_iter().map(|(id, _)| id));
    d
}

/// The team-wide limits a request must fit under with what the team already holds: concurrent sessions,
/// GPUs, CPUs and memory including shared memory. `None` when it fits.
fn team_refusal(
    ledger: &Ledger,
    policy: &Policy,
    limits: &Limits,
    team: &str,
    asked: &Resources,
) -> Option<Decision> {
    // Every sum in wide types: a request of billions of CPUs or exabytes of memory must exceed the limit, not
    // wrap below it. `asked` alone can be beyond any limit, and is then refused here like any other excess.
    let held = ledger.held_wide();
    let total = held.plus(asked);
    let free_hint = "stop or remove a session (`nsml stop`, `nsml rm -f`) to free them";
    if ledger.holdings.len() >= limits.sessions as usize {
        let names: Vec<&str> = ledger.holdings.keys().map(|s| s.as_str()).collect();
        return Some(deny(
            "team_sessions",
            reason!(
                "team `{team}` already runs {} of its {}{} concurrent sessions ({}); {free_hint}",
                ledger.holdings.len(),
                limits.sessions,
                limits.note("sessions", policy.team_sessions.to_string()),
                names.join(", ")
            ),
            0,
            limits,
        ));
    }
    if total.gpus > limits.gpus.into() {
        return Some(deny(
            "team_gpus",
            reason!(
                "team `{team}` holds {} GPUs ({}), asked {}, limit {}{}; {free_hint}",
                held.gpus,
                ledger.holders(|r| r.gpus.into(), |v| v.to_string()),
                asked.gpus,
                limits.gpus,
                limits.note("gpus", policy.team_gpus.to_string()),
            ),
            0,
            limits,
        ));
    }
    if total.cpus > limits.cpus.into() {
        return Some(deny(
            "team_cpus",
            reason!(
                "team `{team}` holds {} CPUs ({}), asked {}, limit {}{}; {free_hint}",
                held.cpus,
                ledger.holders(|r| r.cpus.into(), |v| v.to_string()),
                asked.cpus,
                limits.cpus,
                limits.note("cpus", policy.team_cpus.to_string()),
            ),
            0,
            limits,
        ));
    }
    if total.memory_with_shm() > limits.memory_bytes.into() {
        return Some(deny(
            "team_memory",
            reason!(
                "team `{team}` holds {} of memory including shared memory ({}), asked {}, limit {}{}; {free_hint}",
                gib(held.memory_with_shm()),
                ledger.holders(memory_with_shm, gib),
                gib(memory_with_shm(asked)),
                gib(limits.memory_bytes),
                limits.note("memory", gib(policy.team_memory_bytes)),
            ),
            0,
            limits,
        ));
    }
    None
}

/// Decides whether `req` may hold its resources now. Pure: everything it needs is passed in, and every
/// override it honours is ledger state.
pub fn decide(ledger: &Ledger, policy: &Policy, req: &AdmitRequest, now_ms: i64) -> Decision {
    let asked = req.resources.unwrap_or_default();
    let team = &req.team;
    let limits = ledger.limits(&req.competition, policy, now_ms);
    if ledger.holdings.contains_key(&req.session) {
        return deny(
            "duplicate",
            reason!("session {} already holds resources", req.session),
            0,
            &limits,
        );
    }
    let mut extra = None;
    // Re-opened slots that spare this submit a rule: (override, what it spared), named in the decision.
    let mut reopened: Vec<(String, String)> = Vec::new();
    if req.kind() == SessionKind::Submit {
        let st = ledger.submits.get(&req.dataset);
        if let Some((other, _)) = st.and_then(|s| s.counted_in_flight().next()) {
            return deny(
                "submit_in_flight",
                reason!(
                    "team `{team}` already has a submit of dataset `{}` in flight (submission {other}); wait for it to finish",
                    req.dataset
                ),
                0,
                &limits,
            );
        }
        let interval_ms = interval_ms(policy);
        if let Some(st) = st {
            for (sub, id) in &st.reopened_in_flight {
                reopened.push((
                    id.clone(),
                    reason!(
                        "submission {sub} on `{}` no longer counts as in flight: its slot was re-opened by override {id}",
                        req.dataset
                    ),
                ));
            }
            for (at, sub, id) in st.reopened_in_interval(interval_ms, now_ms) {
                reopened.push((
                    id.to_string(),
                    reason!(
                        "the interval on `{}` does not count from submission {sub} (submitted at {}): its slot was re-opened by override {id}",
                        req.dataset,
                        fmt_time(at)
                    ),
                ));
            }
        }
        if let Some(last) = st.and_then(|s| s.last_success()).map(|l| l.at_ms) {
            let next = last.saturating_add(interval_ms);
            if now_ms < next {
                match ledger.extra_submit(&req.dataset) {
                    Some(id) => extra = Some(id.to_string()),
                    None => {
                        let wait_s = next.saturating_sub(now_ms).saturating_add(999) / 1000;
                        let mut reason = reason!(
                            "submit limit: one real submit per {} per dataset, counted from the last successful one; team `{team}` last submitted `{}` successfully at {}, so the next submit is allowed at {} (in {}m {}s)",
                            human_secs(policy.submit_interval_secs),
                            req.dataset,
                            fmt_time(last),
                            fmt_time(next),
                            wait_s / 60,
                            wait_s % 60
                        );
                        for (_, spared) in &reopened {
                            reason.push_str("; ");
                            reason.push_str(spared);
                        }
                        return with_reopened(
                            deny("submit_interval", reason, next, &limits),
                            reopened,
                        );
                    }
                }
            }
        }
        if asked.cpus > policy.submit_max_cpus {
            return with_reopened(
                deny(
                    "submit_cpus",
                    reason!(
                        "a submit may use at most {} CPUs, asked {}",
                        policy.submit_max_cpus,
                        asked.cpus
                    ),
                    0,
                    &limits,
                ),
                reopened,
            );
        }
    }
    if let Some(refusal) = team_refusal(ledger, policy, &limits, team, &asked) {
        return with_reopened(refusal, reopened);
    }
    let mut overrides = limits.override_ids();
    let mut reason = String::new();
    for (id, spared) in reopened {
        if !reason.is_empty() {
            reason.push_str("; ");
        }
        reason.push_str(&spared);
        overrides.push(id);
    }
    if let Some(id) = extra {
        if !reason.is_empty() {
            reason.push_str("; ");
        }
        reason.push_str(&reason!(
            "the submit interval on `{}` is waived once by override {id}",
            req.dataset
        ));
        overrides.push(id);
    }
    Decision {
        granted: true,
        reason,
        overrides,
        ..Default::default()
    }
}

/// Says a number of seconds as NSML's rules did (`1 hour`, `10 minutes`).
pub fn human_secs(s: u64) -> String {
    if s.is_multiple_of(3600) {
        format!("{} hour{}", s / 3600, if s == 3600 { "" } else { "s" })
    } else if s.is_multiple_of(60) {
        format!("{} minutes", s / 60)
    } else {
        format!("{s} seconds")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nsml_eventstore::StoredEvent;
    use nsml_proto::v1::QuotaRaise;

    const G: u64 = 1024 * 1024 * 1024;
    const HOUR: i64 = 3_600_000;

    fn seed_policy() -> Policy {
        Policy {
            team_gpus: 2,
            team_cpus: 16,
            team_memory_bytes: 170 * G,
            team_sessions: 2,
            team_storage_bytes: 450 * G,
            submit_interval_secs: 3600,
            submit_time_limit_secs: 3600,
            submit_max_cpus: 4,
        }
    }

    fn req(kind: SessionKind, session: &str, gpus: u32, cpus: u32, sub: &str) -> AdmitRequest {
        AdmitRequest {
            team: "demo".into(),
            competition: "demo".into(),
            kind: kind as i32,
            session: session.into(),
            dataset: "t1-cls".into(),
            resources: Some(Resources {
                gpus,
                cpus,
                memory_bytes: 75 * G,
                shm_bytes: 10 * G,
            }),
            submission_id: sub.into(),
            command_id: session.into(),
            seen_position: 0,
        }
    }

    fn stored<P: EventPayload>(p: &P) -> StoredEvent {
        nsml_common::event::stored("quota-demo", 1, p)
    }

    /// Given the events, the ledger they fold into (numbered as the stream would number them).
    fn given(events: &[StoredEvent]) -> Ledger {
        let mut l = Ledger::default();
        for (i, e) in events.iter().enumerate() {
            let mut e = e.clone();
            e.version = i as u64 + 1;
            l.apply(&e);
        }
        l
    }

    fn granted(r: AdmitRequest, at: i64) -> StoredEvent {
        granted_with(r, at, &[])
    }

    fn granted_with(r: AdmitRequest, at: i64, overrides: &[&str]) -> StoredEvent {
        stored(&ResourcesGranted {
            request: Some(r),
            decision: Some(Decision {
                granted: true,
                decided_at_ms: at,
                overrides: overrides.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            }),
        })
    }

    fn released(session: &str) -> StoredEvent {
        stored(&ResourcesReleased {
            session: session.into(),
            ..Default::default()
        })
    }

    fn succeeded(sub: &str, at: i64) -> StoredEvent {
        stored(&SubmitSucceeded {
            dataset: "t1-cls".into(),
            submission_id: sub.into(),
            at_ms: at,
        })
    }

    fn failed(sub: &str, at: i64) -> StoredEvent {
        stored(&SubmitEnded {
            dataset: "t1-cls".into(),
            submission_id: sub.into(),
            succeeded: false,
            at_ms: at,
        })
    }

    fn extra_submit(id: &str) -> StoredEvent {
        stored(&OverrideGranted {
            grant: Some(Override {
                id: id.into(),
                competition: "demo".into(),
                team: "demo".into(),
                kind: OverrideKind::ExtraSubmit as i32,
                dataset: "t1-cls".into(),
                reason: "scorer outage".into(),
                granted_by: "user:host".into(),
                ..Default::default()
            }),
        })
    }

    fn raise(id: &str, raise: QuotaRaise, until_ms: i64) -> StoredEvent {
        stored(&OverrideGranted {
            grant: Some(Override {
                id: id.into(),
                competition: "demo".into(),
                team: "demo".into(),
                kind: OverrideKind::RaiseQuota as i32,
                raise: Some(raise),
                until_ms,
                reason: "final week".into(),
                granted_by: "user:host".into(),
                ..Default::default()
            }),
        })
    }

    fn policy_changed(policy: Policy, version: u64) -> StoredEvent {
        stored(&PolicyChanged {
            competition: "demo".into(),
            policy: Some(policy),
            version,
        })
    }

    #[test]
    fn gpus_are_refused_when_training_holds_both() {
        let l = given(&[granted(
            req(SessionKind::Train, "demo/t1-cls/1", 2, 8, ""),
            0,
        )]);
        let d = decide(
            &l,
            &seed_policy(),
            &req(SessionKind::Train, "demo/t1-cls/2", 1, 4, ""),
            0,
        );
        assert!(!d.granted);
        assert_eq!(d.rule, "team_gpus");
        assert!(
            d.reason
                .contains("holds 2 GPUs (demo/t1-cls/1: 2), asked 1, limit 2;"),
            "{}",
            d.reason
        );
    }

    #[test]
    fn memory_and_shared_memory_that_sum_past_the_integer_range_are_refused() {
        let l = given(&[]);
        let mut r = req(SessionKind::Train, "demo/t1-cls/1", 0, 1, "");
        // 2^64 bytes in all: summed in 64 bits it wraps to nothing.
        r.resources = Some(Resources {
            memory_bytes: u64::MAX - G + 1,
            shm_bytes: G,
            ..r.resources.unwrap()
        });
        let d = decide(&l, &seed_policy(), &r, 0);
        assert_eq!((d.granted, d.rule.as_str()), (false, "team_memory"));
        assert!(
            d.reason
                .contains("holds 0G of memory including shared memory (nothing), asked 17179869184G, limit 170G;"),
            "{}",
            d.reason
        );
    }

    #[test]
    fn cpus_that_sum_past_the_integer_range_with_those_held_are_refused() {
        let l = given(&[granted(
            req(SessionKind::Train, "demo/t1-cls/1", 0, 1, ""),
            0,
        )]);
        let d = decide(
            &l,
            &seed_policy(),
            &req(SessionKind::Train, "demo/t1-cls/2", 0, u32::MAX, ""),
            0,
        );
        assert_eq!((d.granted, d.rule.as_str()), (false, "team_cpus"));
        assert!(
            d.reason
                .contains("holds 1 CPUs (demo/t1-cls/1: 1), asked 4294967295, limit 16;"),
            "{}",
            d.reason
        );
    }

    #[test]
    fn usage_saturates_rather_than_wraps() {
        let mut big = req(SessionKind::Train, "demo/t1-cls/1", u32::MAX, u32::MAX, "");
        big.resources = Some(Resources {
            gpus: u32::MAX,
            cpus: u32::MAX,
            memory_bytes: u64::MAX,
            shm_bytes: u64::MAX,
        });
        let mut other = big.clone();
        other.session = "demo/t1-cls/2".into();
        other.command_id = other.session.clone();
        let l = given(&[granted(big, 0), granted(other, 0)]);
        let held = l.held();
        assert_eq!(
            (held.gpus, held.cpus, held.memory_bytes, held.shm_bytes),
            (u32::MAX, u32::MAX, u64::MAX, u64::MAX)
        );
        assert_eq!(l.held_wide().memory_with_shm(), 4 * u128::from(u64::MAX));
    }

    #[test]
    fn an_interval_too_long_to_count_in_milliseconds_never_passes() {
        let policy = Policy {
            submit_interval_secs: u64::MAX,
            ..seed_policy()
        };
        let l = given(&[
            granted(req(SessionKind::Submit, "demo/t1-cls/1", 1, 4, "s1"), 0),
            succeeded("s1", 0),
        ]);
        let d = decide(
            &l,
            &policy,
            &req(SessionKind::Submit, "demo/t1-cls/2", 1, 4, "s2"),
            100 * HOUR,
        );
        assert_eq!(
            (d.granted, d.rule.as_str()),
            (false, "submit_interval"),
            "{d:?}"
        );
        assert_eq!(d.retry_after_ms, i64::MAX);
    }

    #[test]
    fn a_submit_is_capped_at_four_cpus() {
        let l = given(&[]);
        let d = decide(
            &l,
            &seed_policy(),
            &req(SessionKind::Submit, "demo/t1-cls/2", 1, 8, "s1"),
            0,
        );
        assert_eq!((d.granted, d.rule.as_str()), (false, "submit_cpus"));
        let d = decide(
            &l,
            &seed_policy(),
            &req(SessionKind::Submit, "demo/t1-cls/2", 1, 4, "s1"),
            0,
        );
        assert!(d.granted, "{}", d.reason);
    }

    #[test]
    fn a_submit_with_the_training_sessions_gpus_is_refused_while_training_holds_them() {
        let l = given(&[granted(
            req(SessionKind::Train, "demo/t1-cls/1", 2, 8, ""),
            0,
        )]);
        let d = decide(
            &l,
            &seed_policy(),
            &req(SessionKind::Submit, "demo/t1-cls/2", 2, 4, "s1"),
            0,
        );
        assert_eq!((d.granted, d.rule.as_str()), (false, "team_gpus"));
    }

    #[test]
    fn the_interval_counts_from_the_last_successful_submit() {
        let sub = req(SessionKind::Submit, "demo/t1-cls/2", 0, 4, "s1");
        let l = given(&[
            granted(sub, 10 * HOUR),
            released("demo/t1-cls/2"),
            succeeded("s1", 10 * HOUR),
        ]);
        let next = req(SessionKind::Submit, "demo/t1-cls/3", 0, 4, "s2");
        let d = decide(&l, &seed_policy(), &next, 10 * HOUR + HOUR / 2);
        assert_eq!((d.granted, d.rule.as_str()), (false, "submit_interval"));
        assert_eq!(d.retry_after_ms, 11 * HOUR);
        assert!(decide(&l, &seed_policy(), &next, 11 * HOUR).granted);
    }

    #[test]
    fn failed_submits_do_not_start_the_interval() {
        let l = given(&[
            granted(req(SessionKind::Submit, "demo/t1-cls/2", 0, 4, "s1"), HOUR),
            released("demo/t1-cls/2"),
            failed("s1", HOUR),
        ]);
        let d = decide(
            &l,
            &seed_policy(),
            &req(SessionKind::Submit, "demo/t1-cls/3", 0, 4, "s2"),
            HOUR + 1,
        );
        assert!(d.granted, "{}", d.reason);
    }

    #[test]
    fn one_real_submit_in_flight_per_dataset() {
        let l = given(&[granted(
            req(SessionKind::Submit, "demo/t1-cls/2", 0, 4, "s1"),
            0,
        )]);
        let d = decide(
            &l,
            &seed_policy(),
            &req(SessionKind::Submit, "demo/t1-cls/3", 0, 4, "s2"),
            1,
        );
        assert_eq!((d.granted, d.rule.as_str()), (false, "submit_in_flight"));
    }

    #[test]
    fn a_trial_session_holds_quota_until_released() {
        let trial = req(SessionKind::TrialSubmit, "demo/t1-cls/2", 1, 4, "t1");
        let train = granted(req(SessionKind::Train, "demo/t1-cls/1", 1, 8, ""), 0);
        let held = given(&[train.clone(), granted(trial.clone(), 0)]);
        let d = decide(
            &held,
            &seed_policy(),
            &req(SessionKind::Train, "demo/t1-cls/3", 1, 4, ""),
            0,
        );
        assert_eq!((d.granted, d.rule.as_str()), (false, "team_sessions"));
        let freed = given(&[train, granted(trial, 0), released("demo/t1-cls/2")]);
        assert!(
            decide(
                &freed,
                &seed_policy(),
                &req(SessionKind::Train, "demo/t1-cls/3", 1, 4, ""),
                0
            )
            .granted
        );
    }

    #[test]
    fn memory_counts_shared_memory() {
        let l = given(&[granted(
            req(SessionKind::Train, "demo/t1-cls/1", 1, 8, ""),
            0,
        )]);
        let mut big = req(SessionKind::Train, "demo/t1-cls/2", 1, 4, "");
        big.resources = Some(Resources {
            gpus: 1,
            cpus: 4,
            memory_bytes: 80 * G,
            shm_bytes: 10 * G,
        });
        let d = decide(&l, &seed_policy(), &big, 0);
        assert_eq!((d.granted, d.rule.as_str()), (false, "team_memory"));
    }

    #[test]
    fn an_extra_submit_waives_the_interval_once() {
        let history = [
            granted(
                req(SessionKind::Submit, "demo/t1-cls/2", 0, 4, "s1"),
                10 * HOUR,
            ),
            released("demo/t1-cls/2"),
            succeeded("s1", 10 * HOUR),
            extra_submit("o1"),
        ];
        let l = given(&history);
        let second = req(SessionKind::Submit, "demo/t1-cls/3", 0, 4, "s2");
        let d = decide(&l, &seed_policy(), &second, 10 * HOUR + HOUR / 4);
        assert!(d.granted, "{}", d.reason);
        assert_eq!(d.overrides, vec!["o1".to_string()]);
        assert!(
            d.reason.contains("waived once by override o1"),
            "{}",
            d.reason
        );

        // Used by a submit that succeeded: the interval now counts from that one, and no extra is left.
        let mut after = history.to_vec();
        after.extend([
            granted_with(second, 10 * HOUR + HOUR / 4, &["o1"]),
            released("demo/t1-cls/3"),
            succeeded("s2", 10 * HOUR + HOUR / 4),
        ]);
        let l = given(&after);
        assert_eq!(l.extra_submits("t1-cls"), 0);
        let third = req(SessionKind::Submit, "demo/t1-cls/4", 0, 4, "s3");
        let d = decide(&l, &seed_policy(), &third, 11 * HOUR + HOUR / 8);
        assert_eq!((d.granted, d.rule.as_str()), (false, "submit_interval"));
        assert_eq!(d.retry_after_ms, 11 * HOUR + HOUR / 4);
        assert!(d.overrides.is_empty());
    }

    #[test]
    fn a_failed_submit_gives_its_extra_submit_back() {
        let second = req(SessionKind::Submit, "demo/t1-cls/3", 0, 4, "s2");
        let l = given(&[
            granted(
                req(SessionKind::Submit, "demo/t1-cls/2", 0, 4, "s1"),
                10 * HOUR,
            ),
            released("demo/t1-cls/2"),
            succeeded("s1", 10 * HOUR),
            extra_submit("o1"),
            granted_with(second, 10 * HOUR + 60_000, &["o1"]),
        ]);
        // While the submit that uses it runs, the extra submit is taken.
        assert_eq!(l.extra_submits("t1-cls"), 0);
        let l = given(&[
            granted(
                req(SessionKind::Submit, "demo/t1-cls/2", 0, 4, "s1"),
                10 * HOUR,
            ),
            released("demo/t1-cls/2"),
            succeeded("s1", 10 * HOUR),
            extra_submit("o1"),
            granted_with(
                req(SessionKind::Submit, "demo/t1-cls/3", 0, 4, "s2"),
                10 * HOUR + 60_000,
                &["o1"],
            ),
            released("demo/t1-cls/3"),
            failed("s2", 10 * HOUR + 120_000),
        ]);
        let d = decide(
            &l,
            &seed_policy(),
            &req(SessionKind::Submit, "demo/t1-cls/4", 0, 4, "s3"),
            10 * HOUR + 180_000,
        );
        assert!(d.granted, "{}", d.reason);
        assert_eq!(d.overrides, vec!["o1".to_string()]);
    }

    #[test]
    fn an_extra_submit_does_not_bypass_the_other_rules() {
        let l = given(&[
            granted(req(SessionKind::Submit, "demo/t1-cls/2", 0, 4, "s1"), 0),
            extra_submit("o1"),
        ]);
        let d = decide(
            &l,
            &seed_policy(),
            &req(SessionKind::Submit, "demo/t1-cls/3", 0, 4, "s2"),
            1,
        );
        assert_eq!((d.granted, d.rule.as_str()), (false, "submit_in_flight"));
        assert_eq!(l.extra_submits("t1-cls"), 1);
    }

    #[test]
    fn a_raised_quota_holds_until_it_expires() {
        let until = 20 * HOUR;
        let l = given(&[
            granted(req(SessionKind::Train, "demo/t1-cls/1", 2, 8, ""), 0),
            raise(
                "o1",
                QuotaRaise {
                    gpus: 4,
                    sessions: 3,
                    ..Default::default()
                },
                until,
            ),
        ]);
        let more = req(SessionKind::Train, "demo/t1-cls/2", 1, 4, "");
        let d = decide(&l, &seed_policy(), &more, until - 1);
        assert!(d.granted, "{}", d.reason);
        assert_eq!(d.overrides, vec!["o1".to_string()]);

        // At the deadline the policy's limit is back.
        let d = decide(&l, &seed_policy(), &more, until);
        assert_eq!((d.granted, d.rule.as_str()), (false, "team_gpus"));
        assert!(d.reason.contains("limit 2;"), "{}", d.reason);
        assert!(d.overrides.is_empty());

        // While raised, a refusal names the raise.
        let huge = req(SessionKind::Train, "demo/t1-cls/2", 3, 4, "");
        let d = decide(&l, &seed_policy(), &huge, HOUR);
        assert_eq!((d.granted, d.rule.as_str()), (false, "team_gpus"));
        assert!(
            d.reason
                .contains("limit 4 (raised from 2 by override o1 until 1970-01-01T20:00:00Z)"),
            "{}",
            d.reason
        );
    }

    #[test]
    fn a_raise_never_lowers_a_limit_and_the_highest_raise_wins() {
        let l = given(&[
            raise(
                "o1",
                QuotaRaise {
                    gpus: 1,
                    cpus: 32,
                    ..Default::default()
                },
                HOUR,
            ),
            raise(
                "o2",
                QuotaRaise {
                    cpus: 24,
                    memory_bytes: 200 * G,
                    ..Default::default()
                },
                HOUR,
            ),
        ]);
        let limits = l.limits("demo", &seed_policy(), 0);
        assert_eq!(
            (limits.gpus, limits.cpus, limits.memory_bytes),
            (2, 32, 200 * G)
        );
        assert_eq!(limits.override_ids(), vec!["o1", "o2"]);
        // Another competition's limits are untouched.
        assert_eq!(l.limits("other", &seed_policy(), 0).cpus, 16);
    }

    #[test]
    fn the_ledger_adopts_the_newest_policy_and_decisions_follow_it() {
        let quicker = Policy {
            submit_interval_secs: 600,
            ..seed_policy()
        };
        let l = given(&[
            policy_changed(seed_policy(), 1),
            granted(req(SessionKind::Submit, "demo/t1-cls/2", 0, 4, "s1"), 0),
            released("demo/t1-cls/2"),
            succeeded("s1", 0),
        ]);
        let p = l.policy("demo").copied().unwrap();
        assert_eq!((p.version, p.since), (1, 1));
        let next = req(SessionKind::Submit, "demo/t1-cls/3", 0, 4, "s2");
        let d = decide(&l, &p.policy, &next, 20 * 60_000);
        assert_eq!((d.granted, d.rule.as_str()), (false, "submit_interval"));

        let mut l = l;
        let mut change = policy_changed(quicker, 2);
        change.version = 5;
        l.apply(&change);
        let p = l.policy("demo").copied().unwrap();
        assert_eq!((p.version, p.since), (2, 5));
        assert!(decide(&l, &p.policy, &next, 20 * 60_000).granted);
    }

    #[test]
    fn folding_remembers_which_events_the_state_rests_on() {
        let l = given(&[
            granted(req(SessionKind::Train, "demo/t1-cls/1", 1, 8, ""), 0),
            granted(req(SessionKind::Submit, "demo/t1-cls/2", 0, 4, "s1"), 0),
            released("demo/t1-cls/2"),
            succeeded("s1", 0),
        ]);
        assert_eq!(l.holdings["demo/t1-cls/1"].since, 1);
        let last = l.submits["t1-cls"].last_success().unwrap();
        assert_eq!((last.submission_id, last.at_ms, last.version), ("s1", 0, 4));
    }

    fn reopen(id: &str, sub: &str) -> StoredEvent {
        stored(&OverrideGranted {
            grant: Some(Override {
                id: id.into(),
                competition: "demo".into(),
                team: "demo".into(),
                kind: OverrideKind::ReopenSubmit as i32,
                dataset: "t1-cls".into(),
                submission_id: sub.into(),
                reason: "scorer stuck".into(),
                granted_by: "user:host".into(),
                ..Default::default()
            }),
        })
    }

    /// A real submit `sub` in session `demo/t1-cls/N` granted at `at`, then released and succeeded.
    fn success(n: u32, sub: &str, at: i64) -> [StoredEvent; 3] {
        let session = format!("demo/t1-cls/{n}");
        [
            granted(req(SessionKind::Submit, &session, 0, 4, sub), at),
            released(&session),
            succeeded(sub, at),
        ]
    }

    #[test]
    fn a_reopened_stuck_submit_no_longer_blocks_the_next_but_keeps_its_resources() {
        let stuck = [granted(
            req(SessionKind::Submit, "demo/t1-cls/2", 1, 4, "s1"),
            10 * HOUR,
        )];
        let next = req(SessionKind::Submit, "demo/t1-cls/3", 0, 4, "s2");
        // Before the override the stuck submit blocks the next one.
        let d = decide(&given(&stuck), &seed_policy(), &next, 11 * HOUR);
        assert_eq!((d.granted, d.rule.as_str()), (false, "submit_in_flight"));

        let mut history = stuck.to_vec();
        history.push(reopen("r1", "s1"));
        let l = given(&history);
        let d = decide(&l, &seed_policy(), &next, 11 * HOUR);
        assert!(d.granted, "{}", d.reason);
        assert_eq!(d.overrides, vec!["r1".to_string()]);
        assert!(
            d.reason.contains(
                "submission s1 on `t1-cls` no longer counts as in flight: its slot was re-opened by override r1"
            ),
            "{}",
            d.reason
        );
        // Its session still holds what it was granted, until it ends.
        assert_eq!(l.held().gpus, 1);
        assert!(l.holdings.contains_key("demo/t1-cls/2"));
        let two_gpus = req(SessionKind::Train, "demo/t1-cls/4", 2, 4, "");
        let d = decide(&l, &seed_policy(), &two_gpus, 11 * HOUR);
        assert_eq!((d.granted, d.rule.as_str()), (false, "team_gpus"));
        // Once it ends, nothing is left for the override to spare.
        history.extend([released("demo/t1-cls/2"), failed("s1", 11 * HOUR)]);
        let d = decide(&given(&history), &seed_policy(), &next, 11 * HOUR);
        assert!(d.granted, "{}", d.reason);
        assert!(d.overrides.is_empty(), "{:?}", d.overrides);
    }

    #[test]
    fn a_new_submit_after_a_reopened_one_is_in_flight_as_usual() {
        let l = given(&[
            granted(req(SessionKind::Submit, "demo/t1-cls/2", 0, 4, "s1"), 0),
            reopen("r1", "s1"),
            granted(req(SessionKind::Submit, "demo/t1-cls/3", 0, 4, "s2"), 1),
        ]);
        let d = decide(
            &l,
            &seed_policy(),
            &req(SessionKind::Submit, "demo/t1-cls/4", 0, 4, "s3"),
            2,
        );
        assert_eq!((d.granted, d.rule.as_str()), (false, "submit_in_flight"));
        assert!(d.reason.contains("(submission s2)"), "{}", d.reason);
    }

    #[test]
    fn a_reopened_success_no_longer_starts_the_interval() {
        let mut history = success(2, "s1", 10 * HOUR).to_vec();
        history.push(reopen("r1", "s1"));
        let l = given(&history);
        let second = req(SessionKind::Submit, "demo/t1-cls/3", 0, 4, "s2");
        let at = 10 * HOUR + HOUR / 4;
        let d = decide(&l, &seed_policy(), &second, at);
        assert!(d.granted, "{}", d.reason);
        assert_eq!(d.overrides, vec!["r1".to_string()]);
        assert!(
            d.reason.contains(
                "the interval on `t1-cls` does not count from submission s1 (submitted at 1970-01-01T10:00:00Z): its slot was re-opened by override r1"
            ),
            "{}",
            d.reason
        );
        assert!(l.submits["t1-cls"].last_success().is_none());

        // A second success counts the interval from itself, whatever was re-opened before it.
        history.extend(success(3, "s2", at));
        let l = given(&history);
        let third = req(SessionKind::Submit, "demo/t1-cls/4", 0, 4, "s3");
        let d = decide(&l, &seed_policy(), &third, 11 * HOUR);
        assert_eq!((d.granted, d.rule.as_str()), (false, "submit_interval"));
        assert_eq!(d.retry_after_ms, at + HOUR);
        assert!(d.overrides.is_empty(), "{:?}", d.overrides);
        assert!(decide(&l, &seed_policy(), &third, at + HOUR).granted);
    }

    #[test]
    fn reopening_the_last_success_counts_the_interval_from_the_one_before() {
        let mut history = success(2, "s0", 9 * HOUR + HOUR / 2).to_vec();
        history.extend(success(3, "s1", 10 * HOUR));
        history.push(reopen("r1", "s1"));
        let l = given(&history);
        let next = req(SessionKind::Submit, "demo/t1-cls/4", 0, 4, "s2");
        let d = decide(&l, &seed_policy(), &next, 10 * HOUR + HOUR / 4);
        assert_eq!((d.granted, d.rule.as_str()), (false, "submit_interval"));
        assert_eq!(d.retry_after_ms, 10 * HOUR + HOUR / 2);
        assert!(
            d.reason
                .contains("successfully at 1970-01-01T09:30:00Z, so the next submit is allowed at 1970-01-01T10:30:00Z"),
            "{}",
            d.reason
        );
        // The refusal names the override: without it, the retry time would be an hour after s1.
        assert_eq!(d.overrides, vec!["r1".to_string()]);
        let d = decide(&l, &seed_policy(), &next, 10 * HOUR + HOUR / 2);
        assert!(d.granted, "{}", d.reason);
        assert_eq!(d.overrides, vec!["r1".to_string()]);
        // Once s1's own interval has passed, the override changes nothing.
        let d = decide(&l, &seed_policy(), &next, 11 * HOUR);
        assert!(d.granted && d.overrides.is_empty(), "{d:?}");
    }

    #[test]
    fn a_submit_reopened_while_it_ran_does_not_start_the_interval_when_it_succeeds() {
        let mut history = vec![
            granted(
                req(SessionKind::Submit, "demo/t1-cls/2", 0, 4, "s1"),
                10 * HOUR,
            ),
            reopen("r1", "s1"),
        ];
        // The team submits again while the stuck one runs, and the new one succeeds first.
        history.extend(success(3, "s2", 10 * HOUR + HOUR / 6));
        // Then the stuck one succeeds too: it was submitted earlier, and re-opened, so s2 still counts.
        history.extend([released("demo/t1-cls/2"), succeeded("s1", 10 * HOUR)]);
        let l = given(&history);
        let last = l.submits["t1-cls"].last_success().unwrap();
        assert_eq!(last.submission_id, "s2");
        let next = req(SessionKind::Submit, "demo/t1-cls/4", 0, 4, "s3");
        let d = decide(&l, &seed_policy(), &next, 11 * HOUR);
        assert_eq!((d.granted, d.rule.as_str()), (false, "submit_interval"));
        assert_eq!(d.retry_after_ms, 11 * HOUR + HOUR / 6);

        // Alone, its success starts no interval: the override spares the next submit the wait.
        let l = given(&[
            granted(
                req(SessionKind::Submit, "demo/t1-cls/2", 0, 4, "s1"),
                10 * HOUR,
            ),
            reopen("r1", "s1"),
            released("demo/t1-cls/2"),
            succeeded("s1", 10 * HOUR),
        ]);
        let d = decide(&l, &seed_policy(), &next, 10 * HOUR + HOUR / 2);
        assert!(d.granted, "{}", d.reason);
        assert_eq!(d.overrides, vec!["r1".to_string()]);
        assert!(
            d.reason.contains("does not count from submission s1"),
            "{}",
            d.reason
        );
    }

    #[test]
    fn a_reopened_slot_does_not_use_an_extra_submit() {
        let mut history = success(2, "s1", 10 * HOUR).to_vec();
        history.extend([extra_submit("o1"), reopen("r1", "s1")]);
        let l = given(&history);
        let d = decide(
            &l,
            &seed_policy(),
            &req(SessionKind::Submit, "demo/t1-cls/3", 0, 4, "s2"),
            10 * HOUR + 1,
        );
        assert!(d.granted, "{}", d.reason);
        assert_eq!(d.overrides, vec!["r1".to_string()]);
        assert_eq!(l.extra_submits("t1-cls"), 1);
    }

    #[test]
    fn only_a_submit_in_flight_or_succeeded_can_be_reopened() {
        let l = given(&[
            granted(req(SessionKind::Submit, "demo/t1-cls/2", 0, 4, "run"), 0),
            granted(req(SessionKind::Submit, "demo/t1-cls/3", 0, 4, "ok"), 0),
            released("demo/t1-cls/3"),
            succeeded("ok", 0),
            granted(req(SessionKind::Submit, "demo/t1-cls/4", 0, 4, "bad"), 0),
            released("demo/t1-cls/4"),
            failed("bad", 1),
            granted(
                req(SessionKind::TrialSubmit, "demo/t1-cls/5", 0, 2, "trial"),
                1,
            ),
            granted(req(SessionKind::Submit, "demo/t1-cls/6", 0, 4, "again"), 2),
            reopen("r1", "again"),
        ]);
        assert_eq!(l.reopenable("demo", "run"), Ok("t1-cls"));
        assert_eq!(l.reopenable("demo", "ok"), Ok("t1-cls"));
        // The ledger keeps no failed submits: the service tells them apart from unknown ones by the log.
        for unknown in ["bad", "trial", "nope"] {
            let e = l.reopenable("demo", unknown).unwrap_err();
            assert!(
                matches!(e, ReopenRefused::Unknown { .. })
                    && e.to_string()
                        .contains("`nsml admin audit export --team demo` lists the team's submits"),
                "{e}"
            );
        }
        let again = l.reopenable("demo", "again").unwrap_err();
        assert!(
            matches!(again, ReopenRefused::AlreadyReopened { ref by, .. } if by == "r1"),
            "{again}"
        );
        // A refused override that is recorded anyway changes nothing.
        let mut history = vec![
            granted(req(SessionKind::Submit, "demo/t1-cls/4", 0, 4, "bad"), 0),
            released("demo/t1-cls/4"),
            failed("bad", 1),
            reopen("r2", "bad"),
        ];
        history.extend(success(7, "s1", HOUR));
        let l = given(&history);
        assert!(matches!(
            l.reopenable("demo", "bad"),
            Err(ReopenRefused::Unknown { .. })
        ));
        assert_eq!(l.submits["t1-cls"].last_success().unwrap().at_ms, HOUR);
    }
}
