//! The hash chain: how each event's hash is computed, and how a break in the chain is described.

use std::fmt;

use sha2::{Digest, Sha256};

/// The "previous hash" of the first event in the log: 64 zeros.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Domain tag that starts every hashed encoding, so an event hash can't collide with other SHA-256 uses.
const DOMAIN: &[u8] = b"nsml.event.v1";

/// Computes an event's hash: hex SHA-256 over the previous event's hash and this event's content.
///
/// The hashed bytes are the domain tag `nsml.event.v1` followed by each field as an 8-byte big-endian length and
/// the field's bytes, in this order: `prev_hash` (hex text), `position` (8-byte big-endian), `stream`, `version`
/// (8-byte big-endian), `event_type`, `payload`, `metadata_json` (the metadata exactly as stored). Length prefixes
/// make the encoding unambiguous: no two different events encode to the same bytes.
pub fn event_hash(
    prev_hash: &str,
    position: u64,
    stream: &str,
    version: u64,
    event_type: &str,
    payload: &[u8],
    metadata_json: &str,
) -> String {
    let mut hasher = Sha256::new();
    hasher.update(DOMAIN);
    field(&mut hasher, prev_hash.as_bytes());
    field(&mut hasher, &position.to_be_bytes());
    field(&mut hasher, stream.as_bytes());
    field(&mut hasher, &version.to_be_bytes());
    field(&mut hasher, event_type.as_bytes());
    field(&mut hasher, payload);
    field(&mut hasher, metadata_json.as_bytes());
    hex::encode(hasher.finalize())
}

fn field(hasher: &mut Sha256, bytes: &[u8]) {
    hasher.update((bytes.len() as u64).to_be_bytes());
    hasher.update(bytes);
}

/// What kind of tampering (or corruption) a chain break points to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainBreakKind {
    /// The event's content (type, payload, metadata, stream, version or position) no longer matches its hash:
    /// it was edited.
    HashMismatch,
    /// Positions are missing from the log: events were deleted.
    PositionGap,
    /// A stream skips a version: an event of the stream was deleted (and the log re-chained around it).
    VersionGap,
    /// The event does not link to the event before it (or the log head does not link to the last event): an
    /// event was inserted or events were reordered.
    BrokenLink,
}

impl ChainBreakKind {
    fn phrase(self) -> &'static str {
        match self {
            ChainBreakKind::HashMismatch => "was edited",
            ChainBreakKind::PositionGap => "is next to deleted events",
            ChainBreakKind::VersionGap => "follows a deleted event of its stream",
            ChainBreakKind::BrokenLink => {
                "is not linked to the event before it (inserted or reordered)"
            }
        }
    }
}

/// The first place where the log's chain does not hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainBreak {
    /// Position of the event where the break was found (for events deleted at the end of the log, the first
    /// missing position).
    pub position: u64,
    /// The event's stream (empty when the event itself is missing).
    pub stream: String,
    /// The event's version in its stream (0 when the event itself is missing).
    pub version: u64,
    /// The event's id (empty when the event itself is missing or its metadata can't be read).
    pub event_id: String,
    /// What kind of break this is.
    pub kind: ChainBreakKind,
    /// Specifics: which hashes, positions or versions disagree.
    pub detail: String,
}

impl fmt::Display for ChainBreak {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.stream.is_empty() {
            write!(f, "event at position {} is missing", self.position)?;
        } else {
            write!(
                f,
                "event at position {} (stream `{}` version {}, id {}) {}",
                self.position,
                self.stream,
                self.version,
                if self.event_id.is_empty() {
                    "unknown"
                } else {
                    &self.event_id
                },
                self.kind.phrase()
            )?;
        }
        write!(f, ": {}", self.detail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_hex_sha256_and_depends_on_every_field() {
        let base = event_hash(GENESIS_HASH, 1, "s", 1, "t", b"p", "{}");
        assert_eq!(base.len(), 64);
        assert!(base.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(
            base,
            event_hash(&"1".repeat(64), 1, "s", 1, "t", b"p", "{}")
        );
        assert_ne!(base, event_hash(GENESIS_HASH, 2, "s", 1, "t", b"p", "{}"));
        assert_ne!(base, event_hash(GENESIS_HASH, 1, "s2", 1, "t", b"p", "{}"));
        assert_ne!(base, event_hash(GENESIS_HASH, 1, "s", 2, "t", b"p", "{}"));
        assert_ne!(base, event_hash(GENESIS_HASH, 1, "s", 1, "t2", b"p", "{}"));
        assert_ne!(base, event_hash(GENESIS_HASH, 1, "s", 1, "t", b"p2", "{}"));
        assert_ne!(base, event_hash(GENESIS_HASH, 1, "s", 1, "t", b"p", "{ }"));
    }

    #[test]
    fn length_prefixes_keep_field_boundaries() {
        assert_ne!(
            event_hash(GENESIS_HASH, 1, "ab", 1, "c", b"", "{}"),
            event_hash(GENESIS_HASH, 1, "a", 1, "bc", b"", "{}")
        );
    }

    #[test]
    fn display_names_the_event() {
        let b = ChainBreak {
            position: 17,
            stream: "quota-acme".into(),
            version: 3,
            event_id: "e-1".into(),
            kind: ChainBreakKind::HashMismatch,
            detail: "stored hash ab does not match its content".into(),
        };
        assert_eq!(
            b.to_string(),
            "event at position 17 (stream `quota-acme` version 3, id e-1) was edited: stored hash ab does not match its content"
        );
    }
}
