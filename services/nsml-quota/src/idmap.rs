//! Maps keyed by the ids the platform mints (session names, UUIDs), which a ledger keeps one of per decision
//! ever taken. They never shrink and are read on every admission, so they must grow without a pause.

use std::hash::{BuildHasher, BuildHasherDefault, Hasher};

use hashbrown::HashTable;
use hashbrown::hash_table::Entry as Slot;

/// A fast hash for ids, in the manner of rustc's FxHash. The keys are ids the platform mints, so SipHash's
/// defence against chosen keys buys nothing, and replay spends its time in these maps.
#[derive(Debug, Clone, Copy, Default)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        const K: u64 = 0x517c_c1b7_2722_0a95;
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.0 = (self.0.rotate_left(5) ^ u64::from_le_bytes(w)).wrapping_mul(K);
        }
        for &b in chunks.remainder() {
            self.0 = (self.0.rotate_left(5) ^ u64::from(b)).wrapping_mul(K);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type Hash = BuildHasherDefault<IdHasher>;

/// How many tables an [`IdMap`] spreads its entries over.
const SHARDS: usize = 64;

/// One entry: the key's hash is kept with it, so a table that grows moves entries without reading their keys
/// again, and a lookup compares keys only when the whole hash matches.
#[derive(Debug, Clone)]
struct Entry<V> {
    hash: u64,
    key: String,
    value: V,
}

/// A hash map from ids to `V` that grows in small steps.
///
/// A single hash table doubles when full, moving every entry at once: at 100,000 decisions that took 20–40 ms,
/// under the lock every admission of the team waits on. Here the entries are spread over `SHARDS` tables by
/// their hash, so each doubling moves about one 64th of them. The shard is picked by bits of the hash that a
/// table under 2^32 buckets never uses for the bucket nor for its tag (the top 7 bits), so entries stay as
/// well spread inside each table as in one. The tables are allocated on the first insert.
///
/// Each key is hashed once per call, and each entry keeps its hash: a table growing re-reads no key (in a
/// ledger of a million decisions each key is a cache miss away), and a lookup reads a key only for an entry
/// whose whole hash is the one looked up, not for every entry whose 7-bit tag matches.
#[derive(Debug, Clone)]
pub struct IdMap<V> {
    shards: Vec<HashTable<Entry<V>>>,
}

impl<V> Default for IdMap<V> {
    fn default() -> Self {
        Self { shards: Vec::new() }
    }
}

/// The hash a key is stored and looked up under, and the shard it is in (bits 32..38 of the hash).
fn hash_of(key: &str) -> (u64, usize) {
    let hash = Hash::default().hash_one(key);
    (hash, (hash >> 32) as usize % SHARDS)
}

impl<V> IdMap<V> {
    pub fn get(&self, key: &str) -> Option<&V> {
        let (hash, shard) = hash_of(key);
        self.shards
            .get(shard)?
            .find(hash, |e| e.hash == hash && e.key == key)
            .map(|e| &e.value)
    }

    pub fn get_mut(&mut self, key: &str) -> Option<&mut V> {
        let (hash, shard) = hash_of(key);
        self.shards
            .get_mut(shard)?
            .find_mut(hash, |e| e.hash == hash && e.key == key)
            .map(|e| &mut e.value)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// Inserts `value` under `key`; returns the value it replaced.
    pub fn insert(&mut self, key: String, value: V) -> Option<V> {
        if self.shards.is_empty() {
            self.shards.resize_with(SHARDS, HashTable::new);
        }
        let (hash, shard) = hash_of(&key);
        match self.shards[shard].entry(hash, |e| e.hash == hash && e.key == key, |e| e.hash) {
            Slot::Occupied(mut o) => Some(std::mem::replace(&mut o.get_mut().value, value)),
            Slot::Vacant(v) => {
                v.insert(Entry { hash, key, value });
                None
            }
        }
    }

    pub fn remove(&mut self, key: &str) -> Option<V> {
        let (hash, shard) = hash_of(key);
        let found = self
            .shards
            .get_mut(shard)?
            .find_entry(hash, |e| e.hash == hash && e.key == key)
            .ok()?;
        Some(found.remove().0.value)
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(HashTable::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.shards.iter().all(HashTable::is_empty)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// Against a `BTreeMap` fed the same inserts, replacements and removals.
    #[test]
    fn behaves_as_a_map() {
        let (mut map, mut model) = (IdMap::default(), BTreeMap::new());
        assert!(map.is_empty() && map.get("a").is_none() && map.remove("a").is_none());
        for i in 0..20_000u64 {
            let key = format!("demo/team-{}/{}", i % 7, i * 7919 % 5_003);
            assert_eq!(map.insert(key.clone(), i), model.insert(key.clone(), i));
            if i % 3 == 0 {
                let gone = format!("demo/team-{}/{}", i % 5, i % 4_001);
                assert_eq!(map.remove(&gone), model.remove(&gone));
            }
            if let Some(v) = map.get_mut(&key) {
                *v += 1;
                *model.get_mut(&key).unwrap() += 1;
            }
        }
        assert_eq!(map.len(), model.len());
        for (k, v) in &model {
            assert_eq!(map.get(k), Some(v));
            assert!(map.contains_key(k));
        }
        assert!(!map.contains_key("demo/elsewhere"));
    }

    /// Minted ids spread over every shard, none holding more than twice its share: a doubling never moves
    /// much more than a 64th of the map.
    #[test]
    fn ids_spread_over_the_shards() {
        let mut map = IdMap::default();
        for i in 0..64_000u32 {
            map.insert(uuid::Uuid::now_v7().to_string(), i);
            map.insert(format!("demo/t{}-cls/{i}", i % 3), i);
        }
        let sizes: Vec<usize> = map.shards.iter().map(HashTable::len).collect();
        let share = map.len() / SHARDS;
        assert!(
            sizes.iter().all(|&n| n > share / 2 && n < share * 2),
            "{sizes:?}"
        );
    }
}
