//! The SQLite backend: one database file (or memory) in WAL mode. A writer thread owns the write connection and
//! commits the appends queued at any moment together; reads run on a small pool of connections of their own.

use std::collections::HashMap;
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags, Row, params};
use sqlx::Connection as _;
use sqlx::migrate::Migrator;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection, SqliteJournalMode};
use tokio::sync::oneshot;

use crate::chain::{ChainWalker, beyond_head};
use crate::error::is_sqlite_stream_version_violation;
use crate::hash::{ChainBreak, event_hash};
use crate::row::{
    ChainRow, Names, advance_watermark, decode_metadata, metadata_json, prefix_end, scanned,
    to_i64, to_u64,
};
use crate::tail::OutboxTail;
use crate::{
    Appended, Chain, EventStore, ExpectedVersion, Metadata, NewEvent, PendingAppend, ScannedEvent,
    StoreError, StoredEvent, TypedPage,
};

static MIGRATOR: Migrator = sqlx::migrate!("./migrations/sqlite");

/// How long a writer waits for another process's write transaction before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// The most appends committed in one transaction.
const MAX_BATCH: usize = 256;

/// How long the writer waits for more appends before it commits a batch, when the batch before it held several
/// (appends are arriving together). Each commit costs the same few page writes and file locks however many appends
/// it holds. Under the admissions bench (16 clients, 2-core machine) batches held about 3 appends without the
/// wait and 4–5 with it, and the p99 fell from 11–17 ms to 6.5–12 ms (runs alternating with and without); the
/// rate moved within the machine's run-to-run noise. A lone append never waits.
const GATHER_FOR: Duration = Duration::from_micros(200);

/// A batch with this many appends commits without waiting for more.
const GATHERED: usize = 16;

/// How many idle read connections are kept open.
const MAX_IDLE_READERS: usize = 4;

/// Prepared statements kept per connection; more than the backend has, so none is ever prepared twice.
const STATEMENT_CACHE: usize = 32;

/// How much of the database file a read connection maps into memory. Pages are then read in place instead of
/// being copied through SQLite's page cache one system call each, which makes a scan of the log (`read_all`,
/// `verify_chain`) about 1.6 times as fast.
const READER_MMAP_BYTES: i64 = 0x7fff_0000;

/// The name of the writer thread (15 bytes, the most Linux keeps).
const WRITER_THREAD: &str = "nsml-log-writer";

/// How often the checkpointer copies the write-ahead log back into the database file. Each checkpoint syncs
/// what was appended since the one before, and the kernel's work writing those pages out takes CPU from the
/// services while it lasts; checkpointing often keeps each burst small. Against 500 ms, this halved the p99 of
/// admissions offered at 5,000/s on a 2-core machine (about 13 ms against 27 ms, medians of six runs each);
/// 40 ms was no better and raised the median latency. An idle log costs one look at the WAL index per tick.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);

/// The write-ahead log starts again from its beginning only when a write transaction begins with every frame
/// already copied back. Under a steady stream of appends the checkpointer never quite catches up with the writer,
/// so the log would grow without end (by about 170 MB/s at 9,000 admissions/s). Once the log holds this many
/// frames (64 MiB of 4 KiB pages), the writer copies the frames left between two batches, and its next commit
/// starts the log again. That copy ends with two syncs, of the few pages the checkpointer left it (see
/// [`run_checkpointer`]), so the writer pauses for about a millisecond, about twice a second under full load.
/// As restarts cost so little, the log is kept short: a file growing takes the writer's writes through the
/// file system's block allocation, which a checkpoint's sync holds up for milliseconds at a time, and a short
/// log is done growing sooner (against 256 MiB, the p99 of admissions from 16 clients fell from 4.0 to 3.6 ms,
/// medians of three runs on a 2-core machine). Tests restart after 1,024 frames, to see it happen.
const RESTART_AFTER_FRAMES: i64 = if cfg!(test) { 1024 } else { 16 * 1024 };

/// The size the write-ahead log file is cut back to when it starts again: above what it reaches between two
/// restarts under load, so that a busy log reuses its file instead of growing it again each time.
const WAL_SIZE_LIMIT: i64 = 80 << 20;

const CHECKPOINT_THREAD: &str = "nsml-log-checkpoint";

/// A query selecting events' columns in the order [`event_from_row`] reads them, followed by `$rest`.
macro_rules! select_events {
    ($rest:literal) => {
        concat!(
            "SELECT position, stream, version, event_type, payload, metadata, hash ",
            $rest
        )
    };
}

/// The log in a SQLite database.
///
/// One thread per store owns the write connection. `append` hands its events to that thread, which takes every
/// append queued at that moment (up to 256) and commits them in one `BEGIN IMMEDIATE` transaction: each append
/// runs in a savepoint of its own, so one that fails (a version conflict, a constraint) is undone and answered
/// alone while the others commit. Nobody is answered before the `COMMIT` has succeeded; if it fails, every
/// append of the batch fails and none is stored. `BEGIN IMMEDIATE` (with a 30 s busy timeout) also serializes
/// the writer against other processes using the same file. Consumer checkpoints and outbox acknowledgements are
/// written by the same thread, between batches.
///
/// Positions are handed out in commit order, so the outbox is a watermark on the head row: the events above it
/// wait for the relay (see `docs/adr/2026-11-27-the-outbox-is-a-watermark.md`). The writer thread also keeps the
/// outbox in memory while it can follow it, so the relay gets the events it was just woken for without reading
/// them back from the file (see `OutboxTail`).
///
/// Reads run on blocking threads with read connections of their own, kept in a small pool; WAL lets them run
/// beside the writer and see every commit made before they start. A log in memory has a single connection, so
/// there the writer thread serves reads as well.
///
/// The journal is WAL with `synchronous = NORMAL`: a committed append survives a crash of the process.
///
/// Clones share the writer and the pool. [`close`](SqliteStore::close), or dropping the last clone, stops the
/// writer thread after it has answered the requests already queued; calls after `close` fail with
/// [`StoreError::Closed`].
#[derive(Clone)]
pub struct SqliteStore {
    shared: Arc<Shared>,
}

/// What the clones of one store share.
struct Shared {
    /// The database file; `None` for a log in memory, whose reads go to the writer.
    path: Option<PathBuf>,
    /// The way to the writer thread; `None` once closed.
    writer: Mutex<Option<mpsc::Sender<Request>>>,
    /// The writer thread, joined when the store closes.
    thread: Mutex<Option<JoinHandle<()>>>,
    /// Keeps the checkpointer running (a log in a file only); dropped when the store closes.
    checkpointer: Mutex<Option<(mpsc::Sender<()>, JoinHandle<()>)>>,
    /// Idle read connections, each with the generation it was opened in.
    readers: Mutex<Vec<(u64, Connection)>>,
    /// The generation of read connections: [`SqliteStore::close_idle_readers`] starts a new one, and a
    /// connection of an older one that was busy then is closed when its read ends instead of kept.
    reader_generation: AtomicU64,
    /// The outbox as the writer thread left it, for the relay (see [`OutboxTail`]).
    tail: Arc<OutboxTail>,
    closed: AtomicBool,
}

/// What the writer thread is asked to do.
enum Request {
    /// An append, committed together with the other appends queued beside it.
    Append(AppendRequest),
    /// A small write (an outbox acknowledgement, a consumer checkpoint) committed with the next batch of
    /// appends rather than in a transaction of its own.
    Write(WriteRequest),
    /// Any other work on the write connection, run on its own between batches; it may change the log behind the
    /// outbox tail's back unless it only reads.
    Job(Box<dyn FnOnce(&mut Connection) + Send>, Work),
}

/// What a job on the write connection does to the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Work {
    /// Only reads (or copies the write-ahead log into the file): the outbox tail stays as it is.
    Reads,
    /// May write anything: the outbox tail is forgotten first.
    MayWrite,
}

struct AppendRequest {
    stream: String,
    expected: ExpectedVersion,
    events: Vec<EncodedEvent>,
    /// The chain the append was queued on: it fails if an earlier append of the chain failed, and a failure
    /// of its own fails the chain.
    chain: Option<Arc<Chain>>,
    reply: oneshot::Sender<Result<Appended, StoreError>>,
}

