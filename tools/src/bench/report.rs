//! Turning an [`Outcome`] into a table, JSON, HdrHistogram logs and a chart.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use hdrhistogram::serialization::V2Serializer;
use hdrhistogram::serialization::interval_log::{IntervalLogWriterBuilder, Tag};
use serde::Serialize;

use super::driver::{Cell, CellStatus, Outcome, RunResult, default_reference};
use super::{BenchArgs, FORELOCK_FRESH_NAME, FORELOCK_NAME, FORELOCK_UNPREPARED_NAME};

/// The median over repeats of one cell, and how far the repeats spread.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub p50_ns: u64,
    pub p99_ns: u64,
    pub p999_ns: u64,
    /// The longest single wait seen in any repeat.
    pub max_ns: u64,
    pub throughput_per_s: f64,
    /// Fairness: the fewest and the most grants one process got (in the
    /// repeat with the widest spread).
    pub grants_min: u64,
    pub grants_max: u64,
    /// Spread over repeats: the lowest and highest p50 and throughput.
    pub p50_ns_min: u64,
    pub p50_ns_max: u64,
    pub throughput_min: f64,
    pub throughput_max: f64,
    /// Summed over repeats; anything but 0 means a lock failed to exclude.
    pub exclusion_violations: u64,
    pub lost_counts: u64,
    /// Uncontended: the median over repeats of ns per acquire+release in a
    /// loop without a clock read per operation.
    pub batch_ns_per_op: Option<f64>,
}

fn median_u64(mut values: Vec<u64>) -> u64 {
    values.sort_unstable();
    values[values.len() / 2]
}

fn median_f64(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

pub fn summarize(runs: &[RunResult]) -> Option<Summary> {
    if runs.is_empty() {
        return None;
    }
    let p50: Vec<u64> = runs.iter().map(|run| run.p50_ns).collect();
    let throughput: Vec<f64> = runs.iter().map(|run| run.throughput_per_s).collect();
    let (grants_min, grants_max) = runs
        .iter()
        .map(|run| {
            let min = run.grants_per_process.iter().copied().min().unwrap_or(0);
            let max = run.grants_per_process.iter().copied().max().unwrap_or(0);
            (min, max)
        })
        .min_by(|a, b| {
            let ratio = |(min, max): &(u64, u64)| *min as f64 / (*max).max(1) as f64;
            ratio(a).total_cmp(&ratio(b))
        })
        .unwrap_or((0, 0));
    Some(Summary {
        p50_ns: median_u64(p50.clone()),
        p99_ns: median_u64(runs.iter().map(|run| run.p99_ns).collect()),
        p999_ns: median_u64(runs.iter().map(|run| run.p999_ns).collect()),
        max_ns: runs.iter().map(|run| run.max_ns).max().unwrap_or(0),
        throughput_per_s: median_f64(throughput.clone()),
        grants_min,
        grants_max,
        p50_ns_min: p50.iter().copied().min().unwrap_or(0),
        p50_ns_max: p50.iter().copied().max().unwrap_or(0),
        throughput_min: throughput.iter().copied().fold(f64::INFINITY, f64::min),
        throughput_max: throughput.iter().copied().fold(0.0, f64::max),
        exclusion_violations: runs.iter().map(|run| run.exclusion_violations).sum(),
        lost_counts: runs.iter().map(|run| run.lost_counts).sum(),
        batch_ns_per_op: {
            let batch: Vec<f64> = runs.iter().filter_map(|run| run.batch_ns_per_op).collect();
            (!batch.is_empty()).then(|| median_f64(batch))
        },
    })
}

/// "21.4ns", "1.23us": a batch figure, with a decimal below a microsecond.
fn format_batch_ns(nanoseconds: f64) -> String {
    if nanoseconds < 1e3 {
        format!("{nanoseconds:.1}ns")
    } else {
        format_ns(nanoseconds.round() as u64)
    }
}

/// "850ns", "12.3us", "4.56ms", "1.20s".
pub fn format_ns(nanoseconds: u64) -> String {
    let value = nanoseconds as f64;
    if value < 1e3 {
        format!("{nanoseconds}ns")
    } else if value < 1e6 {
        format!("{:.1}us", value / 1e3)
    } else if value < 1e9 {
        format!("{:.2}ms", value / 1e6)
    } else {
        format!("{:.2}s", value / 1e9)
    }
}

fn format_rate(per_second: f64) -> String {
    if per_second >= 1e6 {
        format!("{:.2}M", per_second / 1e6)
    } else if per_second >= 1e3 {
        format!("{:.1}k", per_second / 1e3)
    } else {
        format!("{per_second:.0}")
    }
}

fn format_ratio(ratio: f64) -> String {
    if !ratio.is_finite() {
        "-".into()
    } else if ratio >= 100.0 {
        format!("{ratio:.0}x")
    } else if ratio >= 10.0 {
        format!("{ratio:.1}x")
    } else if ratio >= 0.01 {
        format!("{ratio:.2}x")
    } else if ratio >= 0.0001 {
        format!("{ratio:.4}x")
    } else {
        format!("{ratio:.0e}x")
    }
}

/// A cell with its summary and the ratios against the reference.
#[derive(Debug, Serialize)]
pub struct Row<'a> {
    #[serde(flatten)]
    pub cell: &'a Cell,
    pub summary: Option<Summary>,
    /// The system the ratios are against in this workload.
    pub reference: Option<String>,
    /// p50 of this system / p50 of the reference (above 1: slower).
    pub p50_vs_reference: Option<f64>,
    /// Throughput of this system / the reference's (above 1: more).
    pub throughput_vs_reference: Option<f64>,
}

