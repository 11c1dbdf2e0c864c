//! Command handling: check what was uploaded, store its blobs, decide against the stream's state and append
//! the event, then wait until the read model shows it (so a `List` right after sees the write).
//!
//! Blobs are stored before their event is appended: a crash in between leaves an unreferenced blob (garbage,
//! harmless), never an event naming a blob that is not there.

use std::sync::Arc;
use std::time::Duration;

use nsml_common::aggregate::{Aggregates, Outcome};
use nsml_common::event::new_event;
use nsml_common::names::SessionName;
use nsml_common::now_ms;
use nsml_common::projection::Projection;
use nsml_eventstore::{Appended, EventStore, ExpectedVersion};
use nsml_proto::v1::{
    Checkpoint, CodeSnapshot, CodeUploaded, Dataset, DatasetMeta, DatasetPart, DatasetRegistered,
};

use crate::Limits;
use crate::archive;
use crate::blobs::{BlobStore, ByteStream, Staged, Staging};
use crate::domain::{
    DatasetBlobs, DatasetOwner, MAX_CHECKPOINT_EXPANDED_BYTES, MAX_CODE_EXPANDED_BYTES,
    SaveCheckpoint, TeamCheckpoints,
};
use crate::error::StorageError;
use crate::projection::StorageView;

/// How long a write waits for the read model to show it before answering anyway.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a read waits for the read model to catch up with the log after start-up.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// The storage service's state and command handlers, shared by every call.
pub struct Storage {
    store: Arc<dyn EventStore>,
    view: Arc<Projection<StorageView>>,
    blobs: Arc<dyn BlobStore>,
    staging: Staging,
    datasets: Aggregates<DatasetOwner>,
    checkpoints: Aggregates<TeamCheckpoints>,
    limits: Limits,
}

/// Stream of a team's checkpoints.
fn checkpoints_stream(team: &str) -> String {
    format!("checkpoints-{team}")
}

fn command_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Runs a blocking check over a staged file on a blocking thread, handing the file back.
async fn blocking<T: Send + 'static>(
    staged: Staged,
    f: impl FnOnce(&Staged) -> Result<T, StorageError> + Send + 'static,
) -> Result<(Staged, T), StorageError> {
    let (staged, result) = tokio::task::spawn_blocking(move || {
        let r = f(&staged);
        (staged, r)
    })
    .await
    .map_err(|e| StorageError::io("checking an archive", std::io::Error::other(e)))?;
    Ok((staged, result?))
}

impl Storage {
    /// Builds the handlers over a running projection.
    pub fn new(
        store: Arc<dyn EventStore>,
        view: Arc<Projection<StorageView>>,
        blobs: Arc<dyn BlobStore>,
        staging: Staging,
        limits: Limits,
    ) -> Self {
        Self {
            datasets: Aggregates::new(store.clone()),
            checkpoints: Aggregates::new(store.clone()),
            store,
            view,
            blobs,
            staging,
            limits,
        }
    }

    /// The configured limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The staging area uploads are spooled to.
    pub fn staging(&self) -> &Staging {
        &self.staging
    }

    /// Waits until the read model has caught up with the log as it was at start-up.
    pub async fn ready(&self) -> Result<(), StorageError> {
        tokio::time::timeout(READY_TIMEOUT, self.view.wait_ready())
            .await
            .map_err(|_| StorageError::NotReady)
    }

    /// Reads the read model.
    pub fn read<R>(&self, f: impl FnOnce(&StorageView) -> R) -> R {
        self.view.read(f)
    }

    /// Waits until the read model shows an append.
    async fn settle(&self, appended: &Appended) {
        // The append is stored: failing the call would have the caller repeat it. The lag is logged.
        if let Err(lag) = self
            .view
            .wait_for(appended.last_position, SETTLE_TIMEOUT)
            .await
        {
            tracing::warn!(%lag, "the read model did not show an append in time; answering anyway");
        }
    }

