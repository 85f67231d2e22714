//! The core: owns the live rule set and its generation, and joins the pure
//! side (validation, compilation) to the kernel side (the data path) and the
//! disk (the state store). Every change goes through [`Core::change`]:
//! validate, compile, save, make live; a step that fails leaves the live
//! rules as they were.

use std::collections::{BTreeMap, HashMap};

use std::net::IpAddr;

use portcullis_common::{Counter, DIR_INGRESS, PCLASS_TCP, Reason, pclass_port, slot_admits};
use serde::Serialize;
use thiserror::Error;

use crate::model::unix_now;
pub use crate::model::{Mode, Pending};
use crate::{
    audit,
    compile::{self, CompileError, Image, Limits},
    dataplane::{self, Dataplane},
    rules::{FirewallRule, RuleError, RuleSet},
    state::Store,
};

/// Why a change was refused. Each maps to an HTTP status in the API.
#[derive(Debug, Error)]
pub enum ChangeError {
    #[error("invalid rule set: {0}")]
    Invalid(#[from] RuleError),
    #[error("{0}")]
    TooLarge(#[from] CompileError),
    #[error(
        "generation {expected} expected, but {current} is live: someone else changed the rules; re-read and retry"
    )]
    Conflict { expected: u64, current: u64 },
    #[error("no rule with id {0:?}")]
    NotFound(String),
    #[error("a rule with id {0:?} exists already")]
    Exists(String),
    #[error("the change would cut your own SSH session ({0}); pass force to apply it anyway")]
    LocksOutCaller(String),
    #[error(
        "generation {generation} awaits confirmation until {deadline} (Unix time); confirm it or wait for the rollback"
    )]
    AwaitingConfirmation { generation: u64, deadline: u64 },
    #[error("no change awaits confirmation")]
    NothingToConfirm,
    #[error("{0:#}")]
    Internal(anyhow::Error),
}

/// How a change is made.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Compare-and-swap: refuse unless this generation is live.
    pub expected: Option<u64>,
    pub allow_ping: Option<bool>,
    /// Only say what would change and which open flows would be cut.
    pub dry_run: bool,
    /// Apply even if it cuts the caller's own SSH session.
    pub force: bool,
    /// The caller's SSH session, when it has one.
    pub caller_session: Option<Session>,
    /// Roll back unless confirmed within this many seconds.
    pub confirm_within: Option<u64>,
}

/// An SSH session: `SSH_CONNECTION` of the caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Session {
    pub client: IpAddr,
    pub client_port: u16,
    pub server: IpAddr,
    pub server_port: u16,
}

impl std::fmt::Display for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "from {} port {} to port {}",
            self.client, self.client_port, self.server_port
        )
    }
}

impl Session {
    /// Parses `SSH_CONNECTION` ("client_ip client_port server_ip server_port").
    pub fn parse(value: &str) -> Option<Session> {
        let mut it = value.split_whitespace();
        Some(Session {
            client: it.next()?.parse().ok()?,
            client_port: it.next()?.parse().ok()?,
            server: it.next()?.parse().ok()?,
            server_port: it.next()?.parse().ok()?,
        })
    }

    /// The SSH session of process `pid` or its nearest ancestor that has one.
    pub fn of_process(mut pid: i32) -> Option<Session> {
        for _ in 0..32 {
            if let Ok(env) = std::fs::read(format!("/proc/{pid}/environ"))
                && let Some(v) = env
                    .split(|b| *b == 0)
                    .find_map(|kv| kv.strip_prefix(b"SSH_CONNECTION="))
            {
                return Session::parse(&String::from_utf8_lossy(v));
            }
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // pid (comm) state ppid ...: comm may contain spaces, so split after ')'.
            let ppid: i32 = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            if ppid <= 1 {
                return None;
            }
            pid = ppid;
        }
        None
    }
}

/// What a change changes, by rule id.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Diff {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
    pub peers_added: Vec<String>,
    pub peers_removed: Vec<String>,
    pub ssh_changed: bool,
}

