//! Daemon start to enforcing and to READY, fresh (nothing pinned) and
//! restarted (the previous daemon's pins and state present: it adopts),
//! timed from outside: the bench spawns a real `portcullisd` and stamps each
//! line of its log as it arrives. Enforcing is the first enforcement of the
//! last configured interface: on a fresh start the line `bootstrap
//! enforcing` (the bootstrap filter: ARP and neighbour discovery only, no
//! new inbound), else the line `enforcing`; full enforcement is the line
//! `enforcing` (the full program; after it, the bench checks the interface
//! carries an XDP program); READY is the line `ready`, logged once the API
//! socket is bound and right before `READY=1` goes to systemd. The lines in
//! between give the phases. The bpf(2) calls of one start of each kind are
//! timed with `strace -T` (when installed): the verifier is `BPF_PROG_LOAD`.

use std::{
    io::BufRead as _,
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use portcullis_tests::PinDir;
use serde::Serialize;

use crate::report::Stat;

const STARTS: usize = 5;

/// The log lines that end each phase, in order, with the phase's name.
const MARKERS: [(&str, &str); 9] = [
    ("links subscribed", "exec, config, netlink link watch"),
    ("live rule set chosen", "saved state read"),
    ("bootstrap enforcing", "bootstrap filter loaded, attached"),
    (
        "XDP ingress program loaded",
        "eBPF object: BTF, maps, verifier",
    ),
    ("rules live", "rules compiled, written, saved"),
    ("recording outbound flows", "egress (TC) attached"),
    ("connection table seeded", "open connections seeded"),
    ("enforcing", "ingress (XDP) attached"),
    ("ready", "services, API socket (READY)"),
];

#[derive(Debug, Default, Serialize)]
pub struct StartReport {
    /// To the first enforcement (a fresh start: the bootstrap filter).
    pub start_to_enforcing_ms: Option<Stat>,
    /// To the full program on the interface (the line `enforcing`).
    pub start_to_full_enforcing_ms: Option<Stat>,
    /// Fresh starts that attached the bootstrap filter (of `STARTS`).
    pub start_bootstrapped: usize,
    pub start_to_ready_ms: Option<Stat>,
    pub restart_to_enforcing_ms: Option<Stat>,
    pub restart_to_ready_ms: Option<Stat>,
    /// restart / start to enforcing, per pair (the two run back to back).
    pub restart_vs_start: Option<Stat>,
    /// restart / start to full enforcement, per pair.
    pub restart_vs_start_full: Option<Stat>,
    /// Phase name, median ms (fresh starts).
    pub start_phases: Vec<(String, Stat)>,
    pub restart_phases: Vec<(String, Stat)>,
    /// bpf(2) command, calls, total ms: one fresh start, one restart.
    pub start_bpf_calls: Vec<(String, usize, f64)>,
    pub restart_bpf_calls: Vec<(String, usize, f64)>,
}

struct Run {
    /// The first enforcement: the bootstrap, else the full program.
    enforcing_ms: f64,
    full_ms: f64,
    bootstrapped: bool,
    ready_ms: f64,
    /// Arrival of each marker (ms since spawn), `None` when not logged.
    marks: Vec<Option<f64>>,
}

fn message_is(line: &str, msg: &str) -> bool {
    // "<time>  INFO target: message field=value ..."
    line.split_once(": ")
        .map(|(_, rest)| rest == msg || rest.starts_with(&format!("{msg} ")))
        .unwrap_or(false)
}

/// Log lines with their arrival, ms since the spawn.
type Lines = mpsc::Receiver<(f64, String)>;

fn spawn(
    config: &Path,
    state: &Path,
    socket: &Path,
    strace: Option<&Path>,
) -> anyhow::Result<(Child, Lines)> {
    let bin = portcullis_tests::workspace_bin("portcullisd")?;
    let mut cmd = match strace {
        Some(out) => {
            let mut c = Command::new("strace");
            c.args(["-f", "-T", "-qq", "--seccomp-bpf", "-e", "trace=bpf", "-o"])
                .arg(out)
                .arg(&bin);
            c
        }
        None => Command::new(&bin),
    };
    cmd.arg("--config")
        .arg(config)
        .arg("--state-dir")
        .arg(state)
        .arg("--socket")
        .arg(socket)
        .env("RUST_LOG", "info,portcullisd=debug")
        .env_remove("JOURNAL_STREAM")
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = cmd.spawn()?;
    let stderr = child.stderr.take().expect("piped stderr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send((started.elapsed().as_secs_f64() * 1e3, line));
        }
    });
    Ok((child, rx))
}