    /// Waits until the read model shows the whole log as it is now, so that a decision reads the latest
    /// facts other services recorded (a competition's new storage limit, a session's start).
    async fn catch_up(&self) -> Result<(), StorageError> {
        let head = self.store.head_position().await?;
        self.view.wait_for(head, SETTLE_TIMEOUT).await?;
        Ok(())
    }

    /// Streams a blob.
    pub async fn blob(&self, id: &str) -> Result<ByteStream, StorageError> {
        self.blobs.get(id).await
    }

    /// Refuses early (before the upload is read) a dataset name that another competition owns.
    pub fn check_dataset_owner(&self, meta: &DatasetMeta) -> Result<(), StorageError> {
        let owner = DatasetOwner {
            competition: self.read(|v| v.competition_of(&meta.name).map(String::from)),
        };
        owner.decide_register(&meta.name, &meta.competition)
    }

    /// Registers (or replaces) a dataset from its staged archive.
    pub async fn register_dataset(
        &self,
        meta: DatasetMeta,
        author: String,
        actor: &str,
        archive: Staged,
    ) -> Result<Dataset, StorageError> {
        let staging = self.staging.clone();
        let checked = meta.clone();
        let (archive, split) = blocking(archive, move |a| {
            archive::split_dataset(a.path(), &checked, &staging)
        })
        .await?;
        let mut blobs = DatasetBlobs::default();
        let mut has_trial = false;
        for (part, staged) in split.parts {
            let id = self.blobs.put(staged).await?;
            match part {
                DatasetPart::Train => blobs.train = id,
                DatasetPart::TestData => blobs.test_data = id,
                DatasetPart::TestLabel => blobs.test_label = id,
                DatasetPart::TrialData => {
                    has_trial = true;
                    blobs.trial_data = Some(id);
                }
                DatasetPart::TrialLabel => blobs.trial_label = Some(id),
                DatasetPart::EvalScript => blobs.eval_script = Some(id),
                DatasetPart::Unspecified => {}
            }
        }
        let mut meta = meta;
        if meta.private_keys.is_empty() {
            meta.private_keys = split.private_keys.unwrap_or_default();
        }
        let dataset = Dataset {
            meta: Some(meta),
            size_bytes: archive.size(),
            updated_at_ms: now_ms(),
            author,
            has_trial,
            test_items: split.test_items,
        };
        let event = DatasetRegistered {
            dataset: Some(dataset.clone()),
            blob: serde_json::to_string(&blobs)
                .map_err(|e| StorageError::io("recording a dataset's blobs", e.into()))?,
        };
        let name = dataset.meta.as_ref().map_or("", |m| m.name.as_str());
        let competition = dataset.meta.as_ref().map_or("", |m| m.competition.as_str());
        let cmd = command_id();
        let outcome = self
            .datasets
            .execute(&format!("dataset-{name}"), |owner, _| {
                owner.decide_register(name, competition)?;
                Ok(vec![new_event(&event, actor, &cmd)])
            })
            .await?;
        match outcome {
            Outcome::Committed { appended, .. } => self.settle(&appended).await,
            Outcome::Rejected(err) => return Err(err),
            Outcome::Unchanged { .. } => {}
        }
        tracing::info!(dataset = %name, %competition, size = dataset.size_bytes, "dataset registered");
        Ok(dataset)
    }

    /// Stores a team's code snapshot from its staged archive.
    pub async fn upload_code(
        &self,
        team: &str,
        uploaded_by: String,
        actor: &str,
        archive: Staged,
    ) -> Result<CodeSnapshot, StorageError> {
        const HINT: &str = "; leave generated files, data and environments out with `.nsmlignore`";
        let limits = archive::TreeLimits {
            max_entries: self.limits.code_entries,
            too_many_hint: HINT,
            max_bytes: MAX_CODE_EXPANDED_BYTES,
        };
        let (archive, tree) = blocking(archive, move |a| {
            archive::measure_tree(a.path(), "code", &limits, |_| {
                StorageError::ExpandsTooLarge {
                    what: "code".into(),
                    kind: "code snapshot",
                    limit: MAX_CODE_EXPANDED_BYTES,
                    hint: HINT,
                }
            })
        })
        .await?;
        // A snapshot is as large as the files it unpacks to, not its compressed upload.
        let size = tree.bytes;
        let id = self.blobs.put(archive).await?;
        let snapshot = CodeSnapshot {
            id: id.clone(),
            size_bytes: size,
            team: team.to_string(),
        };
        let event = CodeUploaded {
            snapshot: Some(snapshot.clone()),
            uploaded_by,
        };
        let appended = self
            .store
            .append(
                &format!("code-{id}"),
                ExpectedVersion::Any,
                vec![new_event(&event, actor, &command_id())],
            )
            .await?;
        self.settle(&appended).await;
        Ok(snapshot)
    }

