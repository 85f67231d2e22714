//! Reading the networks of rules (`10.0.0.0/8`, `fd00::/64`, a bare
//! address as its host route).
//!
//! A change to 100k rules reads each network three times (validation, the
//! compile, packing): a canonical network, the common case, is read here
//! in one pass over its bytes ([`quick_v4`], [`quick_v6`]); anything else
//! goes through `ipnet`'s parser, whose answer is the reference the fast
//! paths are held to by property tests.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// Parses a CIDR (or a bare address, as a host route) and rejects host bits.
pub fn parse_cidr(text: &str) -> Result<IpNet, String> {
    let net = if let Some((addr, len)) = quick_v4(text) {
        Ipv4Net::new(addr, len.unwrap_or(32))
            .map(IpNet::V4)
            .map_err(|_| not_a_cidr(text))?
    } else if let Some((addr, len)) = quick_v6(text) {
        Ipv6Net::new(addr, len.unwrap_or(128))
            .map(IpNet::V6)
            .map_err(|_| not_a_cidr(text))?
    } else {
        parse_slow(text)?
    };
    if net.trunc() != net {
        return Err(format!(
            "{text:?} has host bits set; write {} for the network or {} for the one address",
            net.trunc(),
            IpNet::from(net.addr())
        ));
    }
    Ok(net)
}

pub fn parse_cidrs(list: &[String]) -> Result<Vec<IpNet>, String> {
    list.iter().map(|c| parse_cidr(c)).collect()
}

/// `text` as `ipnet` reads a network, or else as a bare address.
fn parse_slow(text: &str) -> Result<IpNet, String> {
    match text.parse() {
        Ok(net) => Ok(net),
        Err(_) => match text.parse::<std::net::IpAddr>() {
            Ok(addr) => Ok(IpNet::from(addr)),
            Err(_) => Err(not_a_cidr(text)),
        },
    }
}

fn not_a_cidr(text: &str) -> String {
    format!("{text:?} is not a CIDR (like 10.0.0.0/8 or fd00::/64)")
}

/// `text` when it is an IPv4 address exactly as `Ipv4Addr` displays it
/// (four decimal octets, no leading zeros), with or without `/len` written
/// as a `u8` displays it and at most 32: the address and the length. Such
/// text reads the same through `ipnet` and formats back to itself, so
/// parsing and packing may take the fast path without a second check.
/// `None` for anything else, valid or not.
pub fn quick_v4(text: &str) -> Option<(Ipv4Addr, Option<u8>)> {
    let (addr, len) = match text.split_once('/') {
        Some((addr, len)) => (addr, Some(decimal(len, 32)?)),
        None => (text, None),
    };
    let mut octets = [0u8; 4];
    let mut parts = addr.split('.');
    for octet in &mut octets {
        *octet = decimal(parts.next()?, 255)? as u8;
    }
    if parts.next().is_some() {
        return None;
    }
    Some((Ipv4Addr::from(octets), len.map(|l| l as u8)))
}

/// `text` when it is an IPv6 address exactly as [`write_v6`] writes it
/// (RFC 5952), with or without `/len` written as a `u8` displays it and at
/// most 128: the address and the length. The text is read leniently and
/// then must be what its address writes back to, which only the one
/// address does: so it reads as `ipnet` reads it. `None` for anything
/// else, valid or not.
pub fn quick_v6(text: &str) -> Option<(Ipv6Addr, Option<u8>)> {
    let (addr, len) = match text.split_once('/') {
        Some((addr, len)) => (addr, Some(decimal(len, 128)?)),
        None => (text, None),
    };
    if addr.len() > 39 {
        return None;
    }
    let (head, tail) = match addr.split_once("::") {
        Some((head, tail)) => (head, Some(tail)),
        None => (addr, None),
    };
    let mut groups = [0u16; 8];
    let head_n = hex_groups(head, &mut groups)?;
    let mut rest = [0u16; 8];
    let tail_n = match tail {
        Some(tail) => hex_groups(tail, &mut rest)?,
        None => 0,
    };
    let fits = match tail {
        None => head_n == 8,
        Some(_) => head_n + tail_n <= 7,
    };
    if !fits {
        return None;
    }
    let at = 8 - tail_n;
    for (to, from) in groups.iter_mut().skip(at).zip(&rest) {
        *to = *from;
    }
    let ip = Ipv6Addr::from(groups);
    let mut back = Text::default();
    write_v6(&mut back, ip.octets());
    (back.as_bytes() == addr.as_bytes()).then_some((ip, len.map(|l| l as u8)))
}

