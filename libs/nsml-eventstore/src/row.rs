//! Rows as both backends read them, and their conversion to [`StoredEvent`]s.

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::{Metadata, ScannedEvent, StoreError, StoredEvent};

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
///
/// Metadata is stored as [`metadata_json`] writes it, and every read of the log parses it, so that form is read
/// directly (about three times as fast as serde_json's parse into the struct, which was half the cost of reading
/// an event from SQLite). Text in any other form (older field sets, escapes, whitespace) goes to serde_json, so
/// both accept and refuse the same texts.
pub(crate) fn decode_metadata(position: u64, json: &str) -> Result<Metadata, StoreError> {
    if let Some(metadata) = parse_written(json) {
        return Ok(metadata);
    }
    serde_json::from_str(json).map_err(|e| {
        StoreError::Corrupt(format!(
            "metadata of the event at position {position} is not valid: {e}"
        ))
    })
}

/// Parses metadata in exactly the form [`metadata_json`] writes (fields in declaration order, no whitespace,
/// strings without escapes, integers in plain decimal); `None` for anything else.
fn parse_written(json: &str) -> Option<Metadata> {
    let m = parse_written_ref(json)?;
    Some(Metadata {
        event_id: m.event_id.to_owned(),
        command_id: m.command_id.to_owned(),
        correlation_id: m.correlation_id.to_owned(),
        causation_id: m.causation_id.to_owned(),
        actor: m.actor.to_owned(),
        traceparent: m.traceparent.to_owned(),
        recorded_at_ms: m.recorded_at_ms,
        schema_version: m.schema_version,
    })
}

/// Metadata in the written form, its strings borrowed from the text.
struct MetadataRef<'a> {
    event_id: &'a str,
    command_id: &'a str,
    correlation_id: &'a str,
    causation_id: &'a str,
    actor: &'a str,
    traceparent: &'a str,
    recorded_at_ms: i64,
    schema_version: u32,
}

/// [`parse_written`] without copying the strings.
fn parse_written_ref(json: &str) -> Option<MetadataRef<'_>> {
    let mut text = Written { rest: json };
    let event_id = text.string_field("{\"event_id\":")?;
    let command_id = text.string_field(",\"command_id\":")?;
    let correlation_id = text.string_field(",\"correlation_id\":")?;
    let causation_id = text.string_field(",\"causation_id\":")?;
    let actor = text.string_field(",\"actor\":")?;
    let traceparent = text.string_field(",\"traceparent\":")?;
    text.literal(",\"recorded_at_ms\":")?;
    let recorded_at_ms = text.integer()?;
    text.literal(",\"schema_version\":")?;
    let schema_version = u32::try_from(text.integer()?).ok()?;
    text.literal("}")?;
    text.rest.is_empty().then_some(MetadataRef {
        event_id,
        command_id,
        correlation_id,
        causation_id,
        actor,
        traceparent,
        recorded_at_ms,
        schema_version,
    })
}

/// When an event was recorded, from its stored metadata: what [`decode_metadata`] reads of it, without copying
/// the ids out of metadata in the written form.
pub(crate) fn recorded_at_ms(position: u64, json: &str) -> Result<i64, StoreError> {
    match parse_written_ref(json) {
        Some(m) => Ok(m.recorded_at_ms),
        None => Ok(decode_metadata(position, json)?.recorded_at_ms),
    }
}

/// A scanned event from the columns read: position, stream, version, type, payload, metadata.
pub(crate) fn scanned(
    names: &mut Names,
    position: i64,
    stream: &str,
    version: i64,
    event_type: &str,
    payload: Vec<u8>,
    metadata: &str,
) -> Result<ScannedEvent, StoreError> {
    let position = to_u64(position, "position")?;
    Ok(ScannedEvent {
        position,
        stream: names.stream(stream),
        version: to_u64(version, "version")?,
        event_type: names.event_type(event_type),
        payload,
        recorded_at_ms: recorded_at_ms(position, metadata)?,
    })
}

