//! The stateful data path with real traffic: replies to what the protected
//! host opens come back in, forged or unrelated "replies" do not, open
//! connections survive the daemon's start and restart, and path-MTU
//! discovery works through a narrow hop.

use std::{
    net::{SocketAddr, UdpSocket},
    time::Duration,
};

use portcullis_tests::*;

const MB: usize = 1024 * 1024;

fn host_addr(v6: bool) -> &'static str {
    if v6 { HOST_V6 } else { HOST_V4 }
}

fn peer_addr(v6: bool) -> &'static str {
    if v6 { PEER_V6 } else { PEER_V4 }
}

fn any_port(v6: bool) -> SocketAddr {
    if v6 {
        "[::]:0".parse().unwrap()
    } else {
        "0.0.0.0:0".parse().unwrap()
    }
}

fn start(ns: &Netns, config: &ConfigFile) -> Daemon {
    Daemon::start(ns, config).expect("start portcullisd")
}

fn outbound_flows_get_replies(v6: bool) {
    let pair = Pair::new().unwrap();
    let pins = PinDir::new().unwrap();
    let cfg = config(&pins, false, "").unwrap();
    tcp_source_server(&pair.peer, sock(peer_addr(v6), 5001), 8 * MB).unwrap();
    udp_echo_server(&pair.peer, sock(peer_addr(v6), 5002)).unwrap();
    TcpServer::start(&pair.host, sock(host_addr(v6), 5003)).unwrap();
    let _daemon = start(&pair.host, &cfg);

    // A download of several MB.
    let mut s = tcp_connect(&pair.host, sock(peer_addr(v6), 5001)).unwrap();
    assert_eq!(receive_all(&mut s).unwrap(), 8 * MB, "download incomplete");

    // UDP request and reply.
    let c = pair.host.enter(|| UdpSocket::bind(any_port(v6))).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    c.send_to(b"question", sock(peer_addr(v6), 5002)).unwrap();
    let mut buf = [0u8; 64];
    let (n, _) = c.recv_from(&mut buf).expect("UDP reply dropped");
    assert_eq!(&buf[..n], b"question");

    // Our own ping gets its reply.
    assert!(ping(&pair.host, peer_addr(v6)), "echo reply dropped");
    assert!(pins.counter(Reason::PassEstablished) > 8 * MB as u64 / 1500 / 2);

    // New inbound connections are still dropped.
    let before = pins.counter(Reason::DropNoRule);
    let r = tcp_probe(&pair.peer, sock(host_addr(v6), 5003));
    assert!(r.is_err(), "inbound connection admitted");
    pins.expect_counter(Reason::DropNoRule, before + 1);
}

#[test]
fn ipv4_outbound_flows_get_their_replies() {
    require_root!();
    outbound_flows_get_replies(false);
}

#[test]
fn ipv6_outbound_flows_get_their_replies() {
    require_root!();
    outbound_flows_get_replies(true);
}

fn forged_replies_dropped(v6: bool) {
    let pair = Pair::new().unwrap();
    let pins = PinDir::new().unwrap();
    let cfg = config(&pins, false, "").unwrap();
    let _daemon = start(&pair.host, &cfg);

    let client = udp_bind(&pair.host, any_port(v6)).unwrap();
    let other = udp_bind(&pair.host, any_port(v6)).unwrap();
    let client_addr = sock(host_addr(v6), client.local_addr().unwrap().port());
    let other_addr = sock(host_addr(v6), other.local_addr().unwrap().port());
    let server = udp_bind(&pair.peer, sock(peer_addr(v6), 5002)).unwrap();
    let forger = udp_bind(&pair.peer, sock(peer_addr(v6), 5999)).unwrap();

    client.send_to(b"hello", sock(peer_addr(v6), 5002)).unwrap();
    assert!(udp_received(&server));

    let c = pins.counters().unwrap();
    // The real reply.
    server.send_to(b"reply", client_addr).unwrap();
    assert!(udp_received(&client), "the genuine reply was dropped");
    pins.expect_counter(Reason::PassEstablished, c[&Reason::PassEstablished] + 1);
    // From the right host but another source port.
    forger.send_to(b"forged", client_addr).unwrap();
    assert!(
        !udp_received(&client),
        "reply from a forged source port admitted"
    );
    // From the right source port to a port with no flow.
    server.send_to(b"stray", other_addr).unwrap();
    assert!(
        !udp_received(&other),
        "reply to a port without a flow admitted"
    );
    pins.expect_counter(Reason::DropNoRule, c[&Reason::DropNoRule] + 2);
    pins.expect_counter(Reason::PassEstablished, c[&Reason::PassEstablished] + 1);
}

