//! The node gate: a global key (docs/cluster.md) is granted locally only
//! while this host holds its node grant from etcd, under a lease the broker
//! itself still trusts.
//!
//! The engine asks [`Nodes::admits`] beside [`super::engine::Holder::admits`]
//! before every grant of a global key, and takes the token from
//! [`Nodes::token`] (`base + n`, `base` from the node grant's etcd revision).
//! After anything that changes a global key's holders or queue it calls
//! [`LockManager::settle`], which asks the agent for the node grant when
//! local processes wait and releases it when it must go (a callback after
//! the minimum hold, counter exhaustion, a shared grant with an exclusive
//! waiter) and no local holder is left.
//!
//! A global key is prepared (one CAS in the client, no broker) only while
//! its node grant is exclusive, here, not called back, not releasing, with
//! room in its counter, under a lease still safe: [`Nodes::fast_until`]. Its
//! slot then carries the lease's safe time (`Slot::grant_until_ns`), which
//! each client checks after its CAS, so a stopped or slow broker cannot let
//! its clients grant themselves the key past it. Whenever the gate would
//! stop admitting (a callback, a hint, a lost lease, the tick finding the
//! grant no longer fit for the fast path), the engine takes the slot over
//! first ([`LockManager::stop_fast_path`]): its fast-path holder becomes a
//! holder the gate knows, and the tokens clients issued themselves are
//! folded into the node grant's counter ([`Nodes::observe`]). A prepared
//! global slot counts as held for the release of its node grant.
//!
//! When a lease is lost (the agent's `Fenced`, or the broker's own clock
//! passing the lease's safe time), every local hold of a global key under it
//! becomes *lost*: the holder keeps its place in the slot (no one else here
//! is granted the key until it leaves), and its release is answered `Lost`.

use super::{LockManager, Waker};
use forelock_cluster::{Command, Event};
use shm_layout::sync::shm::Ordering;
use shm_layout::table::TableView;
use std::collections::{HashMap, HashSet};

/// What the gate needs of the cluster agent (the real [`forelock_cluster::Agent`],
/// or a scripted one in tests).
pub trait ClusterLink {
    /// Whether `key` is arbitrated across hosts.
    fn is_global(&self, key: &[u8]) -> bool;
    fn send(&mut self, command: Command);
    /// Whether grants under lease `epoch` are still safe now.
    fn lease_valid(&self, epoch: u64) -> bool;
    /// The CLOCK_MONOTONIC ns until which grants under lease `epoch` are
    /// safe (0: not safe now).
    fn safe_until_ns(&self, epoch: u64) -> u64;
    fn min_hold_ms(&self) -> u64;
    /// The clock of the minimum hold (CLOCK_MONOTONIC, µs), read when
    /// needed: the engine's `now_ms` moves only at its ticks (10 ms), and a
    /// transfer between hosts would wait for the next one.
    fn now_us(&self) -> u64 {
        shm_layout::monotonic_ns() / 1_000
    }
}

/// Which node grants [`LockManager::lose`] drops.
#[derive(Clone, Copy)]
enum Losing {
    /// Those under lease `epoch`: the agent fenced it.
    Epoch(u64),
    /// Those whose lease is past its safe time on the broker's own clock.
    PastSafeTime,
    /// Every one: the broker stops.
    All,
}

/// This host's node grant on one global key.
#[derive(Debug, Clone)]
struct NodeGrant {
    shared: bool,
    epoch: u64,
    /// The last token granted locally under this node grant.
    issued: u64,
    limit: u64,
    granted_us: u64,
    /// A local process took the key under this grant.
    used: bool,
    prefetch: bool,
    /// Local processes were already waiting for the key when the grant
    /// came: its first local acquisition did not find it here.
    awaited: bool,
    /// When (CLOCK_MONOTONIC, ns) the callback came: another host waits
    /// from then until this grant is released.
    callback_ns: Option<u64>,
    /// Another host waits: grant no more, release when the holders leave.
    callback: bool,
    /// Gossip says another host will want the key, and none here uses it:
    /// yield at once, without the minimum hold.
    hinted: bool,
    /// `Release` was sent; the agent's `Released` ends the grant.
    releasing: bool,
    /// The key lost its slot here (idle past the allocator's timeout and
    /// not predicted): give the grant back, no other host need ask.
    idle: bool,
}

