//! Per-key features over a bounded set of tracked keys, held in ndarray arrays.
//!
//! # What is kept per key (one column of each array per tracked key)
//!
//! | array | meaning |
//! |---|---|
//! | `counts[key, s]` | request count decayed with time constant `SCALE_TAU_US[s]` (50 ms, 500 ms, 5 s, 60 s), as of the key's last request: a multi-scale rate |
//! | `last_us`, `last_s` | time of the last request (exact, and as f32 seconds since a re-based epoch, for vectorised scoring); `exp(-age / tau_s)` gives "time since last" on four scales |
//! | `gap_mean_s`, `gap_rate`, `gap_confidence` | EWMA of the inter-arrival gap; horizon / gap saturated; how many gaps it rests on, saturated |
//! | `successor_key`, `successor_count`, `predecessor_count` | per-key successor table: after this key, some client took key B within the horizon `successor_count / predecessor_count` of the time |
//! | `successor_boost`, `successor_boost_s` | max over recent requests A of P(this key \| A), decayed with the horizon as time constant from `successor_boost_s` |
//!
//! # Row order: active keys first
//!
//! Rows `0..active` are the ACTIVE keys: requested within the activity window, or
//! boosted by a successor. Only they are scored, in blocks of [`BLOCK`] rows whose
//! features are computed feature-major so that the loops vectorise. Rows
//! `active..tracked` are tracked but idle. Keys idle past the activity window
//! score 0. Rows move only when a key becomes active or idle.
//!
//! # Bounded memory: eviction and the long tail
//!
//! At most `capacity` keys are tracked. When a new key arrives and the table is
//! full, a victim is chosen by sampled LRU: 8 random idle rows (or, if every row
//! is active, 8 random active rows) and the one with the oldest last request goes.
//! Its 60 s count is added to a count-min sketch (4 x 4096 cells, halved every 60 s),
//! and a key admitted later starts its 60 s count from the sketch's estimate, so a
//! key of the long tail that comes back is not mistaken for a brand-new one.
//!
//! # Time
//!
//! All decay is lazy: a key's counts are stored as of its last request, and an
//! event at `t` sets `count = count * exp(-(t - last) / tau) + 1`. Scoring at `now`
//! multiplies by `exp(-(now - last) / tau)`, so a tick writes nothing per key;
//! only the activity scan (every 100 ms) walks the active rows.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use ndarray::{Array1, Array2};

use crate::fastmath::{fast_exp, saturate};

/// Number of decay time scales.
pub const SCALES: usize = 4;
/// The decay time constants, in microseconds.
pub const SCALE_TAU_US: [u64; SCALES] = [50_000, 500_000, 5_000_000, 60_000_000];
/// Successors remembered per key.
pub const SUCCESSORS: usize = 4;
/// Recent keys remembered per client (for learning successors).
pub const CLIENT_RECENT: usize = 4;
/// Clients remembered at most; past this the client table is cleared (and refills).
pub const CLIENTS_MAX: usize = 65_536;
/// Rate features are `saturate(count * RATE_FEATURE_SCALE[scale])`: decayed
/// counts of 1, 1, 2 and 8 map to 0.5, so that every scale's feature spans
/// [0, 1) for ordinary keys and a learned weight of order 1 is enough.
pub const RATE_FEATURE_SCALE: [f32; SCALES] = [1.0, 1.0, 0.5, 0.125];
/// Length of the feature vector given to learned models.
pub const FEATURES: usize = 11;
/// Names of the features, in vector order.
pub const FEATURE_NAMES: [&str; FEATURES] = [
    "rate_50ms",
    "rate_500ms",
    "rate_5s",
    "rate_60s",
    "recency_50ms",
    "recency_500ms",
    "recency_5s",
    "recency_60s",
    "successor",
    "gap_rate",
    "gap_confidence",
];

const NEVER_US: u64 = u64::MAX;
const EMPTY_KEY: u64 = 0;
/// Successor counts of a key are halved when its predecessor count reaches this,
/// so that the table follows changes in behaviour.
const PREDECESSOR_COUNT_HALVING: f32 = 256.0;
/// The activity scan (retiring idle keys) runs at most this often.
const ACTIVITY_SCAN_US: u64 = 100_000;
/// The f32 times are re-based this often.
const EPOCH_SPAN_US: u64 = 1_000_000_000;
/// Rows per scoring block.
pub const BLOCK: usize = 256;
const VICTIM_SAMPLES: usize = 8;
const GAP_EWMA_WEIGHT: f32 = 0.2;
/// Successors followed less often than this are not boosted.
const SUCCESSOR_PUSH_MIN: f32 = 0.05;
/// A key stays active while its successor boost is above this, even if idle.
const SUCCESSOR_BOOST_ACTIVE_MIN: f32 = 0.01;

