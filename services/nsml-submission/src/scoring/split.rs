//! The division of the test items into the public and the private part of a board.

use std::collections::HashSet;

/// Splits the test keys into the public and the private part; both keep the order of `keys`.
///
/// With `private_keys` non-empty, exactly those keys (of the ones in `keys`) are private. Otherwise
/// `round(fraction * n)` keys are private, chosen by a seeded hash of each key: the same keys, seed and fraction
/// always give the same split, whatever the order of `keys`. When `n >= 2`, both parts keep at least one key, so a
/// fraction of 0 or 1 still leaves one item on the other side and both boards always have a score.
pub fn split(
    keys: &[String],
    private_keys: &[String],
    fraction: f64,
    seed: u64,
) -> (Vec<String>, Vec<String>) {
    let private: HashSet<&str> = if private_keys.is_empty() {
        let n = keys.len();
        let fraction = if fraction.is_nan() {
            0.0
        } else {
            fraction.clamp(0.0, 1.0)
        };
        let mut take = (fraction * n as f64).round() as usize;
        if n >= 2 {
            take = take.clamp(1, n - 1);
        }
        let mut order: Vec<(u64, &str)> = keys
            .iter()
            .map(|k| (seeded_hash(seed, k), k.as_str()))
            .collect();
        order.sort_unstable();
        order.into_iter().take(take).map(|(_, k)| k).collect()
    } else {
        private_keys.iter().map(String::as_str).collect()
    };
    keys.iter()
        .cloned()
        .partition(|k| !private.contains(k.as_str()))
}

/// A stable 64-bit hash of a key under a seed (FNV-1a, then the SplitMix64 finaliser), fixed forever so that a
/// dataset's split never changes between releases.
fn seeded_hash(seed: u64, key: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for b in key.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scoring::test_support::strings;

    fn keys(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("item-{i:03}")).collect()
    }

    #[test]
    fn split_is_deterministic_disjoint_and_complete() {
        let k = keys(100);
        let (public, private) = split(&k, &[], 0.3, 42);
        assert_eq!(private.len(), 30);
        assert_eq!(public.len(), 70);
        assert_eq!(split(&k, &[], 0.3, 42), (public.clone(), private.clone()));
        let p: HashSet<&String> = private.iter().collect();
        assert!(public.iter().all(|k| !p.contains(k)));
        let mut all: Vec<String> = public.iter().chain(&private).cloned().collect();
        all.sort();
        assert_eq!(all, k);
        // Both parts keep the keys' order.
        assert!(public.windows(2).all(|w| w[0] < w[1]));
        assert!(private.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn split_does_not_depend_on_key_order_but_on_the_seed() {
        let k = keys(50);
        let mut reversed = k.clone();
        reversed.reverse();
        let (_, a) = split(&k, &[], 0.5, 7);
        let (_, mut b) = split(&reversed, &[], 0.5, 7);
        b.reverse();
        assert_eq!(a, b);
        let (_, c) = split(&k, &[], 0.5, 8);
        assert_ne!(a, c);
    }

    #[test]
    fn split_rounds_and_keeps_both_parts_non_empty() {
        let k = keys(5);
        assert_eq!(split(&k, &[], 0.5, 1).1.len(), 3); // round(2.5) = 3
        assert_eq!(split(&k, &[], 0.1, 1).1.len(), 1); // round(0.5) = 1
        for fraction in [0.0, 1.0, f64::NAN, -3.0, 7.0] {
            let (public, private) = split(&keys(2), &[], fraction, 1);
            assert_eq!((public.len(), private.len()), (1, 1), "fraction {fraction}");
        }
        assert_eq!(
            split(&keys(1), &[], 0.5, 1).0.len() + split(&keys(1), &[], 0.5, 1).1.len(),
            1
        );
        assert_eq!(split(&[], &[], 0.5, 1), (vec![], vec![]));
    }

    #[test]
    fn split_with_listed_private_keys() {
        let k = strings(&["a", "b", "c", "d"]);
        let (public, private) = split(&k, &strings(&["d", "b", "not-a-key"]), 0.9, 1);
        assert_eq!(public, strings(&["a", "c"]));
        assert_eq!(private, strings(&["b", "d"]));
    }
}
