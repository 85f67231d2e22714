//! Runs a loaded program on a crafted packet with `BPF_PROG_TEST_RUN` and
//! returns its verdict: the packet-level tests and the benchmarks use it to
//! exercise the real programs without a NIC. aya 0.16 does not expose the
//! command, so this is the one place that calls `bpf(2)` directly.

use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd},
};

/// The `test` member of `union bpf_attr` (include/uapi/linux/bpf.h).
#[repr(C, align(8))]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    /// Explicit, so it is zero: the kernel rejects non-zero bytes past the
    /// fields it knows.
    _pad: u32,
}

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
    let mut attr = TestRunAttr {
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
    unsafe { crate::bpfsys::bpf(crate::bpfsys::BPF_PROG_TEST_RUN, &mut attr) }?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attr_matches_the_kernel_layout() {
        // 15 fields of the uapi struct, u64s 8-aligned: 76 bytes, plus explicit padding.
        assert_eq!(size_of::<TestRunAttr>(), 80);
        assert_eq!(std::mem::offset_of!(TestRunAttr, data_in), 16);
        assert_eq!(std::mem::offset_of!(TestRunAttr, repeat), 32);
        assert_eq!(std::mem::offset_of!(TestRunAttr, ctx_in), 48);
        assert_eq!(std::mem::offset_of!(TestRunAttr, flags), 64);
    }
}
