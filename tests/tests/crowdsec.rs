//! The CrowdSec bouncer against a real Local API (issue 18): decisions
//! added with `cscli` (IPv4 and IPv6 addresses, ranges) are enforced on
//! real traffic while other sources still connect; a deleted decision lifts
//! its ban; overlapping decisions (the same address twice, an address
//! inside a banned range) keep the address banned until the last goes;
//! non-ban decisions are ignored; a LAPI that goes away leaves the bans in
//! force, and changes made while it was down are picked up when it is back.

mod deny_env;

use std::time::Duration;

use deny_env::*;
use portcullis_tests::{crowdsec::*, *};

const PORT: u16 = 18080;
const WAIT: Duration = Duration::from_secs(20);

struct Cs {
    env: Env,
    lapi: Lapi,
    _keys: tempfile::TempDir,
}

impl Cs {
    fn new() -> Cs {
        let keys = tempfile::tempdir().unwrap();
        let probe_key = "placeholder";
        let path = key_file(keys.path(), probe_key).unwrap();
        let url = format!("http://127.0.0.1:{PORT}");
        let env = Env::new(&format!("allow = true\n{}", section(&url, &path)));
        let lapi = Lapi::start(&env.pair.host, PORT).expect("the LAPI");
        key_file(keys.path(), &lapi.key).unwrap();
        Cs {
            env,
            lapi,
            _keys: keys,
        }
    }

    fn status(&self) -> serde_json::Value {
        let s: serde_json::Value =
            serde_json::from_str(&self.env.ok(&["--json", "status"])).unwrap();
        s["crowdsec"].clone()
    }

    /// Waits until every source in `banned` is dropped and every one in
    /// `open` connects (to the rule's port).
    fn expect(&self, banned: &[&str], open: &[&str]) {
        let ok = eventually(WAIT, || {
            banned.iter().all(|s| !self.env.reaches(s, APP))
                && open.iter().all(|s| self.env.reaches(s, APP))
        });
        assert!(
            ok,
            "expected {banned:?} banned and {open:?} open; status {}; deny sets {}",
            self.status(),
            said(&self.env.cli(&["deny", "list", "crowdsec"]))
        );
    }

    /// A fresh ban on `marker`, enforced: every change the LAPI had before
    /// it has been pulled too (the next poll carries both).
    fn sync(&self, marker: &str) {
        self.lapi
            .add(&["--ip", marker, "--duration", "1h"])
            .unwrap();
        self.expect(&[marker], &[]);
    }
}

#[test]
fn decisions_are_enforced_and_lifted() {
    require_root!();
    let mut cs = Cs::new();
    cs.env.start();
    assert!(
        eventually(WAIT, || cs.status()["connected"] == true),
        "{}",
        cs.status()
    );
    cs.expect(&[], &[A4, B4, A6, B6, C6, D6]);
    // A captcha is not a ban: added first, so the ban after it shows it
    // has been pulled.
    cs.lapi
        .add(&["--ip", B4, "--type", "captcha", "--duration", "1h"])
        .unwrap();
    cs.lapi.add(&["--ip", A4, "--duration", "1h"]).unwrap();
    cs.lapi.add(&["--ip", A6, "--duration", "1h"]).unwrap();
    cs.expect(&[A4, A6], &[B4, B6, C6, D6]);
    // A range (IPv6 /64).
    cs.lapi
        .add(&["--range", OTHER64, "--duration", "30m"])
        .unwrap();
    cs.expect(&[C6, D6], &[B4, B6]);
    let listed = cs.env.listed("crowdsec");
    assert_eq!(listed["count"], 3, "{listed}");
    // Deleting lifts.
    for (id, _) in cs.lapi.ids(A4).unwrap() {
        cs.lapi.delete_id(id).unwrap();
    }
    for (id, _) in cs.lapi.ids(OTHER64).unwrap() {
        cs.lapi.delete_id(id).unwrap();
    }
    cs.expect(&[A6], &[A4, B4, C6, D6]);
    // Through the core's audited path, as the API's changes are.
    let audit = std::fs::read_to_string(cs.env.config.state_dir().join("audit.log")).unwrap();
    for says in [
        "crowdsec: full pull into crowdsec",
        "crowdsec: ban 1 entries in crowdsec",
        "crowdsec: lift",
    ] {
        assert!(
            audit.contains(says),
            "the audit log lacks {says:?}:
{audit}"
        );
    }
}

