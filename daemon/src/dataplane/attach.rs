//! Attaching the programs to interfaces, adopting and pinning their links,
//! and detaching them; where the pins live.

use std::{
    ffi::CString,
    fs,
    io::ErrorKind,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, anyhow, bail};
use aya::Ebpf;
use aya::programs::{
    SchedClassifier, TcAttach, TcAttachType, Xdp, XdpMode,
    links::{FdLink, LinkError, LinkOrder, PinnedLink},
    tc::{self, NlOptions, SchedClassifierLink, TcHandle},
    xdp::XdpLink,
};
use portcullis_common::programs;
use tracing::{info, warn};

use super::{Dataplane, sys};
use crate::model::{TcAttachMode, XdpProgram};

/// Priority and handle of our clsact egress filter (the clsact path).
const CLSACT_PRIORITY: u16 = 0xc0de;
const CLSACT_HANDLE: TcHandle = TcHandle::new(0, 0x7063);

/// How a program came to run on an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attach {
    /// A new link (or clsact filter) was created.
    New,
    /// The link of an earlier daemon was kept; the new program was swapped
    /// in under it atomically.
    Adopted,
}

impl Dataplane {
    /// Filters inbound traffic on `ifname`: adopts its pinned XDP link if
    /// there is one, attaches and pins a new link otherwise.
    pub fn attach_ingress(&mut self, ifname: &str) -> anyhow::Result<Attach> {
        let pin = link_pin(&self.pin_dir, "xdp", ifname);
        let prog = &mut self.programs.ingress;
        if pin.exists() {
            match adopt(prog, &pin) {
                Ok(()) => return Ok(Attach::Adopted),
                Err(e) => {
                    // A link whose interface is gone cannot be updated; replace it.
                    warn!(interface = ifname, error = %format!("{e:#}"), "pinned link unusable, attaching anew");
                    fs::remove_file(&pin)
                        .with_context(|| format!("cannot remove stale pin {}", pin.display()))?;
                }
            }
        }
        let single_buffer = self.programs.ingress_name == programs::INGRESS_SINGLE;
        attach_pinned(prog, ifname, single_buffer, &pin, "XDP")?;
        Ok(Attach::New)
    }

    /// Records outbound flows on `ifname` (TCX link or clsact filter).
    pub fn attach_egress(&mut self, ifname: &str, mode: TcAttachMode) -> anyhow::Result<Attach> {
        let use_tcx = match mode {
            TcAttachMode::Tcx => true,
            TcAttachMode::Clsact => false,
            TcAttachMode::Auto => kernel_has_tcx(),
        };
        let c_name = CString::new(ifname).context("interface name contains NUL")?;
        let prog = &mut self.programs.egress;
        if !use_tcx {
            return attach_clsact(prog, &c_name);
        }
        let pin = link_pin(&self.pin_dir, "tcx", ifname);
        if pin.exists() {
            let adopted = PinnedLink::from_pin(&pin)
                .map_err(anyhow::Error::from)
                .and_then(|p| Ok(SchedClassifierLink::try_from(FdLink::from(p))?))
                .and_then(|link| Ok(prog.attach_to_link(link)?));
            match adopted {
                Ok(id) => {
                    drop(prog.take_link(id)?);
                    return Ok(Attach::Adopted);
                }
                Err(e) => {
                    warn!(interface = ifname, error = %format!("{e:#}"), "pinned TCX link unusable, attaching anew");
                    fs::remove_file(&pin)
                        .with_context(|| format!("cannot remove stale pin {}", pin.display()))?;
                }
            }
        }
        let attach = TcAttach::Tcx {
            attach_type: TcAttachType::Egress,
            order: LinkOrder::default(),
        };
        let id = prog
            .attach(c_name.as_c_str(), attach)
            .with_context(|| format!("cannot attach TCX egress to interface {ifname}"))?;
        let link: FdLink = prog.take_link(id)?.try_into().map_err(|e: LinkError| {
            anyhow!("interface {ifname}: TCX link is not a bpf_link: {e}")
        })?;
        link.pin(&pin)
            .with_context(|| format!("cannot pin the TCX link of {ifname} at {}", pin.display()))?;
        Ok(Attach::New)
    }
}

