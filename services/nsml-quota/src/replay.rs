//! Replay: folds ledgers from scratch and re-derives every recorded decision with `decide`, from the
//! recorded request, its recorded time, the policy the ledger itself adopted and the ledger state just
//! before the decision. Pure: the caller feeds the events (from the store, or generated for a bench).

use nsml_eventstore::{ScannedEvent, StoredEvent};
use nsml_proto::v1::{AdmissionDenied, AdmitRequest, Decision, EventPayload};
use prost::Message;
use prost::encoding::{DecodeContext, decode_key, message, skip_field};

use crate::domain::{Ledger, LedgerEvent, decide};

/// Which decisions a replay checks.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    /// Only decisions of this competition.
    pub competition: Option<String>,
    /// Only events recorded at or before this time; a ledger's later events are not read.
    pub until_ms: Option<i64>,
    /// Only decisions of these competitions (the ones the caller hosts); `None`: every competition.
    pub hosted: Option<Vec<String>>,
}

impl Scope {
    /// Whether decisions of `competition` are checked.
    pub fn covers(&self, competition: &str) -> bool {
        self.competition.as_deref().is_none_or(|c| c == competition)
            && self
                .hosted
                .as_ref()
                .is_none_or(|h| h.iter().any(|c| c == competition))
    }
}

/// A recorded decision that replay re-derived differently.
#[derive(Debug, Clone, PartialEq)]
pub struct Mismatch {
    pub team: String,
    pub position: u64,
    pub version: u64,
    pub request: AdmitRequest,
    pub recorded: Decision,
    pub replayed: Decision,
    /// What differs, e.g. `granted: recorded true, replayed false`.
    pub differences: Vec<String>,
}

/// What a replay found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    /// Ledgers read.
    pub ledgers: u64,
    /// Ledger events folded.
    pub events: u64,
    /// Decisions re-derived.
    pub decisions: u64,
    /// Decisions re-derived exactly as recorded.
    pub matched: u64,
    pub mismatches: Vec<Mismatch>,
}

impl Report {
    /// Adds what another replay found (of other ledgers) to this report.
    pub fn add(&mut self, other: Report) {
        self.ledgers += other.ledgers;
        self.events += other.events;
        self.decisions += other.decisions;
        self.matched += other.matched;
        self.mismatches.extend(other.mismatches);
    }
}

/// A ledger event as replay reads it: whole from the store ([`StoredEvent`]), or as a scan of the ledgers reads
/// it ([`ScannedEvent`]).
pub trait Recorded {
    fn position(&self) -> u64;
    fn version(&self) -> u64;
    fn event_type(&self) -> &str;
    fn payload(&self) -> &[u8];
    fn recorded_at_ms(&self) -> i64;
}

impl Recorded for StoredEvent {
    fn position(&self) -> u64 {
        self.position
    }
    fn version(&self) -> u64 {
        self.version
    }
    fn event_type(&self) -> &str {
        &self.event_type
    }
    fn payload(&self) -> &[u8] {
        &self.payload
    }
    fn recorded_at_ms(&self) -> i64 {
        self.metadata.recorded_at_ms
    }
}

impl Recorded for ScannedEvent {
    fn position(&self) -> u64 {
        self.position
    }
    fn version(&self) -> u64 {
        self.version
    }
    fn event_type(&self) -> &str {
        &self.event_type
    }
    fn payload(&self) -> &[u8] {
        &self.payload
    }
    fn recorded_at_ms(&self) -> i64 {
        self.recorded_at_ms
    }
}

/// One ledger being replayed, event by event.
#[derive(Debug, Default)]
pub struct LedgerReplay {
    team: String,
    ledger: Ledger,
    stopped: bool,
    /// The refusal decoded last, whose strings the next refusal is decoded into.
    denied: AdmissionDenied,
}

impl LedgerReplay {
    /// Starts the replay of `team`'s ledger from an empty state.
    pub fn new(team: &str) -> Self {
        Self {
            team: team.to_string(),
            ..Default::default()
        }
    }

