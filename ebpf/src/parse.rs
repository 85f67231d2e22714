//! Stage 1: parse. Turns the bytes of a frame into the few facts the policy
//! and the connection table need, with every read bounds-checked.
//!
//! Header lengths are never assumed: the IPv4 header length comes from IHL and
//! the IPv6 extension-header chain is walked (bounded), so options and
//! extension headers cannot hide the transport header. One 802.1Q/802.1ad tag
//! is looked through; a second is reported, not parsed.
//!
//! Every read after the fixed IP header is bounded by what that header says
//! the packet holds (IPv4 total length, IPv6 40 + payload length), not by the
//! frame: bytes after it (Ethernet padding, or bytes an attacker appends and
//! the kernel trims) are never looked at. A packet quoted inside an ICMP
//! error is bounded by the end of the error that carries it. So a first
//! fragment must hold its whole header chain and transport header itself
//! (RFC 7112), or it is malformed. One exception, outbound only: a GSO
//! packet larger than 64 KiB (BIG TCP) carries 0 in its length field and
//! ends with the skb.
//!
//! The same code parses XDP frames (direct packet access) and TC packets
//! (`bpf_skb_load_bytes`, which also reads non-linear skbs): see [`Packet`].

use core::mem::size_of;

use aya_ebpf::programs::{TcContext, XdpContext};
use portcullis_common::{
    FAMILY_V4, FAMILY_V6, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP,
};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;

const IPV6_HOPOPTS: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AH: u8 = 51;
const IPV6_DSTOPTS: u8 = 60;

/// Extension headers walked before giving up (and dropping as malformed).
const MAX_IPV6_EXT_HEADERS: usize = 6;
/// Upper bound on any header offset; keeps the verifier's range tracking
/// small and rejects absurd header chains.
const MAX_OFFSET: usize = 512;

const ETH_HLEN: usize = 14;
const VLAN_HLEN: usize = 4;
const IPV4_MIN_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;
/// ICMP and ICMPv6 headers are 8 bytes before the payload (or embedded packet).
pub const ICMP_HLEN: usize = 8;

/// A frame that cannot be parsed safely. Always dropped.
pub struct Malformed;

/// Byte access to a packet, bounds-checked.
pub trait Packet {
    /// `N` bytes at `offset`, or `Malformed` when the packet is shorter.
    fn bytes<const N: usize>(&self, offset: usize) -> Result<[u8; N], Malformed>;

    /// The length of an outbound GSO packet, whose IP length field may be
    /// 0 (BIG TCP: more than 64 KiB); `None` where that cannot happen (XDP).
    fn gso_len(&self) -> Option<usize>;

    /// The interface the packet arrived on (XDP) or leaves by (TC).
    fn ifindex(&self) -> u32;
}

impl Packet for XdpContext {
    #[inline(always)]
    fn bytes<const N: usize>(&self, offset: usize) -> Result<[u8; N], Malformed> {
        let start = self.data();
        let end = self.data_end();
        if offset > MAX_OFFSET || start + offset + size_of::<[u8; N]>() > end {
            return Err(Malformed);
        }
        // SAFETY: the check above keeps the N bytes at `offset` inside the
        // packet's linear data; a byte array needs no alignment.
        Ok(unsafe { *((start + offset) as *const [u8; N]) })
    }

    #[inline(always)]
    fn gso_len(&self) -> Option<usize> {
        None
    }

    #[inline(always)]
    fn ifindex(&self) -> u32 {
        self.ingress_ifindex() as u32
    }
}

impl Packet for TcContext {
    #[inline(always)]
    fn bytes<const N: usize>(&self, offset: usize) -> Result<[u8; N], Malformed> {
        if offset > MAX_OFFSET {
            return Err(Malformed);
        }
        self.load::<[u8; N]>(offset).map_err(|_| Malformed)
    }

    #[inline(always)]
    fn gso_len(&self) -> Option<usize> {
        Some(self.len() as usize)
    }

    #[inline(always)]
    fn ifindex(&self) -> u32 {
        use aya_ebpf::EbpfContext as _;
        // SAFETY: a TC program's context is the kernel's `__sk_buff`, valid
        // for the program's run; `ifindex` is a readable field of it.
        unsafe { (*self.as_ptr().cast::<aya_ebpf::bindings::__sk_buff>()).ifindex }
    }
}

/// What the policy gets to see.
pub enum Frame {
    Arp,
    Ip(Ip),
    /// Any Ethernet type other than ARP, IPv4 and IPv6.
    OtherEthertype,
    /// Two or more VLAN tags.
    VlanStack,
}