/// The systems ratios fall back to when the chosen reference has no figure
/// for a workload (std-mutex cannot be shared between processes).
const FALLBACK_REFERENCES: [&str; 2] = ["futex", "pthread-robust"];

pub fn rows<'a>(outcome: &'a Outcome, reference: &str) -> Vec<Row<'a>> {
    let mut rows = Vec::new();
    for workload in &outcome.workloads {
        let name = workload.name();
        let cells: Vec<&Cell> = outcome
            .cells
            .iter()
            .filter(|cell| cell.workload == name)
            .collect();
        let summary_of = |system: &str| {
            cells
                .iter()
                .find(|cell| cell.system == system)
                .and_then(|cell| summarize(&cell.runs))
        };
        let chosen = std::iter::once(reference)
            .chain(FALLBACK_REFERENCES)
            .find_map(|system| summary_of(system).map(|summary| (system.to_string(), summary)));
        for cell in cells {
            let summary = summarize(&cell.runs);
            let (p50_ratio, throughput_ratio) = match (&summary, &chosen) {
                (Some(mine), Some((_, theirs))) => (
                    Some(mine.p50_ns as f64 / theirs.p50_ns.max(1) as f64),
                    Some(mine.throughput_per_s / theirs.throughput_per_s.max(1e-9)),
                ),
                _ => (None, None),
            };
            rows.push(Row {
                cell,
                summary,
                reference: chosen.as_ref().map(|(system, _)| system.clone()),
                p50_vs_reference: p50_ratio,
                throughput_vs_reference: throughput_ratio,
            });
        }
    }
    rows
}

/// A performance target of ARCHITECTURE.md: `system`'s p50 over `peer`'s p50
/// on `workload` must be at most `floor` (release) and aims at `aim`.
struct Target {
    label: &'static str,
    workload: &'static str,
    system: &'static str,
    peer: &'static str,
    floor: f64,
    aim: f64,
}

