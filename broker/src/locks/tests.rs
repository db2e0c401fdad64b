//! The lock manager on a table in heap memory: every promise of the slow path,
//! without processes or io_uring (those are in tests/).

use super::*;
use shm_layout::lockword::{self, Decline, try_acquire_exclusive, try_release_exclusive};

use super::model::{Buf, CountingWaker, new_events, new_table};

struct Fixture {
    table: TableView,
    events: EventsView,
    m: LockManager,
    w: CountingWaker,
    alloc: crate::allocator_glue::Allocation,
    now: u64,
    next_request: u64,
    _bufs: (Buf, Buf),
}

const KEEP_ALIVE: u64 = 100;

fn fixture(slots: u32, clients: u32, policy: Policy) -> Fixture {
    let (tb, table) = new_table(slots, clients);
    let (eb, events) = new_events(clients);
    let mut w = CountingWaker::default();
    let m = LockManager::adopt(
        &table,
        Ledger::on_heap(slots, clients),
        policy,
        Limits::for_table(clients.max(4) * 2),
        1,
        0,
        |_, _| true,
        &mut w,
    );
    let mut config = crate::config::Config::default_config();
    config.allocator.keep_alive_ms = KEEP_ALIVE;
    let alloc = crate::allocator_glue::Allocation::new(&config);
    Fixture {
        table,
        events,
        m,
        w,
        alloc,
        now: 0,
        next_request: 1,
        _bufs: (tb, eb),
    }
}

impl Fixture {
    fn client(&mut self, pid: u32) -> u32 {
        match self.m.hello(&self.table, pid, 0, 7, None, 0).unwrap() {
            Registered::New { client } => client,
            other => panic!("{other:?}"),
        }
    }
    fn acquire(&mut self, client: u32, conn: ConnId, key: &str, shared: bool) -> Response {
        self.next_request += 1;
        self.m.acquire(
            &self.table,
            &self.events,
            client,
            conn,
            conn as u32 % 64,
            self.next_request,
            key.as_bytes(),
            shared,
            true,
        )
    }
    /// Acquires, and says whether the request was queued.
    fn queued(&mut self, client: u32, conn: ConnId, key: &str, shared: bool) -> bool {
        matches!(
            self.acquire(client, conn, key, shared),
            Response::Queued { .. }
        )
    }
    fn release(&mut self, client: u32, r: &Response) -> Response {
        let Response::Granted { slot, token, .. } = r else {
            panic!("not a grant: {r:?}")
        };
        self.m
            .release(&self.table, client, *slot, *token, &mut self.w)
    }
    /// The broker's answer to `client` asking whether grant `r` stands.
    fn check(&self, client: u32, r: &Response) -> Response {
        let Response::Granted { slot, token, .. } = r else {
            panic!("not a grant: {r:?}")
        };
        self.m.check_hold(&self.table, client, *slot, *token)
    }
    fn cell(&self, client: u32, conn: ConnId) -> (u32, u64, u32) {
        let c = &self.table.client(client).unwrap().cells[conn as usize % 64];
        (
            c.state.load(Ordering::Acquire),
            c.token.load(Ordering::Relaxed),
            c.flags.load(Ordering::Relaxed),
        )
    }
    fn word(&self, key: &str) -> Word {
        let (_, w) = self
            .table
            .lookup(key.as_bytes(), key_hash(key.as_bytes()))
            .expect("indexed");
        w
    }
    /// Warm `key` through the broker (so it is prepared), then take it on the
    /// fast path as `client`: (slot, the held word, the fast grant's token).
    fn hold_on_fast_path(&mut self, client: u32, key: &str) -> (u32, Word, u64) {
        let g = self.acquire(client, 1, key, false);
        self.release(client, &g);
        let (s, w) = self
            .table
            .lookup(key.as_bytes(), key_hash(key.as_bytes()))
            .unwrap();
        let slot = self.table.slot(s).unwrap();
        let held = try_acquire_exclusive(&slot.word, w.generation(), client)
            .unwrap()
            .held;
        (
            s,
            held,
            slot.token_base.load(Ordering::Relaxed) + held.counter() as u64,
        )
    }

    /// Release `r` (a grant to `client`) the way the client library does
    /// when the broker's grant is a fast-path hold: one CAS, no message.
    /// `false` when it is not one (or no longer: taken over).
    fn cas_release(&self, client: u32, r: &Response) -> bool {
        let Response::Granted { slot, token, .. } = r else {
            panic!("not a grant: {r:?}")
        };
        let sl = self.table.slot(*slot).unwrap();
        let base = sl.token_base.load(Ordering::Relaxed);
        lockword::granted_on_fast_path(sl.word_acquire(), client, base, *token)
            .is_some_and(|held| try_release_exclusive(&sl.word, held))
    }

    /// The broker dies and a new one adopts the table and the ledger;
    /// `alive` says which client processes still run.
    fn restart(&mut self, alive: impl FnMut(u32, u64) -> bool) {
        self.m.readopt(&self.table, alive, &mut self.w);
    }

    /// Let time pass and run the allocator (keep-alive policy) once.
    fn advance(&mut self, ms: u64) {
        self.now += ms;
        self.alloc
            .tick_on(&mut self.m, &self.table, &self.events, None, self.now);
    }
}

fn token(r: &Response) -> u64 {
    match r {
        Response::Granted { token, .. } => *token,
        other => panic!("not a grant: {other:?}"),
    }
}

/// One round trip for an unprepared key (issue 12): the broker's grant is
/// a fast-path hold, and its release is the holder's CAS, with no message.
#[test]
fn an_unprepared_key_is_granted_as_a_fast_path_hold_released_by_one_cas() {
    let mut f = fixture(8, 4, Policy::KeepAlive);
    let (a, b) = (f.client(100), f.client(101));
    let g = f.acquire(a, 1, "k", false);
    let w = f.word("k");
    assert!(w.exclusive_owner() == Some(a) && w.is_prepared(), "{w:?}");
    assert!(f.cas_release(a, &g), "released without the broker");
    let w = f.word("k");
    assert!(w.is_prepared() && w.is_free(), "{w:?}");
    // The next acquirer takes it on the fast path, above the broker's token.
    let (_, w) = f.table.lookup(b"k", key_hash(b"k")).unwrap();
    let slot = f.table.slot(0).unwrap();
    let fast = try_acquire_exclusive(&slot.word, w.generation(), b).unwrap();
    assert!(slot.token_base.load(Ordering::Relaxed) + fast.held.counter() as u64 > token(&g));
    // The grant's ledger record went when a's next request settled it.
    f.m.check().unwrap();
    let _ = f.acquire(a, 1, "other", false);
    assert_eq!(f.m.ledger.holds(a).filter(|(_, h)| h.slot == 0).count(), 0);
    f.m.check().unwrap();
}

/// Shared requests, and every grant with policy `none`, stay managed: their
/// release goes through the broker.
#[test]
fn shared_grants_and_policy_none_grants_are_not_released_by_cas() {
    let mut f = fixture(8, 4, Policy::None);
    let a = f.client(100);
    let g = f.acquire(a, 1, "k", false);
    assert!(!f.word("k").is_prepared());
    assert!(!f.cas_release(a, &g));
    assert_eq!(f.release(a, &g), Response::Released);
    let mut f = fixture(8, 4, Policy::KeepAlive);
    let a = f.client(100);
    let g = f.acquire(a, 1, "k", true);
    assert!(!f.word("k").is_prepared());
    assert_eq!(f.release(a, &g), Response::Released);
}

/// The case that sank the first unacknowledged release: a broker killed
/// after the holder let go, and before it heard of it, left the key held
/// for good. Here the release is the word itself, and a restarted broker
/// reads it.
#[test]
fn a_cas_release_the_killed_broker_never_saw_leaves_the_key_free_after_the_restart() {
    let mut f = fixture(8, 4, Policy::KeepAlive);
    let (a, b) = (f.client(1), f.client(2));
    let g = f.acquire(a, 1, "k", false);
    assert!(f.cas_release(a, &g));
    f.restart(|_, _| true);
    f.m.check().unwrap();
    let gb = f.acquire(b, 2, "k", false);
    assert!(token(&gb) > token(&g), "{gb:?}");
    assert_eq!(f.m.ledger.holds(a).count(), 0, "the record was dropped");
}

/// A broker killed while the fast grant is held: the new broker keeps the
/// hold (prepared, with its record); a waiter takes the slot over, the
/// holder's CAS then fails and its release through the broker hands off.
#[test]
fn a_fast_grant_held_across_a_broker_restart_stays_held_until_its_holder_releases() {
    let mut f = fixture(8, 4, Policy::KeepAlive);
    let (a, b) = (f.client(1), f.client(2));
    let g = f.acquire(a, 1, "k", false);
    f.restart(|_, _| true);
    f.m.check().unwrap();
    assert!(f.queued(b, 2, "k", false), "a still holds k");
    assert!(!f.cas_release(a, &g), "taken over: the CAS fails");
    assert_eq!(f.release(a, &g), Response::Released);
    let (state, tb, _) = f.cell(b, 2);
    assert_eq!(state, CELL_GRANTED);
    assert!(tb > token(&g));
    f.m.check().unwrap();
}

/// The answer to a fast grant was lost (connection broke, or the broker
/// died after the word said it): the re-sent request is answered from the
/// ledger record, not queued behind the client's own hold.
#[test]
fn a_resent_acquire_of_a_fast_grant_is_answered_again_not_queued_behind_itself() {
    let mut f = fixture(8, 4, Policy::KeepAlive);
    let a = f.client(1);
    let g = f.acquire_as(a, 1, "k", 7);
    assert!(f.word("k").is_prepared());
    assert_eq!(f.acquire_as(a, 2, "k", 7), g);
    f.restart(|_, _| true);
    f.m.hello(&f.table, 1, 0, 7, Some(a), 1).unwrap();
    assert_eq!(f.acquire_as(a, 3, "k", 7), g);
    assert!(f.cas_release(a, &g));
    f.m.check().unwrap();
}

/// A broker killed between a fast grant's ledger record and its word
/// store: the record the word does not name is dropped at the restart, and
/// the client's re-sent request is granted afresh.
#[test]
fn a_fast_grant_recorded_but_never_written_is_dropped_at_the_restart() {
    let mut f = fixture(8, 4, Policy::KeepAlive);
    let a = f.client(1);
    let g = f.acquire_as(a, 1, "k", 3);
    assert!(f.cas_release(a, &g));
    let _ = f.acquire_as(a, 1, "other", 4); // settles k's record
    // Request 5's record, as grant_fast writes it before the word.
    let base = f.table.slot(0).unwrap().token_base.load(Ordering::Relaxed);
    let next = base + f.word("k").counter() as u64 + 1;
    f.m.ledger.add_hold(
        a,
        crate::ledger::Hold {
            slot: 0,
            shared: false,
            token: next,
            request: 5,
            owner_died: false,
            on_fast_path: true,
        },
    );
    f.restart(|_, _| true);
    f.m.check().unwrap();
    f.m.hello(&f.table, 1, 0, 7, Some(a), 1).unwrap();
    let again = f.acquire_as(a, 2, "k", 5);
    assert!(token(&again) >= next, "{again:?}");
    assert!(f.cas_release(a, &again));
}

