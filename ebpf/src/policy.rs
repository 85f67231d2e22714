//! Stage 2: decide. A function of the parsed frame, the connection table and
//! the maps the control plane wrote; every branch ends in exactly one
//! [`Reason`]. The order is: flows this host opened, then what a host always
//! needs (neighbour discovery, DHCP replies, ICMP errors about its own flows),
//! then the rules.

use portcullis_common::{
    FAMILY_V6, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, L4, Reason, SETTING_PING,
    SETTING_SSH, Settings, port_index,
};

use crate::{
    conntrack::{self, Dir},
    maps::PORT_CLASS,
    parse::{self, Frame, Ip, Packet},
};

const SSH_PORT: u16 = 22;

/// ICMPv6 router solicitation .. redirect: neighbour and router discovery.
const ND_FIRST: u8 = 133;
const ND_LAST: u8 = 137;
/// RFC 4861: a discovery message whose hop limit is not 255 was forwarded,
/// so it did not come from the link and must be ignored.
const ND_HOP_LIMIT: u8 = 255;

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PACKET_TOO_BIG: u8 = 2;
const ICMPV6_TIME_EXCEEDED: u8 = 3;
const ICMPV6_PARAMETER_PROBLEM: u8 = 4;
const ICMPV6_ECHO_REQUEST: u8 = 128;

const DHCPV4_SERVER: u16 = 67;
const DHCPV4_CLIENT: u16 = 68;
const DHCPV6_SERVER: u16 = 547;
const DHCPV6_CLIENT: u16 = 546;

#[inline(always)]
pub fn decide<P: Packet>(p: &P, frame: &Frame, settings: &Settings) -> Reason {
    match frame {
        Frame::Arp => Reason::PassArp,
        Frame::OtherEthertype => Reason::DropEthertype,
        Frame::VlanStack => Reason::DropVlanStack,
        Frame::Ip(ip) if ip.later_fragment => {
            if conntrack::fragment_admitted(ip) {
                Reason::PassFragment
            } else {
                Reason::DropFragment
            }
        }
        Frame::Ip(ip) => {
            let reason = decide_ip(p, ip, settings);
            if ip.fragment && reason.passes() {
                conntrack::remember_fragment(ip);
            }
            reason
        }
    }
}

#[inline(always)]
fn decide_ip<P: Packet>(p: &P, ip: &Ip, settings: &Settings) -> Reason {
    if conntrack::match_ingress(ip) {
        return Reason::PassEstablished;
    }
    match ip.proto {
        IPPROTO_TCP => decide_port(L4::Tcp, ip.dport, settings),
        IPPROTO_UDP if is_dhcp_reply(ip) => Reason::PassDhcp,
        IPPROTO_UDP => decide_port(L4::Udp, ip.dport, settings),
        IPPROTO_ICMP | IPPROTO_ICMPV6 => decide_icmp(p, ip, settings),
        _ => Reason::DropProtocol,
    }
}

#[inline(always)]
fn is_dhcp_reply(ip: &Ip) -> bool {
    if ip.family == FAMILY_V6 {
        ip.sport == DHCPV6_SERVER && ip.dport == DHCPV6_CLIENT
    } else {
        ip.sport == DHCPV4_SERVER && ip.dport == DHCPV4_CLIENT
    }
}

#[inline(always)]
fn decide_icmp<P: Packet>(p: &P, ip: &Ip, settings: &Settings) -> Reason {
    let v6 = ip.proto == IPPROTO_ICMPV6;
    if v6 != (ip.family == FAMILY_V6) {
        // ICMPv4 in IPv6 or ICMPv6 in IPv4.
        return Reason::DropIcmp;
    }
    let t = ip.icmp_type;
    if v6 && (ND_FIRST..=ND_LAST).contains(&t) {
        return if ip.hop_limit == ND_HOP_LIMIT {
            Reason::PassNeighbor
        } else {
            Reason::DropIcmp
        };
    }
    let echo_request = if v6 {
        t == ICMPV6_ECHO_REQUEST
    } else {
        t == ICMP_ECHO_REQUEST
    };
    if echo_request {
        return if settings.flags & SETTING_PING != 0 {
            Reason::PassPing
        } else {
            Reason::DropIcmp
        };
    }
    let error = if v6 {
        matches!(
            t,
            ICMPV6_DEST_UNREACH
                | ICMPV6_PACKET_TOO_BIG
                | ICMPV6_TIME_EXCEEDED
                | ICMPV6_PARAMETER_PROBLEM
        )
    } else {
        matches!(
            t,
            ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM
        )
    };
    if error && related(p, ip, settings) {
        return Reason::PassRelated;
    }
    Reason::DropIcmp
}

/// Whether the packet an ICMP error quotes is one this host sent on a flow it
/// opened, or from a port it serves (path-MTU discovery for its servers).
#[inline(always)]
fn related<P: Packet>(p: &P, ip: &Ip, settings: &Settings) -> bool {
    let Ok(quoted) = parse::embedded(p, ip) else {
        return false;
    };
    // The quoted packet went out from this host to the error's sender side.
    if quoted.src != ip.dst || quoted.family != ip.family {
        return false;
    }
    if let Some(key) = conntrack::key(&quoted, Dir::Out) {
        if conntrack::match_key(&key, None) {
            return true;
        }
    }
    let l4 = match quoted.proto {
        IPPROTO_TCP => L4::Tcp,
        IPPROTO_UDP => L4::Udp,
        _ => return false,
    };
    decide_port(l4, quoted.sport, settings).passes()
}

#[inline(always)]
fn decide_port(proto: L4, dport: u16, settings: &Settings) -> Reason {
    if proto == L4::Tcp && dport == SSH_PORT && settings.flags & SETTING_SSH != 0 {
        return Reason::PassSsh;
    }
    match PORT_CLASS.get(port_index(proto, dport)) {
        Some(class) if *class != 0 => Reason::PassRule,
        _ => Reason::DropNoRule,
    }
}
