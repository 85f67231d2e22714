//! Deny sets (pure): named sets of IPv4/IPv6 prefixes with optional
//! expiries, the set files they load from, and what the data path's deny
//! tries must hold for them.
//!
//! Every prefix is stored as given (an address is its /32 or /128; to ban an
//! IPv6 host's whole /64, give the /64). The tries hold one value per
//! prefix, while several sets (or a shorter prefix in any set) may cover
//! it: the value written for a prefix is its *effective* ban, the latest
//! expiry of every entry, in any set, for that prefix or a shorter one that
//! covers it (no expiry beats every time). So when a long prefix's own ban
//! expires, the data path (which sees only the longest match) still bans it
//! while a covering one does: an expiry never lifts more than it should.

use std::collections::BTreeMap;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Longest line a set file may hold (a prefix with a comment fits easily).
pub const MAX_LINE: usize = 512;
/// Set names: 1 to 64 of `[A-Za-z0-9_.-]`.
pub const MAX_NAME: usize = 64;

/// The set the rate limiter's bans are listed as (`[rate_limit]
/// ban_seconds`); written by the data path, not through the API.
pub const RATELIMIT_SET: &str = "ratelimit";

/// A set name, checked.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "deny set name {name:?}: use 1 to {MAX_NAME} letters, digits, '_', '-' or '.' (not first)"
        ))
    }
}

/// One prefix: `ADDRESS` (its /32 or /128) or `ADDRESS/LEN` with no host
/// bits set (a typo that would ban a wider or other network is refused).
pub fn parse_prefix(text: &str) -> Result<IpNet, String> {
    let text = text.trim();
    let net = if text.contains('/') {
        text.parse::<IpNet>()
            .map_err(|_| format!("{text:?} is not an IPv4 or IPv6 prefix"))?
    } else {
        let ip = text
            .parse::<std::net::IpAddr>()
            .map_err(|_| format!("{text:?} is not an IPv4 or IPv6 address or prefix"))?;
        IpNet::from(ip)
    };
    let net = match net {
        IpNet::V6(v6) => match v6.addr().to_ipv4_mapped() {
            Some(_) => return Err(format!("{text:?}: give IPv4-mapped addresses as IPv4")),
            None => IpNet::V6(v6),
        },
        v4 => v4,
    };
    if net.trunc() != net {
        return Err(format!(
            "{text:?} has host bits set (the network is {})",
            net.trunc()
        ));
    }
    Ok(net)
}

/// A bad line of a set file: its number (from 1) and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileError {
    pub line: usize,
    pub message: String,
}

impl std::fmt::Display for FileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

/// A set file: one prefix a line; `#` and `;` start a comment (Spamhaus
/// DROP: `1.2.3.0/24 ; SBL123`); blank lines are skipped. Any bad line
/// (not UTF-8, longer than [`MAX_LINE`], more than a prefix) rejects the
/// whole file, naming the first such line.
pub fn parse_file(bytes: &[u8]) -> Result<Vec<IpNet>, FileError> {
    let mut out = Vec::new();
    for (index, raw) in bytes.split(|b| *b == b'\n').enumerate() {
        let line = index + 1;
        let bad = |message: String| FileError { line, message };
        if raw.len() > MAX_LINE {
            return Err(bad(format!(
                "{} bytes long (at most {MAX_LINE})",
                raw.len()
            )));
        }
        let text = std::str::from_utf8(raw).map_err(|_| bad("not UTF-8 text".into()))?;
        if text
            .chars()
            .any(|c| c.is_control() && c != '\r' && c != '\t')
        {
            return Err(bad("holds control characters".into()));
        }
        let text = text.split(['#', ';']).next().unwrap_or_default().trim();
        if text.is_empty() {
            continue;
        }
        if text.split_whitespace().count() > 1 {
            return Err(bad(format!("{text:?}: one prefix a line")));
        }
        out.push(parse_prefix(text).map_err(bad)?);
    }
    Ok(out)
}

