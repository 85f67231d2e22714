//! The README's commands on a fresh machine: rustup with only a stable
//! toolchain and `RUSTUP_AUTO_INSTALL=0`, a clean copy of the checkout.
//!
//! The first command must install both pinned toolchains (the user-space
//! one rust-toolchain.toml names, which rustup resolves before cargo runs,
//! and the eBPF nightly with rust-src) and get as far as the first build
//! (bpf-linker's); the test stops it there. It downloads the two toolchains
//! from rustup's server, so it is ignored by a plain `cargo test` and run by
//! `cargo xtask test` (phase "fresh machine").

use std::{
    io::{BufRead as _, BufReader},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

/// The line `cargo xtask setup` prints when both toolchains are in place and
/// it starts building (bpf-linker, against the nightly's LLVM).
const BUILD_STARTS: &str = "setup: building bpf-linker";
const TIMEOUT: Duration = Duration::from_secs(15 * 60);

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// The commands of the README's first `sh` block under "## Try it", without
/// their comments, in order.
fn readme_commands() -> Vec<String> {
    let readme = include_str!("../../README.md");
    let section = &readme[readme.find("## Try it").expect("a \"Try it\" section")..];
    let block = &section[section.find("```sh\n").expect("an sh block") + 6..];
    let block = &block[..block.find("```").expect("the block ends")];
    block
        .lines()
        .map(|l| l.split('#').next().unwrap().trim().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

/// `name = "value"` in a Rust or TOML source.
fn quoted_value(source: &str, prefix: &str) -> String {
    let line = source
        .lines()
        .find(|l| l.trim_start().starts_with(prefix))
        .unwrap_or_else(|| panic!("no line starting with {prefix:?}"));
    let start = line.find('"').expect("a quoted value") + 1;
    let end = line.rfind('"').unwrap();
    line[start..end].to_string()
}

#[test]
fn ci_runs_the_readmes_test_command_verbatim() {
    let commands = readme_commands();
    let test = commands
        .iter()
        .find(|c| c.ends_with(" test"))
        .expect("the README names a test command");
    let ci = std::fs::read_to_string(workspace().join(".ci/run")).unwrap();
    let last = ci
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty() && !l.starts_with('#'))
        .unwrap();
    assert!(
        last == test || last == format!("exec {test}"),
        ".ci/run ends with {last:?}, not the README's test command {test:?}"
    );
    assert!(
        commands[0].ends_with(" demo"),
        "the README's first command is {:?}",
        commands[0]
    );
}

/// The first executable named `name` on PATH.
fn on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Copies the checkout's files (tracked and untracked, not ignored: what a
/// clean clone holds, plus work in progress) into `to`.
fn copy_checkout(from: &Path, to: &Path) {
    let out = Command::new("git")
        .args([
            "ls-files",
            "-z",
            "--cached",
            "--others",
            "--exclude-standard",
        ])
        .current_dir(from)
        .output()
        .expect("git");
    assert!(out.status.success(), "git ls-files failed");
    for name in out.stdout.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let name = std::str::from_utf8(name).expect("UTF-8 file names");
        let (src, dst) = (from.join(name), to.join(name));
        let Ok(meta) = std::fs::symlink_metadata(&src) else {
            continue; // deleted in the work tree
        };
        std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
        if meta.file_type().is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&src).unwrap(), &dst).unwrap();
        } else {
            std::fs::copy(&src, &dst).unwrap();
        }
    }
}

/// A rustup home holding only the machine's stable toolchain (hard links,
/// so nothing is downloaded or copied; no toolchain at all where the
/// machine has no stable one, as after `rustup-init --default-toolchain
/// none`), and a cargo home with nothing but rustup and its proxies: a
/// machine right after rustup-init.
fn scratch_rustup(scratch: &Path) -> (PathBuf, PathBuf) {
    let real_home = std::env::var_os("RUSTUP_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(&std::env::var("HOME").unwrap()).join(".rustup"));
    let stable = std::fs::read_dir(real_home.join("toolchains"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("stable-"))
        });
    let (rustup_home, cargo_home) = (scratch.join("rustup"), scratch.join("cargo"));
    std::fs::create_dir_all(rustup_home.join("toolchains")).unwrap();
    std::fs::create_dir_all(cargo_home.join("bin")).unwrap();
    let mut settings =
        String::from("version = \"12\"\nprofile = \"minimal\"\nauto_self_update = \"disable\"\n");
    if let Some(stable) = stable {
        let name = stable.file_name().unwrap().to_owned();
        let linked = Command::new("cp")
            .arg("-al")
            .arg(&stable)
            .arg(rustup_home.join("toolchains"))
            .status()
            .is_ok_and(|s| s.success());
        if !linked {
            // Another file system: a symbolic link (nothing here updates it).
            let _ = std::fs::remove_dir_all(rustup_home.join("toolchains").join(&name));
            std::os::unix::fs::symlink(&stable, rustup_home.join("toolchains").join(&name))
                .unwrap();
        }
        settings += &format!("default_toolchain = \"{}\"\n", name.to_string_lossy());
    } else {
        eprintln!(
            "no stable toolchain in {}: the scratch rustup home starts with none",
            real_home.display()
        );
    }
    std::fs::write(rustup_home.join("settings.toml"), settings).unwrap();
    let rustup = on_path("rustup")
        .or_else(|| {
            let home = std::env::var_os("HOME")?;
            let p = Path::new(&home).join(".cargo/bin/rustup");
            p.is_file().then_some(p)
        })
        .expect("rustup on PATH or in ~/.cargo/bin");
    std::fs::copy(&rustup, cargo_home.join("bin/rustup")).unwrap();
    for proxy in [
        "cargo",
        "rustc",
        "rustdoc",
        "cargo-clippy",
        "clippy-driver",
        "cargo-fmt",
        "rustfmt",
    ] {
        std::os::unix::fs::symlink("rustup", cargo_home.join("bin").join(proxy)).unwrap();
    }
    (rustup_home, cargo_home)
}

