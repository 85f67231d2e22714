//! Faults: the daemon killed again and again under traffic, killed while a
//! change awaits confirmation, and a damaged state file.

use std::{
    net::UdpSocket,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use portcullis_tests::*;
use serde_json::Value;

const RULES: &str = "[[ingress_rules]]\nid = \"app\"\nfrom_port = 8080\nto_port = 8080\n";

fn rules_json(config: &ConfigFile) -> Value {
    let out = cli(config, &["--json", "rules", "get"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_object_mut().unwrap().remove("generation");
    v
}

/// Ten SIGKILLs and restarts while a sender keeps hitting a denied port and
/// an allowed connection keeps talking: the denied sink gets nothing, the
/// allowed flow never breaks, and the rule set afterwards is the one before.
#[test]
fn ten_sigkills_under_traffic_open_nothing_and_lose_nothing() {
    require_root!();
    let pair = Pair::new().unwrap();
    let pins = PinDir::new().unwrap();
    let config = ConfigFile::new(&config_text(&pins, RULES)).unwrap();
    tcp_echo_server(&pair.host, sock(HOST_V4, 8080)).unwrap();
    let sink = pair
        .host
        .enter(|| UdpSocket::bind(sock(HOST_V4, 9999)))
        .unwrap();
    sink.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut daemon = Daemon::start(&pair.host, &config).unwrap();
    // One change through the API, so the live set is not just the file.
    let added = cli(
        &config,
        &[
            "rules",
            "add",
            "--id",
            "extra",
            "--from-port",
            "7000",
            "--to-port",
            "7001",
        ],
    );
    assert!(added.status.success());
    let before = rules_json(&config);

    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let received = Arc::new(AtomicU64::new(0));
    let sender = {
        let (stop, sent) = (stop.clone(), sent.clone());
        let s = pair.peer.enter(|| UdpSocket::bind("0.0.0.0:0")).unwrap();
        thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let _ = s.send_to(b"denied", sock(HOST_V4, 9999));
                sent.fetch_add(1, Ordering::Relaxed);
                thread::sleep(Duration::from_micros(200));
            }
        })
    };
    let counter = {
        let (stop, received) = (stop.clone(), received.clone());
        thread::spawn(move || {
            let mut buf = [0u8; 64];
            while !stop.load(Ordering::Relaxed) {
                if sink.recv(&mut buf).is_ok() {
                    received.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    let mut flow = tcp_connect(&pair.peer, sock(HOST_V4, 8080)).unwrap();
    for i in 0..10 {
        daemon.kill_in_place();
        echo_roundtrip(&mut flow, format!("between {i}\n").as_bytes())
            .expect("allowed flow broke while the daemon was down");
        daemon = Daemon::start(&pair.host, &config).unwrap();
        echo_roundtrip(&mut flow, format!("after {i}\n").as_bytes())
            .expect("allowed flow broke after a restart");
    }
    stop.store(true, Ordering::Relaxed);
    sender.join().unwrap();
    counter.join().unwrap();
    eprintln!(
        "{} datagrams sent to the denied port across 10 kills, {} received",
        sent.load(Ordering::Relaxed),
        received.load(Ordering::Relaxed)
    );
    assert!(
        sent.load(Ordering::Relaxed) > 1000,
        "too little traffic to mean anything"
    );
    assert_eq!(
        received.load(Ordering::Relaxed),
        0,
        "the denied sink received packets"
    );
    assert_eq!(
        rules_json(&config),
        before,
        "the rule set changed across the restarts"
    );
    drop(daemon);
}

/// Killed while a change awaits confirmation: the restarted daemon still
/// rolls it back when the window ends.
#[test]
fn a_kill_during_a_confirmation_window_still_rolls_back() {
    require_root!();
    let pair = Pair::new().unwrap();
    let pins = PinDir::new().unwrap();
    let config = ConfigFile::new(&config_text(&pins, RULES)).unwrap();
    TcpServer::start(&pair.host, sock(HOST_V4, 8080)).unwrap();
    let mut daemon = Daemon::start(&pair.host, &config).unwrap();
    let out = cli(
        &config,
        &["rules", "remove", "app", "--confirm-within", "3"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(tcp_probe(&pair.peer, sock(HOST_V4, 8080)).is_err());
    daemon.kill_in_place();
    daemon = Daemon::start(&pair.host, &config).unwrap();
    assert!(
        daemon.log().contains("awaits confirmation"),
        "{}",
        daemon.log()
    );
    let started = Instant::now();
    while tcp_probe(&pair.peer, sock(HOST_V4, 8080)).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "not rolled back after the restart"
        );
        thread::sleep(Duration::from_millis(200));
    }
    drop(daemon);
}

/// A state file torn mid-write: the previous version is restored, loudly;
/// never an empty rule set.
#[test]
fn a_torn_state_file_restores_the_previous_rule_set() {
    require_root!();
    let pair = Pair::new().unwrap();
    let pins = PinDir::new().unwrap();
    let config = ConfigFile::new(&config_text(&pins, RULES)).unwrap();
    TcpServer::start(&pair.host, sock(HOST_V4, 8080)).unwrap();
    TcpServer::start(&pair.host, sock(HOST_V4, 7000)).unwrap();
    let mut daemon = Daemon::start(&pair.host, &config).unwrap();
    let add = cli(
        &config,
        &[
            "rules",
            "add",
            "--id",
            "later",
            "--from-port",
            "7000",
            "--to-port",
            "7000",
        ],
    );
    assert!(add.status.success());
    daemon.kill_in_place();
    let live = config.state_dir().join("live.json");
    let bytes = std::fs::read(&live).unwrap();
    std::fs::write(&live, &bytes[..bytes.len() / 3]).unwrap();
    daemon = Daemon::start(&pair.host, &config).unwrap();
    assert!(daemon.log().contains("damaged"), "{}", daemon.log());
    // The previous version: the baseline with "app", without "later".
    assert!(tcp_probe(&pair.peer, sock(HOST_V4, 8080)).is_ok());
    assert!(tcp_probe(&pair.peer, sock(HOST_V4, 7000)).is_err());
    drop(daemon);
}

/// Maps pinned by a daemon with other map layouts (an older version) are
/// left alone until this version's programs run under the links, then
/// removed; enforcement continues throughout.
#[test]
fn maps_of_an_older_layout_are_replaced() {
    require_root!();
    let pair = Pair::new().unwrap();
    let pins = PinDir::new().unwrap();
    let config = ConfigFile::new(&config_text(&pins, RULES)).unwrap();
    TcpServer::start(&pair.host, sock(HOST_V4, 9090)).unwrap();
    let daemon = Daemon::start(&pair.host, &config).unwrap();
    drop(daemon);
    // What an older version would have left: its own maps directory.
    let old = pins.path().join("maps-v1");
    std::fs::create_dir(&old).unwrap();
    run(std::process::Command::new("bpftool")
        .args(["map", "create"])
        .arg(old.join("VERDICTS"))
        .args([
            "type", "array", "key", "4", "value", "8", "entries", "1", "name", "VERDICTS",
        ]))
    .unwrap();
    assert!(tcp_probe(&pair.peer, sock(HOST_V4, 9090)).is_err());
    let daemon = Daemon::start(&pair.host, &config).unwrap();
    assert!(
        daemon.log().contains("removed the maps of an older layout"),
        "{}",
        daemon.log()
    );
    assert!(!old.exists());
    assert!(portcullis::dataplane::maps_dir(pins.path()).exists());
    assert!(
        tcp_probe(&pair.peer, sock(HOST_V4, 9090)).is_err(),
        "not enforcing after the replacement"
    );
    drop(daemon);
}
