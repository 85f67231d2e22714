//! `portcullisd`: makes the live rule set live, attaches the data path to
//! the interfaces it protects (and to new ones as they appear), serves the
//! control API, and stays in the foreground until SIGTERM or SIGINT.
//! Enforcement is pinned, so it continues after the daemon exits;
//! `--detach` ends it.

// No panic reachable from input (issue 14); see the library's root.
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::Context as _;
use clap::Parser;
use futures::StreamExt as _;
use netlink_packet_core::NetlinkPayload;
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::AsyncSocket as _;
use portcullis::host::{ApiProbes as _, ConfigProbes as _};
use portcullis::{
    api,
    config::{Config, DEFAULT_CONFIG_PATH, Fallback},
    core::{self, Core},
    dataplane::{self, Dataplane},
    fallback, links,
    readiness::{self, SystemdView},
    rules::Ssh,
    sockets, state,
};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::Mutex,
};
use tracing::{error, info, warn};

#[derive(Parser)]
#[command(version, about = "Portcullis host firewall daemon")]
struct Args {
    /// Configuration file.
    #[arg(long, short, default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// Validate the configuration and exit, without touching the kernel.
    #[arg(long)]
    check_config: bool,
    /// Remove every pinned link and map (stop enforcing) and exit.
    #[arg(long)]
    detach: bool,
    /// Where the live rule set is kept (overrides `state_dir` in the config).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// The API socket (overrides `[api] socket` in the config).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Write this program's man page into DIR and exit (packaging).
    #[arg(long, hide = true, value_name = "DIR")]
    generate_man: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    portcullis::journal::init();
    let args = Args::parse();
    if let Some(dir) = &args.generate_man {
        use clap::CommandFactory as _;
        let mut page = Vec::new();
        clap_mangen::Man::new(Args::command()).render(&mut page)?;
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("portcullisd.8"), page)?;
        return Ok(());
    }
    let config = match Config::load(&args.config) {
        Ok(config) => config,
        Err(e) if args.check_config || args.detach => return Err(e),
        // Fail closed: without a configuration there is no rule to enforce,
        // but the host still gets the fallback (with the SSH exemption of
        // the last live rule set, so the admin can get in to fix the file).
        Err(e) => {
            let state_dir = args
                .state_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from(state::DEFAULT_STATE_DIR));
            let ssh = last_live_ssh(&state::Store::new(&state_dir)).unwrap_or_else(|| Ssh {
                allow: true,
                ..Ssh::default()
            });
            return Err(fail_closed(Fallback::default(), &ssh, e));
        }
    };
    if args.check_config {
        if !config.ssh.allow {
            eprintln!(
                "{}: warning: [ssh] allow is off: new SSH logins are dropped unless a rule admits port(s) {:?}",
                args.config.display(),
                config.ssh.ports
            );
        }
        println!("{}: ok", args.config.display());
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    if args.detach {
        // Every link: in automatic mode the config names none.
        let names: Vec<String> = runtime.block_on(async {
            let (connection, handle, _) = rtnetlink::new_connection()?;
            tokio::spawn(connection);
            anyhow::Ok(
                links::list(&handle)
                    .await?
                    .into_iter()
                    .map(|l| l.name)
                    .collect(),
            )
        })?;
        let pin_dir = config.pin_dir();
        let n = dataplane::detach_all(&pin_dir, &names)?;
        info!(links = n, pin_dir = %pin_dir.display(), "detached; inbound traffic is no longer filtered");
        return Ok(());
    }
    let state_dir = args
        .state_dir
        .or_else(|| config.state_dir.clone())
        .unwrap_or_else(|| PathBuf::from(state::DEFAULT_STATE_DIR));
    let socket = args
        .socket
        .unwrap_or_else(|| api::socket_path(config.api.socket.as_deref()));
    runtime.block_on(run(
        config,
        args.config,
        state::Store::new(&state_dir),
        socket,
    ))
}

