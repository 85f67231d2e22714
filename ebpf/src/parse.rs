//! Stage 1: parse. Turns the bytes of a frame into the few facts the policy
//! needs, with every read bounds-checked against `data_end`.
//!
//! Header lengths are never assumed: the IPv4 header length comes from IHL and
//! the IPv6 extension-header chain is walked (bounded), so options and
//! extension headers cannot hide the transport header from the policy.

use core::mem::size_of;

use aya_ebpf::programs::XdpContext;

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86DD;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;

const IPV6_HOPOPTS: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AH: u8 = 51;
const IPV6_DSTOPTS: u8 = 60;

/// Extension headers walked before giving up (and dropping as malformed).
const MAX_IPV6_EXT_HEADERS: usize = 6;
/// Upper bound on the transport header offset; keeps the verifier's range
/// tracking small and rejects absurd header chains.
const MAX_L4_OFFSET: usize = 512;

const ETH_HLEN: usize = 14;
const IPV4_MIN_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;

/// A frame that cannot be parsed safely. Always dropped.
pub struct Malformed;

/// What the policy gets to see.
pub enum Frame {
    Arp,
    Ip(Ip),
    /// Any Ethernet type other than ARP, IPv4 and IPv6.
    OtherEthertype,
}

/// The facts of an IPv4 or IPv6 packet the policy decides on.
pub struct Ip {
    pub v6: bool,
    /// Transport protocol (after IPv6 extension headers).
    pub proto: u8,
    /// IPv4 TTL or IPv6 hop limit.
    pub hop_limit: u8,
    /// A non-first fragment: no transport header to look at.
    pub later_fragment: bool,
    /// TCP/UDP destination port in host order (0 for other protocols).
    pub dport: u16,
    /// ICMP/ICMPv6 type (0 for other protocols).
    pub icmp_type: u8,
}

#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Result<*const T, Malformed> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return Err(Malformed);
    }
    Ok((start + offset) as *const T)
}

/// Reads `N` bytes at `offset`.
#[inline(always)]
fn bytes<const N: usize>(ctx: &XdpContext, offset: usize) -> Result<[u8; N], Malformed> {
    let p = ptr_at::<[u8; N]>(ctx, offset)?;
    // SAFETY: `ptr_at` checked that N bytes at `offset` lie inside the packet;
    // a byte array has no alignment requirement.
    Ok(unsafe { *p })
}

#[inline(always)]
fn be16(b: [u8; 2]) -> u16 {
    u16::from_be_bytes(b)
}

pub fn parse(ctx: &XdpContext) -> Result<Frame, Malformed> {
    let ethertype = be16(bytes::<2>(ctx, 12)?);
    match ethertype {
        ETH_P_ARP => Ok(Frame::Arp),
        ETH_P_IP => parse_ipv4(ctx, ETH_HLEN).map(Frame::Ip),
        ETH_P_IPV6 => parse_ipv6(ctx, ETH_HLEN).map(Frame::Ip),
        _ => Ok(Frame::OtherEthertype),
    }
}

fn parse_ipv4(ctx: &XdpContext, off: usize) -> Result<Ip, Malformed> {
    let h = bytes::<IPV4_MIN_HLEN>(ctx, off)?;
    if h[0] >> 4 != 4 {
        return Err(Malformed);
    }
    let ihl = ((h[0] & 0x0f) as usize) * 4;
    if ihl < IPV4_MIN_HLEN {
        return Err(Malformed);
    }
    let frag = be16([h[6], h[7]]);
    let later_fragment = frag & 0x1fff != 0;
    let mut ip = Ip {
        v6: false,
        proto: h[9],
        hop_limit: h[8],
        later_fragment,
        dport: 0,
        icmp_type: 0,
    };
    if !later_fragment {
        transport(ctx, off + ihl, &mut ip)?;
    }
    Ok(ip)
}

fn parse_ipv6(ctx: &XdpContext, off: usize) -> Result<Ip, Malformed> {
    let h = bytes::<8>(ctx, off)?;
    if h[0] >> 4 != 6 {
        return Err(Malformed);
    }
    // The rest of the fixed header (addresses) must be there too.
    ptr_at::<[u8; IPV6_HLEN]>(ctx, off)?;
    let mut ip = Ip {
        v6: true,
        proto: h[6],
        hop_limit: h[7],
        later_fragment: false,
        dport: 0,
        icmp_type: 0,
    };
    let mut l4 = off + IPV6_HLEN;
    let mut done = false;
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        let (next, len) = match ip.proto {
            IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS => {
                let e = bytes::<2>(ctx, l4)?;
                (e[0], (e[1] as usize + 1) * 8)
            }
            IPV6_AH => {
                let e = bytes::<2>(ctx, l4)?;
                (e[0], (e[1] as usize + 2) * 4)
            }
            IPV6_FRAGMENT => {
                let e = bytes::<4>(ctx, l4)?;
                if be16([e[2], e[3]]) & 0xfff8 != 0 {
                    ip.later_fragment = true;
                }
                (e[0], 8)
            }
            _ => {
                done = true;
                break;
            }
        };
        ip.proto = next;
        l4 += len;
        if l4 > MAX_L4_OFFSET {
            return Err(Malformed);
        }
        if ip.later_fragment {
            return Ok(ip);
        }
    }
    if !done {
        // Still inside the chain after the bound: refuse rather than guess.
        return Err(Malformed);
    }
    transport(ctx, l4, &mut ip)?;
    Ok(ip)
}

/// Reads the transport facts at `off`; a header too short to hold them is malformed.
#[inline(always)]
fn transport(ctx: &XdpContext, off: usize, ip: &mut Ip) -> Result<(), Malformed> {
    if off > MAX_L4_OFFSET {
        return Err(Malformed);
    }
    match ip.proto {
        IPPROTO_TCP => {
            // The whole minimal TCP header must be present, not just the ports.
            let t = bytes::<20>(ctx, off)?;
            ip.dport = be16([t[2], t[3]]);
        }
        IPPROTO_UDP => {
            let u = bytes::<8>(ctx, off)?;
            ip.dport = be16([u[2], u[3]]);
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            let i = bytes::<4>(ctx, off)?;
            ip.icmp_type = i[0];
        }
        _ => {}
    }
    Ok(())
}
