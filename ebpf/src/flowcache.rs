//! The established-flow caches (`FLOW_CACHE4`/`FLOW_CACHE6`): per CPU,
//! direct-mapped copies of connection-table entries that inbound packets
//! keep finding, so a reply of an established flow costs an array read and
//! a key compare instead of an LRU hash lookup (the stage's largest cost:
//! `floor_lru16_hit` against `floor_array` in the benchmark's floor rows).
//!
//! Why a cached slot never admits what the table would refuse:
//! - A slot is written only after a table hit whose state an inbound packet
//!   cannot change (TCP established; another protocol replied), so the
//!   table path would have changed nothing but the refresh of
//!   `last_seen_ns`.
//! - It admits until `last_seen_ns + FLOW_REFRESH_NS`: the moment the table
//!   path would refresh the flow. From then on, packets take the table path
//!   again, which refreshes the flow and writes the slot anew, so the
//!   table's `last_seen_ns` moves as it did without the cache.
//! - This host's own packets change a flow only towards states whose
//!   timeouts (10 s and more) outlast that second, and no timeout is
//!   shorter, so age never removes a flow a slot still admits.
//! - The daemon zeroes both caches after it removes entries (a lockdown,
//!   a deny set, the DNS guard), twice, a moment apart, so a program that
//!   found the flow just before the removal cannot leave a slot behind.
//! - LRU eviction under a full table is the one removal nothing reports:
//!   a slot admits its flow for at most a second more.
//!
//! Per CPU, so a slot has one writer: the ingress program on that CPU,
//! which runs with bottom halves off and does not nest. The check word
//! (the key's hash xor the expiry) refuses a slot the daemon's zeroing tore.

use aya_ebpf::{macros::map, maps::PerCpuArray};
use portcullis_common::{
    CachedFlow, CachedFlow4, CachedFlow6, FLOW_CACHE_SLOTS, FLOW_REFRESH_NS, Flow, FlowKey,
    FlowKey4, flow_cache_hash,
};

/// `FLOW_CACHE_SLOTS` a CPU of `CachedFlow4`: IPv4 flows this host opened
/// that inbound packets found established. Written by ingress; zeroed by
/// the daemon.
#[map]
pub static FLOW_CACHE4: PerCpuArray<CachedFlow4> = PerCpuArray::pinned(FLOW_CACHE_SLOTS, 0);

/// `FLOW_CACHE_SLOTS` a CPU of `CachedFlow6`: the IPv6 ones.
#[map]
pub static FLOW_CACHE6: PerCpuArray<CachedFlow6> = PerCpuArray::pinned(FLOW_CACHE_SLOTS, 0);

/// What the connection tables ask of a key's place in its cache.
pub trait Slot {
    /// Whether the slot holds this flow, admitted at `now`.
    fn admits(&self, now: u64) -> bool;
    /// Records that `flow` (in a state an inbound packet leaves as it is)
    /// admits its inbound packets until the table path would refresh it.
    fn store(&self, flow: &Flow);
}

/// A key's place in its family's cache: its words, their hash and this
/// CPU's slot for them.
pub struct Place<const N: usize> {
    words: [u64; N],
    hash: u64,
    slot: Option<*mut CachedFlow<N>>,
}

impl<const N: usize> Place<N> {
    /// The place of the key `words`, in the cache `slot` reads.
    #[inline(always)]
    fn new(words: [u64; N], slot: impl FnOnce(u32) -> Option<*mut CachedFlow<N>>) -> Self {
        let hash = flow_cache_hash(&words);
        Self {
            words,
            hash,
            slot: slot(hash as u32 & (FLOW_CACHE_SLOTS - 1)),
        }
    }
}

impl<const N: usize> Slot for Place<N> {
    #[inline(always)]
    fn admits(&self, now: u64) -> bool {
        let Some(slot) = self.slot else {
            return false;
        };
        // SAFETY: pointer from a successful per-CPU array lookup, valid for
        // the program's run; only this CPU's program writes it.
        let slot = unsafe { &*slot };
        now <= slot.until_ns && slot.key == self.words && slot.check == self.hash ^ slot.until_ns
    }

    #[inline(always)]
    fn store(&self, flow: &Flow) {
        if crate::explain::on() {
            return;
        }
        let Some(slot) = self.slot else {
            return;
        };
        let until_ns = flow.last_seen_ns.saturating_add(FLOW_REFRESH_NS);
        // SAFETY: as in `admits`; this CPU's program is the slot's only
        // writer while it runs.
        unsafe {
            *slot = CachedFlow {
                key: self.words,
                until_ns,
                check: self.hash ^ until_ns,
            };
        }
    }
}

/// The place of an IPv4 key.
#[inline(always)]
pub fn place4(key: &FlowKey4) -> Place<2> {
    // SAFETY: `FlowKey4` is 16 bytes, aligned to 8, every byte a field
    // (no implicit padding): its words are plain integers.
    let words: [u64; 2] = unsafe { core::mem::transmute(*key) };
    Place::new(words, |i| FLOW_CACHE4.get_ptr_mut(i))
}

/// The place of an IPv6 key.
#[inline(always)]
pub fn place6(key: &FlowKey) -> Place<5> {
    // SAFETY: as in `place4`: 40 bytes, aligned to 8, no implicit padding.
    let words: [u64; 5] = unsafe { core::mem::transmute(*key) };
    Place::new(words, |i| FLOW_CACHE6.get_ptr_mut(i))
}
