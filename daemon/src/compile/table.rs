//! A map built once and then only read: a list sorted by key.
//!
//! The IPv6 tables of a 100k-rule image hold 250k entries. As a list they
//! are made by one sort (the prefixes come nearly in order) instead of
//! 250k hashed inserts, take no more room than their entries, are looked
//! up by binary search, and are written to the kernel and kept (see
//! `dataplane::mapio::write_keyed`) in key order without sorting again.

use std::hash::{Hash, Hasher};

use sha2::{Digest as _, Sha256};

/// Entries sorted by key, each key once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Table<K, V>(Vec<(K, V)>);

impl<K, V> Default for Table<K, V> {
    fn default() -> Self {
        Table(Vec::new())
    }
}

impl<K: Ord, V> Table<K, V> {
    /// The table of `entries`; of entries with the same key, the last.
    pub fn of(mut entries: Vec<(K, V)>) -> Table<K, V> {
        // Stable: entries of one key stay in their order; the last is kept.
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        entries.reverse();
        entries.dedup_by(|a, b| a.0 == b.0);
        entries.reverse();
        Table(entries)
    }

    /// The table of `entries`, already sorted by key with each key once
    /// (as [`Table::entries`] gives them).
    pub fn from_sorted(entries: Vec<(K, V)>) -> Table<K, V> {
        debug_assert!(entries.windows(2).all(|w| matches!(w, [a, b] if a.0 < b.0)));
        Table(entries)
    }

    pub fn get(&self, key: &K) -> Option<&V> {
        let at = self.0.binary_search_by(|(k, _)| k.cmp(key)).ok()?;
        self.0.get(at).map(|(_, v)| v)
    }

    pub fn contains_key(&self, key: &K) -> bool {
        self.get(key).is_some()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The entries in key order.
    pub fn entries(&self) -> &[(K, V)] {
        &self.0
    }

    pub fn keys(&self) -> impl Iterator<Item = &K> {
        self.0.iter().map(|(k, _)| k)
    }
}

impl<K: Hash, V: Hash> Table<K, V> {
    /// SHA-256 of the entries in key order: equal digests, equal tables
    /// (a rule writer cannot make two tables that share one). The data
    /// plane keeps it for a table too large to keep whole, to skip a write
    /// that would change nothing.
    pub fn digest(&self) -> [u8; 32] {
        let mut h = Sha256Hasher::default();
        self.0.hash(&mut h);
        h.finish_digest()
    }
}

/// A [`Hasher`] that feeds SHA-256, through a buffer: the entries hash
/// field by field, a few bytes at a time.
#[derive(Default)]
struct Sha256Hasher {
    sha: Sha256,
    buffer: Vec<u8>,
}

impl Sha256Hasher {
    const FLUSH: usize = 1 << 16;

    fn finish_digest(mut self) -> [u8; 32] {
        self.sha.update(&self.buffer);
        self.sha.finalize().into()
    }
}

impl Hasher for Sha256Hasher {
    fn write(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
        if self.buffer.len() >= Self::FLUSH {
            self.sha.update(&self.buffer);
            self.buffer.clear();
        }
    }

    /// Not used: [`Table::digest`] is the digest.
    fn finish(&self) -> u64 {
        0
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// As a map with the same entries inserted in order.
        #[test]
        fn a_table_answers_as_a_map(entries in prop::collection::vec((0u8..32, any::<u16>()), 0..64)) {
            let map: BTreeMap<u8, u16> = entries.iter().copied().collect();
            let table = Table::of(entries);
            prop_assert_eq!(table.entries(), &map.iter().map(|(k, v)| (*k, *v)).collect::<Vec<_>>()[..]);
            for k in 0..40u8 {
                prop_assert_eq!(table.get(&k), map.get(&k));
            }
        }

        /// Equal digests exactly for equal tables (where they differ in a
        /// key, a value, or the entries' split between the two).
        #[test]
        fn digests_differ_exactly_when_the_tables_do(
            a in prop::collection::vec((0u8..8, 0u16..4), 0..8),
            b in prop::collection::vec((0u8..8, 0u16..4), 0..8),
        ) {
            let (a, b) = (Table::of(a), Table::of(b));
            prop_assert_eq!(a.digest() == b.digest(), a == b);
        }
    }
}
