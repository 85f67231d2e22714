//! FQDN egress rules: destinations the daemon's DNS forwarder learned from
//! answers to names an FQDN rule allows, written before the answer reached
//! the client (`daemon/src/forwarder.rs`), and the DNS guard that keeps
//! other resolvers out of reach while such rules exist.
//!
//! | map         | type | key | value |
//! |-------------|------|-----|-------|
//! | `FQDN_DEST` | hash, `FQDN_ENTRIES` | `FqdnKey` (address, port or 0, protocol class) | `FqdnEntry` (expiry, rule slot) |
//! | `DNS_UPSTREAM` | hash, 16 | `FqdnKey` (an upstream's address, port, protocol class) | 1 |
//! | `FQDN_KEY`  | per-CPU array, 1 | 0 | the key being looked up (off the stack) |
//!
//! A plain hash, not an LRU: nothing the data path does evicts an entry;
//! the daemon sweeps expired ones. An entry past its expiry admits nothing.

use aya_ebpf::{
    helpers::bpf_ktime_get_boot_ns,
    macros::map,
    maps::{HashMap, PerCpuArray},
};
use portcullis_common::{
    DNS_MARK, DNS_MAX_UPSTREAMS, DNS_PORT, DNS_TLS_PORT, FQDN_ENTRIES, FqdnEntry, FqdnKey,
    IPPROTO_TCP, IPPROTO_UDP, PCLASS_TCP, PCLASS_UDP,
};

use crate::parse::Ip;

#[map]
pub static FQDN_DEST: HashMap<FqdnKey, FqdnEntry> = HashMap::pinned(FQDN_ENTRIES, 0);

/// The forwarder's upstreams (address, port, protocol class): where a
/// marked packet may go by its mark.
#[map]
static DNS_UPSTREAM: HashMap<FqdnKey, u8> = HashMap::pinned(2 * DNS_MAX_UPSTREAMS, 0);

/// Per CPU: the key being looked up (the egress stack is near its limit).
#[map]
static FQDN_KEY: PerCpuArray<FqdnKey> = PerCpuArray::pinned(1, 0);

/// Per CPU: the packet's mark, copied through memory (see `by_name`).
#[map]
static FQDN_MARK: PerCpuArray<u32> = PerCpuArray::pinned(1, 0);

#[inline(always)]
fn live(key: &FqdnKey) -> bool {
    // SAFETY: a hash map lookup; the value is read at once.
    match unsafe { FQDN_DEST.get(key) } {
        // SAFETY: the helper takes no arguments and reads a clock.
        Some(e) => e.expires_ns > unsafe { bpf_ktime_get_boot_ns() },
        None => false,
    }
}

/// Under the DNS guard, for a new TCP or UDP flow: a packet with the
/// forwarder's mark (its socket's) to one of the forwarder's upstreams
/// (`DNS_UPSTREAM`: address, port, protocol class) is admitted; any other
/// to port 53 or 853 is not; anything else only to a live learned
/// destination: its address, protocol class and port, or any port.
///
/// Asked early in the allowlist (after the connection table, before the
/// replies and the rules), where few verifier paths reach: asked after the
/// rules, it pushed the egress program past the verifier's budget, and as
/// a BPF-to-BPF call anywhere too. It copies the packet's facts (and its
/// mark) into per-CPU maps and branches only on what it reads back, so its
/// branches teach the verifier nothing about the packet (whose decision it
/// would otherwise explore once per outcome here) and keep the egress
/// program's frame within the 512 bytes kernels before 6.9 allow.
#[inline(always)]
pub fn by_name(ip: &Ip) -> bool {
    let (Some(key), Some(mark)) = (FQDN_KEY.get_ptr_mut(0), FQDN_MARK.get_ptr_mut(0)) else {
        return false;
    };
    // SAFETY: both from successful lookups in per-CPU maps: this CPU's
    // values, valid while we run, used by this CPU only; the volatile
    // accesses are to them.
    let (key, proto, port, mark) = unsafe {
        core::ptr::write_volatile(mark, ip.mark);
        let mark = core::ptr::read_volatile(mark);
        let key = &mut *key;
        key.addr = ip.dst;
        key.family = ip.family;
        core::ptr::write_volatile(&mut key.pclass, ip.proto);
        core::ptr::write_volatile(&mut key.port, ip.dport);
        let proto = core::ptr::read_volatile(&key.pclass);
        let port = core::ptr::read_volatile(&key.port);
        (key, proto, port, mark)
    };
    let pclass = match proto {
        IPPROTO_TCP => PCLASS_TCP,
        IPPROTO_UDP => PCLASS_UDP,
        _ => return false,
    };
    key.pclass = pclass as u8;
    // SAFETY: a hash map lookup; only whether it found an entry is read.
    if mark == DNS_MARK && unsafe { DNS_UPSTREAM.get(key) }.is_some() {
        return true;
    }
    if port == DNS_PORT || port == DNS_TLS_PORT {
        return false;
    }
    if live(key) {
        return true;
    }
    key.port = 0;
    live(key)
}
