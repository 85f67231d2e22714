//! The explain instances: the same eBPF object loaded again with the
//! read-only global `EXPLAIN` = 1 (see `ebpf/src/explain.rs`), so the
//! verifier compiles out every write of the data path and the decision goes
//! to the instance's own `EXPLAIN_RESULT` map. Neither is attached anywhere;
//! each is only run with `BPF_PROG_TEST_RUN` on a crafted frame.
//!
//! - *live*: every map is the pinned one (rules of both generations,
//!   `ACTIVE`, `SETTINGS`, the connection tables, deny sets), so the run
//!   reads exactly what the attached programs read.
//! - *scratch* (`explain --rules`): `ACTIVE`, `SETTINGS`, `IFDIR` and the rule maps
//!   of both generations are fresh maps of its own (created under a private
//!   directory whose pins are removed at once, so they live only as long as
//!   the instance); the connection tables and deny sets are the pinned ones.
//!   A proposed image is written into its generation 0.
//!
//! Loading takes the verifier seconds, so each instance is loaded on first
//! use and kept.

use std::{
    fs,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, anyhow};
use aya::{Ebpf, maps::Array};
use portcullis_common::{EXPLAIN_GLOBAL, ExplainResult, maps, programs};

use super::{
    Dataplane, EBPF_OBJECT, Program, dns_guard_flag, egress, generation, ingress, map_mut,
    maps_dir, settings_flags, testrun, write_if_dirs, write_image,
};
use crate::compile::Image;

/// The maps a scratch instance has of its own: the rule maps of both
/// generations, `ACTIVE` and `SETTINGS`.
const SCRATCH_MAPS: [[&str; 2]; 8] = [
    maps::V4_ROOT,
    maps::V4_CHUNKS,
    maps::SRC6,
    maps::V6_BUCKETS,
    maps::V6_PREFIXES,
    maps::REGIONS,
    maps::SEGMENTS,
    maps::RULE_STATS,
];

/// The loaded explain instances.
#[derive(Default)]
pub(super) struct Explainers {
    live: Option<Ebpf>,
    scratch: Option<Ebpf>,
}

/// What one explain run decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// The program's return value says the packet passes.
    pub passes: bool,
    /// What the run wrote instead of counting (fields left at
    /// `EXPLAIN_UNSET` were not reached).
    pub result: ExplainResult,
}

impl Dataplane {
    /// Runs `program`'s explain instance on `frame` against the live maps,
    /// as arriving on `interface` (ingress; `None`: an interface no rule
    /// names).
    pub fn explain(
        &mut self,
        program: Program,
        frame: &[u8],
        interface: Option<&str>,
    ) -> anyhow::Result<Verdict> {
        let ifindex = ifindex_of(interface)?;
        if self.explainer.live.is_none() {
            self.explainer.live = Some(self.load_explain(None)?);
        }
        let ebpf = self
            .explainer
            .live
            .as_mut()
            .ok_or_else(|| anyhow!("the explain instance did not load"))?;
        run(ebpf, self.programs.ingress_name, program, frame, ifindex)
    }

    /// Runs `program`'s scratch explain instance on `frame` with `image` as
    /// its rules (with the live settings for pings and audit).
    pub fn explain_proposed(
        &mut self,
        program: Program,
        frame: &[u8],
        image: &Image,
        allow_ping: bool,
        interface: Option<&str>,
    ) -> anyhow::Result<Verdict> {
        let ifindex = ifindex_of(interface)?;
        if self.explainer.scratch.is_none() {
            let dir = self
                .pin_dir
                .join(format!("explain-scratch-{}", std::process::id()));
            let loaded = self.load_explain(Some(&dir));
            let _ = remove_scratch_pins(&dir);
            self.explainer.scratch = Some(loaded?);
        }
        let flags = settings_flags(
            self.pass_all,
            allow_ping,
            image.egress_allowlist,
            self.egress_volume,
        ) | dns_guard_flag(image);
        let ebpf = self
            .explainer
            .scratch
            .as_mut()
            .ok_or_else(|| anyhow!("the scratch explain instance did not load"))?;
        write_image(ebpf, 0, image, flags, None, None).context("writing the proposed rules")?;
        write_if_dirs(ebpf, 0, &image.if_classes)
            .context("writing the proposed rules' interfaces")?;
        let mut active: Array<_, u32> = Array::try_from(map_mut(ebpf, maps::ACTIVE)?)?;
        active.set(0, &0, 0).context("writing the scratch ACTIVE")?;
        run(ebpf, self.programs.ingress_name, program, frame, ifindex)
    }

