//! The node gate in the explorer ([`super::model`]): key `a` is global, and
//! its node grant comes from a scripted cluster agent whose every step is a
//! step of the exploration, interleaved with the clients' and the broker's.
//!
//! The agent ([`World`]) queues a task for each `Want`, grants it with a
//! base from a growing etcd revision, calls the holder back, hints, answers
//! `Release` with `Released`, and fences its lease; its events reach the
//! gate in order, at a step of their own ([`NodeStep::Deliver`]), so every
//! race between an event in flight and the clients is explored. The
//! broker's clock can pass the lease's safe time ([`NodeStep::PastSafe`]),
//! and only then can the agent fence (the lease's expiry at etcd comes after
//! its safe time: docs/cluster.md), which starts a new lease. A broker
//! restart starts a new agent session; a clean stop gives the grants up and
//! revokes the lease. The clients check a prepared global slot's safe time
//! after their CAS against this model clock, as the client library does
//! against CLOCK_MONOTONIC.
//!
//! What this host must never do, whatever the interleaving (the cross-host
//! half, other hosts, etcd and message loss, is the cluster model's:
//! `broker/cluster/tests/model.rs`):
//!
//! - G1: grant the global key (a broker answer or a client's own CAS)
//!   unless the agent holds its node grant under the current lease, before
//!   the safe time, in a mode that allows it, and with a token inside the
//!   grant's range;
//! - G2: tell the agent to release the node grant (after which another host
//!   may hold the key) while a local holder still stands unlost;
//! - G3: keep a local hold standing unlost once the gate no longer holds the
//!   node grant (a fence, the safe time passed, a restart, a stop);
//! - G4: call a hold lost while the node grant it was granted under still
//!   stands and is valid;
//! - and forget a local waiter: its node grant must be here or asked for
//!   ([`LockManager::check`]).

use super::model::{KEYS, State, Who, holds_of};
use super::{ClusterLink, LockManager};
use forelock_cluster::{Command, Event};
use shm_layout::lockword::COUNTER_MASK;
use shm_layout::table::TableView;
use shm_layout::wire::{ErrorCode, Response};
use std::cell::RefCell;
use std::collections::VecDeque;
use std::hash::{Hash, Hasher};
use std::rc::Rc;

/// The global key: `KEYS[0]`.
pub const GLOBAL: usize = 0;

/// A lease epoch's span on the model clock: epoch `e` is safe until
/// `(e + 1) * SPAN` ns.
const SPAN: u64 = 1_000;

fn safe_until(epoch: u64) -> u64 {
    (epoch + 1) * SPAN
}

/// The agent's task for the global key.
#[derive(Clone, Debug, Hash)]
pub struct Task {
    shared: bool,
    prefetch: bool,
    /// The node grant's token base, once granted (this host holds the key
    /// at etcd).
    base: Option<u64>,
    called_back: bool,
}

/// The scripted cluster agent and the broker's clocks.
#[derive(Clone, Debug)]
pub struct World {
    /// Commands the gate sent that the agent has not taken yet.
    sent: Vec<Command>,
    epoch: u64,
    /// The broker's CLOCK_MONOTONIC (ns), against the lease's safe time.
    now_ns: u64,
    /// The minimum hold's clock (µs).
    hold_us: u64,
    /// etcd's next revision: a node grant's base is `revision << 24`.
    next_rev: u64,
    task: Option<Task>,
    events: VecDeque<Event>,
    /// Steps done once per run at most (the bound): a fence, a hint, a
    /// prefetch, a clean stop; two minimum holds passing.
    fenced: bool,
    hinted: bool,
    prefetched: bool,
    stopped: bool,
    holds_passed: u32,
}

impl World {
    fn new() -> World {
        World {
            sent: Vec::new(),
            epoch: 1,
            now_ns: SPAN + SPAN / 2,
            hold_us: 0,
            next_rev: 1,
            task: None,
            events: VecDeque::new(),
            fenced: false,
            hinted: false,
            prefetched: false,
            stopped: false,
            holds_passed: 0,
        }
    }

