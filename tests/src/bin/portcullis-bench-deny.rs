//! Deny sets at scale (issue 18): load time of N IPv4 + N IPv6 prefixes
//! through the core (model, saved set file, trie writes), the tries' kernel
//! memory, the latency of a single add, and the per-packet cost of the
//! ingress program with the loaded tries against a data path with none,
//! measured in the same run with `BPF_PROG_TEST_RUN`, runs interleaved.
//!
//! `PORTCULLIS_BENCH_DENY_PREFIXES` sets N (default 1,048,576). Separate from
//! `portcullis-bench` so the two can be run (and changed) apart.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsFd as _,
    time::Instant,
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use portcullis::{
    compile::Limits,
    core::Core,
    dataplane::{self, Dataplane},
    denylist::Entry,
    model::XdpProgram,
    rules::RuleSet,
    state::Store,
    testrun,
};
use portcullis_tests::{PinDir, is_root, packet::*};
use rand::{RngExt as _, SeedableRng, rngs::StdRng};

const PACKETS: usize = 2048;
const REPEAT: u32 = 50;
const RUNS: usize = 5;

fn rules() -> RuleSet {
    serde_json::from_str(
        r#"{"ingress_rules":[{"id":"app","from_port":8080,"to_port":8080,"ip_ranges":[]}]}"#,
    )
    .expect("rule set")
}

/// N random IPv4 prefixes (/16 to /32) and N IPv6 ones (/32 to /128), in
/// the public-looking ranges a blocklist holds (not 10/8 or fd00::/8,
/// where the benchmark's packets come from).
fn prefixes(n: usize, rng: &mut StdRng) -> Vec<Entry> {
    let mut out = Vec::with_capacity(2 * n);
    for _ in 0..n {
        let len = rng.random_range(16..=32u8);
        let a = Ipv4Addr::from(rng.random_range(0x2000_0000u32..0xdf00_0000));
        let net = Ipv4Net::new(a, len).expect("length").trunc();
        out.push(Entry {
            prefix: IpNet::V4(net),
            expires: None,
        });
    }
    for _ in 0..n {
        let len = rng.random_range(32..=128u8);
        let a = Ipv6Addr::from(0x2000u128 << 112 | rng.random::<u128>() >> 4);
        let net = Ipv6Net::new(a, len).expect("length").trunc();
        out.push(Entry {
            prefix: IpNet::V6(net),
            expires: None,
        });
    }
    out.sort_by_key(|e| e.prefix);
    out.dedup_by_key(|e| e.prefix);
    out
}

/// New TCP connections to the admitted port from random sources, half of
/// them banned (inside a loaded prefix) and half not: (banned, frame).
fn packets(banned: &[Entry], rng: &mut StdRng) -> Vec<(bool, Vec<u8>)> {
    (0..PACKETS)
        .map(|i| {
            let v6 = i % 2 == 1;
            let hit = i % 4 < 2;
            let src: IpAddr = if hit {
                let family: Vec<&Entry> = banned
                    .iter()
                    .filter(|e| matches!(e.prefix, IpNet::V6(_)) == v6)
                    .take(100_000)
                    .collect();
                let e = family[rng.random_range(0..family.len())];
                e.prefix.network()
            } else if v6 {
                IpAddr::V6(Ipv6Addr::from(
                    0xfd00u128 << 112 | rng.random::<u64>() as u128,
                ))
            } else {
                IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | rng.random::<u32>() >> 8))
            };
            let dst = if v6 { "fd00:200::1" } else { "10.200.0.1" };
            let frame = Pkt::new(&src.to_string(), dst)
                .tcp(40000 + (i % 1000) as u16, 8080, SYN)
                .bytes();
            (hit, frame)
        })
        .collect()
}

fn ns_per_packet(fd: std::os::fd::BorrowedFd<'_>, pkts: &[(bool, Vec<u8>)]) -> f64 {
    let total: u64 = pkts
        .iter()
        .map(|(_, f)| testrun::run(fd, f, REPEAT).expect("test run").duration_ns as u64)
        .sum();
    total as f64 / pkts.len() as f64
}

