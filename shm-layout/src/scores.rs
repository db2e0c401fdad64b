//! The score file: `<runtime dir>/scores`, created by the broker, written by
//! the forecaster (`forelock-predictor`), read by the broker's allocator.
//!
//! ```text
//! offset              size                       region
//! 0                   SCORES_HEADER_SIZE (128)   ScoresHeader
//! 128                 capacity * 16              ScoreEntry[capacity]
//! ```
//!
//! ```text
//! ScoreEntry (16 bytes)
//! offset  size  field
//! 0       8     key_hash          xxh3-64 of the key (shm_layout::key_hash)
//! 8       4     score_bits        f32: P(key requested within the horizon)
//! 12      4     contention_bits   f32: P(key contended within the horizon)
//! ```
//!
//! Each tick the forecaster writes `count` entries inside a seqlock (`seq` odd
//! while writing): its top keys by score, highest first, then the keys it
//! predicts contended that are not among them (so a contended key reaches the
//! broker even when its access score is low). The broker copies the entries
//! and keeps the copy only if `seq` was even and unchanged around it; it does
//! not rely on the order.
//!
//! "Top keys" is a total order, [`rank_order`]: higher score first, and among
//! equal scores the lower key hash first. The broker's allocator ranks its
//! candidates by the same function, and `forelock replay` its per-tick
//! ranking, so which of several tied keys makes the cut is stated, not left
//! to a sort's internals.
//!
//! "Contended" means: some request for the key finds it held and queues
//! ([`crate::events::Outcome::Contended`]). The broker prepares the queue and
//! keeps the slot of a key whose contention probability passes its threshold.
//!
//! Advisory only: the broker clamps every score and contention probability to
//! [0, 1] and treats NaN as 0 ([`sanitize`]), so a forecaster writing nonsense
//! costs fast-path hits or an idle slot, never correctness.
//!
//! Versions: 1 had `_reserved` (always 0) where 2 has `contention_bits`, and
//! entries were the top keys only. Readers accept their own version only, so a
//! forecaster and a broker of different versions say so instead of
//! misreading each other (the broker re-creates an older file at start).

use crate::LayoutError;
use crate::sync::shm::{AtomicU32, AtomicU64, Ordering, fence};
use core::mem::{offset_of, size_of};

pub const SCORES_MAGIC: [u8; 8] = *b"FRLKSCR1";
/// Version 2: `ScoreEntry::contention_bits` (was reserved in version 1).
pub const SCORES_VERSION: u32 = 2;
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
    /// How the forecaster scores itself (see [`SelfScore`]): labelled samples
    /// so far, and the f32 bits of its recent Brier score and of the
    /// frequency baseline's on the same samples. Advisory, like everything
    /// here: `forelock status` shows it, nothing decides on it.
    pub self_score_samples: AtomicU64,
    pub brier_bits: AtomicU32,
    pub brier_baseline_bits: AtomicU32,
    /// The online choice (see [`Choice`]): the member it follows, NUL-padded
    /// ASCII (all zero: a single model, or a forecaster older than these
    /// fields, which were `_reserved` and always 0 in the same version), and
    /// the f32 bits of its lead, its trail and the trail's bound.
    pub choice_leader: [AtomicU64; 2],
    pub choice_lead_bits: AtomicU32,
    pub choice_trail_bits: AtomicU32,
    pub choice_bound_bits: AtomicU32,
    pub _reserved: [u8; SCORES_HEADER_SIZE - 124],
}

/// How the forecaster's online choice stands, as published in the header.
/// Losses are means per sample (a missed request costs 1; see
/// `predictor/src/online.rs`).
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    /// The member whose scores are written ("" when there is no choice).
    pub leader: String,
    /// The next best member's loss minus the leader's.
    pub lead: f32,
    /// The choice's own loss minus the best member's.
    pub trail: f32,
    /// The stated bound on `trail`.
    pub bound: f32,
}

/// The forecaster's score of itself, as published in the header.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SelfScore {
    /// Samples labelled so far (0: nothing to show yet).
    pub samples: u64,
    /// Recent Brier score of its probabilities (lower is better).
    pub brier: f32,
    /// The decayed-frequency baseline's, on the same samples.
    pub brier_baseline: f32,
}

