//! The lock manager: where a lock is granted on the slow path, queued, handed
//! off, released for a dead owner, and where a slot is prepared or reclaimed.
//!
//! It works on the mapped table through [`TableView`] and keeps its own truth
//! in private memory: which slot holds which key, who holds each
//! broker-managed slot, each slot's FIFO queue. The table is read only to learn
//! what clients did on the fast path (a lock word's holder and counter), and
//! every value read from it is bounds-checked, so a client that scribbles on
//! the table can corrupt the keys it uses but cannot crash the broker or make
//! it hand a broker-managed lock to two clients.
//!
//! No I/O happens here: the event loop ([`crate::event_loop`]) feeds requests
//! in and sends the answers; wake-ups of queued waiters go through [`Waker`].
//!
//! Slot life cycle (private `SlotState` and the lock word):
//!
//! ```text
//!   free --(slow-path acquire / allocator prepare)--> keyed
//!   keyed+managed  (word P=0): broker grants, queues, hands off
//!   keyed+prepared (word P=1): clients grant themselves by CAS
//!   managed --(release, queue empty, policy allows)--> prepared
//!   prepared --(someone queues: takeover CAS clears P)--> managed
//!   keyed (unheld, no queue) --(idle past keep-alive, or evicted)--> free
//! ```
//!
//! Contention preparation ([`LockManager::prepare_contention`]): for a key the
//! forecaster predicts contended, the allocator places the slot (if it has
//! none) and reserves its waiter queue, so the first waiters are queued
//! without a heap allocation on the request's path. That queue is the only
//! per-key hand-off state built lazily: a waiter's wait cell and futex word
//! belong to its connection (set up at registration), the take-over of a
//! prepared slot is one `fetch_and` that cannot be done ahead without taking
//! the key off the fast path, and the broker-wide maps of queued and handed-off
//! connections keep their capacity once grown (preparation reserves room in
//! them too). A slot keeps its queue's capacity until it is freed, so a key
//! kept resident keeps the queue depth it reached.

use crate::allocator::SlotView;
use crate::config::Policy;
use crate::ledger::{ClientEntry, FAST_REQUEST, Hold, Ledger};
use shm_layout::events::EventsView;
use shm_layout::events::Outcome;
use shm_layout::lockword::{self, OWNER_DIED, RESERVED_MASK, Word};
use shm_layout::scores::Scored;
use shm_layout::sync::shm::{AtomicU32, Ordering};
use shm_layout::table::{
    BROKER_HOLDS, CELL_ABANDONED, CELL_GRANTED, CELL_IDLE, CELL_WAITING, CLIENT_ACTIVE,
    CLIENT_FREE, GRANT_OWNER_DIED, HOLD_SHARED, INDEX_MAX_PROBE, IndexEntry, TableView, WAIT_CELLS,
};
use shm_layout::wire::{ErrorCode, Response};
use shm_layout::{key_hash, validate_key};
use std::collections::HashSet;
use std::collections::{HashMap, VecDeque};

/// The `client` field of events the broker writes on its own behalf.
pub const BROKER_CLIENT: u32 = 0xFFFF;

/// Identifies one connection of the event loop (slab index and generation).
pub type ConnId = u64;

/// How the manager reaches queued waiters. The answer on the waiter's
/// connection is the authority (the table is writable by every client, so a
/// grant must never be read from it); the wait cell and its futex are only
/// the wake-up.
pub trait Waker {
    /// Deliver `response` on connection `conn`: the answer to its queued
    /// acquire. Sent before the wake-up.
    fn answer(&mut self, conn: ConnId, response: Response);
    /// Wake whoever sleeps on `cell` (FUTEX_WAKE, shared).
    fn wake(&mut self, cell: &AtomicU32);
}

/// Who holds a managed slot. Prepared slots keep their holder in the word.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Holder {
    Free,
    Exclusive {
        client: u32,
        token: u64,
        via_broker: bool,
    },
    Shared(Vec<(u32, u64)>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Waiter {
    client: u32,
    conn: ConnId,
    cell: u32,
    shared: bool,
    /// The client's id for this acquire: a re-sent request (same id, new
    /// connection) takes this waiter over instead of queueing twice.
    request: u64,
}

#[derive(Debug, Clone)]
struct SlotState {
    key: Option<Box<[u8]>>,
    hash: u64,
    managed: bool,
    holder: Holder,
    queue: VecDeque<Waiter>,
    /// The word's counter when we last looked: a change means fast-path grants.
    last_counter: u32,
    last_use_ms: u64,
    /// Prepared ahead of any request by the allocator and not used since.
    speculative: bool,
    /// The queue was reserved because contention was predicted
    /// ([`LockManager::prepare_contention`]); cleared when the slot is freed.
    contention_prepared: bool,
    /// A waiter has queued since that preparation (counted once as a hit).
    contention_used: bool,
    /// When the key got its slot, and grants since (fast and broker).
    placed_at_ms: u64,
    uses: u32,
    /// The highest token this slot has issued as far as the broker knows.
    /// The counter lives in client-writable memory; a broker grant never
    /// goes below this, whatever it says.
    issued: u64,
    /// The slot's token base: a grant's token is `base + counter`. The
    /// table's `token_base` is a copy for clients; this one (and the
    /// ledger's) is the truth.
    base: u64,
    /// Position in the key index, if indexed.
    index_pos: Option<u32>,
}

impl SlotState {
    fn empty() -> SlotState {
        SlotState {
            key: None,
            hash: 0,
            managed: true,
            holder: Holder::Free,
            queue: VecDeque::new(),
            last_counter: 0,
            last_use_ms: 0,
            speculative: false,
            contention_prepared: false,
            contention_used: false,
            placed_at_ms: 0,
            uses: 0,
            issued: 0,
            base: 0,
            index_pos: None,
        }
    }
}

/// A client record as the registry knows it. Liveness comes from the pidfd
/// (or, at adoption, the process's start time) only: connections are
/// transport, and a client may have none for a while.
#[derive(Debug, Default, Clone)]
struct ClientState {
    active: bool,
    pid: u32,
    uid: u32,
}

/// Bounds on what one uid may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Client records one uid may hold at once.
    pub clients_per_uid: u32,
}

impl Limits {
    /// Half the records per uid (at least one): one user cannot lock the
    /// others out of the broker.
    pub fn for_table(client_count: u32) -> Limits {
        Limits {
            clients_per_uid: (client_count / 2).max(1),
        }
    }

    /// The configured limits (`access.max_clients_per_uid`, 0 = the default
    /// for the table).
    pub fn from_config(config: &crate::config::Config, client_count: u32) -> Limits {
        match config.access.max_clients_per_uid {
            0 => Limits::for_table(client_count),
            n => Limits { clients_per_uid: n },
        }
    }
}

/// Keys whose holder died and whose slot was freed before anyone was told,
/// remembered so the next holder of the key still hears it (bounded).
const DIED_KEYS_MAX: usize = 1 << 16;

/// What the event loop must do after a registration.
#[derive(Debug, PartialEq, Eq)]
pub enum Registered {
    /// A new record: watch `pid` with a pidfd.
    New { client: u32 },
    /// A further connection of an existing record.
    Attached { client: u32 },
}

