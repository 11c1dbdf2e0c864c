//! The Postgres backend: many writers in many processes, serialized on the single-row `log_head` table.

use std::sync::Arc;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use tokio::sync::{mpsc, oneshot};

use crate::chain::{ChainWalker, VERIFY_PAGE, beyond_head};
use crate::error::is_stream_version_violation;
use crate::hash::{ChainBreak, event_hash};
use crate::lease::PostgresLease;
use crate::row::{
    ChainRow, EventRow, advance_watermark, into_events, metadata_json, to_i64, to_u64,
};
use crate::{
    Appended, Chain, EventStore, ExpectedVersion, NewEvent, PendingAppend, StoreError, StoredEvent,
};

static MIGRATOR: Migrator = sqlx::migrate!("./migrations/postgres");

/// Connections per store.
const POOL_SIZE: u32 = 10;

/// The most appends one transaction commits.
const MAX_BATCH: usize = 256;

/// The log in a Postgres database.
///
/// Each transaction that appends locks the `log_head` row (`SELECT ... FOR UPDATE`) for the rest of its life, so
/// appends from every process are serialized: positions are assigned and committed in order, and readers never
/// see a position before the ones below it.
///
/// Within one process, appends are queued to one task, which commits every append queued at that moment (up to
/// `MAX_BATCH`) in one transaction: one lock of the head row and one commit (one flush of Postgres's log) for
/// them all rather than one each. Every append is checked against its stream's version in turn,
/// seeing the ones before it in the batch; one that does not match is refused alone. Nobody is answered before
/// the commit; if it fails, every append of the batch fails and none is stored. Appends queued on a [`Chain`]
/// commit in queue order, and once one fails the later ones fail, so a writer may queue its next append before
/// the last has committed ([`EventStore::append_chained`]).
#[derive(Debug, Clone)]
pub struct PostgresStore {
    pub(crate) pool: PgPool,
    appends: mpsc::UnboundedSender<Queued>,
}

/// An append waiting for the appender task.
#[derive(Debug)]
struct Queued {
    chain: Option<Arc<Chain>>,
    stream: String,
    expected: ExpectedVersion,
    events: Vec<NewEvent>,
    reply: oneshot::Sender<Result<Appended, StoreError>>,
}

impl Queued {
    /// Answers the append; a failure breaks its chain.
    fn answer(self, result: Result<Appended, StoreError>) {
        if result.is_err()
            && let Some(chain) = &self.chain
        {
            chain.fail();
        }
        // The caller may have stopped waiting; the outcome stands either way.
        let _ = self.reply.send(result);
    }
}

impl PostgresStore {
    /// Connects to the database at `url` (`postgres://user@host:port/db`) and applies migrations.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(POOL_SIZE)
            // While the database is out of reach, a call is answered UNAVAILABLE (which callers retry) after
            // this long rather than hanging on for sqlx's default 30 s.
            .acquire_timeout(Duration::from_secs(5))
            .connect(url)
            .await?;
        MIGRATOR.run(&pool).await?;
        let (appends, queue) = mpsc::unbounded_channel();
        tokio::spawn(run_appender(pool.clone(), queue));
        Ok(PostgresStore { pool, appends })
    }

    /// Creates the database `url` names when the server reports that it does not exist, and says whether this
    /// call created it. It connects to the server's `postgres` maintenance database to do so, which needs the
    /// `CREATEDB` privilege; a database that exists is left alone and needs neither.
    ///
    /// Several processes of one deployment may start at once against a missing database: they take turns on
    /// a Postgres advisory lock named after the database, so one creates it and the others find it created.
    pub async fn create_database_if_missing(url: &str) -> Result<bool, StoreError> {
        use sqlx::Connection as _;
        let options: PgConnectOptions = url.parse()?;
        let name = match options.get_database() {
            Some(name) => name.to_owned(),
            // Postgres's default database is the user's own, which `createuser` does not make either, but
            // which a URL without a database name is taken to mean on purpose.
            None => return Ok(false),
        };
        match PgConnection::connect_with(&options).await {
            Ok(conn) => {
                // Whether it closes cleanly does not matter: the database is there.
                let _ = conn.close().await;
                return Ok(false);
            }
            Err(err) if is_missing_database(&err) => {}
            Err(err) => return Err(err.into()),
        }
        let mut maintenance =
            PgConnection::connect_with(&options.clone().database(MAINTENANCE_DATABASE)).await?;
        let created = create_under_lock(&mut maintenance, &name).await;
        // Ending the session releases the advisory lock, whether the creation worked or not.
        let _ = maintenance.close().await;
        created
    }

    /// Queues an append for the appender task and waits for its answer.
    fn queue(
        &self,
        chain: Option<Arc<Chain>>,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> impl Future<Output = Result<Appended, StoreError>> + Send + 'static {
        let (reply, answer) = oneshot::channel();
        let queued = Queued {
            chain,
            stream: stream.to_owned(),
            expected,
            events,
            reply,
        };
        let sent = match self.appends.send(queued) {
            Ok(()) => true,
            Err(mpsc::error::SendError(unsent)) => {
                unsent.answer(Err(StoreError::Closed));
                false
            }
        };
        async move {
            if !sent {
                return Err(StoreError::Closed);
            }
            answer.await.unwrap_or(Err(StoreError::Closed))
        }
    }

    /// The lease deciding which of the processes sharing this database sweeps the outbox.
    pub fn outbox_lease(&self) -> PostgresLease {
        PostgresLease::new(self.pool.clone())
    }

    /// Closes every connection; later calls fail.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// The database every Postgres server has, through which another database is created.
