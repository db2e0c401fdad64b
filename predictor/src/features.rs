//! Per-key features over a bounded set of tracked keys: one cache line per key
//! for ingest, one array per feature for scoring.
//!
//! # What is kept per key (row `r` of each array is one tracked key)
//!
//! Ingest is bound by memory latency (a cold key costs a cache miss per line it
//! touches), so everything ingest reads or writes for a key is in one 64-byte
//! `KeyRecord`, its successor table in one 64-byte `Successors` line, and the
//! key is found through a flat open-addressing index. Scoring streams through
//! every active row, so it reads one array per feature (`Published`), copied
//! from the records by [`FeatureStore::decay_to`] for the rows changed since the
//! previous call.
//!
//! | array | line | meaning |
//! |---|---|---|
//! | `records[r].counts[s]` | record | request count decayed with time constant `SCALE_TAU_US[s]` (50 ms, 500 ms, 5 s, 60 s), as of the key's last request: a multi-scale rate |
//! | `last_us[r]`, `records[r].last_s` | own array, record | time of the last request (exact, and as f32 seconds since a re-based epoch, for vectorised scoring); `exp(-age / tau_s)` gives "time since last" on four scales. `last_us` is an array of its own, always current, because [`FeatureView::last_us`] is a slice |
//! | `records[r].gap_mean_s`, `.gap_rate`, `.gap_confidence` | record | EWMA of the inter-arrival gap; horizon / gap saturated; how many gaps it rests on, saturated |
//! | `successors[r].keys`, `.counts`, `records[r].predecessor_count` | successors, record | per-key successor table: after this key, some client took key B within the horizon `count / predecessor_count` of the time; `successors[r].hints` is each successor's row when last seen (checked against the record's key before use: it saves an index probe) |
//! | `records[r].successor_boost`, `.successor_boost_s` | record | max over recent requests A of P(this key \| A), decayed with the horizon as time constant from `successor_boost_s` |
//! | `key_hash[r]` (and `records[r].key_hash`) | own array, record | the key; the array is [`FeatureView::key_hash`], the copy in the record checks row hints without touching another line |
//! | `records[r].dirty`, `dirty_rows` | record, list | the record's scoring fields changed since they were last published |
//! | `published.last_s`, `.counts[s]`, `.successor_boost`, `.successor_boost_s`, `.gap_rate`, `.gap_confidence` | one array each (one per scale for the counts) | the scoring fields as of the last [`FeatureStore::decay_to`]: what [`FeatureView`] reads |
//! | `index` | 16-byte slots | key hash → row, linear probing in a power-of-two table at most half full |
//!
//! Publication costs one copy per changed row per `decay_to` (a tick), however
//! many events the row had: a random write to each published array, or one
//! sequential pass over all rows when more than an eighth changed.
//!
//! The counts are published one array per scale, not row by row: a block's
//! loop over one scale then reads consecutive floats instead of every
//! fourth (a strided load the vector loop had to shuffle into place: the
//! rate and recency features took half as long again that way). The price
//! is three more random lines written per changed row at publication.
//!
//! # Batched ingest
//!
//! [`FeatureStore::ingest_batch`] processes a slice of events exactly as
//! [`FeatureStore::ingest`] would one by one, but prefetches ahead: the index
//! slot of event `i + 16`, the record, successor line and `last_us` of event
//! `i + 8`, and the records at the row hints of every successor of event
//! `i + 4` (it will boost the strong ones; the weak ones, below
//! `SUCCESSOR_PUSH_MIN`, and stale hints cost a useless prefetch). The misses
//! of several events then overlap.
//!
//! # Row order: active keys first
//!
//! Rows `0..active` are the ACTIVE keys: requested within the activity window, or
//! boosted by a successor. Only they are scored, in blocks of [`BLOCK`] rows
//! whose features are computed feature-major so that the loops vectorise. Rows
//! `active..tracked` are tracked but idle. Keys idle past the activity window
//! score 0. Rows move only when a key becomes active or idle.
//!
//! # Bounded memory: eviction and the long tail
//!
//! At most `capacity` keys are tracked (212 bytes each: two lines, two index
//! slots at most half full, `last_us`, `key_hash`, 36 published bytes). When a
//! new key arrives and the table is full, a victim is chosen by sampled LRU: 8 random idle rows (or,
//! if every row is active, 8 random active rows) and the one with the oldest last
//! request goes. Its 60 s count is added to a count-min sketch (4 x 4096 cells,
//! halved every 60 s), and a key admitted later starts its 60 s count from the
//! sketch's estimate, so a key of the long tail that comes back is not mistaken
//! for a brand-new one.
//!
//! # Clients
//!
//! Each client's last [`CLIENT_RECENT`] keys (to learn successors) are in a flat
//! array indexed by client id (ids are small; larger ones go to a hash map). At
//! most [`CLIENTS_MAX`] clients are remembered; past this the table is cleared.
//!
//! # Time
//!
//! All decay is lazy: a key's counts are stored as of its last request, and an
//! event at `t` sets `count = count * exp(-(t - last) / tau) + 1`. Scoring at `now`
//! multiplies by `exp(-(now - last) / tau)`, so a tick writes nothing per key
//! but the publication of the rows changed since the last tick; only the
//! activity scan (every 100 ms) walks the active rows.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use ndarray::Array2;

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
/// Batched ingest prefetches the index slot of the event this far ahead...
const PREFETCH_INDEX_AHEAD: usize = 16;
/// ... the record, successor line and `last_us` of the event this far ahead...
const PREFETCH_ROW_AHEAD: usize = 8;
/// ... and the records of the successors of the event this far ahead.
const PREFETCH_SUCCESSORS_AHEAD: usize = 4;

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

