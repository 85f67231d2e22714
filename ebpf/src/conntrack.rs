//! The connection tables (per family: `CONNTRACK4` keyed by a 16-byte IPv4
//! 5-tuple, `CONNTRACK6` by a 40-byte one): flows this host opened, recorded on egress (TC) and
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
//! recorded too, in tables of their own (`INBOUND4`/`INBOUND6`): such an entry never
//! admits an inbound packet (each one meets the rules, so removing a rule
//! stops the flow at once); it is what lets this host's replies out under an
//! egress allowlist (with the rules still admitting the flow) and what an
//! ICMP error about the flow is related to. A reply is a packet of a tracked
//! flow, never a packet that merely comes from a served port. Its own table,
//! so a flood of admitted inbound flows evicts only inbound flows, never the
//! flows this host opened.
//!
//! The SYN-flood guard: an inbound TCP connection enters `INBOUND4`/`6` only
//! when its handshake completes. This host's SYN-ACK (egress) records its
//! sequence number in a half-open entry (`EMBRYO4`/`6`); the ACK of exactly
//! that number plus one (which an off-path sender cannot know) moves the
//! connection to `INBOUND4`/`6`. Under an egress allowlist the admitted SYN
//! makes the half-open entry, and only a SYN-ACK that answers one leaves;
//! without one the SYN-ACK makes it (an admitted SYN costs no table update
//! on its way in). Forged SYNs or ACKs, in any number, fill only the
//! half-open table.
//! Protocols without a handshake (UDP, ICMP echo, the rest) have tables of
//! their own (`INBOUND_OTHER4`/`6`), so a forged flood of them cannot evict
//! an inbound TCP connection either.
//!
//! Only this host's own packets shorten a flow's life: an inbound FIN or RST
//! (which anyone who knows or guesses the 4-tuple can forge, since no
//! sequence numbers are checked) leaves the state as it is.
//!
//! Entries age by protocol and state ([`flow_timeout_ns`]); each map is an LRU
//! hash, so a full table evicts the least recently used entry and a new
//! inbound packet without an entry is simply not matched (fails closed).

use aya_ebpf::{
    macros::map,
    maps::{Array, LruHashMap},
};
use portcullis_common::{
    CONNTRACK_DEFAULT_ENTRIES, DHCP_REPLY_WINDOW_NS, DHCP_V4, DHCP_V6, Embryo, FAMILY_V6,
    FLOW_REFRESH_NS, FLOW_REPLIED, FLOW_TCP_CLOSED, FLOW_TCP_CLOSING, FLOW_TCP_ESTABLISHED,
    FLOW_TCP_SYN_SENT, FLOW_UNREPLIED, FRAGMENT_TIMEOUT_NS, Flow, FlowKey, FlowKey4, FragKey,
    ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, ICMPV6_ECHO_REPLY, ICMPV6_ECHO_REQUEST, IPPROTO_ICMP,
    IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, flow_timeout_ns,
};

use crate::{
    clock::now,
    flowcache::{self, Slot as _},
    parse::Ip,
};

/// `FlowKey4` (this host's address and port, the other end's, protocol:
/// 16 bytes) → `Flow` (last seen, state): the IPv4 flows this host opened.
/// Written by egress (new flows, state), ingress (state) and the daemon
/// (seeded from sock_diag). One table per family, so an IPv4 key is as
/// small as its 5-tuple: the hash and the compare of every lookup read 16
/// bytes, not 40.
#[map]
pub static CONNTRACK4: LruHashMap<FlowKey4, Flow> =
    LruHashMap::pinned(CONNTRACK_DEFAULT_ENTRIES, 0);

/// `FlowKey` (40 bytes) → `Flow`, as `CONNTRACK4`: the IPv6 flows.
#[map]
pub static CONNTRACK6: LruHashMap<FlowKey, Flow> = LruHashMap::pinned(CONNTRACK_DEFAULT_ENTRIES, 0);

