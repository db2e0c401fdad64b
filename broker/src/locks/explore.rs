//! An exhaustive explorer of the grant engine: breadth-first over every
//! interleaving of client and broker steps up to a depth, driving the real
//! [`LockManager`] on a heap table and ledger, with the clients' half of the
//! protocol modelled as the client library behaves. After every step it
//! checks the promises:
//!
//! 1. never two exclusive holders of a key, and no exclusive holder beside
//!    shared ones (among the live clients that believe they hold it);
//! 2. every grant's token is larger than every earlier grant's for the key;
//! 3. no waiter starves while its key is free ([`LockManager::check`]);
//! 4. a live client's locks are never released by anyone but itself: the
//!    word (or the broker's mirror of it) still names each holder;
//! 5. a dead client's locks are always released: nothing names it any more,
//!    and the ledger forgot it;
//! 6. the ledger agrees with the manager ([`LockManager::check`]), so a
//!    restart at any step rebuilds the same holders.
//!
//! Steps: fast acquire (lookup + CAS), slow acquire (exclusive, shared,
//! try), release (fast CAS or through the broker), queue, hand-off (the
//! answer reaches the waiter), cancel after a timeout, a connection dropped
//! while queued (what a scribbled wait cell or a broker stall makes the
//! client do: it re-sends the same request on a new connection), `Bye`,
//! process death (the pidfd), eviction of an idle slot, a broker restart
//! (SIGKILL and adoption of the table and ledger) at any step, and one
//! scribble per run of a client-writable field: a lock word or a token base
//! (which breaks that key only: promises 1, 2 and 4 are then not checked for
//! it), the header's token floor, a client record's hold mirror or state, or
//! an index entry (which must break nothing).
//!
//! Bounds (written here because they are the claim): the configurations in
//! the tests below (clients, keys, depth); a restart happens between two
//! engine calls, not inside one (the ledger's write order covers a SIGKILL
//! inside one; see `crate::ledger`); a client runs one call at a time.
//! `FORELOCK_EXPLORE_DEPTH` raises the depth for a long local run.

use super::tests::{Buf, CountingWaker, new_events, new_table};
use super::*;
use shm_layout::lockword::{try_acquire_exclusive, try_release_exclusive};
use std::collections::HashSet;
use std::hash::{Hash, Hasher};

const KEYS: [&[u8]; 3] = [b"a", b"b", b"c"];

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
enum Have {
    Idle,
    Holding {
        key: usize,
        slot: u32,
        token: u64,
        /// The word our fast-path CAS wrote.
        fast: Option<u64>,
        shared: bool,
    },
    Queued {
        key: usize,
        shared: bool,
        request: u64,
        conn: ConnId,
    },
    /// Said `Bye` or died.
    Gone,
}

/// A client process with `lanes` threads, each running one call at a time
/// (so one client can hold a key while it waits for another).
#[derive(Clone, Debug, Hash)]
struct Client {
    pid: u32,
    record: u32,
    lanes: Vec<Have>,
    next_request: u64,
    next_conn: u64,
    alive: bool,
}

impl Client {
    fn new_conn(&mut self) -> ConnId {
        self.next_conn += 1;
        (self.pid as u64) << 32 | self.next_conn
    }
}

/// A client is `(client, lane)`.
type Who = (usize, usize);

#[derive(Clone, Copy, Debug)]
enum Step {
    Fast(Who, usize),
    Slow(Who, usize, bool, bool),
    Release(Who),
    Cancel(Who),
    DropConn(Who),
    Bye(usize),
    Die(usize),
    Evict(u32),
    Restart,
    Scribble(Scribble),
}

#[derive(Clone, Copy, Debug)]
enum Scribble {
    /// A lock word set to "prepared, free": breaks that key.
    Word(usize),
    /// A token base lowered to 0: breaks that key's tokens.
    TokenBase(usize),
    Floor,
    HoldMirror(u32),
    RecordState(u32),
    Index,
}

struct State {
    table_buf: Buf,
    m: LockManager,
    clients: Vec<Client>,
    broken: Vec<bool>,
    scribbled: bool,
    restarts: u32,
    max_token: Vec<u64>,
    trace: Vec<Step>,
}

struct Explorer {
    keys: usize,
    lanes: usize,
    events: (Buf, EventsView),
    max_restarts: u32,
    scribbles: bool,
}