/// The key hashes are already uniform (xxh3): hashing them again is wasted work.
#[derive(Default)]
pub struct IdentityHasher(u64);

impl Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(byte);
        }
    }
    fn write_u64(&mut self, value: u64) {
        self.0 = value;
    }
    fn write_u32(&mut self, value: u32) {
        // Client ids are small integers: spread them.
        self.0 = u64::from(value).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

pub type IdentityBuildHasher = BuildHasherDefault<IdentityHasher>;

#[derive(Clone, Copy, Default)]
struct ClientRecent {
    /// (key hash, time of its request, row hint: the key's row then, checked before use).
    keys: [(u64, u64, u32); CLIENT_RECENT],
    next: usize,
}

/// Count-min sketch summarising evicted keys' long-scale counts.
struct TailSketch {
    cells: Array2<f32>,
    halved_at_us: u64,
}

const SKETCH_ROWS: usize = 4;
const SKETCH_WIDTH: usize = 4096;
const SKETCH_HALVING_US: u64 = 60_000_000;

impl TailSketch {
    fn new() -> TailSketch {
        TailSketch {
            cells: Array2::zeros((SKETCH_ROWS, SKETCH_WIDTH)),
            halved_at_us: 0,
        }
    }
    fn cell(hash: u64, row: usize) -> usize {
        (hash.rotate_left(16 * row as u32) as usize) & (SKETCH_WIDTH - 1)
    }
    fn add(&mut self, hash: u64, value: f32) {
        for row in 0..SKETCH_ROWS {
            self.cells[[row, Self::cell(hash, row)]] += value;
        }
    }
    fn estimate(&self, hash: u64) -> f32 {
        (0..SKETCH_ROWS)
            .map(|row| self.cells[[row, Self::cell(hash, row)]])
            .fold(f32::INFINITY, f32::min)
    }
    fn age_to(&mut self, now_us: u64) {
        if now_us.saturating_sub(self.halved_at_us) >= SKETCH_HALVING_US {
            self.cells.mapv_inplace(|cell| cell * 0.5);
            self.halved_at_us = now_us;
        }
    }
}

/// The features of up to [`BLOCK`] consecutive active rows, feature-major.
pub struct FeatureBlock {
    pub len: usize,
    /// Seconds since each row's last request.
    pub age_s: [f32; BLOCK],
    /// `features[j][i]`: feature `j` (see [`FEATURE_NAMES`]) of row `start + i`.
    pub features: [[f32; BLOCK]; FEATURES],
}

impl FeatureBlock {
    pub fn new() -> Box<FeatureBlock> {
        Box::new(FeatureBlock {
            len: 0,
            age_s: [0.0; BLOCK],
            features: [[0.0; BLOCK]; FEATURES],
        })
    }
}

/// Which feature groups to compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeatureSet {
    /// Features 0..4 (and the ages).
    pub rates: bool,
    /// Features 4..8 (and the ages).
    pub recency: bool,
    /// Feature 8.
    pub successor: bool,
    /// Features 9 and 10.
    pub gaps: bool,
}

impl FeatureSet {
    pub const ALL: FeatureSet = FeatureSet {
        rates: true,
        recency: true,
        successor: true,
        gaps: true,
    };
    pub const NONE: FeatureSet = FeatureSet {
        rates: false,
        recency: false,
        successor: false,
        gaps: false,
    };
}

/// Read-only view of the active rows at a time `now`.
#[derive(Clone, Copy)]
pub struct FeatureView<'a> {
    pub now_us: u64,
    pub horizon_us: u64,
    pub key_hash: &'a [u64],
    pub last_us: &'a [u64],
    now_s: f32,
    last_s: &'a [f32],
    /// Row-major `[row * SCALES + scale]`, as of each row's last request.
    counts: &'a [f32],
    successor_boost: &'a [f32],
    successor_boost_s: &'a [f32],
    gap_rate: &'a [f32],
    gap_confidence: &'a [f32],
}

