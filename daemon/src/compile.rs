//! Compiles a rule set into the image of the rule maps (pure: no kernel).
//!
//! The data path answers "which rule admits a packet from `addr` of protocol
//! class `c` to port `p`" in three steps of fixed cost:
//!
//! 1. The longest compiled prefix containing `addr` gives a *region*
//!    (IPv4: the stride table `V4_ROOT`/`V4_CHUNKS`; IPv6: per /32 bucket
//!    `V6_BUCKETS` the lengths present, each probed in `V6_PREFIXES`, and
//!    prefixes shorter than /32 in the LPM trie `SRC6`, see [`V6Tables`]).
//!    Prefixes of different rules nest or are disjoint, so
//!    the compiler gives each distinct prefix the region of every rule whose
//!    prefix contains it: the longest match alone is enough.
//! 2. `REGIONS[region]` gives, per protocol class, where its segments are.
//! 3. `SEGMENTS`: runs of ports, each with the first rule (lowest slot) that
//!    admits it; a binary search of `SEARCH_STEPS` steps finds the run.
//!
//! Regions with identical segments are stored once. `reference` evaluates
//! the same rules one by one; tests hold the two against each other.

use std::{collections::HashMap, net::IpAddr, rc::Rc, sync::Arc};

use ipnet::IpNet;
use portcullis_common::{
    DIR_EGRESS, DIR_INGRESS, DNS_PORT, DNS_TLS_PORT, MAX_SEGMENTS_PER_CLASS, PCLASS_ICMP,
    PCLASS_TCP, PCLASS_UDP, PCLASSES, Region, RuleKey4, RuleKey6, SEARCH_STEPS, SLOT_INDEX_MASK,
    SLOT_KIND_FOREIGN, SLOT_KIND_PEER, SLOT_KIND_RULE, SLOT_KIND_SHIFT, SLOT_KIND_SSH, SLOT_NONE,
    Segment, V4_CHUNK_ENTRIES, V4_NODE, V6_BUCKET_LENGTHS, V6_BUCKET_OVERFLOW, V6_SHORT_MAX,
    V6BucketKey, V6Lengths, V6PrefixKey,
};
use sha2::{Digest as _, Sha256};
use thiserror::Error;

use crate::{
    parallel::both_over,
    rules::{Protocol, RuleSet},
};

mod append;
mod index;
mod slots;
mod table;
pub use append::{Delta, Extent, LiveMaps, append};
pub use index::Index;
pub use slots::{Slot, Slots};
pub use table::Table;

/// One rule in one direction, in priority order.
#[derive(Clone, Debug)]
pub struct Entry {
    pub dir: u8,
    /// Raw slot value: kind in the top bits, index below.
    pub slot: u32,
    /// Admitted port range per protocol class (ICMP and other: all).
    pub ports: Ports,
    pub nets: Vec<IpNet>,
}

/// Map capacities the image must fit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub prefixes: u32,
    pub regions: u32,
    pub segments: u32,
    pub slots: u32,
    /// IPv4 stride-table chunks (of 16 entries).
    pub v4_chunks: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            prefixes: portcullis_common::DEFAULT_PREFIXES,
            regions: portcullis_common::DEFAULT_REGIONS,
            segments: portcullis_common::DEFAULT_SEGMENTS,
            slots: portcullis_common::DEFAULT_RULE_SLOTS,
            v4_chunks: portcullis_common::DEFAULT_V4_CHUNKS,
        }
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum CompileError {
    #[error(
        "the rule set needs {needed} {what}, more than the maps hold ({capacity}); raise [capacity] {what} in the configuration"
    )]
    TooLarge {
        what: &'static str,
        needed: usize,
        capacity: u32,
    },
    #[error(
        "one source region needs {needed} port segments for one protocol, more than {max}; split the overlapping rules"
    )]
    TooManySegments { needed: usize, max: u32 },
    #[error(
        "the rules name {named} interfaces ({names}); at most {max} may have rules of their own"
    )]
    TooManyInterfaces {
        named: usize,
        names: String,
        max: u32,
    },
}

/// The compiled maps of one generation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Image {
    /// (key data: direction byte + address, LPM prefix length incl. the direction byte, region)
    pub v4: Vec<(RuleKey4, u32, u32)>,
    pub v6: Vec<(RuleKey6, u32, u32)>,
    /// `v6` as the data path looks it up (trie, buckets, prefixes): what
    /// the data plane writes and [`Image::lookup`] walks.
    pub v6_tables: Arc<V6Tables>,
    /// The IPv4 stride table built from `v4` (see `portcullis_common::V4_NODE`).
    pub v4_root: Vec<u32>,
    pub v4_chunks: Vec<u32>,
    pub regions: Vec<Region>,
    pub segments: Vec<Segment>,
    /// Index 0 is unused (`SLOT_NONE`).
    pub slots: Slots,
    pub egress_allowlist: bool,
    /// Interfaces the rules name: interface class `i + 1` (the data path's
    /// `IFDIR`), whose ingress rules have direction `ingress_dir(i + 1)`;
    /// interfaces none names have `ingress_dir(0)`.
    pub if_classes: Vec<String>,
    /// FQDN egress rules exist: the data path's DNS guard is on and learned
    /// destinations (`FQDN_DEST`) are looked up.
    pub dns_guard: bool,
    /// SHA-256 of the rule set (canonical JSON), hex.
    pub hash: String,
    /// The rule set's canonical JSON (what `hash` is of), until the core
    /// takes it to save the set with it (`state::Store::save_canonical`):
    /// a 100k-rule set is serialised once per change, not twice.
    pub json: Vec<u8>,
    /// The entries by network: what [`Image::answer`] and the packet-less
    /// questions read, also once the image is [stripped](Image::strip).
    pub index: Arc<Index>,
    /// [`Image::strip`] took the maps' contents: the data plane refuses to
    /// write this image (it would empty the rule maps), unless it carries a
    /// [`Image::delta`].
    pub stripped: bool,
    /// An image made by [`append`]: the changes to write over the live
    /// generation's arrays, in place of the maps' contents.
    pub delta: Option<Arc<Delta>>,
}

/// An admitted port range (inclusive) per protocol class, `None` for none.
pub type Ports = [Option<(u16, u16)>; PCLASSES];

fn pclasses(protocol: Protocol, from: u16, to: u16) -> Ports {
    let all = Some((0, u16::MAX));
    let range = Some((from, to));
    let mut p = [None; PCLASSES];
    match protocol {
        Protocol::TcpUdp => (p[PCLASS_TCP], p[PCLASS_UDP]) = (range, range),
        Protocol::Tcp => p[PCLASS_TCP] = range,
        Protocol::Udp => p[PCLASS_UDP] = range,
        Protocol::Icmp => p[PCLASS_ICMP] = all,
        Protocol::Any => p = [range, range, all, all],
    }
    p
}

/// The rule set as entries in priority order, and their slots: cluster peers
/// (both directions), the SSH exemption, ingress rules, egress rules, then
/// members of other clusters (which only name a drop reason).
/// The networks of `cidrs` that parse (validation refuses the others; here
/// they admit nothing: closed, not open).
fn networks(cidrs: &[String]) -> Vec<IpNet> {
    cidrs
        .iter()
        .filter_map(|c| crate::rules::parse_cidr(c).ok())
        .collect()
}

pub fn entries(set: &RuleSet) -> (Vec<Entry>, Slots) {
    let (entries, slots, scoped) = base_entries(set);
    (by_interface_class(set, entries, &scoped), slots)
}

/// The ingress entries under `DIR_INGRESS` are every ingress rule's,
/// whatever its interfaces (the union: egress's question about replies,
/// and every interface's list while no rule names one). When rules name
/// interfaces, each entry is also copied into the list of each interface
/// class it applies to (direction `ingress_dir(class)`): an entry of a rule
/// without interfaces into every class, including class 0 (interfaces no
/// rule names), an entry of a rule with some into theirs only. Order is
/// kept, so each class is a rule list of its own, first match credited.
fn by_interface_class(set: &RuleSet, entries: Vec<Entry>, scoped: &[Vec<String>]) -> Vec<Entry> {
    let names = set.rule_interfaces();
    if names.is_empty() {
        return entries;
    }
    let mut copies = Vec::new();
    for (e, on) in entries.iter().zip(scoped) {
        if e.dir != DIR_INGRESS {
            continue;
        }
        let classes = std::iter::once(on.is_empty())
            .chain(names.iter().map(|name| on.is_empty() || on.contains(name)));
        for (class, applies) in (0u32..).zip(classes) {
            if applies {
                let mut copy = e.clone();
                copy.dir = portcullis_common::ingress_dir(class);
                copies.push(copy);
            }
        }
    }
    let mut out = entries;
    out.extend(copies);
    out
}

