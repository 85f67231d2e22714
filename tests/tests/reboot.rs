//! Stop and start, as a provider's validation does: a Debian container with
//! Portcullis installed as its service (the workspace's binaries and units)
//! is booted, used, rebooted from inside (`systemctl reboot`, a clean
//! shutdown) and booted again on the same overlay, so `/etc` and `/var/lib`
//! persist while `/run` and the bpffs (the pins, so the attached programs)
//! do not. The container configures its own addresses with systemd-networkd
//! and an early socket unit listens on a port the rules deny from the first
//! moments of each boot; a prober in the client namespace, started the
//! moment the link appears (before each boot), connects to that port every
//! few milliseconds and to SSH as the positive signal. The denied port must
//! never answer, not even with a reset; after the reboot SSH with the
//! injected key works, readiness passes, and a rule added at runtime is
//! still live.
//!
//! `PORTCULLIS_REBOOT_MISORDER=1` installs, before the reboot, a unit that
//! is ordered after the network (`After=network-online.target`, without
//! `Before=network-pre.target`): the prober must then see the denied port
//! answer, and the test fails. That is how the test was shown to catch a
//! window.

use std::{
    collections::BTreeMap,
    io::Read as _,
    net::SocketAddr,
    os::fd::AsRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use portcullis_tests::{
    container::{Boot, Container, INSTANCE_IFACE, INSTANCE_V4, INSTANCE_V6, SshKey},
    is_root, sock,
};
use serde_json::Value;
use socket2::{Domain, Socket, Type};

const BOOT: Duration = Duration::from_secs(120);
/// Listened on from early boot by a socket unit; no rule admits it.
const DENIED_PORT: u16 = 9999;
/// Listened on by a socket unit; admitted by a rule added at runtime.
const RULE_PORT: u16 = 8080;
const RULE_ID: &str = "kept-across-reboot";
/// Its counter's name in `portcullis counters`.
const RULE_COUNTER: &str = "rule:kept-across-reboot";
/// What the denied port's service says to a connection that gets through.
const DENIED_BANNER: &str = "PORTCULLIS-REBOOT-TEST: the denied port answered";
/// What the rule's port says.
const RULE_BANNER: &str = "PORTCULLIS-REBOOT-TEST: the rule port answered";

/// The early listener on the denied port: no default dependencies, before
/// sockets.target and before Portcullis itself, so it listens from the
/// first moments of the boot, before any address exists (FreeBind), as a
/// service that binds early would: only the order of the boot keeps it shut.
fn denied_socket() -> String {
    format!(
        "[Unit]\nDescription=Early listener on a denied port (reboot test)\n\
         DefaultDependencies=no\nBefore=sockets.target portcullis.service\n\n\
         [Socket]\nListenStream=0.0.0.0:{DENIED_PORT}\nListenStream=[::]:{DENIED_PORT}\n\
         BindIPv6Only=ipv6-only\nFreeBind=yes\nAccept=yes\n\n\
         [Install]\nWantedBy=sockets.target\n"
    )
}

/// Answers every connection the socket accepts, so one that got through is
/// seen (the connect succeeding already shows it; the banner names it).
fn answering_service(what: &str, banner: &str) -> String {
    format!(
        "[Unit]\nDescription={what} (reboot test)\nDefaultDependencies=no\n\n\
         [Service]\nExecStart=/bin/echo {banner}\n\
         StandardInput=socket\nStandardOutput=socket\n"
    )
}

fn rule_socket() -> String {
    format!(
        "[Unit]\nDescription=Listener on the runtime rule's port (reboot test)\n\n\
         [Socket]\nListenStream=0.0.0.0:{RULE_PORT}\nAccept=yes\n\n\
         [Install]\nWantedBy=sockets.target\n"
    )
}

/// The shipped unit, ordered after the network instead of before it.
fn misordered_unit() -> String {
    let shipped = include_str!("../../systemd/portcullis.service");
    assert!(shipped.contains("Before=network-pre.target shutdown.target\n"));
    shipped
        .replace(
            "Before=network-pre.target shutdown.target\n",
            "Before=shutdown.target\nAfter=network-online.target\n",
        )
        .replace(
            "Wants=network-pre.target\n",
            "Wants=network-online.target\n",
        )
}

// ---------------------------------------------------------------------------
// The prober.

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    /// The handshake completed: something listens and the SYN got through.
    Connected,
    /// A reset: nothing listens, but the SYN got through.
    Refused,
    /// An ICMP error or a local error (e.g. no route).
    Error,
    /// No answer within [`PENDING`]: dropped (or no such address yet).
    Silent,
}

