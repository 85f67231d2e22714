//! Attacks on the operator's paths of issue 21: runtime and permanent
//! rules, reloads, `rules save`. Each test performs the attack for real
//! against a running daemon; docs/security.md names them.

use std::process::Command;

use portcullis_tests::*;

macro_rules! require_root {
    () => {
        if !is_root() {
            eprintln!("skipped: needs root");
            return;
        }
    };
}

fn said(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout)
}

/// `portcullis ARGS` as a caller outside any SSH session (a console, a
/// script, `ExecReload=` under `systemctl reload`).
fn cli_no_session(config: &ConfigFile, args: &[&str]) -> std::process::Output {
    Command::new(workspace_bin("portcullis").unwrap())
        .env_remove("SSH_CONNECTION")
        .arg("--socket")
        .arg(config.socket())
        .args(args)
        .output()
        .unwrap()
}

/// `rules_file` is reloadable: a reload reads the saved rules from the
/// path the config names now. `rules save` used to write to the path the
/// daemon started with, say "a reload or reboot keeps it", and the next
/// reload (reading the new path, finding no saved file, and seeing no
/// runtime change since the save) silently dropped the saved rule.
#[test]
fn rules_save_writes_where_the_reloaded_config_reads() {
    require_root!();
    let pair = Pair::new().unwrap();
    let pins = PinDir::new().unwrap();
    let config = ConfigFile::new(&config_text(&pins, "[ssh]\nallow = true\n")).unwrap();
    let _d = Daemon::start(&pair.host, &config).unwrap();
    TcpServer::start(&pair.host, sock(HOST_V4, 8443)).unwrap();

    let moved = config
        .path()
        .parent()
        .unwrap()
        .join("perm")
        .join("rules.toml");
    config
        .rewrite(&config_text(
            &pins,
            &format!(
                "rules_file = \"{}\"\n[ssh]\nallow = true\n",
                moved.display()
            ),
        ))
        .unwrap();
    let out = cli_no_session(&config, &["reload"]);
    assert!(out.status.success(), "{}", said(&out));

    let out = cli_no_session(&config, &["allow", "8443/tcp"]);
    assert!(out.status.success(), "{}", said(&out));
    assert!(tcp_probe(&pair.peer, sock(HOST_V4, 8443)).is_ok());
    let out = cli_no_session(&config, &["rules", "save"]);
    assert!(out.status.success(), "{}", said(&out));
    assert!(
        said(&out).contains(&moved.display().to_string()),
        "rules save wrote elsewhere than the config's rules_file {}: {}",
        moved.display(),
        said(&out)
    );
    assert!(moved.exists(), "nothing saved at {}", moved.display());

    let out = cli_no_session(&config, &["reload"]);
    assert!(out.status.success(), "{}", said(&out));
    assert!(
        tcp_probe(&pair.peer, sock(HOST_V4, 8443)).is_ok(),
        "a reload after `rules save` dropped the saved rule: {}",
        said(&out)
    );
}

