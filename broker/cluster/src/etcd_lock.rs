//! etcd's lock recipe, one function per step of docs/cluster.md's "The node
//! grant": queue, find the blocker, wait for it to go, confirm (the token's
//! revision, and the held markers that say whether to wait the lock-delay),
//! release, and watch for hosts queued behind us (the callback).
//!
//! Every function is one etcd request (or one watch) and is safe to retry:
//! queueing is guarded by `create_revision == 0`, confirming and releasing by
//! `create_revision == ours`, so a request that timed out but happened does
//! no harm when sent again.

use etcd_client::{
    Client, Compare, CompareOp, EventType, GetOptions, GetResponse, PutOptions, SortOrder,
    SortTarget, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use std::time::Duration;

/// How long one unary etcd request may take before it is retried.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// An etcd request that failed or timed out; the caller retries.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("etcd did not answer within {0:?}")]
    Timeout(Duration),
    #[error("etcd answered without a header")]
    NoHeader,
    #[error("the watch on {0} ended")]
    WatchEnded(String),
}

async fn timed<T>(
    f: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, EtcdError> {
    match tokio::time::timeout(REQUEST_TIMEOUT, f).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(EtcdError::Timeout(REQUEST_TIMEOUT)),
    }
}

/// The etcd key names of one forelock key.
#[derive(Debug, Clone)]
pub struct Names {
    /// `P/lock/<hex key>/`: every host's queue entry for the key.
    pub dir: String,
    /// `P/lock/<hex key>/<r|w>/<lease hex>`: this host's entry.
    pub own: String,
    /// `P/held/<hex key>/`: one persistent marker per host that confirmed
    /// a node grant and has not released it cleanly (value: its entry).
    pub held: String,
    /// `P/held/<hex key>/<lease hex>`: this host's marker.
    pub own_marker: String,
}

impl Names {
    pub fn new(etcd_prefix: &str, key: &[u8], shared: bool, lease: i64) -> Names {
        let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
        let dir = format!("{etcd_prefix}/lock/{hex}/");
        let mode = if shared { "r" } else { "w" };
        let held = format!("{etcd_prefix}/held/{hex}/");
        Names {
            own: format!("{dir}{mode}/{lease:x}"),
            own_marker: format!("{held}{lease:x}"),
            held,
            dir,
        }
    }
}

/// Whether a queue entry is a writer's.
fn is_writer(dir: &str, entry: &[u8]) -> bool {
    entry
        .get(dir.len()..)
        .is_some_and(|rest| rest.starts_with(b"w/"))
}

/// Step 1: put this host's entry (attached to `lease`) unless it is there.
/// Returns its create revision: the host's place in the key's queue.
pub async fn queue(c: &Client, n: &Names, node: &str, lease: i64) -> Result<i64, EtcdError> {
    let mut c = c.clone();
    let txn = Txn::new()
        .when([Compare::create_revision(
            n.own.as_str(),
            CompareOp::Equal,
            0,
        )])
        .and_then([TxnOp::put(
            n.own.as_str(),
            node,
            Some(PutOptions::new().with_lease(lease)),
        )])
        .or_else([TxnOp::get(n.own.as_str(), None)]);
    let resp = timed(c.txn(txn)).await?;
    if resp.succeeded() {
        return Ok(resp.header().ok_or(EtcdError::NoHeader)?.revision());
    }
    for op in resp.op_responses() {
        if let TxnOpResponse::Get(g) = op
            && let Some(kv) = g.kvs().first()
        {
            return Ok(kv.create_revision());
        }
    }
    Err(EtcdError::NoHeader)
}

/// Step 2: the entry that blocks ours (created before it, and a writer if we
/// are a reader), and the store's revision when we looked; `None` = we hold.
pub async fn blocker(
    c: &Client,
    n: &Names,
    own_rev: i64,
    shared: bool,
) -> Result<(Option<Vec<u8>>, i64), EtcdError> {
    let mut c = c.clone();
    let mut opts = GetOptions::new()
        .with_prefix()
        .with_keys_only()
        .with_max_create_revision(own_rev - 1)
        .with_sort(SortTarget::Create, SortOrder::Descend);
    if !shared {
        opts = opts.with_limit(1);
    }
    let resp = timed(c.get(n.dir.as_str(), Some(opts))).await?;
    let rev = resp.header().ok_or(EtcdError::NoHeader)?.revision();
    let found = resp
        .kvs()
        .iter()
        .find(|kv| !shared || is_writer(&n.dir, kv.key()))
        .map(|kv| kv.key().to_vec());
    Ok((found, rev))
}

/// Step 2, waiting: returns the revision at which `entry` was deleted (it is
/// watched from `from_rev`, so a deletion after we looked is not missed).
pub async fn deleted(c: &Client, entry: &[u8], from_rev: i64) -> Result<i64, EtcdError> {
    let mut c = c.clone();
    let mut stream = timed(c.watch(
        entry.to_vec(),
        Some(WatchOptions::new().with_start_revision(from_rev)),
    ))
    .await?;
    while let Some(resp) = stream.message().await? {
        if resp.canceled() {
            break;
        }
        for ev in resp.events() {
            if ev.event_type() == EventType::Delete
                && let Some(kv) = ev.kv()
            {
                return Ok(kv.mod_revision());
            }
        }
    }
    Err(EtcdError::WatchEnded(String::from_utf8_lossy(entry).into()))
}

