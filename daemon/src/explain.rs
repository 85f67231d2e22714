//! `portcullis explain` (pure): a packet's description, the frame crafted
//! from it, and the words for what the data path decided. The decision
//! itself is never computed here: the core runs the loaded programs'
//! explain instance on the frame (`dataplane::explain`, `BPF_PROG_TEST_RUN`)
//! and this module only names what that run reported.

use std::net::IpAddr;

use portcullis_common::Reason;
use serde::{Deserialize, Serialize};

/// Which way the packet goes, seen from this host.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Arriving (the XDP ingress program decides).
    In,
    /// Leaving (the TC egress program decides).
    Out,
}

/// The transport of the packet.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
    /// ICMP for IPv4, ICMPv6 for IPv6.
    Icmp,
}

/// A packet to explain. Ports are ignored for ICMP; `icmp_type` defaults to
/// an echo request of the family, `tcp_flags` to a SYN (a new connection).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Probe {
    pub direction: Direction,
    pub protocol: Proto,
    pub source: IpAddr,
    #[serde(default)]
    pub source_port: u16,
    pub destination: IpAddr,
    #[serde(default)]
    pub destination_port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub icmp_type: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_flags: Option<u8>,
    /// The interface it arrives on or leaves by (must be protected).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
}

/// TCP flags by name.
pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;

impl Probe {
    /// Reads `in tcp 10.200.1.2:40000 -> 10.200.1.1:22` (the words of the
    /// command line; IPv6 as `[fd00::1]:22`; ICMP without ports). A source
    /// port left out is 40000.
    pub fn parse(words: &[String]) -> Result<Probe, String> {
        let [dir, proto, src, arrow, dst] = words else {
            return Err(format!(
                "expected DIRECTION PROTOCOL SOURCE -> DESTINATION (e.g. `in tcp 10.0.0.2:40000 -> 10.0.0.1:22`), got {} words",
                words.len()
            ));
        };
        let direction = match dir.as_str() {
            "in" | "ingress" => Direction::In,
            "out" | "egress" => Direction::Out,
            other => return Err(format!("direction {other:?}: expected `in` or `out`")),
        };
        let protocol = match proto.as_str() {
            "tcp" => Proto::Tcp,
            "udp" => Proto::Udp,
            "icmp" | "icmpv6" | "ping" => Proto::Icmp,
            other => return Err(format!("protocol {other:?}: expected tcp, udp or icmp")),
        };
        if arrow != "->" {
            return Err(format!(
                "expected `->` between the addresses, got {arrow:?}"
            ));
        }
        let ported = protocol != Proto::Icmp;
        let (source, source_port) = endpoint(src, ported, Some(40000), "source")?;
        let (destination, destination_port) = endpoint(dst, ported, None, "destination")?;
        if source.is_ipv4() != destination.is_ipv4() {
            return Err("source and destination are of different families".into());
        }
        Ok(Probe {
            direction,
            protocol,
            source,
            source_port,
            destination,
            destination_port,
            icmp_type: None,
            tcp_flags: None,
            interface: None,
        })
    }

    /// The remote end: the source of an arriving packet, the destination of
    /// a leaving one.
    pub fn remote(&self) -> IpAddr {
        match self.direction {
            Direction::In => self.source,
            Direction::Out => self.destination,
        }
    }

    /// One line: `in tcp 10.0.0.2:40000 -> 10.0.0.1:22`.
    pub fn describe(&self) -> String {
        let dir = match self.direction {
            Direction::In => "in",
            Direction::Out => "out",
        };
        let at = |a: IpAddr, p: u16| match (self.protocol, a) {
            (Proto::Icmp, a) => a.to_string(),
            (_, IpAddr::V6(a)) => format!("[{a}]:{p}"),
            (_, a) => format!("{a}:{p}"),
        };
        let proto = match self.protocol {
            Proto::Tcp => "tcp".to_string(),
            Proto::Udp => "udp".to_string(),
            Proto::Icmp => format!("icmp type {}", self.icmp_kind()),
        };
        format!(
            "{dir} {proto} {} -> {}",
            at(self.source, self.source_port),
            at(self.destination, self.destination_port)
        )
    }

    fn icmp_kind(&self) -> u8 {
        self.icmp_type
            .unwrap_or(if self.source.is_ipv4() { 8 } else { 128 })
    }

