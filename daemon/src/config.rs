//! The daemon's configuration file (`/etc/portcullis/portcullis.toml`).
//!
//! The file is the baseline: the interfaces to protect, where pins live, the
//! SSH exemption and the rules. Validation happens here, before anything
//! touches the kernel, so a bad file changes nothing.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

pub use crate::model::{DEFAULT_EXCLUDE, TcAttachMode, XdpProgram};
use crate::{
    compile::Limits,
    model::Selector,
    rules::{Cluster, FirewallRule, RuleSet, Ssh},
};

pub const DEFAULT_CONFIG_PATH: &str = "/etc/portcullis/portcullis.toml";
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/portcullis";
/// Where `run-bpffs.mount` mounts a bpffs on hosts whose `/sys/fs/bpf` is
/// not one (containers).
pub const FALLBACK_BPFFS: &str = "/run/bpffs";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Interfaces to protect. Empty (the default): every non-virtual link,
    /// including ones that appear later; see `auto_include`/`auto_exclude`.
    #[serde(default)]
    pub interfaces: Vec<String>,
    /// Automatic mode: name patterns of virtual links to protect as well.
    #[serde(default)]
    pub auto_include: Vec<String>,
    /// Automatic mode: name patterns never protected (container runtimes).
    #[serde(default = "default_exclude")]
    pub auto_exclude: Vec<String>,
    /// Where the live rule set is kept across restarts (default
    /// /var/lib/portcullis; `--state-dir` overrides).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<PathBuf>,
    /// bpffs directory holding the pinned maps and links. Default:
    /// `/sys/fs/bpf/portcullis` where systemd mounted bpffs at
    /// `/sys/fs/bpf` (a VM), else `/run/bpffs/portcullis` (containers, where
    /// `/sys` is read-only and `run-bpffs.mount` provides a bpffs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pin_dir: Option<PathBuf>,
    #[serde(default)]
    pub ssh: Ssh,
    /// What SSH readiness checks, and the optional HTTP health endpoint.
    #[serde(default)]
    pub readiness: ReadinessConfig,
    /// The cluster this host belongs to: its peers reach it on every port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<Cluster>,
    /// The control API.
    #[serde(default)]
    pub api: ApiConfig,
    /// Drops written to the journal as structured records.
    #[serde(default)]
    pub drop_log: DropLogConfig,
    /// Map capacities: how large a rule set the data path can hold.
    #[serde(default)]
    pub capacity: Capacity,
    /// Egress volume per destination: counted, shown, alerted on.
    #[serde(default)]
    pub egress_volume: EgressVolume,
    /// The DNS forwarder for FQDN egress rules (rules with `names`).
    #[serde(default)]
    pub dns: DnsConfig,
    /// Admit inbound ICMP/ICMPv6 echo requests (pings). Replies to this
    /// host's own pings are always admitted.
    #[serde(default)]
    pub allow_ping: bool,
    /// Size of the connection table (flows this host opened). When full, the
    /// least recently used flow is evicted.
    #[serde(default = "default_conntrack_entries")]
    pub conntrack_entries: u32,
    /// `[rate_limit]`: the default limit on new inbound flows per source
    /// (none unless set). Read at start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<crate::model::RateLimit>,
    /// How the egress program attaches: `auto` (TCX on kernels that have it,
    /// 6.6 and later; a clsact qdisc filter otherwise), `tcx` or `clsact`.
    #[serde(default)]
    pub tc_attach: TcAttachMode,
    /// Which XDP program filters inbound: `auto` (the multi-buffer one,
    /// which native XDP needs on jumbo-MTU interfaces, else, on kernels
    /// before 5.18 that refuse it, the single-buffer one), `frags` or
    /// `single-buffer` (forced; the tests run both).
    #[serde(default)]
    pub xdp_program: XdpProgram,
    /// What the host gets if the eBPF data path cannot load: `none` (the
    /// service fails, loudly, and nothing filters) or `nftables` (it also
    /// installs a deny-inbound policy that admits SSH and established flows).
    #[serde(default)]
    pub fallback: Fallback,
    /// Brev-format rules, at the top level as the SDK writes them.
    #[serde(default)]
    pub ingress_rules: Vec<FirewallRule>,
    #[serde(default)]
    pub egress_rules: Vec<FirewallRule>,
    /// `egress = "allow"` (egress rules block nothing) or `"allowlist"`
    /// (only what they admit leaves). Without it: an allowlist when there
    /// are egress rules (`--check-config` warns), else allow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<crate::rules::EgressMode>,
    /// The permanent rule set `portcullis rules save` writes (default:
    /// `saved/rules.toml` beside this file). While it exists it is the rule
    /// set of this configuration: its `ingress_rules`, `egress_rules`,
    /// `cluster` and `[ssh]` replace this file's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules_file: Option<PathBuf>,
    /// The rules read from `rules_file` when it exists (by [`Config::load`]).
    #[serde(skip)]
    saved: Option<RuleSet>,
    /// A CrowdSec Local API whose ban decisions fill a deny set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crowdsec: Option<crate::crowdsec::CrowdSecConfig>,
    /// Cluster membership from etcd (`[fleet]`): off unless set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<FleetConfig>,
}

/// Which drops go to the journal (one structured record each, rate
/// limited), from the sampled drop events (`watch`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DropLogConfig {
    /// Drop reasons logged (`portcullis counters` names them). Default:
    /// those that say something happened rather than background noise
    /// (`drop_denied`, `drop_egress`, `drop_other_cluster`,
    /// `drop_malformed`, `drop_fragment`, `drop_vlan_stack`); `[]` logs none.
    #[serde(default = "default_drop_log_reasons")]
    pub reasons: Vec<String>,
    /// Records a second at most (a burst of as many); the rest are counted
    /// and reported in one record per interval.
    #[serde(default = "default_drop_log_rate")]
    pub per_second: u32,
}

impl Default for DropLogConfig {
    fn default() -> Self {
        DropLogConfig {
            reasons: default_drop_log_reasons(),
            per_second: default_drop_log_rate(),
        }
    }
}

fn default_drop_log_reasons() -> Vec<String> {
    [
        "drop_denied",
        "drop_egress",
        "drop_other_cluster",
        "drop_malformed",
        "drop_fragment",
        "drop_vlan_stack",
    ]
    .map(String::from)
    .to_vec()
}

fn default_drop_log_rate() -> u32 {
    10
}

