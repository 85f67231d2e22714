//! One daemon per pin directory, state directory and API socket.
//!
//! The data plane remembers what it last wrote to each generation's maps
//! and skips writes of tables that are already there (`mapio::Held`); the
//! core owns the state files and the audit log's hash chain. Both assume
//! they are the only writer. A second `portcullisd` started on the same
//! directories (by hand beside the service, or a unit copied with the same
//! paths) would rewrite the live maps under the first and fork its audit
//! chain. Each directory is therefore claimed with an exclusive `flock`
//! held for the life of the process: the kernel drops it when the process
//! dies however it dies (SIGKILL included), so a stale claim cannot block a
//! restart, and a refused daemon touches nothing (no fallback either: the
//! holder enforces).
//!
//! The lock is not on the directory itself: anyone who can open a
//! directory can `flock` it, and a local user holding the claim would keep
//! the firewall from starting. It is on a root-only file (0600, in a
//! root-only directory) named after the directory's canonical path, which
//! only root can open and so lock. The API socket is claimed the same way
//! (a second daemon would unlink the first one's to bind its own).
//!
//! The lock files are in `/run`, which is per mount namespace: a daemon in
//! a container with a `/run` of its own and the host's bpffs is not seen.

use std::{
    fs::File,
    os::unix::fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use nix::fcntl::{Flock, FlockArg};
use sha2::{Digest as _, Sha256};

/// Where the lock files are (the unit's `RuntimeDirectory`).
pub const LOCK_DIR: &str = "/run/portcullis";

/// How long a start waits for the claim: a daemon that was just killed or
/// told to stop may still be exiting (systemd waits for it, a person
/// typing the command again does not).
pub const WAIT: Duration = Duration::from_secs(5);

/// The directories this process holds (released when dropped, or when the
/// process ends).
#[derive(Debug)]
pub struct Instance {
    _held: Vec<Flock<File>>,
}

/// Why the directories could not be claimed.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    /// Another process holds one of them: a daemon that enforces there, so
    /// this one must leave everything as it is.
    #[error(
        "{} is in use by another portcullisd{} (it holds {}): stop that one first, or give this daemon a pin directory, a state directory and a --socket of its own",
        .path.display(),
        .holder.map(|p| format!(", pid {p}")).unwrap_or_default(),
        .lock.display()
    )]
    Held {
        path: PathBuf,
        lock: PathBuf,
        holder: Option<u32>,
    },
    /// The lock file cannot be made or opened.
    #[error("cannot claim {}: {what}", .path.display())]
    Io { path: PathBuf, what: String },
}

impl Instance {
    /// Claims each of `paths` (directories or the socket; they need not
    /// exist) with a lock file in `lock_dir`, waiting up to `wait` for a
    /// holder to go away. Paths that are one place are claimed once.
    pub fn claim(paths: &[&Path], lock_dir: &Path, wait: Duration) -> Result<Instance, ClaimError> {
        let deadline = Instant::now() + wait;
        let mut held = Vec::with_capacity(paths.len());
        let mut names: Vec<String> = Vec::with_capacity(paths.len());
        for &path in paths {
            let name = lock_name(&resolved(path));
            if names.contains(&name) {
                continue;
            }
            let lock = lock_dir.join(&name);
            held.push(claim_one(path, &lock, deadline)?);
            names.push(name);
        }
        Ok(Instance { _held: held })
    }
}

/// Where `path` really is: canonical when it exists, else its parent's
/// canonical path and its name (the directory is made later, by its
/// owner), else `path` as given.
fn resolved(path: &Path) -> PathBuf {
    if let Ok(real) = std::fs::canonicalize(path) {
        return real;
    }
    match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) => std::fs::canonicalize(parent)
            .map(|p| p.join(name))
            .unwrap_or_else(|_| path.to_owned()),
        _ => path.to_owned(),
    }
}

