//! Restart adoption: a new broker rebuilds the manager from the ledger (the
//! broker's truth: keys, token bases, floor, client records, holds including
//! taken-over fast-path holds) and the table (only for the lock words of
//! prepared slots, the one state clients write). The table is rewritten from
//! the ledger; a client that scribbled any of it loses the scribble. Clients
//! whose process died meanwhile are released at once.

use super::directory::Directory;
use super::engine::{Holder, mirror_hold};
use super::registry::{ClientState, Limits, Registry};
use super::{LockManager, Waker};
use crate::config::Policy;
use crate::ledger::{FAST_REQUEST, Hold, Ledger};
use shm_layout::lockword::{self, Word};
use shm_layout::sync::shm::Ordering;
use shm_layout::table::{CELL_ABANDONED, CELL_WAITING, CLIENT_ACTIVE, CLIENT_FREE, TableView};
use shm_layout::{key_hash, validate_key};
use std::collections::{HashMap, HashSet};

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
            epoch,
            ledger,
            dir: Directory::new(g.slot_count, g.index_len),
            registry: Registry::new(g.client_count, limits),
            waiting: HashMap::new(),
            predicted: HashSet::new(),
            now_ms,
            nodes: None,
        };
        m.ledger.set_epoch(epoch);
        for p in 0..g.index_len {
            if let Some(e) = table.index_entry(p) {
                e.0.store(0, Ordering::Relaxed);
            }
        }
        // Each slot's (base, word) as the old broker left them, before a
        // managed word is rebased: what an `on_fast_path` record is checked
        // against.
        let mut left = vec![(0u64, Word(0)); g.slot_count as usize];
        // Slots: the ledger's keys, written back over whatever the table says.
        for s in (0..g.slot_count).rev() {
            let slot = table.slot(s).expect("s < slot_count");
            let word = Word(slot.word.load(Ordering::Acquire));
            let keyed = m
                .ledger
                .slot(s)
                .filter(|(key, _)| validate_key(key).is_ok() && !m.dir.keys.contains_key(&key[..]));
            let Some((key, base)) = keyed else {
                m.ledger.clear_slot(s);
                slot.key_len.store(0, Ordering::Relaxed);
                slot.word.store(lockword::rekey(word).0, Ordering::Release);
                m.dir.free.push(s);
                continue;
            };
            left[s as usize] = (base, word);
            let hash = key_hash(&key);
            slot.store_key(&key, hash, 0);
            // A managed word (clients never write one) is rebased with a zero
            // counter, at the floor or above its last token: its counter may
            // be that of a re-key the old broker made just before it died
            // (free_slot resets the counter after raising the floor above the
            // slot's tokens and before erasing the slot from the ledger).
            // Holds adopted below keep the tokens they were granted with.
            let (base, word) = if word.is_prepared() {
                (base, word)
            } else {
                let base = m
                    .ledger
                    .floor()
                    .max(base.saturating_add(word.counter() as u64));
                m.ledger.set_base(s, base);
                let rebased = lockword::managed(word, word.is_exclusive(), word.holders(), 0);
                slot.word.store(rebased.0, Ordering::Release);
                (base, rebased)
            };
            slot.token_base.store(base, Ordering::Relaxed);
            let st = &mut m.dir.slots[s as usize];
            st.hash = hash;
            st.key = Some(key.clone().into_boxed_slice());
            st.base = base;
            st.last_counter = word.counter();
            st.issued = base.saturating_add(word.counter() as u64);
            st.last_use_ms = now_ms;
            st.managed = !word.is_prepared();
            m.dir.set_keyed(s, true);
            m.dir.keys.insert(key.into_boxed_slice(), s);
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
            m.registry.clients[c as usize] = ClientState {
                active: true,
                pid: entry.pid,
                uid: entry.uid,
            };
            let holds: Vec<(usize, Hold)> = m.ledger.holds(c).collect();
            for (_, hold) in holds {
                if hold.on_fast_path {
                    let left = left.get(hold.slot as usize).copied();
                    m.adopt_fast_record(table, c, hold, left.unwrap_or((0, Word(0))));
                } else {
                    m.adopt_hold(table, c, hold);
                }
            }
            if !alive(entry.pid, entry.start_time) {
                dead.push(c);
            }
        }
        for s in 0..g.slot_count {
            if m.dir.slots[s as usize].key.is_some() {
                if m.dir.slots[s as usize].managed {
                    m.mirror(table, s);
                }
                m.dir.index_insert(table, s);
                m.dir.order_insert(s);
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

    /// An `on_fast_path` record (a fast-path hold the old broker granted or
    /// was taking over: see `Hold::on_fast_path`), at adoption, against
    /// `left`, the slot's (base, word) as the old broker left them:
    /// - the word names it and is still prepared: the slot stays as the old
    ///   broker had it, prepared with the record (its holder may still
    ///   release by CAS; whoever reads the record next settles it);
    /// - the word names it and is managed (a take-over froze it and the
    ///   broker died before confirming): an ordinary hold from now on;
    /// - the word does not name it (the holder released by CAS, or the
    ///   broker died before the word said the grant): erased. A grant never
    ///   answered is then asked for again by its client, and granted afresh.
    fn adopt_fast_record(&mut self, table: &TableView, c: u32, hold: Hold, left: (u64, Word)) {
        let (base, word) = left;
        let names = hold.slot < table.geometry().slot_count
            && !hold.shared
            && self.dir.slots[hold.slot as usize].key.is_some()
            && word.0 & lockword::RESERVED_MASK == 0
            && word.exclusive_owner() == Some(c)
            && base.checked_add(word.counter() as u64) == Some(hold.token);
        if !names {
            self.ledger.remove_hold(c, hold.slot, Some(hold.token));
            return;
        }
        let st = &mut self.dir.slots[hold.slot as usize];
        if word.is_prepared() && st.fast_grant.is_none() {
            st.fast_grant = Some((c, hold.token));
            st.issued = st.issued.max(hold.token);
            return;
        }
        self.ledger.confirm_hold(c, hold.slot, hold.token);
        self.adopt_hold(
            table,
            c,
            Hold {
                on_fast_path: false,
                ..hold
            },
        );
    }

    /// One hold from the ledger, at adoption. A hold that contradicts the
    /// others (the ledger only records consistent ones, so this means a
    /// broker bug or a damaged file) is dropped with a warning.
    fn adopt_hold(&mut self, table: &TableView, c: u32, hold: Hold) {
        let Some(st) = self.dir.slots.get_mut(hold.slot as usize) else {
            self.ledger.remove_hold(c, hold.slot, Some(hold.token));
            return;
        };
        let fits = st.key.is_some() && st.holder.admits(hold.shared);
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
        slot.word.fetch_and(
            shm_layout::lockword::take_over(Word(u64::MAX)).0,
            Ordering::AcqRel,
        );
        mirror_hold(table, c, hold.slot, hold.shared);
    }

    /// The broker dies and a new one adopts the same table and ledger (tests
    /// and the explorer: the real restart is a new process).
    #[cfg(any(test, feature = "model"))]
    pub fn readopt(
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
            self.registry.limits,
            self.epoch + 1,
            self.now_ms,
            alive,
            waker,
        );
        debug_assert_eq!(self.dir.slots.len(), g.slot_count as usize);
    }
}
