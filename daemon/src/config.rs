//! The daemon's configuration file (`/etc/portcullis/portcullis.toml`).
//!
//! The file is the baseline: the interfaces to protect, where pins live, the
//! SSH exemption and the rules. Validation happens here, before anything
//! touches the kernel, so a bad file changes nothing.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

use crate::{
    compile::Limits,
    rules::{Cluster, FirewallRule, RuleSet, Ssh},
};

pub const DEFAULT_CONFIG_PATH: &str = "/etc/portcullis/portcullis.toml";
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/portcullis";

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
    /// bpffs directory holding the pinned maps and links.
    #[serde(default = "default_pin_dir")]
    pub pin_dir: PathBuf,
    #[serde(default)]
    pub ssh: Ssh,
    /// The cluster this host belongs to: its peers reach it on every port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<Cluster>,
    /// The control API.
    #[serde(default)]
    pub api: ApiConfig,
    /// Map capacities: how large a rule set the data path can hold.
    #[serde(default)]
    pub capacity: Capacity,
    /// Admit inbound ICMP/ICMPv6 echo requests (pings). Replies to this
    /// host's own pings are always admitted.
    #[serde(default)]
    pub allow_ping: bool,
    /// Size of the connection table (flows this host opened). When full, the
    /// least recently used flow is evicted.
    #[serde(default = "default_conntrack_entries")]
    pub conntrack_entries: u32,
    /// How the egress program attaches: `auto` (TCX on kernels that have it,
    /// 6.6 and later; a clsact qdisc filter otherwise), `tcx` or `clsact`.
    #[serde(default)]
    pub tc_attach: TcAttachMode,
    /// Brev-format rules, at the top level as the SDK writes them.
    #[serde(default)]
    pub ingress_rules: Vec<FirewallRule>,
    #[serde(default)]
    pub egress_rules: Vec<FirewallRule>,
}

/// The control socket and who may change rules through it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Socket path (default /run/portcullis/portcullis.sock).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
    /// Members of this group may change rules (root always may); the socket
    /// is owned by it, mode 0660. Without it, only root can connect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// A request (a slow client's included) that takes longer is answered
    /// 408 and closed.
    #[serde(default = "default_request_timeout")]
    pub request_timeout_secs: u64,
}

fn default_request_timeout() -> u64 {
    30
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            socket: None,
            group: None,
            request_timeout_secs: default_request_timeout(),
        }
    }
}

impl ApiConfig {
    /// The writers' group id, checked to exist.
    pub fn writers_gid(&self) -> anyhow::Result<Option<u32>> {
        let Some(name) = &self.group else {
            return Ok(None);
        };
        match nix::unistd::Group::from_name(name)? {
            Some(g) => Ok(Some(g.gid.as_raw())),
            None => bail!("api: group: no group named {name:?} on this host"),
        }
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

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TcAttachMode {
    #[default]
    Auto,
    Tcx,
    Clsact,
}

fn default_exclude() -> Vec<String> {
    crate::links::DEFAULT_EXCLUDE
        .iter()
        .map(|s| s.to_string())
        .collect()
}

fn default_conntrack_entries() -> u32 {
    portcullis_common::CONNTRACK_DEFAULT_ENTRIES
}

fn default_pin_dir() -> PathBuf {
    PathBuf::from(DEFAULT_PIN_DIR)
}

impl Config {
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let config: Config = toml::from_str(text)?;
        config.validate()?;
        Ok(config)
    }

    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("invalid config {}", path.display()))
    }

    fn validate(&self) -> anyhow::Result<()> {
        self.selector()?;
        for name in &self.interfaces {
            if name.is_empty() || name.len() > 15 || name.contains(['/', ' ', '\0']) {
                bail!("interfaces: {name:?} is not a valid interface name");
            }
        }
        if !self.pin_dir.is_absolute() {
            bail!(
                "pin_dir: {} must be an absolute path",
                self.pin_dir.display()
            );
        }
        if !(256..=16 << 20).contains(&self.conntrack_entries) {
            bail!(
                "conntrack_entries: {} is out of range (256 to 16777216)",
                self.conntrack_entries
            );
        }
        self.rule_set().validate()?;
        Ok(())
    }

    /// The interface selection this file describes.
    pub fn selector(&self) -> anyhow::Result<crate::links::Selector> {
        crate::links::Selector::new(&self.interfaces, &self.auto_include, &self.auto_exclude)
    }

    /// The rules of this file as a rule set.
    pub fn rule_set(&self) -> RuleSet {
        RuleSet {
            ingress_rules: self.ingress_rules.clone(),
            egress_rules: self.egress_rules.clone(),
            cluster: self.cluster.clone(),
            ssh: self.ssh.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_minimal_config_with_defaults() {
        let c = Config::parse("").unwrap();
        assert!(c.selector().unwrap().is_auto());
        assert!(c.auto_exclude.iter().any(|p| p == "docker*"));
        assert_eq!(c.pin_dir, PathBuf::from(DEFAULT_PIN_DIR));
        assert!(!c.ssh.allow);
        assert!(c.ingress_rules.is_empty());
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
    fn the_example_config_is_valid() {
        let text = include_str!("../../systemd/portcullis.toml");
        Config::parse(text).unwrap();
    }
}
