//! FQDN egress rules (issue 19, item 2) with a real DNS server: dnsmasq in
//! the peer namespace serves a test zone; the protected host resolves
//! through the daemon's forwarder (127.0.0.153:53) and connects to
//! servers in the peer namespace. Everything here is real: kernel
//! programs, the daemon, dnsmasq, sockets.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    thread,
    time::Duration,
};

use portcullis_tests::{dns::*, *};

pub const FORWARDER: &str = "127.0.0.153";
const UPSTREAM: &str = "10.200.0.2";
const OTHER_RESOLVER: &str = "10.200.0.3";
/// Addresses the test zone hands out (on the peer).
const SERVERS: [&str; 4] = ["10.200.0.10", "10.200.0.11", "10.200.0.20", "10.200.0.21"];
const PORT: u16 = 8443;
const OTHER_PORT: u16 = 9000;

pub fn rules(floor: u32, max: u32) -> String {
    format!(
        "egress = \"allowlist\"\n\
         [[egress_rules]]\nid = \"api\"\nfrom_port = {PORT}\nto_port = {PORT}\nprotocol = \"tcp\"\n\
         names = [\"allowed.test\", \"*.wild.test\"]\n\
         [dns]\nlisten = \"{FORWARDER}:53\"\nupstreams = [\"{UPSTREAM}\"]\nttl_floor = {floor}\nttl_max = {max}\n"
    )
}

/// The peer's servers (echo, on both ports of every zone address) and the
/// two resolvers; checked to answer before anything filters.
pub fn setup(hosts: &[(&str, &str)], cnames: &[(&str, &str)]) -> (Pair, Dnsmasq, Dnsmasq) {
    assert!(have_dnsmasq(), "dnsmasq is not installed (APT_PACKAGES)");
    let pair = Pair::new().expect("namespaces");
    for a in SERVERS.iter().chain([&OTHER_RESOLVER]) {
        pair.peer
            .ip(&["addr", "add", &format!("{a}/24"), "dev", PEER_IFACE])
            .unwrap();
    }
    for a in SERVERS {
        for port in [PORT, OTHER_PORT] {
            tcp_echo_server(&pair.peer, tcp(a, port)).unwrap();
        }
    }
    let upstream = Dnsmasq::start(&pair.peer, UPSTREAM, 1, hosts, cnames).unwrap();
    let other = Dnsmasq::start(&pair.peer, OTHER_RESOLVER, 1, hosts, &[]).unwrap();
    // Controls: the host reaches both resolvers and every server.
    for r in [UPSTREAM, OTHER_RESOLVER] {
        lookup(
            &pair.host,
            dns_server(r),
            "allowed.test",
            Duration::from_secs(2),
        )
        .unwrap_or_else(|e| panic!("control: {r} does not answer: {e}"));
    }
    for a in SERVERS {
        tcp_probe_control(&pair.host, tcp(a, PORT)).expect("control: a server does not answer");
    }
    (pair, upstream, other)
}

pub fn tcp(a: &str, port: u16) -> SocketAddr {
    SocketAddr::new(a.parse().unwrap(), port)
}

/// Whether a new TCP connection from the host to `to` is admitted (a drop
/// is a timeout; anything else fails the test).
pub fn reaches(pair: &Pair, to: SocketAddr) -> bool {
    match tcp_probe(&pair.host, to) {
        Ok(()) => true,
        Err(e) if e.kind() == io::ErrorKind::TimedOut => false,
        Err(e) => panic!("-> {to}: {e}"),
    }
}

pub fn resolve(pair: &Pair, name: &str) -> Vec<IpAddr> {
    lookup(
        &pair.host,
        dns_server(FORWARDER),
        name,
        Duration::from_secs(3),
    )
    .unwrap_or_else(|e| panic!("{name} via the forwarder: {e}"))
}

fn ip(a: &str) -> IpAddr {
    a.parse().unwrap()
}

