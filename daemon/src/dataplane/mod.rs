//! The data plane: everything that talks to the kernel about the eBPF side.
//! Load the eBPF object, attach it, pin it, adopt what an earlier daemon
//! pinned, and write the policy maps. By concern:
//!
//! - this module: load, and apply a compiled image (the generation switch);
//! - `programs`: verify and load the programs, or adopt the pinned ones;
//! - `attach`: attach, adopt, pin and detach links; the pin directories;
//! - `mapio`: raw map I/O (mapped arrays, batch writes, key walks);
//! - `clock`: the running kernel's tick, for the programs' clock;
//! - `counters`: the per-CPU counters, summed;
//! - `flows`: the connection table (seed, look up, cut);
//! - `deny`: the deny sets' tries, their admin exemption and counters;
//! - `fqdn`: destinations learned for FQDN egress rules (write, sweep);
//! - `volume`: egress volume per destination (read, idle entries deleted);
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
//! <pin_dir>/maps-vN/FLOW_CACHE4, FLOW_CACHE6, FLOW_CACHE_EPOCH
//!                                per CPU, flows whose replies passed (ingress); their epoch
//! <pin_dir>/maps-vN/INBOUND4, INBOUND6       inbound flows the rules admitted (for replies)
//! <pin_dir>/maps-vN/FRAGMENTS       fragmented packets whose first fragment passed
//! <pin_dir>/maps-vN/DHCP_REQUESTS   when this host last asked for a lease, per family
//! <pin_dir>/maps-vN/EVENTS          the drop-event ring buffer (read by `events`)
//! <pin_dir>/maps-vN/DENY_V4, DENY_V6 the deny sets' prefixes (set id, expiry)
//! <pin_dir>/maps-vN/DENY_EXEMPT_V4, DENY_EXEMPT_V6, DENY_STATS
//!                                the admin networks no ban applies to; drops per set
//! <pin_dir>/maps-vN/EGRESS_VOLUME, EGRESS_VOLUME_OVERFLOW
//!                                egress volume per destination; what found it full
//! <pin_dir>/maps-vN/FQDN_DEST       destinations the DNS forwarder learned for FQDN rules
//! <pin_dir>/maps-vN/DNS_UPSTREAM    the forwarder's upstreams (where its marked packets may go)
//! <pin_dir>/programs/<build>/portcullis_ingress[_single], portcullis_egress
//!                                the programs, adopted by a restart of the same
//!                                build over the same maps (`programs`)
//! <pin_dir>/links/xdp-<ifname>   the XDP link of one interface (on a fresh start
//!                                first the bootstrap filter's: `attach::Bootstrap`)
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
mod clock;
mod counters;
mod delta;
mod deny;
mod explain;
mod flows;
mod fqdn;
pub mod links;
mod mapio;
mod programs;
mod ratelimit;
pub mod sockets;
pub mod sys;
pub mod testrun;
mod volume;

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, anyhow};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, MapData},
    programs::{SchedClassifier, Xdp},
};
use portcullis_common::{
    CLOCK_OFFSET_GLOBAL, CLOCK_TICK_GLOBAL, SETTING_EGRESS_ALLOWLIST, SETTING_PING, Settings, maps,
};

use attach::ensure_bpffs;
pub use attach::{
    Attach, BOOTSTRAP, BOOTSTRAP_SINGLE, Bootstrap, BootstrapTags, bootstrap_interfaces,
    detach_all, maps_dir, remove_bootstraps, remove_old_layouts, repin_renamed_bootstraps,
};
pub use clock::Clock;
pub use counters::read_counters;
pub use deny::{DenyWrite, boottime_ns, covers};
pub use explain::Verdict;
pub use flows::{connections, flow_key, flow_remote};
pub use mapio::map_memory;
use mapio::{Held, clear_counters, write_array, write_array_clearing, write_keyed};
pub use ratelimit::RateBan;

use crate::{
    compile::{Image, Limits},
    model::{RateLimit, XdpProgram},
};

/// The compiled eBPF object, built by `build.rs`.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/portcullis"));

