//! The bootstrap filter: what a fresh start attaches to each interface at
//! once, before the full ingress program is verified (seconds on a busy
//! machine), and replaces atomically under the same XDP link once it is.
//!
//! It passes only what the host needs to keep its link up and what the full
//! program passes whatever the rules, the mode and the tables say, so it
//! only ever narrows (`tests/tests/bootstrap.rs` runs both programs over
//! the same frames):
//!
//! - ARP, untagged or under one 802.1Q/802.1ad tag (`parse::parse`:
//!   `Frame::Arp`, passed by `policy::decide_other`);
//! - IPv6 neighbour and router discovery (ICMPv6 types 133-137) with hop
//!   limit 255, the ICMPv6 header directly after the fixed IPv6 header (no
//!   extension headers: narrower than the full parser), its 8 bytes inside
//!   the payload length (`policy::icmp_before_rules`: `PassNeighbor`).
//!
//! Everything else drops, SSH and replies included: no new inbound until
//! the rules run. DHCP replies drop too: the full program passes one only
//! after the egress program recorded this host's request
//! (`conntrack::dhcp_expected`), and the egress program is not attached yet
//! when the bootstrap runs. No maps, no helpers: it verifies in
//! microseconds.
//!
//! A binary of its own (`portcullis-bootstrap`), so the data path's object
//! (its hash names the program pins) stays as it is.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};

    const ETH_P_ARP: u16 = 0x0806;
    const ETH_P_IPV6: u16 = 0x86DD;
    const ETH_P_8021Q: u16 = 0x8100;
    const ETH_P_8021AD: u16 = 0x88A8;
    const ETH_HLEN: usize = 14;
    const VLAN_HLEN: usize = 4;
    const IPV6_HLEN: usize = 40;
    const IPPROTO_ICMPV6: u8 = 58;
    const ICMP_HLEN: usize = 8;
    /// ICMPv6 router solicitation .. redirect.
    const ND_FIRST: u8 = 133;
    const ND_LAST: u8 = 137;
    const ND_HOP_LIMIT: u8 = 255;

    /// `N` bytes at `offset`, or `None` past the frame's linear data.
    #[inline(always)]
    fn bytes<const N: usize>(ctx: &XdpContext, offset: usize) -> Option<[u8; N]> {
        let start = ctx.data();
        if start + offset + N > ctx.data_end() {
            return None;
        }
        // SAFETY: the check above keeps the N bytes at `offset` inside the
        // packet's linear data; a byte array needs no alignment.
        Some(unsafe { *((start + offset) as *const [u8; N]) })
    }

    #[inline(always)]
    fn essential(ctx: &XdpContext) -> Option<bool> {
        let mut ethertype = u16::from_be_bytes(bytes::<2>(ctx, 12)?);
        let mut off = ETH_HLEN;
        if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
            ethertype = u16::from_be_bytes(bytes::<2>(ctx, off + 2)?);
            off += VLAN_HLEN;
        }
        match ethertype {
            ETH_P_ARP => Some(true),
            ETH_P_IPV6 => {
                let h = bytes::<IPV6_HLEN>(ctx, off)?;
                let payload_len = u16::from_be_bytes([h[4], h[5]]) as usize;
                if h[0] >> 4 != 6
                    || h[6] != IPPROTO_ICMPV6
                    || h[7] != ND_HOP_LIMIT
                    || payload_len < ICMP_HLEN
                {
                    return Some(false);
                }
                let icmp = bytes::<ICMP_HLEN>(ctx, off + IPV6_HLEN)?;
                Some((ND_FIRST..=ND_LAST).contains(&icmp[0]))
            }
            _ => Some(false),
        }
    }

    #[inline(always)]
    fn verdict(ctx: &XdpContext) -> u32 {
        if essential(ctx) == Some(true) {
            xdp_action::XDP_PASS
        } else {
            xdp_action::XDP_DROP
        }
    }

    /// Multi-buffer, as `portcullis_ingress` (a link update keeps the
    /// program's kind: the full program replaces it under the same link).
    #[xdp(frags)]
    pub fn pc_bootstrap(ctx: XdpContext) -> u32 {
        verdict(&ctx)
    }

    /// Single-buffer, as `portcullis_ingress_single` (kernels before 5.18).
    #[xdp]
    pub fn pc_bootstrap_sb(ctx: XdpContext) -> u32 {
        verdict(&ctx)
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
