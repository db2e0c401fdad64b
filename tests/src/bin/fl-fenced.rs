//! The fenced-resource checker as a command (see
//! `forelock_tests::cluster::fenced`), for holders that are shell commands,
//! such as `etcdctl lock KEY -- fl-fenced rmw ...`:
//!
//! ```text
//! fl-fenced --resource R init
//! fl-fenced --resource R rmw --holder h1/7/1 --token-env ETCD_LOCK_REV [--hold-ms 5]
//! fl-fenced --resource R outcome --holder h1/7/1 released|lost|error
//! fl-fenced --resource R report        # one line of counts; exit 1 on a violation
//! ```
//!
//! `rmw` prints `accepted`, `stale-at-enter` or `stale-at-write`.

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use forelock_tests::cluster::fenced::{Outcome, Resource, Rmw};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
struct Args {
    /// The resource file (shared by every host).
    #[arg(long)]
    resource: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// A fresh resource: value 0, nothing accepted, empty history.
    Init,
    /// Enter with the token, stay `hold_ms`, write value + 1, leave.
    Rmw {
        #[arg(long)]
        holder: String,
        #[arg(long, conflicts_with = "token_env")]
        token: Option<u64>,
        /// Read the token from this environment variable (etcdctl lock
        /// sets ETCD_LOCK_REV).
        #[arg(long)]
        token_env: Option<String>,
        #[arg(long, default_value = "0")]
        hold_ms: u64,
    },
    /// What releasing the holder's lock returned.
    Outcome { holder: String, outcome: String },
    /// Print the counts; exit 1 if there is a violation.
    Report,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    match args.cmd {
        Cmd::Init => {
            Resource::create(&args.resource)
                .with_context(|| format!("creating {}", args.resource.display()))?;
        }
        Cmd::Rmw {
            holder,
            token,
            token_env,
            hold_ms,
        } => {
            let token = match (token, token_env) {
                (Some(t), _) => t,
                (None, Some(var)) => std::env::var(&var)
                    .with_context(|| format!("${var} is not set"))?
                    .parse()
                    .with_context(|| format!("${var} is not a number"))?,
                (None, None) => bail!("give --token or --token-env"),
            };
            let r = Resource::open(&args.resource);
            let said = match r.rmw(&holder, token, Duration::from_millis(hold_ms))? {
                Rmw::Accepted => "accepted",
                Rmw::StaleAtEnter => "stale-at-enter",
                Rmw::StaleAtWrite => "stale-at-write",
            };
            println!("{said}");
        }
        Cmd::Outcome { holder, outcome } => {
            let Some(o) = Outcome::parse(&outcome) else {
                bail!("outcome {outcome:?}: say released, lost or error");
            };
            Resource::open(&args.resource).outcome(&holder, o)?;
        }
        Cmd::Report => {
            let state = Resource::open(&args.resource).state()?;
            println!(
                "{} value={} unresolved={}",
                state.counts,
                state.value,
                state.unresolved()
            );
            if state.counts.violations() > 0 {
                std::process::exit(1);
            }
        }
    }
    Ok(())
}
