//! The distributed deployment's bus: NATS JetStream. Each event is one message on
//! `<stream>.<event type>`, its body the protobuf payload and its envelope in headers, so any language can
//! read it; `Nats-Msg-Id` (the event id) lets JetStream drop republished duplicates.

use std::sync::Arc;

use async_nats::jetstream;
use async_nats::jetstream::consumer::DeliverPolicy;
use futures::StreamExt;
use futures::stream::BoxStream;
use nsml_eventstore::{Metadata, StoredEvent};

use crate::{Bus, BusError};

/// A bus over one JetStream stream.
pub struct NatsBus {
    js: jetstream::Context,
    stream: String,
}

fn nats_err(e: impl std::fmt::Display) -> BusError {
    BusError::Nats(e.to_string())
}

impl NatsBus {
    /// Connects and makes sure the stream exists.
    pub async fn connect(url: &str, stream: &str) -> Result<Arc<Self>, BusError> {
        let client = async_nats::connect(url).await.map_err(nats_err)?;
        let js = jetstream::new(client);
        js.get_or_create_stream(jetstream::stream::Config {
            name: stream.to_string(),
            subjects: vec![format!("{stream}.>")],
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await
        .map_err(nats_err)?;
        Ok(Arc::new(Self {
            js,
            stream: stream.to_string(),
        }))
    }
}

fn header<'a>(h: &'a async_nats::HeaderMap, k: &str) -> Result<&'a str, BusError> {
    h.get(k)
        .map(|v| v.as_str())
        .ok_or_else(|| BusError::Malformed(format!("missing header {k}")))
}

fn decode(msg: &async_nats::Message) -> Result<StoredEvent, BusError> {
    let h = msg
        .headers
        .as_ref()
        .ok_or_else(|| BusError::Malformed("no headers".into()))?;
    let num = |k: &str| -> Result<u64, BusError> {
        header(h, k)?
            .parse()
            .map_err(|_| BusError::Malformed(format!("header {k} is not a number")))
    };
    let metadata: Metadata = serde_json::from_str(header(h, "Nsml-Metadata")?)
        .map_err(|e| BusError::Malformed(e.to_string()))?;
    Ok(StoredEvent {
        position: num("Nsml-Position")?,
        stream: header(h, "Nsml-Stream")?.to_string(),
        version: num("Nsml-Version")?,
        event_type: header(h, "Nsml-Type")?.to_string(),
        payload: msg.payload.to_vec(),
        metadata,
        hash: header(h, "Nsml-Hash")?.to_string(),
    })
}

#[async_trait::async_trait]
impl Bus for NatsBus {
    async fn publish(&self, events: &[StoredEvent]) -> Result<(), BusError> {
        let mut acks = Vec::with_capacity(events.len());
        for e in events {
            let mut h = async_nats::HeaderMap::new();
            h.insert("Nats-Msg-Id", e.metadata.event_id.as_str());
            h.insert("Nsml-Position", e.position.to_string().as_str());
            h.insert("Nsml-Stream", e.stream.as_str());
            h.insert("Nsml-Version", e.version.to_string().as_str());
            h.insert("Nsml-Type", e.event_type.as_str());
            h.insert("Nsml-Hash", e.hash.as_str());
            let md = serde_json::to_string(&e.metadata).map_err(|x| BusError::Malformed(x.to_string()))?;
            h.insert("Nsml-Metadata", md.as_str());
            if !e.metadata.traceparent.is_empty() {
                h.insert("traceparent", e.metadata.traceparent.as_str());
            }
            let subject = format!("{}.{}", self.stream, e.event_type.replace('.', "_"));
            let ack = self
                .js
                .publish_with_headers(subject, h, e.payload.clone().into())
                .await
                .map_err(nats_err)?;
            acks.push(ack);
        }
        for a in acks {
            a.await.map_err(nats_err)?;
        }
        Ok(())
    }

    async fn subscribe(&self) -> Result<BoxStream<'static, StoredEvent>, BusError> {
        let stream = self.js.get_stream(&self.stream).await.map_err(nats_err)?;
        let consumer = stream
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                deliver_policy: DeliverPolicy::New,
                ..Default::default()
            })
            .await
            .map_err(nats_err)?;
        let msgs = consumer.messages().await.map_err(nats_err)?;
        Ok(msgs
            .filter_map(|m| async move {
                match m {
                    Ok(m) => match decode(&m) {
                        Ok(e) => Some(e),
                        Err(err) => {
                            tracing::warn!(%err, "dropping a malformed bus message");
                            None
                        }
                    },
                    Err(err) => {
                        tracing::warn!(%err, "bus consumer error");
                        None
                    }
                }
            })
            .boxed())
    }
}