#[repr(C)]
pub struct ScoreEntry {
    pub key_hash: AtomicU64,
    /// f32 bits of P(requested within the horizon).
    pub score_bits: AtomicU32,
    /// f32 bits of P(some request for the key queues behind a holder within
    /// the horizon); 0 when the forecaster predicts no contention.
    pub contention_bits: AtomicU32,
}

/// One entry as written and read, its probabilities as f32.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scored {
    pub key_hash: u64,
    /// P(key requested within the horizon).
    pub score: f32,
    /// P(key contended within the horizon).
    pub contention: f32,
}

impl From<(u64, f32)> for Scored {
    /// An entry with no contention predicted.
    fn from((key_hash, score): (u64, f32)) -> Scored {
        Scored {
            key_hash,
            score,
            contention: 0.0,
        }
    }
}

const _: () = {
    assert!(size_of::<ScoresHeader>() == SCORES_HEADER_SIZE);
    assert!(offset_of!(ScoresHeader, version) == 12);
    assert!(offset_of!(ScoresHeader, seq) == 32);
    assert!(offset_of!(ScoresHeader, model) == 64);
    assert!(offset_of!(ScoresHeader, self_score_samples) == 80);
    assert!(offset_of!(ScoresHeader, brier_bits) == 88);
    assert!(offset_of!(ScoresHeader, brier_baseline_bits) == 92);
    assert!(offset_of!(ScoresHeader, choice_leader) == 96);
    assert!(offset_of!(ScoresHeader, choice_lead_bits) == 112);
    assert!(offset_of!(ScoresHeader, choice_trail_bits) == 116);
    assert!(offset_of!(ScoresHeader, choice_bound_bits) == 120);
    assert!(offset_of!(ScoresHeader, _reserved) == 124);
    assert!(size_of::<ScoreEntry>() == SCORE_ENTRY_SIZE);
    assert!(offset_of!(ScoreEntry, key_hash) == 0);
    assert!(offset_of!(ScoreEntry, score_bits) == 8);
    assert!(offset_of!(ScoreEntry, contention_bits) == 12);
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

/// The order of ranked keys, `(probability, key_hash)`: higher probability
/// first (as `f32::total_cmp` orders them), then the lower key hash. The key
/// hash is the tie-breaker because it names the key the same way everywhere
/// (forecaster, score file, broker, replay), where a slot or row number is
/// one process's bookkeeping; xxh3 spreads it, so no class of keys wins ties.
pub fn rank_order(a: (f32, u64), b: (f32, u64)) -> core::cmp::Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}

