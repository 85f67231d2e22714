//! Egress volume per destination: bytes and packets that passed egress, by
//! destination (address, IPv6 cut to its /64), port and protocol. Counted
//! only while the daemon asks for it (`SETTING_EGRESS_VOLUME`).
//!
//! | map                      | type | key | value |
//! |--------------------------|------|-----|-------|
//! | `EGRESS_VOLUME`          | per-CPU hash, `EGRESS_DESTINATIONS` | `VolumeKey` | `Counter` |
//! | `EGRESS_VOLUME_OVERFLOW` | per-CPU array, 1 | 0 | `Counter`: traffic that found the table full |
//! | `VOLUME_KEY`             | per-CPU array, 1 | 0 | the key being counted (off the stack) |
//!
//! A plain hash, not an LRU: a burst of new destinations cannot evict a
//! heavy one; what does not fit is counted in the overflow entry, which the
//! daemon reports. The daemon reads both, keeps the totals, and deletes
//! entries idle since its last read, so the table holds the destinations of
//! the last few seconds. Pinned like every map.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    macros::map,
    maps::{PerCpuArray, PerCpuHashMap},
};
use portcullis_common::{
    Counter, EGRESS_DESTINATIONS, FAMILY_V6, IPPROTO_TCP, IPPROTO_UDP, VolumeKey,
};

use crate::parse::Ip;

#[map]
pub static EGRESS_VOLUME: PerCpuHashMap<VolumeKey, Counter> =
    PerCpuHashMap::pinned(EGRESS_DESTINATIONS, 0);
#[map]
pub static EGRESS_VOLUME_OVERFLOW: PerCpuArray<Counter> = PerCpuArray::pinned(1, 0);

/// Per CPU: the key being counted. The egress program's stack is near the
/// 512-byte limit of kernels before 6.9 (which round each frame up); a key
/// in a map value costs it nothing.
#[map]
static VOLUME_KEY: PerCpuArray<VolumeKey> = PerCpuArray::pinned(1, 0);

/// Credits `bytes` and `segments` packets to the destination of `ip`.
#[inline(always)]
pub fn count(ip: &Ip, bytes: u64, segments: u64) {
    // The explain instance writes nothing (`explain.rs`).
    if crate::explain::on() {
        return;
    }
    let Some(key) = VOLUME_KEY.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: from a successful lookup in a per-CPU map: this CPU's value,
    // valid while we run, used by this CPU only.
    let key = unsafe { &mut *key };
    let d = ip.dst;
    key.addr = if ip.family == FAMILY_V6 {
        // The /64 (`VOLUME_V6_PREFIX`), element by element: no memset call
        // (a call is a second stack frame).
        [
            d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7], 0, 0, 0, 0, 0, 0, 0, 0,
        ]
    } else {
        d
    };
    key.port = if matches!(ip.proto, IPPROTO_TCP | IPPROTO_UDP) {
        ip.dport
    } else {
        0
    };
    key.proto = ip.proto;
    key.family = ip.family;
    let key: &VolumeKey = key;
    if add(key, bytes, segments) {
        return;
    }
    let new = Counter {
        packets: segments,
        bytes,
    };
    // Another CPU may have inserted it since: then add to that.
    if EGRESS_VOLUME.insert(key, &new, BPF_NOEXIST as u64).is_ok() || add(key, bytes, segments) {
        return;
    }
    if let Some(c) = EGRESS_VOLUME_OVERFLOW.get_ptr_mut(0) {
        // SAFETY: from a successful lookup in a per-CPU map: valid, and only
        // this CPU writes it while we run.
        unsafe {
            (*c).packets += segments;
            (*c).bytes += bytes;
        }
    }
}

#[inline(always)]
fn add(key: &VolumeKey, bytes: u64, segments: u64) -> bool {
    let Some(c) = EGRESS_VOLUME.get_ptr_mut(key) else {
        return false;
    };
    // SAFETY: from a successful lookup in a per-CPU map: this CPU's value,
    // valid while we run, written only by this CPU.
    unsafe {
        (*c).packets += segments;
        (*c).bytes += bytes;
    }
    true
}