/// A take-over records the fast-path holder before it freezes the word; a
/// broker killed at either point leaves a record the restart checks
/// against the word: the holder is kept (it never lost its lock), and a
/// holder that released meanwhile is not.
#[test]
fn a_broker_killed_inside_a_take_over_forgets_no_fast_path_holder() {
    for frozen in [false, true] {
        let mut f = fixture(8, 4, Policy::KeepAlive);
        let (a, b) = (f.client(1), f.client(2));
        let (s, held, t) = f.hold_on_fast_path(a, "k");
        f.m.ledger.add_hold(
            a,
            crate::ledger::Hold {
                slot: s,
                shared: false,
                token: t,
                request: crate::ledger::FAST_REQUEST,
                owner_died: false,
                on_fast_path: true,
            },
        );
        if frozen {
            let word = &f.table.slot(s).unwrap().word;
            word.store(lockword::take_over(held).0, Ordering::Release);
        }
        f.restart(|_, _| true);
        f.m.check().unwrap();
        assert!(
            f.queued(b, 2, "k", false),
            "frozen {frozen}: a still holds k"
        );
        assert_eq!(f.m.release(&f.table, a, s, t, &mut f.w), Response::Released);
        assert_eq!(f.cell(b, 2).0, CELL_GRANTED, "frozen {frozen}");
    }
}

/// Fast grants released by CAS leave records behind until something reads
/// them; they must not count against the quota of broker-granted locks.
#[test]
fn fast_grants_released_by_cas_do_not_use_up_the_quota() {
    let mut f = fixture(256, 4, Policy::KeepAlive);
    let a = f.client(1);
    for i in 0..(shm_layout::table::BROKER_HOLDS + 8) {
        let g = f.acquire(a, 1, &format!("k{i}"), false);
        assert!(matches!(g, Response::Granted { .. }), "key {i}: {g:?}");
        assert!(f.cas_release(a, &g), "key {i}");
    }
    f.m.check().unwrap();
}

#[test]
fn with_policy_none_keys_are_never_prepared() {
    let mut f = fixture(8, 4, Policy::None);
    let a = f.client(100);
    let g = f.acquire(a, 1, "k", false);
    f.release(a, &g);
    assert!(!f.word("k").is_prepared());
}

#[test]
fn waiters_are_granted_in_fifo_order_with_increasing_tokens() {
    let mut f = fixture(8, 4, Policy::KeepAlive);
    let (a, b, c) = (f.client(1), f.client(2), f.client(3));
    let ga = f.acquire(a, 1, "k", false);
    assert!(f.queued(b, 2, "k", false));
    assert!(f.queued(c, 3, "k", false));
    assert_eq!(f.release(a, &ga), Response::Released);
    let (state_b, token_b, _) = f.cell(b, 2);
    assert_eq!(state_b, CELL_GRANTED);
    assert_eq!(f.cell(c, 3).0, CELL_IDLE, "c is still waiting behind b");
    assert!(token_b > token(&ga));
    let slot = f.word("k");
    assert_eq!(slot.exclusive_owner(), Some(b));
    let gb = Response::Granted {
        slot: 0,
        token: token_b,
        owner_died: false,
    };
    assert_eq!(f.release(b, &gb), Response::Released);
    let (state_c, token_c, _) = f.cell(c, 3);
    assert_eq!(state_c, CELL_GRANTED);
    assert!(token_c > token_b);
    assert_eq!(
        f.w.0.len(),
        4,
        "one futex wake per hand-off, then the slot's two (park, hungry) as c, \
         the last waiter, takes it back to the fast path"
    );
    let answered: Vec<ConnId> = f.w.1.iter().map(|(conn, _)| *conn).collect();
    assert_eq!(
        answered,
        [2, 3],
        "each grant is answered on the waiter's connection"
    );
    assert!(matches!(f.w.1[1].1, Response::Granted { token, .. } if token == token_c));
}

#[test]
fn waiters_lists_the_queue_by_pid_in_order_and_follows_grants_cancels_and_deaths() {
    let mut f = fixture(8, 8, Policy::KeepAlive);
    let (a, b, c, d) = (f.client(100), f.client(200), f.client(300), f.client(400));
    assert!(f.m.waiters(b"k").is_empty(), "an unknown key: nobody waits");
    let ga = f.acquire(a, 1, "k", false);
    assert!(f.m.waiters(b"k").is_empty(), "held, nobody queued");
    assert!(f.queued(b, 2, "k", true));
    assert!(f.queued(c, 3, "k", false));
    assert!(f.queued(d, 4, "k", true));
    assert_eq!(
        f.m.waiters(b"k"),
        [(200, true), (300, false), (400, true)],
        "queue order, each with its pid and mode; the holder is not a waiter"
    );
    assert!(f.m.waiters(b"other").is_empty());

    // The head is granted: it leaves the list, the rest keep their order.
    assert_eq!(f.release(a, &ga), Response::Released);
    assert_eq!(f.m.waiters(b"k"), [(300, false), (400, true)]);
    // A cancel and a death take theirs out.
    let d_request = f.next_request;
    assert_eq!(
        f.m.cancel(&f.table, d, 4, d_request, &mut f.w),
        Response::Cancelled
    );
    assert_eq!(f.m.waiters(b"k"), [(300, false)]);
    f.m.client_gone(&f.table, c, &mut f.w);
    assert!(f.m.waiters(b"k").is_empty());
}

#[test]
fn shared_holders_coexist_and_a_queued_writer_blocks_later_readers() {
    let mut f = fixture(8, 4, Policy::KeepAlive);
    let (a, b, c, d) = (f.client(1), f.client(2), f.client(3), f.client(4));
    let ra = f.acquire(a, 1, "k", true);
    let rb = f.acquire(b, 2, "k", true);
    assert!(matches!(rb, Response::Granted { .. }));
    assert_eq!(f.word("k").shared_holders(), 2);
    assert!(f.queued(c, 3, "k", false));
    assert!(f.queued(d, 4, "k", true), "no barging past a queued writer");
    f.release(a, &ra);
    assert_eq!(f.cell(c, 3).0, CELL_IDLE);
    f.release(b, &rb);
    assert_eq!(f.cell(c, 3).0, CELL_GRANTED);
    assert_eq!(f.cell(d, 4).0, CELL_IDLE);
}

#[test]
fn try_lock_on_a_held_key_would_block_and_queues_nothing() {
    let mut f = fixture(8, 4, Policy::KeepAlive);
    let (a, b) = (f.client(1), f.client(2));
    f.acquire(a, 1, "k", false);
    let r =
        f.m.acquire(&f.table, &f.events, b, 2, 2, 99, b"k", false, false);
    assert_eq!(r, Response::WouldBlock);
    assert_eq!(f.table.slot(0).unwrap().waiters.load(Ordering::Relaxed), 0);
}

#[test]
fn a_fast_path_holder_is_taken_over_and_its_release_hands_off() {
    let mut f = fixture(8, 4, Policy::KeepAlive);
    let (a, b) = (f.client(1), f.client(2));
    let (slot_index, held, fast_token) = f.hold_on_fast_path(a, "k");
    assert!(f.queued(b, 2, "k", false));
    let slot = f.table.slot(slot_index).unwrap();
    assert!(
        !try_release_exclusive(&slot.word, held),
        "the takeover forces the release through the broker"
    );
    assert_eq!(
        f.m.release(&f.table, a, slot_index, fast_token, &mut f.w),
        Response::Released
    );
    assert_eq!(f.cell(b, 2).0, CELL_GRANTED);
    assert!(f.cell(b, 2).1 > fast_token);
}

/// Regression (hot-8p stuck at broker speed in the full bench, whose hot
/// key's 24-bit counter ran out): the holder that took the counter's last
/// value releases through the broker, which rebases the token in place.
/// The key is prepared and free again with room in its counter, its next
/// token is above the last, the contended sleepers are woken, and nobody
/// was queued in the broker.
#[test]
fn an_exhausted_counter_is_rebased_by_its_holders_release_and_the_key_stays_on_the_fast_path() {
    let mut f = fixture(8, 4, Policy::KeepAlive);
    let (a, b) = (f.client(100), f.client(101));
    let (s, held, _) = f.hold_on_fast_path(a, "hot");
    let slot = f.table.slot(s).unwrap();
    assert!(try_release_exclusive(&slot.word, held));
    // Clients granted it until one value was left.
    let free = Word(slot.word.load(Ordering::Relaxed));
    slot.word.store(
        Word::new(
            free.generation(),
            lockword::PREPARED,
            0,
            lockword::COUNTER_MASK as u32 - 1,
        )
        .0,
        Ordering::Relaxed,
    );
    let last = try_acquire_exclusive(&slot.word, free.generation(), a)
        .unwrap()
        .held;
    let token = slot.token_base.load(Ordering::Relaxed) + last.counter() as u64;
    // A contender sleeps on the slot.
    slot.word.fetch_or(lockword::PARKED, Ordering::Relaxed);
    assert!(
        !try_release_exclusive(&slot.word, last),
        "the last value's hold is released through the broker"
    );
    f.w.0.clear();
    assert_eq!(
        f.m.release(&f.table, a, s, token, &mut f.w),
        Response::Released
    );
    let now = f.word("hot");
    assert!(
        now.is_prepared() && now.is_free(),
        "prepared and free: {now:?}"
    );
    assert!(
        (now.counter() as u64) < lockword::COUNTER_MASK / 2,
        "rebased: {now:?}"
    );
    let park = &slot.park as *const AtomicU32 as usize;
    assert!(f.w.0.contains(&park), "the contended sleepers are woken");
    assert!(f.w.1.is_empty(), "nobody was queued");
    let next = try_acquire_exclusive(&slot.word, now.generation(), b)
        .expect("b takes it on the fast path")
        .held;
    let next_token = slot.token_base.load(Ordering::Relaxed) + next.counter() as u64;
    assert!(next_token > token, "{next_token} after {token}");
    f.m.check().unwrap();
}

