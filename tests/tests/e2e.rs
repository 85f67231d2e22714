//! End to end, as a provider's validation suite sees a new instance: a
//! Debian container booted with systemd-nspawn and provisioned by real
//! cloud-init from `systemd/cloud-init/user-data.yaml` (which installs the
//! Debian package from a local repository), checked from outside. Then an
//! upgrade to the next package version under traffic, and a purge.
//!
//! Run by `cargo xtask e2e` (part of `cargo xtask test`), which builds the
//! packages and sets PORTCULLIS_E2E_DIR; ignored by a plain `cargo test`.

use std::{
    net::{SocketAddr, TcpStream, UdpSocket},
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use portcullis_tests::{
    Flood, Netns, TcpServer,
    container::{Boot, CLIENT_IFACE, CLIENT_V4, Container, INSTANCE_V4, SshKey},
    echo_roundtrip, is_root, ping, sock, tcp_echo_server,
};

/// The cluster peer and the member of another cluster, as the example
/// user-data names them; both live in the client namespace.
const PEER_V4: &str = "10.200.60.3";
const OTHER_CLUSTER_V4: &str = "10.200.60.4";
/// The example's rule port, and ports nothing admits.
const RULE_PORT: u16 = 8888;
const CLOSED_PORT: u16 = 9999;
const UDP_DENIED_PORT: u16 = 9998;

fn e2e_dir() -> PathBuf {
    PathBuf::from(std::env::var("PORTCULLIS_E2E_DIR").expect(
        "PORTCULLIS_E2E_DIR is not set: run this through `cargo xtask e2e`, which builds the packages",
    ))
}

/// The example user-data with its REPLACE lines filled in: the key.
fn user_data(key: &SshKey) -> String {
    let example = include_str!("../../systemd/cloud-init/user-data.yaml");
    let placeholder = example
        .lines()
        .find(|l| l.contains("add-key, --user"))
        .expect("the example injects a key");
    let start = placeholder.find("\"ssh-ed25519").expect("a quoted key") + 1;
    let end = placeholder.rfind('"').unwrap();
    example.replace(&placeholder[start..end], &key.public().unwrap())
}

/// TCP connect from `ns`, from source `src`, within 700 ms.
fn connect_from(ns: &Netns, src: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
    ns.enter(|| {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        s.bind(&sock(src, 0).into())?;
        s.connect_timeout(&to.into(), Duration::from_millis(700))?;
        Ok(s.into())
    })
}

fn reachable(ns: &Netns, src: &str, port: u16) -> bool {
    connect_from(ns, src, sock(INSTANCE_V4, port)).is_ok()
}

fn out(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
#[ignore = "run by `cargo xtask e2e`"]
fn a_new_instance_provisioned_by_cloud_init_passes_validation_upgrades_and_purges() {
    assert!(is_root(), "the end-to-end test needs root");
    let dir = e2e_dir();
    let key = SshKey::new().unwrap();
    let stranger = SshKey::new().unwrap();
    let booted = Instant::now();
    let c = Boot::new()
        .bind_ro(&dir.join("repo"), "/srv/portcullis")
        .bind_ro(&dir.join("next"), "/srv/portcullis-next")
        .file(
            "/var/lib/cloud/seed/nocloud/meta-data",
            "instance-id: portcullis-e2e\nlocal-hostname: e2e\n",
            0o644,
        )
        .file(
            "/var/lib/cloud/seed/nocloud/user-data",
            user_data(&key),
            0o644,
        )
        .start(Duration::from_secs(600))
        .unwrap();
    eprintln!("booted and provisioned in {:?}", booted.elapsed());
    let journal = || c.journal("portcullis.service");

    // cloud-init finished, and without errors: its runcmd included
    // `portcullis wait-ready`, which returned once SSH was ready.
    let status = c
        .exec("cloud-init", &["status", "--wait", "--long"])
        .unwrap();
    assert!(
        status.status.success() && out(&status).contains("status: done"),
        "{}\n{}",
        out(&status),
        c.exec("cat", &["/var/log/cloud-init-output.log"])
            .map(|o| out(&o))
            .unwrap_or_default()
    );
    let log = c.check("cat", &["/var/log/cloud-init-output.log"]).unwrap();
    assert!(log.contains("SSH-ready"), "wait-ready output:\n{log}");
    let state = c.system_state();
    let failed = c
        .check(
            "systemctl",
            &["list-units", "--failed", "--no-legend", "--plain"],
        )
        .unwrap_or_default();
    eprintln!("system state: {state}; failed units: {:?}", failed.trim());
    assert!(
        state == "running" || state == "degraded",
        "system state {state}"
    );
    let version = c
        .check("dpkg-query", &["-W", "-f=${Version}", "portcullis"])
        .unwrap();
    eprintln!("installed portcullis {version}");
    // Protected before the network is configured, with no ordering cycle
    // against cloud-init's early units.
    let before = c
        .check("systemctl", &["show", "-p", "Before", "portcullis.service"])
        .unwrap();
    assert!(before.contains("network-pre.target"), "{before}");
    let boot_log = c
        .check("journalctl", &["-b", "--no-pager", "-o", "cat"])
        .unwrap();
    assert!(
        !boot_log.to_lowercase().contains("ordering cycle"),
        "{}",
        boot_log
            .lines()
            .filter(|l| l.to_lowercase().contains("cycle"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // The hardening score of the installed unit, on this systemd.
    let security = c
        .check(
            "systemd-analyze",
            &["security", "--no-pager", "portcullis.service"],
        )
        .unwrap();
    let (exposure, exposure_line) =
        portcullis_tests::security_exposure(&security).unwrap_or((f64::MAX, String::new()));
    eprintln!("{exposure_line}");
    assert!(exposure <= 2.2, "{security}");

    // SSH with the injected key works through the firewall; another key is
    // refused by sshd.
    let o = key
        .ssh(&c.client, "admin", INSTANCE_V4)
        .arg("id -un")
        .output()
        .unwrap();
    assert!(
        o.status.success() && out(&o).contains("admin"),
        "{}\n{}",
        out(&o),
        journal()
    );
    let o = stranger
        .ssh(&c.client, "admin", INSTANCE_V4)
        .arg("true")
        .output()
        .unwrap();
    assert!(!o.status.success() && out(&o).contains("Permission denied"));

    // Ports: the rule port is reachable, a port nothing admits is not.
    c.client
        .ip(&["addr", "add", &format!("{PEER_V4}/24"), "dev", CLIENT_IFACE])
        .unwrap();
    c.client
        .ip(&[
            "addr",
            "add",
            &format!("{OTHER_CLUSTER_V4}/24"),
            "dev",
            CLIENT_IFACE,
        ])
        .unwrap();
    let _rule = TcpServer::start(&c.instance, sock("0.0.0.0", RULE_PORT)).unwrap();
    let _closed = TcpServer::start(&c.instance, sock("0.0.0.0", CLOSED_PORT)).unwrap();
    assert!(reachable(&c.client, CLIENT_V4, RULE_PORT));
    assert!(!reachable(&c.client, CLIENT_V4, CLOSED_PORT));
    // Clusters: the peer reaches every port; the other cluster's member
    // reaches what the rules admit and nothing else.
    assert!(reachable(&c.client, PEER_V4, CLOSED_PORT));
    assert!(reachable(&c.client, PEER_V4, RULE_PORT));
    assert!(!reachable(&c.client, OTHER_CLUSTER_V4, CLOSED_PORT));
    assert!(reachable(&c.client, OTHER_CLUSTER_V4, RULE_PORT));
    let counters = c.check("portcullis", &["counters"]).unwrap();
    let other = counters
        .lines()
        .find(|l| l.trim_start().starts_with("drop_other_cluster"))
        .unwrap_or_default();
    assert!(
        other.split_whitespace().nth(1).is_some_and(|n| n != "0"),
        "{counters}"
    );

    // Outbound from the instance: a TCP connection and pings get replies.
    tcp_echo_server(&c.client, sock(CLIENT_V4, 7000)).unwrap();
    let mut s = c
        .instance
        .enter(|| TcpStream::connect_timeout(&sock(CLIENT_V4, 7000), Duration::from_secs(3)))
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    echo_roundtrip(&mut s, b"outbound\n").unwrap();
    assert!(ping(&c.instance, CLIENT_V4), "ping from the instance");

    upgrade_without_a_gap(&c);
    purge_leaves_the_host_open(&c);
}

/// Upgrade N -> N+1 while a sender keeps hitting a denied UDP port and an
/// allowed TCP connection keeps talking.
fn upgrade_without_a_gap(c: &Container) {
    let pid_before = c
        .check(
            "systemctl",
            &["show", "-p", "MainPID", "--value", "portcullis"],
        )
        .unwrap();
    tcp_echo_server(&c.instance, sock("0.0.0.0", RULE_PORT + 1)).unwrap();
    // The allowed stream: opened before, used during and after. (Port
    // RULE_PORT + 1 is not in the rules; the stream is from the cluster
    // peer, which reaches every port.)
    let mut stream = connect_from(&c.client, PEER_V4, sock(INSTANCE_V4, RULE_PORT + 1)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    echo_roundtrip(&mut stream, b"before\n").unwrap();

    let sink = c
        .instance
        .enter(|| UdpSocket::bind(sock("0.0.0.0", UDP_DENIED_PORT)))
        .unwrap();
    let flood = Flood::start(
        &c.client,
        sink,
        sock(INSTANCE_V4, UDP_DENIED_PORT),
        Duration::from_micros(500),
    )
    .unwrap();
    thread::sleep(Duration::from_millis(300));
    let next = std::fs::read_dir(e2e_dir().join("next"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.ends_with(".deb"))
        .expect("the next version's package");
    let upgraded = c
        .exec(
            "apt-get",
            &[
                "install",
                "-y",
                "-q",
                &format!("/srv/portcullis-next/{next}"),
            ],
        )
        .unwrap();
    assert!(upgraded.status.success(), "{}", out(&upgraded));
    // While the new daemon settles, and after.
    c.check("portcullis", &["wait-ready", "--timeout", "30"])
        .unwrap();
    echo_roundtrip(&mut stream, b"after\n").unwrap();
    thread::sleep(Duration::from_millis(300));
    let (sent, received) = flood.stop();
    let version = c
        .check("dpkg-query", &["-W", "-f=${Version}", "portcullis"])
        .unwrap();
    let pid_after = c
        .check(
            "systemctl",
            &["show", "-p", "MainPID", "--value", "portcullis"],
        )
        .unwrap();
    eprintln!(
        "upgrade to {version}: daemon pid {} -> {}; {sent} datagrams sent to the denied port, {received} received; the allowed stream survived",
        pid_before.trim(),
        pid_after.trim()
    );
    assert!(version.ends_with("-2"), "{version}");
    assert_ne!(pid_before.trim(), pid_after.trim(), "the service restarted");
    assert!(sent > 100, "the sender kept sending ({sent})");
    assert_eq!(
        received, 0,
        "a denied datagram got through during the upgrade"
    );
}

/// Purge removes the package and detaches everything: the host is open,
/// not locked out by programs nobody can manage any more.
fn purge_leaves_the_host_open(c: &Container) {
    assert!(!reachable(&c.client, CLIENT_V4, CLOSED_PORT));
    let purged = c
        .exec("apt-get", &["purge", "-y", "-q", "portcullis"])
        .unwrap();
    assert!(purged.status.success(), "{}", out(&purged));
    assert!(
        reachable(&c.client, CLIENT_V4, CLOSED_PORT),
        "the host stays filtered after purge"
    );
    let link = c.instance.ip(&["-d", "link", "show", "eth0"]).unwrap();
    assert!(!link.contains("xdp"), "{link}");
    for gone in [
        "/run/bpffs/portcullis",
        "/var/lib/portcullis",
        "/usr/bin/portcullisd",
    ] {
        let o = c.exec("test", &["-e", gone]).unwrap();
        assert!(!o.status.success(), "{gone} is still there");
    }
}
