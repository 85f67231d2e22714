//! Test harness shared by the integration tests: throw-away network
//! namespaces joined by veth pairs, the real daemon running inside them, and
//! real TCP, UDP, ICMP and raw IP traffic across.
//!
//! Everything a test creates carries a name unique to the test process and
//! the test, so tests run in parallel, and everything is removed by `Drop`,
//! which also runs when a test panics.

use std::{
    collections::HashMap,
    fs,
    io::{self, Read as _, Write as _},
    net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

pub use portcullis_common::Reason;

pub mod container;
pub mod packet;

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

/// A bpffs directory for one test's pins, removed on drop.
pub struct PinDir {
    path: PathBuf,
}

impl PinDir {
    pub fn new() -> anyhow::Result<Self> {
        ensure_bpffs()?;
        static SWEEP: std::sync::Once = std::sync::Once::new();
        SWEEP.call_once(remove_stale_pins);
        Ok(PinDir {
            path: Path::new("/sys/fs/bpf").join(unique("portcullis-test")),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Verdict counters, summed over CPUs, by reason.
    pub fn counters(&self) -> anyhow::Result<HashMap<Reason, u64>> {
        Ok(portcullis::dataplane::read_counters(&self.path)?
            .into_iter()
            .map(|(r, c)| (r, c.packets))
            .collect())
    }

    pub fn counter(&self, reason: Reason) -> u64 {
        self.counters().expect("read counters")[&reason]
    }

    /// Waits until counter `reason` reaches `want` and checks it stays there
    /// (no more than `want`): asserts the exact count of packets.
    pub fn expect_counter(&self, reason: Reason, want: u64) {
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut got = self.counter(reason);
        while got < want && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
            got = self.counter(reason);
        }
        thread::sleep(Duration::from_millis(100));
        got = self.counter(reason);
        assert_eq!(
            got,
            want,
            "counter {} is {got}, expected {want}",
            reason.name()
        );
    }

    /// Link id and program id of the pinned XDP link of `ifname`.
    pub fn xdp_link(&self, ifname: &str) -> anyhow::Result<(u32, u32)> {
        let path = self.path.join("links").join(format!("xdp-{ifname}"));
        let link = aya::programs::links::PinnedLink::from_pin(&path)
            .with_context(|| format!("no pinned link at {}", path.display()))?;
        let info = aya::programs::links::FdLink::from(link).info()?;
        Ok((info.id(), info.program_id()))
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        // Unpinning the links detaches the programs.
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// Removes pin directories left by test processes that were killed before
/// their `Drop` ran (the name carries the pid; only dead pids are swept).
fn remove_stale_pins() {
    let Ok(entries) = fs::read_dir("/sys/fs/bpf") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("portcullis-test-") else {
            continue;
        };
        let pid = rest.split('-').next().unwrap_or_default();
        if !pid.is_empty() && !Path::new("/proc").join(pid).exists() {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// Mounts bpffs on /sys/fs/bpf if it is not there yet.
pub fn ensure_bpffs() -> anyhow::Result<()> {
    let mounted = fs::read_to_string("/proc/self/mounts")?
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.starts_with("bpf "));
    if !mounted {
        run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    }
    Ok(())
}

/// Path of a binary built from this workspace (`cargo build --bins`).
pub fn workspace_bin(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // Tests run from target/<profile>/deps/, binaries from target/<profile>/.
    let mut dir = exe.parent().context("unexpected executable location")?;
    if dir.ends_with("deps") {
        dir = dir.parent().context("unexpected test binary location")?;
    }
    let bin = dir.join(name);
    ensure!(
        bin.exists(),
        "{} is missing: build the binaries first (`cargo build --bins`; `cargo xtask test` does)",
        bin.display()
    );
    Ok(bin)
}

/// A configuration file in a temporary directory.
pub struct ConfigFile {
    dir: tempfile::TempDir,
}

/// Data-path variants forced on every test daemon from the environment:
/// `cargo xtask test` runs the ingress, stateful and attack tests once more
/// with the single-buffer XDP program and the clsact egress path, as on
/// kernels before 5.18 and 6.6.
pub const FORCED_VARIANTS: [(&str, &str); 2] = [
    ("PORTCULLIS_TEST_XDP_PROGRAM", "xdp_program"),
    ("PORTCULLIS_TEST_TC_ATTACH", "tc_attach"),
];

fn with_forced_variants(text: &str) -> String {
    let mut forced = String::new();
    for (var, key) in FORCED_VARIANTS {
        if let Ok(value) = std::env::var(var)
            && !text.contains(&format!("{key} ="))
        {
            forced.push_str(&format!("{key} = \"{value}\"\n"));
        }
    }
    forced + text
}

impl ConfigFile {
    pub fn new(text: &str) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        fs::write(
            dir.path().join("portcullis.toml"),
            with_forced_variants(text),
        )?;
        // Unprivileged test clients must reach the API socket in here.
        use std::os::unix::fs::PermissionsExt as _;
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))?;
        Ok(ConfigFile { dir })
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().join("portcullis.toml")
    }

    /// The daemon's state directory for this configuration: restarts with
    /// the same file find the same live rule set.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The API socket of the daemon started on this configuration.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("api.sock")
    }

    /// Replaces the file's contents (a reload applies them).
    pub fn rewrite(&self, text: &str) -> anyhow::Result<()> {
        fs::write(self.path(), with_forced_variants(text))?;
        Ok(())
    }
}

/// The CLI against the daemon started on `config`: `portcullis --socket
/// <its socket> ARGS`, as root.
pub fn cli(config: &ConfigFile, args: &[&str]) -> std::process::Output {
    Command::new(workspace_bin("portcullis").expect("portcullis binary"))
        .arg("--socket")
        .arg(config.socket())
        .args(args)
        .output()
        .expect("run portcullis")
}

/// `portcullisd --config <config> --detach` in `ns`.
pub fn detach(ns: &Netns, config: &ConfigFile) -> std::process::Output {
    ns.command(workspace_bin("portcullisd").expect("portcullisd binary"))
        .arg("--config")
        .arg(config.path())
        .arg("--detach")
        .output()
        .expect("run portcullisd --detach")
}

/// A `portcullisd` running in a namespace. Killed on drop; its pins stay
/// (they belong to the [`PinDir`]).
pub struct Daemon {
    child: Child,
    log: tempfile::NamedTempFile,
}

impl Daemon {
    /// Starts the daemon on `config` in `ns` and waits until it reports
    /// that it enforces.
    pub fn start(ns: &Netns, config: &ConfigFile) -> anyhow::Result<Self> {
        Self::start_with_env(ns, config, &[])
    }

    /// [`Daemon::start`] with extra environment variables (`NOTIFY_SOCKET`).
    pub fn start_with_env(
        ns: &Netns,
        config: &ConfigFile,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let mut d = Self::spawn(ns, config, env)?;
        d.wait_ready()?;
        Ok(d)
    }

    /// Starts the daemon without waiting for anything.
    pub fn spawn(ns: &Netns, config: &ConfigFile, env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let log = tempfile::NamedTempFile::new()?;
        let child = ns
            .command(workspace_bin("portcullisd")?)
            .arg("--config")
            .arg(config.path())
            .arg("--state-dir")
            .arg(config.state_dir())
            .arg("--socket")
            .arg(config.socket())
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log.reopen()?)
            .spawn()?;
        Ok(Daemon { child, log })
    }

    /// Waits (up to 20 s) for a daemon that must fail to start to exit;
    /// its exit status and log.
    pub fn expect_exit(mut self) -> anyhow::Result<(std::process::ExitStatus, String)> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok((status, self.log()));
            }
            ensure!(
                Instant::now() < deadline,
                "portcullisd still runs after 20 s:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let log = self.log();
            if log.contains(" ready") {
                // A forced variant must really be the one running.
                if let Ok(forced) = std::env::var("PORTCULLIS_TEST_XDP_PROGRAM") {
                    let program = match forced.as_str() {
                        "single-buffer" => portcullis_common::programs::INGRESS_SINGLE,
                        _ => portcullis_common::programs::INGRESS,
                    };
                    ensure!(
                        log.contains(&format!("program=\"{program}\"")),
                        "xdp_program = {forced} forced, but not loaded:\n{log}"
                    );
                }
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("portcullisd exited ({status}) before it was ready:\n{log}");
            }
            if Instant::now() > deadline {
                bail!("portcullisd not ready after 20 s:\n{log}");
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// Sends SIGHUP (reload) and waits for the daemon to log the outcome.
    pub fn reload(&self) -> anyhow::Result<String> {
        let before = self.log().len();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGHUP,
        )?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = self.log();
            let new = &log[before.min(log.len())..];
            if new.contains("reloaded") || new.contains("reload refused") {
                return Ok(new.to_string());
            }
            ensure!(
                Instant::now() < deadline,
                "no reload outcome logged:\n{log}"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, as a crash would, keeping the value (for a restart loop).
    pub fn kill_in_place(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGKILL, as a crash would; returns the log once the process is gone.
    pub fn kill(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.log()
    }

    /// SIGTERM; returns the exit status once the daemon has exited.
    pub fn terminate(mut self) -> anyhow::Result<std::process::ExitStatus> {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            ensure!(Instant::now() < deadline, "portcullisd ignored SIGTERM");
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A config for the daemon on the host side of a [`Pair`] with `pins`.
pub fn config(pins: &PinDir, ssh: bool, rules_toml: &str) -> anyhow::Result<ConfigFile> {
    ConfigFile::new(&config_text(
        pins,
        &format!("[ssh]\nallow = {ssh}\n{rules_toml}"),
    ))
}

/// The text of a config for interface `pc0` with `pins`, plus `rest`.
/// The SSH exemption is off unless `rest` configures it: the daemon's
/// default is on, but these tests were written against a host that admits
/// nothing it is not told to (a test of the default writes its own file).
pub fn config_text(pins: &PinDir, rest: &str) -> String {
    let says_ssh = rest.lines().map(str::trim_start).any(|l| {
        l.starts_with("[ssh]")
            || l.starts_with("[ssh.")
            || l.starts_with("ssh ")
            || l.starts_with("ssh=")
            || l.starts_with("ssh.")
    });
    let ssh_off = if says_ssh {
        ""
    } else {
        "\n[ssh]\nallow = false\n"
    };
    format!(
        "interfaces = [\"{HOST_IFACE}\"]\npin_dir = \"{}\"\n{rest}{ssh_off}",
        pins.path().display()
    )
}

pub fn sock(addr: &str, port: u16) -> SocketAddr {
    SocketAddr::new(addr.parse::<IpAddr>().expect("address"), port)
}

/// A TCP listener that accepts and holds connections without sending.
pub struct TcpServer {
    pub addr: SocketAddr,
}

impl TcpServer {
    pub fn start(ns: &Netns, addr: SocketAddr) -> anyhow::Result<Self> {
        let listener = ns.enter(|| TcpListener::bind(addr))?;
        thread::spawn(move || {
            let mut held = Vec::new();
            for stream in listener.incoming().flatten() {
                held.push(stream);
            }
        });
        Ok(TcpServer { addr })
    }
}

/// How long a probe waits for a handshake: less than the first SYN
/// retransmission (1 s), so a dropped probe sends exactly one SYN.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(700);

/// Connects from `ns` and closes with a reset: exactly three packets
/// (SYN, ACK, RST) reach the server when the connection succeeds, one (SYN)
/// when it is dropped (the attempt ends before the SYN is retransmitted).
pub fn tcp_probe(ns: &Netns, to: SocketAddr) -> io::Result<()> {
    let stream = ns.enter(|| TcpStream::connect_timeout(&to, PROBE_TIMEOUT))?;
    let sock = Socket::from(stream);
    sock.set_linger(Some(Duration::ZERO))?;
    drop(sock);
    Ok(())
}

/// A control probe, before any filter runs: retried for up to 5 s, since an
/// unfiltered path can be slow to answer its first connection on a loaded
/// machine (neighbour resolution), and that is not what a test checks.
pub fn tcp_probe_control(ns: &Netns, to: SocketAddr) -> io::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match tcp_probe(ns, to) {
            Err(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100));
            }
            result => return result,
        }
    }
}

/// A TCP connection that stays open, for long-lived flows.
pub fn tcp_connect(ns: &Netns, to: SocketAddr) -> io::Result<TcpStream> {
    let s = ns.enter(|| TcpStream::connect_timeout(&to, Duration::from_secs(3)))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    Ok(s)
}

/// An echo server: echoes each TCP connection's bytes back.
pub fn tcp_echo_server(ns: &Netns, addr: SocketAddr) -> anyhow::Result<()> {
    let listener = ns.enter(|| TcpListener::bind(addr))?;
    thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 || stream.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = stream.shutdown(Shutdown::Both);
            });
        }
    });
    Ok(())
}

