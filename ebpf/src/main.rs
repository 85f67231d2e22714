//! Portcullis data path. Each packet goes through short stages: parse
//! (`parse`), look up and decide (`conntrack`, `policy`), count (`maps`).
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod conntrack;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod parse;
#[cfg(target_arch = "bpf")]
mod policy;

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{
        bindings::{TC_ACT_UNSPEC, xdp_action},
        macros::{classifier, xdp},
        programs::{TcContext, XdpContext},
    };
    use portcullis_common::Reason;

    use crate::{conntrack, maps, parse, policy};

    /// XDP ingress: default deny. Built with `frags` so native XDP also loads
    /// on interfaces with jumbo MTUs; headers are always in the first buffer.
    #[xdp(frags)]
    pub fn portcullis_ingress(ctx: XdpContext) -> u32 {
        let reason = match parse::parse(&ctx) {
            Ok(frame) => policy::decide(&ctx, &frame, &maps::settings()),
            Err(parse::Malformed) => Reason::DropMalformed,
        };
        maps::count(reason, (ctx.data_end() - ctx.data()) as u64);
        if reason.passes() {
            xdp_action::XDP_PASS
        } else {
            xdp_action::XDP_DROP
        }
    }

    /// TC egress: records the flows this host opens. Outbound is allow-all,
    /// so the verdict is always "continue": TC_ACT_UNSPEC lets later programs
    /// on the hook (TCX or clsact) run, and passes when there are none.
    #[classifier]
    pub fn portcullis_egress(ctx: TcContext) -> i32 {
        if let Ok(parse::Frame::Ip(ip)) = parse::parse(&ctx) {
            conntrack::track_egress(&ip);
        }
        TC_ACT_UNSPEC
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
