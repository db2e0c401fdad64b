//! Two etcd watches per lease session, shared by the key tasks: one over
//! every node-grant entry (`P/lock/`, deletions only) on which a waiter
//! waits for its predecessor's deletion (step 2 of docs/cluster.md), one
//! over the knocks (`P/knock/`, puts only) on which a holder waits for a
//! host queued behind it (step 5, the callback).
//!
//! Shared watches instead of one per wait: each node grant opened a watch
//! stream of its own (and often read the store once more to close the gap
//! between its last read and the watch's start), so a first acquisition
//! cost etcd a transaction, a watch stream and a range read instead of the
//! transaction alone, and a host held one open stream per cached key.
//!
//! Filtered, and knocks apart from entries: a first acquisition of a free
//! key (the entry and held marker it puts) sends no event to any host. A
//! single watch over `P/lock/` sent every host an event per first
//! acquisition anywhere, which cost etcd a send per host on the
//! acquisition's own path (docs/cluster.md, figures).
//!
//! No event is missed: a wait registers its interest, then, when its watch
//! has already passed the revision at which the waiter last read the store
//! (or is not running), reads the store once (`look`) — a linearizable read
//! sees every revision the watch has delivered. Events after the
//! registration are dispatched to it. When a watch (re)starts, every wait
//! registered on it is told to register and look again.

use crate::etcd_lock::{EtcdError, REQUEST_TIMEOUT};
use etcd_client::{Client, EventType, WatchFilterType, WatchOptions};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

#[derive(Default)]
struct State {
    /// The watch has been created and is running.
    live: bool,
    /// The revision up to which its events have been dispatched.
    processed: i64,
    /// Waits for a knock under a key's directory (`P/knock/<hex key>/`)
    /// written after a revision.
    later: HashMap<Vec<u8>, Vec<(i64, oneshot::Sender<()>)>>,
    /// Waits for an entry's deletion.
    deleted: HashMap<Vec<u8>, Vec<oneshot::Sender<()>>>,
    /// Where knocks naming an entry of ours go ([`Watches::tell_named`]):
    /// the entry names' last part (`/<our lease hex>`), and the channel.
    named: Option<(Vec<u8>, mpsc::UnboundedSender<Vec<u8>>)>,
}

impl State {
    /// Every registered wait registers and looks again (the watch stopped
    /// or restarted: events may have been missed).
    fn recheck_all(&mut self) {
        self.later.clear();
        self.deleted.clear();
    }

    /// Forgets the waits whose waiter has gone (a key task ended).
    fn prune(&mut self) {
        self.later.retain(|_, v| {
            v.retain(|(_, tx)| !tx.is_closed());
            !v.is_empty()
        });
        self.deleted.retain(|_, v| {
            v.retain(|tx| !tx.is_closed());
            !v.is_empty()
        });
    }

    fn dispatch(&mut self, event: &etcd_client::Event) {
        let Some(kv) = event.kv() else { return };
        match event.event_type() {
            EventType::Put => {
                let Some(dir) = dir_of(kv.key()) else { return };
                // The put's own revision: a knock written again by a host
                // that queues again keeps its create revision.
                let written = kv.mod_revision();
                if let Some(waits) = self.later.get_mut(dir) {
                    let mut kept = Vec::with_capacity(waits.len());
                    for (after, tx) in waits.drain(..) {
                        if written > after {
                            let _ = tx.send(());
                        } else if !tx.is_closed() {
                            kept.push((after, tx));
                        }
                    }
                    if kept.is_empty() {
                        self.later.remove(dir);
                    } else {
                        *waits = kept;
                    }
                }
                // A waiter names the entry it waits for (etcd_lock::deleted).
                if let Some((suffix, tx)) = &self.named
                    && kv.value().ends_with(suffix)
                {
                    let _ = tx.send(kv.value().to_vec());
                }
            }
            EventType::Delete => {
                for tx in self.deleted.remove(kv.key()).unwrap_or_default() {
                    let _ = tx.send(());
                }
            }
        }
    }
}

/// The directory of an entry `P/lock/<hex key>/<r|w>/<lease hex>` or of a
/// knock `P/knock/<hex key>/k/<lease hex>`: `P/lock/<hex key>/`,
/// `P/knock/<hex key>/`.
pub fn dir_of(entry: &[u8]) -> Option<&[u8]> {
    let lease_slash = entry.iter().rposition(|&b| b == b'/')?;
    let mode_slash = entry[..lease_slash].iter().rposition(|&b| b == b'/')?;
    Some(&entry[..=mode_slash])
}