/// A confirmed node grant: the token revision, and the stale held markers
/// (holders that went away without a clean release) it must wait out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confirmed {
    pub revision: i64,
    pub stale: Vec<Vec<u8>>,
}

/// Steps 3 and 4: write our entry again while it is still ours (the write's
/// revision is the node grant's token revision), put our held marker, and
/// read the others. A marker whose entry is gone is a holder that left
/// without a clean release (its lease expired or was revoked): wait the
/// lock-delay. `None`: our entry is gone: we do not hold the key.
///
/// The markers are the fix the node-grant model found for the first rule
/// ("the last predecessor this host saw go away"): a holder whose lease
/// expired before this host queued was never seen going away
/// (broker/cluster/tests/model.rs).
pub async fn confirm(
    c: &Client,
    n: &Names,
    own_rev: i64,
    node: &str,
    lease: i64,
) -> Result<Option<Confirmed>, EtcdError> {
    let mut c = c.clone();
    let txn = Txn::new()
        .when([Compare::create_revision(
            n.own.as_str(),
            CompareOp::Equal,
            own_rev,
        )])
        .and_then([
            TxnOp::put(
                n.own.as_str(),
                node,
                Some(PutOptions::new().with_lease(lease)),
            ),
            TxnOp::put(n.own_marker.as_str(), n.own.as_str(), None),
            TxnOp::get(n.held.as_str(), Some(GetOptions::new().with_prefix())),
            TxnOp::get(
                n.dir.as_str(),
                Some(GetOptions::new().with_prefix().with_keys_only()),
            ),
        ]);
    let resp = timed(c.txn(txn)).await?;
    if !resp.succeeded() {
        return Ok(None);
    }
    let revision = resp.header().ok_or(EtcdError::NoHeader)?.revision();
    let gets: Vec<GetResponse> = resp
        .op_responses()
        .into_iter()
        .filter_map(|op| match op {
            TxnOpResponse::Get(g) => Some(g),
            _ => None,
        })
        .collect();
    let [markers, entries] = gets.as_slice() else {
        return Err(EtcdError::NoHeader);
    };
    let live: std::collections::HashSet<&[u8]> = entries.kvs().iter().map(|kv| kv.key()).collect();
    let stale = markers
        .kvs()
        .iter()
        .filter(|kv| kv.key() != n.own_marker.as_bytes() && !live.contains(kv.value()))
        .map(|kv| kv.key().to_vec())
        .collect();
    Ok(Some(Confirmed { revision, stale }))
}

/// Step 5: a clean release: delete our entry and our held marker, and the
/// stale markers whose lock-delay we waited out, in one transaction. Does
/// nothing when our entry is already gone (our lease expired): our marker
/// then stays, and the next holder waits the lock-delay.
pub async fn release(
    c: &Client,
    n: &Names,
    own_rev: i64,
    waited_out: &[Vec<u8>],
) -> Result<(), EtcdError> {
    let mut c = c.clone();
    let mut ops = vec![
        TxnOp::delete(n.own.as_str(), None),
        TxnOp::delete(n.own_marker.as_str(), None),
    ];
    ops.extend(waited_out.iter().map(|m| TxnOp::delete(m.clone(), None)));
    let txn = Txn::new()
        .when([Compare::create_revision(
            n.own.as_str(),
            CompareOp::Equal,
            own_rev,
        )])
        .and_then(ops);
    timed(c.txn(txn)).await?;
    Ok(())
}

/// Step 5, the callback: returns when an entry created after ours (another
/// host waiting for the key) exists.
pub async fn someone_behind(c: &Client, n: &Names, own_rev: i64) -> Result<(), EtcdError> {
    let mut c = c.clone();
    // Look first (an entry may already be there), then watch from the
    // revision we looked at.
    let resp = timed(
        c.get(
            n.dir.as_str(),
            Some(
                GetOptions::new()
                    .with_prefix()
                    .with_keys_only()
                    .with_min_create_revision(own_rev + 1)
                    .with_limit(1),
            ),
        ),
    )
    .await?;
    if !resp.kvs().is_empty() {
        return Ok(());
    }
    let from = resp.header().ok_or(EtcdError::NoHeader)?.revision() + 1;
    let mut stream = timed(c.watch(
        n.dir.as_str(),
        Some(WatchOptions::new().with_prefix().with_start_revision(from)),
    ))
    .await?;
    while let Some(resp) = stream.message().await? {
        if resp.canceled() {
            break;
        }
        if resp.events().iter().any(|ev| {
            ev.event_type() == EventType::Put
                && ev.kv().is_some_and(|kv| kv.create_revision() > own_rev)
        }) {
            return Ok(());
        }
    }
    Err(EtcdError::WatchEnded(n.dir.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_hex_and_carry_mode_and_lease() {
        let n = Names::new("/fl", b"global/a b", false, 0x1f);
        assert_eq!(n.dir, "/fl/lock/676c6f62616c2f612062/");
        assert_eq!(n.own, "/fl/lock/676c6f62616c2f612062/w/1f");
        assert_eq!(n.own_marker, "/fl/held/676c6f62616c2f612062/1f");
        assert!(is_writer(&n.dir, n.own.as_bytes()));
        let r = Names::new("/fl", b"global/a b", true, 0x1f);
        assert!(!is_writer(&r.dir, r.own.as_bytes()));
    }
}
