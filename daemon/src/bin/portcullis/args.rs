//! The command line: every command, flag and argument, with its help.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use portcullis::{api::DEFAULT_SOCKET, config::DEFAULT_PIN_DIR, rules::Protocol};

#[derive(Parser)]
#[command(
    version,
    about = "Inspect and control the Portcullis host firewall",
    after_help = "Everyday tasks:\n  portcullis status                  is the host protected?\n  portcullis allow 8080/tcp          open a port (to everyone; --from CIDR to narrow)\n  portcullis rules list              the rules, numbered, with hits\n  portcullis rules remove 1          remove rule 1 (or by id)\n  portcullis watch                   follow drops live\n  portcullis mode lockdown --admin CIDR / portcullis mode enforce\n\nExit status: 0 success; 1 error; 2 usage error; 3 `status`: the host is not\nprotected; 4 `status`: the daemon is not running."
)]
pub struct Cli {
    /// The daemon's API socket.
    #[arg(long, global = true, default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Print the daemon's JSON documents (and errors as JSON) for scripts.
    #[arg(long, global = true)]
    pub json: bool,
    /// Change flags given before the command (kept for scripts; they belong
    /// after a command that changes something).
    #[command(flatten)]
    pub early: EarlyChange,
    #[command(subcommand)]
    pub command: Command,
}

/// `portcullis --dry-run rules ...`: the change flags before the command,
/// as older scripts write them. Hidden: the help shows them on the
/// commands they apply to.
#[derive(Args, Default)]
pub struct EarlyChange {
    #[arg(long = "dry-run", hide = true)]
    pub dry_run: bool,
    #[arg(long = "force", hide = true)]
    pub force: bool,
    #[arg(long = "confirm-within", value_name = "SECS", hide = true)]
    pub confirm_within: Option<u64>,
}

impl EarlyChange {
    pub fn given(&self) -> bool {
        self.dry_run || self.force || self.confirm_within.is_some()
    }
}

/// The flags of every command that changes something.
#[derive(Args, Clone, Default)]
pub struct Change {
    /// Only say what would change and which open connections it would cut.
    #[arg(long)]
    pub dry_run: bool,
    /// Apply even if it cuts your own SSH session.
    #[arg(long)]
    pub force: bool,
    /// Roll the change back unless `portcullis confirm` runs within SECS.
    #[arg(long, value_name = "SECS")]
    pub confirm_within: Option<u64>,
}

/// Change flags of rule and peer changes: also compare-and-swap.
#[derive(Args, Clone, Default)]
pub struct RuleChange {
    #[command(flatten)]
    pub change: Change,
    /// Refuse unless generation N is still live (see `rules list`), so two
    /// people editing at once cannot undo each other's change.
    #[arg(long, value_name = "N")]
    pub expect_generation: Option<u64>,
}

/// `portcullis deny ...`.
#[derive(Subcommand)]
pub enum DenyCmd {
    /// Ban prefixes: `deny add SET 192.0.2.7 2001:db8:1:2::/64 --expires 1h`.
    /// An IPv6 address bans that address only; give its /64 to ban the host's
    /// subnet. The banned sources' open connections are cut.
    Add {
        /// The set (created if missing): letters, digits, '_', '-', '.'.
        set: String,
        /// ADDRESS or ADDRESS/LEN, one or more.
        #[arg(required = true, value_name = "CIDR")]
        prefixes: Vec<String>,
        /// Lift the ban after this long: 90s, 15m, 2h, 7d.
        #[arg(long, value_name = "DURATION")]
        expires: Option<String>,
    },
    /// Lift bans: `deny remove SET CIDR...`.
    Remove {
        /// The set.
        set: String,
        /// The prefixes, as they were added.
        #[arg(required = true, value_name = "CIDR")]
        prefixes: Vec<String>,
    },
    /// The sets (counted), or one set's entries.
    List {
        /// One set; without it, every set with its size and drops.
        set: Option<String>,
        /// Only the number of entries and the drops.
        #[arg(long)]
        count: bool,
    },
    /// Remove every entry of a set.
    Flush {
        /// The set.
        set: String,
    },
    /// Make a set hold exactly the prefixes of FILE (one a line, `#` and `;`
    /// comments, e.g. Spamhaus DROP). A bad line rejects the whole file,
    /// naming the line, and changes nothing.
    Load {
        /// The set (replaced, or with --add merged).
        set: String,
        /// The file.
        file: PathBuf,
        /// Add to the set instead of replacing it.
        #[arg(long)]
        add: bool,
        /// Lift these bans after this long: 90s, 15m, 2h, 7d.
        #[arg(long, value_name = "DURATION")]
        expires: Option<String>,
    },
    /// `deny PORT`: port deny rules do not exist (see the message).
    #[command(external_subcommand)]
    Other(Vec<String>),
}