impl Diff {
    pub fn between(old: &RuleSet, new: &RuleSet) -> Diff {
        let index = |s: &RuleSet| -> BTreeMap<String, crate::rules::FirewallRule> {
            s.ingress_rules
                .iter()
                .map(|r| (format!("ingress:{}", r.id), r.clone()))
                .chain(
                    s.egress_rules
                        .iter()
                        .map(|r| (format!("egress:{}", r.id), r.clone())),
                )
                .collect()
        };
        let (a, b) = (index(old), index(new));
        let peers = |s: &RuleSet| {
            s.cluster
                .as_ref()
                .map(|c| c.peers.clone())
                .unwrap_or_default()
        };
        let (pa, pb) = (peers(old), peers(new));
        Diff {
            added: b.keys().filter(|k| !a.contains_key(*k)).cloned().collect(),
            removed: a.keys().filter(|k| !b.contains_key(*k)).cloned().collect(),
            changed: a
                .iter()
                .filter(|(k, r)| b.get(*k).is_some_and(|n| n != *r))
                .map(|(k, _)| k.clone())
                .collect(),
            peers_added: pb.iter().filter(|p| !pa.contains(p)).cloned().collect(),
            peers_removed: pa.iter().filter(|p| !pb.contains(p)).cloned().collect(),
            ssh_changed: old.ssh != new.ssh,
        }
    }
}

/// The outcome of an accepted change (or of a dry run).
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Changed {
    /// The generation now live (for a dry run: still the old one).
    pub generation: u64,
    /// Hash of the (new) rule set.
    pub hash: String,
    pub dry_run: bool,
    pub diff: Diff,
    /// Open connections the change cuts (or would cut).
    pub would_cut: Vec<String>,
    /// Unix time by which the change must be confirmed, or it is rolled back.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub confirm_by: Option<u64>,
}

#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Count {
    pub packets: u64,
    pub bytes: u64,
}

impl From<Counter> for Count {
    fn from(c: Counter) -> Self {
        Count {
            packets: c.packets,
            bytes: c.bytes,
        }
    }
}

pub struct Core {
    dataplane: Dataplane,
    store: Store,
    limits: Limits,
    allow_ping: bool,
    rules: RuleSet,
    generation: u64,
    image: Image,
    /// Rule counters of earlier generations, by slot name, so totals
    /// survive changes.
    carried: HashMap<String, Count>,
    /// Protected interfaces and the XDP mode the kernel chose.
    pub interfaces: BTreeMap<String, String>,
    /// Interfaces the configuration names (empty in automatic mode): those
    /// not in `interfaces` are reported as not protected.
    configured: Vec<String>,
    /// Writes refused for lack of permission (a metric to alert on).
    pub refused_writes: u64,
    pub audit: audit::Log,
    pending: Option<Pending>,
    mode: Mode,
    /// Rules the daemon's configuration adds to every rule set (the health
    /// endpoint's); not part of the live set that is shown and saved.
    service: Vec<FirewallRule>,
    /// Who is changing what, for the record written before a change goes
    /// live (see [`Core::acting`]).
    actor: Actor,
}

/// The caller of a change, as the audit log names it.
#[derive(Clone, Debug, Default)]
pub struct Actor {
    pub uid: Option<u32>,
    pub pid: Option<i32>,
    /// What was asked (`add rule`, `reload`, ...).
    pub action: String,
}

/// Compiles `set` with the service rules appended.
fn compile_with(
    set: &RuleSet,
    service: &[FirewallRule],
    limits: &Limits,
) -> Result<Image, CompileError> {
    if service.is_empty() {
        return compile::compile(set, limits);
    }
    let mut all = set.clone();
    all.ingress_rules.extend(service.iter().cloned());
    compile::compile(&all, limits)
}

impl Core {
    /// Makes `rules` live at `generation` (at start: restored or baseline).
    pub fn start(
        mut dataplane: Dataplane,
        store: Store,
        limits: Limits,
        allow_ping: bool,
        rules: RuleSet,
        generation: u64,
        service: Vec<FirewallRule>,
    ) -> anyhow::Result<Self> {
        let image = compile_with(&rules, &service, &limits)?;
        let audit = audit::Log::open(store.dir())?;
        store.save(&rules, generation)?;
        dataplane.apply(&image, allow_ping)?;
        let mut core = Core {
            dataplane,
            store,
            limits,
            allow_ping,
            rules,
            generation,
            image,
            carried: HashMap::new(),
            interfaces: BTreeMap::new(),
            configured: Vec::new(),
            refused_writes: 0,
            audit,
            pending: None,
            mode: Mode::Enforce,
            service,
            actor: Actor::default(),
        };
        let problems = core.audit.problems().to_vec();
        if !problems.is_empty() {
            for p in &problems {
                tracing::error!(problem = %p, "the audit log is damaged");
            }
            // In the chain itself, so `audit verify` and readers see where
            // the break is and what was found.
            let outcome = audit::bounded(&format!("damaged: {}", problems.join("; ")), 2048);
            core.record(None, None, "open audit log", outcome)?;
        }
        Ok(core)
    }

