//! Crafted packets through the real programs with `BPF_PROG_TEST_RUN`: each
//! case checks the verdict and that exactly the expected counter moved.

use portcullis::{
    compile,
    config::Config,
    dataplane::{Dataplane, Program},
};
use portcullis_tests::{packet::*, *};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
/// TC_ACT_UNSPEC (-1): "continue", the egress program's only verdict.
const TC_CONTINUE: u32 = u32::MAX;

const H4: &str = "10.200.0.1";
const P4: &str = "10.200.0.2";
const H6: &str = "fd00:200::1";
const P6: &str = "fd00:200::2";

/// An egress rule unrelated to the flows tested: with it the egress
/// allowlist is on (the config's default when egress rules exist).
const ALLOWLIST: &str = "[[egress_rules]]\nid = \"dns\"\nfrom_port = 53\nto_port = 53\nip_ranges = [\"10.200.0.2/32\"]\nprotocol = \"udp\"\n";

struct Bench {
    dp: Dataplane,
    pins: PinDir,
}

impl Bench {
    fn new() -> Self {
        Self::with("", 1024)
    }

    /// With extra top-level config lines and a connection table of `entries`.
    fn with(extra: &str, entries: u32) -> Self {
        let pins = PinDir::new().unwrap();
        let config = Config::parse(&format!(
            "interfaces = [\"unused0\"]\npin_dir = \"{}\"\n{extra}\n[[ingress_rules]]\nid = \"app\"\nfrom_port = 8080\nto_port = 8090\n[ssh]\nallow = false\n",
            pins.path().display()
        ))
        .unwrap();
        let limits = config.capacity.limits();
        let mut dp = Dataplane::load(pins.path(), entries, &limits).unwrap();
        let image = compile::compile(&config.rule_set(), &limits).unwrap();
        dp.apply(&image, config.allow_ping).unwrap();
        Bench { dp, pins }
    }

    /// Runs the ingress program; returns the action and the one reason whose
    /// counter moved (panics if none or several did).
    fn ingress(&mut self, frame: &[u8]) -> (u32, Reason) {
        let before = self.pins.counters().unwrap();
        let out = self.dp.test_run(Program::Ingress, frame, 1).unwrap();
        let after = self.pins.counters().unwrap();
        let moved: Vec<Reason> = Reason::ALL
            .into_iter()
            .filter(|r| after[r] != before[r])
            .collect();
        assert_eq!(moved.len(), 1, "counters moved: {moved:?}");
        assert_eq!(after[&moved[0]], before[&moved[0]] + 1);
        (out.retval, moved[0])
    }

    fn expect(&mut self, what: &str, frame: &[u8], reason: Reason) {
        let (action, got) = self.ingress(frame);
        assert_eq!(got, reason, "{what}: credited {}", got.name());
        let want = if reason.passes() { XDP_PASS } else { XDP_DROP };
        assert_eq!(action, want, "{what}: action {action}");
    }

    /// Runs the egress program and checks `frame` was counted as `reason`.
    fn egress_counted(&mut self, frame: &[u8], reason: Reason, what: &str) {
        let before = self.pins.counters().unwrap()[&reason];
        self.dp.test_run(Program::Egress, frame, 1).unwrap();
        assert_eq!(self.pins.counters().unwrap()[&reason], before + 1, "{what}");
    }

    fn egress(&mut self, frame: &[u8]) {
        let out = self.dp.test_run(Program::Egress, frame, 1).unwrap();
        assert_eq!(out.retval, TC_CONTINUE, "egress must never drop");
    }

    /// An inbound TCP connection's first two steps from `p:50000` to this
    /// host's `h:8080`: the admitted SYN, and this host's SYN-ACK with
    /// initial sequence number `isn`.
    fn syn_and_syn_ack(&mut self, p: &str, h: &str, isn: u32) {
        self.expect(
            "an admitted syn",
            &Pkt::new(p, h).tcp(50000, 8080, SYN).bytes(),
            Reason::PassRule,
        );
        self.egress(
            &Pkt::new(h, p)
                .tcp(8080, 50000, SYN | ACK)
                .seq_ack(isn, 1)
                .bytes(),
        );
    }
}

