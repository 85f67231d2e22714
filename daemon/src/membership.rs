//! The fleet's member list as etcd holds it (pure): the keys, the value
//! of one member, and the cluster's peers computed from all of them.
//!
//! Layout: one key per host, `<prefix>/<cluster_id>/members/<name>`, whose
//! value is a JSON document naming the host's addresses:
//!
//! ```json
//! {"addresses": ["10.200.10.2", "fd00:200:10::2"]}
//! ```
//!
//! Each address is a single address (or a /32, /128) inside the
//! configuration's `allowed_ranges`; at most [`MAX_ADDRESSES`] per host. The
//! peers of the cluster are the union of every member's addresses. One key
//! that does not parse or validate refuses the whole revision: nothing
//! changes until it is fixed or removed.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Addresses one member may register.
pub const MAX_ADDRESSES: usize = 16;

/// Largest member value read (bytes).
pub const MAX_VALUE: usize = 4096;

/// The value of one member's key.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Member {
    pub addresses: Vec<String>,
}

/// `<prefix>/<cluster_id>/members/`: every member's key starts so.
pub fn members_prefix(prefix: &str, cluster_id: &str) -> String {
    format!("{prefix}/{cluster_id}/members/")
}

/// The end of the range of keys that start with `prefix` (etcd's
/// `range_end`: the prefix with its last byte incremented).
pub fn range_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte 0xff: the whole key space after the prefix.
    vec![0]
}

/// An etcd endpoint, `https://HOST:PORT` (`[v6]:port` for IPv6): its host
/// and port. Plain `http://` is refused: membership is never read in clear.
pub fn parse_endpoint(url: &str) -> Result<(String, u16), String> {
    let rest = url
        .strip_prefix("https://")
        .ok_or_else(|| format!("{url:?} is not an https:// URL (etcd is reached over TLS only)"))?;
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let (host, port) = rest
        .rsplit_once(':')
        .ok_or_else(|| format!("{url:?} has no port"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("{url:?}: {port:?} is not a port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || host.contains(['/', '@', ' ']) {
        return Err(format!("{url:?}: {host:?} is not a host"));
    }
    Ok((host.to_string(), port))
}

/// Whether `s` may be a cluster id or a member name (one key segment).
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && s != "."
        && s != ".."
}

/// One address as a single-address network (/32 or /128), checked against
/// `allowed`. The error says what is wrong with it.
pub fn single_address(text: &str, allowed: &[IpNet]) -> Result<IpNet, String> {
    let net = match text.parse::<IpAddr>() {
        Ok(addr) => IpNet::from(addr.to_canonical()),
        Err(_) => {
            let net: IpNet = text
                .parse()
                .map_err(|_| format!("{text:?} is not an IP address"))?;
            if net.prefix_len() != net.max_prefix_len() {
                return Err(format!(
                    "{text:?} is a range; a member is single addresses (/32, /128)"
                ));
            }
            net
        }
    };
    if !allowed.iter().any(|a| a.contains(&net)) {
        return Err(format!("{text:?} is outside allowed_ranges"));
    }
    Ok(net)
}

/// Parses and validates one member's value: its single addresses.
pub fn parse_member(value: &[u8], allowed: &[IpNet]) -> Result<Vec<IpNet>, String> {
    if value.len() > MAX_VALUE {
        return Err(format!(
            "the value is {} bytes (at most {MAX_VALUE})",
            value.len()
        ));
    }
    let member: Member = serde_json::from_slice(value)
        .map_err(|e| format!("the value is not {{\"addresses\": [...]}}: {e}"))?;
    if member.addresses.is_empty() {
        return Err("addresses: empty".into());
    }
    if member.addresses.len() > MAX_ADDRESSES {
        return Err(format!(
            "addresses: {} of them (at most {MAX_ADDRESSES})",
            member.addresses.len()
        ));
    }
    member
        .addresses
        .iter()
        .enumerate()
        .map(|(i, a)| single_address(a, allowed).map_err(|e| format!("addresses[{i}]: {e}")))
        .collect()
}

/// The member list at one etcd revision: key → value, as etcd has them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct View {
    /// The etcd revision this view is complete at.
    pub revision: i64,
    pub members: BTreeMap<String, String>,
    /// Each key's last value that validated (saved with the view): what a
    /// key whose new value is refused still stands for.
    #[serde(default)]
    pub valid: BTreeMap<String, String>,
}

/// A change of one key, as a watch reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Put { key: String, value: String },
    Delete { key: String },
}

impl View {
    /// Applies watch events up to `revision`.
    pub fn apply(&mut self, events: Vec<Event>, revision: i64) {
        for e in events {
            match e {
                Event::Put { key, value } => {
                    self.members.insert(key, value);
                }
                Event::Delete { key } => {
                    self.members.remove(&key);
                    self.valid.remove(&key);
                }
            }
        }
        self.revision = self.revision.max(revision);
    }

    /// The cluster's peers (sorted, each once), and each key whose value
    /// does not validate, named with why. A bad value is refused alone: it
    /// changes nothing (its key stands for its last valid value, or for
    /// nothing), and the rest of the list still applies, so one bad value
    /// (a leaked credential, a newer daemon's format) cannot freeze the
    /// list and keep removed members admitted everywhere. Records each
    /// key's valid value.
    pub fn peers(&mut self, allowed: &[IpNet]) -> (Vec<String>, Vec<String>) {
        let mut out: Vec<IpNet> = Vec::new();
        let mut refused = Vec::new();
        for (key, value) in &self.members {
            match parse_member(value.as_bytes(), allowed) {
                Ok(nets) => {
                    out.extend(nets);
                    self.valid.insert(key.clone(), value.clone());
                }
                Err(e) => {
                    refused.push(format!("etcd key {key:?}: {e}"));
                    let last = self
                        .valid
                        .get(key)
                        .map(|v| parse_member(v.as_bytes(), allowed));
                    if let Some(Ok(nets)) = last {
                        out.extend(nets);
                    }
                }
            }
        }
        self.valid.retain(|k, _| self.members.contains_key(k));
        out.sort();
        out.dedup();
        (out.iter().map(ToString::to_string).collect(), refused)
    }
}