    /// The interfaces the configuration names explicitly (none: automatic).
    pub fn expect_interfaces(&mut self, names: &[String]) {
        self.configured = names.to_vec();
    }

    /// Configured interfaces that are not protected (missing, or not yet
    /// attached): while there is one, the host is not protected.
    pub fn missing_interfaces(&self) -> Vec<String> {
        self.configured
            .iter()
            .filter(|n| !self.interfaces.contains_key(*n))
            .cloned()
            .collect()
    }

    /// Whether every interface to protect is protected (and there is one).
    pub fn protected(&self) -> bool {
        !self.interfaces.is_empty() && self.missing_interfaces().is_empty()
    }

    /// One line for systemd's `STATUS=` and the journal: what is protected,
    /// and, first, what is not.
    pub fn protection_summary(&self) -> String {
        let missing = self.missing_interfaces();
        if !missing.is_empty() {
            return format!(
                "not protected: {} missing (enforcing on {} interface(s))",
                missing.join(", "),
                self.interfaces.len()
            );
        }
        if self.interfaces.is_empty() {
            return "not protected: no interface to protect yet".into();
        }
        format!(
            "enforcing on {} interface(s), rules generation {}",
            self.interfaces.len(),
            self.generation
        )
    }

    pub fn dataplane(&mut self) -> &mut Dataplane {
        &mut self.dataplane
    }

