//! The XDP ingress filter with real traffic: a peer namespace talks to a
//! protected namespace where `portcullisd` runs. Every listener is real, so a
//! drop shows as a timeout (never a reset), and every check asserts the exact
//! change of the counter that the verdict credits.

use std::net::IpAddr;

use portcullis_tests::*;

const LISTED: u16 = 8080;
const UNLISTED: u16 = 9090;
const RULES: &str =
    "[[ingress_rules]]\nid = \"app\"\nfrom_port = 8080\nto_port = 8080\nip_ranges = []\n";

fn host_addr(v6: bool) -> &'static str {
    if v6 { HOST_V6 } else { HOST_V4 }
}

/// One protected host and one peer, with pins and (later) a daemon.
/// Fields drop in order: the daemon first, then the pins, then the namespaces.
struct Env {
    daemon: Option<Daemon>,
    config: ConfigFile,
    pins: PinDir,
    pair: Pair,
}

impl Env {
    fn new(ssh: bool) -> Self {
        let pair = Pair::new().expect("create namespaces");
        let pins = PinDir::new().expect("pin directory");
        let config = config(&pins, ssh, RULES).expect("config file");
        Env {
            daemon: None,
            config,
            pins,
            pair,
        }
    }

    fn start(&mut self) {
        self.daemon =
            Some(Daemon::start(&self.pair.host, &self.config).expect("start portcullisd"));
    }

    /// Checks TCP and UDP verdicts to `port` with exact counter changes.
    fn check_port(&self, v6: bool, port: u16, admitted: bool, pass_reason: Reason) {
        let to = sock(host_addr(v6), port);
        let c = self.pins.counters().unwrap();
        let (pass0, drop0) = (c[&pass_reason], c[&Reason::DropNoRule]);

        let tcp = tcp_probe(&self.pair.peer, to);
        assert_eq!(tcp.is_ok(), admitted, "TCP to {to}: {tcp:?}");
        if let Err(e) = &tcp {
            assert_eq!(
                e.kind(),
                std::io::ErrorKind::TimedOut,
                "a drop is a timeout, not {e}"
            );
        }
        // Admitted: SYN, ACK, RST. Dropped: the single SYN.
        let (pass1, drop1) = if admitted {
            (pass0 + 3, drop0)
        } else {
            (pass0, drop0 + 1)
        };
        self.pins.expect_counter(pass_reason, pass1);
        self.pins.expect_counter(Reason::DropNoRule, drop1);

        let sink = udp_bind(&self.pair.host, to).unwrap();
        udp_send(&self.pair.peer, to, b"probe").unwrap();
        assert_eq!(udp_received(&sink), admitted, "UDP to {to}");
        let (pass2, drop2) = if admitted {
            (pass1 + 1, drop1)
        } else {
            (pass1, drop1 + 1)
        };
        self.pins.expect_counter(pass_reason, pass2);
        self.pins.expect_counter(Reason::DropNoRule, drop2);
    }
}

fn listed_and_unlisted_ports(v6: bool) {
    let mut env = Env::new(false);
    let host = host_addr(v6);
    for port in [LISTED, UNLISTED] {
        TcpServer::start(&env.pair.host, sock(host, port)).unwrap();
    }
    // Control: without Portcullis both ports answer, so a failure below is the filter's.
    tcp_probe_control(&env.pair.peer, sock(host, UNLISTED)).expect("unfiltered control connect");

    env.start();
    env.check_port(v6, UNLISTED, false, Reason::PassRule);
    env.check_port(v6, LISTED, true, Reason::PassRule);
}

#[test]
fn ipv4_unlisted_ports_dropped_listed_port_reached() {
    require_root!();
    listed_and_unlisted_ports(false);
}

#[test]
fn ipv6_unlisted_ports_dropped_listed_port_reached() {
    require_root!();
    listed_and_unlisted_ports(true);
}

