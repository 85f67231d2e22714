//! Project tasks: `cargo xtask setup | test | demo`.
//!
//! This crate depends on nothing that needs the eBPF toolchain, so it builds
//! on a fresh machine and can install that toolchain itself.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use clap::{Parser, Subcommand};

mod deb;
mod rootfs;
mod vm;

/// Nightly used for the BPF target (see daemon/build.rs); its LLVM must be
/// the one bpf-linker links against.
const EBPF_TOOLCHAIN: &str = "nightly-2026-10-29";
const BPF_LINKER_VERSION: &str = "0.13.0";
const BPF_LINKER_LLVM_FEATURE: &str = "llvm-23";

/// Debian packages the tests and the demo use.
const APT_PACKAGES: &[&str] = &[
    "iproute2",          // ip, netns, veth
    "util-linux",        // nsenter, mount
    "iputils-ping",      // ping
    "procps",            // sysctl
    "bpftool",           // the layout-upgrade test pins a map with it
    "nftables",          // published-port (DNAT) test
    "openssh-server",    // real sshd for the session tests
    "openssh-client",    // real ssh client
    "dnsmasq-base",      // DHCP server for the lease test (binary only, no service)
    "udhcpc",            // DHCP client for the lease test
    "radvd",             // router advertisements for the SLAAC test
    "systemd",           // systemd-analyze: the unit's hardening score
    "curl",              // raw HTTP to the API socket in the API tests
    "systemd-container", // systemd-nspawn: a real systemd host for the container tests
    "debootstrap",       // builds that host's root file system
    "dpkg-dev",          // dpkg-scanpackages: the package repository cloud-init installs from
    "xdp-tools",         // xdp-filter: the benchmark's stateless XDP reference
    "iptables",          // iptables-legacy: the benchmark's classic comparison
    "strace",            // the benchmark times the daemon's bpf(2) calls at start
    "libfaketime",       // the attack suite steps the daemon's wall clock
    "binutils",          // objdump: the packaged binaries' glibc floor
    "crowdsec",          // a real Local API (crowdsec -no-cs, cscli) for the bouncer tests
    "openssl",           // the bouncer tests' TLS certificates for an https LAPI
    "python3",           // /usr/bin/python3: an unprivileged squatter on the LAPI's port
    "etcd-server",       // etcd: the fleet tests' membership store (in namespaces)
    "etcd-client",       // etcdctl: the fleet tests' users, roles and writes
];

/// Debian's crowdsec registers with CrowdSec's online service in its
/// postinst unless this file exists and is non-empty (README.Debian); that
/// registration fails here and would abort the install.
const CROWDSEC_CAPI: &str = "/etc/crowdsec/online_api_credentials.yaml";

#[derive(Parser)]
#[command(about = "Portcullis project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what a fresh machine lacks: toolchains, bpf-linker, packages.
    Setup,
    /// The whole suite: setup, fmt, clippy, build, unit and integration tests.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Runs portcullisd between two throw-away namespaces and shows what it does.
    Demo,
    /// Benchmarks (release build): rule-engine cost per packet by rule count.
    Bench,
    /// The Debian package (release build) in target/debian/.
    Deb {
        /// Package version (default: the crate's, revision 1).
        #[arg(long)]
        deb_version: Option<String>,
    },
    /// End-to-end: boots a Debian container with systemd-nspawn, provisions
    /// it with cloud-init from systemd/cloud-init/user-data.yaml (installing
    /// the package), and checks it from outside; then upgrade and purge.
    E2e,
}

fn main() -> anyhow::Result<()> {
    let root = workspace_root()?;
    std::env::set_current_dir(&root)?;
    match Cli::parse().task {
        Task::Setup => setup(),
        Task::Test { args } => test(&args),
        Task::Bench => {
            setup()?;
            cargo(&["build", "--release", "--bins"])?;
            cargo(&[
                "run",
                "--release",
                "--quiet",
                "-p",
                "portcullis-tests",
                "--bin",
                "portcullis-bench",
            ])
        }
        Task::Deb { deb_version } => {
            setup()?;
            let version = deb_version.unwrap_or_else(|| format!("{}-1", env!("CARGO_PKG_VERSION")));
            let out = root.join("target/debian");
            let deb = deb::build(&root, &version, &out)?;
            eprintln!("{}", deb.display());
            Ok(())
        }
        Task::E2e => {
            setup()?;
            e2e(&root)
        }
        Task::Demo => {
            setup()?;
            cargo(&["build", "--bins"])?;
            cargo(&[
                "run",
                "--quiet",
                "-p",
                "portcullis-tests",
                "--bin",
                "portcullis-demo",
            ])
        }
    }
}

