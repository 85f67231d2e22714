//! Raw map I/O the aya API does not offer: arrays written through a shared
//! mapping, batch updates and deletes, key walks, and map memory.

use std::{fs, path::Path};

use anyhow::{Context as _, bail, ensure};
use aya::maps::MapData;
use portcullis_common::Counter;

use super::{maps_dir, sys};

/// Writes `values` into an array map from index 0 through a shared mapping
/// of the map's memory (the rule arrays are `BPF_F_MMAPABLE`): one memory
/// copy, where `BPF_MAP_UPDATE_BATCH` would still copy entry by entry in the
/// kernel (about 190 ns each on these machines: 130 ms for the IPv4 table of
/// 10k rules). Only idle generations are written, so no packet reads these
/// entries while they change. Entries past `values` need no clearing:
/// nothing refers to them.
pub(super) fn write_array<V: aya::Pod>(map: &aya::maps::Map, values: &[V]) -> anyhow::Result<()> {
    write_array_clearing(map, values, 0)
}

/// [`write_array`], and entries `values.len()..clear_to` (at most the map's
/// capacity) zeroed: for an array whose every entry is read (the IPv4
/// table's root), written shorter than before.
pub(super) fn write_array_clearing<V: aya::Pod>(
    map: &aya::maps::Map,
    values: &[V],
    clear_to: usize,
) -> anyhow::Result<()> {
    let max = capacity(map)?;
    ensure!(
        values.len() <= max,
        "{} entries do not fit in a map of {max}",
        values.len()
    );
    let entries = values.len().max(clear_to.min(max));
    let Some(mut mapped) = Mapping::of::<V>(map, entries, true)? else {
        return Ok(());
    };
    mapped.write_slice(0, values)?;
    mapped.zero(values.len(), entries)
}

/// The number of entries array map `map` holds.
pub(super) fn capacity(map: &aya::maps::Map) -> anyhow::Result<usize> {
    let aya::maps::Map::Array(data) = map else {
        bail!("not an array map");
    };
    Ok(data.info()?.max_entries() as usize)
}

/// A shared mapping of the first entries of an array map's memory (the
/// rule arrays are `BPF_F_MMAPABLE`), unmapped when dropped. Entries are
/// read and written by index at the kernel's stride (the value size
/// rounded up to 8), never past the mapping.
pub(super) struct Mapping {
    base: std::ptr::NonNull<std::ffi::c_void>,
    len: usize,
    stride: usize,
    entries: usize,
}

impl Mapping {
    /// The first `entries` entries (at most the map's capacity) of array
    /// map `map` of values `V`; writable when `write`. `None` for none.
    pub(super) fn of<V: aya::Pod>(
        map: &aya::maps::Map,
        entries: usize,
        write: bool,
    ) -> anyhow::Result<Option<Mapping>> {
        use nix::sys::mman::{MapFlags, ProtFlags, mmap};
        use std::os::fd::AsFd as _;
        let aya::maps::Map::Array(data) = map else {
            bail!("not an array map");
        };
        let max = capacity(map)?;
        ensure!(
            entries <= max,
            "{entries} entries do not fit in a map of {max}"
        );
        let stride = size_of::<V>().next_multiple_of(8);
        let Some(len) = std::num::NonZeroUsize::new(entries * stride) else {
            return Ok(None);
        };
        let prot = if write {
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE
        } else {
            ProtFlags::PROT_READ
        };
        // SAFETY: a new shared mapping of the first `len` bytes of the
        // map's memory, which holds `max >= entries` elements of `stride`
        // bytes; only this `Mapping` refers to it, and unmaps it on drop.
        let base = unsafe { mmap(None, len, prot, MapFlags::MAP_SHARED, data.fd().as_fd(), 0) }
            .context("mapping the array's memory")?;
        Ok(Some(Mapping {
            base,
            len: len.get(),
            stride,
            entries,
        }))
    }

    /// Entry `i`, read as a `V` (of the size this mapping was made for).
    pub(super) fn get<V: aya::Pod>(&self, i: usize) -> Option<V> {
        if i >= self.entries || size_of::<V>() > self.stride {
            return None;
        }
        // SAFETY: entry `i` lies inside the mapping (`i * stride + size_of
        // V <= len`); read unaligned, as a plain-data value.
        Some(unsafe {
            self.base
                .cast::<u8>()
                .add(i * self.stride)
                .cast::<V>()
                .read_unaligned()
        })
    }

