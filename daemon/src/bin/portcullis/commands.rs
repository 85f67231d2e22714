//! The commands other than rules, deny sets, status and watch: modes,
//! peers, confirm, counters, the audit log, SSH keys, docs.

use std::io::Write as _;

use anyhow::Context as _;
use hyper::Method;
use portcullis::{
    api::{Confirmed, Counters, PeerList, Peers, Rules},
    core::{Changed, Mode},
};

use crate::{
    Ctx,
    args::{AuditCmd, Change, Command, LockdownArgs, ModeCmd, PeersCmd, RuleChange, SshCmd},
    output::{change_sentence, table},
};

/// Runs one command; its exit status.
pub fn dispatch(ctx: &Ctx, command: Command) -> anyhow::Result<i32> {
    match command {
        Command::Status { pin_dir } => return crate::status::status(ctx, &pin_dir),
        Command::WaitReady { timeout } => {
            return crate::status::wait_ready(ctx, std::time::Duration::from_secs(timeout));
        }
        Command::Allow(a) => crate::rulecmds::allow(ctx, a)?,
        Command::Deny(d) => crate::denycmds::deny(ctx, d)?,
        Command::Rules(r) => crate::rulecmds::rules(ctx, r)?,
        Command::Peers(p) => peers(ctx, p)?,
        Command::Counters { pin_dir } => counters(ctx, pin_dir)?,
        Command::Metrics => {
            let reply = ctx.call(Method::GET, "/v1/metrics", None)?;
            if !(200..300).contains(&reply.status) {
                reply.typed::<serde_json::Value>()?;
            }
            std::io::stdout().write_all(&reply.body)?;
        }
        Command::Confirm => {
            let (c, reply): (Confirmed, _) =
                ctx.send::<(), _>(Method::POST, "/v1/confirm", None)?;
            ctx.print(&reply, || {
                format!(
                    "Confirmed: generation {} stays; nothing will roll back.",
                    c.confirmed
                )
            })?;
        }
        Command::Reload {
            discard_runtime,
            change,
        } => reload(ctx, discard_runtime, &change)?,
        Command::Watch(w) => crate::watch::watch(ctx, &w)?,
        Command::Egress { policy, change } => crate::rulecmds::egress(ctx, &policy, &change)?,
        Command::Explain(e) => crate::explaincmd::explain(ctx, &e)?,
        Command::Ssh(SshCmd::AddKey { user, keys, file }) => add_keys(ctx, &user, keys, file)?,
        Command::Lockdown(l) => lockdown(ctx, &l)?,
        Command::Open(c) => set_mode(ctx, Mode::Open, &c)?,
        Command::Enforce(c) => set_mode(ctx, Mode::Enforce, &c)?,
        Command::Mode(ModeCmd::Enforce(c)) => set_mode(ctx, Mode::Enforce, &c)?,
        Command::Mode(ModeCmd::Audit(c)) => set_mode(ctx, Mode::Audit, &c)?,
        Command::Mode(ModeCmd::Open(c)) => set_mode(ctx, Mode::Open, &c)?,
        Command::Mode(ModeCmd::Lockdown(l)) => lockdown(ctx, &l)?,
        Command::AuditLog(a) | Command::Audit(a) => return audit_log(ctx, a),
        Command::GenerateDocs { dir } => generate_docs(&dir)?,
    }
    Ok(0)
}

/// `portcullis reload`: a synchronous reload; fails (non-zero) with the
/// daemon's reason when it is refused.
fn reload(ctx: &Ctx, discard_runtime: bool, change: &Change) -> anyhow::Result<()> {
    let change = ctx.change(change);
    anyhow::ensure!(
        change.confirm_within.is_none(),
        "--confirm-within: a reload has no confirmation window; use --dry-run to see what it would change"
    );
    let mut path = change_path("/v1/reload", &change, None);
    if discard_runtime {
        path.push(if path.contains('?') { '&' } else { '?' });
        path.push_str("discard_runtime=true");
    }
    let (r, reply): (portcullis::core::Reloaded, _) =
        ctx.send::<(), _>(Method::POST, &path, None)?;
    ctx.print(&reply, || {
        let what = if r.changes.is_empty() {
            "no change".to_string()
        } else {
            r.changes.join(" ")
        };
        let verb = if r.dry_run {
            "Dry run: would reload"
        } else {
            "Reloaded"
        };
        let mut out = format!("{verb} {}: {what} (generation {}).", r.config, r.generation);
        if !r.discarded.is_empty() {
            out.push_str(&format!(
                "\nIt discarded runtime changes: {}.",
                r.discarded.join(", ")
            ));
        }
        if !r.restart_needed.is_empty() {
            out.push_str(&format!(
                "\nNot applied, needs a restart (systemctl restart portcullis): {}.",
                r.restart_needed.join(", ")
            ));
        }
        out
    })
}

