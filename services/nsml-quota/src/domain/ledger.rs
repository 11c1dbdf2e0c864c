//! The team ledger, folded from `quota-TEAM`: what its sessions hold, the submit history per dataset, the
//! policies it adopted and the hosts' overrides. Everything a decision depends on is here.

use std::collections::BTreeMap;

use nsml_common::aggregate::Aggregate;
use nsml_common::event::decode_bytes;
use nsml_eventstore::StoredEvent;
use nsml_proto::v1::{
    AdmissionDenied, AdmitRequest, Decision, EventPayload, Override, OverrideGranted, OverrideKind,
    Policy, PolicyChanged, Resources, ResourcesGranted, ResourcesReleased, SessionKind,
    SubmitEnded, SubmitSucceeded,
};

use super::format::{describe_override, fmt_time};
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
pub(super) fn memory_with_shm(r: &Resources) -> u128 {
    u128::from(r.memory_bytes) + u128::from(r.shm_bytes)
}

/// A submit interval (the policy's, or a round's for its datasets) in milliseconds; an interval too long to
/// count in milliseconds is as long as the clock can count, so it never passes, rather than wrapping into one
/// that already has.
pub fn interval_ms(submit_interval_secs: u64) -> i64 {
    i64::try_from(submit_interval_secs)
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
    /// The submission is a submit on another dataset than the one the host named.
    #[error(
        "submission {submission} is a submit on dataset `{found}`, not `{dataset}`: leave out the dataset or name `{found}`"
    )]
    OtherDataset {
        submission: String,
        found: String,
        dataset: String,
    },
}

