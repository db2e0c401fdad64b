//! The cluster agent: a thread with a tokio runtime that holds the broker's
//! etcd lease and its node grants. The broker talks to it with [`Command`]s
//! and reads [`Event`]s back; an eventfd tells the broker's io_uring loop
//! that events are waiting.
//!
//! The agent never decides a grant on its own clock alone: the broker checks
//! [`Lease::valid`] itself before every local grant of a global key, so a
//! starved agent thread cannot make the broker grant past its lease (the
//! self-fence of docs/cluster.md).

use crate::config::ClusterConfig;
use crate::etcd_access::EtcdAccess;
use crate::etcd_lock::{self, EtcdError, First, Names, Queued};
use crate::gossip::{Gossip, GossipConfig, GossipEvent};
use crate::keepalive::{self, Renewals};
use crate::watches::Watches;
use etcd_client::{Client, ConnectOptions};
use futures_util::stream::{FuturesUnordered, StreamExt};
use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// The `tracing` target of the timestamps (`at_ns`, CLOCK_MONOTONIC) the
/// agent and the broker's node gate log at each step of a node grant, from
/// the broker's `Want` to its local grant: turn them on with
/// `FORELOCK_LOG=forelock::grant_timing=debug` to see where a first
/// acquisition's time goes.
pub const TIMING_TARGET: &str = "forelock::grant_timing";

/// The `tracing` target of the events that tell where the time goes when
/// etcd fails over (a member or the leader killed): each keep-alive's
/// answer or failure, each failed etcd step and its retry pause, the
/// watches' restarts, the fence. Every event carries `at_ns`
/// (CLOCK_MONOTONIC, the clock of the fault tests' histories). Turn them on
/// with `FORELOCK_LOG=forelock::failover=debug`.
pub const FAILOVER_TARGET: &str = "forelock::failover";

/// How long after the minimum hold the agent repeats a callback: the
/// broker stamps the grant when it applies `Granted`, a little after the
/// agent sent it (about 0.1 ms; the broker's next tick is the fallback).
const CALLBACK_AGAIN_MARGIN: Duration = Duration::from_micros(500);

/// Low bits of a global key's fencing token: the per-host counter. It is
/// the lock word's counter width, so a node grant can never hand out more
/// local tokens than fit below the next revision's.
pub const COUNTER_BITS: u32 = 24;

/// How long a stopping agent tries to revoke its lease, and then to say
/// goodbye to its gossip peers: etcd steps are retried and hedged within
/// it. Past it the lease ends by its TTL, as after a crash.
const STOP_REVOKE_WITHIN: Duration = Duration::from_secs(2);

/// The token base of a node grant confirmed at etcd revision `rev`.
pub fn token_base(rev: i64) -> u64 {
    (rev as u64) << COUNTER_BITS
}

/// What the broker asks of the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Local processes wait for `key` (or the forecaster predicts them:
    /// `prefetch`): get its node grant.
    Want {
        key: Vec<u8>,
        shared: bool,
        prefetch: bool,
    },
    /// No local holder is left and the broker will not grant `key` again
    /// under the node grant it got under lease `epoch`: release it at etcd.
    /// Ignored when that lease's session is over (its keys went with it).
    Release { key: Vec<u8>, epoch: u64 },
    /// The broker stops and has given every node grant up (no local grant
    /// of a global key can be made any more, prepared slots included):
    /// revoke the lease, say goodbye to the gossip peers, then say
    /// [`Event::Stopped`]. Sent by [`Agent::stop`].
    Stop,
}

/// What the agent tells the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// This host holds `key`'s node grant under lease epoch `epoch`; local
    /// tokens are `base + n`, `1 <= n < 2^24`.
    Granted {
        key: Vec<u8>,
        shared: bool,
        base: u64,
        epoch: u64,
        prefetch: bool,
    },
    /// Another host waits for `key`: drain and release it. Sent again
    /// when the grant has been held `min_hold_ms` (if the first one came
    /// earlier), so that the broker need not wait for its next tick.
    Callback { key: Vec<u8> },
    /// `key`'s node grant was released at etcd (after a `Release`).
    Released { key: Vec<u8> },
    /// The lease of epoch `epoch` could not be confirmed in time: every node
    /// grant under it is lost.
    Fenced { epoch: u64, reason: String },
    /// Gossip: another host says it will want `key` soon. Advisory: the
    /// broker may release an idle node grant early.
    Hint { key: Vec<u8> },
    /// The agent has done what [`Command::Stop`] asks.
    Stopped,
}

