//! The audit log: one JSON record per line for every change and refusal,
//! appended and fsynced before the change is acknowledged. Each record
//! carries the SHA-256 of the previous one, so an edited, removed or
//! reordered record breaks the chain; the hash of the latest record is also
//! kept outside the log (`audit.head`, and in every status reply), so a
//! truncated tail is detected too.

use std::{
    fs::{self, File, OpenOptions},
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::model::{hex, unix_now};

pub const LOG: &str = "audit.log";
pub const HEAD: &str = "audit.head";
/// The `prev` of the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One audited event.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    /// Seconds since the Unix epoch.
    pub time: u64,
    pub uid: Option<u32>,
    pub pid: Option<i32>,
    /// What was asked: `add rule`, `replace rules`, `reload`, ...
    pub action: String,
    /// `applied`, `refused: <why>`, `rolled back`, ...
    pub outcome: String,
    pub generation: u64,
    /// SHA-256 of the rule set live after the event.
    pub rules_hash: String,
    pub prev: String,
    pub hash: String,
}

impl Record {
    /// The hash over every field but `hash`, in a fixed order.
    fn digest(&self) -> String {
        let body = serde_json::json!([
            self.seq,
            self.time,
            self.uid,
            self.pid,
            self.action,
            self.outcome,
            self.generation,
            self.rules_hash,
            self.prev
        ]);
        hex(&Sha256::digest(body.to_string().as_bytes()))
    }
}

/// The longest `action` and `outcome` kept in a record: whatever a caller
/// sends, a record stays small.
pub const MAX_ACTION: usize = 512;
pub const MAX_OUTCOME: usize = 4096;

/// `s` cut to at most `max` bytes at a character boundary, saying how long
/// it was.
pub(crate) fn bounded(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!(
        "{}... ({} bytes)",
        s.get(..end).unwrap_or_default(),
        s.len()
    )
}

pub struct Log {
    dir: PathBuf,
    next_seq: u64,
    head: String,
    /// What [`verify`] found wrong with the log when it was opened.
    problems: Vec<String>,
}

/// What the caller asked, for a record.
pub struct Event<'a> {
    pub uid: Option<u32>,
    pub pid: Option<i32>,
    pub action: &'a str,
    pub outcome: String,
    pub generation: u64,
    pub rules_hash: &'a str,
}

impl Log {
    /// Opens the log in `dir`, continuing its chain. The log is checked
    /// against `audit.head` first: a truncated, edited or missing log is not
    /// accepted silently; what is wrong is in [`Log::problems`] for the
    /// caller to report (and to record, so the break shows in the chain).
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        fs::create_dir_all(dir)?;
        let (mut next_seq, mut head) = (0, GENESIS.to_string());
        let recorded_head = fs::read_to_string(dir.join(HEAD)).ok();
        let mut problems = Vec::new();
        match File::open(dir.join(LOG)) {
            Ok(f) => {
                for line in BufReader::new(f).lines() {
                    let line = line?;
                    if let Ok(r) = serde_json::from_str::<Record>(&line) {
                        next_seq = r.seq + 1;
                        head = r.hash;
                    }
                }
                problems = verify(&dir.join(LOG), recorded_head.as_deref())?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if let Some(h) = &recorded_head {
                    problems.push(format!(
                        "{LOG} is missing but {HEAD} records {}: the log was removed",
                        short(h.trim())
                    ));
                }
            }
            Err(e) => {
                return Err(e).with_context(|| format!("cannot read {}", dir.join(LOG).display()));
            }
        }
        Ok(Log {
            dir: dir.to_owned(),
            next_seq,
            head,
            problems,
        })
    }

    /// What was wrong with the log when it was opened (empty: intact).
    pub fn problems(&self) -> &[String] {
        &self.problems
    }

    /// The hash of the latest record.
    pub fn head(&self) -> &str {
        &self.head
    }

    /// Appends and fsyncs a record, then updates `audit.head` atomically.
    pub fn append(&mut self, e: Event<'_>) -> anyhow::Result<Record> {
        let mut r = Record {
            seq: self.next_seq,
            time: unix_now(),
            uid: e.uid,
            pid: e.pid,
            action: bounded(e.action, MAX_ACTION),
            outcome: bounded(&e.outcome, MAX_OUTCOME),
            generation: e.generation,
            rules_hash: e.rules_hash.to_string(),
            prev: self.head.clone(),
            hash: String::new(),
        };
        r.hash = r.digest();
        let path = self.dir.join(LOG);
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        writeln!(f, "{}", serde_json::to_string(&r)?)?;
        f.sync_all()?;
        crate::state::replace_file(&self.dir, HEAD, format!("{}\n", r.hash).as_bytes(), None)?;
        self.next_seq += 1;
        self.head = r.hash.clone();
        Ok(r)
    }
}

