//! The live rule set on disk, so a restart restores what was live.
//!
//! Model of truth: the configuration file is the baseline. Whatever is live
//! (the baseline, or a later change) is written here, atomically, each time
//! it changes; on start the daemon restores it. The baseline itself (the
//! configuration's rule set at the last apply) is kept beside it in
//! `baseline.json`, so runtime changes are known across restarts (see
//! [`crate::reload`]). Re-reading a changed configuration is an explicit
//! reload (`portcullis reload`, SIGHUP), which replaces the live set unless
//! that would drop runtime changes.
//!
//! Each write goes to a temporary file, is fsynced, and renamed over
//! `live.json` after the previous version was kept as `live.prev.json`; the
//! directory is fsynced too. Every file carries the SHA-256 of its rule set,
//! so a torn or edited file is detected, and the previous one used instead.

use std::{
    fs::{self, File},
    io::{ErrorKind, Write as _},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

use crate::{compile, rules::RuleSet};

pub const DEFAULT_STATE_DIR: &str = "/var/lib/portcullis";
const LIVE: &str = "live.json";
const PREVIOUS: &str = "live.prev.json";
const PENDING: &str = "pending.json";
const MODE: &str = "mode.json";
const BASELINE: &str = "baseline.json";
const FORMAT: u32 = 1;

/// A saved rule set: read as `Envelope<RuleSet>`, written from a borrow
/// (`Envelope<&RuleSet>`: a 100k-rule set is not copied to be saved).
#[derive(Serialize, Deserialize)]
struct Envelope<R = RuleSet> {
    format: u32,
    generation: u64,
    sha256: String,
    rules: R,
}

/// The compact envelope of a set whose canonical JSON is `rules`: what
/// `serde_json::to_vec(&Envelope { .., rules })` writes (`rules` is the
/// envelope's last field), without serialising the set again.
fn envelope_around(generation: u64, sha256: &str, rules: &[u8]) -> anyhow::Result<Vec<u8>> {
    let head = Envelope {
        format: FORMAT,
        generation,
        sha256: sha256.to_string(),
        rules: 0u8,
    };
    let mut out = serde_json::to_vec(&head)?;
    // `{...,"rules":0}`: the placeholder and the closing brace give way
    // to the set's JSON.
    anyhow::ensure!(out.ends_with(b"0}"), "unexpected envelope shape");
    out.truncate(out.len() - 2);
    out.reserve(rules.len() + 1);
    out.extend_from_slice(rules);
    out.push(b'}');
    Ok(out)
}

#[derive(Serialize, Deserialize)]
struct SavedMode {
    #[serde(flatten)]
    mode: crate::model::Mode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    boot_id: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct SavedPending {
    format: u32,
    sha256: String,
    pending: crate::model::Pending,
}

/// This boot's id (the kernel makes a new one at every boot).
fn boot_id() -> Option<String> {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_string())
}

/// A rule set restored from disk.
#[derive(Debug, PartialEq, Eq)]
pub struct Restored {
    pub rules: RuleSet,
    pub generation: u64,
    /// Restored from the previous file because the latest one was damaged.
    pub from_previous: bool,
}

pub struct Store {
    dir: PathBuf,
    /// Per deny set: the checksum of its snapshot on disk and the bytes of
    /// its journal (see [`Store::save_deny_change`]).
    deny_journals: std::sync::Mutex<std::collections::BTreeMap<String, (String, u64)>>,
}

impl Store {
    pub fn new(dir: &Path) -> Self {
        Store {
            dir: dir.to_owned(),
            deny_journals: Default::default(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes `rules` as the live set, atomically and durably.
    pub fn save(&self, rules: &RuleSet, generation: u64) -> anyhow::Result<()> {
        let (json, sha256) = compile::canonical(rules);
        self.save_canonical(generation, &sha256, &json)
    }

    /// [`Store::save`] of a set already serialised: `json` is its canonical
    /// JSON and `sha256` that JSON's hash (`compile::canonical`; a compiled
    /// image carries both), so a 100k-rule set is not serialised again to
    /// be saved. The file is the envelope as serde writes it (compact: it is
    /// read by the daemon, and shown by `portcullis rules`), byte for byte.
    /// A wrong `sha256` fails closed: the file is refused at the next start.
    pub fn save_canonical(&self, generation: u64, sha256: &str, json: &[u8]) -> anyhow::Result<()> {
        fs::create_dir_all(&self.dir)
            .with_context(|| format!("cannot create state directory {}", self.dir.display()))?;
        replace_file(
            &self.dir,
            LIVE,
            &envelope_around(generation, sha256, json)?,
            Some(PREVIOUS),
        )
    }

    /// Writes the baseline (the configuration's rule set at the last
    /// apply), atomically and durably, checksummed like the live set.
    pub fn save_baseline(&self, rules: &RuleSet) -> anyhow::Result<()> {
        fs::create_dir_all(&self.dir)
            .with_context(|| format!("cannot create state directory {}", self.dir.display()))?;
        let envelope = Envelope {
            format: FORMAT,
            generation: 0,
            sha256: compile::hash(rules),
            rules,
        };
        replace_file(
            &self.dir,
            BASELINE,
            &serde_json::to_vec_pretty(&envelope)?,
            None,
        )
    }

    /// The baseline last saved (`None`: none yet); a damaged file is an
    /// error naming it.
    pub fn load_baseline(&self) -> anyhow::Result<Option<RuleSet>> {
        Ok(read(&self.dir.join(BASELINE))?.map(|(rules, _)| rules))
    }

    /// Saves the data path's mode (enforce, audit, open, lockdown) with the
    /// boot it was set in.
    pub fn save_mode(&self, mode: &crate::model::Mode) -> anyhow::Result<()> {
        let saved = SavedMode {
            mode: mode.clone(),
            boot_id: boot_id(),
        };
        replace_file(&self.dir, MODE, &serde_json::to_vec(&saved)?, None)
    }

    pub fn load_mode(&self) -> anyhow::Result<crate::model::Mode> {
        Ok(self
            .load_saved_mode()?
            .map_or_else(Default::default, |m| m.mode))
    }

    /// Whether the saved mode was set before this boot (or by a version that
    /// did not record the boot: treated as earlier, which only ever ends a
    /// lockout).
    pub fn mode_is_from_an_earlier_boot(&self) -> bool {
        match self.load_saved_mode() {
            Ok(Some(saved)) => saved.boot_id.is_none() || saved.boot_id != boot_id(),
            _ => false,
        }
    }

    fn load_saved_mode(&self) -> anyhow::Result<Option<SavedMode>> {
        let path = self.dir.join(MODE);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        // Files written before the boot was recorded hold the bare mode.
        serde_json::from_slice::<SavedMode>(&bytes)
            .or_else(|_| {
                serde_json::from_slice(&bytes).map(|mode| SavedMode {
                    mode,
                    boot_id: None,
                })
            })
            .map(Some)
            .with_context(|| format!("{} is damaged", path.display()))
    }

    /// Saves (or with `None`, removes) the change awaiting confirmation,
    /// with the checksum of the rules a rollback would restore.
    pub fn save_pending(&self, pending: Option<&crate::model::Pending>) -> anyhow::Result<()> {
        let path = self.dir.join(PENDING);
        match pending {
            None => match fs::remove_file(&path) {
                Ok(()) => Ok(File::open(&self.dir)?.sync_all()?),
                Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
                Err(e) => Err(e).with_context(|| format!("cannot remove {}", path.display())),
            },
            Some(p) => {
                let saved = SavedPending {
                    format: FORMAT,
                    sha256: compile::hash(&p.previous),
                    pending: p.clone(),
                };
                replace_file(
                    &self.dir,
                    PENDING,
                    &serde_json::to_vec_pretty(&saved)?,
                    None,
                )
            }
        }
    }

    /// The change awaiting confirmation, checked like the live set: a file
    /// that is torn, edited or holds an invalid rule set is an error naming
    /// the file, never a panic later at the rollback.
    pub fn load_pending(&self) -> anyhow::Result<Option<crate::model::Pending>> {
        let path = self.dir.join(PENDING);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let saved: SavedPending = serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "{} is not a saved pending change (torn or edited?)",
                path.display()
            )
        })?;
        if saved.format != FORMAT {
            bail!("{}: unknown format {}", path.display(), saved.format);
        }
        if compile::hash(&saved.pending.previous) != saved.sha256 {
            bail!(
                "{}: checksum mismatch (the file was changed after it was written)",
                path.display()
            );
        }
        saved
            .pending
            .previous
            .validate()
            .with_context(|| format!("{}: invalid rule set to roll back to", path.display()))?;
        Ok(Some(saved.pending))
    }

    /// The live set last saved: `Ok(None)` when there is none yet; the
    /// previous version (flagged) when the latest is damaged; an error when
    /// both are.
    pub fn load(&self) -> anyhow::Result<Option<Restored>> {
        let latest = read(&self.dir.join(LIVE));
        match latest {
            Ok(Some((rules, generation))) => Ok(Some(Restored {
                rules,
                generation,
                from_previous: false,
            })),
            Ok(None) => match read(&self.dir.join(PREVIOUS))? {
                // Interrupted between the two renames: the previous one is whole.
                Some((rules, generation)) => Ok(Some(Restored {
                    rules,
                    generation,
                    from_previous: true,
                })),
                None => Ok(None),
            },
            Err(damaged) => match read(&self.dir.join(PREVIOUS)) {
                Ok(Some((rules, generation))) => {
                    tracing::error!(error = %format!("{damaged:#}"), "the live rule set on disk is damaged; restoring the previous one");
                    Ok(Some(Restored {
                        rules,
                        generation,
                        from_previous: true,
                    }))
                }
                _ => Err(damaged.context("and there is no usable previous version")),
            },
        }
    }
}

/// Deny sets on disk: per set, a snapshot `deny/<name>.json` (written
/// like the live set: atomic, durable, with the SHA-256 of the set) and a
/// journal `deny/<name>.journal` of the changes since, one line each:
/// `<snapshot sha256> <line sha256> <change as JSON>`, appended and fsynced.
/// A small change costs one appended line, not a rewrite of a million
/// entries; a large one, or a journal grown past half the snapshot (and
/// 4 MiB), writes a new snapshot. Lines naming another snapshot (left by a
/// crash between a snapshot and the journal's removal) are ignored; a torn
/// last line (a crash mid-append: that change was never acknowledged) is
/// ignored; any other damaged line is an error naming the file and line.
const DENY_DIR: &str = "deny";
/// A change larger than this goes into a new snapshot instead.
const DENY_LINE_MAX: usize = 1 << 20;
/// A journal is folded into a new snapshot past this size (and half the
/// snapshot's).
const DENY_JOURNAL_MIN: u64 = 4 << 20;

#[derive(Serialize, Deserialize)]
struct SavedDenySet {
    format: u32,
    sha256: String,
    set: crate::denylist::Set,
}

/// One journal line's change to a set.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum DenyChange {
    Add(Vec<crate::denylist::Entry>),
    Remove(Vec<ipnet::IpNet>),
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    crate::model::hex(&sha2::Sha256::digest(bytes))
}

