//! At-least-once delivery of the log's events to other services: an in-process bus for the embedded
//! deployment and NATS JetStream for the distributed one, both fed from the store's transactional outbox
//! by [`spawn_relay`], and [`subscribe_log`], which turns either into an ordered, duplicate-free feed.

use std::sync::Arc;
use std::time::Duration;

use futures::stream::BoxStream;
use futures::StreamExt;
use nsml_eventstore::{EventStore, StoredEvent};
use tokio_util::sync::CancellationToken;

mod inprocess;
mod nats;

pub use inprocess::InProcessBus;
pub use nats::NatsBus;

/// Why the bus failed.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("nats: {0}")]
    Nats(String),
    #[error("event store: {0}")]
    Store(#[from] nsml_eventstore::StoreError),
    #[error("malformed bus message: {0}")]
    Malformed(String),
}

/// A channel of stored events between processes.
#[async_trait::async_trait]
pub trait Bus: Send + Sync + 'static {
    /// Publishes events in the given order; returns once the bus has accepted them.
    async fn publish(&self, events: &[StoredEvent]) -> Result<(), BusError>;
    /// Live events published from now on: possibly duplicated, possibly out of position order.
    async fn subscribe(&self) -> Result<BoxStream<'static, StoredEvent>, BusError>;
}

/// Moves events from the outbox to the bus until `cancel`: publish, then acknowledge, so an event leaves the
/// outbox only once the bus has it. Several relays over one store may publish an event twice; consumers
/// drop duplicates.
pub fn spawn_relay(
    store: Arc<dyn EventStore>,
    bus: Arc<dyn Bus>,
    cancel: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(5);
        loop {
            if cancel.is_cancelled() {
                return;
            }
            let batch = match store.outbox_peek(500).await {
                Ok(b) => b,
                Err(err) => {
                    tracing::warn!(%err, "relay cannot read the outbox");
                    sleep_or_cancel(&cancel, Duration::from_millis(500)).await;
                    continue;
                }
            };
            if batch.is_empty() {
                sleep_or_cancel(&cancel, Duration::from_millis(2)).await;
                continue;
            }
            if let Err(err) = bus.publish(&batch).await {
                tracing::warn!(%err, "relay cannot publish; retrying");
                sleep_or_cancel(&cancel, backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
            backoff = Duration::from_millis(5);
            let positions: Vec<u64> = batch.iter().map(|e| e.position).collect();
            if let Err(err) = store.outbox_ack(&positions).await {
                tracing::warn!(%err, "relay cannot acknowledge published events");
            }
        }
    })
}

async fn sleep_or_cancel(cancel: &CancellationToken, d: Duration) {
    tokio::select! {
        _ = cancel.cancelled() => {}
        _ = tokio::time::sleep(d) => {}
    }
}

/// One item of a log subscription.
#[derive(Debug, Clone)]
pub enum Delivery {
    Event(StoredEvent),
    /// Everything in the log when the subscription began has been delivered.
    CaughtUp,
}

/// Catches up from the store (events after `after_position`), yields [`Delivery::CaughtUp`], then follows the
/// bus. Each event is delivered exactly once and in position order: an event the bus delivers ahead of a gap
/// makes the subscription fill the gap from the store first, duplicates are dropped by position (each event
/// id has exactly one), and a periodic check against the store recovers anything the bus lost.
pub async fn subscribe_log(
    store: Arc<dyn EventStore>,
    bus: Arc<dyn Bus>,
    after_position: u64,
) -> Result<BoxStream<'static, Result<Delivery, BusError>>, BusError> {
    // Subscribe first so nothing published during the catch-up is missed.
    let mut live = bus.subscribe().await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Delivery, BusError>>(4096);
    tokio::spawn(async move {
        let mut wm = after_position;
        macro_rules! fill {
            ($upto:expr) => {{
                let upto: Option<u64> = $upto;
                loop {
                    match store.read_all(wm, 1000).await {
                        Ok(page) => {
                            let n = page.len();
                            for ev in page {
                                wm = ev.position;
                                if tx.send(Ok(Delivery::Event(ev))).await.is_err() {
                                    return;
                                }
                            }
                            if n < 1000 || upto.is_some_and(|u| wm >= u) {
                                break;
                            }
                        }
                        Err(e) => {
                            if tx.send(Err(e.into())).await.is_err() {
                                return;
                            }
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            break;
                        }
                    }
                }
            }};
        }
        fill!(None);
        if tx.send(Ok(Delivery::CaughtUp)).await.is_err() {
            return;
        }
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = tx.closed() => return,
                _ = tick.tick() => fill!(None),
                ev = live.next() => match ev {
                    Some(ev) if ev.position <= wm => {}
                    Some(ev) if ev.position == wm + 1 => {
                        wm = ev.position;
                        if tx.send(Ok(Delivery::Event(ev))).await.is_err() {
                            return;
                        }
                    }
                    Some(ev) => fill!(Some(ev.position)),
                    None => {
                        // The bus ended the subscription: keep following the store alone.
                        loop {
                            tokio::select! {
                                _ = tx.closed() => return,
                                _ = tokio::time::sleep(Duration::from_millis(50)) => fill!(None),
                            }
                        }
                    }
                },
            }
        }
    });
    Ok(tokio_stream::wrappers::ReceiverStream::new(rx).boxed())
}
