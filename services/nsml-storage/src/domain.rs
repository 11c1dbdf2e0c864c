//! The storage service's rules, free of IO: which metrics a dataset may use, who owns a dataset name, a
//! team's checkpoints and its storage quota, and the layout of a dataset's stored parts.
//!
//! Whatever a decision needs (the team's limit, the current time, the session's start) is fetched first and
//! passed in, so each decision is a pure function of the stream's state and the request.

use std::collections::BTreeMap;

use nsml_common::aggregate::Aggregate;
use nsml_common::event::decode;
use nsml_common::names::wildcard_match;
use nsml_eventstore::StoredEvent;
use nsml_proto::v1::{
    Checkpoint, CheckpointDeleted, CheckpointSaved, DatasetMeta, DatasetPart, DatasetRegistered,
    Direction,
};
use serde::{Deserialize, Serialize};

use crate::error::StorageError;

/// One gibibyte.
pub const GIB: u64 = 1 << 30;
/// One mebibyte.
pub const MIB: u64 = 1 << 20;

/// A team's checkpoint storage when its competition sets none (NSML gave each team about 450 GB).
///
/// Storage is counted in the bytes a checkpoint holds once unpacked (the files the participant's
/// program saved, as `nsml model ls` shows them), never in its compressed upload: a small gzip that
/// expands to gigabytes takes gigabytes wherever it is unpacked.
pub const DEFAULT_TEAM_STORAGE_BYTES: u64 = 450 * GIB;

/// Most bytes of file content one code snapshot may expand to. Code is small (the CLI warns past 10
/// MB); this is ten times the largest upload the service takes by default, and below the runner's own
/// 4 GiB cap, so that any snapshot stored can also be run.
pub const MAX_CODE_EXPANDED_BYTES: u64 = GIB;

/// Most bytes of file content one checkpoint may expand to, whatever the team's quota: the runner
/// unpacks no more of one (1 TiB), so a larger one could be stored but never loaded.
pub const MAX_CHECKPOINT_EXPANDED_BYTES: u64 = 1 << 40;

/// Formats a byte count the way `nsml model ls` does (`599.42 MB`): the platform's one size format.
pub use nsml_manifest::format_size as human_bytes;

/// The metrics the platform's scorer computes, with the direction each ranks in.
const METRICS: [(&str, Direction); 7] = [
    ("accuracy", Direction::Descending),
    ("macro_f1", Direction::Descending),
    ("mse", Direction::Ascending),
    ("rmse", Direction::Ascending),
    ("mae", Direction::Ascending),
    ("cer", Direction::Ascending),
    ("wer", Direction::Ascending),
];

/// Checks a dataset's metadata (names aside) and fills in what follows from it: the metric's direction
/// when unspecified. A `custom` metric needs an evaluation script and a direction.
pub fn check_dataset_meta(mut meta: DatasetMeta) -> Result<DatasetMeta, StorageError> {
    meta.metric = meta.metric.trim().to_ascii_lowercase();
    let given = Direction::try_from(meta.direction).unwrap_or(Direction::Unspecified);
    if meta.metric == "custom" {
        if meta.eval_script.is_empty() {
            return Err(StorageError::BadRequest(format!(
                "dataset `{}` uses a custom metric: name its evaluation script (a file under `eval/` in the archive)",
                meta.name
            )));
        }
        if given == Direction::Unspecified {
            return Err(StorageError::BadRequest(format!(
                "dataset `{}` uses a custom metric: say whether larger scores are better (descending) or smaller (ascending)",
                meta.name
            )));
        }
    } else {
        let Some((_, natural)) = METRICS.iter().find(|(m, _)| *m == meta.metric) else {
            return Err(StorageError::UnknownMetric {
                metric: meta.metric,
            });
        };
        if given == Direction::Unspecified {
            meta.direction = *natural as i32;
        } else if given != *natural {
            return Err(StorageError::BadRequest(format!(
                "metric `{}` ranks {}, not {}",
                meta.metric,
                direction_word(*natural),
                direction_word(given)
            )));
        }
    }
    if !meta.eval_script.is_empty() {
        check_relative_path(&meta.eval_script).map_err(|reason| {
            StorageError::BadRequest(format!(
                "invalid evaluation script name `{}`: {reason}",
                meta.eval_script
            ))
        })?;
    }
    if !(0.0..=1.0).contains(&meta.private_fraction) {
        return Err(StorageError::BadRequest(format!(
            "private fraction of dataset `{}` must lie between 0 and 1, not {}",
            meta.name, meta.private_fraction
        )));
    }
    Ok(meta)
}

