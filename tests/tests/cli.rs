//! The CLI as an operator uses it (issue 21 item 4), against a real daemon
//! protecting a real namespace: ufw-style `allow`, the numbered rule list,
//! removal by number, sentences for changes, `status` with its exit codes,
//! the pending window and the pinned state, `watch` with filters, errors
//! for people and for scripts.

use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use portcullis_tests::*;

macro_rules! require_root {
    () => {
        if !is_root() {
            eprintln!("skipped: needs root");
            return;
        }
    };
}

/// Fields drop in order: the daemon first, then the pins, then the
/// namespaces.
struct Env {
    daemon: Option<Daemon>,
    config: ConfigFile,
    pins: PinDir,
    pair: Pair,
}

impl Env {
    fn new(rest: &str) -> Env {
        let pair = Pair::new().unwrap();
        let pins = PinDir::new().unwrap();
        let config = ConfigFile::new(&config_text(&pins, rest)).unwrap();
        let daemon = Daemon::start(&pair.host, &config).unwrap();
        Env {
            daemon: Some(daemon),
            config,
            pins,
            pair,
        }
    }

    fn cli(&self, args: &[&str]) -> Output {
        portcullis(&self.config, args)
    }

    /// A command that must succeed; what it printed.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(out.status.success(), "portcullis {args:?}: {}", said(&out));
        said(&out)
    }

    fn reached(&self, port: u16) -> bool {
        tcp_probe(&self.pair.peer, sock(HOST_V4, port)).is_ok()
    }
}

/// The CLI, as root, without our own SSH session (the test runner may have
/// one).
fn portcullis(config: &ConfigFile, args: &[&str]) -> Output {
    Command::new(workspace_bin("portcullis").unwrap())
        .env_remove("SSH_CONNECTION")
        .arg("--socket")
        .arg(config.socket())
        .args(args)
        .output()
        .unwrap()
}

