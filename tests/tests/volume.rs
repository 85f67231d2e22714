//! Egress volume per destination (issue 19): a transfer of a known size to
//! one destination is reported within a few percent, its packets counted
//! as the segments that left (not the offloaded frames the stack handed
//! down), and an alert is raised when it passes the configured volume; a
//! spray of destinations fills the data path's table without pushing a
//! heavy destination out, and what did not fit is reported as overflow.

use std::{
    io::Write as _,
    net::IpAddr,
    time::{Duration, Instant},
};

use portcullis_tests::*;

const SINK_PORT: u16 = 9000;

struct Env {
    pair: Pair,
    pins: PinDir,
    config: ConfigFile,
    daemon: Daemon,
}

impl Env {
    fn new(volume: &str) -> Env {
        let pair = Pair::new().unwrap();
        let pins = PinDir::new().unwrap();
        let config = ConfigFile::new(&config_text(&pins, volume)).unwrap();
        let daemon = Daemon::start(&pair.host, &config).expect("start portcullisd");
        Env {
            pair,
            pins,
            config,
            daemon,
        }
    }

    fn status(&self) -> serde_json::Value {
        let out = cli(&self.config, &["status", "--json"]);
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "status --json: {e}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    /// The status row of `destination`:`port`/`protocol`, if any.
    fn row(&self, destination: &str, protocol: &str, port: u16) -> Option<serde_json::Value> {
        let status = self.status();
        status["egress_volume"]["top"]
            .as_array()?
            .iter()
            .find(|d| {
                d["destination"] == destination && d["protocol"] == protocol && d["port"] == port
            })
            .cloned()
    }

    /// Sends `len` bytes from the host to the peer's sink; returns what the
    /// peer received.
    fn send_to_peer(&self, len: usize) -> usize {
        let rx = tcp_sink_server(&self.pair.peer, sock(PEER_V4, SINK_PORT)).unwrap();
        let mut s = tcp_connect(&self.pair.host, sock(PEER_V4, SINK_PORT)).unwrap();
        send_bytes(&mut s, len).unwrap();
        rx.recv_timeout(BULK_TIMEOUT).unwrap().unwrap()
    }
}

#[test]
fn a_transfer_is_reported_within_a_few_percent_and_alerts_once() {
    require_root!();
    let env = Env::new("[egress_volume]\nalert_bytes = 4000000\ninterval_secs = 600\n");
    let len = 8 << 20;
    assert_eq!(env.send_to_peer(len), len, "the peer received it all");
    let row = env
        .row(PEER_V4, "tcp", SINK_PORT)
        .unwrap_or_else(|| panic!("no row for {PEER_V4}:{SINK_PORT}: {}", env.status()));
    let bytes = row["bytes"].as_u64().unwrap();
    let packets = row["packets"].as_u64().unwrap();
    // IP and TCP headers on top of the payload: a few percent at most.
    let ratio = bytes as f64 / len as f64;
    println!("sent {len} payload bytes; counted {bytes} bytes ({ratio:.4}x), {packets} packets");
    assert!(
        (1.0..1.06).contains(&ratio),
        "counted {bytes} bytes for a {len}-byte transfer ({ratio:.4}x)"
    );
    // At most one MSS (1448 bytes on a 1500-byte MTU) per segment that
    // left: the offloaded frames handed down (up to 64 KiB each) are far
    // fewer, so counting frames fails this.
    let segments = len as u64 / 1448;
    assert!(
        packets >= segments && packets <= segments * 11 / 10 + 20,
        "counted {packets} packets for {segments} full segments"
    );
    // Over 4,000,000 bytes in the window: one alert, in the journal and to
    // `watch` (the recent events).
    let log = env.daemon.log();
    assert_eq!(
        log.matches("a destination passed the alert volume").count(),
        1,
        "{log}"
    );
    let status = env.status();
    let alerts: Vec<_> = status["recent_drops"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["reason"] == "alert_egress_volume")
        .collect();
    assert_eq!(alerts.len(), 1, "{status}");
    assert_eq!(alerts[0]["destination"], PEER_V4);
    // More traffic in the same window raises no second alert.
    env.send_to_peer(1 << 20);
    env.status();
    let log = env.daemon.log();
    assert_eq!(log.matches("passed the alert volume").count(), 1, "{log}");
    let metrics = String::from_utf8_lossy(&cli(&env.config, &["metrics"]).stdout).into_owned();
    assert!(
        metrics.contains(&format!(
            "portcullis_egress_bytes_total{{destination=\"{PEER_V4}\",protocol=\"tcp\",port=\"{SINK_PORT}\"}}"
        )),
        "{metrics}"
    );
}

/// Entries in the pinned per-destination table.
fn table_entries(pins: &PinDir) -> usize {
    let dir = portcullis::dataplane::maps_dir(pins.path());
    let data = aya::maps::MapData::from_pin(dir.join("EGRESS_VOLUME")).unwrap();
    let map = aya::maps::Map::PerCpuHashMap(data);
    let table: aya::maps::PerCpuHashMap<
        _,
        portcullis_common::VolumeKey,
        portcullis_common::Counter,
    > = aya::maps::PerCpuHashMap::try_from(&map).unwrap();
    table.keys().count()
}

#[test]
fn a_spray_of_destinations_cannot_push_out_a_heavy_one_unnoticed() {
    require_root!();
    let env = Env::new("");
    // Everything in 10.200.128.0/17 goes out by the peer (which drops it):
    // thousands of destinations without thousands of hosts.
    env.pair
        .host
        .ip(&["route", "add", "10.200.128.0/17", "via", PEER_V4])
        .unwrap();
    // The heavy destination: a steady stream for the whole spray.
    let rx = tcp_sink_server(&env.pair.peer, sock(PEER_V4, SINK_PORT)).unwrap();
    let mut heavy = tcp_connect(&env.pair.host, sock(PEER_V4, SINK_PORT)).unwrap();
    heavy.set_write_timeout(Some(BULK_TIMEOUT)).unwrap();
    let chunk = vec![0x5a_u8; 64 * 1024];
    let mut sent = 0usize;
    let spray = 6000u32;
    let udp = udp_bind(&env.pair.host, sock("0.0.0.0", 0)).unwrap();
    let started = Instant::now();
    for i in 0..spray {
        let to = IpAddr::from([10, 200, 128 + (i / 256) as u8, (i % 256) as u8]);
        udp.send_to(b"x", std::net::SocketAddr::new(to, 7)).unwrap();
        if i % 200 == 0 {
            heavy.write_all(&chunk).unwrap();
            sent += chunk.len();
        }
    }
    heavy.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(rx.recv_timeout(BULK_TIMEOUT).unwrap().unwrap(), sent);
    println!(
        "sprayed {spray} destinations and sent {sent} bytes to the heavy one in {:?}",
        started.elapsed()
    );
    let entries = table_entries(&env.pins);
    assert!(
        entries <= portcullis_common::EGRESS_DESTINATIONS as usize,
        "{entries} entries"
    );
    let status = env.status();
    let v = &status["egress_volume"];
    let overflow = v["overflow_packets"].as_u64().unwrap();
    println!(
        "table entries {entries}, overflow {overflow} packets, destinations {}",
        v["destinations"]
    );
    assert!(
        overflow > 0,
        "{spray} destinations fit a table of {}: {status}",
        portcullis_common::EGRESS_DESTINATIONS
    );
    let row = env
        .row(PEER_V4, "tcp", SINK_PORT)
        .unwrap_or_else(|| panic!("the heavy destination is gone: {status}"));
    let bytes = row["bytes"].as_u64().unwrap();
    assert!(
        bytes >= sent as u64,
        "the heavy destination lost traffic: {bytes} counted of {sent} sent"
    );
    assert!(
        env.daemon.log().contains("the destination table was full"),
        "{}",
        env.daemon.log()
    );
    // Wait out a reading or two: idle entries are deleted, freeing the table.
    let deadline = Instant::now() + Duration::from_secs(20);
    while table_entries(&env.pins) > 100 {
        assert!(Instant::now() < deadline, "idle entries are never deleted");
        std::thread::sleep(Duration::from_millis(500));
    }
}
