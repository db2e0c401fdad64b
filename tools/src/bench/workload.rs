//! The workloads, and the loop a worker process runs for one of them.
//!
//! Workers coordinate through a scoreboard: a small MAP_SHARED file of 64-bit
//! atomic words that the parent creates for each run.
//!
//! | word              | meaning                                                  |
//! |-------------------|----------------------------------------------------------|
//! | READY             | workers that have connected and wait for GO              |
//! | GO                | 0 = wait, 1 = start, 2 = abort                           |
//! | STOP              | hand-off: 1 once a worker has finished (the other stops) |
//! | HOLDER            | hand-off: 1 + index of the worker holding the key, 0 = none |
//! | WAITING + w       | hand-off: 1 while worker w is about to wait or waiting   |
//! | RELEASE_NS        | hand-off: CLOCK_MONOTONIC just before the holder released |
//! | VIOLATIONS        | times a worker found another inside the critical section |
//! | KEYS + 2k         | key k: workers inside its critical section right now     |
//! | KEYS + 2k + 1     | key k: grants, incremented non-atomically (load + store)  |
//!
//! Two checks of mutual exclusion come out of it: VIOLATIONS must stay 0, and
//! the per-key counters (a read-modify-write that loses updates when two
//! holders overlap) must add up to the grants the workers counted.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Serializer, V2Serializer};
use serde::{Deserialize, Serialize};

use super::peers::SharedMap;
use super::support::monotonic_ns;
use super::system::{LockKey, SystemEntry, WorkerIdentity};

/// The kind of load; with a process count it makes a [`Workload`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WorkloadKind {
    /// Each process locks its own key: nobody waits.
    Uncontended,
    /// Two processes pass one key back and forth; measured from the holder's
    /// release to the waiter running with the lock.
    Handoff,
    /// Every process locks the same key.
    HotKey,
    /// Keys drawn from a Zipf distribution (s = 0.99) over `keys_total` keys.
    Zipf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workload {
    pub kind: WorkloadKind,
    pub processes: usize,
}

/// Keys in every run (Zipf draws from all of them; the others use a few).
pub const KEYS_TOTAL: u32 = 10_000;
const ZIPF_EXPONENT: f64 = 0.99;

/// The spin a hand-off holder waits after seeing the waiter announce itself,
/// so that the waiter is inside its acquire (asleep, for blocking locks).
const HANDOFF_SETTLE: Duration = Duration::from_micros(50);

impl Workload {
    /// Every workload, in table order.
    pub fn all() -> Vec<Workload> {
        vec![
            // One process: a round trip with nothing queued before it (the
            // broker serves every client on one thread, an echo server one
            // thread per connection, so two processes also measure that).
            Workload {
                kind: WorkloadKind::Uncontended,
                processes: 1,
            },
            Workload {
                kind: WorkloadKind::Uncontended,
                processes: 2,
            },
            Workload {
                kind: WorkloadKind::Handoff,
                processes: 2,
            },
            Workload {
                kind: WorkloadKind::HotKey,
                processes: 2,
            },
            Workload {
                kind: WorkloadKind::HotKey,
                processes: 4,
            },
            Workload {
                kind: WorkloadKind::HotKey,
                processes: 8,
            },
            Workload {
                kind: WorkloadKind::Zipf,
                processes: 4,
            },
        ]
    }

    /// `uncontended-2p`, `hot-8p`, ...: used in tables, files and `--workloads`.
    pub fn name(&self) -> String {
        let kind = match self.kind {
            WorkloadKind::Uncontended => "uncontended",
            WorkloadKind::Handoff => "handoff",
            WorkloadKind::HotKey => "hot",
            WorkloadKind::Zipf => "zipf",
        };
        format!("{kind}-{}p", self.processes)
    }

    /// What the latency histogram of this workload measures.
    pub fn measures(&self) -> &'static str {
        match self.kind {
            WorkloadKind::Uncontended => "acquire+release",
            WorkloadKind::Handoff => "release -> next holder running",
            WorkloadKind::HotKey | WorkloadKind::Zipf => "acquire (call to holding)",
        }
    }

    /// Whether two processes may lock the same key in this workload.
    pub fn shares_keys(&self) -> bool {
        !matches!(self.kind, WorkloadKind::Uncontended)
    }
}

