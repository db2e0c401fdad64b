//! `forelock`: the operator's and profiler's command line for forelock.
//!
//! ```text
//! forelock status [--json]               broker, table and forecaster at a glance
//! forelock locks [--json]                every key: mode, holder, waiters, token
//! forelock run KEY -- COMMAND ...        run a command under a lock (flock(1) flags)
//! forelock lock --pid PID KEY            hold a lock until PID exits (shell scripts)
//! forelock unlock --pid PID KEY          release it earlier
//! forelock hist [--out DIR]              the broker's latency histograms
//! forelock bench [--quick] [--out DIR]   forelock beside its peers, one run
//! forelock replay TRACE [--json]         forecaster + allocator on a lock trace
//! ```

use clap::{Parser, Subcommand};

mod bench;
mod fonts;
mod live_replay;
mod ops;
mod replay;

#[derive(Parser)]
#[command(version, about = "Operate, profile and benchmark forelock")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    #[command(flatten)]
    Ops(ops::OpsCommand),
    /// Benchmark forelock beside std Mutex, futex, flock, fcntl, a Unix
    /// socket, Redis and etcd, in one run on this machine.
    Bench(bench::BenchArgs),
    /// Replay a lock trace through the forecaster and allocator in simulated time.
    Replay(replay::ReplayArgs),
    /// Replay a lock trace in real time against real brokers and client
    /// processes, with prediction on and off.
    LiveReplay(live_replay::LiveReplayArgs),
}

fn main() {
    // The error's chain, one line, as a person reads it (anyhow's Debug form
    // would add a backtrace whenever RUST_BACKTRACE is set).
    if let Err(e) = run() {
        eprintln!("forelock: error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> anyhow::Result<()> {
    // Benchmark workers are this binary re-executed with the same arguments:
    // `bench::run_with` notices and runs the worker.
    match Cli::parse().command {
        Command::Ops(cmd) => std::process::exit(ops::run(cmd)?),
        Command::Bench(args) => bench::run_with(args, bench::forelock::entries()),
        Command::Replay(args) => replay::run(args),
        Command::LiveReplay(args) => live_replay::run(args),
    }
}
