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
