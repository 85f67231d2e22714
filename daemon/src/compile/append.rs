//! A change that only appends ingress rules with IPv4 sources, compiled
//! against the live generation's maps instead of from the whole set (pure:
//! the maps are read through [`LiveMaps`], which the data plane implements
//! over the kernel's arrays and tests over an [`Image`]).
//!
//! Why this is exact: a prefix's port map is its chain of rules overlaid
//! one by one, each port going to the first (lowest) slot that admits it,
//! and taking the first of two slots does not depend on the order they
//! come in. So the map of an address after rules are appended is the live
//! map of that address with the new rules overlaid. Appended rules take the
//! slots after every live one (the change is refused here otherwise, see
//! [`append`]), so the live slots keep their numbers, names and counters'
//! meaning.
//!
//! What the delta holds: the IPv4 table's cells that change (new chunks
//! where a new prefix ends below a cell that held a region), and the new
//! regions and port lists, appended after the live ones. Regions and lists
//! the change leaves behind stay where they are until a whole compile lays
//! the maps out afresh: the change is refused when what it appends would
//! not fit (the whole compile then decides).

use std::collections::HashMap;

use ipnet::IpNet;
use portcullis_common::{
    DIR_INGRESS, MAX_SEGMENTS_PER_CLASS, PCLASSES, Region, Segment, V4_CHUNK_ENTRIES, V4_NODE,
};

use super::{Entry, Image, Limits, overlay};
use crate::rules::RuleSet;

/// The live generation's rule arrays, as far as [`Extent`] says they are
/// used. `None`: past the array, which refuses the change.
pub trait LiveMaps {
    fn root(&self, i: u32) -> Option<u32>;
    fn chunk(&self, i: u32) -> Option<u32>;
    fn region(&self, i: u32) -> Option<Region>;
    fn segment(&self, i: u32) -> Option<Segment>;
}

/// How much of each rule array an image uses (entries; `chunks` counts
/// cells, 16 per chunk), as the data plane keeps it of what it wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Extent {
    pub root: u32,
    pub chunks: u32,
    pub regions: u32,
    pub segments: u32,
    /// Distinct IPv4 prefixes (what `[capacity] prefixes` counts for IPv4);
    /// after a delta an upper bound.
    pub v4_prefixes: u32,
}

impl Extent {
    /// The extent of a whole image.
    pub fn of(image: &Image) -> Extent {
        let n = |len: usize| u32::try_from(len).unwrap_or(u32::MAX);
        Extent {
            root: n(image.v4_root.len()),
            chunks: n(image.v4_chunks.len()),
            regions: n(image.regions.len()),
            segments: n(image.segments.len()),
            v4_prefixes: n(image.v4.len()),
        }
    }
}

/// What turns the live generation's rule arrays (`base`) into the next
/// one's. Cells are (index, value); chunk cells at `base.chunks` and past
/// it are new chunks, each of whose 16 cells is listed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Delta {
    pub base: Extent,
    /// The hash of the rules the live generation holds: the data plane
    /// writes the delta only over those.
    pub base_hash: String,
    /// The root's length once written: the live one's, or one block more.
    pub root_len: u32,
    pub root: Vec<(u32, u32)>,
    pub chunks: Vec<(u32, u32)>,
    /// Appended at `base.regions`.
    pub regions: Vec<Region>,
    /// Appended at `base.segments`.
    pub segments: Vec<Segment>,
    /// The IPv4 prefixes the appended rules name (an upper bound of the new ones).
    pub prefixes: u32,
}

impl Delta {
    /// The extent of the arrays once the delta is written.
    pub fn extent(&self) -> Extent {
        let n = |len: usize| u32::try_from(len).unwrap_or(u32::MAX);
        let new_cells = self
            .chunks
            .iter()
            .map(|&(i, _)| i + 1)
            .max()
            .unwrap_or(0)
            .max(self.base.chunks);
        Extent {
            root: self.root_len,
            chunks: new_cells,
            regions: self.base.regions.saturating_add(n(self.regions.len())),
            segments: self.base.segments.saturating_add(n(self.segments.len())),
            v4_prefixes: self.base.v4_prefixes.saturating_add(self.prefixes),
        }
    }

