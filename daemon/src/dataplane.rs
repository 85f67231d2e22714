//! Everything that touches the kernel: load the eBPF object, attach it, pin
//! it, adopt what an earlier daemon pinned, and write the policy maps.
//!
//! Pin layout under the configured directory:
//!
//! ```text
//! <pin_dir>/maps/VERDICTS        per-CPU verdict counters
//! <pin_dir>/maps/PORT_CLASS      (protocol, port) -> class
//! <pin_dir>/maps/SETTINGS        global switches
//! <pin_dir>/links/xdp-<ifname>   the XDP link of one interface
//! ```
//!
//! The links hold the programs and the programs hold the maps, so as long as
//! the pins exist the host stays protected, whether or not a daemon runs.

use std::{
    ffi::CString,
    fs,
    io::ErrorKind,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, MapData, PerCpuArray},
    programs::{
        Xdp, XdpMode,
        links::{FdLink, LinkError, PinnedLink},
        xdp::XdpLink,
    },
};
use portcullis_common::{
    Counter, PORT_CLASS_ENTRIES, Reason, SETTING_SSH, Settings, maps, port_index, programs,
};
use tracing::{info, warn};

use crate::config::Config;

/// The compiled eBPF object, built by `build.rs`.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/portcullis"));

/// What the data path enforces, derived from the configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub settings: Settings,
    /// One entry per `port_index`; non-zero admits the port.
    pub port_class: Vec<u32>,
}

impl Policy {
    pub fn from_config(config: &Config) -> Self {
        let mut port_class = vec![0u32; PORT_CLASS_ENTRIES as usize];
        for (l4, from, to) in config.rule_set().admitted_ports() {
            for port in from..=to {
                port_class[port_index(l4, port) as usize] = 1;
            }
        }
        let flags = if config.ssh.allow { SETTING_SSH } else { 0 };
        Policy {
            settings: Settings {
                flags,
                _reserved: 0,
            },
            port_class,
        }
    }
}

/// How an interface came to be protected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attach {
    /// A new XDP link was created and pinned.
    New,
    /// The pinned link of an earlier daemon was kept; the new program was
    /// swapped in under it atomically.
    Adopted,
}

/// The loaded eBPF object with its maps pinned under `pin_dir/maps`.
pub struct Dataplane {
    ebpf: Ebpf,
    pin_dir: PathBuf,
}

impl Dataplane {
    /// Loads the programs, reusing maps already pinned under `pin_dir` (so
    /// counters and rules survive a restart) and pinning new ones otherwise.
    pub fn load(pin_dir: &Path) -> anyhow::Result<Self> {
        ensure_bpffs(pin_dir)?;
        let maps_dir = pin_dir.join("maps");
        for dir in [&maps_dir, &pin_dir.join("links")] {
            fs::create_dir_all(dir)
                .with_context(|| format!("cannot create pin directory {}", dir.display()))?;
        }
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&maps_dir)
            .load(EBPF_OBJECT)
            .with_context(|| {
                format!(
                    "cannot load the eBPF programs (maps pinned under {})",
                    maps_dir.display()
                )
            })?;
        let prog = ingress(&mut ebpf)?;
        prog.load()
            .with_context(|| format!("the kernel refused program {}", programs::INGRESS))?;
        Ok(Self {
            ebpf,
            pin_dir: pin_dir.to_owned(),
        })
    }

    /// Writes the policy maps. Entries that already hold the wanted value are
    /// left alone, so a restarted daemon with the same config changes nothing.
    pub fn write_policy(&mut self, policy: &Policy) -> anyhow::Result<()> {
        let mut settings: Array<_, Settings> =
            Array::try_from(map_mut(&mut self.ebpf, maps::SETTINGS)?)?;
        settings
            .set(0, &policy.settings, 0)
            .context("writing SETTINGS")?;

        let mut ports: Array<_, u32> = Array::try_from(map_mut(&mut self.ebpf, maps::PORT_CLASS)?)?;
        let mut changed = 0usize;
        for (index, want) in policy.port_class.iter().enumerate() {
            let index = index as u32;
            if ports.get(&index, 0).context("reading PORT_CLASS")? != *want {
                ports.set(index, want, 0).context("writing PORT_CLASS")?;
                changed += 1;
            }
        }
        info!(changed, "port table written");
        Ok(())
    }

    /// Protects `ifname`: adopts its pinned link if there is one, attaches and
    /// pins a new link otherwise.
    pub fn enforce(&mut self, ifname: &str) -> anyhow::Result<Attach> {
        let pin = link_pin(&self.pin_dir, ifname);
        let prog = ingress(&mut self.ebpf)?;
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
        let c_name = CString::new(ifname).context("interface name contains NUL")?;
        let link_id = prog
            .attach(c_name.as_c_str(), XdpMode::default())
            .with_context(|| format!("cannot attach XDP to interface {ifname}"))?;
        let link: FdLink = prog
            .take_link(link_id)?
            .try_into()
            .map_err(|e: LinkError| {
                anyhow!("interface {ifname}: XDP link is not a bpf_link: {e}")
            })?;
        link.pin(&pin)
            .with_context(|| format!("cannot pin the XDP link of {ifname} at {}", pin.display()))?;
        Ok(Attach::New)
    }
}

