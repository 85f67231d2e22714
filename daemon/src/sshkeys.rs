//! SSH key injection (`portcullis ssh add-key`): validate public keys and
//! merge them into a user's `authorized_keys`, atomically and idempotently,
//! never dropping keys that are already there. Run by root from the CLI, so
//! the daemon itself needs no rights over home directories.
//!
//! The home directory belongs to the user, who may plant symbolic links,
//! hard links or FIFOs there, or swap directories while root works. So:
//!
//! - every access runs on a dedicated thread that has become the user
//!   (supplementary groups, gid and uid set with raw system calls, which
//!   change only the calling thread's credentials; glibc's wrappers would
//!   change every thread's). The kernel then checks each access as it would
//!   for the user: nothing the user could not read or write themselves is
//!   read or written. A thread rather than a forked child because the CLI
//!   is multi-threaded (tokio) and a child forked from a threaded process
//!   may only call async-signal-safe functions; the thread ends with the
//!   write, and no other thread changes credentials. The change of uid also
//!   makes the process non-dumpable, so the user cannot ptrace it meanwhile.
//! - the path is walked from descriptors: the home directory (from the
//!   passwd entry) opened with `O_DIRECTORY|O_NOFOLLOW`, then `.ssh` and
//!   `authorized_keys` with `openat(O_NOFOLLOW)` relative to their parent's
//!   descriptor; each is `fstat`ed through its descriptor and must be a
//!   directory or a regular file owned by the user (the home: or by root).
//!   Files are opened `O_NONBLOCK`, so a FIFO or a device never blocks.
//! - the new file gets a random name, created `O_EXCL|O_NOFOLLOW` in the
//!   `.ssh` descriptor; `fchown`, `fchmod` and `fsync` on its descriptor,
//!   then `renameat` within the directory descriptor and an `fsync` of it.
//!
//! [`open_at`], [`open_for_sshd`] and [`read_bounded`] are also the
//! readiness check's walk (read-only, as root, never blocking).

use std::{
    ffi::CString,
    fs::File,
    io::{Read as _, Write as _},
    os::fd::{AsFd as _, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, anyhow, bail};
use base64::Engine as _;
use nix::{
    errno::Errno,
    fcntl::{AT_FDCWD, OFlag},
    sys::stat::{FileStat, Mode},
};

/// Key types accepted (DSA is refused: OpenSSH disabled it years ago).
const KEY_TYPES: &[&str] = &[
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];

/// A public key: its type and base64 blob identify it; the comment does not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicKey {
    pub kind: String,
    pub blob: String,
    pub comment: Option<String>,
}

impl PublicKey {
    /// Parses one `authorized_keys`-style line without options
    /// (`TYPE BASE64 [COMMENT]`), checking that the blob is well-formed
    /// base64 and encodes a key of the stated type.
    pub fn parse(line: &str) -> anyhow::Result<PublicKey> {
        let mut parts = line.split_whitespace();
        let kind = parts.next().context("empty key")?;
        if !KEY_TYPES.contains(&kind) {
            bail!(
                "{kind:?} is not a supported key type (expected one of {})",
                KEY_TYPES.join(", ")
            );
        }
        let blob = parts
            .next()
            .with_context(|| format!("{kind} key without its base64 part"))?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(blob)
            .with_context(|| format!("the {kind} key is not valid base64"))?;
        // The blob starts with the key type as an SSH string: u32 length, bytes.
        let inner = bytes
            .get(..4)
            .and_then(|l| <[u8; 4]>::try_from(l).ok())
            .map(|l| u32::from_be_bytes(l) as usize)
            .and_then(|n| bytes.get(4..4_usize.checked_add(n)?));
        if inner != Some(kind.as_bytes()) {
            bail!("the key's data does not encode a {kind} key (truncated or mislabelled?)");
        }
        let comment: Vec<&str> = parts.collect();
        Ok(PublicKey {
            kind: kind.to_string(),
            blob: blob.to_string(),
            comment: (!comment.is_empty()).then(|| comment.join(" ")),
        })
    }

    fn line(&self) -> String {
        match &self.comment {
            Some(c) => format!("{} {} {c}", self.kind, self.blob),
            None => format!("{} {}", self.kind, self.blob),
        }
    }

