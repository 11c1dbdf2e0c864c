//! What the quota service learns from the whole log: competition policies, datasets and teams (from the
//! auth service's events), and which team's ledger holds a decision or a submission (to find what
//! `explain` is asked about).

use std::collections::{BTreeSet, HashMap};

use nsml_common::event::decode;
use nsml_common::projection::ReadModel;
use nsml_eventstore::StoredEvent;
use nsml_proto::v1::{
    AdmissionDenied, CompetitionApplied, EventPayload, MemberAdded, OverrideGranted, Policy,
    PolicyChanged, ResourcesGranted, ResourcesReleased, SubmitEnded, SubmitSucceeded,
};

use crate::domain::{LEDGER_PREFIX, LedgerEvent};

#[derive(Debug, Default)]
pub struct Catalog {
    /// Competition → (policy, version).
    pub policies: HashMap<String, (Policy, u64)>,
    /// Competition → its datasets, in the manifest's order.
    pub datasets: HashMap<String, Vec<String>>,
    /// Team → the competitions it entered.
    pub competitions_of: HashMap<String, BTreeSet<String>>,
    /// Teams that have a ledger.
    pub ledgers: BTreeSet<String>,
    /// Decision id or submission id → the team whose ledger records it.
    pub recorded_in: RecordedIn,
}

/// How many tables a [`RecordedIn`] spreads its entries over, so that a doubling moves a 64th of them.
const SHARDS: usize = 64;

/// Which team's ledger records an id (a decision's or a submission's), kept as a 64-bit fingerprint of the id
/// and the team's number: the ids themselves stay in the log, where `explain` reads the decision back from the
/// team's ledger. Two ids with one fingerprint (about one pair in 2^64 / n) share an entry: the later one's
/// team, so a lookup names a team to look in first, never the only one.
#[derive(Debug, Default)]
pub struct RecordedIn {
    teams: Vec<String>,
    numbers: HashMap<String, u32>,
    shards: Vec<HashMap<u64, u32>>,
}

impl RecordedIn {
    /// SipHash with fixed keys: well spread over all 64 bits for ids of any shape, unlike the ledgers' fast
    /// hash, whose bits suit a table's buckets but not a fingerprint that stands for the id.
    fn fingerprint(id: &str) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::hash::DefaultHasher::new();
        id.hash(&mut h);
        h.finish()
    }

    /// Notes that `team`'s ledger records `id`.
    pub fn insert(&mut self, id: &str, team: &str) {
        let number = match self.numbers.get(team) {
            Some(n) => *n,
            None => {
                let n = self.teams.len() as u32;
                self.teams.push(team.to_string());
                self.numbers.insert(team.to_string(), n);
                n
            }
        };
        if self.shards.is_empty() {
            self.shards.resize_with(SHARDS, HashMap::default);
        }
        let f = Self::fingerprint(id);
        self.shards[(f >> 58) as usize % SHARDS].insert(f, number);
    }

    /// The team whose ledger most likely records `id`.
    pub fn get(&self, id: &str) -> Option<&str> {
        let f = Self::fingerprint(id);
        let n = self.shards.get((f >> 58) as usize % SHARDS)?.get(&f)?;
        self.teams.get(*n as usize).map(String::as_str)
    }

    /// How many ids are noted.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.shards.iter().map(HashMap::len).sum()
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Catalog {
    /// The competition a dataset belongs to.
    pub fn competition_of_dataset(&self, dataset: &str) -> Option<&str> {
        self.datasets
            .iter()
            .find(|(_, ds)| ds.iter().any(|d| d == dataset))
            .map(|(c, _)| c.as_str())
    }
}

/// What the catalog reads: the ledgers' events, competitions and team members.
const CATALOG_TYPES: &[&str] = &[
    ResourcesGranted::TYPE,
    AdmissionDenied::TYPE,
    ResourcesReleased::TYPE,
    SubmitSucceeded::TYPE,
    SubmitEnded::TYPE,
    PolicyChanged::TYPE,
    OverrideGranted::TYPE,
    CompetitionApplied::TYPE,
    MemberAdded::TYPE,
];

impl ReadModel for Catalog {
    const TYPES: Option<&'static [&'static str]> = Some(CATALOG_TYPES);

    fn apply(&mut self, ev: &StoredEvent) {
        if let Some(team) = ev.stream.strip_prefix(LEDGER_PREFIX) {
            if !self.ledgers.contains(team) {
                self.ledgers.insert(team.to_string());
            }
            if let Some(e) = LedgerEvent::decode(ev)
                && let Some((req, d)) = e.decision()
            {
                self.recorded_in.insert(&d.id, team);
                if !req.submission_id.is_empty() {
                    self.recorded_in.insert(&req.submission_id, team);
                }
            }
        } else if let Some(e) = decode::<CompetitionApplied>(ev)
            && let Some(c) = e.competition
        {
            self.datasets.insert(
                c.id.clone(),
                c.datasets.iter().map(|d| d.name.clone()).collect(),
            );
            for t in &c.teams {
                self.competitions_of
                    .entry(t.name.clone())
                    .or_default()
                    .insert(c.id.clone());
            }
            self.policies
                .insert(c.id, (c.policy.unwrap_or_default(), c.policy_version));
        } else if let Some(e) = decode::<MemberAdded>(ev)
            && !e.competition.is_empty()
        {
            self.competitions_of
                .entry(e.team)
                .or_default()
                .insert(e.competition);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_catalog_reads_every_type_a_ledger_holds() {
        for t in LedgerEvent::TYPES {
            assert!(
                CATALOG_TYPES.contains(t),
                "the catalog's catch-up skips {t}"
            );
        }
    }

    #[test]
    fn recorded_ids_name_their_teams_ledger_without_keeping_the_ids() {
        let mut r = RecordedIn::default();
        assert_eq!((r.get("d-1"), r.is_empty()), (None, true));
        for i in 0..10_000 {
            r.insert(&format!("0190-decision-{i}"), &format!("team-{}", i % 7));
        }
        r.insert("sub-1", "ants");
        assert_eq!(r.len(), 10_001);
        assert_eq!(r.get("0190-decision-9"), Some("team-2"));
        assert_eq!(r.get("0190-decision-9999"), Some("team-3"));
        assert_eq!(r.get("sub-1"), Some("ants"));
        assert_eq!(r.get("0190-decision-10000"), None);
        // Each team's name is kept once, however many ids its ledger records.
        assert_eq!(r.teams.len(), 8);
    }
}
