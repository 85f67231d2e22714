//! The live rules' compact index: what the packet-less questions ask (the
//! anti-lockout check, dry runs, the flows a change would cut, expiring
//! rules) answered from the entries and their networks, without the
//! image's port segments (7.1M of them, 57 MB, at 100k rules), which only
//! the kernel's maps keep once a generation is live.
//!
//! A lookup probes each prefix length present in one sorted table per
//! family (at most 33 for IPv4, 129 for IPv6, each a binary search) and
//! keeps the first entry, in priority order, that admits the port: the
//! answer of [`super::reference`], which the tests hold it to. Entries come
//! in slot order within a direction, so the first entry is the one with
//! the lowest slot index. A network shared by more than [`SMALL`] entries
//! (100k rules "from anywhere") gets port maps of its own, so a lookup
//! stays a few binary searches however the rules are shaped: the core asks
//! one per open flow, under its lock.

use std::{collections::HashMap, net::IpAddr};

use ipnet::IpNet;
use portcullis_common::{PCLASSES, SLOT_NONE, Segment};

use super::{Entry, before};

/// Networks with at most this many entries are scanned; larger ones have
/// port maps.
const SMALL: usize = 8;

/// One entry's network in a table: (direction, prefix length, network
/// bits) sorts the networks of one length together.
type Key<B> = (u8, u8, B);

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Index {
    /// The entries in priority order, an entry whose classes have different
    /// port ranges as one row per range (see [`Row`]).
    entries: Vec<Row>,
    v4: Table<u32>,
    /// IPv6 bits as four words, most significant first (a `u128` would
    /// align each row to 16 bytes: 32 instead of 20).
    v6: Table<[u32; 4]>,
}

/// The networks of one family: per (direction, length) present, its rows
/// (network bits, entry) sorted, so a lookup probes only the lengths
/// present, with one binary search each.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Table<B> {
    /// Every group's rows, one group after another (8 bytes a row for
    /// IPv4, 20 for IPv6: the direction and length are the group's).
    nets: Vec<(B, u32)>,
    /// (direction, length, where its rows start in `nets`), sorted.
    groups: Vec<(u8, u8, u32)>,
    /// Port maps (per protocol class: runs of ports, the lowest slot of
    /// the network's own entries) of the networks with more than `SMALL`
    /// entries, by the position of their first row in `nets`.
    large: HashMap<u32, [Vec<Segment>; PCLASSES]>,
    /// The rows as they are added, with their keys (emptied by `seal`).
    added: Vec<(Key<B>, u32)>,
}

/// An entry's ports of the classes that share one range: 12 bytes, where
/// the entry's direction, slot, four optional ranges and flag took 32 (an
/// `Any` rule, whose classes have two ranges, is two rows).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Row {
    slot: u32,
    lo: u16,
    hi: u16,
    dir: u8,
    /// Bit `c`: protocol class `c` has this range; [`HAS_NET`]: the entry
    /// has a network (one whose sources do not parse has none: it admits
    /// nothing).
    flags: u8,
}

const HAS_NET: u8 = 1 << 7;

impl Row {
    /// The row's range, if it is class `c`'s.
    fn range(&self, c: usize) -> Option<(u16, u16)> {
        (c < PCLASSES && self.flags & (1 << c) != 0).then_some((self.lo, self.hi))
    }

    fn covers(&self, c: usize, port: u16) -> bool {
        self.range(c)
            .is_some_and(|(lo, hi)| (lo..=hi).contains(&port))
    }

    /// `e`'s rows: one per distinct range, with the classes that have it.
    fn of(e: &Entry) -> impl Iterator<Item = Row> + '_ {
        let has_net = if e.nets.is_empty() { 0 } else { HAS_NET };
        let ranges = e
            .ports
            .iter()
            .enumerate()
            .filter_map(|(c, r)| Some((c, (*r)?)));
        ranges.clone().filter_map(move |(c, range)| {
            // The first class with this range makes its row.
            if ranges.clone().any(|(b, r)| b < c && r == range) {
                return None;
            }
            let classes = ranges
                .clone()
                .filter(|(_, r)| *r == range)
                .fold(0u8, |m, (b, _)| m | 1 << b);
            Some(Row {
                slot: e.slot,
                lo: range.0,
                hi: range.1,
                dir: e.dir,
                flags: classes | has_net,
            })
        })
    }
}

/// An address's bits (IPv4 in a `u32`, IPv6 in a `u128`).
trait Bits: Ord + Copy + Default {
    /// The bits under a prefix of `len` (the others cleared).
    fn masked(self, len: u8) -> Self;
}

