//! Delivery through both buses: the in-process bus over SQLite, and NATS JetStream over Postgres.
//!
//! Every NATS test uses a fresh JetStream stream (`NSML_TEST_<uuid>`) and a fresh Postgres database, both removed
//! afterwards. `NSML_TEST_POSTGRES=skip` or `NSML_TEST_NATS=skip` skips the NATS tests; either may instead hold
//! the URL of the server to use.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

use std::collections::HashSet;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use nsml_bus::{
    Bus, BusError, Delivery, InProcessBus, NatsBus, Relay, spawn_relay, subscribe_log,
    subscribe_log_of_types,
};
use nsml_eventstore::conformance::{
    new_event, new_events, postgres_admin_url, with_fresh_postgres,
};
use nsml_eventstore::{EventStore, ExpectedVersion, PostgresStore, SqliteStore, StoredEvent};
use tokio_util::sync::CancellationToken;

/// How long a test waits for something that should happen.
const PATIENCE: Duration = Duration::from_secs(15);

/// One log seen from two "processes": two store handles and two bus handles on the same log and bus.
struct Fixture {
    store: Arc<dyn EventStore>,
    other_store: Arc<dyn EventStore>,
    bus: Arc<dyn Bus>,
    other_bus: Arc<dyn Bus>,
}

type Log = BoxStream<'static, Result<Delivery, BusError>>;

async fn with_in_process<F>(scenario: F)
where
    F: FnOnce(Fixture) -> BoxFuture<'static, ()>,
{
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("log.db");
    let store = Arc::new(SqliteStore::open(&path).await.expect("open"));
    let other_store = Arc::new(SqliteStore::open(&path).await.expect("open"));
    let bus = InProcessBus::new();
    scenario(Fixture {
        store: store.clone(),
        other_store: other_store.clone(),
        bus: bus.clone(),
        other_bus: bus,
    })
    .await;
    store.close().await;
    other_store.close().await;
}

fn nats_url() -> Option<String> {
    match std::env::var("NSML_TEST_NATS") {
        Ok(v) if v == "skip" => None,
        Ok(v) if !v.trim().is_empty() => Some(v),
        _ => Some("nats://127.0.0.1:4222".to_owned()),
    }
}

async fn with_nats<F>(scenario: F)
where
    F: FnOnce(Fixture) -> BoxFuture<'static, ()>,
{
    let (Some(admin), Some(nats)) = (postgres_admin_url(), nats_url()) else {
        eprintln!("NSML_TEST_POSTGRES or NSML_TEST_NATS is skip: not running NATS tests");
        return;
    };
    with_fresh_postgres(&admin, |url| async move {
        let stream_name = format!("NSML_TEST_{}", uuid::Uuid::new_v4().simple());
        let store = Arc::new(PostgresStore::connect(&url).await.expect("connect"));
        let other_store = Arc::new(PostgresStore::connect(&url).await.expect("connect"));
        let bus = NatsBus::connect(&nats, &stream_name).await.expect("nats");
        let other_bus = NatsBus::connect(&nats, &stream_name).await.expect("nats");
        let outcome = AssertUnwindSafe(scenario(Fixture {
            store: store.clone(),
            other_store: other_store.clone(),
            bus,
            other_bus,
        }))
        .catch_unwind()
        .await;
        store.close().await;
        other_store.close().await;
        let client = async_nats::connect(&nats).await.expect("nats");
        if let Err(e) = async_nats::jetstream::new(client)
            .delete_stream(&stream_name)
            .await
        {
            eprintln!("deleting stream {stream_name}: {e}");
        }
        if let Err(panic) = outcome {
            std::panic::resume_unwind(panic);
        }
    })
    .await;
}

/// Generates each scenario once per bus.
macro_rules! scenarios {
    ($($name:ident),* $(,)?) => {
        mod in_process {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::with_in_process(|f| Box::pin(super::$name(f))).await;
                }
            )*
        }
        mod nats {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::with_nats(|f| Box::pin(super::$name(f))).await;
                }
            )*
        }
    };
}