/// Sends a line on `s` and checks it comes back.
pub fn echo_roundtrip(s: &mut TcpStream, line: &[u8]) -> io::Result<()> {
    s.write_all(line)?;
    let mut buf = vec![0u8; line.len()];
    s.read_exact(&mut buf)?;
    if buf != line {
        return Err(io::Error::other("echo mismatch"));
    }
    Ok(())
}

/// Timeout for each read or write of a bulk transfer: a stalled transfer
/// fails the test instead of hanging it.
pub const BULK_TIMEOUT: Duration = Duration::from_secs(10);

fn bulk(stream: &TcpStream) -> io::Result<()> {
    stream.set_read_timeout(Some(BULK_TIMEOUT))?;
    stream.set_write_timeout(Some(BULK_TIMEOUT))
}

/// Sends `len` bytes on `stream`, then closes its sending side.
pub fn send_bytes(stream: &mut TcpStream, len: usize) -> io::Result<()> {
    bulk(stream)?;
    let chunk = vec![0x5a_u8; 64 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(chunk.len());
        stream.write_all(&chunk[..n])?;
        left -= n;
    }
    stream.shutdown(Shutdown::Write)
}

/// Reads `stream` to its end; the number of bytes.
pub fn receive_all(stream: &mut TcpStream) -> io::Result<usize> {
    bulk(stream)?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0;
    loop {
        match stream.read(&mut buf)? {
            0 => return Ok(total),
            n => total += n,
        }
    }
}