fn slab_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("Slab:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn core_on(pins: &PinDir, state: &std::path::Path, capacity: u32) -> anyhow::Result<Core> {
    let limits = Limits::default();
    let dp = Dataplane::load_with_deny(
        pins.path(),
        65536,
        &limits,
        XdpProgram::Auto,
        [capacity, capacity],
    )?;
    Core::start(dp, Store::new(state), limits, false, rules(), 1, Vec::new())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    anyhow::ensure!(
        is_root(),
        "the benchmark loads eBPF programs: run it as root"
    );
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)?;
    let ip = |args: &[&str]| portcullis_tests::run(std::process::Command::new("ip").args(args));
    for (a, b) in [("none0", "none1"), ("deny0", "deny1")] {
        ip(&["link", "add", a, "type", "veth", "peer", "name", b])?;
        ip(&["link", "set", a, "up"])?;
        ip(&["link", "set", b, "up"])?;
    }
    let n: usize = std::env::var("PORTCULLIS_BENCH_DENY_PREFIXES")
        .ok()
        .map(|v| v.parse())
        .transpose()?
        .unwrap_or(1 << 20);
    let mut rng = StdRng::seed_from_u64(0xde1);
    let entries = prefixes(n, &mut rng);
    let v4 = entries
        .iter()
        .filter(|e| matches!(e.prefix, IpNet::V4(_)))
        .count();
    println!(
        "deny sets: {v4} IPv4 + {} IPv6 distinct prefixes",
        entries.len() - v4
    );

    let (pins_none, state_none) = (PinDir::new()?, tempfile::tempdir()?);
    let mut none = core_on(&pins_none, state_none.path(), n as u32 + 1024)?;
    let (pins_deny, state_deny) = (PinDir::new()?, tempfile::tempdir()?);
    let mut deny = core_on(&pins_deny, state_deny.path(), n as u32 + 1024)?;
    none.enforce_on("none0")?;
    deny.enforce_on("deny0")?;

    let slab0 = slab_kib();
    let started = Instant::now();
    let changed = deny
        .deny_replace("bench", &entries)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let load_s = started.elapsed().as_secs_f64();
    let slab_mib = slab_kib().saturating_sub(slab0) as f64 / 1024.0;
    let memlock: u64 = dataplane::map_memory(pins_deny.path())?
        .iter()
        .filter(|(name, _)| name.starts_with("DENY_"))
        .map(|(_, b)| b)
        .sum();
    println!(
        "load (core: model, saved file, trie writes): {:.2} s for {} entries",
        load_s, changed.entries
    );
    println!(
        "memory: tries' memlock {:.1} MiB; kernel slab grew {:.1} MiB",
        memlock as f64 / (1 << 20) as f64,
        slab_mib
    );

    // Single adds: into a small set beside the loaded ones, and into the
    // loaded set itself (its file is rewritten).
    let mut small = Vec::new();
    let mut big = Vec::new();
    for i in 0..20u32 {
        let one = |k: u32| Entry {
            prefix: IpNet::V4(Ipv4Net::new(Ipv4Addr::from(0xc633_6400 + k), 32).expect("/32")),
            expires: Some(portcullis::model::unix_now() + 3600),
        };
        let t = Instant::now();
        deny.deny_add("small", &[one(i)])
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        small.push(t.elapsed().as_secs_f64() * 1e3);
        if i < 5 {
            let t = Instant::now();
            deny.deny_add("bench", &[one(100 + i)])
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            big.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    println!(
        "single add: {:.2} ms median into a small set; {:.2} ms median into the {}-entry set",
        median(small),
        median(big),
        changed.entries
    );

    let pkts = packets(&entries, &mut rng);
    let fd_none = pins_none_program(&mut none)?;
    let fd_deny = pins_none_program(&mut deny)?;
    let (mut a, mut b, mut hit, mut miss) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let misses: Vec<_> = pkts.iter().filter(|(h, _)| !h).cloned().collect();
    let hits: Vec<_> = pkts.iter().filter(|(h, _)| *h).cloned().collect();
    for _ in 0..RUNS {
        a.push(ns_per_packet(fd_none.as_fd(), &pkts));
        b.push(ns_per_packet(fd_deny.as_fd(), &pkts));
        miss.push(
            ns_per_packet(fd_deny.as_fd(), &misses) / ns_per_packet(fd_none.as_fd(), &misses),
        );
        hit.push(ns_per_packet(fd_deny.as_fd(), &hits));
    }
    let (a, b) = (median(a), median(b));
    println!(
        "per packet (BPF_PROG_TEST_RUN, {PACKETS} new TCP connections x {REPEAT}, median of {RUNS}): \
         no deny sets {a:.1} ns; with them {b:.1} ns ({:.2}x); sources not banned {:.2}x; banned ones (dropped) {:.1} ns",
        b / a,
        median(miss),
        median(hit)
    );
    Ok(())
}

fn pins_none_program(core: &mut Core) -> anyhow::Result<std::os::fd::OwnedFd> {
    core.ingress_program_fd()
}