    /// A team's checkpoint storage limit, from the competition of the session's dataset.
    pub fn storage_limit(&self, session: &SessionName) -> u64 {
        self.read(|v| v.storage_limit(v.competition_of(&session.dataset)))
    }

    /// Saves (or overwrites) a checkpoint of a session from its archive as it is uploaded, within the team's
    /// quota.
    ///
    /// The upload is read once: its bytes are hashed and written to a staged file while its entries are
    /// checked and counted, so nothing is read back or inflated twice. The team's room (counting the
    /// checkpoint this save overwrites as freed) bounds how far the entries are counted: a checkpoint is
    /// charged what it expands to, and one past the room stops the upload where it is found out, leaving
    /// nothing stored.
    pub async fn save_checkpoint<S>(
        &self,
        session: &SessionName,
        name: &str,
        summary_json: String,
        actor: &str,
        upload: S,
    ) -> Result<Checkpoint, StorageError>
    where
        S: futures::Stream<Item = Result<Vec<u8>, StorageError>> + Unpin,
    {
        self.catch_up().await?;
        let (limit, started) = self.read(|v| {
            (
                v.storage_limit(v.competition_of(&session.dataset)),
                v.started_at_ms(&session.to_string()),
            )
        });
        let stream = checkpoints_stream(&session.team);
        let (state, _) = self.checkpoints.load(&stream).await?;
        let (archive, size_bytes) = self
            .spool_checkpoint(session, name, upload, &state, limit)
            .await?;
        let now = now_ms();
        let mut cmd = SaveCheckpoint {
            team: session.team.clone(),
            checkpoint: Checkpoint {
                session: session.to_string(),
                name: name.to_string(),
                size_bytes,
                saved_at_ms: now,
                summary_json,
                elapsed_secs: started.map_or(0.0, |s| (now - s).max(0) as f64 / 1000.0),
            },
            blob: archive.sha256().to_string(),
            limit,
        };
        // Refuse before storing the blob when the quota is already known to be short; the decision in
        // `record_checkpoint`, on the stream as it is then, is the one that counts.
        state.decide_save(&cmd)?;
        cmd.blob = self.blobs.put(archive).await?;
        if let Some(saved) = self.record_checkpoint(&stream, &cmd, actor).await? {
            tracing::info!(session = %session, checkpoint = %name, "checkpoint saved again with the same content; kept as it was");
            return Ok(saved);
        }
        tracing::info!(session = %session, checkpoint = %name, size = cmd.checkpoint.size_bytes, "checkpoint saved");
        Ok(cmd.checkpoint)
    }

