//! The operator commands of `forelock`: `status`, `locks`, `run`, `hist`.
//!
//! `status` and `locks` map the broker's lock table read-only and read its
//! atomics: they never talk to the broker, so they work while it is busy,
//! stuck or gone (then they say so). `run` is a client like any other, and so
//! is the holder process `lock` starts (`unlock` talks to it). `hist`
//! reads the interval logs the broker writes under its runtime directory.
//! See `docs/operations.md`.

mod hist;
mod lock;
mod locks;
mod plot;
mod run;
mod status;

use anyhow::anyhow;
use std::path::{Path, PathBuf};

pub use hist::HistArgs;
pub use lock::{LockArgs, UnlockArgs};
pub use locks::LocksArgs;
pub use run::RunArgs;
pub use status::StatusArgs;

/// The operator subcommands (flattened into `forelock`'s command enum).
#[derive(clap::Subcommand, Debug)]
pub enum OpsCommand {
    /// Broker and forecaster health, table use, hit rate, counters.
    Status(StatusArgs),
    /// One row per key in the table: mode, holders, waiters, fencing token
    /// (like PostgreSQL's pg_locks).
    Locks(LocksArgs),
    /// Run a command while holding a lock (flags and exit codes of flock(1)).
    Run(RunArgs),
    /// Take a lock held on behalf of process PID (a shell's `$$`) until it
    /// exits or `forelock unlock` releases it; prints the fencing token.
    Lock(LockArgs),
    /// Release a lock taken with `forelock lock --pid PID KEY`.
    Unlock(UnlockArgs),
    /// Dump the broker's latency histograms: percentile tables, HdrHistogram
    /// interval logs and a percentile plot (PNG).
    Hist(HistArgs),
}

/// Run one operator command; the result is the process exit code.
pub fn run(cmd: OpsCommand) -> anyhow::Result<i32> {
    match cmd {
        OpsCommand::Status(args) => status::run(&args),
        OpsCommand::Locks(args) => locks::run(&args),
        OpsCommand::Run(args) => Ok(run::run(&args)),
        OpsCommand::Lock(args) => Ok(lock::lock(&args)),
        OpsCommand::Unlock(args) => Ok(lock::unlock(&args)),
        OpsCommand::Hist(args) => hist::run(&args),
    }
}

/// `--runtime-dir`, shared by every operator command.
#[derive(clap::Args, Debug, Clone)]
pub struct RuntimeDirArg {
    /// The broker's runtime directory (default: $FORELOCK_RUNTIME_DIR, else
    /// /run/forelock if it exists or for root, else $XDG_RUNTIME_DIR/forelock,
    /// else /tmp/forelock-<uid>).
    #[arg(long, value_name = "DIR")]
    pub runtime_dir: Option<PathBuf>,
}

impl RuntimeDirArg {
    pub fn dir(&self) -> PathBuf {
        self.runtime_dir
            .clone()
            .unwrap_or_else(shm_layout::default_runtime_dir)
    }
}

/// A read-only mapping of a runtime file and the view validated over it.
pub struct Mapped<V> {
    _map: memmap2::Mmap,
    pub view: V,
}

/// Why a runtime file could not be opened, phrased for an operator.
fn open_error(dir: &Path, path: &Path, error: std::io::Error) -> anyhow::Error {
    match error.kind() {
        std::io::ErrorKind::NotFound => anyhow!(
            "forelockd is not running at {}: there is no {}; start it (`systemctl start \
             forelockd`, or `forelockd --runtime-dir {}`), or pass --runtime-dir / set \
             FORELOCK_RUNTIME_DIR to the directory it serves",
            dir.display(),
            path.display(),
            dir.display()
        ),
        std::io::ErrorKind::PermissionDenied => anyhow!(
            "permission denied on {}: run as a user who may read forelockd's runtime directory \
             (root, or the broker's user or group)",
            path.display()
        ),
        _ => anyhow!("cannot open {}: {error}", path.display()),
    }
}

