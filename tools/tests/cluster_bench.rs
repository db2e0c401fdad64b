//! `forelock bench --cluster --quick` end to end: it starts its own etcd and
//! three brokers with `[cluster]`, and prints every row with no error.
//! Behaviour only, never timing. Skips when etcd is not installed, unless
//! FORELOCK_REQUIRE_CLUSTER is set (CI), where a missing etcd fails.

#[allow(unused_imports)] // the shared support module re-exports more than this test uses
mod support;

use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;
use support::*;

/// The quick run takes seconds; a loaded machine gets much more.
const BOUND: Duration = Duration::from_secs(180);

#[test]
fn the_cluster_bench_prints_every_row_and_no_error() {
    if !forelock_tests::etcd::etcd_installed() {
        return;
    }
    broker_exe();
    let child = Command::new(cli_exe())
        .args(["bench", "--cluster", "--quick"])
        .env_remove("RUST_BACKTRACE")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start forelock bench --cluster");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(BOUND) {
        Ok(out) => out.expect("forelock bench --cluster output"),
        Err(_) => {
            // SAFETY: kill(2) on the child this test started; it reads no memory.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("forelock bench --cluster --quick did not finish within {BOUND:?}");
        }
    };
    let (text, errors) = (stdout(&out), stderr(&out));
    assert!(
        out.status.success(),
        "bench --cluster failed ({}):\n{text}\n{errors}",
        out.status
    );
    for row in [
        "global key, node grant held here",
        "local key, prepared",
        "local key, unprepared",
        "global key, first acquire (node grant)",
        "global key, first acquire + release",
        "etcd Lock RPC",
        "etcd Lock + Unlock RPCs",
        "etcd get",
        "etcd put",
        "handover a <-> b",
        "one key, 3 hosts x 2 clients",
        "errors: 0",
    ] {
        assert!(text.contains(row), "no row {row:?} in:\n{text}");
    }
    assert!(!text.contains("error:"), "an error in:\n{text}");
}
