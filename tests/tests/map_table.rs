//! ARCHITECTURE.md's map table names exactly the maps the eBPF side defines
//! (issue 16): a `#[map]` static in `ebpf/src` missing from the table, or a
//! row naming a map that does not exist, fails here. The two generations of
//! a rule map (`NAME_0`, `NAME_1`) are one row, `NAME_g`.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `NAME_0`/`NAME_1` as `NAME_g`.
fn generic(name: &str) -> String {
    match name.strip_suffix("_0").or_else(|| name.strip_suffix("_1")) {
        Some(base) => format!("{base}_g"),
        None => name.to_owned(),
    }
}

/// The names of the `#[map]` statics in `source`.
fn maps_in_source(source: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut lines = source.lines();
    while let Some(line) = lines.next() {
        if line.trim() != "#[map]" {
            continue;
        }
        // The static follows the attribute (doc comments come before it).
        let Some(def) = lines.next() else { break };
        let name = def
            .split_whitespace()
            .skip_while(|w| *w != "static")
            .nth(1)
            .map(|n| n.trim_end_matches(':').to_owned());
        found.insert(generic(
            &name.unwrap_or_else(|| panic!("no static after #[map]: {def}")),
        ));
    }
    found
}

/// The names in the first column of the table under `## Maps`.
fn maps_in_table(doc: &str) -> BTreeSet<String> {
    let section = doc
        .split("\n## Maps\n")
        .nth(1)
        .expect("ARCHITECTURE.md has a `## Maps` section");
    let section = section.split("\n## ").next().unwrap_or(section);
    let mut found = BTreeSet::new();
    for row in section.lines().filter(|l| l.starts_with("| `")) {
        let first = row.split('|').nth(1).unwrap_or_default();
        for name in first.split('`').skip(1).step_by(2) {
            found.insert(name.to_owned());
        }
    }
    found
}

/// The data path's maps: every `#[map]` in `ebpf/src` but those of
/// `floor.rs`, the benchmark's own program (never loaded by the daemon).
fn ebpf_maps() -> BTreeSet<String> {
    let mut all = BTreeSet::new();
    for entry in std::fs::read_dir(root().join("ebpf/src")).expect("ebpf/src") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "rs") && !path.ends_with("floor.rs") {
            all.extend(maps_in_source(
                &std::fs::read_to_string(&path).expect("read"),
            ));
        }
    }
    all
}

#[test]
fn the_parsers_read_statics_and_rows() {
    let src = "#[map]\npub static VERDICTS: PerCpuArray<Counter> = x;\n\
               /// doc\n#[map]\nstatic EVENT_BUDGET: PerCpuArray<[u64; 2]> = y;\n\
               #[map]\npub static SRC6_0: LpmTrie<K, u32> = z;\n#[map]\npub static SRC6_1: T = z;\n";
    let expected: BTreeSet<String> = ["VERDICTS", "EVENT_BUDGET", "SRC6_g"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(maps_in_source(src), expected);
    let doc = "# A\n\n## Maps\n\n| map | x |\n|---|---|\n| `VERDICTS` | `Reason` |\n\
               | `SRC6_g`, `EVENT_BUDGET` | y |\n\n## Next\n\n| `NOT_A_MAP` | z |\n";
    assert_eq!(maps_in_table(doc), expected);
}

#[test]
fn architecture_map_table_matches_the_ebpf_maps() {
    let code = ebpf_maps();
    assert!(code.len() >= 15, "found the eBPF maps: {code:?}");
    let doc = std::fs::read_to_string(root().join("ARCHITECTURE.md")).expect("ARCHITECTURE.md");
    let table = maps_in_table(&doc);
    let missing: Vec<_> = code.difference(&table).collect();
    let unknown: Vec<_> = table.difference(&code).collect();
    assert!(
        missing.is_empty() && unknown.is_empty(),
        "ARCHITECTURE.md's map table is out of date: maps in ebpf/src missing from it: {missing:?}; \
         rows naming no map in ebpf/src: {unknown:?}"
    );
}
