//! The broker's single-threaded io_uring event loop: accept, recv and send on
//! the Unix socket, one pidfd poll per client (death detection), the tick
//! timer, the signalfd (SIGTERM/SIGINT), and optionally futex wakes.
//!
//! Every submission's `user_data` names an entry of a slab of in-flight
//! operations ([`OpSlab`]); every buffer an operation points to is owned by
//! that entry until its completion arrives, which is what makes each `push`
//! below sound (see its `# Safety`).
//!
//! Any local process may connect, so the transport assumes a hostile peer:
//!
//! - an operation on a connection carries the connection's full [`ConnId`]
//!   (serial and slab index), and its completion is applied only if that
//!   connection still holds the index (`Conns`); a closing connection
//!   serves nothing it receives;
//! - each connection has at most one recv and one send in flight and a
//!   bounded queue of answers; it is not read while more than
//!   `ANSWERS_BEFORE_PAUSE` answers are unsent (backpressure), so a peer
//!   that never reads costs bounded memory and no CPU;
//! - `broker.max_connections_per_uid` bounds the connections of one uid;
//! - accept out of file descriptors retries after a growing pause instead of
//!   at once (`accept_backoff_after`).

use crate::allocator_glue::Allocation;
use crate::config::{Config, FutexWake};
use crate::files::RuntimeFiles;
use crate::locks::{ConnId, LockManager, Registered, Waker};
use crate::metrics::Metrics;
use anyhow::Context;
use io_uring::{IoUring, opcode, squeue, types};
use shm_layout::sync::shm::{AtomicU32, Ordering};
use shm_layout::wire::{self, ErrorCode, Request, Response};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::time::Instant;

const RECV_BUF: usize = wire::MAX_MESSAGE + 1;
/// Receive buffers kept for reuse: one per connection with a receive in
/// flight is the steady state; a burst of connections frees the rest.
const RECV_BUFFERS_KEPT: usize = 256;

/// An in-flight operation and the memory it borrows.
///
/// Operations on a connection carry its full [`ConnId`] (serial and slab
/// index), never the bare index: a completion is applied only to the
/// connection that submitted it ([`Conns::get_mut`] checks the serial).
enum Op {
    Accept,
    /// The pause before accept is armed again after it ran out of resources.
    AcceptRetry {
        _ts: Box<types::Timespec>,
    },
    Recv {
        conn: ConnId,
        buf: Box<[u8; RECV_BUF]>,
    },
    Send {
        conn: ConnId,
        _buf: rkyv::util::AlignedVec,
    },
    PidFd {
        client: u32,
        generation: u64,
        _fd: OwnedFd,
    },
    Tick {
        _ts: Box<types::Timespec>,
    },
    Signal {
        _buf: Box<[u8; 128]>,
    },
    /// A poll of the cluster agent's eventfd: events from etcd wait.
    Cluster,
    FutexWake,
}

/// Slab of in-flight operations; `user_data` is the index.
struct OpSlab {
    ops: Vec<Option<Op>>,
    free: Vec<usize>,
}

impl OpSlab {
    fn insert(&mut self, op: Op) -> u64 {
        match self.free.pop() {
            Some(i) => {
                self.ops[i] = Some(op);
                i as u64
            }
            None => {
                self.ops.push(Some(op));
                (self.ops.len() - 1) as u64
            }
        }
    }
    fn take(&mut self, user_data: u64) -> Option<Op> {
        let op = self.ops.get_mut(user_data as usize)?.take();
        if op.is_some() {
            self.free.push(user_data as usize);
        }
        op
    }
}

/// Answers a connection may have queued or in flight and still be read
/// from. A legitimate client has one request outstanding and at most two
/// answers: a queued acquire's later grant and the reply to its request.
/// Past this the broker stops receiving from the peer until its answers
/// drain, so a peer that never reads costs a bounded amount of memory.
const ANSWERS_BEFORE_PAUSE: u32 = 2;

/// Hard cap on a connection's unsent answers. Reading pauses long before
/// this (answers come from requests, requests stop being read at
/// [`ANSWERS_BEFORE_PAUSE`]); reaching it means answers arrived without
/// requests, and the connection is shut down rather than grown.
const ANSWERS_MAX: usize = 16;

struct Conn {
    fd: OwnedFd,
    id: ConnId,
    pid: u32,
    uid: u32,
    client: Option<u32>,
    cell: u32,
    /// A recv is in flight (at most one).
    recv_armed: bool,
    /// A send is in flight (at most one: answers leave in order).
    send_armed: bool,
    /// Answers waiting for the send in flight, oldest first; at most
    /// [`ANSWERS_MAX`].
    outbox: std::collections::VecDeque<rkyv::util::AlignedVec>,
    /// Closed for requests: nothing received is served any more, and the
    /// entry (and its fd) is freed when its last operation completes.
    closing: bool,
}

impl Conn {
    /// Answers not yet sent: queued, plus the one in flight.
    fn answers_unsent(&self) -> u32 {
        // ANSWERS_MAX bounds the outbox, so this cannot overflow.
        self.outbox.len() as u32 + u32::from(self.send_armed)
    }

    /// Operations in flight that still point at this connection's fd.
    fn ops_in_flight(&self) -> u32 {
        u32::from(self.recv_armed) + u32::from(self.send_armed)
    }
}

/// The open connections: a slab indexed by the low 32 bits of a [`ConnId`],
/// with the connection's serial in the high bits, and the count of
/// connections per uid (SO_PEERCRED).
///
/// An entry is freed only when its connection is closing and its last
/// operation has completed, so no operation of a connection can be in
/// flight when its index is reused; [`Conns::get`] checking the whole id is
/// the second line of defence (ids repeat only after 2^32 connections).
struct Conns {
    entries: Vec<Option<Conn>>,
    free: Vec<u32>,
    next_serial: u64,
    per_uid: std::collections::HashMap<u32, u32>,
}

impl Conns {
    fn new() -> Conns {
        Conns {
            entries: Vec::new(),
            free: Vec::new(),
            next_serial: 1,
            per_uid: std::collections::HashMap::new(),
        }
    }

    fn index(id: ConnId) -> usize {
        (id & 0xFFFF_FFFF) as usize
    }

    /// The connection `id`, if it is still the one at its index.
    fn get(&self, id: ConnId) -> Option<&Conn> {
        self.entries
            .get(Conns::index(id))?
            .as_ref()
            .filter(|c| c.id == id)
    }

