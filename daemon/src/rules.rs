//! The rule model, in the Brev SDK's format, and its validation.
//!
//! Pure: no kernel, no files. A `FirewallRule` has `id`, `from_port`,
//! `to_port` and `ip_ranges` (CIDRs; empty means any source) and covers TCP
//! and UDP. Portcullis accepts exactly that and extends it only with optional
//! fields (`protocol`, `description`) that old producers never send.

use std::collections::HashSet;

use portcullis_common::L4;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Which transport protocols a rule covers. Brev rules carry none: TCP and UDP.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    #[serde(rename = "tcp+udp")]
    TcpUdp,
    Tcp,
    Udp,
}

impl Protocol {
    pub fn l4s(self) -> &'static [L4] {
        match self {
            Protocol::TcpUdp => &[L4::Tcp, L4::Udp],
            Protocol::Tcp => &[L4::Tcp],
            Protocol::Udp => &[L4::Udp],
        }
    }
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
    #[serde(default, skip_serializing_if = "is_default")]
    pub protocol: Protocol,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// The rules of one instance.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSet {
    #[serde(default)]
    pub ingress_rules: Vec<FirewallRule>,
    #[serde(default)]
    pub egress_rules: Vec<FirewallRule>,
}

/// A rule set that failed validation: which list, which rule, which field, why.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("{list}[{index}] (id {id:?}): {field}: {reason}")]
pub struct RuleError {
    pub list: &'static str,
    pub index: usize,
    pub id: String,
    pub field: &'static str,
    pub reason: String,
}

impl RuleSet {
    /// Checks every rule; the first problem found is returned.
    pub fn validate(&self) -> Result<(), RuleError> {
        let mut ids = HashSet::new();
        for (list, rules) in [
            ("ingress_rules", &self.ingress_rules),
            ("egress_rules", &self.egress_rules),
        ] {
            for (index, rule) in rules.iter().enumerate() {
                let err = |field, reason: String| RuleError {
                    list,
                    index,
                    id: rule.id.clone(),
                    field,
                    reason,
                };
                if rule.id.trim().is_empty() {
                    return Err(err("id", "must not be empty".into()));
                }
                if !ids.insert(rule.id.as_str()) {
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
                // Source ranges need the rule engine's source tables; until they
                // exist a range is refused rather than silently widened to "any".
                if let Some(range) = rule.ip_ranges.first() {
                    return Err(err(
                        "ip_ranges",
                        format!(
                            "source ranges ({range}) are not supported by this version; leave the list empty for any source"
                        ),
                    ));
                }
            }
        }
        // An egress list that is parsed but not enforced would be a lie.
        if let Some(rule) = self.egress_rules.first() {
            return Err(RuleError {
                list: "egress_rules",
                index: 0,
                id: rule.id.clone(),
                field: "egress_rules",
                reason:
                    "egress allowlists are not supported by this version; outbound is allow-all"
                        .into(),
            });
        }
        Ok(())
    }

    /// The (protocol, port) pairs the ingress rules admit, as inclusive ranges.
    pub fn admitted_ports(&self) -> impl Iterator<Item = (L4, u16, u16)> + '_ {
        self.ingress_rules.iter().flat_map(|r| {
            r.protocol
                .l4s()
                .iter()
                .map(move |l4| (*l4, r.from_port as u16, r.to_port as u16))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(id: &str, from: u32, to: u32) -> FirewallRule {
        FirewallRule {
            id: id.into(),
            from_port: from,
            to_port: to,
            ip_ranges: vec![],
            protocol: Protocol::default(),
            description: None,
        }
    }

    #[test]
    fn accepts_brev_json_shape() {
        let json = r#"{"ingress_rules":[{"id":"web","from_port":80,"to_port":443,"ip_ranges":[]}],"egress_rules":[]}"#;
        let set: RuleSet = serde_json::from_str(json).unwrap();
        assert_eq!(set.ingress_rules, vec![rule("web", 80, 443)]);
        set.validate().unwrap();
    }

    #[test]
    fn reports_which_rule_and_field() {
        let set = RuleSet {
            ingress_rules: vec![rule("ok", 1, 2), rule("bad", 90, 80)],
            egress_rules: vec![],
        };
        let e = set.validate().unwrap_err();
        assert_eq!((e.index, e.field, e.id.as_str()), (1, "from_port", "bad"));
        assert_eq!(
            e.to_string(),
            "ingress_rules[1] (id \"bad\"): from_port: 90 is greater than to_port 80"
        );
    }

    #[test]
    fn rejects_out_of_range_ports_and_duplicate_ids() {
        let set = RuleSet {
            ingress_rules: vec![rule("a", 1, 70000)],
            egress_rules: vec![],
        };
        assert_eq!(set.validate().unwrap_err().field, "to_port");
        let set = RuleSet {
            ingress_rules: vec![rule("a", 1, 2), rule("a", 3, 4)],
            egress_rules: vec![],
        };
        assert!(set.validate().unwrap_err().reason.contains("duplicate"));
    }

    #[test]
    fn refuses_what_it_cannot_enforce() {
        let mut r = rule("a", 1, 2);
        r.ip_ranges = vec!["10.0.0.0/8".into()];
        let set = RuleSet {
            ingress_rules: vec![r],
            egress_rules: vec![],
        };
        assert_eq!(set.validate().unwrap_err().field, "ip_ranges");
        let set = RuleSet {
            ingress_rules: vec![],
            egress_rules: vec![rule("e", 1, 2)],
        };
        assert_eq!(set.validate().unwrap_err().list, "egress_rules");
    }

    #[test]
    fn protocol_extension_expands_ports() {
        let mut r = rule("dns", 53, 53);
        r.protocol = Protocol::Udp;
        let set = RuleSet {
            ingress_rules: vec![r, rule("web", 80, 81)],
            egress_rules: vec![],
        };
        let ports: Vec<_> = set.admitted_ports().collect();
        assert_eq!(
            ports,
            vec![(L4::Udp, 53, 53), (L4::Tcp, 80, 81), (L4::Udp, 80, 81)]
        );
    }
}
