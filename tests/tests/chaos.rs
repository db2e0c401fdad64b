//! A randomized multi-process fault test: real `forelockd`, real client
//! processes (`fl-chaos-worker work`) taking checked keys in every mode, and a
//! driver (this test) that at random moments SIGKILLs workers (and starts new
//! ones), SIGKILLs the broker and starts it again on the same runtime
//! directory, SIGSTOPs the broker past the clients' 10 s response timeout once
//! per run, while a scribbler (`fl-chaos-worker scribble`) writes random
//! values into the lock words of other keys and into client records' wait
//! cells.
//!
//! The checker is a fenced resource per key, in files: an append-only log of
//! entries and exits, a "writer inside" marker made with link(2) (atomic
//! create-if-absent, with its content), and the last exclusive token. The
//! module docs of `forelock_tests::chaos` describe it and why it has no races:
//! every violation it reports is two holders inside at once or a fencing
//! token that did not increase. A holder killed inside is an owner death: the
//! next holder takes the half-written resource over (not a violation).
//!
//! `FORELOCK_CHAOS_FAULTS` chooses the faults (comma-separated; default all:
//! `kill-workers,kill-broker,stop-broker,scribble`), to tell which one a
//! violation needs.
//!
//! Bounds: `FORELOCK_CHAOS_SECS` (default 40, the broker stop included when
//! the run is 20 s or longer) and `FORELOCK_CHAOS_SEED` (default: from the
//! clock; printed first, so a failure can be replayed with the same driver
//! decisions; the processes' timing is not replayable). The summary line
//! gives grants checked, workers killed, broker kills and stops, scribbles and
//! violations; the test asserts there are no violations. On a violation (or
//! with `FORELOCK_CHAOS_KEEP` set) the run directory is kept and its path
//! printed: `check/violations.log`, `check/notes.log` (client errors, lost
//! owner-died flags), `check/keys/<i>/log`, the workers' stderr.

mod support;
use forelock_tests::chaos::{self, Analysis};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::*;

/// Keep-alive preparation (used keys stay prepared: the fast path) with a
/// short keep-alive, so the rarely used key is reclaimed between uses.
const CONFIG: &str = "[table]\nslots = 256\nclients = 64\n\n\
                      [allocator]\npolicy = \"keep-alive\"\nkeep_alive_ms = 300\n";
/// Checked keys, hottest first (weights in fl-chaos-worker).
const KEYS: [&str; 5] = [
    "chaos/hot-a",
    "chaos/hot-b",
    "chaos/warm",
    "chaos/cool",
    "chaos/rare",
];
/// The scribbler's keys: never checked.
const OTHER_KEYS: &str = "scribble/o0,scribble/o1,scribble/o2,scribble/o3";
const WORKERS: usize = 5;
/// Longer than the client's 10 s response timeout (a constant in
/// client/src/conn.rs, not configurable).
const BROKER_STOP: Duration = Duration::from_secs(11);
/// The shortest run that includes a broker stop.
const STOP_MIN_RUN: Duration = Duration::from_secs(20);

fn chaos_worker_exe() -> &'static str {
    env!("CARGO_BIN_EXE_fl-chaos-worker")
}

struct ChaosWorker {
    wid: u64,
    child: Child,
}

#[derive(Default)]
struct Counts {
    workers_started: u64,
    workers_killed: u64,
    /// Workers that exited by themselves (a release error, a panic).
    workers_exited: u64,
    workers_stuck_at_end: u64,
    broker_kills: u64,
    broker_stops: u64,
    /// The broker exited without being killed.
    broker_deaths: u64,
}

struct Driver {
    runtime: PathBuf,
    run: PathBuf,
    seed: u64,
    rng: StdRng,
    keys: Vec<String>,
    workers: Vec<ChaosWorker>,
    next_wid: u64,
    counts: Counts,
}

impl Driver {
    fn spawn_worker(&mut self) {
        let wid = self.next_wid;
        self.next_wid += 1;
        let stderr = std::fs::File::create(self.run.join("workers").join(format!("{wid}.stderr")))
            .expect("worker stderr file");
        let child = Command::new(chaos_worker_exe())
            .arg("--dir")
            .arg(&self.runtime)
            .arg("--run")
            .arg(&self.run)
            .arg("--seed")
            .arg(self.seed.to_string())
            .arg("work")
            .arg("--wid")
            .arg(wid.to_string())
            .arg("--keys")
            .arg(self.keys.join(","))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start fl-chaos-worker");
        self.workers.push(ChaosWorker { wid, child });
        self.counts.workers_started += 1;
    }

    /// Doom (marker excused, sections closed by `K`), then SIGKILL and reap.
    fn kill_worker(&mut self, index: usize) {
        let mut w = self.workers.swap_remove(index);
        chaos::doom(&self.run, self.keys.len(), w.wid);
        let _ = w.child.kill();
        let _ = w.child.wait();
    }