    /// Takes the ledger's next event: re-derives it when it is a decision in scope, then folds it.
    pub fn step(&mut self, ev: &impl Recorded, scope: &Scope, report: &mut Report) {
        if self.stopped {
            return;
        }
        if scope.until_ms.is_some_and(|u| ev.recorded_at_ms() > u) {
            self.stopped = true;
            return;
        }
        report.events += 1;
        if ev.event_type() == AdmissionDenied::TYPE {
            self.step_denial(ev, scope, report);
            return;
        }
        let Some(event) = LedgerEvent::decode_bytes(ev.event_type(), ev.position(), ev.payload())
        else {
            return;
        };
        if let Some((req, recorded)) = event.decision() {
            let repeated = self.ledger.decisions.contains_key(&req.command_id);
            self.check(req, recorded, repeated, ev, scope, report);
        }
        self.ledger.apply_event(event, ev.version());
    }

    /// Takes a refusal, as [`LedgerEvent::decode`] and [`Ledger::apply_event`] would. Refusals are most of a
    /// busy ledger and the ledger keeps only their command id, so each is decoded into the strings of the one
    /// before instead of into new ones (the in-memory replay bench ran 5-10 % faster).
    fn step_denial(&mut self, ev: &impl Recorded, scope: &Scope, report: &mut Report) {
        if let Err(err) = decode_reusing(&mut self.denied, ev.payload()) {
            tracing::error!(position = ev.position(), event_type = ev.event_type(), %err, "undecodable event payload");
            return;
        }
        if let AdmissionDenied {
            request: Some(req),
            decision: Some(recorded),
        } = &self.denied
        {
            let repeated = self
                .ledger
                .note_decided(req.command_id.clone(), ev.version());
            self.check(req, recorded, repeated, ev, scope, report);
            self.ledger.advance(recorded.decided_at_ms);
        }
    }

    /// Re-derives the decision `ev` records when it is in scope, and counts it as matched or as a mismatch;
    /// `repeated`: whether the ledger had decided the request's command before.
    fn check(
        &self,
        req: &AdmitRequest,
        recorded: &Decision,
        repeated: bool,
        ev: &impl Recorded,
        scope: &Scope,
        report: &mut Report,
    ) {
        if !scope.covers(&req.competition) {
            return;
        }
        report.decisions += 1;
        let (mut replayed, differences) =
            rederive_noted(&self.ledger, req, recorded, ev.version(), repeated);
        if differences.is_empty() {
            report.matched += 1;
        } else {
            replayed.id = recorded.id.clone();
            report.mismatches.push(Mismatch {
                team: self.team.clone(),
                position: ev.position(),
                version: ev.version(),
                request: req.clone(),
                recorded: recorded.clone(),
                replayed,
                differences,
            });
        }
    }
}

/// Decodes an `AdmissionDenied` payload into `into` as `AdmissionDenied::decode` would (a field the payload
/// leaves out is `None`), but into the strings `into` already holds, which keep their capacity.
fn decode_reusing(into: &mut AdmissionDenied, mut buf: &[u8]) -> Result<(), prost::DecodeError> {
    let mut request = into.request.take().unwrap_or_default();
    let mut decision = into.decision.take().unwrap_or_default();
    request.clear();
    decision.clear();
    let (mut has_request, mut has_decision) = (false, false);
    while !buf.is_empty() {
        let (tag, wire_type) = decode_key(&mut buf)?;
        match tag {
            1 => {
                has_request = true;
                message::merge(wire_type, &mut request, &mut buf, DecodeContext::default())?;
            }
            2 => {
                has_decision = true;
                message::merge(wire_type, &mut decision, &mut buf, DecodeContext::default())?;
            }
            _ => skip_field(wire_type, tag, &mut buf, DecodeContext::default())?,
        }
    }
    into.request = has_request.then_some(request);
    into.decision = has_decision.then_some(decision);
    Ok(())
}

/// Replays one ledger's events (in version order) into `report`.
pub fn replay_ledger(team: &str, events: &[StoredEvent], scope: &Scope, report: &mut Report) {
    let mut r = LedgerReplay::new(team);
    report.ledgers += 1;
    for ev in events {
        r.step(ev, scope, report);
    }
}

