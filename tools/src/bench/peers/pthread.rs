//! A process-shared, robust pthread mutex per key, in a MAP_SHARED file:
//! what a C program on one host would use (glibc's futex-based mutex).

use std::path::PathBuf;

use anyhow::Context;

use super::SharedMap;
use crate::bench::system::{
    BenchEnv, LockKey, LockSession, LockSystem, RunShape, Sharing, StartError, SystemEntry,
    SystemTraits, WorkerIdentity,
};

pub const ENTRY: SystemEntry = SystemEntry {
    name: "pthread-robust",
    start,
    connect,
};

const MUTEX_SIZE_BYTES: usize = std::mem::size_of::<libc::pthread_mutex_t>();

struct PthreadSystem;

fn start(_env: &BenchEnv) -> Result<Box<dyn LockSystem>, StartError> {
    Ok(Box::new(PthreadSystem))
}

fn check(rc: libc::c_int, what: &str) -> anyhow::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::from_raw_os_error(rc)).context(what.to_string())
    }
}

/// An initialised attribute object; destroyed on drop.
struct MutexAttributes {
    attributes: libc::pthread_mutexattr_t,
}

impl MutexAttributes {
    fn shared_robust() -> anyhow::Result<Box<MutexAttributes>> {
        // SAFETY:
        // - pthread_mutexattr_t is a plain C struct for which all-zero bytes
        //   are a valid (if meaningless) value; pthread_mutexattr_init below
        //   gives it its real value before any other use.
        let zeroed: libc::pthread_mutexattr_t = unsafe { std::mem::zeroed() };
        let mut boxed = Box::new(MutexAttributes { attributes: zeroed });
        let pointer: *mut libc::pthread_mutexattr_t = &mut boxed.attributes;
        // SAFETY:
        // - `pointer` points to a live, writable attribute object in the box.
        let rc = unsafe { libc::pthread_mutexattr_init(pointer) };
        check(rc, "pthread_mutexattr_init")?;
        // SAFETY:
        // - `pointer` was initialised by pthread_mutexattr_init just above.
        let rc =
            unsafe { libc::pthread_mutexattr_setpshared(pointer, libc::PTHREAD_PROCESS_SHARED) };
        check(rc, "pthread_mutexattr_setpshared(PTHREAD_PROCESS_SHARED)")?;
        // SAFETY:
        // - `pointer` was initialised by pthread_mutexattr_init just above.
        let rc = unsafe { libc::pthread_mutexattr_setrobust(pointer, libc::PTHREAD_MUTEX_ROBUST) };
        check(rc, "pthread_mutexattr_setrobust(PTHREAD_MUTEX_ROBUST)")?;
        Ok(boxed)
    }
}

impl Drop for MutexAttributes {
    fn drop(&mut self) {
        // SAFETY:
        // - the attribute object was initialised in `shared_robust` and is
        //   destroyed exactly once, here.
        unsafe { libc::pthread_mutexattr_destroy(&mut self.attributes) };
    }
}

impl LockSystem for PthreadSystem {
    fn traits(&self) -> SystemTraits {
        SystemTraits {
            sharing: Sharing::CrossProcess,
            excludes: true,
            note: "pthread-robust: pthread_mutex_t per key, PTHREAD_PROCESS_SHARED + ROBUST, in a MAP_SHARED file",
        }
    }

    fn prepare_run(&mut self, run: &RunShape) -> anyhow::Result<String> {
        let path = run.run_dir.join("pthread-mutexes");
        let keys = run.keys_total as usize;
        let mut map = SharedMap::create(&path, keys * MUTEX_SIZE_BYTES)?;
        let attributes = MutexAttributes::shared_robust()?;
        let base = map.as_mut_ptr().cast::<libc::pthread_mutex_t>();
        debug_assert!(base.is_aligned(), "mappings are page aligned");
        for index in 0..keys {
            debug_assert!((index + 1) * MUTEX_SIZE_BYTES <= map.len());
            let mutex = base.wrapping_add(index);
            // SAFETY:
            // - `mutex` is inside the mapping (asserted above) and aligned
            //   (page-aligned base, stride of the type's size);
            // - no other process maps the file yet: workers start after
            //   prepare_run returns, so nobody uses the mutex while it is set up.
            let rc = unsafe { libc::pthread_mutex_init(mutex, &attributes.attributes) };
            check(rc, "pthread_mutex_init")?;
        }
        Ok(path.display().to_string())
    }
}

struct PthreadSession {
    map: SharedMap,
    keys: usize,
}

fn connect(config: &str, worker: &WorkerIdentity) -> anyhow::Result<Box<dyn LockSession>> {
    let map = SharedMap::open(&PathBuf::from(config)).context("pthread mutexes")?;
    let keys = worker.keys_total as usize;
    anyhow::ensure!(
        map.len() >= keys * MUTEX_SIZE_BYTES,
        "mutex file holds {} bytes, expected at least {} for {keys} keys",
        map.len(),
        keys * MUTEX_SIZE_BYTES
    );
    Ok(Box::new(PthreadSession { map, keys }))
}

impl LockSession for PthreadSession {
    fn with_lock(&mut self, key: LockKey<'_>, critical: &mut dyn FnMut()) -> anyhow::Result<()> {
        let index = key.index as usize;
        anyhow::ensure!(index < self.keys, "key index {index} out of range");
        let mutex = self
            .map
            .as_mut_ptr()
            .cast::<libc::pthread_mutex_t>()
            .wrapping_add(index);
        // SAFETY:
        // - `mutex` is inside the mapping (index checked against the size
        //   checked in `connect`), aligned, and was initialised process-shared
        //   by the parent before any worker started.
        let rc = unsafe { libc::pthread_mutex_lock(mutex) };
        if rc == libc::EOWNERDEAD {
            // The previous holder died holding it (robust mutex): we hold it
            // now; mark it consistent so it stays usable.
            // SAFETY:
            // - we hold `mutex` (EOWNERDEAD means the lock was acquired).
            let rc = unsafe { libc::pthread_mutex_consistent(mutex) };
            check(rc, "pthread_mutex_consistent")?;
        } else {
            check(rc, "pthread_mutex_lock")?;
        }
        critical();
        // SAFETY:
        // - we hold `mutex`: it was locked above by this thread.
        let rc = unsafe { libc::pthread_mutex_unlock(mutex) };
        check(rc, "pthread_mutex_unlock")
    }
}