/// How long a connect may wait for its answer: well below the first SYN
/// retransmission (1 s), so each attempt sends exactly one SYN.
const PENDING: Duration = Duration::from_millis(300);

struct Target {
    name: &'static str,
    addr: SocketAddr,
    /// Between attempts while the target does not connect, and after it did.
    every: Duration,
    every_after: Duration,
}

#[derive(Default, Debug)]
struct Seen {
    count: u64,
    first: Option<Duration>,
    last: Option<Duration>,
}

/// What the prober saw of one target, times from the prober's start.
#[derive(Default, Debug)]
struct Log {
    attempts: u64,
    outcomes: BTreeMap<Outcome, Seen>,
    /// What a connection that got through first read (the denied port's
    /// banner), with when.
    banner: Option<(Duration, String)>,
}

impl Log {
    fn seen(&self, o: Outcome) -> Option<&Seen> {
        self.outcomes.get(&o).filter(|s| s.count > 0)
    }

    fn first(&self, o: Outcome) -> Option<Duration> {
        self.seen(o).and_then(|s| s.first)
    }
}

/// TCP connects from the client namespace to each target, on a thread of
/// its own, non-blocking (many attempts in flight), until stopped or
/// `limit` has passed.
struct Prober {
    started: Instant,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<Log>>>,
}