/// Everything a worker process needs, written by the parent as JSON.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WorkerSpec {
    pub system: String,
    pub run_config: String,
    pub workload: Workload,
    pub worker_index: usize,
    pub scoreboard_path: PathBuf,
    pub report_path: PathBuf,
    pub duration_ms: u64,
    pub operations_max: u64,
    pub seed: u64,
    /// Whether to check mutual exclusion (false for baselines that are not locks).
    pub check_exclusion: bool,
}

/// What a worker reports back, as JSON in `report_path`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WorkerReport {
    pub grants: u64,
    /// Nanoseconds; HdrHistogram V2 serialization.
    pub histogram_v2: Vec<u8>,
    pub elapsed_ns: u64,
    /// Uncontended only: ns per acquire+release over a loop with no clock
    /// read per operation, the median chunk (see [`run_batch`]).
    #[serde(default)]
    pub batch_ns_per_op: Option<f64>,
}

mod word {
    pub const READY: usize = 0;
    pub const GO: usize = 1;
    pub const STOP: usize = 2;
    pub const HOLDER: usize = 3;
    pub const WAITING: usize = 4; // two words: 4 and 5
    pub const RELEASE_NS: usize = 6;
    pub const VIOLATIONS: usize = 7;
    pub const KEYS: usize = 16;
}

pub const GO_WAIT: u64 = 0;
pub const GO_START: u64 = 1;
pub const GO_ABORT: u64 = 2;

/// The shared words of one run (see the module docs for the layout).
pub struct Scoreboard {
    map: SharedMap,
}

impl Scoreboard {
    fn bytes(keys_total: u32) -> usize {
        (word::KEYS + 2 * keys_total as usize) * std::mem::size_of::<u64>()
    }

    pub fn create(path: &Path, keys_total: u32) -> anyhow::Result<Scoreboard> {
        Ok(Scoreboard {
            map: SharedMap::create(path, Scoreboard::bytes(keys_total))?,
        })
    }

    pub fn open(path: &Path) -> anyhow::Result<Scoreboard> {
        let map = SharedMap::open(path).context("scoreboard")?;
        anyhow::ensure!(
            map.len() >= Scoreboard::bytes(KEYS_TOTAL),
            "scoreboard {} holds {} bytes, expected {}",
            path.display(),
            map.len(),
            Scoreboard::bytes(KEYS_TOTAL)
        );
        Ok(Scoreboard { map })
    }

    pub fn word(&self, index: usize) -> &AtomicU64 {
        &self.map.words_u64()[index]
    }

    /// The number of workers inside key `k`'s critical section.
    fn inside(&self, key: u32) -> &AtomicU64 {
        self.word(word::KEYS + 2 * key as usize)
    }

    fn counter(&self, key: u32) -> &AtomicU64 {
        self.word(word::KEYS + 2 * key as usize + 1)
    }

    pub fn ready(&self) -> u64 {
        self.word(word::READY).load(Ordering::Acquire)
    }

    pub fn set_go(&self, value: u64) {
        // SYNC POINT: pairs with the Acquire load in `wait_for_go`.
        self.word(word::GO).store(value, Ordering::Release);
    }

    pub fn violations(&self) -> u64 {
        self.word(word::VIOLATIONS).load(Ordering::Acquire)
    }

    /// The sum of the per-key grant counters.
    pub fn counted_grants(&self, keys_total: u32) -> u64 {
        (0..keys_total)
            .map(|key| self.counter(key).load(Ordering::Acquire))
            .sum()
    }

    /// The critical section of every workload: enter, count, leave.
    fn critical_section(&self, key: u32, check: bool) {
        if !check {
            return;
        }
        if self.inside(key).fetch_add(1, Ordering::AcqRel) != 0 {
            self.word(word::VIOLATIONS).fetch_add(1, Ordering::AcqRel);
        }
        // Deliberately not atomic as a whole: overlapping holders lose counts.
        let counter = self.counter(key);
        let value = counter.load(Ordering::Relaxed);
        counter.store(value + 1, Ordering::Relaxed);
        self.inside(key).fetch_sub(1, Ordering::AcqRel);
    }
}

