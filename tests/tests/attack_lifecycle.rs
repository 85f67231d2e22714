//! Attack suite: the daemon's lifecycle and emergency modes (issue 14).
//!
//! Each test performs an attack, or stages the failure an attacker or an
//! accident would cause, against the real daemon in a network namespace
//! with real traffic, and asserts that it fails: the fallback admits SSH
//! from its sources only, every exit before enforcement leaves the fallback
//! in place, lockdown only narrows (both directions) and cuts sessions not
//! with the admin network, a lockdown that admits nobody ends with the
//! boot, READY is never claimed for a missing interface, and damaged state
//! files are refused with clear errors instead of panics.

use std::{
    fs,
    os::unix::net::UnixDatagram,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use portcullis_tests::*;
use serde_json::Value;

macro_rules! require_root {
    () => {
        if !is_root() {
            eprintln!("skipped: needs root");
            return;
        }
    };
}

/// A directory that is not a bpffs: pinning there fails, so the data path
/// cannot load (as on a kernel that refuses the programs).
fn not_bpffs() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

fn fallback_table(ns: &Netns) -> Option<String> {
    let out = ns
        .command("nft")
        .args(["list", "table", "inet", "portcullis_fallback"])
        .output()
        .unwrap();
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn json(out: std::process::Output) -> Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The fallback used to parse SSH sources with a parser of its own that
/// dropped a bare address (which the rule validator accepts as a host
/// route), leaving `tcp dport 22 accept` for everyone.
#[test]
fn the_fallback_admits_ssh_only_from_its_sources_even_as_a_bare_address() {
    require_root!();
    let pair = Pair::new().unwrap();
    let dir = not_bpffs();
    for port in [22, 2222, 9999] {
        TcpServer::start(&pair.host, sock(HOST_V4, port)).unwrap();
    }
    tcp_probe_control(&pair.peer, sock(HOST_V4, 22)).expect("unfiltered control");
    for (sources, ports, admitted) in [
        // Someone else's address: the peer gets nothing.
        ("\"10.200.90.5\"", "", vec![]),
        // The peer's own address, bare, on two SSH ports.
        (
            &format!("\"{PEER_V4}\""),
            "ports = [22, 2222]",
            vec![22, 2222],
        ),
    ] {
        let config = ConfigFile::new(&format!(
            "interfaces = [\"{HOST_IFACE}\"]\npin_dir = \"{}\"\nfallback = \"nftables\"\n\
             [ssh]\nallow = true\nsources = [{sources}]\n{ports}\n",
            dir.path().display()
        ))
        .unwrap();
        let (status, log) = Daemon::spawn(&pair.host, &config, &[])
            .unwrap()
            .expect_exit()
            .unwrap();
        assert!(!status.success(), "{log}");
        assert!(log.contains("nftables fallback in place"), "{log}");
        let table = fallback_table(&pair.host).expect("no fallback table");
        for port in [22, 2222, 9999] {
            let reached = tcp_probe(&pair.peer, sock(HOST_V4, port)).is_ok();
            assert_eq!(
                reached,
                admitted.contains(&port),
                "sources {sources}, ports {ports}: port {port}\n{table}"
            );
        }
    }
}

/// Every way the daemon can stop before it enforces leaves the fallback in
/// place: a configuration that does not parse, an unknown writers' group,
/// a damaged live state (and the data path failing, above).
#[test]
fn every_exit_before_enforcement_applies_the_fallback() {
    require_root!();
    let pair = Pair::new().unwrap();
    let pins = PinDir::new().unwrap();
    TcpServer::start(&pair.host, sock(HOST_V4, 22)).unwrap();
    TcpServer::start(&pair.host, sock(HOST_V4, 9999)).unwrap();
    tcp_probe_control(&pair.peer, sock(HOST_V4, 9999)).expect("unfiltered control");
    let good = config_text(&pins, "[ssh]\nallow = true\n");
    type Damage = fn(&ConfigFile);
    let cases: [(&str, String, Damage); 5] = [
        ("config", format!("{good}bogus = [\n"), |_| {}),
        (
            "[api] group",
            format!("{good}[api]\ngroup = \"no-such-group-pc\"\n"),
            |_| {},
        ),
        ("live state", good.clone(), |c: &ConfigFile| {
            fs::create_dir_all(c.state_dir()).unwrap();
            for f in ["live.json", "live.prev.json"] {
                fs::write(c.state_dir().join(f), b"{\"format\": 1, \"torn").unwrap();
            }
        }),
        ("saved mode", good.clone(), |c: &ConfigFile| {
            fs::create_dir_all(c.state_dir()).unwrap();
            fs::write(c.state_dir().join("mode.json"), b"{\"mode\": \"lockd").unwrap();
        }),
        // `rules save` wrote it; it replaces the config's rules, so a
        // damaged one cannot be skipped in favour of the config's.
        ("saved rules file", good.clone(), |c: &ConfigFile| {
            let saved = c.path().parent().unwrap().join("saved");
            fs::create_dir_all(&saved).unwrap();
            fs::write(saved.join("rules.toml"), b"[[ingress_rules]]\nid = \"w").unwrap();
        }),
    ];
    for (what, text, damage) in cases {
        let config = ConfigFile::new(&text).unwrap();
        damage(&config);
        let (status, log) = Daemon::spawn(&pair.host, &config, &[])
            .unwrap()
            .expect_exit()
            .unwrap();
        assert!(!status.success(), "{what}: {log}");
        assert!(
            log.contains("enforcement cannot start") && log.contains("nftables fallback in place"),
            "{what}: {log}"
        );
        if what == "saved mode" {
            assert!(log.contains("mode.json is damaged"), "{log}");
        }
        if what == "saved rules file" {
            assert!(log.contains("saved/rules.toml"), "{log}");
        }
        assert!(fallback_table(&pair.host).is_some(), "{what}: no fallback");
        assert!(
            tcp_probe(&pair.peer, sock(HOST_V4, 9999)).is_err(),
            "{what}: an unadmitted port answered"
        );
        assert!(
            tcp_probe(&pair.peer, sock(HOST_V4, 22)).is_ok(),
            "{what}: the fallback cut SSH"
        );
        pair.host
            .command("nft")
            .args(["delete", "table", "inet", "portcullis_fallback"])
            .status()
            .unwrap();
    }
    // Enforcing again removes the fallback.
    let config = ConfigFile::new(&good).unwrap();
    pair.host
        .command("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write as _;
            c.stdin
                .take()
                .unwrap()
                .write_all(b"table inet portcullis_fallback {}\n")?;
            c.wait()
        })
        .unwrap();
    let _d = Daemon::start(&pair.host, &config).unwrap();
    assert!(fallback_table(&pair.host).is_none());
}

const APP_RULES: &str = "[[ingress_rules]]\nid = \"app\"\nfrom_port = 8080\nto_port = 8080\n\
     [[egress_rules]]\nid = \"out\"\nfrom_port = 5000\nto_port = 5000\nip_ranges = [\"10.200.0.0/24\"]\n";

/// Lockdown used to run a rule set without egress rules, which switched an
/// egress allowlist off; and it kept every open session, an intruder's
/// included, for days.
#[test]
fn lockdown_narrows_egress_and_cuts_sessions_not_from_the_admin_network() {
    require_root!();
    let pair = Pair::new().unwrap();
    let pins = PinDir::new().unwrap();
    let config = ConfigFile::new(&config_text(&pins, APP_RULES)).unwrap();
    let _d = Daemon::start(&pair.host, &config).unwrap();
    tcp_echo_server(&pair.host, sock(HOST_V4, 8080)).unwrap();
    let admitted = udp_bind(&pair.peer, sock(PEER_V4, 5000)).unwrap();
    let unlisted = udp_bind(&pair.peer, sock(PEER_V4, 6000)).unwrap();
    let egress = |sock_: &std::net::UdpSocket, port| {
        udp_send(&pair.host, sock(PEER_V4, port), b"out").unwrap();
        udp_received(sock_)
    };
    assert!(egress(&admitted, 5000), "the egress rule does not admit");
    assert!(!egress(&unlisted, 6000), "the allowlist is not on");
    let mut session = tcp_connect(&pair.peer, sock(HOST_V4, 8080)).unwrap();
    echo_roundtrip(&mut session, b"before\n").unwrap();

    json(cli(
        &config,
        &["--json", "lockdown", "--admin", "10.200.99.0/24"],
    ));
    assert!(
        !egress(&unlisted, 6000),
        "lockdown widened egress: an unlisted destination was reached"
    );
    assert!(
        echo_roundtrip(&mut session, b"during\n").is_err(),
        "lockdown kept a session not from the admin network"
    );
    json(cli(&config, &["--json", "enforce"]));
    assert!(!egress(&unlisted, 6000));
    assert!(egress(&admitted, 5000));
}

/// Review finding (session 10): a change made in lockdown put the lockdown
/// set of the rules it replaced into the kernel, so an egress rule the
/// operator removed in lockdown still let its traffic out until `enforce`.
#[test]
fn an_egress_rule_removed_in_lockdown_stops_admitting_at_once() {
    require_root!();
    let pair = Pair::new().unwrap();
    let pins = PinDir::new().unwrap();
    let config = ConfigFile::new(&config_text(&pins, APP_RULES)).unwrap();
    let _d = Daemon::start(&pair.host, &config).unwrap();
    let admitted = udp_bind(&pair.peer, sock(PEER_V4, 5000)).unwrap();
    let egress = || {
        udp_send(&pair.host, sock(PEER_V4, 5000), b"out").unwrap();
        udp_received(&admitted)
    };
    assert!(egress(), "the egress rule does not admit");
    json(cli(
        &config,
        &["--json", "lockdown", "--admin", "10.200.99.0/24"],
    ));
    assert!(egress(), "lockdown keeps the live egress allowlist");
    json(cli(&config, &["--json", "rules", "remove", "out"]));
    assert!(
        !egress(),
        "an egress rule removed in lockdown still let its traffic out"
    );
}

/// Review finding: without egress rules, lockdown left outbound allow-all,
/// so an intruder's program kept beaconing out (each datagram opened a flow
/// whose replies came back). In lockdown outbound is an allowlist too.
#[test]
fn lockdown_stops_new_outbound_flows_even_without_egress_rules() {
    require_root!();
    let pair = Pair::new().unwrap();
    let pins = PinDir::new().unwrap();
    let config = ConfigFile::new(&config_text(&pins, "[ssh]\nallow = true\n")).unwrap();
    let _d = Daemon::start(&pair.host, &config).unwrap();
    let c2 = udp_bind(&pair.peer, sock(PEER_V4, 6001)).unwrap();
    let beacon = || {
        udp_send(&pair.host, sock(PEER_V4, 6001), b"beacon").unwrap();
        udp_received(&c2)
    };
    assert!(beacon(), "outbound is allow-all before the lockdown");
    json(cli(
        &config,
        &["--json", "lockdown", "--admin", "10.200.99.0/24"],
    ));
    assert!(!beacon(), "a new outbound flow left the host in lockdown");
    json(cli(&config, &["--json", "enforce"]));
    assert!(beacon());
}

/// A lockdown that admits nobody must not outlive a reboot: it would be a
/// lockout that only a console can end. It does survive a daemon restart.
#[test]
fn a_lockdown_without_admin_survives_a_restart_but_not_a_reboot() {
    require_root!();
    let pair = Pair::new().unwrap();
    let pins = PinDir::new().unwrap();
    let config = ConfigFile::new(&config_text(&pins, "[ssh]\nallow = true\n")).unwrap();
    let d = Daemon::start(&pair.host, &config).unwrap();
    json(cli(&config, &["--json", "lockdown", "--no-admin"]));
    d.kill();
    let d = Daemon::start(&pair.host, &config).unwrap();
    let status = json(cli(&config, &["--json", "status"]));
    assert_eq!(
        status["mode"]["mode"], "lockdown",
        "a restart ended lockdown"
    );
    d.kill();
    // As after a reboot: the saved mode comes from another boot.
    let mode = config.state_dir().join("mode.json");
    let mut saved: Value = serde_json::from_slice(&fs::read(&mode).unwrap()).unwrap();
    saved["boot_id"] = Value::from("00000000-0000-0000-0000-000000000000");
    fs::write(&mode, saved.to_string()).unwrap();
    let d = Daemon::start(&pair.host, &config).unwrap();
    let status = json(cli(&config, &["--json", "status"]));
    assert_eq!(
        status["mode"]["mode"],
        "enforce",
        "an admin-less lockdown outlived the boot\n{}",
        d.log()
    );
    TcpServer::start(&pair.host, sock(HOST_V4, 22)).unwrap();
    assert!(tcp_probe(&pair.peer, sock(HOST_V4, 22)).is_ok());
}

/// Reads what the daemon tells the service manager until `want` is seen.
fn notified(sock: &UnixDatagram, want: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut all = String::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        if let Ok(n) = sock.recv(&mut buf) {
            all.push_str(&String::from_utf8_lossy(&buf[..n]));
            all.push('\n');
            if all.contains(want) {
                return all;
            }
        }
    }
    panic!("no {want:?} from the daemon; it sent:\n{all}");
}