/// The loaded eBPF object with its maps pinned under `pin_dir/maps-vN`.
pub struct Dataplane {
    ebpf: Ebpf,
    /// The ingress and egress programs, loaded or adopted.
    programs: programs::Programs,
    pin_dir: PathBuf,
    /// Audit/open mode: pass what would be dropped (counted). Takes effect
    /// with the next `apply`.
    pub pass_all: bool,
    /// Count egress volume per destination. Takes effect with the next
    /// `apply`.
    pub egress_volume: bool,
    /// What this process last wrote to each generation (`None` until the
    /// first write, and after a failed one): the IPv6 tables, so an update
    /// writes only what changed and knows the stale keys without reading
    /// them back (that walks every bucket of the hash maps, a million at
    /// 600k prefixes: milliseconds, however few they hold); the IPv4 root's
    /// length, so only what an earlier root wrote past it is zeroed.
    written: [Option<Written>; 2],
    /// When `ACTIVE` last switched: the generation it left may still be
    /// read by packets in flight until [`SETTLE`] has passed.
    switched: Option<std::time::Instant>,
    /// `[rate_limit]`: the default limit on new inbound flows per source,
    /// written with each generation (entry 0 of `RATE_LIMITS_g`).
    pub rate_limit: Option<RateLimit>,
    /// How the maps were sized, so the explain instances load alike.
    params: LoadParams,
    /// The explain instances (`explain.rs`), loaded on first use.
    explainer: explain::Explainers,
}

/// What the loader needs to size the maps as the pinned ones are.
#[derive(Clone, Copy)]
struct LoadParams {
    conntrack_entries: u32,
    limits: Limits,
    deny: [u32; 2],
    /// The programs' clock (`clock.rs`), probed once per process so the
    /// explain instances read the live programs' time.
    clock: Clock,
}

