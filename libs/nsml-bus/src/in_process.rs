//! The in-process bus: a tokio broadcast channel.

use std::sync::Arc;

use futures::StreamExt;
use futures::stream::BoxStream;
use nsml_eventstore::StoredEvent;
use tokio::sync::broadcast;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;

use crate::{Bus, BusError};

/// A bus inside one process, for a single-binary deployment.
///
/// A subscriber that falls more than the capacity behind loses the oldest events it has not received; the loss
/// shows as a gap in positions, which [`subscribe_log`](crate::subscribe_log) fills from the store.
#[derive(Debug)]
pub struct InProcessBus {
    sender: broadcast::Sender<Arc<StoredEvent>>,
}

impl InProcessBus {
    /// How many events a subscriber may fall behind by default. The channel allocates and initialises a slot
    /// (32 bytes) per event of capacity when it is made, resident for the process's life whether used or not:
    /// 65,536 slots were 2 MiB of an idle `nsmld`'s 33 MB. 16,384 is about 0.8 s of events at the platform's
    /// full admission rate (a refused `run` appends two events, at up to 10,000 a second on two cores), and a
    /// subscriber that falls further behind still misses nothing: it reads the gap from the store.
    pub const DEFAULT_CAPACITY: usize = 16_384;

    /// A bus with [`Self::DEFAULT_CAPACITY`].
    pub fn new() -> Arc<Self> {
        Self::with_capacity(Self::DEFAULT_CAPACITY)
    }

    /// A bus on which a subscriber may fall `capacity` events behind (at least 1).
    pub fn with_capacity(capacity: usize) -> Arc<Self> {
        let (sender, _) = broadcast::channel(capacity.max(1));
        Arc::new(InProcessBus { sender })
    }
}

#[async_trait::async_trait]
impl Bus for InProcessBus {
    async fn publish(&self, events: Vec<StoredEvent>) -> Result<(), BusError> {
        for event in events {
            // An error only means nobody is subscribed right now; the event is still accepted.
            let _ = self.sender.send(Arc::new(event));
        }
        Ok(())
    }

    async fn subscribe(&self) -> Result<BoxStream<'static, Arc<StoredEvent>>, BusError> {
        let events = BroadcastStream::new(self.sender.subscribe()).filter_map(|item| async move {
            match item {
                Ok(event) => Some(event),
                Err(BroadcastStreamRecvError::Lagged(missed)) => {
                    tracing::warn!(
                        missed,
                        "in-process bus subscriber fell behind and missed events"
                    );
                    None
                }
            }
        });
        Ok(events.boxed())
    }
}
