//! `forelock live-replay TRACE`: a lock trace replayed in real time against a
//! real `forelockd`, with real client processes, once per allocator policy,
//! side by side in one run.
//!
//! For each mode (`--modes`, default `forecast,keep-alive,none`) it starts a
//! fresh `forelockd` on a private runtime directory (plus a
//! `forelock-predictor` for `forecast`), then one worker process per trace
//! client (the trace's `client` column). Workers are this program run again
//! with the same arguments and [`WORKER_ENV`] naming their spec file.
//!
//! Each worker replays its rows at their `ts_us` (divided by `--speed`): it
//! sleeps until a row is due, or goes at once if it is late (counted), takes
//! the row's key in the row's mode (`X` exclusive, `S` shared) with a timeout
//! (`--timeout-ms`), and keeps it for `hold_us` (divided by `--speed`, capped
//! at `--hold-cap-ms`, default 50 ms, so that a replay stays short and a
//! 90-second TPC-C hold does not stall its session) while it goes on with its
//! next rows, as the traced session did: a worker holds several keys at once.
//! A worker holds at most 56 keys at once (the client allows 64 broker
//! grants): past that, the hold ending first is cut short (`cut_early`).
//! A row reached more than `--max-late-ms` (default 1 s) after it was due is
//! skipped (`skipped`), so a worker stalled by waits rejoins the trace's
//! clock. A row whose key the worker still holds (an S-to-X upgrade in the trace, or
//! a hold stretched past the next request by lateness) releases the old grant
//! first and is counted as `rerequested`.
//!
//! Measured per row: the acquire latency (the `lock*` call, into HdrHistograms:
//! all rows, X rows, S rows), whether the grant took the fast path
//! (`LockGuard::fast_path`), and how late the row started. Keys are named
//! `r/<16 hex digits of the trace key's hash>` (the trace reader keeps hashes).
//!
//! Bounds: acquires time out; a worker stops replaying 10 s after its last row
//! was due (the rest count as `skipped`); the parent kills every worker, the
//! predictor and the broker when it returns, fails or panics (Drop guards,
//! and PR_SET_PDEATHSIG if it is killed).

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::bench::support::{ChildGuard, TempDir, die_with_parent, start_forelockd};
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use serde::{Deserialize, Serialize};

/// Set in a worker process: the path of its spec file.
pub const WORKER_ENV: &str = "FORELOCK_LIVE_REPLAY_WORKER";

/// The allocator policies a replay can compare.
const POLICIES: [&str; 3] = ["forecast", "keep-alive", "none"];

/// Lock slots of every replay broker (the default 16,384 is too few for a
/// busy TPC-C second plus the forecaster's preparations).
const SLOTS: u32 = 65_536;

/// A worker gives up replaying this long after its last row was due.
const WORKER_GRACE: Duration = Duration::from_secs(10);

/// Locks a worker holds at once at most: the client takes at most 64
/// broker-granted locks (`WAIT_CELLS`); past this the hold ending first is
/// cut short (counted as `cut_early`).
const HELD_MAX: usize = 56;

/// A row that starts later than this counts as late.
const LATE_NS: u64 = 1_000_000;

/// Options of `forelock live-replay`.
#[derive(clap::Args, Debug, Clone)]
pub struct LiveReplayArgs {
    /// The trace (CSV, plain or gzip; the format of shared/traces/README.md).
    pub trace: PathBuf,

    /// Replay only the trace's first N seconds (0: the whole trace).
    #[arg(long, default_value_t = 20.0, value_name = "N")]
    pub seconds: f64,

    /// Time scale: 2.0 replays twice as fast (gaps and holds halved).
    #[arg(long, default_value_t = 1.0, value_name = "X")]
    pub speed: f64,

    /// Print the results as JSON on stdout instead of the table.
    #[arg(long)]
    pub json: bool,

    /// Allocator policies to compare, in this order (comma separated):
    /// forecast (prediction on, with a forelock-predictor), keep-alive, none.
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "POLICIES",
        default_value = "forecast,keep-alive,none"
    )]
    pub modes: Vec<String>,

    /// Longest hold replayed, milliseconds (longer trace holds are cut to it).
    #[arg(long, default_value_t = 50, value_name = "MS")]
    pub hold_cap_ms: u64,

    /// Acquire timeout, milliseconds: a row not granted by then counts as a
    /// timeout (replayed sessions can deadlock where the traced ones did not).
    #[arg(long, default_value_t = 50, value_name = "MS")]
    pub timeout_ms: u64,

    /// A row that a worker reaches later than this, milliseconds, is skipped
    /// (counted), so that a worker stalled by waits catches up with the
    /// trace's clock instead of replaying a compressed backlog.
    #[arg(long, default_value_t = 1000, value_name = "MS")]
    pub max_late_ms: u64,
}