/// The entries as if no rule named interfaces, their slots, and each
/// entry's interfaces (empty: every interface).
fn base_entries(set: &RuleSet) -> (Vec<Entry>, Slots, Vec<Vec<String>>) {
    let mut entries = Vec::new();
    let mut scoped: Vec<Vec<String>> = Vec::new();
    let mut slots = Slots::default();
    slots.push("", 0, 0);
    // One slot (one counter) per rule; a rule with several port sets (the
    // SSH exemption on several ports, the ICMP types of a rule, per family)
    // is one entry per set, all on its slot.
    let guard = set.egress_allowlist() && set.has_names();
    let mut push =
        |name: String, kind: u32, dir: u8, port_sets: Vec<(Ports, Vec<IpNet>)>, on: &[String]| {
            let port_sets = if guard && dir == DIR_EGRESS {
                carve_dns(port_sets)
            } else {
                port_sets
            };
            for e in slot_entries(&mut slots, &name, kind, dir, port_sets) {
                entries.push(e);
                scoped.push(on.to_vec());
            }
        };
    let everything = pclasses(Protocol::Any, 0, u16::MAX);
    if let Some(cluster) = &set.cluster {
        let peers = networks(&cluster.peers);
        if !peers.is_empty() {
            for dir in [DIR_INGRESS, DIR_EGRESS] {
                push(
                    format!("cluster:{}", cluster.id),
                    SLOT_KIND_PEER,
                    dir,
                    vec![(everything, peers.clone())],
                    &[],
                );
            }
        }
    }
    if set.ssh.allow {
        // Sources that do not parse (validation refuses them) admit nothing:
        // closed, not open.
        let nets = set.ssh.networks().unwrap_or_default();
        let ports: Vec<(Ports, Vec<IpNet>)> = set
            .ssh
            .ports
            .iter()
            .map(|&p| (pclasses(Protocol::Tcp, p, p), nets.clone()))
            .collect();
        push("ssh".into(), SLOT_KIND_SSH, DIR_INGRESS, ports, &[]);
    }
    for (dir, rules) in [
        (DIR_INGRESS, &set.ingress_rules),
        (DIR_EGRESS, &set.egress_rules),
    ] {
        for r in rules {
            push(
                format!("rule:{}", r.id),
                SLOT_KIND_RULE,
                dir,
                rule_port_sets(r),
                &r.interfaces,
            );
        }
    }
    if let Some(cluster) = &set.cluster {
        let others = networks(&cluster.other_clusters);
        if !others.is_empty() {
            push(
                "other-clusters".into(),
                SLOT_KIND_FOREIGN,
                DIR_INGRESS,
                vec![(everything, others)],
                &[],
            );
        }
    }
    rule_limits(set, &mut slots);
    slots.shrink_to_fit();
    (entries, slots, scoped)
}

/// What [`entries`] adds for `added`, ingress rules appended to a set
/// whose slots are `slots`, when no slot follows the ingress rules' (no
/// egress rule, no other clusters) and no rule names an interface: the
/// added rules' entries, and `slots` with theirs. An add into 100k rules
/// makes its own entries, not the whole set's.
fn appended_entries(slots: &Slots, added: &[crate::rules::FirewallRule]) -> (Vec<Entry>, Slots) {
    let mut slots = slots.clone();
    let mut entries = Vec::new();
    for r in added {
        let name = format!("rule:{}", r.id);
        let sets = rule_port_sets(r);
        entries.extend(slot_entries(
            &mut slots,
            &name,
            SLOT_KIND_RULE,
            DIR_INGRESS,
            sets,
        ));
        slots.limit_last(
            r.rate
                .map(|rate| crate::model::RateLimit::entry(rate, r.burst)),
        );
    }
    slots.shrink_to_fit();
    (entries, slots)
}

/// A new slot `name` of `kind` in `dir`, pushed onto `slots`, and its
/// entries: one per port set, all on that slot.
fn slot_entries(
    slots: &mut Slots,
    name: &str,
    kind: u32,
    dir: u8,
    port_sets: Vec<(Ports, Vec<IpNet>)>,
) -> impl Iterator<Item = Entry> + use<> {
    let slot = (kind << SLOT_KIND_SHIFT) | slots.push(name, kind, dir);
    port_sets.into_iter().map(move |(ports, nets)| Entry {
        dir,
        slot,
        ports,
        nets,
    })
}

/// Under the DNS guard (FQDN rules exist): egress port sets without the
/// DNS ports (TCP and UDP 53 and 853), which only the forwarder's own
/// queries may reach (`ebpf/src/fqdn.rs`), whatever a rule's range says.
fn carve_dns(sets: Vec<(Ports, Vec<IpNet>)>) -> Vec<(Ports, Vec<IpNet>)> {
    let split = |range: Option<(u16, u16)>| -> Vec<(u16, u16)> {
        let Some((from, to)) = range else {
            return Vec::new();
        };
        let mut pieces = vec![(from, to)];
        for dns in [DNS_PORT, DNS_TLS_PORT] {
            pieces = pieces
                .into_iter()
                .flat_map(|(a, b)| {
                    if dns < a || dns > b {
                        return vec![(a, b)];
                    }
                    let mut out = Vec::new();
                    if a < dns {
                        out.push((a, dns - 1));
                    }
                    if dns < b {
                        out.push((dns + 1, b));
                    }
                    out
                })
                .collect();
        }
        pieces
    };
    let mut out = Vec::new();
    for (ports, nets) in sets {
        let tcp = split(ports[PCLASS_TCP]);
        let udp = split(ports[PCLASS_UDP]);
        for i in 0..tcp.len().max(udp.len()).max(1) {
            let mut p: Ports = if i == 0 { ports } else { [None; PCLASSES] };
            p[PCLASS_TCP] = tcp.get(i).copied();
            p[PCLASS_UDP] = udp.get(i).copied();
            if p.iter().any(Option::is_some) {
                out.push((p, nets.clone()));
            }
        }
    }
    out
}

/// A rule's port sets, each with its networks. An ICMP rule with
/// `icmp_types` is one set per type (or type and code), as ranges of the
/// data path's ICMP port (type << 8 | code), each with the networks of its
/// family only (ICMPv4 types under IPv4 networks, ICMPv6 under IPv6).
fn rule_port_sets(r: &crate::rules::FirewallRule) -> Vec<(Ports, Vec<IpNet>)> {
    let nets = r.networks();
    let Some(matches) = r.icmp_matches() else {
        let ports = pclasses(r.protocol, r.from_port as u16, r.to_port as u16);
        return vec![(ports, nets)];
    };
    matches
        .iter()
        .map(|m| {
            let mut ports = [None; PCLASSES];
            ports[PCLASS_ICMP] = Some(m.ports());
            let family: Vec<IpNet> = nets
                .iter()
                .filter(|n| matches!(n, IpNet::V6(_)) == m.v6)
                .copied()
                .collect();
            (ports, family)
        })
        .collect()
}

/// Each ingress rule's own rate limit, on its slot.
fn rule_limits(set: &RuleSet, slots: &mut Slots) {
    let limits = set.ingress_rules.iter().map(|r| {
        r.rate
            .map(|rate| crate::model::RateLimit::entry(rate, r.burst))
    });
    slots.set_limits(SLOT_KIND_RULE, DIR_INGRESS, limits);
}

/// The straightforward evaluator: the first entry that matches, or `SLOT_NONE`.
pub fn reference(entries: &[Entry], dir: u8, addr: IpAddr, pclass: usize, port: u16) -> u32 {
    entries
        .iter()
        .find(|e| {
            e.dir == dir
                && covers(&e.ports, pclass, port)
                && e.nets.iter().any(|n| n.contains(&addr))
        })
        .map_or(SLOT_NONE, |e| e.slot)
}

/// Whether `ports` admit `port` of protocol class `pclass`.
fn covers(ports: &Ports, pclass: usize, port: u16) -> bool {
    ports
        .get(pclass)
        .copied()
        .flatten()
        .is_some_and(|(lo, hi)| (lo..=hi).contains(&port))
}

fn index(slot: u32) -> u32 {
    slot & SLOT_INDEX_MASK
}

/// A port map of one protocol class: runs of ports, each with the lowest
/// slot that admits it, the first starting at port 0; empty when nothing
/// of the class is admitted.
type PortMap = Vec<Segment>;

/// Whether slot `a` comes before `b` (a lower index; `SLOT_NONE` last).
fn before(a: u32, b: u32) -> bool {
    b == SLOT_NONE || (a != SLOT_NONE && index(a) < index(b))
}

/// Appends a run of `slot` from port `start` to `map` (ports ascending):
/// merged into the last run when it has the same slot, replacing it when
/// it starts at the same port.
fn push_run(map: &mut PortMap, start: u32, slot: u32) {
    match map.last_mut() {
        Some(last) if last.slot == slot => {}
        Some(last) if last.start as u32 == start => last.slot = slot,
        _ => map.push(Segment {
            start: start as u16,
            _pad: 0,
            slot,
        }),
    }
}

/// `base` with ports `lo..=hi` also admitted by `slot`, where it comes
/// first: one pass over `base`, so a prefix's map costs what its
/// container's map and its own rules hold, not its whole chain of rules.
fn overlay(base: &[Segment], lo: u16, hi: u16, slot: u32) -> PortMap {
    let none = [Segment {
        start: 0,
        _pad: 0,
        slot: SLOT_NONE,
    }];
    let base = if base.is_empty() { &none[..] } else { base };
    let mut out: PortMap = Vec::with_capacity(base.len() + 2);
    let mut push = |start: u32, slot: u32| push_run(&mut out, start, slot);
    let (lo, hi) = (lo as u32, hi as u32);
    let ends = base
        .iter()
        .skip(1)
        .map(|s| s.start as u32)
        .chain(std::iter::once(u16::MAX as u32 + 1));
    for (run, end) in base.iter().zip(ends) {
        let (from, to) = (run.start as u32, end - 1);
        let mine = if before(slot, run.slot) {
            slot
        } else {
            run.slot
        };
        if from < lo {
            push(from, run.slot);
        }
        if from.max(lo) <= to.min(hi) {
            push(from.max(lo), mine);
        }
        if to > hi && from.max(hi + 1) <= to {
            push(from.max(hi + 1), run.slot);
        }
    }
    // A first run that changed at port 0 may now equal the one after it.
    out.dedup_by(|b, a| a.slot == b.slot);
    out
}