    /// The Ethernet frame the program is run on: Ethernet, an IPv4 header
    /// (checksummed) or IPv6 header, and a TCP, UDP or ICMP header. IPv6
    /// neighbour discovery (ICMPv6 133-137) gets hop limit 255, as on the
    /// link; everything else 64.
    pub fn frame(&self) -> Result<Vec<u8>, String> {
        let transport = self.transport();
        let proto_number = match (self.protocol, self.source) {
            (Proto::Tcp, _) => 6u8,
            (Proto::Udp, _) => 17,
            (Proto::Icmp, IpAddr::V4(_)) => 1,
            (Proto::Icmp, IpAddr::V6(_)) => 58,
        };
        let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
        match (self.source, self.destination) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                f.extend_from_slice(&[0x08, 0x00]);
                let total = (20 + transport.len()) as u16;
                let mut ip = vec![0x45, 0];
                ip.extend_from_slice(&total.to_be_bytes());
                ip.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, proto_number, 0, 0]);
                ip.extend_from_slice(&s.octets());
                ip.extend_from_slice(&d.octets());
                let sum = checksum(&ip).to_be_bytes();
                ip.splice(10..12, sum);
                f.extend_from_slice(&ip);
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                f.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
                f.extend_from_slice(&(transport.len() as u16).to_be_bytes());
                let nd = self.protocol == Proto::Icmp && (133..=137).contains(&self.icmp_kind());
                f.extend_from_slice(&[proto_number, if nd { 255 } else { 64 }]);
                f.extend_from_slice(&s.octets());
                f.extend_from_slice(&d.octets());
            }
            _ => return Err("source and destination are of different families".into()),
        }
        f.extend_from_slice(&transport);
        Ok(f)
    }

    fn transport(&self) -> Vec<u8> {
        let (sp, dp) = (
            self.source_port.to_be_bytes(),
            self.destination_port.to_be_bytes(),
        );
        match self.protocol {
            Proto::Tcp => {
                let flags = self.tcp_flags.unwrap_or(TCP_SYN);
                let mut t = vec![sp[0], sp[1], dp[0], dp[1], 0, 0, 0, 1, 0, 0, 0, 0];
                t.extend_from_slice(&[0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
                t
            }
            Proto::Udp => vec![
                sp[0], sp[1], dp[0], dp[1], 0, 16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            ],
            Proto::Icmp => vec![self.icmp_kind(), 0, 0, 0, 0x12, 0x34, 0, 1],
        }
    }
}

/// `ADDR:PORT`, `[V6]:PORT`, or a bare address (ICMP; a source's port
/// defaults to `default`).
fn endpoint(
    s: &str,
    ported: bool,
    default: Option<u16>,
    what: &str,
) -> Result<(IpAddr, u16), String> {
    if let Ok(a) = s.parse::<IpAddr>() {
        return match (ported, default) {
            (false, _) => Ok((a, 0)),
            (true, Some(p)) => Ok((a, p)),
            (true, None) => Err(format!(
                "{what} {s:?}: give a port (ADDRESS:PORT, [IPv6]:PORT)"
            )),
        };
    }
    if !ported {
        return Err(format!(
            "{what} {s:?}: ICMP takes an address without a port"
        ));
    }
    let (addr, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("{what} {s:?}: expected ADDRESS:PORT"))?;
    let addr = addr.trim_start_matches('[').trim_end_matches(']');
    let a = addr
        .parse::<IpAddr>()
        .map_err(|_| format!("{what} {s:?}: {addr:?} is not an IP address"))?;
    let p = port
        .parse::<u16>()
        .map_err(|_| format!("{what} {s:?}: {port:?} is not a port (0-65535)"))?;
    Ok((a, p))
}

fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| match c {
            [a, b] => u32::from(u16::from_be_bytes([*a, *b])),
            [a] => u32::from(*a) << 8,
            _ => 0,
        })
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// What one program run decided, in the daemon's words.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Decision {
    /// Whether the packet goes through (the program's return value).
    pub passes: bool,
    /// The reason counter the live path would count (`pass_rule`, ...);
    /// `None` when the program passes it uncounted (egress: not IP, or not
    /// parsable without an egress allowlist).
    pub reason: Option<String>,
    /// Audit or open mode turned a drop into a pass.
    #[serde(default)]
    pub audited: bool,
    /// The rule, peer or SSH exemption credited: `rule:<id>`, `cluster:<id>`,
    /// `ssh`, `egress:<id>` (the rule counters' names).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credited: Option<String>,
    /// The deny set whose entry dropped it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deny_set: Option<String>,
    /// The rule generation that decided (a dry run against proposed rules:
    /// none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    /// One sentence: why.
    pub why: String,
}

impl Decision {
    /// The comparable part: verdict, reason, credit and set.
    pub fn same_as(&self, other: &Decision) -> bool {
        (self.passes, &self.reason, &self.credited, &self.deny_set)
            == (
                other.passes,
                &other.reason,
                &other.credited,
                &other.deny_set,
            )
    }
}

