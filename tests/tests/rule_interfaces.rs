//! Rules that apply to some interfaces (issue 18, item 4), with real
//! traffic: the protected host has a public NIC (`pc0`, to one peer) and a
//! cluster NIC (`pc2`, to another), both attached; a rule with
//! `interfaces = ["pc2"]` admits its port from the cluster NIC's peer and
//! not from the public one, while a rule without interfaces admits on both.
//! IPv4 and IPv6. Also: a forged cluster source arriving on the public NIC
//! (the attack), a reload moving the rule to the other NIC (the flow on
//! the old one is cut), the CLI, and the refusals (egress rules, an
//! interface Portcullis does not protect).

use std::{io, net::TcpStream};

use portcullis_tests::{packet::Pkt, traffic::*, *};
use socket2::{Domain, Protocol, Socket, Type};

const CLUSTER_IF: &str = "pc2";
const CLUSTER_PEER_IF: &str = "pc3";
const HOST2_V4: &str = "10.200.2.1";
const HOST2_V6: &str = "fd00:200:2::1";
const PEER2_V4: &str = "10.200.2.2";
const PEER2_V6: &str = "fd00:200:2::2";
const WEB: u16 = 8080;
const CLUSTER: u16 = 9000;
const ETH_P_ALL: u16 = 0x0003;
const SYN: u8 = 0x02;

/// The cluster rule (port 9000, from the cluster's networks, on `on`) and
/// a web rule without interfaces (port 8080 from anywhere).
fn rules(on: &str) -> String {
    format!(
        "[[ingress_rules]]\nid = \"cluster\"\nfrom_port = 9000\nto_port = 9000\n\
         ip_ranges = [\"10.200.2.0/24\", \"fd00:200:2::/64\", \"10.200.0.0/24\", \"fd00:200::/64\"]\n\
         protocol = \"tcp\"\ninterfaces = [\"{on}\"]\n\
         [[ingress_rules]]\nid = \"web\"\nfrom_port = 8080\nto_port = 8080\nip_ranges = []\n\
         protocol = \"tcp\"\n"
    )
}

/// The config: both NICs protected, plus `rest`.
fn config_both(pins: &PinDir, rest: &str) -> String {
    config_text(pins, rest).replacen(
        &format!("interfaces = [\"{HOST_IFACE}\"]"),
        &format!("interfaces = [\"{HOST_IFACE}\", \"{CLUSTER_IF}\"]"),
        1,
    )
}

fn reaches(ns: &Netns, host: &str, port: u16) -> bool {
    match tcp_probe(ns, sock(host, port)) {
        Ok(()) => true,
        Err(e) => {
            assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{host}:{port}: {e}");
            false
        }
    }
}

/// The host with its public pair and a cluster namespace on `pc2`/`pc3`.
fn setup() -> (Pair, Netns) {
    let pair = Pair::new().unwrap();
    let cluster = Netns::new("q").unwrap();
    veth(&pair.host, CLUSTER_IF, &cluster, CLUSTER_PEER_IF).unwrap();
    addresses(
        &pair.host,
        CLUSTER_IF,
        &format!("{HOST2_V4}/24"),
        &format!("{HOST2_V6}/64"),
    )
    .unwrap();
    addresses(
        &cluster,
        CLUSTER_PEER_IF,
        &format!("{PEER2_V4}/24"),
        &format!("{PEER2_V6}/64"),
    )
    .unwrap();
    (pair, cluster)
}