/// One row as a worker replays it.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
struct Row {
    /// Nanoseconds after the common start, already scaled by `--speed`.
    due_ns: u64,
    key_hash: u64,
    shared: bool,
    /// Already scaled and capped.
    hold_ns: u64,
}

/// Everything a worker needs, written by the parent as JSON.
#[derive(Debug, Serialize, Deserialize)]
struct WorkerSpec {
    runtime_dir: PathBuf,
    rows: Vec<Row>,
    timeout_ms: u64,
    max_late_ms: u64,
    report_path: PathBuf,
}

/// What a worker reports, as JSON in its `report_path`.
#[derive(Debug, Default, Serialize, Deserialize)]
struct WorkerReport {
    rows: u64,
    granted_exclusive: u64,
    granted_shared: u64,
    fast_exclusive: u64,
    fast_shared: u64,
    timeouts: u64,
    errors: u64,
    release_errors: u64,
    skipped: u64,
    skipped_late: u64,
    cut_early: u64,
    rerequested: u64,
    late: u64,
    first_error: Option<String>,
    /// CLOCK_MONOTONIC when its last acquire returned.
    last_acquire_ns: u64,
    /// HdrHistogram V2 serializations, nanoseconds.
    latency_all: Vec<u8>,
    latency_exclusive: Vec<u8>,
    latency_shared: Vec<u8>,
    lateness: Vec<u8>,
}

/// The figures of one mode, as printed.
#[derive(Debug, Serialize)]
pub struct ModeResult {
    pub mode: String,
    pub prediction: bool,
    pub rows: u64,
    pub granted: u64,
    pub granted_exclusive: u64,
    pub granted_shared: u64,
    pub fast_path: u64,
    /// Fast-path grants over all grants.
    pub fast_path_share: f64,
    /// Fast-path grants over exclusive grants (shared locks always go
    /// through the broker, so this is where prediction can show).
    pub fast_path_share_exclusive: f64,
    pub timeouts: u64,
    pub errors: u64,
    pub release_errors: u64,
    /// Rows not replayed: more than `--max-late-ms` late, or past the
    /// worker's time limit.
    pub skipped: u64,
    /// Holds released before their time because the worker held `HELD_MAX`.
    pub cut_early: u64,
    pub rerequested: u64,
    pub late_rows: u64,
    pub lateness_p99_us: f64,
    pub p50_ns: u64,
    pub p99_ns: u64,
    pub p999_ns: u64,
    pub max_ns: u64,
    pub mean_ns: f64,
    pub exclusive_p50_ns: u64,
    pub exclusive_p99_ns: u64,
    pub shared_p50_ns: u64,
    pub shared_p99_ns: u64,
    /// Grants per second from the start to the last acquire.
    pub throughput_per_s: f64,
    pub elapsed_s: f64,
    pub first_error: Option<String>,
}

/// The whole run, as printed with `--json`.
#[derive(Debug, Serialize)]
pub struct LiveReplayReport {
    pub trace: String,
    pub seconds: f64,
    pub speed: f64,
    pub hold_cap_ms: u64,
    pub timeout_ms: u64,
    pub rows: u64,
    pub clients: usize,
    pub keys_distinct: usize,
    /// Rows per second the trace slice asks for (after `--speed`).
    pub offered_per_s: f64,
    pub cores: usize,
    pub modes: Vec<ModeResult>,
}

/// Runs `forelock live-replay`, or a replay worker if [`WORKER_ENV`] is set.
pub fn run(args: LiveReplayArgs) -> anyhow::Result<()> {
    if let Some(spec) = std::env::var_os(WORKER_ENV) {
        return worker_main(Path::new(&spec));
    }
    let report = replay(&args)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", table(&report));
    }
    Ok(())
}