/// A port map as laid out in the image: its segments, shared (not copied)
/// by the prefixes inside it that add nothing to its class, and where
/// they start in `SEGMENTS`.
#[derive(Clone, Default)]
struct Laid {
    map: Rc<PortMap>,
    offset: u32,
}

/// The port maps of a prefix: its container's (`base`) with the entries
/// `own` of the prefix itself overlaid, each new list laid out once. A
/// class its entries leave alone is its container's, and UDP is TCP's when
/// both start the same and the entries give both the same ports (a Brev
/// rule's `tcp_udp`).
fn port_maps(
    entries: &[Entry],
    base: &[Laid; PCLASSES],
    own: &[usize],
    layout: &mut Layout,
    segments: &mut Vec<Segment>,
) -> Result<[Laid; PCLASSES], CompileError> {
    let ranges = |c: usize| {
        own.iter()
            .filter_map(|&i| entries.get(i))
            .filter_map(move |e| {
                let (lo, hi) = e.ports.get(c).copied().flatten()?;
                Some((lo, hi, e.slot))
            })
    };
    let mut out: [Laid; PCLASSES] = Default::default();
    let mut tcp: Option<Laid> = None;
    for (c, (laid, from)) in out.iter_mut().zip(base).enumerate() {
        if ranges(c).next().is_none() {
            *laid = from.clone();
            continue;
        }
        if let Some(t) = &tcp
            && c == PCLASS_UDP
            && base
                .get(PCLASS_TCP)
                .is_some_and(|b| Rc::ptr_eq(&b.map, &from.map))
            && ranges(PCLASS_TCP).eq(ranges(PCLASS_UDP))
        {
            *laid = t.clone();
            continue;
        }
        let mut map: Option<PortMap> = None;
        for (lo, hi, slot) in ranges(c) {
            map = Some(overlay(map.as_deref().unwrap_or(&from.map), lo, hi, slot));
        }
        let map = map.unwrap_or_default();
        if map.len() as u32 > MAX_SEGMENTS_PER_CLASS {
            return Err(CompileError::TooManySegments {
                needed: map.len(),
                max: MAX_SEGMENTS_PER_CLASS,
            });
        }
        let offset = layout.list(segments, &map);
        *laid = Laid {
            map: Rc::new(map),
            offset,
        };
        if c == PCLASS_TCP {
            tcp = Some(laid.clone());
        }
    }
    Ok(out)
}

/// The image's segments and regions as they are built: each distinct port
/// list stored once in `segments`, each distinct region once in `regions`,
/// both found again by content (a cheap hash, then the content compared).
#[derive(Default)]
struct Layout {
    lists: HashMap<u64, Vec<u32>, BuildFast>,
    regions: HashMap<Region, u32, BuildFast>,
    /// A per-compile seed of the lists' hash: colliding lists cannot be
    /// prepared in advance to slow the compile down.
    seed: u64,
}

impl Layout {
    /// The region of the laid-out `maps` in `image` (added when new).
    fn region(&mut self, image: &mut Image, maps: &[Laid; PCLASSES]) -> u32 {
        let mut region = Region::default();
        for ((laid, offset), len) in maps
            .iter()
            .zip(region.offset.iter_mut())
            .zip(region.len.iter_mut())
        {
            *len = laid.map.len() as u32;
            if *len != 0 {
                *offset = laid.offset;
            }
        }
        let next = image.regions.len() as u32;
        *self.regions.entry(region).or_insert_with(|| {
            image.regions.push(region);
            next
        })
    }

    /// Where `list` starts in `segments` (appended when new; 0 for an
    /// empty list, which has no segments).
    fn list(&mut self, segments: &mut Vec<Segment>, list: &[Segment]) -> u32 {
        use std::hash::Hasher as _;
        if list.is_empty() {
            return 0;
        }
        let mut h = Fast(self.seed);
        for s in list {
            h.write_u64(((s.start as u64) << 32) | s.slot as u64);
        }
        let same = self.lists.entry(h.finish()).or_default();
        let found = same
            .iter()
            .copied()
            .find(|&at| segments.get(at as usize..at as usize + list.len()) == Some(list));
        found.unwrap_or_else(|| {
            let at = segments.len() as u32;
            segments.extend_from_slice(list);
            same.push(at);
            at
        })
    }
}

/// A multiply-rotate hash (as rustc's FxHash): the compiler hashes
/// millions of segments. Colliding lists cost comparisons, not a wrong
/// image; the lists' hash is seeded per compile (`Layout::seed`).
#[derive(Default)]
struct Fast(u64);