impl NodeGrant {
    /// Whether a callback may end this grant now: it was never used here, or
    /// it is at least `min_hold_ms` old (no ping-pong between hosts).
    fn held_enough(&self, now_us: u64, min_hold_ms: u64) -> bool {
        !self.used || self.hinted || now_us >= self.granted_us + min_hold_ms * 1000
    }
}

/// What `forelock status` shows of the gate.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NodeCounts {
    pub held: usize,
    pub wanted: usize,
    pub lost_holds: usize,
    /// First local acquisitions under a node grant that found the grant
    /// already here because it was prefetched.
    pub prefetch_hits: u64,
    /// First local acquisitions under a node grant that waited for it (it
    /// was asked for on demand, or a prefetch came too late). The prefetch
    /// hit rate is `prefetch_hits / (prefetch_hits + first_uses_waited)`.
    pub first_uses_waited: u64,
    /// Prefetched node grants released without any local use.
    pub prefetch_unused: u64,
    /// What those cost other hosts: the time from the callback (another
    /// host queued) to the release, summed over unused prefetched grants,
    /// in microseconds.
    pub prefetch_unused_wait_us: u64,
}

pub(super) struct Nodes {
    link: Box<dyn ClusterLink>,
    grants: HashMap<Vec<u8>, NodeGrant>,
    /// Keys whose node grant was asked for and not granted yet.
    wanted: HashSet<Vec<u8>>,
    /// Local holds `(client, slot, token)` whose node grant was lost. The
    /// slot names the key: tokens are per key, and a client may hold a
    /// local key with the same token as a lost global one.
    lost: HashSet<(u32, u32, u64)>,
    /// Keys whose `Release` was sent and whose `Released` has not come back:
    /// a `Granted` for one of them is stale (the agent is releasing it).
    releasing: HashSet<Vec<u8>>,
    /// The broker stops ([`LockManager::give_up_node_grants`]): its local
    /// waiters are answered by its exit, not by a node grant.
    stopping: bool,
    counts: NodeCounts,
}

impl Nodes {
    pub(super) fn new(link: Box<dyn ClusterLink>) -> Nodes {
        Nodes {
            link,
            grants: HashMap::new(),
            wanted: HashSet::new(),
            lost: HashSet::new(),
            releasing: HashSet::new(),
            stopping: false,
            counts: NodeCounts::default(),
        }
    }

    pub(super) fn is_global(&self, key: &[u8]) -> bool {
        self.link.is_global(key)
    }

    /// Whether a local process may be granted `key` (`shared` or not) now
    /// (the link's clock, not the engine's tick-old one). After a callback, local grants go on until the node grant is
    /// `min_hold_ms` old (a used one; an unused one yields at once).
    pub(super) fn admits(&self, key: &[u8], shared: bool, _engine_now_ms: u64) -> bool {
        self.grants.get(key).is_some_and(|g| {
            let ending = g.callback && g.held_enough(self.link.now_us(), self.link.min_hold_ms());
            !ending
                && !g.releasing
                && g.issued < g.limit
                && (!g.shared || shared)
                && self.link.lease_valid(g.epoch)
        })
    }

    /// The token of a local grant of `key`, which [`Nodes::admits`] allowed.
    pub(super) fn token(&mut self, key: &[u8]) -> u64 {
        let g = self
            .grants
            .get_mut(key)
            .expect("admitted: the grant exists");
        if !g.used {
            if g.prefetch && !g.awaited {
                self.counts.prefetch_hits += 1;
            } else {
                self.counts.first_uses_waited += 1;
            }
        }
        g.used = true;
        g.issued += 1;
        g.issued
    }