impl Bits for u32 {
    fn masked(self, len: u8) -> u32 {
        self & !u32::MAX.checked_shr(len as u32).unwrap_or(0)
    }
}

impl Bits for [u32; 4] {
    fn masked(self, len: u8) -> [u32; 4] {
        words(from_words(self) & !u128::MAX.checked_shr(len as u32).unwrap_or(0))
    }
}

fn words(a: u128) -> [u32; 4] {
    [
        (a >> 96) as u32,
        (a >> 64) as u32,
        (a >> 32) as u32,
        a as u32,
    ]
}

fn from_words(w: [u32; 4]) -> u128 {
    w.iter().fold(0, |a, &x| (a << 32) | x as u128)
}

impl<B: Bits> Table<B> {
    fn push(&mut self, key: Key<B>, entry: u32) {
        self.added.push((key, entry));
    }

    fn seal(&mut self, entries: &[Row]) {
        self.added.sort_unstable();
        self.seal_sorted(entries, |_| None);
    }

    /// `seal` of rows sorted already; `kept(key)`: the port maps of the
    /// network `key` when they are known not to change (made otherwise).
    fn seal_sorted(
        &mut self,
        entries: &[Row],
        kept: impl Fn(&Key<B>) -> Option<[Vec<Segment>; PCLASSES]>,
    ) {
        let added = std::mem::take(&mut self.added);
        let mut from = 0;
        for network in added.chunk_by(|a, b| a.0 == b.0) {
            let Some(&(key, _)) = network.first() else {
                continue;
            };
            let (dir, len, _) = key;
            if self
                .groups
                .last()
                .is_none_or(|&(d, l, _)| (d, l) != (dir, len))
            {
                self.groups.push((dir, len, from));
            }
            if network.len() > SMALL {
                let maps = kept(&key).unwrap_or_else(|| {
                    let own: Vec<&Row> = network
                        .iter()
                        .filter_map(|(_, e)| entries.get(*e as usize))
                        .collect();
                    std::array::from_fn(|c| port_map(&own, c))
                });
                self.large.insert(from, maps);
            }
            from += network.len() as u32;
        }
        self.nets = added
            .into_iter()
            .map(|((_, _, bits), e)| (bits, e))
            .collect();
        // Collected in place, the rows would keep the keyed rows' buffer.
        self.nets.shrink_to_fit();
        self.groups.shrink_to_fit();
    }

    /// Each group as (direction, length, where its rows start in `nets`,
    /// where they end).
    fn spans(&self) -> impl Iterator<Item = (u8, u8, u32, u32)> + '_ {
        let ends = self
            .groups
            .iter()
            .skip(1)
            .map(|&(_, _, start)| start)
            .chain(std::iter::once(self.nets.len() as u32));
        self.groups
            .iter()
            .zip(ends)
            .map(|(&(dir, len, start), end)| (dir, len, start, end))
    }

    /// The rows with their keys, in key order (as `seal` sorted them),
    /// each with its place in `nets`.
    fn keyed(&self) -> impl Iterator<Item = (u32, Key<B>, u32)> + '_ {
        self.spans().flat_map(move |(dir, len, start, end)| {
            (start..end)
                .zip(
                    self.nets
                        .get(start as usize..end as usize)
                        .unwrap_or_default(),
                )
                .map(move |(at, &(bits, e))| (at, (dir, len, bits), e))
        })
    }

    /// The table with the rows `more` added, whose entries come after
    /// every entry of its own: what `seal` makes of all the rows (`more`
    /// sorts after the rows of the same network), keeping the port maps
    /// of the networks `more` does not add to.
    fn extended(&self, mut more: Vec<(Key<B>, u32)>, entries: &[Row]) -> Table<B> {
        more.sort_unstable();
        let mut rows = Vec::with_capacity(self.nets.len() + more.len());
        let mut large_at: std::collections::BTreeMap<Key<B>, u32> = Default::default();
        let mut new = more.iter().peekable();
        for (at, key, e) in self.keyed() {
            while let Some(&&row) = new.peek().filter(|(k, _)| *k < key) {
                rows.push(row);
                new.next();
            }
            if self.large.contains_key(&at) {
                large_at.insert(key, at);
            }
            rows.push((key, e));
        }
        rows.extend(new.copied());
        let mut table = Table {
            added: rows,
            ..Default::default()
        };
        table.seal_sorted(entries, |key| {
            if more.binary_search_by(|(k, _)| k.cmp(key)).is_ok() {
                return None;
            }
            large_at.get(key).and_then(|at| self.large.get(at)).cloned()
        });
        table
    }

    /// The lowest slot of direction `dir` whose network contains `addr`
    /// and whose ports cover `port` of class `pclass` (`SLOT_NONE`: none).
    fn first(&self, dir: u8, addr: B, entries: &[Row], pclass: usize, port: u16) -> u32 {
        let mut best = SLOT_NONE;
        for (d, len, start, end) in self.spans() {
            if d != dir {
                continue;
            }
            let rows = self
                .nets
                .get(start as usize..end as usize)
                .unwrap_or_default();
            let bits = addr.masked(len);
            let at = rows.partition_point(|(b, _)| *b < bits);
            // `at` is where the network would be: its rows only if present.
            if rows.get(at).is_none_or(|(b, _)| *b != bits) {
                continue;
            }
            let slot = match self.large.get(&(start + at as u32)) {
                Some(maps) => maps.get(pclass).map_or(SLOT_NONE, |m| at_port(m, port)),
                None => rows
                    .get(at..)
                    .unwrap_or_default()
                    .iter()
                    .take_while(|(b, _)| *b == bits)
                    .filter_map(|(_, e)| entries.get(*e as usize))
                    .find(|row| row.covers(pclass, port))
                    .map_or(SLOT_NONE, |row| row.slot),
            };
            if before(slot, best) {
                best = slot;
            }
        }
        best
    }
}

