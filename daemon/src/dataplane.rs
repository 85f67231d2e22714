//! Everything that touches the kernel: load the eBPF object, attach it, pin
//! it, adopt what an earlier daemon pinned, and write the policy maps.
//!
//! Pin layout under the configured directory:
//!
//! ```text
//! <pin_dir>/maps-vN/VERDICTS        per-CPU verdict counters
//! <pin_dir>/maps-vN/ACTIVE          the live generation of the rule maps (0/1)
//! <pin_dir>/maps-vN/SETTINGS        global switches, per generation
//! <pin_dir>/maps-vN/V4_ROOT_g, V4_CHUNKS_g, SRC6_g, V6_BUCKETS_g, V6_PREFIXES_g,
//!                   REGIONS_g, SEGMENTS_g, RULE_STATS_g
//!                                the compiled rules of generation g
//! <pin_dir>/maps-vN/CONNTRACK       flows this host opened
//! <pin_dir>/maps-vN/INBOUND         inbound flows the rules admitted (for replies)
//! <pin_dir>/maps-vN/FRAGMENTS       fragmented packets whose first fragment passed
//! <pin_dir>/maps-vN/DHCP_REQUESTS   when this host last asked for a lease, per family
//! <pin_dir>/links/xdp-<ifname>   the XDP link of one interface
//! <pin_dir>/links/tcx-<ifname>   the TCX egress link of one interface
//! ```
//!
//! Where TCX is not available (kernels before 6.6) or not wanted, the egress
//! program is a clsact filter with a fixed priority and handle: the kernel
//! keeps such a filter (and its program) until it is deleted, and a restarted
//! daemon finds it by that priority and handle to replace its program.
//!
//! The links hold the programs and the programs hold the maps, so as long as
//! the pins exist the host stays protected, whether or not a daemon runs.

use std::{
    ffi::CString,
    fs,
    io::ErrorKind,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, anyhow, bail, ensure};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{
        SchedClassifier, TcAttach, TcAttachType, Xdp, XdpMode,
        links::{FdLink, LinkError, LinkOrder, PinnedLink},
        tc::{self, NlOptions, SchedClassifierLink, TcHandle},
        xdp::XdpLink,
    },
};
use portcullis_common::{
    Counter, FAMILY_V4, FAMILY_V6, FLOW_REPLIED, FLOW_TCP_ESTABLISHED, FLOW_TCP_SYN_SENT, Flow,
    FlowKey, Reason, RuleKey6, SETTING_EGRESS_ALLOWLIST, SETTING_PING, Settings, V6_BUCKET_LENGTHS,
    V6_BUCKET_OVERFLOW, V6_SHORT_MAX, V6BucketKey, V6Lengths, V6PrefixKey, maps, programs,
};
use tracing::{info, warn};

use crate::{
    compile::{Image, Limits},
    model::{Connection, TcAttachMode, XdpProgram},
    sockets,
};

/// Priority and handle of our clsact egress filter (the clsact path).
const CLSACT_PRIORITY: u16 = 0xc0de;
const CLSACT_HANDLE: TcHandle = TcHandle::new(0, 0x7063);

/// The compiled eBPF object, built by `build.rs`.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/portcullis"));

/// How a program came to run on an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attach {
    /// A new link (or clsact filter) was created.
    New,
    /// The link of an earlier daemon was kept; the new program was swapped
    /// in under it atomically.
    Adopted,
}

/// The loaded eBPF object with its maps pinned under `pin_dir/maps`.
pub struct Dataplane {
    ebpf: Ebpf,
    /// The XDP program loaded (multi- or single-buffer).
    ingress_program: &'static str,
    pin_dir: PathBuf,
    /// Audit/open mode: pass what would be dropped (counted). Takes effect
    /// with the next `apply`.
    pub pass_all: bool,
    /// The IPv6 tables this process last wrote to each generation, so an
    /// update writes only what changed and knows the stale keys without
    /// reading them back (`None` until the first write, and after a failed
    /// one).
    v6_written: [Option<V6Tables>; 2],
}

impl Dataplane {
    /// Loads the programs, reusing maps already pinned under `pin_dir` (so
    /// counters and rules survive a restart) and pinning new ones otherwise.
    pub fn load(pin_dir: &Path, conntrack_entries: u32, limits: &Limits) -> anyhow::Result<Self> {
        Self::load_with(pin_dir, conntrack_entries, limits, XdpProgram::Auto)
    }

