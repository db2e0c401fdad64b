//! The grant engine: acquire (idempotent per request id), release, cancel,
//! the take-over of a prepared slot, grants and hand-offs to the queue, the
//! return of an idle slot to the fast path, and the word mirror that shows
//! observers the private holder. One admit rule decides every grant
//! ([`Holder::admits`]): a slow-path acquire, a hand-off to a queue's head,
//! a hold adopted from the ledger, and the explorer's starvation check.
//!
//! A grant is recorded in the ledger before the lock word says it: a broker
//! killed in between adopts the hold from the ledger and rewrites the word.

use super::{ConnId, LockManager, Waker, word_of};
use crate::config::Policy;
use crate::ledger::{FAST_REQUEST, Hold};
use shm_layout::events::{EventsView, Outcome};
use shm_layout::lockword::{self, OWNER_DIED, RESERVED_MASK, Word};
use shm_layout::sync::shm::Ordering;
use shm_layout::table::{BROKER_HOLDS, CELL_GRANTED, GRANT_OWNER_DIED, HOLD_SHARED, TableView};
use shm_layout::validate_key;
use shm_layout::wire::{ErrorCode, Response};

/// How many times a take-over retries its CAS on a word that clients keep
/// changing (releases, grants, waiters' bits) before it freezes the word
/// with one `fetch_and` whatever it says.
const TAKE_OVER_ATTEMPTS: u32 = 64;

/// Who holds a managed slot. Prepared slots keep their holder in the word.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Holder {
    Free,
    Exclusive {
        client: u32,
        token: u64,
        via_broker: bool,
    },
    Shared(Vec<(u32, u64)>),
}