/// Serves one connection on `addr` in `ns`: sends `len` bytes to it.
pub fn tcp_source_server(ns: &Netns, addr: SocketAddr, len: usize) -> anyhow::Result<()> {
    let listener = ns.enter(|| TcpListener::bind(addr))?;
    thread::spawn(move || {
        if let Ok((mut s, _)) = listener.accept() {
            let _ = send_bytes(&mut s, len);
        }
    });
    Ok(())
}

/// Serves one connection on `addr` in `ns`: sends `chunks` chunks of 64 KiB,
/// one every `interval`, so the transfer lasts a known time.
pub fn tcp_paced_source_server(
    ns: &Netns,
    addr: SocketAddr,
    chunks: usize,
    interval: Duration,
) -> anyhow::Result<()> {
    let listener = ns.enter(|| TcpListener::bind(addr))?;
    thread::spawn(move || {
        if let Ok((mut s, _)) = listener.accept() {
            let _ = bulk(&s);
            let chunk = vec![0xa5_u8; 64 * 1024];
            for _ in 0..chunks {
                if s.write_all(&chunk).is_err() {
                    return;
                }
                thread::sleep(interval);
            }
            let _ = s.shutdown(Shutdown::Write);
        }
    });
    Ok(())
}

/// Serves one connection on `addr` in `ns`: counts what it receives.
pub fn tcp_sink_server(
    ns: &Netns,
    addr: SocketAddr,
) -> anyhow::Result<std::sync::mpsc::Receiver<io::Result<usize>>> {
    let listener = ns.enter(|| TcpListener::bind(addr))?;
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let result = listener.accept().and_then(|(mut s, _)| receive_all(&mut s));
        let _ = tx.send(result);
    });
    Ok(rx)
}

