//! Attacks on the FQDN egress rules' resolver path (issue 19): answers
//! spoofed by a host in the peer namespace (wrong id, wrong source
//! address, wrong source port, another question), an answer carrying
//! records for names nobody asked, and queries to other resolvers from an
//! unprivileged local user. The "upstream" here is a socket the test
//! holds, so it sees each query (id and source port: a stronger attacker
//! than an off-path one) and answers when the test says.

use std::{
    io,
    net::{SocketAddr, UdpSocket},
    thread,
    time::Duration,
};

use portcullis_tests::{dns::*, *};

const FORWARDER: &str = "127.0.0.153";
const UPSTREAM: &str = "10.200.0.4";
const SPOOFER: &str = "10.200.0.5";
const OTHER_RESOLVER: &str = "10.200.0.3";
const PORT: u16 = 8443;
/// .30: what spoofed answers claim; .31: the real answer; .32: a record
/// for a name nobody asked (under the allowed wildcard).
const SERVERS: [&str; 3] = ["10.200.0.30", "10.200.0.31", "10.200.0.32"];

fn addr(a: &str, port: u16) -> SocketAddr {
    SocketAddr::new(a.parse().unwrap(), port)
}

fn config(pins: &PinDir, upstream: &str) -> ConfigFile {
    ConfigFile::new(&config_text(
        pins,
        &format!(
            "egress = \"allowlist\"\n\
             [[egress_rules]]\nid = \"api\"\nfrom_port = {PORT}\nto_port = {PORT}\nprotocol = \"tcp\"\n\
             names = [\"allowed.test\", \"*.wild.test\"]\n\
             [dns]\nlisten = \"{FORWARDER}:53\"\nupstreams = [\"{upstream}\"]\nttl_floor = 30\nttl_max = 60\n"
        ),
    ))
    .unwrap()
}

fn reaches(pair: &Pair, to: SocketAddr) -> bool {
    match tcp_probe(&pair.host, to) {
        Ok(()) => true,
        Err(e) if e.kind() == io::ErrorKind::TimedOut => false,
        Err(e) => panic!("-> {to}: {e}"),
    }
}

fn pair_with(addresses: &[&str]) -> Pair {
    let pair = Pair::new().expect("namespaces");
    for a in addresses {
        pair.peer
            .ip(&["addr", "add", &format!("{a}/24"), "dev", PEER_IFACE])
            .unwrap();
    }
    pair
}

