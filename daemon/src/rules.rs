//! The rule model, in the Brev SDK's format, and its validation.
//!
//! Pure: no kernel, no files. A `FirewallRule` has `id`, `from_port`,
//! `to_port` and `ip_ranges` (CIDRs; empty means any source) and covers TCP
//! and UDP. Portcullis accepts exactly that and extends it only with optional
//! fields (`protocol`, `description`) that old producers never send.
//!
//! Semantics (see docs/security.md):
//! - ingress rules admit new inbound traffic that matches them;
//! - cluster peers admit everything from their addresses;
//! - the SSH exemption admits TCP to its ports (default 22) from its
//!   sources (any when empty);
//! - egress is allow-all while `egress_rules` is empty and an allowlist as
//!   soon as it holds a rule (replies to outbound flows are still admitted);
//! - a packet several rules admit credits the first of them: peers, then
//!   SSH, then the ingress rules in list order.
//!
//! CIDRs with host bits set (`10.0.0.1/8`) are rejected, not normalised: the
//! author may have meant the address or the network, and guessing either way
//! can open or close more than intended.

use std::collections::{HashMap, HashSet};

mod cidr;
mod packed;
pub use cidr::{parse_cidr, parse_cidrs};
pub(crate) use packed::span;
pub use packed::{PackedSet, TooLarge};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Ids of rules the daemon's own configuration adds (the health endpoint's
/// `portcullis-health`); refused in rule sets so counters stay unambiguous.
pub const RESERVED_ID_PREFIX: &str = "portcullis-";

/// Which protocols a rule covers. Brev rules carry none: TCP and UDP.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    #[serde(rename = "tcp+udp")]
    TcpUdp,
    Tcp,
    Udp,
    /// ICMP and ICMPv6; the ports do not apply.
    Icmp,
    /// Every IP protocol; the ports apply to TCP and UDP.
    Any,
}

/// One firewall rule, as the Brev SDK writes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FirewallRule {
    pub id: String,
    pub from_port: u32,
    pub to_port: u32,
    #[serde(default)]
    pub ip_ranges: Vec<String>,
    /// Egress only, under an egress allowlist: host names whose addresses
    /// (as the daemon's DNS forwarder learns them) this rule admits,
    /// exact (`api.example.com`) or `*.example.org` (any name under it, at
    /// any depth, not `example.org` itself); see `crate::dns`. Beside
    /// `ip_ranges`, both admit; names alone never mean "any destination".
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub names: Vec<String>,
    #[serde(default, skip_serializing_if = "is_default")]
    pub protocol: Protocol,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// ICMP rules only: the message types (and codes) admitted; empty:
    /// every one. `"echo-request"` (both families), `"packet-too-big"`
    /// (ICMPv6 only), `"destination-unreachable/4"` (one code),
    /// `"icmp:13"`, `"icmpv6:128"` (a number names its family). See
    /// [`parse_icmp_type`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub icmp_types: Vec<String>,
    /// When the rule ends (UTC, `2026-12-01T10:00:00Z`): the core removes
    /// it then, audited, and cuts the flows it alone admitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
    /// Ingress only: new flows per second each source may open through this
    /// rule (instead of `[rate_limit]`'s default); see `model::RateLimit`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<u32>,
    /// With `rate`: how many new flows a source may open at once (default:
    /// `rate`, one second's worth).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// Ingress rules only: the interfaces the rule applies on (every
    /// protected interface when empty), e.g. a cluster NIC.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<String>,
}

/// Bounds of a rate (new flows per second) and of a burst.
pub const RATE_MAX: u32 = 1_000_000;

/// The problem with a rule's (or `[rate_limit]`'s) `rate`/`burst`, as (field, reason).
pub fn check_rate(
    ingress: bool,
    rate: Option<u32>,
    burst: Option<u32>,
) -> Result<(), (&'static str, String)> {
    if !ingress && rate.is_some() {
        return Err(("rate", "applies to ingress rules only".into()));
    }
    if !ingress && burst.is_some() {
        return Err(("burst", "applies to ingress rules only".into()));
    }
    if let Some(r) = rate
        && !(1..=RATE_MAX).contains(&r)
    {
        return Err(("rate", format!("{r} is out of range (1 to {RATE_MAX})")));
    }
    match (rate, burst) {
        (None, Some(_)) => Err(("burst", "needs a rate".into())),
        (Some(_), Some(b)) if !(1..=RATE_MAX).contains(&b) => {
            Err(("burst", format!("{b} is out of range (1 to {RATE_MAX})")))
        }
        _ => Ok(()),
    }
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// The cluster this host belongs to.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    pub id: String,
    /// Addresses (CIDRs) of this cluster's members: admitted on every port
    /// and protocol, both ways.
    #[serde(default)]
    pub peers: Vec<String>,
    /// Addresses of other clusters' members, when the control plane knows
    /// them: only so their drops are counted as `drop_other_cluster`. An
    /// explicit rule still admits them.
    #[serde(default)]
    pub other_clusters: Vec<String>,
}

/// The SSH exemption: inbound TCP to the SSH ports regardless of the rules.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ssh {
    /// On unless turned off explicitly: a file or rule set that says nothing
    /// about SSH never locks the operator out.
    #[serde(default = "default_ssh_allow")]
    pub allow: bool,
    /// Source CIDRs admitted; empty means any source.
    #[serde(default)]
    pub sources: Vec<String>,
    /// The TCP ports sshd listens on (default `[22]`; Brev's providers also
    /// use 2222). They drive the exemption, the nftables fallback, readiness,
    /// lockdown and the anti-lockout check. Not written when default, so rule
    /// sets saved before the field existed keep their hash.
    #[serde(
        default = "default_ssh_ports",
        skip_serializing_if = "is_default_ssh_ports"
    )]
    pub ports: Vec<u16>,
}

/// Where sshd listens unless configured otherwise.
pub const DEFAULT_SSH_PORT: u16 = 22;
/// More SSH ports than this is a mistake, not a configuration.
pub const MAX_SSH_PORTS: usize = 16;

fn default_ssh_allow() -> bool {
    true
}

fn default_ssh_ports() -> Vec<u16> {
    vec![DEFAULT_SSH_PORT]
}

fn is_default_ssh_ports(ports: &[u16]) -> bool {
    ports == [DEFAULT_SSH_PORT]
}

impl Default for Ssh {
    fn default() -> Self {
        Ssh {
            allow: default_ssh_allow(),
            sources: Vec::new(),
            ports: default_ssh_ports(),
        }
    }
}

impl Ssh {
    /// The exemption's source networks (any when the list is empty), or why
    /// a source is not a network. Everything that enforces SSH sources (the
    /// compiler, the fallback, lockdown) reads them through here, so a bare
    /// address means the same host route everywhere.
    pub fn networks(&self) -> Result<Vec<IpNet>, String> {
        if self.sources.is_empty() {
            Ok(any())
        } else {
            parse_cidrs(&self.sources)
        }
    }