/// TCX arrived in Linux 6.6.
fn kernel_has_tcx() -> bool {
    aya::util::KernelVersion::current().is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 6, 0))
}

/// The clsact path: replace the program of our filter if it exists (an
/// earlier daemon's), create the qdisc and the filter otherwise. The filter
/// is left in the kernel when this process exits.
fn attach_clsact(prog: &mut SchedClassifier, ifname: &std::ffi::CStr) -> anyhow::Result<Attach> {
    let name = ifname.to_string_lossy();
    let parent: TcHandle = TcAttachType::Egress.into();
    let existing =
        SchedClassifierLink::attached(ifname, parent, CLSACT_PRIORITY, CLSACT_HANDLE, None)?;
    let (id, how) = match prog.attach_to_link(existing) {
        Ok(id) => (id, Attach::Adopted),
        Err(_) => {
            // No such filter yet; the qdisc may already exist.
            if let Err(e) = tc::qdisc_add_clsact(ifname) {
                let exists = matches!(&e, tc::TcError::NetlinkError(n) if n.raw_os_error() == Some(libc::EEXIST));
                if !exists {
                    return Err(e).with_context(|| format!("cannot add a clsact qdisc to {name}"));
                }
            }
            let attach = TcAttach::Netlink {
                parent,
                options: NlOptions {
                    priority: CLSACT_PRIORITY,
                    handle: CLSACT_HANDLE,
                    classid: None,
                },
            };
            let id = prog
                .attach(ifname, attach)
                .with_context(|| format!("cannot attach a clsact egress filter to {name}"))?;
            (id, Attach::New)
        }
    };
    // Dropping the link would delete the filter; it must outlive us.
    std::mem::forget(prog.take_link(id)?);
    Ok(how)
}

fn adopt(prog: &mut Xdp, pin: &Path) -> anyhow::Result<()> {
    let pinned = PinnedLink::from_pin(pin)?;
    let link = XdpLink::try_from(FdLink::from(pinned))?;
    let id = prog.attach_to_link(link)?;
    // Dropping our handle closes the fd; the pin keeps the link alive.
    drop(prog.take_link(id)?);
    Ok(())
}

/// Where this version's maps are pinned: one directory per map layout
/// version, so a daemon whose layouts differ from the pinned ones creates
/// fresh maps beside them instead of failing on, or misreading, the old.
pub fn maps_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join(format!("maps-v{}", portcullis_common::LAYOUT_VERSION))
}

/// Removes the maps of other layout versions, once this version's programs
/// run under every link (the old programs, and with them the last users of
/// the old maps, are gone). Returns the directories removed.
pub fn remove_old_layouts(pin_dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let current = maps_dir(pin_dir);
    let mut removed = Vec::new();
    for entry in fs::read_dir(pin_dir)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        if path != current && (name == "maps" || name.starts_with("maps-v")) {
            fs::remove_dir_all(&path)
                .with_context(|| format!("cannot remove {}", path.display()))?;
            removed.push(path);
        }
    }
    Ok(removed)
}

fn link_pin(pin_dir: &Path, kind: &str, ifname: &str) -> PathBuf {
    pin_dir.join("links").join(format!("{kind}-{ifname}"))
}

/// Refuses a pin directory that is not on a bpffs: pins elsewhere fail with
/// an obscure error, and a tmpfs would silently lose them.
pub(super) fn ensure_bpffs(pin_dir: &Path) -> anyhow::Result<()> {
    const BPF_FS_MAGIC: i64 = 0xcafe4a11;
    let mut probe = pin_dir.to_path_buf();
    while !probe.exists() {
        if !probe.pop() {
            break;
        }
    }
    let stat = nix::sys::statfs::statfs(&probe)
        .with_context(|| format!("cannot stat {}", probe.display()))?;
    if stat.filesystem_type().0 as i64 != BPF_FS_MAGIC {
        bail!(
            "pin directory {} is not on a bpf file system ({} is not bpffs; mount one with `mount -t bpf bpf {}`)",
            pin_dir.display(),
            probe.display(),
            probe.display()
        );
    }
    Ok(())
}

