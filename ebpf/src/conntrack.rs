//! The connection table: flows this host opened, recorded on egress (TC) and
//! matched on ingress (XDP), so replies to outbound traffic come back in
//! while new inbound traffic still meets the policy.
//!
//! What opens a flow (egress): a TCP SYN without ACK, any UDP datagram, an
//! ICMP/ICMPv6 echo request (keyed by its identifier), any packet of another
//! IP protocol (keyed by the address pair). A TCP packet of an unknown flow
//! that is not a SYN opens nothing: connections accepted from outside stay
//! subject to the rules (the daemon seeds connections that predate it).
//!
//! Entries age by protocol and state ([`flow_timeout_ns`]); the map is an LRU
//! hash, so a full table evicts the least recently used entry and a new
//! inbound packet without an entry is simply not matched (fails closed).

use aya_ebpf::{helpers::bpf_ktime_get_ns, macros::map, maps::LruHashMap};
use portcullis_common::{
    CONNTRACK_DEFAULT_ENTRIES, FLOW_REFRESH_NS, FLOW_REPLIED, FLOW_TCP_CLOSED, FLOW_TCP_CLOSING,
    FLOW_TCP_ESTABLISHED, FLOW_TCP_SYN_SENT, FLOW_UNREPLIED, FRAGMENT_TIMEOUT_NS, Flow, FlowKey,
    FragKey, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, flow_timeout_ns,
};

use crate::parse::Ip;

#[map]
pub static CONNTRACK: LruHashMap<FlowKey, Flow> = LruHashMap::pinned(CONNTRACK_DEFAULT_ENTRIES, 0);

#[map]
pub static FRAGMENTS: LruHashMap<FragKey, u64> = LruHashMap::pinned(8192, 0);

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMPV6_ECHO_REQUEST: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;

#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: a helper without arguments or side effects.
    unsafe { bpf_ktime_get_ns() }
}

/// Direction of a packet relative to this host.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    Out,
    In,
}

/// The flow key of `ip`, or `None` for packets that belong to no flow
/// (ICMP other than echo, for example).
#[inline(always)]
pub fn key(ip: &Ip, dir: Dir) -> Option<FlowKey> {
    let (local, remote, local_port, remote_port) = match dir {
        Dir::Out => (ip.src, ip.dst, ip.sport, ip.dport),
        Dir::In => (ip.dst, ip.src, ip.dport, ip.sport),
    };
    let (local_port, remote_port) = match ip.proto {
        IPPROTO_TCP | IPPROTO_UDP => (local_port, remote_port),
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            let echo = match (dir, ip.icmp_type) {
                (Dir::Out, ICMP_ECHO_REQUEST) => ip.proto == IPPROTO_ICMP,
                (Dir::Out, ICMPV6_ECHO_REQUEST) => ip.proto == IPPROTO_ICMPV6,
                (Dir::In, ICMP_ECHO_REPLY) => ip.proto == IPPROTO_ICMP,
                (Dir::In, ICMPV6_ECHO_REPLY) => ip.proto == IPPROTO_ICMPV6,
                _ => false,
            };
            if !echo {
                return None;
            }
            (ip.icmp_id, 0)
        }
        _ => (0, 0),
    };
    Some(FlowKey {
        local,
        remote,
        local_port,
        remote_port,
        proto: ip.proto,
        family: ip.family,
        _pad: [0; 2],
    })
}

/// Egress: opens or refreshes the flow of `ip`.
#[inline(always)]
pub fn track_egress(ip: &Ip) {
    if ip.later_fragment {
        return;
    }
    let Some(key) = key(ip, Dir::Out) else {
        return;
    };
    let now = now();
    if let Some(flow) = CONNTRACK.get_ptr_mut(&key) {
        // SAFETY: pointer from a successful lookup; concurrent writers only
        // race on a timestamp and a state byte, both benign.
        let flow = unsafe { &mut *flow };
        let state = next_state(ip, Dir::Out, flow.state);
        touch(flow, state, now);
        return;
    }
    let state = match ip.proto {
        IPPROTO_TCP if ip.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN => FLOW_TCP_SYN_SENT,
        IPPROTO_TCP => return,
        _ => FLOW_UNREPLIED,
    };
    let flow = Flow {
        last_seen_ns: now,
        state,
        _pad: [0; 7],
    };
    let _ = CONNTRACK.insert(&key, &flow, 0);
}

/// Ingress: whether `ip` belongs to a live flow this host opened; refreshes it.
#[inline(always)]
pub fn match_ingress(ip: &Ip) -> bool {
    match key(ip, Dir::In) {
        Some(key) => match_key(&key, Some(ip)),
        None => false,
    }
}

/// Whether `key` is a live flow. With `ip`, the flow is refreshed by it.
#[inline(always)]
pub fn match_key(key: &FlowKey, ip: Option<&Ip>) -> bool {
    let Some(flow) = CONNTRACK.get_ptr_mut(key) else {
        return false;
    };
    // SAFETY: pointer from a successful lookup; see `track_egress`.
    let flow = unsafe { &mut *flow };
    let now = now();
    if now.saturating_sub(flow.last_seen_ns) > flow_timeout_ns(key.proto, flow.state) {
        let _ = CONNTRACK.remove(key);
        return false;
    }
    if let Some(ip) = ip {
        let state = next_state(ip, Dir::In, flow.state);
        touch(flow, state, now);
    }
    true
}

#[inline(always)]
fn touch(flow: &mut Flow, state: u8, now: u64) {
    if state != flow.state || now.saturating_sub(flow.last_seen_ns) > FLOW_REFRESH_NS {
        flow.state = state;
        flow.last_seen_ns = now;
    }
}

#[inline(always)]
fn next_state(ip: &Ip, dir: Dir, state: u8) -> u8 {
    if ip.proto != IPPROTO_TCP {
        return if dir == Dir::In { FLOW_REPLIED } else { state };
    }
    let f = ip.tcp_flags;
    if f & TCP_RST != 0 {
        FLOW_TCP_CLOSED
    } else if f & TCP_FIN != 0 {
        FLOW_TCP_CLOSING
    } else if f & (TCP_SYN | TCP_ACK) == TCP_SYN && dir == Dir::Out {
        // A new connection reusing the tuple of an old one.
        FLOW_TCP_SYN_SENT
    } else if state == FLOW_TCP_SYN_SENT
        && dir == Dir::In
        && f & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK
    {
        FLOW_TCP_ESTABLISHED
    } else {
        state
    }
}

#[inline(always)]
fn frag_key(ip: &Ip) -> FragKey {
    FragKey {
        src: ip.src,
        dst: ip.dst,
        id: ip.frag_id,
        proto: ip.proto,
        family: ip.family,
        _pad: [0; 2],
    }
}

/// Remembers a first fragment that passed, so its later fragments pass too.
#[inline(always)]
pub fn remember_fragment(ip: &Ip) {
    let _ = FRAGMENTS.insert(&frag_key(ip), &now(), 0);
}

/// Whether the later fragment `ip` belongs to a packet whose first fragment passed.
#[inline(always)]
pub fn fragment_admitted(ip: &Ip) -> bool {
    match FRAGMENTS.get_ptr(&frag_key(ip)) {
        // SAFETY: pointer from a successful lookup of a plain u64.
        Some(seen) => now().saturating_sub(unsafe { *seen }) <= FRAGMENT_TIMEOUT_NS,
        None => false,
    }
}