    fn validate(&self) -> Result<(), RuleError> {
        let err = |field, reason: String| RuleError {
            place: "ssh".into(),
            field,
            reason,
        };
        self.networks().map_err(|e| err("sources", e))?;
        if self.ports.is_empty() {
            return Err(err(
                "ports",
                "must name at least one port (sshd's, usually [22])".into(),
            ));
        }
        if self.ports.len() > MAX_SSH_PORTS {
            return Err(err(
                "ports",
                format!("{} ports, more than {MAX_SSH_PORTS}", self.ports.len()),
            ));
        }
        let mut seen = HashSet::new();
        for &port in &self.ports {
            if port == 0 {
                return Err(err("ports", "0 is not a port".into()));
            }
            if !seen.insert(port) {
                return Err(err("ports", format!("{port} is listed twice")));
            }
        }
        Ok(())
    }
}

/// Everything that decides what the host admits.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSet {
    #[serde(default)]
    pub ingress_rules: Vec<FirewallRule>,
    #[serde(default)]
    pub egress_rules: Vec<FirewallRule>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<Cluster>,
    #[serde(default)]
    pub ssh: Ssh,
    /// What the egress rules mean (see [`EgressMode`]); absent: an
    /// allowlist when there are egress rules, as before the key existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<EgressMode>,
}

/// The egress policy (`egress = "allow"` or `"allowlist"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EgressMode {
    /// Everything may leave: egress rules are accepted and reported, and
    /// block nothing (as under an "allow all outgoing" default).
    Allow,
    /// Only what the egress rules admit may leave (besides replies, flows
    /// this host opened and what a host always sends), with or without
    /// egress rules.
    Allowlist,
}

impl EgressMode {
    pub fn name(self) -> &'static str {
        match self {
            EgressMode::Allow => "allow",
            EgressMode::Allowlist => "allowlist",
        }
    }
}

impl RuleSet {
    /// Whether egress is an allowlist: as `egress` says, or, without the
    /// key, when there are egress rules (never widened by omission).
    pub fn egress_allowlist(&self) -> bool {
        match self.egress {
            Some(EgressMode::Allow) => false,
            Some(EgressMode::Allowlist) => true,
            None => !self.egress_rules.is_empty(),
        }
    }

    /// The egress policy in words (`allowlist`, `allow`, with "(implicit)"
    /// when no key says it).
    pub fn egress_policy(&self) -> String {
        let mode = if self.egress_allowlist() {
            "allowlist"
        } else {
            "allow"
        };
        match self.egress {
            Some(_) => mode.to_string(),
            None => format!("{mode} (implicit: no `egress` key)"),
        }
    }

    /// What an operator should hear about the egress policy: rules that
    /// block nothing, or an allowlist only the rules' presence implies.
    pub fn egress_warnings(&self) -> Vec<String> {
        self.egress_warnings_for(self.egress_rules.len())
    }

    /// [`RuleSet::egress_warnings`] with `n` egress rules.
    fn egress_warnings_for(&self, n: usize) -> Vec<String> {
        match self.egress {
            Some(EgressMode::Allow) if n > 0 => vec![format!(
                "egress = \"allow\": the {n} egress rule(s) are accepted and reported but block nothing; set egress = \"allowlist\" to let only what they admit leave"
            )],
            None if n > 0 => vec![format!(
                "egress rules without an `egress` key: egress is an allowlist (only what the {n} egress rule(s) admit may leave, besides replies); set egress = \"allowlist\" to say so, or egress = \"allow\" for rules that block nothing"
            )],
            _ => Vec::new(),
        }
    }
}

/// A whole rule set as a caller replaces the live one (`PUT /v1/rules`,
/// `portcullis rules apply`): the same shape, but a set without `ssh` leaves
/// the SSH exemption as it is, so SSH is never switched off by omission.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Replacement {
    #[serde(default)]
    pub ingress_rules: Vec<FirewallRule>,
    #[serde(default)]
    pub egress_rules: Vec<FirewallRule>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<Cluster>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh: Option<Ssh>,
    /// The egress policy; without it the live one stays.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<EgressMode>,
}

impl Replacement {
    /// The rule set that replaces `live`.
    pub fn over(self, live: &RuleSet) -> RuleSet {
        RuleSet {
            ingress_rules: self.ingress_rules,
            egress_rules: self.egress_rules,
            cluster: self.cluster,
            ssh: self.ssh.unwrap_or_else(|| live.ssh.clone()),
            egress: self.egress.or(live.egress),
        }
    }
}

/// Which list of a rule set a rule belongs to.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Ingress,
    Egress,
}

/// Why an edit of a rule set cannot be made.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum EditError {
    #[error("no rule with id {0:?}")]
    NoRule(String),
    #[error("no peer {0:?} in the cluster")]
    NoPeer(String),
    #[error("a rule with id {0:?} exists already")]
    Exists(String),
}

/// How a list of peers changes the cluster's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerEdit {
    Add,
    Remove,
    Replace,
}

impl RuleSet {
    /// Adds `rule` to the `direction` list; ids are unique across both.
    pub fn add_rule(&mut self, direction: Direction, rule: FirewallRule) -> Result<(), EditError> {
        if self.rule(&rule.id).is_some() {
            return Err(EditError::Exists(rule.id));
        }
        match direction {
            Direction::Ingress => self.ingress_rules.push(rule),
            Direction::Egress => self.egress_rules.push(rule),
        }
        Ok(())
    }

    /// How many rules the two lists hold (as `PackedSet::len`).
    pub fn rule_count(&self) -> usize {
        self.ingress_rules.len() + self.egress_rules.len()
    }

    /// Removes the rule with `id` from whichever list holds it.
    pub fn remove_rule(&mut self, id: &str) -> Result<(), EditError> {
        let before = self.rule_count();
        self.ingress_rules.retain(|r| r.id != id);
        self.egress_rules.retain(|r| r.id != id);
        if self.rule_count() == before {
            return Err(EditError::NoRule(id.to_string()));
        }
        Ok(())
    }

    /// The rule with `id`, in either list.
    pub fn rule(&self, id: &str) -> Option<&FirewallRule> {
        self.ingress_rules
            .iter()
            .chain(&self.egress_rules)
            .find(|r| r.id == id)
    }

    /// Adds, removes or replaces cluster peers; the cluster is created (with
    /// `cluster_id`, else "default") when there is none. Removing a peer
    /// that is not there is an error and changes nothing.
    pub fn edit_peers(
        &mut self,
        edit: PeerEdit,
        peers: &[String],
        cluster_id: Option<&str>,
    ) -> Result<(), EditError> {
        let cluster = self.cluster.get_or_insert_with(|| Cluster {
            id: cluster_id.unwrap_or("default").to_string(),
            ..Default::default()
        });
        match edit {
            PeerEdit::Replace => cluster.peers = peers.to_vec(),
            PeerEdit::Add => {
                for p in peers {
                    if !cluster.peers.contains(p) {
                        cluster.peers.push(p.clone());
                    }
                }
            }
            PeerEdit::Remove => {
                if let Some(missing) = peers.iter().find(|p| !cluster.peers.contains(p)) {
                    return Err(EditError::NoPeer(missing.clone()));
                }
                cluster.peers.retain(|p| !peers.contains(p));
            }
        }
        Ok(())
    }
}

