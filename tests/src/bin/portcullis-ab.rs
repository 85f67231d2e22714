//! Interleaved A/B of two builds of the ingress program on the same frames
//! (`BPF_PROG_TEST_RUN`), for data-path changes.
//!
//! 1. With each build: `portcullis-ab setup DIR N` loads that build's data
//!    path pinned under DIR (left pinned) with the benchmark's N-rule set
//!    (same seed as `portcullis-bench`).
//! 2. With either build: `portcullis-ab run DIR_A DIR_B N [ROUNDS]` runs the
//!    benchmark's new-traffic frames (v4/v6, allowed/denied SYNs) and
//!    established-flow frames (v4/v6 ACKs of flows `setup` established
//!    through that build's programs: this host's SYN out, the answer in)
//!    through both pinned programs, A and B alternating within each round,
//!    and prints per class the medians of A, B and of B - A (per round).
//! 3. `portcullis-ab clean DIR` removes the pins.

#[path = "portcullis-bench/rawbpf.rs"]
#[allow(dead_code)]
mod rawbpf;
#[path = "portcullis-bench/sets.rs"]
mod sets;

use std::{
    os::fd::{AsFd as _, BorrowedFd},
    path::{Path, PathBuf},
};

use portcullis::{
    compile,
    dataplane::{Dataplane, Program},
    rules::RuleSet,
    testrun,
};
use portcullis_common::{DIR_INGRESS, PCLASS_TCP};
use portcullis_tests::packet::{ACK, Pkt, SYN};
use rand::{SeedableRng, rngs::StdRng};
use sets::shape;

const PACKETS: usize = 2048;
const REPEAT: u32 = 50;

/// Frames per class: v4 allowed, v4 denied, v6 allowed, v6 denied (denied
/// ones checked against the reference index: no rule admits them).
fn classes(set: &RuleSet, rng: &mut StdRng) -> [Vec<Vec<u8>>; 4] {
    let index = compile::Index::of(&compile::entries(set).0);
    let mut out: [Vec<Vec<u8>>; 4] = Default::default();
    for i in 0..PACKETS {
        let allowed = i % 2 == 0;
        let (src, port) = if allowed {
            sets::admitted(set, rng)
        } else {
            loop {
                let (src, port) = sets::anywhere(rng);
                let slot = index.lookup(DIR_INGRESS, src, PCLASS_TCP, port);
                if !portcullis_common::slot_admits(slot) {
                    break (src, port);
                }
            }
        };
        let frame = sets::syn(src, port);
        out[usize::from(src.is_ipv6()) * 2 + usize::from(!allowed)].push(frame);
    }
    out
}

/// Frames of one class.
type Frames = Vec<Vec<u8>>;

/// Established flows of one family.
#[derive(Default)]
struct Flows {
    /// The SYN this host sends to open each (egress).
    syns: Frames,
    /// The other end's answer (ingress): the flow is established, with
    /// the timeout of one (a flow left at SYN_SENT ages out in 60 s).
    synacks: Frames,
    /// The other end's ACKs on it, the class measured.
    acks: Frames,
}

/// Established flows per family (IPv4, IPv6), from sources anywhere
/// (seeded apart from the rule set's frames).
fn established() -> [Flows; 2] {
    let mut rng = StdRng::seed_from_u64(0xe57);
    let mut out: [Flows; 2] = Default::default();
    for i in 0..PACKETS {
        let (remote, rport) = sets::anywhere(&mut rng);
        let host = if remote.is_ipv4() {
            "10.200.0.1"
        } else {
            "fd00:200::1"
        };
        let remote = remote.to_string();
        let lport = 32_768 + (i % 28_000) as u16;
        let family = &mut out[usize::from(host.contains(':'))];
        let (sent, back) = (Pkt::new(host, &remote), Pkt::new(&remote, host));
        family.syns.push(sent.tcp(lport, rport, SYN).bytes());
        family
            .synacks
            .push(back.clone().tcp(rport, lport, SYN | ACK).bytes());
        family.acks.push(back.tcp(rport, lport, ACK).bytes());
    }
    out
}

fn set_for(n: usize) -> (RuleSet, StdRng) {
    let mut rng = StdRng::seed_from_u64(0x5eed + n as u64);
    let set = shape(n, &mut rng);
    (set, rng)
}

fn setup(dir: &Path, n: usize) -> anyhow::Result<()> {
    let (set, _) = set_for(n);
    let image = compile::compile(&set, &sets::CAPACITY)?;
    let fitted = sets::fitted(&image);
    let mut dp = Dataplane::load(dir, 65536, &fitted)?;
    dp.apply(&image, false)?;
    for flows in established() {
        for (syn, synack) in flows.syns.iter().zip(&flows.synacks) {
            dp.test_run(Program::Egress, syn, 1)?;
            dp.test_run(Program::Ingress, synack, 1)?;
        }
    }
    let info = aya::programs::ProgramInfo::from_pin(ingress_pin(dir)?)?;
    println!(
        "loaded {n} rules under {}; ingress verified_insns {:?}",
        dir.display(),
        info.verified_instruction_count()
    );
    Ok(())
}

