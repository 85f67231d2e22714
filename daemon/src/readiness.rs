//! SSH readiness: can someone log in to this host over SSH with a key,
//! through the firewall, right now?
//!
//! Readiness is the conjunction of the *gating* checks: the data path
//! enforces, the SSH unit is active, something listens on the SSH port, the
//! live rules admit that port, and sshd accepts public keys (plus, when an
//! `ssh_user` is configured, that user's `authorized_keys` is usable). The
//! system state and the failed units are reported beside it but never gate
//! it: during first boot the system stays `starting` until cloud-init's final
//! stage ends, and a `wait-ready` run from that stage would wait forever.
//!
//! systemd's view comes over the system D-Bus ([`watch_systemd`]): re-read on
//! every unit's `PropertiesChanged` and on `JobRemoved`, with a 60 s poll as a
//! fallback. The daemon starts before D-Bus at boot, so the watcher keeps
//! trying until the bus appears. The host checks are cheap and run at each
//! evaluation; `sshd -T` forks, so its answer is kept for 30 s (`SSHD_CACHE`).

use std::{
    collections::BTreeMap,
    path::Path,
    process::Command,
    sync::Mutex,
    time::{Duration, Instant},
};

use futures::StreamExt as _;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::{
    config::ReadinessConfig,
    core::{Core, Mode},
    rules::RuleSet,
    sockets,
};

/// What systemd says, as last read over D-Bus.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SystemdView {
    /// Connected to the system bus and read at least once.
    pub connected: bool,
    /// Why not, when not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The manager's `SystemState`: initializing, starting, running,
    /// degraded, maintenance, stopping.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_state: Option<String>,
    /// Units in the `failed` state, by name.
    #[serde(default)]
    pub failed_units: Vec<String>,
    /// The SSH unit: the configured one, else the first of
    /// [`SSH_UNITS`] that is loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_unit: Option<UnitState>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitState {
    pub name: String,
    pub load_state: String,
    pub active_state: String,
    pub sub_state: String,
}

/// Where sshd usually runs: Debian's service, other distributions' name for
/// it, and Debian's socket-activated variant.
pub const SSH_UNITS: &[&str] = &["ssh.service", "sshd.service", "ssh.socket"];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Pass,
    /// Passes, with something the operator should know.
    Warn,
    Fail,
    /// Could not be determined (no D-Bus yet); a gating check in this state
    /// keeps the host not ready.
    Unknown,
    /// Not configured.
    Skipped,
}

impl State {
    fn passes(self) -> bool {
        matches!(self, State::Pass | State::Warn | State::Skipped)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    pub name: String,
    pub state: State,
    /// Whether readiness depends on it.
    pub gates: bool,
    pub detail: String,
}

impl Check {
    fn new(name: &str, state: State, detail: impl Into<String>) -> Check {
        Check {
            name: name.to_string(),
            state,
            gates: true,
            detail: detail.into(),
        }
    }
}

/// The readiness document: served by the API (`/v1/ready`, and inside
/// `/v1/status`) and by the optional HTTP health endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub ready: bool,
    pub checks: Vec<Check>,
    /// Reported, not gating.
    pub system_state: Option<String>,
    pub failed_units: Vec<String>,
}

impl Report {
    fn from_checks(checks: Vec<Check>, view: &SystemdView) -> Report {
        Report {
            ready: checks.iter().all(|c| !c.gates || c.state.passes()),
            checks,
            system_state: view.system_state.clone(),
            failed_units: view.failed_units.clone(),
        }
    }

    /// A report that could not be evaluated.
    pub fn failed(reason: String) -> Report {
        Report::from_checks(
            vec![Check::new("evaluation", State::Unknown, reason)],
            &SystemdView::default(),
        )
    }

