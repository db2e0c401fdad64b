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
//! Global keys are never prepared: every local grant of one passes the gate,
//! so the lease is checked on the broker's own clock at every grant.
//!
//! When a lease is lost (the agent's `Fenced`, or the broker's own clock
//! passing the lease's safe time), every local hold of a global key under it
//! becomes *lost*: the holder keeps its place in the slot (no one else here
//! is granted the key until it leaves), and its release is answered `Lost`.

use super::{LockManager, Waker};
use forelock_cluster::{Command, Event};
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
    fn min_hold_ms(&self) -> u64;
    /// The clock of the minimum hold (CLOCK_MONOTONIC, µs), read when
    /// needed: the engine's `now_ms` moves only at its ticks (10 ms), and a
    /// transfer between hosts would wait for the next one.
    fn now_us(&self) -> u64 {
        shm_layout::monotonic_ns() / 1_000
    }
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
    /// Local holds `(client, token)` whose node grant was lost.
    lost: HashSet<(u32, u64)>,
    /// Keys whose `Release` was sent and whose `Released` has not come back:
    /// a `Granted` for one of them is stale (the agent is releasing it).
    releasing: HashSet<Vec<u8>>,
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

    /// Whether the hold `(client, token)` was lost; forgets it.
    pub(super) fn take_lost(&mut self, client: u32, token: u64) -> bool {
        self.lost.remove(&(client, token))
    }

    pub(super) fn counts(&self) -> NodeCounts {
        NodeCounts {
            held: self.grants.len(),
            wanted: self.wanted.len(),
            lost_holds: self.lost.len(),
            ..self.counts
        }
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
                    },
                );
                key
            }
            Event::Callback { key } => {
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
                self.lose_epoch(Some(epoch));
                return;
            }
        };
        if let Some(&s) = self.dir.keys.get(key.as_slice()) {
            self.dispatch(table, s, waker);
        }
        self.settle(&key);
        timing(&key, "broker: event handled");
    }

    /// The tick's check on the broker's own clock: node grants whose lease is
    /// past its safe time are lost now, whatever the agent thread is doing.
    pub fn check_leases(&mut self) {
        let Some(nodes) = self.nodes.as_ref() else {
            return;
        };
        if nodes
            .grants
            .values()
            .any(|g| !nodes.link.lease_valid(g.epoch))
        {
            self.lose_epoch(None);
        }
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

    /// Every node grant under `epoch` (or under any invalid lease, `None`) is
    /// gone: its local holders are lost, its waiters ask again.
    fn lose_epoch(&mut self, epoch: Option<u64>) {
        let Some(nodes) = self.nodes.as_mut() else {
            return;
        };
        let gone: Vec<(Vec<u8>, u64)> = nodes
            .grants
            .iter()
            .filter(|(_, g)| match epoch {
                Some(e) => g.epoch == e,
                None => !nodes.link.lease_valid(g.epoch),
            })
            .map(|(k, g)| (k.clone(), g.epoch))
            .collect();
        for (k, _) in &gone {
            nodes.grants.remove(k);
        }
        if epoch.is_some() {
            // The agent fenced: its session, with every key task, is gone.
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
        let mut lost = Vec::new();
        for (k, _) in &gone {
            if let Some(&s) = self.dir.keys.get(k.as_slice()) {
                match &self.dir.slots[s as usize].holder {
                    super::engine::Holder::Exclusive { client, token, .. } => {
                        lost.push((*client, *token))
                    }
                    super::engine::Holder::Shared(v) => lost.extend(v.iter().copied()),
                    super::engine::Holder::Free => {}
                }
            }
        }
        let nodes = self.nodes.as_mut().expect("checked above");
        tracing::warn!(keys = gone.len(), holds = lost.len(), "node grants lost");
        nodes.lost.extend(lost);
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
        let free = slot.is_none_or(|st| st.holder == super::engine::Holder::Free);
        let min_hold = nodes.link.min_hold_ms();
        if let Some(g) = nodes.grants.get_mut(key) {
            let must_go = (g.callback && g.held_enough(now, min_hold))
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
    /// grants lived under that broker's lease.
    pub fn set_cluster(&mut self, link: Box<dyn ClusterLink>) {
        let mut nodes = Nodes::new(link);
        for (k, &s) in &self.dir.keys {
            if !nodes.is_global(k) {
                continue;
            }
            match &self.dir.slots[s as usize].holder {
                super::engine::Holder::Exclusive { client, token, .. } => {
                    nodes.lost.insert((*client, *token));
                }
                super::engine::Holder::Shared(v) => nodes.lost.extend(v.iter().copied()),
                super::engine::Holder::Free => {}
            }
        }
        self.nodes = Some(nodes);
    }
}
