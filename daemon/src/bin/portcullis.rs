//! `portcullis`: the command-line tool, a thin client of the daemon's API.

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

use std::{io::Write as _, path::PathBuf};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use hyper::Method;
use portcullis::{
    api::DEFAULT_SOCKET,
    client,
    rules::{FirewallRule, Protocol, RuleSet},
};
use serde_json::{Value, json};

#[derive(Parser)]
#[command(version, about = "Inspect and control the Portcullis host firewall")]
struct Cli {
    /// The daemon's API socket.
    #[arg(long, global = true, default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Print the API's JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// For changes: only show the diff and the open flows it would cut.
    #[arg(long, global = true)]
    dry_run: bool,
    /// For changes: apply even if it cuts your own SSH session.
    #[arg(long, global = true)]
    force: bool,
    /// For changes: roll back unless `portcullis confirm` runs within SECS.
    #[arg(long, global = true, value_name = "SECS")]
    confirm_within: Option<u64>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Whether the host is protected, on which interfaces, what it dropped.
    Status,
    /// The rule set: show, replace, add or remove rules.
    #[command(subcommand)]
    Rules(RulesCmd),
    /// Cluster peers: admitted on every port and protocol.
    #[command(subcommand)]
    Peers(PeersCmd),
    /// Packets and bytes by verdict reason and by rule.
    Counters {
        /// Read the pinned counters directly (works without the daemon).
        #[arg(long)]
        pin_dir: Option<PathBuf>,
    },
    /// Metrics in the Prometheus text format.
    Metrics,
    /// Keep the change applied with --confirm-within.
    Confirm,
    /// Follow drop events live (sampled), one line each.
    Watch,
    /// SSH keys.
    #[command(subcommand)]
    Ssh(SshCmd),
    /// Emergency: drop everything new except SSH from --admin, and cut open
    /// flows not with it (short for `mode lockdown`). `portcullis enforce`
    /// ends it.
    Lockdown(LockdownArgs),
    /// Emergency: suspend enforcement (short for `mode open`).
    Open,
    /// Back to normal enforcement (short for `mode enforce`).
    Enforce,
    /// What the data path does with what the rules do not admit.
    #[command(subcommand)]
    Mode(ModeCmd),
    /// The audit log of every change and refusal.
    #[command(subcommand, visible_alias = "audit-log")]
    Audit(AuditCmd),
    /// Write shell completions (bash, zsh) and man pages into DIR (used by
    /// `cargo xtask deb`).
    #[command(hide = true)]
    GenerateDocs { dir: PathBuf },
    /// Wait until the host is SSH-ready (enforcing, SSH unit active and
    /// listening, admitted by the rules, key authentication on). Exits 0 when
    /// it is; on timeout exits 1 and lists the checks that fail.
    WaitReady {
        /// Give up after SECS.
        #[arg(long, value_name = "SECS", default_value_t = 300)]
        timeout: u64,
    },
}