/// Sanitise an untrusted probability (a score or a contention probability):
/// NaN counts as 0, out-of-range values are clamped to [0, 1].
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

    /// Publish a snapshot (the forecaster). Entries beyond capacity are
    /// dropped. Items are [`Scored`], or `(key_hash, score)` pairs (no
    /// contention predicted).
    pub fn write<S: Into<Scored>>(
        &self,
        model: &str,
        horizon_ms: u32,
        now_ns: u64,
        scores: impl IntoIterator<Item = S>,
    ) {
        let h = self.header();
        let seq = h.seq.load(Ordering::Relaxed);
        let odd = seq | 1;
        h.seq.store(odd, Ordering::Relaxed);
        // SYNC POINT: orders the odd `seq` before the entry stores; pairs with
        // the reader's Acquire fence before its second `seq` load.
        fence(Ordering::Release);
        let mut n = 0u32;
        for scored in scores {
            let Some(e) = self.entry(n) else { break };
            let scored = scored.into();
            e.key_hash.store(scored.key_hash, Ordering::Relaxed);
            e.score_bits
                .store(scored.score.to_bits(), Ordering::Relaxed);
            e.contention_bits
                .store(scored.contention.to_bits(), Ordering::Relaxed);
            n += 1;
        }
        h.count.store(n, Ordering::Relaxed);
        store_name(&h.model, model);
        h.horizon_ms.store(horizon_ms, Ordering::Relaxed);
        h.written_at_ns.store(now_ns, Ordering::Relaxed);
        h.writer_pid.store(std::process::id(), Ordering::Relaxed);
        // SYNC POINT: pairs with the reader's Acquire load of `seq`.
        // Wrapping: `seq` comes from the file (a corrupted one may hold
        // u64::MAX: `fuzz/regressions/table_open/scores-write-seq-overflow`).
        h.seq.store(odd.wrapping_add(1), Ordering::Release);
    }

    /// Copy the current snapshot into `out` (cleared first), both
    /// probabilities sanitised. Returns false (and leaves `out` empty) if the
    /// writer was mid-update.
    pub fn read_into(&self, out: &mut Vec<Scored>) -> bool {
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
            let contention = sanitize(f32::from_bits(e.contention_bits.load(Ordering::Relaxed)));
            out.push(Scored {
                key_hash: e.key_hash.load(Ordering::Relaxed),
                score,
                contention,
            });
        }
        // SYNC POINT: pairs with the writer's Release fence after its odd store.
        fence(Ordering::Acquire);
        if h.seq.load(Ordering::Relaxed) != s1 {
            out.clear();
            return false;
        }
        true
    }

    /// Publish the forecaster's score of itself (between snapshots; each
    /// field is read on its own, no seqlock: a reader may mix two ticks'
    /// figures, which a status line can live with).
    pub fn publish_self_score(&self, score: SelfScore) {
        let h = self.header();
        h.brier_bits.store(score.brier.to_bits(), Ordering::Relaxed);
        h.brier_baseline_bits
            .store(score.brier_baseline.to_bits(), Ordering::Relaxed);
        h.self_score_samples.store(score.samples, Ordering::Relaxed);
    }

    /// The forecaster's score of itself, sanitised (Brier scores outside
    /// [0, 1] or NaN read as 1, the worst).
    pub fn self_score(&self) -> SelfScore {
        let h = self.header();
        let brier = |bits: &AtomicU32| {
            let value = f32::from_bits(bits.load(Ordering::Relaxed));
            if (0.0..=1.0).contains(&value) {
                value
            } else {
                1.0
            }
        };
        SelfScore {
            samples: h.self_score_samples.load(Ordering::Relaxed),
            brier: brier(&h.brier_bits),
            brier_baseline: brier(&h.brier_baseline_bits),
        }
    }

    /// The model name the forecaster reported.
    pub fn model(&self) -> String {
        load_name(&self.header().model)
    }

    /// Publish how the online choice stands (as [`ScoresView::publish_self_score`]:
    /// no seqlock, each field read on its own).
    pub fn publish_choice(&self, choice: &Choice) {
        let h = self.header();
        h.choice_lead_bits
            .store(choice.lead.to_bits(), Ordering::Relaxed);
        h.choice_trail_bits
            .store(choice.trail.to_bits(), Ordering::Relaxed);
        h.choice_bound_bits
            .store(choice.bound.to_bits(), Ordering::Relaxed);
        store_name(&h.choice_leader, &choice.leader);
    }

    /// The online choice, or `None` if the forecaster publishes none (a
    /// single model, or a writer older than the fields). Figures that are
    /// NaN or infinite read as NaN; a reader shows them as unknown.
    pub fn choice(&self) -> Option<Choice> {
        let h = self.header();
        let leader = load_name(&h.choice_leader);
        if leader.is_empty() {
            return None;
        }
        let figure = |bits: &AtomicU32| {
            let value = f32::from_bits(bits.load(Ordering::Relaxed));
            if value.is_finite() { value } else { f32::NAN }
        };
        Some(Choice {
            leader,
            lead: figure(&h.choice_lead_bits),
            trail: figure(&h.choice_trail_bits),
            bound: figure(&h.choice_bound_bits),
        })
    }
}

/// Stores a name as 16 NUL-padded bytes (longer names are cut).
fn store_name(words: &[AtomicU64; 2], name: &str) {
    let mut bytes = [0u8; 16];
    let len = name.len().min(16);
    bytes[..len].copy_from_slice(&name.as_bytes()[..len]);
    for (word, eight) in words.iter().zip(bytes.chunks_exact(8)) {
        word.store(
            u64::from_ne_bytes(eight.try_into().expect("8")),
            Ordering::Relaxed,
        );
    }
}