    /// One line for systemd's `STATUS=` and for logs: ready, or what fails.
    pub fn summary(&self) -> String {
        if self.ready {
            let warnings: Vec<&str> = self
                .checks
                .iter()
                .filter(|c| c.state == State::Warn)
                .map(|c| c.detail.as_str())
                .collect();
            if warnings.is_empty() {
                "SSH-ready".to_string()
            } else {
                format!("SSH-ready (warning: {})", warnings.join("; "))
            }
        } else {
            format!("not SSH-ready: {}", self.failing().join("; "))
        }
    }

    /// The gating checks that fail, as `name: detail`.
    pub fn failing(&self) -> Vec<String> {
        self.checks
            .iter()
            .filter(|c| c.gates && !c.state.passes())
            .map(|c| format!("{}: {}", c.name, c.detail))
            .collect()
    }
}

/// What the core knows that readiness needs, taken under its lock (the
/// rest of the evaluation runs without it).
pub struct Live {
    pub interfaces: BTreeMap<String, String>,
    /// Configured interfaces that do not exist (yet): not protected.
    pub missing: Vec<String>,
    /// Whether the live rules admit SSH, per SSH port.
    pub admitted: Vec<(u16, Check)>,
}

impl Live {
    pub fn of(core: &Core) -> Live {
        Live {
            interfaces: core.interfaces.clone(),
            missing: core.missing_interfaces(),
            admitted: core
                .rules()
                .ssh
                .ports
                .iter()
                .map(|&port| (port, admitted(core.rules(), core.mode(), port)))
                .collect(),
        }
    }
}

/// Evaluates readiness; holds the configuration, systemd's view and the
/// cached `sshd -T` answer.
pub struct Checker {
    config: ReadinessConfig,
    systemd: watch::Receiver<SystemdView>,
    sshd: Mutex<Option<(Instant, Option<UnitState>, Check)>>,
}

/// How long an `sshd -T` answer is reused while the SSH unit's state stays
/// the same (a restart, which may come with a new configuration, re-runs it).
const SSHD_CACHE: Duration = Duration::from_secs(30);

impl Checker {
    pub fn new(config: ReadinessConfig, systemd: watch::Receiver<SystemdView>) -> Checker {
        Checker {
            config,
            systemd,
            sshd: Mutex::new(None),
        }
    }

    /// Changes whenever systemd's view does.
    pub fn systemd(&self) -> watch::Receiver<SystemdView> {
        self.systemd.clone()
    }

    /// Evaluates every check (blocking: forks `sshd -T` now and then).
    pub fn report(&self, live: Live) -> Report {
        let view = self.systemd.borrow().clone();
        let ports: Vec<u16> = live.admitted.iter().map(|(p, _)| *p).collect();
        let (listening, open) = listening(&ports);
        let checks = vec![
            enforcing(&live.interfaces, &live.missing),
            ssh_unit(&view),
            listening,
            admitted_on(live.admitted, &open),
            self.key_auth(&view),
            authorized_keys(self.config.ssh_user.as_deref()),
        ];
        Report::from_checks(checks, &view)
    }

    fn key_auth(&self, view: &SystemdView) -> Check {
        let mut cache = self.sshd.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, unit, check)) = cache.as_ref()
            && at.elapsed() < SSHD_CACHE
            && *unit == view.ssh_unit
        {
            return check.clone();
        }
        let check = key_auth(&self.config.sshd);
        *cache = Some((Instant::now(), view.ssh_unit.clone(), check.clone()));
        check
    }
}

fn enforcing(interfaces: &BTreeMap<String, String>, missing: &[String]) -> Check {
    if !missing.is_empty() {
        Check::new(
            "enforcing",
            State::Fail,
            format!("not protected: {} missing", missing.join(", ")),
        )
    } else if interfaces.is_empty() {
        Check::new("enforcing", State::Fail, "no interface is protected yet")
    } else {
        let names: Vec<String> = interfaces
            .iter()
            .map(|(name, mode)| format!("{name} ({mode})"))
            .collect();
        Check::new(
            "enforcing",
            State::Pass,
            format!("enforcing on {}", names.join(", ")),
        )
    }
}

