//! The outbox of a SQLite log as its writer thread last left it, kept in memory so that the relay gets the
//! events it was just woken for without reading them back from the database.
//!
//! The tail is either unknown or exactly the outbox: every event above the relay's watermark that has not been
//! acknowledged, in position order. It becomes known when the writer thread reads the whole outbox between two
//! commits ([`OutboxTail::reset`]), follows each commit of the writer after that ([`OutboxTail::committed`])
//! and each acknowledgement ([`OutboxTail::acknowledged`]), and becomes unknown again when a commit does not
//! start where it left off (another process wrote to the file), when other work ran on the write connection,
//! or when it grows past [`MOST_EVENTS`] (the relay is stuck). It is trusted for [`TRUSTED_FOR`] at a time, so
//! that appends by another process sharing the file are relayed within that time even if this one commits
//! nothing: then the head row is read, and the tail is trusted again if the log still ends where it does
//! ([`OutboxTail::renew`]), or read again whole if it does not.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::StoredEvent;

/// The most events the tail holds; past that, the outbox is read from the database again.
pub(crate) const MOST_EVENTS: usize = 20_000;

/// How long a known tail is served before it is checked against the database again.
pub(crate) const TRUSTED_FOR: Duration = Duration::from_secs(1);

/// See the module documentation.
#[derive(Debug, Default)]
pub(crate) struct OutboxTail {
    inner: Mutex<Known>,
}

#[derive(Debug, Default)]
struct Known {
    /// The log's last position and when the tail was read from the database, while the tail is known.
    head: Option<(u64, Instant)>,
    /// The outbox by position, while the tail is known; empty otherwise.
    events: BTreeMap<u64, StoredEvent>,
}

impl Known {
    fn forget(&mut self) {
        self.head = None;
        self.events.clear();
    }
}

impl OutboxTail {
    fn lock(&self) -> MutexGuard<'_, Known> {
        // Every critical section leaves the tail either known and whole or unknown.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The first `limit` events of the outbox, or `None` when the tail is unknown or due to be checked.
    pub(crate) fn peek(&self, limit: usize, now: Instant) -> Option<Vec<StoredEvent>> {
        let known = self.lock();
        let (_, read_at) = known.head?;
        if now.saturating_duration_since(read_at) >= TRUSTED_FOR {
            return None;
        }
        Some(known.events.values().take(limit).cloned().collect())
    }

    /// Whether the tail is known but due to be checked against the database (see [`renew`](Self::renew)).
    pub(crate) fn due(&self, now: Instant) -> bool {
        let known = self.lock();
        known
            .head
            .is_some_and(|(_, read_at)| now.saturating_duration_since(read_at) >= TRUSTED_FOR)
    }

    /// Trusts a known tail for another [`TRUSTED_FOR`] if the log still ends at `head`, its last position as the
    /// database has it: nothing was appended behind the writer thread's back, so the tail is still the outbox
    /// (an acknowledgement by another process's relay at most leaves an event in the tail that is published
    /// twice, which consumers drop). Returns false, leaving the tail as it was, when the log moved on. Only the
    /// writer thread calls this, between commits.
    pub(crate) fn renew(&self, head: u64, now: Instant) -> bool {
        let mut known = self.lock();
        match known.head {
            Some((known_head, _)) if known_head == head => {
                known.head = Some((head, now));
                true
            }
            _ => false,
        }
    }

    /// Takes `events` as the whole outbox of a log whose last position is `head`. Only the writer thread calls
    /// this, between commits, with what it read on the write connection.
    pub(crate) fn reset(&self, head: u64, events: &[StoredEvent], now: Instant) {
        let mut known = self.lock();
        known.forget();
        if events.len() <= MOST_EVENTS {
            known.events = events.iter().map(|e| (e.position, e.clone())).collect();
            known.head = Some((head, now));
        }
    }

    /// Whether a commit that starts after position `start` continues the known tail; if it does not, the tail
    /// becomes unknown.
    pub(crate) fn follows(&self, start: u64) -> bool {
        let mut known = self.lock();
        match known.head {
            Some((head, _)) if head == start => true,
            _ => {
                known.forget();
                false
            }
        }
    }

    /// Adds the events of a commit that started after position `start` and ended at `end`. The writer thread
    /// checks [`follows`](Self::follows) before building `events`, and nothing else moves the tail's head in
    /// between; should the two ever disagree, nothing is added and the tail becomes unknown.
    pub(crate) fn committed(&self, start: u64, end: u64, events: Vec<StoredEvent>) {
        let mut known = self.lock();
        match known.head {
            Some((head, read_at)) if head == start => {
                known
                    .events
                    .extend(events.into_iter().map(|e| (e.position, e)));
                known.head = Some((end, read_at));
                if known.events.len() > MOST_EVENTS {
                    known.forget();
                }
            }
            _ => known.forget(),
        }
    }

