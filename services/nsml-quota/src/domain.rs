//! The team ledger and the pure admission rule: `decide(ledger, policy, request, now) -> Decision`.

use std::collections::{BTreeMap, BTreeSet};

use nsml_common::aggregate::Aggregate;
use nsml_common::event::decode;
use nsml_eventstore::StoredEvent;
use nsml_proto::v1::{
    AdmissionDenied, AdmitRequest, Decision, Policy, Resources, ResourcesGranted,
    ResourcesReleased, SessionKind, SubmitEnded, SubmitSucceeded,
};

/// Resources held by one session.
#[derive(Debug, Clone, PartialEq)]
pub struct Holding {
    pub resources: Resources,
    pub kind: SessionKind,
    pub dataset: String,
    pub submission_id: String,
}

/// Submit history of one dataset.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SubmitState {
    /// Time of the last successful real submit (when it was submitted).
    pub last_success_ms: Option<i64>,
    /// Real submits admitted and not yet ended.
    pub in_flight: BTreeSet<String>,
}

/// One team's ledger, folded from `quota-TEAM`.
#[derive(Debug, Clone, Default)]
pub struct Ledger {
    pub holdings: BTreeMap<String, Holding>,
    pub submits: BTreeMap<String, SubmitState>,
    /// Decisions by command id, so a repeated request gets the first decision.
    pub decisions: BTreeMap<String, Decision>,
    /// Submission id → submitted-at time, for granted real submits.
    pub granted_submits: BTreeMap<String, (String, i64)>,
}

impl Ledger {
    /// The sum of what the team holds.
    pub fn held(&self) -> Resources {
        self.holdings
            .values()
            .fold(Resources::default(), |mut acc, h| {
                acc.gpus += h.resources.gpus;
                acc.cpus += h.resources.cpus;
                acc.memory_bytes += h.resources.memory_bytes;
                acc.shm_bytes += h.resources.shm_bytes;
                acc
            })
    }