const TARGETS: [Target; 9] = [
    Target {
        label: "prepared key, uncontended, vs in-process std Mutex",
        workload: "uncontended-2p",
        system: FORELOCK_NAME,
        peer: "std-mutex",
        floor: 2.0,
        aim: 1.0,
    },
    Target {
        label: "prepared key, uncontended, vs flock(2)",
        workload: "uncontended-2p",
        system: FORELOCK_NAME,
        peer: "flock",
        floor: 1.0 / 50.0,
        aim: 1.0 / 50.0,
    },
    Target {
        label: "unprepared key (fresh key: one round trip, CAS release) vs bare Unix-socket round trip",
        workload: "uncontended-1p",
        system: FORELOCK_FRESH_NAME,
        peer: "unix-socket",
        floor: 2.0,
        aim: 1.5,
    },
    Target {
        label: "the same, two processes at once (one broker thread; an echo thread each)",
        workload: "uncontended-2p",
        system: FORELOCK_FRESH_NAME,
        peer: "unix-socket",
        floor: 2.0,
        aim: 1.5,
    },
    Target {
        label: "never-prepared broker (policy none: two round trips) vs bare Unix-socket round trip",
        workload: "uncontended-1p",
        system: FORELOCK_UNPREPARED_NAME,
        peer: "unix-socket",
        floor: 2.0,
        aim: 1.5,
    },
    Target {
        label: "the same, two processes at once",
        workload: "uncontended-2p",
        system: FORELOCK_UNPREPARED_NAME,
        peer: "unix-socket",
        floor: 2.0,
        aim: 1.5,
    },
    Target {
        label: "contended hand-off vs raw futex hand-off",
        workload: "handoff-2p",
        system: FORELOCK_NAME,
        peer: "futex",
        floor: 1.5,
        aim: 1.2,
    },
    Target {
        label: "prepared key vs Redis SET NX PX",
        workload: "uncontended-2p",
        system: FORELOCK_NAME,
        peer: "redis",
        floor: 1.0,
        aim: 1.0 / 1000.0,
    },
    Target {
        label: "prepared key vs etcd lock",
        workload: "uncontended-2p",
        system: FORELOCK_NAME,
        peer: "etcd",
        floor: 1.0,
        aim: 1.0 / 1000.0,
    },
];

/// The targets of issue 12 on the batch figure (ns per operation over a
/// loop, no clock read per operation): `system` / `peer` at most `floor`.
const BATCH_TARGETS: [Target; 4] = [
    Target {
        label: "prepared key, batch, vs in-process std Mutex",
        workload: "uncontended-2p",
        system: FORELOCK_NAME,
        peer: "std-mutex",
        floor: 1.0,
        aim: 1.0,
    },
    Target {
        label: "prepared key, batch, vs flock(2)",
        workload: "uncontended-2p",
        system: FORELOCK_NAME,
        peer: "flock",
        floor: 1.0 / 50.0,
        aim: 1.0 / 100.0,
    },
    Target {
        label: "unprepared key (fresh key), batch, vs bare Unix-socket round trip",
        workload: "uncontended-1p",
        system: FORELOCK_FRESH_NAME,
        peer: "unix-socket",
        floor: 2.0,
        aim: 1.5,
    },
    Target {
        label: "the same, two processes at once",
        workload: "uncontended-2p",
        system: FORELOCK_FRESH_NAME,
        peer: "unix-socket",
        floor: 2.0,
        aim: 1.5,
    },
];

/// "aim met", "floor met" or "MISSED" for `ratio` against `target`.
fn verdict(target: &Target, ratio: f64) -> &'static str {
    if ratio <= target.aim {
        "aim met"
    } else if ratio <= target.floor {
        "floor met"
    } else {
        "MISSED"
    }
}

/// The summary of `system` on `workload`, if that cell was measured.
fn summary_of(outcome: &Outcome, workload: &str, system: &str) -> Option<Summary> {
    outcome
        .cells
        .iter()
        .find(|cell| cell.workload == workload && cell.system == system)
        .and_then(|cell| summarize(&cell.runs))
}

/// The hot-key workloads of issue 12's max-wait target.
const MAX_WAIT_WORKLOADS: [&str; 3] = ["hot-2p", "hot-4p", "hot-8p"];
/// Issue 12's max-wait target on a hot key, absolute: floor and aim.
const MAX_WAIT_FLOOR_NS: u64 = 5_000_000;
const MAX_WAIT_AIM_NS: u64 = 2_000_000;