fn replay(args: &LiveReplayArgs) -> anyhow::Result<LiveReplayReport> {
    anyhow::ensure!(
        args.speed.is_finite() && args.speed > 0.0,
        "--speed must be a positive number, not {}",
        args.speed
    );
    anyhow::ensure!(
        args.seconds.is_finite() && args.seconds >= 0.0,
        "--seconds must be 0 (the whole trace) or positive, not {}",
        args.seconds
    );
    for mode in &args.modes {
        anyhow::ensure!(
            POLICIES.contains(&mode.as_str()),
            "--modes: unknown policy {mode:?}; known: {}",
            POLICIES.join(", ")
        );
    }
    anyhow::ensure!(!args.modes.is_empty(), "--modes: name at least one policy");
    let binaries = Binaries::find(args.modes.iter().any(|mode| mode == "forecast"))?;

    let trace = forelock_predictor::trace::read_trace_file(&args.trace)
        .with_context(|| format!("reading {}", args.trace.display()))?;
    let first_ts = trace.events.first().map_or(0, |event| event.ts_us);
    let limit_us = if args.seconds == 0.0 {
        u64::MAX
    } else {
        (args.seconds * 1e6) as u64
    };
    let hold_cap_ns = args.hold_cap_ms.saturating_mul(1_000_000);
    let mut per_client: Vec<Vec<Row>> = Vec::new();
    let mut keys = std::collections::HashSet::new();
    let mut last_due_ns = 0u64;
    for event in &trace.events {
        let offset_us = event.ts_us - first_ts;
        if offset_us >= limit_us {
            break;
        }
        let client = event.client as usize;
        anyhow::ensure!(
            client < 250,
            "the trace has client {client}: a replay runs one process per client, and a \
             broker serves at most 256"
        );
        if per_client.len() <= client {
            per_client.resize_with(client + 1, Vec::new);
        }
        let due_ns = (offset_us as f64 * 1e3 / args.speed) as u64;
        let hold_ns = ((event.hold_us as f64 * 1e3 / args.speed) as u64).min(hold_cap_ns);
        last_due_ns = last_due_ns.max(due_ns);
        keys.insert(event.key_hash);
        per_client[client].push(Row {
            due_ns,
            key_hash: event.key_hash,
            shared: event.mode == forelock_predictor::trace::Mode::Shared,
            hold_ns: hold_ns.max(1),
        });
    }
    let rows: u64 = per_client.iter().map(|rows| rows.len() as u64).sum();
    anyhow::ensure!(rows > 0, "{}: no rows to replay", args.trace.display());
    let span_s = (last_due_ns as f64 / 1e9).max(1e-3);

    let mut modes = Vec::new();
    for mode in &args.modes {
        eprintln!(
            "live-replay: {mode}: {rows} rows from {} clients over {span_s:.1} s",
            per_client.iter().filter(|rows| !rows.is_empty()).count()
        );
        let result = run_mode(mode, &binaries, &per_client, args, last_due_ns)
            .with_context(|| format!("replaying with policy {mode:?}"))?;
        modes.push(result);
    }
    Ok(LiveReplayReport {
        trace: args.trace.display().to_string(),
        seconds: span_s,
        speed: args.speed,
        hold_cap_ms: args.hold_cap_ms,
        timeout_ms: args.timeout_ms,
        rows,
        clients: per_client.iter().filter(|rows| !rows.is_empty()).count(),
        keys_distinct: keys.len(),
        offered_per_s: rows as f64 / span_s,
        cores: std::thread::available_parallelism().map_or(1, usize::from),
        modes,
    })
}

/// `forelockd` and `forelock-predictor`, beside this executable.
struct Binaries {
    broker: PathBuf,
    predictor: PathBuf,
}

impl Binaries {
    fn find(need_predictor: bool) -> anyhow::Result<Binaries> {
        let exe = std::env::current_exe().context("finding this program")?;
        let broker = exe.with_file_name("forelockd");
        let predictor = exe.with_file_name("forelock-predictor");
        let mut missing = Vec::new();
        if !broker.is_file() {
            missing.push(broker.display().to_string());
        }
        if need_predictor && !predictor.is_file() {
            missing.push(predictor.display().to_string());
        }
        if !missing.is_empty() {
            bail!(
                "live-replay needs {} beside {}: build them with \
                 `cargo build --release -p forelock-tools -p forelockd -p forelock-predictor` \
                 (drop --release for a debug build, and run the forelock of the same profile)",
                missing.join(" and "),
                exe.display()
            );
        }
        Ok(Binaries { broker, predictor })
    }
}

