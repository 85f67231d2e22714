//! The daemon's shared model: plain types that the core, the state store,
//! the configuration and the data plane all speak, so none of them has to
//! import another to name them (issue 16: the layers only point down).
//! Nothing here touches the kernel or the host.

use std::net::IpAddr;

use glob::Pattern;
use serde::{Deserialize, Serialize};

use crate::rules::RuleSet;

/// A change applied with a confirmation window.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Pending {
    pub previous: RuleSet,
    pub previous_allow_ping: bool,
    pub generation: u64,
    /// Unix time after which it is rolled back.
    pub deadline: u64,
}

/// Deny set names by set id, as the core last knew them: the drop-event
/// feed names the set of a `drop_denied` event with it. A set that is gone
/// keeps its name until its id is reused, so a late event still names it.
pub type DenySetNames = std::sync::Arc<std::sync::RwLock<std::collections::BTreeMap<u32, String>>>;

/// How the data path treats what the rules do not admit.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "mode", rename_all = "lowercase")]
pub enum Mode {
    /// Drop it (the normal mode).
    #[default]
    Enforce,
    /// Pass it, counting each packet under the reason it would be dropped
    /// for: to roll out a policy safely.
    Audit,
    /// Emergency: enforcement suspended (everything passes, still counted).
    Open,
    /// Emergency: drop everything new inbound; only flows already open and
    /// SSH from `admin` (when given) get in.
    Lockdown {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        admin: Option<String>,
    },
}

/// `[rate_limit]`: the default limit on the new inbound flows of each source
/// (a rule's own `rate`/`burst` replace it for that rule). Enforced in XDP
/// with GCRA over an LRU hash of per-source buckets (`ebpf/src/ratelimit.rs`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// New flows per second, per source.
    pub rate: u32,
    /// New flows a source may open at once (default: `rate`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// IPv6 sources share a bucket per prefix of this length (IPv4: per
    /// address).
    #[serde(default = "default_ipv6_prefix")]
    pub ipv6_prefix: u8,
    /// A source that exceeds its limit is banned (all new inbound traffic
    /// dropped) this long; absent: only its excess is dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ban_seconds: Option<u64>,
}

fn default_ipv6_prefix() -> u8 {
    64
}

/// Longest ban: a day.
pub const BAN_SECONDS_MAX: u64 = 86_400;

impl RateLimit {
    /// The problem with this section, naming the field.
    pub fn check(&self) -> Result<(), String> {
        crate::rules::check_rate(true, Some(self.rate), self.burst)
            .map_err(|(field, reason)| format!("rate_limit: {field}: {reason}"))?;
        if !(1..=128).contains(&self.ipv6_prefix) {
            return Err(format!(
                "rate_limit: ipv6_prefix: {} is out of range (1 to 128)",
                self.ipv6_prefix
            ));
        }
        if let Some(b) = self.ban_seconds
            && !(1..=BAN_SECONDS_MAX).contains(&b)
        {
            return Err(format!(
                "rate_limit: ban_seconds: {b} is out of range (1 to {BAN_SECONDS_MAX})"
            ));
        }
        Ok(())
    }

    /// The data path's entry for `rate` and `burst` (GCRA: the emission
    /// interval and the tolerance, so the data path needs no division).
    pub fn entry(rate: u32, burst: Option<u32>) -> portcullis_common::RateLimit {
        let interval_ns = 1_000_000_000 / u64::from(rate.max(1));
        let burst = u64::from(burst.unwrap_or(rate).max(1));
        portcullis_common::RateLimit {
            interval_ns,
            burst_ns: burst * interval_ns,
            ..Default::default()
        }
    }

    /// This default as the data path's entry 0 (with the ban and prefix).
    pub fn default_entry(&self) -> portcullis_common::RateLimit {
        portcullis_common::RateLimit {
            ban_ns: self.ban_seconds.unwrap_or(0) * 1_000_000_000,
            v6_mask: (u128::MAX << (128 - u32::from(self.ipv6_prefix).min(128))).to_be_bytes(),
            ..Self::entry(self.rate, self.burst)
        }
    }
}

/// The XDP program variant (see `Config::xdp_program`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum XdpProgram {
    #[default]
    Auto,
    Frags,
    SingleBuffer,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TcAttachMode {
    #[default]
    Auto,
    Tcx,
    Clsact,
}

