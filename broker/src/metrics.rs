//! Latency histograms and the Prometheus endpoint.
//!
//! The event loop records into per-path interval histograms (no allocation,
//! no lock, no syscall). About once a second [`Metrics::on_tick`] swaps them
//! for empty ones and hands the full ones to a writer thread over a bounded
//! channel (`try_send`: if the writer falls behind, that interval is dropped
//! and counted, the event loop never waits). The writer thread:
//!
//! - appends each non-empty interval to `<runtime dir>/histograms.hlog`, an
//!   HdrHistogram V2 interval log (tag = path, values in nanoseconds, the max
//!   column in milliseconds like Java's `HistogramLogWriter`); when the file
//!   passes [`LOG_MAX_BYTES`] it becomes `histograms.hlog.1` (the older one is
//!   dropped), so the two files never hold much more than twice that;
//! - adds each interval to cumulative histograms and publishes their quantiles
//!   in a shared snapshot for the Prometheus endpoint;
//! - gives the emptied histograms back for reuse.
//!
//! The Prometheus text endpoint (`metrics.prometheus_listen`, off when empty)
//! is a small std thread with a blocking `TcpListener`: the counters come
//! straight from the table header's [`Stats`](shm_layout::table::Stats)
//! (atomics in shared memory), the quantiles from the snapshot.
//!
//! `forelock hist` reads the log files.

use crate::locks::ConnId;
use hdrhistogram::Histogram;
use hdrhistogram::serialization::V2DeflateSerializer;
use hdrhistogram::serialization::interval_log::{IntervalLogWriterBuilder, Tag};
use shm_layout::sync::shm::Ordering;
use shm_layout::wire::Response;
use std::cell::Cell;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::rc::Rc;
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError, sync_channel};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The interval log under the runtime directory, and its predecessor.
pub const HISTOGRAM_LOG_FILE: &str = "histograms.hlog";
pub const HISTOGRAM_LOG_ROTATED_FILE: &str = "histograms.hlog.1";
/// The log rotates when it grows past this.
pub const LOG_MAX_BYTES: u64 = 4 << 20;
/// Length of one interval histogram.
pub const INTERVAL_MS: u64 = 1000;
/// Largest recordable latency (60 s), in nanoseconds; larger values saturate.
const HIGHEST_NS: u64 = 60_000_000_000;
const SIGNIFICANT_DIGITS: u8 = 3;
/// Intervals queued for the writer thread before new ones are dropped.
const WRITER_BACKLOG: usize = 4;
/// Quantiles the Prometheus endpoint exports.
pub const QUANTILES: [f64; 5] = [0.5, 0.9, 0.99, 0.999, 1.0];

/// The latencies the broker measures. The fast path (a client's own CAS on a
/// prepared slot) never reaches the broker, so it has no histogram here:
/// `forelock bench` measures it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LatencyPath {
    /// Acquire of an unprepared, free key: request received to `Granted` ready.
    AcquireSlow = 0,
    /// Acquire of a held key: request received to `Queued` ready.
    AcquireQueued = 1,
    /// Time a queued request waited in the broker's queue until its hand-off.
    Wait = 2,
    /// Time a broker-granted lock was held (grant to release), ms resolution.
    Hold = 3,
    /// Release received to the next holder's futex woken.
    Handoff = 4,
    /// Release request received to `Released` ready.
    Release = 5,
}

pub const PATHS: usize = 6;

impl LatencyPath {
    pub const ALL: [LatencyPath; PATHS] = [
        LatencyPath::AcquireSlow,
        LatencyPath::AcquireQueued,
        LatencyPath::Wait,
        LatencyPath::Hold,
        LatencyPath::Handoff,
        LatencyPath::Release,
    ];

    /// The tag in the interval log and the `path` label in Prometheus.
    pub const fn tag(self) -> &'static str {
        match self {
            LatencyPath::AcquireSlow => "acquire-slow",
            LatencyPath::AcquireQueued => "acquire-queued",
            LatencyPath::Wait => "wait",
            LatencyPath::Hold => "hold",
            LatencyPath::Handoff => "handoff",
            LatencyPath::Release => "release",
        }
    }
}