    /// [`Dataplane::load`] with the XDP program variant chosen: `Auto` loads
    /// the multi-buffer program and, if the kernel refuses it (before 5.18),
    /// the single-buffer one.
    pub fn load_with(
        pin_dir: &Path,
        conntrack_entries: u32,
        limits: &Limits,
        xdp: XdpProgram,
    ) -> anyhow::Result<Self> {
        ensure_bpffs(pin_dir)?;
        let maps_dir = maps_dir(pin_dir);
        for dir in [&maps_dir, &pin_dir.join("links")] {
            fs::create_dir_all(dir)
                .with_context(|| format!("cannot create pin directory {}", dir.display()))?;
        }
        let mut loader = EbpfLoader::new();
        loader
            .default_map_pin_directory(&maps_dir)
            .map_max_entries(maps::CONNTRACK, conntrack_entries);
        for g in 0..2 {
            loader
                .map_max_entries(
                    generation(maps::V4_CHUNKS, g),
                    limits.v4_chunks * portcullis_common::V4_CHUNK_ENTRIES,
                )
                .map_max_entries(generation(maps::SRC6, g), limits.prefixes)
                .map_max_entries(generation(maps::V6_BUCKETS, g), limits.prefixes)
                .map_max_entries(generation(maps::V6_PREFIXES, g), limits.prefixes)
                .map_max_entries(generation(maps::REGIONS, g), limits.regions)
                .map_max_entries(generation(maps::SEGMENTS, g), limits.segments)
                .map_max_entries(generation(maps::RULE_STATS, g), limits.slots);
        }
        let mut ebpf = loader.load(EBPF_OBJECT).with_context(|| {
            format!(
                "cannot load the eBPF programs (maps pinned under {})",
                maps_dir.display()
            )
        })?;
        let ingress_program = load_ingress(&mut ebpf, xdp)?;
        egress(&mut ebpf)?
            .load()
            .with_context(|| format!("the kernel refused program {}", programs::EGRESS))?;
        Ok(Self {
            ebpf,
            ingress_program,
            pin_dir: pin_dir.to_owned(),
            pass_all: false,
            v6_written: [None, None],
        })
    }

    /// Takes the drop-event ring buffer out, for its reader.
    pub fn take_events(&mut self) -> anyhow::Result<aya::maps::RingBuf<MapData>> {
        let map = self
            .ebpf
            .take_map(maps::EVENTS)
            .ok_or_else(|| anyhow!("map {} missing from the eBPF object", maps::EVENTS))?;
        Ok(aya::maps::RingBuf::try_from(map)?)
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// The XDP program variant loaded.
    pub fn ingress_program(&self) -> &'static str {
        self.ingress_program
    }

    /// Entries in the connection table, and its capacity.
    pub fn conntrack_usage(&mut self) -> anyhow::Result<(usize, u32)> {
        let map = map_mut(&mut self.ebpf, maps::CONNTRACK)?;
        let table: HashMap<_, FlowKey, Flow> = HashMap::try_from(&*map)?;
        let capacity = MapData::from_pin(maps_dir(&self.pin_dir).join(maps::CONNTRACK))
            .ok()
            .and_then(|m| m.info().ok())
            .map_or(0, |i| i.max_entries());
        Ok((table.keys().filter(Result::is_ok).count(), capacity))
    }

    /// Whether the connection table holds `key` (a flow that survives rule
    /// changes: opened by this host, or seeded at start).
    pub fn has_flow(&mut self, key: &FlowKey) -> bool {
        let Ok(map) = map_mut(&mut self.ebpf, maps::CONNTRACK) else {
            return false;
        };
        let Ok(table) = HashMap::<_, FlowKey, Flow>::try_from(map) else {
            return false;
        };
        table.get(key, 0).is_ok()
    }

