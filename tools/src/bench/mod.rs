//! `forelock bench`: the same lock workloads against forelock and its peers,
//! measured side by side in one run on this machine.
//!
//! Systems ([`system::SystemEntry`]): in-process `std::sync::Mutex`, a raw
//! shared futex lock, a process-shared robust pthread mutex, a bare
//! Unix-socket round trip (a baseline, not a lock), flock(2), fcntl OFD
//! locks, Redis and etcd (servers started here on 127.0.0.1 and stopped
//! here). A peer whose program is missing is reported as skipped.
//!
//! Workloads ([`workload::Workload`]), each with several worker processes:
//! uncontended distinct keys, a two-process hand-off, one hot key with 2, 4
//! and 8 processes, Zipf over 10,000 keys.
//!
//! Workers are this same binary, run again with the same arguments and the
//! environment variable [`WORKER_ENV`] naming their spec file; [`run_with`]
//! notices it and becomes a worker. Each worker writes its HdrHistogram (V2
//! serialization) to a report file.
//!
//! Plugging forelock in: implement [`system::LockSystem`] (parent side) and
//! [`system::LockSession`] (worker side), describe them with a
//! [`system::SystemEntry`] named `"forelock"`, and call
//! `bench::run_with(args, vec![FORELOCK_ENTRY])` from `main` (every time, in
//! the parent and in the workers alike). The table then takes forelock as its
//! reference.
//!
//! ```text
//! forelock bench --quick
//! forelock bench --repeat 3 --json --out bench-out/
//! ```

mod chart;
mod cluster;
mod driver;
pub mod forelock;
mod languages;
mod peers;
mod report;
pub(crate) mod support;
pub mod system;
mod table_cost;
mod workload;

#[cfg(test)]
mod smoke;

use std::path::PathBuf;

use system::SystemEntry;

/// Set in a worker process: the path of its spec file.
pub const WORKER_ENV: &str = "FORELOCK_BENCH_WORKER";

/// The name a system must have to become the default reference; the targets
/// of ARCHITECTURE.md for prepared keys and hand-off are checked against it.
pub const FORELOCK_NAME: &str = "forelock";

/// The name of a forelock system whose keys are never prepared (every
/// acquire takes the broker round trip): checked against the bare
/// Unix-socket round trip.
pub const FORELOCK_UNPREPARED_NAME: &str = "forelock-unprepared";

/// The name of a forelock system whose every operation names a key the
/// broker has never seen (keep-alive policy): an unprepared key as a user
/// meets it. The acquire is one broker round trip; the release is one CAS
/// (issue 12). Checked against the bare Unix-socket round trip.
pub const FORELOCK_FRESH_NAME: &str = "forelock-fresh";

/// Options of `forelock bench`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct BenchArgs {
    /// Print the results as JSON on stdout instead of the table.
    #[arg(long)]
    pub json: bool,

    /// Write HdrHistogram logs (one per system and workload), report.json,
    /// table.txt and latency.png into this directory.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,

    /// Short runs for tests and CI: the whole bench stays under about a minute.
    #[arg(long)]
    pub quick: bool,

    /// Measure every system and workload this many times (interleaved) and
    /// report the median and the spread.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub repeat: u32,

    /// The system the ratios compare with [default: forelock if present, else std-mutex].
    #[arg(long, value_name = "SYSTEM")]
    pub reference: Option<String>,

    /// Only these systems (comma separated names, as in the table).
    #[arg(long, value_delimiter = ',', value_name = "NAMES")]
    pub systems: Vec<String>,

    /// Only these workloads (comma separated: uncontended-1p, uncontended-2p, handoff-2p,
    /// hot-2p, hot-4p, hot-8p, zipf-4p).
    #[arg(long, value_delimiter = ',', value_name = "NAMES")]
    pub workloads: Vec<String>,

    /// Time each worker spends in one measured run [default: 1000, 150 with --quick].
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(10..=60_000))]
    pub duration_ms: Option<u64>,

    /// Instead of the systems: a prepared key's acquire+release from Rust,
    /// C (the C ABI) and Python (the package), beside Python's fcntl.flock
    /// and the filelock package, against one broker.
    #[arg(long)]
    pub languages: bool,

    /// Instead of the systems: many distinct keys through one broker whose
    /// table fills (its eviction and its memory of keys), per window of keys.
    #[arg(long)]
    pub table_cost: bool,

    /// Slots of the broker in --table-cost [default: 16384, 2048 with --quick].
    #[arg(long, value_name = "SLOTS")]
    pub table_slots: Option<u32>,

    /// Distinct keys in --table-cost [default: 100000, 12000 with --quick].
    #[arg(long, value_name = "KEYS")]
    pub table_keys: Option<u64>,

    /// Instead of the systems: global keys (three brokers with `[cluster]`
    /// against an etcd on loopback), beside local keys and etcd's own RPCs.
    #[arg(long)]
    pub cluster: bool,
}

/// Runs `forelock bench` with `extra` systems (forelock) beside the peers.
/// In a worker process (see [`WORKER_ENV`]) it runs the worker instead.
pub fn run_with(args: BenchArgs, extra: Vec<SystemEntry>) -> anyhow::Result<()> {
    let mut entries = extra;
    entries.extend(peers::entries());
    if let Some(spec) = std::env::var_os(WORKER_ENV) {
        return workload::worker_main(std::path::Path::new(&spec), &entries);
    }
    if args.cluster {
        return cluster::run(args.quick);
    }
    if args.languages {
        return languages::run(if args.quick { 20_000 } else { 1_000_000 });
    }
    if args.table_cost {
        let slots = args
            .table_slots
            .unwrap_or(if args.quick { 2048 } else { 16_384 });
        let keys = args
            .table_keys
            .unwrap_or(if args.quick { 12_000 } else { 100_000 });
        return table_cost::run(slots, keys, (keys / 20).max(1));
    }
    let launcher = driver::Launcher::this_command()?;
    let outcome = driver::drive(&args, &entries, &launcher)?;
    report::emit(&args, &outcome)
}