    fn holders(&self, f: impl Fn(&Resources) -> u64, unit: impl Fn(u64) -> String) -> String {
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
}

impl Aggregate for Ledger {
    fn apply(&mut self, ev: &StoredEvent) {
        if let Some(e) = decode::<ResourcesGranted>(ev) {
            let (Some(req), Some(d)) = (e.request, e.decision) else {
                return;
            };
            self.holdings.insert(
                req.session.clone(),
                Holding {
                    resources: req.resources.unwrap_or_default(),
                    kind: req.kind(),
                    dataset: req.dataset.clone(),
                    submission_id: req.submission_id.clone(),
                },
            );
            if req.kind() == SessionKind::Submit {
                self.submits
                    .entry(req.dataset.clone())
                    .or_default()
                    .in_flight
                    .insert(req.submission_id.clone());
                self.granted_submits.insert(
                    req.submission_id.clone(),
                    (req.dataset.clone(), d.decided_at_ms),
                );
            }
            self.decisions.insert(req.command_id, d);
        } else if let Some(e) = decode::<AdmissionDenied>(ev) {
            if let (Some(req), Some(d)) = (e.request, e.decision) {
                self.decisions.insert(req.command_id, d);
            }
        } else if let Some(e) = decode::<ResourcesReleased>(ev) {
            self.holdings.remove(&e.session);
        } else if let Some(e) = decode::<SubmitSucceeded>(ev) {
            let s = self.submits.entry(e.dataset).or_default();
            s.in_flight.remove(&e.submission_id);
            s.last_success_ms = Some(s.last_success_ms.map_or(e.at_ms, |t| t.max(e.at_ms)));
        } else if let Some(e) = decode::<SubmitEnded>(ev) {
            self.submits
                .entry(e.dataset)
                .or_default()
                .in_flight
                .remove(&e.submission_id);
        }
    }
}

/// Formats bytes as NSML showed memory (`24G`, `512M`).
pub fn gib(b: u64) -> String {
    const G: u64 = 1024 * 1024 * 1024;
    const M: u64 = 1024 * 1024;
    if b.is_multiple_of(G) {
        format!("{}G", b / G)
    } else if b >= G {
        format!("{:.1}G", b as f64 / G as f64)
    } else {
        format!("{}M", b.div_ceil(M))
    }
}

/// Formats a recorded time as RFC 3339 UTC, seconds precision.
fn fmt_time(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_else(|| format!("{ms} ms after the epoch"))
}

/// A refusal: the rule, the explanation, when to retry.
fn deny(rule: &str, reason: String, retry_after_ms: i64) -> Decision {
    Decision {
        granted: false,
        rule: rule.into(),
        reason,
        retry_after_ms,
        ..Default::default()
    }
}

/// Decides whether `req` may hold its resources now. Pure: everything it needs is passed in.
pub fn decide(ledger: &Ledger, policy: &Policy, req: &AdmitRequest, now_ms: i64) -> Decision {
    let asked = req.resources.unwrap_or_default();
    let team = &req.team;
    if ledger.holdings.contains_key(&req.session) {
        return deny(
            "duplicate",
            format!("session {} already holds resources", req.session),
            0,
        );
    }
    if req.kind() == SessionKind::Submit {
        let st = ledger
            .submits
            .get(&req.dataset)
            .cloned()
            .unwrap_or_default();
        if let Some(other) = st.in_flight.iter().next() {
            return deny(
                "submit_in_flight",
                format!(
                    "team `{team}` already has a submit of dataset `{}` in flight (submission {other}); wait for it to finish",
                    req.dataset
                ),
                0,
            );
        }
        if let Some(last) = st.last_success_ms {
            let next = last + policy.submit_interval_secs as i64 * 1000;
            if now_ms < next {
                let wait_s = (next - now_ms + 999) / 1000;
                return deny(
                    "submit_interval",
                    format!(
                        "submit limit: one real submit per {} per dataset, counted from the last successful one; team `{team}` last submitted `{}` successfully at {}, so the next submit is allowed at {} (in {}m {}s)",
                        human_secs(policy.submit_interval_secs),
                        req.dataset,
                        fmt_time(last),
                        fmt_time(next),
                        wait_s / 60,
                        wait_s % 60
                    ),
                    next,
                );
            }
        }
        if asked.cpus > policy.submit_max_cpus {
            return deny(
                "submit_cpus",
                format!(
                    "a submit may use at most {} CPUs, asked {}",
                    policy.submit_max_cpus, asked.cpus
                ),
                0,
            );
        }
    }
    let held = ledger.held();
    let free_hint = "stop or remove a session (`nsml stop`, `nsml rm -f`) to free them";
    if ledger.holdings.len() as u32 + 1 > policy.team_sessions {
        let names: Vec<&str> = ledger.holdings.keys().map(|s| s.as_str()).collect();
        return deny(
            "team_sessions",
            format!(
                "team `{team}` already runs {} of its {} concurrent sessions ({}); {free_hint}",
                ledger.holdings.len(),
                policy.team_sessions,
                names.join(", ")
            ),
            0,
        );
    }
    if held.gpus + asked.gpus > policy.team_gpus {
        return deny(
            "team_gpus",
            format!(
                "team `{team}` holds {} GPUs ({}), asked {}, limit {}; {free_hint}",
                held.gpus,
                ledger.holders(|r| r.gpus as u64, |v| v.to_string()),
                asked.gpus,
                policy.team_gpus
            ),
            0,
        );
    }
    if held.cpus + asked.cpus > policy.team_cpus {
        return deny(
            "team_cpus",
            format!(
                "team `{team}` holds {} CPUs ({}), asked {}, limit {}; {free_hint}",
                held.cpus,
                ledger.holders(|r| r.cpus as u64, |v| v.to_string()),
                asked.cpus,
                policy.team_cpus
            ),
            0,
        );
    }
    let held_mem = held.memory_bytes + held.shm_bytes;
    let asked_mem = asked.memory_bytes + asked.shm_bytes;
    if held_mem + asked_mem > policy.team_memory_bytes {
        return deny(
            "team_memory",
            format!(
                "team `{team}` holds {} of memory including shared memory ({}), asked {}, limit {}; {free_hint}",
                gib(held_mem),
                ledger.holders(|r| r.memory_bytes + r.shm_bytes, gib),
                gib(asked_mem),
                gib(policy.team_memory_bytes)
            ),
            0,
        );
    }
    Decision {
        granted: true,
        ..Default::default()
    }
}

fn human_secs(s: u64) -> String {
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
    use nsml_common::event::new_event;
    use nsml_eventstore::StoredEvent;
    use nsml_proto::v1::EventPayload;

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
        }
    }

    fn stored<P: EventPayload>(p: &P) -> StoredEvent {
        let e = new_event(p, "test", "");
        StoredEvent {
            position: 1,
            stream: "quota-demo".into(),
            version: 1,
            event_type: e.event_type,
            payload: e.payload,
            metadata: e.metadata,
            hash: String::new(),
        }
    }

    /// Given the events, the ledger they fold into.
    fn given(events: &[StoredEvent]) -> Ledger {
        let mut l = Ledger::default();
        for e in events {
            l.apply(e);
        }
        l
    }

    fn granted(r: AdmitRequest, at: i64) -> StoredEvent {
        stored(&ResourcesGranted {
            request: Some(r),
            decision: Some(Decision {
                granted: true,
                decided_at_ms: at,
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
                .contains("holds 2 GPUs (demo/t1-cls/1: 2), asked 1, limit 2"),
            "{}",
            d.reason
        );
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
    fn the_interval_counts_from_the_last_successful_submit() {
        let sub = req(SessionKind::Submit, "demo/t1-cls/2", 0, 4, "s1");
        let l = given(&[
            granted(sub, 10 * HOUR),
            released("demo/t1-cls/2"),
            stored(&SubmitSucceeded {
                dataset: "t1-cls".into(),
                submission_id: "s1".into(),
                at_ms: 10 * HOUR,
            }),
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
            stored(&SubmitEnded {
                dataset: "t1-cls".into(),
                submission_id: "s1".into(),
                succeeded: false,
                at_ms: HOUR,
            }),
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
}