impl FeatureView<'_> {
    pub fn len(&self) -> usize {
        self.key_hash.len()
    }
    pub fn is_empty(&self) -> bool {
        self.key_hash.is_empty()
    }

    /// Computes the features of rows `start .. start + BLOCK` (or fewer at the end).
    /// Every feature is in [0, 1]. The loops are branch-free and vectorise.
    pub fn block(&self, start: usize, out: &mut FeatureBlock) {
        self.block_of(start, out, FeatureSet::ALL);
    }

    /// Like [`FeatureView::block`], computing only the feature groups in `set`
    /// (the others are left as they were): scoring is bound by memory bandwidth,
    /// so a model reads only what it uses.
    #[inline(always)]
    pub fn block_of(&self, start: usize, out: &mut FeatureBlock, set: FeatureSet) {
        let len = BLOCK.min(self.len().saturating_sub(start));
        out.len = len;
        let now_s = self.now_s;
        let horizon_s = self.horizon_us as f32 * 1e-6;
        if set.rates || set.recency {
            let last_s = &self.last_s[start..start + len];
            for (age, &last) in out.age_s[..len].iter_mut().zip(last_s) {
                *age = (now_s - last).max(0.0);
            }
            self.rates_and_recency(start, out);
        }
        if set.successor {
            let inverse_horizon_s = 1.0 / horizon_s;
            let boost = &self.successor_boost[start..start + len];
            let boost_s = &self.successor_boost_s[start..start + len];
            for ((out, &boost), &boost_s) in
                out.features[8][..len].iter_mut().zip(boost).zip(boost_s)
            {
                let since = (now_s - boost_s).max(0.0);
                *out = (boost * fast_exp(-since * inverse_horizon_s)).min(1.0);
            }
        }
        if set.gaps {
            out.features[9][..len].copy_from_slice(&self.gap_rate[start..start + len]);
            out.features[10][..len].copy_from_slice(&self.gap_confidence[start..start + len]);
        }
    }

    #[inline(always)]
    fn rates_and_recency(&self, start: usize, out: &mut FeatureBlock) {
        let len = out.len;
        let counts = &self.counts[start * SCALES..(start + len) * SCALES];
        let age_s = &out.age_s[..len];
        let (rates, rest) = out.features.split_at_mut(SCALES);
        let recencies = &mut rest[..SCALES];
        for scale in 0..SCALES {
            let inverse_tau_s = 1e6 / SCALE_TAU_US[scale] as f32;
            let to_feature = RATE_FEATURE_SCALE[scale];
            let rate = &mut rates[scale][..len];
            let recency = &mut recencies[scale][..len];
            for (((rate, recency), &age), count) in rate
                .iter_mut()
                .zip(recency.iter_mut())
                .zip(age_s)
                .zip(counts.chunks_exact(SCALES))
            {
                let decay = fast_exp(-age * inverse_tau_s);
                *recency = decay;
                *rate = saturate(count[scale] * decay * to_feature);
            }
        }
    }

    /// The feature vector of one active row (same code as [`FeatureView::block`]).
    pub fn vector(&self, row: usize) -> [f32; FEATURES] {
        let mut block = FeatureBlock::new();
        let one = FeatureView {
            key_hash: &self.key_hash[row..row + 1],
            last_us: &self.last_us[row..row + 1],
            last_s: &self.last_s[row..row + 1],
            counts: &self.counts[row * SCALES..(row + 1) * SCALES],
            successor_boost: &self.successor_boost[row..row + 1],
            successor_boost_s: &self.successor_boost_s[row..row + 1],
            gap_rate: &self.gap_rate[row..row + 1],
            gap_confidence: &self.gap_confidence[row..row + 1],
            ..*self
        };
        one.block(0, &mut block);
        std::array::from_fn(|j| block.features[j][0])
    }

    /// Request counts of rows `start .. start + out.len()` decayed to now, at one scale.
    pub fn decayed_counts(&self, start: usize, scale: usize, out: &mut [f32]) {
        let end = start + out.len();
        let inverse_tau_s = 1e6 / SCALE_TAU_US[scale] as f32;
        let counts = &self.counts[start * SCALES..end * SCALES];
        for ((out, &last), count) in out
            .iter_mut()
            .zip(&self.last_s[start..end])
            .zip(counts.chunks_exact(SCALES))
        {
            *out = count[scale] * fast_exp(-(self.now_s - last).max(0.0) * inverse_tau_s);
        }
    }

    /// Request count of one row decayed to now, at one scale.
    pub fn decayed_count(&self, row: usize, scale: usize) -> f32 {
        let age_s = (self.now_s - self.last_s[row]).max(0.0);
        self.counts[row * SCALES + scale] * fast_exp(-age_s * 1e6 / SCALE_TAU_US[scale] as f32)
    }

    /// The successor boost of one row, decayed to now.
    pub fn successor_boost(&self, row: usize) -> f32 {
        self.vector(row)[8]
    }
}