    /// Loads an explain instance; with `scratch`, its rule maps, `ACTIVE`
    /// and `SETTINGS` are created under that directory (the caller removes
    /// the pins).
    fn load_explain(&self, scratch: Option<&Path>) -> anyhow::Result<Ebpf> {
        let maps_dir = maps_dir(&self.pin_dir);
        let mut loader = self.params.loader(&maps_dir);
        loader.override_global(EXPLAIN_GLOBAL, &1u8, true);
        let mut paths: Vec<(&'static str, PathBuf)> = Vec::new();
        if let Some(dir) = scratch {
            fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
            for name in SCRATCH_MAPS
                .iter()
                .flat_map(|pair| [0, 1].map(|g| generation(*pair, g)))
            {
                paths.push((name, dir.join(name)));
            }
            paths.push((maps::ACTIVE, dir.join(maps::ACTIVE)));
            paths.push((maps::SETTINGS, dir.join(maps::SETTINGS)));
            // The proposed rule set's interfaces, not the live ones.
            paths.push((maps::IFDIR, dir.join(maps::IFDIR)));
        }
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        if scratch.is_some() {
            // Generation 1 of the scratch maps is never read (its ACTIVE
            // stays 0): as small as a map can be.
            for pair in SCRATCH_MAPS {
                loader.map_max_entries(generation(pair, 1), 1);
            }
        }
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .context("cannot load the explain instance of the eBPF programs")?;
        ingress(&mut ebpf, self.programs.ingress_name)?
            .load()
            .with_context(|| {
                format!(
                    "the kernel refused the explain instance of {}",
                    self.programs.ingress_name
                )
            })?;
        egress(&mut ebpf)?.load().with_context(|| {
            format!(
                "the kernel refused the explain instance of {}",
                programs::EGRESS
            )
        })?;
        Ok(ebpf)
    }
}

/// Removes a scratch instance's pins and their directory (the maps live on
/// in the instance).
fn remove_scratch_pins(dir: &Path) -> std::io::Result<()> {
    if dir.exists() {
        for entry in fs::read_dir(dir)? {
            fs::remove_file(entry?.path())?;
        }
        fs::remove_dir(dir)?;
    }
    Ok(())
}

/// The index of `interface`, if one is named.
fn ifindex_of(interface: Option<&str>) -> anyhow::Result<Option<u32>> {
    interface
        .map(|name| {
            nix::net::if_::if_nametoindex(name)
                .with_context(|| format!("interface {name:?}: no such interface"))
        })
        .transpose()
}

/// One run: the result reset, the program run once (an ingress frame as
/// arriving on `ifindex`, when given), the result read.
fn run(
    ebpf: &mut Ebpf,
    ingress_program: &str,
    program: Program,
    frame: &[u8],
    ifindex: Option<u32>,
) -> anyhow::Result<Verdict> {
    let mut result: Array<_, ExplainResult> =
        Array::try_from(map_mut(ebpf, maps::EXPLAIN_RESULT)?)?;
    result
        .set(0, &ExplainResult::default(), 0)
        .context("resetting EXPLAIN_RESULT")?;
    let outcome = match program {
        Program::Ingress => {
            let prog = ingress(ebpf, ingress_program)?;
            testrun::run_on(prog.fd()?.as_fd(), frame, 1, ifindex).with_context(|| {
                format!("running the explain instance (interface index {ifindex:?})")
            })?
        }
        Program::Egress => testrun::run(egress(ebpf)?.fd()?.as_fd(), frame, 1)?,
    };
    let passes = match program {
        // XDP_PASS (2); XDP_DROP is 1.
        Program::Ingress => outcome.retval == 2,
        // TC_ACT_UNSPEC (-1): continue; TC_ACT_SHOT (2): drop.
        Program::Egress => outcome.retval != 2,
    };
    let result: Array<_, ExplainResult> = Array::try_from(map_mut(ebpf, maps::EXPLAIN_RESULT)?)?;
    let result = result.get(&0, 0).context("reading EXPLAIN_RESULT")?;
    Ok(Verdict { passes, result })
}
