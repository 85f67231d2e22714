//! Attacks on SSH key injection (`portcullis ssh add-key`) and on the
//! readiness check of the SSH user's `authorized_keys`, by a local user who
//! owns the home directory root writes into: symbolic links and hard links
//! planted where root reads or writes, a FIFO where a regular file belongs,
//! and `~/.ssh` swapped for a symbolic link while `add-key` runs. Each test
//! creates a real throw-away user (`useradd -m`, removed with `userdel -r`
//! on drop) and runs the real `portcullis` binary (and, for readiness, the
//! real daemon in a network namespace).

use std::{
    ffi::CString,
    fs,
    io::Read as _,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use portcullis_tests::*;

/// A liveness bound on one `add-key` (a hang is a failure, not a slow run).
const LIVENESS: Duration = Duration::from_secs(10);

/// A well-formed ed25519 public key line.
fn key(seed: u8, comment: &str) -> String {
    let mut blob = Vec::new();
    blob.extend_from_slice(&11u32.to_be_bytes());
    blob.extend_from_slice(b"ssh-ed25519");
    blob.extend_from_slice(&32u32.to_be_bytes());
    blob.extend_from_slice(&[seed; 32]);
    let mut b64 = String::new();
    // Standard base64 without a dependency: the test's own tiny encoder.
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    for chunk in blob.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                b64.push('=');
            }
        }
    }
    format!("ssh-ed25519 {b64} {comment}")
}

/// A real user with a home directory, removed (with its home) on drop.
struct TestUser {
    name: String,
    uid: u32,
    gid: u32,
    home: PathBuf,
}

impl TestUser {
    fn new() -> TestUser {
        let name = unique("pk");
        run(Command::new("useradd").args(["-m", "-s", "/bin/sh", &name])).unwrap();
        let entry = nix::unistd::User::from_name(&name)
            .unwrap()
            .expect("the user just created");
        TestUser {
            uid: entry.uid.as_raw(),
            gid: entry.gid.as_raw(),
            home: entry.dir,
            name,
        }
    }

    fn ssh(&self) -> PathBuf {
        self.home.join(".ssh")
    }

    /// Runs `sh -c SCRIPT` as this user (the attacker's own actions).
    fn sh(&self, script: &str) -> Output {
        Command::new("setpriv")
            .args([
                &format!("--reuid={}", self.uid),
                &format!("--regid={}", self.gid),
                "--init-groups",
                "--reset-env",
                "sh",
                "-c",
                script,
            ])
            .current_dir(&self.home)
            .output()
            .unwrap()
    }

