//! Where the real ingress program's nanoseconds go, from traffic classes
//! that stop at different stages of the same program (no program variants:
//! the data path's code stays as it is).
//!
//! | class     | frame                                   | stages it runs                                           |
//! |-----------|-----------------------------------------|----------------------------------------------------------|
//! | `arp`     | ARP request                             | call, generation + settings reads, Ethernet, counter     |
//! | `trunc`   | IPv4 TCP, header cut after 10 bytes     | + IPv4 header parse (then malformed: no event)           |
//! | `frag`    | IPv4 TCP fragment at offset 1 (8 bytes) | as `trunc`, dropped as a fragment: + drop event (budget) |
//! | `est`     | IPv4 SYN-ACK of a flow this host opened | + L4 parse, connection-table key and lookup (hit)        |
//! | `denied`  | IPv4 SYN no rule admits                 | + L4, lookup (miss), rules (no match), drop event        |
//! | `allowed` | IPv4 SYN a rule admits                  | + lookup (miss), rules (match), INBOUND update, counters |
//!
//! Each round runs every class once (interleaved); a stage's cost is the
//! difference of two classes within a round, and the figure is the median
//! of the rounds' differences (so a slow round moves both sides).

use std::{
    net::{IpAddr, Ipv4Addr},
    os::fd::BorrowedFd,
};

use portcullis::{
    dataplane::{Dataplane, Program},
    rules::RuleSet,
    testrun,
};
use portcullis_tests::packet::*;
use rand::{RngExt as _, rngs::StdRng};
use serde::Serialize;

use crate::report::Stat;

const FRAMES: usize = 256;
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
/// egress program.
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
        c.est
            .push(Pkt::new(&remote, local).tcp(443, port, SYN | ACK).bytes());
        c.denied.push(
            Pkt::new(&random_v4(rng), local)
                .tcp(40000, rng.random(), SYN)
                .bytes(),
        );
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

/// Each class gets the verdict reason the table above says (so its cost
/// is the stages it names): one frame of each, counted by reason.
fn check(c: &Classes, dp: &mut Dataplane) -> anyhow::Result<()> {
    use portcullis_common::Reason;
    let pins = dp.pin_dir().to_owned();
    let count = |reason: Reason| -> anyhow::Result<u64> {
        Ok(portcullis::dataplane::read_counters(&pins)?
            .into_iter()
            .find(|(r, _)| *r == reason)
            .map_or(0, |(_, c)| c.packets))
    };
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
        let before = count(reason)?;
        dp.test_run(Program::Ingress, frame, 1)?;
        anyhow::ensure!(
            count(reason)? == before + 1,
            "stage class {name}: the ingress program did not count it as {reason:?}"
        );
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
pub fn floor_round(floors: &[std::os::fd::OwnedFd], frames: &[Vec<u8>]) -> Vec<f64> {
    use std::os::fd::AsFd as _;
    floors.iter().map(|f| ns(f.as_fd(), frames)).collect()
}

/// The stages: (name, classes, floor programs it is compared with) and
/// how each is computed from a round's class costs `v` (in `names` order)
/// and floor costs net of the empty program `n` (in `floors::PROGRAMS`
/// order: array 1, counter 2, lru hit 3, lru miss 4, ktime 5, parse 6).
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
        "ktime + counter",
        |v, n, _| (v[2] - v[1], n[5] + n[2]),
    ),
    (
        "established: L4 + conntrack hit + age check",
        "est - trunc",
        "lru hit + ktime",
        |v, n, _| (v[3] - v[1], n[3] + n[5]),
    ),
    (
        "new, denied: L4 + conntrack miss + rules",
        "denied - trunc - event",
        "lru miss",
        |v, n, _| (v[4] - v[1] - (v[2] - v[1]), n[4]),
    ),
    (
        "new, allowed: + rules match + INBOUND + counter",
        "allowed - trunc",
        "2 lru + ktime + counter",
        |v, n, _| (v[5] - v[1], n[4] + n[3] + n[5] + n[2]),
    ),
];

/// Runs the classes interleaved with the floor programs for `rounds`
/// rounds and derives the stages.
pub fn measure(
    fd: BorrowedFd<'_>,
    c: &Classes,
    floors: &[std::os::fd::OwnedFd],
    rounds: usize,
) -> Stages {
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