/// `[fleet]`: the cluster's peers follow a member list in etcd, and this
/// host registers its own addresses there (see `crate::membership`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    /// etcd client URLs, `https://ADDRESS:PORT` (TLS only), tried in turn.
    pub endpoints: Vec<String>,
    /// The CA that signed the etcd servers' certificates (PEM).
    pub ca_file: PathBuf,
    /// A client certificate and its key (PEM), when etcd asks for one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// etcd user, with its password in `password_file` (owned by root,
    /// mode 0600 or stricter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// Key prefix (default `/portcullis`): members are under
    /// `<prefix>/<cluster_id>/members/`.
    #[serde(default = "default_fleet_prefix")]
    pub prefix: String,
    pub cluster_id: String,
    /// Where members may be: a member address outside them is refused.
    pub allowed_ranges: Vec<String>,
    /// This host's key under `members/` (default: the host name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The addresses this host registers (single addresses inside
    /// `allowed_ranges`); none: it only follows the list.
    #[serde(default)]
    pub addresses: Vec<String>,
    /// The registration's lease: the key goes this long after the daemon
    /// stops renewing it.
    #[serde(default = "default_lease_ttl")]
    pub lease_ttl_secs: u64,
}

fn default_fleet_prefix() -> String {
    "/portcullis".into()
}

fn default_lease_ttl() -> u64 {
    10
}

impl FleetConfig {
    /// `allowed_ranges`, parsed.
    pub fn allowed(&self) -> anyhow::Result<Vec<ipnet::IpNet>> {
        self.allowed_ranges
            .iter()
            .enumerate()
            .map(|(i, r)| {
                r.parse::<ipnet::IpNet>()
                    .map(|n| n.trunc())
                    .map_err(|_| anyhow::anyhow!("fleet: allowed_ranges[{i}]: {r:?} is not a CIDR"))
            })
            .collect()
    }

    fn validate(&self) -> anyhow::Result<()> {
        if self.endpoints.is_empty() {
            bail!("fleet: endpoints: at least one etcd endpoint is needed");
        }
        for (i, e) in self.endpoints.iter().enumerate() {
            crate::membership::parse_endpoint(e)
                .map_err(|why| anyhow::anyhow!("fleet: endpoints[{i}]: {why}"))?;
        }
        let paths = [
            ("ca_file", Some(&self.ca_file)),
            ("cert_file", self.cert_file.as_ref()),
            ("key_file", self.key_file.as_ref()),
            ("password_file", self.password_file.as_ref()),
        ];
        for (key, path) in paths {
            if let Some(p) = path.filter(|p| !p.is_absolute()) {
                bail!("fleet: {key}: {} must be an absolute path", p.display());
            }
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            bail!("fleet: cert_file and key_file go together");
        }
        if self.username.is_some() != self.password_file.is_some() {
            bail!("fleet: username and password_file go together");
        }
        if !self.prefix.starts_with('/') || self.prefix.ends_with('/') {
            bail!(
                "fleet: prefix: {:?} must start with / and not end with /",
                self.prefix
            );
        }
        if !crate::membership::valid_name(&self.cluster_id) {
            bail!(
                "fleet: cluster_id: {:?} is not a name (letters, digits, - _ .)",
                self.cluster_id
            );
        }
        if let Some(name) = self
            .name
            .as_ref()
            .filter(|n| !crate::membership::valid_name(n))
        {
            bail!("fleet: name: {name:?} is not a name (letters, digits, - _ .)");
        }
        let allowed = self.allowed()?;
        if allowed.is_empty() {
            bail!("fleet: allowed_ranges: empty (no member could ever be admitted)");
        }
        for (i, a) in self.addresses.iter().enumerate() {
            crate::membership::single_address(a, &allowed)
                .map_err(|why| anyhow::anyhow!("fleet: addresses[{i}]: {why}"))?;
        }
        if !(2..=3600).contains(&self.lease_ttl_secs) {
            bail!(
                "fleet: lease_ttl_secs: {} is out of range (2 to 3600)",
                self.lease_ttl_secs
            );
        }
        Ok(())
    }
}

/// Where `portcullis rules save` writes, relative to the configuration.
pub const SAVED_RULES: &str = "saved/rules.toml";

/// The control socket, who may read and change rules through it, and the
/// bounds no local user can push it past.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Socket path (default /run/portcullis/portcullis.sock).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
    /// Members of this group may change rules (root always may) and read.
    /// Without it (and without `reader_group`), only root can connect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Members of this group may read (rules, peers, status, readiness,
    /// counters, metrics, events) but not change anything. The socket is
    /// owned by this group when set (else by `group`, else by root), mode
    /// 0660: writers outside it cannot connect, so make them members too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reader_group: Option<String>,
    /// A request (a slow client's included) that takes longer is answered
    /// 408 and closed.
    #[serde(default = "default_request_timeout")]
    pub request_timeout_secs: u64,
    /// Open connections of one uid that is neither root nor a writer;
    /// more are closed at once (with a 503).
    #[serde(default = "default_connections_per_uid")]
    pub max_connections_per_uid: usize,
    /// Open connections of all such uids together. Capped further at a
    /// quarter of the descriptor limit, so root and the writers always find
    /// descriptors left.
    #[serde(default = "default_connections")]
    pub max_connections: usize,
    /// Concurrent `GET /v1/events?follow=true` streams of one uid that is
    /// neither root nor a writer; more get a 429.
    #[serde(default = "default_streams_per_uid")]
    pub max_streams_per_uid: usize,
    /// Refused requests of one uid recorded (audit log and journal) per
    /// minute; past that, one summary record says how many more there were.
    #[serde(default = "default_refusals_per_minute")]
    pub refusals_logged_per_minute: u32,
}

fn default_request_timeout() -> u64 {
    30
}

fn default_connections_per_uid() -> usize {
    32
}

fn default_connections() -> usize {
    256
}

fn default_streams_per_uid() -> usize {
    4
}

fn default_refusals_per_minute() -> u32 {
    10
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            socket: None,
            group: None,
            reader_group: None,
            request_timeout_secs: default_request_timeout(),
            max_connections_per_uid: default_connections_per_uid(),
            max_connections: default_connections(),
            max_streams_per_uid: default_streams_per_uid(),
            refusals_logged_per_minute: default_refusals_per_minute(),
        }
    }
}