fn ssh_unit(view: &SystemdView) -> Check {
    let name = "ssh_unit";
    if !view.connected {
        let why = view.error.as_deref().unwrap_or("not connected yet");
        return Check::new(
            name,
            State::Unknown,
            format!("system D-Bus unavailable: {why}"),
        );
    }
    match &view.ssh_unit {
        None => Check::new(
            name,
            State::Fail,
            format!(
                "no SSH unit is loaded (looked for {})",
                SSH_UNITS.join(", ")
            ),
        ),
        Some(u) if u.active_state == "active" => Check::new(
            name,
            State::Pass,
            format!("{} is {} ({})", u.name, u.active_state, u.sub_state),
        ),
        Some(u) => Check::new(
            name,
            State::Fail,
            format!(
                "{} is {} ({}), load state {}",
                u.name, u.active_state, u.sub_state, u.load_state
            ),
        ),
    }
}

/// Whether something listens on one of the SSH ports; also which do.
fn listening(ports: &[u16]) -> (Check, Vec<u16>) {
    let name = "listening";
    let mut open = Vec::new();
    for &port in ports {
        match sockets::listening_tcp(port) {
            Ok(true) => open.push(port),
            Ok(false) => {}
            Err(e) => {
                let c = Check::new(name, State::Unknown, format!("cannot list sockets: {e:#}"));
                return (c, open);
            }
        }
    }
    let list = |ports: &[u16]| {
        ports
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let check = if open.is_empty() {
        Check::new(
            name,
            State::Fail,
            format!(
                "nothing listens on TCP port {} (the SSH ports)",
                list(ports)
            ),
        )
    } else {
        Check::new(
            name,
            State::Pass,
            format!("a TCP socket listens on port {}", list(&open)),
        )
    };
    (check, open)
}

/// The `admitted` check over the SSH ports: it passes when an SSH port that
/// something listens on is admitted (any SSH port, when none listens, so
/// the report still says what the rules allow).
fn admitted_on(per_port: Vec<(u16, Check)>, listening: &[u16]) -> Check {
    let relevant: Vec<Check> = per_port
        .iter()
        .filter(|(p, _)| listening.is_empty() || listening.contains(p))
        .map(|(_, c)| c.clone())
        .collect();
    if let Some(pass) = relevant.iter().find(|c| c.state.passes()) {
        return pass.clone();
    }
    let details: Vec<String> = relevant.iter().map(|c| c.detail.clone()).collect();
    let state = relevant.first().map_or(State::Fail, |c| c.state);
    Check::new("admitted", state, details.join("; "))
}

/// Whether the live rules admit new TCP connections to `port`, and from where.
pub fn admitted(rules: &RuleSet, mode: &Mode, port: u16) -> Check {
    let name = "admitted";
    match mode {
        Mode::Open | Mode::Audit => {
            return Check::new(
                name,
                State::Warn,
                format!("mode {mode:?}: every packet passes, port {port} included"),
            );
        }
        Mode::Lockdown { admin: Some(admin) } => {
            return Check::new(
                name,
                State::Warn,
                format!("lockdown: port {port} admitted from {admin} only"),
            );
        }
        Mode::Lockdown { admin: None } => {
            return Check::new(
                name,
                State::Fail,
                format!("lockdown: nothing is admitted, port {port} included"),
            );
        }
        Mode::Enforce => {}
    }
    let mut from = Vec::new();
    if rules.ssh.allow && rules.ssh.ports.contains(&port) {
        from.push(describe_sources("the SSH exemption", &rules.ssh.sources));
    }
    for rule in &rules.ingress_rules {
        if rule.admits_tcp_port(port) {
            from.push(describe_sources(
                &format!("rule {:?}", rule.id),
                &rule.ip_ranges,
            ));
        }
    }
    if from.is_empty() {
        Check::new(
            name,
            State::Fail,
            format!(
                "no rule admits TCP port {port} (the SSH exemption is off and no ingress rule covers it)"
            ),
        )
    } else {
        Check::new(
            name,
            State::Pass,
            format!("TCP port {port} admitted by {}", from.join("; ")),
        )
    }
}

fn describe_sources(by: &str, sources: &[String]) -> String {
    if sources.is_empty() {
        format!("{by} from any source")
    } else {
        format!("{by} from {}", sources.join(", "))
    }
}

fn key_auth(sshd: &Path) -> Check {
    let name = "key_auth";
    if !sshd.exists() {
        return Check::new(
            name,
            State::Unknown,
            format!(
                "{} not found: cannot read sshd's configuration",
                sshd.display()
            ),
        );
    }
    let out = match Command::new(sshd).arg("-T").output() {
        Ok(out) => out,
        Err(e) => {
            return Check::new(
                name,
                State::Unknown,
                format!("cannot run {} -T: {e}", sshd.display()),
            );
        }
    };
    if !out.status.success() {
        return Check::new(
            name,
            State::Fail,
            format!(
                "{} -T fails (a broken sshd configuration): {}",
                sshd.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        );
    }
    sshd_settings(&String::from_utf8_lossy(&out.stdout))
}

/// Judges `sshd -T` output.
fn sshd_settings(text: &str) -> Check {
    let name = "key_auth";
    let value = |key: &str| {
        text.lines().find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            (k == key).then(|| v.trim().to_string())
        })
    };
    if value("pubkeyauthentication").as_deref() != Some("yes") {
        return Check::new(
            name,
            State::Fail,
            "sshd refuses public-key authentication (PubkeyAuthentication no)",
        );
    }
    if value("passwordauthentication").as_deref() == Some("yes") {
        return Check::new(
            name,
            State::Warn,
            "public-key authentication on; password authentication is on too",
        );
    }
    Check::new(
        name,
        State::Pass,
        "public-key authentication on, passwords off",
    )
}

