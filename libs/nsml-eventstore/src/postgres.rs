//! The Postgres backend: many writers in many processes, serialized on the single-row `log_head` table.

use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgPool, PgPoolOptions};

use crate::chain::{ChainWalker, VERIFY_PAGE, beyond_head};
use crate::error::is_stream_version_violation;
use crate::hash::{ChainBreak, event_hash};
use crate::lease::PostgresLease;
use crate::row::{
    ChainRow, EventRow, advance_watermark, into_events, metadata_json, to_i64, to_u64,
};
use crate::{Appended, EventStore, ExpectedVersion, NewEvent, StoreError, StoredEvent};

static MIGRATOR: Migrator = sqlx::migrate!("./migrations/postgres");

/// Connections per store.
const POOL_SIZE: u32 = 10;

/// The log in a Postgres database.
///
/// Each append locks the `log_head` row (`SELECT ... FOR UPDATE`) for the rest of its transaction, so appends
/// from every process are serialized: positions are assigned and committed in order, and readers never see a
/// position before the ones below it.
#[derive(Debug, Clone)]
pub struct PostgresStore {
    pub(crate) pool: PgPool,
}

impl PostgresStore {
    /// Connects to the database at `url` (`postgres://user@host:port/db`) and applies migrations.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(POOL_SIZE)
            .acquire_timeout(Duration::from_secs(30))
            .connect(url)
            .await?;
        MIGRATOR.run(&pool).await?;
        Ok(PostgresStore { pool })
    }

    /// The lease deciding which of the processes sharing this database sweeps the outbox.
    pub fn outbox_lease(&self) -> PostgresLease {
        PostgresLease::new(self.pool.clone())
    }

    /// Closes every connection; later calls fail.
    pub async fn close(&self) {
        self.pool.close().await;
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
impl EventStore for PostgresStore {
    async fn append(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<Appended, StoreError> {
        let mut tx = self.pool.begin().await?;
        let (head_position, head_hash): (i64, String) =
            sqlx::query_as("SELECT position, hash FROM log_head WHERE id = 1 FOR UPDATE")
                .fetch_one(&mut *tx)
                .await?;
        let head_position = to_u64(head_position, "position")?;
        let current: i64 = sqlx::query_scalar(
            "SELECT COALESCE(MAX(version), 0)::BIGINT FROM events WHERE stream = $1",
        )
        .bind(stream)
        .fetch_one(&mut *tx)
        .await?;
        let current = to_u64(current, "version")?;
        expected.check(stream, current)?;
        if events.is_empty() {
            return Ok(Appended {
                version: current,
                first_position: head_position + 1,
                last_position: head_position,
            });
        }

        let count = events.len();
        let mut positions = Vec::with_capacity(count);
        let mut versions = Vec::with_capacity(count);
        let mut types = Vec::with_capacity(count);
        let mut payloads = Vec::with_capacity(count);
        let mut metadatas = Vec::with_capacity(count);
        let mut prev_hashes = Vec::with_capacity(count);
        let mut hashes = Vec::with_capacity(count);
        let mut prev_hash = head_hash;
        for (i, event) in events.into_iter().enumerate() {
            let position = head_position + 1 + i as u64;
            let version = current + 1 + i as u64;
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
            positions.push(to_i64(position));
            versions.push(to_i64(version));
            types.push(event.event_type);
            payloads.push(event.payload);
            metadatas.push(metadata);
            prev_hashes.push(std::mem::replace(&mut prev_hash, hash.clone()));
            hashes.push(hash);
        }
        let last_position = head_position + count as u64;
        let last_version = current + count as u64;

        let inserted = sqlx::query(
            "INSERT INTO events (position, stream, version, event_type, payload, metadata, prev_hash, hash) \
             SELECT t.position, $2, t.version, t.event_type, t.payload, t.metadata, t.prev_hash, t.hash \
             FROM UNNEST($1::BIGINT[], $3::BIGINT[], $4::TEXT[], $5::BYTEA[], $6::TEXT[], $7::TEXT[], $8::TEXT[]) \
             AS t(position, version, event_type, payload, metadata, prev_hash, hash)",
        )
        .bind(&positions)
        .bind(stream)
        .bind(&versions)
        .bind(&types)
        .bind(&payloads)
        .bind(&metadatas)
        .bind(&prev_hashes)
        .bind(&hashes)
        .execute(&mut *tx)
        .await;
        if let Err(err) = inserted {
            tx.rollback().await?;
            return Err(self.map_insert_error(err, stream, expected).await);
        }
        sqlx::query("UPDATE log_head SET position = $1, hash = $2 WHERE id = 1")
            .bind(to_i64(last_position))
            .bind(&prev_hash)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Appended {
            version: last_version,
            first_position: head_position + 1,
            last_position,
        })
    }

    async fn read_stream(
        &self,
        stream: &str,
        after_version: u64,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let rows: Vec<EventRow> = sqlx::query_as(
            "SELECT position, stream, version, event_type, payload, metadata, hash \
             FROM events WHERE stream = $1 AND version > $2 ORDER BY version",
        )
        .bind(stream)
        .bind(to_i64(after_version))
        .fetch_all(&self.pool)
        .await?;
        into_events(rows)
    }

    async fn read_stream_page(
        &self,
        stream: &str,
        after_version: u64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let rows: Vec<EventRow> = sqlx::query_as(
            "SELECT position, stream, version, event_type, payload, metadata, hash \
             FROM events WHERE stream = $1 AND version > $2 ORDER BY version LIMIT $3",
        )
        .bind(stream)
        .bind(to_i64(after_version))
        .bind(to_i64(limit as u64))
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
             FROM events WHERE position > $1 ORDER BY position LIMIT $2",
        )
        .bind(to_i64(after_position))
        .bind(to_i64(limit as u64))
        .fetch_all(&self.pool)
        .await?;
        into_events(rows)
    }

    async fn stream_version(&self, stream: &str) -> Result<u64, StoreError> {
        let version: i64 = sqlx::query_scalar(
            "SELECT COALESCE(MAX(version), 0)::BIGINT FROM events WHERE stream = $1",
        )
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
        // Positions commit in order (appends are serialized on `log_head`), so the events waiting are those
        // above the watermark, less those acknowledged out of order. The watermark is read in subqueries of
        // their own so that the planner scans `events` from it on; as a join it walked the whole log.
        let rows: Vec<EventRow> = sqlx::query_as(
            "SELECT position, stream, version, event_type, payload, metadata, hash FROM events \
             WHERE position > (SELECT relayed FROM outbox_watermark WHERE id = 1) \
             AND position <> ALL (ARRAY(SELECT unnest(relayed_beyond) FROM outbox_watermark WHERE id = 1)) \
             ORDER BY position LIMIT $1",
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
        // The watermark row is locked for the acknowledgement, never by appends, so relays of several
        // processes acknowledging at once wait only for each other.
        let mut tx = self.pool.begin().await?;
        let (relayed, beyond, head): (i64, Vec<i64>, i64) = sqlx::query_as(
            "SELECT w.relayed, w.relayed_beyond, (SELECT position FROM log_head WHERE id = 1) \
             FROM outbox_watermark w WHERE w.id = 1 FOR UPDATE",
        )
        .fetch_one(&mut *tx)
        .await?;
        let beyond = beyond
            .into_iter()
            .map(|p| to_u64(p, "acknowledged position"))
            .collect::<Result<Vec<_>, _>>()?;
        let (relayed, head) = (
            to_u64(relayed, "relay watermark")?,
            to_u64(head, "position")?,
        );
        if let Some((relayed, beyond)) = advance_watermark(relayed, beyond, head, positions) {
            let beyond: Vec<i64> = beyond.into_iter().map(to_i64).collect();
            sqlx::query(
                "UPDATE outbox_watermark SET relayed = $1, relayed_beyond = $2 WHERE id = 1",
            )
            .bind(to_i64(relayed))
            .bind(&beyond)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn load_checkpoint(&self, consumer: &str) -> Result<u64, StoreError> {
        let position: Option<i64> =
            sqlx::query_scalar("SELECT position FROM consumer_checkpoints WHERE consumer = $1")
                .bind(consumer)
                .fetch_optional(&self.pool)
                .await?;
        to_u64(position.unwrap_or(0), "checkpoint")
    }

    async fn save_checkpoint(&self, consumer: &str, position: u64) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO consumer_checkpoints (consumer, position) VALUES ($1, $2) \
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
            "SELECT h.position, h.hash, (SELECT COALESCE(MAX(position), 0)::BIGINT FROM events) \
             FROM log_head h WHERE h.id = 1",
        )
        .fetch_one(&self.pool)
        .await?;
        let head = to_u64(head_position, "position")?;
        let select = "SELECT position, stream, version, event_type, payload, metadata, hash, prev_hash \
                      FROM events WHERE position > $1 AND position <= $2 ORDER BY position LIMIT $3";
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
