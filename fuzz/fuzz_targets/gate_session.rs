//! A session against the broker's grant engine with a global key: the node
//! gate (`forelockd::locks::model_nodes`) against a scripted cluster agent.
//!
//! Input: a byte string; each pair of bytes picks the next step among those
//! the model offers in the current state: the clients' acquires (fast,
//! checking the slot's safe time after the CAS; slow; shared; try),
//! releases, queueing, cancels, dropped connections, deaths, evictions,
//! broker restarts (unbounded), one scribble, a hostile client's raw
//! requests, and the agent's steps (grants, callbacks, a hint, releases, a
//! fence after the lease's safe time passed, the tick, the minimum hold, a
//! prefetch, a clean stop), with its events in flight delivered in order.
//!
//! Property: after every step, the engine's promises hold, and the gate's:
//! no local grant of the global key without a valid node grant covering
//! its token; no release at etcd under a standing local hold; no hold
//! standing without the node grant; none called lost while it stands. The
//! explorer checks the same exhaustively to a small depth; this goes deep.
#![no_main]

use forelockd::locks::model::Explorer;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let ex = Explorer::new(2, 2, u32::MAX, true, true).with_cluster();
    if let Err(why) = ex.session(3, data) {
        panic!("{why}");
    }
});