    /// Writes entry `i` (the mapping must be writable).
    pub(super) fn set<V: aya::Pod>(&mut self, i: usize, value: V) -> anyhow::Result<()> {
        self.write_slice(i, std::slice::from_ref(&value))
    }

    /// Writes `values` from entry `at` on (the mapping must be writable).
    pub(super) fn write_slice<V: aya::Pod>(
        &mut self,
        at: usize,
        values: &[V],
    ) -> anyhow::Result<()> {
        ensure!(
            at.saturating_add(values.len()) <= self.entries && size_of::<V>() <= self.stride,
            "entries {at}..{} are past the {} entries mapped",
            at.saturating_add(values.len()),
            self.entries
        );
        for (i, value) in (at..).zip(values) {
            // SAFETY: entry `i` lies inside the mapping (`i * stride + size_of
            // V <= len`, checked above); the mapping was made writable (a
            // write to a read-only one faults, it does not corrupt).
            unsafe {
                self.base
                    .cast::<u8>()
                    .add(i * self.stride)
                    .cast::<V>()
                    .write_unaligned(*value)
            };
        }
        Ok(())
    }

    /// Zeroes entries `from..to` (the mapping must be writable).
    pub(super) fn zero(&mut self, from: usize, to: usize) -> anyhow::Result<()> {
        ensure!(
            from <= to && to <= self.entries,
            "entries {from}..{to} are past the {} entries mapped",
            self.entries
        );
        // SAFETY: bytes `from * stride..to * stride` lie inside the mapping.
        unsafe {
            self.base
                .cast::<u8>()
                .add(from * self.stride)
                .write_bytes(0, (to - from) * self.stride)
        };
        Ok(())
    }

    /// Copies the first `entries` entries of `from` (mapped at the same
    /// stride; `None`: none) over this mapping's, and zeroes this mapping's
    /// entries from there to `zero_to`.
    pub(super) fn copy_from(
        &mut self,
        from: Option<&Mapping>,
        entries: usize,
        zero_to: usize,
    ) -> anyhow::Result<()> {
        let zero_to = zero_to.max(entries);
        let (from_stride, from_entries) = from.map_or((self.stride, 0), |f| (f.stride, f.entries));
        ensure!(
            self.stride == from_stride && entries <= from_entries && zero_to <= self.entries,
            "copying {entries} entries of {from_entries} into {}",
            self.entries
        );
        if let Some(from) = from {
            // SAFETY: both ranges lie inside their mappings (checked above),
            // and two mappings of two maps do not overlap.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    from.base.cast::<u8>().as_ptr(),
                    self.base.cast::<u8>().as_ptr(),
                    entries * self.stride,
                )
            };
        }
        self.zero(entries, zero_to)
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `Mapping::of`, with its length; not
        // used after this.
        if let Err(e) = unsafe { nix::sys::mman::munmap(self.base, self.len) } {
            tracing::warn!(error = %e, "cannot unmap a rule array");
        }
    }
}

// SAFETY: a `Mapping` is plain memory shared with the kernel, owned by one
// value; reads through `&self` do not race with writes, which take `&mut`.
unsafe impl Send for Mapping {}
// SAFETY: as above: `&Mapping` only reads.
unsafe impl Sync for Mapping {}

/// Zeroes the first `slots` entries of a per-CPU counter array with one
/// `BPF_MAP_UPDATE_BATCH` (a per-CPU array cannot be mapped), instead of a
/// system call per slot.
pub(super) fn clear_counters(map: &aya::maps::Map, slots: usize) -> anyhow::Result<()> {
    use std::os::fd::AsFd as _;
    let aya::maps::Map::PerCpuArray(data) = map else {
        bail!("not a per-CPU array map");
    };
    let cpus = possible_cpus()?;
    // Per-CPU values are passed as one value per possible CPU, each rounded
    // up to 8 bytes.
    let zeros = vec![0u8; slots * cpus * size_of::<Counter>().next_multiple_of(8)];
    let keys: Vec<u32> = (0..slots as u32).collect();
    batch(sys::BPF_MAP_UPDATE_BATCH, data.fd().as_fd(), &keys, &zeros)
}

