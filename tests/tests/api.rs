//! The control API with the real daemon in a namespace, through the CLI and
//! through raw HTTP (curl): every endpoint, compare-and-swap, permissions by
//! peer credentials, bad and oversized requests, many concurrent clients.

use std::{
    process::{Command, Output},
    thread,
};

use portcullis_tests::*;
use serde_json::Value;

const RULES: &str =
    "[[ingress_rules]]\nid = \"app\"\nfrom_port = 8080\nto_port = 8080\nip_ranges = []\n";

struct Env {
    daemon: Option<Daemon>,
    config: ConfigFile,
    _pins: PinDir,
    pair: Pair,
}

impl Env {
    fn new(extra: &str) -> Self {
        let pair = Pair::new().unwrap();
        // These tests speak IPv4 only and count drops exactly; the peer's
        // own IPv6 chatter (multicast listener reports after its addresses
        // come up, dropped and counted at random moments) would add to
        // those counts.
        pair.peer
            .sysctl(&format!("net.ipv6.conf.{PEER_IFACE}.disable_ipv6"), "1")
            .unwrap();
        let pins = PinDir::new().unwrap();
        let config = ConfigFile::new(&config_text(&pins, &format!("{extra}\n{RULES}"))).unwrap();
        let daemon = Some(Daemon::start(&pair.host, &config).unwrap());
        Env {
            daemon,
            config,
            _pins: pins,
            pair,
        }
    }

    /// Runs the CLI (as root unless `as_user` is set, via setpriv).
    fn cli_as(&self, as_user: Option<&str>, args: &[&str]) -> Output {
        let bin = workspace_bin("portcullis").unwrap();
        let mut cmd = match as_user {
            None => Command::new(&bin),
            Some(groups) => {
                let mut c = Command::new("setpriv");
                c.args(["--reuid=65534", "--regid=65534"]);
                if groups.is_empty() {
                    c.arg("--clear-groups");
                } else {
                    c.arg(format!("--groups={groups}"));
                }
                c.arg(&bin);
                c
            }
        };
        cmd.arg("--socket")
            .arg(self.config.socket())
            .arg("--json")
            .args(args);
        cmd.output().unwrap()
    }