/// `FlowKey4` → `Flow`, as `CONNTRACK4`: inbound IPv4 TCP connections the
/// rules admitted, once their handshake completed (`EMBRYO4` until then).
/// Written by ingress (new flows, refresh) and egress (state of
/// replies).
#[map]
pub static INBOUND4: LruHashMap<FlowKey4, Flow> = LruHashMap::pinned(CONNTRACK_DEFAULT_ENTRIES, 0);

/// `FlowKey` → `Flow`, as `INBOUND4`: the IPv6 ones.
#[map]
pub static INBOUND6: LruHashMap<FlowKey, Flow> = LruHashMap::pinned(CONNTRACK_DEFAULT_ENTRIES, 0);

/// `FlowKey4` → `Flow`, as `INBOUND4` for the other protocols (UDP, ICMP
/// echo, the rest), which have no handshake: a source can plant an entry
/// with one forged packet. Their own table, so such a flood evicts only
/// their kind, never an inbound TCP connection.
#[map]
pub static INBOUND_OTHER4: LruHashMap<FlowKey4, Flow> =
    LruHashMap::pinned(CONNTRACK_DEFAULT_ENTRIES, 0);

/// `FlowKey` → `Flow`, as `INBOUND_OTHER4`: the IPv6 ones.
#[map]
pub static INBOUND_OTHER6: LruHashMap<FlowKey, Flow> =
    LruHashMap::pinned(CONNTRACK_DEFAULT_ENTRIES, 0);

/// `FlowKey4` → `Embryo`: inbound IPv4 TCP connections the rules admitted
/// whose handshake is not complete (SYN seen; this host's SYN-ACK and its
/// sequence number). The ACK of that SYN-ACK (acknowledgment number ISN+1,
/// which an off-path sender cannot guess) moves the flow to `INBOUND4`.
/// Written by ingress (SYN, ACK) and egress (SYN-ACK).
#[map]
pub static EMBRYO4: LruHashMap<FlowKey4, Embryo> = LruHashMap::pinned(CONNTRACK_DEFAULT_ENTRIES, 0);

/// `FlowKey` → `Embryo`, as `EMBRYO4`: the IPv6 ones.
#[map]
pub static EMBRYO6: LruHashMap<FlowKey, Embryo> = LruHashMap::pinned(CONNTRACK_DEFAULT_ENTRIES, 0);

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

/// A TCP SYN without ACK: the first packet of a new connection, opened by
/// whoever sends it. Never a reply.
#[inline(always)]
pub fn opens_tcp_connection(ip: &Ip) -> bool {
    ip.proto == IPPROTO_TCP && ip.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

/// Direction of a packet relative to this host.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    Out,
    In,
}

/// Who opened a flow, and so which table holds it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// This host (`CONNTRACK4`/`CONNTRACK6`).
    Out,
    /// A remote host the rules admitted (`INBOUND4`/`INBOUND6`).
    In,
}

/// A connection-table key: `FlowKey4` (IPv4) or `FlowKey` (IPv6), each
/// with its own two tables.
pub trait Key: Sized + 'static {
    /// The table of `origin`'s flows of protocol `proto` (inbound TCP and
    /// inbound other protocols are apart).
    fn table(origin: Origin, proto: u8) -> &'static LruHashMap<Self, Flow>;
    /// The half-open inbound TCP connections of this family.
    fn embryos() -> &'static LruHashMap<Self, Embryo>;
    fn proto(&self) -> u8;
    /// The key's place in this family's flow cache (`flowcache.rs`).
    fn place(&self) -> impl flowcache::Slot + '_;
}

impl Key for FlowKey4 {
    #[inline(always)]
    fn table(origin: Origin, proto: u8) -> &'static LruHashMap<Self, Flow> {
        match origin {
            Origin::Out => &CONNTRACK4,
            Origin::In if proto == IPPROTO_TCP => &INBOUND4,
            Origin::In => &INBOUND_OTHER4,
        }
    }

    #[inline(always)]
    fn embryos() -> &'static LruHashMap<Self, Embryo> {
        &EMBRYO4
    }

    #[inline(always)]
    fn proto(&self) -> u8 {
        self.proto
    }

    #[inline(always)]
    fn place(&self) -> impl flowcache::Slot + '_ {
        flowcache::place4(self)
    }
}