/// The first `slots` entries of a per-CPU counter array, each summed over
/// the CPUs, read with `BPF_MAP_LOOKUP_BATCH`: a lookup per slot is a
/// system call each (about 1 us: 100 ms for the counters of 100k rules,
/// read at every change).
pub(super) fn read_counters(map: &aya::maps::Map, slots: usize) -> anyhow::Result<Vec<Counter>> {
    use std::os::fd::AsFd as _;
    let aya::maps::Map::PerCpuArray(data) = map else {
        bail!("not a per-CPU array map");
    };
    let cpus = possible_cpus()?;
    // At most this many entries per call, through one buffer: a host may
    // list hundreds of possible CPUs (16 bytes each per entry).
    let chunk = slots.clamp(1, READ_CHUNK);
    let mut keys = vec![0u32; chunk];
    // One value per possible CPU per entry.
    let mut values = vec![Counter::default(); chunk * cpus];
    let mut sums = Vec::with_capacity(slots);
    // Where the last call stopped (an array's position is the last key).
    let mut from = None;
    while sums.len() < slots {
        let want = (slots - sums.len()).min(chunk);
        // A `Counter` is 16 bytes: per-CPU values need no rounding.
        let batch = lookup_batch(data.fd().as_fd(), from, &mut keys, &mut values, want, cpus)
            .context("BPF_MAP_LOOKUP_BATCH on the rule counters")?;
        let per_cpu = values.get(..batch.read * cpus).unwrap_or_default();
        sums.extend(per_cpu.chunks(cpus).map(super::counters::sum));
        if batch.end || batch.read == 0 {
            break;
        }
        from = Some(batch.next);
    }
    ensure!(
        sums.len() == slots,
        "read {} of {slots} rule counters",
        sums.len()
    );
    Ok(sums)
}

/// Entries per `BPF_MAP_LOOKUP_BATCH` call of [`read_counters`].
const READ_CHUNK: usize = 4096;

/// The number of possible CPUs (aya's count, the one the kernel lays
/// per-CPU values out by).
fn possible_cpus() -> anyhow::Result<usize> {
    Ok(aya::util::nr_cpus()
        .map_err(|(_, e)| e)
        .context("reading the possible CPUs")?
        .get() as usize)
}

/// `BPF_MAP_UPDATE_BATCH` (`keys` with their `values`, laid out as the map
/// lays out values, one after another) or `BPF_MAP_DELETE_BATCH` (`keys`;
/// no values) in one system call.
fn batch<K: aya::Pod, V: aya::Pod>(
    cmd: libc::c_long,
    fd: std::os::fd::BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd as _;
    if keys.is_empty() {
        return Ok(());
    }
    let mut attr = sys::BatchAttr {
        in_batch: 0,
        out_batch: 0,
        keys: keys.as_ptr() as u64,
        values: if values.is_empty() {
            0
        } else {
            values.as_ptr() as u64
        },
        count: keys.len() as u32,
        map_fd: fd.as_raw_fd() as u32,
        elem_flags: 0,
        flags: 0,
    };
    // SAFETY: `attr` is `bpf_attr.batch` (no implicit padding); `keys` holds
    // `count` keys of the map's key size and, for an update, `values` `count`
    // values as the map lays them out (the callers size it so); both outlive
    // the call; `fd` is an open map fd borrowed from the caller's map.
    unsafe { sys::bpf(cmd, &mut attr) }
        .with_context(|| format!("batch command {cmd} on {} entries", keys.len()))?;
    ensure!(
        attr.count as usize == keys.len(),
        "batch command {cmd} did {} of {} entries",
        attr.count,
        keys.len()
    );
    Ok(())
}

/// What this process last wrote to one keyed map of a generation (hash
/// map or LPM trie), as far as the next write of it needs to know.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) enum Held<K, V> {
    /// Not known (never written by this process, or a write failed): the
    /// next write reads the map back from the kernel.
    #[default]
    Unknown,
    /// Its entries, sorted by key: a small map, cheaper kept than read back.
    Entries(Vec<(K, V)>),
    /// The [digest](crate::compile::Table::digest) of its entries: a map too
    /// large to keep. A write of the same table changes nothing and is
    /// skipped (an add of an IPv4 rule leaves the IPv6 maps of 100k rules
    /// as they are); another reads the map back.
    Digest([u8; 32]),
}

