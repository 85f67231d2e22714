//! `cargo xtask bench`: the rule engine's cost per packet as the rule set
//! grows, measured in the kernel with `BPF_PROG_TEST_RUN`, plus compile
//! time, time to make a rule set live, and kernel map memory.
//!
//! Rule-set shape (seeded, so every run measures the same sets): N rules,
//! each with 1 to 4 source prefixes of mixed lengths (/8 to /32 for IPv4,
//! /32 to /128 for IPv6) and a range of 1 to 1000 ports (TCP and UDP), plus
//! 1000 cluster peers. Packets: many different sources and ports, half
//! admitted by a random rule, half random (almost all denied).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsFd as _,
    time::Instant,
};

use ipnet::IpNet;
use portcullis::{
    compile::{self, Limits},
    dataplane::{self, Dataplane, Program},
    rules::{Cluster, FirewallRule, RuleSet},
    testrun,
};
use portcullis_tests::{PinDir, is_root, packet::*};
use rand::{RngExt as _, SeedableRng, rngs::StdRng};

const SIZES: [usize; 5] = [1, 100, 1_000, 10_000, 100_000];
const PACKETS: usize = 2048;
const REPEAT: u32 = 50;
const RUNS: usize = 5;

fn random_net(rng: &mut StdRng, v6: bool) -> IpNet {
    if v6 {
        let addr = Ipv6Addr::from(rng.random::<u128>());
        IpNet::new(IpAddr::V6(addr), rng.random_range(32..=128))
            .unwrap()
            .trunc()
    } else {
        let addr = Ipv4Addr::from(rng.random::<u32>());
        IpNet::new(IpAddr::V4(addr), rng.random_range(8..=32))
            .unwrap()
            .trunc()
    }
}

fn random_in(rng: &mut StdRng, net: &IpNet) -> IpAddr {
    match net {
        IpNet::V4(n) => {
            let host = if n.prefix_len() == 32 {
                0
            } else {
                rng.random::<u32>() >> n.prefix_len()
            };
            IpAddr::V4(Ipv4Addr::from(u32::from(n.network()) | host))
        }
        IpNet::V6(n) => {
            let host = if n.prefix_len() == 128 {
                0
            } else {
                rng.random::<u128>() >> n.prefix_len()
            };
            IpAddr::V6(Ipv6Addr::from(u128::from(n.network()) | host))
        }
    }
}

fn shape(n: usize, rng: &mut StdRng) -> RuleSet {
    let rules = (0..n)
        .map(|i| {
            let from = rng.random_range(1..=64_535u32);
            let nets: Vec<IpNet> = (0..rng.random_range(1..=4))
                .map(|_| {
                    let v6 = rng.random();
                    random_net(rng, v6)
                })
                .collect();
            FirewallRule {
                id: format!("r{i}"),
                from_port: from,
                to_port: from + rng.random_range(0..1000),
                ip_ranges: nets.iter().map(|n| n.to_string()).collect(),
                protocol: Default::default(),
                description: None,
            }
        })
        .collect();
    let peers = (0..1000)
        .map(|i| {
            let addr = if i % 2 == 0 {
                IpAddr::V4(Ipv4Addr::from(rng.random::<u32>()))
            } else {
                IpAddr::V6(Ipv6Addr::from(rng.random::<u128>()))
            };
            IpNet::from(addr).to_string()
        })
        .collect();
    RuleSet {
        ingress_rules: rules,
        cluster: Some(Cluster {
            id: "bench".into(),
            peers,
            other_clusters: vec![],
        }),
        ..Default::default()
    }
}

/// Packets for `set`: (v6, admitted-by-construction, frame).
fn packets(set: &RuleSet, rng: &mut StdRng) -> Vec<(bool, bool, Vec<u8>)> {
    (0..PACKETS)
        .map(|i| {
            let allowed = i % 2 == 0;
            let (src, port) = if allowed {
                let r = &set.ingress_rules[rng.random_range(0..set.ingress_rules.len())];
                let nets = r.networks();
                let net = nets[rng.random_range(0..nets.len())];
                (
                    random_in(rng, &net),
                    rng.random_range(r.from_port..=r.to_port) as u16,
                )
            } else if rng.random() {
                (
                    IpAddr::V6(Ipv6Addr::from(rng.random::<u128>())),
                    rng.random(),
                )
            } else {
                (
                    IpAddr::V4(Ipv4Addr::from(rng.random::<u32>())),
                    rng.random(),
                )
            };
            let dst = if src.is_ipv4() {
                "10.200.0.1"
            } else {
                "fd00:200::1"
            };
            let frame = Pkt::new(&src.to_string(), dst)
                .tcp(40000, port, SYN)
                .bytes();
            (src.is_ipv6(), allowed, frame)
        })
        .collect()
}

