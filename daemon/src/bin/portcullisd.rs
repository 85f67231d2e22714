//! `portcullisd`: makes the live rule set live, attaches the data path to
//! the interfaces it protects (and to new ones as they appear), serves the
//! control API, and stays in the foreground until SIGTERM or SIGINT.
//! Enforcement is pinned, so it continues after the daemon exits;
//! `--detach` ends it.

// No panic reachable from input (issue 14); see the library's root.
// Functions short enough to read at once (threshold in clippy.toml).
#![deny(clippy::too_many_lines)]
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
    config::{Config, DEFAULT_CONFIG_PATH, Fallback, TcAttachMode},
    core::{self, Core},
    dataplane::{self, Dataplane},
    fallback, forwarder,
    instance::{self, ClaimError, Instance},
    links,
    readiness::{self, SystemdView},
    rules::{RuleSet, Ssh},
    state,
};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::Mutex,
};
use tracing::{debug, error, info, warn};

#[derive(Parser)]
#[command(
    name = "portcullisd",
    version,
    about = "Portcullis host firewall daemon"
)]
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
    portcullis::host::tune_allocator();
    portcullis::journal::init();
    let args = Args::parse();
    if let Some(dir) = &args.generate_man {
        return generate_man(dir);
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
            // Not over a daemon that runs here: its enforcement stays.
            // (A claim that cannot be made does not stop the fallback.)
            let _instance = match claim(&[&state_dir], instance::WAIT) {
                Err(held @ ClaimError::Held { .. }) => return Err(e.context(held)),
                claimed => claimed.ok(),
            };
            let ssh = last_live_ssh(&state::Store::new(&state_dir)).unwrap_or_else(|| Ssh {
                allow: true,
                ..Ssh::default()
            });
            return Err(fail_closed(Fallback::default(), &ssh, e));
        }
    };
    if args.check_config {
        return check_config(&args.config, &config);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    if args.detach {
        // Not under a running daemon: it would go on reporting enforcement
        // that is gone (and attach new interfaces again).
        let pin_dir = config.pin_dir();
        let _instance = claim(&[&pin_dir], std::time::Duration::ZERO).map_err(|e| match e {
                ClaimError::Held { .. } => anyhow::Error::new(e).context(
                    "--detach is for a stopped daemon: stop the service first (systemctl stop portcullis; a daemon that does not stop can be killed), then detach",
                ),
                e => e.into(),
            })?;
        return runtime.block_on(detach(&pin_dir));
    }
    let state_dir = args
        .state_dir
        .or_else(|| config.state_dir.clone())
        .unwrap_or_else(|| PathBuf::from(state::DEFAULT_STATE_DIR));
    let socket = args
        .socket
        .unwrap_or_else(|| api::socket_path(config.api.socket.as_deref()));
    let store = state::Store::new(&state_dir);
    // What the host gets if enforcement cannot come up: the SSH exemption of
    // the rules that were live (else the file's).
    let fallback_ssh = last_live_ssh(&store).unwrap_or_else(|| config.rule_set().ssh);
    // Resolved once (a default pin directory depends on what is mounted), so
    // the claim, loading, cleaning up, the failure path and logging all name
    // the same directory.
    let pin_dir = config.pin_dir();
    // Before anything is touched, and held until the runtime (and the
    // garbage it may still free into the maps) is gone: a second daemon on
    // the same pins, state or socket would write the first one's. Refused,
    // it leaves everything as it is (the holder enforces); a claim that
    // cannot be made at all fails the start like any other error.
    let _instance = match claim(&[&pin_dir, &state_dir, &socket], instance::WAIT) {
        Ok(instance) => instance,
        Err(e @ ClaimError::Held { .. }) => return Err(e.into()),
        Err(e) => return Err(fail_closed(config.fallback, &fallback_ssh, e.into())),
    };
    let result = runtime.block_on(run(
        config,
        args.config,
        store,
        pin_dir,
        socket,
        fallback_ssh,
    ));
    drop(runtime);
    result
}

/// This daemon's claim on `paths` (see [`Instance`]), waiting up to `wait`
/// for a holder to go away.
fn claim(paths: &[&Path], wait: std::time::Duration) -> Result<Instance, ClaimError> {
    Instance::claim(paths, Path::new(instance::LOCK_DIR), wait)
}

