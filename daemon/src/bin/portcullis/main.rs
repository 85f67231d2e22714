//! `portcullis`: the command-line tool, a thin client of the daemon's API.
//! It sends and reads the daemon's own typed documents (`portcullis::api`,
//! `portcullis::core`, `portcullis::rules`); `--json` prints them as the
//! daemon sent them.

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

mod args;
mod commands;
mod denycmds;
mod explaincmd;
mod output;
mod rulecmds;
mod status;
mod watch;

use std::path::PathBuf;

use args::{Change, Cli, Command, EarlyChange};
use clap::Parser as _;
use hyper::Method;
use portcullis::client;
use serde::{Serialize, de::DeserializeOwned};

/// Exit status of `status` when the host is not protected.
pub const EXIT_NOT_PROTECTED: i32 = 3;
/// Exit status of `status` when the daemon is not running.
pub const EXIT_DAEMON_DOWN: i32 = 4;

/// What every command needs: where the daemon is, how to print, a runtime.
pub struct Ctx {
    pub socket: PathBuf,
    pub json: bool,
    pub early: EarlyChange,
    runtime: tokio::runtime::Runtime,
}

impl Ctx {
    /// One request; the reply's raw body for `--json`.
    pub fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> anyhow::Result<client::Reply> {
        self.runtime
            .block_on(client::request(&self.socket, method, path, body))
    }

    /// A request with a typed body and a typed answer (and the raw reply).
    pub fn send<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> anyhow::Result<(T, client::Reply)> {
        let body = body.map(serde_json::to_vec).transpose()?;
        let reply = self.call(method, path, body)?;
        let value = reply.typed()?;
        Ok((value, reply))
    }

    /// `GET path` as `T`.
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<(T, client::Reply)> {
        self.send::<(), T>(Method::GET, path, None)
    }

    /// Prints the daemon's document (`--json`) or `text`.
    pub fn print(
        &self,
        reply: &client::Reply,
        text: impl FnOnce() -> String,
    ) -> anyhow::Result<()> {
        if self.json {
            let doc: serde_json::Value = serde_json::from_slice(&reply.body)?;
            println!("{}", serde_json::to_string_pretty(&doc)?);
        } else {
            println!("{}", text());
        }
        Ok(())
    }

    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.runtime.block_on(f)
    }

    /// The change flags of a command, with those given before it.
    pub fn change(&self, c: &Change) -> Change {
        Change {
            dry_run: c.dry_run || self.early.dry_run,
            force: c.force || self.early.force,
            confirm_within: c.confirm_within.or(self.early.confirm_within),
        }
    }
}

fn main() {
    // Like other command-line tools, end quietly when the reader of our
    // output goes away (`portcullis status | head -1`) instead of panicking
    // in println! on EPIPE.
    // SAFETY: setting a signal's disposition to the default, before any
    // other thread exists; no handler runs Rust code.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    let json = cli.json;
    let code = match run(cli) {
        Ok(code) => code,
        Err(e) => {
            report_error(&e, json);
            1
        }
    };
    std::process::exit(code);
}

/// An error for people (`error: ...`) or for scripts (a JSON object: the
/// same words, plus the daemon's status when it answered), on stderr so
/// that stdout holds only documents.
fn report_error(e: &anyhow::Error, json: bool) {
    let message = format!("{e:#}");
    if json {
        let status = e.downcast_ref::<client::Refused>().map(|r| r.status);
        let doc = serde_json::json!({ "error": message, "status": status });
        eprintln!(
            "{}",
            serde_json::to_string_pretty(&doc).unwrap_or_else(|_| doc.to_string())
        );
    } else {
        eprintln!("error: {message}");
    }
}

/// Runs the command; the exit status.
fn run(cli: Cli) -> anyhow::Result<i32> {
    let changes = command_changes(&cli.command);
    if cli.early.given() && !changes {
        anyhow::bail!(
            "--dry-run, --force and --confirm-within apply only to commands that change something"
        );
    }
    let ctx = Ctx {
        socket: cli.socket,
        json: cli.json,
        early: cli.early,
        runtime: tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
    };
    commands::dispatch(&ctx, cli.command)
}

