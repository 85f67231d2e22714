//! What the comparisons need from bpf(2) beyond aya: the empty XDP program
//! (the floor), attaching it with a link, and opening another tool's program
//! by id to run it with `BPF_PROG_TEST_RUN`.

use std::os::fd::{FromRawFd as _, OwnedFd};

use portcullis::bpfsys::bpf;

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;
const XDP_PASS: i64 = 2;

/// The head of `union bpf_attr` for BPF_PROG_LOAD, up to
/// `expected_attach_type` (the kernel zero-fills the rest).
#[repr(C)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

#[repr(C)]
struct LinkCreate {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
}

#[repr(C)]
struct GetFdById {
    id: u32,
    next_id: u32,
    open_flags: u32,
}

fn fd(rc: i64) -> OwnedFd {
    // SAFETY: `rc` is a file descriptor the kernel just returned to us and
    // nothing else owns.
    unsafe { OwnedFd::from_raw_fd(rc as i32) }
}

/// An XDP program of two instructions, `r0 = XDP_PASS; exit`: what any XDP
/// program costs before it does anything.
pub fn empty_xdp() -> anyhow::Result<OwnedFd> {
    let insns: [u64; 2] = [0xb7 | (XDP_PASS as u64) << 32, 0x95];
    let license = c"GPL";
    let mut name = [0u8; 16];
    name[..5].copy_from_slice(b"floor");
    let mut attr = ProgLoad {
        prog_type: BPF_PROG_TYPE_XDP,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
        kern_version: 0,
        prog_flags: 0,
        prog_name: name,
        prog_ifindex: 0,
        expected_attach_type: BPF_XDP,
    };
    // SAFETY: ProgLoad is the head of the BPF_PROG_LOAD attr with no
    // implicit padding; `insns` and `license` outlive the call.
    let rc = unsafe { bpf(BPF_PROG_LOAD, &mut attr) }?;
    Ok(fd(rc))
}

/// Attaches an XDP program to `ifindex` (driver mode); detached when the
/// returned link is closed.
pub fn attach_xdp(prog: std::os::fd::BorrowedFd<'_>, ifindex: u32) -> anyhow::Result<OwnedFd> {
    use std::os::fd::AsRawFd as _;
    let mut attr = LinkCreate {
        prog_fd: prog.as_raw_fd() as u32,
        target_ifindex: ifindex,
        attach_type: BPF_XDP,
        flags: 0,
    };
    // SAFETY: LinkCreate is the BPF_LINK_CREATE attr head for XDP, no
    // padding; the program fd is open.
    let rc = unsafe { bpf(BPF_LINK_CREATE, &mut attr) }?;
    Ok(fd(rc))
}

/// Opens the loaded program with this id.
pub fn prog_by_id(id: u32) -> anyhow::Result<OwnedFd> {
    let mut attr = GetFdById {
        id,
        next_id: 0,
        open_flags: 0,
    };
    // SAFETY: GetFdById is the BPF_PROG_GET_FD_BY_ID attr, no padding.
    let rc = unsafe { bpf(BPF_PROG_GET_FD_BY_ID, &mut attr) }?;
    Ok(fd(rc))
}
