//! The CrowdSec bouncer protocol (pure): the `[crowdsec]` section, the
//! Local API's decision stream (`GET /v1/decisions/stream`), Go duration
//! strings, and which decisions become which deny-set entries.
//!
//! Only `type = ban` decisions of scope `Ip` or `Range` (any case) are
//! taken; others (captcha, country, AS...) are ignored. A decision's
//! duration becomes its entry's expiry. [`Tracker`] keeps the decisions by
//! id and by prefix: a deletion lifts a prefix's ban only when no other
//! decision the bouncer knows still holds that prefix (a covering range
//! keeps an address banned by the data path's longest-prefix match). The
//! LAPI sends one decision per value at start-up and may name, in a
//! deletion, a decision the bouncer never saw; whenever a deletion leaves
//! doubt (an unknown id, or other decisions still held for the prefix),
//! the tracker asks for a full pull (`startup=true`), which reconciles.

use std::{
    borrow::Cow,
    collections::{BTreeMap, BTreeSet},
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::denylist::{self, Entry};

/// Largest stream response read (bytes): about a million decisions.
pub const MAX_RESPONSE: usize = 256 << 20;
/// Most decisions one response may carry (new and deleted together).
pub const MAX_DECISIONS: usize = 2 << 20;
/// Longest decision value accepted (an IPv6 prefix is at most 43 bytes).
pub const MAX_VALUE: usize = 64;

fn default_poll() -> String {
    "10s".into()
}

fn default_set() -> String {
    "crowdsec".into()
}

fn default_v4() -> u8 {
    16
}

fn default_v6() -> u8 {
    32
}

/// `[crowdsec]`: the Local API to pull ban decisions from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CrowdSecConfig {
    /// The LAPI's base URL, `http://HOST:PORT` (e.g. `http://127.0.0.1:8080`)
    /// or `https://HOST:PORT` (then `ca_file` is required).
    pub url: String,
    /// A file holding the bouncer's API key (`cscli bouncers add NAME`):
    /// owned by root, writable by root only and readable by no others.
    pub api_key_file: std::path::PathBuf,
    /// How often to poll for new and deleted decisions (`10s`, `1m`).
    #[serde(default = "default_poll")]
    pub poll_interval: String,
    /// The deny set the decisions go to.
    #[serde(default = "default_set")]
    pub set: String,
    /// Shortest IPv4 and IPv6 range taken; broader ones are refused (each
    /// logged) so a hostile or mistaken decision cannot ban half the world.
    #[serde(default = "default_v4")]
    pub shortest_v4: u8,
    #[serde(default = "default_v6")]
    pub shortest_v6: u8,
    /// For an `https://` URL: the PEM certificate(s) of the CA that signed
    /// the LAPI's certificate; no other root is trusted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<std::path::PathBuf>,
    /// Allow plain `http://` to a LAPI that is not on loopback. Off by
    /// default: anyone on the path could read the key and answer in the
    /// LAPI's name (an empty full pull lifts every ban of the set).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure_plain_http: bool,
}

impl CrowdSecConfig {
    /// Checks every field; the poll interval in seconds.
    pub fn validate(&self) -> Result<u64, String> {
        let url = parse_url(&self.url)?;
        match (&self.ca_file, url.tls) {
            (None, true) => {
                return Err(
                    "crowdsec: ca_file: an https url needs the LAPI's certificate or CA".into(),
                );
            }
            (Some(_), false) => return Err("crowdsec: ca_file: only for an https url".into()),
            (Some(f), true) if !f.is_absolute() => {
                return Err(format!(
                    "crowdsec: ca_file: {} is not an absolute path",
                    f.display()
                ));
            }
            _ => {}
        }
        if !url.tls && !is_loopback(&url.host) && !self.insecure_plain_http {
            return Err(format!(
                "crowdsec: url: plain http to {} (not loopback) would let anyone on the path read the key and lift every ban; use https with ca_file, or set insecure_plain_http = true",
                url.host
            ));
        }
        denylist::check_name(&self.set).map_err(|e| format!("crowdsec: set: {e}"))?;
        if !self.api_key_file.is_absolute() {
            return Err(format!(
                "crowdsec: api_key_file: {} is not an absolute path",
                self.api_key_file.display()
            ));
        }
        if self.shortest_v4 > 32 || self.shortest_v6 > 128 {
            return Err("crowdsec: shortest_v4 is at most 32, shortest_v6 at most 128".into());
        }
        let secs = denylist::parse_duration(&self.poll_interval)
            .map_err(|e| format!("crowdsec: poll_interval: {e}"))?;
        if secs > 3600 {
            return Err("crowdsec: poll_interval: at most 1h".into());
        }
        Ok(secs)
    }
}