/// Spoofed answers (wrong id; right id from another address; right id
/// from the upstream's address on another port; right id for another
/// question) admit nothing; the real answer, carrying an extra record for
/// a name nobody asked (under the allowed wildcard), admits only the
/// asked name's address.
#[test]
fn spoofed_and_unasked_answers_admit_nothing() {
    let pair = pair_with(&[UPSTREAM, SPOOFER, SERVERS[0], SERVERS[1], SERVERS[2]]);
    for a in SERVERS {
        tcp_echo_server(&pair.peer, addr(a, PORT)).unwrap();
        tcp_probe_control(&pair.host, addr(a, PORT)).expect("control: server");
    }
    let upstream = pair
        .peer
        .enter(|| UdpSocket::bind(addr(UPSTREAM, 53)))
        .unwrap();
    let other_port = pair
        .peer
        .enter(|| UdpSocket::bind(addr(UPSTREAM, 5353)))
        .unwrap();
    let spoofer = pair
        .peer
        .enter(|| UdpSocket::bind(addr(SPOOFER, 53)))
        .unwrap();
    upstream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let pins = PinDir::new().unwrap();
    let config = config(&pins, UPSTREAM);
    let _d = Daemon::start(&pair.host, &config).unwrap();
    let got = thread::scope(|s| {
        let client = s.spawn(|| {
            lookup(
                &pair.host,
                dns_server(FORWARDER),
                "allowed.test",
                Duration::from_secs(10),
            )
        });
        let mut buf = [0u8; 512];
        let (n, forwarder) = upstream.recv_from(&mut buf).expect("the forwarder's query");
        let q = buf[..n].to_vec();
        let id = u16::from_be_bytes([q[0], q[1]]);
        let claim = [("allowed.test", SERVERS[0])];
        // Wrong id, from the right address and port.
        upstream
            .send_to(&response(&q, id ^ 0x5a5a, &claim), forwarder)
            .unwrap();
        // Right id, from another address.
        spoofer
            .send_to(&response(&q, id, &claim), forwarder)
            .unwrap();
        // Right id, from the upstream's address but another port.
        other_port
            .send_to(&response(&q, id, &claim), forwarder)
            .unwrap();
        // Right id and source, another question.
        let mut other_q = query(id, "other.wild.test");
        other_q[0..2].copy_from_slice(&id.to_be_bytes());
        upstream
            .send_to(
                &response(&other_q, id, &[("other.wild.test", SERVERS[0])]),
                forwarder,
            )
            .unwrap();
        // Right id and source, the question in another case (0x20: the
        // forwarder sent a random spelling; this one flips every letter).
        let mut flipped = q.clone();
        for b in &mut flipped[12..n - 4] {
            if b.is_ascii_alphabetic() {
                *b ^= 0x20;
            }
        }
        upstream
            .send_to(&response(&flipped, id, &claim), forwarder)
            .unwrap();
        thread::sleep(Duration::from_millis(300));
        assert!(
            !reaches(&pair, addr(SERVERS[0], PORT)),
            "a spoofed answer admitted its address"
        );
        // The real answer, with a record for a name nobody asked.
        let real = response(
            &q,
            id,
            &[
                ("allowed.test", SERVERS[1]),
                ("unasked.wild.test", SERVERS[2]),
            ],
        );
        upstream.send_to(&real, forwarder).unwrap();
        client
            .join()
            .unwrap()
            .expect("the real answer reaches the client")
    });
    assert!(
        reaches(&pair, addr(SERVERS[1], PORT)),
        "the asked name's address"
    );
    assert!(
        !reaches(&pair, addr(SERVERS[0], PORT)),
        "a spoofed answer's address"
    );
    assert!(
        !reaches(&pair, addr(SERVERS[2], PORT)),
        "a record for a name nobody asked"
    );
    assert_eq!(got, vec![SERVERS[1].parse::<std::net::IpAddr>().unwrap()]);
}

/// A local unprivileged user (nobody) cannot query another resolver, nor
/// the upstream directly: only the forwarder's marked queries leave to
/// port 53.
#[test]
fn unprivileged_user_cannot_reach_other_resolvers() {
    assert!(have_dnsmasq(), "dnsmasq is not installed (APT_PACKAGES)");
    let pair = pair_with(&[UPSTREAM, OTHER_RESOLVER]);
    let hosts = [("allowed.test", SERVERS[0])];
    let _up = Dnsmasq::start(&pair.peer, UPSTREAM, 30, &hosts, &[]).unwrap();
    let _other = Dnsmasq::start(&pair.peer, OTHER_RESOLVER, 30, &hosts, &[]).unwrap();
    // Control: nobody's client works while nothing filters.
    for r in [OTHER_RESOLVER, UPSTREAM] {
        assert!(
            nobody_asks(&pair.host, r, "allowed.test") > 0,
            "control: nobody -> {r}"
        );
    }
    let pins = PinDir::new().unwrap();
    let config = config(&pins, UPSTREAM);
    let _d = Daemon::start(&pair.host, &config).unwrap();
    // Through the forwarder it works.
    lookup(
        &pair.host,
        dns_server(FORWARDER),
        "allowed.test",
        Duration::from_secs(3),
    )
    .expect("via the forwarder");
    for r in [OTHER_RESOLVER, UPSTREAM] {
        assert_eq!(
            nobody_asks(&pair.host, r, "allowed.test"),
            0,
            "nobody reached {r}"
        );
    }
}

