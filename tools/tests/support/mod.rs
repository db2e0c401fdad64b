#![allow(dead_code)] // each test file uses part of the support module
//! Support for the CLI's integration tests: a real `forelockd` on a private
//! runtime directory (killed on drop), and the `forelock` binary under test.
//! Every wait is bounded: a test that would hang fails with a message.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

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

#[allow(unused_imports)] // as dead_code above: each test file uses part of it
pub use forelock_tests::{Broker, PATIENCE, TempDir};

/// `Broker::start(dir, config)` and `Broker::start_with(dir, config, env)`:
/// the `forelockd` beside the CLI, on `dir`.
pub trait StartBroker {
    fn start(dir: &Path, config: &str) -> Broker;
    fn start_with(dir: &Path, config: &str, env: &[(&str, &str)]) -> Broker;
}

impl StartBroker for Broker {
    fn start(dir: &Path, config: &str) -> Broker {
        Broker::start_with(dir, config, &[])
    }
    fn start_with(dir: &Path, config: &str, env: &[(&str, &str)]) -> Broker {
        Broker::launch(&broker_exe(), dir, config, env)
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