/// A UDP echo server in `ns`.
pub fn udp_echo_server(ns: &Netns, addr: SocketAddr) -> anyhow::Result<()> {
    let sock = ns.enter(|| UdpSocket::bind(addr))?;
    thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            let _ = sock.send_to(&buf[..n], from);
        }
    });
    Ok(())
}

/// A UDP socket bound in `ns`, with a short receive timeout.
pub fn udp_bind(ns: &Netns, addr: SocketAddr) -> anyhow::Result<UdpSocket> {
    let s = ns.enter(|| UdpSocket::bind(addr))?;
    s.set_read_timeout(Some(Duration::from_millis(700)))?;
    Ok(s)
}

/// Sends one datagram from `ns` to `to`.
pub fn udp_send(ns: &Netns, to: SocketAddr, payload: &[u8]) -> anyhow::Result<()> {
    let any: SocketAddr = if to.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let s = ns.enter(|| UdpSocket::bind(any))?;
    s.send_to(payload, to)?;
    Ok(())
}

/// Whether `sock` receives a datagram within its timeout.
pub fn udp_received(sock: &UdpSocket) -> bool {
    let mut buf = [0u8; 2048];
    sock.recv_from(&mut buf).is_ok()
}

/// A raw IP socket for `protocol` (GRE = 47, SCTP = 132, ...) in `ns`.
pub fn raw_socket(ns: &Netns, v6: bool, protocol: i32) -> anyhow::Result<Socket> {
    let domain = if v6 { Domain::IPV6 } else { Domain::IPV4 };
    let s = ns.enter(|| Socket::new(domain, Type::RAW, Some(Protocol::from(protocol))))?;
    s.set_read_timeout(Some(Duration::from_millis(700)))?;
    Ok(s)
}