fn ingress_pin(dir: &Path) -> anyhow::Result<PathBuf> {
    for e in std::fs::read_dir(dir.join("programs"))? {
        let p = e?.path().join("portcullis_ingress");
        if p.exists() {
            return Ok(p);
        }
    }
    anyhow::bail!("no pinned ingress program under {}", dir.display())
}

fn ns(fd: BorrowedFd<'_>, frames: &[Vec<u8>]) -> f64 {
    let total: u64 = frames
        .iter()
        .map(|f| testrun::run(fd, f, REPEAT).expect("test run").duration_ns as u64)
        .sum();
    total as f64 / frames.len().max(1) as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn run(a: &Path, b: &Path, n: usize, rounds: usize) -> anyhow::Result<()> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)?;
    let ip = |args: &[&str]| portcullis_tests::run(std::process::Command::new("ip").args(args));
    for (x, y) in [("aba0", "aba1"), ("abb0", "abb1")] {
        ip(&["link", "add", x, "type", "veth", "peer", "name", y])?;
        ip(&["link", "set", x, "up"])?;
        ip(&["link", "set", y, "up"])?;
    }
    let pa = portcullis::bpfsys::obj_get(&ingress_pin(a)?)?;
    let pb = portcullis::bpfsys::obj_get(&ingress_pin(b)?)?;
    let (fa, fb) = (pa.as_fd(), pb.as_fd());
    let _la = rawbpf::attach_xdp(fa, nix::net::if_::if_nametoindex("aba0")?)?;
    let _lb = rawbpf::attach_xdp(fb, nix::net::if_::if_nametoindex("abb0")?)?;
    let (set, mut rng) = set_for(n);
    let [v4, v6] = established();
    let cls: Vec<Vec<Vec<u8>>> = classes(&set, &mut rng)
        .into_iter()
        .chain([v4.acks, v6.acks])
        .collect();
    let names = [
        "v4 allowed",
        "v4 denied",
        "v6 allowed",
        "v6 denied",
        "v4 est",
        "v6 est",
    ];
    let mut av: Vec<Vec<f64>> = vec![vec![]; names.len()];
    let mut bv: Vec<Vec<f64>> = vec![vec![]; names.len()];
    // PORTCULLIS_AB_CLASS=i: only class i (0..6, in `names` order).
    let only: Option<usize> = std::env::var("PORTCULLIS_AB_CLASS")
        .ok()
        .and_then(|v| v.parse().ok());
    for r in 0..rounds {
        for (i, frames) in cls.iter().enumerate() {
            if only.is_some_and(|o| o != i) {
                av[i].push(0.0);
                bv[i].push(0.0);
                continue;
            }
            let (x, y) = if r % 2 == 0 {
                let x = ns(fa, frames);
                (x, ns(fb, frames))
            } else {
                let y = ns(fb, frames);
                (ns(fa, frames), y)
            };
            av[i].push(x);
            bv[i].push(y);
        }
    }
    println!(
        "{n} rules, {rounds} rounds, A={} B={}",
        a.display(),
        b.display()
    );
    for i in 0..names.len() {
        let d: Vec<f64> = av[i].iter().zip(&bv[i]).map(|(x, y)| y - x).collect();
        let (dmin, dmax) = d
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), x| (lo.min(*x), hi.max(*x)));
        println!(
            "  {:<11} ({:>4} frames)  A {:>6.1}  B {:>6.1}  B-A {:>+6.1} [{:+.1} .. {:+.1}]",
            names[i],
            cls[i].len(),
            median(av[i].clone()),
            median(bv[i].clone()),
            median(d),
            dmin,
            dmax
        );
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize| args.get(i).map(String::as_str).unwrap_or("");
    match arg(1) {
        "setup" => setup(Path::new(arg(2)), arg(3).parse()?),
        "run" => run(
            Path::new(arg(2)),
            Path::new(arg(3)),
            arg(4).parse()?,
            arg(5).parse().unwrap_or(15),
        ),
        "insns" => {
            let ingress = ingress_pin(Path::new(arg(2)))?;
            for p in [ingress.clone(), ingress.with_file_name("portcullis_egress")] {
                let info = aya::programs::ProgramInfo::from_pin(&p)?;
                println!("{}: {:?}", p.display(), info.verified_instruction_count());
            }
            Ok(())
        }
        "clean" => {
            std::fs::remove_dir_all(arg(2))?;
            Ok(())
        }
        _ => anyhow::bail!(
            "usage: portcullis-ab setup DIR N | run DIR_A DIR_B N [ROUNDS] | clean DIR"
        ),
    }
}