/// Parses a duration: `90`, `90s`, `15m`, `2h`, `7d` (whole units).
pub fn parse_duration(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (digits, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (e.g. 90s, 15m, 2h, 7d)"))?;
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("{text:?}: unit must be s, m, h or d")),
    };
    n.checked_mul(scale)
        .filter(|s| *s > 0)
        .ok_or_else(|| format!("{text:?} is out of range"))
}

/// When a ban ends: Unix seconds, or never.
pub type Expiry = Option<u64>;

/// One entry to add: a prefix and its expiry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub prefix: IpNet,
    /// Unix seconds; absent: until removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Expiry,
}

/// One named set.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Set {
    /// Its index in the data path's `DENY_STATS` and entry values.
    pub id: u32,
    pub entries: BTreeMap<IpNet, Expiry>,
}

impl Set {
    /// The entries of `prefixes` this set holds, with their expiries (what
    /// a removal takes away, so it can be put back).
    pub fn held(&self, prefixes: &[IpNet]) -> Vec<Entry> {
        prefixes
            .iter()
            .filter_map(|p| {
                self.entries.get(p).map(|&expires| Entry {
                    prefix: *p,
                    expires,
                })
            })
            .collect()
    }
}

/// The value the data path's trie holds for a prefix: the set that bans it
/// longest and until when.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Effective {
    pub set: u32,
    pub expires: Expiry,
}

/// Later of two expiries (`None`, never, is latest).
fn later(a: Expiry, b: Expiry) -> bool {
    match (a, b) {
        (None, _) => false,
        (Some(_), None) => true,
        (Some(a), Some(b)) => a < b,
    }
}

/// Every set, and an index by prefix of who holds it.
#[derive(Clone, Debug)]
pub struct Sets {
    sets: BTreeMap<String, Set>,
    /// prefix -> (set id -> expiry), across sets.
    holders: BTreeMap<IpNet, BTreeMap<u32, Expiry>>,
    /// Prefixes held, per length, per family: to keep `lengths` exact.
    per_length: [[u64; 129]; 2],
}

impl Default for Sets {
    fn default() -> Self {
        Sets {
            sets: BTreeMap::new(),
            holders: BTreeMap::new(),
            per_length: [[0; 129]; 2],
        }
    }
}

fn family(p: &IpNet) -> usize {
    usize::from(matches!(p, IpNet::V6(_)))
}

impl Sets {
    /// Built from saved sets (ids as saved).
    pub fn from_sets(sets: BTreeMap<String, Set>) -> Self {
        let mut out = Sets::default();
        for set in sets.values() {
            for (prefix, expires) in &set.entries {
                out.hold(set.id, *prefix, *expires);
            }
        }
        out.sets = sets;
        out
    }

    pub fn sets(&self) -> &BTreeMap<String, Set> {
        &self.sets
    }

    pub fn get(&self, name: &str) -> Option<&Set> {
        self.sets.get(name)
    }

    /// The set `name`, created (with the lowest free id) if missing.
    pub fn ensure(&mut self, name: &str, max_sets: u32) -> Result<u32, String> {
        check_name(name)?;
        if name == RATELIMIT_SET {
            return Err(format!(
                "deny set name {name:?} is reserved for the rate limiter's bans ([rate_limit] ban_seconds)"
            ));
        }
        if let Some(s) = self.sets.get(name) {
            return Ok(s.id);
        }
        let used: std::collections::BTreeSet<u32> = self.sets.values().map(|s| s.id).collect();
        let id = (0..max_sets)
            .find(|i| !used.contains(i))
            .ok_or_else(|| format!("at most {max_sets} deny sets"))?;
        self.sets.insert(
            name.to_string(),
            Set {
                id,
                entries: BTreeMap::new(),
            },
        );
        Ok(id)
    }

