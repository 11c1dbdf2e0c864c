//! A generated team ledger, recorded as the service records one (every decision made by `decide` on the
//! ledger as it stood), for replay's tests and bench: trainings, trial and real submits that succeed or fail,
//! releases, a policy change halfway and hosts' overrides (extra submits, raised quotas, re-opened submit slots).

use nsml_eventstore::{Metadata, NewEvent, StoredEvent};
use nsml_proto::v1::{
    AdmissionDenied, AdmitRequest, EventPayload, Override, OverrideGranted, OverrideKind, Policy,
    PolicyChanged, QuotaRaise, Resources, ResourcesGranted, ResourcesReleased, SessionKind,
    SubmitEnded, SubmitSucceeded,
};

use crate::domain::{Ledger, decide};

const G: u64 = 1024 * 1024 * 1024;
/// 2026-01-01T00:00:00Z.
const START_MS: i64 = 1_767_225_600_000;
const COMPETITION: &str = "demo";
const DATASETS: [&str; 2] = ["t1-cls", "t2-reg"];

/// The seed's policy (reference/NSML.md).
pub fn seed_policy() -> Policy {
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

/// `events` as they would be appended again, to a store that replays them (tests, the replay bench).
pub fn to_append(events: &[StoredEvent]) -> Vec<NewEvent> {
    events
        .iter()
        .map(|e| NewEvent {
            event_type: e.event_type.clone(),
            payload: e.payload.clone(),
            metadata: e.metadata.clone(),
        })
        .collect()
}

/// Generates `n` events of `team`'s ledger; the same seed gives the same ledger.
pub fn ledger(team: &str, n: usize, seed: u64) -> Vec<StoredEvent> {
    let mut g = Generator {
        team: team.to_string(),
        ledger: Ledger::default(),
        events: Vec::with_capacity(n + 2),
        rng: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
        now: START_MS,
        sessions: 0,
    };
    g.adopt(seed_policy(), 1);
    while g.events.len() < n {
        if g.events.len() == n / 2 {
            g.adopt(
                Policy {
                    submit_interval_secs: 1800,
                    team_memory_bytes: 200 * G,
                    ..seed_policy()
                },
                2,
            );
            continue;
        }
        g.now += (g.next() % 600_000) as i64;
        match g.next() % 100 {
            0..=29 => g.train(),
            30..=54 => g.submit(),
            55..=71 => g.release(),
            72..=90 => g.finish_submit(),
            91..=98 => g.trial(),
            _ => match g.next() % 3 {
                0 => g.extra_submit(),
                1 => g.raise(),
                _ => g.reopen(),
            },
        }
    }
    g.events.truncate(n);
    g.events
}

/// A team ledger written step by step, every decision made by `decide` on the ledger as it stands, as the
/// service records one: for tests that need a particular history. Times are relative to the start of the
/// ledger; the competition is `demo` under the seed's policy.
pub struct Script {
    g: Generator,
}

impl Script {
    /// A ledger that has adopted the seed's policy.
    pub fn new(team: &str) -> Self {
        let mut g = Generator {
            team: team.to_string(),
            ledger: Ledger::default(),
            events: Vec::new(),
            rng: 1,
            now: START_MS,
            sessions: 0,
        };
        g.adopt(seed_policy(), 1);
        Self { g }
    }

    /// Moves the clock to `ms` after the ledger's start.
    pub fn at(&mut self, ms: i64) -> &mut Self {
        self.g.now = START_MS + ms;
        self
    }

    /// The absolute time of `ms` after the ledger's start.
    pub fn time(ms: i64) -> i64 {
        START_MS + ms
    }

    /// Asks to start a real submit on `dataset` (no GPU, 4 CPUs); returns its submission id and whether it was
    /// granted.
    pub fn submit(&mut self, dataset: &str) -> (String, bool) {
        let req = self.g.request(
            SessionKind::Submit,
            dataset,
            Resources {
                gpus: 0,
                cpus: 4,
                memory_bytes: 24 * G,
                shm_bytes: G,
            },
        );
        let sub = req.submission_id.clone();
        self.g.decide(req);
        let granted = self.g.ledger.granted_submits.contains_key(&sub);
        (sub, granted)
    }

    /// Asks to start a training session on `dataset` (no GPU, 2 CPUs); returns whether it was granted.
    pub fn train(&mut self, dataset: &str) -> bool {
        let req = self.g.request(
            SessionKind::Train,
            dataset,
            Resources {
                gpus: 0,
                cpus: 2,
                memory_bytes: 8 * G,
                shm_bytes: G,
            },
        );
        let session = req.session.clone();
        self.g.decide(req);
        self.g.ledger.holdings.contains_key(&session)
    }

    /// Records that the ledger adopts `policy` as version `version` of the competition's.
    pub fn adopt(&mut self, policy: Policy, version: u64) -> &mut Self {
        self.g.adopt(policy, version);
        self
    }

    /// Records a host's override extending the team's deadline for `round` (empty: the competition's) to
    /// `until_ms` after the ledger's start; returns the override's id.
    pub fn extend_deadline(&mut self, round: &str, until_ms: i64) -> String {
        self.g.grant(Override {
            kind: OverrideKind::ExtendDeadline as i32,
            round: round.to_string(),
            until_ms: START_MS + until_ms,
            ..Default::default()
        })
    }

    /// Ends a granted real submit: its session exits, then it succeeds or fails.
    pub fn end(&mut self, submission: &str, succeeded: bool) -> &mut Self {
        let l = &self.g.ledger;
        let session = l
            .holdings
            .iter()
            .find(|(_, h)| h.submission_id == submission)
            .map(|(s, _)| s.clone())
            .unwrap_or_default();
        let dataset = l.submit_dataset(submission).unwrap_or_default().to_string();
        self.g
            .end_submit(session, submission.to_string(), dataset, succeeded);
        self
    }

    /// Records a host's override re-opening the slot of `submission`; returns the override's id.
    pub fn reopen(&mut self, submission: &str) -> String {
        let dataset = self
            .g
            .ledger
            .submit_dataset(submission)
            .unwrap_or_default()
            .to_string();
        self.g.grant(Override {
            kind: OverrideKind::ReopenSubmit as i32,
            dataset,
            submission_id: submission.to_string(),
            ..Default::default()
        })
    }

    /// The ledger as it stands.
    pub fn ledger(&self) -> &Ledger {
        &self.g.ledger
    }

    /// The events recorded so far.
    pub fn events(&self) -> &[StoredEvent] {
        &self.g.events
    }
}

struct Generator {
    team: String,
    ledger: Ledger,
    events: Vec<StoredEvent>,
    rng: u64,
    now: i64,
    sessions: u64,
}

impl Generator {
    /// xorshift64*: enough randomness for a varied history, the same for the same seed.
    fn next(&mut self) -> u64 {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn record<P: EventPayload>(&mut self, payload: &P, command_id: &str) {
        let n = self.events.len() as u64 + 1;
        let ev = StoredEvent {
            position: n,
            stream: format!("quota-{}", self.team),
            version: n,
            event_type: P::TYPE.to_string(),
            payload: payload.encode_to_vec(),
            metadata: Metadata {
                event_id: format!("{:016x}{:016x}", self.rng, n),
                command_id: command_id.to_string(),
                actor: "service:quota".into(),
                recorded_at_ms: self.now,
                schema_version: 1,
                ..Default::default()
            },
            hash: String::new(),
        };
        nsml_common::aggregate::Aggregate::apply(&mut self.ledger, &ev);
        self.events.push(ev);
    }

    fn adopt(&mut self, policy: Policy, version: u64) {
        self.record(
            &PolicyChanged {
                competition: COMPETITION.into(),
                policy: Some(policy),
                version,
            },
            "",
        );
    }

    fn request(&mut self, kind: SessionKind, dataset: &str, resources: Resources) -> AdmitRequest {
        self.sessions += 1;
        let session = format!("{}/{dataset}/{}", self.team, self.sessions);
        AdmitRequest {
            team: self.team.clone(),
            competition: COMPETITION.into(),
            kind: kind as i32,
            session: session.clone(),
            dataset: dataset.into(),
            resources: Some(resources),
            submission_id: if kind == SessionKind::Train {
                String::new()
            } else {
                format!("sub-{}", self.sessions)
            },
            command_id: session,
            seen_position: 0,
        }
    }

    fn decide(&mut self, req: AdmitRequest) {
        let Some(adopted) = self.ledger.policy(COMPETITION) else {
            return;
        };
        let mut d = decide(&self.ledger, &adopted.policy, &req, self.now);
        d.policy_version = adopted.version;
        d.id = format!("dec-{}", self.events.len() + 1);
        d.ledger_version = self.events.len() as u64;
        d.decided_at_ms = self.now;
        let command_id = req.command_id.clone();
        if d.granted {
            self.record(
                &ResourcesGranted {
                    request: Some(req),
                    decision: Some(d),
                },
                &command_id,
            );
        } else {
            self.record(
                &AdmissionDenied {
                    request: Some(req),
                    decision: Some(d),
                },
                &command_id,
            );
        }
    }

    fn dataset(&mut self) -> &'static str {
        DATASETS[(self.next() % 2) as usize]
    }

    fn train(&mut self) {
        let resources = Resources {
            gpus: (self.next() % 3) as u32,
            cpus: 1 + (self.next() % 12) as u32,
            memory_bytes: (8 + self.next() % 93) * G,
            shm_bytes: G,
        };
        let dataset = self.dataset();
        let req = self.request(SessionKind::Train, dataset, resources);
        self.decide(req);
    }

    fn submit(&mut self) {
        let resources = Resources {
            gpus: (self.next() % 2) as u32,
            cpus: if self.next().is_multiple_of(20) { 8 } else { 4 },
            memory_bytes: 24 * G,
            shm_bytes: G,
        };
        let dataset = self.dataset();
        let req = self.request(SessionKind::Submit, dataset, resources);
        self.decide(req);
    }

    fn trial(&mut self) {
        let resources = Resources {
            gpus: 0,
            cpus: 2,
            memory_bytes: 8 * G,
            shm_bytes: G,
        };
        let dataset = self.dataset();
        let req = self.request(SessionKind::TrialSubmit, dataset, resources);
        self.decide(req);
    }

    fn release(&mut self) {
        let live: Vec<String> = self
            .ledger
            .holdings
            .iter()
            .filter(|(_, h)| h.kind != SessionKind::Submit)
            .map(|(s, _)| s.clone())
            .collect();
        if live.is_empty() {
            return;
        }
        let session = live[(self.next() % live.len() as u64) as usize].clone();
        let resources = self.ledger.holdings[&session].resources;
        self.record(
            &ResourcesReleased {
                session,
                resources: Some(resources),
                cause: "exited".into(),
                at_ms: self.now,
            },
            "",
        );
    }

    fn finish_submit(&mut self) {
        let Some((session, sub, dataset)) = self
            .ledger
            .holdings
            .iter()
            .find(|(_, h)| h.kind == SessionKind::Submit)
            .map(|(s, h)| (s.clone(), h.submission_id.clone(), h.dataset.clone()))
        else {
            return;
        };
        let ok = !self.next().is_multiple_of(4);
        self.end_submit(session, sub, dataset, ok);
    }

    /// Records a real submit's session ending, then its outcome, as the service's reactor does.
    fn end_submit(&mut self, session: String, sub: String, dataset: String, ok: bool) {
        if let Some(h) = self.ledger.holdings.get(&session) {
            let resources = h.resources;
            self.record(
                &ResourcesReleased {
                    session,
                    resources: Some(resources),
                    cause: "exited".into(),
                    at_ms: self.now,
                },
                "",
            );
        }
        if !ok {
            self.record(
                &SubmitEnded {
                    dataset,
                    submission_id: sub,
                    succeeded: false,
                    at_ms: self.now,
                },
                "",
            );
        } else {
            let submitted_at = self
                .ledger
                .granted_submits
                .get(&sub)
                .map_or(self.now, |(_, at)| *at);
            self.record(
                &SubmitSucceeded {
                    dataset,
                    submission_id: sub,
                    at_ms: submitted_at,
                },
                "",
            );
        }
    }

    fn grant(&mut self, mut grant: Override) -> String {
        let id = format!("ovr-{:012}", self.events.len() + 1);
        grant.id = id.clone();
        grant.competition = COMPETITION.into();
        grant.team = self.team.clone();
        grant.reason = "generated".into();
        grant.granted_by = "user:host".into();
        grant.granted_at_ms = self.now;
        grant.command_id = id.clone();
        self.record(&OverrideGranted { grant: Some(grant) }, &id);
        id
    }

    fn extra_submit(&mut self) {
        let dataset = self.dataset();
        self.grant(Override {
            kind: OverrideKind::ExtraSubmit as i32,
            dataset: dataset.into(),
            ..Default::default()
        });
    }

    /// Re-opens the slot of a dataset's submit in flight (a stuck submit) or, when none runs, of its last
    /// successful one (a submit scored wrongly).
    fn reopen(&mut self) {
        let dataset = self.dataset();
        let Some(st) = self.ledger.submits.get(dataset) else {
            return;
        };
        let Some(sub) = st
            .counted_in_flight()
            .next()
            .map(|(s, _)| s.clone())
            .or_else(|| st.last_success().map(|l| l.submission_id.to_string()))
        else {
            return;
        };
        self.grant(Override {
            kind: OverrideKind::ReopenSubmit as i32,
            dataset: dataset.into(),
            submission_id: sub,
            ..Default::default()
        });
    }

    fn raise(&mut self) {
        let until_ms = self.now + (1 + self.next() % 6) as i64 * 3_600_000;
        self.grant(Override {
            kind: OverrideKind::RaiseQuota as i32,
            raise: Some(QuotaRaise {
                gpus: 3,
                sessions: 3,
                ..Default::default()
            }),
            until_ms,
            ..Default::default()
        });
    }
}

/// A team's ledger recorded admission by admission through the service's own admission step (the one
/// `admit` takes: the newer policy adopted first, then `decide`), for the bench that seeds a large log: each
/// admission returns the events the service appends for it, to append to [`LedgerSeed::stream`] in order.
pub struct LedgerSeed {
    stream: String,
    ledger: Ledger,
    version: u64,
}

impl LedgerSeed {
    /// A team's ledger with nothing recorded yet.
    pub fn new(team: &str) -> Self {
        Self {
            stream: crate::domain::ledger_stream(team),
            ledger: Ledger::default(),
            version: 0,
        }
    }

    /// The ledger's stream, `quota-TEAM`.
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// Decides `r` under the competition's `current` policy (and its version) as `actor` asks it, and returns
    /// the decision with the events that record it; the ledger folds them, as its stream will hold them.
    pub fn admit(
        &mut self,
        r: &AdmitRequest,
        current: (&Policy, u64),
        actor: &str,
    ) -> Result<(nsml_proto::v1::Decision, Vec<NewEvent>), crate::QuotaError> {
        let (admission, events) =
            crate::handler::admission(&self.ledger, self.version, r, Some(current), actor)?;
        for e in &events {
            self.version += 1;
            nsml_common::aggregate::Aggregate::apply(
                &mut self.ledger,
                &StoredEvent {
                    position: self.version,
                    stream: self.stream.clone(),
                    version: self.version,
                    event_type: e.event_type.clone(),
                    payload: e.payload.clone(),
                    metadata: e.metadata.clone(),
                    hash: String::new(),
                },
            );
        }
        match admission {
            crate::handler::Admission::Made(d) => Ok((d, events)),
            crate::handler::Admission::Repeated(_) => Err(crate::QuotaError::Internal {
                context: "seeding an admission",
                detail: "the command was decided before",
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use nsml_proto::v1::{EventPayload, PolicyChanged as Changed};

    use super::*;

    #[test]
    fn a_seeded_ledger_adopts_the_policy_once_and_records_each_refusal() {
        let mut seed = LedgerSeed::new("ants");
        let policy = seed_policy();
        let ask = |n: u64| AdmitRequest {
            team: "ants".into(),
            competition: COMPETITION.into(),
            kind: SessionKind::Train as i32,
            session: format!("ants/t1-cls/{n}"),
            dataset: "t1-cls".into(),
            resources: Some(Resources {
                memory_bytes: policy.team_memory_bytes + 1,
                ..Default::default()
            }),
            command_id: format!("ants/t1-cls/{n}"),
            ..Default::default()
        };
        let (first, events) = seed
            .admit(&ask(1), (&policy, 3), "service:session")
            .unwrap();
        let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
        assert_eq!(types, [Changed::TYPE, AdmissionDenied::TYPE]);
        assert!(!first.granted);
        let (second, events) = seed
            .admit(&ask(2), (&policy, 3), "service:session")
            .unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!((second.granted, second.ledger_version), (false, 2));
        assert_eq!(seed.stream(), "quota-ants");
        assert!(
            seed.admit(&ask(2), (&policy, 3), "service:session")
                .is_err()
        );
    }
}