#[derive(Subcommand)]
pub enum Command {
    /// Whether the host is protected, on which interfaces, what it dropped;
    /// the pending confirmation and the last rollback. Without the daemon,
    /// what the pins still enforce.
    ///
    /// Exit status: 0 protected; 3 not protected (an interface missing, or
    /// the audit or open mode); 4 the daemon is not running. With --json the
    /// daemon's document is printed and the exit status is 0 whenever the
    /// daemon answered (read `enforcing` and `mode`).
    Status {
        /// Where the daemon pins its programs (read when it is not running).
        #[arg(long, value_name = "DIR", default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// Open a port, as ufw does: `allow 8080/tcp`, `allow 8000:8100/udp`,
    /// `allow 22` (TCP). Adds an ingress rule with a generated id.
    Allow(AllowArgs),
    /// Deny sets: ban sources (IPv4/IPv6 prefixes) from opening anything,
    /// whatever the rules admit, SSH included unless from an admin network
    /// (`[ssh] sources`, a lockdown's --admin).
    #[command(subcommand)]
    Deny(DenyCmd),
    /// The rule set: list, add, remove, apply a file.
    #[command(subcommand)]
    Rules(RulesCmd),
    /// Cluster peers: admitted on every port and protocol.
    #[command(subcommand)]
    Peers(PeersCmd),
    /// Packets and bytes by verdict reason and by rule.
    Counters {
        /// Read the pinned counters directly (works without the daemon).
        #[arg(long, value_name = "DIR")]
        pin_dir: Option<PathBuf>,
    },
    /// Metrics in the Prometheus text format.
    Metrics,
    /// Keep the change applied with --confirm-within.
    Confirm,
    /// Re-read the configuration file and apply it (what `systemctl reload`
    /// runs): says what changed and which settings need a restart. Refused
    /// when it would drop runtime changes (`rules save` keeps them), or
    /// turn SSH off for an open SSH session (`--force` applies it anyway).
    Reload {
        /// Drop the runtime changes the configuration would undo.
        #[arg(long)]
        discard_runtime: bool,
        #[command(flatten)]
        change: Change,
    },
    /// Follow drops live (sampled), one line each, with local times.
    Watch(WatchArgs),
    /// What the live data path decides for a packet, and why:
    /// `explain in tcp 10.0.0.2:40000 -> 10.0.0.1:22`. The loaded programs
    /// decide (run on a crafted frame, in an instance that cannot write):
    /// nothing changes, no counter, flow or event. With --rules FILE, also
    /// what that rule set would decide, and whether it differs.
    ///
    /// How: the daemon builds the frame (Ethernet, IPv4 or IPv6, a TCP SYN
    /// unless --tcp-flags says otherwise, UDP, or an ICMP echo request
    /// unless --icmp-type says otherwise) and runs it with BPF_PROG_TEST_RUN
    /// through a second instance of the same eBPF programs (XDP for `in`,
    /// TC for `out`), loaded on the first explain with the read-only global
    /// EXPLAIN set, which compiles out every write (counters, connection
    /// tables, fragments, DHCP times, events) and reports the reason, the
    /// rule, peer or SSH exemption credited and the deny set instead. It
    /// reads the live maps: the rules, the connection tables, the deny sets.
    /// With --rules, the proposed set is compiled into scratch rule maps of
    /// a third instance (never pinned, never live). Readers may explain.
    /// Exit status 0 whatever the verdict (read `passes` with --json).
    Explain(ExplainArgs),
    /// SSH keys.
    #[command(subcommand)]
    Ssh(SshCmd),
    /// Emergency: drop everything new except SSH from --admin, and cut open
    /// flows not with it (short for `mode lockdown`). `portcullis enforce`
    /// ends it.
    Lockdown(LockdownArgs),
    /// Emergency: suspend enforcement (short for `mode open`).
    Open(Change),
    /// Back to normal enforcement (short for `mode enforce`).
    Enforce(Change),
    /// What the data path does with what the rules do not admit.
    #[command(subcommand)]
    Mode(ModeCmd),
    /// The egress policy: `allow` (egress rules are kept and reported but
    /// block nothing) or `allowlist` (only what they admit may leave,
    /// besides replies and flows this host opened). A rule change: writers
    /// only, audited.
    Egress {
        /// `allow` or `allowlist`.
        #[arg(value_parser = ["allow", "allowlist"])]
        policy: String,
        #[command(flatten)]
        change: RuleChange,
    },
    /// The audit log of every change and refusal.
    #[command(subcommand)]
    AuditLog(AuditCmd),
    /// `audit verify` (older name of `audit-log verify`); a bare `audit`
    /// prints help and changes nothing.
    #[command(subcommand, hide = true)]
    Audit(AuditCmd),
    /// Write shell completions (bash, zsh) and man pages into DIR (used by
    /// `cargo xtask deb`).
    #[command(hide = true)]
    GenerateDocs {
        /// Where to write them.
        dir: PathBuf,
    },
    /// Wait until the host is SSH-ready (enforcing, SSH unit active and
    /// listening, admitted by the rules, key authentication on). Exits 0 when
    /// it is; on timeout exits 1 and lists the checks that fail.
    WaitReady {
        /// Give up after SECS.
        #[arg(long, value_name = "SECS", default_value_t = 300)]
        timeout: u64,
    },
}

#[derive(Args)]
pub struct AllowArgs {
    /// PORT, FROM:TO or FROM-TO, with /tcp, /udp or /tcp+udp (TCP when
    /// omitted).
    pub spec: String,
    /// Admit only this source network (repeatable; any source when omitted).
    #[arg(long, value_name = "CIDR")]
    pub from: Vec<String>,
    /// A note shown in `rules list`.
    #[arg(long)]
    pub description: Option<String>,
    /// The rule's id (default: generated from the protocol and port, like tcp-8080).
    #[arg(long)]
    pub id: Option<String>,
    /// Admit on this interface only (repeatable; every interface when
    /// omitted), e.g. a cluster NIC.
    #[arg(long = "interface", value_name = "IFACE")]
    pub interfaces: Vec<String>,
    #[command(flatten)]
    pub expiry: Expiry,
    #[command(flatten)]
    pub change: RuleChange,
}

/// When a rule ends: the daemon removes it then (audited) and cuts the
/// flows only it admitted.
#[derive(Args, Clone, Debug, Default)]
pub struct Expiry {
    /// Remove the rule after this long: 90s, 10m, 2h, 7d.
    #[arg(long = "for", value_name = "DURATION", conflicts_with = "expires")]
    pub for_: Option<String>,
    /// Remove the rule at this UTC time: 2026-12-01T10:00:00Z.
    #[arg(long, value_name = "TIME")]
    pub expires: Option<String>,
}

impl Expiry {
    /// The rule's `expires` field: `--for` made absolute, or `--expires`.
    pub fn field(&self) -> anyhow::Result<Option<String>> {
        if let Some(d) = &self.for_ {
            let secs = portcullis::denylist::parse_duration(d)
                .map_err(|e| anyhow::anyhow!("--for: {e}"))?;
            let now = crate::output::unix_now();
            return Ok(Some(portcullis::rules::format_expiry(now + secs)));
        }
        if let Some(t) = &self.expires {
            portcullis::rules::parse_expiry(t).map_err(|e| anyhow::anyhow!("--expires: {e}"))?;
        }
        Ok(self.expires.clone())
    }
}

#[derive(Args)]
pub struct WatchArgs {
    /// Only drops to or from this port.
    #[arg(long)]
    pub port: Option<u16>,
    /// Only drops with this reason (e.g. drop_no_rule).
    #[arg(long)]
    pub reason: Option<String>,
    /// Only drops whose source is in this network.
    #[arg(long, value_name = "CIDR")]
    pub source: Option<String>,
    /// Only drops on this interface.
    #[arg(long, value_name = "NAME")]
    pub interface: Option<String>,
}

#[derive(Args)]
pub struct ExplainArgs {
    /// `in` (arriving) or `out` (leaving).
    pub direction: String,
    /// `tcp`, `udp` or `icmp`.
    pub protocol: String,
    /// ADDRESS:PORT or [IPv6]:PORT (ICMP: an address; a source port left
    /// out is 40000).
    pub source: String,
    /// `->`, literally.
    #[arg(allow_hyphen_values = true, value_name = "ARROW")]
    pub arrow: String,
    /// ADDRESS:PORT or [IPv6]:PORT (ICMP: an address).
    pub destination: String,
    /// The interface it arrives on or leaves by (refused unless protected;
    /// the decision is the same on every protected interface).
    #[arg(long, value_name = "NAME")]
    pub interface: Option<String>,
    /// ICMP type (default: echo request, 8 or 128).
    #[arg(long, value_name = "TYPE")]
    pub icmp_type: Option<u8>,
    /// TCP flags: syn (default: a new connection), ack, syn-ack, fin, rst.
    #[arg(long, value_name = "FLAGS")]
    pub tcp_flags: Option<String>,
    /// Also what this rule set (JSON, or TOML by its .toml name, as
    /// `rules apply` reads it) would decide; it is compiled into scratch
    /// maps and never goes live.
    #[arg(long, value_name = "FILE")]
    pub rules: Option<PathBuf>,
}

#[derive(Subcommand)]
pub enum SshCmd {
    /// Add public keys to a user's authorized_keys (run as root): validated,
    /// merged without duplicates, existing keys kept, written atomically with
    /// safe ownership and modes.
    AddKey {
        /// The user whose authorized_keys receives the keys.
        #[arg(long)]
        user: String,
        /// Keys ("ssh-ed25519 AAAA... comment"); or use --file.
        keys: Vec<String>,
        /// Read keys from this file, one per line.
        #[arg(long)]
        file: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
pub enum ModeCmd {
    /// Drop what the rules do not admit (the normal mode).
    Enforce(Change),
    /// Pass what would be dropped, counting it by reason (to roll out rules).
    Audit(Change),
    /// Emergency: suspend enforcement (everything passes, still counted).
    Open(Change),
    /// Emergency: nothing new but SSH from --admin, both ways narrower.
    Lockdown(LockdownArgs),
}

#[derive(Args)]
pub struct LockdownArgs {
    /// Admin source network admitted to SSH (e.g. 203.0.113.0/24).
    #[arg(long, value_name = "CIDR", required_unless_present = "no_admin")]
    pub admin: Option<String>,
    /// Admit no one, SSH included (until `portcullis enforce` or a reboot).
    #[arg(long, conflicts_with = "admin")]
    pub no_admin: bool,
    #[command(flatten)]
    pub change: Change,
}

#[derive(Subcommand)]
pub enum AuditCmd {
    /// The latest records: when, who, what, outcome. Reads the files directly.
    Show {
        /// The daemon's state directory.
        #[arg(long, default_value = portcullis::state::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// How many records, newest last.
        #[arg(long, short = 'n', default_value_t = 20)]
        lines: usize,
    },
    /// Check the log's hash chain against its recorded head: reports edited,
    /// removed, reordered and truncated records. Reads the files directly.
    Verify {
        /// The daemon's state directory.
        #[arg(long, default_value = portcullis::state::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// Check against this head hash instead of the state directory's.
        #[arg(long)]
        head: Option<String>,
    },
}

#[derive(Subcommand)]
pub enum RulesCmd {
    /// The rules as a numbered table: direction, protocol, ports, sources,
    /// hits, description.
    #[command(visible_aliases = ["ls", "show", "get"])]
    List,
    /// Replace the whole rule set with FILE (JSON, or TOML when it ends in
    /// .toml). Without an `ssh` key the SSH exemption stays as it is.
    Apply {
        /// The rule set file.
        file: PathBuf,
        #[command(flatten)]
        change: RuleChange,
    },
    /// Add one rule (see also `portcullis allow`).
    Add {
        /// A unique name: letters, digits, '-', '_', '.', ':', '@'.
        #[arg(long)]
        id: String,
        /// First port of the range (1-65535).
        #[arg(long)]
        from_port: u32,
        /// Last port of the range (the same as --from-port for one port).
        #[arg(long)]
        to_port: u32,
        /// Source CIDR (repeatable; none means any source).
        #[arg(long = "ip-range", value_name = "CIDR")]
        ip_ranges: Vec<String>,
        /// With --egress: a host name this rule admits as the daemon's DNS
        /// forwarder resolves it, `api.example.com` or `*.example.org` (any
        /// name under it, not itself); repeatable. Without --ip-range it
        /// admits only those names' addresses.
        #[arg(long = "name", value_name = "NAME")]
        names: Vec<String>,
        /// Which protocols the rule covers.
        #[arg(long, value_enum, default_value = "tcp-udp")]
        protocol: ProtocolArg,
        /// A note shown in `rules list`.
        #[arg(long)]
        description: Option<String>,
        /// With --protocol icmp: admit only this ICMP type (repeatable):
        /// echo-request, destination-unreachable/4, icmp:13, icmpv6:128.
        #[arg(long = "icmp-type", value_name = "TYPE")]
        icmp_types: Vec<String>,
        /// New flows per second each source may open through this rule
        /// (ingress; instead of `[rate_limit]`'s default).
        #[arg(long)]
        rate: Option<u32>,
        /// With --rate: new flows a source may open at once (default: the rate).
        #[arg(long, requires = "rate")]
        burst: Option<u32>,
        /// Apply on this interface only (repeatable; every interface when
        /// omitted), e.g. a cluster NIC. Ingress rules only.
        #[arg(long = "interface", value_name = "IFACE")]
        interfaces: Vec<String>,
        /// Add to the egress list instead (destinations in --ip-range).
        #[arg(long)]
        egress: bool,
        #[command(flatten)]
        expiry: Expiry,
        #[command(flatten)]
        change: RuleChange,
    },
    /// Make the live rule set permanent: write it to the saved rules file
    /// the configuration reads, so a reload or reboot keeps it.
    Save,
    /// Remove a rule by its number in `rules list` or by its id.
    #[command(visible_alias = "delete")]
    Remove {
        /// The rule's number (`rules list`) or id.
        rule: String,
        #[command(flatten)]
        change: RuleChange,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum ProtocolArg {
    TcpUdp,
    Tcp,
    Udp,
    Icmp,
    Any,
}

impl From<ProtocolArg> for Protocol {
    fn from(p: ProtocolArg) -> Self {
        match p {
            ProtocolArg::TcpUdp => Protocol::TcpUdp,
            ProtocolArg::Tcp => Protocol::Tcp,
            ProtocolArg::Udp => Protocol::Udp,
            ProtocolArg::Icmp => Protocol::Icmp,
            ProtocolArg::Any => Protocol::Any,
        }
    }
}

#[derive(Subcommand)]
pub enum PeersCmd {
    /// The cluster id and its peers.
    #[command(visible_alias = "ls")]
    List,
    /// Add peers (CIDRs) to the cluster.
    Add {
        /// Peer networks, e.g. 10.1.0.0/16.
        #[arg(required = true, value_name = "CIDR")]
        cidrs: Vec<String>,
        /// The cluster id, when the host has no cluster yet.
        #[arg(long)]
        cluster: Option<String>,
        #[command(flatten)]
        change: RuleChange,
    },
    /// Remove peers from the cluster.
    Remove {
        /// Peer networks to remove, as listed.
        #[arg(required = true, value_name = "CIDR")]
        cidrs: Vec<String>,
        #[command(flatten)]
        change: RuleChange,
    },
    /// Replace the cluster's peers with these.
    Replace {
        /// The whole new list of peer networks.
        #[arg(value_name = "CIDR")]
        cidrs: Vec<String>,
        /// The cluster id, when the host has no cluster yet.
        #[arg(long)]
        cluster: Option<String>,
        #[command(flatten)]
        change: RuleChange,
    },
}
