//! The embedded deployment's bus: a broadcast channel inside the process.

use std::sync::Arc;

use futures::StreamExt;
use futures::stream::BoxStream;
use nsml_eventstore::StoredEvent;
use tokio::sync::broadcast;

use crate::{Bus, BusError};

/// A bus inside one process. A subscriber that falls behind loses messages here, and
/// [`crate::subscribe_log`] recovers them from the store.
pub struct InProcessBus {
    tx: broadcast::Sender<StoredEvent>,
}

impl InProcessBus {
    /// Creates a bus.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            tx: broadcast::channel(65_536).0,
        })
    }
}

#[async_trait::async_trait]
impl Bus for InProcessBus {
    async fn publish(&self, events: &[StoredEvent]) -> Result<(), BusError> {
        for e in events {
            // No subscriber is not an error: the log keeps the event.
            let _ = self.tx.send(e.clone());
        }
        Ok(())
    }

    async fn subscribe(&self) -> Result<BoxStream<'static, StoredEvent>, BusError> {
        let rx = self.tx.subscribe();
        Ok(tokio_stream::wrappers::BroadcastStream::new(rx)
            .filter_map(|r| async move { r.ok() })
            .boxed())
    }
}
