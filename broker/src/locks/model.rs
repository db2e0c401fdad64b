//! The model of the grant engine's world that the explorer (`explore.rs`)
//! and the `engine_session` fuzz target drive. The explorer goes breadth-first over every
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
//! try; an exclusive grant the broker made as a fast-path hold is
//! recognised as the client library does), release (fast CAS or through
//! the broker), queue, hand-off (the
//! answer reaches the waiter), cancel after a timeout, a connection dropped
//! while queued (what a scribbled wait cell or a broker stall makes the
//! client do: it re-sends the same request on a new connection), `Bye`,
//! process death (the pidfd), eviction of an idle slot, a key's counter
//! spent to its last value by fast-path grants (once per run, with the
//! contended steps), a broker restart
//! (SIGKILL and adoption of the table and ledger) at any step, and one
//! scribble per run of a client-writable field: a lock word or a token base
//! (which breaks that key only: promises 1, 2 and 4 are then not checked for
//! it), the header's token floor, a client record's hold mirror or state, or
//! an index entry (which must break nothing). With
//! [`Explorer::with_cluster`], key `a` is global and a scripted cluster
//! agent's steps join them; `model_nodes` lists those steps and the node
//! gate's promises, checked after every step as well.
//!
//! Bounds (written here because they are the claim): the configurations in
//! the tests below (clients, keys, depth); a restart happens between two
//! engine calls, not inside one (the ledger's write order covers a SIGKILL
//! inside one; see `crate::ledger`); a client runs one call at a time.
//! `FORELOCK_EXPLORE_DEPTH` raises the depth for a long local run.

use super::model_nodes::{self, Cluster, GLOBAL, NodeStep};
use super::*;
use crate::ledger::Ledger;
use shm_layout::events::{EventsHeader, EventsView, events_file_size, init_events};
use shm_layout::key_hash;
use shm_layout::lockword;
use shm_layout::lockword::{
    Queue, Unparker, claim_transition, granted_on_fast_path, park_transition, release_contended,
    try_acquire_exclusive, try_release_exclusive,
};
use shm_layout::table::{Geometry, Header, IndexEntry, init_header};
use shm_layout::wire::Response;
use std::collections::HashSet;
use std::hash::{Hash, Hasher};