/// The configured user's `~/.ssh/authorized_keys`: there, holding a key,
/// and writable by nobody but the user (sshd's StrictModes refuses it
/// otherwise).
fn authorized_keys(user: Option<&str>) -> Check {
    let name = "authorized_keys";
    let Some(user) = user else {
        let mut c = Check::new(name, State::Skipped, "no ssh_user configured");
        c.gates = false;
        return c;
    };
    let entry = match nix::unistd::User::from_name(user) {
        Ok(Some(u)) => u,
        Ok(None) => return Check::new(name, State::Fail, format!("no user {user:?} on this host")),
        Err(e) => {
            return Check::new(
                name,
                State::Unknown,
                format!("cannot look up user {user:?}: {e}"),
            );
        }
    };
    // The walk from descriptors, never following a symbolic link, never
    // blocking on a FIFO or device (the user owns these paths and may swap
    // them): the home, then .ssh and the file relative to their parent.
    use std::os::fd::AsFd as _;
    let uid = entry.uid.as_raw();
    let dir = entry.dir.join(".ssh");
    let file = dir.join("authorized_keys");
    let walked = safe_path(nix::fcntl::AT_FDCWD, &entry.dir, &entry.dir, true, uid)
        .and_then(|home| safe_path(home.as_fd(), Path::new(".ssh"), &dir, true, uid))
        .and_then(|ssh| safe_path(ssh.as_fd(), Path::new("authorized_keys"), &file, false, uid))
        .and_then(|fd| crate::sshkeys::read_bounded(fd, &file));
    match walked {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let keys = text
                .lines()
                .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
                .count();
            if keys == 0 {
                Check::new(
                    name,
                    State::Fail,
                    format!("{} holds no key", file.display()),
                )
            } else {
                Check::new(
                    name,
                    State::Pass,
                    format!("{} holds {keys} key(s)", file.display()),
                )
            }
        }
        Err(why) => Check::new(name, State::Fail, why),
    }
}