/// The facts of an IPv4 or IPv6 packet.
pub struct Ip {
    pub family: u8,
    /// Transport protocol (after IPv6 extension headers).
    pub proto: u8,
    /// IPv4 TTL or IPv6 hop limit.
    pub hop_limit: u8,
    /// TCP flags (0 for other protocols).
    pub tcp_flags: u8,
    /// TCP sequence and acknowledgment numbers (0 for other protocols, and
    /// in a quoted packet).
    pub tcp_seq: u32,
    pub tcp_ack: u32,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Part of a fragmented packet (first or later fragment).
    pub fragment: bool,
    /// A non-first fragment: no transport header to look at.
    pub later_fragment: bool,
    /// IPv4 identification or IPv6 fragment identification.
    pub frag_id: u32,
    /// TCP/UDP ports in host order (0 for other protocols).
    pub sport: u16,
    pub dport: u16,
    /// ICMP/ICMPv6 type, code and echo identifier.
    pub icmp_type: u8,
    pub icmp_code: u8,
    pub icmp_id: u16,
    /// IPv4 fragment offset in 8-byte units (0 for IPv6 and whole packets).
    pub frag_offset: u16,
    /// Offset of the transport header.
    pub l4_off: usize,
    /// Offset just past the IP packet (what its header says it holds).
    pub end: usize,
    /// Egress only: the packet's mark (its socket's SO_MARK; the DNS
    /// guard's test, `fqdn.rs`), set by the TC entry point; 0 otherwise.
    /// Fits in the struct's padding: no stack cost.
    pub mark: u32,
}

impl Ip {
    const fn new(family: u8) -> Self {
        Ip {
            family,
            proto: 0,
            hop_limit: 0,
            tcp_flags: 0,
            tcp_seq: 0,
            tcp_ack: 0,
            src: [0; 16],
            dst: [0; 16],
            fragment: false,
            later_fragment: false,
            frag_id: 0,
            sport: 0,
            dport: 0,
            icmp_type: 0,
            icmp_code: 0,
            icmp_id: 0,
            frag_offset: 0,
            l4_off: 0,
            end: 0,
            mark: 0,
        }
    }
}

#[inline(always)]
fn be16(b: [u8; 2]) -> u16 {
    u16::from_be_bytes(b)
}

/// `N` bytes at `offset`, which must end at or before `end` (the end of the
/// IP packet), or `Malformed`.
#[inline(always)]
fn within<P: Packet, const N: usize>(
    p: &P,
    offset: usize,
    end: usize,
) -> Result<[u8; N], Malformed> {
    if offset + N > end {
        return Err(Malformed);
    }
    p.bytes::<N>(offset)
}

#[inline(always)]
pub fn parse<P: Packet>(p: &P) -> Result<Frame, Malformed> {
    let mut ethertype = be16(p.bytes::<2>(12)?);
    let mut off = ETH_HLEN;
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        ethertype = be16(p.bytes::<2>(off + 2)?);
        off += VLAN_HLEN;
        if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
            return Ok(Frame::VlanStack);
        }
    }
    match ethertype {
        ETH_P_ARP => Ok(Frame::Arp),
        ETH_P_IP => ipv4(p, off, None).map(Frame::Ip),
        ETH_P_IPV6 => ipv6(p, off, None).map(Frame::Ip),
        _ => Ok(Frame::OtherEthertype),
    }
}

/// Parses the packet an ICMP error at `ip.l4_off` quotes. Only its IP header
/// and the first 8 bytes of its transport header are guaranteed to be there;
/// every read stays inside the error (`outer.end`), whatever the quoted
/// header claims (a quoted packet is usually truncated).
#[inline(always)]
pub fn embedded<P: Packet>(p: &P, outer: &Ip) -> Result<Ip, Malformed> {
    let off = outer.l4_off + ICMP_HLEN;
    if outer.family == FAMILY_V4 {
        ipv4(p, off, Some(outer.end))
    } else {
        ipv6(p, off, Some(outer.end))
    }
}

/// `quoted`: the end of the ICMP error this header is quoted in; `None` for
/// the packet itself.
#[inline(always)]
fn ipv4<P: Packet>(p: &P, off: usize, quoted: Option<usize>) -> Result<Ip, Malformed> {
    let h = match quoted {
        Some(end) => within::<P, IPV4_MIN_HLEN>(p, off, end)?,
        None => p.bytes::<IPV4_MIN_HLEN>(off)?,
    };
    if h[0] >> 4 != 4 {
        return Err(Malformed);
    }
    let ihl = ((h[0] & 0x0f) as usize) * 4;
    let mut total_len = be16([h[2], h[3]]) as usize;
    if total_len == 0
        && quoted.is_none()
        && let Some(len) = p.gso_len()
    {
        total_len = len.saturating_sub(off);
    }
    if ihl < IPV4_MIN_HLEN || total_len < ihl {
        return Err(Malformed);
    }
    let mut ip = Ip::new(FAMILY_V4);
    ip.end = match quoted {
        Some(end) => end,
        None => off + total_len,
    };
    if off + ihl > ip.end {
        return Err(Malformed);
    }
    ip.proto = h[9];
    ip.hop_limit = h[8];
    ip.src[..4].copy_from_slice(&h[12..16]);
    ip.dst[..4].copy_from_slice(&h[16..20]);
    let frag = be16([h[6], h[7]]);
    // More-fragments flag or a non-zero offset.
    ip.fragment = frag & 0x3fff != 0;
    ip.later_fragment = frag & 0x1fff != 0;
    ip.frag_offset = frag & 0x1fff;
    ip.frag_id = be16([h[4], h[5]]) as u32;
    ip.l4_off = off + ihl;
    if !ip.later_fragment {
        transport(p, &mut ip, quoted)?;
    }
    Ok(ip)
}

