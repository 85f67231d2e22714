//! Stage 2: decide. A function of the parsed frame, the connection table and
//! the maps the control plane wrote; every branch ends in exactly one
//! [`Reason`]. The order (ingress): flows this host opened (`established`,
//! called first by `main.rs`; for a TCP SYN without ACK last, only when
//! the rest would drop it), later fragments, what a host always needs
//! (neighbour discovery, DHCP replies to its own requests, ICMP errors about
//! its tracked flows), the deny sets (`deny::denied`) and the rate limiter's
//! bans (`ratelimit::banned`), the rules (the list of the interface the
//! packet arrived on: `rules::ingress_dir`), and last the ping setting for an
//! echo request no rule admitted. ICMP meets the rules with its type and
//! code as the port (`icmp_port`). What the rules admit is recorded as an
//! inbound flow (`conntrack::track_ingress`); a new one first meets its
//! source's rate limit (`ratelimit::over_limit`).

use portcullis_common::{
    DIR_EGRESS, DIR_INGRESS, FAMILY_V6, ICMP_DEST_UNREACH, ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST,
    ICMP_PARAMETER_PROBLEM, ICMP_TIME_EXCEEDED, ICMPV6_DEST_UNREACH, ICMPV6_ECHO_REPLY,
    ICMPV6_ECHO_REQUEST, ICMPV6_PACKET_TOO_BIG, ICMPV6_PARAMETER_PROBLEM, ICMPV6_TIME_EXCEEDED,
    IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, PCLASS_ICMP, PCLASS_OTHER, PCLASS_TCP,
    PCLASS_UDP, Reason, SETTING_DNS_GUARD, SETTING_EGRESS_ALLOWLIST, SETTING_PING, SLOT_KIND_PEER,
    SLOT_KIND_RULE, SLOT_KIND_SHIFT, SLOT_KIND_SSH, SLOT_NONE, Settings, icmp_port, pclass_port,
    slot_admits,
};

use crate::{
    conntrack::{self, Dir, Lookup, Origin},
    deny, fqdn,
    parse::{self, Frame, Ip, Packet},
    ratelimit, rules,
};

/// ICMPv6 router solicitation .. redirect: neighbour and router discovery.
const ND_FIRST: u8 = 133;
const ND_LAST: u8 = 137;
/// RFC 4861: a discovery message whose hop limit is not 255 was forwarded,
/// so it did not come from the link and must be ignored.
const ND_HOP_LIMIT: u8 = 255;

const DHCPV4_SERVER: u16 = 67;
const DHCPV4_CLIENT: u16 = 68;
const DHCPV6_SERVER: u16 = 547;
const DHCPV6_CLIENT: u16 = 546;

/// What one packet's decision reads: the live generation (read once) and
/// its settings.
pub struct Ctx {
    pub generation: usize,
    pub settings: Settings,
}

/// Ingress verdict of a frame that is not IP: ARP passes, the rest drops.
#[inline(always)]
pub fn decide_other(frame: &Frame) -> Reason {
    match frame {
        Frame::Arp => Reason::PassArp,
        Frame::VlanStack => Reason::DropVlanStack,
        Frame::OtherEthertype | Frame::Ip(_) => Reason::DropEthertype,
    }
}

/// Ingress verdict of an IP packet that [`established`] did not pass;
/// `bytes` is what a matched rule is credited.
#[inline(always)]
pub fn decide<P: Packet>(p: &P, ip: &Ip, ctx: &Ctx, bytes: u64) -> Reason {
    if ip.later_fragment {
        return later_fragment(ip, DIR_INGRESS);
    }
    let reason = decide_ip(p, ip, ctx, bytes);
    if ip.fragment && reason.passes() {
        conntrack::remember_fragment(ip, DIR_INGRESS);
    }
    reason
}

/// A later fragment (no transport header): passes `dir` when its first
/// fragment passed that way. An IPv4 TCP fragment at offset 1 (8 bytes)
/// can only serve to overwrite the first fragment's TCP header (RFC 1858,
/// RFC 3128): dropped.
#[inline(always)]
pub fn later_fragment(ip: &Ip, dir: u8) -> Reason {
    if ip.family != FAMILY_V6 && ip.proto == IPPROTO_TCP && ip.frag_offset == 1 {
        return Reason::DropFragment;
    }
    if conntrack::fragment_admitted(ip, dir) {
        Reason::PassFragment
    } else {
        Reason::DropFragment
    }
}

