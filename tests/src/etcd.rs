//! A real etcd (Debian's `etcd-server`) for the fleet tests: members in
//! network namespaces the test created (10.200.x.x only), TLS with
//! certificates made for the test (`openssl`), authentication on (root and
//! one user and role per host, each allowed to write only its own key).
//! Everything is removed on drop.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure};

use crate::*;

/// The prefix and cluster id the tests use.
pub const PREFIX: &str = "/portcullis";
pub const CLUSTER: &str = "c1";
/// Root's etcd password.
pub const ROOT_PASSWORD: &str = "root-secret";

/// The key of member `name`.
pub fn member_key(name: &str) -> String {
    format!("{PREFIX}/{CLUSTER}/members/{name}")
}

/// A CA and the certificates it signed, in a temporary directory.
pub struct Pki {
    dir: tempfile::TempDir,
}

fn openssl(dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    run(Command::new("openssl").current_dir(dir).args(args))?;
    Ok(())
}

impl Pki {
    /// A new CA (`ca.pem`) and a server certificate (`server.pem`,
    /// `server-key.pem`) valid for `ips`.
    pub fn new(ips: &[String]) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let d = dir.path();
        openssl(
            d,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                "ca-key.pem",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=portcullis test CA",
            ],
        )?;
        let san: Vec<String> = ips.iter().map(|ip| format!("IP:{ip}")).collect();
        fs::write(
            d.join("ext.cnf"),
            format!(
                "subjectAltName={}\nextendedKeyUsage=serverAuth,clientAuth\n",
                san.join(",")
            ),
        )?;
        openssl(
            d,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                "server-key.pem",
                "-out",
                "server.csr",
                "-subj",
                "/CN=etcd",
            ],
        )?;
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca-key.pem",
                "-CAcreateserial",
                "-out",
                "server.pem",
                "-days",
                "2",
                "-extfile",
                "ext.cnf",
            ],
        )?;
        // A client certificate, for etcd with --client-cert-auth: without
        // a CommonName, which etcd's JSON gateway refuses (identity is the
        // password's user).
        openssl(
            d,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                "client-key.pem",
                "-out",
                "client.csr",
                "-subj",
                "/O=portcullis test client",
            ],
        )?;
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                "client.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca-key.pem",
                "-CAcreateserial",
                "-out",
                "client.pem",
                "-days",
                "2",
                "-extfile",
                "ext.cnf",
            ],
        )?;
        Ok(Pki { dir })
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A file holding `secret`, root's, mode 0600 (a password file).
    pub fn secret(&self, name: &str, secret: &str) -> anyhow::Result<PathBuf> {
        use std::os::unix::fs::PermissionsExt as _;
        let path = self.path(name);
        fs::write(&path, format!("{secret}\n"))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600))?;
        Ok(path)
    }
}

/// One etcd member process in a namespace.
pub struct Member {
    pub name: String,
    pub ip: String,
    child: Option<Child>,
    data: tempfile::TempDir,
    log: PathBuf,
    args: Vec<String>,
    netns: PathBuf,
}

