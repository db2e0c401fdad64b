//! The exhaustive explorer: breadth-first over every interleaving of the
//! model's steps ([`super::model`], whose docs list the steps, the promises
//! checked after each, and the bounds), deduplicating states.

use super::model::{Explorer, Have, Step};
use super::model_nodes::NodeStep;
use std::collections::HashSet;

/// Breadth-first to `depth`, deduplicating states. Returns the states seen.
fn explore(ex: &Explorer, clients: usize, depth: usize) -> usize {
    let mut seen = HashSet::new();
    let mut frontier = vec![ex.initial(clients)];
    seen.insert(frontier[0].digest());
    for level in 1..=depth {
        let mut next = Vec::new();
        for s in &frontier {
            for step in ex.steps(s) {
                let mut t = s.fork();
                if let Err(why) = ex.apply(&mut t, step) {
                    panic!("{why}\nafter {:?}", t.trace);
                }
                // The last level is checked, not kept: memory stays that of
                // the level before.
                if seen.insert(t.digest()) && level < depth {
                    next.push(t);
                }
            }
        }
        frontier = next;
    }
    seen.len()
}

fn depth(default: usize) -> usize {
    std::env::var("FORELOCK_EXPLORE_DEPTH")
        .ok()
        .and_then(|d| d.parse().ok())
        .unwrap_or(default)
}

#[test]
fn two_clients_two_keys_with_restarts_and_scribbles() {
    let ex = Explorer::new(2, 2, 2, true, false);
    let states = explore(&ex, 2, depth(4));
    eprintln!("explored {states} states");
    assert!(states > 1000, "the explorer went nowhere: {states} states");
}

#[test]
fn three_clients_one_key_with_restarts() {
    let ex = Explorer::new(1, 1, 1, false, false);
    let states = explore(&ex, 3, depth(6));
    eprintln!("explored {states} states");
    assert!(states > 1000, "the explorer went nowhere: {states} states");
}

/// The explorer finds a planted bug: a manager that forgets a fast-path
/// hold it took over at restart (defect 1 of "Never two holders") is caught.
#[test]
fn the_explorer_catches_a_forgotten_take_over() {
    let ex = Explorer::new(1, 1, 1, false, false);
    let mut s = ex.initial(2);
    for step in [
        Step::Slow((0, 0), 0, false, true),
        Step::Release((0, 0)),
        Step::Fast((0, 0), 0),
        Step::Slow((1, 0), 0, false, true),
    ] {
        ex.apply(&mut s, step).unwrap();
    }
    // Plant the bug: the ledger loses client 0's taken-over hold.
    let record = s.clients[0].record;
    let slot = match s.clients[0].lanes[0] {
        Have::Holding { slot, .. } => slot,
        ref other => panic!("{other:?}"),
    };
    s.m.ledger.remove_hold(record, slot, None);
    let why = ex
        .apply(&mut s, Step::Restart)
        .expect_err("a double grant went unnoticed");
    assert!(why.contains("has holders"), "{why}");
}

#[test]
fn two_clients_and_a_hostile_one_sending_raw_requests() {
    let ex = Explorer::new(2, 1, 1, false, true);
    let states = explore(&ex, 3, depth(3));
    eprintln!("explored {states} states");
    assert!(states > 1000, "the explorer went nowhere: {states} states");
}

#[test]
fn two_clients_one_key_on_the_contended_path_with_restarts() {
    // Sleepers' bits (PARKED, HUNGRY) on held words, releases that hand off,
    // claims, and every broker step (take-over by a slow request, death of
    // the holder or of the hungry sleeper, eviction, restart) around them.
    let ex = Explorer::new(1, 1, 1, false, false).with_contended();
    // The depth reaches a claimed hand-off (the directed run below shows the
    // path: five steps) with one step to spare for a broker step after it.
    let mut s = ex.initial(2);
    for step in [
        Step::Slow((0, 0), 0, false, true),
        Step::Release((0, 0)),
        Step::Fast((0, 0), 0),
        Step::Mark((1, 0), 0, true),
        Step::Release((0, 0)),
    ] {
        ex.apply(&mut s, step).unwrap();
    }
    ex.apply(&mut s, Step::Claim((1, 0), 0)).unwrap();
    assert!(
        matches!(s.clients[1].lanes[0], Have::Holding { fast: Some(_), .. }),
        "the hungry sleeper claimed the hand-off: {:?}",
        s.clients[1].lanes[0]
    );
    let states = explore(&ex, 2, depth(6));
    assert!(states > 100, "explored only {states} states");
}

/// The node gate (`model_nodes`): the exploration reaches a cached global
/// key taken by one CAS, the lease's safe time passing under its holder,
/// a client's CAS refused after it, and the holder lost at the tick.
#[test]
fn the_node_gate_model_reaches_a_cached_key_and_its_lost_holder() {
    let ex = Explorer::new(1, 1, 1, false, false).with_cluster();
    let mut s = ex.initial(2);
    for step in [
        Step::Slow((0, 0), 0, false, true),
        Step::Node(NodeStep::Grant),
        Step::Node(NodeStep::Deliver),
        Step::Release((0, 0)),
        Step::Fast((1, 0), 0),
    ] {
        ex.apply(&mut s, step).unwrap();
    }
    assert!(
        matches!(s.clients[1].lanes[0], Have::Holding { fast: Some(_), .. }),
        "the cached global key is taken by one CAS: {:?}",
        s.clients[1].lanes[0]
    );
    ex.apply(&mut s, Step::Node(NodeStep::PastSafe)).unwrap();
    ex.apply(&mut s, Step::Fast((0, 0), 0)).unwrap();
    assert_eq!(s.clients[0].lanes[0], Have::Idle, "held: the CAS fails");
    ex.apply(&mut s, Step::Release((1, 0))).unwrap();
    ex.apply(&mut s, Step::Fast((0, 0), 0)).unwrap();
    assert_eq!(
        s.clients[0].lanes[0],
        Have::Idle,
        "past the safe time a won CAS is given back"
    );
    ex.apply(&mut s, Step::Slow((0, 0), 0, false, true))
        .unwrap();
    assert!(matches!(s.clients[0].lanes[0], Have::Queued { .. }));
    // The tick finds the lease past its safe time: the gate lets the key go.
    ex.apply(&mut s, Step::Node(NodeStep::Tick)).unwrap();
    assert!(
        !s.m.holds_node_grant(b"a"),
        "the node grant went at the tick"
    );
}

/// The node gate (`model_nodes`): key `a` global; the agent's grants,
/// callbacks, hints, releases and fence, the lease's safe time passing,
/// prefetch, the minimum hold, a restart and a clean stop, in every order
/// with two clients' fast and slow acquisitions and releases. Depth 6 in
/// CI (144,354 states); the long local run, and the bugs it catches, are in
/// docs/cluster.md ("What is guaranteed").
#[test]
fn two_clients_a_global_key_with_the_node_gate() {
    let ex = Explorer::new(1, 1, 1, false, false).with_cluster();
    let states = explore(&ex, 2, depth(6));
    eprintln!("explored {states} states");
    assert!(states > 1000, "the explorer went nowhere: {states} states");
}