impl ApiConfig {
    fn validate(&self) -> anyhow::Result<()> {
        if self.request_timeout_secs == 0 {
            bail!("api: request_timeout_secs: must be at least 1");
        }
        for (key, value) in [
            ("max_connections_per_uid", self.max_connections_per_uid),
            ("max_connections", self.max_connections),
            ("max_streams_per_uid", self.max_streams_per_uid),
        ] {
            if !(1..=65536).contains(&value) {
                bail!("api: {key}: {value} is out of range (1 to 65536)");
            }
        }
        if self.max_connections_per_uid > self.max_connections {
            bail!(
                "api: max_connections_per_uid ({}) exceeds max_connections ({})",
                self.max_connections_per_uid,
                self.max_connections
            );
        }
        Ok(())
    }
}

/// Capacities of the rule maps (per generation). The defaults hold tens of
/// thousands of rules; the compiler says which one to raise when a rule set
/// does not fit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Capacity {
    pub prefixes: u32,
    pub regions: u32,
    pub segments: u32,
    pub slots: u32,
    pub v4_chunks: u32,
    /// Capacity of the IPv4 and IPv6 deny tries (prefixes each; memory is
    /// used only by the entries held, so the 1M default costs nothing
    /// until filled). Read at start.
    pub deny_v4_prefixes: u32,
    pub deny_v6_prefixes: u32,
}

/// Where the forwarder listens by default: a loopback address of its own,
/// so a local dnsmasq, unbound or systemd-resolved (127.0.0.1,
/// 127.0.0.53) keeps port 53 on theirs.
pub const DEFAULT_DNS_LISTEN: &str = "127.0.0.153:53";

/// `[dns]`: the DNS forwarder FQDN egress rules need (it runs when a rule
/// has `names`, or `enabled = true`). Its upstreams are the only resolvers
/// the host can reach while FQDN rules exist.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// Run the forwarder even without FQDN rules (so rules with names can
    /// be added at run time). Read at start.
    pub enabled: bool,
    /// Address and port to listen on (UDP and TCP), unless systemd passes
    /// sockets named `dns-udp` and `dns-tcp`.
    pub listen: std::net::SocketAddr,
    /// Resolvers to ask, in order (`"192.0.2.53"` or `"[2001:db8::53]:53"`);
    /// required when any rule has names.
    pub upstreams: Vec<String>,
    /// A learned address admits new flows for at least this many seconds,
    /// however short the answer's TTL (the client's connect comes after).
    pub ttl_floor: u32,
    /// ... and for at most this many, however long the TTL.
    pub ttl_max: u32,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            enabled: false,
            listen: std::net::SocketAddr::from(([127, 0, 0, 153], 53)),
            upstreams: Vec::new(),
            ttl_floor: 30,
            ttl_max: 3600,
        }
    }
}

impl DnsConfig {
    /// The upstreams as socket addresses (port 53 unless given).
    pub fn upstream_addrs(&self) -> anyhow::Result<Vec<std::net::SocketAddr>> {
        self.upstreams
            .iter()
            .enumerate()
            .map(|(i, u)| {
                u.parse::<std::net::SocketAddr>()
                    .or_else(|_| {
                        u.parse::<std::net::IpAddr>()
                            .map(|ip| std::net::SocketAddr::new(ip, 53))
                    })
                    .map_err(|_| anyhow::anyhow!("dns: upstreams[{i}]: {u:?} is not an address"))
            })
            .collect()
    }

    /// What an operator should hear about `[dns]`: a `listen` address off
    /// loopback makes the forwarder answer whoever reaches it.
    pub fn warnings(&self) -> Vec<String> {
        if self.listen.ip().is_loopback() {
            return Vec::new();
        }
        vec![format!(
            "dns: listen {} is not a loopback address: every host and container that reaches it may use the forwarder (and have names admitted for this host); let the rules admit its port only from the networks that need it",
            self.listen
        )]
    }

    /// Whether the forwarder runs.
    pub fn wanted(&self, has_names: bool) -> bool {
        self.enabled || has_names
    }

    fn validate(&self, has_names: bool) -> anyhow::Result<()> {
        let upstreams = self.upstream_addrs()?;
        if self.wanted(has_names) && upstreams.is_empty() {
            bail!(
                "dns: upstreams: empty, but egress rules name hosts (the forwarder needs a resolver to ask)"
            );
        }
        if upstreams.len() > portcullis_common::DNS_MAX_UPSTREAMS as usize {
            bail!(
                "dns: upstreams: {} listed, at most {}",
                upstreams.len(),
                portcullis_common::DNS_MAX_UPSTREAMS
            );
        }
        for (i, u) in upstreams.iter().enumerate() {
            if *u == self.listen || (u.port() == self.listen.port() && u.ip().is_unspecified()) {
                bail!("dns: upstreams[{i}]: {u} is the forwarder's own address");
            }
        }
        if self.ttl_floor > 3600 {
            bail!(
                "dns: ttl_floor: {} is out of range (0 to 3600)",
                self.ttl_floor
            );
        }
        if self.ttl_max < self.ttl_floor.max(1) || self.ttl_max > 86_400 {
            bail!(
                "dns: ttl_max: {} is out of range (ttl_floor, at least 1, to 86400)",
                self.ttl_max
            );
        }
        Ok(())
    }
}

/// `[egress_volume]`: what left this host per destination (address, IPv6
/// /64, port, protocol), kept by the data path in a bounded table that the
/// daemon reads every few seconds; see `volume.rs`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EgressVolume {
    /// Count it (one hash update per passed egress packet).
    pub enabled: bool,
    /// Alert windows, seconds.
    pub interval_secs: u64,
    /// Alert (journal warning, `watch` event) when a destination sends more
    /// than this many bytes within one window; 0: never.
    pub alert_bytes: u64,
    /// How many destinations `status` and the metrics show.
    pub top: usize,
}

impl Default for EgressVolume {
    fn default() -> Self {
        EgressVolume {
            enabled: true,
            interval_secs: 60,
            alert_bytes: 0,
            top: 10,
        }
    }
}

impl EgressVolume {
    fn validate(&self) -> anyhow::Result<()> {
        if !(1..=86_400).contains(&self.interval_secs) {
            bail!(
                "egress_volume: interval_secs: {} is out of range (1 to 86400)",
                self.interval_secs
            );
        }
        if !(1..=1000).contains(&self.top) {
            bail!(
                "egress_volume: top: {} is out of range (1 to 1000)",
                self.top
            );
        }
        Ok(())
    }