/// `--generate-man DIR`: this program's man page (packaging).
fn generate_man(dir: &Path) -> anyhow::Result<()> {
    use clap::CommandFactory as _;
    let mut page = Vec::new();
    clap_mangen::Man::new(Args::command())
        .section("8")
        .render(&mut page)?;
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("portcullisd.8"), page)?;
    Ok(())
}

/// `--check-config`: the file parses and its rules pass the API's checks;
/// SSH turned off is warned about.
fn check_config(path: &Path, config: &Config) -> anyhow::Result<()> {
    // The effective rules (a saved rules file replaces the file's).
    let rules = config.rule_set();
    rules
        .check_additions(&portcullis::rules::RuleSet::default())
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    for warning in rules
        .egress_warnings()
        .into_iter()
        .chain(config.dns.warnings())
    {
        eprintln!("{}: warning: {warning}", path.display());
    }
    if !rules.ssh.allow {
        eprintln!(
            "{}: warning: [ssh] allow is off: new SSH logins are dropped unless a rule admits port(s) {:?}",
            path.display(),
            rules.ssh.ports
        );
    }
    println!("{}: ok", path.display());
    Ok(())
}

/// `--detach`: every pinned link removed (stop enforcing).
async fn detach(pin_dir: &Path) -> anyhow::Result<()> {
    // Every link: in automatic mode the config names none.
    let (connection, handle, _) = rtnetlink::new_connection()?;
    tokio::spawn(connection);
    let names: Vec<String> = links::list(&handle)
        .await?
        .into_iter()
        .map(|l| l.name)
        .collect();
    let n = dataplane::detach_all(pin_dir, &names)?;
    info!(links = n, pin_dir = %pin_dir.display(), "detached; inbound traffic is no longer filtered");
    Ok(())
}

/// The daemon from start to exit, on what `main` resolved and claimed:
/// `fallback_ssh` is the SSH exemption the fallback keeps if enforcement
/// cannot come up.
async fn run(
    config: Config,
    config_path: PathBuf,
    store: state::Store,
    pin_dir: PathBuf,
    socket: PathBuf,
    fallback_ssh: Ssh,
) -> anyhow::Result<()> {
    let signals = Signals::new()?;
    let state_dir = store.dir().to_owned();
    let (core, links, pending) = match start(&config, &pin_dir, &config_path, store).await {
        Ok(started) => started,
        Err(e) => {
            return Err(fail_closed_with(
                config.fallback,
                &fallback_ssh,
                e,
                Some(&pin_dir),
            ));
        }
    };
    // systemd's soft limit is 1024: take the hard limit, and bound what
    // unprivileged API clients may hold below it.
    let fd_limit = api::raise_fd_limit();
    let (generation, summary) = (core.generation(), core.protection_summary());
    for warning in core.packed_rules().egress_warnings() {
        warn!(generation, "{warning}");
    }
    let core: core::Shared = Arc::new(Mutex::new(core));
    if let Some((generation, secs)) = pending {
        warn!(
            generation,
            secs, "a change awaits confirmation; it is rolled back unless confirmed in time"
        );
        core::arm_rollback(core.clone(), generation, secs);
    }
    let services = spawn_services(&config, &socket, core.clone()).await?;
    info!(pin_dir = %pin_dir.display(), socket = %socket.display(), generation, fd_limit, status = %summary, "ready");
    // Tell systemd (Type=notify) that the host is protected.
    if let Err(e) = sd_notify::notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&summary),
    ]) {
        warn!(error = %e, "cannot notify the service manager");
    }
    // Membership from etcd: followed in the background, never waited for.
    if let Some(fleet) = &config.fleet
        && let Err(e) = portcullis::fleet::spawn(fleet.clone(), core.clone(), state_dir).await
    {
        error!(error = %format!("{e:#}"), "fleet: etcd cannot be followed; the live peers stay");
    }
    let result = event_loop(signals, &core, services, links).await;
    let _ = std::fs::remove_file(&socket);
    if result.is_ok() {
        info!("exiting; enforcement stays pinned (portcullisd --detach removes it)");
    }
    result
}

