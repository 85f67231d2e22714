//! The data path on Debian 12's own kernel (6.1), not this machine's: boots
//! it under qemu (emulated: `-accel tcg`) with an initramfs holding this
//! workspace's `portcullisd`, and there loads, attaches and enforces on a
//! veth pair, with real TCP through it.
//!
//! The guest's script is `tests/vm/init.sh`; every line it reports starts
//! with `VM:`. `cargo xtask setup` fetches the kernel, busybox and qemu into
//! `~/.cache/portcullis/vm/` (see `xtask/src/vm.rs`). The console is kept in
//! `target/kernel-vm/console.log`.

use std::{
    fs,
    io::Read as _,
    os::unix::fs::{PermissionsExt as _, symlink},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use portcullis_tests::{require_root, run, workspace_bin};

/// The guest's /init.
const INIT: &str = include_str!("../vm/init.sh");

/// The whole run (boot, an emulated verifier pass of the full program,
/// traffic, power-off) on a loaded 2-core machine. Measured: the 6.1
/// verifier alone takes about 40 s of emulated time on the ingress program.
const TIMEOUT: Duration = Duration::from_secs(300);

/// Where `cargo xtask setup` put the kernel, busybox and qemu.
fn cache() -> anyhow::Result<PathBuf> {
    let home = std::env::var("HOME").context("HOME not set")?;
    let dir = Path::new(&home).join(".cache/portcullis/vm");
    ensure!(
        dir.join("ready-v2").exists(),
        "{} is missing: run `cargo xtask setup` (it fetches Debian 12's kernel, busybox and qemu)",
        dir.display()
    );
    Ok(dir)
}

/// target/kernel-vm (the test binary lives in target/debug/deps).
fn work_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let target = exe
        .ancestors()
        .find(|p| p.file_name().is_some_and(|n| n == "target"))
        .context("the test binary is not under a target directory")?;
    Ok(target.join("kernel-vm"))
}

/// Copies a dynamically linked binary into `root` at `to`, with the
/// libraries and the loader `ldd` lists, at their own paths.
fn copy_with_libs(root: &Path, bin: &Path, to: &str) -> anyhow::Result<()> {
    let dest = root.join(to.trim_start_matches('/'));
    fs::create_dir_all(dest.parent().context("destination has no parent")?)?;
    fs::copy(bin, &dest).with_context(|| format!("copying {}", bin.display()))?;
    let ldd = run(Command::new("ldd").arg(bin))?;
    for lib in ldd
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
        .map(Path::new)
    {
        let dest = root.join(lib.strip_prefix("/")?);
        if dest.exists() {
            continue;
        }
        fs::create_dir_all(dest.parent().context("library has no parent")?)?;
        // fs::copy follows symlinks: the loader path gets the file itself.
        fs::copy(lib, &dest).with_context(|| format!("copying {}", lib.display()))?;
    }
    Ok(())
}