/// Runs the replay once with one allocator policy.
fn run_mode(
    policy: &str,
    binaries: &Binaries,
    per_client: &[Vec<Row>],
    args: &LiveReplayArgs,
    last_due_ns: u64,
) -> anyhow::Result<ModeResult> {
    // Drop order is the reverse of creation: workers, predictor, broker, dir.
    let dir = TempDir::new_in_memory(&format!("live-replay-{policy}"))?;
    let config = format!("[allocator]\npolicy = \"{policy}\"\n\n[table]\nslots = {SLOTS}\n");
    let (broker, runtime_dir) = start_forelockd(&binaries.broker, dir.path(), &config)?;

    let predictor_log = dir.path().join("forelock-predictor.log");
    let mut predictor = if policy == "forecast" {
        let mut command = Command::new(&binaries.predictor);
        command
            .arg("--runtime-dir")
            .arg(&runtime_dir)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(&predictor_log)?));
        Some(ChildGuard::new(
            die_with_parent(&mut command)
                .spawn()
                .with_context(|| format!("starting {}", binaries.predictor.display()))?,
        ))
    } else {
        None
    };

    // Workers: write specs, start, wait until each has connected.
    let program = std::env::current_exe().context("finding this program to start workers")?;
    let arguments: Vec<OsString> = std::env::args_os().skip(1).collect();
    let mut workers: Vec<(ChildGuard, ChildStdin, PathBuf, PathBuf)> = Vec::new();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<(usize, std::io::Result<String>)>();
    for (client, rows) in per_client.iter().enumerate() {
        if rows.is_empty() {
            continue;
        }
        let index = workers.len();
        let spec = WorkerSpec {
            runtime_dir: runtime_dir.clone(),
            rows: rows.clone(),
            timeout_ms: args.timeout_ms,
            max_late_ms: args.max_late_ms,
            report_path: dir.path().join(format!("report-{client}.json")),
        };
        let spec_path = dir.path().join(format!("spec-{client}.json"));
        std::fs::write(&spec_path, serde_json::to_vec(&spec)?)?;
        let log_path = dir.path().join(format!("worker-{client}.log"));
        let mut command = Command::new(&program);
        command
            .args(&arguments)
            .env(WORKER_ENV, &spec_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(std::fs::File::create(&log_path)?));
        let mut child = die_with_parent(&mut command)
            .spawn()
            .with_context(|| format!("starting a worker: {}", program.display()))?;
        let stdin = child.stdin.take().context("worker stdin")?;
        let stdout = child.stdout.take().context("worker stdout")?;
        let worker = ChildGuard::new(child);
        let tx = ready_tx.clone();
        std::thread::spawn(move || {
            let mut line = String::new();
            let result = BufReader::new(stdout).read_line(&mut line).map(|_| line);
            let _ = tx.send((index, result));
        });
        workers.push((worker, stdin, spec.report_path, log_path));
    }
    drop(ready_tx);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut ready = 0;
    while ready < workers.len() {
        let wait = deadline.saturating_duration_since(Instant::now());
        let (index, result) = ready_rx
            .recv_timeout(wait)
            .context("workers did not connect to the broker within 60 s")?;
        match result {
            Ok(line) if line.trim() == "ready" => ready += 1,
            other => bail!(
                "worker {index} did not start ({other:?}): {}",
                tail(&std::fs::read_to_string(&workers[index].3).unwrap_or_default())
            ),
        }
    }
    if let Some(predictor) = predictor.as_mut() {
        anyhow::ensure!(
            !exited(predictor),
            "forelock-predictor exited: {}",
            tail(&std::fs::read_to_string(&predictor_log).unwrap_or_default())
        );
    }

    // Go: one common start on CLOCK_MONOTONIC, shared by every process.
    let start_ns = shm_layout::monotonic_ns() + 100_000_000;
    for (_, stdin, _, _) in &mut workers {
        writeln!(stdin, "{start_ns}").context("starting a worker")?;
        stdin.flush()?;
    }
    let budget = Duration::from_nanos(last_due_ns)
        + Duration::from_millis(args.hold_cap_ms)
        + WORKER_GRACE
        + Duration::from_secs(30);
    let deadline = Instant::now() + budget;
    for (worker, _, _, log) in &mut workers {
        let status = loop {
            if let Some(status) = worker.try_wait()? {
                break status;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "workers still running {} s after the replay should have ended; killed",
                budget.as_secs()
            );
            std::thread::sleep(Duration::from_millis(5));
        };
        anyhow::ensure!(
            status.success(),
            "a worker failed ({status}): {}",
            tail(&std::fs::read_to_string(&*log).unwrap_or_default())
        );
    }
    let predictor_alive = predictor.as_mut().map(|predictor| !exited(predictor));
    if predictor_alive == Some(false) {
        eprintln!(
            "live-replay: warning: forelock-predictor exited during the replay: {}",
            tail(&std::fs::read_to_string(&predictor_log).unwrap_or_default())
        );
    }

    let mut all = new_histogram();
    let mut exclusive = new_histogram();
    let mut shared = new_histogram();
    let mut lateness = new_histogram();
    let mut total = WorkerReport::default();
    for (_, _, report_path, _) in &workers {
        let report: WorkerReport = serde_json::from_slice(
            &std::fs::read(report_path)
                .with_context(|| format!("reading {}", report_path.display()))?,
        )?;
        all.add(decode(&report.latency_all)?)?;
        exclusive.add(decode(&report.latency_exclusive)?)?;
        shared.add(decode(&report.latency_shared)?)?;
        lateness.add(decode(&report.lateness)?)?;
        total.rows += report.rows;
        total.granted_exclusive += report.granted_exclusive;
        total.granted_shared += report.granted_shared;
        total.fast_exclusive += report.fast_exclusive;
        total.fast_shared += report.fast_shared;
        total.timeouts += report.timeouts;
        total.errors += report.errors;
        total.release_errors += report.release_errors;
        total.skipped += report.skipped + report.skipped_late;
        total.cut_early += report.cut_early;
        total.rerequested += report.rerequested;
        total.late += report.late;
        total.last_acquire_ns = total.last_acquire_ns.max(report.last_acquire_ns);
        if total.first_error.is_none() {
            total.first_error = report.first_error;
        }
    }
    let granted = total.granted_exclusive + total.granted_shared;
    let fast = total.fast_exclusive + total.fast_shared;
    let elapsed_s = (total.last_acquire_ns.saturating_sub(start_ns) as f64 / 1e9).max(1e-9);
    let share = |part: u64, whole: u64| {
        if whole == 0 {
            0.0
        } else {
            part as f64 / whole as f64
        }
    };
    let quantile = |histogram: &Histogram<u64>, q: f64| {
        if histogram.is_empty() {
            0
        } else {
            histogram.value_at_quantile(q)
        }
    };
    drop(workers);
    drop(predictor);
    drop(broker);
    drop(dir);
    Ok(ModeResult {
        mode: policy.to_string(),
        prediction: policy == "forecast",
        rows: total.rows,
        granted,
        granted_exclusive: total.granted_exclusive,
        granted_shared: total.granted_shared,
        fast_path: fast,
        fast_path_share: share(fast, granted),
        fast_path_share_exclusive: share(total.fast_exclusive, total.granted_exclusive),
        timeouts: total.timeouts,
        errors: total.errors,
        release_errors: total.release_errors,
        skipped: total.skipped,
        cut_early: total.cut_early,
        rerequested: total.rerequested,
        late_rows: total.late,
        lateness_p99_us: quantile(&lateness, 0.99) as f64 / 1e3,
        p50_ns: quantile(&all, 0.50),
        p99_ns: quantile(&all, 0.99),
        p999_ns: quantile(&all, 0.999),
        max_ns: all.max(),
        mean_ns: all.mean(),
        exclusive_p50_ns: quantile(&exclusive, 0.50),
        exclusive_p99_ns: quantile(&exclusive, 0.99),
        shared_p50_ns: quantile(&shared, 0.50),
        shared_p99_ns: quantile(&shared, 0.99),
        throughput_per_s: granted as f64 / elapsed_s,
        elapsed_s,
        first_error: total.first_error,
    })
}

