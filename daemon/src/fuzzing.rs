//! Entry points shared by the cargo-fuzz targets (`fuzz/`) and the tests
//! that replay their corpus: each takes untrusted bytes the way the daemon
//! does and checks what must hold whatever the input. A panic is a bug.
//!
//! - [`rules_json`] and [`config_toml`]: the rule set as the API and the
//!   config file carry it. A set that validates must round-trip through
//!   serde, and compile (or be refused for size) into an image whose lookups
//!   agree with the one-by-one reference evaluator.
//! - [`ApiHarness`] (feature `testing`; needs root and bpffs): whole HTTP
//!   requests through the real router over a real core and data path. No
//!   request may get a 500, and a refused request must leave the live rules
//!   as they were.

// A fuzz harness, never run by the daemon: its assertions are how it reports
// a finding, and its indices come from its own generator over non-empty
// corpora.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::net::IpAddr;

use portcullis_common::{
    DIR_EGRESS, DIR_INGRESS, PCLASS_ICMP, PCLASS_OTHER, PCLASS_TCP, PCLASS_UDP,
};

use crate::{
    compile::{self, CompileError, Limits},
    config::Config,
    rules::RuleSet,
};

/// A rule set in the API's JSON shape.
pub fn rules_json(data: &[u8]) {
    if let Ok(set) = serde_json::from_slice::<RuleSet>(data) {
        check_rule_set(&set);
    }
}

/// A whole configuration file.
pub fn config_toml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = Config::parse(text) {
        let set = config.rule_set();
        assert!(
            set.validate().is_ok(),
            "Config::parse accepted an invalid rule set"
        );
        check_rule_set(&set);
    }
}

/// Limits small enough that fuzzed sets hit them, so the refusal path is
/// exercised as well as the success path.
const FUZZ_LIMITS: Limits = Limits {
    prefixes: 256,
    regions: 256,
    segments: 1024,
    slots: 256,
    v4_chunks: 4096,
};

fn check_rule_set(set: &RuleSet) {
    if let Err(e) = set.validate() {
        assert!(!e.to_string().is_empty());
        return;
    }
    let json = serde_json::to_vec(set).expect("a valid set serialises");
    let again: RuleSet = serde_json::from_slice(&json).expect("and parses back");
    assert_eq!(&again, set, "JSON round trip changed the rule set");
    let image = match compile::compile(set, &FUZZ_LIMITS) {
        Ok(image) => image,
        Err(CompileError::TooLarge { .. } | CompileError::TooManySegments { .. }) => return,
        // `validate` allows at most as many named interfaces as compile.
        Err(e @ CompileError::TooManyInterfaces { .. }) => panic!("a valid set was refused: {e}"),
    };
    let (entries, _) = compile::entries(set);
    for (dir, addr, pclass, port) in probes(set) {
        let want = compile::reference(&entries, dir, addr, pclass, port);
        assert_eq!(
            image.lookup(dir, addr, pclass, port),
            want,
            "compiled lookup and reference disagree for dir {dir} {addr} class {pclass} port {port}"
        );
        assert_eq!(
            image.answer(dir, addr, pclass, port),
            want,
            "the index and the reference disagree for dir {dir} {addr} class {pclass} port {port}"
        );
    }
}

/// Addresses and ports at the edges of every rule: network and last
/// address, first and last port and their neighbours.
fn probes(set: &RuleSet) -> Vec<(u8, IpAddr, usize, u16)> {
    let mut out = Vec::new();
    let rules = set
        .ingress_rules
        .iter()
        .map(|r| (DIR_INGRESS, r))
        .chain(set.egress_rules.iter().map(|r| (DIR_EGRESS, r)));
    for (dir, rule) in rules.take(16) {
        let from = rule.from_port as u16;
        let to = rule.to_port as u16;
        for net in rule.networks().iter().take(4) {
            for addr in [net.network(), net.broadcast()] {
                for pclass in [PCLASS_TCP, PCLASS_UDP, PCLASS_ICMP, PCLASS_OTHER] {
                    for port in [from.wrapping_sub(1), from, to, to.wrapping_add(1)] {
                        out.push((dir, addr, pclass, port));
                    }
                }
            }
        }
    }
    out
}

/// xorshift64: a deterministic, seeded source of choices for the fuzz
/// passes the test suite runs (the same seed, the same inputs, every run).
pub struct Xorshift(pub u64);