/// The value this host registers.
pub fn member_value(addresses: &[String]) -> String {
    serde_json::to_string(&Member {
        addresses: addresses.to_vec(),
    })
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed() -> Vec<IpNet> {
        vec![
            "10.200.0.0/16".parse().unwrap(),
            "fd00:200::/32".parse().unwrap(),
        ]
    }

    #[test]
    fn members_are_single_addresses_inside_the_allowed_ranges() {
        let ok = parse_member(
            br#"{"addresses":["10.200.1.2","fd00:200::2/128"]}"#,
            &allowed(),
        );
        assert_eq!(
            ok.unwrap()
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["10.200.1.2/32", "fd00:200::2/128"]
        );
        let err = |v: &[u8]| parse_member(v, &allowed()).unwrap_err();
        assert!(err(br#"{"addresses":["10.200.1.0/24"]}"#).contains("is a range"));
        assert!(err(br#"{"addresses":["10.9.1.2"]}"#).contains("outside allowed_ranges"));
        assert!(err(br#"{"addresses":["nope"]}"#).contains("addresses[0]"));
        assert!(err(br#"{"addresses":[]}"#).contains("empty"));
        assert!(err(b"not json").contains("is not"));
        assert!(err(br#"{"addresses":["10.200.1.2"],"x":1}"#).contains("unknown field"));
    }

    #[test]
    fn one_bad_member_refuses_the_whole_view_naming_its_key() {
        let mut view = View::default();
        view.apply(
            vec![
                Event::Put {
                    key: "/p/c/members/a".into(),
                    value: r#"{"addresses":["10.200.1.2"]}"#.into(),
                },
                Event::Put {
                    key: "/p/c/members/b".into(),
                    value: r#"{"addresses":["10.200.1.3", "10.200.1.2"]}"#.into(),
                },
            ],
            7,
        );
        assert_eq!(view.peers(&allowed()).0, ["10.200.1.2/32", "10.200.1.3/32"]);
        view.apply(
            vec![Event::Put {
                key: "/p/c/members/c".into(),
                value: r#"{"addresses":["0.0.0.0/0"]}"#.into(),
            }],
            8,
        );
        // Refused alone: the others stay peers.
        let (peers, refused) = view.peers(&allowed());
        assert_eq!(peers.len(), 2);
        let e = refused.join("; ");
        assert!(e.contains("/p/c/members/c") && e.contains("range"), "{e}");
        view.apply(
            vec![Event::Delete {
                key: "/p/c/members/c".into(),
            }],
            9,
        );
        assert_eq!(view.revision, 9);
        assert_eq!(view.peers(&allowed()), (peers, Vec::new()));
    }

    #[test]
    fn a_bad_value_changes_nothing_and_freezes_nothing() {
        let put = |key: &str, value: &str| Event::Put {
            key: key.into(),
            value: value.into(),
        };
        let mut view = View::default();
        view.apply(
            vec![
                put("/p/c/members/a", r#"{"addresses":["10.200.1.2"]}"#),
                put("/p/c/members/b", r#"{"addresses":["10.200.1.3"]}"#),
            ],
            5,
        );
        assert_eq!(view.peers(&allowed()).0.len(), 2);
        // a's value goes bad: refused, a still stands for its last valid one.
        view.apply(vec![put("/p/c/members/a", "not json")], 6);
        let (peers, refused) = view.peers(&allowed());
        assert_eq!(peers, ["10.200.1.2/32", "10.200.1.3/32"]);
        assert_eq!(refused.len(), 1);
        // Meanwhile b's removal applies.
        view.apply(
            vec![Event::Delete {
                key: "/p/c/members/b".into(),
            }],
            7,
        );
        assert_eq!(view.peers(&allowed()).0, ["10.200.1.2/32"]);
        // A bad key never valid stands for nothing; a deleted key is gone.
        view.apply(
            vec![put("/p/c/members/z", r#"{"addresses":["10.99.0.1"]}"#)],
            8,
        );
        assert_eq!(view.peers(&allowed()).0, ["10.200.1.2/32"]);
        view.apply(
            vec![Event::Delete {
                key: "/p/c/members/a".into(),
            }],
            9,
        );
        assert!(view.peers(&allowed()).0.is_empty());
    }

    #[test]
    fn endpoints_are_https_only() {
        assert_eq!(
            parse_endpoint("https://10.200.1.9:2379").unwrap(),
            ("10.200.1.9".to_string(), 2379)
        );
        assert_eq!(
            parse_endpoint("https://[fd00:200::9]:2379").unwrap().0,
            "fd00:200::9"
        );
        assert!(
            parse_endpoint("http://10.200.1.9:2379")
                .unwrap_err()
                .contains("TLS")
        );
        assert!(parse_endpoint("https://10.200.1.9").is_err());
    }

    #[test]
    fn range_ends_and_names() {
        assert_eq!(range_end(b"/p/c/members/"), b"/p/c/members0");
        assert_eq!(range_end(&[b'a', 0xff]), b"b");
        assert!(valid_name("gpu-7.rack_2") && !valid_name("a/b") && !valid_name(".."));
    }
}
