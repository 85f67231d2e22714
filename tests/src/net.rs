//! Network namespaces joined by veth pairs, a routed path with a narrow
//! MTU, and an Ethernet segment of several hosts.

use std::{
    fs,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    process::Command,
    thread,
};

use crate::*;

/// A network namespace, deleted on drop (with every interface in it).
pub struct Netns {
    name: String,
}

impl Netns {
    pub fn new(tag: &str) -> anyhow::Result<Self> {
        let name = unique(&format!("pct{tag}"));
        run(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// `ip -n <ns> ARGS`.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// A command that runs in this namespace's network stack only (the
    /// host's bpffs and /sys stay visible, unlike `ip netns exec`).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.path().display()))
            .arg("--")
            .arg(program);
        cmd
    }

    pub fn sysctl(&self, key: &str, value: &str) -> anyhow::Result<()> {
        run(self
            .command("sysctl")
            .args(["-q", "-w", &format!("{key}={value}")]))?;
        Ok(())
    }

    /// Runs `f` on a thread that has entered this namespace. Sockets created
    /// there belong to the namespace and can be used from any thread after.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = self.path();
        thread::scope(|s| {
            s.spawn(move || {
                let file = fs::File::open(&path).expect("open netns");
                nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                    .expect("setns");
                f()
            })
            .join()
            .expect("thread in namespace panicked")
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Two namespaces joined by a veth pair: `host` is protected (interface
/// `pc0`), `peer` sends to it (interface `pc1`).
pub struct Pair {
    pub host: Netns,
    pub peer: Netns,
}

pub const HOST_IFACE: &str = "pc0";

pub const PEER_IFACE: &str = "pc1";

pub const HOST_V4: &str = "10.200.0.1";

pub const PEER_V4: &str = "10.200.0.2";

pub const HOST_V6: &str = "fd00:200::1";

pub const PEER_V6: &str = "fd00:200::2";

/// Joins `a` and `b` with a veth pair named `a_if` / `b_if` and brings both up.
pub fn veth(a: &Netns, a_if: &str, b: &Netns, b_if: &str) -> anyhow::Result<()> {
    a.ip(&[
        "link",
        "add",
        a_if,
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "netns",
        b.name(),
    ])?;
    a.ip(&["link", "set", a_if, "up"])?;
    b.ip(&["link", "set", b_if, "up"])?;
    Ok(())
}

/// Adds an IPv4 and an IPv6 address (no duplicate detection) to `dev`.
pub fn addresses(ns: &Netns, dev: &str, v4: &str, v6: &str) -> anyhow::Result<()> {
    ns.ip(&["addr", "add", v4, "dev", dev])?;
    ns.ip(&["addr", "add", v6, "dev", dev, "nodad"])?;
    Ok(())
}

impl Pair {
    pub fn new() -> anyhow::Result<Self> {
        let host = Netns::new("h")?;
        let peer = Netns::new("p")?;
        veth(&host, HOST_IFACE, &peer, PEER_IFACE)?;
        addresses(
            &host,
            HOST_IFACE,
            &format!("{HOST_V4}/24"),
            &format!("{HOST_V6}/64"),
        )?;
        addresses(
            &peer,
            PEER_IFACE,
            &format!("{PEER_V4}/24"),
            &format!("{PEER_V6}/64"),
        )?;
        Ok(Pair { host, peer })
    }

    /// Forgets learned neighbours on both sides, so the next packet needs a
    /// fresh ARP or neighbour-discovery exchange.
    pub fn flush_neighbours(&self) -> anyhow::Result<()> {
        self.host.ip(&["neigh", "flush", "dev", HOST_IFACE])?;
        self.peer.ip(&["neigh", "flush", "dev", PEER_IFACE])?;
        Ok(())
    }

    /// The peer's neighbour state for `addr` (`REACHABLE`, `STALE`, `FAILED`...).
    pub fn peer_neighbour_state(&self, addr: &str) -> anyhow::Result<String> {
        let out = self.peer.ip(&["neigh", "show", addr, "dev", PEER_IFACE])?;
        Ok(out.split_whitespace().last().unwrap_or("NONE").to_string())
    }
}

/// The protected host behind a router from a server: host `pc0` —
/// `r0` router `r1` — `s0` server. The router's link towards the server has
/// an MTU of 1280 while both end hosts use 1500, so full-size packets between
/// them need path-MTU discovery.
pub struct Routed {
    pub host: Netns,
    pub router: Netns,
    pub server: Netns,
}

pub const ROUTED_HOST_V4: &str = "10.200.1.1";

pub const ROUTED_HOST_V6: &str = "fd00:200:1::1";

pub const ROUTED_SERVER_V4: &str = "10.200.2.1";

pub const ROUTED_SERVER_V6: &str = "fd00:200:2::1";

pub const NARROW_MTU: u32 = 1280;

impl Routed {
    pub fn new() -> anyhow::Result<Self> {
        let host = Netns::new("h")?;
        let router = Netns::new("r")?;
        let server = Netns::new("s")?;
        veth(&host, HOST_IFACE, &router, "r0")?;
        veth(&router, "r1", &server, "s0")?;
        addresses(&host, HOST_IFACE, "10.200.1.1/24", "fd00:200:1::1/64")?;
        addresses(&router, "r0", "10.200.1.254/24", "fd00:200:1::fe/64")?;
        addresses(&router, "r1", "10.200.2.254/24", "fd00:200:2::fe/64")?;
        addresses(&server, "s0", "10.200.2.1/24", "fd00:200:2::1/64")?;
        router.ip(&["link", "set", "r1", "mtu", &NARROW_MTU.to_string()])?;
        router.sysctl("net.ipv4.ip_forward", "1")?;
        router.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        for (ns, v4, v6) in [
            (&host, "10.200.1.254", "fd00:200:1::fe"),
            (&server, "10.200.2.254", "fd00:200:2::fe"),
        ] {
            ns.ip(&["route", "add", "default", "via", v4])?;
            ns.ip(&["-6", "route", "add", "default", "via", v6])?;
        }
        Ok(Routed {
            host,
            router,
            server,
        })
    }
}

/// Hosts on one Ethernet segment: a bridge in its own namespace, each host a
/// namespace with interface `pc0` on it, addressed in 10.200.10.0/24 and
/// fd00:200:10::/64.
pub struct Lan {
    bridge: Netns,
    pub hosts: Vec<Netns>,
}

impl Lan {
    /// Host `i` (from 1) gets 10.200.10.i and fd00:200:10::i.
    pub fn new(hosts: usize) -> anyhow::Result<Self> {
        let bridge = Netns::new("b")?;
        bridge.ip(&["link", "add", "br0", "type", "bridge"])?;
        bridge.ip(&["link", "set", "br0", "up"])?;
        let mut lan = Lan {
            bridge,
            hosts: Vec::new(),
        };
        for i in 1..=hosts {
            let ns = Netns::new("n")?;
            let port = format!("p{i}");
            veth(&ns, HOST_IFACE, &lan.bridge, &port)?;
            lan.bridge.ip(&["link", "set", &port, "master", "br0"])?;
            addresses(
                &ns,
                HOST_IFACE,
                &format!("10.200.10.{i}/24"),
                &format!("fd00:200:10::{i}/64"),
            )?;
            lan.hosts.push(ns);
        }
        Ok(lan)
    }

    pub fn host(&self, i: usize) -> &Netns {
        &self.hosts[i - 1]
    }

    pub fn v4(i: usize) -> String {
        format!("10.200.10.{i}")
    }

    pub fn v6(i: usize) -> String {
        format!("fd00:200:10::{i}")
    }
}