    /// The connection `id`, if it is still the one at its index.
    fn get_mut(&mut self, id: ConnId) -> Option<&mut Conn> {
        self.entries
            .get_mut(Conns::index(id))?
            .as_mut()
            .filter(|c| c.id == id)
    }

    /// Open connections of `uid`.
    fn of_uid(&self, uid: u32) -> u32 {
        self.per_uid.get(&uid).copied().unwrap_or(0)
    }

    fn insert(&mut self, fd: OwnedFd, pid: u32, uid: u32) -> ConnId {
        let index = match self.free.pop() {
            Some(i) => i as usize,
            None => {
                self.entries.push(None);
                self.entries.len() - 1
            }
        };
        // Each connection holds an fd, so the slab never nears 2^32 entries.
        assert!(
            index <= u32::MAX as usize,
            "connection slab index fits 32 bits"
        );
        debug_assert!(self.entries[index].is_none(), "a free entry is empty");
        let id = conn_id(self.next_serial, index);
        self.next_serial += 1;
        self.entries[index] = Some(Conn {
            fd,
            id,
            pid,
            uid,
            client: None,
            cell: 0,
            recv_armed: false,
            send_armed: false,
            outbox: std::collections::VecDeque::new(),
            closing: false,
        });
        *self.per_uid.entry(uid).or_insert(0) += 1;
        id
    }

    /// Remove connection `id` (closing its fd); nothing if `id` is stale.
    fn remove(&mut self, id: ConnId) -> Option<Conn> {
        let index = Conns::index(id);
        let slot = self.entries.get_mut(index)?;
        if slot.as_ref().is_none_or(|c| c.id != id) {
            return None;
        }
        let c = slot.take()?;
        self.free.push(index as u32);
        if let Some(n) = self.per_uid.get_mut(&c.uid) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_uid.remove(&c.uid);
            }
        }
        Some(c)
    }
}

/// "Log the first, then at most once per `every_ms`, with a count."
struct RateLimited {
    every_ms: u64,
    last_ms: Option<u64>,
    suppressed: u64,
}

impl RateLimited {
    const fn new(every_ms: u64) -> RateLimited {
        RateLimited {
            every_ms,
            last_ms: None,
            suppressed: 0,
        }
    }

