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
//! Anyone who can open a directory can `flock` it. A claim held by a
//! process that is not root is therefore not a daemon's and does not count:
//! the start goes on without it (warned), so an unprivileged user holding a
//! lock cannot keep the firewall from starting after a reboot. Directories
//! this makes are 0700, which such a user cannot open in the first place.

use std::{
    fs::File,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use nix::fcntl::{Flock, FlockArg};

/// How long a start waits for the claim: a daemon that was just killed or
/// told to stop may still be exiting (systemd waits for it, a person
/// typing the command again does not).
pub const WAIT: Duration = Duration::from_secs(5);

/// The directories this process holds (released when dropped, or when the
/// process ends).
#[derive(Debug)]
pub struct Instance {
    _held: Vec<Flock<File>>,
    /// Directories whose lock a process that is not root holds: the start
    /// went on without it (the daemon logs these).
    pub ignored: Vec<(PathBuf, u32)>,
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
    /// The directory cannot be made or opened.
    #[error("cannot claim {}: {source}", .dir.display())]
    Io {
        dir: PathBuf,
        source: std::io::Error,
    },
}

impl Instance {
    /// Claims each of `dirs` (made when missing), waiting up to `wait` for
    /// a holder to go away.
    pub fn claim(dirs: &[&Path], wait: Duration) -> Result<Instance, ClaimError> {
        let deadline = Instant::now() + wait;
        let mut instance = Instance {
            _held: Vec::with_capacity(dirs.len()),
            ignored: Vec::new(),
        };
        for &dir in dirs {
            match claim_one(dir, deadline)? {
                Ok(lock) => instance._held.push(lock),
                Err(pid) => instance.ignored.push((dir.to_owned(), pid)),
            }
        }
        Ok(instance)
    }
}

/// Who holds a directory's lock, from `/proc`.
#[derive(Debug, PartialEq, Eq)]
enum Holder {
    Root(u32),
    /// A process that is not root: no daemon (see the module's doc).
    Unprivileged(u32),
    Unknown,
}

/// `dir`'s lock, or the pid of the unprivileged process that holds it.
fn claim_one(dir: &Path, deadline: Instant) -> Result<Result<Flock<File>, u32>, ClaimError> {
    use std::os::unix::fs::DirBuilderExt as _;
    let io = |source| ClaimError::Io {
        dir: dir.to_owned(),
        source,
    };
    if !dir.is_dir() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io)?;
    }
    // A directory opened read-only: flock needs no write access, and the
    // lock is on the directory itself (bpffs has no room for a lock file).
    let mut file = File::open(dir).map_err(io)?;
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(Ok(lock)),
            Err((back, nix::errno::Errno::EWOULDBLOCK)) => {
                let holder = holder(&back);
                if let Holder::Unprivileged(pid) = holder {
                    return Ok(Err(pid));
                }
                if Instant::now() >= deadline {
                    return Err(ClaimError::Held {
                        dir: dir.to_owned(),
                        holder: match holder {
                            Holder::Root(pid) => Some(pid),
                            _ => None,
                        },
                    });
                }
                file = back;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err((_, errno)) => return Err(io(errno.into())),
        }
    }
}

/// The process holding a `flock` on `file`: its pid from `/proc/locks`,
/// its effective uid from `/proc/<pid>/status`.
fn holder(file: &File) -> Holder {
    let Some(pid) = holder_pid(file) else {
        return Holder::Unknown;
    };
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    match effective_uid(&status) {
        Some(0) => Holder::Root(pid),
        Some(_) => Holder::Unprivileged(pid),
        None => Holder::Unknown,
    }
}

/// The effective uid in a `/proc/<pid>/status` text ("Uid: real effective
/// saved fs").
fn effective_uid(status: &str) -> Option<u32> {
    let line = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The pid holding a `flock` on `file`, from `/proc/locks`.
fn holder_pid(file: &File) -> Option<u32> {
    use std::os::unix::fs::MetadataExt as _;
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

    #[test]
    fn a_second_claim_is_refused_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let pins = dir.path().join("pins");
        let first = Instance::claim(&[&pins], WAIT).unwrap();
        let err = Instance::claim(&[&pins], Duration::ZERO).unwrap_err();
        let ClaimError::Held { dir: at, holder } = &err else {
            panic!("{err}");
        };
        assert_eq!(at, &pins);
        assert_eq!(*holder, Some(std::process::id()), "{err}");
        assert!(err.to_string().contains("another portcullisd"), "{err}");
        drop(first);
        Instance::claim(&[&pins], Duration::ZERO).unwrap();
    }

    #[test]
    fn a_claim_waits_for_a_holder_that_goes_away() {
        let dir = tempfile::tempdir().unwrap();
        let first = Instance::claim(&[dir.path()], WAIT).unwrap();
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            drop(first);
        });
        Instance::claim(&[dir.path()], WAIT).unwrap();
        release.join().unwrap();
    }

    #[test]
    fn a_lock_held_by_an_unprivileged_process_does_not_count() {
        let dir = tempfile::tempdir().unwrap();
        let shared = dir.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        // World-readable: any user can open it, and so flock it.
        for d in [dir.path(), &shared] {
            std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                .unwrap();
        }
        if !nix::unistd::geteuid().is_root()
            || std::process::Command::new("setpriv")
                .arg("--help")
                .output()
                .is_err()
        {
            eprintln!("skipped: needs root and setpriv");
            return;
        }
        let mut user = std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "flock"])
            .arg(&shared)
            .args(["sleep", "30"])
            .spawn()
            .unwrap();
        let deadline = Instant::now() + WAIT;
        let claim = loop {
            let claim = Instance::claim(&[&shared], WAIT).unwrap();
            if !claim.ignored.is_empty() || Instant::now() > deadline {
                break claim;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let _ = user.kill();
        let _ = user.wait();
        assert_eq!(claim.ignored.len(), 1, "{claim:?}");
        assert_eq!(claim.ignored[0].0, shared);
    }

    #[test]
    fn status_files_give_the_effective_uid() {
        let status = "Name:\tflock\nUid:\t1000\t0\t0\t0\nGid:\t0\t0\t0\t0\n";
        assert_eq!(effective_uid(status), Some(0));
        assert_eq!(effective_uid("Uid:\t0\t65534\t0\t0\n"), Some(65534));
        assert_eq!(effective_uid("Name: x\n"), None);
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