#[test]
fn ipv4_forged_or_unrelated_replies_are_dropped() {
    require_root!();
    forged_replies_dropped(false);
}

#[test]
fn ipv6_forged_or_unrelated_replies_are_dropped() {
    require_root!();
    forged_replies_dropped(true);
}

#[test]
fn connections_open_before_start_survive_start_and_restart() {
    require_root!();
    let pair = Pair::new().unwrap();
    let pins = PinDir::new().unwrap();
    let cfg = config(&pins, false, "").unwrap();
    // Inbound (like the operator's SSH session) and outbound (a download),
    // IPv4 and IPv6, all to ports no rule admits.
    for v6 in [false, true] {
        tcp_echo_server(&pair.host, sock(host_addr(v6), 7000)).unwrap();
        tcp_echo_server(&pair.peer, sock(peer_addr(v6), 7001)).unwrap();
    }
    let mut flows = Vec::new();
    for v6 in [false, true] {
        flows.push(tcp_connect(&pair.peer, sock(host_addr(v6), 7000)).unwrap());
        flows.push(tcp_connect(&pair.host, sock(peer_addr(v6), 7001)).unwrap());
    }
    let roundtrip_all = |flows: &mut Vec<std::net::TcpStream>, when: &str| {
        for (i, f) in flows.iter_mut().enumerate() {
            echo_roundtrip(f, b"still here\n").unwrap_or_else(|e| panic!("flow {i} {when}: {e}"));
        }
    };
    roundtrip_all(&mut flows, "before start");
    // A download that runs for about 4 s, across the start and the restart.
    tcp_paced_source_server(
        &pair.peer,
        sock(PEER_V4, 7002),
        200,
        Duration::from_millis(20),
    )
    .unwrap();
    let mut download = tcp_connect(&pair.host, sock(PEER_V4, 7002)).unwrap();
    let download = std::thread::spawn(move || receive_all(&mut download));

    let daemon = start(&pair.host, &cfg);
    roundtrip_all(&mut flows, "after start");
    assert!(daemon.log().contains("seeded=5"), "{}", daemon.log());
    // The filter is on: a new connection to the same port is dropped.
    assert!(tcp_probe(&pair.peer, sock(HOST_V4, 7000)).is_err());

    daemon.kill();
    let daemon = start(&pair.host, &cfg);
    let log = daemon.log();
    assert!(log.contains("attach=Adopted"), "{log}");
    roundtrip_all(&mut flows, "after restart");
    let _ = daemon.terminate();
    roundtrip_all(&mut flows, "after the daemon exited");
    let got = download.join().unwrap().expect("the download broke");
    assert_eq!(got, 200 * 64 * 1024, "download incomplete");
}

/// Sends 4 MB across the 1280-byte hop: from the protected host to the
/// server (`outbound`), or from an admitted port of the protected host to a
/// client on the server's side. Either way the host's full-size segments only
/// get through once the router's "fragmentation needed" / "packet too big"
/// reaches the host.
fn path_mtu(v6: bool, outbound: bool) {
    let net = Routed::new().unwrap();
    let pins = PinDir::new().unwrap();
    let cfg = ConfigFile::new(&format!(
        "interfaces = [\"{HOST_IFACE}\"]\npin_dir = \"{}\"\n[[ingress_rules]]\nid = \"svc\"\nfrom_port = 8080\nto_port = 8080\n",
        pins.path().display()
    ))
    .unwrap();
    let (host, server) = if v6 {
        (ROUTED_HOST_V6, ROUTED_SERVER_V6)
    } else {
        (ROUTED_HOST_V4, ROUTED_SERVER_V4)
    };
    let _daemon = start(&net.host, &cfg);
    let received = if outbound {
        let rx = tcp_sink_server(&net.server, sock(server, 9000)).unwrap();
        let mut s = tcp_connect(&net.host, sock(server, 9000)).unwrap();
        send_bytes(&mut s, 4 * MB).expect("upload stalled: ICMP error not delivered?");
        rx.recv_timeout(Duration::from_secs(30)).unwrap().unwrap()
    } else {
        tcp_source_server(&net.host, sock(host, 8080), 4 * MB).unwrap();
        let mut s = tcp_connect(&net.server, sock(host, 8080)).unwrap();
        receive_all(&mut s).expect("download stalled: ICMP error not delivered?")
    };
    assert_eq!(received, 4 * MB);
    assert!(
        pins.counter(Reason::PassRelated) >= 1,
        "no ICMP error was admitted"
    );
    let route = net.host.ip(&["route", "get", server]).unwrap();
    assert!(
        route.contains(&format!("mtu {NARROW_MTU}")),
        "no PMTU learned: {route}"
    );
}

