//! The agent against a real etcd (Debian's etcd-server) on loopback: node
//! grants pass between two agents in create-revision order, a callback
//! reaches the holder, tokens strictly increase, and a revoked lease fences.
//!
//! Skips with a message when `etcd` is not installed, unless
//! FORELOCK_REQUIRE_CLUSTER=1 (CI), where it fails instead.

use forelock_cluster::{Agent, ClusterConfig, Command, Event};
use forelock_tests::etcd::{LocalEtcd, etcdctl};
use std::time::{Duration, Instant};

fn agent(node: &str, url: &str) -> Agent {
    agent_with_delay(node, url, 300)
}

fn agent_with_delay(node: &str, url: &str, lock_delay_ms: u64) -> Agent {
    Agent::start(ClusterConfig {
        node: node.into(),
        etcd: vec![url.into()],
        etcd_prefix: format!("/fl-test-{}", std::process::id()),
        lease_ttl_ms: 5_000,
        lock_delay_ms,
        ..ClusterConfig::default()
    })
    .unwrap()
}

fn next(a: &Agent, within: Duration) -> Event {
    let end = Instant::now() + within;
    loop {
        if let Some(e) = a.drain().into_iter().next() {
            return e;
        }
        assert!(Instant::now() < end, "no event within {within:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The next event that is not a repeated callback for `key` (the agent
/// says "callback" again once the minimum hold is over).
fn next_but_callback(a: &Agent, key: &[u8], within: Duration) -> Event {
    let end = Instant::now() + within;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        match next(a, left) {
            Event::Callback { key: k } if k == key => continue,
            other => return other,
        }
    }
}

/// Have `a` release its node grant of `key` (lease epoch 1) and wait for
/// etcd to have it, repeated callbacks aside.
fn release(a: &Agent, key: &[u8]) {
    a.send(Command::Release {
        key: key.to_vec(),
        epoch: 1,
    });
    assert_eq!(
        next_but_callback(a, key, Duration::from_secs(10)),
        Event::Released { key: key.to_vec() }
    );
}

fn want(key: &[u8]) -> Command {
    Command::Want {
        key: key.to_vec(),
        shared: false,
        prefetch: false,
    }
}

#[test]
fn node_grants_pass_between_hosts_in_order_with_increasing_tokens() {
    let Some(e) = LocalEtcd::start() else { return };
    let (a, b) = (agent("a", &e.url), agent("b", &e.url));
    let key = b"global/k".to_vec();
    let mut last = 0u64;
    for round in 0..3 {
        a.send(want(&key));
        let Event::Granted { base, .. } = next(&a, Duration::from_secs(15)) else {
            panic!("a: expected a grant")
        };
        assert!(base > last, "round {round}: base {base:#x} after {last:#x}");
        last = base;
        b.send(want(&key));
        assert_eq!(
            next(&a, Duration::from_secs(10)),
            Event::Callback { key: key.clone() }
        );
        // b must not hold while a does; b names a as the holder.
        std::thread::sleep(Duration::from_millis(200));
        assert!(b.drain().is_empty(), "b was granted while a held");
        let holders = |x: &Agent| x.status.lock().unwrap().holders.get(&key).cloned();
        assert_eq!(holders(&b).as_deref(), Some("a"), "round {round}");
        assert_eq!(holders(&a).as_deref(), Some("a"), "round {round}");
        release(&a, &key);
        let Event::Granted { base, .. } = next(&b, Duration::from_secs(10)) else {
            panic!("b: expected a grant")
        };
        assert!(
            base > last,
            "round {round}: b's base {base:#x} after a's {last:#x}"
        );
        last = base;
        b.send(Command::Release {
            key: key.clone(),
            epoch: 1,
        });
        assert_eq!(
            next(&b, Duration::from_secs(10)),
            Event::Released { key: key.clone() }
        );
    }
}

#[test]
fn a_lease_revoked_behind_the_agents_back_fences_it() {
    let Some(e) = LocalEtcd::start() else { return };
    let a = agent("a", &e.url);
    let key = b"global/f".to_vec();
    a.send(want(&key));
    let Event::Granted { epoch, .. } = next(&a, Duration::from_secs(15)) else {
        panic!("expected a grant")
    };
    let id = a.lease.get().id;
    assert!(
        a.lease
            .valid(epoch, forelock_cluster::agent::monotonic_ns())
    );
    etcdctl(&e.url, &["lease", "revoke", &format!("{id:x}")])
        .expect("etcdctl lease revoke (Debian's etcd-client)");
    match next(&a, Duration::from_secs(10)) {
        Event::Fenced { epoch: f, .. } => assert_eq!(f, epoch),
        other => panic!("expected a fence, got {other:?}"),
    }
    assert!(
        !a.lease
            .valid(epoch, forelock_cluster::agent::monotonic_ns())
    );
    // The agent takes a new lease and can hold the key again, with a new epoch.
    a.send(want(&key));
    let Event::Granted { epoch: e2, .. } = next(&a, Duration::from_secs(15)) else {
        panic!("expected a grant under the new lease")
    };
    assert!(e2 > epoch);
}

/// The node-grant model's counterexample (broker/cluster/tests/model.rs):
/// a holder whose lease ended before the next host even queued was never
/// "seen going away", so the first lock-delay rule let the next host grant
/// at once. The held markers make it wait.
#[test]
fn a_holder_gone_before_the_next_host_queued_still_costs_the_lock_delay() {
    let Some(e) = LocalEtcd::start() else { return };
    let a = agent_with_delay("a", &e.url, 3_000);
    let key = b"global/delay".to_vec();
    a.send(want(&key));
    let Event::Granted { .. } = next(&a, Duration::from_secs(15)) else {
        panic!("a: expected a grant")
    };
    // a's lease ends without a release: its entry goes, its marker stays.
    let id = a.lease.get().id;
    etcdctl(&e.url, &["lease", "revoke", &format!("{id:x}")]).expect("etcdctl lease revoke");
    assert!(matches!(
        next(&a, Duration::from_secs(10)),
        Event::Fenced { .. }
    ));
    let b = agent_with_delay("b", &e.url, 3_000);
    b.send(want(&key));
    // Within the first second of the 3 s delay, b must not be granted (a
    // slow machine only makes the grant later, never earlier).
    std::thread::sleep(Duration::from_secs(1));
    assert!(b.drain().is_empty(), "b was granted inside the lock-delay");
    let Event::Granted { .. } = next(&b, Duration::from_secs(15)) else {
        panic!("b: expected a grant after the lock-delay")
    };
    // b released cleanly: the stale marker it waited out is gone, so the
    // next host is not delayed again.
    b.send(Command::Release {
        key: key.clone(),
        epoch: 1,
    });
    assert_eq!(
        next(&b, Duration::from_secs(10)),
        Event::Released { key: key.clone() }
    );
    let markers = etcdctl(
        &e.url,
        &[
            "get",
            "--prefix",
            "--keys-only",
            &format!("/fl-test-{}/held/", std::process::id()),
        ],
    )
    .expect("etcdctl get");
    assert!(markers.trim().is_empty(), "markers left: {markers}");
}

/// A reader that joins a reader still holding on another host finds that
/// host's held marker with its entry live: not a holder gone uncleanly, so
/// no lock-delay (60 s here: a grant within the 15 s patience means it did
/// not wait one). The first transaction reads the entries for a reader to
/// tell live markers from stale ones.
#[test]
fn a_reader_beside_a_live_reader_does_not_wait_the_lock_delay() {
    let Some(e) = LocalEtcd::start() else { return };
    let key = b"global/readers".to_vec();
    let shared = |key: &[u8]| Command::Want {
        key: key.to_vec(),
        shared: true,
        prefetch: false,
    };
    let a = agent_with_delay("a", &e.url, 60_000);
    a.send(shared(&key));
    let Event::Granted { shared: true, .. } = next(&a, Duration::from_secs(15)) else {
        panic!("a: expected a shared grant")
    };
    let b = agent_with_delay("b", &e.url, 60_000);
    b.send(shared(&key));
    let Event::Granted { shared: true, .. } = next(&b, Duration::from_secs(15)) else {
        panic!("b: expected a shared grant beside a's, without the lock-delay")
    };
}

/// A current-thread runtime, a client of `e`, and a key prefix of this
/// process's own: what the tests of the agent's etcd pieces run on.
fn etcd_session(e: &LocalEtcd) -> (tokio::runtime::Runtime, etcd_client::Client, String) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let c = rt
        .block_on(etcd_client::Client::connect([e.url.as_str()], None))
        .unwrap();
    (rt, c, format!("/fl-test-{}", std::process::id()))
}

/// The first transaction (`etcd_lock::queue_and_look`) sent again after it
/// happened (its answer lost: a timeout) finds its entry there and keeps
/// its place: `Already` with the create revision it got the first time,
/// whether that first time won or queued behind another host.
#[test]
fn a_repeated_first_transaction_keeps_the_place_it_got() {
    use forelock_cluster::etcd_lock::{Names, Queued, queue_and_look};
    let Some(e) = LocalEtcd::start() else { return };
    let (rt, mut c, prefix) = etcd_session(&e);
    rt.block_on(async {
        let key = b"global/retried";
        let place = |c: &etcd_client::Client, lease: i64| {
            let names = Names::new(&prefix, key, false, lease);
            let c = c.clone();
            async move { queue_and_look(&c, &names, "n", lease, false).await.unwrap() }
        };
        let first = c.lease_grant(30, None).await.unwrap().id();
        let won = place(&c, first).await;
        let Queued::Confirmed { own_rev, confirmed } = won else {
            panic!("a free key: expected the first transaction to win, got {won:?}")
        };
        assert_eq!(confirmed.revision, own_rev);
        assert_eq!(
            place(&c, first).await,
            Queued::Already { own_rev },
            "a repeated winning transaction"
        );
        let second = c.lease_grant(30, None).await.unwrap().id();
        let behind = place(&c, second).await;
        let Queued::Behind {
            own_rev: second_rev,
            blocker,
            holder,
        } = behind
        else {
            panic!("a held key: expected to queue behind, got {behind:?}")
        };
        assert!(second_rev > own_rev);
        assert_eq!(
            blocker.key,
            Names::new(&prefix, key, false, first).own.into_bytes()
        );
        assert_eq!(blocker.create_revision, own_rev);
        assert_eq!(holder.as_deref(), Some("n"));
        assert_eq!(
            place(&c, second).await,
            Queued::Already {
                own_rev: second_rev
            },
            "a repeated queued transaction"
        );
    });
}

/// The agent's shared watches (`watches::Watches`): a holder's wait for a
/// host queued behind it returns on that host's knock, and one whose entry
/// was queued between the waiter's last read and its registration (the
/// watch had already passed it) finds it by reading the store.
#[test]
fn the_shared_watch_reports_entries_queued_before_and_after_the_wait() {
    use forelock_cluster::etcd_lock::{Names, someone_behind};
    use forelock_cluster::watches::Watches;
    let Some(e) = LocalEtcd::start() else { return };
    let (rt, mut c, prefix) = etcd_session(&e);
    rt.block_on(async {
        let watches = Watches::new(&prefix);
        let watch = tokio::spawn(watches.clone().run(c.clone()));
        let ours = Names::new(&prefix, b"global/w", false, 1);
        let own_rev = c.put(ours.own.as_str(), "a", None).await.unwrap();
        let own_rev = own_rev.header().unwrap().revision();
        // Behind us after the wait started: its entry, then its knock (the
        // watch's event).
        let later = Names::new(&prefix, b"global/w", false, 2);
        let waiting = someone_behind(&c, &watches, &ours, own_rev, own_rev);
        let put_later = async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let mut c = c.clone();
            c.put(later.own.as_str(), "b", None).await.unwrap();
            c.put(later.own_knock.as_str(), "", None).await.unwrap();
        };
        let (waited, ()) = tokio::time::timeout(Duration::from_secs(10), async {
            tokio::join!(waiting, put_later)
        })
        .await
        .expect("the wait did not see the entry queued behind");
        waited.unwrap();
        // Queued (entry and knock) before the wait, which read the store at
        // `other_rev`: the watch has passed it, so the store is read.
        let other = Names::new(&prefix, b"global/v", false, 1);
        let other_rev = c.put(other.own.as_str(), "a", None).await.unwrap();
        let other_rev = other_rev.header().unwrap().revision();
        let behind_other = Names::new(&prefix, b"global/v", false, 2);
        c.put(behind_other.own.as_str(), "b", None).await.unwrap();
        c.put(behind_other.own_knock.as_str(), "", None)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        tokio::time::timeout(
            Duration::from_secs(10),
            someone_behind(&c, &watches, &other, other_rev, other_rev),
        )
        .await
        .expect("the wait missed an entry queued before it")
        .unwrap();
        watch.abort();
    });
}

