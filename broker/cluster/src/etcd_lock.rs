//! etcd's lock recipe, one function per step of docs/cluster.md's "The node
//! grant": queue, find the blocker, wait for it to go, confirm (the token's
//! revision, and the held markers that say whether to wait the lock-delay),
//! release, and watch for hosts queued behind us (the callback).
//!
//! Every function is one etcd request (or one watch) and is safe to retry:
//! queueing is guarded by `create_revision == 0`, confirming and releasing by
//! `create_revision == ours`, so a request that timed out but happened does
//! no harm when sent again.

use crate::watches::{Wanted, Watches};
use etcd_client::{
    Client, Compare, CompareOp, GetOptions, GetResponse, PutOptions, SortOrder, SortTarget, Txn,
    TxnOp, TxnOpResponse,
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
    /// `P/knock/<hex key>/`: where hosts queued behind the holders knock
    /// (the callback, step 5).
    pub knock_dir: String,
    /// `P/knock/<hex key>/k/<lease hex>`: this host's knock, written (attached
    /// to `lease`) with its entry when it queues behind another.
    pub own_knock: String,
}

impl Names {
    pub fn new(etcd_prefix: &str, key: &[u8], shared: bool, lease: i64) -> Names {
        let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
        let dir = format!("{etcd_prefix}/lock/{hex}/");
        let mode = if shared { "r" } else { "w" };
        let held = format!("{etcd_prefix}/held/{hex}/");
        let knock_dir = format!("{etcd_prefix}/knock/{hex}/");
        Names {
            own: format!("{dir}{mode}/{lease:x}"),
            own_marker: format!("{held}{lease:x}"),
            own_knock: format!("{knock_dir}k/{lease:x}"),
            knock_dir,
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

/// This host's knock on the holders' door (`Names::own_knock`), attached to
/// `lease`: written with an entry that may wait behind another.
fn knock(n: &Names, lease: i64) -> TxnOp {
    TxnOp::put(
        n.own_knock.as_str(),
        "",
        Some(PutOptions::new().with_lease(lease)),
    )
}

/// Step 1: put this host's entry (attached to `lease`) and its knock unless
/// the entry is there. Returns its create revision: the host's place in the
/// key's queue.
pub async fn queue(c: &Client, n: &Names, node: &str, lease: i64) -> Result<i64, EtcdError> {
    let mut c = c.clone();
    let txn = Txn::new()
        .when([Compare::create_revision(
            n.own.as_str(),
            CompareOp::Equal,
            0,
        )])
        .and_then([
            TxnOp::put(
                n.own.as_str(),
                node,
                Some(PutOptions::new().with_lease(lease)),
            ),
            knock(n, lease),
        ])
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

/// A queue entry of another host, as we saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: Vec<u8>,
    pub create_revision: i64,
}

/// What [`queue_and_look`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Queued {
    /// No conflicting entry was there: the one transaction queued, won and
    /// confirmed (steps 1-4); the entry's create revision is the token
    /// revision.
    Confirmed { own_rev: i64, confirmed: Confirmed },
    /// Queued behind `blocker` (the last conflicting entry before ours, the
    /// one to watch), as the store was at revision `own_rev`.
    /// `holder`: the node name (value) of the key's oldest entry then, the
    /// host that held the key (for `forelock locks`).
    Behind {
        own_rev: i64,
        blocker: Entry,
        holder: Option<String>,
    },
    /// Our entry was there already (a retry of a transaction that timed out
    /// but happened): find the blocker and confirm as usual.
    Already { own_rev: i64 },
}

/// The operations of every transaction that confirms a node grant (see
/// [`confirm`]): our entry put under the lease (created by it, in
/// [`queue_and_look`], or written again; its revision gives the token's
/// high bits), our held marker, then the held markers and the entries, read
/// at the same revision.
fn confirm_ops(n: &Names, node: &str, lease: i64) -> [TxnOp; 4] {
    [
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
    ]
}

/// Steps 1 to 4 in one round trip when nothing blocks: one flat
/// transaction, guarded by `create_revision(own) == 0` and by a range
/// compare, `create_revision == 0` over the entries ours must wait for
/// (every entry for a writer, the writers for a reader): no conflicting
/// entry exists.
///
/// * Both hold: it puts our entry and our held marker and reads the
///   markers, as [`confirm`] does, in the same revision `C`: the host has
///   won and is confirmed. The token revision is the entry's own create
///   revision `C`: it is greater than every revision written by an earlier
///   holder, whose entries are all gone at `C` (the compare says so), and
///   etcd's revisions only grow; an entry created later waits for ours
///   (step 2). This is the `create == base` case of the model's `Queue`
///   (broker/cluster/tests/model.rs). A writer reads no entries: the
///   compare says there are none but its own, so every other marker is
///   stale. A reader also reads the entries (the readers that hold with it
///   have live markers).
/// * Else: it puts our entry (a retry's put finds it there and keeps its
///   create revision) and our knock (the holders' callback), and reads it, the last conflicting entry before it
///   (our predecessor, which [`blocker`] would have answered at that
///   revision) and the key's oldest entry (its value names the holder).
///   An entry whose create revision is older than the transaction's is a
///   retry of a transaction that timed out but happened:
///   [`Queued::Already`].
///
/// One transaction without nesting: measured against etcd's `Lock` RPC on
/// the same etcd, the nested form (an outer compare on our entry, then the
/// range compare) and the writer's read of the entries cost 60-80 us more
/// than the flat one, which costs what `Lock` does.
pub async fn queue_and_look(
    c: &Client,
    n: &Names,
    node: &str,
    lease: i64,
    shared: bool,
) -> Result<Queued, EtcdError> {
    let mut c = c.clone();
    // The entries ours must wait for: every one (a writer), the writers (a
    // reader). Ours is not among the writers' when we read.
    let conflicting = if shared {
        format!("{}w/", n.dir)
    } else {
        n.dir.clone()
    };
    let put_own = || {
        TxnOp::put(
            n.own.as_str(),
            node,
            Some(PutOptions::new().with_lease(lease)),
        )
    };
    let mut win = vec![
        put_own(),
        TxnOp::put(n.own_marker.as_str(), n.own.as_str(), None),
        TxnOp::get(n.held.as_str(), Some(GetOptions::new().with_prefix())),
    ];
    if shared {
        win.push(TxnOp::get(
            n.dir.as_str(),
            Some(GetOptions::new().with_prefix().with_keys_only()),
        ));
    }
    // Behind: the newest conflicting entries, ours (a writer's) first.
    let look = GetOptions::new()
        .with_prefix()
        .with_keys_only()
        .with_sort(SortTarget::Create, SortOrder::Descend)
        .with_limit(if shared { 1 } else { 2 });
    // And the oldest entry: the holder (its value is its host's name).
    let oldest = GetOptions::new()
        .with_prefix()
        .with_sort(SortTarget::Create, SortOrder::Ascend)
        .with_limit(1);
    let txn = Txn::new()
        .when([
            Compare::create_revision(n.own.as_str(), CompareOp::Equal, 0),
            Compare::create_revision(conflicting.as_str(), CompareOp::Equal, 0).with_prefix(),
        ])
        .and_then(win)
        .or_else([
            put_own(),
            knock(n, lease),
            TxnOp::get(n.own.as_str(), Some(GetOptions::new().with_keys_only())),
            TxnOp::get(conflicting.as_str(), Some(look)),
            TxnOp::get(n.dir.as_str(), Some(oldest)),
        ]);
    let resp = timed(c.txn(txn)).await?;
    let revision = resp.header().ok_or(EtcdError::NoHeader)?.revision();
    let succeeded = resp.succeeded();
    let gets: Vec<GetResponse> = resp
        .op_responses()
        .into_iter()
        .filter_map(|op| match op {
            TxnOpResponse::Get(g) => Some(g),
            _ => None,
        })
        .collect();
    if succeeded {
        let stale = match gets.as_slice() {
            // A writer: no entry but ours exists at `revision`.
            [markers] if !shared => stale_markers(n, markers, |_| false),
            [markers, entries] if shared => stale_among(n, markers, entries),
            _ => return Err(EtcdError::NoHeader),
        };
        // Nothing can be created after ours in the revision that created it.
        return Ok(Queued::Confirmed {
            own_rev: revision,
            confirmed: Confirmed {
                revision,
                stale,
                behind: false,
            },
        });
    }
    let [own, newest, oldest] = gets.as_slice() else {
        return Err(EtcdError::NoHeader);
    };
    let own_rev = own
        .kvs()
        .first()
        .map(|kv| kv.create_revision())
        .ok_or(EtcdError::NoHeader)?;
    if own_rev != revision {
        return Ok(Queued::Already { own_rev });
    }
    let holder = oldest
        .kvs()
        .first()
        .filter(|kv| kv.key() != n.own.as_bytes())
        .map(|kv| String::from_utf8_lossy(kv.value()).into_owned());
    // The compare failed and ours is new, so a conflicting entry other
    // than ours exists.
    let blocker = newest
        .kvs()
        .iter()
        .find(|kv| kv.key() != n.own.as_bytes())
        .map(|kv| Entry {
            key: kv.key().to_vec(),
            create_revision: kv.create_revision(),
        })
        .ok_or(EtcdError::NoHeader)?;
    Ok(Queued::Behind {
        own_rev,
        blocker,
        holder,
    })
}

/// Whether an entry created after ours is among `entries`.
fn any_behind(entries: &GetResponse, own_rev: i64) -> bool {
    entries
        .kvs()
        .iter()
        .any(|kv| kv.create_revision() > own_rev)
}

/// Markers (value: their holder's entry) whose entry is gone, ours aside:
/// holders that left without a clean release (step 4). `live(entry)`:
/// whether that entry exists.
fn stale_markers(n: &Names, markers: &GetResponse, live: impl Fn(&[u8]) -> bool) -> Vec<Vec<u8>> {
    markers
        .kvs()
        .iter()
        .filter(|kv| kv.key() != n.own_marker.as_bytes() && !live(kv.value()))
        .map(|kv| kv.key().to_vec())
        .collect()
}

/// [`stale_markers`] against the entries read in the same revision.
fn stale_among(n: &Names, markers: &GetResponse, entries: &GetResponse) -> Vec<Vec<u8>> {
    let live: std::collections::HashSet<&[u8]> = entries.kvs().iter().map(|kv| kv.key()).collect();
    stale_markers(n, markers, |entry| live.contains(entry))
}

/// Step 2: the entry that blocks ours (created before it, and a writer if we
/// are a reader), and the store's revision when we looked; `None` = we hold.
pub async fn blocker(
    c: &Client,
    n: &Names,
    own_rev: i64,
    shared: bool,
) -> Result<(Option<Entry>, i64), EtcdError> {
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
        .map(|kv| Entry {
            key: kv.key().to_vec(),
            create_revision: kv.create_revision(),
        });
    Ok((found, rev))
}

/// What [`confirm_if_first`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum First {
    /// No entry before ours: confirmed (steps 3-4).
    Confirmed(Confirmed),
    /// `blocker` is before ours (the last one: our predecessor), as the
    /// store was at revision `seen_at`.
    Behind { blocker: Entry, seen_at: i64 },
    /// Our entry is gone (the lease was lost).
    Gone,
}

/// Steps 2-4 for a writer's entry queued at `own_rev`, in one round trip:
/// one transaction guarded by `create_revision(own) == own_rev` and by a
/// range compare, `create_revision > own_rev - 1` over every entry of the
/// key (ours among them, so the range is never empty: etcd compares an
/// empty range as one key with revision 0). When both hold, no entry is
/// before ours and the transaction confirms as [`confirm`] does; else it
/// reads our entry and our predecessor, which [`blocker`] would have
/// answered. A reader's entry has no such compare (its blockers are the
/// writers before it, a range that may be empty): it looks, then confirms.
pub async fn confirm_if_first(
    c: &Client,
    n: &Names,
    own_rev: i64,
    node: &str,
    lease: i64,
) -> Result<First, EtcdError> {
    let mut c = c.clone();
    let txn = Txn::new()
        .when([
            Compare::create_revision(n.own.as_str(), CompareOp::Equal, own_rev),
            Compare::create_revision(n.dir.as_str(), CompareOp::Greater, own_rev - 1).with_prefix(),
        ])
        .and_then(confirm_ops(n, node, lease))
        .or_else([
            TxnOp::get(n.own.as_str(), Some(GetOptions::new().with_keys_only())),
            TxnOp::get(
                n.dir.as_str(),
                Some(
                    GetOptions::new()
                        .with_prefix()
                        .with_keys_only()
                        .with_max_create_revision(own_rev - 1)
                        .with_sort(SortTarget::Create, SortOrder::Descend)
                        .with_limit(1),
                ),
            ),
        ]);
    let resp = timed(c.txn(txn)).await?;
    let revision = resp.header().ok_or(EtcdError::NoHeader)?.revision();
    let succeeded = resp.succeeded();
    let gets: Vec<GetResponse> = resp
        .op_responses()
        .into_iter()
        .filter_map(|op| match op {
            TxnOpResponse::Get(g) => Some(g),
            _ => None,
        })
        .collect();
    let [first, second] = gets.as_slice() else {
        return Err(EtcdError::NoHeader);
    };
    if succeeded {
        return Ok(First::Confirmed(Confirmed {
            revision,
            stale: stale_among(n, first, second),
            behind: any_behind(second, own_rev),
        }));
    }
    if first
        .kvs()
        .first()
        .is_none_or(|kv| kv.create_revision() != own_rev)
    {
        return Ok(First::Gone);
    }
    // The compare failed with our entry in place: an entry is before ours.
    let blocker = second
        .kvs()
        .first()
        .map(|kv| Entry {
            key: kv.key().to_vec(),
            create_revision: kv.create_revision(),
        })
        .ok_or(EtcdError::NoHeader)?;
    Ok(First::Behind {
        blocker,
        seen_at: revision,
    })
}

/// How long a waiter waits for its blocker before it knocks again naming
/// it ([`deleted`]), doubling up to [`KNOCK_AGAIN_MAX`]. A handover takes
/// the minimum hold and a few ms, so most waits never knock again.
pub const KNOCK_AGAIN_FIRST: Duration = Duration::from_secs(1);
pub const KNOCK_AGAIN_MAX: Duration = Duration::from_secs(8);

/// Step 2, waiting: returns once the entry `blocker`, which we saw at
/// revision `seen_at`, is deleted, as the session's shared watch tells
/// (its host may have queued again since, under the same name: an entry of
/// that name created later is not it).
///
/// While it waits, it knocks again (our knock `n.own_knock`, attached to
/// `lease`), its value naming the blocker, after [`KNOCK_AGAIN_FIRST`] and
/// then at doubling intervals: a blocker that is a stray entry (a late
/// copy of its host's queue transaction, docs/cluster.md "Late copies of
/// a step") is not waited on by its own host, which learns of it from
/// this knock and deletes it ([`remove_stray`]). Each knock is sent once;
/// a lost one is made up by the next.
pub async fn deleted(
    c: &Client,
    watches: &Watches,
    n: &Names,
    lease: i64,
    blocker: &Entry,
    seen_at: i64,
) -> Result<(), EtcdError> {
    let entry = blocker.key.as_slice();
    let look = || async {
        let mut c = c.clone();
        let resp = timed(c.get(entry, Some(GetOptions::new().with_keys_only()))).await?;
        Ok(resp
            .kvs()
            .first()
            .is_none_or(|kv| kv.create_revision() != blocker.create_revision))
    };
    let knock_again = async {
        let mut every = KNOCK_AGAIN_FIRST;
        loop {
            tokio::time::sleep(every).await;
            let mut c = c.clone();
            let put = c.put(
                n.own_knock.as_str(),
                entry,
                Some(PutOptions::new().with_lease(lease)),
            );
            if let Err(e) = timed(put).await {
                tracing::debug!(error = %e, "a knock naming the blocker failed; knocking again later");
            }
            every = (every * 2).min(KNOCK_AGAIN_MAX);
        }
    };
    tokio::select! {
        waited = watches.wait(Wanted::Deleted { entry }, seen_at, look) => waited,
        never = knock_again => never,
    }
}

/// The key and mode of `entry` (a knock's value: the entry its writer
/// waits for) when it is one of this host's entries, `P/lock/<hex key>/<r|w>/<lease hex>`
/// with our `lease`; `None` otherwise.
pub fn ours(etcd_prefix: &str, lease: i64, entry: &[u8]) -> Option<(Vec<u8>, bool)> {
    let entry = std::str::from_utf8(entry).ok()?;
    let rest = entry.strip_prefix(etcd_prefix)?.strip_prefix("/lock/")?;
    let (hex, mode_lease) = rest.split_once('/')?;
    let shared = match mode_lease.split_once('/')? {
        ("w", l) if l == format!("{lease:x}") => false,
        ("r", l) if l == format!("{lease:x}") => true,
        _ => return None,
    };
    if hex.len() % 2 != 0 {
        return None;
    }
    let key = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    Some((key, shared))
}

/// Deletes this host's entry `n.own` while this host does not want the key
/// in that mode (the caller's promise: the agent runs it in the key's own
/// place, and a later want of the key waits for it): the entry is then a
/// stray, put back by a late copy of a queue transaction (docs/cluster.md,
/// "Late copies of a step"). With it go our held marker if it names that
/// entry (the late copy won and wrote it: no local grant was ever made
/// under it), and our knock when `alone` (no want of the key here in the
/// other mode, whose knock it would be). Returns whether there was one.
///
/// The delete is guarded by the entry's mod revision as read: a copy of
/// this very transaction applied late, after a later want of the key
/// queued a legitimate entry, finds another revision and deletes nothing.
/// The marker is deleted only while it still names the stray: a marker of
/// ours written for an entry in the other mode (held here now) stays.
pub async fn remove_stray(c: &Client, n: &Names, alone: bool) -> Result<bool, EtcdError> {
    let mut c = c.clone();
    loop {
        let resp = timed(c.get(n.own.as_str(), Some(GetOptions::new().with_keys_only()))).await?;
        let Some(seen) = resp.kvs().first().map(|kv| kv.mod_revision()) else {
            return Ok(false);
        };
        let marker = Txn::new()
            .when([Compare::value(
                n.own_marker.as_str(),
                CompareOp::Equal,
                n.own.as_str(),
            )])
            .and_then([TxnOp::delete(n.own_marker.as_str(), None)]);
        let mut ops = vec![TxnOp::delete(n.own.as_str(), None), TxnOp::txn(marker)];
        if alone {
            ops.push(TxnOp::delete(n.own_knock.as_str(), None));
        }
        let txn = Txn::new()
            .when([Compare::mod_revision(
                n.own.as_str(),
                CompareOp::Equal,
                seen,
            )])
            .and_then(ops);
        if timed(c.txn(txn)).await?.succeeded() {
            return Ok(true);
        }
    }
}

/// A confirmed node grant: the token revision, and the stale held markers
/// (holders that went away without a clean release) it must wait out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confirmed {
    pub revision: i64,
    pub stale: Vec<Vec<u8>>,
    /// Another host had queued behind us by `revision`: the callback is due.
    pub behind: bool,
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
        .and_then(confirm_ops(n, node, lease));
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
    Ok(Some(Confirmed {
        revision,
        stale: stale_among(n, markers, entries),
        behind: any_behind(entries, own_rev),
    }))
}