/// The answer of `POST /v1/explain`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Explained {
    pub packet: String,
    /// The interface asked about, when one was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    /// What the live data path decides.
    pub live: Decision,
    /// What the proposed rule set (`--rules FILE`) would decide.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proposed: Option<Decision>,
    /// The proposed set decides otherwise than the live one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub differs: Option<bool>,
}

/// The request of `POST /v1/explain`: the packet and, optionally, a
/// proposed rule set (a replacement, as `PUT /v1/rules` takes).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Request {
    pub packet: Probe,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<crate::rules::Replacement>,
}

/// The sentence for `reason` (with what was credited or hit).
pub fn why(reason: Option<Reason>, credited: Option<&str>, set: Option<&str>) -> String {
    let Some(reason) = reason else {
        return "passes uncounted: not an IP packet the egress program reads, and no egress allowlist is on".into();
    };
    let by = credited.unwrap_or("?");
    match reason {
        Reason::PassRule | Reason::PassPeer | Reason::PassSsh => {
            format!("a new connection admitted by {by}")
        }
        Reason::PassEgress if credited.is_some() => format!("admitted by egress rule {by}"),
        Reason::PassEgress => "egress passes: no egress allowlist, or a flow this host opened, a reply on an admitted inbound flow, or what a host always sends".into(),
        Reason::PassEstablished => "a packet of a flow this host opened (the connection table)".into(),
        Reason::PassRelated => "an ICMP error about a tracked flow".into(),
        Reason::PassDhcp => "a DHCP reply to this host's own request".into(),
        Reason::PassPing => "an echo request no rule admits, passed because pings are allowed".into(),
        Reason::PassNeighbor => "neighbour discovery (hop limit 255)".into(),
        Reason::PassFragment => "a later fragment of a packet that passed".into(),
        Reason::PassArp => "ARP".into(),
        Reason::DropDenied => format!("its source is in deny set {}", set.unwrap_or("?")),
        Reason::DropNoRule => "no rule, peer or the SSH exemption admits this source, protocol and port".into(),
        Reason::DropIcmp => "ICMP that no rule admits (and not an echo request while pings are allowed)".into(),
        Reason::DropEgress => "the egress allowlist admits nothing for this destination and port, and it belongs to no tracked flow".into(),
        Reason::DropOtherCluster => "from a member of another cluster, and no rule admits it".into(),
        Reason::DropMalformed => "the headers are truncated or inconsistent".into(),
        other => format!("decided by the step `{}`", other.name()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn a_packet_reads_like_the_task() {
        let p = Probe::parse(&words("in tcp 10.200.1.2:40000 -> 10.200.1.1:22")).unwrap();
        assert_eq!(p.direction, Direction::In);
        assert_eq!((p.source_port, p.destination_port), (40000, 22));
        assert_eq!(p.describe(), "in tcp 10.200.1.2:40000 -> 10.200.1.1:22");
        let p = Probe::parse(&words("out udp [fd00:200::1]:5000 -> [fd00:200::2]:53")).unwrap();
        assert_eq!(p.remote().to_string(), "fd00:200::2");
        let p = Probe::parse(&words("in icmp 10.0.0.2 -> 10.0.0.1")).unwrap();
        assert_eq!(p.describe(), "in icmp type 8 10.0.0.2 -> 10.0.0.1");
    }

    #[test]
    fn bad_descriptions_say_what_is_wrong() {
        let e = Probe::parse(&words("in tcp 10.0.0.2 -> 10.0.0.1")).unwrap_err();
        assert!(e.contains("destination") && e.contains("port"), "{e}");
        let e = Probe::parse(&words("sideways tcp 1.2.3.4:1 -> 1.2.3.5:2")).unwrap_err();
        assert!(e.contains("direction"), "{e}");
        let e = Probe::parse(&words("in tcp 1.2.3.4:1 -> [fd00::1]:2")).unwrap_err();
        assert!(e.contains("families"), "{e}");
        let e = Probe::parse(&words("in tcp 1.2.3.4:1 -> 1.2.3.5:70000")).unwrap_err();
        assert!(e.contains("not a port"), "{e}");
    }

    #[test]
    fn frames_have_consistent_lengths_and_a_valid_ipv4_checksum() {
        let p = Probe::parse(&words("in tcp 10.0.0.2:40000 -> 10.0.0.1:22")).unwrap();
        let f = p.frame().unwrap();
        assert_eq!(f.len(), 14 + 20 + 20);
        assert_eq!(checksum(&f[14..34]), 0);
        assert_eq!(f[14 + 20 + 13], TCP_SYN);
        let p = Probe::parse(&words("in udp [fd00::2]:1 -> [fd00::1]:53")).unwrap();
        let f = p.frame().unwrap();
        assert_eq!(f.len(), 14 + 40 + 16);
        assert_eq!(u16::from_be_bytes([f[18], f[19]]), 16);
    }
}
