//! `status` (from the daemon, or from the pins when it is down) and
//! `wait-ready`.

use std::path::Path;

use hyper::Method;
use portcullis::{
    api::Status,
    core::Mode,
    readiness::{Report, State},
};

use crate::{
    Ctx, EXIT_DAEMON_DOWN, EXIT_NOT_PROTECTED,
    output::{describe_drop, local_time, when},
};

/// `portcullis status`. Exit status: 0 protected, 3 not protected, 4 the
/// daemon is not running (the pinned state is shown). With `--json` the
/// document is printed and the exit status is 0 whenever the daemon
/// answered (read `enforcing` and `mode`).
pub fn status(ctx: &Ctx, pin_dir: &Path) -> anyhow::Result<i32> {
    let reply = match ctx.call(Method::GET, "/v1/status", None) {
        Ok(r) => r,
        Err(e) if daemon_down(&e) => return pinned(ctx, pin_dir, &e),
        Err(e) => return Err(e),
    };
    let s: Status = reply.typed()?;
    if ctx.json {
        ctx.print(&reply, String::new)?;
        return Ok(0);
    }
    let protected = print_status(&s);
    Ok(if protected { 0 } else { EXIT_NOT_PROTECTED })
}

/// Whether `e` says nobody listens on the socket (rather than, say, that
/// we may not connect).
fn daemon_down(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|c| c.downcast_ref::<std::io::Error>())
        .any(|io| {
            matches!(
                io.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            )
        })
}

/// Prints the status for people; whether the host is protected.
fn print_status(s: &Status) -> bool {
    let protected = s.enforcing && !matches!(s.mode, Mode::Open | Mode::Audit);
    let missing = if s.missing_interfaces.is_empty() {
        String::new()
    } else {
        format!(
            " (not protected: {} missing)",
            s.missing_interfaces.join(", ")
        )
    };
    let mode = match &s.mode {
        Mode::Enforce => String::new(),
        Mode::Lockdown { admin } => {
            format!(" (LOCKDOWN, admin {})", admin.as_deref().unwrap_or("none"))
        }
        Mode::Audit => " (AUDIT mode: nothing is dropped)".into(),
        Mode::Open => " (OPEN mode: nothing is dropped)".into(),
    };
    let yes = if protected { "yes" } else { "NO" };
    println!("Protected:   {yes}{missing}{mode}");
    let list: Vec<String> = s
        .interfaces
        .iter()
        .map(|(k, v)| format!("{k} ({v})"))
        .collect();
    println!(
        "Interfaces:  {}",
        if list.is_empty() {
            "none".into()
        } else {
            list.join(", ")
        }
    );
    println!(
        "Rules:       {} rule(s), generation {}, sha256 {}",
        s.rules,
        s.generation,
        s.hash.get(..12).unwrap_or("")
    );
    print_windows(s);
    let flows = match (s.conntrack.entries, s.conntrack.capacity) {
        (Some(e), Some(c)) => format!("{e} of {c} connection-table entries in use"),
        _ => format!(
            "unknown ({})",
            s.conntrack.error.as_deref().unwrap_or("not reported")
        ),
    };
    println!("Flows:       {flows}");
    if let Some(c) = &s.crowdsec {
        print_crowdsec(c);
    }
    if let Some(d) = &s.dns
        && let Some(e) = &d.error
    {
        println!("DNS:         FORWARDER NOT RUNNING (names admit nothing): {e}");
    } else if let Some(d) = &s.dns {
        println!(
            "DNS:         forwarder on {}{} -> {}; {} learned destinations; {} answers ({} admitting), {} SERVFAIL",
            d.listen,
            if d.socket_activated {
                " (socket-activated)"
            } else {
                ""
            },
            d.upstreams.join(", "),
            d.entries,
            d.answers,
            d.admitting,
            d.servfails
        );
    }
    print_readiness(&s.readiness);
    print_traffic(s);
    println!("Audit head:  {}", s.audit_head);
    protected
}

