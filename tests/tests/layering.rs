//! The daemon's layers only point down (issue 16): no import cycle between
//! the daemon's modules, and the pure side (the model, the rule model, the
//! configuration and the compiler) imports nothing that talks to the kernel
//! or probes the host.
//!
//! The check reads `daemon/src/**/*.rs` (not the binaries), takes every
//! `crate::` path outside comments and test modules, and builds the graph
//! between the top-level modules (`dataplane/maps.rs` is `dataplane`).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

/// Modules that must stay pure: no kernel, no host probes.
const PURE: &[&str] = &[
    "model",
    "rules",
    "compile",
    "config",
    "denylist",
    "volume",
    "dns",
    "crowdsec",
    "membership",
    "parallel",
];

/// Crates and std paths a pure module may not name: each talks to the
/// kernel or the host (netlink, bpf, statfs, group lookups, processes).
const HOST_CRATES: &[&str] = &[
    "nix::",
    "libc::",
    "aya::",
    "rtnetlink",
    "netlink_",
    "zbus",
    "std::process",
    "sd_notify",
];

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../daemon/src")
}

/// Every source file of the library, with its top-level module name.
fn modules() -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    let mut stack = vec![src_dir()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("reading daemon/src") {
            let path = entry.expect("dir entry").path();
            let rel = path.strip_prefix(src_dir()).expect("under src").to_owned();
            if path.is_dir() {
                if rel != Path::new("bin") {
                    stack.push(path);
                }
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") || rel == Path::new("lib.rs") {
                continue;
            }
            let first = rel.components().next().expect("a component");
            let name = Path::new(first.as_os_str())
                .file_stem()
                .expect("a stem")
                .to_string_lossy()
                .into_owned();
            out.push((name, path));
        }
    }
    out.sort();
    out
}

/// The code of a file without comments and without its `#[cfg(test)]`
/// modules (tests may reach anywhere).
fn code(text: &str) -> String {
    let mut out = String::new();
    let mut lines = text.lines().peekable();
    let mut skip_depth: Option<i64> = None;
    while let Some(line) = lines.next() {
        let trimmed = line.trim_start();
        if let Some(depth) = skip_depth.as_mut() {
            *depth += braces(line);
            if *depth <= 0 {
                skip_depth = None;
            }
            continue;
        }
        if trimmed.starts_with("#[cfg(test)]")
            && lines
                .peek()
                .is_some_and(|next| next.trim_start().starts_with("mod "))
        {
            let head = lines.next().unwrap_or_default();
            let depth = braces(head);
            if depth > 0 {
                skip_depth = Some(depth);
            }
            continue;
        }
        let without_comment = match line.find("//") {
            Some(at) => &line[..at],
            None => line,
        };
        out.push_str(without_comment);
        out.push('\n');
    }
    out
}

fn braces(line: &str) -> i64 {
    let open = line.matches('{').count() as i64;
    let close = line.matches('}').count() as i64;
    open - close
}

/// The top-level modules named after `crate::` in `code`.
fn imports(code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        let after = &rest[at + "crate::".len()..];
        let after = after.trim_start();
        if let Some(group) = after.strip_prefix('{') {
            // `crate::{a, b::{c, d}, e}`: the first name of each item at depth 0.
            let mut depth = 0;
            let mut item_start = true;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => item_start = true,
                    c if item_start && (c.is_alphanumeric() || c == '_') => {
                        item_start = false;
                        found.insert(ident(&group[i..]));
                    }
                    _ => {}
                }
            }
        } else {
            found.insert(ident(after));
        }
        rest = &rest[at + "crate::".len()..];
    }
    found.retain(|m| !m.is_empty());
    found
}

fn ident(s: &str) -> String {
    s.chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect()
}

/// The graph: module -> the modules it imports (itself excluded).
fn graph() -> (BTreeMap<String, BTreeSet<String>>, BTreeMap<String, String>) {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut sources: BTreeMap<String, String> = BTreeMap::new();
    for (name, path) in modules() {
        let text = std::fs::read_to_string(&path).expect("reading a source file");
        let code = code(&text);
        let edges = graph.entry(name.clone()).or_default();
        for m in imports(&code) {
            if m != name {
                edges.insert(m);
            }
        }
        sources.entry(name).or_default().push_str(&code);
    }
    (graph, sources)
}