type Set = Box<[Histogram<u64>; PATHS]>;

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIGHEST_NS, SIGNIFICANT_DIGITS).expect("valid histogram bounds")
}

fn new_set() -> Set {
    Box::new(std::array::from_fn(|_| new_histogram()))
}

/// One interval handed to the writer thread.
struct Interval {
    start: Duration,
    length: Duration,
    histograms: Set,
}

/// Cumulative figures per path since the broker started, for Prometheus.
#[derive(Clone, Debug, Default)]
pub struct PathSummary {
    pub count: u64,
    pub sum_ns: f64,
    /// Values at [`QUANTILES`], nanoseconds.
    pub quantiles_ns: [u64; QUANTILES.len()],
}

/// The cluster agent's state for Prometheus (`cluster.json` holds the same
/// and more), refreshed with `cluster.json`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClusterGauges {
    pub connected: bool,
    /// How long the broker may still grant under its lease (0: not granting).
    pub safe_for_ms: u64,
    pub fences: u64,
    pub node_grants: u64,
    pub wanted: u64,
    pub lost_holds: u64,
    pub prefetch_hits: u64,
    pub first_uses_waited: u64,
    pub prefetch_unused: u64,
    pub prefetch_unused_wait_us: u64,
    pub members_up: u64,
    pub members_down: u64,
}

impl ClusterGauges {
    /// Grants global keys now: connected to etcd, under a lease it can vouch
    /// for. `forelock status`'s "NOT GRANTING" line is the same judgement.
    pub fn granting(&self) -> bool {
        self.connected && self.safe_for_ms > 0
    }
}

#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub paths: [PathSummary; PATHS],
    /// Set once the cluster agent runs (`[cluster]` configured).
    pub cluster: Option<ClusterGauges>,
    /// Intervals dropped because the writer thread was behind.
    pub intervals_dropped: u64,
    /// Last error writing the log, if any.
    pub log_error: Option<String>,
}

/// Per-path latency histograms of the broker.
pub struct Metrics {
    current: Set,
    interval_start_ms: u64,
    interval_start_unix: Duration,
    writer: Option<SyncSender<Interval>>,
    recycled: Option<Receiver<Set>>,
    snapshot: Arc<Mutex<Snapshot>>,
    dropped: u64,
    /// When each queued connection's request was queued (for the wait
    /// histogram). One entry per queued connection at most: bounded by the
    /// connections the broker has open.
    queued_since: HashMap<ConnId, Instant>,
}

fn unix_now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

fn monotonic_ms() -> u64 {
    shm_layout::monotonic_ns() / 1_000_000
}

fn ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1)
}

impl Metrics {
    /// Start the log writer thread, and the Prometheus endpoint if
    /// configured. Failures are logged; the broker serves locks regardless.
    pub fn new(config: &crate::config::Config, runtime_dir: &Path) -> Metrics {
        let snapshot = Arc::new(Mutex::new(Snapshot::default()));
        let (to_writer, from_loop) = sync_channel::<Interval>(WRITER_BACKLOG);
        let (to_loop, recycled) = sync_channel::<Set>(WRITER_BACKLOG + 2);
        let started = unix_now();
        let writer = {
            let dir = runtime_dir.to_owned();
            let snapshot = snapshot.clone();
            std::thread::Builder::new()
                .name("forelockd-hlog".into())
                .spawn(move || {
                    write_log(&dir, LOG_MAX_BYTES, started, from_loop, to_loop, &snapshot)
                })
        };
        let (writer, recycled) = match writer {
            Ok(_) => (Some(to_writer), Some(recycled)),
            Err(error) => {
                tracing::error!(%error, "cannot start the histogram writer thread: no histogram log");
                (None, None)
            }
        };
        let listen = config.metrics.prometheus_listen.trim();
        if !listen.is_empty() {
            start_prometheus(listen, runtime_dir, snapshot.clone());
        }
        Metrics {
            current: new_set(),
            interval_start_ms: monotonic_ms(),
            interval_start_unix: started,
            writer,
            recycled,
            snapshot,
            dropped: 0,
            queued_since: HashMap::new(),
        }
    }

    /// The cumulative figures the writer thread last published.
    pub fn snapshot(&self) -> Arc<Mutex<Snapshot>> {
        self.snapshot.clone()
    }