/// Asks the kernel to back `vec`'s allocation by transparent huge pages
/// where it allows them on request (`madvise`, the default of many
/// distributions and of the VM measured): the feature store's arrays are
/// read at random rows (ingest, the online choice's sampled keys), and
/// with 4 KB pages each such read is a TLB miss too (measured: batched
/// ingest 4.2-4.6 -> 6.3-6.5 M events/s; the tick's scoring, which
/// streams, about the same). Effective for the pages not yet touched: a
/// fresh `vec![0; n]` (zeroed by the kernel, touched as rows are used, a
/// huge page at a time) or a capacity not yet filled
/// ([`huge_page_vec`]). A hint only: it changes no contents.
fn advise_huge_pages<T>(vec: Vec<T>) -> Vec<T> {
    #[cfg(target_os = "linux")]
    {
        const HUGE_PAGE: usize = 2 << 20;
        let start = vec.as_ptr() as usize;
        let end = start + vec.capacity() * std::mem::size_of::<T>();
        let (first, last) = (
            start.next_multiple_of(HUGE_PAGE),
            end / HUGE_PAGE * HUGE_PAGE,
        );
        if first < last {
            // SAFETY: `first..last` lies within `vec`'s allocation (its
            // capacity, rounded inward to huge-page boundaries), which
            // nothing else uses. MADV_HUGEPAGE only marks the range as
            // eligible for huge pages: it changes no contents and no
            // mapping's validity. Its failure (a kernel without THP) is
            // harmless, so the result is not checked.
            unsafe {
                libc::madvise(
                    first as *mut libc::c_void,
                    last - first,
                    libc::MADV_HUGEPAGE,
                );
            }
        }
    }
    vec
}

/// `vec![value; len]` on huge pages ([`advise_huge_pages`]) for a value
/// that is not zero: advised before it is filled.
fn huge_page_vec<T: Clone>(value: T, len: usize) -> Vec<T> {
    let mut vec = advise_huge_pages(Vec::with_capacity(len));
    vec.resize(len, value);
    vec
}