impl Key for FlowKey {
    #[inline(always)]
    fn table(origin: Origin, proto: u8) -> &'static LruHashMap<Self, Flow> {
        match origin {
            Origin::Out => &CONNTRACK6,
            Origin::In if proto == IPPROTO_TCP => &INBOUND6,
            Origin::In => &INBOUND_OTHER6,
        }
    }

    #[inline(always)]
    fn embryos() -> &'static LruHashMap<Self, Embryo> {
        &EMBRYO6
    }

    #[inline(always)]
    fn proto(&self) -> u8 {
        self.proto
    }

    #[inline(always)]
    fn place(&self) -> impl flowcache::Slot + '_ {
        flowcache::place6(self)
    }
}

/// The flow of `ip` going `dir`: (local address, remote address, local
/// port, remote port), or `None` for packets that belong to no flow (ICMP
/// other than echo, for example).
#[inline(always)]
fn tuple(ip: &Ip, dir: Dir) -> Option<([u8; 16], [u8; 16], u16, u16)> {
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
    Some((local, remote, local_port, remote_port))
}

/// The IPv4 key of `ip` going `dir` (see [`tuple`]).
#[inline(always)]
fn key4(ip: &Ip, dir: Dir) -> Option<FlowKey4> {
    let (l, r, local_port, remote_port) = tuple(ip, dir)?;
    Some(FlowKey4 {
        local: [l[0], l[1], l[2], l[3]],
        remote: [r[0], r[1], r[2], r[3]],
        local_port,
        remote_port,
        proto: ip.proto,
        _pad: [0, 0, 0],
    })
}

/// The IPv6 key of `ip` going `dir` (see [`tuple`]).
#[inline(always)]
fn key6(ip: &Ip, dir: Dir) -> Option<FlowKey> {
    let (local, remote, local_port, remote_port) = tuple(ip, dir)?;
    Some(FlowKey {
        local,
        remote,
        local_port,
        remote_port,
        proto: ip.proto,
        family: FAMILY_V6,
        _pad: [0; 2],
    })
}

/// Runs `$body` with `$k` bound to (a reference to) the key of `$ip` going
/// `$dir`, in its family's type (so each branch names its own tables);
/// `$none` when the packet belongs to no flow.
macro_rules! by_family {
    ($ip:expr, $dir:expr, |$k:ident| $body:expr, $none:expr) => {
        if $ip.family == FAMILY_V6 {
            match key6($ip, $dir) {
                Some(key) => {
                    let $k = &key;
                    $body
                }
                None => $none,
            }
        } else {
            match key4($ip, $dir) {
                Some(key) => {
                    let $k = &key;
                    $body
                }
                None => $none,
            }
        }
    };
}

/// Egress: opens or refreshes the flow of `ip` (a reply on an inbound flow
/// refreshes that one and opens none). `allowlist`: the egress allowlist is
/// on, so only an admitted SYN makes a half-open entry (see
/// [`open_ingress`]). A new flow of another protocol than TCP is recorded
/// as inbound when `served` says it is a service's reply
/// (`policy::served`), else as a flow this host opened.
#[inline(always)]
pub fn track_egress(ip: &Ip, allowlist: bool, served: impl FnOnce() -> bool) {
    if ip.later_fragment {
        return;
    }
    // The key is built again to record the flow: `served` (a rules lookup)
    // stays outside the per-family code, so the verifier walks it once.
    let Some((state, now)) = by_family!(
        ip,
        Dir::Out,
        |key| track_egress_key(ip, key, allowlist),
        None
    ) else {
        return;
    };
    let (origin, state) = if ip.proto != IPPROTO_TCP && served() {
        (Origin::In, FLOW_REPLIED)
    } else {
        (Origin::Out, state)
    };
    by_family!(ip, Dir::Out, |key| insert(origin, key, state, now), ())
}