/// Ingress, before anything else: whether `ip` belongs to a live flow this
/// host opened (`Reason::PassEstablished`; the caller counts it). A first
/// fragment of one is remembered, so its later fragments pass too. Later
/// fragments have no ports: never.
///
/// A TCP SYN without ACK is asked after [`decide`] instead, and only when
/// the policy would drop it: such a SYN belongs to a flow this host opened
/// only in a simultaneous open, so new connections (admitted or not) skip
/// the lookup, and the verdict of every SYN stays what it was when this
/// was asked first. What the policy did on the way stays done (a deny
/// set's drop counter, a rate-limit charge or ban, a half-open entry), and
/// a SYN the policy admits is counted as its rule's (`pass_rule`), not as
/// `pass_established`.
#[inline(always)]
pub fn established(ip: &Ip, lookup: Lookup) -> bool {
    if ip.later_fragment || !conntrack::match_ingress(ip, lookup) {
        return false;
    }
    if ip.fragment {
        conntrack::remember_fragment(ip, DIR_INGRESS);
    }
    true
}

/// A packet `established` did not pass.
#[inline(always)]
fn decide_ip<P: Packet>(p: &P, ip: &Ip, ctx: &Ctx, bytes: u64) -> Reason {
    let (pclass, port, otherwise) = match ip.proto {
        IPPROTO_TCP => (PCLASS_TCP, ip.dport, Reason::DropNoRule),
        IPPROTO_UDP if is_dhcp_reply(ip) && conntrack::dhcp_expected(ip) => {
            return Reason::PassDhcp;
        }
        IPPROTO_UDP => (PCLASS_UDP, ip.dport, Reason::DropNoRule),
        IPPROTO_ICMP | IPPROTO_ICMPV6 => match icmp_before_rules(p, ip) {
            Some(reason) => return reason,
            None => (
                PCLASS_ICMP,
                icmp_port(ip.icmp_type, ip.icmp_code),
                Reason::DropIcmp,
            ),
        },
        _ => (PCLASS_OTHER, 0, Reason::DropProtocol),
    };
    // Deny sets: before pings, peers, SSH and the rules (`deny.rs`).
    if deny::denied(ip, ctx.settings.flags, bytes) {
        return Reason::DropDenied;
    }
    // A source banned for exceeding a rate limit (`ratelimit.rs`).
    if ratelimit::banned(ip, ctx.generation) {
        return Reason::DropRateLimit;
    }
    // The one place the ingress path asks the rules about new traffic (the
    // lookup is inlined, so one call site keeps the program small).
    let reason = by_rules(ctx, p.ifindex(), ip, pclass, port, otherwise, bytes);
    if reason == Reason::DropIcmp
        && conntrack::is_echo_request(ip)
        && ctx.settings.flags & SETTING_PING != 0
    {
        Reason::PassPing
    } else {
        reason
    }
}

/// New inbound traffic from `ip.src` on interface `ifindex`: what the
/// rules of that interface, peers and the SSH exemption say; `otherwise`
/// when nothing admits it.
#[inline(always)]
fn by_rules(
    ctx: &Ctx,
    ifindex: u32,
    ip: &Ip,
    pclass: usize,
    port: u16,
    otherwise: Reason,
    bytes: u64,
) -> Reason {
    // The interface's rule list (`rules::ingress_dir`), read here, where it
    // is used, and nowhere else: the rest of the path does not carry it.
    let dir = rules::ingress_dir(
        ctx.generation,
        ifindex,
        ctx.settings.flags,
        ctx.settings.ingress_dir,
    );
    let m = rules::lookup(
        ctx.generation,
        ctx.settings.flags,
        dir,
        ip.family,
        &ip.src,
        pclass,
        port,
    );
    if m.slot == SLOT_NONE {
        return otherwise;
    }
    let reason = match m.slot >> SLOT_KIND_SHIFT {
        SLOT_KIND_RULE => Reason::PassRule,
        SLOT_KIND_PEER => Reason::PassPeer,
        SLOT_KIND_SSH => Reason::PassSsh,
        _ => Reason::DropOtherCluster,
    };
    // What passes is recorded as an inbound flow; a new flow a rule or the
    // SSH exemption admits counts against its source's rate limit first
    // (cluster peers are not limited).
    if reason.passes() && conntrack::track_ingress(ip) {
        if reason != Reason::PassPeer && ratelimit::over_limit(ip, ctx.generation, m.slot) {
            return Reason::DropRateLimit;
        }
        conntrack::open_ingress(ip, ctx.settings.flags & SETTING_EGRESS_ALLOWLIST != 0);
    }
    if reason.passes() {
        rules::count(&m, bytes);
    }
    reason
}

/// Whether the rules admit new inbound traffic from `remote` (no counting).
#[inline(always)]
fn admitted_from(ctx: &Ctx, family: u8, remote: &[u8; 16], pclass: usize, port: u16) -> bool {
    let m = rules::lookup(
        ctx.generation,
        ctx.settings.flags,
        DIR_INGRESS,
        family,
        remote,
        pclass,
        port,
    );
    slot_admits(m.slot)
}

