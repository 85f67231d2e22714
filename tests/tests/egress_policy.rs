//! The explicit egress policy (issue 19): with an egress rule and no
//! `egress` key, egress stays an allowlist (as before the key existed) and
//! `--check-config` says the key should be set; `egress = "allow"` keeps the
//! rule but blocks nothing (and says so); `portcullis egress` switches the
//! policy as an audited rule change. Real connections from the protected
//! host to a server in the peer namespace.

use std::{io, net::SocketAddr, process::Output, time::Duration};

use portcullis_tests::*;
use socket2::{Domain, Protocol, Socket, Type};

const RULE: &str = "[[egress_rules]]\nid = \"api\"\nfrom_port = 9000\nto_port = 9000\nip_ranges = [\"10.200.0.2/32\"]\n";

fn said(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Whether the host reaches the peer's `port` (a drop is a timeout).
fn leaves(pair: &Pair, port: u16) -> bool {
    let to: SocketAddr = sock(PEER_V4, port);
    let r: io::Result<()> = pair.host.enter(|| {
        let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
        s.connect_timeout(&to.into(), PROBE_TIMEOUT)?;
        s.set_linger(Some(Duration::ZERO))?;
        Ok(())
    });
    match r {
        Ok(()) => true,
        Err(e) => {
            assert_eq!(e.kind(), io::ErrorKind::TimedOut, "-> {to}: {e}");
            false
        }
    }
}

fn check_config(config: &ConfigFile) -> String {
    let out = std::process::Command::new(workspace_bin("portcullisd").unwrap())
        .arg("--config")
        .arg(config.path())
        .arg("--check-config")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", said(&out));
    said(&out)
}

fn setup(rest: &str) -> (Pair, PinDir, ConfigFile) {
    let pair = Pair::new().expect("namespaces");
    for port in [9000, 9001] {
        TcpServer::start(&pair.peer, sock(PEER_V4, port)).unwrap();
    }
    // Control, before anything filters: both ports answer.
    assert!(leaves(&pair, 9000) && leaves(&pair, 9001), "control");
    let pins = PinDir::new().unwrap();
    let config = ConfigFile::new(&config_text(&pins, rest)).unwrap();
    (pair, pins, config)
}

#[test]
fn without_the_key_an_egress_rule_keeps_egress_an_allowlist_and_the_check_warns() {
    require_root!();
    let (pair, _pins, config) = setup(RULE);
    let checked = check_config(&config);
    assert!(
        checked.contains("warning: egress rules without an `egress` key: egress is an allowlist"),
        "{checked}"
    );
    let _daemon = Daemon::start(&pair.host, &config).expect("portcullisd");
    assert!(leaves(&pair, 9000), "the egress rule admits 9000");
    assert!(
        !leaves(&pair, 9001),
        "no key: egress is an allowlist, as before"
    );
    let list = said(&cli(&config, &["rules", "list"]));
    assert!(list.contains("Egress: allowlist (implicit"), "{list}");
}

#[test]
fn egress_allow_keeps_the_rules_but_blocks_nothing_and_switching_is_audited() {
    require_root!();
    let (pair, _pins, config) = setup(&format!("egress = \"allow\"\n{RULE}"));
    let checked = check_config(&config);
    assert!(
        checked.contains("warning: egress = \"allow\": the 1 egress rule(s) are accepted and reported but block nothing"),
        "{checked}"
    );
    let _daemon = Daemon::start(&pair.host, &config).expect("portcullisd");
    assert!(leaves(&pair, 9000));
    assert!(
        leaves(&pair, 9001),
        "egress = \"allow\": other destinations stay reachable"
    );
    let list = said(&cli(&config, &["rules", "list"]));
    assert!(
        list.contains("Egress: allow.") && list.contains("api"),
        "{list}"
    );
    // Switching the policy is a rule change: applied, and audited.
    let out = cli(&config, &["egress", "allowlist"]);
    assert!(out.status.success(), "{}", said(&out));
    assert!(
        said(&out).contains("egress allow -> allowlist"),
        "{}",
        said(&out)
    );
    assert!(!leaves(&pair, 9001), "allowlist: 9001 is not admitted");
    assert!(leaves(&pair, 9000));
    let out = cli(&config, &["egress", "allow"]);
    assert!(out.status.success(), "{}", said(&out));
    assert!(leaves(&pair, 9001));
    let state = config.state_dir();
    let audit = said(&cli(
        &config,
        &["audit-log", "show", "--state-dir", state.to_str().unwrap()],
    ));
    assert!(
        audit.contains("set egress allowlist") && audit.contains("set egress allow"),
        "{audit}"
    );
    let bad = cli(&config, &["egress", "deny"]);
    assert!(!bad.status.success());
}