/// The signals the daemon acts on.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Self> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }
}

/// What the daemon serves once enforcing: the API and its server task.
struct Services {
    api: api::Api,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// Starts the services around the core: the drop-event feed, systemd's
/// view over D-Bus, the optional health endpoint and the API socket.
async fn spawn_services(
    config: &Config,
    socket: &Path,
    core: core::Shared,
) -> anyhow::Result<Services> {
    let writers_gid = config.api.writers_gid()?;
    let readers_gid = config.api.readers_gid()?;
    let (ring, names) = {
        let mut core = core.lock().await;
        (core.take_events()?, core.deny_set_names())
    };
    let feed = portcullis::events::Feed::naming_deny_sets(names);
    tokio::spawn({
        let feed = feed.clone();
        async move {
            if let Err(e) = feed.run(ring).await {
                error!(error = %format!("{e:#}"), "drop events are no longer read");
            }
        }
    });
    tokio::spawn(portcullis::droplog::run(
        feed.clone(),
        config.drop_log.clone(),
        core.clone(),
    ));
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
        core,
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
    tokio::spawn(sweep_deny_sets(api.core.clone()));
    spawn_forwarder(config, api.core.clone()).await;
    if config.egress_volume.enabled {
        tokio::spawn(read_egress_volume(api.clone()));
    }
    if let Some(cs) = config.crowdsec.clone() {
        tokio::spawn(portcullis::bouncer::run(cs, api.core.clone()));
    }
    let listener = api::bind(socket, readers_gid.or(writers_gid))?;
    let server = tokio::spawn(api::serve(listener, api.clone()));
    Ok(Services { api, server })
}

/// The DNS forwarder for FQDN egress rules, when wanted (`[dns]`), and
/// the sweep of its expired destinations. A forwarder that cannot listen
/// is an error in the journal: names then admit nothing (closed).
async fn spawn_forwarder(config: &Config, core: core::Shared) {
    let has_names = core.lock().await.packed_rules().has_names();
    if !config.dns.wanted(has_names) {
        return;
    }
    let upstreams = match config.dns.upstream_addrs() {
        Ok(u) => u,
        Err(e) => return error!(error = %format!("{e:#}"), "dns forwarder not started"),
    };
    for warning in config.dns.warnings() {
        warn!("{warning}");
    }
    let listeners = match forwarder::listeners(config.dns.listen) {
        Ok(l) => l,
        Err(e) => {
            let why = forwarder_error(&e);
            error!(error = %why, "dns forwarder not started: names admit nothing");
            core.lock().await.dns = Some(portcullis::core::fqdn::DnsStatus {
                listen: config.dns.listen.to_string(),
                upstreams: upstreams.iter().map(ToString::to_string).collect(),
                error: Some(why),
                ..Default::default()
            });
            return;
        }
    };
    if let Err(e) = core.lock().await.dns_upstreams(&upstreams) {
        // Closed: the forwarder's queries are then dropped (SERVFAIL).
        error!(error = %format!("{e:#}"), "cannot write the forwarder's upstreams into the data path");
    }
    let listen = listeners.udp.local_addr().unwrap_or(config.dns.listen);
    info!(listen = %listen, socket_activated = listeners.activated, upstreams = ?upstreams, "dns forwarder");
    core.lock().await.dns = Some(portcullis::core::fqdn::DnsStatus {
        listen: listen.to_string(),
        upstreams: upstreams.iter().map(ToString::to_string).collect(),
        socket_activated: listeners.activated,
        ..Default::default()
    });
    let settings = forwarder::Settings {
        upstreams,
        ttl_floor: config.dns.ttl_floor,
        ttl_max: config.dns.ttl_max,
    };
    tokio::spawn({
        let core = core.clone();
        async move {
            if let Err(e) = forwarder::run(core, settings, listeners).await {
                error!(error = %format!("{e:#}"), "dns forwarder stopped");
            }
        }
    });
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(2));
        loop {
            tick.tick().await;
            if let Err(e) = core.lock().await.fqdn_sweep() {
                error!(error = %format!("{e:#}"), "cannot sweep the learned destinations");
            }
        }
    });
}