    /// Whether local processes may grant themselves `key` on the fast path
    /// now, and on what terms: `(base, issued, until_ns)`, the node grant's
    /// token base, the last token issued under it, and the lease's safe
    /// time. Only an exclusive node grant that [`Nodes::admits`] would
    /// admit, and that no other host has asked for.
    pub(super) fn fast_until(&self, key: &[u8], now_ms: u64) -> Option<(u64, u64, u64)> {
        let g = self.grants.get(key)?;
        if g.shared || g.callback || g.hinted || !self.admits(key, false, now_ms) {
            return None;
        }
        let until = self.link.safe_until_ns(g.epoch);
        (until != 0).then_some((
            g.limit - shm_layout::lockword::COUNTER_MASK,
            g.issued,
            until,
        ))
    }

    /// A take-over found `key`'s word at `token`, after `fast_grants` grants
    /// clients made themselves: fold them into the node grant's counter, so
    /// the next token it gives is above them.
    pub(super) fn observe(&mut self, key: &[u8], token: u64, fast_grants: bool) {
        if let Some(g) = self.grants.get_mut(key) {
            g.issued = g.issued.max(token.min(g.limit));
            if fast_grants {
                if !g.used {
                    if g.prefetch && !g.awaited {
                        self.counts.prefetch_hits += 1;
                    } else {
                        self.counts.first_uses_waited += 1;
                    }
                }
                g.used = true;
            }
        }
    }

    /// Whether the hold `(client, slot, token)` was lost (a question: it
    /// stays lost until its release).
    pub(super) fn is_lost(&self, client: u32, slot: u32, token: u64) -> bool {
        self.lost.contains(&(client, slot, token))
    }

    /// Whether the hold `(client, slot, token)` was lost; forgets it (its
    /// release).
    pub(super) fn take_lost(&mut self, client: u32, slot: u32, token: u64) -> bool {
        self.lost.remove(&(client, slot, token))
    }

    pub(super) fn counts(&self) -> NodeCounts {
        NodeCounts {
            held: self.grants.len(),
            wanted: self.wanted.len(),
            lost_holds: self.lost.len(),
            ..self.counts
        }
    }

    /// Whether `key`'s node grant is here, asked for, or being released
    /// (its `Released` makes [`LockManager::settle`] ask again), or the
    /// broker stops: a local waiter for it is not forgotten (the explorer's
    /// check).
    #[cfg(any(test, feature = "model"))]
    pub(super) fn is_coming(&self, key: &[u8]) -> bool {
        self.stopping
            || self.grants.contains_key(key)
            || self.wanted.contains(key)
            || self.releasing.contains(key)
    }

    /// Whether the gate holds `key`'s node grant (the explorer's check).
    #[cfg(any(test, feature = "model"))]
    pub(super) fn holds(&self, key: &[u8]) -> bool {
        self.grants.contains_key(key)
    }

    /// A copy talking to `link` (the explorer's branch point).
    #[cfg(any(test, feature = "model"))]
    pub(super) fn fork(&self, link: Box<dyn ClusterLink>) -> Nodes {
        Nodes {
            link,
            grants: self.grants.clone(),
            wanted: self.wanted.clone(),
            lost: self.lost.clone(),
            releasing: self.releasing.clone(),
            stopping: self.stopping,
            counts: self.counts,
        }
    }

    /// A hash of what decides the gate's future (the explorer's visited
    /// set): not the counters, and of a callback only whether it came (its
    /// time is the real clock's, kept for the counters).
    #[cfg(any(test, feature = "model"))]
    pub(super) fn digest(&self, h: &mut impl std::hash::Hasher) {
        use std::hash::Hash;
        let mut grants: Vec<_> = self.grants.iter().collect();
        grants.sort_by(|a, b| a.0.cmp(b.0));
        for (k, g) in grants {
            k.hash(h);
            (g.shared, g.epoch, g.issued, g.limit, g.granted_us).hash(h);
            (g.used, g.prefetch, g.awaited, g.callback_ns.is_some()).hash(h);
            (g.callback, g.hinted, g.releasing, g.idle).hash(h);
        }
        for set in [&self.wanted, &self.releasing] {
            let mut v: Vec<_> = set.iter().collect();
            v.sort();
            v.hash(h);
        }
        let mut lost: Vec<_> = self.lost.iter().collect();
        lost.sort();
        lost.hash(h);
        self.stopping.hash(h);
    }

