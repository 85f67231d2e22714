//! The benchmark's seeded rule sets, shared by `portcullis-bench` and
//! `portcullis-ab` (which includes this file by path), so an A/B run and the
//! benchmark measure the same sets.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use portcullis::{
    compile::{Image, Limits},
    rules::{Cluster, FirewallRule, RuleSet},
};
use portcullis_tests::packet::{Pkt, SYN};
use rand::{RngExt as _, rngs::StdRng};

/// A random network of family `v6` (IPv4 /8 to /32, IPv6 /32 to /128).
pub fn random_net(rng: &mut StdRng, v6: bool) -> IpNet {
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

/// A random address inside `net`.
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

/// The benchmark's rule set of `n` rules: each 1 to 4 random sources of
/// either family and a range of 1 to 1000 ports, and 1000 cluster peers.
pub fn shape(n: usize, rng: &mut StdRng) -> RuleSet {
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
        // As measured before SSH was on by default: no exemption.
        ssh: portcullis::rules::Ssh {
            allow: false,
            ..Default::default()
        },
        ..Default::default()
    }
}

/// A source and a port one of `set`'s ingress rules admits, at random.
pub fn admitted(set: &RuleSet, rng: &mut StdRng) -> (IpAddr, u16) {
    let r = &set.ingress_rules[rng.random_range(0..set.ingress_rules.len())];
    let nets = r.networks();
    let net = nets[rng.random_range(0..nets.len())];
    (
        random_in(rng, &net),
        rng.random_range(r.from_port..=r.to_port) as u16,
    )
}

/// A random source of either family and a random port.
pub fn anywhere(rng: &mut StdRng) -> (IpAddr, u16) {
    let src = if rng.random() {
        IpAddr::V6(Ipv6Addr::from(rng.random::<u128>()))
    } else {
        IpAddr::V4(Ipv4Addr::from(rng.random::<u32>()))
    };
    (src, rng.random())
}

/// A TCP SYN from `src` to `port` of the test host's address of its family.
pub fn syn(src: IpAddr, port: u16) -> Vec<u8> {
    let dst = if src.is_ipv4() {
        "10.200.0.1"
    } else {
        "fd00:200::1"
    };
    Pkt::new(&src.to_string(), dst)
        .tcp(40000, port, SYN)
        .bytes()
}

/// The maps' capacity the benchmark compiles with: room for 100k rules.
pub const CAPACITY: Limits = Limits {
    prefixes: 600_000,
    regions: 600_000,
    segments: 8_000_000,
    slots: 110_000,
    v4_chunks: 1_000_000,
};

/// Maps sized for `image` with 10% to spare, as an operator would set
/// `[capacity]`: the memory reported is what the set needs.
pub fn fitted(image: &Image) -> Limits {
    let fit = |n: usize| ((n as f64 * 1.1) as u32).max(1024);
    Limits {
        prefixes: fit(image.v4.len().max(image.v6.len())),
        regions: fit(image.regions.len()),
        segments: fit(image.segments.len()),
        slots: fit(image.slots.len()),
        v4_chunks: fit(image.v4_chunks.len() / portcullis_common::V4_CHUNK_ENTRIES as usize),
    }
}