#[test]
fn ports_protocols_and_always_allowed() {
    require_root!();
    let mut b = Bench::new();
    for (h, p) in [(H4, P4), (H6, P6)] {
        b.expect(
            "listed",
            &Pkt::new(p, h).tcp(40000, 8080, SYN).bytes(),
            Reason::PassRule,
        );
        b.expect(
            "range end",
            &Pkt::new(p, h).udp(40000, 8090).bytes(),
            Reason::PassRule,
        );
        b.expect(
            "unlisted",
            &Pkt::new(p, h).tcp(40000, 8091, SYN).bytes(),
            Reason::DropNoRule,
        );
        b.expect(
            "ssh off",
            &Pkt::new(p, h).tcp(40000, 22, SYN).bytes(),
            Reason::DropNoRule,
        );
        b.expect(
            "gre",
            &Pkt::new(p, h).proto(47, &[0; 8]).bytes(),
            Reason::DropProtocol,
        );
        b.expect(
            "sctp",
            &Pkt::new(p, h).proto(132, &[0; 12]).bytes(),
            Reason::DropProtocol,
        );
    }
    // DHCP server replies, and only those, and only after a request of the
    // same family (broadcast, so the reply matches no flow the request opened).
    let dhcpv4 = Pkt::new("10.200.0.254", "255.255.255.255").udp(67, 68);
    let dhcpv6 = Pkt::new("fe80::1", "fe80::2").udp(547, 546);
    b.expect("dhcpv4 unasked", &dhcpv4.bytes(), Reason::DropNoRule);
    b.expect("dhcpv6 unasked", &dhcpv6.bytes(), Reason::DropNoRule);
    b.egress(&Pkt::new("0.0.0.0", "255.255.255.255").udp(68, 67).bytes());
    b.expect("dhcpv4", &dhcpv4.bytes(), Reason::PassDhcp);
    b.expect("dhcpv6 after v4", &dhcpv6.bytes(), Reason::DropNoRule);
    b.expect(
        "dhcpv4 wrong way",
        &Pkt::new(P4, H4).udp(68, 67).bytes(),
        Reason::DropNoRule,
    );
    b.egress(&Pkt::new("fe80::2", "ff02::1:2").udp(546, 547).bytes());
    b.expect("dhcpv6", &dhcpv6.bytes(), Reason::PassDhcp);
    // Neighbour discovery needs hop limit 255.
    let na = Pkt::new("fe80::2", "fe80::1").icmp(136, 0, 0, &[0; 20]);
    b.expect(
        "NA hop 255",
        &na.clone().ttl(255).bytes(),
        Reason::PassNeighbor,
    );
    b.expect("NA forwarded", &na.ttl(64).bytes(), Reason::DropIcmp);
    b.expect(
        "RA",
        &Pkt::new("fe80::2", "ff02::1")
            .icmp(134, 0, 0, &[0; 8])
            .ttl(255)
            .bytes(),
        Reason::PassNeighbor,
    );
    // Pings are denied by default, and ICMP of the wrong family is dropped.
    b.expect(
        "echo v4",
        &Pkt::new(P4, H4).icmp(8, 0, 7, b"ping").bytes(),
        Reason::DropIcmp,
    );
    b.expect(
        "echo v6",
        &Pkt::new(P6, H6).icmp(128, 0, 7, b"ping").bytes(),
        Reason::DropIcmp,
    );
    b.expect(
        "icmpv6 in v4",
        &Pkt::new(P4, H4)
            .proto(ICMPV6, &[136, 0, 0, 0, 0, 0, 0, 0])
            .ttl(255)
            .bytes(),
        Reason::DropIcmp,
    );
    // Other Ethernet types; ARP.
    let mut arp = Pkt::new(P4, H4).udp(1, 8080).bytes();
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    b.expect("arp", &arp, Reason::PassArp);
    let mut lldp = arp.clone();
    lldp[12..14].copy_from_slice(&0x88ccu16.to_be_bytes());
    b.expect("lldp", &lldp, Reason::DropEthertype);
}

#[test]
fn malformed_headers_are_dropped_and_counted() {
    require_root!();
    let mut b = Bench::new();
    let tcp4 = Pkt::new(P4, H4).tcp(40000, 8080, SYN).bytes();
    let tcp6 = Pkt::new(P6, H6).tcp(40000, 8080, SYN).bytes();
    // Truncated at every header boundary and inside each header.
    // (The kernel refuses test frames shorter than an Ethernet header.)
    for cut in [14, 20, 33, 34, 40, 53] {
        b.expect(
            &format!("v4 cut at {cut}"),
            &tcp4[..cut],
            Reason::DropMalformed,
        );
    }
    for cut in [14, 40, 53, 54, 60, 73] {
        b.expect(
            &format!("v6 cut at {cut}"),
            &tcp6[..cut],
            Reason::DropMalformed,
        );
    }
    // Bad version, IHL below 5, IHL beyond the packet, total length below IHL.
    let mut bad = tcp4.clone();
    bad[14] = 0x55;
    b.expect("version 5", &bad, Reason::DropMalformed);
    let mut bad = tcp4.clone();
    bad[14] = 0x44;
    b.expect("ihl 4", &bad, Reason::DropMalformed);
    let mut bad = tcp4.clone();
    bad[14] = 0x4f;
    b.expect("ihl 15 past the end", &bad, Reason::DropMalformed);
    let mut bad = tcp4.clone();
    bad[16..18].copy_from_slice(&10u16.to_be_bytes());
    b.expect("total length 10", &bad, Reason::DropMalformed);
    let mut bad = tcp6.clone();
    bad[14] = 0x40;
    b.expect("v6 ethertype, v4 header", &bad, Reason::DropMalformed);
    // A TCP header with only its ports.
    let short = Pkt::new(P4, H4)
        .proto(TCP, &[0x9c, 0x40, 0x1f, 0x90, 0, 0, 0, 0])
        .bytes();
    b.expect("8-byte tcp header", &short, Reason::DropMalformed);
}