/// The path of a change request with its query: the change flags, the
/// expected generation, and our own SSH session.
pub fn change_path(path: &str, change: &Change, generation: Option<u64>) -> String {
    let mut q = Vec::new();
    if let Some(g) = generation {
        q.push(format!("expected_generation={g}"));
    }
    if change.dry_run {
        q.push("dry_run=true".into());
    }
    if change.force {
        q.push("force=true".into());
    }
    if let Some(s) = change.confirm_within {
        q.push(format!("confirm_within={s}"));
    }
    // Our own SSH session, so the daemon can refuse a change that cuts
    // it even where it cannot read our environment (the unit's
    // ProtectProc=invisible hides other users' processes from it).
    if let Some(session) = std::env::var("SSH_CONNECTION")
        .ok()
        .filter(|s| !s.is_empty())
    {
        q.push(format!(
            "ssh_session={}",
            portcullis::client::path_segment(&session)
        ));
    }
    if q.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{}", q.join("&"))
    }
}

/// Sends a change and prints its outcome: the sentences `done` / `would`,
/// or the daemon's document.
pub fn apply_change<B: serde::Serialize>(
    ctx: &Ctx,
    method: Method,
    path: &str,
    body: Option<&B>,
    (done, would): (&str, &str),
) -> anyhow::Result<Changed> {
    let (changed, reply): (Changed, _) = ctx.send(method, path, body)?;
    ctx.print(&reply, || change_sentence(done, would, &changed))?;
    Ok(changed)
}

fn set_mode(ctx: &Ctx, mode: Mode, change: &Change) -> anyhow::Result<()> {
    let change = ctx.change(change);
    let (done, would) = match &mode {
        Mode::Enforce => (
            "Mode enforce: what the rules do not admit is dropped".to_string(),
            "switch to enforce (drop what the rules do not admit)".to_string(),
        ),
        Mode::Audit => (
            "Mode audit: nothing is dropped; what would be is counted (portcullis counters)".into(),
            "switch to audit (nothing dropped, only counted)".into(),
        ),
        Mode::Open => (
            "Mode open: enforcement suspended, everything passes; `portcullis enforce` ends it"
                .into(),
            "suspend enforcement (everything passes)".into(),
        ),
        Mode::Lockdown { admin } => {
            let who = admin.as_deref().map_or_else(
                || "nobody (SSH blocked)".to_string(),
                |a| format!("SSH from {a} only"),
            );
            (
                format!("LOCKDOWN: nothing new gets in but {who}; `portcullis enforce` ends it"),
                format!("lock down (nothing new but {who})"),
            )
        }
    };
    apply_change(
        ctx,
        Method::PUT,
        &change_path("/v1/mode", &change, None),
        Some(&mode),
        (&done, &would),
    )?;
    Ok(())
}

fn lockdown(ctx: &Ctx, l: &LockdownArgs) -> anyhow::Result<()> {
    if l.no_admin {
        eprintln!(
            "lockdown without --admin: SSH is blocked from everywhere until `portcullis enforce` or a reboot"
        );
    }
    let mode = Mode::Lockdown {
        admin: l.admin.clone(),
    };
    set_mode(ctx, mode, &l.change)
}

