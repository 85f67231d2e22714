//! A real systemd host for the tests: the Debian root file system that
//! `cargo xtask setup` builds, booted with systemd-nspawn (real systemd,
//! D-Bus, sshd and, when seeded, cloud-init).
//!
//! Every container is a fresh instance: the shared root is the lower layer
//! of an overlay whose upper layer is this container's own, so files can be
//! put in place before boot ([`Boot::file`]) and nothing leaks into the next
//! test. A container can be rebooted ([`Container::shut_down`], then
//! [`Container::boot`]) on that same upper layer: what it wrote persists.
//! The container runs in a network namespace the test created (`instance`),
//! joined by a veth pair to a second one (`client`) that plays the outside
//! world. Dropping a [`Container`] kills it (its PID 1, so the whole PID
//! namespace), unmounts the overlay and deletes both namespaces, on test
//! failure too.

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};

use crate::{Netns, addresses, run, unique, veth, workspace_bin};

/// Keep in step with `xtask/src/rootfs.rs`.
const RECIPE: &str = "bookworm-v2";

/// The instance's interface and addresses, and the client's.
pub const INSTANCE_IFACE: &str = "eth0";
pub const CLIENT_IFACE: &str = "ct0";
pub const INSTANCE_V4: &str = "10.200.60.1";
pub const CLIENT_V4: &str = "10.200.60.2";
pub const INSTANCE_V6: &str = "fd00:200:60::1";
pub const CLIENT_V6: &str = "fd00:200:60::2";
/// The instance interface's MAC when the container addresses itself
/// ([`Boot::self_addressed`]): fixed, so the client can know it in advance.
pub const INSTANCE_MAC: &str = "02:00:0a:c8:3c:01";

/// The cached root file system, or an error that says how to get it.
pub fn rootfs() -> anyhow::Result<PathBuf> {
    let home = std::env::var("HOME").context("HOME not set")?;
    let root = Path::new(&home)
        .join(".cache/portcullis/rootfs")
        .join(RECIPE);
    ensure!(
        root.join("etc/portcullis-rootfs").exists(),
        "{} is missing: run `cargo xtask setup` (it builds the container root file system)",
        root.display()
    );
    Ok(root)
}

/// What to put into a container before it boots.
pub struct Boot {
    /// Whether the container may call bpf(2) (nspawn's seccomp filter
    /// refuses it unless told otherwise).
    bpf: bool,
    files: Vec<(PathBuf, Vec<u8>, u32)>,
    links: Vec<(PathBuf, PathBuf)>,
    binds: Vec<(PathBuf, PathBuf)>,
    self_addressed: bool,
}

impl Default for Boot {
    fn default() -> Self {
        Self::new()
    }
}

impl Boot {
    pub fn new() -> Boot {
        Boot {
            bpf: true,
            files: Vec::new(),
            links: Vec::new(),
            binds: Vec::new(),
            self_addressed: false,
        }
    }

    /// A file at `path` inside the container.
    pub fn file(mut self, path: &str, contents: impl Into<Vec<u8>>, mode: u32) -> Boot {
        self.files.push((path.into(), contents.into(), mode));
        self
    }

    /// A host whose kernel refuses bpf(2) to the container: the data path
    /// cannot load (as on a kernel that is too old, or a verifier refusal).
    pub fn without_bpf(mut self) -> Boot {
        self.bpf = false;
        self
    }

    /// A symbolic link at `path` inside the container.
    pub fn symlink(mut self, path: &str, target: &str) -> Boot {
        self.links.push((path.into(), target.into()));
        self
    }

    /// A host path visible read-only at `path` inside the container.
    pub fn bind_ro(mut self, host: &Path, path: &str) -> Boot {
        self.binds.push((host.to_owned(), path.into()));
        self
    }