/// Right after a lookup through the forwarder the allowed name's address
/// is reachable, on the rule's port only; a name no rule lists is not,
/// also when it shares an address with an allowed name; a CNAME to an
/// allowed name works; resolvers other than the forwarder are out of reach.
#[test]
fn names_admit_what_they_resolve_to_and_nothing_else() {
    let hosts = [
        ("allowed.test", SERVERS[0]),
        ("x.wild.test", SERVERS[1]),
        ("evil.test", SERVERS[2]),
        ("shared.wild.test", SERVERS[3]),
        ("evil2.test", SERVERS[3]),
    ];
    let (pair, _up, _other) = setup(&hosts, &[("alias.test", "x.wild.test")]);
    let pins = PinDir::new().unwrap();
    let config = ConfigFile::new(&config_text(&pins, &rules(30, 60))).unwrap();
    let _d = Daemon::start(&pair.host, &config).unwrap();
    // Nothing learned yet: no zone address is reachable.
    for a in SERVERS {
        assert!(!reaches(&pair, tcp(a, PORT)), "{a} before any lookup");
    }
    // The first connection right after the answer.
    assert_eq!(resolve(&pair, "allowed.test"), vec![ip(SERVERS[0])]);
    assert!(
        reaches(&pair, tcp(SERVERS[0], PORT)),
        "allowed.test right after its lookup"
    );
    assert!(
        !reaches(&pair, tcp(SERVERS[0], OTHER_PORT)),
        "allowed.test on a port its rule does not list"
    );
    // A CNAME to a name under the wildcard.
    assert_eq!(resolve(&pair, "alias.test"), vec![ip(SERVERS[1])]);
    assert!(
        reaches(&pair, tcp(SERVERS[1], PORT)),
        "alias.test -> x.wild.test"
    );
    // A name no rule lists admits nothing.
    assert_eq!(resolve(&pair, "evil.test"), vec![ip(SERVERS[2])]);
    assert!(
        !reaches(&pair, tcp(SERVERS[2], PORT)),
        "evil.test is not allowed"
    );
    // Shared address: admitted for the allowed name's port only.
    assert_eq!(resolve(&pair, "evil2.test"), vec![ip(SERVERS[3])]);
    assert!(
        !reaches(&pair, tcp(SERVERS[3], PORT)),
        "shared address before the allowed name"
    );
    assert_eq!(resolve(&pair, "shared.wild.test"), vec![ip(SERVERS[3])]);
    assert!(
        reaches(&pair, tcp(SERVERS[3], PORT)),
        "shared.wild.test's port"
    );
    assert!(
        !reaches(&pair, tcp(SERVERS[3], OTHER_PORT)),
        "evil2.test's other port through the shared address"
    );
    // `status` shows the forwarder and what it learned.
    let status = cli(&config, &["status"]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        text.contains(&format!("forwarder on {FORWARDER}:53"))
            && text.contains(" learned destinations"),
        "{text}"
    );
    // A rule with a name added at run time through the CLI: evil2.test's
    // other port, after its next lookup.
    let added = cli(
        &config,
        &[
            "rules",
            "add",
            "--egress",
            "--id",
            "evil2",
            "--from-port",
            "9000",
            "--to-port",
            "9000",
            "--protocol",
            "tcp",
            "--name",
            "evil2.test",
        ],
    );
    assert!(
        added.status.success(),
        "{}",
        String::from_utf8_lossy(&added.stderr)
    );
    assert!(
        !reaches(&pair, tcp(SERVERS[3], OTHER_PORT)),
        "before evil2.test's lookup"
    );
    resolve(&pair, "evil2.test");
    assert!(
        reaches(&pair, tcp(SERVERS[3], OTHER_PORT)),
        "the added rule's name, after its lookup"
    );
    // Other resolvers, and the upstream itself, are out of reach.
    for r in [OTHER_RESOLVER, UPSTREAM] {
        let direct = lookup(
            &pair.host,
            dns_server(r),
            "allowed.test",
            Duration::from_secs(1),
        );
        assert!(
            direct.is_err(),
            "a direct query to {r} got through: {direct:?}"
        );
    }
}

