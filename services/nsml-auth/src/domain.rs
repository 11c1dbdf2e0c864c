//! Pure rules of the auth service: password and token hashing, token lifetime, login lockout, a
//! competition's policy defaults.

use argon2::password_hash::{PasswordHasher, SaltString};
use argon2::{Argon2, PasswordHash, PasswordVerifier};
use nsml_proto::v1::{Competition, Policy};
use sha2::{Digest, Sha256};

use crate::error::AuthError;

/// How long a login token lives: 160 hours, as NSML's logins did.
pub const TOKEN_TTL_MS: i64 = 160 * 3600 * 1000;
/// Consecutive failed logins for one user from one source address that lock that user at that address.
pub const LOCKOUT_AFTER: u32 = 5;
/// Failed logins from one source address, whatever the user names, that lock every login from it.
pub const SOURCE_LOCKOUT_AFTER: u32 = 50;
/// How long a lock lasts, and how long a failure counts towards one.
pub const LOCKOUT_MS: i64 = 60_000;
/// The most (source, user) and source entries the failed-login bookkeeping holds.
pub const THROTTLE_CAPACITY: usize = 100_000;

/// The shortest password the platform takes.
pub const MIN_PASSWORD_CHARS: usize = 4;

/// Refuses a password too short to be one.
pub fn check_password(username: &str, password: &str) -> Result<(), AuthError> {
    if password.len() < MIN_PASSWORD_CHARS {
        return Err(AuthError::PasswordTooShort {
            user: username.to_string(),
        });
    }
    Ok(())
}

/// A competition's policy with every limit the manifest left out (zero) set to the platform's default.
pub fn policy_defaults(p: Option<Policy>) -> Policy {
    let mut p = p.unwrap_or_default();
    let gib = 1024u64 * 1024 * 1024;
    if p.team_cpus == 0 {
        p.team_cpus = 16;
    }
    if p.team_memory_bytes == 0 {
        p.team_memory_bytes = 170 * gib;
    }
    if p.team_sessions == 0 {
        p.team_sessions = 2;
    }
    if p.team_storage_bytes == 0 {
        p.team_storage_bytes = 450 * gib;
    }
    if p.submit_time_limit_secs == 0 {
        p.submit_time_limit_secs = 3600;
    }
    if p.submit_max_cpus == 0 {
        p.submit_max_cpus = 4;
    }
    p
}

/// Hashes a password with argon2id and a random salt.
pub fn hash_password(password: &str) -> Result<String, String> {
    let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

/// Checks a password against its stored hash.
pub fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|h| {
        Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok()
    })
}

/// The stored form of a token: hex SHA-256.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A fresh token: 256 random bits, hex.
pub fn new_token() -> String {
    use rand::RngCore;
    let mut b = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut b);
    hex::encode(b)
}

/// Verifies `password` against `hash`, or, for a user without one (unknown, or listed without a password),
/// against a hash of a random password so that the answer takes as long: how long a refusal takes says
/// nothing about whether the user exists.
pub fn verify_or_pretend(password: &str, hash: Option<&str>) -> bool {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    match hash.filter(|h| !h.is_empty()) {
        Some(h) => verify_password(password, h),
        None => {
            let dummy = DUMMY.get_or_init(|| hash_password(&new_token()).unwrap_or_default());
            verify_password(password, dummy);
            false
        }
    }
}

/// Failed-login bookkeeping for one key (kept in memory: a restart forgives).
#[derive(Debug, Default, Clone, Copy)]
pub struct Attempts {
    failures: u32,
    last_failure_ms: i64,
    locked_until_ms: i64,
}

impl Attempts {
    /// Whether a login may be tried at `now`; otherwise the time it may be retried.
    pub fn check(&self, now: i64) -> Result<(), i64> {
        if now < self.locked_until_ms {
            Err(self.locked_until_ms)
        } else {
            Ok(())
        }
    }

    /// Records a failure at `now`; the `limit`th within [`LOCKOUT_MS`] of each other locks the key.
    pub fn fail(&mut self, now: i64, limit: u32) {
        if now.saturating_sub(self.last_failure_ms) >= LOCKOUT_MS {
            self.failures = 0;
        }
        self.failures += 1;
        self.last_failure_ms = now;
        if self.failures >= limit {
            self.locked_until_ms = now.saturating_add(LOCKOUT_MS);
            self.failures = 0;
        }
    }

    /// Whether the entry says nothing any more at `now`: not locked, and its failures too old to count.
    fn expired(&self, now: i64) -> bool {
        now >= self.locked_until_ms && now.saturating_sub(self.last_failure_ms) >= LOCKOUT_MS
    }
}

/// What failed logins are counted against: a user at a source address, or a source address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Pair(String, String),
    Source(String),
}

/// Failed logins, counted per (source address, user) and per source address, never per user alone: wrong
/// passwords sent from one address lock that address out, not the user, whose own logins from elsewhere go
/// on working. Entries that say nothing any more are dropped; the map never holds more than
/// [`THROTTLE_CAPACITY`] entries, and its keys are as long as a source address and a user name at most, which
/// the caller bounds before asking.
#[derive(Debug)]
pub struct Throttle {
    entries: std::collections::HashMap<Key, Attempts>,
    capacity: usize,
}

