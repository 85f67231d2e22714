//! The packet fuzzer: random and mutated frames through the real XDP and TC
//! programs (`BPF_PROG_TEST_RUN`), each verdict and counted reason compared
//! with a reference model that keeps its own copy of the connection table.
//!
//! The model is written from the documented semantics, independently of the
//! data path's code: a plain parser (VLAN, IPv4 IHL, the IPv6 extension
//! chain, transport headers, bounds: the frame's and what the IP header says
//! the packet holds) and the decision order (connection table (for a TCP
//! SYN without ACK: after the rules, when they would drop it), DHCP replies
//! after a request, neighbour discovery, pings, rules by the one-by-one
//! reference evaluator; ICMP meets them with its type and code). Its connection table keeps what this host opened
//! apart from inbound flows the rules admitted, which never admit a packet
//! by themselves. Two cases are outside it and only checked to end
//! in PASS or DROP: non-first fragments (their verdict depends on the
//! fragment table) and ICMP errors (they quote another packet).
//!
//! Seeded and bounded, so CI is deterministic: the frames of
//! fuzz/corpus/packets (every discrepancy found, once fixed, is kept there),
//! then rounds of generated traffic. Each round starts with an empty
//! connection table in both, opens flows through the egress program, and
//! sends replies, strangers and mutations (truncations, bit flips, random
//! header bytes) at the ingress program.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use portcullis::{
    compile::{self, Entry, Limits},
    dataplane::{Dataplane, Program},
    fuzzing::Xorshift,
    rules::RuleSet,
};
use portcullis_common::{
    DIR_INGRESS, FlowKey, PCLASS_ICMP, PCLASS_OTHER, PCLASS_TCP, PCLASS_UDP, SLOT_KIND_PEER,
    SLOT_KIND_RULE, SLOT_KIND_SHIFT, SLOT_KIND_SSH, SLOT_NONE,
};
use portcullis_tests::{packet::*, *};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const TC_UNSPEC: u32 = u32::MAX;

const RULES: &str = r#"
[[ingress_rules]]
id = "typed-icmp"
from_port = 0
to_port = 0
ip_ranges = ["10.200.1.0/24", "fd00:200::/48"]
protocol = "icmp"
icmp_types = ["echo-request", "icmp:13/0", "destination-unreachable/4"]
[[ingress_rules]]
id = "web"
from_port = 8000
to_port = 8100
ip_ranges = ["10.200.0.0/16"]
protocol = "tcp"
[[ingress_rules]]
id = "media"
from_port = 5000
to_port = 5010
ip_ranges = []
protocol = "udp"
[[ingress_rules]]
id = "v6-any"
from_port = 9000
to_port = 9000
ip_ranges = ["fd00:200::/32"]
protocol = "any"
[[ingress_rules]]
id = "monitor-ping"
from_port = 0
to_port = 0
ip_ranges = ["10.200.5.0/24"]
protocol = "icmp"
[ssh]
allow = true
sources = ["10.200.7.0/24", "fd00:200:7::/48"]
[cluster]
id = "a"
peers = ["10.200.9.0/24", "fd00:200:9::/48"]
other_clusters = ["10.200.8.0/24"]
"#;

const LOCAL_V4: &str = "10.200.0.1";
const LOCAL_V6: &str = "fd00:200::1";
const REMOTES_V4: &[&str] = &[
    "10.200.1.5",
    "10.200.5.5",
    "10.200.7.7",
    "10.200.8.8",
    "10.200.9.9",
    "192.0.2.1",
];
const REMOTES_V6: &[&str] = &[
    "fd00:200::5",
    "fd00:200:7::7",
    "fd00:200:9::9",
    "2001:db8::1",
];
const PORTS: &[u16] = &[
    22, 53, 67, 68, 546, 547, 5000, 5005, 5010, 5011, 7999, 8000, 8050, 8100, 8101, 9000, 9001,
];

// ---------------------------------------------------------------- the model

/// A flow as the model keeps it: (family, proto, local, remote, local port,
/// remote port).
type Flow = (u8, u8, [u8; 16], [u8; 16], u16, u16);

#[derive(Debug)]
enum Frame {
    Arp,
    Other,
    VlanStack,
    Ip(Ip),
}