#[test]
fn options_extension_headers_and_vlan_tags_are_walked() {
    require_root!();
    let mut b = Bench::new();
    for opts in [4, 20, 40] {
        let ok = Pkt::new(P4, H4).ipv4_options(opts).tcp(40000, 8080, SYN);
        b.expect(
            &format!("{opts}B options, listed"),
            &ok.bytes(),
            Reason::PassRule,
        );
        let no = Pkt::new(P4, H4).ipv4_options(opts).tcp(40000, 9999, SYN);
        b.expect(
            &format!("{opts}B options, unlisted"),
            &no.bytes(),
            Reason::DropNoRule,
        );
    }
    let chain = Pkt::new(P6, H6)
        .ext(HOPOPTS, 0)
        .ext(ROUTING, 1)
        .ext(DSTOPTS, 2);
    b.expect(
        "v6 chain, listed",
        &chain.clone().tcp(1, 8080, SYN).bytes(),
        Reason::PassRule,
    );
    b.expect(
        "v6 chain, unlisted",
        &chain.tcp(1, 9999, SYN).bytes(),
        Reason::DropNoRule,
    );
    let mut deep = Pkt::new(P6, H6);
    for _ in 0..7 {
        deep = deep.ext(DSTOPTS, 0);
    }
    b.expect(
        "7 extension headers",
        &deep.tcp(1, 8080, SYN).bytes(),
        Reason::DropMalformed,
    );
    let cut = Pkt::new(P6, H6).ext(DSTOPTS, 3).tcp(1, 8080, SYN).bytes();
    b.expect(
        "extension header past the end",
        &cut[..14 + 40 + 16],
        Reason::DropMalformed,
    );

    for (h, p) in [(H4, P4), (H6, P6)] {
        b.expect(
            "vlan, listed",
            &Pkt::new(p, h).vlan(100).tcp(1, 8080, SYN).bytes(),
            Reason::PassRule,
        );
        b.expect(
            "vlan, unlisted",
            &Pkt::new(p, h).vlan(100).tcp(1, 9999, SYN).bytes(),
            Reason::DropNoRule,
        );
        let qinq = Pkt::new(p, h).vlan(100).vlan(200).tcp(1, 8080, SYN);
        b.expect("double tagged", &qinq.bytes(), Reason::DropVlanStack);
    }
}

#[test]
fn fragments_pass_only_with_an_admitted_first_fragment() {
    require_root!();
    let mut b = Bench::new();
    for (h, p) in [(H4, P4), (H6, P6)] {
        let first = Pkt::new(p, h).fragment(77, 0, true).udp(5000, 8080);
        b.expect("first fragment, listed", &first.bytes(), Reason::PassRule);
        let later = Pkt::new(p, h)
            .fragment(77, 185, false)
            .proto(UDP, &[0xab; 64]);
        b.expect("its later fragment", &later.bytes(), Reason::PassFragment);
        let stray = Pkt::new(p, h)
            .fragment(78, 185, false)
            .proto(UDP, &[0xab; 64]);
        b.expect(
            "later fragment, unknown id",
            &stray.bytes(),
            Reason::DropFragment,
        );
        let denied = Pkt::new(p, h).fragment(79, 0, true).udp(5000, 9999);
        b.expect(
            "first fragment, unlisted",
            &denied.bytes(),
            Reason::DropNoRule,
        );
        let after_denied = Pkt::new(p, h)
            .fragment(79, 185, false)
            .proto(UDP, &[0xab; 64]);
        b.expect(
            "later fragment of a dropped packet",
            &after_denied.bytes(),
            Reason::DropFragment,
        );
    }
}

/// How many entries the pinned IPv4 LRU table `name` holds.
fn entries4<V: aya::Pod>(pins: &PinDir, name: &str) -> usize {
    let path = portcullis::dataplane::maps_dir(pins.path()).join(name);
    let map: aya::maps::HashMap<_, portcullis_common::FlowKey4, V> = aya::maps::HashMap::try_from(
        aya::maps::Map::LruHashMap(aya::maps::MapData::from_pin(path).unwrap()),
    )
    .unwrap();
    map.keys().filter_map(Result::ok).count()
}

/// Without an egress allowlist an admitted SYN writes no table (the
/// kernel's answer does: this host's SYN-ACK makes the half-open entry), and
/// the handshake still ends as an inbound flow; under the allowlist the SYN
/// makes it, and a SYN-ACK that answers no admitted SYN does not leave.
#[test]
fn an_admitted_syn_writes_a_table_only_under_the_egress_allowlist() {
    require_root!();
    use portcullis_common::{Embryo, Flow};
    let (h, p) = (H4, P4);
    let syn = Pkt::new(p, h).tcp(50000, 8080, SYN).bytes();
    let synack = Pkt::new(h, p)
        .tcp(8080, 50000, SYN | ACK)
        .seq_ack(7000, 1)
        .bytes();
    let ack = Pkt::new(p, h)
        .tcp(50000, 8080, ACK)
        .seq_ack(1, 7001)
        .bytes();

    let mut b = Bench::new();
    b.expect("an admitted syn", &syn, Reason::PassRule);
    assert_eq!(entries4::<Embryo>(&b.pins, "EMBRYO4"), 0, "the SYN wrote");
    b.egress(&synack);
    assert_eq!(
        entries4::<Embryo>(&b.pins, "EMBRYO4"),
        1,
        "no half-open entry"
    );
    b.expect("the handshake's ack", &ack, Reason::PassRule);
    assert_eq!(entries4::<Flow>(&b.pins, "INBOUND4"), 1, "no inbound flow");
    assert_eq!(entries4::<Embryo>(&b.pins, "EMBRYO4"), 0);

    let allowlist = ALLOWLIST;
    let mut b = Bench::with(allowlist, 1024);
    let stray = Pkt::new(h, p)
        .tcp(8080, 50001, SYN | ACK)
        .seq_ack(9000, 1)
        .bytes();
    b.egress_counted(
        &stray,
        Reason::DropEgress,
        "a SYN-ACK to no admitted SYN left under the allowlist",
    );
    assert_eq!(entries4::<Embryo>(&b.pins, "EMBRYO4"), 0);
    b.expect("an admitted syn", &syn, Reason::PassRule);
    assert_eq!(
        entries4::<Embryo>(&b.pins, "EMBRYO4"),
        1,
        "the SYN wrote nothing"
    );
    b.dp.test_run(Program::Egress, &synack, 1).unwrap();
    b.expect("the handshake's ack", &ack, Reason::PassRule);
    assert_eq!(entries4::<Flow>(&b.pins, "INBOUND4"), 1, "no inbound flow");
}