/// Re-derives a decision recorded at ledger `version` from the ledger state just before it; returns the
/// re-derived decision (without an id of its own) and what differs from the recorded one (empty when they agree).
pub fn rederive(
    ledger: &Ledger,
    req: &AdmitRequest,
    recorded: &Decision,
    version: u64,
) -> (Decision, Vec<String>) {
    let repeated = ledger.decisions.contains_key(&req.command_id);
    rederive_noted(ledger, req, recorded, version, repeated)
}

/// [`rederive`], told whether the ledger had decided the request's command before (`repeated`) rather than
/// looking it up: for a replay that noted the command already.
fn rederive_noted(
    ledger: &Ledger,
    req: &AdmitRequest,
    recorded: &Decision,
    version: u64,
    repeated: bool,
) -> (Decision, Vec<String>) {
    let mut differences = Vec::new();
    if repeated {
        differences.push(format!(
            "command `{}` was already decided: a repeated request gets the first decision, not a new one",
            req.command_id
        ));
    }
    let mut replayed = match ledger.policy(&req.competition) {
        Some(p) => {
            let mut d = decide(ledger, &p.policy, req, recorded.decided_at_ms);
            d.policy_version = p.version;
            d
        }
        None => {
            differences.push(format!(
                "the ledger adopted no policy of competition `{}` before this decision",
                req.competition
            ));
            Decision::default()
        }
    };
    replayed.decided_at_ms = recorded.decided_at_ms;
    replayed.ledger_version = version.saturating_sub(1);
    // Compared field by field, and put in words only when they differ: replay must stay fast.
    if recorded.granted != replayed.granted {
        differences.push(format!(
            "granted: recorded {}, replayed {}",
            recorded.granted, replayed.granted
        ));
    }
    if recorded.rule != replayed.rule {
        differences.push(format!(
            "rule: recorded `{}`, replayed `{}`",
            recorded.rule, replayed.rule
        ));
    }
    if recorded.retry_after_ms != replayed.retry_after_ms {
        differences.push(format!(
            "retry after: recorded {}, replayed {}",
            recorded.retry_after_ms, replayed.retry_after_ms
        ));
    }
    if recorded.policy_version != replayed.policy_version {
        differences.push(format!(
            "policy version: recorded {}, replayed {}",
            recorded.policy_version, replayed.policy_version
        ));
    }
    if recorded.ledger_version != replayed.ledger_version {
        differences.push(format!(
            "ledger version: recorded {}, replayed {}",
            recorded.ledger_version, replayed.ledger_version
        ));
    }
    if recorded.overrides != replayed.overrides {
        differences.push(format!(
            "overrides: recorded {:?}, replayed {:?}",
            recorded.overrides, replayed.overrides
        ));
    }
    if recorded.reason != replayed.reason {
        differences.push(format!(
            "reason: recorded {:?}, replayed {:?}",
            recorded.reason, replayed.reason
        ));
    }
    (replayed, differences)
}

#[cfg(test)]
mod tests {
    use nsml_proto::v1::{
        AdmissionDenied, EventPayload, OverrideGranted, OverrideKind, ResourcesGranted,
    };
    use prost::Message;

    use super::*;
    use crate::synthetic;

    fn replay(events: &[StoredEvent]) -> Report {
        let mut report = Report::default();
        replay_ledger("demo", events, &Scope::default(), &mut report);
        report
    }

