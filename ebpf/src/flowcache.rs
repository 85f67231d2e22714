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
//! - A SYN (with or without ACK) and fragments never take the cache: a
//!   SYN-ACK may answer this host's new connection on the tuple of a cached
//!   one, and only the table moves that connection to established.
//! - The daemon moves the epoch (`FLOW_CACHE_EPOCH`) on after it removes
//!   entries (a lockdown, a deny set, the DNS guard, a cut inbound flow).
//!   A slot holds the epoch its program read *before* its table lookup, so
//!   a program that found a flow just before its removal writes a slot of
//!   the old epoch, which no packet matches.
//! - LRU eviction under a full table, and a flow this host opens again on
//!   the tuple of an evicted one, are what nothing reports: a slot admits
//!   that flow for at most a second more (and a reopened UDP flow is marked
//!   replied by the first reply after that second, not the first).
//!
//! Per CPU, so a slot has one writer: the ingress program on that CPU,
//! which runs with bottom halves off and does not nest. The check word
//! (the key's hash xor the expiry xor the epoch) refuses a torn slot.

use aya_ebpf::{
    macros::map,
    maps::{Array, PerCpuArray},
};
use portcullis_common::{
    CachedFlow, CachedFlow4, CachedFlow6, FLOW_CACHE_SLOTS, FLOW_REFRESH_NS, Flow, FlowKey,
    FlowKey4, flow_cache_hash,
};

/// `FLOW_CACHE_SLOTS` a CPU of `CachedFlow4`: IPv4 flows this host opened
/// that inbound packets found established. Written by ingress.
#[map]
pub static FLOW_CACHE4: PerCpuArray<CachedFlow4> = PerCpuArray::pinned(FLOW_CACHE_SLOTS, 0);

/// `FLOW_CACHE_SLOTS` a CPU of `CachedFlow6`: the IPv6 ones.
#[map]
pub static FLOW_CACHE6: PerCpuArray<CachedFlow6> = PerCpuArray::pinned(FLOW_CACHE_SLOTS, 0);

/// One `u64`: the caches' epoch. Only slots of the current epoch admit;
/// the daemon moves it on after every removal from the connection tables.
#[map]
pub static FLOW_CACHE_EPOCH: Array<u64> = Array::pinned(1, 0);

/// The caches' epoch now.
#[inline(always)]
pub fn epoch() -> u64 {
    FLOW_CACHE_EPOCH.get(0).copied().unwrap_or(0)
}

/// What the connection tables ask of a key's place in its cache.
pub trait Slot {
    /// Whether the slot holds this flow, admitted at `now` in `epoch`.
    fn admits(&self, now: u64, epoch: u64) -> bool;
    /// Records that `flow` (in a state an inbound packet leaves as it is)
    /// admits its inbound packets until the table path would refresh it,
    /// in `epoch` (read before the table lookup that found `flow`).
    fn store(&self, flow: &Flow, epoch: u64);
}

/// A key's place in its family's cache: the key as words, their hash and
/// this CPU's slot for them.
pub struct Place<'k, const N: usize> {
    words: &'k [u64; N],
    hash: u64,
    slot: Option<*mut CachedFlow<N>>,
}

impl<'k, const N: usize> Place<'k, N> {
    /// The place of the key `words`, in the cache `slot` reads.
    #[inline(always)]
    fn new(words: &'k [u64; N], slot: impl FnOnce(u32) -> Option<*mut CachedFlow<N>>) -> Self {
        let hash = flow_cache_hash(words);
        Self {
            words,
            hash,
            slot: slot(hash as u32 & (FLOW_CACHE_SLOTS - 1)),
        }
    }
}

impl<const N: usize> Slot for Place<'_, N> {
    // Word by word, never a whole-array compare or copy: those become the
    // byte loops of `memcmp`/`memmove` in a BPF program.
    #[inline(always)]
    fn admits(&self, now: u64, epoch: u64) -> bool {
        let Some(slot) = self.slot else {
            return false;
        };
        // SAFETY: pointer from a successful per-CPU array lookup, valid for
        // the program's run; only this CPU's program writes it.
        let slot = unsafe { &*slot };
        let mut differ = slot.check ^ self.hash ^ slot.until_ns ^ epoch;
        let mut i = 0;
        while i < N {
            differ |= slot.key[i] ^ self.words[i];
            i += 1;
        }
        differ == 0 && now <= slot.until_ns
    }

    #[inline(always)]
    fn store(&self, flow: &Flow, epoch: u64) {
        if crate::explain::on() {
            return;
        }
        let Some(slot) = self.slot else {
            return;
        };
        let until_ns = flow.last_seen_ns.saturating_add(FLOW_REFRESH_NS);
        // SAFETY: as in `admits`; this CPU's program is the slot's only
        // writer while it runs. Volatile, so the words stay word stores.
        unsafe {
            let mut i = 0;
            while i < N {
                core::ptr::write_volatile(&raw mut (*slot).key[i], self.words[i]);
                i += 1;
            }
            core::ptr::write_volatile(&raw mut (*slot).until_ns, until_ns);
            core::ptr::write_volatile(&raw mut (*slot).check, self.hash ^ until_ns ^ epoch);
        }
    }
}

/// The place of an IPv4 key.
#[inline(always)]
pub fn place4(key: &FlowKey4) -> Place<'_, 2> {
    // SAFETY: `FlowKey4` is 16 bytes, aligned to 8, every byte a field
    // (no implicit padding): it reads as two initialised words.
    let words = unsafe { &*(key as *const FlowKey4).cast::<[u64; 2]>() };
    Place::new(words, |i| FLOW_CACHE4.get_ptr_mut(i))
}

/// The place of an IPv6 key.
#[inline(always)]
pub fn place6(key: &FlowKey) -> Place<'_, 5> {
    // SAFETY: as in `place4`: 40 bytes, aligned to 8, no implicit padding.
    let words = unsafe { &*(key as *const FlowKey).cast::<[u64; 5]>() };
    Place::new(words, |i| FLOW_CACHE6.get_ptr_mut(i))
}
