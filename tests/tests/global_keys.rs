//! Global keys through real brokers: two `forelockd`s (two "hosts" on one
//! machine, each with its own runtime dir) against one real etcd. Clients of
//! both take `global/…` keys; at most one holds at a time and the tokens the
//! holders present strictly increase. A hold whose lease is revoked behind
//! the broker's back is reported lost.
//!
//! The fault tests across network namespaces are in `cluster.rs`.

mod support;

use forelock_tests::etcd::{
    LocalEtcd, cluster_config, cluster_status as status, revoke_the_lease_of,
};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::*;

#[test]
fn a_global_key_has_one_holder_across_two_brokers_and_its_tokens_increase() {
    let Some(etcd) = LocalEtcd::start() else {
        return;
    };
    let (da, db) = (TempDir::new("gk-a"), TempDir::new("gk-b"));
    let _a = Broker::start(da.path(), &cluster_config("a", &etcd.url));
    let _b = Broker::start(db.path(), &cluster_config("b", &etcd.url));
    let inside = Arc::new(AtomicBool::new(false));
    let accepted = Arc::new(Mutex::new(0u64));
    let grants = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    for (i, dir) in [da.path(), da.path(), db.path(), db.path()]
        .into_iter()
        .enumerate()
    {
        let (dir, inside, accepted, grants) = (
            dir.to_path_buf(),
            inside.clone(),
            accepted.clone(),
            grants.clone(),
        );
        threads.push(std::thread::spawn(move || {
            let client = forelock::Client::connect_to(&dir).expect("connect");
            for _ in 0..15 {
                let guard = client.lock("global/counter").expect("lock global/counter");
                assert!(
                    !inside.swap(true, Ordering::SeqCst),
                    "thread {i}: two holders"
                );
                let token = guard.token();
                {
                    let mut last = accepted.lock().unwrap();
                    assert!(
                        token > *last,
                        "thread {i}: token {token:#x} after {:#x}",
                        *last
                    );
                    *last = token;
                }
                std::thread::sleep(Duration::from_millis(1));
                inside.store(false, Ordering::SeqCst);
                guard.release().expect("release");
                grants.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in threads {
        t.join().expect("a client thread failed");
    }
    assert_eq!(grants.load(Ordering::Relaxed), 60);
    // The key passed between the hosts: both took node grants.
    let last = *accepted.lock().unwrap();
    assert!(
        last >> 24 > 0,
        "a global token carries the etcd revision: {last:#x}"
    );
}

#[test]
fn a_local_key_with_the_same_name_on_two_brokers_is_not_global() {
    let Some(etcd) = LocalEtcd::start() else {
        return;
    };
    let (da, db) = (TempDir::new("lk-a"), TempDir::new("lk-b"));
    let _a = Broker::start(da.path(), &cluster_config("a", &etcd.url));
    let _b = Broker::start(db.path(), &cluster_config("b", &etcd.url));
    let ca = forelock::Client::connect_to(da.path()).unwrap();
    let cb = forelock::Client::connect_to(db.path()).unwrap();
    let ga = ca.lock("local/k").unwrap();
    let gb = cb.try_lock("local/k").expect("a local key is per host");
    // A local hold stands while its process lives, asked through the
    // broker or granted on the fast path (a prepared key taken by CAS).
    ga.check().expect("a local hold stands");
    drop((ga, gb));
    let fast = ca.lock("local/k").unwrap();
    assert!(fast.fast_path(), "the released key stays prepared");
    fast.check().expect("a fast-path hold stands");
}

#[test]
fn a_hold_whose_lease_is_revoked_is_lost_and_another_host_takes_the_key() {
    let Some(etcd) = LocalEtcd::start() else {
        return;
    };
    let (da, db) = (TempDir::new("lost-a"), TempDir::new("lost-b"));
    let _a = Broker::start(da.path(), &cluster_config("a", &etcd.url));
    let _b = Broker::start(db.path(), &cluster_config("b", &etcd.url));
    let ca = forelock::Client::connect_to(da.path()).unwrap();
    let held = ca.lock("global/x").unwrap();
    held.check()
        .expect("a global hold stands while the lease does");
    let old = held.token();
    revoke_the_lease_of(da.path(), &etcd.url);
    let cb = forelock::Client::connect_to(db.path()).unwrap();
    let taken = cb.lock("global/x").unwrap();
    assert!(taken.token() > old, "{:#x} after {old:#x}", taken.token());
    // The holder learns it before its release when it asks.
    match held.check() {
        Err(forelock::Error::Lost { message }) => assert!(message.contains("lease"), "{message}"),
        other => panic!("expected Lost from check, got {other:?}"),
    }
    match held.release() {
        Err(forelock::Error::Lost { message }) => assert!(message.contains("lease"), "{message}"),
        other => panic!("expected Lost, got {other:?}"),
    }
    taken.release().unwrap();
}

#[test]
fn brokers_with_gossip_see_each_other_in_their_status() {
    let Some(etcd) = LocalEtcd::start() else {
        return;
    };
    let (da, db) = (TempDir::new("gs-a"), TempDir::new("gs-b"));
    let port = |l: std::net::UdpSocket| l.local_addr().unwrap().port();
    let pa = port(std::net::UdpSocket::bind("127.0.0.1:0").unwrap());
    let pb = port(std::net::UdpSocket::bind("127.0.0.1:0").unwrap());
    let gossip = |me: u16, peer: u16| {
        format!("gossip_addr = \"127.0.0.1:{me}\"\nseeds = [\"127.0.0.1:{peer}\"]\n")
    };
    let _a = Broker::start(
        da.path(),
        &(cluster_config("a", &etcd.url) + &gossip(pa, pb)),
    );
    let _b = Broker::start(
        db.path(),
        &(cluster_config("b", &etcd.url) + &gossip(pb, pa)),
    );
    let end = Instant::now() + PATIENCE;
    loop {
        let s = status(da.path());
        let up = s["members"]
            .as_array()
            .is_some_and(|m| m.iter().any(|m| m["node"] == "b" && m["up"] == true));
        if up {
            break;
        }
        assert!(Instant::now() < end, "a never saw b by gossip: {s}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A broker stopped with SIGTERM (a planned restart, an upgrade) gives its
/// node grants up at etcd on the way out: another host takes the key after
/// the lock-delay, not after the stopped broker's whole lease TTL (60 s
/// here, past the test's patience). Its own holder was lost at the stop.
#[test]
fn a_broker_stopped_cleanly_frees_its_global_keys_without_waiting_for_its_lease() {
    let Some(etcd) = LocalEtcd::start() else {
        return;
    };
    let long_lease = |node| {
        cluster_config(node, &etcd.url).replace("lease_ttl_ms = 4000", "lease_ttl_ms = 60000")
    };
    let (da, db) = (TempDir::new("stop-a"), TempDir::new("stop-b"));
    let mut a = Broker::start(da.path(), &long_lease("a"));
    let _b = Broker::start(db.path(), &long_lease("b"));
    let ca = forelock::Client::connect_to(da.path()).unwrap();
    let held = ca.lock("global/stop").unwrap();
    let old = held.token();
    let stopped = a.terminate();
    assert!(stopped.success(), "a clean stop ({stopped:?}): {}", a.log());
    let cb = forelock::Client::connect_to(db.path()).unwrap();
    let taken = cb
        .lock_timeout("global/stop", PATIENCE)
        .unwrap_or_else(|e| panic!("b did not get the key a gave up: {e}"));
    assert!(taken.token() > old, "{:#x} after {old:#x}", taken.token());
    drop(held);
}

/// SIGTERM stops a broker with `[cluster]` through its own stop path (as
/// systemd's stop does), not by the signal's default action: the cluster
/// agent's threads must not take the signal.
#[test]
fn a_cluster_broker_stops_cleanly_on_sigterm() {
    let Some(etcd) = LocalEtcd::start() else {
        return;
    };
    let dir = TempDir::new("sigterm");
    let mut broker = Broker::start(dir.path(), &cluster_config("a", &etcd.url));
    let stopped = broker.terminate();
    assert!(stopped.success(), "exit {stopped:?}: {}", broker.log());
    assert!(
        broker.log().contains("forelockd stopping"),
        "{}",
        broker.log()
    );
}
