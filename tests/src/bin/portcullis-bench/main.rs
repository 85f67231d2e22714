//! `cargo xtask bench`: what Portcullis costs per packet, next to what users
//! would pick instead, measured side by side in one run.
//!
//! 1. The rule engine with `BPF_PROG_TEST_RUN`: ns/packet as the rule set
//!    grows (seeded shape: N rules, each with 1 to 4 source prefixes of mixed
//!    lengths, /8 to /32 for IPv4 and /32 to /128 for IPv6, and a range of 1
//!    to 1000 ports, plus 1000 cluster peers), for allowed, denied and
//!    established-flow packets, IPv4 and IPv6; compile time, time to make the
//!    set live, kernel map memory. Beside it, over the same packets: an empty
//!    XDP program (the floor) and xdp-filter (xdp-tools).
//! 2. Real traffic (`traffic.rs`): Portcullis, nftables (linear and interval
//!    set) and iptables-legacy at 1k and 10k rules, one raw-frame generator.
//! 3. The control plane through a real daemon's API.
//! 4. The kernel's floor per stage (`floors.rs`, programs of
//!    `ebpf/src/floor.rs`), the ingress program's stages from traffic classes
//!    (`stages.rs`), and daemon start and restart to enforcing (`start.rs`).
//!
//! Results: printed, and written to target/bench/bench.json and
//! target/bench/ns-per-packet.svg.

mod floors;
mod rawbpf;
mod report;
mod sets;
mod stages;
mod start;
mod traffic;
mod xdpfilter;

use std::{net::IpAddr, os::fd::AsFd as _, time::Instant};

use portcullis::{
    compile::{self, Limits},
    dataplane::{self, Dataplane, Program},
    rules::RuleSet,
    testrun,
};
use portcullis_tests::{PinDir, is_root, packet::*};
use rand::{SeedableRng, rngs::StdRng};
use report::{Control, EngineRow, Floor, Reference, Report, Stat};
use sets::shape;

const SIZES: [usize; 5] = [1, 100, 1_000, 10_000, 100_000];
const PACKETS: usize = 2048;
const REPEAT: u32 = 50;
const RUNS: usize = 5;

/// A test packet: (v6, admitted by construction, frame).
type TestPacket = (bool, bool, Vec<u8>);

/// Packets for `set`: SYNs, every other one from a source and to a port a
/// rule admits.
fn packets(set: &RuleSet, rng: &mut StdRng) -> Vec<TestPacket> {
    (0..PACKETS)
        .map(|i| {
            let allowed = i % 2 == 0;
            let (src, port) = if allowed {
                sets::admitted(set, rng)
            } else {
                sets::anywhere(rng)
            };
            (src.is_ipv6(), allowed, sets::syn(src, port))
        })
        .collect()
}

/// Mean ns/packet over the packets selected by `pick`, per run.
fn measure(
    fd: std::os::fd::BorrowedFd<'_>,
    pkts: &[TestPacket],
    pick: impl Fn(bool, bool) -> bool,
) -> Vec<f64> {
    (0..RUNS).map(|_| run_once(fd, pkts, &pick)).collect()
}

/// The first (smallest) rule set, kept loaded and attached while the larger
/// ones are measured: the base of their paired ratios.
struct Base {
    program: std::os::fd::OwnedFd,
    packets: Vec<TestPacket>,
    _dataplane: Dataplane,
    _pins: PinDir,
}

/// Mean ns/packet over the packets selected by `pick`, one run.
fn run_once(
    fd: std::os::fd::BorrowedFd<'_>,
    pkts: &[TestPacket],
    pick: impl Fn(bool, bool) -> bool,
) -> f64 {
    let chosen: Vec<_> = pkts.iter().filter(|(v6, ok, _)| pick(*v6, *ok)).collect();
    let total: u64 = chosen
        .iter()
        .map(|(_, _, f)| testrun::run(fd, f, REPEAT).expect("test run").duration_ns as u64)
        .sum();
    total as f64 / chosen.len() as f64
}