/// The LAPI address: host, port, path prefix without a trailing slash,
/// and whether it is https.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Url {
    pub host: String,
    pub port: u16,
    pub base: String,
    pub tls: bool,
}

/// Parses `http://HOST[:PORT][/PATH]` or `https://...`.
pub fn parse_url(url: &str) -> Result<Url, String> {
    let bad = |why: &str| format!("crowdsec: url {url:?}: {why}");
    let (rest, tls) = if let Some(r) = url.strip_prefix("http://") {
        (r, false)
    } else if let Some(r) = url.strip_prefix("https://") {
        (r, true)
    } else {
        return Err(bad("must start with http:// or https://"));
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    if authority.is_empty() || authority.contains('@') {
        return Err(bad("needs a host (and no user info)"));
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6.split_once(']').ok_or_else(|| bad("unclosed '['"))?;
        (h.to_string(), after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (authority.to_string(), None),
        }
    };
    let port = match port {
        None | Some("") if tls => 443,
        None | Some("") => 80,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| bad("bad port"))?,
    };
    if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad("bad host"));
    }
    if path.contains(['?', '#']) || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad("the path may hold no query, fragment or spaces"));
    }
    Ok(Url {
        host,
        port,
        base: path.trim_end_matches('/').to_string(),
        tls,
    })
}

/// Whether a LAPI at `host` is reached without crossing a network (plain
/// http elsewhere sends the API key and the decisions in the clear).
pub fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.to_canonical().is_loopback())
}

/// One decision as the LAPI sends it (other fields skipped, not stored).
/// The text borrows from the response where it can: a large answer costs
/// little more than its own bytes.
#[derive(Clone, Debug, Deserialize)]
pub struct Decision<'a> {
    pub id: i64,
    #[serde(rename = "type", borrow)]
    pub kind: Cow<'a, str>,
    #[serde(borrow)]
    pub scope: Cow<'a, str>,
    #[serde(borrow)]
    pub value: Cow<'a, str>,
    #[serde(borrow)]
    pub duration: Cow<'a, str>,
}

/// `GET /v1/decisions/stream`: `null` arrays are empty. Each list is read
/// with a bound: parsing stops at the decision past [`MAX_DECISIONS`]
/// instead of building a hostile answer's whole list first.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Stream<'a> {
    #[serde(default, borrow, deserialize_with = "bounded")]
    pub new: Vec<Decision<'a>>,
    #[serde(default, borrow, deserialize_with = "bounded")]
    pub deleted: Vec<Decision<'a>>,
}

/// A JSON array (or `null`) of at most [`MAX_DECISIONS`] decisions.
fn bounded<'de, D>(de: D) -> Result<Vec<Decision<'de>>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    struct Bounded;
    impl<'de> serde::de::Visitor<'de> for Bounded {
        type Value = Vec<Decision<'de>>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            write!(f, "an array of at most {MAX_DECISIONS} decisions, or null")
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(Vec::new())
        }
        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(Vec::new())
        }
        fn visit_some<D: serde::Deserializer<'de>>(self, de: D) -> Result<Self::Value, D::Error> {
            de.deserialize_seq(Bounded)
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
            while let Some(d) = seq.next_element()? {
                if out.len() == MAX_DECISIONS {
                    return Err(serde::de::Error::custom(format!(
                        "more than {MAX_DECISIONS} decisions in one list"
                    )));
                }
                out.push(d);
            }
            Ok(out)
        }
    }
    de.deserialize_option(Bounded)
}

