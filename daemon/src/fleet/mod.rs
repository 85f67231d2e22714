//! The fleet source (`[fleet]`): follows the cluster's member list in etcd
//! and registers this host in it. A task beside the API, on the core:
//!
//! - a session logs in, registers this host's addresses under its key with
//!   a lease (the lease id kept in the state directory, so a restart keeps
//!   it while it lives), reads the whole list when it has none (or its
//!   revision was compacted), then watches from the last applied revision
//!   + 1, renewing the lease (which also proves the endpoint has a leader);
//! - each revision goes to [`Core::fleet_apply`] (validated, audited,
//!   generation switch); the view and its revision are saved
//!   (`fleet.json`, atomic) once decided, so a restart resumes the watch;
//! - a failure ends the session: the next endpoint is tried after a pause.
//!   Enforcement never waits for etcd; the last applied peers stay live.

pub mod etcd;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::config::FleetConfig;
use crate::core::{FleetApplied, Shared};
use crate::membership::{self, View};
use etcd::{Client, WatchMsg};

/// The file in the state directory.
pub const STATE_FILE: &str = "fleet.json";

/// What survives a restart: the member list at the last decided revision
/// and the registration's lease.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Saved {
    view: View,
    #[serde(default)]
    lease: Option<i64>,
    /// Where the list came from (`<prefix>/<cluster_id>/members/`): a
    /// saved list of another prefix or cluster is read again, never
    /// resumed (its members would stay in the view for ever).
    #[serde(default)]
    source: String,
}

fn load(dir: &Path) -> Saved {
    match std::fs::read(dir.join(STATE_FILE)) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            warn!(error = %e, "fleet: the saved member list is damaged; reading it again from etcd");
            Saved::default()
        }),
        Err(_) => Saved::default(),
    }
}

/// The fleet task's own state.
struct Fleet {
    config: FleetConfig,
    allowed: Vec<IpNet>,
    prefix: String,
    key: String,
    dir: PathBuf,
    core: Shared,
    saved: Saved,
    /// A decided revision not yet applied (the core refused for now).
    dirty: bool,
    /// This host's key is written (with the saved lease).
    registered: bool,
}

/// Starts following etcd (returns at once; the task runs until the daemon
/// exits).
/// A setting that cannot work (an unreadable CA file) is reported in the
/// status and returned; enforcement goes on with the live peers.
pub async fn spawn(config: FleetConfig, core: Shared, state_dir: PathBuf) -> anyhow::Result<()> {
    let mut saved = load(&state_dir);
    core.lock()
        .await
        .fleet_follow(&config.cluster_id, saved.view.revision);
    let prepared = (|| {
        let allowed = config.allowed()?;
        let client = Client::new(&config)?;
        let name = match &config.name {
            Some(n) => n.clone(),
            None => std::fs::read_to_string("/proc/sys/kernel/hostname")
                .context("fleet: no name configured and the host name is unreadable")?
                .trim()
                .to_string(),
        };
        anyhow::Ok((allowed, client, name))
    })();
    let (allowed, client, name) = match prepared {
        Ok(p) => p,
        Err(e) => {
            core.lock().await.fleet_failed(&format!("{e:#}"));
            return Err(e);
        }
    };
    let prefix = membership::members_prefix(&config.prefix, &config.cluster_id);
    if saved.source != prefix {
        // Another prefix or cluster (or a list saved before sources were
        // recorded): read the whole list, never resume that one.
        saved.view = View::default();
        saved.source = prefix.clone();
    }
    let mut fleet = Fleet {
        key: format!("{prefix}{name}"),
        prefix,
        allowed,
        config,
        dir: state_dir,
        core,
        saved,
        dirty: false,
        registered: false,
    };
    tokio::spawn(async move { fleet.run(client).await });
    Ok(())
}

impl Fleet {
    async fn run(&mut self, mut client: Client) {
        let mut pause = Duration::from_millis(200);
        loop {
            let started = tokio::time::Instant::now();
            let e = match self.session(&mut client).await {
                Ok(()) => {
                    pause = Duration::from_millis(200);
                    continue;
                }
                Err(e) => format!("{e:#}"),
            };
            warn!(endpoint = %client.url(), error = %e, "fleet: etcd not followed; the last applied member list stays");
            self.core.lock().await.fleet_failed(&e);
            client.fail_over();
            if started.elapsed() > Duration::from_secs(10) {
                pause = Duration::from_millis(200);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(5));
        }
    }

