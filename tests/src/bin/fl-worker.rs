//! A client process for the integration tests. Each subcommand prints one line
//! per event on stdout (flushed), so the test can follow it:
//! `HELD <token> <owner_died> <fast>`, `GOT <id> <token>`, `ERR <kind> <message>`,
//! `DONE`.

use clap::{Parser, Subcommand};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
struct Args {
    #[arg(long)]
    dir: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Take KEY `iters` times; each time read-modify-write a counter in FILE
    /// (not atomic: only mutual exclusion keeps it right) and append
    /// `<counter> <token>` to LOG.
    Count {
        key: String,
        #[arg(long)]
        iters: u32,
        #[arg(long)]
        file: PathBuf,
        #[arg(long)]
        log: PathBuf,
        /// Wait in the broker's FIFO queue instead of on the slot's futexes.
        #[arg(long)]
        fifo: bool,
    },
    /// Take KEY, print HELD, hold until stdin closes or `hold_ms` passes, release.
    Hold {
        key: String,
        #[arg(long)]
        shared: bool,
        #[arg(long = "try")]
        try_only: bool,
        #[arg(long)]
        timeout_ms: Option<u64>,
        #[arg(long)]
        hold_ms: Option<u64>,
        /// Append `<id>` to this file once granted (FIFO tests).
        #[arg(long)]
        order_file: Option<PathBuf>,
        #[arg(long, default_value = "0")]
        id: u32,
        /// Wait in the broker's FIFO queue instead of on the slot's futexes
        /// (tests of the broker's queue).
        #[arg(long)]
        fifo: bool,
    },
    /// Write random bytes over the table's slots, index and client records for
    /// `secs` seconds.
    Scribble {
        #[arg(long)]
        secs: u64,
    },
}

fn say(line: String) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn kind(e: &forelock::Error) -> &'static str {
    match e {
        forelock::Error::WouldBlock { .. } => "WouldBlock",
        forelock::Error::Timeout { .. } => "Timeout",
        forelock::Error::BrokerNotRunning { .. } => "BrokerNotRunning",
        _ => "Other",
    }
}

fn main() {
    let args = Args::parse();
    if let Cmd::Scribble { secs } = args.cmd {
        scribble(&args.dir, secs);
        return;
    }
    let client = match forelock::Client::connect_to(&args.dir) {
        Ok(c) => c,
        Err(e) => {
            say(format!("ERR {} {e}", kind(&e)));
            std::process::exit(2);
        }
    };
    match args.cmd {
        Cmd::Count {
            key,
            iters,
            file,
            log,
            fifo,
        } => {
            client.set_fifo(fifo);
            let mut log = std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(log)
                .unwrap();
            for _ in 0..iters {
                let guard = match client.lock(&key) {
                    Ok(g) => g,
                    Err(e) => {
                        say(format!("ERR {} {e}", kind(&e)));
                        std::process::exit(3);
                    }
                };
                let mut f = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&file)
                    .unwrap();
                let mut text = String::new();
                f.read_to_string(&mut text).unwrap();
                let n: u64 = text.trim().parse().unwrap_or(0) + 1;
                std::thread::yield_now();
                f.seek(SeekFrom::Start(0)).unwrap();
                f.set_len(0).unwrap();
                write!(f, "{n}").unwrap();
                writeln!(log, "{n} {}", guard.token()).unwrap();
                drop(guard);
            }
            say("DONE".into());
        }
        Cmd::Hold {
            key,
            shared,
            try_only,
            timeout_ms,
            hold_ms,
            order_file,
            id,
            fifo,
        } => {
            client.set_fifo(fifo);
            let result = match (shared, try_only, timeout_ms) {
                (false, true, _) => client.try_lock(&key),
                (true, true, _) => client.try_lock_shared(&key),
                (false, false, Some(t)) => client.lock_timeout(&key, Duration::from_millis(t)),
                (true, false, Some(t)) => {
                    client.lock_shared_timeout(&key, Duration::from_millis(t))
                }
                (false, false, None) => client.lock(&key),
                (true, false, None) => client.lock_shared(&key),
            };
            let guard = match result {
                Ok(g) => g,
                Err(e) => {
                    say(format!("ERR {} {e}", kind(&e)));
                    return;
                }
            };
            if let Some(path) = order_file {
                let mut f = std::fs::OpenOptions::new()
                    .append(true)
                    .create(true)
                    .open(path)
                    .unwrap();
                writeln!(f, "{id}").unwrap();
            }
            say(format!(
                "HELD {} {} {}",
                guard.token(),
                guard.previous_owner_died(),
                guard.fast_path()
            ));
            match hold_ms {
                Some(ms) => std::thread::sleep(Duration::from_millis(ms)),
                None => {
                    let mut sink = Vec::new();
                    let _ = std::io::stdin().read_to_end(&mut sink);
                }
            }
            match guard.release() {
                Ok(()) => say("RELEASED".into()),
                Err(e) => say(format!("ERR {} {e}", kind(&e))),
            }
        }
        Cmd::Scribble { .. } => unreachable!(),
    }
}

fn scribble(dir: &std::path::Path, secs: u64) {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join(shm_layout::TABLE_FILE))
        .unwrap();
    // SAFETY: a shared mapping of the table file; this process writes it
    // racily on purpose (that is the test), through volatile byte writes.
    let mut map = unsafe { memmap2::MmapMut::map_mut(&file) }.unwrap();
    let len = map.len();
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    let mut writes = 0u64;
    while std::time::Instant::now() < deadline {
        for _ in 0..1000 {
            // Past the header: a broker validates the header only at start.
            let at = 512 + rand::random_range(0..len - 512);
            let p = map[at..].as_mut_ptr();
            // SAFETY: `p` points inside the mapping (at < len).
            unsafe { std::ptr::write_volatile(p, rand::random::<u8>()) };
            writes += 1;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    say(format!("SCRIBBLED {writes}"));
}