/// Every elementary cycle's smallest witness: for each edge a -> b, a path
/// back from b to a, if any.
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> BTreeSet<Vec<String>> {
    let mut found = BTreeSet::new();
    for (from, tos) in graph {
        for to in tos {
            if let Some(mut path) = path(graph, to, from) {
                path.insert(0, from.clone());
                // Rotate so the smallest name leads: one entry per cycle.
                let body = &path[..path.len() - 1];
                let min = body
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, m)| *m)
                    .map(|(i, _)| i)
                    .unwrap_or(0);
                let mut cycle: Vec<String> =
                    body[min..].iter().chain(&body[..min]).cloned().collect();
                cycle.push(cycle[0].clone());
                found.insert(cycle);
            }
        }
    }
    found
}

/// A shortest path from `from` to `to` (breadth first).
fn path(graph: &BTreeMap<String, BTreeSet<String>>, from: &str, to: &str) -> Option<Vec<String>> {
    let mut previous: BTreeMap<String, String> = BTreeMap::new();
    let mut queue = std::collections::VecDeque::from([from.to_owned()]);
    let mut seen = BTreeSet::from([from.to_owned()]);
    while let Some(at) = queue.pop_front() {
        if at == to {
            let mut path = vec![at.clone()];
            let mut cur = at;
            while let Some(p) = previous.get(&cur) {
                path.push(p.clone());
                cur = p.clone();
            }
            path.reverse();
            return Some(path);
        }
        for next in graph.get(&at).into_iter().flatten() {
            if seen.insert(next.clone()) {
                previous.insert(next.clone(), at.clone());
                queue.push_back(next.clone());
            }
        }
    }
    None
}

#[test]
fn the_parser_sees_grouped_and_inline_imports() {
    let code = code(
        "use crate::{\n    compile::{self, Image},\n    dataplane::Dataplane,\n};\n\
         // crate::comment is not an import\n\
         fn f() { crate::sockets::connections(); }\n\
         #[cfg(test)]\nmod tests {\n    use crate::api;\n}\n",
    );
    let found = imports(&code);
    let expected: BTreeSet<String> = ["compile", "dataplane", "sockets"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(found, expected);
    let mut g = BTreeMap::new();
    g.insert("a".to_string(), BTreeSet::from(["b".to_string()]));
    g.insert("b".to_string(), BTreeSet::from(["a".to_string()]));
    assert_eq!(cycles(&g).len(), 1, "a -> b -> a is a cycle");
}

#[test]
fn no_import_cycle_between_daemon_modules() {
    let (graph, _) = graph();
    assert!(graph.len() > 10, "found the daemon's modules: {graph:?}");
    let cycles = cycles(&graph);
    let shown: Vec<String> = cycles.iter().map(|c| c.join(" -> ")).collect();
    assert!(
        cycles.is_empty(),
        "import cycles between daemon modules:\n  {}",
        shown.join("\n  ")
    );
}

#[test]
fn the_pure_side_imports_nothing_kernel_facing() {
    let (graph, sources) = graph();
    let mut wrong = Vec::new();
    for module in PURE {
        for import in graph.get(*module).into_iter().flatten() {
            if !PURE.contains(&import.as_str()) {
                wrong.push(format!("{module} imports crate::{import}"));
            }
        }
        for token in HOST_CRATES {
            if sources.get(*module).is_some_and(|code| names(code, token)) {
                wrong.push(format!("{module} names {token}"));
            }
        }
    }
    // The data plane owns its own types: it reads no configuration.
    for import in graph.get("dataplane").into_iter().flatten() {
        if ["config", "core", "api", "state", "readiness"].contains(&import.as_str()) {
            wrong.push(format!("dataplane imports crate::{import}"));
        }
    }
    // The core reaches the kernel only through the data plane.
    for import in graph.get("core").into_iter().flatten() {
        if ["sockets", "links", "bpfsys", "testrun"].contains(&import.as_str()) {
            wrong.push(format!("core imports crate::{import}"));
        }
    }
    for token in ["libc::", "nix::"] {
        if sources.get("core").is_some_and(|code| names(code, token)) {
            wrong.push(format!("core names {token}"));
        }
    }
    assert!(
        wrong.is_empty(),
        "the pure side (model, rules, compile, config) reaches the kernel or the host, or the core or the data plane reach past their layer:\n  {}",
        wrong.join("\n  ")
    );
}

/// Whether `code` names the path `token` (`nix::`) as a path of its own:
/// not as the tail of another (`std::os::unix::fs` names no `nix::`).
fn names(code: &str, token: &str) -> bool {
    code.match_indices(token).any(|(at, _)| {
        !code[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':')
    })
}

#[test]
fn a_path_is_named_only_as_itself() {
    assert!(names("use nix::unistd;", "nix::"));
    assert!(names("x(nix::unistd::geteuid())", "nix::"));
    assert!(!names("use std::os::unix::fs::MetadataExt;", "nix::"));
    assert!(!names("use std::os::unix::fs::MetadataExt;", "libc::"));
}
