//! Async forms of the lock calls, for tokio (cargo feature `tokio`).
//!
//! ```no_run
//! # async fn demo() -> Result<(), forelock::Error> {
//! let client = forelock::Client::connect()?;
//! let guard = client.lock_async("orders:42").await?;
//! println!("holding orders:42 with fencing token {}", guard.token());
//! drop(guard); // released
//! # Ok(())
//! # }
//! ```
//!
//! The fast path (an exclusive lock on a prepared key: one CAS) runs inline
//! on the calling task, as in the synchronous calls: no thread hop, no await.
//! Everything else (the broker round trip, the queue wait, the timeout and
//! its Cancel, reconnects while the broker restarts) runs the client's own
//! synchronous slow path on tokio's blocking pool
//! (`tokio::task::spawn_blocking`), so the runtime's threads never wait.
//!
//! Why the blocking pool rather than a second, async slow path:
//! - the slow path is the subtle part of the client (a hand-off racing a
//!   Cancel, a request re-sent after a broker restart keeping its request
//!   id, the connection pool's wait cells): one implementation of it is
//!   checked by the tests, and the wire protocol under it is changing;
//! - a waiter parks one blocking-pool thread, and a `Client` lets at most
//!   64 slow-path calls talk to the broker at once anyway (its wait cells),
//!   so the cost is bounded by the same limit as synchronous callers;
//! - the fast path, the one that must be cheap, never reaches the pool.
//!
//! Cancellation: dropping a pending future does not withdraw its request.
//! If the lock is granted later, the guard is dropped on the blocking thread
//! and the lock released at once: no lock is ever left held by nobody, but
//! the dropped waiter keeps its place in the FIFO queue until then. To give
//! up waiting, use the `_timeout_async` forms, which withdraw the request
//! from the queue when the time is up.

use crate::key::Name;
use crate::{Client, Error, LockName, OwnedLockGuard, Wait};
use std::time::Duration;

impl Client {
    /// Take `key` exclusively, waiting (without blocking the runtime) as long
    /// as it takes.
    pub async fn lock_async(&self, key: impl LockName) -> Result<OwnedLockGuard, Error> {
        self.acquire_async(key.lock_name()?, false, Wait::Forever)
            .await
    }

    /// Take `key` exclusively if it is free; [`Error::WouldBlock`] if held.
    pub async fn try_lock_async(&self, key: impl LockName) -> Result<OwnedLockGuard, Error> {
        self.acquire_async(key.lock_name()?, false, Wait::Try).await
    }

    /// Take `key` exclusively, waiting at most `timeout` ([`Error::Timeout`]
    /// then; the request leaves the queue).
    pub async fn lock_timeout_async(
        &self,
        key: impl LockName,
        timeout: Duration,
    ) -> Result<OwnedLockGuard, Error> {
        self.acquire_async(key.lock_name()?, false, Wait::Until(timeout))
            .await
    }

    /// Take `key` shared, waiting as long as it takes.
    pub async fn lock_shared_async(&self, key: impl LockName) -> Result<OwnedLockGuard, Error> {
        self.acquire_async(key.lock_name()?, true, Wait::Forever)
            .await
    }

    /// Take `key` shared if no writer holds or awaits it;
    /// [`Error::WouldBlock`] otherwise.
    pub async fn try_lock_shared_async(&self, key: impl LockName) -> Result<OwnedLockGuard, Error> {
        self.acquire_async(key.lock_name()?, true, Wait::Try).await
    }

    /// Take `key` shared, waiting at most `timeout`.
    pub async fn lock_shared_timeout_async(
        &self,
        key: impl LockName,
        timeout: Duration,
    ) -> Result<OwnedLockGuard, Error> {
        self.acquire_async(key.lock_name()?, true, Wait::Until(timeout))
            .await
    }

    async fn acquire_async(
        &self,
        name: Name<'_>,
        shared: bool,
        wait: Wait,
    ) -> Result<OwnedLockGuard, Error> {
        if !shared && let Some(hold) = self.inner.try_fast(&name) {
            return Ok(fast_guard!(&self.inner, hold).into_owned(self));
        }
        let client = self.clone();
        let key = name.bytes.to_vec();
        // The guard is built on the blocking thread: if this future was
        // dropped meanwhile, tokio drops the task's output there, and the
        // guard's drop releases the lock.
        let task = tokio::task::spawn_blocking(move || {
            // The blocking call's whole way (contended path, the broker
            // without queueing, then its queue), as `Client::lock` takes it.
            let guard = client.acquire(key.as_slice().lock_name()?, shared, wait)?;
            Ok(guard.into_owned(&client))
        });
        match task.await {
            Ok(result) => result,
            Err(join) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
            Err(_) => Err(Error::Io(std::io::Error::other(
                "the tokio runtime shut down while the lock request waited",
            ))),
        }
    }
}
