//! The Postgres backend: many writers in many processes, serialized on the single-row `log_head` table.

use std::sync::Arc;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use tokio::sync::{mpsc, oneshot};

use crate::chain::{ChainWalker, VERIFY_PAGE, beyond_head};
use crate::error::is_stream_version_violation;
use crate::hash::ChainBreak;
use crate::lease::PostgresLease;
use crate::row::{ChainRow, EventRow, Names, into_events, metadata_json, scanned, to_i64, to_u64};
use crate::{
    Appended, Chain, EventStore, ExpectedVersion, NewEvent, PendingAppend, ScannedEvent,
    StoreError, StoredEvent, TypedPage,
};

static MIGRATOR: Migrator = sqlx::migrate!("./migrations/postgres");

/// Connections per store.
const POOL_SIZE: u32 = 10;

/// How long a pooled connection may sit idle and still be handed out without a ping.
const PING_IF_IDLE: Duration = Duration::from_secs(1);

/// The most appends one transaction commits.
const MAX_BATCH: usize = 256;

/// The log in a Postgres database.
///
/// Each transaction that appends locks the `log_head` row (`SELECT ... FOR UPDATE`) for the rest of its life, so
/// appends from every process are serialized: positions are assigned and committed in order, and readers never
/// see a position before the ones below it.
///
/// Within one process, appends are queued to one task, which commits every append queued at that moment (up to
/// `MAX_BATCH`) in one statement, a call of the `nsml_append` function (its own transaction): one round trip,
/// one lock of the head row and one commit (one flush of Postgres's log) for them all rather than several
/// round trips each, with the head locked across them. Every append is checked against its stream's version in turn,
/// seeing the ones before it in the batch; one that does not match is refused alone. Nobody is answered before
/// the commit; if it fails, every append of the batch fails and none is stored. Appends queued on a [`Chain`]
/// commit in queue order, and once one fails the later ones fail, so a writer may queue its next append before
/// the last has committed ([`EventStore::append_chained`]).
///
/// The outbox's acknowledgements are written a little later, several together (within 20 ms); until then this
/// handle's `outbox_peek` passes over them.
#[derive(Debug, Clone)]
pub struct PostgresStore {
    pub(crate) pool: PgPool,
    appends: mpsc::UnboundedSender<Queued>,
    acks: Arc<std::sync::Mutex<Acks>>,
}

/// How long an outbox acknowledgement waits to be written with the ones after it. The relay acknowledged
/// each batch it published in a statement of its own, a fifth of the statements admissions cost the log; an
/// acknowledgement lost with its process only has its events published again (consumers drop duplicates), by
/// whichever process relays next.
const ACK_DELAY: Duration = Duration::from_millis(20);

/// The longest wait between two tries at writing acknowledgements while the database refuses them.
const ACK_RETRY_MAX: Duration = Duration::from_secs(1);

/// Acknowledged positions not yet in the log's watermark.
#[derive(Debug, Default)]
struct Acks {
    /// Waiting to be written.
    pending: Vec<u64>,
    /// Being written now.
    writing: Vec<u64>,
    /// A write is scheduled or running.
    scheduled: bool,
}

