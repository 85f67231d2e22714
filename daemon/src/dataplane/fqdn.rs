//! Destinations learned for FQDN egress rules (`FQDN_DEST`, see
//! `ebpf/src/fqdn.rs`): written by the DNS forwarder before it returns an
//! answer, walked to sweep expired entries and to drop those whose rule is
//! gone after a reload.

use anyhow::Context as _;
use aya::maps::HashMap;
use portcullis_common::{FqdnEntry, FqdnKey, maps};

use super::{Dataplane, map_mut};

impl Dataplane {
    /// Writes `entries`; an existing entry that lasts at least as long
    /// stays as it is (with its rule: a short answer for another rule's
    /// name does not cut it). Fails when the table is full.
    pub fn fqdn_write(&mut self, entries: &[(FqdnKey, FqdnEntry)]) -> anyhow::Result<()> {
        let mut table: HashMap<_, FqdnKey, FqdnEntry> =
            HashMap::try_from(map_mut(&mut self.ebpf, maps::FQDN_DEST)?)?;
        for (key, entry) in entries {
            if let Ok(old) = table.get(key, 0)
                && old.expires_ns >= entry.expires_ns
            {
                continue;
            }
            table
                .insert(key, entry, 0)
                .context("writing a learned destination (FQDN_DEST full?)")?;
        }
        Ok(())
    }

    /// Makes `keys` the forwarder's upstreams (`DNS_UPSTREAM`), the only
    /// destinations its mark admits.
    pub fn dns_upstreams_set(&mut self, keys: &[FqdnKey]) -> anyhow::Result<()> {
        let mut table: HashMap<_, FqdnKey, u8> =
            HashMap::try_from(map_mut(&mut self.ebpf, maps::DNS_UPSTREAM)?)?;
        let old: Vec<FqdnKey> = table.keys().filter_map(Result::ok).collect();
        for key in keys {
            table
                .insert(key, &1u8, 0)
                .context("writing the forwarder's upstreams (DNS_UPSTREAM)")?;
        }
        for key in old.iter().filter(|k| !keys.contains(k)) {
            match table.remove(key) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(e).context("deleting a former upstream"),
            }
        }
        Ok(())
    }

    /// Removes the connection-table flows to port 53 or 853 that `keep`
    /// (remote address, port) refuses: DNS flows opened before the DNS
    /// guard turned on then meet it. Returns how many went.
    pub fn cut_dns_flows(
        &mut self,
        keep: impl Fn(std::net::IpAddr, u16) -> bool,
    ) -> anyhow::Result<usize> {
        use portcullis_common::{DNS_PORT, DNS_TLS_PORT};
        let dns = |port: u16| port == DNS_PORT || port == DNS_TLS_PORT;
        self.cut_connections(|k| dns(k.remote_port) && !keep(super::flow_remote(k), k.remote_port))
    }

    /// Every learned destination.
    pub fn fqdn_entries(&mut self) -> anyhow::Result<Vec<(FqdnKey, FqdnEntry)>> {
        let table: HashMap<_, FqdnKey, FqdnEntry> =
            HashMap::try_from(map_mut(&mut self.ebpf, maps::FQDN_DEST)?)?;
        // An entry deleted while we walk is simply not there.
        Ok(table.iter().filter_map(Result::ok).collect())
    }

    /// Deletes the entries of `keys`.
    pub fn fqdn_forget(&mut self, keys: &[FqdnKey]) -> anyhow::Result<()> {
        let mut table: HashMap<_, FqdnKey, FqdnEntry> =
            HashMap::try_from(map_mut(&mut self.ebpf, maps::FQDN_DEST)?)?;
        for key in keys {
            match table.remove(key) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(e).context("deleting a learned destination"),
            }
        }
        Ok(())
    }
}
