//! Test harness shared by the integration tests: throw-away network
//! namespaces joined by veth pairs, the real daemon running inside them, and
//! real TCP, UDP, ICMP and raw IP traffic across.
//!
//! Everything a test creates carries a name unique to the test process and
//! the test, so tests run in parallel, and everything is removed by `Drop`,
//! which also runs when a test panics.
//!
//! By what it provides (all re-exported here, so a test names
//! `portcullis_tests::X`):
//! - [`net`]: namespaces, veth pairs, a routed path, an Ethernet segment;
//! - [`daemon`]: the daemon under test, its pins, config file and CLI;
//! - [`traffic`]: TCP/UDP/ICMP/raw probes, servers, transfers, floods;
//! - [`ssh`]: a real sshd and sessions to it;
//! - [`etcd`]: a real etcd cluster in namespaces, with TLS and auth (fleet tests);
//! - [`container`]: a systemd-nspawn container booting the built package;
//! - [`packet`]: crafted frames for `BPF_PROG_TEST_RUN`.

use std::{
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, ensure};

pub use portcullis_common::Reason;

pub mod container;
pub mod crowdsec;
pub mod daemon;
pub mod dns;
pub mod etcd;
pub mod net;
pub mod packet;
pub mod ssh;
pub mod traffic;

pub use daemon::*;
pub use net::*;
pub use ssh::*;
pub use traffic::*;

/// Returns early from a test, with a message saying why, when not root.
/// As root the test must run: set-up failures after this point fail the test.
#[macro_export]
macro_rules! require_root {
    () => {
        if !$crate::is_root() {
            eprintln!("SKIPPED: this test needs root (network namespaces, XDP); run it as root");
            return;
        }
    };
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A name no other test (in this or another test process) uses.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs a command, failing with its output when it fails.
pub fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The overall exposure `systemd-analyze security` printed, with its line.
pub fn security_exposure(output: &str) -> Option<(f64, String)> {
    let line = output
        .lines()
        .find(|l| l.contains("Overall exposure level"))?
        .trim()
        .to_string();
    let exposure = line
        .split(':')
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some((exposure, line))
}