scenarios!(
    catch_up_then_live_exactly_once,
    subscribe_after_position,
    duplicates_and_gaps_are_delivered_once_in_order,
    two_relays_racing_lose_nothing,
    a_typed_catch_up_reads_its_types_and_passes_over_the_rest,
    a_process_receives_each_live_event_once_for_all_its_subscribers,
);

async fn next_delivery(log: &mut Log) -> Delivery {
    match tokio::time::timeout(PATIENCE, log.next()).await {
        Ok(Some(Ok(delivery))) => delivery,
        Ok(Some(Err(e))) => panic!("subscription failed: {e}"),
        Ok(None) => panic!("subscription ended"),
        Err(_) => panic!("no delivery within {PATIENCE:?}"),
    }
}

/// Events until `CaughtUp`.
async fn catch_up(log: &mut Log) -> Vec<StoredEvent> {
    let mut events = Vec::new();
    loop {
        match next_delivery(log).await {
            Delivery::Event(e) => events.push(Arc::unwrap_or_clone(e)),
            Delivery::CaughtUp => return events,
            Delivery::Passed(p) => panic!("a subscription to every type passed over {p}"),
        }
    }
}

/// The next `n` live events.
async fn live(log: &mut Log, n: usize) -> Vec<StoredEvent> {
    let mut events = Vec::new();
    while events.len() < n {
        match next_delivery(log).await {
            Delivery::Event(e) => events.push(Arc::unwrap_or_clone(e)),
            Delivery::CaughtUp => panic!("a second CaughtUp"),
            Delivery::Passed(p) => panic!("passed over {p} while live"),
        }
    }
    events
}

/// Fails when anything else is delivered within a short while.
async fn nothing_more(log: &mut Log) {
    if let Ok(Some(item)) = tokio::time::timeout(Duration::from_millis(300), log.next()).await {
        panic!("unexpected delivery: {item:?}");
    }
}

fn positions(events: &[StoredEvent]) -> Vec<u64> {
    events.iter().map(|e| e.position).collect()
}

async fn append(store: &dyn EventStore, stream: &str, n: usize) -> Vec<StoredEvent> {
    let appended = store
        .append(stream, ExpectedVersion::Any, new_events(stream, n))
        .await
        .expect("append");
    store
        .read_all(appended.first_position - 1, n)
        .await
        .expect("read")
}

async fn outbox_drained(store: &dyn EventStore) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !store.outbox_peek(1).await.expect("peek").is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the outbox was not drained"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn catch_up_then_live_exactly_once(f: Fixture) {
    let mut stored = append(&*f.store, "quota-acme", 3).await;
    stored.extend(append(&*f.store, "sessions-acme/t1", 2).await);
    let cancel = CancellationToken::new();
    let relay = spawn_relay(f.store.clone(), f.bus.clone(), cancel.clone());
    outbox_drained(&*f.store).await;

    let mut log = subscribe_log(f.store.clone(), f.bus.clone(), 0)
        .await
        .expect("subscribe");
    let caught_up = catch_up(&mut log).await;
    assert_eq!(caught_up, stored);

    stored.extend(append(&*f.store, "quota-acme", 4).await);
    stored.extend(append(&*f.store, "leaderboard-acme", 1).await);
    // A relay that publishes twice (and old events again) must not cause duplicate deliveries.
    f.bus.publish(stored.clone()).await.expect("publish");
    f.other_bus.publish(stored.clone()).await.expect("publish");
    let live_events = live(&mut log, 5).await;
    assert_eq!(positions(&live_events), [6, 7, 8, 9, 10]);
    assert_eq!(live_events, stored[5..]);
    nothing_more(&mut log).await;

    outbox_drained(&*f.store).await;
    cancel.cancel();
    relay.await.expect("relay task");
}

/// The next `n` events of a bus subscription.
async fn bus_events(
    live: &mut BoxStream<'static, Arc<StoredEvent>>,
    n: usize,
) -> Vec<Arc<StoredEvent>> {
    let mut events = Vec::new();
    while events.len() < n {
        match tokio::time::timeout(PATIENCE, live.next()).await {
            Ok(Some(event)) => events.push(event),
            Ok(None) => panic!("the bus subscription ended"),
            Err(_) => panic!("no bus event within {PATIENCE:?}"),
        }
    }
    events
}