fn workspace_root() -> anyhow::Result<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    Ok(dir
        .parent()
        .context("xtask has no parent directory")?
        .to_owned())
}

/// Phases with their durations, printed at the end of `test`.
struct Phases(Vec<(String, Duration, bool)>);

impl Phases {
    fn run(&mut self, name: &str, f: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<()> {
        eprintln!("\n==> {name}");
        let start = Instant::now();
        let result = f();
        self.0
            .push((name.to_string(), start.elapsed(), result.is_ok()));
        result.with_context(|| format!("phase {name} failed"))
    }

    fn print(&self) {
        eprintln!("\nphase timings:");
        for (name, took, ok) in &self.0 {
            let status = if *ok { "ok" } else { "FAILED" };
            eprintln!("  {name:<28} {:>8.1} s  {status}", took.as_secs_f64());
        }
        let total: Duration = self.0.iter().map(|p| p.1).sum();
        eprintln!("  {:<28} {:>8.1} s", "total", total.as_secs_f64());
    }
}

fn test(args: &[String]) -> anyhow::Result<()> {
    let mut phases = Phases(Vec::new());
    let result = (|| {
        phases.run("setup", setup)?;
        phases.run("fmt", || cargo(&["fmt", "--all", "--check"]))?;
        phases.run("clippy", || {
            cargo(&[
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ])
        })?;
        phases.run("build", || cargo(&["build", "--bins"]))?;
        phases.run("test", || {
            let mut a = vec!["test", "--workspace"];
            a.extend(args.iter().map(String::as_str));
            cargo(&a)
        })?;
        // The data path as older kernels get it: the single-buffer XDP
        // program (before 5.18) and the clsact egress path (before 6.6),
        // forced on this kernel (tests/src/lib.rs, FORCED_VARIANTS).
        phases.run("forced variants", || {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            run(Command::new(cargo)
                .args(["test", "-p", "portcullis-tests"])
                .args(["--test", "ingress", "--test", "stateful"])
                .args(["--test", "attack_dataplane", "--test", "attack_lifecycle"])
                .env("PORTCULLIS_TEST_XDP_PROGRAM", "single-buffer")
                .env("PORTCULLIS_TEST_TC_ATTACH", "clsact"))
        })?;
        // The README's first command on a fresh machine (a scratch rustup
        // home with only stable, RUSTUP_AUTO_INSTALL=0): downloads the two
        // pinned toolchains, so it is a phase of its own.
        phases.run("fresh machine", || {
            cargo(&[
                "test",
                "-p",
                "portcullis-tests",
                "--test",
                "fresh_machine",
                "--",
                "--ignored",
                "--nocapture",
            ])
        })?;
        phases.run("e2e", || e2e(&workspace_root()?))
    })();
    phases.print();
    result
}

/// Builds versions N and N+1 of the package into a local repository
/// (target/e2e) and runs the end-to-end and package tests against them.
fn e2e(root: &Path) -> anyhow::Result<()> {
    let dir = root.join("target/e2e");
    let _ = std::fs::remove_dir_all(&dir);
    let (repo, next) = (dir.join("repo"), dir.join("next"));
    let base = env!("CARGO_PKG_VERSION");
    deb::build(root, &format!("{base}-1"), &repo)?;
    deb::build(root, &format!("{base}-2"), &next)?;
    deb::index(&repo)?;
    cargo(&["build", "--bins"])?;
    run(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args([
                "test",
                "-p",
                "portcullis-tests",
                "--test",
                "e2e",
                "--test",
                "package_install",
                "--",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("PORTCULLIS_E2E_DIR", &dir),
    )
}

fn cargo(args: &[&str]) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(cargo).args(args))
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    ensure!(status.success(), "{cmd:?} failed: {status}");
    Ok(())
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Idempotent: every step checks first and does nothing when satisfied.
fn setup() -> anyhow::Result<()> {
    ebpf_toolchain()?;
    bpf_linker()?;
    apt_packages()?;
    bpffs()?;
    rootfs::ensure()?;
    vm::ensure()?;
    deb::ensure_cargo_deb()?;
    eprintln!("setup: everything is in place");
    Ok(())
}

fn ebpf_toolchain() -> anyhow::Result<()> {
    let has_src = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        EBPF_TOOLCHAIN,
    ]))
    .is_some_and(|out| out.lines().any(|l| l.starts_with("rust-src")));
    if !has_src {
        eprintln!("setup: installing {EBPF_TOOLCHAIN} with rust-src");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            EBPF_TOOLCHAIN,
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
    }
    Ok(())
}