/// What a wait waits for.
pub enum Wanted<'a> {
    /// A knock under `dir` (`P/knock/<hex key>/`) written after revision
    /// `after`.
    Later { dir: &'a [u8], after: i64 },
    /// The deletion of `entry`.
    Deleted { entry: &'a [u8] },
}

/// One watch over a prefix, with one kind of event filtered out.
struct Watch {
    state: Mutex<State>,
    prefix: String,
    /// The events this watch does not need (etcd drops them before
    /// sending: they cost no send and no wake-up here).
    filter: WatchFilterType,
}

impl Watch {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs the watch for as long as the session lives, starting it again
    /// after any failure.
    async fn run(&self, client: &Client) {
        loop {
            if let Err(e) = self.watch_once(client).await {
                tracing::debug!(
                    target: crate::agent::FAILOVER_TARGET,
                    at_ns = crate::agent::monotonic_ns(),
                    error = %e,
                    prefix = self.prefix,
                    "a node-grant watch stopped; starting it again"
                );
            }
            {
                let mut s = self.state();
                s.live = false;
                s.recheck_all();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn watch_once(&self, client: &Client) -> Result<(), EtcdError> {
        let mut c = client.clone();
        let options = WatchOptions::new()
            .with_prefix()
            .with_filters([self.filter]);
        let mut stream = match tokio::time::timeout(
            REQUEST_TIMEOUT,
            c.watch(self.prefix.as_str(), Some(options)),
        )
        .await
        {
            Ok(r) => r?,
            Err(_) => return Err(EtcdError::Timeout(REQUEST_TIMEOUT)),
        };
        while let Some(resp) = stream.message().await? {
            if resp.canceled() {
                break;
            }
            let revision = resp.header().ok_or(EtcdError::NoHeader)?.revision();
            let mut s = self.state();
            if resp.created() {
                tracing::debug!(
                    target: crate::agent::FAILOVER_TARGET,
                    at_ns = crate::agent::monotonic_ns(),
                    prefix = self.prefix,
                    revision,
                    "a node-grant watch is running"
                );
                // Events before `revision` were never seen here.
                s.live = true;
                s.processed = revision;
                s.recheck_all();
                continue;
            }
            for event in resp.events() {
                s.dispatch(event);
            }
            s.processed = s.processed.max(revision);
        }
        Err(EtcdError::WatchEnded(self.prefix.clone()))
    }
}

/// The session's shared watches; cheap to clone.
#[derive(Clone)]
pub struct Watches {
    /// `P/lock/`, deletions: [`Wanted::Deleted`].
    entries: Arc<Watch>,
    /// `P/knock/`, puts: [`Wanted::Later`].
    knocks: Arc<Watch>,
}

impl Watches {
    /// The watches of the node grants under `etcd_prefix` (`P`), not
    /// running until [`Watches::run`].
    pub fn new(etcd_prefix: &str) -> Watches {
        let watch = |dir: &str, filter| {
            Arc::new(Watch {
                state: Mutex::default(),
                prefix: format!("{etcd_prefix}/{dir}/"),
                filter,
            })
        };
        Watches {
            entries: watch("lock", WatchFilterType::NoPut),
            knocks: watch("knock", WatchFilterType::NoDelete),
        }
    }

    /// Runs both watches for as long as the session lives (the session
    /// aborts it), starting each again after any failure.
    pub async fn run(self, client: Client) {
        tokio::join!(self.entries.run(&client), self.knocks.run(&client));
    }

    /// From now on, sends `named` every knock that names an entry of lease
    /// `lease` (the value a waiter writes into its knock: the entry it
    /// waits for, etcd_lock::deleted).
    pub fn tell_named(&self, lease: i64, named: mpsc::UnboundedSender<Vec<u8>>) {
        self.knocks.state().named = Some((format!("/{lease:x}").into_bytes(), named));
    }

    /// Forgets waits whose waiter has gone.
    pub fn prune(&self) {
        self.entries.state().prune();
        self.knocks.state().prune();
    }

    /// Returns once `wanted` has happened after revision `seen_at` (the
    /// revision at which the caller last read the store and found it had
    /// not), or `look` (a linearizable read) says it has.
    pub async fn wait<F, Fut>(
        &self,
        wanted: Wanted<'_>,
        mut seen_at: i64,
        look: F,
    ) -> Result<(), EtcdError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<bool, EtcdError>>,
    {
        let watch = match wanted {
            Wanted::Later { .. } => &self.knocks,
            Wanted::Deleted { .. } => &self.entries,
        };
        loop {
            let (tx, mut rx) = oneshot::channel();
            let must_look = {
                let mut s = watch.state();
                match wanted {
                    Wanted::Later { dir, after } => {
                        s.later.entry(dir.to_vec()).or_default().push((after, tx))
                    }
                    Wanted::Deleted { entry } => {
                        s.deleted.entry(entry.to_vec()).or_default().push(tx)
                    }
                }
                !s.live || s.processed > seen_at
            };
            // An event may end the wait while the look is unanswered (a
            // member that lost its leader holds a linearizable read until
            // the election is over, or until the read's timeout).
            let told = if must_look {
                tokio::select! {
                    seen = look() => {
                        if seen? {
                            return Ok(());
                        }
                        (&mut rx).await
                    }
                    told = &mut rx => told,
                }
            } else {
                rx.await
            };
            match told {
                Ok(()) => return Ok(()),
                // The watch stopped or restarted: register and look again.
                Err(_) => seen_at = i64::MIN,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_directory_of_an_entry_is_its_key_prefix() {
        assert_eq!(
            dir_of(b"/fl/x/lock/676c/w/1f"),
            Some(b"/fl/x/lock/676c/".as_slice())
        );
        assert_eq!(dir_of(b"/fl/lock/ab/r/7"), Some(b"/fl/lock/ab/".as_slice()));
        assert_eq!(dir_of(b"nolease"), None);
    }
}