fn direction_word(d: Direction) -> &'static str {
    match d {
        Direction::Descending => "descending (larger is better)",
        Direction::Ascending => "ascending (smaller is better)",
        Direction::Unspecified => "unspecified",
    }
}

/// Checks that `path` is a plain relative path (no root, no `..`, no empty or `.` components).
pub fn check_relative_path(path: &str) -> Result<(), &'static str> {
    if path.starts_with('/') {
        return Err("it is an absolute path");
    }
    if path.contains('\\') || path.contains('\0') {
        return Err("it contains `\\` or a NUL character");
    }
    if path
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err("it has an empty, `.` or `..` component");
    }
    Ok(())
}

/// Blob ids of a dataset's stored parts, as recorded (JSON) in `DatasetRegistered.blob`.
///
/// Each part is a gzip'd tar meant to be unpacked at the dataset's root (`DATASET_PATH`): `train` holds
/// `train/...`, `test_data` holds `test/test_data...`, `test_label` holds `test/test_label`, `eval_script`
/// holds `eval/...`. The trial parts stand in for the test parts at a trial submit, so they are laid out as
/// those: `trial_data` holds `test/test_data...` and `trial_label` holds `test/test_label`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetBlobs {
    pub train: String,
    pub test_data: String,
    pub test_label: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trial_data: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trial_label: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_script: Option<String>,
}

impl DatasetBlobs {
    /// The blob of a part, or why there is none.
    pub fn part(&self, dataset: &str, part: DatasetPart) -> Result<&str, StorageError> {
        let missing = |what| StorageError::PartNotFound {
            dataset: dataset.to_string(),
            part: what,
        };
        match part {
            DatasetPart::Train => Ok(&self.train),
            DatasetPart::TestData => Ok(&self.test_data),
            DatasetPart::TestLabel => Ok(&self.test_label),
            DatasetPart::TrialData => self
                .trial_data
                .as_deref()
                .ok_or_else(|| missing("trial set (test_submit/test_data)")),
            DatasetPart::TrialLabel => self
                .trial_label
                .as_deref()
                .ok_or_else(|| missing("trial labels (test_submit/test_label)")),
            DatasetPart::EvalScript => self
                .eval_script
                .as_deref()
                .ok_or_else(|| missing("evaluation script (eval/)")),
            DatasetPart::Unspecified => Err(StorageError::BadRequest(
                "name the dataset part to fetch".into(),
            )),
        }
    }
}

/// Who owns a dataset name: the state of stream `dataset-NAME`.
#[derive(Debug, Clone, Default)]
pub struct DatasetOwner {
    pub competition: Option<String>,
}

impl DatasetOwner {
    /// Decides whether `competition` may (re-)register the dataset `name`: a name belongs to the competition
    /// that registered it first; registering it again from there replaces it with a new version.
    pub fn decide_register(&self, name: &str, competition: &str) -> Result<(), StorageError> {
        match &self.competition {
            Some(owner) if owner != competition => Err(StorageError::DatasetTaken {
                name: name.to_string(),
                competition: owner.clone(),
            }),
            _ => Ok(()),
        }
    }
}

impl Aggregate for DatasetOwner {
    fn apply(&mut self, event: &StoredEvent) {
        if let Some(meta) = decode::<DatasetRegistered>(event).and_then(|e| e.dataset?.meta) {
            self.competition = Some(meta.competition);
        }
    }
}

/// Refuses a save that would take a team over its storage limit. `replacing` is the size of the
/// checkpoint the save overwrites (0 when new): it is freed by the save.
pub fn check_storage_quota(
    team: &str,
    used: u64,
    limit: u64,
    adding: u64,
    replacing: u64,
) -> Result<(), StorageError> {
    let after = used.saturating_sub(replacing).saturating_add(adding);
    if after > limit {
        return Err(StorageError::QuotaExceeded {
            team: team.to_string(),
            used,
            limit,
            adding,
        });
    }
    Ok(())
}

/// A stored checkpoint: what `model ls` shows and the blob holding it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredCheckpoint {
    pub checkpoint: Checkpoint,
    pub blob: String,
}