impl std::hash::Hasher for Fast {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word.iter_mut().zip(chunk).for_each(|(w, b)| *w = *b);
            self.write_u64(u64::from_le_bytes(word));
        }
    }

    fn write_u64(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

type BuildFast = std::hash::BuildHasherDefault<Fast>;

/// Compiles `set` for maps of capacity `limits`.
///
/// The index and the set's hash do not depend on the prefixes' layout, nor
/// the IPv6 tables on the IPv4 table: each pair is made on two threads (a
/// 100k-rule set compiles in about two thirds of the time on two CPUs).
///
/// The index is made on the calling thread, the maps' contents on the
/// second: the core keeps the index for as long as the set is live, and
/// the allocator puts a thread's small allocations in that thread's arena.
/// Made on the second thread, the index lay in an arena among the
/// fragments of the compile's garbage, and the daemon's settled RSS after
/// an add into 100k rules was 47 MiB in two runs of three (28 MiB in the
/// third); made here, 28-30 MiB in four of four.
pub fn compile(set: &RuleSet, limits: &Limits) -> Result<Image, CompileError> {
    let (entries, slots) = entries(set);
    let ((index, (json, hash)), image) = both_over(
        entries.len(),
        "compile",
        || (Index::of(&entries), canonical(set)),
        || lay_out(set, &entries, limits),
    );
    let mut image = image?;
    image.index = Arc::new(index);
    (image.json, image.hash) = (json, hash);
    image.slots = slots;
    check_limits(&image, limits)?;
    Ok(image)
}

/// The maps of `set` (prefixes, regions, segments, the IPv4 table and the
/// IPv6 tables) from its `entries`.
fn lay_out(set: &RuleSet, entries: &[Entry], limits: &Limits) -> Result<Image, CompileError> {
    let mut image = Image {
        egress_allowlist: set.egress_allowlist(),
        dns_guard: set.egress_allowlist() && set.has_names(),
        ..Default::default()
    };
    image.if_classes = set.rule_interfaces();
    // Checked here too (not only by `RuleSet::validate`): a fourth named
    // interface would get the data path's fallback, every ingress rule.
    if image.if_classes.len() > portcullis_common::IF_CLASSES as usize {
        return Err(CompileError::TooManyInterfaces {
            named: image.if_classes.len(),
            names: image.if_classes.join(", "),
            max: portcullis_common::IF_CLASSES,
        });
    }
    // The interface classes' lists: class 0 and one per named interface,
    // only when rules name some.
    let classes = match image.if_classes.len() as u32 {
        0 => 0..0,
        n => 0..n + 1,
    };
    let dirs: Vec<u8> = [DIR_INGRESS, DIR_EGRESS]
        .into_iter()
        .chain(classes.map(portcullis_common::ingress_dir))
        .collect();
    let seed = {
        use std::hash::BuildHasher as _;
        std::collections::hash_map::RandomState::new().hash_one(0u8)
    };
    // Each family on its own thread, with lists and regions of its own:
    // what both have is then stored twice, which the maps' capacity
    // usually has room for. When it has not, the families are laid out
    // again on one thread with one layout, storing everything once, so a
    // set fits exactly when it would have on one thread.
    let (v4, v6) = both_over(
        entries.len(),
        "compile",
        || family(entries, &dirs, &[false], seed),
        || family(entries, &dirs, &[true], seed),
    );
    let (v4, v6) = (v4?, v6?);
    let fits =
        |what: fn(&Image) -> usize, capacity: u32| what(&v4) + what(&v6) <= capacity as usize;
    if fits(|i| i.regions.len(), limits.regions) && fits(|i| i.segments.len(), limits.segments) {
        append_family(&mut image, v4, v6);
    } else {
        drop((v4, v6));
        let one = family(entries, &dirs, &[false, true], seed)?;
        (image.v4, image.v6) = (one.v4, one.v6);
        (image.regions, image.segments) = (one.regions, one.segments);
    }
    let (v4, v6) = (&image.v4, &image.v6);
    let ((v4_root, v4_chunks), v6_tables) = both_over(
        v4.len() + v6.len(),
        "compile",
        || v4_table(v4),
        || V6Tables::of(v6),
    );
    (image.v4_root, image.v4_chunks) = (v4_root, v4_chunks);
    image.v6_tables = Arc::new(v6_tables);
    Ok(image)
}

/// The part of the image of the families `v6s` (`false`: IPv4, `true`:
/// IPv6): their prefixes, regions and segments, for every direction in
/// `dirs`, each list and region stored once.
fn family(entries: &[Entry], dirs: &[u8], v6s: &[bool], seed: u64) -> Result<Image, CompileError> {
    let mut part = Image::default();
    let mut layout = Layout {
        seed,
        ..Default::default()
    };
    for &dir in dirs {
        for &v6 in v6s {
            prefixes(entries, dir, v6, &mut part, &mut layout)?;
        }
    }
    Ok(part)
}

/// The IPv6 part and then the IPv4 part in `image`: the IPv4 part's
/// regions and segments after the IPv6 part's, its regions' segment
/// offsets and its prefixes' regions moved on by the IPv6 part's counts.
///
/// IPv6 first: its prefixes' regions are the values of the IPv6 hash maps,
/// which the data plane writes entry by entry, and skips when they are the
/// same as before (`mapio::write_keyed`). So a change to the IPv4 rules
/// leaves them alone; the IPv4 table is arrays, written whole anyway.
fn append_family(image: &mut Image, v4: Image, v6: Image) {
    let regions = index_of(&v6.regions);
    let segments = index_of(&v6.segments);
    (image.v6, image.regions, image.segments) = (v6.v6, v6.regions, v6.segments);
    image.segments.extend(v4.segments);
    image.regions.extend(v4.regions.into_iter().map(|mut r| {
        for (offset, len) in r.offset.iter_mut().zip(r.len) {
            // An empty list stays at 0 (`Layout::list`).
            if len != 0 {
                *offset += segments;
            }
        }
        r
    }));
    image.v4 = v4
        .v4
        .into_iter()
        .map(|(key, len, region)| (key, len, region + regions))
        .collect();
}

/// The next index of `items` (the maps are indexed by u32; the capacity
/// check refuses an image anywhere near u32::MAX).
fn index_of<T>(items: &[T]) -> u32 {
    u32::try_from(items.len()).unwrap_or(u32::MAX)
}

/// The prefixes of direction `dir` and one family into `image.v4` or
/// `image.v6`, each with the region of every entry whose network contains
/// it (regions and their segments laid out by `layout`).
fn prefixes(
    entries: &[Entry],
    dir: u8,
    v6: bool,
    image: &mut Image,
    layout: &mut Layout,
) -> Result<(), CompileError> {
    // The networks of this direction and family with their entries, one
    // sorted list: a network's entries are next to each other, in order.
    let mut nets: Vec<(u128, u8, usize)> = entries
        .iter()
        .enumerate()
        .filter(|(_, e)| e.dir == dir)
        .flat_map(|(i, e)| {
            e.nets
                .iter()
                .filter(move |n| matches!(n, IpNet::V6(_)) == v6)
                .map(move |n| (net_bits(n), n.prefix_len(), i))
        })
        .collect();
    nets.sort_unstable();
    let mut own: Vec<usize> = Vec::new();
    // Sorted by (address, length): each network follows the networks
    // that contain it, so a stack holds the current chain, each with the
    // port maps of every entry on the chain down to it.
    let mut stack: Vec<((u128, u8), [Laid; PCLASSES])> = Vec::new();
    // One empty list for every class, so UDP can follow TCP from the top.
    let none = Laid::default();
    let empty: [Laid; PCLASSES] = std::array::from_fn(|_| none.clone());
    for group in nets.chunk_by(|a, b| (a.0, a.1) == (b.0, b.1)) {
        let Some(&(bits, len, _)) = group.first() else {
            continue;
        };
        own.clear();
        own.extend(group.iter().map(|&(.., i)| i));
        while let Some(((top_bits, top_len), _)) = stack.last() {
            if contains(*top_bits, *top_len, bits, len, v6) {
                break;
            }
            stack.pop();
        }
        let base = stack.last().map_or(&empty, |(_, maps)| maps);
        let maps = port_maps(entries, base, &own, layout, &mut image.segments)?;
        let region = layout.region(image, &maps);
        if v6 {
            let mut key = [0u8; 17];
            key[0] = dir;
            key[1..].copy_from_slice(&bits.to_be_bytes());
            image.v6.push((key, 8 + len as u32, region));
        } else {
            let mut key = [0u8; 5];
            key[0] = dir;
            key[1..].copy_from_slice(&(bits as u32).to_be_bytes());
            image.v4.push((key, 8 + len as u32, region));
        }
        stack.push(((bits, len), maps));
    }
    Ok(())
}

/// Refuses an image larger than the maps.
fn check_limits(image: &Image, limits: &Limits) -> Result<(), CompileError> {
    for (what, needed, capacity) in [
        (
            "prefixes",
            image.v4.len().max(image.v6.len()),
            limits.prefixes,
        ),
        ("regions", image.regions.len(), limits.regions),
        ("segments", image.segments.len(), limits.segments),
        ("slots", image.slots.len(), limits.slots),
        (
            "v4_chunks",
            image.v4_chunks.len() / V4_CHUNK_ENTRIES as usize,
            limits.v4_chunks,
        ),
    ] {
        if needed > capacity as usize {
            return Err(CompileError::TooLarge {
                what,
                needed,
                capacity,
            });
        }
    }
    Ok(())
}

/// Builds the IPv4 stride table: each prefix fills the entries it covers at
/// the level where it ends (expanded to that level's 4-bit boundary), in
/// order of length, so a longer prefix overwrites a shorter one and a new
/// chunk starts out with the entry it replaces (the shorter prefix's region).
///
/// The root holds the blocks up to the highest direction `prefixes` have
/// (two without interface rules, of the `V4_ROOT_ENTRIES` the map holds):
/// a change writes those, not the map's 3 MB. Entries past it read as 0.
///
/// Indexing here cannot go out of bounds: `root` has one 65536 block per
/// direction byte up to the highest of `prefixes` and
/// is indexed by the direction times 65536 plus the top 16 bits,
/// with a run of `2^(16 - plen)` that stays inside the aligned 16-bit block;
/// chunks are indexed by ids this function appended (`chunk` <
/// `chunks.len() / 16`) plus a nibble or an aligned run within the chunk.
#[allow(clippy::indexing_slicing)]
fn v4_table(prefixes: &[(RuleKey4, u32, u32)]) -> (Vec<u32>, Vec<u32>) {
    let blocks = prefixes.iter().map(|(key, ..)| key[0] as usize + 1).max();
    let mut root = vec![0u32; blocks.unwrap_or(0) * 65536];
    let mut chunks: Vec<u32> = Vec::new();
    let mut sorted: Vec<_> = prefixes.iter().collect();
    sorted.sort_by_key(|(_, len, _)| *len);
    for (key, len, region) in sorted {
        let plen = len - 8;
        let a = u32::from_be_bytes([key[1], key[2], key[3], key[4]]);
        let value = region + 1;
        let base = key[0] as usize * 65536;
        if plen <= 16 {
            let start = base + (a >> 16) as usize;
            root[start..start + (1usize << (16 - plen))].fill(value);
            continue;
        }
        // Walk (creating chunks) down to the level where the prefix ends.
        let mut at = Cell::Root(base + (a >> 16) as usize);
        let mut depth = 16;
        loop {
            let next = depth + 4;
            let nibble = ((a >> (32 - next)) & 0xf) as usize;
            let current = at.get(&root, &chunks);
            let chunk = if current & V4_NODE != 0 {
                (current & !V4_NODE) as usize
            } else {
                let id = chunks.len() / V4_CHUNK_ENTRIES as usize;
                chunks.extend(std::iter::repeat_n(current, V4_CHUNK_ENTRIES as usize));
                at.set(&mut root, &mut chunks, V4_NODE | id as u32);
                id
            };
            let first = chunk * V4_CHUNK_ENTRIES as usize;
            if plen <= next {
                let start = first + (nibble & !((1usize << (next - plen)) - 1));
                for e in &mut chunks[start..start + (1usize << (next - plen))] {
                    // Deeper chunks come only from longer prefixes, written later.
                    debug_assert!(*e & V4_NODE == 0);
                    *e = value;
                }
                break;
            }
            at = Cell::Chunk(first + nibble);
            depth = next;
        }
    }
    (root, chunks)
}

/// A cell of the table being built: indices from `v4_table` only (see there).
#[derive(Clone, Copy)]
enum Cell {
    Root(usize),
    Chunk(usize),
}

#[allow(clippy::indexing_slicing)]
impl Cell {
    fn get(self, root: &[u32], chunks: &[u32]) -> u32 {
        match self {
            Cell::Root(i) => root[i],
            Cell::Chunk(i) => chunks[i],
        }
    }

    fn set(self, root: &mut [u32], chunks: &mut [u32], v: u32) {
        match self {
            Cell::Root(i) => root[i] = v,
            Cell::Chunk(i) => chunks[i] = v,
        }
    }
}

/// Network address as a 128-bit number (IPv4 in the low 32 bits).
fn net_bits(n: &IpNet) -> u128 {
    match n {
        IpNet::V4(n) => u32::from(n.network()) as u128,
        IpNet::V6(n) => u128::from(n.network()),
    }
}

fn contains(outer: u128, outer_len: u8, inner: u128, inner_len: u8, v6: bool) -> bool {
    if outer_len > inner_len {
        return false;
    }
    let width = if v6 { 128 } else { 32 };
    let shift = width - outer_len as u32;
    shift >= 128 || (outer >> shift) == (inner >> shift)
}

/// SHA-256 of the rule set's canonical JSON.
pub fn hash(set: &RuleSet) -> String {
    canonical(set).1
}

/// The rule set's canonical JSON (compact, fields in declaration order)
/// and its SHA-256, hex.
pub fn canonical(set: &RuleSet) -> (Vec<u8>, String) {
    // A rule set is plain data (strings, numbers, lists, structs with
    // string keys): serde_json has no way to fail on it.
    #[allow(clippy::expect_used)]
    let json = serde_json::to_vec(set).expect("a rule set always serialises");
    let hash = crate::model::hex(&Sha256::digest(&json));
    (json, hash)
}

/// The IPv6 prefixes of an image as the data path looks them up: shorter than /32
/// in the LPM trie, longer ones in a hash per (length, masked address) with,
/// per /32, the lengths present (longest first). A /32 with more distinct
/// lengths than a bucket lists keeps its prefixes in the trie instead.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct V6Tables {
    /// LPM trie keys as the kernel reads them: the prefix length (counting
    /// the direction byte) in host order, then the `RuleKey6`.
    pub short: Table<[u8; 21], u32>,
    /// `V6_PREFIXES`: (direction, length, masked address) -> region.
    pub prefixes: Table<V6PrefixKey, u32>,
    /// `V6_BUCKETS`: per (direction, /32), the lengths present, longest first.
    pub buckets: Table<V6BucketKey, V6Lengths>,
}

