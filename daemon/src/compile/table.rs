//! A map built once and then only read: a list sorted by key.
//!
//! The IPv6 tables of a 100k-rule image hold 250k entries. As a list they
//! are made by one sort (the prefixes come nearly in order) instead of
//! 250k hashed inserts, take no more room than their entries, are looked
//! up by binary search, and are written to the kernel and kept (see
//! `dataplane::mapio::write_keyed`) in key order without sorting again.

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
    }
}