    /// Removes every flow whose remote address `keep` refuses, so its next
    /// packet meets the policy again; returns how many were removed.
    pub fn cut_flows(&mut self, keep: impl Fn(std::net::IpAddr) -> bool) -> anyhow::Result<usize> {
        let mut table: HashMap<_, FlowKey, Flow> =
            HashMap::try_from(map_mut(&mut self.ebpf, maps::CONNTRACK)?)?;
        let doomed: Vec<FlowKey> = table
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !keep(flow_remote(k)))
            .collect();
        for key in &doomed {
            // Gone already (aged out, evicted): nothing left to cut.
            let _ = table.remove(key);
        }
        Ok(doomed.len())
    }

    /// Per-slot counters of the live generation, summed over CPUs.
    pub fn rule_counters(&mut self, slots: usize) -> anyhow::Result<Vec<Counter>> {
        let g = self.active()? as usize;
        let stats: PerCpuArray<_, Counter> =
            PerCpuArray::try_from(map_mut(&mut self.ebpf, generation(maps::RULE_STATS, g))?)?;
        (0..slots as u32)
            .map(|slot| {
                let per_cpu = stats.get(&slot, 0)?;
                Ok(per_cpu.iter().fold(Counter::default(), |a, c| Counter {
                    packets: a.packets + c.packets,
                    bytes: a.bytes + c.bytes,
                }))
            })
            .collect()
    }

    /// The live generation of the rule maps (0 or 1).
    pub fn active(&mut self) -> anyhow::Result<u32> {
        let active: Array<_, u32> = Array::try_from(map_mut(&mut self.ebpf, maps::ACTIVE)?)?;
        Ok(active.get(&0, 0).context("reading ACTIVE")? & 1)
    }

    /// Makes `image` live: writes it into the idle generation, then switches
    /// `ACTIVE` to it in one write, so no packet sees half of an update. If
    /// writing fails, the live generation is untouched. Returns the
    /// generation now live.
    pub fn apply(&mut self, image: &Image, allow_ping: bool) -> anyhow::Result<u32> {
        let live = self.active()?;
        let idle = (1 - live) as usize;
        self.write_generation(idle, image, allow_ping)
            .with_context(|| format!("writing rule generation {idle}"))?;
        let mut active: Array<_, u32> = Array::try_from(map_mut(&mut self.ebpf, maps::ACTIVE)?)?;
        active
            .set(0, &(idle as u32), 0)
            .context("switching ACTIVE")?;
        // A packet that read the old value may still be walking the old maps:
        // let in-flight packets finish before the next update rewrites them.
        std::thread::sleep(std::time::Duration::from_millis(2));
        Ok(idle as u32)
    }

    /// Test-only: writes `image` over the live generation in place, the
    /// non-atomic way, so a test can show what the generation switch prevents.
    #[doc(hidden)]
    pub fn apply_in_place_for_tests(
        &mut self,
        image: &Image,
        allow_ping: bool,
    ) -> anyhow::Result<()> {
        let live = self.active()? as usize;
        self.write_generation(live, image, allow_ping)
    }

    fn write_generation(
        &mut self,
        g: usize,
        image: &Image,
        allow_ping: bool,
    ) -> anyhow::Result<()> {
        let mut flags = 0;
        if self.pass_all {
            flags |= portcullis_common::SETTING_PASS_ALL;
        }
        if allow_ping {
            flags |= SETTING_PING;
        }
        if image.egress_allowlist {
            flags |= SETTING_EGRESS_ALLOWLIST;
        }
        write_array(
            map_mut(&mut self.ebpf, generation(maps::V4_ROOT, g))?,
            &image.v4_root,
        )
        .context("writing the IPv4 table root")?;
        write_array(
            map_mut(&mut self.ebpf, generation(maps::V4_CHUNKS, g))?,
            &image.v4_chunks,
        )
        .context("writing the IPv4 table chunks")?;
        let v6 = V6Tables::of(&image.v6);
        // Forgotten until the writes succeed: after a failure, the next write
        // reads the keys from the kernel.
        let before = self.v6_written.get_mut(g).and_then(Option::take);
        write_keyed(
            map_mut(&mut self.ebpf, generation(maps::SRC6, g))?,
            &v6.short,
            before.as_ref().map(|b| &b.short),
        )
        .context("writing the IPv6 short prefixes (LPM trie)")?;
        write_keyed(
            map_mut(&mut self.ebpf, generation(maps::V6_PREFIXES, g))?,
            &v6.prefixes,
            before.as_ref().map(|b| &b.prefixes),
        )
        .context("writing the IPv6 prefixes")?;
        write_keyed(
            map_mut(&mut self.ebpf, generation(maps::V6_BUCKETS, g))?,
            &v6.buckets,
            before.as_ref().map(|b| &b.buckets),
        )
        .context("writing the IPv6 /32 buckets")?;
        if let Some(written) = self.v6_written.get_mut(g) {
            *written = Some(v6);
        }
        write_array(
            map_mut(&mut self.ebpf, generation(maps::REGIONS, g))?,
            &image.regions,
        )
        .context("writing the regions")?;
        write_array(
            map_mut(&mut self.ebpf, generation(maps::SEGMENTS, g))?,
            &image.segments,
        )
        .context("writing the port segments")?;
        clear_counters(
            map_mut(&mut self.ebpf, generation(maps::RULE_STATS, g))?,
            image.slots.len(),
        )
        .context("clearing rule counters")?;
        let mut settings: Array<_, Settings> =
            Array::try_from(map_mut(&mut self.ebpf, maps::SETTINGS)?)?;
        settings
            .set(
                g as u32,
                &Settings {
                    flags,
                    _reserved: 0,
                },
                0,
            )
            .context("writing SETTINGS")?;
        Ok(())
    }

    /// Filters inbound traffic on `ifname`: adopts its pinned XDP link if
    /// there is one, attaches and pins a new link otherwise.
    pub fn attach_ingress(&mut self, ifname: &str) -> anyhow::Result<Attach> {
        let pin = link_pin(&self.pin_dir, "xdp", ifname);
        let prog = ingress(&mut self.ebpf, self.ingress_program)?;
        if pin.exists() {
            match adopt(prog, &pin) {
                Ok(()) => return Ok(Attach::Adopted),
                Err(e) => {
                    // A link whose interface is gone cannot be updated; replace it.
                    warn!(interface = ifname, error = %format!("{e:#}"), "pinned link unusable, attaching anew");
                    fs::remove_file(&pin)
                        .with_context(|| format!("cannot remove stale pin {}", pin.display()))?;
                }
            }
        }
        let c_name = CString::new(ifname).context("interface name contains NUL")?;
        let single_buffer = self.ingress_program == programs::INGRESS_SINGLE;
        let link_id = match prog.attach(c_name.as_c_str(), XdpMode::default()) {
            Ok(id) => id,
            // A single-buffer program cannot run natively where frames do
            // not fit a page (jumbo MTUs); generic XDP still filters them.
            Err(e) if single_buffer => {
                warn!(interface = ifname, error = %e, "native XDP refused the single-buffer program; attaching in generic mode");
                prog.attach(c_name.as_c_str(), XdpMode::Skb)
                    .with_context(|| format!("cannot attach XDP to interface {ifname}"))?
            }
            Err(e) => {
                return Err(anyhow::Error::new(e))
                    .with_context(|| format!("cannot attach XDP to interface {ifname}"));
            }
        };
        let link: FdLink = prog
            .take_link(link_id)?
            .try_into()
            .map_err(|e: LinkError| {
                anyhow!("interface {ifname}: XDP link is not a bpf_link: {e}")
            })?;
        link.pin(&pin)
            .with_context(|| format!("cannot pin the XDP link of {ifname} at {}", pin.display()))?;
        Ok(Attach::New)
    }

    /// Records outbound flows on `ifname` (TCX link or clsact filter).
    pub fn attach_egress(&mut self, ifname: &str, mode: TcAttachMode) -> anyhow::Result<Attach> {
        let use_tcx = match mode {
            TcAttachMode::Tcx => true,
            TcAttachMode::Clsact => false,
            TcAttachMode::Auto => kernel_has_tcx(),
        };
        let c_name = CString::new(ifname).context("interface name contains NUL")?;
        let prog = egress(&mut self.ebpf)?;
        if !use_tcx {
            return attach_clsact(prog, &c_name);
        }
        let pin = link_pin(&self.pin_dir, "tcx", ifname);
        if pin.exists() {
            let adopted = PinnedLink::from_pin(&pin)
                .map_err(anyhow::Error::from)
                .and_then(|p| Ok(SchedClassifierLink::try_from(FdLink::from(p))?))
                .and_then(|link| Ok(prog.attach_to_link(link)?));
            match adopted {
                Ok(id) => {
                    drop(prog.take_link(id)?);
                    return Ok(Attach::Adopted);
                }
                Err(e) => {
                    warn!(interface = ifname, error = %format!("{e:#}"), "pinned TCX link unusable, attaching anew");
                    fs::remove_file(&pin)
                        .with_context(|| format!("cannot remove stale pin {}", pin.display()))?;
                }
            }
        }
        let attach = TcAttach::Tcx {
            attach_type: TcAttachType::Egress,
            order: LinkOrder::default(),
        };
        let id = prog
            .attach(c_name.as_c_str(), attach)
            .with_context(|| format!("cannot attach TCX egress to interface {ifname}"))?;
        let link: FdLink = prog.take_link(id)?.try_into().map_err(|e: LinkError| {
            anyhow!("interface {ifname}: TCX link is not a bpf_link: {e}")
        })?;
        link.pin(&pin)
            .with_context(|| format!("cannot pin the TCX link of {ifname} at {}", pin.display()))?;
        Ok(Attach::New)
    }

    /// Adds connections that exist now to the connection table, so that
    /// enforcement does not cut them. Existing entries are left as they are.
    pub fn seed_connections(&mut self, connections: &[Connection]) -> anyhow::Result<usize> {
        let mut table: HashMap<_, FlowKey, Flow> =
            HashMap::try_from(map_mut(&mut self.ebpf, maps::CONNTRACK)?)?;
        let now = monotonic_ns();
        let mut added = 0;
        for c in connections {
            let key = flow_key(c);
            if table.get(&key, 0).is_ok() {
                continue;
            }
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
            table
                .insert(&key, &flow, 0)
                .with_context(|| format!("seeding the connection table with {c:?}"))?;
            added += 1;
        }
        Ok(added)
    }
}

