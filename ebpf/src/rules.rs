//! Rule lookup: (direction, source, protocol, port) -> the first rule that
//! admits it, in a fixed number of steps whatever the number of rules.
//!
//! | map            | type              | key                         | value     |
//! |----------------|-------------------|-----------------------------|-----------|
//! | `ACTIVE`       | array (1)         | 0                           | live generation (0/1) |
//! | `V4_ROOT_g`    | array (6 x 65536) | direction (ingress on any interface, egress, ingress per interface class), top 16 bits | region+1, or chunk (`V4_NODE`) |
//! | `V4_CHUNKS_g`  | array (16 x chunks) | chunk, next 4 bits        | region+1, or chunk |
//! | `V6_BUCKETS_g` | hash (no prealloc) | direction, top 32 bits of the address | prefix lengths of /32 and longer there, longest first (or `V6_BUCKET_OVERFLOW`) |
//! | `V6_PREFIXES_g` | hash (no prealloc) | direction, length, masked address | region |
//! | `SRC6_g`       | LPM trie          | direction byte + IPv6 prefix | region, for prefixes shorter than /32 (and an overflowing /32's) |
//! | `REGIONS_g`    | array             | region                      | `Region` (segments per protocol class) |
//! | `SEGMENTS_g`   | array             | index                       | `Segment` (port run start, slot) |
//! | `RULE_STATS_g` | per-CPU array     | slot                        | `Counter` |
//! | `IFDIR`        | hash (64)         | generation << 32, ifindex   | ingress direction byte of an interface rules name |
//!
//! `g` is the generation: user space fills the idle one, then flips `ACTIVE`.
//! A packet reads `ACTIVE` once, so it sees one whole generation.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, PerCpuArray, lpm_trie::Key},
};
use portcullis_common::{
    Counter, DEFAULT_PREFIXES, DEFAULT_REGIONS, DEFAULT_RULE_SLOTS, DEFAULT_SEGMENTS,
    DEFAULT_V4_CHUNKS, FAMILY_V4, Region, RuleKey6, SEARCH_STEPS, SETTING_NO_IF_RULES,
    SETTING_NO_SRC6, SLOT_INDEX_MASK, SLOT_NONE, Segment, V4_CHUNK_ENTRIES, V4_NODE,
    V4_ROOT_ENTRIES, V6_BUCKET_OVERFLOW, V6BucketKey, V6Lengths, V6PrefixKey,
};

/// Hash maps allocated as entries are inserted (BPF_F_NO_PREALLOC): their
/// memory follows the rule set, not the capacity.
const NO_PREALLOC: u32 = 1;
/// Arrays user space writes through a shared mapping of their memory.
const MMAPABLE: u32 = portcullis_common::BPF_F_MMAPABLE;

#[map]
pub static ACTIVE: Array<u32> = Array::pinned(1, 0);

#[map]
pub static V4_ROOT_0: Array<u32> = Array::pinned(V4_ROOT_ENTRIES, MMAPABLE);
#[map]
pub static V4_ROOT_1: Array<u32> = Array::pinned(V4_ROOT_ENTRIES, MMAPABLE);
#[map]
pub static V4_CHUNKS_0: Array<u32> = Array::pinned(DEFAULT_V4_CHUNKS * V4_CHUNK_ENTRIES, MMAPABLE);
#[map]
pub static V4_CHUNKS_1: Array<u32> = Array::pinned(DEFAULT_V4_CHUNKS * V4_CHUNK_ENTRIES, MMAPABLE);
#[map]
pub static SRC6_0: LpmTrie<RuleKey6, u32> = LpmTrie::pinned(DEFAULT_PREFIXES, 0);
#[map]
pub static SRC6_1: LpmTrie<RuleKey6, u32> = LpmTrie::pinned(DEFAULT_PREFIXES, 0);
#[map]
pub static V6_BUCKETS_0: HashMap<V6BucketKey, V6Lengths> =
    HashMap::pinned(DEFAULT_PREFIXES, NO_PREALLOC);
#[map]
pub static V6_BUCKETS_1: HashMap<V6BucketKey, V6Lengths> =
    HashMap::pinned(DEFAULT_PREFIXES, NO_PREALLOC);
#[map]
pub static V6_PREFIXES_0: HashMap<V6PrefixKey, u32> =
    HashMap::pinned(DEFAULT_PREFIXES, NO_PREALLOC);
#[map]
pub static V6_PREFIXES_1: HashMap<V6PrefixKey, u32> =
    HashMap::pinned(DEFAULT_PREFIXES, NO_PREALLOC);
