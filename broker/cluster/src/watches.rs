//! One etcd watch per lease session over every node-grant entry
//! (`P/lock/`), shared by the key tasks: a waiter waits on it for its
//! predecessor's deletion (step 2 of docs/cluster.md), a holder for an entry
//! queued after its own (step 5, the callback).
//!
//! One watch instead of one per wait: each node grant opened a watch stream
//! of its own (and often read the store once more to close the gap between
//! its last read and the watch's start), so a first acquisition cost etcd a
//! transaction, a watch stream and a range read instead of the transaction
//! alone, and a host held one open stream per cached key.
//!
//! No event is missed: a wait registers its interest, then, when the watch
//! has already passed the revision at which the waiter last read the store
//! (or is not running), reads the store once (`look`) — a linearizable read
//! sees every revision the watch has delivered. Events after the
//! registration are dispatched to it. When the watch (re)starts, every
//! registered wait is told to register and look again.

use crate::etcd_lock::{EtcdError, REQUEST_TIMEOUT};
use etcd_client::{Client, EventType, WatchOptions};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;

#[derive(Default)]
struct State {
    /// The watch has been created and is running.
    live: bool,
    /// The revision up to which its events have been dispatched.
    processed: i64,
    /// Waits for an entry under a key's directory (`P/lock/<hex key>/`)
    /// created after a revision.
    later: HashMap<Vec<u8>, Vec<(i64, oneshot::Sender<()>)>>,
    /// Waits for an entry's deletion.
    deleted: HashMap<Vec<u8>, Vec<oneshot::Sender<()>>>,
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
                let created = kv.create_revision();
                if let Some(waits) = self.later.get_mut(dir) {
                    let mut kept = Vec::with_capacity(waits.len());
                    for (after, tx) in waits.drain(..) {
                        if created > after {
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
            }
            EventType::Delete => {
                for tx in self.deleted.remove(kv.key()).unwrap_or_default() {
                    let _ = tx.send(());
                }
            }
        }
    }
}

/// The directory of an entry `P/lock/<hex key>/<r|w>/<lease hex>`:
/// `P/lock/<hex key>/`.
pub fn dir_of(entry: &[u8]) -> Option<&[u8]> {
    let lease_slash = entry.iter().rposition(|&b| b == b'/')?;
    let mode_slash = entry[..lease_slash].iter().rposition(|&b| b == b'/')?;
    Some(&entry[..=mode_slash])
}

/// What a wait waits for.
pub enum Wanted<'a> {
    /// An entry under `dir` created after revision `after`.
    Later { dir: &'a [u8], after: i64 },
    /// The deletion of `entry`.
    Deleted { entry: &'a [u8] },
}

/// The session's shared watch; cheap to clone.
#[derive(Clone)]
pub struct Watches {
    state: Arc<Mutex<State>>,
    prefix: String,
}

impl Watches {
    /// A watch over `prefix` (`P/lock/`), not running until [`Watches::run`].
    pub fn new(prefix: String) -> Watches {
        Watches {
            state: Arc::default(),
            prefix,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs the watch for as long as the session lives (the session aborts
    /// it), starting it again after any failure.
    pub async fn run(self, client: Client) {
        loop {
            if let Err(e) = self.watch_once(&client).await {
                tracing::debug!(error = %e, "the node-grant watch stopped; starting it again");
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
        let options = WatchOptions::new().with_prefix();
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

    /// Forgets waits whose waiter has gone.
    pub fn prune(&self) {
        self.state().prune();
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
        loop {
            let (tx, rx) = oneshot::channel();
            let must_look = {
                let mut s = self.state();
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
            if must_look && look().await? {
                return Ok(());
            }
            match rx.await {
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
