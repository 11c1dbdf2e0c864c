//! Catch-ups that read the log at the same time share one read of it.
//!
//! At start-up every read model of a process reads the whole log, each the types it folds
//! ([`EventStore::read_all_of_types_shared`]). Over SQLite each of those reads walks every row of the log, and events
//! that several read models fold are read and decoded once for each. A [`SharedScan`] reads the log once, in
//! chunks of [`CHUNK`] positions, and hands every reader the events of its types from the chunks it passes: the
//! same events, each behind one `Arc`, never a copy per reader.
//!
//! While a reader reads a chunk, the next [`READ_AHEAD`] are read from the store too (when the log has filled
//! them), so that the reads of the log run beside the readers' own work rather than between their pages.
//!
//! Readers are paced: none reads more than [`WINDOW`] chunks ahead of the slowest one still reading, so the
//! chunks held in memory are only those between the slowest and the fastest (a few tens of megabytes). A reader
//! that has not asked for [`STALE`] is not waited for. A chunk the log has not filled yet (at the head) is not
//! shared: its reader reads the rest from the store itself, as without the scan, and leaves the scan.
//!
//! Readers are told apart by the address of the type list they ask with: a read model's list is a constant of
//! its own. Two readers that share a list (or a reader that comes back after being dropped as stale) only cost a
//! chunk read again from the store; what each reader gets is the same either way.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use nsml_eventstore::{EventStore, SharedPage, StoreError, StoredEvent};
use tokio::sync::{Notify, OnceCell};

/// Positions per chunk: the subscriptions' page, so that a page of a reader's types rarely spans many chunks.
pub(crate) const CHUNK: u64 = 1000;

/// How many chunks a reader may read ahead of the slowest reader.
pub(crate) const WINDOW: u64 = 32;

/// How many chunks past the one a reader reads are read at the same time (when the log has filled them). On the
/// 2-core machine a 6 M-event log booted, against the build before (a copy of each event per reader, nothing read
/// ahead), in 1.03× its time with no chunk ahead, 0.93× with one, 0.86× with two and 0.90× with three (medians of
/// alternated rounds).
pub(crate) const READ_AHEAD: u64 = 2;

/// How long a reader may go without asking before the others stop waiting for it.
pub(crate) const STALE: Duration = Duration::from_secs(1);

/// How often a reader waiting for the slowest looks again, when no reader's move woke it.
const PACE_POLL: Duration = Duration::from_millis(5);

/// A chunk of the log: its events in position order, each with the index of its type in `types`.
struct Chunk {
    events: Vec<Arc<StoredEvent>>,
    kinds: Vec<u16>,
    types: Vec<String>,
}

impl Chunk {
    fn new(events: Vec<Arc<StoredEvent>>) -> Self {
        let mut types: Vec<String> = Vec::new();
        let kinds = events
            .iter()
            .map(|e| {
                let kind = match types.iter().position(|t| *t == e.event_type) {
                    Some(i) => i,
                    None => {
                        types.push(e.event_type.clone());
                        types.len() - 1
                    }
                };
                u16::try_from(kind).unwrap_or(u16::MAX)
            })
            .collect();
        Self {
            events,
            kinds,
            types,
        }
    }

    /// Appends to `out` the events of `wanted` types with a position above `after`, until `out` holds `limit`;
    /// returns the position of the last one taken when `out` is full.
    fn take(
        &self,
        wanted: &[&str],
        after: u64,
        out: &mut Vec<Arc<StoredEvent>>,
        limit: usize,
    ) -> Option<u64> {
        let wanted: Vec<bool> = self
            .types
            .iter()
            .map(|t| wanted.contains(&t.as_str()))
            .collect();
        for (event, kind) in self.events.iter().zip(&self.kinds) {
            if event.position > after && wanted.get(usize::from(*kind)) == Some(&true) {
                out.push(Arc::clone(event));
                if out.len() >= limit {
                    return Some(event.position);
                }
            }
        }
        None
    }
}

