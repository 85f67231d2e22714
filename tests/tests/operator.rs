//! The operator's everyday experience (issue 21): the CLI and the journal
//! behave like the tools an operator already knows.

use std::process::{Command, Stdio};

use portcullis_tests::*;

macro_rules! require_root {
    () => {
        if !is_root() {
            eprintln!("skipped: needs root");
            return;
        }
    };
}

/// `portcullis status | head -1` used to panic ("failed printing to
/// stdout: Broken pipe") once `head` had gone.
#[test]
fn a_closed_pipe_ends_the_cli_quietly() {
    require_root!();
    let pair = Pair::new().unwrap();
    let pins = PinDir::new().unwrap();
    let config = ConfigFile::new(&config_text(&pins, "[ssh]\nallow = true\n")).unwrap();
    let _d = Daemon::start(&pair.host, &config).unwrap();
    let mut child = Command::new(workspace_bin("portcullis").unwrap())
        .arg("--socket")
        .arg(config.socket())
        .arg("status")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The reader goes away before the first line is written.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    use std::os::unix::process::ExitStatusExt as _;
    assert!(
        out.status.success() || out.status.signal() == Some(libc::SIGPIPE),
        "{:?}: {err}",
        out.status
    );
}

fn env_with(rest: &str) -> (Pair, PinDir, ConfigFile, Daemon) {
    let pair = Pair::new().unwrap();
    let pins = PinDir::new().unwrap();
    let config = ConfigFile::new(&config_text(&pins, rest)).unwrap();
    let daemon = Daemon::start(&pair.host, &config).unwrap();
    (pair, pins, config, daemon)
}

fn mode(config: &ConfigFile) -> String {
    let out = cli(config, &["--json", "status"]);
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    s["mode"]["mode"].as_str().unwrap_or_default().to_string()
}

fn said(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout)
}

/// `portcullis audit`, the natural guess for "show me the audit log", used
/// to switch the host to audit mode (everything passes). A bare ambiguous
/// word now prints help and changes nothing.
#[test]
fn a_bare_audit_changes_nothing() {
    require_root!();
    let (_pair, _pins, config, _d) = env_with("[ssh]\nallow = true\n");
    let out = cli(&config, &["audit"]);
    assert!(!out.status.success(), "{}", said(&out));
    assert!(said(&out).contains("verify"), "no help: {}", said(&out));
    assert_eq!(mode(&config), "enforce");
    // The mode is one explicit verb away.
    assert!(cli(&config, &["mode", "audit"]).status.success());
    assert_eq!(mode(&config), "audit");
}

/// `lockdown --dry-run` used to lock down for real; `--confirm-within` was
/// silently ignored; `lockdown` without `--admin` blocked SSH from
/// everywhere without a word.
#[test]
fn lockdown_honours_dry_run_refuses_what_it_cannot_do_and_asks_for_admin() {
    require_root!();
    let (pair, _pins, config, _d) = env_with("[ssh]\nallow = true\n");
    let out = cli(
        &config,
        &[
            "--json",
            "--dry-run",
            "lockdown",
            "--admin",
            "10.200.99.0/24",
        ],
    );
    assert!(out.status.success(), "{}", said(&out));
    assert!(said(&out).contains("\"dry_run\": true"), "{}", said(&out));
    assert_eq!(mode(&config), "enforce", "a dry run locked down");
    TcpServer::start(&pair.host, sock(HOST_V4, 22)).unwrap();
    assert!(tcp_probe(&pair.peer, sock(HOST_V4, 22)).is_ok());

    let out = cli(
        &config,
        &[
            "--confirm-within",
            "30",
            "lockdown",
            "--admin",
            "10.200.99.0/24",
        ],
    );
    assert!(
        !out.status.success() && said(&out).contains("confirm_within"),
        "{}",
        said(&out)
    );
    assert_eq!(mode(&config), "enforce");

    let out = cli(&config, &["lockdown"]);
    assert!(
        !out.status.success() && said(&out).contains("--admin"),
        "{}",
        said(&out)
    );
    assert_eq!(mode(&config), "enforce");
}

