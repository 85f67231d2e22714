//! Cluster membership from etcd, as the core applies it: a revision's
//! member list replaces the cluster's peers through [`Core::change`] (the
//! same validation, generation and audit record as an API change, the
//! record naming `etcd` and the revision); a removed member's open flows
//! are cut; the SSH exemption and the admin network are never touched
//! (only the peers are). The fleet task (`crate::fleet`) reads etcd; this
//! is what it may do to the rules.

use std::time::Instant;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::{Actor, ChangeError, Changed, Core, Options};
use crate::model::unix_now;
use crate::rules::PeerEdit;

/// How far this host is behind etcd, for status and metrics.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct FleetStatus {
    pub cluster_id: String,
    /// The etcd revision the live peers are from (or that was refused).
    pub revision: i64,
    /// Members in that revision's list.
    pub members: usize,
    /// Unix time of the last successful exchange with etcd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync: Option<u64>,
    /// Seconds since then (`None`: never synced since the daemon started).
    /// The last applied peers stay in force meanwhile: a warning, not a
    /// readiness failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stale_secs: Option<u64>,
    /// The endpoint in use.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub endpoint: String,
    /// Why etcd cannot be followed now (connection, TLS, credentials).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Why the latest revision was refused (its peers are not live).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
}

/// The core's record of the fleet source.
#[derive(Clone, Debug, Default)]
pub(super) struct FleetState {
    status: FleetStatus,
    synced_at: Option<Instant>,
}

/// What a revision did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FleetApplied {
    /// The peers were already these.
    Unchanged,
    Applied(Box<Changed>),
    /// The revision does not validate: nothing changed (audited).
    Refused(String),
}

impl Core {
    /// Declares the fleet source (at start): status and reloads know it.
    pub fn fleet_follow(&mut self, cluster_id: &str, revision: i64) {
        self.fleet = Some(FleetState {
            status: FleetStatus {
                cluster_id: cluster_id.to_string(),
                revision,
                ..Default::default()
            },
            synced_at: None,
        });
    }

    /// The fleet source's status, its staleness computed now.
    pub fn fleet_status(&self) -> Option<FleetStatus> {
        let state = self.fleet.as_ref()?;
        let mut status = state.status.clone();
        status.stale_secs = state.synced_at.map(|t| t.elapsed().as_secs());
        Some(status)
    }

    /// A successful exchange with etcd at `endpoint`.
    pub fn fleet_synced(&mut self, endpoint: &str) {
        if let Some(state) = &mut self.fleet {
            state.synced_at = Some(Instant::now());
            state.status.last_sync = Some(unix_now());
            state.status.endpoint = endpoint.to_string();
            state.status.error = None;
        }
    }

    /// etcd cannot be followed now: the last applied peers stay.
    pub fn fleet_failed(&mut self, error: &str) {
        if let Some(state) = &mut self.fleet {
            state.status.error = Some(error.to_string());
        }
    }