/// One line per hot-key workload where forelock was measured: its max wait
/// against issue 12's bound, beside `no-lock`'s from the same run (the
/// longest the CPU scheduler alone kept a process inside a measured call:
/// a floor no lock can go under) and robust pthread's.
fn max_wait_targets(outcome: &Outcome) -> String {
    let max_wait = |workload: &str, system: &str| {
        summary_of(outcome, workload, system).map(|summary| summary.max_ns)
    };
    let mut out = String::new();
    for workload in MAX_WAIT_WORKLOADS {
        let Some(mine) = max_wait(workload, FORELOCK_NAME) else {
            continue;
        };
        let verdict = if mine <= MAX_WAIT_AIM_NS {
            "aim met"
        } else if mine <= MAX_WAIT_FLOOR_NS {
            "floor met"
        } else {
            "MISSED"
        };
        let beside = ["no-lock", "pthread-robust"]
            .iter()
            .filter_map(|peer| {
                max_wait(workload, peer).map(|ns| format!("{peer} {}", format_ns(ns)))
            })
            .collect::<Vec<_>>()
            .join(", ");
        let _ = writeln!(
            out,
            "  {workload}, max wait: {FORELOCK_NAME} {} (floor <= {}, aim <= {}): {verdict}{}",
            format_ns(mine),
            format_ns(MAX_WAIT_FLOOR_NS),
            format_ns(MAX_WAIT_AIM_NS),
            if beside.is_empty() {
                String::new()
            } else {
                format!("; same run: {beside}")
            },
        );
    }
    if out.is_empty() {
        return out;
    }
    format!(
        "targets of issue 12, max wait on a hot key (no-lock: the same loop with nothing taken, the scheduler's own floor):\n{out}"
    )
}

/// One line per batch target whose two cells were measured.
fn batch_targets(outcome: &Outcome) -> String {
    let batch = |workload: &str, system: &str| {
        summary_of(outcome, workload, system).and_then(|summary| summary.batch_ns_per_op)
    };
    let mut out = String::new();
    for target in &BATCH_TARGETS {
        let (Some(mine), Some(theirs)) = (
            batch(target.workload, target.system),
            batch(target.workload, target.peer),
        ) else {
            continue;
        };
        let ratio = mine / theirs.max(1e-9);
        let _ = writeln!(
            out,
            "  {}: {} {} / {} {} = {} (floor <= {}, aim <= {}): {}",
            target.label,
            target.system,
            format_batch_ns(mine),
            target.peer,
            format_batch_ns(theirs),
            format_ratio(ratio),
            format_ratio(target.floor),
            format_ratio(target.aim),
            verdict(target, ratio),
        );
    }
    if out.is_empty() {
        return out;
    }
    format!("targets of issue 12, batch ns/op against batch ns/op from this run:\n{out}")
}

/// One line per target of ARCHITECTURE.md whose two cells were measured.
fn targets(outcome: &Outcome) -> String {
    let p50 = |workload: &str, system: &str| {
        summary_of(outcome, workload, system).map(|summary| summary.p50_ns)
    };
    let mut out = String::new();
    for target in &TARGETS {
        let (Some(mine), Some(theirs)) = (
            p50(target.workload, target.system),
            p50(target.workload, target.peer),
        ) else {
            continue;
        };
        let ratio = mine as f64 / theirs.max(1) as f64;
        let verdict = verdict(target, ratio);
        let _ = writeln!(
            out,
            "  {}: {} p50 {} / {} p50 {} = {} (floor <= {}, aim <= {}): {verdict}",
            target.label,
            target.system,
            format_ns(mine),
            target.peer,
            format_ns(theirs),
            format_ratio(ratio),
            format_ratio(target.floor),
            format_ratio(target.aim),
        );
    }
    if out.is_empty() {
        return out;
    }
    format!("targets of ARCHITECTURE.md, p50 against p50 from this run:\n{out}")
}

