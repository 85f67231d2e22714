//! What the kernel VM test (`tests/tests/kernel_vm.rs`) boots: Debian 12's
//! own kernel (the cloud flavour of `linux-image-amd64`, 6.1), a static
//! busybox for the guest's shell, and qemu to run it.
//!
//! Everything lives under `~/.cache/portcullis/vm/` (about 120 MB), fetched
//! with `apt-get download` and unpacked with `dpkg-deb -x`: nothing is
//! installed on the host. qemu is unpacked too, with the libraries this host
//! lacks, because installing Debian 12's `qemu-system-x86` removes a newer
//! `qemu-utils` where one is installed (it breaks `qemu-system-common` <<
//! 8.0), and the tests must not take tools away from the machine. The
//! layout: `kernel/vmlinuz`, `kernel/config`, `kernel/release`,
//! `kernel/modules/*.ko` (the few the test needs), `busybox`, `qemu/` (a
//! `dpkg-deb -x` root). Keep in step with `tests/tests/kernel_vm.rs`.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail, ensure};

/// Bump when anything below changes: the next setup fetches again.
const RECIPE: &str = "v2";

/// The metapackage whose dependency names the current 6.1 cloud kernel
/// (`linux-image-6.1.0-N-cloud-amd64`); its `-unsigned` twin is fetched.
const KERNEL_META: &str = "linux-image-cloud-amd64";

/// Modules the guest loads, in this order (built as modules in Debian's
/// cloud kernel; the BPF core, XDP and bpffs are built in). A Debian host
/// loads them on demand (the kernel runs modprobe); the guest has no
/// modprobe, so its /init loads them from `kernel/modules/load-order`.
/// veth: the test's pair. sch_ingress: the clsact qdisc the egress program
/// attaches to before TCX (6.6); cls_bpf: that qdisc's BPF filter.
/// inet_diag, tcp_diag, udp_diag: the sock_diag dumps the daemon seeds its
/// connection table from at start.
const MODULES: &[&str] = &[
    "drivers/net/veth.ko",
    "net/sched/sch_ingress.ko",
    "net/sched/cls_bpf.ko",
    "net/ipv4/inet_diag.ko",
    "net/ipv4/tcp_diag.ko",
    "net/ipv4/udp_diag.ko",
];

pub fn dir() -> anyhow::Result<PathBuf> {
    let home = std::env::var("HOME").context("HOME not set")?;
    Ok(Path::new(&home).join(".cache/portcullis/vm"))
}

/// Fetches the kernel, busybox and qemu unless this recipe's are there.
pub fn ensure() -> anyhow::Result<()> {
    let dir = dir()?;
    let marker = dir.join(format!("ready-{RECIPE}"));
    if marker.exists() {
        return Ok(());
    }
    eprintln!(
        "setup: fetching Debian 12's kernel, busybox and qemu into {} (once)",
        dir.display()
    );
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let result = fetch(&dir);
    // The downloaded packages and the unpacked kernel tree (100 MB of
    // modules) are not kept.
    let _ = std::fs::remove_dir_all(dir.join("debs"));
    let _ = std::fs::remove_dir_all(dir.join("kernel-pkg"));
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&dir);
        return Err(e);
    }
    std::fs::write(&marker, format!("{RECIPE}\n"))?;
    Ok(())
}

