//! The broker's single-threaded io_uring event loop: accept, recv and send on
//! the Unix socket, one pidfd poll per client (death detection), the tick
//! timer, the signalfd (SIGTERM/SIGINT), and optionally futex wakes.
//!
//! Every submission's `user_data` names an entry of a slab of in-flight
//! operations ([`OpSlab`]) with a generation; every buffer an operation
//! points to is owned by that entry until its completion arrives, which is
//! what makes each `push` below sound.

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
use std::time::Instant;

const RECV_BUF: usize = wire::MAX_MESSAGE + 1;

/// An in-flight operation and the memory it borrows.
enum Op {
    Accept,
    Recv {
        conn: usize,
        buf: Box<[u8; RECV_BUF]>,
    },
    Send {
        conn: usize,
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

struct Conn {
    fd: OwnedFd,
    id: ConnId,
    pid: u32,
    uid: u32,
    client: Option<u32>,
    cell: u32,
    /// In-flight recv and send operations; the fd closes when both are done.
    inflight: u8,
    closing: bool,
}

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
    config: Config,
    files: RuntimeFiles,
    manager: LockManager,
    allocation: Allocation,
    metrics: Metrics,
    ring: IoUring,
    ops: OpSlab,
    conns: Vec<Option<Conn>>,
    next_conn_id: u64,
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
}

fn now_ms() -> u64 {
    shm_layout::monotonic_ns() / 1_000_000
}

impl EventLoop {
    pub fn new(config: Config) -> anyhow::Result<EventLoop> {
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
        let manager = LockManager::adopt(
            &files.table,
            ledger,
            config.allocator.policy,
            crate::locks::Limits::for_table(geometry.client_count),
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
        let listener = listen(
            &files.dir.join(shm_layout::SOCKET_FILE),
            config.socket_mode(),
        )?;
        let signal_fd = block_signals()?;
        // No COOP_TASKRUN or DEFER_TASKRUN: completions must reach the
        // completion queue while the loop spins in user space.
        let ring = IoUring::builder()
            .setup_single_issuer()
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
            conns: Vec::new(),
            next_conn_id: 1,
            listener,
            signal_fd,
            client_generation: vec![0; clients],
            wakes,
            stopping: false,
            watchdog_every_ms,
            last_watchdog_ms: 0,
            busy_ns: 0,
            last_tick_ms: now_ms(),
        };
        for (client, pid) in event_loop.manager.active_clients() {
            event_loop.watch_client(client, pid);
        }
        Ok(event_loop)
    }

    /// Serve until SIGTERM or SIGINT.
    pub fn run(mut self) -> anyhow::Result<()> {
        self.arm_accept();
        self.arm_signal();
        self.arm_tick();
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
            // While someone waits in a queue, a release is coming: stay awake
            // for it longer (the waiters sleep, so their CPU is free).
            let spin = if self.manager.has_waiters() {
                spin_waiters.max(spin)
            } else {
                spin
            };
            self.spin_for_completions(spin)?;
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(e).context("io_uring submit failed"),
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
        tracing::info!(
            "forelockd stopping: locks held stay recorded in the table for the next broker"
        );
        Ok(())
    }

    /// Submit what is queued, then poll the completion queue for up to `spin`
    /// before the caller blocks. Waking a sleeping CPU costs tens of
    /// microseconds on virtual machines (measured: a broker round trip of
    /// 56 us across CPUs against 11 us on one); a request arriving while we
    /// spin is served without that wake-up. Bounded: at most `spin` of CPU
    /// per idle period.
    fn spin_for_completions(&mut self, spin: std::time::Duration) -> anyhow::Result<()> {
        if spin.is_zero() {
            return Ok(());
        }
        self.ring.submit().context("io_uring submit failed")?;
        let started = Instant::now();
        while self.ring.completion().is_empty() {
            for _ in 0..64 {
                std::hint::spin_loop();
            }
            if started.elapsed() >= spin {
                break;
            }
        }
        Ok(())
    }

