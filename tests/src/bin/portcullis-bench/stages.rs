//! Where the real ingress program's nanoseconds go, from traffic classes
//! that stop at different stages of the same program (no program variants:
//! the data path's code stays as it is).
//!
//! | class     | frame                                   | stages it runs                                           |
//! |-----------|-----------------------------------------|----------------------------------------------------------|
//! | `arp`     | ARP request                             | call, generation + settings reads, Ethernet, counter     |
//! | `trunc`   | IPv4 TCP, header cut after 10 bytes     | + IPv4 header parse (then malformed: no event)           |
//! | `frag`    | IPv4 TCP fragment at offset 1 (8 bytes) | as `trunc`, dropped as a fragment: + drop event (budget) |
//! | `est`     | IPv4 ACK of a flow this host opened, established (its SYN-ACK passed) | + L4 parse, key hash, flow-cache hit (a connection-table hit on a flow's first run, which fills the cache) |
//! | `denied`  | IPv4 SYN no rule admits                 | + L4, generation, deny sets, rules (no match), lookup (miss), drop event |
//! | `allowed` | IPv4 SYN a rule admits                  | + rules (match), INBOUND miss, counters (no EMBRYO update: no egress allowlist) |
//!
//! A SYN without ACK looks up the connection table only when the policy
//! would drop it (`policy::established`): `denied` does, after the rules;
//! `allowed` does not.
//!
//! Each round runs every class once (interleaved); a stage's cost is the
//! difference of two classes within a round, and the figure is the median
//! of the rounds' differences (so a slow round moves both sides).
//!
//! **Increments of later features** ([`increments`]): what a feature adds
//! to a packet that reaches it, as the difference of the same frames under
//! two rule sets that differ only by that feature, alternated within each
//! round (the set is made live between the two runs), against the floor of
//! what the feature does:
//!
//! | increment | frames | with / without |
//! |-----------|--------|----------------|
//! | interface-scoped rules | IPv4 SYNs no rule admits (ingress) | a rule naming the interface the frames arrive on (`IFDIR` asked, and has its entry) / none (`IFDIR` not asked: `SETTING_NO_IF_RULES`) |
//! | FQDN check | IPv4 SYNs outside this host's flows that no egress rule admits (egress, allowlist) | an FQDN egress rule (the DNS guard on: `FQDN_DEST` asked) / none |

use std::{
    net::{IpAddr, Ipv4Addr},
    os::fd::{AsFd as _, BorrowedFd, OwnedFd},
};

use portcullis::{
    compile::{self, Limits},
    dataplane::{Dataplane, Program},
    rules::{EgressMode, FirewallRule, RuleSet},
    testrun,
};
use portcullis_common::{DIR_INGRESS, PCLASS_TCP, Reason};
use portcullis_tests::packet::*;
use rand::{RngExt as _, rngs::StdRng};
use serde::Serialize;

use crate::report::Stat;

pub const FRAMES: usize = 256;
const REPEAT: u32 = 50;

pub struct Classes {
    arp: Vec<Vec<u8>>,
    trunc: Vec<Vec<u8>>,
    frag: Vec<Vec<u8>>,
    est: Vec<Vec<u8>>,
    denied: Vec<Vec<u8>>,
    allowed: Vec<Vec<u8>>,
}

/// Stage costs of one rule set, ns/packet: the classes' absolute costs and
/// the stages derived from their differences.
#[derive(Debug, Serialize)]
pub struct Stages {
    pub classes: Vec<(String, Stat)>,
    pub stages: Vec<Stage>,
}

/// The increments of later features ([`increments`]): rows shaped as the
/// stages (`how` names the two runs whose difference it is).
pub type Increments = Vec<Stage>;

#[derive(Debug, Serialize)]
pub struct Stage {
    pub stage: String,
    pub how: String,
    pub ns: Stat,
    /// The floor programs (net of the empty program) it compares with.
    pub floor: String,
    /// Their cost, summed, in the same rounds.
    pub floor_ns: Stat,
    /// The stage's cost minus its floor, per round.
    pub over_floor: Stat,
}

fn random_v4(rng: &mut StdRng) -> String {
    Ipv4Addr::from(rng.random::<u32>()).to_string()
}

fn arp_frame() -> Vec<u8> {
    let mut f = vec![
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02, 0, 0, 0, 0, 2, 0x08, 0x06,
    ];
    // htype 1, ptype IPv4, hlen 6, plen 4, request; sender, target.
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1, 2, 0, 0, 0, 0, 2, 10, 200, 0, 2]);
    f.extend_from_slice(&[0, 0, 0, 0, 0, 0, 10, 200, 0, 1]);
    f.resize(60, 0);
    f
}