    /// Ask for `key`'s node grant ahead of any local request (prediction).
    pub(super) fn prefetch(&mut self, key: &[u8]) {
        if self.grants.contains_key(key) || !self.wanted.insert(key.to_vec()) {
            return;
        }
        timing(key, "broker: prefetch want sent");
        self.link.send(Command::Want {
            key: key.to_vec(),
            shared: false,
            prefetch: true,
        });
    }
}

/// A timestamp of one step of a node grant (see
/// [`forelock_cluster::agent::TIMING_TARGET`]); free when that target is off.
fn timing(key: &[u8], step: &'static str) {
    tracing::debug!(
        target: forelock_cluster::agent::TIMING_TARGET,
        key = %String::from_utf8_lossy(key),
        step,
        at_ns = shm_layout::monotonic_ns(),
    );
}

impl LockManager {
    /// Applies one event of the cluster agent.
    pub fn node_event(&mut self, table: &TableView, event: Event, waker: &mut dyn Waker) {
        let Some(nodes) = self.nodes.as_mut() else {
            return;
        };
        let key = match event {
            Event::Granted {
                key,
                shared,
                base,
                epoch,
                prefetch,
            } => {
                nodes.wanted.remove(&key);
                if nodes.releasing.contains(&key) {
                    // The agent is releasing this grant (it saw our Release
                    // after it had won).
                    return;
                }
                if !nodes.link.lease_valid(epoch) {
                    // Granted under a lease past its safe time. If the
                    // session lives on (a renewal came back late), the agent
                    // holds the key at etcd: have it let go, or every host
                    // waits for it. If the session is over, the agent ignores
                    // this, and its `Fenced` clears `releasing`.
                    nodes.releasing.insert(key.clone());
                    nodes.link.send(Command::Release { key, epoch });
                    return;
                }
                timing(&key, "broker: granted applied");
                tracing::debug!(key = %String::from_utf8_lossy(&key), base, epoch, "node grant");
                let awaited = self
                    .dir
                    .keys
                    .get(key.as_slice())
                    .is_some_and(|&s| !self.dir.slots[s as usize].queue.is_empty());
                nodes.grants.insert(
                    key.clone(),
                    NodeGrant {
                        shared,
                        epoch,
                        issued: base,
                        limit: base + shm_layout::lockword::COUNTER_MASK,
                        granted_us: nodes.link.now_us(),
                        used: false,
                        prefetch,
                        awaited,
                        callback_ns: None,
                        callback: false,
                        hinted: false,
                        releasing: false,
                        idle: false,
                    },
                );
                // A prefetched key gets its slot now (a free one only: a
                // prediction evicts nothing), so that the dispatch below
                // prepares it and the first local acquisition is one CAS.
                if prefetch
                    && !self.dir.keys.contains_key(key.as_slice())
                    && !self.dir.free.is_empty()
                    && let Some(s) = self
                        .dir
                        .allocate(table, &mut self.ledger, self.now_ms, &key)
                {
                    self.dir.slots[s as usize].speculative = true;
                }
                key
            }
            Event::Callback { key } => {
                self.stop_fast_path(table, &key);
                let nodes = self.nodes.as_mut().expect("checked above");
                if let Some(g) = nodes.grants.get_mut(&key) {
                    g.callback = true;
                    g.callback_ns.get_or_insert_with(shm_layout::monotonic_ns);
                }
                key
            }
            Event::Released { key } => {
                nodes.releasing.remove(&key);
                // The agent's task for the key has ended: a Want sent while
                // it ran was ignored, so the next one must be sent.
                nodes.wanted.remove(&key);
                if let Some(g) = nodes.grants.remove(&key)
                    && g.prefetch
                    && !g.used
                {
                    nodes.counts.prefetch_unused += 1;
                    if let Some(since) = g.callback_ns {
                        let waited_ns = shm_layout::monotonic_ns().saturating_sub(since);
                        nodes.counts.prefetch_unused_wait_us += waited_ns / 1000;
                    }
                }
                key
            }
            Event::Hint { key } => {
                // Another host will want `key`: an idle node grant (no local
                // holder, no local waiter) goes now rather than at a callback.
                self.stop_fast_path(table, &key);
                let nodes = self.nodes.as_mut().expect("checked above");
                let idle = self.dir.keys.get(key.as_slice()).is_none_or(|&s| {
                    let st = &self.dir.slots[s as usize];
                    st.holder == super::engine::Holder::Free && st.queue.is_empty()
                });
                if let Some(g) = nodes.grants.get_mut(&key)
                    && idle
                {
                    g.callback = true;
                    g.hinted = true;
                }
                key
            }
            Event::Fenced { epoch, reason } => {
                tracing::error!(epoch, %reason, "lease lost: local holds of global keys are lost");
                self.lose(table, Losing::Epoch(epoch));
                return;
            }
            // Only Agent::stop waits for it; one seen here is stale.
            Event::Stopped => return,
        };
        if let Some(&s) = self.dir.keys.get(key.as_slice()) {
            self.dispatch(table, s, waker);
        }
        self.settle(&key);
        timing(&key, "broker: event handled");
    }

