#![allow(dead_code)] // each test file uses part of the support module
//! Support for the CLI's integration tests: a real `forelockd` on a private
//! runtime directory (killed on drop), and the `forelock` binary under test.
//! Every wait is bounded: a test that would hang fails with a message.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Upper bound of any single wait in a test.
pub const PATIENCE: Duration = Duration::from_secs(20);

pub fn cli_exe() -> &'static str {
    env!("CARGO_BIN_EXE_forelock")
}

/// `forelockd`, next to the `forelock` binary (cargo builds both into the
/// same directory when the workspace is built or tested).
pub fn broker_exe() -> PathBuf {
    let path = Path::new(cli_exe()).with_file_name("forelockd");
    assert!(
        path.is_file(),
        "{} is missing: build it first: cargo build -p forelockd (or test the whole \
         workspace: cargo test --workspace)",
        path.display()
    );
    path
}

/// A fresh runtime directory, removed on drop.
pub struct TempDir(pub PathBuf);
impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let dir = std::env::temp_dir().join(format!("flt-{name}-{}-{nanos}", std::process::id()));
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

/// A running `forelockd`, killed (SIGKILL) and reaped on drop.
pub struct Broker {
    pub child: Option<Child>,
    log: Arc<Mutex<Vec<String>>>,
}

impl Broker {
    /// Start a broker on `dir` with `config` (TOML over the defaults) and
    /// wait until it logs that it is ready.
    pub fn start(dir: &Path, config: &str) -> Broker {
        Broker::start_with(dir, config, &[])
    }

    pub fn start_with(dir: &Path, config: &str, env: &[(&str, &str)]) -> Broker {
        let path = dir.join("forelockd-test.toml");
        std::fs::write(&path, config).unwrap();
        let mut child = Command::new(broker_exe())
            .arg("--config")
            .arg(&path)
            .arg("--runtime-dir")
            .arg(dir)
            .env("FORELOCK_LOG", "info")
            .envs(env.iter().copied())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start forelockd");
        let log: Arc<Mutex<Vec<String>>> = Arc::default();
        let (tx, rx) = channel();
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("forelockd ready") {
                    let _ = tx.send(());
                }
                sink.lock().unwrap().push(line);
            }
        });
        if rx.recv_timeout(PATIENCE).is_err() {
            let _ = child.kill();
            panic!(
                "forelockd did not become ready:\n{}",
                log.lock().unwrap().join("\n")
            );
        }
        Broker {
            child: Some(child),
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
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

/// `forelock ARGS --runtime-dir DIR`'s output (bounded wait).
pub fn forelock(dir: &Path, args: &[&str]) -> Output {
    let child = Command::new(cli_exe())
        .args(args)
        .env("FORELOCK_RUNTIME_DIR", dir)
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start forelock");
    wait_output(child)
}

/// Wait for a child's output, killing it if it outlives PATIENCE.
pub fn wait_output(mut child: Child) -> Output {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "forelock did not finish in time; stdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `forelock ... --json`, parsed; panics with stderr if it failed to print.
pub fn json(dir: &Path, args: &[&str]) -> serde_json::Value {
    let out = forelock(dir, args);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "forelock {args:?} printed no JSON ({e}); stderr:\n{}",
            stderr(&out)
        )
    })
}

/// Poll `check` until it holds (bounded by PATIENCE).
pub fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !check() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The row of `forelock locks --json` for `key`, if the key has a slot.
pub fn lock_row(dir: &Path, key: &str) -> Option<serde_json::Value> {
    json(dir, &["locks", "--json"])
        .as_array()
        .expect("an array")
        .iter()
        .find(|row| row["key"] == key)
        .cloned()
}