impl Prober {
    fn start(c: &Container, targets: Vec<Target>, limit: Duration) -> Prober {
        let stop = Arc::new(AtomicBool::new(false));
        let netns = c.client.path();
        let started = Instant::now();
        let thread = std::thread::spawn({
            let stop = stop.clone();
            move || {
                let ns = std::fs::File::open(&netns).expect("open the client namespace");
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                    .expect("enter the client namespace");
                probe(&targets, started, limit, &stop)
            }
        });
        Prober {
            started,
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Vec<Log> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .expect("prober running")
            .join()
            .expect("the prober panicked")
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn probe(targets: &[Target], started: Instant, limit: Duration, stop: &AtomicBool) -> Vec<Log> {
    let mut logs: Vec<Log> = targets.iter().map(|_| Log::default()).collect();
    let mut next: Vec<Instant> = targets.iter().map(|_| started).collect();
    // (target, sent at, socket)
    let mut pending: Vec<(usize, Instant, Socket)> = Vec::new();
    let record = |logs: &mut Vec<Log>, i: usize, at: Instant, o: Outcome| {
        let t = at.duration_since(started);
        let seen = logs[i].outcomes.entry(o).or_default();
        seen.count += 1;
        seen.first.get_or_insert(t);
        seen.last = Some(t);
    };
    while !stop.load(Ordering::Relaxed) && started.elapsed() < limit {
        let now = Instant::now();
        for (i, target) in targets.iter().enumerate() {
            if now < next[i] {
                continue;
            }
            let connected = logs[i].seen(Outcome::Connected).is_some();
            next[i] = now
                + if connected {
                    target.every_after
                } else {
                    target.every
                };
            logs[i].attempts += 1;
            let s =
                Socket::new(Domain::for_address(target.addr), Type::STREAM, None).expect("socket");
            s.set_nonblocking(true).expect("non-blocking");
            match s.connect(&target.addr.into()) {
                Ok(()) => record(&mut logs, i, now, Outcome::Connected),
                Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => pending.push((i, now, s)),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    record(&mut logs, i, now, Outcome::Refused)
                }
                Err(_) => record(&mut logs, i, now, Outcome::Error),
            }
        }
        let wait = next
            .iter()
            .min()
            .map_or(Duration::ZERO, |n| {
                n.saturating_duration_since(Instant::now())
            })
            .min(Duration::from_millis(5));
        let mut fds: Vec<libc::pollfd> = pending
            .iter()
            .map(|(_, _, s)| libc::pollfd {
                fd: s.as_raw_fd(),
                events: libc::POLLOUT,
                revents: 0,
            })
            .collect();
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structures
        // for the duration of the call.
        let n = unsafe {
            libc::poll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                wait.as_micros().div_ceil(1000) as libc::c_int,
            )
        };
        if n < 0 {
            continue;
        }
        let now = Instant::now();
        let mut keep = Vec::with_capacity(pending.len());
        for ((i, sent, s), fd) in pending.drain(..).zip(&fds) {
            if fd.revents != 0 {
                let outcome = match s.take_error() {
                    Ok(None) => Outcome::Connected,
                    Ok(Some(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                        Outcome::Refused
                    }
                    _ => Outcome::Error,
                };
                record(&mut logs, i, sent, outcome);
                if outcome == Outcome::Connected && logs[i].banner.is_none() {
                    let mut buf = [0u8; 200];
                    let _ = s.set_nonblocking(false);
                    let _ = s.set_read_timeout(Some(Duration::from_millis(300)));
                    let got = (&s).read(&mut buf).unwrap_or(0);
                    logs[i].banner = Some((
                        sent.duration_since(started),
                        String::from_utf8_lossy(&buf[..got]).trim().to_string(),
                    ));
                }
                // Close with a reset: no TIME_WAIT, the port is free again.
                let _ = s.set_linger(Some(Duration::ZERO));
            } else if now.duration_since(sent) >= PENDING {
                record(&mut logs, i, sent, Outcome::Silent);
            } else {
                keep.push((i, sent, s));
            }
        }
        pending = keep;
    }
    logs
}

/// The targets: the denied port over IPv4 and IPv6, every 5 ms (every
/// 50 ms once it has answered: each connection that gets through starts a
/// service, and systemd stops a socket that triggers 200 times in 2 s);
/// SSH every 20 ms until it answers, then every 500 ms (each connection
/// costs sshd a process).
fn targets() -> Vec<Target> {
    let v6: SocketAddr = format!("[{INSTANCE_V6}]:{DENIED_PORT}").parse().unwrap();
    vec![
        Target {
            name: "denied v4",
            addr: sock(INSTANCE_V4, DENIED_PORT),
            every: Duration::from_millis(5),
            every_after: Duration::from_millis(50),
        },
        Target {
            name: "denied v6",
            addr: v6,
            every: Duration::from_millis(5),
            every_after: Duration::from_millis(50),
        },
        Target {
            name: "ssh",
            addr: sock(INSTANCE_V4, 22),
            every: Duration::from_millis(20),
            every_after: Duration::from_millis(500),
        },
    ]
}

// ---------------------------------------------------------------------------
// Timings, from the journal and systemd, on CLOCK_MONOTONIC.

/// When the current boot's portcullisd first logged a message whose text
/// (after the level and the target) starts with `message`, from the start
/// of the boot.
fn journal_since_boot(c: &Container, message: &str) -> Option<Duration> {
    let (_, boot) = c.boot_started()?;
    let out = c
        .exec(
            "journalctl",
            &["-b", "--no-pager", "-o", "json", "-u", "portcullis.service"],
        )
        .ok()?;
    String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
        let v: Value = serde_json::from_str(l).ok()?;
        let (_, text) = v["MESSAGE"].as_str()?.split_once(": ")?;
        if !text.starts_with(message) {
            return None;
        }
        let at: u64 = v["__MONOTONIC_TIMESTAMP"].as_str()?.parse().ok()?;
        Duration::from_micros(at).checked_sub(boot)
    })
}

/// A monotonic timestamp property of `unit` (e.g.
/// `ActiveEnterTimestampMonotonic`: when it became active), from the start
/// of the boot.
fn unit_since_boot(c: &Container, unit: &str, property: &str) -> Option<Duration> {
    let (_, boot) = c.boot_started()?;
    let out = c.check("systemctl", &["show", "-P", property, unit]).ok()?;
    let at: u64 = out.trim().parse().ok().filter(|&us| us > 0)?;
    Duration::from_micros(at).checked_sub(boot)
}

fn secs(d: Option<Duration>) -> String {
    d.map_or("never".into(), |d| format!("{:.3} s", d.as_secs_f64()))
}

