//! Portcullis data path: three programs (XDP ingress, multi- and
//! single-buffer; TC egress) over a module per stage or table. Each packet
//! goes through short stages: parse (`parse`), the established-flow cache
//! (`flowcache`, ingress), look up and decide (`conntrack`, `deny`,
//! `rules`, `policy`), count (`maps`; egress volume per destination:
//! `volume`), and report a drop (`events`).
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod clock;
#[cfg(target_arch = "bpf")]
mod conntrack;
#[cfg(target_arch = "bpf")]
mod deny;
#[cfg(target_arch = "bpf")]
mod events;
#[cfg(target_arch = "bpf")]
mod explain;
#[cfg(target_arch = "bpf")]
mod flowcache;
#[cfg(target_arch = "bpf")]
mod fqdn;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod parse;
#[cfg(target_arch = "bpf")]
mod policy;
#[cfg(target_arch = "bpf")]
mod ratelimit;
#[cfg(target_arch = "bpf")]
mod rules;
#[cfg(target_arch = "bpf")]
mod volume;

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{
        bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC, xdp_action},
        macros::{classifier, xdp},
        programs::{TcContext, XdpContext},
    };
    use portcullis_common::{
        DIR_EGRESS, DIR_INGRESS, EXPLAIN_UNSET, Reason, SETTING_EGRESS_ALLOWLIST,
        SETTING_EGRESS_VOLUME, SETTING_PASS_ALL,
    };

    use aya_ebpf::EbpfContext as _;

    use crate::{
        conntrack::{self, Lookup},
        events, explain, maps, parse, policy, rules, volume,
    };

    /// The live generation and its settings, read once for this packet.
    #[inline(always)]
    fn ctx() -> policy::Ctx {
        let generation = rules::active();
        if explain::on() {
            explain::generation(generation);
        }
        policy::Ctx {
            generation,
            settings: maps::settings(generation),
        }
    }

    /// XDP ingress: default deny. Built with `frags` so native XDP also loads
    /// on interfaces with jumbo MTUs; headers are always in the first buffer.
    //
    // `inline(always)` on each entry point: aya's macros call the function
    // from the program's real entry, and a call is a second stack frame;
    // kernels before 6.9 round each frame up to 32 bytes, which puts this
    // program over the 512-byte stack limit (refused on 6.1 and 6.8,
    // tests/tests/kernel_vm.rs).
    #[xdp(frags)]
    #[inline(always)]
    pub fn portcullis_ingress(ctx: XdpContext) -> u32 {
        ingress(&ctx)
    }

    /// The same filter without multi-buffer support, for kernels before 5.18
    /// (which refuse a `frags` program); chosen by the daemon when the first
    /// does not load, or by `xdp_program = "single-buffer"`.
    #[xdp]
    #[inline(always)]
    pub fn portcullis_ingress_single(ctx: XdpContext) -> u32 {
        ingress(&ctx)
    }

    #[inline(always)]
    fn ingress(ctx: &XdpContext) -> u32 {
        let bytes = (ctx.data_end() - ctx.data()) as u64;
        let ip = match parse::parse(ctx) {
            Ok(parse::Frame::Ip(ip)) => ip,
            // Not IP, or unreadable: ARP passes, the rest drops. Only a drop
            // needs the settings (audit mode).
            other => {
                let reason = match &other {
                    Ok(frame) => policy::decide_other(frame),
                    Err(parse::Malformed) => Reason::DropMalformed,
                };
                maps::count(reason, bytes);
                return if reason.passes() || audited(&self::ctx(), bytes) {
                    xdp_action::XDP_PASS
                } else {
                    xdp_action::XDP_DROP
                };
            }
        };
        // A reply of an established flow this host opened, found in this
        // CPU's flow cache, passes at once (`flowcache.rs`).
        if conntrack::cached(&ip) {
            maps::count(Reason::PassEstablished, bytes);
            return xdp_action::XDP_PASS;
        }
        // A packet of a flow this host opened passes on the connection table
        // alone: it needs neither the live generation nor its settings. A
        // TCP SYN without ACK is a reply only in a simultaneous open (rare):
        // it meets the policy first and asks the connection table only when
        // the policy would drop it (verdicts as before: `policy::established`).
        if policy::established(&ip, Lookup::NotSyn) {
            maps::count(Reason::PassEstablished, bytes);
            return xdp_action::XDP_PASS;
        }
        let c = self::ctx();
        let mut reason = policy::decide(ctx, &ip, &c, bytes);
        // (Asked again, not kept: a flag live across `decide` would have the
        // verifier walk the policy once for each of its values.)
        if !reason.passes()
            && conntrack::opens_tcp_connection(&ip)
            && policy::established(&ip, Lookup::All)
        {
            if explain::on() {
                // A deny set the policy matched did not decide.
                explain::deny_set(EXPLAIN_UNSET);
            }
            reason = Reason::PassEstablished;
        }
        maps::count(reason, bytes);
        if !reason.passes() {
            events::report(&ip, reason, DIR_INGRESS, ctx.ingress_ifindex() as u32);
        }
        if reason.passes() || audited(&c, bytes) {
            xdp_action::XDP_PASS
        } else {
            xdp_action::XDP_DROP
        }
    }

    /// The interface an egress packet is leaving by.
    #[inline(always)]
    fn skb_ifindex(ctx: &TcContext) -> u32 {
        // SAFETY: a TC program's context is the kernel's `__sk_buff`, valid
        // for the program's run; `ifindex` is a readable field of it.
        unsafe { (*ctx.as_ptr().cast::<aya_ebpf::bindings::__sk_buff>()).ifindex }
    }

    /// The packet's mark (its socket's SO_MARK): the DNS guard's test.
    #[inline(always)]
    fn skb_mark(ctx: &TcContext) -> u32 {
        // SAFETY: as in `skb_ifindex`; `mark` is a readable field.
        unsafe { (*ctx.as_ptr().cast::<aya_ebpf::bindings::__sk_buff>()).mark }
    }

    /// The packets an egress frame will leave as: its segments when the
    /// stack hands down one large offloaded frame (GSO), else 1.
    #[inline(always)]
    fn skb_segments(ctx: &TcContext) -> u64 {
        // SAFETY: as in `skb_ifindex`; `gso_segs` is a readable field.
        let segs = unsafe { (*ctx.as_ptr().cast::<aya_ebpf::bindings::__sk_buff>()).gso_segs };
        u64::from(segs.max(1))
    }

    /// TC egress: records the flows this host opens and, when the egress
    /// allowlist is on, drops what it does not admit. A pass is "continue"
    /// (TC_ACT_UNSPEC): later programs on the hook (TCX or clsact) still run.
    /// Non-IP frames (ARP) pass uncounted. An IP packet this parser cannot
    /// read passes uncounted without an allowlist; under one it is dropped
    /// (`drop_malformed`): a process with CAP_NET_RAW could otherwise send
    /// anything past the allowlist by making it unparsable.
    #[classifier]
    #[inline(always)]
    pub fn portcullis_egress(ctx: TcContext) -> i32 {
        let bytes = ctx.len() as u64;
        let c = self::ctx();
        let mut ip = match parse::parse(&ctx) {
            Ok(parse::Frame::Ip(ip)) => ip,
            Err(parse::Malformed) if c.settings.flags & SETTING_EGRESS_ALLOWLIST != 0 => {
                maps::count(Reason::DropMalformed, bytes);
                return if audited(&c, bytes) {
                    TC_ACT_UNSPEC
                } else {
                    TC_ACT_SHOT as i32
                };
            }
            _ => return TC_ACT_UNSPEC,
        };
        ip.mark = skb_mark(&ctx);
        let reason = policy::decide_egress(&ip, &c, bytes);
        maps::count(reason, bytes);
        if !reason.passes() {
            events::report(&ip, reason, DIR_EGRESS, skb_ifindex(&ctx));
        } else if c.settings.flags & SETTING_EGRESS_VOLUME != 0 {
            volume::count(&ip, bytes, skb_segments(&ctx));
        }
        if reason.passes() || audited(&c, bytes) {
            TC_ACT_UNSPEC
        } else {
            TC_ACT_SHOT as i32
        }
    }

    /// In audit (or open) mode a drop becomes a pass, counted as such.
    #[inline(always)]
    fn audited(c: &policy::Ctx, bytes: u64) -> bool {
        if c.settings.flags & SETTING_PASS_ALL == 0 {
            return false;
        }
        maps::count(Reason::PassAudit, bytes);
        true
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
