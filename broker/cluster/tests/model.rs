//! A model of the node-grant protocol of docs/cluster.md, checked exhaustively
//! (within a bound) with stateright.
//!
//! # What is modelled
//!
//! * **etcd** is one linearizable store: a revision counter, leases, and the
//!   lock keys `P/lock/K/<r|w>/<lease>` of one key `K`, each with its owner
//!   lease, mode and create revision. Every request is applied atomically in
//!   one step ([`Action::EtcdApply`]), which is what linearizability gives.
//! * **3 hosts**, each a broker with: its current lease (or none: fenced or
//!   just restarted), a node-grant phase for `K`
//!   (idle / queuing / waiting / confirming / held / releasing; "held" carries
//!   the token base `R`, the counter `n`, the callback and draining flags and
//!   the lock-delay), the prefetched and used flags, and **one request slot to
//!   etcd and one answer slot back** (the network).
//! * **2 local clients per host**: idle, waiting, holding a token, or holding a
//!   *lost* hold (the broker fenced or restarted under it: the process may
//!   still run, only its token protects the resource).
//!
//! # Actions, mapped to docs/cluster.md
//!
//! | action | design step |
//! |---|---|
//! | `Acquire`, `Unlock` | a local process asks for / lets go of `K` |
//! | `Prefetch` | "Prediction across hosts": queue with no local waiter |
//! | (reaction) queue | step 1, **Queue**: a host with local waiters and no node grant queues at once (also after a release or a new lease) |
//! | `Send` | an RPC: etcd applies it at once (its linearization point); the answer is then in flight. Also the retry after a loss. A lost request is a request not sent yet |
//! | `Deliver`, `DropReply` | the answer arrives (and the host sends its next request at once), or is lost |
//! | etcd applies `Queue` | step 1 (`etcd_lock::queue_and_look`): one flat txn puts the key on the lease; its create revision `C` is the place (a retry finds the key, writes it again, and answers its `C`). In the same txn: with no conflicting key before it, the host has **won and is confirmed** at once (token base `R = C`, held marker, stale markers read: steps 2-4); else it answers the predecessor to watch |
//! | etcd applies `Check` | step 2, **Wait**: blocked by an earlier conflicting key (answers the last one, the predecessor it watches), or **won**: the grant check against create revisions. A writer's check also confirms in the same txn when it wins (`etcd_lock::confirm_if_first`: a range compare on create revisions); a reader wins, then confirms |
//! | etcd applies `Confirm` | step 3, **Confirm**: txn guarded by `create_revision(own) == C`; its revision is the token base `R` |
//! | (reaction) reconfirm | step 3: when `n` would pass its limit (`n_max` here, `2^20 - 1` in the design) the host confirms again |
//! | `LockDelayElapsed` | step 4, **Lock-delay** |
//! | (reaction) local grant | local waiters are granted in order, token `R << 20 \| n` (the pair `(R, n)` here) |
//! | `Callback` | step 5: the holder's watch sees a later conflicting key; an unused prefetch **yields** at once |
//! | `Drain` | step 5: stop granting locally (callback past `min_hold`, or idle, or a local writer behind a shared node grant) |
//! | (reaction) release; etcd applies `Release` | step 5, **release**: once drained, one txn deletes the own key and writes the clean-release marker |
//! | `Fence` | "Leases and the self-fence": stop granting, holds become lost, abandon the lease |
//! | `Crash` | broker crash and restart: node-grant state gone, local holders survive with lost holds, waiting requests fail |
//! | `NewLease` | the (restarted or fenced) broker takes a new lease |
//! | `Expire` | etcd expires (or a fenced broker revokes) a lease: its keys go, uncleanly |
//! | `LateApply` | "Late copies of a step": etcd applies a copy of a host's queue (or stray-removal) request sent beside the first (hedged or retried) at any later time, its answer ignored; a queue copy applied after the host released puts a *stray* entry back |
//! | `RemoveStray` | the clean-up: a host whose entry a waiter names (the waiter's last check answered it as its blocker) and that does not want the key in that mode deletes it, guarded by the revision it read, with its held marker if that names the entry (`etcd_lock::remove_stray`); a copy of the removal may itself be applied late |
//!
//! A "reaction" is what a broker does with no choice to make, in the same
//! step as whatever enabled it ([`NodeGrantModel::react`]).
//!
//! # The timing assumptions, explicit
//!
//! Time is not modelled; the two things the clocks buy are guards:
//!
//! * **A, `fence_before_expiry`**: etcd expires lease `(h, e)` only after host
//!   `h` has stopped using it (fenced, crashed). This is what the self-fence at
//!   `t + TTL * (1 - max_clock_drift) - fence_margin` on the broker's own
//!   monotonic clock buys, given bounded clock-rate drift.
//! * **B, `lock_delay_covers_late_fence`**: when a host must wait the
//!   lock-delay because of an unclean deletion by lease `(h, e)`, the delay
//!   ends only after `h` stopped using `(h, e)`. This is what lock-delay buys
//!   when A fails by less than `lock_delay` (a broker that fences late).
//!
//! With A the protocol is safe. Without A and without B the checker finds two
//! hosts holding at once (test `without_the_timing_assumption_two_hosts_hold`):
//! the model can fail.
//!
//! # A flaw found: lock-delay as written does not cover a late fence
//!
//! docs/cluster.md step 4 decides the lock-delay from "the last predecessor
//! this host saw go away". With B but without A (a broker whose self-fence is
//! late, by less than `lock_delay`), that rule lets a second holder in; the
//! shortest trace (test `lock_delay_as_written_misses_a_late_fence`):
//!
//! 1. h0 queues, wins and confirms in its one queue txn (`C = R = 2`); its
//!    answer is on the way back.
//! 2. etcd expires h0's lease (revision 3; h0 has not fenced yet: the late
//!    fence).
//! 3. h1 queues now (`C = R = 4`): no key before its own, it never saw a
//!    predecessor go away, so it wins, confirms and grants **without
//!    lock-delay**; h0's answer arrives and h0 grants too. Two hosts hold `K`.
//!
//! As checker actions: `Acquire(0, 0)`, `Expire(h0's lease)`, `Acquire(1, 0)`,
//! `Deliver(1)`, `Deliver(0)`. (Found when queue, check and confirm were
//! three requests, with `Deliver(0)` x3 and `Deliver(1)` x3; the one-txn
//! queue shortened it.) Without B as well the same trace breaks mutual
//! exclusion, and so would any lock-delay rule.
//!
//! Two more holes of the same rule, found by reading, not yet shown by the
//! checker (their traces are deeper than the CI bound): a waiter in its
//! lock-delay that releases cleanly (min_hold passed, nothing granted yet, or
//! an unused prefetch yielding) makes the *next* waiter see a clean release
//! and skip the delay; and a writer behind two readers watches only the last
//! reader, so an earlier reader's unclean expiry goes unseen.
//!
//! **Fix, modelled as [`LockDelayRule::HeldMarkers`]:** the confirm txn also
//! creates a persistent (lease-less) marker `P/held/K/<lease>`; the release
//! txn deletes it together with the lock key. So a marker whose lock key is
//! gone is exactly a confirmed holder that went away *without* a clean
//! release, whenever and however that happened. The confirm txn reads
//! `P/held/K/` and the host waits `lock_delay` if any other marker is stale;
//! it deletes those stale markers (in its release txn) only after its delay
//! has elapsed, so a host that crashes or yields during its delay passes the
//! duty on. With B and without A the fixed protocol holds
//! (test `lock_delay_with_held_markers_covers_a_late_fence`).
//!
//! # Simplifications (what is left out)
//!
//! * One key; one request in flight per host (a request of a dead incarnation
//!   still in the network blocks the next one until etcd applies it or it is
//!   lost; so requests of one host are never reordered).
//! * Watches are polled: a waiter re-sends `Check`, a holder's callback fires
//!   whenever a later conflicting key exists (a late or lost watch event only
//!   delays; the knock that wakes the agent's holder only wakes, the keys
//!   decide). The predecessor a waiter "saw go away" is the one its last
//!   `Check` answered.
//! * Time is only the two guards above; `min_hold` is nondeterminism (a drain
//!   may start at any time after the callback).
//! * Revoke on fence is folded into `Expire` (both delete the keys
//!   uncleanly, after the fence), and so is a clean stop's revoke: the
//!   stopping broker gives every node grant up first, as `Fence` does,
//!   then revokes. Gossip is left out: it never decides ownership.
//! * etcd itself (raft, leader change) is one atomic store: its TTL being a
//!   minimum only makes `Expire` later, which the model already allows.
//!
//! # Bounds
//!
//! The safety checks run depth-first with the symmetry reduction (hosts are
//! interchangeable; so are a host's clients when they want the same mode) to
//! a depth bound, with etcd revisions bounded (every write takes one) and at
//! most `max_faults` fences, crashes or early expiries. Depth-first with a
//! depth cap is a bounded search: a state first met deep is not expanded
//! again when met shallower. The counterexample and reachability checks run
//! breadth-first (shortest traces) on two hosts, which is all they need.
//! The CI bound is [`CI_BOUND`]; `FORELOCK_CLUSTER_MODEL_DEPTH=<depth>` (and
//! optionally `FORELOCK_CLUSTER_MODEL_REVISIONS=<max revision>`,
//! `FORELOCK_CLUSTER_MODEL_FAULTS=<n>`) run the safety checks with a bigger
//! bound:
//!
//! ```sh
//! FORELOCK_CLUSTER_MODEL_DEPTH=13 FORELOCK_CLUSTER_MODEL_REVISIONS=12 \
//!   FORELOCK_CLUSTER_MODEL_FAULTS=2 \
//!   cargo test -p forelock-cluster --test model -- --nocapture
//! ```

