//! systemd's view over the system D-Bus: the watcher that keeps a
//! [`SystemdView`] current (signals first, a poll as the fallback).

use std::time::Duration;

use futures::StreamExt as _;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::{SSH_UNITS, SystemdView, UnitState};

/// systemd's D-Bus interfaces, as far as readiness needs them.
mod systemd1 {
    use zbus::zvariant::OwnedObjectPath;

    /// `ListUnitsFiltered`'s rows: name, description, load, active, sub,
    /// following, unit path, job id, job type, job path.
    pub type UnitRow = (
        String,
        String,
        String,
        String,
        String,
        String,
        OwnedObjectPath,
        u32,
        String,
        OwnedObjectPath,
    );

    #[zbus::proxy(
        interface = "org.freedesktop.systemd1.Manager",
        default_service = "org.freedesktop.systemd1",
        default_path = "/org/freedesktop/systemd1"
    )]
    pub trait Manager {
        /// Asks systemd to emit unit and job signals to this client.
        fn subscribe(&self) -> zbus::Result<()>;
        fn load_unit(&self, name: &str) -> zbus::Result<OwnedObjectPath>;
        fn list_units_filtered(&self, states: &[&str]) -> zbus::Result<Vec<UnitRow>>;
        #[zbus(property)]
        fn system_state(&self) -> zbus::Result<String>;
        #[zbus(signal)]
        fn job_removed(
            &self,
            id: u32,
            job: OwnedObjectPath,
            unit: String,
            result: String,
        ) -> zbus::Result<()>;
    }

    #[zbus::proxy(
        interface = "org.freedesktop.systemd1.Unit",
        default_service = "org.freedesktop.systemd1"
    )]
    pub trait Unit {
        #[zbus(property)]
        fn load_state(&self) -> zbus::Result<String>;
        #[zbus(property)]
        fn active_state(&self) -> zbus::Result<String>;
        #[zbus(property)]
        fn sub_state(&self) -> zbus::Result<String>;
    }
}

/// The fallback poll: signals make it unnecessary, unless one is missed.
const POLL: Duration = Duration::from_secs(60);
/// A burst of signals (a unit stopping emits several) is read once.
const SETTLE: Duration = Duration::from_millis(50);

/// Keeps `tx` current with systemd's view, forever: connects to the system
/// bus (retrying until it exists), re-reads on signals and every [`POLL`].
pub async fn watch_systemd(ssh_unit: Option<String>, tx: watch::Sender<SystemdView>) {
    let mut logged = false;
    loop {
        let error = match zbus::Connection::system().await {
            Ok(conn) => {
                info!("connected to the system D-Bus");
                logged = false;
                follow(&conn, ssh_unit.as_deref(), &tx).await
            }
            Err(e) => Err(e.into()),
        };
        if let Err(e) = error {
            let text = format!("{e:#}");
            if !logged {
                warn!(error = %text, "system D-Bus unavailable; SSH unit state unknown until it appears");
                logged = true;
            }
            tx.send_modify(|v| {
                v.connected = false;
                v.error = Some(text);
            });
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn follow(
    conn: &zbus::Connection,
    ssh_unit: Option<&str>,
    tx: &watch::Sender<SystemdView>,
) -> anyhow::Result<()> {
    use zbus::{MatchRule, MessageStream, message::Type};
    let manager = systemd1::ManagerProxy::builder(conn)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await?;
    // Every unit's state changes, and job completions: either may change
    // the SSH unit, the failed units or the system state.
    let rule = MatchRule::builder()
        .msg_type(Type::Signal)
        .sender("org.freedesktop.systemd1")?
        .interface("org.freedesktop.DBus.Properties")?
        .member("PropertiesChanged")?
        .path_namespace("/org/freedesktop/systemd1/unit")?
        .build();
    let mut changes = MessageStream::for_match_rule(rule, conn, Some(256)).await?;
    let mut jobs = manager.receive_job_removed().await?;
    manager.subscribe().await?;
    loop {
        let view = read(conn, &manager, ssh_unit).await?;
        tx.send_if_modified(|v| {
            let changed = *v != view;
            *v = view;
            changed
        });
        tokio::select! {
            m = changes.next() => { m.ok_or_else(|| anyhow::anyhow!("the D-Bus connection closed"))??; }
            j = jobs.next() => { j.ok_or_else(|| anyhow::anyhow!("the D-Bus connection closed"))?; }
            _ = tokio::time::sleep(POLL) => { debug!("fallback poll of systemd"); }
        }
        // Let the rest of a burst arrive, then read once.
        tokio::time::sleep(SETTLE).await;
        while futures::FutureExt::now_or_never(changes.next())
            .flatten()
            .is_some()
        {}
        while futures::FutureExt::now_or_never(jobs.next())
            .flatten()
            .is_some()
        {}
    }
}

async fn read(
    conn: &zbus::Connection,
    manager: &systemd1::ManagerProxy<'_>,
    ssh_unit: Option<&str>,
) -> anyhow::Result<SystemdView> {
    let system_state = manager.system_state().await?;
    let mut failed_units: Vec<String> = manager
        .list_units_filtered(&["failed"])
        .await?
        .into_iter()
        .map(|row| row.0)
        .collect();
    failed_units.sort();
    let candidates: Vec<&str> = match ssh_unit {
        Some(name) => vec![name],
        None => SSH_UNITS.to_vec(),
    };
    let mut found = None;
    for name in candidates {
        let path = manager.load_unit(name).await?;
        let unit = systemd1::UnitProxy::builder(conn)
            .path(path)?
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await?;
        let state = UnitState {
            name: name.to_string(),
            load_state: unit.load_state().await?,
            active_state: unit.active_state().await?,
            sub_state: unit.sub_state().await?,
        };
        // A configured unit is reported whatever its state; otherwise the
        // first one that exists.
        if ssh_unit.is_some() || state.load_state == "loaded" {
            found = Some(state);
            break;
        }
    }
    Ok(SystemdView {
        connected: true,
        error: None,
        system_state: Some(system_state),
        failed_units,
        ssh_unit: found,
    })
}
