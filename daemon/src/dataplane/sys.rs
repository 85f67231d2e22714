//! The one `bpf(2)` wrapper, and the members of `union bpf_attr` the
//! daemon passes it (include/uapi/linux/bpf.h), for the commands aya 0.16
//! does not offer: test runs, batch lookups, updates and deletes, key walks, link
//! detach and object get. Each layout is checked against the kernel's
//! offsets by a test below.

use std::io;

pub const BPF_OBJ_GET: libc::c_long = 7;
pub const BPF_PROG_TEST_RUN: libc::c_long = 10;
pub const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
pub const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
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

/// Opens the pinned object at `path` (`BPF_OBJ_GET`): needs only access to
/// the pin, no capability.
pub fn obj_get(path: &std::path::Path) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::{
        fd::{FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    };
    let cpath = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let mut get = ObjGetAttr {
        pathname: cpath.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
        path_fd: 0,
        _pad: 0,
    };
    // SAFETY: `get` is `bpf_attr.obj_get`, padding explicit and zero; its
    // pathname points to a NUL-terminated string that outlives the call.
    let fd = unsafe { bpf(BPF_OBJ_GET, &mut get) }?;
    // SAFETY: the kernel just returned this fd to us; we own it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `bpf_attr.test` (`BPF_PROG_TEST_RUN`).
#[repr(C, align(8))]
#[derive(Default)]
pub struct TestRunAttr {
    pub prog_fd: u32,
    pub retval: u32,
    pub data_size_in: u32,
    pub data_size_out: u32,
    pub data_in: u64,
    pub data_out: u64,
    pub repeat: u32,
    pub duration: u32,
    pub ctx_size_in: u32,
    pub ctx_size_out: u32,
    pub ctx_in: u64,
    pub ctx_out: u64,
    pub flags: u32,
    pub cpu: u32,
    pub batch_size: u32,
    /// Explicit, so it is zero: the kernel rejects non-zero bytes past the
    /// fields it knows.
    pub _pad: u32,
}

/// `bpf_attr.batch` (`BPF_MAP_*_BATCH`).
#[repr(C)]
pub struct BatchAttr {
    pub in_batch: u64,
    pub out_batch: u64,
    pub keys: u64,
    pub values: u64,
    pub count: u32,
    pub map_fd: u32,
    pub elem_flags: u64,
    pub flags: u64,
}

/// The element member of `bpf_attr` (`BPF_MAP_GET_NEXT_KEY` and the other
/// element commands; `next_key` shares its place with `value`).
#[repr(C)]
pub struct ElemAttr {
    pub map_fd: u32,
    pub _pad: u32,
    pub key: u64,
    pub next_key: u64,
    pub flags: u64,
}

/// The `BPF_OBJ_*` member of `bpf_attr` (`BPF_OBJ_GET`).
#[repr(C)]
pub struct ObjGetAttr {
    pub pathname: u64,
    pub bpf_fd: u32,
    pub file_flags: u32,
    pub path_fd: i32,
    pub _pad: u32,
}

/// `bpf_attr.link_detach` (`BPF_LINK_DETACH`).
#[repr(C)]
pub struct LinkDetachAttr {
    pub link_fd: u32,
}

#[cfg(test)]
mod tests {
    use std::mem::offset_of;

    use super::*;

    #[test]
    fn test_run_attr_matches_the_kernel_layout() {
        // 15 fields of the uapi struct, u64s 8-aligned: 76 bytes, plus explicit padding.
        assert_eq!(size_of::<TestRunAttr>(), 80);
        assert_eq!(offset_of!(TestRunAttr, retval), 4);
        assert_eq!(offset_of!(TestRunAttr, data_size_out), 12);
        assert_eq!(offset_of!(TestRunAttr, data_in), 16);
        assert_eq!(offset_of!(TestRunAttr, data_out), 24);
        assert_eq!(offset_of!(TestRunAttr, repeat), 32);
        assert_eq!(offset_of!(TestRunAttr, duration), 36);
        assert_eq!(offset_of!(TestRunAttr, ctx_in), 48);
        assert_eq!(offset_of!(TestRunAttr, ctx_out), 56);
        assert_eq!(offset_of!(TestRunAttr, flags), 64);
        assert_eq!(offset_of!(TestRunAttr, cpu), 68);
        assert_eq!(offset_of!(TestRunAttr, batch_size), 72);
    }

    #[test]
    fn batch_attr_matches_the_kernel_layout() {
        assert_eq!(size_of::<BatchAttr>(), 56);
        assert_eq!(offset_of!(BatchAttr, in_batch), 0);
        assert_eq!(offset_of!(BatchAttr, out_batch), 8);
        assert_eq!(offset_of!(BatchAttr, keys), 16);
        assert_eq!(offset_of!(BatchAttr, values), 24);
        assert_eq!(offset_of!(BatchAttr, count), 32);
        assert_eq!(offset_of!(BatchAttr, map_fd), 36);
        assert_eq!(offset_of!(BatchAttr, elem_flags), 40);
        assert_eq!(offset_of!(BatchAttr, flags), 48);
    }

    #[test]
    fn elem_attr_matches_the_kernel_layout() {
        assert_eq!(size_of::<ElemAttr>(), 32);
        assert_eq!(offset_of!(ElemAttr, map_fd), 0);
        assert_eq!(offset_of!(ElemAttr, key), 8);
        assert_eq!(offset_of!(ElemAttr, next_key), 16);
        assert_eq!(offset_of!(ElemAttr, flags), 24);
    }

    #[test]
    fn obj_get_attr_matches_the_kernel_layout() {
        // pathname, bpf_fd, file_flags, path_fd (6.5+): 20 bytes, padded to 24.
        assert_eq!(size_of::<ObjGetAttr>(), 24);
        assert_eq!(offset_of!(ObjGetAttr, pathname), 0);
        assert_eq!(offset_of!(ObjGetAttr, bpf_fd), 8);
        assert_eq!(offset_of!(ObjGetAttr, file_flags), 12);
        assert_eq!(offset_of!(ObjGetAttr, path_fd), 16);
    }

    #[test]
    fn link_detach_attr_matches_the_kernel_layout() {
        assert_eq!(size_of::<LinkDetachAttr>(), 4);
        assert_eq!(offset_of!(LinkDetachAttr, link_fd), 0);
    }
}