fn view(buf: &Buf) -> TableView {
    // SAFETY: the buffer is a 64-aligned heap table of its full size, alive
    // for as long as the view is used (within one step).
    unsafe { TableView::new(buf.ptr, buf.len()) }.expect("a valid table")
}

impl State {
    fn fork(&self) -> State {
        State {
            table_buf: self.table_buf.copy(),
            m: self.m.fork(),
            clients: self.clients.clone(),
            broken: self.broken.clone(),
            scribbled: self.scribbled,
            restarts: self.restarts,
            max_token: self.max_token.clone(),
            trace: self.trace.clone(),
        }
    }

    fn digest(&self) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        // Everything below the header: the header holds only statistics,
        // the floor copy and the epoch, which the engine never reads back.
        self.table_buf.bytes_ref()[shm_layout::table::HEADER_SIZE..].hash(&mut h);
        self.m.ledger.snapshot().hash(&mut h);
        self.m.digest(&mut h);
        self.clients.hash(&mut h);
        (&self.broken, self.scribbled, self.restarts, &self.max_token).hash(&mut h);
        h.finish()
    }
}

impl Explorer {
    fn initial(&self, clients: usize) -> State {
        let (table_buf, table) = new_table(4, 4);
        let mut w = CountingWaker::default();
        let mut m = LockManager::adopt(
            &table,
            Ledger::on_heap(4, 4),
            Policy::KeepAlive,
            Limits::for_table(8),
            1,
            0,
            |_, _| true,
            &mut w,
        );
        let clients = (0..clients)
            .map(|i| {
                let pid = 100 + i as u32;
                let Ok(Registered::New { client }) = m.hello(&table, pid, 0, 1, None, 0) else {
                    panic!("registration")
                };
                Client {
                    pid,
                    record: client,
                    lanes: vec![Have::Idle; self.lanes],
                    next_request: 0,
                    next_conn: 0,
                    alive: true,
                }
            })
            .collect();
        State {
            table_buf,
            m,
            clients,
            broken: vec![false; self.keys],
            scribbled: false,
            restarts: 0,
            max_token: vec![0; self.keys],
            trace: Vec::new(),
        }
    }

    fn steps(&self, s: &State) -> Vec<Step> {
        let mut out = Vec::new();
        for (i, c) in s.clients.iter().enumerate() {
            if !c.alive {
                continue;
            }
            for (l, have) in c.lanes.iter().enumerate() {
                let who = (i, l);
                match have {
                    Have::Idle => {
                        for k in 0..self.keys {
                            out.push(Step::Fast(who, k));
                            out.push(Step::Slow(who, k, false, true));
                            out.push(Step::Slow(who, k, true, true));
                            out.push(Step::Slow(who, k, false, false));
                        }
                    }
                    Have::Holding { .. } => out.push(Step::Release(who)),
                    Have::Queued { .. } => {
                        out.push(Step::Cancel(who));
                        out.push(Step::DropConn(who));
                    }
                    Have::Gone => {}
                }
            }
            if c.lanes.iter().all(|h| *h == Have::Idle) {
                out.push(Step::Bye(i));
            }
            out.push(Step::Die(i));
        }
        let table = view(&s.table_buf);
        for slot in 0..table.geometry().slot_count {
            if table
                .slot(slot)
                .is_some_and(|sl| sl.key_len.load(Ordering::Relaxed) > 0)
            {
                out.push(Step::Evict(slot));
            }
        }
        if s.restarts < self.max_restarts {
            out.push(Step::Restart);
        }
        if self.scribbles && !s.scribbled {
            for k in 0..self.keys {
                out.push(Step::Scribble(Scribble::Word(k)));
                out.push(Step::Scribble(Scribble::TokenBase(k)));
            }
            out.push(Step::Scribble(Scribble::Floor));
            out.push(Step::Scribble(Scribble::HoldMirror(s.clients[0].record)));
            out.push(Step::Scribble(Scribble::RecordState(s.clients[0].record)));
            out.push(Step::Scribble(Scribble::Index));
        }
        out
    }