impl V6Tables {
    /// The tables of the prefixes `v6` (as in [`Image::v6`]).
    pub fn of(v6: &[(RuleKey6, u32, u32)]) -> V6Tables {
        let bucket = |key: &RuleKey6| [key[0], key[1], key[2], key[3], key[4]];
        // Per /32, the lengths present (V6_SHORT_MAX+1 ..= 128) as bits of
        // a mask: bit `len - 32`.
        let mut lengths: Vec<(V6BucketKey, u128)> = v6
            .iter()
            .filter(|(_, len, _)| len - 8 > V6_SHORT_MAX)
            .map(|(key, len, _)| (bucket(key), 1u128 << (len - 8 - 32)))
            .collect();
        lengths.sort_unstable_by_key(|(b, _)| *b);
        let lengths: Vec<(V6BucketKey, u128)> = lengths
            .chunk_by(|a, b| a.0 == b.0)
            .filter_map(|run| Some((run.first()?.0, run.iter().fold(0, |m, (_, l)| m | l))))
            .collect();
        let buckets = Table::of(
            lengths
                .iter()
                .map(|&(b, mask)| (b, bucket_lengths(mask)))
                .collect(),
        );
        let mut short = Vec::new();
        let mut prefixes = Vec::with_capacity(v6.len());
        for &(key, len, region) in v6 {
            let plen = len - 8;
            let overflow = buckets
                .get(&bucket(&key))
                .is_some_and(|l| l[0] == V6_BUCKET_OVERFLOW);
            if plen <= V6_SHORT_MAX || overflow {
                let mut k = [0u8; 21];
                k[..4].copy_from_slice(&len.to_ne_bytes());
                k[4..].copy_from_slice(&key);
                short.push((k, region));
                continue;
            }
            let [_, addr @ ..] = key;
            let addr = u128::from_be_bytes(addr);
            let masked = addr & (u128::MAX << (128 - plen));
            let mut p = [0u8; 18];
            p[0] = key[0];
            p[1] = plen as u8;
            p[2..].copy_from_slice(&masked.to_be_bytes());
            prefixes.push((p, region));
        }
        V6Tables {
            short: Table::of(short),
            prefixes: Table::of(prefixes),
            buckets,
        }
    }
    /// The region of `addr` in direction `dir`, walked as the data path
    /// walks it (`v6_region` in ebpf/src/rules.rs): the /32 bucket's lengths,
    /// longest first, each probed in `V6_PREFIXES`; then the longest match
    /// in the trie (`SRC6`).
    pub fn region(&self, dir: u8, addr: u128) -> Option<u32> {
        let b = addr.to_be_bytes();
        let bucket: V6BucketKey = [dir, b[0], b[1], b[2], b[3]];
        if let Some(lengths) = self.buckets.get(&bucket)
            && lengths.first() != Some(&V6_BUCKET_OVERFLOW)
        {
            for &len in lengths {
                if len == 0 || len > 128 {
                    break;
                }
                let masked = addr & (u128::MAX << (128 - u32::from(len)));
                let mut key: V6PrefixKey = [0; 18];
                key[0] = dir;
                key[1] = len;
                key[2..].copy_from_slice(&masked.to_be_bytes());
                if let Some(region) = self.prefixes.get(&key) {
                    return Some(*region);
                }
            }
        }
        // The LPM trie: the longest stored prefix of this direction containing `addr`.
        self.short
            .entries()
            .iter()
            .filter_map(|(k, region)| {
                let (len, key) = k.split_at(4);
                let len = u32::from_ne_bytes(len.try_into().ok()?);
                let (&d, net) = key.split_first()?;
                let net = u128::from_be_bytes(net.try_into().ok()?);
                let plen = len.checked_sub(8)?;
                let covers = plen == 0 || (addr >> (128 - plen)) == (net >> (128 - plen));
                (d == dir && covers).then_some((len, *region))
            })
            .max_by_key(|(len, _)| *len)
            .map(|(_, region)| region)
    }
}

/// A bucket's list of lengths from the mask of those present (bit `len -
/// 32`): longest first, or `V6_BUCKET_OVERFLOW` when they do not fit.
fn bucket_lengths(mask: u128) -> V6Lengths {
    let mut list = [0u8; V6_BUCKET_LENGTHS];
    if mask.count_ones() as usize > V6_BUCKET_LENGTHS {
        list[0] = V6_BUCKET_OVERFLOW;
        return list;
    }
    // The set bits, highest first.
    let mut left = mask;
    for slot in &mut list {
        let Some(bit) = 127u32.checked_sub(left.leading_zeros()) else {
            break;
        };
        *slot = 32 + bit as u8;
        left &= !(1u128 << bit);
    }
    list
}

/// The packet-less questions about interface rules.
impl Image {
    /// [`Image::lookup`] for new inbound traffic arriving on interface
    /// `on` (`None`: one no rule names): that interface's rule list.
    pub fn lookup_on(&self, on: Option<&str>, addr: IpAddr, pclass: usize, port: u16) -> u32 {
        let dir = if self.if_classes.is_empty() {
            DIR_INGRESS
        } else {
            let class = on
                .and_then(|n| self.if_classes.iter().position(|c| c == n))
                .map_or(0, |i| i as u32 + 1);
            portcullis_common::ingress_dir(class)
        };
        self.answer(dir, addr, pclass, port)
    }

    /// The slot that admits new traffic of direction `dir` from `addr` to
    /// `port` (`SLOT_NONE`: none), from the compact index: what the data
    /// path answers, also once the image is stripped.
    pub fn answer(&self, dir: u8, addr: IpAddr, pclass: usize, port: u16) -> u32 {
        self.index.lookup(dir, addr, pclass, port)
    }

    /// The image without what only the kernel's maps need once they are
    /// written (the prefixes, the IPv4 table, regions and segments): what
    /// the core keeps of the live generation. Its questions are answered
    /// from [`Image::index`]; [`Image::lookup`] finds nothing in it.
    pub fn strip(&mut self) {
        self.v4 = Vec::new();
        self.v6 = Vec::new();
        self.v6_tables = Arc::default();
        self.v4_root = Vec::new();
        self.v4_chunks = Vec::new();
        self.regions = Vec::new();
        self.segments = Vec::new();
        self.json = Vec::new();
        self.delta = None;
        self.stripped = true;
    }

    /// The interfaces with a rule list of their own here or in `other`,
    /// and `None` (every other interface).
    fn interface_views<'a>(&'a self, other: &'a Image) -> Vec<Option<&'a str>> {
        let mut views = vec![None];
        for name in self.if_classes.iter().chain(&other.if_classes) {
            if !views.contains(&Some(name.as_str())) {
                views.push(Some(name.as_str()));
            }
        }
        views
    }

    /// Whether, on some interface, this image admits new inbound traffic
    /// from `addr` to `port` and `after` does not. What a packet-less check
    /// asks about an open flow or a login, whose interface it does not know:
    /// a change that stops it on any interface counts.
    pub fn stops_admitting(&self, after: &Image, addr: IpAddr, pclass: usize, port: u16) -> bool {
        self.interface_views(after).into_iter().any(|on| {
            portcullis_common::slot_admits(self.lookup_on(on, addr, pclass, port))
                && !portcullis_common::slot_admits(after.lookup_on(on, addr, pclass, port))
        })
    }

    /// Whether some interface's rules admit new inbound traffic from `addr`
    /// to `port`.
    pub fn admits_somewhere(&self, addr: IpAddr, pclass: usize, port: u16) -> bool {
        self.interface_views(self)
            .into_iter()
            .any(|on| portcullis_common::slot_admits(self.lookup_on(on, addr, pclass, port)))
    }
}

