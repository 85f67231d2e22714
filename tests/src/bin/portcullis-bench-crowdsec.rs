//! The CrowdSec bouncer's delay (issue 18): from `cscli decisions add`
//! to the ban being enforced in the data path, against a real Local API.
//! A daemon protects one end of a veth pair, its bouncer polling a LAPI in
//! the same namespace; each round bans a fresh source address of the peer
//! with cscli, at a random moment between two polls, and probes from that
//! address (50 ms handshakes) until one is dropped. Prints cscli's own time, the delay to enforcement (min, median,
//! max), and the poll interval it depends on (a ban waits on average half
//! an interval for the next poll).
//!
//! As root, after `cargo build --bins`:
//! `cargo run -p portcullis-tests --bin portcullis-bench-crowdsec`.
//! `PORTCULLIS_BENCH_CROWDSEC_ROUNDS` (default 10) and
//! `PORTCULLIS_BENCH_CROWDSEC_POLL` (default `1s`) change the run.

use std::{
    net::{IpAddr, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use portcullis_tests::{crowdsec::*, *};
use socket2::{Domain, Protocol, Socket, Type};

const APP: u16 = 8080;

/// Whether a handshake from `src` to the host's APP port completes within
/// 50 ms (a dropped SYN does not).
fn connects(peer: &Netns, src: IpAddr) -> bool {
    peer.enter(|| {
        let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
        s.bind(&SocketAddr::new(src, 0).into())?;
        s.connect_timeout(&sock(HOST_V4, APP).into(), Duration::from_millis(50))?;
        s.set_linger(Some(Duration::ZERO))?;
        let _: TcpStream = s.into();
        std::io::Result::Ok(())
    })
    .is_ok()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() -> anyhow::Result<()> {
    anyhow::ensure!(is_root(), "the benchmark runs a daemon: run it as root");
    let rounds: usize = std::env::var("PORTCULLIS_BENCH_CROWDSEC_ROUNDS")
        .ok()
        .map(|v| v.parse())
        .transpose()?
        .unwrap_or(10);
    let poll = std::env::var("PORTCULLIS_BENCH_CROWDSEC_POLL").unwrap_or_else(|_| "1s".into());
    let interval_ms = portcullis::denylist::parse_duration(&poll)
        .map_err(anyhow::Error::msg)?
        .saturating_mul(1000);
    let pair = Pair::new()?;
    let sources: Vec<IpAddr> = (0..rounds)
        .map(|i| format!("10.200.0.{}", 100 + i).parse())
        .collect::<Result<_, _>>()?;
    for s in &sources {
        pair.peer
            .ip(&["addr", "add", &format!("{s}/24"), "dev", PEER_IFACE])?;
    }
    TcpServer::start(&pair.host, sock(HOST_V4, APP))?;
    let keys = tempfile::tempdir()?;
    let lapi = Lapi::start(&pair.host, 18060)?;
    let key = key_file(keys.path(), &lapi.key)?;
    let pins = PinDir::new()?;
    let config = ConfigFile::new(&config_text(
        &pins,
        &format!(
            "[[ingress_rules]]\nid = \"app\"\nfrom_port = {APP}\nto_port = {APP}\nip_ranges = []\n{}",
            section("http://127.0.0.1:18060", &key).replace("\"1s\"", &format!("{poll:?}"))
        ),
    ))?;
    let daemon = Daemon::start(&pair.host, &config)?;
    let mut cscli = Vec::new();
    let mut delays = Vec::new();
    for src in &sources {
        anyhow::ensure!(connects(&pair.peer, *src), "control: {src} cannot connect");
        // A random phase against the polls: each round would otherwise
        // start just after the poll that enforced the last one.
        std::thread::sleep(Duration::from_millis(rand::random_range(
            0..interval_ms.max(1),
        )));
        let started = Instant::now();
        lapi.add(&["--ip", &src.to_string(), "--duration", "1h"])?;
        cscli.push(started.elapsed());
        if std::env::var_os("PORTCULLIS_BENCH_CROWDSEC_TRACE").is_some() {
            println!("  {src}: cscli done at {:?}", std::time::SystemTime::now());
        }
        let deadline = started + Duration::from_secs(120);
        while connects(&pair.peer, *src) {
            anyhow::ensure!(Instant::now() < deadline, "{src} was never banned");
            std::thread::sleep(Duration::from_millis(10));
        }
        delays.push(started.elapsed());
    }
    if std::env::var_os("PORTCULLIS_BENCH_CROWDSEC_TRACE").is_some() {
        for l in daemon.log().lines().filter(|l| l.contains("crowdsec")) {
            println!("  daemon: {l}");
        }
    }
    delays.sort();
    cscli.sort();
    let median = |v: &[Duration]| v.get(v.len() / 2).copied().unwrap_or_default();
    println!("crowdsec bouncer: poll_interval {poll}, {rounds} bans, one at a time");
    println!(
        "  cscli decisions add itself:           median {:>8.1} ms",
        ms(median(&cscli))
    );
    println!(
        "  cscli add -> enforced in the data path: min {:.1} ms, median {:.1} ms, max {:.1} ms",
        ms(delays.first().copied().unwrap_or_default()),
        ms(median(&delays)),
        ms(delays.last().copied().unwrap_or_default())
    );
    Ok(())
}