/// Mean ns/packet over the packets selected by `pick`, per run.
fn measure(
    fd: std::os::fd::BorrowedFd<'_>,
    pkts: &[(bool, bool, Vec<u8>)],
    pick: impl Fn(bool, bool) -> bool,
) -> Vec<f64> {
    (0..RUNS)
        .map(|_| {
            let chosen: Vec<_> = pkts.iter().filter(|(v6, ok, _)| pick(*v6, *ok)).collect();
            let total: u64 = chosen
                .iter()
                .map(|(_, _, f)| testrun::run(fd, f, REPEAT).expect("test run").duration_ns as u64)
                .sum();
            total as f64 / chosen.len() as f64
        })
        .collect()
}

fn median_min_max(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn main() -> anyhow::Result<()> {
    anyhow::ensure!(
        is_root(),
        "the benchmark loads eBPF programs: run it as root"
    );
    // Our own network namespace (gone when we exit), with a veth pair to
    // attach the program to: an XDP program attached in driver mode stays
    // in the kernel's XDP dispatcher, so a test run does not swap it in and
    // out (which waits for an RCU grace period on every run).
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)?;
    let ip = |args: &[&str]| portcullis_tests::run(std::process::Command::new("ip").args(args));
    ip(&[
        "link", "add", "bench0", "type", "veth", "peer", "name", "bench1",
    ])?;
    for dev in ["bench0", "bench1", "lo"] {
        ip(&["link", "set", dev, "up"])?;
    }
    let sizes: Vec<usize> = match std::env::var("PORTCULLIS_BENCH_SIZES") {
        Ok(list) => list
            .split(',')
            .map(|s| s.trim().parse())
            .collect::<Result<_, _>>()?,
        Err(_) => SIZES.to_vec(),
    };
    let limits = Limits {
        prefixes: 600_000,
        regions: 600_000,
        segments: 8_000_000,
        slots: 110_000,
        v4_chunks: 1_000_000,
    };
    println!(
        "rule engine: ns/packet (BPF_PROG_TEST_RUN, {PACKETS} packets x {REPEAT} repeats, median of {RUNS} runs [min-max])"
    );
    println!(
        "{:>8} {:>22} {:>22} {:>22} {:>22} {:>10} {:>10} {:>10} {:>10}",
        "rules",
        "v4 allowed",
        "v4 denied",
        "v6 allowed",
        "v6 denied",
        "compile",
        "live",
        "map MiB",
        "segments"
    );
    let mut base = None;
    for n in sizes {
        let mut rng = StdRng::seed_from_u64(0x5eed + n as u64);
        let set = shape(n, &mut rng);
        let started = Instant::now();
        let image = compile::compile(&set, &limits)?;
        let compile_ms = started.elapsed().as_secs_f64() * 1e3;
        let pins = PinDir::new()?;
        let mut dp = Dataplane::load(pins.path(), 65536, &limits)?;
        let started = Instant::now();
        dp.apply(&image, false)?;
        let live_ms = started.elapsed().as_secs_f64() * 1e3;
        dp.attach_ingress("bench0")?;
        let memory: u64 = dataplane::map_memory(pins.path())?
            .iter()
            .filter(|(name, _)| {
                ["SRC", "REGIONS", "SEGMENTS", "RULE_STATS", "ACTIVE"]
                    .iter()
                    .any(|p| name.starts_with(p))
            })
            .map(|(_, b)| b)
            .sum();
        let pkts = packets(&set, &mut rng);
        let fd = dp.program_fd(Program::Ingress)?;
        let cell = |v6: bool, ok: bool| {
            median_min_max(measure(fd.as_fd(), &pkts, |a, b| a == v6 && b == ok))
        };
        let cells = [
            cell(false, true),
            cell(false, false),
            cell(true, true),
            cell(true, false),
        ];
        let fmt = |(m, lo, hi): (f64, f64, f64)| format!("{m:6.1} [{lo:5.1}-{hi:5.1}]");
        println!(
            "{:>8} {:>22} {:>22} {:>22} {:>22} {:>8.1}ms {:>8.1}ms {:>10.1} {:>10}",
            n,
            fmt(cells[0]),
            fmt(cells[1]),
            fmt(cells[2]),
            fmt(cells[3]),
            compile_ms,
            live_ms,
            memory as f64 / (1 << 20) as f64,
            image.segments.len()
        );
        let mean = cells.iter().map(|c| c.0).sum::<f64>() / 4.0;
        let base = *base.get_or_insert(mean);
        println!(
            "{:>8} mean {mean:.1} ns/packet, {:.2}x the 1-rule cost",
            "",
            mean / base
        );
    }
    api_round_trips(&limits)?;
    Ok(())
}