/// The two programs, for [`Dataplane::test_run`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Program {
    Ingress,
    Egress,
}

impl Dataplane {
    /// Runs one of the loaded programs on `packet` (see [`crate::testrun`]):
    /// with the live maps, so counters and the connection table change.
    pub fn test_run(
        &mut self,
        program: Program,
        packet: &[u8],
        repeat: u32,
    ) -> anyhow::Result<crate::testrun::Outcome> {
        use std::os::fd::AsFd as _;
        let fd = self.program_fd(program)?;
        Ok(crate::testrun::run(fd.as_fd(), packet, repeat)?)
    }

    /// A duplicate of a loaded program's fd, for running it from another
    /// thread with [`crate::testrun::run`].
    pub fn program_fd(&mut self, program: Program) -> anyhow::Result<std::os::fd::OwnedFd> {
        use std::os::fd::AsFd as _;
        let fd = match program {
            Program::Ingress => ingress(&mut self.ebpf, self.ingress_program)?
                .fd()?
                .as_fd()
                .try_clone_to_owned()?,
            Program::Egress => egress(&mut self.ebpf)?.fd()?.as_fd().try_clone_to_owned()?,
        };
        Ok(fd)
    }
}

/// Writes `values` into an array map from index 0 through a shared mapping
/// of the map's memory (the rule arrays are `BPF_F_MMAPABLE`): one memory
/// copy, where `BPF_MAP_UPDATE_BATCH` would still copy entry by entry in the
/// kernel (about 190 ns each on these machines: 130 ms for the IPv4 table of
/// 10k rules). Only idle generations are written, so no packet reads these
/// entries while they change. Entries past `values` need no clearing:
/// nothing refers to them.
fn write_array<V: aya::Pod>(map: &aya::maps::Map, values: &[V]) -> anyhow::Result<()> {
    use std::os::fd::AsFd as _;
    let aya::maps::Map::Array(data) = map else {
        bail!("not an array map");
    };
    let max = data.info()?.max_entries() as usize;
    ensure!(
        values.len() <= max,
        "{} entries do not fit in a map of {max}",
        values.len()
    );
    // The kernel stores array elements at their value size rounded up to 8.
    let stride = size_of::<V>().next_multiple_of(8);
    let Some(len) = std::num::NonZeroUsize::new(values.len() * stride) else {
        return Ok(());
    };
    use nix::sys::mman::{MapFlags, ProtFlags, mmap, munmap};
    // SAFETY: a new shared mapping of the first `len` bytes of the map's
    // memory, which holds `max >= values.len()` elements of `stride` bytes;
    // nothing else in this process refers to it.
    let base = unsafe {
        mmap(
            None,
            len,
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
            MapFlags::MAP_SHARED,
            data.fd().as_fd(),
            0,
        )
    }
    .context("mapping the array's memory")?;
    for (i, value) in values.iter().enumerate() {
        // SAFETY: element `i` lies inside the mapping (`i * stride + size_of
        // V <= len`), aligned (page-aligned base, `stride` a multiple of 8,
        // `V`'s alignment at most 8).
        unsafe { base.cast::<u8>().add(i * stride).cast::<V>().write(*value) };
    }
    // SAFETY: the mapping made above, with its length; not used after this.
    unsafe { munmap(base, len.get()) }.context("unmapping the array's memory")?;
    Ok(())
}