/// A small write run inside the writer's transaction.
type Write = Box<dyn FnOnce(&Connection) -> Result<(), StoreError> + Send>;

struct WriteRequest {
    write: Write,
    reply: oneshot::Sender<Result<(), StoreError>>,
}

/// An event to append with its metadata already serialized, as it is stored and hashed.
struct EncodedEvent {
    event_type: String,
    payload: Vec<u8>,
    metadata: String,
    /// The metadata itself, for the outbox tail once the event has committed.
    fields: Metadata,
}

impl SqliteStore {
    /// Opens (creating if needed) the log in the database file at `path` and applies migrations.
    ///
    /// Migrations run through sqlx's migrator on a short-lived connection of their own, so a file keeps its
    /// `_sqlx_migrations` history whichever version of the platform created it, and a later migration is applied
    /// to old and new files alike.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        migrate(path).await?;
        let owned = path.to_owned();
        let connection = blocking(move || open_writer(&owned)).await?;
        Self::start(Some(path.to_owned()), connection)
    }

    /// A log in memory, gone when the value (and its clones) are dropped; for tests and tools.
    ///
    /// Every connection to `:memory:` is a database of its own, so the store has one connection, owned by the
    /// writer thread, and the migrations' SQL is applied to it directly: a new database has nothing to upgrade.
    pub async fn in_memory() -> Result<Self, StoreError> {
        let connection = blocking(open_memory).await?;
        Self::start(None, connection)
    }

    fn start(path: Option<PathBuf>, connection: Connection) -> Result<Self, StoreError> {
        let (sender, requests) = mpsc::channel();
        let checkpointer = match &path {
            Some(path) => {
                // Checkpoints (which sync the file) run beside the writer, never inside one of its commits.
                connection.pragma_update(None, "wal_autocheckpoint", 0)?;
                connection.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT)?;
                let own = open_checkpointer(path)?;
                let file = std::fs::File::open(path).map_err(StoreError::Open)?;
                let (keep, running) = mpsc::channel();
                let writer = sender.clone();
                let thread = std::thread::Builder::new()
                    .name(CHECKPOINT_THREAD.to_owned())
                    .spawn(move || run_checkpointer(&own, &file, &running, &writer))
                    .map_err(StoreError::Thread)?;
                Some((keep, thread))
            }
            None => None,
        };
        let tail = Arc::new(OutboxTail::default());
        let writer_tail = tail.clone();
        let thread = std::thread::Builder::new()
            .name(WRITER_THREAD.to_owned())
            .spawn(move || run_writer(connection, requests, &writer_tail))
            .map_err(StoreError::Thread)?;
        Ok(SqliteStore {
            shared: Arc::new(Shared {
                path,
                writer: Mutex::new(Some(sender)),
                thread: Mutex::new(Some(thread)),
                checkpointer: Mutex::new(checkpointer),
                readers: Mutex::new(Vec::new()),
                reader_generation: AtomicU64::new(0),
                tail,
                closed: AtomicBool::new(false),
            }),
        })
    }

    /// Stops the writer thread once it has answered the requests already queued, and closes every connection;
    /// later calls fail with [`StoreError::Closed`].
    pub async fn close(&self) {
        if let Some(thread) = self.shared.stop() {
            // Joining waits for the batch in progress, so it happens off the async threads.
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        lock(&self.shared.readers).clear();
    }

    /// Closes the read connections open now: the idle ones at once, the busy ones when their reads end; the next
    /// reads open new ones. Each connection keeps the pages of the log it has read through its map (up to
    /// 2 GiB) counted in the process's resident memory until it closes: after a long scan of the log (the read
    /// models catching up at start-up) this gives them back. A read still running then (a catch-up page read
    /// ahead, a store poll) would otherwise bring its connection back afterwards, with all it had mapped.
    pub fn close_idle_readers(&self) {
        let idle = {
            let mut readers = lock(&self.shared.readers);
            self.shared.reader_generation.fetch_add(1, Ordering::AcqRel);
            std::mem::take(&mut *readers)
        };
        drop(idle);
    }

    /// Runs `work` on the writer thread, between append batches, with the write connection.
    #[cfg(any(test, feature = "conformance"))]
    pub(crate) async fn on_writer<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
        T: Send + 'static,
    {
        self.job(Work::MayWrite, work).await
    }

    /// Runs `work`, which does what `kind` says, on the writer thread between append batches.
    async fn job<T, F>(&self, kind: Work, work: F) -> Result<T, StoreError>
    where
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
        T: Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job = move |connection: &mut Connection| {
            let _ = reply.send(catch_unwind(AssertUnwindSafe(|| work(connection))));
        };
        self.send(Request::Job(Box::new(job), kind))?;
        match answer.await {
            Ok(Ok(result)) => result,
            Ok(Err(panic)) => resume_unwind(panic),
            Err(_) => Err(StoreError::Closed),
        }
    }

    /// Runs `write` in the writer's next transaction, beside the appends queued with it.
    async fn write_with_next_batch<F>(&self, write: F) -> Result<(), StoreError>
    where
        F: FnOnce(&Connection) -> Result<(), StoreError> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        self.send(Request::Write(WriteRequest {
            write: Box::new(write),
            reply,
        }))?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// Runs `read` on a read connection on a blocking thread (or, for a log in memory, on the writer thread).
    async fn read<T, F>(&self, read: F) -> Result<T, StoreError>
    where
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
        T: Send + 'static,
    {
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(StoreError::Closed);
        }
        if self.shared.path.is_none() {
            return self
                .job(Work::Reads, move |connection| read(connection))
                .await;
        }
        let shared = self.shared.clone();
        blocking(move || {
            let (generation, connection) = shared.take_reader()?;
            let result = read(&connection);
            shared.put_reader(generation, connection);
            result
        })
        .await
    }

    /// Hands an append to the writer thread now; the returned future waits for its answer.
    fn queue_append(
        &self,
        chain: Option<Arc<Chain>>,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<impl Future<Output = Result<Appended, StoreError>> + Send + 'static, StoreError>
    {
        // Metadata is serialized here, so the writer thread only hashes and inserts.
        let events = encode(events);
        let (reply, answer) = oneshot::channel();
        self.send(Request::Append(AppendRequest {
            stream: stream.to_owned(),
            expected,
            events,
            chain,
            reply,
        }))?;
        Ok(async move { answer.await.map_err(|_| StoreError::Closed)? })
    }

    fn send(&self, request: Request) -> Result<(), StoreError> {
        match &*lock(&self.shared.writer) {
            Some(writer) => writer.send(request).map_err(|_| StoreError::Closed),
            None => Err(StoreError::Closed),
        }
    }
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.shared.path)
            .field("closed", &self.shared.closed.load(Ordering::Relaxed))
            .finish()
    }
}

impl Shared {
    /// Marks the store closed and lets the writer thread end; returns the thread to join, if it still ran.
    fn stop(&self) -> Option<JoinHandle<()>> {
        self.closed.store(true, Ordering::Release);
        // The writer ends when its channel closes: after the queued requests, with no sender left.
        drop(lock(&self.writer).take());
        // The checkpointer ends at once when its channel closes; it holds no store, so joining cannot deadlock.
        if let Some((keep, thread)) = lock(&self.checkpointer).take() {
            drop(keep);
            let _ = thread.join();
        }
        lock(&self.thread).take()
    }

    /// An idle read connection, or a new one; with its generation.
    fn take_reader(&self) -> Result<(u64, Connection), StoreError> {
        if let Some(reader) = lock(&self.readers).pop() {
            return Ok(reader);
        }
        let generation = self.reader_generation.load(Ordering::Acquire);
        // Invariant: only stores with a file have read connections (`read` sends the others to the writer).
        let path = self.path.as_deref().ok_or(StoreError::Closed)?;
        Ok((generation, open_reader(path)?))
    }

