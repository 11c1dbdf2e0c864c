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

/// Whether an error is a violation of the unique key on (stream, version) of the `events` table.
///
/// Postgres names the constraint (`events_stream_version_key`); SQLite names the columns in its message
/// (`UNIQUE constraint failed: events.stream, events.version`).
pub(crate) fn is_stream_version_violation(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Database(db) => {
            db.is_unique_violation()
                && (db.constraint() == Some("events_stream_version_key")
                    || db.message().contains("events.stream, events.version"))
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use crate::ExpectedVersion;

    use super::StoreError;

    #[test]
    fn conflict_messages() {
        let conflict = |expected| StoreError::Conflict {
            stream: "quota-acme".into(),
            expected,
            actual: 5,
        };
        assert_eq!(
            conflict(ExpectedVersion::Exact(4)).to_string(),
            "stream `quota-acme` is at version 5, expected 4"
        );
        assert_eq!(
            conflict(ExpectedVersion::NoStream).to_string(),
            "stream `quota-acme` is at version 5, expected no stream"
        );
    }
}