fn bpf_linker() -> anyhow::Result<()> {
    let want = format!("bpf-linker {BPF_LINKER_VERSION}");
    if output(Command::new("bpf-linker").arg("--version")).is_some_and(|v| v.trim() == want) {
        return Ok(());
    }
    eprintln!("setup: building {want} against {EBPF_TOOLCHAIN}'s LLVM (about a minute)");
    // bpf-linker must link the same LLVM major as the nightly's rustc. Debian
    // has no LLVM 23, so link against the nightly's own libLLVM, through a
    // stable directory that bpf-linker's rpath then points to.
    let sysroot =
        output(Command::new("rustc").args([&format!("+{EBPF_TOOLCHAIN}"), "--print", "sysroot"]))
            .context("cannot find the eBPF toolchain's sysroot")?;
    let lib = std::fs::read_dir(Path::new(sysroot.trim()).join("lib"))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("libLLVM.so."))
        })
        .context("the eBPF toolchain ships no libLLVM.so")?;
    let home = std::env::var("HOME").context("HOME not set")?;
    let prefix = Path::new(&home).join(".local/share/portcullis/llvm");
    let libdir = prefix.join("lib");
    std::fs::create_dir_all(&libdir)?;
    for name in [
        std::ffi::OsString::from("libLLVM.so"),
        lib.file_name().unwrap().to_owned(),
    ] {
        let link = libdir.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&lib, &link)?;
    }
    run(Command::new("cargo")
        .args([
            "install",
            "--locked",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--no-default-features",
            "--features",
            BPF_LINKER_LLVM_FEATURE,
        ])
        .env("LLVM_PREFIX", &prefix))?;
    let got = output(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
    ensure!(
        got.trim() == want,
        "bpf-linker installed but reports {got:?}; is ~/.cargo/bin on PATH?"
    );
    Ok(())
}

fn apt_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .is_none_or(|s| !s.contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing Debian packages {}", missing.join(" "));
    if missing.contains(&"crowdsec") {
        crowdsec_opt_out()?;
    }
    run(Command::new("apt-get").arg("update").arg("-q"))?;
    // These packages are tools for the tests: their services (sshd, radvd)
    // must not start on this machine. policy-rc.d tells invoke-rc.d so.
    let policy = Path::new("/usr/sbin/policy-rc.d");
    let ours = !policy.exists();
    if ours {
        std::fs::write(
            policy,
            "#!/bin/sh\n# portcullis xtask setup: start no services\nexit 101\n",
        )?;
        std::fs::set_permissions(policy, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    }
    let result = run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"));
    if ours {
        std::fs::remove_file(policy)?;
    }
    if result.is_ok() && missing.contains(&"crowdsec") {
        // Its service would hold 127.0.0.1:8080 at the next boot; the
        // tests need none of it (symlinks only: works without systemd).
        let _ = output(Command::new("systemctl").args(["disable", "crowdsec.service"]));
    }
    result
}

/// Opts out of crowdsec's online registration before the package is
/// installed (an admin's existing non-empty file is kept). The tests run
/// their own Local API; the package's service is never started here
/// (policy-rc.d) and its unit stays disabled.
fn crowdsec_opt_out() -> anyhow::Result<()> {
    let capi = Path::new(CROWDSEC_CAPI);
    if std::fs::metadata(capi).is_ok_and(|m| m.len() > 0) {
        return Ok(());
    }
    if let Some(dir) = capi.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(
        capi,
        "# portcullis xtask setup: no registration with CrowdSec's online API\n",
    )?;
    std::fs::set_permissions(capi, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    Ok(())
}

/// The tests pin under /sys/fs/bpf; this machine kind does not mount it.
fn bpffs() -> anyhow::Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    if mounts.lines().any(|l| l.starts_with("bpf /sys/fs/bpf ")) {
        return Ok(());
    }
    if !nix_is_root() {
        bail!("/sys/fs/bpf is not mounted and mounting it needs root");
    }
    run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
}

fn nix_is_root() -> bool {
    output(Command::new("id").arg("-u")).is_some_and(|u| u.trim() == "0")
}
