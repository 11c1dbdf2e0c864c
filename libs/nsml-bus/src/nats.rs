//! The NATS JetStream bus: one JetStream stream holds every published event, deduplicated by event id.

use std::sync::Arc;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use nsml_eventstore::{Metadata, StoredEvent};

use crate::{Bus, BusError};

/// Tries at creating (or finding) the stream before giving up.
const CREATE_ATTEMPTS: u32 = 5;

/// Header carrying the event id; JetStream drops a second message with the same id within its duplicate window.
const MSG_ID: &str = "Nats-Msg-Id";
/// Header carrying the event's global position.
const POSITION: &str = "Nsml-Position";
/// Header carrying the event's stream.
const STREAM: &str = "Nsml-Stream";
/// Header carrying the event's version in its stream.
const VERSION: &str = "Nsml-Version";
/// Header carrying the event's payload type.
const TYPE: &str = "Nsml-Type";
/// Header carrying the event's hash.
const HASH: &str = "Nsml-Hash";
/// Header carrying the event's metadata as JSON.
const METADATA: &str = "Nsml-Metadata";
/// Header carrying the W3C trace context of the span that appended the event.
const TRACEPARENT: &str = "traceparent";

/// A bus on a NATS JetStream stream.
///
/// The stream `<name>` (file storage) takes subjects `<name>.>`; each event is published to
/// `<name>.<event type, '.' replaced by '_'>` with the protobuf payload as body and the envelope in headers.
///
/// The stream is created at connect, and again whenever a publish or a subscribe fails while it is missing (a
/// NATS server restarted on an empty store): the outbox still holds every event not yet published, and
/// subscribers catch up from the event store, so a lost stream loses no event.
#[derive(Debug)]
pub struct NatsBus {
    /// How many times the connection was lost: live subscriptions end when it grows.
    disconnects: tokio::sync::watch::Receiver<u64>,
    jetstream: jetstream::Context,
    config: stream::Config,
    stream_name: String,
}

impl NatsBus {
    /// Connects to the NATS server at `url` and creates the JetStream stream `stream_name` unless it exists.
    pub async fn connect(url: &str, stream_name: &str) -> Result<Arc<NatsBus>, BusError> {
        let (lost, disconnects) = tokio::sync::watch::channel(0u64);
        let lost = Arc::new(lost);
        let client = async_nats::ConnectOptions::new()
            .event_callback(move |event| {
                if matches!(event, async_nats::Event::Disconnected) {
                    lost.send_modify(|n| *n += 1);
                }
                async {}
            })
            .connect(url)
            .await
            .map_err(|e| BusError::nats("connect", e))?;
        let jetstream = jetstream::new(client);
        let config = stream::Config {
            name: stream_name.to_owned(),
            subjects: vec![format!("{stream_name}.>")],
            storage: stream::StorageType::File,
            ..Default::default()
        };
        // Processes of one deployment start together: when another creates the stream between this one's
        // lookup and its create, the server refuses the create (the subjects overlap); the stream exists
        // then, and the next lookup finds it.
        let bus = NatsBus {
            disconnects,
            jetstream,
            config,
            stream_name: stream_name.to_owned(),
        };
        bus.stream().await?;
        Ok(Arc::new(bus))
    }

    /// The JetStream stream, created if it is missing.
    async fn stream(&self) -> Result<stream::Stream, BusError> {
        retried(CREATE_ATTEMPTS, || {
            self.jetstream.get_or_create_stream(self.config.clone())
        })
        .await
        .map_err(|e| BusError::nats("create stream", e))
    }

    /// Publishes events and waits for every ack.
    async fn publish_all(&self, events: &[(String, HeaderMap, Bytes)]) -> Result<(), BusError> {
        let mut acks = Vec::with_capacity(events.len());
        for (subject, headers, payload) in events {
            let ack = self
                .jetstream
                .publish_with_headers(subject.clone(), headers.clone(), payload.clone())
                .await
                .map_err(|e| BusError::nats("publish", e))?;
            acks.push(ack);
        }
        for ack in acks {
            ack.await.map_err(|e| BusError::nats("publish ack", e))?;
        }
        Ok(())
    }

    /// The JetStream stream's name.
    pub fn stream_name(&self) -> &str {
        &self.stream_name
    }

    /// The subject an event type is published to.
    pub fn subject(&self, event_type: &str) -> String {
        let token: String = event_type
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        format!("{}.{token}", self.stream_name)
    }
}

/// The headers describing an event.
fn headers(event: &StoredEvent) -> HeaderMap {
    let metadata = serde_json::to_string(&event.metadata).unwrap_or_default();
    let mut headers = HeaderMap::new();
    headers.insert(MSG_ID, event.metadata.event_id.as_str());
    headers.insert(POSITION, event.position.to_string().as_str());
    headers.insert(STREAM, event.stream.as_str());
    headers.insert(VERSION, event.version.to_string().as_str());
    headers.insert(TYPE, event.event_type.as_str());
    headers.insert(HASH, event.hash.as_str());
    headers.insert(METADATA, metadata.as_str());
    if !event.metadata.traceparent.is_empty() {
        headers.insert(TRACEPARENT, event.metadata.traceparent.as_str());
    }
    headers
}

