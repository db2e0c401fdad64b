//! `peers_smoke`: each installed peer runs every workload that applies to it
//! briefly, in real worker processes, and must keep mutual exclusion with
//! counts that add up. Behaviour only, never timing.
//!
//! Workers are this test binary run again with `worker_entry` as the only
//! test to run: with [`WORKER_ENV`] set, that test becomes the worker.

use std::ffi::OsString;

use super::driver::{Launcher, RunLimits, measure, not_applicable};
use super::peers;
use super::support::TempDir;
use super::system::{BenchEnv, StartError};
use super::workload::{Workload, WorkloadKind};
use super::{BenchArgs, WORKER_ENV};

/// The path of `worker_entry` as the test harness names it (without the crate).
fn worker_test_name() -> String {
    let module = module_path!();
    let without_crate = module.split_once("::").map_or(module, |(_, rest)| rest);
    format!("{without_crate}::worker_entry")
}

/// Not a test of its own: the body of a worker process (does nothing when
/// run as a normal test).
#[test]
fn worker_entry() {
    if let Some(spec) = std::env::var_os(WORKER_ENV) {
        let result = super::workload::worker_main(std::path::Path::new(&spec), &peers::entries());
        if let Err(error) = result {
            eprintln!("worker failed: {error:#}");
            std::process::exit(1);
        }
    }
}

fn test_launcher() -> Launcher {
    Launcher {
        program: std::env::current_exe().expect("test binary path"),
        arguments: [
            worker_test_name().as_str(),
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ]
        .iter()
        .map(OsString::from)
        .collect(),
    }
}

#[test]
fn peers_smoke() {
    let launcher = test_launcher();
    let limits = RunLimits {
        duration_ms: 40,
        operations_max: 2_000,
    };
    let args = BenchArgs {
        quick: true,
        ..BenchArgs::default()
    };
    assert_eq!(RunLimits::from_args(&args).duration_ms, 150);
    let work = TempDir::new("smoke").expect("temporary directory");
    let env = BenchEnv {
        work_dir: work.path().to_path_buf(),
        quick: true,
    };
    let workloads = [
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
            processes: 3,
        },
        Workload {
            kind: WorkloadKind::Zipf,
            processes: 2,
        },
    ];
    for entry in peers::entries() {
        let mut system = match (entry.start)(&env) {
            Ok(system) => system,
            Err(StartError::NotInstalled { binary }) => {
                eprintln!(
                    "peers_smoke: {} skipped: {binary} is not installed (.ci/peers.sh)",
                    entry.name
                );
                continue;
            }
            Err(StartError::Failed(error)) => panic!("{} failed to start: {error:#}", entry.name),
        };
        for workload in &workloads {
            if not_applicable(system.as_ref(), workload).is_some() {
                continue;
            }
            let run = measure(&entry, system.as_mut(), workload, 0, limits, &launcher)
                .unwrap_or_else(|error| panic!("{} on {}: {error:#}", entry.name, workload.name()));
            let what = format!("{} on {}", entry.name, workload.name());
            assert_eq!(
                run.grants_per_process.len(),
                workload.processes,
                "{what}: one report per process"
            );
            // Not "every process got the lock": in 40 ms on a loaded machine a
            // process may not get the CPU at all, and an unfair peer (flock, a
            // raw futex) may keep a hot key; that would be a timing assertion.
            assert!(
                run.grants_per_process.iter().sum::<u64>() > 0,
                "{what}: nobody got the lock: {:?}",
                run.grants_per_process
            );
            assert_eq!(
                run.grants_total,
                run.grants_per_process.iter().sum::<u64>(),
                "{what}"
            );
            assert!(
                run.grants_per_process
                    .iter()
                    .all(|&grants| grants <= limits.operations_max),
                "{what}: operation budget kept"
            );
            assert_eq!(
                run.exclusion_violations, 0,
                "{what}: two holders inside at once"
            );
            assert_eq!(
                run.lost_counts, 0,
                "{what}: counts under the lock do not add up"
            );
            // The batch figure: measured for the uncontended workload only.
            assert_eq!(
                run.batch_ns_per_op.is_some_and(|ns| ns > 0.0),
                workload.kind == WorkloadKind::Uncontended,
                "{what}: batch ns/op {:?}",
                run.batch_ns_per_op
            );
            if workload.kind == WorkloadKind::Handoff {
                // Every grant is a measured hand-off but the first and the
                // one after the last release (which was not a hand-off).
                assert!(run.samples > 0, "{what}: no hand-off measured");
                assert!(
                    run.samples + 2 >= run.grants_total,
                    "{what}: hand-offs measured {} of {}",
                    run.samples,
                    run.grants_total
                );
            } else {
                assert_eq!(
                    run.samples, run.grants_total,
                    "{what}: one latency sample per grant"
                );
            }
        }
    }
}
