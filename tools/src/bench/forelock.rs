//! forelock itself as a benchmarked system, twice:
//! - `forelock`: a broker with the keep-alive policy, so a key used a moment
//!   ago is still prepared and the next acquire is one CAS in the client
//!   (contended keys go through the broker's FIFO queue and futex hand-off);
//! - `forelock-unprepared`: a broker that never prepares (`policy = "none"`),
//!   so every acquire is a broker round trip over the Unix socket.
//!
//! Each starts its own `forelockd` (found next to this executable, else on
//! PATH) on a private runtime directory, and stops it when the bench ends.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Context;

use crate::bench::support::{ChildGuard, TempDir, die_with_parent, find_binary, poll_until};
use crate::bench::system::{
    BenchEnv, LockKey, LockSession, LockSystem, RunShape, Sharing, StartError, SystemEntry,
    SystemTraits, WorkerIdentity,
};

pub const PREPARED_ENTRY: SystemEntry = SystemEntry {
    name: super::FORELOCK_NAME,
    start: start_prepared,
    connect,
};

pub const UNPREPARED_ENTRY: SystemEntry = SystemEntry {
    name: super::FORELOCK_UNPREPARED_NAME,
    start: start_unprepared,
    connect,
};

/// Both forelock entries, for `bench::run_with`.
pub fn entries() -> Vec<SystemEntry> {
    vec![PREPARED_ENTRY, UNPREPARED_ENTRY]
}

struct ForelockSystem {
    runtime_dir: PathBuf,
    note: &'static str,
    // Field order: the broker stops before its directory is removed.
    _broker: ChildGuard,
    _dir: TempDir,
}

/// The broker binary: beside this executable (a cargo build puts both in
/// target/<profile>/), else on PATH.
fn broker_binary() -> Option<PathBuf> {
    let beside = std::env::current_exe().ok()?.with_file_name("forelockd");
    if beside.is_file() {
        return Some(beside);
    }
    find_binary("forelockd")
}

/// Extra `[broker]` settings for both forelock systems, from the environment
/// variable `FORELOCK_BENCH_BROKER` (TOML lines, e.g. `futex_wake =
/// "io-uring"` or `spin_us = 0`): how the broker's own options were compared.
fn broker_overrides() -> String {
    match std::env::var("FORELOCK_BENCH_BROKER") {
        Ok(lines) => format!("[broker]\n{lines}\n"),
        Err(_) => String::new(),
    }
}

fn start_with(policy: &str, note: &'static str) -> Result<Box<dyn LockSystem>, StartError> {
    let binary = broker_binary().ok_or(StartError::NotInstalled {
        binary: "forelockd",
    })?;
    let dir = TempDir::new("forelock")?;
    let runtime_dir = dir.path().join("rt");
    let config = dir.path().join("forelockd.toml");
    std::fs::write(
        &config,
        format!(
            "[allocator]\npolicy = \"{policy}\"\nkeep_alive_ms = 5000\n\n[table]\nslots = 32768\n\n{}",
            broker_overrides()
        ),
    )
    .context("writing the broker's configuration")?;
    let log = std::fs::File::create(dir.path().join("forelockd.log")).context("broker log")?;
    let mut command = Command::new(&binary);
    command
        .arg("--config")
        .arg(&config)
        .arg("--runtime-dir")
        .arg(&runtime_dir)
        .env("FORELOCK_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log));
    let child = die_with_parent(&mut command)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let mut broker = ChildGuard::new(child);
    let ready = poll_until(Duration::from_secs(10), Duration::from_millis(10), || {
        matches!(broker.try_wait(), Ok(Some(_)))
            || forelock::Client::connect_to(&runtime_dir).is_ok()
    });
    if !ready || matches!(broker.try_wait(), Ok(Some(_))) {
        let log = std::fs::read_to_string(dir.path().join("forelockd.log")).unwrap_or_default();
        return Err(StartError::Failed(anyhow::anyhow!(
            "forelockd did not start: {}",
            log.trim()
        )));
    }
    Ok(Box::new(ForelockSystem {
        runtime_dir,
        note,
        _broker: broker,
        _dir: dir,
    }))
}

fn start_prepared(_env: &BenchEnv) -> Result<Box<dyn LockSystem>, StartError> {
    start_with(
        "keep-alive",
        "forelock: forelockd with keep-alive preparation; a recently used key is taken by one CAS, contended keys queue FIFO in the broker",
    )
}

fn start_unprepared(_env: &BenchEnv) -> Result<Box<dyn LockSystem>, StartError> {
    start_with(
        "none",
        "forelock-unprepared: forelockd that never prepares: every acquire and release is a round trip to the broker",
    )
}

impl LockSystem for ForelockSystem {
    fn traits(&self) -> SystemTraits {
        SystemTraits {
            sharing: Sharing::CrossProcess,
            excludes: true,
            note: self.note,
        }
    }

    fn prepare_run(&mut self, _run: &RunShape) -> anyhow::Result<String> {
        Ok(self.runtime_dir.to_string_lossy().into_owned())
    }
}

struct ForelockSession {
    client: forelock::Client,
}

fn connect(runtime_dir: &str, _who: &WorkerIdentity) -> anyhow::Result<Box<dyn LockSession>> {
    let client = forelock::Client::connect_to(runtime_dir)?;
    Ok(Box::new(ForelockSession { client }))
}

impl LockSession for ForelockSession {
    fn with_lock(&mut self, key: LockKey<'_>, critical: &mut dyn FnMut()) -> anyhow::Result<()> {
        let guard = self.client.lock(key.name)?;
        critical();
        guard.release()?;
        Ok(())
    }
}