/// The addresses of an allowed name change between lookups (dnsmasq
/// reconfigured): the new one is reachable right after the new lookup;
/// after the TTL (and the configured maximum) the old one admits no new
/// flow, but a connection opened while it was valid keeps working.
/// AAAA answers admit IPv6 destinations the same way: reachable right
/// after the lookup on the rule's port only; a name no rule lists, on the
/// same network, is not.
#[test]
fn aaaa_answers_admit_ipv6_destinations() {
    const ALLOWED6: &str = "fd00:200::10";
    const EVIL6: &str = "fd00:200::20";
    let hosts = [
        ("allowed.test", SERVERS[0]),
        ("allowed.test", ALLOWED6),
        ("evil.test", EVIL6),
    ];
    let (pair, _up, _other) = setup(&hosts, &[]);
    for a in [ALLOWED6, EVIL6] {
        pair.peer
            .ip(&[
                "addr",
                "add",
                &format!("{a}/64"),
                "dev",
                PEER_IFACE,
                "nodad",
            ])
            .unwrap();
        for port in [PORT, OTHER_PORT] {
            tcp_echo_server(&pair.peer, tcp(a, port)).unwrap();
        }
        tcp_probe_control(&pair.host, tcp(a, PORT)).expect("control: a v6 server does not answer");
    }
    let pins = PinDir::new().unwrap();
    let config = ConfigFile::new(&config_text(&pins, &rules(30, 60))).unwrap();
    let _d = Daemon::start(&pair.host, &config).unwrap();
    assert!(
        !reaches(&pair, tcp(ALLOWED6, PORT)),
        "{ALLOWED6} before any lookup"
    );
    let got = lookup6(
        &pair.host,
        dns_server(FORWARDER),
        "allowed.test",
        Duration::from_secs(3),
    )
    .unwrap();
    assert_eq!(got, vec![ip(ALLOWED6)]);
    assert!(
        reaches(&pair, tcp(ALLOWED6, PORT)),
        "allowed.test's IPv6 address right after its AAAA lookup"
    );
    assert!(
        !reaches(&pair, tcp(ALLOWED6, OTHER_PORT)),
        "allowed.test's IPv6 address on a port its rule does not list"
    );
    let got = lookup6(
        &pair.host,
        dns_server(FORWARDER),
        "evil.test",
        Duration::from_secs(3),
    )
    .unwrap();
    assert_eq!(got, vec![ip(EVIL6)]);
    assert!(
        !reaches(&pair, tcp(EVIL6, PORT)),
        "evil.test (no rule) after its lookup"
    );
}

#[test]
fn changed_addresses_and_expiry() {
    let (pair, mut up, _other) = setup(&[("allowed.test", SERVERS[0])], &[]);
    let pins = PinDir::new().unwrap();
    let config = ConfigFile::new(&config_text(&pins, &rules(1, 2))).unwrap();
    let _d = Daemon::start(&pair.host, &config).unwrap();
    assert_eq!(resolve(&pair, "allowed.test"), vec![ip(SERVERS[0])]);
    let mut open =
        tcp_connect(&pair.host, tcp(SERVERS[0], PORT)).expect("first address right after lookup");
    echo_roundtrip(&mut open, b"before\n").unwrap();
    up.set_hosts(&pair.peer, &[("allowed.test", SERVERS[1])])
        .unwrap();
    assert_eq!(resolve(&pair, "allowed.test"), vec![ip(SERVERS[1])]);
    assert!(
        reaches(&pair, tcp(SERVERS[1], PORT)),
        "the new address right after the new lookup"
    );
    // Past ttl_max (2 s) and the sweep: the old address admits no new flow.
    thread::sleep(Duration::from_secs(4));
    assert!(!reaches(&pair, tcp(SERVERS[0], PORT)), "expired address");
    assert!(!reaches(&pair, tcp(SERVERS[1], PORT)), "expired address");
    echo_roundtrip(&mut open, b"after expiry\n").expect("a flow opened while the name was valid");
    // Looked up again after the TTL: reachable again at once.
    assert_eq!(resolve(&pair, "allowed.test"), vec![ip(SERVERS[1])]);
    assert!(
        reaches(&pair, tcp(SERVERS[1], PORT)),
        "after the TTL, looked up again"
    );
}