/// The four new-traffic cells (v4/v6 x allowed/denied) of one rule set,
/// each run paired with a run of the same cell on the `base` rule set right
/// before it, so machine noise (these machines are shared) hits both sides
/// of the ratio alike. Returns the cells and, per run, the ratio of the
/// summed cells to the base's.
fn paired_cells(
    fd: std::os::fd::BorrowedFd<'_>,
    pkts: &[TestPacket],
    base: Option<(std::os::fd::BorrowedFd<'_>, &[TestPacket])>,
) -> ([Stat; 4], Vec<f64>) {
    const CELLS: [(bool, bool); 4] = [(false, true), (false, false), (true, true), (true, false)];
    let mut runs: [Vec<f64>; 4] = Default::default();
    let mut ratios = Vec::new();
    for _ in 0..RUNS {
        let (mut sum, mut base_sum) = (0.0, 0.0);
        for (i, (v6, ok)) in CELLS.into_iter().enumerate() {
            let pick = |a: bool, b: bool| a == v6 && b == ok;
            let ns = run_once(fd, pkts, pick);
            base_sum += match base {
                Some((base_fd, base_pkts)) => run_once(base_fd, base_pkts, pick),
                None => ns,
            };
            sum += ns;
            runs[i].push(ns);
        }
        ratios.push(sum / base_sum);
    }
    (runs.map(Stat::of), ratios)
}

fn median_min_max(v: Vec<f64>) -> (f64, f64, f64) {
    let s = Stat::of(v);
    (s.median, s.min, s.max)
}

/// Opens the flows of `pkts` through the egress program (the SYN this host
/// would have sent for each inbound packet to answer it) and the ingress
/// program (the other end's SYN-ACK, which establishes the flow), and
/// returns what an established flow carries on them, the common case on a
/// busy host: the other end's ACK of each (a SYN without ACK would meet the
/// rules first, `policy::established`). Checks the first of each family
/// passes as established.
fn establish(dp: &mut Dataplane, pkts: &[TestPacket]) -> anyhow::Result<Vec<TestPacket>> {
    let mut acks: Vec<TestPacket> = Vec::new();
    for (i, &(v6, allowed, ref inbound)) in pkts.iter().enumerate() {
        let Some((src, dst, sport, _)) = flow_of(inbound) else {
            continue;
        };
        let (src, dst) = (src.to_string(), dst.to_string());
        // This host's end on an ephemeral port, not the inbound packet's
        // destination: at 100k rules a "denied" (random) source may be
        // admitted by some /8 rule after all, and its flow would then be
        // inbound (a reply on it is not a flow this host opened).
        let dport = 32_768 + (i % 28_000) as u16;
        dp.test_run(
            Program::Egress,
            &Pkt::new(&dst, &src).tcp(dport, sport, SYN).bytes(),
            1,
        )?;
        dp.test_run(
            Program::Ingress,
            &Pkt::new(&src, &dst).tcp(sport, dport, SYN | ACK).bytes(),
            1,
        )?;
        let ack = Pkt::new(&src, &dst).tcp(sport, dport, ACK).bytes();
        if !acks.iter().any(|p| p.0 == v6) {
            stages::expect_reason(
                dp,
                Program::Ingress,
                "established",
                &ack,
                portcullis_common::Reason::PassEstablished,
            )?;
        }
        acks.push((v6, allowed, ack));
    }
    Ok(acks)
}

/// The addresses and ports of `inbound`, a TCP frame as `packets` builds
/// it: (source, destination, source port, destination port).
fn flow_of(inbound: &[u8]) -> Option<(IpAddr, IpAddr, u16, u16)> {
    let v6 = u16::from_be_bytes([inbound[12], inbound[13]]) == 0x86dd;
    let (src, dst, l4) = if v6 {
        let a: [u8; 16] = inbound[22..38].try_into().ok()?;
        let b: [u8; 16] = inbound[38..54].try_into().ok()?;
        (IpAddr::from(a), IpAddr::from(b), 54)
    } else {
        let a: [u8; 4] = inbound[26..30].try_into().ok()?;
        let b: [u8; 4] = inbound[30..34].try_into().ok()?;
        (IpAddr::from(a), IpAddr::from(b), 34)
    };
    let sport = u16::from_be_bytes([inbound[l4], inbound[l4 + 1]]);
    let dport = u16::from_be_bytes([inbound[l4 + 2], inbound[l4 + 3]]);
    Some((src, dst, sport, dport))
}

/// `fd` over `other` on all of `pkts`, per round, the two back to back.
fn paired_vs(
    fd: std::os::fd::BorrowedFd<'_>,
    other: std::os::fd::BorrowedFd<'_>,
    pkts: &[TestPacket],
) -> Stat {
    Stat::of(
        (0..RUNS)
            .map(|_| run_once(fd, pkts, |_, _| true) / run_once(other, pkts, |_, _| true))
            .collect(),
    )
}

/// Mean ns/packet of `fd` over all of `pkts`, per run.
fn measure_all(fd: std::os::fd::BorrowedFd<'_>, pkts: &[TestPacket]) -> Stat {
    Stat::of(measure(fd, pkts, |_, _| true))
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
    // PORTCULLIS_BENCH_ONLY=start: only the daemon's start and restart.
    if std::env::var("PORTCULLIS_BENCH_ONLY").is_ok_and(|v| v == "start") {
        start::print(&start::measure("bench1")?);
        return Ok(());
    }
    let sizes: Vec<usize> = match std::env::var("PORTCULLIS_BENCH_SIZES") {
        Ok(list) => list
            .split(',')
            .map(|s| s.trim().parse())
            .collect::<Result<_, _>>()?,
        Err(_) => SIZES.to_vec(),
    };
    let limits = sets::CAPACITY;
    // PORTCULLIS_BENCH_ONLY=control: only the daemon's API round trips and memory.
    if std::env::var("PORTCULLIS_BENCH_ONLY").is_ok_and(|v| v == "control") {
        api_round_trips(&limits)?;
        return Ok(());
    }
    println!(
        "rule engine: ns/packet (BPF_PROG_TEST_RUN, {PACKETS} packets x {REPEAT} repeats, median of {RUNS} runs [min-max])"
    );
    println!(
        "{:>8} {:>20} {:>20} {:>20} {:>20} {:>20} {:>20} {:>10} {:>10} {:>8} {:>7}",
        "rules",
        "v4 allowed",
        "v4 denied",
        "v6 allowed",
        "v6 denied",
        "v4 established",
        "v6 established",
        "compile",
        "live",
        "map MiB",
        "vs first"
    );
    let mut report = Report {
        machine: machine(),
        ..Default::default()
    };
    let mut floor_pkts = None;
    // The first (smallest) set stays loaded, attached to its own veth pair,
    // as the base every larger set's runs are paired with.
    ip(&[
        "link", "add", "base0", "type", "veth", "peer", "name", "base1",
    ])?;
    for dev in ["base0", "base1"] {
        ip(&["link", "set", dev, "up"])?;
    }
    let mut base: Option<Base> = None;
    let floors = floors::Floors::load(ip)?;
    // PORTCULLIS_BENCH_ONLY=floors: only the kernel's floor per stage.
    if std::env::var("PORTCULLIS_BENCH_ONLY").is_ok_and(|v| v == "floors") {
        let mut rng = StdRng::seed_from_u64(0x5eed);
        let pkts = packets(&shape(1, &mut rng), &mut rng);
        report.floors = floor_rows(&floors, &pkts);
        print_floors_and_stages(&report);
        return Ok(());
    }
    let largest = sizes.iter().copied().max().unwrap_or(0);
    // The largest set (when it is not the base), kept loaded for the paired
    // comparison with xdp-filter below.
    let mut kept: Option<(std::os::fd::OwnedFd, Dataplane, PinDir)> = None;
    for n in sizes {
        let mut rng = StdRng::seed_from_u64(0x5eed + n as u64);
        let set = shape(n, &mut rng);
        let started = Instant::now();
        let image = compile::compile(&set, &limits)?;
        let compile_ms = started.elapsed().as_secs_f64() * 1e3;
        let fitted = sets::fitted(&image);
        let pins = PinDir::new()?;
        let mut dp = Dataplane::load(pins.path(), 65536, &fitted)?;
        let started = Instant::now();
        dp.apply(&image, false)?;
        let live_ms = started.elapsed().as_secs_f64() * 1e3;
        dp.attach_ingress(if base.is_none() { "base0" } else { "bench0" })?;
        let memory: u64 = dataplane::map_memory(pins.path())?
            .iter()
            .filter(|(name, _)| {
                [
                    "SRC",
                    "REGIONS",
                    "SEGMENTS",
                    "RULE_STATS",
                    "ACTIVE",
                    "V4_",
                    "V6_",
                ]
                .iter()
                .any(|p| name.starts_with(p))
            })
            .map(|(_, b)| b)
            .sum();
        let pkts = packets(&set, &mut rng);
        let fd = dp.program_fd(Program::Ingress)?;
        let (cells, ratios) = paired_cells(
            fd.as_fd(),
            &pkts,
            base.as_ref()
                .map(|b| (b.program.as_fd(), b.packets.as_slice())),
        );
        let vs_empty = paired_vs(fd.as_fd(), floors.empty(), &pkts);
        // Established: ACKs of the denied packets' flows, once this host
        // opened them.
        let denied: Vec<_> = pkts.iter().filter(|p| !p.1).cloned().collect();
        let established = establish(&mut dp, &denied)?;
        let fd = dp.program_fd(Program::Ingress)?;
        let est = |v6: bool| Stat::of(measure(fd.as_fd(), &established, |a, _| a == v6));
        let (v4_est, v6_est) = (est(false), est(true));
        let established_vs_empty = paired_vs(fd.as_fd(), floors.empty(), &established);
        let classes = stages::classes(&set, &mut rng, &mut dp)?;
        let fd = dp.program_fd(Program::Ingress)?;
        let stage_costs = stages::measure(fd.as_fd(), &classes, &floors.fds, RUNS);
        let mean = cells.iter().map(|c| c.median).sum::<f64>() / 4.0;
        let row = EngineRow {
            rules: n,
            v4_allowed: cells[0],
            v4_denied: cells[1],
            v6_allowed: cells[2],
            v6_denied: cells[3],
            v4_established: v4_est,
            v6_established: v6_est,
            mean,
            vs_first: Stat::of(ratios),
            compile_ms,
            live_ms,
            map_mib: memory as f64 / (1 << 20) as f64,
            vs_empty: Some(vs_empty),
            established_vs_empty: Some(established_vs_empty),
            stages: Some(stage_costs),
        };
        println!(
            "{:>8} {} {} {} {} {} {} {:>8.1}ms {:>8.1}ms {:>8.1} {:>6.2}x",
            n,
            row.v4_allowed,
            row.v4_denied,
            row.v6_allowed,
            row.v6_denied,
            row.v4_established,
            row.v6_established,
            compile_ms,
            live_ms,
            row.map_mib,
            row.vs_first.median
        );
        report.engine.push(row);
        if base.is_none() {
            base = Some(Base {
                program: dp.program_fd(Program::Ingress)?,
                packets: pkts.clone(),
                _dataplane: dp,
                _pins: pins,
            });
        } else if n == largest {
            kept = Some((dp.program_fd(Program::Ingress)?, dp, pins));
        }
        floor_pkts = Some(pkts);
    }

    // The same packets (of the largest set) through the references.
    let pkts = floor_pkts.expect("at least one size");
    let floor = rawbpf::empty_xdp()?;
    let bench1 = nix::net::if_::if_nametoindex("bench1")?;
    let floor_link = rawbpf::attach_xdp(floor.as_fd(), bench1)?;
    report.references.push(Reference {
        name: "empty XDP program (floor)".into(),
        entries: 0,
        ns_per_packet: measure_all(floor.as_fd(), &pkts),
        portcullis_vs: None,
    });
    // bench1 is the control-plane daemon's interface below.
    drop(floor_link);
    ip(&[
        "link", "add", "bench2", "type", "veth", "peer", "name", "bench3",
    ])?;
    for dev in ["bench2", "bench3"] {
        ip(&["link", "set", dev, "up"])?;
    }
    for entries in [1usize, 1000] {
        let ports: Vec<u16> = (0..entries).map(|i| 1000 + i as u16).collect();
        let sources: Vec<String> = (0..entries)
            .map(|i| format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255))
            .collect();
        match xdpfilter::XdpFilter::load("bench2", &ports, &sources) {
            Ok(xf) => {
                let ours = kept
                    .as_ref()
                    .map(|k| k.0.as_fd())
                    .or(base.as_ref().map(|b| b.program.as_fd()));
                report.references.push(Reference {
                    name: "xdp-filter (deny policy, ports + sources)".into(),
                    entries: 2 * entries,
                    ns_per_packet: measure_all(xf.prog.as_fd(), &pkts),
                    portcullis_vs: ours.map(|fd| paired_vs(fd, xf.prog.as_fd(), &pkts)),
                })
            }
            Err(e) => eprintln!("xdp-filter not measured: {e:#}"),
        }
    }
    let floor_ns = report.references[0].ns_per_packet.median;
    println!("\nreferences over the same {PACKETS} packets");
    for r in &report.references {
        println!(
            "  {:<44} {:>6} entries  {} ns/packet  {:>5.2}x the floor{}",
            r.name,
            r.entries,
            r.ns_per_packet,
            r.ns_per_packet.median / floor_ns,
            r.portcullis_vs.map_or(String::new(), |s| format!(
                "  Portcullis at {largest} rules / it, paired: {:.2}x [{:.2}-{:.2}]",
                s.median, s.min, s.max
            ))
        );
    }
    println!("\nPortcullis against the floor (mean of the four columns):");
    for r in &report.engine {
        println!(
            "  {:>8} rules  {:>6.1} ns/packet  {:>5.2}x the empty program",
            r.rules,
            r.mean,
            r.mean / floor_ns
        );
    }
    if let Some(xf) = report
        .references
        .iter()
        .rfind(|r| r.name.starts_with("xdp-filter"))
    {
        let last = report.engine.last().unwrap();
        println!(
            "  at {} rules: {:.2}x xdp-filter's cost ({:.1} ns/packet)",
            last.rules,
            last.mean / xf.ns_per_packet.median,
            xf.ns_per_packet.median
        );
    }

    report.floors = floor_rows(&floors, &pkts);
    // The increments of later features, on a data path of their own with
    // the first rule count's set.
    ip(&[
        "link", "add", "incr0", "type", "veth", "peer", "name", "incr1",
    ])?;
    for dev in ["incr0", "incr1"] {
        ip(&["link", "set", dev, "up"])?;
    }
    let first = report.engine.first().map_or(1, |r| r.rules);
    let mut rng = StdRng::seed_from_u64(0x5eed + first as u64);
    let set = shape(first, &mut rng);
    report.increments = stages::increments(&set, &mut rng, &floors.fds, "incr0", RUNS)?;
    print_floors_and_stages(&report);

    let traffic_sizes: Vec<usize> = std::env::var("PORTCULLIS_BENCH_TRAFFIC")
        .ok()
        .map(|l| l.split(',').filter_map(|s| s.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1_000, 10_000]);
    if !traffic_sizes.is_empty() {
        report.traffic = traffic::compare(&traffic_sizes)?;
        print_traffic(&report.traffic);
    }
    // PORTCULLIS_BENCH_CONTROL= (empty) skips the daemon's start and API.
    if std::env::var("PORTCULLIS_BENCH_CONTROL").map_or(true, |v| !v.is_empty()) {
        report.start = start::measure("bench1")?;
        start::print(&report.start);
        report.control = api_round_trips(&limits)?;
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    report.write(&dir)?;
    println!(
        "\nwritten: {0}/bench.json, {0}/ns-per-packet.svg",
        dir.display()
    );
    Ok(())
}

/// The floor programs over `pkts`, all in each round (interleaved).
fn floor_rows(floors: &floors::Floors, pkts: &[TestPacket]) -> Vec<Floor> {
    let frames: Vec<Vec<u8>> = pkts.iter().map(|p| p.2.clone()).collect();
    let rounds: Vec<Vec<f64>> = (0..RUNS)
        .map(|_| stages::floor_round(&floors.fds, &frames))
        .collect();
    floors::PROGRAMS
        .iter()
        .enumerate()
        .map(|(i, (program, does))| Floor {
            program: program.to_string(),
            does: does.to_string(),
            ns_per_packet: Stat::of(rounds.iter().map(|r| r[i]).collect()),
            net_of_empty: Stat::of(rounds.iter().map(|r| r[i] - r[0]).collect()),
        })
        .collect()
}

fn print_floors_and_stages(report: &Report) {
    println!("
the kernel's floor per stage (ebpf/src/floor.rs; {PACKETS} packets, median of {RUNS} interleaved rounds [min-max])");
    println!(
        "  {:<16} {:<34} {:>22} {:>22}",
        "program", "does", "ns/packet", "minus empty"
    );
    for f in &report.floors {
        println!(
            "  {:<16} {:<34} {} {}",
            f.program, f.does, f.ns_per_packet, f.net_of_empty
        );
    }
    for r in &report.engine {
        println!(
            "
  {} rules: new traffic {:.2}x the empty program [{:.2}-{:.2}], established {:.2}x [{:.2}-{:.2}] (paired runs)",
            r.rules,
            r.vs_empty.map_or(f64::NAN, |s| s.median),
            r.vs_empty.map_or(f64::NAN, |s| s.min),
            r.vs_empty.map_or(f64::NAN, |s| s.max),
            r.established_vs_empty.map_or(f64::NAN, |s| s.median),
            r.established_vs_empty.map_or(f64::NAN, |s| s.min),
            r.established_vs_empty.map_or(f64::NAN, |s| s.max),
        );
        let Some(st) = &r.stages else { continue };
        let classes: Vec<String> = st
            .classes
            .iter()
            .map(|(n, s)| format!("{n} {:.1}", s.median))
            .collect();
        println!("    classes (ns/packet): {}", classes.join(", "));
        println!(
            "    {:<48} {:<24} {:>21} {:>8} {:<24} {:>8}",
            "stage", "from classes", "ns/packet", "floor", "floor programs", "over"
        );
        for s in &st.stages {
            println!(
                "    {:<48} {:<24} {} {:>8.1} {:<24} {:>8.1}",
                s.stage, s.how, s.ns, s.floor_ns.median, s.floor, s.over_floor.median
            );
        }
    }
    print_lookup_growth(report);
    print_increments(&report.increments);
}

/// What the new stages gain from the smallest to the largest rule set,
/// beside the kernel's floor for the reads the rule lookup makes there:
/// eight dependent reads of a 256 MiB array (`floor_cold8`; 225 MiB of
/// rule maps at 100k rules), each packet's first run missing the caches.
fn print_lookup_growth(report: &Report) {
    let new_stage = |r: &EngineRow, prefix: &str| {
        r.stages
            .as_ref()?
            .stages
            .iter()
            .find(|s| s.stage.starts_with(prefix))
            .map(|s| s.ns.median)
    };
    let cold = report
        .floors
        .iter()
        .find(|f| f.program == "floor_cold8")
        .map(|f| f.net_of_empty.median);
    let (Some(first), Some(last), Some(cold)) = (report.engine.first(), report.engine.last(), cold)
    else {
        return;
    };
    println!(
        "\n  the rule lookup from {} to {} rules, against 8 dependent cold reads (floor_cold8, net of empty: {cold:.1} ns)",
        first.rules, last.rules
    );
    for prefix in ["new, denied", "new, allowed"] {
        if let (Some(a), Some(b)) = (new_stage(first, prefix), new_stage(last, prefix)) {
            println!(
                "    {prefix:<14} {a:6.1} -> {b:6.1} ns/packet: +{:.1} ns, {:.2}x floor_cold8",
                b - a,
                (b - a) / cold
            );
        }
    }
}

fn print_increments(rows: &[stages::Stage]) {
    println!(
        "\n  increments of later features ({} IPv4 frames, the two rule sets alternated within each of {RUNS} rounds)",
        stages::FRAMES
    );
    println!(
        "    {:<58} {:<44} {:>21} {:>8} {:<18} {:>8}",
        "feature", "difference of", "ns/packet", "floor", "floor programs", "over"
    );
    for s in rows {
        println!(
            "    {:<58} {:<44} {} {:>8.1} {:<18} {:>8.1}",
            s.stage, s.how, s.ns, s.floor_ns.median, s.floor, s.over_floor.median
        );
    }
}

fn print_traffic(rows: &[traffic::Row]) {
    println!(
        "\nreal traffic: UDP no rule admits, one AF_PACKET generator over a veth pair, 2 s per filter"
    );
    println!(
        "(on veth the receive path runs in the sender's context: the generator's rate follows the filter's cost)"
    );
    println!(
        "{:<26} {:>7} {:>14} {:>14} {:>12}",
        "filter", "rules", "pps at filter", "generator pps", "portcullis/x"
    );
    for r in rows {
        let ours = rows
            .iter()
            .find(|p| p.rules == r.rules && p.filter.starts_with("portcullis"))
            .map(|p| p.filtered_pps);
        let ratio = ours.map_or(String::from("-"), |o| {
            format!("{:.1}x", o / r.filtered_pps.max(1.0))
        });
        let note = if r.generator_bound {
            "  (generator-bound)"
        } else {
            ""
        };
        println!(
            "{:<26} {:>7} {:>14.0} {:>14.0} {:>12}{note}",
            r.filter, r.rules, r.filtered_pps, r.sent_pps, ratio
        );
    }
}

/// One line about this machine: kernel and CPU.
fn machine() -> String {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("Linux {}, {cpu}, {cores} cores", kernel.trim())
}

/// Round trips through the API socket of a real daemon: single rule adds,
/// and replacing the whole set with 10k rules.
fn api_round_trips(limits: &Limits) -> anyhow::Result<Control> {
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
    std::thread::sleep(std::time::Duration::from_millis(300));
    let rss_idle_kib = rss_kib(daemon.id())?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let adds = timed_adds(
        &rt,
        &socket,
        (0..100).map(|i| serde_json::json!({"id": format!("a{i}"), "from_port": 1000 + i, "to_port": 1000 + i, "ip_ranges": []})),
    )?;
    let mut rng = StdRng::seed_from_u64(10_000);
    let big = shape(10_000, &mut rng);
    let body = serde_json::to_vec(&big)?;
    let mut replaces = Vec::new();
    for _ in 0..3 {
        replaces.push(timed_replace(&rt, &socket, &body)?);
    }
    let rss_10k_kib = rss_kib(daemon.id())?;
    // And whole 100k-rule sets: the benchmark's, another, the benchmark's
    // again (each a real replace of 100k rules by 100k others); the
    // median of the three, so one slow round trip on a shared machine
    // does not decide the target.
    let huge = |seed: u64| -> anyhow::Result<Vec<u8>> {
        let mut rng = StdRng::seed_from_u64(seed);
        Ok(serde_json::to_vec(&shape(100_000, &mut rng))?)
    };
    let (ours, other) = (huge(100_000)?, huge(100_001)?);
    let mut replaces_100k = Vec::new();
    for body in [&ours, &other, &ours] {
        replaces_100k.push(timed_replace(&rt, &socket, body)?);
    }
    drop((ours, other));
    let (replace_100k_ms, rep100_lo, rep100_hi) = median_min_max(replaces_100k.clone());
    let rss_100k_kib = rss_kib(daemon.id())?;
    let rss_settled_kib = settled_rss_kib(daemon.id())?;
    // Single adds into the 100k-rule set, each compiled as a delta over the
    // live maps: the first also makes the idle generation's IPv6 tables
    // (still the 10k set's) the live one's, as a whole write would.
    let mut adds_100k = timed_adds(
        &rt,
        &socket,
        (0..4).map(|i| serde_json::json!({"id": format!("big{i}"), "from_port": 2000 + i, "to_port": 2000 + i, "ip_ranges": [format!("10.{}.0.0/16", 9 + i)]})),
    )?;
    let add_100k_first_ms = adds_100k.remove(0);
    let rss_after_adds_kib = settled_rss_kib(daemon.id())?;
    let hwm_kib = status_kib(daemon.id(), "VmHWM:")?;
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
        "  daemon RSS idle                  {:8.1} MiB",
        rss_idle_kib / 1024.0
    );
    println!(
        "  daemon RSS with 10k rules        {:8.1} MiB",
        rss_10k_kib / 1024.0
    );
    println!(
        "  replace with 100k rules          {replace_100k_ms:8.1} ms [{rep100_lo:.1}-{rep100_hi:.1}] (median of 3)"
    );
    println!(
        "  daemon RSS with 100k rules       {:8.1} MiB (settled {:.1} MiB, peak VmHWM {:.1} MiB)",
        rss_100k_kib / 1024.0,
        rss_settled_kib / 1024.0,
        hwm_kib / 1024.0
    );
    let (add_big, add_big_lo, add_big_hi) = median_min_max(adds_100k);
    println!(
        "  single rule add into 100k rules  {add_big:8.1} ms [{add_big_lo:.1}-{add_big_hi:.1}] (median of 3, each a delta; RSS after {:.1} MiB)",
        rss_after_adds_kib / 1024.0
    );
    println!(
        "    the first add after the replace (idle IPv6 tables made the live ones) {add_100k_first_ms:8.1} ms"
    );
    Ok(Control {
        add_100k_ms: Some(Stat {
            median: add_big,
            min: add_big_lo,
            max: add_big_hi,
        }),
        rss_100k_after_adds_mib: rss_after_adds_kib / 1024.0,
        add_100k_first_ms,
        start_ms,
        add_ms: Some(Stat {
            median: add,
            min: add_lo,
            max: add_hi,
        }),
        replace_10k_ms: Some(Stat {
            median: rep,
            min: rep_lo,
            max: rep_hi,
        }),
        rss_idle_mib: rss_idle_kib / 1024.0,
        rss_10k_mib: rss_10k_kib / 1024.0,
        rss_100k_mib: rss_100k_kib / 1024.0,
        replace_100k_ms,
        replace_100k_runs_ms: replaces_100k,
        rss_100k_settled_mib: rss_settled_kib / 1024.0,
        hwm_100k_mib: hwm_kib / 1024.0,
    })
}

/// Replaces the rules with `body` through the API (`PUT /v1/rules`); the
/// round trip in ms.
fn timed_replace(
    rt: &tokio::runtime::Runtime,
    socket: &std::path::Path,
    body: &[u8],
) -> anyhow::Result<f64> {
    let t = Instant::now();
    let reply = rt.block_on(portcullis::client::request(
        socket,
        hyper::Method::PUT,
        "/v1/rules",
        Some(body.to_vec()),
    ))?;
    anyhow::ensure!(
        reply.status == 200,
        "replace failed: {}",
        String::from_utf8_lossy(&reply.body)
    );
    Ok(t.elapsed().as_secs_f64() * 1e3)
}

/// Resident memory of `pid`, KiB.
/// Adds each of `rules` through the API, one request each; the round
/// trips in ms.
fn timed_adds(
    rt: &tokio::runtime::Runtime,
    socket: &std::path::Path,
    rules: impl Iterator<Item = serde_json::Value>,
) -> anyhow::Result<Vec<f64>> {
    let mut times = Vec::new();
    for rule in rules {
        let t = Instant::now();
        let reply = rt.block_on(portcullis::client::request(
            socket,
            hyper::Method::POST,
            "/v1/rules/ingress",
            Some(serde_json::to_vec(&rule)?),
        ))?;
        anyhow::ensure!(
            reply.status == 201,
            "add {rule} failed: {}",
            String::from_utf8_lossy(&reply.body)
        );
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(times)
}

fn rss_kib(pid: u32) -> anyhow::Result<f64> {
    status_kib(pid, "VmRSS:")
}

/// VmRSS once it has settled: after the daemon's one-second sweep has
/// returned what the change freed (`Garbage::release`), sampled every
/// 200 ms until two samples in a row are within 1% of each other (at most
/// 10 s).
fn settled_rss_kib(pid: u32) -> anyhow::Result<f64> {
    std::thread::sleep(std::time::Duration::from_millis(1200));
    let mut last = rss_kib(pid)?;
    for _ in 0..50 {
        std::thread::sleep(std::time::Duration::from_millis(200));
        let now = rss_kib(pid)?;
        if (now - last).abs() <= last * 0.01 {
            return Ok(now);
        }
        last = now;
    }
    Ok(last)
}

/// A `kB` field of /proc/`pid`/status, KiB.
fn status_kib(pid: u32, field: &str) -> anyhow::Result<f64> {
    Ok(std::fs::read_to_string(format!("/proc/{pid}/status"))?
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<f64>().ok())
        .unwrap_or(0.0))
}