    /// Apply `step` to `s` and check every promise. `Err` names the broken one.
    fn apply(&self, s: &mut State, step: Step) -> Result<(), String> {
        s.trace.push(step);
        let table = view(&s.table_buf);
        let events = &self.events.1;
        let mut w = CountingWaker::default();
        match step {
            Step::Fast((i, l), k) => {
                let record = s.clients[i].record;
                if let Some((slot, seen)) = table.lookup(KEYS[k], key_hash(KEYS[k])) {
                    let sl = table.slot(slot).expect("in range");
                    if let Ok(g) = try_acquire_exclusive(&sl.word, seen.generation(), record) {
                        if sl.key_equals(KEYS[k]) {
                            let token = sl
                                .token_base
                                .load(Ordering::Relaxed)
                                .wrapping_add(g.held.counter() as u64);
                            granted(s, (i, l), k, slot, token, Some(g.held.0), false)?;
                        } else {
                            assert!(try_release_exclusive(&sl.word, g.held));
                        }
                    }
                }
            }
            Step::Slow((i, l), k, shared, queue) => {
                let c = &mut s.clients[i];
                c.next_request += 1;
                let (request, conn) = (c.next_request, c.new_conn());
                let r = s.m.acquire(
                    &table, events, c.record, conn, 0, request, KEYS[k], shared, queue,
                );
                answered(s, (i, l), k, shared, request, conn, r)?;
            }
            Step::Release((i, l)) => {
                let c = &s.clients[i];
                let Have::Holding {
                    key,
                    slot,
                    token,
                    fast,
                    ..
                } = c.lanes[l]
                else {
                    unreachable!()
                };
                let by_cas = fast.is_some_and(|held| {
                    try_release_exclusive(&table.slot(slot).expect("in range").word, Word(held))
                });
                if !by_cas {
                    let r = s.m.release(&table, c.record, slot, token, &mut w);
                    // A scribbled key may refuse its holder: that key is broken.
                    if r != Response::Released && !s.broken[key] {
                        return Err(format!("{} could not release its lock: {r:?}", c.pid));
                    }
                }
                s.clients[i].lanes[l] = Have::Idle;
            }
            Step::Cancel((i, l)) => {
                let c = &s.clients[i];
                let Have::Queued {
                    key,
                    shared,
                    request,
                    conn,
                } = c.lanes[l]
                else {
                    unreachable!()
                };
                let r = s.m.cancel(&table, c.record, conn, request, &mut w);
                s.clients[i].lanes[l] = Have::Idle;
                match r {
                    Response::Cancelled => {}
                    Response::Granted { .. } => answered(s, (i, l), key, shared, request, conn, r)?,
                    other => return Err(format!("cancel answered {other:?}")),
                }
            }
            Step::DropConn((i, l)) => {
                let c = &mut s.clients[i];
                let Have::Queued {
                    key,
                    shared,
                    request,
                    conn,
                } = c.lanes[l]
                else {
                    unreachable!()
                };
                let record = c.record;
                let new_conn = c.new_conn();
                s.m.conn_closed(&table, conn, &mut w);
                deliver(s, &mut w)?;
                // The client asks again, same request id, new connection.
                let r = s.m.acquire(
                    &table, events, record, new_conn, 0, request, KEYS[key], shared, true,
                );
                answered(s, (i, l), key, shared, request, new_conn, r)?;
            }
            Step::Bye(i) => {
                s.m.bye(&table, s.clients[i].record, &mut w);
                s.clients[i].alive = false;
            }
            Step::Die(i) => {
                s.clients[i].alive = false;
                s.clients[i].lanes.fill(Have::Gone);
                s.m.client_gone(&table, s.clients[i].record, &mut w);
            }
            Step::Evict(slot) => {
                s.m.tick(&table, 0);
                s.m.evict(&table, events, slot);
            }
            Step::Restart => {
                s.restarts += 1;
                let alive: HashSet<u32> = s
                    .clients
                    .iter()
                    .filter(|c| c.alive)
                    .map(|c| c.pid)
                    .collect();
                s.m.readopt(&table, |pid, _| alive.contains(&pid), &mut w);
                // Every live client re-attaches; a queued lane asks again.
                for i in 0..s.clients.len() {
                    if !s.clients[i].alive {
                        continue;
                    }
                    let (pid, record) = (s.clients[i].pid, s.clients[i].record);
                    if let Err(e) = s.m.hello(&table, pid, 0, 1, Some(record), 0) {
                        return Err(format!("live client {pid} lost its record: {e:?}"));
                    }
                    for l in 0..s.clients[i].lanes.len() {
                        if let Have::Queued {
                            key,
                            shared,
                            request,
                            ..
                        } = s.clients[i].lanes[l]
                        {
                            let conn = s.clients[i].new_conn();
                            let r = s.m.acquire(
                                &table, events, record, conn, 0, request, KEYS[key], shared, true,
                            );
                            answered(s, (i, l), key, shared, request, conn, r)?;
                        }
                    }
                }
            }
            Step::Scribble(what) => {
                s.scribbled = true;
                scribble(s, &table, what);
            }
        }
        deliver(s, &mut w)?;
        check(s)
    }
}