    /// Called every allocator tick (default 10 ms) with the broker's clock.
    /// Once per [`INTERVAL_MS`] hands the interval to the writer thread.
    pub fn on_tick(&mut self, _files: &crate::files::RuntimeFiles, now_ms: u64) {
        let elapsed_ms = now_ms.saturating_sub(self.interval_start_ms);
        if elapsed_ms < INTERVAL_MS {
            return;
        }
        let now_unix = unix_now();
        let start = self.interval_start_unix;
        self.interval_start_ms = now_ms;
        self.interval_start_unix = now_unix;
        let Some(writer) = &self.writer else {
            self.current.iter_mut().for_each(Histogram::reset);
            return;
        };
        if self.current.iter().all(|h| h.is_empty()) {
            return;
        }
        let fresh = match self.recycled.as_ref().map(Receiver::try_recv) {
            Some(Ok(set)) => set,
            Some(Err(TryRecvError::Empty)) | Some(Err(TryRecvError::Disconnected)) | None => {
                new_set()
            }
        };
        let histograms = std::mem::replace(&mut self.current, fresh);
        let interval = Interval {
            start,
            length: Duration::from_millis(elapsed_ms),
            histograms,
        };
        match writer.try_send(interval) {
            Ok(()) => {}
            Err(TrySendError::Full(mut interval)) => {
                // Never wait for the writer: drop this interval, keep its
                // memory for the next one.
                self.dropped += 1;
                interval.histograms.iter_mut().for_each(Histogram::reset);
                self.current = interval.histograms;
                if let Ok(mut s) = self.snapshot.try_lock() {
                    s.intervals_dropped = self.dropped;
                }
            }
            Err(TrySendError::Disconnected(_)) => {
                tracing::error!("the histogram writer thread stopped: no more histogram log");
                self.writer = None;
            }
        }
    }

    fn record(&mut self, path: LatencyPath, value_ns: u64) {
        self.current[path as usize].saturating_record(value_ns.max(1));
    }

    /// A request's service time, by its answer: `Granted` is the slow path,
    /// `Queued` the contended one; other answers are not latencies of a path.
    pub fn record_acquire(&mut self, response: &Response, took: Duration) {
        match response {
            Response::Granted { .. } => self.record(LatencyPath::AcquireSlow, ns(took)),
            Response::Queued { .. } => self.record(LatencyPath::AcquireQueued, ns(took)),
            _ => {}
        }
    }

    pub fn record_release(&mut self, took: Duration) {
        self.record(LatencyPath::Release, ns(took));
    }

    /// A queued request was handed the lock after waiting `waited`.
    pub fn record_wait(&mut self, waited: Duration) {
        self.record(LatencyPath::Wait, ns(waited));
    }

    /// The request on connection `conn` was answered `Queued` now.
    pub fn queued(&mut self, conn: ConnId) {
        self.queued_since.insert(conn, Instant::now());
    }

    /// The request queued on `conn` was just handed the lock: records its
    /// wait.
    pub fn handed_off(&mut self, conn: ConnId) {
        if let Some(since) = self.queued_since.remove(&conn) {
            self.record_wait(since.elapsed());
        }
    }

    /// The request queued on `conn` left the queue without a hand-off
    /// (cancelled, connection closed, client died).
    pub fn dequeued(&mut self, conn: ConnId) {
        self.queued_since.remove(&conn);
    }

    /// The cluster agent's state now, for the Prometheus endpoint.
    pub fn set_cluster(&self, gauges: ClusterGauges) {
        lock(&self.snapshot).cluster = Some(gauges);
    }

    /// A broker-granted lock was released after being held `held`.
    pub fn record_hold(&mut self, held: Duration) {
        self.record(LatencyPath::Hold, ns(held));
    }

    /// A release handed the lock to a waiter and woke it, `took` after the
    /// release request arrived.
    pub fn record_handoff(&mut self, took: Duration) {
        self.record(LatencyPath::Handoff, ns(took));
    }
}