/// The pending confirmation window and the last rollback.
fn print_windows(s: &Status) {
    match &s.pending {
        Some(p) => println!(
            "Pending:     generation {} rolls back at {} unless confirmed (portcullis confirm)",
            p.generation,
            when(p.deadline)
        ),
        None => println!("Pending:     nothing awaits confirmation"),
    }
    if let Some(r) = &s.last_rollback {
        println!(
            "Rolled back: generation {} at {} (not confirmed in time); generation {} restored the rules before it",
            r.generation,
            local_time(r.time, None),
            r.restored
        );
    }
    if let Some(f) = &s.fleet {
        let age = f
            .stale_secs
            .map_or("no exchange with etcd since start".into(), |n| {
                format!("synced {n} s ago")
            });
        let trouble = match (&f.error, &f.refused) {
            (Some(e), _) => format!("; NOT FOLLOWED: {e}"),
            (None, Some(r)) => format!("; revision REFUSED: {r}"),
            (None, None) => String::new(),
        };
        println!(
            "Fleet:       cluster {}, etcd revision {}, {} member(s), {age}{trouble}",
            f.cluster_id, f.revision, f.members
        );
    }
    if s.refused_writes > 0 {
        println!(
            "Refused:     {} write(s) refused for lack of permission",
            s.refused_writes
        );
    }
}

/// The CrowdSec bouncer: connected or why not, and since when.
fn print_crowdsec(c: &portcullis::crowdsec::BouncerStatus) {
    let last = c
        .last_success
        .map_or_else(|| "never".into(), |t| local_time(t, None));
    match &c.error {
        None => println!(
            "CrowdSec:    {} decisions into deny set {} from {}, last poll {last}",
            c.decisions, c.set, c.url
        ),
        Some(e) => println!(
            "CrowdSec:    NOT CONNECTED to {} (bans in force stay; last good poll {last}): {e}",
            c.url
        ),
    }
    if let Some(w) = &c.warning {
        println!("             warning: {w}");
    }
}

fn print_readiness(r: &Report) {
    println!("SSH-ready:   {}", if r.ready { "yes" } else { "NO" });
    print_checks(r);
    println!(
        "System:      {}{}",
        r.system_state.as_deref().unwrap_or("unknown (no D-Bus)"),
        if r.failed_units.is_empty() {
            String::new()
        } else {
            format!(", failed units: {}", r.failed_units.join(", "))
        }
    );
}

/// Packets passed and dropped (as the daemon classes each counter), and
/// the latest drops.
fn print_traffic(s: &Status) {
    let sum = |passes: bool| -> u64 {
        s.counters
            .values()
            .filter(|c| c.passes == passes)
            .map(|c| c.packets)
            .sum()
    };
    println!("Packets:     {} passed, {} dropped", sum(true), sum(false));
    if let Some(v) = &s.egress_volume {
        print_egress_volume(v);
    }
    if !s.deny_sets.is_empty() {
        let sets: Vec<String> = s
            .deny_sets
            .iter()
            .map(|d| {
                format!(
                    "{} ({} entries, {} dropped)",
                    d.set, d.count, d.dropped_packets
                )
            })
            .collect();
        println!("Deny sets:   {}", sets.join(", "));
    }
    if s.recent_drops.is_empty() {
        println!("Recent drops: none");
    } else {
        println!("Recent drops:");
        for d in s.recent_drops.iter().rev().take(5) {
            println!(
                "  {} {}",
                local_time(d.time_ms / 1000, Some(d.time_ms % 1000)),
                describe_drop(d)
            );
        }
    }
}

