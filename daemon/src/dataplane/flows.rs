//! The connection table: seeding it with the connections open at start,
//! asking it about a flow, cutting flows, and its keys.

use anyhow::Context as _;
use aya::maps::{HashMap, MapData};
use portcullis_common::{
    FAMILY_V4, FAMILY_V6, FLOW_REPLIED, FLOW_TCP_ESTABLISHED, FLOW_TCP_SYN_SENT, Flow, FlowKey,
    FlowKey4, maps,
};

use super::{Dataplane, map_mut, maps_dir, sockets};
use crate::model::Connection;

impl Dataplane {
    /// Entries in the connection tables (both families), and the capacity
    /// of each (the configured number of connections per family).
    pub fn conntrack_usage(&mut self) -> anyhow::Result<(usize, u32)> {
        let v4: HashMap<_, FlowKey4, Flow> =
            HashMap::try_from(&*map_mut(&mut self.ebpf, maps::CONNTRACK4)?)?;
        let mut entries = v4.keys().filter(Result::is_ok).count();
        let v6: HashMap<_, FlowKey, Flow> =
            HashMap::try_from(&*map_mut(&mut self.ebpf, maps::CONNTRACK6)?)?;
        entries += v6.keys().filter(Result::is_ok).count();
        let capacity = MapData::from_pin(maps_dir(&self.pin_dir).join(maps::CONNTRACK4))
            .ok()
            .and_then(|m| m.info().ok())
            .map_or(0, |i| i.max_entries());
        Ok((entries, capacity))
    }

    /// Whether the connection table holds `key` (a flow that survives rule
    /// changes: opened by this host, or seeded at start).
    pub fn has_flow(&mut self, key: &FlowKey) -> bool {
        if key.family == FAMILY_V6 {
            let Ok(map) = map_mut(&mut self.ebpf, maps::CONNTRACK6) else {
                return false;
            };
            HashMap::<_, FlowKey, Flow>::try_from(map).is_ok_and(|t| t.get(key, 0).is_ok())
        } else {
            let Ok(map) = map_mut(&mut self.ebpf, maps::CONNTRACK4) else {
                return false;
            };
            HashMap::<_, FlowKey4, Flow>::try_from(map).is_ok_and(|t| t.get(&key.v4(), 0).is_ok())
        }
    }

    /// Removes every flow whose remote address `keep` refuses, so its next
    /// packet meets the policy again; returns how many were removed.
    pub fn cut_flows(&mut self, keep: impl Fn(std::net::IpAddr) -> bool) -> anyhow::Result<usize> {
        self.cut_connections(|k| !keep(flow_remote(k)))
    }

    /// Removes the connection-table flows `pick` selects (IPv4 keys
    /// widened to `FlowKey`); returns how many.
    pub(super) fn cut_connections(
        &mut self,
        pick: impl Fn(&FlowKey) -> bool,
    ) -> anyhow::Result<usize> {
        let v4: HashMap<_, FlowKey4, Flow> =
            HashMap::try_from(&*map_mut(&mut self.ebpf, maps::CONNTRACK4)?)?;
        let doomed4: Vec<FlowKey4> = v4
            .keys()
            .filter_map(Result::ok)
            .filter(|k| pick(&k.widen()))
            .collect();
        let v6: HashMap<_, FlowKey, Flow> =
            HashMap::try_from(&*map_mut(&mut self.ebpf, maps::CONNTRACK6)?)?;
        let doomed6: Vec<FlowKey> = v6.keys().filter_map(Result::ok).filter(&pick).collect();
        self.remove_connections(&doomed4, &doomed6)?;
        Ok(doomed4.len() + doomed6.len())
    }

    /// Removes `keys4` and `keys6` from the connection tables (a key gone
    /// already, aged out or evicted, is nothing left to cut) and, if there
    /// were any, retires the flow caches' slots: every removal from the
    /// tables goes through here.
    fn remove_connections(&mut self, keys4: &[FlowKey4], keys6: &[FlowKey]) -> anyhow::Result<()> {
        let mut c4: HashMap<_, FlowKey4, Flow> =
            HashMap::try_from(map_mut(&mut self.ebpf, maps::CONNTRACK4)?)?;
        for key in keys4 {
            let _ = c4.remove(key);
        }
        let mut c6: HashMap<_, FlowKey, Flow> =
            HashMap::try_from(map_mut(&mut self.ebpf, maps::CONNTRACK6)?)?;
        for key in keys6 {
            let _ = c6.remove(key);
        }
        if !keys4.is_empty() || !keys6.is_empty() {
            self.forget_cached_flows();
        }
        Ok(())
    }

