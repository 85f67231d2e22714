//! Real traffic through a veth pair: the same rule set expressed in
//! Portcullis (XDP), nftables with linear rules, nftables with an interval
//! set, and iptables-legacy; one bounded raw-frame generator (AF_PACKET,
//! prebuilt frames, qdisc bypassed) in its own namespace sends UDP that no
//! rule admits, so every filter walks everything it has before dropping.
//! Packets per second are counted where each filter drops them.

use std::{
    net::Ipv4Addr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use portcullis::{
    compile::{self, Limits},
    dataplane::{self, Dataplane},
    rules::{FirewallRule, Protocol, RuleSet},
};
use portcullis_common::Reason;
use portcullis_tests::{Netns, PinDir, packet::Pkt, run};
use serde::Serialize;

const FILTER_IF: &str = "f0";
const GEN_IF: &str = "g0";
const FILTER_V4: &str = "10.200.70.1";
const GEN_V4: &str = "10.200.70.2";
/// How long the generator sends per measurement.
const SEND: Duration = Duration::from_secs(2);
/// A filter reaching this share of the path's rate without any rules is
/// limited by the generator and the path, not by itself.
const GENERATOR_BOUND: f64 = 0.9;

#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub filter: String,
    pub rules: usize,
    /// Packets per second dropped at the filter.
    pub filtered_pps: f64,
    /// What the generator sent meanwhile. On a veth pair the receiving
    /// side runs in the sender's context (softirq on the same CPU), so the
    /// two rates move together: a slower filter slows the sender.
    pub sent_pps: f64,
    /// Within 10% of the path's rate with no rules at all: the filter's own
    /// limit is higher than this generator can show.
    pub generator_bound: bool,
}

/// Rule `i`: UDP to 10 ports from one /32 source (in 172.16.0.0/12).
fn rule(i: usize) -> (Ipv4Addr, u16, u16) {
    let src = Ipv4Addr::new(172, 16 + (i >> 16) as u8, (i >> 8) as u8, i as u8);
    let from = 10000 + (i % 1000) as u16 * 10;
    (src, from, from + 9)
}

fn rule_set(n: usize) -> RuleSet {
    RuleSet {
        ingress_rules: (0..n)
            .map(|i| {
                let (src, from, to) = rule(i);
                FirewallRule {
                    id: format!("r{i}"),
                    from_port: from.into(),
                    to_port: to.into(),
                    ip_ranges: vec![format!("{src}/32")],
                    names: Vec::new(),
                    protocol: Protocol::Udp,
                    description: None,
                    icmp_types: Vec::new(),
                    expires: None,
                    rate: None,
                    burst: None,
                    interfaces: Vec::new(),
                }
            })
            .collect(),
        // Like the nftables sets it is compared with: no SSH exemption.
        ssh: portcullis::rules::Ssh {
            allow: false,
            ..Default::default()
        },
        ..Default::default()
    }
}

fn nft_linear(n: usize) -> String {
    let mut s = String::from(
        "table inet bench {\n chain input {\n  type filter hook input priority 0; policy accept;\n",
    );
    for i in 0..n {
        let (src, from, to) = rule(i);
        s.push_str(&format!("  ip saddr {src} udp dport {from}-{to} accept\n"));
    }
    s.push_str("  counter drop\n }\n}\n");
    s
}

fn nft_set(n: usize) -> String {
    let elements: Vec<String> = (0..n)
        .map(|i| {
            let (src, from, to) = rule(i);
            format!("{src} . {from}-{to}")
        })
        .collect();
    format!(
        "table inet bench {{\n set allow {{\n  type ipv4_addr . inet_service; flags interval;\n  elements = {{ {} }}\n }}\n chain input {{\n  type filter hook input priority 0; policy accept;\n  ip saddr . udp dport @allow accept\n  counter drop\n }}\n}}\n",
        elements.join(", ")
    )
}

fn iptables(n: usize) -> String {
    let mut s = String::from("*filter\n:INPUT ACCEPT [0:0]\n");
    for i in 0..n {
        let (src, from, to) = rule(i);
        s.push_str(&format!(
            "-A INPUT -s {src}/32 -p udp --dport {from}:{to} -j ACCEPT\n"
        ));
    }
    s.push_str("-A INPUT -j DROP\nCOMMIT\n");
    s
}

