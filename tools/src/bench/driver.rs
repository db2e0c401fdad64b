//! The parent side: starts the systems, runs every (workload, system) cell in
//! worker processes, collects their histograms.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use hdrhistogram::serialization::Deserializer;
use serde::Serialize;

use super::support::{
    ChildGuard, TempDir, clock_pair_ns, die_with_parent, poll_until, sweep_stale_temp_dirs,
};
use super::system::{BenchEnv, LockSystem, RunShape, Sharing, StartError, SystemEntry};
use super::workload::{
    GO_ABORT, GO_START, KEYS_TOTAL, Scoreboard, WorkerReport, WorkerSpec, Workload, WorkloadKind,
};
use super::{BenchArgs, FORELOCK_NAME, WORKER_ENV};

/// How worker processes are started: this program, with these arguments.
#[derive(Clone, Debug)]
pub struct Launcher {
    pub program: PathBuf,
    pub arguments: Vec<OsString>,
}

impl Launcher {
    /// This very command line again (the worker sees [`WORKER_ENV`] and
    /// ignores its arguments).
    pub fn this_command() -> anyhow::Result<Launcher> {
        Ok(Launcher {
            program: std::env::current_exe().context("finding this program to start workers")?,
            arguments: std::env::args_os().skip(1).collect(),
        })
    }
}

/// Limits of one measured run.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct RunLimits {
    pub duration_ms: u64,
    pub operations_max: u64,
}

impl RunLimits {
    pub fn from_args(args: &BenchArgs) -> RunLimits {
        let (duration_ms, operations_max) = if args.quick {
            (150, 200_000)
        } else {
            (1_000, 50_000_000)
        };
        RunLimits {
            duration_ms: args.duration_ms.unwrap_or(duration_ms),
            operations_max,
        }
    }
}

/// The figures of one measured run of one system on one workload.
#[derive(Clone, Debug, Serialize)]
pub struct RunResult {
    pub repeat: u32,
    pub p50_ns: u64,
    pub p99_ns: u64,
    pub p999_ns: u64,
    pub max_ns: u64,
    pub mean_ns: f64,
    pub samples: u64,
    pub grants_total: u64,
    pub grants_per_process: Vec<u64>,
    pub elapsed_s: f64,
    pub throughput_per_s: f64,
    /// Mutual exclusion checks (see `workload`): both must be 0.
    pub exclusion_violations: u64,
    pub lost_counts: u64,
    /// Uncontended: ns per acquire+release over a loop without a clock read
    /// per operation, the mean over the workers (none for other workloads).
    pub batch_ns_per_op: Option<f64>,
    #[serde(skip)]
    pub histogram: Histogram<u64>,
}

/// What happened to one (workload, system) cell.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "status", rename_all = "kebab-case")]
pub enum CellStatus {
    Measured,
    Skipped { reason: String },
    NotApplicable { reason: String },
    Failed { error: String },
}

#[derive(Clone, Debug, Serialize)]
pub struct Cell {
    pub workload: String,
    pub system: String,
    pub measures: &'static str,
    pub status: CellStatus,
    pub runs: Vec<RunResult>,
}

#[derive(Clone, Debug, Serialize)]
pub struct SystemInfo {
    pub name: String,
    /// "ready", "skipped (...)" or "failed: ...".
    pub state: String,
    pub note: String,
}

/// Everything a bench run produced.
#[derive(Debug, Serialize)]
pub struct Outcome {
    pub limits: RunLimits,
    pub repeat: u32,
    pub cores: usize,
    pub workloads: Vec<Workload>,
    pub systems: Vec<SystemInfo>,
    pub cells: Vec<Cell>,
    pub total_s: f64,
    /// What an `Instant::now()` pair costs: included once in every latency.
    pub clock_pair_ns: u64,
}

pub const SKIPPED_HINT: &str = "install with .ci/peers.sh";