fn ssh_port(v6: bool) {
    for enabled in [false, true] {
        let mut env = Env::new(enabled);
        TcpServer::start(&env.pair.host, sock(host_addr(v6), 22)).unwrap();
        env.start();
        let to = sock(host_addr(v6), 22);
        let before = env.pins.counters().unwrap();
        let result = tcp_probe(&env.pair.peer, to);
        assert_eq!(result.is_ok(), enabled, "ssh enabled={enabled}: {result:?}");
        let (ssh, dropped) = if enabled { (3, 0) } else { (0, 1) };
        env.pins
            .expect_counter(Reason::PassSsh, before[&Reason::PassSsh] + ssh);
        env.pins
            .expect_counter(Reason::DropNoRule, before[&Reason::DropNoRule] + dropped);
    }
}

#[test]
fn ssh_reached_only_when_enabled_ipv4() {
    require_root!();
    ssh_port(false);
}

#[test]
fn ssh_reached_only_when_enabled_ipv6() {
    require_root!();
    ssh_port(true);
}

/// A TCP handshake to `to` from `from`, an address the peer gets for it
/// (so it is no address any config names), closed with a reset. The host
/// first resolves the new address's neighbour before it answers; on a
/// loaded machine that can outlast the first SYN, so the wait covers a
/// retransmission (CI once timed out at 700 ms).
fn probe_from(pair: &Pair, from: IpAddr, to: std::net::SocketAddr) -> std::io::Result<()> {
    let prefix = if from.is_ipv4() { "24" } else { "64" };
    let mut add = vec!["addr", "add"];
    let addr = format!("{from}/{prefix}");
    add.extend([addr.as_str(), "dev", PEER_IFACE]);
    if from.is_ipv6() {
        add.push("nodad");
    }
    pair.peer.ip(&add).unwrap();
    let domain = socket2::Domain::for_address(to);
    pair.peer.enter(|| {
        let s = socket2::Socket::new(domain, socket2::Type::STREAM, None)?;
        s.bind(&std::net::SocketAddr::new(from, 0).into())?;
        s.connect_timeout(&to.into(), std::time::Duration::from_secs(4))?;
        s.set_linger(Some(std::time::Duration::ZERO))
    })
}

/// Issue 21: SSH is never switched off by omission. A config without
/// `[ssh]` admits a new SSH connection from any source, and a rule set
/// replaced without an `ssh` key keeps it admitted.
#[test]
fn ssh_is_admitted_when_neither_the_config_nor_a_replacement_mentions_it() {
    require_root!();
    let pair = Pair::new().unwrap();
    let pins = PinDir::new().unwrap();
    // Written here, not by `config_text` (whose tests expect SSH off).
    let config = ConfigFile::new(&format!(
        "interfaces = [\"{HOST_IFACE}\"]\npin_dir = \"{}\"\n{RULES}",
        pins.path().display()
    ))
    .unwrap();
    for v6 in [false, true] {
        TcpServer::start(&pair.host, sock(host_addr(v6), 22)).unwrap();
    }
    let _daemon = Daemon::start(&pair.host, &config).unwrap();
    let random_source = |v6: bool| -> IpAddr {
        let n: u8 = rand::random_range(10..250);
        let text = if v6 {
            format!("fd00:200::{:x}", u16::from(n) << 8 | u16::from(n))
        } else {
            format!("10.200.0.{n}")
        };
        text.parse().unwrap()
    };
    let check = |when: &str| {
        for v6 in [false, true] {
            let from = random_source(v6);
            let before = pins.counter(Reason::PassSsh);
            let to = sock(host_addr(v6), 22);
            let r = probe_from(&pair, from, to);
            assert!(r.is_ok(), "{when}: SSH from {from} to {to}: {r:?}");
            // SYN, ACK, RST; a retransmitted SYN counts too.
            let started = std::time::Instant::now();
            while pins.counter(Reason::PassSsh) < before + 3
                && started.elapsed() < std::time::Duration::from_secs(3)
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            let got = pins.counter(Reason::PassSsh);
            assert!(
                (before + 3..=before + 5).contains(&got),
                "{when}: pass_ssh went from {before} to {got}"
            );
            pair.peer
                .ip(&[
                    "addr",
                    "del",
                    &format!("{from}/{}", if v6 { 64 } else { 24 }),
                    "dev",
                    PEER_IFACE,
                ])
                .unwrap();
        }
    };
    check("a config without [ssh]");

    // A rule set without `ssh`, as `rules apply` or an SDK sends one.
    let body =
        r#"{"ingress_rules": [{"id": "web", "from_port": 443, "to_port": 443, "ip_ranges": []}]}"#;
    let out = std::process::Command::new("curl")
        .args(["-s", "-w", "\n%{http_code}", "--unix-socket"])
        .arg(config.socket())
        .args(["-X", "PUT", "http://portcullis/v1/rules"])
        .args([
            "-H",
            "content-type: application/json",
            "--data-binary",
            body,
        ])
        .output()
        .unwrap();
    let reply = String::from_utf8_lossy(&out.stdout);
    assert!(reply.ends_with("\n200"), "PUT /v1/rules: {reply}");
    check("after a replacement without ssh");
}