/// The states of the inbound IPv4 TCP connections `INBOUND4` holds.
fn inbound4_states(pins: &PinDir) -> Vec<u8> {
    let path = portcullis::dataplane::maps_dir(pins.path()).join("INBOUND4");
    let map: aya::maps::HashMap<_, portcullis_common::FlowKey4, portcullis_common::Flow> =
        aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(
            aya::maps::MapData::from_pin(path).unwrap(),
        ))
        .unwrap();
    map.iter()
        .filter_map(Result::ok)
        .map(|(_, f)| f.state)
        .collect()
}

/// A SYN is not looked up in the inbound table: a new connection on the
/// 4-tuple of an old, closed one is tracked as established again once its
/// own handshake completes. This host's SYN-ACK alone does not revive the
/// old entry (whoever can make the kernel answer a SYN on an old tuple, or
/// send a SYN-ACK from a raw socket, would otherwise get an established
/// entry, which relates ICMP errors for days, without a handshake): it
/// removes it, and the connection is half-open until the ACK. Both with and
/// without the egress allowlist.
#[test]
fn a_reused_four_tuple_of_a_closed_inbound_connection_is_tracked_again_after_its_handshake() {
    require_root!();
    use portcullis_common::{Embryo, FLOW_TCP_CLOSED, FLOW_TCP_ESTABLISHED};
    const RST: u8 = 0x04;
    let (h, p) = (H4, P4);
    let allowlist = ALLOWLIST;
    for extra in ["", allowlist] {
        let mut b = Bench::with(extra, 1024);
        let ack = |isn: u32| {
            Pkt::new(p, h)
                .tcp(50000, 8080, ACK)
                .seq_ack(1, isn + 1)
                .bytes()
        };
        b.syn_and_syn_ack(p, h, 7000);
        b.expect("the handshake's ack", &ack(7000), Reason::PassRule);
        assert_eq!(inbound4_states(&b.pins), vec![FLOW_TCP_ESTABLISHED]);
        // This host resets the connection.
        b.egress(&Pkt::new(h, p).tcp(8080, 50000, RST | ACK).bytes());
        assert_eq!(inbound4_states(&b.pins), vec![FLOW_TCP_CLOSED]);
        // A new connection on the same 4-tuple.
        b.syn_and_syn_ack(p, h, 9000);
        assert_eq!(
            inbound4_states(&b.pins),
            Vec::<u8>::new(),
            "this host's SYN-ACK revived the closed entry ({extra:?})"
        );
        assert_eq!(entries4::<Embryo>(&b.pins, "EMBRYO4"), 1, "{extra:?}");
        b.expect("the old connection's ack", &ack(7000), Reason::PassRule);
        assert_eq!(inbound4_states(&b.pins), Vec::<u8>::new(), "{extra:?}");
        b.expect("the new handshake's ack", &ack(9000), Reason::PassRule);
        assert_eq!(
            inbound4_states(&b.pins),
            vec![FLOW_TCP_ESTABLISHED],
            "the reused 4-tuple's connection is not tracked as established ({extra:?})"
        );
    }
}

/// Under the egress allowlist only an admitted SYN makes a half-open
/// entry: a SYN-ACK an egress rule lets out (a raw socket's, answering no
/// SYN) makes none, so the ACK a collaborator sends back opens no inbound
/// flow and is charged nothing it should have been. And a SYN on a
/// half-open connection whose SYN-ACK left (a retransmission, or a forgery
/// from whoever sees the tuple) keeps the number its ACK must acknowledge.
#[test]
fn under_the_allowlist_only_an_admitted_syn_makes_a_half_open_entry() {
    require_root!();
    use portcullis_common::Embryo;
    let (h, p) = (H4, P4);
    // An egress rule that admits this host's packets to the client's port.
    let rules = "[[egress_rules]]\nid = \"out\"\nfrom_port = 50000\nto_port = 50001\nip_ranges = [\"10.200.0.2/32\"]\nprotocol = \"tcp\"\n";
    let mut b = Bench::with(rules, 1024);
    let raw = Pkt::new(h, p)
        .tcp(8080, 50001, SYN | ACK)
        .seq_ack(5000, 1)
        .bytes();
    b.egress_counted(
        &raw,
        Reason::PassEgress,
        "the egress rule did not pass the SYN-ACK (the test proves nothing)",
    );
    assert_eq!(
        entries4::<Embryo>(&b.pins, "EMBRYO4"),
        0,
        "a SYN-ACK answering no admitted SYN made a half-open entry"
    );
    b.expect(
        "the collaborator's ack",
        &Pkt::new(p, h)
            .tcp(50001, 8080, ACK)
            .seq_ack(1, 5001)
            .bytes(),
        Reason::PassRule,
    );
    assert_eq!(inbound4_states(&b.pins), Vec::<u8>::new());

    // A SYN again after this host's SYN-ACK: the number stays.
    b.syn_and_syn_ack(p, h, 7000);
    b.expect(
        "a second syn",
        &Pkt::new(p, h).tcp(50000, 8080, SYN).bytes(),
        Reason::PassRule,
    );
    b.expect(
        "the handshake's ack",
        &Pkt::new(p, h)
            .tcp(50000, 8080, ACK)
            .seq_ack(1, 7001)
            .bytes(),
        Reason::PassRule,
    );
    assert_eq!(
        inbound4_states(&b.pins),
        vec![portcullis_common::FLOW_TCP_ESTABLISHED],
        "a SYN on the half-open connection wiped this host's SYN-ACK"
    );
}

