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
    /// Where it answers (`set_hosts` asks it until it has read the file).
    server: SocketAddr,
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
            server: dns_server(addr),
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

    /// Rewrites the hosts file and makes dnsmasq read it again (SIGHUP);
    /// returns once it answers the first name with its new address (asked
    /// from `ns`), so a loaded machine's late reread is not taken for an
    /// old answer.
    pub fn set_hosts(&mut self, ns: &Netns, hosts: &[(&str, &str)]) -> anyhow::Result<()> {
        write_hosts(self.hosts.path(), hosts)?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGHUP,
        )?;
        let Some(&(name, addr)) = hosts.first() else {
            thread::sleep(Duration::from_millis(200));
            return Ok(());
        };
        let want: IpAddr = addr.parse()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got = lookup(ns, self.server, name, Duration::from_millis(200));
            if got.as_ref().is_ok_and(|a| a.contains(&want)) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("dnsmasq still answers {name} with {got:?}, not {want}");
            }
            thread::sleep(Duration::from_millis(20));
        }
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
    query_type(id, name, 1)
}

/// A query for `name` of record type `qtype` (1 A, 28 AAAA), RD, `id`.
pub fn query_type(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut m = Vec::new();
    for v in [id, 0x0100, 1, 0, 0, 0] {
        m.extend_from_slice(&v.to_be_bytes());
    }
    for l in name.split('.') {
        m.push(l.len() as u8);
        m.extend_from_slice(l.as_bytes());
    }
    m.push(0);
    m.extend_from_slice(&qtype.to_be_bytes());
    m.extend_from_slice(&[0, 1]);
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
    lookup_type(ns, server, name, 1, wait)
}

/// The same for the AAAA records of `name`.
pub fn lookup6(
    ns: &Netns,
    server: SocketAddr,
    name: &str,
    wait: Duration,
) -> anyhow::Result<Vec<IpAddr>> {
    lookup_type(ns, server, name, 28, wait)
}

fn lookup_type(
    ns: &Netns,
    server: SocketAddr,
    name: &str,
    qtype: u16,
    wait: Duration,
) -> anyhow::Result<Vec<IpAddr>> {
    let r = ask_type(ns, server, name, qtype, wait)?;
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
    ask_type(ns, server, name, 1, wait)
}

/// The answer of `server` (UDP, from `ns`) to a query for the `qtype`
/// records of `name`.
pub fn ask_type(
    ns: &Netns,
    server: SocketAddr,
    name: &str,
    qtype: u16,
    wait: Duration,
) -> anyhow::Result<portcullis::dns::Response> {
    let id: u16 = rand::random();
    let sock = ns.enter(|| UdpSocket::bind("0.0.0.0:0"))?;
    sock.set_read_timeout(Some(wait))?;
    sock.send_to(&query_type(id, name, qtype), server)?;
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

/// The answer of `server` over TCP (from `ns`) to a query for `name`.
pub fn ask_tcp(
    ns: &Netns,
    server: SocketAddr,
    name: &str,
    wait: Duration,
) -> anyhow::Result<portcullis::dns::Response> {
    use std::io::Read as _;
    let id: u16 = rand::random();
    let mut s = ns.enter(|| std::net::TcpStream::connect_timeout(&server, wait))?;
    s.set_read_timeout(Some(wait))?;
    let q = query(id, name);
    let mut out = (q.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(&q);
    s.write_all(&out)?;
    let mut len = [0u8; 2];
    s.read_exact(&mut len).context("no answer")?;
    let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut msg).context("answer cut short")?;
    let r = portcullis::dns::parse_response(&msg).map_err(anyhow::Error::msg)?;
    if r.id != id {
        bail!("answer with another id");
    }
    Ok(r)
}

/// Whether `dnsmasq` is installed (the tests need it).
pub fn have_dnsmasq() -> bool {
    Command::new("dnsmasq").arg("--version").output().is_ok()
}

/// Bytes of the answer that user `nobody`, from `ns`, got from `resolver`
/// (UDP port 53) for a query for `name` (0: none within 2 s).
pub fn nobody_asks(ns: &Netns, resolver: &str, name: &str) -> usize {
    let q: String = query(0x4242, name)
        .iter()
        .map(|b| format!("\\x{b:02x}"))
        .collect();
    let script = format!(
        "exec 3<>/dev/udp/{resolver}/53; printf '{q}' >&3; timeout 2 dd bs=4096 count=1 <&3 2>/dev/null | wc -c"
    );
    let out = ns
        .command("setpriv")
        .args([
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "bash",
            "-c",
            &script,
        ])
        .output()
        .expect("setpriv");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

/// A response to `query` (its id unless `id` is given, its question) with
/// `records` in the answer section: (owner, IPv4 address) A records or
/// (owner, "cname:target") CNAMEs, TTL 60, names uncompressed.
pub fn response(query: &[u8], id: u16, records: &[(&str, &str)]) -> Vec<u8> {
    let mut m = Vec::new();
    for v in [id, 0x8180, 1, records.len() as u16, 0, 0] {
        m.extend_from_slice(&v.to_be_bytes());
    }
    m.extend_from_slice(&query[12..]);
    let name = |m: &mut Vec<u8>, n: &str| {
        for l in n.split('.') {
            m.push(l.len() as u8);
            m.extend_from_slice(l.as_bytes());
        }
        m.push(0);
    };
    for (owner, data) in records {
        name(&mut m, owner);
        let rdata = match data.strip_prefix("cname:") {
            Some(target) => {
                m.extend_from_slice(&[0, 5, 0, 1]);
                let mut d = Vec::new();
                name(&mut d, target);
                d
            }
            None => {
                m.extend_from_slice(&[0, 1, 0, 1]);
                let a: std::net::Ipv4Addr = data.parse().expect("IPv4 address");
                a.octets().to_vec()
            }
        };
        m.extend_from_slice(&60u32.to_be_bytes());
        m.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        m.extend_from_slice(&rdata);
    }
    m
}