    /// The tick's check on the broker's own clock: node grants whose lease is
    /// past its safe time are lost now, whatever the agent thread is doing.
    /// Prepared global slots get the lease's current safe time (renewals
    /// raise it), or are taken over when their grant no longer fits the
    /// fast path.
    pub fn check_leases(&mut self, table: &TableView) {
        let Some(nodes) = self.nodes.as_ref() else {
            return;
        };
        if nodes
            .grants
            .values()
            .any(|g| !nodes.link.lease_valid(g.epoch))
        {
            self.lose(table, Losing::PastSafeTime);
        }
        self.refresh_fast_path(table);
        // A callback waits out the minimum hold, then drains.
        let keys: Vec<Vec<u8>> = self
            .nodes
            .as_ref()
            .map(|n| n.grants.keys().cloned().collect())
            .unwrap_or_default();
        for k in keys {
            self.settle(&k);
        }
    }

    /// The broker stops: every node grant is given up before the agent
    /// revokes the lease ([`forelock_cluster::Agent::stop`]). Clients stop
    /// granting themselves prepared global keys, their fast-path holders
    /// become holders the gate knows, and every local hold of a global key
    /// is lost (another host may hold the key once the lease is revoked).
    pub fn give_up_node_grants(&mut self, table: &TableView) {
        if let Some(n) = self.nodes.as_mut() {
            n.stopping = true;
        }
        self.lose(table, Losing::All);
    }

    /// The node grants `which` names are gone: their local holders are
    /// lost, their waiters ask again.
    fn lose(&mut self, table: &TableView, which: Losing) {
        let Some(nodes) = self.nodes.as_ref() else {
            return;
        };
        let gone: Vec<(Vec<u8>, u64)> = nodes
            .grants
            .iter()
            .filter(|(_, g)| match which {
                Losing::Epoch(e) => g.epoch == e,
                Losing::PastSafeTime => !nodes.link.lease_valid(g.epoch),
                Losing::All => true,
            })
            .map(|(k, g)| (k.clone(), g.epoch))
            .collect();
        // Their fast-path holders first become holders the gate knows (and
        // so lost holds below), and clients stop granting themselves.
        for (k, _) in &gone {
            self.stop_fast_path(table, k);
        }
        let Some(nodes) = self.nodes.as_mut() else {
            return;
        };
        for (k, _) in &gone {
            nodes.grants.remove(k);
        }
        if !matches!(which, Losing::PastSafeTime) {
            // The agent fenced, or stops: its session, with every key
            // task, is gone.
            nodes.releasing.clear();
            nodes.wanted.clear();
        } else {
            // Lost on the broker's clock, while the agent may still think it
            // holds them (a renewal late past the safe time): have it let
            // them go, and ignore their grants until it says it has.
            for (k, e) in &gone {
                nodes.releasing.insert(k.clone());
                nodes.link.send(Command::Release {
                    key: k.clone(),
                    epoch: *e,
                });
            }
        }
        let lost: Vec<_> = gone
            .iter()
            .filter_map(|(k, _)| self.dir.keys.get(k.as_slice()))
            .flat_map(|&s| self.holds_in(s))
            .collect();
        let nodes = self.nodes.as_mut().expect("checked above");
        tracing::warn!(keys = gone.len(), holds = lost.len(), "node grants lost");
        nodes.lost.extend(lost);
        if matches!(which, Losing::All) {
            return; // stopping: local waiters do not ask again
        }
        let waiting: Vec<Vec<u8>> = self
            .dir
            .keys
            .iter()
            .filter(|(k, s)| {
                self.nodes.as_ref().is_some_and(|n| n.is_global(k))
                    && !self.dir.slots[**s as usize].queue.is_empty()
            })
            .map(|(k, _)| k.to_vec())
            .collect();
        for k in waiting {
            self.settle(&k);
        }
    }

