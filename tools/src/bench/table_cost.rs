//! `forelock bench --table-cost`: many distinct keys through one broker, to
//! show the broker's costs that grow with its table (issue 12).
//!
//! One client locks and unlocks `keys` keys it never used before
//! (`tablecost/0`, `tablecost/1`, ...), each a broker round trip for the
//! acquire and one for the release. The broker never prepares
//! (`policy = "none"`) and its allocator ticks once a minute, so nothing is
//! reclaimed during the run: once `slots` keys have a slot every new key
//! evicts one (the allocation's search for a victim), and every
//! `4 * slots + 1024` keys the broker's memory of keys fills and is thinned
//! (`remember`). Printed per window of keys: the mean time per
//! acquire+release (one clock read per window) and the slowest single one.
//!
//! The broker is `forelockd` beside this executable, or the one named by
//! `FORELOCK_BENCH_FORELOCKD` (to compare two builds on one machine).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;

use crate::bench::support::{TempDir, start_forelockd};

/// The broker to measure: `FORELOCK_BENCH_FORELOCKD`, else beside this
/// executable or on PATH.
fn broker() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("FORELOCK_BENCH_FORELOCKD") {
        return Ok(PathBuf::from(path));
    }
    super::forelock::broker_binary().context(
        "no forelockd beside this executable nor on PATH: build it (cargo build -p forelockd)",
    )
}

/// Run `keys` distinct keys through a broker of `slots` slots, printing one
/// line per `window` keys and a total.
pub fn run(slots: u32, keys: u64, window: u64) -> anyhow::Result<()> {
    let binary = broker()?;
    let dir = TempDir::new("table-cost")?;
    let config = format!(
        "[allocator]\npolicy = \"none\"\nkeep_alive_ms = 600000\ntick_ms = 60000\n\n[table]\nslots = {slots}\n"
    );
    let (_broker, runtime_dir) = start_forelockd(&binary, dir.path(), &config)?;
    let client = forelock::Client::connect_to(&runtime_dir)?;
    println!(
        "forelock bench --table-cost: {keys} distinct keys, broker {} with {slots} slots \
         (full after {slots} keys; key memory thinned every {} keys)",
        binary.display(),
        4 * u64::from(slots) + 1024
    );
    println!("{:>16} {:>16} {:>16}", "keys", "mean/op", "slowest op");
    let started = Instant::now();
    let mut done = 0u64;
    while done < keys {
        let end = (done + window).min(keys);
        let window_started = Instant::now();
        let mut slowest = std::time::Duration::ZERO;
        for i in done..end {
            let before = Instant::now();
            let guard = client
                .lock(format!("tablecost/{i}"))
                .with_context(|| format!("acquiring key {i}"))?;
            guard
                .release()
                .with_context(|| format!("releasing key {i}"))?;
            slowest = slowest.max(before.elapsed());
        }
        let mean_ns = window_started.elapsed().as_nanos() as f64 / (end - done) as f64;
        println!(
            "{:>16} {:>16} {:>16}",
            format!("{done}..{end}"),
            super::report::format_ns(mean_ns.round() as u64),
            super::report::format_ns(slowest.as_nanos() as u64)
        );
        done = end;
    }
    let total = started.elapsed();
    println!(
        "total {:.2} s, mean {} per acquire+release",
        total.as_secs_f64(),
        super::report::format_ns((total.as_nanos() as f64 / keys as f64).round() as u64)
    );
    Ok(())
}