    /// Reap workers that exited by themselves: doom them (they are dead) and
    /// start others in their place.
    fn reap(&mut self) {
        let mut i = 0;
        while i < self.workers.len() {
            match self.workers[i].child.try_wait() {
                Ok(Some(status)) => {
                    let w = self.workers.swap_remove(i);
                    chaos::doom(&self.run, self.keys.len(), w.wid);
                    chaos::append_to(
                        &chaos::notes_path(&self.run),
                        &format!("driver: worker {} exited by itself: {status}\n", w.wid),
                    );
                    self.counts.workers_exited += 1;
                    self.spawn_worker();
                }
                _ => i += 1,
            }
        }
    }
}

fn signal(broker: &Broker, sig: i32) {
    // SAFETY: kill(2) on our own child's pid has no memory preconditions.
    let rc = unsafe { libc::kill(broker.pid() as i32, sig) };
    assert_eq!(rc, 0, "signal {sig} to forelockd");
}

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?} is not a whole number")),
    )
}

#[test]
fn random_kills_restarts_stops_and_scribbles_never_grant_a_key_twice() {
    let secs = env_u64("FORELOCK_CHAOS_SECS").unwrap_or(40);
    let seed = env_u64("FORELOCK_CHAOS_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    });
    println!("chaos: FORELOCK_CHAOS_SEED={seed} FORELOCK_CHAOS_SECS={secs}");
    let run_for = Duration::from_secs(secs);
    let faults = std::env::var("FORELOCK_CHAOS_FAULTS")
        .unwrap_or_else(|_| "kill-workers,kill-broker,stop-broker,scribble".into());
    let fault = |name: &str| faults.split(',').any(|f| f.trim() == name);
    for f in faults.split(',').map(str::trim).filter(|f| !f.is_empty()) {
        assert!(
            ["kill-workers", "kill-broker", "stop-broker", "scribble"].contains(&f),
            "FORELOCK_CHAOS_FAULTS: unknown fault {f:?}"
        );
    }
    println!("chaos: FORELOCK_CHAOS_FAULTS={faults}");

    let dir = TempDir::new("chaos");
    let runtime = dir.path().join("runtime");
    let run = dir.path().join("check");
    std::fs::create_dir_all(&runtime).unwrap();
    chaos::prepare_run(&run, KEYS.len());
    let mut broker = Broker::start(&runtime, CONFIG);

    let mut d = Driver {
        runtime: runtime.clone(),
        run: run.clone(),
        seed,
        rng: StdRng::seed_from_u64(seed),
        keys: KEYS.iter().map(|k| k.to_string()).collect(),
        workers: Vec::new(),
        next_wid: 1,
        counts: Counts::default(),
    };
    for _ in 0..WORKERS {
        d.spawn_worker();
    }
    let mut scribbler = fault("scribble").then(|| {
        Command::new(chaos_worker_exe())
            .arg("--dir")
            .arg(&runtime)
            .arg("--run")
            .arg(&run)
            .arg("--seed")
            .arg(seed.to_string())
            .arg("scribble")
            .arg("--keys")
            .arg(OTHER_KEYS)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(run.join("scribbler.stderr")).unwrap())
            .spawn()
            .expect("start the scribbler")
    });

    let start = Instant::now();
    // The one broker stop of the run, at a random moment in its first half.
    let mut stop_at = (fault("stop-broker") && run_for >= STOP_MIN_RUN)
        .then(|| start + run_for.mul_f64(d.rng.random_range(0.15..0.5)));
    let mut stopped_until: Option<Instant> = None;
    let mut last_broker_kill = start;
    let mut broker_log_at_death = Vec::new();
    while start.elapsed() < run_for {
        d.reap();
        let now = Instant::now();
        if let Some(until) = stopped_until {
            if now >= until {
                signal(&broker, libc::SIGCONT);
                stopped_until = None;
            }
        } else if !broker.is_running() {
            d.counts.broker_deaths += 1;
            broker_log_at_death.push(broker.log());
            broker.restart();
        } else if stop_at.is_some_and(|at| now >= at) {
            stop_at = None;
            signal(&broker, libc::SIGSTOP);
            stopped_until = Some(now + BROKER_STOP);
            d.counts.broker_stops += 1;
        }
        // Per tick (about 175 ms): a worker killed now and then, so most
        // live a few seconds (and some through the broker stop, to meet the
        // clients' response timeout); a broker kill more rarely.
        let roll = d.rng.random_range(0..100);
        let kill_below = if stopped_until.is_some() { 3 } else { 10 };
        if roll < kill_below && fault("kill-workers") && !d.workers.is_empty() {
            let index = d.rng.random_range(0..d.workers.len());
            d.kill_worker(index);
            d.counts.workers_killed += 1;
            d.spawn_worker();
        } else if (10..14).contains(&roll)
            && fault("kill-broker")
            && stopped_until.is_none()
            && last_broker_kill.elapsed() > Duration::from_secs(2)
        {
            broker.restart();
            d.counts.broker_kills += 1;
            last_broker_kill = Instant::now();
        }
        let pause = d.rng.random_range(50..=300);
        std::thread::sleep(Duration::from_millis(pause));
    }

    // Wind down: let the broker run, ask everyone to stop, wait (bounded).
    if stopped_until.is_some() {
        signal(&broker, libc::SIGCONT);
    }
    std::fs::write(chaos::stop_path(&run), "").unwrap();
    let deadline = Instant::now() + PATIENCE;
    while Instant::now() < deadline
        && d.workers
            .iter_mut()
            .any(|w| w.child.try_wait().ok().flatten().is_none())
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    while let Some(index) = d
        .workers
        .iter_mut()
        .position(|w| w.child.try_wait().ok().flatten().is_none())
    {
        chaos::append_to(
            &chaos::notes_path(&run),
            &format!(
                "driver: worker {} still running at the end: killed\n",
                d.workers[index].wid
            ),
        );
        d.kill_worker(index);
        d.counts.workers_stuck_at_end += 1;
    }
    d.workers.clear();
    if let Some(s) = &mut scribbler {
        wait_bounded(s);
    }
    let scribbles: u64 = std::fs::read_to_string(run.join("scribbles"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    let broker_alive = broker.is_running();
    drop(broker);

    let analysis = chaos::analyze(&run, &d.keys);
    report(
        seed,
        secs,
        &d.counts,
        scribbles,
        &analysis,
        &run,
        broker_alive,
        &broker_log_at_death,
    );
    let live = read_lines(&chaos::violations_path(&run));
    let total = live.len() + analysis.violations.len();
    if total > 0 || std::env::var_os("FORELOCK_CHAOS_KEEP").is_some() {
        // Keep the evidence.
        println!("chaos: run directory kept: {}", dir.path().display());
        std::mem::forget(dir);
    }
    assert_eq!(
        total,
        0,
        "{total} violations (seed {seed}): {} seen live by the workers, {} in the logs; \
         first ones:\n{}",
        live.len(),
        analysis.violations.len(),
        live.iter()
            .chain(&analysis.violations)
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

fn read_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn report(
    seed: u64,
    secs: u64,
    c: &Counts,
    scribbles: u64,
    a: &Analysis,
    run: &Path,
    broker_alive: bool,
    broker_logs: &[String],
) {
    let live = read_lines(&chaos::violations_path(run));
    let notes = read_lines(&chaos::notes_path(run));
    println!(
        "chaos: seed={seed} secs={secs} grants_checked={} (exclusive {}, shared {}, fast path {}, \
         owner_died {}, killed inside {}) workers_killed={} broker_kills={} broker_stops={} \
         scribbles={scribbles} violations={} (live {}, log {}; {} sections overlapped, {} of them \
         entered with owner_died) owner_deaths_unreported={} \
         workers_exited_by_themselves={} workers_stuck_at_end={} broker_deaths={} notes={}",
        a.grants,
        a.exclusive,
        a.shared,
        a.fast_path,
        a.owner_died,
        a.killed_inside,
        c.workers_killed,
        c.broker_kills,
        c.broker_stops,
        live.len() + a.violations.len(),
        live.len(),
        a.violations.len(),
        a.overlapped_sections,
        a.overlaps_reported_as_owner_death,
        a.owner_death_unreported.len(),
        c.workers_exited,
        c.workers_stuck_at_end,
        c.broker_deaths,
        notes.len(),
    );
    for v in live.iter().take(10) {
        println!("chaos: violation (live): {v}");
    }
    for v in a.violations.iter().take(10) {
        println!("chaos: violation (log): {v}");
    }
    for u in a.owner_death_unreported.iter().take(5) {
        println!("chaos: owner death unreported: {u}");
    }
    let lost = notes
        .iter()
        .filter(|n| n.contains("lost this client's registration"))
        .count();
    println!(
        "chaos: notes: {} in all, {lost} calls failed because forelockd lost the client's \
         registration (a client record freed under a live client)",
        notes.len()
    );
    for n in notes.iter().take(8) {
        let short: String = n.chars().take(240).collect();
        println!("chaos: note: {short}");
    }
    if !broker_alive {
        println!("chaos: forelockd was not running at the end");
    }
    for log in broker_logs {
        let tail: Vec<&str> = log.lines().rev().take(5).collect();
        println!("chaos: forelockd died by itself; last lines: {tail:?}");
    }
    assert!(c.workers_started >= WORKERS as u64);
}