#[derive(Debug, Default)]
struct Ip {
    family: u8,
    proto: u8,
    hop: u8,
    flags: u8,
    src: [u8; 16],
    dst: [u8; 16],
    later_fragment: bool,
    sport: u16,
    dport: u16,
    icmp_type: u8,
    icmp_code: u8,
    icmp_id: u16,
}

/// Bytes `off..off + n`, if the frame has them and `off` is within the
/// data path's 512-byte bound.
fn get(b: &[u8], off: usize, n: usize) -> Option<&[u8]> {
    (off <= 512 && off + n <= b.len()).then(|| &b[off..off + n])
}

/// The same, and inside the IP packet, which ends at `end`.
fn inside(b: &[u8], off: usize, n: usize, end: usize) -> Option<&[u8]> {
    if off + n > end {
        return None;
    }
    get(b, off, n)
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

/// `None`: malformed. Inbound.
fn parse(b: &[u8]) -> Option<Frame> {
    parse_dir(b, false)
}

/// `outbound`: a GSO packet may have 0 in its IP length field (BIG TCP);
/// it then ends with the frame.
fn parse_dir(b: &[u8], outbound: bool) -> Option<Frame> {
    let mut et = be16(get(b, 12, 2)?);
    let mut off = 14;
    if et == 0x8100 || et == 0x88a8 {
        et = be16(get(b, off + 2, 2)?);
        off += 4;
        if et == 0x8100 || et == 0x88a8 {
            return Some(Frame::VlanStack);
        }
    }
    match et {
        0x0806 => Some(Frame::Arp),
        0x0800 => ipv4(b, off, outbound).map(Frame::Ip),
        0x86dd => ipv6(b, off, outbound).map(Frame::Ip),
        _ => Some(Frame::Other),
    }
}

fn ipv4(b: &[u8], off: usize, outbound: bool) -> Option<Ip> {
    let h = get(b, off, 20)?;
    let ihl = usize::from(h[0] & 15) * 4;
    let total = match usize::from(be16(&h[2..])) {
        0 if outbound => b.len().saturating_sub(off),
        n => n,
    };
    if h[0] >> 4 != 4 || ihl < 20 || total < ihl {
        return None;
    }
    let mut ip = Ip {
        family: 4,
        proto: h[9],
        hop: h[8],
        later_fragment: be16(&h[6..]) & 0x1fff != 0,
        ..Ip::default()
    };
    ip.src[..4].copy_from_slice(&h[12..16]);
    ip.dst[..4].copy_from_slice(&h[16..20]);
    if !ip.later_fragment {
        transport(b, off + ihl, off + total, &mut ip)?;
    }
    Some(ip)
}

fn ipv6(b: &[u8], off: usize, outbound: bool) -> Option<Ip> {
    let h = get(b, off, 40)?;
    if h[0] >> 4 != 6 {
        return None;
    }
    let mut ip = Ip {
        family: 6,
        proto: h[6],
        hop: h[7],
        ..Ip::default()
    };
    ip.src.copy_from_slice(&h[8..24]);
    ip.dst.copy_from_slice(&h[24..40]);
    let end = match usize::from(be16(&h[4..])) {
        0 if outbound => b.len(),
        n => off + 40 + n,
    };
    let mut l4 = off + 40;
    // At most five extension headers; a sixth is refused.
    for _ in 0..6 {
        let len = match ip.proto {
            0 | 43 | 60 => (usize::from(inside(b, l4, 2, end)?[1]) + 1) * 8,
            51 => (usize::from(inside(b, l4, 2, end)?[1]) + 2) * 4,
            44 => {
                ip.later_fragment = be16(&inside(b, l4, 8, end)?[2..]) & 0xfff8 != 0;
                8
            }
            _ => {
                transport(b, l4, end, &mut ip)?;
                return Some(ip);
            }
        };
        ip.proto = get(b, l4, 1)?[0];
        l4 += len;
        // Every extension header lies wholly inside the packet.
        if l4 > 512 || l4 > end {
            return None;
        }
        if ip.later_fragment {
            return Some(ip);
        }
    }
    None
}

/// The transport header at `l4`, wholly inside the packet (which ends at
/// `end`): TCP with its options (data offset), UDP's 8 bytes, ICMP's 8.
fn transport(b: &[u8], l4: usize, end: usize, ip: &mut Ip) -> Option<()> {
    match ip.proto {
        TCP => {
            let t = inside(b, l4, 20, end)?;
            let doff = usize::from(t[12] >> 4) * 4;
            if doff < 20 || l4 + doff > end {
                return None;
            }
            (ip.sport, ip.dport, ip.flags) = (be16(t), be16(&t[2..]), t[13]);
        }
        UDP => {
            let u = inside(b, l4, 8, end)?;
            (ip.sport, ip.dport) = (be16(u), be16(&u[2..]));
        }
        ICMP | ICMPV6 => {
            let i = inside(b, l4, 8, end)?;
            (ip.icmp_type, ip.icmp_code, ip.icmp_id) = (i[0], i[1], be16(&i[4..]));
        }
        _ => {}
    }
    Some(())
}

fn addr(family: u8, a: &[u8; 16]) -> IpAddr {
    if family == 4 {
        IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(*a))
    }
}