/// Reads a name stored by [`store_name`] (printable ASCII is not checked:
/// the result is lossy UTF-8).
fn load_name(words: &[AtomicU64; 2]) -> String {
    let mut bytes = Vec::with_capacity(16);
    for w in words {
        bytes.extend_from_slice(&w.load(Ordering::Relaxed).to_ne_bytes());
    }
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
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
        let pairs: Vec<(u64, f32, f32)> = out
            .iter()
            .map(|s| (s.key_hash, s.score, s.contention))
            .collect();
        assert_eq!(
            pairs,
            vec![(1, 0.9, 0.0), (2, 0.0, 0.0), (3, 1.0, 0.0), (4, 0.0, 0.0)]
        );
        assert_eq!(view.model(), "logistic");

        let score = SelfScore {
            samples: 12,
            brier: 0.05,
            brier_baseline: 0.07,
        };
        view.publish_self_score(score);
        assert_eq!(view.self_score(), score);
        view.publish_self_score(SelfScore {
            brier: f32::NAN,
            brier_baseline: -3.0,
            ..score
        });
        let nonsense = view.self_score();
        assert_eq!((nonsense.brier, nonsense.brier_baseline), (1.0, 1.0));
    }

    #[test]
    fn the_online_choice_round_trips_and_an_older_writer_publishes_none() {
        let mut buf = Box::new(Aligned([0; 128 + 4 * 16]));
        // SAFETY: 64-aligned, large enough, exclusively ours.
        let header = unsafe { &mut *(buf.0.as_mut_ptr() as *mut ScoresHeader) };
        init_scores(header, 4);
        // SAFETY: as above; the view lives shorter than the buffer.
        let view = unsafe { ScoresView::new(buf.0.as_ptr(), buf.0.len()) }.unwrap();
        // A writer that knows nothing of the fields leaves them 0.
        view.write("hold-value", 500, 1, [(1, 0.5)]);
        assert_eq!(view.choice(), None);
        let choice = Choice {
            leader: "frequency 60s".into(),
            lead: 0.002,
            trail: 0.0,
            bound: 0.02,
        };
        view.publish_choice(&choice);
        assert_eq!(view.choice(), Some(choice.clone()));
        assert_eq!(view.model(), "hold-value", "the model name is untouched");
        view.publish_choice(&Choice {
            lead: f32::INFINITY,
            ..choice
        });
        assert!(view.choice().unwrap().lead.is_nan());
    }

    #[test]
    fn contention_probabilities_round_trip_and_nonsense_ones_are_clamped() {
        let mut buf = Box::new(Aligned([0; 128 + 4 * 16]));
        // SAFETY: 64-aligned, large enough, exclusively ours.
        let header = unsafe { &mut *(buf.0.as_mut_ptr() as *mut ScoresHeader) };
        init_scores(header, 4);
        // SAFETY: as above; the view lives shorter than the buffer.
        let view = unsafe { ScoresView::new(buf.0.as_ptr(), buf.0.len()) }.unwrap();
        let entry = |key_hash, score, contention| Scored {
            key_hash,
            score,
            contention,
        };
        view.write(
            "logistic",
            500,
            1,
            [
                entry(1, 0.9, 0.7),
                entry(2, 0.01, f32::NAN),
                entry(3, 0.5, 3.0),
                entry(4, 0.0, -0.5),
            ],
        );
        let mut out = vec![];
        assert!(view.read_into(&mut out));
        assert_eq!(
            out,
            vec![
                entry(1, 0.9, 0.7),
                entry(2, 0.01, 0.0),
                entry(3, 0.5, 1.0),
                entry(4, 0.0, 0.0)
            ]
        );
    }

    #[test]
    fn a_version_1_score_file_is_refused_with_both_versions_named() {
        let mut buf = Box::new(Aligned([0; 128 + 4 * 16]));
        // SAFETY: 64-aligned, large enough, exclusively ours.
        let header = unsafe { &mut *(buf.0.as_mut_ptr() as *mut ScoresHeader) };
        init_scores(header, 4);
        header.version.store(1, Ordering::Release);
        // SAFETY: as above; the view lives shorter than the buffer.
        let error = unsafe { ScoresView::new(buf.0.as_ptr(), buf.0.len()) }
            .err()
            .expect("a version 1 file is refused");
        assert!(
            matches!(
                error,
                LayoutError::VersionMismatch {
                    found: 1,
                    supported: SCORES_VERSION,
                    ..
                }
            ),
            "{error:?}"
        );
    }
}