/// A connected socket: this host's end and the remote end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connection {
    pub proto: u8,
    pub local: IpAddr,
    pub local_port: u16,
    pub remote: IpAddr,
    pub remote_port: u16,
    /// A TCP connection still waiting for the SYN-ACK.
    pub tcp_syn_sent: bool,
}

/// Names never protected in automatic mode: the host side of container
/// networking, which the external interface already covers.
pub const DEFAULT_EXCLUDE: &[&str] = &[
    "lo", "docker*", "br-*", "cni*", "veth*", "flannel*", "cali*", "virbr*", "lxc*", "cilium*",
    "vxlan*", "tun*", "tap*", "wg*",
];

/// What the kernel says about one link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// The link kind (`veth`, `bridge`, ...); `None` for real and paravirtual NICs.
    pub kind: Option<String>,
    pub loopback: bool,
    pub xdp: XdpMode,
}

/// How XDP runs on a link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpMode {
    None,
    /// In the driver (native).
    Native,
    /// In the generic (skb) path: drivers without XDP support.
    Generic,
    Offloaded,
    Multiple,
}

impl XdpMode {
    pub fn as_str(self) -> &'static str {
        match self {
            XdpMode::None => "none",
            XdpMode::Native => "native",
            XdpMode::Generic => "generic",
            XdpMode::Offloaded => "offloaded",
            XdpMode::Multiple => "multiple",
        }
    }
}

/// Decides which links are protected.
#[derive(Clone, Debug)]
pub struct Selector {
    explicit: Vec<String>,
    include: Vec<Pattern>,
    exclude: Vec<Pattern>,
}

impl Selector {
    /// `explicit` non-empty: exactly those names. Otherwise automatic:
    /// links without a kind, plus `include` matches, minus `exclude` matches.
    pub fn new(
        explicit: &[String],
        include: &[String],
        exclude: &[String],
    ) -> anyhow::Result<Self> {
        let compile = |field: &str, list: &[String]| -> anyhow::Result<Vec<Pattern>> {
            list.iter()
                .map(|p| {
                    Pattern::new(p)
                        .map_err(|e| anyhow::anyhow!("{field}: {p:?} is not a valid pattern: {e}"))
                })
                .collect()
        };
        Ok(Selector {
            explicit: explicit.to_vec(),
            include: compile("auto_include", include)?,
            exclude: compile("auto_exclude", exclude)?,
        })
    }

    pub fn is_auto(&self) -> bool {
        self.explicit.is_empty()
    }

    /// Whether a link named `name` may be protected, its kind unknown: in
    /// the explicit list, or (automatic mode) not loopback nor excluded.
    pub fn may_protect(&self, name: &str) -> bool {
        if !self.explicit.is_empty() {
            return self.explicit.iter().any(|n| n == name);
        }
        name != "lo" && !self.exclude.iter().any(|p| p.matches(name))
    }

    pub fn wants(&self, link: &Link) -> bool {
        if !self.explicit.is_empty() {
            return self.explicit.contains(&link.name);
        }
        if link.loopback || self.exclude.iter().any(|p| p.matches(&link.name)) {
            return false;
        }
        link.kind.is_none() || self.include.iter().any(|p| p.matches(&link.name))
    }
}

/// Lower-case hex of `bytes` (hashes, random names): the one encoder.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        // Writing to a String cannot fail.
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    #[test]
    fn hex_is_lower_case_two_digits_per_byte() {
        assert_eq!(super::hex(&[0x00, 0x0f, 0xa0, 0xff]), "000fa0ff");
        assert_eq!(super::hex(&[]), "");
    }

    #[test]
    fn the_default_limit_carries_the_prefix_mask_and_the_ban() {
        let l = super::RateLimit {
            rate: 1000,
            burst: None,
            ipv6_prefix: 56,
            ban_seconds: Some(3),
        };
        let e = l.default_entry();
        assert_eq!((e.interval_ns, e.burst_ns), (1_000_000, 1_000_000_000));
        assert_eq!(e.ban_ns, 3_000_000_000);
        assert_eq!(
            e.v6_mask[..8],
            [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0]
        );
        assert_eq!(e.v6_mask[8..], [0; 8]);
        let all = super::RateLimit {
            ipv6_prefix: 128,
            ..l.clone()
        };
        assert_eq!(all.default_entry().v6_mask, [0xff; 16]);
        let one = super::RateLimit {
            ipv6_prefix: 1,
            ..l
        };
        assert_eq!(one.default_entry().v6_mask[0], 0x80);
    }
}