    /// Portcullis installed from this workspace's build (binaries and
    /// units, the service enabled), configured with `config`. The package
    /// test installs the Debian package instead.
    pub fn portcullis(self, config: &str) -> anyhow::Result<Boot> {
        let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd");
        let mut boot = self
            .file(
                "/usr/bin/portcullisd",
                std::fs::read(workspace_bin("portcullisd")?)?,
                0o755,
            )
            .file(
                "/usr/bin/portcullis",
                std::fs::read(workspace_bin("portcullis")?)?,
                0o755,
            )
            .file("/etc/portcullis/portcullis.toml", config, 0o644)
            .symlink(
                "/etc/systemd/system/multi-user.target.wants/portcullis.service",
                "/etc/systemd/system/portcullis.service",
            );
        for unit in [
            "portcullis.service",
            "run-bpffs.mount",
            "portcullis-dns.socket",
        ] {
            boot = boot.file(
                &format!("/etc/systemd/system/{unit}"),
                std::fs::read(units.join(unit))?,
                0o644,
            );
        }
        // The package's examples (the DNS forwarder's drop-ins).
        for example in ["portcullis-dns.conf", "resolved-portcullis.conf"] {
            boot = boot.file(
                &format!("/usr/share/doc/portcullis/examples/dns/{example}"),
                std::fs::read(units.join("dns").join(example))?,
                0o644,
            );
        }
        Ok(boot)
    }

    /// The container configures its own addresses, as a provider's image
    /// does: systemd-networkd enabled (with its wait-online service) and a
    /// `.network` file for [`INSTANCE_IFACE`] giving [`INSTANCE_V4`] and
    /// [`INSTANCE_V6`]. The harness leaves that interface down and without
    /// addresses before each boot, with the fixed MAC [`INSTANCE_MAC`], and
    /// gives the client permanent neighbour entries for the instance's
    /// addresses, so a probe leaves at once (no address resolution to wait
    /// for) and is answered from the moment the container configures itself.
    pub fn self_addressed(mut self) -> Boot {
        self.self_addressed = true;
        self.file(
            "/etc/systemd/network/10-portcullis-test.network",
            format!(
                "[Match]\nName={INSTANCE_IFACE}\n\n[Network]\nAddress={INSTANCE_V4}/24\n\
                 Address={INSTANCE_V6}/64\nIPv6AcceptRA=no\n"
            ),
            0o644,
        )
        .symlink(
            "/etc/systemd/system/multi-user.target.wants/systemd-networkd.service",
            "/lib/systemd/system/systemd-networkd.service",
        )
        .symlink(
            "/etc/systemd/system/sockets.target.wants/systemd-networkd.socket",
            "/lib/systemd/system/systemd-networkd.socket",
        )
        .symlink(
            "/etc/systemd/system/network-online.target.wants/systemd-networkd-wait-online.service",
            "/lib/systemd/system/systemd-networkd-wait-online.service",
        )
        .symlink(
            "/etc/systemd/system/dbus-org.freedesktop.network1.service",
            "/lib/systemd/system/systemd-networkd.service",
        )
    }

    /// Boots the container and waits until systemd has finished starting
    /// (`running` or `degraded`), or `timeout`.
    pub fn start(self, timeout: Duration) -> anyhow::Result<Container> {
        let mut container = self.prepare()?;
        container.boot(timeout)?;
        Ok(container)
    }

    /// Everything up to the boot: the namespaces and their link, the
    /// overlay and the files in it, the cgroups. [`Container::boot`] boots
    /// it (and can again after [`Container::shut_down`]).
    pub fn prepare(self) -> anyhow::Result<Container> {
        let root = rootfs()?;
        sweep_stale_cgroups();
        let dir = tempfile::Builder::new()
            .prefix("portcullis-container-")
            .tempdir_in("/var/tmp")?;
        let (upper, work, merged) = (
            dir.path().join("upper"),
            dir.path().join("work"),
            dir.path().join("merged"),
        );
        for d in [&upper, &work, &merged] {
            std::fs::create_dir(d)?;
        }
        let instance = Netns::new("inst")?;
        let client = Netns::new("cli")?;
        plug(&instance, &client, self.self_addressed)?;
        run(Command::new("mount")
            .args([
                "-t",
                "overlay",
                "overlay",
                "-o",
                &format!(
                    "lowerdir={},upperdir={},workdir={}",
                    root.display(),
                    upper.display(),
                    work.display()
                ),
            ])
            .arg(&merged))?;
        let container = Container {
            name: unique("pct"),
            child: None,
            leader: 0,
            merged,
            _dir: dir,
            instance,
            client,
            bpf: self.bpf,
            binds: self.binds.clone(),
            self_addressed: self.self_addressed,
            boot_started: None,
        };
        for (path, contents, mode) in &self.files {
            let at = container.host_path(path);
            std::fs::create_dir_all(at.parent().context("file at /")?)?;
            std::fs::write(&at, contents)?;
            std::fs::set_permissions(&at, std::fs::Permissions::from_mode(*mode))?;
        }
        for (path, target) in &self.links {
            let at = container.host_path(path);
            std::fs::create_dir_all(at.parent().context("link at /")?)?;
            let _ = std::fs::remove_file(&at);
            std::os::unix::fs::symlink(target, &at)?;
        }
        Ok(container)
    }
}