/// `interfaces = [a missing one]` used to send READY=1 with
/// `STATUS=enforcing on 0 interface(s)` while a port was reachable.
#[test]
fn ready_is_not_claimed_for_a_missing_interface_and_it_is_protected_when_it_appears() {
    require_root!();
    const LATE: &str = "pclate0";
    let pair = Pair::new().unwrap();
    let pins = PinDir::new().unwrap();
    let config = ConfigFile::new(&format!(
        "interfaces = [\"{LATE}\"]\npin_dir = \"{}\"\n[ssh]\nallow = true\n",
        pins.path().display()
    ))
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let _d = Daemon::start_with_env(
        &pair.host,
        &config,
        &[("NOTIFY_SOCKET", notify_path.to_str().unwrap())],
    )
    .unwrap();
    let sent = notified(&notify, "READY=1");
    let status_line = sent
        .lines()
        .find(|l| l.starts_with("STATUS="))
        .unwrap_or_default()
        .to_string();
    assert!(
        status_line.contains("not protected: pclate0 missing"),
        "READY=1 came with {status_line:?}"
    );
    let status = json(cli(&config, &["--json", "status"]));
    assert_eq!(status["enforcing"], false);
    assert_eq!(status["missing_interfaces"][0], LATE);
    let wait = cli(&config, &["wait-ready", "--timeout", "1"]);
    let said =
        String::from_utf8_lossy(&wait.stderr).into_owned() + &String::from_utf8_lossy(&wait.stdout);
    assert!(
        !wait.status.success() && said.contains("pclate0 missing"),
        "{said}"
    );

    // The interface appears (networkd creating it later, say): protected.
    veth(&pair.host, LATE, &pair.peer, "pclate1").unwrap();
    addresses(&pair.host, LATE, "10.200.7.1/24", "fd00:200:7::1/64").unwrap();
    addresses(&pair.peer, "pclate1", "10.200.7.2/24", "fd00:200:7::2/64").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while json(cli(&config, &["--json", "status"]))["enforcing"] != true {
        assert!(
            Instant::now() < deadline,
            "the late interface was not protected"
        );
        thread::sleep(Duration::from_millis(100));
    }
    TcpServer::start(&pair.host, sock("10.200.7.1", 9999)).unwrap();
    TcpServer::start(&pair.host, sock("10.200.7.1", 22)).unwrap();
    assert!(tcp_probe_control(&pair.peer, sock("10.200.7.1", 22)).is_ok());
    assert!(tcp_probe(&pair.peer, sock("10.200.7.1", 9999)).is_err());
}