/// The slot of `port` in `map` (runs from port 0; empty: none).
fn at_port(map: &[Segment], port: u16) -> u32 {
    let run = map.partition_point(|s| s.start <= port);
    run.checked_sub(1)
        .and_then(|i| map.get(i))
        .map_or(SLOT_NONE, |s| s.slot)
}

/// The port map of class `c` for `own` (entries in slot order): each run
/// of ports with the lowest slot covering it, as the compiler's segments.
fn port_map(own: &[&Row], c: usize) -> Vec<Segment> {
    // Boundaries and the entries covering each elementary run, swept in
    // order with the active slots counted by index.
    let mut events: Vec<(u32, u32, i32)> = Vec::new();
    for row in own {
        if let Some((lo, hi)) = row.range(c) {
            events.push((lo as u32, row.slot, 1));
            events.push((hi as u32 + 1, row.slot, -1));
        }
    }
    if events.is_empty() {
        return Vec::new();
    }
    events.sort_unstable_by_key(|(at, _, _)| *at);
    let mut active: std::collections::BTreeMap<u32, (u32, i32)> = Default::default();
    let mut out = vec![Segment {
        start: 0,
        _pad: 0,
        slot: SLOT_NONE,
    }];
    for run in events.chunk_by(|a, b| a.0 == b.0) {
        let Some(&(at, _, _)) = run.first() else {
            continue;
        };
        if at > u16::MAX as u32 {
            break;
        }
        for &(_, slot, delta) in run {
            let e = active.entry(super::index(slot)).or_insert((slot, 0));
            e.1 += delta;
            if e.1 == 0 {
                active.remove(&super::index(slot));
            }
        }
        let slot = active.values().next().map_or(SLOT_NONE, |v| v.0);
        super::push_run(&mut out, at, slot);
    }
    out.dedup_by(|b, a| a.slot == b.slot);
    out
}

impl Index {
    pub fn of(entries: &[Entry]) -> Index {
        let mut index = Index {
            entries: Vec::with_capacity(entries.len()),
            ..Default::default()
        };
        for e in entries {
            for row in Row::of(e) {
                let i = index.entries.len() as u32;
                index.entries.push(row);
                for net in &e.nets {
                    let len = net.prefix_len();
                    match net {
                        IpNet::V4(n) => index.v4.push((e.dir, len, u32::from(n.network())), i),
                        IpNet::V6(n) => index.v6.push((e.dir, len, words(n.network().into())), i),
                    }
                }
            }
        }
        index.entries.shrink_to_fit();
        index.v4.seal(&index.entries);
        index.v6.seal(&index.entries);
        index
    }

    /// `Index::of` the entries of this index followed by `added` (whose
    /// slots come after every slot here), without the entries of this
    /// one: a rule appended to 100k does not build the index again.
    pub fn appended(&self, added: &[&Entry]) -> Index {
        let mut entries = Vec::with_capacity(self.entries.len() + added.len());
        entries.extend_from_slice(&self.entries);
        let (mut v4, mut v6) = (Vec::new(), Vec::new());
        for e in added {
            for row in Row::of(e) {
                let i = entries.len() as u32;
                entries.push(row);
                for net in &e.nets {
                    let len = net.prefix_len();
                    match net {
                        IpNet::V4(n) => v4.push(((e.dir, len, u32::from(n.network())), i)),
                        IpNet::V6(n) => v6.push(((e.dir, len, words(n.network().into())), i)),
                    }
                }
            }
        }
        Index {
            v4: self.v4.extended(v4, &entries),
            v6: self.v6.extended(v6, &entries),
            entries,
        }
    }

