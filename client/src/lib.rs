//! Named locks shared by the processes of one host, served by `forelockd`.
//!
//! A [`Client`] maps the broker's lock table into this process. When a key is
//! *prepared* (the broker, guided by its forecaster, set up its slot ahead of
//! time), [`Client::lock`] takes the lock with one compare-and-swap in shared
//! memory: no syscall, no broker. If a prepared key is held, the caller sleeps
//! on a futex in the key's slot (still no broker): a release wakes one sleeper
//! or lets a running acquirer barge, and a caller that has waited past a bound
//! ([`Client::set_fair_after`], default [`FAIR_AFTER_DEFAULT`]) gets a direct
//! hand-off. Otherwise the request goes to the broker over a Unix socket; if
//! the key is held there, the caller sleeps on a shared futex until the
//! holder's release hands the lock over (FIFO, no barging; also what
//! [`Client::set_fifo`] asks for on prepared keys). Every grant
//! carries a 64-bit fencing token that never goes backwards for a key, and
//! says whether the previous holder died holding the lock.
//!
//! ```no_run
//! # fn main() -> Result<(), forelock::Error> {
//! // Needs a running broker: `forelockd` (it serves $FORELOCK_RUNTIME_DIR).
//! let client = forelock::Client::connect()?;
//! {
//!     let guard = client.lock("orders:42")?;
//!     if guard.previous_owner_died() {
//!         // The last holder crashed inside its critical section: repair first.
//!     }
//!     // Pass the token to storage that rejects writes with an older token.
//!     println!("holding orders:42 with fencing token {}", guard.token());
//! } // released here (or call `guard.release()` to see release errors)
//!
//! match client.try_lock("orders:43") {
//!     Ok(_guard) => { /* got it */ }
//!     Err(forelock::Error::WouldBlock { .. }) => { /* someone else has it */ }
//!     Err(e) => return Err(e),
//! }
//! let _readers = client.lock_shared_timeout("config", std::time::Duration::from_millis(100))?;
//! # Ok(())
//! # }
//! ```
//!
//! With the cargo feature `tokio`, `lock_async` and its try, timeout and
//! shared forms wait without blocking the runtime's threads; they return an
//! [`OwnedLockGuard`], which any guard becomes with [`LockGuard::into_owned`].
//!
//! A `Client` is `Send + Sync` and cheap to clone (an `Arc`): share one per
//! process. It keeps a pool of up to [`shm_layout::table::WAIT_CELLS`] broker
//! connections, one per concurrent blocking call; further callers wait for a
//! free connection. The protocol is in `docs/protocol.md`.
//!
//! [`observe`] asks the broker about its state without a `Client` (no
//! client record, a short timeout): who waits for a key, in queue order.
//!
//! If the broker restarts and re-adopts its table, the client reconnects
//! (for up to 5 s) and carries on: held locks stay held. If the broker lost
//! the client's registration (it recreated the table), calls fail with
//! [`Error::BrokerRestarted`]: create a new `Client`.
//!
//! Known limits:
//! - a call queued when the broker restarts asks the new broker again and
//!   loses its FIFO position;
//! - with 64 calls of one `Client` blocked at once, a 65th call (even a
//!   `try_lock` on an unprepared key) waits for one of them to finish; the
//!   fast path never waits.

mod conn;
mod error;
mod key;
mod mapped;
pub mod observe;

pub use error::Error;
pub use key::{Key, LockName};
pub use shm_layout::{KeyError, LayoutError, MAX_KEY_LEN};

use conn::{Conn, ConnError, futex_wait};
use error::key_text;
use key::Name;
use mapped::{
    Contended, FastHold, MappedEvents, MappedTable, contended_acquire, fast_acquire_seen,
    fast_release,
};
use shm_layout::events::Outcome;
use shm_layout::lockword::Word;
use shm_layout::sync::shm::{AtomicU32, Ordering};
use shm_layout::table::{
    CELL_ABANDONED, CELL_IDLE, CELL_WAITING, TABLE_VERSION, WAIT_CELLS, WaitCell,
};
use shm_layout::wire::{ErrorCode, Request, Response};
use shm_layout::{EVENTS_FILE, SOCKET_FILE, TABLE_FILE};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// How long a broken connection is retried (the broker restarting) before the
/// call fails with [`Error::BrokerNotRunning`].
const RECONNECT_FOR: Duration = Duration::from_secs(5);
const RECONNECT_BACKOFF_FIRST: Duration = Duration::from_millis(5);
const RECONNECT_BACKOFF_MAX: Duration = Duration::from_millis(250);
/// A blocked call wakes at least this often to notice a broker restart.
const WAIT_SLICE: Duration = Duration::from_millis(50);
/// How long dropping a `Client` waits for the broker to acknowledge its Bye.
const BYE_WAIT: Duration = Duration::from_millis(500);
/// Times one request is sent again after its connection broke.
const RESEND_MAX: u32 = 3;

/// How one try of [`Client::connect_to`] failed.
enum Connect {
    /// The broker's socket is there but its broker is not serving (not
    /// listening yet, or it died during the handshake): try again.
    Retry {
        socket: PathBuf,
        cause: std::io::Error,
    },
    Failed(Error),
}

/// The guard of an exclusive hold `$hold` (a [`FastHold`]) made on the
/// fast path, built in place (see `Client::acquire`).
macro_rules! fast_guard {
    ($inner:expr, $hold:expr) => {{
        let hold: $crate::mapped::FastHold = $hold;
        $crate::LockGuard {
            inner: $inner,
            slot: hold.slot,
            token: hold.token,
            owner_died: hold.owner_died,
            shared: false,
            how: $crate::Grant::Fast(hold.held),
            released: false,
        }
    }};
}

/// The guard of a grant `$grant` (a [`BrokerGrant`]) the broker made,
/// built in place (see `Client::acquire`).
macro_rules! broker_guard {
    ($inner:expr, $grant:expr, $shared:expr) => {{
        let (inner, grant, shared): (&Arc<Inner>, BrokerGrant, bool) = ($inner, $grant, $shared);
        LockGuard {
            inner,
            slot: grant.slot,
            token: grant.token,
            owner_died: grant.owner_died,
            shared,
            how: inner.grant_kind(&grant, shared),
            released: false,
        }
    }};
}

