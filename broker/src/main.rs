//! `forelockd [--config FILE] [--runtime-dir DIR] [--print-config]`

use clap::Parser;
use forelockd::config::Config;
use std::path::PathBuf;

/// The forelock broker: serves named locks in shared memory to the processes
/// of this host. Runs in the foreground; stops cleanly on SIGTERM or SIGINT.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// TOML configuration; keys it does not name keep their defaults.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Runtime directory (overrides the configuration's `runtime_dir`).
    #[arg(long)]
    runtime_dir: Option<PathBuf>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    print_config: bool,
}

fn main() {
    // The error's chain, one line, as a person reads it (anyhow's Debug form
    // would add a backtrace whenever RUST_BACKTRACE is set).
    if let Err(e) = run() {
        eprintln!("forelockd: error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default_config(),
    };
    if let Some(dir) = args.runtime_dir {
        config.runtime_dir = dir.to_string_lossy().into_owned();
    }
    if args.print_config {
        if config.runtime_dir.is_empty() {
            config.runtime_dir = config.runtime_dir().to_string_lossy().into_owned();
        }
        print!("{}", toml::to_string_pretty(&config)?);
        return Ok(());
    }
    // journald adds its own timestamps; JOURNAL_STREAM tells us we run under it.
    let under_journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let filter = tracing_subscriber::EnvFilter::try_from_env("FORELOCK_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(std::io::stderr);
    if under_journald {
        builder.without_time().with_target(false).init();
    } else {
        builder.init();
    }
    forelockd::event_loop::EventLoop::new(config)?.run()
}