#[test]
fn overlapping_decisions_keep_the_address_banned_until_the_last_goes() {
    require_root!();
    let mut cs = Cs::new();
    cs.env.start();
    cs.expect(&[], &[A4, B4, C6]);
    // The same address twice, different durations.
    cs.lapi.add(&["--ip", A4, "--duration", "1h"]).unwrap();
    cs.lapi.add(&["--ip", A4, "--duration", "2h"]).unwrap();
    cs.expect(&[A4], &[B4]);
    let ids = cs.lapi.ids(A4).unwrap();
    assert_eq!(ids.len(), 2, "{ids:?}");
    // Delete the longer one (the one a full pull reports), then the other.
    cs.lapi.delete_id(ids[1].0).unwrap();
    cs.sync(B6);
    assert!(
        !cs.env.reaches(A4, APP),
        "one of two decisions lifted the ban"
    );
    cs.lapi.delete_id(ids[0].0).unwrap();
    cs.expect(&[], &[A4]);
    // An address inside a banned range (IPv4 /31 and IPv6 /64).
    cs.lapi
        .add(&["--range", "10.200.0.2/31", "--duration", "1h"])
        .unwrap();
    cs.lapi
        .add(&["--range", OTHER64, "--duration", "1h"])
        .unwrap();
    cs.lapi.add(&["--ip", B4, "--duration", "3h"]).unwrap();
    cs.lapi.add(&["--ip", C6, "--duration", "3h"]).unwrap();
    cs.expect(&[A4, B4, C6, D6], &[]);
    for v in [B4, C6] {
        for (id, _) in cs.lapi.ids(v).unwrap() {
            cs.lapi.delete_id(id).unwrap();
        }
    }
    cs.sync(A6);
    cs.expect(&[A4, B4, C6, D6], &[]);
    // The ranges go: so do the bans.
    for v in ["10.200.0.2/31", OTHER64] {
        for (id, _) in cs.lapi.ids(v).unwrap() {
            cs.lapi.delete_id(id).unwrap();
        }
    }
    cs.expect(&[], &[A4, B4, C6, D6]);
}

#[test]
fn a_lapi_restart_keeps_the_bans_and_picks_up_what_changed() {
    require_root!();
    let mut cs = Cs::new();
    cs.env.start();
    cs.lapi.add(&["--ip", A4, "--duration", "1h"]).unwrap();
    cs.lapi.add(&["--ip", B6, "--duration", "1h"]).unwrap();
    cs.expect(&[A4, B6], &[B4, A6]);
    cs.lapi.stop();
    assert!(
        eventually(WAIT, || cs.status()["connected"] == false),
        "the status does not say the LAPI is gone: {}",
        cs.status()
    );
    let st = cs.status();
    assert!(
        st["error"]
            .as_str()
            .unwrap_or_default()
            .contains("unreachable"),
        "{st}"
    );
    // Down: the bans stay in force.
    std::thread::sleep(Duration::from_secs(2));
    cs.expect(&[A4, B6], &[B4, A6]);
    // Back, with changes made since: one ban lifted, one added.
    cs.lapi.resume().unwrap();
    for (id, _) in cs.lapi.ids(A4).unwrap() {
        cs.lapi.delete_id(id).unwrap();
    }
    cs.lapi.add(&["--ip", A6, "--duration", "1h"]).unwrap();
    cs.expect(&[B6, A6], &[A4, B4]);
    assert!(
        eventually(WAIT, || cs.status()["connected"] == true),
        "{}",
        cs.status()
    );
    // And it keeps following deltas after the reconnect.
    cs.lapi.add(&["--ip", B4, "--duration", "1h"]).unwrap();
    cs.expect(&[B4, B6, A6], &[A4]);
    let log = cs.env.daemon.as_ref().unwrap().log();
    assert_eq!(
        log.matches("crowdsec: poll failed").count(),
        1,
        "one error logged per outage:\n{log}"
    );
}

#[test]
fn an_https_lapi_is_trusted_only_through_ca_file() {
    require_root!();
    let keys = tempfile::tempdir().unwrap();
    let path = key_file(keys.path(), "placeholder").unwrap();
    // First another CA than the LAPI's: the handshake fails.
    test_pki(keys.path(), "127.0.0.1").unwrap();
    let ca = keys.path().join("ca.pem");
    let url = format!("https://127.0.0.1:{PORT}");
    let env = Env::new(&format!(
        "allow = true\n{}ca_file = \"{}\"\n",
        section(&url, &path),
        ca.display()
    ));
    let lapi = Lapi::start_with(&env.pair.host, PORT, true).expect("the LAPI");
    key_file(keys.path(), &lapi.key).unwrap();
    lapi.add(&["--ip", A4, "--duration", "1h"]).unwrap();
    let mut cs = Cs {
        env,
        lapi,
        _keys: keys,
    };
    cs.env.start();
    assert!(
        eventually(WAIT, || cs.status()["error"]
            .as_str()
            .unwrap_or_default()
            .contains("TLS handshake")),
        "{}",
        cs.status()
    );
    assert!(cs.env.reaches(A4, APP), "banned through an untrusted LAPI");
    // The LAPI's CA: trusted, the ban is pulled.
    std::fs::copy(cs.lapi.ca(), &ca).unwrap();
    cs.expect(&[A4], &[B4, A6]);
    assert_eq!(cs.status()["connected"], true, "{}", cs.status());
    assert!(cs.status()["warning"].is_null(), "{}", cs.status());
}