#[derive(Subcommand)]
enum SshCmd {
    /// Add public keys to a user's authorized_keys (run as root): validated,
    /// merged without duplicates, existing keys kept, written atomically with
    /// safe ownership and modes.
    AddKey {
        #[arg(long)]
        user: String,
        /// Keys ("ssh-ed25519 AAAA... comment"); or use --file.
        keys: Vec<String>,
        /// Read keys from this file, one per line.
        #[arg(long)]
        file: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum ModeCmd {
    /// Drop what the rules do not admit (the normal mode).
    Enforce,
    /// Pass what would be dropped, counting it by reason (to roll out rules).
    Audit,
    /// Emergency: suspend enforcement (everything passes, still counted).
    Open,
    /// Emergency: nothing new but SSH from --admin, both ways narrower.
    Lockdown(LockdownArgs),
}

#[derive(clap::Args)]
struct LockdownArgs {
    /// Admin source network admitted to SSH (e.g. 203.0.113.0/24).
    #[arg(long, value_name = "CIDR", required_unless_present = "no_admin")]
    admin: Option<String>,
    /// Admit no one, SSH included (until `portcullis enforce` or a reboot).
    #[arg(long, conflicts_with = "admin")]
    no_admin: bool,
}

#[derive(Subcommand)]
enum AuditCmd {
    /// Check the log's hash chain against its recorded head: reports edited,
    /// removed, reordered and truncated records. Reads the files directly.
    Verify {
        #[arg(long, default_value = portcullis::state::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// Check against this head hash instead of the state directory's.
        #[arg(long)]
        head: Option<String>,
    },
}

#[derive(Subcommand)]
enum RulesCmd {
    /// Print the live rule set (Brev JSON shape).
    Get,
    /// Replace the whole rule set with FILE (JSON, or TOML when it ends in .toml).
    Apply {
        file: PathBuf,
        /// Refuse unless this generation is still live (see `rules get`).
        #[arg(long)]
        expect_generation: Option<u64>,
    },
    /// Add one rule.
    Add {
        #[arg(long)]
        id: String,
        #[arg(long)]
        from_port: u32,
        #[arg(long)]
        to_port: u32,
        /// Source CIDR (repeatable; none means any source).
        #[arg(long = "ip-range")]
        ip_ranges: Vec<String>,
        #[arg(long, value_enum, default_value = "tcp-udp")]
        protocol: ProtocolArg,
        #[arg(long)]
        description: Option<String>,
        /// Add to the egress list instead (destinations in --ip-range).
        #[arg(long)]
        egress: bool,
        #[arg(long)]
        expect_generation: Option<u64>,
    },
    /// Remove the rule with this id.
    Remove {
        id: String,
        #[arg(long)]
        expect_generation: Option<u64>,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ProtocolArg {
    TcpUdp,
    Tcp,
    Udp,
    Icmp,
    Any,
}

impl From<ProtocolArg> for Protocol {
    fn from(p: ProtocolArg) -> Self {
        match p {
            ProtocolArg::TcpUdp => Protocol::TcpUdp,
            ProtocolArg::Tcp => Protocol::Tcp,
            ProtocolArg::Udp => Protocol::Udp,
            ProtocolArg::Icmp => Protocol::Icmp,
            ProtocolArg::Any => Protocol::Any,
        }
    }
}

#[derive(Subcommand)]
enum PeersCmd {
    List,
    Add {
        cidrs: Vec<String>,
        #[arg(long)]
        cluster: Option<String>,
    },
    Remove {
        cidrs: Vec<String>,
    },
    Replace {
        cidrs: Vec<String>,
        #[arg(long)]
        cluster: Option<String>,
    },
}

/// The query of a change request.
struct ChangeFlags {
    dry_run: bool,
    force: bool,
    confirm_within: Option<u64>,
}

impl ChangeFlags {
    fn path(&self, path: &str, generation: Option<u64>) -> String {
        let mut q = Vec::new();
        if let Some(g) = generation {
            q.push(format!("expected_generation={g}"));
        }
        if self.dry_run {
            q.push("dry_run=true".into());
        }
        if self.force {
            q.push("force=true".into());
        }
        if let Some(s) = self.confirm_within {
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
}

/// The body of a lockdown request.
fn lockdown(l: &LockdownArgs) -> Value {
    if l.no_admin {
        eprintln!(
            "lockdown without --admin: SSH is blocked from everywhere until `portcullis enforce` or a reboot"
        );
    }
    json!({ "mode": "lockdown", "admin": l.admin })
}

fn main() -> anyhow::Result<()> {
    // Like other command-line tools, end quietly when the reader of our
    // output goes away (`portcullis status | head -1`) instead of panicking
    // in println! on EPIPE.
    // SAFETY: setting a signal's disposition to the default, before any
    // other thread exists; no handler runs Rust code.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    let flags = ChangeFlags {
        dry_run: cli.dry_run,
        force: cli.force,
        confirm_within: cli.confirm_within,
    };
    let expect = |path: &str, generation: Option<u64>| flags.path(path, generation);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let call = |method: Method, path: &str, body: Option<Value>| -> anyhow::Result<Value> {
        let body = body.map(|b| serde_json::to_vec(&b)).transpose()?;
        runtime
            .block_on(client::request(&cli.socket, method, path, body))?
            .json()
    };
    let out = match cli.command {
        Command::GenerateDocs { dir } => return generate_docs(&dir),
        Command::WaitReady { timeout } => {
            return wait_ready(
                &cli.socket,
                std::time::Duration::from_secs(timeout),
                cli.json,
            );
        }
        Command::Status if !cli.json => {
            print_status(&call(Method::GET, "/v1/status", None)?);
            return Ok(());
        }
        Command::Status => call(Method::GET, "/v1/status", None)?,
        Command::Rules(RulesCmd::Get) => call(Method::GET, "/v1/rules", None)?,
        Command::Rules(RulesCmd::Apply {
            file,
            expect_generation,
        }) => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            // Without an `ssh` key the live SSH exemption stays as it is.
            let rules: portcullis::rules::Replacement =
                if file.extension().is_some_and(|e| e == "toml") {
                    toml::from_str(&text)
                        .with_context(|| format!("{} is not a rule set", file.display()))?
                } else {
                    serde_json::from_str(&text)
                        .with_context(|| format!("{} is not a rule set", file.display()))?
                };
            rules
                .clone()
                .over(&RuleSet::default())
                .validate()
                .with_context(|| format!("{}", file.display()))?;
            if rules.ssh.as_ref().is_some_and(|s| !s.allow) {
                eprintln!(
                    "warning: this rule set turns the SSH exemption off: new SSH logins need a rule admitting the SSH port"
                );
            }
            call(
                Method::PUT,
                &expect("/v1/rules", expect_generation),
                Some(serde_json::to_value(rules)?),
            )?
        }
        Command::Rules(RulesCmd::Add {
            id,
            from_port,
            to_port,
            ip_ranges,
            protocol,
            description,
            egress,
            expect_generation,
        }) => {
            let rule = FirewallRule {
                id,
                from_port,
                to_port,
                ip_ranges,
                protocol: protocol.into(),
                description,
            };
            let path = if egress {
                "/v1/rules/egress"
            } else {
                "/v1/rules/ingress"
            };
            call(
                Method::POST,
                &expect(path, expect_generation),
                Some(serde_json::to_value(rule)?),
            )?
        }
        Command::Rules(RulesCmd::Remove {
            id,
            expect_generation,
        }) => call(
            Method::DELETE,
            &expect(
                &format!("/v1/rule/{}", client::path_segment(&id)),
                expect_generation,
            ),
            None,
        )?,
        Command::Peers(PeersCmd::List) => call(Method::GET, "/v1/peers", None)?,
        Command::Peers(PeersCmd::Add { cidrs, cluster }) => call(
            Method::POST,
            &expect("/v1/peers", None),
            Some(json!({ "peers": cidrs, "cluster": cluster })),
        )?,
        Command::Peers(PeersCmd::Remove { cidrs }) => call(
            Method::DELETE,
            &expect("/v1/peers", None),
            Some(json!({ "peers": cidrs })),
        )?,
        Command::Peers(PeersCmd::Replace { cidrs, cluster }) => call(
            Method::PUT,
            &expect("/v1/peers", None),
            Some(json!({ "peers": cidrs, "cluster": cluster })),
        )?,
        Command::Counters { pin_dir: Some(dir) } => {
            let reasons: serde_json::Map<_, _> = portcullis::dataplane::read_counters(&dir)?
                .into_iter()
                .map(|(r, c)| {
                    (
                        r.name().to_string(),
                        json!({ "packets": c.packets, "bytes": c.bytes }),
                    )
                })
                .collect();
            json!({ "reasons": reasons })
        }
        Command::Counters { pin_dir: None } => call(Method::GET, "/v1/counters", None)?,
        Command::Lockdown(l) => call(
            Method::PUT,
            &flags.path("/v1/mode", None),
            Some(lockdown(&l)),
        )?,
        Command::Open => call(
            Method::PUT,
            &flags.path("/v1/mode", None),
            Some(json!({ "mode": "open" })),
        )?,
        Command::Enforce => call(
            Method::PUT,
            &flags.path("/v1/mode", None),
            Some(json!({ "mode": "enforce" })),
        )?,
        Command::Mode(m) => {
            let body = match &m {
                ModeCmd::Enforce => json!({ "mode": "enforce" }),
                ModeCmd::Audit => json!({ "mode": "audit" }),
                ModeCmd::Open => json!({ "mode": "open" }),
                ModeCmd::Lockdown(l) => lockdown(l),
            };
            call(Method::PUT, &flags.path("/v1/mode", None), Some(body))?
        }
        Command::Audit(AuditCmd::Verify { state_dir, head }) => {
            let head = match head {
                Some(h) => Some(h),
                None => std::fs::read_to_string(state_dir.join(portcullis::audit::HEAD)).ok(),
            };
            let problems = portcullis::audit::verify(
                &state_dir.join(portcullis::audit::LOG),
                head.as_deref(),
            )?;
            if problems.is_empty() {
                println!("audit log intact");
                return Ok(());
            }
            for p in &problems {
                eprintln!("{p}");
            }
            anyhow::bail!("the audit log has {} problem(s)", problems.len());
        }
        Command::Confirm => call(Method::POST, "/v1/confirm", None)?,
        Command::Ssh(SshCmd::AddKey { user, keys, file }) => {
            let mut lines = keys;
            if let Some(f) = file {
                let text = std::fs::read_to_string(&f)
                    .with_context(|| format!("cannot read {}", f.display()))?;
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
                    portcullis::sshkeys::PublicKey::parse(l)
                        .with_context(|| format!("key {}", i + 1))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let added = portcullis::sshkeys::add_keys(&user, &parsed)?;
            json!({ "user": user, "added": added, "already_present": parsed.len() - added })
        }
        Command::Watch => {
            let json = cli.json;
            runtime.block_on(client::follow(
                &cli.socket,
                "/v1/events?follow=true",
                |line| {
                    if json {
                        println!("{line}");
                    } else if let Ok(e) = serde_json::from_str::<Value>(line) {
                        println!(
                            "{} {}",
                            e.get("time_ms").unwrap_or(&Value::Null),
                            describe_drop(&e)
                        );
                    }
                    let _ = std::io::stdout().flush();
                },
            ))?;
            return Ok(());
        }
        Command::Metrics => {
            let reply = runtime.block_on(client::request(
                &cli.socket,
                Method::GET,
                "/v1/metrics",
                None,
            ))?;
            std::io::stdout().write_all(&reply.body)?;
            return Ok(());
        }
    };
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print_text(&out);
    }
    Ok(())
}

/// One drop event on one line: `ingress 10.0.0.2:5000 -> 10.0.0.1:22 tcp (drop_no_rule)`.
fn describe_drop(d: &Value) -> String {
    let endpoint = |addr: &Value, port: &Value| {
        let a = addr.as_str().unwrap_or("?");
        if a.contains(':') {
            format!("[{a}]:{port}")
        } else {
            format!("{a}:{port}")
        }
    };
    let proto = match d["protocol"].as_u64() {
        Some(6) => "tcp".to_string(),
        Some(17) => "udp".to_string(),
        Some(1) => "icmp".to_string(),
        Some(58) => "icmpv6".to_string(),
        Some(p) => format!("proto {p}"),
        None => "?".to_string(),
    };
    format!(
        "{} {} -> {} {proto} ({})",
        d["direction"].as_str().unwrap_or(""),
        endpoint(&d["source"], &d["source_port"]),
        endpoint(&d["destination"], &d["destination_port"]),
        d["reason"].as_str().unwrap_or("")
    )
}

/// `portcullis status` for people: protected or not, where, how, and what
/// was dropped lately.
fn print_status(s: &Value) {
    let interfaces = s["interfaces"].as_object().cloned().unwrap_or_default();
    let mode = s
        .pointer("/mode/mode")
        .and_then(Value::as_str)
        .unwrap_or("?");
    let protected = s["enforcing"] == true && mode != "open" && mode != "audit";
    let missing: Vec<&str> = s["missing_interfaces"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    println!(
        "Protected:   {}{}{}",
        if protected { "yes" } else { "NO" },
        if missing.is_empty() {
            String::new()
        } else {
            format!(" (not protected: {} missing)", missing.join(", "))
        },
        match mode {
            "enforce" => String::new(),
            "lockdown" => format!(
                " (LOCKDOWN, admin {})",
                s.pointer("/mode/admin")
                    .and_then(Value::as_str)
                    .unwrap_or("none")
            ),
            other => format!(" ({} mode: nothing is dropped)", other.to_uppercase()),
        }
    );
    let list: Vec<String> = interfaces
        .iter()
        .map(|(k, v)| format!("{k} ({})", v.as_str().unwrap_or("?")))
        .collect();
    println!(
        "Interfaces:  {}",
        if list.is_empty() {
            "none".into()
        } else {
            list.join(", ")
        }
    );
    println!(
        "Rules:       {} rule(s), generation {}, sha256 {}",
        s["rules"],
        s["generation"],
        s["hash"].as_str().unwrap_or("").get(..12).unwrap_or("")
    );
    println!(
        "Flows:       {} of {} connection-table entries in use",
        s.pointer("/conntrack/entries").unwrap_or(&Value::Null),
        s.pointer("/conntrack/capacity").unwrap_or(&Value::Null)
    );
    let r = &s["readiness"];
    println!(
        "SSH-ready:   {}",
        if r["ready"] == true { "yes" } else { "NO" }
    );
    print_checks(r);
    let failed: Vec<&str> = r["failed_units"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    println!(
        "System:      {}{}",
        r["system_state"].as_str().unwrap_or("unknown (no D-Bus)"),
        if failed.is_empty() {
            String::new()
        } else {
            format!(", failed units: {}", failed.join(", "))
        }
    );
    if let Some(p) = s.get("pending") {
        println!(
            "Pending:     generation {} rolls back at {} unless confirmed",
            p["generation"], p["deadline"]
        );
    }
    if s["refused_writes"].as_u64().unwrap_or(0) > 0 {
        println!(
            "Refused:     {} write(s) refused for lack of permission",
            s["refused_writes"]
        );
    }
    let counters = s["counters"].as_object().cloned().unwrap_or_default();
    let sum = |pass: bool| -> u64 {
        counters
            .iter()
            .filter(|(k, _)| k.starts_with("pass_") == pass)
            .filter_map(|(_, v)| v["packets"].as_u64())
            .sum()
    };
    println!("Packets:     {} passed, {} dropped", sum(true), sum(false));
    let drops = s["recent_drops"].as_array().cloned().unwrap_or_default();
    if drops.is_empty() {
        println!("Recent drops: none");
    } else {
        println!("Recent drops:");
        for d in drops.iter().rev().take(5) {
            println!("  {}", describe_drop(d));
        }
    }
    println!("Audit head:  {}", s["audit_head"].as_str().unwrap_or(""));
}

/// Human output: counters as a table, everything else as indented JSON-ish text.
fn print_text(v: &Value) {
    if let Some(obj) = v.as_object() {
        for (k, val) in obj {
            match val {
                Value::Object(inner) if inner.values().all(|x| x.get("packets").is_some()) => {
                    println!("{k}:");
                    println!("  {:<28} {:>12} {:>14}", "", "PACKETS", "BYTES");
                    for (name, c) in inner {
                        println!("  {:<28} {:>12} {:>14}", name, c["packets"], c["bytes"]);
                    }
                }
                Value::Object(_) | Value::Array(_) => {
                    println!(
                        "{k}: {}",
                        serde_json::to_string_pretty(val)
                            .unwrap_or_default()
                            .replace('\n', "\n  ")
                    )
                }
                Value::String(s) => println!("{k}: {s}"),
                other => println!("{k}: {other}"),
            }
        }
    } else {
        println!("{v}");
    }
}

/// Polls `/v1/ready` until it answers 200 or `timeout` passes. A daemon
/// that is not up yet counts as not ready (this runs early in boot).
fn wait_ready(
    socket: &std::path::Path,
    timeout: std::time::Duration,
    json: bool,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let deadline = std::time::Instant::now() + timeout;
    let mut last: Result<Value, String>;
    loop {
        let reply = runtime.block_on(client::request(socket, Method::GET, "/v1/ready", None));
        match reply {
            Ok(r) if r.status == 200 || r.status == 503 => {
                let ready = r.status == 200;
                let doc: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
                if ready {
                    if json {
                        println!("{}", serde_json::to_string_pretty(&doc)?);
                    } else {
                        println!("SSH-ready");
                        print_checks(&doc);
                    }
                    return Ok(());
                }
                last = Ok(doc);
            }
            Ok(r) => last = Err(format!("the daemon answered HTTP {}", r.status)),
            Err(e) => last = Err(format!("{e:#}")),
        }
        if std::time::Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    match last {
        Ok(doc) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&doc)?);
            }
            eprintln!(
                "not SSH-ready after {} s; failing checks:",
                timeout.as_secs()
            );
            for check in doc
                .get("checks")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let passes = matches!(check["state"].as_str(), Some("pass" | "warn" | "skipped"));
                if check["gates"].as_bool() == Some(true) && !passes {
                    eprintln!(
                        "  {}: {} ({})",
                        check["name"].as_str().unwrap_or("?"),
                        check["detail"].as_str().unwrap_or(""),
                        check["state"].as_str().unwrap_or("?")
                    );
                }
            }
        }
        Err(e) => eprintln!("not SSH-ready after {} s: {e}", timeout.as_secs()),
    }
    std::process::exit(1);
}

/// The readiness checks of a readiness document, one per line.
fn print_checks(doc: &Value) {
    for check in doc["checks"].as_array().into_iter().flatten() {
        println!(
            "  {:<16} {:<8} {}",
            check["name"].as_str().unwrap_or("?"),
            check["state"].as_str().unwrap_or("?"),
            check["detail"].as_str().unwrap_or("")
        );
    }
}

/// Completions and man pages, generated from this CLI's own definition so
/// they never drift from it.
fn generate_docs(dir: &std::path::Path) -> anyhow::Result<()> {
    use clap::CommandFactory as _;
    std::fs::create_dir_all(dir)?;
    let mut cmd = Cli::command();
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
    let mut cmd = without_help(Cli::command());
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