/// `--check-config` says "ok" to a file that turns SSH off, and warns; a
/// file that says nothing about SSH gets no warning (SSH stays admitted).
#[test]
fn check_config_warns_when_ssh_is_turned_off() {
    let check = |text: &str| {
        let file = ConfigFile::new(text).unwrap();
        let out = std::process::Command::new(workspace_bin("portcullisd").unwrap())
            .arg("--config")
            .arg(file.path())
            .arg("--check-config")
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (stdout, stderr) = check("interfaces = [\"eth0\"]\n[ssh]\nallow = false\n");
    assert!(stdout.trim_end().ends_with(": ok"), "{stdout}");
    assert!(
        stderr.contains("warning") && stderr.contains("[ssh] allow is off"),
        "{stderr}"
    );
    let (stdout, stderr) = check("interfaces = [\"eth0\"]\n");
    assert!(stdout.trim_end().ends_with(": ok"), "{stdout}");
    assert!(!stderr.contains("warning"), "{stderr}");
}

const GRE: i32 = 47;
const SCTP: i32 = 132;
const ESP: i32 = 50;

#[test]
fn other_ip_protocols_are_dropped() {
    require_root!();
    let mut env = Env::new(true);
    let cases: Vec<(bool, i32)> = [false, true]
        .into_iter()
        .flat_map(|v6| [GRE, SCTP, ESP].map(|p| (v6, p)))
        .collect();
    let sinks: Vec<_> = cases
        .iter()
        .map(|&(v6, proto)| raw_socket(&env.pair.host, v6, proto).unwrap())
        .collect();
    let dest = |v6: bool| host_addr(v6).parse::<IpAddr>().unwrap();

    // Control: unfiltered, each packet reaches the raw listener (sent
    // again for up to 5 s: on a loaded machine the first IPv6 packet can
    // go before the address is usable, as the TCP controls allow for).
    for (&(v6, proto), sink) in cases.iter().zip(&sinks) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let received = loop {
            raw_send(&env.pair.peer, dest(v6), proto, b"\0\0\0\0control").unwrap();
            if raw_received(sink, b"control") {
                break true;
            }
            if std::time::Instant::now() > deadline {
                break false;
            }
        };
        assert!(received, "control: protocol {proto} v6={v6} not received");
    }

    env.start();
    for (&(v6, proto), sink) in cases.iter().zip(&sinks) {
        let before = env.pins.counter(Reason::DropProtocol);
        raw_send(&env.pair.peer, dest(v6), proto, b"\0\0\0\0probe").unwrap();
        assert!(
            !raw_received(sink, b"probe"),
            "protocol {proto} v6={v6} got through"
        );
        env.pins.expect_counter(Reason::DropProtocol, before + 1);
    }
}

