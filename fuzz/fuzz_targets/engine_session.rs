//! A hostile session against the broker's grant engine.
//!
//! Input: a byte string; each pair of bytes picks the next step among those
//! the model offers in the current state (`forelockd::locks::model`): fast and
//! slow acquires, releases, queueing, cancels, dropped connections, `Bye`,
//! deaths, evictions, broker restarts (unbounded), one scribble of a
//! client-writable field, and a hostile client's raw requests (releases of
//! arbitrary slots and tokens, cancels of arbitrary requests, reserved and
//! repeated request ids, Hellos claiming other records).
//!
//! Property: after every step, the model's promises hold (never two
//! exclusive holders, tokens strictly increasing per key, no waiter starving
//! while its key is free, a live client's locks still held, a dead client's
//! released, the ledger agreeing with the engine). The explorer checks the
//! same promises exhaustively to a small depth; this target goes deep.
#![no_main]

use forelockd::locks::model::Explorer;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let ex = Explorer::new(2, 2, u32::MAX, true, true);
    if let Err(why) = ex.session(3, data) {
        panic!("{why}");
    }
});