pub(super) const KEYS: [&[u8]; 3] = [b"a", b"b", b"c"];

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub enum Have {
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
pub struct Client {
    pub pid: u32,
    pub record: u32,
    pub lanes: Vec<Have>,
    /// Holds its raw requests got: `(key, slot, token, shared)`.
    pub extra: Vec<(usize, u32, u64, bool)>,
    pub next_request: u64,
    pub next_conn: u64,
    pub alive: bool,
}

impl Client {
    fn new_conn(&mut self) -> ConnId {
        self.next_conn += 1;
        (self.pid as u64) << 32 | self.next_conn
    }
}

/// A client is `(client, lane)`.
pub type Who = (usize, usize);

#[derive(Clone, Copy, Debug)]
pub enum Step {
    Fast(Who, usize),
    Slow(Who, usize, bool, bool),
    Release(Who),
    Cancel(Who),
    DropConn(Who),
    Bye(usize),
    Die(usize),
    Evict(u32),
    Restart,
    Hostile(usize, Raw),
    Scribble(Scribble),
    /// The contended path: a client that found the key held on the fast
    /// path marks the word before it sleeps (`PARKED`, with `HUNGRY` if
    /// true). The sleeper itself is not modelled: what the broker must cope
    /// with is the bits it leaves, and a sleeper may die at any time.
    Mark(Who, usize, bool),
    /// The contended path: a hungry sleeper claims a handed-off word.
    Claim(Who, usize),
    /// Clients took and released key `k` on the fast path until one
    /// counter value is left (16.7M grants in one step; once per run): the
    /// next fast grant is the last value's, released through the broker
    /// (`lockword::needs_broker_release`), which rebases the token.
    Spend(usize),
    /// A step of the cluster agent or of the broker's clocks (with
    /// [`Explorer::with_cluster`]; `model_nodes`).
    Node(NodeStep),
}

/// The releaser's wake-ups in the model: every hand-off finds a hungry
/// sleeper (so the handed-off word stays for a [`Step::Claim`], or for the
/// broker when that sleeper dies, is evicted or restarts); the cancel of
/// an unclaimed hand-off is loom's to check (shm-layout's lockword).
struct SleeperAlwaysWakes;

impl Unparker for SleeperAlwaysWakes {
    fn wake_one(&mut self, _: Queue) -> u32 {
        1
    }
}

/// A raw request of a hostile client (see [`Explorer::hostile`]).
#[derive(Clone, Copy, Debug)]
pub enum Raw {
    /// Release `slot` with the `token`-th candidate token (0, 1, u64::MAX,
    /// then each key's last granted token and that + 1).
    Release { slot: u32, token: usize },
    /// Cancel request `request` on a new connection.
    Cancel { request: u64 },
    /// A try-lock with request id `request` (0 is reserved; small ids
    /// collide with the client's own).
    Try {
        key: usize,
        shared: bool,
        request: u64,
    },
    /// Attach to another client's record.
    Claim { client: usize },
}

#[derive(Clone, Copy, Debug)]
pub enum Scribble {
    /// A lock word set to "prepared, free": breaks that key.
    Word(usize),
    /// A token base lowered to 0: breaks that key's tokens.
    TokenBase(usize),
    Floor,
    HoldMirror(u32),
    RecordState(u32),
    Index,
}

pub struct State {
    pub table_buf: Buf,
    pub m: LockManager,
    pub clients: Vec<Client>,
    pub broken: Vec<bool>,
    pub scribbled: bool,
    /// A [`Step::Spend`] happened.
    pub spent: bool,
    pub restarts: u32,
    pub max_token: Vec<u64>,
    pub trace: Vec<Step>,
    /// The scripted cluster agent, with [`Explorer::with_cluster`].
    pub cluster: Option<Cluster>,
}

pub struct Explorer {
    pub keys: usize,
    pub lanes: usize,
    pub events: (Buf, EventsView),
    pub max_restarts: u32,
    pub scribbles: bool,
    /// Add raw requests no well-behaved client sends (the fuzz target's
    /// hostile session): releases of arbitrary slots and tokens, cancels of
    /// arbitrary requests, reserved or repeated request ids, Hellos that
    /// claim another client's record. They must break nothing.
    pub hostile: bool,
    /// Add the contended path's steps ([`Step::Mark`], [`Step::Claim`]) and
    /// release through it (`lockword::release_contended`).
    pub contended: bool,
    /// Make key `a` global: its local grants pass the node gate, whose node
    /// grant comes from a scripted agent (`model_nodes`).
    pub cluster: bool,
}

pub(super) fn view(buf: &Buf) -> TableView {
    // SAFETY: the buffer is a 64-aligned heap table of its full size, alive
    // for as long as the view is used (within one step).
    unsafe { TableView::new(buf.ptr, buf.size()) }.expect("a valid table")
}

impl State {
    pub fn fork(&self) -> State {
        let (cluster, m) = match &self.cluster {
            Some(c) => {
                let (c, m) = c.fork(&self.m);
                (Some(c), m)
            }
            None => (None, self.m.fork()),
        };
        State {
            table_buf: self.table_buf.copy(),
            m,
            cluster,
            clients: self.clients.clone(),
            broken: self.broken.clone(),
            scribbled: self.scribbled,
            spent: self.spent,
            restarts: self.restarts,
            max_token: self.max_token.clone(),
            trace: self.trace.clone(),
        }
    }

    pub fn digest(&self) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        // Everything below the header: the header holds only statistics,
        // the floor copy and the epoch, which the engine never reads back.
        self.table_buf.bytes_ref()[shm_layout::table::HEADER_SIZE..].hash(&mut h);
        self.m.ledger.snapshot().hash(&mut h);
        self.m.digest(&mut h);
        self.clients.hash(&mut h);
        (
            &self.broken,
            self.scribbled,
            self.spent,
            self.restarts,
            &self.max_token,
        )
            .hash(&mut h);
        if let Some(c) = &self.cluster {
            c.hash(&mut h);
        }
        h.finish()
    }
}