/// Reads chunk `index` from the store: the log's positions `index * CHUNK + 1 ..= (index + 1) * CHUNK`.
async fn read_chunk(inner: &Arc<dyn EventStore>, index: u64) -> Result<Arc<Chunk>, StoreError> {
    let end = (index + 1) * CHUNK;
    let events = inner.read_all(index * CHUNK, CHUNK as usize).await?;
    let events = events
        .into_iter()
        .filter(|e| e.position <= end)
        .map(Arc::new)
        .collect();
    Ok(Arc::new(Chunk::new(events)))
}

type Slot = Arc<OnceCell<Arc<Chunk>>>;

#[derive(Default)]
struct State {
    /// Reader (the address of its type list) → the chunk it reads now, and when it last asked.
    readers: HashMap<usize, (u64, Instant)>,
    /// Chunks read or being read, by index.
    chunks: BTreeMap<u64, Slot>,
    /// The log's head as last read: chunks up to it are complete.
    head: u64,
}

impl State {
    /// The chunk of the slowest reader that asked within [`STALE`], if any.
    fn slowest(&self, now: Instant) -> Option<u64> {
        self.readers
            .values()
            .filter(|(_, at)| now.duration_since(*at) < STALE)
            .map(|(chunk, _)| *chunk)
            .min()
    }

    /// Drops the chunks every reader still reading has passed (all of them when none is), and the oldest beyond
    /// what pacing should ever hold.
    fn evict(&mut self, now: Instant) {
        match self.slowest(now) {
            Some(slowest) => self.chunks = self.chunks.split_off(&slowest),
            None => self.chunks.clear(),
        }
        while self.chunks.len() as u64 > 4 * WINDOW {
            self.chunks.pop_first();
        }
    }
}

/// One read of the log shared by the catch-ups running at the same time (see the module's doc).
#[derive(Default)]
pub(crate) struct SharedScan {
    state: Mutex<State>,
    moved: Notify,
}

impl SharedScan {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// [`EventStore::read_all_of_types_shared`] on `inner`, from the shared chunks wherever the log has filled
    /// them.
    pub(crate) async fn read_all_of_types_shared(
        &self,
        inner: &Arc<dyn EventStore>,
        types: &[&str],
        after_position: u64,
        limit: usize,
    ) -> Result<SharedPage, StoreError> {
        if limit == 0 || types.is_empty() {
            return inner
                .read_all_of_types_shared(types, after_position, limit)
                .await;
        }
        let reader = types.as_ptr() as usize;
        let mut events = Vec::with_capacity(limit.min(CHUNK as usize));
        let mut after = after_position;
        loop {
            let index = after / CHUNK;
            let Some(chunk) = self.chunk(inner, reader, index).await? else {
                // The head's chunk: the rest from the store, as without the scan.
                self.leave(reader);
                let rest = inner
                    .read_all_of_types_shared(types, after, limit - events.len())
                    .await?;
                events.extend(rest.events);
                return Ok(SharedPage {
                    events,
                    through: rest.through,
                });
            };
            if let Some(through) = chunk.take(types, after, &mut events, limit) {
                return Ok(SharedPage { events, through });
            }
            after = (index + 1) * CHUNK;
        }
    }

    /// Chunk `index` once `reader` may read it (see [`WINDOW`]); `None` when the log has not filled it yet. The
    /// [`READ_AHEAD`] chunks after it start being read as well, those the log has filled.
    async fn chunk(
        &self,
        inner: &Arc<dyn EventStore>,
        reader: usize,
        index: u64,
    ) -> Result<Option<Arc<Chunk>>, StoreError> {
        let end = (index + 1) * CHUNK;
        let mut head = self.state().head;
        if head < end {
            head = inner.head_position().await?;
            let mut state = self.state();
            state.head = state.head.max(head);
            if head < end {
                return Ok(None);
            }
        }
        self.pace(reader, index).await;
        let (slot, ahead) = {
            let mut state = self.state();
            let slot = state.chunks.entry(index).or_default().clone();
            let head = state.head;
            let mut ahead = Vec::new();
            for next in
                (index + 1..=index + READ_AHEAD).take_while(|next| head >= (next + 1) * CHUNK)
            {
                if let std::collections::btree_map::Entry::Vacant(e) = state.chunks.entry(next) {
                    ahead.push((next, e.insert(Slot::default()).clone()));
                }
            }
            (slot, ahead)
        };
        for (next, slot) in ahead {
            let inner = inner.clone();
            // A failed read here is read again by the reader that gets to the chunk.
            tokio::spawn(async move {
                slot.get_or_try_init(|| read_chunk(&inner, next))
                    .await
                    .map(drop)
            });
        }
        let chunk = slot
            .get_or_try_init(|| read_chunk(inner, index))
            .await?
            .clone();
        Ok(Some(chunk))
    }

