//! The append-only event log: the contract every backend keeps, and the SQLite and Postgres backends.
//!
//! A log holds streams (`quota-acme`, `sessions-acme/t1-cls`), each an ordered sequence of events numbered from
//! 1 (its version). Every event also has a global position in the whole log, and a hash chained to the event
//! before it, so an edited, deleted, inserted or reordered event is detectable by [`EventStore::verify_chain`].

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::Stream;
use serde::{Deserialize, Serialize};

mod chain;
mod error;
mod hash;
mod lease;
mod postgres;
mod row;
mod sqlite;
mod tail;

pub use error::StoreError;
pub use hash::{ChainBreak, ChainBreakKind, GENESIS_HASH, event_hash};
pub use lease::{OutboxLease, PostgresLease};
pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

#[cfg(any(test, feature = "conformance"))]
pub mod conformance;

/// What the writer expects the stream's current version to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpectedVersion {
    /// Append whatever the stream's version is.
    Any,
    /// The stream must not exist yet.
    NoStream,
    /// The stream's last event must have exactly this version (0 = no events).
    Exact(u64),
}

impl ExpectedVersion {
    /// Whether a stream at version `current` (0 = no events) satisfies this expectation.
    pub fn matches(self, current: u64) -> bool {
        match self {
            ExpectedVersion::Any => true,
            ExpectedVersion::NoStream => current == 0,
            ExpectedVersion::Exact(v) => current == v,
        }
    }

    /// Fails with [`StoreError::Conflict`] when a stream at version `current` does not satisfy this expectation,
    /// or when the append is queued on a `chain` that is broken: an earlier append of it failed, so this one was
    /// decided on a state that did not happen.
    pub(crate) fn check_queued(
        self,
        stream: &str,
        current: u64,
        chain: Option<&Arc<Chain>>,
    ) -> Result<(), StoreError> {
        self.check(stream, current)?;
        if chain.is_some_and(|c| c.is_broken()) {
            return Err(StoreError::Conflict {
                stream: stream.to_owned(),
                expected: self,
                actual: current,
            });
        }
        Ok(())
    }

    /// Fails with [`StoreError::Conflict`] when a stream at version `current` does not satisfy this expectation.
    pub(crate) fn check(self, stream: &str, current: u64) -> Result<(), StoreError> {
        if self.matches(current) {
            Ok(())
        } else {
            Err(StoreError::Conflict {
                stream: stream.to_owned(),
                expected: self,
                actual: current,
            })
        }
    }
}

impl fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExpectedVersion::Any => f.write_str("any version"),
            ExpectedVersion::NoStream => f.write_str("no stream"),
            ExpectedVersion::Exact(v) => write!(f, "{v}"),
        }
    }
}

/// Envelope metadata carried by every event.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    /// Unique id of this event (UUID v7); consumers drop duplicates by it.
    pub event_id: String,
    /// Id of the command that produced the event, for idempotency.
    #[serde(default)]
    pub command_id: String,
    /// Id shared by every event of one request or workflow.
    #[serde(default)]
    pub correlation_id: String,
    /// Id of the event or command that directly caused this one.
    #[serde(default)]
    pub causation_id: String,
    /// Who caused it (`user:alice`, `service:quota`, `runner`).
    #[serde(default)]
    pub actor: String,
    /// W3C `traceparent` of the span that appended it.
    #[serde(default)]
    pub traceparent: String,
    /// Wall-clock time the event was recorded, in milliseconds since the Unix epoch.
    pub recorded_at_ms: i64,
    /// Schema version of the payload type.
    #[serde(default = "one")]
    pub schema_version: u32,
}

fn one() -> u32 {
    1
}

/// An event to append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    /// Full type name of the payload, e.g. `nsml.v1.SessionRequested`.
    pub event_type: String,
    /// Protobuf-encoded payload.
    pub payload: Vec<u8>,
    /// Envelope metadata.
    pub metadata: Metadata,
}

/// An event as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredEvent {
    /// Position in the whole log, from 1, without gaps.
    pub position: u64,
    /// The stream the event belongs to.
    pub stream: String,
    /// Version within the stream, from 1, without gaps.
    pub version: u64,
    /// Full type name of the payload.
    pub event_type: String,
    /// Protobuf-encoded payload.
    pub payload: Vec<u8>,
    /// Envelope metadata.
    pub metadata: Metadata,
    /// Hex SHA-256 over the previous event's hash and this event's content.
    pub hash: String,
}

/// An event as a scan of whole streams reads it ([`EventStore::scan_streams`]): where it sits, its type, its
/// payload and when it was recorded; not the envelope's ids nor the hash, which a replay of the streams does not
/// read. Events of a page that carry the same stream name or type share one copy of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScannedEvent {
    /// Position in the whole log.
    pub position: u64,
    /// The stream the event belongs to.
    pub stream: Arc<str>,
    /// Version within the stream.
    pub version: u64,
    /// Full type name of the payload.
    pub event_type: Arc<str>,
    /// Protobuf-encoded payload.
    pub payload: Vec<u8>,
    /// The envelope's recording time ([`Metadata::recorded_at_ms`]).
    pub recorded_at_ms: i64,
}

