//! The score file: `<runtime dir>/scores`, created by the broker, written by
//! the forecaster (`forelock-predictor`), read by the broker's allocator.
//!
//! ```text
//! offset              size                       region
//! 0                   SCORES_HEADER_SIZE (128)   ScoresHeader
//! 128                 capacity * 16              ScoreEntry[capacity]
//! ```
//!
//! Each tick the forecaster writes its top `count` keys, highest score first,
//! inside a seqlock (`seq` odd while writing). The broker copies the entries
//! and keeps the copy only if `seq` was even and unchanged around it.
//!
//! Advisory only: the broker clamps every score to [0, 1] and treats NaN as 0,
//! so a forecaster writing nonsense costs fast-path hits, never correctness.

use crate::LayoutError;
use crate::sync::shm::{AtomicU32, AtomicU64, Ordering, fence};
use core::mem::{offset_of, size_of};

pub const SCORES_MAGIC: [u8; 8] = *b"FRLKSCR1";
pub const SCORES_VERSION: u32 = 1;
pub const SCORES_HEADER_SIZE: usize = 128;
pub const SCORE_ENTRY_SIZE: usize = 16;

#[repr(C, align(64))]
pub struct ScoresHeader {
    pub magic: [u8; 8],
    pub endian_check: u32,
    pub version: AtomicU32,
    pub file_size: u64,
    pub capacity: u32,
    /// Entries valid in the current snapshot (<= capacity; clamped by readers).
    pub count: AtomicU32,
    /// Seqlock over `count` and the entries: odd while the forecaster writes.
    pub seq: AtomicU64,
    /// The forecaster's pid and its last tick (CLOCK_MONOTONIC ns): the broker
    /// ignores scores older than a few ticks.
    pub writer_pid: AtomicU32,
    pub _reserved0: u32,
    pub written_at_ns: AtomicU64,
    /// Horizon the scores are for, ms.
    pub horizon_ms: AtomicU32,
    pub _reserved1: u32,
    /// Feedback the forecaster reports about itself (for `forelock status`):
    /// model name, NUL-padded ASCII.
    pub model: [AtomicU64; 2],
    pub _reserved: [u8; SCORES_HEADER_SIZE - 80],
}

#[repr(C)]
pub struct ScoreEntry {
    pub key_hash: AtomicU64,
    /// f32 bits of P(requested within the horizon).
    pub score_bits: AtomicU32,
    pub _reserved: u32,
}

const _: () = {
    assert!(size_of::<ScoresHeader>() == SCORES_HEADER_SIZE);
    assert!(offset_of!(ScoresHeader, version) == 12);
    assert!(offset_of!(ScoresHeader, seq) == 32);
    assert!(offset_of!(ScoresHeader, model) == 64);
    assert!(size_of::<ScoreEntry>() == SCORE_ENTRY_SIZE);
};

pub const fn scores_file_size(capacity: u32) -> usize {
    SCORES_HEADER_SIZE + capacity as usize * SCORE_ENTRY_SIZE
}

/// Initialise a zeroed score file; publishes the version last.
pub fn init_scores(header: &mut ScoresHeader, capacity: u32) {
    header.magic = SCORES_MAGIC;
    header.endian_check = crate::table::ENDIAN_CHECK;
    header.file_size = scores_file_size(capacity) as u64;
    header.capacity = capacity;
    // SYNC POINT: pairs with the Acquire load in `ScoresView::new`.
    header.version.store(SCORES_VERSION, Ordering::Release);
}

pub struct ScoresView {
    base: *const u8,
    capacity: u32,
}

// SAFETY: every field reached through the view is atomic; see TableView.
unsafe impl Send for ScoresView {}
// SAFETY: as above.
unsafe impl Sync for ScoresView {}

/// Sanitise an untrusted score: NaN and out-of-range values are clamped.
pub fn sanitize(score: f32) -> f32 {
    if score.is_nan() {
        0.0
    } else {
        score.clamp(0.0, 1.0)
    }
}

impl ScoresView {
    /// # Safety
    /// `base` points to a 64-aligned mapping of at least `len` bytes that stays
    /// mapped while the view lives, written by others only through atomics.
    pub unsafe fn new(base: *const u8, len: usize) -> Result<ScoresView, LayoutError> {
        if len < SCORES_HEADER_SIZE {
            return Err(LayoutError::Truncated {
                found: len as u64,
                needed: SCORES_HEADER_SIZE as u64,
            });
        }
        // SAFETY: in bounds (checked), 64-aligned (contract), integers and
        // atomics only.
        let header = unsafe { &*(base as *const ScoresHeader) };
        if header.magic != SCORES_MAGIC {
            return Err(LayoutError::ForeignFile {
                what: "score",
                found: header.magic,
            });
        }
        if header.endian_check != crate::table::ENDIAN_CHECK {
            return Err(LayoutError::WrongEndianness);
        }
        // SYNC POINT: pairs with the Release store in `init_scores`.
        match header.version.load(Ordering::Acquire) {
            0 => return Err(LayoutError::NotReady),
            SCORES_VERSION => {}
            found => {
                return Err(LayoutError::VersionMismatch {
                    what: "score",
                    found,
                    supported: SCORES_VERSION,
                });
            }
        }
        let needed = scores_file_size(header.capacity) as u64;
        if header.file_size != needed || (len as u64) < needed {
            return Err(LayoutError::Truncated {
                found: len as u64,
                needed,
            });
        }
        Ok(ScoresView {
            base,
            capacity: header.capacity,
        })
    }

