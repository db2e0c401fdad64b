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
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Upper bound of any single wait in a test.
pub const PATIENCE: Duration = Duration::from_secs(20);

pub fn broker_exe() -> &'static str {
    env!("CARGO_BIN_EXE_forelockd-under-test")
}
pub fn worker_exe() -> &'static str {
    env!("CARGO_BIN_EXE_fl-worker")
}

/// A fresh runtime directory, removed on drop.
pub struct TempDir(pub PathBuf);
impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let dir = std::env::temp_dir().join(format!("fl-{name}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `forelockd` child.
pub struct Broker {
    pub dir: PathBuf,
    config: PathBuf,
    child: Option<Child>,
    log: Arc<Mutex<Vec<String>>>,
}

impl Broker {
    /// Start a broker on `dir` with `config` (TOML overriding the defaults).
    pub fn start(dir: &Path, config: &str) -> Broker {
        let path = dir.join("forelockd-test.toml");
        std::fs::write(&path, config).unwrap();
        let mut b = Broker {
            dir: dir.into(),
            config: path,
            child: None,
            log: Arc::default(),
        };
        b.spawn();
        b
    }

    fn spawn(&mut self) {
        let mut child = Command::new(broker_exe())
            .arg("--config")
            .arg(&self.config)
            .arg("--runtime-dir")
            .arg(&self.dir)
            .env("FORELOCK_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()
            .expect("start forelockd");
        let (tx, rx) = channel();
        let stderr = child.stderr.take().unwrap();
        let log = self.log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("forelockd ready") {
                    let _ = tx.send(());
                }
                log.lock().unwrap().push(line);
            }
        });
        if rx.recv_timeout(PATIENCE).is_err() {
            let _ = child.kill();
            panic!(
                "forelockd did not become ready:\n{}",
                self.log.lock().unwrap().join("\n")
            );
        }
        self.child = Some(child);
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGKILL the broker and reap it.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// SIGTERM, and the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        // SAFETY: kill with a valid pid and signal has no memory preconditions.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        wait_bounded(&mut c)
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn wait_bounded(c: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(s) = c.try_wait().unwrap() {
            return s;
        }
        if Instant::now() > deadline {
            let _ = c.kill();
            panic!("process {} did not exit in time", c.id());
        }
        std::thread::sleep(Duration::from_millis(10));
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
        let mut child = Command::new(worker_exe())
            .arg("--dir")
            .arg(dir)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start fl-worker");
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

/// The mutual-exclusion check every test uses: worker processes each take
/// `key` `iters` times and, holding it, read-modify-write a counter in a
/// file that only the lock protects, logging `<counter> <token>`.
pub struct Counting {
    counter: PathBuf,
    log: PathBuf,
    dir: PathBuf,
    key: String,
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
            workers: Vec::new(),
        }
    }

    /// Start `workers` more processes of `iters` iterations each.
    pub fn spawn(&mut self, workers: usize, iters: u32) -> &mut Counting {
        for _ in 0..workers {
            let args = [
                "count",
                &self.key,
                "--iters",
                &iters.to_string(),
                "--file",
                self.counter.to_str().unwrap(),
                "--log",
                self.log.to_str().unwrap(),
            ];
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