/// A damaged `pending.json` used to be loaded without a checksum or
/// validation, and panicked the daemon at the rollback deadline.
#[test]
fn a_damaged_pending_change_is_refused_at_start_not_a_panic_at_the_deadline() {
    require_root!();
    let pair = Pair::new().unwrap();
    let pins = PinDir::new().unwrap();
    let config = ConfigFile::new(&config_text(&pins, "[ssh]\nallow = true\n")).unwrap();
    let d = Daemon::start(&pair.host, &config).unwrap();
    d.kill();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    // The rules to roll back to hold a CIDR with host bits set, which no
    // validated rule set can.
    let previous = serde_json::json!({
        "ingress_rules": [{"id": "x", "from_port": 1, "to_port": 2, "ip_ranges": ["10.1.2.3/8"]}],
        "egress_rules": [],
        "ssh": {"allow": true, "sources": []}
    });
    let pending = serde_json::json!({
        "previous": previous, "previous_allow_ping": false, "generation": 2, "deadline": now + 2,
    });
    fs::write(config.state_dir().join("pending.json"), pending.to_string()).unwrap();
    let mut d = Daemon::start(&pair.host, &config).unwrap();
    thread::sleep(Duration::from_secs(4));
    assert!(d.running(), "the daemon died:\n{}", d.log());
    let log = d.log();
    assert!(
        log.contains("pending.json") && log.contains("cannot be restored"),
        "{log}"
    );
    let status = json(cli(&config, &["--json", "status"]));
    assert!(status["pending"].is_null(), "{status}");
    let audit = fs::read_to_string(config.state_dir().join("audit.log")).unwrap();
    assert!(audit.contains("restore pending change"), "{audit}");
}

