//! The allocator's hooks ([`crate::allocator`], through
//! [`crate::allocator_glue`]): the tick that notices fast-path grants, what
//! the policy sees of each slot, preparing a key ahead of any request,
//! contention preparation, and eviction.
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

use super::engine::Holder;
use super::{BROKER_CLIENT, LockManager, word_of};
use crate::allocator::SlotView;
use crate::config::Policy;
use shm_layout::events::{EventsView, Outcome};
use shm_layout::scores::Scored;
use shm_layout::sync::shm::Ordering;
use shm_layout::table::TableView;

impl LockManager {
    /// Every tick, the next `limit` keyed slots of a sweep over them (not
    /// the whole table: [`super::directory::Directory::next_keyed`]):
    /// notice fast-path grants (a lock word's counter moved), and describe
    /// each slot for the allocator policy into `out`; `scored(hash)` gives
    /// the forecaster's latest entry for a key. Slot counts are published
    /// when a sweep reaches the end of the table. Reclaiming is the
    /// policy's decision ([`crate::allocator`]), applied through
    /// [`LockManager::evict`].
    ///
    /// A table with at most `limit` keyed slots is swept whole, from slot
    /// 0, every tick. A larger one is swept `limit` slots a tick, going on
    /// where the last tick stopped, so a tick's work is bounded whatever
    /// the table's size (issue 12: 37.6 ms of CPU a tick at 839k keys, every
    /// 10 ms), and each slot is looked at every `keyed / limit` ticks.
    /// Returns how many keyed slots this tick left out of `out`.
    pub fn tick(
        &mut self,
        table: &TableView,
        now_ms: u64,
        scored: impl Fn(u64) -> Option<Scored>,
        out: &mut Vec<SlotView>,
        limit: usize,
    ) -> usize {
        self.now_ms = now_ms;
        out.clear();
        let stats = &table.header().stats;
        let keyed = self.dir.keys.len();
        let whole = keyed <= limit;
        if whole {
            self.dir.sweep = Default::default();
        }
        let mut next = self.dir.next_keyed(self.dir.sweep.cursor);
        let mut wrapped = false;
        while whole || out.len() < limit {
            let Some(s) = next else {
                // The sweep is through the table: publish its counts.
                stats
                    .slots_used
                    .store(self.dir.sweep.used, Ordering::Relaxed);
                stats
                    .slots_prepared
                    .store(self.dir.sweep.prepared, Ordering::Relaxed);
                self.dir.sweep = Default::default();
                if whole || wrapped {
                    break;
                }
                // Fewer than `limit` visits so far and more keyed slots
                // than that: the rest are before the cursor, none twice.
                wrapped = true;
                next = self.dir.next_keyed(0);
                continue;
            };
            next = self.dir.next_keyed(s + 1);
            self.dir.sweep.cursor = s + 1;
            #[cfg(test)]
            {
                self.dir.visits.tick += 1;
            }
            let st = &mut self.dir.slots[s as usize];
            self.dir.sweep.used += 1;
            let w = word_of(table, s);
            if w.counter() != st.last_counter {
                let grants = w.counter().wrapping_sub(st.last_counter) & 0xFF_FFFF;
                if !st.managed {
                    stats.hits.fetch_add(grants as u64, Ordering::Relaxed);
                    // A global key's node grant learns of its fast-path
                    // grants here too: this consumes the counter, and the
                    // take-over at a callback would see no grant (the node
                    // grant then yielded at once, as if unused, and a used
                    // prefetch counted as unused).
                    if let (Some(n), Some(k)) = (self.nodes.as_mut(), st.key.as_deref())
                        && n.is_global(k)
                    {
                        n.observe(k, st.base.saturating_add(w.counter() as u64), true);
                    }
                }
                st.uses = st.uses.saturating_add(grants);
                st.issued = st.issued.max(st.base.saturating_add(w.counter() as u64));
                st.last_counter = w.counter();
                st.last_use_ms = now_ms;
                st.speculative = false;
            }
            if !st.managed {
                self.dir.sweep.prepared += 1;
            }
            let held = !st.queue.is_empty()
                || st.holder != Holder::Free
                || (!st.managed && !w.is_free())
                // Keep the bit until the next holder has been told.
                || w.owner_died();
            let scored = scored(st.hash);
            out.push(SlotView {
                slot: s,
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
        self.dir.unpark();
        keyed.saturating_sub(out.len())
    }

    /// Whether the key with `hash` has a slot.
    pub fn has_key_hash(&self, hash: u64) -> bool {
        self.dir
            .known
            .get(&hash)
            .is_some_and(|k| self.dir.keys.contains_key(k))
    }

    /// Prepare the key with hash `hash` ahead of any request, if the broker
    /// knows its text and has room without evicting. Returns whether a slot was
    /// newly prepared.
    pub fn prepare(&mut self, table: &TableView, events: &EventsView, hash: u64) -> bool {
        if self.policy == Policy::None {
            return false;
        }
        let Some(key) = self.dir.known.get(&hash).cloned() else {
            return false;
        };
        if self.nodes.as_ref().is_some_and(|n| n.is_global(&key)) {
            // A predicted global key: fetch its node grant, never prepare it.
            self.prefetch_global(&key);
            return false;
        }
        if let Some(&s) = self.dir.keys.get(&key) {
            let st = &self.dir.slots[s as usize];
            if st.managed && st.holder == Holder::Free && st.queue.is_empty() {
                self.return_to_fast_path(table, s);
            }
            self.dir.touch(s, self.now_ms);
            return false;
        }
        let Some(s) = self.dir.free.pop() else {
            return false;
        };
        self.dir
            .place_key(table, &mut self.ledger, self.now_ms, s, &key);
        self.dir.slots[s as usize].speculative = true;
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
        let Some(key) = self.dir.known.get(&hash).cloned() else {
            return false;
        };
        let s = match self.dir.keys.get(&key) {
            Some(&s) => s,
            None => {
                if !self.prepare(table, events, hash) {
                    return false;
                }
                *self.dir.keys.get(&key).expect("prepare placed the key")
            }
        };
        self.dir.set_contention_kept(s, true);
        let st = &mut self.dir.slots[s as usize];
        st.queue.reserve(waiters.saturating_sub(st.queue.len()));
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
        let &s = self.dir.keys.get(key)?;
        Some(self.dir.slots[s as usize].queue.capacity())
    }

    /// Whether the key's slot holds a contention preparation (tests and observers).
    pub fn contention_prepared(&self, key: &[u8]) -> bool {
        self.dir
            .keys
            .get(key)
            .is_some_and(|&s| self.dir.slots[s as usize].contention_prepared)
    }

    /// The forecaster no longer predicts contention for the key in slot `s`:
    /// the slot is an ordinary one again (no longer evicted last by the slow
    /// path; a new prediction prepares it again). Its queue keeps its capacity.
    pub fn end_contention_preparation(&mut self, s: u32) {
        if let Some(st) = self.dir.slots.get_mut(s as usize) {
            st.contention_used = false;
            self.dir.set_contention_kept(s, false);
        }
    }

    /// Free a prepared or idle slot now (the allocator's reclaim or eviction).
    /// Refuses a slot that is held or waited for (re-checked here: the policy
    /// decided on a snapshot). A slot prepared ahead and never used counts as
    /// a wasted preparation.
    pub fn evict(&mut self, table: &TableView, events: &EventsView, s: u32) -> bool {
        let Some(st) = self.dir.slots.get(s as usize) else {
            return false;
        };
        if st.key.is_none() || !st.queue.is_empty() || st.holder != Holder::Free {
            return false;
        }
        let (wasted, hash) = (st.speculative, st.hash);
        let global = st
            .key
            .clone()
            .filter(|k| self.nodes.as_ref().is_some_and(|n| n.is_global(k)));
        if !self.dir.free_slot(table, &mut self.ledger, s) {
            return false;
        }
        if let Some(key) = global {
            self.give_back_idle(&key);
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
}
