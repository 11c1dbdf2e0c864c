//! Rows as both backends read them, and their conversion to [`StoredEvent`]s.

use crate::{Metadata, StoreError, StoredEvent};

/// Columns selected for an event read: position, stream, version, event_type, payload, metadata, hash.
pub(crate) type EventRow = (i64, String, i64, String, Vec<u8>, String, String);

/// Columns selected for chain verification: an [`EventRow`] plus the stored previous hash.
pub(crate) type ChainRow = (i64, String, i64, String, Vec<u8>, String, String, String);

/// Converts a read row into an event.
pub(crate) fn into_event(row: EventRow) -> Result<StoredEvent, StoreError> {
    let (position, stream, version, event_type, payload, metadata, hash) = row;
    let position = to_u64(position, "position")?;
    let metadata = decode_metadata(position, &metadata)?;
    Ok(StoredEvent {
        position,
        stream,
        version: to_u64(version, "version")?,
        event_type,
        payload,
        metadata,
        hash,
    })
}

/// Parses an event's stored metadata.
pub(crate) fn decode_metadata(position: u64, json: &str) -> Result<Metadata, StoreError> {
    serde_json::from_str(json).map_err(|e| {
        StoreError::Corrupt(format!(
            "metadata of the event at position {position} is not valid: {e}"
        ))
    })
}

/// Converts every row of a page.
pub(crate) fn into_events(rows: Vec<EventRow>) -> Result<Vec<StoredEvent>, StoreError> {
    rows.into_iter().map(into_event).collect()
}

/// Reads a stored integer that must not be negative.
pub(crate) fn to_u64(value: i64, what: &str) -> Result<u64, StoreError> {
    u64::try_from(value).map_err(|_| StoreError::Corrupt(format!("negative {what} {value}")))
}

/// Binds a position, version or limit; values beyond `i64::MAX` can't occur in the log, so they clamp.
pub(crate) fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Serializes metadata the way it is stored and hashed.
pub(crate) fn metadata_json(metadata: &Metadata) -> String {
    // Invariant: `Metadata` holds only strings and integers under fixed field names, which serde_json always
    // serializes.
    serde_json::to_string(metadata).expect("metadata always serializes to json")
}