/// A `ban` decision on an address or range: its id, prefix and, for a new
/// one, its expiry (Unix seconds).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ban {
    pub id: u64,
    pub prefix: IpNet,
    pub expires: u64,
}

/// A stream response, checked: the bans it adds and lifts, and the
/// decisions refused one by one (too broad, already expired), each with
/// the reason, for the log.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pulled {
    pub new: Vec<Ban>,
    pub deleted: Vec<Ban>,
    pub refused: Vec<String>,
    /// Decisions of other types or scopes (captcha, Country, ...).
    pub ignored: usize,
}

/// Parses a Go duration (`time.Duration.String()`): an optional sign, then
/// one or more decimal numbers each with a unit (`ns`, `us`, `µs`, `ms`,
/// `s`, `m`, `h`), e.g. `3h59m58.8s`, `-9.08ms`, `0s`. In nanoseconds.
pub fn parse_go_duration(text: &str) -> Result<i128, String> {
    let shown: String = text.chars().take(64).collect();
    let bad = || format!("{shown:?} is not a Go duration (e.g. 3h59m58.8s)");
    let (sign, mut rest) = match text.strip_prefix('-') {
        Some(r) => (-1i128, r),
        None => (1, text.strip_prefix('+').unwrap_or(text)),
    };
    if rest == "0" {
        return Ok(0);
    }
    if rest.is_empty() || text.len() > 64 {
        return Err(bad());
    }
    let mut total: i128 = 0;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let (number, after) = rest.split_at(digits);
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_len);
        let scale: i128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => return Err(bad()),
        };
        let (whole, frac) = number.split_once('.').unwrap_or((number, ""));
        if (whole.is_empty() && frac.is_empty()) || frac.contains('.') || whole.len() > 20 {
            return Err(bad());
        }
        let whole: i128 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| bad())?
        };
        let mut part = whole.checked_mul(scale).ok_or_else(bad)?;
        // The fraction, to the nanosecond (further digits dropped).
        let mut unit_scale = scale;
        for d in frac.bytes() {
            unit_scale /= 10;
            part += i128::from(d - b'0') * unit_scale;
        }
        total = total.checked_add(part).ok_or_else(bad)?;
        rest = next;
    }
    Ok(sign * total)
}

/// A decision's prefix: an `Ip` is an address (or its /32, /128), a
/// `Range` a prefix (host bits set are refused, as in set files).
fn prefix_of(d: &Decision) -> Result<IpNet, String> {
    if d.value.len() > MAX_VALUE {
        return Err(format!("value of {} bytes", d.value.len()));
    }
    let prefix = denylist::parse_prefix(&mapped_as_v4(&d.value))?;
    let host = match prefix {
        IpNet::V4(n) => n.prefix_len() == 32,
        IpNet::V6(n) => n.prefix_len() == 128,
    };
    if d.scope.eq_ignore_ascii_case("ip") && !host {
        return Err(format!("scope Ip with a range value {:?}", d.value));
    }
    Ok(prefix)
}

/// An IPv4-mapped IPv6 value (`::ffff:192.0.2.7`, as a dual-stack service
/// logs an IPv4 client, and as the LAPI passes it on) as the IPv4 value it
/// maps: that is the address such a client's packets carry. Other text as
/// it is.
fn mapped_as_v4(value: &str) -> String {
    let (addr, len) = match value.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (value, None),
    };
    let Ok(v6) = addr.trim().parse::<std::net::Ipv6Addr>() else {
        return value.to_owned();
    };
    let Some(v4) = v6.to_ipv4_mapped() else {
        return value.to_owned();
    };
    match len.map(|l| l.trim().parse::<u8>()) {
        None => v4.to_string(),
        Some(Ok(l)) if (96..=128).contains(&l) => format!("{v4}/{}", l - 96),
        Some(_) => value.to_owned(),
    }
}

