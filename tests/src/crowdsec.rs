//! A real CrowdSec Local API for the bouncer tests (Debian's `crowdsec`
//! 1.4.6, installed by `cargo xtask setup`): `crowdsec -no-cs -no-capi`
//! with a configuration of its own in a temporary directory (its own
//! sqlite database, listening on loopback inside the test's namespace),
//! a machine and a bouncer key created with `cscli`, and decisions added
//! and deleted with `cscli` as an operator would. Nothing of the host's
//! crowdsec (`/etc/crowdsec`, its service) is used. Killed on drop.
//!
//! [`FakeLapi`] is the hostile counterpart for the attack suite: a plain
//! HTTP server answering the decision stream with whatever the test sets.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};

use crate::{Netns, run};

/// A Local API, its configuration and database.
pub struct Lapi {
    dir: tempfile::TempDir,
    ns: PathBuf,
    child: Option<Child>,
    /// `127.0.0.1:PORT` inside the namespace.
    pub listen: String,
    /// The bouncer's API key (`cscli bouncers add portcullis-test -k`).
    pub key: String,
    /// Served over https with a certificate for 127.0.0.1 from a test CA.
    tls: bool,
}

fn config_yaml(dir: &Path, listen: &str, tls: bool) -> String {
    let d = dir.display();
    let server_tls = if tls {
        format!("    tls:\n      cert_file: {d}/cert.pem\n      key_file: {d}/key.pem\n")
    } else {
        String::new()
    };
    format!(
        "common:\n  daemonize: false\n  log_media: file\n  log_dir: {d}/\n  log_level: info\n  working_dir: .\n\
config_paths:\n  config_dir: {d}/\n  data_dir: {d}/data/\n  simulation_path: {d}/simulation.yaml\n  hub_dir: {d}/hub/\n  index_path: {d}/hub/.index.json\n  notification_dir: {d}/notifications/\n  plugin_dir: /usr/lib/crowdsec/plugins/\n\
db_config:\n  log_level: info\n  type: sqlite\n  db_path: {d}/data/crowdsec.db\n  use_wal: false\n\
api:\n  client:\n    insecure_skip_verify: {tls}\n    credentials_path: {d}/local_api_credentials.yaml\n  server:\n    log_level: info\n    listen_uri: {listen}\n    profiles_path: {d}/profiles.yaml\n    trusted_ips:\n      - 127.0.0.1\n{server_tls}\
prometheus:\n  enabled: false\n"
    )
}

const PROFILES: &str = "name: default_ip_remediation\nfilters:\n - Alert.Remediation == true && Alert.GetScope() == \"Ip\"\ndecisions:\n - type: ban\n   duration: 4h\non_success: break\n";

impl Lapi {
    /// Configures a LAPI listening on `127.0.0.1:port` in `ns`, registers
    /// a machine (for cscli) and the bouncer key, and starts it.
    pub fn start(ns: &Netns, port: u16) -> anyhow::Result<Lapi> {
        Self::start_with(ns, port, false)
    }

    /// [`Lapi::start`], over https when `tls` (its CA: [`Lapi::ca`]).
    pub fn start_with(ns: &Netns, port: u16, tls: bool) -> anyhow::Result<Lapi> {
        ensure!(
            Path::new("/usr/bin/crowdsec").exists(),
            "crowdsec is not installed: run `cargo xtask setup`"
        );
        let dir = tempfile::tempdir()?;
        let listen = format!("127.0.0.1:{port}");
        std::fs::create_dir_all(dir.path().join("data"))?;
        std::fs::write(
            dir.path().join("config.yaml"),
            config_yaml(dir.path(), &listen, tls),
        )?;
        if tls {
            test_pki(dir.path(), "127.0.0.1")?;
        }
        std::fs::write(dir.path().join("profiles.yaml"), PROFILES)?;
        std::fs::write(dir.path().join("simulation.yaml"), "simulation: off\n")?;
        std::fs::write(dir.path().join("local_api_credentials.yaml"), "")?;
        let key: String = (0..32)
            .map(|_| char::from(b'a' + rand::random_range(0..26u8)))
            .collect();
        let mut lapi = Lapi {
            ns: ns.path(),
            dir,
            child: None,
            listen,
            key,
            tls,
        };
        let creds = lapi.dir.path().join("local_api_credentials.yaml");
        let creds = creds.to_string_lossy().into_owned();
        lapi.cscli_direct(&[
            "machines",
            "add",
            "portcullis-test",
            "--password",
            "testpassword0123456789",
            "-f",
            &creds,
            "--force",
        ])?;
        // The credentials name the LAPI by URL; cscli then reaches it.
        let text = std::fs::read_to_string(&creds)?;
        let text: String = text
            .lines()
            .map(|l| {
                if l.starts_with("url:") {
                    format!("url: {}\n", lapi.url())
                } else {
                    format!("{l}\n")
                }
            })
            .collect();
        std::fs::write(&creds, text)?;
        let key = lapi.key.clone();
        lapi.cscli_direct(&["bouncers", "add", "portcullis-test", "-k", &key])?;
        lapi.resume()?;
        Ok(lapi)
    }