impl<K: Ord + std::hash::Hash, V: std::hash::Hash> Held<K, V> {
    /// Whether only the map's digest is known: a map too large to keep.
    pub(super) fn is_digest(&self) -> bool {
        matches!(self, Held::Digest(_))
    }

    /// Whether `self` and `other` are known to hold the same entries.
    pub(super) fn same_as(&self, other: &Held<K, V>) -> bool
    where
        K: Clone + PartialEq,
        V: Clone + PartialEq,
    {
        match (self, other) {
            (Held::Entries(a), Held::Entries(b)) => a == b,
            (Held::Digest(a), Held::Digest(b)) => a == b,
            (Held::Entries(e), Held::Digest(d)) | (Held::Digest(d), Held::Entries(e)) => {
                crate::compile::Table::from_sorted(e.clone()).digest() == *d
            }
            _ => false,
        }
    }

    /// Forgets the entries of a kept map, keeping their digest.
    pub(super) fn forget_entries(self) -> Held<K, V> {
        match self {
            Held::Entries(entries) => {
                Held::Digest(crate::compile::Table::from_sorted(entries).digest())
            }
            other => other,
        }
    }
}

/// Makes an idle hash map or LPM trie hold exactly `want`. `before` is
/// what this process last wrote there (as this returns it); when unknown,
/// or only its digest is and `want`'s differs, what the map holds is read
/// from the kernel (a hash map's entries with `BPF_MAP_LOOKUP_BATCH`, a
/// trie's keys one by one). Stale keys go in one `BPF_MAP_DELETE_BATCH`,
/// new and changed entries in one `BPF_MAP_UPDATE_BATCH`.
///
/// Returns what the map holds now: its entries when they are at most
/// `keep`, their digest otherwise. A small table is cheaper kept than read
/// back (the batch walks every bucket of the map, a million at the
/// benchmark's capacity: about 5 ms however few it holds), a large one
/// cheaper read back than kept (the IPv6 prefixes of 100k rules are 3 MB
/// per generation).
pub(super) fn write_keyed<K, V>(
    map: &aya::maps::Map,
    want: &crate::compile::Table<K, V>,
    before: &Held<K, V>,
    keep: usize,
) -> anyhow::Result<Held<K, V>>
where
    K: aya::Pod + Ord + std::hash::Hash,
    V: aya::Pod + PartialEq + std::hash::Hash,
{
    let large = want.len() > keep;
    let digest = (large || before.is_digest()).then(|| want.digest());
    // What the map holds once it holds `want` (entries in key order already).
    let holds_want = || match digest {
        Some(digest) if large => Held::Digest(digest),
        _ => Held::Entries(want.entries().to_vec()),
    };
    if let (Held::Digest(held), Some(digest)) = (before, digest)
        && *held == digest
    {
        // The map holds `want` already (a small table is kept again).
        return Ok(holds_want());
    }
    let fd = map_fd(map)?;
    // What the map holds, sorted by key; a trie read back gives no values.
    let mut present: Vec<(K, Option<V>)> = match (before, map) {
        (Held::Entries(before), _) => before.iter().map(|(k, v)| (*k, Some(*v))).collect(),
        (_, aya::maps::Map::HashMap(_)) => entries::<K, V>(fd)?
            .into_iter()
            .map(|(k, v)| (k, Some(v)))
            .collect(),
        _ => keys::<K>(fd)?.into_iter().map(|k| (k, None)).collect(),
    };
    present.sort_unstable_by_key(|e| e.0);
    let (stale, (keys, values)) = differences(&present, want.entries());
    batch(sys::BPF_MAP_DELETE_BATCH, fd, &stale, &[] as &[V]).context("removing stale entries")?;
    batch(sys::BPF_MAP_UPDATE_BATCH, fd, &keys, &values).context("writing entries")?;
    Ok(holds_want())
}