/// The initramfs (newc cpio, written by busybox's cpio): busybox with its
/// applets, iproute2's ip and tc, portcullisd (debug info stripped), the
/// modules, /init.
fn build_initramfs(cache: &Path, work: &Path) -> anyhow::Result<PathBuf> {
    let root = work.join("root");
    let _ = fs::remove_dir_all(&root);
    for d in [
        "bin",
        "etc",
        "proc",
        "sys",
        "dev",
        "run",
        "tmp",
        "boot",
        "lib/modules",
    ] {
        fs::create_dir_all(root.join(d))?;
    }
    let busybox = cache.join("busybox");
    fs::copy(&busybox, root.join("bin/busybox"))?;
    let applets = run(Command::new(&busybox).arg("--list"))?;
    for applet in applets.lines().filter(|a| !a.is_empty() && *a != "busybox") {
        symlink("busybox", root.join("bin").join(applet))?;
    }
    for tool in ["ip", "tc"] {
        let path = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
            .iter()
            .map(|d| Path::new(d).join(tool))
            .find(|p| p.exists())
            .with_context(|| format!("{tool} (iproute2) is not installed"))?;
        copy_with_libs(&root, &path, &format!("/usr/sbin/{tool}"))?;
    }
    let daemon = workspace_bin("portcullisd")?;
    let stripped = work.join("portcullisd");
    run(Command::new("objcopy")
        .arg("--strip-debug")
        .arg(&daemon)
        .arg(&stripped))?;
    copy_with_libs(&root, &stripped, "/bin/portcullisd")?;
    for entry in fs::read_dir(cache.join("kernel/modules"))? {
        let path = entry?.path();
        fs::copy(
            &path,
            root.join("lib/modules")
                .join(path.file_name().context("module name")?),
        )?;
    }
    // As a Debian host has it: the data path's clock learns the tick from it.
    let release = fs::read_to_string(cache.join("kernel/release"))?;
    fs::copy(
        cache.join("kernel/config"),
        root.join("boot").join(format!("config-{}", release.trim())),
    )?;
    let init = root.join("init");
    fs::write(&init, INIT)?;
    fs::set_permissions(&init, fs::Permissions::from_mode(0o755))?;

    let cpio = work.join("initramfs.cpio");
    let list = run(Command::new(&busybox)
        .arg("find")
        .arg(".")
        .current_dir(&root))?;
    let mut child = Command::new(&busybox)
        .args(["cpio", "-o", "-H", "newc"])
        .current_dir(&root)
        .stdin(Stdio::piped())
        .stdout(fs::File::create(&cpio)?)
        .stderr(Stdio::null())
        .spawn()?;
    {
        use std::io::Write as _;
        child
            .stdin
            .take()
            .context("cpio stdin")?
            .write_all(list.as_bytes())?;
    }
    ensure!(child.wait()?.success(), "busybox cpio failed");
    fs::remove_dir_all(&root)?;
    fs::remove_file(&stripped)?;
    Ok(cpio)
}

/// qemu: the host's if installed, else the one `cargo xtask setup` unpacked.
fn qemu(cache: &Path) -> Command {
    let unpacked = cache.join("qemu");
    let bin = unpacked.join("usr/bin/qemu-system-x86_64");
    if !bin.exists() {
        return Command::new("qemu-system-x86_64");
    }
    let mut cmd = Command::new(bin);
    cmd.env(
        "LD_LIBRARY_PATH",
        format!(
            "{}:{}",
            unpacked.join("usr/lib/x86_64-linux-gnu").display(),
            unpacked.join("lib/x86_64-linux-gnu").display()
        ),
    )
    .arg("-L")
    .arg(unpacked.join("usr/share/qemu"))
    .arg("-L")
    .arg(unpacked.join("usr/share/seabios"));
    cmd
}

/// Boots the guest and returns its console output and the wall time.
fn boot(cache: &Path, initramfs: &Path, log: &Path) -> anyhow::Result<(String, Duration)> {
    let start = Instant::now();
    let mut child = qemu(cache)
        // KVM is not used: a guest hung under it on these machines.
        .args(["-accel", "tcg", "-cpu", "max", "-m", "1024", "-smp", "1"])
        .args([
            "-nographic",
            "-no-reboot",
            "-nodefaults",
            "-serial",
            "stdio",
        ])
        .arg("-kernel")
        .arg(cache.join("kernel/vmlinuz"))
        .arg("-initrd")
        .arg(initramfs)
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting qemu-system-x86_64 (cargo xtask setup provides it)")?;
    let mut stdout = child.stdout.take().context("qemu stdout")?;
    let mut stderr = child.stderr.take().context("qemu stderr")?;
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut out = Vec::new();
        let _ = stdout.read_to_end(&mut out);
        let _ = tx.send(out);
    });
    let err = thread::spawn(move || {
        let mut out = String::new();
        let _ = stderr.read_to_string(&mut out);
        out
    });
    let out = match rx.recv_timeout(TIMEOUT) {
        Ok(out) => out,
        Err(_) => {
            let _ = child.kill();
            rx.recv().unwrap_or_default()
        }
    };
    let status = child.wait()?;
    let took = start.elapsed();
    let console = String::from_utf8_lossy(&out).into_owned();
    let stderr = err.join().unwrap_or_default();
    fs::write(log, format!("{console}\n---- qemu stderr ----\n{stderr}"))?;
    ensure!(
        took < TIMEOUT,
        "the guest did not power off within {TIMEOUT:?} (killed); console in {}:\n{console}",
        log.display()
    );
    ensure!(
        status.success(),
        "qemu failed ({status}): {stderr}\nconsole:\n{console}"
    );
    Ok((console, took))
}

