//! Runtime and permanent, as firewalld users know them (pure).
//!
//! The *baseline* is the rule set the configuration gave at the last apply
//! (start without a saved live set, reload, `portcullis rules save`); the
//! state directory keeps it beside the live set. *Runtime changes* are what
//! differs between the live set and the baseline: rules (by id and
//! content), peers, the SSH exemption and the cluster. A reload whose new
//! rule set would remove or alter one of them is refused, naming them,
//! unless the caller discards them explicitly.

use std::collections::BTreeMap;

use crate::{
    config::Config,
    rules::{FirewallRule, RuleSet},
};

/// One item of a rule set, by what identifies it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Key {
    Rule(&'static str, String),
    Peer(String),
    Ssh,
    Cluster,
}

/// Every item of `set` and its content (as compared).
fn items(set: &RuleSet) -> BTreeMap<Key, String> {
    let mut out = BTreeMap::new();
    for (list, rules) in [
        ("ingress", &set.ingress_rules),
        ("egress", &set.egress_rules),
    ] {
        for r in rules {
            out.insert(Key::Rule(list, r.id.clone()), text(r));
        }
    }
    if let Some(c) = &set.cluster {
        for p in &c.peers {
            out.insert(Key::Peer(p.clone()), String::new());
        }
        let mut meta = c.clone();
        meta.peers.clear();
        out.insert(Key::Cluster, text(&meta));
    }
    out.insert(Key::Ssh, text(&set.ssh));
    out
}

/// Serialised for comparison (fields in declaration order).
fn text<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

/// The runtime changes (live against baseline) that a reload to `next`
/// would remove or alter, each named with a short description.
pub fn conflicts(baseline: &RuleSet, live: &RuleSet, next: &RuleSet) -> Vec<String> {
    let (b, l, n) = (items(baseline), items(live), items(next));
    let mut keys: Vec<&Key> = b.keys().chain(l.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| b.get(*k) != l.get(*k) && n.get(*k) != l.get(*k))
        .map(|k| describe(k, b.contains_key(k), l.contains_key(k), live))
        .collect()
}

/// A runtime change in a few words: `+web (ingress tcp+udp 8080 from any)`.
fn describe(key: &Key, in_baseline: bool, in_live: bool, live: &RuleSet) -> String {
    let sign = match (in_baseline, in_live) {
        (false, _) => "+",
        (true, false) => "-",
        (true, true) => "~",
    };
    match key {
        Key::Rule(list, id) => {
            let what = live
                .ingress_rules
                .iter()
                .chain(&live.egress_rules)
                .find(|r| &r.id == id)
                .map_or_else(|| "removed at runtime".to_string(), rule_summary);
            format!("{sign}{id} ({list} {what})")
        }
        Key::Peer(p) => format!("{sign}peer {p}"),
        Key::Ssh => format!(
            "~ssh (allow {}, ports {:?}, at runtime)",
            live.ssh.allow, live.ssh.ports
        ),
        Key::Cluster => format!("{sign}cluster (changed at runtime)"),
    }
}

fn rule_summary(r: &FirewallRule) -> String {
    let proto = serde_json::to_value(r.protocol)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    let ports = if r.from_port == r.to_port {
        r.from_port.to_string()
    } else {
        format!("{}-{}", r.from_port, r.to_port)
    };
    format!("{proto} {ports} from {}", r.sources_text())
}

/// Settings a reload applies besides the rules (each `name: old -> new`).
pub fn applied_settings(live_allow_ping: bool, new: &Config) -> Vec<String> {
    if live_allow_ping == new.allow_ping {
        Vec::new()
    } else {
        vec![format!(
            "allow_ping: {live_allow_ping} -> {}",
            new.allow_ping
        )]
    }
}

/// Keys of the configuration a reload applies: the rules (with the saved
/// rules file) and pings. Every other key needs a restart.
const RELOADABLE: [&str; 8] = [
    "ingress_rules",
    "egress_rules",
    "egress",
    "cluster",
    "ssh",
    "rules_file",
    "allow_ping",
    // Used only when enforcement cannot start: the next start reads it.
    "fallback",
];