enum Started {
    Ready(Box<dyn LockSystem>),
    Unavailable(CellStatus),
}

pub fn drive(
    args: &BenchArgs,
    entries: &[SystemEntry],
    launcher: &Launcher,
) -> anyhow::Result<Outcome> {
    let began = Instant::now();
    let limits = RunLimits::from_args(args);
    for name in &args.systems {
        if !entries.iter().any(|entry| entry.name == name) {
            let known: Vec<_> = entries.iter().map(|entry| entry.name).collect();
            bail!(
                "--systems: no system named {name:?}; known: {}",
                known.join(", ")
            );
        }
    }
    let selected: Vec<SystemEntry> = entries
        .iter()
        .filter(|entry| {
            args.systems.is_empty() || args.systems.iter().any(|name| name == entry.name)
        })
        .copied()
        .collect();
    let all_workloads = Workload::all();
    for name in &args.workloads {
        if !all_workloads
            .iter()
            .any(|workload| &workload.name() == name)
        {
            let known: Vec<_> = all_workloads.iter().map(Workload::name).collect();
            bail!(
                "--workloads: no workload named {name:?}; known: {}",
                known.join(", ")
            );
        }
    }
    let workloads: Vec<Workload> = all_workloads
        .into_iter()
        .filter(|workload| args.workloads.is_empty() || args.workloads.contains(&workload.name()))
        .collect();

    sweep_stale_temp_dirs();
    let work = TempDir::new_in_memory("work")?;
    let env = BenchEnv {
        work_dir: work.path().to_path_buf(),
        quick: args.quick,
    };

    // Start every system once; servers live until the end of this function
    // (their Drop stops them, on errors and panics too).
    let mut started: Vec<(SystemEntry, Started)> = Vec::new();
    let mut systems = Vec::new();
    for entry in &selected {
        eprintln!("bench: starting {}", entry.name);
        let (state, note, start) = match (entry.start)(&env) {
            Ok(system) => {
                let note = system.traits().note.to_string();
                ("ready".to_string(), note, Started::Ready(system))
            }
            Err(StartError::NotInstalled { binary }) => {
                let reason = format!("not installed: {binary}; {SKIPPED_HINT}");
                (
                    format!("skipped ({reason})"),
                    String::new(),
                    Started::Unavailable(CellStatus::Skipped { reason }),
                )
            }
            Err(StartError::Failed(error)) => {
                let error = format!("{error:#}");
                (
                    format!("failed: {error}"),
                    String::new(),
                    Started::Unavailable(CellStatus::Failed { error }),
                )
            }
        };
        systems.push(SystemInfo {
            name: entry.name.to_string(),
            state,
            note,
        });
        started.push((*entry, start));
    }

    let mut cells: Vec<Cell> = Vec::new();
    for workload in &workloads {
        for (entry, start) in &started {
            let status = match start {
                Started::Unavailable(status) => status.clone(),
                Started::Ready(system) => match not_applicable(system.as_ref(), workload) {
                    Some(reason) => CellStatus::NotApplicable { reason },
                    None => CellStatus::Measured,
                },
            };
            cells.push(Cell {
                workload: workload.name(),
                system: entry.name.to_string(),
                measures: workload.measures(),
                status,
                runs: Vec::new(),
            });
        }
    }

    // Repeats are interleaved (all cells, then all cells again), so that a
    // noisy minute on a shared machine spreads over every system.
    for repeat in 0..args.repeat {
        for (workload_index, workload) in workloads.iter().enumerate() {
            for (system_index, (entry, start)) in started.iter_mut().enumerate() {
                let cell = &mut cells[workload_index * selected.len() + system_index];
                if !matches!(cell.status, CellStatus::Measured) {
                    continue;
                }
                let Started::Ready(system) = start else {
                    continue;
                };
                eprintln!(
                    "bench: {} on {} (run {})",
                    entry.name,
                    workload.name(),
                    repeat + 1
                );
                match measure(entry, system.as_mut(), workload, repeat, limits, launcher) {
                    Ok(run) => cell.runs.push(run),
                    Err(error) => {
                        eprintln!(
                            "bench: {} on {} failed: {error:#}",
                            entry.name,
                            workload.name()
                        );
                        cell.status = CellStatus::Failed {
                            error: format!("{error:#}"),
                        };
                    }
                }
            }
        }
    }
    drop(started);

    Ok(Outcome {
        limits,
        repeat: args.repeat,
        cores: std::thread::available_parallelism().map_or(1, usize::from),
        workloads,
        systems,
        cells,
        total_s: began.elapsed().as_secs_f64(),
        clock_pair_ns: clock_pair_ns(),
    })
}