// After the guard macros, which it uses.
#[cfg(feature = "tokio")]
mod async_tokio;

/// A connection to `forelockd` and a mapping of its lock table: the handle
/// every lock is taken through. Clone it freely (it is an `Arc`).
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("runtime_dir", &self.inner.dir)
            .field("client_index", &self.inner.index)
            .finish_non_exhaustive()
    }
}

struct Inner {
    table: MappedTable,
    events: MappedEvents,
    dir: PathBuf,
    socket: PathBuf,
    /// Our client record: the owner id in lock words, our event ring.
    index: u32,
    pool: Mutex<Pool>,
    /// Signalled when a connection returns to the pool or a cell frees up.
    pool_changed: Condvar,
    /// The broker forgot this client (it recreated the table): every call
    /// fails with BrokerRestarted.
    lost: AtomicBool,
    /// The id of the next acquire sent to the broker (never 0: the broker
    /// reserves it). A re-sent acquire keeps its id, so the broker answers
    /// it with the grant it already made instead of granting twice.
    next_request: AtomicU64,
    /// The contended path's fairness bound, in nanoseconds.
    fair_after_ns: AtomicU64,
    /// Waiters on a held key queue in the broker, strictly FIFO, instead of
    /// sleeping on the slot's futexes ([`Client::set_fifo`]).
    fifo: AtomicBool,
}

/// [`FAIR_AFTER_DEFAULT`], or `FORELOCK_FAIR_AFTER_US` when set to a number
/// of microseconds from 1 to 1,000,000 (anything else is ignored).
fn fair_after_from_env() -> Duration {
    std::env::var("FORELOCK_FAIR_AFTER_US")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|us| (1..=1_000_000).contains(us))
        .map_or(FAIR_AFTER_DEFAULT, Duration::from_micros)
}

impl Drop for Inner {
    /// Tell the broker this client is done, so its record is freed now rather
    /// than when the process exits. Every guard borrowed the client, so none
    /// is left (one leaked with `mem::forget` is released as owner-died).
    ///
    /// The answer is awaited (so a `Client` created right after this one is
    /// dropped finds the record free), but for at most [`BYE_WAIT`]: a stuck
    /// broker must not make a drop hang. Unanswered, the Bye is still read
    /// by the broker when it resumes.
    fn drop(&mut self) {
        let conn = self.pool().idle.pop();
        if let Some(mut conn) = conn {
            let _ = conn.set_answer_timeout(BYE_WAIT);
            let _ = conn.call(&Request::Bye);
        }
    }
}

/// Connections not in use, and which wait cells have a connection at all.
struct Pool {
    idle: Vec<Conn>,
    /// Bit `c`: cell `c` belongs to an open (idle or leased) connection.
    cells_used: u64,
    /// Callers waiting on `pool_changed` for a connection.
    waiters: usize,
}

const _: () = assert!(WAIT_CELLS == 64, "the pool's cell bitmap is one u64");

/// How long a slow-path acquire may wait.
#[derive(Clone, Copy)]
enum Wait {
    /// Do not queue: `WouldBlock` if held.
    Try,
    Forever,
    /// Queue for at most this long (counted from the slow path's start: the
    /// fast path costs no clock read).
    Until(Duration),
}

/// How the contended path ended without an error.
enum ContendedAnswer {
    Held(FastHold),
    /// Ask the broker, waiting at most this.
    Broker(Wait),
}

/// A contended waiter's default fairness bound: past it, the next release
/// hands the lock to it directly. Overridden by
/// `FORELOCK_FAIR_AFTER_US` or [`Client::set_fair_after`].
pub const FAIR_AFTER_DEFAULT: Duration = Duration::from_micros(500);

/// How a held lock was granted, and so how it is released.
#[derive(Clone, Copy, Debug)]
enum Grant {
    /// Our own CAS on a prepared slot (no broker): released by CAS from
    /// the word we wrote.
    Fast(Word),
    /// The broker, as a fast-path hold (one round trip for an unprepared
    /// key): released by CAS from the word it wrote.
    BrokerFast(Word),
    /// The broker, managed: released through the broker.
    Broker,
}

impl Grant {
    /// The word a release CAS expects, if the release is a CAS (it falls
    /// back to the broker when the broker took the slot over meanwhile).
    fn release_word(self) -> Option<Word> {
        match self {
            Grant::Fast(held) | Grant::BrokerFast(held) => Some(held),
            Grant::Broker => None,
        }
    }
}

/// A lock granted by the broker (slow path or hand-off).
struct BrokerGrant {
    slot: u32,
    token: u64,
    owner_died: bool,
}

/// How a sleep on the wait cell ended.
enum WaitEnd {
    Granted {
        token: u64,
        owner_died: bool,
    },
    /// The broker dropped the request (it restarted and lost its queue, or
    /// abandoned the wait): send the acquire again.
    Requeue,
    TimedOut,
}

impl Client {
    /// Connect to the broker serving [`shm_layout::default_runtime_dir`]
    /// (`$FORELOCK_RUNTIME_DIR`, else `/run/forelock` when it exists (the
    /// systemd broker's, for every user) or for root, else
    /// `$XDG_RUNTIME_DIR/forelock`, else `/tmp/forelock-<uid>`). A user
    /// other than the broker's must be in its access group (the systemd
    /// unit's `forelock`): others cannot open its files or socket.
    pub fn connect() -> Result<Client, Error> {
        Client::connect_to(shm_layout::default_runtime_dir())
    }

    /// Connect to the broker serving `runtime_dir`: map its table and event
    /// files, validate them, and register over its socket.
    ///
    /// A broker that is restarting (its socket is there, but it died
    /// during our handshake or is not listening yet) is waited for, as a
    /// call of a connected client waits for it, up to [`RECONNECT_FOR`]; a
    /// directory with no socket fails at once ([`Error::BrokerNotRunning`]).
    /// A process that started while the broker was killed failed at once
    /// before: its handshake was reset (ECONNRESET).
    pub fn connect_to(runtime_dir: impl AsRef<Path>) -> Result<Client, Error> {
        let dir = runtime_dir.as_ref();
        let start = Instant::now();
        let mut backoff = RECONNECT_BACKOFF_FIRST;
        loop {
            match Client::connect_once(dir) {
                Ok(client) => return Ok(client),
                Err(Connect::Failed(e)) => return Err(e),
                Err(Connect::Retry { socket, cause }) => {
                    if start.elapsed() >= RECONNECT_FOR {
                        return Err(Error::BrokerNotRunning { socket, cause });
                    }
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(RECONNECT_BACKOFF_MAX);
                }
            }
        }
    }