/// Asks the CPU to bring the cache line holding `value` into L1. A hint only:
/// it changes no value, whatever the address.
#[inline(always)]
fn prefetch<T>(value: &T) {
    #[cfg(target_arch = "x86_64")]
    {
        use core::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        let address = (value as *const T).cast::<i8>();
        // SAFETY: `_mm_prefetch` requires SSE, which every x86-64 CPU has (it is
        // in the baseline target). It reads no memory architecturally and never
        // faults, and `address` comes from a live reference anyway.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(address) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = value;
}

/// Everything ingest reads or writes for a key itself, and everything scoring
/// reads: one cache line. See the module docs.
#[derive(Clone, Copy, Default, Debug, PartialEq)]
#[repr(C, align(64))]
struct KeyRecord {
    /// The key (a copy of `key_hash[row]`, to check row hints in this line).
    key_hash: u64,
    /// Decayed request counts as of the last request, per scale.
    counts: [f32; SCALES],
    /// Time of the last request, seconds since the epoch (0 if never).
    last_s: f32,
    successor_boost: f32,
    successor_boost_s: f32,
    gap_mean_s: f32,
    gap_rate: f32,
    gap_confidence: f32,
    predecessor_count: f32,
    /// Whether the scoring fields changed since they were last published
    /// (the row is then in `FeatureStore::dirty_rows`).
    dirty: bool,
}

/// The successor table of a key: one cache line.
#[derive(Clone, Copy, Default, Debug, PartialEq)]
#[repr(C, align(64))]
struct Successors {
    keys: [u64; SUCCESSORS],
    counts: [f32; SUCCESSORS],
    /// Row of each successor when last seen: a hint, checked before use.
    hints: [u32; SUCCESSORS],
}

impl Successors {
    /// Some client took `successor` (now at `row`) within the horizon after this key.
    fn add(&mut self, successor: u64, row: usize) {
        if let Some(j) = self.keys.iter().position(|&key| key == successor) {
            self.counts[j] += 1.0;
            self.hints[j] = row as u32;
            return;
        }
        // Not present: take an empty entry, else replace the least counted one.
        let mut replace = 0;
        for j in 0..SUCCESSORS {
            if self.keys[j] == EMPTY_KEY {
                replace = j;
                break;
            }
            if self.counts[j] < self.counts[replace] {
                replace = j;
            }
        }
        self.keys[replace] = successor;
        self.counts[replace] = 1.0;
        self.hints[replace] = row as u32;
    }
}

/// The scoring fields of every tracked row, one array per field, as of the
/// last [`FeatureStore::decay_to`]: what [`FeatureView`] reads (scoring streams
/// through only the fields a model uses).
#[derive(Clone, Debug, PartialEq)]
struct Published {
    last_s: Vec<f32>,
    /// Per scale, by row.
    counts: [Vec<f32>; SCALES],
    successor_boost: Vec<f32>,
    successor_boost_s: Vec<f32>,
    gap_rate: Vec<f32>,
    gap_confidence: Vec<f32>,
}

impl Published {
    fn new(capacity: usize) -> Published {
        Published {
            last_s: advise_huge_pages(vec![0.0; capacity]),
            counts: std::array::from_fn(|_| advise_huge_pages(vec![0.0; capacity])),
            successor_boost: advise_huge_pages(vec![0.0; capacity]),
            successor_boost_s: advise_huge_pages(vec![0.0; capacity]),
            gap_rate: advise_huge_pages(vec![0.0; capacity]),
            gap_confidence: advise_huge_pages(vec![0.0; capacity]),
        }
    }

    /// Copies the scoring fields of `record` to `row`.
    #[inline(always)]
    fn set(&mut self, row: usize, record: &KeyRecord) {
        self.last_s[row] = record.last_s;
        for (counts, &count) in self.counts.iter_mut().zip(&record.counts) {
            counts[row] = count;
        }
        self.successor_boost[row] = record.successor_boost;
        self.successor_boost_s[row] = record.successor_boost_s;
        self.gap_rate[row] = record.gap_rate;
        self.gap_confidence[row] = record.gap_confidence;
    }

    /// [`Published::set`] for rows `0..records.len()`, and clears their `dirty`
    /// flags: field by field over blocks of rows (sequential writes, no bounds
    /// check per row).
    fn set_all(&mut self, records: &mut [KeyRecord]) {
        for (block_index, records) in records.chunks_mut(BLOCK).enumerate() {
            let rows = block_index * BLOCK..block_index * BLOCK + records.len();
            let copy = |out: &mut [f32], field: fn(&KeyRecord) -> f32| {
                for (out, record) in out[rows.clone()].iter_mut().zip(records.iter()) {
                    *out = field(record);
                }
            };
            copy(&mut self.last_s, |record| record.last_s);
            for (scale, counts) in self.counts.iter_mut().enumerate() {
                for (out, record) in counts[rows.clone()].iter_mut().zip(records.iter()) {
                    *out = record.counts[scale];
                }
            }
            copy(&mut self.successor_boost, |record| record.successor_boost);
            copy(&mut self.successor_boost_s, |record| {
                record.successor_boost_s
            });
            copy(&mut self.gap_rate, |record| record.gap_rate);
            copy(&mut self.gap_confidence, |record| record.gap_confidence);
            for record in records.iter_mut() {
                record.dirty = false;
            }
        }
    }

    /// Prefetches the lines [`Published::set`] writes.
    #[inline(always)]
    fn prefetch(&self, row: usize) {
        prefetch(&self.last_s[row]);
        for counts in &self.counts {
            prefetch(&counts[row]);
        }
        prefetch(&self.successor_boost[row]);
        prefetch(&self.successor_boost_s[row]);
        prefetch(&self.gap_rate[row]);
        prefetch(&self.gap_confidence[row]);
    }

    fn swap(&mut self, a: usize, b: usize) {
        self.last_s.swap(a, b);
        for counts in &mut self.counts {
            counts.swap(a, b);
        }
        self.successor_boost.swap(a, b);
        self.successor_boost_s.swap(a, b);
        self.gap_rate.swap(a, b);
        self.gap_confidence.swap(a, b);
    }
}

/// One slot of [`RowIndex`]: 4 to a cache line.
#[derive(Clone, Copy)]
#[repr(C, align(16))]
struct Slot {
    key: u64,
    /// [`VACANT`] if the slot is empty.
    row: u32,
}

const VACANT: u32 = u32::MAX;

/// Key hash → row: open addressing with linear probing in a flat power-of-two
/// table kept at most half full, deletion by backward shift (no tombstones).
/// Any key, 0 included, can be stored (emptiness is marked in the row).
///
/// The hashes come from the event rings, which clients write: a client could
/// pick hashes that share a home slot and make every probe walk a long chain.
/// A secret drawn per process (`salt`) goes into each home slot, so such a set
/// can't be picked from outside.
struct RowIndex {
    slots: Vec<Slot>,
    shift: u32,
    mask: usize,
    len: usize,
    salt: u64,
}

impl RowIndex {
    /// An index for at most `keys` keys (`keys < u32::MAX`).
    fn new(keys: usize) -> RowIndex {
        let size = (2 * keys).next_power_of_two().max(16);
        RowIndex {
            slots: huge_page_vec(
                Slot {
                    key: 0,
                    row: VACANT,
                },
                size,
            ),
            shift: 64 - size.trailing_zeros(),
            mask: size - 1,
            len: 0,
            salt: std::hash::BuildHasher::hash_one(
                &std::collections::hash_map::RandomState::new(),
                0u64,
            ),
        }
    }

    /// The first slot to probe (Fibonacci hashing of the salted key: the top
    /// bits of a multiple, so that even small, sequential test keys spread).
    #[inline(always)]
    fn home(&self, key: u64) -> usize {
        ((key ^ self.salt).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> self.shift) as usize
    }

    #[inline(always)]
    fn prefetch(&self, key: u64) {
        prefetch(&self.slots[self.home(key)]);
    }

    /// The slot holding `key`, or the vacant slot where it would go.
    #[inline(always)]
    fn find(&self, key: u64) -> usize {
        let mut position = self.home(key);
        loop {
            let slot = &self.slots[position];
            if slot.row == VACANT || slot.key == key {
                return position;
            }
            position = (position + 1) & self.mask;
        }
    }

    #[inline(always)]
    fn get(&self, key: u64) -> Option<u32> {
        let slot = &self.slots[self.find(key)];
        (slot.row != VACANT).then_some(slot.row)
    }

    /// Maps `key` to `row` (inserting it or updating it).
    fn insert(&mut self, key: u64, row: u32) {
        debug_assert_ne!(row, VACANT);
        let position = self.find(key);
        if self.slots[position].row == VACANT {
            self.len += 1;
            assert!(2 * self.len <= self.slots.len(), "row index over half full");
            self.slots[position].key = key;
        }
        self.slots[position].row = row;
    }

    fn remove(&mut self, key: u64) {
        let mut hole = self.find(key);
        if self.slots[hole].row == VACANT {
            return;
        }
        self.len -= 1;
        let mut position = hole;
        loop {
            position = (position + 1) & self.mask;
            let slot = self.slots[position];
            if slot.row == VACANT {
                break;
            }
            // The entry may fill the hole unless its home lies after the hole
            // (cyclically, within (hole, position]).
            let from_home = position.wrapping_sub(self.home(slot.key)) & self.mask;
            let from_hole = position.wrapping_sub(hole) & self.mask;
            if from_home >= from_hole {
                self.slots[hole] = slot;
                hole = position;
            }
        }
        self.slots[hole].row = VACANT;
    }

    #[cfg(test)]
    fn entries(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        self.slots
            .iter()
            .filter(|slot| slot.row != VACANT)
            .map(|slot| (slot.key, slot.row))
    }
}

#[derive(Clone, Copy, Default)]
struct ClientRecent {
    /// (key hash, time of its request, row hint: the key's row then, checked before use).
    keys: [(u64, u64, u32); CLIENT_RECENT],
    next: u8,
    /// Whether this entry holds a client (entries of the direct array start empty).
    present: bool,
}

/// Per-client recent keys: a flat array indexed by client id below
/// [`CLIENTS_MAX`] (ids are small), a hash map above. At most [`CLIENTS_MAX`]
/// clients in all: a new client past this clears the table.
#[derive(Default)]
struct ClientTable {
    direct: Vec<ClientRecent>,
    other: HashMap<u32, ClientRecent, IdentityBuildHasher>,
    len: usize,
}

impl ClientTable {
    /// The entry of `client`, created (empty) if new.
    #[inline(always)]
    fn entry(&mut self, client: u32) -> &mut ClientRecent {
        let id = client as usize;
        let known = if id < CLIENTS_MAX {
            self.direct.get(id).is_some_and(|recent| recent.present)
        } else {
            self.other.contains_key(&client)
        };
        if !known {
            if self.len >= CLIENTS_MAX {
                self.direct.clear();
                self.other.clear();
                self.len = 0;
            }
            self.len += 1;
        }
        if id < CLIENTS_MAX {
            if id >= self.direct.len() {
                self.direct.resize(id + 1, ClientRecent::default());
            }
            let recent = &mut self.direct[id];
            recent.present = true;
            recent
        } else {
            self.other.entry(client).or_default()
        }
    }
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
    /// Per scale, by row, as of each row's last request.
    counts: [&'a [f32]; SCALES],
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

    /// Features 9 and 10 (`gap_rate`, `gap_confidence`) of rows `start ..
    /// start + len`, as stored: what [`FeatureView::block_of`] would copy
    /// into the block. A scoring loop that reads them here, in the loop
    /// that uses them, saves the copy (in a profile of hold-value's tick the
    /// copy, a `memmove` that waits for memory, took an eighth of the time).
    pub fn gaps(&self, start: usize, len: usize) -> [&[f32]; 2] {
        [
            &self.gap_rate[start..start + len],
            &self.gap_confidence[start..start + len],
        ]
    }

    /// Like [`FeatureView::block`], computing only the feature groups in `set`
    /// (the others are left as they were): scoring is bound by memory bandwidth,
    /// so a model reads only what it uses.
    #[inline(always)]
    pub fn block_of(&self, start: usize, out: &mut FeatureBlock, set: FeatureSet) {
        let len = BLOCK.min(self.len().saturating_sub(start));
        out.len = len;
        let now_s = self.now_s;
        if set.rates || set.recency {
            let last_s = &self.last_s[start..start + len];
            for (age, &last) in out.age_s[..len].iter_mut().zip(last_s) {
                *age = age_s(now_s, last);
            }
            self.rates_and_recency(start, out);
        }
        if set.successor {
            let inverse_horizon_s = self.inverse_horizon_s();
            let boost = &self.successor_boost[start..start + len];
            let boost_s = &self.successor_boost_s[start..start + len];
            for ((out, &boost), &boost_s) in
                out.features[8][..len].iter_mut().zip(boost).zip(boost_s)
            {
                *out = successor_feature(now_s, boost, boost_s, inverse_horizon_s);
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
        let age_s = &out.age_s[..len];
        let (rates, rest) = out.features.split_at_mut(SCALES);
        let recencies = &mut rest[..SCALES];
        for scale in 0..SCALES {
            let rate = &mut rates[scale][..len];
            let recency = &mut recencies[scale][..len];
            let counts = &self.counts[scale][start..start + len];
            for (((rate, recency), &age), &count) in rate
                .iter_mut()
                .zip(recency.iter_mut())
                .zip(age_s)
                .zip(counts)
            {
                (*rate, *recency) = rate_and_recency(scale, count, age);
            }
        }
    }

    /// `1 / horizon` in seconds, as the successor feature divides by it.
    #[inline(always)]
    fn inverse_horizon_s(&self) -> f32 {
        1.0 / (self.horizon_us as f32 * 1e-6)
    }

    /// The rows `start..end` as a view of their own (row `start` is its row 0).
    pub fn rows(&self, start: usize, end: usize) -> FeatureView<'_> {
        FeatureView {
            key_hash: &self.key_hash[start..end],
            last_us: &self.last_us[start..end],
            last_s: &self.last_s[start..end],
            counts: self.counts.map(|counts| &counts[start..end]),
            successor_boost: &self.successor_boost[start..end],
            successor_boost_s: &self.successor_boost_s[start..end],
            gap_rate: &self.gap_rate[start..end],
            gap_confidence: &self.gap_confidence[start..end],
            ..*self
        }
    }

    /// The feature vector of one active row: [`FeatureView::block`]'s, bit
    /// for bit (the same formulas, one row at a time).
    pub fn vector(&self, row: usize) -> [f32; FEATURES] {
        let mut features = [0.0; FEATURES];
        let age = age_s(self.now_s, self.last_s[row]);
        for scale in 0..SCALES {
            (features[scale], features[SCALES + scale]) =
                rate_and_recency(scale, self.counts[scale][row], age);
        }
        features[8] = successor_feature(
            self.now_s,
            self.successor_boost[row],
            self.successor_boost_s[row],
            self.inverse_horizon_s(),
        );
        features[9] = self.gap_rate[row];
        features[10] = self.gap_confidence[row];
        features
    }

    /// Prefetches the lines [`FeatureView::vector`] reads for `row`, and
    /// its `last_us` (a caller reading scattered rows asks a few rows ahead).
    #[inline(always)]
    pub fn prefetch(&self, row: usize) {
        prefetch(&self.last_us[row]);
        prefetch(&self.last_s[row]);
        for counts in &self.counts {
            prefetch(&counts[row]);
        }
        prefetch(&self.successor_boost[row]);
        prefetch(&self.successor_boost_s[row]);
        prefetch(&self.gap_rate[row]);
        prefetch(&self.gap_confidence[row]);
    }

    /// Request counts of rows `start .. start + out.len()` decayed to now, at one scale.
    pub fn decayed_counts(&self, start: usize, scale: usize, out: &mut [f32]) {
        let end = start + out.len();
        let inverse_tau_s = 1e6 / SCALE_TAU_US[scale] as f32;
        for ((out, &last), &count) in out
            .iter_mut()
            .zip(&self.last_s[start..end])
            .zip(&self.counts[scale][start..end])
        {
            *out = count * fast_exp(-(self.now_s - last).max(0.0) * inverse_tau_s);
        }
    }

    /// Request count of one row decayed to now, at one scale.
    pub fn decayed_count(&self, row: usize, scale: usize) -> f32 {
        let age_s = (self.now_s - self.last_s[row]).max(0.0);
        self.counts[scale][row] * fast_exp(-age_s * 1e6 / SCALE_TAU_US[scale] as f32)
    }

    /// The successor boost of one row, decayed to now.
    pub fn successor_boost(&self, row: usize) -> f32 {
        self.vector(row)[8]
    }
}

/// Seconds since the last request (never negative).
#[inline(always)]
fn age_s(now_s: f32, last_s: f32) -> f32 {
    (now_s - last_s).max(0.0)
}

/// The rate and recency features at one scale of a row whose count was
/// `count` at its last request, `age_s` ago.
#[inline(always)]
fn rate_and_recency(scale: usize, count: f32, age_s: f32) -> (f32, f32) {
    let inverse_tau_s = 1e6 / SCALE_TAU_US[scale] as f32;
    let decay = fast_exp(-age_s * inverse_tau_s);
    (saturate(count * decay * RATE_FEATURE_SCALE[scale]), decay)
}

/// The successor feature: the boost set at `boost_s`, decayed to `now_s`
/// with the horizon as time constant.
#[inline(always)]
fn successor_feature(now_s: f32, boost: f32, boost_s: f32, inverse_horizon_s: f32) -> f32 {
    let since = (now_s - boost_s).max(0.0);
    (boost * fast_exp(-since * inverse_horizon_s)).min(1.0)
}

/// The bounded per-key feature table. See the module docs.
pub struct FeatureStore {
    capacity: usize,
    horizon_us: u64,
    activity_window_us: u64,
    index: RowIndex,
    key_hash: Vec<u64>,
    last_us: Vec<u64>,
    records: Vec<KeyRecord>,
    successors: Vec<Successors>,
    published: Published,
    /// Rows whose record is `dirty` (and possibly some that no longer are).
    dirty_rows: Vec<u32>,
    /// Every row may be dirty (`dirty_rows` grew too long and was dropped).
    all_dirty: bool,
    /// The f32 times in the records are seconds since `epoch_us` (f32 halves the
    /// bytes a tick reads; re-based every `EPOCH_SPAN_US` so the resolution stays
    /// below 0.2 ms).
    epoch_us: u64,
    active: usize,
    tracked: usize,
    now_us: u64,
    scanned_at_us: u64,
    clients: ClientTable,
    sketch: TailSketch,
    rng: u64,
    inverse_tau_s: [f32; SCALES],
    /// Keys evicted to stay within capacity, since creation.
    pub evictions: u64,
    /// If watched ([`FeatureStore::watch_woken`]): `(ts_us, key_hash)` of
    /// each idle key a successor boost made active again, since the last
    /// [`FeatureStore::drain_woken`].
    woken: Option<Vec<(u64, u64)>>,
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
            index: RowIndex::new(capacity),
            key_hash: advise_huge_pages(vec![0; capacity]),
            last_us: huge_page_vec(NEVER_US, capacity),
            records: huge_page_vec(KeyRecord::default(), capacity),
            successors: huge_page_vec(Successors::default(), capacity),
            published: Published::new(capacity),
            dirty_rows: Vec::new(),
            all_dirty: false,
            epoch_us: 0,
            active: 0,
            tracked: 0,
            now_us: 0,
            scanned_at_us: 0,
            woken: None,
            clients: ClientTable::default(),
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
        self.index.get(key_hash).map(|row| row as usize)
    }

    /// Time of the last request of a tracked key.
    pub fn last_request_us(&self, key_hash: u64) -> Option<u64> {
        self.row_of(key_hash)
            .map(|row| self.last_us[row])
            .filter(|&last| last != NEVER_US)
    }

    /// The active rows, at the time of the last [`FeatureStore::decay_to`]:
    /// their features are those published by that call (events ingested since
    /// show only in `last_us`).
    pub fn view(&self) -> FeatureView<'_> {
        let n = self.active;
        let published = &self.published;
        FeatureView {
            now_us: self.now_us,
            now_s: self.seconds(self.now_us),
            horizon_us: self.horizon_us,
            key_hash: &self.key_hash[..n],
            last_us: &self.last_us[..n],
            last_s: &published.last_s[..n],
            counts: published.counts.each_ref().map(|counts| &counts[..n]),
            successor_boost: &published.successor_boost[..n],
            successor_boost_s: &published.successor_boost_s[..n],
            gap_rate: &published.gap_rate[..n],
            gap_confidence: &published.gap_confidence[..n],
        }
    }

    /// Marks `row` as changed since the last publication.
    #[inline(always)]
    fn mark_dirty(&mut self, row: usize) {
        let record = &mut self.records[row];
        if !record.dirty {
            record.dirty = true;
            self.list_dirty(row);
        }
    }

    fn list_dirty(&mut self, row: usize) {
        self.dirty_rows.push(row as u32);
        if self.dirty_rows.len() > 2 * self.capacity {
            // (Only swaps list rows twice: a long run of them without a
            // decay_to.) Publish every row next time instead.
            self.dirty_rows.clear();
            self.all_dirty = true;
        }
    }

    /// Copies the scoring fields of every dirty row to the published arrays.
    fn publish(&mut self) {
        let n = self.tracked;
        if self.all_dirty || self.dirty_rows.len() > n / 8 {
            // Many rows: one sequential pass is cheaper than random writes.
            self.published.set_all(&mut self.records[..n]);
        } else {
            const AHEAD: usize = 8;
            for i in 0..self.dirty_rows.len() {
                if let Some(&ahead) = self.dirty_rows.get(i + AHEAD) {
                    prefetch(&self.records[ahead as usize]);
                    self.published.prefetch(ahead as usize);
                }
                let row = self.dirty_rows[i] as usize;
                let record = &mut self.records[row];
                if record.dirty {
                    self.published.set(row, record);
                    record.dirty = false;
                }
            }
        }
        self.dirty_rows.clear();
        self.all_dirty = false;
    }

    /// `time_us` as f32 seconds since the epoch.
    fn seconds(&self, time_us: u64) -> f32 {
        (time_us as i64 - self.epoch_us as i64) as f32 * 1e-6
    }

    fn rebase(&mut self, epoch_us: u64) {
        let shift_s = (epoch_us as i64 - self.epoch_us as i64) as f32 * 1e-6;
        let n = self.tracked;
        for record in &mut self.records[..n] {
            record.last_s -= shift_s;
            record.successor_boost_s -= shift_s;
        }
        let published = &mut self.published;
        for time in published.last_s[..n]
            .iter_mut()
            .chain(&mut published.successor_boost_s[..n])
        {
            *time -= shift_s;
        }
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

    /// The row of a tracked key if `hint` is it (one line, usually cached),
    /// else from the index.
    #[inline(always)]
    fn row_by_hint(&self, key_hash: u64, hint: u32) -> Option<usize> {
        let hint = hint as usize;
        if hint < self.tracked && self.records[hint].key_hash == key_hash {
            Some(hint)
        } else {
            self.row_of(key_hash)
        }
    }

    /// From now on, keeps the keys a successor boost wakes (idle keys made
    /// active again without a request) for [`FeatureStore::drain_woken`].
    pub fn watch_woken(&mut self) {
        self.woken.get_or_insert_with(Vec::new);
    }

    /// `(ts_us, key_hash)` of the keys woken since the last call, in order
    /// (none if not watched).
    pub fn drain_woken(&mut self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.woken.iter_mut().flat_map(|woken| woken.drain(..))
    }

    /// Records one request. Events may come slightly out of order (decay uses
    /// the non-negative part of each time difference).
    pub fn ingest(&mut self, ts_us: u64, client: u32, key_hash: u64) {
        self.ingest_one(ts_us, client, key_hash);
    }

    /// Records requests `(ts_us, client, key_hash)`, in order: the same as
    /// [`FeatureStore::ingest`] on each, but the memory accesses of the next
    /// few events are prefetched (see the module docs), so that their cache
    /// misses overlap.
    pub fn ingest_batch(&mut self, events: &[(u64, u32, u64)]) {
        for &(_, _, key_hash) in events.iter().take(PREFETCH_INDEX_AHEAD) {
            self.index.prefetch(key_hash);
        }
        for (i, &(ts_us, client, key_hash)) in events.iter().enumerate() {
            if let Some(&(_, _, ahead)) = events.get(i + PREFETCH_INDEX_AHEAD) {
                self.index.prefetch(ahead);
            }
            if let Some(&(_, _, ahead)) = events.get(i + PREFETCH_ROW_AHEAD) {
                self.prefetch_row(ahead);
            }
            if let Some(&(_, _, ahead)) = events.get(i + PREFETCH_SUCCESSORS_AHEAD) {
                self.prefetch_successors(ahead);
            }
            self.ingest_one(ts_us, client, key_hash);
        }
    }

    /// Prefetches the lines ingest touches for a tracked key itself.
    #[inline(always)]
    fn prefetch_row(&self, key_hash: u64) {
        if let Some(row) = self.index.get(key_hash) {
            let row = row as usize;
            prefetch(&self.records[row]);
            prefetch(&self.successors[row]);
            prefetch(&self.last_us[row]);
        }
    }

    /// Prefetches the records of the successors a tracked key may boost.
    #[inline(always)]
    fn prefetch_successors(&self, key_hash: u64) {
        if let Some(row) = self.index.get(key_hash) {
            let successors = &self.successors[row as usize];
            for (&key, &hint) in successors.keys.iter().zip(&successors.hints) {
                if key != EMPTY_KEY
                    && let Some(record) = self.records.get(hint as usize)
                {
                    prefetch(record);
                }
            }
        }
    }

    #[inline(always)]
    fn ingest_one(&mut self, ts_us: u64, client: u32, key_hash: u64) {
        let row = self.activate(key_hash);
        let last = self.last_us[row];
        let horizon_s = self.horizon_us as f32 * 1e-6;
        let ts_s = self.seconds(ts_us);
        let record = &mut self.records[row];
        if last == NEVER_US {
            for scale in 0..SCALES - 1 {
                record.counts[scale] = 1.0;
            }
            record.counts[SCALES - 1] += 1.0; // the sketch's estimate plus this request
        } else {
            let gap_s = ts_us.saturating_sub(last) as f32 * 1e-6;
            for scale in 0..SCALES {
                let decay = fast_exp(-gap_s * self.inverse_tau_s[scale]);
                record.counts[scale] = record.counts[scale] * decay + 1.0;
            }
            let gaps_seen = record.gap_confidence;
            let mean = if gaps_seen == 0.0 {
                gap_s
            } else {
                record.gap_mean_s + GAP_EWMA_WEIGHT * (gap_s - record.gap_mean_s)
            };
            record.gap_mean_s = mean;
            record.gap_rate = saturate(horizon_s / mean.max(1e-6));
            // gap_confidence = n / (n + 4) for n gaps seen, updated without storing n.
            let n = 4.0 * gaps_seen / (1.0 - gaps_seen).max(1e-6) + 1.0;
            record.gap_confidence = (n / (n + 4.0)).min(0.999);
        }
        if last == NEVER_US || ts_us > last {
            self.last_us[row] = ts_us;
            record.last_s = ts_s;
        }

        // A request fulfils the successor prediction that pointed at it: a boost
        // left standing would mark keys that have just been taken, not keys
        // about to be (and teach a learned model that the boost means "done").
        record.successor_boost = 0.0;
        self.mark_dirty(row);
        self.learn_successors(ts_us, client, key_hash, row);
        self.push_successors(row, ts_us);
    }

    /// This client took `key_hash` now: every key it took within the horizon
    /// before gains `key_hash` as a successor.
    #[inline(always)]
    fn learn_successors(&mut self, ts_us: u64, client: u32, key_hash: u64, row: usize) {
        let horizon_us = self.horizon_us;
        let recent = self.clients.entry(client);
        for &(predecessor, at_us, hint) in &recent.keys {
            if predecessor == EMPTY_KEY || ts_us.saturating_sub(at_us) > horizon_us {
                continue;
            }
            // The hint saves a hash probe unless the row moved since.
            let hint = hint as usize;
            let predecessor_row =
                if hint < self.tracked && self.records[hint].key_hash == predecessor {
                    Some(hint)
                } else {
                    self.index.get(predecessor).map(|row| row as usize)
                };
            if let Some(predecessor_row) = predecessor_row {
                self.successors[predecessor_row].add(key_hash, row);
            }
        }
        if let Some(entry) = recent.keys.iter_mut().find(|(key, _, _)| *key == key_hash) {
            entry.1 = ts_us;
            entry.2 = row as u32;
        } else {
            recent.keys[recent.next as usize] = (key_hash, ts_us, row as u32);
            recent.next = ((recent.next as usize + 1) % CLIENT_RECENT) as u8;
        }
    }

    /// The key at `row` was just requested: raise the successor boost of the keys
    /// that usually follow it.
    #[inline(always)]
    fn push_successors(&mut self, row: usize, ts_us: u64) {
        let record = &mut self.records[row];
        record.predecessor_count += 1.0;
        let predecessors = record.predecessor_count;
        if predecessors >= PREDECESSOR_COUNT_HALVING {
            record.predecessor_count *= 0.5;
            for count in &mut self.successors[row].counts {
                *count *= 0.5;
            }
        }
        let now_s = self.seconds(ts_us);
        let inverse_horizon_s = 1e6 / self.horizon_us as f32;
        // (Boosting other keys moves no row below `active`: `row` stays put.)
        let successors = self.successors[row];
        for j in 0..SUCCESSORS {
            let successor = successors.keys[j];
            if successor == EMPTY_KEY {
                continue;
            }
            // The current occurrence has had no chance to be followed yet.
            let observed = (predecessors - 1.0).max(1.0);
            let probability = (successors.counts[j] / observed).min(1.0);
            if probability < SUCCESSOR_PUSH_MIN {
                continue; // weak successors are not worth a lookup (most of the cost of ingest)
            }
            let Some(mut successor_row) = self.row_by_hint(successor, successors.hints[j]) else {
                continue;
            };
            let target = &self.records[successor_row];
            let since = (now_s - target.successor_boost_s).max(0.0);
            let current = target.successor_boost * fast_exp(-since * inverse_horizon_s);
            if probability > current {
                if successor_row >= self.active {
                    successor_row = self.reactivate(successor_row);
                    if let Some(woken) = &mut self.woken {
                        woken.push((ts_us, successor));
                    }
                }
                let target = &mut self.records[successor_row];
                target.successor_boost = probability;
                target.successor_boost_s = now_s;
                self.mark_dirty(successor_row);
            }
            self.successors[row].hints[j] = successor_row as u32;
        }
    }

    /// Returns the row of `key_hash`, admitting it if new, and makes it active.
    #[inline(always)]
    fn activate(&mut self, key_hash: u64) -> usize {
        let row = match self.index.get(key_hash) {
            Some(row) => row as usize,
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
            let long_count = self.records[victim].counts[SCALES - 1]
                * fast_exp(-idle_s * self.inverse_tau_s[SCALES - 1]);
            self.sketch.add(victim_hash, long_count);
            self.index.remove(victim_hash);
            self.evictions += 1;
            victim
        };
        self.key_hash[row] = key_hash;
        self.last_us[row] = NEVER_US;
        let mut counts = [0.0; SCALES];
        counts[SCALES - 1] = self.sketch.estimate(key_hash);
        self.records[row] = KeyRecord {
            key_hash,
            counts,
            ..KeyRecord::default()
        };
        self.successors[row] = Successors::default();
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
        self.records.swap(a, b);
        self.successors.swap(a, b);
        self.published.swap(a, b);
        // A dirty record listed under its old row is listed again under its new one.
        for row in [a, b] {
            if self.records[row].dirty {
                self.list_dirty(row);
            }
        }
        self.index.insert(self.key_hash[a], a as u32);
        self.index.insert(self.key_hash[b], b as u32);
    }

    /// Publishes the features of the rows changed since the last call (see
    /// [`FeatureStore::view`]), sets the scoring time to `now_us` (never
    /// backwards) and, at most every 100 ms, retires rows idle past the
    /// activity window.
    pub fn decay_to(&mut self, now_us: u64) {
        self.publish();
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
                let record = &self.records[row];
                let since = (now_s - record.successor_boost_s).max(0.0);
                if record.successor_boost * fast_exp(-since * inverse_horizon_s)
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
    fn a_rows_vector_is_its_column_of_the_block_bit_for_bit() {
        // Regression guard: `vector` (the online choice's miniatures and
        // the training samples read it) computes one row with the block's
        // formulas; the scores it leads to must not depend on which.
        let mut features = store(1024);
        let mut state = 5u64;
        for i in 0..20_000u64 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            features.ingest(i * 150, (state >> 40) as u32 % 8, state % 700 + 1);
        }
        features.decay_to(20_000 * 150 + 70_000);
        let view = features.view();
        assert!(view.len() > 2 * BLOCK, "{}", view.len());
        let mut block = FeatureBlock::new();
        for start in (0..view.len()).step_by(BLOCK) {
            view.block(start, &mut block);
            for i in 0..block.len {
                let vector = view.vector(start + i);
                for (j, value) in vector.iter().enumerate() {
                    assert_eq!(
                        value.to_bits(),
                        block.features[j][i].to_bits(),
                        "row {} feature {}",
                        start + i,
                        FEATURE_NAMES[j]
                    );
                }
            }
        }
        assert!((0..view.len()).any(|row| view.vector(row)[8] > 0.0));
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
        assert_eq!(features.index.len, 32);
        for (hash, row) in features.index.entries() {
            assert_eq!(
                features.key_hash[row as usize], hash,
                "index and rows agree"
            );
            assert_eq!(features.records[row as usize].key_hash, hash);
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
            features.records[row].counts[3] > 40.0,
            "sketch remembered ~50: {}",
            features.records[row].counts[3]
        );
    }

    #[test]
    fn a_successor_boost_that_wakes_an_idle_key_is_reported_if_watched() {
        // Client 0 takes B 20 ms after A, 20 times.
        let learnt = || {
            let mut features = store(64);
            for round in 0..20u64 {
                features.ingest(round * 1_000_000, 0, 0xA);
                features.ingest(round * 1_000_000 + 20_000, 0, 0xB);
            }
            features
        };
        let mut features = learnt();
        // Both idle past the activity window (30 s): no longer active.
        let t = 100_000_000;
        features.decay_to(t);
        assert!(features.view().key_hash.iter().all(|&k| k != 0xB));
        features.watch_woken();
        features.ingest(t, 0, 0xA);
        assert_eq!(features.drain_woken().collect::<Vec<_>>(), [(t, 0xB)]);
        assert!(features.view().key_hash.contains(&0xB), "B is active again");
        // A boost of a key already active wakes nothing.
        features.ingest(t + 1_000, 0, 0xA);
        assert_eq!(features.drain_woken().count(), 0);
        // Not watched: nothing is kept, and draining does not start it.
        let mut unwatched = learnt();
        unwatched.decay_to(t);
        assert_eq!(unwatched.drain_woken().count(), 0);
        unwatched.ingest(t, 0, 0xA);
        assert_eq!(unwatched.drain_woken().count(), 0);
        assert!(unwatched.woken.is_none());
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

    #[test]
    fn records_and_successor_tables_are_one_cache_line_each() {
        assert_eq!(std::mem::size_of::<KeyRecord>(), 64);
        assert_eq!(std::mem::align_of::<KeyRecord>(), 64);
        assert_eq!(std::mem::size_of::<Successors>(), 64);
        assert_eq!(std::mem::align_of::<Successors>(), 64);
        assert_eq!(std::mem::size_of::<Slot>(), 16);
    }

    #[test]
    fn the_row_index_agrees_with_a_hash_map() {
        // Few slots and clustered keys, so that probes wrap and deletions shift.
        let mut index = RowIndex::new(40);
        let mut model: HashMap<u64, u32> = HashMap::new();
        let mut state = 0x1234_5678_9abc_def1u64;
        for step in 0..20_000u32 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let key = match state % 3 {
                0 => state % 64,         // small keys, 0 included
                1 => (state % 64) << 58, // same home bits differ only on top
                _ => state >> 8,
            };
            if model.len() < 40 && state & 0x100 != 0 {
                index.insert(key, step);
                model.insert(key, step);
            } else {
                index.remove(key);
                model.remove(&key);
            }
            assert_eq!(index.len, model.len());
            if step % 97 == 0 {
                for (&key, &row) in &model {
                    assert_eq!(index.get(key), Some(row), "step {step} key {key:#x}");
                }
                assert_eq!(index.entries().count(), model.len());
            }
            assert_eq!(index.get(key), model.get(&key).copied());
        }
    }

    /// Every per-key array, bit for bit, and the order of rows.
    fn state_of(features: &FeatureStore) -> impl PartialEq + std::fmt::Debug {
        let n = features.tracked;
        (
            features.active,
            features.tracked,
            features.evictions,
            features.key_hash[..n].to_vec(),
            features.last_us[..n].to_vec(),
            features.records[..n].to_vec(),
            features.successors[..n].to_vec(),
            features.published.clone(),
        )
    }

    /// After a decay_to, the published arrays are the records' scoring fields.
    fn assert_published(features: &FeatureStore) {
        assert!(features.dirty_rows.is_empty() && !features.all_dirty);
        let mut expected = Published::new(features.capacity);
        for (row, record) in features.records[..features.tracked].iter().enumerate() {
            assert!(!record.dirty, "row {row}");
            expected.set(row, record);
        }
        let n = features.tracked;
        let published = &features.published;
        assert_eq!(published.last_s[..n], expected.last_s[..n]);
        for (counts, expected) in published.counts.iter().zip(&expected.counts) {
            assert_eq!(counts[..n], expected[..n]);
        }
        assert_eq!(
            published.successor_boost[..n],
            expected.successor_boost[..n]
        );
        assert_eq!(
            published.successor_boost_s[..n],
            expected.successor_boost_s[..n]
        );
        assert_eq!(published.gap_rate[..n], expected.gap_rate[..n]);
        assert_eq!(published.gap_confidence[..n], expected.gap_confidence[..n]);
    }

    #[test]
    fn batched_ingest_is_one_by_one_ingest() {
        // Small capacity (evictions), short activity window (rows move), few
        // clients and keys (successors learnt and pushed), slightly out of order.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let events: Vec<(u64, u32, u64)> = (0..20_000u64)
            .map(|i| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let key = if state.is_multiple_of(4) {
                    state >> 40
                } else {
                    state % 97
                };
                (i * 300 + state % 500, (state >> 20) as u32 % 6, key)
            })
            .collect();
        let mut one_by_one = FeatureStore::new(64, H, 200_000, 7);
        let mut batched = FeatureStore::new(64, H, 200_000, 7);
        for (chunk_index, chunk) in events.chunks(700).enumerate() {
            for &(ts, client, key) in chunk {
                one_by_one.ingest(ts, client, key);
            }
            batched.ingest_batch(chunk);
            let now = chunk.last().unwrap().0 + 1000 * chunk_index as u64;
            one_by_one.decay_to(now);
            batched.decay_to(now);
            assert!(
                state_of(&one_by_one) == state_of(&batched),
                "after chunk {chunk_index}"
            );
            assert_published(&batched);
        }
        assert!(one_by_one.evictions > 1000);
        let view = batched.view();
        assert!((0..view.len()).any(|row| view.successor_boost(row) > 0.0));
    }

    #[test]
    fn clients_with_large_ids_are_remembered_too() {
        let mut features = store(64);
        for round in 0..5u64 {
            let t = round * 1_000_000;
            features.ingest(t, 4_000_000_000, 0xA);
            features.ingest(t + 20_000, 4_000_000_000, 0xB);
            features.decay_to(t + 30_000);
        }
        let t = 10_000_000;
        features.decay_to(t);
        features.ingest(t, 4_000_000_000, 0xA);
        features.decay_to(t + 10_000);
        let view = features.view();
        let row_b = view.key_hash.iter().position(|&k| k == 0xB).unwrap();
        assert!(view.successor_boost(row_b) > 0.9);
    }

    #[test]
    fn publication_follows_rows_that_move_and_sparse_changes() {
        // Long ticks, a short activity window: keys go idle and come back
        // (swaps of dirty rows); a few events between decays (sparse publication).
        let mut features = FeatureStore::new(256, H, 150_000, 3);
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut t = 0;
        for round in 0..400u64 {
            let events = if round % 50 == 0 { 200 } else { 3 };
            for _ in 0..events {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                t += state % 20_000;
                features.ingest(t, (state >> 30) as u32 % 3, state % 300 + 1);
            }
            features.decay_to(t);
            assert_published(&features);
        }
        assert!(features.evictions > 0);
    }
}