impl Default for Throttle {
    fn default() -> Self {
        Self::with_capacity(THROTTLE_CAPACITY)
    }
}

impl Throttle {
    /// An empty bookkeeping that holds at most `capacity` entries.
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            entries: Default::default(),
            capacity: capacity.max(2),
        }
    }

    /// Whether `user` may try to log in from `source` at `now`; otherwise the time they may retry.
    pub fn check(&self, source: &str, user: &str, now: i64) -> Result<(), i64> {
        let of = |k: &Key| self.entries.get(k).map_or(Ok(()), |a| a.check(now));
        of(&Key::Source(source.into()))?;
        of(&Key::Pair(source.into(), user.into()))
    }

    /// Records a failed login of `user` from `source` at `now`.
    pub fn fail(&mut self, source: &str, user: &str, now: i64) {
        self.make_room(now);
        self.entries
            .entry(Key::Source(source.into()))
            .or_default()
            .fail(now, SOURCE_LOCKOUT_AFTER);
        self.entries
            .entry(Key::Pair(source.into(), user.into()))
            .or_default()
            .fail(now, LOCKOUT_AFTER);
    }

    /// Forgets `user`'s failures at `source` after a successful login there. The source's own count stays:
    /// an attacker's logging in to an account of their own between guesses must not reset it.
    pub fn succeed(&mut self, source: &str, user: &str) {
        self.entries.remove(&Key::Pair(source.into(), user.into()));
    }

    /// Leaves room for two entries: drops those that say nothing any more, and if that is not enough, the
    /// half whose locks and failures end soonest.
    fn make_room(&mut self, now: i64) {
        if self.entries.len() + 2 <= self.capacity {
            return;
        }
        self.entries.retain(|_, a| !a.expired(now));
        if self.entries.len() + 2 <= self.capacity {
            return;
        }
        let mut ends: Vec<i64> = self
            .entries
            .values()
            .map(|a| {
                a.locked_until_ms
                    .max(a.last_failure_ms.saturating_add(LOCKOUT_MS))
            })
            .collect();
        let mid = ends.len() / 2;
        let (_, cut, _) = ends.select_nth_unstable(mid);
        let cut = *cut;
        self.entries.retain(|_, a| {
            a.locked_until_ms
                .max(a.last_failure_ms.saturating_add(LOCKOUT_MS))
                > cut
        });
    }
}

