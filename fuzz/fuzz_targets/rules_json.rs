#![no_main]
//! Rule sets in the API's JSON shape: validation, round trip, compilation
//! against the reference evaluator (daemon/src/fuzzing.rs).
libfuzzer_sys::fuzz_target!(|data: &[u8]| portcullis::fuzzing::rules_json(data));