/// A taken-over slot returns to the fast path as its queue drains: the
/// last waiter is granted a fast-path hold (released by CAS), and the
/// clients waiting on the slot for it to come back are woken then, not
/// when that waiter's release reaches the broker. Waiters behind it are
/// still granted through the broker, in order.
#[test]
fn the_last_waiter_of_a_queue_is_granted_on_the_fast_path() {
    let mut f = fixture(8, 4, Policy::KeepAlive);
    let (a, b, c) = (f.client(100), f.client(101), f.client(102));
    let (s, _held, token_a) = f.hold_on_fast_path(a, "k");
    assert!(f.queued(b, 2, "k", false));
    assert!(f.queued(c, 3, "k", false));
    let park = &f.table.slot(s).unwrap().park as *const AtomicU32 as usize;
    f.w.0.clear();
    assert_eq!(
        f.m.release(&f.table, a, s, token_a, &mut f.w),
        Response::Released
    );
    let (conn, gb) = f.w.1.pop().expect("handed to b");
    assert_eq!(conn, 2);
    assert!(
        !f.word("k").is_prepared(),
        "c still queued: b holds through the broker"
    );
    assert!(!f.cas_release(b, &gb));
    assert_eq!(f.release(b, &gb), Response::Released);
    let (conn, gc) = f.w.1.pop().expect("handed to c");
    assert_eq!(conn, 3);
    assert!(
        f.word("k").is_prepared(),
        "c, the last, holds on the fast path"
    );
    assert!(f.w.0.contains(&park), "the slot's sleepers are woken");
    let (Response::Granted { token: tb, .. }, Response::Granted { token: tc, .. }) = (&gb, &gc)
    else {
        panic!("{gb:?} {gc:?}")
    };
    assert!(token_a < *tb && tb < tc);
    assert!(f.cas_release(c, &gc), "released by one CAS");
    f.m.check().unwrap();
    let (_, _, next) = f.hold_on_fast_path(a, "k");
    assert!(next > *tc);
}

/// Regression (hot-8p stuck at broker speed): contended clients that find
/// a slot taken over wait on its `park` futex for it to come back to the
/// fast path instead of queueing in the broker; the broker wakes them when
/// it re-prepares the slot.
#[test]
fn a_slot_taken_over_and_prepared_again_wakes_the_clients_waiting_for_it() {
    let mut f = fixture(8, 4, Policy::KeepAlive);
    let (a, b) = (f.client(100), f.client(101));
    let (s, _held, token_a) = f.hold_on_fast_path(a, "k");
    assert!(
        f.queued(b, 2, "k", false),
        "a holds k: b queues (take-over)"
    );
    let park = &f.table.slot(s).unwrap().park as *const AtomicU32 as usize;
    assert_eq!(
        f.m.release(&f.table, a, s, token_a, &mut f.w),
        Response::Released
    );
    let gb = f.w.1.pop().expect("handed to b").1;
    assert!(
        f.word("k").is_prepared(),
        "back on the fast path: b, the last waiter, holds it there"
    );
    assert!(f.w.0.contains(&park), "its park sleepers are woken");
    assert!(f.cas_release(b, &gb));
    // Prepared again without a take-over since: no wake.
    let g = f.acquire(a, 1, "other", false);
    assert!(matches!(g, Response::Granted { .. }));
    f.w.0.clear();
    let (s2, held, _) = f.hold_on_fast_path(b, "k");
    assert!(try_release_exclusive(&f.table.slot(s2).unwrap().word, held));
    assert!(f.w.0.is_empty());
}

/// Regression (hot-8p stuck at broker speed): a hot key whose counter runs
/// out on the fast path is rebased by a grant that keeps it on the fast
/// path, instead of a managed grant that left it in the broker's queue.
#[test]
fn a_counter_exhausted_on_the_fast_path_is_rebased_by_a_fast_grant() {
    let mut f = fixture(8, 4, Policy::KeepAlive);
    let (a, b) = (f.client(100), f.client(101));
    let (s, held, last) = f.hold_on_fast_path(a, "k");
    let word = &f.table.slot(s).unwrap().word;
    assert!(try_release_exclusive(word, held));
    // The counter runs out: clients' CASes decline from now on.
    let w = f.word("k");
    let exhausted = Word::new(
        w.generation(),
        lockword::PREPARED,
        0,
        lockword::COUNTER_MASK as u32,
    );
    word.store(exhausted.0, Ordering::Release);
    let base = f.table.slot(s).unwrap().token_base.load(Ordering::Relaxed);
    let top = base + lockword::COUNTER_MASK;
    assert!(top > last);
    let g = f.acquire(b, 2, "k", false);
    assert!(token(&g) > top, "{g:?} after {top}");
    assert!(f.word("k").is_prepared(), "still on the fast path");
    assert!(f.cas_release(b, &g));
    let (_, _, next) = f.hold_on_fast_path(a, "k");
    assert!(next > token(&g));
    f.m.check().unwrap();
}

#[test]
fn a_dead_fast_path_holder_is_released_and_the_next_holder_is_told() {
    let mut f = fixture(8, 4, Policy::KeepAlive);
    let (a, b) = (f.client(1), f.client(2));
    let (s, _, _) = f.hold_on_fast_path(a, "k");
    f.m.client_gone(&f.table, a, &mut f.w);
    let (_, w) = f.table.lookup(b"k", key_hash(b"k")).unwrap();
    let grant = try_acquire_exclusive(&f.table.slot(s).unwrap().word, w.generation(), b).unwrap();
    assert!(grant.owner_died);
    assert_eq!(
        f.table.header().stats.owner_deaths.load(Ordering::Relaxed),
        1
    );
}

#[test]
fn a_dead_broker_granted_holder_hands_off_to_the_queue_with_owner_died() {
    let mut f = fixture(8, 4, Policy::KeepAlive);
    let (a, b) = (f.client(1), f.client(2));
    f.acquire(a, 1, "k", false);
    f.acquire(b, 2, "k", false);
    f.m.client_gone(&f.table, a, &mut f.w);
    let (state, _, flags) = f.cell(b, 2);
    assert_eq!(state, CELL_GRANTED);
    assert_eq!(flags, GRANT_OWNER_DIED);
    assert_eq!(
        f.table.client(a).unwrap().state.load(Ordering::Relaxed),
        CLIENT_FREE
    );
}

#[test]
fn tokens_keep_increasing_when_a_key_is_evicted_and_comes_back() {
    let mut f = fixture(2, 4, Policy::KeepAlive);
    let a = f.client(1);
    let g1 = f.acquire(a, 1, "k", false);
    f.release(a, &g1);
    f.advance(KEEP_ALIVE + 1);
    assert!(
        f.table.lookup(b"k", key_hash(b"k")).is_none(),
        "reclaimed after keep-alive"
    );
    for other in ["x", "y"] {
        let g = f.acquire(a, 1, other, false);
        f.release(a, &g);
    }
    let g2 = f.acquire(a, 1, "k", false);
    assert!(token(&g2) > token(&g1), "{g2:?} after {g1:?}");
}

#[test]
fn a_full_table_says_so_and_an_idle_slot_is_evicted_for_a_new_key() {
    let mut f = fixture(2, 4, Policy::KeepAlive);
    let a = f.client(1);
    let gx = f.acquire(a, 1, "x", false);
    let _gy = f.acquire(a, 2, "y", false);
    match f.acquire(a, 3, "z", false) {
        Response::Error {
            code: ErrorCode::TableFull,
            message,
        } => assert!(message.contains("table.slots"), "{message}"),
        other => panic!("{other:?}"),
    }
    f.release(a, &gx);
    assert!(matches!(
        f.acquire(a, 3, "z", false),
        Response::Granted { .. }
    ));
}

#[test]
fn a_cancel_that_loses_the_race_to_a_hand_off_reports_the_grant() {
    let mut f = fixture(8, 4, Policy::KeepAlive);
    let (a, b) = (f.client(1), f.client(2));
    let ga = f.acquire(a, 1, "k", false);
    f.acquire(b, 2, "k", false);
    f.release(a, &ga);
    assert!(matches!(
        f.m.cancel(&f.table, b, 2, f.next_request, &mut f.w),
        Response::Granted { .. }
    ));
    let mut f = fixture(8, 4, Policy::KeepAlive);
    let (a, b) = (f.client(1), f.client(2));
    f.acquire(a, 1, "k", false);
    f.acquire(b, 2, "k", false);
    assert_eq!(
        f.m.cancel(&f.table, b, 2, f.next_request, &mut f.w),
        Response::Cancelled
    );
    assert_eq!(f.table.slot(0).unwrap().waiters.load(Ordering::Relaxed), 0);
}

#[test]
fn release_by_a_non_holder_or_with_a_stale_token_is_refused() {
    let mut f = fixture(8, 4, Policy::KeepAlive);
    let (a, b) = (f.client(1), f.client(2));
    let g = f.acquire(a, 1, "k", false);
    assert!(matches!(
        f.release(b, &g),
        Response::Error {
            code: ErrorCode::NotHolder,
            ..
        }
    ));
    let Response::Granted { slot, token, .. } = g else {
        unreachable!()
    };
    assert!(matches!(
        f.m.release(&f.table, a, slot, token + 1, &mut f.w),
        Response::Error {
            code: ErrorCode::NotHolder,
            ..
        }
    ));
    assert!(matches!(
        f.m.release(&f.table, a, 9999, token, &mut f.w),
        Response::Error {
            code: ErrorCode::NotHolder,
            ..
        }
    ));
}

#[test]
fn bad_keys_are_refused_with_the_rule_they_break() {
    let mut f = fixture(8, 4, Policy::KeepAlive);
    let a = f.client(1);
    for key in ["", &"x".repeat(65)] {
        assert!(matches!(
            f.acquire(a, 1, key, false),
            Response::Error {
                code: ErrorCode::BadKey,
                ..
            }
        ));
    }
}

#[test]
fn held_locks_survive_adoption_by_a_new_manager() {
    let mut f = fixture(8, 4, Policy::KeepAlive);
    let (a, b) = (f.client(1), f.client(2));
    let g_broker = f.acquire(a, 1, "held-by-broker", false);
    let g_tmp = f.acquire(a, 1, "held-fast", false);
    f.release(a, &g_tmp);
    let (s, w) = f
        .table
        .lookup(b"held-fast", key_hash(b"held-fast"))
        .unwrap();
    let fast = try_acquire_exclusive(&f.table.slot(s).unwrap().word, w.generation(), a).unwrap();
    let shared = f.acquire(b, 2, "read", true);
    // The broker dies; a new one adopts the table. Both clients still run.
    let floor_before = f.table.header().token_floor.load(Ordering::Relaxed);
    f.restart(|_, _| true);
    assert!(f.table.header().token_floor.load(Ordering::Relaxed) >= floor_before);
    f.m.hello(&f.table, 1, 0, 7, Some(a), 1).unwrap();
    f.m.hello(&f.table, 2, 0, 7, Some(b), 2).unwrap();
    assert!(f.queued(b, 2, "held-by-broker", false));
    assert!(matches!(
        f.m.cancel(&f.table, b, 2, f.next_request, &mut f.w),
        Response::Cancelled
    ));
    assert!(f.queued(b, 2, "held-fast", false));
    let fast_token =
        f.table.slot(s).unwrap().token_base.load(Ordering::Relaxed) + fast.held.counter() as u64;
    assert_eq!(
        f.m.release(&f.table, a, s, fast_token, &mut f.w),
        Response::Released
    );
    assert_eq!(f.cell(b, 2).0, CELL_GRANTED);
    assert_eq!(f.release(a, &g_broker), Response::Released);
    assert!(f.queued(a, 1, "read", false), "the shared hold survived");
    assert_eq!(f.release(b, &shared), Response::Released);
}