/// Opens `name` in `at` (`shown` in messages; a directory if `is_dir`) if
/// it is what sshd accepts on the way to the keys: not a symbolic link, not
/// a special file, owned by `uid` or root, not writable by group or others.
/// Checked through a descriptor opened without following a link or
/// blocking on a FIFO.
fn safe_path(
    at: std::os::fd::BorrowedFd<'_>,
    name: &Path,
    shown: &Path,
    is_dir: bool,
    uid: u32,
) -> Result<std::os::fd::OwnedFd, String> {
    let kind = if is_dir {
        crate::sshkeys::Kind::Dir
    } else {
        crate::sshkeys::Kind::File
    };
    crate::sshkeys::open_for_sshd(at, name, shown, kind, uid)
}

/// systemd's D-Bus interfaces, as far as readiness needs them.
mod systemd1 {
    use zbus::zvariant::OwnedObjectPath;

    /// `ListUnitsFiltered`'s rows: name, description, load, active, sub,
    /// following, unit path, job id, job type, job path.
    pub type UnitRow = (
        String,
        String,
        String,
        String,
        String,
        String,
        OwnedObjectPath,
        u32,
        String,
        OwnedObjectPath,
    );

    #[zbus::proxy(
        interface = "org.freedesktop.systemd1.Manager",
        default_service = "org.freedesktop.systemd1",
        default_path = "/org/freedesktop/systemd1"
    )]
    pub trait Manager {
        /// Asks systemd to emit unit and job signals to this client.
        fn subscribe(&self) -> zbus::Result<()>;
        fn load_unit(&self, name: &str) -> zbus::Result<OwnedObjectPath>;
        fn list_units_filtered(&self, states: &[&str]) -> zbus::Result<Vec<UnitRow>>;
        #[zbus(property)]
        fn system_state(&self) -> zbus::Result<String>;
        #[zbus(signal)]
        fn job_removed(
            &self,
            id: u32,
            job: OwnedObjectPath,
            unit: String,
            result: String,
        ) -> zbus::Result<()>;
    }

    #[zbus::proxy(
        interface = "org.freedesktop.systemd1.Unit",
        default_service = "org.freedesktop.systemd1"
    )]
    pub trait Unit {
        #[zbus(property)]
        fn load_state(&self) -> zbus::Result<String>;
        #[zbus(property)]
        fn active_state(&self) -> zbus::Result<String>;
        #[zbus(property)]
        fn sub_state(&self) -> zbus::Result<String>;
    }
}

/// The fallback poll: signals make it unnecessary, unless one is missed.
const POLL: Duration = Duration::from_secs(60);
/// A burst of signals (a unit stopping emits several) is read once.
const SETTLE: Duration = Duration::from_millis(50);

