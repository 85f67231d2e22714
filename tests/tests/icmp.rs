//! ICMP types and codes in rules (issue 18), with real traffic: a rule that
//! admits only echo requests admits ping (IPv4 and IPv6) but not a timestamp
//! request nor an unrelated destination unreachable from the same source;
//! a rule naming destination-unreachable then admits the latter. Every
//! message is checked where it arrives (a raw socket on the protected
//! host), after a control shows it arrives without the rule's restriction.

use std::{net::IpAddr, time::Duration};

use portcullis_tests::*;
use socket2::{Domain, Protocol, Socket, Type};

const ICMP: i32 = 1;
const ICMPV6: i32 = 58;
const RULES: &str = "[[ingress_rules]]\nid = \"echo-only\"\nfrom_port = 0\nto_port = 0\n\
ip_ranges = []\nprotocol = \"icmp\"\nicmp_types = [\"echo-request\"]\n";

/// The Internet checksum of `data`.
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An ICMP message of `kind`/`code` with identifier `id` and `body`
/// (ICMPv4 with its checksum; the kernel fills in ICMPv6's).
fn message(v6: bool, kind: u8, code: u8, id: u16, body: &[u8]) -> Vec<u8> {
    let mut m = vec![kind, code, 0, 0];
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&[0, 1]);
    m.extend_from_slice(body);
    if !v6 {
        let c = checksum(&m);
        m[2..4].copy_from_slice(&c.to_be_bytes());
    }
    m
}

