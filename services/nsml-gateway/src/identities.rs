//! Identities the auth service resolved, kept for a moment so that a client's burst of calls asks it once.
//!
//! An entry lives [`TTL`] at most. Every call that may change who someone is (logout, users and teams added,
//! competitions applied) goes through the auth service's API, so this gateway forgets every entry before such a
//! call and again once it is answered; an answer to an authentication that was asked before the change is not
//! kept. What another gateway of a distributed deployment changed, and a token that expires, take effect here
//! within [`TTL`].
//!
//! The map is ours rather than `moka`'s: what must be right here is the generation guard (an answer asked
//! before a change is never kept), which a cache crate would not give, and a bounded map under one lock is
//! all the rest needs.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use tonic::metadata::BinaryMetadataValue;

/// How long a resolved identity is trusted without asking the auth service again.
pub const TTL: Duration = Duration::from_secs(1);
/// The most tokens remembered; past it, expired entries go, and if none had, all of them.
const CAPACITY: usize = 10_000;

/// A caller as the gateway passes it on: the rate limiter's key and the identity metadata services read.
#[derive(Debug)]
pub struct Resolved {
    pub username: String,
    pub metadata: BinaryMetadataValue,
}

impl Resolved {
    /// The caller `identity` names, with its metadata encoded once.
    pub fn new(identity: &nsml_proto::v1::Identity) -> Self {
        Self {
            username: identity.username.clone(),
            metadata: nsml_common::caller::Caller::identity_metadata(identity),
        }
    }
}

/// When an authentication was asked, as far as forgetting goes: an answer is kept only if nothing was forgotten
/// since.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Asked(u64);

#[derive(Default)]
struct State {
    generation: u64,
    entries: HashMap<[u8; 32], (Arc<Resolved>, Instant)>,
}

/// See the module documentation.
#[derive(Default)]
pub struct Identities {
    state: Mutex<State>,
}

/// Tokens are kept only as digests, so the map holds nothing a client could sign in with.
fn key(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl Identities {
    /// The identity `token` resolved to less than [`TTL`] before `now`.
    pub fn get(&self, token: &str, now: Instant) -> Option<Arc<Resolved>> {
        let key = key(token);
        let state = self.state.lock();
        state
            .entries
            .get(&key)
            .filter(|(_, at)| now.saturating_duration_since(*at) < TTL)
            .map(|(resolved, _)| resolved.clone())
    }

    /// Marks the start of an authentication, to be passed to [`Identities::keep`] with its answer.
    pub fn asking(&self) -> Asked {
        Asked(self.state.lock().generation)
    }

    /// Keeps what `token` resolved to at `now`, unless entries were forgotten since the authentication was
    /// `asked`.
    pub fn keep(&self, token: &str, resolved: Arc<Resolved>, asked: Asked, now: Instant) {
        let key = key(token);
        let mut state = self.state.lock();
        if state.generation != asked.0 {
            return;
        }
        if state.entries.len() >= CAPACITY {
            state
                .entries
                .retain(|_, (_, at)| now.saturating_duration_since(*at) < TTL);
            if state.entries.len() >= CAPACITY {
                state.entries.clear();
            }
        }
        state.entries.insert(key, (resolved, now));
    }

    /// Forgets every identity, and every answer still being awaited.
    pub fn forget_all(&self) {
        let mut state = self.state.lock();
        state.generation += 1;
        state.entries.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nsml_proto::v1::Identity;

    fn alice() -> Arc<Resolved> {
        Arc::new(Resolved::new(&Identity {
            username: "alice".into(),
            ..Default::default()
        }))
    }

    #[test]
    fn an_identity_is_kept_for_less_than_the_ttl() {
        let ids = Identities::default();
        let t0 = Instant::now();
        assert!(ids.get("tok", t0).is_none());
        ids.keep("tok", alice(), ids.asking(), t0);
        assert_eq!(ids.get("tok", t0).unwrap().username, "alice");
        assert!(
            ids.get("tok", t0 + TTL - Duration::from_millis(1))
                .is_some()
        );
        assert!(ids.get("tok", t0 + TTL).is_none(), "expired at the TTL");
        assert!(ids.get("other", t0).is_none(), "keyed by the token");
    }

    #[test]
    fn forgetting_drops_entries_and_answers_asked_before_it() {
        let ids = Identities::default();
        let t0 = Instant::now();
        ids.keep("tok", alice(), ids.asking(), t0);
        let asked = ids.asking();
        ids.forget_all();
        assert!(ids.get("tok", t0).is_none());
        // An authentication in flight across the change may have seen the old identity.
        ids.keep("tok", alice(), asked, t0);
        assert!(ids.get("tok", t0).is_none());
        ids.keep("tok", alice(), ids.asking(), t0);
        assert!(ids.get("tok", t0).is_some());
    }

    #[test]
    fn a_full_map_drops_expired_entries_then_everything() {
        let ids = Identities::default();
        let t0 = Instant::now();
        for i in 0..CAPACITY {
            ids.keep(&format!("old{i}"), alice(), ids.asking(), t0);
        }
        let later = t0 + TTL;
        ids.keep("new", alice(), ids.asking(), later);
        assert_eq!(ids.state.lock().entries.len(), 1, "the expired ones went");
        for i in 1..CAPACITY {
            ids.keep(&format!("fresh{i}"), alice(), ids.asking(), later);
        }
        ids.keep("last", alice(), ids.asking(), later);
        assert_eq!(
            ids.state.lock().entries.len(),
            1,
            "none had expired: all went"
        );
        assert!(ids.get("last", later).is_some());
    }
}