pub struct LockManager {
    policy: Policy,
    limits: Limits,
    epoch: u64,
    /// The broker's persisted truth (see [`crate::ledger`]).
    ledger: Ledger,
    keys: HashMap<Box<[u8]>, u32>,
    slots: Vec<SlotState>,
    free: Vec<u32>,
    /// Private mirror of the key index: `slot + 1` or 0 per position.
    index: Vec<u32>,
    clients: Vec<ClientState>,
    /// Queued acquires by connection: the slot each waits on.
    waiting: HashMap<ConnId, u32>,
    /// Keys whose owner-died flag outlived their slot.
    died_keys: HashSet<Box<[u8]>>,
    /// Keys seen recently, by hash: what the allocator may prepare.
    known: HashMap<u64, Box<[u8]>>,
    /// Keys the forecaster scored above the threshold at the last tick that
    /// were not prepared yet: a request for one of them arrived late.
    predicted: std::collections::HashSet<u64>,
    now_ms: u64,
}

/// The lock word of slot `s`, an index below the table's slot count.
fn word_of(table: &TableView, s: u32) -> Word {
    // SYNC POINT: Acquire pairs with the Release of the last fast-path
    // transition on this word (a client's take or release), so what that
    // client wrote before it is visible to the broker's decision.
    Word(
        table
            .slot(s)
            .expect("slot index below the slot count")
            .word
            .load(Ordering::Acquire),
    )
}

impl LockManager {
    /// Build the manager from the ledger (the broker's truth) and the table
    /// (for the lock words of prepared slots, the only state clients write).
    /// A new ledger and table adopt nothing. `alive(pid, start_time)` says
    /// whether a recorded client process still runs. The table is rewritten
    /// from the ledger: keys, token bases, client records, the index; a
    /// client that scribbled any of it loses the scribble.
    #[allow(clippy::too_many_arguments)]
    pub fn adopt(
        table: &TableView,
        ledger: Ledger,
        policy: Policy,
        limits: Limits,
        epoch: u64,
        now_ms: u64,
        mut alive: impl FnMut(u32, u64) -> bool,
        waker: &mut dyn Waker,
    ) -> LockManager {
        let g = table.geometry();
        let mut m = LockManager {
            policy,
            limits,
            epoch,
            ledger,
            keys: HashMap::new(),
            slots: (0..g.slot_count).map(|_| SlotState::empty()).collect(),
            free: Vec::new(),
            index: vec![0; g.index_len as usize],
            clients: (0..g.client_count)
                .map(|_| ClientState::default())
                .collect(),
            waiting: HashMap::new(),
            died_keys: HashSet::new(),
            known: HashMap::new(),
            predicted: std::collections::HashSet::new(),
            now_ms,
        };
        m.ledger.set_epoch(epoch);
        for p in 0..g.index_len {
            if let Some(e) = table.index_entry(p) {
                e.0.store(0, Ordering::Relaxed);
            }
        }
        // Slots: the ledger's keys, written back over whatever the table says.
        for s in (0..g.slot_count).rev() {
            let slot = table.slot(s).expect("s < slot_count");
            let word = Word(slot.word.load(Ordering::Acquire));
            let keyed = m
                .ledger
                .slot(s)
                .filter(|(key, _)| validate_key(key).is_ok() && !m.keys.contains_key(&key[..]));
            let Some((key, base)) = keyed else {
                m.ledger.clear_slot(s);
                slot.key_len.store(0, Ordering::Relaxed);
                slot.word.store(lockword::rekey(word).0, Ordering::Release);
                m.free.push(s);
                continue;
            };
            let hash = key_hash(&key);
            slot.store_key(&key, hash, 0);
            slot.token_base.store(base, Ordering::Relaxed);
            let st = &mut m.slots[s as usize];
            st.hash = hash;
            st.key = Some(key.clone().into_boxed_slice());
            st.base = base;
            st.last_counter = word.counter();
            st.issued = base.saturating_add(word.counter() as u64);
            st.last_use_ms = now_ms;
            st.managed = !word.is_prepared();
            m.keys.insert(key.into_boxed_slice(), s);
        }
        // Clients: the ledger's, written back over the table's records.
        let mut dead = Vec::new();
        for c in 0..g.client_count {
            let rec = table.client(c).expect("c < client_count");
            for cell in &rec.cells {
                if cell.state.load(Ordering::Relaxed) == CELL_WAITING {
                    // The queue it waited in died with the old broker.
                    cell.state.store(CELL_ABANDONED, Ordering::Release);
                    waker.wake(&cell.state);
                }
            }
            for h in &rec.broker_holds {
                h.store(0, Ordering::Relaxed);
            }
            let Some(entry) = m.ledger.client(c) else {
                rec.state.store(CLIENT_FREE, Ordering::Release);
                continue;
            };
            rec.pid.store(entry.pid, Ordering::Relaxed);
            rec.uid.store(entry.uid, Ordering::Relaxed);
            rec.start_time.store(entry.start_time, Ordering::Relaxed);
            rec.state.store(CLIENT_ACTIVE, Ordering::Release);
            m.clients[c as usize] = ClientState {
                active: true,
                pid: entry.pid,
                uid: entry.uid,
            };
            let holds: Vec<(usize, Hold)> = m.ledger.holds(c).collect();
            for (_, hold) in holds {
                m.adopt_hold(table, c, hold);
            }
            if !alive(entry.pid, entry.start_time) {
                dead.push(c);
            }
        }
        for s in 0..g.slot_count {
            if m.slots[s as usize].key.is_some() {
                if m.slots[s as usize].managed {
                    m.mirror(table, s);
                }
                m.index_insert(table, s);
            }
        }
        table
            .header()
            .token_floor
            .store(m.ledger.floor(), Ordering::Relaxed);
        for c in dead {
            m.client_gone(table, c, waker);
        }
        m
    }

    /// One hold from the ledger, at adoption. A hold that contradicts the
    /// others (the ledger only records consistent ones, so this means a
    /// broker bug or a damaged file) is dropped with a warning.
    fn adopt_hold(&mut self, table: &TableView, c: u32, hold: Hold) {
        let Some(st) = self.slots.get_mut(hold.slot as usize) else {
            self.ledger.remove_hold(c, hold.slot, Some(hold.token));
            return;
        };
        let fits = st.key.is_some()
            && matches!(
                (&st.holder, hold.shared),
                (Holder::Free, _) | (Holder::Shared(_), true)
            );
        if !fits {
            tracing::warn!(
                client = c,
                ?hold,
                "ledger hold contradicts another: dropped"
            );
            self.ledger.remove_hold(c, hold.slot, Some(hold.token));
            return;
        }
        st.managed = true;
        st.issued = st.issued.max(hold.token);
        st.holder = match std::mem::replace(&mut st.holder, Holder::Free) {
            Holder::Shared(mut v) => {
                v.push((c, hold.token));
                Holder::Shared(v)
            }
            _ if hold.shared => Holder::Shared(vec![(c, hold.token)]),
            _ => Holder::Exclusive {
                client: c,
                token: hold.token,
                via_broker: hold.request != FAST_REQUEST,
            },
        };
        // The word says managed from now on, whatever it said.
        let slot = table.slot(hold.slot).expect("slot in range");
        slot.word
            .fetch_and(!shm_layout::lockword::PREPARED, Ordering::AcqRel);
        mirror_hold(table, c, hold.slot, hold.shared);
    }

    /// The broker dies and a new one adopts the same table and ledger (tests
    /// and the explorer: the real restart is a new process).
    #[cfg(test)]
    pub(crate) fn readopt(
        &mut self,
        table: &TableView,
        alive: impl FnMut(u32, u64) -> bool,
        waker: &mut dyn Waker,
    ) {
        let g = table.geometry();
        let ledger = std::mem::replace(&mut self.ledger, Ledger::on_heap(1, 1));
        *self = LockManager::adopt(
            table,
            ledger,
            self.policy,
            self.limits,
            self.epoch + 1,
            self.now_ms,
            alive,
            waker,
        );
        debug_assert_eq!(self.slots.len(), g.slot_count as usize);
    }