fn pipe(cmd: &mut Command, input: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("running {cmd:?}"))?;
    child.stdin.take().unwrap().write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Packets the final `counter drop` of the nftables chain counted.
fn nft_dropped() -> anyhow::Result<u64> {
    let text = run(Command::new("nft").args(["list", "chain", "inet", "bench", "input"]))?;
    text.lines()
        .rev()
        .filter_map(|l| l.split("counter packets ").nth(1))
        .find_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .context("no counter in the nftables chain")
}

fn iptables_dropped() -> anyhow::Result<u64> {
    let text = run(Command::new("iptables-legacy").args(["-L", "INPUT", "-v", "-x", "-n"]))?;
    text.lines()
        .rev()
        .filter(|l| l.split_whitespace().nth(2) == Some("DROP"))
        .find_map(|l| l.split_whitespace().next()?.parse().ok())
        .context("no DROP rule in INPUT")
}

/// The generator's frames: UDP from 250 sources no rule admits, to port 9.
fn frames(dst_mac: [u8; 6], src_mac: [u8; 6]) -> Vec<Vec<u8>> {
    (1..=250u16)
        .map(|i| {
            let mut f = Pkt::new(&format!("10.200.80.{i}"), FILTER_V4)
                .udp(1024 + i, 9)
                .bytes();
            f[..6].copy_from_slice(&dst_mac);
            f[6..12].copy_from_slice(&src_mac);
            // The IPv4 header checksum: the stack checks it, XDP does not.
            let ip = &mut f[14..34];
            ip[10] = 0;
            ip[11] = 0;
            let sum = ip
                .chunks(2)
                .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
                .sum::<u32>();
            let sum = (sum & 0xffff) + (sum >> 16);
            let sum = !((sum & 0xffff) + (sum >> 16)) as u16;
            ip[10..12].copy_from_slice(&sum.to_be_bytes());
            f
        })
        .collect()
}

fn mac(ns: Option<&Netns>, ifname: &str) -> anyhow::Result<[u8; 6]> {
    let text = match ns {
        Some(ns) => ns.ip(&["link", "show", ifname])?,
        None => run(Command::new("ip").args(["link", "show", ifname]))?,
    };
    let hex = text
        .split("link/ether ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .context("no MAC address")?;
    let mut m = [0u8; 6];
    for (i, byte) in hex.split(':').enumerate().take(6) {
        m[i] = u8::from_str_radix(byte, 16)?;
    }
    Ok(m)
}

/// A raw AF_PACKET socket on `ifname` in the calling thread's namespace,
/// bypassing the qdisc.
fn packet_socket(ifname: &str) -> anyhow::Result<OwnedFd> {
    let ifindex = nix::net::if_::if_nametoindex(ifname)?;
    // SAFETY: plain socket(2); the result is checked before use.
    let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    ensure!(
        raw >= 0,
        "socket(AF_PACKET): {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: `raw` is a new descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let one: libc::c_int = 1;
    // SAFETY: setsockopt with a pointer to a live c_int and its size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_QDISC_BYPASS,
            (&one as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as u32,
        )
    };
    ensure!(
        rc == 0,
        "PACKET_QDISC_BYPASS: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: an all-zero sockaddr_ll is valid; the fields set below are
    // the ones bind(2) reads.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = (libc::ETH_P_IP as u16).to_be();
    addr.sll_ifindex = ifindex as i32;
    // SAFETY: `addr` is a sockaddr_ll of the size passed.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    ensure!(
        rc == 0,
        "bind(AF_PACKET): {}",
        std::io::Error::last_os_error()
    );
    Ok(fd)
}

/// Sends the frames round-robin for [`SEND`]; returns (sent, seconds).
fn generate(sender: &Netns, frames: &[Vec<u8>]) -> anyhow::Result<(u64, f64)> {
    let sock = sender.enter(|| packet_socket(GEN_IF))?;
    let started = Instant::now();
    let mut sent = 0u64;
    'outer: loop {
        for f in frames {
            // SAFETY: send(2) of a live buffer of the length passed.
            let rc = unsafe { libc::send(sock.as_raw_fd(), f.as_ptr().cast(), f.len(), 0) };
            if rc > 0 {
                sent += 1;
            }
        }
        if started.elapsed() >= SEND {
            break 'outer;
        }
    }
    Ok((sent, started.elapsed().as_secs_f64()))
}

