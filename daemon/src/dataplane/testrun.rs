//! Runs a loaded program on a crafted packet with `BPF_PROG_TEST_RUN` and
//! returns its verdict: the packet-level tests and the benchmarks use it to
//! exercise the real programs without a NIC. aya 0.16 does not expose the
//! command; the call goes through [`super::sys::bpf`].

use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd},
};

use super::sys;

/// What one test run returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// The program's return value (`XDP_PASS`, `TC_ACT_SHOT`, ...).
    pub retval: u32,
    /// Mean run time per repetition as the kernel measured it, in ns.
    pub duration_ns: u32,
    /// The packet after the program ran.
    pub data_out: Vec<u8>,
}

/// Runs `prog` on `packet` `repeat` times (at least once).
pub fn run(prog: BorrowedFd<'_>, packet: &[u8], repeat: u32) -> io::Result<Outcome> {
    run_on(prog, packet, repeat, None)
}

/// The kernel's `struct xdp_md`, as a test run's input context.
#[repr(C)]
struct XdpMd {
    data: u32,
    data_end: u32,
    data_meta: u32,
    ingress_ifindex: u32,
    rx_queue_index: u32,
    egress_ifindex: u32,
}

/// [`run`] for an XDP program as if `packet` arrived on `ingress_ifindex`
/// (queue 0; the kernel refuses an interface without a registered XDP
/// receive queue); `None`: the kernel's default (loopback).
pub fn run_on(
    prog: BorrowedFd<'_>,
    packet: &[u8],
    repeat: u32,
    ingress_ifindex: Option<u32>,
) -> io::Result<Outcome> {
    // Room for the packet plus what a program may add with head/tail adjustments.
    let mut out = vec![0u8; packet.len() + 512];
    let ctx = ingress_ifindex.map(|ifindex| XdpMd {
        data: 0,
        data_end: packet.len() as u32,
        data_meta: 0,
        ingress_ifindex: ifindex,
        rx_queue_index: 0,
        egress_ifindex: 0,
    });
    let (ctx_in, ctx_size_in) = match &ctx {
        Some(md) => (
            std::ptr::from_ref(md) as u64,
            std::mem::size_of::<XdpMd>() as u32,
        ),
        None => (0, 0),
    };
    let mut attr = sys::TestRunAttr {
        ctx_in,
        ctx_size_in,
        prog_fd: prog.as_raw_fd() as u32,
        data_size_in: packet.len() as u32,
        data_size_out: out.len() as u32,
        data_in: packet.as_ptr() as u64,
        data_out: out.as_mut_ptr() as u64,
        repeat: repeat.max(1),
        ..Default::default()
    };
    // SAFETY: `attr` is `bpf_attr.test`, padding explicit and zero;
    // `data_in`/`data_out` (and `ctx_in`, when set) point to live buffers of
    // the sizes given, which outlive the call; `prog` is an open program fd.
    unsafe { sys::bpf(sys::BPF_PROG_TEST_RUN, &mut attr) }?;
    out.truncate(attr.data_size_out as usize);
    Ok(Outcome {
        retval: attr.retval,
        duration_ns: attr.duration,
        data_out: out,
    })
}

/// The benchmark's floor programs (`ebpf/src/floor.rs`): XDP programs that
/// do one thing each. Not loaded by the daemon.
pub static FLOOR_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/portcullis-floor"));