    /// The set `name` with id `id` (to put back a set just removed).
    pub fn ensure_id(&mut self, name: &str, id: u32) -> Result<(), String> {
        check_name(name)?;
        if self.sets.values().any(|s| s.id == id) && self.sets.get(name).is_none_or(|s| s.id != id)
        {
            return Err(format!("deny set id {id} is taken"));
        }
        self.sets.entry(name.to_string()).or_insert(Set {
            id,
            entries: BTreeMap::new(),
        });
        Ok(())
    }

    /// Removes the set `name` if it holds nothing.
    pub fn drop_if_empty(&mut self, name: &str) {
        if self.sets.get(name).is_some_and(|s| s.entries.is_empty()) {
            self.sets.remove(name);
        }
    }

    fn hold(&mut self, id: u32, prefix: IpNet, expires: Expiry) {
        let h = self.holders.entry(prefix).or_default();
        if h.insert(id, expires).is_none() && h.len() == 1 {
            self.count_length(&prefix, true);
        }
    }

    fn count_length(&mut self, p: &IpNet, add: bool) {
        let len = usize::from(p.prefix_len());
        if let Some(n) = self
            .per_length
            .get_mut(family(p))
            .and_then(|a| a.get_mut(len))
        {
            if add {
                *n += 1;
            } else {
                *n = n.saturating_sub(1);
            }
        }
    }

    /// Adds (or re-times) `entries` in set `id`'s `name`; returns the
    /// prefixes whose trie value may have changed.
    pub fn add(&mut self, name: &str, entries: &[Entry]) -> Vec<IpNet> {
        let Some(id) = self.sets.get(name).map(|s| s.id) else {
            return Vec::new();
        };
        let mut touched = Vec::new();
        for e in entries {
            self.hold(id, e.prefix, e.expires);
            if let Some(s) = self.sets.get_mut(name) {
                s.entries.insert(e.prefix, e.expires);
            }
            touched.extend(self.within(&e.prefix));
        }
        touched
    }

    /// Removes `prefixes` from set `name` (absent ones are ignored); returns
    /// the prefixes whose trie value may have changed.
    pub fn remove(&mut self, name: &str, prefixes: &[IpNet]) -> Vec<IpNet> {
        let Some(set) = self.sets.get_mut(name) else {
            return Vec::new();
        };
        let id = set.id;
        let mut gone = Vec::new();
        for p in prefixes {
            if set.entries.remove(p).is_some() {
                gone.push(*p);
            }
        }
        let mut touched = Vec::new();
        for p in gone {
            if let Some(h) = self.holders.get_mut(&p) {
                h.remove(&id);
                if h.is_empty() {
                    self.holders.remove(&p);
                    self.count_length(&p, false);
                }
            }
            touched.push(p);
            touched.extend(self.within(&p));
        }
        touched
    }

    /// Entries of every set whose expiry is at or before `now`.
    pub fn expired(&self, now: u64) -> Vec<(String, IpNet)> {
        self.sets
            .iter()
            .flat_map(|(name, s)| {
                s.entries
                    .iter()
                    .filter(move |(_, e)| e.is_some_and(|t| t <= now))
                    .map(move |(p, _)| (name.clone(), *p))
            })
            .collect()
    }

    /// The held prefixes inside `p` (itself included).
    fn within(&self, p: &IpNet) -> Vec<IpNet> {
        let (lo, hi) = match p {
            IpNet::V4(n) => (
                IpNet::V4(ipnet::Ipv4Net::new_assert(n.network(), 0)),
                IpNet::V4(ipnet::Ipv4Net::new_assert(n.broadcast(), 32)),
            ),
            IpNet::V6(n) => (
                IpNet::V6(ipnet::Ipv6Net::new_assert(n.network(), 0)),
                IpNet::V6(ipnet::Ipv6Net::new_assert(n.broadcast(), 128)),
            ),
        };
        self.holders
            .range(lo..=hi)
            .map(|(q, _)| *q)
            .filter(|q| p.contains(q))
            .collect()
    }