/// Detaches the pinned link at `path` at once (`BPF_OBJ_GET`, then
/// `BPF_LINK_DETACH`), whoever else still holds it. aya 0.16 has no call
/// for this, and its `FdLink` does not lend its fd.
fn detach_pinned_link(path: &Path) -> std::io::Result<()> {
    let fd = sys::obj_get(path)?;
    let detach = sys::LinkDetachAttr {
        link_fd: std::os::fd::AsRawFd::as_raw_fd(&fd) as u32,
    };
    let mut detach = detach;
    // SAFETY: `detach` is `bpf_attr.link_detach`; the fd it names is open
    // for the duration of the call.
    unsafe { sys::bpf(sys::BPF_LINK_DETACH, &mut detach) }?;
    Ok(())
}

/// Deletes our clsact egress filter on `ifname`, found by its priority and
/// handle (not by name: a program adopted from its pin carries the
/// kernel's 15-character name, so the filter's name may be cut short).
/// Whether there was one.
fn remove_clsact_filter(c_name: &CString, ifname: &str) -> bool {
    use aya::programs::links::Link as _;
    let parent: TcHandle = TcAttachType::Egress.into();
    let link = match SchedClassifierLink::attached(
        c_name.as_c_str(),
        parent,
        CLSACT_PRIORITY,
        CLSACT_HANDLE,
        None,
    ) {
        Ok(link) => link,
        Err(e) => {
            warn!(interface = %ifname, error = %e, "cannot check for a clsact filter");
            return false;
        }
    };
    match link.detach() {
        Ok(()) => {
            info!(interface = %ifname, "clsact egress filter removed");
            true
        }
        Err(aya::programs::ProgramError::NetlinkError(e))
            if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EINVAL)) =>
        {
            false
        }
        Err(e) => {
            warn!(interface = %ifname, error = %e, "cannot remove the clsact filter");
            false
        }
    }
}

/// Removes every link and map pinned under `pin_dir`, which detaches the
/// programs, and our clsact filters on `interfaces`: the explicit way to stop.
pub fn detach_all(pin_dir: &Path, interfaces: &[String]) -> anyhow::Result<usize> {
    let mut removed = 0;
    for ifname in interfaces {
        let Ok(c_name) = CString::new(ifname.as_str()) else {
            continue;
        };
        if remove_clsact_filter(&c_name, ifname) {
            removed += 1;
        }
    }
    let links = pin_dir.join("links");
    match fs::read_dir(&links) {
        Ok(entries) => {
            for entry in entries {
                let path = entry?.path();
                // Detach now (BPF_LINK_DETACH), not whenever the last reference
                // to the link happens to go: the caller is told it is done.
                if let Err(e) = detach_pinned_link(&path) {
                    warn!(link = %path.display(), error = %e, "BPF_LINK_DETACH failed; unpinning only");
                }
                fs::remove_file(&path)
                    .with_context(|| format!("cannot unpin {}", path.display()))?;
                info!(link = %path.display(), "detached");
                removed += 1;
            }
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot list {}", links.display())),
    }
    match fs::remove_dir_all(pin_dir) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot remove {}", pin_dir.display())),
    }
    Ok(removed)
}

/// The bootstrap filter's object (`ebpf/src/bootstrap.rs`), built by
/// `build.rs` beside the data path's.
static BOOTSTRAP_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/portcullis-bootstrap"));

/// The bootstrap filter's programs (multi- and single-buffer), as the
/// kernel names them.
pub const BOOTSTRAP: &str = "pc_bootstrap";
pub const BOOTSTRAP_SINGLE: &str = "pc_bootstrap_sb";

/// The bootstrap filter, loaded: what a fresh start attaches to each
/// interface at once, before the full programs are verified. It passes ARP
/// and neighbour discovery only (`ebpf/src/bootstrap.rs`), a subset of what
/// the full program passes in any state, and the full program replaces it
/// atomically under the same pinned link ([`Dataplane::attach_ingress`]
/// adopts the link: `BPF_LINK_UPDATE`), so an interface never goes from
/// filtered to unfiltered, and a crash in between leaves the bootstrap.
pub struct Bootstrap {
    ebpf: Ebpf,
    name: &'static str,
}