#[test]
fn connection_table_admits_replies_and_related_errors_only() {
    require_root!();
    let mut b = Bench::new();
    for (h, p) in [(H4, P4), (H6, P6)] {
        let syn = Pkt::new(h, p).tcp(41000, 443, SYN);
        // Before the host sent anything, the "reply" is a new inbound packet.
        b.expect(
            "reply before request",
            &Pkt::new(p, h).tcp(443, 41000, SYN | ACK).bytes(),
            Reason::DropNoRule,
        );
        b.egress(&syn.bytes());
        b.expect(
            "syn-ack",
            &Pkt::new(p, h).tcp(443, 41000, SYN | ACK).bytes(),
            Reason::PassEstablished,
        );
        b.expect(
            "ack",
            &Pkt::new(p, h).tcp(443, 41000, ACK).bytes(),
            Reason::PassEstablished,
        );
        b.expect(
            "other source port",
            &Pkt::new(p, h).tcp(444, 41000, ACK).bytes(),
            Reason::DropNoRule,
        );
        b.expect(
            "other local port",
            &Pkt::new(p, h).tcp(443, 41001, ACK).bytes(),
            Reason::DropNoRule,
        );
        // A TCP packet that is not a SYN opens nothing (inbound-accepted
        // flows). The handshake of an admitted inbound connection (SYN, this
        // host's SYN-ACK, the ACK of its ISN) records it as an inbound flow.
        b.syn_and_syn_ack(p, h, 7000);
        b.expect(
            "the handshake's ack",
            &Pkt::new(p, h)
                .tcp(50000, 8080, ACK)
                .seq_ack(1, 7001)
                .bytes(),
            Reason::PassRule,
        );
        b.expect(
            "after our syn-ack",
            &Pkt::new(p, h).tcp(50000, 8080, ACK).bytes(),
            Reason::PassRule,
        );
        b.expect(
            "after our syn-ack, unlisted",
            &Pkt::new(p, h).tcp(50000, 9999, ACK).bytes(),
            Reason::DropNoRule,
        );

        // Echo: our request admits its reply (same identifier) only.
        let (req, rep) = if h == H4 { (8, 0) } else { (128, 129) };
        b.egress(&Pkt::new(h, p).icmp(req, 0, 4242, b"ping").bytes());
        b.expect(
            "echo reply",
            &Pkt::new(p, h).icmp(rep, 0, 4242, b"ping").bytes(),
            Reason::PassEstablished,
        );
        b.expect(
            "echo reply, other id",
            &Pkt::new(p, h).icmp(rep, 0, 4243, b"ping").bytes(),
            Reason::DropIcmp,
        );

        // ICMP errors quoting a packet we sent on that flow; or a random one.
        let (unreach, ptb) = if h == H4 { (3, 3) } else { (1, 2) };
        let quoted = syn.ip_bytes();
        let err = Pkt::new(p, h).icmp(ptb, if h == H4 { 4 } else { 0 }, 0, &quoted);
        b.expect(
            "frag needed / packet too big",
            &err.bytes(),
            Reason::PassRelated,
        );
        let other = Pkt::new(h, p).tcp(41999, 443, SYN).ip_bytes();
        b.expect(
            "error about an unknown flow",
            &Pkt::new(p, h).icmp(unreach, 1, 0, &other).bytes(),
            Reason::DropIcmp,
        );
        let served = Pkt::new(h, p).tcp(8080, 50000, ACK).ip_bytes();
        b.expect(
            "error about a served port",
            &Pkt::new(p, h).icmp(ptb, 4, 0, &served).bytes(),
            Reason::PassRelated,
        );
        let spoofed = Pkt::new(p, h).tcp(41000, 443, SYN).ip_bytes();
        b.expect(
            "error quoting a packet we did not send",
            &Pkt::new(p, h).icmp(ptb, 4, 0, &spoofed).bytes(),
            Reason::DropIcmp,
        );
        b.expect(
            "truncated quote",
            &Pkt::new(p, h).icmp(ptb, 4, 0, &quoted[..10]).bytes(),
            Reason::DropIcmp,
        );

        // UDP and other protocols.
        b.egress(&Pkt::new(h, p).udp(53000, 53).bytes());
        b.expect(
            "dns reply",
            &Pkt::new(p, h).udp(53, 53000).bytes(),
            Reason::PassEstablished,
        );
        b.egress(&Pkt::new(h, p).proto(47, &[0; 8]).bytes());
        b.expect(
            "gre back",
            &Pkt::new(p, h).proto(47, &[0; 8]).bytes(),
            Reason::PassEstablished,
        );
        b.expect(
            "sctp back",
            &Pkt::new(p, h).proto(132, &[0; 12]).bytes(),
            Reason::DropProtocol,
        );
    }
}

