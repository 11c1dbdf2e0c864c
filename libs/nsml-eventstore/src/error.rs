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

    /// Whether the database could not be reached or is restarting (connection refused or lost, the pool
    /// timed out waiting for a connection, the server shutting down): the same call may succeed shortly.
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Database(err) => is_sqlx_unavailable(err),
            StoreError::Postgres(err) => is_sqlx_unavailable(err),
            StoreError::Sqlite(err) => matches!(
                err.sqlite_error_code(),
                Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
            ),
            StoreError::Closed => true,
            _ => false,
        }
    }
}

/// Whether a sqlx error means the database is out of reach for now rather than that the request was wrong.
fn is_sqlx_unavailable(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        // SQLSTATE class 08 is a connection exception; 57P01-57P03 are the server shutting down or starting.
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            code.starts_with("08") || matches!(&*code, "57P01" | "57P02" | "57P03")
        }),
        _ => false,
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
    fn lost_connections_are_unavailable_and_bad_rows_are_not() {
        let io = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(StoreError::Database(sqlx::Error::Io(io)).is_unavailable());
        assert!(StoreError::Database(sqlx::Error::PoolTimedOut).is_unavailable());
        assert!(
            StoreError::Postgres(std::sync::Arc::new(sqlx::Error::PoolClosed)).is_unavailable()
        );
        assert!(!StoreError::Corrupt("bad row".into()).is_unavailable());
        assert!(!StoreError::Database(sqlx::Error::RowNotFound).is_unavailable());
        let conflict = StoreError::Conflict {
            stream: "s".into(),
            expected: ExpectedVersion::Exact(1),
            actual: 2,
        };
        assert!(!conflict.is_unavailable());
    }

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