/// Joins `instance` and `client` with a new veth pair, both ends up and
/// addressed; or, when the container addresses itself, its end down, without
/// addresses and with [`INSTANCE_MAC`], and the client's neighbour entries
/// for the instance's addresses permanent.
fn plug(instance: &Netns, client: &Netns, self_addressed: bool) -> anyhow::Result<()> {
    veth(instance, INSTANCE_IFACE, client, CLIENT_IFACE)?;
    addresses(
        client,
        CLIENT_IFACE,
        &format!("{CLIENT_V4}/24"),
        &format!("{CLIENT_V6}/64"),
    )?;
    if !self_addressed {
        return addresses(
            instance,
            INSTANCE_IFACE,
            &format!("{INSTANCE_V4}/24"),
            &format!("{INSTANCE_V6}/64"),
        );
    }
    instance.ip(&["link", "set", INSTANCE_IFACE, "down"])?;
    instance.ip(&["link", "set", INSTANCE_IFACE, "address", INSTANCE_MAC])?;
    for addr in [INSTANCE_V4, INSTANCE_V6] {
        client.ip(&[
            "neigh",
            "replace",
            addr,
            "lladdr",
            INSTANCE_MAC,
            "dev",
            CLIENT_IFACE,
            "nud",
            "permanent",
        ])?;
    }
    Ok(())
}

/// `CLOCK_MONOTONIC` now.
pub fn monotonic_now() -> Duration {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(Duration::from)
        .unwrap_or_default()
}

