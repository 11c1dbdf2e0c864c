//! Properties of the admission rule over random policies, holdings and requests, full ranges included: a
//! granted request never leaves the team over any limit. The sums are taken in u128 here, so a sum that would
//! wrap in the rule's own integer types is seen for what it is.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

use nsml_common::aggregate::Aggregate;
use nsml_proto::v1::{
    AdmitRequest, Decision, Override, OverrideGranted, OverrideKind, Policy, QuotaRaise, Resources,
    ResourcesGranted, SessionKind,
};
use nsml_quota::domain::{Ledger, decide};
use proptest::prelude::*;

/// A u32 drawn from small values, the top of the range and anywhere between: limits and holdings of a few
/// units find ordinary refusals, the maxima find sums that wrap.
fn any_u32() -> impl Strategy<Value = u32> {
    prop_oneof![
        0..=32u32,
        (u32::MAX - 16)..=u32::MAX,
        Just(u32::MAX),
        any::<u32>(),
    ]
}

/// As [`any_u32`], for byte counts: a few GiB, the top of the range, anywhere.
fn any_u64() -> impl Strategy<Value = u64> {
    const G: u64 = 1 << 30;
    prop_oneof![
        (0..=256u64).prop_map(|g| g * G),
        (u64::MAX - 16 * G)..=u64::MAX,
        Just(u64::MAX),
        any::<u64>(),
    ]
}

fn resources() -> impl Strategy<Value = Resources> {
    (any_u32(), any_u32(), any_u64(), any_u64()).prop_map(
        |(gpus, cpus, memory_bytes, shm_bytes)| Resources {
            gpus,
            cpus,
            memory_bytes,
            shm_bytes,
        },
    )
}

fn policy() -> impl Strategy<Value = Policy> {
    (any_u32(), any_u32(), any_u64(), 0..=8u32, any_u32()).prop_map(
        |(team_gpus, team_cpus, team_memory_bytes, team_sessions, submit_max_cpus)| Policy {
            team_gpus,
            team_cpus,
            team_memory_bytes,
            team_sessions,
            submit_max_cpus,
            submit_interval_secs: 3600,
            submit_time_limit_secs: 3600,
            team_storage_bytes: 0,
            opens_at_ms: 0,
            closes_at_ms: 0,
            rounds: Vec::new(),
        },
    )
}

fn raise() -> impl Strategy<Value = Option<QuotaRaise>> {
    proptest::option::of((any_u32(), any_u32(), any_u64(), 0..=8u32).prop_map(
        |(gpus, cpus, memory_bytes, sessions)| QuotaRaise {
            gpus,
            cpus,
            memory_bytes,
            sessions,
        },
    ))
}

fn request(kind: SessionKind, session: String, resources: Resources) -> AdmitRequest {
    AdmitRequest {
        team: "rivals".into(),
        competition: "c".into(),
        kind: kind as i32,
        dataset: "ds".into(),
        submission_id: if kind == SessionKind::Submit {
            format!("sub-{session}")
        } else {
            String::new()
        },
        command_id: session.clone(),
        session,
        resources: Some(resources),
        seen_position: 0,
    }
}

/// The ledger of a team holding `held` (one training session each) and, when given, a raise in force.
fn ledger(held: &[Resources], raise: Option<QuotaRaise>) -> Ledger {
    let mut l = Ledger::default();
    let mut version = 0;
    let mut push = |l: &mut Ledger, ev| {
        version += 1;
        let mut ev: nsml_eventstore::StoredEvent = ev;
        ev.version = version;
        l.apply(&ev);
    };
    if let Some(r) = raise {
        push(
            &mut l,
            nsml_common::event::stored(
                "quota-rivals",
                1,
                &OverrideGranted {
                    grant: Some(Override {
                        id: "raise".into(),
                        competition: "c".into(),
                        team: "rivals".into(),
                        kind: OverrideKind::RaiseQuota as i32,
                        raise: Some(r),
                        until_ms: i64::MAX,
                        ..Default::default()
                    }),
                },
            ),
        );
    }
    for (i, r) in held.iter().enumerate() {
        push(
            &mut l,
            nsml_common::event::stored(
                "quota-rivals",
                1,
                &ResourcesGranted {
                    request: Some(request(SessionKind::Train, format!("rivals/ds/{i}"), *r)),
                    decision: Some(Decision {
                        granted: true,
                        ..Default::default()
                    }),
                },
            ),
        );
    }
    l
}

proptest! {
    // Failures are not persisted: a counterexample is printed, and the test is rerun as it stands.
    #![proptest_config(ProptestConfig {
        cases: 4096,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Whatever the team holds and asks, a grant leaves it within every limit in force, as wide arithmetic
    /// counts them; and a refusal names the rule that fired.
    #[test]
    fn a_grant_never_leaves_the_team_over_a_limit(
        policy in policy(),
        raise in raise(),
        held in proptest::collection::vec(resources(), 0..4),
        asked in resources(),
        submit in any::<bool>(),
    ) {
        let l = ledger(&held, raise);
        let kind = if submit { SessionKind::Submit } else { SessionKind::Train };
        let req = request(kind, "rivals/ds/new".into(), asked);
        let d = decide(&l, &policy, &req, 0);
        let limits = l.limits("c", &policy, 0);
        // The limits in force are at least the policy's.
        prop_assert!(limits.gpus >= policy.team_gpus && limits.cpus >= policy.team_cpus);
        prop_assert!(limits.memory_bytes >= policy.team_memory_bytes);
        prop_assert!(limits.sessions >= policy.team_sessions);
        if !d.granted {
            prop_assert!(!d.rule.is_empty() && !d.reason.is_empty(), "{d:?}");
            return Ok(());
        }
        let all = held.iter().chain(std::iter::once(&asked));
        let sum = |f: fn(&Resources) -> u128| all.clone().map(f).sum::<u128>();
        let gpus = sum(|r| r.gpus.into());
        let cpus = sum(|r| r.cpus.into());
        let memory = sum(|r| u128::from(r.memory_bytes) + u128::from(r.shm_bytes));
        prop_assert!(held.len() < limits.sessions as usize, "sessions over the limit: {d:?}");
        prop_assert!(gpus <= limits.gpus.into(), "{gpus} GPUs granted, limit {}: {d:?}", limits.gpus);
        prop_assert!(cpus <= limits.cpus.into(), "{cpus} CPUs granted, limit {}: {d:?}", limits.cpus);
        prop_assert!(
            memory <= limits.memory_bytes.into(),
            "{memory} bytes of memory granted, limit {}: {d:?}",
            limits.memory_bytes
        );
        if submit {
            prop_assert!(asked.cpus <= policy.submit_max_cpus, "a submit over the CPU cap: {d:?}");
        }
    }
}