    fn lease_valid(&self, epoch: u64) -> bool {
        epoch == self.epoch && self.now_ns < safe_until(epoch) && !self.stopped
    }

    /// The agent's node grant as `(shared, base)`, if it holds one now
    /// under a lease still safe.
    fn valid_grant(&self) -> Option<(bool, u64)> {
        let t = self.task.as_ref()?;
        let base = t.base?;
        self.lease_valid(self.epoch).then_some((t.shared, base))
    }

    /// A new agent session (a restart; a fence's new lease): its keys went
    /// with the old one.
    fn new_session(&mut self) {
        self.epoch += 1;
        self.task = None;
    }

    fn hash(&self, h: &mut impl Hasher) {
        (
            self.epoch,
            self.now_ns,
            self.hold_us,
            self.next_rev,
            &self.task,
        )
            .hash(h);
        format!("{:?}", self.events).hash(h);
        (
            self.fenced,
            self.hinted,
            self.prefetched,
            self.stopped,
            self.holds_passed,
        )
            .hash(h);
    }
}

/// The gate's side of the scripted agent.
struct Link(Rc<RefCell<World>>);

impl ClusterLink for Link {
    fn is_global(&self, key: &[u8]) -> bool {
        key == KEYS[GLOBAL]
    }
    fn send(&mut self, command: Command) {
        self.0.borrow_mut().sent.push(command);
    }
    fn lease_valid(&self, epoch: u64) -> bool {
        self.0.borrow().lease_valid(epoch)
    }
    fn safe_until_ns(&self, epoch: u64) -> u64 {
        if self.lease_valid(epoch) {
            safe_until(epoch)
        } else {
            0
        }
    }
    fn min_hold_ms(&self) -> u64 {
        1
    }
    fn now_us(&self) -> u64 {
        self.0.borrow().hold_us
    }
}

/// The cluster's part of a [`State`].
pub struct Cluster(Rc<RefCell<World>>);

impl Cluster {
    /// A new cluster world, its link installed in `m`.
    pub fn install(m: &mut LockManager, table: &TableView) -> Cluster {
        let world = Rc::new(RefCell::new(World::new()));
        m.set_cluster(table, Box::new(Link(world.clone())));
        Cluster(world)
    }

    /// A copy for a branch point, and `m`'s fork talking to it.
    pub fn fork(&self, m: &LockManager) -> (Cluster, LockManager) {
        let world = Rc::new(RefCell::new(self.0.borrow().clone()));
        let m = m.fork_with_link(Box::new(Link(world.clone())));
        (Cluster(world), m)
    }

    pub fn hash(&self, h: &mut impl Hasher) {
        self.0.borrow().hash(h);
    }

    /// The broker restarted: a new agent session, and a new link.
    pub fn restarted(&self, m: &mut LockManager, table: &TableView) {
        {
            let mut w = self.0.borrow_mut();
            w.new_session();
            w.events.clear();
            w.sent.clear();
        }
        m.set_cluster(table, Box::new(Link(self.0.clone())));
    }

    /// What a client that just won a CAS on a prepared slot of the global
    /// key checks: the slot's safe time against the broker's clock.
    pub fn may_grant_now(&self, grant_until_ns: u64) -> bool {
        grant_until_ns == 0 || self.0.borrow().now_ns < grant_until_ns
    }

    /// The broker stopped cleanly: its process exits, nothing more happens.
    pub fn stopped(&self) -> bool {
        self.0.borrow().stopped
    }

