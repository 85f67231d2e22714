//! xdp-filter (Debian's xdp-tools): the stateless XDP filter a user would
//! otherwise pick. Loaded in deny mode on a veth of the benchmark's own
//! namespace, with an allowlist of destination ports and source addresses
//! (its matching is exact: ports and whole addresses, no prefixes or port
//! ranges), and run with `BPF_PROG_TEST_RUN` like Portcullis.

use std::{os::fd::OwnedFd, process::Command};

use anyhow::Context as _;
use portcullis_tests::run;

/// xdp-filter loaded on an interface; unloaded (with its pins) on drop.
pub struct XdpFilter {
    pub prog: OwnedFd,
}

impl XdpFilter {
    /// Loads it on `ifname` with `ports` and `sources` allowed.
    pub fn load(ifname: &str, ports: &[u16], sources: &[String]) -> anyhow::Result<XdpFilter> {
        // A leftover of an interrupted run would make `load` refuse.
        let _ = Command::new("xdp-filter")
            .args(["unload", "--all"])
            .output();
        run(Command::new("xdp-filter").args([
            "load",
            "--policy",
            "deny",
            "--features",
            "tcp,udp,ipv4,ipv6",
            ifname,
        ]))
        .context("xdp-filter load (package xdp-tools)")?;
        let guard = Unload;
        for port in ports {
            run(Command::new("xdp-filter").args(["port", &port.to_string()]))?;
        }
        for ip in sources {
            run(Command::new("xdp-filter").args(["ip", ip, "--mode", "src"]))?;
        }
        let link = run(Command::new("ip").args(["-d", "link", "show", ifname]))?;
        let id: u32 = link
            .split("prog/xdp id ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|id| id.parse().ok())
            .with_context(|| format!("no XDP program id in:\n{link}"))?;
        let prog = crate::rawbpf::prog_by_id(id)?;
        std::mem::forget(guard);
        Ok(XdpFilter { prog })
    }
}

/// Unloads xdp-filter everywhere (its state is global under /sys/fs/bpf).
struct Unload;

impl Drop for Unload {
    fn drop(&mut self) {
        let _ = Command::new("xdp-filter")
            .args(["unload", "--all"])
            .output();
    }
}

impl Drop for XdpFilter {
    fn drop(&mut self) {
        drop(Unload);
    }
}