impl Image {
    /// What the data path answers for this image: the same three steps,
    /// with a linear longest-prefix match (for tests).
    /// An index outside the image (one that `compile` did not build) admits
    /// nothing.
    pub fn lookup(&self, dir: u8, addr: IpAddr, pclass: usize, port: u16) -> u32 {
        debug_assert!(
            !self.stripped,
            "Image::lookup on a stripped image finds nothing: use answer"
        );
        let region = match addr {
            IpAddr::V4(a) => {
                // The same walk as the data path's v4_region.
                let a = u32::from(a);
                let root = dir as usize * 65536 + (a >> 16) as usize;
                let mut v = self.v4_root.get(root).copied().unwrap_or(0);
                let mut shift = 12i32;
                while v & V4_NODE != 0 && shift >= 0 {
                    let i = (v & !V4_NODE) * V4_CHUNK_ENTRIES + ((a >> shift) & 0xf);
                    v = self.v4_chunks.get(i as usize).copied().unwrap_or(0);
                    shift -= 4;
                }
                (v != 0 && v & V4_NODE == 0).then(|| v - 1)
            }
            IpAddr::V6(a) => self.v6_tables.region(dir, u128::from(a)),
        };
        let Some(r) = region.and_then(|r| self.regions.get(r as usize)) else {
            return SLOT_NONE;
        };
        let (Some(&offset), Some(&len)) = (r.offset.get(pclass), r.len.get(pclass)) else {
            return SLOT_NONE;
        };
        let segment = |i: u32| self.segments.get((offset + i) as usize);
        if len == 0 {
            return SLOT_NONE;
        }
        let mut lo = 0u32;
        for step in (0..SEARCH_STEPS).rev() {
            let probe = lo + (1 << step);
            if probe < len && segment(probe).is_some_and(|s| s.start <= port) {
                lo = probe;
            }
        }
        segment(lo).map_or(SLOT_NONE, |s| s.slot)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use portcullis_common::PCLASS_OTHER;

    use crate::compile::strategies;

    use super::*;
    use crate::rules::{Cluster, FirewallRule};

    proptest::proptest! {
        /// The buckets list each /32's lengths longest first (or overflow
        /// past `V6_BUCKET_LENGTHS`), as a sorted set of the lengths says.
        #[test]
        fn v6_buckets_list_the_lengths_longest_first(
            entries in proptest::collection::vec((0u8..3, 0u8..2, 32u32..=128, proptest::num::u64::ANY), 0..60),
        ) {
            use std::collections::{BTreeMap, BTreeSet};
            let v6: Vec<(RuleKey6, u32, u32)> = entries
                .iter()
                .map(|&(net, dir, len, low)| {
                    let mut key = [0u8; 17];
                    key[0] = dir;
                    key[4] = net;
                    key[9..].copy_from_slice(&low.to_be_bytes());
                    (key, len + 8, 1)
                })
                .collect();
            let mut want: BTreeMap<[u8; 5], BTreeSet<u8>> = BTreeMap::new();
            for (key, len, _) in &v6 {
                want.entry([key[0], key[1], key[2], key[3], key[4]]).or_default().insert((len - 8) as u8);
            }
            let t = V6Tables::of(&v6);
            proptest::prop_assert_eq!(t.buckets.len(), want.len());
            for (b, lens) in want {
                let mut list = [0u8; V6_BUCKET_LENGTHS];
                if lens.len() > V6_BUCKET_LENGTHS {
                    list[0] = V6_BUCKET_OVERFLOW;
                } else {
                    list.iter_mut().zip(lens.iter().rev()).for_each(|(s, l)| *s = *l);
                }
                proptest::prop_assert_eq!(t.buckets.get(&b), Some(&list));
            }
        }
    }

    pub(super) fn rule(
        id: &str,
        from: u32,
        to: u32,
        ranges: &[&str],
        protocol: Protocol,
    ) -> FirewallRule {
        FirewallRule {
            id: id.into(),
            from_port: from,
            to_port: to,
            ip_ranges: ranges.iter().map(|s| s.to_string()).collect(),
            names: Vec::new(),
            protocol,
            description: None,
            icmp_types: Vec::new(),
            expires: None,
            rate: None,
            burst: None,
            interfaces: Vec::new(),
        }
    }

    #[test]
    fn dual_stack_rules_fit_the_capacity_one_family_needs() {
        // Each rule its own ports and one source per family: the IPv6
        // prefixes have exactly the IPv4 ones' port lists and regions, so a
        // set that fits when they are stored once must still compile.
        let set = |dual: bool| {
            let mut set = RuleSet::default();
            for i in 0..40u32 {
                let mut ranges = vec![format!("10.200.{i}.0/24")];
                if dual {
                    ranges.push(format!("fd00:200:{i:x}::/48"));
                }
                let ranges: Vec<&str> = ranges.iter().map(String::as_str).collect();
                set.ingress_rules.push(rule(
                    &format!("r{i}"),
                    1000 + i,
                    1000 + 2 * i,
                    &ranges,
                    Protocol::Tcp,
                ));
            }
            set
        };
        let (one, both) = (set(false), set(true));
        let one = compile(&one, &Limits::default()).unwrap();
        // Laid out apart, the families store their common lists twice.
        let apart = compile(&both, &Limits::default()).unwrap();
        assert!(apart.regions.len() >= one.regions.len() + 40);
        // Without room for that, they are laid out again with one layout.
        let tight = Limits {
            regions: one.regions.len() as u32,
            segments: one.segments.len() as u32,
            ..Limits::default()
        };
        let shared = compile(&both, &tight).unwrap();
        assert!(shared.regions.len() <= one.regions.len());
        assert!(shared.segments.len() <= one.segments.len());
        assert_eq!(shared.v6.len(), one.v6.len() + 40);
        // Both images admit the same.
        for i in 0..40u32 {
            let addrs: [IpAddr; 2] = [
                format!("10.200.{i}.7").parse().unwrap(),
                format!("fd00:200:{i:x}::7").parse().unwrap(),
            ];
            for addr in addrs {
                for port in [999, 1000 + i, 1000 + 2 * i, 1001 + 2 * i] {
                    let port = port as u16;
                    assert_eq!(
                        apart.lookup(DIR_INGRESS, addr, PCLASS_TCP, port),
                        shared.lookup(DIR_INGRESS, addr, PCLASS_TCP, port),
                        "{addr} port {port}"
                    );
                }
            }
            assert_ne!(
                apart.lookup(DIR_INGRESS, addrs[1], PCLASS_TCP, 1000 + i as u16),
                SLOT_NONE
            );
        }
    }

    #[test]
    fn a_rules_own_rate_limit_is_on_its_slot_only() {
        let mut set = RuleSet::default();
        set.ingress_rules
            .push(rule("a", 80, 80, &[], Protocol::Tcp));
        let mut limited = rule("b", 81, 81, &[], Protocol::Tcp);
        (limited.rate, limited.burst) = (Some(4), Some(10));
        set.ingress_rules.push(limited);
        set.egress_rules.push(rule("c", 82, 82, &[], Protocol::Tcp));
        let image = compile(&set, &Limits::default()).unwrap();
        let limits: Vec<(&str, Option<u64>)> = image
            .slots
            .iter()
            .map(|s| (s.name, s.limit.map(|l| l.interval_ns)))
            .collect();
        assert_eq!(
            limits,
            [
                ("", None),
                ("ssh", None),
                ("rule:a", None),
                ("rule:b", Some(250_000_000)),
                ("rule:c", None),
            ]
        );
        let b = *image.slots.get(3).unwrap().limit.unwrap();
        assert_eq!(b.burst_ns, 10 * 250_000_000);
    }

    /// The name of `slot` in `image`.
    fn slot_name(image: &Image, slot: u32) -> String {
        image
            .slots
            .get((slot & SLOT_INDEX_MASK) as usize)
            .unwrap()
            .name
            .to_string()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn first_rule_in_list_order_is_credited() {
        let set = RuleSet {
            ingress_rules: vec![
                rule("narrow-late", 80, 80, &["10.1.0.0/16"], Protocol::Tcp),
                rule("wide", 1, 1000, &["10.0.0.0/8"], Protocol::TcpUdp),
                rule("any", 80, 80, &[], Protocol::Tcp),
            ],
            ..Default::default()
        };
        let image = compile(&set, &Limits::default()).unwrap();
        let name = |slot: u32| slot_name(&image, slot);
        assert_eq!(
            name(image.lookup(DIR_INGRESS, ip("10.1.2.3"), PCLASS_TCP, 80)),
            "rule:narrow-late"
        );
        assert_eq!(
            name(image.lookup(DIR_INGRESS, ip("10.2.2.3"), PCLASS_TCP, 80)),
            "rule:wide"
        );
        assert_eq!(
            name(image.lookup(DIR_INGRESS, ip("11.0.0.1"), PCLASS_TCP, 80)),
            "rule:any"
        );
        assert_eq!(
            name(image.lookup(DIR_INGRESS, ip("10.1.2.3"), PCLASS_UDP, 80)),
            "rule:wide"
        );
        assert_eq!(
            image.lookup(DIR_INGRESS, ip("11.0.0.1"), PCLASS_TCP, 81),
            SLOT_NONE
        );
        assert_eq!(
            image.lookup(DIR_INGRESS, ip("10.0.0.1"), PCLASS_ICMP, 0),
            SLOT_NONE
        );
        assert_eq!(
            image.lookup(DIR_EGRESS, ip("10.0.0.1"), PCLASS_TCP, 80),
            SLOT_NONE
        );
    }

    #[test]
    fn peers_ssh_and_other_clusters() {
        let set = RuleSet {
            ingress_rules: vec![rule("cross", 9000, 9000, &["10.2.0.0/16"], Protocol::Tcp)],
            cluster: Some(Cluster {
                id: "c1".into(),
                peers: vec!["10.1.0.0/16".into(), "fd01::/64".into()],
                other_clusters: vec!["10.2.0.0/16".into()],
            }),
            ssh: crate::rules::Ssh {
                allow: true,
                sources: vec!["192.0.2.0/24".into()],
                ports: vec![22, 2222],
            },
            ..Default::default()
        };
        let image = compile(&set, &Limits::default()).unwrap();
        let kind = |slot: u32| slot >> SLOT_KIND_SHIFT;
        assert_eq!(
            kind(image.lookup(DIR_INGRESS, ip("10.1.0.9"), PCLASS_OTHER, 0)),
            SLOT_KIND_PEER
        );
        assert_eq!(
            kind(image.lookup(DIR_INGRESS, ip("fd01::9"), PCLASS_UDP, 7)),
            SLOT_KIND_PEER
        );
        assert_eq!(
            kind(image.lookup(DIR_EGRESS, ip("10.1.0.9"), PCLASS_TCP, 7)),
            SLOT_KIND_PEER
        );
        assert_eq!(
            kind(image.lookup(DIR_INGRESS, ip("10.2.0.9"), PCLASS_TCP, 9000)),
            SLOT_KIND_RULE
        );
        assert_eq!(
            kind(image.lookup(DIR_INGRESS, ip("10.2.0.9"), PCLASS_TCP, 9001)),
            SLOT_KIND_FOREIGN
        );
        assert_eq!(
            kind(image.lookup(DIR_INGRESS, ip("192.0.2.5"), PCLASS_TCP, 22)),
            SLOT_KIND_SSH
        );
        assert_eq!(
            image.lookup(DIR_INGRESS, ip("198.51.100.5"), PCLASS_TCP, 22),
            SLOT_NONE
        );
        // Every SSH port, one slot; nothing between them.
        assert_eq!(
            image.lookup(DIR_INGRESS, ip("192.0.2.5"), PCLASS_TCP, 2222),
            image.lookup(DIR_INGRESS, ip("192.0.2.5"), PCLASS_TCP, 22)
        );
        assert_eq!(
            image.lookup(DIR_INGRESS, ip("192.0.2.5"), PCLASS_TCP, 2221),
            SLOT_NONE
        );
        assert_eq!(
            image.lookup(DIR_INGRESS, ip("192.0.2.5"), PCLASS_UDP, 2222),
            SLOT_NONE
        );
        assert_eq!(image.slots.iter().filter(|s| s.name == "ssh").count(), 1);
    }

    /// The IPv6 maps are written entry by entry, and not at all when
    /// unchanged: an IPv4 rule added (a new IPv4 region) must not move the
    /// IPv6 prefixes' region numbers.
    #[test]
    fn an_ipv4_rule_added_leaves_the_ipv6_tables_as_they_were() {
        let mut set = RuleSet {
            ingress_rules: (0..20)
                .map(|i| {
                    let (v4, v6) = (format!("10.{i}.0.0/16"), format!("fd00:{i:x}::/32"));
                    rule(
                        &format!("r{i}"),
                        400 + i,
                        400 + i,
                        &[&v4, &v6],
                        Protocol::Tcp,
                    )
                })
                .collect(),
            ..Default::default()
        };
        let before = compile(&set, &Limits::default()).unwrap();
        set.ingress_rules
            .push(rule("v4", 23, 23, &["10.200.9.0/24"], Protocol::Tcp));
        let after = compile(&set, &Limits::default()).unwrap();
        assert_eq!(after.v4.len(), before.v4.len() + 1);
        assert_eq!(after.regions.len(), before.regions.len() + 1);
        assert_eq!(after.v6_tables, before.v6_tables);
    }

    #[test]
    fn identical_regions_are_shared_and_limits_are_enforced() {
        let set = RuleSet {
            ingress_rules: (0..50)
                .map(|i| {
                    rule(
                        &format!("r{i}"),
                        443,
                        443,
                        &[&format!("10.{i}.0.0/16")],
                        Protocol::Tcp,
                    )
                })
                .collect(),
            ssh: crate::rules::Ssh {
                allow: false,
                ..Default::default()
            },
            ..Default::default()
        };
        let image = compile(&set, &Limits::default()).unwrap();
        assert_eq!(image.v4.len(), 50);
        assert_eq!(image.regions.len(), 50, "each rule credits its own slot");
        let tight = Limits {
            prefixes: 10,
            ..Limits::default()
        };
        assert_eq!(
            compile(&set, &tight).unwrap_err(),
            CompileError::TooLarge {
                what: "prefixes",
                needed: 50,
                capacity: 10
            }
        );
    }

    #[test]
    fn icmp_types_admit_their_types_and_codes_per_family() {
        let mut r = rule("icmp", 0, 0, &[], Protocol::Icmp);
        r.icmp_types = vec![
            "echo-request".into(),
            "destination-unreachable/4".into(),
            "icmp:13".into(),
        ];
        let set = RuleSet {
            ingress_rules: vec![r, rule("all", 0, 0, &["10.9.0.0/16"], Protocol::Icmp)],
            ..Default::default()
        };
        let image = compile(&set, &Limits::default()).unwrap();
        let (entries, _) = entries(&set);
        let name = |slot: u32| slot_name(&image, slot);
        let at = |a: &str, t: u8, c: u8| {
            let port = portcullis_common::icmp_port(t, c);
            let slot = image.lookup(DIR_INGRESS, ip(a), PCLASS_ICMP, port);
            assert_eq!(
                slot,
                reference(&entries, DIR_INGRESS, ip(a), PCLASS_ICMP, port)
            );
            slot
        };
        for (a, echo, unreach) in [("192.0.2.1", 8, 3), ("2001:db8::1", 128, 1)] {
            assert_eq!(name(at(a, echo, 0)), "rule:icmp", "{a}");
            assert_eq!(name(at(a, echo, 7)), "rule:icmp", "{a}: every code");
            assert_eq!(name(at(a, unreach, 4)), "rule:icmp", "{a}");
            assert_eq!(at(a, unreach, 3), SLOT_NONE, "{a}: only code 4");
            assert_eq!(at(a, 0, 0), SLOT_NONE, "{a}: echo reply");
        }
        assert_eq!(name(at("192.0.2.1", 13, 0)), "rule:icmp");
        assert_eq!(
            at("2001:db8::1", 13, 0),
            SLOT_NONE,
            "icmp:13 is ICMPv4 only"
        );
        assert_eq!(at("192.0.2.1", 128, 0), SLOT_NONE, "128 is an ICMPv6 type");
        // A rule without types still covers every type and code.
        assert_eq!(name(at("10.9.1.1", 42, 42)), "rule:all");
    }

    /// More named interfaces than the data path has lists for is refused
    /// by compile itself, not only by `RuleSet::validate` (the data path
    /// would give a fourth interface every ingress rule).
    #[test]
    fn more_named_interfaces_than_lists_is_refused() {
        let rules = ["eth1", "eth2", "eth3", "eth4"]
            .iter()
            .map(|n| {
                let mut r = rule(n, 9000, 9000, &["10.0.0.0/8"], Protocol::Tcp);
                r.interfaces = vec![(*n).into()];
                r
            })
            .collect();
        let set = RuleSet {
            ingress_rules: rules,
            ..Default::default()
        };
        let e = compile(&set, &Limits::default()).unwrap_err();
        assert!(
            matches!(e, CompileError::TooManyInterfaces { named: 4, .. }),
            "{e}"
        );
    }

    #[test]
    fn interface_rules_apply_on_their_interfaces_only() {
        use portcullis_common::ingress_dir;
        let mut cluster = rule("cluster", 9000, 9000, &["10.0.0.0/8"], Protocol::Tcp);
        cluster.interfaces = vec!["eth1".into()];
        let mut narrow = rule("narrow", 9000, 9001, &["10.1.0.0/16"], Protocol::Tcp);
        narrow.interfaces = vec!["eth2".into()];
        let set = RuleSet {
            ingress_rules: vec![cluster, narrow, rule("web", 443, 443, &[], Protocol::Tcp)],
            ..Default::default()
        };
        set.validate().unwrap();
        let image = compile(&set, &Limits::default()).unwrap();
        assert_eq!(image.if_classes, ["eth1", "eth2"]);
        let (entries, _) = entries(&set);
        let name = |slot: u32| slot_name(&image, slot);
        let at = |class: u32, a: &str, port: u16| {
            let dir = ingress_dir(class);
            let slot = image.lookup(dir, ip(a), PCLASS_TCP, port);
            assert_eq!(slot, reference(&entries, dir, ip(a), PCLASS_TCP, port));
            slot
        };
        // Class 0 (any other interface): neither scoped rule.
        assert_eq!(at(0, "10.1.2.3", 9000), SLOT_NONE);
        assert_eq!(name(at(0, "10.1.2.3", 443)), "rule:web");
        // eth1: the cluster rule, and the unscoped ones.
        assert_eq!(name(at(1, "10.1.2.3", 9000)), "rule:cluster");
        assert_eq!(at(1, "10.1.2.3", 9001), SLOT_NONE);
        assert_eq!(name(at(1, "10.1.2.3", 443)), "rule:web");
        // eth2: the narrow rule only where it reaches.
        assert_eq!(name(at(2, "10.1.2.3", 9000)), "rule:narrow");
        assert_eq!(at(2, "10.2.2.3", 9000), SLOT_NONE);
        // DIR_INGRESS: every interface's rules at once (egress's question
        // about replies, the expiry's cut).
        let any = |a: &str, port: u16| image.lookup(DIR_INGRESS, ip(a), PCLASS_TCP, port);
        assert_eq!(name(any("10.1.2.3", 9000)), "rule:cluster");
        assert_eq!(name(any("10.1.2.3", 9001)), "rule:narrow");
        assert_eq!(name(any("10.1.2.3", 443)), "rule:web");
        assert_eq!(any("10.2.2.3", 9001), SLOT_NONE);
        // Without interface rules the image is what it always was: one
        // ingress list.
        let plain = RuleSet {
            ingress_rules: vec![rule("web", 443, 443, &[], Protocol::Tcp)],
            ..Default::default()
        };
        let plain = compile(&plain, &Limits::default()).unwrap();
        assert!(plain.if_classes.is_empty());
        assert_eq!(
            plain.lookup(ingress_dir(0), ip("10.1.2.3"), PCLASS_TCP, 443),
            SLOT_NONE
        );
        assert_ne!(
            plain.lookup(DIR_INGRESS, ip("10.1.2.3"), PCLASS_TCP, 443),
            SLOT_NONE
        );
        // Names a protected interface: explicit list, or automatic mode's
        // test (here: anything but "lo").
        let auto = |n: &str| n != "lo";
        assert!(set.check_rule_interfaces(&[], auto).is_ok());
        let listed = ["eth1".to_string(), "eth2".to_string()];
        assert!(set.check_rule_interfaces(&listed, auto).is_ok());
        let e = set.check_rule_interfaces(&listed[..1], auto).unwrap_err();
        assert_eq!(
            (e.field, e.place.as_str()),
            ("interfaces", "ingress_rules[1] (id \"narrow\")")
        );
        assert!(e.reason.contains("\"eth2\""), "{}", e.reason);
        let mut on_lo = set.clone();
        on_lo.ingress_rules[2].interfaces = vec!["lo".into()];
        assert_eq!(
            on_lo.check_rule_interfaces(&[], auto).unwrap_err().field,
            "interfaces"
        );
        let mut bad = set.clone();
        bad.egress_rules.push(bad.ingress_rules[0].clone());
        bad.egress_rules[0].id = "out".into();
        assert_eq!(bad.validate().unwrap_err().field, "interfaces");
        let mut many = set;
        many.ingress_rules[2].interfaces = vec!["eth3".into(), "eth4".into()];
        assert_eq!(many.validate().unwrap_err().field, "interfaces");
    }

    /// The packet-less questions (anti-lockout, would_cut) per interface.
    #[test]
    fn packetless_checks_ask_each_interface() {
        let mut cluster = rule("cluster", 9000, 9000, &["10.0.0.0/8"], Protocol::Tcp);
        cluster.interfaces = vec!["eth1".into()];
        let set = RuleSet {
            ingress_rules: vec![cluster, rule("web", 443, 443, &[], Protocol::Tcp)],
            ..Default::default()
        };
        let image = compile(&set, &Limits::default()).unwrap();
        let name = |slot: u32| slot_name(&image, slot);
        assert_eq!(
            name(image.lookup_on(Some("eth1"), ip("10.5.0.1"), PCLASS_TCP, 9000)),
            "rule:cluster"
        );
        assert_eq!(
            image.lookup_on(None, ip("10.5.0.1"), PCLASS_TCP, 9000),
            SLOT_NONE
        );
        assert!(image.admits_somewhere(ip("10.5.0.1"), PCLASS_TCP, 9000));
        assert!(!image.stops_admitting(&image, ip("10.5.0.1"), PCLASS_TCP, 9000));
        let mut moved = set.clone();
        moved.ingress_rules[0].interfaces = vec!["eth2".into()];
        let moved = compile(&moved, &Limits::default()).unwrap();
        assert!(image.stops_admitting(&moved, ip("10.5.0.1"), PCLASS_TCP, 9000));
        assert!(moved.stops_admitting(&image, ip("10.5.0.1"), PCLASS_TCP, 9000));
        assert!(!image.stops_admitting(&moved, ip("10.5.0.1"), PCLASS_TCP, 443));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]
        /// The compiled image answers exactly what the one-by-one evaluator does.
        #[test]
        fn compiled_lookup_matches_the_reference(
            set in strategies::rule_set(),
            probes in prop::collection::vec((strategies::address(), 0usize..PCLASSES, 0u16..700, any::<bool>()), 50),
        ) {
            set.validate().unwrap();
            let image = compile(&set, &Limits::default()).unwrap();
            let (entries, _) = entries(&set);
            for (addr, pclass, port, egress) in probes {
                // Egress, ingress on interface class 0..=2 (the
                // strategies name two interfaces), or on any interface.
                let dir = match (egress, port % 4) {
                    (true, _) => DIR_EGRESS,
                    (false, 3) => DIR_INGRESS,
                    (false, c) => portcullis_common::ingress_dir(u32::from(c)),
                };
                let port = match pclass {
                    PCLASS_ICMP => strategies::icmp_probe(port),
                    PCLASS_OTHER => 0,
                    _ => port,
                };
                let want = reference(&entries, dir, addr, pclass, port);
                prop_assert_eq!(
                    image.lookup(dir, addr, pclass, port),
                    want,
                    "dir {} addr {} class {} port {}", dir, addr, pclass, port
                );
                prop_assert_eq!(
                    image.answer(dir, addr, pclass, port),
                    want,
                    "index: dir {} addr {} class {} port {}", dir, addr, pclass, port
                );
            }
        }
    }
}

/// Random rule sets and addresses whose networks overlap and nest, for the
/// property tests here and the kernel ones in `tests/`.
#[cfg(any(test, feature = "testing"))]
// Test support only (feature `testing`): prefix lengths come from ranges
// that fit their family, so `IpNet::new` cannot fail.
#[allow(clippy::unwrap_used)]
pub mod strategies {
    use std::net::IpAddr;