    fn cli(&self, args: &[&str]) -> Value {
        let out = self.cli_as(None, args);
        assert!(
            out.status.success(),
            "portcullis {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Raw HTTP with curl: (status, body).
    fn curl(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        let mut cmd = Command::new("curl");
        cmd.args(["-s", "-o", "-", "-w", "\n%{http_code}", "--unix-socket"])
            .arg(self.config.socket())
            .args(["-X", method, &format!("http://portcullis{path}")]);
        if let Some(b) = body {
            cmd.args(["-H", "content-type: application/json", "--data-binary", b]);
        }
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap();
        (code.parse().unwrap(), body.to_string())
    }

    fn reached(&self, port: u16) -> bool {
        tcp_probe(&self.pair.peer, sock(HOST_V4, port)).is_ok()
    }

    /// Waits until the peer reaches `port` again (a change rolled back for
    /// want of confirmation); panics after six seconds.
    fn wait_until_reached(&self, port: u16, what: &str) {
        let started = std::time::Instant::now();
        while !self.reached(port) {
            assert!(
                started.elapsed() < std::time::Duration::from_secs(6),
                "{what}"
            );
            thread::sleep(std::time::Duration::from_millis(200));
        }
    }
}

#[test]
fn every_endpoint_through_the_cli_and_raw_http() {
    require_root!();
    let env = Env::new("");
    for port in [8080, 9090] {
        TcpServer::start(&env.pair.host, sock(HOST_V4, port)).unwrap();
    }
    let status = env.cli(&["status"]);
    assert_eq!(status["enforcing"], true);
    assert_eq!(status["interfaces"]["pc0"], "native");
    assert_eq!(status["conntrack"]["capacity"], 65536);
    let flows_before = status["conntrack"]["entries"]
        .as_u64()
        .expect("conntrack usage");
    // An outbound flow shows up in the connection table's usage.
    udp_send(&env.pair.host, sock(PEER_V4, 5353), b"out").unwrap();
    let flows_after = env.cli(&["status"])["conntrack"]["entries"]
        .as_u64()
        .unwrap();
    assert_eq!(flows_after, flows_before + 1);
    let g0 = status["generation"].as_u64().unwrap();

    // Add a rule: traffic follows, the generation moves on.
    assert!(!env.reached(9090));
    let added = env.cli(&[
        "rules",
        "add",
        "--id",
        "web",
        "--from-port",
        "9090",
        "--to-port",
        "9090",
    ]);
    assert_eq!(added["generation"].as_u64().unwrap(), g0 + 1);
    assert!(env.reached(9090), "added rule not live");
    let rules = env.cli(&["rules", "get"]);
    assert_eq!(rules["ingress_rules"][1]["id"], "web");

    // Remove: gone again.
    let removed = env.cli(&["rules", "remove", "web"]);
    assert_eq!(removed["generation"].as_u64().unwrap(), g0 + 2);
    assert!(!env.reached(9090));

    // Replace the whole set in the Brev JSON shape, with compare-and-swap.
    let brev = r#"{"ingress_rules":[{"id":"only","from_port":9090,"to_port":9090,"ip_ranges":[]}],"egress_rules":[]}"#;
    let (code, body) = env.curl(
        "PUT",
        &format!("/v1/rules?expected_generation={g0}"),
        Some(brev),
    );
    assert_eq!(code, 409, "a stale generation must be refused: {body}");
    assert!(body.contains("expected"), "{body}");
    assert!(!env.reached(9090), "a refused change took effect");
    let (code, body) = env.curl(
        "PUT",
        &format!("/v1/rules?expected_generation={}", g0 + 2),
        Some(brev),
    );
    assert_eq!(code, 200, "{body}");
    assert!(env.reached(9090) && !env.reached(8080));

    // Peers.
    let peers = env.cli(&["peers", "add", "10.200.0.2/32", "--cluster", "c1"]);
    assert!(peers["generation"].as_u64().is_some());
    assert!(env.reached(8080), "peer not admitted on every port");
    assert_eq!(env.cli(&["peers", "list"])["peers"][0], "10.200.0.2/32");
    env.cli(&["peers", "replace", "10.9.9.9/32"]);
    assert!(!env.reached(8080));
    env.cli(&["peers", "remove", "10.9.9.9/32"]);
    let out = env.cli_as(None, &["peers", "remove", "10.9.9.9/32"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("10.9.9.9/32"));

    // Counters per reason and per rule; metrics.
    let counters = env.cli(&["counters"]);
    assert!(
        counters["reasons"]["drop_no_rule"]["packets"]
            .as_u64()
            .unwrap()
            >= 1
    );
    assert!(
        counters["rules"]["rule:only"]["packets"].as_u64().unwrap() >= 3,
        "{counters}"
    );
    let (code, metrics) = env.curl("GET", "/v1/metrics", None);
    assert_eq!(code, 200);
    assert!(
        metrics.contains("portcullis_packets_total{reason=\"drop_no_rule\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("portcullis_rule_packets_total{rule=\"rule:only\"}"),
        "{metrics}"
    );

    // The live set survives a restart (it was saved).
    let mut env = env;
    env.daemon.take().unwrap().kill();
    env.daemon = Some(Daemon::start(&env.pair.host, &env.config).unwrap());
    assert_eq!(env.cli(&["rules", "get"])["ingress_rules"][0]["id"], "only");
}

#[test]
fn bad_requests_get_a_precise_4xx_and_change_nothing() {
    require_root!();
    let env = Env::new("");
    let g = env.cli(&["status"])["generation"].as_u64().unwrap();
    for (method, path, body, want, says) in [
        (
            "PUT",
            "/v1/rules",
            Some("{not json"),
            400,
            "bad request body",
        ),
        (
            "PUT",
            "/v1/rules",
            Some(r#"{"ingress_rules":[{"id":"x","from_port":9,"to_port":1}]}"#),
            422,
            "from_port",
        ),
        (
            "PUT",
            "/v1/rules",
            Some(
                r#"{"ingress_rules":[{"id":"x","from_port":1,"to_port":2,"ip_ranges":["10.0.0.1/8"]}]}"#,
            ),
            422,
            "host bits",
        ),
        (
            "PUT",
            "/v1/rules",
            Some(r#"{"ingress_rules":[],"bogus":1}"#),
            422,
            "bogus",
        ),
        ("POST", "/v1/rules/sideways", Some("{}"), 400, ""),
        ("DELETE", "/v1/rule/nope", None, 404, "nope"),
        ("GET", "/v2/status", None, 404, "no such endpoint"),
        (
            "PUT",
            "/v1/rules?expected_generation=abc",
            Some("{}"),
            400,
            "",
        ),
    ] {
        let (code, reply) = env.curl(method, path, body);
        assert_eq!(code, want, "{method} {path}: {reply}");
        assert!(reply.contains(says), "{method} {path}: {reply}");
    }
    // Larger than the limit: refused before it is read whole.
    let huge = format!(
        "{{\"ingress_rules\":[],\"pad\":\"{}\"}}",
        "x".repeat(33 << 20)
    );
    let path = std::env::temp_dir().join(format!("huge-{}.json", std::process::id()));
    std::fs::write(&path, huge).unwrap();
    let (code, _) = env.curl("PUT", "/v1/rules", Some(&format!("@{}", path.display())));
    std::fs::remove_file(&path).unwrap();
    assert_eq!(code, 413);
    let status = env.cli(&["status"]);
    assert_eq!(
        status["generation"].as_u64().unwrap(),
        g,
        "a refused request changed the rules"
    );
}

#[test]
fn unprivileged_callers_may_read_but_not_write() {
    require_root!();
    // Writers: root and the members of group "users" (gid 100 on Debian).
    let env = Env::new("[api]\ngroup = \"users\"");
    // Without a reader group, a user in neither group cannot even connect.
    let nobody = env.cli_as(Some(""), &["status"]);
    assert!(
        !nobody.status.success()
            && String::from_utf8_lossy(&nobody.stderr).contains("cannot connect"),
        "reads are not open to everybody: {}",
        String::from_utf8_lossy(&nobody.stdout)
    );
    drop(env);
    // Readers: the members of group "nogroup" (uid 65534's own group).
    let env = Env::new("[api]\ngroup = \"users\"\nreader_group = \"nogroup\"");
    let nobody = env.cli_as(Some(""), &["status"]);
    assert!(
        nobody.status.success(),
        "readers may read: {}",
        String::from_utf8_lossy(&nobody.stderr)
    );
    let refused = env.cli_as(
        Some(""),
        &[
            "rules",
            "add",
            "--id",
            "x",
            "--from-port",
            "1",
            "--to-port",
            "2",
        ],
    );
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("uid 65534 may not change rules") && err.contains("403"),
        "{err}"
    );
    let status = env.cli(&["status"]);
    assert_eq!(status["refused_writes"], 1, "refusal not counted");
    assert!(
        env.daemon.as_ref().unwrap().log().contains("write refused"),
        "refusal not logged"
    );
    // The same user in the writers' group may.
    let member = env.cli_as(
        Some("100"),
        &[
            "rules",
            "add",
            "--id",
            "x",
            "--from-port",
            "1",
            "--to-port",
            "2",
        ],
    );
    assert!(
        member.status.success(),
        "{}",
        String::from_utf8_lossy(&member.stderr)
    );
}

#[test]
fn fifty_concurrent_clients_get_answers_and_generations_only_grow() {
    require_root!();
    let env = Env::new("");
    let results: Vec<Vec<u64>> = thread::scope(|s| {
        let handles: Vec<_> = (0..50)
            .map(|i| {
                let env = &env;
                s.spawn(move || {
                    let mut seen = Vec::new();
                    for round in 0..4 {
                        let status = env.cli(&["status"]);
                        assert!(status["generation"].as_u64().is_some());
                        let id = format!("c{i}-{round}");
                        let added = env.cli(&[
                            "rules",
                            "add",
                            "--id",
                            &id,
                            "--from-port",
                            "2000",
                            "--to-port",
                            "2001",
                        ]);
                        seen.push(added["generation"].as_u64().unwrap());
                    }
                    seen
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut all: Vec<u64> = results.iter().flatten().copied().collect();
    for seen in &results {
        assert!(
            seen.windows(2).all(|w| w[0] < w[1]),
            "a client saw generations go back: {seen:?}"
        );
    }
    all.sort_unstable();
    let n = all.len();
    all.dedup();
    assert_eq!(all.len(), n, "two changes got the same generation");
    let live = env.cli(&["rules", "get"]);
    assert_eq!(
        live["generation"].as_u64().unwrap(),
        *all.last().unwrap(),
        "live set is not the newest"
    );
    assert_eq!(live["ingress_rules"].as_array().unwrap().len(), 1 + 200);
}

/// Every change and refusal is in the audit log; `portcullis audit verify`
/// finds the log intact, and reports each kind of tampering with a copy.
#[test]
fn the_audit_log_records_changes_and_refusals_and_detects_tampering() {
    require_root!();
    // uid 65534 (group nogroup) may connect and read, not write.
    let env = Env::new("[api]\nreader_group = \"nogroup\"");
    env.cli(&[
        "rules",
        "add",
        "--id",
        "a",
        "--from-port",
        "1",
        "--to-port",
        "2",
    ]);
    env.cli(&[
        "rules",
        "add",
        "--id",
        "b",
        "--from-port",
        "3",
        "--to-port",
        "4",
    ]);
    let _ = env.cli_as(Some(""), &["rules", "remove", "a"]); // refused: nobody
    let _ = env.cli_as(None, &["rules", "remove", "zzz"]); // refused: no such rule
    env.cli(&["rules", "remove", "a"]);
    let state = env.config.state_dir();
    let log = std::fs::read_to_string(state.join("audit.log")).unwrap();
    let records: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // Each applied change is recorded twice: before it goes live
    // ("applying") and with its outcome.
    assert_eq!(records.len(), 8, "{log}");
    assert_eq!(records[0]["outcome"], "applying: generation 2", "{log}");
    assert_eq!(records[1]["outcome"], "applied", "{log}");
    assert!(
        records[4]["outcome"]
            .as_str()
            .unwrap()
            .starts_with("refused: uid 65534")
    );
    assert_eq!(records[4]["uid"], 65534);
    assert!(
        records[5]["outcome"]
            .as_str()
            .unwrap()
            .contains("no rule with id")
    );
    let head = env.cli(&["status"])["audit_head"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        records[7]["hash"],
        head.as_str(),
        "status does not report the latest record's hash"
    );

    let verify = |dir: &std::path::Path| {
        let out = Command::new(workspace_bin("portcullis").unwrap())
            .args(["audit", "verify", "--state-dir"])
            .arg(dir)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    assert_eq!(verify(&state), (true, String::new()));
    let lines: Vec<&str> = log.lines().collect();
    let tampered: [(&str, Vec<String>); 4] = [
        ("edited", {
            let mut l: Vec<String> = lines.iter().map(|s| s.to_string()).collect();
            l[1] = l[1]
                .replace("\"b\"", "\"c\"")
                .replace("uid\":0", "uid\":1000");
            l
        }),
        (
            "removed",
            lines
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != 2)
                .map(|(_, s)| s.to_string())
                .collect(),
        ),
        ("reordered", {
            let mut l: Vec<String> = lines.iter().map(|s| s.to_string()).collect();
            l.swap(1, 3);
            l
        }),
        (
            "truncated",
            lines[..3].iter().map(|s| s.to_string()).collect(),
        ),
    ];
    for (kind, content) in tampered {
        let copy = tempfile::tempdir().unwrap();
        std::fs::write(copy.path().join("audit.log"), content.join("\n") + "\n").unwrap();
        std::fs::copy(state.join("audit.head"), copy.path().join("audit.head")).unwrap();
        let (ok, report) = verify(copy.path());
        assert!(
            !ok && report.contains(kind),
            "{kind} not reported: {report}"
        );
    }
}

/// Dry runs change nothing and name the open flows a change would cut;
/// a change applied with a confirmation window and not confirmed is rolled
/// back on time (a confirmed one stays); a change that would cut the
/// caller's own SSH session is refused unless forced.
#[test]
fn dry_runs_confirmation_windows_and_anti_lockout_with_real_traffic() {
    require_root!();
    let env = Env::new("");
    tcp_echo_server(&env.pair.host, sock(HOST_V4, 8080)).unwrap();
    let mut open = tcp_connect(&env.pair.peer, sock(HOST_V4, 8080)).unwrap();
    echo_roundtrip(&mut open, b"hi\n").unwrap();
    let local_port = open.local_addr().unwrap().port();
    let g = env.cli(&["status"])["generation"].as_u64().unwrap();

    // Dry run.
    let dry = env.cli(&["rules", "remove", "app", "--dry-run"]);
    assert_eq!(dry["dry_run"], true);
    assert_eq!(dry["diff"]["removed"][0], "ingress:app");
    let cut = dry["would_cut"].as_array().unwrap();
    assert!(
        cut.iter()
            .any(|f| f == &Value::from(format!("tcp 10.200.0.2:{local_port} -> 10.200.0.1:8080"))),
        "{dry}"
    );
    assert_eq!(
        env.cli(&["status"])["generation"].as_u64().unwrap(),
        g,
        "a dry run changed the rules"
    );
    echo_roundtrip(&mut open, b"still\n").expect("a dry run cut the flow");

    // Confirmation window, not confirmed: rolled back on time. (4 s: a
    // dropped probe and a CLI call must fit inside it.)
    let applied = env.cli(&["rules", "remove", "app", "--confirm-within", "4"]);
    assert!(applied["confirm_by"].as_u64().is_some());
    assert!(!env.reached(8080), "the change was not applied");
    let busy = env.cli_as(
        None,
        &[
            "rules",
            "add",
            "--id",
            "x",
            "--from-port",
            "1",
            "--to-port",
            "1",
        ],
    );
    assert!(
        String::from_utf8_lossy(&busy.stderr).contains("awaits confirmation"),
        "changes must wait for the confirmation"
    );
    env.wait_until_reached(8080, "not rolled back in time");
    assert!(env.cli(&["status"]).get("pending").is_none());
    assert_eq!(env.cli(&["rules", "get"])["ingress_rules"][0]["id"], "app");
    let log = std::fs::read_to_string(env.config.state_dir().join("audit.log")).unwrap();
    assert!(log.contains("rolled back: not confirmed"), "{log}");

    // Confirmed: stays.
    env.cli(&["rules", "remove", "app", "--confirm-within", "2"]);
    env.cli(&["confirm"]);
    thread::sleep(std::time::Duration::from_secs(3));
    assert!(!env.reached(8080), "a confirmed change was rolled back");

    // Anti-lockout: the caller's SSH session (SSH_CONNECTION) would be cut.
    env.cli(&[
        "rules",
        "add",
        "--id",
        "ssh",
        "--from-port",
        "22",
        "--to-port",
        "22",
    ]);
    let bin = workspace_bin("portcullis").unwrap();
    let remove_ssh = |force: bool| {
        let mut c = Command::new(&bin);
        c.env("SSH_CONNECTION", "10.200.0.2 50022 10.200.0.1 22")
            .arg("--socket")
            .arg(env.config.socket())
            .args(["rules", "remove", "ssh"]);
        if force {
            c.arg("--force");
        }
        c.output().unwrap()
    };
    let refused = remove_ssh(false);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && err.contains("would cut your own SSH session"),
        "{err}"
    );
    assert_eq!(env.cli(&["rules", "get"])["ingress_rules"][0]["id"], "ssh");
    let forced = remove_ssh(true);
    assert!(
        forced.status.success(),
        "{}",
        String::from_utf8_lossy(&forced.stderr)
    );
}

/// A whole-set replace (`PUT /v1/rules`, which validates the new set while
/// the live one is unpacked on a second thread) honours the same options
/// and checks as a single edit: a dry run changes nothing, an unconfirmed
/// replace is rolled back on time, an expiry in the past is refused, and
/// the checks of added rules answer before the whole-set validation.
#[test]
fn a_replace_honours_dry_runs_confirmation_windows_expiries_and_check_order() {
    require_root!();
    let env = Env::new("");
    tcp_echo_server(&env.pair.host, sock(HOST_V4, 8080)).unwrap();
    assert!(env.reached(8080));
    let generation = || env.cli(&["status"])["generation"].as_u64().unwrap();
    let g = generation();
    let closed = r#"{"ingress_rules":[]}"#;

    // Dry run: reported, not applied.
    let (code, body) = env.curl("PUT", "/v1/rules?dry_run=true", Some(closed));
    assert_eq!(code, 200, "{body}");
    let dry: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(dry["dry_run"], true, "{body}");
    assert_eq!(dry["diff"]["removed"][0], "ingress:app", "{body}");
    assert_eq!(generation(), g, "a dry-run replace changed the rules");
    assert!(env.reached(8080), "a dry-run replace closed the port");

    // Confirmation window, not confirmed: rolled back on time.
    let (code, body) = env.curl("PUT", "/v1/rules?confirm_within=2", Some(closed));
    assert_eq!(code, 200, "{body}");
    let applied: Value = serde_json::from_str(&body).unwrap();
    assert!(applied["confirm_by"].as_u64().is_some(), "{body}");
    assert!(!env.reached(8080), "the replace was not applied");
    env.wait_until_reached(8080, "an unconfirmed replace was not rolled back in time");
    assert!(env.cli(&["status"]).get("pending").is_none());
    assert_eq!(env.cli(&["rules", "get"])["ingress_rules"][0]["id"], "app");
    let g = generation();

    // An expiry in the past: refused, nothing changes.
    let past = r#"{"ingress_rules":[{"id":"old","from_port":9000,"to_port":9000,"ip_ranges":[],"expires":"2020-01-01T00:00:00Z"}]}"#;
    let (code, body) = env.curl("PUT", "/v1/rules", Some(past));
    assert_eq!(code, 422, "{body}");
    assert!(
        body.contains(r#"ingress rule \"old\": expires"#) && body.contains("in the past"),
        "{body}"
    );

    // Rule 0 fails only the whole-set validation (ports reversed), rule 1
    // only the check of added rules (its id): the latter answers, as it
    // did before validation moved beside the unpack.
    let both = r#"{"ingress_rules":[{"id":"a","from_port":10,"to_port":5,"ip_ranges":[]},{"id":"b c","from_port":1,"to_port":1,"ip_ranges":[]}]}"#;
    let (code, body) = env.curl("PUT", "/v1/rules", Some(both));
    assert_eq!(code, 422, "{body}");
    assert!(
        body.contains(r#"ingress rule \"b c\": id"#) && !body.contains("from_port"),
        "the check of added rules must answer first: {body}"
    );
    assert_eq!(generation(), g, "a refused replace changed the rules");
    assert!(env.reached(8080), "a refused replace closed the port");
}

/// Emergency controls with real traffic: lockdown keeps open flows and the
/// admin's SSH and drops everything new; open and audit pass what enforce
/// drops, counting each such packet; enforce restores the rules.
#[test]
fn lockdown_open_and_audit_modes_with_real_traffic() {
    require_root!();
    // SSH is admitted before the lockdown: lockdown only narrows, so it
    // admits the admin network's SSH only where the live rules did.
    let env = Env::new("[ssh]\nallow = true\n");
    tcp_echo_server(&env.pair.host, sock(HOST_V4, 8080)).unwrap();
    TcpServer::start(&env.pair.host, sock(HOST_V4, 22)).unwrap();
    TcpServer::start(&env.pair.host, sock(HOST_V4, 9090)).unwrap();
    let mut open = tcp_connect(&env.pair.peer, sock(HOST_V4, 8080)).unwrap();
    echo_roundtrip(&mut open, b"before\n").unwrap();

    // Lockdown with an admin source.
    let out = env.cli(&["lockdown", "--admin", "10.200.0.2/32"]);
    assert!(out["generation"].as_u64().is_some());
    assert_eq!(env.cli(&["status"])["mode"]["mode"], "lockdown");
    assert!(!env.reached(8080), "lockdown admitted a new connection");
    echo_roundtrip(&mut open, b"during lockdown\n").expect("lockdown cut an open flow");
    assert!(env.reached(22), "the admin source lost SSH");
    env.cli(&["enforce"]);
    assert!(env.reached(8080) && env.reached(22));

    // Audit: what enforce drops passes, and each packet is counted.
    env.cli(&["mode", "audit"]);
    let c = env.cli(&["counters"]);
    let (drops, audited) = (
        c["reasons"]["drop_no_rule"]["packets"].as_u64().unwrap(),
        c["reasons"]["pass_audit"]["packets"].as_u64().unwrap(),
    );
    assert!(env.reached(9090), "audit mode dropped");
    let c = env.cli(&["counters"]);
    // SYN, ACK, RST: each would have been dropped, each was passed.
    assert_eq!(
        c["reasons"]["drop_no_rule"]["packets"].as_u64().unwrap(),
        drops + 3
    );
    assert_eq!(
        c["reasons"]["pass_audit"]["packets"].as_u64().unwrap(),
        audited + 3
    );

    // Open (emergency suspend), then back; the mode survives a restart.
    env.cli(&["open"]);
    assert!(env.reached(9090));
    let mut env = env;
    env.daemon.take().unwrap().kill();
    env.daemon = Some(Daemon::start(&env.pair.host, &env.config).unwrap());
    assert_eq!(env.cli(&["status"])["mode"]["mode"], "open");
    env.cli(&["enforce"]);
    assert!(!env.reached(9090), "enforce did not restore the rules");
    let log = std::fs::read_to_string(env.config.state_dir().join("audit.log")).unwrap();
    for m in ["lockdown", "audit", "open", "enforce"] {
        assert!(
            log.contains(&format!("set mode {{\\\"mode\\\":\\\"{m}\\\"")),
            "mode {m} not audited"
        );
    }
}

/// Drops are reported as events (address, ports, protocol, reason) to
/// `portcullis watch` and in status, rate-limited: a flood is counted in
/// full but reported in part.
#[test]
fn drop_events_reach_watch_and_status_rate_limited() {
    require_root!();
    use std::io::BufRead as _;
    let env = Env::new("");
    let mut watch = Command::new(workspace_bin("portcullis").unwrap())
        .arg("--socket")
        .arg(env.config.socket())
        .args(["--json", "watch"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = watch.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<Value>();
    thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if let Ok(v) = serde_json::from_str(&line) {
                let _ = tx.send(v);
            }
        }
    });
    let before = env.cli(&["counters"])["reasons"]["drop_no_rule"]["packets"]
        .as_u64()
        .unwrap();
    // A knock every 300 ms until one is reported: `watch` reports drops
    // from when its stream is open, which a loaded machine may take a
    // while to get to.
    let mut knocks = 0;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let event = 'found: loop {
        assert!(
            std::time::Instant::now() < deadline,
            "no event for {knocks} drops"
        );
        udp_send(&env.pair.peer, sock(HOST_V4, 9999), b"knock").unwrap();
        knocks += 1;
        let wait = std::time::Instant::now() + std::time::Duration::from_millis(300);
        while let Ok(e) = rx.recv_timeout(wait.saturating_duration_since(std::time::Instant::now()))
        {
            if e["destination_port"] == 9999 {
                break 'found e;
            }
        }
    };
    assert_eq!(event["source"], PEER_V4);
    assert_eq!(event["destination"], HOST_V4);
    assert_eq!(event["destination_port"], 9999);
    assert_eq!(event["protocol"], 17);
    assert_eq!(event["reason"], "drop_no_rule");
    assert_eq!(event["direction"], "ingress");
    let status = env.cli(&["status"]);
    assert!(
        status["recent_drops"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["destination_port"] == 9999),
        "{status}"
    );

    // A flood: every packet counted, only some reported.
    let flood = 3000;
    let s = env
        .pair
        .peer
        .enter(|| std::net::UdpSocket::bind("0.0.0.0:0"))
        .unwrap();
    // In bursts of 100 (a veth's ring holds 256 frames: a tight loop on a
    // loaded machine overruns it before the program sees them).
    for i in 0..flood {
        s.send_to(b"x", sock(HOST_V4, 9998)).unwrap();
        if i % 100 == 99 {
            thread::sleep(std::time::Duration::from_millis(2));
        }
    }
    let dropped = || {
        env.cli(&["counters"])["reasons"]["drop_no_rule"]["packets"]
            .as_u64()
            .unwrap()
            - before
            - knocks
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut counted = dropped();
    while counted < flood && std::time::Instant::now() < deadline {
        thread::sleep(std::time::Duration::from_millis(100));
        counted = dropped();
    }
    // The events of the last drops reach the watch within its next read.
    thread::sleep(std::time::Duration::from_millis(1000));
    let counted = counted.max(dropped());
    let reported = rx
        .try_iter()
        .filter(|e| e["destination_port"] == 9998)
        .count();
    let _ = watch.kill();
    let _ = watch.wait();
    eprintln!("flood: {counted} dropped and counted, {reported} reported");
    assert_eq!(counted, flood, "drops not all counted");
    assert!(reported >= 1, "the flood was not reported at all");
    assert!(
        reported < flood as usize / 2,
        "the event stream is not rate-limited ({reported})"
    );
}

/// A client that sends half a request and stalls gets a 408 when the
/// request time limit ends; other clients are served meanwhile.
#[test]
fn slow_requests_are_cut_off_without_affecting_others() {
    require_root!();
    use std::io::{Read as _, Write as _};
    let env = Env::new("[api]\nrequest_timeout_secs = 2");
    let mut slow = std::os::unix::net::UnixStream::connect(env.config.socket()).unwrap();
    slow.write_all(b"PUT /v1/rules HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"ingress").unwrap();
    let started = std::time::Instant::now();
    // Meanwhile the daemon answers others.
    assert_eq!(env.cli(&["status"])["enforcing"], true);
    slow.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut reply = String::new();
    let _ = slow.read_to_string(&mut reply);
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply:?}");
    assert!(started.elapsed() < std::time::Duration::from_secs(8));
    assert_eq!(
        env.cli(&["status"])["enforcing"],
        true,
        "the daemon was affected"
    );
}

/// Rule counters are read in batches (4096 slots a call): with 5000 rules,
/// the packets of the one rule that matched, in the second batch, are
/// credited to it, not to its neighbours, and they are carried across
/// later changes (which switch generations).
#[test]
fn rule_counters_land_on_their_rule_and_survive_changes() {
    require_root!();
    // Every rule on port 13500, each from its own source: the peer's for
    // rule p4500 only (a region's ports stay few).
    let rules: String = (0..5000)
        .map(|i: u32| {
            let from = if i == 4500 {
                format!("{PEER_V4}/32")
            } else {
                format!("10.9.{}.{}/32", i / 250, i % 250)
            };
            format!(
                "[[ingress_rules]]\nid = \"p{i}\"\nfrom_port = 13500\nto_port = 13500\nip_ranges = [\"{from}\"]\n"
            )
        })
        .collect();
    let env = Env::new(&rules);
    TcpServer::start(&env.pair.host, sock(HOST_V4, 13500)).unwrap();
    for _ in 0..3 {
        assert!(env.reached(13500));
    }
    let packets = |env: &Env, slot: &str| -> u64 {
        let (status, body) = env.curl("GET", "/v1/counters", None);
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        v["rules"][slot]["packets"].as_u64().unwrap_or(0)
    };
    let seen = packets(&env, "rule:p4500");
    assert!(seen >= 3, "rule:p4500 counted {seen} packets");
    assert_eq!(packets(&env, "rule:p4499"), 0);
    assert_eq!(packets(&env, "rule:p4501"), 0);
    // Two changes: the generation that counted goes idle, then is reused.
    for port in ["7001", "7002"] {
        env.cli(&[
            "rules",
            "add",
            "--id",
            &format!("x{port}"),
            "--from-port",
            port,
            "--to-port",
            port,
        ]);
        assert_eq!(packets(&env, "rule:p4500"), seen, "after adding x{port}");
    }
    assert!(env.reached(13500));
    assert!(packets(&env, "rule:p4500") > seen);
}

/// Rules appended one at a time (`POST /v1/rules/ingress`) are compiled as
/// a delta over the live generation's maps (the first after the start, and
/// after a whole change, makes the idle generation's IPv6 tables the live
/// one's first), and admit exactly what a whole compile would, with real
/// traffic: each rule its port from its sources only, a rule after a
/// removal (compiled whole) again as a delta.
#[test]
fn appended_rules_are_written_as_a_delta_and_admit_exactly_their_traffic() {
    require_root!();
    let env = Env::new("");
    for port in [8080, 9001, 9002, 9003] {
        tcp_echo_server(&env.pair.host, sock(HOST_V4, port)).unwrap();
    }
    let deltas = || {
        env.daemon
            .as_ref()
            .unwrap()
            .log()
            .matches("compiled as a delta over the live maps")
            .count()
    };
    let add = |id: &str, port: u16, source: &str| {
        let body = format!(
            r#"{{"id":"{id}","from_port":{port},"to_port":{port},"ip_ranges":["{source}"]}}"#
        );
        let (code, reply) = env.curl("POST", "/v1/rules/ingress", Some(&body));
        assert_eq!(code, 201, "{reply}");
    };
    assert!(!env.reached(9001));
    add("first", 9001, "10.200.0.2/32");
    assert_eq!(deltas(), 1, "the first add after the start was not a delta");
    assert!(env.reached(9001));
    add("second", 9002, "10.200.0.2/32");
    assert_eq!(deltas(), 2, "the second add was not a delta");
    assert!(env.reached(9002) && env.reached(9001));
    // A source elsewhere admits nothing from the peer; a wider one does.
    add("elsewhere", 9003, "10.200.0.99/32");
    assert!(
        !env.reached(9003),
        "a rule admitted a source outside its range"
    );
    add("wider", 9003, "10.200.0.0/24");
    assert_eq!(deltas(), 4);
    assert!(env.reached(9003));
    // A removal is compiled whole; the next add is a delta again.
    env.cli(&["rules", "remove", "second"]);
    assert!(!env.reached(9002), "a removed rule still admits");
    for port in [9001, 9003, 8080] {
        assert!(
            env.reached(port),
            "{port} after a removal: {}",
            env.daemon.as_ref().unwrap().log()
        );
    }
    add("again", 9002, "10.200.0.0/16");
    assert_eq!(deltas(), 5, "the add after a whole change was not a delta");
    assert!(env.reached(9002));
    // What was compiled as deltas is what a whole compile makes: the
    // rules as listed and their hash, after a restart too.
    let rules = env.cli(&["rules", "get"]);
    let ids: Vec<&str> = rules["ingress_rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["app", "first", "elsewhere", "wider", "again"]);
    let hash = env.cli(&["status"])["hash"].clone();
    let mut env = env;
    env.daemon.take().unwrap().terminate().unwrap();
    env.daemon = Some(Daemon::start(&env.pair.host, &env.config).unwrap());
    assert_eq!(env.cli(&["status"])["hash"], hash);
    assert!(env.reached(9001) && env.reached(9002) && env.reached(9003));
}

/// A delta changes no IPv6 table, so the first one after a whole change
/// makes the idle generation's IPv6 tables the live ones first: there,
/// the idle generation held the set before the last replace. IPv6
/// verdicts after the delta (asked of the live maps with `explain`, which
/// runs the loaded program over them) are the live set's, for prefixes
/// in the trie (shorter than /32) and in the hashes.
#[test]
fn ipv6_verdicts_after_a_delta_are_the_live_sets() {
    require_root!();
    let env = Env::new("");
    let replace = |rules: &str| {
        let body = format!(r#"{{"ingress_rules":[{rules}],"egress_rules":[]}}"#);
        let (code, reply) = env.curl("PUT", "/v1/rules", Some(&body));
        assert_eq!(code, 200, "{reply}");
    };
    let rule = |id: &str, port: u16, source: &str| {
        format!(r#"{{"id":"{id}","from_port":{port},"to_port":{port},"ip_ranges":["{source}"]}}"#)
    };
    // Held by the generation that goes idle at the second replace: the
    // peer's address (after two others) under the third of its regions,
    // which the second set does not have: left in place, these tables
    // would drop 7001.
    replace(
        &[
            rule("x", 7100, "fd00:200::/128"),
            rule("y", 7101, "fd00:200::1/128"),
            rule("old", 7000, "fd00:200::2/128"),
            rule("old-short", 7002, "fd00::/16"),
        ]
        .join(","),
    );
    replace(
        &[
            rule("new", 7001, "fd00:200::/64"),
            rule("new-short", 7003, "fd00::/20"),
        ]
        .join(","),
    );
    let (code, reply) = env.curl(
        "POST",
        "/v1/rules/ingress",
        Some(&rule("v4", 9001, "10.200.0.2/32")),
    );
    assert_eq!(code, 201, "{reply}");
    let log = env.daemon.as_ref().unwrap().log();
    assert_eq!(
        log.matches("compiled as a delta over the live maps")
            .count(),
        1,
        "the add was not a delta: {log}"
    );
    for (port, reason, credited) in [
        (7000, "drop_no_rule", None),
        (7001, "pass_rule", Some("rule:new")),
        (7002, "drop_no_rule", None),
        (7003, "pass_rule", Some("rule:new-short")),
    ] {
        let packet = format!("in tcp [{PEER_V6}]:40000 -> [{HOST_V6}]:{port}");
        let mut args = vec!["explain"];
        args.extend(packet.split_whitespace());
        let e = env.cli(&args);
        assert_eq!(e["live"]["reason"], reason, "{packet}: {e}");
        if let Some(credited) = credited {
            assert_eq!(e["live"]["credited"], credited, "{packet}: {e}");
        }
    }
}
