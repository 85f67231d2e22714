//! Stage 2: decide. A pure function of the parsed frame and the maps the
//! control plane wrote; every branch ends in exactly one [`Reason`].

use portcullis_common::{L4, Reason, SETTING_SSH, Settings, port_index};

use crate::{
    maps::PORT_CLASS,
    parse::{Frame, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, Ip},
};

const SSH_PORT: u16 = 22;

/// ICMPv6 router solicitation .. redirect: neighbour and router discovery.
const ND_FIRST: u8 = 133;
const ND_LAST: u8 = 137;
/// RFC 4861: a discovery message whose hop limit is not 255 was forwarded,
/// so it did not come from the link and must be ignored.
const ND_HOP_LIMIT: u8 = 255;

pub fn decide(frame: &Frame, settings: &Settings) -> Reason {
    match frame {
        Frame::Arp => Reason::PassArp,
        Frame::OtherEthertype => Reason::DropEthertype,
        Frame::Ip(ip) => decide_ip(ip, settings),
    }
}

#[inline(always)]
fn decide_ip(ip: &Ip, settings: &Settings) -> Reason {
    match ip.proto {
        IPPROTO_TCP | IPPROTO_UDP if ip.later_fragment => Reason::DropFragment,
        IPPROTO_TCP => decide_port(L4::Tcp, ip.dport, settings),
        IPPROTO_UDP => decide_port(L4::Udp, ip.dport, settings),
        IPPROTO_ICMPV6 if ip.v6 && is_neighbor_discovery(ip) => Reason::PassNeighbor,
        IPPROTO_ICMP | IPPROTO_ICMPV6 => Reason::DropIcmp,
        _ => Reason::DropProtocol,
    }
}

#[inline(always)]
fn is_neighbor_discovery(ip: &Ip) -> bool {
    !ip.later_fragment
        && (ND_FIRST..=ND_LAST).contains(&ip.icmp_type)
        && ip.hop_limit == ND_HOP_LIMIT
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
