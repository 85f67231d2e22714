//! The core: owns the live rule set and its generation, and joins the pure
//! side (validation, compilation) to the kernel side (the data path) and the
//! disk (the state store). Every change goes through [`Core::change`]:
//! validate, compile, save, make live; a step that fails leaves the live
//! rules as they were.

use std::collections::{BTreeMap, HashMap, HashSet};

use std::net::IpAddr;

use portcullis_common::{Counter, PCLASS_TCP, Reason, pclass_port};
use serde::{Deserialize, Serialize};
use thiserror::Error;

mod deny;
mod expiry;
mod explain;
mod fleet;
pub mod fqdn;
mod ratelimit;
mod volume;

use crate::model::unix_now;
pub use crate::model::{Mode, Pending};
use crate::{
    audit,
    compile::{self, CompileError, Image, Limits},
    dataplane::{self, Dataplane},
    rules::{EditError, FirewallRule, PackedSet, RuleError, RuleSet},
    state::Store,
};
pub use deny::{DenyChanged, DenyListed, DenySetView};
pub use fleet::{FleetApplied, FleetStatus};
pub use volume::VolumeStatus;

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
    #[error("{0}")]
    Edit(#[from] EditError),
    #[error("the change would cut your own SSH session ({0}); use --force to apply it anyway")]
    LocksOutCaller(String),
    #[error(
        "the change turns SSH off for your own session's source ({0}): your next login would be dropped; use --force to apply it anyway"
    )]
    BlocksNextLogin(String),
    #[error(
        "the reload would turn SSH off for the open SSH session(s) {} (whoever reloads, `systemctl reload` and SIGHUP included, may be one of them); run `portcullis reload --force` to apply it anyway",
        .0.join(", ")
    )]
    LocksOutOpenSessions(Vec<String>),
    #[error(
        "the reload would drop runtime changes not in the configuration: {}; `portcullis rules save` makes them permanent, `portcullis reload --discard-runtime` drops them",
        .0.join(", ")
    )]
    RuntimeChanges(Vec<String>),
    #[error("{0}")]
    Config(String),
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
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Diff {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
    pub peers_added: Vec<String>,
    pub peers_removed: Vec<String>,
    pub ssh_changed: bool,
    /// The egress policy changed: `allowlist -> allow`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_changed: Option<String>,
}

impl Diff {
    /// Adds the rules of one list that `new` adds, removes or changes
    /// against `old` (ids are unique in a valid set). Rules at the same
    /// place with the same id, the common case (a set sent again, or
    /// edited), are compared there; only the others are matched by id, so a
    /// 100k-rule set is not hashed whole.
    fn compare(&mut self, list: &str, old: &[FirewallRule], new: &[FirewallRule]) {
        let key = |r: &FirewallRule| format!("{list}:{}", r.id);
        let mut old_rest: HashMap<&str, &FirewallRule> = HashMap::new();
        let mut new_rest = Vec::new();
        for i in 0..old.len().max(new.len()) {
            match (old.get(i), new.get(i)) {
                (Some(a), Some(b)) if a.id == b.id => {
                    if a != b {
                        self.changed.push(key(b));
                    }
                }
                (a, b) => {
                    old_rest.extend(a.map(|a| (a.id.as_str(), a)));
                    new_rest.extend(b);
                }
            }
        }
        for b in new_rest {
            match old_rest.remove(b.id.as_str()) {
                Some(a) if a != b => self.changed.push(key(b)),
                Some(_) => {}
                None => self.added.push(key(b)),
            }
        }
        self.removed.extend(old_rest.into_values().map(key));
    }

    /// What a change did, as a journal line reads it: `+https -web ~api
    /// +peer 10.0.0.0/8 ssh`.
    pub fn summary(&self) -> Vec<String> {
        let id = |k: &String| {
            k.split_once(':')
                .map_or(k.clone(), |(_, id)| id.to_string())
        };
        let mut out: Vec<String> = self.added.iter().map(|k| format!("+{}", id(k))).collect();
        out.extend(self.removed.iter().map(|k| format!("-{}", id(k))));
        out.extend(self.changed.iter().map(|k| format!("~{}", id(k))));
        out.extend(self.peers_added.iter().map(|p| format!("+peer {p}")));
        out.extend(self.peers_removed.iter().map(|p| format!("-peer {p}")));
        if self.ssh_changed {
            out.push("ssh".into());
        }
        if let Some(e) = &self.egress_changed {
            out.push(format!("egress {e}"));
        }
        out
    }

    pub fn between(old: &RuleSet, new: &RuleSet) -> Diff {
        fn peers(s: &RuleSet) -> Vec<&String> {
            s.cluster.iter().flat_map(|c| &c.peers).collect()
        }
        let mut rules = Diff::default();
        rules.compare("ingress", &old.ingress_rules, &new.ingress_rules);
        rules.compare("egress", &old.egress_rules, &new.egress_rules);
        // As the journal and the API list them: `list:id`, sorted.
        for keys in [&mut rules.added, &mut rules.removed, &mut rules.changed] {
            keys.sort_unstable();
        }
        let (pa, pb) = (peers(old), peers(new));
        let (in_a, in_b): (HashSet<&String>, HashSet<&String>) =
            (pa.iter().copied().collect(), pb.iter().copied().collect());
        Diff {
            added: rules.added,
            removed: rules.removed,
            changed: rules.changed,
            peers_added: pb
                .iter()
                .filter(|p| !in_a.contains(*p))
                .map(|p| p.to_string())
                .collect(),
            peers_removed: pa
                .iter()
                .filter(|p| !in_b.contains(*p))
                .map(|p| p.to_string())
                .collect(),
            ssh_changed: old.ssh != new.ssh,
            egress_changed: (old.egress_policy() != new.egress_policy())
                .then(|| format!("{} -> {}", old.egress_policy(), new.egress_policy())),
        }
    }
}