    /// `Some(events suppressed since the last log)` if this one may be
    /// logged now.
    fn allow(&mut self, now_ms: u64) -> Option<u64> {
        match self.last_ms {
            Some(last) if now_ms.saturating_sub(last) < self.every_ms => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last_ms = Some(now_ms);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

/// First pause before accept is tried again after running out of resources.
const ACCEPT_BACKOFF_MIN_MS: u64 = 5;
/// Longest pause: a legitimate client waits at most this long (in the
/// listen backlog) once descriptors are free again.
const ACCEPT_BACKOFF_MAX_MS: u64 = 1000;

/// Answers and wake-ups requested by the lock manager, delivered after each
/// request: answers first, then the futex wakes.
struct Wakes {
    mode: FutexWake,
    answers: Vec<(ConnId, Response)>,
    pending: Vec<*const AtomicU32>,
}

impl Waker for Wakes {
    fn answer(&mut self, conn: ConnId, response: Response) {
        self.answers.push((conn, response));
    }
    fn wake(&mut self, cell: &AtomicU32) {
        self.pending.push(cell as *const AtomicU32);
    }
}

/// A connection's id: its slab index in the low 32 bits, a serial number
/// above, so an id never names a later connection in the same slab entry.
fn conn_id(serial: u64, index: usize) -> ConnId {
    serial << 32 | index as u64
}

pub struct EventLoop {
    /// Declared first so that it is dropped first, before the buffers
    /// (`ops`) and the table mapping (`files`) its operations point to.
    /// Closing the ring cancels them, but the kernel finishes that
    /// asynchronously: an `EventLoop` is dropped only when the process is
    /// about to exit (after `run` returns).
    ring: IoUring,
    config: Config,
    files: RuntimeFiles,
    manager: LockManager,
    allocation: Allocation,
    metrics: Metrics,
    ops: OpSlab,
    /// Receive buffers back from completed receives, for the next ones (a
    /// fresh zeroed kilobyte per request cost a malloc and a memset).
    /// At most [`RECV_BUFFERS_KEPT`]. Boxed: each moves into an
    /// `Op::Recv`, whose buffer the kernel writes at a fixed address.
    #[allow(clippy::vec_box, reason = "the boxes move into Op::Recv")]
    recv_buffers: Vec<Box<[u8; RECV_BUF]>>,
    conns: Conns,
    /// Pause before the next accept after it ran out of resources; 0 while
    /// accepting works.
    accept_backoff_ms: u64,
    accept_failures: RateLimited,
    refused_connections: RateLimited,
    listener: OwnedFd,
    signal_fd: OwnedFd,
    client_generation: Vec<u64>,
    wakes: Wakes,
    stopping: bool,
    watchdog_every_ms: Option<u64>,
    last_watchdog_ms: u64,
    /// Time spent serving completions since the last tick, and when that was.
    busy_ns: u64,
    last_tick_ms: u64,
    /// The cluster agent (global keys), when the configuration has `[cluster]`.
    cluster: Option<Rc<forelock_cluster::Agent>>,
    last_cluster_status_ms: u64,
}

/// The pause before accept is armed again after it failed with `errno`,
/// given the last pause (`0` after a success): `None` (at once) for the
/// errors of one connection or of none (ECONNABORTED, EINTR, EAGAIN);
/// otherwise, resources ran out (EMFILE, ENFILE, ENOBUFS, ENOMEM) or the
/// error is unknown, and retrying at once would only fail at once: a pause
/// that doubles from [`ACCEPT_BACKOFF_MIN_MS`] to [`ACCEPT_BACKOFF_MAX_MS`].
fn accept_backoff_after(errno: i32, last_ms: u64) -> Option<u64> {
    if matches!(errno, libc::ECONNABORTED | libc::EINTR | libc::EAGAIN) {
        return None;
    }
    Some(
        last_ms
            .saturating_mul(2)
            .clamp(ACCEPT_BACKOFF_MIN_MS, ACCEPT_BACKOFF_MAX_MS),
    )
}

/// A relative io_uring timeout of `ms` milliseconds, boxed so that it stays
/// put while the operation is in flight.
fn timespec_ms(ms: u64) -> Box<types::Timespec> {
    Box::new(
        types::Timespec::new()
            .sec(ms / 1000)
            .nsec(((ms % 1000) * 1_000_000) as u32),
    )
}

fn now_ms() -> u64 {
    shm_layout::monotonic_ns() / 1_000_000
}

impl EventLoop {
    pub fn new(config: Config) -> anyhow::Result<EventLoop> {
        // First: every thread spawned below (the cluster agent's, gossip's,
        // the Prometheus endpoint's) inherits this mask, so SIGTERM and
        // SIGINT reach only the signalfd. A thread spawned before it would
        // take them and die of them, and the broker with it, past its stop
        // path (seen: a broker with `[cluster]` killed by systemd's stop).
        let signal_fd = block_signals()?;
        let files = RuntimeFiles::open(&config)?;
        let geometry = files.table.geometry();
        let (ledger, ledger_adopted) =
            crate::ledger::open(&files.dir, geometry.slot_count, geometry.client_count)?;
        // The epoch comes from the ledger: the header's copy is client-writable.
        let epoch = ledger.epoch() + 1;
        let header = files.table.header();
        header.broker_epoch.store(epoch, Ordering::Relaxed);
        header
            .broker_pid
            .store(std::process::id(), Ordering::Relaxed);
        header
            .broker_started_unix_ms
            .store(unix_ms(), Ordering::Relaxed);
        let mut wakes = Wakes {
            mode: FutexWake::Syscall,
            answers: Vec::new(),
            pending: Vec::new(),
        };
        let mut manager = LockManager::adopt(
            &files.table,
            ledger,
            config.allocator.policy,
            crate::locks::Limits::from_config(&config, geometry.client_count),
            epoch,
            now_ms(),
            |pid, start| process_start_time(pid) == Some(start),
            &mut wakes,
        );
        flush_syscall_wakes(&mut wakes.pending);
        wakes.mode = config.broker.futex_wake;
        if files.adopted && !ledger_adopted {
            tracing::warn!(
                "the table was adopted without a ledger that matches it: its keys, holds and \
                 client records were dropped (clients must reconnect)"
            );
        } else if files.adopted {
            tracing::info!(
                epoch,
                clients = manager.active_clients().len(),
                "adopted the existing table: held locks stay held"
            );
        } else {
            tracing::info!(epoch, "created a new table");
        }
        let cluster = match &config.cluster {
            Some(c) => Some(crate::cluster_glue::start(c, &mut manager, &files.table)?),
            None => None,
        };
        let listener = listen(
            &files.dir.join(shm_layout::SOCKET_FILE),
            config.socket_mode(),
        )?;
        // COOP_TASKRUN: a completion's task work waits for this thread's
        // next entry into the kernel instead of interrupting it with an
        // IPI. The loop enters it all the time: its spin yields on every
        // turn (`spin_for_completions`), else it waits in io_uring_enter.
        // The IPI cost a round trip across CPUs about 8 us on a VM (a ping
        // 13 us against 5 us without it, the machine otherwise idle).
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_coop_taskrun()
            .build(config.broker.uring_entries).context(
            "cannot create an io_uring (is io_uring disabled by sysctl kernel.io_uring_disabled, or \
             blocked by seccomp?)",
        )?;
        let clients = files.table.geometry().client_count as usize;
        let watchdog_every_ms = watchdog_interval_ms();
        let allocation = Allocation::new(&config);
        let config_for_metrics = config.clone();
        let files_dir = files.dir.clone();
        let mut event_loop = EventLoop {
            config,
            files,
            manager,
            allocation,
            metrics: Metrics::new(&config_for_metrics, &files_dir),
            ring,
            ops: OpSlab {
                ops: Vec::new(),
                free: Vec::new(),
            },
            recv_buffers: Vec::new(),
            conns: Conns::new(),
            accept_backoff_ms: 0,
            accept_failures: RateLimited::new(1000),
            refused_connections: RateLimited::new(1000),
            listener,
            signal_fd,
            client_generation: vec![0; clients],
            wakes,
            stopping: false,
            watchdog_every_ms,
            last_watchdog_ms: 0,
            busy_ns: 0,
            last_tick_ms: now_ms(),
            cluster,
            last_cluster_status_ms: 0,
        };
        for (client, pid) in event_loop.manager.active_clients() {
            if !event_loop.watch_client(client, pid) {
                tracing::error!(
                    client,
                    pid,
                    "adopted client cannot be watched: its locks stay held until it releases them"
                );
            }
        }
        Ok(event_loop)
    }

    /// Serve until SIGTERM or SIGINT.
    pub fn run(mut self) -> anyhow::Result<()> {
        self.arm_accept();
        self.arm_signal();
        self.arm_tick();
        self.arm_cluster();
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
        tracing::info!(
            runtime_dir = %self.files.dir.display(),
            slots = self.files.table.geometry().slot_count,
            policy = ?self.config.allocator.policy,
            "forelockd ready"
        );
        let mut completions = Vec::with_capacity(64);
        let spin = std::time::Duration::from_micros(self.config.broker.spin_us);
        let spin_waiters = std::time::Duration::from_micros(self.config.broker.spin_waiters_us);
        while !self.stopping {
            // While someone waits in a queue behind a local holder, a release
            // is coming: stay awake for it longer (the waiters sleep, so
            // their CPU is free).
            let spin = if self.manager.awaits_local_release() {
                spin_waiters.max(spin)
            } else {
                spin
            };
            // A completion found while spinning needs no syscall to wait
            // for (the spin submitted what was queued).
            if !self.spin_for_completions(spin)? {
                match self.ring.submit_and_wait(1) {
                    Ok(_) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                    Err(e) => return Err(e).context("io_uring submit failed"),
                }
            }
            completions.clear();
            completions.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
            let busy_from = Instant::now();
            for &(user_data, result) in &completions {
                self.complete(user_data, result);
            }
            self.busy_ns += busy_from.elapsed().as_nanos() as u64;
        }
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
        if let Some(agent) = self.cluster.take() {
            // Give every node grant up here first (no client grants itself
            // a prepared global key any more; local holds of global keys
            // are lost), then have the agent revoke the lease: the other
            // hosts take the keys after their lock-delay, not after this
            // lease's TTL.
            self.manager.give_up_node_grants(&self.files.table);
            let revoked = agent.stop(CLUSTER_STOP_WITHIN);
            tracing::info!(
                revoked,
                "cluster: node grants given up{}",
                if revoked {
                    ", lease revoked"
                } else {
                    "; the lease ends by its TTL (etcd did not answer in time)"
                }
            );
        }
        tracing::info!(
            "forelockd stopping: locks held stay recorded (ledger and table) for the next broker"
        );
        Ok(())
    }

    /// Submit what is queued, then poll the completion queue for up to `spin`
    /// before the caller blocks. Waking a sleeping CPU costs tens of
    /// microseconds on virtual machines (measured: a broker round trip of
    /// 56 us across CPUs against 11 us on one); a request arriving while we
    /// spin is served without that wake-up. Bounded: at most `spin` of CPU
    /// per idle period. Returns whether a completion is waiting (and every
    /// queued entry was submitted).
    fn spin_for_completions(&mut self, spin: std::time::Duration) -> anyhow::Result<bool> {
        if spin.is_zero() {
            return Ok(false);
        }
        self.ring.submit().context("io_uring submit failed")?;
        let started = Instant::now();
        while self.ring.completion().is_empty() {
            // Yield, not pause: on a machine whose CPUs are all busy, the
            // process this loop just answered may be waiting for this CPU,
            // and a pause loop would hold it off for the whole spin. With
            // nothing else runnable, sched_yield returns at once. Its return
            // to user space also runs the ring's pending task work
            // (COOP_TASKRUN: nothing else would), posting the completions
            // this loop looks for.
            // SAFETY: sched_yield takes no arguments and touches no memory.
            unsafe { libc::sched_yield() };
            if started.elapsed() >= spin {
                break;
            }
        }
        Ok(!self.ring.completion().is_empty())
    }

    /// Queue `entry` on the submission ring (submitting first if it is full).
    ///
    /// # Safety
    ///
    /// The kernel reads and writes the memory `entry` points to (buffers,
    /// timespecs, futex words) at any time until the entry's completion is
    /// reaped, and uses the fds it names until then. So every pointer in
    /// `entry` must stay valid, unmoved and not otherwise borrowed until that
    /// completion, that is, either
    ///
    /// - it points into a heap allocation owned by the [`Op`] stored in
    ///   `self.ops` under `entry`'s `user_data` (a `Box` or an `AlignedVec`,
    ///   whose contents do not move when the `Op` moves), which is removed
    ///   only by [`EventLoop::complete`] for that completion; or
    /// - it points into memory that outlives the ring (the table mapping in
    ///   `self.files`, which is declared after `ring`, so the ring closes
    ///   first on drop);
    ///
    /// and every fd it names is owned by that `Op`, by a [`Conn`] that is not
    /// freed while the operation is in flight (see [`Conn::ops_in_flight`]),
    /// or by `self` (listener, signalfd).
    unsafe fn push(&mut self, entry: squeue::Entry) {
        loop {
            // SAFETY: the caller guarantees that everything `entry` points to
            // outlives the operation (this function's `# Safety`).
            let pushed = unsafe { self.ring.submission().push(&entry) };
            if pushed.is_ok() {
                return;
            }
            // Queue full: hand what we have to the kernel and retry.
            if let Err(e) = self.ring.submit() {
                tracing::error!(error = %e, "io_uring submit failed while the queue was full");
            }
        }
    }

    fn arm_accept(&mut self) {
        let ud = self.ops.insert(Op::Accept);
        let e = opcode::Accept::new(
            types::Fd(self.listener.as_raw_fd()),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        )
        .flags(libc::SOCK_CLOEXEC)
        .build()
        .user_data(ud);
        // SAFETY:
        // - no address buffer: both pointers are null;
        // - the listener fd is owned by `self` and lives as long as the ring.
        unsafe { self.push(e) };
    }

    /// Arm accept again after `accept_backoff_ms`, through a ring timeout.
    fn arm_accept_retry(&mut self) {
        let ts = timespec_ms(self.accept_backoff_ms);
        let ptr: *const types::Timespec = &*ts;
        let ud = self.ops.insert(Op::AcceptRetry { _ts: ts });
        let e = opcode::Timeout::new(ptr).build().user_data(ud);
        // SAFETY: `ptr` points into the Box owned by the Op::AcceptRetry
        // stored under `ud`, freed only when its completion is reaped.
        unsafe { self.push(e) };
    }

    fn arm_signal(&mut self) {
        let mut buf = Box::new([0u8; 128]);
        let ptr = buf.as_mut_ptr();
        let ud = self.ops.insert(Op::Signal { _buf: buf });
        let e = opcode::Read::new(types::Fd(self.signal_fd.as_raw_fd()), ptr, 128)
            .build()
            .user_data(ud);
        // SAFETY:
        // - `ptr` points into the 128-byte Box owned by the Op::Signal stored
        //   under `ud`, freed only when its completion is reaped;
        // - the signalfd is owned by `self` and lives as long as the ring.
        unsafe { self.push(e) };
    }

    fn arm_cluster(&mut self) {
        let Some(fd) = self.cluster.as_ref().map(|a| a.wake_fd()) else {
            return;
        };
        let ud = self.ops.insert(Op::Cluster);
        let e = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32)
            .build()
            .user_data(ud);
        // SAFETY: no buffer is read or written (a poll); the eventfd is owned
        // by the agent in `self.cluster`, which lives as long as the loop.
        unsafe { self.push(e) };
    }

    /// Apply what the cluster agent reported (node grants, callbacks,
    /// fences) to the grant engine.
    fn cluster_events(&mut self) {
        let Some(agent) = self.cluster.clone() else {
            return;
        };
        for event in agent.drain() {
            self.manager
                .node_event(&self.files.table, event, &mut self.wakes);
        }
        self.flush_wakes();
    }

    fn arm_tick(&mut self) {
        let ts = timespec_ms(self.config.allocator.tick_ms);
        let ptr: *const types::Timespec = &*ts;
        let ud = self.ops.insert(Op::Tick { _ts: ts });
        let e = opcode::Timeout::new(ptr).build().user_data(ud);
        // SAFETY: `ptr` points into the Box owned by the Op::Tick stored
        // under `ud`, freed only when its completion is reaped.
        unsafe { self.push(e) };
    }

    /// Receive the next request of `conn`, unless it is closing, already
    /// receiving, or has more than [`ANSWERS_BEFORE_PAUSE`] answers unsent
    /// (backpressure: a send completing calls this again).
    fn arm_recv(&mut self, conn: ConnId) {
        let Some(c) = self.conns.get_mut(conn) else {
            return;
        };
        if c.closing || c.recv_armed || c.answers_unsent() > ANSWERS_BEFORE_PAUSE {
            return;
        }
        c.recv_armed = true;
        let fd = c.fd.as_raw_fd();
        let mut buf = self
            .recv_buffers
            .pop()
            .unwrap_or_else(|| Box::new([0u8; RECV_BUF]));
        let ptr = buf.as_mut_ptr();
        let ud = self.ops.insert(Op::Recv { conn, buf });
        let e = opcode::Recv::new(types::Fd(fd), ptr, RECV_BUF as u32)
            .build()
            .user_data(ud);
        // SAFETY:
        // - `ptr` points into the RECV_BUF-byte Box owned by the Op::Recv
        //   stored under `ud`, freed only when its completion is reaped;
        // - `fd` is owned by the Conn `conn`, which now has `recv_armed` set
        //   and so is not freed before that completion (`free_if_done`).
        unsafe { self.push(e) };
    }

    /// Queue `response` on `conn`; sent at once unless a send is in flight.
    fn send(&mut self, conn: ConnId, response: &Response) {
        let Some(c) = self.conns.get_mut(conn) else {
            tracing::debug!(
                conn,
                ?response,
                "answer for a connection that is gone: dropped"
            );
            return;
        };
        if c.closing {
            return;
        }
        if c.outbox.len() >= ANSWERS_MAX {
            // Unreachable for a peer that reads: reading pauses long before.
            let (pid, uid) = (c.pid, c.uid);
            tracing::warn!(
                conn,
                pid,
                uid,
                "a connection has {ANSWERS_MAX} answers unsent: shut down"
            );
            self.shut_down(conn);
            return;
        }
        c.outbox.push_back(wire::encode(response));
        self.send_next(conn);
    }

    /// Start the oldest queued answer of `conn`, if no send is in flight.
    fn send_next(&mut self, conn: ConnId) {
        let Some(c) = self.conns.get_mut(conn) else {
            return;
        };
        if c.send_armed || c.closing {
            return;
        }
        let Some(buf) = c.outbox.pop_front() else {
            return;
        };
        c.send_armed = true;
        let fd = c.fd.as_raw_fd();
        let (ptr, len) = (buf.as_ptr(), buf.len() as u32);
        let ud = self.ops.insert(Op::Send { conn, _buf: buf });
        let e = opcode::Send::new(types::Fd(fd), ptr, len)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(ud);
        // SAFETY:
        // - `ptr..ptr+len` is the heap buffer of the AlignedVec owned by the
        //   Op::Send stored under `ud` (moving the vector did not move it),
        //   freed only when its completion is reaped;
        // - `fd` is owned by the Conn `conn`, which now has `send_armed` set
        //   and so is not freed before that completion (`free_if_done`).
        unsafe { self.push(e) };
    }

    /// Shut the socket of `conn` down both ways: its operations in flight
    /// complete at once (recv with 0, send with EPIPE) and the completions
    /// close it. For a peer that must not be served any more.
    fn shut_down(&mut self, conn: ConnId) {
        if let Some(c) = self.conns.get(conn) {
            // SAFETY: shutdown on an fd the Conn owns takes no pointers.
            unsafe { libc::shutdown(c.fd.as_raw_fd(), libc::SHUT_RDWR) };
        }
    }

    /// Watch `pid` with a pidfd, so that its death releases record
    /// `client`. False if the process cannot be watched (out of file
    /// descriptors): the caller must not keep the record.
    fn watch_client(&mut self, client: u32, pid: u32) -> bool {
        // SAFETY: pidfd_open takes a pid and flags, no pointers.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if fd < 0 {
            let error = std::io::Error::last_os_error();
            if error.raw_os_error() == Some(libc::ESRCH) {
                // Already gone: release its locks now.
                self.manager
                    .client_gone(&self.files.table, client, &mut self.wakes);
                self.flush_wakes();
                return true;
            }
            tracing::warn!(client, pid, %error, "cannot watch a client process (pidfd_open)");
            return false;
        }
        // SAFETY: pidfd_open returned a new fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        let raw = fd.as_raw_fd();
        self.client_generation[client as usize] += 1;
        let generation = self.client_generation[client as usize];
        let ud = self.ops.insert(Op::PidFd {
            client,
            generation,
            _fd: fd,
        });
        let e = opcode::PollAdd::new(types::Fd(raw), libc::POLLIN as u32)
            .build()
            .user_data(ud);
        // SAFETY: no buffer; the pidfd `raw` is owned by the Op::PidFd stored
        // under `ud`, dropped only when its completion is reaped.
        unsafe { self.push(e) };
        true
    }

    fn complete(&mut self, user_data: u64, result: i32) {
        let Some(op) = self.ops.take(user_data) else {
            return;
        };
        match op {
            Op::Accept => self.accept_done(result),
            Op::AcceptRetry { .. } => self.arm_accept(),
            Op::Recv { conn, buf } => {
                if let Some(c) = self.conns.get_mut(conn) {
                    c.recv_armed = false;
                    if c.closing {
                        // Closed for requests: what arrives now is not served.
                        self.free_if_done(conn);
                    } else if result <= 0 {
                        self.close(conn);
                    } else {
                        self.received(conn, &buf[..result as usize]);
                        self.arm_recv(conn);
                    }
                } else {
                    // A later connection may sit at this index: never apply
                    // the completion to it.
                    tracing::debug!(conn, "stale receive completion dropped");
                }
                if self.recv_buffers.len() < RECV_BUFFERS_KEPT {
                    self.recv_buffers.push(buf);
                }
            }
            Op::Send { conn, .. } => {
                let Some(c) = self.conns.get_mut(conn) else {
                    tracing::debug!(conn, "stale send completion dropped");
                    return;
                };
                c.send_armed = false;
                if result < 0 {
                    self.close(conn);
                } else {
                    self.send_next(conn);
                    // Backpressure released: read the peer again.
                    self.arm_recv(conn);
                }
                self.free_if_done(conn);
            }
            Op::PidFd {
                client, generation, ..
            } => {
                if self.client_generation[client as usize] == generation {
                    tracing::info!(client, "client process exited");
                    self.manager
                        .client_gone(&self.files.table, client, &mut self.wakes);
                    self.flush_wakes();
                }
            }
            Op::Tick { .. } => {
                self.tick();
                self.arm_tick();
            }
            Op::Signal { .. } => {
                tracing::info!("termination signal received");
                self.stopping = true;
            }
            Op::Cluster => {
                self.cluster_events();
                self.arm_cluster();
            }
            Op::FutexWake => {
                if result < 0 {
                    tracing::warn!(errno = -result, "io_uring futex wake failed");
                }
            }
        }
    }

    /// An accept completed. Out of resources it is armed again only after a
    /// pause ([`accept_backoff_after`]) on a ring timeout: re-arming at once
    /// would fail at once, a busy loop. Failures are logged first, then at
    /// most once a second with a count.
    fn accept_done(&mut self, result: i32) {
        if result >= 0 {
            self.accept_backoff_ms = 0;
            // SAFETY: a successful accept returns a new fd we own.
            let fd = unsafe { OwnedFd::from_raw_fd(result) };
            self.accepted(fd);
            self.arm_accept();
            return;
        }
        let errno = -result;
        let Some(backoff_ms) = accept_backoff_after(errno, self.accept_backoff_ms) else {
            // That connection is gone, or nothing happened: the next may work.
            tracing::debug!(errno, "accept failed (transient)");
            self.arm_accept();
            return;
        };
        self.accept_backoff_ms = backoff_ms;
        if let Some(suppressed) = self.accept_failures.allow(now_ms()) {
            tracing::warn!(
                error = %std::io::Error::from_raw_os_error(errno),
                failures_since_last_report = suppressed,
                retry_in_ms = self.accept_backoff_ms,
                "accept failed: new connections wait in the listen backlog (out of file \
                 descriptors? raise LimitNOFILE / ulimit -n of forelockd)"
            );
        }
        self.arm_accept_retry();
    }

    fn accepted(&mut self, fd: OwnedFd) {
        let Some((pid, uid)) = peer_credentials(&fd) else {
            tracing::warn!("connection without peer credentials: closed");
            return;
        };
        let limit = self.config.broker.max_connections_per_uid;
        if self.conns.of_uid(uid) >= limit {
            tracing::debug!(
                pid,
                uid,
                limit,
                "connection past max_connections_per_uid: closed"
            );
            if let Some(suppressed) = self.refused_connections.allow(now_ms()) {
                tracing::warn!(
                    pid,
                    uid,
                    limit,
                    refused_since_last_report = suppressed,
                    "connection refused: uid has broker.max_connections_per_uid connections open"
                );
            }
            return; // dropping `fd` closes it
        }
        let id = self.conns.insert(fd, pid, uid);
        self.arm_recv(id);
    }

    /// Free `conn` if it is closing and no operation still uses its fd.
    fn free_if_done(&mut self, conn: ConnId) {
        if self
            .conns
            .get(conn)
            .is_some_and(|c| c.closing && c.ops_in_flight() == 0)
        {
            self.conns.remove(conn); // closes the fd
        }
    }

    /// The peer left or failed: stop serving `conn`, tell the lock manager,
    /// and free it once its operations in flight have completed.
    fn close(&mut self, conn: ConnId) {
        let Some(c) = self.conns.get_mut(conn) else {
            return;
        };
        if c.closing {
            return;
        }
        c.closing = true;
        c.outbox.clear();
        let id = c.id;
        // Complete the operations still in flight now (a recv would wait for
        // the peer's next request, a send for the peer to read).
        self.shut_down(conn);
        self.free_if_done(conn);
        self.metrics.dequeued(id);
        self.manager
            .conn_closed(&self.files.table, id, &mut self.wakes);
        self.flush_wakes();
    }

    /// Serve one request of `conn` (not closing: the caller checked).
    fn received(&mut self, conn: ConnId, bytes: &[u8]) {
        let started = Instant::now();
        let request = match wire::decode_request(bytes) {
            Ok(r) => r,
            Err(e) => {
                self.send(
                    conn,
                    &Response::Error {
                        code: ErrorCode::BadRequest,
                        message: e.to_string(),
                    },
                );
                return;
            }
        };
        let Some(c) = self.conns.get(conn) else {
            return;
        };
        let (id, pid, uid, client, cell) = (c.id, c.pid, c.uid, c.client, c.cell);
        let table = &self.files.table;
        let mut handing_off = false;
        let response = match (request, client) {
            (
                Request::Hello {
                    protocol,
                    table_version,
                    client: existing,
                    cell,
                },
                None,
            ) => {
                if protocol != wire::PROTOCOL_VERSION
                    || table_version != shm_layout::table::TABLE_VERSION
                {
                    Response::Error {
                        code: ErrorCode::VersionMismatch,
                        message: format!(
                            "client speaks protocol {protocol} / table {table_version}, broker {} / {}: \
                             use a client and broker of the same forelock release",
                            wire::PROTOCOL_VERSION,
                            shm_layout::table::TABLE_VERSION
                        ),
                    }
                } else {
                    let start = process_start_time(pid).unwrap_or(0);
                    match self.manager.hello(table, pid, uid, start, existing, cell) {
                        Ok(reg) => {
                            let index = match reg {
                                Registered::New { client } | Registered::Attached { client } => {
                                    client
                                }
                            };
                            if let Some(c) = self.conns.get_mut(conn) {
                                c.client = Some(index);
                                c.cell = cell;
                            }
                            let epoch = table.header().broker_epoch.load(Ordering::Relaxed);
                            if let Registered::New { client } = reg
                                && !self.watch_client(client, pid)
                            {
                                // Its death would go unnoticed: refuse it and
                                // free the record (it holds nothing yet).
                                self.manager.bye(&self.files.table, client, &mut self.wakes);
                                if let Some(c) = self.conns.get_mut(conn) {
                                    c.client = None;
                                }
                                Response::Error {
                                    code: ErrorCode::TooManyClients,
                                    message: "the broker cannot watch this process for its death \
                                              (pidfd_open failed; see the broker's log): try again"
                                        .into(),
                                }
                            } else {
                                Response::Welcome {
                                    client: index,
                                    epoch,
                                }
                            }
                        }
                        Err((code, message)) => Response::Error { code, message },
                    }
                }
            }
            (Request::Hello { .. }, Some(_)) => Response::Error {
                code: ErrorCode::BadRequest,
                message: "Hello sent twice on one connection".into(),
            },
            (Request::Ping, _) => Response::Pong,
            // An observer's question: no client record needed, answered
            // from memory, bounded to one message.
            (Request::Waiters { key }, _) => {
                let all = self.manager.waiters(&key);
                Response::Waiters {
                    total: u32::try_from(all.len()).unwrap_or(u32::MAX),
                    waiters: all
                        .into_iter()
                        .take(wire::WAITERS_MAX)
                        .map(|(pid, shared)| wire::WaiterInfo { pid, shared })
                        .collect(),
                }
            }
            (_, None) => Response::Error {
                code: ErrorCode::BadRequest,
                message: "the first message on a connection must be Hello".into(),
            },
            (
                Request::Acquire {
                    key,
                    shared,
                    queue,
                    request,
                },
                Some(client),
            ) => {
                let r = self.manager.acquire(
                    table,
                    &self.files.events,
                    client,
                    id,
                    cell,
                    request,
                    &key,
                    shared,
                    queue,
                );
                self.metrics.record_acquire(&r, started.elapsed());
                if matches!(r, Response::Queued { .. }) {
                    self.metrics.queued(id);
                }
                r
            }
            (Request::Cancel { request }, Some(client)) => {
                self.metrics.dequeued(id);
                self.manager
                    .cancel(table, client, id, request, &mut self.wakes)
            }
            (Request::Bye, Some(client)) => {
                self.manager.bye(table, client, &mut self.wakes);
                if let Some(c) = self.conns.get_mut(conn) {
                    c.client = None;
                }
                Response::Bye
            }
            (Request::Check { slot, token }, Some(client)) => {
                self.manager.check_hold(table, client, slot, token)
            }
            (Request::Release { slot, token }, Some(client)) => {
                let held_since_ms = table
                    .slot(slot)
                    .map(|s| s.held_since_ms.load(Ordering::Relaxed));
                let r = self
                    .manager
                    .release(table, client, slot, token, &mut self.wakes);
                self.metrics.record_release(started.elapsed());
                if let (Response::Released, Some(since)) = (&r, held_since_ms)
                    && since != 0
                {
                    self.metrics.record_hold(std::time::Duration::from_millis(
                        now_ms().saturating_sub(since),
                    ));
                }
                handing_off = !self.wakes.answers.is_empty();
                r
            }
        };
        // Wake the next holder before answering the releaser: the hand-off is
        // on the critical path, the releaser's answer is not.
        self.flush_wakes();
        if handing_off {
            self.metrics.record_handoff(started.elapsed());
        }
        self.send(conn, &response);
    }

    fn flush_wakes(&mut self) {
        let answers = std::mem::take(&mut self.wakes.answers);
        if !answers.is_empty() {
            for (id, response) in &answers {
                if matches!(response, Response::Granted { .. }) {
                    self.metrics.handed_off(*id);
                }
                if self.conns.get(*id).is_some_and(|c| !c.closing) {
                    self.send(*id, response);
                } else {
                    tracing::debug!(
                        conn = id,
                        ?response,
                        "answer for a connection that is gone: dropped"
                    );
                }
            }
            // Hand the answers to the kernel before anyone is woken to read them.
            if let Err(e) = self.ring.submit() {
                tracing::error!(error = %e, "io_uring submit of hand-off answers failed");
            }
        }
        self.wakes.answers = answers;
        self.wakes.answers.clear();
        match self.wakes.mode {
            FutexWake::Syscall => flush_syscall_wakes(&mut self.wakes.pending),
            FutexWake::IoUring => {
                let pending = std::mem::take(&mut self.wakes.pending);
                for word in pending {
                    let ud = self.ops.insert(Op::FutexWake);
                    // FUTEX2_SIZE_U32, not FUTEX2_PRIVATE: the waiter is another process.
                    const FUTEX2_SIZE_U32: u32 = 0x02;
                    let e = opcode::FutexWake::new(
                        word as *const u32,
                        1,
                        u32::MAX as u64,
                        FUTEX2_SIZE_U32,
                    )
                    .build()
                    .user_data(ud);
                    // SAFETY: `word` points to a wait cell's state in the table
                    // mapping (the manager names only cells it reached through
                    // a bounds-checked view of it), which outlives the ring:
                    // `files` is declared after `ring` in EventLoop.
                    unsafe { self.push(e) };
                }
                if let Err(e) = self.ring.submit() {
                    tracing::error!(error = %e, "io_uring submit of futex wakes failed");
                }
            }
        }
    }

    fn tick(&mut self) {
        let now = now_ms();
        // Share of the last tick spent serving completions: the allocator
        // backs off when the broker is busy.
        let window_ns = now.saturating_sub(self.last_tick_ms).max(1) * 1_000_000;
        let load = (self.busy_ns as f64 / window_ns as f64).min(1.0) as f32;
        self.busy_ns = 0;
        self.last_tick_ms = now;
        self.allocation.set_load(load);
        let header = self.files.table.header();
        header
            .heartbeat_ns
            .store(shm_layout::monotonic_ns(), Ordering::Relaxed);
        self.allocation.tick(&mut self.manager, &self.files, now);
        self.metrics.on_tick(&self.files, now);
        if let Some(agent) = self.cluster.clone() {
            self.manager.check_leases(&self.files.table);
            if now.saturating_sub(self.last_cluster_status_ms) >= 500 {
                self.last_cluster_status_ms = now;
                let gauges =
                    crate::cluster_glue::write_status(&self.files.dir, &agent, &self.manager);
                self.metrics.set_cluster(gauges);
            }
        }
        if let Some(every) = self.watchdog_every_ms
            && now.saturating_sub(self.last_watchdog_ms) >= every
        {
            self.last_watchdog_ms = now;
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
        }
    }
}

fn flush_syscall_wakes(pending: &mut Vec<*const AtomicU32>) {
    for word in pending.drain(..) {
        // SAFETY: `word` points to a wait cell's state or a slot's futex word
        // (`park`, `hungry`) in the table mapping,
        // which outlives this call (the manager only names cells it reached
        // through a bounds-checked TableView of the live mapping). FUTEX_WAKE
        // without FUTEX_PRIVATE_FLAG: the waiter is another process.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                word,
                libc::FUTEX_WAKE,
                i32::MAX,
                std::ptr::null::<libc::timespec>(),
                0,
                0,
            )
        };
    }
}