    /// Whether `line` (an existing `authorized_keys` line, perhaps with
    /// options in front) holds this key.
    fn is_in(&self, line: &str) -> bool {
        let words: Vec<&str> = line.split_whitespace().collect();
        words
            .windows(2)
            .any(|w| matches!(w, [kind, blob] if *kind == self.kind && *blob == self.blob))
    }
}

/// `existing` with the keys not already in it appended; existing lines are
/// kept as they are. Returns the new text and how many keys were added.
pub fn merge(existing: &str, keys: &[PublicKey]) -> (String, usize) {
    let mut out = existing.to_string();
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    let mut added = 0;
    for key in keys {
        if out.lines().any(|l| key.is_in(l)) {
            continue;
        }
        out.push_str(&key.line());
        out.push('\n');
        added += 1;
    }
    (out, added)
}

/// The largest `authorized_keys` read (sshd sets no bound; this one keeps a
/// user from making root read without end).
pub const MAX_KEYS_FILE: u64 = 4 << 20;

/// The file name sshd reads, in `~/.ssh`.
const AUTHORIZED_KEYS: &str = "authorized_keys";

/// What a walked path must be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
}

impl Kind {
    fn noun(self) -> &'static str {
        match self {
            Kind::Dir => "a directory",
            Kind::File => "a regular file",
        }
    }

    fn is(self, st: &FileStat) -> bool {
        let want = match self {
            Kind::Dir => libc::S_IFDIR,
            Kind::File => libc::S_IFREG,
        };
        st.st_mode & libc::S_IFMT == want
    }
}

/// What the mode says a file is, for messages.
fn what(mode: u32) -> &'static str {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => "a directory",
        libc::S_IFREG => "a regular file",
        libc::S_IFLNK => "a symbolic link",
        libc::S_IFIFO => "a FIFO (named pipe)",
        libc::S_IFSOCK => "a socket",
        libc::S_IFCHR => "a character device",
        libc::S_IFBLK => "a block device",
        _ => "of an unknown type",
    }
}

/// Who may own a walked path: the user, or also root.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub root_too: bool,
}

