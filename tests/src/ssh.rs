//! A real sshd in a namespace, and SSH sessions to it.

use std::{
    fs,
    io::Write as _,
    path::Path,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::ensure;

use crate::*;

/// A real sshd listening on port 22 in a namespace, accepting one key for root.
pub struct Sshd {
    child: Child,
    dir: tempfile::TempDir,
}

impl Sshd {
    pub fn start(ns: &Netns) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let d = dir.path();
        for key in ["host_key", "client_key"] {
            run(Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(d.join(key)))?;
        }
        fs::copy(d.join("client_key.pub"), d.join("authorized_keys"))?;
        fs::create_dir_all("/run/sshd")?;
        let config = format!(
            "Port 22\nListenAddress 0.0.0.0\nListenAddress ::\nHostKey {0}/host_key\n\
             AuthorizedKeysFile {0}/authorized_keys\nPermitRootLogin prohibit-password\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n\
             StrictModes no\nPidFile none\n",
            d.display()
        );
        fs::write(d.join("sshd_config"), config)?;
        let child = ns
            .command("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(d.join("sshd_config"))
            .stdout(Stdio::null())
            .stderr(fs::File::create(d.join("sshd.log"))?)
            .spawn()?;
        let sshd = Sshd { child, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ns.ip(&["-br", "addr"]).is_ok_and(|_| {
            run(ns.command("ss").args(["-Hltn", "sport", "=", ":22"]))
                .is_ok_and(|o| !o.trim().is_empty())
        }) {
            ensure!(Instant::now() < deadline, "sshd did not start listening");
            thread::sleep(Duration::from_millis(50));
        }
        Ok(sshd)
    }

    /// An `ssh` command from `ns` to `addr` with the accepted key.
    pub fn client(&self, ns: &Netns, addr: &str) -> Command {
        ssh_command(
            ns,
            &self.dir.path().join("client_key"),
            &format!("root@{addr}"),
        )
    }
}

/// `ssh` from `ns` to `target` (`user@addr`) with only the key at `key`,
/// never prompting, trusting any host key, giving up after 3 s.
pub fn ssh_command(ns: &Netns, key: &Path, target: &str) -> Command {
    let mut cmd = ns.command("ssh");
    cmd.arg("-i")
        .arg(key)
        .args([
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "ConnectTimeout=3",
            "-o",
            "LogLevel=ERROR",
        ])
        .arg(target);
    cmd
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An interactive ssh session running `cat` on the other side.
pub struct SshSession {
    child: Child,
    stdin: std::process::ChildStdin,
    stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl SshSession {
    pub fn open(sshd: &Sshd, ns: &Netns, addr: &str) -> anyhow::Result<Self> {
        let mut child = sshd
            .client(ns, addr)
            .arg("cat")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let stdin = child.stdin.take().context("ssh stdin")?;
        let stdout = std::io::BufReader::new(child.stdout.take().context("ssh stdout")?);
        let mut s = SshSession {
            child,
            stdin,
            stdout,
        };
        s.roundtrip("hello")?;
        Ok(s)
    }

    /// Sends a line and waits (at most 5 s) for it to come back.
    pub fn roundtrip(&mut self, line: &str) -> anyhow::Result<()> {
        use std::io::BufRead as _;
        writeln!(self.stdin, "{line}")?;
        self.stdin.flush()?;
        let (tx, rx) = std::sync::mpsc::channel();
        let mut got = String::new();
        thread::scope(|s| {
            s.spawn(|| {
                let r = self.stdout.read_line(&mut got);
                let _ = tx.send(r.map(|_| ()));
            });
            match rx.recv_timeout(Duration::from_secs(5)) {
                Ok(r) => r.map_err(anyhow::Error::from),
                Err(_) => {
                    // Unblock the reader before leaving the scope.
                    let _ = self.child.kill();
                    Err(anyhow::anyhow!("no echo within 5 s"))
                }
            }
        })?;
        ensure!(got.trim_end() == line, "ssh echoed {got:?} for {line:?}");
        Ok(())
    }
}

impl Drop for SshSession {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
