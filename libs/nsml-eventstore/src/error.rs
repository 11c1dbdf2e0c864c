//! The errors of the event store.

use std::sync::Arc;

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
    /// A Postgres transaction failed. Shared, because one failed commit fails every append of its batch.
    #[error("database error: {0}")]
    Postgres(#[source] Arc<sqlx::Error>),
    /// The SQLite database failed. Shared, because one failed commit fails every append of its batch.
    #[error("database error: {0}")]
    Sqlite(#[source] Arc<rusqlite::Error>),
    /// The schema migrations could not be applied.
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A stored row cannot be read back as an event.
    #[error("corrupt log: {0}")]
    Corrupt(String),
    /// The store was closed; it serves no more calls.
    #[error("the event store is closed")]
    Closed,
    /// The SQLite store's writer thread could not be started.
    #[error("cannot start the event log's writer thread: {0}")]
    Thread(#[source] std::io::Error),
    /// The SQLite store's database file could not be opened.
    #[error("cannot open the event log's file: {0}")]
    Open(#[source] std::io::Error),
}

impl From<rusqlite::Error> for StoreError {
    fn from(err: rusqlite::Error) -> Self {
        StoreError::Sqlite(Arc::new(err))
    }
}

impl StoreError {
    /// Whether this is a version conflict (the caller may reload the stream and retry).
    pub fn is_conflict(&self) -> bool {
        matches!(self, StoreError::Conflict { .. })
    }
}

/// Whether a Postgres error is a violation of the unique key on (stream, version) of the `events` table, which
/// Postgres names `events_stream_version_key`.
pub(crate) fn is_stream_version_violation(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Database(db) => {
            db.is_unique_violation() && db.constraint() == Some("events_stream_version_key")
        }
        _ => false,
    }
}

/// Whether a SQLite error is a violation of the unique key on (stream, version) of the `events` table; SQLite
/// names the columns in its message (`UNIQUE constraint failed: events.stream, events.version`).
pub(crate) fn is_sqlite_stream_version_violation(err: &rusqlite::Error) -> bool {
    match err {
        rusqlite::Error::SqliteFailure(failure, Some(message)) => {
            failure.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
                && message.contains("events.stream, events.version")
        }
        _ => false,
    }
}

/// Whether a store error is a database's violation of the unique key on (stream, version), from either backend.
#[cfg(any(test, feature = "conformance"))]
pub(crate) fn is_stream_version_clash(err: &StoreError) -> bool {
    match err {
        StoreError::Database(err) => is_stream_version_violation(err),
        StoreError::Sqlite(err) => is_sqlite_stream_version_violation(err),
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