impl Member {
    pub fn endpoint(&self) -> String {
        format!("https://{}:2379", self.ip)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new("nsenter")
            .arg(format!("--net={}", self.netns.display()))
            .arg("etcd")
            .args(&self.args)
            .arg("--data-dir")
            .arg(self.data.path().join("data"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("start etcd")?;
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the member again on its data.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        // Rejoining an existing cluster: its state is on disk.
        for a in &mut self.args {
            if a == "new" {
                *a = "existing".into();
            }
        }
        self.spawn()
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An etcd cluster of members on the given namespaces and addresses.
pub struct Etcd {
    pub pki: Pki,
    pub members: Vec<Member>,
    /// Where etcdctl runs (the first member's namespace).
    ctl_ns: PathBuf,
}

impl Etcd {
    /// Starts a cluster with one member per (namespace, address), TLS on
    /// the client and peer ports, and waits until it answers.
    pub fn start(nodes: &[(&Netns, String)]) -> anyhow::Result<Self> {
        Self::start_with(nodes, false)
    }

    /// [`Etcd::start`]; with `client_certs`, etcd also asks every client
    /// for a certificate signed by the CA (`--client-cert-auth`).
    pub fn start_with(nodes: &[(&Netns, String)], client_certs: bool) -> anyhow::Result<Self> {
        let ips: Vec<String> = nodes.iter().map(|(_, ip)| ip.clone()).collect();
        let pki = Pki::new(&ips)?;
        let initial: Vec<String> = nodes
            .iter()
            .enumerate()
            .map(|(i, (_, ip))| format!("e{i}=https://{ip}:2380"))
            .collect();
        let token = unique("etcd");
        let mut members = Vec::new();
        for (i, (ns, ip)) in nodes.iter().enumerate() {
            let data = tempfile::tempdir()?;
            let log = data.path().join("etcd.log");
            let s = |p: &str| pki.path(p).display().to_string();
            let args: Vec<String> = vec![
                "--name".into(),
                format!("e{i}"),
                "--listen-client-urls".into(),
                format!("https://{ip}:2379"),
                "--advertise-client-urls".into(),
                format!("https://{ip}:2379"),
                "--listen-peer-urls".into(),
                format!("https://{ip}:2380"),
                "--initial-advertise-peer-urls".into(),
                format!("https://{ip}:2380"),
                "--initial-cluster".into(),
                initial.join(","),
                "--initial-cluster-token".into(),
                token.clone(),
                "--initial-cluster-state".into(),
                "new".into(),
                "--cert-file".into(),
                s("server.pem"),
                "--key-file".into(),
                s("server-key.pem"),
                "--peer-cert-file".into(),
                s("server.pem"),
                "--peer-key-file".into(),
                s("server-key.pem"),
                "--peer-trusted-ca-file".into(),
                s("ca.pem"),
                "--peer-client-cert-auth".into(),
                "--heartbeat-interval".into(),
                "50".into(),
                "--election-timeout".into(),
                "500".into(),
                "--logger".into(),
                "zap".into(),
            ];
            let mut args = args;
            if client_certs {
                args.extend([
                    "--client-cert-auth".into(),
                    "--trusted-ca-file".into(),
                    s("ca.pem"),
                ]);
            }
            let mut m = Member {
                name: format!("e{i}"),
                ip: ip.clone(),
                child: None,
                data,
                log,
                args,
                netns: ns.path(),
            };
            m.spawn()?;
            members.push(m);
        }
        let etcd = Etcd {
            pki,
            members,
            ctl_ns: nodes.first().context("no etcd node")?.0.path(),
        };
        etcd.wait_healthy(Duration::from_secs(30))?;
        Ok(etcd)
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(Member::endpoint).collect()
    }

    /// etcdctl against every live member, as `user` (`None`: no auth).
    pub fn ctl_as(&self, user: Option<&str>, args: &[&str]) -> std::process::Output {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.ctl_ns.display()))
            .arg("etcdctl")
            .arg(format!("--endpoints={}", self.endpoints().join(",")))
            .arg(format!("--cacert={}", self.pki.ca().display()))
            .arg(format!("--cert={}", self.pki.path("client.pem").display()))
            .arg(format!(
                "--key={}",
                self.pki.path("client-key.pem").display()
            ))
            .arg("--dial-timeout=2s")
            .arg("--command-timeout=5s")
            .env("ETCDCTL_API", "3");
        if let Some(u) = user {
            cmd.arg(format!("--user={u}"));
        }
        cmd.args(args).output().expect("run etcdctl")
    }

    /// etcdctl as root; its stdout, or an error with its stderr.
    pub fn ctl(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.ctl_as(Some(&format!("root:{ROOT_PASSWORD}")), args);
        ensure!(
            out.status.success(),
            "etcdctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn wait_healthy(&self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let out = self.ctl_as(None, &["endpoint", "health", "--cluster=false"]);
            // Before auth is on, and after, `endpoint health` needs no user
            // for the check itself ("permission denied" still means up).
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            if out.status.success() || text.contains("permission denied") {
                return Ok(());
            }
            if Instant::now() > deadline {
                let logs: Vec<String> = self.members.iter().map(|m| m.log()).collect();
                bail!("etcd not healthy: {text}\n{}", logs.join("\n---\n"));
            }
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// Turns authentication on: root, and for each host a user and role
    /// that may read the member list and write only its own key.
    pub fn enable_auth(&self, hosts: &[(&str, &str)]) -> anyhow::Result<()> {
        let plain = |args: &[&str]| -> anyhow::Result<()> {
            let out = self.ctl_as(None, args);
            ensure!(
                out.status.success(),
                "etcdctl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            Ok(())
        };
        plain(&["user", "add", &format!("root:{ROOT_PASSWORD}")])?;
        let members = format!("{PREFIX}/{CLUSTER}/members/");
        for (name, password) in hosts {
            plain(&["user", "add", &format!("{name}:{password}")])?;
            plain(&["role", "add", name])?;
            plain(&[
                "role",
                "grant-permission",
                "--prefix=true",
                name,
                "read",
                &members,
            ])?;
            plain(&[
                "role",
                "grant-permission",
                name,
                "readwrite",
                &member_key(name),
            ])?;
            plain(&["user", "grant-role", name, name])?;
        }
        plain(&["auth", "enable"])?;
        Ok(())
    }

    /// The index of the leader among `members` (all must be running; a
    /// member just restarted may take a moment to answer, so this asks
    /// again for up to 15 s).
    pub fn leader(&self) -> anyhow::Result<usize> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match self.leader_now() {
                Ok(i) => return Ok(i),
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    fn leader_now(&self) -> anyhow::Result<usize> {
        let out = self.ctl(&["endpoint", "status", "--write-out=json"])?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        let list = v.as_array().context("endpoint status: not a list")?;
        for s in list {
            let status = &s["Status"];
            if status["leader"].as_u64().is_some()
                && status["leader"] == status["header"]["member_id"]
            {
                let endpoint = s["Endpoint"].as_str().unwrap_or_default();
                return self
                    .members
                    .iter()
                    .position(|m| m.endpoint() == endpoint)
                    .context("leader not among the members");
            }
        }
        bail!("no leader in {out}")
    }

    /// Waits until the cluster answers writes again (a leader elected).
    pub fn wait_writable(&self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            match self.ctl(&["get", "/health-probe"]) {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    /// The store's current revision.
    pub fn revision(&self) -> anyhow::Result<i64> {
        let out = self.ctl(&["get", "/", "--write-out=json", "--limit=1"])?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        v["header"]["revision"]
            .as_i64()
            .context("no revision in etcdctl's answer")
    }

    /// Writes `value` under `key` (as root); the revision it made.
    pub fn put(&self, key: &str, value: &str) -> anyhow::Result<i64> {
        let out = self.ctl(&["put", key, value, "--write-out=json"])?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        v["header"]["revision"].as_i64().context("no revision")
    }

    /// Deletes `key` (as root); the revision it made.
    pub fn del(&self, key: &str) -> anyhow::Result<i64> {
        let out = self.ctl(&["del", key, "--write-out=json"])?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        v["header"]["revision"].as_i64().context("no revision")
    }
}

/// The daemon's `/v1/status` document, over its socket (curl).
pub fn status(config: &ConfigFile) -> serde_json::Value {
    let out = Command::new("curl")
        .args(["-s", "--max-time", "5", "--unix-socket"])
        .arg(config.socket())
        .arg("http://localhost/v1/status")
        .output()
        .expect("run curl");
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

/// Waits until `check` holds for the daemon's status (up to `within`).
pub fn wait_status(
    config: &ConfigFile,
    within: Duration,
    what: &str,
    check: impl Fn(&serde_json::Value) -> bool,
) -> anyhow::Result<serde_json::Value> {
    let deadline = Instant::now() + within;
    loop {
        let s = status(config);
        if check(&s) {
            return Ok(s);
        }
        if Instant::now() > deadline {
            bail!("{what}: not so after {within:?}; status: {}", s["fleet"]);
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// The `[fleet]` section of host `name` (etcd user `name`).
pub fn fleet_section(
    etcd: &Etcd,
    name: &str,
    password_file: &Path,
    addresses: &[String],
) -> String {
    let quoted = |v: &[String]| {
        v.iter()
            .map(|s| format!("\"{s}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "[fleet]\nendpoints = [{}]\nca_file = \"{}\"\nusername = \"{name}\"\npassword_file = \"{}\"\nprefix = \"{PREFIX}\"\ncluster_id = \"{CLUSTER}\"\nallowed_ranges = [\"10.200.10.0/24\", \"fd00:200:10::/64\"]\nname = \"{name}\"\naddresses = [{}]\nlease_ttl_secs = 3\n",
        quoted(&etcd.endpoints()),
        etcd.pki.ca().display(),
        password_file.display(),
        quoted(addresses),
    )
}