    /// The holds `(client, slot, token)` the manager knows in slot `s` (a
    /// prepared slot's fast-path holder once taken over).
    fn holds_in(&self, s: u32) -> Vec<(u32, u32, u64)> {
        match &self.dir.slots[s as usize].holder {
            super::engine::Holder::Exclusive { client, token, .. } => vec![(*client, s, *token)],
            super::engine::Holder::Shared(v) => v.iter().map(|&(c, t)| (c, s, t)).collect(),
            super::engine::Holder::Free => Vec::new(),
        }
    }

    /// Brings `key`'s node grant in line with its local state: release it if
    /// it must go and no local holder is left; ask for it if local processes
    /// wait and it is not here.
    pub(super) fn settle(&mut self, key: &[u8]) {
        let Some(nodes) = self.nodes.as_mut() else {
            return;
        };
        let now = nodes.link.now_us();
        if !nodes.is_global(key) {
            return;
        }
        let slot = self.dir.keys.get(key).map(|&s| &self.dir.slots[s as usize]);
        let head = slot.and_then(|st| st.queue.front().map(|w| w.shared));
        // A prepared slot may have a holder only its word knows: never free
        // until taken over.
        let free = slot.is_none_or(|st| st.managed && st.holder == super::engine::Holder::Free);
        let min_hold = nodes.link.min_hold_ms();
        if let Some(g) = nodes.grants.get_mut(key) {
            let must_go = (g.callback && g.held_enough(now, min_hold))
                || g.idle
                || g.issued >= g.limit
                || (g.shared && head == Some(false))
                || !nodes.link.lease_valid(g.epoch);
            if must_go && free && !g.releasing {
                timing(key, "broker: release sent");
                g.releasing = true;
                nodes.releasing.insert(key.to_vec());
                nodes.link.send(Command::Release {
                    key: key.to_vec(),
                    epoch: g.epoch,
                });
            }
            return;
        }
        if let Some(shared) = head
            && nodes.wanted.insert(key.to_vec())
        {
            timing(key, "broker: want sent");
            nodes.link.send(Command::Want {
                key: key.to_vec(),
                shared,
                prefetch: false,
            });
        }
    }

    /// `key` lost its slot here: the allocator reclaimed it (idle past its
    /// timeout, `keep_alive_ms`, and not predicted) or evicted it idle. Its
    /// node grant, if here, goes back now through the ordinary release
    /// ([`LockManager::settle`]: `Release` to the agent, which deletes this
    /// host's etcd entry; `Released` ends it), so that another host's first
    /// acquisition or prefetch finds the key free at etcd rather than
    /// calling this host back. No local holder can be left: a key without a
    /// slot has none, and a later local request asks for the grant again.
    pub(super) fn give_back_idle(&mut self, key: &[u8]) {
        if let Some(g) = self.nodes.as_mut().and_then(|n| n.grants.get_mut(key)) {
            g.idle = true;
        }
        self.settle(key);
    }

