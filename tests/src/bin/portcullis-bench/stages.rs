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
//! | `denied`  | IPv4 SYN no rule admits                 | + lookup (miss), rules (no match), drop event            |
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
}

fn random_v4(rng: &mut StdRng) -> String {
    Ipv4Addr::from(rng.random::<u32>()).to_string()
}

fn arp_frame() -> Vec<u8> {
    let mut f = vec![0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02, 0, 0, 0, 0, 2, 0x08, 0x06];
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
            c.allowed
                .push(Pkt::new(&src.to_string(), local).tcp(40000, port, SYN).bytes());
        }
    }
    Ok(c)
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
    let mut derived: Vec<Vec<f64>> = vec![vec![]; 6];
    for _ in 0..rounds {
        let v: Vec<f64> = sets.iter().map(|s| ns(fd, s)).collect();
        // The floors over the frames of the stage each is compared with.
        let f = floor_round(floors, &c.est);
        for (i, x) in v.iter().enumerate() {
            abs[i].push(*x);
        }
        let event = v[2] - v[1];
        let d = [
            v[0] - f[0],
            v[1] - v[0],
            event,
            v[3] - v[1],
            v[4] - v[3] - event,
            v[5] - v[3],
        ];
        for (i, x) in d.into_iter().enumerate() {
            derived[i].push(x);
        }
    }
    let how = [
        ("fixed: generation + settings reads, Ethernet, verdict counter", "arp - empty", "2 array + counter"),
        ("IPv4 header parse", "trunc - arp", "parse"),
        ("drop event (budget spent)", "frag - trunc", "ktime + array"),
        ("L4 parse + connection-table lookup (hit)", "est - trunc", "lru hit"),
        ("rules, no match (+ lookup miss vs hit)", "denied - est - event", "(lru miss - lru hit)"),
        ("rules, match + INBOUND update + rule counter", "allowed - est", "counter + lru"),
    ];
    Stages {
        classes: names
            .iter()
            .zip(abs)
            .filter(|(_, v)| v.iter().all(|x| x.is_finite() && *x > 0.0))
            .map(|(n, v)| (n.to_string(), Stat::of(v)))
            .collect(),
        stages: how
            .iter()
            .zip(derived)
            .take(if c.allowed.is_empty() { 5 } else { 6 })
            .filter(|(_, v)| v.iter().all(|x| x.is_finite()))
            .map(|((stage, how, floor), v)| Stage {
                stage: stage.to_string(),
                how: how.to_string(),
                ns: Stat::of(v),
                floor: floor.to_string(),
            })
            .collect(),
    }
}