/// Why the forwarder cannot listen, and, when it lacks the privilege to
/// bind (the shipped unit grants no CAP_NET_BIND_SERVICE), what to install.
fn forwarder_error(e: &anyhow::Error) -> String {
    let denied = e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::PermissionDenied)
    });
    if denied {
        format!(
            "{e:#}: under the shipped unit, systemd must hold the forwarder's sockets: enable \
             portcullis-dns.socket with the drop-in in /usr/share/doc/portcullis/examples/dns/ \
             (docs/egress-fqdn.md)"
        )
    } else {
        format!("{e:#}")
    }
}

/// Removes expired deny-set entries every second (the data path ignores
/// them from their expiry on; this frees them and saves the sets), and
/// expired rules (`Core::expire_rules`: removed, audited, their flows cut);
/// then frees what the last change left and returns the heap to the
/// system, without the core held and off the event loop.
async fn sweep_deny_sets(core: core::Shared) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tick.tick().await;
        let garbage = {
            let mut core = core.lock().await;
            if let Err(e) = core.deny_sweep() {
                error!(error = %e, "deny sets: cannot remove expired entries");
            }
            if let Err(e) = core.expire_rules() {
                error!(error = %e, "cannot remove expired rules; retrying");
            }
            core.take_garbage()
        };
        if garbage.is_empty() {
            continue;
        }
        if let Err(e) = tokio::task::spawn_blocking(move || garbage.release()).await {
            error!(error = %e, "freeing the last change's memory failed");
        }
    }
}

/// Reads egress volume every few seconds: frees idle entries of the data
/// path's table and raises alerts (the status request reads it too).
async fn read_egress_volume(api: api::Api) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
    loop {
        tick.tick().await;
        api::read_volume(&api, &mut *api.core.lock().await);
    }
}

/// Runs until SIGTERM or SIGINT: readiness kept in `STATUS=` and the
/// watchdog fed, reloads on SIGHUP, new and removed interfaces followed.
async fn event_loop(
    mut signals: Signals,
    core: &core::Shared,
    mut services: Services,
    mut links: LinkWatch,
) -> anyhow::Result<()> {
    // Readiness, re-evaluated every second and on every change systemd
    // reports: kept in STATUS= and logged when it changes.
    let mut recheck = tokio::time::interval(std::time::Duration::from_secs(1));
    let mut systemd_changes = services.api.readiness.systemd();
    let mut last_summary = String::new();
    let mut watchdog = tokio::time::interval(
        sd_notify::watchdog_enabled().map_or(std::time::Duration::from_secs(3600), |d| d / 2),
    );
    loop {
        tokio::select! {
            _ = signals.term.recv() => { info!("SIGTERM"); return Ok(()); }
            _ = signals.int.recv() => { info!("SIGINT"); return Ok(()); }
            _ = recheck.tick() => report_readiness(&services.api, &mut last_summary).await,
            _ = systemd_changes.changed() => report_readiness(&services.api, &mut last_summary).await,
            _ = watchdog.tick() => {
                if sd_notify::watchdog_enabled().is_some() {
                    let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                }
            }
            _ = signals.hup.recv() => reload_on_hangup(core).await,
            event = links.events.next() => {
                let Some((message, _)) = event else {
                    anyhow::bail!("the rtnetlink event stream ended");
                };
                links.handle(core, message).await;
            }
            stopped = &mut services.server => {
                // The data path stays pinned; the service manager restarts us.
                return match stopped {
                    Ok(Err(e)) => Err(e.context("the API server stopped")),
                    _ => Err(anyhow::anyhow!("the API server stopped")),
                };
            }
        }
    }
}

/// SIGHUP: the same reload as `portcullis reload` (`POST /v1/reload`),
/// without discarding runtime changes; the core logs the outcome.
async fn reload_on_hangup(core: &core::Shared) {
    let mut core = core.lock().await;
    core.acting(core::Actor {
        action: "reload".into(),
        ..Default::default()
    });
    let result = core.reload_file(&core::ReloadOptions::default());
    core.acting(core::Actor::default());
    let outcome = match &result {
        Ok(r) if r.changes.is_empty() => "applied: no change".to_string(),
        Ok(r) => format!("applied: {}", r.changes.join(" ")),
        Err(e) => format!("refused: {e}"),
    };
    if let Err(e) = core.record(None, None, "reload", outcome) {
        error!(error = %format!("{e:#}"), "cannot write the audit log");
    }
}