#[test]
fn adoption_releases_the_locks_of_clients_that_died_meanwhile() {
    let mut f = fixture(8, 4, Policy::KeepAlive);
    let a = f.client(1);
    f.acquire(a, 1, "k", false);
    f.restart(|_, _| false);
    let b = f.client(2);
    let g = f.acquire(b, 2, "k", false);
    assert!(
        matches!(
            g,
            Response::Granted {
                owner_died: true,
                ..
            }
        ),
        "{g:?}"
    );
}

#[test]
fn scribbled_words_are_repaired_and_never_reach_a_grant_to_two_clients() {
    let mut f = fixture(8, 4, Policy::KeepAlive);
    let (a, b) = (f.client(1), f.client(2));
    let g = f.acquire(a, 1, "k", false);
    f.release(a, &g);
    let (s, _) = f.table.lookup(b"k", key_hash(b"k")).unwrap();
    let word = &f.table.slot(s).unwrap().word;
    word.store(u64::MAX, Ordering::Relaxed); // reserved bits set: malformed
    assert_eq!(
        try_acquire_exclusive(word, 0xFFFF, b).unwrap_err(),
        Decline::Malformed
    );
    let gb = f.acquire(b, 2, "k", false);
    assert!(matches!(gb, Response::Granted { .. }));
    assert!(f.queued(a, 1, "k", false), "the broker's grant to b stands");
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
    #[test]
    fn random_bytes_over_the_table_never_crash_the_manager(
        noise in proptest::collection::vec((0usize..1 << 20, proptest::num::u8::ANY), 1..400),
    ) {
        let mut f = fixture(8, 4, Policy::KeepAlive);
        let (a, b) = (f.client(1), f.client(2));
        let g = f.acquire(a, 1, "k", false);
        f.acquire(b, 2, "k", false);
        let len = f.table.geometry().file_size;
        let bytes = f._bufs.0.bytes();
        for (at, v) in noise {
            // Leave the header's geometry alone (a broker validates it at start).
            let at = 512 + at % (len - 512);
            bytes[at] = v;
        }
        let _ = f.release(a, &g);
        let _ = f.acquire(a, 1, "k", false);
        let _ = f.acquire(b, 3, "other", true);
        f.advance(KEEP_ALIVE + 1);
        f.m.client_gone(&f.table, a, &mut f.w);
        f.restart(|_, _| true);
    }
}

#[test]
fn owner_died_survives_the_keep_alive_reclaim_until_someone_is_told() {
    let mut f = fixture(8, 4, Policy::KeepAlive);
    let (a, b) = (f.client(1), f.client(2));
    f.hold_on_fast_path(a, "k");
    f.m.client_gone(&f.table, a, &mut f.w);
    f.advance(10 * KEEP_ALIVE);
    let g = f.acquire(b, 2, "k", false);
    assert!(
        matches!(
            g,
            Response::Granted {
                owner_died: true,
                ..
            }
        ),
        "{g:?}"
    );
}

#[test]
fn a_try_lock_on_a_fast_path_hold_leaves_the_slot_on_the_fast_path() {
    let mut f = fixture(8, 4, Policy::KeepAlive);
    let (a, b) = (f.client(1), f.client(2));
    let (s, held, _) = f.hold_on_fast_path(a, "k");
    let r =
        f.m.acquire(&f.table, &f.events, b, 2, 2, 99, b"k", false, false);
    assert_eq!(r, Response::WouldBlock);
    let slot = f.table.slot(s).unwrap();
    assert!(
        try_release_exclusive(&slot.word, held),
        "the holder still releases with its own CAS"
    );
}

#[test]
fn a_slow_path_request_for_a_predicted_key_counts_as_late_not_missed() {
    let mut f = fixture(8, 4, Policy::Forecast);
    let a = f.client(1);
    f.m.set_predicted([key_hash(b"soon")]);
    f.acquire(a, 1, "soon", false);
    f.acquire(a, 2, "unforeseen", false);
    let stats = &f.table.header().stats;
    assert_eq!(stats.late.load(Ordering::Relaxed), 1);
    assert_eq!(stats.misses.load(Ordering::Relaxed), 1);
}

#[test]
fn a_scribbled_token_base_never_takes_a_broker_grant_backwards() {
    let mut f = fixture(8, 4, Policy::None);
    let a = f.client(1);
    let g1 = f.acquire(a, 1, "k", false);
    f.release(a, &g1);
    let (s, _) = f.table.lookup(b"k", key_hash(b"k")).unwrap();
    f.table
        .slot(s)
        .unwrap()
        .token_base
        .store(0, Ordering::Relaxed);
    let g2 = f.acquire(a, 1, "k", false);
    assert!(token(&g2) > token(&g1), "{g2:?} after {g1:?}");
    f.release(a, &g2);
    f.table
        .slot(s)
        .unwrap()
        .token_base
        .store(u64::MAX, Ordering::Relaxed);
    let g3 = f.acquire(a, 1, "k", false);
    assert!(
        token(&g3) > token(&g2),
        "a base near the top saturates instead of wrapping"
    );
}

fn contention_stats(f: &Fixture) -> (u64, u64) {
    let stats = &f.table.header().stats;
    (
        stats.contention_prepared.load(Ordering::Relaxed),
        stats.contention_prepared_hits.load(Ordering::Relaxed),
    )
}

#[test]
fn a_key_predicted_contended_gets_its_waiter_queue_reserved_before_the_first_waiter() {
    let mut f = fixture(8, 4, Policy::Forecast);
    let (a, b, c) = (f.client(1), f.client(2), f.client(3));
    let g = f.acquire(a, 1, "k", false);
    f.release(a, &g);
    assert_eq!(f.m.queue_capacity(b"k"), Some(0), "nobody ever queued");
    assert!(f.m.prepare_contention(&f.table, &f.events, key_hash(b"k"), 8));
    let reserved = f.m.queue_capacity(b"k").unwrap();
    assert!(reserved >= 8, "{reserved}");
    assert_eq!(contention_stats(&f), (1, 0));
    assert!(
        f.word("k").is_prepared(),
        "the key stays on the fast path until someone queues"
    );
    let ga = f.acquire(a, 1, "k", false);
    assert!(f.queued(b, 2, "k", false));
    assert!(f.queued(c, 3, "k", false));
    assert_eq!(
        f.m.queue_capacity(b"k"),
        Some(reserved),
        "the waiters fit in the reserved queue"
    );
    assert_eq!(
        contention_stats(&f),
        (1, 1),
        "one hit per preparation, however many waiters use it"
    );
    f.release(a, &ga);
    assert!(
        matches!(f.w.1.last(), Some((2, Response::Granted { .. }))),
        "the hand-off works as on any key: {:?}",
        f.w.1
    );
}

#[test]
fn a_key_predicted_contended_without_a_slot_is_placed_then_reserved() {
    let mut f = fixture(8, 4, Policy::Forecast);
    let a = f.client(1);
    let g = f.acquire(a, 1, "k", false);
    f.release(a, &g);
    let (s, _) = f.table.lookup(b"k", key_hash(b"k")).unwrap();
    assert!(f.m.evict(&f.table, &f.events, s));
    assert_eq!(f.m.queue_capacity(b"k"), None);
    assert!(f.m.prepare_contention(&f.table, &f.events, key_hash(b"k"), 4));
    assert!(f.word("k").is_prepared());
    assert!(f.m.queue_capacity(b"k").unwrap() >= 4);
    let stats = &f.table.header().stats;
    assert_eq!(stats.preparations.load(Ordering::Relaxed), 1);
    assert_eq!(contention_stats(&f), (1, 0));
}

#[test]
fn contention_is_not_prepared_for_an_unknown_key_or_with_policy_none() {
    let mut f = fixture(8, 4, Policy::Forecast);
    assert!(
        !f.m.prepare_contention(&f.table, &f.events, key_hash(b"never-seen"), 8),
        "the broker cannot place a key whose text it never saw"
    );
    let mut f_none = fixture(8, 4, Policy::None);
    let a = f_none.client(1);
    let g = f_none.acquire(a, 1, "k", false);
    f_none.release(a, &g);
    assert!(
        !f_none
            .m
            .prepare_contention(&f_none.table, &f_none.events, key_hash(b"k"), 8)
    );
    assert_eq!(contention_stats(&f), (0, 0));
    assert_eq!(contention_stats(&f_none), (0, 0));
}

#[test]
fn a_full_table_evicts_a_slot_kept_for_contention_last() {
    let mut f = fixture(2, 4, Policy::Forecast);
    let a = f.client(1);
    for key in ["contended", "plain"] {
        let g = f.acquire(a, 1, key, false);
        f.release(a, &g);
    }
    assert!(f.m.prepare_contention(&f.table, &f.events, key_hash(b"contended"), 8));
    // "contended" was used first (least recently), yet "plain" goes.
    let g = f.acquire(a, 1, "new", false);
    f.release(a, &g);
    assert!(
        f.table
            .lookup(b"contended", key_hash(b"contended"))
            .is_some()
    );
    assert!(f.table.lookup(b"plain", key_hash(b"plain")).is_none());
}