impl Xorshift {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number below `n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub fn pick<'a, T>(&mut self, of: &'a [T]) -> &'a T {
        &of[self.below(of.len())]
    }

    /// True `percent` times in a hundred.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next_u64() % 100 < percent
    }
}

/// Deterministic mutations: xorshift-seeded flips, truncations, splices.
pub fn mutations(inputs: &[Vec<u8>], n: usize) -> Vec<Vec<u8>> {
    let mut rng = Xorshift(0x9e37_79b9_7f4a_7c15);
    let mut next = move || rng.next_u64();
    (0..n)
        .map(|_| {
            let mut v = inputs[next() as usize % inputs.len()].clone();
            match next() % 4 {
                0 if !v.is_empty() => {
                    let i = next() as usize % v.len();
                    v[i] ^= 1 << (next() % 8);
                }
                1 if !v.is_empty() => v.truncate(next() as usize % v.len()),
                2 => {
                    let other = &inputs[next() as usize % inputs.len()];
                    let at = if v.is_empty() {
                        0
                    } else {
                        next() as usize % v.len()
                    };
                    let from = if other.is_empty() {
                        0
                    } else {
                        next() as usize % other.len()
                    };
                    v.splice(at..at, other[from..].iter().copied());
                }
                _ => {
                    // A digit changed: ports and prefix lengths move.
                    if let Some(i) = (0..v.len())
                        .map(|_| next() as usize % v.len().max(1))
                        .find(|&i| v.get(i).is_some_and(u8::is_ascii_digit))
                    {
                        v[i] = b'0' + (next() % 10) as u8;
                    }
                }
            }
            v
        })
        .collect()
}

#[cfg(feature = "testing")]
pub use harness::ApiHarness;

#[cfg(feature = "testing")]
mod harness {
    use std::{path::Path, sync::Arc, time::Duration};

    use axum::{body::Body, extract::ConnectInfo, http::Request};
    use tokio::sync::Mutex;
    use tower::ServiceExt as _;

    use crate::{
        api::{self, Api, Caller, Writers},
        compile::Limits,
        config::ReadinessConfig,
        core::Core,
        dataplane::Dataplane,
        readiness::{Checker, SystemdView},
        rules::RuleSet,
        state::Store,
    };

    /// The real API router over a real core (programs loaded, maps pinned
    /// under the given directory, nothing attached).
    pub struct ApiHarness {
        runtime: tokio::runtime::Runtime,
        core: Arc<Mutex<Core>>,
        api: Api,
    }

    impl ApiHarness {
        pub fn new(pin_dir: &Path, state_dir: &Path) -> anyhow::Result<ApiHarness> {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let limits = Limits::default();
            let dataplane = Dataplane::load(pin_dir, 4096, &limits)?;
            let core = Core::start(
                dataplane,
                Store::new(state_dir),
                limits,
                false,
                RuleSet::default(),
                1,
                Vec::new(),
            )?;
            let core = Arc::new(Mutex::new(core));
            let (_tx, rx) = tokio::sync::watch::channel(SystemdView::default());
            let api = Api {
                core: core.clone(),
                writers: Writers { gid: None },
                control: Default::default(),
                feed: Default::default(),
                request_timeout: Duration::from_secs(5),
                readiness: Arc::new(Checker::new(ReadinessConfig::default(), rx)),
            };
            Ok(ApiHarness { runtime, core, api })
        }

        /// One request from fuzzer bytes: the first line is `METHOD PATH`,
        /// the rest the body; sent as root. Returns the status code.
        pub fn request(&self, data: &[u8]) -> u16 {
            let (head, body) = match data.iter().position(|&b| b == b'\n') {
                Some(i) => (&data[..i], &data[i + 1..]),
                None => (data, &[][..]),
            };
            let head = String::from_utf8_lossy(head);
            let mut parts = head.splitn(2, ' ');
            let method = parts.next().unwrap_or("GET");
            let path = parts.next().unwrap_or("/");
            // The follow stream never ends; it has its own tests.
            if path.contains("follow") {
                return 0;
            }
            let Ok(mut req) = Request::builder()
                .method(method)
                .uri(path)
                .header("content-type", "application/json")
                .body(Body::from(body.to_vec()))
            else {
                return 0;
            };
            req.extensions_mut().insert(ConnectInfo(Caller::root()));
            self.runtime.block_on(async {
                let before = self.core.lock().await.rules();
                let router = api::router(self.api.clone());
                let status = match tokio::time::timeout(
                    Duration::from_secs(10),
                    router.oneshot(req),
                )
                .await
                {
                    Ok(Ok(resp)) => resp.status().as_u16(),
                    Ok(Err(never)) => match never {},
                    Err(_) => panic!("{method} {path}: no answer within 10 s"),
                };
                assert_ne!(status, 500, "{method} {path}: internal error");
                let core = self.core.lock().await;
                if !(200..300).contains(&status) {
                    assert_eq!(
                        core.rules(),
                        before,
                        "{method} {path}: refused ({status}) but the rules changed"
                    );
                }
                assert!(
                    core.rules().validate().is_ok(),
                    "the live set became invalid"
                );
                status
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Replays the committed corpus, then a seeded, bounded pass of
    /// mutations of it (byte flips, truncations, splices), so the suite
    /// stays deterministic. Longer runs: `cargo fuzz run` (see fuzz/README.md).
    fn replay(target: &str, f: fn(&[u8])) {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz/corpus")
            .join(target);
        let mut inputs: Vec<Vec<u8>> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| std::fs::read(e.unwrap().path()).unwrap())
            .collect();
        inputs.sort();
        assert!(!inputs.is_empty(), "no corpus in {}", dir.display());
        for input in &inputs {
            f(input);
        }
        for input in mutations(&inputs, 3000) {
            f(&input);
        }
    }

    #[test]
    fn rules_json_corpus() {
        replay("rules_json", rules_json);
    }

    #[test]
    fn config_toml_corpus() {
        replay("config_toml", config_toml);
    }

    #[test]
    fn a_valid_corpus_entry_reaches_the_compiler() {
        // Guards the replay against a corpus that only exercises errors.
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/rules_json");
        let valid = std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| {
                serde_json::from_slice::<RuleSet>(&std::fs::read(e.unwrap().path()).unwrap()).ok()
            })
            .filter(|s| s.validate().is_ok() && !s.ingress_rules.is_empty())
            .count();
        assert!(valid > 0);
    }
}