/// The classes' frames for `set`; `est` flows are opened through `dp`'s
/// egress program and established through its ingress program.
pub fn classes(set: &RuleSet, rng: &mut StdRng, dp: &mut Dataplane) -> anyhow::Result<Classes> {
    let local = "10.200.0.1";
    let mut c = Classes {
        arp: vec![arp_frame(); FRAMES],
        trunc: vec![],
        frag: vec![],
        est: vec![],
        denied: vec![],
        allowed: vec![],
    };
    let v4_rules: Vec<(IpAddr, u16)> = set
        .ingress_rules
        .iter()
        .flat_map(|r| {
            let port = r.from_port as u16;
            r.networks()
                .into_iter()
                .filter(|n| n.addr().is_ipv4())
                .map(move |n| (n.network(), port))
        })
        .collect();
    let index = compile::Index::of(&compile::entries(set).0);
    for i in 0..FRAMES {
        let mut t = Pkt::new(&random_v4(rng), local).tcp(40000, 22, SYN).bytes();
        t.truncate(14 + 20 + 10);
        t[16..18].copy_from_slice(&30u16.to_be_bytes());
        c.trunc.push(t);
        c.frag.push(
            Pkt::new(&random_v4(rng), local)
                .tcp(40000, 80, SYN)
                .fragment(i as u32, 1, false)
                .bytes(),
        );
        let remote = random_v4(rng);
        let port: u16 = rng.random_range(1024..60000);
        dp.test_run(
            Program::Egress,
            &Pkt::new(local, &remote).tcp(port, 443, SYN).bytes(),
            1,
        )?;
        dp.test_run(
            Program::Ingress,
            &Pkt::new(&remote, local).tcp(443, port, SYN | ACK).bytes(),
            1,
        )?;
        c.est
            .push(Pkt::new(&remote, local).tcp(443, port, ACK).bytes());
        // A source and port no rule admits (at 100k rules random sources
        // fall inside some /8 rule's range often enough to matter).
        let (src, port) = loop {
            let (src, port): (String, u16) = (random_v4(rng), rng.random());
            let addr: IpAddr = src.parse()?;
            let slot = index.lookup(DIR_INGRESS, addr, PCLASS_TCP, port);
            if !portcullis_common::slot_admits(slot) {
                break (src, port);
            }
        };
        c.denied
            .push(Pkt::new(&src, local).tcp(40000, port, SYN).bytes());
        if !v4_rules.is_empty() {
            let (src, port) = v4_rules[rng.random_range(0..v4_rules.len())];
            c.allowed.push(
                Pkt::new(&src.to_string(), local)
                    .tcp(40000, port, SYN)
                    .bytes(),
            );
        }
    }
    check(&c, dp)?;
    Ok(c)
}

/// Runs `frame` once through `program` and checks it was counted as
/// `reason` (so its cost is the stages that reason takes).
pub fn expect_reason(
    dp: &mut Dataplane,
    program: Program,
    what: &str,
    frame: &[u8],
    reason: Reason,
) -> anyhow::Result<()> {
    let pins = dp.pin_dir().to_owned();
    let count = || -> anyhow::Result<u64> {
        Ok(portcullis::dataplane::read_counters(&pins)?
            .into_iter()
            .find(|(r, _)| *r == reason)
            .map_or(0, |(_, c)| c.packets))
    };
    let before = count()?;
    dp.test_run(program, frame, 1)?;
    anyhow::ensure!(
        count()? == before + 1,
        "{what}: the {program:?} program did not count it as {reason:?}"
    );
    Ok(())
}

/// Each class gets the verdict reason the table above says (so its cost
/// is the stages it names): one frame of each, counted by reason.
fn check(c: &Classes, dp: &mut Dataplane) -> anyhow::Result<()> {
    let expect = [
        ("arp", &c.arp, Reason::PassArp),
        ("trunc", &c.trunc, Reason::DropMalformed),
        ("frag", &c.frag, Reason::DropFragment),
        ("est", &c.est, Reason::PassEstablished),
        ("denied", &c.denied, Reason::DropNoRule),
        ("allowed", &c.allowed, Reason::PassRule),
    ];
    for (name, frames, reason) in expect {
        let Some(frame) = frames.first() else {
            continue;
        };
        expect_reason(
            dp,
            Program::Ingress,
            &format!("stage class {name}"),
            frame,
            reason,
        )?;
    }
    Ok(())
}

fn ns(fd: BorrowedFd<'_>, frames: &[Vec<u8>]) -> f64 {
    let total: u64 = frames
        .iter()
        .map(|f| testrun::run(fd, f, REPEAT).expect("test run").duration_ns as u64)
        .sum();
    total as f64 / frames.len().max(1) as f64
}