    /// Retires every slot of the established-flow caches
    /// (`ebpf/src/flowcache.rs`), which would otherwise admit a removed
    /// flow's replies for up to a second: moves their epoch on. Called
    /// after every removal from the connection tables
    /// (`remove_connections`), and by tests that empty them. A failure is logged,
    /// not returned: the flows are gone from the tables already, and the
    /// slots expire within a second.
    pub fn forget_cached_flows(&mut self) {
        let result = (|| {
            let mut epoch: aya::maps::Array<_, u64> =
                aya::maps::Array::try_from(map_mut(&mut self.ebpf, maps::FLOW_CACHE_EPOCH)?)?;
            let now = epoch.get(&0, 0)?;
            epoch.set(0, &now.wrapping_add(1), 0)?;
            anyhow::Ok(())
        })();
        if let Err(e) = result {
            tracing::warn!(
                "could not retire the flow caches ({}): removed flows' replies pass for up to a second more: {e:#}",
                maps::FLOW_CACHE_EPOCH
            );
        }
    }

    /// Removes the inbound flows (`INBOUND4`/`INBOUND6`) that `cut` picks,
    /// and the connection-table entry of the same flow (a connection
    /// seeded at start); returns how many inbound flows went.
    pub fn cut_inbound(&mut self, cut: impl Fn(&FlowKey) -> bool) -> anyhow::Result<usize> {
        let [in4, in6] = maps::INBOUND;
        let mut v4: HashMap<_, FlowKey4, Flow> = HashMap::try_from(map_mut(&mut self.ebpf, in4)?)?;
        let doomed4: Vec<FlowKey4> = v4
            .keys()
            .filter_map(Result::ok)
            .filter(|k| cut(&k.widen()))
            .collect();
        for key in &doomed4 {
            // Gone already (aged out, evicted): nothing left to cut.
            let _ = v4.remove(key);
        }
        let mut v6: HashMap<_, FlowKey, Flow> = HashMap::try_from(map_mut(&mut self.ebpf, in6)?)?;
        let doomed6: Vec<FlowKey> = v6
            .keys()
            .filter_map(Result::ok)
            .filter(|k| cut(k))
            .collect();
        for key in &doomed6 {
            let _ = v6.remove(key);
        }
        self.remove_connections(&doomed4, &doomed6)?;
        Ok(doomed4.len() + doomed6.len())
    }

    /// Adds connections that exist now to the connection table, so that
    /// enforcement does not cut them. Existing entries are left as they are.
    pub fn seed_connections(&mut self, connections: &[Connection]) -> anyhow::Result<usize> {
        // CLOCK_MONOTONIC cannot fail on Linux; 0 would only age seeded flows.
        let now = super::clock::monotonic_ns().unwrap_or(0);
        let mut added = 0;
        for c in connections {
            let key = flow_key(c);
            let state = match (c.proto, c.tcp_syn_sent) {
                (portcullis_common::IPPROTO_TCP, true) => FLOW_TCP_SYN_SENT,
                (portcullis_common::IPPROTO_TCP, false) => FLOW_TCP_ESTABLISHED,
                _ => FLOW_REPLIED,
            };
            let flow = Flow {
                last_seen_ns: now,
                state,
                _pad: [0; 7],
            };
            let new = if key.family == FAMILY_V6 {
                seed(map_mut(&mut self.ebpf, maps::CONNTRACK6)?, &key, &flow)
            } else {
                seed(map_mut(&mut self.ebpf, maps::CONNTRACK4)?, &key.v4(), &flow)
            }
            .with_context(|| format!("seeding the connection table with {c:?}"))?;
            added += usize::from(new);
        }
        Ok(added)
    }
}

/// Inserts `key` into the connection table `map` unless it is there;
/// whether it was added.
fn seed<K: aya::Pod>(map: &mut aya::maps::Map, key: &K, flow: &Flow) -> anyhow::Result<bool> {
    let mut table: HashMap<_, K, Flow> = HashMap::try_from(map)?;
    if table.get(key, 0).is_ok() {
        return Ok(false);
    }
    table.insert(key, flow, 0)?;
    Ok(true)
}

/// The remote address of a flow.
pub fn flow_remote(k: &FlowKey) -> std::net::IpAddr {
    let [a, b, c, d, ..] = k.remote;
    if k.family == FAMILY_V6 {
        k.remote.into()
    } else {
        [a, b, c, d].into()
    }
}

/// The kernel's open connections (netlink `sock_diag`, see [`sockets`]).
pub fn connections() -> anyhow::Result<Vec<Connection>> {
    sockets::connections()
}

/// The connection-table key of a socket (IPv4-mapped IPv6 sockets as IPv4).
pub fn flow_key(c: &Connection) -> FlowKey {
    fn octets(ip: std::net::IpAddr) -> (u8, [u8; 16]) {
        let ip = ip.to_canonical();
        match ip {
            std::net::IpAddr::V4(v4) => {
                let mut a = [0u8; 16];
                a[..4].copy_from_slice(&v4.octets());
                (FAMILY_V4, a)
            }
            std::net::IpAddr::V6(v6) => (FAMILY_V6, v6.octets()),
        }
    }
    let (family, local) = octets(c.local);
    let (_, remote) = octets(c.remote);
    FlowKey {
        local,
        remote,
        local_port: c.local_port,
        remote_port: c.remote_port,
        proto: c.proto,
        family,
        _pad: [0; 2],
    }
}