impl Bootstrap {
    /// Loads the variant that matches the full program `choice` will load
    /// (multi-buffer unless single-buffer is chosen or the kernel refuses
    /// multi-buffer), so the full program can take its link over.
    pub fn load(choice: XdpProgram) -> anyhow::Result<Self> {
        let mut ebpf = Ebpf::load(BOOTSTRAP_OBJECT).context("cannot load the bootstrap filter")?;
        let mut load = |name: &'static str| -> anyhow::Result<&'static str> {
            let prog = bootstrap_program(&mut ebpf, name)?;
            prog.load()
                .with_context(|| format!("the kernel refused program {name}"))?;
            Ok(name)
        };
        let name = match choice {
            XdpProgram::SingleBuffer => load(BOOTSTRAP_SINGLE)?,
            XdpProgram::Frags => load(BOOTSTRAP)?,
            XdpProgram::Auto => load(BOOTSTRAP).or_else(|_| load(BOOTSTRAP_SINGLE))?,
        };
        Ok(Self { ebpf, name })
    }

    /// The program loaded.
    pub fn program(&self) -> &'static str {
        self.name
    }

    /// Whether any of `interfaces` has no pinned ingress link yet (a fresh
    /// start, or a new interface): only then is the bootstrap loaded.
    pub fn needed(pin_dir: &Path, interfaces: &[String]) -> bool {
        interfaces
            .iter()
            .any(|i| !link_pin(pin_dir, "xdp", i).exists())
    }

    /// Runs the loaded bootstrap program once on `packet`
    /// (`BPF_PROG_TEST_RUN`), to compare it with the full program.
    pub fn test_run(&mut self, packet: &[u8]) -> anyhow::Result<super::testrun::Outcome> {
        use std::os::fd::AsFd as _;
        let name = self.name;
        let prog = bootstrap_program(&mut self.ebpf, name)?;
        Ok(super::testrun::run(prog.fd()?.as_fd(), packet, 1)?)
    }

    /// Attaches the bootstrap filter to `ifname` and pins its link where
    /// the ingress link goes (`links/xdp-<ifname>`). `false`, and nothing
    /// done, when a link is pinned there already: the interface carries an
    /// earlier daemon's program (or bootstrap), which stays until the full
    /// program replaces it.
    pub fn attach(&mut self, pin_dir: &Path, ifname: &str) -> anyhow::Result<bool> {
        let pin = link_pin(pin_dir, "xdp", ifname);
        if pin.exists() {
            return Ok(false);
        }
        ensure_bpffs(pin_dir)?;
        let links = pin_dir.join("links");
        fs::create_dir_all(&links)
            .with_context(|| format!("cannot create pin directory {}", links.display()))?;
        let name = self.name;
        let prog = bootstrap_program(&mut self.ebpf, name)?;
        attach_pinned(
            prog,
            ifname,
            name == BOOTSTRAP_SINGLE,
            &pin,
            "the bootstrap filter",
        )?;
        Ok(true)
    }
}

/// Program `name` of the bootstrap object, as XDP.
fn bootstrap_program<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut Xdp> {
    Ok(ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("program {name} missing from the bootstrap object"))?
        .try_into()?)
}

/// Attaches `prog` to `ifname` as a bpf_link and pins the link at `pin`.
/// A single-buffer program cannot run natively where frames do not fit a
/// page (jumbo MTUs): where native XDP refuses it, generic XDP still
/// filters. `what` names the program in errors.
fn attach_pinned(
    prog: &mut Xdp,
    ifname: &str,
    single_buffer: bool,
    pin: &Path,
    what: &str,
) -> anyhow::Result<()> {
    let c_name = CString::new(ifname).context("interface name contains NUL")?;
    let attach_error = || format!("cannot attach {what} to interface {ifname}");
    let link_id = match prog.attach(c_name.as_c_str(), XdpMode::default()) {
        Ok(id) => id,
        Err(e) if single_buffer => {
            warn!(interface = ifname, error = %e, program = what, "native XDP refused the single-buffer program; attaching in generic mode");
            prog.attach(c_name.as_c_str(), XdpMode::Skb)
                .with_context(attach_error)?
        }
        Err(e) => return Err(anyhow::Error::new(e)).with_context(attach_error),
    };
    let link: FdLink = prog
        .take_link(link_id)?
        .try_into()
        .map_err(|e: LinkError| anyhow!("interface {ifname}: XDP link is not a bpf_link: {e}"))?;
    link.pin(pin).with_context(|| {
        format!(
            "cannot pin the {what} link of {ifname} at {}",
            pin.display()
        )
    })?;
    Ok(())
}