    /// One try of [`Client::connect_to`].
    fn connect_once(dir: &Path) -> Result<Client, Connect> {
        let dir = dir.to_owned();
        let socket = dir.join(SOCKET_FILE);
        let table = match open_table(&dir.join(TABLE_FILE)) {
            Ok(table) => table,
            // No table and no socket: the broker never ran here.
            Err(Error::TableUnreadable { cause, .. })
                if cause.kind() == std::io::ErrorKind::NotFound && !socket.exists() =>
            {
                return Err(Connect::Failed(Error::BrokerNotRunning { socket, cause }));
            }
            Err(e) => return Err(Connect::Failed(e)),
        };
        let events = MappedEvents::open(&dir.join(EVENTS_FILE)).map_err(Connect::Failed)?;
        let (mut conn, index) = match Conn::open(&socket, None, 0) {
            Ok(opened) => opened,
            Err(ConnError::Broken(cause)) if socket.exists() => {
                return Err(Connect::Retry { socket, cause });
            }
            Err(ConnError::Broken(cause)) => {
                return Err(Connect::Failed(Error::BrokerNotRunning { socket, cause }));
            }
            Err(ConnError::Other(e)) => return Err(Connect::Failed(e)),
        };
        // A broker that restarted between our mapping and our handshake may
        // have made a new table: map the one it serves.
        if let Err(detail) = table.still_current() {
            return Err(Connect::Retry {
                socket,
                cause: std::io::Error::other(detail),
            });
        }
        if table.view().client(index).is_none() {
            return Err(Connect::Failed(Error::Protocol {
                message: format!(
                    "welcomed as client record {index}, but the table has only {}",
                    table.view().geometry().client_count
                ),
            }));
        }
        let inner = Inner {
            table,
            events,
            dir,
            socket,
            index,
            pool: Mutex::new(Pool {
                idle: Vec::with_capacity(WAIT_CELLS),
                cells_used: 0,
                waiters: 0,
            }),
            pool_changed: Condvar::new(),
            lost: AtomicBool::new(false),
            next_request: AtomicU64::new(1),
            fair_after_ns: AtomicU64::new(fair_after_from_env().as_nanos() as u64),
            fifo: AtomicBool::new(std::env::var_os("FORELOCK_FIFO").is_some_and(|v| v == "1")),
        };
        inner.cell(0).state.store(CELL_IDLE, Ordering::Relaxed);
        conn.epoch = inner.broker_epoch();
        {
            let mut pool = inner.pool();
            pool.cells_used = 1;
            pool.idle.push(conn);
        }
        Ok(Client {
            inner: Arc::new(inner),
        })
    }

    /// How long a waiter on a contended prepared key lets running
    /// acquirers take the lock first (barging, for throughput) before the
    /// next release hands the lock to it directly. Default
    /// [`FAIR_AFTER_DEFAULT`]; shorter is fairer and slower.
    pub fn set_fair_after(&self, bound: Duration) {
        let ns = bound.as_nanos().clamp(1_000, 1_000_000_000) as u64;
        self.inner.fair_after_ns.store(ns, Ordering::Relaxed);
    }

    /// `true`: a wait for a held key queues in the broker, strictly first
    /// come first served (no barging; every hand-off is a broker round trip,
    /// about 40 µs). `false` (the default, or `FORELOCK_FIFO=1` for `true`):
    /// waiters on a prepared key sleep on its slot and a release lets a
    /// running acquirer barge, with a direct hand-off to any waiter past
    /// [`Client::set_fair_after`]'s bound.
    pub fn set_fifo(&self, fifo: bool) {
        self.inner.fifo.store(fifo, Ordering::Relaxed);
    }

    /// This client's record index in the table (the owner id in lock words).
    pub fn client_index(&self) -> u32 {
        self.inner.index
    }