    use ipnet::IpNet;
    use proptest::prelude::*;

    use crate::rules::{Cluster, FirewallRule, Protocol, RuleSet, Ssh};

    pub fn network() -> impl Strategy<Value = IpNet> {
        prop_oneof![
            (0u32..4, 0u8..=3, 8u8..=32).prop_map(|(a, b, len)| {
                // Few distinct high bits, so networks overlap and nest.
                let addr = std::net::Ipv4Addr::from(
                    (10u32 << 24) | (a << 22) | ((b as u32) << 14) | 0x1234,
                );
                IpNet::new(IpAddr::V4(addr), len).unwrap().trunc()
            }),
            // Lengths on both sides of the data path's /32 split (trie below,
            // hashes from /32 on); a few /32s, some with more lengths than a
            // bucket lists.
            (0u16..12, 16u8..=128).prop_map(|(a, len)| {
                let addr = std::net::Ipv6Addr::new(0xfd00, a, 0x200, 1, 2, 3, 4, 5);
                IpNet::new(IpAddr::V6(addr), len).unwrap().trunc()
            }),
        ]
    }

    pub fn rule(i: usize) -> impl Strategy<Value = FirewallRule> {
        (
            0u32..400,
            0u32..200,
            prop::collection::vec(network(), 0..4),
            prop_oneof![
                Just(Protocol::TcpUdp),
                Just(Protocol::Tcp),
                Just(Protocol::Udp),
                Just(Protocol::Icmp),
                Just(Protocol::Any)
            ],
        )
            .prop_flat_map(|(from, span, nets, protocol)| {
                let types = if protocol == Protocol::Icmp {
                    prop::collection::vec(prop::sample::select(ICMP_TYPES), 0..3).boxed()
                } else {
                    Just(Vec::new()).boxed()
                };
                (Just((from, span, nets, protocol)), types)
            })
            .prop_map(move |((from, span, nets, protocol), types)| FirewallRule {
                interfaces: match (i < 100, from % 5) {
                    (true, 0) => vec!["eth1".into()],
                    (true, 1) => vec!["eth1".into(), "eth2".into()],
                    (true, 2) => vec!["eth2".into()],
                    _ => Vec::new(),
                },
                id: format!("r{i}"),
                from_port: from,
                to_port: from + span,
                ip_ranges: nets.iter().map(|n| n.to_string()).collect(),
                names: Vec::new(),
                protocol,
                description: None,
                icmp_types: types.iter().map(ToString::to_string).collect(),
                expires: None,
                rate: None,
                burst: None,
            })
    }