/// Refreshes the flow of `ip` going out, or records its half-open state;
/// otherwise the state of the new flow it opens and the packet's clock
/// reading (the caller records it).
#[inline(always)]
fn track_egress_key<K: Key>(ip: &Ip, key: &K, allowlist: bool) -> Option<(u8, u64)> {
    let now = now();
    let synack = ip.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN | TCP_ACK;
    for origin in [Origin::Out, Origin::In] {
        if let Some(flow) = K::table(origin, key.proto()).get_ptr_mut(key) {
            // SAFETY: pointer from a successful lookup; concurrent writers
            // only race on a timestamp and a state byte, both benign.
            let flow = unsafe { &mut *flow };
            if origin == Origin::In && synack && !live_established(flow, now) {
                // This host accepts a new connection on the 4-tuple of an
                // old inbound one (closed, closing, or aged out but not yet
                // evicted): the old entry goes, and the new connection is
                // half-open until the ACK of this SYN-ACK, as any other.
                remove(origin, key);
                break;
            }
            let state = next_state(ip, Dir::Out, origin, flow.state);
            touch(flow, state, now);
            return None;
        }
    }
    if ip.proto == IPPROTO_TCP
        && let Some(e) = K::embryos().get_ptr_mut(key)
    {
        // A half-open inbound connection: this host's SYN-ACK gives the
        // sequence number its completing ACK must acknowledge. Nothing
        // this host sends on it opens a flow of its own.
        if synack && !crate::explain::on() {
            // SAFETY: pointer from a successful lookup; a racing SYN-ACK
            // retransmission writes the same number.
            unsafe {
                (*e).isn = ip.tcp_seq;
                (*e).synack = 1;
            }
        }
        return None;
    }
    if ip.proto == IPPROTO_TCP && synack {
        // This host answers a SYN it received: without an egress allowlist
        // the admitted SYN recorded nothing (`open_ingress`), and the
        // answer makes the half-open entry. Under the allowlist only the
        // admitted SYN makes it: a SYN-ACK that an egress rule let out
        // answers no SYN the rules admitted (a raw socket's), and opens
        // nothing.
        if allowlist {
            return None;
        }
        let e = Embryo {
            seen_ns: now,
            isn: ip.tcp_seq,
            synack: 1,
        };
        embryo_insert(key, &e);
        return None;
    }
    match ip.proto {
        IPPROTO_TCP if ip.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN => {
            Some((FLOW_TCP_SYN_SENT, now))
        }
        IPPROTO_TCP => None,
        _ => Some((FLOW_UNREPLIED, now)),
    }
}

/// Egress, under an allowlist: whether `ip` is this host's SYN-ACK to a
/// half-open inbound connection the rules admitted (`EMBRYO4`/`EMBRYO6`).
#[inline(always)]
pub fn answers_embryo(ip: &Ip) -> bool {
    if ip.proto != IPPROTO_TCP || ip.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST) != TCP_SYN | TCP_ACK
    {
        return false;
    }
    by_family!(ip, Dir::Out, |key| embryo_of(key).is_some(), false)
}

/// The live half-open connection `key` (one older than a SYN's timeout is
/// ignored: the LRU evicts it).
#[inline(always)]
fn embryo_of<K: Key>(key: &K) -> Option<*mut Embryo> {
    let e = K::embryos().get_ptr_mut(key)?;
    // SAFETY: pointer from a successful lookup of a plain struct.
    let seen = unsafe { (*e).seen_ns };
    if aged_out(seen, IPPROTO_TCP, FLOW_TCP_SYN_SENT, now()) {
        return None;
    }
    Some(e)
}