    /// The ledger's settings.
    pub fn settings(&self) -> crate::volume::Settings {
        crate::volume::Settings {
            interval_secs: self.interval_secs,
            alert_bytes: (self.alert_bytes > 0).then_some(self.alert_bytes),
            top: self.top,
            ..crate::volume::Settings::default()
        }
    }
}

impl Default for Capacity {
    fn default() -> Self {
        let l = Limits::default();
        Capacity {
            prefixes: l.prefixes,
            regions: l.regions,
            segments: l.segments,
            slots: l.slots,
            v4_chunks: l.v4_chunks,
            deny_v4_prefixes: portcullis_common::DEFAULT_DENY_PREFIXES,
            deny_v6_prefixes: portcullis_common::DEFAULT_DENY_PREFIXES,
        }
    }
}

impl Capacity {
    pub fn limits(&self) -> Limits {
        Limits {
            prefixes: self.prefixes,
            regions: self.regions,
            segments: self.segments,
            slots: self.slots,
            v4_chunks: self.v4_chunks,
        }
    }
}

/// What the host gets when the daemon cannot bring enforcement up. The
/// default fails closed: deny inbound except the SSH exemption and
/// established flows. `none` is for hosts without nftables, and says so
/// loudly when it leaves the host open.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fallback {
    None,
    #[default]
    Nftables,
}

fn default_exclude() -> Vec<String> {
    DEFAULT_EXCLUDE.iter().map(|s| s.to_string()).collect()
}

fn default_conntrack_entries() -> u32 {
    portcullis_common::CONNTRACK_DEFAULT_ENTRIES
}

/// SSH readiness settings (`[readiness]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReadinessConfig {
    /// The unit running sshd. Default: the first of ssh.service,
    /// sshd.service and ssh.socket that is loaded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ssh_unit: Option<String>,
    /// Deprecated alias of `[ssh] ports = [PORT]`, kept so older files load.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ssh_port: Option<u16>,
    /// A user whose `~/.ssh/authorized_keys` must hold a key, with safe
    /// ownership and modes, for the host to count as ready.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ssh_user: Option<String>,
    /// sshd, asked for its effective configuration (`sshd -T`).
    pub sshd: PathBuf,
    /// A read-only HTTP endpoint answering 200 (ready) or 503 with the
    /// readiness document. Off unless set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthConfig>,
}

impl Default for ReadinessConfig {
    fn default() -> Self {
        ReadinessConfig {
            ssh_unit: None,
            ssh_port: None,
            ssh_user: None,
            sshd: PathBuf::from("/usr/sbin/sshd"),
            health: None,
        }
    }
}

/// `[readiness.health]`: where the health endpoint listens, who may ask,
/// and how much of the daemon a remote client may hold.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// Address and port, e.g. "0.0.0.0:9123" or "[::]:9123".
    pub listen: std::net::SocketAddr,
    /// Sources admitted to the endpoint's port (its own rule,
    /// `portcullis-health`); empty means any.
    #[serde(default)]
    pub sources: Vec<String>,
    /// Open connections at once; more are closed at once.
    #[serde(default = "default_health_connections")]
    pub max_connections: usize,
    /// Open connections from one source address at once.
    #[serde(default = "default_health_per_source")]
    pub max_connections_per_source: usize,
    /// A client that has not sent its whole request head by then is
    /// disconnected (slowloris); a connection lasts at most twice this.
    #[serde(default = "default_health_header_timeout")]
    pub header_timeout_secs: u64,
}

fn default_health_connections() -> usize {
    64
}

fn default_health_per_source() -> usize {
    4
}

fn default_health_header_timeout() -> u64 {
    5
}

impl HealthConfig {
    fn validate(&self) -> anyhow::Result<()> {
        crate::rules::parse_cidrs(&self.sources)
            .map_err(|e| anyhow::anyhow!("readiness: health: sources: {e}"))?;
        if self.listen.port() == 0 {
            bail!("readiness: health: listen: {} needs a port", self.listen);
        }
        for (key, value) in [
            ("max_connections", self.max_connections),
            (
                "max_connections_per_source",
                self.max_connections_per_source,
            ),
        ] {
            if !(1..=4096).contains(&value) {
                bail!("readiness: health: {key}: {value} is out of range (1 to 4096)");
            }
        }
        if !(1..=300).contains(&self.header_timeout_secs) {
            bail!(
                "readiness: health: header_timeout_secs: {} is out of range (1 to 300)",
                self.header_timeout_secs
            );
        }
        Ok(())
    }
}

