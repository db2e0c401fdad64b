//! Regression tests for the issue "Never two holders": each test is named
//! after what broke, and each failed against the broker and client before
//! the grant engine was rebuilt (the failure each one showed is quoted in its
//! doc comment).
//!
//! The test process is itself a client where it needs to be blocked inside a
//! library call while something else happens; other holders are `fl-worker`
//! processes, so that each has its own pid (liveness is per process).

mod support;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use support::*;

const KEEP_ALIVE: &str = "[allocator]\npolicy = \"keep-alive\"\nkeep_alive_ms = 60000\n";
const NO_PREPARE: &str = "[allocator]\npolicy = \"none\"\n";

/// A try-lock from another process: `Some(token)` if it got the lock.
fn try_from_another_process(dir: &std::path::Path, key: &str) -> Option<u64> {
    let mut w = Worker::spawn(dir, &["hold", key, "--try", "--hold-ms", "0"]);
    let line = w.next_line("HELD or ERR");
    if line.starts_with("HELD") {
        Some(parse_held(&line).0)
    } else {
        assert!(line.starts_with("ERR WouldBlock"), "{line}");
        None
    }
}

/// Defect 1. A fast-path hold that the broker took over (because someone
/// queued) lived only in the broker's memory; a restarted broker rewrote the
/// word as free and granted the key again while its holder was inside.
/// Before the fix: the queued waiter printed HELD while the first holder
/// still held the key.
#[test]
fn a_restart_remembers_a_fast_path_hold_that_the_broker_took_over() {
    let dir = TempDir::new("takeover-restart");
    let mut b = Broker::start(dir.path(), KEEP_ALIVE);
    let mut warm = Worker::spawn(dir.path(), &["hold", "k", "--hold-ms", "0"]);
    parse_held(&warm.next_line("HELD"));
    warm.wait();
    let mut holder = Worker::spawn(dir.path(), &["hold", "k"]);
    let (t1, _, fast) = parse_held(&holder.next_line("HELD"));
    assert!(fast, "the warmed key is taken on the fast path");
    let mut waiter = Worker::spawn(dir.path(), &["hold", "k", "--hold-ms", "0", "--fifo"]);
    wait_for_waiters(dir.path(), "k", 1);
    b.restart();
    assert_eq!(
        waiter.line_within(Duration::from_millis(1500)),
        None,
        "the waiter was granted k while the fast-path holder still held it"
    );
    assert_eq!(try_from_another_process(dir.path(), "k"), None);
    holder.release();
    assert_eq!(holder.next_line("RELEASED"), "RELEASED");
    let (t2, died, _) = parse_held(&waiter.next_line("HELD"));
    assert!(t2 > t1, "tokens rise across the restart: {t1} then {t2}");
    assert!(!died, "the holder released it itself");
}

/// Defect 2. A live client was taken for dead when its last connection
/// closed. One store of CELL_ABANDONED into the wait cell of a client that
/// holds `k` and waits for `q`, and a futex wake, made it drop its
/// connection; the broker then released `k` and another process got it.
/// Before the fix: the try-lock from another process got `k`.
#[test]
fn a_scribbled_wait_cell_cannot_make_the_broker_release_a_live_clients_locks() {
    let dir = TempDir::new("cell-scribble");
    let _b = Broker::start(dir.path(), NO_PREPARE);
    let mut q_holder = Worker::spawn(dir.path(), &["hold", "q"]);
    parse_held(&q_holder.next_line("HELD"));
    let client = forelock::Client::connect_to(dir.path()).unwrap();
    let index = client.client_index();
    let k = client.lock("k").unwrap();
    std::thread::scope(|s| {
        let waiting = s.spawn(|| client.lock_timeout("q", Duration::from_secs(4)).is_ok());
        wait_for_waiters(dir.path(), "q", 1);
        // The scribbler: every wait cell of the victim's record that is
        // waiting is marked abandoned and woken.
        with_table_mut(dir.path(), |t| {
            let rec = t.client(index).unwrap();
            for cell in &rec.cells {
                if cell.state.load(Ordering::Relaxed) == shm_layout::table::CELL_WAITING {
                    cell.state
                        .store(shm_layout::table::CELL_ABANDONED, Ordering::Relaxed);
                    futex_wake(&cell.state);
                }
            }
        });
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(
            try_from_another_process(dir.path(), "k"),
            None,
            "k was granted to another process while this live client held it"
        );
        q_holder.release();
        assert!(
            waiting.join().unwrap(),
            "the wait for q still ends in a grant"
        );
    });
    k.release().unwrap();
}