/// At most this much of a LAPI's text goes into an error message.
const SHOWN: usize = 200;

fn shorten(text: String) -> String {
    if text.len() <= SHOWN {
        return text;
    }
    let mut cut = SHOWN;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}…", text.get(..cut).unwrap_or_default())
}

/// Checks a stream response. A response that is not a decision stream, or
/// too large, is refused whole; a decision whose id, duration or (for a
/// ban of scope Ip or Range) value does not parse is refused alone, named
/// (one bad decision, which a remote attacker may be able to cause, must
/// not stop every other ban and lift); so is a new ban broader than the
/// configured shortest prefix or already expired. `now` is Unix seconds.
pub fn check_stream(body: &[u8], cfg: &CrowdSecConfig, now: u64) -> Result<Pulled, String> {
    if body.len() > MAX_RESPONSE {
        return Err(format!(
            "response of {} bytes (at most {MAX_RESPONSE})",
            body.len()
        ));
    }
    let stream: Stream = serde_json::from_slice(body)
        .map_err(|e| format!("response is not a decision stream: {e}"))?;
    let (new, deleted) = (stream.new, stream.deleted);
    if new.len().saturating_add(deleted.len()) > MAX_DECISIONS {
        return Err(format!(
            "more than {MAX_DECISIONS} decisions in one response"
        ));
    }
    let mut out = Pulled::default();
    for (list, is_new) in [(&deleted, false), (&new, true)] {
        let which = if is_new { "new" } else { "deleted" };
        for (i, d) in list.iter().enumerate() {
            let at = |e: String| shorten(format!("{which}[{i}] (id {}): {e}", d.id));
            let scoped =
                d.scope.eq_ignore_ascii_case("ip") || d.scope.eq_ignore_ascii_case("range");
            if !d.kind.eq_ignore_ascii_case("ban") || !scoped {
                out.ignored += 1;
                continue;
            }
            let parsed = parse_go_duration(&d.duration).and_then(|ns| {
                let id = u64::try_from(d.id).map_err(|_| "negative id".to_owned())?;
                Ok((ns, id, prefix_of(d)?))
            });
            let (ns, id, prefix) = match parsed {
                Ok(p) => p,
                // Refused alone: a deletion that does not parse lifts
                // nothing (its ban, if any, stays until it expires).
                Err(e) => {
                    out.refused.push(at(e));
                    continue;
                }
            };
            let (len, shortest) = match prefix {
                IpNet::V4(n) => (n.prefix_len(), cfg.shortest_v4),
                IpNet::V6(n) => (n.prefix_len(), cfg.shortest_v6),
            };
            let secs = u64::try_from(ns.div_euclid(1_000_000_000)).unwrap_or(u64::MAX);
            let ban = Ban {
                id,
                prefix,
                expires: now.saturating_add(secs).saturating_add(1),
            };
            if !is_new {
                out.deleted.push(ban);
            } else if len < shortest {
                out.refused.push(at(format!(
                    "{prefix} is broader than /{shortest} (shortest_v4/shortest_v6): not banned"
                )));
            } else if ns <= 0 {
                out.refused
                    .push(at(format!("{prefix} has already expired")));
            } else {
                out.new.push(ban);
            }
        }
    }
    Ok(out)
}

/// What the deny set must do after a delta.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Delta {
    pub add: Vec<Entry>,
    pub remove: Vec<IpNet>,
    /// A deletion left doubt: pull everything (`startup=true`) next.
    pub resync: bool,
}

