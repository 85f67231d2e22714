//! The Debian package: `cargo deb` over a release build, with the man pages
//! and completions the CLI generates from its own definition.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, ensure};

use crate::{cargo, output, run};

const CARGO_DEB_VERSION: &str = "3.8.0";

/// Installs cargo-deb unless this version is there.
pub fn ensure_cargo_deb() -> anyhow::Result<()> {
    let have = output(Command::new("cargo").args(["deb", "--version"])).unwrap_or_default();
    if have.trim() == format!("cargo-deb {CARGO_DEB_VERSION}") {
        return Ok(());
    }
    eprintln!("setup: installing cargo-deb {CARGO_DEB_VERSION} (about a minute)");
    run(Command::new("cargo").args([
        "install",
        "--locked",
        &format!("cargo-deb@{CARGO_DEB_VERSION}"),
    ]))
}

/// Builds the package at `version` into `out_dir`; returns its path.
pub fn build(root: &Path, version: &str, out_dir: &Path) -> anyhow::Result<PathBuf> {
    cargo(&["build", "--release", "-p", "portcullis", "--bins"])?;
    let docs = root.join("target/deb-docs");
    let _ = std::fs::remove_dir_all(&docs);
    let bin = root.join("target/release");
    run(Command::new(bin.join("portcullis"))
        .arg("generate-docs")
        .arg(&docs))?;
    run(Command::new(bin.join("portcullisd"))
        .arg("--generate-man")
        .arg(&docs))?;
    std::fs::create_dir_all(out_dir)?;
    let arch = output(Command::new("dpkg").arg("--print-architecture"))
        .context("dpkg --print-architecture")?;
    let deb = out_dir.join(format!("portcullis_{version}_{}.deb", arch.trim()));
    cargo(&[
        "deb",
        "-p",
        "portcullis",
        "--no-build",
        "--deb-version",
        version,
        "-o",
        deb.to_str().context("non-UTF-8 path")?,
    ])?;
    ensure!(deb.exists(), "cargo deb wrote no {}", deb.display());
    Ok(deb)
}

/// Makes `dir` an apt repository (`deb [trusted=yes] file:DIR ./`).
pub fn index(dir: &Path) -> anyhow::Result<()> {
    let packages = output(
        Command::new("dpkg-scanpackages")
            .args([".", "/dev/null"])
            .current_dir(dir),
    )
    .context("dpkg-scanpackages (package dpkg-dev) failed")?;
    std::fs::write(dir.join("Packages"), packages)?;
    Ok(())
}