fn claim_one(path: &Path, lock: &Path, deadline: Instant) -> Result<Flock<File>, ClaimError> {
    let io = |what: String| ClaimError::Io {
        path: path.to_owned(),
        what,
    };
    let mut file = open_lock(lock).map_err(|e| io(format!("{}: {e}", lock.display())))?;
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(held) => return Ok(held),
            Err((back, nix::errno::Errno::EWOULDBLOCK)) if Instant::now() < deadline => {
                file = back;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err((back, nix::errno::Errno::EWOULDBLOCK)) => {
                return Err(ClaimError::Held {
                    path: path.to_owned(),
                    lock: lock.to_owned(),
                    holder: holder(&back),
                });
            }
            Err((_, errno)) => return Err(io(format!("{}: {errno}", lock.display()))),
        }
    }
}

/// The lock file at `path`, never through a link: opened read-only when it
/// exists (a `flock` needs no more, and a read-only `/run` still tells a
/// held claim), else made 0600 (its directory 0755: the API socket may be
/// there too). Refused unless it is a regular file of this user's nobody
/// else may open, in a directory nobody else may write (else someone else
/// could hold the claim, or swap the file).
fn open_lock(path: &Path) -> std::io::Result<File> {
    let open = || {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
    };
    let file = match open() {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent() {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o755)
                    .create(dir)?;
            }
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(path)
            {
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => open()?,
                made => made?,
            }
        }
        opened => opened?,
    };
    let meta = file.metadata()?;
    let dir = std::fs::metadata(path.parent().unwrap_or(path))?;
    let me = nix::unistd::geteuid().as_raw();
    let why = if !meta.is_file() {
        "not a regular file"
    } else if meta.uid() != me {
        "owned by another user"
    } else if meta.mode() & 0o077 != 0 {
        "others may open it"
    } else if dir.uid() != me || dir.mode() & 0o022 != 0 {
        "in a directory others may write"
    } else {
        return Ok(file);
    };
    Err(std::io::Error::other(format!(
        "{why}: remove it and start again"
    )))
}

/// A file name for `path` (resolved): its last component (readable, at
/// most 64 bytes) and a SHA-256 of the whole path, so two paths never
/// share one and no name is too long.
fn lock_name(path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt as _;
    let last: String = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    let digest = Sha256::digest(path.as_os_str().as_bytes());
    let hex: String = digest.iter().take(12).map(|b| format!("{b:02x}")).collect();
    format!("{last}-{hex}.lock")
}

/// The pid holding a `flock` on `file`, from `/proc/locks` (for the error
/// message only: `None` when it cannot be told, as under the unit's
/// `ProcSubset=pid`).
fn holder(file: &File) -> Option<u32> {
    let meta = file.metadata().ok()?;
    let dev = meta.dev();
    let id = format!(
        "{:02x}:{:02x}:{}",
        nix::sys::stat::major(dev),
        nix::sys::stat::minor(dev),
        meta.ino()
    );
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    holder_in(&locks, &id)
}

