//! DNS messages as the forwarder needs them (pure: no I/O): the question of
//! a query, the records of an answer, the CNAME chain from the question
//! name, and the names FQDN rules list (`*.example.org` patterns).
//!
//! The parser reads only what the header says is there, within the
//! message: every read is bounds-checked, a name is at most 255 bytes,
//! a compression pointer must point backwards (before the label that holds
//! it), so a chain of pointers cannot loop, and at most
//! [`MAX_POINTERS`] are followed per name. Counts are not trusted: a record
//! needs at least 11 bytes, so a count larger than what is left fails.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Longest name (wire form) RFC 1035 allows.
pub const MAX_NAME: usize = 255;
/// Compression pointers followed in one name.
pub const MAX_POINTERS: usize = 16;
/// CNAME links followed from the question name.
pub const MAX_CHAIN: usize = 8;
/// Ports a rule with names may list (or all of them).
pub const MAX_RULE_PORTS: u32 = 64;
/// Names one rule may list.
pub const MAX_RULE_NAMES: usize = 256;

pub const TYPE_A: u16 = 1;
pub const TYPE_CNAME: u16 = 5;
pub const TYPE_AAAA: u16 = 28;
pub const CLASS_IN: u16 = 1;
pub const RCODE_SERVFAIL: u8 = 2;

const HEADER: usize = 12;

/// Why a message cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("message truncated")]
    Truncated,
    #[error("bad name")]
    BadName,
    #[error("compression pointer loops or points forwards")]
    BadPointer,
    #[error("not exactly one question")]
    Question,
    #[error("not a query")]
    NotQuery,
    #[error("not a response")]
    NotResponse,
}

/// A question: the name (lower case, no trailing dot; "" for the root),
/// type and class.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Question {
    pub name: String,
    pub qtype: u16,
    pub qclass: u16,
}

/// A query: its id and question; `question_end` is where the question ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub id: u16,
    pub question: Question,
    pub question_end: usize,
}

/// What an answer record says that admission cares about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Data {
    Addr(IpAddr),
    Cname(String),
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub owner: String,
    pub ttl: u32,
    pub data: Data,
}

/// A response: id, rcode, question and the answer section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub id: u16,
    pub rcode: u8,
    pub question: Question,
    pub answers: Vec<Record>,
}

fn u16_at(msg: &[u8], at: usize) -> Result<u16, Malformed> {
    match msg.get(at..at + 2) {
        Some(&[a, b]) => Ok(u16::from_be_bytes([a, b])),
        _ => Err(Malformed::Truncated),
    }
}

fn u32_at(msg: &[u8], at: usize) -> Result<u32, Malformed> {
    match msg.get(at..at + 4) {
        Some(&[a, b, c, d]) => Ok(u32::from_be_bytes([a, b, c, d])),
        _ => Err(Malformed::Truncated),
    }
}

/// Reads the name at `at`: the name and the offset just after it (after
/// its first pointer, if compressed).
pub fn read_name(msg: &[u8], at: usize) -> Result<(String, usize), Malformed> {
    let mut name = String::new();
    let mut wire_len = 1usize;
    let mut pos = at;
    let mut end = None;
    let mut pointers = 0;
    loop {
        let len = *msg.get(pos).ok_or(Malformed::Truncated)?;
        match len & 0xC0 {
            0x00 => {}
            0xC0 => {
                let target = usize::from(u16_at(msg, pos)? & 0x3FFF);
                pointers += 1;
                // Backwards only: each jump lands strictly before the
                // label that holds it, so no chain can loop.
                if target >= pos || pointers > MAX_POINTERS {
                    return Err(Malformed::BadPointer);
                }
                end.get_or_insert(pos + 2);
                pos = target;
                continue;
            }
            _ => return Err(Malformed::BadName),
        }
        if len == 0 {
            let after = end.unwrap_or(pos + 1);
            return Ok((name, after));
        }
        let len = usize::from(len);
        wire_len += len + 1;
        if wire_len > MAX_NAME {
            return Err(Malformed::BadName);
        }
        let label = msg
            .get(pos + 1..pos + 1 + len)
            .ok_or(Malformed::Truncated)?;
        if !name.is_empty() {
            name.push('.');
        }
        for &b in label {
            // Names are compared as ASCII; anything else (a dot inside a
            // label included) matches no rule.
            if b == b'.' || !b.is_ascii_graphic() {
                return Err(Malformed::BadName);
            }
            name.push(char::from(b.to_ascii_lowercase()));
        }
        pos += 1 + len;
    }
}