    /// A copy of this manager with its ledger on the heap: a branch point of
    /// the explorer (the table is copied by the caller).
    #[cfg(test)]
    pub(crate) fn fork(&self) -> LockManager {
        LockManager {
            policy: self.policy,
            limits: self.limits,
            epoch: self.epoch,
            ledger: self.ledger.clone_to_heap(),
            keys: self.keys.clone(),
            slots: self.slots.clone(),
            free: self.free.clone(),
            index: self.index.clone(),
            clients: self.clients.clone(),
            waiting: self.waiting.clone(),
            died_keys: self.died_keys.clone(),
            known: self.known.clone(),
            predicted: self.predicted.clone(),
            now_ms: self.now_ms,
        }
    }

    /// A hash of everything that decides this manager's future behaviour
    /// (the explorer's visited set; the table and ledger are hashed apart).
    #[cfg(test)]
    pub(crate) fn digest(&self, h: &mut impl std::hash::Hasher) {
        use std::hash::Hash;
        for st in &self.slots {
            st.key.hash(h);
            st.managed.hash(h);
            format!("{:?}", st.holder).hash(h);
            for w in &st.queue {
                (w.client, w.conn, w.cell, w.shared, w.request).hash(h);
            }
            (st.issued, st.base, st.last_counter).hash(h);
        }
        for c in &self.clients {
            (c.active, c.pid, c.uid).hash(h);
        }
        let mut waiting: Vec<_> = self.waiting.iter().collect();
        waiting.sort();
        waiting.hash(h);
        let mut died: Vec<_> = self.died_keys.iter().collect();
        died.sort();
        died.hash(h);
    }

    /// The engine's own invariants, checked by the explorer after every step:
    /// - no waiter starves while its key is free (a queue's head is served
    ///   whenever the holder allows it);
    /// - every queued waiter is in the connection map, and nothing else is;
    /// - the ledger records exactly the holds the manager knows of managed
    ///   slots (so a restart rebuilds the same holders);
    /// - no client that is not active holds or waits for anything.
    #[cfg(test)]
    pub(crate) fn check(&self) -> Result<(), String> {
        let mut queued = 0;
        for (s, st) in self.slots.iter().enumerate() {
            if let Some(head) = st.queue.front() {
                let served = match &st.holder {
                    Holder::Free => true,
                    Holder::Shared(_) => head.shared,
                    Holder::Exclusive { .. } => false,
                };
                if served {
                    return Err(format!(
                        "slot {s}: waiter {head:?} starves behind {:?}",
                        st.holder
                    ));
                }
            }
            for w in &st.queue {
                queued += 1;
                if self.waiting.get(&w.conn) != Some(&(s as u32)) {
                    return Err(format!(
                        "slot {s}: waiter {w:?} missing from the connection map"
                    ));
                }
                if !self.clients[w.client as usize].active {
                    return Err(format!("slot {s}: waiter {w:?} of an inactive client"));
                }
            }
        }
        if queued != self.waiting.len() {
            return Err(format!(
                "{} waiters mapped, {queued} queued",
                self.waiting.len()
            ));
        }
        for (c, cs) in self.clients.iter().enumerate() {
            let c = c as u32;
            let mut recorded: Vec<(u32, u64)> = self
                .ledger
                .holds(c)
                .map(|(_, h)| (h.slot, h.token))
                .collect();
            if !cs.active {
                if !recorded.is_empty() || self.ledger.client(c).is_some() {
                    return Err(format!("inactive client {c} still in the ledger"));
                }
                continue;
            }
            let mut held: Vec<(u32, u64)> = Vec::new();
            for (s, st) in self.slots.iter().enumerate() {
                match &st.holder {
                    Holder::Exclusive { client, token, .. } if *client == c => {
                        held.push((s as u32, *token))
                    }
                    Holder::Shared(v) => held.extend(
                        v.iter()
                            .filter(|(h, _)| *h == c)
                            .map(|&(_, t)| (s as u32, t)),
                    ),
                    _ => {}
                }
            }
            recorded.sort();
            held.sort();
            if recorded != held {
                return Err(format!(
                    "client {c}: ledger holds {recorded:?}, manager {held:?}"
                ));
            }
        }
        Ok(())
    }

    // ---- registration ---------------------------------------------------------

    /// A `Hello`: register a new record for `pid`, or attach to `existing`.
    pub fn hello(
        &mut self,
        table: &TableView,
        pid: u32,
        uid: u32,
        start_time: u64,
        existing: Option<u32>,
        cell: u32,
    ) -> Result<Registered, (ErrorCode, String)> {
        if cell as usize >= WAIT_CELLS {
            return Err((
                ErrorCode::BadRequest,
                format!("wait cell {cell} out of range 0..{WAIT_CELLS}"),
            ));
        }
        if let Some(c) = existing {
            let ok = self
                .clients
                .get(c as usize)
                .is_some_and(|st| st.active && st.pid == pid);
            if !ok {
                return Err((
                    ErrorCode::NotYourRecord,
                    format!(
                        "client record {c} does not belong to process {pid}: the broker restarted \
                         with a new table or the record was freed; create a new Client"
                    ),
                ));
            }
            return Ok(Registered::Attached { client: c });
        }
        let of_uid = self
            .clients
            .iter()
            .filter(|st| st.active && st.uid == uid)
            .count();
        if of_uid >= self.limits.clients_per_uid as usize {
            return Err((
                ErrorCode::TooManyClients,
                format!(
                    "uid {uid} already has {of_uid} client records, its quota: share one Client \
                     per process, or raise access.max_clients_per_uid in the broker's configuration"
                ),
            ));
        }
        let Some(c) = self.clients.iter().position(|st| !st.active) else {
            return Err((
                ErrorCode::TooManyClients,
                format!(
                    "all {} client records are in use: raise table.clients in the broker's \
                     configuration (takes effect with a new table)",
                    self.clients.len()
                ),
            ));
        };
        // The ledger first: a broker killed after the Welcome knows the record.
        self.ledger.set_client(
            c as u32,
            ClientEntry {
                pid,
                start_time,
                uid,
            },
        );
        let rec = table.client(c as u32).expect("c < client_count");
        for h in &rec.broker_holds {
            h.store(0, Ordering::Relaxed);
        }
        for cell in &rec.cells {
            cell.state.store(CELL_IDLE, Ordering::Relaxed);
        }
        rec.pid.store(pid, Ordering::Relaxed);
        rec.uid.store(uid, Ordering::Relaxed);
        rec.start_time.store(start_time, Ordering::Relaxed);
        rec.registered_epoch.store(self.epoch, Ordering::Relaxed);
        rec.state.store(CLIENT_ACTIVE, Ordering::Release);
        self.clients[c] = ClientState {
            active: true,
            pid,
            uid,
        };
        table.header().stats.clients.fetch_add(1, Ordering::Relaxed);
        Ok(Registered::New { client: c as u32 })
    }

