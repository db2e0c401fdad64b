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
//! [`LockManager`] is one value with one job per file:
//!
//! - `directory`: the key directory (`Directory`): each slot's private
//!   state, the key map, the free list, the private mirror of the key index,
//!   placing and freeing keys, the keys seen recently and the keys whose
//!   owner died after their slot was freed. The slot life cycle is drawn
//!   there.
//! - `registry`: the client registry (`Registry`): client records, `Hello`,
//!   the per-uid [`Limits`], and liveness (a client is gone on its pidfd or
//!   its `Bye`, never because a connection closed).
//! - `engine`: the grant engine: acquire, release, cancel, the take-over of a
//!   prepared slot, grants and hand-offs with one admit rule
//!   (`Holder::admits`), the return to the fast path, the word mirror, and a
//!   closed connection's queued acquire.
//! - `adopt`: restart adoption: the manager rebuilt from the ledger over the
//!   table a dead broker left.
//! - `nodes`: the node gate: a global key is granted only under this
//!   host's node grant from etcd and a lease still safe (docs/cluster.md).
//! - `hooks`: the allocator's hooks: the tick, what the policy sees, prepare,
//!   contention preparation, eviction.
//! - `check` (tests only): the explorer's fork, digest and invariants.
//!
//! The broker's persisted truth, the [`Ledger`], is shared by all of them;
//! where a function writes both the ledger and the table, the order of the
//! stores is part of its contract (see each function's comment).

mod adopt;
mod directory;
mod engine;
mod hooks;
mod nodes;
mod registry;

#[cfg(any(test, feature = "model"))]
mod check;
#[cfg(any(test, feature = "model"))]
pub mod model;
#[cfg(any(test, feature = "model"))]
mod model_nodes;

use crate::config::Policy;
use crate::ledger::Ledger;
use directory::Directory;
use registry::Registry;
use shm_layout::lockword::Word;
use shm_layout::sync::shm::{AtomicU32, Ordering};
use shm_layout::table::TableView;
use shm_layout::wire::Response;
use std::collections::{HashMap, HashSet};

pub use nodes::{ClusterLink, NodeCounts};
pub use registry::Limits;

// What the tests' `use super::*` finds here besides the above.
#[cfg(test)]
use {
    shm_layout::events::EventsView,
    shm_layout::key_hash,
    shm_layout::table::{CELL_GRANTED, CELL_IDLE, CLIENT_FREE, GRANT_OWNER_DIED},
    shm_layout::wire::ErrorCode,
};

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
    /// The broker's persisted truth (see [`crate::ledger`]).
    ledger: Ledger,
    /// Keys and slots (see `directory`).
    dir: Directory,
    /// Client records (see `registry`).
    registry: Registry,
    /// Queued acquires by connection: the slot each waits on (the engine's).
    waiting: HashMap<ConnId, u32>,
    /// Keys the forecaster scored above the threshold at the last tick that
    /// were not prepared yet: a request for one of them arrived late.
    predicted: HashSet<u64>,
    now_ms: u64,
    /// The node gate of global keys, when clustering is on (see `nodes`).
    nodes: Option<nodes::Nodes>,
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

#[cfg(test)]
mod tests;

#[cfg(test)]
mod explore;