#[test]
fn arp_and_neighbour_discovery_keep_working() {
    require_root!();
    let mut env = Env::new(false);
    env.start();
    for v6 in [false, true] {
        let to = sock(host_addr(v6), LISTED);
        let reason = if v6 {
            Reason::PassNeighbor
        } else {
            Reason::PassArp
        };
        env.pair.flush_neighbours().unwrap();
        let before = env.pins.counter(reason);
        let sink = udp_bind(&env.pair.host, to).unwrap();
        udp_send(&env.pair.peer, to, b"needs resolution").unwrap();
        assert!(
            udp_received(&sink),
            "datagram to {to} after a neighbour flush"
        );
        let state = env.pair.peer_neighbour_state(host_addr(v6)).unwrap();
        assert!(
            ["REACHABLE", "STALE", "DELAY", "PROBE"].contains(&state.as_str()),
            "peer's neighbour entry for {} is {state}",
            host_addr(v6)
        );
        assert!(
            env.pins.counter(reason) > before,
            "{} not counted",
            reason.name()
        );
    }
    // Pings are ICMP echo requests: denied by default, but they too need
    // resolution first, which must have happened.
    env.pair.flush_neighbours().unwrap();
    assert!(
        !ping(&env.pair.peer, HOST_V4),
        "inbound echo request should be dropped"
    );
    let state = env.pair.peer_neighbour_state(HOST_V4).unwrap();
    assert_ne!(state, "FAILED", "ARP failed under the filter");
}

#[test]
fn enforcement_survives_sigkill_and_restart_adopts_pins() {
    require_root!();
    let mut env = Env::new(false);
    for port in [LISTED, UNLISTED] {
        TcpServer::start(&env.pair.host, sock(HOST_V4, port)).unwrap();
    }
    env.start();
    let (link, prog) = env.pins.xdp_link(HOST_IFACE).unwrap();

    let log = env.daemon.take().unwrap().kill();
    assert!(log.contains("ready"), "{log}");
    // No daemon now: still enforcing.
    env.check_port(false, UNLISTED, false, Reason::PassRule);
    env.check_port(false, LISTED, true, Reason::PassRule);
    let before = env.pins.counters().unwrap();

    env.start();
    let log = env.daemon.as_ref().unwrap().log();
    assert!(
        log.contains("attach=Adopted"),
        "restart did not adopt the pinned link:\n{log}"
    );
    // Same build, same maps: the pinned programs are adopted, not verified
    // again, and the link keeps running the very same program.
    assert!(
        log.contains("adopted=true"),
        "restart verified the programs again:\n{log}"
    );
    let (link2, prog2) = env.pins.xdp_link(HOST_IFACE).unwrap();
    assert_eq!(link2, link, "a second link was created");
    assert_eq!(prog2, prog, "the adopted program was not the pinned one");

    // Without the program pins (another build's daemon left none of this
    // build), the restart verifies anew and swaps the new program in under
    // the same link.
    env.daemon.take().unwrap().kill();
    std::fs::remove_dir_all(env.pins.path().join("programs")).unwrap();
    env.start();
    let log = env.daemon.as_ref().unwrap().log();
    assert!(log.contains("adopted=false"), "{log}");
    assert!(
        log.contains("attach=Adopted"),
        "restart did not adopt the pinned link:\n{log}"
    );
    let (link2, prog2) = env.pins.xdp_link(HOST_IFACE).unwrap();
    assert_eq!(link2, link, "a second link was created");
    assert_ne!(
        prog2, prog,
        "the new program was not swapped in under the link"
    );
    let attached = env
        .pair
        .host
        .ip(&["-d", "link", "show", HOST_IFACE])
        .unwrap();
    assert!(
        attached.contains(&format!("prog/xdp id {prog2}")),
        "interface does not run the adopted link's program:\n{attached}"
    );
    // Counters continue from where they were.
    let after = env.pins.counters().unwrap();
    for r in Reason::ALL {
        assert!(after[&r] >= before[&r], "counter {} went back", r.name());
    }
    env.check_port(false, UNLISTED, false, Reason::PassRule);
    env.check_port(false, LISTED, true, Reason::PassRule);
}