/// A rule set that failed validation: where, which field, why.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("{place}: {field}: {reason}")]
pub struct RuleError {
    /// `ingress_rules[3] (id "web")`, `cluster`, `ssh`.
    pub place: String,
    pub field: &'static str,
    pub reason: String,
}

impl RuleError {
    /// The error with its place in words: `ingress rule "web": from_port:
    /// ...` rather than `ingress_rules[3] (id "web"): ...`.
    pub fn in_words(&self) -> String {
        let place = ["ingress", "egress"]
            .iter()
            .find_map(|list| {
                let rest = self.place.strip_prefix(list)?.strip_prefix("_rules[")?;
                let id = rest.split_once("] (id ")?.1.strip_suffix(')')?;
                Some(format!("{list} rule {id}"))
            })
            .unwrap_or_else(|| self.place.clone());
        format!("{place}: {}: {}", self.field, self.reason)
    }
}

/// Longest rule id accepted.
pub const MAX_ID_LEN: usize = 128;

/// Why `id` is not a rule id, if it is not: ids are names an operator types
/// and that appear in URLs, metric labels and logs, so they are letters,
/// digits and `-`, `_`, `.`, `:`, `@`, starting with a letter or digit.
pub fn check_id(id: &str) -> Result<(), String> {
    if id.trim().is_empty() {
        return Err("must not be empty".into());
    }
    if id.len() > MAX_ID_LEN {
        return Err(format!("{} bytes long, more than {MAX_ID_LEN}", id.len()));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '@')))
    {
        return Err(format!(
            "{c:?} is not allowed in an id (letters, digits, '-', '_', '.', ':' and '@' only)"
        ));
    }
    if !id.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err("must start with a letter or a digit".into());
    }
    Ok(())
}

/// ICMP message type names and their numbers in ICMPv4 and ICMPv6. ICMPv6
/// neighbour and router discovery (133-137) is not here: it is decided
/// before the rules (admitted from the link, hop limit 255).
const ICMP_NAMES: &[(&str, Option<u8>, Option<u8>)] = &[
    ("echo-reply", Some(0), Some(129)),
    ("destination-unreachable", Some(3), Some(1)),
    ("source-quench", Some(4), None),
    ("redirect", Some(5), None),
    ("echo-request", Some(8), Some(128)),
    ("router-advertisement", Some(9), None),
    ("router-solicitation", Some(10), None),
    ("time-exceeded", Some(11), Some(3)),
    ("parameter-problem", Some(12), Some(4)),
    ("timestamp-request", Some(13), None),
    ("timestamp-reply", Some(14), None),
    ("packet-too-big", None, Some(2)),
];

/// At most this many `icmp_types` in one rule.
pub const MAX_ICMP_TYPES: usize = 32;

/// One ICMP match of a rule: family, type, and one code or all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IcmpMatch {
    pub v6: bool,
    pub icmp_type: u8,
    pub code: Option<u8>,
}

impl IcmpMatch {
    /// The range of the data path's ICMP "port" (type << 8 | code) it
    /// admits.
    pub fn ports(&self) -> (u16, u16) {
        let base = u16::from(self.icmp_type) << 8;
        match self.code {
            Some(c) => (base | u16::from(c), base | u16::from(c)),
            None => (base, base | 0xff),
        }
    }
}

/// Parses one `icmp_types` entry: `[icmp:|icmpv6:]TYPE[/CODE]`, TYPE a name
/// (see `ICMP_NAMES`; without a family, every family that has it) or a
/// number (which needs its family), CODE a number.
pub fn parse_icmp_type(text: &str) -> Result<Vec<IcmpMatch>, String> {
    let (family, rest) = match text.split_once(':') {
        Some(("icmp", rest)) => (Some(false), rest),
        Some(("icmpv6", rest)) => (Some(true), rest),
        Some((f, _)) => {
            return Err(format!(
                "{text:?}: {f:?} is not a family (icmp: or icmpv6:)"
            ));
        }
        None => (None, text),
    };
    let (name, code) = match rest.split_once('/') {
        Some((n, c)) => {
            let code = c
                .parse::<u8>()
                .map_err(|_| format!("{text:?}: code {c:?} is not a number 0-255"))?;
            (n, Some(code))
        }
        None => (rest, None),
    };
    let numbers: [Option<u8>; 2] = if let Ok(n) = name.parse::<u32>() {
        let n = u8::try_from(n).map_err(|_| format!("{text:?}: type {n} is not 0-255"))?;
        match family {
            Some(v6) if v6 => [None, Some(n)],
            Some(_) => [Some(n), None],
            None => {
                return Err(format!(
                    "{text:?}: a type number needs its family (icmp:{n} or icmpv6:{n}); names such as \"destination-unreachable\" cover both"
                ));
            }
        }
    } else {
        let Some(&(_, v4, v6)) = ICMP_NAMES.iter().find(|(n, ..)| *n == name) else {
            let known: Vec<&str> = ICMP_NAMES.iter().map(|(n, ..)| *n).collect();
            return Err(format!(
                "{text:?}: {name:?} is not an ICMP type name (known: {}; or icmp:N, icmpv6:N)",
                known.join(", ")
            ));
        };
        match family {
            None => [v4, v6],
            Some(true) => [None, v6],
            Some(false) => [v4, None],
        }
    };
    let out: Vec<IcmpMatch> = numbers
        .iter()
        .zip([false, true])
        .filter_map(|(n, v6)| {
            n.map(|icmp_type| IcmpMatch {
                v6,
                icmp_type,
                code,
            })
        })
        .collect();
    if out.is_empty() {
        return Err(format!("{text:?}: {name:?} does not exist in that family"));
    }
    if let Some(nd) = out
        .iter()
        .find(|m| m.v6 && (133..=137).contains(&m.icmp_type))
    {
        return Err(format!(
            "{text:?}: ICMPv6 type {} is neighbour discovery, admitted from the link before any rule (never by one)",
            nd.icmp_type
        ));
    }
    Ok(out)
}