    #[test]
    fn a_generated_ledger_replays_without_mismatches() {
        let events = synthetic::ledger("demo", 20_000, 1);
        let report = replay(&events);
        assert!(
            report.mismatches.is_empty(),
            "{:#?}",
            &report.mismatches[..1]
        );
        assert_eq!(report.events, 20_000);
        assert!(report.decisions > 5_000, "{report:?}");
        assert_eq!(report.matched, report.decisions);
        // The generated history exercises every rule, both policy versions and every kind of override.
        let mut rules = std::collections::BTreeSet::new();
        let mut versions = std::collections::BTreeSet::new();
        let mut overridden = 0;
        let mut kinds = std::collections::HashMap::new();
        let mut named_kinds = std::collections::BTreeSet::<OverrideKind>::new();
        for ev in &events {
            match LedgerEvent::decode(ev) {
                Some(LedgerEvent::Override(OverrideGranted { grant: Some(o) })) => {
                    kinds.insert(o.id.clone(), o.kind());
                }
                Some(e) => {
                    if let Some((_, d)) = e.decision() {
                        rules.insert(d.rule.clone());
                        versions.insert(d.policy_version);
                        overridden += usize::from(!d.overrides.is_empty());
                        named_kinds
                            .extend(d.overrides.iter().filter_map(|id| kinds.get(id).copied()));
                    }
                }
                None => {}
            }
        }
        assert_eq!(
            named_kinds.into_iter().collect::<Vec<_>>(),
            vec![
                OverrideKind::ExtraSubmit,
                OverrideKind::RaiseQuota,
                OverrideKind::ReopenSubmit
            ]
        );
        for rule in [
            "",
            "submit_interval",
            "submit_in_flight",
            "team_sessions",
            "team_gpus",
            "team_cpus",
            "team_memory",
        ] {
            assert!(rules.contains(rule), "no `{rule}` decision in {rules:?}");
        }
        assert_eq!(versions.into_iter().collect::<Vec<_>>(), vec![1, 2]);
        assert!(
            overridden > 10,
            "{overridden} decisions honoured an override"
        );
    }

    #[test]
    fn decisions_under_rounds_and_a_rounds_extension_replay_without_mismatches() {
        use crate::synthetic::{Script, seed_policy};
        use nsml_proto::v1::{Policy, Round};
        const HOUR: i64 = 3_600_000;
        // Given a competition whose preliminary (t1-cls) runs from 1 h to 3 h and whose final (t2-reg) opens
        // at 5 h, adopted as a second version of the policy,
        let mut s = Script::new("demo");
        s.adopt(
            Policy {
                rounds: vec![
                    Round {
                        name: "preliminary".into(),
                        datasets: vec!["t1-cls".into()],
                        opens_at_ms: Script::time(HOUR),
                        closes_at_ms: Script::time(3 * HOUR),
                        submit_interval_secs: Some(600),
                        ..Default::default()
                    },
                    Round {
                        name: "final".into(),
                        datasets: vec!["t2-reg".into()],
                        opens_at_ms: Script::time(5 * HOUR),
                        closes_at_ms: Script::time(8 * HOUR),
                        ..Default::default()
                    },
                ],
                ..seed_policy()
            },
            2,
        );
        // when the team trains and submits before, during and after the preliminary, and on the final too
        // early,
        assert!(!s.at(0).train("t1-cls"), "before the preliminary opens");
        let (sub, granted) = s.at(2 * HOUR).submit("t1-cls");
        assert!(granted);
        s.end(&sub, true);
        let (_, granted) = s.at(2 * HOUR + 5 * 60_000).submit("t1-cls");
        assert!(!granted, "inside the round's interval");
        let (_, granted) = s.at(4 * HOUR).submit("t1-cls");
        assert!(!granted, "after the preliminary closed");
        assert!(!s.train("t2-reg"), "before the final opens");
        // and a host extends the team's preliminary deadline,
        s.extend_deadline("preliminary", 5 * HOUR);
        let (sub, granted) = s.at(4 * HOUR + 60_000).submit("t1-cls");
        assert!(granted, "inside the extension");
        s.end(&sub, true);
        // then every decision, each rule of the schedule among them, replays as recorded.
        let report = replay(s.events());
        assert!(report.mismatches.is_empty(), "{:#?}", report.mismatches);
        assert_eq!(report.matched, report.decisions);
        let rules: std::collections::BTreeSet<String> = s
            .events()
            .iter()
            .filter_map(LedgerEvent::decode)
            .filter_map(|e| e.decision().map(|(_, d)| d.rule.clone()))
            .collect();
        for rule in ["", "not_open", "closed", "submit_interval"] {
            assert!(rules.contains(rule), "no `{rule}` decision in {rules:?}");
        }
    }