    /// Writes the delta into `image`'s arrays in memory, as the data plane
    /// writes it into an idle generation holding the live one (for tests).
    #[allow(clippy::indexing_slicing)]
    pub fn apply_to(&self, image: &mut Image) {
        let extent = self.extent();
        image.v4_root.resize(extent.root as usize, 0);
        image.v4_chunks.resize(extent.chunks as usize, 0);
        for &(i, v) in &self.root {
            image.v4_root[i as usize] = v;
        }
        for &(i, v) in &self.chunks {
            image.v4_chunks[i as usize] = v;
        }
        image.regions.truncate(self.base.regions as usize);
        image.regions.extend_from_slice(&self.regions);
        image.segments.truncate(self.base.segments as usize);
        image.segments.extend_from_slice(&self.segments);
    }
}

/// `next` compiled over the live set `live` (compiled: `image`, whose maps
/// `maps` reads, `base` of them), when `next` is `live` with ingress rules appended whose
/// sources are all IPv4, no rule names an interface, and the appended
/// rules' slots come after every live slot (no egress rules or other
/// clusters after them); and when what it appends fits `limits`. `None`
/// otherwise: the change is compiled whole.
///
/// The image returned is [stripped](Image::strip) but for its
/// [`Image::delta`]: its index, slots, hash and JSON are the whole set's.
pub fn append(
    live: &RuleSet,
    image: &Image,
    next: &RuleSet,
    maps: &impl LiveMaps,
    base: Extent,
    limits: &Limits,
) -> Option<Image> {
    let same_rest = live.egress_rules == next.egress_rules
        && live.cluster == next.cluster
        && live.only_appends(next)
        && next.ingress_rules.len() > live.ingress_rules.len()
        && image.if_classes.is_empty()
        && next.rule_interfaces().is_empty();
    if !same_rest {
        return None;
    }
    // The appended rules' slots come last only when no slot follows the
    // ingress rules': no egress rule (equal in both sets) and no other
    // clusters (a slot when any of their networks parses).
    let last = next.egress_rules.is_empty()
        && next
            .cluster
            .as_ref()
            .is_none_or(|c| super::networks(&c.other_clusters).is_empty());
    if !last {
        return None;
    }
    let appended = next.ingress_rules.get(live.ingress_rules.len()..)?;
    let (entries, slots) = super::appended_entries(&image.slots, appended);
    if slots.len() > limits.slots as usize {
        return None;
    }
    let added: Vec<&Entry> = entries.iter().collect();
    let ipv4_ingress = added
        .iter()
        .all(|e| e.dir == DIR_INGRESS && e.nets.iter().all(|n| matches!(n, IpNet::V4(_))));
    if !ipv4_ingress {
        return None;
    }
    let mut delta = delta(maps, base, &added, limits).ok()?;
    delta.base_hash = image.hash.clone();
    let (index, (json, hash)) = crate::parallel::both_over(
        next.rule_count(),
        "compile",
        || image.index.appended(&added),
        || super::canonical(next),
    );
    Some(Image {
        egress_allowlist: next.egress_allowlist(),
        dns_guard: next.egress_allowlist() && next.has_names(),
        slots,
        hash,
        json,
        index: std::sync::Arc::new(index),
        delta: Some(std::sync::Arc::new(delta)),
        stripped: true,
        ..Default::default()
    })
}

/// Why a delta was not made (the change is then compiled whole).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Refused {
    /// It would need more work than [`WORK_BUDGET`]: a whole compile is
    /// as quick, and its garbage bounded by the set.
    Budget,
    /// What it appends would not fit the maps.
    Capacity,
    /// The live maps are not as the extent says (or hold an IPv6 source).
    Maps,
}

/// Cells visited plus segments read and written, at most, for one delta:
/// about 50 ms. An add of a /16 into 100k rules does a few thousand; an
/// append that reaches every region (`0.0.0.0/0`), many times over (many
/// ICMP types, many rules), stops here instead of growing with the live
/// regions times the entries appended.
const WORK_BUDGET: u64 = 1 << 20;