/// A restart never adopts programs bound to maps that were re-created: they
/// would read tables nobody writes. Removing one pinned map stands in for a
/// layout upgrade or a resized table; the restart verifies the programs
/// anew and the rules still hold.
#[test]
fn restart_over_recreated_maps_verifies_the_programs_anew() {
    require_root!();
    let mut env = Env::new(false);
    for port in [LISTED, UNLISTED] {
        TcpServer::start(&env.pair.host, sock(HOST_V4, port)).unwrap();
    }
    env.start();
    let (_, prog) = env.pins.xdp_link(HOST_IFACE).unwrap();
    env.daemon.take().unwrap().kill();
    let maps = portcullis::dataplane::maps_dir(env.pins.path());
    std::fs::remove_file(maps.join("FRAGMENTS")).unwrap();

    env.start();
    let log = env.daemon.as_ref().unwrap().log();
    assert!(
        log.contains("adopted=false") && log.contains("no longer pinned"),
        "programs bound to a re-created map were adopted:\n{log}"
    );
    let (_, prog2) = env.pins.xdp_link(HOST_IFACE).unwrap();
    assert_ne!(prog2, prog, "the old program still runs");
    env.check_port(false, UNLISTED, false, Reason::PassRule);
    env.check_port(false, LISTED, true, Reason::PassRule);
}

#[test]
fn sigterm_exits_cleanly_and_detach_stops_enforcing() {
    require_root!();
    let mut env = Env::new(false);
    TcpServer::start(&env.pair.host, sock(HOST_V4, UNLISTED)).unwrap();
    env.start();
    // A restart first: its programs come from their pins (so on the clsact
    // path the filter carries the kernel's shortened program name).
    env.daemon.take().unwrap().kill();
    env.start();
    let status = env.daemon.take().unwrap().terminate().unwrap();
    assert!(status.success(), "portcullisd exited with {status}");
    env.check_port(false, UNLISTED, false, Reason::PassRule);

    let out = detach(&env.pair.host, &env.config);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!env.pins.path().exists(), "pins left behind");
    // Detaching is synchronous (BPF_LINK_DETACH); allow a moment all the same.
    let started = std::time::Instant::now();
    while let Err(e) = tcp_probe(&env.pair.peer, sock(HOST_V4, UNLISTED)) {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(3),
            "detached: port still filtered: {e}"
        );
    }
    let attached = env
        .pair
        .host
        .ip(&["-d", "link", "show", HOST_IFACE])
        .unwrap();
    assert!(
        !attached.contains("prog/xdp"),
        "XDP still attached:\n{attached}"
    );
    let filters = env
        .pair
        .host
        .command("tc")
        .args(["filter", "show", "dev", HOST_IFACE, "egress"])
        .output()
        .unwrap();
    let filters = String::from_utf8_lossy(&filters.stdout);
    assert!(
        !filters.contains("portcullis"),
        "egress filter still attached:\n{filters}"
    );
}