    /// The runtime directory this client serves from.
    pub fn runtime_dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Take `key` exclusively, waiting as long as it takes.
    #[inline]
    pub fn lock(&self, key: impl LockName) -> Result<LockGuard<'_>, Error> {
        self.acquire(key.lock_name()?, false, Wait::Forever)
    }

    /// Take `key` exclusively if it is free; [`Error::WouldBlock`] if held.
    #[inline]
    pub fn try_lock(&self, key: impl LockName) -> Result<LockGuard<'_>, Error> {
        self.acquire(key.lock_name()?, false, Wait::Try)
    }

    /// Take `key` exclusively, waiting at most `timeout`
    /// ([`Error::Timeout`] then).
    #[inline]
    pub fn lock_timeout(
        &self,
        key: impl LockName,
        timeout: Duration,
    ) -> Result<LockGuard<'_>, Error> {
        self.acquire(key.lock_name()?, false, Wait::Until(timeout))
    }

    /// Take `key` shared (many readers, no writer), waiting as long as it
    /// takes. Shared locks always go through the broker.
    pub fn lock_shared(&self, key: impl LockName) -> Result<LockGuard<'_>, Error> {
        self.acquire(key.lock_name()?, true, Wait::Forever)
    }

    /// Take `key` shared if no writer holds or awaits it; [`Error::WouldBlock`]
    /// otherwise.
    pub fn try_lock_shared(&self, key: impl LockName) -> Result<LockGuard<'_>, Error> {
        self.acquire(key.lock_name()?, true, Wait::Try)
    }

    /// Take `key` shared, waiting at most `timeout`.
    pub fn lock_shared_timeout(
        &self,
        key: impl LockName,
        timeout: Duration,
    ) -> Result<LockGuard<'_>, Error> {
        self.acquire(key.lock_name()?, true, Wait::Until(timeout))
    }

    /// One Ping/Pong round trip with the broker, timed: the broker round trip
    /// the benchmark measures.
    pub fn ping(&self) -> Result<Duration, Error> {
        self.inner.ping()
    }

    #[inline(always)]
    fn acquire(&self, name: Name<'_>, shared: bool, wait: Wait) -> Result<LockGuard<'_>, Error> {
        // The guards below are built in place by macros, not returned by a
        // helper: through a helper's return value the fast path's guard took
        // a copy that stalled on store forwarding (a `Key`'s prepared
        // acquire+release took 27.3 ns of CPU instead of 19.5).
        let (key, hash) = (name.bytes, name.hash);
        let mut wait = wait;
        if !shared {
            if let Some(hold) = self.inner.try_fast(&name) {
                return Ok(fast_guard!(&self.inner, hold));
            }
            if !matches!(wait, Wait::Try) && !self.inner.fifo.load(Ordering::Relaxed) {
                match self.inner.try_contended(key, hash, wait)? {
                    ContendedAnswer::Held(hold) => return Ok(fast_guard!(&self.inner, hold)),
                    ContendedAnswer::Broker(rest) => wait = rest,
                }
                // Not on the fast path (not prepared, or taken over): ask
                // the broker without queueing first. It grants a free key,
                // and answers a key held on the fast path with WouldBlock
                // without taking it over; the contended path then sleeps on
                // the slot. So a key that many processes want at once while
                // it is unprepared stays on the fast path: queueing each of
                // them in the broker made every later acquire queue there
                // too, and with 8 processes the queue never drained (issue
                // 12). A wait with a timeout may overrun it by this round
                // trip.
                match self.inner.acquire_slow(key, false, Wait::Try) {
                    Ok(grant) => return Ok(broker_guard!(&self.inner, grant, false)),
                    Err(Error::WouldBlock { .. }) => {}
                    Err(e) => return Err(e),
                }
                match self.inner.try_contended(key, hash, wait)? {
                    ContendedAnswer::Held(hold) => return Ok(fast_guard!(&self.inner, hold)),
                    ContendedAnswer::Broker(rest) => wait = rest,
                }
            }
        }
        let grant = self.inner.acquire_slow(key, shared, wait)?;
        Ok(broker_guard!(&self.inner, grant, shared))
    }
}

/// How long `connect` waits for a table the broker is still creating.
const TABLE_NOT_READY_FOR: Duration = Duration::from_secs(1);