/// The least name above every name that starts with `prefix`, in the order of their UTF-8 bytes (SQLite's
/// text order): the prefix with its last character that has a successor replaced by that successor, and what
/// followed it dropped. `None` when no character has one (the empty prefix, or only U+10FFFF).
pub(crate) fn prefix_end(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        let next = (u32::from(last) + 1..=u32::from(char::MAX)).find_map(char::from_u32);
        if let Some(next) = next {
            chars.push(next);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

/// The names of a page of [`ScannedEvent`]s, each made once: a stream's name is shared by its events that
/// follow one another, a type's by every event of the page of that type.
#[derive(Default)]
pub(crate) struct Names {
    stream: Option<Arc<str>>,
    types: Vec<Arc<str>>,
}

impl Names {
    pub(crate) fn stream(&mut self, name: &str) -> Arc<str> {
        match &self.stream {
            Some(last) if **last == *name => last.clone(),
            _ => self.stream.insert(Arc::from(name)).clone(),
        }
    }

    pub(crate) fn event_type(&mut self, name: &str) -> Arc<str> {
        if let Some(known) = self.types.iter().find(|t| ***t == *name) {
            return known.clone();
        }
        let made: Arc<str> = Arc::from(name);
        self.types.push(made.clone());
        made
    }
}

/// What is left to read of metadata text in the written form.
struct Written<'a> {
    rest: &'a str,
}

impl<'a> Written<'a> {
    fn literal(&mut self, expected: &str) -> Option<()> {
        self.rest = self.rest.strip_prefix(expected)?;
        Some(())
    }

    /// A field's name (as `expected`) and its string value. Escapes and control characters (which JSON refuses
    /// unescaped) are left to serde_json.
    fn string_field(&mut self, expected: &str) -> Option<&'a str> {
        self.literal(expected)?;
        let body = self.rest.strip_prefix('"')?;
        let end = body
            .bytes()
            .position(|b| b == b'"' || b == b'\\' || b < 0x20)?;
        if body.as_bytes()[end] != b'"' {
            return None;
        }
        // Invariant: `end` is the index of an ASCII quote, so both slices fall on character boundaries.
        let (value, rest) = (&body[..end], &body[end + 1..]);
        self.rest = rest;
        Some(value)
    }

    /// An integer as JSON writes it: an optional minus, then `0` or digits without a leading zero; at most 18
    /// digits, so it cannot overflow (longer ones, and `-0`, are left to serde_json).
    fn integer(&mut self) -> Option<i64> {
        let (negative, digits) = match self.rest.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, self.rest),
        };
        let len = digits.bytes().take_while(u8::is_ascii_digit).count();
        if len == 0 || len > 18 || (len > 1 && digits.starts_with('0')) {
            return None;
        }
        let value = digits.as_bytes()[..len]
            .iter()
            .fold(0_i64, |n, d| n * 10 + i64::from(d - b'0'));
        if negative && value == 0 {
            // serde_json reads `-0` as a float, which no integer field takes.
            return None;
        }
        self.rest = &digits[len..];
        Some(if negative { -value } else { value })
    }
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
    use super::{advance_watermark, decode_metadata, metadata_json, parse_written};
    use crate::Metadata;

    fn metadata(text: &str, recorded_at_ms: i64, schema_version: u32) -> Metadata {
        Metadata {
            event_id: format!("0193a5b2-{text}"),
            command_id: text.to_owned(),
            correlation_id: String::new(),
            causation_id: format!("{text}{text}"),
            actor: "user:alice".to_owned(),
            traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned(),
            recorded_at_ms,
            schema_version,
        }
    }

    #[test]
    fn stored_metadata_reads_back_as_written_and_as_serde_json_reads_it() {
        let texts = [
            "",
            "plain",
            "ünïcode ✓",
            "quote \" inside",
            "back\\slash",
            "tab\there",
            "\u{1}",
        ];
        let times = [
            0,
            7,
            -7,
            1_764_000_000_000,
            i64::MAX,
            i64::MIN,
            999_999_999_999_999_999,
        ];
        for text in texts {
            for (i, at) in times.into_iter().enumerate() {
                let m = metadata(text, at, [0, 1, u32::MAX][i % 3]);
                let json = metadata_json(&m);
                assert_eq!(decode_metadata(1, &json).unwrap(), m, "{json}");
                let plain = !text.contains(['"', '\\']) && !text.contains(char::is_control);
                assert_eq!(
                    parse_written(&json).is_some(),
                    plain && at.unsigned_abs() < 10_u64.pow(18),
                    "{json}"
                );
            }
        }
    }

    #[test]
    fn metadata_in_other_forms_is_read_or_refused_as_serde_json_does() {
        let written = metadata_json(&metadata("x", 5, 1));
        let cases = [
            r#"{"event_id":"e","recorded_at_ms":5}"#.to_owned(),
            written.replace(':', ": "),
            written.replace("\"recorded_at_ms\":5", "\"recorded_at_ms\":05"),
            written.replace("\"recorded_at_ms\":5", "\"recorded_at_ms\":5.0"),
            written.replace("\"recorded_at_ms\":5", "\"recorded_at_ms\":-0"),
            written.replace("\"schema_version\":1", "\"schema_version\":4294967296"),
            written.replace("\"schema_version\":1", "\"schema_version\":-1"),
            format!("{written} "),
            format!("{written}x"),
            written.trim_end_matches('}').to_owned(),
            written.replace("\"x\"", "\"x\ty\""),
            "not json".to_owned(),
        ];
        for json in cases {
            let ours = decode_metadata(1, &json).ok();
            let theirs = serde_json::from_str::<Metadata>(&json).ok();
            assert_eq!(ours, theirs, "{json}");
        }
    }

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