fn deny_hash(set: &crate::denylist::Set) -> anyhow::Result<String> {
    let json = serde_json::to_vec(set).context("serialising a deny set")?;
    Ok(sha256_hex(&json))
}

impl Store {
    fn journals(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<String, (String, u64)>> {
        // A panic while holding it cannot leave the map inconsistent (one
        // insert or remove): take it back.
        self.deny_journals
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Saves deny set `name` whole (a new snapshot; the journal is emptied).
    pub fn save_deny_set(&self, name: &str, set: &crate::denylist::Set) -> anyhow::Result<()> {
        crate::denylist::check_name(name).map_err(anyhow::Error::msg)?;
        let dir = self.dir.join(DENY_DIR);
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let sha256 = deny_hash(set)?;
        let saved = SavedDenySet {
            format: FORMAT,
            sha256: sha256.clone(),
            set: set.clone(),
        };
        let bytes = serde_json::to_vec(&saved).context("serialising a deny set")?;
        replace_file(&dir, &format!("{name}.json"), &bytes, None)?;
        // The old journal names the old snapshot: ignored if this fails.
        let journal = dir.join(format!("{name}.journal"));
        match fs::remove_file(&journal) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(error = %e, file = %journal.display(), "cannot remove"),
        }
        self.journals().insert(name.to_string(), (sha256, 0));
        Ok(())
    }

    /// Records `change` to deny set `name`, now `set` (`None`: the set is
    /// gone): one journal line when small, else a new snapshot.
    pub fn save_deny_change(
        &self,
        name: &str,
        set: Option<&crate::denylist::Set>,
        change: &DenyChange,
    ) -> anyhow::Result<()> {
        let Some(set) = set else {
            return self.remove_deny_set(name);
        };
        let known = self.journals().get(name).cloned();
        let line = serde_json::to_vec(change).context("serialising a deny change")?;
        let Some((snapshot, bytes)) = known else {
            return self.save_deny_set(name, set);
        };
        let entries = set.entries.len() as u64;
        if line.len() > DENY_LINE_MAX || bytes > DENY_JOURNAL_MIN.max(entries * 20) {
            return self.save_deny_set(name, set);
        }
        let mut text = format!("{snapshot} {} ", sha256_hex(&line)).into_bytes();
        text.extend_from_slice(&line);
        text.push(b'\n');
        let path = self.dir.join(DENY_DIR).join(format!("{name}.journal"));
        let append = || -> std::io::Result<()> {
            let mut f = fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)?;
            f.write_all(&text)?;
            f.sync_data()
        };
        if let Err(e) = append() {
            // Torn bytes may be left: the next change writes a snapshot.
            self.journals().remove(name);
            return Err(e).with_context(|| format!("cannot append to {}", path.display()));
        }
        self.journals()
            .insert(name.to_string(), (snapshot, bytes + text.len() as u64));
        Ok(())
    }

