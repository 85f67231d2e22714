//! One daemon per pin directory and state directory.
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
//! only root can open and so lock.

use std::{
    fs::File,
    os::unix::fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use nix::fcntl::{Flock, FlockArg};

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
    /// Another process holds one of them: it enforces, so this one must
    /// leave everything as it is.
    #[error(
        "another portcullisd{} holds {}: it enforces the rules there; stop it first (systemctl stop portcullis), or give this daemon a pin directory and a state directory of its own",
        .holder.map(|p| format!(" (pid {p})")).unwrap_or_default(),
        .dir.display()
    )]
    Held { dir: PathBuf, holder: Option<u32> },
    /// The directory, or its lock file, cannot be made or opened.
    #[error("cannot claim {}: {what}", .dir.display())]
    Io { dir: PathBuf, what: String },
}

impl Instance {
    /// Claims each of `dirs` (made when missing) with a lock file in
    /// `lock_dir`, waiting up to `wait` for a holder to go away.
    pub fn claim(dirs: &[&Path], lock_dir: &Path, wait: Duration) -> Result<Instance, ClaimError> {
        let deadline = Instant::now() + wait;
        let mut held = Vec::with_capacity(dirs.len());
        for &dir in dirs {
            held.push(claim_one(dir, lock_dir, deadline)?);
        }
        Ok(Instance { _held: held })
    }
}

fn claim_one(dir: &Path, lock_dir: &Path, deadline: Instant) -> Result<Flock<File>, ClaimError> {
    let io = |what: String| ClaimError::Io {
        dir: dir.to_owned(),
        what,
    };
    let make = |d: &Path, mode: u32| {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(mode)
            .create(d)
            .map_err(|e| io(format!("cannot make {}: {e}", d.display())))
    };
    make(dir, 0o700)?;
    // Searchable: the API socket may be in there too (its own mode and
    // the lock files' keep others out of each).
    make(lock_dir, 0o755)?;
    // Named after where the directory really is: a link to it is the same
    // directory.
    let canonical = std::fs::canonicalize(dir).map_err(|e| io(e.to_string()))?;
    let path = lock_dir.join(lock_name(&canonical));
    let mut file = open_lock(&path).map_err(|e| io(format!("{}: {e}", path.display())))?;
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(lock),
            Err((back, nix::errno::Errno::EWOULDBLOCK)) if Instant::now() < deadline => {
                file = back;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err((back, nix::errno::Errno::EWOULDBLOCK)) => {
                return Err(ClaimError::Held {
                    dir: dir.to_owned(),
                    holder: holder(&back),
                });
            }
            Err((_, errno)) => return Err(io(format!("{}: {errno}", path.display()))),
        }
    }
}

/// The lock file at `path`: made 0600 when missing, never through a link,
/// and refused unless it is a regular file of this user's that nobody else
/// may open (else someone else could hold the claim).
fn open_lock(path: &Path) -> std::io::Result<File> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    let meta = file.metadata()?;
    let me = nix::unistd::geteuid().as_raw();
    let why = if !meta.is_file() {
        "not a regular file"
    } else if meta.uid() != me {
        "owned by another user"
    } else if meta.mode() & 0o077 != 0 {
        "others may open it"
    } else if std::fs::metadata(path.parent().unwrap_or(path))?.uid() != me {
        "in a directory of another user's"
    } else {
        return Ok(file);
    };
    Err(std::io::Error::other(format!(
        "{why}: remove it and start again"
    )))
}

/// A file name for `dir` (absolute): its path with `/` as `-` (and `-` as
/// `\x2d`, as systemd escapes paths), so two directories never share one.
fn lock_name(dir: &Path) -> String {
    let mut name = String::new();
    for c in dir.to_string_lossy().trim_start_matches('/').chars() {
        match c {
            '/' => name.push('-'),
            '-' | '\\' => name.push_str(&format!("\\x{:02x}", c as u32)),
            c => name.push(c),
        }
    }
    name + ".lock"
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
        let ClaimError::Held { dir: at, holder } = &err else {
            panic!("{err}");
        };
        assert_eq!(at, &pins);
        assert_eq!(*holder, Some(std::process::id()), "{err}");
        assert!(err.to_string().contains("another portcullisd"), "{err}");
        drop(first);
        Instance::claim(&[&pins], &locks, Duration::ZERO).unwrap();
    }

    #[test]
    fn a_link_to_a_claimed_directory_is_the_same_directory() {
        let (top, pins, locks) = dirs();
        let _first = Instance::claim(&[&pins], &locks, WAIT).unwrap();
        let link = top.path().join("link");
        std::os::unix::fs::symlink(&pins, &link).unwrap();
        let err = Instance::claim(&[&link], &locks, Duration::ZERO).unwrap_err();
        assert!(matches!(err, ClaimError::Held { .. }), "{err}");
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

    /// A lock file others could open (so lock) is not trusted, nor a link
    /// put where it goes.
    #[test]
    fn lock_files_others_could_open_or_links_are_refused() {
        use std::os::unix::fs::PermissionsExt as _;
        let (top, pins, locks) = dirs();
        std::fs::create_dir_all(&pins).unwrap();
        std::fs::create_dir_all(&locks).unwrap();
        let name = locks.join(lock_name(&std::fs::canonicalize(&pins).unwrap()));
        std::fs::write(&name, "").unwrap();
        std::fs::set_permissions(&name, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = Instance::claim(&[&pins], &locks, Duration::ZERO).unwrap_err();
        assert!(err.to_string().contains("others may open it"), "{err}");
        std::fs::remove_file(&name).unwrap();
        std::os::unix::fs::symlink(top.path().join("elsewhere"), &name).unwrap();
        let err = Instance::claim(&[&pins], &locks, Duration::ZERO).unwrap_err();
        assert!(matches!(err, ClaimError::Io { .. }), "{err}");
        assert!(!top.path().join("elsewhere").exists());
    }

    #[test]
    fn lock_names_keep_paths_apart() {
        assert_eq!(
            lock_name(Path::new("/sys/fs/bpf/portcullis")),
            "sys-fs-bpf-portcullis.lock"
        );
        assert_ne!(lock_name(Path::new("/a-b")), lock_name(Path::new("/a/b")));
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
