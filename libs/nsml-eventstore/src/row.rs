//! Rows as both backends read them, and their conversion to [`StoredEvent`]s.

use std::collections::BTreeSet;

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
#[allow(
    clippy::expect_used,
    reason = "an invariant of the type, not a fault the caller can meet"
)]
pub(crate) fn metadata_json(metadata: &Metadata) -> String {
    // Invariant: `Metadata` holds only strings and integers under fixed field names, which serde_json always
    // serializes.
    serde_json::to_string(metadata).expect("metadata always serializes to json")
}

/// The relay's watermark after acknowledging `positions`: every event at or below `relayed` was published,
/// and `beyond` holds positions above it acknowledged out of order. Positions just above the watermark move
/// it on; others wait in `beyond` until the gap below them closes. Positions at or below the watermark, or
/// beyond `head` (not appended yet), are ignored. `None` when nothing changes.
pub(crate) fn advance_watermark(
    relayed: u64,
    beyond: impl IntoIterator<Item = u64>,
    head: u64,
    positions: &[u64],
) -> Option<(u64, Vec<u64>)> {
    let mut acked: BTreeSet<u64> = beyond.into_iter().collect();
    let before = (relayed, acked.len());
    acked.extend(positions.iter().filter(|&&p| p > relayed && p <= head));
    let mut relayed = relayed;
    while acked.remove(&(relayed + 1)) {
        relayed += 1;
    }
    ((relayed, acked.len()) != before).then(|| (relayed, acked.into_iter().collect()))
}

#[cfg(test)]
mod tests {
    use super::advance_watermark;

    #[test]
    fn the_watermark_moves_over_what_was_acknowledged_in_order() {
        assert_eq!(advance_watermark(0, [], 5, &[1, 2]), Some((2, vec![])));
        assert_eq!(advance_watermark(2, [], 5, &[4]), Some((2, vec![4])));
        assert_eq!(advance_watermark(2, [4], 5, &[3]), Some((4, vec![])));
        assert_eq!(
            advance_watermark(4, [], 5, &[1, 4, 99]),
            None,
            "old and unknown positions"
        );
        assert_eq!(advance_watermark(4, [], 5, &[]), None);
    }
}