/// Whether `c` changes something (and so takes the change flags).
fn command_changes(c: &Command) -> bool {
    use args::{PeersCmd, RulesCmd};
    match c {
        Command::Allow(_)
        | Command::Lockdown(_)
        | Command::Open(_)
        | Command::Enforce(_)
        | Command::Mode(_)
        | Command::Egress { .. }
        | Command::Reload { .. } => true,
        Command::Rules(r) => !matches!(r, RulesCmd::List | RulesCmd::Save),
        Command::Peers(p) => !matches!(p, PeersCmd::List),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    const CHANGE_FLAGS: [&str; 4] = ["dry_run", "force", "confirm_within", "expect_generation"];

    /// Every visible subcommand, argument and flag says what it is for.
    fn check_help(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
        for arg in cmd.get_arguments() {
            let id = arg.get_id().as_str();
            if !arg.is_hide_set() && id != "help" && id != "version" && arg.get_help().is_none() {
                missing.push(format!("{path} {id}"));
            }
        }
        for sub in cmd.get_subcommands() {
            let name = format!("{path} {}", sub.get_name());
            if sub.get_name() != "help" && !sub.is_hide_set() && sub.get_about().is_none() {
                missing.push(name.clone());
            }
            check_help(sub, &name, missing);
        }
    }

    #[test]
    fn every_flag_and_subcommand_has_help() {
        let mut missing = Vec::new();
        check_help(&super::Cli::command(), "portcullis", &mut missing);
        assert!(missing.is_empty(), "no help text: {missing:?}");
    }

    /// The change flags are offered on the commands that change something,
    /// and only there.
    #[test]
    fn change_flags_only_on_changes() {
        let cli = super::Cli::command();
        let find = |path: &[&str]| -> clap::Command {
            let mut c = cli.clone();
            for p in path {
                c = c
                    .find_subcommand(p)
                    .cloned()
                    .unwrap_or_else(|| panic!("{p}"));
            }
            c
        };
        let has = |c: &clap::Command, flag: &str| {
            c.get_arguments()
                .any(|a| a.get_id().as_str() == flag && !a.is_hide_set())
        };
        for read in [
            &["status"][..],
            &["rules", "list"],
            &["peers", "list"],
            &["counters"],
            &["watch"],
            &["metrics"],
            &["confirm"],
            &["audit-log", "show"],
            &["wait-ready"],
        ] {
            let c = find(read);
            for flag in CHANGE_FLAGS {
                assert!(!has(&c, flag), "{read:?} offers --{flag}");
            }
        }
        for change in [
            &["allow"][..],
            &["rules", "add"],
            &["rules", "remove"],
            &["rules", "apply"],
            &["peers", "add"],
            &["peers", "remove"],
            &["peers", "replace"],
        ] {
            let c = find(change);
            for flag in CHANGE_FLAGS {
                assert!(has(&c, flag), "{change:?} lacks --{flag}");
            }
        }
        for mode in [
            &["lockdown"][..],
            &["enforce"],
            &["open"],
            &["mode", "audit"],
        ] {
            let c = find(mode);
            for flag in ["dry_run", "force", "confirm_within"] {
                assert!(has(&c, flag), "{mode:?} lacks --{flag}");
            }
        }
        // The top level keeps them for older scripts, hidden.
        for flag in ["dry_run", "force", "confirm_within"] {
            assert!(!has(&cli, flag), "top level shows --{flag}");
        }
    }

    #[test]
    fn rules_help_lists_the_real_subcommands() {
        let mut cli = super::Cli::command();
        let rules = cli.find_subcommand_mut("rules").unwrap();
        let help = rules.render_long_help().to_string();
        for sub in ["list", "apply", "add", "remove"] {
            assert!(help.contains(&format!("  {sub} ")), "{help}");
        }
        let about = rules.get_about().unwrap().to_string();
        assert!(about.contains("list, add, remove"), "{about}");
    }
}