/// The number after `prefix` on the console (the guest's uptime there).
fn uptime_at(console: &str, prefix: &str) -> Option<f64> {
    console
        .lines()
        .find_map(|l| l.trim().strip_prefix(prefix))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

#[test]
fn debian12_kernel_loads_attaches_and_enforces() {
    require_root!();
    let cache = cache().unwrap();
    let work = work_dir().unwrap();
    fs::create_dir_all(&work).unwrap();
    let initramfs = build_initramfs(&cache, &work).unwrap();
    let log = work.join("console.log");
    let (console, took) = boot(&cache, &initramfs, &log).unwrap();
    fs::remove_file(&initramfs).unwrap();
    let vm: Vec<&str> = console
        .lines()
        .filter_map(|l| {
            l.trim_start_matches(|c: char| c != 'V')
                .strip_prefix("VM: ")
        })
        .collect();
    eprintln!("guest report (console in {}):", log.display());
    for line in &vm {
        eprintln!("  {line}");
    }

    let release = fs::read_to_string(cache.join("kernel/release")).unwrap();
    assert!(
        release.starts_with("6.1."),
        "the cached kernel is {release}, not Debian 12's 6.1"
    );
    assert!(
        vm.iter()
            .any(|l| *l == format!("kernel {}", release.trim())),
        "the guest did not report kernel {}: {vm:#?}",
        release.trim()
    );
    assert!(
        vm.contains(&"END"),
        "the guest did not run its script to the end: {vm:#?}"
    );
    for control in [
        "PASS control: port 8080 answers without the daemon",
        "PASS control: port 9090 answers without the daemon",
    ] {
        assert!(
            vm.contains(&control),
            "the guest's network does not work without the daemon ({control} missing): {vm:#?}"
        );
    }
    let daemon_log: Vec<&str> = console
        .lines()
        .skip_while(|l| !l.contains("VM: ---- daemon log ----"))
        .take_while(|l| !l.contains("VM: ---- end of daemon log ----"))
        .collect();
    assert!(
        vm.iter().any(|l| l.starts_with("daemon ready")),
        "portcullisd did not reach ready on Linux {}; its log:\n{}",
        release.trim(),
        daemon_log.join("\n")
    );
    // Debian 12's kernel is HZ 250: the programs read jiffies, not the
    // coarse clock (`ebpf/src/clock.rs`).
    assert!(
        daemon_log
            .iter()
            .any(|l| l.contains("clock=jiffies, 4000000 ns a tick")),
        "the data path's clock is not jiffies on Linux {}; the daemon's log:\n{}",
        release.trim(),
        daemon_log.join("\n")
    );
    for check in [
        "PASS admitted: port 8080 answers under the daemon",
        "PASS denied: port 9090 does not answer under the daemon",
    ] {
        assert!(vm.contains(&check), "{check} missing: {vm:#?}");
    }
    // What the kernel shows attached: the ingress program as XDP, the
    // egress program as a clsact filter (6.1 has no TCX: tc_attach = "auto"
    // must have fallen back).
    assert!(
        vm.iter().any(|l| l.starts_with("link ")
            && l.contains("prog/xdp")
            && l.contains("portcullis_ingr")),
        "no XDP program on pc0: {vm:#?}"
    );
    assert!(
        vm.iter()
            .any(|l| l.starts_with("qdisc ") && l.contains("clsact")),
        "no clsact qdisc on pc0: {vm:#?}"
    );
    assert!(
        vm.iter()
            // The filter carries the program's name as the kernel keeps it
            // (15 characters) once the program comes from its pin.
            .any(|l| l.starts_with("egress ") && l.contains("portcullis_egre")),
        "no egress filter on pc0: {vm:#?}"
    );
    let boot = uptime_at(&console, "VM: uptime-at-init ");
    let started = uptime_at(&console, "VM: starting portcullisd at ");
    let ready = uptime_at(&console, "VM: daemon ready at ");
    eprintln!(
        "Linux {}: init at {boot:?} s guest uptime, portcullisd started at {started:?} s, ready at {ready:?} s; {:.1} s wall in all",
        release.trim(),
        took.as_secs_f64()
    );
}