/// Parses an expiry: `YYYY-MM-DDTHH:MM:SSZ` (UTC) to Unix seconds.
pub fn parse_expiry(text: &str) -> Result<u64, String> {
    let bad = || format!("{text:?} is not a UTC time like 2026-12-01T10:00:00Z");
    let b = text.as_bytes();
    let shape = b.len() == 20
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            10 => *c == b'T',
            13 | 16 => *c == b':',
            19 => *c == b'Z',
            _ => c.is_ascii_digit(),
        });
    if !shape {
        return Err(bad());
    }
    let num = |from: usize, to: usize| -> i64 {
        text.get(from..to)
            .and_then(|s| s.parse().ok())
            .unwrap_or(-1)
    };
    let (y, mo, d) = (num(0, 4), num(5, 7), num(8, 10));
    let (h, mi, sec) = (num(11, 13), num(14, 16), num(17, 19));
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let days_in = match mo {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return Err(bad()),
    };
    if y < 1970 || d < 1 || d > days_in || h > 23 || mi > 59 || sec > 59 {
        return Err(bad());
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let yy = if mo <= 2 { y - 1 } else { y };
    let era = yy / 400;
    let yoe = yy - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + h * 3600 + mi * 60 + sec).map_err(|_| bad())
}

/// Unix seconds as `YYYY-MM-DDTHH:MM:SSZ` (the inverse of [`parse_expiry`]).
pub fn format_expiry(unix: u64) -> String {
    let days = (unix / 86_400) as i64;
    let rem = unix % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

impl FirewallRule {
    /// Where the rule admits from, in words: its ranges and names (a
    /// names-only rule is never "any"), and its interfaces when it names
    /// some (`10.0.0.0/8 on eth1`). The CLI's SOURCES column and the
    /// reload's drift summary.
    pub fn sources_text(&self) -> String {
        let from = match (self.ip_ranges.is_empty(), self.names.is_empty()) {
            (true, true) => "any".to_string(),
            _ => [self.ip_ranges.as_slice(), self.names.as_slice()]
                .concat()
                .join(","),
        };
        if self.interfaces.is_empty() {
            from
        } else {
            format!("{from} on {}", self.interfaces.join(","))
        }
    }

    /// The ICMP matches of this rule (`None`: every ICMP message, as
    /// without `icmp_types`). Entries that do not parse (validation
    /// refuses them) match nothing: closed, not open.
    pub fn icmp_matches(&self) -> Option<Vec<IcmpMatch>> {
        if self.icmp_types.is_empty() {
            return None;
        }
        Some(
            self.icmp_types
                .iter()
                .filter_map(|t| parse_icmp_type(t).ok())
                .flatten()
                .collect(),
        )
    }

    /// When the rule expires (Unix seconds), if it does. An expiry that
    /// does not parse (validation refuses it) counts as passed: closed.
    pub fn expires_at(&self) -> Option<u64> {
        self.expires
            .as_deref()
            .map(|e| parse_expiry(e).unwrap_or(0))
    }

    /// Whether this rule admits new TCP connections to `port`.
    pub fn admits_tcp_port(&self, port: u16) -> bool {
        matches!(
            self.protocol,
            Protocol::TcpUdp | Protocol::Tcp | Protocol::Any
        ) && (self.from_port..=self.to_port).contains(&u32::from(port))
    }

    /// Source (ingress) or destination (egress) networks; any when empty.
    pub fn networks(&self) -> Vec<IpNet> {
        if self.ip_ranges.is_empty() && !self.names.is_empty() {
            // Names alone: only what the forwarder learns, never any.
            return Vec::new();
        }
        if self.ip_ranges.is_empty() {
            return any();
        }
        // Validation refuses a set whose ranges do not parse; should one
        // get here anyway, it admits nobody rather than everybody.
        parse_cidrs(&self.ip_ranges).unwrap_or_default()
    }
}

impl FirewallRule {
    /// `icmp_types` and `expires`: the field and why, if one is wrong.
    fn validate_kinds(&self) -> Result<(), (&'static str, String)> {
        if !self.icmp_types.is_empty() && self.protocol != Protocol::Icmp {
            return Err(("icmp_types", "only for rules with protocol \"icmp\"".into()));
        }
        if self.icmp_types.len() > MAX_ICMP_TYPES {
            return Err((
                "icmp_types",
                format!(
                    "{} types, more than {MAX_ICMP_TYPES}",
                    self.icmp_types.len()
                ),
            ));
        }
        for t in &self.icmp_types {
            parse_icmp_type(t).map_err(|e| ("icmp_types", e))?;
        }
        if let Some(e) = &self.expires {
            parse_expiry(e).map_err(|e| ("expires", e))?;
        }
        for name in &self.interfaces {
            check_ifname(name).map_err(|e| ("interfaces", e))?;
        }
        Ok(())
    }
}

/// Why `name` is not an interface name, if it is not (Linux: at most 15
/// bytes; letters, digits and `-_.@`).
pub fn check_ifname(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not an interface name (1-15 letters, digits, '-', '_', '.', '@')"
        ))
    }
}

/// More distinct interfaces than this named by rules is refused: each is
/// a class of its own in the data path (`portcullis_common::IF_CLASSES`).
pub const MAX_RULE_INTERFACES: usize = portcullis_common::IF_CLASSES as usize;

impl RuleSet {
    /// The interfaces ingress rules name, sorted: interface class `i + 1`.
    pub fn rule_interfaces(&self) -> Vec<String> {
        let names: std::collections::BTreeSet<&String> = self
            .ingress_rules
            .iter()
            .flat_map(|r| &r.interfaces)
            .collect();
        names.into_iter().cloned().collect()
    }

    /// Every interface ingress rules name is one Portcullis protects:
    /// with `configured` (the configuration's explicit `interfaces`) one of
    /// those; in automatic mode (`configured` empty) one `protectable` says
    /// it may select (not loopback, not excluded). A rule naming another
    /// would admit nothing there: refused, never silently ignored.
    pub fn check_rule_interfaces(
        &self,
        configured: &[String],
        protectable: impl Fn(&str) -> bool,
    ) -> Result<(), RuleError> {
        for (i, r) in self.ingress_rules.iter().enumerate() {
            let bad = r.interfaces.iter().find(|n| {
                if configured.is_empty() {
                    !protectable(n)
                } else {
                    !configured.contains(n)
                }
            });
            if let Some(name) = bad {
                let reason = if configured.is_empty() {
                    format!(
                        "{name:?} is not an interface Portcullis protects (loopback, or excluded by auto_exclude)"
                    )
                } else {
                    format!(
                        "{name:?} is not an interface Portcullis protects (interfaces = {configured:?})"
                    )
                };
                return Err(RuleError {
                    place: format!("ingress_rules[{i}] (id {:?})", r.id),
                    field: "interfaces",
                    reason,
                });
            }
        }
        Ok(())
    }

    /// Interfaces only on ingress rules, and at most
    /// [`MAX_RULE_INTERFACES`] of them.
    fn validate_interfaces(&self) -> Result<(), RuleError> {
        if let Some((i, r)) = self
            .egress_rules
            .iter()
            .enumerate()
            .find(|(_, r)| !r.interfaces.is_empty())
        {
            return Err(RuleError {
                place: format!("egress_rules[{i}] (id {:?})", r.id),
                field: "interfaces",
                reason: "only ingress rules apply to some interfaces".into(),
            });
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, r) in self.ingress_rules.iter().enumerate() {
            seen.extend(r.interfaces.iter());
            if seen.len() > MAX_RULE_INTERFACES {
                return Err(RuleError {
                    place: format!("ingress_rules[{i}] (id {:?})", r.id),
                    field: "interfaces",
                    reason: format!("rules name more than {MAX_RULE_INTERFACES} interfaces in all"),
                });
            }
        }
        Ok(())
    }
}