/// Open the table, waiting briefly while its creator has not published it.
fn open_table(path: &Path) -> Result<MappedTable, Error> {
    let start = Instant::now();
    loop {
        match MappedTable::open(path) {
            Err(Error::TableUnavailable {
                cause: LayoutError::NotReady,
                ..
            }) if start.elapsed() < TABLE_NOT_READY_FOR => {
                std::thread::sleep(Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

fn deadline_after(start: Instant, timeout: Duration) -> Instant {
    // A timeout too large to represent means "wait forever", practically.
    start
        .checked_add(timeout)
        .unwrap_or_else(|| start + Duration::from_secs(100 * 365 * 24 * 3600))
}

impl Inner {
    fn pool(&self) -> MutexGuard<'_, Pool> {
        // A panic while holding the pool lock leaves the pool consistent (every
        // update is one push/pop or bit flip), so a poisoned lock is usable.
        self.pool.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn cell(&self, cell: u32) -> &WaitCell {
        debug_assert!((cell as usize) < WAIT_CELLS);
        let record = self
            .table
            .view()
            .client(self.index)
            .expect("the client index was bounds-checked at registration");
        &record.cells[cell as usize % WAIT_CELLS]
    }

    /// The epoch of the broker serving the table now (bumped at each start).
    fn broker_epoch(&self) -> u64 {
        self.table
            .view()
            .header()
            .broker_epoch
            .load(Ordering::Relaxed)
    }

    fn check_not_lost(&self) -> Result<(), Error> {
        if self.lost.load(Ordering::Relaxed) {
            return Err(Error::BrokerRestarted {
                detail: "an earlier call found this client's registration gone".into(),
            });
        }
        Ok(())
    }

    /// The fast path: one CAS on a prepared slot, then a `FastHit` event.
    #[inline]
    fn try_fast(&self, name: &Name<'_>) -> Option<FastHold> {
        let view = self.table.view();
        // A table the broker retired (version no longer ours) or a client the
        // broker forgot must not grant itself anything: go to the broker.
        if view.header().version.load(Ordering::Relaxed) != TABLE_VERSION
            || self.lost.load(Ordering::Relaxed)
        {
            return None;
        }
        let (slot, seen) = name.find(view)?;
        let hold = fast_acquire_seen(view, name.bytes, slot, seen, self.index)?;
        if hold.give_back {
            // Not ours to keep (see FastHold::give_back): give it back.
            let _ = self.release_through_broker(hold.slot, hold.token);
            return None;
        }
        self.events.record(self.index, name.hash, Outcome::FastHit);
        Some(hold)
    }

    /// The contended path: the key is prepared and held. Sleep on the slot's
    /// futexes (no broker) until granted, handed off or timed out; a word
    /// that leaves the fast path's states sends the caller to the broker
    /// with what is left of its wait.
    #[cold]
    #[inline(never)]
    fn try_contended(&self, key: &[u8], hash: u64, wait: Wait) -> Result<ContendedAnswer, Error> {
        let view = self.table.view();
        if view.header().version.load(Ordering::Relaxed) != TABLE_VERSION
            || self.lost.load(Ordering::Relaxed)
        {
            return Ok(ContendedAnswer::Broker(wait));
        }
        let Some((_, seen)) = view.lookup(key, hash) else {
            return Ok(ContendedAnswer::Broker(wait));
        };
        // Any prepared word: held (sleep), handed off (wait for it), or free
        // again by now (the first turn of `lock_contended` takes it). A
        // free word sent to the broker here would make it take the slot
        // over (clear PREPARED) and push every other acquirer of the key to
        // the broker until its queue drains.
        if !seen.is_prepared() {
            return Ok(ContendedAnswer::Broker(wait));
        }
        let start = Instant::now();
        let deadline = match wait {
            Wait::Until(timeout) => Some(deadline_after(start, timeout)),
            Wait::Try | Wait::Forever => None,
        };
        self.events.record(self.index, hash, Outcome::Contended);
        let fair_after = Duration::from_nanos(self.fair_after_ns.load(Ordering::Relaxed));
        match contended_acquire(view, key, hash, self.index, fair_after, deadline) {
            Contended::Held(hold) if hold.give_back => {
                let _ = self.release_through_broker(hold.slot, hold.token);
                Ok(ContendedAnswer::Broker(wait))
            }
            Contended::Held(hold) => Ok(ContendedAnswer::Held(hold)),
            Contended::TimedOut => Err(Error::Timeout {
                key: key_text(key),
                waited: start.elapsed(),
            }),
            Contended::Broker => Ok(ContendedAnswer::Broker(match (wait, deadline) {
                (Wait::Until(_), Some(deadline)) => {
                    Wait::Until(deadline.saturating_duration_since(Instant::now()))
                }
                (other, _) => other,
            })),
        }
    }

    // ---- the connection pool ------------------------------------------------

    /// A connection for one request, or `None` if `deadline` passed while
    /// every cell was busy.
    #[cold]
    #[inline(never)]
    fn checkout(&self, deadline: Option<Instant>) -> Result<Option<Lease<'_>>, Error> {
        let mut pool = self.pool();
        loop {
            if let Some(conn) = pool.idle.pop() {
                return Ok(Some(Lease {
                    inner: self,
                    cell: conn.cell,
                    conn: Some(conn),
                }));
            }
            if pool.cells_used != u64::MAX {
                let cell = (!pool.cells_used).trailing_zeros();
                pool.cells_used |= 1 << cell;
                drop(pool);
                // From here on the lease owns the cell: dropping it on an error
                // frees the cell again.
                let mut lease = Lease {
                    inner: self,
                    cell,
                    conn: None,
                };
                lease.conn = Some(self.attach(cell)?);
                return Ok(Some(lease));
            }
            let slice = match deadline {
                None => WAIT_SLICE,
                Some(deadline) => {
                    let now = Instant::now();
                    if now >= deadline {
                        return Ok(None);
                    }
                    (deadline - now).min(WAIT_SLICE)
                }
            };
            pool.waiters += 1;
            pool = self
                .pool_changed
                .wait_timeout(pool, slice)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
            pool.waiters -= 1;
        }
    }

    /// Open a connection for `cell` attached to our record, retrying while the
    /// broker restarts (bounded by [`RECONNECT_FOR`]).
    #[cold]
    #[inline(never)]
    fn attach(&self, cell: u32) -> Result<Conn, Error> {
        let start = Instant::now();
        let mut backoff = RECONNECT_BACKOFF_FIRST;
        loop {
            self.check_not_lost()?;
            match Conn::open(&self.socket, Some(self.index), cell) {
                Ok((mut conn, _)) => {
                    if let Err(detail) = self.table.still_current() {
                        self.lost.store(true, Ordering::Relaxed);
                        return Err(Error::BrokerRestarted { detail });
                    }
                    conn.epoch = self.broker_epoch();
                    return Ok(conn);
                }
                Err(ConnError::Broken(cause)) => {
                    if start.elapsed() >= RECONNECT_FOR {
                        return Err(Error::BrokerNotRunning {
                            socket: self.socket.clone(),
                            cause,
                        });
                    }
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(RECONNECT_BACKOFF_MAX);
                }
                Err(ConnError::Other(e)) => {
                    if matches!(e, Error::BrokerRestarted { .. }) {
                        self.lost.store(true, Ordering::Relaxed);
                    }
                    return Err(e);
                }
            }
        }
    }

    /// Send `request` on the lease's connection and read the answer; if the
    /// connection broke, reattach and send it again (bounded). `before_send`
    /// runs before every send. Returns the answer and whether it was resent.
    #[cold]
    #[inline(never)]
    fn call(
        &self,
        lease: &mut Lease<'_>,
        request: &Request,
        before_send: impl Fn(),
    ) -> Result<(Response, bool), Error> {
        let mut resent = 0;
        loop {
            if lease.conn.is_none() {
                lease.conn = Some(self.attach(lease.cell)?);
            }
            let conn = lease.conn.as_mut().expect("attached just above");
            before_send();
            match conn.call(request) {
                Ok(response) => {
                    if let Response::Error {
                        code: ErrorCode::NotYourRecord,
                        ..
                    } = response
                    {
                        // The broker no longer knows our record: nothing this
                        // client holds or asks for means anything to it now.
                        self.lost.store(true, Ordering::Relaxed);
                    }
                    return Ok((response, resent > 0));
                }
                Err(ConnError::Broken(cause)) => {
                    lease.conn = None;
                    resent += 1;
                    if resent > RESEND_MAX {
                        return Err(Error::BrokerNotRunning {
                            socket: self.socket.clone(),
                            cause,
                        });
                    }
                }
                Err(ConnError::Other(e)) => {
                    // The connection's state is unknown: close it.
                    lease.conn = None;
                    return Err(e);
                }
            }
        }
    }

    /// How a broker grant is released: by one CAS when the broker granted
    /// it as a fast-path hold (see [`mapped::broker_granted_fast`]), else
    /// through the broker.
    fn grant_kind(&self, grant: &BrokerGrant, shared: bool) -> Grant {
        let held = (!shared)
            .then(|| {
                mapped::broker_granted_fast(self.table.view(), grant.slot, self.index, grant.token)
            })
            .flatten();
        held.map_or(Grant::Broker, Grant::BrokerFast)
    }

    #[cold]
    #[inline(never)]
    fn ping(&self) -> Result<Duration, Error> {
        self.check_not_lost()?;
        let mut lease = self.checkout(None)?.expect("no deadline, so a lease");
        let start = Instant::now();
        match self.call(&mut lease, &Request::Ping, || {})?.0 {
            Response::Pong => Ok(start.elapsed()),
            other => Err(unexpected(&mut lease, "Ping", other)),
        }
    }

    // ---- the slow path --------------------------------------------------------

    #[cold]
    #[inline(never)]
    fn acquire_slow(&self, key: &[u8], shared: bool, wait: Wait) -> Result<BrokerGrant, Error> {
        self.check_not_lost()?;
        let start = Instant::now();
        let deadline = match wait {
            Wait::Until(timeout) => Some(deadline_after(start, timeout)),
            Wait::Try | Wait::Forever => None,
        };
        let timeout = || Error::Timeout {
            key: key_text(key),
            waited: start.elapsed(),
        };
        let Some(mut lease) = self.checkout(deadline)? else {
            return Err(timeout());
        };
        let queue = !matches!(wait, Wait::Try);
        let request_id = self.next_request.fetch_add(1, Ordering::Relaxed);
        let request = Request::Acquire {
            key: key.to_vec(),
            shared,
            queue,
            request: request_id,
        };
        let cell = self.cell(lease.cell);
        let mut queued_slot;
        // Each round after the first follows a dropped request (a broker
        // restart that lost our queue position, or an abandoned wait);
        // bounded like the reconnects themselves.
        for _ in 0..=RESEND_MAX {
            let (response, _) = self.call(&mut lease, &request, || {
                // Armed before the broker can see the request: it may hand
                // the lock over any time after reading it.
                // SYNC POINT: Release pairs with the broker's load of the
                // cell after it reads our request (the send orders it too).
                let state = if queue { CELL_WAITING } else { CELL_IDLE };
                cell.state.store(state, Ordering::Release);
            })?;
            match response {
                Response::Granted {
                    slot,
                    token,
                    owner_died,
                } => {
                    cell.state.store(CELL_IDLE, Ordering::Relaxed);
                    return Ok(BrokerGrant {
                        slot,
                        token,
                        owner_died,
                    });
                }
                Response::WouldBlock => {
                    cell.state.store(CELL_IDLE, Ordering::Relaxed);
                    return Err(Error::WouldBlock { key: key_text(key) });
                }
                Response::Queued { slot } if queue => queued_slot = slot,
                Response::Error { code, message } => {
                    cell.state.store(CELL_IDLE, Ordering::Relaxed);
                    return Err(Error::from_broker(code, message, None));
                }
                other => return Err(unexpected(&mut lease, "Acquire", other)),
            }
            match self.wait_granted(&mut lease, cell, deadline)? {
                WaitEnd::Granted { token, owner_died } => {
                    return Ok(BrokerGrant {
                        slot: queued_slot,
                        token,
                        owner_died,
                    });
                }
                WaitEnd::Requeue => continue,
                WaitEnd::TimedOut => {}
            }
            // Timed out: withdraw, unless the hand-off won the race.
            return match self.cancel(&mut lease, cell, request_id)? {
                Some(WaitEnd::Granted { token, owner_died }) => Ok(BrokerGrant {
                    slot: queued_slot,
                    token,
                    owner_died,
                }),
                Some(_) | None => Err(timeout()),
            };
        }
        lease.conn = None;
        Err(Error::BrokerNotRunning {
            socket: self.socket.clone(),
            cause: std::io::Error::other(
                "the broker dropped our queued request again and again (restarts or abandoned waits)",
            ),
        })
    }

    /// Sleep on our wait cell until the broker answers the queued acquire on
    /// our connection, drops the request (`Requeue`), or `deadline` passes.
    ///
    /// The answer on the connection is the only authority: the cell lives in
    /// the table, which every client can write, so it only wakes us up. A
    /// cell scribbled to "answered" costs a spurious wake-up; one scribbled
    /// back to "waiting" costs at most one [`WAIT_SLICE`].
    fn wait_granted(
        &self,
        lease: &mut Lease<'_>,
        cell: &WaitCell,
        deadline: Option<Instant>,
    ) -> Result<WaitEnd, Error> {
        loop {
            let Some(conn) = lease.conn.as_mut() else {
                return Ok(WaitEnd::Requeue);
            };
            match conn.try_recv() {
                Ok(Some(answer)) => {
                    cell.state.store(CELL_IDLE, Ordering::Relaxed);
                    return match answer {
                        Response::Granted {
                            token, owner_died, ..
                        } => Ok(WaitEnd::Granted { token, owner_died }),
                        Response::Error { code, message } => {
                            Err(Error::from_broker(code, message, None))
                        }
                        other => Err(unexpected(lease, "a queued Acquire", other)),
                    };
                }
                Ok(None) => {}
                // The broker is gone and answered nothing: ask the next one.
                Err(ConnError::Broken(_)) => {
                    lease.conn = None;
                    return Ok(WaitEnd::Requeue);
                }
                Err(ConnError::Other(e)) => {
                    lease.conn = None;
                    return Err(e);
                }
            }
            // SYNC POINT: Acquire pairs with the broker's Release store of
            // the state, made after it queued the answer.
            let state = cell.state.load(Ordering::Acquire);
            let restarted = conn.epoch != self.broker_epoch();
            if state == CELL_ABANDONED || restarted {
                // A new broker adopted the table: our queue position died
                // with the old one, and so did this connection.
                lease.conn = None;
                return Ok(WaitEnd::Requeue);
            }
            let slice = match deadline {
                None => WAIT_SLICE,
                Some(deadline) => {
                    let now = Instant::now();
                    if now >= deadline {
                        return Ok(WaitEnd::TimedOut);
                    }
                    (deadline - now).min(WAIT_SLICE)
                }
            };
            if state == CELL_WAITING {
                futex_wait(&cell.state, state, slice);
            } else {
                // Woken: the answer is on its way (or the cell was scribbled).
                conn.wait_readable(slice);
            }
        }
    }

    /// Withdraw queued acquire `request` after a timeout. `Some(Granted)` if
    /// the hand-off won the race; `None` when the request left the queue.
    ///
    /// On the connection the request waited on, a hand-off answered before
    /// our Cancel arrives first and the Cancel's own answer (the same grant)
    /// follows. If that connection broke, the Cancel goes on a new one, which
    /// carries only the Cancel's answer: the broker finds the grant by the
    /// request id, whichever connection it was answered on.
    fn cancel(
        &self,
        lease: &mut Lease<'_>,
        cell: &WaitCell,
        request: u64,
    ) -> Result<Option<WaitEnd>, Error> {
        cell.state.store(CELL_IDLE, Ordering::Relaxed);
        let cancel = Request::Cancel { request };
        let same_conn = lease.conn.is_some();
        let answer = if same_conn {
            match lease.conn.as_mut().expect("checked").call(&cancel) {
                Ok(answer) => answer,
                Err(ConnError::Broken(_)) => {
                    lease.conn = None;
                    return self.cancel_on_new_conn(lease, &cancel);
                }
                Err(ConnError::Other(e)) => {
                    lease.conn = None;
                    return Err(e);
                }
            }
        } else {
            return self.cancel_on_new_conn(lease, &cancel);
        };
        match answer {
            Response::Cancelled => Ok(None),
            Response::Granted {
                token, owner_died, ..
            } => {
                // The hand-off's answer came first: consume the Cancel's own.
                let conn = lease.conn.as_mut().expect("checked");
                match conn.recv() {
                    Ok(Response::Granted { .. }) => {
                        Ok(Some(WaitEnd::Granted { token, owner_died }))
                    }
                    Ok(other) => Err(unexpected(lease, "Cancel", other)),
                    Err(_) => {
                        lease.conn = None;
                        Ok(Some(WaitEnd::Granted { token, owner_died }))
                    }
                }
            }
            Response::Error { code, message } => {
                lease.conn = None;
                Err(Error::from_broker(code, message, None))
            }
            other => Err(unexpected(lease, "Cancel", other)),
        }
    }

    /// Send `cancel` on a fresh connection (one answer only).
    fn cancel_on_new_conn(
        &self,
        lease: &mut Lease<'_>,
        cancel: &Request,
    ) -> Result<Option<WaitEnd>, Error> {
        match self.call(lease, cancel, || {})?.0 {
            Response::Cancelled => Ok(None),
            Response::Granted {
                token, owner_died, ..
            } => Ok(Some(WaitEnd::Granted { token, owner_died })),
            Response::Error { code, message } => Err(Error::from_broker(code, message, None)),
            other => Err(unexpected(lease, "Cancel", other)),
        }
    }

    /// [`LockGuard::check`]: ask the broker whether `slot` is still held
    /// with `token`.
    fn check_hold(&self, slot: u32, token: u64) -> Result<(), Error> {
        self.check_not_lost()?;
        let mut lease = self.checkout(None)?.expect("no deadline, so a lease");
        match self
            .call(&mut lease, &Request::Check { slot, token }, || {})?
            .0
        {
            Response::Holding => Ok(()),
            Response::Error { code, message } => {
                Err(Error::from_broker(code, message, Some((slot, token))))
            }
            other => Err(unexpected(&mut lease, "Check", other)),
        }
    }

    /// Release a broker-granted lock (or a fast-path one the broker took over).
    #[cold]
    #[inline(never)]
    fn release_through_broker(&self, slot: u32, token: u64) -> Result<(), Error> {
        self.check_not_lost()?;
        let mut lease = self.checkout(None)?.expect("no deadline, so a lease");
        match self.call(&mut lease, &Request::Release { slot, token }, || {})? {
            (Response::Released, _) => Ok(()),
            // Resent after a broken connection: the first send may have
            // released it already.
            (
                Response::Error {
                    code: ErrorCode::NotHolder,
                    ..
                },
                true,
            ) => Ok(()),
            (Response::Error { code, message }, _) => {
                Err(Error::from_broker(code, message, Some((slot, token))))
            }
            (other, _) => Err(unexpected(&mut lease, "Release", other)),
        }
    }
}

/// An answer that does not fit the request: close the connection (its state
/// is unknown) and report it.
#[cold]
fn unexpected(lease: &mut Lease<'_>, request: &str, response: Response) -> Error {
    lease.conn = None;
    Error::Protocol {
        message: format!("answered {request} with {response:?}"),
    }
}

/// A connection taken from the pool; returned to it on drop, or its cell
/// freed if the connection was closed.
struct Lease<'a> {
    inner: &'a Inner,
    cell: u32,
    conn: Option<Conn>,
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        let mut pool = self.inner.pool();
        match self.conn.take() {
            Some(conn) => pool.idle.push(conn),
            None => {
                debug_assert!(pool.cells_used & (1 << self.cell) != 0);
                pool.cells_used &= !(1 << self.cell);
            }
        }
        // Notify only when someone waits: a notify is a futex syscall, and this
        // runs after every broker request.
        let waiters = pool.waiters;
        drop(pool);
        if waiters > 0 {
            self.inner.pool_changed.notify_one();
        }
    }
}

/// A held lock. Released when dropped (errors ignored) or by
/// [`LockGuard::release`] (errors returned).
#[must_use = "the lock is released as soon as the guard is dropped"]
pub struct LockGuard<'a> {
    inner: &'a Inner,
    slot: u32,
    token: u64,
    owner_died: bool,
    shared: bool,
    /// The word our fast-path CAS wrote, if the client granted itself.
    how: Grant,
    released: bool,
}

impl std::fmt::Debug for LockGuard<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockGuard")
            .field("slot", &self.slot)
            .field("token", &self.token)
            .field("shared", &self.shared)
            .field("how", &self.how)
            .field("previous_owner_died", &self.owner_died)
            .finish()
    }
}