/// A command in the scratch machine's environment: this one minus
/// everything rustup and cargo set for the test, with the scratch homes.
fn scratch_env(cmd: &mut Command, scratch: &Path, rustup_home: &Path, cargo_home: &Path) {
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        let keep = k == "RUSTUP_DIST_SERVER" || k == "RUSTUP_UPDATE_ROOT";
        if !keep
            && (k.starts_with("CARGO")
                || k.starts_with("RUSTUP")
                || k.starts_with("RUSTC")
                || k.starts_with("RUSTDOC")
                || k == "RUSTFLAGS")
        {
            cmd.env_remove(&key);
        }
    }
    let home = scratch.join("home");
    std::fs::create_dir_all(&home).unwrap();
    cmd.env("HOME", home)
        .env("RUSTUP_HOME", rustup_home)
        .env("CARGO_HOME", cargo_home)
        .env("RUSTUP_AUTO_INSTALL", "0")
        .env(
            "PATH",
            format!(
                "{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                cargo_home.join("bin").display()
            ),
        );
}

fn installed_components(
    toolchain: &str,
    scratch: &Path,
    rustup_home: &Path,
    cargo_home: &Path,
) -> String {
    let mut cmd = Command::new(cargo_home.join("bin/rustup"));
    cmd.args(["component", "list", "--installed", "--toolchain", toolchain]);
    scratch_env(&mut cmd, scratch, rustup_home, cargo_home);
    let out = cmd.output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
#[ignore = "run by `cargo xtask test` (phase fresh machine): downloads two toolchains"]
fn the_readmes_first_command_installs_the_pinned_toolchains_on_a_fresh_machine() {
    let started = Instant::now();
    let root = workspace();
    let command = readme_commands().remove(0);
    let pinned = quoted_value(include_str!("../../rust-toolchain.toml"), "channel");
    let ebpf = quoted_value(
        include_str!("../../xtask/src/main.rs"),
        "const EBPF_TOOLCHAIN",
    );
    let scratch = tempfile::Builder::new()
        .prefix("portcullis-fresh-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let checkout = scratch.path().join("portcullis");
    copy_checkout(&root, &checkout);
    let (rustup_home, cargo_home) = scratch_rustup(scratch.path());
    for toolchain in [&pinned, &ebpf] {
        assert!(
            installed_components(toolchain, scratch.path(), &rustup_home, &cargo_home).is_empty(),
            "{toolchain} is already in the scratch rustup home"
        );
    }
    eprintln!(
        "scratch machine ready in {:?}; running `{command}` in {}",
        started.elapsed(),
        checkout.display()
    );

    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(format!("exec {command} 2>&1"))
        .current_dir(&checkout)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .process_group(0);
    scratch_env(&mut cmd, scratch.path(), &rustup_home, &cargo_home);
    let ran = Instant::now();
    let mut child = cmd.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line.unwrap_or_default()).is_err() {
                break;
            }
        }
    });
    let mut log = Vec::new();
    let outcome = loop {
        let left = TIMEOUT.saturating_sub(ran.elapsed());
        match rx.recv_timeout(left) {
            Ok(line) => {
                eprintln!("  | {line}");
                let done = line.contains(BUILD_STARTS);
                log.push(line);
                if done {
                    break Ok(ran.elapsed());
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                break Err(format!("no {BUILD_STARTS:?} within {TIMEOUT:?}"));
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = child.wait().map(|s| s.to_string());
                break Err(format!(
                    "`{command}` ended ({}) before {BUILD_STARTS:?}",
                    status.unwrap_or_else(|e| e.to_string())
                ));
            }
        }
    };
    // Stop it (and the cargo install it started): its process group.
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    let _ = child.wait();
    let took = outcome.unwrap_or_else(|e| panic!("{e}; output:\n{}", log.join("\n")));

    let user = installed_components(&pinned, scratch.path(), &rustup_home, &cargo_home);
    for c in ["rustc", "cargo", "clippy", "rustfmt"] {
        assert!(
            user.lines().any(|l| l.starts_with(&format!("{c}-"))),
            "{pinned} lacks {c}: {user}"
        );
    }
    let nightly = installed_components(&ebpf, scratch.path(), &rustup_home, &cargo_home);
    assert!(
        nightly.lines().any(|l| l == "rust-src"),
        "{ebpf} lacks rust-src: {nightly}"
    );
    eprintln!(
        "`{command}` on a fresh machine (RUSTUP_AUTO_INSTALL=0): {pinned} and {ebpf} installed, the build started after {:.1} s ({:.1} s in all)",
        took.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}