struct Model {
    entries: Vec<Entry>,
    /// Flows this host opened: they admit inbound packets.
    flows: HashSet<Flow>,
    /// Inbound flows the rules admitted, and half-open inbound TCP
    /// connections (this host's SYN-ACK): they admit nothing inbound, and
    /// this host's packets on them open no flow of its own.
    inbound: HashSet<Flow>,
    /// Whether this host has sent a DHCP client request (IPv4, IPv6); the
    /// window after it (a minute) outlasts the run.
    dhcp_requested: [bool; 2],
}

impl Model {
    /// The flow `ip` belongs to, seen from this host, if any.
    fn flow(ip: &Ip, outbound: bool) -> Option<Flow> {
        let (local, remote, lp, rp) = if outbound {
            (ip.src, ip.dst, ip.sport, ip.dport)
        } else {
            (ip.dst, ip.src, ip.dport, ip.sport)
        };
        let (lp, rp) = match ip.proto {
            TCP | UDP => (lp, rp),
            ICMP | ICMPV6 => {
                let echo = matches!(
                    (outbound, ip.proto, ip.icmp_type),
                    (true, ICMP, 8) | (true, ICMPV6, 128) | (false, ICMP, 0) | (false, ICMPV6, 129)
                );
                if !echo {
                    return None;
                }
                (ip.icmp_id, 0)
            }
            _ => (0, 0),
        };
        Some((ip.family, ip.proto, local, remote, lp, rp))
    }

    /// Egress (allow-all): every frame passes; IP frames are counted and
    /// open their flow (TCP only with a bare SYN) unless they belong to an
    /// inbound one; DHCP client requests are remembered.
    fn egress(&mut self, b: &[u8]) -> Option<Reason> {
        let Some(Frame::Ip(ip)) = parse_dir(b, true) else {
            return None;
        };
        if !ip.later_fragment && ip.proto == UDP {
            match (ip.family, ip.sport, ip.dport) {
                (4, 68, 67) => self.dhcp_requested[0] = true,
                (6, 546, 547) => self.dhcp_requested[1] = true,
                _ => {}
            }
        }
        let Some(flow) = Model::flow(&ip, true).filter(|_| !ip.later_fragment) else {
            return Some(Reason::PassEgress);
        };
        let (known, synack) = (
            self.inbound.contains(&flow) || self.flows.contains(&flow),
            ip.flags & (0x02 | 0x10 | 0x04) == 0x02 | 0x10,
        );
        if ip.proto == TCP && synack && !known {
            // This host's SYN-ACK makes the half-open entry (no allowlist:
            // the admitted SYN made none); nothing it sends on that
            // connection opens a flow of its own.
            self.inbound.insert(flow);
        } else if !known && !matches!(ip.proto, TCP | ICMP | ICMPV6) && self.serves(&ip) {
            // A service's reply (the rules admit its destination to its
            // source port) with no flow: recorded as inbound, so the rules
            // go on deciding what arrives on it.
            self.inbound.insert(flow);
        } else if !self.inbound.contains(&flow)
            && (ip.proto != TCP
                || ip.flags & (0x02 | 0x10 | 0x04) == 0x02
                || self.flows.contains(&flow))
        {
            self.flows.insert(flow);
        }
        Some(Reason::PassEgress)
    }