/// Keeps `tx` current with systemd's view, forever: connects to the system
/// bus (retrying until it exists), re-reads on signals and every [`POLL`].
pub async fn watch_systemd(ssh_unit: Option<String>, tx: watch::Sender<SystemdView>) {
    let mut logged = false;
    loop {
        let error = match zbus::Connection::system().await {
            Ok(conn) => {
                info!("connected to the system D-Bus");
                logged = false;
                follow(&conn, ssh_unit.as_deref(), &tx).await
            }
            Err(e) => Err(e.into()),
        };
        if let Err(e) = error {
            let text = format!("{e:#}");
            if !logged {
                warn!(error = %text, "system D-Bus unavailable; SSH unit state unknown until it appears");
                logged = true;
            }
            tx.send_modify(|v| {
                v.connected = false;
                v.error = Some(text);
            });
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn follow(
    conn: &zbus::Connection,
    ssh_unit: Option<&str>,
    tx: &watch::Sender<SystemdView>,
) -> anyhow::Result<()> {
    use zbus::{MatchRule, MessageStream, message::Type};
    let manager = systemd1::ManagerProxy::builder(conn)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await?;
    // Every unit's state changes, and job completions: either may change
    // the SSH unit, the failed units or the system state.
    let rule = MatchRule::builder()
        .msg_type(Type::Signal)
        .sender("org.freedesktop.systemd1")?
        .interface("org.freedesktop.DBus.Properties")?
        .member("PropertiesChanged")?
        .path_namespace("/org/freedesktop/systemd1/unit")?
        .build();
    let mut changes = MessageStream::for_match_rule(rule, conn, Some(256)).await?;
    let mut jobs = manager.receive_job_removed().await?;
    manager.subscribe().await?;
    loop {
        let view = read(conn, &manager, ssh_unit).await?;
        tx.send_if_modified(|v| {
            let changed = *v != view;
            *v = view;
            changed
        });
        tokio::select! {
            m = changes.next() => { m.ok_or_else(|| anyhow::anyhow!("the D-Bus connection closed"))??; }
            j = jobs.next() => { j.ok_or_else(|| anyhow::anyhow!("the D-Bus connection closed"))?; }
            _ = tokio::time::sleep(POLL) => { debug!("fallback poll of systemd"); }
        }
        // Let the rest of a burst arrive, then read once.
        tokio::time::sleep(SETTLE).await;
        while futures::FutureExt::now_or_never(changes.next())
            .flatten()
            .is_some()
        {}
        while futures::FutureExt::now_or_never(jobs.next())
            .flatten()
            .is_some()
        {}
    }
}

async fn read(
    conn: &zbus::Connection,
    manager: &systemd1::ManagerProxy<'_>,
    ssh_unit: Option<&str>,
) -> anyhow::Result<SystemdView> {
    let system_state = manager.system_state().await?;
    let mut failed_units: Vec<String> = manager
        .list_units_filtered(&["failed"])
        .await?
        .into_iter()
        .map(|row| row.0)
        .collect();
    failed_units.sort();
    let candidates: Vec<&str> = match ssh_unit {
        Some(name) => vec![name],
        None => SSH_UNITS.to_vec(),
    };
    let mut found = None;
    for name in candidates {
        let path = manager.load_unit(name).await?;
        let unit = systemd1::UnitProxy::builder(conn)
            .path(path)?
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await?;
        let state = UnitState {
            name: name.to_string(),
            load_state: unit.load_state().await?,
            active_state: unit.active_state().await?,
            sub_state: unit.sub_state().await?,
        };
        // A configured unit is reported whatever its state; otherwise the
        // first one that exists.
        if ssh_unit.is_some() || state.load_state == "loaded" {
            found = Some(state);
            break;
        }
    }
    Ok(SystemdView {
        connected: true,
        error: None,
        system_state: Some(system_state),
        failed_units,
        ssh_unit: found,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::FirewallRule;

    fn rule(id: &str, from: u16, to: u16, ranges: &[&str]) -> FirewallRule {
        serde_json::from_value(serde_json::json!({
            "id": id, "from_port": from, "to_port": to, "ip_ranges": ranges
        }))
        .unwrap()
    }

    #[test]
    fn ssh_is_admitted_by_the_exemption_or_a_covering_rule_only() {
        let mut rules = RuleSet::default();
        let c = admitted(&rules, &Mode::Enforce, 22);
        assert_eq!(c.state, State::Fail, "{c:?}");
        rules.ingress_rules.push(rule("web", 80, 443, &[]));
        assert_eq!(admitted(&rules, &Mode::Enforce, 22).state, State::Fail);
        rules
            .ingress_rules
            .push(rule("admin", 20, 25, &["10.0.0.0/8"]));
        let c = admitted(&rules, &Mode::Enforce, 22);
        assert_eq!(c.state, State::Pass);
        assert!(
            c.detail.contains("\"admin\" from 10.0.0.0/8"),
            "{}",
            c.detail
        );
        rules.ingress_rules.clear();
        rules.ssh.allow = true;
        let c = admitted(&rules, &Mode::Enforce, 22);
        assert_eq!(c.state, State::Pass);
        assert!(
            c.detail.contains("exemption from any source"),
            "{}",
            c.detail
        );
        // The exemption is for the SSH ports; another port needs a rule.
        assert_eq!(admitted(&rules, &Mode::Enforce, 2222).state, State::Fail);
        rules.ssh.ports = vec![22, 2222];
        assert_eq!(admitted(&rules, &Mode::Enforce, 2222).state, State::Pass);
        assert_eq!(admitted(&rules, &Mode::Enforce, 2223).state, State::Fail);
        assert_eq!(
            admitted(&rules, &Mode::Lockdown { admin: None }, 22).state,
            State::Fail
        );
    }

    #[test]
    fn a_udp_only_rule_does_not_admit_ssh() {
        let mut r = rule("dns", 22, 22, &[]);
        r.protocol = crate::rules::Protocol::Udp;
        let rules = RuleSet {
            ingress_rules: vec![r],
            ..Default::default()
        };
        assert_eq!(admitted(&rules, &Mode::Enforce, 22).state, State::Fail);
    }

    #[test]
    fn sshd_settings_need_pubkey_and_warn_on_passwords() {
        assert_eq!(
            sshd_settings("port 22\npubkeyauthentication yes\npasswordauthentication no\n").state,
            State::Pass
        );
        assert_eq!(
            sshd_settings("pubkeyauthentication yes\npasswordauthentication yes\n").state,
            State::Warn
        );
        assert_eq!(
            sshd_settings("pubkeyauthentication no\npasswordauthentication yes\n").state,
            State::Fail
        );
        assert_eq!(sshd_settings("").state, State::Fail);
    }

    #[test]
    fn readiness_is_the_conjunction_of_gating_checks_only() {
        let view = SystemdView {
            connected: true,
            system_state: Some("starting".into()),
            ..Default::default()
        };
        let pass = Check::new("a", State::Pass, "ok");
        let mut off = Check::new("b", State::Fail, "broken but informative");
        off.gates = false;
        let r = Report::from_checks(vec![pass.clone(), off], &view);
        assert!(
            r.ready,
            "a non-gating failure and a starting system do not gate"
        );
        let unknown = Check::new("c", State::Unknown, "no bus");
        let r = Report::from_checks(vec![pass, unknown], &view);
        assert!(!r.ready);
        assert_eq!(r.failing(), vec!["c: no bus".to_string()]);
        assert_eq!(r.summary(), "not SSH-ready: c: no bus");
    }

    #[test]
    fn without_dbus_the_ssh_unit_is_unknown_and_says_why() {
        let view = SystemdView {
            error: Some("no socket".into()),
            ..Default::default()
        };
        let c = ssh_unit(&view);
        assert_eq!(c.state, State::Unknown);
        assert!(c.detail.contains("no socket"));
    }

    #[test]
    fn authorized_keys_must_not_be_writable_by_others() {
        use nix::fcntl::AT_FDCWD;
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("authorized_keys");
        std::fs::write(&file, "ssh-ed25519 AAAA x\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let uid = nix::unistd::getuid().as_raw();
        assert_eq!(
            safe_path(AT_FDCWD, &file, &file, false, uid).map(drop),
            Ok(())
        );
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o666)).unwrap();
        let err = safe_path(AT_FDCWD, &file, &file, false, uid).unwrap_err();
        assert!(
            err.contains("writable by group or others (mode 666)"),
            "{err}"
        );
        assert!(
            safe_path(AT_FDCWD, &file, &file, true, uid)
                .unwrap_err()
                .contains("not a directory")
        );
    }
}
