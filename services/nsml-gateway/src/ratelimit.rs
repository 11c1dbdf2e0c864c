//! A per-caller token bucket, so one client cannot starve the others.

use std::collections::HashMap;
use std::time::Instant;

use parking_lot::Mutex;

/// Sustained requests per second per caller.
pub const DEFAULT_RATE: f64 = 500.0;
/// Burst a caller may spend at once.
pub const DEFAULT_BURST: f64 = 2000.0;

pub struct Limiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl Limiter {
    /// The default limiter, or `NSML_RATE_LIMIT` requests per second per caller (burst four times that).
    pub fn from_env() -> Self {
        match std::env::var("NSML_RATE_LIMIT")
            .ok()
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|r| *r > 0.0)
        {
            Some(rate) => Self::new(rate, rate * 4.0),
            None => Self::new(DEFAULT_RATE, DEFAULT_BURST),
        }
    }

    pub fn new(rate: f64, burst: f64) -> Self {
        Self {
            rate,
            burst,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token for `caller`, or says in how many milliseconds one is available.
    pub fn check(&self, caller: &str) -> Result<(), u64> {
        self.check_at(caller, Instant::now())
    }

    fn check_at(&self, caller: &str, now: Instant) -> Result<(), u64> {
        let mut b = self.buckets.lock();
        let (tokens, last) = b.entry(caller.to_string()).or_insert((self.burst, now));
        let elapsed = now.saturating_duration_since(*last).as_secs_f64();
        *tokens = (*tokens + elapsed * self.rate).min(self.burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err((((1.0 - *tokens) / self.rate) * 1000.0).ceil() as u64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_allowed_then_refused_then_refilled() {
        let l = Limiter::new(10.0, 3.0);
        let t0 = Instant::now();
        assert!(l.check_at("a", t0).is_ok());
        assert!(l.check_at("a", t0).is_ok());
        assert!(l.check_at("a", t0).is_ok());
        assert_eq!(l.check_at("a", t0), Err(100));
        assert!(
            l.check_at("b", t0).is_ok(),
            "callers have their own buckets"
        );
        assert!(
            l.check_at("a", t0 + std::time::Duration::from_millis(100))
                .is_ok()
        );
    }
}