/// A competition policy as the ledger adopted it.
#[derive(Debug, Clone, PartialEq)]
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
        o.description = describe_override(&o);
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

    /// Whether it is an extra submit on `dataset` still in force at `now_ms` (unspent, in use or not).
    pub fn extra_in_force(&self, dataset: &str, now_ms: i64) -> bool {
        self.grant.kind() == OverrideKind::ExtraSubmit
            && self.grant.dataset == dataset
            && self.in_force(now_ms)
    }

    /// Whether it still matters: an unspent extra submit, a raise not yet expired, or a re-opened slot (which
    /// stays re-opened).
    pub fn in_force(&self, now_ms: i64) -> bool {
        match self.grant.kind() {
            OverrideKind::ExtraSubmit => !self.spent,
            OverrideKind::RaiseQuota => now_ms < self.grant.until_ms,
            OverrideKind::ReopenSubmit => true,
            OverrideKind::ExtendDeadline => now_ms < self.grant.until_ms,
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
    /// Every type a ledger stream holds: those [`LedgerEvent::decode`] reads.
    pub const TYPES: &'static [&'static str] = &[
        ResourcesGranted::TYPE,
        AdmissionDenied::TYPE,
        ResourcesReleased::TYPE,
        SubmitSucceeded::TYPE,
        SubmitEnded::TYPE,
        PolicyChanged::TYPE,
        OverrideGranted::TYPE,
    ];

    /// Decodes a stored event of a ledger stream; `None` for other types.
    pub fn decode(ev: &StoredEvent) -> Option<Self> {
        Self::decode_bytes(&ev.event_type, ev.position, &ev.payload)
    }

    /// [`LedgerEvent::decode`] of an event given by its type, position and payload.
    pub fn decode_bytes(event_type: &str, position: u64, payload: &[u8]) -> Option<Self> {
        fn of<P: EventPayload>((event_type, position, payload): (&str, u64, &[u8])) -> Option<P> {
            decode_bytes::<P, P>(event_type, position, payload)
        }
        let ev = (event_type, position, payload);
        Some(match event_type {
            ResourcesGranted::TYPE => Self::Granted(of(ev)?),
            AdmissionDenied::TYPE => Self::Denied(of(ev)?),
            ResourcesReleased::TYPE => Self::Released(of(ev)?),
            SubmitSucceeded::TYPE => Self::Succeeded(of(ev)?),
            SubmitEnded::TYPE => Self::Ended(of(ev)?),
            PolicyChanged::TYPE => Self::PolicyChanged(of(ev)?),
            OverrideGranted::TYPE => Self::Override(of(ev)?),
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
    pub(super) fn note(&self, resource: &str, policy_value: String) -> String {
        match self.raised.iter().find(|(r, _, _)| *r == resource) {
            Some((_, id, until)) => format!(
                " (raised from {policy_value} by override {id} until {})",
                fmt_time(*until)
            ),
            None => String::new(),
        }
    }

    /// Ids of the overrides that raised any limit, in grant order, without repeats.
    pub(super) fn override_ids(&self) -> Vec<String> {
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

    /// Each session holding some of a resource, with how much, for a refusal's reason.
    pub(super) fn holders(
        &self,
        f: impl Fn(&Resources) -> u128,
        unit: impl Fn(u128) -> String,
    ) -> String {
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

    /// The latest deadline a host extended the team's to in `competition`, among the extensions whose round
    /// (empty: the competition's deadline) `applies` accepts, with the override: the team may submit until
    /// then, past the closing time.
    pub fn extended_deadline(
        &self,
        competition: &str,
        applies: impl Fn(&str) -> bool,
    ) -> Option<(&str, i64)> {
        self.overrides
            .values()
            .filter(|o| {
                o.grant.kind() == OverrideKind::ExtendDeadline
                    && o.grant.competition == competition
                    && applies(&o.grant.round)
            })
            .map(|o| (o.grant.id.as_str(), o.grant.until_ms))
            .max_by_key(|(_, until)| *until)
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
    pub(crate) fn advance(&mut self, decided_at_ms: i64) {
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
                if let (Some(req), Some(d)) = (e.request, e.decision) {
                    self.apply_grant(req, &d, version);
                }
            }
            LedgerEvent::Denied(e) => {
                if let (Some(req), Some(d)) = (e.request, e.decision) {
                    self.apply_denial(req.command_id, d.decided_at_ms, version);
                }
            }
            LedgerEvent::Released(e) => {
                self.holdings.remove(&e.session);
            }
            LedgerEvent::Succeeded(e) => self.apply_success(e, version),
            LedgerEvent::Ended(e) => self.apply_end(e),
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
                    self.apply_override(grant, version);
                }
            }
        }
    }

    /// A refusal of command `command_id`, decided at `decided_at_ms` and recorded at `version`: the ledger
    /// keeps only that the command was decided.
    pub fn apply_denial(&mut self, command_id: String, decided_at_ms: i64, version: u64) {
        self.note_decided(command_id, version);
        self.advance(decided_at_ms);
    }

    /// Notes that command `command_id` was decided at ledger `version`; says whether it had been decided
    /// before. `decide` does not read which commands were decided, so replay notes a refusal's command before
    /// re-deriving it: one lookup of the command serves both the check for a repeat and the fold.
    pub fn note_decided(&mut self, command_id: String, version: u64) -> bool {
        self.decisions.insert(command_id, version).is_some()
    }

    /// A grant: the session holds its resources; a real submit is in flight and uses the extra submit its
    /// decision names.
    fn apply_grant(&mut self, req: AdmitRequest, d: &Decision, version: u64) {
        let kind = req.kind();
        self.advance(d.decided_at_ms);
        if kind == SessionKind::Submit {
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

    /// A real submit succeeded: it spends its extra submit and starts the interval, unless its slot was
    /// re-opened while it ran.
    fn apply_success(&mut self, e: SubmitSucceeded, version: u64) {
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

    /// A real submit failed or timed out: it no longer runs, and gives back the extra submit it used, as it
    /// spares the interval.
    fn apply_end(&mut self, e: SubmitEnded) {
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

    /// A host's override, indexed by what decisions look it up by.
    fn apply_override(&mut self, grant: Override, version: u64) {
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
            id,
            OverrideState {
                grant,
                since: version,
                used_by: None,
                spent: false,
            },
        );
    }
}

impl Aggregate for Ledger {
    fn apply(&mut self, ev: &StoredEvent) {
        if let Some(e) = LedgerEvent::decode(ev) {
            self.apply_event(e, ev.version);
        }
    }
}
