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
//! Inbound traffic the rules admit (a rule, a peer, the SSH exemption) is
//! recorded too, marked `ORIGIN_IN`: such an entry never admits an inbound
//! packet (each one meets the rules, so removing a rule stops the flow at
//! once); it is what lets this host's replies out under an egress allowlist
//! (with the rules still admitting the flow) and what an ICMP error about
//! the flow is related to. A reply is a packet of a tracked flow, never a
//! packet that merely comes from a served port.
//!
//! Only this host's own packets shorten a flow's life: an inbound FIN or RST
//! (which anyone who knows or guesses the 4-tuple can forge, since no
//! sequence numbers are checked) leaves the state as it is.
//!
//! Entries age by protocol and state ([`flow_timeout_ns`]); the map is an LRU
//! hash, so a full table evicts the least recently used entry and a new
//! inbound packet without an entry is simply not matched (fails closed).

use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    macros::map,
    maps::{Array, LruHashMap},
};
use portcullis_common::{
    CONNTRACK_DEFAULT_ENTRIES, DHCP_REPLY_WINDOW_NS, DHCP_V4, DHCP_V6, FAMILY_V6, FLOW_REFRESH_NS,
    FLOW_REPLIED, FLOW_TCP_CLOSED, FLOW_TCP_CLOSING, FLOW_TCP_ESTABLISHED, FLOW_TCP_SYN_SENT,
    FLOW_UNREPLIED, FRAGMENT_TIMEOUT_NS, Flow, FlowKey, FragKey, IPPROTO_ICMP, IPPROTO_ICMPV6,
    IPPROTO_TCP, IPPROTO_UDP, ORIGIN_IN, ORIGIN_OUT, flow_timeout_ns,
};

use crate::parse::Ip;

/// `FlowKey` (this host's address and port, the other end's, protocol) →
/// `Flow` (last seen, state, origin). Written by egress (flows this host
/// opens), by ingress (inbound flows the rules admitted, `ORIGIN_IN`; state
/// changes of tracked flows) and by the daemon (seeded from sock_diag).
#[map]
pub static CONNTRACK: LruHashMap<FlowKey, Flow> = LruHashMap::pinned(CONNTRACK_DEFAULT_ENTRIES, 0);

/// `FragKey` (addresses, IP id, protocol, direction) → when its first
/// fragment passed. Ingress admits later fragments of a first fragment that
/// passed ingress; egress, under an allowlist, of one that passed egress.
#[map]
pub static FRAGMENTS: LruHashMap<FragKey, u64> = LruHashMap::pinned(8192, 0);

/// `DHCP_V4`/`DHCP_V6` → when this host last sent a DHCP client request of
/// that family (egress writes it); ingress admits server replies only within
/// `DHCP_REPLY_WINDOW_NS` of it. 0: never.
#[map]
pub static DHCP_REQUESTS: Array<u64> = Array::pinned(2, 0);

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
        let state = next_state(ip, Dir::Out, flow);
        touch(flow, state, now);
        return;
    }
    let state = match ip.proto {
        IPPROTO_TCP if ip.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN => FLOW_TCP_SYN_SENT,
        IPPROTO_TCP => return,
        _ => FLOW_UNREPLIED,
    };
    insert(&key, state, ORIGIN_OUT, now);
}

#[inline(always)]
fn insert(key: &FlowKey, state: u8, origin: u8, now: u64) {
    let flow = Flow {
        last_seen_ns: now,
        state,
        origin,
        _pad: [0; 6],
    };
    let _ = CONNTRACK.insert(key, &flow, 0);
}

/// Ingress, after the rules admitted `ip`: records (or refreshes, at most
/// once a second) its flow as inbound-originated, so this host's replies
/// may leave under an egress allowlist. A flow this host opened is left as
/// it is (`match_ingress` already refreshed it).
#[inline(always)]
pub fn track_ingress(ip: &Ip) {
    if ip.later_fragment {
        return;
    }
    let Some(key) = key(ip, Dir::In) else {
        return;
    };
    let now = now();
    if let Some(flow) = CONNTRACK.get_ptr_mut(&key) {
        // SAFETY: pointer from a successful lookup; see `track_egress`.
        let flow = unsafe { &mut *flow };
        if flow.origin == ORIGIN_IN {
            let state = next_state(ip, Dir::In, flow);
            touch(flow, state, now);
        }
        return;
    }
    let state = match ip.proto {
        IPPROTO_TCP if ip.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN => FLOW_TCP_SYN_SENT,
        IPPROTO_TCP => FLOW_TCP_ESTABLISHED,
        _ => FLOW_UNREPLIED,
    };
    insert(&key, state, ORIGIN_IN, now);
}