/// A TCP SYN without ACK meets the rules before the connection table: the
/// other end's SYN of a simultaneous open of a flow this host opened passes
/// either way, counted as the rule's when one admits it and as established
/// when none does (the table is asked only then); a SYN of no flow that no
/// rule admits is dropped.
#[test]
fn a_syn_meets_the_rules_before_the_connection_table() {
    require_root!();
    let mut b = Bench::new();
    for (h, p) in [(H4, P4), (H6, P6)] {
        b.egress(&Pkt::new(h, p).tcp(41000, 443, SYN).bytes());
        b.egress(&Pkt::new(h, p).tcp(8080, 50000, SYN).bytes());
        b.expect(
            "simultaneous open, no rule admits",
            &Pkt::new(p, h).tcp(443, 41000, SYN).bytes(),
            Reason::PassEstablished,
        );
        b.expect(
            "simultaneous open, a rule admits",
            &Pkt::new(p, h).tcp(50000, 8080, SYN).bytes(),
            Reason::PassRule,
        );
        b.expect(
            "a syn of no flow",
            &Pkt::new(p, h).tcp(443, 41001, SYN).bytes(),
            Reason::DropNoRule,
        );
        b.expect(
            "after it, the flow's ack",
            &Pkt::new(p, h).tcp(443, 41000, ACK).bytes(),
            Reason::PassEstablished,
        );
    }
}

#[test]
fn echo_requests_follow_the_configuration() {
    require_root!();
    let mut b = Bench::with("allow_ping = true", 1024);
    b.expect(
        "echo v4",
        &Pkt::new(P4, H4).icmp(8, 0, 7, b"ping").bytes(),
        Reason::PassPing,
    );
    b.expect(
        "echo v6",
        &Pkt::new(P6, H6).icmp(128, 0, 7, b"ping").bytes(),
        Reason::PassPing,
    );
    b.expect(
        "timestamp",
        &Pkt::new(P4, H4).icmp(13, 0, 7, &[0; 12]).bytes(),
        Reason::DropIcmp,
    );
}

/// Without an egress allowlist, a service's UDP reply that finds no flow
/// (its inbound entry evicted: a flood of forged datagrams to any admitted
/// port does that) is recorded as the inbound flow it is, not as a flow
/// this host opened: what arrives on it is still decided by the rules (so
/// by removing a rule, and by bans and deny sets before them), where a
/// flow this host opened would pass it as established, before all of them.
/// A client flow from a port no rule serves is still this host's own.
#[test]
fn a_services_reply_without_a_flow_opens_no_flow_that_passes_before_the_rules() {
    require_root!();
    let (h, p) = (H4, P4);
    let mut b = Bench::new();
    b.egress(&Pkt::new(h, p).udp(8080, 40000).bytes());
    let request = Pkt::new(p, h).udp(40000, 8080).bytes();
    b.expect("the client's next datagram", &request, Reason::PassRule);
    // The rule goes: so does what it admitted.
    let none = Config::parse(&format!(
        "interfaces = [\"unused0\"]\npin_dir = \"{}\"\n[ssh]\nallow = false\n",
        b.pins.path().display()
    ))
    .unwrap();
    let limits = none.capacity.limits();
    let image = compile::compile(&none.rule_set(), &limits).unwrap();
    b.dp.apply(&image, false).unwrap();
    b.expect(
        "the client's datagram once no rule admits it",
        &request,
        Reason::DropNoRule,
    );
    // This host's own client flow (from a port no rule serves) still
    // admits its replies.
    b.egress(&Pkt::new(h, p).udp(40001, 53).bytes());
    b.expect(
        "the answer to this host's query",
        &Pkt::new(p, h).udp(53, 40001).bytes(),
        Reason::PassEstablished,
    );
}

/// An echo request a rule admits opens a flow as a SYN does: it is charged
/// to its source's rate limit (here the rule's own, burst 2), and those
/// over it are dropped as such.
#[test]
fn echo_requests_a_rule_admits_count_against_its_rate_limit() {
    require_root!();
    let ping = "[[ingress_rules]]\nid = \"ping\"\nfrom_port = 0\nto_port = 0\nip_ranges = []\nprotocol = \"icmp\"\nicmp_types = [\"echo-request\"]\nrate = 1\nburst = 2\n";
    let mut b = Bench::with(ping, 1024);
    for (h, p, kind) in [(H4, P4, 8), (H6, P6, 128)] {
        let echo = |id| Pkt::new(p, h).icmp(kind, 0, id, b"ping").bytes();
        b.expect("the first echo", &echo(1), Reason::PassRule);
        b.expect("the second echo", &echo(2), Reason::PassRule);
        b.expect("the third echo", &echo(3), Reason::DropRateLimit);
    }
}

