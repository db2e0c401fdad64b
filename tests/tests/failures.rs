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
    let mut waiter = Worker::spawn(dir.path(), &["hold", "k", "--hold-ms", "0"]);
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
    let mut waiter = Worker::spawn(dir.path(), &["hold", "k", "--hold-ms", "0"]);
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

#[test]
fn counting_goes_on_correctly_through_a_broker_sigkill_and_restart() {
    let dir = TempDir::new("restart-load");
    let mut b = Broker::start(dir.path(), KEEP_ALIVE);
    let counter = dir.path().join("counter");
    let log = dir.path().join("tokens.log");
    std::fs::write(&counter, "0").unwrap();
    let iters = 400u32;
    let mut ws: Vec<Worker> = (0..3)
        .map(|_| {
            Worker::spawn(
                dir.path(),
                &[
                    "count",
                    "k",
                    "--iters",
                    &iters.to_string(),
                    "--file",
                    counter.to_str().unwrap(),
                    "--log",
                    log.to_str().unwrap(),
                ],
            )
        })
        .collect();
    // Let them get going, then kill the broker mid-stream and start a new one.
    let deadline = std::time::Instant::now() + PATIENCE;
    while std::fs::read_to_string(&counter)
        .unwrap_or_default()
        .trim()
        .parse::<u64>()
        .unwrap_or(0)
        < 50
    {
        assert!(
            std::time::Instant::now() < deadline,
            "workers made no progress"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    b.kill9();
    std::thread::sleep(Duration::from_millis(100));
    b.restart();
    for w in &mut ws {
        assert_eq!(w.next_line("DONE"), "DONE");
    }
    let total: u64 = std::fs::read_to_string(&counter)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(
        total,
        3 * iters as u64,
        "no update lost and none doubled across the restart"
    );
    let mut rows: Vec<(u64, u64)> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| {
            let (n, t) = l.split_once(' ').unwrap();
            (n.parse().unwrap(), t.parse().unwrap())
        })
        .collect();
    rows.sort();
    for pair in rows.windows(2) {
        assert!(
            pair[1].1 > pair[0].1,
            "token went backwards across the restart: {:?} then {:?}",
            pair[0],
            pair[1]
        );
    }
}

#[test]
fn a_client_scribbling_on_the_table_does_not_crash_the_broker_or_break_its_grants() {
    // With preparation off, every grant is the broker's: scribbled lock words
    // must not make it grant the counter's key to two workers.
    let dir = TempDir::new("scribble");
    let mut b = Broker::start(dir.path(), NO_PREPARE);
    let counter = dir.path().join("counter");
    let log = dir.path().join("tokens.log");
    std::fs::write(&counter, "0").unwrap();
    let mut scribbler = Worker::spawn(dir.path(), &["scribble", "--secs", "3"]);
    let mut ws: Vec<Worker> = (0..3)
        .map(|_| {
            Worker::spawn(
                dir.path(),
                &[
                    "count",
                    "k",
                    "--iters",
                    "300",
                    "--file",
                    counter.to_str().unwrap(),
                    "--log",
                    log.to_str().unwrap(),
                ],
            )
        })
        .collect();
    for w in &mut ws {
        let line = w.next_line("DONE");
        assert_eq!(
            line, "DONE",
            "a well-behaved client failed while another scribbled"
        );
    }
    assert!(scribbler.next_line("SCRIBBLED").starts_with("SCRIBBLED"));
    assert!(b.is_running(), "forelockd died:\n{}", b.log());
    let total: u64 = std::fs::read_to_string(&counter)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(total, 900, "the broker granted a lock twice");
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