/// A reload whose caller has no SSH session the daemon can see
/// (`systemctl reload` runs `portcullis reload` under the service; SIGHUP
/// has no caller) used to turn SSH off under an operator's open SSH
/// session without a word: the self-lockout refusal only knew the
/// caller's own `SSH_CONNECTION`. Now every open session to the SSH ports
/// stands in for the caller (a declared session does not lift that): the
/// reload is refused, naming it, unless forced.
#[test]
fn a_reload_without_a_caller_session_does_not_lock_out_open_ssh_sessions() {
    require_root!();
    let pair = Pair::new().unwrap();
    let pins = PinDir::new().unwrap();
    let config = ConfigFile::new(&config_text(&pins, "[ssh]\nallow = true\n")).unwrap();
    let d = Daemon::start(&pair.host, &config).unwrap();
    TcpServer::start(&pair.host, sock(HOST_V4, 22)).unwrap();
    // An operator's session, open while the config is edited.
    let session = tcp_connect(&pair.peer, sock(HOST_V4, 22)).unwrap();
    let client_port = session.local_addr().unwrap().port();
    config
        .rewrite(&config_text(&pins, "[ssh]\nallow = false\n"))
        .unwrap();

    let out = cli_no_session(&config, &["reload"]);
    assert!(
        !out.status.success()
            && said(&out).contains(&format!("{PEER_V4} port {client_port}"))
            && said(&out).contains("--force"),
        "a reload without a caller session turned SSH off under an open session: {:?}: {}",
        out.status,
        said(&out)
    );
    assert!(
        tcp_probe(&pair.peer, sock(HOST_V4, 22)).is_ok(),
        "a refused reload turned SSH off"
    );
    // A session the caller declares (any writer may) does not lift it.
    let out = Command::new(workspace_bin("portcullis").unwrap())
        .env("SSH_CONNECTION", format!("10.200.0.99 40000 {HOST_V4} 22"))
        .arg("--socket")
        .arg(config.socket())
        .arg("reload")
        .output()
        .unwrap();
    assert!(
        !out.status.success() && said(&out).contains(&format!("{PEER_V4} port {client_port}")),
        "a declared session lifted the open-session check: {}",
        said(&out)
    );
    // SIGHUP takes the same path.
    let log = d.reload().unwrap();
    assert!(log.contains("reload refused"), "{log}");
    assert!(tcp_probe(&pair.peer, sock(HOST_V4, 22)).is_ok());

    // Explicit: forced.
    let out = cli_no_session(&config, &["--force", "reload"]);
    assert!(out.status.success(), "{}", said(&out));
    assert!(tcp_probe(&pair.peer, sock(HOST_V4, 22)).is_err());
    drop(session);
}

/// A reload never lifts a lockdown: the new rules become the live set, but
/// the data path keeps the lockdown's narrower set until `enforce`, also
/// with `--discard-runtime`. A dry run changes nothing: neither the data
/// path, nor the baseline (the runtime changes it names stay named).
#[test]
fn a_reload_never_lifts_lockdown_and_a_dry_run_changes_nothing() {
    require_root!();
    let pair = Pair::new().unwrap();
    let pins = PinDir::new().unwrap();
    let config = ConfigFile::new(&config_text(&pins, "[ssh]\nallow = true\n")).unwrap();
    let _d = Daemon::start(&pair.host, &config).unwrap();
    TcpServer::start(&pair.host, sock(HOST_V4, 8080)).unwrap();
    TcpServer::start(&pair.host, sock(HOST_V4, 8443)).unwrap();
    let runtime = |config: &ConfigFile| -> serde_json::Value {
        let out = cli_no_session(config, &["--json", "status"]);
        let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        s["runtime_changes"].clone()
    };
    // A runtime rule, then a config that brings another one.
    let out = cli_no_session(&config, &["allow", "8080/tcp"]);
    assert!(out.status.success(), "{}", said(&out));
    config
        .rewrite(&config_text(
            &pins,
            "[ssh]\nallow = true\n[[ingress_rules]]\nid = \"https\"\nfrom_port = 8443\nto_port = 8443\n",
        ))
        .unwrap();
    let before = runtime(&config);
    assert!(
        before.to_string().contains("tcp-8080"),
        "no runtime change named: {before}"
    );
    let out = cli_no_session(&config, &["--dry-run", "reload", "--discard-runtime"]);
    assert!(out.status.success(), "{}", said(&out));
    assert!(
        tcp_probe(&pair.peer, sock(HOST_V4, 8443)).is_err(),
        "a dry run applied"
    );
    assert!(
        tcp_probe(&pair.peer, sock(HOST_V4, 8080)).is_ok(),
        "a dry run discarded"
    );
    assert_eq!(runtime(&config), before, "a dry run moved the baseline");

    let out = cli_no_session(&config, &["lockdown", "--admin", "10.200.99.0/24"]);
    assert!(out.status.success(), "{}", said(&out));
    assert!(tcp_probe(&pair.peer, sock(HOST_V4, 8080)).is_err());
    // Refused (runtime changes), then discarded: the lockdown stays.
    let out = cli_no_session(&config, &["reload"]);
    assert!(!out.status.success(), "{}", said(&out));
    let out = cli_no_session(&config, &["reload", "--discard-runtime"]);
    assert!(out.status.success(), "{}", said(&out));
    let out = cli_no_session(&config, &["--json", "status"]);
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        s["mode"]["mode"], "lockdown",
        "a reload lifted the lockdown: {s}"
    );
    for port in [8443, 8080, 22] {
        assert!(
            tcp_probe(&pair.peer, sock(HOST_V4, port)).is_err(),
            "port {port} answered in lockdown after a reload"
        );
    }
    // Back to enforcing: the reloaded rules.
    let out = cli_no_session(&config, &["mode", "enforce"]);
    assert!(out.status.success(), "{}", said(&out));
    assert!(tcp_probe(&pair.peer, sock(HOST_V4, 8443)).is_ok());
    assert!(tcp_probe(&pair.peer, sock(HOST_V4, 8080)).is_err());
}