fn said(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn an_interface_rule_admits_on_its_interface_only() {
    require_root!();
    let (pair, cluster) = setup();
    for host in [HOST_V4, HOST_V6, HOST2_V4, HOST2_V6] {
        for port in [WEB, CLUSTER] {
            TcpServer::start(&pair.host, sock(host, port)).unwrap();
        }
    }
    // Control: without the filter both peers reach both ports.
    for (ns, hosts) in [
        (&pair.peer, [HOST_V4, HOST_V6]),
        (&cluster, [HOST2_V4, HOST2_V6]),
    ] {
        for host in hosts {
            for port in [WEB, CLUSTER] {
                assert!(reaches(ns, host, port), "control: {host}:{port}");
            }
        }
    }
    let pins = PinDir::new().unwrap();
    let config = ConfigFile::new(&config_both(&pins, &rules(CLUSTER_IF))).unwrap();
    let _daemon = Daemon::start(&pair.host, &config).expect("portcullisd");
    let dropped = pins.counter(Reason::DropNoRule);
    for host in [HOST2_V4, HOST2_V6] {
        assert!(
            reaches(&cluster, host, CLUSTER),
            "cluster NIC: {host}:{CLUSTER}"
        );
        assert!(reaches(&cluster, host, WEB), "cluster NIC: {host}:{WEB}");
    }
    for host in [HOST_V4, HOST_V6] {
        assert!(
            !reaches(&pair.peer, host, CLUSTER),
            "public NIC admitted {host}:{CLUSTER}"
        );
        assert!(reaches(&pair.peer, host, WEB), "public NIC: {host}:{WEB}");
    }
    // The two SYNs of the public peer (and their retransmissions) only.
    assert!(pins.counter(Reason::DropNoRule) >= dropped + 2);
    // Explain asks the data path as the packet would arrive: on the
    // cluster NIC the cluster rule admits it, on the public one nothing.
    let explain = |from: &str, to: &str, on: &str| -> serde_json::Value {
        let out = cli(
            &config,
            &[
                "--json",
                "explain",
                "in",
                "tcp",
                from,
                "->",
                to,
                "--interface",
                on,
            ],
        );
        assert!(out.status.success(), "{}", said(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let e = explain("10.200.2.2:40000", "10.200.2.1:9000", CLUSTER_IF);
    assert_eq!(e["live"]["credited"], "rule:cluster", "{e}");
    assert_eq!(e["live"]["passes"], true, "{e}");
    let e = explain("[fd00:200:2::2]:40000", "[fd00:200::1]:9000", HOST_IFACE);
    assert_eq!(e["live"]["passes"], false, "{e}");
    assert_eq!(e["live"]["reason"], "drop_no_rule", "{e}");
    let listed = said(&cli(&config, &["rules", "list"]));
    assert!(listed.contains(&format!("on {CLUSTER_IF}")), "{listed}");
    // Interfaces are for ingress rules: refused on egress, naming the rule
    // and the field, and nothing changes.
    let out = cli(
        &config,
        &[
            "rules",
            "add",
            "--id",
            "out",
            "--from-port",
            "53",
            "--to-port",
            "53",
            "--egress",
            "--interface",
            CLUSTER_IF,
        ],
    );
    let text = said(&out);
    assert!(
        !out.status.success() && text.contains("\"out\"") && text.contains("interfaces"),
        "{text}"
    );
    // An interface Portcullis does not protect: refused, naming it.
    let out = cli(&config, &["allow", "7001/tcp", "--interface", "pc9"]);
    let text = said(&out);
    assert!(
        !out.status.success() && text.contains("\"pc9\"") && text.contains("interfaces"),
        "{text}"
    );
    // Added at run time: `allow --interface` scopes a rule the same way.
    let out = cli(&config, &["allow", "7000/tcp", "--interface", CLUSTER_IF]);
    assert!(out.status.success(), "{}", said(&out));
    TcpServer::start(&pair.host, sock(HOST2_V4, 7000)).unwrap();
    TcpServer::start(&pair.host, sock(HOST_V4, 7000)).unwrap();
    assert!(reaches(&cluster, HOST2_V4, 7000));
    assert!(!reaches(&pair.peer, HOST_V4, 7000));
}

/// A config whose rule names an interface the daemon does not protect is
/// refused at start, naming the rule, the field and the interface.
#[test]
fn a_rule_on_an_unprotected_interface_is_a_config_error() {
    require_root!();
    let (pair, _cluster) = setup();
    let pins = PinDir::new().unwrap();
    let config = ConfigFile::new(&config_both(&pins, &rules("pc9"))).unwrap();
    let (status, log) = Daemon::spawn(&pair.host, &config, &[])
        .unwrap()
        .expect_exit()
        .unwrap();
    assert!(!status.success());
    assert!(
        log.contains("\"cluster\"") && log.contains("interfaces") && log.contains("\"pc9\""),
        "{log}"
    );
}

fn mac(ns: &Netns, ifname: &str) -> [u8; 6] {
    let out = ns.ip(&["-br", "link", "show", ifname]).expect("ip link");
    let text = out.split_whitespace().nth(2).expect("MAC in `ip -br link`");
    let mut m = [0u8; 6];
    for (i, part) in text.split(':').enumerate() {
        m[i] = u8::from_str_radix(part, 16).expect("MAC byte");
    }
    m
}

/// Sends one hand-built frame out of `ifname` in `ns` (AF_PACKET).
fn send_frame(ns: &Netns, ifname: &str, frame: Vec<u8>) {
    let ifname = ifname.to_string();
    ns.enter(move || {
        let s = Socket::new(
            Domain::PACKET,
            Type::RAW,
            Some(Protocol::from(i32::from(ETH_P_ALL.to_be()))),
        )
        .expect("AF_PACKET socket");
        let index = nix::net::if_::if_nametoindex(ifname.as_str()).expect("interface index");
        // SAFETY: a zeroed sockaddr_ll is valid; the fields set below are plain integers.
        let mut ll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        ll.sll_family = libc::AF_PACKET as u16;
        ll.sll_protocol = ETH_P_ALL.to_be();
        ll.sll_ifindex = index as i32;
        // SAFETY: `ll` is a valid sockaddr_ll of the size given.
        let rc = unsafe {
            libc::bind(
                std::os::fd::AsRawFd::as_raw_fd(&s),
                (&ll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(rc, 0, "bind AF_PACKET: {}", io::Error::last_os_error());
        s.send(&frame).expect("send frame");
    });
}

/// The attack: a SYN forged with a cluster member's source address
/// arriving on the public NIC. The cluster rule admits that source, but
/// only on the cluster NIC: dropped (v4 and v6). The same frames sent on
/// the cluster NIC are admitted, so the frames themselves are good.
#[test]
fn a_cluster_source_forged_on_the_public_nic_is_dropped() {
    require_root!();
    let (pair, cluster) = setup();
    let pins = PinDir::new().unwrap();
    let config = ConfigFile::new(&config_both(&pins, &rules(CLUSTER_IF))).unwrap();
    let _daemon = Daemon::start(&pair.host, &config).expect("portcullisd");
    let frames = |to_v4: &str, to_v6: &str, dst_mac: [u8; 6]| {
        [(PEER2_V4, to_v4), (PEER2_V6, to_v6)].map(|(src, dst)| {
            let mut f = Pkt::new(src, dst).tcp(40000, CLUSTER, SYN).bytes();
            f[..6].copy_from_slice(&dst_mac);
            f
        })
    };
    let (no_rule, by_rule) = (
        pins.counter(Reason::DropNoRule),
        pins.counter(Reason::PassRule),
    );
    for f in frames(HOST_V4, HOST_V6, mac(&pair.host, HOST_IFACE)) {
        send_frame(&pair.peer, PEER_IFACE, f);
    }
    pins.expect_counter(Reason::DropNoRule, no_rule + 2);
    pins.expect_counter(Reason::PassRule, by_rule);
    // Control: the same SYNs on the cluster NIC pass the rule.
    for f in frames(HOST2_V4, HOST2_V6, mac(&pair.host, CLUSTER_IF)) {
        send_frame(&cluster, CLUSTER_PEER_IF, f);
    }
    pins.expect_counter(Reason::PassRule, by_rule + 2);
    pins.expect_counter(Reason::DropNoRule, no_rule + 2);
}

fn connect(ns: &Netns, host: &str) -> TcpStream {
    let mut s = tcp_connect(ns, sock(host, CLUSTER)).expect("connect");
    echo_roundtrip(&mut s, b"hello\n").expect("echo");
    s
}

/// A reload that moves the cluster rule from the cluster NIC to the public
/// one: open flows on the cluster NIC stop (their next packets meet the
/// cluster NIC's rules, which no longer admit them); new ones start on
/// the public NIC. v4 and v6.
#[test]
fn moving_a_rule_to_another_interface_cuts_its_flows_on_the_old_one() {
    require_root!();
    let (pair, cluster) = setup();
    for host in [HOST_V4, HOST_V6, HOST2_V4, HOST2_V6] {
        tcp_echo_server(&pair.host, sock(host, CLUSTER)).unwrap();
    }
    let pins = PinDir::new().unwrap();
    let config = ConfigFile::new(&config_both(&pins, &rules(CLUSTER_IF))).unwrap();
    let _daemon = Daemon::start(&pair.host, &config).expect("portcullisd");
    let mut open: Vec<TcpStream> = [HOST2_V4, HOST2_V6]
        .into_iter()
        .map(|h| connect(&cluster, h))
        .collect();
    assert!(!reaches(&pair.peer, HOST_V4, CLUSTER));
    config
        .rewrite(&config_both(&pins, &rules(HOST_IFACE)))
        .unwrap();
    let out = cli(&config, &["reload"]);
    assert!(out.status.success(), "{}", said(&out));
    for (s, host) in open.iter_mut().zip([HOST2_V4, HOST2_V6]) {
        assert!(
            echo_roundtrip(s, b"again\n").is_err(),
            "the flow to {host} on the old interface still passes"
        );
    }
    for host in [HOST_V4, HOST_V6] {
        let mut s = connect(&pair.peer, host);
        echo_roundtrip(&mut s, b"more\n").unwrap();
    }
    assert!(!reaches(&cluster, HOST2_V4, CLUSTER));
}

/// Waits until `status` says every configured interface is protected.
fn wait_enforcing(config: &ConfigFile) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let out = cli(config, &["--json", "status"]);
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if status["enforcing"] == true {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not protected: {}",
            said(&out)
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// The cluster NIC appears after the daemon started, and later is removed
/// and created again (a new interface index each time): its rules apply
/// from the moment it is protected.
#[test]
fn an_interface_that_appears_later_gets_its_rules() {
    require_root!();
    let pair = Pair::new().unwrap();
    let cluster = Netns::new("q").unwrap();
    TcpServer::start(&pair.host, sock(HOST_V4, CLUSTER)).unwrap();
    let pins = PinDir::new().unwrap();
    let config = ConfigFile::new(&config_both(&pins, &rules(CLUSTER_IF))).unwrap();
    let _daemon = Daemon::start(&pair.host, &config).expect("portcullisd");
    for round in 0..2 {
        let _ = pair.host.ip(&["link", "del", CLUSTER_IF]);
        veth(&pair.host, CLUSTER_IF, &cluster, CLUSTER_PEER_IF).unwrap();
        addresses(
            &pair.host,
            CLUSTER_IF,
            &format!("{HOST2_V4}/24"),
            &format!("{HOST2_V6}/64"),
        )
        .unwrap();
        addresses(
            &cluster,
            CLUSTER_PEER_IF,
            &format!("{PEER2_V4}/24"),
            &format!("{PEER2_V6}/64"),
        )
        .unwrap();
        wait_enforcing(&config);
        if round == 0 {
            // Bound to the address; it keeps listening when it comes back.
            TcpServer::start(&pair.host, sock(HOST2_V4, CLUSTER)).unwrap();
        }
        assert!(
            reaches(&cluster, HOST2_V4, CLUSTER),
            "round {round}: the cluster NIC's rule does not apply"
        );
        assert!(!reaches(&pair.peer, HOST_V4, CLUSTER), "round {round}");
    }
}

/// The anti-lockout check with interface rules: the caller's SSH session
/// (from the cluster network) is admitted only by a rule on the cluster
/// NIC. A change that moves that rule to the public NIC would cut it (its
/// next packets meet the cluster NIC's rules): refused without `--force`,
/// though some interface still admits the source. A change that leaves it
/// alone goes through.
#[test]
fn moving_the_callers_ssh_rule_to_another_interface_is_refused() {
    require_root!();
    let (pair, _cluster) = setup();
    let admin = |on: &str| {
        format!(
            "[[ingress_rules]]\nid = \"admin\"\nfrom_port = 22\nto_port = 22\n\
             ip_ranges = [\"10.200.2.0/24\"]\nprotocol = \"tcp\"\ninterfaces = [\"{on}\"]\n"
        )
    };
    let pins = PinDir::new().unwrap();
    let config = ConfigFile::new(&config_both(&pins, &admin(CLUSTER_IF))).unwrap();
    let _daemon = Daemon::start(&pair.host, &config).expect("portcullisd");
    let as_session = |args: &[&str]| {
        std::process::Command::new(workspace_bin("portcullis").unwrap())
            .env("SSH_CONNECTION", format!("{PEER2_V4} 50022 {HOST2_V4} 22"))
            .arg("--socket")
            .arg(config.socket())
            .args(args)
            .output()
            .unwrap()
    };
    let out = as_session(&["allow", "7000/tcp"]);
    assert!(out.status.success(), "{}", said(&out));
    let moved = config.state_dir().with_file_name("moved.toml");
    std::fs::write(&moved, admin(HOST_IFACE)).unwrap();
    let moved = moved.to_str().unwrap();
    let out = as_session(&["rules", "apply", moved]);
    let text = said(&out);
    assert!(
        !out.status.success() && text.contains("would cut your own SSH session"),
        "{text}"
    );
    let listed = said(&cli(&config, &["rules", "list"]));
    assert!(listed.contains(&format!("on {CLUSTER_IF}")), "{listed}");
    let out = as_session(&["rules", "apply", moved, "--force"]);
    assert!(out.status.success(), "{}", said(&out));
}