    /// Ingress: the reason, or `None` outside the model. What the rules
    /// admit is recorded as an inbound flow.
    fn ingress(&mut self, b: &[u8]) -> Option<Reason> {
        let reason = self.verdict(b);
        if matches!(
            reason,
            Some(Reason::PassRule | Reason::PassPeer | Reason::PassSsh)
        ) && let Some(Frame::Ip(ip)) = parse(b)
            && let Some(flow) = Model::flow(&ip, false)
            // Not a TCP connection: without an egress allowlist its SYN
            // records nothing; this host's SYN-ACK makes it half-open (see
            // `egress`), and only the ACK of that SYN-ACK's sequence number
            // completes it, which these frames, with sequence numbers 0,
            // never carry.
            && ip.proto != TCP
        {
            self.inbound.insert(flow);
        }
        reason
    }

    fn verdict(&self, b: &[u8]) -> Option<Reason> {
        let ip = match parse(b) {
            None => return Some(Reason::DropMalformed),
            Some(Frame::Arp) => return Some(Reason::PassArp),
            Some(Frame::Other) => return Some(Reason::DropEthertype),
            Some(Frame::VlanStack) => return Some(Reason::DropVlanStack),
            Some(Frame::Ip(ip)) => ip,
        };
        if ip.later_fragment {
            return None;
        }
        // A flow this host opened; a TCP SYN without ACK (a simultaneous
        // open) only when the policy would drop it.
        let opened = Model::flow(&ip, false).is_some_and(|f| self.flows.contains(&f));
        let syn = ip.proto == TCP && ip.flags & (0x02 | 0x10) == 0x02;
        if opened && !syn {
            return Some(Reason::PassEstablished);
        }
        let dhcp = if ip.family == 6 { (547, 546) } else { (67, 68) };
        let requested = self.dhcp_requested[usize::from(ip.family == 6)];
        let reason = match ip.proto {
            TCP => self.rules(&ip, PCLASS_TCP, ip.dport, Reason::DropNoRule),
            UDP if (ip.sport, ip.dport) == dhcp && requested => Reason::PassDhcp,
            UDP => self.rules(&ip, PCLASS_UDP, ip.dport, Reason::DropNoRule),
            ICMP | ICMPV6 => {
                let v6 = ip.proto == ICMPV6;
                let t = ip.icmp_type;
                if v6 != (ip.family == 6) {
                    Reason::DropIcmp
                } else if v6 && (133..=137).contains(&t) {
                    if ip.hop == 255 {
                        Reason::PassNeighbor
                    } else {
                        Reason::DropIcmp
                    }
                } else if (v6 && matches!(t, 1..=4)) || (!v6 && matches!(t, 3 | 11 | 12)) {
                    return None; // errors quote another packet
                } else {
                    // Echo requests and the rest: the rules, on the type
                    // and code (no pings setting here).
                    let port = u16::from(t) << 8 | u16::from(ip.icmp_code);
                    self.rules(&ip, PCLASS_ICMP, port, Reason::DropIcmp)
                }
            }
            _ => self.rules(&ip, PCLASS_OTHER, 0, Reason::DropProtocol),
        };
        Some(if opened && !reason.passes() {
            Reason::PassEstablished
        } else {
            reason
        })
    }

    /// Whether the ingress rules admit this host's outbound `ip`'s
    /// destination to its source port (`policy::served`).
    fn serves(&self, ip: &Ip) -> bool {
        let (pclass, port) = if ip.proto == UDP {
            (PCLASS_UDP, ip.sport)
        } else {
            (PCLASS_OTHER, 0)
        };
        portcullis_common::slot_admits(self.ingress_slot(ip.family, &ip.dst, pclass, port))
    }

    /// The slot the ingress rules give new traffic from `remote`.
    fn ingress_slot(&self, family: u8, remote: &[u8; 16], pclass: usize, port: u16) -> u32 {
        compile::reference(
            &self.entries,
            DIR_INGRESS,
            addr(family, remote),
            pclass,
            port,
        )
    }