impl LockGuard<'_> {
    /// The fencing token of this grant: larger than every earlier grant's
    /// token for the same key (across slot reuse and broker restarts).
    pub fn token(&self) -> u64 {
        self.token
    }

    /// The previous holder died while holding the lock: whatever it protected
    /// may be half-updated.
    pub fn previous_owner_died(&self) -> bool {
        self.owner_died
    }

    /// Held in shared mode.
    pub fn is_shared(&self) -> bool {
        self.shared
    }

    /// Granted by this client's own CAS on a prepared slot (no broker).
    pub fn fast_path(&self) -> bool {
        matches!(self.how, Grant::Fast(_))
    }

    /// Does this hold still stand? One round trip to the broker (a few
    /// microseconds; the lock is not touched). `Err(Error::Lost)` once this
    /// host's broker lost the node grant of a global key under it (its
    /// etcd lease could not be confirmed in time): another host may hold
    /// the key now, so stop writing under it and release it (the release
    /// says `Lost` too). A local key's hold is lost only with its process,
    /// so for one this says `Ok` while the broker runs. For a holder of a
    /// global key that wants to know before a step it cannot fence with
    /// its token; the token is still what makes a late write harmless
    /// (docs/cluster.md).
    pub fn check(&self) -> Result<(), Error> {
        self.inner.check_hold(self.slot, self.token)
    }

    /// Release now, reporting errors (`Drop` releases too, silently).
    pub fn release(mut self) -> Result<(), Error> {
        self.released = true;
        self.release_inner()
    }

    /// Turn this guard into one that owns a clone of `client` (the client
    /// it was taken through), so it can outlive the borrow: for async tasks
    /// and foreign-language handles.
    ///
    /// # Panics
    /// If `client` is not (a clone of) the client this guard came from.
    pub fn into_owned(self, client: &Client) -> OwnedLockGuard {
        assert!(
            std::ptr::eq(self.inner, &*client.inner),
            "LockGuard::into_owned: the guard was taken through another Client"
        );
        // Not dropped: the owned guard takes over the release.
        let guard = std::mem::ManuallyDrop::new(self);
        OwnedLockGuard {
            client: client.clone(),
            slot: guard.slot,
            token: guard.token,
            owner_died: guard.owner_died,
            shared: guard.shared,
            how: guard.how,
            released: false,
        }
    }

    #[inline]
    fn release_inner(&self) -> Result<(), Error> {
        self.inner.release_grant(
            self.slot,
            self.token,
            self.owner_died,
            self.how.release_word(),
        )
    }
}