fn peers(ctx: &Ctx, p: PeersCmd) -> anyhow::Result<()> {
    let (method, cidrs, cluster, change, verb) = match p {
        PeersCmd::List => {
            let (list, reply): (PeerList, _) = ctx.get("/v1/peers")?;
            return ctx.print(&reply, || {
                if list.peers.is_empty() {
                    format!("No peers (generation {}).", list.generation)
                } else {
                    format!(
                        "Cluster {} (generation {}), peers admitted on every port:\n  {}",
                        list.cluster,
                        list.generation,
                        list.peers.join("\n  ")
                    )
                }
            });
        }
        PeersCmd::Add {
            cidrs,
            cluster,
            change,
        } => (Method::POST, cidrs, cluster, change, "add"),
        PeersCmd::Remove { cidrs, change } => (Method::DELETE, cidrs, None, change, "remove"),
        PeersCmd::Replace {
            cidrs,
            cluster,
            change,
        } => (
            Method::PUT,
            cidrs,
            cluster,
            change,
            "replace the peers with",
        ),
    };
    let RuleChange {
        change,
        expect_generation,
    } = change;
    let change = ctx.change(&change);
    let list = cidrs.join(", ");
    let done = match verb {
        "add" => format!("Peers {list} added"),
        "remove" => format!("Peers {list} removed"),
        _ => format!("Peers replaced by {list}"),
    };
    apply_change(
        ctx,
        method,
        &change_path("/v1/peers", &change, expect_generation),
        Some(&Peers {
            peers: cidrs.clone(),
            cluster,
        }),
        (&done, &format!("{verb} {list}")),
    )?;
    Ok(())
}

/// `counters`: verdict reasons (passed or dropped, as the daemon says) and
/// the rules of the live set, aligned; rules removed since are left out.
fn counters(ctx: &Ctx, pin_dir: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    if let Some(dir) = pin_dir {
        let read = portcullis::dataplane::read_counters(&dir)?;
        if ctx.json {
            let reasons: serde_json::Map<_, _> = read
                .iter()
                .map(|(r, c)| {
                    let doc = serde_json::json!({ "packets": c.packets, "bytes": c.bytes, "passes": r.passes() });
                    (r.name().to_string(), doc)
                })
                .collect();
            println!("{}", serde_json::json!({ "reasons": reasons }));
            return Ok(());
        }
        let rows: Vec<Vec<String>> = read
            .iter()
            .map(|(r, c)| {
                let verdict = if r.passes() { "pass" } else { "drop" };
                vec![
                    r.name().into(),
                    c.packets.to_string(),
                    c.bytes.to_string(),
                    verdict.into(),
                ]
            })
            .collect();
        println!(
            "{}",
            table(&["REASON", "PACKETS", "BYTES", "VERDICT"], &rows, &[1, 2])
        );
        return Ok(());
    }
    let (c, reply): (Counters, _) = ctx.get("/v1/counters")?;
    let (rules, _): (Rules, _) = ctx.get("/v1/rules")?;
    ctx.print(&reply, || counters_text(&c, &rules))
}

fn counters_text(c: &Counters, rules: &Rules) -> String {
    let reasons: Vec<Vec<String>> = c
        .reasons
        .iter()
        .map(|(name, r)| {
            vec![
                name.clone(),
                r.packets.to_string(),
                r.bytes.to_string(),
                if r.passes { "pass" } else { "drop" }.into(),
            ]
        })
        .collect();
    let live: std::collections::HashSet<String> = rules
        .rules
        .ingress_rules
        .iter()
        .chain(&rules.rules.egress_rules)
        .map(|r| format!("rule:{}", r.id))
        .chain(
            rules
                .rules
                .cluster
                .iter()
                .map(|c| format!("cluster:{}", c.id)),
        )
        .chain(std::iter::once("ssh".to_string()))
        .collect();
    let by_rule: Vec<Vec<String>> = c
        .rules
        .iter()
        .filter(|(name, _)| live.contains(name.as_str()))
        .map(|(name, r)| vec![name.clone(), r.packets.to_string(), r.bytes.to_string()])
        .collect();
    format!(
        "By verdict reason:\n{}\n\nBy rule (generation {}):\n{}",
        table(
            &["REASON", "PACKETS", "BYTES", "VERDICT"],
            &reasons,
            &[1, 2]
        ),
        c.generation,
        table(&["RULE", "PACKETS", "BYTES"], &by_rule, &[1, 2])
    )
}

