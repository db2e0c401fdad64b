//! Arbitrary bytes as a runtime file: the lock table, the access-event file and
//! the score file (the same bytes are offered to each opener; the magic decides
//! which one gets past its header check).
//!
//! Each opener must return an error, or a view whose every accessor stays in
//! bounds: the walk below visits every slot, index entry and client record, looks
//! a few keys up, reads and writes the event rings and the score snapshot.
//!
//! Out-of-bounds detection does not rely on a sanitizer (CI may build with
//! `--sanitizer none`): the bytes are copied to the END of a mapping followed by
//! a PROT_NONE guard page, so a read or write 64 bytes or more past the file
//! faults; every reference the table view hands out is also checked against
//! the buffer explicitly. (The file starts 64-aligned, so a file whose length
//! is not a multiple of 64 has up to 63 readable bytes after it: only a
//! sanitizer build, `cargo fuzz run` on nightly without `--sanitizer none`,
//! sees an overrun that small.)

#![no_main]

use libfuzzer_sys::fuzz_target;
use shm_layout::events::{EventCursor, EventsView, Outcome};
use shm_layout::key_hash;
use shm_layout::lockword::{Word, acquire_exclusive_transition, released};
use shm_layout::scores::{Scored, ScoresView};
use shm_layout::table::{
    CLIENT_RECORD_SIZE, HEADER_SIZE, INDEX_ENTRY_SIZE, SLOT_SIZE, TableView, WAIT_CELLS,
};
use std::cell::Cell;
use std::sync::atomic::Ordering;

/// The largest input tried (libFuzzer's default -max_len is 4096).
const REGION: usize = 1 << 20;
const PAGE: usize = 4096;

thread_local! {
    /// Start of a REGION-byte read-write mapping followed by a guard page.
    static GUARDED: Cell<usize> = const { Cell::new(0) };
}

/// A REGION-byte mapping whose next page is PROT_NONE (made once per thread).
fn guarded_region() -> *mut u8 {
    GUARDED.with(|cell| {
        if cell.get() == 0 {
            // SAFETY: an anonymous private mapping at an address of the
            // kernel's choosing has no preconditions; the result is checked.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    REGION + PAGE,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            assert_ne!(p, libc::MAP_FAILED, "mmap of the fuzz buffer");
            let guard = (p as usize + REGION) as *mut libc::c_void;
            // SAFETY: `guard` is the last page of the mapping made just above.
            let rc = unsafe { libc::mprotect(guard, PAGE, libc::PROT_NONE) };
            assert_eq!(rc, 0, "mprotect of the guard page");
            cell.set(p as usize);
        }
        cell.get() as *mut u8
    })
}

/// Asserts that `[p, p + size)` lies inside the file `[lo, lo + len)`.
fn assert_inside(p: *const u8, size: usize, lo: *const u8, len: usize) {
    let (p, lo) = (p as usize, lo as usize);
    assert!(
        p >= lo,
        "reference {p:#x} starts before the file at {lo:#x}"
    );
    assert!(
        p + size <= lo + len,
        "reference {p:#x}+{size} ends past the file's end {:#x}",
        lo + len
    );
}

fuzz_target!(|data: &[u8]| {
    if data.len() > REGION {
        return;
    }
    let region = guarded_region();
    let padded = data.len().next_multiple_of(64);
    let base = region.wrapping_add(REGION - padded);
    // SAFETY:
    // - `base..base + data.len()` lies inside the REGION-byte writable part of
    //   the mapping (padded <= REGION);
    // - `data` is a separate allocation of libFuzzer's, so the two don't overlap.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), base, data.len()) };
    // The slack after a file whose length is not a multiple of 64: zeroes.
    let slack = base.wrapping_add(data.len());
    // SAFETY: `slack..base + padded` is inside the writable part of the mapping.
    unsafe { std::ptr::write_bytes(slack, 0, padded - data.len()) };
    walk_table(base, data.len());
    walk_events(base, data.len());
    walk_scores(base, data.len());
});

