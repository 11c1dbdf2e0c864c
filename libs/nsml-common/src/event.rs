//! Typed events over the log: encoding payloads with their envelope, and decoding stored events.

use nsml_eventstore::{Metadata, NewEvent, StoredEvent};
use nsml_proto::v1::EventPayload;

use crate::{now_ms, telemetry};

/// Builds a new event from a payload, stamped with the actor, command id and the current trace.
pub fn new_event<P: EventPayload>(payload: &P, actor: &str, command_id: &str) -> NewEvent {
    NewEvent {
        event_type: P::TYPE.to_string(),
        payload: payload.encode_to_vec(),
        metadata: Metadata {
            event_id: uuid::Uuid::now_v7().to_string(),
            command_id: command_id.to_string(),
            correlation_id: String::new(),
            causation_id: String::new(),
            actor: actor.to_string(),
            traceparent: telemetry::current_traceparent(),
            recorded_at_ms: now_ms(),
            schema_version: 1,
        },
    }
}

/// A payload as the log would hand it back at `position` of `stream`, unchained (no hash): for folding events
/// into read models and aggregates without a store, in tests and tools.
pub fn stored<P: EventPayload>(stream: &str, position: u64, payload: &P) -> StoredEvent {
    let e = new_event(payload, "test", "");
    StoredEvent {
        position,
        stream: stream.to_string(),
        version: position,
        event_type: e.event_type,
        payload: e.payload,
        metadata: e.metadata,
        hash: String::new(),
    }
}

/// Decodes part of a stored event of type `P` as `V`: a message that declares only the fields of `P` a reader
/// uses, under the same tags, so the rest of the payload is skipped instead of copied into strings. Read models
/// that fold a long log at start-up use it for events of which they read a field or two.
pub fn decode_part<P: EventPayload, V: prost::Message + Default>(event: &StoredEvent) -> Option<V> {
    decode_bytes::<P, V>(&event.event_type, event.position, &event.payload)
}

/// [`decode_part`] of an event given by its type, position and payload, as a scan of the log reads them
/// ([`nsml_eventstore::ScannedEvent`]).
pub fn decode_bytes<P: EventPayload, V: prost::Message + Default>(
    event_type: &str,
    position: u64,
    payload: &[u8],
) -> Option<V> {
    if event_type != P::TYPE {
        return None;
    }
    match V::decode(payload) {
        Ok(v) => {
            // The consumer decoding this event uses it: its trace shows that it applied it.
            telemetry::note_decoded();
            Some(v)
        }
        Err(err) => {
            tracing::error!(position, event_type, %err, "undecodable event payload");
            None
        }
    }
}

/// Decodes a stored event's payload if it is of type `P`.
pub fn decode<P: EventPayload>(event: &StoredEvent) -> Option<P> {
    decode_part::<P, P>(event)
}