/// The delta that overlays `added` (IPv4, ingress) on the live maps, or
/// why not: it does not fit `limits`, needs more than [`WORK_BUDGET`], or
/// the maps are not as `base` says.
fn delta(
    maps: &impl LiveMaps,
    base: Extent,
    added: &[&Entry],
    limits: &Limits,
) -> Result<Delta, Refused> {
    let mut work = Work {
        maps,
        base,
        limits: *limits,
        budget: WORK_BUDGET,
        why: None,
        root_len: base.root,
        root: HashMap::new(),
        chunks: HashMap::new(),
        new_chunks: Vec::new(),
        regions: Vec::new(),
        segments: Vec::new(),
        lists: HashMap::new(),
        region_ids: HashMap::new(),
    };
    let mut nets = std::collections::HashSet::new();
    for entry in added {
        // Per entry: each live region under its networks becomes one new
        // region (the same one wherever it appears).
        let mut memo: HashMap<u32, u32> = HashMap::new();
        for net in &entry.nets {
            let IpNet::V4(net) = net else {
                return Err(Refused::Maps);
            };
            nets.insert((u32::from(net.network()), net.prefix_len()));
            if work
                .cover(u32::from(net.network()), net.prefix_len(), entry, &mut memo)
                .is_none()
            {
                return Err(work.why.unwrap_or(Refused::Maps));
            }
        }
    }
    let prefixes = u32::try_from(nets.len()).unwrap_or(u32::MAX);
    let mut chunks: Vec<(u32, u32)> = work.chunks.into_iter().collect();
    let first_new = base.chunks;
    chunks.extend((first_new..).zip(work.new_chunks));
    chunks.sort_unstable();
    let mut root: Vec<(u32, u32)> = work.root.into_iter().collect();
    root.sort_unstable();
    let delta = Delta {
        base,
        base_hash: String::new(),
        root_len: work.root_len,
        root,
        chunks,
        regions: work.regions,
        segments: work.segments,
        prefixes,
    };
    let extent = delta.extent();
    let fits = extent.chunks / V4_CHUNK_ENTRIES <= limits.v4_chunks
        && extent.regions <= limits.regions
        && extent.segments <= limits.segments
        && extent.v4_prefixes <= limits.prefixes
        // Region numbers plus one, and chunk numbers, must stay below the
        // table's node bit.
        && extent.regions < V4_NODE - 1
        && extent.chunks / V4_CHUNK_ENTRIES < V4_NODE;
    if fits {
        Ok(delta)
    } else {
        Err(Refused::Capacity)
    }
}

/// The delta as it is built: cells written so far over the live ones.
struct Work<'a, M> {
    maps: &'a M,
    base: Extent,
    limits: Limits,
    /// Work left (see [`WORK_BUDGET`]).
    budget: u64,
    /// Why the last `None` was returned, when not for the maps.
    why: Option<Refused>,
    /// The root's length once written (longer than the live one's when
    /// the appended rules are the first of their direction).
    root_len: u32,
    root: HashMap<u32, u32>,
    /// Cells of live chunks written.
    chunks: HashMap<u32, u32>,
    /// Cells of new chunks (chunk `base.chunks / 16 + i / 16`).
    new_chunks: Vec<u32>,
    regions: Vec<Region>,
    segments: Vec<Segment>,
    /// Lists and regions appended, found again by content.
    lists: HashMap<Vec<Segment>, u32>,
    region_ids: HashMap<Region, u32>,
}

#[derive(Clone, Copy)]
enum Cell {
    Root(u32),
    Chunk(u32),
}

