//! `portcullis deny`: deny sets through `/v1/deny/{set}`. A set file is
//! read and checked here, whole, before anything is sent.

use anyhow::Context as _;
use hyper::Method;
use portcullis::{
    api::{DenyEntries, DenyItem, DenyRemoval},
    client::path_segment,
    core::{DenyChanged, DenySetView},
    denylist,
};

use crate::{Ctx, args::DenyCmd, output::table};

/// Largest set file read (a million IPv6 prefixes with comments fit).
const MAX_FILE: u64 = 256 << 20;

pub fn deny(ctx: &Ctx, cmd: DenyCmd) -> anyhow::Result<()> {
    match cmd {
        DenyCmd::Add {
            set,
            prefixes,
            expires,
        } => {
            let entries = items(prefixes.iter().map(String::as_str), expires.as_deref())?;
            send(ctx, Method::POST, &set, &DenyEntries { entries })
        }
        DenyCmd::Remove { set, prefixes } => {
            for p in &prefixes {
                denylist::parse_prefix(p).map_err(anyhow::Error::msg)?;
            }
            let body = DenyRemoval {
                prefixes,
                all: false,
            };
            send(ctx, Method::DELETE, &set, &body)
        }
        DenyCmd::Flush { set } => {
            let body = DenyRemoval {
                prefixes: Vec::new(),
                all: true,
            };
            send(ctx, Method::DELETE, &set, &body)
        }
        DenyCmd::List { set: None, .. } => {
            let (sets, reply): (Vec<DenySetView>, _) =
                ctx.send::<(), _>(Method::GET, "/v1/deny", None)?;
            ctx.print(&reply, || {
                if sets.is_empty() {
                    return "No deny sets.".to_string();
                }
                let rows: Vec<Vec<String>> = sets
                    .iter()
                    .map(|s| {
                        vec![
                            s.set.clone(),
                            s.count.to_string(),
                            s.dropped_packets.to_string(),
                        ]
                    })
                    .collect();
                table(&["SET", "ENTRIES", "DROPPED"], &rows, &[1, 2])
            })
        }
        DenyCmd::List {
            set: Some(set),
            count,
        } => list(ctx, &set, count),
        DenyCmd::Load {
            set,
            file,
            add,
            expires,
        } => load(ctx, &set, &file, add, expires.as_deref()),
        DenyCmd::Other(args) => anyhow::bail!(
            "`portcullis deny {}` is not supported yet: there are no port deny rules (everything \
             no rule admits is dropped already; to stop admitting a port, remove the rule that \
             admits it: portcullis rules list, then portcullis rules remove N). To ban sources: \
             portcullis deny add SET CIDR [--expires 1h]",
            args.join(" ")
        ),
    }
}

fn items<'a>(
    prefixes: impl Iterator<Item = &'a str>,
    expires: Option<&str>,
) -> anyhow::Result<Vec<DenyItem>> {
    let expires_in = expires
        .map(denylist::parse_duration)
        .transpose()
        .map_err(|e| anyhow::anyhow!("--expires: {e}"))?;
    prefixes
        .map(|p| {
            let net = denylist::parse_prefix(p).map_err(anyhow::Error::msg)?;
            Ok(DenyItem {
                prefix: net.to_string(),
                expires_in,
            })
        })
        .collect()
}

fn send<B: serde::Serialize>(ctx: &Ctx, method: Method, set: &str, body: &B) -> anyhow::Result<()> {
    denylist::check_name(set).map_err(anyhow::Error::msg)?;
    let path = format!("/v1/deny/{}", path_segment(set));
    let (c, reply): (DenyChanged, _) = ctx.send(method, &path, Some(body))?;
    ctx.print(&reply, || sentence(&c))
}

fn sentence(c: &DenyChanged) -> String {
    let mut s = format!(
        "Deny set {}: {} added, {} removed; {} entries now.",
        c.set, c.added, c.removed, c.entries
    );
    if c.flows_cut > 0 {
        s.push_str(&format!(
            " Cut {} open flows of banned sources.",
            c.flows_cut
        ));
    }
    if !c.admin_exempt.is_empty() {
        s.push_str(&format!(
            " Not applied to the admin network (it bypasses every ban): {}.",
            c.admin_exempt.join(", ")
        ));
    }
    s
}

fn list(ctx: &Ctx, set: &str, count: bool) -> anyhow::Result<()> {
    denylist::check_name(set).map_err(anyhow::Error::msg)?;
    let path = format!(
        "/v1/deny/{}{}",
        path_segment(set),
        if count { "?count_only=true" } else { "" }
    );
    let (v, reply): (DenySetView, _) = ctx.send::<(), _>(Method::GET, &path, None)?;
    ctx.print(&reply, || {
        let head = format!(
            "Deny set {} (id {}): {} entries, {} packets dropped.",
            v.set, v.id, v.count, v.dropped_packets
        );
        if count || v.entries.is_empty() {
            return head;
        }
        let now = portcullis::model::unix_now();
        let rows: Vec<Vec<String>> = v
            .entries
            .iter()
            .map(|e| {
                let left = e.expires.map_or("never".to_string(), |t| {
                    format!("in {} s", t.saturating_sub(now))
                });
                vec![e.prefix.clone(), left]
            })
            .collect();
        format!("{head}\n{}", table(&["PREFIX", "EXPIRES"], &rows, &[]))
    })
}

fn load(
    ctx: &Ctx,
    set: &str,
    file: &std::path::Path,
    add: bool,
    expires: Option<&str>,
) -> anyhow::Result<()> {
    use std::io::Read as _;
    let mut bytes = Vec::new();
    std::fs::File::open(file)
        .and_then(|f| f.take(MAX_FILE + 1).read_to_end(&mut bytes))
        .with_context(|| format!("cannot read {}", file.display()))?;
    anyhow::ensure!(
        bytes.len() as u64 <= MAX_FILE,
        "{}: larger than {MAX_FILE} bytes; nothing changed",
        file.display()
    );
    let prefixes = denylist::parse_file(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: {e}; nothing changed", file.display()))?;
    let text: Vec<String> = prefixes.iter().map(ToString::to_string).collect();
    let entries = items(text.iter().map(String::as_str), expires)?;
    let method = if add { Method::POST } else { Method::PUT };
    send(ctx, method, set, &DenyEntries { entries })
}