/// The container's PID 1 (systemd), a descendant of `nspawn`.
fn wait_for_leader(nspawn: i32, timeout: Duration) -> anyhow::Result<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(pid) = descendants(nspawn).into_iter().find(|&pid| {
            std::fs::read_link(format!("/proc/{pid}/exe"))
                .is_ok_and(|exe| exe.ends_with("lib/systemd/systemd"))
        }) {
            return Ok(pid);
        }
        ensure!(
            Instant::now() < deadline,
            "systemd-nspawn (pid {nspawn}) started no systemd within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn descendants(root: i32) -> Vec<i32> {
    let mut parents = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // The parent pid is the second field after the parenthesised name.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<i32>().ok());
        if let Some(ppid) = ppid {
            parents.push((pid, ppid));
        }
    }
    let mut found = vec![root];
    let mut i = 0;
    while i < found.len() {
        let p = found[i];
        found.extend(parents.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    found.remove(0);
    found
}

/// A booted container.
pub struct Container {
    name: String,
    child: Option<Child>,
    leader: i32,
    merged: PathBuf,
    _dir: tempfile::TempDir,
    /// The network namespace the container runs in.
    pub instance: Netns,
    /// The outside world, joined to `instance` by a veth pair.
    pub client: Netns,
    bpf: bool,
    binds: Vec<(PathBuf, PathBuf)>,
    self_addressed: bool,
    boot_started: Option<(Instant, Duration)>,
}

impl Container {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Boots the prepared (or shut down) container on its overlay, so what
    /// an earlier boot wrote is still there, and waits until systemd has
    /// finished starting (`running` or `degraded`), or `timeout`.
    pub fn boot(&mut self, timeout: Duration) -> anyhow::Result<()> {
        ensure!(self.child.is_none(), "container {} is running", self.name);
        // The container's cgroups: nspawn (--keep-unit) nests them under its
        // own, so each container gets one of its own; shared ones would mix
        // units (and their cgroup BPF programs) of concurrent containers.
        // Made afresh for every boot: an earlier boot's are gone or empty.
        for dir in self.cgroups() {
            remove_cgroup(&dir);
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create cgroup {}", dir.display()))?;
        }
        let join: Vec<String> = self
            .cgroups()
            .iter()
            .map(|d| format!("echo $$ > {}/cgroup.procs && ", d.display()))
            .collect();
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!("{}exec systemd-nspawn \"$@\"", join.concat()))
            .arg("sh");
        cmd.args([
            "--register=no",
            "--keep-unit",
            "-q",
            "-b",
            "--console=passive",
        ])
        .arg(format!("--machine={}", self.name))
        .arg("-D")
        .arg(&self.merged)
        .arg(format!(
            "--network-namespace-path={}",
            self.instance.path().display()
        ))
        .arg("--capability=CAP_BPF,CAP_PERFMON,CAP_NET_ADMIN,CAP_SYS_RESOURCE");
        if self.bpf {
            cmd.arg("--system-call-filter=bpf perf_event_open");
        }
        for (host, path) in &self.binds {
            cmd.arg(format!("--bind-ro={}:{}", host.display(), path.display()));
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self._dir.path().join("console.log"))?;
        self.boot_started = Some((Instant::now(), monotonic_now()));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting systemd-nspawn (package systemd-container)")?;
        let nspawn = child.id() as i32;
        self.child = Some(child);
        self.leader = wait_for_leader(nspawn, Duration::from_secs(20))?;
        self.wait_booted(timeout)
    }

    /// When the current (or last) boot started: the moment systemd-nspawn
    /// was started, as an `Instant` and as a `CLOCK_MONOTONIC` reading, the
    /// clock of the journal's `__MONOTONIC_TIMESTAMP` and of systemd's
    /// `*TimestampMonotonic` properties (the container shares the host's).
    pub fn boot_started(&self) -> Option<(Instant, Duration)> {
        self.boot_started
    }

    /// Reboots the container from inside (`systemctl reboot`: a clean
    /// shutdown of every unit) and waits, up to `timeout`, for its systemd
    /// to end; systemd-nspawn then exits (status 133, "reboot"), and the
    /// container stays down until [`Container::boot`]. The overlay (so
    /// `/etc` and `/var/lib`) stays; what lived in memory (`/run`, the
    /// bpffs and so its pins and links) is gone.
    pub fn shut_down(&mut self, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let Some(mut child) = self.child.take() else {
            bail!("container {} is not running", self.name);
        };
        // systemctl may be killed by the shutdown before it reports.
        let _ = self.systemctl(&["reboot"]);
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                self.child = Some(child);
                bail!(
                    "container {} did not shut down within {timeout:?}; console:\n{}",
                    self.name,
                    self.console()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        self.leader = 0;
        Ok(status)
    }

    /// Replaces the link between the instance and the client with a new
    /// veth pair, as [`Boot::prepare`] made it: a rebooted machine's NIC
    /// comes up bare (no addresses, no programs attached).
    pub fn replug(&self) -> anyhow::Result<()> {
        ensure!(
            self.child.is_none(),
            "container {} is running: shut it down first",
            self.name
        );
        self.instance.ip(&["link", "del", INSTANCE_IFACE])?;
        plug(&self.instance, &self.client, self.self_addressed)
    }

    /// The cgroups the container runs under (unified and, on a hybrid
    /// host, systemd's named v1 hierarchy).
    fn cgroups(&self) -> Vec<PathBuf> {
        cgroup_roots()
            .into_iter()
            .map(|root| root.join(format!("portcullis-{}", self.name)))
            .collect()
    }

    /// Where a path inside the container is, seen from the host.
    pub fn host_path(&self, path: &Path) -> PathBuf {
        self.merged.join(path.strip_prefix("/").unwrap_or(path))
    }

    /// A command run inside the container (all its namespaces).
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg("-t")
            .arg(self.leader.to_string())
            .args(["-a", "--"])
            .arg(program);
        cmd
    }

    /// Runs `program args` inside the container; its output, whatever the
    /// exit status.
    pub fn exec(&self, program: &str, args: &[&str]) -> anyhow::Result<Output> {
        self.command(program)
            .args(args)
            .output()
            .with_context(|| format!("cannot run {program} in container {}", self.name))
    }

    /// Like [`Container::exec`], failing with the output unless it succeeds.
    pub fn check(&self, program: &str, args: &[&str]) -> anyhow::Result<String> {
        run(self.command(program).args(args))
    }

    /// `systemctl ARGS` inside the container.
    pub fn systemctl(&self, args: &[&str]) -> anyhow::Result<Output> {
        self.exec("systemctl", args)
    }

    /// The system state, as `systemctl is-system-running` prints it.
    pub fn system_state(&self) -> String {
        self.systemctl(&["is-system-running"])
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    }

    fn wait_booted(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let state = self.system_state();
            if state == "running" || state == "degraded" {
                return Ok(());
            }
            if let Some(status) = self.child_exited() {
                bail!(
                    "the container exited ({status}) while booting:\n{}",
                    self.console()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "the container did not finish booting within {timeout:?} (state {state:?}); jobs:\n{}\nconsole:\n{}",
                    self.systemctl(&["list-jobs", "--no-pager"])
                        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                        .unwrap_or_default(),
                    self.console()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn child_exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    /// What systemd-nspawn and the container's console printed.
    pub fn console(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("console.log")).unwrap_or_default()
    }

    /// The journal of `unit` inside the container (for failure messages).
    pub fn journal(&self, unit: &str) -> String {
        self.exec("journalctl", &["--no-pager", "-o", "cat", "-u", unit])
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    /// Polls `f` every 100 ms until it returns `Some`, or fails after
    /// `timeout` with `what`.
    pub fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut() -> Option<T>,
    ) -> anyhow::Result<T> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = f() {
                return Ok(v);
            }
            ensure!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        // Killing PID 1 of the container's PID namespace kills every process
        // in it; systemd-nspawn then exits.
        if self.leader > 0 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.leader),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        if let Some(mut child) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        for _ in 0..50 {
            let out = Command::new("umount").arg(&self.merged).output();
            if out.is_ok_and(|o| o.status.success()) || !is_mounted(&self.merged) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        for dir in self.cgroups() {
            remove_cgroup(&dir);
        }
    }
}

/// The cgroup hierarchies systemd uses: the unified one, and the named
/// `systemd` one of a hybrid host.
fn cgroup_roots() -> Vec<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut roots = Vec::new();
    for l in mounts.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() > 3 && (f[2] == "cgroup2" || (f[2] == "cgroup" && f[3].contains("name=systemd")))
        {
            roots.push(PathBuf::from(f[1]));
        }
    }
    roots
}

