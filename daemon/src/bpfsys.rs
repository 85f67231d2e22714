//! The `bpf(2)` commands aya 0.16 does not offer (test runs, batch updates and
//! deletes, key walks, link detach, object get), behind one system-call
//! wrapper.

use std::io;

pub const BPF_OBJ_GET: libc::c_long = 7;
pub const BPF_PROG_TEST_RUN: libc::c_long = 10;
pub const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
pub const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
pub const BPF_MAP_DELETE_BATCH: libc::c_long = 27;
pub const BPF_LINK_DETACH: libc::c_long = 34;

/// Calls `bpf(cmd, attr, size_of::<A>())`; the kernel may write into `attr`.
///
/// # Safety
///
/// `A` must be the `union bpf_attr` member that `cmd` reads, `#[repr(C)]`
/// with every padding byte explicit and zero, and every pointer and fd in it
/// valid for the duration of the call.
pub unsafe fn bpf<A>(cmd: libc::c_long, attr: &mut A) -> io::Result<i64> {
    // SAFETY: upheld by the caller (see above); the size passed is A's.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut A, size_of::<A>() as u32) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}