/// What turns a map holding `present` into one holding `want` (both sorted
/// by key, each key once): the keys to remove, and the entries to write
/// (new, or held with another value or none known). One merge of the two
/// lists: a 100k-rule set's tables are 250k entries each.
#[allow(clippy::type_complexity)]
fn differences<K: Ord + Copy, V: PartialEq + Copy>(
    present: &[(K, Option<V>)],
    want: &[(K, V)],
) -> (Vec<K>, (Vec<K>, Vec<V>)) {
    use std::cmp::Ordering;
    let (mut stale, mut keys, mut values) = (Vec::new(), Vec::new(), Vec::new());
    let (mut p, mut w) = (present.iter().peekable(), want.iter().peekable());
    loop {
        let order = match (p.peek(), w.peek()) {
            (None, None) => break,
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some((pk, _)), Some((wk, _))) => pk.cmp(wk),
        };
        match order {
            Ordering::Less => stale.extend(p.next().map(|(k, _)| *k)),
            Ordering::Greater => {
                if let Some((k, v)) = w.next() {
                    keys.push(*k);
                    values.push(*v);
                }
            }
            Ordering::Equal => {
                if let (Some((_, held)), Some((k, v))) = (p.next(), w.next())
                    && held.as_ref() != Some(v)
                {
                    keys.push(*k);
                    values.push(*v);
                }
            }
        }
    }
    (stale, (keys, values))
}

/// Every entry of a hash map, read with `BPF_MAP_LOOKUP_BATCH`
/// ([`READ_CHUNK`] at a time; a call that meets a bucket larger than its
/// room is asked again with twice the room).
pub(super) fn entries<K: aya::Pod, V: aya::Pod>(
    fd: std::os::fd::BorrowedFd<'_>,
) -> anyhow::Result<Vec<(K, V)>> {
    let mut out = Vec::new();
    let mut chunk = READ_CHUNK;
    // A hash map's position is a bucket number.
    let mut from = None;
    loop {
        // SAFETY: `K` and `V` are Pod: all-zero bytes are a value of each.
        let mut keys: Vec<K> = vec![unsafe { std::mem::zeroed() }; chunk];
        // SAFETY: as above.
        let mut values: Vec<V> = vec![unsafe { std::mem::zeroed() }; chunk];
        let batch = match lookup_batch(fd, from, &mut keys, &mut values, chunk, 1) {
            Ok(batch) => batch,
            // One bucket holds more than `chunk` entries: nothing was read.
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && chunk < 1 << 20 => {
                chunk *= 2;
                continue;
            }
            Err(e) => return Err(e).context("BPF_MAP_LOOKUP_BATCH"),
        };
        keys.truncate(batch.read);
        values.truncate(batch.read);
        out.extend(keys.into_iter().zip(values));
        if batch.end {
            return Ok(out);
        }
        from = Some(batch.next);
    }
}

/// What one `BPF_MAP_LOOKUP_BATCH` call read.
struct Batch {
    /// Entries read.
    read: usize,
    /// Where the next call starts (the map's own position: the last key
    /// read of an array, a bucket number of a hash map).
    next: u32,
    /// The map ended.
    end: bool,
}

