//! Clusters, source ranges and egress lists with real traffic between hosts
//! on one segment: host 1 is protected; hosts 2 and 3 are its cluster's
//! peers... or not, as each test says.

use std::time::Duration;

use portcullis_tests::*;

fn protected(lan: &Lan, pins: &PinDir, body: &str) -> (ConfigFile, Daemon) {
    let cfg = ConfigFile::new(&format!(
        "interfaces = [\"{HOST_IFACE}\"]\npin_dir = \"{}\"\n{body}",
        pins.path().display()
    ))
    .unwrap();
    let daemon = Daemon::start(lan.host(1), &cfg).expect("start portcullisd");
    (cfg, daemon)
}

fn reaches(lan: &Lan, from: usize, to: usize, port: u16) -> bool {
    tcp_probe(lan.host(from), sock(&Lan::v4(to), port)).is_ok()
}

/// Hosts 1 and 2 form cluster "a"; host 3 is in cluster "b"; host 4 is
/// in none. Peers reach each other on any port and protocol; the other
/// cluster is dropped (and counted as such) until a rule admits one port.
#[test]
fn clusters_reach_each_other_and_are_isolated_from_other_clusters() {
    require_root!();
    let lan = Lan::new(4).unwrap();
    for port in [7777, 9000] {
        TcpServer::start(lan.host(1), sock(&Lan::v4(1), port)).unwrap();
        TcpServer::start(lan.host(1), sock(&Lan::v6(1), port)).unwrap();
    }
    let cluster = "[cluster]\nid = \"a\"\npeers = [\"10.200.10.2/32\", \"fd00:200:10::2/128\"]\nother_clusters = [\"10.200.10.3/32\"]\n";
    let pins = PinDir::new().unwrap();
    let (_cfg, daemon) = protected(&lan, &pins, cluster);

    // The peer: any TCP port, UDP, ping, IPv4 and IPv6.
    assert!(reaches(&lan, 2, 1, 7777) && reaches(&lan, 2, 1, 9000));
    assert!(
        tcp_probe(lan.host(2), sock(&Lan::v6(1), 9000)).is_ok(),
        "peer over IPv6"
    );
    let sink = udp_bind(lan.host(1), sock(&Lan::v4(1), 5353)).unwrap();
    udp_send(lan.host(2), sock(&Lan::v4(1), 5353), b"peer").unwrap();
    assert!(udp_received(&sink), "peer UDP");
    assert!(ping(lan.host(2), &Lan::v4(1)), "peer ping");
    assert!(pins.counter(Reason::PassPeer) >= 5);

    // The other cluster and a stranger: dropped, counted apart.
    let other = pins.counter(Reason::DropOtherCluster);
    assert!(!reaches(&lan, 3, 1, 9000), "other cluster admitted");
    pins.expect_counter(Reason::DropOtherCluster, other + 1);
    let none = pins.counter(Reason::DropNoRule);
    assert!(!reaches(&lan, 4, 1, 9000), "stranger admitted");
    pins.expect_counter(Reason::DropNoRule, none + 1);
    drop(daemon);

    // A cross-cluster rule for one port: that port only, from that member only.
    let rule = "[[ingress_rules]]\nid = \"b-to-a\"\nfrom_port = 9000\nto_port = 9000\nip_ranges = [\"10.200.10.3/32\"]\n";
    let (_cfg, _daemon) = protected(&lan, &pins, &format!("{cluster}{rule}"));
    assert!(
        reaches(&lan, 3, 1, 9000),
        "cross-cluster rule did not admit"
    );
    assert!(
        !reaches(&lan, 3, 1, 7777),
        "cross-cluster rule admitted another port"
    );
    assert!(
        !reaches(&lan, 4, 1, 9000),
        "the rule's CIDR admitted another source"
    );
    assert!(reaches(&lan, 2, 1, 7777), "peers lost after the change");
}

