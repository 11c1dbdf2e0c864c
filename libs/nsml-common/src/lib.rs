//! What every NSML service shares: who is calling ([`caller`]), clients of the other services ([`clients`]),
//! typed events over the log ([`event`]), in-memory read models fed by the log ([`projection`]),
//! optimistic-concurrency command handling ([`aggregate`]), the runner contract ([`executor`]),
//! the status mapping ([`status`]), tracing ([`telemetry`]), serving ([`server`]) and TLS between
//! processes ([`tls`]).

pub mod aggregate;
pub mod bounds;
pub mod bulk;
pub mod caller;
pub mod clients;
pub mod context;
pub mod error;
pub mod event;
pub mod executor;
pub mod live;
pub mod metrics;
pub mod names;
pub mod projection;
pub mod reactor;
pub mod server;
pub mod service;
pub mod status;
pub mod telemetry;
pub mod tls;

pub use context::ServiceContext;

/// Milliseconds since the Unix epoch, the time unit of every event and API message.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}