impl Explorer {
    /// A model of `keys` keys whose clients have `lanes` threads each, with
    /// at most `max_restarts` broker restarts per run, one scribble per run
    /// if `scribbles`, and a raw-request client if `hostile`.
    pub fn new(
        keys: usize,
        lanes: usize,
        max_restarts: u32,
        scribbles: bool,
        hostile: bool,
    ) -> Explorer {
        assert!(keys <= KEYS.len(), "the model names {} keys", KEYS.len());
        Explorer {
            keys,
            lanes,
            events: new_events(8),
            max_restarts,
            scribbles,
            hostile,
            contended: false,
            cluster: false,
        }
    }

    /// The same model with key `a` global (`model_nodes`).
    pub fn with_cluster(mut self) -> Explorer {
        self.cluster = true;
        self
    }

    /// The same model with the contended path's steps.
    pub fn with_contended(mut self) -> Explorer {
        self.contended = true;
        self
    }

    pub fn initial(&self, clients: usize) -> State {
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
        let cluster = self.cluster.then(|| Cluster::install(&mut m, &table));
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
                    extra: Vec::new(),
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
            spent: false,
            restarts: 0,
            max_token: vec![0; self.keys],
            trace: Vec::new(),
            cluster,
        }
    }

    pub fn steps(&self, s: &State) -> Vec<Step> {
        let mut out = Vec::new();
        if s.cluster.as_ref().is_some_and(Cluster::stopped) {
            return out;
        }
        // With `hostile`, the last client sends only raw requests: a process
        // that reuses its own request ids confuses only itself.
        let honest = s.clients.len() - self.hostile as usize;
        for (i, c) in s.clients.iter().enumerate().take(honest) {
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
                            if self.contended {
                                let table = view(&s.table_buf);
                                let key = KEYS.get(k).expect("k < keys <= KEYS.len()");
                                if let Some((_, w)) = table.lookup(key, key_hash(key)) {
                                    if !s.spent
                                        && w.is_prepared()
                                        && w.is_free()
                                        && w.0 & lockword::CONTENDED_MASK == 0
                                    {
                                        out.push(Step::Spend(k));
                                    }
                                    if w.is_handoff() {
                                        out.push(Step::Claim(who, k));
                                    } else if w.is_prepared() && w.exclusive_owner().is_some() {
                                        out.push(Step::Mark(who, k, false));
                                        out.push(Step::Mark(who, k, true));
                                    }
                                }
                            }
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
        if self.hostile {
            let tokens = 3 + 2 * self.keys;
            let i = s.clients.len() - 1;
            let c = &s.clients[i];
            if c.alive {
                out.push(Step::Die(i));
                for slot in 0..table.geometry().slot_count {
                    for token in 0..tokens {
                        out.push(Step::Hostile(i, Raw::Release { slot, token }));
                    }
                }
                for request in 0..3 {
                    out.push(Step::Hostile(i, Raw::Cancel { request }));
                    for key in 0..self.keys {
                        for shared in [false, true] {
                            out.push(Step::Hostile(
                                i,
                                Raw::Try {
                                    key,
                                    shared,
                                    request,
                                },
                            ));
                        }
                    }
                }
                for other in 0..s.clients.len() {
                    if s.clients[other].record != c.record {
                        out.push(Step::Hostile(i, Raw::Claim { client: other }));
                    }
                }
            }
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
        if let Some(c) = &s.cluster {
            out.extend(c.steps().into_iter().map(Step::Node));
        }
        out
    }

    /// A fuzzed session from `clients` clients' initial state: each pair of
    /// bytes of `data` picks the next step among those offered, for at most
    /// 64 steps. `Err` names the broken promise, with the steps taken.
    pub fn session(&self, clients: usize, data: &[u8]) -> Result<(), String> {
        let mut s = self.initial(clients);
        for pick in data.chunks(2).take(64) {
            let steps = self.steps(&s);
            if steps.is_empty() {
                break;
            }
            let n = pick.iter().fold(0usize, |n, &b| n << 8 | b as usize);
            let step = steps[n % steps.len()];
            if let Err(why) = self.apply(&mut s, step) {
                return Err(format!("{why}\nafter {:?}", s.trace));
            }
        }
        Ok(())
    }

    /// Apply `step` to `s` and check every promise. `Err` names the broken one.
    pub fn apply(&self, s: &mut State, step: Step) -> Result<(), String> {
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
                        // As the client library: the key, then the slot's
                        // safe time (a global key's lease), else give back.
                        let safe = s.cluster.as_ref().is_none_or(|c| {
                            c.may_grant_now(sl.grant_until_ns.load(Ordering::Acquire))
                        });
                        if sl.key_equals(KEYS[k]) && safe {
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
                    let word = &table.slot(slot).expect("in range").word;
                    if self.contended {
                        release_contended(word, Word(held), &mut SleeperAlwaysWakes)
                    } else {
                        try_release_exclusive(word, Word(held))
                    }
                });
                if !by_cas {
                    let r = s.m.release(&table, c.record, slot, token, &mut w);
                    // A scribbled key may refuse its holder: that key is
                    // broken. A hold of the global key may have been lost
                    // (checked after every step while it stood).
                    let lost = s.cluster.is_some() && key == GLOBAL && model_nodes::is_lost(&r);
                    if r != Response::Released && !lost && !s.broken[key] {
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
                s.clients[i].extra.clear();
            }
            Step::Die(i) => {
                s.clients[i].alive = false;
                s.clients[i].lanes.fill(Have::Gone);
                s.clients[i].extra.clear();
                s.m.client_gone(&table, s.clients[i].record, &mut w);
            }
            Step::Evict(slot) => {
                s.m.tick(&table, 0, |_| None, &mut Vec::new(), usize::MAX);
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
                if let Some(c) = &s.cluster {
                    c.restarted(&mut s.m, &table);
                }
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
            Step::Hostile(i, raw) => hostile(s, &table, events, &mut w, i, raw)?,
            Step::Mark(_, k, hungry) => {
                if let Some((slot, _)) = table.lookup(KEYS[k], key_hash(KEYS[k])) {
                    let sl = table.slot(slot).expect("in range");
                    let w = Word(sl.word.load(Ordering::Acquire));
                    if let Ok(Some(marked)) = park_transition(w, hungry) {
                        let _ = sl.word.compare_exchange(
                            w.0,
                            marked.0,
                            Ordering::Release,
                            Ordering::Relaxed,
                        );
                    }
                }
            }
            Step::Spend(k) => {
                s.spent = true;
                if let Some((slot, w)) = table.lookup(KEYS[k], key_hash(KEYS[k])) {
                    let sl = table.slot(slot).expect("in range");
                    let last = lockword::COUNTER_MASK as u32 - 1;
                    let spent = Word::new(w.generation(), lockword::PREPARED, 0, last);
                    if w.counter() < last
                        && sl
                            .word
                            .compare_exchange(w.0, spent.0, Ordering::AcqRel, Ordering::Relaxed)
                            .is_ok()
                    {
                        // Those grants' tokens count: every later one must
                        // be above them.
                        let top = sl.token_base.load(Ordering::Relaxed) + last as u64;
                        s.max_token[k] = s.max_token[k].max(top);
                    }
                }
            }
            Step::Claim((i, l), k) => {
                let record = s.clients[i].record;
                if let Some((slot, seen)) = table.lookup(KEYS[k], key_hash(KEYS[k])) {
                    let sl = table.slot(slot).expect("in range");
                    if let Ok(g) = claim_transition(seen, seen.generation(), record)
                        && sl
                            .word
                            .compare_exchange(
                                seen.0,
                                g.held.0,
                                Ordering::Acquire,
                                Ordering::Relaxed,
                            )
                            .is_ok()
                    {
                        // Under the hold the key cannot change (a held word
                        // is never re-keyed): this is KEYS[k]'s slot.
                        if !sl.key_equals(KEYS[k]) {
                            return Err(format!(
                                "claimed a hand-off of another key in slot {slot}"
                            ));
                        }
                        let token = sl
                            .token_base
                            .load(Ordering::Relaxed)
                            .wrapping_add(g.held.counter() as u64);
                        granted(s, (i, l), k, slot, token, Some(g.held.0), false)?;
                    }
                }
            }
            Step::Node(n) => model_nodes::apply(s, &table, n)?,
        }
        deliver(s, &mut w)?;
        model_nodes::take_commands(s)?;
        check(s)
    }
}

/// Client `i` sends a raw request.
fn hostile(
    s: &mut State,
    table: &TableView,
    events: &EventsView,
    w: &mut CountingWaker,
    i: usize,
    raw: Raw,
) -> Result<(), String> {
    let conn = s.clients[i].new_conn();
    let record = s.clients[i].record;
    match raw {
        Raw::Release { slot, token } => {
            let mut candidates = vec![0, 1, u64::MAX];
            for &t in &s.max_token {
                candidates.extend([t, t.wrapping_add(1)]);
            }
            let token = candidates[token % candidates.len()];
            let r = s.m.release(table, record, slot, token, w);
            // A lost hold of the global key is released too (answered Lost).
            if r == Response::Released || model_nodes::is_lost(&r) {
                // It released a hold of its own, whichever call made it.
                let c = &mut s.clients[i];
                c.extra.retain(|&(_, sl, t, _)| (sl, t) != (slot, token));
                for lane in &mut c.lanes {
                    if matches!(*lane, Have::Holding { slot: sl, token: t, .. } if (sl, t) == (slot, token))
                    {
                        *lane = Have::Idle;
                    }
                }
            }
        }
        Raw::Cancel { request } => {
            let r = s.m.cancel(table, record, conn, request, w);
            if !matches!(r, Response::Cancelled | Response::Granted { .. }) {
                return Err(format!("a raw cancel was answered {r:?}"));
            }
        }
        Raw::Try {
            key,
            shared,
            request,
        } => {
            let r = s.m.acquire(
                table, events, record, conn, 0, request, KEYS[key], shared, false,
            );
            if let Response::Granted { slot, token, .. } = r {
                let c = &s.clients[i];
                let known = c.extra.iter().any(|&(_, sl, t, _)| (sl, t) == (slot, token))
                    || c.lanes.iter().any(|h| {
                        matches!(*h, Have::Holding { slot: sl, token: t, .. } if (sl, t) == (slot, token))
                    });
                if !known {
                    if !s.broken[key] {
                        if token <= s.max_token[key] {
                            return Err(format!(
                                "key {key}: token {token} granted after {}",
                                s.max_token[key]
                            ));
                        }
                        s.max_token[key] = token;
                        if key == GLOBAL {
                            model_nodes::check_grant(s, (i, usize::MAX), token, shared)?;
                        }
                    }
                    s.clients[i].extra.push((key, slot, token, shared));
                }
            }
        }
        Raw::Claim { client } => {
            let (pid, other) = (s.clients[i].pid, s.clients[client].record);
            if s.m.hello(table, pid, 0, 1, Some(other), 0).is_ok() {
                return Err(format!("process {pid} attached to client record {other}"));
            }
        }
    }
    Ok(())
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
        if k == GLOBAL {
            model_nodes::check_grant(s, (i, l), token, shared)?;
        }
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
        Response::Granted { slot, token, .. } => {
            // As the client library does: a grant whose word names us with
            // this token is a fast-path hold, released by CAS.
            let table = view(&s.table_buf);
            let fast = table.slot(slot).and_then(|sl| {
                let base = sl.token_base.load(Ordering::Relaxed);
                granted_on_fast_path(sl.word_acquire(), s.clients[who.0].record, base, token)
            });
            let fast = fast.filter(|_| !shared).map(|w| w.0);
            granted(s, who, k, slot, token, fast, shared)
        }
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
pub(super) fn deliver(s: &mut State, w: &mut CountingWaker) -> Result<(), String> {
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

/// A hold a live client believes it has (a lane's, or a raw request's).
#[derive(Debug, Clone, Copy)]
pub(super) struct Hold {
    pub record: u32,
    pub slot: u32,
    pub token: u64,
    pub shared: bool,
}

/// The holds of key `k` the live clients believe they have.
pub(super) fn holds_of(s: &State, k: usize) -> Vec<Hold> {
    let mut out = Vec::new();
    for c in s.clients.iter().filter(|c| c.alive) {
        let hold = |slot, token, shared| Hold {
            record: c.record,
            slot,
            token,
            shared,
        };
        for h in &c.lanes {
            if let Have::Holding {
                key,
                slot,
                token,
                shared,
                ..
            } = *h
                && key == k
            {
                out.push(hold(slot, token, shared));
            }
        }
        for &(key, slot, token, shared) in &c.extra {
            if key == k {
                out.push(hold(slot, token, shared));
            }
        }
    }
    out
}

/// The promises, after every step.
fn check(s: &State) -> Result<(), String> {
    s.m.check()?;
    let table = view(&s.table_buf);
    for k in 0..s.broken.len() {
        if s.broken[k] {
            continue;
        }
        let holders = holds_of(s, k);
        let exclusive = holders.iter().filter(|h| !h.shared).count();
        if exclusive > 1 || (exclusive == 1 && holders.len() > 1) {
            return Err(format!("key {k} has holders {holders:?}"));
        }
        for &Hold {
            record,
            slot,
            token,
            shared,
        } in &holders
        {
            // Promise 4: the table still says so (the word, or the mirror
            // of the broker's holder).
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
            // And the broker says so when the holder asks
            // (`Request::Check`), for every hold, however it was granted
            // and across restarts.
            let answer = s.m.check_hold(&table, record, slot, token);
            let lost_ok =
                k == GLOBAL && model_nodes::is_lost(&answer) && model_nodes::lost_allowed(s, token);
            if answer != Response::Holding && !lost_ok {
                return Err(format!(
                    "key {k}: client {record} holds slot {slot} with token {token}, but Check \
                     answers {answer:?}"
                ));
            }
        }
    }
    model_nodes::check_standing(s)?;
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

/// A 64-aligned heap buffer standing in for a mapping.
pub struct Buf {
    pub ptr: *mut u8,
    layout: std::alloc::Layout,
}
impl Buf {
    pub fn new(len: usize) -> Buf {
        let layout = std::alloc::Layout::from_size_align(len, 64).unwrap();
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        Buf { ptr, layout }
    }
    pub fn size(&self) -> usize {
        self.layout.size()
    }
    pub fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid for layout.size() bytes, zero-initialised, ours.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
    /// The bytes, read (single-threaded tests: no one writes meanwhile).
    pub fn bytes_ref(&self) -> &[u8] {
        // SAFETY: ptr is valid for layout.size() initialised bytes; the tests
        // that read them write the buffer only through `&mut self` or from
        // this thread, never during the borrow.
        unsafe { std::slice::from_raw_parts(self.ptr, self.layout.size()) }
    }
    /// A copy of the buffer (the explorer's branch points).
    pub fn copy(&self) -> Buf {
        let mut b = Buf::new(self.size());
        b.bytes().copy_from_slice(self.bytes_ref());
        b
    }
}
impl Drop for Buf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

#[derive(Default)]
pub struct CountingWaker(pub Vec<usize>, pub Vec<(ConnId, Response)>);
impl Waker for CountingWaker {
    fn answer(&mut self, conn: ConnId, response: Response) {
        self.1.push((conn, response));
    }
    fn wake(&mut self, cell: &AtomicU32) {
        self.0.push(cell as *const AtomicU32 as usize);
    }
}

/// A fresh table on the heap, and its view (valid while the buffer lives).
pub fn new_table(slots: u32, clients: u32) -> (Buf, TableView) {
    let g = Geometry::new(slots, clients).unwrap();
    let mut tb = Buf::new(g.file_size);
    // SAFETY: the buffer is 64-aligned, large enough, and exclusively ours.
    init_header(
        unsafe { &mut *(tb.bytes().as_mut_ptr() as *mut Header) },
        &g,
    );
    // SAFETY: the buffer is returned with the view; callers keep it alive.
    let table = unsafe { TableView::new(tb.ptr, g.file_size) }.unwrap();
    (tb, table)
}

/// A fresh events file on the heap for `clients` clients, and its view.
pub fn new_events(clients: u32) -> (Buf, EventsView) {
    let mut eb = Buf::new(events_file_size(clients + 1, 16));
    // SAFETY: 64-aligned, large enough, exclusively ours.
    init_events(
        unsafe { &mut *(eb.bytes().as_mut_ptr() as *mut EventsHeader) },
        clients + 1,
        16,
    );
    // SAFETY: the buffer is returned with the view; callers keep it alive.
    let events = unsafe { EventsView::new(eb.ptr, events_file_size(clients + 1, 16)) }.unwrap();
    (eb, events)
}