/// `rules remove N` names the rule of the list the caller read: the
/// removal carries that list's generation, and the daemon refuses it once
/// another writer has changed the list (the number may name another rule
/// by then). Nothing is removed.
#[test]
fn a_removal_by_number_is_refused_once_the_list_changed() {
    require_root!();
    let pair = Pair::new().unwrap();
    let pins = PinDir::new().unwrap();
    let config = ConfigFile::new(&config_text(&pins, "[ssh]\nallow = true\n")).unwrap();
    let _d = Daemon::start(&pair.host, &config).unwrap();
    TcpServer::start(&pair.host, sock(HOST_V4, 8080)).unwrap();
    assert!(
        cli_no_session(&config, &["allow", "8080/tcp"])
            .status
            .success()
    );
    let listed: serde_json::Value =
        serde_json::from_slice(&cli_no_session(&config, &["--json", "rules", "list"]).stdout)
            .unwrap();
    let generation = listed["generation"]
        .as_u64()
        .expect("generation in the list");
    // Another writer changes the list in between.
    assert!(
        cli_no_session(&config, &["allow", "8443/tcp"])
            .status
            .success()
    );
    let out = cli_no_session(
        &config,
        &[
            "rules",
            "remove",
            "1",
            "--expect-generation",
            &generation.to_string(),
        ],
    );
    assert!(
        !out.status.success() && said(&out).contains("someone else changed the rules"),
        "{}",
        said(&out)
    );
    assert!(
        tcp_probe(&pair.peer, sock(HOST_V4, 8080)).is_ok(),
        "a stale removal removed a rule"
    );
    // Against the current list it goes through.
    let out = cli_no_session(&config, &["rules", "remove", "1"]);
    assert!(out.status.success(), "{}", said(&out));
    assert!(tcp_probe(&pair.peer, sock(HOST_V4, 8080)).is_err());
}