    /// The environment's steps now.
    pub fn steps(&self) -> Vec<NodeStep> {
        let w = self.0.borrow();
        let mut out = Vec::new();
        if w.stopped {
            return out;
        }
        if !w.events.is_empty() {
            out.push(NodeStep::Deliver);
        }
        match &w.task {
            Some(t) if t.base.is_none() => out.push(NodeStep::Grant),
            Some(t) if !t.called_back => out.push(NodeStep::Callback),
            _ => {}
        }
        if !w.hinted {
            out.push(NodeStep::Hint);
        }
        if !w.prefetched {
            out.push(NodeStep::Prefetch);
        }
        if w.now_ns < safe_until(w.epoch) {
            out.push(NodeStep::PastSafe);
        } else if !w.fenced {
            out.push(NodeStep::Fence);
        }
        out.push(NodeStep::Tick);
        if w.holds_passed < 2 {
            out.push(NodeStep::HoldPasses);
        }
        out.push(NodeStep::Stop);
        out
    }
}

/// A step of the cluster agent or of the broker's clocks.
#[derive(Clone, Copy, Debug)]
pub enum NodeStep {
    /// The oldest event in flight reaches the gate.
    Deliver,
    /// etcd grants the queued task (this host's entry is the lowest).
    Grant,
    /// Another host queues: the holder is called back.
    Callback,
    /// Gossip says another host will want the key.
    Hint,
    /// The forecaster predicts the key: the broker prefetches its grant.
    Prefetch,
    /// The broker's clock passes the lease's safe time.
    PastSafe,
    /// The agent could not confirm the lease: `Fenced`, and a new lease.
    Fence,
    /// The broker's tick checks the leases on its own clock.
    Tick,
    /// The minimum hold passes.
    HoldPasses,
    /// A clean stop: the grants are given up, then the lease is revoked.
    Stop,
}

/// Applies `step`; `Err` names a broken promise.
pub fn apply(s: &mut State, table: &TableView, step: NodeStep) -> Result<(), String> {
    let world = s.cluster.as_ref().expect("a clustered model").0.clone();
    let mut w = super::model::CountingWaker::default();
    let push = |e: Event| world.borrow_mut().events.push_back(e);
    let key = KEYS[GLOBAL].to_vec();
    match step {
        NodeStep::Deliver => {
            let event = world.borrow_mut().events.pop_front().expect("offered");
            s.m.node_event(table, event, &mut w);
        }
        NodeStep::Grant => {
            let event = {
                let mut wd = world.borrow_mut();
                let (rev, epoch) = (wd.next_rev, wd.epoch);
                wd.next_rev += 1;
                let t = wd.task.as_mut().expect("offered");
                t.base = Some(rev << 24);
                Event::Granted {
                    key,
                    shared: t.shared,
                    base: rev << 24,
                    epoch,
                    prefetch: t.prefetch,
                }
            };
            push(event);
        }
        NodeStep::Callback => {
            world
                .borrow_mut()
                .task
                .as_mut()
                .expect("offered")
                .called_back = true;
            push(Event::Callback { key });
        }
        NodeStep::Hint => {
            world.borrow_mut().hinted = true;
            push(Event::Hint { key });
        }
        NodeStep::Prefetch => {
            world.borrow_mut().prefetched = true;
            s.m.prefetch_global(&key);
        }
        NodeStep::PastSafe => {
            let mut wd = world.borrow_mut();
            wd.now_ns = safe_until(wd.epoch);
        }
        NodeStep::Fence => {
            let epoch = {
                let mut wd = world.borrow_mut();
                wd.fenced = true;
                let epoch = wd.epoch;
                wd.new_session();
                epoch
            };
            push(Event::Fenced {
                epoch,
                reason: "the model's lease expired".into(),
            });
        }
        NodeStep::Tick => s.m.check_leases(table),
        NodeStep::HoldPasses => {
            let mut wd = world.borrow_mut();
            wd.holds_passed += 1;
            wd.hold_us += 1_000;
        }
        NodeStep::Stop => {
            s.m.give_up_node_grants(table);
            take_commands(s)?;
            // The agent revokes the lease: the key is free at etcd at once.
            none_standing(s, "the lease was revoked at a clean stop")?;
            let mut wd = world.borrow_mut();
            wd.new_session();
            wd.stopped = true;
            wd.events.clear();
        }
    }
    super::model::deliver(s, &mut w)
}

