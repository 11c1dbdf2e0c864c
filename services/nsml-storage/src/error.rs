//! Everything the storage service can refuse or fail at, and the one mapping of it to gRPC statuses.

use nsml_common::error::ErrorCode;
use nsml_common::projection::Lagging;
use nsml_eventstore::StoreError;
use tonic::Status;

use nsml_manifest::format_size as human_bytes;

/// The storage service's errors: refusals of a request (the caller can fix them) and failures of the
/// infrastructure (logged in full, masked to the caller).
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// A request that is malformed in a way no other variant names.
    #[error("{0}")]
    BadRequest(String),

    /// The metric is none the platform's scorer knows.
    #[error(
        "unknown metric `{metric}`: use accuracy, macro_f1, mse, rmse, mae, cer, wer, or custom with an evaluation script"
    )]
    UnknownMetric { metric: String },

    /// An uploaded archive breaks a safety rule or cannot be read.
    #[error("{what} archive refused: {reason}")]
    BadArchive { what: String, reason: String },

    /// A dataset archive lacks a part of the layout.
    #[error(
        "dataset `{dataset}` archive lacks `{part}`: expected train/train_data, train/train_label, test/test_data and test/test_label (optionally test_submit/test_data and test_submit/test_label)"
    )]
    MissingPart { dataset: String, part: String },

    /// An upload is larger than the platform accepts.
    #[error("{what} is larger than the {} limit{hint}", human_bytes(*.limit))]
    TooLarge {
        what: String,
        limit: u64,
        /// What the caller can do about it, starting with `; `.
        hint: &'static str,
    },

    /// An archive expands, once unpacked, past what the platform takes of one archive.
    #[error(
        "{what} expands to more than {} once unpacked, the most one {kind} may hold{hint}",
        human_bytes(*.limit)
    )]
    ExpandsTooLarge {
        what: String,
        kind: &'static str,
        limit: u64,
        /// What the caller can do about it, starting with `; `.
        hint: &'static str,
    },

    /// A checkpoint, counted as it is unpacked, would take the team over its storage quota.
    #[error(
        "storage quota exceeded for team `{team}`: {} used of {}, this checkpoint expands to more than {} once unpacked; delete checkpoints with `nsml model rm`",
        human_bytes(*.used), human_bytes(*.limit), human_bytes(*.at_least)
    )]
    QuotaExceededUnpacked {
        team: String,
        used: u64,
        limit: u64,
        at_least: u64,
    },

    /// Saving a checkpoint would take the team over its storage quota.
    #[error(
        "storage quota exceeded for team `{team}`: {} used of {}, this checkpoint is {}; delete checkpoints with `nsml model rm`",
        human_bytes(*.used), human_bytes(*.limit), human_bytes(*.adding)
    )]
    QuotaExceeded {
        team: String,
        used: u64,
        limit: u64,
        adding: u64,
    },

    /// The dataset name is taken by another competition.
    #[error(
        "dataset `{name}` already exists in competition `{competition}`; dataset names are unique across the platform"
    )]
    DatasetTaken { name: String, competition: String },

    #[error("dataset `{name}` not found; `nsml dataset ls` lists them")]
    DatasetNotFound { name: String },

    /// A limit set in the server's environment is unreadable.
    #[error("`{var}={value}` is not {expected}")]
    Config {
        var: &'static str,
        value: String,
        expected: &'static str,
    },

    /// An optional part of a dataset that this dataset does not have.
    #[error("dataset `{dataset}` has no {part}")]
    PartNotFound { dataset: String, part: &'static str },

    #[error("code snapshot `{id}` not found")]
    CodeNotFound { id: String },

    #[error("checkpoint `{session}/{checkpoint}` not found; `nsml model ls {session}` lists them")]
    CheckpointNotFound { session: String, checkpoint: String },

    /// The checkpoint backs its team's best score on a board.
    #[error(
        "checkpoint `{session}/{checkpoint}` is kept: it backs your team's best score on the `{dataset}` board, and \
         the competition keeps what produced a board entry (with its code) for reproducibility; it can go once a \
         better submit replaces it"
    )]
    KeptForBoard {
        session: String,
        checkpoint: String,
        dataset: String,
    },

    /// The caller has no team in the competition a dataset belongs to.
    #[error(
        "you are not in a team of competition `{competition}`, which dataset `{dataset}` belongs to"
    )]
    NotInCompetition {
        competition: String,
        dataset: String,
    },

    /// The caller may not see what belongs to another team.
    #[error("{what} belongs to another team")]
    OtherTeam { what: String },

    /// The caller asked about a team that is not theirs.
    #[error("you may see your own team's usage only, not team `{team}`'s")]
    NotYourTeam { team: String },

    /// The read model has not caught up with the log yet (just after start-up).
    #[error("the storage service is still loading its state from the log; retry shortly")]
    NotReady,

    /// The client broke off an upload.
    #[error("upload interrupted: {0}")]
    Interrupted(String),

    /// A blob the log refers to is missing from the blob store.
    #[error("blob `{id}` is missing from the blob store")]
    BlobMissing { id: String },

    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },

    #[error("event store: {0}")]
    Store(#[from] StoreError),

    /// The read model did not catch up with the log in time to decide on it.
    #[error("{0}")]
    Lagging(#[from] Lagging),

    /// A refusal phrased by a shared helper (names, caller checks).
    #[error("{}", .0.message())]
    Refused(#[from] Status),
}

impl StorageError {
    /// Wraps an IO error with what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        StorageError::Io {
            context: context.into(),
            source,
        }
    }
}

impl StorageError {
    /// The platform code this error travels under.
    fn code(&self) -> ErrorCode {
        use StorageError::*;
        match self {
            BadRequest(_) | UnknownMetric { .. } | MissingPart { .. } => ErrorCode::BadRequest,
            BadArchive { .. } => ErrorCode::BadArchive,
            TooLarge { .. } | ExpandsTooLarge { .. } => ErrorCode::TooLarge,
            QuotaExceeded { .. } | QuotaExceededUnpacked { .. } => ErrorCode::QuotaExceeded,
            DatasetTaken { .. } => ErrorCode::AlreadyExists,
            DatasetNotFound { .. }
            | PartNotFound { .. }
            | CodeNotFound { .. }
            | CheckpointNotFound { .. } => ErrorCode::NotFound,
            KeptForBoard { .. } => ErrorCode::WrongState,
            NotInCompetition { .. } | OtherTeam { .. } | NotYourTeam { .. } => {
                ErrorCode::PermissionDenied
            }
            NotReady | Lagging(_) => ErrorCode::Unavailable,
            Interrupted(_) => ErrorCode::Conflict,
            Refused(status) => ErrorCode::of_or_implied(status),
            Store(_) | BlobMissing { .. } | Io { .. } | Config { .. } => ErrorCode::Internal,
        }
    }
}

impl From<StorageError> for Status {
    fn from(err: StorageError) -> Self {
        use StorageError::*;
        let code = err.code();
        let msg = err.to_string();
        match err {
            Refused(status) => status,
            Lagging(lag) => lag.into(),
            Store(err) => nsml_common::status::store("storing the event", err),
            BlobMissing { .. } | Io { .. } | Config { .. } => {
                nsml_common::status::internal("serving storage", msg)
            }
            _ => code.status(msg),
        }
    }
}