    /// A connection closed. Its queued acquire (if any) leaves the queue;
    /// nothing else changes: a connection is transport, and only the
    /// client's death (its pidfd) or its `Bye` releases what it holds. A
    /// grant answered on this connection that never reached the client is
    /// delivered again when the client re-sends the same request.
    pub fn conn_closed(&mut self, table: &TableView, conn: ConnId, waker: &mut dyn Waker) {
        if let Some(slot) = self.waiting.remove(&conn) {
            self.slots[slot as usize].queue.retain(|w| w.conn != conn);
            self.mirror(table, slot);
            self.dispatch(table, slot, waker);
        }
    }

    /// The process behind record `client` died (pidfd), or its `Client` said
    /// `Bye`: release everything it held (the next holders are told the owner
    /// died: it never released those itself), drop its waiters, free the
    /// record.
    pub fn client_gone(&mut self, table: &TableView, client: u32, waker: &mut dyn Waker) {
        let Some(st) = self.clients.get_mut(client as usize) else {
            return;
        };
        if !st.active {
            return;
        }
        *st = ClientState::default();
        let mut released = 0u64;
        for s in 0..self.slots.len() as u32 {
            if self.slots[s as usize].key.is_none() {
                continue;
            }
            let before = self.slots[s as usize].queue.len();
            let gone: Vec<ConnId> = self.slots[s as usize]
                .queue
                .iter()
                .filter(|w| w.client == client)
                .map(|w| w.conn)
                .collect();
            for conn in gone {
                self.waiting.remove(&conn);
            }
            self.slots[s as usize].queue.retain(|w| w.client != client);
            let mut touched = before != self.slots[s as usize].queue.len();
            let slot = table.slot(s).expect("s < slot_count");
            if self.slots[s as usize].managed {
                let st = &mut self.slots[s as usize];
                let died = match &mut st.holder {
                    Holder::Exclusive { client: c, .. } => *c == client,
                    Holder::Shared(v) => {
                        let n = v.len();
                        v.retain(|(c, _)| *c != client);
                        n != v.len()
                    }
                    Holder::Free => false,
                };
                if died && !matches!(&st.holder, Holder::Shared(v) if !v.is_empty()) {
                    st.holder = Holder::Free;
                }
                if died {
                    released += 1;
                    touched = true;
                    slot.word.fetch_or(OWNER_DIED, Ordering::AcqRel);
                }
            } else {
                // Prepared: a fast-path hold lives in the word only. Nobody
                // else may CAS a held word, so this loop ends at once unless a
                // scribbler races with us; it is bounded all the same.
                for _ in 0..64 {
                    let w = Word(slot.word.load(Ordering::Acquire));
                    if !w.is_prepared() || w.exclusive_owner() != Some(client) {
                        break;
                    }
                    let freed = lockword::release_for_dead_owner(w);
                    // SYNC POINT: Release pairs with the next acquirer's CAS.
                    if slot
                        .word
                        .compare_exchange(w.0, freed.0, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                    {
                        released += 1;
                        break;
                    }
                }
            }
            if touched {
                self.mirror(table, s);
                self.dispatch(table, s, waker);
            }
        }
        // The ledger last: a broker killed midway releases the rest at its
        // restart (the process is still dead then).
        let holds: Vec<(usize, Hold)> = self.ledger.holds(client).collect();
        for (_, hold) in holds {
            self.ledger.remove_hold(client, hold.slot, Some(hold.token));
        }
        self.ledger.clear_client(client);
        let rec = table.client(client).expect("client < client_count");
        for h in &rec.broker_holds {
            h.store(0, Ordering::Relaxed);
        }
        rec.state.store(CLIENT_FREE, Ordering::Release);
        let stats = &table.header().stats;
        stats.clients.fetch_sub(1, Ordering::Relaxed);
        stats.owner_deaths.fetch_add(released, Ordering::Relaxed);
        if released > 0 {
            tracing::warn!(
                client,
                locks = released,
                "client gone while holding locks: released, next holders told the owner died"
            );
        }
    }

    /// A `Bye` from record `client`: its `Client` was dropped, so it holds
    /// nothing it still means to hold (a guard borrows its client). Whatever
    /// is left (a forgotten guard) is released as if the client died.
    pub fn bye(&mut self, table: &TableView, client: u32, waker: &mut dyn Waker) {
        self.client_gone(table, client, waker);
    }

    // ---- requests ---------------------------------------------------------------

    /// An `Acquire` (request id `request`) from connection `conn` of record
    /// `client`, whose wait cell is `cell`.
    ///
    /// Idempotent per request id: a request the client sends again (its
    /// connection broke, or the broker restarted) is answered with the grant
    /// it already produced, or takes its queued place over, instead of
    /// queueing behind itself.
    #[allow(clippy::too_many_arguments)]
    pub fn acquire(
        &mut self,
        table: &TableView,
        events: &EventsView,
        client: u32,
        conn: ConnId,
        cell: u32,
        request: u64,
        key: &[u8],
        shared: bool,
        queue: bool,
    ) -> Response {
        if let Err(e) = validate_key(key) {
            return error(ErrorCode::BadKey, e.to_string());
        }
        if request == FAST_REQUEST {
            return error(
                ErrorCode::BadRequest,
                format!("request id {FAST_REQUEST} is reserved: number requests from 1"),
            );
        }
        if self.waiting.contains_key(&conn) {
            return error(
                ErrorCode::BadRequest,
                "this connection already has a queued acquire".into(),
            );
        }
        if let Some(&s) = self.keys.get(key) {
            if let Some((_, hold)) = self
                .ledger
                .holds(client)
                .find(|(_, h)| h.request == request && h.slot == s)
            {
                return Response::Granted {
                    slot: s,
                    token: hold.token,
                    owner_died: hold.owner_died,
                };
            }
            let st = &mut self.slots[s as usize];
            if let Some(w) = st
                .queue
                .iter_mut()
                .find(|w| w.client == client && w.request == request)
            {
                let old = std::mem::replace(&mut w.conn, conn);
                w.cell = cell;
                self.waiting.remove(&old);
                self.waiting.insert(conn, s);
                return Response::Queued { slot: s };
            }
        }
        let stats = &table.header().stats;
        let s = match self.keys.get(key) {
            Some(&s) => s,
            None => match self.allocate(table, key) {
                Some(s) => s,
                None => {
                    stats.table_full.fetch_add(1, Ordering::Relaxed);
                    return error(
                        ErrorCode::TableFull,
                        format!(
                            "all {} lock slots hold keys that are held or waited for: raise \
                             table.slots in the broker's configuration, or release locks",
                            self.slots.len()
                        ),
                    );
                }
            },
        };
        let hash = self.slots[s as usize].hash;
        self.remember(hash, key);
        if !queue && !self.slots[s as usize].managed {
            // A try-lock on a key held on the fast path: say so without
            // taking the slot over (which would send its holder's release
            // through the broker for nothing).
            let w = word_of(table, s);
            if w.exclusive_owner().is_some() {
                return Response::WouldBlock;
            }
        }
        if let Err(refusal) = self.take_over(table, s) {
            return refusal;
        }
        let st = &self.slots[s as usize];
        let grantable = st.queue.is_empty()
            && match &st.holder {
                Holder::Free => true,
                Holder::Shared(_) => shared,
                Holder::Exclusive { .. } => false,
            };
        if grantable {
            events.push(
                events.ring_count() - 1,
                hash,
                shm_layout::monotonic_ns(),
                Outcome::SlowPath,
                shared,
                client,
            );
            // Predicted but not prepared in time: late; not predicted: a miss.
            let counter = if self.predicted.remove(&hash) {
                &stats.late
            } else {
                &stats.misses
            };
            counter.fetch_add(1, Ordering::Relaxed);
            return match self.grant(table, s, client, shared, request) {
                Ok((token, owner_died)) => Response::Granted {
                    slot: s,
                    token,
                    owner_died,
                },
                Err(resp) => {
                    self.return_to_fast_path(table, s);
                    resp
                }
            };
        }
        if !queue {
            return Response::WouldBlock;
        }
        events.push(
            events.ring_count() - 1,
            hash,
            shm_layout::monotonic_ns(),
            Outcome::Contended,
            shared,
            client,
        );
        stats.contended.fetch_add(1, Ordering::Relaxed);
        let st = &mut self.slots[s as usize];
        if st.contention_prepared && !st.contention_used {
            st.contention_used = true;
            stats
                .contention_prepared_hits
                .fetch_add(1, Ordering::Relaxed);
        }
        st.queue.push_back(Waiter {
            client,
            conn,
            cell,
            shared,
            request,
        });
        self.waiting.insert(conn, s);
        self.mirror(table, s);
        Response::Queued { slot: s }
    }

    /// A `Cancel` of request `request` from `conn` of `client`: withdraw its
    /// queued acquire, or report the grant that beat the cancel (on whatever
    /// connection it was answered).
    pub fn cancel(
        &mut self,
        table: &TableView,
        client: u32,
        conn: ConnId,
        request: u64,
        waker: &mut dyn Waker,
    ) -> Response {
        let queued = self.waiting.get(&conn).copied().or_else(|| {
            self.slots
                .iter()
                .position(|st| {
                    st.queue
                        .iter()
                        .any(|w| w.client == client && w.request == request)
                })
                .map(|s| s as u32)
        });
        if let Some(slot) = queued {
            let st = &mut self.slots[slot as usize];
            let conns: Vec<ConnId> = st
                .queue
                .iter()
                .filter(|w| w.conn == conn || (w.client == client && w.request == request))
                .map(|w| w.conn)
                .collect();
            st.queue
                .retain(|w| w.conn != conn && !(w.client == client && w.request == request));
            for c in conns {
                self.waiting.remove(&c);
            }
            self.mirror(table, slot);
            self.dispatch(table, slot, waker);
            return Response::Cancelled;
        }
        match self
            .ledger
            .holds(client)
            .find(|(_, h)| h.request == request && request != FAST_REQUEST)
        {
            Some((_, hold)) => Response::Granted {
                slot: hold.slot,
                token: hold.token,
                owner_died: hold.owner_died,
            },
            None => Response::Cancelled,
        }
    }

    /// A `Release` of `slot` granted with `token`, from record `client`.
    pub fn release(
        &mut self,
        table: &TableView,
        client: u32,
        slot: u32,
        token: u64,
        waker: &mut dyn Waker,
    ) -> Response {
        let now_ms = self.now_ms;
        let Some(st) = self.slots.get_mut(slot as usize) else {
            return error(ErrorCode::NotHolder, format!("slot {slot} does not exist"));
        };
        let Some(tslot) = table.slot(slot) else {
            return error(ErrorCode::NotHolder, format!("slot {slot} does not exist"));
        };
        if !st.managed {
            // A fast-path hold whose release CAS failed for a transient reason
            // (or a confused client): release it if the word says it is ours.
            let w = Word(tslot.word.load(Ordering::Acquire));
            let ours = w.exclusive_owner() == Some(client)
                && st.base.saturating_add(w.counter() as u64) == token;
            return if ours
                && tslot
                    .word
                    .compare_exchange(
                        w.0,
                        lockword::released(w).0,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    )
                    .is_ok()
            {
                Response::Released
            } else {
                not_holder(slot)
            };
        }
        let released = match &mut st.holder {
            Holder::Exclusive {
                client: c,
                token: t,
                ..
            } if *c == client && *t == token => {
                st.holder = Holder::Free;
                true
            }
            Holder::Shared(v) => match v.iter().position(|&(c, t)| c == client && t == token) {
                Some(i) => {
                    v.swap_remove(i);
                    if v.is_empty() {
                        st.holder = Holder::Free;
                    }
                    true
                }
                None => false,
            },
            _ => false,
        };
        if !released {
            return not_holder(slot);
        }
        self.ledger.remove_hold(client, slot, Some(token));
        clear_hold_mirror(table, client, slot);
        self.slots[slot as usize].last_use_ms = now_ms;
        self.mirror(table, slot);
        self.dispatch(table, slot, waker);
        Response::Released
    }

    // ---- the allocator's hooks -----------------------------------------------------

    /// Every tick: notice fast-path grants (a lock word's counter moved) and
    /// publish slot counts. Reclaiming is the allocator policy's decision
    /// ([`crate::allocator`]), applied through [`LockManager::evict`].
    pub fn tick(&mut self, table: &TableView, now_ms: u64) {
        self.now_ms = now_ms;
        let stats = &table.header().stats;
        let (mut used, mut prepared) = (0u64, 0u64);
        for s in 0..self.slots.len() as u32 {
            let st = &mut self.slots[s as usize];
            if st.key.is_none() {
                continue;
            }
            used += 1;
            let w = word_of(table, s);
            if w.counter() != st.last_counter {
                let grants = w.counter().wrapping_sub(st.last_counter) & 0xFF_FFFF;
                if !st.managed {
                    stats.hits.fetch_add(grants as u64, Ordering::Relaxed);
                }
                st.uses = st.uses.saturating_add(grants);
                st.issued = st.issued.max(st.base.saturating_add(w.counter() as u64));
                st.last_counter = w.counter();
                st.last_use_ms = now_ms;
                st.speculative = false;
            }
            if !st.managed {
                prepared += 1;
            }
        }
        stats.slots_used.store(used, Ordering::Relaxed);
        stats.slots_prepared.store(prepared, Ordering::Relaxed);
    }

    /// What the allocator policy sees of each keyed slot, into `out`;
    /// `scored(hash)` gives the forecaster's latest entry for a key.
    pub fn slot_views(
        &self,
        table: &TableView,
        scored: impl Fn(u64) -> Option<Scored>,
        out: &mut Vec<SlotView>,
    ) {
        out.clear();
        for (i, st) in self.slots.iter().enumerate() {
            if st.key.is_none() {
                continue;
            }
            let w = Word(
                table
                    .slot(i as u32)
                    .expect("i < slot_count")
                    .word
                    .load(Ordering::Relaxed),
            );
            let held = !st.queue.is_empty()
                || st.holder != Holder::Free
                || (!st.managed && !w.is_free())
                // Keep the bit until the next holder has been told.
                || w.owner_died();
            let scored = scored(st.hash);
            out.push(SlotView {
                slot: i as u32,
                key_hash: st.hash,
                prepared_at_us: st.placed_at_ms * 1000,
                last_use_us: (st.uses > 0).then_some(st.last_use_ms * 1000),
                uses_since_prepared: st.uses,
                held,
                score: scored.map(|s| s.score),
                contention: scored.map(|s| s.contention),
                contention_prepared: st.contention_prepared,
            });
        }
    }

    /// Whether the key with `hash` has a slot.
    pub fn has_key_hash(&self, hash: u64) -> bool {
        self.known
            .get(&hash)
            .is_some_and(|k| self.keys.contains_key(k))
    }

    /// Prepare the key with hash `hash` ahead of any request, if the broker
    /// knows its text and has room without evicting. Returns whether a slot was
    /// newly prepared.
    pub fn prepare(&mut self, table: &TableView, events: &EventsView, hash: u64) -> bool {
        if self.policy == Policy::None {
            return false;
        }
        let Some(key) = self.known.get(&hash).cloned() else {
            return false;
        };
        if let Some(&s) = self.keys.get(&key) {
            let st = &self.slots[s as usize];
            if st.managed && st.holder == Holder::Free && st.queue.is_empty() {
                self.return_to_fast_path(table, s);
            }
            self.slots[s as usize].last_use_ms = self.now_ms;
            return false;
        }
        let Some(s) = self.free.pop() else {
            return false;
        };
        self.place_key(table, s, &key);
        self.slots[s as usize].speculative = true;
        self.return_to_fast_path(table, s);
        table
            .header()
            .stats
            .preparations
            .fetch_add(1, Ordering::Relaxed);
        events.push(
            events.ring_count() - 1,
            hash,
            shm_layout::monotonic_ns(),
            Outcome::Prepared,
            false,
            BROKER_CLIENT,
        );
        true
    }

    /// Prepare the contention-resolution state of the key with hash `hash`
    /// (the allocator's `PrepareContention`): place its slot as
    /// [`LockManager::prepare`] does if it has none, then reserve room for
    /// `waiters` queued requests in its queue and in the broker-wide maps of
    /// queued and handed-off connections. Returns whether it was prepared
    /// (false: the key is unknown, or it has no slot and none is free, or
    /// preparation is off).
    pub fn prepare_contention(
        &mut self,
        table: &TableView,
        events: &EventsView,
        hash: u64,
        waiters: usize,
    ) -> bool {
        if self.policy == Policy::None {
            return false;
        }
        let Some(key) = self.known.get(&hash).cloned() else {
            return false;
        };
        let s = match self.keys.get(&key) {
            Some(&s) => s,
            None => {
                if !self.prepare(table, events, hash) {
                    return false;
                }
                *self.keys.get(&key).expect("prepare placed the key")
            }
        };
        let st = &mut self.slots[s as usize];
        st.queue.reserve(waiters.saturating_sub(st.queue.len()));
        st.contention_prepared = true;
        st.contention_used = false;
        self.waiting.reserve(waiters);
        table
            .header()
            .stats
            .contention_prepared
            .fetch_add(1, Ordering::Relaxed);
        true
    }

    /// The capacity of the key's waiter queue, if the key has a slot (tests
    /// and observers).
    pub fn queue_capacity(&self, key: &[u8]) -> Option<usize> {
        let &s = self.keys.get(key)?;
        Some(self.slots[s as usize].queue.capacity())
    }

    /// Whether the key's slot holds a contention preparation (tests and observers).
    pub fn contention_prepared(&self, key: &[u8]) -> bool {
        self.keys
            .get(key)
            .is_some_and(|&s| self.slots[s as usize].contention_prepared)
    }

    /// The forecaster no longer predicts contention for the key in slot `s`:
    /// the slot is an ordinary one again (no longer evicted last by the slow
    /// path; a new prediction prepares it again). Its queue keeps its capacity.
    pub fn end_contention_preparation(&mut self, s: u32) {
        if let Some(st) = self.slots.get_mut(s as usize) {
            st.contention_prepared = false;
            st.contention_used = false;
        }
    }

    /// Free a prepared or idle slot now (the allocator's reclaim or eviction).
    /// Refuses a slot that is held or waited for (re-checked here: the policy
    /// decided on a snapshot). A slot prepared ahead and never used counts as
    /// a wasted preparation.
    pub fn evict(&mut self, table: &TableView, events: &EventsView, s: u32) -> bool {
        let Some(st) = self.slots.get(s as usize) else {
            return false;
        };
        if st.key.is_none() || !st.queue.is_empty() || st.holder != Holder::Free {
            return false;
        }
        let (wasted, hash) = (st.speculative, st.hash);
        if !self.free_slot(table, s) {
            return false;
        }
        if wasted {
            table.header().stats.wasted.fetch_add(1, Ordering::Relaxed);
            let ring = events.ring_count() - 1;
            events.push(
                ring,
                hash,
                shm_layout::monotonic_ns(),
                Outcome::Reclaimed,
                false,
                BROKER_CLIENT,
            );
        }
        true
    }

    /// The keys the forecaster wants prepared that are not (yet): a slow-path
    /// request for one of them counts as late rather than missed.
    pub fn set_predicted(&mut self, hashes: impl IntoIterator<Item = u64>) {
        self.predicted.clear();
        self.predicted.extend(hashes);
    }

    /// Whether any acquire is queued.
    pub fn has_waiters(&self) -> bool {
        !self.waiting.is_empty()
    }

    /// Active client records and their pids (to watch them after adoption).
    pub fn active_clients(&self) -> Vec<(u32, u32)> {
        self.clients
            .iter()
            .enumerate()
            .filter(|(_, c)| c.active)
            .map(|(i, c)| (i as u32, c.pid))
            .collect()
    }

    // ---- internals -----------------------------------------------------------------

    fn remember(&mut self, hash: u64, key: &[u8]) {
        if self.known.len() >= 4 * self.slots.len() + 1024 {
            // Bounded: forget everything not currently in a slot.
            let slots = &self.slots;
            self.known
                .retain(|_, k| slots.iter().any(|st| st.key.as_deref() == Some(&**k)));
            if self.known.len() >= 4 * self.slots.len() + 1024 {
                self.known.clear();
            }
        }
        self.known.entry(hash).or_insert_with(|| key.into());
    }

    /// Take a free slot for `key` (evicting the least recently used idle slot
    /// if none is free). The slot is keyed and managed, with no holder.
    fn allocate(&mut self, table: &TableView, key: &[u8]) -> Option<u32> {
        let s = match self.free.pop() {
            Some(s) => s,
            None => {
                let victim = (0..self.slots.len() as u32)
                    .filter(|&s| {
                        let st = &self.slots[s as usize];
                        st.key.is_some()
                            && st.queue.is_empty()
                            && st.holder == Holder::Free
                            && (st.managed || word_of(table, s).is_free())
                    })
                    // Slots kept for predicted contention go last.
                    .min_by_key(|&s| {
                        let st = &self.slots[s as usize];
                        (st.contention_prepared, st.last_use_ms)
                    })?;
                if !self.free_slot(table, victim) {
                    return None;
                }
                self.free.pop()?
            }
        };
        self.place_key(table, s, key);
        Some(s)
    }

    /// Write `key` into free slot `s`, managed and unheld, and index it. Its
    /// token base is the floor: above every token any key ever had.
    fn place_key(&mut self, table: &TableView, s: u32, key: &[u8]) {
        let slot = table.slot(s).expect("free slots are in range");
        let header = table.header();
        let old = Word(slot.word.load(Ordering::Acquire));
        let hash = key_hash(key);
        let base = self.ledger.floor();
        // The ledger first: a restarted broker trusts it, not the table.
        self.ledger.set_slot(s, key, base);
        slot.store_key(key, hash, 0);
        slot.token_base.store(base, Ordering::Relaxed);
        slot.prepared_at_ms.store(self.now_ms, Ordering::Relaxed);
        slot.waiters.store(0, Ordering::Relaxed);
        let died = self.died_keys.remove(key);
        let mut word = lockword::rekey(old);
        if died {
            word = Word(word.0 | OWNER_DIED);
        }
        // SYNC POINT: Release publishes the key and token base written above;
        // pairs with the Acquire word load in `TableView::lookup`.
        slot.word.store(word.0, Ordering::Release);
        let st = &mut self.slots[s as usize];
        *st = SlotState::empty();
        st.key = Some(key.into());
        st.hash = hash;
        st.last_use_ms = self.now_ms;
        st.placed_at_ms = self.now_ms;
        st.base = base;
        st.issued = base;
        self.keys.insert(key.into(), s);
        self.index_insert(table, s);
        header.stats.slots_used.fetch_add(1, Ordering::Relaxed);
    }

    /// Clear slot `s` if its word is still unheld. The floor is raised above
    /// every token the slot issued before its counter is reset, so that a
    /// broker killed in between still never issues a token twice.
    fn free_slot(&mut self, table: &TableView, s: u32) -> bool {
        let slot = table.slot(s).expect("s < slot_count");
        let w = Word(slot.word.load(Ordering::Acquire));
        if w.is_prepared() && !w.is_free() {
            return false;
        }
        let st = &self.slots[s as usize];
        let issued = st.issued.max(st.base.saturating_add(w.counter() as u64));
        self.raise_floor(table, issued.saturating_add(1));
        // SYNC POINT: AcqRel: Acquire pairs with the last fast-path release;
        // Release orders the unpublishing before we rewrite the key. Failure
        // Acquire: we only re-read.
        if slot
            .word
            .compare_exchange(
                w.0,
                lockword::rekey(w).0,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_err()
        {
            return false; // a client took it meanwhile: keep the slot
        }
        self.ledger.clear_slot(s);
        self.index_remove(table, s);
        slot.key_len.store(0, Ordering::Relaxed);
        let st = std::mem::replace(&mut self.slots[s as usize], SlotState::empty());
        if let Some(key) = st.key {
            if w.owner_died() && self.died_keys.len() < DIED_KEYS_MAX {
                // Nobody was told yet: the key's next holder will be.
                self.died_keys.insert(key.clone());
            }
            self.keys.remove(&key);
        }
        self.free.push(s);
        true
    }

    /// Raise the token floor to `at_least` in the ledger, and publish it in
    /// the header for observers (clients never read it for a decision).
    fn raise_floor(&mut self, table: &TableView, at_least: u64) {
        let floor = self.ledger.raise_floor(at_least);
        table.header().token_floor.store(floor, Ordering::Relaxed);
    }

    /// Make a prepared slot managed (clear PREPARED), learning its fast-path
    /// holder from the word and recording it in the ledger, so that a
    /// restarted broker knows it too. A managed slot is left as it is.
    /// Refused when the holder's ledger entry is full (it holds
    /// [`crate::ledger::LEDGER_HOLDS`] locks): the slot then stays prepared.
    fn take_over(&mut self, table: &TableView, s: u32) -> Result<(), Response> {
        if self.slots[s as usize].managed {
            return Ok(());
        }
        let slot = table.slot(s).expect("s < slot_count");
        let peek = Word(slot.word.load(Ordering::Acquire));
        if let Some(owner) = peek.exclusive_owner()
            && self.clients.get(owner as usize).is_some_and(|c| c.active)
            && !self.ledger.has_room(owner)
        {
            return Err(error(
                ErrorCode::TooManyHolds,
                format!(
                    "the holder of this key holds {} locks, the most the broker can record: \
                     try again later",
                    crate::ledger::LEDGER_HOLDS
                ),
            ));
        }
        // SYNC POINT: AcqRel on fetch_and: Acquire pairs with the Release of a
        // fast-path release (so we see the holder's final state); after this,
        // clients' CASes (which require PREPARED) fail.
        let w = Word(slot.word.fetch_and(!lockword::PREPARED, Ordering::AcqRel));
        let st = &mut self.slots[s as usize];
        st.managed = true;
        st.holder = Holder::Free;
        if w.0 & RESERVED_MASK != 0 || (!w.is_free() && w.exclusive_owner().is_none()) {
            table.header().stats.repairs.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(slot = s, word = ?w, "lock word in a shape forelock never writes: repaired to free (someone scribbled on the table)");
        } else if let Some(owner) = w.exclusive_owner() {
            let token = st.base.saturating_add(w.counter() as u64);
            let owner_alive = self.clients.get(owner as usize).is_some_and(|c| c.active);
            let recorded = owner_alive
                && self.ledger.add_hold(
                    owner,
                    Hold {
                        slot: s,
                        shared: false,
                        token,
                        request: FAST_REQUEST,
                        owner_died: false,
                    },
                );
            if recorded {
                st.holder = Holder::Exclusive {
                    client: owner,
                    token,
                    via_broker: false,
                };
            } else {
                // The word names a client that is not registered (its owner
                // is gone, or the word was scribbled), or one whose entry
                // filled between the check above and now (impossible: one
                // thread). Release it as owner-died.
                slot.word.fetch_or(OWNER_DIED, Ordering::AcqRel);
                table
                    .header()
                    .stats
                    .owner_deaths
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        let st = &mut self.slots[s as usize];
        st.issued = st.issued.max(st.base.saturating_add(w.counter() as u64));
        if w.counter() != st.last_counter {
            table.header().stats.hits.fetch_add(
                (w.counter().wrapping_sub(st.last_counter) & 0xFF_FFFF) as u64,
                Ordering::Relaxed,
            );
            st.last_counter = w.counter();
        }
        self.mirror(table, s);
        Ok(())
    }

    /// Grant managed slot `s` to `client` for its request `request`: bump the
    /// counter (rebasing the token if the counter is exhausted), record the
    /// hold in the ledger, then in the word. Returns the token and whether
    /// the previous owner died.
    fn grant(
        &mut self,
        table: &TableView,
        s: u32,
        client: u32,
        shared: bool,
        request: u64,
    ) -> Result<(u64, bool), Response> {
        let broker_holds = self
            .ledger
            .holds(client)
            .filter(|(_, h)| h.request != FAST_REQUEST)
            .count();
        if broker_holds >= BROKER_HOLDS || !self.ledger.has_room(client) {
            return Err(error(
                ErrorCode::TooManyHolds,
                format!(
                    "this client already holds {BROKER_HOLDS} locks granted by the broker: release some first"
                ),
            ));
        }
        let slot = table.slot(s).expect("s < slot_count");
        let w = Word(slot.word.load(Ordering::Acquire));
        let owner_died = w.owner_died();
        let st = &mut self.slots[s as usize];
        // The token: above every token this slot issued, whatever the
        // client-writable counter says; rebase when the counter would run out.
        let mut token = st
            .base
            .saturating_add(w.counter() as u64 + 1)
            .max(st.issued.saturating_add(1));
        let mut counter = token - st.base;
        if counter > lockword::COUNTER_MASK {
            st.base = token - 1;
            counter = 1;
            token = st.base + 1;
            self.ledger.set_base(s, st.base);
            slot.token_base.store(st.base, Ordering::Relaxed);
        }
        let counter = counter as u32;
        st.issued = token;
        self.ledger.add_hold(
            client,
            Hold {
                slot: s,
                shared,
                token,
                request,
                owner_died,
            },
        );
        st.holder = match std::mem::replace(&mut st.holder, Holder::Free) {
            Holder::Shared(mut v) if shared => {
                v.push((client, token));
                Holder::Shared(v)
            }
            _ if shared => Holder::Shared(vec![(client, token)]),
            _ => Holder::Exclusive {
                client,
                token,
                via_broker: true,
            },
        };
        st.last_counter = counter;
        st.last_use_ms = self.now_ms;
        st.uses = st.uses.saturating_add(1);
        st.speculative = false;
        // The grant consumed the owner-died bit.
        slot.word.store(
            lockword::managed(Word(w.0 & !OWNER_DIED), false, 0, counter).0,
            Ordering::Release,
        );
        slot.held_since_ms.store(self.now_ms, Ordering::Relaxed);
        mirror_hold(table, client, s, shared);
        self.mirror(table, s);
        Ok((token, owner_died))
    }

    /// Grant the head of `s`'s queue (all leading shared waiters at once) if
    /// the slot is free for them; a waiter that cannot take the lock (its
    /// hold list is full) is answered with the refusal and the next one is
    /// served. With an empty queue and no holder, the slot goes back to the
    /// fast path.
    fn dispatch(&mut self, table: &TableView, s: u32, waker: &mut dyn Waker) {
        loop {
            let st = &self.slots[s as usize];
            let Some(&head) = st.queue.front() else { break };
            let ok = match &st.holder {
                Holder::Free => true,
                Holder::Shared(_) => head.shared,
                Holder::Exclusive { .. } => false,
            };
            if !ok {
                break;
            }
            self.slots[s as usize].queue.pop_front();
            self.waiting.remove(&head.conn);
            let Some(rec) = table.client(head.client) else {
                continue;
            };
            let Some(cell) = rec.cells.get(head.cell as usize) else {
                continue;
            };
            let answer = match self.grant(table, s, head.client, head.shared, head.request) {
                Ok((token, owner_died)) => {
                    // Mirrored in the cell for observers only.
                    cell.token.store(token, Ordering::Relaxed);
                    let flags = if owner_died { GRANT_OWNER_DIED } else { 0 };
                    cell.flags.store(flags, Ordering::Relaxed);
                    table
                        .header()
                        .stats
                        .handoffs
                        .fetch_add(1, Ordering::Relaxed);
                    Response::Granted {
                        slot: s,
                        token,
                        owner_died,
                    }
                }
                // Its hold list is full: it cannot take more.
                Err(refusal) => refusal,
            };
            tracing::debug!(
                slot = s,
                client = head.client,
                conn = head.conn,
                ?answer,
                "hand-off"
            );
            waker.answer(head.conn, answer);
            // SYNC POINT: Release pairs with the waiter's Acquire load of the
            // state after its futex wait.
            cell.state.store(CELL_GRANTED, Ordering::Release);
            waker.wake(&cell.state);
        }
        self.mirror(table, s);
        let st = &self.slots[s as usize];
        if st.queue.is_empty() && st.holder == Holder::Free {
            self.return_to_fast_path(table, s);
        }
    }

    /// A managed, unheld slot with no queue becomes prepared again (if the
    /// policy prepares at all).
    fn return_to_fast_path(&mut self, table: &TableView, s: u32) {
        let st = &mut self.slots[s as usize];
        if self.policy == Policy::None
            || !st.managed
            || st.holder != Holder::Free
            || !st.queue.is_empty()
            || st.key.is_none()
        {
            return;
        }
        let slot = table.slot(s).expect("s < slot_count");
        let w = Word(slot.word.load(Ordering::Acquire));
        // The table's base is a copy for clients: rewrite it from ours.
        slot.token_base.store(st.base, Ordering::Relaxed);
        // SYNC POINT: Release publishes the slot's state to the next fast-path
        // acquirer (its CAS is Acquire).
        slot.word.store(lockword::prepare(w).0, Ordering::Release);
        slot.waiters.store(0, Ordering::Relaxed);
        st.managed = false;
        st.last_counter = w.counter();
    }

    /// Write the managed slot's private holder and queue length into the word
    /// and slot for observers.
    fn mirror(&self, table: &TableView, s: u32) {
        let st = &self.slots[s as usize];
        let slot = table.slot(s).expect("s < slot_count");
        slot.waiters.store(st.queue.len() as u32, Ordering::Relaxed);
        if !st.managed {
            return;
        }
        let w = Word(slot.word.load(Ordering::Acquire));
        let (exclusive, holders) = match &st.holder {
            Holder::Free => (false, 0),
            Holder::Exclusive { client, .. } => (true, client + 1),
            Holder::Shared(v) => (false, v.len() as u32),
        };
        slot.word.store(
            lockword::managed(w, exclusive, holders, w.counter()).0,
            Ordering::Release,
        );
    }

    fn index_insert(&mut self, table: &TableView, s: u32) {
        let mask = self.index.len() as u32 - 1;
        let hash = self.slots[s as usize].hash;
        let home = hash as u32 & mask;
        for probe in 0..INDEX_MAX_PROBE as u32 {
            let p = (home + probe) & mask;
            if self.index[p as usize] == 0 {
                self.index[p as usize] = s + 1;
                self.slots[s as usize].index_pos = Some(p);
                if let Some(e) = table.index_entry(p) {
                    e.0.store(IndexEntry::pack(hash, s), Ordering::Release);
                }
                return;
            }
        }
        // No room near home: the key works through the broker only.
    }

    /// Remove `s` from the index with backward-shift deletion, so probes need
    /// no tombstones. Readers racing with a shift may miss an entry for a
    /// moment; they then take the slow path.
    fn index_remove(&mut self, table: &TableView, s: u32) {
        let Some(mut hole) = self.slots[s as usize].index_pos.take() else {
            return;
        };
        let mask = self.index.len() as u32 - 1;
        let mut next = (hole + 1) & mask;
        loop {
            let occupant = self.index[next as usize];
            if occupant == 0 {
                break;
            }
            let o = occupant - 1;
            let home = self.slots[o as usize].hash as u32 & mask;
            // Move `o` into the hole if the hole lies on its probe path.
            let dist_next = next.wrapping_sub(home) & mask;
            let dist_hole = hole.wrapping_sub(home) & mask;
            if dist_hole < dist_next {
                self.index[hole as usize] = occupant;
                self.slots[o as usize].index_pos = Some(hole);
                if let Some(e) = table.index_entry(hole) {
                    e.0.store(
                        IndexEntry::pack(self.slots[o as usize].hash, o),
                        Ordering::Release,
                    );
                }
                hole = next;
            }
            next = (next + 1) & mask;
            if next == hole {
                break;
            }
        }
        self.index[hole as usize] = 0;
        if let Some(e) = table.index_entry(hole) {
            e.0.store(0, Ordering::Release);
        }
    }
}

/// Mirror a broker hold into the client's table record, for observers
/// (`forelock locks` shows shared holders from it). Best effort: the ledger
/// is the record that counts.
fn mirror_hold(table: &TableView, client: u32, slot: u32, shared: bool) {
    let Some(rec) = table.client(client) else {
        return;
    };
    if let Some(h) = rec
        .broker_holds
        .iter()
        .find(|h| h.load(Ordering::Relaxed) == 0)
    {
        h.store(
            (slot + 1) | if shared { HOLD_SHARED } else { 0 },
            Ordering::Relaxed,
        );
    }
}

fn clear_hold_mirror(table: &TableView, client: u32, slot: u32) {
    let Some(rec) = table.client(client) else {
        return;
    };
    if let Some(h) = rec
        .broker_holds
        .iter()
        .find(|h| h.load(Ordering::Relaxed) & !HOLD_SHARED == slot + 1)
    {
        h.store(0, Ordering::Relaxed);
    }
}

fn error(code: ErrorCode, message: String) -> Response {
    Response::Error { code, message }
}

fn not_holder(slot: u32) -> Response {
    error(
        ErrorCode::NotHolder,
        format!(
            "release of slot {slot}: this client does not hold it with that token (double release?)"
        ),
    )
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod explore;