    pub fn header(&self) -> &ScoresHeader {
        // SAFETY: validated in `new`.
        unsafe { &*(self.base as *const ScoresHeader) }
    }

    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    fn entry(&self, i: u32) -> Option<&ScoreEntry> {
        if i >= self.capacity {
            return None;
        }
        let offset = SCORES_HEADER_SIZE + i as usize * SCORE_ENTRY_SIZE;
        // SAFETY: i < capacity and the file holds capacity entries (validated);
        // 8-aligned; atomics only.
        Some(unsafe { &*(self.base.wrapping_add(offset) as *const ScoreEntry) })
    }

    /// Publish a snapshot (the forecaster). Entries beyond capacity are dropped.
    pub fn write(
        &self,
        model: &str,
        horizon_ms: u32,
        now_ns: u64,
        scores: impl IntoIterator<Item = (u64, f32)>,
    ) {
        let h = self.header();
        let seq = h.seq.load(Ordering::Relaxed);
        let odd = seq | 1;
        h.seq.store(odd, Ordering::Relaxed);
        // SYNC POINT: orders the odd `seq` before the entry stores; pairs with
        // the reader's Acquire fence before its second `seq` load.
        fence(Ordering::Release);
        let mut n = 0u32;
        for (hash, score) in scores {
            let Some(e) = self.entry(n) else { break };
            e.key_hash.store(hash, Ordering::Relaxed);
            e.score_bits.store(score.to_bits(), Ordering::Relaxed);
            n += 1;
        }
        h.count.store(n, Ordering::Relaxed);
        let mut name = [0u8; 16];
        let len = model.len().min(16);
        name[..len].copy_from_slice(&model.as_bytes()[..len]);
        h.model[0].store(
            u64::from_ne_bytes(name[..8].try_into().expect("8")),
            Ordering::Relaxed,
        );
        h.model[1].store(
            u64::from_ne_bytes(name[8..].try_into().expect("8")),
            Ordering::Relaxed,
        );
        h.horizon_ms.store(horizon_ms, Ordering::Relaxed);
        h.written_at_ns.store(now_ns, Ordering::Relaxed);
        h.writer_pid.store(std::process::id(), Ordering::Relaxed);
        // SYNC POINT: pairs with the reader's Acquire load of `seq`.
        h.seq.store(odd + 1, Ordering::Release);
    }

    /// Copy the current snapshot into `out` (cleared first), sanitised.
    /// Returns false (and leaves `out` empty) if the writer was mid-update.
    pub fn read_into(&self, out: &mut Vec<(u64, f32)>) -> bool {
        out.clear();
        let h = self.header();
        // SYNC POINT: pairs with the writer's final Release store of `seq`.
        let s1 = h.seq.load(Ordering::Acquire);
        if s1 & 1 == 1 {
            return false;
        }
        let n = h.count.load(Ordering::Relaxed).min(self.capacity);
        for i in 0..n {
            let Some(e) = self.entry(i) else { break };
            let score = sanitize(f32::from_bits(e.score_bits.load(Ordering::Relaxed)));
            out.push((e.key_hash.load(Ordering::Relaxed), score));
        }
        // SYNC POINT: pairs with the writer's Release fence after its odd store.
        fence(Ordering::Acquire);
        if h.seq.load(Ordering::Relaxed) != s1 {
            out.clear();
            return false;
        }
        true
    }

    /// The model name the forecaster reported.
    pub fn model(&self) -> String {
        let h = self.header();
        let mut bytes = Vec::with_capacity(16);
        for w in &h.model {
            bytes.extend_from_slice(&w.load(Ordering::Relaxed).to_ne_bytes());
        }
        let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        String::from_utf8_lossy(&bytes[..end]).into_owned()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[repr(C, align(64))]
    struct Aligned([u8; 128 + 4 * 16]);

    #[test]
    fn a_snapshot_round_trips_and_nonsense_scores_are_clamped() {
        let mut buf = Box::new(Aligned([0; 128 + 4 * 16]));
        // SAFETY: 64-aligned, large enough, exclusively ours.
        let header = unsafe { &mut *(buf.0.as_mut_ptr() as *mut ScoresHeader) };
        init_scores(header, 4);
        // SAFETY: as above; the view lives shorter than the buffer.
        let view = unsafe { ScoresView::new(buf.0.as_ptr(), buf.0.len()) }.unwrap();
        view.write(
            "logistic",
            500,
            1,
            [(1, 0.9), (2, f32::NAN), (3, 7.0), (4, -1.0), (5, 0.5)],
        );
        let mut out = vec![];
        assert!(view.read_into(&mut out));
        assert_eq!(out, vec![(1, 0.9), (2, 0.0), (3, 1.0), (4, 0.0)]);
        assert_eq!(view.model(), "logistic");
    }
}
