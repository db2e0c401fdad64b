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
//!   least-squares non-decreasing fit, so the map keeps the member's ranking
//!   across bins;
//! - a score is mapped between its bin's rate and the next bin's, by its
//!   position inside its bin: continuous and non-decreasing (within a pooled
//!   run of bins, keys tie).

/// Bins per octave of the raw score.
pub const SUB_BINS: u32 = 8;
const _: () = assert!(SUB_BINS.is_power_of_two());
/// Octaves below 1 with bins of their own.
pub const OCTAVES: i32 = 14;
/// Bins: `SUB_BINS` per octave in `[2^-OCTAVES, 1)`, and one for 1.
pub const BINS: usize = SUB_BINS as usize * OCTAVES as usize + 1;
/// Pseudo-samples at the bin's raw score, per bin.
pub const PRIOR_SAMPLES: f64 = 10.0;
/// A tag's value for "no bin" (a score of 0 or NaN), see [`bin_of`].
pub const NO_BIN: u8 = u8::MAX;
const _: () = assert!(BINS < NO_BIN as usize, "a bin fits a tag byte");

/// The bin of a raw score and its position inside the bin (in `[0, 1)`);
/// `None` for 0, a negative score or NaN. Scores above 1 count as 1.
#[inline]
fn locate(score: f32) -> Option<(usize, f32)> {
    if score.is_nan() || score <= 0.0 {
        return None;
    }
    let bits = score.min(1.0).to_bits();
    let exponent = ((bits >> 23) & 0xff) as i32 - 127;
    if exponent < -OCTAVES {
        return Some((0, 0.0));
    }
    let mantissa = bits & 0x7f_ffff;
    // The mantissa's top bits pick the bin within the octave; the rest is
    // the position inside it.
    let inside_bits = 23 - SUB_BINS.trailing_zeros();
    let sub = mantissa >> inside_bits;
    let inside = (mantissa & ((1 << inside_bits) - 1)) as f32 / (1u32 << inside_bits) as f32;
    // exponent is in -OCTAVES..=0, 0 only for a score of 1 (sub 0).
    let bin = (exponent + OCTAVES) as u32 * SUB_BINS + sub;
    Some((bin as usize, inside))
}

/// The bin of a raw score as a tag byte ([`NO_BIN`] for none).
pub fn bin_of(score: f32) -> u8 {
    locate(score).map_or(NO_BIN, |(bin, _)| bin as u8)
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
    /// The calibrated rate of each bin; the last entry repeats the top bin's.
    map: [f32; BINS + 1],
}

impl Default for Calibration {
    fn default() -> Self {
        let mut calibration = Calibration {
            samples: [0.0; BINS],
            positives: [0.0; BINS],
            map: [0.0; BINS + 1],
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
        self.map[BINS] = self.map[BINS - 1];
    }

    /// The calibrated probability of a raw score (0 for 0 or NaN).
    #[inline]
    pub fn apply(&self, score: f32) -> f32 {
        match locate(score) {
            None => 0.0,
            Some((bin, inside)) => {
                let low = self.map[bin];
                low + inside * (self.map[bin + 1] - low)
            }
        }
    }

    /// [`Calibration::apply`] to each score in place.
    pub fn apply_all(&self, scores: &mut [f32]) {
        for score in scores {
            *score = self.apply(*score);
        }
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