    pub fn rules(&self) -> &RuleSet {
        &self.rules
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn hash(&self) -> &str {
        &self.image.hash
    }

    /// Appends an audit record of `action` by `uid`/`pid` with `outcome`,
    /// at the current generation (fsynced before this returns).
    pub fn record(
        &mut self,
        uid: Option<u32>,
        pid: Option<i32>,
        action: &str,
        outcome: String,
    ) -> anyhow::Result<()> {
        let rules_hash = self.image.hash.clone();
        let r = self.audit.append(audit::Event {
            uid,
            pid,
            action,
            outcome,
            generation: self.generation,
            rules_hash: &rules_hash,
        })?;
        // The chain head goes to the journal too, outside the log itself.
        tracing::info!(seq = r.seq, audit_head = %r.hash, action, outcome = %r.outcome, "audited");
        Ok(())
    }

    /// Names the caller of the changes that follow (until the next call):
    /// each is recorded in the audit log, as "applying", before it goes
    /// live, and a change whose record cannot be written does not go live.
    pub fn acting(&mut self, actor: Actor) {
        self.actor = actor;
    }

    /// The record written before the data path changes: who, what, and the
    /// generation and rules hash about to go live.
    fn record_intent(
        &mut self,
        generation: u64,
        hash: &str,
        what: &str,
    ) -> Result<(), ChangeError> {
        let action = if self.actor.action.is_empty() {
            what.to_string()
        } else {
            self.actor.action.clone()
        };
        let r = self
            .audit
            .append(audit::Event {
                uid: self.actor.uid,
                pid: self.actor.pid,
                action: &action,
                outcome: format!("applying: {what}"),
                generation,
                rules_hash: hash,
            })
            .map_err(|e| {
                ChangeError::Internal(e.context("cannot write the audit log; nothing changed"))
            })?;
        tracing::info!(seq = r.seq, audit_head = %r.hash, action, "audited before going live");
        Ok(())
    }

    /// Applies `edit` to a copy of the live rules and makes the result live
    /// (or, for a dry run, says what it would do). See [`Options`].
    pub fn change(
        &mut self,
        opts: &Options,
        edit: impl FnOnce(&mut RuleSet) -> Result<(), ChangeError>,
    ) -> Result<Changed, ChangeError> {
        if let Some(expected) = opts.expected
            && expected != self.generation
        {
            return Err(ChangeError::Conflict {
                expected,
                current: self.generation,
            });
        }
        if let Some(p) = &self.pending {
            return Err(ChangeError::AwaitingConfirmation {
                generation: p.generation,
                deadline: p.deadline,
            });
        }
        let mut next = self.rules.clone();
        edit(&mut next)?;
        next.validate()?;
        let image = compile_with(&next, &self.service, &self.limits)?;
        let diff = Diff::between(&self.rules, &next);
        let would_cut = self.flows_cut_by(&image);
        if let Some(session) = &opts.caller_session
            && !opts.force
            && !self.survives(session, &image)
        {
            return Err(ChangeError::LocksOutCaller(session.to_string()));
        }
        if opts.dry_run {
            return Ok(Changed {
                generation: self.generation,
                hash: image.hash.clone(),
                dry_run: true,
                diff,
                would_cut,
                confirm_by: None,
            });
        }
        let previous = (self.rules.clone(), self.allow_ping);
        let allow_ping = opts.allow_ping.unwrap_or(self.allow_ping);
        let generation = self.make_live(next, image, allow_ping)?;
        let confirm_by = opts.confirm_within.map(|secs| {
            let deadline = unix_now() + secs;
            let pending = Pending { previous: previous.0, previous_allow_ping: previous.1, generation, deadline };
            if let Err(e) = self.store.save_pending(Some(&pending)) {
                tracing::error!(error = %format!("{e:#}"), "cannot persist the pending confirmation");
            }
            self.pending = Some(pending);
            deadline
        });
        Ok(Changed {
            generation,
            hash: self.image.hash.clone(),
            dry_run: false,
            diff,
            would_cut,
            confirm_by,
        })
    }

    fn make_live(
        &mut self,
        next: RuleSet,
        image: Image,
        allow_ping: bool,
    ) -> Result<u64, ChangeError> {
        let generation = self.generation + 1;
        // Keep the counters of the generation about to go idle.
        let totals = self.rule_counters();
        // Audited first: nothing goes live without its record.
        self.record_intent(generation, &image.hash, &format!("generation {generation}"))?;
        // Durable next: a crash after this point restores the new set.
        self.store
            .save(&next, generation)
            .map_err(ChangeError::Internal)?;
        let effective = self.effective()?;
        if let Err(e) = self.dataplane.apply(
            effective.as_ref().unwrap_or(&image),
            self.effective_ping(allow_ping),
        ) {
            let _ = self.store.save(&self.rules, self.generation);
            return Err(ChangeError::Internal(e));
        }
        self.carried = totals;
        self.rules = next;
        self.image = image;
        self.generation = generation;
        self.allow_ping = allow_ping;
        crate::host::release_free_memory();
        Ok(generation)
    }

    /// In lockdown the data path runs a rule set of its own, narrower than
    /// the live one in both directions: inbound, nothing but SSH (on the SSH
    /// ports) from the admin network; outbound, the live egress allowlist
    /// when there is one (no peers, no rules added), else what passed
    /// before. Otherwise the live rules' image.
    fn effective(&self) -> Result<Option<Image>, ChangeError> {
        match &self.mode {
            Mode::Lockdown { admin } => {
                let lockdown = lockdown_rules(&self.rules, admin.as_deref());
                let mut image = compile::compile(&lockdown, &self.limits)?;
                // Outbound is an allowlist in lockdown even without egress
                // rules: nothing new leaves (an intruder's beacon included)
                // but replies, the admin's flows and what a host always sends.
                image.egress_allowlist = true;
                Ok(Some(image))
            }
            _ => Ok(None),
        }
    }

    /// Pings are admitted only outside lockdown.
    fn effective_ping(&self, allow_ping: bool) -> bool {
        allow_ping && !matches!(self.mode, Mode::Lockdown { .. })
    }

    pub fn mode(&self) -> &Mode {
        &self.mode
    }

    /// Switches the mode (audited by the caller) and makes it take effect.
    pub fn set_mode(&mut self, mode: Mode) -> Result<Changed, ChangeError> {
        self.set_mode_with(mode, &Options::default())
    }

    /// [`Core::set_mode`] as a caller asks for it: `dry_run` only says what
    /// would happen; a lockdown that would cut the caller's own SSH session
    /// (its source outside `admin`) is refused unless `force`; a
    /// confirmation window does not apply to modes and is refused, not
    /// ignored.
    pub fn set_mode_with(&mut self, mode: Mode, opts: &Options) -> Result<Changed, ChangeError> {
        let admin_net = match &mode {
            Mode::Lockdown { admin: Some(a) } => {
                Some(crate::rules::parse_cidr(a).map_err(|reason| {
                    ChangeError::Invalid(crate::rules::RuleError {
                        place: "lockdown".into(),
                        field: "admin",
                        reason,
                    })
                })?)
            }
            _ => None,
        };
        if opts.confirm_within.is_some() {
            return Err(ChangeError::Invalid(crate::rules::RuleError {
                place: "mode".into(),
                field: "confirm_within",
                reason: "a mode change has no confirmation window; `portcullis enforce` ends an emergency mode".into(),
            }));
        }
        if let (Mode::Lockdown { .. }, Some(session)) = (&mode, &opts.caller_session)
            && !opts.force
            && !admin_net.is_some_and(|net| net.contains(&session.client.to_canonical()))
        {
            return Err(ChangeError::LocksOutCaller(session.to_string()));
        }
        if opts.dry_run {
            return Ok(Changed {
                generation: self.generation,
                hash: self.image.hash.clone(),
                dry_run: true,
                diff: Diff::default(),
                would_cut: Vec::new(),
                confirm_by: None,
            });
        }
        // Lockdown: its admin network (parsed above), or none.
        let admin = matches!(mode, Mode::Lockdown { .. }).then_some(admin_net);
        if let Some(Some(admin)) = admin {
            // The admin network's open connections are "established": they
            // stay, inbound ones the rules admitted included (not in the
            // table until now).
            let open = dataplane::connections().map_err(ChangeError::Internal)?;
            let admin_open: Vec<_> = open
                .into_iter()
                .filter(|c| admin.contains(&c.remote.to_canonical()))
                .collect();
            self.dataplane
                .seed_connections(&admin_open)
                .map_err(ChangeError::Internal)?;
        }
        let what = format!("mode {}", serde_json::to_string(&mode).unwrap_or_default());
        let hash = self.image.hash.clone();
        self.record_intent(self.generation, &hash, &what)?;
        let old = std::mem::replace(&mut self.mode, mode);
        let result = self.effective().and_then(|effective| {
            self.dataplane.pass_all = matches!(self.mode, Mode::Audit | Mode::Open);
            self.dataplane
                .apply(
                    effective.as_ref().unwrap_or(&self.image),
                    self.effective_ping(self.allow_ping),
                )
                .map_err(ChangeError::Internal)
        });
        if let Err(e) = result {
            self.mode = old;
            self.dataplane.pass_all = matches!(self.mode, Mode::Audit | Mode::Open);
            return Err(e);
        }
        if let Some(admin) = admin {
            // Every other open flow is cut (an intruder's session included).
            let cut = self
                .dataplane
                .cut_flows(|remote| admin.is_some_and(|net| net.contains(&remote)))
                .map_err(ChangeError::Internal)?;
            tracing::warn!(
                flows = cut,
                "lockdown: cut the open flows not with the admin network"
            );
        }
        self.store
            .save_mode(&self.mode)
            .map_err(ChangeError::Internal)?;
        Ok(Changed {
            generation: self.generation,
            hash: self.image.hash.clone(),
            dry_run: false,
            diff: Diff::default(),
            would_cut: Vec::new(),
            confirm_by: None,
        })
    }

    /// Restores the mode saved before a restart.
    pub fn restore_mode(&mut self) -> anyhow::Result<()> {
        let mode = self.store.load_mode()?;
        let mode = match mode {
            // A lockdown that admits nobody survives a daemon restart but
            // not a reboot: a reboot is how an operator without a console
            // gets a locked-out machine back (docs/security.md).
            Mode::Lockdown { admin: None } if self.store.mode_is_from_an_earlier_boot() => {
                tracing::warn!(
                    "a lockdown without an admin network ended with the reboot; enforcing"
                );
                self.store.save_mode(&Mode::Enforce)?;
                Mode::Enforce
            }
            mode => mode,
        };
        if mode != Mode::Enforce {
            tracing::warn!(
                ?mode,
                "restoring a non-enforcing mode saved before the restart"
            );
            self.set_mode(mode).map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        Ok(())
    }

    /// The change awaiting confirmation, if any.
    pub fn pending(&self) -> Option<&Pending> {
        self.pending.as_ref()
    }

    /// Confirms the pending change: it stays.
    pub fn confirm(&mut self) -> Result<u64, ChangeError> {
        let Some(p) = self.pending.take() else {
            return Err(ChangeError::NothingToConfirm);
        };
        self.store
            .save_pending(None)
            .map_err(ChangeError::Internal)?;
        Ok(p.generation)
    }

    /// Rolls back the pending change of `generation` (its window ended: the
    /// caller's timer is monotonic, so a clock step neither delays nor
    /// hastens it); returns the generation that restored the previous rules.
    /// `Ok(None)` when that change is no longer pending (confirmed). On a
    /// failure the change stays pending, so a retry can still roll it back.
    pub fn roll_back(&mut self, generation: u64) -> Result<Option<u64>, ChangeError> {
        let Some(p) = self.pending.clone() else {
            return Ok(None);
        };
        if p.generation != generation {
            return Ok(None);
        }
        let image = compile_with(&p.previous, &self.service, &self.limits)?;
        // `make_live` refuses nothing on account of the pending change; it
        // stays set until the previous rules are live.
        let restored = self.make_live(p.previous, image, p.previous_allow_ping)?;
        self.pending = None;
        self.store
            .save_pending(None)
            .map_err(ChangeError::Internal)?;
        Ok(Some(restored))
    }

    /// Seconds until the pending change's deadline (0: due now).
    pub fn pending_remaining(&self) -> Option<(u64, u64)> {
        self.pending
            .as_ref()
            .map(|p| (p.generation, p.deadline.saturating_sub(unix_now())))
    }

    /// Restores a confirmation that was pending when the daemon stopped.
    /// A damaged record is reported (journal and audit log) and dropped: the
    /// live rules stay as they are, and the daemon keeps enforcing them.
    pub fn restore_pending(&mut self) -> anyhow::Result<()> {
        match self.store.load_pending() {
            Ok(pending) => self.pending = pending,
            Err(e) => {
                let e = format!("{e:#}");
                tracing::error!(error = %e, "the change awaiting confirmation cannot be restored; the live rules stay and nothing will roll back");
                self.record(
                    None,
                    None,
                    "restore pending change",
                    format!("refused: {e}"),
                )?;
                self.store.save_pending(None)?;
            }
        }
        Ok(())
    }

    /// Open connections that `image` would cut: admitted by the live rules
    /// (not by the connection table) and not by `image`.
    fn flows_cut_by(&mut self, image: &Image) -> Vec<String> {
        let Ok(connections) = dataplane::connections() else {
            return Vec::new();
        };
        connections
            .into_iter()
            .filter(|c| {
                let (pclass, port) = pclass_port(c.proto, c.local_port);
                let remote = c.remote.to_canonical();
                let admitted = |img: &Image| {
                    let slot = img.lookup(DIR_INGRESS, remote, pclass, port);
                    slot_admits(slot)
                };
                !self.dataplane.has_flow(&dataplane::flow_key(c))
                    && admitted(&self.image)
                    && !admitted(image)
            })
            .map(|c| {
                let proto = if c.proto == portcullis_common::IPPROTO_TCP {
                    "tcp"
                } else {
                    "udp"
                };
                format!(
                    "{proto} {} -> {}",
                    std::net::SocketAddr::new(c.remote, c.remote_port),
                    std::net::SocketAddr::new(c.local, c.local_port)
                )
            })
            .collect()
    }

    /// Whether the SSH session `s` keeps working under `image`.
    fn survives(&mut self, s: &Session, image: &Image) -> bool {
        let conn = crate::model::Connection {
            proto: portcullis_common::IPPROTO_TCP,
            local: s.server,
            local_port: s.server_port,
            remote: s.client,
            remote_port: s.client_port,
            tcp_syn_sent: false,
        };
        if self.dataplane.has_flow(&dataplane::flow_key(&conn)) {
            return true;
        }
        let slot = image.lookup(
            DIR_INGRESS,
            s.client.to_canonical(),
            PCLASS_TCP,
            s.server_port,
        );
        slot_admits(slot)
    }

    /// Packets and bytes per rule (by slot name: `rule:<id>`, `cluster:<id>`,
    /// `ssh`), over every generation since the daemon started.
    pub fn rule_counters(&mut self) -> HashMap<String, Count> {
        let mut totals = self.carried.clone();
        if let Ok(live) = self.dataplane.rule_counters(self.image.slots.len()) {
            for (slot, c) in self.image.slots.iter().zip(live).skip(1) {
                let t = totals.entry(slot.name.clone()).or_default();
                t.packets += c.packets;
                t.bytes += c.bytes;
            }
        }
        totals
    }

    /// Verdict counters by reason.
    pub fn reason_counters(&self) -> anyhow::Result<Vec<(Reason, Count)>> {
        Ok(dataplane::read_counters(self.dataplane.pin_dir())?
            .into_iter()
            .map(|(r, c)| (r, c.into()))
            .collect())
    }
}

/// The rule set the data path runs in lockdown (see [`Core::effective`]).
///
/// SSH is admitted from the admin network only where the live rules admit
/// it already (the exemption, or else ingress rules covering an SSH port):
/// the intersection, so lockdown never admits SSH from more addresses than
/// before.
pub fn lockdown_rules(live: &RuleSet, admin: Option<&str>) -> RuleSet {
    use ipnet::IpNet;
    let admin: Option<IpNet> = admin.and_then(|a| crate::rules::parse_cidr(a).ok());
    let live_ssh: Vec<IpNet> = if live.ssh.allow {
        live.ssh.networks().unwrap_or_default()
    } else {
        live.ingress_rules
            .iter()
            .filter(|r| live.ssh.ports.iter().any(|&p| r.admits_tcp_port(p)))
            .flat_map(|r| r.networks())
            .collect()
    };
    let mut sources: Vec<IpNet> = Vec::new();
    if let Some(admin) = admin {
        for net in live_ssh {
            let both = if admin.contains(&net) {
                Some(net)
            } else if net.contains(&admin) {
                Some(admin)
            } else {
                None
            };
            if let Some(n) = both
                && !sources.contains(&n)
            {
                sources.push(n);
            }
        }
    }
    RuleSet {
        ssh: crate::rules::Ssh {
            allow: !sources.is_empty(),
            sources: sources.iter().map(ToString::to_string).collect(),
            ports: live.ssh.ports.clone(),
        },
        egress_rules: live.egress_rules.clone(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live(allow: bool, sources: &[&str]) -> RuleSet {
        RuleSet {
            ssh: crate::rules::Ssh {
                allow,
                sources: sources.iter().map(ToString::to_string).collect(),
                ports: vec![22],
            },
            ..Default::default()
        }
    }

    #[test]
    fn lockdown_admits_ssh_only_where_both_the_admin_network_and_the_live_rules_do() {
        let ssh = |set: &RuleSet, admin: &str| lockdown_rules(set, Some(admin)).ssh;
        // Admin inside the live sources: the admin network.
        let s = ssh(&live(true, &["10.0.0.0/8"]), "10.1.0.0/16");
        assert_eq!(
            (s.allow, s.sources),
            (true, vec!["10.1.0.0/16".to_string()])
        );
        // Admin wider than the live sources: still only the live sources.
        let s = ssh(&live(true, &["10.1.2.0/24"]), "10.0.0.0/8");
        assert_eq!(
            (s.allow, s.sources),
            (true, vec!["10.1.2.0/24".to_string()])
        );
        // Disjoint, or the exemption off with no rule for port 22: no SSH.
        assert!(!ssh(&live(true, &["192.0.2.0/24"]), "10.0.0.0/8").allow);
        assert!(!ssh(&live(false, &[]), "10.0.0.0/8").allow);
        // The exemption off but a rule admitting 22 from 10/8: that.
        let mut set = live(false, &[]);
        set.ingress_rules.push(crate::rules::FirewallRule {
            id: "ssh".into(),
            from_port: 22,
            to_port: 22,
            ip_ranges: vec!["10.0.0.0/8".into()],
            protocol: crate::rules::Protocol::Tcp,
            description: None,
        });
        let s = ssh(&set, "10.9.0.0/16");
        assert_eq!(
            (s.allow, s.sources),
            (true, vec!["10.9.0.0/16".to_string()])
        );
        // Without an admin network, nobody.
        assert!(!lockdown_rules(&live(true, &[]), None).ssh.allow);
    }
}
