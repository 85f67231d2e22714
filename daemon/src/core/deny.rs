//! Deny sets through the core: incremental changes to the data path's deny
//! tries (no rule compile, no generation switch), saved per set in the
//! state directory before they go live, and the admin networks kept exempt.
//!
//! A CrowdSec bouncer (or any reconciler) uses two calls: `deny_replace`
//! with the whole stream at start-up (`startup=true`), then `deny_add` /
//! `deny_remove` with each poll's new and deleted decisions. Replacing adds
//! the new entries before removing the old ones, so an address in both
//! stays banned throughout.

use std::{collections::BTreeSet, net::IpAddr};

use ipnet::IpNet;
use portcullis_common::{DENY_SETS_MAX, DenyEntry};
use serde::{Deserialize, Serialize};

use super::{ChangeError, Core};
use crate::{
    dataplane::{self, DenyWrite},
    denylist::{self, Entry, Sets},
    model::Mode,
    state::DenyChange,
};

/// The outcome of a deny-set change.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DenyChanged {
    pub set: String,
    /// Entries added (or re-timed) and removed.
    pub added: usize,
    pub removed: usize,
    /// Entries the set holds now.
    pub entries: usize,
    /// Open flows of newly banned sources that were cut.
    pub flows_cut: usize,
    /// Added prefixes that overlap an admin network: the ban does not apply
    /// to the admin network's addresses (they bypass every deny set).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub admin_exempt: Vec<String>,
}

/// One entry as listed.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DenyListed {
    pub prefix: String,
    /// Unix seconds; absent: until removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<u64>,
}

/// A set: its id, size, what it dropped, and (unless only counted) its entries.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DenySetView {
    pub set: String,
    pub id: u32,
    pub count: usize,
    pub dropped_packets: u64,
    pub dropped_bytes: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entries: Vec<DenyListed>,
}

use crate::model::unix_now;

/// The trie value of an effective ban: expiry moved from Unix seconds to
/// `CLOCK_BOOTTIME` ns (a past one becomes 1: already expired).
fn entry_of(e: denylist::Effective, unix: u64, boot_ns: u64) -> DenyEntry {
    let expires_ns = match e.expires {
        None => 0,
        Some(t) if t <= unix => 1,
        Some(t) => boot_ns.saturating_add((t - unix).saturating_mul(1_000_000_000)),
    };
    DenyEntry {
        expires_ns,
        set: e.set,
        _pad: 0,
    }
}

impl Core {
    /// The trie writes for `touched` prefixes, from the model as it is now.
    fn deny_writes(&self, touched: Vec<IpNet>) -> Vec<DenyWrite> {
        let (unix, boot) = (unix_now(), dataplane::boottime_ns());
        let unique: BTreeSet<IpNet> = touched.into_iter().collect();
        // Many at once: one ordered pass over every prefix.
        if unique.len() > 4096 {
            let all = self.deny.effective_all();
            return unique
                .into_iter()
                .map(|p| (p, all.get(&p).map(|e| entry_of(*e, unix, boot))))
                .collect();
        }
        unique
            .into_iter()
            .map(|p| (p, self.deny.effective(&p).map(|e| entry_of(e, unix, boot))))
            .collect()
    }

    /// Makes a change to the model live: saved first (a crash after this
    /// restores it), then written to the tries. On a failure the model is
    /// put back as it was (`undo`), saved and written again, and nothing
    /// has changed.
    fn deny_commit(
        &mut self,
        name: &str,
        change: &DenyChange,
        touched: Vec<IpNet>,
        undo: impl FnOnce(&mut Sets) -> Vec<IpNet>,
    ) -> Result<(), ChangeError> {
        let saved = self
            .store
            .save_deny_change(name, self.deny.get(name), change);
        let result = saved.and_then(|()| {
            let writes = self.deny_writes(touched.clone());
            self.dataplane.deny_write(&writes)
        });
        if let Err(e) = result {
            let mut back = undo(&mut self.deny);
            back.extend(touched);
            let writes = self.deny_writes(back);
            let _ = self.dataplane.deny_write(&writes);
            let _ = self.deny_save(name);
            return Err(ChangeError::Internal(e.context("nothing changed")));
        }
        self.publish_deny_names();
        Ok(())
    }