/// A request to save a checkpoint, with everything the decision needs.
#[derive(Debug, Clone)]
pub struct SaveCheckpoint {
    pub team: String,
    pub checkpoint: Checkpoint,
    pub blob: String,
    /// The team's storage limit in bytes.
    pub limit: u64,
}

/// What a deletion decided: the checkpoints it deletes, and those its pattern matched that are kept because each
/// backs the team's best score on a board.
#[derive(Debug, Clone, PartialEq)]
pub struct Deletion {
    pub deleted: Vec<CheckpointDeleted>,
    pub kept: Vec<String>,
}

/// A team's checkpoints: the state of stream `checkpoints-TEAM`, and the read model's per-team view.
#[derive(Debug, Clone, Default)]
pub struct TeamCheckpoints {
    sessions: BTreeMap<String, BTreeMap<String, StoredCheckpoint>>,
    used: u64,
}

impl TeamCheckpoints {
    /// Bytes the team's checkpoints take.
    pub fn used(&self) -> u64 {
        self.used
    }

    /// One checkpoint of a session.
    pub fn get(&self, session: &str, name: &str) -> Option<&StoredCheckpoint> {
        self.sessions.get(session).and_then(|s| s.get(name))
    }

    /// A session's checkpoints, by name.
    pub fn of_session(&self, session: &str) -> impl Iterator<Item = &StoredCheckpoint> {
        self.sessions
            .get(session)
            .into_iter()
            .flat_map(|s| s.values())
    }

    /// Applies a save (a save of an existing name overwrites it).
    pub fn apply_saved(&mut self, ev: CheckpointSaved) {
        let Some(cp) = ev.checkpoint else { return };
        let size = cp.size_bytes;
        let previous = self.sessions.entry(cp.session.clone()).or_default().insert(
            cp.name.clone(),
            StoredCheckpoint {
                checkpoint: cp,
                blob: ev.blob,
            },
        );
        if let Some(p) = previous {
            self.used = self.used.saturating_sub(p.checkpoint.size_bytes);
        }
        self.used = self.used.saturating_add(size);
    }

    /// Applies a deletion.
    pub fn apply_deleted(&mut self, ev: &CheckpointDeleted) {
        let Some(session) = self.sessions.get_mut(&ev.session) else {
            return;
        };
        if let Some(p) = session.remove(&ev.checkpoint) {
            self.used = self.used.saturating_sub(p.checkpoint.size_bytes);
        }
        if session.is_empty() {
            self.sessions.remove(&ev.session);
        }
    }

    /// Decides a save: refused when it would take the team over its limit, counting the checkpoint it
    /// overwrites as freed.
    pub fn decide_save(&self, cmd: &SaveCheckpoint) -> Result<CheckpointSaved, StorageError> {
        let cp = &cmd.checkpoint;
        let replacing = self
            .get(&cp.session, &cp.name)
            .map_or(0, |p| p.checkpoint.size_bytes);
        check_storage_quota(&cmd.team, self.used, cmd.limit, cp.size_bytes, replacing)?;
        Ok(CheckpointSaved {
            checkpoint: Some(cp.clone()),
            team: cmd.team.clone(),
            blob: cmd.blob.clone(),
        })
    }

    /// Decides a deletion: `*` deletes every checkpoint of the session (none is fine); a name deletes that
    /// checkpoint; a name with `*` or `?` that names no checkpoint deletes those it matches. A name that
    /// matches nothing is not found. The checkpoints in `kept` (name → dataset: each backs the team's best
    /// score on that dataset's board) are never deleted: a pattern passes over them, a name is refused.
    pub fn decide_delete(
        &self,
        team: &str,
        session: &str,
        pattern: &str,
        kept: &BTreeMap<String, String>,
    ) -> Result<Deletion, StorageError> {
        let deleted = |p: &StoredCheckpoint| CheckpointDeleted {
            session: session.to_string(),
            checkpoint: p.checkpoint.name.clone(),
            team: team.to_string(),
            size_bytes: p.checkpoint.size_bytes,
        };
        if let Some(p) = self.get(session, pattern) {
            if let Some(dataset) = kept.get(&p.checkpoint.name) {
                return Err(StorageError::KeptForBoard {
                    session: session.to_string(),
                    checkpoint: p.checkpoint.name.clone(),
                    dataset: dataset.clone(),
                });
            }
            return Ok(Deletion {
                deleted: vec![deleted(p)],
                kept: Vec::new(),
            });
        }
        let (spared, matched): (Vec<&StoredCheckpoint>, Vec<&StoredCheckpoint>) =
            if pattern.contains(['*', '?']) {
                self.of_session(session)
                    .filter(|p| wildcard_match(pattern, &p.checkpoint.name))
                    .partition(|p| kept.contains_key(&p.checkpoint.name))
            } else {
                (Vec::new(), Vec::new())
            };
        if matched.is_empty() && spared.is_empty() && pattern != "*" {
            return Err(StorageError::CheckpointNotFound {
                session: session.to_string(),
                checkpoint: pattern.to_string(),
            });
        }
        Ok(Deletion {
            deleted: matched.into_iter().map(deleted).collect(),
            kept: spared
                .into_iter()
                .map(|p| p.checkpoint.name.clone())
                .collect(),
        })
    }
}