    fn rules(&self, ip: &Ip, pclass: usize, port: u16, otherwise: Reason) -> Reason {
        let slot = self.ingress_slot(ip.family, &ip.src, pclass, port);
        if slot == SLOT_NONE {
            return otherwise;
        }
        match slot >> SLOT_KIND_SHIFT {
            SLOT_KIND_RULE => Reason::PassRule,
            SLOT_KIND_PEER => Reason::PassPeer,
            SLOT_KIND_SSH => Reason::PassSsh,
            _ => Reason::DropOtherCluster,
        }
    }
}

// ------------------------------------------------------------ the generator

/// A well-formed frame between `local` and a random remote, one way or
/// the other, with the odd VLAN tag, IPv4 options or IPv6 extension header.
fn frame(rng: &mut Xorshift, v6: bool, outbound: bool, local_port: u16) -> Vec<u8> {
    let local = if v6 { LOCAL_V6 } else { LOCAL_V4 };
    let remote = *rng.pick(if v6 { REMOTES_V6 } else { REMOTES_V4 });
    let (src, dst) = if outbound {
        (local, remote)
    } else {
        (remote, local)
    };
    let mut p = Pkt::new(src, dst);
    if rng.chance(10) {
        p = p.vlan(100);
    }
    if !v6 && rng.chance(10) {
        p = p.ipv4_options(4 * rng.below(11));
    }
    if v6 && rng.chance(15) {
        p = p.ext(*rng.pick(&[HOPOPTS, ROUTING, DSTOPTS]), rng.below(3) as u8);
    }
    let remote_port = *rng.pick(PORTS);
    let (sport, dport) = if outbound {
        (local_port, remote_port)
    } else {
        (remote_port, local_port)
    };
    let icmp = if v6 { ICMPV6 } else { ICMP };
    let p = match rng.below(10) {
        0..=3 => p.tcp(
            sport,
            dport,
            *rng.pick(&[SYN, SYN | ACK, ACK, 0x04, 0x01 | ACK, 0x18]),
        ),
        4..=6 => p.udp(sport, dport),
        7 => {
            let kinds: &[u8] = if v6 {
                &[128, 129, 133, 135, 136, 2, 1, 200]
            } else {
                &[8, 0, 3, 11, 13, 14, 42]
            };
            let p = p.icmp(*rng.pick(kinds), *rng.pick(&[0, 0, 4]), local_port, b"fuzz");
            if v6 && rng.chance(50) { p.ttl(255) } else { p }
        }
        8 => p.proto(*rng.pick(&[47, 50, 132, icmp ^ 0x39]), &[0; 12]),
        _ => p
            .fragment(rng.next_u64() as u32, rng.below(3) as u16, rng.chance(50))
            .udp(sport, dport),
    };
    p.bytes()
}

/// A reply to the outbound frame `out` (addresses and ports swapped; an
/// echo reply to an echo request), if it is one the generator can answer.
fn reply(rng: &mut Xorshift, out: &[u8]) -> Option<Vec<u8>> {
    let Some(Frame::Ip(ip)) = parse(out) else {
        return None;
    };
    let (src, dst) = (
        addr(ip.family, &ip.dst).to_string(),
        addr(ip.family, &ip.src).to_string(),
    );
    let p = Pkt::new(&src, &dst);
    Some(
        match ip.proto {
            TCP => p.tcp(
                ip.dport,
                ip.sport,
                // A bare SYN: the other end of a simultaneous open.
                *rng.pick(&[SYN | ACK, ACK, 0x04, 0x01 | ACK, SYN]),
            ),
            UDP => p.udp(ip.dport, ip.sport),
            ICMP if ip.icmp_type == 8 => p.icmp(0, 0, ip.icmp_id, b"fuzz"),
            ICMPV6 if ip.icmp_type == 128 => p.icmp(129, 0, ip.icmp_id, b"fuzz"),
            _ => return None,
        }
        .bytes(),
    )
}