impl LoadParams {
    /// A loader that reuses the maps pinned under `maps_dir`, sized alike.
    fn loader<'a>(&'a self, maps_dir: &'a Path) -> EbpfLoader<'a> {
        let mut loader = EbpfLoader::new();
        loader
            .override_global(CLOCK_TICK_GLOBAL, &self.clock.tick_ns, true)
            .override_global(CLOCK_OFFSET_GLOBAL, &self.clock.offset_ns, true)
            .default_map_pin_directory(maps_dir)
            .map_max_entries(maps::CONNTRACK4, self.conntrack_entries)
            .map_max_entries(maps::CONNTRACK6, self.conntrack_entries)
            .map_max_entries(maps::DENY_V4, self.deny[0])
            .map_max_entries(maps::DENY_V6, self.deny[1]);
        let limits = &self.limits;
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
                .map_max_entries(generation(maps::RULE_STATS, g), limits.slots)
                .map_max_entries(generation(maps::RATE_LIMITS, g), limits.slots);
        }
        loader
    }
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
        let params = LoadParams {
            conntrack_entries,
            limits: *limits,
            deny,
            clock: Clock::probe(),
        };
        let mut ebpf = params
            .loader(&maps_dir)
            .load(EBPF_OBJECT)
            .with_context(|| {
                format!(
                    "cannot load the eBPF programs (maps pinned under {})",
                    maps_dir.display()
                )
            })?;
        let programs = programs::obtain(&mut ebpf, EBPF_OBJECT, pin_dir, &maps_dir, xdp)?;
        Ok(Self {
            ebpf,
            programs,
            pin_dir: pin_dir.to_owned(),
            pass_all: false,
            egress_volume: false,
            written: [None, None],
            // As if switched now: a previous process may have switched a
            // moment ago (a restart takes milliseconds, but need not).
            switched: Some(std::time::Instant::now()),
            params,
            explainer: explain::Explainers::default(),
            rate_limit: None,
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

    /// The clock the programs this process loaded read (adopted programs
    /// keep the one they were loaded with: the same, to a tick).
    pub fn clock(&self) -> Clock {
        self.params.clock
    }

    /// The XDP program variant loaded.
    pub fn ingress_program(&self) -> &'static str {
        self.programs.ingress_name
    }

    /// Whether the programs were adopted from an earlier daemon's pins
    /// (same build, same maps) rather than verified by this start.
    pub fn programs_adopted(&self) -> bool {
        self.programs.adopted
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
        let idle = self.write_idle(image, allow_ping)?;
        self.switch_to(idle)?;
        Ok(idle)
    }

    /// The first half of [`Dataplane::apply`]: writes `image` into the idle
    /// generation, which no packet reads, and returns it. Nothing changes
    /// for traffic until [`Dataplane::switch_to`] that generation.
    pub fn write_idle(&mut self, image: &Image, allow_ping: bool) -> anyhow::Result<u32> {
        let live = self.active()?;
        let idle = (1 - live) as usize;
        // A packet that read `ACTIVE` before the last switch may still be
        // walking the generation about to be rewritten: wait out what is
        // left of the settle time (nothing, unless changes come faster).
        if let Some(left) = self
            .switched
            .and_then(|at| SETTLE.checked_sub(at.elapsed()))
        {
            std::thread::sleep(left);
        }
        self.write_generation(idle, image, allow_ping)
            .with_context(|| format!("writing rule generation {idle}"))?;
        Ok(idle as u32)
    }

    /// The second half of [`Dataplane::apply`]: makes generation `g`,
    /// written by [`Dataplane::write_idle`], the live one (one map write).
    pub fn switch_to(&mut self, g: u32) -> anyhow::Result<()> {
        let mut active: Array<_, u32> = Array::try_from(map_mut(&mut self.ebpf, maps::ACTIVE)?)?;
        active.set(0, &(g & 1), 0).context("switching ACTIVE")?;
        self.switched = Some(std::time::Instant::now());
        Ok(())
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
        // A stripped image holds no rules: writing it would empty the maps.
        anyhow::ensure!(
            !image.stripped || image.delta.is_some(),
            "refusing to write a stripped image of rules {} (the core keeps only its index)",
            image.hash
        );
        let flags = settings_flags(
            self.pass_all,
            allow_ping,
            image.egress_allowlist,
            self.egress_volume,
        ) | dns_guard_flag(image);
        write_if_dirs(&mut self.ebpf, g, &image.if_classes)
            .context("writing the interfaces' rule lists (IFDIR)")?;
        if let Some(delta) = &image.delta {
            // Forgotten unless the write succeeds: the next write then
            // reads the idle generation's IPv6 maps back from the kernel.
            let (kept, result) = match self.write_delta(g, image, delta, flags) {
                Ok(written) => (Some(written), Ok(())),
                Err(e) => (None, Err(e)),
            };
            if let Some(slot) = self.written.get_mut(g) {
                *slot = kept;
            }
            return result;
        }
        // Forgotten until the writes succeed: after a failure, the next write
        // reads the keys from the kernel.
        let before = self.written.get_mut(g).and_then(Option::take);
        let rate_limits = self.rate_limits(image);
        let written = write_image(
            &mut self.ebpf,
            g,
            image,
            flags,
            before.as_ref(),
            Some(&rate_limits),
        )?;
        // A set whose hash tables are too large to keep: the other
        // generation's kept tables go too (only their digests stay), so a
        // large set costs no more memory for the small set it replaced.
        // The trie stays: it is read back key by key.
        if (written.prefixes.is_digest() || written.buckets.is_digest())
            && let Some(Some(other)) = self.written.get_mut(g ^ 1)
        {
            other.prefixes = std::mem::take(&mut other.prefixes).forget_entries();
            other.buckets = std::mem::take(&mut other.buckets).forget_entries();
        }
        if let Some(w) = self.written.get_mut(g) {
            *w = Some(written);
        }
        Ok(())
    }

    /// A link appeared: the live generation's `IFDIR` entries again, so a
    /// rule of `image` (the live one) naming it applies before it is
    /// enforced.
    pub fn refresh_if_dirs(&mut self, image: &Image) -> anyhow::Result<()> {
        let live = self.active()? as usize;
        write_if_dirs(&mut self.ebpf, live, &image.if_classes)
    }
}