/// A truncated audit log used to be continued silently.
#[test]
fn a_truncated_audit_log_is_reported_and_the_break_recorded() {
    require_root!();
    let pair = Pair::new().unwrap();
    let pins = PinDir::new().unwrap();
    let config = ConfigFile::new(&config_text(&pins, "[ssh]\nallow = true\n")).unwrap();
    let d = Daemon::start(&pair.host, &config).unwrap();
    for port in ["7001", "7002", "7003"] {
        json(cli(
            &config,
            &[
                "--json",
                "rules",
                "add",
                "--id",
                port,
                "--from-port",
                port,
                "--to-port",
                port,
            ],
        ));
    }
    d.kill();
    let log_path = config.state_dir().join("audit.log");
    let text = fs::read_to_string(&log_path).unwrap();
    let kept: Vec<&str> = text.lines().collect();
    fs::write(&log_path, kept[..kept.len() - 1].join("\n") + "\n").unwrap();
    let d = Daemon::start(&pair.host, &config).unwrap();
    let log = d.log();
    assert!(log.contains("the audit log is damaged"), "{log}");
    let text = fs::read_to_string(&log_path).unwrap();
    let last = text.lines().last().unwrap();
    assert!(
        last.contains("open audit log") && last.contains("truncated"),
        "{last}"
    );
}