/// Damage: truncation, bit flips and random bytes in the headers (never
/// below `min` bytes: `BPF_PROG_TEST_RUN` wants an Ethernet header for XDP,
/// and for TC the whole IP header of an IP ethertype too), or bytes after
/// the IP packet (padding, or an attacker's trailer that the kernel trims).
fn mutate(rng: &mut Xorshift, mut b: Vec<u8>, min: usize) -> Vec<u8> {
    match rng.below(10) {
        0..=3 => {}
        4 => {
            for _ in 0..1 + rng.below(40) {
                b.push(rng.next_u64() as u8);
            }
        }
        5 | 6 => {
            let len = min + rng.below(b.len().saturating_sub(min) + 1);
            b.truncate(len);
        }
        7 | 8 => {
            for _ in 0..1 + rng.below(3) {
                let i = rng.below(b.len().min(90));
                b[i] ^= 1 << rng.below(8);
            }
        }
        _ => {
            let i = 12 + rng.below(b.len().min(80) - 12);
            b[i] = rng.next_u64() as u8;
        }
    }
    b
}

// ------------------------------------------------------------------- the test

struct Kernel {
    dp: Dataplane,
    pins: PinDir,
}

impl Kernel {
    fn reasons(&self) -> HashMap<Reason, u64> {
        self.pins.counters().unwrap().into_iter().collect()
    }

    /// Empties the connection tables: flows this host opened, inbound
    /// flows, half-open inbound connections; and the flow caches, as the
    /// daemon does after a removal.
    fn clear_flows(&mut self) {
        fn clear<K: aya::Pod, V: aya::Pod>(path: std::path::PathBuf) {
            let mut map: BpfHashMap<_, K, V> =
                BpfHashMap::try_from(Map::LruHashMap(MapData::from_pin(path).unwrap())).unwrap();
            let keys: Vec<K> = map.keys().flatten().collect();
            for k in keys {
                let _ = map.remove(&k);
            }
        }
        let dir = portcullis::dataplane::maps_dir(self.pins.path());
        let (out, inbound) = (
            portcullis_common::maps::CONNTRACK,
            portcullis_common::maps::INBOUND,
        );
        for [v4, v6] in [out, inbound, portcullis_common::maps::INBOUND_OTHER] {
            clear::<portcullis_common::FlowKey4, portcullis_common::Flow>(dir.join(v4));
            clear::<FlowKey, portcullis_common::Flow>(dir.join(v6));
        }
        let [v4, v6] = portcullis_common::maps::EMBRYO;
        clear::<portcullis_common::FlowKey4, portcullis_common::Embryo>(dir.join(v4));
        clear::<FlowKey, portcullis_common::Embryo>(dir.join(v6));
        self.dp.forget_cached_flows();
    }
}

/// Runs one frame through both and compares; returns whether it was inside
/// the model.
fn check(kernel: &mut Kernel, model: &mut Model, outbound: bool, b: &[u8], what: &str) -> bool {
    let before = kernel.reasons();
    let program = if outbound {
        Program::Egress
    } else {
        Program::Ingress
    };
    let retval = kernel
        .dp
        .test_run(program, b, 1)
        .unwrap_or_else(|e| panic!("{what}: test run of {} bytes: {e}", b.len()))
        .retval;
    let after = kernel.reasons();
    let counted: Vec<Reason> = after
        .iter()
        .filter(|(r, n)| before.get(r) != Some(n))
        .map(|(r, _)| *r)
        .collect();
    let want = if outbound {
        model.egress(b)
    } else {
        model.ingress(b)
    };
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    if outbound {
        assert_eq!(retval, TC_UNSPEC, "{what}: egress dropped {hex}");
        assert_eq!(
            counted,
            want.into_iter().collect::<Vec<_>>(),
            "{what}: egress counted {counted:?}, model {want:?}\n{hex}"
        );
        return true;
    }
    match want {
        Some(reason) => {
            assert_eq!(
                (retval, counted.as_slice()),
                (
                    if reason.passes() { XDP_PASS } else { XDP_DROP },
                    &[reason][..]
                ),
                "{what}: kernel {retval} {counted:?}, model {reason:?}\n{hex}"
            );
            true
        }
        None => {
            assert!(retval == XDP_PASS || retval == XDP_DROP, "{what}: {retval}");
            assert_eq!(
                counted.len(),
                1,
                "{what}: one reason per packet: {counted:?}"
            );
            false
        }
    }
}

