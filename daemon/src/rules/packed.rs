//! The live rule set as the core keeps it between changes: each rule list
//! packed into one buffer, unpacked when a change needs the rules.
//!
//! A `FirewallRule` is 200 bytes before its strings, each string a heap
//! block of its own: 100k rules held 32 MB of heap. Packed (lengths as
//! varints, then the bytes; absent fields a bit in a flags byte; a network
//! written as the canonical text of an address, with or without a prefix
//! length, as its 5 or 17 bytes), the same rules are about 4 MB in two
//! allocations. The encoding is lossless (every string reads back as it
//! was sent, so `GET /v1/rules` shows what was put); [`encode`] names every
//! field of the rule, so a field added to `FirewallRule` does not compile
//! until it is packed too.

use std::{fmt::Write as _, net::IpAddr};

use super::{
    FirewallRule, Protocol, RuleSet,
    cidr::{quick_v4, quick_v6, write_v6},
};

/// A rule list whose text does not fit the packed form (more than 4 GiB).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the rules' text is more than 4 GiB: the daemon keeps no set that large")]
pub struct TooLarge;

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
    /// The places of the egress rules that name hosts, so a DNS answer
    /// unpacks those alone.
    named: Box<[u32]>,
}

/// One rule list: the rules' encodings one after another, and where each
/// ends.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct PackedList {
    bytes: Box<[u8]>,
    ends: Box<[u32]>,
}

impl PackedSet {
    /// Packs `set`; refuses a set whose rules' text is more than 4 GiB (a
    /// rule's place is a `u32`).
    pub fn pack(set: &RuleSet) -> Result<PackedSet, TooLarge> {
        Self::pack_over(set, None)
    }

    /// Whether `set` packs: refuses, as packing would, a set whose rules'
    /// text is more than 4 GiB, from an upper bound of what packing writes
    /// (one pass over the lengths). A set this passes packs without fail,
    /// so a change may pack it beside its writes to the kernel.
    pub fn fits(set: &RuleSet) -> Result<(), TooLarge> {
        fits_within(set, u64::from(u32::MAX))
    }

    /// Packs `set` where `self` is `previous` packed: a rule `previous` has
    /// at the same place, unchanged, is copied, not encoded again (adding
    /// one rule to 100k encodes one).
    pub fn repack(&self, previous: &RuleSet, set: &RuleSet) -> Result<PackedSet, TooLarge> {
        Self::pack_over(set, Some((self, previous)))
    }

    fn pack_over(
        set: &RuleSet,
        over: Option<(&PackedSet, &RuleSet)>,
    ) -> Result<PackedSet, TooLarge> {
        // The head's fields one by one: `..set.clone()` cloned the rules
        // too, to drop them (100k rules: tens of ms).
        let RuleSet {
            ingress_rules: _,
            egress_rules: _,
            cluster,
            ssh,
            egress,
        } = set;
        let head = RuleSet {
            ingress_rules: Vec::new(),
            egress_rules: Vec::new(),
            cluster: cluster.clone(),
            ssh: ssh.clone(),
            egress: *egress,
        };
        let ingress = over.map(|(p, r)| (&p.ingress, &r.ingress_rules[..]));
        let egress = over.map(|(p, r)| (&p.egress, &r.egress_rules[..]));
        Ok(PackedSet {
            head,
            ingress: PackedList::pack(&set.ingress_rules, ingress)?,
            egress: PackedList::pack(&set.egress_rules, egress)?,
            next_expiry: set
                .ingress_rules
                .iter()
                .chain(&set.egress_rules)
                .filter_map(FirewallRule::expires_at)
                .min(),
            named: (0u32..)
                .zip(&set.egress_rules)
                .filter(|(_, r)| !r.names.is_empty())
                .map(|(i, _)| i)
                .collect(),
        })
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
        !self.named.is_empty()
    }