fn read_question(msg: &[u8]) -> Result<(Question, usize), Malformed> {
    if u16_at(msg, 4)? != 1 {
        return Err(Malformed::Question);
    }
    let (name, at) = read_name(msg, HEADER)?;
    let qtype = u16_at(msg, at)?;
    let qclass = u16_at(msg, at + 2)?;
    Ok((
        Question {
            name,
            qtype,
            qclass,
        },
        at + 4,
    ))
}

/// A client's query: exactly one question, QR clear.
pub fn parse_query(msg: &[u8]) -> Result<Query, Malformed> {
    let flags = u16_at(msg, 2)?;
    if flags & 0x8000 != 0 {
        return Err(Malformed::NotQuery);
    }
    let (question, question_end) = read_question(msg)?;
    Ok(Query {
        id: u16_at(msg, 0)?,
        question,
        question_end,
    })
}

/// An upstream's response: the header, the question and every answer
/// record (the authority and additional sections are not read: they admit
/// nothing).
pub fn parse_response(msg: &[u8]) -> Result<Response, Malformed> {
    let flags = u16_at(msg, 2)?;
    if flags & 0x8000 == 0 {
        return Err(Malformed::NotResponse);
    }
    let (question, mut at) = read_question(msg)?;
    let count = usize::from(u16_at(msg, 6)?);
    // Each record takes at least 11 bytes: a larger count is a lie.
    if count > msg.len().saturating_sub(at) / 11 {
        return Err(Malformed::Truncated);
    }
    let mut answers = Vec::with_capacity(count);
    for _ in 0..count {
        let (record, next) = read_record(msg, at)?;
        answers.push(record);
        at = next;
    }
    Ok(Response {
        id: u16_at(msg, 0)?,
        rcode: (flags & 0x000F) as u8,
        question,
        answers,
    })
}

fn read_record(msg: &[u8], at: usize) -> Result<(Record, usize), Malformed> {
    let (owner, at) = read_name(msg, at)?;
    let rtype = u16_at(msg, at)?;
    let class = u16_at(msg, at + 2)?;
    let ttl = u32_at(msg, at + 4)?;
    let len = usize::from(u16_at(msg, at + 8)?);
    let start = at + 10;
    let rdata = msg.get(start..start + len).ok_or(Malformed::Truncated)?;
    let data = match (rtype, class, rdata) {
        (TYPE_A, CLASS_IN, &[a, b, c, d]) => Data::Addr(IpAddr::V4(Ipv4Addr::new(a, b, c, d))),
        (TYPE_AAAA, CLASS_IN, r) if r.len() == 16 => {
            let mut o = [0u8; 16];
            o.copy_from_slice(r);
            Data::Addr(IpAddr::V6(Ipv6Addr::from(o)))
        }
        (TYPE_CNAME, CLASS_IN, _) => {
            let (target, after) = read_name(msg, start)?;
            if after != start + len {
                return Err(Malformed::BadName);
            }
            Data::Cname(target)
        }
        _ => Data::Other,
    };
    // RFC 2181: a TTL with the top bit set is 0.
    let ttl = if ttl > i32::MAX as u32 { 0 } else { ttl };
    Ok((Record { owner, ttl, data }, start + len))
}

