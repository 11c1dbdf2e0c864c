//! Command handling on one stream with optimistic concurrency: load → decide → append, retried on conflict.
//!
//! The decision function sees the stream's state at a known version and returns the events to append (or
//! a rejection); the append expects exactly that version, so two writers in any number of processes can
//! never both pass a rule that only one fits under. States are cached per stream and brought up to date
//! from the store before each decision.

use std::collections::HashMap;
use std::sync::Arc;

use nsml_eventstore::{Appended, EventStore, ExpectedVersion, NewEvent, StoreError, StoredEvent};
use tokio::sync::Mutex;

/// State rebuilt from one stream.
pub trait Aggregate: Default + Clone + Send + Sync + 'static {
    /// Applies one event of the stream.
    fn apply(&mut self, event: &StoredEvent);
}

struct Entry<A> {
    state: A,
    version: u64,
    /// Whether the stream has been read from the store at least once.
    loaded: bool,
}

/// Per-stream cache of aggregate states.
pub struct Aggregates<A> {
    store: Arc<dyn EventStore>,
    streams: Mutex<HashMap<String, Arc<Mutex<Entry<A>>>>>,
}

/// The outcome of a command.
pub enum Outcome<R> {
    /// Events appended.
    Committed { appended: Appended },
    /// Nothing to append (idempotent repeat); the stream's current version.
    Unchanged { version: u64 },
    /// Refused by a rule.
    Rejected(R),
}

impl<A: Aggregate> Aggregates<A> {
    /// Creates an empty cache over `store`.
    pub fn new(store: Arc<dyn EventStore>) -> Self {
        Self {
            store,
            streams: Mutex::new(HashMap::new()),
        }
    }

    async fn entry(&self, stream: &str) -> Arc<Mutex<Entry<A>>> {
        let mut map = self.streams.lock().await;
        map.entry(stream.to_string())
            .or_insert_with(|| {
                Arc::new(Mutex::new(Entry {
                    state: A::default(),
                    version: 0,
                    loaded: false,
                }))
            })
            .clone()
    }

    async fn refresh(&self, stream: &str, entry: &mut Entry<A>) -> Result<(), StoreError> {
        let events = self.store.read_stream(stream, entry.version).await?;
        for ev in &events {
            entry.state.apply(ev);
            entry.version = ev.version;
        }
        entry.loaded = true;
        Ok(())
    }

    /// Loads the current state of a stream and its version.
    pub async fn load(&self, stream: &str) -> Result<(A, u64), StoreError> {
        let entry = self.entry(stream).await;
        let mut e = entry.lock().await;
        self.refresh(stream, &mut e).await?;
        Ok((e.state.clone(), e.version))
    }

    /// Runs `decide` against the stream's current state and appends what it returns, retrying on conflict.
    ///
    /// The first decision uses the cached state without reading the store: an append expects the cached
    /// version, so a state made stale by another process shows up as a conflict, and the stream is re-read and
    /// decided again. A decision that appends nothing (a refusal, an idempotent repeat) is only trusted on a
    /// freshly read state. `decide` may run several times; it must be pure.
    pub async fn execute<R>(
        &self,
        stream: &str,
        mut decide: impl FnMut(&A, u64) -> Result<Vec<NewEvent>, R>,
    ) -> Result<Outcome<R>, StoreError> {
        let entry = self.entry(stream).await;
        let mut e = entry.lock().await;
        // Serialised within this process by the entry lock; across processes by the expected version.
        let mut fresh = false;
        if !e.loaded {
            self.refresh(stream, &mut e).await?;
            fresh = true;
        }
        for _ in 0..64 {
            let decided = decide(&e.state, e.version);
            let events = match decided {
                Ok(evs) if !evs.is_empty() => evs,
                _ if !fresh => {
                    self.refresh(stream, &mut e).await?;
                    fresh = true;
                    continue;
                }
                Ok(_) => {
                    return Ok(Outcome::Unchanged { version: e.version });
                }
                Err(r) => return Ok(Outcome::Rejected(r)),
            };
            let expected = if e.version == 0 {
                ExpectedVersion::NoStream
            } else {
                ExpectedVersion::Exact(e.version)
            };
            match self.store.append(stream, expected, events.clone()).await {
                Ok(appended) => {
                    // The cache follows its own append without reading it back.
                    let first_version = appended.version + 1 - events.len() as u64;
                    for (i, ev) in events.into_iter().enumerate() {
                        let stored = StoredEvent {
                            position: appended.first_position + i as u64,
                            stream: stream.to_string(),
                            version: first_version + i as u64,
                            event_type: ev.event_type,
                            payload: ev.payload,
                            metadata: ev.metadata,
                            hash: String::new(),
                        };
                        e.state.apply(&stored);
                        e.version = stored.version;
                    }
                    return Ok(Outcome::Committed { appended });
                }
                Err(StoreError::Conflict { .. }) => {
                    self.refresh(stream, &mut e).await?;
                    fresh = true;
                }
                Err(err) => return Err(err),
            }
        }
        Err(StoreError::Corrupt(format!(
            "stream `{stream}` kept changing under 64 consecutive appends"
        )))
    }
}