#[test]
fn ipv4_path_mtu_discovery_for_outbound_flows() {
    require_root!();
    path_mtu(false, true);
}

#[test]
fn ipv6_path_mtu_discovery_for_outbound_flows() {
    require_root!();
    path_mtu(true, true);
}

#[test]
fn ipv4_path_mtu_discovery_for_admitted_server_port() {
    require_root!();
    path_mtu(false, false);
}

#[test]
fn ipv6_path_mtu_discovery_for_admitted_server_port() {
    require_root!();
    path_mtu(true, false);
}

#[test]
fn clsact_egress_path_records_flows_and_is_adopted() {
    require_root!();
    let pair = Pair::new().unwrap();
    let pins = PinDir::new().unwrap();
    let cfg = ConfigFile::new(&format!(
        "interfaces = [\"{HOST_IFACE}\"]\npin_dir = \"{}\"\ntc_attach = \"clsact\"\n",
        pins.path().display()
    ))
    .unwrap();
    udp_echo_server(&pair.peer, sock(PEER_V4, 5002)).unwrap();
    let daemon = start(&pair.host, &cfg);
    assert!(daemon.log().contains("attach=New"), "{}", daemon.log());
    let filters = pair
        .host
        .command("tc")
        .args(["filter", "show", "dev", HOST_IFACE, "egress"])
        .output()
        .unwrap();
    let filters = String::from_utf8_lossy(&filters.stdout).into_owned();
    // The filter carries the program's name as the kernel keeps it (15
    // characters): the program is opened from its pin.
    assert!(
        filters.contains("portcullis_egre"),
        "no clsact filter: {filters}"
    );
    assert!(
        !pins.path().join("links/tcx-pc0").exists(),
        "a TCX link was made too"
    );

    let check_reply = || {
        let c = pair.host.enter(|| UdpSocket::bind("0.0.0.0:0")).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        c.send_to(b"q", sock(PEER_V4, 5002)).unwrap();
        let mut buf = [0u8; 8];
        c.recv_from(&mut buf)
            .expect("UDP reply dropped on the clsact path");
    };
    check_reply();

    daemon.kill();
    let daemon = start(&pair.host, &cfg);
    let log = daemon.log();
    assert!(
        log.lines()
            .any(|l| l.contains("recording outbound flows") && l.contains("attach=Adopted")),
        "{log}"
    );
    let after = pair
        .host
        .command("tc")
        .args(["filter", "show", "dev", HOST_IFACE, "egress"])
        .output()
        .unwrap();
    let after = String::from_utf8_lossy(&after.stdout).into_owned();
    // One filter (each shows its program once, with `direct-action`).
    assert_eq!(
        after
            .lines()
            .filter(|l| l.contains("portcullis_egre") && l.contains("direct-action"))
            .count(),
        1,
        "filters after restart: {after}"
    );
    check_reply();

    // Detach (of a stopped daemon's pins) removes the filter too.
    drop(daemon);
    let out = detach(&pair.host, &cfg);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let gone = pair
        .host
        .command("tc")
        .args(["filter", "show", "dev", HOST_IFACE, "egress"])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&gone.stdout).contains("portcullis_egre"));
}