/// What an unrelated destination unreachable quotes: a packet from the
/// host to an address it never talked to (no flow: nothing relates it).
fn quoted(v6: bool) -> Vec<u8> {
    if v6 {
        let mut h = vec![0x60, 0, 0, 0, 0, 8, 17, 64];
        h.extend_from_slice(
            &"fd00:200::1"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        h.extend_from_slice(
            &"fd00:200:99::9"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        h.extend_from_slice(&[0x9c, 0x40, 0x00, 0x35, 0, 8, 0, 0]);
        h
    } else {
        let mut h = vec![
            0x45, 0, 0, 28, 0, 1, 0, 0, 64, 17, 0, 0, 10, 200, 0, 1, 10, 200, 99, 9,
        ];
        let c = checksum(&h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        h.extend_from_slice(&[0x9c, 0x40, 0x00, 0x35, 0, 8, 0, 0]);
        h
    }
}

/// A raw ICMP (or ICMPv6) socket on the protected host: it sees every
/// message of that family the host receives.
fn listener(env: &Pair, v6: bool) -> Socket {
    let (domain, proto) = if v6 {
        (Domain::IPV6, ICMPV6)
    } else {
        (Domain::IPV4, ICMP)
    };
    let s = env
        .host
        .enter(|| Socket::new(domain, Type::RAW, Some(Protocol::from(proto))))
        .unwrap();
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    s
}

/// Sends the message from the peer and says whether the host's `sock`
/// received it (matched by type, code and identifier).
fn arrives(pair: &Pair, sock: &Socket, v6: bool, kind: u8, code: u8, id: u16, body: &[u8]) -> bool {
    let to: IpAddr = if v6 { HOST_V6 } else { HOST_V4 }.parse().unwrap();
    let m = message(v6, kind, code, id, body);
    raw_send(&pair.peer, to, if v6 { ICMPV6 } else { ICMP }, &m).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 2048];
    while std::time::Instant::now() < deadline {
        let Ok(n) = sock.recv(&mut buf) else { continue };
        // SAFETY: recv initialised the first n bytes.
        let got: Vec<u8> = buf[..n]
            .iter()
            .map(|b| unsafe { b.assume_init() })
            .collect();
        // IPv4 raw sockets deliver the IP header too; IPv6 ones do not.
        let icmp = if v6 {
            &got[..]
        } else {
            &got[usize::from(got[0] & 0xf) * 4..]
        };
        if icmp.len() >= 6 && icmp[0] == kind && icmp[1] == code && icmp[4..6] == id.to_be_bytes() {
            return true;
        }
    }
    false
}

#[test]
fn a_rule_admits_only_its_icmp_types() {
    require_root!();
    let pair = Pair::new().unwrap();
    let pins = PinDir::new().unwrap();
    let config = config(&pins, false, RULES).unwrap();
    let (l4, l6) = (listener(&pair, false), listener(&pair, true));
    let (unreach4, unreach6) = (quoted(false), quoted(true));
    // Control, before the filter: every message arrives.
    assert!(
        arrives(&pair, &l4, false, 13, 0, 1, &[0; 12]),
        "control: timestamp"
    );
    assert!(
        arrives(&pair, &l4, false, 3, 1, 2, &unreach4),
        "control: unreachable"
    );
    assert!(
        arrives(&pair, &l6, true, 1, 4, 3, &unreach6),
        "control: v6 unreachable"
    );
    assert!(
        arrives(&pair, &l6, true, 200, 0, 4, b"x"),
        "control: v6 type 200"
    );

    let _daemon = Daemon::start(&pair.host, &config).expect("portcullisd");
    let admitted = pins.counter(Reason::PassRule);
    assert!(
        ping(&pair.peer, HOST_V4),
        "IPv4 ping through the echo-request rule"
    );
    assert!(
        ping(&pair.peer, HOST_V6),
        "IPv6 ping through the echo-request rule"
    );
    assert!(
        pins.counter(Reason::PassRule) >= admitted + 2,
        "credited to the rule"
    );
    let dropped = pins.counter(Reason::DropIcmp);
    assert!(
        !arrives(&pair, &l4, false, 13, 0, 11, &[0; 12]),
        "a timestamp request got in"
    );
    assert!(
        !arrives(&pair, &l4, false, 3, 1, 12, &unreach4),
        "an unrelated unreachable got in"
    );
    assert!(
        !arrives(&pair, &l6, true, 1, 4, 13, &unreach6),
        "an unrelated v6 unreachable got in"
    );
    assert!(
        !arrives(&pair, &l6, true, 200, 0, 14, b"x"),
        "ICMPv6 type 200 got in"
    );
    assert!(
        pins.counter(Reason::DropIcmp) >= dropped + 4,
        "counted as drop_icmp"
    );

    // Destination unreachable, code 1 (host unreachable) only, both families.
    let out = cli(
        &config,
        &[
            "rules",
            "add",
            "--id",
            "unreach",
            "--protocol",
            "icmp",
            "--from-port",
            "0",
            "--to-port",
            "0",
            "--icmp-type",
            "destination-unreachable/1",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        arrives(&pair, &l4, false, 3, 1, 21, &unreach4),
        "code 1 admitted (v4)"
    );
    assert!(
        arrives(&pair, &l6, true, 1, 1, 22, &unreach6),
        "code 1 admitted (v6)"
    );
    assert!(
        !arrives(&pair, &l4, false, 3, 3, 23, &unreach4),
        "code 3 is not admitted"
    );
    assert!(
        !arrives(&pair, &l6, true, 1, 4, 24, &unreach6),
        "v6 code 4 is not admitted"
    );
    assert!(
        !arrives(&pair, &l4, false, 13, 0, 25, &[0; 12]),
        "timestamp still dropped"
    );
    let listed = String::from_utf8_lossy(&cli(&config, &["rules", "list"]).stdout).into_owned();
    assert!(listed.contains("destination-unreachable/1"), "{listed}");

    // A bad type is refused, naming the rule and the field, and changes nothing.
    let out = cli(
        &config,
        &[
            "rules",
            "add",
            "--id",
            "bad",
            "--protocol",
            "icmp",
            "--from-port",
            "0",
            "--to-port",
            "0",
            "--icmp-type",
            "icmp:300",
        ],
    );
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && said.contains("\"bad\"") && said.contains("icmp_types"),
        "{said}"
    );
    assert!(!String::from_utf8_lossy(&cli(&config, &["rules", "list"]).stdout).contains("bad"));
}

/// What is decided before the rules stays as it was: with `allow_ping`, an
/// echo request that a typed rule does not name still passes on the ping
/// setting (and IPv6 neighbour discovery, which ping needs, passes).
#[test]
fn the_ping_setting_and_neighbour_discovery_stay_before_typed_rules() {
    require_root!();
    let pair = Pair::new().unwrap();
    let pins = PinDir::new().unwrap();
    let rules = "allow_ping = true\n[[ingress_rules]]\nid = \"ts\"\nfrom_port = 0\n\
to_port = 0\nip_ranges = []\nprotocol = \"icmp\"\nicmp_types = [\"timestamp-request\"]\n";
    // Top-level keys before any table: `config_text` puts `rest` first.
    let config = ConfigFile::new(&config_text(&pins, rules)).unwrap();
    let l4 = listener(&pair, false);
    let _daemon = Daemon::start(&pair.host, &config).expect("portcullisd");
    pair.flush_neighbours().unwrap();
    let (ping0, rule0, nd0) = (
        pins.counter(Reason::PassPing),
        pins.counter(Reason::PassRule),
        pins.counter(Reason::PassNeighbor),
    );
    assert!(ping(&pair.peer, HOST_V4), "IPv4 ping on the ping setting");
    assert!(ping(&pair.peer, HOST_V6), "IPv6 ping on the ping setting");
    assert!(
        pins.counter(Reason::PassPing) >= ping0 + 2,
        "counted as pass_ping"
    );
    assert!(
        pins.counter(Reason::PassNeighbor) > nd0,
        "neighbour discovery"
    );
    assert_eq!(pins.counter(Reason::PassRule), rule0, "no rule credited");
    assert!(
        arrives(&pair, &l4, false, 13, 0, 31, &[0; 12]),
        "the rule's own type"
    );
    assert_eq!(pins.counter(Reason::PassRule), rule0 + 1);
}