impl RuleSet {
    /// Whether any egress rule names hosts (FQDN rules: the DNS forwarder
    /// and the DNS guard are needed).
    pub fn has_names(&self) -> bool {
        self.egress_rules.iter().any(|r| !r.names.is_empty())
    }

    /// The problem with `rule`'s `names` (in `list`), if any.
    fn check_names(&self, list: &str, rule: &FirewallRule) -> Result<(), String> {
        if list != "egress_rules" {
            return Err("only egress rules may name hosts".into());
        }
        if !self.egress_allowlist() {
            return Err(
                "names need egress = \"allowlist\" (under egress = \"allow\" they would admit nothing they do not already)".into(),
            );
        }
        crate::dns::check_rule_names(&rule.names)?;
        if !matches!(
            rule.protocol,
            Protocol::Tcp | Protocol::Udp | Protocol::TcpUdp
        ) {
            return Err("rules with names must be tcp, udp or tcp_udp".into());
        }
        let all = rule.from_port <= 1 && rule.to_port == u32::from(u16::MAX);
        if !all && rule.to_port.saturating_sub(rule.from_port) >= crate::dns::MAX_RULE_PORTS {
            return Err(format!(
                "a rule with names admits at most {} ports, or all of them (from_port 0 or 1 to 65535)",
                crate::dns::MAX_RULE_PORTS
            ));
        }
        Ok(())
    }

    /// Whether `next` is this set with rules (and cluster peers) appended
    /// and nothing else changed, so that whatever new inbound traffic this
    /// set admits, `next` admits (each old rule keeps its place among the
    /// set's rules, so the first match stays the older one, and a peer
    /// admits everything from its address): such a change cuts no open
    /// inbound flow, so the core need not list them. Egress is held
    /// unchanged too: the first egress rule would turn on the allowlist,
    /// and the first rule with names the DNS guard, both narrowing.
    pub fn only_appends(&self, next: &RuleSet) -> bool {
        fn prefix<T: PartialEq>(old: &[T], new: &[T]) -> bool {
            new.get(..old.len()) == Some(old)
        }
        let cluster = match (&self.cluster, &next.cluster) {
            (None, None) => true,
            (None, Some(b)) => b.other_clusters.is_empty(),
            (Some(a), Some(b)) => {
                a.id == b.id && a.other_clusters == b.other_clusters && prefix(&a.peers, &b.peers)
            }
            (Some(_), None) => false,
        };
        cluster
            && prefix(&self.ingress_rules, &next.ingress_rules)
            && prefix(&self.egress_rules, &next.egress_rules)
            && self.ssh == next.ssh
            && self.egress == next.egress
            && self.egress_allowlist() == next.egress_allowlist()
            && self.has_names() == next.has_names()
    }

    /// Whether a rule has expired at `now` (a scan, no copy: the sweep
    /// asks every second).
    pub fn has_expired(&self, now: u64) -> bool {
        self.ingress_rules
            .iter()
            .chain(&self.egress_rules)
            .any(|r| r.expires_at().is_some_and(|t| t <= now))
    }

    /// Removes the rules whose expiry is at or before `now` (Unix seconds)
    /// from both lists; returns them.
    pub fn take_expired(&mut self, now: u64) -> Vec<FirewallRule> {
        let mut gone = Vec::new();
        for list in [&mut self.ingress_rules, &mut self.egress_rules] {
            let (expired, kept): (Vec<_>, Vec<_>) = std::mem::take(list)
                .into_iter()
                .partition(|r| r.expires_at().is_some_and(|t| t <= now));
            *list = kept;
            gone.extend(expired);
        }
        gone
    }

    /// Refuses new or changed rules (against `before`) that have expired
    /// already at `now`: adding one would admit nothing, or for a moment.
    pub fn check_expiries(&self, before: &RuleSet, now: u64) -> Result<(), RuleError> {
        // Only a rule already past its expiry needs `before` (once, by id:
        // a search per rule made adding one rule to 100k a quadratic wait).
        let mut kept: Option<HashMap<&str, &FirewallRule>> = None;
        for (list, rules) in [
            ("ingress_rules", &self.ingress_rules),
            ("egress_rules", &self.egress_rules),
        ] {
            for (index, rule) in rules.iter().enumerate() {
                let (Some(at), Some(text)) = (rule.expires_at(), &rule.expires) else {
                    continue;
                };
                if at > now {
                    continue;
                }
                let kept = kept.get_or_insert_with(|| before.by_id());
                if kept.get(rule.id.as_str()) == Some(&rule) {
                    continue;
                }
                return Err(RuleError {
                    place: format!("{list}[{index}] (id {:?})", rule.id),
                    field: "expires",
                    reason: format!("{text} is in the past"),
                });
            }
        }
        Ok(())
    }

    /// Every rule by its id (both directions).
    fn by_id(&self) -> HashMap<&str, &FirewallRule> {
        self.ingress_rules
            .iter()
            .chain(&self.egress_rules)
            .map(|r| (r.id.as_str(), r))
            .collect()
    }
}

/// Every address, both families.
pub fn any() -> Vec<IpNet> {
    use ipnet::{Ipv4Net, Ipv6Net};
    vec![IpNet::V4(Ipv4Net::default()), IpNet::V6(Ipv6Net::default())]
}

impl RuleSet {
    /// Checks everything; the first problem found is returned.
    pub fn validate(&self) -> Result<(), RuleError> {
        let mut ids = HashSet::new();
        for (list, rules) in [
            ("ingress_rules", &self.ingress_rules),
            ("egress_rules", &self.egress_rules),
        ] {
            for (index, rule) in rules.iter().enumerate() {
                self.check_rule(list, index, rule, |id| ids.insert(id))?;
            }
        }
        if let Some(cluster) = &self.cluster {
            let err = |field, reason: String| RuleError {
                place: "cluster".into(),
                field,
                reason,
            };
            if cluster.id.trim().is_empty() {
                return Err(err("id", "must not be empty".into()));
            }
            parse_cidrs(&cluster.peers).map_err(|e| err("peers", e))?;
            parse_cidrs(&cluster.other_clusters).map_err(|e| err("other_clusters", e))?;
        }
        self.validate_interfaces()?;
        self.ssh.validate()
    }