/// A rule limited to one CIDR admits that source and no other.
#[test]
fn a_rule_limited_to_a_cidr_admits_only_that_source() {
    require_root!();
    let lan = Lan::new(3).unwrap();
    TcpServer::start(lan.host(1), sock(&Lan::v4(1), 8443)).unwrap();
    TcpServer::start(lan.host(1), sock(&Lan::v6(1), 8443)).unwrap();
    let pins = PinDir::new().unwrap();
    let rule = "[[ingress_rules]]\nid = \"admin\"\nfrom_port = 8443\nto_port = 8443\nip_ranges = [\"10.200.10.2/32\", \"fd00:200:10::2/128\"]\n";
    let (_cfg, _daemon) = protected(&lan, &pins, rule);
    assert!(reaches(&lan, 2, 1, 8443));
    assert!(tcp_probe(lan.host(2), sock(&Lan::v6(1), 8443)).is_ok());
    assert!(!reaches(&lan, 3, 1, 8443));
    assert!(tcp_probe(lan.host(3), sock(&Lan::v6(1), 8443)).is_err());
}

/// A non-empty egress list is an allowlist: a listed destination works with
/// its replies; unlisted ones are dropped on the way out. Peers, inbound
/// connections the rules admit and the host's own needs keep working.
#[test]
fn a_non_empty_egress_list_is_an_allowlist() {
    require_root!();
    let lan = Lan::new(4).unwrap();
    for (host, port) in [(3, 80), (3, 81), (4, 80), (2, 6000)] {
        tcp_source_server(lan.host(host), sock(&Lan::v4(host), port), 1 << 20).unwrap();
    }
    TcpServer::start(lan.host(1), sock(&Lan::v4(1), 22)).unwrap();
    let pins = PinDir::new().unwrap();
    let body = "[ssh]\nallow = true\n[cluster]\nid = \"a\"\npeers = [\"10.200.10.2/32\"]\n\
                [[egress_rules]]\nid = \"web\"\nfrom_port = 80\nto_port = 80\nip_ranges = [\"10.200.10.3/32\"]\n";
    let (_cfg, _daemon) = protected(&lan, &pins, body);

    let mut s = tcp_connect(lan.host(1), sock(&Lan::v4(3), 80)).expect("listed destination");
    assert_eq!(
        receive_all(&mut s).unwrap(),
        1 << 20,
        "replies of the listed flow"
    );
    let before = pins.counter(Reason::DropEgress);
    assert!(
        tcp_probe(lan.host(1), sock(&Lan::v4(3), 81)).is_err(),
        "unlisted port left"
    );
    assert!(
        tcp_probe(lan.host(1), sock(&Lan::v4(4), 80)).is_err(),
        "unlisted host reached"
    );
    assert!(pins.counter(Reason::DropEgress) >= before + 2);
    let udp = udp_bind(lan.host(4), sock(&Lan::v4(4), 53)).unwrap();
    udp_send(lan.host(1), sock(&Lan::v4(4), 53), b"dns?").unwrap();
    assert!(!udp_received(&udp), "unlisted UDP left the host");

    // Peers both ways; SSH into the host still answers (its replies go out).
    let mut s = tcp_connect(lan.host(1), sock(&Lan::v4(2), 6000)).expect("outbound to a peer");
    assert_eq!(receive_all(&mut s).unwrap(), 1 << 20);
    assert!(
        tcp_probe(lan.host(4), sock(&Lan::v4(1), 22)).is_ok(),
        "SSH replies blocked by the egress list"
    );
    // Neighbour discovery and ARP still work after the caches are flushed.
    // (The one-shot server on port 80 has gone; listen there again.)
    TcpServer::start(lan.host(3), sock(&Lan::v4(3), 80)).unwrap();
    lan.host(1)
        .ip(&["neigh", "flush", "dev", HOST_IFACE])
        .unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let r = tcp_probe(lan.host(1), sock(&Lan::v4(3), 80));
    assert!(r.is_ok(), "ARP under the egress list: {r:?}");
}