/// Ingress: whether `ip` belongs to a live flow this host opened; refreshes
/// it. Inbound-originated flows do not count: the rules decide those.
#[inline(always)]
pub fn match_ingress(ip: &Ip) -> bool {
    match key(ip, Dir::In) {
        Some(key) => lookup(&key, Some(ip)) == Some(ORIGIN_OUT),
        None => false,
    }
}

/// The origin of the live flow `key`, or `None` (no entry, or expired: then
/// removed). With `ip`, a flow this host opened is refreshed by it.
#[inline(always)]
pub fn lookup(key: &FlowKey, ip: Option<&Ip>) -> Option<u8> {
    let flow = CONNTRACK.get_ptr_mut(key)?;
    // SAFETY: pointer from a successful lookup; see `track_egress`.
    let flow = unsafe { &mut *flow };
    let now = now();
    if now.saturating_sub(flow.last_seen_ns) > flow_timeout_ns(key.proto, flow.state) {
        let _ = CONNTRACK.remove(key);
        return None;
    }
    if let Some(ip) = ip
        && flow.origin == ORIGIN_OUT
    {
        let state = next_state(ip, Dir::In, flow);
        touch(flow, state, now);
    }
    Some(flow.origin)
}

#[inline(always)]
fn touch(flow: &mut Flow, state: u8, now: u64) {
    if state != flow.state || now.saturating_sub(flow.last_seen_ns) > FLOW_REFRESH_NS {
        flow.state = state;
        flow.last_seen_ns = now;
    }
}

/// The state of `flow` after the packet `ip` going `dir`. Only this host's
/// own FIN or RST (`Dir::Out`) closes a flow: an inbound one is not checked
/// against the sequence numbers, so it may be forged and changes nothing.
#[inline(always)]
fn next_state(ip: &Ip, dir: Dir, flow: &Flow) -> u8 {
    let state = flow.state;
    // Relative to the flow: does the packet come from the side that opened it?
    let from_opener = (dir == Dir::Out) == (flow.origin == ORIGIN_OUT);
    if ip.proto != IPPROTO_TCP {
        return if from_opener { state } else { FLOW_REPLIED };
    }
    let f = ip.tcp_flags;
    if dir == Dir::In && f & (TCP_RST | TCP_FIN) != 0 {
        state
    } else if f & TCP_RST != 0 {
        FLOW_TCP_CLOSED
    } else if f & TCP_FIN != 0 {
        FLOW_TCP_CLOSING
    } else if f & (TCP_SYN | TCP_ACK) == TCP_SYN && from_opener {
        // A new connection reusing the tuple of an old one.
        FLOW_TCP_SYN_SENT
    } else if state == FLOW_TCP_SYN_SENT
        && !from_opener
        && f & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK
    {
        FLOW_TCP_ESTABLISHED
    } else {
        state
    }
}

#[inline(always)]
fn frag_key(ip: &Ip, dir: u8) -> FragKey {
    FragKey {
        src: ip.src,
        dst: ip.dst,
        id: ip.frag_id,
        proto: ip.proto,
        family: ip.family,
        dir,
        _pad: 0,
    }
}

/// Remembers a first fragment that passed `dir` (`DIR_INGRESS`/`DIR_EGRESS`),
/// so its later fragments pass that way too.
#[inline(always)]
pub fn remember_fragment(ip: &Ip, dir: u8) {
    let _ = FRAGMENTS.insert(&frag_key(ip, dir), &now(), 0);
}

/// Whether the later fragment `ip` belongs to a packet whose first fragment
/// passed `dir`.
#[inline(always)]
pub fn fragment_admitted(ip: &Ip, dir: u8) -> bool {
    match FRAGMENTS.get_ptr(&frag_key(ip, dir)) {
        // SAFETY: pointer from a successful lookup of a plain u64.
        Some(seen) => now().saturating_sub(unsafe { *seen }) <= FRAGMENT_TIMEOUT_NS,
        None => false,
    }
}

#[inline(always)]
fn dhcp_index(ip: &Ip) -> u32 {
    if ip.family == FAMILY_V6 {
        DHCP_V6
    } else {
        DHCP_V4
    }
}

/// Egress: this host sent a DHCP client request of `ip`'s family now.
#[inline(always)]
pub fn dhcp_requested(ip: &Ip) {
    if let Some(t) = DHCP_REQUESTS.get_ptr_mut(dhcp_index(ip)) {
        // SAFETY: pointer from a successful lookup of a plain u64 in an array;
        // concurrent writers only race on a timestamp, which is benign.
        unsafe { *t = now() };
    }
}

/// Ingress: whether a DHCP server reply of `ip`'s family comes within the
/// window after this host's last client request of that family.
#[inline(always)]
pub fn dhcp_expected(ip: &Ip) -> bool {
    match DHCP_REQUESTS.get(dhcp_index(ip)) {
        Some(&t) => t != 0 && now().saturating_sub(t) <= DHCP_REPLY_WINDOW_NS,
        None => false,
    }
}