/// Lane `who` learnt a grant of key `k`.
fn granted(
    s: &mut State,
    (i, l): Who,
    k: usize,
    slot: u32,
    token: u64,
    fast: Option<u64>,
    shared: bool,
) -> Result<(), String> {
    if !s.broken[k] {
        if token <= s.max_token[k] {
            return Err(format!(
                "key {k}: token {token} granted after {}",
                s.max_token[k]
            ));
        }
        s.max_token[k] = token;
    }
    s.clients[i].lanes[l] = Have::Holding {
        key: k,
        slot,
        token,
        fast,
        shared,
    };
    Ok(())
}

/// The broker answered lane `who`'s acquire (or cancel) of key `k`.
fn answered(
    s: &mut State,
    who: Who,
    k: usize,
    shared: bool,
    request: u64,
    conn: ConnId,
    r: Response,
) -> Result<(), String> {
    match r {
        Response::Granted { slot, token, .. } => granted(s, who, k, slot, token, None, shared),
        Response::Queued { .. } => {
            s.clients[who.0].lanes[who.1] = Have::Queued {
                key: k,
                shared,
                request,
                conn,
            };
            Ok(())
        }
        Response::WouldBlock | Response::Error { .. } => {
            s.clients[who.0].lanes[who.1] = Have::Idle;
            Ok(())
        }
        other => Err(format!("acquire answered {other:?}")),
    }
}

/// Hand-off answers reach the lane whose connection they name (an answer
/// for a connection that is gone is lost, as on a real socket).
fn deliver(s: &mut State, w: &mut CountingWaker) -> Result<(), String> {
    for (conn, r) in std::mem::take(&mut w.1) {
        let found = s.clients.iter().enumerate().find_map(|(i, c)| {
            c.lanes.iter().enumerate().find_map(|(l, h)| match *h {
                Have::Queued {
                    key,
                    shared,
                    request,
                    conn: q,
                } if q == conn => Some(((i, l), key, shared, request)),
                _ => None,
            })
        });
        if let Some((who, key, shared, request)) = found {
            answered(s, who, key, shared, request, conn, r)?;
        }
    }
    Ok(())
}

fn scribble(s: &mut State, table: &TableView, what: Scribble) {
    let slot_of = |k: usize| table.lookup(KEYS[k], key_hash(KEYS[k])).map(|(s, _)| s);
    match what {
        Scribble::Word(k) => {
            s.broken[k] = true;
            if let Some(sl) = slot_of(k).and_then(|x| table.slot(x)) {
                let w = Word(sl.word.load(Ordering::Relaxed));
                let free = Word::new(w.generation(), shm_layout::lockword::PREPARED, 0, 0);
                sl.word.store(free.0, Ordering::Relaxed);
            }
        }
        Scribble::TokenBase(k) => {
            s.broken[k] = true;
            if let Some(sl) = slot_of(k).and_then(|x| table.slot(x)) {
                sl.token_base.store(0, Ordering::Relaxed);
            }
        }
        Scribble::Floor => table
            .header()
            .token_floor
            .store(u64::MAX - 1, Ordering::Relaxed),
        Scribble::HoldMirror(c) => {
            for h in &table.client(c).expect("in range").broker_holds {
                h.store(1, Ordering::Relaxed);
            }
        }
        Scribble::RecordState(c) => table
            .client(c)
            .expect("in range")
            .state
            .store(0, Ordering::Relaxed),
        Scribble::Index => {
            for p in 0..table.geometry().index_len {
                table
                    .index_entry(p)
                    .expect("in range")
                    .0
                    .store(IndexEntry::pack(0, 0), Ordering::Relaxed);
            }
        }
    }
}