#[test]
fn random_and_mutated_packets_get_the_reference_verdicts() {
    require_root!();
    let set: RuleSet = toml::from_str(RULES).unwrap();
    set.validate().unwrap();
    let pins = PinDir::new().unwrap();
    let mut dp = Dataplane::load(pins.path(), 4096, &Limits::default()).unwrap();
    dp.apply(&compile::compile(&set, &Limits::default()).unwrap(), false)
        .unwrap();
    let mut kernel = Kernel { dp, pins };
    let (entries, _) = compile::entries(&set);
    let mut model = Model {
        entries,
        flows: HashSet::new(),
        inbound: HashSet::new(),
        dhcp_requested: [false; 2],
    };

    // The saved corpus: "in|out HEX" per line.
    let corpus = include_str!("../../fuzz/corpus/packets/frames.txt");
    let mut replayed = 0;
    for line in corpus
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
    {
        let (dir, hex) = line.split_once(' ').expect("DIR HEX");
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        check(
            &mut kernel,
            &mut model,
            dir == "out",
            &bytes,
            &format!("corpus line {line}"),
        );
        replayed += 1;
    }

    let mut rng = Xorshift(0x5eed_cafe_f00d_0001);
    let (mut inside, mut total) = (0u32, 0u32);
    let mut reasons = HashMap::new();
    let mut simultaneous = [0u32; 2];
    for round in 0..40u16 {
        kernel.clear_flows();
        model.flows.clear();
        model.inbound.clear();
        // This round's local ports: replies to them belong to its flows only.
        let base = 40000 + round * 16;
        let mut sent = Vec::new();
        for i in 0..8 {
            let v6 = rng.chance(40);
            let b = frame(&mut rng, v6, true, base + i);
            sent.push(b.clone());
            let b = if rng.chance(20) {
                mutate(&mut rng, b, 14 + 40)
            } else {
                b
            };
            check(
                &mut kernel,
                &mut model,
                true,
                &b,
                &format!("round {round} egress {i}"),
            );
        }
        for i in 0..60 {
            let v6 = rng.chance(40);
            let local_port = if rng.chance(50) {
                base + rng.below(8) as u16
            } else {
                *rng.pick(PORTS)
            };
            let answer = if rng.chance(30) {
                let out = rng.pick(&sent).clone();
                reply(&mut rng, &out)
            } else {
                None
            };
            let b = answer.unwrap_or_else(|| frame(&mut rng, v6, false, local_port));
            let b = mutate(&mut rng, b, 14);
            total += 1;
            if check(
                &mut kernel,
                &mut model,
                false,
                &b,
                &format!("round {round} ingress {i}"),
            ) {
                inside += 1;
                let reason = model.verdict(&b).unwrap();
                *reasons.entry(reason).or_insert(0u32) += 1;
                // The other end's SYN of a simultaneous open: admitted by
                // the policy, or by the connection table when it would not.
                if let Some(Frame::Ip(ip)) = parse(&b)
                    && ip.proto == TCP
                    && ip.flags & (SYN | ACK) == SYN
                    && Model::flow(&ip, false).is_some_and(|f| model.flows.contains(&f))
                {
                    simultaneous[usize::from(reason == Reason::PassEstablished)] += 1;
                }
            }
        }
    }
    eprintln!(
        "{replayed} corpus frames; {total} generated ingress frames, {inside} compared with the model; reasons: {reasons:?}"
    );
    // The run covered the interesting outcomes, not just drops.
    for r in [
        Reason::PassEstablished,
        Reason::PassRule,
        Reason::PassPeer,
        Reason::PassSsh,
        Reason::DropNoRule,
        Reason::DropMalformed,
        Reason::DropOtherCluster,
    ] {
        assert!(
            reasons.get(&r).copied().unwrap_or(0) > 0,
            "no {r:?} in {reasons:?}"
        );
    }
    assert!(
        simultaneous[0] > 0 && simultaneous[1] > 0,
        "simultaneous-open SYNs (admitted by the policy, by the connection table): {simultaneous:?}"
    );
    assert!(
        inside * 10 > total * 8,
        "too much outside the model: {inside} of {total}"
    );
}
