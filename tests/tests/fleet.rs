//! Cluster membership from etcd (issue 20), against a real etcd with TLS
//! and authentication on, in namespaces on one segment: hosts 1..=N run a
//! daemon each that registers its addresses and follows the member list;
//! the next host is an outsider; the last ones run etcd. Real traffic
//! checks that each host admits exactly the current members.

use std::time::{Duration, Instant};

use portcullis_tests::etcd::{self, Etcd, member_key};
use portcullis_tests::*;

const PORT: u16 = 7777;
const WAIT: Duration = Duration::from_secs(15);

struct Host {
    cfg: ConfigFile,
    daemon: Option<Daemon>,
    _pins: PinDir,
}

fn password(i: usize) -> String {
    format!("pw-host-{i}")
}

fn name(i: usize) -> String {
    format!("host-{i}")
}

/// Starts the daemon of host `i` following `etcd`.
fn start_host(lan: &Lan, etcd: &Etcd, i: usize, extra: &str) -> Host {
    let pins = PinDir::new().unwrap();
    let pw = etcd.pki.secret(&format!("pw-{i}"), &password(i)).unwrap();
    let section = etcd::fleet_section(etcd, &name(i), &pw, &[Lan::v4(i), Lan::v6(i)]);
    let cfg = ConfigFile::new(&config_text(&pins, &format!("{extra}{section}"))).unwrap();
    let daemon = Daemon::start(lan.host(i), &cfg).expect("start portcullisd");
    Host {
        cfg,
        daemon: Some(daemon),
        _pins: pins,
    }
}

fn reaches(lan: &Lan, from: usize, to: usize) -> bool {
    tcp_probe(lan.host(from), sock(&Lan::v4(to), PORT)).is_ok()
}

/// Waits until every host in `hosts` has applied `revision` (or later).
fn converge(hosts: &[&Host], revision: i64) {
    for h in hosts {
        etcd::wait_status(&h.cfg, WAIT, &format!("revision {revision} applied"), |s| {
            s["fleet"]["revision"]
                .as_i64()
                .is_some_and(|r| r >= revision)
        })
        .unwrap();
    }
}

/// Each of `daemons` admits exactly `members` among `sources` (by traffic).
fn admits_exactly(lan: &Lan, daemons: &[usize], sources: &[usize], members: &[usize]) {
    for &to in daemons {
        for &from in sources.iter().filter(|f| **f != to) {
            assert_eq!(
                reaches(lan, from, to),
                members.contains(&from),
                "host {to} admitting host {from} (members {members:?})"
            );
        }
    }
}

fn audit(h: &Host) -> String {
    std::fs::read_to_string(h.cfg.state_dir().join("audit.log")).unwrap_or_default()
}

fn lan_with_etcd(daemons: usize, etcd_members: usize) -> (Lan, Etcd) {
    lan_with_etcd_tls(daemons, etcd_members, false)
}

fn lan_with_etcd_tls(daemons: usize, etcd_members: usize, client_certs: bool) -> (Lan, Etcd) {
    let lan = Lan::new(daemons + 1 + etcd_members).unwrap();
    let nodes: Vec<(&Netns, String)> = (daemons + 2..=daemons + 1 + etcd_members)
        .map(|i| (lan.host(i), Lan::v4(i)))
        .collect();
    let etcd = Etcd::start_with(&nodes, client_certs).unwrap();
    let users: Vec<(String, String)> = (1..=daemons).map(|i| (name(i), password(i))).collect();
    let users: Vec<(&str, &str)> = users
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    etcd.enable_auth(&users).unwrap();
    for i in 1..=daemons + 1 {
        TcpServer::start(lan.host(i), sock(&Lan::v4(i), PORT)).unwrap();
    }
    (lan, etcd)
}