/// `apt remove` prints the commands that lift enforcement, for the admin
/// to paste. Interface names come from the kernel, and a name may hold
/// `;`, `$`, `{`, quotes and globs (only `/`, `:` and white space are
/// refused): whoever named an interface `x;touch${IFS}p` got a command run
/// by the admin who pasted the line. The names are quoted now, and the
/// pasted line only lifts the filter.
#[test]
fn apt_remove_prints_commands_that_quote_interface_names() {
    require_root!();
    let ns = Netns::new("q").unwrap();
    let name = "x;touch${IFS}p";
    ns.ip(&["link", "add", name, "type", "veth", "peer", "name", "pcq1"])
        .unwrap();
    ns.ip(&["link", "set", name, "up"]).unwrap();
    ns.ip(&["link", "set", "pcq1", "up"]).unwrap();
    let pins = PinDir::new().unwrap();
    let config = ConfigFile::new(&format!(
        "interfaces = [\"{name}\"]\npin_dir = \"{}\"\ntc_attach = \"clsact\"\n",
        pins.path().display()
    ))
    .unwrap();
    let d = Daemon::start(&ns, &config).unwrap();
    drop(d);
    let filters = || {
        let out = Command::new("tc")
            .args(["-n", ns.name(), "filter", "show", "dev", name, "egress"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(
        filters().contains("pref 49374 "),
        "no clsact filter: {}",
        filters()
    );
    let postrm = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/debian/postrm");
    let cwd = tempfile::tempdir().unwrap();
    // `ip netns exec` shows the namespace's interfaces in /sys/class/net.
    let out = Command::new("ip")
        .args(["netns", "exec", ns.name(), "sh"])
        .arg(&postrm)
        .arg("remove")
        .current_dir(cwd.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", said(&out));
    let said = said(&out);
    let line = said
        .lines()
        .find(|l| l.contains("tc filter del"))
        .unwrap_or_else(|| panic!("no tc command printed: {said}"))
        .trim()
        .to_string();
    let run = Command::new("ip")
        .args(["netns", "exec", ns.name(), "sh", "-c", &line])
        .current_dir(cwd.path())
        .output()
        .unwrap();
    assert!(
        !cwd.path().join("p").exists(),
        "the printed command ran what the interface name says: {line}"
    );
    assert!(
        run.status.success() && !filters().contains("pref 49374 "),
        "the printed command did not lift the filter: {line}: {}",
        String::from_utf8_lossy(&run.stderr)
    );
}

/// The saved rules file replaces the config's rules: whoever can write it,
/// or create it in its directory, controls the firewall. A directory left
/// writable by others (a careless `chmod`) used to let `nobody` plant a
/// rules file that the next reload applied. Now the file and its
/// directory must be root's and writable by nobody else (as sshd's
/// StrictModes): the reload is refused, naming the problem.
#[test]
fn a_saved_rules_file_others_can_write_is_refused() {
    require_root!();
    let pair = Pair::new().unwrap();
    let pins = PinDir::new().unwrap();
    let config = ConfigFile::new(&config_text(&pins, "[ssh]\nallow = true\n")).unwrap();
    let _d = Daemon::start(&pair.host, &config).unwrap();
    TcpServer::start(&pair.host, sock(HOST_V4, 8443)).unwrap();
    let saved = config.path().parent().unwrap().join("saved");
    std::fs::create_dir(&saved).unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&saved, std::fs::Permissions::from_mode(0o777)).unwrap();
    let mut planted = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "sh",
            "-c",
        ])
        .arg("cat > \"$0\"")
        .arg(saved.join("rules.toml"))
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write as _;
        planted
            .stdin
            .take()
            .unwrap()
            .write_all(b"[[ingress_rules]]\nid = \"evil\"\nfrom_port = 8443\nto_port = 8443\n")
            .unwrap();
    }
    assert!(
        planted.wait().unwrap().success(),
        "nobody could not plant the file"
    );

    let out = cli_no_session(&config, &["reload"]);
    assert!(
        tcp_probe(&pair.peer, sock(HOST_V4, 8443)).is_err(),
        "a rules file planted by nobody was applied: {}",
        said(&out)
    );
    assert!(
        !out.status.success() && said(&out).contains("only root may write it"),
        "{}",
        said(&out)
    );
    // Nor does `rules save` write there (the next start would fail closed).
    std::fs::remove_file(saved.join("rules.toml")).unwrap();
    let out = cli_no_session(&config, &["rules", "save"]);
    assert!(
        !out.status.success() && said(&out).contains("only root may write it"),
        "rules save wrote into a directory others may write: {}",
        said(&out)
    );
    assert!(!saved.join("rules.toml").exists());
}

/// `nobody` runs `ARGS` through `sh -c SCRIPT`; whether it succeeded.
fn as_nobody(script: &str, args: &[&std::path::Path]) -> bool {
    Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "sh",
            "-c",
        ])
        .arg(script)
        .args(args)
        .status()
        .unwrap()
        .success()
}