/// The decisions the bouncer holds, by prefix and id.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tracker {
    by_prefix: BTreeMap<IpNet, BTreeMap<u64, u64>>,
}

impl Tracker {
    /// The tracker of a full pull, and the set's entries (one a prefix, the
    /// latest expiry of its decisions).
    pub fn of_startup(bans: &[Ban]) -> (Tracker, Vec<Entry>) {
        let mut t = Tracker::default();
        for b in bans {
            t.by_prefix
                .entry(b.prefix)
                .or_default()
                .insert(b.id, b.expires);
        }
        let entries = t.by_prefix.keys().filter_map(|p| t.entry(p)).collect();
        (t, entries)
    }

    fn entry(&self, p: &IpNet) -> Option<Entry> {
        let latest = self.by_prefix.get(p)?.values().max()?;
        Some(Entry {
            prefix: *p,
            expires: Some(*latest),
        })
    }

    /// Decisions held.
    pub fn decisions(&self) -> usize {
        self.by_prefix.values().map(BTreeMap::len).sum()
    }

    /// Applies a delta: deletions first, then new decisions (a value both
    /// deleted and re-banned in one response stays banned).
    pub fn apply(&mut self, deleted: &[Ban], new: &[Ban]) -> Delta {
        let mut delta = Delta::default();
        let mut removed = BTreeSet::new();
        for b in deleted {
            let Some(ids) = self.by_prefix.get_mut(&b.prefix) else {
                // Nothing held there: the deletion of a decision never
                // pulled (or already expired and swept): nothing to lift.
                continue;
            };
            if ids.remove(&b.id).is_none() || !ids.is_empty() {
                // A decision we never saw (the LAPI sends one per value at
                // start-up), or others still held: the LAPI knows which
                // remain active, so ask it everything.
                delta.resync = true;
                continue;
            }
            self.by_prefix.remove(&b.prefix);
            removed.insert(b.prefix);
        }
        let mut added = BTreeSet::new();
        for b in new {
            self.by_prefix
                .entry(b.prefix)
                .or_default()
                .insert(b.id, b.expires);
            removed.remove(&b.prefix);
            added.insert(b.prefix);
        }
        delta.add = added.iter().filter_map(|p| self.entry(p)).collect();
        delta.remove = removed.into_iter().collect();
        delta
    }

    /// Forgets decisions whose expiry is at or before `now` (the deny set's
    /// sweeper removes their entries).
    pub fn expire(&mut self, now: u64) {
        for ids in self.by_prefix.values_mut() {
            ids.retain(|_, e| *e > now);
        }
        self.by_prefix.retain(|_, ids| !ids.is_empty());
    }
}