/// Zeroes the first `slots` entries of a per-CPU counter array with one
/// `BPF_MAP_UPDATE_BATCH` (a per-CPU array cannot be mapped), instead of a
/// system call per slot.
fn clear_counters(map: &aya::maps::Map, slots: usize) -> anyhow::Result<()> {
    use std::os::fd::AsFd as _;
    let aya::maps::Map::PerCpuArray(data) = map else {
        bail!("not a per-CPU array map");
    };
    // aya's count of possible CPUs, the one the kernel lays per-CPU values out by.
    let cpus = aya::util::nr_cpus()
        .map_err(|(_, e)| e)
        .context("reading the possible CPUs")?
        .get() as usize;
    // Per-CPU values are passed as one value per possible CPU, each rounded
    // up to 8 bytes.
    let zeros = vec![0u8; slots * cpus * size_of::<Counter>().next_multiple_of(8)];
    let keys: Vec<u32> = (0..slots as u32).collect();
    batch(
        crate::bpfsys::BPF_MAP_UPDATE_BATCH,
        data.fd().as_fd(),
        &keys,
        &zeros,
    )
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
    /// `bpf_attr.batch` (include/uapi/linux/bpf.h).
    #[repr(C)]
    struct Batch {
        in_batch: u64,
        out_batch: u64,
        keys: u64,
        values: u64,
        count: u32,
        map_fd: u32,
        elem_flags: u64,
        flags: u64,
    }
    if keys.is_empty() {
        return Ok(());
    }
    let mut attr = Batch {
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
    unsafe { crate::bpfsys::bpf(cmd, &mut attr) }
        .with_context(|| format!("batch command {cmd} on {} entries", keys.len()))?;
    ensure!(
        attr.count as usize == keys.len(),
        "batch command {cmd} did {} of {} entries",
        attr.count,
        keys.len()
    );
    Ok(())
}

/// The IPv6 prefixes of an image as the data path looks them up: shorter than /32
/// in the LPM trie, longer ones in a hash per (length, masked address) with,
/// per /32, the lengths present (longest first). A /32 with more distinct
/// lengths than a bucket lists keeps its prefixes in the trie instead.
struct V6Tables {
    /// LPM trie keys as the kernel reads them: the prefix length (counting
    /// the direction byte) in host order, then the `RuleKey6`.
    short: std::collections::HashMap<[u8; 21], u32>,
    prefixes: std::collections::HashMap<V6PrefixKey, u32>,
    buckets: std::collections::HashMap<V6BucketKey, V6Lengths>,
}

impl V6Tables {
    fn of(v6: &[(RuleKey6, u32, u32)]) -> V6Tables {
        use std::collections::{BTreeSet, HashMap};
        let bucket = |key: &RuleKey6| [key[0], key[1], key[2], key[3], key[4]];
        let mut lengths: HashMap<V6BucketKey, BTreeSet<u8>> = HashMap::new();
        for (key, len, _) in v6 {
            if len - 8 > V6_SHORT_MAX {
                lengths
                    .entry(bucket(key))
                    .or_default()
                    .insert((len - 8) as u8);
            }
        }
        let mut t = V6Tables {
            short: HashMap::new(),
            prefixes: HashMap::new(),
            buckets: HashMap::new(),
        };
        for (b, set) in &lengths {
            let mut list = [0u8; V6_BUCKET_LENGTHS];
            if set.len() > V6_BUCKET_LENGTHS {
                list[0] = V6_BUCKET_OVERFLOW;
            } else {
                for (slot, len) in list.iter_mut().zip(set.iter().rev()) {
                    *slot = *len;
                }
            }
            t.buckets.insert(*b, list);
        }
        for &(key, len, region) in v6 {
            let plen = len - 8;
            let overflow = t
                .buckets
                .get(&bucket(&key))
                .is_some_and(|l| l[0] == V6_BUCKET_OVERFLOW);
            if plen <= V6_SHORT_MAX || overflow {
                let mut k = [0u8; 21];
                k[..4].copy_from_slice(&len.to_ne_bytes());
                k[4..].copy_from_slice(&key);
                t.short.insert(k, region);
                continue;
            }
            let [_, addr @ ..] = key;
            let addr = u128::from_be_bytes(addr);
            let masked = addr & (u128::MAX << (128 - plen));
            let mut p = [0u8; 18];
            p[0] = key[0];
            p[1] = plen as u8;
            p[2..].copy_from_slice(&masked.to_be_bytes());
            t.prefixes.insert(p, region);
        }
        t
    }
}

/// Makes an idle hash map or LPM trie hold exactly `want`. `before` is what
/// this process last wrote there; without it the keys present are read from
/// the kernel. Stale keys go in one `BPF_MAP_DELETE_BATCH`, new and changed
/// entries in one `BPF_MAP_UPDATE_BATCH`.
fn write_keyed<K, V>(
    map: &aya::maps::Map,
    want: &std::collections::HashMap<K, V>,
    before: Option<&std::collections::HashMap<K, V>>,
) -> anyhow::Result<()>
where
    K: aya::Pod + Eq + std::hash::Hash,
    V: aya::Pod + PartialEq,
{
    let fd = map_fd(map)?;
    let present: Vec<K> = match before {
        Some(before) => before.keys().copied().collect(),
        None => keys::<K>(fd)?,
    };
    let stale: Vec<K> = present
        .into_iter()
        .filter(|k| !want.contains_key(k))
        .collect();
    batch(crate::bpfsys::BPF_MAP_DELETE_BATCH, fd, &stale, &[] as &[V])
        .context("removing stale entries")?;
    let (keys, values): (Vec<K>, Vec<V>) = want
        .iter()
        .filter(|(k, v)| before.is_none_or(|b| b.get(k) != Some(v)))
        .map(|(k, v)| (*k, *v))
        .unzip();
    batch(crate::bpfsys::BPF_MAP_UPDATE_BATCH, fd, &keys, &values).context("writing entries")
}

/// Every key of a map, read with `BPF_MAP_GET_NEXT_KEY`.
fn keys<K: aya::Pod>(fd: std::os::fd::BorrowedFd<'_>) -> anyhow::Result<Vec<K>> {
    use std::os::fd::AsRawFd as _;
    /// `bpf_attr` for the map element commands (include/uapi/linux/bpf.h).
    #[repr(C)]
    struct Elem {
        map_fd: u32,
        _pad: u32,
        key: u64,
        next_key: u64,
        flags: u64,
    }
    let mut keys: Vec<K> = Vec::new();
    let mut next = std::mem::MaybeUninit::<K>::uninit();
    loop {
        let mut attr = Elem {
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
        match unsafe { crate::bpfsys::bpf(crate::bpfsys::BPF_MAP_GET_NEXT_KEY, &mut attr) } {
            // SAFETY: the kernel wrote a whole key into `next`; `K` is Pod.
            Ok(_) => keys.push(unsafe { next.assume_init_read() }),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(keys),
            Err(e) => return Err(e).context("BPF_MAP_GET_NEXT_KEY"),
        }
    }
}

/// The file descriptor of a map of any of the kinds this module writes.
fn map_fd(map: &aya::maps::Map) -> anyhow::Result<std::os::fd::BorrowedFd<'_>> {
    use aya::maps::Map;
    use std::os::fd::AsFd as _;
    match map {
        Map::Array(data) | Map::PerCpuArray(data) | Map::HashMap(data) | Map::LpmTrie(data) => {
            Ok(data.fd().as_fd())
        }
        _ => bail!("unexpected kind of map"),
    }
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

/// `CLOCK_MONOTONIC`, the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    // CLOCK_MONOTONIC cannot fail on Linux; 0 would only age seeded flows.
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
        t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
    })
}

