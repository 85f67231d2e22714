//! `watch`: drops as they happen, with local times, filtered.

use std::io::Write as _;

use portcullis::{api::Status, events::Event};

use crate::{
    Ctx,
    args::WatchArgs,
    output::{describe_drop, local_time},
};

/// What `watch` shows.
struct Filter {
    port: Option<u16>,
    reason: Option<String>,
    source: Option<ipnet::IpNet>,
    interface: Option<String>,
}

impl Filter {
    fn of(w: &WatchArgs) -> anyhow::Result<Filter> {
        let source = w
            .source
            .as_deref()
            .map(portcullis::rules::parse_cidr)
            .transpose()
            .map_err(|e| anyhow::anyhow!("--source: {e}"))?;
        if let Some(r) = &w.reason {
            let known = portcullis_common::Reason::ALL
                .iter()
                .any(|x| !x.passes() && x.name() == r);
            anyhow::ensure!(
                known,
                "--reason: {r:?} is not a drop reason (see `portcullis counters`)"
            );
        }
        Ok(Filter {
            port: w.port,
            reason: w.reason.clone(),
            source,
            interface: w.interface.clone(),
        })
    }

    fn admits(&self, e: &Event) -> bool {
        self.port
            .is_none_or(|p| e.source_port == p || e.destination_port == p)
            && self.reason.as_deref().is_none_or(|r| e.reason == r)
            && self.interface.as_deref().is_none_or(|i| e.interface == i)
            && self.source.is_none_or(|net| {
                e.source
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|a| net.contains(&a.to_canonical()))
            })
    }
}

pub fn watch(ctx: &Ctx, w: &WatchArgs) -> anyhow::Result<()> {
    let filter = Filter::of(w)?;
    if !ctx.json {
        // Which interfaces are watched (each event names its own).
        let interfaces = ctx
            .get::<Status>("/v1/status")
            .map(|(s, _)| s.interfaces.keys().cloned().collect::<Vec<_>>().join(", "))
            .unwrap_or_default();
        println!(
            "Drops on {} (sampled; Ctrl-C ends):",
            if interfaces.is_empty() {
                "no protected interface"
            } else {
                &interfaces
            }
        );
        let _ = std::io::stdout().flush();
    }
    let json = ctx.json;
    ctx.block_on(portcullis::client::follow(
        &ctx.socket,
        "/v1/events?follow=true",
        |line| {
            let Ok(e) = serde_json::from_str::<Event>(line) else {
                return;
            };
            if !filter.admits(&e) {
                return;
            }
            if json {
                println!("{line}");
            } else {
                println!(
                    "{} {}",
                    local_time(e.time_ms / 1000, Some(e.time_ms % 1000)),
                    describe_drop(&e)
                );
            }
            let _ = std::io::stdout().flush();
        },
    ))
}