#[test]
fn with_the_forecast_policy_a_key_scored_contended_is_reserved_and_kept_past_its_keep_alive() {
    use shm_layout::scores::{Scored, ScoresHeader, ScoresView, init_scores, scores_file_size};
    let mut f = fixture(8, 4, Policy::Forecast);
    let mut config = crate::config::Config::default_config();
    config.allocator.policy = Policy::Forecast;
    config.allocator.keep_alive_ms = KEEP_ALIVE;
    config.allocator.contention_threshold = 0.5;
    config.allocator.contention_waiters = 16;
    let mut alloc = crate::allocator_glue::Allocation::new(&config);
    let mut sb = Buf::new(scores_file_size(4));
    // SAFETY: 64-aligned, large enough, exclusively ours.
    init_scores(
        unsafe { &mut *(sb.bytes().as_mut_ptr() as *mut ScoresHeader) },
        4,
    );
    // SAFETY: the buffer outlives the view (both live to the end of the test).
    let scores = unsafe { ScoresView::new(sb.ptr, scores_file_size(4)) }.unwrap();
    let a = f.client(1);
    for key in ["contended", "plain"] {
        let g = f.acquire(a, 1, key, false);
        f.release(a, &g);
    }
    let entries = [
        Scored {
            key_hash: key_hash(b"contended"),
            score: 0.0,
            contention: 0.9,
        },
        Scored {
            key_hash: key_hash(b"plain"),
            score: 0.0,
            contention: 0.1,
        },
    ];
    for _ in 0..3 {
        scores.write("test", 500, shm_layout::monotonic_ns(), entries);
        f.now += KEEP_ALIVE;
        alloc.tick_on(&mut f.m, &f.table, &f.events, Some(&scores), f.now);
    }
    assert!(f.m.queue_capacity(b"contended").unwrap() >= 16);
    assert_eq!(
        contention_stats(&f),
        (1, 0),
        "prepared once, not at every tick"
    );
    assert!(
        f.table
            .lookup(b"contended", key_hash(b"contended"))
            .is_some(),
        "kept past the keep-alive while contention is predicted"
    );
    assert!(
        f.table.lookup(b"plain", key_hash(b"plain")).is_none(),
        "reclaimed after its keep-alive"
    );

    // The forecaster is caught mid-write at every read (odd seqlock) while
    // its scores are fresh: the last good snapshot stands, so the slot kept
    // for contention stays.
    let header = scores.header();
    header.seq.fetch_add(1, Ordering::Relaxed);
    for _ in 0..3 {
        header
            .written_at_ns
            .store(shm_layout::monotonic_ns(), Ordering::Relaxed);
        f.now += KEEP_ALIVE;
        alloc.tick_on(&mut f.m, &f.table, &f.events, Some(&scores), f.now);
    }
    assert!(
        f.table
            .lookup(b"contended", key_hash(b"contended"))
            .is_some(),
        "a torn read of the scores must not drop the slot kept for contention"
    );
    assert!(f.m.contention_prepared(b"contended"));

    // The contention prediction falls (the access score keeps the slot): the
    // slot is an ordinary one again.
    header.seq.fetch_add(1, Ordering::Relaxed);
    let entries = entries.map(|entry| Scored {
        score: 0.9,
        contention: 0.1,
        ..entry
    });
    scores.write("test", 500, shm_layout::monotonic_ns(), entries);
    f.now += 1;
    alloc.tick_on(&mut f.m, &f.table, &f.events, Some(&scores), f.now);
    assert!(
        f.table
            .lookup(b"contended", key_hash(b"contended"))
            .is_some()
    );
    assert!(!f.m.contention_prepared(b"contended"));
}

// ---- regressions of "Never two holders" (defect 8) ----------------------------

impl Fixture {
    fn acquire_as(&mut self, client: u32, conn: ConnId, key: &str, request: u64) -> Response {
        self.m.acquire(
            &self.table,
            &self.events,
            client,
            conn,
            conn as u32 % 64,
            request,
            key.as_bytes(),
            false,
            true,
        )
    }
}

/// A hand-off answered on a connection that closed before the client read
/// it used to be lost, the lock held by a client that never learnt it got
/// it. Now the client's re-sent request (same id) is answered with it.
#[test]
fn a_hand_off_to_a_closed_connection_is_delivered_when_the_client_asks_again() {
    let mut f = fixture(8, 4, Policy::KeepAlive);
    let (a, b) = (f.client(1), f.client(2));
    let ga = f.acquire(a, 1, "k", false);
    assert!(matches!(
        f.acquire_as(b, 2, "k", 77),
        Response::Queued { .. }
    ));
    f.release(a, &ga);
    let handed = f.w.1.pop().expect("a hand-off answer");
    assert_eq!(handed.0, 2);
    f.m.conn_closed(&f.table, 2, &mut f.w); // the answer never arrived
    assert_eq!(
        f.acquire_as(b, 3, "k", 77),
        handed.1,
        "the same grant, again"
    );
    assert!(f.queued(a, 1, "k", false), "and b still holds k");
}

/// A broker killed after recording a grant but before sending it left the
/// client to queue behind its own adopted hold forever. Now the re-sent
/// request gets the grant the ledger recorded.
#[test]
fn a_grant_made_before_a_broker_kill_is_answered_again_after_the_restart() {
    let mut f = fixture(8, 4, Policy::KeepAlive);
    let a = f.client(1);
    let g = f.acquire_as(a, 1, "k", 5);
    assert!(matches!(g, Response::Granted { .. }));
    f.restart(|_, _| true); // the answer was lost with the old broker
    f.m.hello(&f.table, 1, 0, 7, Some(a), 1).unwrap();
    assert_eq!(f.acquire_as(a, 9, "k", 5), g);
    assert_eq!(f.release(a, &g), Response::Released);
}

/// A Cancel whose connection broke goes on a new one: the grant that beat
/// it is found by its request id.
#[test]
fn a_cancel_on_a_new_connection_finds_the_grant_by_request_id() {
    let mut f = fixture(8, 4, Policy::KeepAlive);
    let (a, b) = (f.client(1), f.client(2));
    let ga = f.acquire(a, 1, "k", false);
    assert!(matches!(
        f.acquire_as(b, 2, "k", 41),
        Response::Queued { .. }
    ));
    f.release(a, &ga);
    let handed = f.w.1.pop().expect("a hand-off answer").1;
    f.m.conn_closed(&f.table, 2, &mut f.w);
    assert_eq!(f.m.cancel(&f.table, b, 3, 41, &mut f.w), handed);
    assert_eq!(
        f.m.cancel(&f.table, b, 3, 42, &mut f.w),
        Response::Cancelled
    );
}

/// A connection that closes is transport: the client's locks stay held
/// (defect 2's root cause, at the engine's level).
#[test]
fn closing_every_connection_of_a_live_client_releases_nothing() {
    let mut f = fixture(8, 4, Policy::KeepAlive);
    let (a, b) = (f.client(1), f.client(2));
    f.acquire(a, 1, "k", false);
    f.m.conn_closed(&f.table, 1, &mut f.w);
    assert!(f.queued(b, 2, "k", false), "k is still a's");
}

/// Defect 7's cousin, found re-reading the ledger's write order: a broker
/// killed between re-keying a slot's word (counter reset) and erasing the
/// slot from the ledger came back with the old key at its old base and a
/// zero counter, so the key's next token went back.
#[test]
fn a_broker_killed_while_freeing_a_slot_never_lets_its_tokens_go_back() {
    let mut f = fixture(8, 4, Policy::None);
    let a = f.client(1);
    let mut last = 0;
    for _ in 0..3 {
        let g = f.acquire(a, 1, "k", false);
        last = token(&g);
        f.release(a, &g);
    }
    // free_slot up to its CAS, then the SIGKILL: floor raised, word re-keyed,
    // the ledger still names the key.
    let (s, w) = f.table.lookup(b"k", key_hash(b"k")).unwrap();
    f.m.ledger.raise_floor(last + 1);
    f.table
        .slot(s)
        .unwrap()
        .word
        .store(shm_layout::lockword::rekey(w).0, Ordering::Release);
    f.restart(|_, _| true);
    let g = f.acquire(a, 1, "k", false);
    assert!(token(&g) > last, "token {} after {last}", token(&g));
}

/// Many distinct keys through a full table: each acquire allocates (evicting
/// the least recently used idle slot) and is remembered. Returns the number
/// of acquires.
fn many_distinct_keys(f: &mut Fixture, keys: u32) -> u64 {
    let a = f.client(1);
    for i in 0..keys {
        let g = f.acquire(a, 1, &format!("distinct/{i}"), false);
        f.release(a, &g);
    }
    keys as u64
}

#[test]
fn remember_with_its_key_memory_full_looks_at_each_key_once_not_at_every_slot() {
    // Issue 12: forgetting keys compared every remembered key with every
    // slot (about 1.1e9 visits at 16,384 slots). 256 slots remember up to
    // 2048 keys; 6000 keys fill that memory twice.
    let mut f = fixture(256, 4, Policy::KeepAlive);
    let acquires = many_distinct_keys(&mut f, 6000);
    let visits = f.m.dir.visits.remember;
    assert!(
        visits <= 4 * acquires,
        "{visits} visits for {acquires} remembered keys: forgetting is not amortised O(1)"
    );
}

#[test]
fn a_full_table_finds_its_eviction_victim_without_scanning_every_slot() {
    // Issue 12: each allocation on a full table looked at every slot.
    let mut f = fixture(256, 4, Policy::KeepAlive);
    let acquires = many_distinct_keys(&mut f, 3000);
    let visits = f.m.dir.visits.victim;
    assert!(
        visits <= 8 * acquires,
        "{visits} visits for {acquires} allocations: finding a victim is not amortised O(log n)"
    );
}

#[test]
fn a_tick_visits_the_keyed_slots_only_not_the_whole_table() {
    // The allocator's tick went over every slot of the table twice, keyed or
    // not, every 10 ms: an idle broker with the default 16,384 slots spent
    // 190 us a tick on an empty table and 690 us on a full one.
    let mut f = fixture(4096, 4, Policy::KeepAlive);
    let acquires = many_distinct_keys(&mut f, 3);
    let mut views = Vec::new();
    let left_out = f.m.tick(&f.table, 1, |_| None, &mut views, 4096);
    assert_eq!(left_out, 0);
    assert_eq!(views.len() as u64, acquires, "one view per keyed slot");
    assert_eq!(
        f.m.dir.visits.tick, acquires,
        "the tick visited {} slots for {acquires} keys",
        f.m.dir.visits.tick
    );
    f.m.check().unwrap();
}

#[test]
fn a_tick_on_a_table_of_many_keys_looks_at_a_bounded_number_of_them() {
    // Issue 12: every tick looked at every keyed slot, with the event loop
    // stopped: 48 ms a tick with 1M keys, every 10 ms. Now a tick looks at
    // `limit` of them and the next tick goes on from there; a sweep sees
    // each keyed slot once, and the slot counts are published at its end.
    let mut f = fixture(1024, 4, Policy::KeepAlive);
    let keys = many_distinct_keys(&mut f, 300);
    let (limit, mut views, mut seen) = (64usize, Vec::new(), Vec::new());
    let ticks = (keys as usize).div_ceil(limit);
    for t in 0..ticks {
        let before = f.m.dir.visits.tick;
        let left_out = f.m.tick(&f.table, 1, |_| None, &mut views, limit);
        let visits = f.m.dir.visits.tick - before;
        assert!(visits <= limit as u64, "tick {t} looked at {visits} slots");
        assert_eq!(left_out + views.len(), keys as usize);
        seen.extend(views.iter().map(|v| v.slot));
    }
    // 5 ticks of 64: the sweep of 300 ended inside the last one, which
    // went on from the table's start.
    let (sweep, wrapped) = seen.split_at(keys as usize);
    let mut distinct = sweep.to_vec();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len() as u64, keys, "every keyed slot once a sweep");
    assert_eq!(
        wrapped,
        &sweep[..wrapped.len()],
        "the next sweep starts over"
    );
    let stats = &f.table.header().stats;
    assert_eq!(stats.slots_used.load(Ordering::Relaxed), keys, "published");
    f.m.check().unwrap();
}

