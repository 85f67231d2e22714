//! Portcullis user space: the daemon (`portcullisd`) and the CLI (`portcullis`).
//!
//! - [`rules`]: the Brev-format rule model and its validation (pure).
//! - [`crowdsec`]: the CrowdSec bouncer protocol: decisions, Go durations (pure).
//! - [`bouncer`]: the CrowdSec bouncer: polls a Local API into a deny set through the core.
//! - [`core`]: owns the live rule set; every change goes through it.
//! - [`api`]: the control API (HTTP over a Unix socket) on top of the core.
//! - [`audit`]: the hash-chained audit log of every change and refusal.
//! - [`compile`]: the rule set compiled into the rule maps' image (pure).
//! - [`parallel`]: two pieces of work side by side (the compile's, a change's).
//! - [`config`]: the configuration file (pure).
//! - [`dataplane`]: everything that talks to the kernel's bpf(2), rtnetlink
//!   and sock_diag: loading, attaching, pinning, writing maps, counters, the
//!   connection table, test runs, links and open sockets.
//! - [`denylist`]: deny sets, their files and the tries' values (pure).
//! - [`explain`]: `portcullis explain`: a packet's description, its frame,
//!   the words for a decision (pure; the decision is the kernel's).
//! - [`droplog`]: selected drops as rate-limited structured journal records.
//! - [`events`]: drop events from the ring buffer, for status and watch
//!   (read through aya's ring buffer; no bpf(2) call of its own).
//! - [`readiness`]: whether SSH with a key works now (model, host probes,
//!   the systemd watcher).
//! - [`metrics`]: the Prometheus/OpenMetrics text of `/v1/metrics`.
//! - [`client`]: the CLI's HTTP client over the Unix socket.
//! - [`fallback`]: the nftables policy applied when enforcement cannot start.
//! - [`fleet`]: cluster membership from etcd (watch, registration), on the core.
//! - [`membership`]: the etcd member list's keys and values (pure).
//! - [`journal`]: logging to the journal (priorities, plain values).
//! - [`fuzzing`]: entry points the fuzz targets and their replay share.
//! - [`reload`]: runtime changes against the configuration's baseline (pure).
//! - [`host`]: host probes at start-up (bpffs, groups) and memory release.
//! - [`instance`]: one daemon per pin directory, state directory and socket.
//! - [`model`]: the plain types the layers share (mode, pending change,
//!   connections, links and their selector) (pure).
//! - [`links`] (`dataplane::links`): which interfaces to protect; watching for new ones.
//! - [`sshkeys`]: SSH key validation and injection into authorized_keys.
//! - [`state`]: what survives a restart (live set, baseline, pending change,
//!   mode, deny sets), written atomically (pure I/O).
//! - [`sockets`] (`dataplane::sockets`): the kernel's open connections (sock_diag).
//! - [`testrun`] (`dataplane::testrun`): runs a loaded program on a crafted packet.
//! - [`dns`]: DNS messages and FQDN rule names, for the forwarder (pure).
//! - [`forwarder`]: the DNS forwarder for FQDN egress rules (on core).
//! - [`volume`]: egress volume per destination: totals, top-N, alerts (pure).

// No panic reachable from input in the daemon (issue 14): where one of these
// is allowed, a comment beside it proves why it cannot fire.
// Functions short enough to read at once (threshold in clippy.toml).
#![deny(clippy::too_many_lines)]
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

pub mod api;
pub mod audit;
pub mod bouncer;
pub mod client;
pub mod compile;
pub mod config;
pub mod core;
pub mod crowdsec;
pub mod dataplane;
pub mod denylist;
pub mod dns;
pub mod droplog;
pub mod events;
pub mod explain;
pub mod fallback;
pub mod fleet;
pub mod forwarder;
pub mod fuzzing;
pub mod host;
pub mod instance;
pub mod journal;
pub mod membership;
pub mod metrics;
pub mod model;
pub mod parallel;
pub mod readiness;
pub mod reload;
pub mod rules;
pub mod sshkeys;
pub mod state;
pub mod volume;

// Kernel-facing modules live under `dataplane/`; their old paths stay.
pub use dataplane::{links, sockets, sys as bpfsys, testrun};