    /// Removes deny set `name`'s files (gone already: fine).
    pub fn remove_deny_set(&self, name: &str) -> anyhow::Result<()> {
        crate::denylist::check_name(name).map_err(anyhow::Error::msg)?;
        self.journals().remove(name);
        for suffix in ["json", "journal"] {
            let path = self.dir.join(DENY_DIR).join(format!("{name}.{suffix}"));
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot remove {}", path.display()));
                }
            }
        }
        Ok(())
    }

    /// Every saved deny set, its journal replayed; a damaged snapshot or
    /// journal line is an error naming the file (and line).
    pub fn load_deny_sets(
        &self,
    ) -> anyhow::Result<std::collections::BTreeMap<String, crate::denylist::Set>> {
        let dir = self.dir.join(DENY_DIR);
        let mut out = std::collections::BTreeMap::new();
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", dir.display())),
        };
        for entry in entries {
            let path = entry?.path();
            let Some(name) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".json"))
                .filter(|n| crate::denylist::check_name(n).is_ok())
            else {
                continue;
            };
            let bytes =
                fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
            let saved: SavedDenySet = serde_json::from_slice(&bytes)
                .with_context(|| format!("{}: not a deny set", path.display()))?;
            if deny_hash(&saved.set)? != saved.sha256 {
                bail!(
                    "{}: checksum mismatch (the file was changed after it was written)",
                    path.display()
                );
            }
            let mut set = saved.set;
            let journal = dir.join(format!("{name}.journal"));
            // After a torn line, the next change writes a snapshot (an
            // append would follow the torn bytes).
            if let Some(bytes) = replay(&journal, &saved.sha256, &mut set)? {
                self.journals()
                    .insert(name.to_string(), (saved.sha256, bytes));
            }
            out.insert(name.to_string(), set);
        }
        Ok(out)
    }
}

