//! Command handling on one stream with optimistic concurrency: load → decide → append, retried on conflict.
//!
//! The decision function sees the stream's state at a known version and returns the events to append (or
//! a rejection); the append expects exactly that version, so two writers in any number of processes can
//! never both pass a rule that only one fits under. States are cached per stream and brought up to date
//! from the store before each decision.
//!
//! Where the store can queue appends ([`EventStore::append_chained`]), a stream's next command is decided as
//! soon as the previous one's events are queued, on a state that already includes them, rather than after
//! they commit: every append of a stream goes on one chain, so if one fails, each later one fails too, the
//! state is read again from the store and the commands decided again. Commands on one busy stream then share
//! commits instead of waiting for one commit each.

use std::collections::HashMap;
use std::sync::Arc;

use nsml_eventstore::{
    Appended, Chain, EventStore, ExpectedVersion, NewEvent, StoreError, StoredEvent,
};
use tokio::sync::{Mutex, watch};

/// State rebuilt from one stream.
pub trait Aggregate: Default + Clone + Send + Sync + 'static {
    /// Applies one event of the stream.
    fn apply(&mut self, event: &StoredEvent);
}

struct Entry<A> {
    /// The stream's state, including the events of queued appends not answered yet.
    state: A,
    version: u64,
    /// Whether `state` was read from the store (after the last failure, if any).
    loaded: bool,
    /// The chain this stream's appends are queued on; replaced when the state is read again.
    chain: Arc<Chain>,
    /// How many appends were ever queued on this stream by this process (their sequence numbers).
    queued: u64,
}

impl<A: Aggregate> Entry<A> {
    /// Drops the state, which may hold events of failed appends, so that it is read again from the store.
    fn forget(&mut self) {
        self.state = A::default();
        self.version = 0;
        self.loaded = false;
        self.chain = Chain::new();
    }

    /// Applies appended events to the state ahead of reading them back. Aggregates fold by version, so the
    /// events' positions (not known while queued) are left at 0.
    fn follow(&mut self, stream: &str, events: Vec<NewEvent>) {
        for ev in events {
            let stored = StoredEvent {
                position: 0,
                stream: stream.to_string(),
                version: self.version + 1,
                event_type: ev.event_type,
                payload: ev.payload,
                metadata: ev.metadata,
                hash: String::new(),
            };
            self.state.apply(&stored);
            self.version = stored.version;
        }
    }
}

/// One stream's cached state, and the highest sequence number of its queued appends that has been answered.
struct Cell<A> {
    entry: Mutex<Entry<A>>,
    answered: watch::Sender<u64>,
}

/// Per-stream cache of aggregate states.
pub struct Aggregates<A> {
    store: Arc<dyn EventStore>,
    streams: Mutex<HashMap<String, Arc<Cell<A>>>>,
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

/// Whether the cached state can be trusted as the stream's committed state, and if not, what to do first.
enum Settled {
    Yes,
    /// Queued appends are still unanswered: wait for the answer to this sequence number.
    WaitFor(u64),
}

/// What a decision leads to before anything is appended.
enum Decided<R> {
    /// Events to append, expecting the entry's version.
    Append(Vec<NewEvent>),
    /// Nothing to append, on a freshly read state: the command's final outcome.
    Done(Outcome<R>),
    /// Queued appends are still unanswered: wait for the answer to this sequence number, then decide again.
    WaitFor(u64),
}

impl<A: Aggregate> Aggregates<A> {
    /// Creates an empty cache over `store`.
    pub fn new(store: Arc<dyn EventStore>) -> Self {
        Self {
            store,
            streams: Mutex::new(HashMap::new()),
        }
    }

