//! The API fuzz target's corpus, replayed through the real router over a
//! real core and data path, then a seeded, bounded pass of its mutations:
//! no request may get a 500 or change the rules when it is refused.
//! Longer runs: `cargo fuzz run api_request` (fuzz/README.md).

use std::collections::BTreeMap;

use portcullis::fuzzing::{ApiHarness, mutations};
use portcullis_tests::*;

#[test]
fn api_corpus_and_its_mutations_never_break_the_daemon() {
    require_root!();
    let pins = PinDir::new().unwrap();
    let state = tempfile::tempdir().unwrap();
    let api = ApiHarness::new(pins.path(), state.path()).unwrap();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/api_request");
    let mut corpus: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    corpus.sort();
    let mut statuses = BTreeMap::new();
    for input in corpus.iter().chain(mutations(&corpus, 1500).iter()) {
        *statuses.entry(api.request(input)).or_insert(0u32) += 1;
    }
    eprintln!("statuses: {statuses:?}");
    // The pass reached both sides: accepted changes and refusals.
    assert!(
        statuses.get(&200).copied().unwrap_or(0) + statuses.get(&201).copied().unwrap_or(0) > 20,
        "{statuses:?}"
    );
    assert!(
        statuses.keys().any(|s| (400..500).contains(s)),
        "{statuses:?}"
    );
}