/// A port published the way container runtimes do it (DNAT in the protected
/// host to a service in another namespace behind it) is filtered at the
/// external interface like any local port: XDP runs before the DNAT.
#[test]
fn published_ports_are_filtered_before_dnat() {
    require_root!();
    let pair = Pair::new().unwrap();
    let container = Netns::new("c").unwrap();
    veth(&pair.host, "ctr0", &container, "eth0").unwrap();
    pair.host
        .ip(&["addr", "add", "10.200.9.1/24", "dev", "ctr0"])
        .unwrap();
    container
        .ip(&["addr", "add", "10.200.9.2/24", "dev", "eth0"])
        .unwrap();
    container
        .ip(&["route", "add", "default", "via", "10.200.9.1"])
        .unwrap();
    pair.host.sysctl("net.ipv4.ip_forward", "1").unwrap();
    for cmd in [
        "add table ip nat",
        "add chain ip nat prerouting { type nat hook prerouting priority dstnat; }",
        "add rule ip nat prerouting tcp dport 8081 dnat to 10.200.9.2:80",
    ] {
        run(pair.host.command("nft").args(cmd.split(' '))).unwrap();
    }
    TcpServer::start(&container, sock("10.200.9.2", 80)).unwrap();
    let published = sock(HOST_V4, 8081);
    tcp_probe_control(&pair.peer, published).expect("control: the published port works unfiltered");

    for (admitted, rules) in [
        (false, ""),
        (
            true,
            "[[ingress_rules]]\nid = \"published\"\nfrom_port = 8081\nto_port = 8081\n",
        ),
    ] {
        let pins = PinDir::new().unwrap();
        let cfg = config(&pins, false, rules).unwrap();
        let daemon = start(&pair.host, &cfg);
        let r = tcp_probe(&pair.peer, published);
        assert_eq!(
            r.is_ok(),
            admitted,
            "published port with rules {rules:?}: {r:?}"
        );
        drop(daemon);
        drop(pins);
    }
}

/// Jumbo frames: native XDP on a 9000-byte MTU veth needs a multi-buffer
/// (`xdp.frags`) program; large datagrams are filtered like small ones.
#[test]
fn jumbo_mtu_interfaces_are_protected_natively() {
    require_root!();
    let pair = Pair::new().unwrap();
    pair.host
        .ip(&["link", "set", HOST_IFACE, "mtu", "9000"])
        .unwrap();
    pair.peer
        .ip(&["link", "set", PEER_IFACE, "mtu", "9000"])
        .unwrap();
    let pins = PinDir::new().unwrap();
    let cfg = config(
        &pins,
        false,
        "[[ingress_rules]]\nid = \"a\"\nfrom_port = 8080\nto_port = 8080\n",
    )
    .unwrap();
    let _daemon = start(&pair.host, &cfg);
    let link = pair.host.ip(&["-d", "link", "show", HOST_IFACE]).unwrap();
    // The single-buffer program (kernels before 5.18, or forced) cannot run
    // natively at this MTU: the daemon attaches it in generic mode instead.
    let single = std::env::var("PORTCULLIS_TEST_XDP_PROGRAM").is_ok_and(|v| v == "single-buffer");
    assert!(
        link.contains("prog/xdp") && link.contains("xdpgeneric") == single,
        "not native XDP (or, single-buffer, not generic):\n{link}"
    );

    let big = vec![0x42u8; 8000];
    for (port, admitted) in [(8080, true), (9090, false)] {
        let sink = udp_bind(&pair.host, sock(HOST_V4, port)).unwrap();
        udp_send(&pair.peer, sock(HOST_V4, port), &big).unwrap();
        assert_eq!(
            udp_received(&sink),
            admitted,
            "8000-byte datagram to {port}"
        );
    }
}

/// The operator's SSH session (real sshd and ssh) survives the daemon's
/// start and a restart, even with the SSH exemption off: the connection
/// table is seeded from the kernel's socket list. New sessions are refused.
#[test]
fn ssh_session_survives_start_and_restart() {
    require_root!();
    let pair = Pair::new().unwrap();
    let sshd = Sshd::start(&pair.host).unwrap();
    let mut session = SshSession::open(&sshd, &pair.peer, HOST_V4).unwrap();
    let pins = PinDir::new().unwrap();
    let cfg = config(&pins, false, "").unwrap();

    let daemon = start(&pair.host, &cfg);
    session.roundtrip("after start").unwrap();
    let fresh = sshd
        .client(&pair.peer, HOST_V4)
        .arg("true")
        .output()
        .unwrap();
    assert!(
        !fresh.status.success(),
        "a new SSH session got in with the exemption off"
    );

    daemon.kill();
    session.roundtrip("daemon killed").unwrap();
    let daemon = start(&pair.host, &cfg);
    session.roundtrip("after restart").unwrap();
    drop(daemon);
}

