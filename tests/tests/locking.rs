//! Locking between real processes: mutual exclusion, FIFO, shared mode,
//! try-lock and timeout. Behaviour only, never timing.

mod support;
use std::time::Duration;
use support::*;

const KEEP_ALIVE: &str = "[allocator]\npolicy = \"keep-alive\"\nkeep_alive_ms = 2000\n";
const NO_PREPARE: &str = "[allocator]\npolicy = \"none\"\n";

#[test]
fn four_processes_contending_never_overlap_and_tokens_increase() {
    let dir = TempDir::new("mutex");
    let _b = Broker::start(dir.path(), KEEP_ALIVE);
    Counting::new(dir.path(), "k").spawn(4, 300).finish(4 * 300);
}

#[test]
fn mutual_exclusion_holds_through_the_broker_alone() {
    let dir = TempDir::new("mutex-slow");
    let _b = Broker::start(dir.path(), NO_PREPARE);
    Counting::new(dir.path(), "k").spawn(3, 200).finish(3 * 200);
}

#[test]
fn a_prepared_key_is_granted_on_the_fast_path() {
    let dir = TempDir::new("fast");
    let _b = Broker::start(dir.path(), KEEP_ALIVE);
    let mut first = Worker::spawn(dir.path(), &["hold", "k", "--hold-ms", "0"]);
    let (_, _, fast) = parse_held(&first.next_line("HELD"));
    assert!(!fast, "an unknown key goes through the broker");
    assert_eq!(first.next_line("RELEASED"), "RELEASED");
    let mut second = Worker::spawn(dir.path(), &["hold", "k", "--hold-ms", "0"]);
    let (_, _, fast) = parse_held(&second.next_line("HELD"));
    assert!(fast, "the key stayed prepared after its release: one CAS");
}

#[test]
fn waiters_get_the_lock_in_the_order_they_asked() {
    let dir = TempDir::new("fifo");
    let _b = Broker::start(dir.path(), KEEP_ALIVE);
    let order = dir.path().join("order");
    let order_s = order.to_str().unwrap();
    let mut holder = Worker::spawn(dir.path(), &["hold", "k"]);
    parse_held(&holder.next_line("HELD"));
    let mut waiters_list = Vec::new();
    for id in 1..=4 {
        let w = Worker::spawn(
            dir.path(),
            &[
                "hold",
                "k",
                "--hold-ms",
                "20",
                "--order-file",
                order_s,
                "--id",
                &id.to_string(),
                // The broker's queue is FIFO; the contended path is not.
                "--fifo",
            ],
        );
        waiters_list.push(w);
        wait_for_waiters(dir.path(), "k", id);
    }
    holder.release();
    for w in &mut waiters_list {
        parse_held(&w.next_line("HELD"));
        assert_eq!(w.next_line("RELEASED"), "RELEASED");
    }
    let got: Vec<String> = std::fs::read_to_string(&order)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(got, ["1", "2", "3", "4"]);
}

#[test]
fn shared_holders_share_and_a_writer_waits_for_all_of_them() {
    let dir = TempDir::new("shared");
    let _b = Broker::start(dir.path(), KEEP_ALIVE);
    let mut r1 = Worker::spawn(dir.path(), &["hold", "k", "--shared"]);
    let mut r2 = Worker::spawn(dir.path(), &["hold", "k", "--shared"]);
    parse_held(&r1.next_line("HELD"));
    parse_held(&r2.next_line("HELD"));
    let mut try_writer = Worker::spawn(dir.path(), &["hold", "k", "--try"]);
    assert!(try_writer.next_line("ERR").starts_with("ERR WouldBlock"));
    let mut writer = Worker::spawn(dir.path(), &["hold", "k", "--hold-ms", "0"]);
    wait_for_waiters(dir.path(), "k", 1);
    r1.release();
    assert_eq!(r1.next_line("RELEASED"), "RELEASED");
    assert!(
        writer.line_within(Duration::from_millis(200)).is_none(),
        "the writer must wait for the second reader"
    );
    r2.release();
    parse_held(&writer.next_line("HELD"));
}

#[test]
fn try_lock_and_timeout_fail_clearly_while_the_key_is_held() {
    let dir = TempDir::new("try");
    let _b = Broker::start(dir.path(), KEEP_ALIVE);
    let mut holder = Worker::spawn(dir.path(), &["hold", "k"]);
    parse_held(&holder.next_line("HELD"));
    let mut t = Worker::spawn(dir.path(), &["hold", "k", "--try"]);
    assert!(t.next_line("ERR").starts_with("ERR WouldBlock"));
    let mut t = Worker::spawn(dir.path(), &["hold", "k", "--timeout-ms", "150"]);
    assert!(t.next_line("ERR").starts_with("ERR Timeout"));
    assert_eq!(
        waiters(dir.path(), "k"),
        0,
        "a timed-out waiter leaves the queue"
    );
    holder.release();
    let mut t = Worker::spawn(
        dir.path(),
        &["hold", "k", "--timeout-ms", "5000", "--hold-ms", "0"],
    );
    parse_held(&t.next_line("HELD"));
}

#[test]
fn a_client_without_a_broker_is_told_where_it_looked() {
    let dir = TempDir::new("nobroker");
    let mut w = Worker::spawn(dir.path(), &["hold", "k"]);
    let line = w.next_line("ERR");
    assert!(line.contains(dir.path().to_str().unwrap()), "{line}");
    assert!(line.contains("forelockd"), "{line}");
}
