//! What contention preparation saves the broker: the CPU time of queueing the
//! FIRST waiter of a key whose slot was just placed, with and without
//! `LockManager::prepare_contention` before it.
//!
//! `cargo run --release -p forelockd --example contention_prep -- [ROUNDS]`
//!
//! Each round places the key in a fresh slot (the previous one is evicted, so
//! its queue has no capacity), lets client A take it, and times client B's
//! queueing `acquire` (the broker-side work of "found the key held and
//! queued"), then the release that hands the lock to B. Rounds alternate
//! between an unprepared slot and one prepared for contention, so drift on a
//! shared machine hits both alike. Only the lock manager runs: no sockets, no
//! io_uring, no futex (the waker does nothing), so a difference in the queueing
//! step is not hidden under the ~40 us of a real hand-off between processes.

use forelockd::config::Policy;
use forelockd::ledger::Ledger;
use forelockd::locks::{ConnId, Limits, LockManager, Waker};
use shm_layout::events::{EventsHeader, EventsView, events_file_size, init_events};
use shm_layout::key_hash;
use shm_layout::sync::shm::AtomicU32;
use shm_layout::table::{Geometry, Header, TableView, init_header};
use shm_layout::wire::Response;
use std::time::Instant;

/// A 64-aligned, zeroed heap buffer standing in for a mapping.
struct Buf {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl Buf {
    fn new(len: usize) -> Buf {
        let layout = std::alloc::Layout::from_size_align(len, 64).expect("valid layout");
        // SAFETY: the layout has a non-zero size (every file has a header).
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "out of memory");
        Buf { ptr, layout }
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout, freed once.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

/// Keeps the last answer (the hand-off's grant); wakes nobody.
struct Quiet(Option<Response>);
impl Waker for Quiet {
    fn answer(&mut self, _conn: ConnId, response: Response) {
        self.0 = Some(response);
    }
    fn wake(&mut self, cell: &AtomicU32) {
        std::hint::black_box(cell);
    }
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    sorted[((sorted.len() - 1) as f64 * p) as usize]
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("ROUNDS is a number"))
        .unwrap_or(200_000);
    // Half the rounds go to each case, and a percentile needs a sample.
    assert!(
        rounds >= 2,
        "ROUNDS must be at least 2 (one round per case)"
    );
    let geometry = Geometry::new(64, 8).expect("a valid geometry");
    let table_buf = Buf::new(geometry.file_size);
    // SAFETY: the buffer is 64-aligned, `file_size` bytes, zeroed, and only
    // reached through this reference until the view below is made.
    init_header(unsafe { &mut *(table_buf.ptr as *mut Header) }, &geometry);
    let events_len = events_file_size(9, 1024);
    let events_buf = Buf::new(events_len);
    // SAFETY: as for the table buffer.
    init_events(
        unsafe { &mut *(events_buf.ptr as *mut EventsHeader) },
        9,
        1024,
    );
    // SAFETY:
    // - 64-aligned and `file_size` bytes (Buf::new);
    // - the buffer outlives the view (both live to the end of main, the view
    //   declared later, so dropped first);
    // - nobody else writes it.
    let table = unsafe { TableView::new(table_buf.ptr, geometry.file_size) }.expect("valid table");
    // SAFETY: as for the table view.
    let events = unsafe { EventsView::new(events_buf.ptr, events_len) }.expect("valid events");
    let mut waker = Quiet(None);
    let g = table.geometry();
    let mut m = LockManager::adopt(
        &table,
        Ledger::on_heap(g.slot_count, g.client_count),
        Policy::Forecast,
        Limits::for_table(g.client_count),
        1,
        0,
        |_, _| true,
        &mut waker,
    );
    let register = |m: &mut LockManager, pid| match m.hello(&table, pid, 0, 1, None, 0) {
        Ok(forelockd::locks::Registered::New { client }) => client,
        other => panic!("registration: {other:?}"),
    };
    let (a, b) = (register(&mut m, 1), register(&mut m, 2));
    let key = b"bench:contended";
    let hash = key_hash(key);
    let mut queue_ns = [Vec::with_capacity(rounds), Vec::with_capacity(rounds)];
    let mut handoff_ns = [Vec::with_capacity(rounds), Vec::with_capacity(rounds)];
    for round in 0..rounds + 1000 {
        let prepared = round % 2 == 1;
        if prepared {
            assert!(m.prepare_contention(&table, &events, hash, 8));
        }
        let Response::Granted {
            slot, token: ta, ..
        } = m.acquire(&table, &events, a, 1, 1, 1, key, false, true)
        else {
            panic!("A's acquire is granted");
        };
        let start = Instant::now();
        let queued = m.acquire(&table, &events, b, 2, 2, 2, key, false, true);
        let queued_at = Instant::now();
        assert!(matches!(queued, Response::Queued { .. }), "{queued:?}");
        let released = m.release(&table, a, slot, ta, &mut waker);
        let handed_at = Instant::now();
        assert_eq!(released, Response::Released);
        // B was handed the lock: release it and free the slot for the next round.
        let Some(Response::Granted { token: token_b, .. }) = waker.0.take() else {
            panic!("the release hands the lock to B");
        };
        assert_eq!(
            m.release(&table, b, slot, token_b, &mut waker),
            Response::Released
        );
        assert!(m.evict(&table, &events, slot), "the idle slot is freed");
        if round >= 1000 {
            // The first 1000 rounds warm caches and the allocator.
            let i = usize::from(prepared);
            queue_ns[i].push((queued_at - start).as_nanos() as u64);
            handoff_ns[i].push((handed_at - queued_at).as_nanos() as u64);
        }
    }
    println!("{rounds} rounds, each on a freshly placed slot; lock manager only (no I/O)");
    println!(
        "{:<34} {:>8} {:>8} {:>8} {:>9}",
        "step", "p50 ns", "p99 ns", "p99.9 ns", "mean ns"
    );
    let [queue_unprepared, queue_prepared] = queue_ns;
    let [handoff_unprepared, handoff_prepared] = handoff_ns;
    for (name, mut samples) in [
        ("queue first waiter, unprepared", queue_unprepared),
        ("queue first waiter, prepared", queue_prepared),
        ("hand-off to it, unprepared", handoff_unprepared),
        ("hand-off to it, prepared", handoff_prepared),
    ] {
        samples.sort_unstable();
        let mean = samples.iter().sum::<u64>() as f64 / samples.len() as f64;
        println!(
            "{name:<34} {:>8} {:>8} {:>8} {:>9.0}",
            percentile(&samples, 0.5),
            percentile(&samples, 0.99),
            percentile(&samples, 0.999),
            mean
        );
    }
}