async fn run(
    config: Config,
    config_path: PathBuf,
    store: state::Store,
    socket: PathBuf,
) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    // What the host gets if enforcement cannot come up: the SSH exemption of
    // the rules that were live (else the file's).
    let fallback_ssh = last_live_ssh(&store).unwrap_or_else(|| config.ssh.clone());
    let Started {
        core,
        handle,
        mut link_events,
        mut protected,
        selector,
        writers_gid,
        readers_gid,
        pending,
    } = match start(&config, &config_path, store).await {
        Ok(started) => started,
        Err(e) => return Err(fail_closed(config.fallback, &fallback_ssh, e)),
    };
    // systemd's soft limit is 1024: take the hard limit, and bound what
    // unprivileged API clients may hold below it.
    let fd_limit = api::raise_fd_limit();
    let pin_dir = config.pin_dir();
    let generation = core.generation();
    let summary = core.protection_summary();
    let core = Arc::new(Mutex::new(core));
    if let Some((generation, secs)) = pending {
        warn!(
            generation,
            secs, "a change awaits confirmation; it is rolled back unless confirmed in time"
        );
        api::arm_rollback(core.clone(), generation, secs);
    }
    let feed = portcullis::events::Feed::default();
    let ring = core.lock().await.dataplane().take_events()?;
    tokio::spawn({
        let feed = feed.clone();
        async move {
            if let Err(e) = feed.run(ring).await {
                error!(error = %format!("{e:#}"), "drop events are no longer read");
            }
        }
    });
    // systemd's view over D-Bus, kept current in the background; the bus
    // may not exist yet at this point of the boot.
    let (systemd_tx, systemd_rx) = tokio::sync::watch::channel(SystemdView::default());
    tokio::spawn(readiness::watch_systemd(
        config.readiness.ssh_unit.clone(),
        systemd_tx,
    ));
    let api = api::Api {
        feed,
        request_timeout: std::time::Duration::from_secs(config.api.request_timeout_secs),
        core: core.clone(),
        writers: api::Writers { gid: writers_gid },
        control: Arc::new(api::Control::new(&config.api, readers_gid)),
        readiness: Arc::new(readiness::Checker::new(
            config.readiness.clone(),
            systemd_rx,
        )),
    };
    if let Some(health) = &config.readiness.health {
        let listener = tokio::net::TcpListener::bind(health.listen)
            .await
            .with_context(|| format!("readiness: health: cannot listen on {}", health.listen))?;
        info!(listen = %health.listen, "health endpoint");
        tokio::spawn(api::serve_health(listener, api.clone(), health.clone()));
    }
    let listener = api::bind(&socket, readers_gid.or(writers_gid))?;
    let mut server = tokio::spawn(api::serve(listener, api.clone()));
    info!(pin_dir = %pin_dir.display(), socket = %socket.display(), generation, fd_limit, status = %summary, "ready");
    // Tell systemd (Type=notify) that the host is protected, and keep its
    // watchdog fed while the loop runs.
    if let Err(e) = sd_notify::notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&summary),
    ]) {
        warn!(error = %e, "cannot notify the service manager");
    }
    // Readiness, re-evaluated every second and on every change systemd
    // reports: kept in STATUS= and logged when it changes.
    let mut recheck = tokio::time::interval(std::time::Duration::from_secs(1));
    let mut systemd_changes = api.readiness.systemd();
    let mut last_summary = String::new();
    let mut watchdog = tokio::time::interval(
        sd_notify::watchdog_enabled().map_or(std::time::Duration::from_secs(3600), |d| d / 2),
    );

    loop {
        tokio::select! {
            _ = term.recv() => { info!("SIGTERM"); break; }
            _ = int.recv() => { info!("SIGINT"); break; }
            _ = recheck.tick() => {
                report_readiness(&api, &mut last_summary).await;
            }
            _ = systemd_changes.changed() => {
                report_readiness(&api, &mut last_summary).await;
            }
            _ = watchdog.tick() => {
                if sd_notify::watchdog_enabled().is_some() {
                    let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                }
            }
            _ = hup.recv() => {
                let mut core = core.lock().await;
                match Config::load(&config_path) {
                    Err(e) => error!(error = %format!("{e:#}"), "reload refused; the live rule set is unchanged"),
                    Ok(new) => {
                        let opts = core::Options { allow_ping: Some(new.allow_ping), ..Default::default() };
                        core.acting(core::Actor { action: "reload".into(), ..Default::default() });
                        let result = core.change(&opts, |live| { *live = new.rule_set(); Ok(()) });
                        core.acting(core::Actor::default());
                        let outcome = match &result {
                            Ok(c) => { info!(generation = c.generation, hash = %c.hash, config = %config_path.display(), "reloaded: rules live"); "applied".to_string() }
                            Err(e) => { error!(error = %e, "reload refused; the live rule set is unchanged"); format!("refused: {e}") }
                        };
                        if let Err(e) = core.record(None, None, "reload", outcome) {
                            error!(error = %format!("{e:#}"), "cannot write the audit log");
                        }
                    }
                }
            }
            event = link_events.next() => {
                let Some((message, _)) = event else {
                    anyhow::bail!("the rtnetlink event stream ended");
                };
                match message.payload {
                    NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(msg)) => {
                        let Some(link) = links::Link::from_message(&msg) else { continue };
                        if protected.contains(&link.name) || !selector.wants(&link) {
                            continue;
                        }
                        // A failure here leaves other interfaces protected; say
                        // which interface is open and keep running.
                        let mut core = core.lock().await;
                        let result = core
                            .dataplane()
                            .attach_egress(&link.name, config.tc_attach)
                            .and_then(|_| core.dataplane().attach_ingress(&link.name));
                        match result {
                            Ok(how) => {
                                let mode = xdp_mode(&handle, &link.name).await;
                                info!(interface = %link.name, attach = ?how, xdp_mode = %mode, "enforcing");
                                core.interfaces.insert(link.name.clone(), mode);
                                protected.insert(link.name);
                            }
                            Err(e) => error!(interface = %link.name, error = %format!("{e:#}"), "cannot protect new interface"),
                        }
                    }
                    NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(msg)) => {
                        if let Some(link) = links::Link::from_message(&msg)
                            && protected.remove(&link.name)
                        {
                            core.lock().await.interfaces.remove(&link.name);
                            info!(interface = %link.name, "interface removed");
                        }
                    }
                    _ => {}
                }
            }
            stopped = &mut server => {
                // The data path stays pinned; the service manager restarts us.
                return match stopped {
                    Ok(Err(e)) => Err(e.context("the API server stopped")),
                    _ => Err(anyhow::anyhow!("the API server stopped")),
                };
            }
        }
    }
    let _ = std::fs::remove_file(&socket);
    info!("exiting; enforcement stays pinned (portcullisd --detach removes it)");
    Ok(())
}