impl Drop for LockGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        if !self.released {
            self.inner.release_on_drop(
                self.slot,
                self.token,
                self.owner_died,
                self.how.release_word(),
            );
        }
    }
}

impl Inner {
    /// Release a grant: the fast path's CAS back if we granted ourselves,
    /// else (or if the broker took the hold over) through the broker.
    #[inline]
    fn release_grant(
        &self,
        slot: u32,
        token: u64,
        owner_died: bool,
        fast: Option<Word>,
    ) -> Result<(), Error> {
        if let Some(held) = fast {
            let hold = FastHold {
                slot,
                held,
                token,
                owner_died,
                give_back: false,
            };
            if fast_release(self.table.view(), &hold) {
                return Ok(());
            }
        }
        self.release_through_broker(slot, token)
    }

    /// The release of a guard dropped without `release()`: errors ignored,
    /// except that a broker down past the reconnect window gets the release
    /// delivered when it is back.
    #[inline]
    fn release_on_drop(&self, slot: u32, token: u64, owner_died: bool, fast: Option<Word>) {
        if let Err(Error::BrokerNotRunning { .. }) =
            self.release_grant(slot, token, owner_died, fast)
        {
            release_later(self.socket.clone(), self.index, slot, token);
        }
    }
}

/// A held lock that owns (a clone of) its [`Client`] instead of borrowing
/// it: made by [`LockGuard::into_owned`] and by the async calls. Released
/// when dropped (errors ignored) or by [`OwnedLockGuard::release`].
#[must_use = "the lock is released as soon as the guard is dropped"]
pub struct OwnedLockGuard {
    client: Client,
    slot: u32,
    token: u64,
    owner_died: bool,
    shared: bool,
    how: Grant,
    released: bool,
}