/// A small, fast pseudo-random generator (xorshift64*): the workloads need
/// reproducible draws, not cryptography.
struct Random(u64);

impl Random {
    fn new(seed: u64) -> Random {
        Random(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in [0, 1).
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Zipf over `0..n` by inverse transform on a precomputed CDF.
pub struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    pub fn new(n: u32, exponent: f64) -> Zipf {
        let mut cdf = Vec::with_capacity(n as usize);
        let mut total = 0.0;
        for rank in 1..=n {
            total += 1.0 / f64::from(rank).powf(exponent);
            cdf.push(total);
        }
        for value in &mut cdf {
            *value /= total;
        }
        Zipf { cdf }
    }

    fn sample(&self, random: &mut Random) -> u32 {
        let u = random.next_f64();
        let index = self.cdf.partition_point(|&value| value < u);
        index.min(self.cdf.len() - 1) as u32
    }
}

/// The key names every system sees: `bench/k<index>`.
pub fn key_names(keys_total: u32) -> Vec<String> {
    (0..keys_total)
        .map(|index| format!("bench/k{index}"))
        .collect()
}

fn new_histogram() -> Histogram<u64> {
    // 1 ns to 60 s, 3 significant digits; auto-resize keeps outliers.
    let mut histogram =
        Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("valid bounds");
    histogram.auto(true);
    histogram
}

/// The entry point of a worker process.
pub fn worker_main(spec_path: &Path, entries: &[SystemEntry]) -> anyhow::Result<()> {
    let spec: WorkerSpec = serde_json::from_slice(
        &std::fs::read(spec_path).with_context(|| format!("reading {}", spec_path.display()))?,
    )
    .context("worker spec")?;
    let entry = entries
        .iter()
        .find(|entry| entry.name == spec.system)
        .with_context(|| format!("worker: no system named {:?}", spec.system))?;
    let board = Scoreboard::open(&spec.scoreboard_path)?;
    let identity = WorkerIdentity {
        index: spec.worker_index,
        processes: spec.workload.processes,
        keys_total: KEYS_TOTAL,
    };
    let mut session = (entry.connect)(&spec.run_config, &identity)
        .with_context(|| format!("{}: opening a session", spec.system))?;
    let names = key_names(KEYS_TOTAL);

    board.word(word::READY).fetch_add(1, Ordering::AcqRel);
    if !wait_for_go(&board)? {
        return Ok(());
    }

    let mut histogram = new_histogram();
    let started = Instant::now();
    let duration = Duration::from_millis(spec.duration_ms);
    let grants = match spec.workload.kind {
        WorkloadKind::Handoff => run_handoff(
            &spec,
            &board,
            session.as_mut(),
            &names,
            &mut histogram,
            started,
        )?,
        _ => run_loop(
            &spec,
            &board,
            session.as_mut(),
            &names,
            &mut histogram,
            started,
            duration,
        )?,
    };
    let elapsed_ns = started.elapsed().as_nanos() as u64;
    let batch_ns_per_op = match spec.workload.kind {
        WorkloadKind::Uncontended => Some(run_batch(&spec, session.as_mut(), &names, duration)?),
        _ => None,
    };
    drop(session);

    let mut histogram_v2 = Vec::new();
    V2Serializer::new()
        .serialize(&histogram, &mut histogram_v2)
        .map_err(|error| anyhow::anyhow!("serializing the histogram: {error:?}"))?;
    let report = WorkerReport {
        grants,
        histogram_v2,
        elapsed_ns,
        batch_ns_per_op,
    };
    let partial = spec.report_path.with_extension("partial");
    std::fs::write(&partial, serde_json::to_vec(&report)?)
        .with_context(|| format!("writing {}", partial.display()))?;
    std::fs::rename(&partial, &spec.report_path)?;
    Ok(())
}

/// Waits for the parent's GO; false if it said abort.
fn wait_for_go(board: &Scoreboard) -> anyhow::Result<bool> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        // SYNC POINT: pairs with the Release store in `Scoreboard::set_go`.
        match board.word(word::GO).load(Ordering::Acquire) {
            GO_START => return Ok(true),
            GO_ABORT => return Ok(false),
            GO_WAIT => {}
            other => anyhow::bail!("unknown GO word {other} in the scoreboard"),
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "no GO from the parent within 60 s"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Uncontended, hot key and Zipf: lock, count, unlock, as fast as possible,
/// until the time or the operation budget runs out.
fn run_loop(
    spec: &WorkerSpec,
    board: &Scoreboard,
    session: &mut dyn super::system::LockSession,
    names: &[String],
    histogram: &mut Histogram<u64>,
    started: Instant,
    duration: Duration,
) -> anyhow::Result<u64> {
    let zipf =
        (spec.workload.kind == WorkloadKind::Zipf).then(|| Zipf::new(KEYS_TOTAL, ZIPF_EXPONENT));
    let mut random = Random::new(spec.seed);
    let check = spec.check_exclusion;
    let mut grants = 0u64;
    while grants < spec.operations_max {
        let key = match spec.workload.kind {
            WorkloadKind::Uncontended => spec.worker_index as u32,
            WorkloadKind::HotKey | WorkloadKind::Handoff => 0,
            WorkloadKind::Zipf => zipf.as_ref().expect("zipf").sample(&mut random),
        };
        let lock_key = LockKey {
            index: key,
            name: &names[key as usize],
        };
        let mut holding = None;
        let before = Instant::now();
        session.with_lock(lock_key, &mut || {
            holding = Some(Instant::now());
            board.critical_section(key, check);
        })?;
        let after = Instant::now();
        let holding = holding.context("with_lock returned without running the critical section")?;
        let nanoseconds = match spec.workload.kind {
            WorkloadKind::Uncontended => after - before,
            _ => holding - before,
        }
        .as_nanos() as u64;
        histogram.saturating_record(nanoseconds.max(1));
        grants += 1;
        if after - started >= duration {
            break;
        }
    }
    Ok(grants)
}

/// Operations between two clock reads in [`run_batch`]: one `Instant::now()`
/// (about 20-60 ns) spread over them costs well under 1 ns per operation.
pub const BATCH_CHUNK: u64 = 1024;

/// Uncontended, after the timed loop: the worker's own key locked and
/// unlocked in chunks of [`BATCH_CHUNK`] with one clock read per chunk, for
/// `duration` (or the operation budget). Returns ns per acquire+release of
/// the median chunk: on a shared machine a chunk in which the worker was
/// descheduled measures the scheduler, not the lock, and the median leaves
/// those out as the histogram's p50 does. The critical section is a local
/// counter: mutual exclusion was checked by the timed loop, and the
/// scoreboard's atomics (about 20 ns) would add the same constant to every
/// system and hide their ratio.
fn run_batch(
    spec: &WorkerSpec,
    session: &mut dyn super::system::LockSession,
    names: &[String],
    duration: Duration,
) -> anyhow::Result<f64> {
    let key = spec.worker_index as u32;
    let lock_key = LockKey {
        index: key,
        name: &names[key as usize],
    };
    let mut inside = 0u64;
    let mut operations = 0u64;
    let mut chunks_ns = Vec::new();
    let started = Instant::now();
    let mut chunk_started = started;
    loop {
        for _ in 0..BATCH_CHUNK {
            session.with_lock(lock_key, &mut || {
                inside = std::hint::black_box(inside + 1);
            })?;
        }
        operations += BATCH_CHUNK;
        let now = Instant::now();
        chunks_ns.push((now - chunk_started).as_nanos() as u64);
        chunk_started = now;
        if now - started >= duration || operations >= spec.operations_max {
            break;
        }
    }
    anyhow::ensure!(
        inside == operations,
        "with_lock ran the critical section {inside} times in {operations} operations"
    );
    chunks_ns.sort_unstable();
    Ok(chunks_ns[chunks_ns.len() / 2] as f64 / BATCH_CHUNK as f64)
}

/// Spins (yielding) until `done()` or the deadline; false on timeout.
fn spin_until(deadline: Instant, mut done: impl FnMut() -> bool) -> bool {
    let mut spins = 0u32;
    while !done() {
        if Instant::now() >= deadline {
            return false;
        }
        spins += 1;
        if spins > 64 {
            std::thread::yield_now();
        }
    }
    true
}

/// Two workers pass key 0 back and forth. Each hand-off: the holder waits
/// until the other worker announces it is about to wait (WAITING) and a
/// little longer (HANDOFF_SETTLE) so the other is inside its acquire, stamps
/// RELEASE_NS and releases; the other, once holding, records now - RELEASE_NS.
fn run_handoff(
    spec: &WorkerSpec,
    board: &Scoreboard,
    session: &mut dyn super::system::LockSession,
    names: &[String],
    histogram: &mut Histogram<u64>,
    started: Instant,
) -> anyhow::Result<u64> {
    anyhow::ensure!(
        spec.workload.processes == 2,
        "hand-off needs exactly 2 processes"
    );
    let me = spec.worker_index;
    let other = 1 - me;
    let duration = Duration::from_millis(spec.duration_ms);
    // Waits in the protocol end at this deadline at the latest.
    let deadline = started + duration + Duration::from_secs(10);
    let key = LockKey {
        index: 0,
        name: &names[0],
    };
    let stop = board.word(word::STOP);
    let holder = board.word(word::HOLDER);
    let waiting_me = board.word(word::WAITING + me);
    let waiting_other = board.word(word::WAITING + other);
    let release_ns = board.word(word::RELEASE_NS);
    let mut grants = 0u64;
    let mut first = true;
    loop {
        if !(first && me == 0) {
            // Wait until the other worker holds the key, then queue behind it.
            let other_holds = spin_until(deadline, || {
                stop.load(Ordering::Acquire) != 0
                    || holder.load(Ordering::Acquire) == other as u64 + 1
            });
            if !other_holds || stop.load(Ordering::Acquire) != 0 {
                break;
            }
            waiting_me.store(1, Ordering::Release);
        }
        first = false;
        let mut failure = None;
        session.with_lock(key, &mut || {
            let now = monotonic_ns();
            // Consumed, so that a release that was not stamped (the other
            // worker stopping) is never measured against an old stamp.
            let released = release_ns.swap(0, Ordering::AcqRel);
            waiting_me.store(0, Ordering::Release);
            holder.store(me as u64 + 1, Ordering::Release);
            board.critical_section(0, spec.check_exclusion);
            if released != 0 {
                histogram.saturating_record(now.saturating_sub(released).max(1));
            }
            grants += 1;
            let finished = started.elapsed() >= duration || grants >= spec.operations_max;
            if finished || stop.load(Ordering::Acquire) != 0 {
                stop.store(1, Ordering::Release);
                return;
            }
            let other_waits = spin_until(deadline, || {
                stop.load(Ordering::Acquire) != 0 || waiting_other.load(Ordering::Acquire) != 0
            });
            if !other_waits {
                failure = Some("the other worker never queued for the key");
                stop.store(1, Ordering::Release);
                return;
            }
            let settle_until = Instant::now() + HANDOFF_SETTLE;
            while Instant::now() < settle_until {
                std::hint::spin_loop();
            }
            release_ns.store(monotonic_ns(), Ordering::Release);
        })?;
        if let Some(failure) = failure {
            anyhow::bail!("hand-off: {failure}");
        }
        if stop.load(Ordering::Acquire) != 0 {
            break;
        }
    }
    Ok(grants)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_draws_low_ranks_most_often_and_stays_in_range() {
        let zipf = Zipf::new(KEYS_TOTAL, ZIPF_EXPONENT);
        let mut random = Random::new(7);
        let mut first = 0;
        for _ in 0..10_000 {
            let key = zipf.sample(&mut random);
            assert!(key < KEYS_TOTAL);
            if key == 0 {
                first += 1;
            }
        }
        // P(rank 1) is about 1/H(10000, 0.99), roughly 10 %.
        assert!(first > 500, "rank 1 drawn {first} times in 10,000");
        assert!(first < 2_000, "rank 1 drawn {first} times in 10,000");
    }

    #[test]
    fn workload_names_are_distinct() {
        let names: std::collections::HashSet<_> =
            Workload::all().iter().map(Workload::name).collect();
        assert_eq!(names.len(), Workload::all().len());
    }
}