/// A field of `/proc/self/fdinfo/<fd>` (`prog_tag`, `prog_id`).
fn fdinfo_field(fd: std::os::fd::BorrowedFd<'_>, key: &str) -> anyhow::Result<String> {
    use std::os::fd::AsRawFd as _;
    let path = format!("/proc/self/fdinfo/{}", fd.as_raw_fd());
    let text = fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .map(|v| v.trim().to_owned())
        .ok_or_else(|| anyhow!("no {key} in {path}"))
}

/// The kernel's tags (`prog_tag`: a hash of the instructions) of the
/// bootstrap programs this build loads: what tells a pinned link running
/// the bootstrap from one running a full program without enumerating the
/// kernel's programs (`BPF_PROG_GET_NEXT_ID` needs CAP_SYS_ADMIN, which the
/// systemd unit does not grant). Loading needs CAP_BPF. A bootstrap left by
/// another build (a crash in the window, then an upgrade) has another tag
/// and counts as a full program: it stays (closed) until a start replaces it.
pub struct BootstrapTags(Vec<String>);

impl BootstrapTags {
    /// Loads both bootstrap variants (the multi-buffer one only where the
    /// kernel takes it) and reads their tags.
    pub fn load() -> anyhow::Result<Self> {
        use std::os::fd::AsFd as _;
        let mut ebpf = Ebpf::load(BOOTSTRAP_OBJECT).context("cannot load the bootstrap filter")?;
        let mut tags = Vec::new();
        for name in [BOOTSTRAP, BOOTSTRAP_SINGLE] {
            let prog = bootstrap_program(&mut ebpf, name)?;
            if prog.load().is_err() {
                continue;
            }
            tags.push(fdinfo_field(prog.fd()?.as_fd(), "prog_tag")?);
        }
        if tags.is_empty() {
            bail!("the kernel refused both bootstrap programs");
        }
        Ok(Self(tags))
    }

    /// Whether the pinned XDP link of `ifname` runs the bootstrap filter;
    /// `None` when no link is pinned there.
    pub fn runs_on(&self, pin_dir: &Path, ifname: &str) -> anyhow::Result<Option<bool>> {
        self.runs_on_pin(&link_pin(pin_dir, "xdp", ifname))
    }

    /// [`BootstrapTags::runs_on`] for the link pinned at `pin`.
    fn runs_on_pin(&self, pin: &Path) -> anyhow::Result<Option<bool>> {
        use std::os::fd::AsFd as _;
        let fd = match sys::obj_get(pin) {
            Ok(fd) => fd,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot open {}", pin.display())),
        };
        let tag = fdinfo_field(fd.as_fd(), "prog_tag")
            .with_context(|| format!("the program of link {}", pin.display()))?;
        Ok(Some(self.0.contains(&tag)))
    }
}

/// The interfaces whose pinned XDP link runs the bootstrap filter (none if
/// that cannot be told: an error names why).
pub fn bootstrap_interfaces(pin_dir: &Path) -> anyhow::Result<Vec<String>> {
    let names = pinned_xdp_interfaces(pin_dir)?;
    if names.is_empty() {
        return Ok(names);
    }
    let tags = BootstrapTags::load()?;
    Ok(names
        .into_iter()
        .filter(|i| matches!(tags.runs_on(pin_dir, i), Ok(Some(true))))
        .collect())
}

/// The interfaces with a pinned XDP link (`links/xdp-<ifname>`), sorted.
fn pinned_xdp_interfaces(pin_dir: &Path) -> anyhow::Result<Vec<String>> {
    let links = pin_dir.join("links");
    let entries = match fs::read_dir(&links) {
        Ok(entries) => entries,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot list {}", links.display())),
    };
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_prefix("xdp-").map(str::to_owned)
        })
        .collect();
    names.sort();
    Ok(names)
}

