//! The per-CPU counters (verdicts and rules), summed over CPUs by one fold.

use std::path::Path;

use anyhow::Context as _;
use aya::maps::{MapData, PerCpuArray};
use portcullis_common::{Counter, Reason, maps};

use super::{Dataplane, generation, map_mut, maps_dir};

/// One counter summed over the CPUs.
pub(super) fn sum<'a>(per_cpu: impl IntoIterator<Item = &'a Counter>) -> Counter {
    per_cpu
        .into_iter()
        .fold(Counter::default(), |a, c| Counter {
            packets: a.packets + c.packets,
            bytes: a.bytes + c.bytes,
        })
}

impl Dataplane {
    /// Per-slot counters of the live generation, summed over CPUs.
    pub fn rule_counters(&mut self, slots: usize) -> anyhow::Result<Vec<Counter>> {
        let g = self.active()? as usize;
        let stats = map_mut(&mut self.ebpf, generation(maps::RULE_STATS, g))?;
        super::mapio::read_counters(stats, slots)
    }
}

/// Reads the verdict counters from the pinned map, summed over CPUs.
pub fn read_counters(pin_dir: &Path) -> anyhow::Result<Vec<(Reason, Counter)>> {
    let path = maps_dir(pin_dir).join(maps::VERDICTS);
    let data = MapData::from_pin(&path).with_context(|| {
        format!(
            "no pinned counters at {} (is Portcullis enforcing?)",
            path.display()
        )
    })?;
    let counters: PerCpuArray<_, Counter> =
        PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data))?;
    Reason::ALL
        .iter()
        .map(|&reason| Ok((reason, sum(counters.get(&(reason as u32), 0)?.iter()))))
        .collect()
}