impl From<&StoredEvent> for ScannedEvent {
    fn from(e: &StoredEvent) -> Self {
        Self {
            position: e.position,
            stream: Arc::from(e.stream.as_str()),
            version: e.version,
            event_type: Arc::from(e.event_type.as_str()),
            payload: e.payload.clone(),
            recorded_at_ms: e.metadata.recorded_at_ms,
        }
    }
}

/// What a successful append returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// The stream's version after the append (the last appended event's version).
    pub version: u64,
    /// Global position of the first appended event.
    pub first_position: u64,
    /// Global position of the last appended event.
    pub last_position: u64,
}

/// Appends queued one after another by one writer, each to commit only if every earlier one did.
///
/// A writer that decides its next append on state that includes appends not yet committed queues them on one
/// chain: the store commits them in queue order, and once one fails, every later one fails with a conflict, so
/// no append commits on a state that did not happen. A writer starts a new chain after it has re-read its
/// state.
#[derive(Debug, Default)]
pub struct Chain {
    broken: AtomicBool,
}

impl Chain {
    /// A new, unbroken chain.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Whether an append of this chain has failed.
    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Acquire)
    }

    /// Marks the chain failed: its later appends fail.
    pub fn fail(&self) {
        self.broken.store(true, Ordering::Release);
    }
}

/// An append already queued, to be awaited.
pub type PendingAppend =
    Pin<Box<dyn std::future::Future<Output = Result<Appended, StoreError>> + Send + 'static>>;

/// A stream of stored events, in position order.
pub type EventStream<'a> = Pin<Box<dyn Stream<Item = Result<StoredEvent, StoreError>> + Send + 'a>>;

/// The append-only log.
///
/// Contract, kept by every backend and checked by the conformance suite:
/// - `append` is atomic: once it returns `Ok`, all of its events are durable, have consecutive versions in the
///   stream and consecutive global positions, are chained by hash, and are in the outbox. When it returns an
///   error, none of them is stored.
/// - If `expected` does not match the stream's version, `append` returns [`StoreError::Conflict`] and stores
///   nothing; of two concurrent appends with the same expected version, exactly one succeeds.
/// - Reads see every append that returned before the read began, in version (stream) or position (log) order.
#[async_trait::async_trait]
pub trait EventStore: Send + Sync + 'static {
    /// Appends events to a stream if its version matches `expected`.
    async fn append(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<Appended, StoreError>;

    /// Queues an append on `chain` now, in call order, and returns its outcome to await: it commits only if
    /// every append queued earlier on `chain` committed, and otherwise fails with [`StoreError::Conflict`].
    /// `None` when the store cannot queue appends; the caller then appends with [`EventStore::append`] and
    /// waits for each before deciding the next.
    fn append_chained(
        &self,
        _chain: &Arc<Chain>,
        _stream: &str,
        _expected: ExpectedVersion,
        _events: Vec<NewEvent>,
    ) -> Option<PendingAppend> {
        None
    }

    /// Reads a stream's events with version > `after_version`, in version order.
    async fn read_stream(
        &self,
        stream: &str,
        after_version: u64,
    ) -> Result<Vec<StoredEvent>, StoreError>;

    /// Reads up to `limit` of a stream's events with version > `after_version`, in version order.
    async fn read_stream_page(
        &self,
        stream: &str,
        after_version: u64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError>;

    /// Reads up to `limit` events of the whole log with position > `after_position`, in position order.
    async fn read_all(
        &self,
        after_position: u64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError>;

    /// Reads up to `limit` events of the streams whose names start with `prefix`, stream by stream: each
    /// stream's events together and in version order, the streams in the order the store sorts their names
    /// in. `after` is the stream and version of the last event read (`None`: from the first); the next page
    /// starts after it. What a replay of whole streams reads (the quota audit replays every team's ledger):
    /// the other streams' rows are left unread, and so is what the replay does not use of each event.
    async fn scan_streams(
        &self,
        prefix: &str,
        after: Option<(&str, u64)>,
        limit: usize,
    ) -> Result<Vec<ScannedEvent>, StoreError>;

    /// Reads up to `limit` of the events with position > `after_position` whose type is one of `types`, in
    /// position order, and says how far the log was looked through for them (see [`TypedPage`]): what a reader
    /// that uses a few kinds of events (a read model catching up at start-up) reads instead of the whole log.
    /// The default pages through `read_all` and keeps the matching events; SQLite leaves the other rows
    /// undecoded.
    async fn read_all_of_types(
        &self,
        types: &[&str],
        after_position: u64,
        limit: usize,
    ) -> Result<TypedPage, StoreError> {
        read_types_filtered(self, types, after_position, limit).await
    }

    /// [`EventStore::read_all_of_types`], each event behind an [`Arc`]: for a reader that hands the events on
    /// to be shared (a read model's subscription). The default reads them as `read_all_of_types` does and puts
    /// each behind its own `Arc`; a store that already holds them shared (several catch-ups reading the log
    /// once) hands out its own, without copying them.
    async fn read_all_of_types_shared(
        &self,
        types: &[&str],
        after_position: u64,
        limit: usize,
    ) -> Result<SharedPage, StoreError> {
        Ok(self
            .read_all_of_types(types, after_position, limit)
            .await?
            .into())
    }

    /// The current stream version (0 when the stream has no events).
    async fn stream_version(&self, stream: &str) -> Result<u64, StoreError>;

    /// The position of the last event in the log (0 when empty).
    async fn head_position(&self) -> Result<u64, StoreError>;

    /// Takes up to `limit` events from the outbox (oldest first) without removing them.
    async fn outbox_peek(&self, limit: usize) -> Result<Vec<StoredEvent>, StoreError>;

    /// Removes published events from the outbox.
    async fn outbox_ack(&self, positions: &[u64]) -> Result<(), StoreError>;

    /// Loads a consumer's saved position (0 when it has none).
    async fn load_checkpoint(&self, consumer: &str) -> Result<u64, StoreError>;

    /// Saves a consumer's position.
    async fn save_checkpoint(&self, consumer: &str, position: u64) -> Result<(), StoreError>;

    /// Walks the whole log and checks positions, versions and the hash chain; returns the first break found.
    async fn verify_chain(&self) -> Result<Option<ChainBreak>, StoreError>;
}

/// How many events [`read_all_stream`] reads per page.
pub const READ_PAGE: usize = 1000;

/// What [`EventStore::read_all_of_types`] returns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TypedPage {
    /// The events of the types asked for, in position order.
    pub events: Vec<StoredEvent>,
    /// How far the log was looked through: every event of those types with a position above the one read after
    /// and at most this one is in `events`. With fewer events than the limit, this was the log's head when read.
    pub through: u64,
}

/// What [`EventStore::read_all_of_types_shared`] returns: a [`TypedPage`] whose events are shared.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SharedPage {
    /// The events of the types asked for, in position order.
    pub events: Vec<Arc<StoredEvent>>,
    /// How far the log was looked through, as [`TypedPage::through`].
    pub through: u64,
}

