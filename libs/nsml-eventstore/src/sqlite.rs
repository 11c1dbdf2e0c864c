//! The SQLite backend: one database file (or memory), WAL journal, writers serialized by `BEGIN IMMEDIATE`.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use crate::chain::{ChainWalker, VERIFY_PAGE, beyond_head};
use crate::error::is_stream_version_violation;
use crate::hash::{ChainBreak, event_hash};
use crate::row::{ChainRow, EventRow, into_events, metadata_json, to_i64, to_u64};
use crate::{Appended, EventStore, ExpectedVersion, NewEvent, StoreError, StoredEvent};

static MIGRATOR: Migrator = sqlx::migrate!("./migrations/sqlite");

/// How long a writer waits for another process's write transaction before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// The log in a SQLite database.
///
/// Appends from this value are serialized in-process first (so they never spin on SQLite's busy handler) and then
/// by `BEGIN IMMEDIATE`, which also serializes them against other processes using the same file. The journal is
/// WAL with `synchronous = NORMAL`: a committed append survives a crash of the process, and reads never block
/// writes.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pub(crate) pool: SqlitePool,
    write_lock: std::sync::Arc<tokio::sync::Mutex<()>>,
}

impl SqliteStore {
    /// Opens (creating if needed) the log in the database file at `path` and applies migrations.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(BUSY_TIMEOUT)
            .pragma("temp_store", "memory");
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .min_connections(1)
            .connect_with(options)
            .await?;
        Self::with_pool(pool).await
    }

    /// A log in memory, gone when the value (and its clones) are dropped; for tests and tools.
    pub async fn in_memory() -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str("sqlite::memory:")?;
        // One connection that is never closed: every connection to `:memory:` is a database of its own.
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(options)
            .await?;
        Self::with_pool(pool).await
    }

    async fn with_pool(pool: SqlitePool) -> Result<Self, StoreError> {
        MIGRATOR.run(&pool).await?;
        Ok(SqliteStore {
            pool,
            write_lock: std::sync::Arc::new(tokio::sync::Mutex::new(())),
        })
    }

    /// Closes every connection; later calls fail.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    async fn append_locked(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<Appended, StoreError> {
        // The write lock is held from BEGIN IMMEDIATE on, so version and head can be read in one statement.
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let (current, head_position, head_hash): (i64, i64, String) = sqlx::query_as(
            "SELECT (SELECT COALESCE(MAX(version), 0) FROM events WHERE stream = ?), position, hash \
             FROM log_head WHERE id = 1",
        )
        .bind(stream)
        .fetch_one(&mut *tx)
        .await?;
        let current = to_u64(current, "version")?;
        expected.check(stream, current)?;
        let head_position = to_u64(head_position, "position")?;
        if events.is_empty() {
            return Ok(Appended {
                version: current,
                first_position: head_position + 1,
                last_position: head_position,
            });
        }

        let mut prev_hash = head_hash;
        let mut position = head_position;
        let mut version = current;
        for event in &events {
            position += 1;
            version += 1;
            let metadata = metadata_json(&event.metadata);
            let hash = event_hash(
                &prev_hash,
                position,
                stream,
                version,
                &event.event_type,
                &event.payload,
                &metadata,
            );
            let inserted = sqlx::query(
                "INSERT INTO events (position, stream, version, event_type, payload, metadata, prev_hash, hash) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(to_i64(position))
            .bind(stream)
            .bind(to_i64(version))
            .bind(&event.event_type)
            .bind(&event.payload)
            .bind(&metadata)
            .bind(&prev_hash)
            .bind(&hash)
            .execute(&mut *tx)
            .await;
            if let Err(err) = inserted {
                tx.rollback().await?;
                return Err(self.map_insert_error(err, stream, expected).await);
            }
            prev_hash = hash;
        }
        sqlx::query("INSERT INTO outbox (position) SELECT position FROM events WHERE position > ? AND position <= ?")
            .bind(to_i64(head_position))
            .bind(to_i64(position))
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE log_head SET position = ?, hash = ? WHERE id = 1")
            .bind(to_i64(position))
            .bind(&prev_hash)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Appended {
            version,
            first_position: head_position + 1,
            last_position: position,
        })
    }

    /// A unique-key violation on (stream, version) means another writer got there first: a conflict. Any other
    /// error (a clash on `position` included) stays a database error.
    async fn map_insert_error(
        &self,
        err: sqlx::Error,
        stream: &str,
        expected: ExpectedVersion,
    ) -> StoreError {
        if !is_stream_version_violation(&err) {
            return err.into();
        }
        match self.stream_version(stream).await {
            Ok(actual) => StoreError::Conflict {
                stream: stream.to_owned(),
                expected,
                actual,
            },
            Err(e) => e,
        }
    }
}