/// The agent takes the commands the gate sent during the last step, at
/// once (the soonest another host can take a released key).
pub fn take_commands(s: &mut State) -> Result<(), String> {
    let Some(c) = &s.cluster else {
        return Ok(());
    };
    let world = c.0.clone();
    let sent = std::mem::take(&mut world.borrow_mut().sent);
    for command in sent {
        let mut wd = world.borrow_mut();
        if wd.stopped {
            continue;
        }
        match command {
            Command::Want {
                shared, prefetch, ..
            } => {
                // As the agent: a Want while the key's task runs is ignored.
                if wd.task.is_none() {
                    wd.task = Some(Task {
                        shared,
                        prefetch,
                        base: None,
                        called_back: false,
                    });
                }
            }
            Command::Release { key, epoch } => {
                // Ignored when that lease's session is over, or no task runs.
                if epoch != wd.epoch || wd.task.is_none() {
                    continue;
                }
                let held = wd.task.take().is_some_and(|t| t.base.is_some());
                wd.events.push_back(Event::Released { key });
                drop(wd);
                if held {
                    none_standing(s, "the node grant was released at etcd")?;
                }
            }
            Command::Stop => unreachable!("only Agent::stop sends it"),
        }
    }
    Ok(())
}

/// Whether `r`, the answer to a holder's release or `Check`, says its hold
/// was lost.
pub fn is_lost(r: &Response) -> bool {
    matches!(
        r,
        Response::Error {
            code: ErrorCode::Lost,
            ..
        }
    )
}

/// G2: another host may hold the key from now on (`why`): no local hold of
/// it may still stand.
fn none_standing(s: &State, why: &str) -> Result<(), String> {
    if s.broken[GLOBAL] {
        return Ok(());
    }
    let table = super::model::view(&s.table_buf);
    for h in holds_of(s, GLOBAL) {
        let (client, slot, token) = (h.record, h.slot, h.token);
        let answer = s.m.check_hold(&table, client, slot, token);
        if !is_lost(&answer) {
            return Err(format!(
                "{why} while client {client}'s hold (slot {slot}, token {token:#x}) stands: \
                 Check answers {answer:?}"
            ));
        }
    }
    Ok(())
}

/// G1: lane `who` was just granted the global key with `token`.
pub fn check_grant(s: &State, who: Who, token: u64, shared: bool) -> Result<(), String> {
    let Some(c) = &s.cluster else {
        return Ok(());
    };
    let w = c.0.borrow();
    let ok = w.valid_grant().is_some_and(|(node_shared, base)| {
        (!node_shared || shared) && base < token && token <= base + COUNTER_MASK
    });
    if !ok {
        return Err(format!(
            "{who:?} was granted the global key (shared {shared}, token {token:#x}) without a \
             valid node grant: agent task {:?}, epoch {}, clock {} ns, safe until {} ns",
            w.task,
            w.epoch,
            w.now_ns,
            safe_until(w.epoch)
        ));
    }
    Ok(())
}

/// G4: whether a hold of the global key with `token` may be called lost:
/// the node grant it was granted under is gone or past its safe time.
pub fn lost_allowed(s: &State, token: u64) -> bool {
    let Some(c) = &s.cluster else {
        return false;
    };
    let w = c.0.borrow();
    !w.valid_grant()
        .is_some_and(|(_, base)| base < token && token <= base + COUNTER_MASK)
}

/// G3: without the node grant in the gate, no hold of the key stands.
pub fn check_standing(s: &State) -> Result<(), String> {
    if s.cluster.is_none() || s.broken[GLOBAL] || s.m.holds_node_grant(KEYS[GLOBAL]) {
        return Ok(());
    }
    none_standing(s, "the gate holds no node grant")
}