fn adopt(prog: &mut Xdp, pin: &Path) -> anyhow::Result<()> {
    let pinned = PinnedLink::from_pin(pin)?;
    let link = XdpLink::try_from(FdLink::from(pinned))?;
    let id = prog.attach_to_link(link)?;
    // Dropping our handle closes the fd; the pin keeps the link alive.
    drop(prog.take_link(id)?);
    Ok(())
}

fn ingress(ebpf: &mut Ebpf) -> anyhow::Result<&mut Xdp> {
    let prog = ebpf
        .program_mut(programs::INGRESS)
        .ok_or_else(|| anyhow!("program {} missing from the eBPF object", programs::INGRESS))?;
    Ok(prog.try_into()?)
}

fn map_mut<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut aya::maps::Map> {
    ebpf.map_mut(name)
        .ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))
}

fn link_pin(pin_dir: &Path, ifname: &str) -> PathBuf {
    pin_dir.join("links").join(format!("xdp-{ifname}"))
}

/// Refuses a pin directory that is not on a bpffs: pins elsewhere fail with
/// an obscure error, and a tmpfs would silently lose them.
fn ensure_bpffs(pin_dir: &Path) -> anyhow::Result<()> {
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

/// Reads the verdict counters from the pinned map, summed over CPUs.
pub fn read_counters(pin_dir: &Path) -> anyhow::Result<Vec<(Reason, Counter)>> {
    let path = pin_dir.join("maps").join(maps::VERDICTS);
    let data = MapData::from_pin(&path).with_context(|| {
        format!(
            "no pinned counters at {} (is Portcullis enforcing?)",
            path.display()
        )
    })?;
    let counters: PerCpuArray<_, Counter> =
        PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data))?;
    Reason::ALL
        .iter()
        .map(|&reason| {
            let per_cpu = counters.get(&(reason as u32), 0)?;
            let sum = per_cpu.iter().fold(Counter::default(), |acc, c| Counter {
                packets: acc.packets + c.packets,
                bytes: acc.bytes + c.bytes,
            });
            Ok((reason, sum))
        })
        .collect()
}

/// Removes every link and map pinned under `pin_dir`, which detaches the
/// programs: the explicit way to stop enforcing.
pub fn detach_all(pin_dir: &Path) -> anyhow::Result<usize> {
    let mut removed = 0;
    let links = pin_dir.join("links");
    match fs::read_dir(&links) {
        Ok(entries) => {
            for entry in entries {
                let path = entry?.path();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_marks_exactly_the_admitted_ports() {
        let config = Config::parse(
            "interfaces = [\"x\"]\nssh = { allow = true }\n[[ingress_rules]]\nid = \"a\"\nfrom_port = 80\nto_port = 82\nprotocol = \"udp\"\n",
        )
        .unwrap();
        let p = Policy::from_config(&config);
        assert_eq!(p.settings.flags, SETTING_SSH);
        let admitted: Vec<_> = (0..PORT_CLASS_ENTRIES)
            .filter(|&i| p.port_class[i as usize] != 0)
            .collect();
        let udp = |port| port_index(portcullis_common::L4::Udp, port);
        assert_eq!(admitted, vec![udp(80), udp(81), udp(82)]);
    }
}
