//! When a team's next real submit on a dataset is allowed, and why, as `nsml quota` shows it.

use nsml_proto::v1::{DatasetSubmitState, Policy};

use super::format::{fmt_time, human_secs};
use super::ledger::{Ledger, SubmitState, interval_ms};

/// When the next real submit on `dataset` is allowed at `now`, and why.
pub fn next_submit(
    ledger: &Ledger,
    policy: &Policy,
    dataset: &str,
    now: i64,
) -> DatasetSubmitState {
    let empty = SubmitState::default();
    let st = ledger.submits.get(dataset).unwrap_or(&empty);
    let extra = ledger.extra_submits(dataset) as u32;
    // A dataset in a round follows the round's interval where the round sets one.
    let rules = policy.rules_for(dataset);
    let interval = interval_ms(rules.submit_interval_secs);
    let last = st.last_success();
    let last_sub = last
        .map(|l| l.submission_id.to_string())
        .unwrap_or_default();
    let last_success_ms = last.map(|l| l.at_ms);
    let next = last_success_ms.map_or(0, |t| t.saturating_add(interval));
    let in_flight = st
        .counted_in_flight()
        .next()
        .map(|(s, _)| s.clone())
        .unwrap_or_default();
    let why = Why {
        interval_secs: rules.submit_interval_secs,
        st,
        in_flight: &in_flight,
        last_sub: &last_sub,
        last_success_ms,
        next,
        extra,
        interval,
        now,
    }
    .say();
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
        // The schedule's word is `on_schedule`'s.
        not_open: false,
        closed: false,
    }
}

/// `state` (the interval's word on `dataset`) under the competition's schedule: before the dataset opens (its
/// round's opening, or the competition's), the next submit is at its opening; from its deadline (the team's, where
/// a host extended it for the dataset's round or the competition), never.
pub fn on_schedule(
    mut state: DatasetSubmitState,
    ledger: &Ledger,
    policy: &Policy,
    competition: &str,
    now: i64,
) -> DatasetSubmitState {
    let rules = policy.rules_for(&state.dataset);
    let whose = rules.round.map_or_else(
        || "the competition".to_string(),
        |r| format!("round `{}`", r.name),
    );
    if rules.opens_at_ms > now {
        state.not_open = true;
        state.next_allowed_ms = state.next_allowed_ms.max(rules.opens_at_ms);
        state.why = format!(
            "not before {}, when {whose} opens: runs and submits on it are refused until then",
            fmt_time(rules.opens_at_ms)
        );
        return state;
    }
    if rules.closes_at_ms <= 0 {
        return state;
    }
    let extended = ledger.extended_deadline(competition, |round| rules.extended_by(round));
    let deadline = extended.map_or(rules.closes_at_ms, |(_, until)| {
        until.max(rules.closes_at_ms)
    });
    if now >= deadline {
        state.closed = true;
        state.next_allowed_ms = 0;
        state.why = format!(
            "never: {whose} closed at {}; the boards show what they showed then",
            fmt_time(deadline)
        );
    }
    state
}

/// What the explanation of a dataset's next submit rests on.
struct Why<'a> {
    /// The submit interval the dataset follows.
    interval_secs: u64,
    st: &'a SubmitState,
    /// The submit in flight that counts, or empty.
    in_flight: &'a str,
    /// The last successful submit that counts, or empty.
    last_sub: &'a str,
    last_success_ms: Option<i64>,
    /// When the interval allows the next one (0: no success counts).
    next: i64,
    extra: u32,
    interval: i64,
    now: i64,
}

impl Why<'_> {
    /// The explanation, naming the re-opened slots while they make a difference.
    fn say(&self) -> String {
        let why = self.when();
        // Slots a host re-opened: they count neither as in flight nor towards the interval. Named while they
        // make a difference: the submit still runs, or its interval would not have passed.
        let spared: Vec<String> = self
            .st
            .reopened_in_flight
            .iter()
            .map(|(s, id)| format!("{s} (in flight, override {id})"))
            .chain(
                self.st
                    .reopened_in_interval(self.interval, self.now)
                    .map(|(_, s, id)| format!("{s} (succeeded, override {id})")),
            )
            .collect();
        if spared.is_empty() {
            why
        } else {
            format!(
                "{why}; not counted, as a host re-opened their slot: submission {}",
                spared.join(", submission ")
            )
        }
    }

    /// When the next submit is allowed, and which rule says so.
    fn when(&self) -> String {
        let (next, now, last_sub) = (self.next, self.now, self.last_sub);
        let rule = format!(
            "one real submit per {} per dataset, counted from the last successful one",
            human_secs(self.interval_secs)
        );
        if !self.in_flight.is_empty() {
            format!(
                "not now: submission {} is in flight; the next real submit may be requested when it ends{}",
                self.in_flight,
                if next > now {
                    format!(" and the interval allows it (at {})", fmt_time(next))
                } else {
                    String::new()
                }
            )
        } else if let Some(last) = self.last_success_ms.filter(|_| next > now) {
            if self.extra > 0 {
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
        } else if let Some(last) = self.last_success_ms {
            format!(
                "now: the last successful submit (submission {last_sub}, submitted at {}) is more than {} ago",
                fmt_time(last),
                human_secs(self.interval_secs)
            )
        } else if !self.st.reopened_successes.is_empty() {
            "now: no successful real submit counts (failed and timed-out submits do not count, nor those whose slot a host re-opened)".into()
        } else {
            "now: no successful real submit yet (failed and timed-out submits do not count)".into()
        }
    }
}