    /// One session with one endpoint; `Ok` when it must start again (the
    /// watch's revision was compacted and the list was read again).
    async fn session(&mut self, client: &mut Client) -> anyhow::Result<()> {
        client.authenticate().await?;
        self.try_register(client).await;
        let saved = self.saved.view.revision;
        if saved == 0 {
            self.full_read(client).await?;
        } else if client.compacted(&self.prefix, saved).await? {
            warn!(
                revision = saved,
                "fleet: the saved revision was compacted; reading the whole list"
            );
            self.full_read(client).await?;
        } else {
            // The saved list, decided again under this configuration
            // (`allowed_ranges` may have narrowed since it was saved).
            self.decide().await;
        }
        let mut watch = client
            .watch(&self.prefix, self.saved.view.revision + 1)
            .await?;
        self.core.lock().await.fleet_synced(&client.url());
        let period = Duration::from_secs((self.config.lease_ttl_secs / 3).max(1));
        let mut tick = tokio::time::interval(period);
        tick.tick().await;
        loop {
            tokio::select! {
                msg = watch.next() => match msg? {
                    WatchMsg::Events { revision, events } => {
                        self.saved.view.apply(events, revision);
                        self.decide().await;
                        self.core.lock().await.fleet_synced(&client.url());
                    }
                    WatchMsg::Compacted(at) => {
                        warn!(compacted = at, from = self.saved.view.revision + 1, "fleet: the watch's revision was compacted; reading the whole list");
                        self.full_read(client).await?;
                        return Ok(());
                    }
                    WatchMsg::Quiet => {}
                },
                _ = tick.tick() => {
                    self.renew(client).await?;
                    if self.dirty {
                        self.decide().await;
                    }
                    self.core.lock().await.fleet_synced(&client.url());
                }
            }
        }
    }

    /// Reads the whole member list and decides it.
    async fn full_read(&mut self, client: &Client) -> anyhow::Result<()> {
        let (revision, pairs) = client.range(&self.prefix).await?;
        self.saved.view = View {
            revision,
            members: pairs.into_iter().collect(),
            // What each key last validated as stays known across a re-read.
            valid: std::mem::take(&mut self.saved.view.valid),
        };
        info!(
            revision,
            members = self.saved.view.members.len(),
            "fleet: read the member list"
        );
        self.decide().await;
        Ok(())
    }

    /// Applies the view's revision; saves it once decided (applied,
    /// unchanged or refused); keeps it to retry when the core cannot now.
    async fn decide(&mut self) {
        let peers = self.saved.view.peers(&self.allowed);
        let view = &self.saved.view;
        let result = self.core.lock().await.fleet_apply(
            &self.config.cluster_id,
            view.revision,
            view.members.len(),
            peers,
        );
        match result {
            Ok(outcome) => {
                self.dirty = false;
                if let FleetApplied::Applied(c) = &outcome {
                    info!(revision = view.revision, generation = c.generation, changes = %c.diff.summary().join(" "), "fleet: member list applied");
                }
                self.save();
            }
            Err(e) => {
                self.dirty = true;
                warn!(revision = view.revision, error = %e, "fleet: member list not applied yet; retrying");
            }
        }
    }

    fn save(&self) {
        let bytes = serde_json::to_vec(&self.saved).unwrap_or_default();
        if let Err(e) = crate::state::replace_file(&self.dir, STATE_FILE, &bytes, None) {
            warn!(error = %format!("{e:#}"), "fleet: cannot save the member list's revision");
        }
    }

    /// Registers this host's addresses under its key, with its lease (the
    /// saved one while it lives, else a new one).
    async fn register(&mut self, client: &Client) -> anyhow::Result<()> {
        if self.config.addresses.is_empty() {
            return Ok(());
        }
        let lease = match self.saved.lease {
            Some(id) if client.keep_alive(id).await? > 0 => id,
            _ => {
                let id = client.grant(self.config.lease_ttl_secs).await?;
                self.saved.lease = Some(id);
                self.save();
                id
            }
        };
        let value = membership::member_value(&self.config.addresses);
        client
            .put(&self.key, &value, lease)
            .await
            .with_context(|| format!("cannot register {} in etcd", self.key))?;
        info!(key = %self.key, lease, "fleet: registered");
        Ok(())
    }

    /// Registers, or says why not: the list is followed either way (a
    /// host whose role may not write its key still enforces the members),
    /// and the next renewal tries again.
    async fn try_register(&mut self, client: &Client) {
        self.registered = false;
        match self.register(client).await {
            Ok(()) => self.registered = !self.config.addresses.is_empty(),
            Err(e) => {
                warn!(key = %self.key, error = %format!("{e:#}"), "fleet: not registered; following the member list anyway")
            }
        }
    }

    /// Renews the lease (or, without registration, reads linearizably):
    /// either fails on an endpoint without a leader. A lease that expired
    /// meanwhile is replaced and the key written again.
    async fn renew(&mut self, client: &Client) -> anyhow::Result<()> {
        if !self.config.addresses.is_empty() && !self.registered {
            client.ping(&self.prefix).await?;
            self.try_register(client).await;
            return Ok(());
        }
        match self
            .saved
            .lease
            .filter(|_| !self.config.addresses.is_empty())
        {
            Some(id) => {
                if client.keep_alive(id).await? <= 0 {
                    warn!(lease = id, "fleet: the lease expired; registering again");
                    self.saved.lease = None;
                    self.try_register(client).await;
                }
            }
            None => {
                client.ping(&self.prefix).await?;
            }
        }
        Ok(())
    }
}
