//! A [`Delta`] written into the idle generation: the live generation's
//! rule arrays copied over the idle one's (a memory copy through shared
//! mappings), then the delta's cells and appended regions and segments.
//!
//! A delta changes no IPv6 table: the idle generation's are made the live
//! one's first, unless this process knows they are (both written by it
//! with the same tables: every delta after the first one after a whole
//! change). Only over a live generation this process wrote with the rules
//! the core holds; otherwise [`Dataplane::live_arrays`] says no and the
//! core compiles the change whole.

use anyhow::{Context as _, ensure};
use portcullis_common::{Region, Segment, maps};

use std::os::fd::AsFd as _;

use portcullis_common::{V6BucketKey, V6Lengths, V6PrefixKey};

use super::{
    Dataplane, Written, generation, map_mut, map_ref,
    mapio::{Held, Mapping, capacity, entries, map_fd},
};
use crate::compile::{Delta, Extent, Image, LiveMaps, Table, V6Tables};

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
    /// fill, when they hold the rules of hash `hash` (written by this
    /// process, its IPv6 trie known entry by entry): what a [`Delta`] is
    /// compiled over. `None` otherwise.
    pub fn live_arrays(&mut self, hash: &str) -> anyhow::Result<Option<(LiveArrays, Extent)>> {
        let live = self.active()? as usize;
        let extent = match self.written.get(live) {
            Some(Some(w)) if w.rules.0 == hash && matches!(w.short, Held::Entries(_)) => w.rules.1,
            _ => return Ok(None),
        };
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

    /// Writes generation `g` (idle) as the live one with `delta` on top:
    /// `image` gives what else a generation holds (slots, rate limits,
    /// interfaces, settings). Returns what `g` holds now.
    ///
    /// The idle generation's IPv6 tables are made the live one's first
    /// when they are not known to be (the first delta after a whole
    /// change, or after the start): read from the live maps, written as a
    /// whole write writes them (only what differs).
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
        let idle_w = self.written.get_mut(g).and_then(Option::take);
        let Some(Some(live_w)) = self.written.get(live) else {
            anyhow::bail!("the live generation was not written by this process");
        };
        ensure!(
            live_w.rules.0 == delta.base_hash && live_w.rules.1 == delta.base,
            "the live generation does not hold the rules the delta was compiled over"
        );
        let Held::Entries(short) = &live_w.short else {
            anyhow::bail!("the live generation's IPv6 trie is not known entry by entry");
        };
        let short_empty = short.is_empty();
        let same_v6 = idle_w.as_ref().is_some_and(|i| {
            live_w.short.same_as(&i.short)
                && live_w.prefixes.same_as(&i.prefixes)
                && live_w.buckets.same_as(&i.buckets)
        });
        let (short, prefixes, buckets) = if same_v6 {
            (
                live_w.short.clone(),
                live_w.prefixes.clone(),
                live_w.buckets.clone(),
            )
        } else {
            let short = Table::from_sorted(short.clone());
            self.copy_v6(live, idle_w.as_ref(), short)?
        };
        let held = Written {
            rules: (image.hash.clone(), delta.extent()),
            v4_root: delta.root_len as usize,
            short,
            prefixes,
            buckets,
        };
        let extent = delta.extent();
        // Unknown: every entry of the map (an earlier root may have written any).
        let root_to = idle_w.map_or(usize::MAX, |i| i.v4_root.max(extent.root as usize));
        write_arrays(&mut self.ebpf, g, delta, root_to)?;
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

    /// The live generation's IPv6 tables (its trie: `short`) written into
    /// the idle one (`before`: what this process last wrote there); what
    /// the idle maps hold now.
    #[allow(clippy::type_complexity)]
    fn copy_v6(
        &self,
        live: usize,
        before: Option<&Written>,
        short: Table<[u8; 21], u32>,
    ) -> anyhow::Result<(
        Held<[u8; 21], u32>,
        Held<V6PrefixKey, u32>,
        Held<V6BucketKey, V6Lengths>,
    )> {
        let g = live ^ 1;
        let ebpf = &self.ebpf;
        let read = |names| -> anyhow::Result<std::os::fd::OwnedFd> {
            Ok(map_fd(map_ref(ebpf, generation(names, live))?)?.try_clone_to_owned()?)
        };
        let prefixes = Table::of(entries::<V6PrefixKey, u32>(
            read(maps::V6_PREFIXES)?.as_fd(),
        )?);
        let buckets = Table::of(entries::<V6BucketKey, V6Lengths>(
            read(maps::V6_BUCKETS)?.as_fd(),
        )?);
        let v6 = V6Tables {
            short,
            prefixes,
            buckets,
        };
        let short = super::write_short(ebpf, g, &v6, before)?;
        let (prefixes, buckets) = super::write_v6_hashes(ebpf, g, &v6, before)?;
        Ok((short, prefixes, buckets))
    }
}

/// Generation `g`'s rule arrays: the live generation's copied over (the
/// root zeroed past the live one's up to `root_to`), then `delta`.
fn write_arrays(
    ebpf: &mut aya::Ebpf,
    g: usize,
    delta: &Delta,
    root_to: usize,
) -> anyhow::Result<()> {
    let (base, extent) = (delta.base, delta.extent());
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
    copy::<Region>(
        ebpf,
        maps::REGIONS,
        g,
        base.regions,
        extent.regions as usize,
        &[],
    )
    .and_then(|idle| append_to(idle, base.regions, &delta.regions))
    .context("writing the regions")?;
    copy::<Segment>(
        ebpf,
        maps::SEGMENTS,
        g,
        base.segments,
        extent.segments as usize,
        &[],
    )
    .and_then(|idle| append_to(idle, base.segments, &delta.segments))
    .context("writing the port segments")?;
    Ok(())
}

/// `values` written from entry `at` of `idle` (none mapped: there must be
/// none to write).
fn append_to<V: aya::Pod>(idle: Option<Mapping>, at: u32, values: &[V]) -> anyhow::Result<()> {
    match idle {
        Some(mut idle) => idle.write_slice(at as usize, values),
        None if values.is_empty() => Ok(()),
        None => anyhow::bail!(
            "{} entries appended to an array none of which is mapped",
            values.len()
        ),
    }
}

/// Generation `g` of array `names`: the live generation's first `entries`
/// entries copied over, zeroed from there to `to` (at most the map's
/// capacity), then `cells` written; the idle mapping, for what is
/// appended (`None`: nothing is mapped, `to` is 0).
fn copy<V: aya::Pod>(
    ebpf: &mut aya::Ebpf,
    names: [&'static str; 2],
    g: usize,
    entries: u32,
    to: usize,
    cells: &[(u32, V)],
) -> anyhow::Result<Option<Mapping>> {
    let entries = entries as usize;
    let from = Mapping::of::<V>(map_ref(ebpf, generation(names, g ^ 1))?, entries, false)?;
    let map = map_mut(ebpf, generation(names, g))?;
    let to = to.min(capacity(map)?).max(entries);
    let Some(mut idle) = Mapping::of::<V>(map, to, true)? else {
        return Ok(None);
    };
    idle.copy_from(from.as_ref(), entries, to)?;
    for &(i, value) in cells {
        idle.set(i as usize, value)?;
    }
    Ok(Some(idle))
}
