//! `forelock live-replay` on a tiny synthetic trace against real brokers,
//! predictor and worker processes. Behaviour only (every row replayed, counts
//! add up, the JSON parses), never timing.

mod support;
use std::process::Command;
use support::*;

/// 3 clients over about one second, 7 keys shared among them, a third of the
/// rows shared-mode. Each client holds at most one key at a time (2 ms holds,
/// 10 ms apart), so the replayed sessions cannot deadlock and every row must
/// be granted.
fn synthetic_trace(path: &std::path::Path) {
    let mut rows = Vec::new();
    for client in 0..3u64 {
        for i in 0..60u64 {
            let ts = i * 15_000 + client * 4_000;
            let key = format!("syn:{}", (i + client) % 7);
            let mode = if i % 3 == 0 { "S" } else { "X" };
            rows.push((ts, client, key, mode, 2_000u64));
        }
    }
    rows.sort_by_key(|row| row.0);
    let mut text = String::from("ts_us,client,key,mode,hold_us\n");
    for (ts, client, key, mode, hold) in rows {
        text.push_str(&format!("{ts},{client},{key},{mode},{hold}\n"));
    }
    std::fs::write(path, text).unwrap();
}

fn predictor_exe() -> std::path::PathBuf {
    let path = std::path::Path::new(cli_exe()).with_file_name("forelock-predictor");
    assert!(
        path.is_file(),
        "{} is missing: build it first: cargo build -p forelock-predictor -p forelockd",
        path.display()
    );
    path
}

#[test]
fn every_row_is_replayed_in_every_mode_and_the_counts_add_up() {
    broker_exe();
    predictor_exe();
    let dir = TempDir::new("live-replay");
    let trace = dir.path().join("syn.csv");
    synthetic_trace(&trace);
    let output = Command::new(cli_exe())
        .arg("live-replay")
        .arg(&trace)
        .args(["--seconds", "5", "--json", "--timeout-ms", "10000"])
        .args(["--modes", "forecast,keep-alive,none"])
        .output()
        .expect("run forelock live-replay");
    assert!(
        output.status.success(),
        "live-replay failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("--json prints JSON");
    assert_eq!(report["rows"], 180);
    assert_eq!(report["clients"], 3);
    assert_eq!(report["keys_distinct"], 7);
    let modes = report["modes"].as_array().expect("modes");
    let names: Vec<&str> = modes.iter().map(|m| m["mode"].as_str().unwrap()).collect();
    assert_eq!(names, ["forecast", "keep-alive", "none"]);
    for mode in modes {
        let get = |field: &str| {
            mode[field]
                .as_u64()
                .unwrap_or_else(|| panic!("{field} in {mode}"))
        };
        let name = mode["mode"].as_str().unwrap();
        assert_eq!(mode["prediction"], name == "forecast", "{mode}");
        assert_eq!(get("rows"), 180, "{mode}");
        // Nobody holds two keys, so nothing times out, fails or is skipped.
        assert_eq!(get("timeouts"), 0, "{mode}");
        assert_eq!(get("errors"), 0, "{mode}");
        assert_eq!(get("release_errors"), 0, "{mode}");
        assert_eq!(get("skipped"), 0, "{mode}");
        assert_eq!(get("granted"), 180, "{mode}");
        assert_eq!(get("granted_exclusive"), 120, "{mode}");
        assert_eq!(get("granted_shared"), 60, "{mode}");
        assert!(get("fast_path") <= get("granted_exclusive"), "{mode}");
        assert!(get("late_rows") <= get("rows"), "{mode}");
        assert!(get("p50_ns") <= get("p99_ns"), "{mode}");
        if name == "none" {
            assert_eq!(get("fast_path"), 0, "policy none never prepares: {mode}");
        }
    }
}

#[test]
fn a_missing_broker_is_named_with_the_build_command() {
    let dir = TempDir::new("live-replay-alone");
    let alone = dir.path().join("forelock");
    std::fs::copy(cli_exe(), &alone).unwrap();
    let trace = dir.path().join("syn.csv");
    synthetic_trace(&trace);
    let output = Command::new(&alone)
        .arg("live-replay")
        .arg(&trace)
        .output()
        .expect("run the copied forelock");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("forelockd"), "{stderr}");
    assert!(stderr.contains("cargo build"), "{stderr}");
}
