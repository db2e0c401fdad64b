//! A member's score made a probability on its own record: the online
//! choice ([`crate::online`]) writes the leader's score through this map, so
//! that the broker's threshold means the same whichever member leads.
//!
//! # Why
//!
//! The members' scores are on different scales: the frequency models read a
//! decayed rate as a Poisson probability, which overstates it for bursty
//! keys; `hold-value` writes a price, not a probability; `logistic` is fitted
//! by log-loss. Written raw, one threshold meant another operating point after
//! each switch of the leader. On tpcc-pg-a's first half, in the online
//! choice's own miniatures, frequency 5s at 0.02 wasted 6.7 times keep-alive's
//! slot-seconds and frequency 60s at 0.02 1.1 times: the threshold the replay
//! chose on the first half (where frequency 5s led early) prepared almost
//! nothing on the second (where logistic and frequency 60s led), 33.23 at 2x
//! waste against frequency 60s's 35.11 (docs/forecasting-history.md, round s25).
//!
//! # What
//!
//! Per member, `P(requested within the horizon | raw score)`, estimated from
//! the forecaster's labelled samples (uniform over the active keys, labelled
//! when their window has closed: no look-ahead):
//!
//! - the raw score's bin, [`SUB_BINS`] per octave from `2^-OCTAVES` to 1 (a
//!   score under `2^-OCTAVES` counts in the lowest bin, 1 has a bin of its
//!   own; 0 and NaN have none and stay 0);
//! - per bin, discounted sample and positive counts (the online choice's
//!   discount: the map follows a drifting workload as the choice does), with
//!   [`PRIOR_SAMPLES`] pseudo-samples at the bin's own raw score, so that a
//!   bin without evidence maps to about its raw score (before any label the
//!   map is near the identity);
//! - pool-adjacent-violators over the bins, weighted by their counts: the
//!   least-squares non-decreasing fit;
//! - a ramp of 1e-7 per bin on top ([`RAMP`]), so that the map rises
//!   strictly and keeps the member's ranking inside a pooled run too (with
//!   ties there, the allocator chose among candidates and victims by key
//!   hash: on pgbench-pg-b a run from raw 0.02 to 0.05 pooled at about
//!   0.06, docs/forecasting-history.md, round s25);
//! - a score is mapped between its bin's rate and the next bin's, by its
//!   position inside its bin: continuous and increasing.

/// Bins per octave of the raw score.
pub const SUB_BINS: u32 = 8;
const _: () = assert!(SUB_BINS.is_power_of_two());
/// Octaves below 1 with bins of their own.
pub const OCTAVES: i32 = 14;
/// Bins: `SUB_BINS` per octave in `[2^-OCTAVES, 1)`, and one for 1.
pub const BINS: usize = SUB_BINS as usize * OCTAVES as usize + 1;
/// Added per bin to the fitted rates, so that the map rises strictly
/// (module docs); far under any threshold's resolution.
pub const RAMP: f32 = 1e-7;
/// Pseudo-samples at the bin's raw score, per bin.
pub const PRIOR_SAMPLES: f64 = 10.0;
/// A tag's value for "no bin" (a score of 0 or NaN), see [`bin_of`].
pub const NO_BIN: u8 = u8::MAX;
const _: () = assert!(BINS < NO_BIN as usize, "a bin fits a tag byte");

/// Bits of an `f32` below a bin's: the mantissa's top `log2(SUB_BINS)` bits
/// pick the bin within its octave, the rest are the position inside it.
const INSIDE_BITS: u32 = 23 - SUB_BINS.trailing_zeros();
/// `bits >> INSIDE_BITS` of `2^-OCTAVES`, the lowest bin's start (a positive
/// float's bits rise with its value, so this shift counts bins).
const LOWEST_CELL: i32 = (127 - OCTAVES) * SUB_BINS as i32;

/// The bin of a positive score's bits (a score under `2^-OCTAVES` in the
/// lowest, above 1, or with the sign bit set, in the top one) and whether
/// the score is strictly inside the range, where its position in its bin
/// counts. Branch-free: [`Calibration::apply_all`] runs it on every key.
#[inline(always)]
fn cell(bits: u32) -> (usize, bool) {
    let cell = (bits >> INSIDE_BITS) as i32 - LOWEST_CELL;
    let bin = cell.clamp(0, BINS as i32 - 1) as usize;
    (bin, cell >= 0 && cell < BINS as i32 - 1)
}

/// The position inside its bin (in `[0, 1)`) of a score in range.
#[inline(always)]
fn inside(bits: u32) -> f32 {
    (bits & ((1 << INSIDE_BITS) - 1)) as f32 * (1.0 / (1u32 << INSIDE_BITS) as f32)
}