/// What [`start`] brought up: enforcement, and what the loop needs.
struct Started {
    core: Core,
    handle: rtnetlink::Handle,
    link_events: futures::channel::mpsc::UnboundedReceiver<(
        netlink_packet_core::NetlinkMessage<RouteNetlinkMessage>,
        netlink_sys::SocketAddr,
    )>,
    protected: HashSet<String>,
    selector: links::Selector,
    writers_gid: Option<u32>,
    readers_gid: Option<u32>,
    /// A change awaiting confirmation: its generation and seconds left.
    pending: Option<(u64, u64)>,
}

/// Everything up to enforcement, in order: rules live, egress attached,
/// open connections seeded, ingress attached. Any error here means the host
/// is not (fully) protected: the caller applies the fallback.
async fn start(
    config: &Config,
    config_path: &Path,
    store: state::Store,
) -> anyhow::Result<Started> {
    let selector = config.selector()?;
    let writers_gid = config.api.writers_gid()?;
    let readers_gid = config.api.readers_gid()?;
    // Resolved once (a default pin directory depends on what is mounted), so
    // loading, cleaning up and logging all name the same directory.
    let pin_dir = config.pin_dir();

    // Subscribe to link events before listing links, so none is missed.
    let (mut connection, handle, link_events) =
        rtnetlink::new_connection().context("opening rtnetlink")?;
    connection
        .socket_mut()
        .socket_mut()
        .bind(&netlink_sys::SocketAddr::new(
            0,
            rtnetlink::constants::RTMGRP_LINK,
        ))
        .context("subscribing to link events")?;
    tokio::spawn(connection);
    let targets: Vec<String> = links::list(&handle)
        .await?
        .into_iter()
        .filter(|l| selector.wants(l))
        .map(|l| l.name)
        .collect();
    if targets.is_empty() {
        warn!(
            auto = selector.is_auto(),
            "no interface to protect yet; waiting for one to appear"
        );
    }

    // The live set: what was live before a restart, else the config file.
    let (rules, generation) = match store.load()? {
        Some(restored) => {
            info!(generation = restored.generation, state_dir = %store.dir().display(), "restored the live rule set");
            if restored.rules != config.rule_set() {
                warn!(config = %config_path.display(), "the config file differs from the live rule set; send SIGHUP (reload) to apply it");
            }
            (restored.rules, restored.generation)
        }
        None => (config.rule_set(), 1),
    };
    let limits = config.capacity.limits();
    let dataplane = Dataplane::load_with(
        &pin_dir,
        config.conntrack_entries,
        &limits,
        config.xdp_program,
    )
    .context("loading the eBPF data path")?;
    info!(
        program = dataplane.ingress_program(),
        "XDP ingress program loaded"
    );

    // Rules first: a new ingress link never runs on empty maps. Then egress,
    // so flows opened from now on are recorded; then the connections that
    // already exist; only then the ingress filter.
    let mut core = Core::start(
        dataplane,
        store,
        limits,
        config.allow_ping,
        rules,
        generation,
        config.service_rules(),
    )
    .context("making the rules live")?;
    core.expect_interfaces(&config.interfaces);
    info!(generation, hash = core.hash(), "rules live");
    for ifname in &targets {
        let how = core
            .dataplane()
            .attach_egress(ifname, config.tc_attach)
            .with_context(|| format!("interface {ifname}"))?;
        info!(interface = %ifname, attach = ?how, "recording outbound flows");
    }
    let existing = sockets::connections().context("listing open connections")?;
    let seeded = core.dataplane().seed_connections(&existing)?;
    info!(
        connections = existing.len(),
        seeded, "connection table seeded"
    );
    let mut protected = HashSet::new();
    for ifname in &targets {
        let how = core
            .dataplane()
            .attach_ingress(ifname)
            .with_context(|| format!("interface {ifname}"))?;
        let mode = xdp_mode(&handle, ifname).await;
        info!(interface = %ifname, attach = ?how, xdp_mode = %mode, "enforcing");
        core.interfaces.insert(ifname.clone(), mode);
        protected.insert(ifname.clone());
    }
    // Enforcing: a fallback policy from a failed start is no longer needed.
    if fallback::remove() {
        info!(
            table = fallback::TABLE,
            "the data path enforces again: removed the nftables fallback"
        );
    }
    // A change that awaited confirmation when we stopped: roll it back now
    // if its time is up, else keep waiting for it.
    core.restore_pending()?;
    core.restore_mode()?;
    let pending = core.pending_remaining();
    // Every link now runs this version's programs: maps of older layouts
    // have no users left.
    for old in dataplane::remove_old_layouts(&pin_dir)? {
        info!(maps = %old.display(), "removed the maps of an older layout");
    }
    Ok(Started {
        core,
        handle,
        link_events,
        protected,
        selector,
        writers_gid,
        readers_gid,
        pending,
    })
}