/// Checks a log against its head: every problem found, by line.
pub fn verify(log: &Path, head: Option<&str>) -> anyhow::Result<Vec<String>> {
    let text = fs::read_to_string(log).with_context(|| format!("cannot read {}", log.display()))?;
    let mut problems = Vec::new();
    let mut prev = GENESIS.to_string();
    let mut expected_seq = 0u64;
    let mut last_hash = GENESIS.to_string();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let r: Record = match serde_json::from_str(line) {
            Ok(r) => r,
            Err(e) => {
                problems.push(format!("line {n}: not a record ({e})"));
                continue;
            }
        };
        if r.digest() != r.hash {
            problems.push(format!(
                "line {n} (seq {}): edited: its content does not match its hash",
                r.seq
            ));
        }
        if r.seq != expected_seq {
            let what = if r.seq > expected_seq {
                "removed"
            } else {
                "reordered or repeated"
            };
            problems.push(format!(
                "line {n}: seq {} where {expected_seq} was due: records {what}",
                r.seq
            ));
        }
        if r.prev != prev {
            problems.push(format!(
                "line {n} (seq {}): chain broken: prev does not match the record before it",
                r.seq
            ));
        }
        prev = r.hash.clone();
        last_hash = r.hash;
        expected_seq = r.seq + 1;
    }
    if let Some(head) = head
        && head.trim() != last_hash
    {
        problems.push(format!(
            "truncated or rolled back: the last record's hash {} is not the recorded head {}",
            short(&last_hash),
            short(head.trim())
        ));
    }
    Ok(problems)
}

fn short(h: &str) -> &str {
    &h[..h.len().min(12)]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(i: u64) -> Event<'static> {
        Event {
            uid: Some(0),
            pid: Some(1),
            action: "add rule",
            outcome: "applied".into(),
            generation: i,
            rules_hash: "ab",
        }
    }

    fn setup(n: u64) -> (tempfile::TempDir, PathBuf, String) {
        let dir = tempfile::tempdir().unwrap();
        let mut log = Log::open(dir.path()).unwrap();
        for i in 0..n {
            log.append(event(i)).unwrap();
        }
        let head = fs::read_to_string(dir.path().join(HEAD)).unwrap();
        let path = dir.path().join(LOG);
        (dir, path, head)
    }

    fn lines(path: &Path) -> Vec<String> {
        fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(String::from)
            .collect()
    }

    #[test]
    fn an_intact_log_verifies_and_reopening_continues_the_chain() {
        let (dir, path, head) = setup(3);
        assert!(verify(&path, Some(&head)).unwrap().is_empty());
        let mut log = Log::open(dir.path()).unwrap();
        assert_eq!(log.head(), head.trim());
        log.append(event(3)).unwrap();
        let head = fs::read_to_string(dir.path().join(HEAD)).unwrap();
        assert!(verify(&path, Some(&head)).unwrap().is_empty());
    }

    #[test]
    fn edits_removals_reorderings_and_truncations_are_reported() {
        let (_dir, path, head) = setup(5);
        let original = lines(&path);
        let check = |mutated: Vec<String>, want: &str| {
            fs::write(&path, mutated.join("\n") + "\n").unwrap();
            let problems = verify(&path, Some(&head)).unwrap();
            assert!(
                problems.iter().any(|p| p.contains(want)),
                "{want}: {problems:?}"
            );
        };
        let mut edited = original.clone();
        edited[2] = edited[2].replace("add rule", "remove rule");
        check(edited, "edited");
        let mut removed = original.clone();
        removed.remove(2);
        check(removed, "removed");
        let mut reordered = original.clone();
        reordered.swap(1, 3);
        check(reordered, "reordered");
        check(original[..4].to_vec(), "truncated");
    }

    #[test]
    fn opening_a_truncated_or_removed_log_reports_it() {
        let (dir, path, _head) = setup(4);
        assert!(Log::open(dir.path()).unwrap().problems().is_empty());
        let original = lines(&path);
        fs::write(&path, original[..2].join("\n") + "\n").unwrap();
        let log = Log::open(dir.path()).unwrap();
        assert!(
            log.problems().iter().any(|p| p.contains("truncated")),
            "{:?}",
            log.problems()
        );
        fs::remove_file(&path).unwrap();
        let log = Log::open(dir.path()).unwrap();
        assert!(
            log.problems().iter().any(|p| p.contains("removed")),
            "{:?}",
            log.problems()
        );
    }
}