/// The bouncer's state, for `portcullis status`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct BouncerStatus {
    pub url: String,
    pub set: String,
    /// The last poll succeeded.
    pub connected: bool,
    /// Unix seconds of the last successful poll.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_success: Option<u64>,
    /// Why the last poll failed (bans in force stay meanwhile).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Unix seconds since when the LAPI has been failing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failing_since: Option<u64>,
    /// Ban decisions held.
    pub decisions: usize,
    /// A configuration worth fixing (plain http across a network).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
    /// Decisions the last poll refused, each named (at most ten).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refused: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cfg() -> CrowdSecConfig {
        CrowdSecConfig {
            url: "http://127.0.0.1:8080".into(),
            api_key_file: "/etc/portcullis/crowdsec.key".into(),
            poll_interval: default_poll(),
            set: default_set(),
            shortest_v4: 16,
            shortest_v6: 32,
            ca_file: None,
            insecure_plain_http: false,
        }
    }

    fn ban(id: u64, p: &str, expires: u64) -> Ban {
        Ban {
            id,
            prefix: p.parse().unwrap(),
            expires,
        }
    }

    /// A hostile answer with too many decisions is refused while it is
    /// read: parsing stops at the decision past the bound (the garbage
    /// after it is never reached), it does not build the whole list first.
    #[test]
    fn too_many_decisions_stop_the_parse_at_the_bound() {
        let one = r#"{"id":1,"type":"ban","scope":"Ip","value":"192.0.2.1","duration":"1h"},"#;
        let mut body = String::with_capacity(one.len() * (MAX_DECISIONS + 1) + 64);
        body.push_str(r#"{"new":["#);
        for _ in 0..=MAX_DECISIONS {
            body.push_str(one);
        }
        body.push_str("this is not JSON");
        let e = check_stream(body.as_bytes(), &cfg(), 0).unwrap_err();
        assert!(e.contains("more than"), "{e}");
        // Under the bound, the same list parses.
        let ok = format!(
            r#"{{"new":[{}],"deleted":null}}"#,
            one.trim_end_matches(',')
        );
        assert_eq!(check_stream(ok.as_bytes(), &cfg(), 0).unwrap().new.len(), 1);
    }

    #[test]
    fn go_durations_parse() {
        for (text, ns) in [
            (
                "3h59m58.8s",
                (3 * 3600 + 59 * 60 + 58) * 1_000_000_000 + 800_000_000,
            ),
            (
                "59m59.001547315s",
                (59 * 60 + 59) * 1_000_000_000 + 1_547_315,
            ),
            ("-9.082795ms", -9_082_795),
            ("1h", 3_600_000_000_000),
            ("0s", 0),
            ("0", 0),
            ("1.5µs", 1_500),
            ("2us", 2_000),
            ("150ns", 150),
            (".5s", 500_000_000),
        ] {
            assert_eq!(parse_go_duration(text), Ok(ns), "{text}");
        }
        for bad in [
            "",
            "-",
            "1",
            "1d",
            "h",
            "1..2s",
            "1h-2m",
            "s1",
            "1e3s",
            "9999999999999999999999999h",
        ] {
            assert!(parse_go_duration(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn urls_parse_and_https_is_refused() {
        let u = parse_url("http://127.0.0.1:8080/").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.base.as_str()),
            ("127.0.0.1", 8080, "")
        );
        let u = parse_url("http://[::1]:81/lapi").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.base.as_str()),
            ("::1", 81, "/lapi")
        );
        assert_eq!(parse_url("http://lapi.example").unwrap().port, 80);
        let u = parse_url("https://lapi.example").unwrap();
        assert!(u.tls && u.port == 443);
        let mut c = cfg();
        c.url = "https://lapi.example:8443".into();
        assert!(
            c.validate()
                .unwrap_err()
                .contains("needs the LAPI's certificate")
        );
        c.ca_file = Some("/etc/crowdsec/ssl/ca.pem".into());
        assert!(c.validate().is_ok());
        c.url = "http://127.0.0.1:8080".into();
        assert!(c.validate().unwrap_err().contains("only for an https url"));
        for bad in [
            "ftp://x",
            "http://",
            "http://u@h:1",
            "http://h:0",
            "http://h:99999",
            "http://h/x?y",
            "http://h /",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
        assert!(is_loopback("127.0.0.1") && is_loopback("::1") && is_loopback("localhost"));
        assert!(!is_loopback("10.0.0.1") && !is_loopback("lapi.example"));
    }

    #[test]
    fn a_stream_keeps_ip_and_range_bans_only() {
        let body = br#"{"deleted":null,"new":[
            {"duration":"29m59.0s","id":3,"origin":"cscli","scenario":"x","scope":"Range","type":"ban","value":"10.200.0.0/24"},
            {"duration":"59m59s","id":4,"scope":"ip","type":"ban","value":"fd00:200::2"},
            {"duration":"1h","id":5,"scope":"Ip","type":"captcha","value":"10.200.0.9"},
            {"duration":"1h","id":6,"scope":"Country","type":"ban","value":"FR"},
            {"duration":"1h","id":7,"scope":"Range","type":"ban","value":"0.0.0.0/0"},
            {"duration":"-1s","id":8,"scope":"Ip","type":"ban","value":"10.200.0.8"}]}"#;
        let p = check_stream(body, &cfg(), 1000).unwrap();
        assert_eq!(
            p.new,
            vec![
                ban(3, "10.200.0.0/24", 1000 + 29 * 60 + 59 + 1),
                ban(4, "fd00:200::2/128", 1000 + 3599 + 1)
            ]
        );
        assert_eq!(p.ignored, 2);
        let host = br#"{"new":[{"duration":"1h","id":9,"scope":"Ip","type":"ban","value":"10.1.2.3/32"}]}"#;
        assert_eq!(check_stream(host, &cfg(), 0).unwrap().new.len(), 1);
        assert_eq!(p.refused.len(), 2, "{:?}", p.refused);
        assert!(
            p.refused[0].contains("0.0.0.0/0 is broader than /16"),
            "{:?}",
            p.refused
        );
    }

    #[test]
    fn a_bad_decision_is_refused_alone_and_mapped_v4_is_v4() {
        let body = br#"{"new":[
            {"id":1,"type":"ban","scope":"Ip","value":"10.0.0.300","duration":"1h"},
            {"id":2,"type":"ban","scope":"Ip","value":"::ffff:192.0.2.7","duration":"1h"},
            {"id":3,"type":"ban","scope":"Range","value":"10.0.0.1/8","duration":"1h"},
            {"id":4,"type":"ban","scope":"Ip","value":"10.0.0.9","duration":"forever"},
            {"id":5,"type":"ban","scope":"Ip","value":"10.0.0.8","duration":"1h"}],
            "deleted":[{"id":6,"type":"ban","scope":"Ip","value":"nonsense","duration":"0s"}]}"#;
        let p = check_stream(body, &cfg(), 0).unwrap();
        let banned: Vec<String> = p.new.iter().map(|b| b.prefix.to_string()).collect();
        assert_eq!(banned, vec!["192.0.2.7/32", "10.0.0.8/32"]);
        assert!(p.deleted.is_empty());
        assert_eq!(p.refused.len(), 4, "{:?}", p.refused);
        assert!(p.refused.iter().any(|r| r.contains("new[0] (id 1)")));
        assert!(p.refused.iter().any(|r| r.contains("host bits")));
        assert!(p.refused.iter().any(|r| r.contains("deleted[0] (id 6)")));
        // A hostile duration is not copied whole into the message.
        let long = format!(
            r#"{{"new":[{{"id":1,"type":"ban","scope":"Ip","value":"10.0.0.1","duration":"{}"}}]}}"#,
            "9".repeat(100_000)
        );
        let p = check_stream(long.as_bytes(), &cfg(), 0).unwrap();
        assert!(p.refused[0].len() < 300, "{}", p.refused[0].len());
    }

    #[test]
    fn plain_http_off_loopback_needs_saying_so() {
        let mut c = cfg();
        c.url = "http://192.0.2.1:8080".into();
        assert!(c.validate().unwrap_err().contains("insecure_plain_http"));
        c.insecure_plain_http = true;
        assert!(c.validate().is_ok());
    }

    #[test]
    fn a_bad_response_is_refused_whole_naming_what() {
        let e = check_stream(b"not json", &cfg(), 0).unwrap_err();
        assert!(e.contains("not a decision stream"), "{e}");
        let long = format!(
            r#"{{"new":[{{"id":1,"type":"ban","scope":"Ip","value":"{}","duration":"1h"}}]}}"#,
            "1".repeat(100_000)
        );
        let p = check_stream(long.as_bytes(), &cfg(), 0).unwrap();
        assert!(p.new.is_empty() && p.refused[0].contains("bytes"), "{p:?}");
    }

    #[test]
    fn a_deletion_lifts_only_what_no_other_decision_holds() {
        let (mut t, entries) =
            Tracker::of_startup(&[ban(1, "10.0.0.1/32", 100), ban(2, "10.0.0.0/24", 50)]);
        assert_eq!(entries.len(), 2);
        // The same address banned twice: deleting one leaves it, and asks.
        let d = t.apply(&[], &[ban(3, "10.0.0.1/32", 200)]);
        assert_eq!(
            d.add,
            vec![Entry {
                prefix: "10.0.0.1/32".parse().unwrap(),
                expires: Some(200)
            }]
        );
        let d = t.apply(&[ban(3, "10.0.0.1/32", 0)], &[]);
        assert!(d.remove.is_empty() && d.resync);
        // The last decision of a prefix lifts it.
        let d = t.apply(&[ban(1, "10.0.0.1/32", 0)], &[]);
        assert_eq!(d.remove, vec!["10.0.0.1/32".parse::<IpNet>().unwrap()]);
        assert!(!d.resync);
        // An unknown id for a held prefix: ask everything.
        assert!(t.apply(&[ban(9, "10.0.0.0/24", 0)], &[]).resync);
        // A deletion of something never held: nothing.
        assert_eq!(t.apply(&[ban(9, "10.9.0.0/24", 0)], &[]), Delta::default());
        // Deleted and re-banned in one response: stays.
        let d = t.apply(&[ban(2, "10.0.0.0/24", 0)], &[ban(4, "10.0.0.0/24", 80)]);
        assert!(d.remove.is_empty() && d.add.len() == 1);
    }

    proptest! {
        #[test]
        fn go_durations_round_trip(h in 0u64..100_000, m in 0u64..60, s in 0u64..60, ns in 0u64..1_000_000_000) {
            let text = format!("{h}h{m}m{s}.{ns:09}s");
            let want = i128::from(((h * 60 + m) * 60 + s) * 1_000_000_000 + ns);
            prop_assert_eq!(parse_go_duration(&text), Ok(want));
            let neg = format!("-{text}");
            prop_assert_eq!(parse_go_duration(&neg), Ok(-want));
        }

        #[test]
        fn durations_never_panic(text in ".{0,40}") {
            let _ = parse_go_duration(&text);
        }

        #[test]
        fn streams_never_panic(body in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = check_stream(&body, &cfg(), 0);
        }

        /// Whatever the adds and deletes, a prefix is in the set exactly
        /// when the tracker holds a decision for it, or a resync was asked.
        #[test]
        fn the_tracker_matches_a_model(ops in proptest::collection::vec((any::<bool>(), 0u64..6, 0u8..3), 0..40)) {
            let prefixes = ["10.0.0.1/32", "10.0.0.0/24", "fd00::/64"];
            let mut t = Tracker::default();
            let mut set: BTreeSet<IpNet> = BTreeSet::new();
            let mut model: BTreeMap<u64, IpNet> = BTreeMap::new();
            for (add, id, p) in ops {
                let prefix: IpNet = prefixes[usize::from(p)].parse().unwrap();
                let b = Ban { id, prefix, expires: 10 };
                let d = if add {
                    if model.get(&id).is_some_and(|q| *q != prefix) { continue; }
                    model.insert(id, prefix);
                    t.apply(&[], &[b])
                } else {
                    if model.get(&id) == Some(&prefix) { model.remove(&id); }
                    t.apply(&[b], &[])
                };
                for e in &d.add { set.insert(e.prefix); }
                for r in &d.remove { set.remove(r); }
                let held: BTreeSet<IpNet> = model.values().copied().collect();
                if d.resync {
                    let (t2, entries) = Tracker::of_startup(&model.iter().map(|(i, p)| Ban { id: *i, prefix: *p, expires: 10 }).collect::<Vec<_>>());
                    t = t2;
                    set = entries.iter().map(|e| e.prefix).collect();
                }
                prop_assert_eq!(&set, &held);
            }
        }
    }
}