    /// Records that `reader` reads chunk `index`, and waits while it is more than [`WINDOW`] chunks ahead of the
    /// slowest reader.
    async fn pace(&self, reader: usize, index: u64) {
        loop {
            let notified = self.moved.notified();
            let ahead = {
                let now = Instant::now();
                let mut state = self.state();
                let moved =
                    state.readers.insert(reader, (index, now)).map(|(i, _)| i) != Some(index);
                state.evict(now);
                if moved {
                    self.moved.notify_waiters();
                }
                state.slowest(now).is_some_and(|s| index > s + WINDOW)
            };
            if !ahead {
                return;
            }
            let _ = tokio::time::timeout(PACE_POLL, notified).await;
        }
    }

    /// `reader` reads no more chunks: the others stop waiting for it.
    fn leave(&self, reader: usize) {
        let mut state = self.state();
        state.readers.remove(&reader);
        state.evict(Instant::now());
        drop(state);
        self.moved.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use nsml_eventstore::{EventStore, ExpectedVersion, Metadata, NewEvent, SqliteStore};

    use super::{CHUNK, READ_AHEAD, SharedScan};

    const A: &[&str] = &["test.A"];
    const B: &[&str] = &["test.B", "test.C"];
    const NONE: &[&str] = &["test.Never"];

    fn event(kind: &str, i: u64) -> NewEvent {
        NewEvent {
            event_type: kind.into(),
            payload: i.to_le_bytes().to_vec(),
            metadata: Metadata::default(),
        }
    }

    /// A log of `n` events at positions 1..=n, event i of type A, B, C, B as i is 0, 1, 2, 3 modulo 4.
    async fn log(n: u64) -> Arc<dyn EventStore> {
        let store: Arc<dyn EventStore> = Arc::new(SqliteStore::in_memory().await.expect("store"));
        let kinds = ["test.A", "test.B", "test.C", "test.B"];
        for batch in (1..=n).collect::<Vec<_>>().chunks(500) {
            let events = batch
                .iter()
                .map(|i| event(kinds[(*i % 4) as usize], *i))
                .collect();
            store
                .append("s", ExpectedVersion::Any, events)
                .await
                .expect("append");
        }
        store
    }

    /// Reads every page of `types` as a subscription does, through `scan` (or from `store` itself when `None`);
    /// returns the events' positions and the `through` of every page.
    async fn catch_up(
        scan: Option<&SharedScan>,
        store: &Arc<dyn EventStore>,
        types: &[&str],
        limit: usize,
    ) -> (Vec<u64>, Vec<u64>) {
        let (mut positions, mut throughs, mut after) = (Vec::new(), Vec::new(), 0);
        loop {
            let page = match scan {
                Some(scan) => {
                    scan.read_all_of_types_shared(store, types, after, limit)
                        .await
                }
                None => store.read_all_of_types_shared(types, after, limit).await,
            }
            .expect("read");
            positions.extend(page.events.iter().map(|e| e.position));
            throughs.push(page.through);
            if page.events.len() < limit {
                return (positions, throughs);
            }
            after = page.through;
        }
    }

    /// Every reader gets exactly what the store's own typed read gives, page for page, whether readers run
    /// together or alone, at any limit, up to a head that falls inside a chunk.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn readers_get_what_the_store_gives_them() {
        let n = 7 * CHUNK + 123;
        let store = log(n).await;
        for (types, limit) in [(A, 1000), (B, 1000), (A, 7), (B, 333), (NONE, 1000)] {
            let want = catch_up(None, &store, types, limit).await;
            let scan = SharedScan::default();
            let got = catch_up(Some(&scan), &store, types, limit).await;
            assert_eq!(got, want, "{types:?} by {limit}");
        }
        // Together: three readers at once over one scan.
        let scan = Arc::new(SharedScan::default());
        let together: Vec<_> = [A, B, NONE]
            .into_iter()
            .map(|types| {
                let (scan, store) = (scan.clone(), store.clone());
                tokio::spawn(async move { catch_up(Some(&scan), &store, types, 1000).await })
            })
            .collect();
        let mut got = Vec::new();
        for t in together {
            got.push(t.await.expect("reader").0);
        }
        // Event i (at position i) is of type A when i is a multiple of 4, else of B or C.
        let a: Vec<u64> = (1..=n).filter(|i| i % 4 == 0).collect();
        let b_or_c: Vec<u64> = (1..=n).filter(|i| i % 4 != 0).collect();
        assert_eq!(got, [a, b_or_c, Vec::new()]);
        let state = scan.state();
        assert!(state.readers.is_empty(), "every reader left at the head");
        assert!(
            state.chunks.is_empty(),
            "and no chunk is kept once none reads"
        );
    }

