#![allow(dead_code)] // each test file uses part of the support module
//! Support for the integration tests in this folder: start a real
//! `forelockd` on a private runtime directory, start client processes
//! (`fl-worker`), read what they say, kill them with SIGKILL.
//!
//! Every wait is bounded (a test that hangs fails with a message instead).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

pub fn broker_exe() -> &'static str {
    env!("CARGO_BIN_EXE_forelockd-under-test")
}
pub fn worker_exe() -> &'static str {
    env!("CARGO_BIN_EXE_fl-worker")
}

pub use forelock_tests::{Broker, PATIENCE, TempDir, wait_bounded};

/// Held by each test of a file whose tests each run many contending
/// processes, so that they run one at a time: nine 8-process tests at once
/// put up to 80 processes on a 2-core machine, each critical section a
/// file read and write, and a CI run beside other load then passed the
/// tests' patience (seen once: 16,000 grants not done in 20 s). What they
/// check (exclusion, tokens, progress) does not need the others beside
/// them.
pub fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    // A test that failed holding it poisoned it; the next still runs.
    ONE.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// `Broker::start(dir, config)`: the broker under test, on `dir`.
pub trait StartBroker {
    fn start(dir: &Path, config: &str) -> Broker;
}

impl StartBroker for Broker {
    fn start(dir: &Path, config: &str) -> Broker {
        Broker::launch(Path::new(broker_exe()), dir, config, &[])
    }
}

/// A running `fl-worker` and its stdout, line by line.
pub struct Worker {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
}

impl Worker {
    pub fn spawn(dir: &Path, args: &[&str]) -> Worker {
        let mut command = Command::new(worker_exe());
        command.arg("--dir").arg(dir).args(args);
        Worker::launch(command)
    }

    /// Start `command` (a client process of the tests) with its stdin and
    /// stdout piped to the returned `Worker`.
    pub fn launch(mut command: Command) -> Worker {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start {:?}: {e}", command.get_program()));
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Worker {
            stdin: child.stdin.take(),
            child,
            lines: rx,
        }
    }

    /// The next line, or a panic naming what was expected.
    pub fn next_line(&mut self, expecting: &str) -> String {
        match self.lines.recv_timeout(PATIENCE) {
            Ok(l) => l,
            Err(RecvTimeoutError::Timeout) => panic!(
                "worker {} said nothing in time (expected {expecting})",
                self.child.id()
            ),
            Err(RecvTimeoutError::Disconnected) => {
                panic!("worker {} exited (expected {expecting})", self.child.id())
            }
        }
    }

    /// A line if one arrives within `wait`.
    pub fn line_within(&mut self, wait: Duration) -> Option<String> {
        self.lines.recv_timeout(wait).ok()
    }