/// The last live rule set's SSH exemption, if one can be read.
fn last_live_ssh(store: &state::Store) -> Option<Ssh> {
    store.load().ok().flatten().map(|r| r.rules.ssh)
}

/// Enforcement cannot come up: say so loudly and, unless configured off,
/// put the nftables fallback in place before failing. Every exit before
/// enforcement goes through here.
fn fail_closed(fallback: Fallback, ssh: &Ssh, e: anyhow::Error) -> anyhow::Error {
    error!(error = %format!("{e:#}"), "enforcement cannot start: the host is NOT protected by Portcullis");
    let status = match fallback {
        Fallback::Nftables => match fallback::apply(ssh) {
            Ok(()) => {
                warn!(
                    table = fallback::TABLE,
                    ssh_ports = ?ssh.ports,
                    "nftables fallback in place: inbound denied except SSH and established flows"
                );
                "FAILED: Portcullis cannot enforce; the nftables fallback denies inbound except SSH"
            }
            Err(fe) => {
                error!(error = %format!("{fe:#}"), "the nftables fallback failed too: the host is OPEN");
                "FAILED: Portcullis cannot enforce and the fallback failed: the host is OPEN"
            }
        },
        Fallback::None => {
            error!("fallback = \"none\": the host is OPEN until the daemon starts");
            "FAILED: Portcullis cannot enforce (fallback none): the host is OPEN"
        }
    };
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(status)]);
    e
}

/// Logs readiness when its summary changes and keeps systemd's `STATUS=`
/// current.
async fn report_readiness(api: &api::Api, last: &mut String) {
    let report = api::readiness(api).await;
    let summary = report.summary();
    if summary == *last {
        return;
    }
    if report.ready {
        info!(status = %summary, "SSH-ready");
    } else {
        warn!(status = %summary, "not SSH-ready");
    }
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Status(&summary)]) {
        warn!(error = %e, "cannot notify the service manager");
    }
    *last = summary;
}

/// The XDP mode the kernel chose for `ifname`.
async fn xdp_mode(handle: &rtnetlink::Handle, ifname: &str) -> String {
    match links::get(handle, ifname).await {
        Ok(link) => link.xdp.as_str().to_string(),
        Err(_) => "unknown".to_string(),
    }
}