/// The map of generation `g` (0 or 1) among a pair of names.
fn generation(names: [&'static str; 2], g: usize) -> &'static str {
    let [zero, one] = names;
    if g & 1 == 0 { zero } else { one }
}

/// TCX arrived in Linux 6.6.
fn kernel_has_tcx() -> bool {
    aya::util::KernelVersion::current().is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 6, 0))
}

/// The clsact path: replace the program of our filter if it exists (an
/// earlier daemon's), create the qdisc and the filter otherwise. The filter
/// is left in the kernel when this process exits.
fn attach_clsact(prog: &mut SchedClassifier, ifname: &std::ffi::CStr) -> anyhow::Result<Attach> {
    let name = ifname.to_string_lossy();
    let parent: TcHandle = TcAttachType::Egress.into();
    let existing =
        SchedClassifierLink::attached(ifname, parent, CLSACT_PRIORITY, CLSACT_HANDLE, None)?;
    let (id, how) = match prog.attach_to_link(existing) {
        Ok(id) => (id, Attach::Adopted),
        Err(_) => {
            // No such filter yet; the qdisc may already exist.
            if let Err(e) = tc::qdisc_add_clsact(ifname) {
                let exists = matches!(&e, tc::TcError::NetlinkError(n) if n.raw_os_error() == Some(libc::EEXIST));
                if !exists {
                    return Err(e).with_context(|| format!("cannot add a clsact qdisc to {name}"));
                }
            }
            let attach = TcAttach::Netlink {
                parent,
                options: NlOptions {
                    priority: CLSACT_PRIORITY,
                    handle: CLSACT_HANDLE,
                    classid: None,
                },
            };
            let id = prog
                .attach(ifname, attach)
                .with_context(|| format!("cannot attach a clsact egress filter to {name}"))?;
            (id, Attach::New)
        }
    };
    // Dropping the link would delete the filter; it must outlive us.
    std::mem::forget(prog.take_link(id)?);
    Ok(how)
}

