//! Gossip among brokers: foca (SWIM with suspicion and infection-style
//! dissemination) over one UDP socket.
//!
//! It carries four things, all advisory:
//!
//! - **membership**: which brokers are up and the address each gossips at;
//! - **failure alarms**: a broker that stops answering probes is suspected,
//!   then reported down ([`GossipEvent::MemberDown`]);
//! - **each host's hot global keys**, from its forecaster
//!   ([`Gossip::publish_hot`]), so that the others can see which keys a
//!   host is likely to ask for (distributed prediction);
//! - **"I will want K" hints** ([`Gossip::want`]), so that a holder that no
//!   longer needs `K` can give its node grant up early.
//!
//! It **never decides ownership**: etcd does. SWIM's views are local and may
//! disagree ("any cluster member can declare another down", caio/foca #19);
//! a paused or partitioned broker is reported down while it may still hold
//! a lease, and a live one may be reported down by a lossy link. The packets
//! are not authenticated either. So nothing here grants, revokes or fences a
//! key: a `MemberDown` does not free that host's grants (its etcd lease
//! expiring does), and a hint only lets a holder *choose* to release early.
//!
//! The protocol itself is foca's (sans-IO): this module is its runtime. One
//! tokio task owns the socket, the `Foca` instance and its timers; the
//! [`Gossip`] handle talks to it over a channel. Identity is the node name,
//! the gossip address and a boot id (see `identity.rs`), so a restarted
//! broker rejoins at once as a newer identity at the same address.
//!
//! ```no_run
//! # async fn example() -> std::io::Result<()> {
//! use forelock_cluster::gossip::{Gossip, GossipConfig, GossipEvent};
//! let (events, mut heard) = tokio::sync::mpsc::unbounded_channel();
//! let gossip = Gossip::start(
//!     GossipConfig {
//!         node: "h1".into(),
//!         bind: "10.78.0.1:7946".parse().unwrap(),
//!         seeds: vec!["10.78.0.2:7946".parse().unwrap()],
//!     },
//!     events,
//! )?;
//! gossip.publish_hot(vec![b"global/orders".to_vec()]);
//! while let Some(event) = heard.recv().await {
//!     if let GossipEvent::Want { node, key } = event {
//!         // A hint: release `key` early if this host no longer needs it.
//!         let _ = (node, key);
//!     }
//! }
//! gossip.shutdown().await;
//! # Ok(())
//! # }
//! ```

mod identity;
mod wire;

#[cfg(test)]
mod tests;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use foca::{AccumulatingRuntime, Config, Foca, OwnedNotification, PostcardCodec, State, Timer};
use rand_foca::SeedableRng;
use rand_foca::rngs::SmallRng;
use shm_layout::{KeyError, validate_key};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use identity::NodeId;
use wire::{Handler, Heard, Item, MAX_PACKET_BYTES, Origin};
pub use wire::{HotKeysPublished, MAX_NODE_NAME_BYTES, WireError};

/// Where this broker gossips and whom it asks to join.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GossipConfig {
    /// This host's name (`[cluster] node`), 1 to [`MAX_NODE_NAME_BYTES`] bytes.
    pub node: String,
    /// The UDP address to bind, which is also the address peers reach this
    /// broker at: a concrete IP (not 0.0.0.0 or ::). Port 0 picks a free
    /// port (see [`Gossip::local_addr`]).
    pub bind: SocketAddr,
    /// Brokers to join through. Unreachable seeds are retried every
    /// [`SEED_RETRY_PERIOD`] until some member answers; this broker's own
    /// address is skipped, so every host may be given the same list.
    pub seeds: Vec<SocketAddr>,
}

/// How often a broker that knows no live member announces itself to its
/// seeds again.
pub const SEED_RETRY_PERIOD: Duration = Duration::from_secs(1);

/// The cluster size foca's LAN settings are derived from (retransmissions
/// per update, suspicion time: about 5 s before a silent member is down).
const EXPECTED_CLUSTER_SIZE: u32 = 16;

/// At most one "dropped a packet" warning per this period; the next one
/// says how many were dropped in between.
const DROP_WARNING_PERIOD: Duration = Duration::from_secs(1);

/// Another broker as this one's gossip sees it (itself excluded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub node: String,
    pub addr: SocketAddr,
    /// Alive or suspected (still answering some probes); false once declared
    /// down, until it rejoins.
    pub up: bool,
}