fn said(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// The generation a sentence names (`Generation 3 is live`).
fn generation_in(text: &str) -> u64 {
    let rest = text
        .split("eneration ")
        .nth(1)
        .unwrap_or_else(|| panic!("no generation in {text:?}"));
    rest.split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no generation in {text:?}"))
}

/// `allow 8080/tcp` opens the port to real traffic, `rules list` shows it
/// numbered with its hits, `rules remove 1` closes it again.
#[test]
fn allow_opens_a_port_the_list_numbers_it_and_remove_by_number_closes_it() {
    require_root!();
    let env = Env::new("[ssh]\nallow = true\n");
    TcpServer::start(&env.pair.host, sock(HOST_V4, 8080)).unwrap();
    assert!(!env.reached(8080), "8080 was open before allow");

    let out = env.ok(&["allow", "8080/tcp"]);
    assert!(
        out.contains("Added rule tcp-8080: tcp 8080 from any address. Generation "),
        "{out}"
    );
    assert!(out.contains("It cut no open connection."), "{out}");
    let g = generation_in(&out);
    assert!(!out.contains('{'), "raw JSON in a change's output: {out}");
    assert!(env.reached(8080), "allow 8080/tcp did not open the port");

    let list = env.ok(&["rules", "list"]);
    let row = list
        .lines()
        .find(|l| l.contains("tcp-8080"))
        .unwrap_or_else(|| panic!("{list}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        &cells[..6],
        ["1", "tcp-8080", "in", "tcp", "8080", "any"],
        "{list}"
    );
    let hits: u64 = cells[6].parse().unwrap();
    assert!(hits >= 1, "the connection is not counted as a hit: {list}");
    assert!(list.contains(&format!("Generation {g}")), "{list}");
    for alias in ["ls", "show", "get"] {
        assert_eq!(env.ok(&["rules", alias]), env.ok(&["rules", "list"]));
    }

    let out = env.ok(&["rules", "remove", "1"]);
    assert!(
        out.contains("Removed rule 1 (tcp-8080: tcp 8080 from any address)"),
        "{out}"
    );
    assert_eq!(generation_in(&out), g + 1, "{out}");
    assert!(!env.reached(8080), "rules remove 1 left 8080 open");
    assert!(env.ok(&["rules", "list"]).contains("No rules"));

    // Ranges, UDP, the TCP default said aloud, a source, remove by id.
    let out = env.ok(&["allow", "8000:8100/udp", "--from", "10.200.0.0/24"]);
    assert!(
        out.contains("Added rule udp-8000-8100: udp 8000-8100 from 10.200.0.0/24"),
        "{out}"
    );
    let out = env.ok(&["allow", "22"]);
    assert!(
        out.contains("22: TCP"),
        "the TCP default is not said: {out}"
    );
    let list = env.ok(&["rules", "list"]);
    assert!(
        list.contains("udp-8000-8100") && list.contains("tcp-22"),
        "{list}"
    );
    env.ok(&["rules", "delete", "udp-8000-8100"]);
    assert!(!env.ok(&["rules", "list"]).contains("udp-8000-8100"));
}

/// Port 0 and ids with odd characters are refused, naming the rule and the
/// field in words, without transport details; nothing changes.
#[test]
fn port_zero_and_odd_ids_are_refused_naming_rule_and_field() {
    require_root!();
    let env = Env::new("[ssh]\nallow = true\n");
    let before = generation_in(&env.ok(&["rules", "list"]));

    let out = env.cli(&[
        "rules",
        "add",
        "--id",
        "zero",
        "--from-port",
        "0",
        "--to-port",
        "0",
    ]);
    let text = said(&out);
    assert!(!out.status.success(), "port 0 accepted: {text}");
    assert!(
        text.contains("ingress rule \"zero\": to_port: port 0 is not a port"),
        "{text}"
    );

    let out = env.cli(&[
        "rules",
        "add",
        "--id",
        "web server",
        "--from-port",
        "80",
        "--to-port",
        "80",
    ]);
    let text = said(&out);
    assert!(!out.status.success(), "an id with a space accepted: {text}");
    assert!(
        text.contains("ingress rule \"web server\": id: ' ' is not allowed"),
        "{text}"
    );
    for noise in ["HTTP", "422", "[0]", "_rules["] {
        assert!(!text.contains(noise), "transport detail {noise:?}: {text}");
    }

    let out = env.cli(&["allow", "0/tcp"]);
    assert!(!out.status.success(), "{}", said(&out));
    assert!(said(&out).contains("port 0"), "{}", said(&out));
    assert_eq!(generation_in(&env.ok(&["rules", "list"])), before);
}

/// `--json` makes errors JSON too, for scripts; the exit status says it
/// failed.
#[test]
fn json_errors_are_json() {
    require_root!();
    let env = Env::new("[ssh]\nallow = true\n");
    let out = env.cli(&["--json", "rules", "remove", "nosuch"]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty(), "{}", said(&out));
    let doc: serde_json::Value = serde_json::from_slice(&out.stderr)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", said(&out)));
    assert_eq!(doc["error"], "no rule with id \"nosuch\"", "{doc}");
    assert_eq!(doc["status"], 404, "{doc}");
    let out = env.cli(&[
        "--json",
        "rules",
        "add",
        "--id",
        "a/b",
        "--from-port",
        "1",
        "--to-port",
        "2",
    ]);
    assert!(!out.status.success());
    let doc: serde_json::Value = serde_json::from_slice(&out.stderr)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", said(&out)));
    assert!(doc["error"].as_str().unwrap().contains("id:"), "{doc}");
    assert_eq!(doc["status"], 422, "{doc}");
    // `deny` is not possible yet: said plainly, not a panic nor a success.
    let out = env.cli(&["deny", "8080/tcp"]);
    assert!(!out.status.success());
    assert!(said(&out).contains("not supported yet"), "{}", said(&out));
    assert!(!said(&out).contains("panicked"));
}

/// Change commands speak in sentences: a dry run says "would"; a change
/// with a confirmation window says when it rolls back (local time, in N
/// s) and how to confirm; `status` shows the window, and after a rollback,
/// the rollback.
#[test]
fn changes_are_sentences_and_status_shows_the_window_and_the_rollback() {
    require_root!();
    let env = Env::new("[ssh]\nallow = true\n");
    let out = env.ok(&["allow", "9000/tcp", "--dry-run"]);
    assert!(
        out.contains(
            "Dry run: would add rule tcp-9000: tcp 9000 from any address. Nothing changed"
        ),
        "{out}"
    );
    assert!(out.contains("It would cut no open connection."), "{out}");
    assert!(!env.ok(&["rules", "list"]).contains("tcp-9000"));

    let out = env.ok(&["allow", "9000/tcp", "--confirm-within", "60"]);
    assert!(
        out.contains("Unconfirmed: rolls back at ") && out.contains("(in 60 s)")
            || out.contains("(in 59 s)"),
        "{out}"
    );
    assert!(out.contains("confirm with: portcullis confirm"), "{out}");
    let g = generation_in(&out);
    let status = env.cli(&["status"]);
    let text = said(&status);
    assert!(
        text.contains(&format!("Pending:     generation {g} rolls back at ")),
        "{text}"
    );
    assert!(text.contains(" s) unless confirmed"), "{text}");
    let out = env.ok(&["confirm"]);
    assert!(
        out.contains(&format!("Confirmed: generation {g} stays")),
        "{out}"
    );
    assert!(said(&env.cli(&["status"])).contains("Pending:     nothing awaits confirmation"));

    // Not confirmed: rolled back, and status says so.
    let out = env.ok(&["allow", "9001/tcp", "--confirm-within", "1"]);
    let g = generation_in(&out);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = said(&env.cli(&["status"]));
        if text.contains(&format!("Rolled back: generation {g} at ")) {
            assert!(text.contains("(not confirmed in time)"), "{text}");
            break;
        }
        assert!(Instant::now() < deadline, "no rollback shown:\n{text}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(!env.ok(&["rules", "list"]).contains("tcp-9001"));
}

/// `status` exits 3 when the host is not protected: an interface missing,
/// or an emergency mode that drops nothing.
#[test]
fn status_exits_non_zero_when_not_protected() {
    require_root!();
    let pair = Pair::new().unwrap();
    let pins = PinDir::new().unwrap();
    let config = ConfigFile::new(&format!(
        "interfaces = [\"{HOST_IFACE}\", \"pcgone0\"]\npin_dir = \"{}\"\n[ssh]\nallow = true\n",
        pins.path().display()
    ))
    .unwrap();
    let _d = Daemon::start(&pair.host, &config).unwrap();
    let out = portcullis(&config, &["status"]);
    assert_eq!(out.status.code(), Some(3), "{}", said(&out));
    assert!(
        said(&out).contains("Protected:   NO (not protected: pcgone0 missing)"),
        "{}",
        said(&out)
    );

    let env = Env::new("[ssh]\nallow = true\n");
    let out = env.cli(&["status"]);
    assert_eq!(out.status.code(), Some(0), "{}", said(&out));
    env.ok(&["mode", "open"]);
    let out = env.cli(&["status"]);
    assert_eq!(out.status.code(), Some(3), "{}", said(&out));
    assert!(said(&out).contains("OPEN mode"), "{}", said(&out));
}

/// With the daemon stopped, `status` reports what the pins still enforce
/// (exit 4), and the pins do still filter.
#[test]
fn status_without_the_daemon_reports_the_pinned_state() {
    require_root!();
    let mut env = Env::new("[ssh]\nallow = true\n");
    TcpServer::start(&env.pair.host, sock(HOST_V4, 8080)).unwrap();
    env.daemon.take().unwrap().kill();
    let out = env.cli(&["status", "--pin-dir", env.pins.path().to_str().unwrap()]);
    let text = said(&out);
    assert_eq!(out.status.code(), Some(4), "{text}");
    assert!(
        text.contains(&format!(
            "daemon not running; enforcement pinned on {HOST_IFACE} (filtering continues"
        )),
        "{text}"
    );
    assert!(!env.reached(8080), "the pins stopped filtering");
    // Nothing pinned: said too.
    let empty = tempfile::tempdir().unwrap();
    let out = env.cli(&["status", "--pin-dir", empty.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(4));
    assert!(said(&out).contains("nothing pinned"), "{}", said(&out));
}

/// `watch` prints local times and the interface, and its filters let only
/// the matching drops through.
#[test]
fn watch_shows_local_times_and_filters() {
    require_root!();
    let env = Env::new("[ssh]\nallow = true\n");
    let mut child = Command::new(workspace_bin("portcullis").unwrap())
        .arg("--socket")
        .arg(env.config.socket())
        .args(["watch", "--port", "9090", "--reason", "drop_no_rule"])
        .args(["--source", "10.200.0.0/24"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let header = rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(
        header,
        format!("Drops on {HOST_IFACE} (sampled; Ctrl-C ends):")
    );
    std::thread::sleep(Duration::from_millis(300));
    let _ = tcp_probe(&env.pair.peer, sock(HOST_V4, 9091));
    let _ = tcp_probe(&env.pair.peer, sock(HOST_V4, 9090));
    let line = rx.recv_timeout(Duration::from_secs(5));
    let _ = child.kill();
    let _ = child.wait();
    let line = line.unwrap();
    // 2026-11-30 10:01:02.345 ingress pc0 10.200.0.2:40000 -> 10.200.0.1:9090 tcp (drop_no_rule)
    let (date, rest) = line.split_once(' ').unwrap();
    assert!(
        date.len() == 10 && date.chars().filter(|c| *c == '-').count() == 2,
        "{line}"
    );
    let (time, rest) = rest.split_once(' ').unwrap();
    assert!(
        time.len() == 12 && time.contains(':') && time.contains('.'),
        "{line}"
    );
    assert!(
        rest.starts_with(&format!("ingress {HOST_IFACE} {PEER_V4}:"))
            && rest.ends_with(&format!("-> {HOST_V4}:9090 tcp (drop_no_rule)")),
        "{line}"
    );
    // The drop to 9091 came first and was left out.
    assert!(!line.contains(":9091"), "{line}");
}

/// `counters`: the columns line up, and a removed rule is not listed.
#[test]
fn counters_align_and_leave_out_removed_rules() {
    require_root!();
    let env = Env::new("[ssh]\nallow = true\n");
    TcpServer::start(&env.pair.host, sock(HOST_V4, 8080)).unwrap();
    env.ok(&["allow", "8080/tcp"]);
    assert!(env.reached(8080));
    let out = env.ok(&["counters"]);
    assert!(out.contains("rule:tcp-8080"), "{out}");
    env.ok(&["rules", "remove", "tcp-8080"]);
    let out = env.ok(&["counters"]);
    assert!(
        !out.contains("rule:tcp-8080"),
        "a removed rule is listed:\n{out}"
    );
    let table: Vec<&str> = out
        .lines()
        .skip_while(|l| !l.starts_with("REASON"))
        .take_while(|l| !l.is_empty())
        .collect();
    assert!(table.len() > 10, "{out}");
    // Where each cell ends (numbers are right-aligned) or starts (text).
    let cells = |l: &str| -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        let mut start = None;
        for (i, c) in l.char_indices().chain(std::iter::once((l.len(), ' '))) {
            match (c == ' ', start) {
                (false, None) => start = Some(i),
                (true, Some(s)) => {
                    out.push((s, i));
                    start = None;
                }
                _ => {}
            }
        }
        out
    };
    let head = cells(table[0]);
    for l in &table {
        let c = cells(l);
        assert_eq!(c.len(), 4, "{l}");
        assert!(
            c[0].0 == head[0].0
                && c[1].1 == head[1].1
                && c[2].1 == head[2].1
                && c[3].0 == head[3].0,
            "columns not aligned:\n{}",
            table.join("\n")
        );
    }
    // REASON PACKETS BYTES VERDICT: the count second (as scripts read it),
    // the daemon's verdict last.
    let row = |name: &str| -> Vec<&str> {
        table
            .iter()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name}:\n{out}"))
            .split_whitespace()
            .collect()
    };
    assert_eq!(row("drop_no_rule")[3], "drop", "{out}");
    assert_eq!(row("pass_rule")[3], "pass", "{out}");
    assert!(row("pass_rule")[1].parse::<u64>().unwrap() >= 1, "{out}");
}

/// The audit log is under `audit-log`; `audit verify` still works.
#[test]
fn the_audit_log_is_shown_and_verified() {
    require_root!();
    let env = Env::new("[ssh]\nallow = true\n");
    env.ok(&["allow", "8080/tcp"]);
    let dir = env.config.state_dir();
    let dir = dir.to_str().unwrap();
    let out = env.ok(&["audit-log", "show", "--state-dir", dir]);
    assert!(out.contains("add rule") && out.contains("applied"), "{out}");
    assert!(
        env.ok(&["audit-log", "verify", "--state-dir", dir])
            .contains("intact")
    );
    assert!(
        env.ok(&["audit", "verify", "--state-dir", dir])
            .contains("intact")
    );
}

/// The everyday tasks as a new operator types them, run for real. With
/// `PORTCULLIS_WRITE_TRANSCRIPT=<file>` the session is written there (how
/// docs/operator-transcript.txt is made).
#[test]
fn operator_transcript() {
    require_root!();
    let env = Env::new("[ssh]\nallow = true\n");
    TcpServer::start(&env.pair.host, sock(HOST_V4, 8080)).unwrap();
    let mut transcript = String::from(
        "# The everyday tasks as a new operator types them, run for real against a test\n\
         # daemon protecting interface pc0 of a network namespace (no D-Bus there, so the\n\
         # SSH unit checks say unknown). Made by:\n\
         #   PORTCULLIS_WRITE_TRANSCRIPT=$PWD/docs/operator-transcript.txt \\\n\
         #     cargo test -p portcullis-tests --test cli operator_transcript\n\n",
    );
    let mut step = |args: &[&str], note: &str| -> String {
        let out = env.cli(args);
        let text = said(&out);
        if !note.is_empty() {
            transcript.push_str(&format!("# {note}\n"));
        }
        let shown: Vec<String> = args
            .iter()
            .map(|a| {
                if a.contains(' ') {
                    format!("'{a}'")
                } else {
                    a.to_string()
                }
            })
            .collect();
        transcript.push_str(&format!("$ portcullis {}\n{text}", shown.join(" ")));
        if out.status.code() != Some(0) {
            transcript.push_str(&format!(
                "[exit status {}]\n",
                out.status.code().unwrap_or(-1)
            ));
        }
        transcript.push('\n');
        text
    };
    step(&["status"], "Is the host protected?");
    step(
        &["allow", "8080/tcp", "--dry-run"],
        "What would opening 8080 do?",
    );
    step(
        &["allow", "8080/tcp", "--description", "web app"],
        "Open it.",
    );
    step(
        &["allow", "8000:8100/udp", "--from", "10.200.0.0/24"],
        "A UDP range, from one network.",
    );
    let _ = tcp_probe(&env.pair.peer, sock(HOST_V4, 8080));
    step(
        &["rules", "list"],
        "The list, numbered, with hits (8080 was just used).",
    );
    step(&["rules", "remove", "2"], "Remove rule 2.");
    step(
        &["allow", "9000/tcp", "--confirm-within", "120"],
        "A risky change: rolled back unless confirmed.",
    );
    step(&["status"], "");
    step(&["confirm"], "");
    step(
        &["mode", "lockdown", "--admin", "10.200.0.2/32", "--dry-run"],
        "Emergency: what would a lockdown do?",
    );
    step(
        &["mode", "lockdown", "--admin", "10.200.0.2/32"],
        "Emergency: lockdown, SSH from the admin network only.",
    );
    step(&["mode", "enforce"], "And back.");
    step(
        &[
            "rules",
            "add",
            "--id",
            "bad id",
            "--from-port",
            "0",
            "--to-port",
            "0",
        ],
        "A mistake is refused, naming what is wrong.",
    );
    step(&["counters"], "");
    step(
        &[
            "audit-log",
            "show",
            "--state-dir",
            env.config.state_dir().to_str().unwrap(),
            "-n",
            "5",
        ],
        "Who changed what.",
    );
    // watch: follow drops for a moment (the peer tries a closed port).
    let mut child = Command::new(workspace_bin("portcullis").unwrap())
        .arg("--socket")
        .arg(env.config.socket())
        .args(["watch", "--port", "9090"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // A try every 300 ms until one is shown (the stream may take a while
    // to open on a loaded machine), for at most 5 s.
    let mut shown = String::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !shown.contains(":9090 tcp (drop_no_rule)") && std::time::Instant::now() < deadline {
        let _ = tcp_probe(&env.pair.peer, sock(HOST_V4, 9090));
        while let Ok(line) = rx.recv_timeout(Duration::from_millis(300)) {
            shown.push_str(&line);
            shown.push('\n');
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    transcript.push_str(&format!(
        "# Follow drops live (Ctrl-C ends).\n$ portcullis watch --port 9090\n{shown}^C\n"
    ));
    assert!(transcript.contains("Added rule tcp-8080"), "{transcript}");
    assert!(shown.contains(":9090 tcp (drop_no_rule)"), "{transcript}");
    if let Ok(path) = std::env::var("PORTCULLIS_WRITE_TRANSCRIPT") {
        let state_dir = env.config.state_dir();
        let transcript = transcript.replace(state_dir.to_str().unwrap(), "/var/lib/portcullis");
        std::fs::write(path, transcript).unwrap();
    }
}
