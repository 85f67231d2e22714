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
