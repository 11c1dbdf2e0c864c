//! A store that wakes the relay after every append, so events reach the bus without waiting for the
//! relay's next poll.

use std::sync::Arc;

use nsml_eventstore::{
    Appended, Chain, ChainBreak, EventStore, ExpectedVersion, NewEvent, PendingAppend,
    ScannedEvent, SharedPage, StoreError, StoredEvent, TypedPage,
};
use tokio::sync::Notify;

use crate::shared_scan::SharedScan;

/// Wraps a store; appends through it wake `relay` (see [`crate::Relay::waker`]).
pub struct WakingStore {
    inner: Arc<dyn EventStore>,
    relay: Arc<Notify>,
    /// Where the catch-ups of several read models share one read of the log.
    scan: Option<SharedScan>,
}

impl WakingStore {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn EventStore>, relay: Arc<Notify>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            relay,
            scan: None,
        })
    }

    /// Wraps `inner`, and has the typed reads of read models catching up at the same time share one read of
    /// the log (chunks read once and handed to every reader, the readers paced by the slowest): for a process
    /// whose read models all read one local log.
    pub fn sharing_catch_ups(inner: Arc<dyn EventStore>, relay: Arc<Notify>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            relay,
            scan: Some(SharedScan::default()),
        })
    }
}

#[async_trait::async_trait]
impl EventStore for WakingStore {
    async fn append(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<Appended, StoreError> {
        let timer = AppendTimer::start(events.len());
        let r = self.inner.append(stream, expected, events).await;
        if r.is_ok() {
            self.relay.notify_one();
            timer.committed();
        }
        r
    }

    fn append_chained(
        &self,
        chain: &Arc<Chain>,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Option<PendingAppend> {
        let timer = AppendTimer::start(events.len());
        let pending = self.inner.append_chained(chain, stream, expected, events)?;
        let relay = self.relay.clone();
        Some(Box::pin(async move {
            let r = pending.await;
            if r.is_ok() {
                relay.notify_one();
                timer.committed();
            }
            r
        }))
    }

    async fn read_stream(
        &self,
        stream: &str,
        after_version: u64,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        self.inner.read_stream(stream, after_version).await
    }

    async fn read_stream_page(
        &self,
        stream: &str,
        after_version: u64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        self.inner
            .read_stream_page(stream, after_version, limit)
            .await
    }

    async fn read_all(
        &self,
        after_position: u64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        self.inner.read_all(after_position, limit).await
    }

    async fn scan_streams(
        &self,
        prefix: &str,
        after: Option<(&str, u64)>,
        limit: usize,
    ) -> Result<Vec<ScannedEvent>, StoreError> {
        self.inner.scan_streams(prefix, after, limit).await
    }

    async fn read_all_of_types(
        &self,
        types: &[&str],
        after_position: u64,
        limit: usize,
    ) -> Result<TypedPage, StoreError> {
        match &self.scan {
            Some(_) => Ok(self
                .read_all_of_types_shared(types, after_position, limit)
                .await?
                .into()),
            None => {
                self.inner
                    .read_all_of_types(types, after_position, limit)
                    .await
            }
        }
    }

    async fn read_all_of_types_shared(
        &self,
        types: &[&str],
        after_position: u64,
        limit: usize,
    ) -> Result<SharedPage, StoreError> {
        match &self.scan {
            Some(scan) => {
                scan.read_all_of_types_shared(&self.inner, types, after_position, limit)
                    .await
            }
            None => {
                self.inner
                    .read_all_of_types_shared(types, after_position, limit)
                    .await
            }
        }
    }

    async fn stream_version(&self, stream: &str) -> Result<u64, StoreError> {
        self.inner.stream_version(stream).await
    }

    async fn head_position(&self) -> Result<u64, StoreError> {
        self.inner.head_position().await
    }

    async fn outbox_peek(&self, limit: usize) -> Result<Vec<StoredEvent>, StoreError> {
        self.inner.outbox_peek(limit).await
    }

    async fn outbox_ack(&self, positions: &[u64]) -> Result<(), StoreError> {
        self.inner.outbox_ack(positions).await
    }

    async fn load_checkpoint(&self, consumer: &str) -> Result<u64, StoreError> {
        self.inner.load_checkpoint(consumer).await
    }

    async fn save_checkpoint(&self, consumer: &str, position: u64) -> Result<(), StoreError> {
        self.inner.save_checkpoint(consumer, position).await
    }

    async fn verify_chain(&self) -> Result<Option<ChainBreak>, StoreError> {
        self.inner.verify_chain().await
    }
}

/// Measures one append, from its request to its commit (`nsml_eventstore_append_seconds`), and how many events
/// it held (`nsml_eventstore_append_events`).
struct AppendTimer {
    started: std::time::Instant,
    events: usize,
}

impl AppendTimer {
    fn start(events: usize) -> Self {
        Self {
            started: std::time::Instant::now(),
            events,
        }
    }

    fn committed(self) {
        metrics::histogram!("nsml_eventstore_append_seconds")
            .record(self.started.elapsed().as_secs_f64());
        metrics::histogram!("nsml_eventstore_append_events").record(self.events as f64);
    }
}