    /// The checks [`RuleSet::validate`] makes of one rule, `list[index]`,
    /// in its order; `unique(id)` says whether its id is the first of
    /// that id in the set.
    fn check_rule<'a>(
        &self,
        list: &'static str,
        index: usize,
        rule: &'a FirewallRule,
        unique: impl FnOnce(&'a str) -> bool,
    ) -> Result<(), RuleError> {
        let err = |field, reason: String| RuleError {
            place: format!("{list}[{index}] (id {:?})", rule.id),
            field,
            reason,
        };
        if rule.id.trim().is_empty() {
            return Err(err("id", "must not be empty".into()));
        }
        if rule.id.starts_with(RESERVED_ID_PREFIX) {
            return Err(err(
                "id",
                format!(
                    "ids starting with {RESERVED_ID_PREFIX:?} are reserved for rules the daemon adds itself"
                ),
            ));
        }
        if !unique(rule.id.as_str()) {
            return Err(err(
                "id",
                "duplicate id; ids must be unique across both lists".into(),
            ));
        }
        for (field, port) in [("from_port", rule.from_port), ("to_port", rule.to_port)] {
            if port > u32::from(u16::MAX) {
                return Err(err(field, format!("{port} is not a port (0-65535)")));
            }
        }
        if rule.from_port > rule.to_port {
            return Err(err(
                "from_port",
                format!(
                    "{} is greater than to_port {}",
                    rule.from_port, rule.to_port
                ),
            ));
        }
        parse_cidrs(&rule.ip_ranges).map_err(|e| err("ip_ranges", e))?;
        rule.validate_kinds().map_err(|(f, e)| err(f, e))?;
        if !rule.names.is_empty() {
            self.check_names(list, rule).map_err(|e| err("names", e))?;
        }
        check_rate(list == "ingress_rules", rule.rate, rule.burst)
            .map_err(|(field, reason)| err(field, reason))
    }

    /// Checks what a change brings in that `before` did not have: each new
    /// or changed rule must have a plain id (see [`check_id`]) and, for TCP
    /// and UDP, a port other than 0. Rules already live keep working as
    /// they are (sets saved or sent before these checks existed load and
    /// can be edited); what is added from now on is held to them.
    pub fn check_additions(&self, before: &RuleSet) -> Result<(), RuleError> {
        let old: std::collections::HashMap<&str, &FirewallRule> = before
            .ingress_rules
            .iter()
            .chain(&before.egress_rules)
            .map(|r| (r.id.as_str(), r))
            .collect();
        for (list, rules) in [
            ("ingress_rules", &self.ingress_rules),
            ("egress_rules", &self.egress_rules),
        ] {
            for (index, rule) in rules.iter().enumerate() {
                if old.get(rule.id.as_str()) != Some(&rule) {
                    check_added(list, index, rule)?;
                }
            }
        }
        Ok(())
    }

    /// Adds `rule` to this set (a copy of the live set, `live`) and checks
    /// it as [`RuleSet::add_rule`], [`RuleSet::check_additions`] and
    /// [`RuleSet::validate`] would, in that order, when `live` passes
    /// them: for an ingress rule that names no host and no interface, only
    /// the new rule is checked (each of those walks the whole set: 100k
    /// rules took tens of ms). Rules of other kinds are checked with the
    /// whole set. The outer error is the edit's, the inner the checks'.
    pub fn add_checked(
        &mut self,
        live: &RuleSet,
        direction: Direction,
        rule: FirewallRule,
    ) -> Result<Result<(), RuleError>, EditError> {
        let alone = checked_alone(direction, &rule);
        self.add_rule(direction, rule)?;
        if !alone {
            return Ok(self.check_additions(live).and_then(|()| self.validate()));
        }
        let index = self.ingress_rules.len().saturating_sub(1);
        let Some(rule) = self.ingress_rules.get(index) else {
            // Not reached (the rule was just pushed): the whole set's checks.
            return Ok(self.check_additions(live).and_then(|()| self.validate()));
        };
        Ok(check_added("ingress_rules", index, rule)
            .and_then(|()| self.check_rule("ingress_rules", index, rule, |_| true)))
    }
}

/// Whether [`RuleSet::add_checked`] checks `rule` alone: an ingress rule
/// that names no host and no interface. Added to a set, such a rule is
/// also an append in the sense of [`RuleSet::only_appends`].
pub fn checked_alone(direction: Direction, rule: &FirewallRule) -> bool {
    direction == Direction::Ingress && rule.names.is_empty() && rule.interfaces.is_empty()
}

