//! The Debian root file system the container tests boot with systemd-nspawn.
//!
//! Built once with debootstrap and cached under `~/.cache/portcullis/rootfs/`
//! (about two minutes, 400 MB); the tests boot it read-only under an overlay,
//! so every boot is a fresh instance. The directory name carries the recipe
//! version: change the recipe, bump [`RECIPE`], and the next setup rebuilds.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, ensure};

/// Bump when anything below changes.
const RECIPE: &str = "bookworm-v2";

/// What a provider's Debian image has that the tests exercise: systemd and
/// D-Bus, sshd, cloud-init (NoCloud) with what its modules need (locales,
/// netbase for /etc/protocols), nftables for the fallback policy.
const PACKAGES: &[&str] = &[
    "systemd",
    "systemd-sysv",
    "dbus",
    "libpam-systemd",
    "openssh-server",
    "iproute2",
    "netbase",
    "nftables",
    "locales",
];

/// Installed with apt inside the new root (debootstrap cannot order
/// cloud-init's Python dependencies itself). systemd-resolved is installed
/// but left disabled: the FQDN test enables it in its own boot (the
/// forwarder as resolved's upstream); other boots keep a plain resolv.conf.
const APT_PACKAGES: &[&str] = &["cloud-init", "systemd-resolved"];

/// Where the finished root file system lives (the tests find it here too:
/// keep in step with `tests/src/container.rs`).
pub fn path() -> anyhow::Result<PathBuf> {
    let home = std::env::var("HOME").context("HOME not set")?;
    Ok(Path::new(&home)
        .join(".cache/portcullis/rootfs")
        .join(RECIPE))
}

/// Builds the root file system unless this recipe's is already there.
pub fn ensure() -> anyhow::Result<()> {
    let done = path()?;
    if done.join("etc/portcullis-rootfs").exists() {
        return Ok(());
    }
    let parent = done.parent().context("rootfs path has no parent")?;
    std::fs::create_dir_all(parent)?;
    let tmp = parent.join(format!("{RECIPE}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    eprintln!(
        "setup: building the container root file system in {} (about two minutes, once)",
        done.display()
    );
    let result = build(&tmp);
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let _ = std::fs::remove_dir_all(&done);
    std::fs::rename(&tmp, &done)?;
    Ok(())
}

fn build(root: &Path) -> anyhow::Result<()> {
    let sources = std::fs::read_to_string("/etc/apt/sources.list.d/debian.sources")
        .or_else(|_| std::fs::read_to_string("/etc/apt/sources.list"))
        .unwrap_or_default();
    let mirror = sources
        .lines()
        .find_map(|l| {
            l.strip_prefix("URIs:")
                .or_else(|| l.strip_prefix("deb "))
                .and_then(|rest| rest.split_whitespace().find(|w| w.starts_with("http")))
        })
        .unwrap_or("http://deb.debian.org/debian")
        .to_string();
    let status = Command::new("debootstrap")
        .args([
            "--variant=minbase",
            &format!("--include={}", PACKAGES.join(",")),
        ])
        .arg("bookworm")
        .arg(root)
        .arg(&mirror)
        .status()
        .context("running debootstrap (package debootstrap)")?;
    ensure!(status.success(), "debootstrap failed: {status}");
    // Nothing may start inside the chroot while packages install.
    let policy = root.join("usr/sbin/policy-rc.d");
    std::fs::write(&policy, "#!/bin/sh\nexit 101\n")?;
    std::fs::set_permissions(&policy, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    for args in [
        vec!["apt-get", "update", "-q"],
        [
            vec!["apt-get", "install", "-y", "-q", "--no-install-recommends"],
            APT_PACKAGES.to_vec(),
        ]
        .concat(),
        vec!["apt-get", "clean"],
    ] {
        let status = Command::new("chroot")
            .arg(root)
            .args(&args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("running chroot")?;
        ensure!(
            status.success(),
            "{} in the new root failed: {status}",
            args.join(" ")
        );
    }
    std::fs::remove_file(&policy)?;
    // No network inside the test containers: apt must not try a mirror (a
    // failed `apt-get update` fails cloud-init's package module).
    std::fs::write(
        root.join("etc/apt/sources.list"),
        "# no mirror: the test containers are offline\n",
    )?;
    let lists = root.join("var/lib/apt/lists");
    for entry in std::fs::read_dir(&lists)? {
        let path = entry?.path();
        if path.is_file() {
            std::fs::remove_file(path)?;
        }
    }
    // cloud-init: the NoCloud seed only; the test network is addressed by
    // the tests, not by cloud-init.
    std::fs::write(
        root.join("etc/cloud/cloud.cfg.d/90-portcullis-tests.cfg"),
        "datasource_list: [ NoCloud, None ]\nnetwork: {config: disabled}\n",
    )?;
    // Each boot gets its own machine id (the root is shared, read-only).
    std::fs::write(root.join("etc/machine-id"), "")?;
    disable_resolved(root)?;
    std::fs::write(root.join("etc/portcullis-rootfs"), format!("{RECIPE}\n"))?;
    Ok(())
}

/// systemd-resolved off by default: its package enables it and points
/// /etc/resolv.conf at its stub; the boots that want it enable it.
fn disable_resolved(root: &Path) -> anyhow::Result<()> {
    for link in [
        "etc/systemd/system/multi-user.target.wants/systemd-resolved.service",
        "etc/systemd/system/sysinit.target.wants/systemd-resolved.service",
        "etc/systemd/system/dbus-org.freedesktop.resolve1.service",
    ] {
        match std::fs::remove_file(root.join(link)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("removing {link}"));
            }
            _ => {}
        }
    }
    let conf = root.join("etc/resolv.conf");
    if conf.is_symlink() {
        std::fs::remove_file(&conf)?;
    }
    std::fs::write(conf, "# the test containers are offline\n")?;
    Ok(())
}