    async fn cell(&self, stream: &str) -> Arc<Cell<A>> {
        let mut map = self.streams.lock().await;
        map.entry(stream.to_string())
            .or_insert_with(|| {
                Arc::new(Cell {
                    entry: Mutex::new(Entry {
                        state: A::default(),
                        version: 0,
                        loaded: false,
                        chain: Chain::new(),
                        queued: 0,
                    }),
                    answered: watch::channel(0).0,
                })
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

    /// Whether every append queued on the stream has been answered, and all of them committed. A broken
    /// chain means one failed: the state is dropped, to be read again.
    fn settled(cell: &Cell<A>, e: &mut Entry<A>) -> Settled {
        if *cell.answered.borrow() < e.queued {
            return Settled::WaitFor(e.queued);
        }
        if e.chain.is_broken() {
            e.forget();
        }
        Settled::Yes
    }

    async fn wait_answered(cell: &Cell<A>, seq: u64) {
        let mut answered = cell.answered.subscribe();
        // The sender lives in `cell`, so the wait ends only by the answer arriving.
        let _ = answered.wait_for(|a| *a >= seq).await;
    }

    /// Loads the current committed state of a stream and its version.
    pub async fn load(&self, stream: &str) -> Result<(A, u64), StoreError> {
        let cell = self.cell(stream).await;
        loop {
            let mut e = cell.entry.lock().await;
            if let Settled::WaitFor(seq) = Self::settled(&cell, &mut e) {
                drop(e);
                Self::wait_answered(&cell, seq).await;
                continue;
            }
            self.refresh(stream, &mut e).await?;
            return Ok((e.state.clone(), e.version));
        }
    }

    /// Runs `decide` on the entry's state, reading the stream first where the state cannot be trusted.
    ///
    /// Events to append are taken on whatever state the entry holds; a decision that appends nothing is
    /// only final on a freshly read state, so it is decided again after a read, or once the appends queued
    /// before it are answered.
    async fn decide_on<R>(
        &self,
        stream: &str,
        cell: &Cell<A>,
        e: &mut Entry<A>,
        decide: &mut impl FnMut(&A, u64) -> Result<Vec<NewEvent>, R>,
    ) -> Result<Decided<R>, StoreError> {
        if e.chain.is_broken() {
            // An append failed: the state may hold its events. Appends queued after it fail as well.
            e.forget();
        }
        let mut fresh = false;
        if !e.loaded {
            self.refresh(stream, e).await?;
            fresh = true;
        }
        loop {
            match decide(&e.state, e.version) {
                Ok(evs) if !evs.is_empty() => return Ok(Decided::Append(evs)),
                decided if fresh => {
                    return Ok(Decided::Done(match decided {
                        Ok(_) => Outcome::Unchanged { version: e.version },
                        Err(r) => Outcome::Rejected(r),
                    }));
                }
                _ => match Self::settled(cell, e) {
                    Settled::WaitFor(seq) => return Ok(Decided::WaitFor(seq)),
                    Settled::Yes => {
                        self.refresh(stream, e).await?;
                        fresh = true;
                    }
                },
            }
        }
    }

    /// Runs `decide` against the stream's current state and appends what it returns, retrying on conflict.
    ///
    /// The first decision uses the cached state without reading the store: an append expects the cached
    /// version, so a state made stale by another process shows up as a conflict, and the stream is re-read and
    /// decided again. A decision that appends nothing (a refusal, an idempotent repeat) is only trusted on a
    /// freshly read state, once every append queued before it has committed. `decide` may run several times;
    /// it must be pure.
    pub async fn execute<R>(
        &self,
        stream: &str,
        mut decide: impl FnMut(&A, u64) -> Result<Vec<NewEvent>, R>,
    ) -> Result<Outcome<R>, StoreError> {
        let cell = self.cell(stream).await;
        let mut conflicts = 0;
        while conflicts < 64 {
            // Serialised within this process by the entry lock; across processes by the expected version.
            let mut e = cell.entry.lock().await;
            let events = match self.decide_on(stream, &cell, &mut e, &mut decide).await? {
                Decided::Append(events) => events,
                Decided::Done(outcome) => return Ok(outcome),
                Decided::WaitFor(seq) => {
                    drop(e);
                    Self::wait_answered(&cell, seq).await;
                    continue;
                }
            };
            let expected = if e.version == 0 {
                ExpectedVersion::NoStream
            } else {
                ExpectedVersion::Exact(e.version)
            };
            let Some(pending) =
                self.store
                    .append_chained(&e.chain, stream, expected, events.clone())
            else {
                // The store cannot queue: append and wait under the lock.
                match self.store.append(stream, expected, events.clone()).await {
                    Ok(appended) => {
                        e.follow(stream, events);
                        return Ok(Outcome::Committed { appended });
                    }
                    Err(StoreError::Conflict { .. }) => {
                        conflicts += 1;
                        self.refresh(stream, &mut e).await?;
                        continue;
                    }
                    Err(err) => return Err(err),
                }
            };
            // Queued: the next command on this stream may be decided on a state that includes these events.
            e.follow(stream, events);
            e.queued += 1;
            let seq = e.queued;
            drop(e);
            let result = pending.await;
            cell.answered.send_modify(|a| *a = (*a).max(seq));
            match result {
                Ok(appended) => return Ok(Outcome::Committed { appended }),
                Err(StoreError::Conflict { .. }) => conflicts += 1,
                Err(err) => return Err(err),
            }
        }
        Err(StoreError::Corrupt(format!(
            "stream `{stream}` kept changing under 64 consecutive appends"
        )))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use nsml_eventstore::{
        EventStore, ExpectedVersion, Metadata, NewEvent, SqliteStore, StoredEvent,
    };

    use super::{Aggregate, Aggregates, Outcome};

    /// Seats taken on a stream; a command takes one while fewer than `SEATS` are taken. Each event records who
    /// took it and a digest of the stream before it, so a command decided on a state that did not happen (one
    /// holding an append that failed) shows as an event whose digest does not match the events stored before it.
    #[derive(Default, Clone)]
    struct Seats {
        taken: u64,
        digest: u64,
    }

    const SEATS: u64 = 10;

    fn mix(digest: u64, payload: &[u8]) -> u64 {
        payload.iter().fold(digest ^ 0x9e37_79b9_7f4a_7c15, |d, b| {
            (d ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
        })
    }

    impl Aggregate for Seats {
        fn apply(&mut self, event: &StoredEvent) {
            self.taken += 1;
            self.digest = mix(self.digest, &event.payload);
        }
    }

    fn seat(seats: &Seats, owner: u64) -> NewEvent {
        let mut payload = owner.to_le_bytes().to_vec();
        payload.extend(seats.digest.to_le_bytes());
        NewEvent {
            event_type: "test.SeatTaken".into(),
            payload,
            metadata: Metadata::default(),
        }
    }

    fn taker(owner: u64) -> impl FnMut(&Seats, u64) -> Result<Vec<NewEvent>, &'static str> {
        move |seats, _| {
            if seats.taken < SEATS {
                Ok(vec![seat(seats, owner)])
            } else {
                Err("full")
            }
        }
    }

    /// Checks that every stored event was decided on exactly the events stored before it; returns the count.
    async fn check_stream(store: &dyn EventStore) -> u64 {
        let events = store.read_stream("seats", 0).await.expect("read");
        let mut seats = Seats::default();
        for e in &events {
            let seen = u64::from_le_bytes(e.payload[8..16].try_into().expect("digest"));
            assert_eq!(
                seen, seats.digest,
                "event {} was decided on a state that is not the stored one",
                e.version
            );
            seats.apply(e);
        }
        seats.taken
    }

    /// Runs `n` concurrent commands spread over `caches`; returns (committed, rejected).
    async fn race(caches: &[Arc<Aggregates<Seats>>], n: usize) -> (usize, usize) {
        let tasks: Vec<_> = (0..n)
            .map(|i| {
                let cache = caches[i % caches.len()].clone();
                tokio::spawn(async move { cache.execute("seats", taker(i as u64)).await })
            })
            .collect();
        let (mut committed, mut rejected) = (0, 0);
        for t in tasks {
            match t.await.expect("task").expect("store") {
                Outcome::Committed { .. } => committed += 1,
                Outcome::Rejected(_) => rejected += 1,
                Outcome::Unchanged { .. } => panic!("nothing is idempotent here"),
            }
        }
        (committed, rejected)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn queued_appends_never_pass_a_rule_twice() {
        let store: Arc<dyn EventStore> = Arc::new(SqliteStore::in_memory().await.expect("store"));
        let cache = Arc::new(Aggregates::new(store.clone()));
        assert_eq!(race(&[cache], 200).await, (SEATS as usize, 190));
        assert_eq!(check_stream(store.as_ref()).await, SEATS);
    }

    /// Two caches over one store stand for two processes: each one's queued appends fail when the other got
    /// there first, and it decides again on the stream as stored.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_processes_share_the_rule() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("log.db");
        let one: Arc<dyn EventStore> = Arc::new(SqliteStore::open(&path).await.expect("store"));
        let two: Arc<dyn EventStore> = Arc::new(SqliteStore::open(&path).await.expect("store"));
        let caches = [
            Arc::new(Aggregates::new(one.clone())),
            Arc::new(Aggregates::new(two)),
        ];
        // Both caches learn the stream first, so that each decides on a state the other makes stale.
        for cache in &caches {
            assert!(matches!(
                cache.execute("seats", taker(1000)).await.expect("store"),
                Outcome::Committed { .. }
            ));
        }
        assert_eq!(race(&caches, 200).await, (SEATS as usize - 2, 192));
        assert_eq!(check_stream(one.as_ref()).await, SEATS);
    }

    /// An append made behind the cache's back breaks its chain of queued appends: the cache reads the stream
    /// again and its state matches the store.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stale_cache_reads_the_stream_again() {
        let store: Arc<dyn EventStore> = Arc::new(SqliteStore::in_memory().await.expect("store"));
        let cache = Aggregates::new(store.clone());
        for _ in 0..3 {
            cache.execute("seats", taker(1000)).await.expect("store");
        }
        let (seen, _) = cache.load("seats").await.expect("load");
        store
            .append("seats", ExpectedVersion::Exact(3), vec![seat(&seen, 2000)])
            .await
            .expect("append");
        match cache.execute("seats", taker(1001)).await.expect("store") {
            Outcome::Committed { appended } => assert_eq!(appended.version, 5),
            _ => panic!("a seat is free"),
        }
        let (seats, version) = cache.load("seats").await.expect("load");
        assert_eq!((seats.taken, version), (5, 5));
        assert_eq!(check_stream(store.as_ref()).await, 5);
    }
}
