//! Faults: the daemon killed again and again under traffic, killed while a
//! change awaits confirmation, and a damaged state file.

use std::{
    net::UdpSocket,
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

    let flood = Flood::start(
        &pair.peer,
        sink,
        sock(HOST_V4, 9999),
        Duration::from_micros(200),
    )
    .unwrap();
    let mut flow = tcp_connect(&pair.peer, sock(HOST_V4, 8080)).unwrap();
    for i in 0..10 {
        daemon.kill_in_place();
        echo_roundtrip(&mut flow, format!("between {i}\n").as_bytes())
            .expect("allowed flow broke while the daemon was down");
        daemon = Daemon::start(&pair.host, &config).unwrap();
        echo_roundtrip(&mut flow, format!("after {i}\n").as_bytes())
            .expect("allowed flow broke after a restart");
    }
    let (sent, received) = flood.stop();
    eprintln!("{sent} datagrams sent to the denied port across 10 kills, {received} received");
    assert!(sent > 1000, "too little traffic to mean anything");
    assert_eq!(received, 0, "the denied sink received packets");
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

/// A tmpfs mounted over a directory for one test, unmounted on drop.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(dir: &std::path::Path, size: &str) -> SmallDisk {
        std::fs::create_dir_all(dir).unwrap();
        run(std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir))
        .unwrap();
        SmallDisk(dir.to_owned())
    }

    /// Fills the file system; returns the filler's path.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write as _;
        let path = self.0.join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let chunk = [0u8; 4096];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// The state directory's disk fills up: a change is refused with the reason
/// (it cannot be made durable, so it is not made live either), the rules and
/// the traffic stay as they were; with space again, changes work and survive
/// a restart.
#[test]
fn a_full_state_disk_refuses_changes_and_keeps_the_rules() {
    require_root!();
    let pair = Pair::new().unwrap();
    let pins = PinDir::new().unwrap();
    let config = ConfigFile::new(&config_text(&pins, RULES)).unwrap();
    let disk = SmallDisk::mount(&config.state_dir(), "256k");
    TcpServer::start(&pair.host, sock(HOST_V4, 7000)).unwrap();
    let mut daemon = Daemon::start(&pair.host, &config).unwrap();
    let before = rules_json(&config);
    let add = [
        "rules",
        "add",
        "--id",
        "later",
        "--from-port",
        "7000",
        "--to-port",
        "7000",
    ];

    let filler = disk.fill();
    let out = cli(&config, &add);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a change was accepted on a full disk"
    );
    assert!(err.contains("No space left on device"), "{err}");
    assert_eq!(rules_json(&config), before, "the live rules changed");
    assert!(
        tcp_probe(&pair.peer, sock(HOST_V4, 7000)).is_err(),
        "the refused rule is live"
    );

    std::fs::remove_file(filler).unwrap();
    let out = cli(&config, &add);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(tcp_probe(&pair.peer, sock(HOST_V4, 7000)).is_ok());
    daemon.kill_in_place();
    daemon = Daemon::start(&pair.host, &config).unwrap();
    assert!(
        tcp_probe(&pair.peer, sock(HOST_V4, 7000)).is_ok(),
        "the change was lost"
    );
    drop(daemon);
}

/// SIGKILL while a large replacement is being made live: after the restart
/// the live set is the old one or the new one, whole, and the traffic agrees
/// with it.
#[test]
fn a_kill_mid_update_leaves_the_old_or_the_new_set_whole() {
    require_root!();
    let pair = Pair::new().unwrap();
    let pins = PinDir::new().unwrap();
    let config = ConfigFile::new(&config_text(&pins, RULES)).unwrap();
    TcpServer::start(&pair.host, sock(HOST_V4, 8080)).unwrap();
    TcpServer::start(&pair.host, sock(HOST_V4, 7000)).unwrap();
    // The new set: 5,000 rules on other ports, and port 7000 instead of 8080.
    let mut rules: Vec<Value> = (0..5000)
        .map(|i| {
            serde_json::json!({
                "id": format!("r{i}"),
                "from_port": 10000 + i,
                "to_port": 10000 + i,
                "ip_ranges": [format!("10.{}.{}.0/24", 100 + i / 256, i % 256)],
            })
        })
        .collect();
    rules.push(
        serde_json::json!({"id": "new", "from_port": 7000, "to_port": 7000, "ip_ranges": []}),
    );
    let file = config.state_dir().with_file_name("big.json");
    std::fs::write(
        &file,
        serde_json::json!({ "ingress_rules": rules }).to_string(),
    )
    .unwrap();
    // How long the whole apply takes, CLI start to reply (then undone).
    let daemon = Daemon::start(&pair.host, &config).unwrap();
    let baseline = config.state_dir().with_file_name("baseline.json");
    let mut set = rules_json(&config);
    set.as_object_mut().unwrap().remove("hash");
    std::fs::write(&baseline, set.to_string()).unwrap();
    let started = Instant::now();
    assert!(
        cli(&config, &["rules", "apply", file.to_str().unwrap()])
            .status
            .success()
    );
    let whole = started.elapsed();
    let undo = cli(&config, &["rules", "apply", baseline.to_str().unwrap()]);
    assert!(
        undo.status.success(),
        "{}",
        String::from_utf8_lossy(&undo.stderr)
    );
    drop(daemon);
    let mut outcomes = Vec::new();
    for percent in [30u32, 60, 80, 95, 110] {
        let delay = whole * percent / 100;
        let delay_ms = delay.as_millis();
        let mut daemon = Daemon::start(&pair.host, &config).unwrap();
        let old = rules_json(&config);
        let apply = std::process::Command::new(workspace_bin("portcullis").unwrap())
            .arg("--socket")
            .arg(config.socket())
            .args(["rules", "apply"])
            .arg(&file)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        thread::sleep(delay);
        daemon.kill_in_place();
        let _ = apply.wait_with_output();
        daemon = Daemon::start(&pair.host, &config).unwrap();
        let now = rules_json(&config);
        let count = now["ingress_rules"].as_array().map_or(0, Vec::len);
        let new = count == 5001;
        assert!(
            now == old || new,
            "after a kill {delay_ms} ms in: {count} rules, neither set"
        );
        // The traffic agrees with the live set.
        assert_eq!(
            tcp_probe(&pair.peer, sock(HOST_V4, 7000)).is_ok(),
            new,
            "port 7000, {delay_ms} ms"
        );
        assert_eq!(
            tcp_probe(&pair.peer, sock(HOST_V4, 8080)).is_ok(),
            !new,
            "port 8080, {delay_ms} ms"
        );
        outcomes.push((delay_ms, if new { "new" } else { "old" }));
        // Back to the baseline for the next round.
        if new {
            let out = cli(&config, &["rules", "apply", baseline.to_str().unwrap()]);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        drop(daemon);
    }
    eprintln!(
        "a whole apply takes {whole:?}; kill mid-update (delay ms, live set after restart): {outcomes:?}"
    );
}
