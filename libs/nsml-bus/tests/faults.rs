//! The bus under faults: a subscription whose bus goes silent or ends subscribes again and keeps delivering
//! from the store meanwhile, and a NATS stream that was lost is made again by the next publish, so that a NATS
//! server restarted on an empty store heals without a restart of the platform.
//!
//! The NATS tests start a `nats-server` of their own on a free port (never the machine's), and are skipped when
//! `NSML_TEST_NATS=skip`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use nsml_bus::{Bus, BusError, Delivery, InProcessBus, NatsBus, spawn_relay, subscribe_log};
use nsml_eventstore::conformance::new_events;
use nsml_eventstore::{EventStore, ExpectedVersion, SqliteStore, StoredEvent};
use tokio_util::sync::CancellationToken;

/// How long a test waits for something that should happen.
const PATIENCE: Duration = Duration::from_secs(30);

/// A bus whose first subscription never delivers anything (a consumer that went silent) and whose later ones
/// are the in-process bus's.
struct SilentFirst {
    inner: Arc<InProcessBus>,
    subscribed: AtomicUsize,
}

#[async_trait::async_trait]
impl Bus for SilentFirst {
    async fn publish(&self, events: Vec<StoredEvent>) -> Result<(), BusError> {
        self.inner.publish(events).await
    }

    async fn subscribe(&self) -> Result<BoxStream<'static, Arc<StoredEvent>>, BusError> {
        if self.subscribed.fetch_add(1, Ordering::SeqCst) == 0 {
            return Ok(futures::stream::pending().boxed());
        }
        self.inner.subscribe().await
    }
}

async fn append(store: &dyn EventStore, stream: &str, n: usize) {
    store
        .append(stream, ExpectedVersion::Any, new_events(stream, n))
        .await
        .expect("append");
}

/// Takes deliveries until `n` events arrived.
async fn events(log: &mut BoxStream<'static, Result<Delivery, BusError>>, n: usize) -> Vec<u64> {
    let mut got = Vec::new();
    while got.len() < n {
        match tokio::time::timeout(PATIENCE, log.next()).await {
            Ok(Some(Ok(Delivery::Event(e)))) => got.push(e.position),
            Ok(Some(Ok(Delivery::CaughtUp | Delivery::Passed(_)))) => {}
            Ok(Some(Err(e))) => panic!("subscription failed: {e}"),
            Ok(None) => panic!("subscription ended"),
            Err(_) => panic!("no delivery within {PATIENCE:?}; got {got:?}"),
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_bus_is_subscribed_to_again_once_it_misses_an_event() {
    let store: Arc<dyn EventStore> = Arc::new(SqliteStore::in_memory().await.expect("open"));
    let bus = Arc::new(SilentFirst {
        inner: InProcessBus::new(),
        subscribed: AtomicUsize::new(0),
    });
    let cancel = CancellationToken::new();
    let relay = spawn_relay(store.clone(), bus.clone(), cancel.clone());
    let mut log = subscribe_log(store.clone(), bus.clone(), 0)
        .await
        .expect("subscribe");
    append(&*store, "a", 3).await;
    // The silent bus brings nothing: the store poll does, and it sees that the bus missed them.
    assert_eq!(events(&mut log, 3).await, vec![1, 2, 3]);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while bus.subscribed.load(Ordering::SeqCst) < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the subscription never subscribed to the bus again after it missed events"
        );
        // Deliveries drive the subscription; more events are more chances to notice the silence.
        append(&*store, "b", 1).await;
        let _ = tokio::time::timeout(Duration::from_millis(100), log.next()).await;
    }
    // The new bus subscription works: whatever comes next is delivered, once each.
    let before = store.head_position().await.expect("head");
    append(&*store, "c", 5).await;
    let mut got = Vec::new();
    while got.last().copied().unwrap_or(0) < before + 5 {
        got.extend(events(&mut log, 1).await);
    }
    let mut sorted = got.clone();
    sorted.dedup();
    assert_eq!(got, sorted, "each event once, in order");
    cancel.cancel();
    let _ = relay.await;
}

/// A bus whose subscriptions end at once until `ended` of them have.
struct EndsAtFirst {
    inner: Arc<InProcessBus>,
    subscribed: AtomicUsize,
    ended: usize,
}

#[async_trait::async_trait]
impl Bus for EndsAtFirst {
    async fn publish(&self, events: Vec<StoredEvent>) -> Result<(), BusError> {
        self.inner.publish(events).await
    }

    async fn subscribe(&self) -> Result<BoxStream<'static, Arc<StoredEvent>>, BusError> {
        if self.subscribed.fetch_add(1, Ordering::SeqCst) < self.ended {
            return Ok(futures::stream::empty().boxed());
        }
        self.inner.subscribe().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ended_bus_subscription_is_made_again() {
    let store: Arc<dyn EventStore> = Arc::new(SqliteStore::in_memory().await.expect("open"));
    let bus = Arc::new(EndsAtFirst {
        inner: InProcessBus::new(),
        subscribed: AtomicUsize::new(0),
        ended: 2,
    });
    let cancel = CancellationToken::new();
    let relay = spawn_relay(store.clone(), bus.clone(), cancel.clone());
    let mut log = subscribe_log(store.clone(), bus.clone(), 0)
        .await
        .expect("subscribe");
    let mut expected = Vec::new();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while bus.subscribed.load(Ordering::SeqCst) < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the bus was not subscribed to again after its subscription ended"
        );
        append(&*store, "a", 1).await;
        expected.push(expected.len() as u64 + 1);
        assert_eq!(
            events(&mut log, 1).await,
            vec![expected.len() as u64],
            "the store keeps delivering meanwhile"
        );
    }
    cancel.cancel();
    let _ = relay.await;
}