    /// What the trie must hold for `p`: `None` when no set holds `p` itself
    /// (the key is absent); else the latest ban of `p` and of every held
    /// prefix covering it.
    pub fn effective(&self, p: &IpNet) -> Option<Effective> {
        let own = self.holders.get(p)?;
        let mut best: Option<Effective> = None;
        let mut consider = |h: &BTreeMap<u32, Expiry>| {
            for (set, expires) in h {
                if best.is_none_or(|b| later(b.expires, *expires)) {
                    best = Some(Effective {
                        set: *set,
                        expires: *expires,
                    });
                }
            }
        };
        consider(own);
        let present = self.per_length.get(family(p));
        for len in 0..p.prefix_len() {
            if present
                .and_then(|a| a.get(usize::from(len)))
                .is_none_or(|n| *n == 0)
            {
                continue;
            }
            let up = match p {
                IpNet::V4(n) => n.supernet_to(len),
                IpNet::V6(n) => n.supernet_to(len),
            };
            if let Some(h) = up.and_then(|q| self.holders.get(&q)) {
                consider(h);
            }
        }
        best
    }

    /// [`Sets::effective`] of every held prefix at once, in one ordered
    /// pass (a stack of the prefixes enclosing the current one): for bulk
    /// changes, where asking prefix by prefix would walk every shorter
    /// length of each.
    pub fn effective_all(&self) -> BTreeMap<IpNet, Effective> {
        let mut out = BTreeMap::new();
        let mut stack: Vec<(IpNet, Effective)> = Vec::new();
        for (p, holders) in &self.holders {
            while stack.last().is_some_and(|(q, _)| !q.contains(p)) {
                stack.pop();
            }
            let mut best = stack.last().map(|(_, e)| *e);
            for (set, expires) in holders {
                if best.is_none_or(|b| later(b.expires, *expires)) {
                    best = Some(Effective {
                        set: *set,
                        expires: *expires,
                    });
                }
            }
            if let Some(e) = best {
                out.insert(*p, e);
                stack.push((*p, e));
            }
        }
        out
    }

    /// Whether a held prefix (any set) covers `ip`.
    pub fn covers(&self, ip: std::net::IpAddr) -> bool {
        let host = IpNet::from(ip.to_canonical());
        let present = self.per_length.get(family(&host));
        (0..=host.prefix_len()).any(|len| {
            present
                .and_then(|a| a.get(usize::from(len)))
                .is_some_and(|n| *n > 0)
                && match host {
                    IpNet::V4(n) => n.supernet_to(len),
                    IpNet::V6(n) => n.supernet_to(len),
                }
                .is_some_and(|q| self.holders.contains_key(&q))
        })
    }

    /// The set whose ban the data path applies to `ip`: the value the trie
    /// holds for the longest held prefix covering it.
    pub fn banning(&self, ip: std::net::IpAddr) -> Option<u32> {
        let host = IpNet::from(ip.to_canonical());
        let present = self.per_length.get(family(&host));
        let longest = (0..=host.prefix_len()).rev().find_map(|len| {
            present
                .and_then(|a| a.get(usize::from(len)))
                .is_some_and(|n| *n > 0)
                .then(|| match host {
                    IpNet::V4(n) => n.supernet_to(len),
                    IpNet::V6(n) => n.supernet_to(len),
                })
                .flatten()
                .filter(|q| self.holders.contains_key(q))
        })?;
        self.effective(&longest).map(|e| e.set)
    }

    /// Every held prefix, for a full rewrite of the tries.
    pub fn prefixes(&self) -> impl Iterator<Item = &IpNet> {
        self.holders.keys()
    }

    /// The sets as saved.
    pub fn to_saved(&self) -> &BTreeMap<String, Set> {
        &self.sets
    }
}

/// `n`'s supernet of length `len` (for both families).
trait SupernetTo: Sized {
    fn supernet_to(&self, len: u8) -> Option<IpNet>;
}

impl SupernetTo for ipnet::Ipv4Net {
    fn supernet_to(&self, len: u8) -> Option<IpNet> {
        ipnet::Ipv4Net::new(self.network(), len)
            .ok()
            .map(|n| IpNet::V4(n.trunc()))
    }
}