/// Counts bytes written, to know when to rotate.
struct Counting<W> {
    inner: W,
    written: Rc<Cell<u64>>,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written.set(self.written.get() + n as u64);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// The writer thread: runs until the event loop drops its sender.
fn write_log(
    dir: &Path,
    max_bytes: u64,
    broker_started: Duration,
    intervals: Receiver<Interval>,
    recycle: SyncSender<Set>,
    snapshot: &Mutex<Snapshot>,
) {
    let path = dir.join(HISTOGRAM_LOG_FILE);
    let rotated = dir.join(HISTOGRAM_LOG_ROTATED_FILE);
    let mut totals = new_set();
    let mut serializer = V2DeflateSerializer::new();
    // A previous broker's log is kept as the rotated one: each file then has
    // one header and one base time.
    let _ = std::fs::rename(&path, &rotated);
    loop {
        let file = match open_log(&path) {
            Ok(file) => file,
            Err(error) => {
                let message = format!("cannot create {}: {error}", path.display());
                tracing::error!("{message}; histograms are kept in memory only");
                lock(snapshot).log_error = Some(message);
                // Keep draining so the event loop's channel never fills.
                for mut interval in intervals.iter() {
                    accumulate(&mut totals, &interval.histograms, snapshot);
                    interval.histograms.iter_mut().for_each(Histogram::reset);
                    let _ = recycle.try_send(interval.histograms);
                }
                return;
            }
        };
        let written = Rc::new(Cell::new(0));
        let mut out = Counting {
            inner: file,
            written: written.clone(),
        };
        let mut builder = IntervalLogWriterBuilder::new();
        builder
            .add_comment("forelockd latency histograms: values in nanoseconds, tag = path")
            .add_comment("paths: acquire-slow acquire-queued wait hold handoff release")
            .with_start_time(UNIX_EPOCH + broker_started)
            .with_base_time(UNIX_EPOCH + broker_started)
            .with_max_value_divisor(1_000_000.0);
        let mut log = match builder.begin_log_with(&mut out, &mut serializer) {
            Ok(log) => log,
            Err(error) => {
                tracing::error!(%error, path = %path.display(), "cannot write the histogram log header");
                return;
            }
        };
        let rotate = loop {
            let Ok(mut interval) = intervals.recv() else {
                return;
            };
            let start = interval.start.saturating_sub(broker_started);
            for p in LatencyPath::ALL {
                let h = &interval.histograms[p as usize];
                if h.is_empty() {
                    continue;
                }
                let tag = Tag::new(p.tag());
                if let Err(error) = log.write_histogram(h, start, interval.length, tag) {
                    let message = format!("writing {}: {error:?}", path.display());
                    tracing::warn!("{message}");
                    lock(snapshot).log_error = Some(message);
                }
            }
            accumulate(&mut totals, &interval.histograms, snapshot);
            interval.histograms.iter_mut().for_each(Histogram::reset);
            let _ = recycle.try_send(interval.histograms);
            if written.get() > max_bytes {
                break true;
            }
        };
        drop(log);
        if rotate {
            let _ = std::fs::rename(&path, &rotated);
        }
    }
}

fn open_log(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(path)
}

fn lock(snapshot: &Mutex<Snapshot>) -> std::sync::MutexGuard<'_, Snapshot> {
    snapshot.lock().unwrap_or_else(PoisonError::into_inner)
}

fn accumulate(totals: &mut Set, interval: &Set, snapshot: &Mutex<Snapshot>) {
    let mut paths: [PathSummary; PATHS] = Default::default();
    for p in LatencyPath::ALL {
        let total = &mut totals[p as usize];
        // Same bounds on both sides: adding cannot fail.
        let _ = total.add(&interval[p as usize]);
        let summary = &mut paths[p as usize];
        summary.count = total.len();
        summary.sum_ns = total.mean() * total.len() as f64;
        for (q, out) in QUANTILES.iter().zip(summary.quantiles_ns.iter_mut()) {
            *out = total.value_at_quantile(*q);
        }
    }
    lock(snapshot).paths = paths;
}

// ---- the Prometheus text endpoint ----------------------------------------------