type LinkEvents = futures::channel::mpsc::UnboundedReceiver<(
    netlink_packet_core::NetlinkMessage<RouteNetlinkMessage>,
    netlink_sys::SocketAddr,
)>;

/// The interfaces to protect, followed as links appear and go.
struct LinkWatch {
    handle: rtnetlink::Handle,
    events: LinkEvents,
    protected: HashSet<String>,
    selector: links::Selector,
    tc_attach: TcAttachMode,
}

impl LinkWatch {
    /// A new link the selection wants is protected; a protected link that
    /// goes away is forgotten.
    async fn handle(
        &mut self,
        core: &core::Shared,
        message: netlink_packet_core::NetlinkMessage<RouteNetlinkMessage>,
    ) {
        match message.payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(msg)) => {
                let Some(link) = links::Link::from_message(&msg) else {
                    return;
                };
                if self.protected.contains(&link.name) || !self.selector.wants(&link) {
                    return;
                }
                // A failure here leaves other interfaces protected; say
                // which interface is open and keep running.
                let mut core = core.lock().await;
                match core.protect(&link.name, self.tc_attach) {
                    Ok(how) => {
                        let mode = xdp_mode(&self.handle, &link.name).await;
                        info!(interface = %link.name, attach = ?how, xdp_mode = %mode, "enforcing");
                        core.protected_as(&link.name, mode);
                        self.protected.insert(link.name);
                    }
                    Err(e) => {
                        error!(interface = %link.name, error = %format!("{e:#}"), "cannot protect new interface")
                    }
                }
            }
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(msg)) => {
                if let Some(link) = links::Link::from_message(&msg)
                    && self.protected.remove(&link.name)
                {
                    core.lock().await.interface_gone(&link.name);
                    info!(interface = %link.name, "interface removed");
                }
            }
            _ => {}
        }
    }
}

/// Subscribes to link events, then lists the links to protect now (in
/// that order, so none is missed).
async fn subscribe_links(
    selector: &links::Selector,
) -> anyhow::Result<(rtnetlink::Handle, LinkEvents, Vec<String>)> {
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
    Ok((handle, link_events, targets))
}

/// The live set to start with: what was live before a restart (and
/// whether it was restored), else the config file's rules.
fn live_rules(
    store: &state::Store,
    config: &Config,
    config_path: &Path,
) -> anyhow::Result<(RuleSet, u64, bool)> {
    Ok(match store.load()? {
        Some(restored) => {
            info!(generation = restored.generation, state_dir = %store.dir().display(), "restored the live rule set");
            if restored.rules != config.rule_set() {
                warn!(config = %config_path.display(), "the config file differs from the live rule set; `portcullis reload` (or SIGHUP) applies it");
            }
            (restored.rules, restored.generation, true)
        }
        None => (config.rule_set(), 1, false),
    })
}

/// Loads the data path into `pin_dir`, refusing a pin directory someone
/// else made (checked before anything is pinned there, and again once the
/// directories exist: someone may have made one in between).
fn load_dataplane(
    config: &Config,
    pin_dir: &Path,
    limits: &portcullis::compile::Limits,
) -> anyhow::Result<Dataplane> {
    let pin_dirs = [
        pin_dir.join("links"),
        pin_dir.join("programs"),
        dataplane::maps_dir(pin_dir),
    ];
    portcullis::host::secure_pin_dirs(pin_dir, &pin_dirs)?;
    let mut dataplane = Dataplane::load_with_deny(
        pin_dir,
        config.conntrack_entries,
        limits,
        config.xdp_program,
        [
            config.capacity.deny_v4_prefixes,
            config.capacity.deny_v6_prefixes,
        ],
    )
    .context("loading the eBPF data path")?;
    portcullis::host::secure_pin_dirs(pin_dir, &pin_dirs)?;
    dataplane.rate_limit = config.rate_limit.clone();
    Ok(dataplane)
}