/// The pid of the FLOCK line of `locks` (`/proc/locks`) on `id`
/// (`major:minor:inode`, hex device numbers as the kernel prints them).
fn holder_in(locks: &str, id: &str) -> Option<u32> {
    locks.lines().find_map(|line| {
        // "1: FLOCK  ADVISORY  WRITE 1234 00:1f:5678 0 EOF"; a waiter's
        // line has "->" after the number, and holds nothing.
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            [_, "FLOCK", _, "WRITE", pid, at, ..] if *at == id => pid.parse().ok(),
            _ => None,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dirs() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let top = tempfile::tempdir().unwrap();
        let (pins, locks) = (top.path().join("pins"), top.path().join("locks"));
        (top, pins, locks)
    }

    #[test]
    fn a_second_claim_is_refused_until_the_first_is_dropped() {
        let (_top, pins, locks) = dirs();
        let first = Instance::claim(&[&pins], &locks, WAIT).unwrap();
        let err = Instance::claim(&[&pins], &locks, Duration::ZERO).unwrap_err();
        let ClaimError::Held { path, lock, holder } = &err else {
            panic!("{err}");
        };
        assert_eq!(path, &pins);
        assert!(lock.starts_with(&locks), "{err}");
        assert_eq!(*holder, Some(std::process::id()), "{err}");
        assert!(
            err.to_string().contains("in use by another portcullisd"),
            "{err}"
        );
        drop(first);
        Instance::claim(&[&pins], &locks, Duration::ZERO).unwrap();
    }

    #[test]
    fn a_link_to_a_claimed_directory_is_the_same_directory() {
        let (top, pins, locks) = dirs();
        std::fs::create_dir(&pins).unwrap();
        let _first = Instance::claim(&[&pins], &locks, WAIT).unwrap();
        let link = top.path().join("link");
        std::os::unix::fs::symlink(&pins, &link).unwrap();
        let err = Instance::claim(&[&link], &locks, Duration::ZERO).unwrap_err();
        assert!(matches!(err, ClaimError::Held { .. }), "{err}");
    }

    /// A pin directory and a state directory that are one place are
    /// claimed once: the daemon does not refuse itself.
    #[test]
    fn one_place_named_twice_is_claimed_once() {
        let (top, pins, locks) = dirs();
        std::fs::create_dir(&pins).unwrap();
        let link = top.path().join("link");
        std::os::unix::fs::symlink(&pins, &link).unwrap();
        Instance::claim(&[&pins, &link, &pins], &locks, Duration::ZERO).unwrap();
    }

    #[test]
    fn a_claim_waits_for_a_holder_that_goes_away() {
        let (_top, pins, locks) = dirs();
        let first = Instance::claim(&[&pins], &locks, WAIT).unwrap();
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            drop(first);
        });
        Instance::claim(&[&pins], &locks, WAIT).unwrap();
        release.join().unwrap();
    }

    /// A lock file others could open (so lock) is not trusted, nor one in a
    /// directory others may write, nor a link put where it goes.
    #[test]
    fn lock_files_others_could_open_or_swap_or_links_are_refused() {
        use std::os::unix::fs::PermissionsExt as _;
        let (top, pins, locks) = dirs();
        std::fs::create_dir_all(&locks).unwrap();
        let name = locks.join(lock_name(&resolved(&pins)));
        std::fs::write(&name, "").unwrap();
        std::fs::set_permissions(&name, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = Instance::claim(&[&pins], &locks, Duration::ZERO).unwrap_err();
        assert!(err.to_string().contains("others may open it"), "{err}");
        std::fs::set_permissions(&name, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::set_permissions(&locks, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = Instance::claim(&[&pins], &locks, Duration::ZERO).unwrap_err();
        assert!(err.to_string().contains("others may write"), "{err}");
        std::fs::set_permissions(&locks, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::remove_file(&name).unwrap();
        std::os::unix::fs::symlink(top.path().join("elsewhere"), &name).unwrap();
        let err = Instance::claim(&[&pins], &locks, Duration::ZERO).unwrap_err();
        assert!(matches!(err, ClaimError::Io { .. }), "{err}");
        assert!(!top.path().join("elsewhere").exists());
    }

    #[test]
    fn lock_names_are_short_readable_and_apart() {
        let name = lock_name(Path::new("/sys/fs/bpf/portcullis"));
        assert!(
            name.starts_with("portcullis-") && name.ends_with(".lock"),
            "{name}"
        );
        assert_ne!(lock_name(Path::new("/a-b")), lock_name(Path::new("/a/b")));
        let long = format!("/{}", "x-".repeat(500));
        assert!(lock_name(Path::new(&long)).len() < 100);
    }

    #[test]
    fn proc_locks_lines_name_their_holder() {
        let locks = "1: POSIX  ADVISORY  WRITE 77 00:1f:42 0 EOF\n\
                     2: FLOCK  ADVISORY  WRITE 1234 00:1f:42 0 EOF\n\
                     2: -> FLOCK  ADVISORY  WRITE 99 00:1f:42 0 EOF\n";
        assert_eq!(holder_in(locks, "00:1f:42"), Some(1234));
        assert_eq!(holder_in(locks, "00:1f:43"), None);
    }
}
