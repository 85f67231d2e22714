//! Expiring rules (issue 18) with real traffic: `portcullis allow 8080/tcp
//! --for 3s` admits, `rules list` shows when it ends, then the core removes
//! it on time: new connections are dropped, an open connection through it
//! stops passing, and the audit log says it expired. A rule that expires
//! while the daemon is down is removed when it starts (its open connection,
//! seeded into the connection table at start, is cut too). A rule whose
//! expiry has passed is refused, naming the rule and the field.

use std::time::Duration;

use portcullis_tests::*;

const PORT: u16 = 8080;

/// Whether `f` holds within `limit` (polled).
fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

struct Env {
    daemon: Option<Daemon>,
    config: ConfigFile,
    pins: PinDir,
    pair: Pair,
}

impl Env {
    fn new() -> Self {
        let pair = Pair::new().expect("namespaces");
        tcp_echo_server(&pair.host, sock(HOST_V4, PORT)).unwrap();
        tcp_echo_server(&pair.host, sock(HOST_V6, PORT)).unwrap();
        let pins = PinDir::new().unwrap();
        let config = config(&pins, false, "").unwrap();
        let mut env = Env {
            daemon: None,
            config,
            pins,
            pair,
        };
        env.start();
        env
    }

    fn start(&mut self) {
        self.daemon = Some(Daemon::start(&self.pair.host, &self.config).expect("portcullisd"));
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = cli(&self.config, args);
        assert!(
            out.status.success(),
            "portcullis {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn reaches(&self, host: &str) -> bool {
        tcp_probe(&self.pair.peer, sock(host, PORT)).is_ok()
    }

    fn connect(&self, host: &str) -> std::net::TcpStream {
        let s = tcp_connect(&self.pair.peer, sock(host, PORT)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s
    }

    fn audit(&self) -> String {
        let dir = self.config.state_dir();
        self.ok(&["audit-log", "show", "--state-dir", dir.to_str().unwrap()])
    }
}

#[test]
fn an_expiring_rule_is_removed_on_time_with_its_flows() {
    require_root!();
    let env = Env::new();
    assert!(!env.reaches(HOST_V4), "control: nothing admits {PORT} yet");
    // (6 s: a listing and two connections must fit before it expires.)
    env.ok(&["allow", "8080/tcp", "--for", "6s"]);
    let listed = env.ok(&["rules", "list"]);
    assert!(
        listed.contains("tcp-8080") && listed.contains('Z'),
        "{listed}"
    );
    let (mut open4, mut open6) = (env.connect(HOST_V4), env.connect(HOST_V6));
    echo_roundtrip(&mut open4, b"before\n").expect("admitted while the rule lives");
    echo_roundtrip(&mut open6, b"before\n").expect("admitted while the rule lives");
    assert!(
        eventually(Duration::from_secs(15), || !env.reaches(HOST_V4)),
        "the rule did not expire"
    );
    assert!(!env.reaches(HOST_V6), "IPv6 still admitted");
    assert!(
        echo_roundtrip(&mut open4, b"after\n").is_err(),
        "the open IPv4 connection still passes"
    );
    assert!(
        echo_roundtrip(&mut open6, b"after\n").is_err(),
        "the open IPv6 connection still passes"
    );
    assert!(!env.ok(&["rules", "list"]).contains("tcp-8080"));
    let audit = env.audit();
    assert!(
        audit.contains("rule expired") && audit.contains("removed rule \"tcp-8080\""),
        "{audit}"
    );
    // Already past: refused, naming the rule and the field; nothing changes.
    let out = cli(
        &env.config,
        &["allow", "9090/tcp", "--expires", "2020-01-01T00:00:00Z"],
    );
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && said.contains("tcp-9090") && said.contains("expires"),
        "{said}"
    );
}

#[test]
fn a_rule_that_expired_while_the_daemon_was_down_is_removed_at_start() {
    require_root!();
    let mut env = Env::new();
    env.ok(&["allow", "8080/tcp", "--for", "3s", "--id", "brief"]);
    let mut open = env.connect(HOST_V4);
    echo_roundtrip(&mut open, b"before\n").expect("admitted");
    env.daemon.take().unwrap().kill();
    std::thread::sleep(Duration::from_secs(4));
    env.start();
    assert!(!env.reaches(HOST_V4), "the expired rule still admits");
    assert!(
        echo_roundtrip(&mut open, b"after\n").is_err(),
        "the open connection (seeded at start) still passes"
    );
    assert!(!env.ok(&["rules", "list"]).contains("brief"));
    let audit = env.audit();
    assert!(audit.contains("removed rule \"brief\""), "{audit}");
    let _ = &env.pins;
}