#[test]
fn an_idle_key_of_a_table_swept_over_several_ticks_is_still_reclaimed() {
    // The keep-alive policy, shown a part of the keyed slots per tick,
    // reclaims every idle key within one sweep past its keep-alive, and
    // evicts nothing it was not shown for budget pressure.
    let mut f = fixture(1024, 4, Policy::KeepAlive);
    let mut config = crate::config::Config::default_config();
    config.allocator.keep_alive_ms = KEEP_ALIVE;
    config.allocator.sweep_slots = 64;
    f.alloc = crate::allocator_glue::Allocation::new(&config);
    let keys = many_distinct_keys(&mut f, 300);
    f.advance(1);
    assert_eq!(f.m.dir.keys.len() as u64, keys, "nothing idle yet");
    f.advance(KEEP_ALIVE + 1);
    let sweep = (keys as usize).div_ceil(64) as u64;
    for _ in 1..sweep {
        assert!(!f.m.dir.keys.is_empty(), "reclaimed a part at a time");
        f.advance(1);
    }
    assert!(f.m.dir.keys.is_empty(), "{} keys left", f.m.dir.keys.len());
    f.m.check().unwrap();
}

#[test]
fn a_full_table_evicts_the_least_recently_used_idle_key_passing_over_a_held_one() {
    // The eviction order is kept lazily (issue 12): a held slot at its front
    // is passed over, and a key used since it was placed is not taken for
    // an older one.
    let mut f = fixture(3, 4, Policy::KeepAlive);
    let a = f.client(1);
    let _held = f.acquire(a, 1, "held", false);
    f.advance(1);
    for key in ["old", "new"] {
        let g = f.acquire(a, 2, key, false);
        f.release(a, &g);
        f.advance(1);
    }
    // "old" is used again: "new" is now the least recently used idle key.
    let g = f.acquire(a, 2, "old", false);
    f.release(a, &g);
    f.advance(1);
    let g = f.acquire(a, 2, "x", false);
    f.release(a, &g);
    let indexed = |f: &Fixture, key: &str| {
        f.table
            .lookup(key.as_bytes(), key_hash(key.as_bytes()))
            .is_some()
    };
    assert!(indexed(&f, "held"), "a held key is never evicted");
    assert!(indexed(&f, "old"), "used since it was placed: kept");
    assert!(!indexed(&f, "new"), "the least recently used idle key goes");
}

/// The node gate (`nodes`) with a scripted cluster agent: what the engine
/// sends it, and what it does with the agent's events.
mod node_gate {
    use super::*;
    use forelock_cluster::{Command, Event};
    use std::cell::RefCell;
    use std::rc::Rc;

    #[derive(Default)]
    struct Script {
        sent: Vec<Command>,
        lease_valid: bool,
        safe_until_ns: u64,
        min_hold_ms: u64,
    }

    struct Link(Rc<RefCell<Script>>);

    impl ClusterLink for Link {
        fn is_global(&self, key: &[u8]) -> bool {
            key.starts_with(b"global/")
        }
        fn send(&mut self, command: Command) {
            self.0.borrow_mut().sent.push(command);
        }
        fn lease_valid(&self, epoch: u64) -> bool {
            epoch == 1 && self.0.borrow().lease_valid
        }
        fn safe_until_ns(&self, epoch: u64) -> u64 {
            if self.lease_valid(epoch) {
                self.0.borrow().safe_until_ns
            } else {
                0
            }
        }
        fn min_hold_ms(&self) -> u64 {
            self.0.borrow().min_hold_ms
        }
    }

    fn clustered() -> (Fixture, Rc<RefCell<Script>>) {
        let mut f = fixture(8, 4, Policy::KeepAlive);
        let script = Rc::new(RefCell::new(Script {
            sent: Vec::new(),
            lease_valid: true,
            safe_until_ns: u64::MAX,
            min_hold_ms: 0,
        }));
        f.m.set_cluster(&f.table, Box::new(Link(script.clone())));
        (f, script)
    }

    fn want(key: &str) -> Command {
        Command::Want {
            key: key.as_bytes().to_vec(),
            shared: false,
            prefetch: false,
        }
    }

    fn granted(key: &str, rev: u64) -> Event {
        Event::Granted {
            key: key.as_bytes().to_vec(),
            shared: false,
            base: rev << 24,
            epoch: 1,
            prefetch: false,
        }
    }

    /// The agent fences lease epoch 1.
    fn fence(f: &mut Fixture) {
        let fenced = Event::Fenced {
            epoch: 1,
            reason: "test".into(),
        };
        f.m.node_event(&f.table, fenced, &mut f.w);
    }

    fn answered_token(f: &mut Fixture) -> Option<u64> {
        f.w.1.drain(..).find_map(|(_, r)| match r {
            Response::Granted { token, .. } => Some(token),
            _ => None,
        })
    }

    /// The grant of `token` on global/k, as the engine answered it.
    fn grant_of_k(f: &Fixture, token: u64) -> Response {
        Response::Granted {
            slot: f
                .table
                .lookup(b"global/k", key_hash(b"global/k"))
                .unwrap()
                .0,
            token,
            owner_died: false,
        }
    }

    #[test]
    fn a_global_key_waits_for_its_node_grant_and_takes_its_token_from_it() {
        let (mut f, script) = clustered();
        let c = f.client(100);
        assert!(f.queued(c, 1, "global/k", false), "no node grant yet");
        assert_eq!(script.borrow().sent, vec![want("global/k")]);
        f.m.node_event(&f.table, granted("global/k", 7), &mut f.w);
        assert_eq!(answered_token(&mut f), Some((7 << 24) + 1));
        // A local key needs no node grant.
        assert!(matches!(
            f.acquire(c, 2, "local/k", false),
            Response::Granted { .. }
        ));
    }

    /// Regression: killing the etcd leader delayed a renewal past the lease's
    /// safe time; the broker dropped its node grants on its own clock, but
    /// the agent still held them and ignored every later `Want` for them, so
    /// the host never took the key again (tests/cluster.rs,
    /// killing_the_etcd_leader_pauses_global_keys_for_an_election_only).
    #[test]
    fn a_grant_lost_on_the_brokers_clock_is_released_at_the_agent_and_asked_for_again() {
        let (mut f, script) = clustered();
        let c = f.client(100);
        assert!(f.queued(c, 1, "global/k", false));
        f.m.node_event(&f.table, granted("global/k", 7), &mut f.w);
        let first = answered_token(&mut f).expect("granted");
        let r = grant_of_k(&f, first);
        assert_eq!(f.release(c, &r), Response::Released);
        script.borrow_mut().sent.clear();
        // The lease's safe time passes on the broker's clock.
        script.borrow_mut().lease_valid = false;
        f.m.check_leases(&f.table);
        assert!(
            script.borrow().sent.contains(&Command::Release {
                key: b"global/k".to_vec(),
                epoch: 1,
            }),
            "the agent must be told to let the key go: {:?}",
            script.borrow().sent
        );
        script.borrow_mut().lease_valid = true;
        assert!(f.queued(c, 2, "global/k", false), "no node grant now");
        // A grant the agent sent before it saw the Release is stale.
        f.m.node_event(&f.table, granted("global/k", 7), &mut f.w);
        assert_eq!(
            answered_token(&mut f),
            None,
            "granted under a released node grant"
        );
        script.borrow_mut().sent.clear();
        f.m.node_event(
            &f.table,
            Event::Released {
                key: b"global/k".to_vec(),
            },
            &mut f.w,
        );
        assert_eq!(script.borrow().sent, vec![want("global/k")]);
        f.m.node_event(&f.table, granted("global/k", 9), &mut f.w);
        let second = answered_token(&mut f).expect("granted under the new node grant");
        assert!(second > first, "{second:#x} after {first:#x}");
    }

    #[test]
    fn a_fence_makes_the_local_holder_lost_and_keeps_others_out_until_it_leaves() {
        let (mut f, _script) = clustered();
        let (a, b) = (f.client(100), f.client(101));
        assert!(f.queued(a, 1, "global/k", false));
        f.m.node_event(&f.table, granted("global/k", 7), &mut f.w);
        let token = answered_token(&mut f).expect("granted");
        let r = grant_of_k(&f, token);
        assert_eq!(f.check(a, &r), Response::Holding);
        assert!(matches!(
            f.check(b, &r),
            Response::Error {
                code: ErrorCode::NotHolder,
                ..
            }
        ));
        fence(&mut f);
        // The holder asks before its release: lost, and asking again
        // changes nothing (the release still says so).
        for _ in 0..2 {
            match f.check(a, &r) {
                Response::Error {
                    code: ErrorCode::Lost,
                    message,
                } => assert!(message.contains("release it"), "{message}"),
                other => panic!("expected Lost, got {other:?}"),
            }
        }
        assert!(f.queued(b, 2, "global/k", false));
        // Even a new node grant does not let b in while a's lost hold stays.
        f.m.node_event(&f.table, granted("global/k", 9), &mut f.w);
        assert_eq!(answered_token(&mut f), None);
        match f.release(a, &r) {
            Response::Error {
                code: ErrorCode::Lost,
                message,
            } => {
                assert!(message.contains("lease"), "{message}");
                // One sentence a person reads: no run of spaces left by a
                // string broken across source lines.
                assert!(!message.contains("  "), "{message:?}");
            }
            other => panic!("expected Lost, got {other:?}"),
        }
        assert!(answered_token(&mut f).is_some_and(|t| t > token));
    }

    /// Regression (found by the `gate_session` fuzz target): lost holds were
    /// named by `(client, token)`, but tokens are per key, so a local key's
    /// hold with the same token as a lost global hold of the same client was
    /// called lost too, and its release forgot the global hold's loss (whose
    /// `Check` then answered `Holding` without a node grant).
    #[test]
    fn a_lost_global_hold_does_not_make_a_local_hold_with_the_same_token_lost() {
        let (mut f, _script) = clustered();
        let a = f.client(100);
        let local = f.acquire(a, 1, "local/k", false);
        let Response::Granted { token, .. } = local else {
            panic!("{local:?}")
        };
        // A node grant whose first token is the local hold's token.
        assert!(f.queued(a, 2, "global/k", false));
        let grant = Event::Granted {
            key: b"global/k".to_vec(),
            shared: false,
            base: token - 1,
            epoch: 1,
            prefetch: false,
        };
        f.m.node_event(&f.table, grant, &mut f.w);
        assert_eq!(answered_token(&mut f), Some(token), "the same token");
        let global = grant_of_k(&f, token);
        fence(&mut f);
        assert_eq!(f.check(a, &local), Response::Holding, "a local key");
        assert_eq!(f.release(a, &local), Response::Released);
        assert!(
            matches!(
                f.check(a, &global),
                Response::Error {
                    code: ErrorCode::Lost,
                    ..
                }
            ),
            "the global hold is still lost"
        );
    }

