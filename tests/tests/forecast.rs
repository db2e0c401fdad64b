//! The forecaster's side of the broker with real processes: scores prepare
//! keys before anyone asks; nonsense or stale scores, and a forecaster that
//! dies, change nothing about correctness.

mod support;
use std::time::{Duration, Instant};
use support::*;

const FORECAST: &str = "[allocator]\npolicy = \"forecast\"\nkeep_alive_ms = 200\nthreshold = 0.5\n";

/// Map the score file and run `f` on it.
fn with_scores<T>(
    dir: &std::path::Path,
    f: impl FnOnce(&shm_layout::scores::ScoresView) -> T,
) -> T {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join(shm_layout::SCORES_FILE))
        .unwrap();
    // SAFETY: a shared mapping of the score file, written through the view's
    // atomics only.
    let map = unsafe { memmap2::MmapMut::map_mut(&file) }.unwrap();
    // SAFETY: page-aligned, `map.len()` bytes, alive for this call.
    let view = unsafe { shm_layout::scores::ScoresView::new(map.as_ptr(), map.len()) }.unwrap();
    f(&view)
}

/// A running `forelock-predictor` on `dir`, killed when dropped (so a failed
/// assertion does not leave it running).
struct Predictor(std::process::Child);

impl Predictor {
    fn start(dir: &std::path::Path) -> Predictor {
        let predictor = env!("CARGO_BIN_EXE_forelock-predictor-under-test");
        Predictor(
            std::process::Command::new(predictor)
                .arg("--runtime-dir")
                .arg(dir)
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        )
    }

    /// Kill it (SIGKILL) and reap it.
    fn stop(mut self) {
        self.kill_and_reap();
    }

