//! The key directory: which slot holds which key. It owns each slot's private
//! state ([`SlotState`]: key, managed or prepared, holder and queue, token
//! base and the highest token issued, the allocator's bookkeeping), the map
//! from keys to slots, the free list, the private mirror of the table's key
//! index (and the index's insert and backward-shift remove), the keys seen
//! recently (what the allocator may prepare by hash), and the keys whose
//! owner died after their slot was freed. Placing a key and freeing a slot
//! write the ledger before the table: a restarted broker trusts the ledger.
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
//! Who may move a keyed slot between managed and prepared, and who holds it,
//! is the grant engine's decision ([`super::engine`]); this file only places
//! and frees keys.

use super::engine::{Holder, Waiter};
use super::word_of;
use crate::ledger::Ledger;
use shm_layout::key_hash;
use shm_layout::lockword::{self, OWNER_DIED, Word};
use shm_layout::sync::shm::Ordering;
use shm_layout::table::{INDEX_MAX_PROBE, IndexEntry, TableView};
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};

#[derive(Debug, Clone)]
pub(super) struct SlotState {
    pub(super) key: Option<Box<[u8]>>,
    pub(super) hash: u64,
    pub(super) managed: bool,
    pub(super) holder: Holder,
    pub(super) queue: VecDeque<Waiter>,
    /// The word's counter when we last looked: a change means fast-path grants.
    pub(super) last_counter: u32,
    pub(super) last_use_ms: u64,
    /// Prepared ahead of any request by the allocator and not used since.
    pub(super) speculative: bool,
    /// The queue was reserved because contention was predicted
    /// ([`super::LockManager::prepare_contention`]); cleared when the slot is freed.
    pub(super) contention_prepared: bool,
    /// A waiter has queued since that preparation (counted once as a hit).
    pub(super) contention_used: bool,
    /// When the key got its slot, and grants since (fast and broker).
    pub(super) placed_at_ms: u64,
    pub(super) uses: u32,
    /// The highest token this slot has issued as far as the broker knows.
    /// The counter lives in client-writable memory; a broker grant never
    /// goes below this, whatever it says.
    pub(super) issued: u64,
    /// The slot's token base: a grant's token is `base + counter`. The
    /// table's `token_base` is a copy for clients; this one (and the
    /// ledger's) is the truth.
    pub(super) base: u64,
    /// The ledger record `(client, token)` flagged `on_fast_path` for this
    /// slot, if any: a fast-path hold the broker granted
    /// ([`super::LockManager::grant_fast`]) or is taking over. It is true
    /// only while the word names it; `LockManager::settle_fast_grant`
    /// erases it once the holder released by CAS.
    pub(super) fast_grant: Option<(u32, u64)>,
    /// The slot was taken over from the fast path since it was last
    /// prepared: contended clients may sleep on its `park` futex waiting for
    /// it to come back (see `lockword::lock_contended`), so its next
    /// return to the fast path wakes them.
    pub(super) sleepers_may_wait: bool,
    /// Position in the key index, if indexed.
    pub(super) index_pos: Option<u32>,
    /// The (contention kept, last use) under which the slot sits in the
    /// directory's eviction order; `None`: not in it (free, or parked).
    pub(super) ordered_as: Option<(bool, u64)>,
}

impl SlotState {
    pub(super) fn empty() -> SlotState {
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
            fast_grant: None,
            sleepers_may_wait: false,
            index_pos: None,
            ordered_as: None,
        }
    }
}

/// Keys whose holder died and whose slot was freed before anyone was told,
/// remembered so the next holder of the key still hears it (bounded).
const DIED_KEYS_MAX: usize = 1 << 16;