/// The settings that differ between the configuration the daemon started
/// with and `new` and that only a restart applies (top-level keys, and
/// `[section] key` inside sections).
pub fn restart_needed(started: &Config, new: &Config) -> Vec<String> {
    let (Ok(a), Ok(b)) = (serde_json::to_value(started), serde_json::to_value(new)) else {
        return vec!["(the configuration cannot be compared)".into()];
    };
    let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else {
        return Vec::new();
    };
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    let mut out = Vec::new();
    for k in keys {
        if RELOADABLE.contains(&k.as_str()) || a.get(k) == b.get(k) {
            continue;
        }
        match (
            a.get(k).and_then(|v| v.as_object()),
            b.get(k).and_then(|v| v.as_object()),
        ) {
            (Some(x), Some(y)) => {
                let mut sub: Vec<&String> = x.keys().chain(y.keys()).collect();
                sub.sort();
                sub.dedup();
                out.extend(
                    sub.into_iter()
                        .filter(|s| x.get(*s) != y.get(*s))
                        .map(|s| format!("[{k}] {s}")),
                );
            }
            _ => out.push(k.clone()),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(toml: &str) -> RuleSet {
        toml::from_str(toml).unwrap()
    }

    const WEB: &str = "[[ingress_rules]]\nid = \"web\"\nfrom_port = 80\nto_port = 80\n";
    const HTTPS: &str = "[[ingress_rules]]\nid = \"https\"\nfrom_port = 443\nto_port = 443\n";

    #[test]
    fn runtime_changes_conflict_only_when_the_new_set_undoes_them() {
        let baseline = set(WEB);
        let live = set(&format!("{WEB}{HTTPS}"));
        // Config without https: the runtime rule would go.
        let c = conflicts(&baseline, &live, &set(WEB));
        assert_eq!(c, vec!["+https (ingress tcp+udp 443 from any)".to_string()]);
        // Config with https too: kept, no conflict.
        assert!(conflicts(&baseline, &live, &set(&format!("{HTTPS}{WEB}"))).is_empty());
        // No runtime change: anything goes.
        assert!(conflicts(&live, &live, &set("")).is_empty());
        // Removed at runtime, back in the config: a conflict too.
        let c = conflicts(&baseline, &set(""), &set(WEB));
        assert_eq!(c, vec!["-web (ingress removed at runtime)".to_string()]);
        // Peers and SSH.
        let peers = set("[cluster]\nid = \"c\"\npeers = [\"10.1.0.0/16\"]\n");
        let c = conflicts(&set(""), &peers, &set(""));
        assert!(c.contains(&"+peer 10.1.0.0/16".to_string()), "{c:?}");
        // (SSH is on by default: the baseline turns it off.)
        let ssh_off = set("[ssh]\nallow = false\n");
        let ssh_on = set("[ssh]\nallow = true\n");
        let c = conflicts(&ssh_off, &ssh_on, &ssh_off);
        assert_eq!(c.len(), 1, "{c:?}");
        assert!(c[0].starts_with("~ssh"), "{c:?}");
    }

    /// A names-only egress rule is summarised by its names, never "from
    /// any"; an interface rule says where it applies.
    #[test]
    fn summaries_name_names_and_interfaces() {
        let live = set(
            "egress = \"allowlist\"\n[[egress_rules]]\nid = \"api\"\nfrom_port = 443\nto_port = 443\nprotocol = \"tcp\"\nnames = [\"api.example.com\"]\n\
             [[ingress_rules]]\nid = \"db\"\nfrom_port = 5432\nto_port = 5432\nprotocol = \"tcp\"\nip_ranges = [\"10.0.0.0/8\"]\ninterfaces = [\"eth1\"]\n",
        );
        let c = conflicts(&set(""), &live, &set(""));
        assert!(
            c.contains(&"+api (egress tcp 443 from api.example.com)".to_string()),
            "{c:?}"
        );
        assert!(
            c.contains(&"+db (ingress tcp 5432 from 10.0.0.0/8 on eth1)".to_string()),
            "{c:?}"
        );
    }

    #[test]
    fn settings_that_need_a_restart_are_named() {
        let a = Config::parse("interfaces = [\"eth0\"]\n").unwrap();
        let b = Config::parse(
            "interfaces = [\"eth1\"]\nallow_ping = true\n[api]\nrequest_timeout_secs = 5\n",
        )
        .unwrap();
        assert_eq!(
            restart_needed(&a, &b),
            vec![
                "[api] request_timeout_secs".to_string(),
                "interfaces".to_string()
            ]
        );
        assert_eq!(
            applied_settings(false, &b),
            vec!["allow_ping: false -> true"]
        );
        assert!(restart_needed(&a, &a).is_empty());
    }
}