#[inline(always)]
fn insert<K: Key>(origin: Origin, key: &K, state: u8, now: u64) {
    if crate::explain::on() {
        return;
    }
    // Two 8-byte words, not the struct literal: its 7-byte `_pad` would be
    // zeroed by a call to a byte-by-byte `memset` subprogram.
    // SAFETY: `Flow` is `repr(C)` {u64, u8, [u8; 7]}: 16 bytes, align 8, no
    // padding, every bit pattern valid; on this little-endian target the
    // second word's low byte is `state` and the rest the zeroed `_pad`.
    let flow: Flow = unsafe { core::mem::transmute([now, u64::from(state)]) };
    let _ = K::table(origin, key.proto()).insert(key, &flow, 0);
}

/// Ingress, after the rules admitted `ip`: refreshes its inbound flow (at
/// most once a second), so this host's replies may leave under an egress
/// allowlist. `true`: `ip` opens one (a TCP SYN without ACK, always; a
/// packet of another protocol without a flow); the caller checks the rate
/// limit, then records it with [`open_ingress`].
#[inline(always)]
pub fn track_ingress(ip: &Ip) -> bool {
    if ip.later_fragment {
        return false;
    }
    // An echo request belongs to no inbound flow (its reply is admitted as
    // the request was, `policy::allowlist`): each one opens one, and is
    // charged to its source's rate limit.
    by_family!(
        ip,
        Dir::In,
        |key| track_ingress_key(ip, key),
        is_echo_request(ip)
    )
}

/// An ICMP echo request in IPv4, or an ICMPv6 one in IPv6.
#[inline(always)]
pub fn is_echo_request(ip: &Ip) -> bool {
    match ip.proto {
        IPPROTO_ICMP => ip.family != FAMILY_V6 && ip.icmp_type == ICMP_ECHO_REQUEST,
        IPPROTO_ICMPV6 => ip.family == FAMILY_V6 && ip.icmp_type == ICMPV6_ECHO_REQUEST,
        _ => false,
    }
}

#[inline(always)]
fn track_ingress_key<K: Key>(ip: &Ip, key: &K) -> bool {
    // A SYN without ACK opens a connection whatever the table holds: it is
    // not looked up (the skip joins the lookup's miss), and it is charged to
    // its source's rate limit. A 4-tuple reused from an old inbound
    // connection gets its state back from this host's SYN-ACK
    // (`next_state`).
    if opens_tcp_connection(ip) {
        return true;
    }
    let Some(flow) = K::table(Origin::In, key.proto()).get_ptr_mut(key) else {
        if ip.proto != IPPROTO_TCP {
            return true;
        }
        complete_handshake(ip, key);
        return false;
    };
    // SAFETY: pointer from a successful lookup; see `track_egress`.
    let flow = unsafe { &mut *flow };
    let state = next_state(ip, Dir::In, Origin::In, flow.state);
    touch(flow, state, now());
    false
}

/// Ingress, a TCP packet of no inbound flow: the ACK of this host's SYN-ACK
/// (acknowledgment number = its ISN + 1) of a half-open connection moves
/// that connection to `INBOUND4`/`INBOUND6`. Nothing else records a TCP
/// flow there: a packet that does not complete a handshake this host
/// answered (a forged ACK, a flood) records nothing.
#[inline(always)]
fn complete_handshake<K: Key>(ip: &Ip, key: &K) {
    if ip.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST) != TCP_ACK {
        return;
    }
    let Some(e) = embryo_of(key) else {
        return;
    };
    // SAFETY: pointer from a successful lookup of a plain struct.
    let (synack, isn) = unsafe { ((*e).synack, (*e).isn) };
    if synack == 1 && ip.tcp_ack == isn.wrapping_add(1) && !crate::explain::on() {
        insert(Origin::In, key, FLOW_TCP_ESTABLISHED, now());
        let _ = K::embryos().remove(key);
    }
}