    /// Like [`TestUser::sh`], failing the test when the script fails.
    fn must(&self, script: &str) {
        let out = self.sh(script);
        assert!(
            out.status.success(),
            "as {}: {script}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let out = Command::new("userdel")
            .args(["-r", &self.name])
            .output()
            .expect("userdel");
        if !out.status.success() {
            eprintln!(
                "userdel -r {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            );
            let _ = fs::remove_dir_all(&self.home);
        }
    }
}

/// What `add-key` did: its output, or that it did not return in time.
enum Outcome {
    Exited(Output),
    Hung,
}

/// `portcullis ssh add-key --user USER KEY` as root, killed after
/// [`LIVENESS`].
fn add_key(user: &str, key: &str) -> Outcome {
    let mut child = Command::new(workspace_bin("portcullis").unwrap())
        .args(["ssh", "add-key", "--user", user, key])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + LIVENESS;
    loop {
        if child.try_wait().unwrap().is_some() {
            return Outcome::Exited(child.wait_with_output().unwrap());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Outcome::Hung;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A root-owned file or directory the attack aims at, and what it was.
struct Victim {
    _dir: tempfile::TempDir,
    path: PathBuf,
    before: Snapshot,
}

#[derive(Debug, PartialEq, Eq)]
struct Snapshot {
    uid: u32,
    gid: u32,
    mode: u32,
    ino: u64,
    content: Vec<u8>,
    entries: Vec<String>,
}

fn snapshot(path: &Path) -> Snapshot {
    let m = fs::symlink_metadata(path).unwrap();
    let (content, entries) = if m.is_dir() {
        let mut names: Vec<String> = fs::read_dir(path)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        (Vec::new(), names)
    } else {
        (fs::read(path).unwrap(), Vec::new())
    };
    Snapshot {
        uid: m.uid(),
        gid: m.gid(),
        mode: m.mode(),
        ino: m.ino(),
        content,
        entries,
    }
}

impl Victim {
    /// A root-owned regular file with `content` and `mode`, in a directory
    /// every user can search (so a link to it from a home resolves).
    fn file(content: &str, mode: u32) -> Victim {
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let path = dir.path().join("victim");
        fs::write(&path, content).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        let before = snapshot(&path);
        Victim {
            _dir: dir,
            path,
            before,
        }
    }

    /// A root-owned, empty directory (0755).
    fn dir() -> Victim {
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let path = dir.path().join("victim.d");
        fs::create_dir(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        let before = snapshot(&path);
        Victim {
            _dir: dir,
            path,
            before,
        }
    }

    fn assert_unchanged(&self, context: &str) {
        assert_eq!(
            snapshot(&self.path),
            self.before,
            "{context}: the root-owned {} changed",
            self.path.display()
        );
        assert_eq!(self.before.uid, 0);
    }
}

/// Every regular file under `dir` (not following symbolic links).
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir(dir) else {
        return out;
    };
    for e in rd {
        let e = e.unwrap();
        let t = e.file_type().unwrap();
        if t.is_dir() {
            out.extend(files_under(&e.path()));
        } else if t.is_file() {
            out.push(e.path());
        }
    }
    out
}

/// After a successful `add-key`: the key is in a regular file owned by the
/// user, mode 0600, in a `.ssh` owned by the user, mode 0700.
fn assert_written(user: &TestUser, key_line: &str) {
    let ssh = fs::symlink_metadata(user.ssh()).unwrap();
    assert!(ssh.is_dir(), "~/.ssh is not a directory");
    assert_eq!((ssh.uid(), ssh.mode() & 0o7777), (user.uid, 0o700));
    let path = user.ssh().join("authorized_keys");
    let m = fs::symlink_metadata(&path).unwrap();
    assert!(m.is_file(), "{} is not a regular file", path.display());
    assert_eq!((m.uid(), m.mode() & 0o7777), (user.uid, 0o600));
    let text = fs::read_to_string(&path).unwrap();
    assert!(text.contains(key_line), "the key is missing:\n{text}");
}

#[test]
fn add_key_for_a_fresh_user_is_safe_and_idempotent() {
    require_root!();
    let user = TestUser::new();
    let k = key(1, "fresh");
    let Outcome::Exited(out) = add_key(&user.name, &k) else {
        panic!("add-key hung")
    };
    assert!(out.status.success(), "{}", stderr(&out));
    assert_written(&user, &k);
    let Outcome::Exited(out) = add_key(&user.name, &k) else {
        panic!("add-key hung")
    };
    assert!(out.status.success(), "{}", stderr(&out));
    let text = fs::read_to_string(user.ssh().join("authorized_keys")).unwrap();
    assert_eq!(text, format!("{k}\n"), "not idempotent");
    // Nothing else (no temporary file) is left behind.
    let names: Vec<_> = fs::read_dir(user.ssh())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["authorized_keys"]);
}

#[test]
fn symlinked_temp_name_does_not_overwrite_a_root_file() {
    require_root!();
    let victim = Victim::file("root's data\n", 0o644);
    let user = TestUser::new();
    user.must(&format!(
        "mkdir -m 700 .ssh && ln -s {} .ssh/.authorized_keys.portcullis.tmp",
        victim.path.display()
    ));
    let k = key(2, "tmp-link");
    let Outcome::Exited(out) = add_key(&user.name, &k) else {
        panic!("add-key hung")
    };
    victim.assert_unchanged("symlink at the temporary name");
    if out.status.success() {
        assert_written(&user, &k);
    } else {
        assert!(!stderr(&out).trim().is_empty(), "failed without a reason");
    }
}

#[test]
fn symlinked_authorized_keys_is_refused() {
    require_root!();
    let victim = Victim::file("root's secret\n", 0o600);
    let user = TestUser::new();
    user.must(&format!(
        "mkdir -m 700 .ssh && ln -s {} .ssh/authorized_keys",
        victim.path.display()
    ));
    let Outcome::Exited(out) = add_key(&user.name, &key(3, "ak-link")) else {
        panic!("add-key hung")
    };
    victim.assert_unchanged("symlink at authorized_keys");
    let err = stderr(&out);
    assert!(!out.status.success(), "add-key wrote through a symlink");
    assert!(
        err.contains("authorized_keys") && err.contains("symbolic link"),
        "unclear error: {err}"
    );
    assert!(
        fs::symlink_metadata(user.ssh().join("authorized_keys"))
            .unwrap()
            .file_type()
            .is_symlink(),
        "the refused link was changed"
    );
}

#[test]
fn symlinked_ssh_dir_is_refused() {
    require_root!();
    let victim = Victim::dir();
    let user = TestUser::new();
    user.must(&format!("ln -s {} .ssh", victim.path.display()));
    let Outcome::Exited(out) = add_key(&user.name, &key(4, "ssh-link")) else {
        panic!("add-key hung")
    };
    victim.assert_unchanged("~/.ssh as a symlink");
    let err = stderr(&out);
    assert!(!out.status.success(), "add-key wrote through a symlink");
    assert!(
        err.contains(".ssh") && err.contains("symbolic link"),
        "unclear error: {err}"
    );
}

#[test]
fn hard_link_of_a_root_file_at_authorized_keys() {
    require_root!();
    const SECRET: &str = "root-only-secret-3f9c1\n";
    let victim = Victim::file(SECRET, 0o600);
    let user = TestUser::new();
    user.must("mkdir -m 700 .ssh");
    let link = user.ssh().join("authorized_keys");
    // The attacker's own attempt: fs.protected_hardlinks=1 refuses a user a
    // link to a root file they cannot read and write; where that sysctl is
    // 0, the link is made. Root makes it here to stand for that case (same
    // file system: the home and the temporary directory are both on /).
    let by_user = user.sh(&format!(
        "ln {} .ssh/authorized_keys",
        victim.path.display()
    ));
    if !by_user.status.success() {
        eprintln!(
            "the user cannot make the hard link ({}); making it as root",
            stderr(&by_user).trim()
        );
        fs::hard_link(&victim.path, &link).expect("hard link on the same file system");
    }
    let victim_links = fs::metadata(&victim.path).unwrap().nlink();
    assert_eq!(victim_links, 2);
    let Outcome::Exited(out) = add_key(&user.name, &key(5, "hardlink")) else {
        panic!("add-key hung")
    };
    // The victim's content, owner and mode are unchanged, and none of it
    // reached a file the user can read.
    let now = fs::metadata(&victim.path).unwrap();
    assert_eq!(fs::read_to_string(&victim.path).unwrap(), SECRET);
    assert_eq!(
        (now.uid(), now.mode()),
        (victim.before.uid, victim.before.mode)
    );
    for f in files_under(&user.home) {
        let m = fs::metadata(&f).unwrap();
        if m.ino() == victim.before.ino {
            continue; // the link itself, still root's and 0600
        }
        let text = fs::read_to_string(&f).unwrap_or_default();
        assert!(
            !text.contains(SECRET.trim()),
            "root's secret was copied into {} (owner {}, mode {:o})",
            f.display(),
            m.uid(),
            m.mode() & 0o7777
        );
    }
    let err = stderr(&out);
    assert!(
        !out.status.success(),
        "add-key accepted a root-owned authorized_keys"
    );
    assert!(
        err.contains("authorized_keys") && err.contains("owned by"),
        "unclear error: {err}"
    );
}

#[test]
fn fifo_at_authorized_keys_does_not_hang_add_key() {
    require_root!();
    let user = TestUser::new();
    user.must("mkdir -m 700 .ssh && mkfifo -m 600 .ssh/authorized_keys");
    let started = Instant::now();
    let out = match add_key(&user.name, &key(6, "fifo")) {
        Outcome::Exited(out) => out,
        Outcome::Hung => panic!(
            "add-key still blocked on the FIFO after {} s",
            started.elapsed().as_secs()
        ),
    };
    let err = stderr(&out);
    assert!(!out.status.success(), "add-key accepted a FIFO");
    assert!(
        err.contains("authorized_keys") && err.contains("FIFO"),
        "unclear error: {err}"
    );
    let names: Vec<_> = fs::read_dir(user.ssh())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["authorized_keys"], "something was written");
    let m = fs::symlink_metadata(user.ssh().join("authorized_keys")).unwrap();
    use std::os::unix::fs::FileTypeExt as _;
    assert!(m.file_type().is_fifo(), "the FIFO was replaced");
}

#[test]
fn readiness_names_a_fifo_at_authorized_keys_promptly() {
    require_root!();
    let user = TestUser::new();
    let pair = Pair::new().unwrap();
    let pins = PinDir::new().unwrap();
    let config = ConfigFile::new(&config_text(
        &pins,
        &format!("[readiness]\nssh_user = \"{}\"\n", user.name),
    ))
    .unwrap();
    let _daemon = Daemon::start(&pair.host, &config).unwrap();
    user.must("mkdir -m 700 .ssh && mkfifo -m 600 .ssh/authorized_keys");
    let ask = || {
        let out = Command::new("curl")
            .args(["-s", "--max-time", "10", "--unix-socket"])
            .arg(config.socket())
            .arg("http://portcullis/v1/ready")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "/v1/ready did not answer within 10 s (curl {}): the readiness check is blocked",
            out.status
        );
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let check = doc["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "authorized_keys")
            .cloned()
            .expect("an authorized_keys check");
        (doc["ready"].clone(), check)
    };
    let (ready, check) = ask();
    assert_eq!(ready, false);
    assert_eq!(check["state"], "fail", "{check}");
    let reason = check["detail"].as_str().unwrap_or_default();
    assert!(
        reason.contains("authorized_keys") && reason.contains("FIFO"),
        "unclear reason: {check}"
    );
    // A second request answers too (nothing is left blocked).
    let (_, again) = ask();
    assert_eq!(again, check);

    // A symbolic link and a wrong owner are named as well.
    fs::remove_file(user.ssh().join("authorized_keys")).unwrap();
    let victim = Victim::file(&format!("{}\n", key(7, "root")), 0o644);
    user.must(&format!(
        "ln -s {} .ssh/authorized_keys",
        victim.path.display()
    ));
    let (_, check) = ask();
    let reason = check["detail"].as_str().unwrap_or_default();
    assert!(reason.contains("symbolic link"), "{check}");
    fs::remove_file(user.ssh().join("authorized_keys")).unwrap();
    user.must(&format!(
        "printf '%s\\n' '{}' > .ssh/authorized_keys && chmod 600 .ssh/authorized_keys",
        key(8, "u")
    ));
    let (_, check) = ask();
    assert_eq!(check["state"], "pass", "{check}");
    fs::set_permissions(user.ssh(), fs::Permissions::from_mode(0o777)).unwrap();
    let (_, check) = ask();
    let reason = check["detail"].as_str().unwrap_or_default();
    assert!(
        check["state"] == "fail" && reason.contains(".ssh") && reason.contains("writable"),
        "{check}"
    );
    victim.assert_unchanged("readiness");
}

/// `renameat2(RENAME_EXCHANGE)` of two names in `dir`, as `uid`/`gid`.
struct Swapper {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<u64>>,
}

impl Swapper {
    /// Swaps `a` and `b` (in `dir`) until stopped, on a thread that is the
    /// user (its own credentials, set with raw system calls so that only
    /// this thread changes).
    fn start(uid: u32, gid: u32, dir: &Path, a: &str, b: &str) -> Swapper {
        let stop = Arc::new(AtomicBool::new(false));
        let (dir, a, b) = (
            CString::new(dir.as_os_str().as_encoded_bytes()).unwrap(),
            CString::new(a).unwrap(),
            CString::new(b).unwrap(),
        );
        let flag = stop.clone();
        let thread = thread::spawn(move || {
            // SAFETY: plain system calls with integer arguments; they change
            // only this thread's credentials (not glibc's all-thread wrappers).
            unsafe {
                assert_eq!(
                    libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<u32>()),
                    0
                );
                assert_eq!(libc::syscall(libc::SYS_setresgid, gid, gid, gid), 0);
                assert_eq!(libc::syscall(libc::SYS_setresuid, uid, uid, uid), 0);
            }
            // SAFETY: `dir` is a valid C string; the descriptor is closed below.
            let fd = unsafe { libc::open(dir.as_ptr(), libc::O_DIRECTORY | libc::O_CLOEXEC) };
            assert!(fd >= 0, "cannot open the home directory as the user");
            let mut swaps = 0u64;
            while !flag.load(Ordering::Relaxed) {
                // SAFETY: `fd` is open and the names are valid C strings.
                let r = unsafe {
                    libc::renameat2(fd, a.as_ptr(), fd, b.as_ptr(), libc::RENAME_EXCHANGE)
                };
                if r == 0 {
                    swaps += 1;
                }
            }
            // SAFETY: `fd` was opened above and is closed once.
            unsafe { libc::close(fd) };
            swaps
        });
        Swapper {
            stop,
            thread: Some(thread),
        }
    }

    fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for Swapper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn swapping_ssh_dir_for_a_symlink_during_add_key_never_reaches_root_files() {
    require_root!();
    let victim = Victim::dir();
    let target = Victim::file("root's data\n", 0o644);
    let user = TestUser::new();
    // `.ssh` a real directory (with a link planted at the temporary name
    // too), `swap` a symbolic link to the root-owned directory; the user's
    // thread exchanges the two names as fast as it can.
    user.must(&format!(
        "mkdir -m 755 .ssh && ln -s {} .ssh/.authorized_keys.portcullis.tmp && ln -s {} swap",
        target.path.display(),
        victim.path.display()
    ));
    let swapper = Swapper::start(user.uid, user.gid, &user.home, ".ssh", "swap");
    let (mut ok, mut refused) = (0, 0);
    let mut reasons = std::collections::BTreeSet::new();
    for i in 0..200u8 {
        match add_key(&user.name, &key(i, "race")) {
            Outcome::Exited(out) if out.status.success() => ok += 1,
            Outcome::Exited(out) => {
                refused += 1;
                let err = stderr(&out);
                assert!(!err.trim().is_empty(), "failed without a reason");
                reasons.insert(err.lines().next().unwrap_or_default().to_string());
            }
            Outcome::Hung => panic!("add-key hung during the race"),
        }
        if snapshot(&victim.path) != victim.before {
            break;
        }
    }
    let swaps = swapper.stop();
    eprintln!("{swaps} swaps; add-key: {ok} succeeded, {refused} refused: {reasons:?}");
    assert!(swaps > 0, "the race never swapped anything");
    victim.assert_unchanged("~/.ssh swapped for a symlink");
    target.assert_unchanged("~/.ssh swapped for a symlink");
    // Whichever name holds the real directory now, what add-key wrote in it
    // is the user's.
    for f in files_under(&user.home) {
        let m = fs::metadata(&f).unwrap();
        assert_eq!(m.uid(), user.uid, "{} is not the user's", f.display());
    }
    let mut buf = String::new();
    if let Ok(mut f) = fs::File::open(victim.path.join("authorized_keys")) {
        f.read_to_string(&mut buf).unwrap();
        panic!("a file was written in the root-owned directory: {buf}");
    }
}