/// The daemon's open descriptors now.
fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// Many more TCP connections to the forwarder than it serves at once
/// (64), each sending half a length prefix and then nothing: its
/// descriptors stay bounded, a UDP lookup is answered meanwhile, and a TCP
/// lookup is answered once the idle connections have given up their place
/// (2 s) — while the attacker's connections are still open.
#[test]
fn half_open_tcp_clients_cannot_exhaust_the_forwarder() {
    use std::io::Write as _;
    assert!(have_dnsmasq(), "dnsmasq is not installed (APT_PACKAGES)");
    let pair = pair_with(&[UPSTREAM]);
    let hosts = [("allowed.test", SERVERS[0])];
    let _up = Dnsmasq::start(&pair.peer, UPSTREAM, 30, &hosts, &[]).unwrap();
    let pins = PinDir::new().unwrap();
    let config = config(&pins, UPSTREAM);
    let d = Daemon::start(&pair.host, &config).unwrap();
    let before = fds(d.pid());
    const ATTACK: usize = 600;
    let mut held = Vec::new();
    for _ in 0..ATTACK {
        let mut s = pair
            .host
            .enter(|| std::net::TcpStream::connect(dns_server(FORWARDER)))
            .expect("connect");
        let _ = s.write_all(&[0xFF]);
        held.push(s);
    }
    thread::sleep(Duration::from_millis(500));
    let during = fds(d.pid());
    println!("daemon descriptors: {before} before, {during} with {ATTACK} half-open clients");
    assert!(
        during <= before + 64 + 16,
        "the daemon holds {during} descriptors ({before} before {ATTACK} half-open TCP clients)"
    );
    lookup(
        &pair.host,
        dns_server(FORWARDER),
        "allowed.test",
        Duration::from_secs(3),
    )
    .expect("a UDP lookup during the attack");
    thread::sleep(Duration::from_secs(2));
    let r = ask_tcp(
        &pair.host,
        dns_server(FORWARDER),
        "allowed.test",
        Duration::from_secs(3),
    )
    .expect("a TCP lookup during the attack");
    assert_eq!(r.rcode, 0);
    assert_eq!(portcullis::dns::chain(&r).addresses.len(), 1);
    drop(held);
}

/// A hostile authoritative answer for a name of its own that aliases an
/// allowed name and carries an address of its own beside the alias:
/// only the allowed name's (the chain's end's) address is admitted.
#[test]
fn mid_chain_addresses_admit_nothing() {
    let pair = pair_with(&[UPSTREAM, SERVERS[0], SERVERS[1]]);
    for a in [SERVERS[0], SERVERS[1]] {
        tcp_echo_server(&pair.peer, addr(a, PORT)).unwrap();
        tcp_probe_control(&pair.host, addr(a, PORT)).expect("control: server");
    }
    let upstream = pair
        .peer
        .enter(|| UdpSocket::bind(addr(UPSTREAM, 53)))
        .unwrap();
    upstream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let pins = PinDir::new().unwrap();
    let config = config(&pins, UPSTREAM);
    let _d = Daemon::start(&pair.host, &config).unwrap();
    thread::scope(|s| {
        let client = s.spawn(|| {
            lookup(
                &pair.host,
                dns_server(FORWARDER),
                "x.evil.test",
                Duration::from_secs(10),
            )
        });
        let mut buf = [0u8; 512];
        let (n, forwarder) = upstream.recv_from(&mut buf).expect("the forwarder's query");
        let q = buf[..n].to_vec();
        let id = u16::from_be_bytes([q[0], q[1]]);
        let hostile = response(
            &q,
            id,
            &[
                ("x.evil.test", "cname:allowed.test"),
                ("x.evil.test", SERVERS[0]),
                ("allowed.test", SERVERS[1]),
            ],
        );
        upstream.send_to(&hostile, forwarder).unwrap();
        client
            .join()
            .unwrap()
            .expect("the answer reaches the client");
    });
    assert!(
        !reaches(&pair, addr(SERVERS[0], PORT)),
        "an address owned by a name partway along the chain was admitted"
    );
    assert!(
        reaches(&pair, addr(SERVERS[1], PORT)),
        "the chain's end's address"
    );
}