    fn push(&mut self, entry: squeue::Entry) {
        loop {
            // SAFETY: every entry pushed here points only into memory owned by
            // the Op stored in `self.ops` under the entry's user_data (receive
            // and send buffers, timespecs, the signal buffer) or into the table
            // mapping (futex words), which outlives the ring; the Op is removed
            // only when its completion arrives, so the memory outlives the
            // kernel's use of it.
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
        self.push(e);
    }

    fn arm_signal(&mut self) {
        let mut buf = Box::new([0u8; 128]);
        let ptr = buf.as_mut_ptr();
        let ud = self.ops.insert(Op::Signal { _buf: buf });
        let e = opcode::Read::new(types::Fd(self.signal_fd.as_raw_fd()), ptr, 128)
            .build()
            .user_data(ud);
        self.push(e);
    }

    fn arm_tick(&mut self) {
        let ms = self.config.allocator.tick_ms;
        let ts = Box::new(
            types::Timespec::new()
                .sec(ms / 1000)
                .nsec(((ms % 1000) * 1_000_000) as u32),
        );
        let ptr: *const types::Timespec = &*ts;
        let ud = self.ops.insert(Op::Tick { _ts: ts });
        let e = opcode::Timeout::new(ptr).build().user_data(ud);
        self.push(e);
    }

    fn arm_recv(&mut self, conn: usize) {
        let Some(c) = self.conns[conn].as_mut() else {
            return;
        };
        c.inflight += 1;
        let fd = c.fd.as_raw_fd();
        let mut buf = Box::new([0u8; RECV_BUF]);
        let ptr = buf.as_mut_ptr();
        let ud = self.ops.insert(Op::Recv { conn, buf });
        let e = opcode::Recv::new(types::Fd(fd), ptr, RECV_BUF as u32)
            .build()
            .user_data(ud);
        self.push(e);
    }

    fn send(&mut self, conn: usize, response: &Response) {
        let Some(c) = self.conns[conn].as_mut() else {
            return;
        };
        c.inflight += 1;
        let fd = c.fd.as_raw_fd();
        let buf = wire::encode(response);
        let (ptr, len) = (buf.as_ptr(), buf.len() as u32);
        let ud = self.ops.insert(Op::Send { conn, _buf: buf });
        let e = opcode::Send::new(types::Fd(fd), ptr, len)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(ud);
        self.push(e);
    }

    fn watch_client(&mut self, client: u32, pid: u32) {
        // SAFETY: pidfd_open takes a pid and flags, no pointers.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if fd < 0 {
            // Already gone (ESRCH): release its locks now.
            self.manager
                .client_gone(&self.files.table, client, &mut self.wakes);
            self.flush_wakes();
            return;
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
        self.push(e);
    }

    fn complete(&mut self, user_data: u64, result: i32) {
        let Some(op) = self.ops.take(user_data) else {
            return;
        };
        match op {
            Op::Accept => {
                if result >= 0 {
                    // SAFETY: a successful accept returns a new fd we own.
                    let fd = unsafe { OwnedFd::from_raw_fd(result) };
                    self.accepted(fd);
                } else {
                    tracing::warn!(errno = -result, "accept failed");
                }
                self.arm_accept();
            }
            Op::Recv { conn, buf } => {
                self.op_done(conn);
                if result <= 0 {
                    self.close(conn);
                } else {
                    self.received(conn, &buf[..result as usize]);
                    if self.conns[conn].as_ref().is_some_and(|c| !c.closing) {
                        self.arm_recv(conn);
                    }
                }
            }
            Op::Send { conn, .. } => {
                self.op_done(conn);
                if result < 0 {
                    self.close(conn);
                }
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
            Op::FutexWake => {
                if result < 0 {
                    tracing::warn!(errno = -result, "io_uring futex wake failed");
                }
            }
        }
    }

    fn accepted(&mut self, fd: OwnedFd) {
        let Some((pid, uid)) = peer_credentials(&fd) else {
            tracing::warn!("connection without peer credentials: closed");
            return;
        };
        let index = self
            .conns
            .iter()
            .position(Option::is_none)
            .unwrap_or_else(|| {
                self.conns.push(None);
                self.conns.len() - 1
            });
        let id = conn_id(self.next_conn_id, index);
        self.next_conn_id += 1;
        self.conns[index] = Some(Conn {
            fd,
            id,
            pid,
            uid,
            client: None,
            cell: 0,
            inflight: 0,
            closing: false,
        });
        self.arm_recv(index);
    }

    fn op_done(&mut self, conn: usize) {
        let Some(c) = self.conns[conn].as_mut() else {
            return;
        };
        c.inflight -= 1;
        if c.closing && c.inflight == 0 {
            self.conns[conn] = None; // closes the fd
        }
    }

    fn close(&mut self, conn: usize) {
        let Some(c) = self.conns[conn].as_mut() else {
            return;
        };
        if c.closing {
            return;
        }
        c.closing = true;
        let (id, client) = (c.id, c.client);
        if c.inflight == 0 {
            self.conns[conn] = None;
        }
        let _ = client;
        self.metrics.dequeued(id);
        self.manager
            .conn_closed(&self.files.table, id, &mut self.wakes);
        self.flush_wakes();
    }

    fn received(&mut self, conn: usize, bytes: &[u8]) {
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
        let c = self.conns[conn]
            .as_ref()
            .expect("a receiving connection exists");
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
                            let c = self.conns[conn].as_mut().expect("exists");
                            c.client = Some(index);
                            c.cell = cell;
                            let epoch = table.header().broker_epoch.load(Ordering::Relaxed);
                            if let Registered::New { client } = reg {
                                self.watch_client(client, pid);
                            }
                            Response::Welcome {
                                client: index,
                                epoch,
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
                if let Some(c) = self.conns[conn].as_mut() {
                    c.client = None;
                }
                Response::Bye
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
                let index = (*id & 0xFFFF_FFFF) as usize;
                if self
                    .conns
                    .get(index)
                    .and_then(Option::as_ref)
                    .is_some_and(|c| c.id == *id && !c.closing)
                {
                    self.send(index, response);
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
                    self.push(e);
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
        // SAFETY: `word` points to a wait cell's state in the table mapping,
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