/// Everything up to enforcement, in order: rules live, egress attached,
/// open connections seeded, ingress attached. Any error here means the host
/// is not (fully) protected: the caller applies the fallback. Returns the
/// core, the link watch and a change awaiting confirmation (its generation
/// and seconds left).
async fn start(
    config: &Config,
    pin_dir: &Path,
    config_path: &Path,
    store: state::Store,
) -> anyhow::Result<(Core, LinkWatch, Option<(u64, u64)>)> {
    let selector = config.selector()?;
    // Checked before anything is attached: a missing group fails the start.
    config.api.writers_gid()?;
    config.api.readers_gid()?;
    let (handle, events, targets) = subscribe_links(&selector).await?;
    let t = std::time::Instant::now();
    debug!(interfaces = targets.len(), "links subscribed");
    let (rules, generation, restored) = live_rules(&store, config, config_path)?;
    debug!(
        ms = t.elapsed().as_secs_f64() * 1e3,
        restored, "live rule set chosen"
    );
    let bootstrapped = bootstrap(config, pin_dir, &targets, &handle).await;
    test_delay_full_load().await;
    let limits = config.capacity.limits();
    let mut dataplane = load_dataplane(config, pin_dir, &limits)?;
    dataplane.egress_volume = config.egress_volume.enabled;
    info!(
        program = dataplane.ingress_program(),
        adopted = dataplane.programs_adopted(),
        clock = %dataplane.clock(),
        ms = t.elapsed().as_secs_f64() * 1e3,
        "XDP ingress program loaded"
    );
    // Rules first: a new ingress link never runs on empty maps.
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
    core.configured(config_path, config.clone(), restored)?;
    let volume = &config.egress_volume;
    core.volume_configure(volume.enabled.then(|| volume.settings()));
    info!(generation, hash = core.hash(), "rules live");
    // Bans before any new link: a restart keeps every saved ban in force.
    let bans = core.restore_deny().context("restoring the deny sets")?;
    info!(entries = bans, "deny sets restored");
    let protected = protect_all(
        &mut core,
        &targets,
        &handle,
        config.tc_attach,
        &bootstrapped,
    )
    .await?;
    // A change that awaited confirmation when we stopped: roll it back now
    // if its time is up, else keep waiting for it.
    core.restore_pending()?;
    core.restore_mode()?;
    // Rules that expired while the daemon was down go now (after the
    // connections were seeded, so their flows are cut too).
    match core.expire_rules() {
        Ok(gone) if !gone.is_empty() => info!(rules = %gone.join(", "), "removed expired rules"),
        Ok(_) => {}
        Err(e) => error!(error = %e, "cannot remove expired rules yet; retrying"),
    }
    let pending = core.pending_remaining();
    enforcing_everywhere(pin_dir, &targets)?;
    let links = LinkWatch {
        handle,
        events,
        protected,
        selector,
        tc_attach: config.tc_attach,
    };
    Ok((core, links, pending))
}

/// Every target runs this version's full program: what only served until
/// then goes (the nftables fallback of a failed start, the bootstrap filter
/// on an interface no longer configured, the maps of older layouts).
fn enforcing_everywhere(pin_dir: &Path, targets: &[String]) -> anyhow::Result<()> {
    if fallback::remove() {
        info!(
            table = fallback::TABLE,
            "the data path enforces again: removed the nftables fallback"
        );
    }
    // A bootstrap pinned under a name that is no longer a target (renamed,
    // removed from the configuration) would hold its interface closed, and
    // make a later attach there fail (EBUSY).
    match dataplane::remove_bootstraps(pin_dir, targets) {
        Ok(gone) if !gone.is_empty() => {
            warn!(interfaces = %gone.join(", "), "bootstrap filter removed from interfaces that are not targets");
        }
        Ok(_) => {}
        Err(e) => {
            warn!(error = %format!("{e:#}"), "cannot check for bootstrap filters on interfaces that are not targets")
        }
    }
    // Maps of older layouts have no users left.
    for old in dataplane::remove_old_layouts(pin_dir)? {
        info!(maps = %old.display(), "removed the maps of an older layout");
    }
    Ok(())
}