/// What the gossip heard, in the order it heard it. Advisory, never about
/// ownership (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GossipEvent {
    /// A broker joined, or came back (a restart: after the old identity's
    /// `MemberDown`).
    MemberUp { node: String, addr: SocketAddr },
    /// A broker left, or was declared down by the cluster (which may be
    /// wrong: a pause or a lossy link). Its hot list and hints are stale
    /// from here on; its node grants are still etcd's business.
    MemberDown { node: String },
    /// `node`'s latest hot global keys, hottest first; replaces its earlier
    /// list. `truncated`: it had more than fit in one packet.
    Hot {
        node: String,
        keys: Vec<Vec<u8>>,
        truncated: bool,
    },
    /// `node` says it will want `key` soon.
    Want { node: String, key: Vec<u8> },
}

/// Counters since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GossipStats {
    /// Datagrams received.
    pub packets_received: u64,
    /// Datagrams dropped: malformed, hostile, oversized, from another
    /// format version, or otherwise refused by foca.
    pub packets_dropped: u64,
    /// Datagrams sent.
    pub packets_sent: u64,
}

#[derive(Default)]
struct Counters {
    packets_received: AtomicU64,
    packets_dropped: AtomicU64,
    packets_sent: AtomicU64,
}

enum Command {
    /// A broadcast item (a hot list that fits, or a want hint), added to
    /// foca's backlog and pushed to a few members at once.
    Broadcast(Item),
    /// Leave the cluster, then report.
    Shutdown(oneshot::Sender<()>),
}

/// The handle on a running gossip task. Dropping it stops the task without
/// a goodbye (the others find out as from a crash); [`Gossip::shutdown`]
/// says goodbye first.
pub struct Gossip {
    commands: mpsc::UnboundedSender<Command>,
    task: JoinHandle<()>,
    members: Arc<Mutex<Vec<Member>>>,
    counters: Arc<Counters>,
    origin: Origin,
    local_addr: SocketAddr,
    /// Shared with the task, which restamps the latest hot list for a
    /// member that joins after it was published.
    hot_version: Arc<AtomicU64>,
    want_seq: AtomicU64,
}