/// The bounded per-key feature table. See the module docs.
pub struct FeatureStore {
    capacity: usize,
    horizon_us: u64,
    activity_window_us: u64,
    index: HashMap<u64, u32, IdentityBuildHasher>,
    key_hash: Array1<u64>,
    last_us: Array1<u64>,
    /// Seconds since `epoch_us` (f32 halves the bytes a tick reads; re-based every
    /// `EPOCH_SPAN_US` so the resolution stays below 0.2 ms).
    last_s: Array1<f32>,
    counts: Array2<f32>,
    successor_boost: Array1<f32>,
    successor_boost_s: Array1<f32>,
    epoch_us: u64,
    gap_mean_s: Array1<f32>,
    gap_rate: Array1<f32>,
    gap_confidence: Array1<f32>,
    successor_key: Array2<u64>,
    successor_count: Array2<f32>,
    predecessor_count: Array1<f32>,
    active: usize,
    tracked: usize,
    now_us: u64,
    scanned_at_us: u64,
    clients: HashMap<u32, ClientRecent, IdentityBuildHasher>,
    sketch: TailSketch,
    rng: u64,
    inverse_tau_s: [f32; SCALES],
    /// Keys evicted to stay within capacity, since creation.
    pub evictions: u64,
}

impl FeatureStore {
    /// A table for at most `capacity` keys.
    pub fn new(
        capacity: usize,
        horizon_us: u64,
        activity_window_us: u64,
        seed: u64,
    ) -> FeatureStore {
        assert!(capacity >= 1, "capacity must be at least 1");
        assert!(
            capacity <= u32::MAX as usize,
            "capacity must fit in u32 rows"
        );
        assert!(horizon_us > 0, "the horizon must be positive");
        FeatureStore {
            capacity,
            horizon_us,
            activity_window_us,
            index: HashMap::with_capacity_and_hasher(
                capacity.min(1 << 16),
                IdentityBuildHasher::default(),
            ),
            key_hash: Array1::zeros(capacity),
            last_us: Array1::from_elem(capacity, NEVER_US),
            last_s: Array1::zeros(capacity),
            counts: Array2::zeros((capacity, SCALES)),
            successor_boost: Array1::zeros(capacity),
            successor_boost_s: Array1::zeros(capacity),
            epoch_us: 0,
            gap_mean_s: Array1::zeros(capacity),
            gap_rate: Array1::zeros(capacity),
            gap_confidence: Array1::zeros(capacity),
            successor_key: Array2::zeros((capacity, SUCCESSORS)),
            successor_count: Array2::zeros((capacity, SUCCESSORS)),
            predecessor_count: Array1::zeros(capacity),
            active: 0,
            tracked: 0,
            now_us: 0,
            scanned_at_us: 0,
            clients: HashMap::default(),
            sketch: TailSketch::new(),
            rng: seed | 1,
            inverse_tau_s: SCALE_TAU_US.map(|tau| 1e6 / tau as f32),
            evictions: 0,
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }
    pub fn active(&self) -> usize {
        self.active
    }
    pub fn tracked(&self) -> usize {
        self.tracked
    }
    pub fn horizon_us(&self) -> u64 {
        self.horizon_us
    }
    /// The time of the last [`FeatureStore::decay_to`] (the scoring time).
    pub fn decayed_to_us(&self) -> u64 {
        self.now_us
    }

    /// Row of a tracked key (active or not).
    pub fn row_of(&self, key_hash: u64) -> Option<usize> {
        self.index.get(&key_hash).map(|&row| row as usize)
    }

    /// Time of the last request of a tracked key.
    pub fn last_request_us(&self, key_hash: u64) -> Option<u64> {
        self.row_of(key_hash)
            .map(|row| self.last_us[row])
            .filter(|&last| last != NEVER_US)
    }

    /// The active rows, at the time of the last [`FeatureStore::decay_to`].
    pub fn view(&self) -> FeatureView<'_> {
        let n = self.active;
        FeatureView {
            now_us: self.now_us,
            now_s: self.seconds(self.now_us),
            horizon_us: self.horizon_us,
            key_hash: &self.key_hash.as_slice().expect("contiguous")[..n],
            last_us: &self.last_us.as_slice().expect("contiguous")[..n],
            last_s: &self.last_s.as_slice().expect("contiguous")[..n],
            counts: &self.counts.as_slice().expect("row-major")[..n * SCALES],
            successor_boost: &self.successor_boost.as_slice().expect("contiguous")[..n],
            successor_boost_s: &self.successor_boost_s.as_slice().expect("contiguous")[..n],
            gap_rate: &self.gap_rate.as_slice().expect("contiguous")[..n],
            gap_confidence: &self.gap_confidence.as_slice().expect("contiguous")[..n],
        }
    }