/// One `BPF_MAP_LOOKUP_BATCH`: up to `count` entries of the map of `fd`,
/// from position `from` (`None`: the first) into `keys` and `values`
/// (`per_key` values per entry: one, or one per possible CPU). `K` and `V`
/// must be the map's key and (per-CPU) value types; the room is checked.
fn lookup_batch<K: aya::Pod, V: aya::Pod>(
    fd: std::os::fd::BorrowedFd<'_>,
    from: Option<u32>,
    keys: &mut [K],
    values: &mut [V],
    count: usize,
    per_key: usize,
) -> std::io::Result<Batch> {
    use std::os::fd::AsRawFd as _;
    if keys.len() < count || values.len() < count.saturating_mul(per_key) {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    let token = from.unwrap_or(0);
    let mut next = 0u32;
    let mut attr = sys::BatchAttr {
        // No position: from the first entry.
        in_batch: if from.is_some() {
            &token as *const u32 as u64
        } else {
            0
        },
        out_batch: &mut next as *mut u32 as u64,
        keys: keys.as_mut_ptr() as u64,
        values: values.as_mut_ptr() as u64,
        count: count as u32,
        map_fd: fd.as_raw_fd() as u32,
        elem_flags: 0,
        flags: 0,
    };
    // SAFETY: `attr` is `bpf_attr.batch` (no implicit padding); `keys` has
    // room for `count` keys and `values` for `count` entries of `per_key`
    // values (checked above; `K` and `V` are the map's types, as the
    // callers' maps are); `in_batch` and `out_batch` point at u32
    // positions; all outlive the call; the fd is the map's, open.
    let end = match unsafe { sys::bpf(sys::BPF_MAP_LOOKUP_BATCH, &mut attr) } {
        Ok(_) => false,
        // The map ended before `count` entries: `attr.count` were read.
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
        Err(e) => return Err(e),
    };
    Ok(Batch {
        read: (attr.count as usize).min(count),
        next,
        end,
    })
}

/// Every key of a map, read with `BPF_MAP_GET_NEXT_KEY`.
fn keys<K: aya::Pod>(fd: std::os::fd::BorrowedFd<'_>) -> anyhow::Result<Vec<K>> {
    use std::os::fd::AsRawFd as _;
    let mut keys: Vec<K> = Vec::new();
    let mut next = std::mem::MaybeUninit::<K>::uninit();
    loop {
        let mut attr = sys::ElemAttr {
            map_fd: fd.as_raw_fd() as u32,
            _pad: 0,
            // No key: the first one.
            key: keys.last().map_or(0, |k| k as *const K as u64),
            next_key: next.as_mut_ptr() as u64,
            flags: 0,
        };
        // SAFETY: `attr` is the element member of `bpf_attr` (padding
        // explicit); `key` is null or a key of the map's key size, `next_key`
        // room for one; both outlive the call; `fd` is an open map fd.
        match unsafe { sys::bpf(sys::BPF_MAP_GET_NEXT_KEY, &mut attr) } {
            // SAFETY: the kernel wrote a whole key into `next`; `K` is Pod.
            Ok(_) => keys.push(unsafe { next.assume_init_read() }),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(keys),
            Err(e) => return Err(e).context("BPF_MAP_GET_NEXT_KEY"),
        }
    }
}

/// The file descriptor of a map of any of the kinds this module writes.
pub(super) fn map_fd(map: &aya::maps::Map) -> anyhow::Result<std::os::fd::BorrowedFd<'_>> {
    use aya::maps::Map;
    use std::os::fd::AsFd as _;
    match map {
        Map::Array(data) | Map::PerCpuArray(data) | Map::HashMap(data) | Map::LpmTrie(data) => {
            Ok(data.fd().as_fd())
        }
        _ => bail!("unexpected kind of map"),
    }
}

/// Kernel memory of every map pinned under `pin_dir` (the kernel's own
/// `memlock` accounting, from fdinfo), by map name.
pub fn map_memory(pin_dir: &Path) -> anyhow::Result<Vec<(String, u64)>> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    let dir = maps_dir(pin_dir);
    let mut out = Vec::new();
    for entry in fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let path = entry?.path();
        let map =
            MapData::from_pin(&path).with_context(|| format!("cannot open {}", path.display()))?;
        let fd = map.fd().as_fd().as_raw_fd();
        let info = fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))?;
        let bytes = info
            .lines()
            .find_map(|l| l.strip_prefix("memlock:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        out.push((name, bytes));
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::differences;

    proptest! {
        /// The removals and writes turn the map into `want`, and nothing
        /// is written that the map already holds.
        #[test]
        fn differences_turn_what_is_held_into_what_is_wanted_and_no_more(
            present in prop::collection::btree_map(0u8..32, prop::option::of(0u8..4), 0..24),
            want in prop::collection::btree_map(0u8..32, 0u8..4, 0..24),
        ) {
            let held: Vec<_> = present.iter().map(|(k, v)| (*k, *v)).collect();
            let wanted: Vec<_> = want.iter().map(|(k, v)| (*k, *v)).collect();
            let (stale, (keys, values)) = differences(&held, &wanted);
            let mut map: BTreeMap<u8, Option<u8>> = present.clone();
            for k in &stale {
                prop_assert!(!want.contains_key(k));
                map.remove(k);
            }
            for (k, v) in keys.iter().zip(&values) {
                prop_assert_ne!(present.get(k), Some(&Some(*v)));
                map.insert(*k, Some(*v));
            }
            let expected: BTreeMap<u8, Option<u8>> = want.iter().map(|(k, v)| (*k, Some(*v))).collect();
            prop_assert_eq!(map, expected);
        }
    }
}
