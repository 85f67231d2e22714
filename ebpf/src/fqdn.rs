//! FQDN egress rules: destinations the daemon's DNS forwarder learned from
//! answers to names an FQDN rule allows, written before the answer reached
//! the client (`daemon/src/forwarder.rs`), and the DNS guard that keeps
//! other resolvers out of reach while such rules exist.
//!
//! | map         | type | key | value |
//! |-------------|------|-----|-------|
//! | `FQDN_DEST` | hash, `FQDN_ENTRIES` | `FqdnKey` (address, port or 0, protocol class) | `FqdnEntry` (expiry, rule slot) |
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
    DNS_MARK, DNS_PORT, DNS_TLS_PORT, FQDN_ENTRIES, FqdnEntry, FqdnKey, IPPROTO_TCP, IPPROTO_UDP,
};

use crate::parse::Ip;

#[map]
pub static FQDN_DEST: HashMap<FqdnKey, FqdnEntry> = HashMap::pinned(FQDN_ENTRIES, 0);

/// Per CPU: the key being looked up (the egress stack is near its limit).
#[map]
static FQDN_KEY: PerCpuArray<FqdnKey> = PerCpuArray::pinned(1, 0);

/// Whether a live learned entry admits `ip`'s destination, protocol
/// class and port (or any port).
#[inline(always)]
pub fn admitted(ip: &Ip, pclass: usize, port: u16) -> bool {
    let Some(key) = FQDN_KEY.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: from a successful lookup in a per-CPU map: this CPU's value,
    // valid while we run, used by this CPU only.
    let key = unsafe { &mut *key };
    key.addr = ip.dst;
    key.family = ip.family;
    key.pclass = pclass as u8;
    key.port = port;
    if live(key) {
        return true;
    }
    key.port = 0;
    live(key)
}

#[inline(always)]
fn live(key: &FqdnKey) -> bool {
    // SAFETY: a hash map lookup; the value is read at once.
    match unsafe { FQDN_DEST.get(key) } {
        // SAFETY: the helper takes no arguments and reads a clock.
        Some(e) => e.expires_ns > unsafe { bpf_ktime_get_boot_ns() },
        None => false,
    }
}

/// Under the DNS guard: `Some(true)` for a DNS query (TCP or UDP to port
/// 53 or 853) the forwarder sent (its socket mark), `Some(false)` for one
/// anybody else sent, `None` for anything else.
#[inline(always)]
pub fn dns_query(ip: &Ip, mark: u32) -> Option<bool> {
    if !matches!(ip.proto, IPPROTO_TCP | IPPROTO_UDP) {
        return None;
    }
    if ip.dport != DNS_PORT && ip.dport != DNS_TLS_PORT {
        return None;
    }
    Some(mark == DNS_MARK)
}