/// The text table.
pub fn table(outcome: &Outcome, reference: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "forelock bench: {} core(s), {} ms per run, {} repeat(s); ratios against {reference} (where it has no figure: futex, then pthread-robust); spread = lowest..highest p50 over repeats",
        outcome.cores, outcome.limits.duration_ms, outcome.repeat
    );
    let header = format!(
        "{:<15} {:<15} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>15} {:>9} {:>9} {:>19}",
        "workload",
        "system",
        "batch/op",
        "p50",
        "p99",
        "p99.9",
        "max wait",
        "ops/s",
        "grants min/max",
        "p50/ref",
        "ops/ref",
        "p50 spread"
    );
    let all_rows = rows(outcome, reference);
    let mut current_workload = String::new();
    for row in &all_rows {
        if row.cell.workload != current_workload {
            current_workload = row.cell.workload.clone();
            let _ = writeln!(out);
            let _ = writeln!(
                out,
                "## {} - latency measures {}; ratios against {}",
                row.cell.workload,
                row.cell.measures,
                row.reference
                    .as_deref()
                    .unwrap_or("(no reference measured)")
            );
            let _ = writeln!(out, "{header}");
        }
        let _ = write!(out, "{:<15} {:<15} ", row.cell.workload, row.cell.system);
        match (&row.cell.status, &row.summary) {
            (CellStatus::Measured, Some(summary)) => {
                let ratio = |value: Option<f64>| value.map_or("-".to_string(), format_ratio);
                let spread = if outcome.repeat > 1 {
                    format!(
                        "{}..{}",
                        format_ns(summary.p50_ns_min),
                        format_ns(summary.p50_ns_max)
                    )
                } else {
                    "-".to_string()
                };
                let _ = write!(
                    out,
                    "{:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>15} {:>9} {:>9} {:>19}",
                    summary
                        .batch_ns_per_op
                        .map_or("-".to_string(), format_batch_ns),
                    format_ns(summary.p50_ns),
                    format_ns(summary.p99_ns),
                    format_ns(summary.p999_ns),
                    format_ns(summary.max_ns),
                    format_rate(summary.throughput_per_s),
                    format!("{}/{}", summary.grants_min, summary.grants_max),
                    ratio(row.p50_vs_reference),
                    ratio(row.throughput_vs_reference),
                    spread,
                );
                if summary.exclusion_violations != 0 || summary.lost_counts != 0 {
                    let _ = write!(
                        out,
                        "  MUTUAL EXCLUSION VIOLATED ({} overlaps, {} lost counts)",
                        summary.exclusion_violations, summary.lost_counts
                    );
                }
            }
            (CellStatus::Measured, None) => {
                let _ = write!(out, "not measured");
            }
            (CellStatus::Skipped { reason }, _) => {
                let _ = write!(out, "skipped ({reason})");
            }
            (CellStatus::NotApplicable { reason }, _) => {
                let _ = write!(out, "n/a ({reason})");
            }
            (CellStatus::Failed { error }, _) => {
                let _ = write!(out, "FAILED: {error}");
            }
        }
        let _ = writeln!(out);
    }
    let _ = writeln!(out);
    let target_lines = targets(outcome);
    if !target_lines.is_empty() {
        let _ = writeln!(out, "{target_lines}");
    }
    for lines in [batch_targets(outcome), max_wait_targets(outcome)] {
        if !lines.is_empty() {
            let _ = writeln!(out, "{lines}");
        }
    }
    for system in &outcome.systems {
        if system.note.is_empty() {
            let _ = writeln!(out, "{}: {}", system.name, system.state);
        } else {
            let _ = writeln!(out, "{}", system.note);
        }
    }
    let _ = writeln!(
        out,
        "every latency includes one clock read pair ({} here); batch/op (uncontended) = ns per operation of the median chunk of {} operations, one clock read per chunk; max wait = the longest single sample",
        format_ns(outcome.clock_pair_ns),
        super::workload::BATCH_CHUNK
    );
    let _ = writeln!(out, "total time {:.1} s", outcome.total_s);
    out
}

#[derive(Serialize)]
struct JsonReport<'a> {
    reference: &'a str,
    cores: usize,
    repeat: u32,
    limits: super::driver::RunLimits,
    total_s: f64,
    clock_pair_ns: u64,
    workloads: Vec<String>,
    systems: &'a [super::driver::SystemInfo],
    results: Vec<Row<'a>>,
}