    /// Let a `hold` worker release (closes its stdin).
    pub fn release(&mut self) {
        if let Some(mut s) = self.stdin.take() {
            let _ = s.flush();
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn wait(&mut self) -> std::process::ExitStatus {
        wait_bounded(&mut self.child)
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Parse `HELD <token> <owner_died> <fast>`.
pub fn parse_held(line: &str) -> (u64, bool, bool) {
    let parts: Vec<&str> = line.split(' ').collect();
    assert_eq!(parts[0], "HELD", "expected HELD, got {line:?}");
    (
        parts[1].parse().unwrap(),
        parts[2] == "true",
        parts[3] == "true",
    )
}

/// Waiters queued on `key`, read from the table (0 if the key has no slot).
pub fn waiters(dir: &Path, key: &str) -> u32 {
    with_table(dir, |t| {
        t.lookup(key.as_bytes(), shm_layout::key_hash(key.as_bytes()))
            .and_then(|(s, _)| t.slot(s))
            .map_or(0, |s| s.waiters.load(std::sync::atomic::Ordering::Relaxed))
    })
}

/// Wait until `key` has `n` waiters (bounded).
pub fn wait_for_waiters(dir: &Path, key: &str, n: u32) {
    let deadline = Instant::now() + PATIENCE;
    while waiters(dir, key) < n {
        assert!(Instant::now() < deadline, "{key} never reached {n} waiters");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Run `f` over a read-only view of the table file.
pub fn with_table<T>(dir: &Path, f: impl FnOnce(&shm_layout::table::TableView) -> T) -> T {
    let file = std::fs::File::open(dir.join(shm_layout::TABLE_FILE)).unwrap();
    // SAFETY: a read-only shared mapping; others write it through atomics and
    // the view reads it only through atomics.
    let map = unsafe { memmap2::Mmap::map(&file) }.unwrap();
    // SAFETY: page-aligned, `map.len()` bytes, alive for this call.
    let view = unsafe { shm_layout::table::TableView::new(map.as_ptr(), map.len()) }.unwrap();
    f(&view)
}

/// Run `f` over a writable shared view of the table: the scribbler's view.
pub fn with_table_mut<T>(dir: &Path, f: impl FnOnce(&shm_layout::table::TableView) -> T) -> T {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join(shm_layout::TABLE_FILE))
        .unwrap();
    let map = memmap2::MmapRaw::map_raw(&file).unwrap();
    // SAFETY: a page-aligned shared mapping of `map.len()` bytes that lives
    // for this call; the view reaches it only through atomics.
    let view = unsafe { shm_layout::table::TableView::new(map.as_ptr(), map.len()) }.unwrap();
    f(&view)
}

/// Wake every sleeper on `word` (shared futex), as a scribbler could.
pub fn futex_wake(word: &std::sync::atomic::AtomicU32) {
    // SAFETY: `word` is a live, aligned u32 in a shared mapping; FUTEX_WAKE
    // reads no other argument.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            i32::MAX,
            std::ptr::null::<libc::timespec>(),
            0,
            0,
        )
    };
}

/// The mutual-exclusion check every test uses: worker processes each take
/// `key` `iters` times and, holding it, read-modify-write a counter in a
/// file that only the lock protects, logging `<counter> <token>`.
pub struct Counting {
    counter: PathBuf,
    log: PathBuf,
    dir: PathBuf,
    key: String,
    fifo: bool,
    pub workers: Vec<Worker>,
}

impl Counting {
    /// A counter at 0 in `dir`; no workers yet.
    pub fn new(dir: &Path, key: &str) -> Counting {
        let counter = dir.join(format!("counter-{key}"));
        std::fs::write(&counter, "0").unwrap();
        Counting {
            log: dir.join(format!("tokens-{key}.log")),
            counter,
            dir: dir.into(),
            key: key.into(),
            fifo: false,
            workers: Vec::new(),
        }
    }

    /// Workers wait in the broker's FIFO queue (`Client::set_fifo`), not on
    /// the slot's futexes: for tests of the broker's queue.
    pub fn fifo(mut self) -> Counting {
        self.fifo = true;
        self
    }

    /// Start `workers` more processes of `iters` iterations each.
    pub fn spawn(&mut self, workers: usize, iters: u32) -> &mut Counting {
        for _ in 0..workers {
            let iters = iters.to_string();
            let mut args = vec![
                "count",
                &self.key,
                "--iters",
                &iters,
                "--file",
                self.counter.to_str().unwrap(),
                "--log",
                self.log.to_str().unwrap(),
            ];
            if self.fifo {
                args.push("--fifo");
            }
            self.workers.push(Worker::spawn(&self.dir, &args));
        }
        self
    }

    pub fn value(&self) -> u64 {
        std::fs::read_to_string(&self.counter)
            .unwrap_or_default()
            .trim()
            .parse()
            .unwrap_or(0)
    }

    /// Wait for every worker's DONE, then check that no update was lost or
    /// doubled (the counter is `expected`) and that fencing tokens rose with
    /// the counter.
    pub fn finish(&mut self, expected: u64) {
        for w in &mut self.workers {
            assert_eq!(w.next_line("DONE"), "DONE", "a well-behaved worker failed");
        }
        self.workers.clear();
        assert_eq!(
            self.value(),
            expected,
            "lost or doubled updates: two holders at once"
        );
        let mut rows: Vec<(u64, u64)> = std::fs::read_to_string(&self.log)
            .unwrap()
            .lines()
            .map(|l| {
                let (n, t) = l.split_once(' ').unwrap();
                (n.parse().unwrap(), t.parse().unwrap())
            })
            .collect();
        rows.sort();
        for pair in rows.windows(2) {
            assert!(
                pair[1].1 > pair[0].1,
                "fencing token went backwards: {:?} then {:?}",
                pair[0],
                pair[1]
            );
        }
    }
}
