//! Deny sets: sources banned from opening anything on this host. Checked on
//! new inbound traffic only (after the connection table, before pings, the
//! rules, peers and the SSH exemption), so a reply to a flow this host
//! opened still arrives; the daemon cuts a banned source's open flows when
//! it adds the ban. The admin networks (`DENY_EXEMPT_*`) are never banned.
//!
//! | map              | type          | key                 | value |
//! |------------------|---------------|---------------------|-------|
//! | `DENY_V4`        | LPM trie (no prealloc), `deny_v4_prefixes` | IPv4 prefix | `DenyEntry` (set id, expiry) |
//! | `DENY_V6`        | LPM trie (no prealloc), `deny_v6_prefixes` | IPv6 prefix | `DenyEntry` (set id, expiry) |
//! | `DENY_EXEMPT_V4` | LPM trie, 1024 | IPv4 prefix of an admin network | 0 |
//! | `DENY_EXEMPT_V6` | LPM trie, 1024 | IPv6 prefix of an admin network | 0 |
//! | `DENY_STATS`     | per-CPU array, `DENY_SETS_MAX` | set id | `Counter`: what the set dropped |
//!
//! All written by the daemon (`dataplane/deny.rs`), read here; pinned, so
//! bans stay in force while the daemon restarts.

use aya_ebpf::{
    helpers::bpf_ktime_get_boot_ns,
    macros::map,
    maps::{LpmTrie, PerCpuArray, lpm_trie::Key},
};
use portcullis_common::{
    Counter, DEFAULT_DENY_PREFIXES, DENY_SETS_MAX, DenyEntry, FAMILY_V6, SETTING_NO_DENY,
};

use crate::parse::Ip;

/// Admin networks: a handful (the `[ssh] sources` and a lockdown's `--admin`).
const EXEMPT_ENTRIES: u32 = 1024;

#[map]
pub static DENY_V4: LpmTrie<[u8; 4], DenyEntry> = LpmTrie::pinned(DEFAULT_DENY_PREFIXES, 0);
#[map]
pub static DENY_V6: LpmTrie<[u8; 16], DenyEntry> = LpmTrie::pinned(DEFAULT_DENY_PREFIXES, 0);
#[map]
pub static DENY_EXEMPT_V4: LpmTrie<[u8; 4], u32> = LpmTrie::pinned(EXEMPT_ENTRIES, 0);
#[map]
pub static DENY_EXEMPT_V6: LpmTrie<[u8; 16], u32> = LpmTrie::pinned(EXEMPT_ENTRIES, 0);
#[map]
pub static DENY_STATS: PerCpuArray<Counter> = PerCpuArray::pinned(DENY_SETS_MAX, 0);

/// Whether `ip.src` is banned (an unexpired entry of a deny set covers it
/// and no admin network does); counts the drop against the set. The tries
/// are not asked while `flags` (the generation's settings) says they are
/// empty (`SETTING_NO_DENY`).
#[inline(always)]
pub fn denied(ip: &Ip, flags: u32, bytes: u64) -> bool {
    // The skip joins the lookup's miss (one state for the verifier).
    let entry = if flags & SETTING_NO_DENY != 0 {
        None
    } else if ip.family == FAMILY_V6 {
        DENY_V6.get(&Key::new(128, ip.src))
    } else {
        let [a, b, c, d, ..] = ip.src;
        DENY_V4.get(&Key::new(32, [a, b, c, d]))
    };
    let Some(entry) = entry else {
        return false;
    };
    // SAFETY: a helper without arguments or side effects.
    if entry.expires_ns != 0 && entry.expires_ns <= unsafe { bpf_ktime_get_boot_ns() } {
        return false;
    }
    let set = entry.set;
    if exempt(ip) {
        return false;
    }
    if crate::explain::on() {
        crate::explain::deny_set(set);
        return true;
    }
    if let Some(c) = DENY_STATS.get_ptr_mut(set) {
        // SAFETY: from a successful lookup in a per-CPU map: valid, and only
        // this CPU writes it while we run.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
    true
}

/// For a drop event (after the budget, so at most a few hundred a second):
/// the id + 1 of the deny set whose entry covers `ip.src` (0: none now).
#[inline(always)]
pub fn set_of(ip: &Ip) -> u32 {
    let entry = if ip.family == FAMILY_V6 {
        DENY_V6.get(&Key::new(128, ip.src))
    } else {
        let [a, b, c, d, ..] = ip.src;
        DENY_V4.get(&Key::new(32, [a, b, c, d]))
    };
    entry.map_or(0, |e| e.set.wrapping_add(1))
}

/// Whether `ip.src` is in an admin network (never banned, never limited).
#[inline(always)]
pub fn exempt(ip: &Ip) -> bool {
    if ip.family == FAMILY_V6 {
        DENY_EXEMPT_V6.get(&Key::new(128, ip.src)).is_some()
    } else {
        let [a, b, c, d, ..] = ip.src;
        DENY_EXEMPT_V4.get(&Key::new(32, [a, b, c, d])).is_some()
    }
}
