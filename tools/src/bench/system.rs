//! The seam between the benchmark and a lock service under test.
//!
//! A system is used from two sides:
//! - the parent process (the `forelock bench` command) starts it once per
//!   bench run ([`SystemEntry::start`], returning a [`LockSystem`] whose Drop
//!   stops whatever was started: servers, echo threads, files), and prepares
//!   fresh state for each measured run ([`LockSystem::prepare_run`]);
//! - each worker process (the same binary, re-executed) opens one
//!   [`LockSession`] from the string that `prepare_run` returned
//!   ([`SystemEntry::connect`]) and takes locks through it.
//!
//! Plugging forelock in is one [`SystemEntry`] passed to
//! [`super::run_with`] (see the module docs of `bench`).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// A key as the workloads name it: a dense index in `0..keys_total` (for
/// systems that lock by number: byte ranges, slots in an array) and a string
/// name (for systems that lock by name). Both name the same key.
#[derive(Clone, Copy, Debug)]
pub struct LockKey<'a> {
    pub index: u32,
    pub name: &'a str,
}

/// One client of a lock system, living in one worker process.
pub trait LockSession {
    /// Takes `key` exclusively (blocking, or retrying for systems that can only
    /// try), runs `critical` while holding it, then releases it.
    ///
    /// The benchmark times the call to `critical` from inside, so the time from
    /// entering `with_lock` to `critical` running is the acquire latency, and
    /// whatever runs after `critical` returns is the release.
    fn with_lock(&mut self, key: LockKey<'_>, critical: &mut dyn FnMut()) -> anyhow::Result<()>;
}

/// Whether sessions in different processes contend for the same key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Sharing {
    /// A key is one lock for every process on the host (what a lock service is).
    CrossProcess,
    /// Each process has its own locks (std::sync::Mutex): only workloads whose
    /// processes never share a key apply.
    InProcess,
    /// A cross-process lock whose sessions take a key of their own for every
    /// operation (`forelock-fresh`: the unprepared key): only workloads whose
    /// processes never share a key apply.
    FreshKeys,
    /// Not a lock: nothing is taken (`no-lock`). Every workload but the
    /// hand-off applies, to show what the machine adds to each figure by
    /// itself; exclusion is not checked.
    Nothing,
}

/// What a system promises, which decides the workloads that apply to it.
#[derive(Clone, Copy, Debug)]
pub struct SystemTraits {
    pub sharing: Sharing,
    /// False for a baseline that is not a lock (the bare socket round trip):
    /// only workloads without shared keys apply, and exclusion is not checked.
    pub excludes: bool,
    /// One line printed under the table: how the system is set up.
    pub note: &'static str,
}

/// The shape of one measured run, given to [`LockSystem::prepare_run`].
#[derive(Clone, Debug)]
pub struct RunShape {
    /// Keys are `0..keys_total`.
    pub keys_total: u32,
    /// Worker processes that will connect.
    #[allow(dead_code, reason = "for systems plugged in from outside (forelock)")]
    pub processes: usize,
    /// A fresh directory for this run's files, removed after the run.
    pub run_dir: PathBuf,
}

/// The identity of a worker, given to [`SystemEntry::connect`].
#[derive(Clone, Copy, Debug)]
pub struct WorkerIdentity {
    /// `0..processes`.
    pub index: usize,
    #[allow(dead_code, reason = "for systems plugged in from outside (forelock)")]
    pub processes: usize,
    pub keys_total: u32,
}

/// The environment of one bench run, given to [`SystemEntry::start`].
#[derive(Clone, Debug)]
pub struct BenchEnv {
    /// A directory that lives as long as the bench run (servers' data dirs go here).
    pub work_dir: PathBuf,
    /// `--quick`: start fast, keep everything small.
    pub quick: bool,
}

/// A started system, in the parent process. Drop stops what `start` started.
pub trait LockSystem {
    fn traits(&self) -> SystemTraits;

    /// Prepares fresh state for one measured run (new lock files, a clean key
    /// space) and returns the string every worker's `connect` receives: paths,
    /// ports, anything a session needs to find the system.
    fn prepare_run(&mut self, run: &RunShape) -> anyhow::Result<String>;
}

/// Why a system did not start.
#[derive(Debug)]
pub enum StartError {
    /// Its program is not on this machine: the system is reported as skipped.
    NotInstalled { binary: &'static str },
    /// It is installed but failed to start: reported as failed, with the reason.
    Failed(anyhow::Error),
}

impl From<anyhow::Error> for StartError {
    fn from(error: anyhow::Error) -> Self {
        StartError::Failed(error)
    }
}

/// Starts a system in the parent process.
pub type StartFn = fn(&BenchEnv) -> Result<Box<dyn LockSystem>, StartError>;

/// Opens a session in a worker process from `prepare_run`'s string.
pub type ConnectFn = fn(&str, &WorkerIdentity) -> anyhow::Result<Box<dyn LockSession>>;

/// A lock system the benchmark knows by name. The name must be the same in
/// the parent and in the workers (workers look their entry up by it).
#[derive(Clone, Copy)]
pub struct SystemEntry {
    /// Short, stable, used in tables, file names and `--systems`.
    pub name: &'static str,
    pub start: StartFn,
    pub connect: ConnectFn,
}

impl std::fmt::Debug for SystemEntry {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("SystemEntry")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}