/// The bin of a raw score as a tag byte: [`NO_BIN`] for 0, a negative
/// score or NaN; a score above 1 in the top bin.
pub fn bin_of(score: f32) -> u8 {
    if score.is_nan() || score <= 0.0 {
        return NO_BIN;
    }
    cell(score.to_bits()).0 as u8
}

/// The raw score at the middle of a bin (at most 1).
fn bin_middle(bin: usize) -> f64 {
    let octave = (bin as u32 / SUB_BINS) as i32 - OCTAVES;
    let sub = bin as u32 % SUB_BINS;
    (2f64.powi(octave) * (1.0 + (f64::from(sub) + 0.5) / f64::from(SUB_BINS))).min(1.0)
}

/// One member's calibration (module docs).
#[derive(Debug, Clone)]
pub struct Calibration {
    samples: [f64; BINS],
    positives: [f64; BINS],
    /// The calibrated rate of each bin.
    map: [f32; BINS],
    /// The next bin's rate less this one's (0 for the top bin).
    slope: [f32; BINS],
}

impl Default for Calibration {
    fn default() -> Self {
        let mut calibration = Calibration {
            samples: [0.0; BINS],
            positives: [0.0; BINS],
            map: [0.0; BINS],
            slope: [0.0; BINS],
        };
        calibration.rebuild();
        calibration
    }
}

impl Calibration {
    /// One labelled sample whose raw score was in `bin` (a [`bin_of`]).
    pub fn add(&mut self, bin: u8, requested: bool) {
        let Some(samples) = self.samples.get_mut(bin as usize) else {
            return; // NO_BIN: a score of 0 stays 0, nothing to learn
        };
        *samples += 1.0;
        if requested {
            self.positives[bin as usize] += 1.0;
        }
    }

    /// Multiplies every count by `discount` (once a round).
    pub fn decay(&mut self, discount: f64) {
        for count in self.samples.iter_mut().chain(&mut self.positives) {
            *count *= discount;
        }
    }

    /// Recomputes the map from the counts: pool-adjacent-violators over the
    /// bins, each weighted by its samples plus the prior's.
    pub fn rebuild(&mut self) {
        // Runs of pooled bins: (weight, weighted positives, bins).
        let mut runs: Vec<(f64, f64, usize)> = Vec::with_capacity(BINS);
        for bin in 0..BINS {
            let weight = self.samples[bin] + PRIOR_SAMPLES;
            let positives = self.positives[bin] + PRIOR_SAMPLES * bin_middle(bin);
            runs.push((weight, positives, 1));
            // Pool while the last run's rate is under the one before it.
            while let [.., (w1, p1, n1), (w2, p2, n2)] = runs[..]
                && p1 / w1 > p2 / w2
            {
                runs.truncate(runs.len() - 2);
                runs.push((w1 + w2, p1 + p2, n1 + n2));
            }
        }
        let mut bin = 0;
        for (weight, positives, bins) in runs {
            let rate = (positives / weight) as f32;
            self.map[bin..bin + bins].fill(rate);
            bin += bins;
        }
        // Strictly increasing, so that within a pooled run the member's
        // ranking still orders keys (the allocator picks among candidates
        // and victims by score): a ramp of RAMP per bin, the rates scaled
        // to leave room for it under 1 (each moves by at most RAMP * BINS).
        let scale = 1.0 - RAMP * (BINS - 1) as f32;
        for (bin, rate) in self.map.iter_mut().enumerate() {
            *rate = *rate * scale + RAMP * bin as f32;
        }
        for bin in 0..BINS {
            self.slope[bin] = self
                .map
                .get(bin + 1)
                .map_or(0.0, |next| next - self.map[bin]);
        }
    }

    /// The calibrated probability of a raw score (0 for 0 or NaN).
    #[inline(always)]
    pub fn apply(&self, score: f32) -> f32 {
        let bits = score.to_bits();
        let (bin, inside_range) = cell(bits);
        let position = if inside_range { inside(bits) } else { 0.0 };
        let mapped = self.map[bin] + position * self.slope[bin];
        // NaN, 0 and negative scores (whose bits land in some bin) are 0.
        if score > 0.0 { mapped } else { 0.0 }
    }