/// Only a host that queues behind another knocks (`P/knock/`, the watch
/// the holders' callbacks wait on): the first transaction on a free key
/// writes no knock, so no host's watch hears of it; the host queued
/// behind knocks, and its clean release takes the knock away.
#[test]
fn only_a_host_queued_behind_another_knocks() {
    use forelock_cluster::etcd_lock::{Names, Queued, queue_and_look, release};
    let Some(e) = LocalEtcd::start() else { return };
    let (rt, mut c, prefix) = etcd_session(&e);
    rt.block_on(async {
        let key = b"global/knock";
        let knocks = |c: &etcd_client::Client| {
            let mut c = c.clone();
            let dir = format!("{prefix}/knock/");
            async move {
                let opts = etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_keys_only();
                let resp = c.get(dir, Some(opts)).await.unwrap();
                resp.kvs()
                    .iter()
                    .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
                    .collect::<Vec<_>>()
            }
        };
        let first = c.lease_grant(30, None).await.unwrap().id();
        let holder = Names::new(&prefix, key, false, first);
        let won = queue_and_look(&c, &holder, "a", first, false)
            .await
            .unwrap();
        assert!(
            matches!(won, Queued::Confirmed { .. }),
            "a free key: expected the first transaction to win, got {won:?}"
        );
        assert_eq!(knocks(&c).await, Vec::<String>::new(), "a winner knocked");
        let second = c.lease_grant(30, None).await.unwrap().id();
        let waiter = Names::new(&prefix, key, false, second);
        let behind = queue_and_look(&c, &waiter, "b", second, false)
            .await
            .unwrap();
        let Queued::Behind { own_rev, .. } = behind else {
            panic!("a held key: expected the second host to queue behind, got {behind:?}")
        };
        assert_eq!(knocks(&c).await, vec![waiter.own_knock.clone()]);
        release(&c, &waiter, own_rev, &[]).await.unwrap();
        assert_eq!(
            knocks(&c).await,
            Vec::<String>::new(),
            "a clean release left its knock"
        );
    });
}