    /// ICMP types rules pick from: both families, one family, with a code.
    pub const ICMP_TYPES: &[&str] = &[
        "echo-request",
        "echo-request/0",
        "icmp:13",
        "destination-unreachable/4",
        "icmpv6:128/3",
        "packet-too-big",
    ];

    /// An ICMP port (type << 8 | code) to probe, from any number: the
    /// types and codes the rules above name, their neighbours, and others.
    pub fn icmp_probe(n: u16) -> u16 {
        const TYPES: [u8; 8] = [0, 1, 2, 3, 8, 13, 128, 129];
        const CODES: [u8; 5] = [0, 3, 4, 5, 255];
        let t = TYPES.get(usize::from(n) % TYPES.len()).copied();
        let c = CODES.get(usize::from(n / 8) % CODES.len()).copied();
        let (t, c) = (t.unwrap_or(0), c.unwrap_or(0));
        portcullis_common::icmp_port(t, c)
    }

    pub fn rule_set() -> impl Strategy<Value = RuleSet> {
        (1usize..25, 0usize..4).prop_flat_map(|(n, m)| {
            (
                (0..n).map(rule).collect::<Vec<_>>(),
                (0..m).map(|i| rule(100 + i)).collect::<Vec<_>>(),
                prop::collection::vec(network(), 0..3),
                any::<bool>(),
            )
                .prop_map(|(ingress_rules, egress_rules, peers, ssh)| RuleSet {
                    ingress_rules,
                    egress_rules,
                    cluster: Some(Cluster {
                        id: "c".into(),
                        peers: peers.iter().map(|n| n.to_string()).collect(),
                        other_clusters: vec!["10.64.0.0/10".into()],
                    }),
                    ssh: Ssh {
                        allow: ssh,
                        ports: vec![22, 2222],
                        ..Ssh::default()
                    },
                    egress: None,
                })
        })
    }

    pub fn address() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            (0u32..4, any::<u32>()).prop_map(|(a, r)| IpAddr::V4(
                ((10u32 << 24) | (a << 22) | (r & 0x3f_ffff)).into()
            )),
            (0u16..4, any::<u64>()).prop_map(|(a, r)| IpAddr::V6(std::net::Ipv6Addr::new(
                0xfd00,
                a,
                0x200,
                1,
                (r >> 48) as u16,
                (r >> 32) as u16,
                (r >> 16) as u16,
                r as u16
            ))),
        ]
    }
}
