//! FQDN egress rules through the core: what a DNS answer's chain admits,
//! written into the data path (`FQDN_DEST`) before the forwarder returns
//! the answer; expired entries and entries of changed or removed rules
//! swept.

use std::net::IpAddr;

use portcullis_common::{
    FAMILY_V4, FAMILY_V6, FQDN_ENTRIES, FqdnEntry, FqdnKey, PCLASS_TCP, PCLASS_UDP, SLOT_KIND_RULE,
    SLOT_KIND_SHIFT,
};

/// Addresses one answer may admit (the first ones on the chain's end).
pub const MAX_ANSWER_ADDRESSES: usize = 32;

use super::Core;
use crate::{
    dataplane::boottime_ns,
    dns::{self, Chain},
    rules::{FirewallRule, Protocol},
};

/// What `status` shows of the DNS forwarder.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct DnsStatus {
    /// Where it listens.
    pub listen: String,
    pub upstreams: Vec<String>,
    /// Whether its sockets came from systemd (socket activation).
    pub socket_activated: bool,
    /// Learned destinations (address, protocol, port) in the data path.
    pub entries: usize,
    /// Answers relayed, answers that admitted something, SERVFAILs sent.
    pub answers: u64,
    pub admitting: u64,
    pub servfails: u64,
    /// Why the forwarder is not running (names then admit nothing), with
    /// what to do about it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The rule's identity in `FqdnEntry::rule`: a hash of what decides what