/// Rebuilds an event from a message's headers and body.
fn decode(headers: Option<&HeaderMap>, payload: &[u8]) -> Result<StoredEvent, BusError> {
    let headers = headers.ok_or_else(|| BusError::Malformed("message without headers".into()))?;
    let text = |name: &str| -> Result<String, BusError> {
        headers
            .get(name)
            .map(|v| v.as_str().to_owned())
            .ok_or_else(|| BusError::Malformed(format!("missing header {name}")))
    };
    let number = |name: &str| -> Result<u64, BusError> {
        text(name)?
            .parse()
            .map_err(|_| BusError::Malformed(format!("header {name} is not a number")))
    };
    let metadata: Metadata = serde_json::from_str(&text(METADATA)?)
        .map_err(|e| BusError::Malformed(format!("header {METADATA} is not valid: {e}")))?;
    Ok(StoredEvent {
        position: number(POSITION)?,
        stream: text(STREAM)?,
        version: number(VERSION)?,
        event_type: text(TYPE)?,
        payload: payload.to_vec(),
        metadata,
        hash: text(HASH)?,
    })
}

#[async_trait::async_trait]
impl Bus for NatsBus {
    async fn publish(&self, events: Vec<StoredEvent>) -> Result<(), BusError> {
        let events: Vec<(String, HeaderMap, Bytes)> = events
            .into_iter()
            .map(|event| {
                (
                    self.subject(&event.event_type),
                    headers(&event),
                    Bytes::from(event.payload),
                )
            })
            .collect();
        match self.publish_all(&events).await {
            Ok(()) => Ok(()),
            Err(error) => {
                // Nothing answers for a lost stream's subjects: make it again and publish once more. Events
                // the first try did publish are dropped by JetStream as duplicates (their message ids).
                tracing::debug!(%error, "publishing failed; making sure the stream exists");
                self.stream().await.map_err(|_| error)?;
                self.publish_all(&events).await
            }
        }
    }

    async fn subscribe(&self) -> Result<BoxStream<'static, Arc<StoredEvent>>, BusError> {
        let config = consumer::pull::OrderedConfig {
            deliver_policy: consumer::DeliverPolicy::New,
            ..Default::default()
        };
        let consumer = self
            .stream()
            .await?
            .create_consumer(config)
            .await
            .map_err(|e| BusError::nats("create consumer", e))?;
        let messages = consumer
            .messages()
            .await
            .map_err(|e| BusError::nats("consume", e))?;
        let stream_name = self.stream_name.clone();
        // A consumer that fails ends the live subscription rather than going silent, so that its subscriber
        // follows the store at once and subscribes again: on an error it yields, and as soon as the connection
        // is lost (the ordered consumer itself only waits, recreating itself, until the server is back).
        let mut disconnects = self.disconnects.clone();
        disconnects.mark_unchanged();
        let disconnected = async move {
            // An error means the bus itself is gone: end as well.
            let _ = disconnects.changed().await;
            tracing::warn!("nats connection lost; ending the live subscription");
        };
        let events = messages
            .take_until(Box::pin(disconnected))
            .take_while(move |message| {
                if let Err(e) = message {
                    tracing::warn!(error = %e, "nats consumer failed; ending the live subscription");
                }
                futures::future::ready(message.is_ok())
            })
            .filter_map(move |message| {
                let event = message.ok().and_then(|message| {
                    decode(message.headers.as_ref(), &message.payload)
                        .map_err(|e| {
                            tracing::warn!(stream = %stream_name, subject = %message.subject, error = %e, "skipping a bus message");
                        })
                        .ok()
                });
                async move { event.map(Arc::new) }
            });
        Ok(events.boxed())
    }
}

/// Runs `attempt` until it succeeds, at most `attempts` times, waiting a little longer after each failure.
async fn retried<T, E: std::fmt::Display, F: Future<Output = Result<T, E>>>(
    attempts: u32,
    mut attempt: impl FnMut() -> F,
) -> Result<T, E> {
    let mut tried = 1;
    loop {
        match attempt().await {
            Ok(done) => return Ok(done),
            Err(err) if tried < attempts => {
                tracing::debug!(%err, tried, "retrying");
                tokio::time::sleep(std::time::Duration::from_millis(50 * u64::from(tried))).await;
                tried += 1;
            }
            Err(err) => return Err(err),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_raced_create_is_looked_up_again() {
        let calls = std::cell::Cell::new(0);
        let lookup = || {
            calls.set(calls.get() + 1);
            let n = calls.get();
            async move {
                if n < 3 {
                    Err("subjects overlap with an existing stream")
                } else {
                    Ok(n)
                }
            }
        };
        assert_eq!(retried(CREATE_ATTEMPTS, lookup).await, Ok(3));
        let never = || async { Err::<(), _>("nats is down") };
        assert_eq!(retried(2, never).await, Err("nats is down"));
    }

    #[test]
    fn headers_round_trip() {
        let event = StoredEvent {
            position: 17,
            stream: "sessions-acme/t1-cls".into(),
            version: 3,
            event_type: "nsml.v1.SessionRequested".into(),
            payload: vec![1, 2, 3],
            metadata: Metadata {
                event_id: "e-1".into(),
                traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
                recorded_at_ms: 5,
                schema_version: 1,
                ..Default::default()
            },
            hash: "ab".repeat(32),
        };
        let headers = headers(&event);
        assert_eq!(headers.get(MSG_ID).map(|v| v.as_str()), Some("e-1"));
        assert_eq!(
            headers.get(TRACEPARENT).map(|v| v.as_str()),
            Some(event.metadata.traceparent.as_str())
        );
        assert_eq!(decode(Some(&headers), &[1, 2, 3]).expect("decodes"), event);
        assert!(decode(None, &[]).is_err());
    }
}