    /// Keeps a connection whose read ended for the next read, unless the store closed, its readers were closed
    /// since it was opened, or enough are kept.
    fn put_reader(&self, generation: u64, connection: Connection) {
        if self.closed.load(Ordering::Acquire) || !connection.is_autocommit() {
            return;
        }
        let mut idle = lock(&self.readers);
        if generation == self.reader_generation.load(Ordering::Acquire)
            && idle.len() < MAX_IDLE_READERS
        {
            idle.push((generation, connection));
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Some(thread) = self.stop() {
            // The last clone can only be dropped off the writer thread, which holds no store; the check keeps a
            // future change from turning that into a self-join.
            if thread.thread().id() != std::thread::current().id() {
                let _ = thread.join();
            }
        }
    }
}

/// Serializes events' metadata as it is stored and hashed.
fn encode(events: Vec<NewEvent>) -> Vec<EncodedEvent> {
    events
        .into_iter()
        .map(|event| EncodedEvent {
            metadata: metadata_json(&event.metadata),
            event_type: event.event_type,
            payload: event.payload,
            fields: event.metadata,
        })
        .collect()
}

/// Locks a mutex whose data stays consistent even if a holder panicked (each critical section is one push, pop
/// or take).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs blocking work on tokio's blocking threads; a panic in it continues in the caller.
async fn blocking<T, F>(work: F) -> Result<T, StoreError>
where
    F: FnOnce() -> Result<T, StoreError> + Send + 'static,
    T: Send + 'static,
{
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result,
        Err(err) if err.is_panic() => resume_unwind(err.into_panic()),
        // Cancelled: the runtime is shutting down.
        Err(_) => Err(StoreError::Closed),
    }
}

/// Creates the file if needed and brings its schema up to date with sqlx's migrator, then closes the connection.
async fn migrate(path: &Path) -> Result<(), StoreError> {
    let options = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(BUSY_TIMEOUT);
    let mut connection = SqliteConnection::connect_with(&options).await?;
    let migrated = MIGRATOR.run(&mut connection).await;
    connection.close().await?;
    Ok(migrated?)
}

/// Settings every connection gets.
fn configure(connection: &Connection) -> rusqlite::Result<()> {
    connection.busy_timeout(BUSY_TIMEOUT)?;
    connection.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    connection.execute_batch(
        "PRAGMA synchronous = NORMAL; PRAGMA temp_store = MEMORY; PRAGMA foreign_keys = ON;",
    )
}

fn open_memory() -> Result<Connection, StoreError> {
    let connection = Connection::open_in_memory()?;
    configure(&connection)?;
    for migration in MIGRATOR.iter() {
        if !migration.migration_type.is_down_migration() {
            connection.execute_batch(&migration.sql)?;
        }
    }
    Ok(connection)
}

/// Opens the (migrated) database file as a plain path, never as a `file:` URI; each connection is used by one
/// thread at a time, so SQLite's own mutexes are left out.
fn open_file(path: &Path) -> rusqlite::Result<Connection> {
    Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
}

fn open_writer(path: &Path) -> Result<Connection, StoreError> {
    let connection = open_file(path)?;
    configure(&connection)?;
    connection.pragma_update(None, "journal_mode", "WAL")?;
    Ok(connection)
}

fn open_checkpointer(path: &Path) -> rusqlite::Result<Connection> {
    let connection = open_file(path)?;
    configure(&connection)?;
    Ok(connection)
}

/// Copies the write-ahead log into the database file every [`CHECKPOINT_EVERY`] until `running` closes. A
/// passive checkpoint never waits for the writer or readers; what it cannot copy yet, the next one does. When
/// the log has grown long (see [`RESTART_AFTER_FRAMES`]), it asks the writer to copy what is left between two
/// batches.
///
/// SQLite syncs the database file only at the end of a checkpoint that copied the whole log, which under load
/// is the writer's: that one sync would write out every page copied since the last restart (20–30 ms on a
/// busy 2-core machine, with every append waiting). So before asking, the checkpointer syncs `file` (the
/// database file) itself, twice, with a checkpoint between, and leaves the writer the pages of a few
/// milliseconds.
///
/// The checkpointer's clone of `writer` is dropped when it returns, before the writer thread is joined.
fn run_checkpointer(
    connection: &Connection,
    file: &std::fs::File,
    running: &mpsc::Receiver<()>,
    writer: &mpsc::Sender<Request>,
) {
    while let Err(mpsc::RecvTimeoutError::Timeout) = running.recv_timeout(CHECKPOINT_EVERY) {
        match checkpoint(connection) {
            Ok(frames) if frames >= RESTART_AFTER_FRAMES => {
                let synced = file
                    .sync_data()
                    .and_then(|()| checkpoint(connection).map_err(std::io::Error::other))
                    .and_then(|_| file.sync_data());
                if let Err(err) = synced {
                    tracing::warn!(%err, "cannot sync the SQLite log");
                }
                let finish = |connection: &mut Connection| {
                    if let Err(err) = checkpoint(connection) {
                        tracing::warn!(%err, "cannot checkpoint the SQLite log");
                    }
                };
                let finish = Request::Job(Box::new(finish), Work::Reads);
                if writer.send(finish).is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(err) => tracing::warn!(%err, "cannot checkpoint the SQLite log"),
        }
    }
}

/// Runs a passive checkpoint; returns how many frames the write-ahead log holds.
fn checkpoint(connection: &Connection) -> rusqlite::Result<i64> {
    connection.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| row.get(1))
}

fn open_reader(path: &Path) -> rusqlite::Result<Connection> {
    let connection = open_file(path)?;
    configure(&connection)?;
    connection.pragma_update(None, "mmap_size", READER_MMAP_BYTES)?;
    connection.pragma_update(None, "query_only", true)?;
    Ok(connection)
}

/// The writer thread: serves requests until every sender is gone, committing queued appends in batches.
fn run_writer(mut connection: Connection, requests: mpsc::Receiver<Request>, tail: &OutboxTail) {
    let mut held_back = None;
    // Appends in the last batch: with several, the next batch waits a little for more (see `GATHER_FOR`).
    let mut last_batch = 0;
    loop {
        let request = match held_back.take() {
            Some(request) => request,
            None => match requests.recv() {
                Ok(request) => request,
                Err(mpsc::RecvError) => return,
            },
        };
        let (mut batch, mut writes) = (Vec::new(), Vec::new());
        match request {
            Request::Job(job, kind) => {
                if kind == Work::MayWrite {
                    // The tail cannot follow what the job does; the next look at the outbox reads the file.
                    tail.forget();
                }
                job(&mut connection);
                continue;
            }
            Request::Append(append) => batch.push(append),
            Request::Write(write) => writes.push(write),
        }
        let gather_until = (last_batch > 1).then(|| Instant::now() + GATHER_FOR);
        while batch.len() + writes.len() < MAX_BATCH {
            let next = match (requests.try_recv(), gather_until) {
                (Ok(request), _) => request,
                (Err(_), Some(until)) if batch.len() < GATHERED => {
                    let left = until.saturating_duration_since(Instant::now());
                    match requests.recv_timeout(left) {
                        Ok(request) => request,
                        Err(_) => break,
                    }
                }
                (Err(_), _) => break,
            };
            match next {
                Request::Append(append) => batch.push(append),
                Request::Write(write) => writes.push(write),
                job => {
                    held_back = Some(job);
                    break;
                }
            }
        }
        last_batch = batch.len();
        metrics::histogram!("nsml_eventstore_commit_appends", "store" => "sqlite")
            .record(batch.len() as f64);
        commit_batch_with(&connection, batch, writes, tail);
    }
}

/// The last event's position and hash, as of the append being written.
struct Head {
    position: u64,
    hash: String,
}

/// Writes a batch of appends in one transaction and answers each once the transaction has committed.
#[cfg(test)]
fn commit_batch(connection: &Connection, batch: Vec<AppendRequest>) {
    commit_batch_with(connection, batch, Vec::new(), &OutboxTail::default());
}

