//! Which interfaces to protect, and watching for new ones (rtnetlink).
//!
//! By default every non-virtual link is protected: physical and paravirtual
//! NICs, which the kernel reports without a link kind, including ones without
//! a default route (cluster NICs) and ones that appear later. Loopback and
//! virtual links (bridges, veths, tunnels...) are left alone, and the
//! interfaces of container runtimes are excluded by name. An explicit list in
//! the configuration overrides all of this.

use futures::TryStreamExt as _;
use netlink_packet_route::link::{
    InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage, LinkXdp, XdpAttached,
};
use rtnetlink::Handle;

pub use crate::model::{DEFAULT_EXCLUDE, Link, Selector, XdpMode};

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