pub fn json(outcome: &Outcome, reference: &str) -> anyhow::Result<String> {
    let report = JsonReport {
        reference,
        cores: outcome.cores,
        repeat: outcome.repeat,
        limits: outcome.limits,
        total_s: outcome.total_s,
        clock_pair_ns: outcome.clock_pair_ns,
        workloads: outcome
            .workloads
            .iter()
            .map(|workload| workload.name())
            .collect(),
        systems: &outcome.systems,
        results: rows(outcome, reference),
    };
    Ok(serde_json::to_string_pretty(&report)?)
}

pub fn emit(args: &BenchArgs, outcome: &Outcome) -> anyhow::Result<()> {
    let reference = args
        .reference
        .clone()
        .unwrap_or_else(|| default_reference(outcome));
    if !outcome
        .systems
        .iter()
        .any(|system| system.name == reference)
    {
        eprintln!("bench: reference {reference:?} was not measured; ratios use the fallbacks");
    }
    let table_text = table(outcome, &reference);
    if args.json {
        println!("{}", json(outcome, &reference)?);
    } else {
        print!("{table_text}");
    }
    if let Some(dir) = &args.out {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::write(dir.join("table.txt"), &table_text)?;
        std::fs::write(dir.join("report.json"), json(outcome, &reference)?)?;
        write_histogram_logs(dir, outcome)?;
        super::chart::draw(&dir.join("latency.png"), outcome)?;
        eprintln!("bench: wrote {}", dir.display());
    }
    Ok(())
}