/// Bind `listen` and serve `/metrics` (any path, in fact) from a thread.
fn start_prometheus(listen: &str, runtime_dir: &Path, snapshot: Arc<Mutex<Snapshot>>) {
    let listener = match TcpListener::bind(listen) {
        Ok(listener) => listener,
        Err(error) => {
            tracing::error!(
                %error,
                address = listen,
                "cannot listen for Prometheus (metrics.prometheus_listen): endpoint off; \
                 choose a free address or leave it empty"
            );
            return;
        }
    };
    let table_path = runtime_dir.join(shm_layout::TABLE_FILE);
    let spawned = std::thread::Builder::new()
        .name("forelockd-prometheus".into())
        .spawn(move || serve_prometheus(&listener, &table_path, &snapshot));
    match spawned {
        Ok(_) => tracing::info!(
            address = listen,
            "Prometheus metrics at http://{listen}/metrics"
        ),
        Err(error) => tracing::error!(%error, "cannot start the Prometheus thread: endpoint off"),
    }
}

/// A read-only mapping of the table, for the counters in its header.
struct MappedStats {
    // Field order: the view, then the SIGBUS registration, then the mapping.
    view: shm_layout::table::TableView,
    _guard: crate::files::MappingGuard,
    _map: memmap2::Mmap,
}

impl MappedStats {
    fn open(path: &Path) -> Result<MappedStats, String> {
        let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        // SAFETY:
        // - a read-only shared mapping of a regular file: the other writers
        //   (the event loop, clients) change it only through atomics, and this
        //   thread reads it only through the atomics of a TableView;
        // - a process of the access group may truncate it: the mapping is
        //   registered with the broker's SIGBUS handler (below), which then
        //   puts zeros in its place instead of letting the fault kill us.
        let map =
            unsafe { memmap2::Mmap::map(&file) }.map_err(|e| format!("{}: {e}", path.display()))?;
        let guard = crate::files::MappingGuard::register(map.as_ptr(), map.len())
            .map_err(|e| format!("{}: {e:#}", path.display()))?;
        // SAFETY:
        // - `map` is page-aligned (so 64-aligned) and `map.len()` bytes long;
        // - it stays mapped as long as the view: both live in this struct and
        //   the view is never handed out beyond a borrow of it;
        // - concurrent writers use atomics only (see above).
        let view = unsafe { shm_layout::table::TableView::new(map.as_ptr(), map.len()) }
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(MappedStats {
            view,
            _guard: guard,
            _map: map,
        })
    }
}

fn serve_prometheus(listener: &TcpListener, table_path: &Path, snapshot: &Mutex<Snapshot>) {
    let mut table = None;
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        if table.is_none() {
            match MappedStats::open(table_path) {
                Ok(t) => table = Some(t),
                Err(error) => tracing::warn!(%error, "Prometheus: cannot map the table"),
            }
        }
        let body = render_prometheus(table.as_ref().map(|t| &t.view), &lock(snapshot).clone());
        let _ = answer(&mut stream, &body);
    }
}

/// Read the request head (bounded, with timeouts) and answer with `body`.
fn answer(stream: &mut TcpStream, body: &str) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut head = [0u8; 4096];
    let mut len = 0;
    while len < head.len() && !head[..len].windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut head[len..])? {
            0 => break,
            n => len += n,
        }
    }
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes())
}