/// docs/cluster.md, "Late copies of a step": a copy of this host's queue
/// transaction (`etcd_lock::queue_and_look`, hedged or retried) that etcd
/// applies only after the host won with another copy, held and released
/// puts the host's entry (and, on a free key, its held marker) back with
/// nobody waiting here. The test applies that very transaction again
/// after the release, as a late copy would be. Another host must still
/// get the key (the stray entry's owner deletes it when the waiter names
/// it); before the fix the entry blocked the key for as long as the
/// owner's lease lived, that is, for as long as its broker ran.
#[test]
fn a_late_copy_of_a_queue_transaction_does_not_block_the_key_for_other_hosts() {
    use forelock_cluster::etcd_lock::{Names, Queued, queue_and_look};
    let Some(e) = LocalEtcd::start() else { return };
    let (a, b) = (agent("a", &e.url), agent("b", &e.url));
    let (rt, c, prefix) = etcd_session(&e);
    // A free key (the late copy wins again, with its held marker) and a key
    // another host holds when the copy lands (it queues again, behind).
    let free = b"global/late-free".to_vec();
    let held = b"global/late-held".to_vec();
    for key in [&free, &held] {
        a.send(want(key));
        let Event::Granted { .. } = next(&a, Duration::from_secs(15)) else {
            panic!("a: expected a grant of {key:?}")
        };
        release(&a, key);
    }
    let id = a.lease.get().id;
    let late_copy = |key: &[u8]| {
        let names = Names::new(&prefix, key, false, id);
        rt.block_on(queue_and_look(&c, &names, "a", id, false))
            .unwrap()
    };
    let copy = late_copy(&free);
    assert!(
        matches!(copy, Queued::Confirmed { .. }),
        "a free key: the late copy wins again, got {copy:?}"
    );
    // A third host holds `held` when a's late copy lands behind it.
    let h = agent("h", &e.url);
    h.send(want(&held));
    let Event::Granted { .. } = next(&h, Duration::from_secs(15)) else {
        panic!("h: expected a grant")
    };
    let copy = late_copy(&held);
    assert!(
        matches!(copy, Queued::Behind { .. }),
        "a held key: the late copy queues behind, got {copy:?}"
    );
    // h is called back by the late copy's knock and lets the key go.
    assert_eq!(
        next(&h, Duration::from_secs(10)),
        Event::Callback { key: held.clone() }
    );
    release(&h, &held);
    // b wants both keys: a neither holds nor wants them, so b gets each
    // (generous bound: a's lease is renewed for as long as a runs).
    for key in [&free, &held] {
        b.send(want(key));
        match next(&b, Duration::from_secs(30)) {
            Event::Granted { .. } => {}
            other => panic!("b: expected a grant of {key:?}, got {other:?}"),
        }
        release(&b, key);
    }
    // a still gets both back, and nothing of a's is left behind.
    for key in [&free, &held] {
        a.send(want(key));
        let Event::Granted { .. } = next(&a, Duration::from_secs(15)) else {
            panic!("a: expected a grant of {key:?} again")
        };
        release(&a, key);
    }
    let left = etcdctl(
        &e.url,
        &["get", "--prefix", "--keys-only", &format!("{prefix}/lock/")],
    )
    .expect("etcdctl get");
    assert!(left.trim().is_empty(), "entries left: {left}");
}

/// The same late copy, of a writer's queue transaction, and then the same
/// host wants the key as a reader: its reader's entry waits behind its
/// own stray writer's entry, which it must delete although it now wants
/// the key (in the other mode).
#[test]
fn a_host_does_not_wait_behind_its_own_stray_entry_in_the_other_mode() {
    use forelock_cluster::etcd_lock::{Names, queue_and_look};
    let Some(e) = LocalEtcd::start() else { return };
    let a = agent("a", &e.url);
    let (rt, c, prefix) = etcd_session(&e);
    let key = b"global/late-mode".to_vec();
    a.send(want(&key));
    let Event::Granted { .. } = next(&a, Duration::from_secs(15)) else {
        panic!("a: expected a grant")
    };
    release(&a, &key);
    let id = a.lease.get().id;
    let names = Names::new(&prefix, &key, false, id);
    rt.block_on(queue_and_look(&c, &names, "a", id, false))
        .unwrap();
    a.send(Command::Want {
        key: key.clone(),
        shared: true,
        prefetch: false,
    });
    match next(&a, Duration::from_secs(30)) {
        Event::Granted { shared: true, .. } => {}
        other => panic!("a: expected a shared grant, got {other:?}"),
    }
}