/// The colon-separated groups of 1 to 4 hex digits in `part` into
/// `out`; how many. An empty `part` has none.
fn hex_groups(part: &str, out: &mut [u16; 8]) -> Option<usize> {
    if part.is_empty() {
        return Some(0);
    }
    let (mut n, mut value, mut digits) = (0, 0u16, 0);
    // A ':' after the last group ends it as the others are ended.
    for &b in part.as_bytes().iter().chain(b":") {
        if b == b':' {
            if digits == 0 {
                return None;
            }
            *out.get_mut(n)? = value;
            (n, value, digits) = (n + 1, 0, 0);
            continue;
        }
        let d = char::from(b).to_digit(16)?;
        if digits == 4 {
            return None;
        }
        (value, digits) = (value << 4 | d as u16, digits + 1);
    }
    Some(n)
}

/// An address's text on the stack (at most 39 bytes).
struct Text {
    bytes: [u8; 39],
    len: usize,
}

impl Default for Text {
    fn default() -> Self {
        Text {
            bytes: [0; 39],
            len: 0,
        }
    }
}

impl Text {
    fn as_bytes(&self) -> &[u8] {
        self.bytes.get(..self.len).unwrap_or_default()
    }
}

impl std::fmt::Write for Text {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let end = self.len + s.len();
        self.bytes
            .get_mut(self.len..end)
            .ok_or(std::fmt::Error)?
            .copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// An IPv6 address as RFC 5952 writes it (as `Ipv6Addr` displays every
/// address but an IPv4-mapped one, which it writes with a dotted quad):
/// lower-case groups without leading zeros, the longest run of two or more
/// zero groups (the first of equals) as `::`.
pub(crate) fn write_v6(out: &mut impl std::fmt::Write, octets: [u8; 16]) {
    let groups = std::net::Ipv6Addr::from(octets).segments();
    // The longest run of zero groups: (start, length).
    let mut best = (0, 0);
    let mut at = 0;
    while at < groups.len() {
        let run = groups.iter().skip(at).take_while(|g| **g == 0).count();
        if run > best.1 {
            best = (at, run);
        }
        at += run.max(1);
    }
    let (skip_from, skip) = if best.1 >= 2 { best } else { (8, 0) };
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (i, g) in groups.iter().enumerate() {
        if (skip_from..skip_from + skip).contains(&i) {
            if i == skip_from {
                let _ = out.write_str("::");
            }
            continue;
        }
        if i > 0 && i != skip_from + skip {
            let _ = out.write_char(':');
        }
        let digits = (4 - (g.leading_zeros() / 4) as usize).max(1);
        for d in (0..digits).rev() {
            let nibble = usize::from((g >> (4 * d)) & 0xf);
            if let Some(&c) = HEX.get(nibble) {
                let _ = out.write_char(char::from(c));
            }
        }
    }
}

/// A decimal number of at most `max` written without leading zeros (`0`
/// itself is one digit): 1 to 3 ASCII digits.
fn decimal(s: &str, max: u16) -> Option<u16> {
    let b = s.as_bytes();
    if b.is_empty() || b.len() > 3 || (b.len() > 1 && b.first() == Some(&b'0')) {
        return None;
    }
    let mut n = 0u16;
    for &c in b {
        if !c.is_ascii_digit() {
            return None;
        }
        n = n * 10 + u16::from(c - b'0');
    }
    (n <= max).then_some(n)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Texts near IPv4 networks: parts of 0-4 digits, 0-5 of them, an
    /// optional length of 0-3 digits, sometimes a stray sign or space.
    fn near_v4() -> impl Strategy<Value = String> {
        prop_oneof![
            "[0-9]{1,4}(\\.[0-9]{1,4}){0,4}(/[0-9]{0,3})?",
            "(25[0-9]|2[0-4][0-9]|1?[0-9]{1,2})(\\.(25[0-9]|1?[0-9]{1,2})){3}(/[0-9]{1,2})?",
            "[0-9+ .]{0,6}(\\.[0-9+ ]{1,4}){3}(/[+0-9 ]{0,3})?",
            any::<(u32, u8)>().prop_map(|(a, l)| format!("{}/{}", Ipv4Addr::from(a), l % 40)),
            "\\PC{0,20}",
        ]
    }

    /// Texts near IPv6 networks: addresses as `Ipv6Addr` displays them,
    /// with zero runs, some changed (upper case, a leading zero, a group
    /// more or less, `::` doubled), with lengths of 0-140.
    fn near_v6() -> impl Strategy<Value = String> {
        let addr = (any::<u128>(), any::<u8>()).prop_map(|(a, zeros)| {
            let mut g = Ipv6Addr::from(a).segments();
            for (i, g) in g.iter_mut().enumerate() {
                if zeros & (1 << i) != 0 {
                    *g = 0;
                }
            }
            Ipv6Addr::from(g).to_string()
        });
        let len = proptest::option::of(0u8..=140);
        (addr, len, 0u8..8).prop_map(|(a, len, change)| {
            let a = match change {
                0 => a.to_uppercase(),
                1 => a.replacen(':', ":0", 1),
                2 => format!("{a}:1"),
                3 => format!("1:{a}"),
                4 => a.replacen("::", ":::", 1),
                5 => format!("{a}::"),
                _ => a,
            };
            match len {
                Some(len) => format!("{a}/{len}"),
                None => a,
            }
        })
    }

    proptest! {
        /// As `the_fast_path_reads_what_ipnet_reads`, for IPv6.
        #[test]
        fn the_ipv6_fast_path_reads_what_ipnet_reads(
            text in prop_oneof![near_v6(), "[0-9a-fA-F:]{0,24}(/[0-9]{1,3})?"],
        ) {
            let reference = parse_slow(&text);
            match quick_v6(&text) {
                Some((addr, len)) => {
                    let net = Ipv6Net::new(addr, len.unwrap_or(128)).unwrap();
                    prop_assert_eq!(reference, Ok(IpNet::V6(net)));
                }
                None => {
                    // Canonical: as the standard library displays it
                    // (dotted quads of IPv4-mapped addresses aside).
                    let canonical = match reference {
                        Ok(IpNet::V6(net)) => {
                            let a = net.addr();
                            a.to_ipv4_mapped().is_none()
                                && (text == net.to_string() || text == a.to_string())
                        }
                        _ => false,
                    };
                    prop_assert!(!canonical, "{:?} is canonical but not read fast", text);
                }
            }
        }

        /// What the fast path reads, `ipnet` reads the same, and it
        /// formats back to the text; what it leaves, `ipnet` reads or
        /// refuses as before. Every canonical IPv4 text takes it.
        #[test]
        fn the_fast_path_reads_what_ipnet_reads(text in near_v4()) {
            let reference = parse_slow(&text);
            match quick_v4(&text) {
                Some((addr, len)) => {
                    let net = Ipv4Net::new(addr, len.unwrap_or(32)).unwrap();
                    prop_assert_eq!(reference, Ok(IpNet::V4(net)));
                    let back = match len {
                        Some(len) => format!("{addr}/{len}"),
                        None => addr.to_string(),
                    };
                    prop_assert_eq!(back, text);
                }
                None => {
                    let canonical = match reference {
                        Ok(IpNet::V4(net)) => text == net.to_string() || text == net.addr().to_string(),
                        _ => false,
                    };
                    prop_assert!(!canonical, "{:?} is canonical but not read fast", text);
                }
            }
        }
    }

    #[test]
    fn texts_at_the_edges() {
        for (text, fast) in [
            ("0.0.0.0/0", true),
            ("255.255.255.255/32", true),
            ("10.0.0.0", true),
            ("10.0.0.0/33", false),
            ("10.0.0.0/08", false),
            ("010.0.0.0/8", false),
            ("256.0.0.0/8", false),
            ("10.0.0/8", false),
            ("10.0.0.0.0/8", false),
            ("10.0.0.0/", false),
            ("+1.0.0.0/8", false),
            ("1.0.0.0/+8", false),
            ("fd00::/8", false),
        ] {
            assert_eq!(quick_v4(text).is_some(), fast, "{text}");
        }
        assert!(parse_cidr("10.0.0.1/8").unwrap_err().contains("host bits"));
        assert!(
            parse_cidr("10.0.0.0/33")
                .unwrap_err()
                .contains("not a CIDR")
        );
        // Texts the fast paths leave are read as before.
        assert_eq!(parse_cidr("10.0.0.0/08"), Ok("10.0.0.0/8".parse().unwrap()));
        assert_eq!(parse_cidr("FD00::/8"), Ok("fd00::/8".parse().unwrap()));
        assert_eq!(
            parse_cidr("::ffff:1.2.3.4"),
            Ok("::ffff:1.2.3.4/128".parse().unwrap())
        );
        for (text, fast) in [
            ("::", true),
            ("::/0", true),
            ("::1", true),
            ("fd00::/8", true),
            ("1:2:3:4:5:6:0:8", true),
            ("1:2:3:4:5:6::8", false),
            ("FD00::/8", false),
            ("fd00:0::/32", false),
            ("::ffff:1.2.3.4", false),
            ("fd00::/129", false),
            ("fd00::/064", false),
            ("1::2::3", false),
        ] {
            assert_eq!(quick_v6(text).is_some(), fast, "{text}");
        }
    }
}