    /// The deny sets' names by id, kept current by every change: for the
    /// drop-event feed.
    pub fn deny_set_names(&self) -> crate::model::DenySetNames {
        self.deny_names.clone()
    }

    /// Publishes the current sets' names (gone ones stay until reused).
    fn publish_deny_names(&self) {
        let mut names = self
            .deny_names
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (name, set) in self.deny.sets() {
            names.insert(set.id, name.clone());
        }
    }

    fn deny_save(&self, name: &str) -> anyhow::Result<()> {
        match self.deny.get(name) {
            Some(set) => self.store.save_deny_set(name, set),
            None => self.store.remove_deny_set(name),
        }
    }

    /// Adds (or re-times) `entries` in set `name` (created if missing),
    /// then cuts the open flows of the sources they ban.
    pub fn deny_add(&mut self, name: &str, entries: &[Entry]) -> Result<DenyChanged, ChangeError> {
        let created = self.deny.get(name).is_none();
        let id = self
            .deny
            .ensure(name, DENY_SETS_MAX)
            .map_err(ChangeError::Config)?;
        let before: Vec<(IpNet, Option<denylist::Expiry>)> = entries
            .iter()
            .map(|e| {
                (
                    e.prefix,
                    self.deny
                        .get(name)
                        .and_then(|s| s.entries.get(&e.prefix).copied()),
                )
            })
            .collect();
        if created && let Err(e) = self.dataplane.deny_stats_clear(id) {
            tracing::warn!(error = %format!("{e:#}"), set = name, "cannot clear the set's drop counter");
        }
        let touched = self.deny.add(name, entries);
        let set = name.to_string();
        let change = DenyChange::Add(entries.to_vec());
        self.deny_commit(name, &change, touched, move |sets| {
            let mut back = Vec::new();
            let (new, old): (Vec<_>, Vec<_>) = before.into_iter().partition(|(_, b)| b.is_none());
            let new: Vec<IpNet> = new.into_iter().map(|(p, _)| p).collect();
            back.extend(sets.remove(&set, &new));
            let old: Vec<Entry> = old
                .into_iter()
                .filter_map(|(prefix, b)| b.map(|expires| Entry { prefix, expires }))
                .collect();
            back.extend(sets.add(&set, &old));
            sets.drop_if_empty(&set);
            back
        })?;
        let banned: Vec<IpNet> = entries.iter().map(|e| e.prefix).collect();
        let admin = self.admin_networks();
        let flows_cut = self.cut_banned(entries, &admin)?;
        let admin_exempt = banned
            .iter()
            .filter(|p| admin.iter().any(|a| a.contains(*p) || p.contains(a)))
            .map(ToString::to_string)
            .collect();
        Ok(DenyChanged {
            set: name.to_string(),
            added: entries.len(),
            removed: 0,
            entries: self.deny.get(name).map_or(0, |s| s.entries.len()),
            flows_cut,
            admin_exempt,
        })
    }

    /// Removes `prefixes` from set `name` (absent ones ignored); an emptied
    /// set is gone.
    pub fn deny_remove(
        &mut self,
        name: &str,
        prefixes: &[IpNet],
    ) -> Result<DenyChanged, ChangeError> {
        if name == denylist::RATELIMIT_SET {
            return self.ratelimit_lift(Some(prefixes));
        }
        denylist::check_name(name).map_err(ChangeError::Config)?;
        let Some(set) = self.deny.get(name) else {
            return Err(ChangeError::Config(format!("no deny set {name:?}")));
        };
        let removed = set.held(prefixes);
        let id = set.id;
        let gone: Vec<IpNet> = removed.iter().map(|e| e.prefix).collect();
        let touched = self.deny.remove(name, &gone);
        self.deny.drop_if_empty(name);
        let set = name.to_string();
        let change = DenyChange::Remove(gone.clone());
        self.deny_commit(name, &change, touched, move |sets| {
            let _ = sets.ensure_id(&set, id);
            sets.add(&set, &removed)
        })?;
        Ok(DenyChanged {
            set: name.to_string(),
            added: 0,
            removed: gone.len(),
            entries: self.deny.get(name).map_or(0, |s| s.entries.len()),
            ..DenyChanged::default()
        })
    }