impl SupernetTo for ipnet::Ipv6Net {
    fn supernet_to(&self, len: u8) -> Option<IpNet> {
        ipnet::Ipv6Net::new(self.network(), len)
            .ok()
            .map(|n| IpNet::V6(n.trunc()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn net(s: &str) -> IpNet {
        parse_prefix(s).unwrap()
    }

    #[test]
    fn prefixes_are_stored_as_given_and_host_bits_refused() {
        assert_eq!(net("192.0.2.7"), "192.0.2.7/32".parse().unwrap());
        assert_eq!(net("2001:db8::1"), "2001:db8::1/128".parse().unwrap());
        assert_eq!(
            net("2001:db8:1:2::/64"),
            "2001:db8:1:2::/64".parse().unwrap()
        );
        assert!(
            parse_prefix("192.0.2.7/24")
                .unwrap_err()
                .contains("192.0.2.0/24")
        );
        assert!(parse_prefix("::ffff:1.2.3.4").is_err());
        assert!(parse_prefix("1.2.3").is_err());
    }

    #[test]
    fn spamhaus_drop_format_parses() {
        let text = b"; Spamhaus DROP List 2026/11/30\n; Expires: ...\n1.10.16.0/20 ; SBL256894\n\n# other\n2001:db8::/32\r\n  5.6.7.8  # one host\n";
        let got = parse_file(text).unwrap();
        assert_eq!(
            got,
            vec![net("1.10.16.0/20"), net("2001:db8::/32"), net("5.6.7.8")]
        );
    }

    #[test]
    fn a_bad_line_rejects_the_file_naming_it() {
        let bad3 = b"1.2.3.0/24\n# c\n1.2.3.999\n4.5.6.0/24\n7.8.9.0/24\n";
        assert_eq!(parse_file(bad3).unwrap_err().line, 3);
        let mut huge = b"1.2.3.0/24\n".to_vec();
        huge.extend(std::iter::repeat_n(b'9', 10_000));
        let e = parse_file(&huge).unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.message.contains("bytes long"), "{e}");
        assert_eq!(
            parse_file(b"1.2.3.4\n\xff\xfe\x00junk\n").unwrap_err().line,
            2
        );
        assert_eq!(parse_file(b"1.2.3.4 5.6.7.8\n").unwrap_err().line, 1);
        assert_eq!(parse_file(b"1.2.3.4\x00\n").unwrap_err().line, 1);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("2s"), Ok(2));
        assert_eq!(parse_duration("90"), Ok(90));
        assert_eq!(parse_duration("1h"), Ok(3600));
        assert_eq!(parse_duration("7d"), Ok(604800));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("1w").is_err());
        assert!(parse_duration("h").is_err());
    }

    /// Issue 19: the set a drop record names is the one the trie applies.
    #[test]
    fn the_banning_set_is_the_longest_held_prefixs_value() {
        let mut s = Sets::default();
        s.ensure("a", 4).unwrap();
        s.ensure("b", 4).unwrap();
        let entry = |p: &str, expires| Entry {
            prefix: net(p),
            expires,
        };
        s.add("a", &[entry("10.0.0.0/8", Some(100))]);
        s.add("b", &[entry("10.1.2.0/24", None)]);
        let ip = |a: &str| a.parse::<std::net::IpAddr>().unwrap();
        assert_eq!(s.banning(ip("10.9.9.9")), Some(0));
        assert_eq!(s.banning(ip("10.1.2.3")), Some(1));
        assert_eq!(s.banning(ip("192.0.2.1")), None);
        assert_eq!(s.banning(ip("::ffff:10.9.9.9")), Some(0));
    }