fn walk_table(base: *mut u8, len: usize) {
    // SAFETY: `base` is 64-aligned (REGION and `padded` are multiples of 64 on
    // a page-aligned mapping), valid for `len` bytes for this whole call, and
    // nobody else writes it.
    let Ok(view) = (unsafe { TableView::new(base as *const u8, len) }) else {
        return;
    };
    let base = base as *const u8;
    let g = view.geometry();
    assert!(g.file_size <= len, "the geometry claims more than the file");
    assert_inside(
        (view.header() as *const shm_layout::table::Header).cast(),
        HEADER_SIZE,
        base,
        len,
    );
    let mut keys: Vec<Vec<u8>> = vec![b"k".to_vec(), b"orders:42".to_vec(), vec![b'x'; 64]];
    for i in 0..=g.slot_count {
        let Some(slot) = view.slot(i) else {
            assert_eq!(i, g.slot_count, "slot {i} refused inside the table");
            continue;
        };
        assert_inside(
            (slot as *const shm_layout::table::Slot).cast(),
            SLOT_SIZE,
            base,
            len,
        );
        let word = slot.word_acquire();
        // The fast path's pure transitions accept any word without panicking.
        if let Ok(grant) = acquire_exclusive_transition(word, word.generation(), 0) {
            let _ = released(grant.held);
        }
        let _ = (
            word.exclusive_owner(),
            word.shared_holders(),
            format!("{word:?}"),
        );
        let key = slot.key_bytes();
        assert!(key.len() <= shm_layout::MAX_KEY_LEN);
        let _ = slot.key_equals(&key);
        if keys.len() < 12 && !key.is_empty() {
            keys.push(key);
        }
    }
    assert!(view.slot(u32::MAX).is_none());
    for position in 0..=g.index_len {
        match view.index_entry(position) {
            Some(entry) => {
                assert_inside(
                    (entry as *const shm_layout::table::IndexEntry).cast(),
                    INDEX_ENTRY_SIZE,
                    base,
                    len,
                );
                let _ = entry.0.load(Ordering::Relaxed);
            }
            None => assert_eq!(position, g.index_len, "index entry {position} refused"),
        }
    }
    assert!(view.index_entry(u32::MAX).is_none());
    for i in 0..=g.client_count {
        let Some(client) = view.client(i) else {
            assert_eq!(i, g.client_count, "client record {i} refused");
            continue;
        };
        assert_inside(
            (client as *const shm_layout::table::ClientRecord).cast(),
            CLIENT_RECORD_SIZE,
            base,
            len,
        );
        let _ = client.state.load(Ordering::Relaxed);
        for hold in &client.broker_holds {
            let _ = hold.load(Ordering::Relaxed);
        }
        assert_eq!(client.cells.len(), WAIT_CELLS);
        for cell in &client.cells {
            let _ = (
                cell.state.load(Ordering::Relaxed),
                cell.token.load(Ordering::Relaxed),
            );
        }
    }
    assert!(view.client(u32::MAX).is_none());
    for key in &keys {
        // With the key's own hash, and with hashes that land anywhere.
        for hash in [key_hash(key), 0, u64::MAX, key_hash(key) ^ 0xFFFF_FFFF] {
            if let Some((slot, word)) = view.lookup(key, hash) {
                assert!(slot < g.slot_count, "lookup returned slot {slot}");
                let _ = Word(word.0).counter();
            }
        }
    }
}

fn walk_events(base: *mut u8, len: usize) {
    // SAFETY: as in `walk_table`: aligned, valid for `len` bytes for the call,
    // written by nobody else.
    let Ok(view) = (unsafe { EventsView::new(base as *const u8, len) }) else {
        return;
    };
    let rings = view.ring_count();
    let capacity = view.capacity() as u64;
    // What the forecaster does: a cursor at the heads, clients push, it drains.
    let mut cursor = EventCursor::new(&view);
    for ring in 0..rings.min(64) {
        view.push(ring, 7, 11, Outcome::FastHit, ring % 2 == 0, ring);
        let head = view.head(ring);
        // The events a reader may ask for: the last few below the head.
        for n in head.saturating_sub(capacity.min(4))..head {
            let _ = view.read(ring, n);
        }
    }
    let mut seen = 0u64;
    cursor.drain(&view, |_| seen += 1);
    assert!(seen <= rings as u64 * capacity);
    // Out-of-range rings are refused, not read.
    assert_eq!(view.head(rings), 0);
    assert!(view.read(rings, 0).is_none());
    view.push(rings, 1, 1, Outcome::Released, false, 0);
}

fn walk_scores(base: *mut u8, len: usize) {
    // SAFETY: as in `walk_table`: aligned, valid for `len` bytes for the call,
    // written by nobody else.
    let Ok(view) = (unsafe { ScoresView::new(base as *const u8, len) }) else {
        return;
    };
    let mut out = Vec::new();
    if view.read_into(&mut out) {
        assert!(out.len() <= view.capacity() as usize);
        assert!(out.iter().all(|s| (0.0..=1.0).contains(&s.score)));
    }
    let _ = (view.self_score(), view.model());
    // What the forecaster does to a score file it finds: write a snapshot,
    // which must read back (clamped to the capacity).
    let written = [(1u64, 0.5f32), (2, 2.0), (3, f32::NAN)];
    view.write("fuzz", 500, 1, written.iter().map(|&s| Scored::from(s)));
    assert!(
        view.read_into(&mut out),
        "a snapshot just written is consistent"
    );
    assert_eq!(out.len(), written.len().min(view.capacity() as usize));
}
