//! The deny tries (`DENY_V4`, `DENY_V6`), the admin networks no ban applies
//! to (`DENY_EXEMPT_*`) and the per-set drop counters (`DENY_STATS`); see
//! `ebpf/src/deny.rs`. Entries are written one by one (an LPM trie has no
//! batch update); each write is whole, so a packet sees a prefix banned or
//! not, never half an entry.

use std::net::IpAddr;

use anyhow::Context as _;
use aya::{
    Ebpf,
    maps::{
        Array, Map, PerCpuArray,
        lpm_trie::{Key, LpmTrie},
    },
};
use ipnet::IpNet;
use portcullis_common::{Counter, DenyEntry, SETTING_NO_DENY, Settings, maps};

use super::{Dataplane, map_mut};

/// A trie write: the prefix, and its value (`None`: delete the key).
pub type DenyWrite = (IpNet, Option<DenyEntry>);

fn v4_key(n: &ipnet::Ipv4Net) -> Key<[u8; 4]> {
    Key::new(u32::from(n.prefix_len()), n.network().octets())
}

fn v6_key(n: &ipnet::Ipv6Net) -> Key<[u8; 16]> {
    Key::new(u32::from(n.prefix_len()), n.network().octets())
}

fn trie<K: aya::Pod, V: aya::Pod>(
    map: &mut Map,
) -> anyhow::Result<LpmTrie<&mut aya::maps::MapData, K, V>> {
    Ok(LpmTrie::try_from(map)?)
}

/// Whether a delete failed only because the key was not there.
fn absent(e: &aya::maps::MapError) -> bool {
    matches!(e, aya::maps::MapError::KeyNotFound)
        || matches!(e, aya::maps::MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::ENOENT))
}

/// Whether both deny tries are empty (so a generation written now may
/// carry `SETTING_NO_DENY`).
pub(super) fn tries_empty(ebpf: &mut Ebpf) -> anyhow::Result<bool> {
    let t4 = trie::<[u8; 4], DenyEntry>(map_mut(ebpf, maps::DENY_V4)?)?;
    if t4.keys().next().is_some() {
        return Ok(false);
    }
    let t6 = trie::<[u8; 16], DenyEntry>(map_mut(ebpf, maps::DENY_V6)?)?;
    Ok(t6.keys().next().is_none())
}

/// Clears `SETTING_NO_DENY` in both generations' settings: from now on the
/// ingress path asks the deny tries (before an entry is added to them).
fn deny_lookups_on(ebpf: &mut Ebpf) -> anyhow::Result<()> {
    let mut settings: Array<_, Settings> = Array::try_from(map_mut(ebpf, maps::SETTINGS)?)?;
    for g in 0..2u32 {
        let mut s = settings.get(&g, 0).context("reading SETTINGS")?;
        if s.flags & SETTING_NO_DENY != 0 {
            s.flags &= !SETTING_NO_DENY;
            settings.set(g, &s, 0).context("writing SETTINGS")?;
        }
    }
    Ok(())
}

impl Dataplane {
    /// Writes (or deletes) deny-trie entries, in order; before the first
    /// entry it adds, the ingress path is told to ask the tries.
    pub fn deny_write(&mut self, writes: &[DenyWrite]) -> anyhow::Result<()> {
        if writes.iter().any(|(_, value)| value.is_some()) {
            deny_lookups_on(&mut self.ebpf)?;
        }
        for (prefix, value) in writes {
            let result = match prefix {
                IpNet::V4(n) => {
                    let mut t =
                        trie::<[u8; 4], DenyEntry>(map_mut(&mut self.ebpf, maps::DENY_V4)?)?;
                    match value {
                        Some(v) => t.insert(&v4_key(n), v, 0),
                        None => t
                            .remove(&v4_key(n))
                            .or_else(|e| if absent(&e) { Ok(()) } else { Err(e) }),
                    }
                }
                IpNet::V6(n) => {
                    let mut t =
                        trie::<[u8; 16], DenyEntry>(map_mut(&mut self.ebpf, maps::DENY_V6)?)?;
                    match value {
                        Some(v) => t.insert(&v6_key(n), v, 0),
                        None => t
                            .remove(&v6_key(n))
                            .or_else(|e| if absent(&e) { Ok(()) } else { Err(e) }),
                    }
                }
            };
            result.with_context(|| {
                format!("writing deny entry {prefix} (is the deny trie full? see [capacity])")
            })?;
        }
        Ok(())
    }