/// The outcome of an accepted change (or of a dry run).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
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

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
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
    /// The live rule set, packed (see [`PackedSet`]): a change unpacks it.
    rules: PackedSet,
    generation: u64,
    image: Image,
    /// Rule counters of earlier generations, by slot name, so totals
    /// survive changes.
    carried: HashMap<String, Count>,
    /// Protected interfaces and the XDP mode the kernel chose.
    interfaces: BTreeMap<String, String>,
    /// Interfaces the configuration names (empty in automatic mode): those
    /// not in `interfaces` are reported as not protected.
    configured: Vec<String>,
    /// Writes refused for lack of permission (a metric to alert on).
    refused_writes: u64,
    audit: audit::Log,
    pending: Option<Pending>,
    /// The last change rolled back for want of confirmation, since start.
    last_rollback: Option<Rollback>,
    mode: Mode,
    /// Rules the daemon's configuration adds to every rule set (the health
    /// endpoint's); not part of the live set that is shown and saved.
    service: Vec<FirewallRule>,
    /// Who is changing what, for the record written before a change goes
    /// live (see [`Core::acting`]).
    actor: Actor,
    /// The configuration's rule set at the last apply: what differs from
    /// it in the live set is a runtime change (see [`crate::reload`]).
    baseline: RuleSet,
    /// The configuration file and what it said at start (the settings only
    /// a restart applies are compared with it).
    config: Option<(std::path::PathBuf, crate::config::Config)>,
    /// The deny sets (see `core/deny.rs`).
    deny: crate::denylist::Sets,
    /// Egress volume per destination (see `core/volume.rs`).
    volume: crate::volume::Ledger,
    volume_on: bool,
    /// Their names by id, shared with the drop-event feed.
    deny_names: crate::model::DenySetNames,
    /// The CrowdSec bouncer's state, when one runs (see `bouncer`).
    pub crowdsec: Option<crate::crowdsec::BouncerStatus>,
    /// The DNS forwarder's status, when one runs (see `core/fqdn.rs`).
    pub dns: Option<fqdn::DnsStatus>,
    /// Whether DNS flows were cut since the DNS guard turned on.
    dns_flows_cut: bool,
    /// The etcd member list, when `[fleet]` is set (see `core/fleet.rs`).
    fleet: Option<fleet::FleetState>,
    /// A change freed memory (the old set, its compile, the request):
    /// [`Garbage::release`] gives it back once the request is done.
    trim_due: bool,
    /// [`Core::runtime_changes`], worked out once per live set and baseline
    /// (status asks it: it would unpack 100k rules each time).
    runtime: std::cell::OnceCell<Vec<String>>,
    /// The sets a change unpacked and made, freed by
    /// [`Garbage::release`] after the request was answered (freeing
    /// 100k rules takes tens of ms).
    replaced: Vec<RuleSet>,
}

/// The sets a change unpacked and made, and whether it freed heap to give
/// back to the system (see [`Core::take_garbage`]).
#[must_use = "garbage is released by `Garbage::release`"]
pub struct Garbage {
    sets: Vec<RuleSet>,
    trim: bool,
}

impl Garbage {
    /// Nothing to free: no change since the last sweep.
    pub fn is_empty(&self) -> bool {
        self.sets.is_empty() && !self.trim
    }

    /// Frees the sets, then returns the heap the change freed to the
    /// system (`malloc_trim`), once per change.
    pub fn release(self) {
        drop(self.sets);
        if self.trim {
            crate::host::release_free_memory();
        }
    }
}

/// How a reload is made (`POST /v1/reload`, SIGHUP).
#[derive(Clone, Debug, Default)]
pub struct ReloadOptions {
    /// Only say what would change.
    pub dry_run: bool,
    /// Drop runtime changes the new configuration would undo (audited).
    pub discard_runtime: bool,
    /// Apply even if it cuts the caller's own SSH session.
    pub force: bool,
    pub caller_session: Option<Session>,
}

/// The outcome of a reload (or of a dry run).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Reloaded {
    pub config: String,
    pub dry_run: bool,
    /// The generation now live (for a dry run: still the old one).
    pub generation: u64,
    pub hash: String,
    /// What changed: `+https`, `-web`, `~api`, `+peer CIDR`, `ssh`,
    /// `allow_ping: false -> true`.
    pub changes: Vec<String>,
    pub diff: Diff,
    pub would_cut: Vec<String>,
    /// Settings that differ from what the daemon started with and that only
    /// a restart applies.
    pub restart_needed: Vec<String>,
    /// Runtime changes dropped by `--discard-runtime`.
    pub discarded: Vec<String>,
}

/// The caller of a change, as the audit log names it.
#[derive(Clone, Debug, Default)]
pub struct Actor {
    pub uid: Option<u32>,
    pub pid: Option<i32>,
    /// What was asked (`add rule`, `reload`, ...).
    pub action: String,
}

