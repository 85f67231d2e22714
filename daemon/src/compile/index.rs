//! The live rules' compact index: what the packet-less questions ask (the
//! anti-lockout check, dry runs, the flows a change would cut, expiring
//! rules) answered from the entries and their networks, without the
//! image's port segments (7.1M of them, 57 MB, at 100k rules), which only
//! the kernel's maps keep once a generation is live.
//!
//! A lookup probes each prefix length present in one sorted table per
//! family (at most 33 for IPv4, 129 for IPv6, each a binary search) and
//! keeps the first entry, in priority order, that admits the port: the
//! answer of [`super::reference`], which the tests hold it to.

use std::net::IpAddr;

use ipnet::IpNet;
use portcullis_common::SLOT_NONE;

use super::{Entry, Ports};

/// One entry's network in a table: (direction, prefix length, network
/// bits) sorts the networks of one length together.
type Key<B> = (u8, u8, B);

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Index {
    /// Per entry, in priority order: its direction, slot and ports, and
    /// whether it has a network (one whose sources do not parse has none:
    /// it admits nothing).
    entries: Vec<(u8, u32, Ports, bool)>,
    v4: Table<u32>,
    /// IPv6 bits as four words, most significant first (a `u128` would
    /// align each row to 16 bytes: 48 instead of 24).
    v6: Table<[u32; 4]>,
}

/// The networks of one family: (key, entry) sorted, and the (direction,
/// length) pairs present, so a lookup probes only those.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Table<B> {
    nets: Vec<(Key<B>, u32)>,
    lengths: Vec<(u8, u8)>,
}

/// An address's bits (IPv4 in a `u32`, IPv6 in a `u128`).
trait Bits: Ord + Copy {
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
        self.nets.push((key, entry));
    }

    fn seal(&mut self) {
        self.nets.sort_unstable();
        self.nets.shrink_to_fit();
        self.lengths = self.nets.iter().map(|((d, l, _), _)| (*d, *l)).collect();
        self.lengths.dedup();
        self.lengths.shrink_to_fit();
    }

    /// The entries whose network of direction `dir` contains `addr`.
    fn containing(&self, dir: u8, addr: B) -> impl Iterator<Item = u32> + '_ {
        let lengths = self.lengths.iter().filter(move |(d, _)| *d == dir);
        lengths.flat_map(move |&(d, len)| {
            let key = (d, len, addr.masked(len));
            let from = self.nets.partition_point(|(k, _)| *k < key);
            self.nets
                .get(from..)
                .unwrap_or_default()
                .iter()
                .take_while(move |(k, _)| *k == key)
                .map(|(_, e)| *e)
        })
    }
}

impl Index {
    pub fn of(entries: &[Entry]) -> Index {
        let mut index = Index {
            entries: Vec::with_capacity(entries.len()),
            ..Default::default()
        };
        for (i, e) in (0u32..).zip(entries) {
            index
                .entries
                .push((e.dir, e.slot, e.ports, !e.nets.is_empty()));
            for net in &e.nets {
                let len = net.prefix_len();
                match net {
                    IpNet::V4(n) => index.v4.push((e.dir, len, u32::from(n.network())), i),
                    IpNet::V6(n) => index.v6.push((e.dir, len, words(n.network().into())), i),
                }
            }
        }
        index.v4.seal();
        index.v6.seal();
        index
    }

    /// The slot of the first entry of direction `dir` that admits a packet
    /// from `addr` of protocol class `pclass` to `port`, or `SLOT_NONE`.
    pub fn lookup(&self, dir: u8, addr: IpAddr, pclass: usize, port: u16) -> u32 {
        let first = match addr {
            IpAddr::V4(a) => {
                self.first_admitting(self.v4.containing(dir, u32::from(a)), pclass, port)
            }
            IpAddr::V6(a) => {
                self.first_admitting(self.v6.containing(dir, words(a.into())), pclass, port)
            }
        };
        first
            .and_then(|i| self.entries.get(i as usize))
            .map_or(SLOT_NONE, |(_, slot, _, _)| *slot)
    }

    /// The slots of the entries of direction `dir` with a network whose
    /// ports cover `port` of class `pclass`, each once, in priority order:
    /// who may admit it, from somewhere.
    pub fn slots_covering(&self, dir: u8, pclass: usize, port: u16) -> Vec<u32> {
        let mut out: Vec<u32> = Vec::new();
        for (d, slot, ports, has_net) in &self.entries {
            if *d == dir && *has_net && covers(ports, pclass, port) && out.last() != Some(slot) {
                out.push(*slot);
            }
        }
        out
    }

    fn first_admitting(
        &self,
        candidates: impl Iterator<Item = u32>,
        pclass: usize,
        port: u16,
    ) -> Option<u32> {
        candidates
            .filter(|&i| {
                self.entries
                    .get(i as usize)
                    .is_some_and(|(_, _, ports, _)| covers(ports, pclass, port))
            })
            .min()
    }
}

fn covers(ports: &Ports, pclass: usize, port: u16) -> bool {
    ports
        .get(pclass)
        .copied()
        .flatten()
        .is_some_and(|(lo, hi)| (lo..=hi).contains(&port))
}
