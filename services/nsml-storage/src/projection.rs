//! The storage service's read model, folded from the whole log: datasets and the blobs of their parts,
//! competitions' storage limits, teams' competitions, code snapshots and their teams, every team's
//! checkpoints and byte usage, and when sessions started (for a checkpoint's elapsed time).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use nsml_common::event::decode;
use nsml_common::projection::ReadModel;
use nsml_eventstore::StoredEvent;
use nsml_proto::v1::{
    CheckpointDeleted, CheckpointSaved, CodeUploaded, CompetitionApplied, Dataset,
    DatasetRegistered, Direction, EventPayload, MemberAdded, SessionStarted, SubmissionScored,
};

use crate::domain::{DEFAULT_TEAM_STORAGE_BYTES, DatasetBlobs, StoredCheckpoint, TeamCheckpoints};

/// A registered dataset (its latest version) and where its parts are.
#[derive(Debug, Clone)]
pub struct DatasetRecord {
    pub dataset: Dataset,
    pub blobs: DatasetBlobs,
}

/// A code snapshot: its size and the teams that uploaded it (identical code uploaded by two teams is one
/// snapshot that both may download).
#[derive(Debug, Clone, Default)]
pub struct CodeRecord {
    pub size: u64,
    pub teams: BTreeSet<String>,
}

/// The checkpoint behind a team's best score on one side (public or private) of a dataset's board.
#[derive(Debug, Clone, PartialEq)]
struct Best {
    session: String,
    checkpoint: String,
    score: f64,
}

/// What the storage service answers reads from.
#[derive(Debug, Default)]
pub struct StorageView {
    datasets: BTreeMap<String, DatasetRecord>,
    storage_limits: HashMap<String, u64>,
    team_competitions: HashMap<String, BTreeSet<String>>,
    code: HashMap<String, CodeRecord>,
    code_bytes: HashMap<String, u64>,
    /// Team → dataset → the checkpoints behind its best public and private scores: kept for reproducibility.
    board_best: HashMap<String, HashMap<String, [Option<Best>; 2]>>,
    checkpoints: HashMap<String, TeamCheckpoints>,
    started_at_ms: HashMap<String, i64>,
}

impl StorageView {
    /// A dataset by name.
    pub fn dataset(&self, name: &str) -> Option<&DatasetRecord> {
        self.datasets.get(name)
    }

    /// Every dataset, by name.
    pub fn datasets(&self) -> impl Iterator<Item = &DatasetRecord> {
        self.datasets.values()
    }

    /// The competition a dataset belongs to.
    pub fn competition_of(&self, dataset: &str) -> Option<&str> {
        self.datasets
            .get(dataset)
            .and_then(|d| d.dataset.meta.as_ref())
            .map(|m| m.competition.as_str())
    }

    /// A team's checkpoint storage limit in a competition (the platform default when the competition is
    /// unknown or sets none).
    pub fn storage_limit(&self, competition: Option<&str>) -> u64 {
        competition
            .and_then(|c| self.storage_limits.get(c))
            .copied()
            .unwrap_or(DEFAULT_TEAM_STORAGE_BYTES)
    }

    /// The competitions a team takes part in.
    pub fn competitions_of_team(&self, team: &str) -> impl Iterator<Item = &str> {
        self.team_competitions
            .get(team)
            .into_iter()
            .flat_map(|c| c.iter().map(String::as_str))
    }

    /// A code snapshot.
    pub fn code(&self, id: &str) -> Option<&CodeRecord> {
        self.code.get(id)
    }

    /// A team's checkpoints (empty when it has none).
    pub fn team_checkpoints(&self, team: &str) -> Option<&TeamCheckpoints> {
        self.checkpoints.get(team)
    }

    /// A session's checkpoints, oldest first.
    pub fn checkpoints_of(&self, team: &str, session: &str) -> Vec<StoredCheckpoint> {
        let mut list: Vec<StoredCheckpoint> = self
            .checkpoints
            .get(team)
            .map(|t| t.of_session(session).cloned().collect())
            .unwrap_or_default();
        list.sort_by(|a, b| {
            (a.checkpoint.saved_at_ms, &a.checkpoint.name)
                .cmp(&(b.checkpoint.saved_at_ms, &b.checkpoint.name))
        });
        list
    }

    /// Bytes of a team's checkpoints and code snapshots.
    pub fn usage(&self, team: &str) -> (u64, u64) {
        (
            self.checkpoints.get(team).map_or(0, TeamCheckpoints::used),
            self.code_bytes.get(team).copied().unwrap_or(0),
        )
    }

    /// When a session started running, if the log says.
    pub fn started_at_ms(&self, session: &str) -> Option<i64> {
        self.started_at_ms.get(session).copied()
    }
}

