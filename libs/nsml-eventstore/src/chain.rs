//! Verification of the hash chain, shared by both backends: a walker that checks one event at a time, so the
//! log can be read in pages.

use std::collections::HashMap;

use crate::hash::{ChainBreak, ChainBreakKind, GENESIS_HASH, event_hash};
use crate::row::ChainRow;
use crate::{Metadata, StoreError};

/// How many events chain verification reads per page.
pub(crate) const VERIFY_PAGE: i64 = 10_000;

/// The last event checked, for naming it in a break found at the end.
#[derive(Default)]
struct Last {
    position: u64,
    stream: String,
    version: u64,
    metadata: String,
}

/// Checks events in position order against the chain.
pub(crate) struct ChainWalker {
    next_position: u64,
    prev_hash: String,
    versions: HashMap<String, u64>,
    last: Last,
}

impl ChainWalker {
    /// A walker at the start of the log.
    pub(crate) fn new() -> Self {
        ChainWalker {
            next_position: 1,
            prev_hash: GENESIS_HASH.to_owned(),
            versions: HashMap::new(),
            last: Last::default(),
        }
    }

    /// Checks the next event; returns the break if it does not continue the chain.
    pub(crate) fn check(&mut self, row: &ChainRow) -> Result<Option<ChainBreak>, StoreError> {
        let (position, stream, version, event_type, payload, metadata, hash, prev_hash) = row;
        let position = crate::row::to_u64(*position, "position")?;
        let version = crate::row::to_u64(*version, "version")?;
        let named = |kind: ChainBreakKind, detail: String| ChainBreak {
            position,
            stream: stream.clone(),
            version,
            event_id: event_id(metadata),
            kind,
            detail,
        };

        if position != self.next_position {
            let missing = if position == self.next_position + 1 {
                format!("position {} is missing before it", self.next_position)
            } else {
                format!(
                    "positions {}..={} are missing before it",
                    self.next_position,
                    position.saturating_sub(1)
                )
            };
            return Ok(Some(named(ChainBreakKind::PositionGap, missing)));
        }
        if *prev_hash != self.prev_hash {
            let detail = if position == 1 {
                format!("the first event links to hash {prev_hash} instead of the genesis hash")
            } else {
                format!(
                    "it links to hash {prev_hash} but the event before it has hash {}",
                    self.prev_hash
                )
            };
            return Ok(Some(named(ChainBreakKind::BrokenLink, detail)));
        }
        let computed = event_hash(
            prev_hash, position, stream, version, event_type, payload, metadata,
        );
        if computed != *hash {
            return Ok(Some(named(
                ChainBreakKind::HashMismatch,
                format!(
                    "stored hash {hash} does not match its content (which hashes to {computed})"
                ),
            )));
        }
        let stream_version = self.versions.get(stream.as_str()).copied().unwrap_or(0);
        if version != stream_version + 1 {
            return Ok(Some(named(
                ChainBreakKind::VersionGap,
                format!(
                    "the stream was at version {stream_version} before it, so its version should be {}",
                    stream_version + 1
                ),
            )));
        }

        match self.versions.get_mut(stream.as_str()) {
            Some(v) => *v = version,
            None => {
                self.versions.insert(stream.clone(), version);
            }
        }
        self.next_position = position + 1;
        self.prev_hash.clone_from(hash);
        self.last.position = position;
        self.last.stream.clone_from(stream);
        self.last.version = version;
        self.last.metadata.clone_from(metadata);
        Ok(None)
    }

    /// After the last event up to the head: checks that the log head points at the last event.
    pub(crate) fn finish(self, head_position: u64, head_hash: &str) -> Option<ChainBreak> {
        let last_position = self.next_position - 1;
        if last_position < head_position {
            return Some(ChainBreak {
                position: self.next_position,
                stream: String::new(),
                version: 0,
                event_id: String::new(),
                kind: ChainBreakKind::PositionGap,
                detail: format!(
                    "the log head records position {head_position} but the log ends at position {last_position}"
                ),
            });
        }
        if self.prev_hash != head_hash {
            let detail = format!(
                "the log head records hash {head_hash} for the last event but its hash is {}",
                self.prev_hash
            );
            return Some(ChainBreak {
                position: self.last.position,
                event_id: event_id(&self.last.metadata),
                stream: self.last.stream,
                version: self.last.version,
                kind: ChainBreakKind::BrokenLink,
                detail,
            });
        }
        None
    }
}

/// The break for an event found after the log head: it was appended without going through the log.
pub(crate) fn beyond_head(row: &ChainRow, head_position: u64) -> Result<ChainBreak, StoreError> {
    let (position, stream, version, _, _, metadata, _, _) = row;
    Ok(ChainBreak {
        position: crate::row::to_u64(*position, "position")?,
        stream: stream.clone(),
        version: crate::row::to_u64(*version, "version")?,
        event_id: event_id(metadata),
        kind: ChainBreakKind::BrokenLink,
        detail: format!(
            "the log head ends at position {head_position}, so this event was inserted after it"
        ),
    })
}

fn event_id(metadata_json: &str) -> String {
    serde_json::from_str::<Metadata>(metadata_json)
        .map(|m| m.event_id)
        .unwrap_or_default()
}