/// Writes a batch of appends and small writes in one transaction and answers each once the transaction has
/// committed. The committed events join the outbox `tail` before anyone is answered, so a relay woken by an
/// answer finds them there.
fn commit_batch_with(
    connection: &Connection,
    batch: Vec<AppendRequest>,
    writes: Vec<WriteRequest>,
    tail: &OutboxTail,
) {
    let mut outcomes = Vec::with_capacity(batch.len());
    let mut written = Vec::with_capacity(writes.len());
    let (replies, writes): (Vec<_>, Vec<_>) =
        writes.into_iter().map(|w| (w.reply, w.write)).unzip();
    match write_batch(connection, &batch, writes, &mut written, &mut outcomes) {
        Ok((start, end)) => {
            let following = tail.follows(start);
            let mut committed = Vec::new();
            let mut answers = Vec::with_capacity(batch.len());
            for (request, outcome) in batch.into_iter().zip(outcomes) {
                let outcome = outcome.map(|(appended, hashes)| {
                    if following {
                        committed.extend(stored(request.stream, request.events, appended, hashes));
                    }
                    appended
                });
                answers.push((request.reply, outcome));
            }
            if following {
                tail.committed(start, end, committed);
            }
            for (reply, outcome) in answers {
                let _ = reply.send(outcome);
            }
            for (reply, outcome) in replies.into_iter().zip(written) {
                let _ = reply.send(outcome);
            }
        }
        Err(err) => {
            if !connection.is_autocommit() {
                // Nothing of the batch may stay; if even the rollback fails, the next batch retries it.
                let _ = connection.execute_batch("ROLLBACK");
            }
            let err = Arc::new(err);
            for request in batch {
                if let Some(chain) = &request.chain {
                    chain.fail();
                }
                let _ = request.reply.send(Err(StoreError::Sqlite(err.clone())));
            }
            for reply in replies {
                let _ = reply.send(Err(StoreError::Sqlite(err.clone())));
            }
        }
    }
}

/// The events of a committed append, as the log stores them.
fn stored(
    stream: String,
    events: Vec<EncodedEvent>,
    appended: Appended,
    hashes: Vec<String>,
) -> impl Iterator<Item = StoredEvent> {
    let first_version = appended.version + 1 - events.len() as u64;
    events
        .into_iter()
        .zip(hashes)
        .zip(0u64..)
        .map(move |((event, hash), i)| StoredEvent {
            position: appended.first_position + i,
            stream: stream.clone(),
            version: first_version + i,
            event_type: event.event_type,
            payload: event.payload,
            metadata: event.fields,
            hash,
        })
}

/// An append's outcome inside the writer: what its caller is answered, and the hash of each event it stored.
type AppendOutcome = Result<(Appended, Vec<String>), StoreError>;

/// Runs the batch's appends, each in a savepoint, and commits; returns the log's last position before and after.
/// An `Err` fails the whole batch: nothing is stored.
fn write_batch(
    connection: &Connection,
    batch: &[AppendRequest],
    writes: Vec<Write>,
    written: &mut Vec<Result<(), StoreError>>,
    outcomes: &mut Vec<AppendOutcome>,
) -> rusqlite::Result<(u64, u64)> {
    if !connection.is_autocommit() {
        // A transaction left open by a job that failed half-way.
        connection.execute_batch("ROLLBACK")?;
    }
    connection.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
    for write in writes {
        // Each in a savepoint: one that fails is undone and answered alone.
        connection.prepare_cached("SAVEPOINT write")?.execute([])?;
        let outcome = write(connection);
        if connection.is_autocommit() {
            return Err(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ABORT),
                Some("the transaction was rolled back by a failed write".into()),
            ));
        }
        if outcome.is_err() {
            connection
                .prepare_cached("ROLLBACK TO write")?
                .execute([])?;
        }
        connection.prepare_cached("RELEASE write")?.execute([])?;
        written.push(outcome);
    }
    let (position, hash): (i64, String) = connection
        .prepare_cached("SELECT position, hash FROM log_head WHERE id = 1")?
        .query_row([], |row| Ok((row.get(0)?, row.get(1)?)))?;
    let position = u64::try_from(position)
        .map_err(|_| rusqlite::Error::IntegralValueOutOfRange(0, position))?;
    let mut head = Head { position, hash };
    let start = head.position;
    // Each stream's version as of the append being written: earlier appends of the batch move it on.
    let mut versions: HashMap<&str, u64> = HashMap::new();
    for request in batch {
        let outcome = append_one(connection, request, &mut head, &mut versions)?;
        if outcome.is_err()
            && let Some(chain) = &request.chain
        {
            chain.fail();
        }
        outcomes.push(outcome);
    }
    if head.position != start {
        connection
            .prepare_cached("UPDATE log_head SET position = ?1, hash = ?2 WHERE id = 1")?
            .execute(params![to_i64(head.position), head.hash])?;
    }
    connection.prepare_cached("COMMIT")?.execute([])?;
    Ok((start, head.position))
}

/// Writes one append of a batch in a savepoint. The inner result is the append's own outcome; an outer `Err`
/// means the transaction itself is lost.
fn append_one<'a>(
    connection: &Connection,
    request: &'a AppendRequest,
    head: &mut Head,
    versions: &mut HashMap<&'a str, u64>,
) -> rusqlite::Result<AppendOutcome> {
    let stream = request.stream.as_str();
    let current = match versions.get(stream) {
        Some(&version) => version,
        None => match to_u64(stream_version_of(connection, stream)?, "version") {
            Ok(version) => {
                versions.insert(stream, version);
                version
            }
            Err(corrupt) => return Ok(Err(corrupt)),
        },
    };
    if let Err(conflict) = request
        .expected
        .check_queued(stream, current, request.chain.as_ref())
    {
        return Ok(Err(conflict));
    }
    if request.events.is_empty() {
        let appended = Appended {
            version: current,
            first_position: head.position + 1,
            last_position: head.position,
        };
        return Ok(Ok((appended, Vec::new())));
    }

    connection.prepare_cached("SAVEPOINT append")?.execute([])?;
    match insert_events(connection, request, head, current) {
        Ok((last_position, hashes, version)) => {
            connection.prepare_cached("RELEASE append")?.execute([])?;
            let appended = Appended {
                version,
                first_position: head.position + 1,
                last_position,
            };
            head.position = last_position;
            if let Some(last) = hashes.last() {
                head.hash.clone_from(last);
            }
            versions.insert(stream, version);
            Ok(Ok((appended, hashes)))
        }
        Err(err) => {
            if connection.is_autocommit() {
                // SQLite rolled the whole transaction back (out of disk or memory, I/O error).
                return Err(err);
            }
            connection
                .prepare_cached("ROLLBACK TO append")?
                .execute([])?;
            connection.prepare_cached("RELEASE append")?.execute([])?;
            if !is_sqlite_stream_version_violation(&err) {
                return Ok(Err(err.into()));
            }
            // A unique-key violation on (stream, version) means the stream moved on: a conflict.
            let actual = stream_version_of(connection, stream)?;
            Ok(Err(match to_u64(actual, "version") {
                Ok(actual) => StoreError::Conflict {
                    stream: stream.to_owned(),
                    expected: request.expected,
                    actual,
                },
                Err(corrupt) => corrupt,
            }))
        }
    }
}