/// `[ssh] ports = [22, 2222]`: the exemption, readiness, lockdown and the
/// check that refuses to cut the caller's own session all follow the ports.
#[test]
fn ssh_on_2222_and_22_together() {
    require_root!();
    let pair = Pair::new().unwrap();
    let pins = PinDir::new().unwrap();
    let config = ConfigFile::new(&config_text(
        &pins,
        "[ssh]\nallow = true\nports = [22, 2222]\n",
    ))
    .unwrap();
    let _d = Daemon::start(&pair.host, &config).unwrap();
    for port in [22, 2222, 2223] {
        TcpServer::start(&pair.host, sock(HOST_V4, port)).unwrap();
        TcpServer::start(&pair.host, sock(HOST_V6, port)).unwrap();
    }
    assert!(tcp_probe(&pair.peer, sock(HOST_V4, 22)).is_ok());
    assert!(tcp_probe(&pair.peer, sock(HOST_V4, 2222)).is_ok());
    assert!(tcp_probe(&pair.peer, sock(HOST_V6, 2222)).is_ok());
    assert!(tcp_probe(&pair.peer, sock(HOST_V4, 2223)).is_err());
    let status = json(cli(&config, &["--json", "status"]));
    let checks = status["readiness"]["checks"].as_array().unwrap();
    let check = |name: &str| {
        checks
            .iter()
            .find(|c| c["name"] == name)
            .cloned()
            .unwrap_or_default()
    };
    assert_eq!(check("listening")["state"], "pass", "{status}");
    assert!(
        check("admitted")["detail"]
            .as_str()
            .unwrap()
            .contains("exemption"),
        "{status}"
    );
    // The anti-lockout check knows a session on 2222 is SSH.
    let bin = workspace_bin("portcullis").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("only-22.json");
    fs::write(&file, r#"{"ssh": {"allow": true, "ports": [22]}}"#).unwrap();
    let refused = Command::new(&bin)
        .env("SSH_CONNECTION", format!("{PEER_V4} 50022 {HOST_V4} 2222"))
        .arg("--socket")
        .arg(config.socket())
        .args(["rules", "apply"])
        .arg(&file)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && err.contains("would cut your own SSH session"),
        "{err}"
    );
    // Lockdown admits the admin on every SSH port, and nothing else.
    json(cli(&config, &["--json", "lockdown", "--admin", PEER_V4]));
    assert!(tcp_probe(&pair.peer, sock(HOST_V4, 2222)).is_ok());
    assert!(tcp_probe(&pair.peer, sock(HOST_V4, 22)).is_ok());
    assert!(tcp_probe(&pair.peer, sock(HOST_V4, 2223)).is_err());
}

