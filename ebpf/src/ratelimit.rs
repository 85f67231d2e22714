//! Rate limits on new inbound flows, per source, and the bans of sources
//! that exceed them. Only packets that would open a flow are counted: the
//! policy asks [`over_limit`] for a TCP SYN (without ACK), or a UDP
//! datagram, ICMP echo request or other packet of no tracked inbound flow,
//! once the rules admitted it and before it is recorded.
//!
//! | map              | type | key | value |
//! |------------------|------|-----|-------|
//! | `RATE_LIMITS_g`  | array, `[capacity] slots` | rule slot (0: the default) | `RateLimit` (interval, burst, ban, IPv6 prefix) |
//! | `RATE_BUCKETS`   | LRU hash, 65536 | `RateKey` (source, slot) | theoretical arrival time (`CLOCK_MONOTONIC` ns) |
//! | `RATE_BANS`      | LRU hash, 65536 | `RateKey` (source, slot 0) | banned until (`CLOCK_BOOTTIME` ns) |
//!
//! `RATE_LIMITS_g` is written by the daemon with each rule generation;
//! buckets and bans by this program (the daemon lists and lifts bans). A
//! source is an IPv4 address, or the IPv6 prefix (default /64) its address
//! is in. The algorithm is GCRA (see `portcullis_common::RateLimit`): one
//! u64 per source, no division here. The admin networks (`DENY_EXEMPT_*`)
//! are never limited nor banned.

use aya_ebpf::{
    helpers::bpf_ktime_get_boot_ns,
    macros::map,
    maps::{Array, LruHashMap, PerCpuArray},
};
use portcullis_common::{
    DEFAULT_RULE_SLOTS, FAMILY_V6, RATE_BANS_ENTRIES, RATE_BUCKETS_ENTRIES, RateKey, RateLimit,
    SLOT_INDEX_MASK,
};

use crate::{clock, deny, parse::Ip};

/// Written through a shared mapping, as the rule arrays (`rules.rs`).
const MMAPABLE: u32 = portcullis_common::BPF_F_MMAPABLE;

#[map]
pub static RATE_LIMITS_0: Array<RateLimit> = Array::pinned(DEFAULT_RULE_SLOTS, MMAPABLE);
#[map]
pub static RATE_LIMITS_1: Array<RateLimit> = Array::pinned(DEFAULT_RULE_SLOTS, MMAPABLE);
#[map]
pub static RATE_BUCKETS: LruHashMap<RateKey, u64> = LruHashMap::pinned(RATE_BUCKETS_ENTRIES, 0);
#[map]
pub static RATE_BANS: LruHashMap<RateKey, u64> = LruHashMap::pinned(RATE_BANS_ENTRIES, 0);

/// Per CPU: the key being looked up. The program's stack is near the
/// kernel's 512-byte limit; a key in a map value costs it nothing.
#[map]
static RATE_KEY: PerCpuArray<RateKey> = PerCpuArray::pinned(1, 0);

/// `RATE_LIMITS_g[index]`, or `None` (the program reads every entry in
/// place: none is copied onto the stack).
#[inline(always)]
fn limit(generation: usize, index: u32) -> Option<&'static RateLimit> {
    if generation == 0 {
        RATE_LIMITS_0.get(index)
    } else {
        RATE_LIMITS_1.get(index)
    }
}

/// The key of `ip.src`'s bucket for `slot`, written into this CPU's
/// `RATE_KEY`: IPv4 the address, IPv6 the address masked with `v6_mask`
/// (no branch per byte: the verifier walks this on every path).
#[inline(always)]
fn source_key(ip: &Ip, v6_mask: &[u8; 16], slot: u32) -> Option<&'static mut RateKey> {
    let key = RATE_KEY.get_ptr_mut(0)?;
    // SAFETY: pointer from a successful per-CPU lookup; only this CPU uses
    // it, and only while this packet runs.
    let key = unsafe { &mut *key };
    key.addr = ip.src;
    key.slot = slot;
    key.family = ip.family;
    key._pad = [0, 0, 0];
    if ip.family == FAMILY_V6 {
        let mut i = 0;
        while i < 16 {
            key.addr[i] &= v6_mask[i];
            i += 1;
        }
    }
    Some(key)
}

#[inline(always)]
fn boot_now() -> u64 {
    // SAFETY: a helper without arguments or side effects.
    unsafe { bpf_ktime_get_boot_ns() }
}

/// Whether `ip.src` is banned for having exceeded a limit (unexpired, not an
/// admin network). Checked in the deny stage, on all new inbound traffic;
/// only while the default limit bans (`ban_ns`), so removing `ban_seconds`
/// lifts every ban.
#[inline(always)]
pub fn banned(ip: &Ip, generation: usize) -> bool {
    let Some(l) = limit(generation, 0) else {
        return false;
    };
    if l.ban_ns == 0 {
        return false;
    }
    let Some(key) = source_key(ip, &l.v6_mask, 0) else {
        return false;
    };
    let Some(until) = RATE_BANS.get_ptr(key) else {
        return false;
    };
    // SAFETY: pointer from a successful lookup of a plain u64.
    if unsafe { *until } <= boot_now() {
        return false;
    }
    !deny::exempt(ip)
}

/// Whether a packet from `ip.src` admitted by `slot` that opens a flow
/// (`conntrack::track_ingress` asks) exceeds its limit: the
/// rule's own (`RATE_LIMITS_g[slot]`), else the default (entry 0). Within
/// the limit, the source's bucket is charged; over it, nothing is charged
/// and, when the default says so, the source is banned.
#[inline(always)]
pub fn over_limit(ip: &Ip, generation: usize, slot: u32) -> bool {
    let Some(default) = limit(generation, 0) else {
        return false;
    };
    let index = slot & SLOT_INDEX_MASK;
    let (l, bucket) = match limit(generation, index) {
        Some(own) if own.interval_ns != 0 => (own, index),
        _ => (default, 0),
    };
    if l.interval_ns == 0 || deny::exempt(ip) {
        return false;
    }
    let Some(key) = source_key(ip, &default.v6_mask, bucket) else {
        return false;
    };
    let now = clock::now();
    // The explain instance decides as the live one but charges and bans
    // nothing (`explain.rs`).
    let explain = crate::explain::on();
    let Some(tat) = RATE_BUCKETS.get_ptr_mut(key) else {
        // A new source: its first flow (burst is at least 1).
        if !explain {
            let _ = RATE_BUCKETS.insert(key, &(now + l.interval_ns), 0);
        }
        return false;
    };
    // SAFETY: pointer from a successful lookup of a plain u64; CPUs racing
    // on one source may each admit a flow the other charged: a bounded
    // excess, never a wrong drop of another source.
    let tat = unsafe { &mut *tat };
    let start = if *tat > now { *tat } else { now };
    let next = start + l.interval_ns;
    if next - now <= l.burst_ns {
        if !explain {
            *tat = next;
        }
        return false;
    }
    if default.ban_ns != 0 && !explain {
        key.slot = 0;
        let _ = RATE_BANS.insert(key, &(boot_now() + default.ban_ns), 0);
    }
    true
}