    #[test]
    fn a_used_grant_waits_out_the_minimum_hold_on_a_callback_but_yields_at_once_to_a_hint() {
        let (mut f, script) = clustered();
        script.borrow_mut().min_hold_ms = 1_000_000;
        let c = f.client(100);
        assert!(f.queued(c, 1, "global/k", false));
        f.m.node_event(&f.table, granted("global/k", 7), &mut f.w);
        let token = answered_token(&mut f).expect("granted");
        let r = grant_of_k(&f, token);
        assert_eq!(f.release(c, &r), Response::Released);
        script.borrow_mut().sent.clear();
        let key = b"global/k".to_vec();
        f.m.node_event(&f.table, Event::Callback { key: key.clone() }, &mut f.w);
        assert!(
            script.borrow().sent.is_empty(),
            "released inside the minimum hold"
        );
        // Still granted locally inside the minimum hold.
        assert!(matches!(
            f.acquire(c, 2, "global/k", false),
            Response::Granted { .. }
        ));
        let (mut f, script) = clustered();
        script.borrow_mut().min_hold_ms = 1_000_000;
        let c = f.client(100);
        assert!(f.queued(c, 1, "global/k", false));
        f.m.node_event(&f.table, granted("global/k", 7), &mut f.w);
        let token = answered_token(&mut f).expect("granted");
        let r = grant_of_k(&f, token);
        assert_eq!(f.release(c, &r), Response::Released);
        script.borrow_mut().sent.clear();
        f.m.node_event(&f.table, Event::Hint { key: key.clone() }, &mut f.w);
        assert_eq!(
            script.borrow().sent,
            vec![Command::Release { key, epoch: 1 }]
        );
    }

    /// A grant that arrives while the lease is past its safe time (a renewal
    /// late under load) was dropped silently: the agent kept the key at etcd
    /// and every other host waited for it for good.
    #[test]
    fn a_grant_arriving_past_the_leases_safe_time_is_handed_back_to_the_agent() {
        let (mut f, script) = clustered();
        let c = f.client(100);
        assert!(f.queued(c, 1, "global/k", false));
        script.borrow_mut().lease_valid = false;
        script.borrow_mut().sent.clear();
        f.m.node_event(&f.table, granted("global/k", 7), &mut f.w);
        assert_eq!(answered_token(&mut f), None, "granted past the safe time");
        assert_eq!(
            script.borrow().sent,
            vec![Command::Release {
                key: b"global/k".to_vec(),
                epoch: 1
            }]
        );
        // Once released, the waiter's Want goes out again.
        script.borrow_mut().lease_valid = true;
        script.borrow_mut().sent.clear();
        f.m.node_event(
            &f.table,
            Event::Released {
                key: b"global/k".to_vec(),
            },
            &mut f.w,
        );
        assert_eq!(script.borrow().sent, vec![want("global/k")]);
    }

    /// Client `a` takes global/k through the broker once (the node grant,
    /// revision 7, comes to this host) and releases it: the key is then
    /// cached here and prepared. Returns that first grant's token.
    fn cache_global_k(f: &mut Fixture, a: u32) -> u64 {
        assert!(f.queued(a, 1, "global/k", false));
        f.m.node_event(&f.table, granted("global/k", 7), &mut f.w);
        let first = answered_token(f).expect("granted");
        assert_eq!(f.release(a, &grant_of_k(f, first)), Response::Released);
        first
    }

    /// A client's own fast-path grant of global/k: (slot, held word, token),
    /// checked as the client library does (CAS, then the slot's limit).
    fn take_global_by_cas(f: &Fixture, client: u32) -> Option<(u32, Word, u64)> {
        let (s, w) = f.table.lookup(b"global/k", key_hash(b"global/k"))?;
        let slot = f.table.slot(s).unwrap();
        let held = try_acquire_exclusive(&slot.word, w.generation(), client)
            .ok()?
            .held;
        if !slot.may_grant_now() {
            assert!(try_release_exclusive(&slot.word, held), "given back");
            return None;
        }
        let token = slot.token_base.load(Ordering::Relaxed) + held.counter() as u64;
        Some((s, held, token))
    }

    /// Issue 11's cached global key at CAS speed: once this host holds the
    /// node grant, the key is prepared with the lease's safe time, and its
    /// tokens continue the node grant's.
    #[test]
    fn a_cached_global_key_is_taken_by_one_cas_until_the_leases_safe_time() {
        let (mut f, script) = clustered();
        script.borrow_mut().safe_until_ns = shm_layout::monotonic_ns() + 60_000_000_000;
        let (a, b) = (f.client(100), f.client(101));
        let first = cache_global_k(&mut f, a);
        let (s, held, token) = take_global_by_cas(&f, b).expect("prepared");
        let slot = f.table.slot(s).unwrap();
        assert_eq!(
            slot.grant_until_ns.load(Ordering::Relaxed),
            script.borrow().safe_until_ns
        );
        assert_eq!(token, first + 1, "the node grant's counter goes on");
        assert!(try_release_exclusive(&slot.word, held));
        // The safe time passes: a client's CAS is given back, and the tick
        // takes the slot over.
        slot.grant_until_ns.store(1, Ordering::Relaxed);
        assert_eq!(take_global_by_cas(&f, b), None);
        script.borrow_mut().safe_until_ns = 0;
        f.m.check_leases(&f.table);
        assert!(!f.word("global/k").is_prepared());
    }

    /// Another host queues: the callback takes the prepared slot over, so
    /// the fast-path holder becomes a holder the gate waits for, and the
    /// tokens clients issued themselves stay below every later one.
    #[test]
    fn a_callback_takes_a_prepared_global_key_over_before_the_node_grant_goes() {
        let (mut f, script) = clustered();
        let (a, b) = (f.client(100), f.client(101));
        cache_global_k(&mut f, a);
        for _ in 0..3 {
            let (s, held, _) = take_global_by_cas(&f, b).expect("prepared");
            assert!(try_release_exclusive(&f.table.slot(s).unwrap().word, held));
        }
        let (_, _, fast_token) = take_global_by_cas(&f, b).expect("prepared");
        script.borrow_mut().sent.clear();
        f.m.node_event(
            &f.table,
            Event::Callback {
                key: b"global/k".to_vec(),
            },
            &mut f.w,
        );
        assert!(!f.word("global/k").is_prepared(), "taken over");
        assert!(
            script.borrow().sent.is_empty(),
            "b still holds: the node grant stays: {:?}",
            script.borrow().sent
        );
        // b's CAS release fails now; it releases through the broker.
        assert_eq!(
            f.release(b, &grant_of_k(&f, fast_token)),
            Response::Released
        );
        assert!(
            script.borrow().sent.contains(&Command::Release {
                key: b"global/k".to_vec(),
                epoch: 1
            }),
            "{:?}",
            script.borrow().sent
        );
        f.m.node_event(
            &f.table,
            Event::Released {
                key: b"global/k".to_vec(),
            },
            &mut f.w,
        );
        assert!(f.queued(a, 2, "global/k", false));
        f.m.node_event(&f.table, granted("global/k", 9), &mut f.w);
        let next = answered_token(&mut f).expect("granted");
        assert!(next > fast_token, "{next:#x} after {fast_token:#x}");
    }

    /// A waiter here while a client holds the key by CAS: the take-over
    /// folds the fast tokens into the node grant's counter, so the waiter's
    /// token is above them.
    #[test]
    fn a_broker_grant_after_fast_grants_of_a_global_key_is_above_their_tokens() {
        let (mut f, _script) = clustered();
        let (a, b, c) = (f.client(100), f.client(101), f.client(102));
        cache_global_k(&mut f, a);
        for _ in 0..5 {
            let (s, held, _) = take_global_by_cas(&f, b).expect("prepared");
            assert!(try_release_exclusive(&f.table.slot(s).unwrap().word, held));
        }
        let (_, _, fast_token) = take_global_by_cas(&f, b).expect("prepared");
        assert!(f.queued(c, 3, "global/k", false), "b holds");
        assert_eq!(
            f.release(b, &grant_of_k(&f, fast_token)),
            Response::Released
        );
        let (state, tc, _) = f.cell(c, 3);
        assert_eq!(state, CELL_GRANTED);
        assert!(tc > fast_token, "{tc:#x} after {fast_token:#x}");
    }

    /// The lease is lost while a client holds the key by CAS: the slot is
    /// taken over, so the hold is lost (its release says so) and nobody
    /// here can take the key by CAS any more.
    #[test]
    fn a_fence_takes_prepared_global_keys_over_and_their_fast_holders_are_lost() {
        let (mut f, _script) = clustered();
        let (a, b) = (f.client(100), f.client(101));
        cache_global_k(&mut f, a);
        let (_, _, fast_token) = take_global_by_cas(&f, b).expect("prepared");
        fence(&mut f);
        assert!(!f.word("global/k").is_prepared());
        assert!(matches!(
            f.release(b, &grant_of_k(&f, fast_token)),
            Response::Error {
                code: ErrorCode::Lost,
                ..
            }
        ));
        assert_eq!(take_global_by_cas(&f, a), None);
    }

    /// The broker stops (before its agent revokes the lease): as at a
    /// fence, prepared global keys are taken over and their fast-path
    /// holders are lost, and no Want goes out for the waiters left.
    #[test]
    fn giving_the_node_grants_up_at_stop_takes_prepared_keys_over_and_loses_their_holders() {
        let (mut f, script) = clustered();
        let (a, b, c) = (f.client(100), f.client(101), f.client(102));
        cache_global_k(&mut f, a);
        let (_, _, fast_token) = take_global_by_cas(&f, b).expect("prepared");
        assert!(f.queued(c, 3, "global/k", false), "b holds");
        script.borrow_mut().sent.clear();
        f.m.give_up_node_grants(&f.table);
        assert!(
            script.borrow().sent.is_empty(),
            "a stopping broker asks etcd for nothing more: {:?}",
            script.borrow().sent
        );
        assert!(!f.word("global/k").is_prepared());
        assert_eq!(take_global_by_cas(&f, a), None);
        assert!(matches!(
            f.release(b, &grant_of_k(&f, fast_token)),
            Response::Error {
                code: ErrorCode::Lost,
                ..
            }
        ));
        assert_eq!(answered_token(&mut f), None, "nothing granted to c");
    }

    /// A broker restarts while a client holds a global key by CAS: the new
    /// broker's node grants are new, so the old fast-path hold is lost, and
    /// the slot is taken over before any client can grant itself the key.
    #[test]
    fn a_restarted_broker_takes_over_prepared_global_keys_and_their_holders_are_lost() {
        let (mut f, script) = clustered();
        let (a, b) = (f.client(100), f.client(101));
        cache_global_k(&mut f, a);
        let (_, _, fast_token) = take_global_by_cas(&f, b).expect("prepared");
        f.restart(|_, _| true);
        f.m.set_cluster(&f.table, Box::new(Link(script.clone())));
        assert!(!f.word("global/k").is_prepared());
        f.m.hello(&f.table, 101, 0, 7, Some(b), 1).unwrap();
        assert!(matches!(
            f.release(b, &grant_of_k(&f, fast_token)),
            Response::Error {
                code: ErrorCode::Lost,
                ..
            }
        ));
    }