    /// `time_us` as f32 seconds since the epoch.
    fn seconds(&self, time_us: u64) -> f32 {
        (time_us as i64 - self.epoch_us as i64) as f32 * 1e-6
    }

    fn rebase(&mut self, epoch_us: u64) {
        let shift_s = (epoch_us as i64 - self.epoch_us as i64) as f32 * 1e-6;
        let n = self.tracked;
        self.last_s
            .slice_mut(ndarray::s![..n])
            .mapv_inplace(|t| t - shift_s);
        self.successor_boost_s
            .slice_mut(ndarray::s![..n])
            .mapv_inplace(|t| t - shift_s);
        self.epoch_us = epoch_us;
    }

    fn next_random(&mut self) -> u64 {
        // xorshift64*: deterministic for a given seed.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A uniformly chosen active row, if any.
    pub fn random_active_row(&mut self) -> Option<usize> {
        if self.active == 0 {
            return None;
        }
        Some((self.next_random() % self.active as u64) as usize)
    }

    /// Records one request. Events may come slightly out of order (decay uses
    /// the non-negative part of each time difference).
    pub fn ingest(&mut self, ts_us: u64, client: u32, key_hash: u64) {
        let row = self.activate(key_hash);
        let last = self.last_us[row];
        let horizon_s = self.horizon_us as f32 * 1e-6;
        if last == NEVER_US {
            for scale in 0..SCALES - 1 {
                self.counts[[row, scale]] = 1.0;
            }
            self.counts[[row, SCALES - 1]] += 1.0; // the sketch's estimate plus this request
        } else {
            let gap_s = ts_us.saturating_sub(last) as f32 * 1e-6;
            for scale in 0..SCALES {
                let decay = fast_exp(-gap_s * self.inverse_tau_s[scale]);
                self.counts[[row, scale]] = self.counts[[row, scale]] * decay + 1.0;
            }
            let gaps_seen = self.gap_confidence[row];
            let mean = if gaps_seen == 0.0 {
                gap_s
            } else {
                self.gap_mean_s[row] + GAP_EWMA_WEIGHT * (gap_s - self.gap_mean_s[row])
            };
            self.gap_mean_s[row] = mean;
            self.gap_rate[row] = saturate(horizon_s / mean.max(1e-6));
            // gap_confidence = n / (n + 4) for n gaps seen, updated without storing n.
            let n = 4.0 * gaps_seen / (1.0 - gaps_seen).max(1e-6) + 1.0;
            self.gap_confidence[row] = (n / (n + 4.0)).min(0.999);
        }
        if last == NEVER_US || ts_us > last {
            self.last_us[row] = ts_us;
            self.last_s[row] = self.seconds(ts_us);
        }

        // A request fulfils the successor prediction that pointed at it: a boost
        // left standing would mark keys that have just been taken, not keys
        // about to be (and teach a learned model that the boost means "done").
        self.successor_boost[row] = 0.0;
        self.learn_successors(ts_us, client, key_hash, row);
        self.push_successors(row, ts_us);
    }

    /// This client took `key_hash` now: every key it took within the horizon
    /// before gains `key_hash` as a successor.
    fn learn_successors(&mut self, ts_us: u64, client: u32, key_hash: u64, row: usize) {
        if self.clients.len() >= CLIENTS_MAX && !self.clients.contains_key(&client) {
            self.clients.clear();
        }
        let mut recent = self.clients.get(&client).copied().unwrap_or_default();
        for &(predecessor, at_us, hint) in &recent.keys {
            if predecessor == EMPTY_KEY || ts_us.saturating_sub(at_us) > self.horizon_us {
                continue;
            }
            // The hint saves a hash probe unless the row moved since.
            let hint = hint as usize;
            let predecessor_row = if hint < self.tracked && self.key_hash[hint] == predecessor {
                Some(hint)
            } else {
                self.index.get(&predecessor).map(|&row| row as usize)
            };
            if let Some(predecessor_row) = predecessor_row {
                self.add_successor(predecessor_row, key_hash);
            }
        }
        if let Some(entry) = recent.keys.iter_mut().find(|(key, _, _)| *key == key_hash) {
            entry.1 = ts_us;
            entry.2 = row as u32;
        } else {
            recent.keys[recent.next] = (key_hash, ts_us, row as u32);
            recent.next = (recent.next + 1) % CLIENT_RECENT;
        }
        self.clients.insert(client, recent);
    }

    fn add_successor(&mut self, row: usize, successor: u64) {
        let mut keys = self.successor_key.row_mut(row);
        let mut counts = self.successor_count.row_mut(row);
        if let Some(j) = keys.iter().position(|&key| key == successor) {
            counts[j] += 1.0;
            return;
        }
        // Not present: take an empty entry, else replace the least counted one.
        let mut replace = 0;
        for j in 0..SUCCESSORS {
            if keys[j] == EMPTY_KEY {
                replace = j;
                break;
            }
            if counts[j] < counts[replace] {
                replace = j;
            }
        }
        keys[replace] = successor;
        counts[replace] = 1.0;
    }

    /// The key at `row` was just requested: raise the successor boost of the keys
    /// that usually follow it.
    fn push_successors(&mut self, row: usize, ts_us: u64) {
        self.predecessor_count[row] += 1.0;
        let predecessors = self.predecessor_count[row];
        if predecessors >= PREDECESSOR_COUNT_HALVING {
            self.predecessor_count[row] *= 0.5;
            self.successor_count
                .row_mut(row)
                .mapv_inplace(|count| count * 0.5);
        }
        let now_s = self.seconds(ts_us);
        let inverse_horizon_s = 1e6 / self.horizon_us as f32;
        for j in 0..SUCCESSORS {
            let successor = self.successor_key[[row, j]];
            if successor == EMPTY_KEY {
                continue;
            }
            // The current occurrence has had no chance to be followed yet.
            let observed = (predecessors - 1.0).max(1.0);
            let probability = (self.successor_count[[row, j]] / observed).min(1.0);
            if probability < SUCCESSOR_PUSH_MIN {
                continue; // weak successors are not worth a lookup (most of the cost of ingest)
            }
            if let Some(&successor_row) = self.index.get(&successor) {
                let mut successor_row = successor_row as usize;
                let since = (now_s - self.successor_boost_s[successor_row]).max(0.0);
                let current =
                    self.successor_boost[successor_row] * fast_exp(-since * inverse_horizon_s);
                if probability > current {
                    if successor_row >= self.active {
                        successor_row = self.reactivate(successor_row);
                    }
                    self.successor_boost[successor_row] = probability;
                    self.successor_boost_s[successor_row] = now_s;
                }
            }
        }
    }

    /// Returns the row of `key_hash`, admitting it if new, and makes it active.
    fn activate(&mut self, key_hash: u64) -> usize {
        let row = match self.index.get(&key_hash) {
            Some(&row) => row as usize,
            None => self.admit(key_hash),
        };
        if row >= self.active {
            self.reactivate(row)
        } else {
            row
        }
    }

    fn admit(&mut self, key_hash: u64) -> usize {
        let row = if self.tracked < self.capacity {
            self.tracked += 1;
            self.tracked - 1
        } else {
            let victim = self.choose_victim();
            let victim_hash = self.key_hash[victim];
            let idle_s = self.now_us.saturating_sub(self.last_us[victim]) as f32 * 1e-6;
            let long_count = self.counts[[victim, SCALES - 1]]
                * fast_exp(-idle_s * self.inverse_tau_s[SCALES - 1]);
            self.sketch.add(victim_hash, long_count);
            self.index.remove(&victim_hash);
            self.evictions += 1;
            victim
        };
        self.key_hash[row] = key_hash;
        self.last_us[row] = NEVER_US;
        self.last_s[row] = 0.0;
        self.counts.row_mut(row).fill(0.0);
        self.counts[[row, SCALES - 1]] = self.sketch.estimate(key_hash);
        self.successor_boost[row] = 0.0;
        self.successor_boost_s[row] = 0.0;
        self.gap_mean_s[row] = 0.0;
        self.gap_rate[row] = 0.0;
        self.gap_confidence[row] = 0.0;
        self.successor_key.row_mut(row).fill(EMPTY_KEY);
        self.successor_count.row_mut(row).fill(0.0);
        self.predecessor_count[row] = 0.0;
        self.index.insert(key_hash, row as u32);
        row
    }

    fn choose_victim(&mut self) -> usize {
        let (start, end) = if self.tracked > self.active {
            (self.active, self.tracked)
        } else {
            (0, self.tracked)
        };
        let mut victim = start;
        let mut oldest = u64::MAX;
        for _ in 0..VICTIM_SAMPLES {
            let row = start + (self.next_random() % (end - start) as u64) as usize;
            let last = self.last_us[row];
            if last <= oldest {
                oldest = last;
                victim = row;
            }
        }
        victim
    }

    /// Moves an idle row into the active prefix.
    fn reactivate(&mut self, row: usize) -> usize {
        debug_assert!(row >= self.active && row < self.tracked);
        let destination = self.active;
        self.swap_rows(row, destination);
        self.active += 1;
        destination
    }

    fn deactivate(&mut self, row: usize) {
        debug_assert!(row < self.active);
        let last_active = self.active - 1;
        self.swap_rows(row, last_active);
        self.active -= 1;
    }

    fn swap_rows(&mut self, a: usize, b: usize) {
        if a == b {
            return;
        }
        self.key_hash.swap(a, b);
        self.last_us.swap(a, b);
        self.last_s.swap(a, b);
        for scale in 0..SCALES {
            self.counts.swap([a, scale], [b, scale]);
        }
        self.successor_boost.swap(a, b);
        self.successor_boost_s.swap(a, b);
        self.gap_mean_s.swap(a, b);
        self.gap_rate.swap(a, b);
        self.gap_confidence.swap(a, b);
        for j in 0..SUCCESSORS {
            self.successor_key.swap([a, j], [b, j]);
            self.successor_count.swap([a, j], [b, j]);
        }
        self.predecessor_count.swap(a, b);
        self.index.insert(self.key_hash[a], a as u32);
        self.index.insert(self.key_hash[b], b as u32);
    }

    /// Sets the scoring time to `now_us` (never backwards) and, at most every
    /// 100 ms, retires rows idle past the activity window. Writes no feature.
    pub fn decay_to(&mut self, now_us: u64) {
        if now_us <= self.now_us {
            return;
        }
        self.now_us = now_us;
        self.sketch.age_to(now_us);
        if now_us - self.epoch_us > EPOCH_SPAN_US {
            self.rebase(now_us);
        }
        if now_us.saturating_sub(self.scanned_at_us) < ACTIVITY_SCAN_US {
            return;
        }
        self.scanned_at_us = now_us;
        let window_us = self.activity_window_us;
        let now_s = self.seconds(now_us);
        let inverse_horizon_s = 1e6 / self.horizon_us as f32;
        for row in (0..self.active).rev() {
            let idle_us = now_us.saturating_sub(self.last_us[row]);
            if idle_us > window_us {
                let since = (now_s - self.successor_boost_s[row]).max(0.0);
                if self.successor_boost[row] * fast_exp(-since * inverse_horizon_s)
                    < SUCCESSOR_BOOST_ACTIVE_MIN
                {
                    self.deactivate(row);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: u64 = 500_000;

    fn store(capacity: usize) -> FeatureStore {
        FeatureStore::new(capacity, H, 30_000_000, 7)
    }

    #[test]
    fn counts_decay_exactly_between_ticks() {
        let mut features = store(16);
        features.ingest(0, 0, 11);
        features.ingest(40_000, 0, 11);
        features.decay_to(100_000);
        let view = features.view();
        let row = 0;
        let vector = view.vector(row);
        for scale in 0..SCALES {
            let tau = SCALE_TAU_US[scale] as f64;
            let expected = ((-100_000.0 / tau).exp() + (-60_000.0 / tau).exp()) as f32;
            let found = view.decayed_count(row, scale);
            assert!(
                (found - expected).abs() < 1e-3 * expected.max(1.0),
                "scale {scale}: {found} vs {expected}"
            );
            let recency_expected = (-60_000.0 / tau).exp() as f32;
            assert!((vector[SCALES + scale] - recency_expected).abs() < 1e-3);
        }
    }

    #[test]
    fn idle_keys_leave_the_active_set_and_return_with_lazy_decay() {
        let mut features = FeatureStore::new(16, H, 1_000_000, 7);
        features.ingest(0, 0, 1);
        features.ingest(0, 0, 2);
        features.decay_to(900_000);
        assert_eq!(features.active(), 2);
        features.ingest(1_500_000, 0, 2);
        features.decay_to(1_600_000);
        assert_eq!(features.active(), 1, "key 1 idle past the 1 s window");
        features.ingest(3_000_000, 0, 1);
        features.decay_to(3_000_000);
        let view = features.view();
        let row = view.key_hash.iter().position(|&k| k == 1).unwrap();
        let expected = 1.0 + (-3.0f32 / 60.0).exp();
        assert!(
            (view.decayed_count(row, 3) - expected).abs() < 1e-3,
            "{}",
            view.decayed_count(row, 3)
        );
    }

    #[test]
    fn the_table_never_tracks_more_than_its_capacity() {
        let mut features = store(32);
        for key in 1..=1000u64 {
            features.ingest(key * 1000, (key % 3) as u32, key);
            if key % 10 == 0 {
                features.decay_to(key * 1000);
            }
        }
        assert_eq!(features.tracked(), 32);
        assert_eq!(features.evictions, 1000 - 32);
        assert!(features.row_of(1000).is_some(), "the newest key is tracked");
        for (&hash, &row) in &features.index {
            assert_eq!(
                features.key_hash[row as usize], hash,
                "index and rows agree"
            );
        }
    }

    #[test]
    fn a_returning_long_tail_key_keeps_part_of_its_history() {
        let mut features = store(16);
        for i in 0..50 {
            features.ingest(i * 1000, 0, 999);
        }
        for key in 1..=200u64 {
            features.ingest(100_000 + key * 10, 0, key);
        }
        assert!(features.row_of(999).is_none(), "evicted");
        features.ingest(200_000, 0, 999);
        let row = features.row_of(999).unwrap();
        assert!(
            features.counts[[row, 3]] > 40.0,
            "sketch remembered ~50: {}",
            features.counts[[row, 3]]
        );
    }

    #[test]
    fn successors_are_learnt_per_client_and_boost_the_follower() {
        let mut features = store(64);
        // Client 0 always takes B 20 ms after A; client 1 takes noise.
        for round in 0..20u64 {
            let t = round * 1_000_000;
            features.ingest(t, 0, 0xA);
            features.ingest(t + 5_000, 1, 1000 + round);
            features.ingest(t + 20_000, 0, 0xB);
            features.decay_to(t + 30_000);
        }
        let t = 30_000_000;
        features.decay_to(t);
        features.ingest(t, 0, 0xA);
        features.decay_to(t + 10_000);
        let view = features.view();
        let row_b = view.key_hash.iter().position(|&k| k == 0xB).unwrap();
        assert!(
            view.successor_boost(row_b) > 0.9,
            "{}",
            view.successor_boost(row_b)
        );
        let row_noise = view.key_hash.iter().position(|&k| k == 1019).unwrap();
        assert!(view.successor_boost(row_noise) < 0.1);
    }

    #[test]
    fn feature_vectors_stay_in_the_unit_interval() {
        let mut features = store(64);
        for i in 0..5000u64 {
            features.ingest(i * 100, (i % 5) as u32, i % 17 + 1);
            if i % 100 == 0 {
                features.decay_to(i * 100);
            }
        }
        features.decay_to(600_000);
        let view = features.view();
        for row in 0..view.len() {
            for (name, value) in FEATURE_NAMES.iter().zip(view.vector(row)) {
                assert!((0.0..=1.0).contains(&value), "{name} = {value}");
            }
        }
    }
}