#[cfg(test)]
mod tests {
    use nsml_proto::v1::SessionKind;

    use super::*;
    use crate::domain::tests::{HOUR, extra_submit, given, granted, req, seed_policy, success};

    #[test]
    fn given_a_round_not_yet_open_or_closed_then_the_next_submit_follows_its_schedule() {
        // Given t1-cls in a round open from 2 h to 4 h, and a ledger with no submit,
        let mut policy = seed_policy();
        policy.rounds.push(nsml_proto::v1::Round {
            name: "final".into(),
            datasets: vec!["t1-cls".into()],
            opens_at_ms: 2 * HOUR,
            closes_at_ms: 4 * HOUR,
            ..Default::default()
        });
        let l = Ledger::default();
        let at = |now| {
            let st = next_submit(&l, &policy, "t1-cls", now);
            on_schedule(st, &l, &policy, "c1", now)
        };
        // when asked before it opens, then the next submit is at the opening, naming the round;
        let before = at(HOUR);
        assert!(before.not_open && !before.closed);
        assert_eq!(before.next_allowed_ms, 2 * HOUR);
        assert!(before.why.contains("round `final` opens"), "{}", before.why);
        // while it is open, then now;
        let open = at(3 * HOUR);
        assert!(!open.not_open && !open.closed);
        assert_eq!(open.next_allowed_ms, 0);
        // from its deadline, then never.
        let after = at(4 * HOUR);
        assert!(after.closed);
        assert!(
            after.why.starts_with("never: round `final` closed"),
            "{}",
            after.why
        );
    }

    #[test]
    fn the_next_submit_is_allowed_an_interval_after_the_last_success() {
        // Given a submit that succeeded at 1 h,
        let l = given(&success(1, "sub-1", HOUR));
        // when the team asks at 1 h 30 m,
        let st = next_submit(&l, &seed_policy(), "t1-cls", HOUR + HOUR / 2);
        // then the next one is allowed at 2 h, and the why says which rule and which submit.
        assert_eq!(
            (st.last_success_ms, st.next_allowed_ms, st.in_flight),
            (HOUR, 2 * HOUR, false)
        );
        assert!(
            st.why.starts_with("at ")
                && st.why.contains("one real submit per 1 hour per dataset")
                && st.why.contains("submission sub-1 succeeded"),
            "{}",
            st.why
        );
        // And once the interval has passed, now.
        let later = next_submit(&l, &seed_policy(), "t1-cls", 3 * HOUR);
        assert_eq!(later.next_allowed_ms, 0);
        assert!(
            later.why.starts_with("now: the last successful submit"),
            "{}",
            later.why
        );
    }

    #[test]
    fn a_submit_in_flight_holds_the_next_one() {
        // Given a submit admitted and not yet ended,
        let l = given(&[granted(
            req(SessionKind::Submit, "demo/t1-cls/1", 0, 4, "sub-1"),
            0,
        )]);
        // when the team asks,
        let st = next_submit(&l, &seed_policy(), "t1-cls", HOUR);
        // then not now, naming the submit in flight.
        assert!(st.in_flight);
        assert_eq!(st.in_flight_submission_id, "sub-1");
        assert!(
            st.why.starts_with("not now: submission sub-1 is in flight"),
            "{}",
            st.why
        );
    }

    #[test]
    fn an_extra_submit_allows_one_now_inside_the_interval() {
        // Given a success at 1 h and a host's extra submit,
        let mut events = success(1, "sub-1", HOUR).to_vec();
        events.push(extra_submit("ovr-1"));
        let l = given(&events);
        // when the team asks inside the interval,
        let st = next_submit(&l, &seed_policy(), "t1-cls", HOUR + 60_000);
        // then now, once, and the interval is still named.
        assert_eq!(st.extra_submits, 1);
        assert!(
            st.why
                .starts_with("now, once: a host granted an extra submit"),
            "{}",
            st.why
        );
    }

    #[test]
    fn a_team_that_never_succeeded_may_submit_now() {
        // Given an empty ledger, when the team asks, then now.
        let st = next_submit(&Ledger::default(), &seed_policy(), "t1-cls", HOUR);
        assert_eq!((st.next_allowed_ms, st.in_flight), (0, false));
        assert_eq!(
            st.why,
            "now: no successful real submit yet (failed and timed-out submits do not count)"
        );
    }
}
