//! Pure rules of the auth service: password and token hashing, token lifetime, login lockout.

use argon2::password_hash::{PasswordHasher, SaltString};
use argon2::{Argon2, PasswordHash, PasswordVerifier};
use sha2::{Digest, Sha256};

/// How long a login token lives: 160 hours, as NSML's logins did.
pub const TOKEN_TTL_MS: i64 = 160 * 3600 * 1000;
/// Consecutive failed logins that lock an account.
pub const LOCKOUT_AFTER: u32 = 5;
/// How long a locked account stays locked.
pub const LOCKOUT_MS: i64 = 60_000;

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

/// Failed-login bookkeeping for one user (kept in memory: a restart forgives).
#[derive(Debug, Default, Clone, Copy)]
pub struct Attempts {
    pub failures: u32,
    pub locked_until_ms: i64,
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

    /// Records a failure at `now`.
    pub fn fail(&mut self, now: i64) {
        self.failures += 1;
        if self.failures >= LOCKOUT_AFTER {
            self.locked_until_ms = now + LOCKOUT_MS;
            self.failures = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_verify_only_themselves() {
        let h = hash_password("s3cret").unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_password("s3cret", &h));
        assert!(!verify_password("S3cret", &h));
    }

    #[test]
    fn repeated_failures_lock_for_a_while() {
        let mut a = Attempts::default();
        for _ in 0..LOCKOUT_AFTER {
            assert!(a.check(1000).is_ok());
            a.fail(1000);
        }
        assert_eq!(a.check(1000), Err(1000 + LOCKOUT_MS));
        assert!(a.check(1000 + LOCKOUT_MS).is_ok());
    }

    #[test]
    fn tokens_are_256_bits_and_stored_hashed() {
        let t = new_token();
        assert_eq!(t.len(), 64);
        assert_ne!(hash_token(&t), t);
        assert_eq!(hash_token(&t).len(), 64);
    }
}