    /// Stop local processes from granting themselves `key` on the fast path:
    /// take its prepared slot over (its fast-path holder becomes a holder
    /// the gate knows; the tokens clients issued are folded into the node
    /// grant). If the take-over is refused (the holder's ledger entry is
    /// full), the slot's limit is set to the past, so clients give back any
    /// grant they make, and the next tick tries again.
    pub(super) fn stop_fast_path(&mut self, table: &TableView, key: &[u8]) {
        let Some(&s) = self.dir.keys.get(key) else {
            return;
        };
        if self.dir.slots[s as usize].managed {
            return;
        }
        let slot = table.slot(s).expect("s < slot_count");
        // SYNC POINT: Release pairs with the Acquire load in
        // Slot::may_grant_now: a client whose CAS comes after our take-over
        // fails anyway; one whose CAS came before it is a holder we learn.
        slot.grant_until_ns.store(1, Ordering::Release);
        if self.take_over(table, s).is_err() {
            tracing::warn!(
                slot = s,
                "cannot take over a prepared global key now (its holder's ledger entry is full): its clients stop granting themselves; retried at the next tick"
            );
        }
    }

    /// The tick's upkeep of prepared global slots: each gets its lease's
    /// current safe time, or is taken over when its node grant no longer
    /// fits the fast path ([`Nodes::fast_until`]) or is gone.
    fn refresh_fast_path(&mut self, table: &TableView) {
        let now = self.now_ms;
        let Some(nodes) = self.nodes.as_ref() else {
            return;
        };
        // Only a key with a node grant here is ever prepared
        // (`return_to_fast_path` asks `fast_until`), and a node grant goes
        // only once its slot is managed (`settle`): so the grants name every
        // prepared global slot.
        let mut stop = Vec::new();
        for k in nodes.grants.keys() {
            let Some(&s) = self.dir.keys.get(k.as_slice()) else {
                continue;
            };
            if self.dir.slots[s as usize].managed {
                continue;
            }
            match nodes.fast_until(k, now) {
                Some((_, _, until)) => {
                    let slot = table.slot(s).expect("s < slot_count");
                    slot.grant_until_ns.store(until, Ordering::Release);
                }
                None => stop.push(k.clone()),
            }
        }
        for k in stop {
            self.stop_fast_path(table, &k);
        }
    }

    /// Whether this host's gate holds `key`'s node grant (the explorer's
    /// check: without it, no local hold of the key may stand unlost).
    #[cfg(any(test, feature = "model"))]
    pub fn holds_node_grant(&self, key: &[u8]) -> bool {
        self.nodes.as_ref().is_some_and(|n| n.holds(key))
    }

    /// What `forelock status` shows of the node gate, if clustering is on.
    pub fn node_counts(&self) -> Option<NodeCounts> {
        self.nodes.as_ref().map(Nodes::counts)
    }

    /// Ask for the node grant of the global key `key` before anyone here
    /// does (the forecaster predicts it).
    pub fn prefetch_global(&mut self, key: &[u8]) {
        if let Some(n) = self.nodes.as_mut()
            && n.is_global(key)
        {
            n.prefetch(key);
        }
    }

    /// Installs the cluster link (the broker's `[cluster]` section). Holds
    /// of global keys adopted from a previous broker are lost: their node
    /// grants lived under that broker's lease. Global keys that broker left
    /// prepared are taken over first, so that their fast-path holders are
    /// among them and no client grants itself one any more.
    pub fn set_cluster(&mut self, table: &TableView, link: Box<dyn ClusterLink>) {
        let mut nodes = Nodes::new(link);
        let prepared: Vec<u32> = self
            .dir
            .keys
            .iter()
            .filter(|(k, s)| nodes.is_global(k) && !self.dir.slots[**s as usize].managed)
            .map(|(_, &s)| s)
            .collect();
        for s in prepared {
            let slot = table.slot(s).expect("s < slot_count");
            slot.grant_until_ns.store(1, Ordering::Release);
            let _ = self.take_over(table, s);
        }
        for (k, &s) in &self.dir.keys {
            if !nodes.is_global(k) {
                continue;
            }
            nodes.lost.extend(self.holds_in(s));
        }
        self.nodes = Some(nodes);
    }
}