#[inline(always)]
fn is_dhcp_reply(ip: &Ip) -> bool {
    if ip.family == FAMILY_V6 {
        ip.sport == DHCPV6_SERVER && ip.dport == DHCPV6_CLIENT
    } else {
        ip.sport == DHCPV4_SERVER && ip.dport == DHCPV4_CLIENT
    }
}

/// What ICMP gets before (or instead of) the rules: the wrong family for
/// the IP version is dropped, neighbour discovery passes with hop limit
/// 255, errors about this host's tracked flows pass. `None`:
/// ask the rules (echo requests, then the ping setting; everything else).
#[inline(always)]
fn icmp_before_rules<P: Packet>(p: &P, ip: &Ip) -> Option<Reason> {
    let v6 = ip.proto == IPPROTO_ICMPV6;
    if v6 != (ip.family == FAMILY_V6) {
        // ICMPv4 in IPv6 or ICMPv6 in IPv4.
        return Some(Reason::DropIcmp);
    }
    let t = ip.icmp_type;
    if v6 && (ND_FIRST..=ND_LAST).contains(&t) {
        return Some(if ip.hop_limit == ND_HOP_LIMIT {
            Reason::PassNeighbor
        } else {
            Reason::DropIcmp
        });
    }
    if conntrack::is_echo_request(ip) {
        return None;
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
    if error && related(p, ip) {
        return Some(Reason::PassRelated);
    }
    None
}

/// Whether the packet an ICMP error quotes is one this host sent on a
/// tracked flow: one it opened, or an inbound one the rules admitted
/// (path-MTU discovery for its servers). The error's own source is not
/// checked: any router on the path may send one.
#[inline(always)]
fn related<P: Packet>(p: &P, ip: &Ip) -> bool {
    let Ok(quoted) = parse::embedded(p, ip) else {
        return false;
    };
    // The quoted packet went out from this host.
    if quoted.src != ip.dst || quoted.family != ip.family {
        return false;
    }
    conntrack::tracked(Origin::Out, &quoted, Dir::Out)
        || conntrack::tracked(Origin::In, &quoted, Dir::Out)
}

const DHCPV4_CLIENT_REQUEST: (u16, u16) = (DHCPV4_CLIENT, DHCPV4_SERVER);
const DHCPV6_CLIENT_REQUEST: (u16, u16) = (DHCPV6_CLIENT, DHCPV6_SERVER);
const MLD_QUERY: u8 = 130;
const MLD_REPORT: u8 = 131;
const MLD_DONE: u8 = 132;
const MLDV2_REPORT: u8 = 143;

/// Egress verdict of one outbound packet (recording its flow if it opens
/// one). Allow-all unless the egress allowlist is on; then the packet must
/// belong to a flow this host opened, be a reply on an inbound flow the
/// rules admitted (and still admit), be what a host always sends (neighbour
/// discovery, MLD, DHCP requests, ICMP errors, echo replies to admitted
/// pings), or be admitted by an egress rule (peers are among those). A
/// later fragment passes only if its first fragment passed egress.
#[inline(always)]
pub fn decide_egress(ip: &Ip, ctx: &Ctx, bytes: u64) -> Reason {
    if is_dhcp_request(ip) {
        conntrack::dhcp_requested(ip);
    }
    if ctx.settings.flags & SETTING_EGRESS_ALLOWLIST == 0 {
        conntrack::track_egress(ip, false, || served(ip, ctx));
        return Reason::PassEgress;
    }
    let (reason, track) = if ip.later_fragment {
        match later_fragment(ip, DIR_EGRESS) {
            Reason::PassFragment => (Reason::PassEgress, false),
            _ => (Reason::DropEgress, false),
        }
    } else {
        match allowlist(ip, ctx, bytes) {
            Some(track) => (Reason::PassEgress, track),
            None => (Reason::DropEgress, false),
        }
    };
    // One place records the flow under the allowlist. (A service's reply
    // with no flow passes here only by an egress rule: see `served`.)
    if track {
        conntrack::track_egress(ip, true, || false);
    }
    if ip.fragment && !ip.later_fragment && reason.passes() {
        conntrack::remember_fragment(ip, DIR_EGRESS);
    }
    reason
}

/// Whether this host's packet `ip` comes from a service the rules admit
/// its destination to: a UDP datagram (or one of another protocol but TCP
/// and ICMP) whose destination the ingress rules admit to its source port.
/// Such a packet with no flow is a service's reply whose inbound flow was
/// evicted (a flood of forged datagrams does that) or never recorded: its
/// flow is recorded as inbound, so the rules, the deny sets and the bans
/// go on deciding what arrives on it. Recorded as a flow this host opened,
/// everything on it would pass as established, before all three.
#[inline(always)]
fn served(ip: &Ip, ctx: &Ctx) -> bool {
    let (pclass, port) = match ip.proto {
        IPPROTO_TCP | IPPROTO_ICMP | IPPROTO_ICMPV6 => return false,
        proto => pclass_port(proto, ip.sport),
    };
    admitted_from(ctx, ip.family, &ip.dst, pclass, port)
}

/// Egress under the allowlist, for a packet with its transport header:
/// `Some(track)` when it passes (`track`: its flow is recorded), `None`
/// when it is dropped.
#[inline(always)]
fn allowlist(ip: &Ip, ctx: &Ctx, bytes: u64) -> Option<bool> {
    let (pclass, local_port) = pclass_port(ip.proto, ip.sport);
    // An ICMP reply (an echo reply: ICMP flows are echoes) was admitted as
    // the echo request it answers (code 0).
    let local_port = match ip.proto {
        IPPROTO_ICMP => icmp_port(ICMP_ECHO_REQUEST, 0),
        IPPROTO_ICMPV6 => icmp_port(ICMPV6_ECHO_REQUEST, 0),
        _ => local_port,
    };
    if conntrack::tracked(Origin::Out, ip, Dir::Out) {
        return Some(true);
    }
    if always_sent(ip) {
        return Some(false);
    }
    // While FQDN rules exist (`fqdn.rs`): the forwarder's own DNS query
    // (its socket mark), or a destination it learned for an FQDN rule; the
    // flow is recorded. Other DNS queries go on and are dropped: the rules
    // never admit ports 53 and 853 then (`compile::carve_dns`). Not
    // credited to the FQDN rule's counter (a second counting path does not
    // fit the verifier's budget).
    if ctx.settings.flags & SETTING_DNS_GUARD != 0 && fqdn::by_name(ip) {
        return Some(true);
    }
    // A reply on an inbound flow the rules admitted, while they still admit
    // it; an echo reply to a ping they (or the ping setting) admit. Peers
    // are among the egress rules.
    let echo_reply = match ip.proto {
        IPPROTO_ICMP => ip.icmp_type == ICMP_ECHO_REPLY,
        IPPROTO_ICMPV6 => ip.icmp_type == ICMPV6_ECHO_REPLY,
        _ => false,
    };
    // A SYN opens a new connection from this host: it is never a reply,
    // whatever flow its ports match (a remote can plant an inbound entry
    // for any admitted port with one packet; a local user could then
    // connect out from that port as if answering).
    // (A SYN-ACK answers a half-open inbound connection: its flow enters
    // `INBOUND4`/`INBOUND6` only with the ACK that completes the handshake.)
    let reply = !conntrack::opens_tcp_connection(ip)
        && (conntrack::tracked(Origin::In, ip, Dir::Out) || conntrack::answers_embryo(ip));
    if (echo_reply || reply)
        && (admitted_from(ctx, ip.family, &ip.dst, pclass, local_port)
            || (echo_reply && ctx.settings.flags & SETTING_PING != 0))
    {
        return Some(true);
    }
    let (pclass, port) = pclass_port(ip.proto, ip.dport);
    let port = if pclass == PCLASS_ICMP {
        icmp_port(ip.icmp_type, ip.icmp_code)
    } else {
        port
    };
    let m = rules::lookup(
        ctx.generation,
        ctx.settings.flags,
        DIR_EGRESS,
        ip.family,
        &ip.dst,
        pclass,
        port,
    );
    if slot_admits(m.slot) {
        rules::count(&m, bytes);
        return Some(true);
    }
    None
}

/// A DHCP client request (source port 68/546 needs privilege to bind: only
/// root or a process with CAP_NET_BIND_SERVICE or CAP_NET_RAW sends one).
#[inline(always)]
fn is_dhcp_request(ip: &Ip) -> bool {
    match ip.proto {
        IPPROTO_UDP if ip.family == FAMILY_V6 => (ip.sport, ip.dport) == DHCPV6_CLIENT_REQUEST,
        IPPROTO_UDP => (ip.sport, ip.dport) == DHCPV4_CLIENT_REQUEST,
        _ => false,
    }
}

#[inline(always)]
fn always_sent(ip: &Ip) -> bool {
    match ip.proto {
        IPPROTO_UDP => is_dhcp_request(ip),
        IPPROTO_ICMPV6 => matches!(
            ip.icmp_type,
            ND_FIRST
                ..=ND_LAST
                    | MLD_QUERY
                    | MLD_REPORT
                    | MLD_DONE
                    | MLDV2_REPORT
                    | ICMPV6_DEST_UNREACH
                    | ICMPV6_PACKET_TOO_BIG
                    | ICMPV6_TIME_EXCEEDED
                    | ICMPV6_PARAMETER_PROBLEM
        ),
        IPPROTO_ICMP => matches!(
            ip.icmp_type,
            ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM
        ),
        _ => false,
    }
}
