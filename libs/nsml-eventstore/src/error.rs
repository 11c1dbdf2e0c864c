//! The errors of the event store.

use crate::ExpectedVersion;

/// Everything that can go wrong when using the log.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The stream's version did not match what the writer expected; nothing was stored.
    #[error("stream `{stream}` is at version {actual}, expected {expected}")]
    Conflict {
        /// The stream appended to.
        stream: String,
        /// What the writer expected.
        expected: ExpectedVersion,
        /// The stream's actual version.
        actual: u64,
    },
    /// The database failed or could not be reached.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The schema migrations could not be applied.
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A stored row cannot be read back as an event.
    #[error("corrupt log: {0}")]
    Corrupt(String),
}

impl StoreError {
    /// Whether this is a version conflict (the caller may reload the stream and retry).
    pub fn is_conflict(&self) -> bool {
        matches!(self, StoreError::Conflict { .. })
    }
}