fn rule_ids(config: &ConfigFile) -> Vec<String> {
    json(cli(config, &["--json", "rules", "get"]))["ingress_rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect()
}

fn add_unconfirmed(config: &ConfigFile, id: &str, secs: &str) {
    json(cli(
        config,
        &[
            "--json",
            "--confirm-within",
            secs,
            "rules",
            "add",
            "--id",
            id,
            "--from-port",
            "7100",
            "--to-port",
            "7100",
        ],
    ));
}

fn wait_until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not within {secs} s");
        thread::sleep(Duration::from_millis(200));
    }
}

const FAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// A wall-clock step back (NTP correcting a fast clock, say) used to stall
/// a rollback: the timer fired, then compared the Unix time with the
/// deadline and did nothing, leaving an unconfirmed change live for good.
#[test]
fn a_clock_step_does_not_stall_a_rollback() {
    require_root!();
    assert!(
        std::path::Path::new(FAKETIME).exists(),
        "libfaketime is missing (cargo xtask setup installs it)"
    );
    let pair = Pair::new().unwrap();
    let pins = PinDir::new().unwrap();
    let config = ConfigFile::new(&config_text(&pins, "[ssh]\nallow = true\n")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let clock = dir.path().join("faketime");
    fs::write(&clock, "+0\n").unwrap();
    let _d = Daemon::start_with_env(
        &pair.host,
        &config,
        &[
            ("LD_PRELOAD", FAKETIME),
            ("FAKETIME_TIMESTAMP_FILE", clock.to_str().unwrap()),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
            ("FAKETIME_NO_CACHE", "1"),
        ],
    )
    .unwrap();
    // (5 s: the clock must step before the rollback is due.)
    add_unconfirmed(&config, "trial", "5");
    assert_eq!(rule_ids(&config), ["trial"]);
    // The daemon's wall clock steps an hour back.
    fs::write(&clock, "-1h\n").unwrap();
    wait_until("the unconfirmed change rolled back", 10, || {
        rule_ids(&config).is_empty()
    });
    let status = json(cli(&config, &["--json", "status"]));
    assert!(status["pending"].is_null(), "{status}");
    // The step was real: the rollback's audit record is an hour "early".
    let audit = fs::read_to_string(config.state_dir().join("audit.log")).unwrap();
    let rolled: Value = audit
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|r| r["outcome"].as_str().unwrap_or("").contains("rolled back"))
        .expect("no rollback record");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(rolled["time"].as_u64().unwrap() + 3000 < now, "{rolled}");
}