impl Config {
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let mut config: Config = toml::from_str(text)?;
        config.resolve_ssh_port_alias()?;
        config.validate()?;
        Ok(config)
    }

    /// `readiness.ssh_port` (deprecated) names the SSH port when `[ssh] ports`
    /// does not; when both are set they must agree.
    fn resolve_ssh_port_alias(&mut self) -> anyhow::Result<()> {
        let Some(port) = self.readiness.ssh_port else {
            return Ok(());
        };
        if port == 0 {
            bail!("readiness: ssh_port: 0 is not a port");
        }
        if self.ssh.ports == [crate::rules::DEFAULT_SSH_PORT] {
            self.ssh.ports = vec![port];
        } else if !self.ssh.ports.contains(&port) {
            bail!(
                "readiness: ssh_port: {port} is not in [ssh] ports {:?}; ssh_port is deprecated, set [ssh] ports only",
                self.ssh.ports
            );
        }
        tracing::warn!(
            port,
            "readiness.ssh_port is deprecated; use [ssh] ports = [{port}]"
        );
        Ok(())
    }

    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config {}", path.display()))?;
        let mut config =
            Self::parse(&text).with_context(|| format!("invalid config {}", path.display()))?;
        let saved = config.rules_file_path(path);
        config.saved = read_saved_rules(&saved)?;
        if config.saved.is_some() && config.has_own_rules() {
            tracing::warn!(
                config = %path.display(),
                rules_file = %saved.display(),
                "the rules of the config file are replaced by the saved rules file (`portcullis rules save` wrote it); edit that file, or remove it to use the config's rules"
            );
        }
        Ok(config)
    }

    /// The saved rules file of the configuration at `config_path`.
    pub fn rules_file_path(&self, config_path: &Path) -> PathBuf {
        match &self.rules_file {
            Some(p) => p.clone(),
            None => config_path
                .parent()
                .unwrap_or(Path::new("/"))
                .join(SAVED_RULES),
        }
    }

    /// Whether this file sets any rule key itself.
    fn has_own_rules(&self) -> bool {
        !self.ingress_rules.is_empty()
            || !self.egress_rules.is_empty()
            || self.egress.is_some()
            || self.cluster.is_some()
            || self.ssh != Ssh::default()
    }

    /// The text of a saved rules file holding `rules`.
    pub fn saved_rules_text(rules: &RuleSet) -> anyhow::Result<String> {
        Ok(format!(
            "# The permanent rule set, written by `portcullis rules save`.\n\
             # While this file exists it replaces the rules of portcullis.toml;\n\
             # edit it and run `portcullis reload`, or remove it to go back to them.\n\n{}",
            toml::to_string(rules)?
        ))
    }

    fn validate(&self) -> anyhow::Result<()> {
        let selector = self.selector()?;
        for (i, name) in self.drop_log.reasons.iter().enumerate() {
            let known = portcullis_common::Reason::ALL
                .iter()
                .any(|r| !r.passes() && r.name() == name);
            if !known {
                bail!(
                    "drop_log: reasons[{i}]: {name:?} is not a drop reason (see `portcullis counters`)"
                );
            }
        }
        if self.drop_log.per_second > 1000 {
            bail!(
                "drop_log: per_second: {} is more than 1000",
                self.drop_log.per_second
            );
        }
        for name in &self.interfaces {
            if name.is_empty() || name.len() > 15 || name.contains(['/', ' ', '\0']) {
                bail!("interfaces: {name:?} is not a valid interface name");
            }
        }
        if let Some(dir) = &self.pin_dir
            && !dir.is_absolute()
        {
            bail!("pin_dir: {} must be an absolute path", dir.display());
        }
        if let Some(file) = &self.rules_file
            && !file.is_absolute()
        {
            bail!("rules_file: {} must be an absolute path", file.display());
        }
        if let Some(unit) = &self.readiness.ssh_unit
            && !unit.contains('.')
        {
            bail!("readiness: ssh_unit: {unit:?} needs its suffix, e.g. \"ssh.service\"");
        }
        if let Some(health) = &self.readiness.health {
            health.validate()?;
        }
        if let Some(cs) = &self.crowdsec {
            cs.validate().map_err(anyhow::Error::msg)?;
        }
        self.api.validate()?;
        self.egress_volume.validate()?;
        if let Some(limit) = &self.rate_limit {
            limit.check().map_err(anyhow::Error::msg)?;
        }
        if let Some(fleet) = &self.fleet {
            fleet.validate()?;
        }
        if !(256..=16 << 20).contains(&self.conntrack_entries) {
            bail!(
                "conntrack_entries: {} is out of range (256 to 16777216)",
                self.conntrack_entries
            );
        }
        for (key, value) in [
            ("deny_v4_prefixes", self.capacity.deny_v4_prefixes),
            ("deny_v6_prefixes", self.capacity.deny_v6_prefixes),
        ] {
            if !(1..=16 << 20).contains(&value) {
                bail!("capacity: {key}: {value} is out of range (1 to 16777216)");
            }
        }
        let set = self.rule_set();
        set.validate()?;
        set.check_rule_interfaces(&self.interfaces, |n| selector.may_protect(n))?;
        self.dns.validate(set.has_names())?;
        Ok(())
    }

    /// The pin directory when configured; `None` leaves the choice to the
    /// host (`host::ConfigProbes::pin_dir`).
    pub fn configured_pin_dir(&self) -> Option<&Path> {
        self.pin_dir.as_deref()
    }

    /// Rules this configuration adds to every rule set: the health
    /// endpoint's port (TCP) from its sources.
    pub fn service_rules(&self) -> Vec<FirewallRule> {
        self.readiness
            .health
            .iter()
            .map(|h| FirewallRule {
                id: format!("{}health", crate::rules::RESERVED_ID_PREFIX),
                from_port: u32::from(h.listen.port()),
                to_port: u32::from(h.listen.port()),
                ip_ranges: h.sources.clone(),
                names: Vec::new(),
                protocol: crate::rules::Protocol::Tcp,
                description: Some("readiness health endpoint ([readiness.health])".into()),
                icmp_types: Vec::new(),
                expires: None,
                rate: None,
                burst: None,
                interfaces: Vec::new(),
            })
            .collect()
    }

    /// The interface selection this file describes.
    pub fn selector(&self) -> anyhow::Result<Selector> {
        Selector::new(&self.interfaces, &self.auto_include, &self.auto_exclude)
    }

    /// The rules of this configuration as a rule set: the saved rules file
    /// when there is one, else this file's.
    pub fn rule_set(&self) -> RuleSet {
        if let Some(saved) = &self.saved {
            return saved.clone();
        }
        RuleSet {
            ingress_rules: self.ingress_rules.clone(),
            egress_rules: self.egress_rules.clone(),
            cluster: self.cluster.clone(),
            ssh: self.ssh.clone(),
            egress: self.egress,
        }
    }
}

/// The saved rules file at `path`, if there is one, validated.
fn read_saved_rules(path: &Path) -> anyhow::Result<Option<RuleSet>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    // It replaces the config's rules: whoever may write it (or replace it
    // in its directory) controls the firewall, so only root may.
    for p in [path.parent().unwrap_or(Path::new("/")), path] {
        only_root_writes(p, "it replaces the config's rules")?;
    }
    let rules: RuleSet =
        toml::from_str(&text).with_context(|| format!("invalid rules file {}", path.display()))?;
    rules
        .validate()
        .with_context(|| format!("invalid rules file {}", path.display()))?;
    Ok(Some(rules))
}

