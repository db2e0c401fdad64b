//! The exhaustive explorer: breadth-first over every interleaving of the
//! model's steps ([`super::model`], whose docs list the steps, the promises
//! checked after each, and the bounds), deduplicating states.

use super::model::{Explorer, Have, Step};
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