const MAINTENANCE_DATABASE: &str = "postgres";

/// Whether connecting failed because the database does not exist (SQLSTATE 3D000, `invalid_catalog_name`).
fn is_missing_database(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.code().as_deref() == Some("3D000"))
}

/// Creates database `name` unless it exists, holding the advisory lock that serializes the processes
/// creating it; returns whether this call created it.
async fn create_under_lock(conn: &mut PgConnection, name: &str) -> Result<bool, StoreError> {
    sqlx::query("SELECT pg_advisory_lock(hashtext($1))")
        .bind(format!("nsml: create database {name}"))
        .execute(&mut *conn)
        .await?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(name)
            .fetch_one(&mut *conn)
            .await?;
    if exists {
        return Ok(false);
    }
    // CREATE DATABASE takes no parameters: the name goes in as a quoted identifier.
    let statement = format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\""));
    match sqlx::query(&statement).execute(&mut *conn).await {
        Ok(_) => Ok(true),
        // Created meanwhile by something that does not take the lock (an operator's `createdb`).
        Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("42P04") => Ok(false),
        Err(err) => Err(err.into()),
    }
}

/// Commits queued appends in batches until every clone of the store is gone.
async fn run_appender(pool: PgPool, mut queue: mpsc::UnboundedReceiver<Queued>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let appends = metrics::histogram!("nsml_eventstore_commit_appends", "store" => "postgres");
    while queue.recv_many(&mut batch, MAX_BATCH).await > 0 {
        appends.record(batch.len() as f64);
        commit_batch(&pool, std::mem::take(&mut batch)).await;
    }
}

/// Commits `batch` in one transaction and answers each append. An append whose statement fails (which the head
/// lock leaves to the unexpected: a lost connection, a constraint) is answered with that error, and the others
/// are tried again in a new transaction, as nothing of the failed one was committed.
async fn commit_batch(pool: &PgPool, mut batch: Vec<Queued>) {
    while !batch.is_empty() {
        match try_batch(pool, &batch).await {
            Ok(outcomes) => {
                for (queued, outcome) in batch.into_iter().zip(outcomes) {
                    queued.answer(outcome);
                }
                return;
            }
            Err((Some(failed), err)) => {
                let queued = batch.remove(failed);
                let err = map_insert_error(pool, err, &queued.stream, queued.expected).await;
                queued.answer(Err(err));
            }
            Err((None, err)) => {
                // The transaction itself failed (begin, the head, its update, the commit): nothing is stored.
                let err = Arc::new(err);
                for queued in batch {
                    queued.answer(Err(StoreError::Postgres(err.clone())));
                }
                return;
            }
        }
    }
}

/// What a batch's transaction did for each of its appends, or the index of the append whose statement failed
/// (`None`: the transaction's own), with the error; on error nothing is committed.
type BatchResult = Result<Vec<Result<Appended, StoreError>>, (Option<usize>, sqlx::Error)>;

