//! A [`Delta`] written into the idle generation: the live generation's
//! rule arrays copied over the idle one's (a memory copy through shared
//! mappings), then the delta's cells and appended regions and segments.
//!
//! Only when the two generations' IPv6 tables are known to be the same (a
//! delta changes none of them) and both were written by this process: the
//! idle generation then holds the live one's rules once the copy is done,
//! and the delta's changes on top. Otherwise [`Dataplane::live_arrays`]
//! says no and the core compiles the change whole.

use anyhow::{Context as _, ensure};
use portcullis_common::{Region, Segment, maps};

use super::{Dataplane, Written, generation, map_mut, map_ref, mapio::Mapping};
use crate::compile::{Delta, Extent, Image, LiveMaps};

/// The live generation's rule arrays, mapped read-only as far as an
/// [`Extent`] says they are used.
pub struct LiveArrays {
    root: Option<Mapping>,
    chunks: Option<Mapping>,
    regions: Option<Mapping>,
    segments: Option<Mapping>,
}

impl LiveMaps for LiveArrays {
    fn root(&self, i: u32) -> Option<u32> {
        self.root.as_ref()?.get(i as usize)
    }

    fn chunk(&self, i: u32) -> Option<u32> {
        self.chunks.as_ref()?.get(i as usize)
    }

    fn region(&self, i: u32) -> Option<Region> {
        self.regions.as_ref()?.get(i as usize)
    }

    fn segment(&self, i: u32) -> Option<Segment> {
        self.segments.as_ref()?.get(i as usize)
    }
}

impl Dataplane {
    /// The live generation's rule arrays and how much of them its rules
    /// fill, when they hold the rules of hash `hash` and the idle
    /// generation can take a [`Delta`] over them: both generations written
    /// by this process, with the same IPv6 tables. `None` otherwise.
    pub fn live_arrays(&mut self, hash: &str) -> anyhow::Result<Option<(LiveArrays, Extent)>> {
        let live = self.active()? as usize;
        let extent = match self.written.get(live) {
            Some(Some(w)) if w.rules.0 == hash => w.rules.1,
            _ => return Ok(None),
        };
        if !self.idle_matches_live(live) {
            return Ok(None);
        }
        let ebpf = &self.ebpf;
        let map = |names, entries: u32| -> anyhow::Result<Option<Mapping>> {
            let map = map_ref(ebpf, generation(names, live))?;
            Mapping::of::<u32>(map, entries as usize, false)
        };
        Ok(Some((
            LiveArrays {
                root: map(maps::V4_ROOT, extent.root)?,
                chunks: map(maps::V4_CHUNKS, extent.chunks)?,
                regions: Mapping::of::<Region>(
                    map_ref(ebpf, generation(maps::REGIONS, live))?,
                    extent.regions as usize,
                    false,
                )?,
                segments: Mapping::of::<Segment>(
                    map_ref(ebpf, generation(maps::SEGMENTS, live))?,
                    extent.segments as usize,
                    false,
                )?,
            },
            extent,
        )))
    }

    /// Whether both generations were written by this process and hold the
    /// same IPv6 tables.
    fn idle_matches_live(&self, live: usize) -> bool {
        let (Some(Some(l)), Some(Some(i))) = (self.written.get(live), self.written.get(live ^ 1))
        else {
            return false;
        };
        l.short.same_as(&i.short)
            && l.prefixes.same_as(&i.prefixes)
            && l.buckets.same_as(&i.buckets)
    }

    /// Writes generation `g` (idle) as the live one with `delta` on top:
    /// `image` gives what else a generation holds (slots, rate limits,
    /// interfaces, settings). Returns what `g` holds now.
    pub(super) fn write_delta(
        &mut self,
        g: usize,
        image: &Image,
        delta: &Delta,
        flags: u32,
    ) -> anyhow::Result<Written> {
        let live = g ^ 1;
        ensure!(
            self.active()? as usize == live,
            "a delta is written into the idle generation only"
        );
        ensure!(
            self.written
                .get(live)
                .and_then(Option::as_ref)
                .is_some_and(|w| w.rules.0 == delta.base_hash && w.rules.1 == delta.base),
            "the live generation does not hold the rules the delta was compiled over"
        );
        ensure!(
            self.idle_matches_live(live),
            "the idle generation's IPv6 tables are not the live one's: a delta cannot be written"
        );
        let (Some(Some(live_w)), Some(Some(idle_w))) =
            (self.written.get(live), self.written.get(g))
        else {
            anyhow::bail!("a generation was not written by this process");
        };
        let held = Written {
            rules: (image.hash.clone(), delta.extent()),
            v4_root: delta.root_len as usize,
            short: live_w.short.clone(),
            prefixes: live_w.prefixes.clone(),
            buckets: live_w.buckets.clone(),
        };
        let (base, extent) = (delta.base, delta.extent());
        let short_empty = matches!(&live_w.short, super::mapio::Held::Entries(e) if e.is_empty());
        let root_to = idle_w.v4_root.max(extent.root as usize);
        let ebpf = &mut self.ebpf;
        copy::<u32>(ebpf, maps::V4_ROOT, g, base.root, root_to, &delta.root)
            .context("writing the IPv4 table root")?;
        copy::<u32>(
            ebpf,
            maps::V4_CHUNKS,
            g,
            base.chunks,
            extent.chunks as usize,
            &delta.chunks,
        )
        .context("writing the IPv4 table chunks")?;
        let appended = |at: u32, n: usize| (at..).zip(0..n).map(|(i, _)| i);
        let regions: Vec<(u32, Region)> = appended(base.regions, delta.regions.len())
            .zip(delta.regions.iter().copied())
            .collect();
        copy::<Region>(
            ebpf,
            maps::REGIONS,
            g,
            base.regions,
            extent.regions as usize,
            &regions,
        )
        .context("writing the regions")?;
        let segments: Vec<(u32, Segment)> = appended(base.segments, delta.segments.len())
            .zip(delta.segments.iter().copied())
            .collect();
        copy::<Segment>(
            ebpf,
            maps::SEGMENTS,
            g,
            base.segments,
            extent.segments as usize,
            &segments,
        )
        .context("writing the port segments")?;
        let rate_limits = self.rate_limits(image);
        super::write_generation_rest(
            &mut self.ebpf,
            g,
            image,
            flags,
            short_empty,
            Some(&rate_limits),
        )?;
        Ok(held)
    }
}

/// Generation `g` of array `names`: the live generation's first `entries`
/// entries copied over, zeroed from there to `to`, then `cells` written.
fn copy<V: aya::Pod>(
    ebpf: &mut aya::Ebpf,
    names: [&'static str; 2],
    g: usize,
    entries: u32,
    to: usize,
    cells: &[(u32, V)],
) -> anyhow::Result<()> {
    let entries = entries as usize;
    let to = to.max(entries);
    let from = Mapping::of::<V>(map_ref(ebpf, generation(names, g ^ 1))?, entries, false)?;
    let Some(mut idle) = Mapping::of::<V>(map_mut(ebpf, generation(names, g))?, to, true)? else {
        return Ok(());
    };
    idle.copy_from(from.as_ref(), entries, to)?;
    for &(i, value) in cells {
        idle.set(i as usize, value)?;
    }
    Ok(())
}