/// Learned destinations now, from `status`.
fn learned(config: &ConfigFile) -> usize {
    let out = cli(config, &["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains(" learned destinations"))
        .unwrap_or_else(|| panic!("no DNS line in status: {text}"));
    let before = line.split(" learned destinations").next().unwrap();
    before.rsplit(' ').next().unwrap().parse().unwrap()
}

/// A local user floods the learned destinations (FQDN_DEST, 16384
/// entries) with answers for names under an allowed wildcard, 40
/// addresses each, for a rule of 64 ports over TCP and UDP (128 entries
/// per address): each answer admits at most 32 addresses, and once the
/// table is full a later lookup of an allowed name still admits (the
/// entries closest to expiry make room) instead of failing.
#[test]
fn a_flood_of_answers_cannot_stop_later_admissions() {
    assert!(have_dnsmasq(), "dnsmasq is not installed (APT_PACKAGES)");
    const FLOOD_NAMES: usize = 6;
    let pair = pair_with(&[UPSTREAM, SERVERS[1]]);
    tcp_echo_server(&pair.peer, addr(SERVERS[1], 8000)).unwrap();
    tcp_probe_control(&pair.host, addr(SERVERS[1], 8000)).expect("control: server");
    let flood: Vec<(String, String)> = (0..FLOOD_NAMES)
        .flat_map(|i| {
            (0..40).map(move |j| {
                (
                    format!("flood{i}.wild.test"),
                    format!("10.200.{}.{j}", 10 + i),
                )
            })
        })
        .collect();
    let mut hosts: Vec<(&str, &str)> = flood
        .iter()
        .map(|(n, a)| (n.as_str(), a.as_str()))
        .collect();
    hosts.push(("allowed.test", SERVERS[1]));
    let _up = Dnsmasq::start(&pair.peer, UPSTREAM, 300, &hosts, &[]).unwrap();
    let pins = PinDir::new().unwrap();
    let config = ConfigFile::new(&config_text(
        &pins,
        &format!(
            "egress = \"allowlist\"\n\
             [[egress_rules]]\nid = \"api\"\nfrom_port = 8000\nto_port = 8063\nprotocol = \"tcp+udp\"\n\
             names = [\"allowed.test\", \"*.wild.test\"]\n\
             [dns]\nlisten = \"{FORWARDER}:53\"\nupstreams = [\"{UPSTREAM}\"]\nttl_floor = 30\nttl_max = 600\n"
        ),
    ))
    .unwrap();
    let _d = Daemon::start(&pair.host, &config).unwrap();
    for i in 0..FLOOD_NAMES {
        let r = ask_tcp(
            &pair.host,
            dns_server(FORWARDER),
            &format!("flood{i}.wild.test"),
            Duration::from_secs(10),
        )
        .expect("a flood lookup");
        assert_eq!(r.rcode, 0, "flood{i}: rcode");
        assert_eq!(portcullis::dns::chain(&r).addresses.len(), 40);
        if i == 0 {
            thread::sleep(Duration::from_millis(1500));
            assert_eq!(learned(&config), 32 * 128, "one answer's entries");
        }
    }
    thread::sleep(Duration::from_millis(1500));
    let full = learned(&config);
    println!("learned destinations after the flood: {full}");
    assert!(full > 16384 - 4096, "the flood filled the table ({full})");
    let got = lookup(
        &pair.host,
        dns_server(FORWARDER),
        "allowed.test",
        Duration::from_secs(5),
    )
    .expect("an allowed lookup after the flood");
    assert_eq!(got, vec![SERVERS[1].parse::<std::net::IpAddr>().unwrap()]);
    assert!(
        reaches(&pair, addr(SERVERS[1], 8000)),
        "the allowed name's address after the flood"
    );
}

/// A tiny DNS server on `at` in `ns`: answers every query with `answer`
/// as the A record of the question's name, until the returned flag is set.
fn responder(
    ns: &Netns,
    at: SocketAddr,
    answer: &'static str,
) -> std::sync::Arc<std::sync::atomic::AtomicBool> {
    responder_ttl(ns, at, answer, |_| 60)
}

/// [`responder`] with the TTL `ttl` gives each name.
fn responder_ttl(
    ns: &Netns,
    at: SocketAddr,
    answer: &'static str,
    ttl: fn(&str) -> u32,
) -> std::sync::Arc<std::sync::atomic::AtomicBool> {
    use std::sync::atomic::Ordering;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sock = ns.enter(|| UdpSocket::bind(at)).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let flag = stop.clone();
    thread::spawn(move || {
        let mut buf = [0u8; 512];
        while !flag.load(Ordering::Relaxed) {
            let Ok((n, from)) = sock.recv_from(&mut buf) else {
                continue;
            };
            let q = &buf[..n];
            let Ok(parsed) = portcullis::dns::parse_query(q) else {
                continue;
            };
            let r = response(
                &q[..parsed.question_end],
                parsed.id,
                &[(parsed.question.name.as_str(), answer)],
            );
            let mut r = r;
            let at = r.len() - 10;
            r[at..at + 4].copy_from_slice(&ttl(&parsed.question.name).to_be_bytes());
            let _ = sock.send_to(&r, from);
        }
    });
    stop
}

/// Whether a UDP query from a socket in `ns` carrying the forwarder's
/// mark (root sets SO_MARK) to `to` gets an answer.
fn marked_query_answered(ns: &Netns, to: SocketAddr) -> bool {
    use std::os::fd::AsRawFd as _;
    let sock = ns.enter(|| UdpSocket::bind("0.0.0.0:0")).unwrap();
    let mark: u32 = portcullis_common::DNS_MARK;
    // SAFETY: setsockopt on a socket we own, with a u32 option value.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MARK,
            (&mark as *const u32).cast(),
            4,
        )
    };
    assert_eq!(rc, 0, "SO_MARK: {}", io::Error::last_os_error());
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    sock.send_to(&query(0x4343, "allowed.test"), to).unwrap();
    let mut buf = [0u8; 512];
    sock.recv_from(&mut buf).is_ok()
}