/// Why `workload` does not apply to `system`, if it does not.
pub fn not_applicable(system: &dyn LockSystem, workload: &Workload) -> Option<String> {
    let traits = system.traits();
    if traits.sharing == Sharing::Nothing {
        return (workload.kind == WorkloadKind::Handoff)
            .then(|| "not a lock: nothing is handed off".into());
    }
    if traits.sharing == Sharing::InProcess && workload.shares_keys() {
        return Some("in-process lock: processes cannot share it".into());
    }
    if traits.sharing == Sharing::FreshKeys && workload.shares_keys() {
        return Some("a fresh key per operation: processes never share one".into());
    }
    if !traits.excludes && workload.shares_keys() {
        return Some("not a lock: a baseline for uncontended round trips only".into());
    }
    None
}

/// The default reference: forelock if present, else std-mutex.
pub fn default_reference(outcome: &Outcome) -> String {
    if outcome
        .systems
        .iter()
        .any(|system| system.name == FORELOCK_NAME)
    {
        FORELOCK_NAME.to_string()
    } else {
        "std-mutex".to_string()
    }
}

/// Runs `workload` once on `system` in fresh worker processes.
pub fn measure(
    entry: &SystemEntry,
    system: &mut dyn LockSystem,
    workload: &Workload,
    repeat: u32,
    limits: RunLimits,
    launcher: &Launcher,
) -> anyhow::Result<RunResult> {
    let run_dir = TempDir::new_in_memory(&format!("{}-{}", entry.name, workload.name()))?;
    let board_path = run_dir.path().join("scoreboard");
    let board = Scoreboard::create(&board_path, KEYS_TOTAL)?;
    let shape = RunShape {
        keys_total: KEYS_TOTAL,
        processes: workload.processes,
        run_dir: run_dir.path().to_path_buf(),
    };
    let run_config = system
        .prepare_run(&shape)
        .with_context(|| format!("{}: preparing the run", entry.name))?;
    let check_exclusion = system.traits().excludes;

    let mut workers = Vec::with_capacity(workload.processes);
    let mut report_paths = Vec::with_capacity(workload.processes);
    let mut log_paths = Vec::with_capacity(workload.processes);
    for index in 0..workload.processes {
        let spec = WorkerSpec {
            system: entry.name.to_string(),
            run_config: run_config.clone(),
            workload: *workload,
            worker_index: index,
            scoreboard_path: board_path.clone(),
            report_path: run_dir.path().join(format!("report-{index}.json")),
            duration_ms: limits.duration_ms,
            operations_max: limits.operations_max,
            seed: u64::from(repeat) * 1_000 + index as u64 + 1,
            check_exclusion,
        };
        let spec_path = run_dir.path().join(format!("spec-{index}.json"));
        std::fs::write(&spec_path, serde_json::to_vec(&spec)?)?;
        let log_path = run_dir.path().join(format!("worker-{index}.log"));
        let log = std::fs::File::create(&log_path)?;
        let mut command = Command::new(&launcher.program);
        command
            .args(&launcher.arguments)
            .env(WORKER_ENV, &spec_path)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log));
        let child = die_with_parent(&mut command)
            .spawn()
            .with_context(|| format!("starting worker {}", launcher.program.display()))?;
        workers.push(ChildGuard::new(child));
        report_paths.push(spec.report_path);
        log_paths.push(log_path);
    }

    let abort = |board: &Scoreboard| board.set_go(GO_ABORT);
    let mut early_exit = None;
    let all_ready = poll_until(Duration::from_secs(60), Duration::from_millis(1), || {
        for (index, worker) in workers.iter_mut().enumerate() {
            if let Ok(Some(status)) = worker.try_wait() {
                early_exit = Some((index, status));
                return true;
            }
        }
        board.ready() >= workload.processes as u64
    });
    if let Some((index, status)) = early_exit {
        abort(&board);
        bail!(
            "worker {index} exited before starting ({status}): {}",
            log_tail(&log_paths[index])
        );
    }
    if !all_ready {
        abort(&board);
        bail!(
            "workers did not connect within 60 s: {}",
            log_tail(&log_paths[0])
        );
    }
    board.set_go(GO_START);

    let deadline =
        Instant::now() + Duration::from_millis(limits.duration_ms) + Duration::from_secs(60);
    let mut statuses = vec![None; workers.len()];
    while statuses.iter().any(Option::is_none) {
        for (index, worker) in workers.iter_mut().enumerate() {
            if statuses[index].is_none() {
                statuses[index] = worker.try_wait()?;
            }
        }
        if Instant::now() >= deadline {
            bail!(
                "workers still running {} s after their time was up; killed",
                60
            );
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    for (index, status) in statuses.iter().enumerate() {
        let status = status.expect("all exited");
        if !status.success() {
            bail!(
                "worker {index} failed ({status}): {}",
                log_tail(&log_paths[index])
            );
        }
    }

    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    histogram.auto(true);
    let mut grants_per_process = Vec::with_capacity(workers.len());
    let mut elapsed_ns_max = 0u64;
    let mut batch = Vec::new();
    for path in &report_paths {
        let report: WorkerReport = serde_json::from_slice(
            &std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
        )?;
        let worker_histogram: Histogram<u64> = Deserializer::new()
            .deserialize(&mut report.histogram_v2.as_slice())
            .map_err(|error| anyhow::anyhow!("worker histogram: {error:?}"))?;
        histogram.add(&worker_histogram)?;
        grants_per_process.push(report.grants);
        elapsed_ns_max = elapsed_ns_max.max(report.elapsed_ns);
        batch.extend(report.batch_ns_per_op);
    }
    let batch_ns_per_op =
        (!batch.is_empty()).then(|| batch.iter().sum::<f64>() / batch.len() as f64);
    let grants_total: u64 = grants_per_process.iter().sum();
    let (exclusion_violations, lost_counts) = if check_exclusion {
        let counted = board.counted_grants(KEYS_TOTAL);
        (board.violations(), grants_total.saturating_sub(counted))
    } else {
        (0, 0)
    };
    let elapsed_s = (elapsed_ns_max as f64 / 1e9).max(1e-9);
    let samples = histogram.len();
    if samples == 0 && workload.kind != WorkloadKind::Handoff {
        bail!("no operation completed");
    }
    Ok(RunResult {
        repeat,
        p50_ns: histogram.value_at_quantile(0.50),
        p99_ns: histogram.value_at_quantile(0.99),
        p999_ns: histogram.value_at_quantile(0.999),
        max_ns: histogram.max(),
        mean_ns: histogram.mean(),
        samples,
        grants_total,
        grants_per_process,
        elapsed_s,
        throughput_per_s: grants_total as f64 / elapsed_s,
        exclusion_violations,
        lost_counts,
        batch_ns_per_op,
        histogram,
    })
}

/// The last lines a worker wrote, for error messages.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(5).collect();
    let tail: Vec<&str> = lines.into_iter().rev().collect();
    if tail.is_empty() {
        "(no output)".to_string()
    } else {
        tail.join(" | ")
    }
}