/// Refuses `path` unless it is owned by root and writable by nobody else,
/// as sshd's StrictModes does; `why` says why that matters. (Part of
/// reading a file the daemon trusts, like its own parse: no host probe.)
pub(crate) fn only_root_writes(path: &Path, why: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    if meta.uid() != 0 {
        bail!(
            "{} is owned by uid {}, not root: {why}, so only root may write it",
            path.display(),
            meta.uid()
        );
    }
    if meta.mode() & 0o022 != 0 {
        bail!(
            "{} is writable by group or others (mode {:o}): {why}, so only root may write it",
            path.display(),
            meta.mode() & 0o7777
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forwarder_listening_off_loopback_is_warned_about() {
        assert!(DnsConfig::default().warnings().is_empty());
        let open = DnsConfig {
            listen: "172.17.0.1:53".parse().unwrap(),
            ..DnsConfig::default()
        };
        let w = open.warnings();
        assert_eq!(w.len(), 1);
        assert!(
            w[0].contains("172.17.0.1:53") && w[0].contains("not a loopback"),
            "{w:?}"
        );
    }

    #[test]
    fn parses_a_minimal_config_with_defaults() {
        let c = Config::parse("").unwrap();
        assert!(c.selector().unwrap().is_auto());
        assert!(c.auto_exclude.iter().any(|p| p == "docker*"));
        assert_eq!(c.pin_dir, None);
        assert!(c.ssh.allow);
        assert!(c.ingress_rules.is_empty());
    }

    /// Issue 19: the egress policy is explicit or, without the key, what
    /// it was before the key existed (never widened by omission).
    #[test]
    fn the_egress_policy_is_explicit_or_as_before() {
        let rule = "[[egress_rules]]\nid = \"api\"\nfrom_port = 443\nto_port = 443\nip_ranges = [\"192.0.2.0/24\"]\n";
        let set = |text: &str| Config::parse(text).unwrap().rule_set();
        // Egress rules, no key: an allowlist, with a warning to set the key.
        let implicit = set(rule);
        assert!(implicit.egress_allowlist());
        let w = implicit.egress_warnings();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].contains("without an `egress` key") && w[0].contains("allowlist"),
            "{w:?}"
        );
        // No rules, no key: allow, as before; nothing to warn about.
        assert!(!set("").egress_allowlist());
        assert!(set("").egress_warnings().is_empty());
        // egress = "allow": the rules are kept, block nothing, and a warning says so.
        let allow = set(&format!("egress = \"allow\"\n{rule}"));
        assert!(!allow.egress_allowlist());
        assert_eq!(allow.egress_rules.len(), 1);
        let w = allow.egress_warnings();
        assert!(w.len() == 1 && w[0].contains("block nothing"), "{w:?}");
        let image = crate::compile::compile(&allow, &crate::compile::Limits::default()).unwrap();
        assert!(!image.egress_allowlist);
        // egress = "allowlist": an allowlist even without rules; no warning.
        let list = set("egress = \"allowlist\"\n");
        assert!(list.egress_allowlist() && list.egress_warnings().is_empty());
        let image = crate::compile::compile(&implicit, &crate::compile::Limits::default()).unwrap();
        assert!(image.egress_allowlist);
        // A bad value names the key.
        let e = format!("{:#}", Config::parse("egress = \"deny\"\n").unwrap_err());
        assert!(e.contains("egress") || e.contains("allowlist"), "{e}");
        // A replacement without the key keeps the live policy.
        let r: crate::rules::Replacement = serde_json::from_str(r#"{"egress_rules":[]}"#).unwrap();
        assert_eq!(
            r.over(&list).egress,
            Some(crate::rules::EgressMode::Allowlist)
        );
        // Saved state without the key reads back as before (allowlist with rules).
        let saved: crate::rules::RuleSet =
            serde_json::from_str(&serde_json::to_string(&implicit).unwrap()).unwrap();
        assert_eq!(saved.egress, None);
        assert!(saved.egress_allowlist());
        // The change is in the diff.
        let d = crate::core::Diff::between(&implicit, &allow);
        assert_eq!(
            d.summary(),
            vec!["egress allowlist (implicit: no `egress` key) -> allow".to_string()]
        );
    }

    /// Issue 21: a file that says nothing about SSH (or names only its
    /// sources or ports) never switches it off; only `allow = false` does.
    #[test]
    fn ssh_is_admitted_unless_turned_off_explicitly() {
        for text in [
            "",
            "interfaces = [\"eth0\"]\n",
            "[ssh]\n",
            "[ssh]\nsources = [\"10.0.0.0/8\"]\n",
            "[ssh]\nports = [2222]\n",
            "ssh = {}\n",
        ] {
            assert!(Config::parse(text).unwrap().ssh.allow, "{text:?}");
        }
        assert!(!Config::parse("[ssh]\nallow = false\n").unwrap().ssh.allow);
    }

    #[test]
    fn parses_rules_in_toml() {
        let c = Config::parse(
            r#"
interfaces = ["eth0"]
pin_dir = "/sys/fs/bpf/x"
ssh = { allow = true }
[[ingress_rules]]
id = "web"
from_port = 8080
to_port = 8080
ip_ranges = []
"#,
        )
        .unwrap();
        assert!(c.ssh.allow);
        assert_eq!(c.ingress_rules[0].id, "web");
    }

    #[test]
    fn errors_name_the_field() {
        let e = Config::parse("interfaces = [\"a/b\"]\n").unwrap_err();
        assert!(e.to_string().starts_with("interfaces:"), "{e}");
        let e = Config::parse("auto_include = [\"[\"]\n").unwrap_err();
        assert!(e.to_string().starts_with("auto_include:"), "{e}");
        let e = Config::parse("interfaces = [\"eth0\"]\nbogus = 1\n").unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
        let e = Config::parse(
            "interfaces = [\"eth0\"]\n[[ingress_rules]]\nid = \"x\"\nfrom_port = 5\nto_port = 4\n",
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("ingress_rules[0] (id \"x\"): from_port"),
            "{e}"
        );
    }

    #[test]
    fn rule_interfaces_must_be_protected_ones() {
        let rule = |on: &str| {
            format!(
                "[[ingress_rules]]\nid = \"c\"\nfrom_port = 9000\nto_port = 9000\ninterfaces = [\"{on}\"]\n"
            )
        };
        let explicit = "interfaces = [\"eth0\", \"eth1\"]\n";
        let c = Config::parse(&format!("{explicit}{}", rule("eth1"))).unwrap();
        assert_eq!(c.rule_set().rule_interfaces(), ["eth1"]);
        let e = Config::parse(&format!("{explicit}{}", rule("eth2"))).unwrap_err();
        assert!(
            e.to_string()
                .contains("ingress_rules[0] (id \"c\"): interfaces: \"eth2\" is not an interface Portcullis protects"),
            "{e}"
        );
        // Automatic mode: any name it may select; not loopback, not an
        // excluded one.
        assert!(Config::parse(&rule("eth7")).is_ok());
        for never in ["lo", "docker0"] {
            let e = Config::parse(&rule(never)).unwrap_err();
            assert!(e.to_string().contains("interfaces:"), "{never}: {e}");
        }
        // Egress rules take none; a bad name is refused.
        let e = Config::parse(
            "[[egress_rules]]\nid = \"o\"\nfrom_port = 53\nto_port = 53\ninterfaces = [\"eth0\"]\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("interfaces"), "{e}");
        let e = Config::parse(&rule("a/b")).unwrap_err();
        assert!(e.to_string().contains("is not an interface name"), "{e}");
    }

    #[test]
    fn ssh_ports_and_the_deprecated_alias() {
        let c = Config::parse("[ssh]\nallow = true\nports = [22, 2222]\n").unwrap();
        assert_eq!(c.rule_set().ssh.ports, [22, 2222]);
        let c = Config::parse("[readiness]\nssh_port = 2222\n").unwrap();
        assert_eq!(c.ssh.ports, [2222]);
        let c = Config::parse("[ssh]\nports = [22, 2222]\n[readiness]\nssh_port = 2222\n").unwrap();
        assert_eq!(c.ssh.ports, [22, 2222]);
        let e = Config::parse("[ssh]\nports = [2200]\n[readiness]\nssh_port = 2222\n").unwrap_err();
        assert!(
            format!("{e:#}").contains("ssh_port: 2222 is not in"),
            "{e:#}"
        );
        for (bad, says) in [
            ("ports = []", "at least one"),
            ("ports = [0]", "0 is not a port"),
            ("ports = [22, 22]", "22 is listed twice"),
            ("ports = [70000]", "70000"),
        ] {
            let e = Config::parse(&format!("[ssh]\n{bad}\n")).unwrap_err();
            assert!(format!("{e:#}").contains(says), "{bad}: {e:#}");
        }
    }

    #[test]
    fn a_saved_rules_file_replaces_the_files_rules() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("portcullis.toml");
        std::fs::write(
            &path,
            "[[ingress_rules]]\nid = \"web\"\nfrom_port = 80\nto_port = 80\n",
        )
        .unwrap();
        let c = Config::load(&path).unwrap();
        assert_eq!(c.rule_set().ingress_rules[0].id, "web");
        let mut saved = c.rule_set();
        saved.ingress_rules[0].id = "https".into();
        saved.ssh.allow = true;
        let file = c.rules_file_path(&path);
        assert_eq!(file, dir.path().join(SAVED_RULES));
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(&file, Config::saved_rules_text(&saved).unwrap()).unwrap();
        assert_eq!(Config::load(&path).unwrap().rule_set(), saved);
        // A bad saved file names itself.
        std::fs::write(
            &file,
            "[[ingress_rules]]\nid = \"x\"\nfrom_port = 5\nto_port = 4\n",
        )
        .unwrap();
        let e = format!("{:#}", Config::load(&path).unwrap_err());
        assert!(
            e.contains("saved/rules.toml") && e.contains("from_port"),
            "{e}"
        );
    }

    /// What a writer puts in a rule (any description, any valid id,
    /// every protocol and list) is saved by `rules save` as TOML that reads
    /// back as the same rule set: a writer cannot make the saved file
    /// inject keys or fail the next start.
    #[test]
    fn saved_rules_read_back_as_saved_whatever_the_writer_put_in_them() {
        let odd = "\0\u{1b}[31m\"'''\n[ssh]\nallow = false\r\t\u{7f}\u{feff}\u{202e}\\ é 𝄞";
        let rule = |id: &str, protocol, ranges: &[&str]| FirewallRule {
            id: id.into(),
            from_port: 1,
            to_port: 65535,
            ip_ranges: ranges.iter().map(|r| r.to_string()).collect(),
            names: Vec::new(),
            protocol,
            description: Some(odd.into()),
            icmp_types: Vec::new(),
            expires: None,
            rate: None,
            burst: None,
            interfaces: Vec::new(),
        };
        use crate::rules::Protocol::*;
        let set = RuleSet {
            ingress_rules: Vec::new(),
            egress_rules: vec![
                rule("a", Icmp, &["fd00::/8", "10.0.0.1"]),
                rule(&"x".repeat(crate::rules::MAX_ID_LEN), Any, &[]),
                rule("b.c_d-e", Udp, &["0.0.0.0/0"]),
            ],
            cluster: Some(crate::rules::Cluster {
                id: "c".into(),
                peers: vec!["10.1.0.0/16".into()],
                other_clusters: vec!["10.2.0.0/16".into()],
            }),
            ssh: Ssh {
                allow: true,
                sources: vec!["192.0.2.0/24".into()],
                ports: vec![2222, 22],
            },
            egress: Some(crate::rules::EgressMode::Allowlist),
        };
        set.validate().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("portcullis.toml");
        std::fs::write(&path, "").unwrap();
        let file = Config::load(&path).unwrap().rules_file_path(&path);
        let text = Config::saved_rules_text(&set).unwrap();
        crate::state::write_new_file(&file, text.as_bytes(), 0o600).unwrap();
        assert_eq!(Config::load(&path).unwrap().rule_set(), set, "{text}");
    }

    #[test]
    fn fleet_settings_are_checked_and_errors_name_the_key() {
        let base = "[fleet]\nendpoints = [\"https://10.0.0.1:2379\"]\nca_file = \"/c.pem\"\n\
                    cluster_id = \"gpu-a\"\nallowed_ranges = [\"10.1.0.0/16\"]\n";
        let c = Config::parse(base).unwrap();
        let f = c.fleet.unwrap();
        assert_eq!((f.prefix.as_str(), f.lease_ttl_secs), ("/portcullis", 10));
        let err = |extra: &str, from: &str, to: &str| {
            let text = format!("{}{extra}", base.replace(from, to));
            format!("{:#}", Config::parse(&text).unwrap_err())
        };
        assert!(err("", "https://", "http://").contains("endpoints[0]"));
        assert!(err("", "[\"10.1.0.0/16\"]", "[]").contains("allowed_ranges: empty"));
        assert!(err("addresses = [\"10.9.0.1\"]\n", "", "").contains("addresses[0]"));
        assert!(err("addresses = [\"10.1.0.0/24\"]\n", "", "").contains("is a range"));
        assert!(err("username = \"u\"\n", "", "").contains("password_file"));
        assert!(err("", "gpu-a", "a/b").contains("cluster_id"));
        assert!(err("", "/c.pem", "c.pem").contains("ca_file"));
        assert!(err("lease_ttl_secs = 1\n", "", "").contains("lease_ttl_secs"));
    }

    #[test]
    fn the_default_fallback_fails_closed() {
        assert_eq!(Config::parse("").unwrap().fallback, Fallback::Nftables);
    }

    #[test]
    fn the_example_config_is_valid() {
        let text = include_str!("../../systemd/portcullis.toml");
        Config::parse(text).unwrap();
    }

    /// Every section and key, optional ones set: a struct literal, so a new
    /// field does not compile until it is added here (and then to the
    /// example, which the next test checks).
    fn every_crowdsec_key() -> crate::crowdsec::CrowdSecConfig {
        crate::crowdsec::CrowdSecConfig {
            url: "http://127.0.0.1:8080".into(),
            api_key_file: "/etc/portcullis/crowdsec.key".into(),
            poll_interval: "10s".into(),
            set: "crowdsec".into(),
            shortest_v4: 16,
            shortest_v6: 32,
            ca_file: Some("/etc/crowdsec/ssl/ca.pem".into()),
            insecure_plain_http: false,
        }
    }

    fn every_fleet_key() -> FleetConfig {
        FleetConfig {
            endpoints: vec!["https://10.0.0.1:2379".into()],
            ca_file: "/c".into(),
            cert_file: Some("/c".into()),
            key_file: Some("/k".into()),
            username: Some("u".into()),
            password_file: Some("/p".into()),
            prefix: "/portcullis".into(),
            cluster_id: "c".into(),
            allowed_ranges: vec!["10.0.0.0/8".into()],
            name: Some("n".into()),
            addresses: vec!["10.0.0.2".into()],
            lease_ttl_secs: 10,
        }
    }

    fn every_key() -> Config {
        let rule = FirewallRule {
            id: "r".into(),
            from_port: 1,
            to_port: 1,
            ip_ranges: vec![],
            names: Vec::new(),
            protocol: crate::rules::Protocol::Tcp,
            description: Some("d".into()),
            icmp_types: Vec::new(),
            expires: None,
            rate: None,
            burst: None,
            interfaces: Vec::new(),
        };
        Config {
            interfaces: vec![],
            auto_include: vec![],
            auto_exclude: vec![],
            state_dir: Some("/s".into()),
            pin_dir: Some("/p".into()),
            ssh: Ssh {
                allow: true,
                sources: vec![],
                ports: vec![22, 2222],
            },
            readiness: ReadinessConfig {
                ssh_unit: Some("ssh.service".into()),
                ssh_port: Some(22),
                ssh_user: Some("u".into()),
                sshd: "/usr/sbin/sshd".into(),
                health: Some(HealthConfig {
                    listen: "0.0.0.0:9123".parse().unwrap(),
                    sources: vec![],
                    max_connections: 1,
                    max_connections_per_source: 1,
                    header_timeout_secs: 1,
                }),
            },
            cluster: Some(Cluster {
                id: "c".into(),
                peers: vec![],
                other_clusters: vec![],
            }),
            drop_log: DropLogConfig {
                reasons: vec!["drop_egress".into()],
                per_second: 5,
            },
            api: ApiConfig {
                socket: Some("/a".into()),
                group: Some("g".into()),
                reader_group: Some("r".into()),
                ..ApiConfig::default()
            },
            capacity: Capacity::default(),
            dns: DnsConfig::default(),
            egress_volume: EgressVolume::default(),
            allow_ping: false,
            conntrack_entries: 256,
            rate_limit: Some(crate::model::RateLimit {
                rate: 10,
                burst: Some(20),
                ipv6_prefix: 64,
                ban_seconds: Some(60),
            }),
            tc_attach: TcAttachMode::Auto,
            xdp_program: XdpProgram::Auto,
            fallback: Fallback::Nftables,
            ingress_rules: vec![rule.clone()],
            egress_rules: vec![rule],
            egress: Some(crate::rules::EgressMode::Allowlist),
            rules_file: Some("/etc/portcullis/saved/rules.toml".into()),
            saved: None,
            crowdsec: Some(every_crowdsec_key()),
            fleet: Some(every_fleet_key()),
        }
    }

    /// `(section, key)` for every key the annotated example names, set or
    /// commented out (`# key = ...` under a `[section]` or `# [section]`).
    fn documented_keys(text: &str) -> std::collections::BTreeSet<(String, String)> {
        let ident = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '.')
        };
        let mut section = String::new();
        let mut keys = std::collections::BTreeSet::new();
        for line in text.lines() {
            let line = line.trim_start_matches('#').trim();
            let header = line.trim_start_matches('[').trim_end_matches(']');
            if line.starts_with('[') && line.ends_with(']') && ident(header) {
                section = header.to_string();
                keys.insert((String::new(), section.clone()));
            } else if let Some((key, _)) = line.split_once('=')
                && ident(key.trim())
            {
                keys.insert((section.clone(), key.trim().to_string()));
            }
        }
        keys
    }

    /// `(section, key)` for every key of `value`, tables within tables
    /// (and arrays of tables) as dotted sections.
    fn known_keys(
        section: &str,
        value: &toml::Value,
        out: &mut std::collections::BTreeSet<(String, String)>,
    ) {
        let table = match value {
            toml::Value::Table(t) => t,
            toml::Value::Array(a) => {
                for v in a {
                    known_keys(section, v, out);
                }
                return;
            }
            _ => return,
        };
        for (key, v) in table {
            let nested = match v {
                toml::Value::Table(_) => true,
                toml::Value::Array(a) => a.iter().all(toml::Value::is_table) && !a.is_empty(),
                _ => false,
            };
            if nested {
                let inner = if section.is_empty() {
                    key.clone()
                } else {
                    format!("{section}.{key}")
                };
                out.insert((String::new(), inner.clone()));
                known_keys(&inner, v, out);
            } else {
                out.insert((section.to_string(), key.clone()));
            }
        }
    }

    /// Issue 21: the annotated example documents every section and key this
    /// module accepts, so the two cannot drift apart.
    #[test]
    fn the_example_config_documents_every_key() {
        let text = include_str!("../../systemd/portcullis.toml");
        let documented = documented_keys(text);
        let mut known = std::collections::BTreeSet::new();
        known_keys("", &toml::Value::try_from(every_key()).unwrap(), &mut known);
        let missing: Vec<String> = known
            .difference(&documented)
            .map(|(section, key)| match section.as_str() {
                "" => key.clone(),
                s => format!("[{s}] {key}"),
            })
            .collect();
        assert!(
            missing.is_empty(),
            "systemd/portcullis.toml does not document: {}",
            missing.join(", ")
        );
        // And the checker itself sees what it must: a key and a section.
        assert!(documented.contains(&("api".into(), "group".into())));
        assert!(documented.contains(&(String::new(), "readiness.health".into())));
    }
}