/// Flows age by protocol and state: an idle UDP flow is gone after 30 s, a
/// SYN that got no answer after 60 s, an established TCP flow stays.
#[test]
fn flows_age_out_by_protocol_and_state() {
    require_root!();
    use aya::maps::{HashMap, Map, MapData};
    use portcullis_common::{Flow, FlowKey4};

    let mut b = Bench::new();
    b.egress(&Pkt::new(H4, P4).udp(53001, 53).bytes());
    b.egress(&Pkt::new(H4, P4).tcp(41001, 443, SYN).bytes()); // answered below
    b.egress(&Pkt::new(H4, P4).tcp(41002, 443, SYN).bytes()); // never answered
    b.expect(
        "syn-ack",
        &Pkt::new(P4, H4).tcp(443, 41001, SYN | ACK).bytes(),
        Reason::PassEstablished,
    );

    let path = portcullis::dataplane::maps_dir(b.pins.path()).join("CONNTRACK4");
    let mut table: HashMap<_, FlowKey4, Flow> =
        HashMap::try_from(Map::LruHashMap(MapData::from_pin(&path).unwrap())).unwrap();
    let entries: Vec<(FlowKey4, Flow)> = table.iter().map(Result::unwrap).collect();
    assert_eq!(entries.len(), 3);
    // Pretend 100 s have passed for every flow.
    for (key, mut flow) in entries {
        flow.last_seen_ns -= 100_000_000_000;
        table.insert(&key, &flow, 0).unwrap();
    }
    b.expect(
        "reply to an expired UDP flow",
        &Pkt::new(P4, H4).udp(53, 53001).bytes(),
        Reason::DropNoRule,
    );
    b.expect(
        "syn-ack to an expired SYN",
        &Pkt::new(P4, H4).tcp(443, 41002, SYN | ACK).bytes(),
        Reason::DropNoRule,
    );
    b.expect(
        "established flow",
        &Pkt::new(P4, H4).tcp(443, 41001, ACK).bytes(),
        Reason::PassEstablished,
    );
    assert_eq!(table.keys().count(), 1, "expired flows were not removed");
}