impl std::fmt::Debug for OwnedLockGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnedLockGuard")
            .field("slot", &self.slot)
            .field("token", &self.token)
            .field("shared", &self.shared)
            .field("how", &self.how)
            .field("previous_owner_died", &self.owner_died)
            .finish()
    }
}

impl OwnedLockGuard {
    /// The fencing token of this grant (see [`LockGuard::token`]).
    pub fn token(&self) -> u64 {
        self.token
    }

    /// The previous holder died while holding the lock.
    pub fn previous_owner_died(&self) -> bool {
        self.owner_died
    }

    /// Held in shared mode.
    pub fn is_shared(&self) -> bool {
        self.shared
    }

    /// Granted by this client's own CAS on a prepared slot (no broker).
    pub fn fast_path(&self) -> bool {
        matches!(self.how, Grant::Fast(_))
    }

    /// The client this guard holds its lock through.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Does this hold still stand? See [`LockGuard::check`].
    pub fn check(&self) -> Result<(), Error> {
        self.client.inner.check_hold(self.slot, self.token)
    }

    /// Release now, reporting errors (`Drop` releases too, silently).
    pub fn release(mut self) -> Result<(), Error> {
        self.released = true;
        self.client.inner.release_grant(
            self.slot,
            self.token,
            self.owner_died,
            self.how.release_word(),
        )
    }
}

impl Drop for OwnedLockGuard {
    fn drop(&mut self) {
        if !self.released {
            self.client.inner.release_on_drop(
                self.slot,
                self.token,
                self.owner_died,
                self.how.release_word(),
            );
        }
    }
}

/// How long a release the broker could not take is retried in the
/// background before it is given up (the lock is then released when this
/// process exits, by its death).
const RELEASE_LATER_FOR: Duration = Duration::from_secs(3600);

/// Release `slot`/`token` of client record `index` from a background thread,
/// retrying until the broker answers. The thread opens its own connection
/// (attached to the record, which belongs to this process), so it needs
/// nothing from the `Client`, which may be gone by then.
#[cold]
fn release_later(socket: PathBuf, index: u32, slot: u32, token: u64) {
    let spawned = std::thread::Builder::new()
        .name("forelock-release".into())
        .spawn(move || {
            let start = Instant::now();
            let mut backoff = RECONNECT_BACKOFF_FIRST;
            while start.elapsed() < RELEASE_LATER_FOR {
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(1));
                // Cell 0: this connection never queues, so it needs no wake-up.
                let mut conn = match Conn::open(&socket, Some(index), 0) {
                    Ok((conn, _)) => conn,
                    Err(ConnError::Broken(_)) => continue,
                    // The record is gone (the broker lost it, or this
                    // process's registration ended): nothing is held.
                    Err(ConnError::Other(_)) => return,
                };
                match conn.call(&Request::Release { slot, token }) {
                    Ok(_) => return,
                    Err(ConnError::Broken(_)) => continue,
                    Err(ConnError::Other(_)) => return,
                }
            }
        });
    if spawned.is_err() {
        // No thread to be had: the lock is released when this process exits.
    }
}

/// Keep the wait-cell futex word the type `futex_wait` expects.
const _: fn(&WaitCell) -> &AtomicU32 = |cell| &cell.state;

#[cfg(test)]
mod tests;