/// Writes generation `g`'s entries of `IFDIR`: the ifindex of each
/// interface in `names` that exists now -> `ingress_dir(i + 1)`; the
/// generation's other entries are removed (the other generation's kept).
fn write_if_dirs(ebpf: &mut Ebpf, g: usize, names: &[String]) -> anyhow::Result<()> {
    let mut map: aya::maps::HashMap<_, u64, u32> =
        aya::maps::HashMap::try_from(map_mut(ebpf, maps::IFDIR)?)?;
    let mut want: Vec<(u64, u32)> = Vec::new();
    for (n, class) in names.iter().zip(1u32..) {
        // Absent (ENODEV): its rules apply once it appears and is
        // protected (`Core::protect` writes its entry). Any other failure
        // is an error, not a silently missing entry.
        let ifindex = match nix::net::if_::if_nametoindex(n.as_str()) {
            Ok(i) => i,
            Err(nix::errno::Errno::ENODEV) => continue,
            Err(e) => return Err(e).with_context(|| format!("interface {n:?}: its index")),
        };
        let key = ((g as u64) << 32) | u64::from(ifindex);
        want.push((key, u32::from(portcullis_common::ingress_dir(class))));
    }
    let stale: Vec<u64> = map
        .keys()
        .filter_map(Result::ok)
        .filter(|k| k >> 32 == g as u64 && !want.iter().any(|(w, _)| w == k))
        .collect();
    for k in stale {
        map.remove(&k)
            .with_context(|| format!("removing IFDIR entry {k:#x}"))?;
    }
    for (key, dir) in want {
        map.insert(&key, &dir, 0)
            .with_context(|| format!("writing IFDIR entry {key:#x}"))?;
    }
    Ok(())
}

/// The DNS guard's flag for `image` (FQDN egress rules exist).
fn dns_guard_flag(image: &Image) -> u32 {
    if image.dns_guard {
        portcullis_common::SETTING_DNS_GUARD
    } else {
        0
    }
}

/// The settings flags that let the ingress path skip a lookup, from what
/// is true once generation `image` is written: `SETTING_NO_IF_RULES` when
/// no rule names an interface (its `IFDIR` entries are written from the same
/// `if_classes`), `SETTING_NO_SRC6` when its `SRC6_g` is empty (written from
/// `v6_tables.short`), `SETTING_NO_DENY` when the kernel's deny tries hold
/// no entry (`deny_write` clears it before it adds one).
fn skip_flags(ebpf: &mut Ebpf, image: &Image, short_empty: bool) -> anyhow::Result<u32> {
    let mut flags = 0;
    if image.if_classes.is_empty() {
        flags |= portcullis_common::SETTING_NO_IF_RULES;
    }
    if short_empty {
        flags |= portcullis_common::SETTING_NO_SRC6;
    }
    if deny::tries_empty(ebpf)? {
        flags |= portcullis_common::SETTING_NO_DENY;
    }
    Ok(flags)
}

/// The `Settings` flags of a generation.
fn settings_flags(
    pass_all: bool,
    allow_ping: bool,
    egress_allowlist: bool,
    egress_volume: bool,
) -> u32 {
    let mut flags = 0;
    if egress_volume {
        flags |= portcullis_common::SETTING_EGRESS_VOLUME;
    }
    if pass_all {
        flags |= portcullis_common::SETTING_PASS_ALL;
    }
    if allow_ping {
        flags |= SETTING_PING;
    }
    if egress_allowlist {
        flags |= SETTING_EGRESS_ALLOWLIST;
    }
    flags
}

/// How long a packet may still read the generation `ACTIVE` just left (an
/// XDP or TC run is microseconds; this is a wide margin).
const SETTLE: std::time::Duration = std::time::Duration::from_millis(2);

