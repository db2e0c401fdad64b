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
use shm_layout::events::EventsView;
use shm_layout::events::Outcome;
use shm_layout::lockword::{EXCLUSIVE, OWNER_DIED, PREPARED, RESERVED_MASK, Word};
use shm_layout::scores::Scored;
use shm_layout::sync::shm::{AtomicU32, Ordering};
use shm_layout::table::{
    BROKER_HOLDS, CELL_ABANDONED, CELL_GRANTED, CELL_IDLE, CELL_WAITING, CLIENT_ACTIVE,
    CLIENT_FREE, GRANT_OWNER_DIED, HOLD_SHARED, INDEX_MAX_PROBE, IndexEntry, TableView, WAIT_CELLS,
};
use shm_layout::wire::{ErrorCode, Response};
use shm_layout::{key_hash, validate_key};
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

/// A shared hold adopted from a previous broker: its exact token is unknown,
/// so any release of the slot by that client matches it.
const TOKEN_UNKNOWN: u64 = u64::MAX;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Waiter {
    client: u32,
    conn: ConnId,
    cell: u32,
    shared: bool,
}

#[derive(Debug)]
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
    /// Token base and counter live in client-writable memory; a broker grant
    /// never goes below this, whatever they say.
    issued: u64,
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
            index_pos: None,
        }
    }
}