fn listen(path: &std::path::Path, mode: u32) -> anyhow::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    // The instance lock is ours, so a socket file here is a dead broker's.
    let _ = std::fs::remove_file(path);
    // SAFETY: socket() takes no pointers.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("cannot create the broker socket");
    }
    // SAFETY: socket() returned a new fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_un is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    anyhow::ensure!(
        bytes.len() < addr.sun_path.len(),
        "socket path {} is longer than {} bytes: choose a shorter runtime dir",
        path.display(),
        addr.sun_path.len() - 1
    );
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: `addr` is a valid sockaddr_un and the length is its size.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            &addr as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_un>() as u32,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("cannot bind {}", path.display()));
    }
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode))?;
    // SAFETY: listen on a valid bound socket takes no pointers.
    if unsafe { libc::listen(fd.as_raw_fd(), 512) } != 0 {
        return Err(std::io::Error::last_os_error()).context("cannot listen on the broker socket");
    }
    Ok(fd)
}

fn peer_credentials(fd: &OwnedFd) -> Option<(u32, u32)> {
    // SAFETY: ucred is plain data; all-zero is valid.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut cred as *mut _ as *mut libc::c_void,
            &mut len,
        )
    };
    (rc == 0).then_some((cred.pid as u32, cred.uid))
}