/// Applies the lines of `journal` that extend snapshot `snapshot` to
/// `set`; the journal's size (`None`: it ends in a torn line).
fn replay(
    journal: &Path,
    snapshot: &str,
    set: &mut crate::denylist::Set,
) -> anyhow::Result<Option<u64>> {
    let text = match fs::read(journal) {
        Ok(t) => t,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Some(0)),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", journal.display())),
    };
    let lines: Vec<&[u8]> = text
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .collect();
    let complete = text.ends_with(b"\n");
    for (i, line) in lines.iter().enumerate() {
        let last = i + 1 == lines.len();
        let mut parts = line.splitn(3, |b| *b == b' ');
        let (Some(snap), Some(sha), Some(json)) = (parts.next(), parts.next(), parts.next()) else {
            if last && !complete {
                tracing::warn!(file = %journal.display(), "ignoring a torn last line");
                return Ok(None);
            }
            bail!("{} line {}: damaged", journal.display(), i + 1);
        };
        if snap != snapshot.as_bytes() {
            continue;
        }
        if sha != sha256_hex(json).as_bytes() {
            if last && !complete {
                tracing::warn!(file = %journal.display(), "ignoring a torn last line");
                return Ok(None);
            }
            bail!("{} line {}: checksum mismatch", journal.display(), i + 1);
        }
        let change: DenyChange = serde_json::from_slice(json)
            .with_context(|| format!("{} line {}: not a change", journal.display(), i + 1))?;
        match change {
            DenyChange::Add(entries) => {
                for e in entries {
                    set.entries.insert(e.prefix, e.expires);
                }
            }
            DenyChange::Remove(prefixes) => {
                for p in prefixes {
                    set.entries.remove(&p);
                }
            }
        }
    }
    Ok(Some(text.len() as u64))
}

