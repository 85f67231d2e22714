//! `portcullis explain` (issue 19): for a table of packets, each sent for
//! real between namespaces and described to `explain`, the reason counter
//! the real packet moved is the reason `explain` names, and the verdict
//! agrees with what the traffic saw; the explains change nothing (every
//! counter, rule counter, deny-set counter, connection table, fragment and
//! DHCP table, and the drop events are read before and after); `--rules`
//! reports what a changed set decides differently.

use std::{
    collections::BTreeMap,
    io,
    net::{IpAddr, SocketAddr, TcpStream},
    process::Output,
    time::Duration,
};

use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData, PerCpuArray};
use portcullis_common::{Counter, Embryo, Flow, FlowKey, FlowKey4, FragKey, RateKey};
use portcullis_tests::*;
use socket2::{Domain, Protocol, Socket, Type};

const RULES: &str = "allow_ping = true\n\
[ssh]\nallow = true\n\
[[ingress_rules]]\nid = \"web\"\nfrom_port = 8080\nto_port = 8080\nip_ranges = []\n\
[[egress_rules]]\nid = \"api\"\nfrom_port = 9000\nto_port = 9000\nip_ranges = [\"10.200.0.2/32\"]\n\
[cluster]\nid = \"c1\"\npeers = [\"10.200.0.3/32\"]\nother_clusters = [\"10.200.0.4/32\"]\n";

/// A member of this host's cluster, and of another one (the peer's
/// secondary addresses).
const MEMBER: &str = "10.200.0.3";
const FOREIGN: &str = "10.200.0.4";

struct Env {
    pair: Pair,
    pins: PinDir,
    config: ConfigFile,
    _daemon: Daemon,
}

impl Env {
    fn new() -> Env {
        Env::with("")
    }

    /// With `extra` configuration after the rules' settings.
    fn with(extra: &str) -> Env {
        let pair = Pair::new().expect("namespaces");
        for a in [MEMBER, FOREIGN] {
            pair.peer
                .ip(&["addr", "add", &format!("{a}/24"), "dev", PEER_IFACE])
                .unwrap();
        }
        for host in [HOST_V4, HOST_V6] {
            for port in [22, 8080, 8081] {
                TcpServer::start(&pair.host, sock(host, port)).unwrap();
            }
        }
        for port in [9000, 9001] {
            TcpServer::start(&pair.peer, sock(PEER_V4, port)).unwrap();
        }
        let pins = PinDir::new().unwrap();
        let config = ConfigFile::new(&config_text(&pins, &format!("{RULES}{extra}"))).unwrap();
        let daemon = Daemon::start(&pair.host, &config).expect("portcullisd");
        Env {
            pair,
            pins,
            config,
            _daemon: daemon,
        }
    }

