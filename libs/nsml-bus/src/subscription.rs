//! Subscriptions to the log: catch-up from the store, then live events from the bus, each event exactly once.

use std::collections::{BTreeSet, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, Sleep};

use futures::StreamExt;
use futures::stream::BoxStream;
use nsml_eventstore::{EventStore, SharedPage, StoreError, StoredEvent, TypedPage};

use crate::{Bus, BusError};

/// How many events one store read takes, while catching up or filling a gap.
const PAGE: usize = 1000;

/// What a log subscription yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// The next event for the subscriber (each event once per subscription), shared with the process's other
    /// subscribers.
    Event(Arc<StoredEvent>),
    /// Every event stored when the subscription started (of its types, for a subscription to some) has been
    /// delivered; live events follow. Sent once.
    CaughtUp,
    /// Of a subscription to some types only: every event of those types up to this position has been
    /// delivered, and the others up to it were passed over. A subscriber that counts how far it has read the log
    /// counts this far.
    Passed(u64),
}

/// Subscribes to the log after `after_position`.
///
/// Yields the stored events with position > `after_position` (read from the store in pages), then one
/// [`Delivery::CaughtUp`], then live events from the bus. The bus is subscribed to before the catch-up starts, so
/// no event falls between the two. Each event is delivered exactly once per subscription: duplicates from the bus
/// are dropped, and when a live event shows a gap in positions (events still in flight from another relay, or
/// missed by a subscriber that fell behind), the missing events are read from the store and delivered first. If
/// the store does not have them yet, the live event is delivered ahead of them and they follow when they arrive.
///
/// The subscription also checks the store for events past everything delivered every
/// [`STORE_POLL`] (so an event the bus never carries, e.g. while no relay runs, still arrives). When the bus
/// fails — its live subscription ends, or a store poll finds an event that the bus should have brought and did
/// not (stored after the bus was subscribed to, and `BUS_MISS_AGE` ago) — the subscription follows the store
/// alone, every 50 ms, and subscribes to the bus again at most once a second until the bus delivers again. A bus
/// that went silent (a NATS server restarted, its stream lost) therefore costs a poll period, not the client's
/// heartbeat timeouts. A failed store read is yielded as an error item and retried after a pause; the stream
/// itself does not end.
pub async fn subscribe_log(
    store: Arc<dyn EventStore>,
    bus: Arc<dyn Bus>,
    after_position: u64,
) -> Result<BoxStream<'static, Result<Delivery, BusError>>, BusError> {
    subscribe(store, bus, after_position, None).await
}

/// As [`subscribe_log`], for a subscriber that uses only events of `types`: the catch-up reads only those from
/// the store ([`EventStore::read_all_of_types_shared`]) and says how far it has passed over the rest
/// ([`Delivery::Passed`]), so that a long log of other events costs it little. Live events are delivered
/// whatever their type, as they come.
pub async fn subscribe_log_of_types(
    store: Arc<dyn EventStore>,
    bus: Arc<dyn Bus>,
    after_position: u64,
    types: &'static [&'static str],
) -> Result<BoxStream<'static, Result<Delivery, BusError>>, BusError> {
    subscribe(store, bus, after_position, Some(types)).await
}

async fn subscribe(
    store: Arc<dyn EventStore>,
    bus: Arc<dyn Bus>,
    after_position: u64,
    types: Option<&'static [&'static str]>,
) -> Result<BoxStream<'static, Result<Delivery, BusError>>, BusError> {
    let subscribed_at_ms = now_ms();
    let live = bus.subscribe().await?;
    let subscription = LogSubscription {
        store,
        bus,
        live: Some(live),
        bus_ok: true,
        subscribed_at_ms,
        next_resubscribe: Instant::now(),
        delivered: Delivered::after(after_position),
        types,
        prefetched: None,
        ready: VecDeque::new(),
        phase: Phase::CatchingUp,
        next_poll: Box::pin(tokio::time::sleep(STORE_POLL)),
        failed: false,
    };
    Ok(futures::stream::unfold(subscription, |mut s| async move {
        s.next().await.map(|item| (item, s))
    })
    .boxed())
}