#[map]
pub static REGIONS_0: Array<Region> = Array::pinned(DEFAULT_REGIONS, MMAPABLE);
#[map]
pub static REGIONS_1: Array<Region> = Array::pinned(DEFAULT_REGIONS, MMAPABLE);
#[map]
pub static SEGMENTS_0: Array<Segment> = Array::pinned(DEFAULT_SEGMENTS, MMAPABLE);
#[map]
pub static SEGMENTS_1: Array<Segment> = Array::pinned(DEFAULT_SEGMENTS, MMAPABLE);
#[map]
pub static RULE_STATS_0: PerCpuArray<Counter> = PerCpuArray::pinned(DEFAULT_RULE_SLOTS, 0);
#[map]
pub static RULE_STATS_1: PerCpuArray<Counter> = PerCpuArray::pinned(DEFAULT_RULE_SLOTS, 0);
/// Interfaces rules name (at most `IF_CLASSES` per generation): the
/// direction byte of their ingress rule list.
#[map]
pub static IFDIR: HashMap<u64, u32> = HashMap::pinned(64, 0);

/// The direction byte of the ingress rules that apply on `ifindex` in
/// `generation`: its `IFDIR` entry, else the generation's `default`
/// (`Settings::ingress_dir`). Read once, just before the lookup; `IFDIR`
/// is not asked while no rule names an interface (`SETTING_NO_IF_RULES`
/// in `flags`). Every branch gives the verifier an unknown scalar, so the
/// paths after it are one state, not several (the skip joins the lookup's
/// miss: written as an early return instead, it costs the verifier 5%
/// more instructions).
#[inline(always)]
pub fn ingress_dir(generation: usize, ifindex: u32, flags: u32, default: u32) -> u8 {
    let key = ((generation as u64) << 32) | u64::from(ifindex);
    let found = if flags & SETTING_NO_IF_RULES == 0 {
        // SAFETY: the value is copied out at once; entries of a generation
        // only change while it is idle, or one at a time when a link appears.
        unsafe { IFDIR.get(&key) }.copied()
    } else {
        None
    };
    let dir = match found {
        Some(d) => d,
        None => default,
    };
    dir as u8
}

/// One generation's maps.
struct Generation {
    v4_root: &'static Array<u32>,
    v4_chunks: &'static Array<u32>,
    src6: &'static LpmTrie<RuleKey6, u32>,
    v6_buckets: &'static HashMap<V6BucketKey, V6Lengths>,
    v6_prefixes: &'static HashMap<V6PrefixKey, u32>,
    regions: &'static Array<Region>,
    segments: &'static Array<Segment>,
    stats: &'static PerCpuArray<Counter>,
}

/// Runs `$body` with `$g` bound to generation `$index`'s maps. Each branch
/// names its own maps, so every map access in the program refers to one map.
macro_rules! with_generation {
    ($index:expr, |$g:ident| $body:expr) => {
        if $index == 0 {
            let $g = Generation {
                v4_root: &V4_ROOT_0,
                v4_chunks: &V4_CHUNKS_0,
                src6: &SRC6_0,
                v6_buckets: &V6_BUCKETS_0,
                v6_prefixes: &V6_PREFIXES_0,
                regions: &REGIONS_0,
                segments: &SEGMENTS_0,
                stats: &RULE_STATS_0,
            };
            $body
        } else {
            let $g = Generation {
                v4_root: &V4_ROOT_1,
                v4_chunks: &V4_CHUNKS_1,
                src6: &SRC6_1,
                v6_buckets: &V6_BUCKETS_1,
                v6_prefixes: &V6_PREFIXES_1,
                regions: &REGIONS_1,
                segments: &SEGMENTS_1,
                stats: &RULE_STATS_1,
            };
            $body
        }
    };
}

/// A lookup's answer: the slot (with its kind bits), or `SLOT_NONE`.
pub struct Match {
    pub slot: u32,
    generation: usize,
}

/// The live generation. Read once per packet and passed along, so one
/// packet never mixes two generations.
#[inline(always)]
pub fn active() -> usize {
    match ACTIVE.get(0) {
        Some(g) if *g == 1 => 1,
        _ => 0,
    }
}

/// The rule that admits a packet of protocol class `pclass` to/from `port`
/// whose other end is `addr`, in direction `dir`, in `generation` (whose
/// settings flags are `flags`).
#[inline(always)]
pub fn lookup(
    generation: usize,
    flags: u32,
    dir: u8,
    family: u8,
    addr: &[u8; 16],
    pclass: usize,
    port: u16,
) -> Match {
    let slot = with_generation!(generation, |g| lookup_in(
        &g, flags, dir, family, addr, pclass, port
    ));
    Match { slot, generation }
}

#[inline(always)]
fn lookup_in(
    g: &Generation,
    flags: u32,
    dir: u8,
    family: u8,
    addr: &[u8; 16],
    pclass: usize,
    port: u16,
) -> u32 {
    let region = if family == FAMILY_V4 {
        v4_region(
            g,
            dir,
            u32::from_be_bytes([addr[0], addr[1], addr[2], addr[3]]),
        )
    } else {
        v6_region(g, flags, dir, addr)
    };
    match region {
        Some(region) => search(g, region, pclass, port),
        None => SLOT_NONE,
    }
}

