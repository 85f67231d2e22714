//! The data plane: everything that talks to the kernel about the eBPF side.
//! Load the eBPF object, attach it, pin it, adopt what an earlier daemon
//! pinned, and write the policy maps. By concern:
//!
//! - this module: load, and apply a compiled image (the generation switch);
//! - `attach`: attach, adopt, pin and detach links; the pin directories;
//! - `mapio`: raw map I/O (mapped arrays, batch writes, key walks);
//! - `counters`: the per-CPU counters, summed;
//! - `flows`: the connection table (seed, look up, cut);
//! - `deny`: the deny sets' tries, their admin exemption and counters;
//! - [`sys`]: the one `bpf(2)` wrapper and the `bpf_attr` layouts it takes;
//! - [`testrun`]: `BPF_PROG_TEST_RUN` on a crafted packet;
//! - [`sockets`]: the kernel's open connections (`sock_diag`);
//! - [`links`]: the host's links and their events (rtnetlink).
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
//! <pin_dir>/maps-vN/CONNTRACK4, CONNTRACK6   flows this host opened, per family
//! <pin_dir>/maps-vN/INBOUND4, INBOUND6       inbound flows the rules admitted (for replies)
//! <pin_dir>/maps-vN/FRAGMENTS       fragmented packets whose first fragment passed
//! <pin_dir>/maps-vN/DHCP_REQUESTS   when this host last asked for a lease, per family
//! <pin_dir>/maps-vN/EVENTS          the drop-event ring buffer (read by `events`)
//! <pin_dir>/maps-vN/DENY_V4, DENY_V6 the deny sets' prefixes (set id, expiry)
//! <pin_dir>/maps-vN/DENY_EXEMPT_V4, DENY_EXEMPT_V6, DENY_STATS
//!                                the admin networks no ban applies to; drops per set
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

mod attach;
mod counters;
mod deny;
mod flows;
pub mod links;
mod mapio;
pub mod sockets;
pub mod sys;
pub mod testrun;

use std::{
    fs,
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{Context as _, anyhow};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, MapData},
    programs::{SchedClassifier, Xdp},
};
use portcullis_common::{SETTING_EGRESS_ALLOWLIST, SETTING_PING, Settings, maps, programs};
use tracing::warn;

use attach::ensure_bpffs;
pub use attach::{Attach, detach_all, maps_dir, remove_old_layouts};
pub use counters::read_counters;
pub use deny::{DenyWrite, boottime_ns, covers};
pub use flows::{connections, flow_key, flow_remote};
pub use mapio::map_memory;
use mapio::{clear_counters, write_array, write_keyed};

use crate::{
    compile::{Image, Limits, V6Tables},
    model::XdpProgram,
};

/// The compiled eBPF object, built by `build.rs`.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/portcullis"));

/// The loaded eBPF object with its maps pinned under `pin_dir/maps-vN`.
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
    v6_written: [Option<Arc<V6Tables>>; 2],
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
        let deny = portcullis_common::DEFAULT_DENY_PREFIXES;
        Self::load_with_deny(pin_dir, conntrack_entries, limits, xdp, [deny, deny])
    }

    /// [`Dataplane::load_with`] with the deny tries' capacities (IPv4, IPv6).
    pub fn load_with_deny(
        pin_dir: &Path,
        conntrack_entries: u32,
        limits: &Limits,
        xdp: XdpProgram,
        deny: [u32; 2],
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
            .map_max_entries(maps::CONNTRACK4, conntrack_entries)
            .map_max_entries(maps::CONNTRACK6, conntrack_entries)
            .map_max_entries(maps::DENY_V4, deny[0])
            .map_max_entries(maps::DENY_V6, deny[1]);
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
        let v6 = Arc::clone(&image.v6_tables);
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
}

/// The two programs, for [`Dataplane::test_run`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Program {
    Ingress,
    Egress,
}

impl Dataplane {
    /// Runs one of the loaded programs on `packet` (see [`testrun`]):
    /// with the live maps, so counters and the connection table change.
    pub fn test_run(
        &mut self,
        program: Program,
        packet: &[u8],
        repeat: u32,
    ) -> anyhow::Result<testrun::Outcome> {
        use std::os::fd::AsFd as _;
        let fd = self.program_fd(program)?;
        Ok(testrun::run(fd.as_fd(), packet, repeat)?)
    }

    /// A duplicate of a loaded program's fd, for running it from another
    /// thread with [`testrun::run`].
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

/// The map of generation `g` (0 or 1) among a pair of names.
fn generation(names: [&'static str; 2], g: usize) -> &'static str {
    let [zero, one] = names;
    if g & 1 == 0 { zero } else { one }
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
