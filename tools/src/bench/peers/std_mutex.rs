//! In-process `std::sync::Mutex`: the floor a prepared forelock key aims at.

use std::sync::{Mutex, PoisonError};

use crate::bench::system::{
    BenchEnv, LockKey, LockSession, LockSystem, RunShape, Sharing, StartError, SystemEntry,
    SystemTraits, WorkerIdentity,
};

pub const ENTRY: SystemEntry = SystemEntry {
    name: "std-mutex",
    start,
    connect,
};

struct StdMutexSystem;

fn start(_env: &BenchEnv) -> Result<Box<dyn LockSystem>, StartError> {
    Ok(Box::new(StdMutexSystem))
}

impl LockSystem for StdMutexSystem {
    fn traits(&self) -> SystemTraits {
        SystemTraits {
            sharing: Sharing::InProcess,
            excludes: true,
            note: "std-mutex: one std::sync::Mutex<()> per key inside each process (not shared)",
        }
    }

    fn prepare_run(&mut self, _run: &RunShape) -> anyhow::Result<String> {
        Ok(String::new())
    }
}

struct StdMutexSession {
    locks: Vec<Mutex<()>>,
}

fn connect(_config: &str, worker: &WorkerIdentity) -> anyhow::Result<Box<dyn LockSession>> {
    let locks = (0..worker.keys_total).map(|_| Mutex::new(())).collect();
    Ok(Box::new(StdMutexSession { locks }))
}

impl LockSession for StdMutexSession {
    fn with_lock(&mut self, key: LockKey<'_>, critical: &mut dyn FnMut()) -> anyhow::Result<()> {
        let lock = self
            .locks
            .get(key.index as usize)
            .ok_or_else(|| anyhow::anyhow!("key index {} out of range", key.index))?;
        let _guard = lock.lock().unwrap_or_else(PoisonError::into_inner);
        critical();
        Ok(())
    }
}