    /// `http://127.0.0.1:PORT` or `https://...`.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.listen)
    }

    /// The CA that signed the LAPI's certificate (PEM), when it serves https.
    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("config.yaml")
    }

    fn nsenter(&self, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.ns.display()))
            .arg("--")
            .arg(program);
        cmd
    }

    /// `cscli` on the database only (machines, bouncers).
    fn cscli_direct(&self, args: &[&str]) -> anyhow::Result<String> {
        run(Command::new("cscli")
            .arg("-c")
            .arg(self.config())
            .args(args))
    }

    /// `cscli -c <config> ARGS` in the namespace (through the LAPI).
    pub fn cscli(&self, args: &[&str]) -> anyhow::Result<String> {
        run(self
            .nsenter("cscli")
            .arg("-c")
            .arg(self.config())
            .args(args))
    }

    /// `cscli decisions add ARGS` (e.g. `--ip X --duration 1h`; ban unless
    /// `--type` says otherwise).
    pub fn add(&self, args: &[&str]) -> anyhow::Result<()> {
        let mut all = vec!["decisions", "add"];
        all.extend_from_slice(args);
        self.cscli(&all).map(|_| ())
    }

    /// `cscli decisions delete --id ID`.
    pub fn delete_id(&self, id: u64) -> anyhow::Result<()> {
        self.cscli(&["decisions", "delete", "--id", &id.to_string()])
            .map(|_| ())
    }

    /// The ids of the active (unexpired, undeleted) decisions on `value`,
    /// with their durations as cscli prints them, oldest first.
    pub fn ids(&self, value: &str) -> anyhow::Result<Vec<(u64, String)>> {
        // `alerts list` shows every decision; `decisions list` one a value.
        let out = self.cscli(&["alerts", "list", "-o", "json"])?;
        let alerts: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_default();
        let mut ids = Vec::new();
        for alert in alerts.as_array().into_iter().flatten() {
            for d in alert["decisions"].as_array().into_iter().flatten() {
                let duration = d["duration"].as_str().unwrap_or_default();
                if d["value"] == value && !duration.starts_with('-') {
                    ids.push((
                        d["id"].as_u64().context("decision id")?,
                        d["duration"].as_str().unwrap_or_default().to_string(),
                    ));
                }
            }
        }
        ids.sort();
        Ok(ids)
    }

    /// Kills the LAPI (its database stays).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it (again) on the same database and waits until it listens.
    pub fn resume(&mut self) -> anyhow::Result<()> {
        ensure!(self.child.is_none(), "the LAPI is running");
        let log = std::fs::File::create(self.dir.path().join("lapi.out"))?;
        let child = self
            .nsenter("crowdsec")
            .arg("-c")
            .arg(self.config())
            .args(["-no-cs", "-no-capi"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting crowdsec")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let probe = self
                .nsenter("curl")
                .args(["-s", "-k", "-o", "/dev/null", "-w", "%{http_code}"])
                .arg(format!("{}/v1/decisions/stream", self.url()))
                .output()?;
            if String::from_utf8_lossy(&probe.stdout).trim() == "403" {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "the LAPI did not start within 20 s: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// What the LAPI logged.
    pub fn log(&self) -> String {
        let mut s = std::fs::read_to_string(self.dir.path().join("lapi.out")).unwrap_or_default();
        s.push_str(
            &std::fs::read_to_string(self.dir.path().join("crowdsec_api.log")).unwrap_or_default(),
        );
        s
    }
}

impl Drop for Lapi {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A test CA (`ca.pem`) and a server certificate it signed for the IP
/// address `ip` (in its subjectAltName, as TLS clients check): `cert.pem`
/// and `key.pem`, all in `dir`.
pub fn test_pki(dir: &Path, ip: &str) -> anyhow::Result<()> {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    run(Command::new("openssl")
        .args(["req", "-x509"])
        .args(ec)
        .args(["-days", "2", "-subj", "/CN=portcullis-test-ca", "-keyout"])
        .arg(dir.join("ca.key"))
        .arg("-out")
        .arg(dir.join("ca.pem")))?;
    run(Command::new("openssl")
        .arg("req")
        .args(ec)
        .args(["-subj", &format!("/CN={ip}"), "-keyout"])
        .arg(dir.join("key.pem"))
        .arg("-out")
        .arg(dir.join("server.csr")))?;
    std::fs::write(
        dir.join("server.ext"),
        format!("subjectAltName=IP:{ip}\nbasicConstraints=CA:FALSE\n"),
    )?;
    run(Command::new("openssl")
        .args(["x509", "-req", "-days", "2", "-CAcreateserial", "-in"])
        .arg(dir.join("server.csr"))
        .arg("-CA")
        .arg(dir.join("ca.pem"))
        .arg("-CAkey")
        .arg(dir.join("ca.key"))
        .arg("-extfile")
        .arg(dir.join("server.ext"))
        .arg("-out")
        .arg(dir.join("cert.pem")))?;
    Ok(())
}

/// Writes `key` to a root-owned file of mode 0600 in `dir`; its path.
pub fn key_file(dir: &Path, key: &str) -> anyhow::Result<PathBuf> {
    let path = dir.join("crowdsec.key");
    std::fs::write(&path, format!("{key}\n"))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(path)
}

/// A `[crowdsec]` section polling every second.
pub fn section(url: &str, key_file: &Path) -> String {
    format!(
        "[crowdsec]\nurl = \"{url}\"\napi_key_file = \"{}\"\npoll_interval = \"1s\"\n",
        key_file.display()
    )
}

/// A hostile (or just scripted) LAPI: answers every request with the
/// current `body` (status 200), counting requests. Stops on drop.
pub struct FakeLapi {
    pub addr: SocketAddr,
    body: Arc<Mutex<String>>,
    served: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeLapi {
    pub fn start(ns: &Netns, addr: SocketAddr, body: &str) -> anyhow::Result<FakeLapi> {
        let listener = ns.enter(|| TcpListener::bind(addr))?;
        listener.set_nonblocking(true)?;
        let body = Arc::new(Mutex::new(body.to_string()));
        let served = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::spawn({
            let (body, served, stop) = (body.clone(), served.clone(), stop.clone());
            move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((mut s, _)) => {
                            let _ = s.set_nonblocking(false);
                            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                            let mut head = Vec::new();
                            let mut buf = [0u8; 1024];
                            while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16384 {
                                match s.read(&mut buf) {
                                    Ok(0) | Err(_) => break,
                                    Ok(n) => head.extend_from_slice(&buf[..n]),
                                }
                            }
                            let b = body.lock().unwrap().clone();
                            let _ = write!(
                                s,
                                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{b}",
                                b.len()
                            );
                            served.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
            }
        });
        Ok(FakeLapi {
            addr,
            body,
            served,
            stop,
            thread: Some(thread),
        })
    }

    /// What the next requests get.
    pub fn answer(&self, body: &str) {
        *self.body.lock().unwrap() = body.to_string();
    }

    /// Requests answered so far.
    pub fn served(&self) -> usize {
        self.served.load(Ordering::SeqCst)
    }

    /// Waits until `n` more requests have been answered with the current
    /// body (so the daemon has read it), or 20 s.
    pub fn wait_served(&self, n: usize) -> bool {
        let want = self.served() + n;
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.served() < want {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        true
    }
}

impl Drop for FakeLapi {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