/// it admits (id, names, protocol, ports), so an edited rule's entries go.
pub fn rule_hash(r: &FirewallRule) -> u32 {
    let text = format!(
        "{}|{:?}|{:?}|{}|{}",
        r.id, r.names, r.protocol, r.from_port, r.to_port
    );
    // FNV-1a.
    text.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// The data path's keys for `addr` under rule `r`: per protocol class, each
/// port of its range (port 0 never: it means any), or port 0 when the rule
/// admits every port.
pub fn keys(r: &FirewallRule, addr: IpAddr) -> Vec<FqdnKey> {
    let FqdnKey {
        addr: bytes,
        family,
        ..
    } = keys_for(addr, 0);
    let pclasses: &[usize] = match r.protocol {
        Protocol::Tcp => &[PCLASS_TCP],
        Protocol::Udp => &[PCLASS_UDP],
        Protocol::TcpUdp => &[PCLASS_TCP, PCLASS_UDP],
        _ => &[],
    };
    let all = r.from_port <= 1 && r.to_port == u32::from(u16::MAX);
    let ports: Vec<u16> = if all {
        vec![0]
    } else {
        (r.from_port.max(1)..=r.to_port.min(u32::from(u16::MAX)))
            .take(dns::MAX_RULE_PORTS as usize)
            .map(|p| p as u16)
            .collect()
    };
    pclasses
        .iter()
        .flat_map(|&pclass| {
            ports.iter().map(move |&port| FqdnKey {
                addr: bytes,
                port,
                pclass: pclass as u8,
                family,
            })
        })
        .collect()
}

/// The key of `addr` (its family and bytes) with `port`, protocol class 0.
fn keys_for(addr: IpAddr, port: u16) -> FqdnKey {
    let (family, bytes) = match addr {
        IpAddr::V4(a) => {
            let mut b = [0u8; 16];
            if let Some(head) = b.get_mut(..4) {
                head.copy_from_slice(&a.octets());
            }
            (FAMILY_V4, b)
        }
        IpAddr::V6(a) => (FAMILY_V6, a.octets()),
    };
    FqdnKey {
        addr: bytes,
        port,
        pclass: 0,
        family,
    }
}

/// Whether `key` is one of rule `r`'s keys (its protocol and ports).
fn fits(r: &FirewallRule, key: &FqdnKey) -> bool {
    let addr = if key.family == FAMILY_V4 {
        let mut a = [0u8; 4];
        a.copy_from_slice(key.addr.get(..4).unwrap_or(&[0; 4]));
        IpAddr::from(a)
    } else {
        IpAddr::from(key.addr)
    };
    keys(r, addr).contains(key)
}

impl Core {
    /// The FQDN rules (egress rules with names) and their slots now.
    fn fqdn_rules(&self) -> Vec<(FirewallRule, u32)> {
        self.rules
            .named_egress_rules()
            .filter_map(|r| {
                let name = format!("rule:{}", r.id);
                let index = self.image.slots.position(&name)?;
                Some((r, (SLOT_KIND_RULE << SLOT_KIND_SHIFT) | index as u32))
            })
            .collect()
    }

    /// Writes what `chain` admits: for every FQDN rule matching a name on
    /// it, each address for the rule's ports, until max(TTL, `floor`)
    /// capped at `max` seconds from now. Returns how many entries; an
    /// error means nothing may be assumed admitted (answer SERVFAIL).
    pub fn fqdn_admit(&mut self, chain: &Chain, floor: u32, max: u32) -> anyhow::Result<usize> {
        if !self.image.dns_guard {
            return Ok(0);
        }
        let now = boottime_ns();
        let mut entries = Vec::new();
        for (rule, slot) in self.fqdn_rules() {
            let named = chain
                .names
                .iter()
                .any(|n| rule.names.iter().any(|p| dns::matches(p, n)));
            if !named {
                continue;
            }
            let hash = rule_hash(&rule);
            for &(addr, ttl) in chain.addresses.iter().take(MAX_ANSWER_ADDRESSES) {
                let secs = u64::from(ttl.max(floor).min(max));
                let entry = FqdnEntry {
                    expires_ns: now.saturating_add(secs * 1_000_000_000),
                    slot,
                    rule: hash,
                };
                entries.extend(keys(&rule, addr).into_iter().map(|k| (k, entry)));
            }
        }
        if self.dataplane.fqdn_write(&entries).is_err() {
            // Full: the entries closest to expiry make room, so a flood of
            // answers cannot stop a later lookup from admitting.
            self.fqdn_make_room(&entries)?;
            self.dataplane.fqdn_write(&entries)?;
        }
        Ok(entries.len())
    }

    /// Deletes the learned destinations closest to expiry (none of
    /// `new`'s keys) until `new` fits with 1/64 of the table to spare.
    fn fqdn_make_room(&mut self, new: &[(FqdnKey, FqdnEntry)]) -> anyhow::Result<()> {
        let keep: std::collections::HashSet<FqdnKey> = new.iter().map(|(k, _)| *k).collect();
        let mut all = self.dataplane.fqdn_entries()?;
        all.retain(|(k, _)| !keep.contains(k));
        all.sort_by_key(|(_, e)| e.expires_ns);
        let cap = FQDN_ENTRIES as usize;
        let want = new.len() + cap / 64;
        let excess = (all.len() + want).saturating_sub(cap);
        let gone: Vec<FqdnKey> = all.iter().take(excess).map(|(k, _)| *k).collect();
        tracing::warn!(
            evicted = gone.len(),
            capacity = cap,
            "the learned destinations are full: evicting those closest to expiry"
        );
        self.dataplane.fqdn_forget(&gone)
    }

    /// Deletes learned destinations that expired, or whose rule is gone or
    /// changed (by its hash); gives the rest their rule's current slot.
    /// Returns (kept, deleted).
    pub fn fqdn_sweep(&mut self) -> anyhow::Result<(usize, usize)> {
        self.cut_dns_flows_once()?;
        let now = boottime_ns();
        // Each rule's hash once per sweep, not once per entry.
        let rules: Vec<(FirewallRule, u32, u32)> = self
            .fqdn_rules()
            .into_iter()
            .map(|(r, s)| {
                let hash = rule_hash(&r);
                (r, s, hash)
            })
            .collect();
        let mut gone = Vec::new();
        let mut moved = Vec::new();
        let mut kept = 0;
        for (key, entry) in self.dataplane.fqdn_entries()? {
            let rule = rules
                .iter()
                .find(|(r, _, hash)| *hash == entry.rule && fits(r, &key));
            match rule {
                Some((_, slot, _)) if entry.expires_ns > now => {
                    kept += 1;
                    if *slot != entry.slot {
                        moved.push((
                            key,
                            FqdnEntry {
                                slot: *slot,
                                ..entry
                            },
                        ));
                    }
                }
                _ => gone.push(key),
            }
        }
        self.dataplane.fqdn_forget(&gone)?;
        self.dataplane.fqdn_write(&moved)?;
        Ok((kept, gone.len()))
    }

    /// [`Core::fqdn_sweep`], a failure logged.
    pub(super) fn fqdn_sweep_logged(&mut self) {
        if let Err(e) = self.fqdn_sweep() {
            tracing::error!(error = %format!("{e:#}"), "cannot sweep the learned destinations");
        }
    }

    /// Once after the DNS guard turns on: cuts the connection-table flows
    /// to port 53 or 853 other than to the forwarder's upstreams (a DNS or
    /// DoT flow opened before would otherwise keep passing).
    fn cut_dns_flows_once(&mut self) -> anyhow::Result<()> {
        if !self.image.dns_guard {
            self.dns_flows_cut = false;
            return Ok(());
        }
        if self.dns_flows_cut {
            return Ok(());
        }
        let upstreams: Vec<std::net::SocketAddr> = self
            .dns
            .as_ref()
            .map(|d| d.upstreams.iter().filter_map(|u| u.parse().ok()).collect())
            .unwrap_or_default();
        let cut = self.dataplane.cut_dns_flows(|addr, port| {
            upstreams
                .iter()
                .any(|u| u.ip().to_canonical() == addr.to_canonical() && u.port() == port)
        })?;
        self.dns_flows_cut = true;
        if cut > 0 {
            tracing::info!(cut, "DNS guard on: DNS flows opened before it cut");
        }
        Ok(())
    }

    /// Writes the forwarder's upstreams into the data path: the only
    /// destinations (address, port, TCP and UDP) its mark admits.
    pub fn dns_upstreams(&mut self, upstreams: &[std::net::SocketAddr]) -> anyhow::Result<()> {
        let keys: Vec<FqdnKey> = upstreams
            .iter()
            .flat_map(|u| {
                let any = keys_for(u.ip(), 0);
                [PCLASS_TCP, PCLASS_UDP].map(move |pclass| FqdnKey {
                    port: u.port(),
                    pclass: pclass as u8,
                    ..any
                })
            })
            .collect();
        self.dataplane.dns_upstreams_set(&keys)
    }

    /// Refuses a rule set with names while no forwarder runs: its names
    /// would admit nothing (the forwarder starts with the daemon).
    pub(super) fn check_forwarder(
        &self,
        next: &crate::rules::RuleSet,
    ) -> Result<(), super::ChangeError> {
        if next.has_names() && !self.rules.has_names() && self.dns.is_none() {
            return Err(super::ChangeError::Config(
                "egress rules with names need the DNS forwarder, which is not running: set [dns] upstreams (and enabled = true) in the configuration and restart the daemon".into(),
            ));
        }
        Ok(())
    }

    /// The forwarder's status with the learned destinations counted now.
    pub fn dns_status(&mut self) -> Option<DnsStatus> {
        let mut s = self.dns.clone()?;
        s.entries = self.fqdn_entries();
        Some(s)
    }

    /// Learned destinations in the data path now.
    pub fn fqdn_entries(&mut self) -> usize {
        self.dataplane.fqdn_entries().map_or(0, |e| e.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(protocol: Protocol, from: u32, to: u32) -> FirewallRule {
        let mut r: FirewallRule = serde_json::from_value(serde_json::json!({
            "id": "api", "from_port": from, "to_port": to, "names": ["api.example.com"]
        }))
        .unwrap();
        r.protocol = protocol;
        r
    }

    #[test]
    fn keys_per_port_or_any() {
        let a: IpAddr = "10.200.0.2".parse().unwrap();
        let k = keys(&rule(Protocol::Tcp, 443, 443), a);
        assert_eq!(k.len(), 1);
        assert_eq!((k[0].port, k[0].pclass, k[0].family), (443, 0, 4));
        assert_eq!(&k[0].addr[..4], &[10, 200, 0, 2]);
        let k = keys(&rule(Protocol::TcpUdp, 0, 65535), a);
        assert!(k.iter().all(|k| k.port == 0) && k.len() == 2);
        // A range starting at 0 (not all ports) never yields the any-port key.
        let k = keys(&rule(Protocol::Tcp, 0, 3), a);
        assert_eq!(k.iter().map(|k| k.port).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert!(fits(&rule(Protocol::Tcp, 0, 3), &k[0]));
        assert!(!fits(&rule(Protocol::Udp, 0, 3), &k[0]));
    }

    #[test]
    fn dns_ports_are_carved_out_of_egress_rules_under_the_guard() {
        let text = "egress = \"allowlist\"\n\
            [[egress_rules]]\nid = \"wide\"\nfrom_port = 1\nto_port = 65535\n\
            [[egress_rules]]\nid = \"api\"\nfrom_port = 443\nto_port = 443\nprotocol = \"tcp\"\nnames = [\"api.example.com\"]\n";
        let set: crate::rules::RuleSet = toml::from_str(text).unwrap();
        set.validate().unwrap();
        let image = crate::compile::compile(&set, &crate::compile::Limits::default()).unwrap();
        assert!(image.dns_guard);
        let addr: IpAddr = "192.0.2.1".parse().unwrap();
        let admits = |pclass, port| {
            portcullis_common::slot_admits(image.lookup(
                portcullis_common::DIR_EGRESS,
                addr,
                pclass,
                port,
            ))
        };
        for port in [53, 853] {
            assert!(
                !admits(PCLASS_TCP, port) && !admits(PCLASS_UDP, port),
                "port {port}"
            );
        }
        for port in [1, 52, 54, 852, 854, 65535] {
            assert!(
                admits(PCLASS_TCP, port) && admits(PCLASS_UDP, port),
                "port {port}"
            );
        }
        // Without names, the wide rule keeps port 53.
        let mut plain = set.clone();
        plain.egress_rules.pop();
        let image = crate::compile::compile(&plain, &crate::compile::Limits::default()).unwrap();
        assert!(!image.dns_guard);
        assert!(portcullis_common::slot_admits(image.lookup(
            portcullis_common::DIR_EGRESS,
            addr,
            PCLASS_UDP,
            53
        )));
    }

    #[test]
    fn names_need_an_allowlist_and_valid_names() {
        let base =
            "[[egress_rules]]\nid = \"api\"\nfrom_port = 443\nto_port = 443\nprotocol = \"tcp\"\n";
        let with = |names: &str, egress: &str| {
            let text = format!("egress = \"{egress}\"\n{base}names = {names}\n");
            let set: crate::rules::RuleSet = toml::from_str(&text).unwrap();
            set.validate().map_err(|e| e.to_string())
        };
        assert!(with("[\"api.example.com\"]", "allowlist").is_ok());
        let e = with("[\"api.example.com\"]", "allow").unwrap_err();
        assert!(
            e.contains("egress_rules[0]") && e.contains("names") && e.contains("allowlist"),
            "{e}"
        );
        let e = with("[\"a.*.example.com\"]", "allowlist").unwrap_err();
        assert!(
            e.contains("a.*.example.com") && e.contains("wildcard"),
            "{e}"
        );
    }

    #[test]
    fn an_edited_rule_hashes_differently() {
        let a = rule(Protocol::Tcp, 443, 443);
        let mut b = a.clone();
        b.names.push("other.example.com".into());
        assert_ne!(rule_hash(&a), rule_hash(&b));
        assert_eq!(rule_hash(&a), rule_hash(&a.clone()));
    }
}