    /// Makes the member list of etcd `revision` the cluster's peers (or
    /// records why not). `peers` are the valid members' addresses;
    /// `refused` names each key whose value does not validate (audited;
    /// those members admit nothing). `Err`: the change could not be made
    /// now (a confirmation window open, the disk): the caller retries.
    pub fn fleet_apply(
        &mut self,
        cluster_id: &str,
        revision: i64,
        members: usize,
        (peers, refused): (Vec<String>, Vec<String>),
    ) -> Result<FleetApplied, ChangeError> {
        let action = format!("etcd revision {revision}");
        let refused = (!refused.is_empty()).then(|| refused.join("; "));
        if let Some(why) = &refused {
            tracing::error!(revision, reason = %why, "etcd: member values refused; those members admit nothing");
            self.record(None, None, &action, format!("refused: {why}"))
                .map_err(ChangeError::Internal)?;
        }
        let mut live = self
            .rules
            .head()
            .cluster
            .as_ref()
            .map(|c| c.peers.clone())
            .unwrap_or_default();
        live.sort();
        if live == peers && self.rules.head().cluster.is_some() {
            self.fleet_decided(revision, members, refused);
            return Ok(FleetApplied::Unchanged);
        }
        self.acting(Actor {
            action: action.clone(),
            ..Default::default()
        });
        let result = self.change(&Options::default(), |set| {
            Ok(set.edit_peers(PeerEdit::Replace, &peers, Some(cluster_id))?)
        });
        self.acting(Actor::default());
        let changed = match result {
            Ok(c) => c,
            Err(e @ (ChangeError::Invalid(_) | ChangeError::TooLarge(_))) => {
                return self.fleet_refused(&action, revision, e.to_string());
            }
            Err(e) => return Err(e),
        };
        self.record(
            None,
            None,
            &action,
            format!("applied: {}", changed.diff.summary().join(" ")),
        )
        .map_err(ChangeError::Internal)?;
        self.fleet_baseline();
        self.cut_removed_members(&changed.diff.peers_removed);
        self.fleet_decided(revision, members, refused);
        Ok(FleetApplied::Applied(Box::new(changed)))
    }

    fn fleet_refused(
        &mut self,
        action: &str,
        revision: i64,
        why: String,
    ) -> Result<FleetApplied, ChangeError> {
        tracing::error!(revision, reason = %why, "etcd: member list refused; the live peers stay");
        self.record(None, None, action, format!("refused: {why}"))
            .map_err(ChangeError::Internal)?;
        let members = self.fleet.as_ref().map_or(0, |s| s.status.members);
        self.fleet_decided(revision, members, Some(why.clone()));
        Ok(FleetApplied::Refused(why))
    }

    fn fleet_decided(&mut self, revision: i64, members: usize, refused: Option<String>) {
        if let Some(state) = &mut self.fleet {
            state.status.revision = revision;
            state.status.members = members;
            state.status.refused = refused;
        }
    }

    /// etcd's peers are not a runtime change: the baseline follows them,
    /// so `reload` neither refuses on their account nor drops them.
    fn fleet_baseline(&mut self) {
        let peers = self.rules.head().cluster.clone();
        if let Some(cluster) = peers {
            let base = self.baseline.cluster.get_or_insert_with(|| cluster.clone());
            base.peers = cluster.peers;
            if let Err(e) = self.store.save_baseline(&self.baseline) {
                tracing::error!(error = %format!("{e:#}"), "cannot save the baseline");
            }
        }
    }

    /// On a reload, the live (etcd's) peers stay: the file does not own them.
    pub(super) fn keep_fleet_peers(&self, next: &mut crate::rules::RuleSet) {
        if self.fleet.is_none() {
            return;
        }
        if let Some(live) = &self.rules.head().cluster {
            let cluster = next.cluster.get_or_insert_with(|| live.clone());
            cluster.peers = live.peers.clone();
        }
    }

    /// Cuts the connection-table entries of members no longer in the list
    /// (flows this host opened to them, and those seeded at start), except
    /// where the SSH exemption (the admin network) still admits them.
    fn cut_removed_members(&mut self, removed: &[String]) {
        let removed: Vec<IpNet> = removed.iter().filter_map(|p| p.parse().ok()).collect();
        if removed.is_empty() {
            return;
        }
        // The admin network: the SSH exemption's explicit sources (an
        // exemption from anywhere names no network to spare).
        let ssh = &self.rules.head().ssh;
        let admin = if ssh.allow && !ssh.sources.is_empty() {
            ssh.networks().unwrap_or_default()
        } else {
            Vec::new()
        };
        let cut = self.dataplane.cut_flows(|remote| {
            let remote = remote.to_canonical();
            !removed.iter().any(|n| n.contains(&remote))
                || admin.iter().any(|n| n.contains(&remote))
        });
        match cut {
            Ok(n) if n > 0 => {
                tracing::warn!(flows = n, "etcd: cut the open flows of removed members")
            }
            Ok(_) => {}
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "etcd: cannot cut the flows of removed members")
            }
        }
    }
}
