//! The CrowdSec bouncer against a hostile Local API (issue 18's attack
//! suite): a scripted server answers the decision stream with what an
//! attacker (or a broken LAPI) would send. A ban of the whole Internet is
//! refused, a ban of the admin network never cuts it, a malformed answer or
//! a huge value changes nothing, and each is named in the status or log;
//! an API key file others can read is refused; plain http to a LAPI off
//! loopback is warned about.

mod deny_env;

use std::time::Duration;

use deny_env::*;
use portcullis_tests::{crowdsec::*, *};

const PORT: u16 = 18090;
const WAIT: Duration = Duration::from_secs(20);

fn ban(id: u64, scope: &str, value: &str, duration: &str) -> String {
    format!(
        r#"{{"id":{id},"type":"ban","scope":"{scope}","value":"{value}","duration":"{duration}","origin":"crowdsec","scenario":"x"}}"#
    )
}

fn stream(new: &[String]) -> String {
    format!(r#"{{"deleted":null,"new":[{}]}}"#, new.join(","))
}

struct Hostile {
    env: Env,
    fake: FakeLapi,
    _keys: tempfile::TempDir,
}

impl Hostile {
    /// The admin network is B4 and B6 (`[ssh] sources`).
    fn new(url_host: &str, first: &str) -> Hostile {
        Hostile::with(url_host, first, "")
    }

    /// `extra` goes at the end of the `[crowdsec]` section.
    fn with(url_host: &str, first: &str, extra: &str) -> Hostile {
        let keys = tempfile::tempdir().unwrap();
        let path = key_file(keys.path(), "hostilekey").unwrap();
        let url = format!("http://{url_host}:{PORT}");
        let env = Env::new(&format!(
            "allow = true\nsources = [\"{B4}/32\", \"{B6}/128\"]\n{}\n{extra}",
            section(&url, &path)
        ));
        let addr = format!("{url_host}:{PORT}").parse().unwrap();
        let fake = FakeLapi::start(&env.pair.host, addr, first).unwrap();
        Hostile {
            env,
            fake,
            _keys: keys,
        }
    }

    fn status(&self) -> serde_json::Value {
        let s: serde_json::Value =
            serde_json::from_str(&self.env.ok(&["--json", "status"])).unwrap();
        s["crowdsec"].clone()
    }

    fn log(&self) -> String {
        self.env.daemon.as_ref().unwrap().log()
    }

    fn count(&self) -> serde_json::Value {
        self.env.listed("crowdsec")["count"].clone()
    }
}

#[test]
fn hostile_decisions_are_refused_and_the_admin_network_is_never_cut() {
    require_root!();
    let first = stream(&[
        ban(1, "Ip", A4, "1h"),
        ban(2, "Range", "0.0.0.0/0", "4h"),
        ban(3, "Range", "::/0", "4h"),
        ban(4, "range", "10.200.0.0/24", "4h"),
    ]);
    let mut h = Hostile::new("127.0.0.1", &first);
    h.env.start();
    assert!(
        eventually(WAIT, || h.status()["connected"] == true),
        "{}",
        h.status()
    );
    // The /24 bans A4; the admin network inside it (B4) is exempt, on SSH
    // and on the rule's port; the /0s are refused, so IPv6 is untouched.
    assert!(!h.env.reaches(A4, APP) && !h.env.reaches(A4, 22));
    for (src, port) in [(B4, 22), (B4, APP), (A6, APP), (B6, 22)] {
        assert!(h.env.reaches(src, port), "{src} -> {port} was cut");
    }
    assert_eq!(h.count(), 2, "{}", h.env.listed("crowdsec"));
    let log = h.log();
    for says in [
        "0.0.0.0/0 is broader than /16",
        "::/0 is broader than /32",
        "overlap an admin network",
    ] {
        assert!(log.contains(says), "the log does not say {says:?}:\n{log}");
    }
}

#[test]
fn malformed_or_huge_answers_change_nothing() {
    require_root!();
    let mut h = Hostile::new("127.0.0.1", &stream(&[ban(1, "Ip", A4, "1h")]));
    h.env.start();
    assert!(
        eventually(WAIT, || !h.env.reaches(A4, APP)),
        "{}",
        h.status()
    );
    let huge = "9".repeat(200_000);
    // An answer that is not a decision stream is refused whole.
    h.fake.answer(r#"{"new":[{"id":1,"#);
    assert!(h.fake.wait_served(2), "the daemon stopped polling");
    let st = h.status();
    assert!(
        st["connected"] == false
            && st["error"]
                .as_str()
                .unwrap_or_default()
                .contains("not a decision stream"),
        "{st}"
    );
    assert_eq!(h.count(), 1);
    assert!(!h.env.reaches(A4, APP), "a bad answer lifted the ban");
    assert!(h.env.reaches(B4, APP) && h.env.reaches(A6, APP));
    // A bad decision is refused alone, named in the status: the rest of the
    // answer still counts (one value a remote attacker can get into the
    // LAPI must not stop every other ban and lift).
    for (bad, says) in [
        (ban(5, "Ip", &huge, "1h"), "bytes"),
        (ban(6, "Ip", "10.200.0.300", "1h"), "10.200.0.300"),
        (ban(7, "Ip", B4, "forever"), "not a Go duration"),
    ] {
        h.fake.answer(&stream(&[ban(1, "Ip", A4, "1h"), bad]));
        assert!(h.fake.wait_served(2), "the daemon stopped polling");
        let st = h.status();
        let named = st["refused"].as_array().is_some_and(|r| {
            r.iter()
                .any(|e| e.as_str().unwrap_or_default().contains(says))
        });
        assert!(
            st["connected"] == true && named,
            "status does not name {says:?}: {st}"
        );
        assert_eq!(h.count(), 1);
        assert!(!h.env.reaches(A4, APP), "a bad decision lifted the ban");
        assert!(h.env.reaches(B4, APP) && h.env.reaches(A6, APP));
    }
    // A deletion that does not parse lifts nothing.
    h.fake.answer(
        r#"{"new":[],"deleted":[{"id":1,"type":"ban","scope":"Ip","value":"x","duration":"1h"}]}"#,
    );
    assert!(h.fake.wait_served(2), "the daemon stopped polling");
    assert!(
        !h.env.reaches(A4, APP),
        "an unparsable deletion lifted the ban"
    );
    // An IPv4-mapped IPv6 value (as a dual-stack service logs an IPv4
    // client) is the IPv4 address its packets carry: with id 1 deleted,
    // the mapped decision (id 9) keeps A4 banned.
    let mapped = ban(9, "Ip", &format!("::ffff:{A4}"), "1h");
    h.fake.answer(&format!(
        r#"{{"new":[{mapped}],"deleted":[{}]}}"#,
        ban(1, "Ip", A4, "1h")
    ));
    assert!(h.fake.wait_served(3), "the daemon stopped polling");
    assert!(
        !h.env.reaches(A4, APP),
        "the mapped decision for {A4} was not taken as {A4}: {}",
        h.status()
    );
    assert_eq!(h.count(), 1, "{}", h.status());
    // The largest Go duration is a long ban, not an overflow.
    h.fake.answer(&stream(&[
        ban(1, "Ip", A4, "1h"),
        ban(8, "Ip", A6, "2562047h47m16.854775807s"),
    ]));
    assert!(
        eventually(WAIT, || !h.env.reaches(A6, APP)),
        "{}",
        h.status()
    );
    assert!(h.env.daemon.as_mut().unwrap().running());
    assert_eq!(h.status()["connected"], true);
}

#[test]
fn a_key_file_others_can_read_is_refused() {
    require_root!();
    let mut h = Hostile::new("127.0.0.1", &stream(&[ban(1, "Ip", A4, "1h")]));
    use std::os::unix::fs::PermissionsExt as _;
    let path = h._keys.path().join("crowdsec.key");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    h.env.start();
    assert!(
        eventually(WAIT, || h.status()["error"]
            .as_str()
            .unwrap_or_default()
            .contains("readable by others")),
        "{}",
        h.status()
    );
    assert_eq!(h.fake.served(), 0, "the key was sent");
    assert!(h.env.reaches(A4, APP));
}

#[test]
fn plain_http_off_loopback_is_refused_unless_insecure_and_then_warned_about() {
    require_root!();
    // Refused by default (crowdsec::tests::plain_http_off_loopback_needs_saying_so);
    // allowed when the config says so, and warned about.
    let mut h = Hostile::with(
        HOST_V4,
        &stream(&[ban(1, "Ip", A4, "1h")]),
        "insecure_plain_http = true\n",
    );
    h.env.start();
    assert!(
        eventually(WAIT, || !h.env.reaches(A4, APP)),
        "{}",
        h.status()
    );
    let st = h.status();
    assert!(
        st["warning"]
            .as_str()
            .unwrap_or_default()
            .contains("plain http to a non-loopback address"),
        "{st}"
    );
    assert!(h.log().contains("plain http to a non-loopback address"));
    let out = h.env.ok(&["status"]);
    assert!(out.contains("warning: http://10.200.0.1"), "{out}");
}

/// A local user who binds the LAPI's loopback port while the LAPI is down
/// gets no key and cannot lift a ban: the bouncer sends the key over plain
/// http only to a LAPI run by root (the accepted socket's owner, from
/// sock_diag).
#[test]
fn a_local_user_holding_the_lapi_port_gets_no_key_and_lifts_nothing() {
    require_root!();
    let h = Hostile::new("127.0.0.1", &stream(&[ban(1, "Ip", A4, "1h")]));
    let Hostile {
        mut env,
        fake,
        _keys,
    } = h;
    env.start();
    let banned = || !env.reaches(A4, APP);
    assert!(eventually(WAIT, banned), "the LAPI's ban is not in force");
    // The LAPI goes away; an unprivileged user takes its port and answers
    // with the deletion of the ban.
    drop(fake);
    let lift = format!(r#"{{"new":[],"deleted":[{}]}}"#, ban(1, "Ip", A4, "1h"));
    let script = format!(
        "import socket\nbody={lift:?}.encode()\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind(('127.0.0.1',{PORT}))\ns.listen(16)\nwhile True:\n    c,_=s.accept()\n    c.settimeout(2)\n    try:\n        c.recv(16384)\n    except Exception:\n        pass\n    c.sendall(b'HTTP/1.1 200 OK\\r\\nContent-Type: application/json\\r\\nContent-Length: %d\\r\\nConnection: close\\r\\n\\r\\n' % len(body) + body)\n    c.close()\n"
    );
    let mut squatter = env
        .pair
        .host
        .command("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
            &script,
        ])
        .spawn()
        .unwrap();
    let status = || -> serde_json::Value {
        let s: serde_json::Value = serde_json::from_str(&env.ok(&["--json", "status"])).unwrap();
        s["crowdsec"].clone()
    };
    let refused = eventually(WAIT, || {
        status()["error"]
            .as_str()
            .unwrap_or_default()
            .contains("not root")
    });
    // A few more polls' worth: the ban stays.
    std::thread::sleep(Duration::from_secs(3));
    let still = banned();
    let _ = squatter.kill();
    let _ = squatter.wait();
    assert!(refused, "the squatter was not refused: {}", status());
    assert!(still, "the squatter lifted the ban: {}", status());
}

/// More bans than the deny set holds (`[capacity] deny_v4_prefixes = 2`,
/// three IPv4 bans): the full pull is refused, changes nothing, and is not
/// tried again while the LAPI's answer names the same bans (each poll used
/// to redo the whole replace: a journal write, the kernel writes and their
/// undo, an audit record, every second). Once the answer changes (a ban
/// deleted: two fit), it applies.
#[test]
fn bans_over_the_deny_capacity_are_refused_once_not_every_poll() {
    require_root!();
    const C4: &str = "10.200.0.4";
    let three = stream(&[
        ban(1, "Ip", A4, "1h"),
        ban(2, "Ip", B4, "1h"),
        ban(3, "Ip", C4, "1h"),
    ]);
    let mut h = Hostile::with("127.0.0.1", &three, "\n[capacity]\ndeny_v4_prefixes = 2\n");
    h.env.start();
    let audit = |h: &Hostile| {
        std::fs::read_to_string(h.env.config.state_dir().join("audit.log")).unwrap_or_default()
    };
    let refused = |h: &Hostile| {
        audit(h)
            .lines()
            .filter(|l| l.contains("crowdsec: full pull") && l.contains("refused"))
            .count()
    };
    assert!(
        eventually(WAIT, || refused(&h) >= 1),
        "no refused full pull: {}\n{}",
        h.status(),
        h.log()
    );
    // Five more polls (1 s apart) with the same answer.
    std::thread::sleep(Duration::from_secs(5));
    assert!(h.fake.served() >= 5, "the LAPI was not polled");
    assert_eq!(
        refused(&h),
        1,
        "the refused replace was retried:\n{}",
        audit(&h)
    );
    assert!(h.env.reaches(A4, APP), "a refused pull banned A4");
    let status = h.status();
    assert_eq!(status["connected"], false, "{status}");
    assert!(
        status["error"]
            .as_str()
            .unwrap_or_default()
            .contains("deny set"),
        "{status}"
    );
    // Two bans fit.
    h.fake
        .answer(&stream(&[ban(1, "Ip", A4, "1h"), ban(2, "Ip", C4, "1h")]));
    let two = || {
        let out = h.env.cli(&["--json", "deny", "list", "crowdsec"]);
        out.status.success()
            && serde_json::from_slice::<serde_json::Value>(&out.stdout)
                .is_ok_and(|v| v["count"] == 2)
    };
    assert!(eventually(WAIT, two), "{}\n{}", h.status(), h.log());
    assert!(!h.env.reaches(A4, APP));
    assert!(h.env.reaches(B4, APP));
    // Two other bans: as a delta they do not fit beside the two held (the
    // add is refused, the bouncer pulls whole again); the full replace
    // makes room by lifting the stale ones first.
    h.fake.answer(&stream(&[
        ban(4, "Ip", B4, "1h"),
        ban(5, "Ip", "10.200.0.5", "1h"),
    ]));
    // (B4 is the admin network: held in the set, exempt in the data path.)
    let swapped = || {
        let listed = h.env.listed("crowdsec").to_string();
        listed.contains("10.200.0.5/32") && !listed.contains(&format!("\"{A4}/32\""))
    };
    assert!(
        eventually(WAIT, swapped),
        "{}\n{}",
        h.status(),
        h.env.listed("crowdsec")
    );
    assert!(h.env.reaches(A4, APP));
    // Three bans again, none of them held: the new list does not fit even
    // alone; the replace is refused and the bans in force stay (the stale
    // ones lifted to make room come back).
    h.fake.answer(&stream(&[
        ban(6, "Ip", A4, "1h"),
        ban(7, "Ip", C4, "1h"),
        ban(8, "Ip", "10.200.0.6", "1h"),
    ]));
    assert!(
        eventually(WAIT, || refused(&h) >= 2),
        "no second refused pull: {}\n{}",
        h.status(),
        audit(&h)
    );
    let listed = h.env.listed("crowdsec").to_string();
    assert!(
        listed.contains("10.200.0.5/32"),
        "a refused replace lifted the bans in force: {listed}"
    );
}
