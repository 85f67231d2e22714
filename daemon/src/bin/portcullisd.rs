//! `portcullisd`: loads the data path onto the configured interfaces, writes
//! the policy, and stays in the foreground until SIGTERM or SIGINT. Enforcement
//! is pinned, so it continues after the daemon exits; `--detach` ends it.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use portcullis::{
    config::{Config, DEFAULT_CONFIG_PATH},
    dataplane::{self, Dataplane, Policy},
    sockets,
};
use tokio::signal::unix::{SignalKind, signal};
use tracing::info;

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
    if args.detach {
        let n = dataplane::detach_all(&config.pin_dir, &config.interfaces)?;
        info!(links = n, pin_dir = %config.pin_dir.display(), "detached; inbound traffic is no longer filtered");
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(config))
}

async fn run(config: Config) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;

    let mut dataplane = Dataplane::load(&config.pin_dir, config.conntrack_entries)?;
    // Policy first: a new ingress link never runs on empty maps. Then egress,
    // so flows opened from now on are recorded; then the connections that
    // already exist; only then the ingress filter.
    dataplane.write_policy(&Policy::from_config(&config))?;
    for ifname in &config.interfaces {
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
    for ifname in &config.interfaces {
        let how = dataplane
            .attach_ingress(ifname)
            .with_context(|| format!("interface {ifname}"))?;
        info!(interface = %ifname, attach = ?how, "enforcing");
    }
    info!(pin_dir = %config.pin_dir.display(), "ready");

    tokio::select! {
        _ = term.recv() => info!("SIGTERM"),
        _ = int.recv() => info!("SIGINT"),
    }
    info!("exiting; enforcement stays pinned (portcullisd --detach removes it)");
    Ok(())
}