/// Removes a cgroup and everything below it (deepest first); the processes
/// are gone by then.
fn remove_cgroup(dir: &Path) {
    let mut dirs = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        if let Ok(entries) = std::fs::read_dir(&d) {
            stack.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
        dirs.push(d);
    }
    for d in dirs.iter().rev() {
        for _ in 0..50 {
            if std::fs::remove_dir(d).is_ok() || !d.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Removes the cgroups of containers whose test process is gone.
fn sweep_stale_cgroups() {
    for root in cgroup_roots() {
        for entry in std::fs::read_dir(&root).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(pid) = name
                .strip_prefix("portcullis-pct-")
                .and_then(|rest| rest.split('-').next())
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            if !Path::new(&format!("/proc/{pid}")).exists() {
                remove_cgroup(&entry.path());
            }
        }
    }
}

fn is_mounted(path: &Path) -> bool {
    let want = path.to_string_lossy();
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(&*want))
}

/// An SSH key pair for a client in a test.
pub struct SshKey {
    dir: tempfile::TempDir,
}

impl SshKey {
    pub fn new() -> anyhow::Result<SshKey> {
        let dir = tempfile::tempdir()?;
        run(Command::new("ssh-keygen")
            .args([
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                "portcullis-test",
                "-f",
            ])
            .arg(dir.path().join("key")))?;
        Ok(SshKey { dir })
    }

    /// The public key line, for authorized_keys.
    pub fn public(&self) -> anyhow::Result<String> {
        Ok(std::fs::read_to_string(self.dir.path().join("key.pub"))?
            .trim()
            .to_string())
    }

    /// `ssh` from `from` as `user@addr` with this key, never prompting.
    pub fn ssh(&self, from: &Netns, user: &str, addr: &str) -> Command {
        crate::ssh_command(
            from,
            &self.dir.path().join("key"),
            &format!("{user}@{addr}"),
        )
    }
}