    /// Spools a checkpoint's upload to staging while checking its entries and measuring what it expands to;
    /// hands the staged archive back with that size.
    async fn spool_checkpoint<S>(
        &self,
        session: &SessionName,
        name: &str,
        upload: S,
        state: &TeamCheckpoints,
        limit: u64,
    ) -> Result<(Staged, u64), StorageError>
    where
        S: futures::Stream<Item = Result<Vec<u8>, StorageError>> + Unpin,
    {
        let what = format!("checkpoint `{session}/{name}`");
        let used = state.used();
        let replacing = state
            .get(&session.to_string(), name)
            .map_or(0, |p| p.checkpoint.size_bytes);
        let room = limit.saturating_sub(used.saturating_sub(replacing));
        let max_entries = self.limits.checkpoint_entries;
        let team = session.team.clone();
        let check = move |reader: &mut dyn std::io::Read| {
            let limits = archive::TreeLimits {
                max_entries,
                too_many_hint: "",
                max_bytes: room.min(MAX_CHECKPOINT_EXPANDED_BYTES),
            };
            archive::measure_reader(reader, &what, &limits, |at_least| {
                if room < MAX_CHECKPOINT_EXPANDED_BYTES {
                    StorageError::QuotaExceededUnpacked {
                        team,
                        used,
                        limit,
                        at_least,
                    }
                } else {
                    StorageError::ExpandsTooLarge {
                        what: what.clone(),
                        kind: "checkpoint",
                        limit: MAX_CHECKPOINT_EXPANDED_BYTES,
                        hint: "",
                    }
                }
            })
        };
        // Nothing larger than the team's whole quota can fit: stop reading there. (The archive is at least
        // as large as what it holds, unless gzip'd, as checkpoints saved before were.)
        let team = session.team.clone();
        let too_large = |adding| StorageError::QuotaExceeded {
            team,
            used,
            limit,
            adding,
        };
        let (archive, tree) = self
            .staging
            .spool_checked(upload, limit, too_large, check)
            .await?;
        Ok((archive, tree.bytes))
    }

    /// Appends the save of a checkpoint whose blob is stored, deciding on the stream as it is then.
    ///
    /// A save sent again (the runner repeats an upload whose answer a restart lost) finds the checkpoint it
    /// made: same content, same summary. It gets that checkpoint back, with no second event and no second
    /// charge; a new save returns `None`.
    async fn record_checkpoint(
        &self,
        stream: &str,
        cmd: &SaveCheckpoint,
        actor: &str,
    ) -> Result<Option<Checkpoint>, StorageError> {
        let command = command_id();
        let mut already = None;
        let outcome = self
            .checkpoints
            .execute(stream, |state, _| {
                if let Some(saved) = state.get(&cmd.checkpoint.session, &cmd.checkpoint.name)
                    && saved.blob == cmd.blob
                    && saved.checkpoint.summary_json == cmd.checkpoint.summary_json
                {
                    already = Some(saved.checkpoint.clone());
                    return Ok(vec![]);
                }
                already = None;
                let event = state.decide_save(cmd)?;
                Ok(vec![new_event(&event, actor, &command)])
            })
            .await?;
        match outcome {
            Outcome::Committed { appended, .. } => self.settle(&appended).await,
            Outcome::Rejected(err) => return Err(err),
            Outcome::Unchanged { .. } => {}
        }
        Ok(already)
    }

    /// Deletes a session's checkpoints matching `pattern` (`*` = all); returns the names deleted, and those
    /// the pattern matched that are kept because each backs the team's best score on a board.
    pub async fn delete_checkpoints(
        &self,
        session: &SessionName,
        pattern: &str,
        actor: &str,
    ) -> Result<(Vec<String>, Vec<String>), StorageError> {
        let name = session.to_string();
        let command = command_id();
        let kept = self.read(|v| v.kept_for_board(&session.team, &name));
        let mut deleted = Vec::new();
        let mut passed_over = Vec::new();
        let outcome = self
            .checkpoints
            .execute(&checkpoints_stream(&session.team), |state, _| {
                let decided = state.decide_delete(&session.team, &name, pattern, &kept)?;
                deleted = decided
                    .deleted
                    .iter()
                    .map(|e| e.checkpoint.clone())
                    .collect();
                passed_over = decided.kept;
                Ok(decided
                    .deleted
                    .iter()
                    .map(|e| new_event(e, actor, &command))
                    .collect())
            })
            .await?;
        match outcome {
            Outcome::Committed { appended, .. } => self.settle(&appended).await,
            Outcome::Rejected(err) => return Err(err),
            Outcome::Unchanged { .. } => {}
        }
        Ok((deleted, passed_over))
    }
}