/// Replaces `dir/name` with `bytes`, durably and atomically: a temporary file
/// in `dir`, fsynced, renamed over `name` (after the old file was renamed to
/// `keep_previous_as`, when given), then `dir` fsynced. A crash leaves the
/// old or the new file whole, never a mix.
pub(crate) fn replace_file(
    dir: &Path,
    name: &str,
    bytes: &[u8],
    keep_previous_as: Option<&str>,
) -> anyhow::Result<()> {
    let path = dir.join(name);
    let write = || -> std::io::Result<()> {
        let tmp = dir.join(format!(".{name}.tmp"));
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        if let Some(previous) = keep_previous_as {
            match fs::rename(&path, dir.join(previous)) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        fs::rename(&tmp, &path)?;
        File::open(dir)?.sync_all()
    };
    write().with_context(|| format!("cannot write {}", path.display()))
}

/// Writes `bytes` to `path` atomically and durably without following a
/// link anywhere on the way: a new temporary file beside it (created
/// exclusively, never through a link), fsynced, renamed over `path` (a link
/// there is replaced, not followed), then the directory fsynced. The
/// directory is created (0755) if missing.
pub fn write_new_file(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        bail!("{} is not a file path", path.display());
    };
    let write = || -> std::io::Result<()> {
        match fs::DirBuilder::new().mode(0o755).create(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        let dir_file = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
            .open(dir)?;
        let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
        match fs::remove_file(&tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        dir_file.sync_all()
    };
    write().with_context(|| format!("cannot write {}", path.display()))
}

fn read(path: &Path) -> anyhow::Result<Option<(RuleSet, u64)>> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let envelope: Envelope = serde_json::from_slice(&bytes).with_context(|| {
        format!(
            "{} is not a saved rule set (torn or edited?)",
            path.display()
        )
    })?;
    if envelope.format != FORMAT {
        bail!("{}: unknown format {}", path.display(), envelope.format);
    }
    if compile::hash(&envelope.rules) != envelope.sha256 {
        bail!(
            "{}: checksum mismatch (the file was changed after it was written)",
            path.display()
        );
    }
    envelope
        .rules
        .validate()
        .with_context(|| format!("{}: invalid rule set", path.display()))?;
    Ok(Some((envelope.rules, envelope.generation)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(port: u32) -> RuleSet {
        toml::from_str(&format!(
            "[[ingress_rules]]\nid = \"r\"\nfrom_port = {port}\nto_port = {port}\n"
        ))
        .unwrap()
    }

    #[test]
    fn a_set_saved_from_its_canonical_json_is_the_envelope_serde_writes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let mut rules = set(22);
        rules.ingress_rules[0].ip_ranges = vec!["10.200.0.0/16".into(), "fd00:200::/32".into()];
        rules.ingress_rules[0].description = Some("a \"quoted\" name".into());
        let (json, sha256) = compile::canonical(&rules);
        store.save_canonical(7, &sha256, &json).unwrap();
        let written = fs::read(dir.path().join(LIVE)).unwrap();
        let expected = serde_json::to_vec(&Envelope {
            format: FORMAT,
            generation: 7,
            sha256: sha256.clone(),
            rules: &rules,
        })
        .unwrap();
        assert_eq!(
            String::from_utf8(written).unwrap(),
            String::from_utf8(expected).unwrap()
        );
        let restored = store.load().unwrap().unwrap();
        assert_eq!((restored.rules, restored.generation), (rules, 7));
        assert!(!restored.from_previous);
    }

    #[test]
    fn the_baseline_is_kept_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        assert_eq!(store.load_baseline().unwrap(), None);
        store.save_baseline(&set(3)).unwrap();
        assert_eq!(store.load_baseline().unwrap(), Some(set(3)));
        let path = dir.path().join(BASELINE);
        let text = fs::read_to_string(&path).unwrap();
        fs::write(&path, text.replace("\"from_port\": 3", "\"from_port\": 4")).unwrap();
        let e = format!("{:#}", store.load_baseline().unwrap_err());
        assert!(e.contains("baseline.json") && e.contains("checksum"), "{e}");
    }

    #[test]
    fn new_files_replace_links_instead_of_following_them() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("elsewhere");
        fs::write(&target, "keep").unwrap();
        let path = dir.path().join("saved").join("rules.toml");
        write_new_file(&path, b"one", 0o644).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "one");
        fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&target, &path).unwrap();
        write_new_file(&path, b"two", 0o644).unwrap();
        assert_eq!(fs::read_to_string(&target).unwrap(), "keep");
        assert!(!fs::symlink_metadata(&path).unwrap().is_symlink());
        // A link as the directory is refused.
        let linked = dir.path().join("linked");
        std::os::unix::fs::symlink(dir.path().join("saved"), &linked).unwrap();
        assert!(write_new_file(&linked.join("rules.toml"), b"x", 0o644).is_err());
    }

    #[test]
    fn saves_and_restores() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(&dir.path().join("state"));
        assert_eq!(store.load().unwrap(), None);
        store.save(&set(1), 1).unwrap();
        store.save(&set(2), 2).unwrap();
        assert_eq!(
            store.load().unwrap(),
            Some(Restored {
                rules: set(2),
                generation: 2,
                from_previous: false
            })
        );
    }

    #[test]
    fn a_damaged_file_falls_back_to_the_previous_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        store.save(&set(1), 1).unwrap();
        store.save(&set(2), 2).unwrap();
        // Torn: cut in half.
        let live = dir.path().join(LIVE);
        let bytes = fs::read(&live).unwrap();
        fs::write(&live, &bytes[..bytes.len() / 2]).unwrap();
        let r = store.load().unwrap().unwrap();
        assert_eq!((r.rules, r.from_previous), (set(1), true));
        // Edited: valid JSON, wrong checksum.
        let text = String::from_utf8(bytes)
            .unwrap()
            .replace("\"from_port\":2", "\"from_port\":1");
        fs::write(&live, text).unwrap();
        assert!(store.load().unwrap().unwrap().from_previous);
        // Both damaged: an error, never an empty rule set.
        fs::write(dir.path().join(PREVIOUS), b"{").unwrap();
        assert!(store.load().is_err());
    }

    fn pending() -> crate::model::Pending {
        crate::model::Pending {
            previous: set(7),
            previous_allow_ping: false,
            generation: 3,
            deadline: 100,
        }
    }

    #[test]
    fn a_damaged_pending_change_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        store.save_pending(Some(&pending())).unwrap();
        assert_eq!(store.load_pending().unwrap(), Some(pending()));
        let path = dir.path().join(PENDING);
        let text = fs::read_to_string(&path).unwrap();
        // Edited: the rules to roll back to changed.
        fs::write(&path, text.replace("\"from_port\": 7", "\"from_port\": 8")).unwrap();
        let e = format!("{:#}", store.load_pending().unwrap_err());
        assert!(e.contains("pending.json") && e.contains("checksum"), "{e}");
        // Torn.
        fs::write(&path, &text[..text.len() / 2]).unwrap();
        let e = format!("{:#}", store.load_pending().unwrap_err());
        assert!(e.contains("pending.json") && e.contains("torn"), "{e}");
        // Invalid rules, with a matching checksum.
        let mut bad = pending();
        bad.previous.ingress_rules[0].from_port = 9;
        bad.previous.ingress_rules[0].to_port = 8;
        store.save_pending(Some(&bad)).unwrap();
        let e = format!("{:#}", store.load_pending().unwrap_err());
        assert!(e.contains("invalid rule set"), "{e}");
    }

    #[test]
    fn modes_remember_their_boot_and_old_files_still_load() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let lockdown = crate::model::Mode::Lockdown { admin: None };
        store.save_mode(&lockdown).unwrap();
        assert_eq!(store.load_mode().unwrap(), lockdown);
        assert!(!store.mode_is_from_an_earlier_boot());
        fs::write(
            dir.path().join(MODE),
            br#"{"mode":"lockdown","boot_id":"another"}"#,
        )
        .unwrap();
        assert!(store.mode_is_from_an_earlier_boot());
        fs::write(dir.path().join(MODE), br#"{"mode":"lockdown"}"#).unwrap();
        assert_eq!(store.load_mode().unwrap(), lockdown);
        assert!(store.mode_is_from_an_earlier_boot());
    }

    #[test]
    fn deny_sets_journal_small_changes_and_replay_them() {
        use crate::denylist::{Entry, Set};
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let net = |s: &str| s.parse::<ipnet::IpNet>().unwrap();
        let mut set = Set {
            id: 3,
            entries: Default::default(),
        };
        set.entries.insert(net("192.0.2.0/24"), None);
        store.save_deny_set("s", &set).unwrap();
        set.entries.insert(net("198.51.100.7/32"), Some(99));
        let add = DenyChange::Add(vec![Entry {
            prefix: net("198.51.100.7/32"),
            expires: Some(99),
        }]);
        store.save_deny_change("s", Some(&set), &add).unwrap();
        set.entries.remove(&net("192.0.2.0/24"));
        let remove = DenyChange::Remove(vec![net("192.0.2.0/24")]);
        store.save_deny_change("s", Some(&set), &remove).unwrap();
        let journal = dir.path().join("deny/s.journal");
        assert_eq!(
            std::fs::read_to_string(&journal).unwrap().lines().count(),
            2
        );
        assert_eq!(Store::new(dir.path()).load_deny_sets().unwrap()["s"], set);
        // A torn last line (a crash mid-append) is ignored...
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&journal)
            .unwrap();
        f.write_all(b"abc 123 {\"Add\"").unwrap();
        assert_eq!(Store::new(dir.path()).load_deny_sets().unwrap()["s"], set);
        // ...but a damaged line before the last is an error naming it.
        let text = std::fs::read_to_string(&journal)
            .unwrap()
            .replacen("198.51", "198.52", 1);
        std::fs::write(&journal, format!("{text}\n")).unwrap();
        let e = format!("{:#}", Store::new(dir.path()).load_deny_sets().unwrap_err());
        assert!(e.contains("s.journal line 1"), "{e}");
        // A new snapshot makes the old journal's lines irrelevant.
        store.save_deny_set("s", &set).unwrap();
        assert_eq!(Store::new(dir.path()).load_deny_sets().unwrap()["s"], set);
        store.save_deny_change("s", None, &remove).unwrap();
        assert!(Store::new(dir.path()).load_deny_sets().unwrap().is_empty());
    }
}