impl Gossip {
    /// Binds `cfg.bind`, announces to the seeds and spawns the gossip task on
    /// the current tokio runtime. Events go to `events` (a dropped receiver
    /// is fine: the events are then lost).
    ///
    /// Errors: the node name is empty or too long, the bind address is
    /// unspecified (0.0.0.0 or ::), no tokio runtime is running, or the bind
    /// fails (the OS error). An address not on any interface yet or still
    /// in use is not an error: the task tries again every [`BIND_RETRY`]
    /// and starts gossiping once it is bound.
    pub fn start(
        cfg: GossipConfig,
        events: mpsc::UnboundedSender<GossipEvent>,
    ) -> io::Result<Gossip> {
        if wire::check_node_name(&cfg.node).is_err() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "gossip node name {:?} must be 1 to {MAX_NODE_NAME_BYTES} bytes: set cluster.node",
                    cfg.node
                ),
            ));
        }
        if cfg.bind.ip().is_unspecified() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "gossip address {} is unspecified: peers reach a broker at the address it binds, so set cluster.gossip_addr to this host's address (e.g. 10.78.0.1:7946)",
                    cfg.bind
                ),
            ));
        }
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            io::Error::other("Gossip::start needs a running tokio runtime: call it from within one")
        })?;
        let socket = match std::net::UdpSocket::bind(cfg.bind) {
            Ok(socket) => Some(socket),
            Err(error) if may_bind_later(&error) && cfg.bind.port() != 0 => {
                tracing::warn!(
                    %error,
                    addr = %cfg.bind,
                    "cannot bind the gossip address yet: trying again every {BIND_RETRY:?}; \
                     membership and hints start once it is bound"
                );
                None
            }
            Err(error) => return Err(error),
        };
        let local_addr = match &socket {
            Some(socket) => socket.local_addr()?,
            None => cfg.bind,
        };

        let me = NodeId::starting_now(cfg.node.clone(), local_addr);
        let origin = Origin {
            node: cfg.node.clone(),
            boot: me.boot,
        };
        let heard = Arc::new(Mutex::new(Vec::new()));
        let mut config =
            Config::new_lan(NonZeroU32::new(EXPECTED_CLUSTER_SIZE).unwrap_or(NonZeroU32::MIN));
        config.max_packet_size =
            std::num::NonZeroUsize::new(MAX_PACKET_BYTES).unwrap_or(config.max_packet_size);
        let foca = Foca::with_custom_broadcast(
            me,
            config,
            SmallRng::seed_from_u64(rand::random()),
            PostcardCodec,
            Handler::new(cfg.node.clone(), heard.clone()),
        );
        let seeds: Vec<SocketAddr> = cfg
            .seeds
            .iter()
            .copied()
            .filter(|seed| *seed != local_addr)
            .collect();

        let hot_version = Arc::new(AtomicU64::new(0));
        let driver_hot_version = hot_version.clone();
        let (commands, mut commands_rx) = mpsc::unbounded_channel();
        let members = Arc::new(Mutex::new(Vec::new()));
        let counters = Arc::new(Counters::default());
        let (driver_members, driver_counters) = (members.clone(), counters.clone());
        let task = runtime.spawn(async move {
            let socket = match socket {
                Some(socket) => socket,
                None => match bind_when_possible(cfg.bind, &mut commands_rx).await {
                    Some(socket) => socket,
                    None => return,
                },
            };
            let socket = match socket
                .set_nonblocking(true)
                .and_then(|()| UdpSocket::from_std(socket))
            {
                Ok(socket) => socket,
                Err(error) => {
                    tracing::error!(%error, "gossip socket unusable: hints and membership are off");
                    return;
                }
            };
            let driver = Driver {
                foca,
                runtime: AccumulatingRuntime::new(),
                socket,
                timers: Timers::default(),
                seeds,
                next_seed_retry: Instant::now(),
                events,
                heard,
                up: HashMap::new(),
                members: driver_members,
                counters: driver_counters,
                drops_unreported: 0,
                last_drop_warning: None,
                hot_version: driver_hot_version,
                last_hot: None,
            };
            driver.run(commands_rx).await;
        });
        Ok(Gossip {
            commands,
            task,
            members,
            counters,
            origin,
            local_addr,
            hot_version,
            want_seq: AtomicU64::new(0),
        })
    }

    /// The address this broker gossips at (the bound one, port included;
    /// the configured one while it waits to bind it).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The other brokers this one knows of, up or down, sorted by node name.
    pub fn members(&self) -> Vec<Member> {
        self.members
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Counters since start.
    pub fn stats(&self) -> GossipStats {
        GossipStats {
            packets_received: self.counters.packets_received.load(Ordering::Relaxed),
            packets_dropped: self.counters.packets_dropped.load(Ordering::Relaxed),
            packets_sent: self.counters.packets_sent.load(Ordering::Relaxed),
        }
    }

    /// Publishes this host's hot global keys, hottest first; the list
    /// replaces the one published before, here and at every peer. It must
    /// fit in one packet: a longer list is cut at the first key that does
    /// not fit (the hottest are kept), peers see `truncated: true`, and the
    /// report counts what was cut. Keys that are not lock keys are left out
    /// and counted. Either is logged as a warning. A member that joins (or
    /// restarts) later is sent the latest list again.
    pub fn publish_hot(&self, keys: Vec<Vec<u8>>) -> HotKeysPublished {
        // Relaxed: the counter orders only the items it stamps; an item
        // stamped lower that reaches the task later is stale and dropped.
        let version = self.hot_version.fetch_add(1, Ordering::Relaxed);
        let (item, report) = wire::cut_hot(&self.origin, version, keys);
        if report.cut > 0 {
            tracing::warn!(
                published = report.published,
                cut = report.cut,
                "hot-key list longer than one gossip packet: published its {} hottest keys, cut {}",
                report.published,
                report.cut
            );
        }
        if report.invalid > 0 {
            tracing::warn!(
                invalid = report.invalid,
                "hot-key list held {} keys that are not lock keys (empty, too long or with NUL): left out",
                report.invalid
            );
        }
        let _ = self.commands.send(Command::Broadcast(item));
        report
    }

    /// Tells the other brokers that this host will want `key` soon, so that
    /// a holder that no longer needs it can release its node grant early.
    /// A hint, never a request: nobody has to act on it.
    pub fn want(&self, key: Vec<u8>) -> Result<(), KeyError> {
        validate_key(&key)?;
        let seq = self.want_seq.fetch_add(1, Ordering::Relaxed);
        let _ = self.commands.send(Command::Broadcast(Item::Want {
            origin: self.origin.clone(),
            seq,
            key,
        }));
        Ok(())
    }

    /// Announces this broker's leave to a few members (the others learn it
    /// by gossip), then stops the task and closes the socket.
    pub async fn shutdown(self) {
        let (done, left) = oneshot::channel();
        if self.commands.send(Command::Shutdown(done)).is_ok() {
            let _ = left.await;
        }
        let _ = self.task.await;
    }

    /// Stops the task at once, without a goodbye, and waits until the socket
    /// is closed: a crash, as the others see it.
    #[cfg(test)]
    async fn kill(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

/// How often a gossip address that cannot be bound yet is tried again.
const BIND_RETRY: Duration = Duration::from_secs(1);

/// Bind errors that may pass: the address is not on an interface yet (a
/// broker started before the network is up) or still taken (a previous
/// broker's socket closing).
fn may_bind_later(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::AddrNotAvailable | io::ErrorKind::AddrInUse
    )
}

/// Bind `addr`, trying again every [`BIND_RETRY`] while [`may_bind_later`]
/// says it may succeed; `None` when it cannot or the handle asked to stop
/// meanwhile. Hints broadcast before then are dropped: there is nobody to
/// tell yet, and the hot list is republished.
async fn bind_when_possible(
    addr: SocketAddr,
    commands: &mut mpsc::UnboundedReceiver<Command>,
) -> Option<std::net::UdpSocket> {
    loop {
        tokio::select! {
            command = commands.recv() => match command {
                Some(Command::Broadcast(_)) => {}
                Some(Command::Shutdown(done)) => {
                    let _ = done.send(());
                    return None;
                }
                None => return None,
            },
            () = tokio::time::sleep(BIND_RETRY) => match std::net::UdpSocket::bind(addr) {
                Ok(socket) => {
                    tracing::info!(%addr, "gossip address bound: membership and hints on");
                    return Some(socket);
                }
                Err(error) if may_bind_later(&error) => {}
                Err(error) => {
                    tracing::error!(%error, %addr, "gossip not started: hints and membership are off");
                    return None;
                }
            },
        }
    }
}

/// foca's timers, due in order: by deadline, then by submission.
#[derive(Default)]
struct Timers {
    queue: BinaryHeap<Reverse<(Instant, u64)>>,
    pending: HashMap<u64, Timer<NodeId>>,
    submitted: u64,
}

impl Timers {
    fn submit(&mut self, at: Instant, timer: Timer<NodeId>) {
        let ticket = self.submitted;
        self.submitted += 1;
        self.queue.push(Reverse((at, ticket)));
        self.pending.insert(ticket, timer);
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.queue.peek().map(|Reverse((at, _))| *at)
    }

    fn pop_due(&mut self, now: Instant) -> Option<Timer<NodeId>> {
        let Reverse((at, ticket)) = *self.queue.peek()?;
        if at > now {
            return None;
        }
        self.queue.pop();
        self.pending.remove(&ticket)
    }
}

type FocaInstance = Foca<NodeId, PostcardCodec, SmallRng, Handler>;

/// The gossip task's state: foca, its runtime's outputs, the socket.
struct Driver {
    foca: FocaInstance,
    runtime: AccumulatingRuntime<NodeId>,
    socket: UdpSocket,
    timers: Timers,
    seeds: Vec<SocketAddr>,
    next_seed_retry: Instant,
    events: mpsc::UnboundedSender<GossipEvent>,
    heard: Arc<Mutex<Vec<Heard>>>,
    /// Active members as last reported in events, by address.
    up: HashMap<SocketAddr, NodeId>,
    members: Arc<Mutex<Vec<Member>>>,
    counters: Arc<Counters>,
    drops_unreported: u64,
    last_drop_warning: Option<Instant>,
    hot_version: Arc<AtomicU64>,
    /// This broker's latest hot list. foca spreads an item a bounded number
    /// of times; a member that joins later gets this one restamped.
    last_hot: Option<Item>,
}

impl Driver {
    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        // Bigger than any packet foca accepts, so that an oversized datagram
        // is seen whole and refused instead of read cut short.
        let mut receive_buffer = vec![0u8; 64 * 1024];
        loop {
            self.announce_to_seeds_if_alone();
            self.flush().await;
            let timer_deadline = self.timers.next_deadline();
            let wake_at = match (timer_deadline, self.seed_retry_deadline()) {
                (Some(a), Some(b)) => a.min(b),
                (a, b) => a
                    .or(b)
                    .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600)),
            };
            tokio::select! {
                command = commands.recv() => match command {
                    // Every handle dropped: stop without a goodbye.
                    None => return,
                    Some(Command::Broadcast(item)) => self.broadcast(item),
                    Some(Command::Shutdown(done)) => {
                        if let Err(error) = self.foca.leave_cluster(&mut self.runtime) {
                            tracing::warn!(%error, "gossip: announcing the leave failed");
                        }
                        self.flush().await;
                        let _ = done.send(());
                        return;
                    }
                },
                received = self.socket.recv_from(&mut receive_buffer) => match received {
                    Ok((len, from)) => self.receive(&receive_buffer[..len], from),
                    // An ICMP error from an earlier send (a peer's port
                    // closed) surfaces here on Linux: not this socket's
                    // fault. The pause keeps an error that persists from
                    // spinning the task.
                    Err(error) => {
                        tracing::debug!(%error, "gossip: receive failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                },
                () = tokio::time::sleep_until(wake_at) => self.fire_due_timers(),
            }
        }
    }

    fn seed_retry_deadline(&self) -> Option<Instant> {
        if self.seeds.is_empty() || self.foca.num_members() > 0 {
            None
        } else {
            Some(self.next_seed_retry)
        }
    }

    /// While no member is alive, (re)announce to every seed: at start the
    /// seeds may not be up yet, and foca announces only to members it knows.
    fn announce_to_seeds_if_alone(&mut self) {
        let now = Instant::now();
        if self.seed_retry_deadline().is_none_or(|at| at > now) {
            return;
        }
        self.next_seed_retry = now + SEED_RETRY_PERIOD;
        for seed in self.seeds.clone() {
            if let Err(error) = self.foca.announce(NodeId::seed(seed), &mut self.runtime) {
                tracing::debug!(%seed, %error, "gossip: announce to seed failed");
            }
        }
    }

    fn broadcast(&mut self, mut item: Item) {
        let bytes = wire::encode_fitted(&mut item);
        let is_newer_hot = match (&item, &self.last_hot) {
            (Item::Hot { version, .. }, Some(Item::Hot { version: last, .. })) => version > last,
            (Item::Hot { .. }, _) => true,
            (Item::Want { .. }, _) => false,
        };
        if is_newer_hot {
            self.last_hot = Some(item);
        }
        match self.foca.add_broadcast(&bytes) {
            // Push it to a few members now rather than at the next probe.
            Ok(true) => {
                if let Err(error) = self.foca.broadcast(&mut self.runtime) {
                    tracing::debug!(%error, "gossip: broadcast failed");
                }
            }
            // Stale: a newer item of ours is already out.
            Ok(false) => {}
            Err(error) => tracing::warn!(%error, "gossip: own broadcast refused"),
        }
    }

    fn receive(&mut self, packet: &[u8], from: SocketAddr) {
        self.counters
            .packets_received
            .fetch_add(1, Ordering::Relaxed);
        if let Err(error) = self.foca.handle_data(packet, &mut self.runtime) {
            self.counters
                .packets_dropped
                .fetch_add(1, Ordering::Relaxed);
            self.warn_dropped(from, packet.len(), &error);
        }
    }

    fn warn_dropped(&mut self, from: SocketAddr, len: usize, error: &foca::Error) {
        let now = Instant::now();
        if self
            .last_drop_warning
            .is_some_and(|last| now.duration_since(last) < DROP_WARNING_PERIOD)
        {
            self.drops_unreported += 1;
            return;
        }
        tracing::warn!(
            peer = %from,
            len,
            %error,
            dropped_since_last_warning = self.drops_unreported,
            "gossip: dropped a datagram from {from} ({len} bytes): {error}; a broker of another forelock version, a misdirected sender, or a hostile one"
        );
        self.drops_unreported = 0;
        self.last_drop_warning = Some(now);
    }

    fn fire_due_timers(&mut self) {
        let now = Instant::now();
        while let Some(timer) = self.timers.pop_due(now) {
            if let Err(error) = self.foca.handle_timer(timer, &mut self.runtime) {
                tracing::debug!(%error, "gossip: timer");
            }
        }
    }

    /// Drains foca's runtime. Reacting to a notification (a restamped hot
    /// list for a member that came) can queue more to send: a second pass
    /// sends it, and a third would only follow a membership change caused
    /// by our own broadcast, which cannot happen; the bound is a guard.
    async fn flush(&mut self) {
        for _ in 0..3 {
            self.flush_once().await;
            if self.runtime.backlog() == 0 {
                break;
            }
        }
    }

    /// Sends what foca asked to send, schedules its timers, and turns its
    /// notifications and the handler's news into events.
    async fn flush_once(&mut self) {
        while let Some((to, data)) = self.runtime.to_send() {
            match self.socket.send_to(&data, to.addr).await {
                Ok(_) => {
                    self.counters.packets_sent.fetch_add(1, Ordering::Relaxed);
                }
                Err(error) => tracing::debug!(peer = %to.addr, %error, "gossip: send failed"),
            }
        }
        let now = Instant::now();
        while let Some((after, timer)) = self.runtime.to_schedule() {
            self.timers.submit(now + after, timer);
        }
        let mut membership_changed = false;
        while let Some(notification) = self.runtime.to_notify() {
            match notification {
                OwnedNotification::MemberUp(_)
                | OwnedNotification::MemberDown(_)
                | OwnedNotification::Rename(_, _) => membership_changed = true,
                OwnedNotification::Rejoin(id) => {
                    tracing::info!(identity = ?id, "gossip: declared down by the cluster, rejoined as a new identity");
                }
                OwnedNotification::Idle => tracing::info!("gossip: no live member left"),
                OwnedNotification::Active => tracing::debug!("gossip: joined"),
                other => tracing::debug!(notification = ?other, "gossip"),
            }
        }
        if membership_changed {
            self.report_membership();
        }
        let heard = std::mem::take(
            &mut *self
                .heard
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        );
        for news in heard {
            let event = match news {
                Heard::Hot {
                    node,
                    keys,
                    truncated,
                } => GossipEvent::Hot {
                    node,
                    keys,
                    truncated,
                },
                Heard::Want { node, key } => GossipEvent::Want { node, key },
            };
            let _ = self.events.send(event);
        }
    }

    /// Sends the latest hot list again under a new version, so that it is
    /// news to everyone and spreads to the member that just came.
    fn republish_hot(&mut self) {
        let Some(mut item) = self.last_hot.clone() else {
            return;
        };
        if let Item::Hot { version, .. } = &mut item {
            *version = self.hot_version.fetch_add(1, Ordering::Relaxed);
        }
        self.broadcast(item);
    }

    /// Compares foca's active members with the ones last reported: a
    /// restart (a new identity replacing a live one at the same address)
    /// reads as the old one down, then the new one up.
    fn report_membership(&mut self) {
        let now_up: HashMap<SocketAddr, NodeId> = self
            .foca
            .iter_members()
            .map(|member| (member.id().addr, member.id().clone()))
            .collect();
        let mut gone: Vec<&NodeId> = self
            .up
            .iter()
            .filter(|(addr, id)| now_up.get(*addr) != Some(*id))
            .map(|(_, id)| id)
            .collect();
        gone.sort_by(|a, b| a.node.cmp(&b.node));
        for id in gone {
            let _ = self.events.send(GossipEvent::MemberDown {
                node: id.node.clone(),
            });
        }
        let mut came: Vec<&NodeId> = now_up
            .iter()
            .filter(|(addr, id)| self.up.get(*addr) != Some(*id))
            .map(|(_, id)| id)
            .collect();
        came.sort_by(|a, b| a.node.cmp(&b.node));
        let someone_came = !came.is_empty();
        for id in came {
            let _ = self.events.send(GossipEvent::MemberUp {
                node: id.node.clone(),
                addr: id.addr,
            });
        }
        self.up = now_up;
        if someone_came && let Some(Item::Hot { .. }) = &self.last_hot {
            self.republish_hot();
        }

        let mut members: Vec<Member> = self
            .foca
            .iter_membership_state()
            .map(|member| Member {
                node: member.id().node.clone(),
                addr: member.id().addr,
                up: member.state() != State::Down,
            })
            .collect();
        members.sort_by(|a, b| a.node.cmp(&b.node).then(a.addr.cmp(&b.addr)));
        *self
            .members
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = members;
    }
}
