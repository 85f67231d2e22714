//! The two programs a data path runs, and where they come from.
//!
//! Verifying them is most of a start (seconds for the ingress program on a
//! busy 2-core VM). So they are pinned under `<pin_dir>/programs/<build>/`,
//! `<build>` naming the eBPF object's hash, and a restarted daemon of the
//! same build adopts them instead of verifying them again, but only when
//! every map they use is a map pinned under the current layout directory:
//! a program bound to maps that were since re-created (a layout upgrade, a
//! resized table, a removed pin) would read tables nobody writes, so it is
//! loaded afresh. When they must be loaded, ingress and egress are verified
//! on two threads (the kernel verifies privileged programs in parallel).

use std::{
    collections::HashSet,
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, anyhow, bail};
use aya::{
    Ebpf,
    maps::MapInfo,
    programs::{Program, ProgramInfo, SchedClassifier, Xdp},
};
use aya_obj::programs::XdpAttachType;
use portcullis_common::programs;
use sha2::{Digest as _, Sha256};
use tracing::{info, warn};

use crate::model::{XdpProgram, hex};

/// The programs of a data path, owned (each holds its own fd).
pub(super) struct Programs {
    pub ingress: Xdp,
    /// Which XDP program `ingress` is (multi- or single-buffer).
    pub ingress_name: &'static str,
    pub egress: SchedClassifier,
    /// Adopted from the pins of an earlier daemon, not verified now.
    pub adopted: bool,
}

/// The programs for `ebpf` (whose maps are pinned in `maps_dir`): adopted
/// from `pin_dir`'s program pins when they are this build's and use only
/// the maps pinned now, loaded (and pinned for the next start) otherwise.
pub(super) fn obtain(
    ebpf: &mut Ebpf,
    object: &[u8],
    pin_dir: &Path,
    maps_dir: &Path,
    choice: XdpProgram,
) -> anyhow::Result<Programs> {
    let dir = build_dir(pin_dir, object);
    match adopt(&dir, maps_dir, choice) {
        Ok(Some(programs)) => return Ok(programs),
        Ok(None) => {}
        Err(e) => {
            warn!(pins = %dir.display(), error = %format!("{e:#}"), "pinned programs not adoptable; verifying anew");
        }
    }
    let ingress_name = load(ebpf, choice)?;
    pin(ebpf, pin_dir, &dir, ingress_name)?;
    // Owned handles on the pins, so adopted and loaded programs are one type.
    let (ingress, egress) = from_pins(&dir, ingress_name)?;
    Ok(Programs {
        ingress,
        ingress_name,
        egress,
        adopted: false,
    })
}

/// `<pin_dir>/programs/<first 16 bytes of the object's SHA-256, in hex>`.
pub(super) fn build_dir(pin_dir: &Path, object: &[u8]) -> PathBuf {
    let digest = Sha256::digest(object);
    pin_dir
        .join("programs")
        .join(hex(digest.get(..16).unwrap_or_default()))
}

/// The XDP programs `choice` allows, in order of preference.
fn ingress_candidates(choice: XdpProgram) -> &'static [&'static str] {
    match choice {
        XdpProgram::Frags => &[programs::INGRESS],
        XdpProgram::SingleBuffer => &[programs::INGRESS_SINGLE],
        XdpProgram::Auto => &[programs::INGRESS, programs::INGRESS_SINGLE],
    }
}

/// The pinned programs of this build, if both are there and use only the
/// maps pinned in `maps_dir` now. `Ok(None)`: nothing pinned to adopt.
fn adopt(dir: &Path, maps_dir: &Path, choice: XdpProgram) -> anyhow::Result<Option<Programs>> {
    let Some(ingress_name) = ingress_candidates(choice)
        .iter()
        .copied()
        .find(|name| dir.join(name).exists())
    else {
        return Ok(None);
    };
    if !dir.join(programs::EGRESS).exists() {
        return Ok(None);
    }
    let (ingress, egress) = from_pins(dir, ingress_name)?;
    let pinned = pinned_map_ids(maps_dir)?;
    for (name, info) in [
        (ingress_name, ingress.info()?),
        (programs::EGRESS, egress.info()?),
    ] {
        uses_only(&info, &pinned).with_context(|| format!("pinned program {name}"))?;
    }
    info!(pins = %dir.display(), program = ingress_name, "adopted the pinned programs of this build (no verification)");
    Ok(Some(Programs {
        ingress,
        ingress_name,
        egress,
        adopted: true,
    }))
}

fn from_pins(dir: &Path, ingress_name: &str) -> anyhow::Result<(Xdp, SchedClassifier)> {
    let ingress =
        Xdp::from_pin(dir.join(ingress_name), XdpAttachType::Interface).with_context(|| {
            format!(
                "cannot open pinned program {}",
                dir.join(ingress_name).display()
            )
        })?;
    let egress = SchedClassifier::from_pin(dir.join(programs::EGRESS)).with_context(|| {
        format!(
            "cannot open pinned program {}",
            dir.join(programs::EGRESS).display()
        )
    })?;
    Ok((ingress, egress))
}