/// Opens `name` relative to `dir` (an absolute `name` with [`AT_FDCWD`])
/// without following a symbolic link at its last component and without
/// blocking on a special file, and checks, before opening and again through
/// the descriptor, that it is `kind` and owned by `owner`. `Ok(None)`:
/// nothing by that name. `shown` names it in errors.
pub fn open_at(
    dir: BorrowedFd<'_>,
    name: &Path,
    shown: &Path,
    kind: Kind,
    owner: Owner,
) -> Result<Option<(OwnedFd, FileStat)>, String> {
    // A look before opening: a symbolic link or special file is named as
    // such and not opened at all.
    let st = match nix::sys::stat::fstatat(dir, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(Errno::ENOENT) => return Ok(None),
        Err(e) => return Err(format!("cannot inspect {}: {e}", shown.display())),
    };
    if !kind.is(&st) {
        return Err(format!(
            "{} is {}, not {}; refusing to use it",
            shown.display(),
            what(st.st_mode),
            kind.noun()
        ));
    }
    owned_by(&st, shown, owner)?;
    // It may have been swapped since: O_NOFOLLOW refuses a link, O_NONBLOCK
    // keeps a FIFO from blocking, and the descriptor's own fstat decides.
    let mut flags = OFlag::O_RDONLY
        | OFlag::O_NOFOLLOW
        | OFlag::O_CLOEXEC
        | OFlag::O_NONBLOCK
        | OFlag::O_NOCTTY;
    if kind == Kind::Dir {
        flags |= OFlag::O_DIRECTORY;
    }
    let fd = match nix::fcntl::openat(dir, name, flags, Mode::empty()) {
        Ok(fd) => fd,
        Err(e @ (Errno::ELOOP | Errno::ENOTDIR)) => {
            // Swapped between the look and the open.
            let now = nix::sys::stat::fstatat(dir, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
                .map_or("gone", |st| what(st.st_mode));
            return Err(format!(
                "{} was replaced while being opened (now {now}: {e}); refusing to use it",
                shown.display(),
            ));
        }
        Err(e) => return Err(format!("cannot open {}: {e}", shown.display())),
    };
    let now = nix::sys::stat::fstat(&fd)
        .map_err(|e| format!("cannot inspect {}: {e}", shown.display()))?;
    if !kind.is(&now) || (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino) {
        return Err(format!(
            "{} was replaced while being opened (now {}); refusing to use it",
            shown.display(),
            what(now.st_mode)
        ));
    }
    owned_by(&now, shown, owner)?;
    Ok(Some((fd, now)))
}

/// Checks that `st` (of `shown`) is owned by `owner`.
fn owned_by(st: &FileStat, shown: &Path, owner: Owner) -> Result<(), String> {
    let Owner { uid, root_too } = owner;
    if st.st_uid == uid || (root_too && st.st_uid == 0) {
        return Ok(());
    }
    Err(format!(
        "{} is owned by uid {}, not by its user (uid {uid}){}; refusing to use it",
        shown.display(),
        st.st_uid,
        if root_too { " or root" } else { "" }
    ))
}

/// [`open_at`] with sshd's own demands (`StrictModes`): owned by `uid` or
/// root, not writable by group or others. The readiness check's walk.
pub fn open_for_sshd(
    dir: BorrowedFd<'_>,
    name: &Path,
    shown: &Path,
    kind: Kind,
    uid: u32,
) -> Result<OwnedFd, String> {
    let owner = Owner {
        uid,
        root_too: true,
    };
    let (fd, st) = open_at(dir, name, shown, kind, owner)?
        .ok_or_else(|| format!("{} does not exist", shown.display()))?;
    if st.st_mode & 0o022 != 0 {
        return Err(format!(
            "{} is writable by group or others (mode {:o}); sshd ignores such keys",
            shown.display(),
            st.st_mode & 0o7777
        ));
    }
    Ok(fd)
}

/// Reads a file opened by [`open_at`], at most [`MAX_KEYS_FILE`] bytes.
pub fn read_bounded(fd: OwnedFd, shown: &Path) -> Result<Vec<u8>, String> {
    let mut buf = Vec::new();
    File::from(fd)
        .take(MAX_KEYS_FILE + 1)
        .read_to_end(&mut buf)
        .map_err(|e| format!("cannot read {}: {e}", shown.display()))?;
    if buf.len() as u64 > MAX_KEYS_FILE {
        return Err(format!(
            "{} is larger than {} MiB; refusing to read it",
            shown.display(),
            MAX_KEYS_FILE >> 20
        ));
    }
    Ok(buf)
}

/// The account keys are written for: its passwd entry and groups.
#[derive(Clone, Debug)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (the primary group included).
    pub groups: Vec<u32>,
    pub home: PathBuf,
}

impl Account {
    pub fn lookup(user: &str) -> anyhow::Result<Account> {
        let u = nix::unistd::User::from_name(user)
            .with_context(|| format!("cannot look up user {user:?}"))?
            .with_context(|| format!("no user named {user:?}"))?;
        let name = CString::new(user).with_context(|| format!("user name {user:?} holds a NUL"))?;
        let groups = nix::unistd::getgrouplist(&name, u.gid)
            .with_context(|| format!("cannot list the groups of {user:?}"))?
            .into_iter()
            .map(|g| g.as_raw())
            .collect();
        Ok(Account {
            name: user.to_string(),
            uid: u.uid.as_raw(),
            gid: u.gid.as_raw(),
            groups,
            home: u.dir,
        })
    }
}

/// Adds `keys` to `user`'s `~/.ssh/authorized_keys`, as `user`: creates
/// `~/.ssh` (0700) and the file (0600) if missing, tightens `~/.ssh`'s mode,
/// replaces the file atomically, skips keys already there. Returns how many
/// keys were added.
pub fn add_keys(user: &str, keys: &[PublicKey]) -> anyhow::Result<usize> {
    add_keys_for(&Account::lookup(user)?, keys)
}

/// [`add_keys`] for an account already looked up.
pub fn add_keys_for(account: &Account, keys: &[PublicKey]) -> anyhow::Result<usize> {
    std::thread::scope(|s| {
        s.spawn(|| {
            become_user(account)?;
            write_keys(account, keys)
        })
        .join()
        .unwrap_or_else(|_| {
            Err(anyhow!(
                "writing the keys of {} failed (panic)",
                account.name
            ))
        })
    })
}

