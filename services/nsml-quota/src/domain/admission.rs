//! The admission rule: `decide(ledger, policy, request, now) -> Decision`, pure, and the policy a decision
//! uses. Everything a decision depends on is ledger state, so folding one `quota-TEAM` stream alone
//! re-derives every decision recorded in it.

use std::borrow::Cow;

use nsml_proto::policy::DatasetRules;
use nsml_proto::v1::{AdmitRequest, Decision, Policy, PolicyChanged, Resources, SessionKind};

use super::format::{fmt_time, gib, human_secs};
use super::ledger::{Ledger, Limits, SubmitState, interval_ms, memory_with_shm};
use super::rule::Rule;

/// Writes a reason into a string sized for it up front: replay re-derives every refusal's reason, and growing
/// the string piece by piece would cost it more than the rest of `decide`.
macro_rules! reason {
    ($($arg:tt)*) => {{
        let mut text = String::with_capacity(320);
        let _ = std::fmt::Write::write_fmt(&mut text, format_args!($($arg)*));
        text
    }};
}

/// The policy a decision uses: the ledger's, unless the log has a newer version (`current`), which the
/// ledger adopts first; with it the `PolicyChanged` to record when it does. `None` when neither has one.
pub fn adopt(
    ledger: &Ledger,
    competition: &str,
    current: Option<(&Policy, u64)>,
) -> Option<(Policy, u64, Option<PolicyChanged>)> {
    match (ledger.policy(competition), current) {
        (Some(a), Some((_, v))) if a.version >= v => Some((a.policy.clone(), a.version, None)),
        (Some(a), None) => Some((a.policy.clone(), a.version, None)),
        (_, Some((p, v))) => Some((
            p.clone(),
            v,
            Some(PolicyChanged {
                competition: competition.to_string(),
                policy: Some(p.clone()),
                version: v,
            }),
        )),
        (None, None) => None,
    }
}