/// The lease as the broker sees it: which epoch, and until when (broker's
/// CLOCK_MONOTONIC, ns) grants under it are safe.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LeaseState {
    /// Counts leases taken by this agent, from 1; 0 = none yet.
    pub epoch: u64,
    pub id: i64,
    pub valid_until_ns: u64,
    /// Until when the lease surely lives at etcd, as the last renewal
    /// proves (its TTL less the drift allowance, no margin): past it
    /// without a newer answer the agent fences. Between the safe time and
    /// this, the broker grants nothing, and a late renewal (an etcd
    /// election) makes the lease safe again.
    pub alive_until_ns: u64,
}

/// Shared view of the lease: written by the agent, read by the broker.
#[derive(Debug, Clone, Default)]
pub struct Lease(Arc<Mutex<LeaseState>>);

impl Lease {
    pub fn get(&self) -> LeaseState {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
    /// Whether grants under `epoch` are safe at `now_ns`.
    pub fn valid(&self, epoch: u64, now_ns: u64) -> bool {
        let s = self.get();
        s.epoch == epoch && epoch != 0 && now_ns < s.valid_until_ns
    }
    pub(crate) fn set(&self, f: impl FnOnce(&mut LeaseState)) {
        f(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()));
    }
}

/// What `forelock status` shows of the agent.
#[derive(Debug, Clone, Default)]
pub struct AgentStatus {
    pub connected: bool,
    pub last_error: String,
    pub fences: u64,
    /// Node grants by key: "held" or "queued".
    pub keys: HashMap<Vec<u8>, &'static str>,
    /// Of those keys, which host holds each, as this host last saw at etcd:
    /// its own node name once it holds the key; while it waits, the host
    /// of the key's oldest entry when it queued. Absent when not seen (a
    /// key queued on a retry).
    pub holders: HashMap<Vec<u8>, String>,
    /// Gossip members (other brokers): name, address, up.
    pub members: Vec<(String, String, bool)>,
    /// Each other host's hot global keys, as it last gossiped them.
    pub hot: HashMap<String, Vec<String>>,
    /// The etcd endpoints through which a renewal of the lease has come
    /// back since the agent started (with one endpoint: the list).
    pub renewed_through: std::collections::BTreeSet<String>,
}

/// The broker's handle on the agent thread.
pub struct Agent {
    commands: mpsc::UnboundedSender<Command>,
    events: std::sync::mpsc::Receiver<Event>,
    wake: Arc<OwnedFd>,
    pub lease: Lease,
    pub status: Arc<Mutex<AgentStatus>>,
    pub config: ClusterConfig,
}

impl Agent {
    /// Starts the agent thread. Fails if a credential file the config names
    /// cannot be used (the error names it), or if the thread or its eventfd
    /// cannot be made; an unreachable etcd is retried (and shown in status).
    pub fn start(config: ClusterConfig) -> std::io::Result<Agent> {
        let access = EtcdAccess::load(&config)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        // SAFETY: eventfd(2) takes no pointers; the result is checked below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor this function owns alone.
        let wake = Arc::new(unsafe { OwnedFd::from_raw_fd(fd) });
        let (ctx, crx) = mpsc::unbounded_channel();
        let (etx, erx) = std::sync::mpsc::channel();
        let lease = Lease::default();
        let status = Arc::new(Mutex::new(AgentStatus::default()));
        let inner = Inner {
            config: config.clone(),
            access,
            outbox: Outbox {
                events: etx,
                wake: wake.clone(),
            },
            lease: lease.clone(),
            status: status.clone(),
        };
        std::thread::Builder::new()
            .name("forelock-cluster".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a current-thread tokio runtime");
                rt.block_on(inner.run(crx));
            })?;
        Ok(Agent {
            commands: ctx,
            events: erx,
            wake,
            lease,
            status,
            config,
        })
    }

    /// The eventfd the broker polls: readable when events wait.
    pub fn wake_fd(&self) -> i32 {
        self.wake.as_raw_fd()
    }

    pub fn send(&self, c: Command) {
        // The agent thread lives as long as the process: a send cannot fail
        // unless it panicked, which the log already shows.
        let _ = self.commands.send(c);
    }

    /// The broker stops, and has given every node grant up
    /// ([`Command::Stop`]): wait up to `within` for the agent to revoke the
    /// lease and leave gossip. Whether it did; other events are dropped.
    pub fn stop(&self, within: Duration) -> bool {
        self.send(Command::Stop);
        let deadline = std::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.events.recv_timeout(left) {
                Ok(Event::Stopped) => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    }

    /// Events waiting, oldest first. Clears the eventfd.
    pub fn drain(&self) -> Vec<Event> {
        let mut buf = [0u8; 8];
        // SAFETY: `buf` is 8 writable bytes, as eventfd reads need; the fd is
        // ours and non-blocking, so an empty counter returns EAGAIN at once.
        unsafe { libc::read(self.wake.as_raw_fd(), buf.as_mut_ptr().cast(), 8) };
        self.events.try_iter().collect()
    }
}