    /// A predicted global key: its prefetched node grant arrives before
    /// anyone here asks, and the key is prepared at once, so the first
    /// local acquisition is one CAS.
    #[test]
    fn a_prefetched_global_key_is_prepared_before_its_first_local_acquisition() {
        let (mut f, _script) = clustered();
        let b = f.client(101);
        f.m.prefetch_global(b"global/k");
        f.m.node_event(
            &f.table,
            Event::Granted {
                key: b"global/k".to_vec(),
                shared: false,
                base: 7 << 24,
                epoch: 1,
                prefetch: true,
            },
            &mut f.w,
        );
        let (_, _, token) = take_global_by_cas(&f, b).expect("prepared on arrival");
        assert_eq!(token, (7 << 24) + 1);
        assert_eq!(f.m.node_counts().unwrap().prefetch_hits, 0, "not seen yet");
        // The broker learns of the hit when it next looks at the word.
        f.m.node_event(
            &f.table,
            Event::Callback {
                key: b"global/k".to_vec(),
            },
            &mut f.w,
        );
        assert_eq!(f.m.node_counts().unwrap().prefetch_hits, 1);
    }

    /// A prefetched node grant used only on the fast path was taken for
    /// unused once the allocator's tick had looked at its lock word: the
    /// tick consumed the word's counter, so the take-over at the callback
    /// saw no fast-path grant. The grant then yielded at once (no minimum
    /// hold, as if nobody here used it) and was counted as an unused
    /// prefetch that cost the other host its wait, not as a hit (section 6
    /// of `forelock bench --cluster`: 0 hits, hundreds of "unused"
    /// prefetches that had served their keys).
    #[test]
    fn a_prefetched_grant_used_by_cas_before_a_tick_is_a_hit_and_waits_out_the_minimum_hold() {
        let (mut f, script) = clustered();
        script.borrow_mut().min_hold_ms = 1_000_000;
        let b = f.client(101);
        let key = b"global/k".to_vec();
        f.m.prefetch_global(&key);
        f.m.node_event(&f.table, prefetched("global/k", 7), &mut f.w);
        let (s, held, _) = take_global_by_cas(&f, b).expect("prepared on arrival");
        let slot = f.table.slot(s).unwrap();
        assert!(try_release_exclusive(&slot.word, held), "released by CAS");
        let mut views = Vec::new();
        f.m.tick(&f.table, 1, |_| None, &mut views, usize::MAX);
        script.borrow_mut().sent.clear();
        f.m.node_event(&f.table, Event::Callback { key: key.clone() }, &mut f.w);
        assert!(
            script.borrow().sent.is_empty(),
            "used here: it waits out the minimum hold, got {:?}",
            script.borrow().sent
        );
        let counts = f.m.node_counts().expect("clustered");
        assert_eq!(counts.prefetch_hits, 1, "{counts:?}");
        assert_eq!(counts.first_uses_waited, 0, "{counts:?}");
    }

    /// A node grant whose key lost its slot here (the allocator reclaimed
    /// it: idle past `keep_alive_ms`, not predicted) stayed until another
    /// host called it back, so that host's first acquisition, or its
    /// prefetch, paid a callback and a release on top of its etcd
    /// transaction (section 6 of `forelock bench --cluster`: every first
    /// use of a shard was a handover from the host that left it idle a
    /// third of a lap before). It is given back through the ordinary
    /// release, and asked for again on the next local request.
    #[test]
    fn a_node_grant_whose_key_lost_its_slot_is_given_back_and_asked_for_again_on_demand() {
        let (mut f, script) = clustered();
        let a = f.client(100);
        cache_global_k(&mut f, a);
        let (s, _) = f
            .table
            .lookup(b"global/k", key_hash(b"global/k"))
            .expect("a slot");
        script.borrow_mut().sent.clear();
        assert!(f.m.evict(&f.table, &f.events, s), "idle: reclaimed");
        let key = b"global/k".to_vec();
        assert_eq!(
            script.borrow().sent,
            vec![Command::Release {
                key: key.clone(),
                epoch: 1
            }]
        );
        f.m.node_event(&f.table, Event::Released { key }, &mut f.w);
        script.borrow_mut().sent.clear();
        assert!(f.queued(a, 2, "global/k", false), "no node grant here now");
        assert_eq!(script.borrow().sent, vec![want("global/k")]);
    }

    fn prefetched(key: &str, rev: u64) -> Event {
        Event::Granted {
            key: key.as_bytes().to_vec(),
            shared: false,
            base: rev << 24,
            epoch: 1,
            prefetch: true,
        }
    }

    /// A prefetch that came back after a local process had already asked for
    /// the key was counted as a hit, though that process waited for it: the
    /// hit rate ("found the node grant already here") was overstated.
    #[test]
    fn a_prefetch_that_arrives_after_the_local_request_is_not_a_hit() {
        let (mut f, _script) = clustered();
        let c = f.client(100);
        // Here first: a hit.
        f.m.prefetch_global(b"global/k");
        f.m.node_event(&f.table, prefetched("global/k", 7), &mut f.w);
        let r = f.acquire(c, 1, "global/k", false);
        assert!(matches!(r, Response::Granted { .. }), "{r:?}");
        // Asked for, then requested here before it came: waited.
        f.m.prefetch_global(b"global/j");
        assert!(f.queued(c, 2, "global/j", false));
        f.m.node_event(&f.table, prefetched("global/j", 8), &mut f.w);
        assert!(answered_token(&mut f).is_some(), "the waiter is granted");
        // On demand: waited.
        assert!(f.queued(c, 3, "global/i", false));
        f.m.node_event(&f.table, granted("global/i", 9), &mut f.w);
        assert!(answered_token(&mut f).is_some(), "the waiter is granted");
        let counts = f.m.node_counts().expect("clustered");
        assert_eq!(counts.prefetch_hits, 1, "{counts:?}");
        assert_eq!(counts.first_uses_waited, 2, "{counts:?}");
        // Later local grants under the same node grants count no more.
        f.release(c, &r);
        assert!(matches!(
            f.acquire(c, 1, "global/k", false),
            Response::Granted { .. }
        ));
        assert_eq!(f.m.node_counts(), Some(counts));
    }

    #[test]
    fn an_unused_prefetch_counts_the_wait_it_cost_another_host_and_a_used_one_does_not() {
        let (mut f, script) = clustered();
        let c = f.client(100);
        let key = b"global/k".to_vec();
        // Used, then called back and released: no cost counted.
        f.m.prefetch_global(&key);
        f.m.node_event(&f.table, prefetched("global/k", 7), &mut f.w);
        let r = f.acquire(c, 1, "global/k", false);
        f.release(c, &r);
        f.m.node_event(&f.table, Event::Callback { key: key.clone() }, &mut f.w);
        std::thread::sleep(std::time::Duration::from_millis(2));
        f.m.node_event(&f.table, Event::Released { key: key.clone() }, &mut f.w);
        let counts = f.m.node_counts().expect("clustered");
        assert_eq!(
            (counts.prefetch_unused, counts.prefetch_unused_wait_us),
            (0, 0)
        );
        // Unused: it yields at once to the callback, and the time the other
        // host waited, from the callback to the release, is counted.
        script.borrow_mut().sent.clear();
        f.m.prefetch_global(&key);
        f.m.node_event(&f.table, prefetched("global/k", 9), &mut f.w);
        f.m.node_event(&f.table, Event::Callback { key: key.clone() }, &mut f.w);
        assert!(
            script.borrow().sent.contains(&Command::Release {
                key: key.clone(),
                epoch: 1
            }),
            "an unused prefetch yields at once: {:?}",
            script.borrow().sent
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
        f.m.node_event(&f.table, Event::Released { key }, &mut f.w);
        let counts = f.m.node_counts().expect("clustered");
        assert_eq!(counts.prefetch_unused, 1);
        assert!(counts.prefetch_unused_wait_us >= 2_000, "{counts:?}");
    }

    /// The event loop stays awake for queued waiters only when a local
    /// holder's release is coming, not while they wait for a node grant
    /// (the spinning took the CPU the agent and etcd needed).
    #[test]
    fn only_a_waiter_behind_a_local_holder_keeps_the_broker_awake() {
        let (mut f, _script) = clustered();
        let (a, b) = (f.client(100), f.client(101));
        assert!(f.queued(a, 1, "global/k", false), "no node grant yet");
        assert!(!f.m.awaits_local_release());
        let g = f.acquire(a, 2, "local/k", false);
        assert!(matches!(g, Response::Granted { .. }));
        assert!(f.queued(b, 3, "local/k", false));
        assert!(f.m.awaits_local_release());
    }
}

/// Not a test, a measurement: `cargo test -p forelockd --release --lib --
/// --ignored --nocapture tick_cost`. The CPU time of one allocator tick
/// (keep-alive) on tables 80% full of idle keys (under the budget: nothing
/// is evicted or reclaimed, every tick sees the same table), swept whole
/// (as before issue 12's bound) and with the default `sweep_slots`: the
/// longest the event loop stops serving requests, every `tick_ms`.
#[test]
#[ignore = "a measurement, run on demand with --release"]
fn tick_cost() {
    let default_sweep = crate::config::Config::default_config()
        .allocator
        .sweep_slots;
    for slots in [16_384u32, 262_144, 1 << 20] {
        let mut f = fixture(slots, 4, Policy::KeepAlive);
        let keys = slots / 10 * 8;
        many_distinct_keys(&mut f, keys);
        let mut per_tick = |sweep: u32| {
            let mut config = crate::config::Config::default_config();
            config.allocator.keep_alive_ms = 1 << 40;
            config.allocator.sweep_slots = sweep;
            f.alloc = crate::allocator_glue::Allocation::new(&config);
            let ticks = 20u64;
            let start = shm_layout::thread_cpu_ns();
            for _ in 0..ticks {
                f.alloc.tick_on(&mut f.m, &f.table, &f.events, None, f.now);
            }
            assert_eq!(f.m.dir.keys.len() as u32, keys, "nothing left");
            (shm_layout::thread_cpu_ns() - start) as f64 / ticks as f64 / 1e6
        };
        let (whole, swept) = (per_tick(u32::MAX), per_tick(default_sweep));
        println!(
            "{keys} keyed slots: CPU per tick {whole:.3} ms swept whole, {swept:.3} ms \
             {default_sweep} at a time ({:.0}x less)",
            whole / swept
        );
    }
}