/// How often a live subscription checks the store for events the bus has not brought.
pub const STORE_POLL: Duration = Duration::from_millis(500);
/// How often a subscription whose bus ended reads the store.
const STORE_POLL_WITHOUT_BUS: Duration = Duration::from_millis(50);
/// Pause after a failed store read.
const RETRY_PAUSE: Duration = Duration::from_millis(200);
/// How long after it was stored an event that the bus has not delivered counts as missed by the bus. Relays
/// publish within milliseconds; this leaves room for a busy machine.
pub const BUS_MISS_AGE: Duration = Duration::from_millis(250);
/// How often a subscription whose bus failed subscribes to it again.
const RESUBSCRIBE_EVERY: Duration = Duration::from_secs(1);

/// Milliseconds since the Unix epoch, the clock of events' `recorded_at_ms`.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Where a subscription is.
enum Phase {
    /// Reading stored events from the store.
    CatchingUp,
    /// The catch-up ended; `CaughtUp` is next.
    CaughtUp,
    /// Following the bus (and the store, now and then).
    Live,
}

/// Which positions were delivered, in bounded memory: everything up to the watermark, and the few above it
/// that arrived ahead of a gap.
#[derive(Debug)]
struct Delivered {
    watermark: u64,
    above: BTreeSet<u64>,
}

impl Delivered {
    fn after(position: u64) -> Self {
        Delivered {
            watermark: position,
            above: BTreeSet::new(),
        }
    }

    fn contains(&self, position: u64) -> bool {
        position <= self.watermark || self.above.contains(&position)
    }

    /// Records a delivery; returns false when the position was already delivered.
    fn insert(&mut self, position: u64) -> bool {
        if self.contains(position) {
            return false;
        }
        if position == self.watermark + 1 {
            self.watermark = position;
            while self.above.remove(&(self.watermark + 1)) {
                self.watermark += 1;
            }
        } else {
            self.above.insert(position);
        }
        true
    }

    /// Counts every position up to `position` as delivered.
    fn pass_through(&mut self, position: u64) {
        if position <= self.watermark {
            return;
        }
        self.watermark = position;
        self.above = self.above.split_off(&(position + 1));
        while self.above.remove(&(self.watermark + 1)) {
            self.watermark += 1;
        }
    }
}

struct LogSubscription {
    store: Arc<dyn EventStore>,
    bus: Arc<dyn Bus>,
    /// The bus subscription; `None` once the bus ended it, until a new one is made.
    live: Option<BoxStream<'static, Arc<StoredEvent>>>,
    /// The bus is trusted to bring live events: the store is polled every [`STORE_POLL`] rather than
    /// every [`STORE_POLL_WITHOUT_BUS`]. Cleared when the bus fails, set again by its next event.
    bus_ok: bool,
    /// When (wall clock, as events record it) the current bus subscription was made: the bus can only be
    /// blamed for events stored after it.
    subscribed_at_ms: i64,
    /// The earliest time the bus may be subscribed to again.
    next_resubscribe: Instant,
    delivered: Delivered,
    /// The types the catch-up reads; `None` for all.
    types: Option<&'static [&'static str]>,
    /// The catch-up's next page, read while the one before it is delivered.
    prefetched: Option<tokio::task::JoinHandle<Result<SharedPage, StoreError>>>,
    ready: VecDeque<Delivery>,
    phase: Phase,
    /// When the store is next read while live. One timer for the whole subscription, moved only when a poll
    /// happens: every live event would otherwise set up and tear down a timer of its own.
    next_poll: Pin<Box<Sleep>>,
    /// The last store read failed: pause before the next one.
    failed: bool,
}

/// What woke a live subscription.
enum Wake {
    Event(Arc<StoredEvent>),
    BusEnded,
    Poll,
}

impl LogSubscription {
    async fn next(&mut self) -> Option<Result<Delivery, BusError>> {
        loop {
            if let Some(delivery) = self.ready.pop_front() {
                return Some(Ok(delivery));
            }
            if std::mem::take(&mut self.failed) {
                tokio::time::sleep(RETRY_PAUSE).await;
            }
            let step = match self.phase {
                Phase::CatchingUp => self.catch_up_page().await,
                Phase::CaughtUp => {
                    self.phase = Phase::Live;
                    return Some(Ok(Delivery::CaughtUp));
                }
                Phase::Live => self.follow().await,
            };
            if let Err(error) = step {
                self.failed = true;
                return Some(Err(error));
            }
        }
    }