/// The check [`RuleSet::check_additions`] makes of a rule new to the set,
/// `list[index]`.
fn check_added(list: &str, index: usize, rule: &FirewallRule) -> Result<(), RuleError> {
    let err = |field, reason: String| RuleError {
        place: format!("{list}[{index}] (id {:?})", rule.id),
        field,
        reason,
    };
    check_id(&rule.id).map_err(|e| err("id", e))?;
    let ports_apply = matches!(
        rule.protocol,
        Protocol::TcpUdp | Protocol::Tcp | Protocol::Udp
    );
    if ports_apply && rule.to_port == 0 {
        return Err(err(
            "to_port",
            "port 0 is not a port: a TCP/UDP rule for port 0 admits nothing".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A rule to add: one of the property tests' rules, then made wrong
    /// (or not) in one of the ways the checks look for.
    fn rule_to_add() -> impl proptest::strategy::Strategy<Value = (Direction, FirewallRule)> {
        use proptest::prelude::*;
        (
            prop_oneof![Just(Direction::Ingress), Just(Direction::Egress)],
            0usize..30,
            crate::compile::strategies::rule(200),
            0u8..12,
        )
            .prop_map(|(direction, id, mut rule, flaw)| {
                rule.id = format!("r{id}");
                match flaw {
                    1 => rule.id = String::new(),
                    2 => rule.id = format!("{RESERVED_ID_PREFIX}x"),
                    3 => rule.id = "a b".into(),
                    4 => rule.to_port = 0,
                    5 => rule.from_port = rule.to_port + 1,
                    6 => rule.to_port = 70_000,
                    7 => rule.ip_ranges.push("10.0.0.300/8".into()),
                    8 => rule.names = vec!["example.com".into()],
                    9 => rule.rate = Some(0),
                    10 => rule.interfaces = vec!["eth9".into()],
                    _ => {}
                }
                (direction, rule)
            })
    }

    proptest::proptest! {
        /// Checking a new rule alone says what checking the whole set
        /// said, for a live set that passes the checks.
        #[test]
        fn an_added_rule_is_checked_as_the_whole_set_would_be(
            live in crate::compile::strategies::rule_set(),
            (direction, rule) in rule_to_add(),
        ) {
            proptest::prop_assume!(live.validate().is_ok());
            let mut whole = live.clone();
            let expected = whole
                .add_rule(direction, rule.clone())
                .map(|()| whole.check_additions(&live).and_then(|()| whole.validate()));
            let mut alone = live.clone();
            let got = alone.add_checked(&live, direction, rule);
            proptest::prop_assert_eq!(got, expected);
            proptest::prop_assert_eq!(alone, whole);
        }
    }

    pub fn rule(id: &str, from: u32, to: u32, ranges: &[&str]) -> FirewallRule {
        FirewallRule {
            id: id.into(),
            from_port: from,
            to_port: to,
            ip_ranges: ranges.iter().map(|s| s.to_string()).collect(),
            names: Vec::new(),
            protocol: Protocol::default(),
            description: None,
            icmp_types: Vec::new(),
            expires: None,
            rate: None,
            burst: None,
            interfaces: Vec::new(),
        }
    }

    fn set(ingress: Vec<FirewallRule>) -> RuleSet {
        RuleSet {
            ingress_rules: ingress,
            ..Default::default()
        }
    }

    #[test]
    fn accepts_brev_json_shape() {
        let json = r#"{"ingress_rules":[{"id":"web","from_port":80,"to_port":443,"ip_ranges":["10.0.0.0/8"]}],"egress_rules":[]}"#;
        let s: RuleSet = serde_json::from_str(json).unwrap();
        assert_eq!(s.ingress_rules, vec![rule("web", 80, 443, &["10.0.0.0/8"])]);
        s.validate().unwrap();
    }

    #[test]
    fn reports_which_rule_and_field() {
        let e = set(vec![rule("ok", 1, 2, &[]), rule("bad", 90, 80, &[])])
            .validate()
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "ingress_rules[1] (id \"bad\"): from_port: 90 is greater than to_port 80"
        );
    }

    #[test]
    fn rejects_out_of_range_ports_and_duplicate_ids() {
        assert_eq!(
            set(vec![rule("a", 1, 70000, &[])])
                .validate()
                .unwrap_err()
                .field,
            "to_port"
        );
        let e = set(vec![rule("a", 1, 2, &[]), rule("a", 3, 4, &[])])
            .validate()
            .unwrap_err();
        assert!(e.reason.contains("duplicate"), "{e}");
    }

    #[test]
    fn rejects_port_zero_and_odd_ids_naming_rule_and_field() {
        let new = |s: RuleSet| s.check_additions(&RuleSet::default());
        let e = new(set(vec![rule("zero", 0, 0, &[])])).unwrap_err();
        assert_eq!(
            e.in_words(),
            "ingress rule \"zero\": to_port: port 0 is not a port: a TCP/UDP rule for port 0 admits nothing"
        );
        // ICMP has no ports; a range from 0 admits its other ports.
        let mut icmp = rule("ping", 0, 0, &[]);
        icmp.protocol = Protocol::Icmp;
        new(set(vec![icmp, rule("all", 0, 65535, &[])])).unwrap();
        for bad in ["a b", "a/b", "x\ny", "a#b", "%61", "..", "-x", "é"] {
            let e = new(set(vec![rule(bad, 1, 2, &[])])).unwrap_err();
            assert_eq!(e.field, "id", "{bad:?}: {e}");
            assert!(e.in_words().starts_with("ingress rule "), "{e}");
        }
        for good in ["web-8080", "a.b_c:d@e", "9000"] {
            new(set(vec![rule(good, 1, 2, &[])])).unwrap();
        }
        assert!(new(set(vec![rule(&"a".repeat(129), 1, 2, &[])])).is_err());
        // What is live already stays acceptable (sets saved before these
        // checks); a changed rule is checked again.
        let old = set(vec![rule("a b", 1, 2, &[]), rule("zero", 0, 0, &[])]);
        let mut next = old.clone();
        next.ingress_rules.push(rule("web", 80, 80, &[]));
        next.check_additions(&old).unwrap();
        next.validate().unwrap();
        next.ingress_rules[0].to_port = 3;
        assert_eq!(next.check_additions(&old).unwrap_err().field, "id");
    }

    #[test]
    fn rejects_bad_cidrs_and_host_bits() {
        let e = set(vec![rule("a", 1, 2, &["10.0.0.0/33"])])
            .validate()
            .unwrap_err();
        assert_eq!(e.field, "ip_ranges");
        let e = set(vec![rule("a", 1, 2, &["10.1.2.3/8"])])
            .validate()
            .unwrap_err();
        assert!(
            e.reason.contains("host bits")
                && e.reason.contains("10.0.0.0/8")
                && e.reason.contains("10.1.2.3/32"),
            "{e}"
        );
        let e = set(vec![rule("a", 1, 2, &["fd00::1/64"])])
            .validate()
            .unwrap_err();
        assert!(e.reason.contains("fd00::/64"), "{e}");
        // A bare address is a host route.
        set(vec![rule("a", 1, 2, &["192.0.2.7", "2001:db8::1"])])
            .validate()
            .unwrap();
        let mut s = set(vec![]);
        s.cluster = Some(Cluster {
            id: "c".into(),
            peers: vec!["nope".into()],
            other_clusters: vec![],
        });
        assert_eq!(s.validate().unwrap_err().place, "cluster");
    }

    #[test]
    fn edits_keep_ids_unique_and_say_what_is_missing() {
        let mut set = RuleSet::default();
        set.add_rule(Direction::Ingress, rule("web", 80, 80, &[]))
            .unwrap();
        assert_eq!(
            set.add_rule(Direction::Egress, rule("web", 81, 81, &[])),
            Err(EditError::Exists("web".into()))
        );
        assert_eq!(
            set.remove_rule("nope"),
            Err(EditError::NoRule("nope".into()))
        );
        set.remove_rule("web").unwrap();
        assert!(set.ingress_rules.is_empty());
        let peers = |v: &[&str]| v.iter().map(ToString::to_string).collect::<Vec<_>>();
        set.edit_peers(PeerEdit::Add, &peers(&["10.0.0.0/8"]), Some("c"))
            .unwrap();
        set.edit_peers(PeerEdit::Add, &peers(&["10.0.0.0/8", "10.1.0.0/16"]), None)
            .unwrap();
        let cluster = set.cluster.clone().unwrap();
        assert_eq!((cluster.id.as_str(), cluster.peers.len()), ("c", 2));
        let e = set
            .edit_peers(
                PeerEdit::Remove,
                &peers(&["10.1.0.0/16", "192.0.2.0/24"]),
                None,
            )
            .unwrap_err();
        assert_eq!(e.to_string(), "no peer \"192.0.2.0/24\" in the cluster");
        assert_eq!(
            set.cluster.as_ref().unwrap().peers.len(),
            2,
            "a failed edit changed nothing"
        );
        set.edit_peers(PeerEdit::Replace, &peers(&["10.2.0.0/16"]), None)
            .unwrap();
        assert_eq!(set.cluster.unwrap().peers, peers(&["10.2.0.0/16"]));
    }

    #[test]
    fn a_replacement_without_ssh_keeps_the_live_exemption() {
        let mut live = set(vec![]);
        live.ssh = Ssh {
            allow: true,
            sources: vec!["192.0.2.0/24".into()],
            ports: vec![2222],
        };
        let r: Replacement = serde_json::from_str(r#"{"ingress_rules": []}"#).unwrap();
        assert_eq!(r.over(&live).ssh, live.ssh);
        let r: Replacement = serde_json::from_str(r#"{"ssh": {"allow": false}}"#).unwrap();
        assert!(!r.over(&live).ssh.allow);
    }

    #[test]
    fn icmp_types_parse_per_family_and_errors_name_rule_and_field() {
        let m = |t: &str| parse_icmp_type(t).unwrap();
        let echo = m("echo-request");
        assert_eq!(echo.len(), 2);
        assert_eq!(echo[0].ports(), (8 << 8, (8 << 8) | 255));
        assert_eq!((echo[1].v6, echo[1].icmp_type), (true, 128));
        assert_eq!(m("destination-unreachable/4")[0].ports(), (0x304, 0x304));
        assert_eq!(m("destination-unreachable/4")[1].ports(), (0x104, 0x104));
        assert_eq!(
            m("icmp:13"),
            vec![IcmpMatch {
                v6: false,
                icmp_type: 13,
                code: None
            }]
        );
        assert!(m("packet-too-big").iter().all(|x| x.v6));
        assert!(m("timestamp-request").iter().all(|x| !x.v6));
        for bad in [
            "3",
            "echo",
            "icmp:256",
            "icmpv4:3",
            "echo-request/300",
            "icmp:packet-too-big",
            "icmpv6:135",
        ] {
            assert!(parse_icmp_type(bad).is_err(), "{bad}");
        }
        let mut r = rule("ping", 0, 0, &[]);
        r.protocol = Protocol::Icmp;
        r.icmp_types = vec!["echo-request".into(), "nope".into()];
        let e = set(vec![r.clone()]).validate().unwrap_err();
        assert_eq!(e.field, "icmp_types");
        assert!(
            e.in_words()
                .starts_with("ingress rule \"ping\": icmp_types: \"nope\""),
            "{}",
            e.in_words()
        );
        r.icmp_types = vec!["echo-request".into()];
        set(vec![r.clone()]).validate().unwrap();
        r.protocol = Protocol::Tcp;
        assert_eq!(set(vec![r]).validate().unwrap_err().field, "icmp_types");
    }

    #[test]
    fn expiries_are_utc_times() {
        assert_eq!(parse_expiry("1970-01-01T00:00:00Z"), Ok(0));
        assert_eq!(parse_expiry("2026-12-01T10:00:00Z"), Ok(1_796_119_200));
        assert_eq!(format_expiry(1_796_119_200), "2026-12-01T10:00:00Z");
        for t in [0, 951_782_400, 1_709_164_800, 4_102_444_799] {
            assert_eq!(parse_expiry(&format_expiry(t)), Ok(t), "{t}");
        }
        for bad in [
            "2026-12-01 10:00:00Z",
            "2026-02-30T10:00:00Z",
            "2026-12-01T24:00:00Z",
            "2026-12-01T10:00:00+01:00",
            "tomorrow",
        ] {
            assert!(parse_expiry(bad).is_err(), "{bad}");
        }
        let mut r = rule("brief", 80, 80, &[]);
        r.expires = Some("soon".into());
        assert_eq!(
            set(vec![r.clone()]).validate().unwrap_err().field,
            "expires"
        );
        r.expires = Some("2026-12-01T10:00:00Z".into());
        let mut s = set(vec![r, rule("kept", 81, 81, &[])]);
        let e = s
            .check_expiries(&RuleSet::default(), 1_796_119_200)
            .unwrap_err();
        assert_eq!(
            e.in_words(),
            "ingress rule \"brief\": expires: 2026-12-01T10:00:00Z is in the past"
        );
        s.check_expiries(&RuleSet::default(), 1_796_119_199)
            .unwrap();
        // Live already: not refused (the core removes it).
        s.check_expiries(&s.clone(), 1_796_119_200).unwrap();
        assert!(s.take_expired(1_796_119_199).is_empty());
        let gone = s.take_expired(1_796_119_200);
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].id, "brief");
        assert_eq!(s.ingress_rules.len(), 1);
    }

    #[test]
    fn toml_and_extensions() {
        let s: RuleSet = toml::from_str(
            r#"
[[ingress_rules]]
id = "dns"
from_port = 53
to_port = 53
ip_ranges = []
protocol = "udp"
description = "resolver"
[cluster]
id = "c1"
peers = ["10.1.0.0/16", "fd01::/64"]
[ssh]
allow = true
sources = ["203.0.113.0/24"]
"#,
        )
        .unwrap();
        s.validate().unwrap();
        assert_eq!(s.ingress_rules[0].protocol, Protocol::Udp);
        assert_eq!(s.ssh.networks().unwrap().len(), 1);
        assert_eq!(s.ssh.ports, [22]);
        assert_eq!(s.ingress_rules[0].networks(), any());
    }

    #[test]
    fn only_appended_rules_and_peers_count_as_widening() {
        let mut old = RuleSet::default();
        old.ingress_rules.push(rule("web", 80, 80, &["10.0.0.0/8"]));
        old.cluster = Some(Cluster {
            id: "c".into(),
            peers: vec!["10.1.0.1/32".into()],
            other_clusters: vec![],
        });
        let appended = |f: &dyn Fn(&mut RuleSet)| {
            let mut next = old.clone();
            f(&mut next);
            old.only_appends(&next)
        };
        assert!(appended(&|_| {}));
        assert!(appended(&|n| n.ingress_rules.push(rule(
            "db",
            5432,
            5432,
            &[]
        ))));
        // The first egress rule turns the implicit allowlist on: narrower.
        assert!(!appended(&|n| n.egress_rules.push(rule(
            "out",
            443,
            443,
            &[]
        ))));
        assert!(appended(&|n| n
            .cluster
            .as_mut()
            .unwrap()
            .peers
            .push("10.1.0.2/32".into())));
        // Anything else may narrow what passes.
        assert!(!appended(&|n| n
            .ingress_rules
            .insert(0, rule("db", 22, 22, &[]))));
        assert!(!appended(&|n| n.ingress_rules[0].to_port = 81));
        assert!(!appended(&|n| n.ingress_rules.clear()));
        assert!(!appended(&|n| n.cluster.as_mut().unwrap().peers.clear()));
        assert!(!appended(&|n| n
            .cluster
            .as_mut()
            .unwrap()
            .other_clusters
            .push("10.9.0.0/16".into())));
        assert!(!appended(&|n| n.cluster = None));
        assert!(!appended(&|n| n.ssh.allow = !n.ssh.allow));
        assert!(!appended(&|n| n.egress = Some(EgressMode::Allowlist)));
        // A second egress rule only widens the allowlist.
        let mut one = old.clone();
        one.egress_rules.push(rule("out", 443, 443, &[]));
        let mut two = one.clone();
        two.egress_rules.push(rule("dns", 53, 53, &[]));
        assert!(one.only_appends(&two));
    }
}