    fn cli(&self, args: &[&str]) -> Output {
        cli(&self.config, args)
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(out.status.success(), "portcullis {args:?}: {}", said(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `explain --json WORDS... EXTRA...`.
    fn explain(&self, packet: &str, extra: &[&str]) -> serde_json::Value {
        let mut args = vec!["--json", "explain"];
        args.extend(packet.split_whitespace());
        args.extend_from_slice(extra);
        serde_json::from_str(&self.ok(&args)).unwrap()
    }
}

fn said(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A TCP handshake from `ns` (bound to `src`) to `to`: Ok when it
/// completes, a timeout when dropped.
fn connect_from(ns: &Netns, src: &str, to: SocketAddr) -> io::Result<TcpStream> {
    ns.enter(|| {
        let domain = if to.is_ipv6() {
            Domain::IPV6
        } else {
            Domain::IPV4
        };
        let s = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
        s.bind(&SocketAddr::new(src.parse::<IpAddr>().unwrap(), 0).into())?;
        s.connect_timeout(&to.into(), PROBE_TIMEOUT)?;
        Ok(s.into())
    })
}

fn reaches(ns: &Netns, src: &str, to: SocketAddr) -> bool {
    match connect_from(ns, src, to) {
        Ok(s) => {
            let _ = Socket::from(s).set_linger(Some(Duration::ZERO));
            true
        }
        Err(e) => {
            assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{src} -> {to}: {e}");
            false
        }
    }
}

/// An ICMP message of `kind` (no echo) from the peer to the host.
fn icmp_from_peer(env: &Env, kind: u8) {
    let mut msg = [
        kind, 0, 0, 0, 0x12, 0x34, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    let sum = !msg
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum::<u32>();
    let sum = ((sum & 0xffff) + (sum >> 16)) as u16;
    msg[2..4].copy_from_slice(&sum.to_be_bytes());
    raw_send(&env.pair.peer, HOST_V4.parse().unwrap(), 1, &msg).unwrap();
}

/// One row: what the traffic does (returns whether it got through, `None`
/// when the traffic cannot tell), the packet as `explain` reads it, and the
/// reason the table expects.
struct Row {
    name: &'static str,
    packet: String,
    extra: Vec<&'static str>,
    expect: &'static str,
    credited: Option<&'static str>,
}

/// The reason counters, by name.
fn verdicts(pins: &PinDir) -> BTreeMap<String, u64> {
    pins.counters()
        .unwrap()
        .into_iter()
        .map(|(r, n)| (r.name().to_string(), n))
        .collect()
}

/// Every table and counter of the data path an explain could write, read
/// from the pins: values included (a refreshed timestamp shows).
fn snapshot(env: &Env) -> BTreeMap<String, String> {
    let dir = portcullis::dataplane::maps_dir(env.pins.path());
    let pin = |name: &str| MapData::from_pin(dir.join(name)).unwrap();
    let mut out = BTreeMap::new();
    out.insert("VERDICTS".into(), format!("{:?}", verdicts(&env.pins)));
    for name in ["RULE_STATS_0", "RULE_STATS_1", "DENY_STATS"] {
        let m: PerCpuArray<_, Counter> =
            PerCpuArray::try_from(Map::PerCpuArray(pin(name))).unwrap();
        let sums: Vec<(u32, u64, u64)> = (0..m.len().min(4096))
            .filter_map(|i| {
                let v = m.get(&i, 0).ok()?;
                let (p, b) = v
                    .iter()
                    .fold((0, 0), |(p, b), c| (p + c.packets, b + c.bytes));
                (p > 0).then_some((i, p, b))
            })
            .collect();
        out.insert(name.into(), format!("{sums:?}"));
    }
    for name in ["CONNTRACK4", "INBOUND4"] {
        let m: BpfHashMap<_, FlowKey4, Flow> =
            BpfHashMap::try_from(Map::LruHashMap(pin(name))).unwrap();
        let mut v: Vec<String> = m.iter().map(|e| format!("{:?}", e.unwrap())).collect();
        v.sort();
        out.insert(name.into(), v.join("\n"));
    }
    for name in ["CONNTRACK6", "INBOUND6"] {
        let m: BpfHashMap<_, FlowKey, Flow> =
            BpfHashMap::try_from(Map::LruHashMap(pin(name))).unwrap();
        let mut v: Vec<String> = m.iter().map(|e| format!("{:?}", e.unwrap())).collect();
        v.sort();
        out.insert(name.into(), v.join("\n"));
    }
    let other: BpfHashMap<_, FlowKey4, Flow> =
        BpfHashMap::try_from(Map::LruHashMap(pin("INBOUND_OTHER4"))).unwrap();
    let mut v: Vec<String> = other.iter().map(|e| format!("{:?}", e.unwrap())).collect();
    v.sort();
    out.insert("INBOUND_OTHER4".into(), v.join("\n"));
    let embryos: BpfHashMap<_, FlowKey4, Embryo> =
        BpfHashMap::try_from(Map::LruHashMap(pin("EMBRYO4"))).unwrap();
    let mut v: Vec<String> = embryos
        .iter()
        .map(|e| format!("{:?}", e.unwrap()))
        .collect();
    v.sort();
    out.insert("EMBRYO4".into(), v.join("\n"));
    for name in ["RATE_BUCKETS", "RATE_BANS"] {
        let m: BpfHashMap<_, RateKey, u64> =
            BpfHashMap::try_from(Map::LruHashMap(pin(name))).unwrap();
        let mut v: Vec<String> = m.iter().map(|e| format!("{:?}", e.unwrap())).collect();
        v.sort();
        out.insert(name.into(), v.join("\n"));
    }
    let frags: BpfHashMap<_, FragKey, u64> =
        BpfHashMap::try_from(Map::LruHashMap(pin("FRAGMENTS"))).unwrap();
    out.insert(
        "FRAGMENTS".into(),
        format!("{:?}", frags.iter().map(|e| e.unwrap()).collect::<Vec<_>>()),
    );
    let dhcp: Array<_, u64> = Array::try_from(Map::Array(pin("DHCP_REQUESTS"))).unwrap();
    out.insert(
        "DHCP_REQUESTS".into(),
        format!(
            "{:?}",
            (0..2).map(|i| dhcp.get(&i, 0).unwrap()).collect::<Vec<_>>()
        ),
    );
    let status: serde_json::Value = serde_json::from_str(&env.ok(&["--json", "status"])).unwrap();
    out.insert("events".into(), status["recent_drops"].to_string());
    let counters: serde_json::Value =
        serde_json::from_str(&env.ok(&["--json", "counters"])).unwrap();
    out.insert("rule counters".into(), counters["rules"].to_string());
    out
}

/// Runs `traffic`, then asserts the counter of `row.expect` moved and that
/// `explain` names that reason, the credited rule and a verdict that agrees
/// with what the traffic saw (`got_through`, when it can tell).
fn agree(env: &Env, row: &Row, traffic: impl FnOnce() -> Option<bool>) {
    let before = verdicts(&env.pins);
    let got_through = traffic();
    std::thread::sleep(Duration::from_millis(100));
    let after = verdicts(&env.pins);
    let moved: Vec<_> = after
        .iter()
        .filter(|(k, v)| before.get(*k) != Some(v))
        .map(|(k, v)| format!("{k} +{}", v - before.get(k).copied().unwrap_or(0)))
        .collect();
    let e = env.explain(&row.packet, &row.extra);
    let reason = e["live"]["reason"].as_str().unwrap_or("(none)").to_string();
    eprintln!(
        "{:<22} {:<55} explain: {reason:<18} traffic moved: {}",
        row.name,
        row.packet,
        moved.join(", ")
    );
    assert!(
        after.get(&reason) > before.get(&reason),
        "{}: explain says {reason}, but the real packet moved only {moved:?}",
        row.name
    );
    assert_eq!(reason, row.expect, "{}: explain said {e}", row.name);
    let passes = e["live"]["passes"].as_bool().unwrap();
    if let Some(through) = got_through {
        assert_eq!(passes, through, "{}: explain {e} vs traffic", row.name);
    }
    assert_eq!(
        e["live"]["credited"].as_str(),
        row.credited,
        "{}: credited, in {e}",
        row.name
    );
}

fn row(
    name: &'static str,
    packet: String,
    expect: &'static str,
    credited: Option<&'static str>,
) -> Row {
    Row {
        name,
        packet,
        extra: Vec::new(),
        expect,
        credited,
    }
}

#[test]
fn explain_agrees_with_real_traffic_and_changes_nothing() {
    require_root!();
    let env = Env::new();
    let (h4, p4, h6, p6) = (HOST_V4, PEER_V4, HOST_V6, PEER_V6);
    let peer = &env.pair.peer;
    let host = &env.pair.host;
    let mut rows = Vec::new();

    // New inbound connections: a rule, the SSH exemption, nothing.
    let r = row(
        "pass rule",
        format!("in tcp {p4}:40000 -> {h4}:8080"),
        "pass_rule",
        Some("rule:web"),
    );
    agree(&env, &r, || Some(reaches(peer, p4, sock(h4, 8080))));
    rows.push(r);
    let r = row(
        "pass ssh",
        format!("in tcp {p4}:40000 -> {h4}:22"),
        "pass_ssh",
        Some("ssh"),
    );
    agree(&env, &r, || Some(reaches(peer, p4, sock(h4, 22))));
    rows.push(r);
    // Cluster members pass on every port; another cluster's are dropped.
    let r = row(
        "pass peer",
        format!("in tcp {MEMBER}:40000 -> {h4}:8081"),
        "pass_peer",
        Some("cluster:c1"),
    );
    agree(&env, &r, || Some(reaches(peer, MEMBER, sock(h4, 8081))));
    rows.push(r);
    let r = row(
        "drop other cluster",
        format!("in tcp {FOREIGN}:40000 -> {h4}:8081"),
        "drop_other_cluster",
        None,
    );
    agree(&env, &r, || Some(reaches(peer, FOREIGN, sock(h4, 8081))));
    rows.push(r);
    let r = row(
        "drop no rule",
        format!("in tcp {p4}:40000 -> {h4}:8081"),
        "drop_no_rule",
        None,
    );
    agree(&env, &r, || Some(reaches(peer, p4, sock(h4, 8081))));
    rows.push(r);
    // Pings pass on the setting; other ICMP is dropped.
    let r = row(
        "pass ping",
        format!("in icmp {p4} -> {h4}"),
        "pass_ping",
        None,
    );
    agree(&env, &r, || Some(ping(peer, h4)));
    rows.push(r);
    let mut r = row(
        "drop icmp",
        format!("in icmp {p4} -> {h4}"),
        "drop_icmp",
        None,
    );
    r.extra = vec!["--icmp-type", "13"];
    agree(&env, &r, || {
        icmp_from_peer(&env, 13);
        None
    });
    rows.push(r);
    // Egress under the allowlist: a rule admits 9000, nothing admits 9001.
    let r = row(
        "pass egress rule",
        format!("out tcp {h4}:40000 -> {p4}:9000"),
        "pass_egress",
        Some("rule:api"),
    );
    agree(&env, &r, || Some(reaches(host, h4, sock(p4, 9000))));
    rows.push(r);
    let r = row(
        "drop egress",
        format!("out tcp {h4}:40000 -> {p4}:9001"),
        "drop_egress",
        None,
    );
    agree(&env, &r, || Some(reaches(host, h4, sock(p4, 9001))));
    rows.push(r);
    // A flow this host opened: its packets come back established.
    let open =
        connect_from(host, h4, sock(p4, 9000)).expect("connection to the egress rule's port");
    let local = open.local_addr().unwrap().port();
    let mut r = row(
        "pass established",
        format!("in tcp {p4}:9000 -> {h4}:{local}"),
        "pass_established",
        None,
    );
    r.extra = vec!["--tcp-flags", "ack"];
    agree(&env, &r, || {
        open.set_nodelay(true).unwrap();
        use std::io::Write as _;
        (&open).write_all(b"x").unwrap();
        // The peer's ACK of the byte comes back on the flow.
        std::thread::sleep(Duration::from_millis(200));
        None
    });
    rows.push(r);
    // A banned source, whatever the rules admit; the set is named.
    env.ok(&["deny", "add", "bad", p6]);
    let mut r = row(
        "drop denied",
        format!("in tcp [{p6}]:40000 -> [{h6}]:8080"),
        "drop_denied",
        None,
    );
    agree(&env, &r, || Some(reaches(peer, p6, sock(h6, 8080))));
    let e = env.explain(&r.packet, &[]);
    assert_eq!(e["live"]["deny_set"], "bad", "{e}");
    r.extra = vec!["--interface", HOST_IFACE];
    rows.push(r);

    // Every reason the table reaches, distinct.
    let reached: std::collections::BTreeSet<_> = rows.iter().map(|r| r.expect).collect();
    assert_eq!(reached.len(), rows.len());

    // Explaining changes nothing: every row, many times over. First a quiet
    // link: the kernel's own packets are real packets the counters see (a
    // neighbour entry used while stale is probed 5 s later; router
    // solicitations and MLD reports after a link comes up).
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    loop {
        let a = verdicts(&env.pins);
        std::thread::sleep(Duration::from_secs(7));
        if verdicts(&env.pins) == a || std::time::Instant::now() > deadline {
            break;
        }
    }
    let before = snapshot(&env);
    for _ in 0..5 {
        for r in &rows {
            let e = env.explain(&r.packet, &r.extra);
            assert_eq!(e["live"]["reason"], r.expect, "{e}");
        }
    }
    let after = snapshot(&env);
    for (k, v) in &before {
        assert_eq!(
            Some(v),
            after.get(k),
            "explain changed {k}: before\n{v}\nafter\n{}",
            after.get(k).map(String::as_str).unwrap_or("")
        );
    }
    drop(open);
}

#[test]
fn explain_rules_reports_what_a_changed_set_decides_differently() {
    require_root!();
    let env = Env::new();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("proposed.json");
    // 8080 no longer admitted; 8081 admitted from the peer only.
    std::fs::write(
        &file,
        r#"{"ingress_rules":[{"id":"alt","from_port":8081,"to_port":8081,"ip_ranges":["10.200.0.2/32"]}],
            "egress_rules":[{"id":"api","from_port":9000,"to_port":9000,"ip_ranges":["10.200.0.2/32"]}]}"#,
    )
    .unwrap();
    let f = file.to_str().unwrap();
    let web = format!("in tcp {PEER_V4}:40000 -> {HOST_V4}:8080");
    let alt = format!("in tcp {PEER_V4}:40000 -> {HOST_V4}:8081");
    let e = env.explain(&web, &["--rules", f]);
    assert_eq!(e["live"]["reason"], "pass_rule", "{e}");
    assert_eq!(e["proposed"]["reason"], "drop_no_rule", "{e}");
    assert_eq!(e["differs"], true, "{e}");
    let e = env.explain(&alt, &["--rules", f]);
    assert_eq!(e["live"]["reason"], "drop_no_rule", "{e}");
    assert_eq!(e["proposed"]["reason"], "pass_rule", "{e}");
    assert_eq!(e["proposed"]["credited"], "rule:alt", "{e}");
    // The SSH exemption is untouched by the file (no `ssh` key): the same.
    let ssh = format!("in tcp {PEER_V4}:40000 -> {HOST_V4}:22");
    let e = env.explain(&ssh, &["--rules", f]);
    assert_eq!(e["differs"], false, "{e}");
    // In words, and the live set never changed.
    let words = env.ok(&[
        "explain",
        "in",
        "tcp",
        &format!("{PEER_V4}:40000"),
        "->",
        &format!("{HOST_V4}:8080"),
        "--rules",
        f,
    ]);
    assert!(words.contains("decides otherwise"), "{words}");
    assert!(
        reaches(&env.pair.peer, PEER_V4, sock(HOST_V4, 8080)),
        "the live rules still admit 8080"
    );
    assert!(!reaches(&env.pair.peer, PEER_V4, sock(HOST_V4, 8081)));
    // A bad file or packet is refused, naming what is wrong.
    let out = env.cli(&["explain", "in", "tcp", "10.200.0.2:1", "->", "10.200.0.1"]);
    assert!(
        !out.status.success() && said(&out).contains("give a port"),
        "{}",
        said(&out)
    );
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, r#"{"ingress_rules":[{"id":"x","from_port":9,"to_port":1,"ip_ranges":[]}],"egress_rules":[]}"#).unwrap();
    let out = env.cli(&[
        "explain",
        "in",
        "tcp",
        "10.200.0.2:1",
        "->",
        "10.200.0.1:22",
        "--rules",
        bad.to_str().unwrap(),
    ]);
    assert!(
        !out.status.success() && said(&out).contains("invalid rule set"),
        "{}",
        said(&out)
    );
    let out = env.cli(&[
        "explain",
        "in",
        "tcp",
        &format!("{PEER_V4}:1"),
        "->",
        &format!("{HOST_V4}:22"),
        "--interface",
        "nope0",
    ]);
    assert!(
        !out.status.success() && said(&out).contains("not protected"),
        "{}",
        said(&out)
    );
}

/// Readers may explain (it changes nothing); they may not change the
/// egress policy. uid 65534 in `[api] reader_group`, through the CLI.
#[test]
fn readers_may_explain_but_not_change_the_egress_policy() {
    require_root!();
    let env = Env::with("[api]\nreader_group = \"nogroup\"\n");
    let as_nobody = |args: &[&str]| {
        std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(workspace_bin("portcullis").unwrap())
            .arg("--socket")
            .arg(env.config.socket())
            .args(args)
            .output()
            .unwrap()
    };
    let packet = format!("in tcp {PEER_V4}:40000 -> {HOST_V4}:8080");
    let mut args = vec!["--json", "explain"];
    args.extend(packet.split_whitespace());
    let out = as_nobody(&args);
    assert!(out.status.success(), "a reader explains: {}", said(&out));
    let e: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(e["live"]["reason"], "pass_rule", "{e}");
    let out = as_nobody(&["egress", "allow"]);
    assert!(
        !out.status.success(),
        "a reader changed the egress policy: {}",
        said(&out)
    );
    assert!(said(&out).contains("may not"), "{}", said(&out));
}

/// The other end's SYN of a TCP simultaneous open, from a source in a deny
/// set, on a flow this host opened after the ban: the deny set would drop
/// it, the connection table (asked after the policy for a SYN) passes it,
/// and `explain` says so without naming the deny set that did not decide.
#[test]
fn a_simultaneous_open_syn_from_a_banned_source_explains_as_established() {
    require_root!();
    let env = Env::new();
    let (h4, p4) = (HOST_V4, PEER_V4);
    env.ok(&["deny", "add", "bad", p4]);
    let e = env.explain(&format!("in tcp {p4}:9000 -> {h4}:40000"), &[]);
    assert_eq!(e["live"]["reason"], "drop_denied", "{e}");
    assert_eq!(e["live"]["deny_set"], "bad", "{e}");
    // This host may still connect out to it (deny sets are inbound).
    let open = connect_from(&env.pair.host, h4, sock(p4, 9000))
        .expect("connection to the egress rule's port");
    let local = open.local_addr().unwrap().port();
    let e = env.explain(&format!("in tcp {p4}:9000 -> {h4}:{local}"), &[]);
    assert_eq!(e["live"]["reason"], "pass_established", "{e}");
    assert!(e["live"]["deny_set"].is_null(), "{e}");
    drop(open);
}