/// Makes the calling thread (only it) `account`: groups, gid, uid. There is
/// no way back, so it is called on a thread of its own.
fn become_user(account: &Account) -> anyhow::Result<()> {
    use nix::unistd::{getegid, geteuid};
    if geteuid().as_raw() == account.uid && getegid().as_raw() == account.gid {
        return Ok(()); // already the user (root for root)
    }
    let failed = |call: &str| {
        anyhow!(
            "cannot act as user {} ({call}: {}); add-key must run as root",
            account.name,
            Errno::last()
        )
    };
    let groups: Vec<libc::gid_t> = account.groups.clone();
    // SAFETY: the raw system call (glibc's setgroups would change every
    // thread); `groups` outlives the call and its length is passed with it.
    if unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) } != 0 {
        return Err(failed("setgroups"));
    }
    let (uid, gid) = (account.uid, account.gid);
    // SAFETY: raw system call with integer arguments, this thread only.
    if unsafe { libc::syscall(libc::SYS_setresgid, gid, gid, gid) } != 0 {
        return Err(failed("setresgid"));
    }
    // SAFETY: raw system call with integer arguments, this thread only.
    if unsafe { libc::syscall(libc::SYS_setresuid, uid, uid, uid) } != 0 {
        return Err(failed("setresuid"));
    }
    let ids = nix::unistd::getresuid()?;
    if [ids.real, ids.effective, ids.saved]
        .iter()
        .any(|u| u.as_raw() != uid)
    {
        bail!("could not become user {} (uid {uid})", account.name);
    }
    Ok(())
}

/// A name for the new file that nobody can have prepared.
fn temp_name() -> anyhow::Result<String> {
    let mut bytes = [0u8; 12];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("cannot read /dev/urandom")?;
    Ok(format!(
        ".authorized_keys.portcullis.{}",
        crate::model::hex(&bytes)
    ))
}

/// The walk and the write, on the thread that is the user.
fn write_keys(account: &Account, keys: &[PublicKey]) -> anyhow::Result<usize> {
    let (uid, gid) = (account.uid, account.gid);
    let home_path = &account.home;
    if !home_path.is_absolute() {
        bail!(
            "the home directory of {} ({}) is not an absolute path",
            account.name,
            home_path.display()
        );
    }
    let walk = |dir: BorrowedFd<'_>, name: &Path, shown: &Path, kind, root_too| {
        open_at(dir, name, shown, kind, Owner { uid, root_too }).map_err(anyhow::Error::msg)
    };
    let (home, _) = walk(AT_FDCWD, home_path, home_path, Kind::Dir, true)?.with_context(|| {
        format!(
            "the home directory of {}, {}, does not exist",
            account.name,
            home_path.display()
        )
    })?;

    let ssh_path = home_path.join(".ssh");
    let ssh_name = Path::new(".ssh");
    let (ssh, ssh_st) = match walk(home.as_fd(), ssh_name, &ssh_path, Kind::Dir, false)? {
        Some(found) => found,
        None => {
            nix::sys::stat::mkdirat(&home, ssh_name, Mode::S_IRWXU)
                .with_context(|| format!("cannot create {}", ssh_path.display()))?;
            walk(home.as_fd(), ssh_name, &ssh_path, Kind::Dir, false)?
                .with_context(|| format!("{} vanished as it was created", ssh_path.display()))?
        }
    };

    let file_path = ssh_path.join(AUTHORIZED_KEYS);
    let file_name = Path::new(AUTHORIZED_KEYS);
    let existing = match walk(ssh.as_fd(), file_name, &file_path, Kind::File, false)? {
        None => None,
        Some((fd, st)) => {
            let bytes = read_bounded(fd, &file_path).map_err(anyhow::Error::msg)?;
            let text = String::from_utf8(bytes).map_err(|_| {
                anyhow!(
                    "{} is not UTF-8 text; refusing to rewrite it",
                    file_path.display()
                )
            })?;
            Some((text, st))
        }
    };
    let (text, added) = merge(existing.as_ref().map_or("", |(t, _)| t.as_str()), keys);
    let file_ok = existing
        .as_ref()
        .is_some_and(|(_, st)| st.st_mode & 0o7777 == 0o600);
    if added > 0 || !file_ok {
        replace(&ssh, &file_path, text.as_bytes(), uid, gid)?;
    }
    if ssh_st.st_mode & 0o7777 != 0o700 {
        nix::sys::stat::fchmod(&ssh, Mode::S_IRWXU)
            .with_context(|| format!("cannot set the mode of {} to 0700", ssh_path.display()))?;
    }
    nix::unistd::fsync(&ssh).with_context(|| format!("cannot sync {}", ssh_path.display()))?;
    Ok(added)
}