/// Mean ns/packet of each floor program over `frames`, per round.
pub fn floor_round(floors: &[OwnedFd], frames: &[Vec<u8>]) -> Vec<f64> {
    floors.iter().map(|f| ns(f.as_fd(), frames)).collect()
}

/// The stages: (name, classes, floor programs it is compared with) and
/// how each is computed from a round's class costs `v` (in `names` order)
/// and floor costs net of the empty program `n` (in `floors::PROGRAMS`
/// order: array 1, counter 2, lru hit 3, lru miss 4, ktime 5, parse 6,
/// coarse 7, lru16 miss 8, hash 9, lru16 update 10, lru16 update per-CPU
/// 11, lru16 hit 12, cold 13, cold8 14, jiffies 15). The programs' clock
/// is `jiffies` (`ebpf/src/clock.rs`).
type Derive = fn(&[f64], &[f64], f64) -> (f64, f64);
const STAGES: [(&str, &str, &str, Derive); 6] = [
    (
        "fixed: generation + settings, Ethernet, verdict counter",
        "arp - empty",
        "2 array + counter",
        |v, n, empty| (v[0] - empty, 2.0 * n[1] + n[2]),
    ),
    ("IPv4 header parse", "trunc - arp", "parse", |v, n, _| {
        (v[1] - v[0], n[6])
    }),
    (
        "drop event (budget spent)",
        "frag - trunc",
        "jiffies + counter",
        |v, n, _| (v[2] - v[1], n[15] + n[2]),
    ),
    (
        // The classes are IPv4 and repeat one flow: after its first packet
        // (a `CONNTRACK4` hit) each is a hit in this CPU's `FLOW_CACHE4`.
        "established: L4 + key hash + flow-cache hit",
        "est - trunc",
        "per-CPU array + jiffies",
        |v, n, _| (v[3] - v[1], n[2] + n[15]),
    ),
    // No hash lookup: `IFDIR` is asked only while a rule names an
    // interface (`SETTING_NO_IF_RULES`), which the benchmark's sets do not.
    (
        "new, denied: L4 + generation + rules + conntrack miss",
        "denied - trunc - event",
        "2 array + lru16",
        |v, n, _| (v[4] - v[1] - (v[2] - v[1]), 2.0 * n[1] + n[8]),
    ),
    (
        "new, allowed: + rules match + INBOUND miss",
        "allowed - trunc",
        "2 array + lru16 + counter",
        |v, n, _| (v[5] - v[1], 2.0 * n[1] + n[8] + n[2]),
    ),
];

/// Runs the classes interleaved with the floor programs for `rounds`
/// rounds and derives the stages.
pub fn measure(fd: BorrowedFd<'_>, c: &Classes, floors: &[OwnedFd], rounds: usize) -> Stages {
    let names = ["arp", "trunc", "frag", "est", "denied", "allowed"];
    let sets = [&c.arp, &c.trunc, &c.frag, &c.est, &c.denied, &c.allowed];
    let mut abs: Vec<Vec<f64>> = vec![vec![]; names.len()];
    let mut derived: Vec<(Vec<f64>, Vec<f64>)> = vec![(vec![], vec![]); STAGES.len()];
    for _ in 0..rounds {
        let v: Vec<f64> = sets.iter().map(|s| ns(fd, s)).collect();
        let f = floor_round(floors, &c.est);
        let n: Vec<f64> = f.iter().map(|x| x - f[0]).collect();
        for (i, x) in v.iter().enumerate() {
            abs[i].push(*x);
        }
        for (i, (.., derive)) in STAGES.iter().enumerate() {
            let (ns, floor) = derive(&v, &n, f[0]);
            derived[i].0.push(ns);
            derived[i].1.push(floor);
        }
    }
    let count = if c.allowed.is_empty() { 5 } else { 6 };
    Stages {
        classes: names
            .iter()
            .zip(abs)
            .filter(|(_, v)| v.iter().all(|x| x.is_finite() && *x > 0.0))
            .map(|(n, v)| (n.to_string(), Stat::of(v)))
            .collect(),
        stages: STAGES
            .iter()
            .zip(derived)
            .take(count)
            .map(|((stage, how, floor, _), (v, f))| Stage {
                stage: stage.to_string(),
                how: how.to_string(),
                over_floor: Stat::of(v.iter().zip(&f).map(|(a, b)| a - b).collect()),
                ns: Stat::of(v),
                floor: floor.to_string(),
                floor_ns: Stat::of(f),
            })
            .collect(),
    }
}