fn adopt(prog: &mut Xdp, pin: &Path) -> anyhow::Result<()> {
    let pinned = PinnedLink::from_pin(pin)?;
    let link = XdpLink::try_from(FdLink::from(pinned))?;
    let id = prog.attach_to_link(link)?;
    // Dropping our handle closes the fd; the pin keeps the link alive.
    drop(prog.take_link(id)?);
    Ok(())
}

fn egress(ebpf: &mut Ebpf) -> anyhow::Result<&mut SchedClassifier> {
    let prog = ebpf
        .program_mut(programs::EGRESS)
        .ok_or_else(|| anyhow!("program {} missing from the eBPF object", programs::EGRESS))?;
    Ok(prog.try_into()?)
}

fn ingress<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut Xdp> {
    let prog = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("program {name} missing from the eBPF object"))?;
    Ok(prog.try_into()?)
}

/// Loads the XDP program `choice` asks for; returns its name.
fn load_ingress(ebpf: &mut Ebpf, choice: XdpProgram) -> anyhow::Result<&'static str> {
    let load = |ebpf: &mut Ebpf, name: &'static str| -> anyhow::Result<&'static str> {
        ingress(ebpf, name)?
            .load()
            .with_context(|| format!("the kernel refused program {name}"))?;
        Ok(name)
    };
    match choice {
        XdpProgram::Frags => load(ebpf, programs::INGRESS),
        XdpProgram::SingleBuffer => load(ebpf, programs::INGRESS_SINGLE),
        XdpProgram::Auto => load(ebpf, programs::INGRESS).or_else(|e| {
            warn!(error = %format!("{e:#}"), "multi-buffer XDP refused (kernel before 5.18?); using the single-buffer program");
            load(ebpf, programs::INGRESS_SINGLE)
        }),
    }
}

fn map_mut<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut aya::maps::Map> {
    ebpf.map_mut(name)
        .ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))
}

/// Where this version's maps are pinned: one directory per map layout
/// version, so a daemon whose layouts differ from the pinned ones creates
/// fresh maps beside them instead of failing on, or misreading, the old.
pub fn maps_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join(format!("maps-v{}", portcullis_common::LAYOUT_VERSION))
}

