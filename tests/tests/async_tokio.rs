//! The async calls (feature `tokio`) against a real broker, under a
//! current-thread runtime: a wait that blocked the runtime's only thread
//! would stop the ticker task beside it (and the test would fail or hang).

mod support;
use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;
use support::*;

const CONFIG: &str = "[table]\nslots = 64\nclients = 16\n";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap()
}

#[test]
fn a_waiting_lock_async_leaves_the_runtime_thread_free() {
    let dir = TempDir::new("async-wait");
    let _broker = Broker::start(dir.path(), CONFIG);
    // The holder lets go by itself after 5 s: a lock_async that blocked the
    // thread would then fail the tick check below instead of hanging.
    let mut holder = Worker::spawn(dir.path(), &["hold", "async:key", "--hold-ms", "5000"]);
    let (held_token, _, _) = parse_held(&holder.next_line("HELD"));
    let client = forelock::Client::connect_to(dir.path()).unwrap();
    runtime().block_on(async {
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async {
                let ticks = Rc::new(Cell::new(0u32));
                let ticker = {
                    let ticks = ticks.clone();
                    tokio::task::spawn_local(async move {
                        loop {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                            ticks.set(ticks.get() + 1);
                        }
                    })
                };
                let waiter = {
                    let client = client.clone();
                    tokio::task::spawn_local(async move { client.lock_async("async:key").await })
                };
                tokio::time::sleep(Duration::from_millis(200)).await;
                assert!(
                    !waiter.is_finished(),
                    "granted while another process held it"
                );
                assert!(
                    ticks.get() >= 10,
                    "the runtime's thread stalled while lock_async waited: {} ticks in 200 ms",
                    ticks.get()
                );
                holder.release();
                let guard = tokio::time::timeout(PATIENCE, waiter)
                    .await
                    .expect("lock_async never completed after the release")
                    .unwrap()
                    .unwrap();
                assert!(
                    guard.token() > held_token,
                    "the fencing token went backwards"
                );
                assert!(!guard.previous_owner_died());
                ticker.abort();
            })
            .await;
    });
}

#[test]
fn try_timeout_and_shared_forms_answer_like_the_blocking_ones() {
    let dir = TempDir::new("async-forms");
    let _broker = Broker::start(dir.path(), CONFIG);
    let a = forelock::Client::connect_to(dir.path()).unwrap();
    let b = forelock::Client::connect_to(dir.path()).unwrap();
    runtime().block_on(async {
        let held = a.lock_async("async:forms").await.unwrap();
        assert!(matches!(
            b.try_lock_async("async:forms").await,
            Err(forelock::Error::WouldBlock { .. })
        ));
        assert!(matches!(
            b.lock_timeout_async("async:forms", Duration::from_millis(50))
                .await,
            Err(forelock::Error::Timeout { .. })
        ));
        let first = held.token();
        held.release().unwrap();
        let next = b.lock_timeout_async("async:forms", PATIENCE).await.unwrap();
        assert!(next.token() > first);
        drop(next);

        let reader_a = a.lock_shared_async("async:shared").await.unwrap();
        let reader_b = b.try_lock_shared_async("async:shared").await.unwrap();
        assert!(reader_a.is_shared() && reader_b.is_shared());
        assert!(matches!(
            b.try_lock_async("async:shared").await,
            Err(forelock::Error::WouldBlock { .. })
        ));
        let reader_c = b
            .lock_shared_timeout_async("async:shared", Duration::from_millis(50))
            .await
            .unwrap();
        drop((reader_a, reader_b, reader_c));
        assert!(matches!(
            a.try_lock_async("").await,
            Err(forelock::Error::Key(_))
        ));
    });
}

#[test]
fn a_dropped_lock_async_future_releases_its_late_grant() {
    let dir = TempDir::new("async-drop");
    let _broker = Broker::start(dir.path(), CONFIG);
    let mut holder = Worker::spawn(dir.path(), &["hold", "async:drop"]);
    parse_held(&holder.next_line("HELD"));
    let client = forelock::Client::connect_to(dir.path()).unwrap();
    runtime().block_on(async {
        let gave_up =
            tokio::time::timeout(Duration::from_millis(100), client.lock_async("async:drop")).await;
        assert!(gave_up.is_err(), "granted while another process held it");
        // The dropped request is still queued: the release hands it the
        // lock, which its task must give back at once.
        holder.release();
        let next = client
            .lock_timeout_async("async:drop", PATIENCE)
            .await
            .expect("the dropped waiter's grant was never released");
        assert!(!next.previous_owner_died());
    });
}
