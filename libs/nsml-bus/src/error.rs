//! The errors of the bus.

use nsml_eventstore::StoreError;

/// Everything that can go wrong when publishing or subscribing.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The event store failed (reading the outbox or catching up).
    #[error("event store: {0}")]
    Store(#[from] StoreError),
    /// NATS failed or could not be reached.
    #[error("nats {action}: {source}")]
    Nats {
        /// What was being done (`connect`, `publish`, ...).
        action: &'static str,
        /// The client's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A message on the bus does not describe a stored event.
    #[error("malformed bus message: {0}")]
    Malformed(String),
    /// The live subscription ended (the bus was closed or its connection lost).
    #[error("bus subscription ended")]
    Closed,
}

impl BusError {
    /// Wraps a NATS client error.
    pub(crate) fn nats(
        action: &'static str,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        BusError::Nats {
            action,
            source: Box::new(source),
        }
    }
}
