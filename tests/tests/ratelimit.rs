//! Rate limits on new inbound flows (issue 18, item 3) with real traffic: a
//! source that opens new connections faster than its limit has its excess
//! dropped and counted (`drop_rate_limit`) while another source still
//! connects and an established flow keeps working; with `ban_seconds` the
//! source is banned (listed as the deny set `ratelimit`) and unbanned on
//! time; the admin network is never limited; IPv6 sources share a bucket
//! per /64; a rule's own `rate` applies to that rule alone.

mod deny_env;

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use deny_env::*;
use portcullis_tests::*;
use socket2::{Domain, Protocol, Socket, Type};

/// An echo service admitted from anywhere (the default limit applies).
const ECHO: u16 = 7000;
/// A service whose rule has its own limit.
const OWN: u16 = 7001;

fn env(rate_limit: &str, ssh: &str) -> Env {
    let rules = format!(
        "{ssh}\n{rate_limit}\n\
         [[ingress_rules]]\nid = \"echo\"\nfrom_port = {ECHO}\nto_port = {ECHO}\nip_ranges = []\n\
         [[ingress_rules]]\nid = \"own\"\nfrom_port = {OWN}\nto_port = {OWN}\nip_ranges = []\nrate = 1\nburst = 2\n"
    );
    let env = Env::new(&rules);
    for host in [HOST_V4, HOST_V6] {
        tcp_echo_server(&env.pair.host, sock(host, ECHO)).unwrap();
        TcpServer::start(&env.pair.host, sock(host, OWN)).unwrap();
    }
    env
}

/// `n` connection attempts from `src` to the host's `port` at once
/// (non-blocking); how many completed their handshake within `wait`. The
/// attempts end with a reset before the first SYN retransmission.
fn flood(env: &Env, src: &str, port: u16, n: usize) -> usize {
    let src: IpAddr = src.parse().unwrap();
    let host: IpAddr = if src.is_ipv6() { HOST_V6 } else { HOST_V4 }
        .parse()
        .unwrap();
    let to = SocketAddr::new(host, port);
    let sockets: Vec<Socket> = env.pair.peer.enter(|| {
        (0..n)
            .map(|_| {
                let domain = if src.is_ipv6() {
                    Domain::IPV6
                } else {
                    Domain::IPV4
                };
                let s = Socket::new(domain, Type::STREAM, Some(Protocol::TCP)).unwrap();
                s.bind(&SocketAddr::new(src, 0).into()).unwrap();
                s.set_nonblocking(true).unwrap();
                let _ = s.connect(&to.into());
                s
            })
            .collect()
    });
    std::thread::sleep(Duration::from_millis(600));
    let connected = sockets
        .iter()
        .filter(|s| s.take_error().ok().flatten().is_none() && s.peer_addr().is_ok())
        .count();
    for s in &sockets {
        let _ = s.set_linger(Some(Duration::ZERO));
    }
    connected
}

#[test]
fn a_flooding_source_is_limited_and_others_still_connect() {
    require_root!();
    let mut env = env("[rate_limit]\nrate = 1\nburst = 5\n", "allow = true\n");
    tcp_probe_control(&env.pair.peer, sock(HOST_V4, ECHO)).expect("control");
    env.start();
    // Opened before the flood, by the source that will flood.
    let mut open =
        tcp_connect(&env.pair.peer, sock(HOST_V4, ECHO)).expect("the flow opened before the flood");
    echo_roundtrip(&mut open, b"before\n").expect("the open flow works");
    let before = env.pins.counter(Reason::DropRateLimit);
    let connected = flood(&env, A4, APP, 40);
    let dropped = env.pins.counter(Reason::DropRateLimit) - before;
    assert!(
        (1..=6).contains(&connected),
        "{connected} of 40 new connections from one source got through a limit of burst 5"
    );
    assert!(
        dropped >= 30,
        "only {dropped} drop_rate_limit after the flood"
    );
    // The flooding source is over its limit now (asked first: its bucket
    // gets a flow back a second after the flood), and only for a while.
    assert!(!env.reaches(A4, APP), "the flooding source is not limited");
    // Another source is not limited by the first one's flood.
    assert!(env.reaches(B4, APP), "another source cannot connect");
    // The flow opened before the flood is not a new flow: it keeps working.
    echo_roundtrip(&mut open, b"after\n").expect("the established flow stopped");
    assert!(
        eventually(Duration::from_secs(15), || env.reaches(A4, APP)),
        "the limit does not refill"
    );
    let metrics = env.ok(&["metrics"]);
    assert!(metrics.contains("drop_rate_limit"), "{metrics}");
    let status: serde_json::Value = serde_json::from_str(&env.ok(&["--json", "status"])).unwrap();
    let counted = &status["counters"]["drop_rate_limit"];
    assert!(counted["packets"].as_u64() >= Some(30), "{counted}");
}