/// A daemon restart (SIGKILL, then a new start given the same listening
/// sockets, as systemd's socket activation does) loses no answer: a
/// stream of lookups (a client retrying after 1 s, as stub resolvers do)
/// gets every answer, and a query sent while no daemon runs waits in the
/// socket's queue and is answered by the next one (first attempt).
#[test]
fn restart_during_lookups_loses_no_answer() {
    use std::os::fd::AsRawFd as _;
    let (pair, _up, _other) = setup(&[("allowed.test", SERVERS[0])], &[]);
    let pins = PinDir::new().unwrap();
    let config = ConfigFile::new(&config_text(&pins, &rules(30, 60))).unwrap();
    let listen = tcp(FORWARDER, 53);
    let (udp, tcp_listener) = pair.host.enter(|| {
        (
            std::net::UdpSocket::bind(listen).unwrap(),
            std::net::TcpListener::bind(listen).unwrap(),
        )
    });
    let fds = [
        (udp.as_raw_fd(), "dns-udp"),
        (tcp_listener.as_raw_fd(), "dns-tcp"),
    ];
    let mut d = Daemon::start_with_fds(&pair.host, &config, &fds).unwrap();
    assert!(d.log().contains("socket_activated=true"), "{}", d.log());
    // The passed sockets are not inherited by what the daemon runs.
    for fd in [3, 4] {
        let info = std::fs::read_to_string(format!("/proc/{}/fdinfo/{fd}", d.pid())).unwrap();
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .unwrap()
            .trim();
        let flags = u32::from_str_radix(flags, 8).unwrap();
        assert!(
            flags & libc::O_CLOEXEC as u32 != 0,
            "the daemon's passed fd {fd} lacks FD_CLOEXEC (flags {flags:o})"
        );
    }
    const LOOKUPS: usize = 150;
    let first_answer = std::sync::atomic::AtomicBool::new(false);
    let stream = thread::scope(|s| {
        let client = s.spawn(|| {
            let (mut answered, mut retried) = (0, 0);
            let mut times = Vec::new();
            for _ in 0..LOOKUPS {
                for attempt in 0..8 {
                    let r = lookup(
                        &pair.host,
                        dns_server(FORWARDER),
                        "allowed.test",
                        Duration::from_secs(1),
                    );
                    if r.is_ok_and(|a| a == vec![ip(SERVERS[0])]) {
                        answered += 1;
                        retried += usize::from(attempt > 0);
                        times.push(std::time::Instant::now());
                        first_answer.store(true, std::sync::atomic::Ordering::Relaxed);
                        break;
                    }
                }
                thread::sleep(Duration::from_millis(10));
            }
            (answered, retried, times)
        });
        // Some answers before the kill, however slow the machine is.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !first_answer.load(std::sync::atomic::Ordering::Relaxed)
            && std::time::Instant::now() < deadline
        {
            thread::sleep(Duration::from_millis(10));
        }
        thread::sleep(Duration::from_millis(200));
        let killed = std::time::Instant::now();
        d.kill_in_place();
        // While no daemon runs: a query waits in the socket's queue.
        let waiting = s.spawn(|| {
            lookup(
                &pair.host,
                dns_server(FORWARDER),
                "allowed.test",
                Duration::from_secs(15),
            )
        });
        thread::sleep(Duration::from_millis(300));
        // This time as one `.socket` unit with one FileDescriptorName
        // passes them: both named `dns`, the stream socket first.
        let shared = [(tcp_listener.as_raw_fd(), "dns"), (udp.as_raw_fd(), "dns")];
        d = Daemon::start_with_fds(&pair.host, &config, &shared).unwrap();
        assert!(d.log().contains("socket_activated=true"), "{}", d.log());
        let up = std::time::Instant::now();
        let waited = waiting.join().unwrap();
        assert_eq!(
            waited.as_ref().ok(),
            Some(&vec![ip(SERVERS[0])]),
            "a query sent while the daemon was down: {waited:?}"
        );
        let (answered, retried, times) = client.join().unwrap();
        let before = times.iter().filter(|t| **t < killed).count();
        let after = times.iter().filter(|t| **t > up).count();
        eprintln!("lookups answered before the kill: {before}, after the restart: {after}");
        assert!(
            before > 0 && after > 0,
            "the stream did not span the restart"
        );
        (answered, retried)
    });
    eprintln!(
        "lookups answered: {}/{LOOKUPS} ({} after a retry)",
        stream.0, stream.1
    );
    assert_eq!(stream.0, LOOKUPS, "answers lost across the restart");
    assert!(reaches(&pair, tcp(SERVERS[0], PORT)), "after the restart");
    drop(d);
}
