//! The live rule set as the core keeps it between changes: each rule list
//! packed into one buffer, unpacked when a change needs the rules.
//!
//! A `FirewallRule` is 200 bytes before its strings, each string a heap
//! block of its own: 100k rules held 32 MB of heap. Packed (lengths as
//! varints, then the bytes; absent fields a bit in a flags byte), the same
//! rules are about 5 MB in two allocations. The encoding is lossless (every
//! string is kept as it was sent, so `GET /v1/rules` shows what was put);
//! [`encode`] names every field of the rule, so a field added to
//! `FirewallRule` does not compile until it is packed too.

use super::{FirewallRule, Protocol, RuleSet};

/// A rule set with its rule lists packed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PackedSet {
    /// The set without its rules: the SSH exemption, the cluster, the
    /// egress policy.
    head: RuleSet,
    ingress: PackedList,
    egress: PackedList,
    /// The earliest `expires` of a rule (Unix seconds), so the once-a-second
    /// sweep asks a number, not 100k rules.
    next_expiry: Option<u64>,
    /// An egress rule names hosts (`RuleSet::has_names`).
    has_names: bool,
}

/// One rule list: the rules' encodings one after another, and where each
/// ends.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct PackedList {
    bytes: Box<[u8]>,
    ends: Box<[u32]>,
}

impl PackedSet {
    /// Packs `set`.
    pub fn pack(set: &RuleSet) -> PackedSet {
        let head = RuleSet {
            ingress_rules: Vec::new(),
            egress_rules: Vec::new(),
            ..set.clone()
        };
        PackedSet {
            head,
            ingress: PackedList::pack(&set.ingress_rules),
            egress: PackedList::pack(&set.egress_rules),
            next_expiry: set
                .ingress_rules
                .iter()
                .chain(&set.egress_rules)
                .filter_map(FirewallRule::expires_at)
                .min(),
            has_names: set.has_names(),
        }
    }

    /// The whole set again.
    pub fn unpack(&self) -> RuleSet {
        RuleSet {
            ingress_rules: self.ingress.unpack(),
            egress_rules: self.egress.unpack(),
            ..self.head.clone()
        }
    }

    /// The SSH exemption, the cluster and the egress policy: the set with
    /// its rule lists left out (they are empty here; [`PackedSet::unpack`]
    /// has them).
    pub fn head(&self) -> &RuleSet {
        &self.head
    }

    /// How many rules the two lists hold.
    pub fn len(&self) -> usize {
        self.ingress.ends.len() + self.egress.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether a rule has expired at `now` (`RuleSet::has_expired`).
    pub fn has_expired(&self, now: u64) -> bool {
        self.next_expiry.is_some_and(|t| t <= now)
    }

    /// Whether an egress rule names hosts (`RuleSet::has_names`).
    pub fn has_names(&self) -> bool {
        self.has_names
    }

    /// The egress rules (unpacked one by one).
    pub fn egress_rules(&self) -> impl Iterator<Item = FirewallRule> + '_ {
        self.egress.iter()
    }

    /// The ingress rules (unpacked one by one).
    pub fn ingress_rules(&self) -> impl Iterator<Item = FirewallRule> + '_ {
        self.ingress.iter()
    }

    /// Ingress rule `i` (unpacked alone).
    pub fn ingress_rule(&self, i: usize) -> Option<FirewallRule> {
        (i < self.ingress.ends.len()).then(|| self.ingress.rule(i))
    }

    /// The warnings `RuleSet::egress_warnings` gives for this set.
    pub fn egress_warnings(&self) -> Vec<String> {
        self.head.egress_warnings_for(self.egress.ends.len())
    }
}

impl PackedList {
    fn pack(rules: &[FirewallRule]) -> PackedList {
        let mut bytes = Vec::new();
        let mut ends = Vec::with_capacity(rules.len());
        for rule in rules {
            encode(rule, &mut bytes);
            ends.push(u32::try_from(bytes.len()).unwrap_or(u32::MAX));
        }
        PackedList {
            bytes: bytes.into_boxed_slice(),
            ends: ends.into_boxed_slice(),
        }
    }