/// Refuses rounds a competition cannot hold, whoever sent them (the manifest loader says the same in the
/// manifest's words): each round named once, over at least one of the competition's datasets, no dataset in
/// two rounds, and closing after it opens.
pub fn check_rounds(c: &Competition) -> Result<(), AuthError> {
    let Some(policy) = &c.policy else {
        return Ok(());
    };
    let bad = |why: String| AuthError::BadRound {
        competition: c.id.clone(),
        why,
    };
    let mut names = std::collections::HashSet::new();
    let mut placed = std::collections::HashMap::new();
    for r in &policy.rounds {
        if r.name.trim().is_empty() {
            return Err(bad("a round has no name".into()));
        }
        if !names.insert(r.name.as_str()) {
            return Err(bad(format!("round `{}` is named twice", r.name)));
        }
        if r.datasets.is_empty() {
            return Err(bad(format!("round `{}` lists no datasets", r.name)));
        }
        for d in &r.datasets {
            if !c.datasets.iter().any(|known| known.name == *d) {
                return Err(bad(format!(
                    "round `{}` lists dataset `{d}`, which the competition does not",
                    r.name
                )));
            }
            if let Some(first) = placed.insert(d.as_str(), r.name.as_str()) {
                return Err(bad(format!(
                    "dataset `{d}` is in rounds `{first}` and `{}`; a dataset belongs to one round",
                    r.name
                )));
            }
        }
        if r.opens_at_ms > 0 && r.closes_at_ms > 0 && r.closes_at_ms <= r.opens_at_ms {
            return Err(bad(format!("round `{}` closes before it opens", r.name)));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nsml_proto::v1::{DatasetRef, Round};

    fn with_rounds(rounds: Vec<Round>) -> Competition {
        Competition {
            id: "demo".into(),
            datasets: ["a", "b"]
                .map(|name| DatasetRef {
                    name: name.into(),
                    ..Default::default()
                })
                .to_vec(),
            policy: Some(Policy {
                rounds,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn round(name: &str, datasets: &[&str], opens_at_ms: i64, closes_at_ms: i64) -> Round {
        Round {
            name: name.into(),
            datasets: datasets.iter().map(|d| d.to_string()).collect(),
            opens_at_ms,
            closes_at_ms,
            ..Default::default()
        }
    }

    #[test]
    fn given_rounds_sent_to_the_api_when_checked_then_only_well_formed_ones_pass() {
        let ok = with_rounds(vec![
            round("pre", &["a"], 1, 2),
            round("final", &["b"], 2, 3),
        ]);
        assert!(check_rounds(&ok).is_ok());
        let cases = [
            (vec![round("", &["a"], 0, 0)], "no name"),
            (
                vec![round("pre", &["a"], 0, 0), round("pre", &["b"], 0, 0)],
                "named twice",
            ),
            (vec![round("pre", &[], 0, 0)], "lists no datasets"),
            (vec![round("pre", &["zzz"], 0, 0)], "does not"),
            (
                vec![round("pre", &["a"], 0, 0), round("final", &["a"], 0, 0)],
                "one round",
            ),
            (vec![round("pre", &["a"], 5, 5)], "closes before it opens"),
        ];
        for (rounds, why) in cases {
            let err = check_rounds(&with_rounds(rounds))
                .expect_err(why)
                .to_string();
            assert!(err.contains(why), "{err}");
        }
    }

    #[test]
    fn given_a_manifest_without_limits_when_defaulted_then_the_platform_defaults_apply() {
        let p = policy_defaults(None);
        assert_eq!((p.team_cpus, p.team_sessions), (16, 2));
        assert_eq!(p.team_memory_bytes, 170 * 1024 * 1024 * 1024);
        assert_eq!(p.team_storage_bytes, 450 * 1024 * 1024 * 1024);
        assert_eq!((p.submit_time_limit_secs, p.submit_max_cpus), (3600, 4));
    }

    #[test]
    fn given_limits_in_the_manifest_when_defaulted_then_they_stay() {
        let p = policy_defaults(Some(Policy {
            team_cpus: 3,
            team_sessions: 9,
            ..Default::default()
        }));
        assert_eq!((p.team_cpus, p.team_sessions, p.submit_max_cpus), (3, 9, 4));
    }

    #[test]
    fn given_a_three_character_password_when_checked_then_it_is_refused_naming_the_user() {
        let err = check_password("alice", "abc").unwrap_err();
        assert_eq!(
            err.to_string(),
            "the password for `alice` is too short: use at least 4 characters"
        );
        assert!(check_password("alice", "abcd").is_ok());
    }

    #[test]
    fn passwords_verify_only_themselves() {
        let h = hash_password("s3cret").unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_password("s3cret", &h));
        assert!(!verify_password("S3cret", &h));
    }

    #[test]
    fn repeated_failures_lock_the_user_at_that_address_only() {
        let mut t = Throttle::default();
        for _ in 0..LOCKOUT_AFTER {
            assert!(t.check("10.0.0.9", "alice", 1000).is_ok());
            t.fail("10.0.0.9", "alice", 1000);
        }
        assert_eq!(t.check("10.0.0.9", "alice", 1000), Err(1000 + LOCKOUT_MS));
        assert!(
            t.check("10.0.0.1", "alice", 1000).is_ok(),
            "alice's own logins from elsewhere go on"
        );
        assert!(
            t.check("10.0.0.9", "bob", 1000).is_ok(),
            "other users from that address are not locked by five failures"
        );
        assert!(t.check("10.0.0.9", "alice", 1000 + LOCKOUT_MS).is_ok());
    }

    #[test]
    fn many_failures_from_one_address_lock_the_address() {
        let mut t = Throttle::default();
        for i in 0..SOURCE_LOCKOUT_AFTER {
            t.fail("10.0.0.9", &format!("user{i}"), 1000);
        }
        assert_eq!(t.check("10.0.0.9", "someone", 1000), Err(1000 + LOCKOUT_MS));
        assert!(t.check("10.0.0.1", "someone", 1000).is_ok());
    }

    #[test]
    fn a_success_forgets_the_pair_but_not_the_address() {
        let mut t = Throttle::default();
        for _ in 0..LOCKOUT_AFTER - 1 {
            t.fail("s", "alice", 1000);
        }
        t.succeed("s", "alice");
        t.fail("s", "alice", 1000);
        assert!(
            t.check("s", "alice", 1000).is_ok(),
            "the count started again"
        );
        assert!(t.entries.contains_key(&Key::Source("s".into())));
    }

    #[test]
    fn the_bookkeeping_never_outgrows_its_capacity() {
        let mut t = Throttle::with_capacity(100);
        // Old failures are dropped first.
        for i in 0..40 {
            t.fail(&format!("old{i}"), "u", 0);
        }
        for i in 0..1000 {
            t.fail(&format!("src{i}"), "u", LOCKOUT_MS + i);
            assert!(t.entries.len() <= 100, "{} entries", t.entries.len());
        }
        assert!(!t.entries.contains_key(&Key::Source("old0".into())));
        // The newest are kept.
        assert!(t.entries.contains_key(&Key::Source("src999".into())));
    }

    #[test]
    fn an_unknown_user_is_verified_against_a_dummy_hash() {
        assert!(!verify_or_pretend("x", None));
        assert!(!verify_or_pretend("x", Some("")));
        let h = hash_password("s3cret").unwrap();
        assert!(verify_or_pretend("s3cret", Some(&h)));
    }

    #[test]
    fn tokens_are_256_bits_and_stored_hashed() {
        let t = new_token();
        assert_eq!(t.len(), 64);
        assert_ne!(hash_token(&t), t);
        assert_eq!(hash_token(&t).len(), 64);
    }
}