    /// The slot of the first entry of direction `dir` that admits a packet
    /// from `addr` of protocol class `pclass` to `port`, or `SLOT_NONE`.
    pub fn lookup(&self, dir: u8, addr: IpAddr, pclass: usize, port: u16) -> u32 {
        let e = &self.entries;
        match addr {
            IpAddr::V4(a) => self.v4.first(dir, u32::from(a), e, pclass, port),
            IpAddr::V6(a) => self.v6.first(dir, words(a.into()), e, pclass, port),
        }
    }

    /// The slots of the entries of direction `dir` with a network whose
    /// ports cover `port` of class `pclass`, each once, in priority order:
    /// who may admit it, from somewhere.
    pub fn slots_covering(&self, dir: u8, pclass: usize, port: u16) -> Vec<u32> {
        let mut out: Vec<u32> = Vec::new();
        for row in &self.entries {
            if row.dir == dir
                && row.flags & HAS_NET != 0
                && row.covers(pclass, port)
                && out.last() != Some(&row.slot)
            {
                out.push(row.slot);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use portcullis_common::{DIR_INGRESS, PCLASS_TCP, PCLASS_UDP, PCLASSES};

    use super::Index;
    use crate::{
        compile::{Entry, entries, reference},
        rules::{FirewallRule, RuleSet},
    };

    fn rule(id: usize, from: u32, to: u32, ranges: &[&str]) -> FirewallRule {
        serde_json::from_value(serde_json::json!({
            "id": format!("r{id}"), "from_port": from, "to_port": to, "ip_ranges": ranges
        }))
        .unwrap()
    }

    /// Many rules on one network (past `SMALL`: its own port maps), nested
    /// and overlapping ranges, against the one-by-one evaluator.
    #[test]
    fn a_network_shared_by_many_rules_answers_as_the_reference() {
        let mut set = RuleSet::default();
        for i in 0..40u32 {
            let from = (i * 37) % 600;
            let nets: &[&str] = match i % 4 {
                0 => &[],
                1 => &["0.0.0.0/0"],
                2 => &["10.0.0.0/8", "::/0"],
                _ => &["10.1.0.0/16"],
            };
            set.ingress_rules
                .push(rule(i as usize, from, from + i * 5, nets));
        }
        set.validate().unwrap();
        let (entries, _) = entries(&set);
        let index = Index::of(&entries);
        assert!(!index.v4.large.is_empty(), "no network took port maps");
        let addrs: [IpAddr; 4] = [
            "10.1.2.3".parse().unwrap(),
            "10.9.9.9".parse().unwrap(),
            "192.0.2.1".parse().unwrap(),
            "2001:db8::1".parse().unwrap(),
        ];
        for addr in addrs {
            for pclass in 0..PCLASSES {
                for port in 0..800u16 {
                    assert_eq!(
                        index.lookup(DIR_INGRESS, addr, pclass, port),
                        reference(&entries, DIR_INGRESS, addr, pclass, port),
                        "{addr} class {pclass} port {port}"
                    );
                }
            }
        }
        // A port no rule covers, on both transport classes.
        for pclass in [PCLASS_TCP, PCLASS_UDP] {
            assert_eq!(index.lookup(DIR_INGRESS, addrs[0], pclass, 60000), 0);
        }
        // Built from any first part and the rest appended: the same index
        // (networks past `SMALL` before the split, after it, across it).
        for split in 0..=entries.len() {
            let rest: Vec<&Entry> = entries[split..].iter().collect();
            assert!(
                Index::of(&entries[..split]).appended(&rest) == index,
                "split at entry {split}"
            );
        }
    }

    proptest::proptest! {
        /// An index with entries appended is the index of all of them.
        #[test]
        fn an_index_appended_to_is_the_index_of_all_its_entries(
            mut set in crate::compile::strategies::rule_set(),
            split in proptest::prelude::any::<proptest::sample::Index>(),
        ) {
            // (Rules on interfaces add copies of entries at the end, out of
            // slot order; an append never has them.)
            for r in set.ingress_rules.iter_mut().chain(&mut set.egress_rules) {
                r.interfaces.clear();
            }
            let (entries, _) = entries(&set);
            let split = split.index(entries.len() + 1);
            let rest: Vec<&Entry> = entries[split..].iter().collect();
            proptest::prop_assert!(
                Index::of(&entries[..split]).appended(&rest) == Index::of(&entries)
            );
        }
    }
}
