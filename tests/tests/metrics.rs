//! `/v1/metrics` from a real daemon, held against a saved list of its
//! series (issue 16): the metric names, their types, every label, and the
//! values that do not depend on traffic. Rendering the text through a
//! Prometheus crate instead of by hand must not change any of them.
//!
//! `PORTCULLIS_BLESS=1` rewrites the saved list (`tests/data/metrics.expected`)
//! from the daemon's answer; the diff then shows what changed.

use std::{path::PathBuf, process::Command};

use portcullis_tests::*;

const RULES: &str = "[ssh]\nallow = true\n\n\
    [[ingress_rules]]\nid = \"app\"\nfrom_port = 8080\nto_port = 8080\nip_ranges = []\n\n\
    [[egress_rules]]\nid = \"dns\"\nfrom_port = 53\nto_port = 53\nip_ranges = [\"10.200.0.0/16\"]\n";

/// Series whose value is the same on every run (no traffic in them).
const DETERMINISTIC: &[&str] = &[
    "portcullis_rules_generation",
    "portcullis_api_refused_writes_total",
    "portcullis_enforcing",
    "portcullis_mode",
    "portcullis_ready",
    "portcullis_conntrack_capacity",
];

fn expected_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/metrics.expected")
}

/// One line per series (`name{labels}`, with ` = value` where the value is
/// deterministic) and one per family type (`type NAME KIND`, `NAME` without
/// a counter's `_total`), sorted.
fn normalize(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let name = parts.next().unwrap_or_default();
            let kind = parts.next().unwrap_or_default();
            out.push(format!("type {} {kind}", name.trim_end_matches("_total")));
            continue;
        }
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("a sample line has a value");
        let name = series.split('{').next().unwrap_or_default();
        if DETERMINISTIC.contains(&name) {
            out.push(format!("{series} = {value}"));
        } else {
            value
                .parse::<f64>()
                .unwrap_or_else(|_| panic!("not a number in {line:?}"));
            out.push(series.to_owned());
        }
    }
    out.sort();
    out
}

fn scrape(socket: &std::path::Path) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-s", "-o", "-", "-w", "\n%{http_code}", "--unix-socket"])
        .arg(socket)
        .arg("http://portcullis/v1/metrics")
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').expect("curl wrote the status");
    (code.parse().expect("a status code"), body.to_owned())
}

#[test]
fn the_scrape_matches_the_saved_series() {
    require_root!();
    let pair = Pair::new().unwrap();
    // The egress volume series are labelled by destination. The host's own
    // IPv6 chatter (multicast listener reports and router solicitations,
    // sent at random moments after its addresses come up) would add a
    // series on some runs and not on others; the test sends one datagram.
    pair.host
        .sysctl(&format!("net.ipv6.conf.{HOST_IFACE}.disable_ipv6"), "1")
        .unwrap();
    let pins = PinDir::new().unwrap();
    let config = ConfigFile::new(&config_text(&pins, RULES)).unwrap();
    let _daemon = Daemon::start(&pair.host, &config).unwrap();
    // The egress rule admits DNS to the test range: one datagram to the
    // peer is the host's only egress.
    let sink = udp_bind(&pair.peer, sock(PEER_V4, 53)).unwrap();
    udp_send(&pair.host, sock(PEER_V4, 53), b"query").unwrap();
    assert!(
        udp_received(&sink),
        "the host's DNS datagram reaches the peer"
    );
    let dns_series = format!(
        "portcullis_egress_bytes_total{{destination=\"{PEER_V4}\",protocol=\"udp\",port=\"53\"}}"
    );
    // The data path's volume table is read into the ledger once a second.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let (code, text) = loop {
        let (code, text) = scrape(&config.socket());
        if text.contains(&dns_series) || std::time::Instant::now() > deadline {
            break (code, text);
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert_eq!(code, 200, "{text}");
    let got = normalize(&text);
    if std::env::var_os("PORTCULLIS_BLESS").is_some() {
        std::fs::write(expected_path(), got.join("\n") + "\n").unwrap();
    }
    let want: Vec<String> = std::fs::read_to_string(expected_path())
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    let missing: Vec<_> = want.iter().filter(|l| !got.contains(l)).collect();
    let extra: Vec<_> = got.iter().filter(|l| !want.contains(l)).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "/v1/metrics differs from tests/data/metrics.expected:\n  missing: {missing:#?}\n  unexpected: {extra:#?}\n\nscrape:\n{text}"
    );
}