    /// Queues the next page of stored events (of the subscription's types) and moves on to `CaughtUp` after
    /// the last one. While a full page is delivered, the one after it is read: the subscriber's work and the
    /// store's overlap.
    async fn catch_up_page(&mut self) -> Result<(), BusError> {
        let after = self.delivered.watermark;
        let page = match self.prefetched.take() {
            Some(ahead) => match ahead.await {
                Ok(page) => page?,
                // The read ahead panicked or was cancelled: read the page again.
                Err(_) => read_page(self.store.clone(), self.types, after).await?,
            },
            None => read_page(self.store.clone(), self.types, after).await?,
        };
        let full = page.events.len() == PAGE;
        match self.types {
            Some(_) => self.queue_typed(page),
            None => {
                for event in page.events {
                    if self.delivered.insert(event.position) {
                        self.ready.push_back(Delivery::Event(event));
                    }
                }
            }
        }
        if full {
            let (store, types, after) = (self.store.clone(), self.types, self.delivered.watermark);
            self.prefetched = Some(tokio::spawn(read_page(store, types, after)));
        } else {
            self.phase = Phase::CaughtUp;
        }
        Ok(())
    }

    /// Waits for the next live event or store poll, and queues what it brings.
    async fn follow(&mut self) -> Result<(), BusError> {
        let wake = match self.live.as_mut() {
            Some(live) => tokio::select! {
                biased;
                event = live.next() => event.map_or(Wake::BusEnded, Wake::Event),
                () = self.next_poll.as_mut() => Wake::Poll,
            },
            None => {
                self.next_poll.as_mut().await;
                Wake::Poll
            }
        };
        match wake {
            Wake::Event(event) => {
                if !self.bus_ok {
                    tracing::info!("the bus delivers again; polling the store less often");
                    self.bus_ok = true;
                }
                self.accept(event).await
            }
            Wake::BusEnded => {
                self.live = None;
                self.bus_failed("the bus ended the live subscription");
                self.next_poll.as_mut().reset(Instant::now());
                Ok(())
            }
            Wake::Poll => {
                if self.live.is_none() {
                    self.resubscribe().await;
                }
                // One page at a time, so a long backlog is not queued in memory: a full page polls again at once.
                let (len, missed) = self.poll_store_page().await?;
                if missed {
                    self.bus_failed("the bus missed stored events");
                    self.resubscribe().await;
                }
                let every = if self.bus_ok {
                    STORE_POLL
                } else {
                    STORE_POLL_WITHOUT_BUS
                };
                let next = if len == PAGE {
                    Instant::now()
                } else {
                    Instant::now() + every
                };
                self.next_poll.as_mut().reset(next);
                Ok(())
            }
        }
    }

    /// Stops trusting the bus until it delivers again.
    fn bus_failed(&mut self, why: &str) {
        if std::mem::take(&mut self.bus_ok) {
            tracing::warn!(
                "{why}; following the store every {STORE_POLL_WITHOUT_BUS:?} until it delivers again"
            );
        }
    }

    /// Replaces the bus subscription with a new one, at most once every [`RESUBSCRIBE_EVERY`]; on failure the
    /// subscription goes on without one and tries again later.
    async fn resubscribe(&mut self) {
        if Instant::now() < self.next_resubscribe {
            return;
        }
        self.next_resubscribe = Instant::now() + RESUBSCRIBE_EVERY;
        let at = now_ms();
        match self.bus.subscribe().await {
            Ok(live) => {
                self.live = Some(live);
                self.subscribed_at_ms = at;
            }
            Err(error) => {
                self.live = None;
                tracing::debug!(%error, "subscribing to the bus again failed; retrying");
            }
        }
    }

    /// Queues a page of stored events of the subscription's types, and then how far the store looked for them.
    fn queue_typed(&mut self, page: SharedPage) {
        for event in page.events {
            if !self.delivered.contains(event.position) {
                self.delivered.pass_through(event.position);
                self.ready.push_back(Delivery::Event(event));
            }
        }
        if page.through > self.delivered.watermark {
            self.delivered.pass_through(page.through);
            self.ready.push_back(Delivery::Passed(page.through));
        }
    }