/// Inserts an append's events after `head`; returns the last position, each event's hash and the stream's
/// version. The events wait for the relay simply by lying above its watermark (see [`acknowledge`]).
fn insert_events(
    connection: &Connection,
    request: &AppendRequest,
    head: &Head,
    current: u64,
) -> rusqlite::Result<(u64, Vec<String>, u64)> {
    let mut insert = connection.prepare_cached(
        "INSERT INTO events (position, stream, version, event_type, payload, metadata, prev_hash, hash) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?;
    let mut position = head.position;
    let mut version = current;
    let mut hashes: Vec<String> = Vec::with_capacity(request.events.len());
    for event in &request.events {
        position += 1;
        version += 1;
        let prev = hashes.last().unwrap_or(&head.hash);
        let hash = event_hash(
            prev,
            position,
            &request.stream,
            version,
            &event.event_type,
            &event.payload,
            &event.metadata,
        );
        insert.execute(params![
            to_i64(position),
            request.stream,
            to_i64(version),
            event.event_type,
            event.payload,
            event.metadata,
            prev,
            hash,
        ])?;
        hashes.push(hash);
    }
    Ok((position, hashes, version))
}

/// The outbox: up to `limit` events the relay has not acknowledged, oldest first. They are the events above
/// the head row's watermark `relayed`, less those acknowledged out of order (`relayed_beyond`).
fn waiting(connection: &Connection, limit: usize) -> Result<Vec<StoredEvent>, StoreError> {
    query_events(
        connection,
        select_events!(
            "FROM events WHERE position > (SELECT relayed FROM log_head WHERE id = 1) \
             AND position NOT IN (SELECT value FROM log_head, json_each(log_head.relayed_beyond) \
                                  WHERE log_head.id = 1) \
             ORDER BY position LIMIT ?1"
        ),
        [to_i64(limit as u64)],
        limit.min(crate::READ_PAGE),
    )
}

/// Takes published events out of the outbox by moving the relay's watermark in the head row (see
/// [`advance_watermark`]). Runs in the writer's transaction, which rewrites the head row's page anyway when it
/// appends.
fn acknowledge(connection: &Connection, positions: &[u64]) -> Result<(), StoreError> {
    let (head, relayed, beyond): (i64, i64, String) = connection
        .prepare_cached("SELECT position, relayed, relayed_beyond FROM log_head WHERE id = 1")?
        .query_row([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?;
    let beyond: Vec<u64> = serde_json::from_str(&beyond).map_err(|e| {
        StoreError::Corrupt(format!(
            "the positions acknowledged beyond the relay watermark are not a list of positions: {e}"
        ))
    })?;
    let head = to_u64(head, "position")?;
    let relayed = to_u64(relayed, "relay watermark")?;
    if let Some((relayed, beyond)) = advance_watermark(relayed, beyond, head, positions) {
        connection
            .prepare_cached("UPDATE log_head SET relayed = ?1, relayed_beyond = ?2 WHERE id = 1")?
            .execute(params![
                to_i64(relayed),
                serde_json::Value::from(beyond).to_string()
            ])?;
    }
    Ok(())
}

/// The log's last position.
fn head_position(connection: &Connection) -> Result<u64, StoreError> {
    let position = connection
        .prepare_cached("SELECT position FROM log_head WHERE id = 1")?
        .query_row([], |row| row.get(0))?;
    to_u64(position, "position")
}

fn stream_version_of(connection: &Connection, stream: &str) -> rusqlite::Result<i64> {
    connection
        .prepare_cached("SELECT COALESCE(MAX(version), 0) FROM events WHERE stream = ?1")?
        .query_row([stream], |row| row.get(0))
}

/// Reads an event selected by [`select_events`].
fn event_from_row(row: &Row<'_>) -> Result<StoredEvent, StoreError> {
    let position = to_u64(row.get(0)?, "position")?;
    let metadata = row.get_ref(5)?.as_str().map_err(|e| {
        StoreError::Corrupt(format!(
            "metadata of the event at position {position} is not text: {e}"
        ))
    })?;
    let metadata = decode_metadata(position, metadata)?;
    Ok(StoredEvent {
        position,
        stream: row.get(1)?,
        version: to_u64(row.get(2)?, "version")?,
        event_type: row.get(3)?,
        payload: row.get(4)?,
        metadata,
        hash: row.get(6)?,
    })
}

/// Runs a scan's query and reads every row (position, stream, version, type, payload, metadata).
fn scan_rows<P: rusqlite::Params>(
    connection: &Connection,
    sql: &str,
    params: P,
) -> Result<Vec<ScannedEvent>, StoreError> {
    let mut statement = connection.prepare_cached(sql)?;
    let mut rows = statement.query(params)?;
    let (mut names, mut events) = (Names::default(), Vec::new());
    while let Some(row) = rows.next()? {
        let text = |i| {
            row.get_ref(i)?.as_str().map_err(|e| {
                StoreError::Corrupt(format!("column {i} of an event row is not text: {e}"))
            })
        };
        events.push(scanned(
            &mut names,
            row.get(0)?,
            text(1)?,
            row.get(2)?,
            text(3)?,
            row.get(4)?,
            text(5)?,
        )?);
    }
    Ok(events)
}

/// Runs an event query and reads every row.
fn query_events<P: rusqlite::Params>(
    connection: &Connection,
    sql: &str,
    params: P,
    capacity: usize,
) -> Result<Vec<StoredEvent>, StoreError> {
    let mut statement = connection.prepare_cached(sql)?;
    let mut rows = statement.query(params)?;
    let mut events = Vec::with_capacity(capacity);
    while let Some(row) = rows.next()? {
        events.push(event_from_row(row)?);
    }
    Ok(events)
}

fn chain_row(row: &Row<'_>) -> rusqlite::Result<ChainRow> {
    Ok((
        row.get(0)?,
        row.get(1)?,
        row.get(2)?,
        row.get(3)?,
        row.get(4)?,
        row.get(5)?,
        row.get(6)?,
        row.get(7)?,
    ))
}

/// Walks the log up to its head in one read (so one snapshot) and checks the chain.
fn verify(connection: &Connection) -> Result<Option<ChainBreak>, StoreError> {
    let (head_position, head_hash, max_position): (i64, String, i64) = connection
        .prepare_cached(
            "SELECT h.position, h.hash, (SELECT COALESCE(MAX(position), 0) FROM events) \
             FROM log_head h WHERE h.id = 1",
        )?
        .query_row([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?;
    let head = to_u64(head_position, "position")?;
    let select = "SELECT position, stream, version, event_type, payload, metadata, hash, prev_hash \
                  FROM events WHERE position > ?1 AND position <= ?2 ORDER BY position LIMIT ?3";
    let mut walker = ChainWalker::new();
    {
        let mut statement = connection.prepare_cached(select)?;
        let mut rows = statement.query(params![0_i64, head_position, i64::MAX])?;
        while let Some(row) = rows.next()? {
            if let Some(found) = walker.check(&chain_row(row)?)? {
                return Ok(Some(found));
            }
        }
    }
    if let Some(found) = walker.finish(head, &head_hash) {
        return Ok(Some(found));
    }
    if max_position > head_position {
        let row = connection
            .prepare_cached(select)?
            .query_row(params![head_position, i64::MAX, 1_i64], chain_row)?;
        return beyond_head(&row, head).map(Some);
    }
    Ok(None)
}

#[async_trait::async_trait]
impl EventStore for SqliteStore {
    async fn append(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<Appended, StoreError> {
        self.queue_append(None, stream, expected, events)?.await
    }

    fn append_chained(
        &self,
        chain: &Arc<Chain>,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Option<PendingAppend> {
        Some(
            match self.queue_append(Some(chain.clone()), stream, expected, events) {
                Ok(answer) => Box::pin(answer),
                Err(err) => {
                    chain.fail();
                    Box::pin(async move { Err(err) })
                }
            },
        )
    }

    async fn read_stream(
        &self,
        stream: &str,
        after_version: u64,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let stream = stream.to_owned();
        self.read(move |connection| {
            query_events(
                connection,
                select_events!("FROM events WHERE stream = ?1 AND version > ?2 ORDER BY version"),
                params![stream, to_i64(after_version)],
                0,
            )
        })
        .await
    }

    async fn read_stream_page(
        &self,
        stream: &str,
        after_version: u64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let stream = stream.to_owned();
        self.read(move |connection| {
            query_events(
                connection,
                select_events!(
                    "FROM events WHERE stream = ?1 AND version > ?2 ORDER BY version LIMIT ?3"
                ),
                params![stream, to_i64(after_version), to_i64(limit as u64)],
                limit.min(crate::READ_PAGE * 10),
            )
        })
        .await
    }

    async fn read_all(
        &self,
        after_position: u64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        self.read(move |connection| {
            query_events(
                connection,
                select_events!("FROM events WHERE position > ?1 ORDER BY position LIMIT ?2"),
                params![to_i64(after_position), to_i64(limit as u64)],
                limit.min(crate::READ_PAGE * 10),
            )
        })
        .await
    }

    /// Walks the `(stream, version)` index from `after` to the first name past the prefix (`prefix_end`),
    /// so the other streams' rows are never read.
    async fn scan_streams(
        &self,
        prefix: &str,
        after: Option<(&str, u64)>,
        limit: usize,
    ) -> Result<Vec<ScannedEvent>, StoreError> {
        // From the prefix itself at the earliest (versions start at 1): byte order is SQLite's text order.
        let (after_stream, after_version) = match after {
            Some((stream, version)) if stream >= prefix => (stream, version),
            _ => (prefix, 0),
        };
        let (after_stream, after_version) = (after_stream.to_owned(), to_i64(after_version));
        let (prefix, end) = (prefix.to_owned(), prefix_end(prefix));
        let length = prefix.chars().count() as i64;
        let limit = to_i64(limit as u64);
        macro_rules! scan {
            ($bound:literal, $limit:literal) => {
                concat!(
                    "SELECT position, stream, version, event_type, payload, metadata FROM events \
                     WHERE (stream, version) > (?1, ?2) AND ",
                    $bound,
                    " ORDER BY stream, version LIMIT ",
                    $limit
                )
            };
        }
        self.read(move |connection| match end {
            Some(end) => scan_rows(
                connection,
                scan!("stream < ?3", "?4"),
                params![after_stream, after_version, end, limit],
            ),
            None => scan_rows(
                connection,
                scan!("substr(stream, 1, ?3) = ?4", "?5"),
                params![after_stream, after_version, length, prefix, limit],
            ),
        })
        .await
    }

    /// Reads the head first, then the rows up to it: positions are handed out in commit order, so every event
    /// at or below that head is committed and seen. The other types' rows are skipped after reading their type
    /// alone.
    async fn read_all_of_types(
        &self,
        types: &[&str],
        after_position: u64,
        limit: usize,
    ) -> Result<TypedPage, StoreError> {
        if types.is_empty() {
            let through = self.head_position().await?.max(after_position);
            return Ok(TypedPage {
                events: Vec::new(),
                through,
            });
        }
        let types: Vec<String> = types.iter().map(|t| (*t).to_owned()).collect();
        self.read(move |connection| {
            let head = head_position(connection)?;
            let sql = format!(
                select_events!(
                    "FROM events WHERE position > ?1 AND position <= ?2 AND event_type IN ({}) \
                     ORDER BY position LIMIT ?3"
                ),
                (4..4 + types.len())
                    .map(|i| format!("?{i}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            let bounds = [to_i64(after_position), to_i64(head), to_i64(limit as u64)];
            let params = bounds
                .iter()
                .map(|b| b as &dyn rusqlite::ToSql)
                .chain(types.iter().map(|t| t as &dyn rusqlite::ToSql));
            let events = query_events(
                connection,
                &sql,
                rusqlite::params_from_iter(params),
                limit.min(crate::READ_PAGE * 10),
            )?;
            let through = match events.last() {
                Some(last) if events.len() == limit => last.position,
                _ => head.max(after_position),
            };
            Ok(TypedPage { events, through })
        })
        .await
    }

    async fn stream_version(&self, stream: &str) -> Result<u64, StoreError> {
        let stream = stream.to_owned();
        self.read(move |connection| to_u64(stream_version_of(connection, &stream)?, "version"))
            .await
    }

    async fn head_position(&self) -> Result<u64, StoreError> {
        self.read(head_position).await
    }

    /// From memory while the writer thread knows the outbox (see `OutboxTail`); otherwise from the database,
    /// and a short outbox is read once more on the writer thread, between commits, so that it can follow from there.
    async fn outbox_peek(&self, limit: usize) -> Result<Vec<StoredEvent>, StoreError> {
        if let Some(events) = self.shared.tail.peek(limit, Instant::now()) {
            return Ok(events);
        }
        if self.shared.tail.due(Instant::now()) {
            // Checking that the log still ends where the tail does is one read of the head row; reading the
            // outbox again would hold the writer up for milliseconds under load, when the outbox is long.
            let tail = self.shared.tail.clone();
            let renewed = self
                .job(Work::Reads, move |connection| {
                    Ok(tail.renew(head_position(connection)?, Instant::now()))
                })
                .await?;
            if renewed && let Some(events) = self.shared.tail.peek(limit, Instant::now()) {
                return Ok(events);
            }
        }
        let events = self
            .read(move |connection| waiting(connection, limit))
            .await?;
        if events.len() >= limit {
            return Ok(events);
        }
        let tail = self.shared.tail.clone();
        self.job(Work::Reads, move |connection| {
            let events = waiting(connection, limit)?;
            if events.len() < limit {
                tail.reset(head_position(connection)?, &events, Instant::now());
            }
            Ok(events)
        })
        .await
    }

    async fn outbox_ack(&self, positions: &[u64]) -> Result<(), StoreError> {
        if positions.is_empty() {
            return Ok(());
        }
        let acknowledged = positions.to_vec();
        self.write_with_next_batch(move |connection| acknowledge(connection, &acknowledged))
            .await?;
        self.shared.tail.acknowledged(positions);
        Ok(())
    }

    async fn load_checkpoint(&self, consumer: &str) -> Result<u64, StoreError> {
        let consumer = consumer.to_owned();
        self.read(move |connection| {
            let mut statement = connection
                .prepare_cached("SELECT position FROM consumer_checkpoints WHERE consumer = ?1")?;
            let mut rows = statement.query([consumer])?;
            match rows.next()? {
                Some(row) => to_u64(row.get(0)?, "checkpoint"),
                None => Ok(0),
            }
        })
        .await
    }

    async fn save_checkpoint(&self, consumer: &str, position: u64) -> Result<(), StoreError> {
        let consumer = consumer.to_owned();
        self.write_with_next_batch(move |connection| {
            connection
                .prepare_cached(
                    "INSERT INTO consumer_checkpoints (consumer, position) VALUES (?1, ?2) \
                     ON CONFLICT (consumer) DO UPDATE SET position = excluded.position",
                )?
                .execute(params![consumer, to_i64(position)])?;
            Ok(())
        })
        .await
    }

    async fn verify_chain(&self) -> Result<Option<ChainBreak>, StoreError> {
        self.read(verify).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance::new_events;

    /// An append request and the receiver of its answer.
    fn request(
        stream: &str,
        expected: ExpectedVersion,
        events: usize,
    ) -> (
        AppendRequest,
        oneshot::Receiver<Result<Appended, StoreError>>,
    ) {
        let (reply, answer) = oneshot::channel();
        let events = encode(new_events(stream, events));
        let request = AppendRequest {
            stream: stream.to_owned(),
            expected,
            events,
            chain: None,
            reply,
        };
        (request, answer)
    }

    fn chained(
        chain: &Arc<Chain>,
        stream: &str,
        expected: ExpectedVersion,
        events: usize,
    ) -> (
        AppendRequest,
        oneshot::Receiver<Result<Appended, StoreError>>,
    ) {
        let (mut request, answer) = request(stream, expected, events);
        request.chain = Some(chain.clone());
        (request, answer)
    }

    fn answer(
        mut answer: oneshot::Receiver<Result<Appended, StoreError>>,
    ) -> Result<Appended, StoreError> {
        answer.try_recv().expect("every request is answered")
    }

    fn appended(version: u64, first_position: u64, last_position: u64) -> Appended {
        Appended {
            version,
            first_position,
            last_position,
        }
    }

    fn head(connection: &Connection) -> (i64, String) {
        connection
            .query_row("SELECT position, hash FROM log_head", [], |row| {
                Ok((row.get(0)?, row.get(1)?))
            })
            .expect("head")
    }

    /// Once an append of a chain fails, every later append of the chain fails, in this batch and the next,
    /// even one whose expected version matches; appends of other chains and unchained ones are unaffected.
    #[test]
    fn a_chain_stops_at_its_first_failed_append() {
        let connection = open_memory().expect("database");
        let (ours, theirs) = (Chain::new(), Chain::new());
        let requests = [
            chained(&ours, "a", ExpectedVersion::NoStream, 1),
            chained(&ours, "a", ExpectedVersion::Exact(5), 1),
            chained(&ours, "b", ExpectedVersion::NoStream, 1),
            chained(&theirs, "c", ExpectedVersion::NoStream, 1),
            request("d", ExpectedVersion::NoStream, 1),
        ];
        let (batch, answers): (Vec<_>, Vec<_>) = requests.into_iter().unzip();
        commit_batch(&connection, batch);
        let answers: Vec<_> = answers.into_iter().map(answer).collect();
        assert_eq!(answers[0].as_ref().unwrap(), &appended(1, 1, 1));
        assert!(matches!(
            answers[1],
            Err(StoreError::Conflict { actual: 1, .. })
        ));
        assert!(matches!(
            answers[2],
            Err(StoreError::Conflict { actual: 0, .. })
        ));
        assert_eq!(answers[3].as_ref().unwrap(), &appended(1, 2, 2));
        assert_eq!(answers[4].as_ref().unwrap(), &appended(1, 3, 3));
        assert!(ours.is_broken() && !theirs.is_broken());

        let (later, answer_later) = chained(&ours, "e", ExpectedVersion::NoStream, 1);
        commit_batch(&connection, vec![later]);
        assert!(matches!(
            answer(answer_later),
            Err(StoreError::Conflict { .. })
        ));
        assert_eq!(head(&connection).0, 3);
    }

    /// One batch holding appends that follow each other on one stream, a conflict, an append rejected by the
    /// database and an empty append: each is answered as if it had run alone, in batch order.
    #[test]
    fn a_batch_answers_each_append_on_its_own() {
        let connection = open_memory().expect("database");
        connection
            .execute_batch(
                "CREATE TRIGGER poison BEFORE INSERT ON events WHEN NEW.stream = 'poison' \
                 BEGIN SELECT RAISE(ABORT, 'poisoned stream'); END;",
            )
            .expect("trigger");
        let requests = [
            request("a", ExpectedVersion::NoStream, 2),
            request("b", ExpectedVersion::Any, 1),
            request("a", ExpectedVersion::Exact(2), 1),
            request("a", ExpectedVersion::Exact(2), 1),
            request("poison", ExpectedVersion::Any, 3),
            request("b", ExpectedVersion::Exact(1), 0),
            request("c", ExpectedVersion::NoStream, 1),
        ];
        let (batch, answers): (Vec<_>, Vec<_>) = requests.into_iter().unzip();
        commit_batch(&connection, batch);
        let mut answers = answers.into_iter().map(answer);

        assert_eq!(answers.next().unwrap().unwrap(), appended(2, 1, 2));
        assert_eq!(answers.next().unwrap().unwrap(), appended(1, 3, 3));
        assert_eq!(answers.next().unwrap().unwrap(), appended(3, 4, 4));
        match answers.next().unwrap() {
            Err(StoreError::Conflict {
                stream, actual: 3, ..
            }) if stream == "a" => {}
            other => panic!("expected a conflict at version 3, got {other:?}"),
        }
        match answers.next().unwrap() {
            Err(err @ StoreError::Sqlite(_)) => {
                assert!(err.to_string().contains("poisoned stream"), "{err}")
            }
            other => panic!("expected the trigger's error, got {other:?}"),
        }
        assert_eq!(answers.next().unwrap().unwrap(), appended(1, 5, 4));
        assert_eq!(answers.next().unwrap().unwrap(), appended(1, 5, 5));

        let (position, hash) = head(&connection);
        assert_eq!(position, 5);
        let last_hash: String = connection
            .query_row("SELECT hash FROM events WHERE position = 5", [], |row| {
                row.get(0)
            })
            .expect("last event");
        assert_eq!(hash, last_hash);
        let outbox = waiting(&connection, 10).expect("outbox");
        assert_eq!(
            outbox.iter().map(|e| e.position).collect::<Vec<_>>(),
            [1, 2, 3, 4, 5]
        );
        assert_eq!(verify(&connection).expect("verify"), None);
    }

    /// A batch whose COMMIT fails stores nothing, and every append in it gets the error.
    #[test]
    fn a_failed_commit_fails_the_whole_batch() {
        let connection = open_memory().expect("database");
        // A deferred foreign key is checked at COMMIT: an event of stream `doom` makes the commit fail.
        connection
            .execute_batch(
                "CREATE TABLE parent (id INTEGER PRIMARY KEY); \
                 CREATE TABLE guard (position INTEGER REFERENCES parent (id) DEFERRABLE INITIALLY DEFERRED); \
                 CREATE TRIGGER doom AFTER INSERT ON events WHEN NEW.stream = 'doom' \
                 BEGIN INSERT INTO guard (position) VALUES (NEW.position); END;",
            )
            .expect("trap");
        let (first, first_answer) = request("a", ExpectedVersion::Any, 1);
        commit_batch(&connection, vec![first]);
        assert_eq!(answer(first_answer).unwrap(), appended(1, 1, 1));
        let head_before = head(&connection);

        let requests = [
            request("a", ExpectedVersion::Exact(1), 2),
            request("doom", ExpectedVersion::Any, 1),
            request("b", ExpectedVersion::Any, 1),
        ];
        let (batch, answers): (Vec<_>, Vec<_>) = requests.into_iter().unzip();
        commit_batch(&connection, batch);
        for outcome in answers.into_iter().map(answer) {
            match outcome {
                Err(err @ StoreError::Sqlite(_)) => {
                    assert!(err.to_string().contains("FOREIGN KEY"), "{err}")
                }
                other => panic!("expected the failed commit's error, got {other:?}"),
            }
        }
        assert!(
            connection.is_autocommit(),
            "the transaction was rolled back"
        );
        assert_eq!(head(&connection), head_before);
        let events: i64 = connection
            .query_row("SELECT COUNT(*) FROM events", [], |row| row.get(0))
            .expect("count");
        assert_eq!(events, 1);

        // The writer goes on: the next batch commits.
        let (next, next_answer) = request("a", ExpectedVersion::Exact(1), 1);
        commit_batch(&connection, vec![next]);
        assert_eq!(answer(next_answer).unwrap(), appended(2, 2, 2));
        assert_eq!(verify(&connection).expect("verify"), None);
    }

    /// A file made before the watermark keeps its outbox through the upgrade: what was waiting still waits,
    /// in order, and acknowledging it empties the outbox.
    #[test]
    fn the_upgrade_keeps_what_was_waiting() {
        let connection = Connection::open_in_memory().expect("database");
        let mut migrations = MIGRATOR
            .iter()
            .filter(|m| !m.migration_type.is_down_migration());
        let first = migrations.next().expect("the first migration");
        connection
            .execute_batch(&first.sql)
            .expect("the original schema");
        let (batch, _answers): (Vec<_>, Vec<_>) = [
            request("a", ExpectedVersion::Any, 4),
            request("b", ExpectedVersion::Any, 3),
        ]
        .into_iter()
        .unzip();
        commit_batch(&connection, batch);
        // The outbox as the original schema kept it: every event was put in it, and the published ones (1 to
        // 3, and 5 out of order) were deleted.
        connection
            .execute_batch(
                "INSERT INTO outbox (position) SELECT position FROM events; \
                 DELETE FROM outbox WHERE position IN (1, 2, 3, 5);",
            )
            .expect("the original outbox");
        for migration in migrations {
            connection.execute_batch(&migration.sql).expect("upgrade");
        }
        let positions = |connection: &Connection| {
            waiting(connection, 10)
                .expect("outbox")
                .iter()
                .map(|e| e.position)
                .collect::<Vec<_>>()
        };
        assert_eq!(positions(&connection), [4, 6, 7]);
        acknowledge(&connection, &[4, 7]).expect("acknowledge");
        assert_eq!(positions(&connection), [6]);
        acknowledge(&connection, &[6]).expect("acknowledge");
        assert!(positions(&connection).is_empty());
        let (relayed, beyond): (i64, String) = connection
            .query_row("SELECT relayed, relayed_beyond FROM log_head", [], |row| {
                Ok((row.get(0)?, row.get(1)?))
            })
            .expect("watermark");
        assert_eq!((relayed, beyond.as_str()), (7, "[]"));
    }

    /// What the relay reads of the outbox is what the database holds, whether it comes from the writer's memory
    /// or from the file: after commits, out-of-order acknowledgements and appends by another store on the file.
    /// Two stores on one file, as two processes sharing a log would have them.
    async fn two_stores(dir: &tempfile::TempDir) -> (SqliteStore, SqliteStore) {
        let path = dir.path().join("log.db");
        let one = SqliteStore::open(&path).await.expect("open");
        let other = SqliteStore::open(&path).await.expect("open");
        (one, other)
    }

    fn positions(events: &[StoredEvent]) -> Vec<u64> {
        events.iter().map(|e| e.position).collect()
    }

    /// A store in a file under `dir` holding three events of stream `a`.
    async fn store_of_three(dir: &tempfile::TempDir) -> SqliteStore {
        let store = SqliteStore::open(&dir.path().join("log.db"))
            .await
            .expect("open");
        store
            .append("a", ExpectedVersion::NoStream, new_events("a", 3))
            .await
            .expect("append");
        store
    }

    #[tokio::test]
    async fn closing_the_idle_readers_leaves_the_store_readable() {
        let dir = tempfile::tempdir().expect("dir");
        let store = store_of_three(&dir).await;
        assert_eq!(store.read_all(0, 10).await.expect("read").len(), 3);
        assert_eq!(
            lock(&store.shared.readers).len(),
            1,
            "the reader is kept idle"
        );
        store.close_idle_readers();
        assert!(lock(&store.shared.readers).is_empty());
        assert_eq!(store.read_all(1, 10).await.expect("read again").len(), 2);
        store.close().await;
    }

    #[tokio::test]
    async fn a_reader_busy_when_the_readers_are_closed_is_closed_when_its_read_ends() {
        let dir = tempfile::tempdir().expect("dir");
        let store = store_of_three(&dir).await;
        let (started, start) = std::sync::mpsc::channel();
        let (finish, finished) = std::sync::mpsc::channel::<()>();
        let reading = store.clone();
        let busy = tokio::spawn(async move {
            reading
                .read(move |connection| {
                    started.send(()).expect("started");
                    finished.recv().expect("finish");
                    query_events(
                        connection,
                        select_events!("FROM events ORDER BY position"),
                        [],
                        3,
                    )
                })
                .await
        });
        tokio::task::spawn_blocking(move || start.recv().expect("the read started"))
            .await
            .expect("wait");
        store.close_idle_readers();
        finish.send(()).expect("finish");
        assert_eq!(busy.await.expect("join").expect("read").len(), 3);
        assert!(
            lock(&store.shared.readers).is_empty(),
            "the reader opened before the close is not kept"
        );
        assert_eq!(store.read_all(0, 10).await.expect("read again").len(), 3);
        assert_eq!(
            lock(&store.shared.readers).len(),
            1,
            "a reader opened since is kept"
        );
        store.close().await;
    }

    #[tokio::test]
    async fn the_outbox_read_from_memory_is_the_outbox_in_the_file() {
        let dir = tempfile::tempdir().expect("dir");
        let (one, other) = two_stores(&dir).await;
        let in_file = || async {
            one.read(|connection| waiting(connection, 100))
                .await
                .expect("read")
        };
        one.append("a", ExpectedVersion::NoStream, new_events("a", 1))
            .await
            .expect("append");
        // The first look reads the file; the writer then follows its own commits.
        assert_eq!(one.outbox_peek(100).await.expect("peek"), in_file().await);
        one.append("a", ExpectedVersion::Exact(1), new_events("a", 2))
            .await
            .expect("append");
        one.append("b", ExpectedVersion::NoStream, new_events("b", 1))
            .await
            .expect("append");
        let peeked = one.outbox_peek(100).await.expect("peek");
        assert_eq!(positions(&peeked), vec![1, 2, 3, 4]);
        assert_eq!(peeked, in_file().await);
        assert_eq!(
            one.shared.tail.peek(100, Instant::now()),
            Some(peeked),
            "the writer followed its own commits in memory"
        );
        assert_eq!(
            positions(&one.outbox_peek(2).await.expect("peek")),
            vec![1, 2]
        );

        one.outbox_ack(&[3, 1]).await.expect("ack");
        let peeked = one.outbox_peek(100).await.expect("peek");
        assert_eq!(positions(&peeked), vec![2, 4]);
        assert_eq!(peeked, in_file().await);

        // Another store on the file appends 5; this store's next commit (6) does not start where its memory
        // left off, so it reads the file again.
        other
            .append("c", ExpectedVersion::NoStream, new_events("c", 1))
            .await
            .expect("append");
        one.append("a", ExpectedVersion::Exact(3), new_events("a", 1))
            .await
            .expect("append");
        let peeked = one.outbox_peek(100).await.expect("peek");
        assert_eq!(positions(&peeked), vec![2, 4, 5, 6]);
        assert_eq!(peeked, in_file().await);
        one.close().await;
        other.close().await;
    }

    #[tokio::test]
    async fn a_tail_due_for_a_check_is_trusted_again_only_if_the_log_still_ends_there() {
        let dir = tempfile::tempdir().expect("dir");
        let (one, other) = two_stores(&dir).await;

        one.append("a", ExpectedVersion::NoStream, new_events("a", 1))
            .await
            .expect("append");
        assert_eq!(
            positions(&one.outbox_peek(100).await.expect("peek")),
            vec![1]
        );
        // Another store appends while this one commits nothing: its tail is served until it is due for a
        // check, and the check sees the log moved on.
        other
            .append("b", ExpectedVersion::NoStream, new_events("b", 1))
            .await
            .expect("append");
        assert_eq!(
            positions(&one.outbox_peek(100).await.expect("peek")),
            vec![1]
        );
        tokio::time::sleep(crate::tail::TRUSTED_FOR).await;
        assert_eq!(
            positions(&one.outbox_peek(100).await.expect("peek")),
            vec![1, 2],
            "the other store's append is relayed within the time the tail is trusted"
        );
        // Nothing changes: the check renews the tail, which is still the outbox.
        tokio::time::sleep(crate::tail::TRUSTED_FOR).await;
        assert!(one.shared.tail.due(Instant::now()));
        assert_eq!(
            positions(&one.outbox_peek(100).await.expect("peek")),
            vec![1, 2]
        );
        assert!(!one.shared.tail.due(Instant::now()), "renewed");
        one.close().await;
        other.close().await;
    }

    /// The checkpoint sequence number in a write-ahead log's header, which each restart of the log raises; 0
    /// while the log has no header.
    fn restarts(wal: &Path) -> u32 {
        let header = std::fs::read(wal).unwrap_or_default();
        header
            .get(12..16)
            .map_or(0, |n| u32::from_be_bytes(n.try_into().expect("four bytes")))
    }

    #[tokio::test]
    async fn the_write_ahead_log_starts_again_under_a_steady_stream_of_appends() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("log.db");
        let wal = dir.path().join("log.db-wal");
        let store = SqliteStore::open(&path).await.expect("open");
        // Appends one after another, each a commit of a page of payload and its index entries (three or more
        // frames), until the log has started again twice. How many appends that takes depends on how soon the
        // checkpointer thread gets a core: on a busy machine it lags, so the test waits for the restarts with a
        // generous bound rather than expecting them within a fixed number of appends.
        let payload = vec![b'x'; 3000];
        let most = 200_000;
        let before = restarts(&wal);
        let mut appends = 0;
        while appends < 4000 || (appends < most && restarts(&wal) < before + 2) {
            for _ in 0..500 {
                let stream = format!("s-{}", appends % 10);
                let event = crate::conformance::new_event("nsml.v1.TestEvent", &payload);
                store
                    .append(&stream, ExpectedVersion::Any, vec![event])
                    .await
                    .expect("append");
                appends += 1;
            }
        }
        let after = restarts(&wal);
        assert!(
            after >= before + 2,
            "the log started again {} times in {appends} appends",
            after.saturating_sub(before)
        );
        // A restart is the writer going back to the start of the file: the file is reused, whatever its size.
        // How large it got first depends on how long a busy machine's checkpointer lagged before the first
        // restart (up to the whole run), so its size tells nothing here; `journal_size_limit` cuts it back at
        // a restart.
        assert_eq!(store.verify_chain().await.expect("verify"), None);
        store.close().await;

        let again = SqliteStore::open(&path).await.expect("reopen");
        let all = again.read_all(0, appends + 1).await.expect("read");
        assert_eq!(all.len(), appends);
        assert!(all.iter().all(|e| e.payload == payload));
        assert_eq!(again.verify_chain().await.expect("verify"), None);
        again.close().await;
    }
}