/// The promises, after every step.
fn check(s: &State) -> Result<(), String> {
    s.m.check()?;
    let table = view(&s.table_buf);
    for k in 0..s.broken.len() {
        if s.broken[k] {
            continue;
        }
        let holders: Vec<(u32, bool, u32)> = s
            .clients
            .iter()
            .filter(|c| c.alive)
            .flat_map(|c| {
                c.lanes.iter().filter_map(|h| match *h {
                    Have::Holding {
                        key, shared, slot, ..
                    } if key == k => Some((c.record, shared, slot)),
                    _ => None,
                })
            })
            .collect();
        let exclusive = holders.iter().filter(|(_, sh, _)| !sh).count();
        if exclusive > 1 || (exclusive == 1 && holders.len() > 1) {
            return Err(format!("key {k} has holders {holders:?}"));
        }
        // Promise 4: the table still says so (the word, or the mirror of
        // the broker's holder).
        for &(record, shared, slot) in &holders {
            let w = table
                .slot(slot)
                .map(|sl| sl.word_acquire())
                .ok_or(format!("key {k} is held by {record} in no slot"))?;
            let ok = if shared {
                !w.is_exclusive() && w.holders() > 0
            } else {
                w.exclusive_owner() == Some(record)
            };
            if !ok {
                return Err(format!(
                    "key {k} held by {record} (shared {shared}) but the word is {w:?}"
                ));
            }
        }
    }
    // Promise 5: nothing names a client that is gone.
    for c in s.clients.iter().filter(|c| !c.alive) {
        for slot in 0..table.geometry().slot_count {
            let sl = table.slot(slot).expect("in range");
            let w = sl.word_acquire();
            let key = sl.key_bytes();
            let broken = KEYS
                .iter()
                .position(|k| *k == key.as_slice())
                .is_some_and(|k| k < s.broken.len() && s.broken[k]);
            if !broken && w.exclusive_owner() == Some(c.record) {
                return Err(format!(
                    "slot {slot} still held by gone client {}: {w:?}",
                    c.pid
                ));
            }
        }
    }
    Ok(())
}

/// Breadth-first to `depth`, deduplicating states. Returns the states seen.
fn explore(ex: &Explorer, clients: usize, depth: usize) -> usize {
    let mut seen = HashSet::new();
    let mut frontier = vec![ex.initial(clients)];
    seen.insert(frontier[0].digest());
    for level in 1..=depth {
        let mut next = Vec::new();
        for s in &frontier {
            for step in ex.steps(s) {
                let mut t = s.fork();
                if let Err(why) = ex.apply(&mut t, step) {
                    panic!("{why}\nafter {:?}", t.trace);
                }
                // The last level is checked, not kept: memory stays that of
                // the level before.
                if seen.insert(t.digest()) && level < depth {
                    next.push(t);
                }
            }
        }
        frontier = next;
    }
    seen.len()
}

fn depth(default: usize) -> usize {
    std::env::var("FORELOCK_EXPLORE_DEPTH")
        .ok()
        .and_then(|d| d.parse().ok())
        .unwrap_or(default)
}

#[test]
fn two_clients_two_keys_with_restarts_and_scribbles() {
    let ex = Explorer {
        keys: 2,
        lanes: 2,
        events: new_events(8),
        max_restarts: 2,
        scribbles: true,
    };
    let states = explore(&ex, 2, depth(4));
    eprintln!("explored {states} states");
    assert!(states > 1000, "the explorer went nowhere: {states} states");
}

#[test]
fn three_clients_one_key_with_restarts() {
    let ex = Explorer {
        keys: 1,
        lanes: 1,
        events: new_events(8),
        max_restarts: 1,
        scribbles: false,
    };
    let states = explore(&ex, 3, depth(6));
    eprintln!("explored {states} states");
    assert!(states > 1000, "the explorer went nowhere: {states} states");
}

/// The explorer finds a planted bug: a manager that forgets a fast-path
/// hold it took over at restart (defect 1 of "Never two holders") is caught.
#[test]
fn the_explorer_catches_a_forgotten_take_over() {
    let ex = Explorer {
        keys: 1,
        lanes: 1,
        events: new_events(8),
        max_restarts: 1,
        scribbles: false,
    };
    let mut s = ex.initial(2);
    for step in [
        Step::Slow((0, 0), 0, false, true),
        Step::Release((0, 0)),
        Step::Fast((0, 0), 0),
        Step::Slow((1, 0), 0, false, true),
    ] {
        ex.apply(&mut s, step).unwrap();
    }
    // Plant the bug: the ledger loses client 0's taken-over hold.
    let record = s.clients[0].record;
    let slot = match s.clients[0].lanes[0] {
        Have::Holding { slot, .. } => slot,
        ref other => panic!("{other:?}"),
    };
    s.m.ledger.remove_hold(record, slot, None);
    let why = ex
        .apply(&mut s, Step::Restart)
        .expect_err("a double grant went unnoticed");
    assert!(why.contains("has holders"), "{why}");
}
