//! Two (or more) processes contending for one lock: run it twice at once
//! against a running `forelockd`.
//!
//! ```text
//! forelockd &                                  # or: cargo run --release -p forelockd
//! cargo run --release -p forelock --example contend -- 2000 & \
//! cargo run --release -p forelock --example contend -- 2000; wait
//! ```
//!
//! Each run takes `demo:counter` N times and, holding it, adds one to a
//! counter kept in a plain file (read, then write: only the lock keeps the
//! two processes from losing updates). At the end each prints what it saw;
//! the last to finish finds the counter at exactly 2 * N.

use std::io::{Read, Seek, SeekFrom, Write};

fn main() {
    if let Err(e) = run() {
        eprintln!("contend: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let iterations: u64 = std::env::args().nth(1).map_or(Ok(1000), |s| s.parse())?;
    let client = forelock::Client::connect()?;
    let path = client.runtime_dir().join("demo-counter");
    let (mut fast, mut last_token, mut counter) = (0u64, 0u64, 0u64);
    for _ in 0..iterations {
        let guard = client.lock("demo:counter")?;
        assert!(guard.token() > last_token, "fencing tokens only go up");
        last_token = guard.token();
        fast += guard.fast_path() as u64;
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        let mut text = String::new();
        file.read_to_string(&mut text)?;
        counter = text.trim().parse::<u64>().unwrap_or(0) + 1;
        file.seek(SeekFrom::Start(0))?;
        file.set_len(0)?;
        write!(file, "{counter}")?;
        guard.release()?;
    }
    println!(
        "pid {}: {iterations} locks, {fast} on the fast path, last token {last_token}, counter now {counter} (in {})",
        std::process::id(),
        path.display()
    );
    Ok(())
}