/// The destinations this host sent the most to, since the daemon started.
fn print_egress_volume(v: &portcullis::core::VolumeStatus) {
    if v.top.is_empty() {
        println!("Egress:      nothing sent yet");
    } else {
        println!("Egress:      top destinations since start");
        for d in v.top.iter().take(5) {
            let port = if d.port == 0 {
                String::new()
            } else {
                format!(":{}", d.port)
            };
            println!(
                "  {}{port} {}: {} bytes, {} packets",
                d.destination, d.protocol, d.bytes, d.packets
            );
        }
    }
    if v.overflow_bytes > 0 {
        println!(
            "  (table full: {} bytes, {} packets not counted per destination)",
            v.overflow_bytes, v.overflow_packets
        );
    }
}

/// The daemon does not answer: what the pins under `pin_dir` still enforce.
fn pinned(ctx: &Ctx, pin_dir: &Path, why: &anyhow::Error) -> anyhow::Result<i32> {
    let links = pin_dir.join("links");
    let mut ingress = Vec::new();
    let mut egress = Vec::new();
    // Only root's pins count: on a world-writable bpffs anyone may make
    // entries with these names.
    let roots = |p: &Path| {
        use std::os::unix::fs::MetadataExt as _;
        std::fs::symlink_metadata(p)
            .is_ok_and(|m| m.uid() == 0 && m.mode() & 0o022 == 0 && !m.is_symlink())
    };
    let entries = if roots(pin_dir) && roots(&links) {
        std::fs::read_dir(&links).ok()
    } else {
        None
    };
    if let Some(entries) = entries {
        for e in entries
            .flatten()
            .filter(|e| roots(&e.path()) && !e.path().is_dir())
        {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(i) = name.strip_prefix("xdp-") {
                ingress.push(i.to_string());
            } else if let Some(i) = name.strip_prefix("tcx-") {
                egress.push(i.to_string());
            }
        }
    }
    ingress.sort();
    egress.sort();
    let (bootstrap, unknown) = bootstrap_only(pin_dir, &ingress);
    let maps = portcullis::dataplane::maps_dir(pin_dir);
    let layout = maps.exists().then_some(portcullis_common::LAYOUT_VERSION);
    if ctx.json {
        let doc = serde_json::json!({
            "daemon": "not running",
            "error": format!("{why:#}"),
            "pin_dir": pin_dir,
            "pinned_ingress": ingress,
            "bootstrap_ingress": bootstrap,
            "unknown_ingress": unknown,
            "pinned_egress": egress,
            "layout": layout,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(EXIT_DAEMON_DOWN);
    }
    println!("Daemon:      not running ({why:#})");
    if ingress.is_empty() {
        println!(
            "Protected:   NO: nothing pinned under {} (no filtering)",
            pin_dir.display()
        );
        return Ok(EXIT_DAEMON_DOWN);
    }
    print_pinned_ingress(&ingress, &bootstrap, &unknown);
    println!(
        "Egress:      {}",
        if egress.is_empty() {
            "no TCX link pinned (a clsact filter may still hold the egress program)".to_string()
        } else {
            format!("pinned on {}", egress.join(", "))
        }
    );
    match layout {
        Some(v) => println!("Maps:        layout v{v} under {}", maps.display()),
        None => println!(
            "Maps:        none of this version's layout under {}",
            pin_dir.display()
        ),
    }
    println!("Start the daemon to change rules: systemctl start portcullis");
    Ok(EXIT_DAEMON_DOWN)
}

/// What the pinned XDP links enforce: the last rules, only the bootstrap
/// filter (`bootstrap`), or what cannot be told (`unknown`).
fn print_pinned_ingress(ingress: &[String], bootstrap: &[String], unknown: &[String]) {
    let full: Vec<&str> = ingress
        .iter()
        .filter(|i| !bootstrap.contains(i) && !unknown.contains(i))
        .map(String::as_str)
        .collect();
    if !bootstrap.is_empty() && bootstrap.len() == ingress.len() {
        println!("Protected:   NO (bootstrap filter only)");
    }
    if !full.is_empty() {
        println!(
            "Protected:   daemon not running; enforcement pinned on {} (filtering continues with the last rules)",
            full.join(", ")
        );
    }
    if !bootstrap.is_empty() {
        println!(
            "Bootstrap:   {}: only the bootstrap filter (ARP and neighbour discovery pass; no rules, no SSH): the daemon is verifying the full programs, or stopped before it could",
            bootstrap.join(", ")
        );
    }
    if !unknown.is_empty() {
        println!(
            "Unknown:     {}: an XDP link is pinned, but whether it runs the last rules or only the bootstrap filter cannot be told (run as root)",
            unknown.join(", ")
        );
    }
}

/// The interfaces of `ingress` whose pinned XDP link runs the bootstrap
/// filter (a fresh start before its full programs, or one that died then),
/// and those whose program cannot be told (not root, no CAP_BPF).
fn bootstrap_only(pin_dir: &Path, ingress: &[String]) -> (Vec<String>, Vec<String>) {
    let tags = match portcullis::dataplane::BootstrapTags::load() {
        Ok(tags) => tags,
        Err(_) => return (Vec::new(), ingress.to_vec()),
    };
    let (mut bootstrap, mut unknown) = (Vec::new(), Vec::new());
    for i in ingress {
        match tags.runs_on(pin_dir, i) {
            Ok(Some(true)) => bootstrap.push(i.clone()),
            Ok(Some(false)) => {}
            Ok(None) | Err(_) => unknown.push(i.clone()),
        }
    }
    (bootstrap, unknown)
}

/// Polls `/v1/ready` until it answers 200 or `timeout` passes. A daemon
/// that is not up yet counts as not ready (this runs early in boot).
pub fn wait_ready(ctx: &Ctx, timeout: std::time::Duration) -> anyhow::Result<i32> {
    let deadline = std::time::Instant::now() + timeout;
    let mut last: Result<Report, String>;
    loop {
        match ctx.call(Method::GET, "/v1/ready", None) {
            Ok(r) if r.status == 200 || r.status == 503 => {
                let doc: Option<Report> = serde_json::from_slice(&r.body).ok();
                match doc {
                    Some(doc) if r.status == 200 => {
                        if ctx.json {
                            println!("{}", serde_json::to_string_pretty(&doc)?);
                        } else {
                            println!("SSH-ready");
                            print_checks(&doc);
                        }
                        return Ok(0);
                    }
                    Some(doc) => last = Ok(doc),
                    None => last = Err("the daemon's readiness document is unreadable".into()),
                }
            }
            Ok(r) => last = Err(format!("the daemon answered with status {}", r.status)),
            Err(e) => last = Err(format!("{e:#}")),
        }
        if std::time::Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    not_ready(ctx, timeout, last)
}

fn not_ready(
    ctx: &Ctx,
    timeout: std::time::Duration,
    last: Result<Report, String>,
) -> anyhow::Result<i32> {
    match last {
        Ok(doc) => {
            if ctx.json {
                println!("{}", serde_json::to_string_pretty(&doc)?);
            }
            eprintln!(
                "not SSH-ready after {} s; failing checks:",
                timeout.as_secs()
            );
            for check in &doc.checks {
                let passes = check.state.passes();
                if check.gates && !passes {
                    eprintln!(
                        "  {}: {} ({})",
                        check.name,
                        check.detail,
                        state_name(check.state)
                    );
                }
            }
        }
        Err(e) => eprintln!("not SSH-ready after {} s: {e}", timeout.as_secs()),
    }
    Ok(1)
}

/// A check's state as the daemon names it (`pass`, `fail`, ...).
fn state_name(state: State) -> String {
    serde_json::to_value(state)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default()
}

/// The readiness checks of a readiness document, one per line.
pub fn print_checks(doc: &Report) {
    for check in &doc.checks {
        let state = state_name(check.state);
        println!("  {:<16} {:<8} {}", check.name, state, check.detail);
    }
}