/// Round trips through the API socket of a real daemon: single rule adds,
/// and replacing the whole set with 10k rules.
fn api_round_trips(limits: &Limits) -> anyhow::Result<()> {
    use hyper::Method;
    use portcullis::client;
    let pins = PinDir::new()?;
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("api.sock");
    let config = dir.path().join("portcullis.toml");
    std::fs::write(
        &config,
        format!(
            "interfaces = [\"bench1\"]\npin_dir = \"{}\"\n[capacity]\nprefixes = {}\nregions = {}\nsegments = {}\nslots = {}\nv4_chunks = {}\n",
            pins.path().display(),
            limits.prefixes,
            limits.regions,
            limits.segments,
            limits.slots,
            limits.v4_chunks
        ),
    )?;
    let mut daemon = std::process::Command::new(portcullis_tests::workspace_bin("portcullisd")?)
        .arg("--config")
        .arg(&config)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--socket")
        .arg(&socket)
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let started = Instant::now();
    while !socket.exists() {
        anyhow::ensure!(
            started.elapsed().as_secs() < 20,
            "portcullisd did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let start_ms = started.elapsed().as_secs_f64() * 1e3;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut adds = Vec::new();
    for i in 0..100 {
        let rule = serde_json::json!({"id": format!("a{i}"), "from_port": 1000 + i, "to_port": 1000 + i, "ip_ranges": []});
        let t = Instant::now();
        let reply = rt.block_on(client::request(
            &socket,
            Method::POST,
            "/v1/rules/ingress",
            Some(serde_json::to_vec(&rule)?),
        ))?;
        anyhow::ensure!(
            reply.status == 201,
            "add failed: {}",
            String::from_utf8_lossy(&reply.body)
        );
        adds.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let mut rng = StdRng::seed_from_u64(10_000);
    let big = shape(10_000, &mut rng);
    let body = serde_json::to_vec(&big)?;
    let mut replaces = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let reply = rt.block_on(client::request(
            &socket,
            Method::PUT,
            "/v1/rules",
            Some(body.clone()),
        ))?;
        anyhow::ensure!(
            reply.status == 200,
            "replace failed: {}",
            String::from_utf8_lossy(&reply.body)
        );
        replaces.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let rss_kib = std::fs::read_to_string(format!("/proc/{}/status", daemon.id()))?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    let _ = daemon.kill();
    let _ = daemon.wait();
    let (add, add_lo, add_hi) = median_min_max(adds);
    let (rep, rep_lo, rep_hi) = median_min_max(replaces);
    println!("\ncontrol plane (real portcullisd, API over its Unix socket)");
    println!("  daemon start to socket ready     {start_ms:8.1} ms");
    println!(
        "  single rule add, round trip      {add:8.2} ms [{add_lo:.2}-{add_hi:.2}] (median of 100)"
    );
    println!(
        "  replace with 10k rules, round trip {rep:6.1} ms [{rep_lo:.1}-{rep_hi:.1}] (median of 3)"
    );
    println!(
        "  daemon RSS with 10k rules        {:8.1} MiB",
        rss_kib / 1024.0
    );
    Ok(())
}
