//! No lock at all: every operation runs the critical section with nothing
//! taken. Not a peer but the machine's own floor: on a hot key with more
//! processes than cores, its "max wait" is how long the CPU scheduler alone
//! keeps a process that was preempted inside a measured call off the CPU,
//! which no lock can do better than (docs/benchmarks.md, "Max wait").

use crate::bench::system::{
    BenchEnv, LockKey, LockSession, LockSystem, RunShape, Sharing, StartError, SystemEntry,
    SystemTraits, WorkerIdentity,
};

pub const ENTRY: SystemEntry = SystemEntry {
    name: "no-lock",
    start,
    connect,
};

struct NoLockSystem;

fn start(_env: &BenchEnv) -> Result<Box<dyn LockSystem>, StartError> {
    Ok(Box::new(NoLockSystem))
}

impl LockSystem for NoLockSystem {
    fn traits(&self) -> SystemTraits {
        SystemTraits {
            sharing: Sharing::Nothing,
            excludes: false,
            note: "no-lock: the same loop with nothing taken (not a lock): its max wait is the CPU scheduler's own, with this many processes on this many cores",
        }
    }

    fn prepare_run(&mut self, _run: &RunShape) -> anyhow::Result<String> {
        Ok(String::new())
    }
}

struct NoLockSession;

fn connect(_config: &str, _worker: &WorkerIdentity) -> anyhow::Result<Box<dyn LockSession>> {
    Ok(Box::new(NoLockSession))
}

impl LockSession for NoLockSession {
    fn with_lock(&mut self, _key: LockKey<'_>, critical: &mut dyn FnMut()) -> anyhow::Result<()> {
        critical();
        Ok(())
    }
}
