//! `portcullisd`: loads the data path onto the configured interfaces, writes
//! the policy, and stays in the foreground until SIGTERM or SIGINT. Enforcement
//! is pinned, so it continues after the daemon exits; `--detach` ends it.

use std::path::PathBuf;

use std::collections::HashSet;

use anyhow::Context as _;
use clap::Parser;
use futures::StreamExt as _;
use netlink_packet_core::NetlinkPayload;
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::AsyncSocket as _;
use portcullis::{
    compile,
    config::{Config, DEFAULT_CONFIG_PATH},
    dataplane::{self, Attach, Dataplane},
    links, sockets, state,
};
use tokio::signal::unix::{SignalKind, signal};
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
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let config = Config::load(&args.config)?;
    if args.check_config {
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
        let n = dataplane::detach_all(&config.pin_dir, &names)?;
        info!(links = n, pin_dir = %config.pin_dir.display(), "detached; inbound traffic is no longer filtered");
        return Ok(());
    }
    let state_dir = args
        .state_dir
        .or_else(|| config.state_dir.clone())
        .unwrap_or_else(|| PathBuf::from(state::DEFAULT_STATE_DIR));
    runtime.block_on(run(config, args.config, state::Store::new(&state_dir)))
}

async fn run(config: Config, config_path: PathBuf, store: state::Store) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let selector = config.selector()?;

    // Subscribe to link events before listing links, so none is missed.
    let (mut connection, handle, mut link_events) =
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

    let limits = config.capacity.limits();
    // The live set: what was live before a restart, else the config file.
    let (rules, mut generation) = match store.load()? {
        Some(restored) => {
            info!(generation = restored.generation, state_dir = %store.dir().display(), "restored the live rule set");
            if restored.rules != config.rule_set() {
                warn!(config = %config_path.display(), "the config file differs from the live rule set; send SIGHUP (reload) to apply it");
            }
            (restored.rules, restored.generation)
        }
        None => {
            let rules = config.rule_set();
            store.save(&rules, 1)?;
            (rules, 1)
        }
    };
    let image = compile::compile(&rules, &limits).context("compiling the rules")?;
    let mut dataplane = Dataplane::load(&config.pin_dir, config.conntrack_entries, &limits)?;
    // Rules first: a new ingress link never runs on empty maps. Then egress,
    // so flows opened from now on are recorded; then the connections that
    // already exist; only then the ingress filter.
    dataplane.apply(&image, config.allow_ping)?;
    info!(generation, rules = image.slots.len() - 1, hash = %image.hash, "rules live");
    for ifname in &targets {
        let how = dataplane
            .attach_egress(ifname, config.tc_attach)
            .with_context(|| format!("interface {ifname}"))?;
        info!(interface = %ifname, attach = ?how, "recording outbound flows");
    }
    let existing = sockets::connections().context("listing open connections")?;
    let seeded = dataplane.seed_connections(&existing)?;
    info!(
        connections = existing.len(),
        seeded, "connection table seeded"
    );
    let mut protected = HashSet::new();
    for ifname in &targets {
        let how = dataplane
            .attach_ingress(ifname)
            .with_context(|| format!("interface {ifname}"))?;
        report(&handle, ifname, how).await;
        protected.insert(ifname.clone());
    }
    info!(pin_dir = %config.pin_dir.display(), "ready");

    loop {
        tokio::select! {
            _ = term.recv() => { info!("SIGTERM"); break; }
            _ = int.recv() => { info!("SIGINT"); break; }
            _ = hup.recv() => {
                match reload(&config_path, &config, &store, &mut dataplane, generation + 1) {
                    Ok(()) => generation += 1,
                    Err(e) => error!(error = %format!("{e:#}"), "reload refused; the live rule set is unchanged"),
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
                        let result = dataplane
                            .attach_egress(&link.name, config.tc_attach)
                            .and_then(|_| dataplane.attach_ingress(&link.name));
                        match result {
                            Ok(how) => {
                                report(&handle, &link.name, how).await;
                                protected.insert(link.name);
                            }
                            Err(e) => error!(interface = %link.name, error = %format!("{e:#}"), "cannot protect new interface"),
                        }
                    }
                    NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(msg)) => {
                        if let Some(link) = links::Link::from_message(&msg)
                            && protected.remove(&link.name)
                        {
                            info!(interface = %link.name, "interface removed");
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    info!("exiting; enforcement stays pinned (portcullisd --detach removes it)");
    Ok(())
}

/// Re-reads the config file and makes its rule set live (SIGHUP). Only the
/// rules change: interfaces, pins and map sizes need a restart.
fn reload(
    path: &std::path::Path,
    running: &Config,
    store: &state::Store,
    dataplane: &mut Dataplane,
    generation: u64,
) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    let rules = config.rule_set();
    let image =
        compile::compile(&rules, &running.capacity.limits()).context("compiling the rules")?;
    store.save(&rules, generation)?;
    dataplane.apply(&image, config.allow_ping)?;
    info!(generation, rules = image.slots.len() - 1, hash = %image.hash, config = %path.display(), "reloaded: rules live");
    Ok(())
}

/// Logs that `ifname` is enforcing, with the XDP mode the kernel chose.
async fn report(handle: &rtnetlink::Handle, ifname: &str, how: Attach) {
    let mode = match links::get(handle, ifname).await {
        Ok(link) => link.xdp.as_str(),
        Err(_) => "unknown",
    };
    info!(interface = %ifname, attach = ?how, xdp_mode = %mode, "enforcing");
}