#[inline(always)]
fn ipv6<P: Packet>(p: &P, off: usize, quoted: Option<usize>) -> Result<Ip, Malformed> {
    let h = match quoted {
        Some(end) => within::<P, IPV6_HLEN>(p, off, end)?,
        None => p.bytes::<IPV6_HLEN>(off)?,
    };
    if h[0] >> 4 != 6 {
        return Err(Malformed);
    }
    let mut ip = Ip::new(FAMILY_V6);
    let payload_len = be16([h[4], h[5]]) as usize;
    ip.end = match (quoted, p.gso_len()) {
        (Some(end), _) => end,
        (None, Some(len)) if payload_len == 0 => len,
        (None, _) => off + IPV6_HLEN + payload_len,
    };
    let end = ip.end;
    ip.proto = h[6];
    ip.hop_limit = h[7];
    ip.src.copy_from_slice(&h[8..24]);
    ip.dst.copy_from_slice(&h[24..40]);
    let mut l4 = off + IPV6_HLEN;
    let mut done = false;
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        let (next, len) = match ip.proto {
            IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS => {
                let e = within::<P, 2>(p, l4, end)?;
                (e[0], (e[1] as usize + 1) * 8)
            }
            IPV6_AH => {
                let e = within::<P, 2>(p, l4, end)?;
                (e[0], (e[1] as usize + 2) * 4)
            }
            IPV6_FRAGMENT => {
                let e = within::<P, 8>(p, l4, end)?;
                ip.fragment = true;
                ip.later_fragment = be16([e[2], e[3]]) & 0xfff8 != 0;
                ip.frag_id = u32::from_be_bytes([e[4], e[5], e[6], e[7]]);
                (e[0], 8)
            }
            _ => {
                done = true;
                break;
            }
        };
        ip.proto = next;
        l4 += len;
        // The whole extension header must be inside the packet.
        if l4 > MAX_OFFSET || l4 > end {
            return Err(Malformed);
        }
        if ip.later_fragment {
            ip.l4_off = l4;
            return Ok(ip);
        }
    }
    if !done {
        // Still inside the chain after the bound: refuse rather than guess.
        return Err(Malformed);
    }
    ip.l4_off = l4;
    transport(p, &mut ip, quoted)?;
    Ok(ip)
}

/// Reads the transport facts at `ip.l4_off`, inside the packet (`ip.end`).
/// A header too short to hold them is malformed (in a first fragment too:
/// RFC 7112); a quoted (ICMP error) packet only carries 8 bytes of it.
#[inline(always)]
fn transport<P: Packet>(p: &P, ip: &mut Ip, quoted: Option<usize>) -> Result<(), Malformed> {
    let off = ip.l4_off;
    let end = ip.end;
    match ip.proto {
        IPPROTO_TCP if quoted.is_none() => {
            // The whole TCP header must be present, options included, not
            // just the ports.
            let t = within::<P, 20>(p, off, end)?;
            let doff = (t[12] >> 4) as usize * 4;
            if doff < 20 || off + doff > end {
                return Err(Malformed);
            }
            ip.sport = be16([t[0], t[1]]);
            ip.dport = be16([t[2], t[3]]);
            ip.tcp_flags = t[13];
            ip.tcp_seq = u32::from_be_bytes([t[4], t[5], t[6], t[7]]);
            ip.tcp_ack = u32::from_be_bytes([t[8], t[9], t[10], t[11]]);
        }
        IPPROTO_TCP | IPPROTO_UDP => {
            let u = within::<P, 8>(p, off, end)?;
            ip.sport = be16([u[0], u[1]]);
            ip.dport = be16([u[2], u[3]]);
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            let i = within::<P, ICMP_HLEN>(p, off, end)?;
            ip.icmp_type = i[0];
            ip.icmp_code = i[1];
            ip.icmp_id = be16([i[4], i[5]]);
        }
        _ => {}
    }
    Ok(())
}