/// Three daemons and one etcd: members appear as their daemons register,
/// an added member is admitted everywhere, a value that does not validate
/// (a range, an address outside allowed_ranges, not JSON) is refused with
/// an audit record and changes nothing, a removed member is refused and
/// its open flows cut, a daemon that stops renewing drops out.
#[test]
fn each_host_admits_exactly_the_members_in_etcd() {
    require_root!();
    let (lan, etcd) = lan_with_etcd(3, 1);
    let hosts: Vec<Host> = (1..=3).map(|i| start_host(&lan, &etcd, i, "")).collect();
    let all: Vec<&Host> = hosts.iter().collect();
    let sources = [1, 2, 3, 4];

    // Registration: every daemon's key is there, each host admits the others.
    for h in &all {
        etcd::wait_status(&h.cfg, WAIT, "three members", |s| {
            s["fleet"]["members"].as_u64() == Some(3)
        })
        .unwrap();
    }
    converge(&all, etcd.revision().unwrap());
    admits_exactly(&lan, &[1, 2, 3], &sources, &[1, 2, 3]);

    // Host A's credentials cannot write B's key.
    let out = etcd.ctl_as(
        Some(&format!("{}:{}", name(1), password(1))),
        &[
            "put",
            &member_key(&name(2)),
            r#"{"addresses":["10.200.10.4"]}"#,
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("permission denied"),
        "host-1 wrote host-2's key: {err}"
    );

    // An added member (host 4, no daemon) is admitted everywhere.
    let rev = etcd
        .put(&member_key("extra"), r#"{"addresses":["10.200.10.4"]}"#)
        .unwrap();
    converge(&all, rev);
    admits_exactly(&lan, &[1, 2, 3], &sources, &[1, 2, 3, 4]);
    let generations: Vec<u64> = all
        .iter()
        .map(|h| etcd::status(&h.cfg)["generation"].as_u64().unwrap())
        .collect();
    assert!(
        audit(&hosts[0]).contains(&format!("etcd revision {rev}")),
        "no audit record of revision {rev}"
    );

    // Values that do not validate: refused, audited, nothing changes.
    for (value, why) in [
        (r#"{"addresses":["10.200.10.0/24"]}"#, "is a range"),
        (r#"{"addresses":["10.99.0.1"]}"#, "outside allowed_ranges"),
        ("not json", "is not"),
    ] {
        let rev = etcd.put(&member_key("bad"), value).unwrap();
        converge(&all, rev);
        for (h, g) in all.iter().zip(&generations) {
            let s = etcd::status(&h.cfg);
            let refused = s["fleet"]["refused"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            assert!(
                refused.contains(why) && refused.contains("/members/bad"),
                "{value}: {refused}"
            );
            assert_eq!(
                s["generation"].as_u64(),
                Some(*g),
                "a refused revision changed the rules"
            );
            let log = audit(h);
            let record = log
                .lines()
                .find(|l| l.contains(&format!("etcd revision {rev}\"")))
                .unwrap_or_default();
            assert!(
                record.contains("refused"),
                "no refusal record of revision {rev}: {record}"
            );
        }
        admits_exactly(&lan, &[1, 2, 3], &sources, &[1, 2, 3, 4]);
    }
    // A removed member, while the bad key is still there (a bad key is
    // refused alone: it cannot freeze the list): refused, and the flow
    // host 1 opened to it is cut (its replies no longer pass as
    // established).
    tcp_echo_server(lan.host(4), sock(&Lan::v4(4), 7000)).unwrap();
    let mut flow = tcp_connect(lan.host(1), sock(&Lan::v4(4), 7000)).unwrap();
    echo_roundtrip(&mut flow, b"member\n").unwrap();
    let rev = etcd.del(&member_key("extra")).unwrap();
    converge(&all, rev);
    admits_exactly(&lan, &[1, 2, 3], &sources, &[1, 2, 3]);
    flow.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    assert!(
        echo_roundtrip(&mut flow, b"removed\n").is_err(),
        "the removed member's open flow still passes"
    );
    let rev = etcd.del(&member_key("bad")).unwrap();
    converge(&all, rev);
    assert!(etcd::status(&hosts[0].cfg)["fleet"]["refused"].is_null());

    // A reload (the file names no peers) keeps etcd's: they are not the
    // file's to drop, nor runtime changes to refuse over.
    let reloaded = hosts[0].daemon.as_ref().unwrap().reload().unwrap();
    assert!(reloaded.contains("reloaded"), "{reloaded}");
    admits_exactly(&lan, &[1], &sources, &[1, 2, 3]);

    // A daemon that stops renewing its lease drops out of the list.
    let mut hosts = hosts;
    let gone = hosts.pop().unwrap();
    drop(gone.daemon);
    let all: Vec<&Host> = hosts.iter().collect();
    for h in &all {
        etcd::wait_status(&h.cfg, WAIT, "host 3 gone", |s| {
            s["fleet"]["members"].as_u64() == Some(2)
        })
        .unwrap();
    }
    admits_exactly(&lan, &[1, 2], &sources, &[1, 2]);
}

/// Enforcement and readiness never wait for etcd: a daemon starts with
/// etcd down, says it is stale, and keeps the last applied members across
/// a restart; a wrong CA or a wrong password is reported naming which.
#[test]
fn offline_hosts_keep_the_last_members_and_errors_name_their_cause() {
    require_root!();
    let (lan, mut etcd) = lan_with_etcd(2, 1);
    let mut a = start_host(&lan, &etcd, 1, "");
    let b = start_host(&lan, &etcd, 2, "");
    let rev = etcd
        .put(&member_key("extra"), r#"{"addresses":["10.200.10.3"]}"#)
        .unwrap();
    converge(&[&a, &b], rev);
    for h in [&a, &b] {
        etcd::wait_status(&h.cfg, WAIT, "three members", |s| {
            s["fleet"]["members"].as_u64() == Some(3)
        })
        .unwrap();
    }
    let rev = etcd.revision().unwrap();
    converge(&[&a, &b], rev);
    admits_exactly(&lan, &[1, 2], &[1, 2, 3], &[1, 2, 3]);

    // etcd gone: the members stay, across a restart too; READY does not wait.
    etcd.members[0].kill();
    drop(a.daemon.take());
    let started = Instant::now();
    a.daemon = Some(Daemon::start(lan.host(1), &a.cfg).expect("start without etcd"));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "start waited for etcd"
    );
    let s = etcd::wait_status(&a.cfg, WAIT, "etcd unreachable reported", |s| {
        s["fleet"]["error"].is_string()
    })
    .unwrap();
    assert!(s["fleet"]["stale_secs"].is_null(), "{s}");
    assert_eq!(s["fleet"]["revision"].as_i64(), Some(rev));
    admits_exactly(&lan, &[1, 2], &[1, 2, 3], &[1, 2, 3]);
    // The other host synced before: its staleness grows.
    etcd::wait_status(&b.cfg, WAIT, "staleness reported", |s| {
        s["fleet"]["stale_secs"].as_u64().is_some_and(|n| n >= 3) && s["fleet"]["error"].is_string()
    })
    .unwrap();
    // Readiness reports it as a warning that never gates.
    let s = etcd::status(&b.cfg);
    let check = s["readiness"]["checks"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["name"] == "fleet"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        (check["state"].as_str(), check["gates"].as_bool()),
        (Some("warn"), Some(false)),
        "{check}"
    );
    assert!(
        check["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("etcd not followed"),
        "{check}"
    );
    let metrics = std::process::Command::new("curl")
        .args(["-s", "--unix-socket"])
        .arg(b.cfg.socket())
        .arg("http://localhost/v1/metrics")
        .output()
        .unwrap();
    let metrics = String::from_utf8_lossy(&metrics.stdout);
    assert!(
        metrics.contains("portcullis_fleet_stale_seconds"),
        "{metrics}"
    );
    let out = cli(&b.cfg, &["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l.starts_with("Fleet:") && l.contains("NOT FOLLOWED")),
        "{text}"
    );
    etcd.members[0].restart().unwrap();
    etcd.wait_writable(WAIT).unwrap();
    let rev = etcd.del(&member_key("extra")).unwrap();
    converge(&[&a, &b], rev);
    admits_exactly(&lan, &[1, 2], &[1, 2, 3], &[1, 2]);

    // A wrong CA, then a wrong password: each named.
    let other = etcd::Pki::new(&["10.200.10.9".to_string()]).unwrap();
    let pins = PinDir::new().unwrap();
    let pw = etcd.pki.secret("pw-3", "wrong").unwrap();
    let section = etcd::fleet_section(&etcd, "host-1", &pw, &[]);
    let wrong_ca = section.replace(
        &etcd.pki.ca().display().to_string(),
        &other.ca().display().to_string(),
    );
    let cfg = ConfigFile::new(&config_text(&pins, &wrong_ca)).unwrap();
    let d = Daemon::start(lan.host(3), &cfg).unwrap();
    let s = etcd::wait_status(&cfg, WAIT, "wrong CA reported", |s| {
        s["fleet"]["error"].is_string()
    })
    .unwrap();
    let e = s["fleet"]["error"].as_str().unwrap();
    assert!(e.contains("ca_file") && e.contains("TLS"), "{e}");
    drop(d);
    cfg.rewrite(&config_text(&pins, &section)).unwrap();
    let d = Daemon::start(lan.host(3), &cfg).unwrap();
    let s = etcd::wait_status(&cfg, WAIT, "wrong password reported", |s| {
        s["fleet"]["error"].is_string()
    })
    .unwrap();
    let e = s["fleet"]["error"].as_str().unwrap();
    assert!(
        e.contains("credentials of user \"host-1\"") && e.contains("authentication failed"),
        "{e}"
    );
    drop(d);
}

/// Waits until each host has applied `revision`, then checks by traffic
/// that each admits exactly `members` among the hosts and the outsider.
fn everyone_enforces(
    lan: &Lan,
    hosts: &[&Host],
    daemons: &[usize],
    revision: i64,
    members: &[usize],
) {
    converge(hosts, revision);
    let mut sources = daemons.to_vec();
    sources.push(OUTSIDER);
    admits_exactly(lan, daemons, &sources, members);
}

const OUTSIDER: usize = 6;

/// Three etcd members and five daemons: a killed member, then a killed
/// leader, a partitioned host healed, a daemon restarted during a burst of
/// changes, a watch resumed from a compacted revision: each ends with every
/// host on the latest revision (status) and admitting exactly the members
/// (traffic).
#[test]
fn every_host_converges_through_etcd_failures_partitions_and_restarts() {
    require_root!();
    let (lan, mut etcd) = lan_with_etcd(5, 3);
    let mut hosts: Vec<Host> = (1..=5).map(|i| start_host(&lan, &etcd, i, "")).collect();
    let daemons = [1, 2, 3, 4, 5];
    for h in &hosts {
        etcd::wait_status(&h.cfg, WAIT, "five members", |s| {
            s["fleet"]["members"].as_u64() == Some(5)
        })
        .unwrap();
    }
    let outsider = format!(r#"{{"addresses":["{}"]}}"#, Lan::v4(OUTSIDER));

    // A follower killed: the others carry on.
    let leader = etcd.leader().unwrap();
    let follower = (leader + 1) % 3;
    etcd.members[follower].kill();
    let rev = etcd.put(&member_key("outsider"), &outsider).unwrap();
    let all: Vec<&Host> = hosts.iter().collect();
    everyone_enforces(&lan, &all, &daemons, rev, &[1, 2, 3, 4, 5, 6]);
    etcd.members[follower].restart().unwrap();
    etcd.wait_writable(WAIT).unwrap();

    // The leader killed: a new one is elected, the hosts follow it.
    let leader = etcd.leader().unwrap();
    etcd.members[leader].kill();
    etcd.wait_writable(WAIT).unwrap();
    let rev = etcd.del(&member_key("outsider")).unwrap();
    everyone_enforces(&lan, &all, &daemons, rev, &[1, 2, 3, 4, 5]);
    etcd.members[leader].restart().unwrap();
    etcd.wait_writable(WAIT).unwrap();

    // Host 5 partitioned: the others follow a change; healed, it catches up.
    lan.host(5)
        .ip(&["link", "set", HOST_IFACE, "down"])
        .unwrap();
    let rev = etcd.put(&member_key("outsider"), &outsider).unwrap();
    everyone_enforces(&lan, &all[..4], &[1, 2, 3, 4], rev, &[1, 2, 3, 4, 5, 6]);
    let healed = Instant::now();
    lan.host(5).ip(&["link", "set", HOST_IFACE, "up"]).unwrap();
    converge(&all[4..], rev);
    eprintln!(
        "host 5 caught up {:?} after the partition healed",
        healed.elapsed()
    );
    everyone_enforces(&lan, &all, &daemons, rev, &[1, 2, 3, 4, 5, 6]);

    // A daemon restarted during a burst of changes.
    let mut last = 0;
    for k in 0..30 {
        let key = member_key(&format!("burst-{}", k % 5));
        let value = format!(r#"{{"addresses":["10.200.10.{}"]}}"#, 100 + k);
        last = etcd.put(&key, &value).unwrap();
        if k == 5 {
            hosts[3].daemon.take().map(Daemon::kill);
        }
        if k == 15 {
            hosts[3].daemon = Some(Daemon::start(lan.host(4), &hosts[3].cfg).unwrap());
        }
    }
    for k in 0..5 {
        last = etcd.del(&member_key(&format!("burst-{k}"))).unwrap();
    }
    let all: Vec<&Host> = hosts.iter().collect();
    everyone_enforces(&lan, &all, &daemons, last, &[1, 2, 3, 4, 5, 6]);
    for h in &all {
        let peers = etcd::status(&h.cfg)["fleet"]["members"].as_u64();
        assert_eq!(peers, Some(6), "five hosts and the outsider");
    }

    // A daemon whose saved revision was compacted reads the list again.
    hosts[0].daemon.take().map(Daemon::kill);
    let rev = etcd.del(&member_key("outsider")).unwrap();
    etcd.ctl(&["compact", &rev.to_string()]).unwrap();
    hosts[0].daemon = Some(Daemon::start(lan.host(1), &hosts[0].cfg).unwrap());
    let all: Vec<&Host> = hosts.iter().collect();
    everyone_enforces(&lan, &all, &daemons, rev, &[1, 2, 3, 4, 5]);
    let log = hosts[0].daemon.as_ref().unwrap().log();
    assert!(
        log.contains("compacted"),
        "no full read after compaction:\n{log}"
    );
}

/// Under the shipped unit (`IPAddressDeny=any`) the daemon cannot reach
/// etcd, and says so; with the drop-in docs/fleet.md gives
/// (`IPAddressAllow=` the endpoints) it follows the list: a member added in
/// etcd is admitted by the data path (a closed port answers with a reset
/// instead of dropping the SYN).
#[test]
fn under_the_shipped_unit_etcd_is_reached_through_the_documented_drop_in() {
    use portcullis_tests::container::*;
    require_root!();
    let config = format!(
        "interfaces = [\"{INSTANCE_IFACE}\"]\n[ssh]\nallow = false\n\
         [fleet]\nendpoints = [\"https://{CLIENT_V4}:2379\"]\nca_file = \"/etc/portcullis/etcd-ca.pem\"\n\
         username = \"host-1\"\npassword_file = \"/etc/portcullis/etcd-password\"\nprefix = \"{}\"\n\
         cluster_id = \"{}\"\nallowed_ranges = [\"10.200.60.0/24\"]\nname = \"host-1\"\n\
         addresses = [\"{INSTANCE_V4}\"]\nlease_ttl_secs = 3\n",
        etcd::PREFIX,
        etcd::CLUSTER
    );
    let mut c = Boot::new()
        .portcullis(&config)
        .unwrap()
        .file("/etc/portcullis/etcd-password", "pw-host-1\n", 0o600)
        .prepare()
        .unwrap();
    let etcd = Etcd::start(&[(&c.client, CLIENT_V4.to_string())]).unwrap();
    etcd.enable_auth(&[("host-1", "pw-host-1")]).unwrap();
    std::fs::copy(
        etcd.pki.ca(),
        c.host_path(std::path::Path::new("/etc/portcullis/etcd-ca.pem")),
    )
    .unwrap();
    c.boot(Duration::from_secs(120)).unwrap();
    let status = |c: &Container| -> serde_json::Value {
        let out = c.exec("portcullis", &["--json", "status"]).unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
    };
    let journal = |c: &Container| c.journal("portcullis.service");

    // As shipped: enforcing, but etcd is out of reach, and the status says why.
    let s = c
        .wait_for("the fleet error", WAIT * 2, || {
            Some(status(&c)).filter(|s| s["enforcing"] == true && s["fleet"]["error"].is_string())
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", journal(&c)));
    let e = s["fleet"]["error"].as_str().unwrap();
    assert!(e.contains("cannot connect to etcd"), "{e}");

    // The drop-in: etcd followed, this host registered.
    let dir = c.host_path(std::path::Path::new(
        "/etc/systemd/system/portcullis.service.d",
    ));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("etcd.conf"),
        format!("[Service]\nIPAddressAllow={CLIENT_V4}\n"),
    )
    .unwrap();
    c.check("systemctl", &["daemon-reload"]).unwrap();
    c.check("systemctl", &["restart", "portcullis.service"])
        .unwrap();
    c.wait_for("registered", WAIT * 2, || {
        Some(status(&c)).filter(|s| s["fleet"]["members"] == 1 && s["fleet"]["error"].is_null())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", journal(&c)));

    // The client is not a member: its SYN is dropped. Added: admitted.
    let closed = sock(INSTANCE_V4, 9);
    let probe = || {
        c.client
            .enter(|| std::net::TcpStream::connect_timeout(&closed, PROBE_TIMEOUT))
    };
    let err = probe().unwrap_err();
    assert_ne!(
        err.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "admitted before it was a member"
    );
    let rev = etcd
        .put(
            &member_key("client"),
            &format!(r#"{{"addresses":["{CLIENT_V4}"]}}"#),
        )
        .unwrap();
    c.wait_for("the client admitted", WAIT, || {
        Some(status(&c)).filter(|s| s["fleet"]["revision"].as_i64() >= Some(rev))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", journal(&c)));
    let err = probe().unwrap_err();
    assert_eq!(
        err.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "the member's SYN was not admitted"
    );
}

/// etcd asking for client certificates: a host with `cert_file` and
/// `key_file` follows it and registers; one without is refused, and the
/// error names the client certificate.
#[test]
fn client_certificates_are_presented_when_etcd_asks_for_them() {
    require_root!();
    let (lan, etcd) = lan_with_etcd_tls(2, 1, true);
    let certs = format!(
        "cert_file = \"{}\"\nkey_file = \"{}\"\n",
        etcd.pki.path("client.pem").display(),
        etcd.pki.path("client-key.pem").display()
    );
    let with = |i: usize, certs: &str| {
        let pins = PinDir::new().unwrap();
        let pw = etcd.pki.secret(&format!("pw-{i}"), &password(i)).unwrap();
        let section = etcd::fleet_section(&etcd, &name(i), &pw, &[Lan::v4(i)]);
        let section = section.replace("[fleet]\n", &format!("[fleet]\n{certs}"));
        let cfg = ConfigFile::new(&config_text(&pins, &section)).unwrap();
        let daemon = Daemon::start(lan.host(i), &cfg).expect("start portcullisd");
        Host {
            cfg,
            daemon: Some(daemon),
            _pins: pins,
        }
    };
    let a = with(1, &certs);
    etcd::wait_status(&a.cfg, WAIT, "registered with a client certificate", |s| {
        s["fleet"]["members"].as_u64() == Some(1) && s["fleet"]["error"].is_null()
    })
    .unwrap();
    let b = with(2, "");
    let s = etcd::wait_status(&b.cfg, WAIT, "refused without one", |s| {
        s["fleet"]["error"].is_string()
    })
    .unwrap();
    let e = s["fleet"]["error"].as_str().unwrap();
    assert!(e.contains("TLS") && e.contains("cert_file"), "{e}");
    assert_eq!(
        etcd::status(&a.cfg)["fleet"]["members"].as_u64(),
        Some(1),
        "host 2 registered without a certificate"
    );
}

/// A host whose role may not write the key it names is not registered,
/// says why, and still follows the member list.
#[test]
fn a_host_that_may_not_register_still_follows_the_list() {
    require_root!();
    let (lan, etcd) = lan_with_etcd(1, 1);
    let pins = PinDir::new().unwrap();
    let pw = etcd.pki.secret("pw-1", &password(1)).unwrap();
    let section = etcd::fleet_section(&etcd, &name(1), &pw, &[Lan::v4(1)])
        .replace("\nname = \"host-1\"", "\nname = \"host-9\"");
    let cfg = ConfigFile::new(&config_text(&pins, &section)).unwrap();
    let daemon = Daemon::start(lan.host(1), &cfg).unwrap();
    let rev = etcd
        .put(&member_key("outsider"), r#"{"addresses":["10.200.10.2"]}"#)
        .unwrap();
    let s = etcd::wait_status(&cfg, WAIT, "the list followed", |s| {
        s["fleet"]["revision"].as_i64() >= Some(rev)
    })
    .unwrap();
    assert_eq!(s["fleet"]["members"].as_u64(), Some(1), "{s}");
    assert!(s["fleet"]["error"].is_null(), "{s}");
    assert!(reaches(&lan, 2, 1), "the member is not admitted");
    let log = daemon.log();
    assert!(
        log.contains("not registered") && log.contains("permission denied"),
        "{log}"
    );
}