impl<M: LiveMaps> Work<'_, M> {
    /// Takes `n` from the budget; `None` once it is spent.
    fn spend(&mut self, n: u64) -> Option<()> {
        match self.budget.checked_sub(n) {
            Some(left) => {
                self.budget = left;
                Some(())
            }
            None => self.refuse(Refused::Budget),
        }
    }

    fn refuse<T>(&mut self, why: Refused) -> Option<T> {
        self.why = Some(why);
        None
    }

    fn get(&self, cell: Cell) -> Option<u32> {
        match cell {
            Cell::Root(i) if i < self.base.root => {
                self.root.get(&i).copied().or_else(|| self.maps.root(i))
            }
            Cell::Root(i) if i < self.root_len => Some(self.root.get(&i).copied().unwrap_or(0)),
            Cell::Root(_) => None,
            Cell::Chunk(i) if i < self.base.chunks => {
                self.chunks.get(&i).copied().or_else(|| self.maps.chunk(i))
            }
            Cell::Chunk(i) => self
                .new_chunks
                .get((i - self.base.chunks) as usize)
                .copied(),
        }
    }

    fn set(&mut self, cell: Cell, value: u32) -> Option<()> {
        match cell {
            Cell::Root(i) => {
                self.root.insert(i, value);
            }
            Cell::Chunk(i) if i < self.base.chunks => {
                self.chunks.insert(i, value);
            }
            Cell::Chunk(i) => *self.new_chunks.get_mut((i - self.base.chunks) as usize)? = value,
        }
        Some(())
    }

    /// Overlays `entry` on every cell of the IPv4 table that `addr/len`
    /// covers (in direction `entry.dir`), making chunks where the prefix
    /// ends inside a cell, as `v4_table` does.
    fn cover(
        &mut self,
        addr: u32,
        len: u8,
        entry: &Entry,
        memo: &mut HashMap<u32, u32>,
    ) -> Option<()> {
        let block = u32::from(entry.dir) * 65536;
        // A root without this direction's block grows to hold it (its
        // cells are zero past the live root: no region).
        if block + 65536 > portcullis_common::V4_ROOT_ENTRIES {
            return None;
        }
        self.root_len = self.root_len.max(block + 65536);
        let len = u32::from(len);
        if len <= 16 {
            let start = block + (addr >> 16);
            for i in start..start + (1 << (16 - len)) {
                self.transform(Cell::Root(i), entry, memo, 16)?;
            }
            return Some(());
        }
        let mut at = Cell::Root(block + (addr >> 16));
        let mut depth = 16;
        loop {
            let next = depth + 4;
            let nibble = (addr >> (32 - next)) & 0xf;
            let current = self.get(at)?;
            let chunk = if current & V4_NODE != 0 {
                current & !V4_NODE
            } else {
                let cells = self.base.chunks + self.new_chunks.len() as u32;
                let id = cells / V4_CHUNK_ENTRIES;
                if id >= self.limits.v4_chunks {
                    return self.refuse(Refused::Capacity);
                }
                self.new_chunks
                    .extend(std::iter::repeat_n(current, V4_CHUNK_ENTRIES as usize));
                self.set(at, V4_NODE | id)?;
                id
            };
            let first = chunk.checked_mul(V4_CHUNK_ENTRIES)?;
            if len <= next {
                let start = first + (nibble & !((1 << (next - len)) - 1));
                for i in start..start + (1 << (next - len)) {
                    self.transform(Cell::Chunk(i), entry, memo, next)?;
                }
                return Some(());
            }
            at = Cell::Chunk(first + nibble);
            depth = next;
        }
    }

    /// `entry` overlaid on the cell (of the level ending at bit `depth`):
    /// its region replaced (through `memo`), or every cell of the chunk it
    /// points to. A chunk below the last level (maps not as this process
    /// wrote them) refuses the delta.
    fn transform(
        &mut self,
        cell: Cell,
        entry: &Entry,
        memo: &mut HashMap<u32, u32>,
        depth: u32,
    ) -> Option<()> {
        self.spend(1)?;
        let value = self.get(cell)?;
        if value & V4_NODE != 0 {
            if depth >= 32 {
                return None;
            }
            let first = (value & !V4_NODE).checked_mul(V4_CHUNK_ENTRIES)?;
            for i in first..first.checked_add(V4_CHUNK_ENTRIES)? {
                self.transform(Cell::Chunk(i), entry, memo, depth + 4)?;
            }
            return Some(());
        }
        let new = match memo.get(&value) {
            Some(&new) => new,
            None => {
                let new = self.overlaid(value.checked_sub(1), entry)? + 1;
                memo.insert(value, new);
                new
            }
        };
        self.set(cell, new)
    }

    fn region(&self, r: u32) -> Option<Region> {
        match r.checked_sub(self.base.regions) {
            None => self.maps.region(r),
            Some(i) => self.regions.get(i as usize).copied(),
        }
    }

    fn segment(&self, s: u32) -> Option<Segment> {
        match s.checked_sub(self.base.segments) {
            None => self.maps.segment(s),
            Some(i) => self.segments.get(i as usize).copied(),
        }
    }

    /// The region of `region` (`None`: no region) with `entry` overlaid.
    fn overlaid(&mut self, region: Option<u32>, entry: &Entry) -> Option<u32> {
        let mut out = match region {
            Some(r) => self.region(r)?,
            None => Region::default(),
        };
        for c in 0..PCLASSES {
            let Some((lo, hi)) = entry.ports.get(c).copied().flatten() else {
                continue;
            };
            let (offset, len) = (*out.offset.get(c)?, *out.len.get(c)?);
            self.spend(u64::from(len) + 2)?;
            let list: Vec<Segment> = (offset..offset.checked_add(len)?)
                .map(|s| self.segment(s))
                .collect::<Option<_>>()?;
            let map = overlay(&list, lo, hi, entry.slot);
            if map.len() as u32 > MAX_SEGMENTS_PER_CLASS {
                return None;
            }
            let at = self.list(map)?;
            *out.offset.get_mut(c)? = at.0;
            *out.len.get_mut(c)? = at.1;
        }
        if let Some(&id) = self.region_ids.get(&out) {
            return Some(id);
        }
        if self.base.regions as usize + self.regions.len() >= self.limits.regions as usize {
            return self.refuse(Refused::Capacity);
        }
        let id = self
            .base
            .regions
            .checked_add(u32::try_from(self.regions.len()).ok()?)?;
        self.regions.push(out);
        self.region_ids.insert(out, id);
        Some(id)
    }

    /// Where `list` is among the appended lists (appended when new): its
    /// offset and length.
    fn list(&mut self, list: Vec<Segment>) -> Option<(u32, u32)> {
        let len = u32::try_from(list.len()).ok()?;
        if let Some(&at) = self.lists.get(&list) {
            return Some((at, len));
        }
        let after = self.base.segments as usize + self.segments.len() + list.len();
        if after > self.limits.segments as usize {
            return self.refuse(Refused::Capacity);
        }
        let at = self
            .base
            .segments
            .checked_add(u32::try_from(self.segments.len()).ok()?)?;
        self.segments.extend_from_slice(&list);
        self.lists.insert(list, at);
        Some((at, len))
    }
}

