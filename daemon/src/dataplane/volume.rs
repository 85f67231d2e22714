//! Egress volume per destination (`EGRESS_VOLUME`, `EGRESS_VOLUME_OVERFLOW`;
//! see `ebpf/src/volume.rs`): read summed over CPUs, and idle entries
//! deleted so the table keeps room for new destinations.

use anyhow::Context as _;
use aya::maps::{PerCpuArray, PerCpuHashMap};
use portcullis_common::{Counter, VolumeKey, maps};

use super::{Dataplane, counters::sum, map_mut};

impl Dataplane {
    /// Every destination's totals since its entry was made, and the
    /// overflow's totals.
    pub fn egress_volume(&mut self) -> anyhow::Result<(Vec<(VolumeKey, Counter)>, Counter)> {
        let table: PerCpuHashMap<_, VolumeKey, Counter> =
            PerCpuHashMap::try_from(map_mut(&mut self.ebpf, maps::EGRESS_VOLUME)?)?;
        let mut rows = Vec::new();
        for item in table.iter() {
            // An entry deleted while we walk is simply not there.
            let Ok((key, values)) = item else { continue };
            rows.push((key, sum(values.iter())));
        }
        let overflow: PerCpuArray<_, Counter> =
            PerCpuArray::try_from(map_mut(&mut self.ebpf, maps::EGRESS_VOLUME_OVERFLOW)?)?;
        let overflow = sum(overflow
            .get(&0, 0)
            .context("reading the overflow counter")?
            .iter());
        Ok((rows, overflow))
    }

    /// Deletes the entries of `keys` (destinations idle since the last read).
    pub fn egress_volume_forget(&mut self, keys: &[VolumeKey]) -> anyhow::Result<()> {
        let mut table: PerCpuHashMap<_, VolumeKey, Counter> =
            PerCpuHashMap::try_from(map_mut(&mut self.ebpf, maps::EGRESS_VOLUME)?)?;
        for key in keys {
            match table.remove(key) {
                Ok(()) => {}
                Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(e).context("deleting an idle egress destination"),
            }
        }
        Ok(())
    }
}