/// Writes `image` into generation `g` of `ebpf`'s rule maps and its
/// `SETTINGS[g]`; `before` is what this process last wrote there (the IPv6
/// keys to remove, the root's length), `None` to read the keys from the
/// kernel and zero the whole root past the image's. Returns what it wrote.
fn write_image(
    ebpf: &mut Ebpf,
    g: usize,
    image: &Image,
    flags: u32,
    before: Option<&Written>,
    rate_limits: Option<&[portcullis_common::RateLimit]>,
) -> anyhow::Result<Written> {
    // The root's entries past the image's are read too: those an earlier,
    // longer root wrote are zeroed (all of them when unknown).
    write_array_clearing(
        map_mut(ebpf, generation(maps::V4_ROOT, g))?,
        &image.v4_root,
        before.map_or(usize::MAX, |b| b.v4_root),
    )
    .context("writing the IPv4 table root")?;
    write_array(
        map_mut(ebpf, generation(maps::V4_CHUNKS, g))?,
        &image.v4_chunks,
    )
    .context("writing the IPv4 table chunks")?;
    let v6 = &image.v6_tables;
    let (prefixes, buckets) = write_v6_hashes(ebpf, g, v6, before)?;
    let written = Written {
        rules: (image.hash.clone(), crate::compile::Extent::of(image)),
        v4_root: image.v4_root.len(),
        short: write_short(ebpf, g, v6, before)?,
        prefixes,
        buckets,
    };
    write_array(map_mut(ebpf, generation(maps::REGIONS, g))?, &image.regions)
        .context("writing the regions")?;
    write_array(
        map_mut(ebpf, generation(maps::SEGMENTS, g))?,
        &image.segments,
    )
    .context("writing the port segments")?;
    let short_empty = image.v6_tables.short.is_empty();
    write_generation_rest(ebpf, g, image, flags, short_empty, rate_limits)?;
    Ok(written)
}

/// What a generation holds besides its rule tables: its rule counters
/// cleared, its rate limits (`None`: an explain instance's scratch maps)
/// and `SETTINGS[g]` (`short_empty`: its `SRC6_g` is empty).
fn write_generation_rest(
    ebpf: &mut Ebpf,
    g: usize,
    image: &Image,
    flags: u32,
    short_empty: bool,
    rate_limits: Option<&[portcullis_common::RateLimit]>,
) -> anyhow::Result<()> {
    clear_counters(
        map_mut(ebpf, generation(maps::RULE_STATS, g))?,
        image.slots.len(),
    )
    .context("clearing rule counters")?;
    // `None`: an explain instance's scratch maps, which have no limits of
    // their own (its `RATE_LIMITS_g` are the live ones: never written here).
    if let Some(limits) = rate_limits {
        write_array(map_mut(ebpf, generation(maps::RATE_LIMITS, g))?, limits)
            .context("writing the rate limits")?;
    }
    let flags = flags | skip_flags(ebpf, image, short_empty)?;
    let mut settings: Array<_, Settings> = Array::try_from(map_mut(ebpf, maps::SETTINGS)?)?;
    settings
        .set(
            g as u32,
            &Settings {
                flags,
                ingress_dir: u32::from(if image.if_classes.is_empty() {
                    portcullis_common::DIR_INGRESS
                } else {
                    portcullis_common::ingress_dir(0)
                }),
            },
            0,
        )
        .context("writing SETTINGS")?;
    Ok(())
}

/// Writes generation `g`'s IPv6 trie (prefixes shorter than /32, and /32s
/// with too many lengths), kept whole: it is small, and read back key by
/// key. What it holds now.
fn write_short(
    ebpf: &Ebpf,
    g: usize,
    v6: &crate::compile::V6Tables,
    before: Option<&Written>,
) -> anyhow::Result<Held<[u8; 21], u32>> {
    write_keyed(
        map_ref(ebpf, generation(maps::SRC6, g))?,
        &v6.short,
        before.map_or(&Held::Unknown, |b| &b.short),
        usize::MAX,
    )
    .context("writing the IPv6 short prefixes (LPM trie)")
}

