//! Reading the networks of rules (`10.0.0.0/8`, `fd00::/64`, a bare
//! address as its host route).
//!
//! A change to 100k rules reads each network three times (validation, the
//! compile, packing): a canonical IPv4 network, the common case, is read
//! here in one pass over its bytes ([`quick_v4`]); anything else goes
//! through `ipnet`'s parser, whose answer is the reference the fast path
//! is held to by a property test.

use std::net::Ipv4Addr;

use ipnet::{IpNet, Ipv4Net};

/// Parses a CIDR (or a bare address, as a host route) and rejects host bits.
pub fn parse_cidr(text: &str) -> Result<IpNet, String> {
    let net = match quick_v4(text) {
        Some((addr, len)) => Ipv4Net::new(addr, len.unwrap_or(32))
            .map(IpNet::V4)
            .map_err(|_| not_a_cidr(text))?,
        None => parse_slow(text)?,
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

    proptest! {
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
        assert_eq!(parse_cidr("10.0.0.0/08"), parse_slow("10.0.0.0/08"));
    }
}
