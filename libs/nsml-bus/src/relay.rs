//! The outbox relay: publishes the store's outbox to the bus, then acknowledges it.

use std::sync::Arc;
use std::time::Duration;

use nsml_eventstore::{EventStore, OutboxLease};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::Bus;

/// How many outbox events one round publishes.
const BATCH: usize = 500;
/// How long the relay waits before polling an empty outbox again (unless woken), where appends it is not told of
/// may reach the outbox: those of other processes sharing the store.
pub const IDLE_POLL: Duration = Duration::from_millis(5);
/// How long the relay waits before polling an empty outbox again (unless woken), where every append wakes it
/// ([`Relay::waker`]): only a check that nothing was missed. Polling every 5 ms, an idle `nsmld up` woke a thread
/// of its runtime about 160 times a second to find the outbox empty.
pub const WOKEN_IDLE_POLL: Duration = Duration::from_secs(1);
/// How long a relay without the outbox lease waits before it looks at the lease again.
const UNLEASED_POLL: Duration = Duration::from_secs(1);
/// First wait after a failure; doubles on each consecutive failure.
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
/// Longest wait after failures: short, so that the bus is caught up within a second of coming back.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// A running relay task, with a handle to wake it when new events were appended.
///
/// Several relays (in several processes) over one store may publish the same event twice; consumers drop
/// duplicates. An event leaves the outbox only after the bus accepted it. Where processes share the store, an
/// [`OutboxLease`] leaves the outbox to one of them, which publishes every process's appends in position
/// order; the others only look at the lease, once a second, to take over from a holder that died.
#[derive(Debug)]
pub struct Relay {
    wake: Arc<Notify>,
    handle: JoinHandle<()>,
}

impl Relay {
    /// Starts relaying from `store`'s outbox to `bus` until `cancel` is cancelled, polling an empty outbox
    /// every [`IDLE_POLL`].
    pub fn spawn(
        store: Arc<dyn EventStore>,
        bus: Arc<dyn Bus>,
        cancel: CancellationToken,
    ) -> Relay {
        Self::spawn_leased(store, bus, cancel, None, IDLE_POLL)
    }

    /// Like [`Relay::spawn`], for a store other processes may share: the relay reads and publishes the outbox
    /// only while it holds `lease` (if any), and polls an empty outbox every `idle_poll` unless woken
    /// ([`IDLE_POLL`] where appends it is not told of reach the outbox, [`WOKEN_IDLE_POLL`] where each wakes it).
    pub fn spawn_leased(
        store: Arc<dyn EventStore>,
        bus: Arc<dyn Bus>,
        cancel: CancellationToken,
        lease: Option<Arc<dyn OutboxLease>>,
        idle_poll: Duration,
    ) -> Relay {
        let wake = Arc::new(Notify::new());
        let handle = tokio::spawn(run(store, bus, cancel, wake.clone(), lease, idle_poll));
        Relay { wake, handle }
    }

    /// Makes the relay poll the outbox now instead of after its idle wait.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// A handle that wakes the relay (see [`Relay::wake`]), for the code that appends.
    pub fn waker(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    /// The relay task; it ends after cancellation.
    pub fn into_handle(self) -> JoinHandle<()> {
        self.handle
    }
}

/// Starts relaying from `store`'s outbox to `bus` until `cancel` is cancelled; see [`Relay`].
pub fn spawn_relay(
    store: Arc<dyn EventStore>,
    bus: Arc<dyn Bus>,
    cancel: CancellationToken,
) -> JoinHandle<()> {
    Relay::spawn(store, bus, cancel).into_handle()
}

/// What one round of the relay did.
enum Round {
    /// Published and acknowledged a batch.
    Relayed,
    /// The outbox was empty.
    Idle,
    /// Reading the outbox, publishing or acknowledging failed.
    Failed,
}

async fn run(
    store: Arc<dyn EventStore>,
    bus: Arc<dyn Bus>,
    cancel: CancellationToken,
    wake: Arc<Notify>,
    lease: Option<Arc<dyn OutboxLease>>,
    idle_poll: Duration,
) {
    let mut backoff = FIRST_BACKOFF;
    loop {
        let leased = match &lease {
            None => true,
            Some(lease) => tokio::select! {
                biased;
                () = cancel.cancelled() => return,
                held = lease.held() => held,
            },
        };
        // Only the holder of the lease publishes: one publisher puts events on the bus in position order, once
        // each, where a relay in every appending process published each event up to three times and out of
        // order, so that every subscriber saw gaps and read the store to fill them.
        let round = if leased {
            tokio::select! {
                biased;
                () = cancel.cancelled() => return,
                round = relay_once(&*store, &*bus) => round,
            }
        } else {
            Round::Idle
        };
        match round {
            Round::Relayed => backoff = FIRST_BACKOFF,
            Round::Idle => {
                backoff = FIRST_BACKOFF;
                let poll = if leased { idle_poll } else { UNLEASED_POLL };
                tokio::select! {
                    biased;
                    () = cancel.cancelled() => return,
                    () = wake.notified() => {}
                    () = tokio::time::sleep(poll) => {}
                }
            }
            Round::Failed => {
                tokio::select! {
                    biased;
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

async fn relay_once(store: &dyn EventStore, bus: &dyn Bus) -> Round {
    let events = match store.outbox_peek(BATCH).await {
        Ok(events) if events.is_empty() => return Round::Idle,
        Ok(events) => events,
        Err(error) => {
            tracing::warn!(%error, "relay could not read the outbox");
            return Round::Failed;
        }
    };
    let positions: Vec<u64> = events.iter().map(|e| e.position).collect();
    if let Err(error) = bus.publish(events).await {
        tracing::warn!(%error, count = positions.len(), "relay could not publish; will retry");
        return Round::Failed;
    }
    if let Err(error) = store.outbox_ack(&positions).await {
        // The events were published; they stay in the outbox and will be published again (consumers deduplicate).
        tracing::warn!(%error, count = positions.len(), "relay could not acknowledge published events");
        return Round::Failed;
    }
    tracing::trace!(count = positions.len(), "relayed events");
    Round::Relayed
}