/// Under the egress allowlist, an admitted SYN: the half-open entry of its
/// connection, unless a live one already holds this host's SYN-ACK (a SYN
/// on that 4-tuple, a retransmission or a forgery from whoever can see the
/// tuple, would otherwise wipe the number the completing ACK must
/// acknowledge; the kernel answers it with the same SYN-ACK or none).
#[inline(always)]
fn open_embryo<K: Key>(key: &K) {
    if let Some(e) = embryo_of(key) {
        // SAFETY: pointer from a successful lookup of a plain struct.
        if unsafe { (*e).synack } == 1 {
            return;
        }
    }
    let e = Embryo {
        seen_ns: now(),
        isn: 0,
        synack: 0,
    };
    embryo_insert(key, &e);
}

#[inline(always)]
fn embryo_insert<K: Key>(key: &K, e: &Embryo) {
    if crate::explain::on() {
        return;
    }
    let _ = K::embryos().insert(key, e, 0);
}

/// Ingress: records the inbound flow `ip` opens (see [`track_ingress`]):
/// UDP, ICMP echo and the rest in `INBOUND_OTHER4`/`INBOUND_OTHER6`; a TCP
/// connection as half-open (`EMBRYO4`/`EMBRYO6`) only under an egress
/// allowlist (`allowlist`), where this host's SYN-ACK must answer an
/// admitted SYN. Without one, the SYN-ACK itself makes the half-open entry
/// ([`track_egress`]): the kernel answers only SYNs this program passed, a
/// SYN the kernel drops costs no table update, and an admitted SYN costs
/// one LRU update fewer on its way in.
#[inline(always)]
pub fn open_ingress(ip: &Ip, allowlist: bool) {
    if ip.proto == IPPROTO_TCP {
        if !allowlist {
            return;
        }
        by_family!(ip, Dir::In, |key| open_embryo(key), ())
    } else {
        by_family!(
            ip,
            Dir::In,
            |key| insert(Origin::In, key, FLOW_UNREPLIED, now()),
            ()
        )
    }
}

/// Ingress: whether `ip` belongs to a live flow this host opened; refreshes
/// it. Inbound flows do not count: the rules decide those. `Lookup::NotSyn`:
/// a TCP SYN without ACK is not looked up (`false`, as a miss).
#[inline(always)]
pub fn match_ingress(ip: &Ip, lookup: Lookup) -> bool {
    by_family!(ip, Dir::In, |key| match_ingress_key(ip, key, lookup), false)
}

/// Which packets [`match_ingress`] looks up.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    All,
    /// All but a TCP SYN without ACK.
    NotSyn,
}

#[inline(always)]
fn match_ingress_key<K: Key>(ip: &Ip, key: &K, lookup: Lookup) -> bool {
    // The SYN is skipped here, with its key built, where a miss would end:
    // its path then joins the misses', so the verifier walks the policy
    // after it once, not once more for SYNs.
    if lookup == Lookup::NotSyn && opens_tcp_connection(ip) {
        return false;
    }
    // Read before the lookup: a removal after it moves the epoch on, and
    // the slot written below is then of an old one (`flowcache.rs`).
    let epoch = flowcache::epoch();
    let now = now();
    let Some(flow) = live(Origin::Out, key, now) else {
        return false;
    };
    // SAFETY: pointer from a successful lookup; see `track_egress`.
    let flow = unsafe { &mut *flow };
    let state = next_state(ip, Dir::In, Origin::Out, flow.state);
    touch(flow, state, now);
    if settled(key.proto(), flow.state) && takes_cache(ip) {
        key.place().store(flow, epoch);
    }
    true
}

/// Whether `ip` may be admitted from, or fill, the flow cache: not a
/// fragment (a first one must be remembered, later ones follow it) nor a
/// TCP packet with SYN set (a SYN-ACK too: it may change its flow's
/// state).
#[inline(always)]
fn takes_cache(ip: &Ip) -> bool {
    !ip.fragment && !ip.later_fragment && !(ip.proto == IPPROTO_TCP && ip.tcp_flags & TCP_SYN != 0)
}