fn new_histogram() -> Histogram<u64> {
    // 1 ns to 60 s, 3 significant digits; auto-resize keeps outliers.
    let mut histogram =
        Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("valid bounds");
    histogram.auto(true);
    histogram
}

fn encode(histogram: &Histogram<u64>) -> anyhow::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    V2Serializer::new()
        .serialize(histogram, &mut bytes)
        .map_err(|error| anyhow::anyhow!("serializing a histogram: {error:?}"))?;
    Ok(bytes)
}

fn decode(bytes: &[u8]) -> anyhow::Result<Histogram<u64>> {
    Deserializer::new()
        .deserialize(&mut &bytes[..])
        .map_err(|error| anyhow::anyhow!("a worker's histogram: {error:?}"))
}

/// A lock this worker holds, and when the trace lets it go.
struct Held<'a> {
    key_hash: u64,
    release_ns: u64,
    guard: forelock::LockGuard<'a>,
}

/// Releases the holds whose time is up.
fn release_due(held: &mut Vec<Held<'_>>, now_ns: u64, report: &mut WorkerReport) {
    let mut index = 0;
    while index < held.len() {
        if held[index].release_ns <= now_ns {
            let done = held.swap_remove(index);
            if done.guard.release().is_err() {
                report.release_errors += 1;
            }
        } else {
            index += 1;
        }
    }
}