impl Aggregate for TeamCheckpoints {
    fn apply(&mut self, event: &StoredEvent) {
        if let Some(ev) = decode::<CheckpointSaved>(event) {
            self.apply_saved(ev);
        } else if let Some(ev) = decode::<CheckpointDeleted>(event) {
            self.apply_deleted(&ev);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cp(session: &str, name: &str, size: u64) -> Checkpoint {
        Checkpoint {
            session: session.into(),
            name: name.into(),
            size_bytes: size,
            ..Default::default()
        }
    }

    fn given(saves: &[(&str, &str, u64)]) -> TeamCheckpoints {
        let mut s = TeamCheckpoints::default();
        for (session, name, size) in saves {
            s.apply_saved(CheckpointSaved {
                checkpoint: Some(cp(session, name, *size)),
                team: "demo".into(),
                blob: format!("blob-{name}"),
            });
        }
        s
    }

    fn save(session: &str, name: &str, size: u64, limit: u64) -> SaveCheckpoint {
        SaveCheckpoint {
            team: "demo".into(),
            checkpoint: cp(session, name, size),
            blob: "b".into(),
            limit,
        }
    }

    #[test]
    fn a_save_within_the_quota_is_allowed() {
        let state = given(&[("demo/ds/1", "0", 40)]);
        let ev = state.decide_save(&save("demo/ds/1", "1", 60, 100)).unwrap();
        assert_eq!(ev.checkpoint.unwrap().name, "1");
    }

    #[test]
    fn a_save_over_the_quota_is_refused_with_the_numbers() {
        let state = given(&[("demo/ds/1", "0", 40 * GIB)]);
        let err = state
            .decide_save(&save("demo/ds/1", "1", 20 * GIB, 50 * GIB))
            .unwrap_err();
        assert!(matches!(err, StorageError::QuotaExceeded { .. }));
        assert_eq!(
            err.to_string(),
            "storage quota exceeded for team `demo`: 40 GB used of 50 GB, this checkpoint is 20 GB; \
             delete checkpoints with `nsml model rm`"
        );
    }

    #[test]
    fn overwriting_a_checkpoint_frees_the_old_one() {
        let state = given(&[("demo/ds/1", "best", 80)]);
        // 80 used, limit 100: a new 90-byte `best` replaces the 80-byte one.
        assert!(
            state
                .decide_save(&save("demo/ds/1", "best", 90, 100))
                .is_ok()
        );
        assert!(
            state
                .decide_save(&save("demo/ds/1", "other", 90, 100))
                .is_err()
        );
        let mut after = state.clone();
        after.apply_saved(CheckpointSaved {
            checkpoint: Some(cp("demo/ds/1", "best", 90)),
            team: "demo".into(),
            blob: "b2".into(),
        });
        assert_eq!(after.used(), 90);
        assert_eq!(after.of_session("demo/ds/1").count(), 1);
    }

    #[test]
    fn deleting_all_checkpoints_of_a_session() {
        let state = given(&[
            ("demo/ds/1", "0", 1),
            ("demo/ds/1", "1", 2),
            ("demo/ds/2", "0", 4),
        ]);
        let evs = state
            .decide_delete("demo", "demo/ds/1", "*", &BTreeMap::new())
            .unwrap()
            .deleted;
        assert_eq!(evs.len(), 2);
        let mut after = state.clone();
        for ev in &evs {
            after.apply_deleted(ev);
        }
        assert_eq!(after.used(), 4);
        assert_eq!(after.of_session("demo/ds/1").count(), 0);
        // `*` over nothing is fine: the session service deletes on `rm -f` whether or not there are any.
        assert!(
            after
                .decide_delete("demo", "demo/ds/1", "*", &BTreeMap::new())
                .unwrap()
                .deleted
                .is_empty()
        );
    }

    #[test]
    fn deleting_an_unknown_checkpoint_is_not_found() {
        let state = given(&[("demo/ds/1", "0", 1)]);
        let err = state
            .decide_delete("demo", "demo/ds/1", "best", &BTreeMap::new())
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "checkpoint `demo/ds/1/best` not found; `nsml model ls demo/ds/1` lists them"
        );
        let evs = state
            .decide_delete("demo", "demo/ds/1", "e*", &BTreeMap::new())
            .map(|v| v.deleted.len());
        assert!(evs.is_err());
    }

    #[test]
    fn given_a_checkpoint_behind_a_board_entry_when_deleting_then_it_is_kept() {
        let state = given(&[("demo/ds/1", "0", 1), ("demo/ds/1", "best", 2)]);
        let kept = BTreeMap::from([("best".to_string(), "ds".to_string())]);
        // A pattern passes over it and says so.
        let all = state
            .decide_delete("demo", "demo/ds/1", "*", &kept)
            .unwrap();
        assert_eq!(
            all.deleted
                .iter()
                .map(|e| e.checkpoint.as_str())
                .collect::<Vec<_>>(),
            ["0"]
        );
        assert_eq!(all.kept, ["best"]);
        let only = state
            .decide_delete("demo", "demo/ds/1", "b*", &kept)
            .unwrap();
        assert!(only.deleted.is_empty() && only.kept == ["best"], "{only:?}");
        // Named, it is refused with the reason.
        let err = state
            .decide_delete("demo", "demo/ds/1", "best", &kept)
            .unwrap_err();
        assert!(
            matches!(&err, StorageError::KeptForBoard { dataset, .. } if dataset == "ds")
                && err.to_string().contains("best score on the `ds` board"),
            "{err}"
        );
    }

    #[test]
    fn dataset_names_belong_to_one_competition() {
        let owner = DatasetOwner {
            competition: Some("demo".into()),
        };
        assert!(owner.decide_register("t1-cls", "demo").is_ok());
        let err = owner.decide_register("t1-cls", "other").unwrap_err();
        assert!(matches!(err, StorageError::DatasetTaken { .. }));
        assert!(
            DatasetOwner::default()
                .decide_register("t1-cls", "x")
                .is_ok()
        );
    }

    #[test]
    fn metrics_get_their_direction() {
        let meta = |metric: &str, direction: Direction| DatasetMeta {
            name: "ds".into(),
            metric: metric.into(),
            direction: direction as i32,
            ..Default::default()
        };
        let m = check_dataset_meta(meta("Accuracy", Direction::Unspecified)).unwrap();
        assert_eq!(m.metric, "accuracy");
        assert_eq!(m.direction, Direction::Descending as i32);
        assert_eq!(
            check_dataset_meta(meta("cer", Direction::Unspecified))
                .unwrap()
                .direction,
            Direction::Ascending as i32
        );
        assert!(check_dataset_meta(meta("accuracy", Direction::Ascending)).is_err());
        assert!(matches!(
            check_dataset_meta(meta("auc", Direction::Unspecified)),
            Err(StorageError::UnknownMetric { .. })
        ));
        assert!(check_dataset_meta(meta("custom", Direction::Descending)).is_err());
        let mut custom = meta("custom", Direction::Descending);
        custom.eval_script = "score.py".into();
        assert!(check_dataset_meta(custom.clone()).is_ok());
        custom.eval_script = "../score.py".into();
        assert!(check_dataset_meta(custom).is_err());
    }

    #[test]
    fn bytes_read_like_model_ls() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(450 * GIB), "450 GB");
        assert_eq!(human_bytes(100 * MIB), "100 MB");
        assert_eq!(human_bytes(450 * GIB - 100 * MIB), "449.9 GB");
        assert_eq!(human_bytes(GIB + GIB / 5), "1.2 GB");
        assert_eq!(human_bytes(628_539_392), "599.42 MB");
    }
}