fn xdp_attached(ifname: &str) -> anyhow::Result<bool> {
    let out = portcullis_tests::run(
        Command::new("ip").args(["-j", "-d", "link", "show", "dev", ifname]),
    )?;
    Ok(out.contains("\"xdp\""))
}

/// One start: until READY, then stopped with SIGTERM (pins stay).
fn once(
    config: &Path,
    state: &Path,
    socket: &Path,
    ifname: &str,
    strace: Option<&Path>,
) -> anyhow::Result<Run> {
    let (mut child, rx) = spawn(config, state, socket, strace)?;
    let mut marks = vec![None; MARKERS.len()];
    let mut log = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let result = loop {
        let Ok((ms, line)) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
        else {
            break Err(anyhow::anyhow!(
                "portcullisd did not log `ready` within 60 s; its log:\n{}",
                log.join("\n")
            ));
        };
        for (i, (msg, _)) in MARKERS.iter().enumerate() {
            if message_is(&line, msg) {
                marks[i] = Some(ms);
            }
        }
        log.push(line);
        if marks[MARKERS.len() - 1].is_some() {
            break Ok(());
        }
    };
    let attached = xdp_attached(ifname);
    // Under strace the child is strace: stop the daemon it runs.
    let pid = match strace {
        Some(_) => std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", child.id()))
            .ok()
            .and_then(|c| c.split_whitespace().next()?.parse().ok())
            .unwrap_or(child.id() as i32),
        None => child.id() as i32,
    };
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = child.wait();
    result?;
    anyhow::ensure!(
        attached?,
        "{ifname} carries no XDP program after `enforcing`"
    );
    let full_ms = marks[MARKERS.len() - 2].ok_or_else(|| anyhow::anyhow!("no `enforcing` line"))?;
    let bootstrap_ms = marks[2];
    let ready_ms = marks[MARKERS.len() - 1].unwrap_or(f64::NAN);
    Ok(Run {
        enforcing_ms: bootstrap_ms.map_or(full_ms, |b| b.min(full_ms)),
        full_ms,
        bootstrapped: bootstrap_ms.is_some(),
        ready_ms,
        marks,
    })
}

/// Phase durations (ms) from the marks: each from the previous mark seen.
fn phases(runs: &[Run]) -> Vec<(String, Stat)> {
    let mut out = Vec::new();
    for (i, (_, name)) in MARKERS.iter().enumerate() {
        let v: Vec<f64> = runs
            .iter()
            .filter_map(|r| {
                let end = r.marks[i]?;
                let start = r.marks[..i].iter().rev().find_map(|m| *m).unwrap_or(0.0);
                Some(end - start)
            })
            .collect();
        if !v.is_empty() {
            out.push((name.to_string(), Stat::of(v)));
        }
    }
    out
}

/// bpf(2) calls by command from an `strace -T` log: (command, calls, ms).
fn bpf_calls(log: &Path) -> Vec<(String, usize, f64)> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut by: std::collections::BTreeMap<String, (usize, f64)> = Default::default();
    for line in text.lines() {
        let Some(cmd) = line.split("bpf(").nth(1).and_then(|r| r.split(',').next()) else {
            continue;
        };
        let Some(secs) = line
            .rsplit_once('<')
            .and_then(|(_, t)| t.trim_end_matches('>').parse::<f64>().ok())
        else {
            continue;
        };
        // Program loads by name: which program the verifier spent it on.
        let name = line
            .split_once("prog_name=\"")
            .and_then(|(_, r)| r.split('"').next())
            .map_or(String::new(), |n| format!(" {n}"));
        let e = by.entry(format!("{cmd}{name}")).or_default();
        e.0 += 1;
        e.1 += secs * 1e3;
    }
    let mut v: Vec<_> = by.into_iter().map(|(k, (n, ms))| (k, n, ms)).collect();
    v.sort_by(|a, b| b.2.total_cmp(&a.2));
    v
}

fn config_for(dir: &Path, pins: &PinDir, ifname: &str) -> anyhow::Result<std::path::PathBuf> {
    let config = dir.join("portcullis.toml");
    std::fs::write(
        &config,
        format!(
            "interfaces = [\"{ifname}\"]\npin_dir = \"{}\"\n",
            pins.path().display()
        ),
    )?;
    Ok(config)
}

