//! Interleaved A/B of two builds of the ingress program on the same frames
//! (`BPF_PROG_TEST_RUN`), for data-path changes.
//!
//! 1. With each build: `portcullis-ab setup DIR N` loads that build's data
//!    path pinned under DIR (left pinned) with the benchmark's N-rule set
//!    (same seed as `portcullis-bench`).
//! 2. With either build: `portcullis-ab run DIR_A DIR_B N [ROUNDS]` runs the
//!    benchmark's new-traffic frames (v4/v6, allowed/denied SYNs) through
//!    both pinned programs, A and B alternating within each round, and
//!    prints per class the medians of A, B and of B - A (per round).
//! 3. `portcullis-ab clean DIR` removes the pins.

#[path = "portcullis-bench/rawbpf.rs"]
#[allow(dead_code)]
mod rawbpf;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use ipnet::IpNet;
use portcullis::{
    compile::{self, Limits},
    dataplane::Dataplane,
    rules::{Cluster, FirewallRule, RuleSet},
    testrun,
};
use portcullis_common::{DIR_INGRESS, PCLASS_TCP};
use portcullis_tests::packet::*;
use rand::{RngExt as _, SeedableRng, rngs::StdRng};

const PACKETS: usize = 2048;
const REPEAT: u32 = 50;

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

/// The benchmark's rule set shape (`portcullis-bench`'s `shape`).
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
                names: Vec::new(),
                protocol: Default::default(),
                description: None,
                icmp_types: Vec::new(),
                expires: None,
                rate: None,
                burst: None,
                interfaces: Vec::new(),
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
        ssh: portcullis::rules::Ssh {
            allow: false,
            ..Default::default()
        },
        ..Default::default()
    }
}

/// Frames per class: v4 allowed, v4 denied, v6 allowed, v6 denied (denied
/// ones checked against the reference index: no rule admits them).
fn classes(set: &RuleSet, rng: &mut StdRng) -> [Vec<Vec<u8>>; 4] {
    let index = compile::Index::of(&compile::entries(set).0);
    let mut out: [Vec<Vec<u8>>; 4] = Default::default();
    for i in 0..PACKETS {
        let allowed = i % 2 == 0;
        let (src, port) = if allowed {
            let r = &set.ingress_rules[rng.random_range(0..set.ingress_rules.len())];
            let nets = r.networks();
            let net = nets[rng.random_range(0..nets.len())];
            (
                random_in(rng, &net),
                rng.random_range(r.from_port..=r.to_port) as u16,
            )
        } else {
            loop {
                let src = if rng.random() {
                    IpAddr::V6(Ipv6Addr::from(rng.random::<u128>()))
                } else {
                    IpAddr::V4(Ipv4Addr::from(rng.random::<u32>()))
                };
                let port: u16 = rng.random();
                let slot = index.lookup(DIR_INGRESS, src, PCLASS_TCP, port);
                if !portcullis_common::slot_admits(slot) {
                    break (src, port);
                }
            }
        };
        let dst = if src.is_ipv4() {
            "10.200.0.1"
        } else {
            "fd00:200::1"
        };
        let frame = Pkt::new(&src.to_string(), dst)
            .tcp(40000, port, SYN)
            .bytes();
        out[usize::from(src.is_ipv6()) * 2 + usize::from(!allowed)].push(frame);
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
    // As the benchmark's (room for 100k rules).
    let limits = Limits {
        prefixes: 600_000,
        regions: 600_000,
        segments: 8_000_000,
        slots: 110_000,
        v4_chunks: 1_000_000,
    };
    let image = compile::compile(&set, &limits)?;
    let fit = |n: usize| ((n as f64 * 1.1) as u32).max(1024);
    let fitted = Limits {
        prefixes: fit(image.v4.len().max(image.v6.len())),
        regions: fit(image.regions.len()),
        segments: fit(image.segments.len()),
        slots: fit(image.slots.len()),
        v4_chunks: fit(image.v4_chunks.len() / portcullis_common::V4_CHUNK_ENTRIES as usize),
    };
    let mut dp = Dataplane::load(dir, 65536, &fitted)?;
    dp.apply(&image, false)?;
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

/// BPF_OBJ_GET: the pinned object at `path`.
fn obj_get(path: &Path) -> anyhow::Result<OwnedFd> {
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    let mut attr = ObjGet {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    // SAFETY: ObjGet is the BPF_OBJ_GET attr; the path outlives the call.
    let rc = unsafe { portcullis::bpfsys::bpf(7, &mut attr) }?;
    // SAFETY: a file descriptor the kernel just returned, owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(rc as i32) })
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
    let pa = obj_get(&ingress_pin(a)?)?;
    let pb = obj_get(&ingress_pin(b)?)?;
    let (fa, fb) = (pa.as_fd(), pb.as_fd());
    let _la = rawbpf::attach_xdp(fa, nix::net::if_::if_nametoindex("aba0")?)?;
    let _lb = rawbpf::attach_xdp(fb, nix::net::if_::if_nametoindex("abb0")?)?;
    let (set, mut rng) = set_for(n);
    let cls = classes(&set, &mut rng);
    let names = ["v4 allowed", "v4 denied", "v6 allowed", "v6 denied"];
    let mut av: Vec<Vec<f64>> = vec![vec![]; 4];
    let mut bv: Vec<Vec<f64>> = vec![vec![]; 4];
    // PORTCULLIS_AB_CLASS=i: only class i (0..4, in `names` order).
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
    for i in 0..4 {
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