    /// Rewrites the payload of one recorded decision.
    fn tamper(ev: &mut StoredEvent, f: impl FnOnce(&mut Decision)) {
        if ev.event_type == AdmissionDenied::TYPE {
            let mut e = AdmissionDenied::decode(ev.payload.as_slice()).unwrap();
            f(e.decision.as_mut().unwrap());
            ev.payload = e.encode_to_vec();
        } else {
            let mut e = ResourcesGranted::decode(ev.payload.as_slice()).unwrap();
            f(e.decision.as_mut().unwrap());
            ev.payload = e.encode_to_vec();
        }
    }

    #[test]
    fn a_tampered_decision_is_the_one_mismatch() {
        let mut events = synthetic::ledger("demo", 5_000, 7);
        assert_eq!(replay(&events).mismatches, vec![]);
        let at = events
            .iter()
            .position(|e| {
                LedgerEvent::decode(e)
                    .and_then(|e| e.decision().map(|(_, d)| d.rule == "submit_interval"))
                    .unwrap_or(false)
            })
            .expect("a refused submit");
        // The host "moves" the retry time of one refusal an hour earlier.
        tamper(&mut events[at], |d| d.retry_after_ms -= 3_600_000);
        let report = replay(&events);
        assert_eq!(report.mismatches.len(), 1, "{:#?}", report.mismatches);
        let m = &report.mismatches[0];
        assert_eq!(
            (m.position, m.version),
            (events[at].position, events[at].version)
        );
        assert_eq!(m.differences.len(), 1, "{:?}", m.differences);
        assert!(
            m.differences[0].starts_with("retry after: recorded "),
            "{:?}",
            m.differences
        );
        assert_eq!(report.matched, report.decisions - 1);
    }

    #[test]
    fn a_grant_turned_into_a_refusal_is_found() {
        let mut events = synthetic::ledger("demo", 2_000, 3);
        let at = events
            .iter()
            .position(|e| e.event_type == ResourcesGranted::TYPE)
            .unwrap();
        tamper(&mut events[at], |d| {
            d.granted = false;
            d.rule = "team_gpus".into();
        });
        let report = replay(&events);
        assert_eq!(report.mismatches[0].version, events[at].version);
        assert!(
            report.mismatches[0]
                .differences
                .contains(&"granted: recorded false, replayed true".to_string()),
            "{:?}",
            report.mismatches[0].differences
        );
    }

    /// Points the override recorded in `ev` at a submission the ledger does not know, as if it re-opened nothing.
    fn aim_elsewhere(ev: &mut StoredEvent) {
        let mut e = OverrideGranted::decode(ev.payload.as_slice()).unwrap();
        e.grant.as_mut().unwrap().submission_id = "elsewhere".into();
        ev.payload = e.encode_to_vec();
    }