/// What an answer admits: the names on the CNAME chain from the question
/// name (the question name first) and the addresses owned by the last name
/// on it (the end of the chain), each with the smallest TTL along the
/// chain. Addresses of a name partway along the chain (which has a CNAME,
/// so cannot also have addresses) and records whose owner is not on the
/// chain are ignored; so is everything when the chain ends on a name that
/// still has a CNAME (a loop, or longer than [`MAX_CHAIN`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Chain {
    pub names: Vec<String>,
    pub addresses: Vec<(IpAddr, u32)>,
}

/// Follows the CNAME chain of `r` from its question name (at most
/// [`MAX_CHAIN`] links; a loop ends it).
pub fn chain(r: &Response) -> Chain {
    let mut names = vec![r.question.name.clone()];
    let mut ttl = u32::MAX;
    let mut current = r.question.name.clone();
    for _ in 0..MAX_CHAIN {
        let next = r.answers.iter().find_map(|rec| match &rec.data {
            Data::Cname(t) if rec.owner == current => Some((t.clone(), rec.ttl)),
            _ => None,
        });
        let Some((target, t)) = next else { break };
        if names.contains(&target) {
            break;
        }
        ttl = ttl.min(t);
        names.push(target.clone());
        current = target;
    }
    let aliased = r
        .answers
        .iter()
        .any(|rec| rec.owner == current && matches!(rec.data, Data::Cname(_)));
    let addresses = r
        .answers
        .iter()
        .filter(|rec| !aliased && rec.owner == current)
        .filter_map(|rec| match rec.data {
            Data::Addr(a) => Some((a, rec.ttl.min(ttl))),
            _ => None,
        })
        .collect();
    Chain { names, addresses }
}

/// Whether the answer `r` answers the question `q` (same name, type, class).
pub fn same_question(q: &Question, r: &Response) -> bool {
    r.question == *q
}

/// A SERVFAIL answer to `query` (its header and question, as received).
pub fn servfail(query: &[u8], parsed: &Query) -> Vec<u8> {
    let mut out = query.get(..parsed.question_end).unwrap_or(query).to_vec();
    if let Some(flags) = out.get_mut(2..4) {
        // QR, the client's opcode and RD, RA; rcode SERVFAIL.
        let rd = flags.first().copied().unwrap_or(0) & 0x79;
        flags.copy_from_slice(&[0x80 | rd, 0x80 | RCODE_SERVFAIL]);
    }
    // One question, no records.
    if let Some(counts) = out.get_mut(4..12) {
        counts.copy_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
    }
    out
}

/// The OPT pseudo-record's type (EDNS, RFC 6891).
pub const TYPE_OPT: u16 = 41;
/// Largest UDP payload the forwarder advertises upstream.
pub const EDNS_PAYLOAD: u16 = 1232;
pub const RCODE_NOTIMP: u8 = 4;

/// `query` as the forwarder sends it upstream: id `id`, the client's flags
/// and question with the case of each letter of the name flipped where
/// `bits` (one bit per byte of the name, in order) says so (0x20), no
/// answer or authority records, and — when the client sent an OPT record —
/// a fresh OPT with its DO flag and version, the payload size capped at
/// [`EDNS_PAYLOAD`], and no options: EDNS Client Subnet, cookies and every
/// other client option stay behind; any other additional record too.
pub fn upstream_query(query: &[u8], parsed: &Query, id: u16, bits: &[u8]) -> Vec<u8> {
    let mut out = with_id(query.get(..parsed.question_end).unwrap_or(query), id);
    if let Some(counts) = out.get_mut(4..12) {
        counts.copy_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
    }
    flip_case(&mut out, bits);
    if let Some((payload, ttl)) = client_opt(query, parsed) {
        if let Some(ar) = out.get_mut(10..12) {
            ar.copy_from_slice(&[0, 1]);
        }
        // Root owner, OPT, payload size, extended rcode 0, version, DO
        // only, no options.
        out.push(0);
        out.extend_from_slice(&TYPE_OPT.to_be_bytes());
        out.extend_from_slice(&payload.clamp(512, EDNS_PAYLOAD).to_be_bytes());
        out.extend_from_slice(&(ttl & 0x00FF_8000).to_be_bytes());
        out.extend_from_slice(&[0, 0]);
    }
    out
}