    /// Readers of the same events get the same ones: the chunk's, not a copy each.
    #[tokio::test]
    async fn readers_share_the_events_they_both_read() {
        const B_ONLY: &[&str] = &["test.B"];
        let store = log(3 * CHUNK).await;
        let scan = SharedScan::default();
        let b_or_c = scan
            .read_all_of_types_shared(&store, B, 0, 100)
            .await
            .expect("read");
        let b = scan
            .read_all_of_types_shared(&store, B_ONLY, 0, 100)
            .await
            .expect("read");
        let b_of_first: Vec<_> = b_or_c
            .events
            .iter()
            .filter(|e| e.event_type == "test.B")
            .collect();
        assert!(b_of_first.len() > 10);
        for (first, second) in b_of_first.into_iter().zip(&b.events) {
            assert!(
                Arc::ptr_eq(first, second),
                "event {} was copied",
                first.position
            );
        }
    }

    /// Reading a chunk starts reading the next [`READ_AHEAD`] ones the log has filled, and never the head's.
    #[tokio::test]
    async fn the_next_chunks_are_read_ahead() {
        let store = log((READ_AHEAD + 1) * CHUNK + 10).await;
        let scan = SharedScan::default();
        let first = scan
            .read_all_of_types_shared(&store, A, 0, 10)
            .await
            .expect("read");
        assert_eq!(first.events.len(), 10);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !(1..=READ_AHEAD).all(|i| {
            scan.state()
                .chunks
                .get(&i)
                .is_some_and(|chunk| chunk.initialized())
        }) {
            assert!(
                std::time::Instant::now() < deadline,
                "chunks 1..={READ_AHEAD} were not read ahead"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(
            !scan.state().chunks.contains_key(&(READ_AHEAD + 1)),
            "the head's chunk is left to the store"
        );
    }

    /// A reader far ahead waits for the slowest, unless the slowest stops asking: then it goes on alone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reader_ahead_waits_only_for_readers_still_reading() {
        let store = log(3 * super::WINDOW * CHUNK).await;
        let scan = Arc::new(SharedScan::default());
        // The slow reader reads its first page and stops there.
        let first = scan
            .read_all_of_types_shared(&store, B, 0, 10)
            .await
            .expect("read");
        assert_eq!(first.events.len(), 10);
        let started = std::time::Instant::now();
        let (positions, _) = catch_up(Some(&scan), &store, A, 1000).await;
        assert_eq!(
            positions,
            (1..=3 * super::WINDOW * CHUNK)
                .filter(|i| i % 4 == 0)
                .collect::<Vec<_>>()
        );
        assert!(
            started.elapsed() >= super::STALE,
            "the fast reader waited for the slow one until it went stale"
        );
        assert!(
            scan.state().chunks.len() as u64 <= 4 * super::WINDOW,
            "the chunks held stay bounded"
        );
    }
}
