//! A quick end-to-end check against a running `forelockd`:
//! `forelockd --runtime-dir /tmp/fl & FORELOCK_RUNTIME_DIR=/tmp/fl cargo run -p forelock --example smoke`.
//!
//! Two clients in one process (as two processes would): exclusion under
//! contention with strictly increasing tokens, try-lock, timeout, shared mode,
//! ping, and whether repeated use of a key reaches the fast path.

use forelock::{Client, Error};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

fn main() -> Result<(), Error> {
    let a = Client::connect()?;
    let b = Client::connect()?;
    println!("clients {} and {}", a.client_index(), b.client_index());
    println!("ping {:?}", a.ping()?);

    // try-lock and timeout against a holder in the other client.
    let held = a.lock("smoke:busy")?;
    println!(
        "held smoke:busy token {} fast {}",
        held.token(),
        held.fast_path()
    );
    match b.try_lock("smoke:busy") {
        Err(Error::WouldBlock { .. }) => println!("try_lock: would block (ok)"),
        other => panic!("try_lock on a held key: {other:?}"),
    }
    match b.lock_timeout("smoke:busy", Duration::from_millis(50)) {
        Err(Error::Timeout { waited, .. }) => {
            println!("lock_timeout: timed out after {waited:?} (ok)")
        }
        other => panic!("lock_timeout on a held key: {other:?}"),
    }
    held.release()?;

    // Shared mode: two readers at once, a writer refused.
    let r1 = a.lock_shared("smoke:shared")?;
    let r2 = b.lock_shared("smoke:shared")?;
    assert!(r1.is_shared() && r2.is_shared());
    assert!(matches!(
        b.try_lock("smoke:shared"),
        Err(Error::WouldBlock { .. })
    ));
    drop((r1, r2));
    println!("shared: two readers, writer refused (ok)");

    // Contention: threads of both clients increment a plain counter under
    // the lock; tokens must strictly increase in grant order.
    let counter = AtomicU64::new(0);
    let last_token = AtomicU64::new(0);
    let fast = AtomicU64::new(0);
    let per_thread = 2000;
    let start = Instant::now();
    std::thread::scope(|scope| {
        for t in 0..4 {
            let client = if t % 2 == 0 { &a } else { &b };
            let (counter, last_token, fast) = (&counter, &last_token, &fast);
            scope.spawn(move || {
                for _ in 0..per_thread {
                    let guard = client.lock("smoke:counter").expect("lock");
                    let previous = last_token.swap(guard.token(), Ordering::Relaxed);
                    assert!(guard.token() > previous, "token went backwards");
                    // Non-atomic read-modify-write, protected by the lock.
                    let v = counter.load(Ordering::Relaxed);
                    std::hint::spin_loop();
                    counter.store(v + 1, Ordering::Relaxed);
                    if guard.fast_path() {
                        fast.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    assert_eq!(counter.load(Ordering::Relaxed), 4 * per_thread);
    println!(
        "contention: {} grants in {:?}, {} on the fast path, counter exact (ok)",
        4 * per_thread,
        start.elapsed(),
        fast.load(Ordering::Relaxed)
    );

    // Uncontended reuse of one key: does it become prepared?
    let mut fast_hits = 0;
    for _ in 0..1000 {
        let g = a.lock("smoke:hot")?;
        fast_hits += g.fast_path() as u32;
    }
    println!("uncontended: {fast_hits}/1000 on the fast path");
    let rounds = 200_000u32;
    let start = Instant::now();
    let mut fast_hits = 0;
    for _ in 0..rounds {
        let g = a.lock("smoke:hot")?;
        fast_hits += g.fast_path() as u32;
    }
    println!(
        "uncontended lock+release: {:.1} ns each, {fast_hits}/{rounds} on the fast path",
        start.elapsed().as_nanos() as f64 / rounds as f64
    );
    Ok(())
}