/// One HdrHistogram interval log per (workload, system), one interval per repeat.
fn write_histogram_logs(dir: &Path, outcome: &Outcome) -> anyhow::Result<()> {
    for cell in &outcome.cells {
        if cell.runs.is_empty() {
            continue;
        }
        let path = dir.join(format!("{}.{}.hlog", cell.workload, cell.system));
        let mut buffer = Vec::new();
        let mut serializer = V2Serializer::new();
        {
            let mut builder = IntervalLogWriterBuilder::new();
            builder.add_comment(&format!(
                "forelock bench: system {}, workload {}, values in ns, measures {}",
                cell.system, cell.workload, cell.measures
            ));
            let mut writer = builder
                .begin_log_with(&mut buffer, &mut serializer)
                .context("starting the histogram log")?;
            let mut start = Duration::ZERO;
            for run in &cell.runs {
                let tag_text = format!("repeat{}", run.repeat + 1);
                let length = Duration::from_secs_f64(run.elapsed_s);
                writer
                    .write_histogram(&run.histogram, start, length, Tag::new(&tag_text))
                    .map_err(|error| anyhow::anyhow!("writing {}: {error:?}", path.display()))?;
                start += length;
            }
        }
        std::fs::write(&path, buffer).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_with_p50(p50_ns: u64) -> RunResult {
        let mut histogram = hdrhistogram::Histogram::<u64>::new(3).expect("histogram");
        histogram.record(p50_ns).expect("record");
        RunResult {
            repeat: 0,
            p50_ns,
            p99_ns: p50_ns,
            p999_ns: p50_ns,
            max_ns: p50_ns,
            mean_ns: p50_ns as f64,
            samples: 1,
            grants_total: 1,
            grants_per_process: vec![1],
            elapsed_s: 1.0,
            throughput_per_s: 1.0,
            exclusion_violations: 0,
            lost_counts: 0,
            batch_ns_per_op: None,
            histogram,
        }
    }

    /// An outcome of one repeat on 2 cores with these cells.
    fn outcome_of(cells: Vec<Cell>) -> Outcome {
        Outcome {
            limits: super::super::driver::RunLimits {
                duration_ms: 1,
                operations_max: 1,
            },
            repeat: 1,
            cores: 2,
            workloads: Vec::new(),
            systems: Vec::new(),
            cells,
            total_s: 1.0,
            clock_pair_ns: 20,
        }
    }

    fn batch_cell(system: &str, batch_ns_per_op: f64) -> Cell {
        let mut cell = cell("uncontended-2p", system, 100);
        cell.runs[0].batch_ns_per_op = Some(batch_ns_per_op);
        cell
    }

    #[test]
    fn batch_targets_compare_ns_per_operation_and_skip_cells_without_a_batch() {
        let outcome = outcome_of(vec![
            batch_cell("forelock", 20.5),
            batch_cell("std-mutex", 20.0),
            batch_cell("flock", 3000.0),
            cell("uncontended-2p", "forelock-fresh", 90_000),
            batch_cell("unix-socket", 10_000.0),
        ]);
        let text = batch_targets(&outcome);
        assert!(text.contains("batch, vs in-process std Mutex: forelock 20.5ns / std-mutex 20.0ns = 1.02x (floor <= 1.00x, aim <= 1.00x): MISSED"), "{text}");
        assert!(text.contains("batch, vs flock(2): forelock 20.5ns / flock 3.0us = 0.0068x (floor <= 0.02x, aim <= 0.01x): aim met"), "{text}");
        assert!(
            !text.contains("Unix-socket"),
            "no batch figure for forelock-fresh: no line: {text}"
        );
    }

    #[test]
    fn max_wait_targets_judge_forelock_and_show_the_no_lock_floor_beside_it() {
        let with_max = |workload: &str, system: &str, max_ns: u64| {
            let mut cell = cell(workload, system, 100);
            cell.runs[0].max_ns = max_ns;
            cell
        };
        let outcome = outcome_of(vec![
            with_max("hot-2p", "forelock", 1_500_000),
            with_max("hot-4p", "forelock", 4_000_000),
            with_max("hot-8p", "forelock", 20_000_000),
            with_max("hot-8p", "no-lock", 18_000_000),
            with_max("hot-8p", "pthread-robust", 16_000_000),
        ]);
        let text = max_wait_targets(&outcome);
        assert!(
            text.contains(
                "hot-2p, max wait: forelock 1.50ms (floor <= 5.00ms, aim <= 2.00ms): aim met\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "hot-4p, max wait: forelock 4.00ms (floor <= 5.00ms, aim <= 2.00ms): floor met\n"
            ),
            "{text}"
        );
        assert!(text.contains("hot-8p, max wait: forelock 20.00ms (floor <= 5.00ms, aim <= 2.00ms): MISSED; same run: no-lock 18.00ms, pthread-robust 16.00ms"), "{text}");
        assert!(
            max_wait_targets(&Outcome {
                cells: Vec::new(),
                ..outcome
            })
            .is_empty()
        );
    }

    fn cell(workload: &str, system: &str, p50_ns: u64) -> Cell {
        Cell {
            workload: workload.into(),
            system: system.into(),
            measures: "acquire+release",
            status: CellStatus::Measured,
            runs: vec![run_with_p50(p50_ns)],
        }
    }

    #[test]
    fn targets_compare_forelock_with_the_peers_named_in_the_architecture() {
        let outcome = outcome_of(vec![
            cell("uncontended-2p", "forelock", 90),
            cell("uncontended-2p", "std-mutex", 60),
            cell("handoff-2p", "forelock", 8_000),
            cell("handoff-2p", "futex", 4_000),
        ]);
        let text = targets(&outcome);
        assert!(text.contains("vs in-process std Mutex: forelock p50 90ns / std-mutex p50 60ns = 1.50x (floor <= 2.00x, aim <= 1.00x): floor met"), "{text}");
        assert!(text.contains("vs raw futex hand-off: forelock p50 8.0us / futex p50 4.0us = 2.00x (floor <= 1.50x, aim <= 1.20x): MISSED"), "{text}");
        assert!(
            !text.contains("redis"),
            "only targets with both cells measured: {text}"
        );
        assert_eq!(default_reference(&outcome), "std-mutex");
    }

    #[test]
    fn durations_are_printed_in_a_readable_unit() {
        assert_eq!(format_ns(850), "850ns");
        assert_eq!(format_ns(12_345), "12.3us");
        assert_eq!(format_ns(4_560_000), "4.56ms");
        assert_eq!(format_ns(1_200_000_000), "1.20s");
        assert_eq!(format_ratio(0.00002), "2e-5x");
        assert_eq!(format_ratio(1.5), "1.50x");
    }
}