/// `audit-log show|verify`: read from the state directory directly.
fn audit_log(ctx: &Ctx, a: AuditCmd) -> anyhow::Result<i32> {
    let (state_dir, head) = match a {
        AuditCmd::Show { state_dir, lines } => {
            show_audit(ctx, &state_dir, lines)?;
            return Ok(0);
        }
        AuditCmd::Verify { state_dir, head } => (state_dir, head),
    };
    let head = match head {
        Some(h) => Some(h),
        None => std::fs::read_to_string(state_dir.join(portcullis::audit::HEAD)).ok(),
    };
    let problems =
        portcullis::audit::verify(&state_dir.join(portcullis::audit::LOG), head.as_deref())?;
    if problems.is_empty() {
        println!("audit log intact");
        return Ok(0);
    }
    for p in &problems {
        eprintln!("{p}");
    }
    anyhow::bail!("the audit log has {} problem(s)", problems.len());
}

fn show_audit(ctx: &Ctx, state_dir: &std::path::Path, lines: usize) -> anyhow::Result<()> {
    let path = state_dir.join(portcullis::audit::LOG);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let records: Vec<portcullis::audit::Record> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let tail = records
        .get(records.len().saturating_sub(lines)..)
        .unwrap_or_default();
    if ctx.json {
        println!("{}", serde_json::to_string_pretty(tail)?);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = tail
        .iter()
        .map(|r| {
            vec![
                r.seq.to_string(),
                crate::output::local_time(r.time, None),
                r.uid
                    .map_or_else(|| "daemon".into(), |u| format!("uid {u}")),
                r.generation.to_string(),
                r.action.clone(),
                r.outcome.clone(),
            ]
        })
        .collect();
    println!(
        "{}",
        table(
            &["SEQ", "TIME", "WHO", "GEN", "ACTION", "OUTCOME"],
            &rows,
            &[0, 3]
        )
    );
    Ok(())
}

fn add_keys(
    ctx: &Ctx,
    user: &str,
    keys: Vec<String>,
    file: Option<std::path::PathBuf>,
) -> anyhow::Result<()> {
    let mut lines = keys;
    if let Some(f) = file {
        let text =
            std::fs::read_to_string(&f).with_context(|| format!("cannot read {}", f.display()))?;
        lines.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(String::from),
        );
    }
    anyhow::ensure!(!lines.is_empty(), "no key given");
    let parsed = lines
        .iter()
        .enumerate()
        .map(|(i, l)| {
            portcullis::sshkeys::PublicKey::parse(l).with_context(|| format!("key {}", i + 1))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let added = portcullis::sshkeys::add_keys(user, &parsed)?;
    let present = parsed.len() - added;
    if ctx.json {
        println!(
            "{}",
            serde_json::json!({ "user": user, "added": added, "already_present": present })
        );
    } else {
        println!("Added {added} key(s) for {user}; {present} already present.");
    }
    Ok(())
}

/// Completions and man pages, generated from this CLI's own definition so
/// they never drift from it.
fn generate_docs(dir: &std::path::Path) -> anyhow::Result<()> {
    use clap::CommandFactory as _;
    std::fs::create_dir_all(dir)?;
    let mut cmd = crate::args::Cli::command();
    for shell in [clap_complete::Shell::Bash, clap_complete::Shell::Zsh] {
        clap_complete::generate_to(shell, &mut cmd, "portcullis", dir)?;
    }
    // One page per command and subcommand at every depth, as git and
    // systemd's tools have: each page lists its subcommands as
    // `portcullis-rules-add(1)`, so each of those must exist. The `help`
    // subcommands get none (and are not listed).
    fn without_help(cmd: clap::Command) -> clap::Command {
        cmd.disable_help_subcommand(true)
            .mut_subcommands(without_help)
    }
    let mut cmd = without_help(crate::args::Cli::command());
    cmd.build();
    man_pages(&cmd, dir)
}

fn man_pages(cmd: &clap::Command, dir: &std::path::Path) -> anyhow::Result<()> {
    let name = cmd.get_display_name().unwrap_or(cmd.get_name());
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .title(name.to_uppercase())
        .source(format!("portcullis {}", env!("CARGO_PKG_VERSION")))
        .render(&mut page)?;
    std::fs::write(dir.join(format!("{name}.1")), page)?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        man_pages(sub, dir)?;
    }
    Ok(())
}