/// Ingress, before anything else: whether this CPU's flow cache admits
/// `ip` as a reply of an established flow this host opened
/// (`flowcache.rs`). What does not take the cache ([`takes_cache`]), and
/// every miss, takes the table path (`policy::established`).
#[inline(always)]
pub fn cached(ip: &Ip) -> bool {
    if !takes_cache(ip) {
        return false;
    }
    by_family!(
        ip,
        Dir::In,
        |key| key.place().admits(now(), flowcache::epoch()),
        false
    )
}

/// Whether a flow this host opened, in `state`, stays in it whatever
/// inbound packet comes (`next_state`, `Dir::In`, `Origin::Out`): a TCP
/// connection once established (an inbound FIN or RST changes nothing);
/// another protocol once replied. Only such a flow is cached.
#[inline(always)]
fn settled(proto: u8, state: u8) -> bool {
    if proto == IPPROTO_TCP {
        state == FLOW_TCP_ESTABLISHED
    } else {
        state == FLOW_REPLIED
    }
}

/// Whether the flow of `ip` going `dir` is a live flow of `origin` (an
/// expired one is removed).
#[inline(always)]
pub fn tracked(origin: Origin, ip: &Ip, dir: Dir) -> bool {
    by_family!(ip, dir, |key| live(origin, key, now()).is_some(), false)
}

/// The flow `key` of `origin` if it is live at `now`, or `None` (an expired
/// one is removed).
#[inline(always)]
fn live<K: Key>(origin: Origin, key: &K, now: u64) -> Option<*mut Flow> {
    let flow = K::table(origin, key.proto()).get_ptr_mut(key)?;
    // SAFETY: pointer from a successful lookup; see `track_egress`.
    let (seen, state) = unsafe { ((*flow).last_seen_ns, (*flow).state) };
    if aged_out(seen, key.proto(), state, now) {
        remove(origin, key);
        return None;
    }
    Some(flow)
}

/// Whether `flow` is an established TCP connection that has not aged out
/// at `now`.
#[inline(always)]
fn live_established(flow: &Flow, now: u64) -> bool {
    flow.state == FLOW_TCP_ESTABLISHED
        && !aged_out(flow.last_seen_ns, IPPROTO_TCP, FLOW_TCP_ESTABLISHED, now)
}

/// Whether a flow of `proto` in `state` last seen at `seen` has outlived
/// its timeout at `now`.
#[inline(always)]
fn aged_out(seen: u64, proto: u8, state: u8, now: u64) -> bool {
    now.saturating_sub(seen) > flow_timeout_ns(proto, state)
}

/// Removes `key`'s entry from `origin`'s table.
#[inline(always)]
fn remove<K: Key>(origin: Origin, key: &K) {
    if !crate::explain::on() {
        let _ = K::table(origin, key.proto()).remove(key);
    }
}

#[inline(always)]
fn touch(flow: &mut Flow, state: u8, now: u64) {
    if crate::explain::on() {
        return;
    }
    if state != flow.state || now.saturating_sub(flow.last_seen_ns) > FLOW_REFRESH_NS {
        flow.state = state;
        flow.last_seen_ns = now;
    }
}

/// The state of a flow of `origin` in `state` after the packet `ip` going
/// `dir`. Only this host's own FIN or RST (`Dir::Out`) closes a flow: an
/// inbound one is not checked against the sequence numbers, so it may be
/// forged and changes nothing.
#[inline(always)]
fn next_state(ip: &Ip, dir: Dir, origin: Origin, state: u8) -> u8 {
    // Does the packet come from the side that opened the flow?
    let from_opener = (dir == Dir::Out) == (origin == Origin::Out);
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
    } else if !from_opener
        && f & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK
        && state == FLOW_TCP_SYN_SENT
    {
        // The answer to this host's SYN. (This host's own SYN-ACK on an
        // inbound flow that is not established removes that flow instead:
        // `track_egress`.) The other end's SYN-ACK revives no flow this
        // host opened.
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
    if crate::explain::on() {
        return;
    }
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
    if crate::explain::on() {
        return;
    }
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