fn fetch(dir: &Path) -> anyhow::Result<()> {
    let debs = dir.join("debs");
    std::fs::create_dir_all(&debs)?;
    let kernel_pkg = kernel_package()?;
    let mut qemu_pkgs = qemu_packages()?;
    let mut wanted = vec![format!("{kernel_pkg}-unsigned"), "busybox-static".into()];
    wanted.append(&mut qemu_pkgs);
    download(&debs, &wanted)?;

    let mut kernel_deb = None;
    for entry in std::fs::read_dir(&debs)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.starts_with("linux-image-") {
            kernel_deb = Some(path);
        } else if name.starts_with("busybox-static_") {
            let root = dir.join("busybox-pkg");
            unpack(&path, &root)?;
            std::fs::rename(root.join("bin/busybox"), dir.join("busybox"))?;
            std::fs::remove_dir_all(&root)?;
        } else if name.ends_with(".deb") {
            unpack(&path, &dir.join("qemu"))?;
        }
    }
    let kernel_deb = kernel_deb.context("apt-get download fetched no kernel package")?;
    let tree = dir.join("kernel-pkg");
    unpack(&kernel_deb, &tree)?;
    let kernel = dir.join("kernel");
    std::fs::create_dir_all(kernel.join("modules"))?;
    let boot = tree.join("boot");
    let mut release = None;
    for entry in std::fs::read_dir(&boot)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if let Some(r) = name.strip_prefix("vmlinuz-") {
            release = Some(r.to_string());
        }
    }
    let release = release.context("the kernel package has no boot/vmlinuz-*")?;
    std::fs::copy(
        boot.join(format!("vmlinuz-{release}")),
        kernel.join("vmlinuz"),
    )?;
    std::fs::copy(
        boot.join(format!("config-{release}")),
        kernel.join("config"),
    )?;
    std::fs::write(kernel.join("release"), format!("{release}\n"))?;
    let modules = tree.join("lib/modules").join(&release).join("kernel");
    let mut order = String::new();
    for m in MODULES {
        let from = modules.join(m);
        let name = from.file_name().context("module path")?.to_owned();
        std::fs::copy(&from, kernel.join("modules").join(&name))
            .with_context(|| format!("{} is not in {kernel_pkg}", from.display()))?;
        order.push_str(&format!("{}\n", name.to_string_lossy()));
    }
    std::fs::write(kernel.join("modules/load-order"), order)?;
    if !has_system_qemu() {
        let bin = dir.join("qemu/usr/bin/qemu-system-x86_64");
        ensure!(bin.exists(), "qemu-system-x86 unpacked without its binary");
    }
    Ok(())
}

/// `linux-image-6.1.0-N-cloud-amd64`, from the metapackage's dependency.
fn kernel_package() -> anyhow::Result<String> {
    let out = output(Command::new("apt-cache").args(["depends", KERNEL_META]))?;
    out.lines()
        .find_map(|l| l.trim().strip_prefix("Depends: "))
        .map(|p| p.trim().to_string())
        .with_context(|| format!("apt-cache depends {KERNEL_META} names no kernel package"))
}

fn has_system_qemu() -> bool {
    Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// What installing qemu-system-x86 would add to this host (nothing when it
/// is installed): apt's own resolution, simulated.
fn qemu_packages() -> anyhow::Result<Vec<String>> {
    if has_system_qemu() {
        return Ok(Vec::new());
    }
    let sim = output(Command::new("apt-get").args([
        "install",
        "-s",
        "-q",
        "--no-install-recommends",
        "qemu-system-x86",
    ]))?;
    let pkgs: Vec<String> = sim
        .lines()
        .filter_map(|l| l.strip_prefix("Inst "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect();
    ensure!(
        pkgs.iter().any(|p| p == "qemu-system-x86"),
        "apt cannot resolve qemu-system-x86 here:\n{sim}"
    );
    Ok(pkgs)
}

fn download(into: &Path, pkgs: &[String]) -> anyhow::Result<()> {
    let out = Command::new("apt-get")
        .args(["download", "-q"])
        .args(pkgs)
        .current_dir(into)
        .output()
        .context("running apt-get download")?;
    if !out.status.success() {
        // The lists may be stale (a kernel package superseded by a
        // security update): refresh once and retry.
        let status = Command::new("apt-get").args(["update", "-q"]).status()?;
        ensure!(status.success(), "apt-get update failed: {status}");
        let out = Command::new("apt-get")
            .args(["download", "-q"])
            .args(pkgs)
            .current_dir(into)
            .output()
            .context("running apt-get download")?;
        if !out.status.success() {
            bail!(
                "apt-get download {} failed: {}",
                pkgs.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    Ok(())
}

fn unpack(deb: &Path, into: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(into)?;
    let status = Command::new("dpkg-deb")
        .arg("-x")
        .arg(deb)
        .arg(into)
        .status()
        .context("running dpkg-deb")?;
    ensure!(status.success(), "dpkg-deb -x {} failed", deb.display());
    Ok(())
}

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