/// A refusal: the rule, the explanation, when to retry, the overrides in force.
fn deny(rule: Rule, reason: String, retry_after_ms: i64, limits: &Limits) -> Decision {
    Decision {
        granted: false,
        rule: rule.as_str().into(),
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

/// The sessions holding resources, as a refusal names them: `a, b (trial)`. Written straight into the reason,
/// which replay re-derives for every refusal.
struct SessionNames<'a>(&'a Ledger);

impl std::fmt::Display for SessionNames<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (name, h)) in self.0.holdings.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            f.write_str(name)?;
            if h.kind == SessionKind::TrialSubmit {
                f.write_str(" (trial)")?;
            }
        }
        Ok(())
    }
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
    // A trial submit session keeps what it holds after it ends, until removed (as NSML had it): `ps` shows it
    // Exited while it still counts, so the refusal says so.
    let trials = ledger
        .holdings
        .values()
        .any(|h| h.kind == SessionKind::TrialSubmit);
    let free_hint = if trials {
        "stop or remove a session (`nsml stop`, `nsml rm -f`) to free them; a trial submit session (marked \
         `(trial)`) holds its resources and its slot until it is removed, even after it has ended"
    } else {
        "stop or remove a session (`nsml stop`, `nsml rm -f`) to free them"
    };
    if ledger.holdings.len() >= limits.sessions as usize {
        return Some(deny(
            Rule::TeamSessions,
            reason!(
                "team `{team}` already runs {} of its {}{} concurrent sessions ({}); {free_hint}",
                ledger.holdings.len(),
                limits.sessions,
                limits.note("sessions", policy.team_sessions.to_string()),
                SessionNames(ledger)
            ),
            0,
            limits,
        ));
    }
    if total.gpus > limits.gpus.into() {
        return Some(deny(
            Rule::TeamGpus,
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
            Rule::TeamCpus,
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
            Rule::TeamMemory,
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

/// What spared a submit a rule: re-opened slots (override, what it spared) and an extra submit that waives
/// the interval, each named in the decision.
#[derive(Default)]
struct Spared {
    reopened: Vec<(String, String)>,
    extra: Option<String>,
}

/// Decides whether `req` may hold its resources now. Pure: everything it needs is passed in, and every
/// override it honours is ledger state.
pub fn decide(ledger: &Ledger, policy: &Policy, req: &AdmitRequest, now_ms: i64) -> Decision {
    let asked = req.resources.unwrap_or_default();
    let limits = ledger.limits(&req.competition, policy, now_ms);
    if ledger.holdings.contains_key(&req.session) {
        return deny(
            Rule::Duplicate,
            reason!("session {} already holds resources", req.session),
            0,
            &limits,
        );
    }
    // The dataset's round, if it is in one, sets its schedule and submit rules.
    let rules = policy.rules_for(&req.dataset);
    if let Some(refusal) = schedule_refusal(ledger, &rules, &limits, req, now_ms) {
        return refusal;
    }
    let spared = if req.kind() == SessionKind::Submit {
        match submit_rules(ledger, &rules, &limits, req, &asked, now_ms) {
            SubmitChecked::Passed(spared) => spared,
            SubmitChecked::Refused(refusal) => return refusal,
        }
    } else {
        Spared::default()
    };
    if let Some(refusal) = team_refusal(ledger, policy, &limits, &req.team, &asked) {
        return with_reopened(refusal, spared.reopened);
    }
    grant(&limits, spared, &req.dataset)
}

/// The schedule of the request's dataset: its round's where it is in one that sets the time, else the
/// competition's. Nothing runs before it opens; no submit (trial or real) once it has closed, unless a host
/// extended the team's deadline (for that round, or for the competition where the dataset closes with it)
/// past now.
fn schedule_refusal(
    ledger: &Ledger,
    rules: &DatasetRules<'_>,
    limits: &Limits,
    req: &AdmitRequest,
    now_ms: i64,
) -> Option<Decision> {
    let opens = rules.opens_at_ms;
    if opens > 0 && now_ms < opens {
        let reason = match rules.round.filter(|r| r.opens_at_ms > 0) {
            Some(r) => reason!(
                "round `{}` of competition `{}` opens at {}: runs and submits on its datasets ({}) are refused \
                 until then",
                r.name,
                req.competition,
                fmt_time(opens),
                r.datasets.join(", ")
            ),
            None => reason!(
                "competition `{}` opens at {}: runs and submits are refused until then",
                req.competition,
                fmt_time(opens)
            ),
        };
        return Some(deny(Rule::NotOpen, reason, opens, limits));
    }
    let submit = matches!(req.kind(), SessionKind::Submit | SessionKind::TrialSubmit);
    let closes = rules.closes_at_ms;
    if !submit || closes <= 0 {
        return None;
    }
    let extended = ledger.extended_deadline(&req.competition, |round| rules.extended_by(round));
    let deadline = extended.map_or(closes, |(_, until)| until.max(closes));
    if now_ms < deadline {
        return None;
    }
    let round = rules.round.filter(|r| r.closes_at_ms > 0);
    let mut reason = match round {
        Some(r) => reason!(
            "round `{}` of competition `{}` closed at {}: submits on its datasets ({}) are refused after the \
             round's deadline, and the round's final ranking is their boards as they were then",
            r.name,
            req.competition,
            fmt_time(closes),
            r.datasets.join(", ")
        ),
        None => reason!(
            "competition `{}` closed at {}: submits are refused after the deadline, and the final ranking is \
             the boards as they were then",
            req.competition,
            fmt_time(closes)
        ),
    };
    if let Some((id, until)) = extended {
        let whose = match round {
            Some(r) => format!("the team's deadline for round `{}`", r.name),
            None => "the team's deadline".into(),
        };
        reason.push_str(&format!(
            "; {whose}, extended by override {id}, ended at {}",
            fmt_time(until)
        ));
    }
    Some(deny(Rule::Closed, reason, 0, limits))
}

/// How a rule that a round may set reads in a refusal: for the dataset, or for the datasets of the round that
/// set it.
fn per_dataset(
    rules: &DatasetRules<'_>,
    set_by_round: impl Fn(&nsml_proto::v1::Round) -> bool,
) -> Cow<'static, str> {
    match rules.round.filter(|r| set_by_round(r)) {
        Some(r) => Cow::Owned(format!("per dataset of round `{}`", r.name)),
        None => Cow::Borrowed("per dataset"),
    }
}

/// How a real submit fared under the submit rules.
enum SubmitChecked {
    /// It passes them, spared a rule by what is named.
    Passed(Spared),
    /// A rule refused it.
    Refused(Decision),
}

/// The rules a real submit must pass besides the team's limits: one in flight per dataset, the interval
/// since the last successful one (unless a host's extra submit waives it), and the CPUs a submit may use.
fn submit_rules(
    ledger: &Ledger,
    rules: &DatasetRules<'_>,
    limits: &Limits,
    req: &AdmitRequest,
    asked: &Resources,
    now_ms: i64,
) -> SubmitChecked {
    let team = &req.team;
    let st = ledger.submits.get(&req.dataset);
    if let Some((other, _)) = st.and_then(|s| s.counted_in_flight().next()) {
        return SubmitChecked::Refused(deny(
            Rule::SubmitInFlight,
            reason!(
                "team `{team}` already has a submit of dataset `{}` in flight (submission {other}); wait for it to finish",
                req.dataset
            ),
            0,
            limits,
        ));
    }
    let interval_ms = interval_ms(rules.submit_interval_secs);
    let mut spared = Spared {
        reopened: st.map_or_else(Vec::new, |st| {
            reopened_slots(st, &req.dataset, interval_ms, now_ms)
        }),
        extra: None,
    };
    if let Some(last) = st.and_then(|s| s.last_success()).map(|l| l.at_ms) {
        let next = last.saturating_add(interval_ms);
        if now_ms < next {
            match ledger.extra_submit(&req.dataset) {
                Some(id) => spared.extra = Some(id.to_string()),
                None => {
                    let wait_s = next.saturating_sub(now_ms).saturating_add(999) / 1000;
                    let mut reason = reason!(
                        "submit limit: one real submit per {} {}, counted from the last successful one; team `{team}` last submitted `{}` successfully at {}, so the next submit is allowed at {} (in {}m {}s)",
                        human_secs(rules.submit_interval_secs),
                        per_dataset(rules, |r| r.submit_interval_secs.is_some()),
                        req.dataset,
                        fmt_time(last),
                        fmt_time(next),
                        wait_s / 60,
                        wait_s % 60
                    );
                    for (_, why) in &spared.reopened {
                        reason.push_str("; ");
                        reason.push_str(why);
                    }
                    return SubmitChecked::Refused(with_reopened(
                        deny(Rule::SubmitInterval, reason, next, limits),
                        spared.reopened,
                    ));
                }
            }
        }
    }
    if asked.cpus > rules.submit_max_cpus {
        let round = match rules.round.filter(|r| r.submit_max_cpus.is_some()) {
            Some(r) => format!(" in round `{}`", r.name),
            None => String::new(),
        };
        return SubmitChecked::Refused(with_reopened(
            deny(
                Rule::SubmitCpus,
                reason!(
                    "a submit{round} may use at most {} CPUs, asked {}",
                    rules.submit_max_cpus,
                    asked.cpus
                ),
                0,
                limits,
            ),
            spared.reopened,
        ));
    }
    SubmitChecked::Passed(spared)
}

/// The re-opened slots of `dataset` that spare a submit at `now_ms` a rule: submits in flight that no longer
/// count, and successes the interval no longer counts from. Each as (override, what it spared).
fn reopened_slots(
    st: &SubmitState,
    dataset: &str,
    interval_ms: i64,
    now_ms: i64,
) -> Vec<(String, String)> {
    let mut reopened = Vec::new();
    for (sub, id) in &st.reopened_in_flight {
        reopened.push((
            id.clone(),
            reason!(
                "submission {sub} on `{dataset}` no longer counts as in flight: its slot was re-opened by override {id}"
            ),
        ));
    }
    for (at, sub, id) in st.reopened_in_interval(interval_ms, now_ms) {
        reopened.push((
            id.to_string(),
            reason!(
                "the interval on `{dataset}` does not count from submission {sub} (submitted at {}): its slot was re-opened by override {id}",
                fmt_time(at)
            ),
        ));
    }
    reopened
}

/// A grant, naming the overrides it rests on: the raises of the limits, the re-opened slots and the extra
/// submit it uses, and in its reason what each spared it.
fn grant(limits: &Limits, spared: Spared, dataset: &str) -> Decision {
    let mut overrides = limits.override_ids();
    let mut reason = String::new();
    for (id, why) in spared.reopened {
        if !reason.is_empty() {
            reason.push_str("; ");
        }
        reason.push_str(&why);
        overrides.push(id);
    }
    if let Some(id) = spared.extra {
        if !reason.is_empty() {
            reason.push_str("; ");
        }
        reason.push_str(&reason!(
            "the submit interval on `{dataset}` is waived once by override {id}"
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::tests::{given, policy_changed, seed_policy};

    #[test]
    fn a_ledger_adopts_the_policy_the_log_has_when_it_is_newer() {
        // Given a ledger that adopted version 1 of the policy,
        let l = given(&[policy_changed(seed_policy(), 1)]);
        let newer = Policy {
            team_gpus: 4,
            ..seed_policy()
        };
        // when the log has version 2,
        let (policy, version, change) = adopt(&l, "demo", Some((&newer, 2))).unwrap();
        // then the decision uses version 2 and the ledger records that it adopted it.
        assert_eq!((policy.team_gpus, version), (4, 2));
        let change = change.expect("a newer policy is recorded");
        assert_eq!((change.competition.as_str(), change.version), ("demo", 2));
    }

    #[test]
    fn a_ledger_keeps_its_policy_when_the_log_has_none_newer() {
        // Given a ledger that adopted version 3,
        let l = given(&[policy_changed(seed_policy(), 3)]);
        let older = Policy {
            team_gpus: 9,
            ..seed_policy()
        };
        // when the log has version 2, or none at all,
        for current in [Some((&older, 2)), None] {
            let (policy, version, change) = adopt(&l, "demo", current).unwrap();
            // then the decision uses the ledger's version 3 and records nothing.
            assert_eq!((policy.team_gpus, version), (2, 3));
            assert!(change.is_none());
        }
    }

    #[test]
    fn no_policy_anywhere_decides_nothing() {
        // Given an empty ledger and a log without a policy for the competition,
        // when a decision asks for one, then there is none to use.
        assert!(adopt(&Ledger::default(), "demo", None).is_none());
    }
}