/// Sends `payload` as one IP packet of `protocol` from `ns` to `to`.
pub fn raw_send(ns: &Netns, to: IpAddr, protocol: i32, payload: &[u8]) -> anyhow::Result<()> {
    let s = raw_socket(ns, to.is_ipv6(), protocol)?;
    s.send_to(payload, &SockAddr::from(SocketAddr::new(to, 0)))?;
    Ok(())
}

/// Whether a raw socket receives a packet within its timeout.
pub fn raw_received(sock: &Socket) -> bool {
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 2048];
    sock.recv(&mut buf).is_ok()
}

/// One ICMP echo from `ns` to `addr`; true when the reply came back.
pub fn ping(ns: &Netns, addr: &str) -> bool {
    ns.command("ping")
        .args(["-c", "1", "-W", "1", addr])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// A real sshd listening on port 22 in a namespace, accepting one key for root.
pub struct Sshd {
    child: Child,
    dir: tempfile::TempDir,
}

impl Sshd {
    pub fn start(ns: &Netns) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let d = dir.path();
        for key in ["host_key", "client_key"] {
            run(Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(d.join(key)))?;
        }
        fs::copy(d.join("client_key.pub"), d.join("authorized_keys"))?;
        fs::create_dir_all("/run/sshd")?;
        let config = format!(
            "Port 22\nListenAddress 0.0.0.0\nListenAddress ::\nHostKey {0}/host_key\n\
             AuthorizedKeysFile {0}/authorized_keys\nPermitRootLogin prohibit-password\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n\
             StrictModes no\nPidFile none\n",
            d.display()
        );
        fs::write(d.join("sshd_config"), config)?;
        let child = ns
            .command("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(d.join("sshd_config"))
            .stdout(Stdio::null())
            .stderr(fs::File::create(d.join("sshd.log"))?)
            .spawn()?;
        let sshd = Sshd { child, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ns.ip(&["-br", "addr"]).is_ok_and(|_| {
            run(ns.command("ss").args(["-Hltn", "sport", "=", ":22"]))
                .is_ok_and(|o| !o.trim().is_empty())
        }) {
            ensure!(Instant::now() < deadline, "sshd did not start listening");
            thread::sleep(Duration::from_millis(50));
        }
        Ok(sshd)
    }

    /// An `ssh` command from `ns` to `addr` with the accepted key.
    pub fn client(&self, ns: &Netns, addr: &str) -> Command {
        ssh_command(
            ns,
            &self.dir.path().join("client_key"),
            &format!("root@{addr}"),
        )
    }
}

/// `ssh` from `ns` to `target` (`user@addr`) with only the key at `key`,
/// never prompting, trusting any host key, giving up after 3 s.
pub fn ssh_command(ns: &Netns, key: &Path, target: &str) -> Command {
    let mut cmd = ns.command("ssh");
    cmd.arg("-i")
        .arg(key)
        .args([
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "ConnectTimeout=3",
            "-o",
            "LogLevel=ERROR",
        ])
        .arg(target);
    cmd
}

/// A UDP sender that keeps hitting `to` from `from` (one datagram every
/// `gap`, for at most two minutes) and a sink that counts what arrives, for
/// tests where nothing may arrive while something else happens.
pub struct Flood {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    received: Arc<AtomicU64>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Flood {
    pub fn start(
        from: &Netns,
        sink: UdpSocket,
        to: SocketAddr,
        gap: Duration,
    ) -> anyhow::Result<Flood> {
        let stop = Arc::new(AtomicBool::new(false));
        let (sent, received) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let socket =
            from.enter(|| UdpSocket::bind(if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }))?;
        sink.set_read_timeout(Some(Duration::from_millis(100)))?;
        let sender = {
            let (stop, sent) = (stop.clone(), sent.clone());
            thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(120);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    let _ = socket.send_to(b"denied", to);
                    sent.fetch_add(1, Ordering::Relaxed);
                    thread::sleep(gap);
                }
            })
        };
        let counter = {
            let (stop, received) = (stop.clone(), received.clone());
            thread::spawn(move || {
                let mut buf = [0u8; 64];
                while !stop.load(Ordering::Relaxed) {
                    if sink.recv(&mut buf).is_ok() {
                        received.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        };
        Ok(Flood {
            stop,
            sent,
            received,
            threads: vec![sender, counter],
        })
    }

    /// Stops both; returns (sent, received).
    pub fn stop(mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        (
            self.sent.load(Ordering::Relaxed),
            self.received.load(Ordering::Relaxed),
        )
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An interactive ssh session running `cat` on the other side.
pub struct SshSession {
    child: Child,
    stdin: std::process::ChildStdin,
    stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl SshSession {
    pub fn open(sshd: &Sshd, ns: &Netns, addr: &str) -> anyhow::Result<Self> {
        let mut child = sshd
            .client(ns, addr)
            .arg("cat")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let stdin = child.stdin.take().context("ssh stdin")?;
        let stdout = std::io::BufReader::new(child.stdout.take().context("ssh stdout")?);
        let mut s = SshSession {
            child,
            stdin,
            stdout,
        };
        s.roundtrip("hello")?;
        Ok(s)
    }

    /// Sends a line and waits (at most 5 s) for it to come back.
    pub fn roundtrip(&mut self, line: &str) -> anyhow::Result<()> {
        use std::io::BufRead as _;
        writeln!(self.stdin, "{line}")?;
        self.stdin.flush()?;
        let (tx, rx) = std::sync::mpsc::channel();
        let mut got = String::new();
        thread::scope(|s| {
            s.spawn(|| {
                let r = self.stdout.read_line(&mut got);
                let _ = tx.send(r.map(|_| ()));
            });
            match rx.recv_timeout(Duration::from_secs(5)) {
                Ok(r) => r.map_err(anyhow::Error::from),
                Err(_) => {
                    // Unblock the reader before leaving the scope.
                    let _ = self.child.kill();
                    Err(anyhow::anyhow!("no echo within 5 s"))
                }
            }
        })?;
        ensure!(got.trim_end() == line, "ssh echoed {got:?} for {line:?}");
        Ok(())
    }
}

impl Drop for SshSession {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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