use stateright::{Checker, HasDiscoveries, Model, Property};
use std::time::Instant;

/// An etcd revision (bounded by the model, so a byte is enough).
type Rev = u8;

/// A fencing token `R << 20 | n`, kept as the pair `(R, n)`: ordered the same
/// way as long as `n < 2^20`.
type Token = (Rev, u8);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Mode {
    Shared,
    Exclusive,
}

fn conflicts(a: Mode, b: Mode) -> bool {
    a == Mode::Exclusive || b == Mode::Exclusive
}

/// A lease: host `host`'s `epoch`-th lease (lease ids are unique in etcd).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Lease {
    host: u8,
    epoch: u8,
}

/// `P/lock/K/<mode>/<lease>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct LockKey {
    owner: Lease,
    mode: Mode,
    create: Rev,
}

/// A deleted lock key, and whether `P/rel/K` named its lease in the revision
/// that deleted it (a clean release). The waiter's watch and its read of
/// `P/rel/K` at the delete revision see exactly this.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Deleted {
    create: Rev,
    owner: Lease,
    clean: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Etcd {
    rev: Rev,
    leases: Vec<Lease>,
    keys: Vec<LockKey>,
    /// History of deleted lock keys (only kept for the as-written rule).
    deleted: Vec<Deleted>,
    /// `P/held/K/<lease>` markers (only for the fixed rule), with the
    /// mode of the entry each names (its value).
    held: Vec<(Lease, Mode)>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Request {
    Queue(Mode),
    Check {
        create: Rev,
        pred: Option<Rev>,
    },
    Confirm {
        create: Rev,
    },
    Release {
        create: Rev,
        clear: Vec<Lease>,
    },
    /// Delete our stray entry in `mode` (created at `seen`).
    RemoveStray {
        mode: Mode,
        seen: Option<Rev>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Reply {
    /// The own key was there already (a retried queue txn).
    Queued(Rev),
    /// Queued at `create` behind the conflicting key created at `pred`.
    QueuedBehind {
        create: Rev,
        pred: Rev,
    },
    /// Queued at `create` with nothing conflicting before: won and
    /// confirmed in the same txn, token base `create`.
    QueuedConfirmed {
        create: Rev,
        stale: Vec<Lease>,
    },
    Blocked(Rev),
    Won {
        delay: Vec<Lease>,
    },
    Confirmed {
        base: Rev,
        stale: Vec<Lease>,
    },
    Released,
    /// The own key (or the lease) is gone at etcd.
    Gone,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Held {
    mode: Mode,
    create: Rev,
    base: Rev,
    n: u8,
    /// Leases whose unclean end this host must wait out (lock-delay).
    delay: Vec<Lease>,
    delay_done: bool,
    callback: bool,
    draining: bool,
    reconfirming: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Phase {
    Idle,
    Queuing(Mode),
    Waiting {
        mode: Mode,
        create: Rev,
        pred: Option<Rev>,
    },
    Confirming {
        mode: Mode,
        create: Rev,
        delay: Vec<Lease>,
    },
    Held(Held),
    Releasing {
        create: Rev,
        clear: Vec<Lease>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Client {
    Idle,
    Waiting,
    Holding { token: Token, lost: bool },
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Host {
    /// The lease this broker uses; `None` once fenced or restarted.
    lease: Option<u8>,
    next_epoch: u8,
    phase: Phase,
    prefetched: bool,
    used: bool,
    /// Network: the answer on its way back from etcd, tagged with the lease
    /// (epoch) of the incarnation that sent the request. A request that is
    /// lost is one not sent yet: `Send` applies it at etcd in one step.
    reply: Option<(u8, Reply)>,
    /// Network: a copy of a request sent again beside the first (hedged,
    /// or retried after a timeout) that etcd has not applied yet and may
    /// apply at any later time, tagged with its lease (epoch); its answer
    /// is ignored (the first answer was taken).
    late: Option<(u8, Request)>,
    clients: Vec<Client>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct State {
    /// Constant: are the clients of a host of different modes? (If not, they
    /// are interchangeable and the symmetry reduction sorts them.)
    shared: bool,
    etcd: Etcd,
    hosts: Vec<Host>,
    faults: u8,
    /// The highest token granted so far, and the highest exclusive one.
    max_token: Token,
    max_exclusive_token: Token,
    /// False once a grant carried a token not above the ones it must exceed.
    tokens_increase: bool,
    last_grant_host: Option<u8>,
    /// Grants on a host other than the previous grant's (saturates at 2).
    transfers: u8,
    yielded: bool,
    lock_delay_waited: bool,
    /// A stray entry was removed by its host.
    stray_removed: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Action {
    Acquire(u8, u8),
    Unlock(u8, u8),
    Prefetch(u8),
    Send(u8),
    Deliver(u8),
    DropReply(u8),
    LockDelayElapsed(u8),
    Callback(u8),
    Drain(u8),
    Fence(u8),
    Crash(u8),
    NewLease(u8),
    Expire(Lease),
    /// etcd applies the host's late copy of a request.
    LateApply(u8),
    /// The host deletes its stray entry in this mode (a waiter named it).
    RemoveStray(u8, Mode),
}

/// How a winner decides whether it must wait the lock-delay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LockDelayRule {
    /// docs/cluster.md step 4: the last predecessor this host saw go away was
    /// deleted without `P/rel/K` naming it.
    LastPredecessor,
    /// The fix: persistent `P/held/K/<lease>` markers (see the header).
    HeldMarkers,
}

#[derive(Clone, Debug)]
struct NodeGrantModel {
    hosts: u8,
    clients: u8,
    /// Client 0 of each host wants `w`, client 1 `r` (else all want `w`).
    shared: bool,
    fence_before_expiry: bool,
    lock_delay_covers_late_fence: bool,
    rule: LockDelayRule,
    max_rev: Rev,
    max_faults: u8,
    /// Local grants per confirm before the host must confirm again.
    n_max: u8,
    /// Late copies of the queue and stray-removal requests.
    late_copies: bool,
    /// How a host deletes a stray entry a waiter names: never (the
    /// residue before the clean-up), guarded by what it read, or
    /// unguarded (negative control).
    clean_up: CleanUp,
}

/// How a host deletes its stray entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CleanUp {
    Never,
    Guarded,
    Unguarded,
}

impl NodeGrantModel {
    fn client_mode(&self, client: u8) -> Mode {
        if self.shared && client % 2 == 1 {
            Mode::Shared
        } else {
            Mode::Exclusive
        }
    }

    /// etcd applies one request from lease `who`, atomically.
    fn apply(&self, etcd: &mut Etcd, who: Lease, request: &Request) -> Reply {
        let own = |etcd: &Etcd, create: Rev| {
            etcd.keys
                .iter()
                .position(|k| k.owner == who && k.create == create)
        };
        match request {
            Request::Queue(mode) => {
                // etcd_lock::queue_and_look, one flat txn: if
                // create_revision(own) == 0 and no conflicting entry (a range
                // compare) then { put(own, lease); put(marker); get(markers) }
                // else { put(own, lease); get(own); get(newest conflicting);
                // get(oldest) }. A retry (own there) writes own again, which
                // keeps its create revision: a revision, nothing else.
                if let Some(k) = etcd.keys.iter().find(|k| k.owner == who && k.mode == *mode) {
                    let create = k.create;
                    etcd.rev += 1;
                    return Reply::Queued(create);
                }
                if !etcd.leases.contains(&who) {
                    return Reply::Gone;
                }
                etcd.rev += 1;
                let create = etcd.rev;
                let blocking = etcd
                    .keys
                    .iter()
                    .filter(|k| conflicts(k.mode, *mode))
                    .map(|k| k.create)
                    .max();
                etcd.keys.push(LockKey {
                    owner: who,
                    mode: *mode,
                    create,
                });
                if let Some(pred) = blocking {
                    return Reply::QueuedBehind { create, pred };
                }
                // Won in the same revision: confirmed, token base = create
                // (steps 2-4 with nothing to wait for; no predecessor seen).
                let stale = self.mark_held(etcd, who, *mode);
                Reply::QueuedConfirmed { create, stale }
            }
            Request::Check { create, pred } => {
                let Some(i) = own(etcd, *create) else {
                    return Reply::Gone;
                };
                let me = etcd.keys[i];
                let blocking = etcd
                    .keys
                    .iter()
                    .filter(|k| k.create < me.create && conflicts(k.mode, me.mode))
                    .map(|k| k.create)
                    .max();
                if let Some(p) = blocking {
                    return Reply::Blocked(p);
                }
                let delay = match self.rule {
                    LockDelayRule::LastPredecessor => pred
                        .and_then(|p| etcd.deleted.iter().find(|d| d.create == p))
                        .filter(|d| !d.clean)
                        .map(|d| vec![d.owner])
                        .unwrap_or_default(),
                    LockDelayRule::HeldMarkers => Vec::new(),
                };
                if me.mode == Mode::Shared {
                    return Reply::Won { delay };
                }
                // A writer's Check is etcd_lock::confirm_if_first: the same
                // txn confirms when nothing is before it.
                let Reply::Confirmed { base, mut stale } =
                    self.apply(etcd, who, &Request::Confirm { create: *create })
                else {
                    unreachable!("our key is there: the confirm applies");
                };
                stale.extend(delay);
                stale.sort();
                stale.dedup();
                Reply::Confirmed { base, stale }
            }
            Request::Confirm { create } => {
                let Some(i) = own(etcd, *create) else {
                    return Reply::Gone;
                };
                etcd.rev += 1;
                let stale = self.mark_held(etcd, who, etcd.keys[i].mode);
                Reply::Confirmed {
                    base: etcd.rev,
                    stale,
                }
            }
            Request::Release { create, clear } => {
                let Some(i) = own(etcd, *create) else {
                    return Reply::Gone;
                };
                etcd.rev += 1;
                let key = etcd.keys.remove(i);
                match self.rule {
                    LockDelayRule::LastPredecessor => etcd.deleted.push(Deleted {
                        create: key.create,
                        owner: who,
                        clean: true,
                    }),
                    LockDelayRule::HeldMarkers => {
                        etcd.held.retain(|(l, _)| *l != who && !clear.contains(l));
                    }
                }
                Reply::Released
            }
            Request::RemoveStray { mode, seen } => {
                // etcd_lock::remove_stray: delete our entry in `mode` if it
                // is still the one read (`seen`: its create revision, as
                // the model never writes an entry again under another
                // one; `None`: unguarded, the negative control), with our
                // held marker if it names that entry.
                let Some(i) = etcd.keys.iter().position(|k| {
                    k.owner == who && k.mode == *mode && seen.is_none_or(|c| k.create == c)
                }) else {
                    return Reply::Released;
                };
                etcd.rev += 1;
                let key = etcd.keys.remove(i);
                etcd.held.retain(|m| *m != (who, *mode));
                if self.rule == LockDelayRule::LastPredecessor {
                    etcd.deleted.push(Deleted {
                        create: key.create,
                        owner: who,
                        clean: true,
                    });
                }
                Reply::Released
            }
        }
    }

    /// The held marker of a confirm (step 4, [`LockDelayRule::HeldMarkers`]):
    /// writes ours (its value names our entry: `mode`) and answers the
    /// stale ones, whose entry is gone.
    fn mark_held(&self, etcd: &mut Etcd, who: Lease, mode: Mode) -> Vec<Lease> {
        if self.rule != LockDelayRule::HeldMarkers {
            return Vec::new();
        }
        let stale = etcd
            .held
            .iter()
            .filter(|(l, m)| *l != who && !etcd.keys.iter().any(|k| k.owner == *l && k.mode == *m))
            .map(|(l, _)| *l)
            .collect();
        etcd.held.retain(|(l, _)| *l != who);
        etcd.held.push((who, mode));
        etcd.held.sort();
        stale
    }

    /// The self-fence (and the state a restarted broker starts from): stop
    /// granting, every local hold becomes lost, abandon the lease.
    fn fence(host: &mut Host) {
        host.lease = None;
        host.phase = Phase::Idle;
        host.prefetched = false;
        host.used = false;
        host.reply = None;
        for c in host.clients.iter_mut() {
            if let Client::Holding { lost, .. } = c {
                *lost = true;
            }
        }
    }

    fn request_wanted(host: &Host) -> Option<Request> {
        match &host.phase {
            Phase::Idle => None,
            Phase::Queuing(mode) => Some(Request::Queue(*mode)),
            Phase::Waiting { create, pred, .. } => Some(Request::Check {
                create: *create,
                pred: *pred,
            }),
            Phase::Confirming { create, .. } => Some(Request::Confirm { create: *create }),
            Phase::Held(h) if h.reconfirming => Some(Request::Confirm { create: h.create }),
            Phase::Held(_) => None,
            Phase::Releasing { create, clear } => Some(Request::Release {
                create: *create,
                clear: clear.clone(),
            }),
        }
    }

    fn live_holder(host: &Host, c: &Client) -> bool {
        host.lease.is_some() && matches!(c, Client::Holding { lost: false, .. })
    }

    /// May client `c` of `host` be granted now?
    fn grantable(&self, host: &Host, c: u8) -> bool {
        if host.lease.is_none() || host.clients[c as usize] != Client::Waiting {
            return false;
        }
        let Phase::Held(h) = &host.phase else {
            return false;
        };
        let mode = self.client_mode(c);
        let node_covers = h.mode == Mode::Exclusive || mode == Mode::Shared;
        let local_free = host.clients.iter().enumerate().all(|(d, other)| {
            !Self::live_holder(host, other) || !conflicts(mode, self.client_mode(d as u8))
        });
        !h.draining
            && !h.reconfirming
            && h.delay_done
            && h.n < self.n_max
            && node_covers
            && local_free
    }

    fn wants_exclusive(&self, host: &Host) -> bool {
        host.clients
            .iter()
            .enumerate()
            .any(|(c, cl)| *cl == Client::Waiting && self.client_mode(c as u8) == Mode::Exclusive)
    }

    fn has_waiter(host: &Host) -> bool {
        host.clients.contains(&Client::Waiting)
    }

    /// What a broker does at once after any step, with no choice to make:
    /// queue when local processes wait and there is no node grant; grant
    /// local waiters in order (taking a new token base when `n` runs out);
    /// release a drained node grant; send the request its phase wants.
    fn react(&self, s: &mut State, h: u8) {
        let wants_exclusive = self.wants_exclusive(&s.hosts[h as usize]);
        let host = &mut s.hosts[h as usize];
        if host.lease.is_none() {
            return;
        }
        if host.phase == Phase::Idle && Self::has_waiter(host) {
            let mode = if wants_exclusive {
                Mode::Exclusive
            } else {
                Mode::Shared
            };
            host.phase = Phase::Queuing(mode);
            host.prefetched = false;
            host.used = false;
        }
        for c in 0..self.clients {
            if !self.grantable(&s.hosts[h as usize], c) {
                continue;
            }
            let mode = self.client_mode(c);
            let host = &mut s.hosts[h as usize];
            let Phase::Held(held) = &mut host.phase else {
                break;
            };
            held.n += 1;
            let token = (held.base, held.n);
            host.used = true;
            host.clients[c as usize] = Client::Holding { token, lost: false };
            let must_exceed = match mode {
                Mode::Exclusive => s.max_token,
                Mode::Shared => s.max_exclusive_token,
            };
            if token <= must_exceed {
                s.tokens_increase = false;
            }
            s.max_token = s.max_token.max(token);
            if mode == Mode::Exclusive {
                s.max_exclusive_token = s.max_exclusive_token.max(token);
            }
            if s.last_grant_host.is_some_and(|last| last != h) {
                s.transfers = (s.transfers + 1).min(2);
            }
            s.last_grant_host = Some(h);
        }
        let host = &mut s.hosts[h as usize];
        let waiting = Self::has_waiter(host);
        let live = Self::has_live_holder(host);
        if let Phase::Held(held) = &mut host.phase {
            if !held.draining && !held.reconfirming && held.n >= self.n_max && waiting {
                held.reconfirming = true;
            }
            if held.draining && !held.reconfirming && !live {
                // Stale markers are cleared only once their lock-delay was
                // waited out here; else the next winner must wait it.
                let clear = if held.delay_done {
                    held.delay.clone()
                } else {
                    Vec::new()
                };
                host.phase = Phase::Releasing {
                    create: held.create,
                    clear,
                };
            }
        }
        self.send(s, h);
    }

    /// The host sends the request its phase wants; etcd applies it at once
    /// (its linearization point) and the answer is on its way back.
    fn send(&self, s: &mut State, h: u8) {
        let host = &s.hosts[h as usize];
        let (Some(epoch), None, Some(request)) =
            (host.lease, &host.reply, Self::request_wanted(host))
        else {
            return;
        };
        let reply = self.apply(&mut s.etcd, Lease { host: h, epoch }, &request);
        let host = &mut s.hosts[h as usize];
        host.reply = Some((epoch, reply));
        if self.late_copies && host.late.is_none() && matches!(request, Request::Queue(_)) {
            host.late = Some((epoch, request));
        }
    }

    /// The mode of host `h`'s entry `k` when it is a stray that a waiter
    /// names: of `h`'s live lease, not the entry of `h`'s node grant
    /// (no want of the key in that mode), and some host waits for it (its
    /// last read answered it as the blocker).
    fn stray_named(s: &State, h: u8, k: &LockKey) -> bool {
        let host = &s.hosts[h as usize];
        let owned = match &host.phase {
            Phase::Idle => false,
            Phase::Queuing(mode)
            | Phase::Waiting { mode, .. }
            | Phase::Confirming { mode, .. }
            | Phase::Held(Held { mode, .. }) => *mode == k.mode,
            Phase::Releasing { create, .. } => *create == k.create,
        };
        k.owner.host == h
            && host.lease == Some(k.owner.epoch)
            && !owned
            && s.hosts
                .iter()
                .any(|w| matches!(w.phase, Phase::Waiting { pred: Some(p), .. } if p == k.create))
    }

    fn has_live_holder(host: &Host) -> bool {
        host.clients.iter().any(|c| Self::live_holder(host, c))
    }
}

impl Model for NodeGrantModel {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        let hosts = (0..self.hosts)
            .map(|_| Host {
                lease: Some(0),
                next_epoch: 1,
                phase: Phase::Idle,
                prefetched: false,
                used: false,
                reply: None,
                late: None,
                clients: vec![Client::Idle; self.clients as usize],
            })
            .collect();
        vec![State {
            shared: self.shared,
            etcd: Etcd {
                rev: 1,
                leases: (0..self.hosts)
                    .map(|host| Lease { host, epoch: 0 })
                    .collect(),
                keys: Vec::new(),
                deleted: Vec::new(),
                held: Vec::new(),
            },
            hosts,
            faults: 0,
            max_token: (0, 0),
            max_exclusive_token: (0, 0),
            tokens_increase: true,
            last_grant_host: None,
            transfers: 0,
            yielded: false,
            lock_delay_waited: false,
            stray_removed: false,
        }]
    }

    fn actions(&self, state: &State, actions: &mut Vec<Action>) {
        let faults_left = state.faults < self.max_faults;
        for (hi, host) in state.hosts.iter().enumerate() {
            let h = hi as u8;
            for c in 0..self.clients {
                match host.clients[c as usize] {
                    Client::Idle => actions.push(Action::Acquire(h, c)),
                    Client::Waiting => {}
                    Client::Holding { .. } => actions.push(Action::Unlock(h, c)),
                }
            }
            if host.lease.is_some() {
                if host.phase == Phase::Idle && !Self::has_waiter(host) {
                    actions.push(Action::Prefetch(h));
                }
                if host.reply.is_none() && Self::request_wanted(host).is_some() {
                    actions.push(Action::Send(h));
                }
                if let Phase::Held(held) = &host.phase {
                    if !held.delay_done {
                        let fenced =
                            |l: &Lease| state.hosts[l.host as usize].lease != Some(l.epoch);
                        if !self.lock_delay_covers_late_fence || held.delay.iter().all(fenced) {
                            actions.push(Action::LockDelayElapsed(h));
                        }
                    }
                    if !held.callback
                        && state
                            .etcd
                            .keys
                            .iter()
                            .any(|k| k.create > held.create && conflicts(k.mode, held.mode))
                    {
                        actions.push(Action::Callback(h));
                    }
                    let idle = !Self::has_waiter(host) && !Self::has_live_holder(host);
                    let upgrade = held.mode == Mode::Shared && self.wants_exclusive(host);
                    if !held.draining && !held.reconfirming && (held.callback || idle || upgrade) {
                        actions.push(Action::Drain(h));
                    }
                }
                if faults_left {
                    actions.push(Action::Fence(h));
                    actions.push(Action::Crash(h));
                }
            } else {
                actions.push(Action::NewLease(h));
            }
            if host.reply.is_some() {
                actions.push(Action::Deliver(h));
                actions.push(Action::DropReply(h));
            }
        }
        for (hi, host) in state.hosts.iter().enumerate() {
            if host.late.is_some() {
                actions.push(Action::LateApply(hi as u8));
            }
            if self.clean_up != CleanUp::Never {
                for k in &state.etcd.keys {
                    if Self::stray_named(state, hi as u8, k) {
                        actions.push(Action::RemoveStray(hi as u8, k.mode));
                    }
                }
            }
        }
        for l in &state.etcd.leases {
            let in_use = state.hosts[l.host as usize].lease == Some(l.epoch);
            if !in_use || (!self.fence_before_expiry && faults_left) {
                actions.push(Action::Expire(*l));
            }
        }
    }

    fn next_state(&self, state: &State, action: Action) -> Option<State> {
        let mut s = state.clone();
        let host_of_action = match action {
            Action::Acquire(h, _)
            | Action::Unlock(h, _)
            | Action::Prefetch(h)
            | Action::Send(h)
            | Action::Deliver(h)
            | Action::DropReply(h)
            | Action::LockDelayElapsed(h)
            | Action::Callback(h)
            | Action::Drain(h)
            | Action::Fence(h)
            | Action::Crash(h)
            | Action::NewLease(h) => Some(h),
            Action::Expire(_) | Action::LateApply(_) | Action::RemoveStray(..) => None,
        };
        match action {
            Action::Acquire(h, c) => s.hosts[h as usize].clients[c as usize] = Client::Waiting,
            Action::Unlock(h, c) => s.hosts[h as usize].clients[c as usize] = Client::Idle,
            Action::Prefetch(h) => {
                let host = &mut s.hosts[h as usize];
                host.phase = Phase::Queuing(Mode::Exclusive);
                host.prefetched = true;
                host.used = false;
            }
            Action::Send(_) => {}
            Action::DropReply(h) => s.hosts[h as usize].reply = None,
            Action::Deliver(h) => {
                let host = &mut s.hosts[h as usize];
                let (epoch, reply) = host.reply.take()?;
                if host.lease != Some(epoch) {
                    // An answer to a dead incarnation or an abandoned lease.
                    return Some(s);
                }
                let phase = std::mem::replace(&mut host.phase, Phase::Idle);
                host.phase = match (phase, reply) {
                    (Phase::Queuing(mode), Reply::Queued(create)) => Phase::Waiting {
                        mode,
                        create,
                        pred: None,
                    },
                    (Phase::Queuing(mode), Reply::QueuedBehind { create, pred }) => {
                        Phase::Waiting {
                            mode,
                            create,
                            pred: Some(pred),
                        }
                    }
                    (Phase::Queuing(mode), Reply::QueuedConfirmed { create, mut stale }) => {
                        stale.sort();
                        if !stale.is_empty() {
                            s.lock_delay_waited = true;
                        }
                        Phase::Held(Held {
                            mode,
                            create,
                            base: create,
                            n: 0,
                            delay_done: stale.is_empty(),
                            delay: stale,
                            callback: false,
                            draining: false,
                            reconfirming: false,
                        })
                    }
                    (Phase::Waiting { mode, create, .. }, Reply::Blocked(p)) => Phase::Waiting {
                        mode,
                        create,
                        pred: Some(p),
                    },
                    (Phase::Waiting { mode, create, .. }, Reply::Confirmed { base, stale }) => {
                        if !stale.is_empty() {
                            s.lock_delay_waited = true;
                        }
                        Phase::Held(Held {
                            mode,
                            create,
                            base,
                            n: 0,
                            delay_done: stale.is_empty(),
                            delay: stale,
                            callback: false,
                            draining: false,
                            reconfirming: false,
                        })
                    }
                    (Phase::Waiting { mode, create, .. }, Reply::Won { delay }) => {
                        Phase::Confirming {
                            mode,
                            create,
                            delay,
                        }
                    }
                    (
                        Phase::Confirming {
                            mode,
                            create,
                            mut delay,
                        },
                        Reply::Confirmed { base, stale },
                    ) => {
                        delay.extend(stale);
                        delay.sort();
                        delay.dedup();
                        if !delay.is_empty() {
                            s.lock_delay_waited = true;
                        }
                        Phase::Held(Held {
                            mode,
                            create,
                            base,
                            n: 0,
                            delay_done: delay.is_empty(),
                            delay,
                            callback: false,
                            draining: false,
                            reconfirming: false,
                        })
                    }
                    (Phase::Held(mut held), Reply::Confirmed { base, .. }) if held.reconfirming => {
                        held.base = base;
                        held.n = 0;
                        held.reconfirming = false;
                        Phase::Held(held)
                    }
                    (Phase::Releasing { .. }, Reply::Released | Reply::Gone) => {
                        host.prefetched = false;
                        host.used = false;
                        Phase::Idle
                    }
                    (_, Reply::Gone) => {
                        // etcd says the lease or the own key is gone: fence.
                        Self::fence(host);
                        Phase::Idle
                    }
                    (phase, _) => phase,
                };
            }
            Action::LockDelayElapsed(h) => {
                if let Phase::Held(held) = &mut s.hosts[h as usize].phase {
                    held.delay_done = true;
                }
            }
            Action::Callback(h) => {
                let host = &mut s.hosts[h as usize];
                if let Phase::Held(held) = &mut host.phase {
                    held.callback = true;
                    if host.prefetched && !host.used && !held.reconfirming {
                        // An unused prefetch yields at once: no min_hold.
                        held.draining = true;
                        s.yielded = true;
                    }
                }
            }
            Action::Drain(h) => {
                if let Phase::Held(held) = &mut s.hosts[h as usize].phase {
                    held.draining = true;
                }
            }
            Action::Fence(h) => {
                s.faults += 1;
                Self::fence(&mut s.hosts[h as usize]);
            }
            Action::Crash(h) => {
                s.faults += 1;
                let host = &mut s.hosts[h as usize];
                Self::fence(host);
                // The restarted broker's socket is new: waiting requests fail.
                for c in host.clients.iter_mut() {
                    if *c == Client::Waiting {
                        *c = Client::Idle;
                    }
                }
            }
            Action::NewLease(h) => {
                let host = &mut s.hosts[h as usize];
                let epoch = host.next_epoch;
                host.next_epoch += 1;
                host.lease = Some(epoch);
                s.etcd.leases.push(Lease { host: h, epoch });
                s.etcd.leases.sort();
            }
            Action::Expire(lease) => {
                if s.hosts[lease.host as usize].lease == Some(lease.epoch) {
                    // Only without assumption A: the host still uses it.
                    s.faults += 1;
                }
                s.etcd.leases.retain(|l| *l != lease);
                let before = s.etcd.keys.len();
                let mut gone = Vec::new();
                s.etcd.keys.retain(|k| {
                    if k.owner == lease {
                        gone.push(*k);
                        false
                    } else {
                        true
                    }
                });
                if s.etcd.keys.len() != before {
                    s.etcd.rev += 1;
                }
                if self.rule == LockDelayRule::LastPredecessor {
                    for k in gone {
                        s.etcd.deleted.push(Deleted {
                            create: k.create,
                            owner: lease,
                            clean: false,
                        });
                    }
                }
            }
            Action::LateApply(h) => {
                let (epoch, request) = s.hosts[h as usize].late.take()?;
                self.apply(&mut s.etcd, Lease { host: h, epoch }, &request);
            }
            Action::RemoveStray(h, mode) => {
                // Read and guarded delete as one step: between them only
                // another late copy can write the entry, and then the
                // guard fails and the host reads again. The host's next
                // want of the key waits for this answer; a copy sent
                // again beside it may be applied late.
                let epoch = s.hosts[h as usize].lease?;
                let who = Lease { host: h, epoch };
                let create = s
                    .etcd
                    .keys
                    .iter()
                    .find(|k| k.owner == who && k.mode == mode)?
                    .create;
                let seen = (self.clean_up == CleanUp::Guarded).then_some(create);
                let request = Request::RemoveStray { mode, seen };
                self.apply(&mut s.etcd, who, &request);
                s.stray_removed = true;
                let host = &mut s.hosts[h as usize];
                if self.late_copies && host.late.is_none() {
                    host.late = Some((epoch, request));
                }
            }
        }
        if let Some(h) = host_of_action {
            self.react(&mut s, h);
        }
        Some(s)
    }

    fn within_boundary(&self, state: &State) -> bool {
        state.etcd.rev <= self.max_rev
    }

    fn properties(&self) -> Vec<Property<Self>> {
        let mut properties = vec![
            Property::always(
                "mutual exclusion across hosts",
                |m: &NodeGrantModel, s: &State| {
                    // Per host: has it a live (unfenced, not lost) writer, reader?
                    let live = |host: &Host, mode: Mode| {
                        host.clients.iter().enumerate().any(|(c, client)| {
                            NodeGrantModel::live_holder(host, client)
                                && m.client_mode(c as u8) == mode
                        })
                    };
                    s.hosts.iter().enumerate().all(|(a, host)| {
                        !live(host, Mode::Exclusive)
                            || s.hosts.iter().enumerate().all(|(b, other)| {
                                a == b
                                    || (!live(other, Mode::Exclusive) && !live(other, Mode::Shared))
                            })
                    })
                },
            ),
            Property::always("tokens strictly increase", |_, s: &State| s.tokens_increase),
            Property::sometimes("a local grant", |_, s: &State| s.last_grant_host.is_some()),
            Property::sometimes("the key moves between hosts", |_, s: &State| {
                s.transfers >= 1
            }),
            Property::sometimes("an unused prefetch yields", |_, s: &State| s.yielded),
            Property::sometimes("a hold is lost", |_, s: &State| {
                s.hosts.iter().any(|h| {
                    h.clients
                        .iter()
                        .any(|c| matches!(c, Client::Holding { lost: true, .. }))
                })
            }),
        ];
        if self.clean_up != CleanUp::Never {
            properties.push(Property::sometimes(
                "a stray entry is removed",
                |_, s: &State| s.stray_removed,
            ));
        }
        properties
    }
}

/// Symmetry reduction: hosts are interchangeable (rename them in every lease
/// they appear in), and so are the clients of one host when they all want
/// the same mode. The representative is the least of the 3! renamings.
fn representative(s: &State) -> State {
    const PERMUTATIONS: [[u8; 3]; 6] = [
        [0, 1, 2],
        [0, 2, 1],
        [1, 0, 2],
        [1, 2, 0],
        [2, 0, 1],
        [2, 1, 0],
    ];
    assert_eq!(
        s.hosts.len(),
        3,
        "the symmetry reduction is written for 3 hosts"
    );
    PERMUTATIONS
        .iter()
        .map(|perm| renamed(s, perm))
        .min()
        .expect("six permutations")
}

/// `s` with host `i` renamed `perm[i]`.
fn renamed(s: &State, perm: &[u8; 3]) -> State {
    let lease = |l: &mut Lease| l.host = perm[l.host as usize];
    let leases = |ls: &mut Vec<Lease>| {
        ls.iter_mut().for_each(lease);
        ls.sort();
    };
    let mut out = s.clone();
    for (i, host) in s.hosts.iter().enumerate() {
        let mut host = host.clone();
        if !s.shared {
            host.clients.sort();
        }
        match &mut host.phase {
            Phase::Confirming { delay, .. } => leases(delay),
            Phase::Held(held) => leases(&mut held.delay),
            Phase::Releasing { clear, .. } => leases(clear),
            _ => {}
        }
        match &mut host.reply {
            Some((_, Reply::Won { delay })) => leases(delay),
            Some((_, Reply::Confirmed { stale, .. }))
            | Some((_, Reply::QueuedConfirmed { stale, .. })) => leases(stale),
            _ => {}
        }
        out.hosts[perm[i] as usize] = host;
    }
    leases(&mut out.etcd.leases);
    out.etcd.held.iter_mut().for_each(|(l, _)| lease(l));
    out.etcd.held.sort();
    out.etcd.keys.iter_mut().for_each(|k| lease(&mut k.owner));
    out.etcd
        .deleted
        .iter_mut()
        .for_each(|d| lease(&mut d.owner));
    out.last_grant_host = s.last_grant_host.map(|h| perm[h as usize]);
    out
}

/// How far the checker looks.
#[derive(Clone, Copy, Debug)]
struct Bound {
    /// The highest etcd revision (every write takes one; the history
    /// starts at revision 1).
    max_rev: Rev,
    /// Fences, crashes and (without assumption A) early expiries.
    max_faults: u8,
    /// An optional cap on the path length.
    depth: Option<usize>,
}

/// The CI bound.
const CI_DEPTH: usize = 9;
const CI_BOUND: Bound = Bound {
    max_rev: 9,
    max_faults: 1,
    depth: Some(CI_DEPTH),
};

/// The CI bound, or a bigger one from the environment:
/// `FORELOCK_CLUSTER_MODEL_REVISIONS`, `FORELOCK_CLUSTER_MODEL_FAULTS`,
/// `FORELOCK_CLUSTER_MODEL_DEPTH`.
fn bound() -> Bound {
    let env = |name: &str| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
    };
    Bound {
        max_rev: env("FORELOCK_CLUSTER_MODEL_REVISIONS")
            .map_or(CI_BOUND.max_rev, |r| r.min(250) as Rev),
        max_faults: env("FORELOCK_CLUSTER_MODEL_FAULTS")
            .map_or(CI_BOUND.max_faults, |f| f.min(9) as u8),
        depth: env("FORELOCK_CLUSTER_MODEL_DEPTH").or(CI_BOUND.depth),
    }
}

fn model(
    shared: bool,
    assumption_a: bool,
    assumption_b: bool,
    rule: LockDelayRule,
    bound: Bound,
) -> NodeGrantModel {
    NodeGrantModel {
        hosts: 3,
        clients: 2,
        shared,
        fence_before_expiry: assumption_a,
        lock_delay_covers_late_fence: assumption_b,
        rule,
        max_rev: bound.max_rev,
        max_faults: bound.max_faults,
        n_max: 2,
        late_copies: false,
        clean_up: CleanUp::Never,
    }
}

/// Checks every state within the bound (depth-first, with the symmetry
/// reduction) and prints the counts.
fn check_all(name: &str, model: NodeGrantModel, bound: Bound) -> impl Checker<NodeGrantModel> {
    let started = Instant::now();
    let mut builder = model.clone().checker().symmetry_fn(representative);
    if let Some(depth) = bound.depth {
        builder = builder.target_max_depth(depth);
    }
    let checker = builder.spawn_dfs().join();
    println!(
        "{name}: {bound:?}: {} states, {} unique (up to symmetry), max depth {}, {:.1} s",
        checker.state_count(),
        checker.unique_state_count(),
        checker.max_depth(),
        started.elapsed().as_secs_f64()
    );
    checker
}

/// Looks (breadth-first, so the trace is a shortest one, stopping at the
/// first failure) for a counterexample, prints it and returns the properties broken.
fn find_counterexample(name: &str, model: NodeGrantModel, bound: Bound) -> Vec<&'static str> {
    let started = Instant::now();
    let mut builder = model
        .clone()
        .checker()
        .finish_when(HasDiscoveries::AnyFailures);
    if let Some(depth) = bound.depth {
        builder = builder.target_max_depth(depth);
    }
    let checker = builder.spawn_bfs().join();
    println!(
        "{name}: {bound:?}: {} states, {} unique, {:.1} s",
        checker.state_count(),
        checker.unique_state_count(),
        started.elapsed().as_secs_f64()
    );
    let mut broken = Vec::new();
    for property in model.properties() {
        if property.expectation == stateright::Expectation::Sometimes {
            continue;
        }
        if let Some(path) = checker.discovery(property.name) {
            println!("counterexample to \"{}\":", property.name);
            for action in path.into_actions() {
                println!("  {action:?}");
            }
            broken.push(property.name);
        }
    }
    broken
}

fn assert_always_holds(checker: &impl Checker<NodeGrantModel>) {
    for property in checker.model().properties() {
        if property.expectation == stateright::Expectation::Always {
            checker.assert_no_discovery(property.name);
        }
    }
}

#[test]
fn exclusive_key_is_safe_under_the_timing_assumption() {
    let m = model(false, true, true, LockDelayRule::LastPredecessor, bound());
    assert_always_holds(&check_all("exclusive, A, as written", m, bound()));
}

#[test]
fn shared_and_exclusive_are_safe_under_the_timing_assumption() {
    // The clients of a host differ in mode here (no symmetry among them):
    // two levels shallower in CI.
    let bound = bound();
    let bound = Bound {
        depth: bound.depth.map(|d| if d == CI_DEPTH { d - 2 } else { d }),
        ..bound
    };
    let m = model(true, true, true, LockDelayRule::LastPredecessor, bound);
    assert_always_holds(&check_all("shared+exclusive, A, as written", m, bound));
}

/// The model is not vacuous: a grant, a transfer between hosts, an unused
/// prefetch yielding and a lost hold are all reachable (breadth-first on two
/// hosts with one client each, which is enough for each of them, stopping
/// once all are found).
#[test]
fn grants_and_transfers_are_reachable() {
    for shared in [false, true] {
        let m = NodeGrantModel {
            hosts: 2,
            clients: if shared { 2 } else { 1 },
            ..model(shared, true, true, LockDelayRule::LastPredecessor, CI_BOUND)
        };
        let wanted = m
            .properties()
            .iter()
            .filter(|p| p.expectation == stateright::Expectation::Sometimes)
            .map(|p| p.name)
            .collect();
        let started = Instant::now();
        let checker = m
            .clone()
            .checker()
            .target_max_depth(12)
            .finish_when(HasDiscoveries::AllOf(wanted))
            .spawn_bfs()
            .join();
        println!(
            "reachability (shared: {shared}): {} states, {:.1} s",
            checker.state_count(),
            started.elapsed().as_secs_f64()
        );
        for property in m.properties() {
            if property.expectation == stateright::Expectation::Sometimes {
                let path = checker.discovery(property.name);
                assert!(path.is_some(), "never reached: {}", property.name);
            }
        }
    }
}

#[test]
fn without_the_timing_assumption_two_hosts_hold() {
    let bound = Bound {
        depth: Some(11),
        ..CI_BOUND
    };
    // Two hosts with one client each are enough for two holders.
    let m = NodeGrantModel {
        hosts: 2,
        clients: 1,
        ..model(false, false, false, LockDelayRule::LastPredecessor, bound)
    };
    let broken = find_counterexample("exclusive, neither A nor B", m, bound);
    assert!(
        broken.contains(&"mutual exclusion across hosts"),
        "{broken:?}"
    );
}

/// The flaw (see the header): lock-delay decided from the last predecessor
/// seen going away does not cover a broker that fences late.
#[test]
fn lock_delay_as_written_misses_a_late_fence() {
    let bound = Bound {
        depth: Some(11),
        ..CI_BOUND
    };
    let m = NodeGrantModel {
        hosts: 2,
        clients: 1,
        ..model(false, false, true, LockDelayRule::LastPredecessor, bound)
    };
    let broken = find_counterexample("exclusive, B only, as written", m, bound);
    assert!(
        broken.contains(&"mutual exclusion across hosts"),
        "{broken:?}"
    );
}

/// The fix: `P/held/K/<lease>` markers.
#[test]
fn lock_delay_with_held_markers_covers_a_late_fence() {
    let bound = bound();
    // Without A the early expiries add branches: one level shallower in CI.
    let bound = Bound {
        depth: bound.depth.map(|d| if d == CI_DEPTH { d - 1 } else { d }),
        ..bound
    };
    let m = model(false, false, true, LockDelayRule::HeldMarkers, bound);
    assert_always_holds(&check_all("exclusive, B only, held markers", m, bound));
    if std::env::var_os("FORELOCK_CLUSTER_MODEL_DEPTH").is_some() {
        let m = model(true, false, true, LockDelayRule::HeldMarkers, bound);
        assert_always_holds(&check_all(
            "shared+exclusive, B only, held markers",
            m,
            bound,
        ));
    }
}

/// Host 0 (one client, exclusive) holds and releases the key; a late copy
/// of its queue request is applied after that (a stray entry, with its
/// held marker); host 1 then queues behind the stray and its check names
/// it as the blocker. Two hosts, one client each.
const STRAY_BLOCKS_A_WAITER: [Action; 8] = [
    Action::Acquire(0, 0),
    Action::Deliver(0),
    Action::Unlock(0, 0),
    Action::Drain(0),
    Action::Deliver(0),
    Action::LateApply(0),
    Action::Acquire(1, 0),
    Action::Deliver(1),
];

/// The model of the late copies (docs/cluster.md, "Late copies of a
/// step"): two hosts with one client each, or three with two.
fn late_model(hosts: u8, clients: u8, clean_up: CleanUp, bound: Bound) -> NodeGrantModel {
    NodeGrantModel {
        hosts,
        clients,
        late_copies: true,
        clean_up,
        ..model(false, true, true, LockDelayRule::HeldMarkers, bound)
    }
}

/// Plays `actions` from the initial state, each of which must be enabled.
fn replay(m: &NodeGrantModel, actions: &[Action]) -> State {
    let mut s = m.init_states().remove(0);
    for &a in actions {
        let mut enabled = Vec::new();
        m.actions(&s, &mut enabled);
        assert!(enabled.contains(&a), "{a:?} is not enabled in {s:#?}");
        s = m.next_state(&s, a).expect("a step");
    }
    s
}

/// Whether host `waiter` can come to hold the key from `from` without a
/// fault (no fence, crash, expiry or lost answer) and without host
/// `owner` wanting the key again: breadth-first, within the model's
/// revision bound and `depth` steps.
fn can_hold_without_the_owner(
    m: &NodeGrantModel,
    from: &State,
    waiter: u8,
    owner: u8,
    depth: usize,
) -> bool {
    let holds = |s: &State| matches!(s.hosts[waiter as usize].phase, Phase::Held(_));
    let mut seen = std::collections::HashSet::new();
    let mut layer = vec![from.clone()];
    for _ in 0..depth {
        let mut next = Vec::new();
        for s in layer {
            if holds(&s) {
                return true;
            }
            let mut actions = Vec::new();
            m.actions(&s, &mut actions);
            for a in actions {
                let allowed = match a {
                    Action::Fence(_)
                    | Action::Crash(_)
                    | Action::Expire(_)
                    | Action::NewLease(_)
                    | Action::DropReply(_) => false,
                    Action::Acquire(h, _) | Action::Prefetch(h) => h != owner,
                    _ => true,
                };
                if let Some(t) = m
                    .next_state(&s, a)
                    .filter(|t| allowed && m.within_boundary(t))
                    && seen.insert(t.clone())
                {
                    next.push(t);
                }
            }
        }
        layer = next;
    }
    layer.iter().any(holds)
}

/// The residue this clean-up removes: without it, a waiter behind a stray
/// entry never holds while the stray's host runs (its lease lives) and
/// does not want the key; with it, the waiter names the stray, its host
/// deletes it, and the waiter holds.
#[test]
fn a_waiter_behind_a_stray_entry_holds_only_with_the_clean_up() {
    for (clean_up, expected) in [(CleanUp::Never, false), (CleanUp::Guarded, true)] {
        let m = late_model(2, 1, clean_up, CI_BOUND);
        let blocked = replay(&m, &STRAY_BLOCKS_A_WAITER);
        let stray = blocked.etcd.keys[0];
        assert_eq!(stray.owner, Lease { host: 0, epoch: 0 });
        assert!(
            NodeGrantModel::stray_named(&blocked, 0, &stray),
            "{blocked:#?}"
        );
        assert_eq!(
            can_hold_without_the_owner(&m, &blocked, 1, 0, 12),
            expected,
            "clean-up {clean_up:?}"
        );
    }
}

/// The removal's guard is what keeps it safe: a copy of an unguarded
/// removal (delete our entry, whatever its revision) that etcd applies
/// after the host queued again and holds deletes the live entry, and
/// another host holds beside it. Guarded by the revision read, the same
/// late copy deletes nothing. (Trace written by hand: it is too deep for
/// the breadth-first search.)
#[test]
fn an_unguarded_removal_applied_late_lets_two_hosts_hold() {
    let after = [
        Action::RemoveStray(0, Mode::Exclusive),
        Action::Deliver(1),
        Action::Deliver(1),
        Action::Acquire(0, 0),
        Action::Deliver(0),
        Action::Callback(1),
        Action::Unlock(1, 0),
        Action::Drain(1),
        Action::Deliver(0),
        Action::Deliver(0),
        Action::LateApply(0),
        Action::Deliver(1),
        Action::Acquire(1, 0),
        Action::Deliver(1),
    ];
    let trace: Vec<Action> = STRAY_BLOCKS_A_WAITER
        .iter()
        .chain(&after)
        .copied()
        .collect();
    let both_hold = |s: &State| {
        s.hosts.iter().all(|h| {
            h.clients
                .iter()
                .any(|c| matches!(c, Client::Holding { lost: false, .. }))
        })
    };
    let unguarded = replay(&late_model(2, 1, CleanUp::Unguarded, CI_BOUND), &trace);
    assert!(both_hold(&unguarded), "{unguarded:#?}");
    // Guarded, host 1's last queue waits behind host 0's live entry.
    let guarded = replay(&late_model(2, 1, CleanUp::Guarded, CI_BOUND), &trace);
    assert!(!both_hold(&guarded), "{guarded:#?}");
    assert!(matches!(guarded.hosts[1].phase, Phase::Waiting { .. }));
}

/// The depth of the two-host check of the late copies in CI (15 checked
/// once by hand: 10.6 million unique states, 40 s in a release build);
/// `FORELOCK_CLUSTER_MODEL_DEPTH` sets it.
const LATE_DEPTH: usize = 12;

/// Late copies of queue and removal requests, with the guarded clean-up:
/// mutual exclusion and increasing tokens still hold, exhaustively within
/// the bound, without assumption A (which only adds behaviours: early
/// expiries; the clean-up deletes held markers, and must not cost a
/// late-fencing holder's successor its lock-delay); the removal is
/// reachable.
#[test]
fn late_copies_with_the_clean_up_are_safe() {
    let bound = bound();
    let m = NodeGrantModel {
        fence_before_expiry: false,
        ..late_model(3, 2, CleanUp::Guarded, bound)
    };
    assert_always_holds(&check_all("late copies, clean-up, B only", m, bound));
    // Two hosts with one client each, deeper: past the removal, to the
    // late copies applied after it (the stray is removed at depth 9).
    let depth = bound
        .depth
        .map_or(LATE_DEPTH, |d| if d == CI_DEPTH { LATE_DEPTH } else { d });
    let deep = Bound {
        max_rev: 12,
        max_faults: 1,
        depth: Some(depth),
    };
    let m = NodeGrantModel {
        fence_before_expiry: false,
        ..late_model(2, 1, CleanUp::Guarded, deep)
    };
    let started = Instant::now();
    let checker = m.checker().target_max_depth(depth).spawn_dfs().join();
    println!(
        "late copies, clean-up, two hosts, B only: {deep:?}: {} states, {} unique, {:.1} s",
        checker.state_count(),
        checker.unique_state_count(),
        started.elapsed().as_secs_f64()
    );
    assert_always_holds(&checker);
    let m = late_model(2, 1, CleanUp::Guarded, CI_BOUND);
    let checker = m
        .clone()
        .checker()
        .target_max_depth(12)
        .finish_when(HasDiscoveries::AllOf(["a stray entry is removed"].into()))
        .spawn_bfs()
        .join();
    assert!(checker.discovery("a stray entry is removed").is_some());
}
