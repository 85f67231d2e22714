#![no_main]
//! Whole configuration files (daemon/src/fuzzing.rs).
libfuzzer_sys::fuzz_target!(|data: &[u8]| portcullis::fuzzing::config_toml(data));