/// Step 5: a clean release: delete our entry, our held marker and our
/// knock, and the stale markers whose lock-delay we waited out, in one transaction. Does
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
        TxnOp::delete(n.own_knock.as_str(), None),
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
/// host waiting for the key) exists. `seen_at`: a revision at which we read
/// the key's entries and found none after ours (our confirm's). What wakes
/// the wait is a knock written after `own_rev` (a host queues behind with
/// a knock, [`queue_and_look`]); the entries are what it reads.
pub async fn someone_behind(
    c: &Client,
    watches: &Watches,
    n: &Names,
    own_rev: i64,
    seen_at: i64,
) -> Result<(), EtcdError> {
    let look = || async {
        let mut c = c.clone();
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
        Ok(!resp.kvs().is_empty())
    };
    let wanted = Wanted::Later {
        dir: n.knock_dir.as_bytes(),
        after: own_rev,
    };
    watches.wait(wanted, seen_at, look).await
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
        assert_eq!(n.own_knock, "/fl/knock/676c6f62616c2f612062/k/1f");
        assert_eq!(
            crate::watches::dir_of(n.own_knock.as_bytes()),
            Some(n.knock_dir.as_bytes())
        );
        assert!(is_writer(&n.dir, n.own.as_bytes()));
        let r = Names::new("/fl", b"global/a b", true, 0x1f);
        assert!(!is_writer(&r.dir, r.own.as_bytes()));
    }

    #[test]
    fn a_knock_names_an_entry_of_ours_only_under_our_prefix_and_lease() {
        let key = b"global/a b".to_vec();
        let w = Names::new("/fl", &key, false, 0x1f).own;
        let r = Names::new("/fl", &key, true, 0x1f).own;
        assert_eq!(ours("/fl", 0x1f, w.as_bytes()), Some((key.clone(), false)));
        assert_eq!(ours("/fl", 0x1f, r.as_bytes()), Some((key, true)));
        assert_eq!(ours("/fl", 0x1, w.as_bytes()), None, "another lease");
        assert_eq!(ours("/f", 0x1f, w.as_bytes()), None, "another prefix");
        assert_eq!(ours("/fl", 0x1f, b"/fl/lock/6/w/1f"), None, "odd hex");
        assert_eq!(ours("/fl", 0x1f, b"/fl/lock/67/x/1f"), None, "no mode");
        assert_eq!(ours("/fl", 0x1f, b""), None);
    }
}
