//! The real daemon under test: its pin directory, its config file, the
//! process, and the CLI run against it.

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure};

use crate::*;

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

    /// The counters once each `(reason, delta)` of `want` has moved by at
    /// least `delta` since `before` (or 10 s have passed), and 100 ms more
    /// for any extra movement to show: a loaded machine may take longer
    /// than a fixed sleep to run frames already sent through the programs.
    pub fn counters_once_moved(
        &self,
        before: &HashMap<Reason, u64>,
        want: &[(Reason, u64)],
    ) -> HashMap<Reason, u64> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let now = self.counters().unwrap();
            let moved = want.iter().all(|(r, d)| now[r] - before[r] >= *d);
            if moved || Instant::now() >= deadline {
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
        thread::sleep(Duration::from_millis(100));
        self.counters().unwrap()
    }

    /// Waits until counter `reason` reaches `want` and checks it stays there
    /// (no more than `want`): asserts the exact count of packets.
    pub fn expect_counter(&self, reason: Reason, want: u64) {
        let from_zero = HashMap::from([(reason, 0)]);
        let got = self.counters_once_moved(&from_zero, &[(reason, want)])[&reason];
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

/// Mounts bpffs on /sys/fs/bpf if it is not there yet. One test thread at
/// a time: two that both found it missing would mount it twice, and pins
/// made under the first mount would vanish under the second.
pub fn ensure_bpffs() -> anyhow::Result<()> {
    static MOUNTING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = MOUNTING.lock().unwrap_or_else(|e| e.into_inner());
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
    /// `cmd` (the daemon, or what execs it) given this configuration, its
    /// state directory and socket, and the log settings the tests read.
    pub fn daemon_args<'a>(&self, cmd: &'a mut Command) -> &'a mut Command {
        cmd.arg("--config")
            .arg(self.path())
            .arg("--state-dir")
            .arg(self.state_dir())
            .arg("--socket")
            .arg(self.socket())
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
    }

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
    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

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
        let child = config
            .daemon_args(&mut ns.command(workspace_bin("portcullisd")?))
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log.reopen()?)
            .spawn()?;
        Ok(Daemon { child, log })
    }

    /// Starts the daemon as systemd would with socket activation: `fds`
    /// (already open, e.g. listening sockets) become its descriptors 3,
    /// 4, ... with `LISTEN_FDS`, `LISTEN_FDNAMES` and its own `LISTEN_PID`;
    /// waits until it is ready.
    pub fn start_with_fds(
        ns: &Netns,
        config: &ConfigFile,
        fds: &[(std::os::fd::RawFd, &str)],
    ) -> anyhow::Result<Self> {
        use std::os::unix::process::CommandExt as _;
        let log = tempfile::NamedTempFile::new()?;
        let names: Vec<&str> = fds.iter().map(|(_, n)| *n).collect();
        let raw: Vec<i32> = fds.iter().map(|(fd, _)| *fd).collect();
        // `LISTEN_PID` is the pid the daemon will have: the shell's, which
        // execs nsenter, which execs the daemon (no fork on the way).
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "LISTEN_PID=$$ exec \"$@\"", "sh", "nsenter"])
            .arg(format!("--net={}", ns.path().display()))
            .arg("--")
            .arg(workspace_bin("portcullisd")?);
        config
            .daemon_args(&mut cmd)
            .env("LISTEN_FDS", fds.len().to_string())
            .env("LISTEN_FDNAMES", names.join(":"))
            .stdout(Stdio::null())
            .stderr(log.reopen()?);
        // SAFETY: between fork and exec only async-signal-safe calls: dup2
        // and fcntl on descriptors this process owns.
        unsafe {
            cmd.pre_exec(move || {
                for (i, fd) in raw.iter().enumerate() {
                    let target = 3 + i as i32;
                    if libc::dup2(*fd, target) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    libc::fcntl(target, libc::F_SETFD, 0);
                }
                Ok(())
            });
        }
        let child = cmd.spawn()?;
        let mut d = Daemon { child, log };
        d.wait_ready()?;
        Ok(d)
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