    /// Every prefix the deny tries hold (to reconcile them with the saved
    /// sets at start).
    pub fn deny_keys(&mut self) -> anyhow::Result<Vec<IpNet>> {
        let mut out = Vec::new();
        let t = trie::<[u8; 4], DenyEntry>(map_mut(&mut self.ebpf, maps::DENY_V4)?)?;
        for k in t.keys().filter_map(Result::ok) {
            if let Ok(n) = ipnet::Ipv4Net::new(k.data().into(), k.prefix_len() as u8) {
                out.push(IpNet::V4(n));
            }
        }
        let t = trie::<[u8; 16], DenyEntry>(map_mut(&mut self.ebpf, maps::DENY_V6)?)?;
        for k in t.keys().filter_map(Result::ok) {
            if let Ok(n) = ipnet::Ipv6Net::new(k.data().into(), k.prefix_len() as u8) {
                out.push(IpNet::V6(n));
            }
        }
        Ok(out)
    }

    /// Makes `admin` the networks no ban applies to: added first, then the
    /// others removed, so an admin network in both the old and the new list
    /// is never banned in between.
    pub fn deny_exempt(&mut self, admin: &[IpNet]) -> anyhow::Result<()> {
        let mut t4 = trie::<[u8; 4], u32>(map_mut(&mut self.ebpf, maps::DENY_EXEMPT_V4)?)?;
        let old4: Vec<Key<[u8; 4]>> = t4.keys().filter_map(Result::ok).collect();
        let new4: Vec<Key<[u8; 4]>> = admin
            .iter()
            .filter_map(|n| match n {
                IpNet::V4(n) => Some(v4_key(&n.trunc())),
                IpNet::V6(_) => None,
            })
            .collect();
        for k in &new4 {
            t4.insert(k, &0, 0).context("writing DENY_EXEMPT_V4")?;
        }
        for k in &old4 {
            if !new4
                .iter()
                .any(|n| n.prefix_len() == k.prefix_len() && n.data() == k.data())
            {
                let _ = t4.remove(k);
            }
        }
        let mut t6 = trie::<[u8; 16], u32>(map_mut(&mut self.ebpf, maps::DENY_EXEMPT_V6)?)?;
        let old6: Vec<Key<[u8; 16]>> = t6.keys().filter_map(Result::ok).collect();
        let new6: Vec<Key<[u8; 16]>> = admin
            .iter()
            .filter_map(|n| match n {
                IpNet::V6(n) => Some(v6_key(&n.trunc())),
                IpNet::V4(_) => None,
            })
            .collect();
        for k in &new6 {
            t6.insert(k, &0, 0).context("writing DENY_EXEMPT_V6")?;
        }
        for k in &old6 {
            if !new6
                .iter()
                .any(|n| n.prefix_len() == k.prefix_len() && n.data() == k.data())
            {
                let _ = t6.remove(k);
            }
        }
        Ok(())
    }

    /// What each deny set dropped, by set id (summed over CPUs).
    pub fn deny_stats(&mut self, ids: &[u32]) -> anyhow::Result<Vec<(u32, Counter)>> {
        let stats: PerCpuArray<_, Counter> =
            PerCpuArray::try_from(map_mut(&mut self.ebpf, maps::DENY_STATS)?)?;
        ids.iter()
            .map(|id| {
                let per_cpu = stats.get(id, 0)?;
                let c = per_cpu.iter().fold(Counter::default(), |a, c| Counter {
                    packets: a.packets + c.packets,
                    bytes: a.bytes + c.bytes,
                });
                Ok((*id, c))
            })
            .collect()
    }

    /// Clears set `id`'s drop counter (a new set reusing the id).
    pub fn deny_stats_clear(&mut self, id: u32) -> anyhow::Result<()> {
        let mut stats: PerCpuArray<_, Counter> =
            PerCpuArray::try_from(map_mut(&mut self.ebpf, maps::DENY_STATS)?)?;
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        let zero =
            aya::maps::PerCpuValues::try_from(vec![Counter::default(); cpus.get() as usize])?;
        stats.set(id, zero, 0)?;
        Ok(())
    }
}

/// `CLOCK_BOOTTIME` now, in ns: the clock of `bpf_ktime_get_boot_ns`, which
/// the data path compares entry expiries with.
pub fn boottime_ns() -> u64 {
    // CLOCK_BOOTTIME cannot fail on Linux; 0 would only make bans expire late.
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME).map_or(0, |t| {
        t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
    })
}

/// Whether `ip` is inside `net` (both as the data path sees them).
pub fn covers(net: &IpNet, ip: IpAddr) -> bool {
    net.contains(&ip.to_canonical())
}
