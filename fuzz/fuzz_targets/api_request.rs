#![no_main]
//! HTTP requests through the real API router over a real core and data path
//! (root and bpffs needed): no 500s, refusals change nothing.

use std::sync::OnceLock;

use portcullis::fuzzing::ApiHarness;

struct Harness {
    api: ApiHarness,
    _dirs: (tempfile::TempDir, std::path::PathBuf),
}

/// One harness for the whole process (libFuzzer calls the target again and
/// again on one thread).
fn harness() -> &'static std::sync::Mutex<Harness> {
    static H: OnceLock<std::sync::Mutex<Harness>> = OnceLock::new();
    H.get_or_init(|| {
        let state = tempfile::tempdir().unwrap();
        let pins = std::path::PathBuf::from(format!("/sys/fs/bpf/portcullis-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&pins).unwrap();
        let api = ApiHarness::new(&pins, state.path()).unwrap();
        std::sync::Mutex::new(Harness { api, _dirs: (state, pins) })
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    harness().lock().unwrap().api.request(data);
});