    /// Queues the next page of stored events after the watermark that were not delivered yet; returns the page
    /// size, and whether the page held an event that the bus should have delivered by now: stored after the bus
    /// was subscribed to, over [`BUS_MISS_AGE`] ago, and not yet delivered.
    async fn poll_store_page(&mut self) -> Result<(usize, bool), BusError> {
        let page = self.store.read_all(self.delivered.watermark, PAGE).await?;
        let len = page.len();
        let overdue = now_ms().saturating_sub(i64::try_from(BUS_MISS_AGE.as_millis()).unwrap_or(0));
        let mut missed = false;
        for event in page {
            if self.delivered.insert(event.position) {
                let at = event.metadata.recorded_at_ms;
                missed |= at > self.subscribed_at_ms && at < overdue;
                self.ready.push_back(Delivery::Event(Arc::new(event)));
            }
        }
        Ok((len, missed))
    }

    /// Takes a live event: drops it if delivered already, otherwise queues it, after whatever the store has of
    /// the positions missing below it.
    async fn accept(&mut self, event: Arc<StoredEvent>) -> Result<(), BusError> {
        let position = event.position;
        if self.delivered.contains(position) {
            return Ok(());
        }
        if position > self.delivered.watermark + 1 {
            // If this read fails the event is not queued; it is in the store, so the next store poll delivers it.
            self.fill_gap_below(position).await?;
        }
        if self.delivered.insert(position) {
            self.ready.push_back(Delivery::Event(event));
        }
        Ok(())
    }

    /// Queues the stored events between the watermark and `position` that were not delivered yet.
    async fn fill_gap_below(&mut self, position: u64) -> Result<(), BusError> {
        let mut after = self.delivered.watermark;
        while after + 1 < position {
            let want = usize::try_from(position - after - 1).map_or(PAGE, |n| n.min(PAGE));
            let page = self.store.read_all(after, want).await?;
            let short = page.len() < want;
            for stored in page {
                if stored.position >= position {
                    return Ok(());
                }
                after = stored.position;
                if self.delivered.insert(stored.position) {
                    self.ready.push_back(Delivery::Event(Arc::new(stored)));
                }
            }
            if short {
                break;
            }
        }
        Ok(())
    }
}

impl Drop for LogSubscription {
    fn drop(&mut self) {
        if let Some(ahead) = self.prefetched.take() {
            ahead.abort();
        }
    }
}

/// Up to [`PAGE`] events after `after`: of `types` (with how far the store looked for them), or of every type.
async fn read_page(
    store: Arc<dyn EventStore>,
    types: Option<&'static [&'static str]>,
    after: u64,
) -> Result<SharedPage, StoreError> {
    match types {
        Some(types) => store.read_all_of_types_shared(types, after, PAGE).await,
        None => {
            let events = store.read_all(after, PAGE).await?;
            let through = events.last().map_or(after, |e| e.position);
            Ok(TypedPage { events, through }.into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Delivered;

    #[test]
    fn delivered_tracks_a_watermark_and_positions_above_it() {
        let mut d = Delivered::after(3);
        assert!(d.contains(1) && d.contains(3) && !d.contains(4));
        assert!(!d.insert(2));
        assert!(d.insert(6));
        assert!(d.insert(5));
        assert_eq!(d.watermark, 3);
        assert!(!d.insert(6));
        assert!(d.insert(4));
        assert_eq!(d.watermark, 6);
        assert!(d.above.is_empty());
    }

    #[test]
    fn passing_through_a_position_counts_everything_below_it() {
        let mut d = Delivered::after(3);
        assert!(d.insert(6) && d.insert(9) && d.insert(12));
        d.pass_through(8);
        assert_eq!(d.watermark, 9, "9 was delivered already, right above 8");
        assert_eq!(d.above.iter().copied().collect::<Vec<_>>(), [12]);
        d.pass_through(2);
        assert_eq!(d.watermark, 9);
        assert!(d.contains(7) && !d.contains(10));
        d.pass_through(20);
        assert!(d.above.is_empty() && d.watermark == 20);
    }
}
