//! What the quota service learns from the whole log: competition policies, datasets and teams (from the
//! auth service's events), and which team's ledger holds a decision or a submission (to find what
//! `explain` is asked about).

use std::collections::{BTreeSet, HashMap};

use nsml_common::event::decode;
use nsml_common::projection::ReadModel;
use nsml_eventstore::StoredEvent;
use nsml_proto::v1::{CompetitionApplied, MemberAdded, Policy};

use crate::domain::{LEDGER_PREFIX, LedgerEvent};
use crate::idmap::IdMap;

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
    pub recorded_in: IdMap<String>,
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

impl ReadModel for Catalog {
    fn apply(&mut self, ev: &StoredEvent) {
        if let Some(team) = ev.stream.strip_prefix(LEDGER_PREFIX) {
            if !self.ledgers.contains(team) {
                self.ledgers.insert(team.to_string());
            }
            if let Some(e) = LedgerEvent::decode(ev)
                && let Some((req, d)) = e.decision()
            {
                self.recorded_in.insert(d.id.clone(), team.to_string());
                if !req.submission_id.is_empty() {
                    self.recorded_in
                        .insert(req.submission_id.clone(), team.to_string());
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