    /// The rules one by one.
    fn iter(&self) -> impl ExactSizeIterator<Item = FirewallRule> + '_ {
        (0..self.ends.len()).map(|i| self.rule(i))
    }

    /// Rule `i` (`i` < the list's length).
    fn rule(&self, i: usize) -> FirewallRule {
        let from = i
            .checked_sub(1)
            .and_then(|p| self.ends.get(p))
            .copied()
            .unwrap_or(0);
        let to = self.ends.get(i).copied().unwrap_or(from);
        let bytes = self
            .bytes
            .get(from as usize..to as usize)
            .unwrap_or_default();
        // Only `encode` wrote these bytes: a rule that does not read back
        // is a bug here, and dropping it silently would lose a rule.
        #[allow(clippy::expect_used)]
        decode(&mut Reader(bytes)).expect("a packed rule reads back")
    }

    fn unpack(&self) -> Vec<FirewallRule> {
        self.iter().collect()
    }
}

const HAS_DESCRIPTION: u8 = 1;
const HAS_EXPIRES: u8 = 1 << 1;
const HAS_RATE: u8 = 1 << 2;
const HAS_BURST: u8 = 1 << 3;

fn protocol_byte(p: Protocol) -> u8 {
    match p {
        Protocol::TcpUdp => 0,
        Protocol::Tcp => 1,
        Protocol::Udp => 2,
        Protocol::Icmp => 3,
        Protocol::Any => 4,
    }
}

fn protocol_of(b: u8) -> Option<Protocol> {
    Some(match b {
        0 => Protocol::TcpUdp,
        1 => Protocol::Tcp,
        2 => Protocol::Udp,
        3 => Protocol::Icmp,
        4 => Protocol::Any,
        _ => return None,
    })
}

/// Appends `rule`'s encoding to `out`.
fn encode(rule: &FirewallRule, out: &mut Vec<u8>) {
    // Every field by name: a new one is a compile error here until packed.
    let FirewallRule {
        id,
        from_port,
        to_port,
        ip_ranges,
        names,
        protocol,
        description,
        icmp_types,
        expires,
        rate,
        burst,
        interfaces,
    } = rule;
    let flags = [
        (description.is_some(), HAS_DESCRIPTION),
        (expires.is_some(), HAS_EXPIRES),
        (rate.is_some(), HAS_RATE),
        (burst.is_some(), HAS_BURST),
    ]
    .iter()
    .filter(|(on, _)| *on)
    .fold(0, |f, (_, bit)| f | bit);
    out.push(flags);
    out.push(protocol_byte(*protocol));
    put_str(out, id);
    put_u32(out, *from_port);
    put_u32(out, *to_port);
    for list in [ip_ranges, names, icmp_types, interfaces] {
        put_u32(out, list.len() as u32);
        for s in list {
            put_str(out, s);
        }
    }
    for s in [description, expires].into_iter().flatten() {
        put_str(out, s);
    }
    for n in [rate, burst].into_iter().flatten() {
        put_u32(out, *n);
    }
}

/// The rule `encode` wrote at the reader's place.
fn decode(r: &mut Reader<'_>) -> Option<FirewallRule> {
    let flags = r.byte()?;
    let protocol = protocol_of(r.byte()?)?;
    let id = r.string()?;
    let from_port = r.u32()?;
    let to_port = r.u32()?;
    let mut lists = [Vec::new(), Vec::new(), Vec::new(), Vec::new()];
    for list in &mut lists {
        let n = r.u32()? as usize;
        // No more strings than bytes left: a bad count cannot reserve much.
        list.reserve_exact(n.min(r.0.len()));
        for _ in 0..n {
            list.push(r.string()?);
        }
    }
    let [ip_ranges, names, icmp_types, interfaces] = lists;
    let mut optional = |bit| (flags & bit != 0).then(|| r.string()).flatten();
    let description = optional(HAS_DESCRIPTION);
    let expires = optional(HAS_EXPIRES);
    let rate = if flags & HAS_RATE != 0 {
        Some(r.u32()?)
    } else {
        None
    };
    let burst = if flags & HAS_BURST != 0 {
        Some(r.u32()?)
    } else {
        None
    };
    r.0.is_empty().then_some(FirewallRule {
        id,
        from_port,
        to_port,
        ip_ranges,
        names,
        protocol,
        description,
        icmp_types,
        expires,
        rate,
        burst,
        interfaces,
    })
}

/// LEB128: seven bits a byte, low first.
fn put_u32(out: &mut Vec<u8>, mut n: u32) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_u32(out, s.len() as u32);
    out.extend_from_slice(s.as_bytes());
}