/// A rollback that fails (the state directory cannot be written) used to
/// drop the pending change: nothing would ever roll it back. It must stay
/// pending and be rolled back once the cause is gone.
#[test]
fn a_failed_rollback_keeps_the_change_pending_and_retries() {
    require_root!();
    let pair = Pair::new().unwrap();
    let pins = PinDir::new().unwrap();
    let config = ConfigFile::new(&config_text(&pins, "[ssh]\nallow = true\n")).unwrap();
    let d = Daemon::start(&pair.host, &config).unwrap();
    add_unconfirmed(&config, "trial", "2");
    let state = config.state_dir();
    let chattr = |flag: &str| {
        let ok = Command::new("chattr")
            .arg(flag)
            .arg(&state)
            .status()
            .unwrap()
            .success();
        assert!(ok, "chattr {flag}");
    };
    chattr("+i");
    thread::sleep(Duration::from_secs(4));
    let failed = d.log().contains("rollback failed");
    let still = rule_ids(&config);
    let pending = json(cli(&config, &["--json", "status"]))["pending"].clone();
    chattr("-i");
    assert!(failed, "the rollback did not fail:\n{}", d.log());
    assert_eq!(still, ["trial"]);
    assert_eq!(pending["generation"], 2, "the pending change was lost");
    wait_until("the retried rollback", 15, || rule_ids(&config).is_empty());
}

/// A change used to go live before its audit record was written: with the
/// log unwritable, a rule was admitted (traffic passed) although the caller
/// got an error and the log held no record of it. Now nothing goes live
/// unaudited.
#[test]
fn nothing_goes_live_without_its_audit_record() {
    require_root!();
    let pair = Pair::new().unwrap();
    let pins = PinDir::new().unwrap();
    let config = ConfigFile::new(&config_text(&pins, "[ssh]\nallow = true\n")).unwrap();
    let _d = Daemon::start(&pair.host, &config).unwrap();
    TcpServer::start(&pair.host, sock(HOST_V4, 7300)).unwrap();
    assert!(tcp_probe(&pair.peer, sock(HOST_V4, 7300)).is_err());
    // A first, audited change, so the log exists.
    json(cli(
        &config,
        &[
            "--json",
            "rules",
            "add",
            "--id",
            "first",
            "--from-port",
            "7301",
            "--to-port",
            "7301",
        ],
    ));
    let log = config.state_dir().join("audit.log");
    let chattr = |flag: &str| {
        assert!(
            Command::new("chattr")
                .arg(flag)
                .arg(&log)
                .status()
                .unwrap()
                .success()
        )
    };
    chattr("+i");
    let out = cli(
        &config,
        &[
            "rules",
            "add",
            "--id",
            "unaudited",
            "--from-port",
            "7300",
            "--to-port",
            "7300",
        ],
    );
    let reached = tcp_probe(&pair.peer, sock(HOST_V4, 7300)).is_ok();
    let ids = rule_ids(&config);
    chattr("-i");
    assert!(
        !out.status.success(),
        "the change was acknowledged unaudited"
    );
    assert!(!reached, "an unaudited rule went live");
    assert_eq!(ids, ["first"], "an unaudited rule is in the live set");
    // With the log writable again, the same change goes live, recorded
    // before it did.
    json(cli(
        &config,
        &[
            "--json",
            "rules",
            "add",
            "--id",
            "audited",
            "--from-port",
            "7300",
            "--to-port",
            "7300",
        ],
    ));
    assert!(tcp_probe(&pair.peer, sock(HOST_V4, 7300)).is_ok());
    let text = fs::read_to_string(&log).unwrap();
    assert!(
        text.lines().any(|l| l.contains("applying: generation 3")),
        "{text}"
    );
}