/// Writes `text` under a fresh random name in `ssh` and renames it over
/// `authorized_keys`, all through the directory's descriptor.
fn replace(ssh: &OwnedFd, file_path: &Path, text: &[u8], uid: u32, gid: u32) -> anyhow::Result<()> {
    let flags = OFlag::O_WRONLY
        | OFlag::O_CREAT
        | OFlag::O_EXCL
        | OFlag::O_NOFOLLOW
        | OFlag::O_CLOEXEC
        | OFlag::O_NOCTTY
        | OFlag::O_NONBLOCK;
    let mode = Mode::S_IRUSR | Mode::S_IWUSR;
    let mut tries = 0;
    let (tmp, fd) = loop {
        let tmp = temp_name()?;
        match nix::fcntl::openat(ssh, tmp.as_str(), flags, mode) {
            Ok(fd) => break (tmp, fd),
            Err(Errno::EEXIST) if tries < 3 => tries += 1,
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("cannot create a new file next to {}", file_path.display())
                });
            }
        }
    };
    let written = (|| -> anyhow::Result<()> {
        nix::unistd::fchown(&fd, Some(uid.into()), Some(gid.into()))?;
        nix::sys::stat::fchmod(&fd, mode)?;
        let mut f = File::from(fd);
        f.write_all(text)?;
        f.sync_all()?;
        nix::fcntl::renameat(ssh, tmp.as_str(), ssh, AUTHORIZED_KEYS)?;
        Ok(())
    })();
    if let Err(e) = written {
        let _ = nix::unistd::unlinkat(ssh, tmp.as_str(), nix::unistd::UnlinkatFlags::NoRemoveDir);
        return Err(e).with_context(|| format!("cannot replace {}", file_path.display()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt as _;

    use super::*;

    /// A well-formed ed25519 public key blob (type string + 32 key bytes).
    fn key(seed: u8, comment: &str) -> String {
        let mut blob = Vec::new();
        blob.extend_from_slice(&11u32.to_be_bytes());
        blob.extend_from_slice(b"ssh-ed25519");
        blob.extend_from_slice(&32u32.to_be_bytes());
        blob.extend_from_slice(&[seed; 32]);
        format!(
            "ssh-ed25519 {} {comment}",
            base64::engine::general_purpose::STANDARD.encode(blob)
        )
    }

    #[test]
    fn validates_keys() {
        let k = PublicKey::parse(&key(1, "alice@laptop")).unwrap();
        assert_eq!(
            (k.kind.as_str(), k.comment.as_deref()),
            ("ssh-ed25519", Some("alice@laptop"))
        );
        for (bad, says) in [
            ("", "empty"),
            ("ssh-dss AAAAB3NzaC1kc3M=", "not a supported key type"),
            ("ssh-ed25519", "without its base64"),
            ("ssh-ed25519 !!!notbase64", "not valid base64"),
            (
                "ssh-rsa AAAAC3NzaC1lZDI1NTE5AAAA",
                "does not encode a ssh-rsa key",
            ),
            ("ssh-ed25519 AAAA", "does not encode"),
        ] {
            let e = PublicKey::parse(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
    }

    #[test]
    fn merge_keeps_existing_lines_and_skips_duplicates() {
        let existing = format!(
            "# managed elsewhere\nfrom=\"10.0.0.0/8\" {}\n{}",
            key(1, "old"),
            key(2, "other")
        );
        let keys = [
            PublicKey::parse(&key(1, "same key, new comment")).unwrap(),
            PublicKey::parse(&key(3, "new")).unwrap(),
            PublicKey::parse(&key(3, "new twice")).unwrap(),
        ];
        let (text, added) = merge(&existing, &keys);
        assert_eq!(added, 1);
        assert!(
            text.starts_with(&format!("{existing}\n")),
            "existing lines changed:\n{text}"
        );
        assert_eq!(text.lines().count(), 4);
        assert!(text.ends_with(&format!("{}\n", key(3, "new"))));
        // Idempotent.
        assert_eq!(merge(&text, &keys), (text.clone(), 0));
    }

    /// The current user, with its home at `home`.
    fn account_at(home: &Path) -> Account {
        Account {
            name: "test".into(),
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
            groups: vec![nix::unistd::getegid().as_raw()],
            home: home.to_path_buf(),
        }
    }

    #[test]
    fn writes_with_safe_modes_fixing_loose_ones() {
        use std::{fs, os::unix::fs::PermissionsExt as _};
        let home = tempfile::tempdir().unwrap();
        let ssh = home.path().join(".ssh");
        fs::create_dir(&ssh).unwrap();
        fs::set_permissions(&ssh, fs::Permissions::from_mode(0o777)).unwrap();
        fs::write(ssh.join("authorized_keys"), key(1, "kept")).unwrap();
        fs::set_permissions(
            ssh.join("authorized_keys"),
            fs::Permissions::from_mode(0o666),
        )
        .unwrap();
        let me = account_at(home.path());
        let added = add_keys_for(&me, &[PublicKey::parse(&key(2, "new")).unwrap()]).unwrap();
        assert_eq!(added, 1);
        let text = fs::read_to_string(ssh.join("authorized_keys")).unwrap();
        assert!(text.contains("kept") && text.contains("new"));
        assert_eq!(fs::metadata(&ssh).unwrap().mode() & 0o777, 0o700);
        assert_eq!(
            fs::metadata(ssh.join("authorized_keys")).unwrap().mode() & 0o777,
            0o600
        );
        assert_eq!(
            add_keys_for(&me, &[PublicKey::parse(&key(2, "again")).unwrap()]).unwrap(),
            0
        );
        assert_eq!(
            fs::read_to_string(ssh.join("authorized_keys")).unwrap(),
            text
        );
        // Only the file is left in ~/.ssh (no temporary file).
        assert_eq!(fs::read_dir(&ssh).unwrap().count(), 1);

        // A symlinked .ssh is refused, and nothing is written through it.
        let other = tempfile::tempdir().unwrap();
        let linked = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(other.path(), linked.path().join(".ssh")).unwrap();
        let e = add_keys_for(
            &account_at(linked.path()),
            &[PublicKey::parse(&key(3, "x")).unwrap()],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains(".ssh is a symbolic link"), "{e}");
        assert_eq!(fs::read_dir(other.path()).unwrap().count(), 0);
    }

    #[test]
    fn creates_ssh_and_refuses_special_files_without_blocking() {
        use std::fs;
        let home = tempfile::tempdir().unwrap();
        let me = account_at(home.path());
        let k = PublicKey::parse(&key(4, "fresh")).unwrap();
        assert_eq!(add_keys_for(&me, std::slice::from_ref(&k)).unwrap(), 1);
        let ssh = home.path().join(".ssh");
        assert_eq!(fs::metadata(&ssh).unwrap().mode() & 0o7777, 0o700);
        assert_eq!(
            fs::read_to_string(ssh.join("authorized_keys")).unwrap(),
            format!("{}\n", key(4, "fresh"))
        );

        // A FIFO: refused at once, named, left as it was.
        fs::remove_file(ssh.join("authorized_keys")).unwrap();
        nix::unistd::mkfifo(&ssh.join("authorized_keys"), Mode::S_IRUSR | Mode::S_IWUSR).unwrap();
        let e = add_keys_for(&me, &[k]).unwrap_err().to_string();
        assert!(
            e.contains("authorized_keys is a FIFO (named pipe), not a regular file"),
            "{e}"
        );
        assert_eq!(fs::read_dir(&ssh).unwrap().count(), 1);

        // sshd's checks: a group-writable file is named.
        let file = home.path().join("f");
        fs::write(&file, "x").unwrap();
        nix::sys::stat::fchmodat(
            AT_FDCWD,
            &file,
            Mode::from_bits_truncate(0o620),
            nix::sys::stat::FchmodatFlags::FollowSymlink,
        )
        .unwrap();
        let uid = nix::unistd::geteuid().as_raw();
        let e = open_for_sshd(AT_FDCWD, &file, &file, Kind::File, uid).unwrap_err();
        assert!(e.contains("writable by group or others (mode 620)"), "{e}");
        let e = open_for_sshd(
            AT_FDCWD,
            &ssh.join("authorized_keys"),
            Path::new("k"),
            Kind::File,
            uid,
        )
        .unwrap_err();
        assert!(e.contains("k is a FIFO"), "{e}");
    }
}
