//! A raw futex lock on a u32 in a MAP_SHARED file, the kind without
//! FUTEX_PRIVATE_FLAG so that it works between processes: the floor for
//! forelock's contended hand-off.
//!
//! The lock is Drepper's "mutex2" ("Futexes Are Tricky", 2011), no spinning:
//!
//! | word | meaning                          |
//! |------|----------------------------------|
//! | 0    | free                             |
//! | 1    | held, nobody sleeping            |
//! | 2    | held, maybe someone sleeping     |

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::Context;

use super::SharedMap;
use crate::bench::system::{
    BenchEnv, LockKey, LockSession, LockSystem, RunShape, Sharing, StartError, SystemEntry,
    SystemTraits, WorkerIdentity,
};

pub const ENTRY: SystemEntry = SystemEntry {
    name: "futex",
    start,
    connect,
};

const FREE: u32 = 0;
const HELD: u32 = 1;
const HELD_WITH_WAITERS: u32 = 2;

struct FutexSystem;

fn start(_env: &BenchEnv) -> Result<Box<dyn LockSystem>, StartError> {
    Ok(Box::new(FutexSystem))
}

impl LockSystem for FutexSystem {
    fn traits(&self) -> SystemTraits {
        SystemTraits {
            sharing: Sharing::CrossProcess,
            excludes: true,
            note: "futex: one u32 per key in a MAP_SHARED file, FUTEX_WAIT/WAKE (shared), no spin",
        }
    }

    fn prepare_run(&mut self, run: &RunShape) -> anyhow::Result<String> {
        let path = run.run_dir.join("futex-words");
        SharedMap::create(&path, run.keys_total as usize * 4)?;
        Ok(path.display().to_string())
    }
}

struct FutexSession {
    map: SharedMap,
}

fn connect(config: &str, _worker: &WorkerIdentity) -> anyhow::Result<Box<dyn LockSession>> {
    let map = SharedMap::open(&PathBuf::from(config)).context("futex words")?;
    Ok(Box::new(FutexSession { map }))
}

fn futex_wait(word: &AtomicU32, expected: u32) {
    // A bounded sleep: the caller re-checks the word whatever happened.
    let timeout = libc::timespec {
        tv_sec: 1,
        tv_nsec: 0,
    };
    // SAFETY:
    // - `word` is a live, aligned u32 in a shared mapping for the whole call;
    // - `timeout` is a valid timespec on our stack; the kernel only reads it.
    // FUTEX_WAIT without FUTEX_PRIVATE_FLAG: the word is shared between processes.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &timeout as *const libc::timespec,
        )
    };
}

fn futex_wake_one(word: &AtomicU32) {
    // SAFETY:
    // - `word` is a live, aligned u32 in a shared mapping; FUTEX_WAKE does not
    //   access the memory, it only uses the address as a key.
    unsafe { libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, 1) };
}

impl LockSession for FutexSession {
    fn with_lock(&mut self, key: LockKey<'_>, critical: &mut dyn FnMut()) -> anyhow::Result<()> {
        let word = self
            .map
            .words_u32()
            .get(key.index as usize)
            .ok_or_else(|| anyhow::anyhow!("key index {} out of range", key.index))?;
        // SYNC POINT: Acquire pairs with the Release of the unlock below (in
        // whichever process held the lock last).
        let mut current =
            match word.compare_exchange(FREE, HELD, Ordering::Acquire, Ordering::Relaxed) {
                Ok(_) => FREE,
                Err(found) => found,
            };
        if current != FREE {
            if current != HELD_WITH_WAITERS {
                current = word.swap(HELD_WITH_WAITERS, Ordering::Acquire);
            }
            while current != FREE {
                futex_wait(word, HELD_WITH_WAITERS);
                current = word.swap(HELD_WITH_WAITERS, Ordering::Acquire);
            }
        }
        critical();
        // SYNC POINT: Release pairs with the Acquire of the next locker.
        if word.fetch_sub(1, Ordering::Release) != HELD {
            word.store(FREE, Ordering::Release);
            futex_wake_one(word);
        }
        Ok(())
    }
}
