//! Which interfaces get protected: automatic selection, links that appear
//! while the daemon runs, the mode XDP runs in, and an explicit list.

use std::{
    thread,
    time::{Duration, Instant},
};

use portcullis_tests::*;

fn has_xdp(ns: &Netns, dev: &str) -> bool {
    ns.ip(&["-d", "link", "show", dev])
        .map(|out| out.contains("prog/xdp"))
        .unwrap_or(false)
}

/// Creates `host_if` in `host` joined to a new namespace, addressed
/// 10.200.5.1/24 and 10.200.5.2/24; returns the new namespace.
fn late_link(host: &Netns, host_if: &str) -> (Netns, Instant) {
    let late = Netns::new("l").unwrap();
    // The link appears now (the namespace made before it is not its time).
    let created = Instant::now();
    veth(host, host_if, &late, "l0").unwrap();
    host.ip(&["addr", "add", "10.200.5.1/24", "dev", host_if])
        .unwrap();
    late.ip(&["addr", "add", "10.200.5.2/24", "dev", "l0"])
        .unwrap();
    (late, created)
}

#[test]
fn automatic_selection_and_links_that_appear_later() {
    require_root!();
    let pair = Pair::new().unwrap();
    let other = Netns::new("o").unwrap();
    // Links automatic mode must leave alone: a container-runtime veth and bridge.
    veth(&pair.host, "veth9", &other, "eth0").unwrap();
    pair.host
        .ip(&["link", "add", "docker0", "type", "bridge"])
        .unwrap();
    pair.host.ip(&["link", "set", "docker0", "up"]).unwrap();
    let pins = PinDir::new().unwrap();
    // Test links are veths, so name them in; everything else is automatic.
    let cfg = ConfigFile::new(&format!(
        "pin_dir = \"{}\"\nauto_include = [\"pc*\", \"veth*\"]\n",
        pins.path().display()
    ))
    .unwrap();
    let daemon = Daemon::start(&pair.host, &cfg).unwrap();
    let log = daemon.log();
    assert!(
        log.lines().any(|l| l.contains("enforcing")
            && l.contains("interface=pc0")
            && l.contains("xdp_mode=native")),
        "pc0 not reported as enforcing natively:\n{log}"
    );
    assert!(has_xdp(&pair.host, HOST_IFACE));
    assert!(!has_xdp(&pair.host, "veth9"), "excluded veth9 was attached");
    assert!(
        !has_xdp(&pair.host, "docker0"),
        "bridge docker0 was attached"
    );
    assert!(!has_xdp(&pair.host, "lo"), "loopback was attached");

    // A new link is protected within a second of appearing.
    TcpServer::start(&pair.host, sock(HOST_V4, 9090)).unwrap();
    let (late, created) = late_link(&pair.host, "pc5");
    while !has_xdp(&pair.host, "pc5") {
        assert!(
            created.elapsed() < Duration::from_secs(1),
            "pc5 not protected after 1 s:\n{}",
            daemon.log()
        );
        thread::sleep(Duration::from_millis(10));
    }
    eprintln!(
        "pc5 protected {} ms after it was created",
        created.elapsed().as_millis()
    );
    TcpServer::start(&pair.host, sock("10.200.5.1", 9091)).unwrap();
    let r = tcp_probe(&late, sock("10.200.5.1", 9091));
    assert!(r.is_err(), "inbound connection over the new link admitted");
    drop(daemon);
}

#[test]
fn an_explicit_list_overrides_automatic_selection() {
    require_root!();
    let pair = Pair::new().unwrap();
    let pins = PinDir::new().unwrap();
    let cfg = config(&pins, false, "").unwrap();
    let daemon = Daemon::start(&pair.host, &cfg).unwrap();
    let _late = late_link(&pair.host, "pc5");
    thread::sleep(Duration::from_millis(500));
    assert!(has_xdp(&pair.host, HOST_IFACE));
    assert!(
        !has_xdp(&pair.host, "pc5"),
        "pc5 is not in the list but was attached"
    );
    drop(daemon);
}