/// An image's own arrays as the live maps (tests).
impl LiveMaps for Image {
    fn root(&self, i: u32) -> Option<u32> {
        self.v4_root.get(i as usize).copied()
    }

    fn chunk(&self, i: u32) -> Option<u32> {
        self.v4_chunks.get(i as usize).copied()
    }

    fn region(&self, i: u32) -> Option<Region> {
        self.regions.get(i as usize).copied()
    }

    fn segment(&self, i: u32) -> Option<Segment> {
        self.segments.get(i as usize).copied()
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use proptest::prelude::*;

    use portcullis_common::{DIR_EGRESS, PCLASS_ICMP};

    use super::*;
    use crate::{
        compile::{compile, entries, reference, strategies},
        rules::FirewallRule,
    };

    /// A set the fast path takes: no egress rules or other clusters after
    /// the ingress rules, no interface rules.
    fn eligible(mut set: RuleSet) -> RuleSet {
        set.egress_rules.clear();
        if let Some(c) = &mut set.cluster {
            c.other_clusters.clear();
        }
        for (i, r) in set.ingress_rules.iter_mut().enumerate() {
            r.interfaces.clear();
            // Some with a rate limit (a slot's limit, in slot order).
            if i % 3 == 1 {
                (r.rate, r.burst) = (Some(10 + i as u32), Some(50));
            }
        }
        set
    }

    /// An appended rule: its IPv4 sources only (one when it had none).
    fn ipv4_only(mut r: FirewallRule, id: usize) -> FirewallRule {
        r.id = format!("added{id}");
        r.interfaces.clear();
        if id % 2 == 1 {
            r.rate = Some(7);
        }
        r.ip_ranges.retain(|n| !n.contains(':'));
        if r.ip_ranges.is_empty() {
            r.ip_ranges.push("10.0.64.0/18".into());
        }
        r
    }

    /// The image `base` (whole) with `delta` written, as the data plane
    /// writes it into the idle generation.
    fn written(base: &Image, delta: &Delta) -> Image {
        let mut out = base.clone();
        delta.apply_to(&mut out);
        out
    }

    /// Every probe answers as the reference evaluator of `set` says.
    fn same_verdicts(
        image: &Image,
        set: &RuleSet,
        probes: &[(IpAddr, u16)],
    ) -> Result<(), TestCaseError> {
        let (want, _) = entries(set);
        for &(addr, port) in probes {
            for dir in [DIR_INGRESS, DIR_EGRESS] {
                for c in 0..PCLASSES {
                    let port = if c == PCLASS_ICMP {
                        strategies::icmp_probe(port)
                    } else {
                        port
                    };
                    prop_assert_eq!(
                        image.lookup(dir, addr, c, port),
                        reference(&want, dir, addr, c, port),
                        "dir {} {} class {} port {}",
                        dir,
                        addr,
                        c,
                        port
                    );
                }
            }
        }
        Ok(())
    }

    proptest! {
        /// Rules appended through two deltas in a row answer every probe as
        /// the reference evaluator of the whole set does, and the image's
        /// slots, hash and index are the whole compile's.
        #[test]
        fn appended_rules_answer_as_a_whole_compile(
            live in strategies::rule_set().prop_map(eligible),
            first in proptest::collection::vec(strategies::rule(300), 1..4),
            second in strategies::rule(400),
            probes in proptest::collection::vec((strategies::address(), 0u16..700), 1..60),
        ) {
            let limits = Limits::default();
            let whole = compile(&live, &limits).unwrap();
            let mut next = live.clone();
            next.ingress_rules.extend(first.into_iter().enumerate().map(|(i, r)| ipv4_only(r, i)));
            let fast = append(&live, &whole, &next, &whole, Extent::of(&whole), &limits);
            prop_assert!(fast.is_some(), "an eligible append was compiled whole");
            let fast = fast.unwrap();
            let delta = fast.delta.clone().unwrap();
            let maps = written(&whole, &delta);
            same_verdicts(&maps, &next, &probes)?;
            let again = compile(&next, &limits).unwrap();
            prop_assert_eq!(&fast.slots, &again.slots);
            prop_assert_eq!(&fast.hash, &again.hash);
            prop_assert_eq!(&fast.index, &again.index);

            // A second append over the first one's maps.
            let mut after = next.clone();
            after.ingress_rules.push(ipv4_only(second, 9));
            let fast2 = append(&next, &fast, &after, &maps, delta.extent(), &limits).unwrap();
            let maps2 = written(&maps, fast2.delta.as_ref().unwrap());
            same_verdicts(&maps2, &after, &probes)?;
            let again2 = compile(&after, &limits).unwrap();
            prop_assert_eq!(&fast2.slots, &again2.slots);
            prop_assert_eq!(&fast2.index, &again2.index);
        }

        /// What the fast path cannot keep exact is compiled whole: a source
        /// of IPv6, slots after the ingress rules (egress rules, other
        /// clusters), an interface rule, anything but an append.
        #[test]
        fn other_changes_are_compiled_whole(
            live in strategies::rule_set(),
            added in strategies::rule(300),
        ) {
            let limits = Limits::default();
            let whole = compile(&live, &limits).unwrap();
            let mut next = live.clone();
            next.ingress_rules.push(added.clone());
            let fast = append(&live, &whole, &next, &whole, Extent::of(&whole), &limits);
            // `rule_set` always has other clusters: their slot comes last.
            prop_assert!(fast.is_none());

            let live = eligible(live);
            let whole = compile(&live, &limits).unwrap();
            let mut v6 = ipv4_only(added.clone(), 0);
            v6.ip_ranges.push("fd00:200::/64".into());
            // (An ICMPv4 rule's IPv6 sources admit nothing: no entry.)
            (v6.protocol, v6.icmp_types) = (crate::rules::Protocol::Tcp, Vec::new());
            let mut next = live.clone();
            next.ingress_rules.push(v6);
            prop_assert!(append(&live, &whole, &next, &whole, Extent::of(&whole), &limits).is_none());

            let mut scoped = ipv4_only(added.clone(), 0);
            scoped.interfaces = vec!["eth1".into()];
            let mut next = live.clone();
            next.ingress_rules.push(scoped);
            prop_assert!(append(&live, &whole, &next, &whole, Extent::of(&whole), &limits).is_none());

            let mut next = live.clone();
            next.ingress_rules.insert(0, ipv4_only(added, 0));
            prop_assert!(append(&live, &whole, &next, &whole, Extent::of(&whole), &limits).is_none());
        }
    }

    /// A TCP rule on one port from one network (`compile`'s test rule).
    fn tcp(id: String, port: u32, net: String) -> FirewallRule {
        crate::compile::tests::rule(&id, port, port, &[&net], crate::rules::Protocol::Tcp)
    }

    /// An append that reaches every region, many times over (here 40
    /// rules from anywhere over 300 regions), stops at the work budget: its
    /// work and garbage would grow with the live regions times the rules
    /// appended (each rule's lists over the last one's), where a whole
    /// compile's are bounded by the set. It is compiled whole.
    #[test]
    fn an_append_over_everything_many_times_stops_at_the_work_budget() {
        let live = RuleSet {
            ingress_rules: (0..300)
                .map(|i| {
                    tcp(
                        format!("l{i}"),
                        1000 + i,
                        format!("10.{}.{}.0/24", i / 256, i % 256),
                    )
                })
                .collect(),
            ..Default::default()
        };
        let roomy = Limits {
            regions: 1 << 20,
            segments: 1 << 24,
            ..Limits::default()
        };
        let whole = compile(&live, &roomy).unwrap();
        let mut next = live.clone();
        next.ingress_rules
            .extend((0..40).map(|i| tcp(format!("a{i}"), 2000 + 2 * i, "0.0.0.0/0".into())));
        let (entries, _) = entries(&next);
        let added: Vec<&Entry> = entries
            .iter()
            .filter(|e| crate::compile::index(e.slot) as usize >= whole.slots.len())
            .collect();
        assert_eq!(added.len(), 40);
        assert_eq!(
            delta(&whole, Extent::of(&whole), &added, &roomy).err(),
            Some(Refused::Budget)
        );
        assert!(append(&live, &whole, &next, &whole, Extent::of(&whole), &roomy).is_none());
        // One such rule is a delta.
        next.ingress_rules.truncate(301);
        assert!(append(&live, &whole, &next, &whole, Extent::of(&whole), &roomy).is_some());
    }

    /// An append that would not fit the maps is left to the whole compile,
    /// which says what does not fit.
    #[test]
    fn an_append_past_the_capacity_is_compiled_whole() {
        let live = RuleSet {
            ingress_rules: vec![tcp("a".into(), 80, "10.0.0.0/24".into())],
            ..Default::default()
        };
        let whole = compile(&live, &Limits::default()).unwrap();
        let mut next = live.clone();
        next.ingress_rules
            .push(tcp("b".into(), 80, "10.1.2.3/32".into()));
        let tight = Limits {
            v4_chunks: (whole.v4_chunks.len() / 16) as u32,
            ..Limits::default()
        };
        assert!(append(&live, &whole, &next, &whole, Extent::of(&whole), &tight).is_none());
        assert!(
            append(
                &live,
                &whole,
                &next,
                &whole,
                Extent::of(&whole),
                &Limits::default()
            )
            .is_some()
        );
    }
}
