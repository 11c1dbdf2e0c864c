//! The ledger's folding and the admission rule, as given/when/then over ledger events.

use nsml_common::aggregate::Aggregate;
use nsml_eventstore::StoredEvent;
use nsml_proto::v1::{
    AdmitRequest, Decision, EventPayload, Override, OverrideGranted, OverrideKind, Policy,
    PolicyChanged, QuotaRaise, Resources, ResourcesGranted, ResourcesReleased, Round, SessionKind,
    SubmitEnded, SubmitSucceeded,
};

use super::*;

pub(super) const G: u64 = 1024 * 1024 * 1024;
pub(super) const HOUR: i64 = 3_600_000;

pub(super) fn seed_policy() -> Policy {
    Policy {
        team_gpus: 2,
        team_cpus: 16,
        team_memory_bytes: 170 * G,
        team_sessions: 2,
        team_storage_bytes: 450 * G,
        submit_interval_secs: 3600,
        submit_time_limit_secs: 3600,
        submit_max_cpus: 4,
        opens_at_ms: 0,
        closes_at_ms: 0,
        rounds: Vec::new(),
    }
}

pub(super) fn req(
    kind: SessionKind,
    session: &str,
    gpus: u32,
    cpus: u32,
    sub: &str,
) -> AdmitRequest {
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

pub(super) fn stored<P: EventPayload>(p: &P) -> StoredEvent {
    nsml_common::event::stored("quota-demo", 1, p)
}

/// Given the events, the ledger they fold into (numbered as the stream would number them).
pub(super) fn given(events: &[StoredEvent]) -> Ledger {
    let mut l = Ledger::default();
    for (i, e) in events.iter().enumerate() {
        let mut e = e.clone();
        e.version = i as u64 + 1;
        l.apply(&e);
    }
    l
}

pub(super) fn granted(r: AdmitRequest, at: i64) -> StoredEvent {
    granted_with(r, at, &[])
}

pub(super) fn granted_with(r: AdmitRequest, at: i64, overrides: &[&str]) -> StoredEvent {
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

pub(super) fn released(session: &str) -> StoredEvent {
    stored(&ResourcesReleased {
        session: session.into(),
        ..Default::default()
    })
}

pub(super) fn succeeded(sub: &str, at: i64) -> StoredEvent {
    stored(&SubmitSucceeded {
        dataset: "t1-cls".into(),
        submission_id: sub.into(),
        at_ms: at,
    })
}

pub(super) fn failed(sub: &str, at: i64) -> StoredEvent {
    stored(&SubmitEnded {
        dataset: "t1-cls".into(),
        submission_id: sub.into(),
        succeeded: false,
        at_ms: at,
    })
}

pub(super) fn extra_submit(id: &str) -> StoredEvent {
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

pub(super) fn raise(id: &str, raise: QuotaRaise, until_ms: i64) -> StoredEvent {
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

pub(super) fn extended_deadline(id: &str, until_ms: i64) -> StoredEvent {
    stored(&OverrideGranted {
        grant: Some(Override {
            id: id.into(),
            competition: "demo".into(),
            team: "demo".into(),
            kind: OverrideKind::ExtendDeadline as i32,
            until_ms,
            reason: "their machine failed in the last hour".into(),
            granted_by: "user:host".into(),
            ..Default::default()
        }),
    })
}

#[test]
fn given_a_schedule_then_nothing_runs_before_it_opens_and_no_submit_after_it_closes() {
    let (opens, closes) = (1_000_000, 2_000_000);
    let policy = Policy {
        opens_at_ms: opens,
        closes_at_ms: closes,
        ..seed_policy()
    };
    let l = given(&[]);
    let train = req(SessionKind::Train, "demo/t1-cls/1", 0, 2, "");
    let early = decide(&l, &policy, &train, opens - 1);
    assert_eq!((early.granted, early.rule.as_str()), (false, "not_open"));
    assert_eq!(early.retry_after_ms, opens, "retry when it opens");
    assert!(early.reason.contains("opens at"), "{}", early.reason);
    assert!(decide(&l, &policy, &train, opens).granted);
    // After the deadline, training still runs; submits, trial or real, are refused.
    assert!(decide(&l, &policy, &train, closes + 1).granted);
    for kind in [SessionKind::Submit, SessionKind::TrialSubmit] {
        let submit = req(kind, "demo/t1-cls/2", 0, 2, "s1");
        assert!(decide(&l, &policy, &submit, closes - 1).granted, "{kind:?}");
        let late = decide(&l, &policy, &submit, closes);
        assert_eq!((late.granted, late.rule.as_str()), (false, "closed"));
        assert!(late.reason.contains("closed at"), "{}", late.reason);
    }
}

#[test]
fn given_an_extended_deadline_then_the_team_submits_until_it() {
    let closes = 2_000_000;
    let policy = Policy {
        closes_at_ms: closes,
        ..seed_policy()
    };
    let l = given(&[extended_deadline("o-1", closes + 3_600_000)]);
    let submit = req(SessionKind::Submit, "demo/t1-cls/2", 0, 2, "s1");
    assert!(decide(&l, &policy, &submit, closes + 60_000).granted);
    let late = decide(&l, &policy, &submit, closes + 3_600_000);
    assert_eq!((late.granted, late.rule.as_str()), (false, "closed"));
    assert!(
        late.reason.contains("extended by override o-1"),
        "{}",
        late.reason
    );
}

/// A competition open from 0 to `10 * HOUR` with a preliminary round on `t1-cls` (HOUR to 4 h, a real submit
/// every 10 minutes on at most 2 CPUs) and a final round on `t2-reg` (6 h to 9 h); `t3` is in no round.
fn with_rounds() -> Policy {
    Policy {
        closes_at_ms: 10 * HOUR,
        rounds: vec![
            Round {
                name: "preliminary".into(),
                datasets: vec!["t1-cls".into()],
                opens_at_ms: HOUR,
                closes_at_ms: 4 * HOUR,
                submit_interval_secs: Some(600),
                submit_max_cpus: Some(2),
                ..Default::default()
            },
            Round {
                name: "final".into(),
                datasets: vec!["t2-reg".into()],
                opens_at_ms: 6 * HOUR,
                closes_at_ms: 9 * HOUR,
                ..Default::default()
            },
        ],
        ..seed_policy()
    }
}

fn on(dataset: &str, mut r: AdmitRequest) -> AdmitRequest {
    r.dataset = dataset.into();
    r
}

fn extended_round_deadline(id: &str, round: &str, until_ms: i64) -> StoredEvent {
    stored(&OverrideGranted {
        grant: Some(Override {
            id: id.into(),
            competition: "demo".into(),
            team: "demo".into(),
            kind: OverrideKind::ExtendDeadline as i32,
            until_ms,
            round: round.into(),
            reason: "their machine failed in the last hour of the round".into(),
            granted_by: "user:host".into(),
            ..Default::default()
        }),
    })
}

#[test]
fn given_rounds_then_a_rounds_dataset_follows_the_rounds_schedule() {
    let policy = with_rounds();
    let l = given(&[]);
    // Before the final opens, a run on its dataset is refused naming the round, with when to retry.
    let train = on("t2-reg", req(SessionKind::Train, "demo/t2-reg/1", 0, 2, ""));
    let early = decide(&l, &policy, &train, 5 * HOUR);
    assert_eq!((early.granted, early.rule.as_str()), (false, "not_open"));
    assert_eq!(early.retry_after_ms, 6 * HOUR);
    assert!(
        early
            .reason
            .contains("round `final` of competition `demo` opens at")
            && early.reason.contains("(t2-reg)"),
        "{}",
        early.reason
    );
    // Meanwhile the preliminary's dataset runs and submits, and a dataset in no round follows the competition.
    let pre_submit = req(SessionKind::Submit, "demo/t1-cls/2", 0, 2, "s1");
    assert!(decide(&l, &policy, &pre_submit, 2 * HOUR).granted);
    let other = on("t3", req(SessionKind::Submit, "demo/t3/2", 0, 2, "s2"));
    assert!(decide(&l, &policy, &other, 5 * HOUR).granted);
    // The final opens; training on the preliminary's dataset goes on after the preliminary closes, its submits
    // (trial or real) are refused naming the round.
    assert!(decide(&l, &policy, &train, 6 * HOUR).granted);
    let pre_train = req(SessionKind::Train, "demo/t1-cls/3", 0, 2, "");
    assert!(decide(&l, &policy, &pre_train, 5 * HOUR).granted);
    for kind in [SessionKind::Submit, SessionKind::TrialSubmit] {
        let late = decide(
            &l,
            &policy,
            &req(kind, "demo/t1-cls/4", 0, 2, "s3"),
            4 * HOUR,
        );
        assert_eq!(
            (late.granted, late.rule.as_str()),
            (false, "closed"),
            "{kind:?}"
        );
        assert!(
            late.reason
                .contains("round `preliminary` of competition `demo` closed at"),
            "{}",
            late.reason
        );
    }
    // The final's submits close at its own deadline, the other datasets' at the competition's.
    let fin = on(
        "t2-reg",
        req(SessionKind::Submit, "demo/t2-reg/5", 0, 2, "s4"),
    );
    assert!(decide(&l, &policy, &fin, 9 * HOUR - 1).granted);
    assert_eq!(decide(&l, &policy, &fin, 9 * HOUR).rule, "closed");
    assert!(decide(&l, &policy, &other, 10 * HOUR - 1).granted);
    assert_eq!(decide(&l, &policy, &other, 10 * HOUR).rule, "closed");
}

#[test]
fn given_a_round_that_sets_submit_rules_then_they_replace_the_competitions_on_its_datasets() {
    let policy = with_rounds();
    // Given a preliminary submit that succeeded at 2 h,
    let l = given(&[
        granted(
            req(SessionKind::Submit, "demo/t1-cls/2", 0, 2, "s1"),
            2 * HOUR,
        ),
        released("demo/t1-cls/2"),
        succeeded("s1", 2 * HOUR),
    ]);
    // the round's 10-minute interval applies, not the competition's hour,
    let next = req(SessionKind::Submit, "demo/t1-cls/3", 0, 2, "s2");
    let early = decide(&l, &policy, &next, 2 * HOUR + 5 * 60_000);
    assert_eq!(
        (early.granted, early.rule.as_str()),
        (false, "submit_interval")
    );
    assert!(
        early
            .reason
            .contains("one real submit per 10 minutes per dataset of round `preliminary`"),
        "{}",
        early.reason
    );
    assert!(decide(&l, &policy, &next, 2 * HOUR + 10 * 60_000).granted);
    // and its CPU cap of 2, where the competition allows 4.
    let wide = req(SessionKind::Submit, "demo/t1-cls/4", 0, 3, "s3");
    let d = decide(&l, &policy, &wide, 3 * HOUR);
    assert_eq!((d.granted, d.rule.as_str()), (false, "submit_cpus"));
    assert!(
        d.reason
            .contains("a submit in round `preliminary` may use at most 2 CPUs"),
        "{}",
        d.reason
    );
    // A dataset in no round keeps the competition's rules.
    assert!(decide(&l, &policy, &on("t3", wide), 3 * HOUR).granted);
    // And `nsml quota` says when the next submit is allowed by the round's interval.
    let st = next_submit(&l, &policy, "t1-cls", 2 * HOUR + 60_000);
    assert_eq!(st.next_allowed_ms, 2 * HOUR + 10 * 60_000);
}

#[test]
fn given_an_extension_for_a_round_then_the_team_submits_on_its_datasets_until_it() {
    let policy = with_rounds();
    let l = given(&[extended_round_deadline("o-1", "preliminary", 5 * HOUR)]);
    let pre = req(SessionKind::Submit, "demo/t1-cls/2", 0, 2, "s1");
    assert!(decide(&l, &policy, &pre, 4 * HOUR + 60_000).granted);
    let late = decide(&l, &policy, &pre, 5 * HOUR);
    assert_eq!((late.granted, late.rule.as_str()), (false, "closed"));
    assert!(
        late.reason
            .contains("the team's deadline for round `preliminary`, extended by override o-1"),
        "{}",
        late.reason
    );
    // The round's extension moves neither the final's deadline nor the competition's.
    let fin = on(
        "t2-reg",
        req(SessionKind::Submit, "demo/t2-reg/3", 0, 2, "s2"),
    );
    assert_eq!(decide(&l, &policy, &fin, 9 * HOUR).rule, "closed");
    // And an extension of the competition's deadline does not reopen a round that closed on its own.
    let l = given(&[extended_deadline("o-2", 11 * HOUR)]);
    assert_eq!(decide(&l, &policy, &pre, 4 * HOUR).rule, "closed");
    let other = on("t3", req(SessionKind::Submit, "demo/t3/4", 0, 2, "s3"));
    assert!(decide(&l, &policy, &other, 10 * HOUR + 60_000).granted);
}

#[test]
fn an_extension_names_a_round_the_policy_has() {
    let policy = with_rounds();
    let deadline = OverrideKind::ExtendDeadline;
    assert!(check_round(deadline, "final", "demo", Some(&policy)).is_ok());
    assert!(check_round(deadline, "", "demo", Some(&policy)).is_ok());
    let err = check_round(deadline, "semi", "demo", Some(&policy)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "competition `demo` has no round `semi`; its rounds are `preliminary`, `final`"
    );
    let err = check_round(deadline, "final", "demo", Some(&seed_policy())).unwrap_err();
    assert!(err.to_string().contains("its rounds are none"), "{err}");
    let err = check_round(OverrideKind::ExtraSubmit, "final", "demo", Some(&policy)).unwrap_err();
    assert!(
        err.to_string()
            .contains("only an extended deadline names a round"),
        "{err}"
    );
}

pub(super) fn policy_changed(policy: Policy, version: u64) -> StoredEvent {
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
        d.reason.contains(
            "holds 0G of memory including shared memory (nothing), asked 17179869184G, limit 170G;"
        ),
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
    assert!(
        d.reason.contains("demo/t1-cls/2 (trial)")
            && !d.reason.contains("demo/t1-cls/1 (trial)")
            && d.reason
                .contains("holds its resources and its slot until it is removed"),
        "the refusal says which sessions are trials that hold their slot after they end: {}",
        d.reason
    );
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
    let p = l.policy("demo").cloned().unwrap();
    assert_eq!((p.version, p.since), (1, 1));
    let next = req(SessionKind::Submit, "demo/t1-cls/3", 0, 4, "s2");
    let d = decide(&l, &p.policy, &next, 20 * 60_000);
    assert_eq!((d.granted, d.rule.as_str()), (false, "submit_interval"));

    let mut l = l;
    let mut change = policy_changed(quicker, 2);
    change.version = 5;
    l.apply(&change);
    let p = l.policy("demo").cloned().unwrap();
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

pub(super) fn reopen(id: &str, sub: &str) -> StoredEvent {
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
pub(super) fn success(n: u32, sub: &str, at: i64) -> [StoredEvent; 3] {
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