impl Acks {
    /// Every position acknowledged here and not yet written, which `outbox_peek` passes over.
    fn unwritten(&self) -> Vec<i64> {
        self.pending
            .iter()
            .chain(&self.writing)
            .copied()
            .map(to_i64)
            .collect()
    }
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
            // sqlx would ping every connection it hands out: a round trip before every statement, as many
            // as the statements themselves. Only a connection that sat idle is pinged (and replaced if the
            // server went away meanwhile); one in use a moment ago is trusted, and should it have broken
            // since, its statement fails as it would have an instant after a ping.
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for >= PING_IF_IDLE {
                        use sqlx::Connection as _;
                        conn.ping().await?;
                    }
                    Ok(true)
                })
            })
            .connect(url)
            .await?;
        MIGRATOR.run(&pool).await?;
        let (appends, queue) = mpsc::unbounded_channel();
        tokio::spawn(run_appender(pool.clone(), queue));
        Ok(PostgresStore {
            pool,
            appends,
            acks: Arc::default(),
        })
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

    /// Writes the acknowledgements waiting, then closes every connection; later calls fail.
    pub async fn close(&self) {
        if let Err(error) = self.write_acks().await {
            tracing::warn!(%error, "could not write the outbox's last acknowledgements; their events will be relayed again");
        }
        self.pool.close().await;
    }

    /// Writes every acknowledgement waiting in one statement. On failure they wait again, for the next write.
    /// Writes may overlap (`close` beside the scheduled one): each takes and gives back only its own.
    async fn write_acks(&self) -> Result<(), StoreError> {
        let mut batch = {
            let mut acks = lock(&self.acks);
            let batch = std::mem::take(&mut acks.pending);
            acks.writing.extend_from_slice(&batch);
            batch
        };
        if batch.is_empty() {
            return Ok(());
        }
        let positions: Vec<i64> = batch.iter().copied().map(to_i64).collect();
        // One statement (migrations/postgres/0003_append_and_ack_functions.sql): it locks the watermark row,
        // never taken by appends, so relays of several processes acknowledging at once wait only for each other.
        let written = sqlx::query("SELECT nsml_outbox_ack($1)")
            .bind(&positions)
            .execute(&self.pool)
            .await;
        batch.sort_unstable();
        let mut acks = lock(&self.acks);
        acks.writing.retain(|p| batch.binary_search(p).is_err());
        if written.is_err() {
            acks.pending.extend(batch);
        }
        written.map(|_| ()).map_err(StoreError::from)
    }

    /// Has the acknowledgements waiting written after [`ACK_DELAY`], unless that is arranged already; retried,
    /// less and less often up to [`ACK_RETRY_MAX`], while they fail.
    fn schedule_acks(&self) {
        {
            let mut acks = lock(&self.acks);
            if acks.scheduled {
                return;
            }
            acks.scheduled = true;
        }
        let store = self.clone();
        tokio::spawn(async move {
            let mut wait = ACK_DELAY;
            loop {
                tokio::time::sleep(wait).await;
                let written = store.write_acks().await;
                let mut acks = lock(&store.acks);
                if written.is_ok() && acks.pending.is_empty() || store.pool.is_closed() {
                    acks.scheduled = false;
                    return;
                }
                match written {
                    Ok(()) => wait = ACK_DELAY,
                    Err(error) => {
                        if wait == ACK_DELAY {
                            tracing::warn!(%error, "could not acknowledge relayed events; retrying");
                        }
                        wait = (wait * 2).min(ACK_RETRY_MAX);
                    }
                }
            }
        });
    }
}

/// The acknowledgements' state; a panic while it was held leaves nothing half-done that matters.
fn lock(acks: &std::sync::Mutex<Acks>) -> std::sync::MutexGuard<'_, Acks> {
    acks.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
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

/// Commits `batch` in one statement and answers each append. When the statement fails, nothing of it was
/// committed. An error that belongs to one append's rows (a constraint, bad data) is found by committing the
/// batch again one append at a time, so that it goes to that append and the others are stored; any other (a
/// lost connection, a database out of reach) fails every append of the batch.
async fn commit_batch(pool: &PgPool, batch: Vec<Queued>) {
    match try_batch(pool, &batch).await {
        Ok(outcomes) => {
            for (queued, outcome) in batch.into_iter().zip(outcomes) {
                queued.answer(outcome);
            }
        }
        Err(err) if batch.len() > 1 && is_about_the_rows(&err) => {
            for queued in batch {
                Box::pin(commit_batch(pool, vec![queued])).await;
            }
        }
        Err(err) if batch.len() == 1 => {
            if let Some(queued) = batch.into_iter().next() {
                let err = map_insert_error(pool, err, &queued.stream, queued.expected).await;
                queued.answer(Err(err));
            }
        }
        Err(err) => {
            let err = Arc::new(err);
            for queued in batch {
                queued.answer(Err(StoreError::Postgres(err.clone())));
            }
        }
    }
}

