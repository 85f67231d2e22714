//! What a host needs to keep working under default deny, with the real
//! daemons: a DHCP lease from dnsmasq (and its renewal), a SLAAC address and
//! default route from radvd, and neighbour entries that stay reachable across
//! many expiries.

use std::{
    fs,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use portcullis_tests::*;

/// A child process killed on drop.
struct Bg(Child);

impl Drop for Bg {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(cmd: &mut Command) -> Bg {
    Bg(cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}")))
}

/// Polls `f` until it returns true, for at most `secs` seconds.
fn eventually(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(100));
    }
}

fn protect(pair: &Pair, pins: &PinDir) -> Daemon {
    let cfg = config(pins, false, "").unwrap();
    let daemon = Daemon::start(&pair.host, &cfg).expect("start portcullisd");
    // The config file only needs to live until the daemon has read it.
    drop(cfg);
    daemon
}

#[test]
fn dhcp_lease_is_obtained_and_renewed() {
    require_root!();
    let pair = Pair::new().unwrap();
    let pins = PinDir::new().unwrap();
    let _daemon = protect(&pair, &pins);
    let dir = tempfile::tempdir().unwrap();

    let _dnsmasq = spawn(pair.peer.command("dnsmasq").args([
        "--no-daemon",
        "--conf-file=/dev/null",
        "--port=0",
        "--user=root",
        "--interface=pc1",
        "--bind-interfaces",
        "--dhcp-authoritative",
        "--dhcp-range=10.200.0.100,10.200.0.150,2m",
        &format!("--dhcp-leasefile={}", dir.path().join("leases").display()),
        "--pid-file=",
    ]));
    // udhcpc runs this script on each event: "bound", "renew", ...
    let events = dir.path().join("events");
    let script = dir.path().join("script");
    fs::write(
        &script,
        format!("#!/bin/sh\necho \"$1 $ip\" >> {}\n", events.display()),
    )
    .unwrap();
    run(Command::new("chmod").arg("+x").arg(&script)).unwrap();
    let client = spawn(
        pair.host
            .command("udhcpc")
            .args(["-f", "-i", HOST_IFACE, "-t", "20", "-T", "1", "-s"])
            .arg(&script),
    );

    let read = || fs::read_to_string(&events).unwrap_or_default();
    eventually(20, "a DHCP lease", || read().contains("bound 10.200.0.1"));
    let lease = read()
        .lines()
        .find(|l| l.starts_with("bound"))
        .unwrap()
        .to_string();
    let ip = lease.split_whitespace().nth(1).unwrap().to_string();

    // Renew now (SIGUSR1) instead of waiting for T1: a unicast request and
    // a unicast ACK, through the filter.
    let before = pins.counter(Reason::PassDhcp) + pins.counter(Reason::PassEstablished);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(client.0.id() as i32),
        nix::sys::signal::Signal::SIGUSR1,
    )
    .unwrap();
    eventually(15, "the lease renewal", || {
        read().contains(&format!("renew {ip}"))
    });
    let after = pins.counter(Reason::PassDhcp) + pins.counter(Reason::PassEstablished);
    assert!(
        after > before,
        "the renewal ACK was not counted as admitted"
    );
    assert!(
        pins.counter(Reason::PassDhcp) >= 1,
        "no DHCP reply was admitted as such"
    );
}

#[test]
fn slaac_address_and_default_route_from_router_advertisements() {
    require_root!();
    let pair = Pair::new().unwrap();
    let pins = PinDir::new().unwrap();
    let _daemon = protect(&pair, &pins);
    pair.peer
        .sysctl("net.ipv6.conf.all.forwarding", "1")
        .unwrap();
    pair.host
        .sysctl("net.ipv6.conf.pc0.accept_ra", "2")
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("radvd.conf");
    fs::write(
        &conf,
        "interface pc1 {\n AdvSendAdvert on;\n MinRtrAdvInterval 3;\n MaxRtrAdvInterval 4;\n \
         prefix fd00:200:5::/64 { AdvOnLink on; AdvAutonomous on; };\n};\n",
    )
    .unwrap();
    let _radvd = spawn(
        pair.peer
            .command("radvd")
            .args(["-n", "-m", "stderr", "-C"])
            .arg(&conf)
            .arg("-p")
            .arg(dir.path().join("pid")),
    );

    eventually(20, "a SLAAC address", || {
        pair.host
            .ip(&["-6", "addr", "show", "dev", HOST_IFACE])
            .unwrap()
            .contains("fd00:200:5:")
    });
    eventually(10, "a default route", || {
        pair.host
            .ip(&["-6", "route", "show", "default"])
            .unwrap()
            .contains("via fe80::")
    });
    assert!(pins.counter(Reason::PassNeighbor) >= 1);
}

#[test]
fn neighbour_entries_stay_reachable_across_expiries() {
    require_root!();
    let pair = Pair::new().unwrap();
    let pins = PinDir::new().unwrap();
    let _daemon = protect(&pair, &pins);
    for (ns, dev) in [(&pair.host, HOST_IFACE), (&pair.peer, PEER_IFACE)] {
        for family in ["ipv4", "ipv6"] {
            let key = |k: &str| format!("net.{family}.neigh.{dev}.{k}");
            ns.sysctl(&key("base_reachable_time_ms"), "500").unwrap();
            ns.sysctl(&key("delay_first_probe_time"), "1").unwrap();
        }
    }
    let arp0 = pins.counter(Reason::PassArp);
    let nd0 = pins.counter(Reason::PassNeighbor);
    // About 8 s of pings from the protected host: many reachable-time expiries.
    for addr in [PEER_V4, PEER_V6] {
        let out = pair
            .host
            .command("ping")
            .args(["-c", "20", "-i", "0.4", "-W", "1", addr])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains(" 0% packet loss"),
            "pings to {addr} lost:\n{text}"
        );
    }
    let state = pair.host.ip(&["neigh", "show", "dev", HOST_IFACE]).unwrap();
    assert!(!state.contains("FAILED"), "{state}");
    // Entries were re-confirmed by fresh ARP replies / neighbour advertisements.
    assert!(
        pins.counter(Reason::PassArp) >= arp0 + 3,
        "too few ARP replies admitted"
    );
    assert!(
        pins.counter(Reason::PassNeighbor) >= nd0 + 3,
        "too few NAs admitted"
    );
}
