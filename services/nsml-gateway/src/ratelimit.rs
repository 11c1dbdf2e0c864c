//! Per-caller token buckets, so one client cannot starve the others.
//!
//! A caller is a signed-in user, or, for a call that has not (yet) been resolved to one, the address it came
//! from: anonymous calls (logins) and calls whose token must still be asked of the auth service are charged
//! to their address before anything is asked, so a flood of wrong logins or forged tokens is limited at the
//! door and falls on its sender's address alone.
//!
//! The map of buckets is bounded: a bucket that has refilled to its burst is the same as no bucket, so such
//! buckets are dropped whenever the map is full; if it is still full, a caller without a bucket is charged
//! to one bucket shared by all such callers until room is made. (The `governor` crate's keyed limiter would
//! need the same explicit sweep to bound its memory and cannot say when a refused caller may retry as
//! precisely as this, so the platform keeps its own.)

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Instant;

use parking_lot::Mutex;

/// Sustained requests per second per caller.
pub const DEFAULT_RATE: f64 = 500.0;
/// Burst a caller may spend at once.
pub const DEFAULT_BURST: f64 = 2000.0;
/// The most callers with a bucket of their own (the map holds one more: the overflow's).
pub const CAPACITY: usize = 100_000;

/// Whom a call is charged to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Key {
    /// A signed-in user, by name.
    User(String),
    /// The address of a caller not known to be anyone; IPv6 callers by their /64, which one host is given.
    Address(IpAddr),
    /// Every caller without a bucket while the map is full.
    Overflow,
}

impl Key {
    /// The key of an address.
    pub fn address(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Key::Address(IpAddr::V4(v4)),
                None => {
                    let net = u128::from(v6) & !((1u128 << 64) - 1);
                    Key::Address(IpAddr::V6(net.into()))
                }
            },
            v4 => Key::Address(v4),
        }
    }
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Key::User(u) => write!(f, "user {u}"),
            Key::Address(ip) => write!(f, "address {ip}"),
            Key::Overflow => f.write_str("unknown callers"),
        }
    }
}

/// See the module documentation.
pub struct Limiter {
    rate: f64,
    burst: f64,
    capacity: usize,
    buckets: Mutex<HashMap<Key, (f64, Instant)>>,
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

    /// A limiter allowing `rate` requests per second per caller, `burst` at once.
    pub fn new(rate: f64, burst: f64) -> Self {
        Self::with_capacity(rate, burst, CAPACITY)
    }

    fn with_capacity(rate: f64, burst: f64, capacity: usize) -> Self {
        Self {
            rate,
            burst,
            capacity: capacity.max(1),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token for `caller`, or says in how many milliseconds one is available.
    pub fn check(&self, caller: &Key) -> Result<(), u64> {
        self.check_at(caller, Instant::now())
    }

    fn check_at(&self, caller: &Key, now: Instant) -> Result<(), u64> {
        let mut b = self.buckets.lock();
        let mut key = caller;
        if !b.contains_key(key) && b.len() >= self.capacity {
            let (rate, burst) = (self.rate, self.burst);
            b.retain(|_, (tokens, last)| {
                *tokens + now.saturating_duration_since(*last).as_secs_f64() * rate < burst
            });
            if b.len() >= self.capacity {
                key = &Key::Overflow;
            }
        }
        let (tokens, last) = b.entry(key.clone()).or_insert((self.burst, now));
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
    use std::time::Duration;

    fn user(u: &str) -> Key {
        Key::User(u.into())
    }

    fn ip(i: u32) -> Key {
        Key::address(std::net::Ipv4Addr::from(i).into())
    }

    #[test]
    fn a_burst_is_allowed_then_refused_then_refilled() {
        let l = Limiter::new(10.0, 3.0);
        let t0 = Instant::now();
        assert!(l.check_at(&user("a"), t0).is_ok());
        assert!(l.check_at(&user("a"), t0).is_ok());
        assert!(l.check_at(&user("a"), t0).is_ok());
        assert_eq!(l.check_at(&user("a"), t0), Err(100));
        assert!(
            l.check_at(&user("b"), t0).is_ok(),
            "callers have their own buckets"
        );
        assert!(
            l.check_at(&user("a"), t0 + Duration::from_millis(100))
                .is_ok()
        );
    }

    #[test]
    fn anonymous_callers_are_limited_by_their_address_alone() {
        let l = Limiter::new(10.0, 3.0);
        let t0 = Instant::now();
        let flooder = Key::address("10.0.0.9".parse().unwrap());
        while l.check_at(&flooder, t0).is_ok() {}
        assert!(
            l.check_at(&Key::address("10.0.0.1".parse().unwrap()), t0)
                .is_ok(),
            "another address still gets in"
        );
        // One IPv6 host's addresses share a bucket; they cannot be rotated past it.
        let a = Key::address("2001:db8::1".parse().unwrap());
        let b = Key::address("2001:db8::ffff:2".parse().unwrap());
        assert_eq!(a, b);
    }

    #[test]
    fn the_map_stays_bounded_and_full_buckets_go_first() {
        let l = Limiter::with_capacity(10.0, 3.0, 100);
        let t0 = Instant::now();
        for i in 0..100u32 {
            l.check_at(&ip(i), t0).unwrap();
        }
        // A second later every bucket has refilled: they are dropped to make room.
        let t1 = t0 + Duration::from_secs(1);
        l.check_at(&user("new"), t1).unwrap();
        assert_eq!(l.buckets.lock().len(), 1);
        // Full of busy callers, newcomers share one bucket rather than growing the map.
        for i in 0..99u32 {
            l.check_at(&ip(i), t1).unwrap();
        }
        for i in 1000..2000u32 {
            let _ = l.check_at(&ip(i), t1);
            assert!(l.buckets.lock().len() <= 101);
        }
        assert!(
            l.check_at(&ip(5000), t1).is_err(),
            "the shared bucket is spent"
        );
    }
}