/// The bytes of one rule not read yet.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }

    fn u32(&mut self) -> Option<u32> {
        let mut n = 0u32;
        for shift in (0..35).step_by(7) {
            let b = self.byte()?;
            n |= u32::from(b & 0x7f).checked_shl(shift)?;
            if b & 0x80 == 0 {
                return Some(n);
            }
        }
        None
    }

    fn string(&mut self) -> Option<String> {
        let len = self.u32()? as usize;
        if len > self.0.len() {
            return None;
        }
        let (s, rest) = self.0.split_at(len);
        self.0 = rest;
        String::from_utf8(s.to_vec()).ok()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::compile::strategies;

    fn rule(id: &str) -> FirewallRule {
        FirewallRule {
            id: id.into(),
            from_port: 443,
            to_port: 443,
            ip_ranges: vec!["10.0.0.0/8".into(), "fd00::1".into()],
            names: Vec::new(),
            protocol: Protocol::Tcp,
            description: None,
            icmp_types: Vec::new(),
            expires: None,
            rate: None,
            burst: None,
            interfaces: Vec::new(),
        }
    }

    #[test]
    fn every_field_reads_back_as_it_was_sent() {
        let full = FirewallRule {
            id: "é-ü".into(),
            from_port: 0,
            to_port: u32::MAX,
            ip_ranges: vec!["10.0.0.1".into(), " 10.0.0.0/8".into()],
            names: vec!["*.example.org".into()],
            protocol: Protocol::Any,
            description: Some(String::new()),
            icmp_types: vec!["echo-request".into(), "icmpv6:128".into()],
            expires: Some("2026-12-01T10:00:00Z".into()),
            rate: Some(1_000_000),
            burst: Some(0),
            interfaces: vec!["eth1".into()],
        };
        let set = RuleSet {
            ingress_rules: vec![rule("a"), full.clone(), rule("b")],
            egress_rules: vec![full],
            ..Default::default()
        };
        let packed = PackedSet::pack(&set);
        assert_eq!(packed.unpack(), set);
        assert_eq!(packed.len(), 4);
        assert!(packed.has_names());
        assert!(packed.head().ingress_rules.is_empty());
    }

    #[test]
    fn a_hundred_thousand_rules_take_a_few_bytes_each() {
        let set = RuleSet {
            ingress_rules: (0..100_000).map(|i| rule(&format!("r{i}"))).collect(),
            ..Default::default()
        };
        let packed = PackedSet::pack(&set);
        let size = packed.ingress.bytes.len() + 4 * packed.ingress.ends.len();
        assert!(size < 40 * 100_000, "{size} bytes");
        assert_eq!(packed.unpack(), set);
    }

    #[test]
    fn the_earliest_expiry_answers_the_sweep() {
        let mut a = rule("a");
        a.expires = Some("2026-12-01T10:00:00Z".into());
        let at = a.expires_at().unwrap_or_default();
        let set = RuleSet {
            egress_rules: vec![rule("b"), a],
            ..Default::default()
        };
        let packed = PackedSet::pack(&set);
        assert!(!packed.has_expired(at - 1));
        assert!(packed.has_expired(at));
        assert_eq!(packed.has_expired(at), set.has_expired(at));
        assert!(!PackedSet::pack(&RuleSet::default()).has_expired(u64::MAX));
    }

    #[test]
    fn a_truncated_rule_does_not_read_back() {
        let mut bytes = Vec::new();
        encode(&rule("a"), &mut bytes);
        assert!(decode(&mut Reader(&bytes)).is_some());
        for end in 0..bytes.len() {
            assert_eq!(decode(&mut Reader(&bytes[..end])), None, "{end} bytes");
        }
        bytes.push(0);
        assert_eq!(decode(&mut Reader(&bytes)), None, "a byte too many");
    }

    proptest! {
        #[test]
        fn sets_read_back_whole(set in strategies::rule_set()) {
            let packed = PackedSet::pack(&set);
            prop_assert_eq!(packed.unpack(), set.clone());
            prop_assert_eq!(packed.has_names(), set.has_names());
            prop_assert_eq!(packed.egress_warnings(), set.egress_warnings());
            for now in [0, u64::MAX] {
                prop_assert_eq!(packed.has_expired(now), set.has_expired(now));
            }
        }
    }
}