impl Holder {
    /// The admit rule: whether a new holder (`shared` or exclusive) may join
    /// the holders there are. Every grant path asks this (a queue must also
    /// be empty, or the newcomer be its head).
    pub(super) fn admits(&self, shared: bool) -> bool {
        match self {
            Holder::Free => true,
            Holder::Shared(_) => shared,
            Holder::Exclusive { .. } => false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Waiter {
    pub(super) client: u32,
    pub(super) conn: ConnId,
    pub(super) cell: u32,
    pub(super) shared: bool,
    /// The client's id for this acquire: a re-sent request (same id, new
    /// connection) takes this waiter over instead of queueing twice.
    pub(super) request: u64,
}

impl LockManager {
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
        // Its fast-path grants it released by CAS leave the records first:
        // they must not answer a re-sent request nor count in the quota.
        self.settle_fast_grants_of(table, client);
        if self.waiting.contains_key(&conn) {
            return error(
                ErrorCode::BadRequest,
                "this connection already has a queued acquire".into(),
            );
        }
        if let Some(&s) = self.dir.keys.get(key) {
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
            let st = &mut self.dir.slots[s as usize];
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
        let s = match self.dir.keys.get(key) {
            Some(&s) => s,
            None => match self.dir.allocate(table, &mut self.ledger, self.now_ms, key) {
                Some(s) => s,
                None => {
                    stats.table_full.fetch_add(1, Ordering::Relaxed);
                    return error(
                        ErrorCode::TableFull,
                        format!(
                            "all {} lock slots hold keys that are held or waited for: raise \
                             table.slots in the broker's configuration, or release locks",
                            self.dir.slots.len()
                        ),
                    );
                }
            },
        };
        let hash = self.dir.slots[s as usize].hash;
        self.dir.remember(hash, key);
        if !queue && !self.dir.slots[s as usize].managed {
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
        let st = &self.dir.slots[s as usize];
        let grantable =
            st.queue.is_empty() && st.holder.admits(shared) && self.node_admits(key, shared);
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
            let granted = match self.grant_fast(table, s, client, shared, request) {
                Some(fast) => fast,
                None => self.grant(table, s, client, shared, request),
            };
            return match granted {
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
            // A try-lock on a global key this host does not hold: fetch the
            // node grant, so that a later try may succeed.
            if let Some(n) = self.nodes.as_mut()
                && n.is_global(key)
                && !n.admits(key, shared, self.now_ms)
            {
                n.prefetch(key);
            }
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
        let st = &mut self.dir.slots[s as usize];
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
        self.settle(key);
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
            self.dir
                .slots
                .iter()
                .position(|st| {
                    st.queue
                        .iter()
                        .any(|w| w.client == client && w.request == request)
                })
                .map(|s| s as u32)
        });
        if let Some(slot) = queued {
            let st = &mut self.dir.slots[slot as usize];
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
        let Some(st) = self.dir.slots.get_mut(slot as usize) else {
            return error(ErrorCode::NotHolder, format!("slot {slot} does not exist"));
        };
        let Some(tslot) = table.slot(slot) else {
            return error(ErrorCode::NotHolder, format!("slot {slot} does not exist"));
        };
        if !st.managed {
            // A fast-path hold released through us: its CAS failed for a
            // transient reason (or a confused client), or it took the
            // counter's last value (lockword::needs_broker_release).
            let base = st.base;
            let global = self.nodes.as_ref().is_some_and(|n| {
                self.dir.slots[slot as usize]
                    .key
                    .as_deref()
                    .is_some_and(|k| n.is_global(k))
            });
            let ours = |w: Word| {
                w.is_prepared()
                    && w.exclusive_owner() == Some(client)
                    && base.saturating_add(w.counter() as u64) == token
            };
            let w = Word(tslot.word.load(Ordering::Acquire));
            if ours(w) && lockword::needs_broker_release(w) && !global {
                // Take it over (the holder is recorded, the word frozen with
                // the holder in it, so contenders keep waiting on the slot)
                // and release it as a managed hold below: the slot returns
                // to the fast path rebased (return_to_fast_path) and its
                // sleepers are woken. A global key's base belongs to its
                // node grant: freed as exhausted, its next acquirer asks us.
                if self.take_over(table, slot).is_err() {
                    // The holder's ledger entry is full: free the word as
                    // exhausted; the next acquirer asks us and grant_fast
                    // rebases.
                    return self.release_fast_hold_by_cas(table, slot, ours, waker);
                }
            } else {
                return self.release_fast_hold_by_cas(table, slot, ours, waker);
            }
        }
        let st = &mut self.dir.slots[slot as usize];
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
        self.dir.slots[slot as usize].last_use_ms = now_ms;
        self.mirror(table, slot);
        self.dispatch(table, slot, waker);
        if let Some(n) = self.nodes.as_mut()
            && n.take_lost(client, slot, token)
        {
            return lost(token, "the release is done");
        }
        Response::Released
    }

    /// Does `client` still hold `slot` with `token`? [`Response::Holding`]
    /// if so; the `Lost` error if this host lost the global key's node grant
    /// under the hold (which stays in place until released); `NotHolder`
    /// otherwise. Changes nothing: the question of the client's
    /// `LockGuard::check`, for a holder that wants to know before it writes.
    pub fn check_hold(&self, table: &TableView, client: u32, slot: u32, token: u64) -> Response {
        if self
            .nodes
            .as_ref()
            .is_some_and(|n| n.is_lost(client, slot, token))
        {
            return lost(token, "release it");
        }
        let (Some(st), Some(tslot)) = (self.dir.slots.get(slot as usize), table.slot(slot)) else {
            return error(ErrorCode::NotHolder, format!("slot {slot} does not exist"));
        };
        let holds = if st.managed {
            match &st.holder {
                Holder::Exclusive {
                    client: c,
                    token: t,
                    ..
                } => *c == client && *t == token,
                Holder::Shared(v) => v.contains(&(client, token)),
                _ => false,
            }
        } else {
            // A fast-path hold: the word names its owner, and its counter
            // the grant (the client's own test of a broker's fast grant).
            let w = Word(tslot.word.load(Ordering::Acquire));
            lockword::granted_on_fast_path(w, client, st.base, token).is_some()
        };
        if holds {
            Response::Holding
        } else {
            error(
                ErrorCode::NotHolder,
                format!("slot {slot}: this client does not hold it with that token"),
            )
        }
    }

    /// Release the fast-path hold `ours` recognises on prepared slot `s` by
    /// CAS, as its holder would have; retried while only the waiters' bits
    /// change under us (a contender that parks between our load and our CAS
    /// must not turn the holder's release into "not the holder").
    fn release_fast_hold_by_cas(
        &mut self,
        table: &TableView,
        s: u32,
        ours: impl Fn(Word) -> bool,
        waker: &mut dyn Waker,
    ) -> Response {
        let tslot = table.slot(s).expect("s < slot_count");
        let mut w = Word(tslot.word.load(Ordering::Acquire));
        for _ in 0..lockword::RELEASE_ATTEMPTS {
            if !ours(w) {
                break;
            }
            // SYNC POINT: AcqRel: Release pairs with the next fast
            // acquirer's Acquire CAS; Acquire with the contenders' CASes
            // that added their bits. Failure Acquire: read again.
            match tslot.word.compare_exchange(
                w.0,
                lockword::released(w).0,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    wake_contended(tslot, w, waker);
                    self.settle_fast_grant(table, s);
                    return Response::Released;
                }
                Err(now) => w = Word(now),
            }
        }
        not_holder(s)
    }

    /// A connection closed. Its queued acquire (if any) leaves the queue;
    /// nothing else changes: a connection is transport, and only the
    /// client's death (its pidfd) or its `Bye` releases what it holds. A
    /// grant answered on this connection that never reached the client is
    /// delivered again when the client re-sends the same request.
    pub fn conn_closed(&mut self, table: &TableView, conn: ConnId, waker: &mut dyn Waker) {
        if let Some(slot) = self.waiting.remove(&conn) {
            self.dir.slots[slot as usize]
                .queue
                .retain(|w| w.conn != conn);
            self.mirror(table, slot);
            self.dispatch(table, slot, waker);
        }
    }

    /// Whether a queued acquire waits for a local holder's release (the
    /// event loop stays awake for it). On a single-host broker that is any
    /// queued acquire (a queue waits only behind a holder). A waiter for a
    /// node grant from etcd does not count: spinning then takes the CPU
    /// the cluster agent and etcd need (measured: the agent's first-grant
    /// transaction took 1.37 ms beside a spinning broker, 0.75 ms without).
    pub fn awaits_local_release(&self) -> bool {
        if self.nodes.is_none() {
            return !self.waiting.is_empty();
        }
        self.waiting
            .values()
            .any(|&s| self.dir.slots[s as usize].holder != Holder::Free)
    }

    /// Who waits for `key`, head of the queue first: each waiter's pid (its
    /// client record's) and whether it asked for a shared lock. Empty if the
    /// key has no slot or nobody waits. Read-only (observers:
    /// `Request::Waiters`).
    pub fn waiters(&self, key: &[u8]) -> Vec<(u32, bool)> {
        let Some(&s) = self.dir.keys.get(key) else {
            return Vec::new();
        };
        self.dir.slots[s as usize]
            .queue
            .iter()
            .map(|w| {
                let pid = self
                    .registry
                    .clients
                    .get(w.client as usize)
                    .map_or(0, |c| c.pid);
                (pid, w.shared)
            })
            .collect()
    }

    /// Make a prepared slot managed (clear PREPARED), learning its fast-path
    /// holder from the word and recording it in the ledger, so that a
    /// restarted broker knows it too. A managed slot is left as it is.
    /// Refused when the holder's ledger entry is full (it holds
    /// [`crate::ledger::LEDGER_HOLDS`] locks): the slot then stays prepared.
    ///
    /// Write order: the holder the word shows is recorded (flagged
    /// `on_fast_path`: true only while the word names it) *before* the CAS
    /// that freezes the word, and confirmed after it. A broker killed in
    /// between leaves a record that adoption checks against the word, so no
    /// instant exists in which a fast-path holder is in neither the ledger
    /// nor a prepared word (before this order, a SIGKILL between the freeze
    /// and the record forgot the holder: two holders after the restart).
    pub(super) fn take_over(&mut self, table: &TableView, s: u32) -> Result<(), Response> {
        if self.dir.slots[s as usize].managed {
            return Ok(());
        }
        let slot = table.slot(s).expect("s < slot_count");
        let base = self.dir.slots[s as usize].base;
        let mut w = Word(slot.word.load(Ordering::Acquire));
        let mut frozen = false;
        for _ in 0..TAKE_OVER_ATTEMPTS {
            let shows = w
                .exclusive_owner()
                .filter(|&o| w.0 & RESERVED_MASK == 0 && self.registry.is_active(o))
                .map(|o| (o, base.saturating_add(w.counter() as u64)));
            self.record_fast_hold(s, shows)?;
            // SYNC POINT: AcqRel: Acquire pairs with the Release of a
            // fast-path release or grant (so we see the holder's final
            // state); after this, clients' CASes (which require PREPARED)
            // fail. The contended path's bits go with PREPARED (see
            // lockword::take_over): its sleepers time out within their
            // bound, find the word managed, and ask us. Failure Acquire: the
            // word is read again for the next attempt.
            match slot.word.compare_exchange(
                w.0,
                lockword::take_over(w).0,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    frozen = true;
                    break;
                }
                Err(now) => w = Word(now),
            }
        }
        if !frozen {
            // Only a scribbler racing with us changes a word this often:
            // freeze whatever it is now (that key is broken anyway).
            w = Word(
                slot.word
                    .fetch_and(lockword::take_over(Word(u64::MAX)).0, Ordering::AcqRel),
            );
        }
        let st = &mut self.dir.slots[s as usize];
        st.managed = true;
        st.sleepers_may_wait = true;
        st.holder = Holder::Free;
        let token = st.base.saturating_add(w.counter() as u64);
        let recorded = st.fast_grant.take();
        if let Some((client, t)) = recorded {
            if w.exclusive_owner() == Some(client) && t == token {
                // The record names the frozen word's holder: an ordinary
                // hold from now on.
                self.ledger.confirm_hold(client, s, t);
                st.holder = Holder::Exclusive {
                    client,
                    token,
                    via_broker: false,
                };
            } else {
                self.ledger.remove_hold(client, s, Some(t));
            }
        }
        if st.holder != Holder::Free {
            // Recorded and confirmed above.
        } else if w.is_handoff() {
            // Handed off, not yet claimed: free for us (its counted token is
            // skipped); the claimer's CAS now fails and it asks us.
        } else if w.0 & RESERVED_MASK != 0
            || w.0 & lockword::HANDOFF != 0
            || (!w.is_free() && w.exclusive_owner().is_none())
        {
            table.header().stats.repairs.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(slot = s, word = ?w, "lock word in a shape forelock never writes: repaired to free (someone scribbled on the table)");
        } else if let Some(owner) = w.exclusive_owner() {
            // Not recorded before the freeze: the owner is not registered
            // (gone, or the word was scribbled), or a scribbler raced with
            // every attempt. Recorded now if it is a live client with room,
            // else released as owner-died.
            let recorded = self.registry.is_active(owner)
                && self.ledger.add_hold(
                    owner,
                    Hold {
                        slot: s,
                        shared: false,
                        token,
                        request: FAST_REQUEST,
                        owner_died: false,
                        on_fast_path: false,
                    },
                );
            if recorded {
                st.holder = Holder::Exclusive {
                    client: owner,
                    token,
                    via_broker: false,
                };
            } else {
                slot.word.fetch_or(OWNER_DIED, Ordering::AcqRel);
                table
                    .header()
                    .stats
                    .owner_deaths
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        let st = &mut self.dir.slots[s as usize];
        st.issued = st.issued.max(token);
        if let (Some(n), Some(k)) = (self.nodes.as_mut(), st.key.as_deref())
            && n.is_global(k)
        {
            n.observe(k, token, w.counter() != st.last_counter);
        }
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

    /// Make slot `s`'s `on_fast_path` ledger record say `shows` (the
    /// `(client, token)` its prepared word names, or nobody): the record a
    /// take-over writes before it freezes the word. A record that already
    /// says so is kept (with its request id: a re-sent acquire of a fast
    /// grant is still answered from it). Refused when the holder's ledger
    /// entry is full.
    fn record_fast_hold(&mut self, s: u32, shows: Option<(u32, u64)>) -> Result<(), Response> {
        let st = &mut self.dir.slots[s as usize];
        if st.fast_grant == shows {
            return Ok(());
        }
        if let Some((client, token)) = st.fast_grant.take() {
            self.ledger.remove_hold(client, s, Some(token));
        }
        let Some((owner, token)) = shows else {
            return Ok(());
        };
        let hold = Hold {
            slot: s,
            shared: false,
            token,
            request: FAST_REQUEST,
            owner_died: false,
            on_fast_path: true,
        };
        if !self.ledger.add_hold(owner, hold) {
            return Err(error(
                ErrorCode::TooManyHolds,
                format!(
                    "the holder of this key holds {} locks, the most the broker can record: \
                     try again later",
                    crate::ledger::LEDGER_HOLDS
                ),
            ));
        }
        st.fast_grant = Some((owner, token));
        Ok(())
    }

    /// Slot `s`'s `on_fast_path` record, checked against the word: erased
    /// (with the slot's `fast_grant`) once the word no longer names it, i.e.
    /// its holder released by CAS. A managed slot has no such record.
    pub(super) fn settle_fast_grant(&mut self, table: &TableView, s: u32) {
        let st = &mut self.dir.slots[s as usize];
        let Some((client, token)) = st.fast_grant else {
            return;
        };
        let w = word_of(table, s);
        if lockword::granted_on_fast_path(w, client, st.base, token).is_none() {
            self.ledger.remove_hold(client, s, Some(token));
            st.fast_grant = None;
        }
    }

    /// Settle every `on_fast_path` record of `client` (before its records
    /// are read: the quota, a re-sent request).
    fn settle_fast_grants_of(&mut self, table: &TableView, client: u32) {
        let slots: Vec<u32> = self
            .ledger
            .holds(client)
            .filter(|(_, h)| h.on_fast_path)
            .map(|(_, h)| h.slot)
            .collect();
        for s in slots {
            if (s as usize) < self.dir.slots.len() {
                self.settle_fast_grant(table, s);
            }
        }
    }

    /// Refuse a grant to `client` when it holds [`BROKER_HOLDS`] locks from
    /// the broker already, or its ledger entry is full.
    fn check_quota(&self, client: u32) -> Result<(), Response> {
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
        Ok(())
    }

    /// One round trip for an unprepared key (issue 12): grant managed, free,
    /// exclusive slot `s` to `client` as a fast-path hold
    /// ([`lockword::prepare_held_for`]), so that its release is one CAS in
    /// the client and no message. `None` when the slot does not qualify (a
    /// shared request, a global key, no fast path at all, a word that is not
    /// managed-free, a counter that must be rebased): the caller grants the
    /// managed way.
    ///
    /// Write order: the ledger record (flagged `on_fast_path`, with the
    /// request id) before the word, the word before the answer. A broker
    /// killed before the word store leaves a record the word does not name
    /// (adoption drops it; the client re-sends and is granted afresh); after
    /// it, a record the word names (adoption takes the hold over, and the
    /// re-sent request is answered from it). The holder's CAS release needs
    /// no broker at all, alive or restarted: the word is then free, and
    /// whoever reads the record next erases it ([`Self::settle_fast_grant`]).
    fn grant_fast(
        &mut self,
        table: &TableView,
        s: u32,
        client: u32,
        shared: bool,
        request: u64,
    ) -> Option<Result<(u64, bool), Response>> {
        let st = &self.dir.slots[s as usize];
        let key = st.key.as_deref()?;
        if shared
            || self.policy == Policy::None
            || !st.managed
            || st.holder != Holder::Free
            || !st.queue.is_empty()
            || self.nodes.as_ref().is_some_and(|n| n.is_global(key))
        {
            return None;
        }
        let slot = table.slot(s).expect("s < slot_count");
        let w = Word(slot.word.load(Ordering::Acquire));
        // The token: above every token this slot issued, whatever the
        // client-writable counter says. When the counter cannot hold it
        // (exhausted by fast-path grants, or behind what we issued), the
        // slot is rebased here, so that a hot key's counter running out
        // does not leave it managed (and its contenders queued in the
        // broker) for as long as the contention lasts.
        let token = st
            .base
            .saturating_add(w.counter() as u64 + 1)
            .max(st.issued.saturating_add(1));
        let (base, counter) = match token - st.base {
            c if c <= lockword::COUNTER_MASK && token == st.base + w.counter() as u64 + 1 => {
                (st.base, w.counter())
            }
            _ => (token - 1, 0),
        };
        let from = lockword::managed(w, false, 0, counter);
        let grant = lockword::prepare_held_for(from, client).ok()?;
        if let Err(refusal) = self.check_quota(client) {
            return Some(Err(refusal));
        }
        if base != st.base {
            // Rebased: the ledger first (a restart trusts it), then the
            // table's copy below, before the word publishes it.
            self.ledger.set_base(s, base);
        }
        self.ledger.add_hold(
            client,
            Hold {
                slot: s,
                shared: false,
                token,
                request,
                owner_died: grant.owner_died,
                on_fast_path: true,
            },
        );
        let now_ms = self.now_ms;
        let st = &mut self.dir.slots[s as usize];
        st.base = base;
        st.fast_grant = Some((client, token));
        st.issued = token;
        st.last_counter = grant.held.counter();
        st.last_use_ms = now_ms;
        st.uses = st.uses.saturating_add(1);
        st.speculative = false;
        st.managed = false;
        // The table's base is a copy for clients: rewrite it from ours.
        slot.token_base.store(st.base, Ordering::Relaxed);
        slot.held_since_ms.store(now_ms, Ordering::Relaxed);
        slot.waiters.store(0, Ordering::Relaxed);
        // SYNC POINT: Release pairs with the holder's Acquire load of the
        // word after our answer (lockword::granted_on_fast_path) and with
        // fast acquirers' CAS: both then see the token base stored above.
        slot.word.store(grant.held.0, Ordering::Release);
        Some(Ok((token, grant.owner_died)))
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
        self.check_quota(client)?;
        let slot = table.slot(s).expect("s < slot_count");
        let w = Word(slot.word.load(Ordering::Acquire));
        let owner_died = w.owner_died();
        let global_token = match (&mut self.nodes, &self.dir.slots[s as usize].key) {
            (Some(n), Some(k)) if n.is_global(k) => Some(n.token(k)),
            _ => None,
        };
        let st = &mut self.dir.slots[s as usize];
        if let Some(token) = global_token {
            // A global key's token comes from its node grant (`nodes`):
            // base = the etcd revision << 24, counter = the low bits.
            let base = token & !lockword::COUNTER_MASK;
            if st.base != base {
                st.base = base;
                self.ledger.set_base(s, base);
                slot.token_base.store(base, Ordering::Relaxed);
            }
        }
        // The token: above every token this slot issued, whatever the
        // client-writable counter says; rebase when the counter would run out.
        let mut token = global_token.unwrap_or_else(|| {
            st.base
                .saturating_add(w.counter() as u64 + 1)
                .max(st.issued.saturating_add(1))
        });
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
                on_fast_path: false,
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
    pub(super) fn dispatch(&mut self, table: &TableView, s: u32, waker: &mut dyn Waker) {
        loop {
            let st = &self.dir.slots[s as usize];
            let Some(&head) = st.queue.front() else { break };
            if !st.holder.admits(head.shared) || !self.slot_admits(s, head.shared) {
                break;
            }
            self.dir.slots[s as usize].queue.pop_front();
            self.waiting.remove(&head.conn);
            let Some(rec) = table.client(head.client) else {
                continue;
            };
            let Some(cell) = rec.cells.get(head.cell as usize) else {
                continue;
            };
            // The last waiter gets a fast-path hold where one may be had
            // (grant_fast: local, exclusive, queue now empty): the slot is
            // back on the fast path at once, not when that waiter's release
            // reaches us. A hot key then spends one queue's worth of grants
            // at broker speed, where it stayed there while contenders kept
            // joining the queue faster than it drained.
            let granted = match self.grant_fast(table, s, head.client, head.shared, head.request) {
                Some(fast) => fast,
                None => self.grant(table, s, head.client, head.shared, head.request),
            };
            let answer = match granted {
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
        let st = &self.dir.slots[s as usize];
        if st.queue.is_empty() && st.holder == Holder::Free {
            self.return_to_fast_path(table, s);
            let st = &mut self.dir.slots[s as usize];
            if !st.managed && std::mem::take(&mut st.sleepers_may_wait) {
                // Contended clients that found the slot taken over wait on
                // `park` for it to come back: it has.
                let slot = table.slot(s).expect("s < slot_count");
                wake_contended(slot, Word(lockword::PARKED), waker);
            }
        }
        // Only a clustered broker has node grants to settle: no key copy
        // on every hand-off of a single-host broker.
        if self.nodes.is_some()
            && let Some(k) = self.dir.slots[s as usize].key.clone()
        {
            self.settle(&k);
        }
    }

    /// The node gate's half of the admit rule: a local key always passes; a
    /// global key passes only under this host's node grant (`nodes`).
    fn node_admits(&self, key: &[u8], shared: bool) -> bool {
        match &self.nodes {
            Some(n) if n.is_global(key) => n.admits(key, shared, self.now_ms),
            _ => true,
        }
    }

    pub(super) fn slot_admits(&self, s: u32, shared: bool) -> bool {
        match &self.dir.slots[s as usize].key {
            Some(k) => self.node_admits(k, shared),
            None => true,
        }
    }

    /// A managed, unheld slot with no queue becomes prepared again (if the
    /// policy prepares at all).
    pub(super) fn return_to_fast_path(&mut self, table: &TableView, s: u32) {
        let st = &mut self.dir.slots[s as usize];
        if self.policy == Policy::None
            || !st.managed
            || st.holder != Holder::Free
            || !st.queue.is_empty()
            || st.key.is_none()
        {
            return;
        }
        let slot = table.slot(s).expect("s < slot_count");
        let mut w = Word(slot.word.load(Ordering::Acquire));
        let mut until = 0;
        if let (Some(n), Some(k)) = (&self.nodes, &st.key)
            && n.is_global(k)
        {
            // A global key is prepared only while its node grant fits the
            // fast path, with the lease's safe time in the slot, and its
            // counter continuing the node grant's: base + counter = the
            // last token issued under it.
            let Some((base, issued, safe_until)) = n.fast_until(k, self.now_ms) else {
                return;
            };
            if st.base != base {
                st.base = base;
                self.ledger.set_base(s, base);
            }
            w = lockword::managed(w, false, 0, (issued - base) as u32);
            st.issued = st.issued.max(issued);
            until = safe_until;
        } else if w.counter() as u64 > lockword::COUNTER_MASK / 2 {
            // A local key's counter past half its range is rebased while
            // we hold the slot anyway (clients cannot grant from a managed
            // word), so that a hot key seldom runs it out on the fast path:
            // base + counter = the last token, counter 0. The ledger first
            // (a restart trusts it), the table's copy below.
            let base = st.base.saturating_add(w.counter() as u64).max(st.issued);
            self.ledger.set_base(s, base);
            st.base = base;
            w = lockword::managed(w, false, 0, 0);
        }
        // The table's base is a copy for clients: rewrite it from ours.
        slot.token_base.store(st.base, Ordering::Relaxed);
        slot.grant_until_ns.store(until, Ordering::Relaxed);
        // SYNC POINT: Release publishes the slot's state to the next fast-path
        // acquirer (its CAS is Acquire).
        slot.word.store(lockword::prepare(w).0, Ordering::Release);
        slot.waiters.store(0, Ordering::Relaxed);
        st.managed = false;
        st.last_counter = w.counter();
    }

    /// Write the managed slot's private holder and queue length into the word
    /// and slot for observers.
    pub(super) fn mirror(&self, table: &TableView, s: u32) {
        let st = &self.dir.slots[s as usize];
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
}

/// After the broker freed a prepared word on a client's behalf (`was` is the
/// word it replaced): wake the contended path's sleepers, if the word said
/// some may sleep, so they retry now rather than at their bound. Every
/// sleeper, not one: the broker does not know which of them may take it.
pub(super) fn wake_contended(slot: &shm_layout::table::Slot, was: Word, waker: &mut dyn Waker) {
    if was.0 & (lockword::PARKED | lockword::HUNGRY) == 0 {
        return;
    }
    // SYNC POINT: Release pairs with the sleepers' Acquire read of the
    // sequence (lockword::lock_contended): a sleeper that reads the bump
    // sees the freed word.
    slot.park.fetch_add(1, Ordering::Release);
    slot.hungry.fetch_add(1, Ordering::Release);
    waker.wake(&slot.park);
    waker.wake(&slot.hungry);
}

/// Mirror a broker hold into the client's table record, for observers
/// (`forelock locks` shows shared holders from it). Best effort: the ledger
/// is the record that counts.
pub(super) fn mirror_hold(table: &TableView, client: u32, slot: u32, shared: bool) {
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

/// The `Lost` error of a global key's hold with `token`; `then` says what
/// the holder does next.
fn lost(token: u64, then: &str) -> Response {
    error(
        ErrorCode::Lost,
        format!(
            "the hold with token {token} was lost: this host's etcd lease could not be confirmed \
             in time, so another host may have held the key since ({then}; see docs/cluster.md)"
        ),
    )
}

fn not_holder(slot: u32) -> Response {
    error(
        ErrorCode::NotHolder,
        format!(
            "release of slot {slot}: this client does not hold it with that token (double release?)"
        ),
    )
}