/// Protects `targets`: egress first, so flows opened from now on are
/// recorded; then the connections that already exist; only then the
/// ingress filter.
async fn protect_all(
    core: &mut Core,
    targets: &[String],
    handle: &rtnetlink::Handle,
    tc_attach: TcAttachMode,
    bootstrapped: &[String],
) -> anyhow::Result<HashSet<String>> {
    for ifname in targets {
        let how = core
            .record_outbound(ifname, tc_attach)
            .with_context(|| format!("interface {ifname}"))?;
        info!(interface = %ifname, attach = ?how, "recording outbound flows");
    }
    let (connections, seeded) = core
        .seed_open_connections()
        .context("listing open connections")?;
    info!(connections, seeded, "connection table seeded");
    let mut protected = HashSet::new();
    for ifname in targets {
        let how = core
            .enforce_on(ifname)
            .with_context(|| format!("interface {ifname}"))?;
        let mode = xdp_mode(handle, ifname).await;
        let replaced_bootstrap = bootstrapped.contains(ifname);
        info!(interface = %ifname, attach = ?how, xdp_mode = %mode, replaced_bootstrap, "enforcing");
        core.protected_as(ifname, mode);
        protected.insert(ifname.clone());
    }
    Ok(protected)
}

/// A fresh start (no ingress link pinned for an interface): the bootstrap
/// filter (`dataplane::Bootstrap`: ARP and neighbour discovery only) on
/// each such interface at once, before the full programs are verified; the
/// full program replaces it under the same link. Returns the interfaces it
/// went on. A failure is logged and the start goes on as without it: the
/// full program attaches once verified.
async fn bootstrap(
    config: &Config,
    pin_dir: &Path,
    targets: &[String],
    handle: &rtnetlink::Handle,
) -> Vec<String> {
    let mut done = Vec::new();
    match dataplane::repin_renamed_bootstraps(pin_dir, targets) {
        Ok(moved) => {
            for (old, new) in moved {
                info!(from = %old, to = %new, "bootstrap link of a renamed interface pinned under its new name");
            }
        }
        Err(e) => {
            warn!(error = %format!("{e:#}"), "cannot check for bootstrap links of renamed interfaces")
        }
    }
    if !dataplane::Bootstrap::needed(pin_dir, targets) {
        return done;
    }
    // Checked before anything is pinned there (again by `load_dataplane`).
    if let Err(e) = portcullis::host::secure_pin_dirs(pin_dir, &[pin_dir.join("links")]) {
        warn!(error = %format!("{e:#}"), "no bootstrap filter");
        return done;
    }
    let mut boot = match dataplane::Bootstrap::load(config.xdp_program) {
        Ok(boot) => boot,
        Err(e) => {
            warn!(error = %format!("{e:#}"), "no bootstrap filter; interfaces are filtered once the full program is verified");
            return done;
        }
    };
    for ifname in targets {
        match boot.attach(pin_dir, ifname) {
            Ok(true) => {
                let mode = xdp_mode(handle, ifname).await;
                info!(interface = %ifname, program = boot.program(), xdp_mode = %mode, passes = "ARP, neighbour discovery", "bootstrap enforcing");
                done.push(ifname.clone());
            }
            Ok(false) => {}
            Err(e) => {
                warn!(interface = %ifname, error = %format!("{e:#}"), "no bootstrap filter on this interface");
            }
        }
    }
    if !done.is_empty() {
        let status = format!(
            "starting: bootstrap filter on {} (inbound: ARP and neighbour discovery only) while the full programs are verified",
            done.join(", ")
        );
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(&status)]);
    }
    done
}

/// TEST ONLY, debug builds only: `PORTCULLIS_TEST_DELAY_FULL_LOAD_MS`
/// delays the full programs' load (at most 30 s) so a test can watch the
/// bootstrap window. It only delays: nothing attaches or passes that would
/// not without it. Release builds ignore it. An async sleep: the runtime
/// is single-threaded, and the rtnetlink connection task runs on it.
async fn test_delay_full_load() {
    if !cfg!(debug_assertions) {
        return;
    }
    let Some(ms) = std::env::var("PORTCULLIS_TEST_DELAY_FULL_LOAD_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    else {
        return;
    };
    warn!(ms, "test knob: delaying the full programs' load");
    tokio::time::sleep(std::time::Duration::from_millis(ms.min(30_000))).await;
}