/// The region of IPv4 address `a`: the root entry of its top 16 bits, then
/// at most four 4-bit steps. Five array reads at most.
#[inline(always)]
fn v4_region(g: &Generation, dir: u8, a: u32) -> Option<u32> {
    let mut v = match g.v4_root.get(dir as u32 * 65536 + (a >> 16)) {
        Some(v) => *v,
        None => return None,
    };
    let mut shift = 12u32;
    for _ in 0..4 {
        if v & V4_NODE == 0 {
            break;
        }
        let index = (v & !V4_NODE) * V4_CHUNK_ENTRIES + ((a >> shift) & 0xf);
        v = match g.v4_chunks.get(index) {
            Some(v) => *v,
            None => return None,
        };
        shift = shift.wrapping_sub(4);
    }
    if v == 0 || v & V4_NODE != 0 {
        None
    } else {
        Some(v - 1)
    }
}

/// The region of IPv6 address `addr`. Prefixes of /32 and longer first: the
/// hash of its /32 lists the lengths that exist there (at most
/// `V6_BUCKET_LENGTHS`), each one hash probe, longest first; an address under
/// no such /32 makes none. Then, if none matched, the LPM trie, which holds
/// only the prefixes shorter than /32 (and those of the rare /32 with more
/// lengths than a bucket lists), so it stays small and shallow; not asked
/// while it is empty (`SETTING_NO_SRC6` in `flags`).
#[inline(always)]
fn v6_region(g: &Generation, flags: u32, dir: u8, addr: &[u8; 16]) -> Option<u32> {
    let bucket: V6BucketKey = [dir, addr[0], addr[1], addr[2], addr[3]];
    // SAFETY: the value is copied out at once; entries only change while
    // this generation is idle.
    if let Some(lengths) = unsafe { g.v6_buckets.get(&bucket) }.copied()
        && lengths[0] != V6_BUCKET_OVERFLOW
    {
        let hi = u64::from_be_bytes([
            addr[0], addr[1], addr[2], addr[3], addr[4], addr[5], addr[6], addr[7],
        ]);
        let lo = u64::from_be_bytes([
            addr[8], addr[9], addr[10], addr[11], addr[12], addr[13], addr[14], addr[15],
        ]);
        for len in lengths {
            if len == 0 || len > 128 {
                break;
            }
            // The address masked to `len` bits (32..=128), without a loop;
            // every shift stays below 64.
            let (h, l) = if len > 64 {
                (
                    hi,
                    if len == 128 {
                        lo
                    } else {
                        lo & (u64::MAX << (128 - len))
                    },
                )
            } else if len == 64 {
                (hi, 0)
            } else {
                (hi & (u64::MAX << (64 - len)), 0)
            };
            let mut key: V6PrefixKey = [0; 18];
            key[0] = dir;
            key[1] = len;
            key[2..10].copy_from_slice(&h.to_be_bytes());
            key[10..].copy_from_slice(&l.to_be_bytes());
            // SAFETY: as above.
            if let Some(region) = unsafe { g.v6_prefixes.get(&key) } {
                return Some(*region);
            }
        }
    }
    // The skip joins the lookup's miss (one state for the verifier); the
    // key built only where it is used (built before the test, the egress
    // program's verifier walk grows by 100k instructions).
    if flags & SETTING_NO_SRC6 != 0 {
        None
    } else {
        let mut data = [0u8; 17];
        data[0] = dir;
        data[1..].copy_from_slice(addr);
        g.src6.get(&Key::new(8 + 128, data)).copied()
    }
}

/// Finds the last segment starting at or below `port`: SEARCH_STEPS steps,
/// always, so the cost does not depend on the rule set.
#[inline(always)]
fn search(g: &Generation, region: u32, pclass: usize, port: u16) -> u32 {
    let Some(r) = g.regions.get(region) else {
        return SLOT_NONE;
    };
    if pclass >= r.len.len() {
        return SLOT_NONE;
    }
    let (offset, len) = (r.offset[pclass], r.len[pclass]);
    if len == 0 {
        return SLOT_NONE;
    }
    let mut lo = 0u32;
    let mut step = SEARCH_STEPS;
    while step > 0 {
        step -= 1;
        let probe = lo + (1 << step);
        if probe < len {
            if let Some(seg) = g.segments.get(offset + probe) {
                if seg.start <= port {
                    lo = probe;
                }
            }
        }
    }
    match g.segments.get(offset + lo) {
        Some(seg) => seg.slot,
        None => SLOT_NONE,
    }
}

/// Credits the matched rule with one packet of `bytes`.
#[inline(always)]
pub fn count(m: &Match, bytes: u64) {
    if crate::explain::on() {
        crate::explain::slot(m.slot);
        return;
    }
    with_generation!(m.generation, |g| {
        if let Some(c) = g.stats.get_ptr_mut(m.slot & SLOT_INDEX_MASK) {
            // SAFETY: pointer from a successful per-CPU lookup; only this CPU
            // writes it while the program runs.
            unsafe {
                (*c).packets += 1;
                (*c).bytes += bytes;
            }
        }
    })
}
