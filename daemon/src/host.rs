//! Host probes the daemon makes when it starts: which bpffs to pin under,
//! which groups exist, and handing freed memory back. The configuration
//! only describes; asking the host what it has happens here, on the side
//! that starts the daemon (issue 16: the pure side is pure).

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

use crate::config::{self, ApiConfig, Config};

/// What the configuration means on this host.
pub trait ConfigProbes {
    /// The pin directory: configured, or the default for this host.
    fn pin_dir(&self) -> PathBuf;
}

impl ConfigProbes for Config {
    fn pin_dir(&self) -> PathBuf {
        if let Some(dir) = self.configured_pin_dir() {
            return dir.to_path_buf();
        }
        if is_bpffs(Path::new("/sys/fs/bpf")) || !is_bpffs(Path::new(config::FALLBACK_BPFFS)) {
            PathBuf::from(config::DEFAULT_PIN_DIR)
        } else {
            Path::new(config::FALLBACK_BPFFS).join("portcullis")
        }
    }
}

/// The API's groups on this host.
pub trait ApiProbes {
    /// The writers' group id, checked to exist.
    fn writers_gid(&self) -> anyhow::Result<Option<u32>>;
    /// The readers' group id, checked to exist.
    fn readers_gid(&self) -> anyhow::Result<Option<u32>>;
}

impl ApiProbes for ApiConfig {
    fn writers_gid(&self) -> anyhow::Result<Option<u32>> {
        group_id("group", self.group.as_deref())
    }

    fn readers_gid(&self) -> anyhow::Result<Option<u32>> {
        group_id("reader_group", self.reader_group.as_deref())
    }
}

fn group_id(key: &str, name: Option<&str>) -> anyhow::Result<Option<u32>> {
    let Some(name) = name else {
        return Ok(None);
    };
    match nix::unistd::Group::from_name(name)? {
        Some(g) => Ok(Some(g.gid.as_raw())),
        None => bail!("api: {key}: no group named {name:?} on this host"),
    }
}

/// bpffs's magic number (statfs f_type).
const BPF_FS_MAGIC: i64 = 0xcafe4a11;

fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
}

/// Buffers at least this large get their own mapping from the allocator,
/// returned to the kernel as soon as they are freed.
const MMAP_THRESHOLD: libc::c_int = 1 << 20;

/// Fixes glibc's mmap threshold at [`MMAP_THRESHOLD`]. Left to itself the
/// threshold rises to 32 MiB after the first large buffer is freed, and a
/// 100k-rule compile's buffers (some made on compile's second thread, in a
/// second arena) then stay in the arenas as fragments: the settled RSS after
/// a 100k-rule replace was 112-295 MiB from one run to the next, and 98-100
/// MiB with the threshold fixed (peak 566 -> 315 MiB).
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes the allocator's tuning; it is called
    // before any other thread exists and touches no live allocation.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
}

/// Hands the memory a compile freed back to the system: a large rule set's
/// intermediate buffers would otherwise stay in the allocator's arenas and
/// in the daemon's RSS until the next change reuses them.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap pages to the kernel; it has
    // no preconditions and touches no live allocation.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Refuses the pin directory and its `dirs` (those that exist) unless
/// they are root's (a link to one included): a bpffs mounted without
/// `mode=` is world-writable (1777), and a pin directory a local user made
/// first would let that user unpin the links (and so end enforcement) or
/// put other objects where the daemon looks. One of ours that group or
/// others may write (a umask) loses that write permission.
pub fn secure_pin_dirs(pin_dir: &Path, dirs: &[PathBuf]) -> anyhow::Result<()> {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    let why = "the pins that enforce the rules live there";
    for dir in std::iter::once(pin_dir).chain(dirs.iter().map(PathBuf::as_path)) {
        let link = match std::fs::symlink_metadata(dir) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", dir.display())),
        };
        let meta =
            std::fs::metadata(dir).with_context(|| format!("cannot read {}", dir.display()))?;
        let me = nix::unistd::geteuid().as_raw();
        for m in [&link, &meta] {
            if m.uid() != 0 && m.uid() != me {
                bail!(
                    "{} is owned by uid {}, not root: {why}, so only root may write it; remove it and start again",
                    dir.display(),
                    m.uid()
                );
            }
        }
        if meta.mode() & 0o022 != 0 {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(meta.mode() & 0o7755))
                .with_context(|| format!("cannot restrict {}", dir.display()))?;
        }
    }
    Ok(())
}