    /// Takes acknowledged events out of the tail, once their acknowledgement has committed.
    pub(crate) fn acknowledged(&self, positions: &[u64]) {
        let mut known = self.lock();
        for position in positions {
            known.events.remove(position);
        }
    }

    /// Makes the tail unknown: something else changed the database.
    pub(crate) fn forget(&self) {
        self.lock().forget();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Metadata;

    fn event(position: u64) -> StoredEvent {
        StoredEvent {
            position,
            stream: "s".into(),
            version: position,
            event_type: "t".into(),
            payload: vec![],
            metadata: Metadata::default(),
            hash: String::new(),
        }
    }

    fn positions(events: Option<Vec<StoredEvent>>) -> Option<Vec<u64>> {
        events.map(|e| e.iter().map(|e| e.position).collect())
    }

    #[test]
    fn a_due_tail_is_renewed_only_where_the_log_still_ends() {
        let tail = OutboxTail::default();
        let then = Instant::now();
        let later = then + TRUSTED_FOR;
        assert!(!tail.due(later), "an unknown tail is never due");
        assert!(
            !tail.renew(3, later),
            "an unknown tail is read, not renewed"
        );
        tail.reset(3, &[event(2), event(3)], then);
        assert!(!tail.due(then));
        assert!(tail.due(later));
        assert_eq!(positions(tail.peek(10, later)), None, "due: not served");
        assert!(
            !tail.renew(4, later),
            "something was appended behind the writer's back"
        );
        assert!(
            tail.due(later),
            "a failed renewal leaves the tail as it was"
        );
        assert!(tail.renew(3, later));
        assert!(!tail.due(later));
        assert_eq!(positions(tail.peek(10, later)), Some(vec![2, 3]));
    }

    #[test]
    fn unknown_until_read_from_the_database() {
        let tail = OutboxTail::default();
        let now = Instant::now();
        assert_eq!(positions(tail.peek(10, now)), None);
        assert!(!tail.follows(0));
        tail.reset(3, &[event(2), event(3)], now);
        assert_eq!(positions(tail.peek(10, now)), Some(vec![2, 3]));
        assert_eq!(positions(tail.peek(1, now)), Some(vec![2]));
    }

    #[test]
    fn follows_commits_and_acknowledgements() {
        let tail = OutboxTail::default();
        let now = Instant::now();
        tail.reset(1, &[], now);
        assert!(tail.follows(1));
        tail.committed(1, 3, vec![event(2), event(3)]);
        tail.acknowledged(&[2]);
        assert!(tail.follows(3));
        tail.committed(3, 4, vec![event(4)]);
        assert_eq!(positions(tail.peek(10, now)), Some(vec![3, 4]));
        // Out of order, and positions it never held.
        tail.acknowledged(&[4, 9]);
        assert_eq!(positions(tail.peek(10, now)), Some(vec![3]));
    }

    #[test]
    fn a_commit_elsewhere_makes_it_unknown() {
        let tail = OutboxTail::default();
        let now = Instant::now();
        tail.reset(5, &[event(5)], now);
        // Another process appended 6 and 7: this writer's next commit starts after 7.
        assert!(!tail.follows(7));
        assert_eq!(positions(tail.peek(10, now)), None);
        // A commit checked against a stale head adds nothing.
        tail.reset(7, &[event(5), event(6), event(7)], now);
        tail.committed(8, 9, vec![event(9)]);
        assert_eq!(positions(tail.peek(10, now)), None);
    }

    #[test]
    fn checked_again_after_a_while_and_bounded() {
        let tail = OutboxTail::default();
        let now = Instant::now();
        tail.reset(0, &[], now);
        assert_eq!(positions(tail.peek(10, now + TRUSTED_FOR)), None);
        let many: Vec<StoredEvent> = (1..=MOST_EVENTS as u64 + 1).map(event).collect();
        tail.reset(MOST_EVENTS as u64 + 1, &many, now);
        assert_eq!(positions(tail.peek(10, now)), None);
        tail.reset(0, &[], now);
        let most: Vec<StoredEvent> = (1..=MOST_EVENTS as u64).map(event).collect();
        tail.committed(0, MOST_EVENTS as u64, most);
        assert_eq!(tail.peek(1, now).map(|e| e.len()), Some(1));
        tail.committed(
            MOST_EVENTS as u64,
            MOST_EVENTS as u64 + 1,
            vec![event(MOST_EVENTS as u64 + 1)],
        );
        assert_eq!(positions(tail.peek(10, now)), None);
    }

    #[test]
    fn forgotten_after_other_work() {
        let tail = OutboxTail::default();
        let now = Instant::now();
        tail.reset(2, &[event(1), event(2)], now);
        tail.forget();
        assert_eq!(positions(tail.peek(10, now)), None);
    }
}
