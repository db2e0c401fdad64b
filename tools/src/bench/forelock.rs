//! forelock itself as a benchmarked system, twice:
//! - `forelock`: a broker with the keep-alive policy, so a key used a moment
//!   ago is still prepared and the next acquire is one CAS in the client
//!   (contended keys go through the broker's FIFO queue and futex hand-off);
//! - `forelock-unprepared`: a broker that never prepares (`policy = "none"`),
//!   so every acquire and every release is a broker round trip over the
//!   Unix socket;
//! - `forelock-fresh`: the keep-alive broker, with every operation on a key
//!   it has never seen: the unprepared key as a user meets it, one round
//!   trip to acquire (the broker places the key, evicting an idle one when
//!   the table is full) and one CAS to release. Its workers never share a
//!   key, so only the workloads without shared keys apply to it.
//!
//! Each starts its own `forelockd` (found next to this executable, else on
//! PATH) on a private runtime directory, and stops it when the bench ends.

use std::path::PathBuf;

use crate::bench::support::{ChildGuard, TempDir, find_binary, start_forelockd};
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

pub const FRESH_ENTRY: SystemEntry = SystemEntry {
    name: super::FORELOCK_FRESH_NAME,
    start: start_fresh,
    connect: connect_fresh,
};

/// The forelock entries, for `bench::run_with`.
pub fn entries() -> Vec<SystemEntry> {
    vec![PREPARED_ENTRY, UNPREPARED_ENTRY, FRESH_ENTRY]
}

struct ForelockSystem {
    runtime_dir: PathBuf,
    note: &'static str,
    sharing: Sharing,
    // Field order: the broker stops before its directory is removed.
    _broker: ChildGuard,
    _dir: TempDir,
}

/// The broker binary: beside this executable (a cargo build puts both in
/// target/<profile>/), else on PATH.
pub(crate) fn broker_binary() -> Option<PathBuf> {
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

fn start_with(
    policy: &str,
    note: &'static str,
    sharing: Sharing,
) -> Result<Box<dyn LockSystem>, StartError> {
    let binary = broker_binary().ok_or(StartError::NotInstalled {
        binary: "forelockd",
    })?;
    let dir = TempDir::new("forelock")?;
    let config = format!(
        "[allocator]\npolicy = \"{policy}\"\nkeep_alive_ms = 5000\n\n[table]\nslots = 32768\n\n{}",
        broker_overrides()
    );
    let (broker, runtime_dir) =
        start_forelockd(&binary, dir.path(), &config).map_err(StartError::Failed)?;
    Ok(Box::new(ForelockSystem {
        runtime_dir,
        note,
        sharing,
        _broker: broker,
        _dir: dir,
    }))
}

fn start_prepared(_env: &BenchEnv) -> Result<Box<dyn LockSystem>, StartError> {
    start_with(
        "keep-alive",
        "forelock: forelockd with keep-alive preparation; a recently used key is taken by one CAS (through a forelock::Key: the name checked and hashed once), waiters on a held key sleep on its slot (barging, a direct hand-off past 500 us)",
        Sharing::CrossProcess,
    )
}

fn start_unprepared(_env: &BenchEnv) -> Result<Box<dyn LockSystem>, StartError> {
    start_with(
        "none",
        "forelock-unprepared: forelockd that never prepares: every acquire and release is a round trip to the broker",
        Sharing::CrossProcess,
    )
}

fn start_fresh(_env: &BenchEnv) -> Result<Box<dyn LockSystem>, StartError> {
    start_with(
        "keep-alive",
        "forelock-fresh: forelockd with keep-alive preparation, every operation on a key never seen before: one round trip to acquire, one CAS to release",
        Sharing::FreshKeys,
    )
}

impl LockSystem for ForelockSystem {
    fn traits(&self) -> SystemTraits {
        SystemTraits {
            sharing: self.sharing,
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
    /// The workload's keys as [`forelock::Key`]s, by key index, made at
    /// first use: names checked and hashed once, as every peer resolves its
    /// names once (a mutex per index, a cached fd per file).
    keys: Vec<Option<forelock::Key>>,
    /// `Some(prefix)`: every operation takes a key never used before,
    /// `prefix` + a counter (`forelock-fresh`).
    fresh: Option<(String, u64)>,
}

fn connect(runtime_dir: &str, who: &WorkerIdentity) -> anyhow::Result<Box<dyn LockSession>> {
    let client = forelock::Client::connect_to(runtime_dir)?;
    Ok(Box::new(ForelockSession {
        client,
        keys: (0..who.keys_total).map(|_| None).collect(),
        fresh: None,
    }))
}

fn connect_fresh(runtime_dir: &str, _who: &WorkerIdentity) -> anyhow::Result<Box<dyn LockSession>> {
    let client = forelock::Client::connect_to(runtime_dir)?;
    // The pid keeps workers' keys apart (and so uncontended).
    let prefix = format!("fresh/{}/", std::process::id());
    Ok(Box::new(ForelockSession {
        client,
        keys: Vec::new(),
        fresh: Some((prefix, 0)),
    }))
}

impl LockSession for ForelockSession {
    fn with_lock(&mut self, key: LockKey<'_>, critical: &mut dyn FnMut()) -> anyhow::Result<()> {
        let guard = match &mut self.fresh {
            None => {
                let slot = self
                    .keys
                    .get_mut(key.index as usize)
                    .ok_or_else(|| anyhow::anyhow!("key index {} out of range", key.index))?;
                let handle = match slot {
                    Some(handle) => handle,
                    None => slot.insert(forelock::Key::new(key.name)?),
                };
                self.client.lock(&*handle)?
            }
            Some((prefix, n)) => {
                *n += 1;
                self.client.lock(format!("{prefix}{n}"))?
            }
        };
        critical();
        guard.release()?;
        Ok(())
    }
}