/// A bootstrap link pinned under a name that is not a target, on the
/// interface (same ifindex) that an unpinned target names now (the
/// interface was renamed), is pinned again under the target's name, so the
/// full program replaces it there (a new attach would fail: EBUSY), with no
/// moment unfiltered. A link that cannot be checked or moved is logged and
/// the others are still done. Returns the (old, new) names.
pub fn repin_renamed_bootstraps(
    pin_dir: &Path,
    targets: &[String],
) -> anyhow::Result<Vec<(String, String)>> {
    let stale: Vec<String> = pinned_xdp_interfaces(pin_dir)?
        .into_iter()
        .filter(|i| !targets.contains(i))
        .collect();
    let unpinned: Vec<(u32, &String)> = targets
        .iter()
        .filter(|t| !link_pin(pin_dir, "xdp", t).exists())
        .filter_map(|t| Some((ifindex(t)?, t)))
        .collect();
    if stale.is_empty() || unpinned.is_empty() {
        return Ok(Vec::new());
    }
    let tags = BootstrapTags::load()?;
    let mut moved = Vec::new();
    for old in stale {
        match repin_renamed(&tags, pin_dir, &old, &unpinned) {
            Ok(Some(new)) => moved.push((old, new)),
            Ok(None) => {}
            Err(e) => {
                warn!(interface = %old, error = %format!("{e:#}"), "cannot check a bootstrap link pinned under a name that is not a target");
            }
        }
    }
    Ok(moved)
}

/// The index of interface `ifname` in this network namespace.
fn ifindex(ifname: &str) -> Option<u32> {
    let c_name = CString::new(ifname).ok()?;
    // SAFETY: `c_name` is a NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    (index != 0).then_some(index)
}

/// [`repin_renamed_bootstraps`] for the link pinned as `old`.
fn repin_renamed(
    tags: &BootstrapTags,
    pin_dir: &Path,
    old: &str,
    unpinned: &[(u32, &String)],
) -> anyhow::Result<Option<String>> {
    use std::os::fd::AsFd as _;
    let pin = link_pin(pin_dir, "xdp", old);
    let fd = sys::obj_get(&pin).with_context(|| format!("cannot open {}", pin.display()))?;
    if !tags.0.contains(&fdinfo_field(fd.as_fd(), "prog_tag")?) {
        return Ok(None);
    }
    let index: u32 = fdinfo_field(fd.as_fd(), "ifindex")?
        .parse()
        .with_context(|| format!("the ifindex of link {}", pin.display()))?;
    let Some((_, new)) = unpinned.iter().find(|(i, _)| *i == index) else {
        return Ok(None);
    };
    let to = link_pin(pin_dir, "xdp", new);
    fs::rename(&pin, &to)
        .with_context(|| format!("cannot move {} to {}", pin.display(), to.display()))?;
    Ok(Some((*new).clone()))
}

/// Detaches and unpins the links that still run the bootstrap filter,
/// except on `keep`: after a failed start once the nftables fallback is in
/// place (`keep` empty), so the fallback (which admits SSH) governs, as it
/// did before the bootstrap existed; after a successful start, those on
/// interfaces no longer configured (`keep`: the targets). Links running a
/// full program stay. A link that cannot be checked or removed is logged
/// and the others are still done. Returns the interfaces.
pub fn remove_bootstraps(pin_dir: &Path, keep: &[String]) -> anyhow::Result<Vec<String>> {
    let names: Vec<String> = pinned_xdp_interfaces(pin_dir)?
        .into_iter()
        .filter(|i| !keep.contains(i))
        .collect();
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let tags = BootstrapTags::load()?;
    let mut removed = Vec::new();
    for ifname in names {
        match remove_bootstrap(&tags, pin_dir, &ifname) {
            Ok(true) => removed.push(ifname),
            Ok(false) => {}
            Err(e) => {
                tracing::error!(interface = %ifname, error = %format!("{e:#}"), "cannot remove the bootstrap filter");
            }
        }
    }
    Ok(removed)
}

/// Detaches and unpins the XDP link of `ifname` if it runs the bootstrap.
fn remove_bootstrap(tags: &BootstrapTags, pin_dir: &Path, ifname: &str) -> anyhow::Result<bool> {
    if tags.runs_on(pin_dir, ifname)? != Some(true) {
        return Ok(false);
    }
    let path = link_pin(pin_dir, "xdp", ifname);
    detach_pinned_link(&path)
        .with_context(|| format!("cannot detach the bootstrap link {}", path.display()))?;
    fs::remove_file(&path).with_context(|| format!("cannot unpin {}", path.display()))?;
    Ok(true)
}