/// A second `portcullisd` on the same pin directory (run by hand beside the
/// service, say) used to load, rewrite the live maps with its own rules and
/// open what the first enforced; one on the same state directory would
/// fork the audit chain and overwrite the live set. Each is now refused,
/// exits without touching anything (no fallback: the first enforces), and
/// names the directory and the daemon that holds it.
#[test]
fn a_second_daemon_on_the_same_pins_or_state_is_refused_and_changes_nothing() {
    require_root!();
    let pair = Pair::new().unwrap();
    let pins = PinDir::new().unwrap();
    let config = ConfigFile::new(&config_text(&pins, "")).unwrap();
    let first = Daemon::start(&pair.host, &config).unwrap();
    TcpServer::start(&pair.host, sock(HOST_V4, 8080)).unwrap();
    assert!(tcp_probe(&pair.peer, sock(HOST_V4, 8080)).is_err());
    let before = json(cli(&config, &["--json", "status"]));

    // Same pins, its own state: its rules would admit 8080.
    let intruder = ConfigFile::new(&config_text(&pins, APP_RULES)).unwrap();
    // Own pins, the first one's state directory.
    let other_pins = PinDir::new().unwrap();
    let thief = ConfigFile::new(&config_text(&other_pins, APP_RULES)).unwrap();
    std::os::unix::fs::symlink(config.state_dir(), thief.state_dir()).unwrap();
    // A configuration that does not load: the fallback's nftables table
    // would go over the first one's enforcement.
    let broken = ConfigFile::new("interfaces = [").unwrap();
    std::os::unix::fs::symlink(config.state_dir(), broken.state_dir()).unwrap();
    for (second, dir) in [
        (&intruder, pins.path().to_owned()),
        // Named as it was given (the link to the first one's).
        (&thief, thief.state_dir()),
        (&broken, broken.state_dir()),
    ] {
        let d = Daemon::spawn(&pair.host, second, &[]).unwrap();
        let (status, log) = d.expect_exit().unwrap();
        assert!(!status.success(), "{log}");
        let names = format!(
            "{} is in use by another portcullisd, pid {}",
            dir.display(),
            first.pid()
        );
        assert!(log.contains(&names), "{names}:\n{log}");
        assert!(!second.socket().exists(), "{log}");
        assert!(fallback_table(&pair.host).is_none(), "{log}");
    }
    // Detaching under the running daemon would leave it reporting
    // enforcement that is gone: refused.
    let out = detach(&pair.host, &config);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--detach is for a stopped daemon"),
        "{err}"
    );
    assert!(tcp_probe(&pair.peer, sock(HOST_V4, 8080)).is_err());
    let after = json(cli(&config, &["--json", "status"]));
    assert_eq!(after["generation"], before["generation"], "{after}");
    assert_eq!(after["hash"], before["hash"], "{after}");
    assert_eq!(after["audit_head"], before["audit_head"], "{after}");
    assert!(rule_ids(&config).is_empty());

    // A local user cannot hold the claim to keep the daemon from starting:
    // it can flock a directory it can open (pins left world-searchable, as
    // older versions made them), but not the root-only lock file.
    drop(first);
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(pins.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let as_nobody = |args: &[&str]| {
        let mut cmd = Command::new("setpriv");
        cmd.args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "flock",
            "-n",
        ])
        .args(args);
        cmd
    };
    let unique = pins
        .path()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let lock_file = fs::read_dir("/run/portcullis")
        .unwrap()
        .map(|e| e.unwrap().path().to_string_lossy().into_owned())
        .find(|p| p.contains(&format!("/{unique}-")))
        .expect("the pins' lock file");
    assert!(fs::metadata(&lock_file).is_ok(), "{lock_file}");
    let taken = as_nobody(&[&lock_file, "true"]).output().unwrap();
    assert!(!taken.status.success(), "a local user locked {lock_file}");
    let pins_path = pins.path().to_string_lossy().into_owned();
    let mut holder = as_nobody(&[&pins_path, "sleep", "30"]).spawn().unwrap();
    thread::sleep(Duration::from_millis(300));
    assert!(
        holder.try_wait().unwrap().is_none(),
        "the user holds the pins"
    );
    let again = Daemon::start(&pair.host, &config);
    let _ = holder.kill();
    let _ = holder.wait();
    again.unwrap();
    assert!(tcp_probe(&pair.peer, sock(HOST_V4, 8080)).is_err());
}
