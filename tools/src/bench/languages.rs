//! `forelock bench --languages`: a prepared key's acquire+release from each
//! language forelock serves, beside the language's own file locks, in one run
//! against one broker.
//!
//! Rows: Rust (`forelock::Client`, in this process), C (the C ABI: the
//! example `client/capi/examples/bench.c`, compiled with gcc against the
//! `libforelock_capi` built beside this executable), Python (the package,
//! if it is installed: `client/python/bench/prepared.py`, which also times
//! `fcntl.flock` and the `filelock` package). Each figure is the best of
//! three batch rounds (ns per operation over a loop, no clock read per
//! operation). A language whose toolchain or package is missing gets a row
//! that says what is missing and how to get it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::Context;

use crate::bench::support::{TempDir, start_forelockd};

/// The source tree this binary was built from (the C and Python benches
/// live there).
const SOURCE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

/// One row: what was measured and its ns per operation, or why not.
struct Row {
    name: String,
    ns: Result<f64, String>,
}

/// Run the language rows with `iters` operations per round, and print them.
pub fn run(iters: u64) -> anyhow::Result<()> {
    let broker = super::forelock::broker_binary().context(
        "no forelockd beside this executable nor on PATH: build it (cargo build -p forelockd)",
    )?;
    let dir = TempDir::new("languages")?;
    let config = "[allocator]\npolicy = \"keep-alive\"\nkeep_alive_ms = 60000\n";
    let (_broker, runtime_dir) = start_forelockd(&broker, dir.path(), config)?;
    let mut rows = vec![Row {
        name: "forelock (Rust)".into(),
        ns: rust(&runtime_dir, iters).map_err(|e| format!("{e:#}")),
    }];
    rows.push(Row {
        name: "forelock (C ABI)".into(),
        ns: c(&runtime_dir, dir.path(), iters),
    });
    rows.extend(python(&runtime_dir, iters));
    print(&rows);
    Ok(())
}

/// Prepared acquire+release through the Rust client, ns per operation.
fn rust(runtime_dir: &Path, iters: u64) -> anyhow::Result<f64> {
    let client = forelock::Client::connect_to(runtime_dir)?;
    for _ in 0..2000 {
        // Let the broker prepare the key (keep-alive after its first use).
        drop(client.lock("bench:rust")?);
        std::thread::sleep(std::time::Duration::from_micros(100));
    }
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let start = Instant::now();
        for _ in 0..iters {
            drop(client.lock("bench:rust")?);
        }
        best = best.min(start.elapsed().as_nanos() as f64 / iters as f64);
    }
    Ok(best)
}

/// The C ABI's row: compile the example bench and run it.
fn c(runtime_dir: &Path, scratch: &Path, iters: u64) -> Result<f64, String> {
    let libdir = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
        .filter(|d| d.join("libforelock_capi.so").is_file())
        .ok_or("no libforelock_capi.so beside this executable: cargo build -p forelock-capi")?;
    let exe = scratch.join("bench-c");
    let built = Command::new("gcc")
        .args(["-O2", "-I"])
        .arg(format!("{SOURCE}/client/capi/include"))
        .arg(format!("{SOURCE}/client/capi/examples/bench.c"))
        .arg("-L")
        .arg(&libdir)
        .arg("-lforelock_capi")
        .arg(format!("-Wl,-rpath,{}", libdir.display()))
        .arg("-o")
        .arg(&exe)
        .output()
        .map_err(|e| format!("gcc not found ({e}): apt-get install gcc"))?;
    if !built.status.success() {
        return Err(format!(
            "gcc failed: {}",
            String::from_utf8_lossy(&built.stderr).trim()
        ));
    }
    let out = run_for_output(Command::new(&exe).arg(runtime_dir).arg(iters.to_string()))?;
    parse_ns(&out, "forelock (C ABI)").ok_or_else(|| format!("unexpected output: {out}"))
}

/// The Python rows: forelock's package, fcntl.flock and filelock.
fn python(runtime_dir: &Path, iters: u64) -> Vec<Row> {
    let script = PathBuf::from(format!("{SOURCE}/client/python/bench/prepared.py"));
    let out = run_for_output(
        Command::new("python3")
            .arg(&script)
            .arg(runtime_dir)
            .arg((iters / 10).max(1000).to_string()),
    );
    let names = [
        ("forelock (Python, lock().release())", "forelock (Python)"),
        ("forelock (Python, with lock():)", "forelock (Python, with)"),
        ("fcntl.flock (same fd)", "fcntl.flock (Python)"),
        ("filelock.FileLock", "filelock (Python)"),
    ];
    match out {
        Err(why) => vec![Row {
            name: "forelock (Python)".into(),
            ns: Err(format!(
                "{why} (install the package: pip install ./client/python, and filelock)"
            )),
        }],
        Ok(out) => names
            .iter()
            .map(|(label, name)| Row {
                name: (*name).into(),
                ns: parse_ns(&out, label).ok_or_else(|| "not in the script's output".into()),
            })
            .collect(),
    }
}

fn run_for_output(command: &mut Command) -> Result<String, String> {
    let out = command
        .output()
        .map_err(|e| format!("cannot run it: {e}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(format!(
            "it failed: {}",
            err.lines().last().unwrap_or("").trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The figure on the line that starts with `label`: `<label> <ns> ns/op`.
fn parse_ns(out: &str, label: &str) -> Option<f64> {
    let line = out.lines().find(|l| l.starts_with(label))?;
    let rest = line[label.len()..].split_whitespace().next()?;
    rest.parse().ok()
}

fn print(rows: &[Row]) {
    let rust = rows[0].ns.as_ref().ok().copied();
    println!("prepared key, acquire+release, best of 3 batch rounds (ns per operation)");
    println!("{:<28} {:>12} {:>10}", "language", "ns/op", "vs Rust");
    for row in rows {
        match (&row.ns, rust) {
            (Ok(ns), Some(r)) => println!("{:<28} {:>12.0} {:>9.1}x", row.name, ns, ns / r),
            (Ok(ns), None) => println!("{:<28} {:>12.0} {:>10}", row.name, ns, "-"),
            (Err(why), _) => println!("{:<28} {:>12} {why}", row.name, "n/a"),
        }
    }
    let find = |name: &str| {
        rows.iter()
            .find(|r| r.name == name)
            .and_then(|r| r.ns.as_ref().ok().copied())
    };
    if let (Some(py), Some(fl)) = (find("forelock (Python)"), find("filelock (Python)")) {
        println!(
            "forelock from Python is {:.0}x faster than the filelock package",
            fl / py
        );
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn figures_are_read_from_the_line_of_their_label() {
        let out = "fast path taken: True\nfcntl.flock (same fd)               749 ns/op   1.4x forelock\n";
        assert_eq!(super::parse_ns(out, "fcntl.flock (same fd)"), Some(749.0));
        assert_eq!(super::parse_ns(out, "filelock.FileLock"), None);
        assert_eq!(
            super::parse_ns("forelock (C ABI) 125 ns/op\n", "forelock (C ABI)"),
            Some(125.0)
        );
    }
}