    /// The egress rules that name hosts (unpacked alone).
    pub fn named_egress_rules(&self) -> impl Iterator<Item = FirewallRule> + '_ {
        self.named.iter().map(|&i| self.egress.rule(i as usize))
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
    /// Packs `rules`; `over`: this list as packed from those rules, whose
    /// unchanged rules are copied.
    fn pack(
        rules: &[FirewallRule],
        over: Option<(&PackedList, &[FirewallRule])>,
    ) -> Result<PackedList, TooLarge> {
        let mut bytes = Vec::new();
        let mut ends = Vec::with_capacity(rules.len());
        let mut text = String::new();
        for (i, rule) in rules.iter().enumerate() {
            let same = over
                .filter(|(_, old)| old.get(i) == Some(rule))
                .and_then(|(list, _)| list.bytes_of(i));
            match same {
                Some(old) => bytes.extend_from_slice(old),
                None => encode(rule, &mut bytes, &mut text),
            }
            ends.push(u32::try_from(bytes.len()).map_err(|_| TooLarge)?);
        }
        Ok(PackedList {
            bytes: bytes.into_boxed_slice(),
            ends: ends.into_boxed_slice(),
        })
    }

    /// The rules one by one.
    fn iter(&self) -> impl ExactSizeIterator<Item = FirewallRule> + '_ {
        (0..self.ends.len()).map(|i| self.rule(i))
    }

    /// The encoding of rule `i`.
    fn bytes_of(&self, i: usize) -> Option<&[u8]> {
        self.bytes.get(span(&self.ends, i)?)
    }

    /// Rule `i` (`i` < the list's length).
    fn rule(&self, i: usize) -> FirewallRule {
        let bytes = self.bytes_of(i).unwrap_or_default();
        // Only `encode` wrote these bytes: a rule that does not read back
        // is a bug here, and dropping it silently would lose a rule.
        #[allow(clippy::expect_used)]
        decode(&mut Reader(bytes)).expect("a packed rule reads back")
    }

    /// The rules, with room for one more: the copy an add edits takes
    /// its rule without moving the others.
    fn unpack(&self) -> Vec<FirewallRule> {
        let mut rules = Vec::with_capacity(self.ends.len() + 1);
        rules.extend(self.iter());
        rules
    }
}