/// Every subscriber of a process gets each live event, published by another process, as one shared copy; once
/// they have all gone, a new subscriber gets live events again.
async fn a_process_receives_each_live_event_once_for_all_its_subscribers(f: Fixture) {
    let mut first = f.bus.subscribe().await.expect("subscribe");
    let mut second = f.bus.subscribe().await.expect("subscribe");
    let stored = append(&*f.store, "quota-acme", 3).await;
    f.other_bus.publish(stored.clone()).await.expect("publish");
    let (a, b) = (
        bus_events(&mut first, 3).await,
        bus_events(&mut second, 3).await,
    );
    let a_events: Vec<StoredEvent> = a.iter().map(|e| StoredEvent::clone(e)).collect();
    assert_eq!(a_events, stored);
    for (x, y) in a.iter().zip(&b) {
        assert!(
            Arc::ptr_eq(x, y),
            "event {} was received apart by each subscriber",
            x.position
        );
    }
    drop((first, second));
    // Published with nobody subscribed in this process: the process may stop listening. (A subscriber that
    // comes while the event is still on its way may get it too: a bus may deliver what it was handed just
    // before the subscription.)
    let unheard = append(&*f.store, "quota-acme", 1).await;
    f.other_bus.publish(unheard.clone()).await.expect("publish");
    let mut third = f.bus.subscribe().await.expect("subscribe");
    let later = append(&*f.store, "quota-acme", 2).await;
    f.other_bus.publish(later.clone()).await.expect("publish");
    let mut got: Vec<StoredEvent> = bus_events(&mut third, 2)
        .await
        .iter()
        .map(|e| StoredEvent::clone(e))
        .collect();
    if got.first() == unheard.first() {
        got.remove(0);
        got.extend(
            bus_events(&mut third, 1)
                .await
                .iter()
                .map(|e| StoredEvent::clone(e)),
        );
    }
    assert_eq!(got, later);
}

/// A subscription to some types catches up with those alone, says how far it passed over the rest, and then
/// delivers live events of every type.
async fn a_typed_catch_up_reads_its_types_and_passes_over_the_rest(f: Fixture) {
    const TYPES: &[&str] = &["nsml.v1.Wanted"];
    let events = (0..2500)
        .map(|i| {
            let wanted = i % 1000 == 7 || i == 2499;
            new_event(if wanted { TYPES[0] } else { "nsml.v1.Other" }, b"x")
        })
        .collect();
    let appended = f
        .store
        .append("s", ExpectedVersion::Any, events)
        .await
        .expect("append");
    assert_eq!(appended.last_position, 2500);
    // Every type, over pages each read while the one before is delivered: each event once, in order.
    let mut all = subscribe_log(f.store.clone(), f.bus.clone(), 0)
        .await
        .expect("subscribe");
    assert_eq!(
        positions(&catch_up(&mut all).await),
        (1..=2500).collect::<Vec<_>>()
    );
    drop(all);
    let mut log = subscribe_log_of_types(f.store.clone(), f.bus.clone(), 5, TYPES)
        .await
        .expect("subscribe");
    let mut deliveries = Vec::new();
    loop {
        match next_delivery(&mut log).await {
            Delivery::Event(e) => {
                assert_eq!(e.event_type, "nsml.v1.Wanted");
                deliveries.push(format!("event {}", e.position));
            }
            Delivery::Passed(p) => deliveries.push(format!("passed {p}")),
            Delivery::CaughtUp => break,
        }
    }
    assert_eq!(
        deliveries,
        ["event 8", "event 1008", "event 2008", "event 2500"],
        "the last page ends on a wanted event at the head, so nothing is passed over after it"
    );

    // Past the head, only other events: the catch-up passes over them.
    let more = append(&*f.store, "s", 3).await;
    let mut log = subscribe_log_of_types(f.store.clone(), f.bus.clone(), 2500, TYPES)
        .await
        .expect("subscribe");
    assert!(matches!(
        next_delivery(&mut log).await,
        Delivery::Passed(2503)
    ));
    assert!(matches!(next_delivery(&mut log).await, Delivery::CaughtUp));
    // Live, every type arrives.
    let live_events = append(&*f.store, "t", 2).await;
    f.bus.publish(live_events.clone()).await.expect("publish");
    assert_eq!(live(&mut log, 2).await, live_events);
    nothing_more(&mut log).await;
    assert_eq!(positions(&more), [2501, 2502, 2503]);
}