/// Defect 4. A hand-off refused because the head waiter already held its
/// maximum of broker-granted locks stopped the dispatch: the key stayed free
/// with a waiter queued behind the refused one. Before the fix: the second
/// waiter never got the lock.
#[test]
fn a_refused_hand_off_does_not_stall_the_queue() {
    let dir = TempDir::new("refused-handoff");
    let _b = Broker::start(dir.path(), NO_PREPARE);
    let mut holder = Worker::spawn(dir.path(), &["hold", "k"]);
    parse_held(&holder.next_line("HELD"));
    let client = forelock::Client::connect_to(dir.path()).unwrap();
    let held: Vec<_> = (0..shm_layout::table::BROKER_HOLDS)
        .map(|i| client.lock(format!("full-{i}")).unwrap())
        .collect();
    std::thread::scope(|s| {
        let refused = s.spawn(|| client.lock_timeout("k", Duration::from_secs(8)));
        wait_for_waiters(dir.path(), "k", 1);
        let mut second = Worker::spawn(dir.path(), &["hold", "k", "--hold-ms", "0"]);
        wait_for_waiters(dir.path(), "k", 2);
        holder.release();
        let line = second.line_within(Duration::from_secs(5));
        assert!(
            line.as_deref().is_some_and(|l| l.starts_with("HELD")),
            "the waiter behind a refused hand-off never got the free key: {line:?}"
        );
        match refused.join().unwrap() {
            Err(forelock::Error::TooManyHolds { .. }) => {}
            other => panic!("the full client is refused with TooManyHolds: {other:?}"),
        }
    });
    drop(held);
}

/// Defect 7. The token floor lived in client-writable memory and was trusted
/// upward: one scribbled value near u64::MAX pinned every later token at
/// u64::MAX, across restarts. Before the fix: two grants of a fresh key after
/// the restart had the same token (u64::MAX).
#[test]
fn a_scribbled_token_floor_cannot_pin_tokens_at_the_maximum() {
    let dir = TempDir::new("floor-scribble");
    let mut b = Broker::start(dir.path(), NO_PREPARE);
    let mut w = Worker::spawn(dir.path(), &["hold", "warm", "--hold-ms", "0"]);
    parse_held(&w.next_line("HELD"));
    with_table_mut(dir.path(), |t| {
        t.header()
            .token_floor
            .store(u64::MAX - 1, Ordering::Relaxed);
        for s in 0..t.geometry().slot_count {
            t.slot(s)
                .unwrap()
                .token_base
                .store(u64::MAX - 1, Ordering::Relaxed);
        }
    });
    b.restart();
    let mut last = 0u64;
    for key in ["fresh", "fresh", "fresh", "warm", "warm"] {
        let mut w = Worker::spawn(dir.path(), &["hold", key, "--hold-ms", "0"]);
        let (t, _, _) = parse_held(&w.next_line("HELD"));
        assert!(t < u64::MAX - 1, "token {t} came from the scribbled floor");
        if key == "warm" && last != 0 {
            assert!(t > last, "tokens of warm must rise: {last} then {t}");
        }
        if key == "warm" {
            last = t;
        }
    }
}

/// Defect 8: a pending owner-died flag was lost when its slot was evicted.
/// Before the fix: the next holder of the key was not told that the previous
/// one died holding it.
#[test]
fn an_owner_died_flag_survives_the_eviction_of_its_slot() {
    let dir = TempDir::new("died-evicted");
    let _b = Broker::start(
        dir.path(),
        "[table]\nslots = 2\n[allocator]\npolicy = \"none\"\n",
    );
    let mut holder = Worker::spawn(dir.path(), &["hold", "k"]);
    parse_held(&holder.next_line("HELD"));
    holder.kill9();
    // Wait until the broker saw the death (the key is free again).
    let deadline = Instant::now() + PATIENCE;
    while with_table(dir.path(), |t| {
        t.lookup(b"k", shm_layout::key_hash(b"k"))
            .is_some_and(|(_, w)| !w.owner_died())
    }) {
        assert!(
            Instant::now() < deadline,
            "the holder's death was never seen"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    for key in ["x", "y", "z"] {
        let mut w = Worker::spawn(dir.path(), &["hold", key, "--hold-ms", "0"]);
        parse_held(&w.next_line("HELD"));
    }
    let mut next = Worker::spawn(dir.path(), &["hold", "k", "--hold-ms", "0"]);
    let (_, died, _) = parse_held(&next.next_line("HELD"));
    assert!(died, "the next holder of k is told its previous owner died");
}

/// Defect 8: a release that failed because the broker was down for more
/// than the client's reconnect window was dropped, and the lock stayed held
/// until the process exited. Before the fix: nobody else could take the key
/// after the broker came back.
#[test]
fn a_release_while_the_broker_is_down_is_delivered_when_it_returns() {
    let dir = TempDir::new("release-later");
    let mut b = Broker::start(dir.path(), NO_PREPARE);
    let client = forelock::Client::connect_to(dir.path()).unwrap();
    let guard = client.lock("k").unwrap();
    b.kill9();
    let started = Instant::now();
    drop(guard); // fails after the reconnect window: the broker is down
    assert!(started.elapsed() >= Duration::from_secs(4));
    b.restart_stopped();
    let deadline = Instant::now() + PATIENCE;
    let token = AtomicU64::new(0);
    while token.load(Ordering::Relaxed) == 0 {
        assert!(
            Instant::now() < deadline,
            "k stayed held after its holder released it"
        );
        if let Some(t) = try_from_another_process(dir.path(), "k") {
            token.store(t, Ordering::Relaxed);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(client);
}
