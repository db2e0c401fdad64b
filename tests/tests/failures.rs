//! Failures with real processes: SIGKILL of a holder, SIGKILL of the broker
//! under load and restart, a client scribbling over the table.

mod support;
use std::time::Duration;
use support::*;

const KEEP_ALIVE: &str = "[allocator]\npolicy = \"keep-alive\"\nkeep_alive_ms = 2000\n";
const NO_PREPARE: &str = "[allocator]\npolicy = \"none\"\n";

fn killed_holder_is_released(config: &str, warm_first: bool) {
    let dir = TempDir::new("killholder");
    let _b = Broker::start(dir.path(), config);
    if warm_first {
        let mut w = Worker::spawn(dir.path(), &["hold", "k", "--hold-ms", "0"]);
        parse_held(&w.next_line("HELD"));
        w.wait();
    }
    let mut holder = Worker::spawn(dir.path(), &["hold", "k"]);
    let (t1, _, fast) = parse_held(&holder.next_line("HELD"));
    assert_eq!(fast, warm_first, "the warmed key is taken on the fast path");
    let mut waiter = Worker::spawn(dir.path(), &["hold", "k", "--hold-ms", "0", "--fifo"]);
    wait_for_waiters(dir.path(), "k", 1);
    holder.kill9();
    let (t2, owner_died, _) = parse_held(&waiter.next_line("HELD"));
    assert!(
        owner_died,
        "the next holder is told the previous owner died"
    );
    assert!(t2 > t1);
}

#[test]
fn sigkill_of_a_fast_path_holder_releases_its_lock_to_the_waiter() {
    killed_holder_is_released(KEEP_ALIVE, true);
}

#[test]
fn sigkill_of_a_broker_granted_holder_releases_its_lock_to_the_waiter() {
    killed_holder_is_released(NO_PREPARE, false);
}

#[test]
fn a_lock_held_across_a_broker_sigkill_stays_held_and_tokens_keep_rising() {
    let dir = TempDir::new("restart-held");
    let mut b = Broker::start(dir.path(), KEEP_ALIVE);
    let mut holder = Worker::spawn(dir.path(), &["hold", "k"]);
    let (t1, _, _) = parse_held(&holder.next_line("HELD"));
    b.restart();
    assert!(b.log().contains("adopted"), "{}", b.log());
    let mut t = Worker::spawn(dir.path(), &["hold", "k", "--try"]);
    assert!(
        t.next_line("ERR").starts_with("ERR WouldBlock"),
        "still held after the restart"
    );
    let mut waiter = Worker::spawn(dir.path(), &["hold", "k", "--hold-ms", "0", "--fifo"]);
    wait_for_waiters(dir.path(), "k", 1);
    holder.release();
    assert_eq!(
        holder.next_line("RELEASED"),
        "RELEASED",
        "the holder releases through the new broker"
    );
    let (t2, died, _) = parse_held(&waiter.next_line("HELD"));
    assert!(!died);
    assert!(t2 > t1);
}

/// One round trip for an unprepared key (issue 12): the broker grants a
/// fresh key as a fast-path hold, and the holder's release is one CAS in
/// the table. The case that sank the first unacknowledged release: the
/// broker is killed while the key is held, the holder releases while no
/// broker runs, and the restarted broker must find the key free, not held
/// for good.
#[test]
fn an_unprepared_key_released_while_the_broker_is_dead_is_free_after_its_restart() {
    let dir = TempDir::new("fast-grant-kill");
    let mut b = Broker::start(dir.path(), KEEP_ALIVE);
    let mut holder = Worker::spawn(dir.path(), &["hold", "fresh"]);
    let (t1, _, fast) = parse_held(&holder.next_line("HELD"));
    assert!(!fast, "granted by the broker, not by the holder's own CAS");
    let word = with_table(dir.path(), |t| {
        t.lookup(b"fresh", shm_layout::key_hash(b"fresh"))
            .unwrap()
            .1
    });
    assert!(
        word.is_prepared() && word.exclusive_owner().is_some(),
        "the broker's grant is a fast-path hold: {word:?}"
    );
    b.kill9();
    holder.release();
    assert_eq!(
        holder.next_line("RELEASED"),
        "RELEASED",
        "the release needs no broker"
    );
    holder.wait();
    b.restart_stopped();
    let mut next = Worker::spawn(dir.path(), &["hold", "fresh", "--try", "--hold-ms", "0"]);
    let (t2, died, _) = parse_held(&next.next_line("HELD"));
    assert!(!died, "the holder released; it did not die holding");
    assert!(t2 > t1);
}

#[test]
fn counting_goes_on_correctly_through_a_broker_sigkill_and_restart() {
    let dir = TempDir::new("restart-load");
    let mut b = Broker::start(dir.path(), KEEP_ALIVE);
    let mut counting = Counting::new(dir.path(), "k");
    counting.spawn(3, 400);
    // Let them get going, then kill the broker mid-stream and start a new one.
    let deadline = std::time::Instant::now() + PATIENCE;
    while counting.value() < 50 {
        assert!(
            std::time::Instant::now() < deadline,
            "workers made no progress"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    b.kill9();
    std::thread::sleep(Duration::from_millis(100));
    b.restart();
    // No update lost and none doubled across the restart; tokens kept rising.
    counting.finish(3 * 400);
}

/// A process that connected while the broker was being killed failed at
/// once (its handshake reset, or nobody listening on the socket left
/// behind), where a call of a connected client waits for the restart: the
/// broker-restart test failed that way 1 run in 4 once its clients started
/// faster (runtime dirs on tmpfs). Connecting now waits for the restart too.
#[test]
fn a_client_connecting_while_the_broker_restarts_waits_for_it() {
    let dir = TempDir::new("connect-restart");
    let mut b = Broker::start(dir.path(), KEEP_ALIVE);
    b.kill9();
    assert!(
        dir.path().join("broker.sock").exists(),
        "a killed broker leaves its socket"
    );
    let path = dir.path().to_owned();
    let connecting = std::thread::spawn(move || forelock::Client::connect_to(&path));
    std::thread::sleep(Duration::from_millis(300));
    b.restart_stopped();
    let client = connecting
        .join()
        .unwrap()
        .expect("connected once the broker was back");
    let guard = client.lock("k").expect("a lock from the restarted broker");
    guard.release().unwrap();
}

#[test]
fn a_client_scribbling_on_the_table_does_not_crash_the_broker_or_break_its_grants() {
    // With preparation off, every grant is the broker's: scribbled lock words
    // must not make it grant the counter's key to two workers.
    let dir = TempDir::new("scribble");
    let mut b = Broker::start(dir.path(), NO_PREPARE);
    let mut scribbler = Worker::spawn(dir.path(), &["scribble", "--secs", "3"]);
    Counting::new(dir.path(), "k").spawn(3, 300).finish(900);
    assert!(scribbler.next_line("SCRIBBLED").starts_with("SCRIBBLED"));
    assert!(b.is_running(), "forelockd died:\n{}", b.log());
    let mut w = Worker::spawn(dir.path(), &["hold", "other", "--hold-ms", "0"]);
    parse_held(&w.next_line("HELD"));
    assert!(
        b.terminate().success(),
        "clean exit on SIGTERM after the scribbling"
    );
}

#[test]
fn sigterm_stops_the_broker_cleanly() {
    let dir = TempDir::new("sigterm");
    let mut b = Broker::start(dir.path(), KEEP_ALIVE);
    assert!(b.terminate().success());
}