#[async_trait::async_trait]
impl EventStore for SqliteStore {
    async fn append(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<Appended, StoreError> {
        let _writer = self.write_lock.lock().await;
        self.append_locked(stream, expected, events).await
    }

    async fn read_stream(
        &self,
        stream: &str,
        after_version: u64,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let rows: Vec<EventRow> = sqlx::query_as(
            "SELECT position, stream, version, event_type, payload, metadata, hash \
             FROM events WHERE stream = ? AND version > ? ORDER BY version",
        )
        .bind(stream)
        .bind(to_i64(after_version))
        .fetch_all(&self.pool)
        .await?;
        into_events(rows)
    }

    async fn read_all(
        &self,
        after_position: u64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let rows: Vec<EventRow> = sqlx::query_as(
            "SELECT position, stream, version, event_type, payload, metadata, hash \
             FROM events WHERE position > ? ORDER BY position LIMIT ?",
        )
        .bind(to_i64(after_position))
        .bind(to_i64(limit as u64))
        .fetch_all(&self.pool)
        .await?;
        into_events(rows)
    }

    async fn stream_version(&self, stream: &str) -> Result<u64, StoreError> {
        let version: i64 =
            sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM events WHERE stream = ?")
                .bind(stream)
                .fetch_one(&self.pool)
                .await?;
        to_u64(version, "version")
    }

    async fn head_position(&self) -> Result<u64, StoreError> {
        let position: i64 = sqlx::query_scalar("SELECT position FROM log_head WHERE id = 1")
            .fetch_one(&self.pool)
            .await?;
        to_u64(position, "position")
    }

    async fn outbox_peek(&self, limit: usize) -> Result<Vec<StoredEvent>, StoreError> {
        let rows: Vec<EventRow> = sqlx::query_as(
            "SELECT e.position, e.stream, e.version, e.event_type, e.payload, e.metadata, e.hash \
             FROM outbox o JOIN events e ON e.position = o.position ORDER BY o.position LIMIT ?",
        )
        .bind(to_i64(limit as u64))
        .fetch_all(&self.pool)
        .await?;
        into_events(rows)
    }

    async fn outbox_ack(&self, positions: &[u64]) -> Result<(), StoreError> {
        if positions.is_empty() {
            return Ok(());
        }
        let list =
            serde_json::Value::from(positions.iter().map(|&p| to_i64(p)).collect::<Vec<_>>());
        sqlx::query("DELETE FROM outbox WHERE position IN (SELECT value FROM json_each(?))")
            .bind(list.to_string())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn load_checkpoint(&self, consumer: &str) -> Result<u64, StoreError> {
        let position: Option<i64> =
            sqlx::query_scalar("SELECT position FROM consumer_checkpoints WHERE consumer = ?")
                .bind(consumer)
                .fetch_optional(&self.pool)
                .await?;
        to_u64(position.unwrap_or(0), "checkpoint")
    }

    async fn save_checkpoint(&self, consumer: &str, position: u64) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO consumer_checkpoints (consumer, position) VALUES (?, ?) \
             ON CONFLICT (consumer) DO UPDATE SET position = excluded.position",
        )
        .bind(consumer)
        .bind(to_i64(position))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn verify_chain(&self) -> Result<Option<ChainBreak>, StoreError> {
        let (head_position, head_hash, max_position): (i64, String, i64) = sqlx::query_as(
            "SELECT h.position, h.hash, (SELECT COALESCE(MAX(position), 0) FROM events) \
             FROM log_head h WHERE h.id = 1",
        )
        .fetch_one(&self.pool)
        .await?;
        let head = to_u64(head_position, "position")?;
        let select = "SELECT position, stream, version, event_type, payload, metadata, hash, prev_hash \
                      FROM events WHERE position > ? AND position <= ? ORDER BY position LIMIT ?";
        let mut walker = ChainWalker::new();
        let mut after = 0_i64;
        loop {
            let rows: Vec<ChainRow> = sqlx::query_as(select)
                .bind(after)
                .bind(head_position)
                .bind(VERIFY_PAGE)
                .fetch_all(&self.pool)
                .await?;
            for row in &rows {
                if let Some(found) = walker.check(row)? {
                    return Ok(Some(found));
                }
            }
            match rows.last() {
                Some(last) if rows.len() as i64 == VERIFY_PAGE => after = last.0,
                _ => break,
            }
        }
        if let Some(found) = walker.finish(head, &head_hash) {
            return Ok(Some(found));
        }
        if max_position > head_position {
            let row: ChainRow = sqlx::query_as(select)
                .bind(head_position)
                .bind(i64::MAX)
                .bind(1_i64)
                .fetch_one(&self.pool)
                .await?;
            return beyond_head(&row, head).map(Some);
        }
        Ok(None)
    }
}