    /// [`Calibration::apply`] to each score in place: the leader's every
    /// active key, each tick. With AVX2 the loop gathers eight bins at a
    /// time (the same operations, so the same bits).
    pub fn apply_all(&self, scores: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: `apply_all_avx2` requires AVX2 alone, and the CPU has
            // it (checked just above).
            unsafe { self.apply_all_avx2(scores) };
            return;
        }
        self.apply_each(scores);
    }

    #[inline(always)]
    fn apply_each(&self, scores: &mut [f32]) {
        for score in scores {
            *score = self.apply(*score);
        }
    }

    /// [`Calibration::apply_each`], eight scores at a time: the same
    /// operations in the same order (no fused multiply-add), so the same
    /// bits (`apply_all_is_apply_bit_for_bit`).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn apply_all_avx2(&self, scores: &mut [f32]) {
        use std::arch::x86_64::*;
        let lowest = _mm256_set1_epi32(LOWEST_CELL);
        let top = _mm256_set1_epi32(BINS as i32 - 1);
        let inside_mask = _mm256_set1_epi32((1 << INSIDE_BITS) - 1);
        let inside_scale = _mm256_set1_ps(1.0 / (1u32 << INSIDE_BITS) as f32);
        let mut chunks = scores.chunks_exact_mut(8);
        for chunk in &mut chunks {
            // SAFETY: `chunk` is 8 f32s; an unaligned load reads exactly them.
            let score = unsafe { _mm256_loadu_ps(chunk.as_ptr()) };
            let bits = _mm256_castps_si256(score);
            // `cell`, lane by lane (a logical shift, as `u32 >>`).
            let cell = _mm256_sub_epi32(_mm256_srli_epi32::<{ INSIDE_BITS as i32 }>(bits), lowest);
            let bin = _mm256_min_epi32(_mm256_max_epi32(cell, _mm256_setzero_si256()), top);
            // In range: not clamped, and under the top bin.
            let in_range =
                _mm256_andnot_si256(_mm256_cmpeq_epi32(cell, top), _mm256_cmpeq_epi32(cell, bin));
            let inside = _mm256_mul_ps(
                _mm256_cvtepi32_ps(_mm256_and_si256(bits, inside_mask)),
                inside_scale,
            );
            let position = _mm256_and_ps(_mm256_castsi256_ps(in_range), inside);
            // SAFETY: every lane of `bin` is in 0..BINS (clamped just
            // above), and `map` and `slope` hold BINS f32s each; the scale 4
            // is an f32's size in bytes.
            let low = unsafe { _mm256_i32gather_ps::<4>(self.map.as_ptr(), bin) };
            // SAFETY: as the gather just above.
            let slope = unsafe { _mm256_i32gather_ps::<4>(self.slope.as_ptr(), bin) };
            let mapped = _mm256_add_ps(low, _mm256_mul_ps(position, slope));
            // NaN, 0 and negative scores are 0 (an ordered comparison).
            let positive = _mm256_cmp_ps::<_CMP_GT_OQ>(score, _mm256_setzero_ps());
            let written = _mm256_and_ps(mapped, positive);
            // SAFETY: as the load: exactly the chunk's 8 f32s.
            unsafe { _mm256_storeu_ps(chunk.as_mut_ptr(), written) };
        }
        self.apply_each(chunks.into_remainder());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Raw scores from the smallest positive to 2, ascending, finely
    /// spaced, then 0, -1 and NaN.
    fn sweep() -> Vec<f32> {
        let mut scores = vec![f32::MIN_POSITIVE, 1e-30];
        scores.extend((0..=6000).map(|i| 10f32.powf(-6.0 + i as f32 / 1000.0)));
        scores.extend([1.0, 2.0, 0.0, -1.0, f32::NAN]);
        scores
    }

    #[test]
    fn without_evidence_a_score_maps_to_about_itself() {
        let calibration = Calibration::default();
        for score in sweep() {
            let mapped = calibration.apply(score);
            if score.is_nan() || score <= 0.0 {
                assert_eq!(mapped, 0.0, "{score}");
            } else if score >= 2f32.powi(-OCTAVES) {
                // Within a bin's width (1/8 of an octave) of the score.
                let score = score.min(1.0);
                assert!(
                    mapped >= score / 1.13 && mapped <= score * 1.13,
                    "{score} -> {mapped}"
                );
            }
        }
    }

    #[test]
    fn bins_cover_the_range_in_order() {
        assert_eq!(bin_of(0.0), NO_BIN);
        assert_eq!(bin_of(f32::NAN), NO_BIN);
        assert_eq!(bin_of(1e-30), 0);
        assert_eq!(bin_of(1.0) as usize, BINS - 1);
        assert_eq!(bin_of(7.0) as usize, BINS - 1);
        let mut last = 0;
        for score in sweep().into_iter().filter(|s| *s > 0.0) {
            let bin = bin_of(score);
            assert!(bin >= last, "{score}");
            assert!((bin as usize) < BINS);
            last = bin;
        }
    }

    /// A small deterministic generator.
    fn random(state: &mut u64) -> f64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        (*state >> 11) as f64 / (1u64 << 53) as f64
    }

    #[test]
    fn an_overconfident_member_is_brought_down_to_its_record() {
        // Keys whose raw score says p are requested with probability p / 4.
        let mut calibration = Calibration::default();
        let mut state = 7;
        for _ in 0..400_000 {
            let raw = 10f64.powf(-3.0 * random(&mut state)) as f32;
            let requested = random(&mut state) < f64::from(raw) / 4.0;
            calibration.add(bin_of(raw), requested);
        }
        calibration.rebuild();
        for raw in [0.02f32, 0.05, 0.1, 0.2, 0.5, 0.9] {
            let mapped = calibration.apply(raw);
            let truth = raw / 4.0;
            assert!(
                (mapped - truth).abs() < 0.2 * truth + 0.002,
                "{raw}: {mapped} against {truth}"
            );
        }
    }

    #[test]
    fn the_map_never_reverses_the_ranking() {
        // Labels that fall with the score in places: the map pools them.
        let mut state = 11;
        for round in 0..20 {
            let mut calibration = Calibration::default();
            for _ in 0..20_000 {
                let raw = random(&mut state) as f32;
                let p = if round % 2 == 0 {
                    (1.0 - f64::from(raw)).powi(3)
                } else {
                    random(&mut state)
                };
                calibration.add(bin_of(raw), random(&mut state) < p);
            }
            calibration.decay(0.9);
            calibration.rebuild();
            let mut last = 0.0f32;
            for score in sweep().into_iter().filter(|s| *s > 0.0) {
                let mapped = calibration.apply(score);
                assert!(
                    mapped >= last,
                    "round {round}: {score} -> {mapped} < {last}"
                );
                assert!((0.0..=1.0).contains(&mapped));
                last = mapped;
            }
        }
    }

    /// Without the ramp a pooled run of bins mapped to one value, and the
    /// allocator broke the ties by key hash instead of the member's ranking.
    #[test]
    fn a_pooled_run_keeps_the_members_ranking() {
        // Keys scored 0.12 are requested less often than keys scored 0.1:
        // their bins pool into one run.
        let (low, high) = (0.1f32, 0.12f32);
        assert_ne!(bin_of(low), bin_of(high));
        let mut calibration = Calibration::default();
        for i in 0..10_000 {
            calibration.add(bin_of(low), i % 2 == 0);
            calibration.add(bin_of(high), i % 10 == 0);
        }
        calibration.rebuild();
        let (mapped_low, mapped_high) = (calibration.apply(low), calibration.apply(high));
        // One pooled rate, about (0.5 + 0.1) / 2...
        assert!((mapped_low - 0.3).abs() < 0.01, "{mapped_low}");
        assert!(
            mapped_high - mapped_low < 1e-5,
            "{mapped_low} {mapped_high}"
        );
        // ...which still rises with the raw score.
        assert!(mapped_high > mapped_low, "{mapped_low} {mapped_high}");
    }

    #[test]
    fn apply_all_is_apply_bit_for_bit() {
        let mut calibration = Calibration::default();
        let mut state = 5;
        for _ in 0..50_000 {
            let raw = random(&mut state) as f32;
            calibration.add(
                bin_of(raw),
                random(&mut state) < f64::from(raw).sqrt() / 3.0,
            );
        }
        calibration.rebuild();
        // Every edge case in every lane, and a remainder.
        let mut scores = sweep();
        scores.extend([3e-39, 1e-45, f32::INFINITY, f32::NEG_INFINITY, -0.0, 0.5]);
        let expected: Vec<u32> = scores
            .iter()
            .map(|&s| calibration.apply(s).to_bits())
            .collect();
        for offset in 0..8 {
            let mut all = scores[offset..].to_vec();
            calibration.apply_all(&mut all);
            let found: Vec<u32> = all.iter().map(|s| s.to_bits()).collect();
            assert_eq!(found, expected[offset..], "offset {offset}");
        }
    }

    #[test]
    fn evidence_fades_with_the_discount() {
        let mut calibration = Calibration::default();
        for _ in 0..10_000 {
            calibration.add(bin_of(0.5), false);
        }
        calibration.rebuild();
        assert!(calibration.apply(0.5) < 0.01);
        // After many rounds of decay the prior speaks again.
        for _ in 0..2_000 {
            calibration.decay(0.99);
        }
        calibration.rebuild();
        assert!(calibration.apply(0.5) > 0.4, "{}", calibration.apply(0.5));
        calibration.add(NO_BIN, true); // ignored
    }
}
