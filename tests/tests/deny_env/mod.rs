//! Shared by `deny.rs` and `attack_deny.rs`: a protected host and a peer
//! with several source addresses, TCP probes from a chosen source, and the
//! CLI's deny commands.
#![allow(dead_code)]

use std::{
    io,
    net::{IpAddr, SocketAddr},
    process::Output,
    time::{Duration, Instant},
};

use portcullis_tests::*;
use socket2::{Domain, Protocol, Socket, Type};

/// The peer's addresses: `A` and `B` share a /24 and a /64 with the host;
/// `C6`, `D6` sit in another /64 (routed on the link).
pub const A4: &str = PEER_V4;
pub const B4: &str = "10.200.0.3";
pub const A6: &str = PEER_V6;
pub const B6: &str = "fd00:200::3";
pub const C6: &str = "fd00:200:0:5::2";
pub const D6: &str = "fd00:200:0:5::3";
pub const OTHER64: &str = "fd00:200:0:5::/64";

pub const APP: u16 = 8080;
pub const RULES: &str =
    "[[ingress_rules]]\nid = \"app\"\nfrom_port = 8080\nto_port = 8080\nip_ranges = []\n";

pub struct Env {
    pub daemon: Option<Daemon>,
    pub config: ConfigFile,
    pub pins: PinDir,
    pub pair: Pair,
}

impl Env {
    /// `ssh` is the `[ssh]` section's body; a rule admits 8080 from anywhere.
    /// Listeners on 22 and 8080, both families. Not started.
    pub fn new(ssh: &str) -> Self {
        let pair = Pair::new().expect("namespaces");
        pair.peer
            .ip(&["addr", "add", &format!("{B4}/24"), "dev", PEER_IFACE])
            .unwrap();
        for a in [B6, C6, D6] {
            pair.peer
                .ip(&[
                    "addr",
                    "add",
                    &format!("{a}/64"),
                    "dev",
                    PEER_IFACE,
                    "nodad",
                ])
                .unwrap();
        }
        pair.host
            .ip(&["-6", "route", "add", OTHER64, "dev", HOST_IFACE])
            .unwrap();
        for host in [HOST_V4, HOST_V6] {
            for port in [22, APP] {
                TcpServer::start(&pair.host, sock(host, port)).unwrap();
            }
        }
        let pins = PinDir::new().unwrap();
        let config =
            ConfigFile::new(&config_text(&pins, &format!("[ssh]\n{ssh}\n{RULES}"))).unwrap();
        Env {
            daemon: None,
            config,
            pins,
            pair,
        }
    }

    pub fn start(&mut self) {
        self.daemon = Some(Daemon::start(&self.pair.host, &self.config).expect("portcullisd"));
    }

    /// A TCP handshake from `src` to the host's `port` (same family).
    pub fn probe(&self, src: &str, port: u16) -> io::Result<()> {
        let src: IpAddr = src.parse().unwrap();
        let host = if src.is_ipv6() { HOST_V6 } else { HOST_V4 };
        probe_from(&self.pair.peer, src, sock(host, port))
    }

    /// Whether `src` reaches the host on `port`, asserting that a failure is
    /// a drop (a timeout), not a refusal.
    pub fn reaches(&self, src: &str, port: u16) -> bool {
        match self.probe(src, port) {
            Ok(()) => true,
            Err(e) => {
                assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{src} -> {port}: {e}");
                false
            }
        }
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        cli(&self.config, args)
    }

    /// The CLI, which must succeed; its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(out.status.success(), "portcullis {args:?}: {}", said(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `deny list SET --json`.
    pub fn listed(&self, set: &str) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["--json", "deny", "list", set])).unwrap()
    }
}

pub fn said(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A handshake from `src` (bound) to `to`, closed with a reset.
pub fn probe_from(ns: &Netns, src: IpAddr, to: SocketAddr) -> io::Result<()> {
    ns.enter(|| {
        let domain = if to.is_ipv6() {
            Domain::IPV6
        } else {
            Domain::IPV4
        };
        let s = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
        s.bind(&SocketAddr::new(src, 0).into())?;
        s.connect_timeout(&to.into(), PROBE_TIMEOUT)?;
        s.set_linger(Some(Duration::ZERO))?;
        Ok(())
    })
}

/// Polls `f` every 200 ms until it holds or `limit` passes.
pub fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
