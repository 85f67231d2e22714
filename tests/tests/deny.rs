//! Deny sets with real traffic (issue 18): a banned source is dropped
//! whatever the rules admit (a rule admitting the port from anywhere, and
//! the SSH exemption), exact addresses and IPv6 /64s; others still pass; a
//! ban cuts the banned source's open flow; an expiry lifts the ban; bans
//! survive a daemon restart.

mod deny_env;

use std::time::Duration;

use deny_env::*;
use portcullis_tests::*;

#[test]
fn denied_sources_are_dropped_whatever_the_rules_admit() {
    require_root!();
    let mut env = Env::new("allow = true\n");
    env.start();
    // Control: every source reaches the rule's port and SSH.
    for src in [A4, B4, A6, B6, C6, D6] {
        for port in [22, APP] {
            assert!(env.reaches(src, port), "control: {src} -> {port}");
        }
    }
    let before = env.pins.counter(Reason::DropDenied);
    let out = env.ok(&["deny", "add", "bad", A4, A6, OTHER64]);
    assert!(out.contains("3 added"), "{out}");
    for (src, banned) in [
        (A4, true),
        (B4, false),
        (A6, true),
        (B6, false),
        (C6, true),
        (D6, true),
    ] {
        for port in [22, APP] {
            assert_eq!(
                env.reaches(src, port),
                !banned,
                "{src} -> {port} with {A4}, {A6} and {OTHER64} banned"
            );
        }
    }
    // Two drops for each of four banned sources; counted per set too.
    assert!(env.pins.counter(Reason::DropDenied) >= before + 8);
    let listed = env.listed("bad");
    assert_eq!(listed["count"], 3, "{listed}");
    assert!(listed["dropped_packets"].as_u64().unwrap() >= 8, "{listed}");
    let metrics = env.ok(&["metrics"]);
    assert!(
        metrics.contains("portcullis_deny_entries{set=\"bad\"} 3")
            && metrics.contains("portcullis_deny_packets_total{set=\"bad\"}"),
        "{metrics}"
    );
    let sets = env.ok(&["deny", "list"]);
    assert!(sets.contains("bad") && sets.contains("SET"), "{sets}");
    // Lifting the bans lets them in again.
    env.ok(&["deny", "remove", "bad", A4, OTHER64]);
    assert!(env.reaches(A4, APP) && env.reaches(C6, APP));
    assert!(!env.reaches(A6, APP), "{A6} is still banned");
    env.ok(&["deny", "flush", "bad"]);
    assert!(env.reaches(A6, 22));
}

#[test]
fn a_ban_cuts_the_banned_sources_open_flow() {
    require_root!();
    let mut env = Env::new("allow = true\n");
    tcp_echo_server(&env.pair.host, sock(HOST_V4, 7000)).unwrap();
    // Opened before the daemon starts: seeded into the connection table as
    // established, so it passes whatever the rules say (7000 is not admitted).
    let connect = |src: &str| {
        env.pair.peer.enter(|| {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            s.bind(&sock(src, 0).into())?;
            s.connect_timeout(&sock(HOST_V4, 7000).into(), Duration::from_secs(3))?;
            let s: std::net::TcpStream = s.into();
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            std::io::Result::Ok(s)
        })
    };
    let mut banned = connect(A4).unwrap();
    let mut other = connect(B4).unwrap();
    env.start();
    echo_roundtrip(&mut banned, b"before\n").expect("the open flow works");
    echo_roundtrip(&mut other, b"before\n").expect("the other flow works");
    let out = env.ok(&["deny", "add", "bad", A4]);
    assert!(out.contains("Cut 1 open flows"), "{out}");
    assert!(
        echo_roundtrip(&mut banned, b"after\n").is_err(),
        "the banned source's established connection still gets through"
    );
    echo_roundtrip(&mut other, b"after\n").expect("another source's flow is not cut");
}

#[test]
fn an_expiry_lifts_the_ban_on_time() {
    require_root!();
    let mut env = Env::new("allow = true\n");
    env.start();
    env.ok(&["deny", "add", "brief", A4, A6, "--expires", "2s"]);
    assert!(!env.reaches(A4, APP) && !env.reaches(A6, APP), "banned now");
    assert!(
        eventually(Duration::from_secs(15), || env.reaches(A4, APP)
            && env.reaches(A6, APP)),
        "the bans did not lift"
    );
    // The sweeper removes the expired entries (and the emptied set).
    assert!(
        eventually(Duration::from_secs(10), || {
            !env.cli(&["deny", "list", "brief"]).status.success()
        }),
        "expired entries were not swept"
    );
}

#[test]
fn bans_survive_a_daemon_restart() {
    require_root!();
    let mut env = Env::new("allow = true\n");
    env.start();
    // The first add writes the set's snapshot, the later ones its journal.
    env.ok(&["deny", "add", "kept", A4]);
    env.ok(&["deny", "add", "kept", A6, B6]);
    env.ok(&["deny", "remove", "kept", B6]);
    env.ok(&["deny", "add", "gone", B4]);
    env.ok(&["deny", "flush", "gone"]);
    env.daemon.take().unwrap().kill();
    // No daemon: the pinned tries keep enforcing.
    assert!(!env.reaches(A4, APP) && !env.reaches(A6, 22));
    env.start();
    assert!(
        !env.reaches(A4, APP) && !env.reaches(A6, 22),
        "after the restart"
    );
    assert!(env.reaches(B4, APP));
    let listed = env.listed("kept");
    assert_eq!(listed["count"], 2, "{listed}");
    // Restored into the daemon, not only left in the pins: it lifts them.
    env.ok(&["deny", "remove", "kept", A4, A6]);
    assert!(env.reaches(A4, APP) && env.reaches(A6, 22));
}

#[test]
fn a_drop_event_names_the_deny_set() {
    require_root!();
    let mut env = Env::new("allow = true\n");
    env.start();
    env.ok(&["deny", "add", "other", B4]);
    env.ok(&["deny", "add", "spamhaus", A4, OTHER64]);
    assert!(!env.reaches(A4, APP) && !env.reaches(C6, APP), "banned");
    // The drop events (status's recent drops, the same documents `watch`
    // streams) name the set that banned each source.
    let named = |src: &str| {
        let status: serde_json::Value =
            serde_json::from_str(&env.ok(&["--json", "status"])).unwrap();
        status["recent_drops"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["source"] == src && e["reason"] == "drop_denied")
            .map(|e| e["deny_set"].clone())
            .collect::<Vec<_>>()
    };
    for src in [A4, C6] {
        let sets = named(src);
        assert!(
            !sets.is_empty() && sets.iter().all(|s| s == "spamhaus"),
            "drop events of {src}: {sets:?}"
        );
    }
    let text = env.ok(&["status"]);
    assert!(
        text.contains("drop_denied, denied by set \"spamhaus\""),
        "{text}"
    );
    // Status names each set with its counters too.
    assert!(
        text.contains("Deny sets:   other (1 entries, 0 dropped), spamhaus (2 entries, "),
        "{text}"
    );
}