async fn try_batch(pool: &PgPool, batch: &[Queued]) -> BatchResult {
    let whole = |err| (None, err);
    let mut tx = pool.begin().await.map_err(whole)?;
    let (head_position, head_hash): (i64, String) =
        sqlx::query_as("SELECT position, hash FROM log_head WHERE id = 1 FOR UPDATE")
            .fetch_one(&mut *tx)
            .await
            .map_err(whole)?;
    let head_position = u64::try_from(head_position).map_err(|_| {
        whole(sqlx::Error::Decode(
            format!("negative log head position {head_position}").into(),
        ))
    })?;
    let mut head = (head_position, head_hash);
    let start = head.0;
    let mut outcomes = Vec::with_capacity(batch.len());
    for (i, queued) in batch.iter().enumerate() {
        let outcome = append_in(&mut tx, queued, &mut head)
            .await
            .map_err(|err| (Some(i), err))?;
        if outcome.is_err()
            && let Some(chain) = &queued.chain
        {
            chain.fail();
        }
        outcomes.push(outcome);
    }
    if head.0 > start {
        sqlx::query("UPDATE log_head SET position = $1, hash = $2 WHERE id = 1")
            .bind(to_i64(head.0))
            .bind(&head.1)
            .execute(&mut *tx)
            .await
            .map_err(whole)?;
    }
    tx.commit().await.map_err(whole)?;
    Ok(outcomes)
}

/// Appends `queued` in the batch's transaction after `head` (the log's last position and hash so far), which
/// it advances. `Ok(Err(conflict))`, with nothing written, when the stream's version does not match or when its
/// chain is broken (an earlier append of it failed: this one was decided on a state that did not happen).
async fn append_in(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    queued: &Queued,
    head: &mut (u64, String),
) -> Result<Result<Appended, StoreError>, sqlx::Error> {
    let stream = queued.stream.as_str();
    let current = version_of(&mut **tx, stream).await?;
    if let Err(conflict) = queued
        .expected
        .check_queued(stream, current, queued.chain.as_ref())
    {
        return Ok(Err(conflict));
    }
    let head_position = head.0;
    if queued.events.is_empty() {
        return Ok(Ok(Appended {
            version: current,
            first_position: head_position + 1,
            last_position: head_position,
        }));
    }
    let count = queued.events.len();
    let mut positions = Vec::with_capacity(count);
    let mut versions = Vec::with_capacity(count);
    let mut types = Vec::with_capacity(count);
    let mut payloads = Vec::with_capacity(count);
    let mut metadatas = Vec::with_capacity(count);
    let mut prev_hashes = Vec::with_capacity(count);
    let mut hashes = Vec::with_capacity(count);
    let mut prev_hash = head.1.clone();
    for (i, event) in queued.events.iter().enumerate() {
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
        types.push(event.event_type.as_str());
        payloads.push(event.payload.as_slice());
        metadatas.push(metadata);
        prev_hashes.push(std::mem::replace(&mut prev_hash, hash.clone()));
        hashes.push(hash);
    }
    sqlx::query(
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
    .execute(&mut **tx)
    .await?;
    let last_position = head_position + count as u64;
    *head = (last_position, prev_hash);
    Ok(Ok(Appended {
        version: current + count as u64,
        first_position: head_position + 1,
        last_position,
    }))
}

/// A stream's version: that of its last event, 0 when it has none.
async fn version_of<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    stream: &str,
) -> Result<u64, sqlx::Error> {
    let version: i64 = sqlx::query_scalar(
        "SELECT COALESCE(MAX(version), 0)::BIGINT FROM events WHERE stream = $1",
    )
    .bind(stream)
    .fetch_one(executor)
    .await?;
    u64::try_from(version)
        .map_err(|_| sqlx::Error::Decode(format!("negative version {version}").into()))
}

/// A unique-key violation on (stream, version) means another writer got there first: a conflict. Any other
/// error (a clash on `position` included) stays a database error.
async fn map_insert_error(
    pool: &PgPool,
    err: sqlx::Error,
    stream: &str,
    expected: ExpectedVersion,
) -> StoreError {
    if !is_stream_version_violation(&err) {
        return err.into();
    }
    match version_of(pool, stream).await {
        Ok(actual) => StoreError::Conflict {
            stream: stream.to_owned(),
            expected,
            actual,
        },
        Err(e) => e.into(),
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
        self.queue(None, stream, expected, events).await
    }

    fn append_chained(
        &self,
        chain: &Arc<Chain>,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Option<PendingAppend> {
        Some(Box::pin(self.queue(
            Some(chain.clone()),
            stream,
            expected,
            events,
        )))
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

    async fn read_all_with_prefix(
        &self,
        prefix: &str,
        after_position: u64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let rows: Vec<EventRow> = sqlx::query_as(
            "SELECT position, stream, version, event_type, payload, metadata, hash \
             FROM events WHERE position > $1 AND starts_with(stream, $2) ORDER BY position LIMIT $3",
        )
        .bind(to_i64(after_position))
        .bind(prefix)
        .bind(to_i64(limit as u64))
        .fetch_all(&self.pool)
        .await?;
        into_events(rows)
    }

    async fn stream_version(&self, stream: &str) -> Result<u64, StoreError> {
        Ok(version_of(&self.pool, stream).await?)
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