/// Fresh start and restart, `STARTS` pairs, interleaved; then one of each
/// under strace. The daemon runs the default config on `ifname`.
pub fn measure(ifname: &str) -> anyhow::Result<StartReport> {
    let (mut fresh, mut restart, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    let mut full_ratios = Vec::new();
    for _ in 0..STARTS {
        let pins = PinDir::new()?;
        let dir = tempfile::tempdir()?;
        let config = config_for(dir.path(), &pins, ifname)?;
        let (state, socket) = (dir.path().join("state"), dir.path().join("api.sock"));
        let a = once(&config, &state, &socket, ifname, None)?;
        let b = once(&config, &state, &socket, ifname, None)?;
        ratios.push(b.enforcing_ms / a.enforcing_ms);
        full_ratios.push(b.full_ms / a.full_ms);
        fresh.push(a);
        restart.push(b);
    }
    let stat = |runs: &[Run], f: fn(&Run) -> f64| Some(Stat::of(runs.iter().map(f).collect()));
    let mut report = StartReport {
        start_to_enforcing_ms: stat(&fresh, |r| r.enforcing_ms),
        start_to_full_enforcing_ms: stat(&fresh, |r| r.full_ms),
        start_bootstrapped: fresh.iter().filter(|r| r.bootstrapped).count(),
        start_to_ready_ms: stat(&fresh, |r| r.ready_ms),
        restart_to_enforcing_ms: stat(&restart, |r| r.enforcing_ms),
        restart_to_ready_ms: stat(&restart, |r| r.ready_ms),
        restart_vs_start: Some(Stat::of(ratios)),
        restart_vs_start_full: Some(Stat::of(full_ratios)),
        start_phases: phases(&fresh),
        restart_phases: phases(&restart),
        ..Default::default()
    };
    if Command::new("strace").arg("-V").output().is_ok() {
        let pins = PinDir::new()?;
        let dir = tempfile::tempdir()?;
        let config = config_for(dir.path(), &pins, ifname)?;
        let (state, socket) = (dir.path().join("state"), dir.path().join("api.sock"));
        let (a, b) = (
            dir.path().join("strace-start"),
            dir.path().join("strace-restart"),
        );
        once(&config, &state, &socket, ifname, Some(&a))?;
        once(&config, &state, &socket, ifname, Some(&b))?;
        report.start_bpf_calls = bpf_calls(&a);
        report.restart_bpf_calls = bpf_calls(&b);
    }
    Ok(report)
}

pub fn print(r: &StartReport) {
    println!(
        "\ndaemon start (real portcullisd, default config, 1 interface; median of {STARTS} [min-max], ms)"
    );
    let row = |name: &str, s: &Option<Stat>| {
        if let Some(s) = s {
            println!("  {name:<34} {s}");
        }
    };
    row(
        &format!(
            "start to enforcing (bootstrap {}/{STARTS})",
            r.start_bootstrapped
        ),
        &r.start_to_enforcing_ms,
    );
    row("start to full enforcement", &r.start_to_full_enforcing_ms);
    row("start to READY (socket ready)", &r.start_to_ready_ms);
    row(
        "restart (pins present) to enforcing",
        &r.restart_to_enforcing_ms,
    );
    row("restart to READY", &r.restart_to_ready_ms);
    for (name, s) in [
        ("restart / start (paired)", &r.restart_vs_start),
        ("  the same, full enforcement", &r.restart_vs_start_full),
    ] {
        if let Some(s) = s {
            println!("  {name:<34} {:.2}x [{:.2}-{:.2}]", s.median, s.min, s.max);
        }
    }
    println!(
        "  phases (ms, median)                {:>10} {:>10}",
        "start", "restart"
    );
    for (name, s) in &r.start_phases {
        let re = r
            .restart_phases
            .iter()
            .find(|(n, _)| n == name)
            .map_or(String::from("-"), |(_, s)| format!("{:.1}", s.median));
        println!("    {name:<32} {:>10.1} {re:>10}", s.median);
    }
    for (label, calls) in [
        ("start", &r.start_bpf_calls),
        ("restart", &r.restart_bpf_calls),
    ] {
        if calls.is_empty() {
            continue;
        }
        println!("  bpf(2) calls of one {label} (strace -T; traced, so slower):");
        for (cmd, n, ms) in calls.iter().take(8) {
            println!("    {cmd:<40} {n:>6} calls {ms:>9.1} ms");
        }
    }
}