async fn subscribe_after_position(f: Fixture) {
    append(&*f.store, "s", 6).await;
    let mut log = subscribe_log(f.store.clone(), f.bus.clone(), 4)
        .await
        .expect("subscribe");
    assert_eq!(positions(&catch_up(&mut log).await), [5, 6]);
    let relay = Relay::spawn(f.store.clone(), f.bus.clone(), CancellationToken::new());
    append(&*f.store, "s", 2).await;
    relay.wake();
    assert_eq!(positions(&live(&mut log, 2).await), [7, 8]);
    nothing_more(&mut log).await;
    relay.into_handle().abort();
}

async fn duplicates_and_gaps_are_delivered_once_in_order(f: Fixture) {
    append(&*f.store, "s", 3).await;
    let mut log = subscribe_log(f.store.clone(), f.bus.clone(), 0)
        .await
        .expect("subscribe");
    assert_eq!(positions(&catch_up(&mut log).await), [1, 2, 3]);
    let more = append(&*f.store, "t", 4).await;
    // Out of order and repeated, as several relays may publish: 7 and 5 arrive before 4 and 6.
    f.bus
        .publish(vec![more[3].clone(), more[1].clone()])
        .await
        .expect("publish");
    f.other_bus
        .publish(vec![
            more[0].clone(),
            more[2].clone(),
            more[3].clone(),
            more[0].clone(),
        ])
        .await
        .expect("publish");
    assert_eq!(live(&mut log, 4).await, more);
    nothing_more(&mut log).await;
}

async fn two_relays_racing_lose_nothing(f: Fixture) {
    let mut log = subscribe_log(f.store.clone(), f.bus.clone(), 0)
        .await
        .expect("subscribe");
    assert!(catch_up(&mut log).await.is_empty());
    let cancel = CancellationToken::new();
    let relays = [
        spawn_relay(f.store.clone(), f.bus.clone(), cancel.clone()),
        spawn_relay(f.other_store.clone(), f.other_bus.clone(), cancel.clone()),
    ];
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let store = if w % 2 == 0 {
                f.store.clone()
            } else {
                f.other_store.clone()
            };
            tokio::spawn(async move {
                for r in 0..25 {
                    store
                        .append(
                            &format!("stream-{w}"),
                            ExpectedVersion::Any,
                            new_events(&format!("{w}-{r}"), 2),
                        )
                        .await
                        .expect("append");
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.expect("writer");
    }
    let events = live(&mut log, 200).await;
    let unique: HashSet<u64> = events.iter().map(|e| e.position).collect();
    assert_eq!(unique.len(), 200);
    assert_eq!(unique, (1..=200).collect());
    let ids: HashSet<&str> = events
        .iter()
        .map(|e| e.metadata.event_id.as_str())
        .collect();
    assert_eq!(ids.len(), 200);
    nothing_more(&mut log).await;
    outbox_drained(&*f.store).await;
    cancel.cancel();
    for relay in relays {
        relay.await.expect("relay task");
    }
}

/// A subscriber that falls behind the in-process bus's capacity gets the missed events from the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lagging_subscriber_reads_missed_events_from_the_store() {
    let store: Arc<dyn EventStore> = Arc::new(SqliteStore::in_memory().await.expect("open"));
    let bus = InProcessBus::with_capacity(8);
    let mut log = subscribe_log(store.clone(), bus.clone(), 0)
        .await
        .expect("subscribe");
    assert!(catch_up(&mut log).await.is_empty());
    let mut stored = Vec::new();
    for i in 0..10 {
        let events = append(&*store, &format!("s{i}"), 10).await;
        bus.publish(events.clone()).await.expect("publish");
        stored.extend(events);
    }
    assert_eq!(live(&mut log, 100).await, stored);
    nothing_more(&mut log).await;
}

/// A bus that refuses publishes while `failing` is set.
struct Flaky {
    inner: Arc<InProcessBus>,
    failing: AtomicBool,
    attempts: AtomicUsize,
}

#[async_trait::async_trait]
impl Bus for Flaky {
    async fn publish(&self, events: Vec<StoredEvent>) -> Result<(), BusError> {
        self.attempts.fetch_add(1, Ordering::SeqCst);
        if self.failing.load(Ordering::SeqCst) {
            return Err(BusError::Closed);
        }
        self.inner.publish(events).await
    }

    async fn subscribe(&self) -> Result<BoxStream<'static, Arc<StoredEvent>>, BusError> {
        self.inner.subscribe().await
    }
}