#[derive(Debug, Default)]
struct ClientState {
    active: bool,
    pid: u32,
    /// Connections currently open for this record (this broker's lifetime).
    conns: u32,
    /// Whether any connection attached since this broker started.
    seen: bool,
}

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
    epoch: u64,
    keys: HashMap<Box<[u8]>, u32>,
    slots: Vec<SlotState>,
    free: Vec<u32>,
    /// Private mirror of the key index: `slot + 1` or 0 per position.
    index: Vec<u32>,
    clients: Vec<ClientState>,
    /// Queued acquires by connection: the slot each waits on.
    waiting: HashMap<ConnId, u32>,
    /// Grants made through a connection's wait cell, until the connection's
    /// next request (answers a Cancel that raced with the hand-off).
    handed: HashMap<ConnId, (u32, u64, bool)>,
    /// Every token issued so far is below this (the private copy of the
    /// header's `token_floor`, which a client could overwrite).
    floor: u64,
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
    /// Build the manager over a table, adopting whatever the table holds (a
    /// fresh table adopts nothing). `alive(pid)` says whether a recorded client
    /// process still runs (with the same start time).
    pub fn adopt(
        table: &TableView,
        policy: Policy,
        epoch: u64,
        now_ms: u64,
        mut alive: impl FnMut(u32, u64) -> bool,
        waker: &mut dyn Waker,
    ) -> LockManager {
        let g = table.geometry();
        let mut m = LockManager {
            policy,
            epoch,
            keys: HashMap::new(),
            slots: (0..g.slot_count).map(|_| SlotState::empty()).collect(),
            free: Vec::new(),
            index: vec![0; g.index_len as usize],
            clients: (0..g.client_count)
                .map(|_| ClientState::default())
                .collect(),
            waiting: HashMap::new(),
            handed: HashMap::new(),
            floor: 1,
            known: HashMap::new(),
            predicted: std::collections::HashSet::new(),
            now_ms,
        };
        for p in 0..g.index_len {
            if let Some(e) = table.index_entry(p) {
                e.0.store(0, Ordering::Relaxed);
            }
        }
        let mut floor = table.header().token_floor.load(Ordering::Relaxed).max(1);
        // Slots: keep each valid, distinct key; free everything else.
        for s in 0..g.slot_count {
            let slot = table.slot(s).expect("s < slot_count");
            let word = Word(slot.word.load(Ordering::Acquire));
            floor = floor.max(word_token(slot, word).saturating_add(1));
            let key = slot.key_bytes();
            let keep = slot.key_len.load(Ordering::Relaxed) as usize == key.len()
                && validate_key(&key).is_ok()
                && !m.keys.contains_key(key.as_slice());
            if !keep {
                let next_gen = word.generation().wrapping_add(1);
                slot.key_len.store(0, Ordering::Relaxed);
                slot.word
                    .store(Word::new(next_gen, 0, 0, 0).0, Ordering::Release);
                m.free.push(s);
                continue;
            }
            let st = &mut m.slots[s as usize];
            st.hash = key_hash(&key);
            slot.key_hash.store(st.hash, Ordering::Relaxed);
            st.key = Some(key.clone().into_boxed_slice());
            st.last_counter = word.counter();
            st.issued = word_token(slot, word);
            st.last_use_ms = now_ms;
            st.managed = !word.is_prepared();
            m.keys.insert(key.into_boxed_slice(), s);
        }
        m.free.reverse();
        table.header().token_floor.store(floor, Ordering::Relaxed);
        m.floor = floor;
        // Clients: live ones keep their records and broker-granted holds.
        let mut dead = Vec::new();
        for c in 0..g.client_count {
            let rec = table.client(c).expect("c < client_count");
            if rec.state.load(Ordering::Relaxed) != CLIENT_ACTIVE {
                continue;
            }
            let pid = rec.pid.load(Ordering::Relaxed);
            let start = rec.start_time.load(Ordering::Relaxed);
            for cell in &rec.cells {
                if cell.state.load(Ordering::Relaxed) == CELL_WAITING {
                    // The queue it waited in died with the old broker.
                    cell.state.store(CELL_ABANDONED, Ordering::Release);
                    waker.wake(&cell.state);
                }
            }
            m.clients[c as usize] = ClientState {
                active: true,
                pid,
                conns: 0,
                seen: false,
            };
            for h in &rec.broker_holds {
                let raw = h.load(Ordering::Relaxed);
                let Some(slot_index) = (raw & !HOLD_SHARED).checked_sub(1) else {
                    continue;
                };
                let shared = raw & HOLD_SHARED != 0;
                let Some(st) = m.slots.get_mut(slot_index as usize) else {
                    h.store(0, Ordering::Relaxed);
                    continue;
                };
                if st.key.is_none() {
                    h.store(0, Ordering::Relaxed);
                    continue;
                }
                let slot = table.slot(slot_index).expect("bounds checked above");
                let word = Word(slot.word.load(Ordering::Acquire));
                let token = word_token(slot, word);
                st.managed = true;
                st.holder = match (std::mem::replace(&mut st.holder, Holder::Free), shared) {
                    (Holder::Free, false) => Holder::Exclusive {
                        client: c,
                        token,
                        via_broker: true,
                    },
                    (Holder::Free, true) => Holder::Shared(vec![(c, TOKEN_UNKNOWN)]),
                    (Holder::Shared(mut v), true) => {
                        v.push((c, TOKEN_UNKNOWN));
                        Holder::Shared(v)
                    }
                    // Two records claim incompatible holds: the table was
                    // scribbled. Keep the first claim, drop this one.
                    (other, _) => {
                        h.store(0, Ordering::Relaxed);
                        other
                    }
                };
            }
            if !alive(pid, start) {
                dead.push(c);
            }
        }
        // Managed slots: the word mirrors the private holder from now on.
        for s in 0..g.slot_count {
            if m.slots[s as usize].key.is_some() && m.slots[s as usize].managed {
                m.mirror(table, s);
            }
            if m.slots[s as usize].key.is_some() {
                m.index_insert(table, s);
            }
        }
        for c in dead {
            m.client_gone(table, c, waker);
        }
        m
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
            let st = &mut self.clients[c as usize];
            st.conns += 1;
            st.seen = true;
            return Ok(Registered::Attached { client: c });
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
            conns: 1,
            seen: true,
        };
        table.header().stats.clients.fetch_add(1, Ordering::Relaxed);
        Ok(Registered::New { client: c as u32 })
    }

    /// A connection closed. When a record's last connection closes, the client
    /// is gone: its locks are released (reported as owner-died to the next
    /// holder, since it never released them itself).
    pub fn conn_closed(
        &mut self,
        table: &TableView,
        conn: ConnId,
        client: Option<u32>,
        waker: &mut dyn Waker,
    ) {
        self.handed.remove(&conn);
        if let Some(slot) = self.waiting.remove(&conn) {
            self.slots[slot as usize].queue.retain(|w| w.conn != conn);
            self.dispatch(table, slot, waker);
        }
        let Some(c) = client else { return };
        let Some(st) = self.clients.get_mut(c as usize) else {
            return;
        };
        st.conns = st.conns.saturating_sub(1);
        if st.active && st.seen && st.conns == 0 {
            self.client_gone(table, c, waker);
        }
    }

    /// The process behind record `client` died (pidfd) or left: release
    /// everything it held, drop its waiters, free the record.
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
                    let freed = Word(shm_layout::lockword::released(w).0 | OWNER_DIED);
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

    // ---- requests ---------------------------------------------------------------

    /// An `Acquire` from connection `conn` of record `client`, whose wait cell
    /// is `cell`.
    #[allow(clippy::too_many_arguments)]
    pub fn acquire(
        &mut self,
        table: &TableView,
        events: &EventsView,
        client: u32,
        conn: ConnId,
        cell: u32,
        key: &[u8],
        shared: bool,
        queue: bool,
    ) -> Response {
        self.handed.remove(&conn);
        if let Err(e) = validate_key(key) {
            return error(ErrorCode::BadKey, e.to_string());
        }
        if self.waiting.contains_key(&conn) {
            return error(
                ErrorCode::BadRequest,
                "this connection already has a queued acquire".into(),
            );
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
        self.take_over(table, s);
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
            return match self.grant(table, s, client, shared) {
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
        });
        self.waiting.insert(conn, s);
        self.mirror(table, s);
        Response::Queued { slot: s }
    }

    /// A `Cancel` from `conn`: withdraw its queued acquire, or report the grant
    /// that beat the cancel.
    pub fn cancel(&mut self, table: &TableView, conn: ConnId, waker: &mut dyn Waker) -> Response {
        if let Some(slot) = self.waiting.remove(&conn) {
            self.slots[slot as usize].queue.retain(|w| w.conn != conn);
            self.mirror(table, slot);
            self.dispatch(table, slot, waker);
            return Response::Cancelled;
        }
        match self.handed.remove(&conn) {
            Some((slot, token, owner_died)) => Response::Granted {
                slot,
                token,
                owner_died,
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
            let ours = w.exclusive_owner() == Some(client) && word_token(tslot, w) == token;
            let freed = shm_layout::lockword::released(w);
            return if ours
                && tslot
                    .word
                    .compare_exchange(w.0, freed.0, Ordering::AcqRel, Ordering::Acquire)
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
                via_broker,
            } if *c == client && *t == token => {
                let via_broker = *via_broker;
                st.holder = Holder::Free;
                if via_broker {
                    clear_hold(table, client, slot);
                }
                true
            }
            Holder::Shared(v) => {
                match v
                    .iter()
                    .position(|&(c, t)| c == client && (t == token || t == TOKEN_UNKNOWN))
                {
                    Some(i) => {
                        v.swap_remove(i);
                        if v.is_empty() {
                            st.holder = Holder::Free;
                        }
                        clear_hold(table, client, slot);
                        true
                    }
                    None => false,
                }
            }
            _ => false,
        };
        if !released {
            return not_holder(slot);
        }
        st.last_use_ms = now_ms;
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
                st.issued = st
                    .issued
                    .max(word_token(table.slot(s).expect("s < slot_count"), w));
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
        self.handed.reserve(waiters);
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

    /// Write `key` into free slot `s`, managed and unheld, and index it.
    fn place_key(&mut self, table: &TableView, s: u32, key: &[u8]) {
        let slot = table.slot(s).expect("free slots are in range");
        let header = table.header();
        let old = Word(slot.word.load(Ordering::Acquire));
        let hash = key_hash(key);
        let base = self.floor;
        slot.store_key(key, hash, 0);
        slot.token_base.store(base, Ordering::Relaxed);
        slot.prepared_at_ms.store(self.now_ms, Ordering::Relaxed);
        slot.waiters.store(0, Ordering::Relaxed);
        // SYNC POINT: Release publishes the key and token base written above;
        // pairs with the Acquire word load in `TableView::lookup`.
        slot.word.store(
            Word::new(old.generation().wrapping_add(1), 0, 0, 0).0,
            Ordering::Release,
        );
        let st = &mut self.slots[s as usize];
        *st = SlotState::empty();
        st.key = Some(key.into());
        st.hash = hash;
        st.last_use_ms = self.now_ms;
        st.placed_at_ms = self.now_ms;
        st.issued = base;
        self.keys.insert(key.into(), s);
        self.index_insert(table, s);
        header.stats.slots_used.fetch_add(1, Ordering::Relaxed);
    }

    /// Clear slot `s` if its word is still unheld; raise the token floor above
    /// every token it issued.
    fn free_slot(&mut self, table: &TableView, s: u32) -> bool {
        let slot = table.slot(s).expect("s < slot_count");
        let w = Word(slot.word.load(Ordering::Acquire));
        if w.is_prepared() && !w.is_free() {
            return false;
        }
        let emptied = Word::new(w.generation().wrapping_add(1), 0, 0, 0);
        // SYNC POINT: AcqRel: Acquire pairs with the last fast-path release;
        // Release orders the unpublishing before we rewrite the key. Failure
        // Acquire: we only re-read.
        if slot
            .word
            .compare_exchange(w.0, emptied.0, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return false; // a client took it meanwhile: keep the slot
        }
        let issued = self.slots[s as usize].issued.max(word_token(slot, w));
        self.raise_floor(table, issued.saturating_add(1));
        self.index_remove(table, s);
        slot.key_len.store(0, Ordering::Relaxed);
        let st = std::mem::replace(&mut self.slots[s as usize], SlotState::empty());
        if let Some(key) = st.key {
            self.keys.remove(&key);
        }
        self.free.push(s);
        true
    }

    /// Raise the private token floor to `at_least` and publish it (the
    /// header's copy only ever goes up, even if a client lowered it).
    fn raise_floor(&mut self, table: &TableView, at_least: u64) {
        self.floor = self.floor.max(at_least);
        let published = table
            .header()
            .token_floor
            .fetch_max(self.floor, Ordering::Relaxed);
        self.floor = self.floor.max(published);
    }

    /// Make a prepared slot managed (clear PREPARED), learning its fast-path
    /// holder from the word. A managed slot is left as it is.
    fn take_over(&mut self, table: &TableView, s: u32) {
        if self.slots[s as usize].managed {
            return;
        }
        let slot = table.slot(s).expect("s < slot_count");
        // SYNC POINT: AcqRel on fetch_and: Acquire pairs with the Release of a
        // fast-path release (so we see the holder's final state); after this,
        // clients' CASes (which require PREPARED) fail.
        let w = Word(slot.word.fetch_and(!PREPARED, Ordering::AcqRel));
        let st = &mut self.slots[s as usize];
        st.managed = true;
        st.holder = Holder::Free;
        if w.0 & RESERVED_MASK != 0 || (!w.is_free() && w.exclusive_owner().is_none()) {
            table.header().stats.repairs.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(slot = s, word = ?w, "lock word in a shape forelock never writes: repaired to free (someone scribbled on the table)");
        } else if let Some(owner) = w.exclusive_owner() {
            let token = word_token(slot, w);
            st.holder = Holder::Exclusive {
                client: owner,
                token,
                via_broker: false,
            };
            let owner_alive = self.clients.get(owner as usize).is_some_and(|c| c.active);
            if !owner_alive {
                // The word names a client that is not registered: its owner is
                // gone (or the word was scribbled). Release it as owner-died.
                st.holder = Holder::Free;
                slot.word.fetch_or(OWNER_DIED, Ordering::AcqRel);
                table
                    .header()
                    .stats
                    .owner_deaths
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        if w.counter() != st.last_counter {
            table.header().stats.hits.fetch_add(
                (w.counter().wrapping_sub(st.last_counter) & 0xFF_FFFF) as u64,
                Ordering::Relaxed,
            );
            st.last_counter = w.counter();
        }
        self.mirror(table, s);
    }

    /// Grant managed slot `s` to `client`: bump the counter (rebasing the
    /// token if the counter is exhausted), record the hold. Returns the token
    /// and whether the previous owner died.
    fn grant(
        &mut self,
        table: &TableView,
        s: u32,
        client: u32,
        shared: bool,
    ) -> Result<(u64, bool), Response> {
        let rec = table
            .client(client)
            .expect("registered clients are in range");
        let Some(free_hold) = rec
            .broker_holds
            .iter()
            .find(|h| h.load(Ordering::Relaxed) == 0)
        else {
            return Err(error(
                ErrorCode::TooManyHolds,
                format!(
                    "this client already holds {BROKER_HOLDS} locks granted by the broker: release some first"
                ),
            ));
        };
        free_hold.store(
            (s + 1) | if shared { HOLD_SHARED } else { 0 },
            Ordering::Relaxed,
        );
        let slot = table.slot(s).expect("s < slot_count");
        let w = Word(slot.word.load(Ordering::Acquire));
        let mut counter = w.counter();
        let mut base = slot.token_base.load(Ordering::Relaxed);
        if counter as u64 >= shm_layout::lockword::COUNTER_MASK {
            base = base.saturating_add(counter as u64);
            counter = 0;
        }
        counter += 1;
        let owner_died = w.owner_died();
        let st = &mut self.slots[s as usize];
        // Never below a token this slot issued before, whatever the
        // client-writable base says; rebase so base + counter = token.
        let token = base
            .saturating_add(counter as u64)
            .max(st.issued.saturating_add(1));
        st.issued = token;
        slot.token_base
            .store(token - counter as u64, Ordering::Relaxed);
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
        let word = Word::new(w.generation(), 0, 0, counter);
        slot.word.store(word.0, Ordering::Release);
        slot.held_since_ms.store(self.now_ms, Ordering::Relaxed);
        self.mirror(table, s);
        Ok((token, owner_died))
    }

    /// Grant the head of `s`'s queue (all leading shared waiters at once) if
    /// the slot is free for them; otherwise, with an empty queue and no holder,
    /// give the slot back to the fast path.
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
            let answer = match self.grant(table, s, head.client, head.shared) {
                Ok((token, owner_died)) => {
                    // Mirrored in the cell for observers only.
                    cell.token.store(token, Ordering::Relaxed);
                    let flags = if owner_died { GRANT_OWNER_DIED } else { 0 };
                    cell.flags.store(flags, Ordering::Relaxed);
                    self.handed.insert(head.conn, (s, token, owner_died));
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
            if !head.shared {
                break;
            }
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
        let prepared = Word::new(
            w.generation(),
            PREPARED | (w.0 & OWNER_DIED),
            0,
            w.counter(),
        );
        // SYNC POINT: Release publishes the slot's state to the next fast-path
        // acquirer (its CAS is Acquire).
        slot.word.store(prepared.0, Ordering::Release);
        slot.waiters.store(0, Ordering::Relaxed);
        st.managed = false;
        st.last_counter = w.counter();
    }

    /// Write the managed slot's private holder and queue length into the word
    /// and slot for observers (and for a restarted broker).
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
        let flags = (w.0 & OWNER_DIED) | if exclusive { EXCLUSIVE } else { 0 };
        let word = Word::new(w.generation(), flags, holders, w.counter());
        slot.word.store(word.0, Ordering::Release);
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

/// The token a slot's word stands for: `token_base + counter`, saturating
/// (both are client-writable, so any value may be there).
fn word_token(slot: &shm_layout::table::Slot, w: Word) -> u64 {
    slot.token_base
        .load(Ordering::Relaxed)
        .saturating_add(w.counter() as u64)
}

fn clear_hold(table: &TableView, client: u32, slot: u32) {
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