/// A `nats-server -js` of the test's own.
struct OwnNats {
    port: u16,
    store: tempfile::TempDir,
    child: Child,
}

impl OwnNats {
    fn start() -> Option<Self> {
        if std::env::var("NSML_TEST_NATS").is_ok_and(|v| v == "skip") {
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let store = tempfile::tempdir().expect("temporary directory");
        let child = Self::spawn(port, store.path());
        Some(Self { port, store, child })
    }

    fn spawn(port: u16, store: &std::path::Path) -> Child {
        let bin = ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
            .into_iter()
            .find(|p| std::path::Path::new(p).is_file())
            .unwrap_or("nats-server");
        let child = Command::new(bin)
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(store)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server (Debian package `nats-server`) starts");
        let deadline = std::time::Instant::now() + PATIENCE;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "nats-server did not listen"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        child
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server and starts it again on an empty store.
    fn restart_empty(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(self.store.path());
        std::fs::create_dir_all(self.store.path()).expect("store directory");
        self.child = Self::spawn(self.port, self.store.path());
    }
}

impl Drop for OwnNats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_server_back_on_an_empty_store_gets_its_stream_again_and_delivers() {
    let Some(mut nats) = OwnNats::start() else {
        eprintln!("NSML_TEST_NATS is skip: not running NATS tests");
        return;
    };
    let store: Arc<dyn EventStore> = Arc::new(SqliteStore::in_memory().await.expect("open"));
    let bus = NatsBus::connect(&nats.url(), "NSML_FAULTS")
        .await
        .expect("nats");
    let cancel = CancellationToken::new();
    let relay = spawn_relay(store.clone(), bus.clone(), cancel.clone());
    let mut log = subscribe_log(store.clone(), bus.clone(), 0)
        .await
        .expect("subscribe");
    append(&*store, "before", 2).await;
    assert_eq!(events(&mut log, 2).await, vec![1, 2]);

    nats.restart_empty();
    append(&*store, "after", 3).await;
    assert_eq!(
        events(&mut log, 3).await,
        vec![3, 4, 5],
        "events stored after the restart are delivered"
    );
    // The relay made the stream again: it holds what was published after the restart.
    let client = async_nats::connect(nats.url()).await.expect("nats");
    let js = async_nats::jetstream::new(client);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let messages = match js.get_stream("NSML_FAULTS").await {
            Ok(mut stream) => stream.info().await.map_or(0, |i| i.state.messages),
            Err(_) => 0,
        };
        if messages >= 3 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the lost stream was not made again ({messages} messages)"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cancel.cancel();
    let _ = relay.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_nats_connection_ends_the_live_subscription() {
    let Some(mut nats) = OwnNats::start() else {
        eprintln!("NSML_TEST_NATS is skip: not running NATS tests");
        return;
    };
    let bus = NatsBus::connect(&nats.url(), "NSML_CONNECTION_LOST")
        .await
        .expect("nats");
    let mut live = bus.subscribe().await.expect("subscribe");
    // Gone, and back on an empty store: the live subscription ends rather than wait for the connection.
    nats.restart_empty();
    let ended = tokio::time::timeout(Duration::from_secs(120), async {
        while live.next().await.is_some() {}
    })
    .await;
    assert!(
        ended.is_ok(),
        "the live subscription went on after the connection was lost, so its subscriber never fell back to the store"
    );
}
