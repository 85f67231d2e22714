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
    // Room for the packet plus what a program may add with head/tail adjustments.
    let mut out = vec![0u8; packet.len() + 512];
    let mut attr = sys::TestRunAttr {
        prog_fd: prog.as_raw_fd() as u32,
        data_size_in: packet.len() as u32,
        data_size_out: out.len() as u32,
        data_in: packet.as_ptr() as u64,
        data_out: out.as_mut_ptr() as u64,
        repeat: repeat.max(1),
        ..Default::default()
    };
    // SAFETY: `attr` is `bpf_attr.test`, padding explicit and zero;
    // `data_in`/`data_out` point to live buffers of the sizes given, which
    // outlive the call; `prog` is an open program fd.
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
