//! Which interfaces to protect, and watching for new ones (rtnetlink).
//!
//! By default every non-virtual link is protected: physical and paravirtual
//! NICs, which the kernel reports without a link kind, including ones without
//! a default route (cluster NICs) and ones that appear later. Loopback and
//! virtual links (bridges, veths, tunnels...) are left alone, and the
//! interfaces of container runtimes are excluded by name. An explicit list in
//! the configuration overrides all of this.

use futures::TryStreamExt as _;
use glob::Pattern;
use netlink_packet_route::link::{
    InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage, LinkXdp, XdpAttached,
};
use rtnetlink::Handle;

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

impl Link {
    pub fn from_message(msg: &LinkMessage) -> Option<Link> {
        let mut name = None;
        let mut kind = None;
        let mut xdp = XdpMode::None;
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::IfName(n) => name = Some(n.clone()),
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        if let LinkInfo::Kind(k) = info {
                            kind = Some(kind_name(k));
                        }
                    }
                }
                LinkAttribute::Xdp(attrs) => {
                    for a in attrs {
                        if let LinkXdp::Attached(at) = a {
                            xdp = match at {
                                XdpAttached::Driver => XdpMode::Native,
                                XdpAttached::SocketBuffer => XdpMode::Generic,
                                XdpAttached::Hardware => XdpMode::Offloaded,
                                XdpAttached::Multiple => XdpMode::Multiple,
                                _ => XdpMode::None,
                            };
                        }
                    }
                }
                _ => {}
            }
        }
        Some(Link {
            index: msg.header.index,
            name: name?,
            kind,
            loopback: msg.header.flags.contains(LinkFlags::Loopback),
            xdp,
        })
    }
}

fn kind_name(kind: &InfoKind) -> String {
    match kind {
        InfoKind::Other(s) => s.clone(),
        k => format!("{k:?}").to_lowercase(),
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

/// Every link in the caller's network namespace.
pub async fn list(handle: &Handle) -> anyhow::Result<Vec<Link>> {
    let mut links = Vec::new();
    let mut stream = handle.link().get().execute();
    while let Some(msg) = stream.try_next().await? {
        links.extend(Link::from_message(&msg));
    }
    Ok(links)
}

/// One link by name.
pub async fn get(handle: &Handle, name: &str) -> anyhow::Result<Link> {
    let mut stream = handle.link().get().match_name(name.to_string()).execute();
    match stream.try_next().await? {
        Some(msg) => {
            Link::from_message(&msg).ok_or_else(|| anyhow::anyhow!("link {name} has no name"))
        }
        None => anyhow::bail!("no link named {name}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(name: &str, kind: Option<&str>) -> Link {
        Link {
            index: 1,
            name: name.into(),
            kind: kind.map(Into::into),
            loopback: name == "lo",
            xdp: XdpMode::None,
        }
    }

    fn defaults() -> Vec<String> {
        DEFAULT_EXCLUDE.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn auto_takes_nics_and_leaves_virtual_and_container_links() {
        let s = Selector::new(&[], &[], &defaults()).unwrap();
        assert!(s.is_auto());
        for nic in ["eth0", "ens5", "enp1s0f1", "ib0", "eth1"] {
            assert!(s.wants(&link(nic, None)), "{nic}");
        }
        for (name, kind) in [
            ("lo", None),
            ("docker0", Some("bridge")),
            ("br-1a2b", Some("bridge")),
            ("veth12ab", Some("veth")),
            ("cni0", Some("bridge")),
            ("flannel.1", Some("vxlan")),
            ("cali123", Some("veth")),
            ("mybr", Some("bridge")),
            ("docker0", None),
        ] {
            assert!(!s.wants(&link(name, kind)), "{name}");
        }
    }

    #[test]
    fn include_adds_virtual_links_but_exclude_wins() {
        let s = Selector::new(&[], &["pc*".into(), "veth*".into()], &defaults()).unwrap();
        assert!(s.wants(&link("pc0", Some("veth"))));
        assert!(!s.wants(&link("veth9", Some("veth"))));
    }

    #[test]
    fn explicit_list_overrides() {
        let s = Selector::new(&["veth0".into()], &[], &defaults()).unwrap();
        assert!(!s.is_auto());
        assert!(s.wants(&link("veth0", Some("veth"))));
        assert!(!s.wants(&link("eth0", None)));
    }

    #[test]
    fn bad_patterns_name_the_field() {
        let e = Selector::new(&[], &["[".into()], &[]).unwrap_err();
        assert!(e.to_string().starts_with("auto_include: \"[\""), "{e}");
    }
}
