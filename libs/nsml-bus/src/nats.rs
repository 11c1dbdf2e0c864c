//! The NATS JetStream bus: one JetStream stream holds every published event, deduplicated by event id; each
//! process receives them live through one plain NATS subscription to the stream's subjects, shared by its
//! subscribers.

use std::sync::Arc;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use nsml_eventstore::{Metadata, StoredEvent};
use tokio::sync::{Mutex, broadcast, watch};
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_util::sync::CancellationToken;

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

/// How many events a subscriber of the process may fall behind the process's live subscription. Beyond it, it
/// misses the oldest: the gap in positions shows, and [`subscribe_log`](crate::subscribe_log) reads it from
/// the store.
const LIVE_CAPACITY: usize = 4096;

/// A bus on a NATS JetStream stream.
///
/// The stream `<name>` (file storage) takes subjects `<name>.>`; each event is published to
/// `<name>.<event type, '.' replaced by '_'>` with the protobuf payload as body and the envelope in headers, and
/// the publish waits for JetStream's acknowledgement.
///
/// Live events come to a process through one plain subscription to `<name>.>`, not a JetStream consumer: the
/// process's subscribers share it, each event decoded once. NATS delivers such a subscription every message
/// published after it, once, without keeping a consumer's state or acknowledgements for it; what it does not
/// deliver (the process was disconnected, or fell behind) shows as a gap in positions, which the subscribers
/// read from the event store, as they read everything stored before they subscribed. The JetStream stream keeps
/// the events for other readers of the bus.
///
/// The stream is created at connect, and again whenever a publish fails while it is missing (a NATS server
/// restarted on an empty store): the outbox still holds every event not yet published, and subscribers catch
/// up from the event store, so a lost stream loses no event.
#[derive(Debug)]
pub struct NatsBus {
    /// How many times the connection was lost: live subscriptions end when it grows.
    disconnects: watch::Receiver<u64>,
    client: async_nats::Client,
    jetstream: jetstream::Context,
    config: stream::Config,
    stream_name: String,
    /// The process's live subscription, while it runs.
    live: Arc<Mutex<Option<Live>>>,
}

/// A live subscription to the stream's subjects, shared by the process's subscribers.
#[derive(Debug)]
struct Live {
    events: broadcast::Sender<Arc<StoredEvent>>,
    /// Cancelled when the subscription ends: the connection was lost, or NATS ended it.
    ended: CancellationToken,
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
        let jetstream = jetstream::new(client.clone());
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
            client,
            jetstream,
            config,
            stream_name: stream_name.to_owned(),
            live: Arc::default(),
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
        let (events, ended) = {
            let mut live = self.live.lock().await;
            match live.as_ref().filter(|l| !l.ended.is_cancelled()) {
                Some(l) => (l.events.subscribe(), l.ended.clone()),
                None => {
                    let started = self.start_live().await?;
                    let joined = (started.events.subscribe(), started.ended.clone());
                    *live = Some(started);
                    joined
                }
            }
        };
        let events = BroadcastStream::new(events)
            .filter_map(|item| async move {
                match item {
                    Ok(event) => Some(event),
                    Err(BroadcastStreamRecvError::Lagged(missed)) => {
                        tracing::debug!(missed, "a subscriber fell behind the live subscription");
                        None
                    }
                }
            })
            // The subscription's end ends every subscriber's stream, so that each follows the store at once
            // and subscribes again.
            .take_until(ended.cancelled_owned());
        Ok(events.boxed())
    }
}

impl NatsBus {
    /// Subscribes the process to the stream's subjects, and starts handing what arrives to its subscribers.
    async fn start_live(&self) -> Result<Live, BusError> {
        let subject = format!("{}.>", self.stream_name);
        let messages = self
            .client
            .subscribe(subject)
            .await
            .map_err(|e| BusError::nats("subscribe", e))?;
        // A request on the same connection after the subscription: the server handles a connection's commands in
        // order, so once it answers, every message published from then on reaches the subscription.
        self.stream().await?;
        let live = Live {
            events: broadcast::channel(LIVE_CAPACITY).0,
            ended: CancellationToken::new(),
        };
        let (events, ended) = (live.events.clone(), live.ended.clone());
        let mut disconnects = self.disconnects.clone();
        disconnects.mark_unchanged();
        let (shared, stream_name) = (self.live.clone(), self.stream_name.clone());
        tokio::spawn(async move {
            tokio::select! {
                () = hand_out(messages, &events, &mut disconnects, &shared, &stream_name) => {}
                // The bus was dropped.
                () = ended.cancelled() => {}
            }
            ended.cancel();
        });
        Ok(live)
    }
}

impl Drop for NatsBus {
    /// Ends the live subscription, which would otherwise keep the connection open.
    fn drop(&mut self) {
        if let Ok(live) = self.live.try_lock()
            && let Some(l) = live.as_ref()
        {
            l.ended.cancel();
        }
    }
}

/// Decodes each message of the process's live subscription once and hands it to every subscriber, until the
/// connection is lost, NATS ends the subscription, or no subscriber is left (then the subscription is dropped,
/// and the next subscriber starts another).
async fn hand_out(
    mut messages: async_nats::Subscriber,
    events: &broadcast::Sender<Arc<StoredEvent>>,
    disconnects: &mut watch::Receiver<u64>,
    shared: &Mutex<Option<Live>>,
    stream_name: &str,
) {
    loop {
        let message = tokio::select! {
            message = messages.next() => message,
            // An error means the bus itself is gone: end as well.
            _ = disconnects.changed() => {
                tracing::warn!("nats connection lost; ending the live subscription");
                return;
            }
        };
        let Some(message) = message else {
            tracing::warn!("nats ended the live subscription");
            return;
        };
        let event = match decode(message.headers.as_ref(), &message.payload) {
            Ok(event) => Arc::new(event),
            Err(error) => {
                tracing::warn!(stream = %stream_name, subject = %message.subject, %error, "skipping a bus message");
                continue;
            }
        };
        if events.send(event).is_err() {
            // Nobody listens: end, unless a subscriber joined meanwhile (it joins under the same lock).
            let mut live = shared.lock().await;
            if events.receiver_count() == 0 {
                if let Some(l) = live.as_ref().filter(|l| l.events.same_channel(events)) {
                    l.ended.cancel();
                    *live = None;
                }
                return;
            }
        }
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