/// How long a stopping broker waits for its cluster agent to revoke the
/// lease and leave gossip (each bounded at 2 s by the agent).
const CLUSTER_STOP_WITHIN: std::time::Duration = std::time::Duration::from_secs(5);

/// Block SIGTERM and SIGINT and return a signalfd that reads them.
fn block_signals() -> anyhow::Result<OwnedFd> {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t for each call below.
    unsafe { libc::sigemptyset(&mut set) };
    // SAFETY: as above.
    unsafe { libc::sigaddset(&mut set, libc::SIGTERM) };
    // SAFETY: as above.
    unsafe { libc::sigaddset(&mut set, libc::SIGINT) };
    // SAFETY: `set` is initialised; the old mask is not wanted (null).
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    // SAFETY: `set` is initialised; -1 asks for a new fd.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("cannot create a signalfd");
    }
    // SAFETY: signalfd returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A process's start time in clock ticks since boot (/proc/PID/stat field
/// 22), which with the pid identifies a process across pid reuse.
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces: fields resume after ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(19)?.parse().ok()
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn watchdog_interval_ms() -> Option<u64> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    Some((usec / 2000).max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn an_fd() -> OwnedFd {
        std::fs::File::open("/dev/null").unwrap().into()
    }

    #[test]
    fn a_completion_for_a_closed_connection_never_reaches_the_next_one_at_its_index() {
        let mut conns = Conns::new();
        let attacker = conns.insert(an_fd(), 10, 1000);
        assert!(conns.remove(attacker).is_some());
        let victim = conns.insert(an_fd(), 11, 1000);
        assert_eq!(
            Conns::index(victim),
            Conns::index(attacker),
            "the victim reuses the slab index"
        );
        assert_ne!(victim, attacker);
        // What a stale completion (or a late request) of the attacker's
        // connection would reach: nothing.
        assert!(conns.get(attacker).is_none());
        assert!(conns.get_mut(attacker).is_none());
        assert!(conns.remove(attacker).is_none(), "a stale id frees nothing");
        assert_eq!(conns.get(victim).map(|c| c.pid), Some(11));
    }

    #[test]
    fn connections_are_counted_per_uid_until_freed() {
        let mut conns = Conns::new();
        let a = conns.insert(an_fd(), 1, 1000);
        let b = conns.insert(an_fd(), 2, 1000);
        let c = conns.insert(an_fd(), 3, 0);
        assert_eq!(conns.of_uid(1000), 2);
        assert_eq!(conns.of_uid(0), 1);
        conns.remove(a);
        conns.remove(a);
        assert_eq!(
            conns.of_uid(1000),
            1,
            "a second remove of one id counts once"
        );
        conns.remove(b);
        conns.remove(c);
        assert_eq!(conns.of_uid(1000), 0);
        assert!(conns.per_uid.is_empty());
    }

    #[test]
    fn unsent_answers_and_operations_in_flight_are_counted_without_wrapping() {
        let mut conns = Conns::new();
        let id = conns.insert(an_fd(), 1, 0);
        let c = conns.get_mut(id).unwrap();
        for _ in 0..ANSWERS_MAX {
            c.outbox.push_back(wire::encode(&Response::Pong));
        }
        c.send_armed = true;
        c.recv_armed = true;
        assert_eq!(c.answers_unsent(), ANSWERS_MAX as u32 + 1);
        assert_eq!(c.ops_in_flight(), 2);
    }

    #[test]
    fn accept_out_of_descriptors_backs_off_doubling_to_a_second_and_transient_errors_do_not() {
        let mut pause_ms = 0;
        let mut pauses = Vec::new();
        for _ in 0..10 {
            pause_ms = accept_backoff_after(libc::EMFILE, pause_ms).unwrap();
            pauses.push(pause_ms);
        }
        assert_eq!(
            pauses,
            [5, 10, 20, 40, 80, 160, 320, 640, 1000, 1000],
            "5 ms doubling, capped at 1 s"
        );
        for errno in [libc::ENFILE, libc::ENOBUFS, libc::ENOMEM, libc::EINVAL] {
            assert_eq!(accept_backoff_after(errno, 0), Some(5), "errno {errno}");
        }
        for errno in [libc::ECONNABORTED, libc::EINTR, libc::EAGAIN] {
            assert_eq!(accept_backoff_after(errno, 640), None, "errno {errno}");
        }
    }

    #[test]
    fn a_rate_limited_log_reports_the_first_event_then_once_per_period_with_a_count() {
        let mut log = RateLimited::new(1000);
        assert_eq!(log.allow(5000), Some(0));
        assert_eq!(log.allow(5001), None);
        assert_eq!(log.allow(5999), None);
        assert_eq!(log.allow(6000), Some(2));
        assert_eq!(log.allow(6001), None);
    }
}
