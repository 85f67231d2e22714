//! The compiled rules in the real programs, checked against the one-by-one
//! reference evaluator on seeded random rule sets (overlapping and nested
//! networks and port ranges, IPv4 and IPv6, every protocol class, peers, the
//! SSH exemption, other clusters, egress lists): every verdict and every
//! credited rule counter must agree.

use std::{
    cell::{Cell, RefCell},
    net::IpAddr,
};

use aya::maps::{Array, Map, MapData, PerCpuArray};
use portcullis::{
    compile::{self, Limits, strategies},
    dataplane::{Dataplane, Program},
    rules::RuleSet,
};
use portcullis_common::{
    Counter, DIR_EGRESS, DIR_INGRESS, PCLASS_ICMP, PCLASS_OTHER, PCLASS_TCP, PCLASS_UDP,
    SLOT_INDEX_MASK, SLOT_KIND_FOREIGN, SLOT_KIND_PEER, SLOT_KIND_RULE, SLOT_KIND_SHIFT,
    SLOT_KIND_SSH, SLOT_NONE,
};
use portcullis_tests::{packet::*, *};
use proptest::{
    prelude::*,
    test_runner::{Config, RngAlgorithm, TestRng, TestRunner},
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const TC_CONTINUE: u32 = u32::MAX;
const TC_SHOT: u32 = 2;

/// Per-CPU sum of the rule counter of `slot` in generation `g`.
fn rule_packets(pins: &PinDir, g: u32, slot: u32) -> u64 {
    let path = portcullis::dataplane::maps_dir(pins.path()).join(format!("RULE_STATS_{g}"));
    let map: PerCpuArray<_, Counter> =
        PerCpuArray::try_from(Map::PerCpuArray(MapData::from_pin(path).unwrap())).unwrap();
    map.get(&(slot & SLOT_INDEX_MASK), 0)
        .unwrap()
        .iter()
        .map(|c| c.packets)
        .sum()
}

fn active(pins: &PinDir) -> u32 {
    let map: Array<_, u32> = Array::try_from(Map::Array(
        MapData::from_pin(portcullis::dataplane::maps_dir(pins.path()).join("ACTIVE")).unwrap(),
    ))
    .unwrap();
    map.get(&0, 0).unwrap()
}

/// A frame of protocol class `pclass` from `src` to `dst` (port for TCP/UDP).
fn frame(src: IpAddr, dst: IpAddr, pclass: usize, sport: u16, port: u16) -> Vec<u8> {
    let p = Pkt::new(&src.to_string(), &dst.to_string());
    match pclass {
        PCLASS_TCP => p.tcp(sport, port, SYN).bytes(),
        PCLASS_UDP => p.udp(sport, port).bytes(),
        // ICMP: the port is the type and code (`icmp_port`).
        PCLASS_ICMP => p
            .icmp((port >> 8) as u8, port as u8, sport, b"probe")
            .bytes(),
        _ => p.proto(47, &[0; 8]).bytes(),
    }
}

/// An ICMP probe's port (type << 8 | code): an echo request of `addr`'s
/// family (code 0 or 3), or a timestamp request (13), which nothing before
/// the rules decides in either direction.
fn icmp_probe(addr: IpAddr, n: u16) -> u16 {
    let echo = if addr.is_ipv4() { 8 } else { 128 };
    match n % 3 {
        0 => portcullis_common::icmp_port(echo, 0),
        1 => portcullis_common::icmp_port(echo, 3),
        _ => portcullis_common::icmp_port(13, 0),
    }
}

fn expected_ingress(slot: u32, pclass: usize) -> Reason {
    if slot == SLOT_NONE {
        return match pclass {
            PCLASS_TCP | PCLASS_UDP => Reason::DropNoRule,
            PCLASS_ICMP => Reason::DropIcmp,
            _ => Reason::DropProtocol,
        };
    }
    match slot >> SLOT_KIND_SHIFT {
        SLOT_KIND_RULE => Reason::PassRule,
        SLOT_KIND_PEER => Reason::PassPeer,
        SLOT_KIND_SSH => Reason::PassSsh,
        _ => Reason::DropOtherCluster,
    }
}

fn admits(slot: u32) -> bool {
    slot != SLOT_NONE && slot >> SLOT_KIND_SHIFT != SLOT_KIND_FOREIGN
}

fn probe() -> impl Strategy<Value = (IpAddr, usize, u16)> {
    (strategies::address(), 0usize..4, 0u16..700)
}

#[test]
fn kernel_verdicts_and_counters_match_the_reference() {
    require_root!();
    let pins = PinDir::new().unwrap();
    let dp = RefCell::new(Dataplane::load(pins.path(), 4096, &Limits::default()).unwrap());
    let mut runner = TestRunner::new_with_rng(
        Config {
            cases: 48,
            failure_persistence: None,
            // The connection table outlives a case, so a shrinking rerun would
            // meet flows of earlier runs: report the first failure as it is.
            max_shrink_iters: 0,
            ..Config::default()
        },
        TestRng::deterministic_rng(RngAlgorithm::ChaCha),
    );
    let checked = Cell::new(0u32);
    let unique_sport = Cell::new(20000u16);
    let strategy = (strategies::rule_set(), prop::collection::vec(probe(), 48));
    let result = runner.run(&strategy, |(set, probes): (RuleSet, Vec<_>)| {
        let mut dp = dp.borrow_mut();
        let image = compile::compile(&set, &Limits::default()).unwrap();
        let (entries, _) = compile::entries(&set);
        let g = dp.apply(&image, false).unwrap();
        prop_assert_eq!(active(&pins), g);
        for (i, (addr, pclass, port)) in probes.into_iter().enumerate() {
            let port = match pclass {
                PCLASS_ICMP => icmp_probe(addr, port),
                PCLASS_OTHER => 0,
                _ => port,
            };
            let local = local_for(addr);

            // Ingress: new traffic from `addr`, arriving (a test run) on an
            // interface no rule names: its list once rules name some.
            let dir = if image.if_classes.is_empty() {
                DIR_INGRESS
            } else {
                portcullis_common::ingress_dir(0)
            };
            let slot = compile::reference(&entries, dir, addr, pclass, port);
            let want = expected_ingress(slot, pclass);
            let before = pins.counter(want);
            let credited_before = rule_packets(&pins, g, slot);
            let out = dp
                .test_run(
                    Program::Ingress,
                    &frame(addr, local, pclass, 40000, port),
                    1,
                )
                .unwrap();
            prop_assert_eq!(
                out.retval,
                if want.passes() { XDP_PASS } else { XDP_DROP },
                "ingress {} class {} port {}",
                addr,
                pclass,
                port
            );
            prop_assert_eq!(
                pins.counter(want),
                before + 1,
                "ingress {} class {} port {}: reason {}",
                addr,
                pclass,
                port,
                want.name()
            );
            if want.passes() {
                prop_assert_eq!(
                    rule_packets(&pins, g, slot),
                    credited_before + 1,
                    "slot {:#x} not credited",
                    slot
                );
            }

            // Egress: a new flow to `addr`, from a source port no rule serves.
            // Peers are among the egress rules. A reply passes only on an
            // inbound flow the rules admitted: here only another protocol
            // (no ports) to `addr`, whose ingress probe just passed.
            unique_sport.set(unique_sport.get().wrapping_add(1).max(20000));
            let sport = if pclass == PCLASS_ICMP {
                i as u16
            } else {
                unique_sport.get()
            };
            let egress_slot = compile::reference(&entries, DIR_EGRESS, addr, pclass, port);
            let allowlist = !set.egress_rules.is_empty();
            let reply = pclass == PCLASS_OTHER && want.passes();
            let pass = !allowlist || reply || admits(egress_slot);
            let credited = allowlist && !reply && admits(egress_slot);
            let before = pins.counter(Reason::DropEgress);
            let credited_before = rule_packets(&pins, g, egress_slot);
            let out = dp
                .test_run(Program::Egress, &frame(local, addr, pclass, sport, port), 1)
                .unwrap();
            prop_assert_eq!(
                out.retval,
                if pass { TC_CONTINUE } else { TC_SHOT },
                "egress to {} class {} port {}",
                addr,
                pclass,
                port
            );
            prop_assert_eq!(pins.counter(Reason::DropEgress), before + u64::from(!pass));
            if credited {
                prop_assert_eq!(
                    rule_packets(&pins, g, egress_slot),
                    credited_before + 1,
                    "egress slot not credited"
                );
            }
            checked.set(checked.get() + 1);
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    eprintln!("{} probes checked in both directions", checked.get());
    assert!(checked.get() >= 48 * 48);
}

/// Rule sets A and B such that a mix of their maps admits a probe that
/// neither admits: A has 10/8 -> port 1000, B has 11/8 -> port 2000, and the
/// two compile to the same region and segment positions. A mix of A's
/// prefixes with B's segments admits 10.1.1.1:2000; B's prefixes with A's
/// segments admit 11.1.1.1:1000. Neither A nor B admits either.
fn mixing_pair() -> (RuleSet, RuleSet) {
    let set = |net: &str, port: u32| -> RuleSet {
        toml::from_str(&format!(
            "[[ingress_rules]]\nid = \"r\"\nfrom_port = {port}\nto_port = {port}\nip_ranges = [\"{net}\"]\nprotocol = \"tcp\"\n"
        ))
        .unwrap()
    };
    (set("10.0.0.0/8", 1000), set("11.0.0.0/8", 2000))
}

/// Swaps A and B `swaps` times (atomically, or in place) while another
/// thread keeps running the two probes through the ingress program; returns
/// how many probe runs were admitted, and how many ran.
fn swap_under_traffic(in_place: bool, swaps: usize) -> (u64, u64) {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    let pins = PinDir::new().unwrap();
    let mut dp = Dataplane::load(pins.path(), 4096, &Limits::default()).unwrap();
    let (a, b) = mixing_pair();
    let images = [
        compile::compile(&a, &Limits::default()).unwrap(),
        compile::compile(&b, &Limits::default()).unwrap(),
    ];
    assert_eq!(
        images[0].regions, images[1].regions,
        "the pair must share region layout"
    );
    dp.apply(&images[0], false).unwrap();
    let fd = dp.program_fd(Program::Ingress).unwrap();
    let probes = [
        Pkt::new("10.1.1.1", "10.200.0.1")
            .tcp(40000, 2000, SYN)
            .bytes(),
        Pkt::new("11.1.1.1", "10.200.0.1")
            .tcp(40000, 1000, SYN)
            .bytes(),
    ];
    let stop = AtomicBool::new(false);
    let (admitted, runs) = (AtomicU64::new(0), AtomicU64::new(0));
    std::thread::scope(|s| {
        s.spawn(|| {
            use std::os::fd::AsFd as _;
            while !stop.load(Ordering::Relaxed) {
                for p in &probes {
                    let out = portcullis::testrun::run(fd.as_fd(), p, 1).unwrap();
                    runs.fetch_add(1, Ordering::Relaxed);
                    if out.retval == XDP_PASS {
                        admitted.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
        for i in 0..swaps {
            let image = &images[(i + 1) % 2];
            if in_place {
                dp.apply_in_place_for_tests(image, false).unwrap();
                if admitted.load(Ordering::Relaxed) > 0 {
                    break;
                }
            } else {
                dp.apply(image, false).unwrap();
            }
        }
        stop.store(true, Ordering::Relaxed);
    });
    (admitted.into_inner(), runs.into_inner())
}

#[test]
fn generation_switch_never_shows_a_mix_of_two_rule_sets() {
    require_root!();
    let (admitted, runs) = swap_under_traffic(false, 2000);
    eprintln!("atomic: {runs} probe runs during 2000 swaps, {admitted} admitted");
    assert!(
        runs > 2000,
        "too little traffic during the swaps to mean anything"
    );
    assert_eq!(admitted, 0, "a probe saw a mix of two rule sets");
}

#[test]
fn the_same_test_catches_an_in_place_writer() {
    require_root!();
    let (admitted, runs) = swap_under_traffic(true, 20000);
    eprintln!("in place: {runs} probe runs, {admitted} admitted");
    assert!(
        admitted > 0,
        "the in-place writer was not caught: the test cannot see mixes"
    );
}

/// The keys of generation `g`'s map `name` (a hash map of `K` to `V`).
fn pinned_keys<K: aya::Pod + Ord, V: aya::Pod>(pins: &PinDir, name: &str, g: u32) -> Vec<K> {
    pinned_entries::<K, V>(pins, name, g)
        .into_iter()
        .map(|(k, _)| k)
        .collect()
}

/// The entries of generation `g`'s pinned hash map `name`, sorted by key.
fn pinned_entries<K: aya::Pod + Ord, V: aya::Pod>(
    pins: &PinDir,
    name: &str,
    g: u32,
) -> Vec<(K, V)> {
    let path = portcullis::dataplane::maps_dir(pins.path()).join(format!("{name}_{g}"));
    let map: aya::maps::HashMap<_, K, V> =
        aya::maps::HashMap::try_from(Map::HashMap(MapData::from_pin(path).unwrap())).unwrap();
    let mut entries: Vec<(K, V)> = map.iter().map(Result::unwrap).collect();
    entries.sort_unstable_by_key(|e| e.0);
    entries
}

/// Asserts that the sorted keys `got` are `want`'s, naming how many are
/// stale or missing (not listing thousands).
fn same_keys<K: Ord + Copy + std::fmt::Debug>(got: &[K], mut want: Vec<K>, what: &str) {
    want.sort_unstable();
    let stale: Vec<&K> = got
        .iter()
        .filter(|k| want.binary_search(k).is_err())
        .collect();
    let missing: Vec<&K> = want
        .iter()
        .filter(|k| got.binary_search(k).is_err())
        .collect();
    assert!(
        stale.is_empty() && missing.is_empty(),
        "{what}: {} stale keys (first {:?}), {} missing (first {:?})",
        stale.len(),
        stale.first(),
        missing.len(),
        missing.first()
    );
}

/// This host's test address of `remote`'s family.
fn local_for(remote: IpAddr) -> IpAddr {
    let local = if remote.is_ipv4() {
        "10.200.0.1"
    } else {
        "fd00:200::1"
    };
    local.parse().unwrap()
}

/// The ingress program's verdict on a TCP SYN from `src` to `dst`, port
/// `port`, from source port `sport` (one per probe: no flow is shared).
fn ingress_verdict(dp: &mut Dataplane, src: IpAddr, dst: IpAddr, sport: u16, port: u16) -> u32 {
    dp.test_run(
        Program::Ingress,
        &frame(src, dst, PCLASS_TCP, sport, port),
        1,
    )
    .unwrap()
    .retval
}

/// The IPv4 table's root is written only as far as the image's highest
/// direction: a generation written again with a shorter root keeps nothing
/// of the longer one. Set A admits 10.200.7.0/24 (a root block for
/// ingress); B has no IPv4 source (no root at all: the SSH exemption,
/// which has 0.0.0.0/0, is off in both). Written A, B, B, the
/// third write lands on A's generation: a source only A admitted is
/// dropped there, as the reference says.
#[test]
fn a_shorter_ipv4_root_leaves_nothing_of_the_longer_one() {
    require_root!();
    let pins = PinDir::new().unwrap();
    let limits = Limits::default();
    let mut dp = Dataplane::load(pins.path(), 4096, &limits).unwrap();
    let mut a = v6_rules(0xa, 1);
    a.ingress_rules[0].ip_ranges = vec!["10.200.7.0/24".into()];
    a.ssh.allow = false;
    let mut b = v6_rules(0xb, 1);
    b.ssh.allow = false;
    let src: IpAddr = "10.200.7.9".parse().unwrap();
    let dst: IpAddr = "10.200.0.1".parse().unwrap();
    for (step, set) in [&a, &b, &b].into_iter().enumerate() {
        let image = compile::compile(set, &limits).unwrap();
        let g = dp.apply(&image, false).unwrap();
        let want = if step == 0 { XDP_PASS } else { XDP_DROP };
        let got = ingress_verdict(&mut dp, src, dst, 42000 + step as u16, 80);
        assert_eq!(got, want, "step {step}: generation {g}");
    }
}

/// A kept IPv6 table written again with the same keys and other values:
/// P admits A (`fd00:200:1::/64`) on port 80; Q adds Z
/// (`fd00:200:0::/64`, port 82), sorted before A, so A's region number
/// moves. Written so that each generation gets both (kept tables, no read-back),
/// A stays admitted on 80 and Z only while Q is live.
#[test]
fn a_kept_ipv6_table_takes_changed_values() {
    require_root!();
    let pins = PinDir::new().unwrap();
    let limits = Limits::default();
    let mut dp = Dataplane::load(pins.path(), 4096, &limits).unwrap();
    let rule = |id: &str, net: &str, port: u32| {
        let mut r = v6_rules(0xa, 1).ingress_rules.remove(0);
        (r.id, r.ip_ranges, r.from_port, r.to_port) = (id.into(), vec![net.into()], port, port);
        r
    };
    let a = rule("a", "fd00:200:1::/64", 80);
    let p = RuleSet {
        ingress_rules: vec![a.clone()],
        ..Default::default()
    };
    let q = RuleSet {
        ingress_rules: vec![rule("z", "fd00:200::/64", 82), a],
        ..Default::default()
    };
    let dst: IpAddr = "fd00:200::1".parse().unwrap();
    // Each generation gets P and Q in turn.
    let steps = [
        (&p, false),
        (&q, true),
        (&q, true),
        (&p, false),
        (&p, false),
        (&q, true),
    ];
    for (step, (set, is_q)) in steps.into_iter().enumerate() {
        let g = dp
            .apply(&compile::compile(set, &limits).unwrap(), false)
            .unwrap();
        for (src, port, want) in [
            ("fd00:200:1::9", 80, XDP_PASS),
            ("fd00:200::9", 82, if is_q { XDP_PASS } else { XDP_DROP }),
        ] {
            let src: IpAddr = src.parse().unwrap();
            let sport = 43000 + (step * 2) as u16 + u16::from(port == 82);
            assert_eq!(
                ingress_verdict(&mut dp, src, dst, sport, port),
                want,
                "step {step} (generation {g}): {src} port {port}"
            );
        }
    }
}

/// `n` rules, each admitting TCP port 80 from its own IPv6 /64 under
/// `fd00:200:<site>::/48`.
fn v6_rules(site: u16, n: u16) -> RuleSet {
    let rules = (0..n)
        .map(|i| portcullis::rules::FirewallRule {
            id: format!("s{site}-{i}"),
            from_port: 80,
            to_port: 80,
            ip_ranges: vec![format!("fd00:200:{site:x}:{i:x}::/64")],
            names: Vec::new(),
            protocol: portcullis::rules::Protocol::Tcp,
            description: None,
            icmp_types: Vec::new(),
            expires: None,
            rate: None,
            burst: None,
            interfaces: Vec::new(),
        })
        .collect();
    RuleSet {
        ingress_rules: rules,
        ..Default::default()
    }
}

/// A generation whose IPv6 tables were too large to keep holds only their
/// digest: written again with the same tables (an IPv4 rule added) the
/// write is skipped, with other tables (the same keys mostly, every value
/// moved by a rule sorted first) it is read back and rewritten; a small
/// set's kept tables, forgotten for their digest by a large set's write,
/// are skipped by that digest and kept again. Whichever happened, each
/// generation's maps hold exactly its image's entries, and the verdicts
/// follow the live set.
#[test]
fn large_ipv6_tables_written_again_hold_exactly_the_new_entries() {
    require_root!();
    let pins = PinDir::new().unwrap();
    let limits = Limits::default();
    let mut dp = Dataplane::load(pins.path(), 4096, &limits).unwrap();
    let large = v6_rules(0xa, 17000);
    let mut first = large.clone();
    let mut z = v6_rules(0x9, 1).ingress_rules.remove(0);
    (z.from_port, z.to_port) = (82, 82);
    first.ingress_rules.insert(0, z);
    let mut with_v4 = large.clone();
    let mut v4 = v6_rules(0xb, 1).ingress_rules.remove(0);
    (v4.id, v4.ip_ranges, v4.from_port, v4.to_port) =
        ("v4".into(), vec!["10.200.9.0/24".into()], 23, 23);
    with_v4.ingress_rules.push(v4);
    let sets = [large, first, with_v4, v6_rules(0xc, 5)];
    let images: Vec<_> = sets
        .iter()
        .map(|s| compile::compile(s, &limits).unwrap())
        .collect();
    assert_eq!(images[2].v6_tables, images[0].v6_tables);
    let moved = images[1].v6_tables.prefixes.entries().iter();
    assert!(
        moved
            .filter(|(k, v)| images[0].v6_tables.prefixes.get(k).is_some_and(|w| w != v))
            .count()
            > 16000,
        "the rule sorted first moves the other prefixes' regions"
    );
    // Each generation in turn: the same tables again (skipped), others; a
    // small set's kept tables forgotten for their digest by a large set's
    // write, then the small set again (skipped by that digest).
    let order = [0, 1, 2, 1, 0, 2, 2, 0, 1, 1, 3, 0, 3, 1, 3, 3];
    for (step, i) in order.into_iter().enumerate() {
        let image = &images[i];
        let g = dp.apply(image, false).unwrap();
        let what = format!("step {step}: generation {g} (set {i})");
        let got = pinned_entries::<[u8; 18], u32>(&pins, "V6_PREFIXES", g);
        assert!(
            got == image.v6_tables.prefixes.entries(),
            "{what}: V6_PREFIXES holds other entries than the image's"
        );
        let got = pinned_entries::<[u8; 5], [u8; 8]>(&pins, "V6_BUCKETS", g);
        assert!(
            got == image.v6_tables.buckets.entries(),
            "{what}: V6_BUCKETS holds other entries than the image's"
        );
        for (src, port, admitted) in [
            ("fd00:200:a:7::1", 80, i != 3),
            ("fd00:200:c:3::1", 80, i == 3),
            ("fd00:200:9::1", 82, i == 1),
            ("10.200.9.1", 23, i == 2),
        ] {
            let want = if admitted { XDP_PASS } else { XDP_DROP };
            let sport = 44000 + (step * 4) as u16 + port;
            let src: IpAddr = src.parse().unwrap();
            let got = ingress_verdict(&mut dp, src, local_for(src), sport, port);
            assert_eq!(got, want, "{what}: {src} port {port}");
        }
    }
}

/// The IPv6 tables of a set too large to keep (`V6_KEEP`) are read back
/// from the kernel when their generation is written next: every key of
/// the old set goes, and a source only the old set admitted is dropped.
#[test]
fn large_ipv6_tables_are_read_back_and_nothing_stale_stays() {
    require_root!();
    let pins = PinDir::new().unwrap();
    let limits = Limits::default();
    let mut dp = Dataplane::load(pins.path(), 4096, &limits).unwrap();
    let sets = [
        v6_rules(0xa, 17000),
        v6_rules(0xb, 17000),
        v6_rules(0xc, 1),
        v6_rules(0xd, 100),
    ];
    let images: Vec<_> = sets
        .iter()
        .map(|s| compile::compile(s, &limits).unwrap())
        .collect();
    // Large and small sets in turn: a large set's write drops the tables
    // kept for the other generation too (read back when it is written).
    for (step, i) in [0, 1, 2, 0, 2, 1, 2, 3, 0, 3, 1, 2, 0]
        .into_iter()
        .enumerate()
    {
        let image = &images[i];
        let g = dp.apply(image, false).unwrap();
        let want: Vec<[u8; 18]> = image.v6_tables.prefixes.keys().copied().collect();
        let got = pinned_keys::<[u8; 18], u32>(&pins, "V6_PREFIXES", g);
        same_keys(
            &got,
            want,
            &format!("step {step}: V6_PREFIXES_{g} (set {i})"),
        );
        let want: Vec<[u8; 5]> = image.v6_tables.buckets.keys().copied().collect();
        let got = pinned_keys::<[u8; 5], [u8; 8]>(&pins, "V6_BUCKETS", g);
        same_keys(
            &got,
            want,
            &format!("step {step}: V6_BUCKETS_{g} (set {i})"),
        );
        // A source of the first set, admitted only while it is live.
        let src: IpAddr = "fd00:200:a:7::1".parse().unwrap();
        let dst: IpAddr = "fd00:200::1".parse().unwrap();
        let want = if i == 0 { XDP_PASS } else { XDP_DROP };
        let got = ingress_verdict(&mut dp, src, dst, 41000 + step as u16, 80);
        assert_eq!(got, want, "step {step}: set {i} live");
    }
}