/// The last live rule set's SSH exemption, if one can be read.
fn last_live_ssh(store: &state::Store) -> Option<Ssh> {
    store.load().ok().flatten().map(|r| r.rules.ssh)
}

/// Enforcement cannot come up: say so loudly and, unless configured off,
/// put the nftables fallback in place before failing. Every exit before
/// enforcement goes through here.
fn fail_closed(fallback: Fallback, ssh: &Ssh, e: anyhow::Error) -> anyhow::Error {
    fail_closed_with(fallback, ssh, e, None)
}

/// A failed start with the nftables fallback in place: the bootstrap
/// filter goes, so the fallback (which admits SSH) governs the interfaces
/// as it did before the bootstrap existed. Without the fallback in place
/// the bootstrap stays (closed).
fn remove_bootstraps(pin_dir: &Path) {
    match dataplane::remove_bootstraps(pin_dir, &[]) {
        Ok(gone) if !gone.is_empty() => {
            warn!(interfaces = %gone.join(", "), "bootstrap filter removed: the nftables fallback governs");
        }
        Ok(_) => {}
        Err(e) => error!(error = %format!("{e:#}"), "cannot remove the bootstrap filter"),
    }
}

/// [`fail_closed`]; with the pin directory (`pin_dir`), the bootstrap
/// filter is removed once the fallback is in place, and what is said names
/// the interfaces it still holds.
fn fail_closed_with(
    fallback: Fallback,
    ssh: &Ssh,
    e: anyhow::Error,
    pin_dir: Option<&Path>,
) -> anyhow::Error {
    error!(error = %format!("{e:#}"), "enforcement cannot start: the host is NOT protected by Portcullis");
    let in_place = match fallback {
        Fallback::Nftables => match fallback::apply(ssh) {
            Ok(()) => {
                warn!(
                    table = fallback::TABLE,
                    ssh_ports = ?ssh.ports,
                    "nftables fallback in place: inbound denied except SSH and established flows"
                );
                true
            }
            Err(fe) => {
                error!(error = %format!("{fe:#}"), "the nftables fallback failed too");
                false
            }
        },
        Fallback::None => false,
    };
    if in_place && let Some(pin_dir) = pin_dir {
        remove_bootstraps(pin_dir);
    }
    let held = pin_dir.map(bootstraps_left).unwrap_or_default();
    let status = failed_status(fallback, in_place, &held);
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(&status)]);
    e
}

/// The interfaces the bootstrap filter still holds after a failed start.
fn bootstraps_left(pin_dir: &Path) -> Vec<String> {
    dataplane::bootstrap_interfaces(pin_dir).unwrap_or_else(|e| {
        warn!(error = %format!("{e:#}"), "cannot tell which interfaces carry the bootstrap filter");
        Vec::new()
    })
}

/// Logs what a failed start leaves (the fallback, the bootstrap filter on
/// `held`, or nothing: OPEN) and returns it as systemd's `STATUS=`.
fn failed_status(fallback: Fallback, in_place: bool, held: &[String]) -> String {
    let why = match fallback {
        Fallback::Nftables => "the fallback failed",
        Fallback::None => "fallback none",
    };
    let boot = format!(
        "the bootstrap filter on {} passes only ARP and neighbour discovery (no SSH) until a daemon starts or `portcullisd --detach` removes it",
        held.join(", ")
    );
    match (in_place, held.is_empty()) {
        (true, true) => {
            "FAILED: Portcullis cannot enforce; the nftables fallback denies inbound except SSH"
                .to_owned()
        }
        (true, false) => {
            error!(interfaces = %held.join(", "), "the bootstrap filter stays on these interfaces: the fallback's SSH exemption does not reach them");
            format!(
                "FAILED: Portcullis cannot enforce; the nftables fallback denies inbound except SSH; {boot}"
            )
        }
        (false, true) => {
            error!("{why}: the host is OPEN until the daemon starts");
            format!("FAILED: Portcullis cannot enforce ({why}): the host is OPEN")
        }
        (false, false) => {
            error!(interfaces = %held.join(", "), "{why}: {boot}; an interface without a pinned link is OPEN");
            format!(
                "FAILED: Portcullis cannot enforce ({why}); {boot}; an interface without a pinned link is OPEN"
            )
        }
    }
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