    #[test]
    fn a_covering_ban_outlives_an_expiring_longer_one() {
        let mut s = Sets::default();
        s.ensure("a", 4).unwrap();
        s.ensure("b", 4).unwrap();
        s.add(
            "a",
            &[Entry {
                prefix: net("10.0.0.0/8"),
                expires: None,
            }],
        );
        s.add(
            "b",
            &[Entry {
                prefix: net("10.1.2.3"),
                expires: Some(100),
            }],
        );
        // The /32's value carries the /8's "never" and set a.
        assert_eq!(
            s.effective(&net("10.1.2.3")),
            Some(Effective {
                set: 0,
                expires: None
            })
        );
        // Removing the /8 leaves the /32 with its own expiry.
        let touched = s.remove("a", &[net("10.0.0.0/8")]);
        assert!(touched.contains(&net("10.1.2.3")));
        assert_eq!(s.effective(&net("10.0.0.0/8")), None);
        assert_eq!(
            s.effective(&net("10.1.2.3")),
            Some(Effective {
                set: 1,
                expires: Some(100)
            })
        );
        assert_eq!(s.expired(100), vec![("b".to_string(), net("10.1.2.3"))]);
    }

    #[test]
    fn set_ids_are_bounded_and_reused() {
        let mut s = Sets::default();
        assert_eq!(s.ensure("a", 2), Ok(0));
        assert_eq!(s.ensure("b", 2), Ok(1));
        assert!(s.ensure("c", 2).is_err());
        s.drop_if_empty("a");
        assert_eq!(s.ensure("c", 2), Ok(0));
        assert!(s.ensure("../x", 2).is_err());
        assert!(s.ensure("", 2).is_err());
    }

    proptest! {
        /// Whatever the lines, the parser either accepts every one or names
        /// the first bad line; never a panic, never a partial result.
        #[test]
        fn parse_file_is_all_or_nothing(lines in proptest::collection::vec(
            prop_oneof![
                Just("10.0.0.0/8".to_string()),
                Just("# comment".to_string()),
                Just("2001:db8::/48 ; SBL1".to_string()),
                "[ -~]{0,40}",
                proptest::collection::vec(any::<u8>(), 0..20).prop_map(|b| String::from_utf8_lossy(&b).replace('\n', " ")),
            ], 0..12)) {
            let text = lines.join("\n");
            match parse_file(text.as_bytes()) {
                Ok(got) => {
                    let expected: usize = lines.iter().filter(|l| {
                        !l.split(['#', ';']).next().unwrap_or_default().trim().is_empty()
                    }).count();
                    prop_assert_eq!(got.len(), expected);
                }
                Err(e) => {
                    prop_assert!(e.line >= 1 && e.line <= lines.len().max(1));
                    // Every line before it is fine on its own.
                    let before = lines[..e.line - 1].join("\n");
                    prop_assert!(parse_file(before.as_bytes()).is_ok());
                }
            }
        }

        /// The effective ban of a prefix is the latest of every entry for it
        /// or a shorter prefix covering it, across sets.
        #[test]
        fn effective_is_the_latest_covering_ban(entries in proptest::collection::vec(
            (0u8..2, 0u32..4, 0u8..=32, proptest::option::of(1u64..5)), 1..20)) {
            let mut s = Sets::default();
            s.ensure("a", 4).unwrap();
            s.ensure("b", 4).unwrap();
            let mut all = Vec::new();
            for (set, addr, len, expires) in entries {
                let p = IpNet::V4(ipnet::Ipv4Net::new(std::net::Ipv4Addr::from(addr << 30), len).unwrap().trunc());
                let name = if set == 0 { "a" } else { "b" };
                s.add(name, &[Entry { prefix: p, expires }]);
                all.retain(|(n, q, _)| !(n == &name && q == &p));
                all.push((name, p, expires));
            }
            let bulk = s.effective_all();
            for (_, p, _) in &all {
                // Equal expiries may name either set.
                prop_assert_eq!(bulk.get(p).map(|e| e.expires), s.effective(p).map(|e| e.expires));
                let want = all.iter().filter(|(_, q, _)| q.contains(p)).map(|(_, _, e)| *e)
                    .try_fold(0u64, |acc, e| e.map(|b| acc.max(b)));
                prop_assert_eq!(s.effective(p).map(|e| e.expires), Some(want));
            }
        }
    }
}
