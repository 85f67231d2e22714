//! A real DNS server (dnsmasq) in a namespace serving a test zone, and a
//! minimal stub client, for the FQDN egress tests.

use std::{
    fs,
    io::Write as _,
    net::{IpAddr, SocketAddr, UdpSocket},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::Netns;

/// dnsmasq on `addr`:53 in `ns`, answering from a hosts file with TTL
/// `ttl`, and the CNAMEs given. Killed on drop.
pub struct Dnsmasq {
    child: Child,
    hosts: tempfile::NamedTempFile,
}

impl Dnsmasq {
    /// `hosts`: (name, address) lines; `cnames`: (alias, target).
    pub fn start(
        ns: &Netns,
        addr: &str,
        ttl: u32,
        hosts: &[(&str, &str)],
        cnames: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let file = tempfile::NamedTempFile::new()?;
        write_hosts(file.path(), hosts)?;
        let mut cmd = ns.command("dnsmasq");
        cmd.args([
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--user=root",
            "--pid-file=",
            "--port=53",
        ])
        .arg(format!("--listen-address={addr}"))
        .arg(format!("--addn-hosts={}", file.path().display()))
        .arg(format!("--local-ttl={ttl}"));
        for (alias, target) in cnames {
            cmd.arg(format!("--cname={alias},{target}"));
        }
        let mut d = Dnsmasq {
            child: cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn()?,
            hosts: file,
        };
        // Up once it answers.
        let deadline = Instant::now() + Duration::from_secs(10);
        while ask(
            ns,
            dns_server(addr),
            "probe.invalid",
            Duration::from_millis(200),
        )
        .is_err()
        {
            if Instant::now() > deadline {
                bail!("dnsmasq on {addr} does not answer");
            }
            if let Some(s) = d.child.try_wait()? {
                bail!("dnsmasq exited: {s}");
            }
        }
        Ok(d)
    }

    /// Rewrites the hosts file and makes dnsmasq read it again (SIGHUP).
    pub fn set_hosts(&mut self, hosts: &[(&str, &str)]) -> anyhow::Result<()> {
        write_hosts(self.hosts.path(), hosts)?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGHUP,
        )?;
        thread::sleep(Duration::from_millis(200));
        Ok(())
    }
}

fn write_hosts(path: &std::path::Path, hosts: &[(&str, &str)]) -> anyhow::Result<()> {
    let text: String = hosts.iter().map(|(n, a)| format!("{a} {n}\n")).collect();
    let mut f = fs::File::create(path)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `addr`:53.
pub fn dns_server(addr: &str) -> SocketAddr {
    SocketAddr::new(addr.parse().expect("address"), 53)
}

/// A query for `name` (type A, RD) with `id`.
pub fn query(id: u16, name: &str) -> Vec<u8> {
    let mut m = Vec::new();
    for v in [id, 0x0100, 1, 0, 0, 0] {
        m.extend_from_slice(&v.to_be_bytes());
    }
    for l in name.split('.') {
        m.push(l.len() as u8);
        m.extend_from_slice(l.as_bytes());
    }
    m.extend_from_slice(&[0, 0, 1, 0, 1]);
    m
}

/// Asks `server` (UDP, from `ns`) for the A records of `name`: the
/// addresses on the answer's chain; an error on timeout or SERVFAIL.
pub fn lookup(
    ns: &Netns,
    server: SocketAddr,
    name: &str,
    wait: Duration,
) -> anyhow::Result<Vec<IpAddr>> {
    let r = ask(ns, server, name, wait)?;
    if r.rcode != 0 {
        bail!("rcode {}", r.rcode);
    }
    Ok(portcullis::dns::chain(&r)
        .addresses
        .into_iter()
        .map(|(a, _)| a)
        .collect())
}

/// The answer of `server` (UDP, from `ns`) to a query for `name`.
pub fn ask(
    ns: &Netns,
    server: SocketAddr,
    name: &str,
    wait: Duration,
) -> anyhow::Result<portcullis::dns::Response> {
    let id: u16 = rand::random();
    let sock = ns.enter(|| UdpSocket::bind("0.0.0.0:0"))?;
    sock.set_read_timeout(Some(wait))?;
    sock.send_to(&query(id, name), server)?;
    let mut buf = [0u8; 4096];
    loop {
        let (n, from) = sock.recv_from(&mut buf).context("no answer")?;
        if from != server {
            continue;
        }
        let r = portcullis::dns::parse_response(&buf[..n]).map_err(anyhow::Error::msg)?;
        if r.id != id {
            continue;
        }
        return Ok(r);
    }
}

/// Whether `dnsmasq` is installed (the tests need it).
pub fn have_dnsmasq() -> bool {
    Command::new("dnsmasq").arg("--version").output().is_ok()
}
