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
//! The report model is here; the host checks are in `probes`, systemd's
//! view over D-Bus in `systemd`.
//!
//! systemd's view comes over the system D-Bus ([`watch_systemd`]): re-read on
//! every unit's `PropertiesChanged` and on `JobRemoved`, with a 60 s poll as a
//! fallback. The daemon starts before D-Bus at boot, so the watcher keeps
//! trying until the bus appears. The host checks are cheap and run at each
//! evaluation; `sshd -T` forks, so its answer is kept for 30 s (`SSHD_CACHE`).

mod probes;
mod systemd;

use std::{
    collections::BTreeMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

pub use probes::admitted;
use probes::{admitted_on, authorized_keys, enforcing, key_auth, listening, ssh_unit};
pub use systemd::watch_systemd;

use crate::{config::ReadinessConfig, core::Core};

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
    /// Whether this check lets the host count as ready (a warning or a
    /// skipped check does).
    pub fn passes(self) -> bool {
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

/// The etcd member list's check (`[fleet]`): never gating. A warning when
/// etcd is not followed now (the last applied list stays in force) or its
/// latest revision was refused.
pub fn fleet_check(f: &crate::core::FleetStatus) -> Check {
    let age = f
        .stale_secs
        .map_or("no exchange with etcd since start".to_string(), |s| {
            format!("last exchange with etcd {s} s ago")
        });
    let (state, detail) = if let Some(e) = &f.error {
        let detail = format!(
            "etcd not followed ({age}): {e}; the member list of revision {} stays",
            f.revision
        );
        (State::Warn, detail)
    } else if let Some(why) = &f.refused {
        let detail = format!("etcd revision {} refused: {why}", f.revision);
        (State::Warn, detail)
    } else {
        let detail = format!("member list of etcd revision {} ({age})", f.revision);
        (State::Pass, detail)
    };
    Check {
        gates: false,
        ..Check::new("fleet", state, detail)
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
            interfaces: core.interfaces().clone(),
            missing: core.missing_interfaces(),
            admitted: core
                .packed_rules()
                .head()
                .ssh
                .ports
                .iter()
                .map(|&port| {
                    (
                        port,
                        admitted(core.packed_rules(), core.image(), core.mode(), port),
                    )
                })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::FirewallRule;
    use crate::{core::Mode, rules::RuleSet};
    use probes::{safe_path, sshd_settings};

    /// [`probes::admitted`] on the image of `rules`.
    fn admitted(rules: &RuleSet, mode: &Mode, port: u16) -> Check {
        let image = crate::compile::compile(rules, &Default::default()).unwrap();
        probes::admitted(
            &crate::rules::PackedSet::pack(rules).unwrap(),
            &image,
            mode,
            port,
        )
    }

    fn rule(id: &str, from: u16, to: u16, ranges: &[&str]) -> FirewallRule {
        serde_json::from_value(serde_json::json!({
            "id": id, "from_port": from, "to_port": to, "ip_ranges": ranges
        }))
        .unwrap()
    }

    /// Every ingress rule is found at its slot (peers and the SSH exemption
    /// before them, egress rules after), without the map of every id.
    #[test]
    fn each_ingress_rule_is_found_at_its_slot() {
        let mut rules: RuleSet = serde_json::from_value(serde_json::json!({
            "cluster": {"id": "c", "peers": ["10.1.0.0/16"]},
            "egress_rules": [{"id": "out", "from_port": 53, "to_port": 53, "ip_ranges": []}]
        }))
        .unwrap();
        rules.ssh.allow = true;
        for i in 0..5 {
            rules
                .ingress_rules
                .push(rule(&format!("r{i}"), 22, 22, &[]));
        }
        let image = crate::compile::compile(&rules, &Default::default()).unwrap();
        let first = probes::first_rule_slot(&image);
        let packed = crate::rules::PackedSet::pack(&rules).unwrap();
        let mut found = 0;
        for (slot, s) in image.slots.iter().enumerate() {
            let Some(id) = s.name.strip_prefix("rule:") else {
                continue;
            };
            let at = probes::at_place(&packed, first, slot as u32, id);
            if s.dir == portcullis_common::DIR_INGRESS {
                assert_eq!(at.as_ref().map(|r| r.id.as_str()), Some(id), "slot {slot}");
                found += 1;
            }
        }
        assert_eq!(found, 5);
    }

    #[test]
    fn ssh_is_admitted_by_the_exemption_or_a_covering_rule_only() {
        let mut rules = RuleSet::default();
        rules.ssh.allow = false;
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
        let mut rules = RuleSet {
            ingress_rules: vec![r],
            ..Default::default()
        };
        rules.ssh.allow = false;
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