#[test]
fn a_source_over_its_limit_is_banned_and_unbanned_on_time() {
    require_root!();
    let mut env = env(
        // Long enough for the checks below to run inside the ban.
        "[rate_limit]\nrate = 1\nburst = 3\nban_seconds = 5\n",
        "allow = true\n",
    );
    env.start();
    assert!(env.reaches(A4, 22) && env.reaches(B4, APP), "control");
    flood(&env, A4, APP, 10);
    let listed = env.listed("ratelimit");
    assert_eq!(listed["count"], 1, "{listed}");
    assert_eq!(listed["entries"][0]["prefix"], "10.200.0.2/32", "{listed}");
    // Banned: every new flow, on every port (SSH too), not only the excess.
    assert!(!env.reaches(A4, 22), "the banned source reaches SSH");
    assert!(env.reaches(B4, APP), "another source is banned too");
    assert!(
        eventually(Duration::from_secs(15), || env.reaches(A4, APP)),
        "the ban does not lift"
    );
    assert!(
        eventually(Duration::from_secs(5), || env.listed("ratelimit")["count"]
            == 0),
        "the lifted ban is still listed"
    );
    // An operator lifts a ban before its time (with the source's bucket,
    // so its next flow does not ban it again), one source or all.
    flood(&env, A4, APP, 10);
    assert!(!env.reaches(A4, 22), "banned again");
    let out = env.ok(&["deny", "remove", "ratelimit", A4]);
    assert!(out.contains("1 removed"), "{out}");
    assert!(env.reaches(A4, 22), "the lifted ban still holds");
    flood(&env, A4, APP, 10);
    assert!(!env.reaches(A4, APP), "banned again");
    env.ok(&["deny", "flush", "ratelimit"]);
    assert!(env.reaches(A4, APP), "the flushed ban still holds");
    // The set name is the rate limiter's: no one can add to it.
    let out = env.cli(&["deny", "add", "ratelimit", B4]);
    assert!(!out.status.success(), "{}", said(&out));
}

#[test]
fn the_admin_network_is_never_limited_nor_banned() {
    require_root!();
    let mut env = env(
        "[rate_limit]\nrate = 1\nburst = 2\nban_seconds = 30\n",
        &format!("allow = true\nsources = [\"{A4}/32\"]\n"),
    );
    env.start();
    let connected = flood(&env, A4, APP, 20);
    assert_eq!(connected, 20, "the admin network was limited");
    assert_eq!(env.listed("ratelimit")["count"], 0);
    assert!(env.reaches(A4, 22), "the admin network was banned");
    // A source outside it is limited by the same settings.
    assert!(flood(&env, B4, APP, 20) <= 3, "the limit is not in force");
}

#[test]
fn ipv6_sources_share_a_bucket_per_64() {
    require_root!();
    let mut env = env("[rate_limit]\nrate = 1\nburst = 3\n", "allow = true\n");
    env.start();
    assert!(flood(&env, A6, APP, 10) <= 4);
    // Same /64 as A6: over the limit too.
    assert!(!env.reaches(B6, APP), "{B6} has a bucket of its own");
    // Another /64 has its own.
    assert!(env.reaches(C6, APP), "{C6} shares the /64's bucket");
}

#[test]
fn a_rules_own_rate_applies_to_that_rule_alone() {
    require_root!();
    // No default: only the rule with `rate = 1, burst = 2` is limited.
    let mut env = env("", "allow = true\n");
    env.start();
    let own = flood(&env, A4, OWN, 10);
    assert!(
        (1..=3).contains(&own),
        "{own} of 10 through a rule of burst 2"
    );
    assert_eq!(
        flood(&env, A4, APP, 10),
        10,
        "a rule without a rate is limited"
    );
}

#[test]
fn bad_settings_are_refused_naming_the_field() {
    require_root!();
    let pins = PinDir::new().unwrap();
    for (text, named) in [
        ("[rate_limit]\nrate = 0\n", "rate_limit: rate"),
        ("[rate_limit]\nrate = 5\nburst = 0\n", "rate_limit: burst"),
        ("[rate_limit]\nrate = 5\nipv6_prefix = 129\n", "ipv6_prefix"),
        ("[rate_limit]\nrate = 5\nban_seconds = 0\n", "ban_seconds"),
        ("[rate_limit]\nburst = 5\n", "rate"),
        (
            "[[ingress_rules]]\nid = \"x\"\nfrom_port = 1\nto_port = 1\nburst = 3\n",
            "burst",
        ),
        (
            "[[egress_rules]]\nid = \"x\"\nfrom_port = 1\nto_port = 1\nrate = 3\n",
            "rate",
        ),
    ] {
        let config = ConfigFile::new(&config_text(&pins, text)).unwrap();
        let out = std::process::Command::new(workspace_bin("portcullisd").unwrap())
            .args(["--check-config", "--config"])
            .arg(config.path())
            .output()
            .unwrap();
        let said = said(&out);
        assert!(!out.status.success(), "{text:?} accepted");
        assert!(said.contains(named), "{text:?}: {said}");
    }
    let good = "[rate_limit]\nrate = 5\nburst = 10\nipv6_prefix = 56\nban_seconds = 60\n";
    let config = ConfigFile::new(&config_text(&pins, good)).unwrap();
    let out = std::process::Command::new(workspace_bin("portcullisd").unwrap())
        .args(["--check-config", "--config"])
        .arg(config.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", said(&out));
}