/// Flips the case of the question name's letters (from offset 12, plain
/// labels; stops at a pointer or the root) where `bits` says so.
fn flip_case(msg: &mut [u8], bits: &[u8]) {
    let mut pos = HEADER;
    let mut i = 0usize;
    while let Some(&len) = msg.get(pos) {
        if len == 0 || len & 0xC0 != 0 {
            return;
        }
        let len = usize::from(len);
        for at in pos + 1..=pos + len {
            let flip = bits.get(i / 8).is_some_and(|b| b >> (i % 8) & 1 == 1);
            i += 1;
            if let Some(c) = msg.get_mut(at)
                && flip
                && c.is_ascii_alphabetic()
            {
                *c ^= 0x20;
            }
        }
        pos += 1 + len;
    }
}

/// The client's OPT record (payload size, TTL field) if it sent one among
/// its additional records.
fn client_opt(query: &[u8], parsed: &Query) -> Option<(u16, u32)> {
    let skip = usize::from(u16_at(query, 6).ok()?) + usize::from(u16_at(query, 8).ok()?);
    let extra = usize::from(u16_at(query, 10).ok()?);
    let mut at = parsed.question_end;
    for n in 0..skip.saturating_add(extra).min(64) {
        let (_, after) = read_name(query, at).ok()?;
        let rtype = u16_at(query, after).ok()?;
        let class = u16_at(query, after + 2).ok()?;
        let ttl = u32_at(query, after + 4).ok()?;
        let len = usize::from(u16_at(query, after + 8).ok()?);
        if n >= skip && rtype == TYPE_OPT {
            return Some((class, ttl));
        }
        at = after + 10 + len;
    }
    None
}

/// The question section of `msg` as sent (name, type and class, the case
/// of its letters kept): what 0x20 compares.
pub fn question_wire(msg: &[u8]) -> Option<&[u8]> {
    let (_, end) = read_question(msg).ok()?;
    msg.get(HEADER..end)
}

/// The upstream's `answer` for the client: the client's id and the
/// client's own spelling of the question (same length: only the case
/// differs).
pub fn for_client(answer: &[u8], query: &[u8], parsed: &Query) -> Vec<u8> {
    let mut out = with_id(answer, parsed.id);
    if let (Some(theirs), Some(ours)) = (
        query.get(HEADER..parsed.question_end),
        out.get_mut(HEADER..parsed.question_end),
    ) {
        ours.copy_from_slice(theirs);
    }
    out
}

/// An answer with `rcode` and no records to `query` (its header and
/// question, as received).
pub fn refusal(query: &[u8], parsed: &Query, rcode: u8) -> Vec<u8> {
    let mut out = servfail(query, parsed);
    if let Some(flags) = out.get_mut(3) {
        *flags = 0x80 | (rcode & 0x0F);
    }
    out
}

/// The opcode of a message (0: QUERY).
pub fn opcode(msg: &[u8]) -> u8 {
    msg.get(2).map_or(0xFF, |f| (f >> 3) & 0x0F)
}

/// `msg` with its id replaced (a query's for upstream, or the client's).
pub fn with_id(msg: &[u8], id: u16) -> Vec<u8> {
    let mut out = msg.to_vec();
    if let Some(head) = out.get_mut(0..2) {
        head.copy_from_slice(&id.to_be_bytes());
    }
    out
}

/// Whether `name` (lower case, no trailing dot) matches `pattern`: equal,
/// or for `*.suffix` any name strictly under `suffix`.
pub fn matches(pattern: &str, name: &str) -> bool {
    let pattern = pattern.trim_end_matches('.').to_ascii_lowercase();
    match pattern.strip_prefix("*.") {
        Some(suffix) => name
            .strip_suffix(suffix)
            .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
        None => pattern == name,
    }
}