/// The kernel ids of the maps pinned in `maps_dir`.
fn pinned_map_ids(maps_dir: &Path) -> anyhow::Result<HashSet<u32>> {
    let mut ids = HashSet::new();
    for entry in fs::read_dir(maps_dir)
        .with_context(|| format!("cannot list pinned maps in {}", maps_dir.display()))?
    {
        let path = entry?.path();
        let info = MapInfo::from_pin(&path)
            .with_context(|| format!("cannot open pinned map {}", path.display()))?;
        ids.insert(info.id());
    }
    Ok(ids)
}

/// Fails unless every map the program uses is one of `pinned`, or one of
/// the program's own that the daemon never reads or writes for the live
/// instance ([`private_map`]).
fn uses_only(info: &ProgramInfo, pinned: &HashSet<u32>) -> anyhow::Result<()> {
    let Some(ids) = info.map_ids()? else {
        bail!("the kernel does not report the maps a program uses");
    };
    for &id in ids.iter().filter(|id| !pinned.contains(id)) {
        let name = MapInfo::from_id(id)
            .ok()
            .and_then(|m| m.name_as_str().map(str::to_owned))
            .unwrap_or_default();
        if !private_map(&name) {
            bail!(
                "uses map {name:?} (id {id}), which is no longer pinned (the maps were re-created)"
            );
        }
    }
    Ok(())
}

/// Maps each loaded instance has of its own, which the daemon never reads
/// or writes for the live programs: the object's global data (`.rodata`:
/// `EXPLAIN` = 0 in every live instance of a build) and the explain
/// result (written only by the explain instance).
fn private_map(name: &str) -> bool {
    name.starts_with('.') || name == "EXPLAIN_RESULT"
}

/// Verifies and loads the ingress program `choice` asks for and the egress
/// program, on two threads; returns the ingress program's name.
fn load(ebpf: &mut Ebpf, choice: XdpProgram) -> anyhow::Result<&'static str> {
    let (mut frags, mut single, mut egress) = (None, None, None);
    for (name, program) in ebpf.programs_mut() {
        match name {
            programs::INGRESS => frags = Some(program),
            programs::INGRESS_SINGLE => single = Some(program),
            programs::EGRESS => egress = Some(program),
            _ => {}
        }
    }
    let egress = egress.ok_or_else(|| missing(programs::EGRESS))?;
    std::thread::scope(|scope| {
        let egress = scope.spawn(move || -> anyhow::Result<()> {
            let prog: &mut SchedClassifier = egress.try_into()?;
            prog.load()
                .with_context(|| format!("the kernel refused program {}", programs::EGRESS))
        });
        let ingress = load_ingress(frags, single, choice);
        egress
            .join()
            .map_err(|_| anyhow!("loading {} panicked", programs::EGRESS))??;
        ingress
    })
}

fn load_ingress(
    frags: Option<&mut Program>,
    single: Option<&mut Program>,
    choice: XdpProgram,
) -> anyhow::Result<&'static str> {
    let load =
        |program: Option<&mut Program>, name: &'static str| -> anyhow::Result<&'static str> {
            let prog: &mut Xdp = program.ok_or_else(|| missing(name))?.try_into()?;
            prog.load()
                .with_context(|| format!("the kernel refused program {name}"))?;
            Ok(name)
        };
    match choice {
        XdpProgram::Frags => load(frags, programs::INGRESS),
        XdpProgram::SingleBuffer => load(single, programs::INGRESS_SINGLE),
        XdpProgram::Auto => load(frags, programs::INGRESS).or_else(|e| {
            warn!(error = %format!("{e:#}"), "multi-buffer XDP refused (kernel before 5.18?); using the single-buffer program");
            load(single, programs::INGRESS_SINGLE)
        }),
    }
}

/// Pins the loaded programs in `dir`, after removing every other build's
/// pins (programs still attached stay alive through their links).
fn pin(ebpf: &mut Ebpf, pin_dir: &Path, dir: &Path, ingress_name: &str) -> anyhow::Result<()> {
    let all = pin_dir.join("programs");
    if all.exists() {
        fs::remove_dir_all(&all)
            .with_context(|| format!("cannot remove old program pins in {}", all.display()))?;
    }
    fs::create_dir_all(dir)
        .with_context(|| format!("cannot create pin directory {}", dir.display()))?;
    for name in [ingress_name, programs::EGRESS] {
        let program = ebpf.program_mut(name).ok_or_else(|| missing(name))?;
        program
            .pin(dir.join(name))
            .with_context(|| format!("cannot pin program {name} in {}", dir.display()))?;
    }
    Ok(())
}

fn missing(name: &str) -> anyhow::Error {
    anyhow!("program {name} missing from the eBPF object")
}