/// The forwarder's mark admits only its upstreams (address and port, here
/// on port 5353, which works): a process on the host that sets the mark
/// (root here; CAP_NET_RAW suffices since Linux 5.17) reaches the
/// upstream but not another resolver on port 53.
#[test]
fn the_mark_admits_only_the_upstreams() {
    let pair = pair_with(&[UPSTREAM, OTHER_RESOLVER, SERVERS[0]]);
    let upstream = addr(UPSTREAM, 5353);
    let other = addr(OTHER_RESOLVER, 53);
    let stop_up = responder(&pair.peer, upstream, SERVERS[0]);
    let stop_other = responder(&pair.peer, other, SERVERS[0]);
    // Control: both answer while nothing filters.
    assert!(
        marked_query_answered(&pair.host, upstream),
        "control: upstream"
    );
    assert!(marked_query_answered(&pair.host, other), "control: other");
    let pins = PinDir::new().unwrap();
    let config = config(&pins, &upstream.to_string());
    let _d = Daemon::start(&pair.host, &config).unwrap();
    let got = lookup(
        &pair.host,
        dns_server(FORWARDER),
        "allowed.test",
        Duration::from_secs(5),
    )
    .expect("a lookup through an upstream on port 5353");
    assert_eq!(got, vec![SERVERS[0].parse::<std::net::IpAddr>().unwrap()]);
    assert!(
        marked_query_answered(&pair.host, upstream),
        "a marked query to the upstream"
    );
    assert!(
        !marked_query_answered(&pair.host, other),
        "a marked query reached another resolver"
    );
    for s in [stop_up, stop_other] {
        s.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Two rules admit the same address and port: a short-lived answer for
/// one (TTL 1) does not cut the other's long-lived entry (TTL 600) — the
/// later expiry is kept, with its rule.
#[test]
fn a_short_answer_does_not_cut_another_rules_entry() {
    let pair = pair_with(&[UPSTREAM, SERVERS[0]]);
    tcp_echo_server(&pair.peer, addr(SERVERS[0], PORT)).unwrap();
    tcp_probe_control(&pair.host, addr(SERVERS[0], PORT)).expect("control: server");
    let upstream = addr(UPSTREAM, 53);
    let stop = responder_ttl(&pair.peer, upstream, SERVERS[0], |n| {
        if n == "short.test" { 1 } else { 600 }
    });
    let pins = PinDir::new().unwrap();
    let config = ConfigFile::new(&config_text(
        &pins,
        &format!(
            "egress = \"allowlist\"\n\
             [[egress_rules]]\nid = \"long\"\nfrom_port = {PORT}\nto_port = {PORT}\nprotocol = \"tcp\"\nnames = [\"long.test\"]\n\
             [[egress_rules]]\nid = \"short\"\nfrom_port = {PORT}\nto_port = {PORT}\nprotocol = \"tcp\"\nnames = [\"short.test\"]\n\
             [dns]\nlisten = \"{FORWARDER}:53\"\nupstreams = [\"{UPSTREAM}\"]\nttl_floor = 1\nttl_max = 600\n"
        ),
    ))
    .unwrap();
    let _d = Daemon::start(&pair.host, &config).unwrap();
    for name in ["long.test", "short.test"] {
        lookup(
            &pair.host,
            dns_server(FORWARDER),
            name,
            Duration::from_secs(5),
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    // Past the short TTL and a sweep.
    thread::sleep(Duration::from_secs(4));
    assert!(
        reaches(&pair, addr(SERVERS[0], PORT)),
        "the long-lived name's entry was cut by a short answer for another rule's name"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// A DNS flow opened before the daemon (a connected UDP socket to another
/// resolver, answered then) is cut once the DNS guard is on: the same
/// socket gets no answer after the first sweep.
#[test]
fn dns_flows_from_before_the_guard_are_cut() {
    let pair = pair_with(&[UPSTREAM, OTHER_RESOLVER, SERVERS[0]]);
    let other = addr(OTHER_RESOLVER, 53);
    let stop_up = responder(&pair.peer, addr(UPSTREAM, 53), SERVERS[0]);
    let stop_other = responder(&pair.peer, other, SERVERS[0]);
    let sock = pair.host.enter(|| UdpSocket::bind("0.0.0.0:0")).unwrap();
    sock.connect(other).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let answered = |sock: &UdpSocket| {
        sock.send(&query(0x4444, "allowed.test")).unwrap();
        let mut buf = [0u8; 512];
        sock.recv(&mut buf).is_ok()
    };
    assert!(answered(&sock), "control: the other resolver answers");
    let pins = PinDir::new().unwrap();
    let config = config(&pins, UPSTREAM);
    let _d = Daemon::start(&pair.host, &config).unwrap();
    lookup(
        &pair.host,
        dns_server(FORWARDER),
        "allowed.test",
        Duration::from_secs(5),
    )
    .expect("via the forwarder");
    // After a sweep (every 2 s).
    thread::sleep(Duration::from_secs(3));
    assert!(
        !answered(&sock),
        "a DNS flow opened before the guard still passes"
    );
    for s in [stop_up, stop_other] {
        s.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}