/// A lockdown whose admin network leaves out the caller's own SSH source
/// is refused unless forced, like every other self-lockout.
#[test]
fn lockdown_that_excludes_the_callers_ssh_session_is_refused() {
    require_root!();
    let (_pair, _pins, config, _d) = env_with("[ssh]\nallow = true\n");
    let lockdown = |admin: &str, force: bool| {
        let mut c = Command::new(workspace_bin("portcullis").unwrap());
        c.env("SSH_CONNECTION", format!("{PEER_V4} 50022 {HOST_V4} 22"))
            .arg("--socket")
            .arg(config.socket());
        if force {
            c.arg("--force");
        }
        c.args(["lockdown", "--admin", admin]).output().unwrap()
    };
    let out = lockdown("10.200.99.0/24", false);
    assert!(
        !out.status.success() && said(&out).contains("would cut your own SSH session"),
        "{}",
        said(&out)
    );
    assert_eq!(mode(&config), "enforce");
    let out = lockdown(&format!("{PEER_V4}/32"), false);
    assert!(out.status.success(), "{}", said(&out));
    assert_eq!(mode(&config), "lockdown");
    assert!(cli(&config, &["enforce"]).status.success());
    let out = lockdown("10.200.99.0/24", true);
    assert!(out.status.success(), "{}", said(&out));
    assert_eq!(mode(&config), "lockdown");
}