/// One boot's measurements, and the failures the prober saw.
struct BootReport {
    lines: Vec<String>,
    failures: Vec<String>,
}

/// Reads the prober's logs against the boot that `c` last started. Times
/// are from the boot's start (systemd-nspawn started); the prober started
/// a little before.
fn report(which: &str, c: &Container, prober_started: Instant, logs: &[Log]) -> BootReport {
    let (boot, _) = c.boot_started().expect("booted");
    let since_boot = |t: Duration| -> String {
        let at = prober_started + t;
        match at.checked_duration_since(boot) {
            Some(d) => format!("{:.3} s", d.as_secs_f64()),
            None => format!("-{:.3} s", boot.duration_since(at).as_secs_f64()),
        }
    };
    let enforcing = journal_since_boot(c, "enforcing");
    // The daemon logs readiness on its next check (within a second) after
    // `wait-ready` saw it.
    let ssh_ready = c
        .wait_for(
            "the journal to say SSH-ready",
            Duration::from_secs(5),
            || journal_since_boot(c, "SSH-ready"),
        )
        .ok();
    let listening = unit_since_boot(c, "pct-denied.socket", "ActiveEnterTimestampMonotonic");
    let mut lines = vec![format!(
        "{which}: from boot start: the denied port's socket listening {}, portcullisd started {}, \
         enforcing {}, systemd-networkd started {}, SSH-ready {} (journal and systemd)",
        secs(listening),
        secs(unit_since_boot(
            c,
            "portcullis.service",
            "ExecMainStartTimestampMonotonic"
        )),
        secs(enforcing),
        secs(unit_since_boot(
            c,
            "systemd-networkd.service",
            "ExecMainStartTimestampMonotonic"
        )),
        secs(ssh_ready),
    )];
    let mut failures = Vec::new();
    for (target, log) in targets().iter().zip(logs) {
        let summary: Vec<String> = log
            .outcomes
            .iter()
            .map(|(o, s)| format!("{o:?} {}", s.count))
            .collect();
        lines.push(format!(
            "{which}: prober, {} ({}): {} attempts: {}",
            target.name,
            target.addr,
            log.attempts,
            summary.join(", ")
        ));
        if target.name == "ssh" {
            let answered = [Outcome::Refused, Outcome::Connected]
                .iter()
                .filter_map(|&o| log.first(o))
                .min();
            lines.push(format!(
                "{which}: from outside: the address first answered (SSH port) at {}, SSH port first accepted at {}",
                answered.map_or("never".into(), since_boot),
                log.first(Outcome::Connected)
                    .map_or("never".into(), since_boot),
            ));
            if log.first(Outcome::Connected).is_none() {
                failures.push(format!("{which}: the SSH port never answered the prober"));
            }
            continue;
        }
        for o in [Outcome::Connected, Outcome::Refused] {
            if let Some(seen) = log.seen(o) {
                failures.push(format!(
                    "{which}: the denied port {} ANSWERED ({o:?}) {} times, from {} to {} after boot start (enforcing at {}){}",
                    target.addr,
                    seen.count,
                    since_boot(seen.first.unwrap()),
                    since_boot(seen.last.unwrap()),
                    secs(enforcing),
                    match (&log.banner, o) {
                        (Some((_, b)), Outcome::Connected) => format!(", saying {b:?}"),
                        _ => String::new(),
                    }
                ));
            }
        }
    }
    // The test means something only if the listener was there before the
    // filter: then only the order of the boot keeps the port shut.
    match (listening, enforcing) {
        (Some(l), Some(e)) if l < e => {}
        _ => failures.push(format!(
            "{which}: the denied port's socket must listen before portcullis enforces \
             (listening {}, enforcing {})",
            secs(listening),
            secs(enforcing)
        )),
    }
    BootReport { lines, failures }
}

// ---------------------------------------------------------------------------
// Checks inside and from outside.

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// One TCP connection from the client: whether it connected, and what it
/// read (the socket units answer a line).
fn connect(c: &Container, port: u16) -> Option<String> {
    c.client.enter(|| {
        let mut s = std::net::TcpStream::connect_timeout(
            &sock(INSTANCE_V4, port),
            Duration::from_millis(700),
        )
        .ok()?;
        s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
        let mut got = String::new();
        let _ = s.read_to_string(&mut got);
        Some(got)
    })
}