/// The entry point of a worker process.
fn worker_main(spec_path: &Path) -> anyhow::Result<()> {
    let spec: WorkerSpec = serde_json::from_slice(
        &std::fs::read(spec_path).with_context(|| format!("reading {}", spec_path.display()))?,
    )
    .context("worker spec")?;
    let client = forelock::Client::connect_to(&spec.runtime_dir)
        .with_context(|| format!("connecting to {}", spec.runtime_dir.display()))?;
    let names: Vec<String> = spec
        .rows
        .iter()
        .map(|row| format!("r/{:016x}", row.key_hash))
        .collect();
    println!("ready");
    std::io::stdout().flush()?;
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    let start_ns: u64 = line
        .trim()
        .parse()
        .with_context(|| format!("the start time from the parent: {line:?}"))?;

    let timeout = Duration::from_millis(spec.timeout_ms);
    let give_up_ns =
        start_ns + spec.rows.last().map_or(0, |row| row.due_ns) + WORKER_GRACE.as_nanos() as u64;
    let mut report = WorkerReport {
        rows: spec.rows.len() as u64,
        ..WorkerReport::default()
    };
    let mut all = new_histogram();
    let mut exclusive = new_histogram();
    let mut shared = new_histogram();
    let mut lateness = new_histogram();
    let mut held: Vec<Held<'_>> = Vec::new();
    for (row, name) in spec.rows.iter().zip(&names) {
        let due_ns = start_ns + row.due_ns;
        // Sleep until the row is due, releasing holds as they end.
        let mut now_ns = shm_layout::monotonic_ns();
        loop {
            release_due(&mut held, now_ns, &mut report);
            if now_ns >= due_ns {
                break;
            }
            let next_release = held.iter().map(|h| h.release_ns).min().unwrap_or(u64::MAX);
            std::thread::sleep(Duration::from_nanos(due_ns.min(next_release) - now_ns));
            now_ns = shm_layout::monotonic_ns();
        }
        if now_ns >= give_up_ns {
            report.skipped += 1;
            continue;
        }
        let late_ns = now_ns - due_ns;
        lateness.saturating_record(late_ns.max(1));
        if late_ns > LATE_NS {
            report.late += 1;
        }
        if late_ns > spec.max_late_ms.saturating_mul(1_000_000) {
            report.skipped_late += 1;
            continue;
        }
        if let Some(position) = held.iter().position(|h| h.key_hash == row.key_hash) {
            report.rerequested += 1;
            if held.swap_remove(position).guard.release().is_err() {
                report.release_errors += 1;
            }
        }
        if held.len() >= HELD_MAX
            && let Some(first) = (0..held.len()).min_by_key(|&i| held[i].release_ns)
        {
            report.cut_early += 1;
            if held.swap_remove(first).guard.release().is_err() {
                report.release_errors += 1;
            }
        }
        let before = Instant::now();
        let result = if row.shared {
            client.lock_shared_timeout(name, timeout)
        } else {
            client.lock_timeout(name, timeout)
        };
        let nanoseconds = (before.elapsed().as_nanos() as u64).max(1);
        report.last_acquire_ns = shm_layout::monotonic_ns();
        match result {
            Ok(guard) => {
                all.saturating_record(nanoseconds);
                let fast = guard.fast_path();
                if row.shared {
                    shared.saturating_record(nanoseconds);
                    report.granted_shared += 1;
                    report.fast_shared += u64::from(fast);
                } else {
                    exclusive.saturating_record(nanoseconds);
                    report.granted_exclusive += 1;
                    report.fast_exclusive += u64::from(fast);
                }
                held.push(Held {
                    key_hash: row.key_hash,
                    release_ns: report.last_acquire_ns + row.hold_ns,
                    guard,
                });
            }
            Err(forelock::Error::Timeout { .. }) => report.timeouts += 1,
            Err(error) => {
                report.errors += 1;
                if report.first_error.is_none() {
                    report.first_error = Some(error.to_string());
                }
            }
        }
    }
    // Let the last holds run out as the trace says, then release.
    while !held.is_empty() {
        let now_ns = shm_layout::monotonic_ns();
        release_due(&mut held, now_ns, &mut report);
        if let Some(next) = held.iter().map(|h| h.release_ns).min() {
            let now_ns = shm_layout::monotonic_ns();
            if next > now_ns {
                std::thread::sleep(Duration::from_nanos(next - now_ns));
            }
        }
    }
    report.latency_all = encode(&all)?;
    report.latency_exclusive = encode(&exclusive)?;
    report.latency_shared = encode(&shared)?;
    report.lateness = encode(&lateness)?;
    drop(held);
    drop(client);
    let partial = spec.report_path.with_extension("partial");
    std::fs::write(&partial, serde_json::to_vec(&report)?)
        .with_context(|| format!("writing {}", partial.display()))?;
    std::fs::rename(&partial, &spec.report_path)?;
    Ok(())
}