/// A rule file without an `ssh` key used to turn the SSH exemption off.
#[test]
fn a_rule_set_without_ssh_keeps_ssh_admitted() {
    require_root!();
    let (pair, _pins, config, _d) = env_with("[ssh]\nallow = true\n");
    TcpServer::start(&pair.host, sock(HOST_V4, 22)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("web.json");
    std::fs::write(
        &file,
        r#"{"ingress_rules": [{"id": "web", "from_port": 443, "to_port": 443, "ip_ranges": []}]}"#,
    )
    .unwrap();
    let out = cli(&config, &["rules", "apply", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", said(&out));
    assert!(
        tcp_probe(&pair.peer, sock(HOST_V4, 22)).is_ok(),
        "applying a rule set without ssh switched SSH off"
    );
}

/// Runtime and permanent (issue 21): a rule added at runtime used to be
/// dropped silently by a reload. Now the reload refuses and names it;
/// `rules save` makes it permanent (a reload then keeps it); and
/// `--discard-runtime` drops runtime changes explicitly, audited.
#[test]
fn a_runtime_rule_survives_reload_or_the_reload_refuses_naming_it() {
    require_root!();
    let (pair, _pins, config, d) = env_with("[ssh]\nallow = true\n");
    TcpServer::start(&pair.host, sock(HOST_V4, 8443)).unwrap();
    TcpServer::start(&pair.host, sock(HOST_V4, 8080)).unwrap();
    let add = |id: &str, port: &str| {
        let out = cli(
            &config,
            &[
                "rules",
                "add",
                "--id",
                id,
                "--from-port",
                port,
                "--to-port",
                port,
            ],
        );
        assert!(out.status.success(), "{}", said(&out));
    };
    add("https", "8443");
    assert!(tcp_probe(&pair.peer, sock(HOST_V4, 8443)).is_ok());

    // SIGHUP (the old `systemctl reload`) takes the same path.
    let log = d.reload().unwrap();
    assert!(
        log.contains("reload refused") && log.contains("+https"),
        "{log}"
    );
    assert!(
        tcp_probe(&pair.peer, sock(HOST_V4, 8443)).is_ok(),
        "a reload (SIGHUP) dropped the runtime rule"
    );

    let out = cli(&config, &["reload"]);
    assert!(
        !out.status.success()
            && said(&out).contains("+https (ingress tcp+udp 8443 from any)")
            && said(&out).contains("rules save"),
        "the reload did not refuse naming the runtime rule: {}",
        said(&out)
    );
    assert!(
        tcp_probe(&pair.peer, sock(HOST_V4, 8443)).is_ok(),
        "a refused reload dropped the runtime rule"
    );

    let status: serde_json::Value =
        serde_json::from_slice(&cli(&config, &["--json", "status"]).stdout).unwrap();
    assert_eq!(
        status["runtime_changes"],
        serde_json::json!(["+https (ingress tcp+udp 8443 from any)"]),
        "{status}"
    );
    let out = cli(&config, &["rules", "save"]);
    assert!(out.status.success(), "{}", said(&out));
    let saved = config.path().parent().unwrap().join("saved/rules.toml");
    let text = std::fs::read_to_string(&saved).unwrap();
    assert!(text.contains("https"), "{text}");
    let out = cli(&config, &["reload"]);
    assert!(out.status.success(), "{}", said(&out));
    assert!(
        tcp_probe(&pair.peer, sock(HOST_V4, 8443)).is_ok(),
        "a reload after rules save dropped the saved rule"
    );

    add("web", "8080");
    let out = cli(&config, &["reload", "--discard-runtime"]);
    assert!(
        out.status.success() && said(&out).contains("discarded runtime changes: +web"),
        "{}",
        said(&out)
    );
    assert!(tcp_probe(&pair.peer, sock(HOST_V4, 8080)).is_err());
    assert!(tcp_probe(&pair.peer, sock(HOST_V4, 8443)).is_ok());
    let log = std::fs::read_to_string(config.state_dir().join("audit.log")).unwrap();
    assert!(
        log.contains("discard runtime changes") && log.contains("discarded: +web"),
        "{log}"
    );
}

/// A config the reload refuses used to leave `systemctl reload` (SIGHUP)
/// at exit 0, saying nothing: `portcullis reload` is synchronous and fails
/// with the config's error.
#[test]
fn a_refused_config_makes_reload_exit_non_zero_with_the_error() {
    require_root!();
    let (pair, pins, config, _d) = env_with("[ssh]\nallow = true\n");
    config
        .rewrite(&config_text(
            &pins,
            "[ssh]\nallow = true\n[[ingress_rules]]\nid = \"x\"\nfrom_port = 5\nto_port = 4\n",
        ))
        .unwrap();
    let out = cli(&config, &["reload"]);
    assert!(
        !out.status.success()
            && said(&out).contains("from_port")
            && said(&out).contains("invalid config"),
        "{:?}: {}",
        out.status,
        said(&out)
    );
    TcpServer::start(&pair.host, sock(HOST_V4, 22)).unwrap();
    assert!(tcp_probe(&pair.peer, sock(HOST_V4, 22)).is_ok());
}

/// Changing `interfaces` and reloading used to log "reloaded" and change
/// nothing: the reload applies what it can (a new rule) and names what
/// needs a restart, in its answer and in the journal line.
#[test]
fn a_reload_names_the_settings_that_need_a_restart() {
    require_root!();
    let (pair, pins, config, d) = env_with("[ssh]\nallow = true\n");
    TcpServer::start(&pair.host, sock(HOST_V4, 8443)).unwrap();
    let text = config_text(
        &pins,
        "[ssh]\nallow = true\n[[ingress_rules]]\nid = \"https\"\nfrom_port = 8443\nto_port = 8443\n",
    )
    .replace("interfaces = [\"pc0\"]", "interfaces = [\"pc0\", \"pcnew\"]");
    config.rewrite(&text).unwrap();
    let out = cli(&config, &["--dry-run", "reload"]);
    assert!(
        out.status.success()
            && said(&out).contains("would reload")
            && said(&out).contains("+https"),
        "{}",
        said(&out)
    );
    assert!(
        tcp_probe(&pair.peer, sock(HOST_V4, 8443)).is_err(),
        "a dry run applied"
    );
    let out = cli(&config, &["reload"]);
    assert!(out.status.success(), "{}", said(&out));
    assert!(
        said(&out).contains("+https")
            && said(&out).contains("needs a restart")
            && said(&out).contains("interfaces"),
        "{}",
        said(&out)
    );
    assert!(tcp_probe(&pair.peer, sock(HOST_V4, 8443)).is_ok());
    assert!(
        d.log()
            .contains("reloaded: +https; needs a restart: interfaces"),
        "{}",
        d.log()
    );
}

/// Turning SSH off over an SSH session is a self-lockout even when the
/// session itself survives on its open flow: the next login would be
/// dropped. Refused without `--force`, and the refusal says `--force`.
#[test]
fn turning_ssh_off_over_an_ssh_session_is_refused_without_force() {
    require_root!();
    let pair = Pair::new().unwrap();
    let pins = PinDir::new().unwrap();
    let config = ConfigFile::new(&config_text(&pins, "[ssh]\nallow = true\n")).unwrap();
    // The session is open before the daemon starts: it is seeded into the
    // connection table, so it survives any rule change.
    TcpServer::start(&pair.host, sock(HOST_V4, 22)).unwrap();
    let session = tcp_connect(&pair.peer, sock(HOST_V4, 22)).unwrap();
    let client_port = session.local_addr().unwrap().port();
    let _d = Daemon::start(&pair.host, &config).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("no-ssh.json");
    std::fs::write(&file, r#"{"ssh": {"allow": false}}"#).unwrap();
    let apply = |force: bool| {
        let mut c = Command::new(workspace_bin("portcullis").unwrap());
        c.env(
            "SSH_CONNECTION",
            format!("{PEER_V4} {client_port} {HOST_V4} 22"),
        )
        .arg("--socket")
        .arg(config.socket());
        if force {
            c.arg("--force");
        }
        c.args(["rules", "apply"]).arg(&file).output().unwrap()
    };
    let out = apply(false);
    assert!(
        !out.status.success()
            && said(&out).contains("your next login would be dropped")
            && said(&out).contains("--force"),
        "{}",
        said(&out)
    );
    assert!(
        tcp_probe(&pair.peer, sock(HOST_V4, 22)).is_ok(),
        "a refused change turned SSH off"
    );
    let out = apply(true);
    assert!(out.status.success(), "{}", said(&out));
    assert!(tcp_probe(&pair.peer, sock(HOST_V4, 22)).is_err());
    drop(session);
}

/// Over a real SSH session (sshd in the protected namespace, the CLI run by
/// the login's shell with the SSH_CONNECTION sshd sets), a lockdown whose
/// admin network leaves out the session's source is refused; one that
/// includes it is applied.
#[test]
fn lockdown_over_a_real_ssh_session_refuses_to_exclude_it() {
    require_root!();
    let (pair, _pins, config, _d) = env_with("[ssh]\nallow = true\n");
    let sshd = Sshd::start(&pair.host).unwrap();
    let bin = workspace_bin("portcullis").unwrap();
    let remote = |admin: &str| {
        let command = format!(
            "{} --socket {} lockdown --admin {admin}",
            bin.display(),
            config.socket().display()
        );
        // Bounded: a lockdown that cuts this very session leaves the
        // client waiting on a dead connection.
        let mut child = sshd
            .client(&pair.peer, HOST_V4)
            .arg(command)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while child.try_wait().unwrap().is_none() {
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!("the SSH session running the lockdown hung: it was cut");
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        child.wait_with_output().unwrap()
    };
    let out = remote("10.200.99.0/24");
    assert!(
        !out.status.success() && said(&out).contains("would cut your own SSH session"),
        "{}",
        said(&out)
    );
    assert_eq!(mode(&config), "enforce");
    let out = remote(&format!("{PEER_V4}/32"));
    assert!(out.status.success(), "{}", said(&out));
    assert_eq!(mode(&config), "lockdown");
}