    /// Makes set `name` hold exactly `entries` (a bouncer's start-up
    /// reconcile): the new entries are added first, then the others removed;
    /// when old and new do not fit together, the others are removed first.
    pub fn deny_replace(
        &mut self,
        name: &str,
        entries: &[Entry],
    ) -> Result<DenyChanged, ChangeError> {
        let keep: BTreeSet<IpNet> = entries.iter().map(|e| e.prefix).collect();
        let stale: Vec<IpNet> = self
            .deny
            .get(name)
            .map(|s| {
                s.entries
                    .keys()
                    .filter(|p| !keep.contains(p))
                    .copied()
                    .collect()
            })
            .unwrap_or_default();
        let mut changed = if entries.is_empty() {
            DenyChanged {
                set: name.to_string(),
                ..DenyChanged::default()
            }
        } else {
            match self.deny_add(name, entries) {
                Ok(c) => c,
                // No room for the old and the new entries together (a
                // refused add changes nothing): the stale ones go first.
                Err(_) if !stale.is_empty() => {
                    let held = self
                        .deny
                        .get(name)
                        .map(|s| s.held(&stale))
                        .unwrap_or_default();
                    let removed = self.deny_remove(name, &stale)?;
                    return match self.deny_add(name, entries) {
                        Ok(mut c) => {
                            c.removed = removed.removed;
                            Ok(c)
                        }
                        // The new list does not fit even alone: the stale
                        // bans go back, so a refused replace changes nothing.
                        Err(e) => {
                            self.deny_add(name, &held)?;
                            Err(e)
                        }
                    };
                }
                Err(e) => return Err(e),
            }
        };
        if !stale.is_empty() {
            let removed = self.deny_remove(name, &stale)?;
            changed.removed = removed.removed;
            changed.entries = removed.entries;
        }
        Ok(changed)
    }

    /// Removes every entry of set `name`, and the set.
    pub fn deny_flush(&mut self, name: &str) -> Result<DenyChanged, ChangeError> {
        if name == denylist::RATELIMIT_SET {
            return self.ratelimit_lift(None);
        }
        let all: Vec<IpNet> = self
            .deny
            .get(name)
            .map(|s| s.entries.keys().copied().collect())
            .unwrap_or_default();
        if all.is_empty() {
            denylist::check_name(name).map_err(ChangeError::Config)?;
            return Ok(DenyChanged {
                set: name.to_string(),
                ..DenyChanged::default()
            });
        }
        self.deny_remove(name, &all)
    }

    /// Set `name`: its size and drops, and its entries unless `count_only`.
    pub fn deny_list(&mut self, name: &str, count_only: bool) -> Result<DenySetView, ChangeError> {
        if name == denylist::RATELIMIT_SET {
            return self.ratelimit_view(count_only);
        }
        let Some(set) = self.deny.get(name) else {
            return Err(ChangeError::Config(format!("no deny set {name:?}")));
        };
        let (id, count) = (set.id, set.entries.len());
        let entries = if count_only {
            Vec::new()
        } else {
            set.entries
                .iter()
                .map(|(p, e)| DenyListed {
                    prefix: p.to_string(),
                    expires: *e,
                })
                .collect()
        };
        let stats = self
            .dataplane
            .deny_stats(&[id])
            .map_err(ChangeError::Internal)?;
        let c = stats.first().map(|(_, c)| *c).unwrap_or_default();
        Ok(DenySetView {
            set: name.to_string(),
            id,
            count,
            dropped_packets: c.packets,
            dropped_bytes: c.bytes,
            entries,
        })
    }

    /// Entries in set `name` (0 when there is no such set).
    /// The name of the deny set whose ban the data path applies to `ip`.
    pub fn deny_set_of(&self, ip: IpAddr) -> Option<String> {
        let id = self.deny.banning(ip)?;
        self.deny
            .sets()
            .iter()
            .find(|(_, s)| s.id == id)
            .map(|(name, _)| name.clone())
    }

    pub fn deny_count(&self, name: &str) -> usize {
        self.deny.get(name).map_or(0, |s| s.entries.len())
    }