/// Nanoseconds as a short human figure: 850 ns, 12.3 µs, 4.56 ms.
fn human_ns(nanoseconds: u64) -> String {
    let value = nanoseconds as f64;
    if value < 1e3 {
        format!("{nanoseconds} ns")
    } else if value < 1e6 {
        format!("{:.1} µs", value / 1e3)
    } else if value < 1e9 {
        format!("{:.2} ms", value / 1e6)
    } else {
        format!("{:.2} s", value / 1e9)
    }
}

/// The side-by-side table.
pub fn table(report: &LiveReplayReport) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "live replay of {}: {:.1} s, {} rows, {} clients, {} keys, speed {}, {:.0} rows/s offered\n\
         holds capped at {} ms, acquire timeout {} ms, {} cores\n\n",
        report.trace,
        report.seconds,
        report.rows,
        report.clients,
        report.keys_distinct,
        report.speed,
        report.offered_per_s,
        report.hold_cap_ms,
        report.timeout_ms,
        report.cores
    ));
    out.push_str(&format!(
        "{:<11} {:>5} {:>8} {:>8} {:>6} {:>7} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8} {:>6}\n",
        "policy",
        "pred",
        "rows",
        "granted",
        "t/out",
        "fast",
        "fast X",
        "p50",
        "p99",
        "X p50",
        "X p99",
        "S p50",
        "grants/s",
        "late"
    ));
    for mode in &report.modes {
        out.push_str(&format!(
            "{:<11} {:>5} {:>8} {:>8} {:>6} {:>6.1}% {:>8.1}% {:>9} {:>9} {:>9} {:>9} {:>9} {:>8.0} {:>6}\n",
            mode.mode,
            if mode.prediction { "on" } else { "off" },
            mode.rows,
            mode.granted,
            mode.timeouts,
            mode.fast_path_share * 100.0,
            mode.fast_path_share_exclusive * 100.0,
            human_ns(mode.p50_ns),
            human_ns(mode.p99_ns),
            human_ns(mode.exclusive_p50_ns),
            human_ns(mode.exclusive_p99_ns),
            human_ns(mode.shared_p50_ns),
            mode.throughput_per_s,
            mode.late_rows
        ));
    }
    out.push_str(
        "\nfast: grants taken by the client's own CAS (no broker); fast X: the same among \
         exclusive grants (shared grants always go through the broker).\n\
         latency: the lock call, from entering it to holding the key. late: rows that \
         started more than 1 ms after they were due.\n",
    );
    for mode in &report.modes {
        if mode.errors + mode.skipped + mode.release_errors + mode.cut_early > 0 {
            out.push_str(&format!(
                "{}: {} skipped (late or out of time), {} holds cut early, {} errors, {} release errors; first error: {}\n",
                mode.mode,
                mode.skipped,
                mode.cut_early,
                mode.errors,
                mode.release_errors,
                mode.first_error.as_deref().unwrap_or("-")
            ));
        }
    }
    out
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().rev().take(5).collect();
    if lines.is_empty() {
        return "(no output)".to_string();
    }
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

fn exited(child: &mut ChildGuard) -> bool {
    !matches!(child.try_wait(), Ok(None))
}