fn map_file(dir: &Path, name: &str) -> anyhow::Result<(memmap2::Mmap, PathBuf)> {
    let path = dir.join(name);
    let file = std::fs::File::open(&path).map_err(|e| open_error(dir, &path, e))?;
    // SAFETY:
    // - a read-only shared mapping of a regular runtime file; its writers
    //   (broker, clients, forecaster) change it only through atomics, and this
    //   process reads it only through the atomics of a validated view;
    // - the broker never truncates a file it serves; a foreign truncation
    //   would raise SIGBUS, which no forelock process causes.
    let map = unsafe { memmap2::Mmap::map(&file) }
        .map_err(|e| anyhow!("cannot map {}: {e}", path.display()))?;
    Ok((map, path))
}

/// Map `<dir>/table` read-only and validate its header.
pub fn open_table(dir: &Path) -> anyhow::Result<Mapped<shm_layout::table::TableView>> {
    let (map, path) = map_file(dir, shm_layout::TABLE_FILE)?;
    // SAFETY:
    // - `map` is page-aligned (so 64-aligned) and `map.len()` bytes long;
    // - the view is stored beside the mapping in `Mapped`, whose fields drop
    //   together, and it is only lent out by reference, so it never outlives
    //   the mapping;
    // - other processes write the table only through atomics.
    let view = unsafe { shm_layout::table::TableView::new(map.as_ptr(), map.len()) }
        .map_err(|e| anyhow!("the lock table {} cannot be used: {e}", path.display()))?;
    Ok(Mapped { _map: map, view })
}

/// Map `<dir>/scores` read-only and validate its header.
pub fn open_scores(dir: &Path) -> anyhow::Result<Mapped<shm_layout::scores::ScoresView>> {
    let (map, path) = map_file(dir, shm_layout::SCORES_FILE)?;
    // SAFETY: as in `open_table`: page-aligned, `map.len()` bytes, kept alive
    // beside the view, written by others only through atomics.
    let view = unsafe { shm_layout::scores::ScoresView::new(map.as_ptr(), map.len()) }
        .map_err(|e| anyhow!("the score file {} cannot be used: {e}", path.display()))?;
    Ok(Mapped { _map: map, view })
}

/// Whether a process with this pid exists (it may belong to another user).
pub fn process_exists(pid: u32) -> bool {
    if pid == 0 || pid > i32::MAX as u32 {
        return false;
    }
    // SAFETY: kill with signal 0 only checks for existence; no memory is
    // involved.
    let rc = unsafe { libc::kill(pid as libc::pid_t, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// `1234567` ns -> "1.23 ms": three significant figures, unit chosen to fit.
pub fn format_ns(ns: f64) -> String {
    let (value, unit) = if ns >= 1e9 {
        (ns / 1e9, "s")
    } else if ns >= 1e6 {
        (ns / 1e6, "ms")
    } else if ns >= 1e3 {
        (ns / 1e3, "µs")
    } else {
        (ns, "ns")
    };
    if value >= 100.0 {
        format!("{value:.0} {unit}")
    } else if value >= 10.0 {
        format!("{value:.1} {unit}")
    } else {
        format!("{value:.2} {unit}")
    }
}

/// A duration in ms as "3d 4h", "5m 02s", "1.25 s", "12 ms".
pub fn format_ms(ms: u64) -> String {
    let s = ms / 1000;
    if s >= 86_400 {
        format!("{}d {}h", s / 86_400, s % 86_400 / 3600)
    } else if s >= 3600 {
        format!("{}h {:02}m", s / 3600, s % 3600 / 60)
    } else if s >= 60 {
        format!("{}m {:02}s", s / 60, s % 60)
    } else if ms >= 1000 {
        format!("{:.2} s", ms as f64 / 1000.0)
    } else {
        format!("{ms} ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_with_their_unit() {
        assert_eq!(format_ns(950.0), "950 ns");
        assert_eq!(format_ns(1_234.0), "1.23 µs");
        assert_eq!(format_ns(12_345_678.0), "12.3 ms");
        assert_eq!(format_ms(12), "12 ms");
        assert_eq!(format_ms(1_250), "1.25 s");
        assert_eq!(format_ms(62_000), "1m 02s");
        assert_eq!(format_ms(90_061_000), "1d 1h");
    }

    #[test]
    fn a_missing_table_says_the_broker_is_not_running_and_names_the_path() {
        let dir = std::env::temp_dir().join(format!("fl-ops-missing-{}", std::process::id()));
        let error = open_table(&dir).err().expect("no table there").to_string();
        assert!(error.contains("not running"), "{error}");
        assert!(error.contains(&dir.display().to_string()), "{error}");
    }
}