/// Removes the maps of other layout versions, once this version's programs
/// run under every link (the old programs, and with them the last users of
/// the old maps, are gone). Returns the directories removed.
pub fn remove_old_layouts(pin_dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let current = maps_dir(pin_dir);
    let mut removed = Vec::new();
    for entry in fs::read_dir(pin_dir)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        if path != current && (name == "maps" || name.starts_with("maps-v")) {
            fs::remove_dir_all(&path)
                .with_context(|| format!("cannot remove {}", path.display()))?;
            removed.push(path);
        }
    }
    Ok(removed)
}

fn link_pin(pin_dir: &Path, kind: &str, ifname: &str) -> PathBuf {
    pin_dir.join("links").join(format!("{kind}-{ifname}"))
}

/// Refuses a pin directory that is not on a bpffs: pins elsewhere fail with
/// an obscure error, and a tmpfs would silently lose them.
fn ensure_bpffs(pin_dir: &Path) -> anyhow::Result<()> {
    const BPF_FS_MAGIC: i64 = 0xcafe4a11;
    let mut probe = pin_dir.to_path_buf();
    while !probe.exists() {
        if !probe.pop() {
            break;
        }
    }
    let stat = nix::sys::statfs::statfs(&probe)
        .with_context(|| format!("cannot stat {}", probe.display()))?;
    if stat.filesystem_type().0 as i64 != BPF_FS_MAGIC {
        bail!(
            "pin directory {} is not on a bpf file system ({} is not bpffs; mount one with `mount -t bpf bpf {}`)",
            pin_dir.display(),
            probe.display(),
            probe.display()
        );
    }
    Ok(())
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
        .map(|&reason| {
            let per_cpu = counters.get(&(reason as u32), 0)?;
            let sum = per_cpu.iter().fold(Counter::default(), |acc, c| Counter {
                packets: acc.packets + c.packets,
                bytes: acc.bytes + c.bytes,
            });
            Ok((reason, sum))
        })
        .collect()
}

/// Detaches the pinned link at `path` at once (`BPF_OBJ_GET`, then
/// `BPF_LINK_DETACH`), whoever else still holds it. aya 0.16 has no call
/// for this, and its `FdLink` does not lend its fd.
fn detach_pinned_link(path: &Path) -> std::io::Result<()> {
    use std::os::{
        fd::{FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    };
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        _pad: u32,
    }
    #[repr(C)]
    struct LinkDetach {
        link_fd: u32,
    }
    let cpath = CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    let get = ObjGet {
        pathname: cpath.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
        path_fd: 0,
        _pad: 0,
    };
    let mut get = get;
    // SAFETY: `get` is `bpf_attr.obj_get`, padding explicit and zero; its
    // pathname points to a NUL-terminated string that outlives the call.
    let fd = unsafe { crate::bpfsys::bpf(crate::bpfsys::BPF_OBJ_GET, &mut get) }?;
    // SAFETY: the kernel just returned this fd to us; we own it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let detach = LinkDetach {
        link_fd: std::os::fd::AsRawFd::as_raw_fd(&fd) as u32,
    };
    let mut detach = detach;
    // SAFETY: `detach` is `bpf_attr.link_detach`; the fd it names is open
    // for the duration of the call.
    unsafe { crate::bpfsys::bpf(crate::bpfsys::BPF_LINK_DETACH, &mut detach) }?;
    Ok(())
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

/// Removes every link and map pinned under `pin_dir`, which detaches the
/// programs, and our clsact filters on `interfaces`: the explicit way to stop.
pub fn detach_all(pin_dir: &Path, interfaces: &[String]) -> anyhow::Result<usize> {
    let mut removed = 0;
    for ifname in interfaces {
        let Ok(c_name) = CString::new(ifname.as_str()) else {
            continue;
        };
        match tc::qdisc_detach_program(
            c_name.as_c_str(),
            TcAttachType::Egress.into(),
            programs::EGRESS,
        ) {
            Ok(()) => {
                info!(interface = %ifname, "clsact egress filter removed");
                removed += 1;
            }
            Err(tc::TcError::IoError(e)) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => warn!(interface = %ifname, error = %e, "cannot check for a clsact filter"),
        }
    }
    let links = pin_dir.join("links");
    match fs::read_dir(&links) {
        Ok(entries) => {
            for entry in entries {
                let path = entry?.path();
                // Detach now (BPF_LINK_DETACH), not whenever the last reference
                // to the link happens to go: the caller is told it is done.
                if let Err(e) = detach_pinned_link(&path) {
                    warn!(link = %path.display(), error = %e, "BPF_LINK_DETACH failed; unpinning only");
                }
                fs::remove_file(&path)
                    .with_context(|| format!("cannot unpin {}", path.display()))?;
                info!(link = %path.display(), "detached");
                removed += 1;
            }
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot list {}", links.display())),
    }
    match fs::remove_dir_all(pin_dir) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot remove {}", pin_dir.display())),
    }
    Ok(removed)
}
