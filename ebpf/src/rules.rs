//! Rule lookup: (direction, source, protocol, port) -> the first rule that
//! admits it, in a fixed number of steps whatever the number of rules.
//!
//! | map            | type              | key                         | value     |
//! |----------------|-------------------|-----------------------------|-----------|
//! | `ACTIVE`       | array (1)         | 0                           | live generation (0/1) |
//! | `SRC4_g`       | LPM trie          | direction byte + IPv4 prefix | region   |
//! | `SRC6_g`       | LPM trie          | direction byte + IPv6 prefix | region   |
//! | `REGIONS_g`    | array             | region                      | `Region` (segments per protocol class) |
//! | `SEGMENTS_g`   | array             | index                       | `Segment` (port run start, slot) |
//! | `RULE_STATS_g` | per-CPU array     | slot                        | `Counter` |
//!
//! `g` is the generation: user space fills the idle one, then flips `ACTIVE`.
//! A packet reads `ACTIVE` once, so it sees one whole generation.

use aya_ebpf::{
    macros::map,
    maps::{Array, LpmTrie, PerCpuArray, lpm_trie::Key},
};
use portcullis_common::{
    Counter, DEFAULT_PREFIXES, DEFAULT_REGIONS, DEFAULT_RULE_SLOTS, DEFAULT_SEGMENTS, FAMILY_V4,
    Region, RuleKey4, RuleKey6, SEARCH_STEPS, SLOT_INDEX_MASK, SLOT_NONE, Segment,
};

#[map]
pub static ACTIVE: Array<u32> = Array::pinned(1, 0);

#[map]
pub static SRC4_0: LpmTrie<RuleKey4, u32> = LpmTrie::pinned(DEFAULT_PREFIXES, 0);
#[map]
pub static SRC4_1: LpmTrie<RuleKey4, u32> = LpmTrie::pinned(DEFAULT_PREFIXES, 0);
#[map]
pub static SRC6_0: LpmTrie<RuleKey6, u32> = LpmTrie::pinned(DEFAULT_PREFIXES, 0);
#[map]
pub static SRC6_1: LpmTrie<RuleKey6, u32> = LpmTrie::pinned(DEFAULT_PREFIXES, 0);
#[map]
pub static REGIONS_0: Array<Region> = Array::pinned(DEFAULT_REGIONS, 0);
#[map]
pub static REGIONS_1: Array<Region> = Array::pinned(DEFAULT_REGIONS, 0);
#[map]
pub static SEGMENTS_0: Array<Segment> = Array::pinned(DEFAULT_SEGMENTS, 0);
#[map]
pub static SEGMENTS_1: Array<Segment> = Array::pinned(DEFAULT_SEGMENTS, 0);
#[map]
pub static RULE_STATS_0: PerCpuArray<Counter> = PerCpuArray::pinned(DEFAULT_RULE_SLOTS, 0);
#[map]
pub static RULE_STATS_1: PerCpuArray<Counter> = PerCpuArray::pinned(DEFAULT_RULE_SLOTS, 0);

/// One generation's maps.
struct Generation {
    src4: &'static LpmTrie<RuleKey4, u32>,
    src6: &'static LpmTrie<RuleKey6, u32>,
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
                src4: &SRC4_0,
                src6: &SRC6_0,
                regions: &REGIONS_0,
                segments: &SEGMENTS_0,
                stats: &RULE_STATS_0,
            };
            $body
        } else {
            let $g = Generation {
                src4: &SRC4_1,
                src6: &SRC6_1,
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
/// whose other end is `addr`, in direction `dir`, in `generation`.
#[inline(always)]
pub fn lookup(
    generation: usize,
    dir: u8,
    family: u8,
    addr: &[u8; 16],
    pclass: usize,
    port: u16,
) -> Match {
    let slot = with_generation!(generation, |g| lookup_in(
        &g, dir, family, addr, pclass, port
    ));
    Match { slot, generation }
}

#[inline(always)]
fn lookup_in(
    g: &Generation,
    dir: u8,
    family: u8,
    addr: &[u8; 16],
    pclass: usize,
    port: u16,
) -> u32 {
    let region = if family == FAMILY_V4 {
        let mut data = [0u8; 5];
        data[0] = dir;
        data[1..].copy_from_slice(&addr[..4]);
        g.src4.get(&Key::new(8 + 32, data)).copied()
    } else {
        let mut data = [0u8; 17];
        data[0] = dir;
        data[1..].copy_from_slice(addr);
        g.src6.get(&Key::new(8 + 128, data)).copied()
    };
    match region {
        Some(region) => search(g, region, pclass, port),
        None => SLOT_NONE,
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