/// The config file is the baseline; the live rule set is kept on disk and
/// restored on restart; a changed file takes effect only on reload (SIGHUP),
/// and a bad file is refused without changing anything.
#[test]
fn live_rules_survive_restarts_and_change_only_on_reload() {
    require_root!();
    let mut env = Env::new(false);
    for port in [LISTED, UNLISTED] {
        TcpServer::start(&env.pair.host, sock(HOST_V4, port)).unwrap();
    }
    env.start();
    let reached = |env: &Env, port| tcp_probe(&env.pair.peer, sock(HOST_V4, port)).is_ok();
    assert!(reached(&env, LISTED) && !reached(&env, UNLISTED));

    // Edit the file: nothing changes until a reload.
    let other = "[[ingress_rules]]\nid = \"other\"\nfrom_port = 9090\nto_port = 9090\n";
    env.config.rewrite(&config_text(&env.pins, other)).unwrap();
    assert!(reached(&env, LISTED) && !reached(&env, UNLISTED));
    let log = env.daemon.as_ref().unwrap().reload().unwrap();
    assert!(log.contains("reloaded"), "{log}");
    assert!(
        !reached(&env, LISTED) && reached(&env, UNLISTED),
        "reload did not apply the file"
    );

    // Restart with yet another file: the live set (9090) is restored, not the file.
    env.config.rewrite(&config_text(&env.pins, RULES)).unwrap();
    env.daemon.take().unwrap().kill();
    env.start();
    let log = env.daemon.as_ref().unwrap().log();
    assert!(
        log.contains("restored the live rule set") && log.contains("differs"),
        "{log}"
    );
    assert!(
        !reached(&env, LISTED) && reached(&env, UNLISTED),
        "restart did not restore the live set"
    );

    // A bad file is refused on reload and changes nothing.
    env.config
        .rewrite(
            "interfaces = [\"pc0\"]\n[[ingress_rules]]\nid = \"x\"\nfrom_port = 5\nto_port = 4\n",
        )
        .unwrap();
    let log = env.daemon.as_ref().unwrap().reload().unwrap();
    assert!(
        log.contains("reload refused") && log.contains("from_port"),
        "{log}"
    );
    assert!(
        !reached(&env, LISTED) && reached(&env, UNLISTED),
        "a refused reload changed the rules"
    );
}

/// Type=notify: once enforcing, the daemon sends READY=1 and a STATUS= line
/// to $NOTIFY_SOCKET (here a socket of the test's, not systemd's).
#[test]
fn readiness_is_notified_once_enforcing() {
    require_root!();
    let pair = Pair::new().unwrap();
    let pins = PinDir::new().unwrap();
    let cfg = config(&pins, false, RULES).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    let mut child = pair
        .host
        .command(workspace_bin("portcullisd").unwrap())
        .arg("--config")
        .arg(cfg.path())
        .arg("--state-dir")
        .arg(cfg.state_dir())
        .arg("--socket")
        .arg(cfg.socket())
        .env("NOTIFY_SOCKET", &path)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // A fresh start first says, in STATUS= alone, that the bootstrap filter
    // is in place; READY=1 comes with the full program.
    let mut buf = [0u8; 512];
    let mut msg = String::new();
    for _ in 0..4 {
        let n = sock.recv(&mut buf);
        msg = String::from_utf8_lossy(&buf[..n.expect("no notification")]).into_owned();
        if msg.contains("READY=1") {
            break;
        }
        assert!(msg.contains("bootstrap filter"), "{msg}");
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(msg.contains("READY=1"), "{msg}");
    assert!(msg.contains("STATUS=enforcing on 1 interface(s)"), "{msg}");
    // It came only after the filter was attached.
    let link = pair.host.ip(&["-d", "link", "show", HOST_IFACE]).unwrap();
    assert!(link.contains("prog/xdp"), "{link}");
    assert!(link.contains("name portcullis_ingr"), "{link}");
}

/// A config file is held to the API's checks: port 0 and an id with odd
/// characters are refused by `--check-config`, naming the rule and field.
#[test]
fn check_config_refuses_port_zero_and_odd_ids() {
    let check = |text: &str| {
        let file = ConfigFile::new(text).unwrap();
        std::process::Command::new(workspace_bin("portcullisd").unwrap())
            .arg("--config")
            .arg(file.path())
            .arg("--check-config")
            .output()
            .unwrap()
    };
    let zero = check(
        "interfaces = [\"eth0\"]\n[[ingress_rules]]\nid = \"zero\"\nfrom_port = 0\nto_port = 0\nprotocol = \"tcp\"\n",
    );
    let said = String::from_utf8_lossy(&zero.stderr);
    assert!(
        !zero.status.success() && said.contains("\"zero\"") && said.contains("port 0"),
        "{zero:?}"
    );
    let odd = check(
        "interfaces = [\"eth0\"]\n[[ingress_rules]]\nid = \"web server\"\nfrom_port = 80\nto_port = 80\n",
    );
    let said = String::from_utf8_lossy(&odd.stderr);
    assert!(
        !odd.status.success() && said.contains("web server") && said.contains("id"),
        "{odd:?}"
    );
}