/// Whether a failed append statement was refused for what it wrote: an integrity constraint (SQLSTATE class
/// 23) or a data exception (class 22), rather than for the connection or the server.
fn is_about_the_rows(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db)
        if db.code().is_some_and(|code| code.starts_with("23") || code.starts_with("22")))
}

/// How `nsml_append` reads an expected version: its kind, and the version for `Exact`.
fn expected_args(expected: ExpectedVersion) -> (i16, i64) {
    match expected {
        ExpectedVersion::Any => (0, 0),
        ExpectedVersion::NoStream => (1, 0),
        ExpectedVersion::Exact(v) => (2, to_i64(v)),
    }
}

/// One row of `nsml_append`: whether the append was stored, the stream's version after it (or, refused, as it
/// stands), and its first and last positions.
type AppendRow = (bool, i64, i64, i64);

/// Commits `batch` with one call of `nsml_append` (migrations/postgres/0003_append_and_ack_functions.sql),
/// which holds the head lock only for that statement: what each append did, in order, or the statement's error,
/// in which case nothing was committed.
async fn try_batch(
    pool: &PgPool,
    batch: &[Queued],
) -> Result<Vec<Result<Appended, StoreError>>, sqlx::Error> {
    let events = batch.iter().map(|q| q.events.len()).sum();
    let mut streams = Vec::with_capacity(batch.len());
    let mut kinds = Vec::with_capacity(batch.len());
    let mut versions = Vec::with_capacity(batch.len());
    let mut chains = Vec::with_capacity(batch.len());
    let mut broken = Vec::with_capacity(batch.len());
    let mut counts = Vec::with_capacity(batch.len());
    let mut types = Vec::with_capacity(events);
    let mut payloads = Vec::with_capacity(events);
    let mut metadatas = Vec::with_capacity(events);
    // Appends of one chain share a number, so that the statement refuses those after one it refused.
    let mut chain_numbers: Vec<&Arc<Chain>> = Vec::new();
    for queued in batch {
        let (kind, version) = expected_args(queued.expected);
        streams.push(queued.stream.as_str());
        kinds.push(kind);
        versions.push(version);
        let chain = queued.chain.as_ref().map_or(0, |chain| {
            let index = chain_numbers
                .iter()
                .position(|c| Arc::ptr_eq(c, chain))
                .unwrap_or_else(|| {
                    chain_numbers.push(chain);
                    chain_numbers.len() - 1
                });
            i32::try_from(index + 1).unwrap_or(i32::MAX)
        });
        chains.push(chain);
        broken.push(queued.chain.as_ref().is_some_and(|c| c.is_broken()));
        counts.push(i32::try_from(queued.events.len()).unwrap_or(i32::MAX));
        for event in &queued.events {
            types.push(event.event_type.as_str());
            payloads.push(event.payload.as_slice());
            metadatas.push(metadata_json(&event.metadata));
        }
    }
    let rows: Vec<AppendRow> = sqlx::query_as(
        "SELECT appended, stream_version, first_at, last_at \
         FROM nsml_append($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(&streams)
    .bind(&kinds)
    .bind(&versions)
    .bind(&chains)
    .bind(&broken)
    .bind(&counts)
    .bind(&types)
    .bind(&payloads)
    .bind(&metadatas)
    .fetch_all(pool)
    .await?;
    if rows.len() != batch.len() {
        return Err(sqlx::Error::Protocol(format!(
            "nsml_append answered {} appends of {}",
            rows.len(),
            batch.len()
        )));
    }
    Ok(batch
        .iter()
        .zip(rows)
        .map(|(queued, (appended, version, first, last))| {
            let version = to_u64(version, "version")?;
            if !appended {
                return Err(StoreError::Conflict {
                    stream: queued.stream.clone(),
                    expected: queued.expected,
                    actual: version,
                });
            }
            Ok(Appended {
                version,
                first_position: to_u64(first, "position")?,
                last_position: to_u64(last, "position")?,
            })
        })
        .collect())
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

    /// Walks the `(stream, version)` index from `after`, keeping the names that start with the prefix: in a
    /// collation other than byte order those need not sort together, so no range of names bounds the walk.
    async fn scan_streams(
        &self,
        prefix: &str,
        after: Option<(&str, u64)>,
        limit: usize,
    ) -> Result<Vec<ScannedEvent>, StoreError> {
        let (after_stream, after_version) = after.unwrap_or(("", 0));
        let rows: Vec<(i64, String, i64, String, Vec<u8>, String)> = sqlx::query_as(
            "SELECT position, stream, version, event_type, payload, metadata \
             FROM events WHERE (stream, version) > ($1, $2) AND starts_with(stream, $3) \
             ORDER BY stream, version LIMIT $4",
        )
        .bind(after_stream)
        .bind(to_i64(after_version))
        .bind(prefix)
        .bind(to_i64(limit as u64))
        .fetch_all(&self.pool)
        .await?;
        let mut names = Names::default();
        rows.into_iter()
            .map(
                |(position, stream, version, event_type, payload, metadata)| {
                    scanned(
                        &mut names,
                        position,
                        &stream,
                        version,
                        &event_type,
                        payload,
                        &metadata,
                    )
                },
            )
            .collect()
    }

    /// Reads the head first, then the rows up to it: appends are serialized on `log_head`, so every event at or
    /// below that head is committed, and the later statement sees it.
    async fn read_all_of_types(
        &self,
        types: &[&str],
        after_position: u64,
        limit: usize,
    ) -> Result<TypedPage, StoreError> {
        let head = self.head_position().await?;
        let rows: Vec<EventRow> = sqlx::query_as(
            "SELECT position, stream, version, event_type, payload, metadata, hash \
             FROM events WHERE position > $1 AND position <= $2 AND event_type = ANY($3) \
             ORDER BY position LIMIT $4",
        )
        .bind(to_i64(after_position))
        .bind(to_i64(head))
        .bind(types)
        .bind(to_i64(limit as u64))
        .fetch_all(&self.pool)
        .await?;
        let events = into_events(rows)?;
        let through = match events.last() {
            Some(last) if events.len() == limit => last.position,
            _ => head.max(after_position),
        };
        Ok(TypedPage { events, through })
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
        // above the watermark, less those acknowledged out of order, and less those this handle acknowledged and
        // has not written yet. The watermark is read in subqueries of their own so that the planner scans
        // `events` from it on; as a join it walked the whole log.
        let unwritten = lock(&self.acks).unwritten();
        let rows: Vec<EventRow> = sqlx::query_as(
            "SELECT position, stream, version, event_type, payload, metadata, hash FROM events \
             WHERE position > (SELECT relayed FROM outbox_watermark WHERE id = 1) \
             AND position <> ALL (ARRAY(SELECT unnest(relayed_beyond) FROM outbox_watermark WHERE id = 1)) \
             AND position <> ALL ($2) \
             ORDER BY position LIMIT $1",
        )
        .bind(to_i64(limit as u64))
        .bind(&unwritten)
        .fetch_all(&self.pool)
        .await?;
        into_events(rows)
    }

    async fn outbox_ack(&self, positions: &[u64]) -> Result<(), StoreError> {
        if positions.is_empty() {
            return Ok(());
        }
        if self.pool.is_closed() {
            return Err(StoreError::Closed);
        }
        lock(&self.acks).pending.extend_from_slice(positions);
        self.schedule_acks();
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