/// Appends the audit record of a change about to go live (generation
/// `generation`, rules `hash`) by `actor`: nothing goes live without it.
fn record_intent(
    audit: &mut audit::Log,
    actor: &Actor,
    generation: u64,
    hash: &str,
    what: &str,
) -> Result<(), ChangeError> {
    let action = if actor.action.is_empty() {
        what.to_string()
    } else {
        actor.action.clone()
    };
    let r = audit
        .append(audit::Event {
            uid: actor.uid,
            pid: actor.pid,
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

/// What writing a change touches, lent by the core to the thread that
/// writes while the core's own thread packs the set (see
/// `Core::make_live`).
struct Writer<'a> {
    audit: &'a mut audit::Log,
    dataplane: &'a mut Dataplane,
    store: &'a Store,
    actor: &'a Actor,
    /// No service rules: the image's JSON and hash are the set's.
    canonical: bool,
}

impl Writer<'_> {
    /// Audits, saves and writes `next` (compiled: `image`; the data path
    /// gets `shown`, the lockdown set's image in lockdown) as
    /// `generation`: the audit record and the set on disk (a crash after
    /// this restores it) beside the write of the data path's idle
    /// generation, then the switch to that generation, only once all three
    /// are done. On a failure after the save, the store goes back to the
    /// live set (`live`, at generation `live_generation`).
    fn write(
        &mut self,
        generation: u64,
        next: &RuleSet,
        image: &Image,
        shown: &Image,
        ping: bool,
        (live, live_generation): (&PackedSet, u64),
    ) -> Result<(), ChangeError> {
        let (audit, store, actor, canonical) =
            (&mut *self.audit, self.store, self.actor, self.canonical);
        let dataplane = std::sync::Mutex::new(&mut *self.dataplane);
        let (durable, written) = crate::parallel::both(
            "write",
            || {
                let what = format!("generation {generation}");
                record_intent(audit, actor, generation, &image.hash, &what)?;
                if canonical && !image.json.is_empty() {
                    store.save_canonical(generation, &image.hash, &image.json)
                } else {
                    store.save(next, generation)
                }
                .map_err(ChangeError::Internal)
            },
            || match dataplane.lock() {
                Ok(mut dp) => dp.write_idle(shown, ping),
                Err(_) => Err(anyhow::anyhow!(
                    "the write of generation {generation} was left half done"
                )),
            },
        );
        // Nothing goes live without its record, nor before a crash would
        // restore it.
        durable?;
        let switched = written
            .and_then(|g| self.dataplane.switch_to(g))
            .map_err(ChangeError::Internal);
        if switched.is_err() {
            let _ = self.store.save(&live.unpack(), live_generation);
        }
        switched
    }
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
        let mut image = image;
        image.strip();
        let mut core = Core {
            dataplane,
            store,
            limits,
            allow_ping,
            rules: PackedSet::pack(&rules)?,
            baseline: rules,
            generation,
            image,
            carried: HashMap::new(),
            interfaces: BTreeMap::new(),
            configured: Vec::new(),
            refused_writes: 0,
            audit,
            pending: None,
            last_rollback: None,
            mode: Mode::Enforce,
            service,
            actor: Actor::default(),
            config: None,
            deny: Default::default(),
            volume: Default::default(),
            volume_on: false,
            deny_names: Default::default(),
            crowdsec: None,
            dns: None,
            dns_flows_cut: false,
            fleet: None,
            trim_due: true,
            runtime: std::cell::OnceCell::new(),
            replaced: Vec::new(),
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

    /// Protected interfaces and the XDP mode the kernel chose for each.
    pub fn interfaces(&self) -> &BTreeMap<String, String> {
        &self.interfaces
    }

    /// Attaches the egress program to `ifname`: flows this host opens
    /// through it from now on are recorded (the first step of protecting it).
    pub fn record_outbound(
        &mut self,
        ifname: &str,
        tc: crate::config::TcAttachMode,
    ) -> anyhow::Result<dataplane::Attach> {
        self.dataplane.attach_egress(ifname, tc)
    }

    /// Seeds the connection table with the connections open now, so they
    /// survive the ingress filter; returns (open, seeded).
    pub fn seed_open_connections(&mut self) -> anyhow::Result<(usize, usize)> {
        let existing = dataplane::connections()?;
        let seeded = self.dataplane.seed_connections(&existing)?;
        Ok((existing.len(), seeded))
    }

    /// Attaches the ingress filter to `ifname` (egress first: see
    /// [`Core::protect`]).
    pub fn enforce_on(&mut self, ifname: &str) -> anyhow::Result<dataplane::Attach> {
        self.dataplane.attach_ingress(ifname)
    }

    /// Protects a new interface: egress, then ingress.
    pub fn protect(
        &mut self,
        ifname: &str,
        tc: crate::config::TcAttachMode,
    ) -> anyhow::Result<dataplane::Attach> {
        // A rule may name this interface: its rule list before it is
        // enforced (the live generation's `IFDIR` entry).
        let image = self.effective()?.unwrap_or_else(|| self.image.clone());
        self.dataplane.refresh_if_dirs(&image)?;
        self.record_outbound(ifname, tc)?;
        self.enforce_on(ifname)
    }

    /// Records that `ifname` is protected, with the XDP mode the kernel chose.
    pub fn protected_as(&mut self, ifname: &str, xdp_mode: String) {
        self.interfaces.insert(ifname.to_string(), xdp_mode);
    }

    /// Forgets an interface that went away; whether it was protected.
    pub fn interface_gone(&mut self, ifname: &str) -> bool {
        self.interfaces.remove(ifname).is_some()
    }

    /// The drop-event ring buffer (taken once, by the event feed).
    pub fn take_events(&mut self) -> anyhow::Result<aya::maps::RingBuf<aya::maps::MapData>> {
        self.dataplane.take_events()
    }

    /// Flows in the connection table, and its capacity.
    pub fn conntrack_usage(&mut self) -> anyhow::Result<(usize, u32)> {
        self.dataplane.conntrack_usage()
    }

    /// The ingress program variant loaded.
    pub fn ingress_program(&self) -> &'static str {
        self.dataplane.ingress_program()
    }

    /// Counts a write refused for lack of permission.
    pub fn refused_write(&mut self) {
        self.refused_writes += 1;
    }

    /// Writes refused for lack of permission since the daemon started.
    pub fn refused_writes(&self) -> u64 {
        self.refused_writes
    }

    /// The audit log's chain head.
    pub fn audit_head(&self) -> &str {
        self.audit.head()
    }

    /// The live rule set, unpacked (a copy: 100k rules take tens of ms).
    pub fn rules(&self) -> RuleSet {
        self.rules.unpack()
    }

    /// The live rule set as the core keeps it: what asks a few of its
    /// rules, or its SSH exemption, asks here without unpacking 100k.
    pub fn packed_rules(&self) -> &PackedSet {
        &self.rules
    }

    /// The live rules' image as the core keeps it: stripped (see
    /// [`Image::strip`]), its questions answered from its index.
    pub fn image(&self) -> &Image {
        &self.image
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
        record_intent(&mut self.audit, &self.actor, generation, hash, what)
    }

    /// Applies `edit` to a copy of the live rules and makes the result live
    /// (or, for a dry run, says what it would do). See [`Options`].
    pub fn change(
        &mut self,
        opts: &Options,
        edit: impl FnOnce(&mut RuleSet) -> Result<(), ChangeError>,
    ) -> Result<Changed, ChangeError> {
        self.change_edit(opts, |_, next| edit(next))
    }

    /// As [`Core::change`], with `edit` also shown the live set (the copy
    /// it edits: [`Core::unpacked_twice`]).
    pub fn change_edit(
        &mut self,
        opts: &Options,
        edit: impl FnOnce(&RuleSet, &mut RuleSet) -> Result<(), ChangeError>,
    ) -> Result<Changed, ChangeError> {
        self.may_change(opts)?;
        let (live, mut next) = self.unpacked_twice();
        edit(&live, &mut next)?;
        self.change_from(opts, live, next, None, None)
    }

    /// The live set unpacked twice, on two threads: one to compare with,
    /// one to edit (a copy of 100k rules costs what unpacking them does).
    fn unpacked_twice(&self) -> (RuleSet, RuleSet) {
        let rules = &self.rules;
        crate::parallel::both_over(rules.len(), "unpack", || rules.unpack(), || rules.unpack())
    }

    /// Adds `rule` to the `direction` list (see [`Core::change`]). An
    /// ingress rule that names no host or interface is checked alone, and
    /// the change is known to only append ([`RuleSet::add_checked`]).
    pub fn add_rule(
        &mut self,
        opts: &Options,
        direction: crate::rules::Direction,
        rule: FirewallRule,
    ) -> Result<Changed, ChangeError> {
        self.may_change(opts)?;
        let appends = crate::rules::checked_alone(direction, &rule).then_some(true);
        let (live, mut next) = self.unpacked_twice();
        let valid = next.add_checked(&live, direction, rule)?;
        self.change_from(opts, live, next, Some(valid), appends)
    }

    /// As [`Core::change`], with the next set made by `make` from a borrow
    /// of the live one.
    pub fn change_to(
        &mut self,
        opts: &Options,
        make: impl FnOnce(&RuleSet) -> Result<RuleSet, ChangeError>,
    ) -> Result<Changed, ChangeError> {
        self.may_change(opts)?;
        let live = self.rules.unpack();
        let next = make(&live)?;
        self.change_from(opts, live, next, None, None)
    }

    /// Replaces the live rules with `replacement` (see [`Core::change`]).
    /// The new set needs only the live set's head, so it is validated
    /// while the live set is unpacked on a second thread (for the diff and
    /// the checks against it); errors come in the order of
    /// [`Core::change_to`]'s, and the set is compiled only once every check
    /// passed.
    pub fn replace(
        &mut self,
        opts: &Options,
        replacement: crate::rules::Replacement,
    ) -> Result<Changed, ChangeError> {
        self.may_change(opts)?;
        let next = replacement.over(self.rules.head());
        let rules = &self.rules;
        let weight = next.rule_count() + rules.len();
        let (valid, live) =
            crate::parallel::both_over(weight, "unpack", || next.validate(), || rules.unpack());
        next.check_additions(&live)?;
        self.change_from(opts, live, next, Some(valid), None)
    }

    /// Refuses a change while another waits for its confirmation, or when
    /// the caller expected another generation.
    fn may_change(&self, opts: &Options) -> Result<(), ChangeError> {
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
        Ok(())
    }

    /// Checks `next` (validated already when `valid` is its result)
    /// against `live` and the host, compiles it and makes it live, or says
    /// what it would do. `appends`: `live.only_appends(&next)`, when the
    /// caller knows it.
    fn change_from(
        &mut self,
        opts: &Options,
        live: RuleSet,
        next: RuleSet,
        valid: Option<Result<(), RuleError>>,
        appends: Option<bool>,
    ) -> Result<Changed, ChangeError> {
        valid.unwrap_or_else(|| next.validate())?;
        self.check_interfaces(&next)?;
        self.check_forwarder(&next)?;
        next.check_expiries(&live, unix_now())?;
        debug_assert!(appends.is_none_or(|known| known == live.only_appends(&next)));
        let appends = appends.unwrap_or_else(|| live.only_appends(&next));
        let image = self.compile_next(&live, &next, appends)?;
        let diff = Diff::between(&live, &next);
        // Listing the open connections walks the kernel's socket tables
        // (milliseconds however few there are): not for a change that
        // only adds.
        let would_cut = if appends {
            Vec::new()
        } else {
            self.flows_cut_by(&image)
        };
        if let Some(session) = &opts.caller_session
            && !opts.force
            && !self.survives(session, &image)
        {
            return Err(ChangeError::LocksOutCaller(session.to_string()));
        }
        // A session that survives on its open flow still loses its next
        // login when SSH is turned off for its source.
        if let Some(session) = &opts.caller_session
            && !opts.force
            && blocks_login(session, &self.image, &image)
        {
            return Err(ChangeError::BlocksNextLogin(session.to_string()));
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
        // The set to roll back to, kept only when a confirmation is asked.
        let previous = opts.confirm_within.map(|_| (live.clone(), self.allow_ping));
        let allow_ping = opts.allow_ping.unwrap_or(self.allow_ping);
        let generation = self.make_live(next, image, allow_ping, Some(&live));
        self.replaced.push(live);
        let generation = generation?;
        let confirm_by = opts.confirm_within.zip(previous).map(|(secs, previous)| {
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

    /// `next` compiled: over the live generation's maps when it only
    /// appends ingress rules of IPv4 sources and the data plane can take
    /// the delta (see [`compile::append`]: a single add into 100k rules
    /// writes a few cells and regions, not the whole image), else whole.
    /// `appends`: `live.only_appends(next)`, which the caller has.
    fn compile_next(
        &mut self,
        live: &RuleSet,
        next: &RuleSet,
        appends: bool,
    ) -> Result<Image, CompileError> {
        let plain = self.service.is_empty() && !matches!(self.mode, Mode::Lockdown { .. });
        if plain && appends {
            match self.dataplane.live_arrays(&self.image.hash) {
                Ok(Some((maps, base))) => {
                    if let Some(image) =
                        compile::append(live, &self.image, next, &maps, base, &self.limits)
                    {
                        if let Some(d) = &image.delta {
                            tracing::info!(
                                root_cells = d.root.len(),
                                chunk_cells = d.chunks.len(),
                                regions = d.regions.len(),
                                segments = d.segments.len(),
                                "rules appended: compiled as a delta over the live maps"
                            );
                        }
                        return Ok(image);
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "cannot read the live rule maps; compiling the whole set");
                }
            }
        }
        compile_with(next, &self.service, &self.limits)
    }

    /// Makes `next` (compiled: `image`) the live set. `live`: the live set
    /// unpacked, when the caller has it (its unchanged rules are not packed
    /// again).
    fn make_live(
        &mut self,
        next: RuleSet,
        image: Image,
        allow_ping: bool,
        live: Option<&RuleSet>,
    ) -> Result<u64, ChangeError> {
        let generation = self.generation + 1;
        // A set the core cannot keep changes nothing. One that fits packs
        // without fail: here, while a second thread writes it (system calls
        // and disk flushes; 100k rules take about 100 ms to pack). The
        // packed set is made on this thread so that it lives in the main
        // arena of the allocator: kept in the second thread's, it held
        // that arena's pages after the change's garbage was freed.
        PackedSet::fits(&next).map_err(|e| ChangeError::Internal(e.into()))?;
        // Keep the counters of the generation about to go idle.
        let totals = self.totals(true);
        // In lockdown, the data path gets the lockdown set of the rules
        // going live.
        let effective = self.effective_for(Some(&next))?;
        let shown = effective.as_ref().unwrap_or(&image);
        let ping = self.effective_ping(allow_ping);
        // The fields the write changes, lent to the second thread; the
        // live set stays in place, read by both.
        let writer = std::sync::Mutex::new(Writer {
            audit: &mut self.audit,
            dataplane: &mut self.dataplane,
            store: &self.store,
            actor: &self.actor,
            canonical: self.service.is_empty(),
        });
        // (A small set's repack is quick: the write, with its own second
        // thread for the disk, goes on here.)
        let (packed, written) = crate::parallel::both_over(
            next.rule_count(),
            "write",
            || match live {
                Some(live) => self.rules.repack(live, &next),
                None => PackedSet::pack(&next),
            },
            || match writer.lock() {
                Ok(mut w) => w.write(
                    generation,
                    &next,
                    &image,
                    shown,
                    ping,
                    (&self.rules, self.generation),
                ),
                Err(_) => Err(ChangeError::Internal(anyhow::anyhow!(
                    "the write of generation {generation} was left half done"
                ))),
            },
        );
        let packed = match (written, packed) {
            (Ok(()), Ok(packed)) => packed,
            (Err(e), _) => return Err(e),
            (Ok(()), Err(e)) => {
                // Not reached: `fits` said the set packs. If it were, the
                // live set goes back where it was.
                self.restore_live();
                return Err(ChangeError::Internal(e.into()));
            }
        };
        self.carried = totals;
        self.rules = packed;
        self.runtime = std::cell::OnceCell::new();
        for warning in next.egress_warnings() {
            tracing::warn!(generation, "{warning}");
        }
        self.replaced.push(next);
        // The kernel's maps hold the segments now; the core keeps the index.
        let mut image = image;
        image.strip();
        self.image = image;
        self.generation = generation;
        self.allow_ping = allow_ping;
        self.exempt_admin();
        // Learned destinations of rules that changed or went: gone now.
        self.fqdn_sweep_logged();
        self.trim_due = true;
        Ok(generation)
    }

    /// Puts the live set (`rules`, `generation`) back on disk and in the
    /// data path, after a change that was written could not be kept.
    fn restore_live(&mut self) {
        if let Err(e) = self.store.save(&self.rules.unpack(), self.generation) {
            tracing::error!(error = %format!("{e:#}"), "cannot save the live rules again");
        }
        let applied = self.enforced_image().and_then(|image| {
            let ping = self.effective_ping(self.allow_ping);
            self.dataplane
                .apply(&image, ping)
                .map_err(ChangeError::Internal)
        });
        if let Err(e) = applied {
            tracing::error!(error = %e, "cannot write the live rules again");
        }
    }

    /// In lockdown the data path runs a rule set of its own, narrower than
    /// the live one in both directions: inbound, nothing but SSH (on the SSH
    /// ports) from the admin network; outbound, the live egress allowlist
    /// when there is one (no peers, no rules added), else what passed
    /// before. Otherwise the live rules' image.
    fn effective(&self) -> Result<Option<Image>, ChangeError> {
        self.effective_for(None)
    }

    /// [`Core::effective`] with `rules` live (`None`: the live set).
    fn effective_for(&self, rules: Option<&RuleSet>) -> Result<Option<Image>, ChangeError> {
        match &self.mode {
            Mode::Lockdown { admin } => {
                let live;
                let rules = match rules {
                    Some(rules) => rules,
                    None => {
                        live = self.rules.unpack();
                        &live
                    }
                };
                let lockdown = lockdown_rules(rules, admin.as_deref());
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

    /// The image the data path should run now, whole: the lockdown set's,
    /// or the live rules compiled again (the core keeps only their index).
    fn enforced_image(&self) -> Result<Image, ChangeError> {
        match self.effective()? {
            Some(image) => Ok(image),
            None => Ok(compile_with(
                &self.rules.unpack(),
                &self.service,
                &self.limits,
            )?),
        }
    }

    /// What the last change left to free: taken by the daemon's one-second
    /// sweep, after the request that made the change has dropped its body
    /// and its answer, and [released](Garbage::release) without the core
    /// held (at 100k rules that takes 40-60 ms, which the next change
    /// would otherwise wait for).
    pub fn take_garbage(&mut self) -> Garbage {
        Garbage {
            sets: std::mem::take(&mut self.replaced),
            trim: std::mem::take(&mut self.trim_due),
        }
    }

    /// Keeps the deny sets' admin exemption in step with the live rules and
    /// mode (a failure is logged: the rules are live either way).
    fn exempt_admin(&mut self) {
        if let Err(e) = self.sync_deny_exempt() {
            tracing::error!(error = %format!("{e:#}"), "cannot update the deny sets' admin exemption");
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
        let admin_net = mode_request(&mode, opts)?;
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
        let result = self.enforced_image().and_then(|image| {
            self.dataplane.pass_all = matches!(self.mode, Mode::Audit | Mode::Open);
            self.dataplane
                .apply(&image, self.effective_ping(self.allow_ping))
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
        self.exempt_admin();
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
        let restored = self.make_live(p.previous, image, p.previous_allow_ping, None)?;
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

    /// The interfaces `next`'s rules name are ones this daemon protects
    /// (see `RuleSet::check_rule_interfaces`); one not protected right now
    /// (automatic mode, a link yet to appear) is logged.
    fn check_interfaces(&self, next: &RuleSet) -> Result<(), ChangeError> {
        let selector = self.config.as_ref().and_then(|(_, c)| c.selector().ok());
        next.check_rule_interfaces(&self.configured, |n| {
            selector.as_ref().is_none_or(|s| s.may_protect(n))
        })?;
        for name in next.rule_interfaces() {
            if !self.interfaces.contains_key(&name) {
                tracing::warn!(interface = %name, "a rule names an interface not protected now: its rules apply there once it is");
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
                // On some interface (the flow's is not known).
                !self.dataplane.has_flow(&dataplane::flow_key(c))
                    && self.image.stops_admitting(image, remote, pclass, port)
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
        // Rules that name interfaces: admitted somewhere by `image`, and on
        // no interface stopped (the session's interface is not known).
        self.dataplane.has_flow(&dataplane::flow_key(&conn))
            || (admits_login(s, image) && !blocks_login(s, &self.image, image))
    }

    /// Packets and bytes per rule (by slot name: `rule:<id>`, `cluster:<id>`,
    /// `ssh`), over every generation since the daemon started.
    pub fn rule_counters(&mut self) -> HashMap<String, Count> {
        self.totals(false)
    }

    /// [`Core::rule_counters`]; `counted_only`: only the slots that counted
    /// something (what a change carries over: a set of 100k silent rules
    /// carries nothing, and no name is copied for them).
    fn totals(&mut self, counted_only: bool) -> HashMap<String, Count> {
        let mut totals = self.carried.clone();
        if let Ok(live) = self.dataplane.rule_counters(self.image.slots.len()) {
            for (slot, c) in self.image.slots.iter().zip(live).skip(1) {
                if counted_only && c.packets == 0 && c.bytes == 0 {
                    continue;
                }
                let t = totals.entry(slot.name.to_string()).or_default();
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

impl Core {
    /// Names the configuration file and what it said at start, and sets
    /// the baseline: the saved one when the live set was restored from the
    /// state directory (`restored`), else the configuration's rule set
    /// (saved now). A missing or damaged saved baseline is replaced by the
    /// configuration's rule set: every difference then counts as a runtime
    /// change, which a reload refuses to drop rather than drop silently.
    pub fn configured(
        &mut self,
        path: &std::path::Path,
        config: crate::config::Config,
        restored: bool,
    ) -> anyhow::Result<()> {
        self.configured = config.interfaces.clone();
        let saved = if restored {
            self.store.load_baseline().unwrap_or_else(|e| {
                tracing::error!(error = %format!("{e:#}"), "the saved baseline is damaged; every difference from the config counts as a runtime change");
                None
            })
        } else {
            None
        };
        let baseline = match saved {
            Some(b) => b,
            None => {
                let b = config.rule_set();
                self.store.save_baseline(&b)?;
                b
            }
        };
        self.set_baseline(baseline);
        self.config = Some((path.to_owned(), config));
        Ok(())
    }

    /// Re-reads the configuration file and applies it ([`Core::reload`]),
    /// logging the outcome.
    pub fn reload_file(&mut self, opts: &ReloadOptions) -> Result<Reloaded, ChangeError> {
        let path = match &self.config {
            Some((path, _)) => path.clone(),
            None => {
                return Err(ChangeError::Config(
                    "the daemon was started without a configuration file".into(),
                ));
            }
        };
        let result = crate::config::Config::load(&path)
            .map_err(|e| ChangeError::Config(format!("{e:#}")))
            .and_then(|new| self.reload(&path, new, opts));
        match &result {
            Ok(r) if r.dry_run => {}
            Ok(r) => {
                let changes = if r.changes.is_empty() {
                    "no change".to_string()
                } else {
                    r.changes.join(" ")
                };
                let restart = if r.restart_needed.is_empty() {
                    String::new()
                } else {
                    format!("; needs a restart: {}", r.restart_needed.join(", "))
                };
                tracing::info!(generation = r.generation, hash = %r.hash, config = %path.display(), "reloaded: {changes}{restart}");
            }
            Err(e) => {
                tracing::error!(error = %e, "reload refused; the live rule set is unchanged")
            }
        }
        result
    }

    /// Applies `new`: its rule set replaces the live one (unless that drops
    /// runtime changes and the caller did not ask to discard them), its
    /// `allow_ping` takes effect, and the settings only a restart applies
    /// are named.
    pub fn reload(
        &mut self,
        path: &std::path::Path,
        new: crate::config::Config,
        opts: &ReloadOptions,
    ) -> Result<Reloaded, ChangeError> {
        let mut next = expiry::unexpired(new.rule_set());
        self.keep_fleet_peers(&mut next);
        // What the file brings in is held to the API's checks (plain ids,
        // no port 0); rules already live load as they are.
        let live = self.rules.unpack();
        next.check_additions(&live)?;
        let conflicts = crate::reload::conflicts(&self.baseline, &live, &next);
        drop(live);
        if !conflicts.is_empty() && !opts.discard_runtime {
            return Err(ChangeError::RuntimeChanges(conflicts));
        }
        let restart_needed = self
            .config
            .as_ref()
            .map(|(_, started)| crate::reload::restart_needed(started, &new))
            .unwrap_or_default();
        let settings = crate::reload::applied_settings(self.allow_ping, &new);
        if !opts.force {
            let mut locked_out = self.open_sessions_locked_out(&next)?;
            // The caller's own session: refused below, in its own words.
            if let Some(own) = &opts.caller_session {
                locked_out.retain(|s| *s != own.to_string());
            }
            if !locked_out.is_empty() {
                return Err(ChangeError::LocksOutOpenSessions(locked_out));
            }
        }
        let change = Options {
            allow_ping: Some(new.allow_ping),
            dry_run: opts.dry_run,
            force: opts.force,
            caller_session: opts.caller_session.clone(),
            ..Default::default()
        };
        let changed = self.change_to(&change, |_| Ok(next.clone()))?;
        if !opts.dry_run {
            // `rules_file` is reloadable: `rules save` writes where the
            // reloaded config reads (else the next reload would read
            // another file and drop the saved rules silently).
            if let Some((_, started)) = &mut self.config {
                started.rules_file = Some(new.rules_file_path(path));
            }
            self.set_baseline(next);
            self.store
                .save_baseline(&self.baseline)
                .map_err(ChangeError::Internal)?;
            if !conflicts.is_empty() {
                let (uid, pid) = (self.actor.uid, self.actor.pid);
                let outcome = audit::bounded(&format!("discarded: {}", conflicts.join(", ")), 2048);
                self.record(uid, pid, "discard runtime changes", outcome)
                    .map_err(ChangeError::Internal)?;
            }
        }
        let mut changes = changed.diff.summary();
        changes.extend(settings);
        Ok(Reloaded {
            config: path.display().to_string(),
            dry_run: changed.dry_run,
            generation: changed.generation,
            hash: changed.hash,
            changes,
            diff: changed.diff,
            would_cut: changed.would_cut,
            restart_needed,
            discarded: if opts.discard_runtime {
                conflicts
            } else {
                Vec::new()
            },
        })
    }

    /// Makes the live rule set permanent (`portcullis rules save`): writes
    /// it to the configuration's saved rules file, atomically, and makes it
    /// the baseline. Refused while a change awaits confirmation.
    pub fn save_rules(&mut self) -> Result<Saved, ChangeError> {
        if let Some(p) = &self.pending {
            return Err(ChangeError::AwaitingConfirmation {
                generation: p.generation,
                deadline: p.deadline,
            });
        }
        let Some((path, config)) = &self.config else {
            return Err(ChangeError::Config(
                "the daemon was started without a configuration file".into(),
            ));
        };
        let file = config.rules_file_path(path);
        // Refused now rather than at the next load (a reload, or the
        // next start, failing closed).
        if let Some(dir) = file.parent().filter(|d| d.exists()) {
            crate::config::only_root_writes(
                dir,
                "the saved rules file replaces the config's rules",
            )
            .map_err(|e| ChangeError::Config(format!("{e:#}")))?;
        }
        let live = self.rules.unpack();
        let text = crate::config::Config::saved_rules_text(&live).map_err(ChangeError::Internal)?;
        crate::state::write_new_file(&file, text.as_bytes(), 0o644)
            .map_err(ChangeError::Internal)?;
        self.set_baseline(live);
        self.store
            .save_baseline(&self.baseline)
            .map_err(ChangeError::Internal)?;
        tracing::info!(file = %file.display(), generation = self.generation, "rules saved: the live rule set is permanent");
        Ok(Saved {
            file: file.display().to_string(),
            generation: self.generation,
            hash: self.image.hash.clone(),
        })
    }

    /// The open SSH sessions (TCP to the live SSH ports) whose source the
    /// live rules admit and `next` would not: a reload treats each as its
    /// caller's own (`systemctl reload` and SIGHUP have no session the
    /// daemon can see, and a declared one must not lift the check).
    fn open_sessions_locked_out(&self, next: &RuleSet) -> Result<Vec<String>, ChangeError> {
        let image = compile_with(next, &self.service, &self.limits)?;
        let Ok(open) = dataplane::connections() else {
            return Ok(Vec::new());
        };
        let ports = self.rules.head().ssh.ports.clone();
        let sessions = open.into_iter().filter(|c| {
            c.proto == portcullis_common::IPPROTO_TCP
                && !c.tcp_syn_sent
                && ports.contains(&c.local_port)
        });
        let mut out = Vec::new();
        for c in sessions {
            let s = Session {
                client: c.remote,
                client_port: c.remote_port,
                server: c.local,
                server_port: c.local_port,
            };
            // Admitted now and not by `next`: its next login is dropped,
            // and the session itself unless the table tracks it.
            if blocks_login(&s, &self.image, &image) {
                out.push(s.to_string());
            }
        }
        Ok(out)
    }

    /// Runtime changes: what differs between the live set and the baseline
    /// (as a reload to the baseline would name them).
    pub fn runtime_changes(&self) -> Vec<String> {
        self.runtime
            .get_or_init(|| {
                crate::reload::conflicts(&self.baseline, &self.rules.unpack(), &self.baseline)
            })
            .clone()
    }

    /// Sets the baseline (what the live set's runtime changes are against).
    fn set_baseline(&mut self, baseline: RuleSet) {
        self.baseline = baseline;
        self.runtime = std::cell::OnceCell::new();
    }
}

/// What `portcullis rules save` wrote.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Saved {
    pub file: String,
    pub generation: u64,
    pub hash: String,
}

/// A mode change as asked, checked: the lockdown's admin network (parsed),
/// a confirmation window refused (modes have none, and it is never
/// ignored), a lockdown that leaves out the caller's own SSH source refused
/// unless forced.
fn mode_request(mode: &Mode, opts: &Options) -> Result<Option<ipnet::IpNet>, ChangeError> {
    let admin_net = match mode {
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
    if let (Mode::Lockdown { .. }, Some(session)) = (mode, &opts.caller_session)
        && !opts.force
        && !admin_net.is_some_and(|net| net.contains(&session.client.to_canonical()))
    {
        return Err(ChangeError::LocksOutCaller(session.to_string()));
    }
    Ok(admin_net)
}

/// Whether `image` admits a new connection like the SSH session `s` (its
/// client to its server port), whatever flows are open, on some interface.
fn admits_login(s: &Session, image: &Image) -> bool {
    image.admits_somewhere(s.client.to_canonical(), PCLASS_TCP, s.server_port)
}

/// Whether going from `live` to `next` stops admitting new connections like
/// the SSH session `s` on some interface (its own is not known).
fn blocks_login(s: &Session, live: &Image, next: &Image) -> bool {
    live.stops_admitting(next, s.client.to_canonical(), PCLASS_TCP, s.server_port)
}

/// The core as the daemon's tasks share it.
pub type Shared = std::sync::Arc<tokio::sync::Mutex<Core>>;

/// Starts the rollback timer of a change applied with a confirmation window
/// (nothing when `changed` has none).
pub fn watch_confirmation(core: &Shared, changed: &Changed) {
    if let Some(deadline) = changed.confirm_by {
        arm_rollback(
            core.clone(),
            changed.generation,
            deadline.saturating_sub(unix_now()),
        );
    }
}

/// Rolls the pending change of `generation` back after `secs` unless it was
/// confirmed: a task of the core's. The timer is monotonic (a clock step
/// does not move it); a failed rollback keeps the change pending and is
/// retried.
pub fn arm_rollback(core: Shared, generation: u64, secs: u64) {
    const RETRY: std::time::Duration = std::time::Duration::from_secs(5);
    tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_secs(secs)).await;
        while !core.lock().await.rollback_due(generation) {
            tokio::time::sleep(RETRY).await;
        }
    });
}

/// A change rolled back because nobody confirmed it in time.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Rollback {
    /// The generation that was rolled back.
    pub generation: u64,
    /// The generation that restored the rules before it.
    pub restored: u64,
    /// Unix time (seconds) of the rollback.
    pub time: u64,
}

impl Core {
    /// The last change rolled back for want of confirmation, since start.
    pub fn last_rollback(&self) -> Option<&Rollback> {
        self.last_rollback.as_ref()
    }

    /// The confirmation window of `generation` ended: rolls it back
    /// (audited). Whether the timer is done (rolled back, or confirmed
    /// meanwhile); `false`: the rollback failed and is to be retried.
    fn rollback_due(&mut self, generation: u64) -> bool {
        self.acting(Actor {
            action: "confirmation window".into(),
            ..Default::default()
        });
        let rolled = self.roll_back(generation);
        self.acting(Actor::default());
        match rolled {
            Ok(Some(restored)) => {
                self.last_rollback = Some(Rollback {
                    generation,
                    restored,
                    time: unix_now(),
                });
                tracing::warn!(
                    generation,
                    restored,
                    "change not confirmed in time: rolled back"
                );
                let _ = self.record(
                    None,
                    None,
                    "confirmation window",
                    "rolled back: not confirmed".into(),
                );
                true
            }
            Ok(None) => true,
            Err(e) => {
                tracing::error!(generation, error = %e, "rollback failed; the change stays pending, retrying");
                let _ = self.record(
                    None,
                    None,
                    "confirmation window",
                    format!("rollback failed, retrying: {e}"),
                );
                false
            }
        }
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
    let ssh_rules = || {
        live.ingress_rules
            .iter()
            .filter(|r| live.ssh.ports.iter().any(|&p| r.admits_tcp_port(p)))
    };
    // Rules that name interfaces admit SSH only there: they stay scoped
    // (below) and never widen the exemption, which applies everywhere.
    let live_ssh: Vec<IpNet> = if live.ssh.allow {
        live.ssh.networks().unwrap_or_default()
    } else {
        ssh_rules()
            .filter(|r| r.interfaces.is_empty())
            .flat_map(|r| r.networks())
            .collect()
    };
    let sources = admin.map(|a| narrowed(&live_ssh, a)).unwrap_or_default();
    let scoped = match admin {
        Some(a) if !live.ssh.allow => scoped_ssh(ssh_rules(), &live.ssh.ports, a),
        _ => Vec::new(),
    };
    RuleSet {
        ssh: crate::rules::Ssh {
            allow: !sources.is_empty(),
            sources: sources.iter().map(ToString::to_string).collect(),
            ports: live.ssh.ports.clone(),
        },
        ingress_rules: scoped,
        egress_rules: live.egress_rules.clone(),
        ..Default::default()
    }
}

/// The networks both `nets` and `admin` cover (each net inside the admin
/// network, or the admin network inside a net), without repeats.
fn narrowed(nets: &[ipnet::IpNet], admin: ipnet::IpNet) -> Vec<ipnet::IpNet> {
    let mut out: Vec<ipnet::IpNet> = Vec::new();
    for net in nets {
        let both = if admin.contains(net) {
            Some(*net)
        } else if net.contains(&admin) {
            Some(admin)
        } else {
            None
        };
        if let Some(n) = both
            && !out.contains(&n)
        {
            out.push(n);
        }
    }
    out
}

/// Lockdown's copies of the live rules that admit SSH on some interfaces
/// only: SSH ports only, sources narrowed to the admin network, the same
/// interfaces.
fn scoped_ssh<'a>(
    rules: impl Iterator<Item = &'a crate::rules::FirewallRule>,
    ports: &[u16],
    admin: ipnet::IpNet,
) -> Vec<crate::rules::FirewallRule> {
    let mut out = Vec::new();
    for r in rules.filter(|r| !r.interfaces.is_empty()) {
        let nets = narrowed(&r.networks(), admin);
        if nets.is_empty() {
            continue;
        }
        for &port in ports.iter().filter(|&&p| r.admits_tcp_port(p)) {
            out.push(crate::rules::FirewallRule {
                id: format!("lockdown-{}-{port}", r.id),
                from_port: u32::from(port),
                to_port: u32::from(port),
                ip_ranges: nets.iter().map(ToString::to_string).collect(),
                names: Vec::new(),
                protocol: crate::rules::Protocol::Tcp,
                description: Some(format!("lockdown: SSH as rule {:?} admitted it", r.id)),
                icmp_types: Vec::new(),
                expires: None,
                rate: None,
                burst: None,
                interfaces: r.interfaces.clone(),
            });
        }
    }
    out
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
    fn a_diff_summary_reads_like_a_diff() {
        let set = |id: &str| RuleSet {
            ingress_rules: vec![tcp_rule(id, 1, 1, &[], &[])],
            ..Default::default()
        };
        assert_eq!(
            Diff::between(&set("web"), &set("https")).summary(),
            ["+https", "-web"]
        );
    }

    /// The diff as it was first written (every rule keyed `list:id` in a
    /// sorted map): the reference `Diff::between` is held to.
    fn reference_diff(old: &RuleSet, new: &RuleSet) -> (Vec<String>, Vec<String>, Vec<String>) {
        fn index(s: &RuleSet) -> BTreeMap<String, &FirewallRule> {
            let lists = [("ingress", &s.ingress_rules), ("egress", &s.egress_rules)];
            lists
                .into_iter()
                .flat_map(|(l, rules)| rules.iter().map(move |r| (format!("{l}:{}", r.id), r)))
                .collect()
        }
        let (a, b) = (index(old), index(new));
        (
            b.keys().filter(|k| !a.contains_key(*k)).cloned().collect(),
            a.keys().filter(|k| !b.contains_key(*k)).cloned().collect(),
            a.iter()
                .filter(|(k, r)| b.get(*k).is_some_and(|n| n != *r))
                .map(|(k, _)| k.clone())
                .collect(),
        )
    }

    proptest::proptest! {
        /// Rules kept in place, moved, changed, added, removed and moved to
        /// the other list: the same diff as the reference.
        #[test]
        fn the_diff_matches_the_reference(
            old in proptest::collection::vec((0u8..40, 1u32..4, proptest::bool::ANY), 0..30),
            new in proptest::collection::vec((0u8..40, 1u32..4, proptest::bool::ANY), 0..30),
        ) {
            // Ids unique across both lists, as a valid set has them.
            let set = |rules: &[(u8, u32, bool)]| {
                let mut seen = HashSet::new();
                let mut s = RuleSet::default();
                for &(id, port, egress) in rules {
                    if seen.insert(id) {
                        let r = tcp_rule(&format!("r{id}"), port, port, &[], &[]);
                        if egress { s.egress_rules.push(r) } else { s.ingress_rules.push(r) }
                    }
                }
                s
            };
            let (a, b) = (set(&old), set(&new));
            let d = Diff::between(&a, &b);
            proptest::prop_assert_eq!((d.added, d.removed, d.changed), reference_diff(&a, &b));
        }
    }

    /// A TCP ingress rule for ports `from..=to` from `nets` (none: any),
    /// on `on` (none: every interface).
    fn tcp_rule(
        id: &str,
        from: u32,
        to: u32,
        nets: &[&str],
        on: &[&str],
    ) -> crate::rules::FirewallRule {
        crate::rules::FirewallRule {
            id: id.into(),
            from_port: from,
            to_port: to,
            ip_ranges: nets.iter().map(|n| (*n).to_string()).collect(),
            names: Vec::new(),
            protocol: crate::rules::Protocol::Tcp,
            description: None,
            icmp_types: Vec::new(),
            expires: None,
            rate: None,
            burst: None,
            interfaces: on.iter().map(|n| (*n).to_string()).collect(),
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
        set.ingress_rules
            .push(tcp_rule("ssh", 22, 22, &["10.0.0.0/8"], &[]));
        let s = ssh(&set, "10.9.0.0/16");
        assert_eq!(
            (s.allow, s.sources),
            (true, vec!["10.9.0.0/16".to_string()])
        );
        // Without an admin network, nobody.
        assert!(!lockdown_rules(&live(true, &[]), None).ssh.allow);
    }

    /// A rule admitting SSH on one interface only never becomes the
    /// exemption (which applies on every interface): lockdown keeps it on
    /// its interface, narrowed to the admin network.
    #[test]
    fn lockdown_keeps_an_interface_scoped_ssh_rule_on_its_interface() {
        let mut set = live(false, &[]);
        set.ingress_rules
            .push(tcp_rule("admin", 20, 30, &["10.0.0.0/8"], &["eth1"]));
        let l = lockdown_rules(&set, Some("10.1.0.0/16"));
        assert!(
            !l.ssh.allow,
            "the scoped rule widened to the exemption: {:?}",
            l.ssh
        );
        assert_eq!(l.ingress_rules.len(), 1, "{:?}", l.ingress_rules);
        let r = &l.ingress_rules[0];
        assert_eq!(
            (r.from_port, r.to_port, &r.ip_ranges, &r.interfaces),
            (
                22,
                22,
                &vec!["10.1.0.0/16".to_string()],
                &vec!["eth1".to_string()]
            )
        );
        assert!(l.validate().is_ok());
        // An admin network outside the rule's sources: nothing.
        assert!(
            lockdown_rules(&set, Some("192.0.2.0/24"))
                .ingress_rules
                .is_empty()
        );
    }
}