impl StorageView {
    fn on_dataset(&mut self, ev: DatasetRegistered, position: u64) {
        let Some(dataset) = ev.dataset else { return };
        let Some(name) = dataset.meta.as_ref().map(|m| m.name.clone()) else {
            return;
        };
        match serde_json::from_str::<DatasetBlobs>(&ev.blob) {
            Ok(blobs) => {
                self.datasets.insert(name, DatasetRecord { dataset, blobs });
            }
            Err(err) => {
                tracing::error!(position, dataset = %name, %err, "unreadable list of a dataset's blobs");
            }
        }
    }

    fn on_competition(&mut self, ev: CompetitionApplied) {
        let Some(c) = ev.competition else { return };
        match c.policy.map(|p| p.team_storage_bytes).filter(|b| *b > 0) {
            Some(limit) => self.storage_limits.insert(c.id.clone(), limit),
            None => self.storage_limits.remove(&c.id),
        };
        for team in c.teams {
            self.team_competitions
                .entry(team.name)
                .or_default()
                .insert(c.id.clone());
        }
    }

    /// A real submit scored: its checkpoint backs the team's best on a side of the board when it beats the one
    /// that did (an equal score leaves the earlier, as the board ranks it).
    fn on_scored(&mut self, ev: SubmissionScored) {
        let Some(sub) = ev.submission.filter(|s| !s.trial) else {
            return;
        };
        let descending = self
            .datasets
            .get(&sub.dataset)
            .and_then(|d| d.dataset.meta.as_ref())
            .is_some_and(|m| m.direction() == Direction::Descending);
        let beats = |new: f64, old: &Option<Best>| match old {
            None => new.is_finite(),
            Some(old) if descending => new > old.score,
            Some(old) => new < old.score,
        };
        let sides = self
            .board_best
            .entry(sub.team.clone())
            .or_default()
            .entry(sub.dataset.clone())
            .or_default();
        for (side, score) in [Some(sub.score), sub.private_score].into_iter().enumerate() {
            if let Some(score) = score
                && beats(score, &sides[side])
            {
                sides[side] = Some(Best {
                    session: sub.source_session.clone(),
                    checkpoint: sub.checkpoint.clone(),
                    score,
                });
            }
        }
    }

    /// The checkpoints of `session` (of `team`) that back its team's best score on a board, each with the
    /// dataset: they are kept when the session's checkpoints are deleted.
    pub fn kept_for_board(&self, team: &str, session: &str) -> BTreeMap<String, String> {
        self.board_best
            .get(team)
            .into_iter()
            .flatten()
            .flat_map(|(dataset, sides)| {
                sides
                    .iter()
                    .flatten()
                    .filter(|b| b.session == session)
                    .map(move |b| (b.checkpoint.clone(), dataset.clone()))
            })
            .collect()
    }

    fn on_code(&mut self, ev: CodeUploaded) {
        let Some(snap) = ev.snapshot else { return };
        let record = self.code.entry(snap.id).or_default();
        record.size = snap.size_bytes;
        if record.teams.insert(snap.team.clone()) {
            *self.code_bytes.entry(snap.team).or_default() += snap.size_bytes;
        }
    }
}

impl ReadModel for StorageView {
    const TYPES: Option<&'static [&'static str]> = Some(&[
        CheckpointSaved::TYPE,
        CheckpointDeleted::TYPE,
        SessionStarted::TYPE,
        CodeUploaded::TYPE,
        SubmissionScored::TYPE,
        DatasetRegistered::TYPE,
        CompetitionApplied::TYPE,
        MemberAdded::TYPE,
    ]);

    fn apply(&mut self, event: &StoredEvent) {
        // `decode` compares the type name first, so trying each payload type in turn is cheap.
        if let Some(ev) = decode::<CheckpointSaved>(event) {
            self.checkpoints
                .entry(ev.team.clone())
                .or_default()
                .apply_saved(ev);
        } else if let Some(ev) = decode::<CheckpointDeleted>(event) {
            if let Some(team) = self.checkpoints.get_mut(&ev.team) {
                team.apply_deleted(&ev);
            }
        } else if let Some(ev) = decode::<SessionStarted>(event) {
            self.started_at_ms.insert(ev.name, ev.at_ms);
        } else if let Some(ev) = decode::<CodeUploaded>(event) {
            self.on_code(ev);
        } else if let Some(ev) = decode::<SubmissionScored>(event) {
            self.on_scored(ev);
        } else if let Some(ev) = decode::<DatasetRegistered>(event) {
            self.on_dataset(ev, event.position);
        } else if let Some(ev) = decode::<CompetitionApplied>(event) {
            self.on_competition(ev);
        } else if let Some(ev) = decode::<MemberAdded>(event)
            && !ev.competition.is_empty()
        {
            self.team_competitions
                .entry(ev.team)
                .or_default()
                .insert(ev.competition);
        }
    }
}