/// Writes generation `g`'s two IPv6 hashes on two threads (the kernel's
/// inserts are most of a large set's write, 250k at 100k rules, and take
/// per-bucket locks); what each now holds (see [`Held`]).
fn write_v6_hashes(
    ebpf: &Ebpf,
    g: usize,
    v6: &crate::compile::V6Tables,
    before: Option<&Written>,
) -> anyhow::Result<(
    Held<portcullis_common::V6PrefixKey, u32>,
    Held<portcullis_common::V6BucketKey, portcullis_common::V6Lengths>,
)> {
    let (prefixes, buckets) = crate::parallel::both_over(
        v6.prefixes.len() + v6.buckets.len(),
        "write",
        || {
            write_keyed(
                map_ref(ebpf, generation(maps::V6_PREFIXES, g))?,
                &v6.prefixes,
                before.map_or(&Held::Unknown, |b| &b.prefixes),
                V6_KEEP,
            )
            .context("writing the IPv6 prefixes")
        },
        || {
            write_keyed(
                map_ref(ebpf, generation(maps::V6_BUCKETS, g))?,
                &v6.buckets,
                before.map_or(&Held::Unknown, |b| &b.buckets),
                V6_KEEP,
            )
            .context("writing the IPv6 /32 buckets")
        },
    );
    Ok((prefixes?, buckets?))
}

/// What one generation's maps were last written with, where the next write
/// needs it: the length of the IPv4 table's root, and the IPv6 tables (see
/// [`crate::compile::V6Tables`]): their entries, or only their digest when
/// too large to keep (see `mapio::write_keyed`).
#[derive(Default)]
struct Written {
    /// The hash of the rules written and how much of the arrays they
    /// fill: what a [`crate::compile::Delta`] over this generation starts
    /// from.
    rules: (String, crate::compile::Extent),
    v4_root: usize,
    short: Held<[u8; 21], u32>,
    prefixes: Held<portcullis_common::V6PrefixKey, u32>,
    buckets: Held<portcullis_common::V6BucketKey, portcullis_common::V6Lengths>,
}

/// Hash tables of at most this many entries are kept after a write (see
/// `mapio::write_keyed`): the tables of sets up to about 10k rules (13.4k
/// entries each for the benchmark's 10k), at most 600 KB per generation.
/// Reading them back instead costs two walks of every bucket, about 17 ms
/// of a 10k-rule replace at the benchmark's capacity.
pub(super) const V6_KEEP: usize = 16384;

impl Dataplane {
    /// `RATE_LIMITS_g` for `image`: entry 0 the default, then each slot's
    /// own limit (zero: none).
    fn rate_limits(&self, image: &Image) -> Vec<portcullis_common::RateLimit> {
        let mut out: Vec<_> = image
            .slots
            .iter()
            .map(|s| s.limit.copied().unwrap_or_default())
            .collect();
        if let (Some(first), Some(default)) = (out.first_mut(), &self.rate_limit) {
            *first = default.default_entry();
        }
        out
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
            Program::Ingress => self.programs.ingress.fd()?.as_fd().try_clone_to_owned()?,
            Program::Egress => self.programs.egress.fd()?.as_fd().try_clone_to_owned()?,
        };
        Ok(fd)
    }
}

/// The map of generation `g` (0 or 1) among a pair of names.
fn generation(names: [&'static str; 2], g: usize) -> &'static str {
    let [zero, one] = names;
    if g & 1 == 0 { zero } else { one }
}

/// The egress program of `ebpf` (an explain instance's).
fn egress(ebpf: &mut Ebpf) -> anyhow::Result<&mut SchedClassifier> {
    let prog = ebpf
        .program_mut(portcullis_common::programs::EGRESS)
        .ok_or_else(|| {
            anyhow!(
                "program {} missing from the eBPF object",
                portcullis_common::programs::EGRESS
            )
        })?;
    Ok(prog.try_into()?)
}

/// The XDP program `name` of `ebpf` (an explain instance's).
fn ingress<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut Xdp> {
    let prog = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("program {name} missing from the eBPF object"))?;
    Ok(prog.try_into()?)
}

fn map_ref<'a>(ebpf: &'a Ebpf, name: &str) -> anyhow::Result<&'a aya::maps::Map> {
    ebpf.map(name)
        .ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))
}

fn map_mut<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut aya::maps::Map> {
    ebpf.map_mut(name)
        .ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))
}