/// The Prometheus text exposition of the table's counters and the latency
/// quantiles.
pub fn render_prometheus(
    table: Option<&shm_layout::table::TableView>,
    snapshot: &Snapshot,
) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(4096);
    let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    };
    if let Some(table) = table {
        let header = table.header();
        let s = &header.stats;
        let get = |a: &shm_layout::sync::shm::AtomicU64| a.load(Ordering::Relaxed);
        let counters = [
            (
                "forelock_grants_prepared_total",
                "Grants clients made themselves on prepared slots (hits).",
                get(&s.hits),
            ),
            (
                "forelock_grants_unprepared_total",
                "Grants through the broker for keys that were not prepared (misses).",
                get(&s.misses),
            ),
            (
                "forelock_contended_total",
                "Requests that found their key held and queued.",
                get(&s.contended),
            ),
            (
                "forelock_handoffs_total",
                "Releases handed straight to the head waiter.",
                get(&s.handoffs),
            ),
            (
                "forelock_contention_prepared_total",
                "Keys whose waiter queue was prepared because contention was forecast.",
                get(&s.contention_prepared),
            ),
            (
                "forelock_contention_prepared_hits_total",
                "Contention preparations that a queued waiter then used.",
                get(&s.contention_prepared_hits),
            ),
            (
                "forelock_owner_deaths_total",
                "Locks released because their holder died.",
                get(&s.owner_deaths),
            ),
            (
                "forelock_preparations_total",
                "Slots prepared ahead of a request.",
                get(&s.preparations),
            ),
            (
                "forelock_preparations_wasted_total",
                "Preparations reclaimed without any grant.",
                get(&s.wasted),
            ),
            (
                "forelock_late_total",
                "Requests that arrived while their key was being prepared.",
                get(&s.late),
            ),
            (
                "forelock_table_full_total",
                "Requests refused because the table was full.",
                get(&s.table_full),
            ),
            (
                "forelock_repairs_total",
                "Lock words found malformed and repaired.",
                get(&s.repairs),
            ),
        ];
        for (name, help, value) in counters {
            metric(name, "counter", help, value);
        }
        let gauges = [
            (
                "forelock_clients",
                "Clients registered now.",
                get(&s.clients),
            ),
            (
                "forelock_slots_used",
                "Slots holding a key now.",
                get(&s.slots_used),
            ),
            (
                "forelock_slots_prepared",
                "Slots prepared now.",
                get(&s.slots_prepared),
            ),
            (
                "forelock_slots_capacity",
                "Slots in the table.",
                u64::from(table.geometry().slot_count),
            ),
            (
                "forelock_broker_epoch",
                "Broker starts on this table.",
                get(&header.broker_epoch),
            ),
        ];
        for (name, help, value) in gauges {
            metric(name, "gauge", help, value);
        }
    }
    if let Some(c) = &snapshot.cluster {
        let metrics = [
            (
                "forelock_cluster_granting",
                "gauge",
                "1 if this broker grants global keys now (connected to etcd, under a lease it can vouch for), else 0.",
                u64::from(c.granting()),
            ),
            (
                "forelock_cluster_etcd_connected",
                "gauge",
                "1 if the cluster agent's last etcd step succeeded, else 0.",
                u64::from(c.connected),
            ),
            (
                "forelock_cluster_lease_safe_for_ms",
                "gauge",
                "How long this broker may still grant under its etcd lease without another renewal.",
                c.safe_for_ms,
            ),
            (
                "forelock_cluster_fences_total",
                "counter",
                "Times this broker stopped granting global keys because it could not confirm its lease.",
                c.fences,
            ),
            (
                "forelock_cluster_node_grants",
                "gauge",
                "Global keys whose node grant this host holds now.",
                c.node_grants,
            ),
            (
                "forelock_cluster_node_grants_wanted",
                "gauge",
                "Global keys this host waits for at etcd now.",
                c.wanted,
            ),
            (
                "forelock_cluster_lost_holds",
                "gauge",
                "Local holds of global keys lost with their node grant and not yet released.",
                c.lost_holds,
            ),
            (
                "forelock_cluster_prefetch_hits_total",
                "counter",
                "First local uses of a global key that found its prefetched node grant here.",
                c.prefetch_hits,
            ),
            (
                "forelock_cluster_first_uses_waited_total",
                "counter",
                "First local uses of a global key that waited for its node grant.",
                c.first_uses_waited,
            ),
            (
                "forelock_cluster_prefetch_unused_total",
                "counter",
                "Prefetched node grants given back without a local use.",
                c.prefetch_unused,
            ),
            (
                "forelock_cluster_prefetch_unused_wait_us_total",
                "counter",
                "Microseconds other hosts waited for prefetched node grants nobody here used.",
                c.prefetch_unused_wait_us,
            ),
        ];
        for (name, kind, help, value) in metrics {
            metric(name, kind, help, value);
        }
    }
    metric(
        "forelock_histogram_intervals_dropped_total",
        "counter",
        "Latency intervals dropped because the histogram writer was behind.",
        snapshot.intervals_dropped,
    );
    if let Some(c) = &snapshot.cluster {
        let name = "forelock_cluster_members";
        let _ = writeln!(
            out,
            "# HELP {name} Brokers gossip shows, by state.\n# TYPE {name} gauge\n\
             {name}{{state=\"up\"}} {}\n{name}{{state=\"down\"}} {}",
            c.members_up, c.members_down
        );
    }
    let name = "forelock_latency_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} Broker-side latency per path (the fast path never reaches the broker).\n\
         # TYPE {name} summary"
    );
    for p in LatencyPath::ALL {
        let summary = &snapshot.paths[p as usize];
        let tag = p.tag();
        for (q, v) in QUANTILES.iter().zip(summary.quantiles_ns) {
            let _ = writeln!(
                out,
                "{name}{{path=\"{tag}\",quantile=\"{q}\"}} {:e}",
                v as f64 / 1e9
            );
        }
        let _ = writeln!(
            out,
            "{name}_sum{{path=\"{tag}\"}} {:e}",
            summary.sum_ns / 1e9
        );
        let _ = writeln!(out, "{name}_count{{path=\"{tag}\"}} {}", summary.count);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prometheus_text_names_every_path_and_parses_as_name_value_lines() {
        let mut snapshot = Snapshot::default();
        snapshot.paths[LatencyPath::Wait as usize].count = 3;
        let text = render_prometheus(None, &snapshot);
        for p in LatencyPath::ALL {
            assert!(text.contains(&format!("path=\"{}\"", p.tag())), "{text}");
        }
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = line.rsplit_once(' ').expect("name value");
            assert!(!name.is_empty());
            value.parse::<f64>().unwrap_or_else(|_| panic!("{line}"));
        }
        assert!(text.contains("forelock_latency_seconds_count{path=\"wait\"} 3"));
        assert!(
            !text.contains("forelock_cluster_"),
            "no [cluster], no cluster lines"
        );
        snapshot.cluster = Some(ClusterGauges {
            connected: true,
            safe_for_ms: 2500,
            fences: 2,
            members_up: 3,
            ..ClusterGauges::default()
        });
        let text = render_prometheus(None, &snapshot);
        for line in [
            "forelock_cluster_granting 1",
            "forelock_cluster_lease_safe_for_ms 2500",
            "forelock_cluster_fences_total 2",
            "forelock_cluster_members{state=\"up\"} 3",
            "# TYPE forelock_cluster_fences_total counter",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in {text}");
        }
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (_, value) = line.rsplit_once(' ').expect("name value");
            value.parse::<f64>().unwrap_or_else(|_| panic!("{line}"));
        }
    }

    #[test]
    fn the_log_rotates_past_its_size_and_stays_bounded() {
        let dir = std::env::temp_dir().join(format!("fl-metrics-rotate-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (to_writer, intervals) = sync_channel::<Interval>(64);
        let (recycle, _recycled) = sync_channel::<Set>(64);
        let snapshot = Mutex::new(Snapshot::default());
        for i in 0..20u64 {
            let mut histograms = new_set();
            for v in 1..=100 {
                histograms[LatencyPath::Wait as usize]
                    .record(v * 1000 + i)
                    .unwrap();
            }
            to_writer
                .send(Interval {
                    start: Duration::from_secs(1_000 + i),
                    length: Duration::from_secs(1),
                    histograms,
                })
                .unwrap();
        }
        drop(to_writer);
        // 1 KiB: every few intervals start a new file.
        write_log(
            &dir,
            1024,
            Duration::from_secs(1_000),
            intervals,
            recycle,
            &snapshot,
        );
        let current = std::fs::read_to_string(dir.join(HISTOGRAM_LOG_FILE)).unwrap();
        let rotated = std::fs::read_to_string(dir.join(HISTOGRAM_LOG_ROTATED_FILE)).unwrap();
        for text in [&current, &rotated] {
            assert!(text.len() < 4096, "bounded: {} bytes", text.len());
            assert!(text.contains("#[BaseTime:"), "each file has its header");
        }
        assert!(rotated.lines().any(|l| l.starts_with("Tag=wait,")));
        assert_eq!(
            lock(&snapshot).paths[LatencyPath::Wait as usize].count,
            20 * 100
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn tags_are_valid_interval_log_tags() {
        for p in LatencyPath::ALL {
            assert!(Tag::new(p.tag()).is_some(), "{}", p.tag());
        }
    }
}