    #[test]
    fn decisions_under_a_reopened_slot_replay_from_the_override_on() {
        const MIN: i64 = 60_000;
        let mut s = synthetic::Script::new("demo");
        let (stuck, granted) = s.at(0).submit("t1-cls");
        assert!(granted);
        // Before the override, the stuck submit blocks the next one.
        let (_, granted) = s.at(10 * MIN).submit("t1-cls");
        assert!(!granted);
        let stuck_reopened = s.at(20 * MIN).reopen(&stuck);
        let (second, granted) = s.at(21 * MIN).submit("t1-cls");
        assert!(granted);
        s.at(30 * MIN).end(&second, true);
        // The second one succeeded: the interval counts from it.
        let (_, granted) = s.at(40 * MIN).submit("t1-cls");
        assert!(!granted);
        // It was scored wrongly: re-opened, it no longer starts the interval.
        let second_reopened = s.at(45 * MIN).reopen(&second);
        let (third, granted) = s.at(46 * MIN).submit("t1-cls");
        assert!(granted);
        s.at(50 * MIN).end(&third, false);
        s.at(55 * MIN).end(&stuck, true);
        let (_, granted) = s.at(56 * MIN).submit("t1-cls");
        assert!(granted, "neither re-opened success starts the interval");
        let mut events = s.events().to_vec();

        let report = replay(&events);
        assert_eq!(report.mismatches, vec![]);
        assert_eq!((report.decisions, report.matched), (6, 6));
        // Each decision names the re-opened slots that spared it a rule: the stuck submit while it runs, the
        // wrongly scored one while its interval would not have passed.
        let named: Vec<Vec<String>> = events
            .iter()
            .filter_map(|e| {
                LedgerEvent::decode(e)?
                    .decision()
                    .map(|(_, d)| d.overrides.clone())
            })
            .collect();
        let (a, b) = (stuck_reopened.clone(), second_reopened);
        assert_eq!(
            named,
            vec![
                vec![],
                vec![],
                vec![a.clone()],
                vec![a.clone()],
                vec![a.clone(), b.clone()],
                vec![a, b],
            ]
        );

        // Had the first override re-opened nothing, the submit it let in would not follow from the ledger.
        let at = events
            .iter()
            .position(|e| e.metadata.command_id == stuck_reopened)
            .unwrap();
        aim_elsewhere(&mut events[at]);
        let report = replay(&events);
        let first = &report.mismatches[0];
        assert_eq!(first.request.submission_id, second);
        assert!(
            first
                .differences
                .contains(&"granted: recorded true, replayed false".to_string()),
            "{:?}",
            first.differences
        );
    }

    #[test]
    fn a_refusal_decoded_into_the_one_before_is_the_refusal_decoded_afresh() {
        let events = synthetic::ledger("demo", 3_000, 9);
        let mut payloads: Vec<Vec<u8>> = events
            .iter()
            .filter(|e| e.event_type == AdmissionDenied::TYPE)
            .map(|e| e.payload.clone())
            .collect();
        assert!(payloads.len() > 100, "{}", payloads.len());
        // Payloads that leave out the request, the decision, or both, and one with a field of a later schema.
        let full = AdmissionDenied::decode(payloads[0].as_slice()).unwrap();
        for (request, decision) in [(true, false), (false, true), (false, false)] {
            let e = AdmissionDenied {
                request: full.request.clone().filter(|_| request),
                decision: full.decision.clone().filter(|_| decision),
            };
            payloads.insert(payloads.len() / 2, e.encode_to_vec());
        }
        let mut unknown = payloads[1].clone();
        unknown.extend_from_slice(&[0x18, 0x2a]);
        payloads.push(unknown);
        let mut into = AdmissionDenied::default();
        for p in &payloads {
            decode_reusing(&mut into, p).unwrap();
            assert_eq!(into, AdmissionDenied::decode(p.as_slice()).unwrap());
        }
        let truncated = &payloads[0][..payloads[0].len() - 1];
        assert!(decode_reusing(&mut into, truncated).is_err());
        assert!(AdmissionDenied::decode(truncated).is_err());
    }

    #[test]
    fn scope_limits_the_checked_decisions() {
        let events = synthetic::ledger("demo", 3_000, 5);
        let mut all = Report::default();
        replay_ledger("demo", &events, &Scope::default(), &mut all);
        let mut other = Report::default();
        let scope = Scope {
            competition: Some("other".into()),
            ..Default::default()
        };
        replay_ledger("demo", &events, &scope, &mut other);
        assert_eq!((other.decisions, other.events), (0, 3_000));
        let half = events[1_500].metadata.recorded_at_ms;
        let mut early = Report::default();
        let scope = Scope {
            until_ms: Some(half),
            ..Default::default()
        };
        replay_ledger("demo", &events, &scope, &mut early);
        assert!(early.events <= 1_501 && early.events >= 1_500, "{early:?}");
        assert!(early.decisions < all.decisions);
        let hidden = Scope {
            hosted: Some(vec!["elsewhere".into()]),
            ..Default::default()
        };
        let mut none = Report::default();
        replay_ledger("demo", &events, &hidden, &mut none);
        assert_eq!(none.decisions, 0);
    }
}
