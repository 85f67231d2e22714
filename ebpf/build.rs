//! Rebuild the BPF object when bpf-linker changes (a new LLVM can change the
//! generated code). Mirrors the aya project template.
fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