/// Checks the names of one rule: each a host name (letters, digits, `-`,
/// `_`; labels of 1 to 63 bytes, 253 in all, a trailing dot allowed), or
/// `*.` and such a name of at least two labels; no other wildcard.
pub fn check_rule_names(names: &[String]) -> Result<(), String> {
    if names.len() > MAX_RULE_NAMES {
        return Err(format!("{} names, more than {MAX_RULE_NAMES}", names.len()));
    }
    for n in names {
        check_name(n).map_err(|why| format!("{n:?}: {why}"))?;
    }
    Ok(())
}

fn check_name(n: &str) -> Result<(), String> {
    let bare = n.strip_suffix('.').unwrap_or(n);
    let (wild, host) = match bare.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, bare),
    };
    if host.is_empty() {
        return Err("empty name".into());
    }
    if host.len() > 253 {
        return Err("longer than 253 bytes".into());
    }
    let labels: Vec<&str> = host.split('.').collect();
    if wild && labels.len() < 2 {
        return Err("a wildcard needs a domain of at least two labels (*.example.org)".into());
    }
    for l in labels {
        if l.is_empty() || l.len() > 63 {
            return Err(format!("label {l:?} must be 1 to 63 bytes"));
        }
        if l.contains('*') {
            return Err("the only wildcard is a leading \"*.\"".into());
        }
        if !l
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(format!(
                "label {l:?} has characters other than letters, digits, - and _"
            ));
        }
        if l.starts_with('-') || l.ends_with('-') {
            return Err(format!("label {l:?} starts or ends with -"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn name(wire: &mut Vec<u8>, n: &str) {
        for l in n.split('.') {
            wire.push(l.len() as u8);
            wire.extend_from_slice(l.as_bytes());
        }
        wire.push(0);
    }

    fn header(id: u16, flags: u16, qd: u16, an: u16) -> Vec<u8> {
        let mut m = Vec::new();
        for v in [id, flags, qd, an, 0, 0] {
            m.extend_from_slice(&v.to_be_bytes());
        }
        m
    }

    fn rr(m: &mut Vec<u8>, owner: &str, rtype: u16, ttl: u32, data: &[u8]) {
        name(m, owner);
        m.extend_from_slice(&rtype.to_be_bytes());
        m.extend_from_slice(&CLASS_IN.to_be_bytes());
        m.extend_from_slice(&ttl.to_be_bytes());
        m.extend_from_slice(&(data.len() as u16).to_be_bytes());
        m.extend_from_slice(data);
    }

    fn response(q: &str, records: &[(&str, u16, u32, Vec<u8>)]) -> Vec<u8> {
        let mut m = header(7, 0x8180, 1, records.len() as u16);
        name(&mut m, q);
        m.extend_from_slice(&[0, 1, 0, 1]);
        for (o, t, ttl, d) in records {
            rr(&mut m, o, *t, *ttl, d);
        }
        m
    }

    fn cname(target: &str) -> Vec<u8> {
        let mut d = Vec::new();
        name(&mut d, target);
        d
    }

    #[test]
    fn reads_a_query_and_its_question() {
        let mut m = header(0x1234, 0x0100, 1, 0);
        name(&mut m, "Api.Example.COM");
        m.extend_from_slice(&[0, 1, 0, 1]);
        let q = parse_query(&m).unwrap();
        assert_eq!(q.id, 0x1234);
        assert_eq!(q.question.name, "api.example.com");
        assert_eq!(q.question_end, m.len());
        let sf = servfail(&m, &q);
        assert_eq!(sf[3] & 0x0F, RCODE_SERVFAIL);
        assert_eq!(sf[2] & 0x80, 0x80);
    }

    #[test]
    fn follows_the_chain_from_the_question_only() {
        let m = response(
            "www.example.com",
            &[
                ("www.example.com", TYPE_CNAME, 300, cname("edge.cdn.net")),
                ("edge.cdn.net", TYPE_A, 60, vec![10, 200, 0, 2]),
                // Not on the chain: admits nothing.
                ("allowed.example.org", TYPE_A, 600, vec![10, 200, 0, 66]),
            ],
        );
        let r = parse_response(&m).unwrap();
        let c = chain(&r);
        assert_eq!(c.names, vec!["www.example.com", "edge.cdn.net"]);
        assert_eq!(
            c.addresses,
            vec![(IpAddr::V4(Ipv4Addr::new(10, 200, 0, 2)), 60)]
        );
    }

    #[test]
    fn only_the_end_of_the_chain_owns_addresses() {
        // A hostile server: its own name aliases an allowed one, and
        // carries an address of its own beside the alias.
        let m = response(
            "x.evil.net",
            &[
                ("x.evil.net", TYPE_CNAME, 300, cname("api.allowed.com")),
                ("x.evil.net", TYPE_A, 300, vec![6, 6, 6, 6]),
                ("api.allowed.com", TYPE_A, 60, vec![10, 200, 0, 2]),
            ],
        );
        let c = chain(&parse_response(&m).unwrap());
        assert_eq!(c.names, vec!["x.evil.net", "api.allowed.com"]);
        assert_eq!(
            c.addresses,
            vec![(IpAddr::V4(Ipv4Addr::new(10, 200, 0, 2)), 60)]
        );
        // A chain that loops ends on a name with a CNAME: no addresses.
        let m = response(
            "a.example",
            &[
                ("a.example", TYPE_CNAME, 300, cname("b.example")),
                ("b.example", TYPE_CNAME, 300, cname("a.example")),
                ("b.example", TYPE_A, 300, vec![6, 6, 6, 6]),
            ],
        );
        assert!(chain(&parse_response(&m).unwrap()).addresses.is_empty());
    }

    #[test]
    fn upstream_queries_flip_case_and_drop_client_options() {
        let mut m = header(0x1234, 0x0100, 1, 0);
        m[11] = 1;
        name(&mut m, "api.example.com");
        m.extend_from_slice(&[0, 1, 0, 1]);
        let q = parse_query(&m).unwrap();
        // OPT: payload 4096, DO, an ECS option (family 1, /24, 192.0.2).
        m.extend_from_slice(&[0, 0, 41, 0x10, 0, 0, 0, 0x80, 0, 0, 11]);
        m.extend_from_slice(&[0, 8, 0, 7, 0, 1, 24, 0, 192, 0, 2]);
        let up = upstream_query(&m, &q, 0x4242, &[0xFF; 4]);
        let wire = question_wire(&up).unwrap();
        assert_eq!(&wire[..4], b"\x03API");
        assert_eq!(&up[..2], &[0x42, 0x42]);
        // One question, one fresh OPT (1232, DO) without options.
        assert_eq!(&up[4..12], &[0, 1, 0, 0, 0, 0, 0, 1]);
        let opt = &up[q.question_end..];
        assert_eq!(opt, &[0, 0, 41, 0x04, 0xD0, 0, 0, 0x80, 0, 0, 0]);
        // No bits: the spelling is kept; no OPT from the client: none.
        let plain = upstream_query(&m[..q.question_end], &q, 1, &[]);
        assert_eq!(&plain[12..], &m[12..q.question_end]);
        // The client gets its own spelling back.
        let mut answer = up.clone();
        answer[2] |= 0x80;
        let back = for_client(&answer, &m, &q);
        assert_eq!(
            &back[..q.question_end],
            &{
                let mut h = m[..q.question_end].to_vec();
                h[2] |= 0x80;
                h[10..12].copy_from_slice(&[0, 1]);
                h
            }[..]
        );
        assert_ne!(question_wire(&up), question_wire(&m));
        assert_eq!(opcode(&m), 0);
        assert_eq!(refusal(&m, &q, RCODE_NOTIMP)[3] & 0x0F, RCODE_NOTIMP);
    }

    #[test]
    fn truncated_messages_fail() {
        let m = response("a.example", &[("a.example", TYPE_A, 5, vec![1, 2, 3, 4])]);
        for cut in 0..m.len() {
            assert!(parse_response(&m[..cut]).is_err(), "cut at {cut}");
        }
        assert!(parse_response(&m).is_ok());
    }

    #[test]
    fn looping_and_forward_pointers_fail() {
        // A name that points at itself.
        let mut m = header(1, 0x8180, 1, 0);
        m.extend_from_slice(&[0xC0, 12, 0, 1, 0, 1]);
        assert_eq!(parse_response(&m), Err(Malformed::BadPointer));
        // Two labels pointing at each other: the second points forwards.
        let mut m = header(1, 0x8180, 1, 0);
        m.extend_from_slice(&[1, b'a', 0xC0, 16, 0xC0, 12, 0, 1, 0, 1]);
        assert_eq!(parse_response(&m), Err(Malformed::BadPointer));
    }

    #[test]
    fn huge_counts_fail_at_once() {
        let mut m = response("a.example", &[("a.example", TYPE_A, 5, vec![1, 2, 3, 4])]);
        m[6] = 0xFF;
        m[7] = 0xFF;
        assert_eq!(parse_response(&m), Err(Malformed::Truncated));
        let mut q = header(1, 0, 0xFFFF, 0);
        name(&mut q, "a.example");
        assert_eq!(parse_query(&q), Err(Malformed::Question));
    }

    #[test]
    fn overlong_names_fail() {
        let mut m = header(1, 0x8180, 1, 0);
        for _ in 0..5 {
            m.push(63);
            m.extend_from_slice(&[b'a'; 63]);
        }
        m.extend_from_slice(&[0, 0, 1, 0, 1]);
        assert_eq!(parse_response(&m), Err(Malformed::BadName));
    }

    #[test]
    fn wildcards_match_subdomains_not_the_apex() {
        assert!(matches("*.example.org", "a.example.org"));
        assert!(matches("*.example.org", "a.b.example.org"));
        assert!(!matches("*.example.org", "example.org"));
        assert!(!matches("*.example.org", "badexample.org"));
        assert!(matches("API.example.com.", "api.example.com"));
        assert!(!matches("api.example.com", "x.api.example.com"));
    }

    #[test]
    fn rule_names_are_checked() {
        let ok = |n: &str| check_rule_names(&[n.to_string()]);
        assert!(ok("api.example.com").is_ok());
        assert!(ok("*.example.org").is_ok());
        assert!(ok("a*.example.org").unwrap_err().contains("wildcard"));
        assert!(ok("*.org").unwrap_err().contains("two labels"));
        assert!(ok("*").is_err());
        assert!(ok("a..b").is_err());
        assert!(ok(&format!("{}.com", "a".repeat(64))).is_err());
        assert!(ok("sp ace.com").is_err());
    }

    proptest! {
        /// Whatever the bytes, parsing ends, within bounds, without a panic.
        #[test]
        fn any_bytes_parse_or_fail(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = parse_query(&bytes);
            if let Ok(r) = parse_response(&bytes) {
                let c = chain(&r);
                prop_assert!(c.names.len() <= MAX_CHAIN + 1);
                for n in &c.names {
                    prop_assert!(n.len() <= MAX_NAME);
                }
            }
        }

        /// Mutating one byte of a valid answer never makes it panic.
        #[test]
        fn mutated_answers_parse_or_fail(at in 0usize..64, v in any::<u8>()) {
            let mut m = response(
                "www.example.com",
                &[("www.example.com", TYPE_CNAME, 300, cname("edge.cdn.net")),
                  ("edge.cdn.net", TYPE_A, 60, vec![10, 200, 0, 2])],
            );
            let i = at % m.len();
            m[i] = v;
            let _ = parse_response(&m).map(|r| chain(&r));
        }
    }
}