    /// Every set, counted.
    pub fn deny_sets(&mut self) -> Vec<DenySetView> {
        let mut names: Vec<String> = self.deny.sets().keys().cloned().collect();
        if self.ratelimit_bans() {
            names.push(denylist::RATELIMIT_SET.to_string());
        }
        names
            .iter()
            .filter_map(|n| self.deny_list(n, true).ok())
            .collect()
    }

    /// Removes expired entries (the data path already ignores them);
    /// returns how many went.
    pub fn deny_sweep(&mut self) -> Result<usize, ChangeError> {
        let expired = self.deny.expired(unix_now());
        let mut by_set: std::collections::BTreeMap<String, Vec<IpNet>> = Default::default();
        for (set, p) in expired {
            by_set.entry(set).or_default().push(p);
        }
        let mut n = 0;
        for (set, prefixes) in by_set {
            n += self.deny_remove(&set, &prefixes)?.removed;
        }
        if n > 0 {
            tracing::info!(entries = n, "deny sets: removed expired entries");
        }
        Ok(n)
    }

    /// At start: the saved sets become the model, the tries are made to
    /// hold exactly them (pinned entries of removed bans deleted), and the
    /// admin networks are exempted.
    pub fn restore_deny(&mut self) -> anyhow::Result<usize> {
        let saved = self.store.load_deny_sets()?;
        self.deny = Sets::from_sets(saved);
        let held: BTreeSet<IpNet> = self.deny.prefixes().copied().collect();
        let stale: Vec<DenyWrite> = self
            .dataplane
            .deny_keys()?
            .into_iter()
            .filter(|p| !held.contains(p))
            .map(|p| (p, None))
            .collect();
        let writes = self.deny_writes(held.iter().copied().collect());
        self.dataplane.deny_write(&writes)?;
        self.dataplane.deny_write(&stale)?;
        self.sync_deny_exempt()?;
        self.publish_deny_names();
        Ok(held.len())
    }

    /// The admin networks no ban applies to: `[ssh] sources` when it lists
    /// any (an empty list means "anyone", which exempts nobody) and a
    /// lockdown's `--admin`.
    pub(super) fn admin_networks(&self) -> Vec<IpNet> {
        let ssh = &self.rules.head().ssh;
        let mut out: Vec<IpNet> = if ssh.allow {
            ssh.sources
                .iter()
                .filter_map(|s| {
                    s.parse::<IpNet>()
                        .ok()
                        .or_else(|| s.parse::<IpAddr>().ok().map(IpNet::from))
                })
                .collect()
        } else {
            Vec::new()
        };
        if let Mode::Lockdown { admin: Some(a) } = &self.mode
            && let Ok(net) = a
                .parse::<IpNet>()
                .or_else(|_| a.parse::<IpAddr>().map(IpNet::from))
        {
            out.push(net);
        }
        out
    }

    /// Writes the admin networks to the data path's exemption tries.
    pub(super) fn sync_deny_exempt(&mut self) -> anyhow::Result<()> {
        let admin = self.admin_networks();
        self.dataplane.deny_exempt(&admin)
    }

    /// A duplicate of the loaded ingress program's fd, for the deny-set
    /// benchmark's `BPF_PROG_TEST_RUN` (the core keeps the data plane).
    #[doc(hidden)]
    pub fn ingress_program_fd(&mut self) -> anyhow::Result<std::os::fd::OwnedFd> {
        self.dataplane.program_fd(dataplane::Program::Ingress)
    }

    /// Cuts the connection-table entries of sources inside `banned` (this
    /// request's prefixes: a flow this host opened to an address banned
    /// earlier is its own choice, and stays) and outside every admin network.
    fn cut_banned(&mut self, banned: &[Entry], admin: &[IpNet]) -> Result<usize, ChangeError> {
        let mut these = Sets::default();
        these.ensure("request", 1).map_err(ChangeError::Config)?;
        these.add("request", banned);
        let n = self
            .dataplane
            .cut_flows(|remote| {
                let remote = remote.to_canonical();
                !these.covers(remote) || admin.iter().any(|a| a.contains(&remote))
            })
            .map_err(ChangeError::Internal)?;
        if n > 0 {
            tracing::warn!(flows = n, "deny: cut the open flows of banned sources");
        }
        Ok(n)
    }
}
