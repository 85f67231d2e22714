//! Builds the eBPF programs (crate `portcullis-ebpf`) with the pinned nightly
//! and bpf-linker, and leaves the object in `OUT_DIR` for `include_bytes_aligned!`.
//! `cargo xtask setup` installs both.

/// The nightly the BPF target is built with; its LLVM must match bpf-linker's.
const EBPF_TOOLCHAIN: &str = "nightly-2026-10-29";

fn main() -> anyhow::Result<()> {
    let ebpf = aya_build::Package {
        name: "portcullis-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], aya_build::Toolchain::Custom(EBPF_TOOLCHAIN))
}