/// SSH ready and used: `wait-ready` passes inside, and an SSH session with
/// the injected key runs a command from outside. Returns the container's
/// boot id, as the session saw it.
fn ssh_ready(c: &Container, key: &SshKey) -> String {
    let out = c
        .exec("portcullis", &["wait-ready", "--timeout", "60"])
        .unwrap();
    assert!(
        out.status.success(),
        "wait-ready: {}\n{}",
        text(&out),
        c.journal("portcullis.service")
    );
    let out = key
        .ssh(&c.client, "root", INSTANCE_V4)
        .arg("cat /proc/sys/kernel/random/boot_id")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "SSH with the injected key: {}\n{}",
        text(&out),
        c.journal("portcullis.service")
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn counters(c: &Container) -> Value {
    let out = c.exec("portcullis", &["--json", "counters"]).unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("counters: {e}: {}", text(&out)))
}

fn rule_packets(c: &Container) -> u64 {
    counters(c)["rules"][RULE_COUNTER]["packets"]
        .as_u64()
        .unwrap_or_default()
}

#[test]
fn a_reboot_keeps_the_rules_and_no_denied_port_answers_while_it_boots() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let misorder = std::env::var_os("PORTCULLIS_REBOOT_MISORDER").is_some();
    let whole = Instant::now();
    let key = SshKey::new().unwrap();
    let config = format!(
        "interfaces = [\"{INSTANCE_IFACE}\"]\n[ssh]\nallow = true\n[readiness]\nssh_user = \"root\"\n"
    );
    let mut c = Boot::new()
        .portcullis(&config)
        .unwrap()
        .self_addressed()
        .file(
            "/etc/systemd/system/pct-denied.socket",
            denied_socket(),
            0o644,
        )
        .file(
            "/etc/systemd/system/pct-denied@.service",
            answering_service("Answers on the denied port", DENIED_BANNER),
            0o644,
        )
        .symlink(
            "/etc/systemd/system/sockets.target.wants/pct-denied.socket",
            "/etc/systemd/system/pct-denied.socket",
        )
        .file("/etc/systemd/system/pct-rule.socket", rule_socket(), 0o644)
        .file(
            "/etc/systemd/system/pct-rule@.service",
            answering_service("Answers on the rule's port", RULE_BANNER),
            0o644,
        )
        .symlink(
            "/etc/systemd/system/sockets.target.wants/pct-rule.socket",
            "/etc/systemd/system/pct-rule.socket",
        )
        .prepare()
        .unwrap();

    // First boot, probed from the moment the link exists.
    let prober = Prober::start(&c, targets(), Duration::from_secs(240));
    c.boot(BOOT).unwrap();
    c.check(
        "portcullis",
        &["ssh", "add-key", "--user", "root", &key.public().unwrap()],
    )
    .unwrap();
    let boot_id_1 = ssh_ready(&c, &key);
    let prober_started = prober.started;
    let first = report("first boot", &c, prober_started, &prober.finish());

    // The container configured its address itself (nothing outside did).
    let networkd = c
        .check("networkctl", &["status", "--no-pager", INSTANCE_IFACE])
        .unwrap_or_default();
    assert!(
        networkd.contains("configured") && networkd.contains(INSTANCE_V4),
        "systemd-networkd did not configure {INSTANCE_IFACE}:\n{networkd}"
    );

    // A rule added at runtime; its port answers, the denied port does not.
    let out = c
        .exec(
            "portcullis",
            &[
                "rules",
                "add",
                "--id",
                RULE_ID,
                "--from-port",
                &RULE_PORT.to_string(),
                "--to-port",
                &RULE_PORT.to_string(),
                "--protocol",
                "tcp",
            ],
        )
        .unwrap();
    assert!(out.status.success(), "rules add: {}", text(&out));
    for _ in 0..3 {
        let got = connect(&c, RULE_PORT);
        assert!(
            got.as_deref().is_some_and(|g| g.contains(RULE_BANNER)),
            "the runtime rule's port: {got:?}"
        );
    }
    assert_eq!(connect(&c, DENIED_PORT), None, "the denied port answered");
    let before = rule_packets(&c);
    assert!(
        before >= 3,
        "the rule counted its packets: {before}\n{:#}",
        counters(&c)
    );
    // Markers in /etc and /var/lib, written inside.
    c.check(
        "sh",
        &[
            "-c",
            "cat /proc/sys/kernel/random/boot_id | tee /etc/pct-reboot-marker > /var/lib/pct-reboot-marker",
        ],
    )
    .unwrap();

    if misorder {
        // The deliberate defect: the unit starts after the network is up.
        std::fs::write(
            c.host_path(std::path::Path::new(
                "/etc/systemd/system/portcullis.service",
            )),
            misordered_unit(),
        )
        .unwrap();
        eprintln!(
            "PORTCULLIS_REBOOT_MISORDER: portcullis.service now starts after network-online.target"
        );
    }

    // Reboot: a clean shutdown from inside, a new link, a new boot on the
    // same overlay; probed again from the moment the new link exists.
    let status = c.shut_down(Duration::from_secs(90)).unwrap();
    assert_eq!(
        status.code(),
        Some(133),
        "systemd-nspawn's exit status says reboot (133): {status}\n{}",
        c.console()
    );
    c.replug().unwrap();
    let prober = Prober::start(&c, targets(), Duration::from_secs(240));
    c.boot(BOOT).unwrap();
    // Counters live in the bpffs, in memory: they restart (docs/security.md).
    // Read before anything touches the rule's port.
    let after = c
        .wait_for("portcullis to answer", Duration::from_secs(30), || {
            let out = c.exec("portcullis", &["--json", "counters"]).ok()?;
            let v: Value = serde_json::from_slice(&out.stdout).ok()?;
            v["rules"].get(RULE_COUNTER).map(|r| r["packets"].as_u64())
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", c.journal("portcullis.service")));
    let boot_id_2 = ssh_ready(&c, &key);
    let prober_started = prober.started;
    let second = report("after the reboot", &c, prober_started, &prober.finish());

    for line in first.lines.iter().chain(&second.lines) {
        eprintln!("{line}");
    }
    let failures: Vec<&String> = first.failures.iter().chain(&second.failures).collect();
    assert!(
        failures.is_empty(),
        "a window in which a denied port answered:\n{}\njournal (portcullis, last boot):\n{}",
        failures
            .iter()
            .map(|f| f.as_str())
            .collect::<Vec<_>>()
            .join("\n"),
        c.journal("portcullis.service")
    );

    // It really rebooted, and what was written persisted.
    assert_ne!(boot_id_1, boot_id_2, "the boot id changed");
    for marker in ["/etc/pct-reboot-marker", "/var/lib/pct-reboot-marker"] {
        let got = c.check("cat", &[marker]).unwrap_or_default();
        assert_eq!(got.trim(), boot_id_1, "{marker} persisted");
    }
    // The runtime rule carried over, and it is live in the data path.
    let rules = c.check("portcullis", &["--json", "rules", "get"]).unwrap();
    assert!(rules.contains(RULE_ID), "the runtime rule is gone: {rules}");
    assert_eq!(
        after,
        Some(0),
        "the counters restart with the bpffs (before: {before})"
    );
    let got = connect(&c, RULE_PORT);
    assert!(
        got.as_deref().is_some_and(|g| g.contains(RULE_BANNER)),
        "the runtime rule's port after the reboot: {got:?}"
    );
    assert_eq!(connect(&c, DENIED_PORT), None, "the denied port answered");
    assert!(rule_packets(&c) >= 1);
    // The denied port's listener is there and answers, from inside (over
    // the loopback, where no filter runs): only Portcullis keeps it shut.
    for addr in [INSTANCE_V4, INSTANCE_V6] {
        let to = SocketAddr::new(addr.parse().unwrap(), DENIED_PORT);
        let inside = c.instance.enter(|| {
            let mut s = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(3)).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
            let mut got = String::new();
            let _ = s.read_to_string(&mut got);
            Some(got)
        });
        assert!(
            inside.as_deref().is_some_and(|g| g.contains(DENIED_BANNER)),
            "the denied port's listener on {to}, from inside: {inside:?}"
        );
    }
    eprintln!("reboot test: {:.1} s in all", whole.elapsed().as_secs_f64());
}