    fn kill_and_reap(&mut self) {
        // Already exited and reaped (stop, then drop): nothing to do.
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

impl Drop for Predictor {
    fn drop(&mut self) {
        self.kill_and_reap();
    }
}

fn prepared(dir: &std::path::Path, key: &str) -> bool {
    with_table(dir, |t| {
        t.lookup(key.as_bytes(), shm_layout::key_hash(key.as_bytes()))
            .is_some_and(|(_, w)| w.is_prepared())
    })
}

fn indexed(dir: &std::path::Path, key: &str) -> bool {
    with_table(dir, |t| {
        t.lookup(key.as_bytes(), shm_layout::key_hash(key.as_bytes()))
            .is_some()
    })
}

/// Take `key` once and wait until the broker reclaimed its slot.
fn use_once_and_let_it_go_cold(dir: &std::path::Path, key: &str) {
    let mut w = Worker::spawn(dir, &["hold", key, "--hold-ms", "0"]);
    parse_held(&w.next_line("HELD"));
    w.wait();
    let deadline = Instant::now() + PATIENCE;
    while indexed(dir, key) {
        assert!(Instant::now() < deadline, "{key} was never reclaimed");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_key_scored_above_the_threshold_is_prepared_before_it_is_requested() {
    let dir = TempDir::new("forecast");
    let _b = Broker::start(dir.path(), FORECAST);
    use_once_and_let_it_go_cold(dir.path(), "hot");
    let hash = shm_layout::key_hash(b"hot");
    let deadline = Instant::now() + PATIENCE;
    while !prepared(dir.path(), "hot") {
        assert!(
            Instant::now() < deadline,
            "a fresh score of 0.9 never prepared the key"
        );
        with_scores(dir.path(), |s| {
            s.write("test", 500, shm_layout::monotonic_ns(), [(hash, 0.9)])
        });
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut w = Worker::spawn(dir.path(), &["hold", "hot", "--hold-ms", "0"]);
    let (_, _, fast) = parse_held(&w.next_line("HELD"));
    assert!(fast, "the prepared key is granted by the client's own CAS");
}

#[test]
fn stale_or_low_scores_prepare_nothing() {
    let dir = TempDir::new("forecast-stale");
    let _b = Broker::start(dir.path(), FORECAST);
    use_once_and_let_it_go_cold(dir.path(), "cold");
    let hash = shm_layout::key_hash(b"cold");
    // A score written 10 s ago (a dead forecaster), and a fresh low one.
    let old = shm_layout::monotonic_ns().saturating_sub(10_000_000_000);
    with_scores(dir.path(), |s| s.write("test", 500, old, [(hash, 1.0)]));
    std::thread::sleep(Duration::from_millis(300));
    assert!(!indexed(dir.path(), "cold"), "stale scores are ignored");
    for _ in 0..15 {
        with_scores(dir.path(), |s| {
            s.write("test", 500, shm_layout::monotonic_ns(), [(hash, 0.1)])
        });
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !indexed(dir.path(), "cold"),
        "a score under the threshold prepares nothing"
    );
}

#[test]
fn nonsense_scores_and_a_scribbled_score_file_do_not_disturb_locking() {
    let dir = TempDir::new("forecast-nonsense");
    let mut b = Broker::start(dir.path(), FORECAST);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (dir, stop) = (dir.path().to_path_buf(), stop.clone());
        std::thread::spawn(move || {
            let mut round = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                round += 1;
                let garbage = [
                    (shm_layout::key_hash(b"k"), f32::NAN),
                    (round, f32::INFINITY),
                    (round + 1, -3.0),
                    (round + 2, 1e30),
                ];
                with_scores(&dir, |s| {
                    s.write("nonsense", 500, shm_layout::monotonic_ns(), garbage)
                });
                // And raw bytes over the whole file, header included.
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .open(dir.join(shm_layout::SCORES_FILE))
                    .unwrap();
                let len = file.metadata().unwrap().len();
                use std::os::unix::fs::FileExt;
                let at = round.wrapping_mul(2654435761) % len;
                let _ = file.write_at(&round.to_ne_bytes(), at.min(len - 8));
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    let mut counting = Counting::new(dir.path(), "k");
    counting.spawn(3, 300);
    counting.finish(900);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    assert!(b.is_running(), "forelockd died:\n{}", b.log());
}

#[test]
fn the_predictor_process_attaches_writes_scores_and_its_death_changes_nothing() {
    let dir = TempDir::new("forecast-live");
    let mut b = Broker::start(dir.path(), FORECAST);
    let p = Predictor::start(dir.path());
    let mut counting = Counting::new(dir.path(), "k");
    counting.spawn(1, 500).finish(500);
    let deadline = Instant::now() + PATIENCE;
    loop {
        let fresh = with_scores(dir.path(), |s| {
            let h = s.header();
            let age = shm_layout::monotonic_ns()
                .saturating_sub(h.written_at_ns.load(std::sync::atomic::Ordering::Relaxed));
            h.writer_pid.load(std::sync::atomic::Ordering::Relaxed) == p.0.id()
                && age < 1_000_000_000
        });
        if fresh {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the predictor never wrote a score table"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // It scores itself on its samples of the keys it saw requested, once
    // their windows close (500 ms).
    counting.spawn(1, 300).finish(800);
    let score = loop {
        let score = with_scores(dir.path(), |s| s.self_score());
        if score.samples > 0 {
            break score;
        }
        assert!(
            Instant::now() < deadline,
            "the predictor never published a self-score"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!((0.0..=1.0).contains(&score.brier), "{score:?}");
    assert!((0.0..=1.0).contains(&score.brier_baseline), "{score:?}");
    p.stop();
    counting.spawn(1, 200).finish(1000);
    assert!(b.is_running());
}

/// Contention preparation counters in the table header: (prepared, used).
fn contention_prepared(dir: &std::path::Path) -> (u64, u64) {
    with_table(dir, |t| {
        let s = &t.header().stats;
        (
            s.contention_prepared
                .load(std::sync::atomic::Ordering::Relaxed),
            s.contention_prepared_hits
                .load(std::sync::atomic::Ordering::Relaxed),
        )
    })
}

#[test]
fn the_predictor_forecasts_contention_and_the_broker_prepares_the_contended_key() {
    let dir = TempDir::new("forecast-contention");
    let mut b = Broker::start(
        dir.path(),
        &format!("{FORECAST}contention_threshold = 0.5\ncontention_waiters = 4\n"),
    );
    let p = Predictor::start(dir.path());
    // Two workers take the same key over and over: requests queue behind the
    // holder, the predictor sees `Contended` events and forecasts more, the
    // broker prepares the key's queue, and later waiters find it prepared.
    // The broker's queue is the FIFO mode's: by default waiters on a hot
    // prepared key sleep on the slot's futexes and never queue there.
    let mut counting = Counting::new(dir.path(), "contended").fifo();
    let mut expected = 0;
    let deadline = Instant::now() + PATIENCE;
    loop {
        counting.spawn(2, 300);
        expected += 600;
        counting.finish(expected);
        let (prepared, used) = contention_prepared(dir.path());
        if prepared > 0 && used > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "contention was never prepared and used: {prepared} prepared, {used} used; \
             queued so far {}",
            with_table(dir.path(), |t| t
                .header()
                .stats
                .contended
                .load(std::sync::atomic::Ordering::Relaxed))
        );
    }
    p.stop();
    assert!(b.is_running(), "forelockd died:\n{}", b.log());
}
