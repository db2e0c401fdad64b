//! The client registry: client records (`Hello`), the per-uid [`Limits`],
//! and liveness. Liveness comes from the pidfd (or, at adoption, the
//! process's start time) and from the client's own `Bye`, never from its
//! connections: connections are transport, and a client may have none for a
//! while. A client that is gone has everything it held released, its
//! waiters dropped and its record freed.

use super::engine::Holder;
use super::{ConnId, LockManager, Registered, Waker};
use crate::ledger::{ClientEntry, Hold};
use shm_layout::lockword::{self, OWNER_DIED, Word};
use shm_layout::sync::shm::Ordering;
use shm_layout::table::{CELL_IDLE, CLIENT_ACTIVE, CLIENT_FREE, TableView, WAIT_CELLS};
use shm_layout::wire::ErrorCode;

/// A client record as the registry knows it. Liveness comes from the pidfd
/// (or, at adoption, the process's start time) only: connections are
/// transport, and a client may have none for a while.
#[derive(Debug, Default, Clone)]
pub(super) struct ClientState {
    pub(super) active: bool,
    pub(super) pid: u32,
    pub(super) uid: u32,
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

/// The client records, indexed like the table's.
#[derive(Debug, Clone)]
pub(super) struct Registry {
    pub(super) clients: Vec<ClientState>,
    pub(super) limits: Limits,
}

impl Registry {
    /// `client_count` free records.
    pub(super) fn new(client_count: u32, limits: Limits) -> Registry {
        Registry {
            clients: (0..client_count).map(|_| ClientState::default()).collect(),
            limits,
        }
    }

    /// Whether record `client` exists and is active (its process lives, as
    /// far as the broker knows).
    pub(super) fn is_active(&self, client: u32) -> bool {
        self.clients.get(client as usize).is_some_and(|c| c.active)
    }
}

impl LockManager {
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
                .registry
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
            .registry
            .clients
            .iter()
            .filter(|st| st.active && st.uid == uid)
            .count();
        if of_uid >= self.registry.limits.clients_per_uid as usize {
            return Err((
                ErrorCode::TooManyClients,
                format!(
                    "uid {uid} already has {of_uid} client records, its quota: share one Client \
                     per process, or raise access.max_clients_per_uid in the broker's configuration"
                ),
            ));
        }
        let Some(c) = self.registry.clients.iter().position(|st| !st.active) else {
            return Err((
                ErrorCode::TooManyClients,
                format!(
                    "all {} client records are in use: raise table.clients in the broker's \
                     configuration (takes effect with a new table)",
                    self.registry.clients.len()
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
        self.registry.clients[c] = ClientState {
            active: true,
            pid,
            uid,
        };
        table.header().stats.clients.fetch_add(1, Ordering::Relaxed);
        Ok(Registered::New { client: c as u32 })
    }

    /// The process behind record `client` died (pidfd), or its `Client` said
    /// `Bye`: release everything it held (the next holders are told the owner
    /// died: it never released those itself), drop its waiters, free the
    /// record.
    pub fn client_gone(&mut self, table: &TableView, client: u32, waker: &mut dyn Waker) {
        let Some(st) = self.registry.clients.get_mut(client as usize) else {
            return;
        };
        if !st.active {
            return;
        }
        *st = ClientState::default();
        let mut released = 0u64;
        let mut next = self.dir.next_keyed(0);
        while let Some(s) = next {
            let before = self.dir.slots[s as usize].queue.len();
            let gone: Vec<ConnId> = self.dir.slots[s as usize]
                .queue
                .iter()
                .filter(|w| w.client == client)
                .map(|w| w.conn)
                .collect();
            for conn in gone {
                self.waiting.remove(&conn);
            }
            self.dir.slots[s as usize]
                .queue
                .retain(|w| w.client != client);
            let mut touched = before != self.dir.slots[s as usize].queue.len();
            let slot = table.slot(s).expect("s < slot_count");
            if self.dir.slots[s as usize].managed {
                let st = &mut self.dir.slots[s as usize];
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
                        super::engine::wake_contended(slot, w, waker);
                        break;
                    }
                }
                // Its ledger records go below, with all the others.
                let st = &mut self.dir.slots[s as usize];
                if st.fast_grant.is_some_and(|(c, _)| c == client) {
                    st.fast_grant = None;
                }
            }
            if touched {
                self.mirror(table, s);
                self.dispatch(table, s, waker);
            }
            next = self.dir.next_keyed(s + 1);
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

    /// Active client records and their pids (to watch them after adoption).
    pub fn active_clients(&self) -> Vec<(u32, u32)> {
        self.registry
            .clients
            .iter()
            .enumerate()
            .filter(|(_, c)| c.active)
            .map(|(i, c)| (i as u32, c.pid))
            .collect()
    }
}