impl From<TypedPage> for SharedPage {
    /// Puts each event behind an `Arc` of its own.
    fn from(page: TypedPage) -> Self {
        SharedPage {
            events: page.events.into_iter().map(Arc::new).collect(),
            through: page.through,
        }
    }
}

impl From<SharedPage> for TypedPage {
    /// Takes each event out of its `Arc`, or copies it where the `Arc` is shared.
    fn from(page: SharedPage) -> Self {
        TypedPage {
            events: page.events.into_iter().map(Arc::unwrap_or_clone).collect(),
            through: page.through,
        }
    }
}

/// [`EventStore::read_all_of_types`] through [`EventStore::read_all`]: pages of `limit` events, keeping those of
/// the types named.
pub(crate) async fn read_types_filtered<S: EventStore + ?Sized>(
    store: &S,
    types: &[&str],
    after_position: u64,
    limit: usize,
) -> Result<TypedPage, StoreError> {
    let mut page = TypedPage {
        events: Vec::new(),
        through: after_position,
    };
    while page.events.len() < limit {
        let read = store.read_all(page.through, limit).await?;
        let full = read.len() == limit;
        for event in read {
            if page.events.len() == limit {
                // The rest of this page is read again by the next call, which starts after `through`.
                return Ok(page);
            }
            page.through = event.position;
            if types.contains(&event.event_type.as_str()) {
                page.events.push(event);
            }
        }
        if !full {
            break;
        }
    }
    Ok(page)
}

/// Streams the whole log from `after_position` in pages, ending at the head as of each page read.
///
/// The stream ends after the first page shorter than [`READ_PAGE`], or after the first error.
pub fn read_all_stream<'a>(store: &'a dyn EventStore, after_position: u64) -> EventStream<'a> {
    Box::pin(paged(store, after_position))
}

/// Like [`read_all_stream`], for a shared store; the stream owns its handle and can outlive the caller.
pub fn read_all_stream_shared(
    store: Arc<dyn EventStore>,
    after_position: u64,
) -> EventStream<'static> {
    Box::pin(paged(store, after_position))
}

/// State of a paged read: where the next page starts, the page being yielded, whether it was the last page.
struct Paging<S> {
    store: S,
    after: u64,
    page: std::vec::IntoIter<StoredEvent>,
    last_page: bool,
}

fn paged<'a, S>(
    store: S,
    after_position: u64,
) -> impl Stream<Item = Result<StoredEvent, StoreError>> + Send + 'a
where
    S: std::ops::Deref + Send + 'a,
    S::Target: EventStore,
{
    let start = Paging {
        store,
        after: after_position,
        page: Vec::new().into_iter(),
        last_page: false,
    };
    futures::stream::unfold(start, |mut state| async move {
        loop {
            if let Some(event) = state.page.next() {
                state.after = event.position;
                return Some((Ok(event), state));
            }
            if state.last_page {
                return None;
            }
            match state.store.read_all(state.after, READ_PAGE).await {
                Ok(page) => {
                    state.last_page = page.len() < READ_PAGE;
                    state.page = page.into_iter();
                }
                Err(err) => {
                    state.last_page = true;
                    return Some((Err(err), state));
                }
            }
        }
    })
}