/// A TCP rule admitting `port` from `ip_ranges`: ingress, on `interfaces`
/// (all when empty), or egress to `names` (an FQDN rule).
fn rule(
    id: &str,
    port: u32,
    ip_ranges: &[&str],
    names: &[&str],
    interfaces: &[&str],
) -> FirewallRule {
    let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
    FirewallRule {
        id: id.into(),
        from_port: port,
        to_port: port,
        ip_ranges: strings(ip_ranges),
        names: strings(names),
        protocol: Default::default(),
        description: None,
        icmp_types: Vec::new(),
        expires: None,
        rate: None,
        burst: None,
        interfaces: strings(interfaces),
    }
}

/// The increments of later features (the module's second table), on a
/// data path of its own loaded with `set` (egress an allowlist), attached
/// to `ifname` (so a test run stays in the XDP dispatcher). "With" adds an
/// ingress rule naming `lo` (a test run's frames arrive on the loopback
/// interface) that the frames do not match, and an FQDN egress rule (to a
/// port the frames do not go to). Each of `rounds` rounds runs both sets'
/// frames (the order alternating) and the floor programs.
pub fn increments(
    set: &RuleSet,
    rng: &mut StdRng,
    floors: &[OwnedFd],
    ifname: &str,
    rounds: usize,
) -> anyhow::Result<Increments> {
    let local = "10.200.0.1";
    let mut without = set.clone();
    without.egress = Some(EgressMode::Allowlist);
    let mut with = without.clone();
    with.ingress_rules
        .push(rule("scoped", 1, &["192.0.2.1/32"], &[], &["lo"]));
    with.egress_rules
        .push(rule("by-name", 443, &[], &["bench.test"], &[]));
    let limits = Limits::default();
    let images = [
        compile::compile(&without, &limits)?,
        compile::compile(&with, &limits)?,
    ];
    let pins = portcullis_tests::PinDir::new()?;
    let mut dp = Dataplane::load(pins.path(), 65536, &limits)?;
    dp.apply(&images[0], false)?;
    dp.attach_ingress(ifname)?;
    let (ingress, egress): (Vec<_>, Vec<_>) = (0..FRAMES)
        .map(|i| {
            let inbound = Pkt::new(&random_v4(rng), local)
                .tcp(40000, rng.random_range(1024..60000), SYN)
                .bytes();
            let outbound = Pkt::new(local, &random_v4(rng))
                .tcp(40000 + i as u16, 8443, SYN)
                .bytes();
            (inbound, outbound)
        })
        .unzip();
    for (image, what) in images.iter().zip(["without", "with"]) {
        dp.apply(image, false)?;
        let name = format!("increments, {what} the features");
        expect_reason(
            &mut dp,
            Program::Ingress,
            &name,
            &ingress[0],
            Reason::DropNoRule,
        )?;
        expect_reason(
            &mut dp,
            Program::Egress,
            &name,
            &egress[0],
            Reason::DropEgress,
        )?;
    }
    let (fd_in, fd_eg) = (
        dp.program_fd(Program::Ingress)?,
        dp.program_fd(Program::Egress)?,
    );
    // Per round: (interface rules, FQDN check), each (increment, floor).
    let mut rows: [(Vec<f64>, Vec<f64>); 2] = Default::default();
    for round in 0..rounds {
        let mut v = [[0.0; 2]; 2];
        for k in [round % 2, 1 - round % 2] {
            dp.apply(&images[k], false)?;
            v[k] = [ns(fd_in.as_fd(), &ingress), ns(fd_eg.as_fd(), &egress)];
        }
        let f = floor_round(floors, &ingress);
        let n: Vec<f64> = f.iter().map(|x| x - f[0]).collect();
        rows[0].0.push(v[1][0] - v[0][0]);
        rows[0].1.push(n[9]);
        rows[1].0.push(v[1][1] - v[0][1]);
        rows[1].1.push(2.0 * n[9] + 2.0 * n[1]);
    }
    let what = [
        (
            "interface-scoped rules (ingress, new traffic)",
            "SYN, a rule names its interface - none does",
            "hash",
        ),
        (
            "FQDN check (egress allowlist, outside this host's flows)",
            "SYN, an FQDN rule exists - none does",
            "2 hash + 2 array",
        ),
    ];
    Ok(what
        .into_iter()
        .zip(rows)
        .map(|((stage, how, floor), (v, f))| Stage {
            stage: stage.into(),
            how: how.into(),
            over_floor: Stat::of(v.iter().zip(&f).map(|(a, b)| a - b).collect()),
            ns: Stat::of(v),
            floor: floor.into(),
            floor_ns: Stat::of(f),
        })
        .collect())
}