/// Where item `i` is in a buffer of items one after another, `ends[i]`
/// where each ends.
pub(crate) fn span(ends: &[u32], i: usize) -> Option<std::ops::Range<usize>> {
    let from = i.checked_sub(1).map_or(Some(0), |p| ends.get(p).copied())?;
    let to = *ends.get(i)?;
    Some(from as usize..to as usize)
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

/// Appends `rule`'s encoding to `out` (`text`: a buffer to reuse).
fn encode(rule: &FirewallRule, out: &mut Vec<u8>, text: &mut String) {
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
    put_u32(out, ip_ranges.len() as u32);
    for s in ip_ranges {
        put_network(out, s, text);
    }
    for list in [names, icmp_types, interfaces] {
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

/// [`PackedSet::fits`] with lists of at most `limit` bytes.
fn fits_within(set: &RuleSet, limit: u64) -> Result<(), TooLarge> {
    for list in [&set.ingress_rules, &set.egress_rules] {
        let bound: u64 = list.iter().map(encoded_bound).sum();
        if bound > limit {
            return Err(TooLarge);
        }
    }
    Ok(())
}

/// At least the bytes [`encode`] writes for `rule`: each string as its
/// text after a varint (at most 5 bytes), each number a varint, a network
/// at most its text with a tag byte before it (its bytes form is used only
/// when shorter).
fn encoded_bound(rule: &FirewallRule) -> u64 {
    let FirewallRule {
        id,
        ip_ranges,
        names,
        icmp_types,
        interfaces,
        description,
        expires,
        ..
    } = rule;
    let text = |s: &String| 5 + s.len() as u64;
    let list = |l: &Vec<String>| 5 + l.iter().map(|s| 1 + text(s)).sum::<u64>();
    // Flags, protocol, the ports, rate and burst.
    let fixed = 2 + 4 * 5;
    fixed
        + text(id)
        + [ip_ranges, names, icmp_types, interfaces]
            .into_iter()
            .map(list)
            .sum::<u64>()
        + [description, expires]
            .into_iter()
            .flatten()
            .map(text)
            .sum::<u64>()
}

/// The rule `encode` wrote at the reader's place.
fn decode(r: &mut Reader<'_>) -> Option<FirewallRule> {
    let flags = r.byte()?;
    let protocol = protocol_of(r.byte()?)?;
    let id = r.string()?;
    let from_port = r.u32()?;
    let to_port = r.u32()?;
    let n = r.u32()? as usize;
    // No more networks than bytes left: a bad count cannot reserve much.
    let mut ip_ranges = Vec::with_capacity(n.min(r.0.len()));
    for _ in 0..n {
        ip_ranges.push(r.network()?);
    }
    let mut lists = [Vec::new(), Vec::new(), Vec::new()];
    for list in &mut lists {
        let n = r.u32()? as usize;
        // No more strings than bytes left: a bad count cannot reserve much.
        list.reserve_exact(n.min(r.0.len()));
        for _ in 0..n {
            list.push(r.string()?);
        }
    }
    let [names, icmp_types, interfaces] = lists;
    let description = if flags & HAS_DESCRIPTION != 0 {
        Some(r.string()?)
    } else {
        None
    };
    let expires = if flags & HAS_EXPIRES != 0 {
        Some(r.string()?)
    } else {
        None
    };
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

/// How an `ip_ranges` entry is written: its text, or the address (and
/// prefix length) that format back to exactly that text.
const TEXT: u8 = 0;
const ADDR4: u8 = 1;
const ADDR6: u8 = 2;
const NET4: u8 = 3;
const NET6: u8 = 4;

/// Appends one `ip_ranges` entry: as bytes when its text is what those
/// bytes format back to (checked here, so reading it back gives the same
/// text) and the bytes are shorter, else as its text.
fn put_network(out: &mut Vec<u8>, s: &str, text: &mut String) {
    // A canonical text formats back to itself (`quick_v4`, `quick_v6`):
    // no check. An IPv6 address is 16 bytes: `fd00::1` is shorter as text.
    if let Some((addr, len)) = quick_v4(s) {
        out.push(if len.is_some() { NET4 } else { ADDR4 });
        out.extend(len);
        out.extend_from_slice(&addr.octets());
        return;
    }
    if s.len() > 16
        && let Some((addr, len)) = quick_v6(s)
    {
        out.push(if len.is_some() { NET6 } else { ADDR6 });
        out.extend(len);
        out.extend_from_slice(&addr.octets());
        return;
    }
    let (addr, len) = match s.split_once('/') {
        Some((addr, len)) => match len.parse::<u8>() {
            Ok(len) => (addr, Some(len)),
            Err(_) => (s, None),
        },
        None => (s, None),
    };
    let ip = match addr.parse::<IpAddr>() {
        // An IPv6 address is 16 bytes: `fd00::1` is shorter as text.
        Ok(ip) if ip.is_ipv4() || s.len() > 16 => ip,
        _ => return put_text(out, s),
    };
    text.clear();
    write_ip(text, ip);
    if let Some(len) = len {
        let _ = write!(text, "/{len}");
    }
    // Any length reads back as written, in range or not.
    if text != s {
        return put_text(out, s);
    }
    out.push(match (ip, len) {
        (IpAddr::V4(_), None) => ADDR4,
        (IpAddr::V6(_), None) => ADDR6,
        (IpAddr::V4(_), Some(_)) => NET4,
        (IpAddr::V6(_), Some(_)) => NET6,
    });
    out.extend(len);
    match ip {
        IpAddr::V4(a) => out.extend_from_slice(&a.octets()),
        IpAddr::V6(a) => out.extend_from_slice(&a.octets()),
    }
}

fn put_text(out: &mut Vec<u8>, s: &str) {
    out.push(TEXT);
    put_str(out, s);
}

/// An address as the network's bytes read back: IPv4 as `Ipv4Addr`
/// displays it, IPv6 by [`write_v6`].
fn write_ip(out: &mut String, ip: IpAddr) {
    match ip {
        IpAddr::V4(a) => {
            let _ = write!(out, "{a}");
        }
        IpAddr::V6(a) => write_v6(out, a.octets()),
    }
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
            // The fifth byte holds the top four bits only.
            if shift == 28 && b > 0x0f {
                return None;
            }
            n |= u32::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Some(n);
            }
        }
        None
    }

    fn bytes<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (b, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*b)
    }

    /// An `ip_ranges` entry `put_network` wrote.
    fn network(&mut self) -> Option<String> {
        let tag = self.byte()?;
        if tag == TEXT {
            return self.string();
        }
        let len = match tag {
            NET4 | NET6 => Some(self.byte()?),
            _ => None,
        };
        let ip = match tag {
            ADDR4 | NET4 => IpAddr::from(self.bytes::<4>()?),
            ADDR6 | NET6 => IpAddr::from(self.bytes::<16>()?),
            _ => return None,
        };
        let mut out = String::with_capacity(44);
        write_ip(&mut out, ip);
        if let Some(len) = len {
            let _ = write!(out, "/{len}");
        }
        Some(out)
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
    use std::net::{Ipv4Addr, Ipv6Addr};

    use proptest::prelude::*;

    use super::*;
    use crate::compile::strategies;

    fn rule(id: &str) -> FirewallRule {
        FirewallRule {
            id: id.into(),
            from_port: 443,
            to_port: 443,
            ip_ranges: vec!["10.20.30.0/24".into(), "fd00:200:1234:5678::/64".into()],
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
            ip_ranges: vec![
                "10.0.0.1".into(),
                " 10.0.0.0/8".into(),
                "10.0.0.0/08".into(),
                "010.0.0.1".into(),
                "FD00::/8".into(),
                "fd00:0::1".into(),
                "fd00:200:1234:5678::/64".into(),
                "fd00:200:1234:5678:0::/64".into(),
                "2001:db8:0:1:2:3:4:5".into(),
                "2001:db8::1:2:3:4:5/128".into(),
                "::ffff:10.0.0.1".into(),
                "::".into(),
                "0.0.0.0/0".into(),
                "fd00::1/128".into(),
                "fd00::/129".into(),
                "10.0.0.0/33".into(),
                "example.org".into(),
                String::new(),
            ],
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
        let packed = PackedSet::pack(&set).unwrap();
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
        let packed = PackedSet::pack(&set).unwrap();
        let size = packed.ingress.bytes.len() + 4 * packed.ingress.ends.len();
        // Flags and protocol 2, id 7, ports 4, networks 1 + 6 + 18 (as
        // text: 15 + 25), three empty lists 3, its end 4.
        assert!(size <= 45 * 100_000, "{size} bytes");
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
        let packed = PackedSet::pack(&set).unwrap();
        assert!(!packed.has_expired(at - 1));
        assert!(packed.has_expired(at));
        assert_eq!(packed.has_expired(at), set.has_expired(at));
        assert!(
            !PackedSet::pack(&RuleSet::default())
                .unwrap()
                .has_expired(u64::MAX)
        );
    }

    #[test]
    fn a_truncated_rule_does_not_read_back() {
        let mut bytes = Vec::new();
        encode(&rule("a"), &mut bytes, &mut String::new());
        assert!(decode(&mut Reader(&bytes)).is_some());
        for end in 0..bytes.len() {
            assert_eq!(decode(&mut Reader(&bytes[..end])), None, "{end} bytes");
        }
        bytes.push(0);
        assert_eq!(decode(&mut Reader(&bytes)), None, "a byte too many");
    }

    /// Texts that parse as addresses and networks, canonical or not, and
    /// any other text.
    fn network_text() -> impl Strategy<Value = String> {
        prop_oneof![
            (any::<u32>(), 0u8..=40).prop_map(|(a, l)| format!("{}/{l}", Ipv4Addr::from(a))),
            any::<u32>().prop_map(|a| Ipv4Addr::from(a).to_string()),
            (any::<u128>(), 0u8..=140).prop_map(|(a, l)| format!("{}/{l}", Ipv6Addr::from(a))),
            any::<[u16; 8]>().prop_map(|g| {
                // Zeros for `::`, upper case and leading zeros for text
                // that parses but is not canonical.
                let g = g.map(|w| if w % 3 == 0 { 0 } else { w });
                format!(
                    "{:X}:{:04x}:{}:{}:{}:{}:{}:{}",
                    g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7]
                )
            }),
            any::<u128>().prop_map(|a| Ipv6Addr::from(a).to_string()),
            "\\PC{0,40}",
        ]
    }

    proptest! {
        #[test]
        fn addresses_are_written_as_the_standard_library_displays_them(
            a in any::<u128>(),
            zeros in any::<u8>(),
        ) {
            // Zero groups where `zeros` has a bit, for runs of every length.
            let mut octets = a.to_be_bytes();
            for g in 0..8 {
                if zeros & (1 << g) != 0 {
                    octets[2 * g] = 0;
                    octets[2 * g + 1] = 0;
                }
            }
            let v6 = Ipv6Addr::from(octets);
            if v6.to_ipv4_mapped().is_none() {
                let mut out = String::new();
                write_v6(&mut out, octets);
                prop_assert_eq!(out, v6.to_string());
            }
        }

        #[test]
        fn every_network_text_reads_back(texts in prop::collection::vec(network_text(), 0..6)) {
            let mut r = rule("a");
            r.ip_ranges = texts;
            let set = RuleSet { ingress_rules: vec![r], ..Default::default() };
            prop_assert_eq!(PackedSet::pack(&set).unwrap().unpack(), set);
        }

        #[test]
        fn a_set_packed_over_another_reads_back_whole(
            a in strategies::rule_set(),
            b in strategies::rule_set(),
        ) {
            // `b` over `a`, and `a` with rules added, changed and removed.
            let packed = PackedSet::pack(&a).unwrap();
            prop_assert_eq!(packed.repack(&a, &b).unwrap().unpack(), b.clone());
            let mut edited = a.clone();
            edited.ingress_rules.extend(b.ingress_rules.iter().cloned());
            if let Some(r) = edited.ingress_rules.first_mut() {
                r.to_port = r.from_port;
            }
            edited.egress_rules.pop();
            prop_assert_eq!(packed.repack(&a, &edited), PackedSet::pack(&edited));
        }

        #[test]
        fn a_rule_is_never_packed_longer_than_its_bound(
            set in strategies::rule_set(),
            texts in prop::collection::vec(network_text(), 0..6),
            description in proptest::option::of("\\PC{0,40}"),
            big in any::<bool>(),
        ) {
            let mut r = rule("b");
            r.ip_ranges = texts;
            r.description = description;
            if big {
                (r.from_port, r.to_port) = (u32::MAX, u32::MAX);
                (r.rate, r.burst) = (Some(u32::MAX), Some(u32::MAX));
            }
            let rules = set.ingress_rules.iter().chain(&set.egress_rules).chain([&r]);
            for r in rules {
                let mut out = Vec::new();
                encode(r, &mut out, &mut String::new());
                prop_assert!(encoded_bound(r) >= out.len() as u64, "{:?}: {} bytes", r, out.len());
            }
            // So a set that fits packs, and one over the limit is refused.
            let packed = PackedSet::pack(&set).unwrap();
            let longest = packed.ingress.bytes.len().max(packed.egress.bytes.len()) as u64;
            prop_assert_eq!(fits_within(&set, longest.saturating_sub(1)).is_err(), longest > 0);
        }

        #[test]
        fn sets_read_back_whole(set in strategies::rule_set()) {
            let packed = PackedSet::pack(&set).unwrap();
            prop_assert_eq!(packed.unpack(), set.clone());
            prop_assert_eq!(packed.has_names(), set.has_names());
            let named: Vec<FirewallRule> = set
                .egress_rules
                .iter()
                .filter(|r| !r.names.is_empty())
                .cloned()
                .collect();
            prop_assert_eq!(packed.named_egress_rules().collect::<Vec<_>>(), named);
            prop_assert_eq!(packed.egress_warnings(), set.egress_warnings());
            for now in [0, u64::MAX] {
                prop_assert_eq!(packed.has_expired(now), set.has_expired(now));
            }
        }
    }
}