/// A version with a new map layout (`LAYOUT_VERSION`) takes over from the
/// running one under traffic: the previous version's programs keep
/// enforcing with their maps (pinned under `maps-v<N-1>`) until the new
/// ones replace them, the operator's SSH session stays up with the SSH
/// exemption off (the new, empty connection table is seeded from the
/// kernel's socket list), and no datagram to a denied port gets through.
/// The previous version here is this one with its maps moved to the
/// previous layout's directory, so the new daemon finds no maps of its own
/// layout, as after a real layout change.
#[test]
fn a_layout_upgrade_under_traffic_keeps_the_ssh_session() {
    require_root!();
    let pair = Pair::new().unwrap();
    let sshd = Sshd::start(&pair.host).unwrap();
    let mut session = SshSession::open(&sshd, &pair.peer, HOST_V4).unwrap();
    let pins = PinDir::new().unwrap();
    let cfg = config(&pins, false, "").unwrap();
    let daemon = start(&pair.host, &cfg);
    session.roundtrip("before the upgrade").unwrap();
    let sink = pair
        .host
        .enter(|| UdpSocket::bind(sock(HOST_V4, 7999)))
        .unwrap();
    let flood = Flood::start(
        &pair.peer,
        sink,
        sock(HOST_V4, 7999),
        Duration::from_micros(500),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    daemon.kill();
    let current = portcullis::dataplane::maps_dir(pins.path());
    let previous = pins
        .path()
        .join(format!("maps-v{}", portcullis_common::LAYOUT_VERSION - 1));
    std::fs::rename(&current, &previous).unwrap();
    session.roundtrip("between the versions").unwrap();
    let daemon = start(&pair.host, &cfg);
    assert!(
        daemon.log().contains("removed the maps of an older layout"),
        "{}",
        daemon.log()
    );
    assert!(!previous.exists(), "the previous layout's maps are left");
    session.roundtrip("after the upgrade").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let (sent, received) = flood.stop();
    assert!(sent > 100, "the sender kept sending ({sent})");
    assert_eq!(received, 0, "a denied datagram got through the upgrade");
    drop(daemon);
}

/// BIG TCP: GSO packets of more than 64 KiB carry 0 in their IP length
/// field. The egress parser bounds its reads by that field, except for such
/// outbound GSO packets (which end with the skb), so a bulk upload under an
/// egress allowlist works with (IPv6) BIG TCP on.
#[test]
fn big_tcp_uploads_pass_the_egress_allowlist() {
    require_root!();
    let pair = Pair::new().unwrap();
    for (ns, dev) in [(&pair.host, HOST_IFACE), (&pair.peer, PEER_IFACE)] {
        // (This iproute2 knows no gso_ipv4_max_size: IPv6 BIG TCP only.)
        ns.ip(&[
            "link",
            "set",
            dev,
            "gso_max_size",
            "185000",
            "gro_max_size",
            "185000",
        ])
        .unwrap();
    }
    let pins = PinDir::new().unwrap();
    let cfg = config(
        &pins,
        false,
        "[[egress_rules]]\nid = \"up\"\nfrom_port = 7001\nto_port = 7001\nip_ranges = []\nprotocol = \"tcp\"\n",
    )
    .unwrap();
    let _daemon = start(&pair.host, &cfg);
    for v6 in [false, true] {
        let done = tcp_sink_server(&pair.peer, sock(peer_addr(v6), 7001)).unwrap();
        let mut s = tcp_connect(&pair.host, sock(peer_addr(v6), 7001)).unwrap();
        send_bytes(&mut s, 32 * MB).unwrap();
        let got = done
            .recv_timeout(Duration::from_secs(30))
            .expect("upload finished")
            .unwrap();
        assert_eq!(got, 32 * MB, "upload under the allowlist (v6: {v6})");
    }
    // Not one segment was refused (TCP would recover from drops, slowly).
    for r in [Reason::DropMalformed, Reason::DropEgress] {
        assert_eq!(pins.counter(r), 0, "{} during the uploads", r.name());
    }
}
