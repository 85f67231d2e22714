//! `portcullis`: the command-line tool.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use portcullis::{config::DEFAULT_PIN_DIR, dataplane};

#[derive(Parser)]
#[command(version, about = "Inspect and control the Portcullis host firewall")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show the verdict counters of the pinned data path.
    Counters {
        /// bpffs directory the daemon pins under.
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Counters { pin_dir, json } => {
            let counters = dataplane::read_counters(&pin_dir)?;
            if json {
                let map: serde_json::Map<_, _> = counters
                    .iter()
                    .map(|(r, c)| {
                        (
                            r.name().to_string(),
                            serde_json::json!({"packets": c.packets, "bytes": c.bytes}),
                        )
                    })
                    .collect();
                println!("{}", serde_json::Value::Object(map));
            } else {
                println!("{:<26} {:>12} {:>14}", "REASON", "PACKETS", "BYTES");
                for (r, c) in counters {
                    println!("{:<26} {:>12} {:>14}", r.name(), c.packets, c.bytes);
                }
            }
        }
    }
    Ok(())
}