/// The programs' clock is `CLOCK_MONOTONIC` to a tick (`ebpf/src/clock.rs`:
/// `jiffies` times the kernel's tick, less an offset the loader sampled):
/// a flow opened between two readings of `CLOCK_MONOTONIC` is stamped
/// between them. Flows the daemon seeds are stamped with `CLOCK_MONOTONIC`
/// and events' wall times are reckoned from it, so a clock off by more
/// would age seeded flows wrongly and misdate every event.
#[test]
fn the_programs_clock_is_the_monotonic_clock() {
    require_root!();
    use aya::maps::{HashMap, Map, MapData};
    use portcullis_common::{Flow, FlowKey4};

    let mut b = Bench::new();
    let clock = b.dp.clock();
    let configured = std::path::Path::new("/proc/config.gz").exists()
        || std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .is_ok_and(|r| std::path::Path::new(&format!("/boot/config-{}", r.trim())).exists());
    if configured {
        assert_ne!(
            clock.tick_ns, 0,
            "the kernel's tick was not learned: {clock}"
        );
    }
    let tick = if clock.tick_ns == 0 {
        10_000_000
    } else {
        clock.tick_ns
    };
    let path = portcullis::dataplane::maps_dir(b.pins.path()).join("CONNTRACK4");
    let table: HashMap<_, FlowKey4, Flow> =
        HashMap::try_from(Map::LruHashMap(MapData::from_pin(&path).unwrap())).unwrap();
    // (stamp, CLOCK_MONOTONIC before, after) of flows opened 100 ms apart.
    let mut stamps = Vec::new();
    for port in 0..11u16 {
        let before = monotonic_ns();
        b.egress(&Pkt::new(H4, P4).udp(50000 + port, 53).bytes());
        let after = monotonic_ns();
        let port = (50000 + port).to_be();
        let seen = table
            .iter()
            .map(Result::unwrap)
            .find(|(k, _)| k.local_port == port || k.local_port == port.swap_bytes())
            .expect("the flow just opened")
            .1
            .last_seen_ns;
        stamps.push((seen, before, after));
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // `jiffies` may stall a few ticks on a busy VM (the kernel allows 5).
    let slack = 6 * tick + 5_000_000;
    for &(seen, before, after) in &stamps {
        assert!(
            seen + slack >= before && seen <= after + slack,
            "flow stamped {seen}, CLOCK_MONOTONIC {before}..{after} ({clock})"
        );
    }
    // Over a second, a tick of the wrong length shows: 250 against 300 a
    // second is 200 ms.
    let (first, last) = (stamps[0], stamps[stamps.len() - 1]);
    let (stamped, elapsed) = (last.0 - first.0, last.2 - first.1);
    assert!(
        stamped.abs_diff(elapsed) <= 2 * slack,
        "{stamped} ns stamped over {elapsed} ns of CLOCK_MONOTONIC ({clock})"
    );
}

fn monotonic_ns() -> u64 {
    container::monotonic_now().as_nanos() as u64
}

/// A full connection table evicts the least recently used flows; traffic
/// that matches no flow meets the policy (it does not fail open).
#[test]
fn a_full_connection_table_evicts_the_oldest_and_fails_closed() {
    require_root!();
    let mut b = Bench::with("", 256);
    for port in 20000..22000u16 {
        b.egress(&Pkt::new(H4, P4).udp(port, 53).bytes());
    }
    b.expect(
        "newest flow",
        &Pkt::new(P4, H4).udp(53, 21999).bytes(),
        Reason::PassEstablished,
    );
    b.expect(
        "oldest flow, evicted",
        &Pkt::new(P4, H4).udp(53, 20000).bytes(),
        Reason::DropNoRule,
    );
    b.expect(
        "never opened",
        &Pkt::new(P4, H4).udp(53, 30000).bytes(),
        Reason::DropNoRule,
    );
}

/// Inbound flows the rules admit are tracked in a table of their own: a
/// flood of them (SYNs from many sources to a served port) evicts inbound
/// flows only, never a flow this host opened.
#[test]
fn an_inbound_flood_does_not_evict_outbound_flows() {
    require_root!();
    let mut b = Bench::with("", 256);
    b.egress(&Pkt::new(H4, P4).tcp(41000, 443, SYN).bytes());
    for i in 0..2048u32 {
        let src = format!("10.201.{}.{}", i / 250, 1 + i % 250);
        let out =
            b.dp.test_run(
                Program::Ingress,
                &Pkt::new(&src, H4).tcp(40000, 8080, SYN).bytes(),
                1,
            )
            .unwrap();
        assert_eq!(out.retval, XDP_PASS, "admitted SYN {i}");
    }
    b.expect(
        "outbound flow after the flood",
        &Pkt::new(P4, H4).tcp(443, 41000, SYN | ACK).bytes(),
        Reason::PassEstablished,
    );
}

/// The established-flow cache (`ebpf/src/flowcache.rs`) admits nothing the
/// connection table no longer holds: a flow the daemon cuts (a ban, a
/// lockdown, the DNS guard) is refused at its next packet, though its
/// replies were just admitted from this CPU's cache. (The test runs stay
/// on one CPU, so every run sees the same per-CPU cache.)
#[test]
fn a_cut_flow_is_not_admitted_from_the_flow_cache() {
    require_root!();
    on_one_cpu();
    let mut b = Bench::new();
    for (h, p) in [(H4, P4), (H6, P6)] {
        cached_flow(&mut b, h, p, 40001);
    }
    assert_eq!(b.dp.cut_flows(|_| false).unwrap(), 2, "flows cut");
    for (h, p) in [(H4, P4), (H6, P6)] {
        b.expect(
            "a reply of the cut flow",
            &Pkt::new(p, h).tcp(9000, 40001, ACK).bytes(),
            Reason::DropNoRule,
        );
    }
}

/// A SYN-ACK never takes the flow cache: it may answer this host's new
/// connection on the tuple of a cached flow, and only the table moves that
/// connection to established. (Review finding: a SYN-ACK admitted from the
/// cache left it in SYN_SENT, whose timeout is 60 s instead of 5 days.)
#[test]
fn a_new_connection_on_a_cached_tuple_is_established_by_its_syn_ack() {
    require_root!();
    on_one_cpu();
    let mut b = Bench::new();
    cached_flow(&mut b, H4, P4, 40002);
    // A new connection on the same tuple (a client that reuses its port).
    b.egress(&Pkt::new(H4, P4).tcp(40002, 9000, SYN).bytes());
    let syn_ack = Pkt::new(P4, H4).tcp(9000, 40002, SYN | ACK).bytes();
    let state = |b: &Bench| {
        let path = portcullis::dataplane::maps_dir(b.pins.path()).join("CONNTRACK4");
        let map: aya::maps::HashMap<_, portcullis_common::FlowKey4, portcullis_common::Flow> =
            aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(
                aya::maps::MapData::from_pin(path).unwrap(),
            ))
            .unwrap();
        let flows: Vec<_> = map.iter().flatten().collect();
        assert_eq!(flows.len(), 1, "{flows:?}");
        flows[0].1.state
    };
    assert_eq!(state(&b), portcullis_common::FLOW_TCP_SYN_SENT);
    b.expect("the new syn-ack", &syn_ack, Reason::PassEstablished);
    assert_eq!(
        state(&b),
        portcullis_common::FLOW_TCP_ESTABLISHED,
        "the new connection's syn-ack did not establish it"
    );
}

/// Keeps this thread on CPU 0: every test run then sees the same per-CPU
/// flow cache.
fn on_one_cpu() {
    let mut one = nix::sched::CpuSet::new();
    one.set(0).unwrap();
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &one).unwrap();
}

/// Opens a TCP connection from `h:local` to `p:9000` and admits three of
/// its replies: the first from the connection table (which caches the
/// flow), the others from this CPU's flow cache.
fn cached_flow(b: &mut Bench, h: &str, p: &str, local: u16) {
    b.egress(&Pkt::new(h, p).tcp(local, 9000, SYN).bytes());
    b.expect(
        "the answer to this host's syn",
        &Pkt::new(p, h).tcp(9000, local, SYN | ACK).bytes(),
        Reason::PassEstablished,
    );
    for _ in 0..3 {
        b.expect(
            "a reply (the table, then the cache)",
            &Pkt::new(p, h).tcp(9000, local, ACK).bytes(),
            Reason::PassEstablished,
        );
    }
}