/// A bpffs mounted without `mode=` is world-writable (1777, sticky): a
/// local user could make the pin directory before the daemon did; the
/// daemon used to pin into it, and the user, owning the directory, could
/// unpin the links, so that enforcement ended when the daemon next
/// stopped. Now the daemon refuses a pin directory that is not root's,
/// naming it, and the start fails closed (the nftables fallback).
#[test]
fn a_pin_directory_a_local_user_made_is_refused() {
    require_root!();
    let pair = Pair::new().unwrap();
    let pins = PinDir::new().unwrap();
    if !as_nobody("mkdir -p \"$0/links\"", &[pins.path()]) {
        eprintln!("skipped: the bpffs here is not writable by others (mounted with mode=0700)");
        return;
    }
    TcpServer::start(&pair.host, sock(HOST_V4, 22)).unwrap();
    TcpServer::start(&pair.host, sock(HOST_V4, 9999)).unwrap();
    let config = ConfigFile::new(&config_text(&pins, "[ssh]\nallow = true\n")).unwrap();
    let mut d = Daemon::spawn(&pair.host, &config, &[]).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while d.running() && !d.log().contains(" ready") {
        assert!(std::time::Instant::now() < deadline, "{}", d.log());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    if d.running() {
        // The attack: nobody unpins the links in its own directory; the
        // daemon's next stop ends enforcement.
        as_nobody("rm -rf \"$0\"/links/*", &[pins.path()]);
        drop(d);
        // The kernel lets the links go once the daemon's descriptors close.
        let open = (0..20).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(100));
            tcp_probe(&pair.peer, sock(HOST_V4, 9999)).is_ok()
        });
        panic!(
            "the daemon enforced from a pin directory nobody made; nobody unpinned the links and, once the daemon stopped, port 9999 {}",
            if open {
                "answered: enforcement ended"
            } else {
                "stayed closed"
            }
        );
    }
    let (status, log) = d.expect_exit().unwrap();
    let cleanup = || {
        pair.host
            .command("nft")
            .args(["delete", "table", "inet", "portcullis_fallback"])
            .status()
            .unwrap();
    };
    assert!(
        !status.success()
            && log.contains("owned by uid 65534")
            && log.contains("nftables fallback in place"),
        "{log}"
    );
    assert!(tcp_probe(&pair.peer, sock(HOST_V4, 9999)).is_err(), "{log}");
    assert!(tcp_probe(&pair.peer, sock(HOST_V4, 22)).is_ok(), "{log}");
    cleanup();
}

/// With the daemon down, `portcullis status` reads the pins. On a
/// world-writable bpffs a local user can make entries with the pins'
/// names: root's `status` used to report "enforcement pinned on pc0
/// (filtering continues)" from them while nothing filtered. Only root's
/// pins count now.
#[test]
fn status_does_not_take_a_local_users_entries_for_pins() {
    require_root!();
    let pins = PinDir::new().unwrap();
    if !as_nobody(
        "mkdir -p \"$0/links/xdp-pc0\" \"$0/links/tcx-pc0\"",
        &[pins.path()],
    ) {
        eprintln!("skipped: the bpffs here is not writable by others (mounted with mode=0700)");
        return;
    }
    let socket = tempfile::tempdir().unwrap();
    let out = Command::new(workspace_bin("portcullis").unwrap())
        .arg("--socket")
        .arg(socket.path().join("api.sock"))
        .args(["status", "--pin-dir"])
        .arg(pins.path())
        .output()
        .unwrap();
    let text = said(&out);
    assert_eq!(out.status.code(), Some(4), "{text}");
    assert!(
        !text.contains("enforcement pinned") && text.contains("Protected:   NO"),
        "status took nobody's entries for pins: {text}"
    );
}

/// A change awaiting confirmation is not made permanent or dropped by a
/// reload, a forced one or one that discards runtime changes, and `rules
/// save` refuses it: only `confirm` or the rollback decide it. The rollback
/// then restores what was live before it.
#[test]
fn a_reload_or_save_does_not_decide_a_change_awaiting_confirmation() {
    require_root!();
    let pair = Pair::new().unwrap();
    let pins = PinDir::new().unwrap();
    let config = ConfigFile::new(&config_text(&pins, "[ssh]\nallow = true\n")).unwrap();
    let _d = Daemon::start(&pair.host, &config).unwrap();
    TcpServer::start(&pair.host, sock(HOST_V4, 8080)).unwrap();
    let out = cli_no_session(&config, &["--confirm-within", "4", "allow", "8080/tcp"]);
    assert!(out.status.success(), "{}", said(&out));
    for args in [
        &["reload"][..],
        &["--force", "reload", "--discard-runtime"],
        &["rules", "save"],
    ] {
        let out = cli_no_session(&config, args);
        assert!(!out.status.success(), "{args:?}: {}", said(&out));
        assert!(
            tcp_probe(&pair.peer, sock(HOST_V4, 8080)).is_ok(),
            "{args:?} decided the pending change"
        );
    }
    assert!(
        !config
            .path()
            .parent()
            .unwrap()
            .join("saved/rules.toml")
            .exists()
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while tcp_probe(&pair.peer, sock(HOST_V4, 8080)).is_ok() {
        assert!(std::time::Instant::now() < deadline, "no rollback");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}