/// The keys and their slots.
#[derive(Debug, Clone)]
pub(super) struct Directory {
    pub(super) keys: HashMap<Box<[u8]>, u32>,
    pub(super) slots: Vec<SlotState>,
    pub(super) free: Vec<u32>,
    /// Private mirror of the key index: `slot + 1` or 0 per position.
    pub(super) index: Vec<u32>,
    /// Keys whose owner-died flag outlived their slot.
    pub(super) died_keys: HashSet<Box<[u8]>>,
    /// Keys seen recently, by hash: what the allocator may prepare.
    pub(super) known: HashMap<u64, Box<[u8]>>,
    /// Keyed slots by (kept for contention, last use, slot): the eviction
    /// order, kept lazily (see [`Directory::victim`]).
    order: BTreeSet<(bool, u64, u32)>,
    /// Slots taken out of `order` because they were held or waited for.
    parked: Vec<u32>,
    /// One bit per slot, set while it holds a key: the tick's pass visits
    /// keyed slots only ([`Directory::next_keyed`]), not the whole table.
    keyed: Vec<u64>,
    /// Where the allocator's sweep over the keyed slots stands (see
    /// `LockManager::tick`).
    pub(super) sweep: Sweep,
    /// How much work the table-sized loops did (tests only: the regression
    /// tests of issue 12 count visits rather than time them).
    #[cfg(test)]
    pub(super) visits: Visits,
}

/// The allocator's sweep over the keyed slots, a bounded number per tick:
/// the slot to start the next tick from, and the counts of the sweep so
/// far (published when it reaches the end of the table).
#[derive(Debug, Clone, Default)]
pub(super) struct Sweep {
    pub(super) cursor: u32,
    pub(super) used: u64,
    pub(super) prepared: u64,
}

/// Entries looked at by `remember`'s forgetting and by `allocate`'s search
/// for a victim (tests only).
#[cfg(test)]
#[derive(Debug, Clone, Default)]
pub(super) struct Visits {
    pub(super) remember: u64,
    pub(super) victim: u64,
    pub(super) tick: u64,
}

impl Directory {
    /// `slot_count` empty slots (none on the free list yet) and an empty
    /// index mirror of `index_len` positions.
    pub(super) fn new(slot_count: u32, index_len: u32) -> Directory {
        Directory {
            keys: HashMap::new(),
            slots: (0..slot_count).map(|_| SlotState::empty()).collect(),
            free: Vec::new(),
            index: vec![0; index_len as usize],
            died_keys: HashSet::new(),
            known: HashMap::new(),
            order: BTreeSet::new(),
            parked: Vec::new(),
            keyed: vec![0; (slot_count as usize).div_ceil(64)],
            sweep: Sweep::default(),
            #[cfg(test)]
            visits: Visits::default(),
        }
    }

    /// Mark slot `s` as holding a key, or not ([`Directory::keyed`]).
    pub(super) fn set_keyed(&mut self, s: u32, keyed: bool) {
        let (word, bit) = (s as usize / 64, 1u64 << (s % 64));
        if keyed {
            self.keyed[word] |= bit;
        } else {
            self.keyed[word] &= !bit;
        }
    }

    /// The first keyed slot at or after `from`, in slot order. A loop of
    /// `next_keyed(s + 1)` costs one visit per keyed slot plus one per 64
    /// slots, and borrows nothing between calls (the caller may change
    /// slot states as it goes, not which slots are keyed).
    pub(super) fn next_keyed(&self, from: u32) -> Option<u32> {
        let mut word = from as usize / 64;
        let mut bits = *self.keyed.get(word)? & (u64::MAX << (from % 64));
        loop {
            if bits != 0 {
                return Some(word as u32 * 64 + bits.trailing_zeros());
            }
            word += 1;
            bits = *self.keyed.get(word)?;
        }
    }