/// One measurement: `dropped` read before and after the generator runs.
fn measure(
    sender: &Netns,
    frames: &[Vec<u8>],
    filter: &str,
    rules: usize,
    dropped: impl Fn() -> anyhow::Result<u64>,
) -> anyhow::Result<Row> {
    let before = dropped()?;
    let (sent, secs) = generate(sender, frames)?;
    std::thread::sleep(Duration::from_millis(200));
    let filtered = dropped()? - before;
    let (filtered_pps, sent_pps) = (filtered as f64 / secs, sent as f64 / secs);
    Ok(Row {
        filter: filter.to_string(),
        rules,
        filtered_pps,
        sent_pps,
        generator_bound: false,
    })
}

/// Runs every filter at every size. Called in the benchmark's own network
/// namespace, whose `f0` faces a generator namespace.
pub fn compare(sizes: &[usize]) -> anyhow::Result<Vec<Row>> {
    let sender = Netns::new("gen")?;
    run(Command::new("ip").args([
        "link",
        "add",
        FILTER_IF,
        "type",
        "veth",
        "peer",
        "name",
        GEN_IF,
        "netns",
        sender.name(),
    ]))?;
    run(Command::new("ip").args(["addr", "add", &format!("{FILTER_V4}/24"), "dev", FILTER_IF]))?;
    run(Command::new("ip").args(["link", "set", FILTER_IF, "up"]))?;
    run(Command::new("ip").args(["route", "add", "10.200.80.0/24", "via", GEN_V4]))?;
    sender.ip(&["addr", "add", &format!("{GEN_V4}/24"), "dev", GEN_IF])?;
    sender.ip(&["link", "set", GEN_IF, "up"])?;
    for key in ["all", "default", FILTER_IF] {
        std::fs::write(format!("/proc/sys/net/ipv4/conf/{key}/rp_filter"), "0")?;
    }
    let frames = frames(mac(None, FILTER_IF)?, mac(Some(&sender), GEN_IF)?);
    let mut rows = Vec::new();

    // The path with nothing but a drop: what the generator and the stack
    // deliver at all.
    pipe(Command::new("nft").args(["-f", "-"]), &nft_linear(0))?;
    rows.push(measure(
        &sender,
        &frames,
        "nftables, no rules",
        0,
        nft_dropped,
    )?);
    run(Command::new("nft").args(["delete", "table", "inet", "bench"]))?;

    for &n in sizes {
        let set = rule_set(n);
        let pins = PinDir::new()?;
        let limits = Limits::default();
        let mut dp = Dataplane::load(pins.path(), 65536, &limits)?;
        dp.apply(&compile::compile(&set, &limits)?, false)?;
        dp.attach_ingress(FILTER_IF)?;
        rows.push(measure(&sender, &frames, "portcullis (XDP)", n, || {
            Ok(pins.counters()?[&Reason::DropNoRule])
        })?);
        drop(dp);
        dataplane::detach_all(pins.path(), &[FILTER_IF.to_string()])?;
        drop(pins);

        pipe(Command::new("nft").args(["-f", "-"]), &nft_linear(n))?;
        rows.push(measure(
            &sender,
            &frames,
            "nftables, linear rules",
            n,
            nft_dropped,
        )?);
        run(Command::new("nft").args(["delete", "table", "inet", "bench"]))?;

        pipe(Command::new("nft").args(["-f", "-"]), &nft_set(n))?;
        rows.push(measure(
            &sender,
            &frames,
            "nftables, interval set",
            n,
            nft_dropped,
        )?);
        run(Command::new("nft").args(["delete", "table", "inet", "bench"]))?;

        pipe(&mut Command::new("iptables-legacy-restore"), &iptables(n))?;
        rows.push(measure(
            &sender,
            &frames,
            "iptables-legacy",
            n,
            iptables_dropped,
        )?);
        run(Command::new("iptables-legacy").args(["-F", "INPUT"]))?;
    }
    let path = rows[0].filtered_pps;
    for r in &mut rows {
        r.generator_bound = r.filtered_pps >= GENERATOR_BOUND * path;
    }
    Ok(rows)
}
