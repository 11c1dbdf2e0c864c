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

fn fmt_time(ms: i64) -> String {
    chrono_like(ms)
}

fn chrono_like(ms: i64) -> String {
    // RFC 3339 in UTC without pulling a date library into the rule: seconds precision.
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (h, m, s) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if mo <= 2 { y + 1 } else { y };
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{s:02}Z")
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
