//! The multi-host tests' client (tests/tests/cluster.rs): connects to a
//! host's broker through its runtime directory and loops: lock KEY, do the
//! checked read-modify-write of the shared resource with the grant's token
//! (`forelock_tests::cluster::fenced`), release, and report what the
//! release returned to the checker. A `Lost` release is expected under
//! faults and counted.
//!
//! Lines on stdout (flushed): `INSIDE <holder> <token>` when an entry was
//! accepted, `STALE <holder> <token>` when refused, `OUTCOME <holder>
//! <released|lost|error>`, and at the end `DONE grants=.. accepted=..
//! stale=.. released=.. lost=.. release_errors=.. lock_errors=..
//! timeouts=..`. It stops after `--iters` grants, or when stdin closes
//! (then within the lock timeout, or after a grace period if its broker is
//! stopped).

use clap::Parser;
use forelock_tests::cluster::fenced::{Entry, Outcome, Resource, Write};
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

#[derive(Parser)]
struct Args {
    /// The host's runtime directory.
    #[arg(long)]
    dir: PathBuf,
    /// The host's name, the first part of holder names (`h1/<pid>/<n>`).
    #[arg(long)]
    host: String,
    #[arg(long)]
    key: String,
    /// The shared resource file (made by `fl-fenced init` or the test).
    #[arg(long)]
    resource: PathBuf,
    /// Time inside the resource, between the read and the write.
    #[arg(long, default_value = "2")]
    hold_ms: u64,
    /// Pause between a release and the next lock.
    #[arg(long, default_value = "5")]
    pause_ms: u64,
    /// Stop after this many grants; 0 = until stdin closes.
    #[arg(long, default_value = "0")]
    iters: u64,
    #[arg(long, default_value = "2000")]
    lock_timeout_ms: u64,
    /// Stay inside until stdin closes (instead of `hold_ms`): the tests'
    /// long holder, released when the test says.
    #[arg(long)]
    hold_until_eof: bool,
    /// After stdin closes, exit anyway this long later (a worker whose
    /// broker is stopped may be blocked in a call).
    #[arg(long, default_value = "5000")]
    grace_ms: u64,
}

/// The counts this worker prints at the end.
#[derive(Default)]
struct Counts {
    grants: AtomicU64,
    accepted: AtomicU64,
    stale: AtomicU64,
    released: AtomicU64,
    lost: AtomicU64,
    release_errors: AtomicU64,
    lock_errors: AtomicU64,
    timeouts: AtomicU64,
}

impl Counts {
    fn line(&self, stuck: bool) -> String {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        format!(
            "DONE grants={} accepted={} stale={} released={} lost={} release_errors={} \
             lock_errors={} timeouts={} stuck={}",
            g(&self.grants),
            g(&self.accepted),
            g(&self.stale),
            g(&self.released),
            g(&self.lost),
            g(&self.release_errors),
            g(&self.lock_errors),
            g(&self.timeouts),
            u8::from(stuck)
        )
    }
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// A release that returned `Lost`: the hold was fenced (docs/cluster.md,
/// "What a local holder sees").
fn is_lost(e: &forelock::Error) -> bool {
    matches!(e, forelock::Error::Lost { .. })
}

/// An error after which this client is no use: connect a new one.
fn needs_new_client(e: &forelock::Error) -> bool {
    matches!(
        e,
        forelock::Error::BrokerNotRunning { .. }
            | forelock::Error::BrokerRestarted { .. }
            | forelock::Error::Io(_)
            | forelock::Error::Protocol { .. }
    )
}

static STOP: AtomicBool = AtomicBool::new(false);

fn main() {
    let args = Args::parse();
    let counts: &'static Counts = Box::leak(Box::default());
    let grace = Duration::from_millis(args.grace_ms);
    // Stdin closing asks for a stop; a worker whose broker is stopped may be
    // blocked in a call, so it gets a grace period and then exits anyway.
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
        STOP.store(true, Ordering::Relaxed);
        std::thread::sleep(grace);
        say(&counts.line(true));
        std::process::exit(0);
    });
    let resource = Resource::open(&args.resource);
    let mut client: Option<forelock::Client> = None;
    let mut seq = 0u64;
    while !STOP.load(Ordering::Relaxed)
        && (args.iters == 0 || counts.grants.load(Ordering::Relaxed) < args.iters)
    {
        if client.is_none() {
            match forelock::Client::connect_to(&args.dir) {
                Ok(c) => client = Some(c),
                Err(_) => {
                    counts.lock_errors.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(200));
                    continue;
                }
            }
        }
        let Some(c) = &client else { continue };
        seq += 1;
        let reconnect = one_round(c, &args, &resource, counts, seq);
        if reconnect {
            client = None;
        }
        std::thread::sleep(Duration::from_millis(args.pause_ms));
    }
    say(&counts.line(false));
}

/// One lock, checked read-modify-write and release, holder `<host>/<pid>/<seq>`.
/// Returns whether the client must be replaced (its broker went away).
fn one_round(
    c: &forelock::Client,
    args: &Args,
    resource: &Resource,
    counts: &Counts,
    seq: u64,
) -> bool {
    let guard = match c.lock_timeout(&args.key, Duration::from_millis(args.lock_timeout_ms)) {
        Ok(g) => g,
        Err(forelock::Error::Timeout { .. }) => {
            counts.timeouts.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        Err(e) => {
            counts.lock_errors.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(100));
            return needs_new_client(&e);
        }
    };
    counts.grants.fetch_add(1, Ordering::Relaxed);
    let holder = format!("{}/{}/{seq}", args.host, std::process::id());
    let token = guard.token();
    match resource.enter(&holder, token).expect("resource: enter") {
        Entry::Accepted { value } => {
            say(&format!("INSIDE {holder} {token}"));
            if args.hold_until_eof {
                while !STOP.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(10));
                }
            } else {
                std::thread::sleep(Duration::from_millis(args.hold_ms));
            }
            match resource
                .write(&holder, token, value + 1)
                .expect("resource: write")
            {
                Write::Accepted => counts.accepted.fetch_add(1, Ordering::Relaxed),
                Write::Stale { .. } => counts.stale.fetch_add(1, Ordering::Relaxed),
            };
            resource.leave(&holder).expect("resource: leave");
        }
        Entry::Stale { .. } => {
            say(&format!("STALE {holder} {token}"));
            counts.stale.fetch_add(1, Ordering::Relaxed);
        }
    }
    let mut reconnect = false;
    let outcome = match guard.release() {
        Ok(()) => {
            counts.released.fetch_add(1, Ordering::Relaxed);
            Outcome::Released
        }
        Err(e) if is_lost(&e) => {
            counts.lost.fetch_add(1, Ordering::Relaxed);
            Outcome::Lost
        }
        Err(e) => {
            counts.release_errors.fetch_add(1, Ordering::Relaxed);
            reconnect = needs_new_client(&e);
            Outcome::Error
        }
    };
    resource
        .outcome(&holder, outcome)
        .expect("resource: outcome");
    say(&format!("OUTCOME {holder} {}", outcome.name()));
    reconnect
}
