//! At-least-once delivery of stored events to other services.
//!
//! Appends put events in the store's transactional outbox; a [relay](crate::spawn_relay) publishes them to a
//! [`Bus`] and then removes them from the outbox. Consumers use [`subscribe_log`]: it catches up from the store,
//! then follows the bus, and hands each event to the consumer exactly once whatever duplicates or reordering the
//! bus produces.
//!
//! Two buses: [`InProcessBus`] for a single process (`nsmld`), and [`NatsBus`] (NATS JetStream) for services in
//! separate processes.

use std::sync::Arc;

use futures::stream::BoxStream;
use nsml_eventstore::StoredEvent;

mod error;
mod in_process;
mod nats;
mod relay;
mod shared_scan;
mod subscription;
mod waking;

pub use error::BusError;
pub use in_process::InProcessBus;
pub use nats::NatsBus;
pub use relay::{
    IDLE_POLL as RELAY_IDLE_POLL, Relay, WOKEN_IDLE_POLL as RELAY_WOKEN_IDLE_POLL, spawn_relay,
};
pub use subscription::{Delivery, STORE_POLL, subscribe_log, subscribe_log_of_types};
pub use waking::WakingStore;

/// A publish/subscribe channel for stored events.
#[async_trait::async_trait]
pub trait Bus: Send + Sync + 'static {
    /// Publishes events (in the given order); returns once the bus has accepted them (JetStream: acked). The
    /// events are handed over, so a bus keeps or sends them without copying.
    async fn publish(&self, events: Vec<StoredEvent>) -> Result<(), BusError>;

    /// Live events published from now on (may contain duplicates; may arrive out of position order when several
    /// processes relay). Events are shared: every subscriber of a process gets the same one.
    async fn subscribe(&self) -> Result<BoxStream<'static, Arc<StoredEvent>>, BusError>;
}