/// The agent's side of the event channel: an event, then a write to the
/// eventfd the broker's io_uring loop polls.
#[derive(Clone)]
struct Outbox {
    events: std::sync::mpsc::Sender<Event>,
    wake: Arc<OwnedFd>,
}

impl Outbox {
    fn emit(&self, e: Event) {
        // The broker outlives the agent thread: a send fails only while the
        // process exits.
        let _ = self.events.send(e);
        let one = 1u64.to_ne_bytes();
        // SAFETY: `one` is 8 readable bytes, as eventfd writes need.
        unsafe { libc::write(self.wake.as_raw_fd(), one.as_ptr().cast(), 8) };
    }
}

struct Inner {
    config: ClusterConfig,
    /// TLS and the etcd user, read from their files at start.
    access: EtcdAccess,
    outbox: Outbox,
    lease: Lease,
    status: Arc<Mutex<AgentStatus>>,
}

/// The lease TTL the agent asks for, in ms (etcd grants whole seconds).
fn ttl_ms_of(config: &ClusterConfig) -> u64 {
    config.lease_ttl_ms.div_ceil(1000) * 1000
}

/// Revokes lease `id`: done when etcd has revoked it or does not know it
/// (it expired).
async fn revoke(c: &Client, id: i64) -> Result<(), EtcdError> {
    let mut c = c.clone();
    match tokio::time::timeout(etcd_lock::REQUEST_TIMEOUT, c.lease_revoke(id)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) if e.to_string().contains("lease not found") => Ok(()),
        Ok(Err(e)) => Err(EtcdError::Etcd(e)),
        Err(_) => Err(EtcdError::Timeout(etcd_lock::REQUEST_TIMEOUT)),
    }
}

/// How the agent reaches etcd: the balanced client of every request, and
/// a client per endpoint for the keep-alive.
#[derive(Clone, Copy)]
struct Etcd<'a> {
    client: &'a Client,
    endpoints: &'a [keepalive::Dial],
    /// The balanced client's endpoints in use (`None`: one endpoint).
    in_use: Option<&'a keepalive::Endpoints>,
}

/// The session's view of gossip (absent without `gossip_addr`).
struct GossipLink<'a> {
    gossip: Option<&'a Gossip>,
    events: &'a mut mpsc::UnboundedReceiver<GossipEvent>,
}

/// What a key's task reports to the session.
enum KeyReport {
    /// Queued behind another host, which held the key then (its name).
    HeldBy(Vec<u8>, String),
    Granted(Vec<u8>),
    Released(Vec<u8>),
}

struct KeyTask {
    /// The mode of the node grant it gets.
    shared: bool,
    release: Option<oneshot::Sender<()>>,
    handle: tokio::task::JoinHandle<()>,
}

impl Inner {
    fn emit(&self, e: Event) {
        self.outbox.emit(e);
    }