/// The relay keeps unpublished events in the outbox, retries, and stops when cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn relay_retries_failed_publishes_and_stops_on_cancel() {
    let store: Arc<dyn EventStore> = Arc::new(SqliteStore::in_memory().await.expect("open"));
    let bus = Arc::new(Flaky {
        inner: InProcessBus::new(),
        failing: AtomicBool::new(true),
        attempts: AtomicUsize::new(0),
    });
    let mut log = subscribe_log(store.clone(), bus.clone(), 0)
        .await
        .expect("subscribe");
    assert!(catch_up(&mut log).await.is_empty());
    let stored = append(&*store, "s", 3).await;
    let cancel = CancellationToken::new();
    let relay = spawn_relay(store.clone(), bus.clone(), cancel.clone());
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while bus.attempts.load(Ordering::SeqCst) < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the relay does not retry"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        store.outbox_peek(10).await.expect("peek"),
        stored,
        "events left the outbox before they were published"
    );
    bus.failing.store(false, Ordering::SeqCst);
    outbox_drained(&*store).await;
    // The subscription gets the events once, from the bus or from its store poll, whichever comes first.
    assert_eq!(live(&mut log, 3).await, stored);
    nothing_more(&mut log).await;
    cancel.cancel();
    tokio::time::timeout(PATIENCE, relay)
        .await
        .expect("the relay stops when cancelled")
        .expect("relay task");
}

/// Without a relay, live events still arrive: the subscription polls the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_arrive_from_the_store_when_no_relay_runs() {
    let store: Arc<dyn EventStore> = Arc::new(SqliteStore::in_memory().await.expect("open"));
    let bus = InProcessBus::new();
    append(&*store, "s", 2).await;
    let mut log = subscribe_log(store.clone(), bus.clone(), 0)
        .await
        .expect("subscribe");
    assert_eq!(positions(&catch_up(&mut log).await), [1, 2]);
    let stored = append(&*store, "s", 3).await;
    assert_eq!(live(&mut log, 3).await, stored);
    nothing_more(&mut log).await;
}

/// A bus whose live subscriptions end at once.
struct Ended;

#[async_trait::async_trait]
impl Bus for Ended {
    async fn publish(&self, _events: Vec<StoredEvent>) -> Result<(), BusError> {
        Ok(())
    }

    async fn subscribe(&self) -> Result<BoxStream<'static, Arc<StoredEvent>>, BusError> {
        Ok(futures::stream::empty().boxed())
    }
}

/// When the bus ends the live subscription, the subscription follows the store alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn subscription_follows_the_store_when_the_bus_ends() {
    let store: Arc<dyn EventStore> = Arc::new(SqliteStore::in_memory().await.expect("open"));
    let mut log = subscribe_log(store.clone(), Arc::new(Ended), 0)
        .await
        .expect("subscribe");
    assert!(catch_up(&mut log).await.is_empty());
    let mut stored = Vec::new();
    for i in 0..3 {
        stored.extend(append(&*store, &format!("s{i}"), 2).await);
    }
    let started = tokio::time::Instant::now();
    assert_eq!(live(&mut log, 6).await, stored);
    // Followed from the store: well before the bus's 30 s heartbeats would say anything, however busy the
    // machine.
    assert!(started.elapsed() < Duration::from_secs(20));
    nothing_more(&mut log).await;
}