    /// Put slot `s` in the index within [`INDEX_MAX_PROBE`] positions of its
    /// hash's home, in our mirror and in the table.
    pub(super) fn index_insert(&mut self, table: &TableView, s: u32) {
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
    pub(super) fn index_remove(&mut self, table: &TableView, s: u32) {
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

    /// Remember `key` by its hash: the allocator may prepare it (bounded).
    /// When the memory is full it forgets every key without a slot: one map
    /// look-up per remembered key, and at least `3 * slots + 1024` keys are
    /// remembered before the next forgetting, so amortised O(1) per key.
    pub(super) fn remember(&mut self, hash: u64, key: &[u8]) {
        if self.known.len() >= 4 * self.slots.len() + 1024 {
            let keys = &self.keys;
            #[cfg(test)]
            let visits = &mut self.visits.remember;
            self.known.retain(|_, k| {
                #[cfg(test)]
                {
                    *visits += 1;
                }
                keys.contains_key(k)
            });
            if self.known.len() >= 4 * self.slots.len() + 1024 {
                self.known.clear();
            }
        }
        self.known.entry(hash).or_insert_with(|| key.into());
    }

    /// Take a free slot for `key` (evicting the least recently used idle slot
    /// if none is free). The slot is keyed and managed, with no holder.
    pub(super) fn allocate(
        &mut self,
        table: &TableView,
        ledger: &mut Ledger,
        now_ms: u64,
        key: &[u8],
    ) -> Option<u32> {
        let s = match self.free.pop() {
            Some(s) => s,
            None => {
                let victim = self.victim(table)?;
                if !self.free_slot(table, ledger, victim) {
                    return None;
                }
                self.free.pop()?
            }
        };
        self.place_key(table, ledger, now_ms, s, key);
        Some(s)
    }

    /// Whether slot `s` may be evicted now: keyed, nobody queued, no broker
    /// holder, and on the fast path no holder in the word.
    fn idle(&self, table: &TableView, s: u32) -> bool {
        let st = &self.slots[s as usize];
        st.key.is_some()
            && st.queue.is_empty()
            && st.holder == Holder::Free
            && (st.managed || word_of(table, s).is_free())
    }

    /// The idle slot to evict: the least recently used, slots kept for
    /// predicted contention last. Amortised O(log n) (issue 12: it was a scan
    /// of every slot per allocation):
    ///
    /// - `order` holds each keyed slot once, by its (contention kept, last
    ///   use) when it was put there. A slot used since sits too early; met
    ///   at the front it is put back under its current place (one move per
    ///   use, paid by that use).
    /// - A slot met at the front while held or waited for is parked: out of
    ///   the order until it is used again ([`Directory::touch`]) or the next
    ///   tick ([`Directory::unpark`]), so held slots are not looked at on
    ///   every allocation.
    /// - Only when the order is empty are the parked slots looked at (a fast
    ///   holder may have released since the tick): the table is full of held
    ///   keys, the path that ends in `TableFull`.
    fn victim(&mut self, table: &TableView) -> Option<u32> {
        while let Some(&(kept, used, s)) = self.order.first() {
            #[cfg(test)]
            {
                self.visits.victim += 1;
            }
            let st = &self.slots[s as usize];
            let now = (st.contention_prepared, st.last_use_ms);
            if (kept, used) != now || st.ordered_as != Some(now) {
                // Used (or its contention kept or dropped) since: move it.
                self.order.remove(&(kept, used, s));
                self.slots[s as usize].ordered_as = None;
                self.order_insert(s);
                continue;
            }
            if self.idle(table, s) {
                return Some(s);
            }
            self.order.remove(&(kept, used, s));
            self.slots[s as usize].ordered_as = None;
            self.parked.push(s);
        }
        #[cfg(test)]
        {
            self.visits.victim += self.parked.len() as u64;
        }
        self.parked
            .iter()
            .copied()
            .filter(|&s| self.idle(table, s))
            .min_by_key(|&s| {
                let st = &self.slots[s as usize];
                (st.contention_prepared, st.last_use_ms)
            })
    }

    /// Put keyed slot `s` in the eviction order under its current (contention
    /// kept, last use), if it is not there.
    pub(super) fn order_insert(&mut self, s: u32) {
        let st = &mut self.slots[s as usize];
        if st.key.is_none() || st.ordered_as.is_some() {
            return;
        }
        let at = (st.contention_prepared, st.last_use_ms);
        st.ordered_as = Some(at);
        self.order.insert((at.0, at.1, s));
    }

    /// Take slot `s` out of the eviction order (freed, or parked).
    fn order_remove(&mut self, s: u32) {
        if let Some((kept, used)) = self.slots[s as usize].ordered_as.take() {
            self.order.remove(&(kept, used, s));
        }
    }

    /// Slot `s` was used at `now_ms` (a broker grant or release): its place in
    /// the eviction order moves later, lazily, and a parked slot comes back.
    pub(super) fn touch(&mut self, s: u32, now_ms: u64) {
        self.slots[s as usize].last_use_ms = now_ms;
        self.order_insert(s);
    }

    /// Whether slot `s` is kept for predicted contention (evicted last).
    pub(super) fn set_contention_kept(&mut self, s: u32, kept: bool) {
        self.order_remove(s);
        self.slots[s as usize].contention_prepared = kept;
        self.order_insert(s);
    }

    /// Every tick: parked slots go back into the eviction order (a fast
    /// holder's release or a cancelled wait is not seen as a use).
    pub(super) fn unpark(&mut self) {
        for s in std::mem::take(&mut self.parked) {
            self.order_insert(s);
        }
    }

    /// Write `key` into free slot `s`, managed and unheld, and index it. Its
    /// token base is the floor: above every token any key ever had.
    pub(super) fn place_key(
        &mut self,
        table: &TableView,
        ledger: &mut Ledger,
        now_ms: u64,
        s: u32,
        key: &[u8],
    ) {
        let slot = table.slot(s).expect("free slots are in range");
        let header = table.header();
        let old = Word(slot.word.load(Ordering::Acquire));
        let hash = key_hash(key);
        let base = ledger.floor();
        // The ledger first: a restarted broker trusts it, not the table.
        ledger.set_slot(s, key, base);
        slot.store_key(key, hash, 0);
        slot.token_base.store(base, Ordering::Relaxed);
        slot.grant_until_ns.store(0, Ordering::Relaxed);
        slot.waiters.store(0, Ordering::Relaxed);
        let died = self.died_keys.remove(key);
        let mut word = lockword::rekey(old);
        if died {
            word = Word(word.0 | OWNER_DIED);
        }
        // SYNC POINT: Release publishes the key and token base written above;
        // pairs with the Acquire word load in `TableView::lookup`.
        slot.word.store(word.0, Ordering::Release);
        self.order_remove(s);
        let st = &mut self.slots[s as usize];
        *st = SlotState::empty();
        st.key = Some(key.into());
        st.hash = hash;
        st.last_use_ms = now_ms;
        st.placed_at_ms = now_ms;
        st.base = base;
        st.issued = base;
        self.set_keyed(s, true);
        self.keys.insert(key.into(), s);
        self.index_insert(table, s);
        self.order_insert(s);
        header.stats.slots_used.fetch_add(1, Ordering::Relaxed);
    }

    /// Clear slot `s` if its word is still unheld. The floor is raised above
    /// every token the slot issued before its counter is reset, so that a
    /// broker killed in between still never issues a token twice.
    pub(super) fn free_slot(&mut self, table: &TableView, ledger: &mut Ledger, s: u32) -> bool {
        let slot = table.slot(s).expect("s < slot_count");
        let w = Word(slot.word.load(Ordering::Acquire));
        if w.is_prepared() && !w.is_free() {
            return false;
        }
        let st = &self.slots[s as usize];
        let issued = st.issued.max(st.base.saturating_add(w.counter() as u64));
        raise_floor(table, ledger, issued.saturating_add(1));
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
        if let Some((client, token)) = self.slots[s as usize].fast_grant {
            // The word was free: its holder released by CAS long ago.
            ledger.remove_hold(client, s, Some(token));
        }
        ledger.clear_slot(s);
        self.index_remove(table, s);
        self.order_remove(s);
        slot.key_len.store(0, Ordering::Relaxed);
        let st = std::mem::replace(&mut self.slots[s as usize], SlotState::empty());
        self.set_keyed(s, false);
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
}

/// Raise the token floor to `at_least` in the ledger, and publish it in
/// the header for observers (clients never read it for a decision).
fn raise_floor(table: &TableView, ledger: &mut Ledger, at_least: u64) {
    let floor = ledger.raise_floor(at_least);
    table.header().token_floor.store(floor, Ordering::Relaxed);
}