    fn note(&self, f: impl FnOnce(&mut AgentStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// The options of every etcd client: a dead member is found out within
    /// seconds (connect timeout, HTTP/2 pings); TLS and the etcd user as
    /// configured.
    fn connect_options(&self) -> ConnectOptions {
        self.access.apply(
            ConnectOptions::new()
                .with_connect_timeout(Duration::from_secs(2))
                .with_keep_alive(Duration::from_secs(1), Duration::from_secs(2))
                .with_keep_alive_while_idle(true),
        )
    }

    async fn connect(&self) -> Client {
        loop {
            match Client::connect(self.config.etcd.clone(), Some(self.connect_options())).await {
                Ok(c) => {
                    self.note(|s| s.connected = true);
                    return c;
                }
                Err(e) => {
                    tracing::warn!(error = %e, endpoints = ?self.config.etcd, "cannot reach etcd; retrying");
                    self.note(|s| {
                        s.connected = false;
                        s.last_error = e.to_string();
                    });
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }

    /// A client per etcd endpoint, for the lease's keep-alive
    /// ([`keepalive`]), each connected at its first use (retried until its
    /// member is up); the balanced `client` alone if there is one endpoint.
    fn connect_each(&self, client: &Client) -> Vec<keepalive::Dial> {
        if self.config.etcd.len() > 1 {
            let options = self.connect_options();
            let dial = |endpoint: &String| keepalive::Dial::new(endpoint.clone(), options.clone());
            self.config.etcd.iter().map(dial).collect()
        } else {
            vec![keepalive::Dial::made(
                self.config.etcd.join(","),
                client.clone(),
            )]
        }
    }

    /// Starts gossip if `gossip_addr` is set (validated with the config).
    fn start_gossip(&self, events: mpsc::UnboundedSender<GossipEvent>) -> Option<Gossip> {
        let bind = self.config.gossip_addr.parse().ok()?;
        let seeds = self
            .config
            .seeds
            .iter()
            .filter_map(|s| s.parse().ok())
            .collect();
        let cfg = GossipConfig {
            node: self.config.node.clone(),
            bind,
            seeds,
        };
        match Gossip::start(cfg, events) {
            Ok(g) => Some(g),
            Err(e) => {
                tracing::error!(error = %e, "gossip not started: hints and membership are off");
                None
            }
        }
    }

    async fn run(self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let (gtx, mut grx) = mpsc::unbounded_channel();
        let gossip = self.start_gossip(gtx);
        let client = self.connect().await;
        let endpoints = self.connect_each(&client);
        let in_use = (endpoints.len() > 1)
            .then(|| keepalive::Endpoints::new(client.clone(), &self.config.etcd));
        let mut epoch = 0u64;
        loop {
            epoch += 1;
            let (id, ttl_ms) = self.grant_lease(&client, epoch).await;
            let link = GossipLink {
                gossip: gossip.as_ref(),
                events: &mut grx,
            };
            let etcd = Etcd {
                client: &client,
                endpoints: &endpoints,
                in_use: in_use.as_ref(),
            };
            if let Some(reason) = self
                .session(etcd, epoch, id, ttl_ms, &mut commands, link)
                .await
            {
                self.note(|s| {
                    s.fences += 1;
                    s.last_error = reason.clone();
                    s.keys.clear();
                    s.holders.clear();
                });
                self.lease.set(|l| {
                    l.valid_until_ns = 0;
                    l.alive_until_ns = 0;
                });
                tracing::error!(epoch, %reason, at_ns = monotonic_ns(), "fenced: every node grant of this lease is lost");
                self.emit(Event::Fenced { epoch, reason });
                // Free the other hosts early: revoke the lease, retried as
                // every etcd step is, until etcd answers or the lease has
                // surely expired by itself. (Sent once, within 2 s, a
                // revoke made during an etcd election was lost, and the
                // new leader, which extends every lease, kept the old one
                // and its entries another TTL and more: gaps of 8-10 s.)
                let c = client.clone();
                let give_up = Duration::from_millis(2 * ttl_ms_of(&self.config));
                tokio::spawn(async move {
                    let revoked = tokio::time::timeout(give_up, retry(|| revoke(&c, id))).await;
                    tracing::info!(
                        target: FAILOVER_TARGET,
                        at_ns = monotonic_ns(),
                        lease = id,
                        revoked = revoked.is_ok(),
                        "the fenced lease is revoked (or gone)"
                    );
                });
            } else {
                // Commands closed or Stop: leave gossip with a goodbye
                // (bounded), then tell a stopping broker it may exit.
                if let Some(gossip) = gossip {
                    let _ = tokio::time::timeout(STOP_REVOKE_WITHIN, gossip.shutdown()).await;
                }
                self.emit(Event::Stopped);
                return;
            }
        }
    }

    /// A new lease. Retried as every etcd step is ([`retry`]): a grant sent
    /// again while an earlier one is unanswered may leave an extra lease,
    /// which nothing is attached to and which expires after its TTL.
    async fn grant_lease(&self, client: &Client, epoch: u64) -> (i64, u64) {
        let ttl_s = (ttl_ms_of(&self.config) / 1000) as i64;
        let (sent, g) = retry(|| async {
            let sent = monotonic_ns();
            let mut c = client.clone();
            match tokio::time::timeout(etcd_lock::REQUEST_TIMEOUT, c.lease_grant(ttl_s, None)).await
            {
                Ok(Ok(g)) => Ok((sent, g)),
                Ok(Err(e)) => {
                    self.note(|s| {
                        s.connected = false;
                        s.last_error = e.to_string();
                    });
                    Err(EtcdError::Etcd(e))
                }
                Err(_) => {
                    self.note(|s| {
                        s.connected = false;
                        s.last_error = "etcd did not answer a lease grant".into();
                    });
                    Err(EtcdError::Timeout(etcd_lock::REQUEST_TIMEOUT))
                }
            }
        })
        .await;
        let ttl_ms = g.ttl() as u64 * 1000;
        self.lease.set(|l| {
            *l = LeaseState {
                epoch,
                id: g.id(),
                valid_until_ns: sent + self.config.valid_for_ms(ttl_ms) * 1_000_000,
                alive_until_ns: sent + self.config.alive_for_ms(ttl_ms) * 1_000_000,
            }
        });
        self.note(|s| s.connected = true);
        tracing::info!(
            lease = g.id(),
            ttl_ms,
            epoch,
            at_ns = monotonic_ns(),
            "lease granted"
        );
        (g.id(), ttl_ms)
    }

    /// Serves commands under one lease until it is lost (returns why) or the
    /// broker goes away (returns `None`).
    async fn session(
        &self,
        etcd: Etcd<'_>,
        epoch: u64,
        lease: i64,
        ttl_ms: u64,
        commands: &mut mpsc::UnboundedReceiver<Command>,
        gossip: GossipLink<'_>,
    ) -> Option<String> {
        let GossipLink {
            gossip,
            events: heard,
        } = gossip;
        let mut published: Vec<Vec<u8>> = Vec::new();
        let mut predicted: Vec<Vec<u8>> = Vec::new();
        let (rtx, mut rrx) = mpsc::unbounded_channel::<KeyReport>();
        let mut tasks: HashMap<Vec<u8>, KeyTask> = HashMap::new();
        // The session's watches (entries' deletions, knocks), shared by the
        // key tasks' waits.
        let Etcd {
            client,
            endpoints,
            in_use,
        } = etcd;
        let watches = Watches::new(&self.config.etcd_prefix);
        // Knocks naming an entry of ours: a host waits for it.
        let (named_tx, mut named) = mpsc::unbounded_channel();
        watches.tell_named(lease, named_tx);
        let watch_task = tokio::spawn(watches.clone().run(client.clone()));
        // Stray entries being deleted, by key: a want of the key waits for it.
        let mut strays: HashMap<Vec<u8>, tokio::task::JoinHandle<()>> = HashMap::new();
        // The keep-alive, through every endpoint at once, on tasks of their
        // own: the session never waits for a renewal.
        let renew_every = keepalive::renew_every(&self.config, ttl_ms);
        let (gone_tx, mut gone) = mpsc::unbounded_channel();
        let renewals = Renewals {
            config: self.config.clone(),
            lease: self.lease.clone(),
            status: self.status.clone(),
            id: lease,
            ttl_ms,
            every: renew_every,
            gone: gone_tx,
            endpoints: in_use.cloned(),
        };
        let keepers: Vec<tokio::task::JoinHandle<()>> = endpoints
            .iter()
            .map(|dial| tokio::spawn(renewals.clone().through(dial.clone())))
            .collect();
        // Gossip and the watches' housekeeping, at the pace renewals had.
        let mut tick = tokio::time::interval(Duration::from_millis((ttl_ms / 3).max(100)));
        let reason = loop {
            // The fence: past the instant the lease may have expired at
            // etcd (no renewal proves it alive). The broker stopped
            // granting at the safe time before it, on its own clock.
            let deadline = self.lease.get().alive_until_ns;
            let left = Duration::from_nanos(deadline.saturating_sub(monotonic_ns()));
            tokio::select! {
                _ = tokio::time::sleep(left) => {
                    if self.lease.get().alive_until_ns <= monotonic_ns() {
                        break format!(
                            "lease {lease:x} not confirmed within its TTL ({ttl_ms} ms, less the drift allowance): it may have expired at etcd"
                        );
                    }
                }
                Some(why) = gone.recv() => break why,
                _ = tick.tick() => {
                    // Gossip this host's hot global keys: the predicted ones
                    // first, then those it holds or waits for.
                    if let Some(g) = gossip {
                        let mut hot = predicted.clone();
                        hot.extend(tasks.keys().filter(|k| !predicted.contains(k)).cloned());
                        if hot != published {
                            g.publish_hot(hot.clone());
                            published = hot;
                        }
                    }
                    watches.prune();
                }
                c = commands.recv() => match c {
                    // The broker is gone, or stops (it gave every node grant
                    // up first: Agent::stop).
                    c @ (None | Some(Command::Stop)) => {
                        for (_, t) in tasks.drain() { t.handle.abort(); }
                        strays.drain().for_each(|(_, t)| t.abort());
                        watch_task.abort();
                        keepers.iter().for_each(|k| k.abort());
                        if c.is_some() {
                            // Free the other hosts now, not after the TTL.
                            let revoked = tokio::time::timeout(STOP_REVOKE_WITHIN, retry(|| revoke(client, lease))).await.is_ok();
                            tracing::info!(lease, revoked, "stopping: the lease is revoked (or gone)");
                        }
                        return None;
                    }
                    Some(Command::Want { key, shared, prefetch }) => {
                        let wanted_ns = monotonic_ns();
                        tracing::debug!(
                            target: TIMING_TARGET,
                            key = %String::from_utf8_lossy(&key),
                            step = "agent: session has want",
                            at_ns = wanted_ns,
                        );
                        if prefetch && let Some(g) = gossip {
                            // "I will want K": a holder elsewhere that no
                            // longer needs it may let it go early.
                            let _ = g.want(key.clone());
                            if !predicted.contains(&key) {
                                predicted.push(key.clone());
                                predicted.truncate(64);
                            }
                        }
                        if tasks.contains_key(&key) { continue; }
                        let (tx, rx) = oneshot::channel();
                        let held = hold(
                            client.clone(), watches.clone(), self.config.clone(), key.clone(),
                            shared, prefetch, lease, epoch, rx, rtx.clone(), self.outbox.clone(),
                            wanted_ns,
                        );
                        // After the removal of a stray entry of the key, if
                        // one is under way: it must not race our new entry.
                        let stray = strays.remove(&key);
                        let handle = tokio::spawn(async move {
                            if let Some(stray) = stray {
                                let _ = stray.await;
                            }
                            held.await
                        });
                        self.note(|s| { s.keys.insert(key.clone(), "queued"); });
                        tasks.insert(key, KeyTask { shared, release: Some(tx), handle });
                    }
                    Some(Command::Release { key, epoch: e }) => {
                        if e == epoch
                            && let Some(t) = tasks.get_mut(&key)
                            && let Some(tx) = t.release.take()
                        {
                            let _ = tx.send(());
                        }
                    }
                },
                Some(ev) = heard.recv() => self.heard(ev, gossip, &tasks),
                Some(entry) = named.recv() => {
                    // A host waits for an entry of ours. While this host
                    // wants the key in that mode, its task owns the entry
                    // (queued: it is legitimate; holding: the callback
                    // serves the waiter). Else it is a stray: delete it,
                    // before any later want of the key queues.
                    let Some((key, shared)) = etcd_lock::ours(&self.config.etcd_prefix, lease, &entry) else { continue };
                    strays.retain(|_, t| !t.is_finished());
                    let task = tasks.get(&key);
                    if task.is_some_and(|t| t.shared == shared) || strays.contains_key(&key) { continue; }
                    let alone = task.is_none();
                    let n = Names::new(&self.config.etcd_prefix, &key, shared, lease);
                    let c = client.clone();
                    strays.insert(key, tokio::spawn(async move {
                        if retry(|| etcd_lock::remove_stray(&c, &n, alone)).await {
                            tracing::info!(entry = %n.own, "deleted a stray entry of ours (a late copy of a queue transaction) that blocked another host");
                        }
                    }));
                }
                Some(r) = rrx.recv() => match r {
                    KeyReport::HeldBy(key, node) => self.note(|s| { s.holders.insert(key, node); }),
                    KeyReport::Granted(key) => self.note(|s| {
                        s.holders.insert(key.clone(), self.config.node.clone());
                        s.keys.insert(key, "held");
                    }),
                    KeyReport::Released(key) => {
                        tasks.remove(&key);
                        self.note(|s| {
                            s.keys.remove(&key);
                            s.holders.remove(&key);
                        });
                        self.emit(Event::Released { key });
                    }
                },
            }
        };
        for (_, t) in tasks.drain() {
            t.handle.abort();
        }
        strays.drain().for_each(|(_, t)| t.abort());
        watch_task.abort();
        keepers.iter().for_each(|k| k.abort());
        Some(reason)
    }

    /// A gossip event: membership and hot lists go to the status; a want
    /// hint for a key this host holds goes to the broker.
    fn heard(&self, ev: GossipEvent, gossip: Option<&Gossip>, tasks: &HashMap<Vec<u8>, KeyTask>) {
        match ev {
            GossipEvent::MemberUp { .. } | GossipEvent::MemberDown { .. } => {
                let members = gossip.map(|g| g.members()).unwrap_or_default();
                self.note(|s| {
                    s.members = members
                        .into_iter()
                        .map(|m| (m.node, m.addr.to_string(), m.up))
                        .collect()
                });
            }
            GossipEvent::Hot { node, keys, .. } => self.note(|s| {
                s.hot.insert(
                    node,
                    keys.iter()
                        .map(|k| String::from_utf8_lossy(k).into_owned())
                        .collect(),
                );
            }),
            GossipEvent::Want { key, .. } => {
                if tasks.contains_key(&key) {
                    self.emit(Event::Hint { key });
                }
            }
        }
    }
}

/// One key's node grant, from queueing to release (docs/cluster.md steps
/// 1-5). Retries every etcd step until it succeeds; the session aborts it
/// when the lease is lost.
#[allow(clippy::too_many_arguments)]
async fn hold(
    c: Client,
    watches: Watches,
    config: ClusterConfig,
    key: Vec<u8>,
    shared: bool,
    prefetch: bool,
    lease: i64,
    epoch: u64,
    release: oneshot::Receiver<()>,
    reports: mpsc::UnboundedSender<KeyReport>,
    outbox: Outbox,
    wanted_ns: u64,
) {
    let emit = |e: Event| outbox.emit(e);
    let step = |name: &'static str| {
        tracing::debug!(
            target: TIMING_TARGET,
            key = %String::from_utf8_lossy(&key),
            step = name,
            at_ns = monotonic_ns(),
            since_want_us = monotonic_ns().saturating_sub(wanted_ns) / 1000,
        );
    };
    step("agent: want received");
    let n = Names::new(&config.etcd_prefix, &key, shared, lease);
    // Steps 1-4 in one transaction when nothing blocks; else queued, with
    // the blocker read in the same transaction.
    let queued = retry(|| etcd_lock::queue_and_look(&c, &n, &config.node, lease, shared)).await;
    step("agent: queue txn answered");
    let (own_rev, confirmed) = match queued {
        Queued::Confirmed { own_rev, confirmed } => (own_rev, confirmed),
        Queued::Behind {
            own_rev,
            blocker,
            holder,
        } => {
            if let Some(holder) = holder {
                let _ = reports.send(KeyReport::HeldBy(key.clone(), holder));
            }
            retry_wait(|| etcd_lock::deleted(&c, &watches, &n, lease, &blocker, own_rev)).await;
            step("agent: blocker deleted");
            let Some(confirmed) =
                wait_and_confirm(&c, &watches, &n, &config.node, lease, shared, own_rev).await
            else {
                return;
            };
            (own_rev, confirmed)
        }
        Queued::Already { own_rev } => {
            let Some(confirmed) =
                wait_and_confirm(&c, &watches, &n, &config.node, lease, shared, own_rev).await
            else {
                return;
            };
            (own_rev, confirmed)
        }
    };
    if !confirmed.stale.is_empty() {
        // A holder went away without a clean release: its local holders may
        // still run until they notice. Wait the lock-delay before granting.
        tracing::info!(
            key = %String::from_utf8_lossy(&key),
            stale = confirmed.stale.len(),
            lock_delay_ms = config.lock_delay_ms,
            "a previous holder left without releasing: waiting the lock-delay"
        );
        tokio::time::sleep(Duration::from_millis(config.lock_delay_ms)).await;
    }
    step("agent: node grant confirmed");
    let rev = confirmed.revision;
    let granted_at = tokio::time::Instant::now();
    let _ = reports.send(KeyReport::Granted(key.clone()));
    step("agent: granted emitted");
    emit(Event::Granted {
        key: key.clone(),
        shared,
        base: token_base(rev),
        epoch,
        prefetch,
    });
    let watch_client = c.clone();
    let watch_names = n.clone();
    let behind = confirmed.behind;
    let callback_watches = watches.clone();
    let callback = async move {
        if !behind {
            retry_wait(|| {
                etcd_lock::someone_behind(
                    &watch_client,
                    &callback_watches,
                    &watch_names,
                    own_rev,
                    rev,
                )
            })
            .await;
        }
    };
    tokio::pin!(callback);
    tokio::pin!(release);
    tokio::select! {
        _ = &mut callback => {
            step("agent: callback (another host queued)");
            emit(Event::Callback { key: key.clone() });
            // The broker lets a used grant go only once it is `min_hold_ms`
            // old, and otherwise looks again at its next tick: say it again
            // when that time has come.
            let due = granted_at + Duration::from_millis(config.min_hold_ms) + CALLBACK_AGAIN_MARGIN;
            if tokio::time::Instant::now() < due {
                tokio::select! {
                    _ = tokio::time::sleep_until(due) => {
                        emit(Event::Callback { key: key.clone() });
                        let _ = release.await;
                    }
                    _ = &mut release => {}
                }
            } else {
                let _ = release.await;
            }
        }
        _ = &mut release => {}
    }
    step("agent: release asked");
    retry(|| etcd_lock::release(&c, &n, own_rev, &confirmed.stale)).await;
    step("agent: released at etcd");
    let _ = reports.send(KeyReport::Released(key));
}

/// Steps 2-4 for an entry already queued at `own_rev`: wait until no entry
/// blocks it, then confirm (a writer: both in one transaction each time it
/// looks). `None`: our entry is gone (the lease was lost;
/// the session fences).
async fn wait_and_confirm(
    c: &Client,
    watches: &Watches,
    n: &Names,
    node: &str,
    lease: i64,
    shared: bool,
    own_rev: i64,
) -> Option<etcd_lock::Confirmed> {
    if !shared {
        // A writer looks and confirms in one transaction.
        loop {
            match retry(|| etcd_lock::confirm_if_first(c, n, own_rev, node, lease)).await {
                First::Confirmed(confirmed) => return Some(confirmed),
                First::Gone => return None,
                First::Behind { blocker, seen_at } => {
                    retry_wait(|| etcd_lock::deleted(c, watches, n, lease, &blocker, seen_at))
                        .await;
                }
            }
        }
    }
    loop {
        let (blocker, rev) = retry(|| etcd_lock::blocker(c, n, own_rev, shared)).await;
        let Some(entry) = blocker else { break };
        retry_wait(|| etcd_lock::deleted(c, watches, n, lease, &entry, rev)).await;
    }
    let confirmed = retry(|| etcd_lock::confirm(c, n, own_rev, node, lease)).await;
    tracing::debug!(
        target: TIMING_TARGET,
        own_rev,
        at_ns = monotonic_ns(),
        step = "agent: blockers gone, confirm txn answered"
    );
    confirmed
}

/// The pauses between attempts of an etcd step that failed outright (no
/// attempt left in flight): from 50 ms, doubling, at most 250 ms, so that
/// a step retried through an etcd election goes on within a quarter of a
/// second of its end (a 1 s cap cost up to 1 s more; a broker's few key
/// tasks retrying four times a second are no load for etcd).
const PAUSE_FIRST: Duration = Duration::from_millis(50);
const PAUSE_MAX: Duration = Duration::from_millis(250);

/// An attempt unanswered this long is sent again beside it, up to
/// [`HEDGE_MAX`] in flight (their 2 s timeout over this: one new attempt
/// every 250 ms while etcd does not answer); the first answer wins. After
/// the etcd leader dies, a follower forwards a write to the dead leader
/// until it notices (1.5-3 s with a 1.5 s election timeout), and the
/// request is lost: it is answered only by its own timeout (2 s), however
/// soon after the election it was sent. So a step goes on within 250 ms of
/// the election (with 500 ms, the longest gaps after a leader kill were
/// the election rounded up to the next half second: 2.02 s for elections
/// of 1.65-1.9 s). A slow but working etcd still answers the earlier
/// attempt.
const HEDGE_AFTER: Duration = Duration::from_millis(250);
const HEDGE_MAX: usize = 8;

/// Runs the etcd step `f` (one request, safe to send again: see
/// `etcd_lock`) until it succeeds. A new attempt goes out beside those in
/// flight every [`HEDGE_AFTER`] without an answer (at most [`HEDGE_MAX`] in
/// flight, each bounded by its own request timeout), and after a failure
/// once a pause has passed ([`PAUSE_FIRST`] doubling to [`PAUSE_MAX`]); the
/// first answer wins.
async fn retry<T, F, Fut>(mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, EtcdError>>,
{
    let mut pause = PAUSE_FIRST;
    let mut flying = FuturesUnordered::new();
    flying.push(f());
    let mut next = tokio::time::Instant::now() + HEDGE_AFTER;
    loop {
        tokio::select! {
            Some(answer) = flying.next() => match answer {
                Ok(v) => return v,
                Err(e) => {
                    tracing::debug!(
                        target: FAILOVER_TARGET,
                        at_ns = monotonic_ns(),
                        in_flight = flying.len(),
                        pause_ms = pause.as_millis() as u64,
                        error = %e,
                        "etcd step failed; retrying"
                    );
                    next = next.min(tokio::time::Instant::now() + pause);
                    pause = (pause * 2).min(PAUSE_MAX);
                }
            },
            _ = tokio::time::sleep_until(next) => {
                if flying.len() < HEDGE_MAX {
                    if !flying.is_empty() {
                        tracing::debug!(
                            target: FAILOVER_TARGET,
                            at_ns = monotonic_ns(),
                            in_flight = flying.len(),
                            "etcd step unanswered; sending it again beside"
                        );
                    }
                    flying.push(f());
                }
                next = tokio::time::Instant::now() + HEDGE_AFTER;
            }
        }
    }
}

/// Runs the wait `f` (a watch wait, which may rightly last as long as the
/// key is held elsewhere: never sent again beside itself) until it
/// succeeds, pausing as [`retry`] does after each failure.
async fn retry_wait<F, Fut>(mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), EtcdError>>,
{
    let mut pause = PAUSE_FIRST;
    while let Err(e) = f().await {
        tracing::debug!(
            target: FAILOVER_TARGET,
            at_ns = monotonic_ns(),
            pause_ms = pause.as_millis() as u64,
            error = %e,
            "etcd wait failed; retrying"
        );
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(PAUSE_MAX);
    }
}

/// CLOCK_MONOTONIC in ns: the clock of every deadline here and in the broker.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for clock_gettime to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
