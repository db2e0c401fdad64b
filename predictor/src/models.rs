//! The ladder of models, behind one trait.
//!
//! Each model writes, for every active key, P(key requested within the horizon).
//! From simplest to richest:
//!
//! | model | score |
//! |---|---|
//! | [`KeepAlive`] | `max(0, 1 - age / keep_alive)`: prepared for `keep_alive` after each use |
//! | [`Frequency`] | `1 - exp(-rate * horizon)`: Poisson, with the rate decayed at one scale |
//! | [`Successor`] | max over keys A requested within the horizon of P(this key within the horizon \| A), decayed |
//! | [`Logistic`] | online logistic regression over all [`FEATURES`] |
//! | [`HoldValue`] | per hold time (500 ms, 2 s, 5 s), the highest of such a regression and per-feature calibrated histograms; scores the best hits per slot-second, on the scale of a probability within the horizon |
//!
//! Only [`Logistic`] and [`HoldValue`] learn, from [`Model::learn`], which the forecaster calls with
//! a sample's features once the sample's horizon window has closed: labels come
//! from the past only.

use crate::config::{ModelKind, PredictorConfig};
use crate::fastmath::{fast_exp, sigmoid};
use crate::features::{
    BLOCK, FEATURE_NAMES, FEATURES, FeatureBlock, FeatureSet, FeatureView, RATE_FEATURE_SCALE,
    SCALE_TAU_US,
};

/// Runs `per_block` over the view in blocks of [`BLOCK`] rows.
#[inline(always)]
fn for_each_block(
    view: &FeatureView<'_>,
    out: &mut [f32],
    set: FeatureSet,
    mut per_block: impl FnMut(&FeatureBlock, &mut [f32]),
) {
    assert_eq!(out.len(), view.len());
    let mut block = FeatureBlock::new();
    for (chunk_index, chunk) in out.chunks_mut(BLOCK).enumerate() {
        view.block_of(chunk_index * BLOCK, &mut block, set);
        debug_assert_eq!(block.len, chunk.len());
        per_block(&block, chunk);
    }
}

/// A model of the ladder. `Sync`: the forecaster may score parts of the
/// rows on several threads at once (`score_threads`).
pub trait Model: Send + Sync {
    fn kind(&self) -> ModelKind;
    /// Writes P(requested within the horizon) for each active row; `out.len() == view.len()`.
    fn score(&self, view: &FeatureView<'_>, out: &mut [f32]);
    /// Whether [`Model::learn`] does anything (the forecaster samples only for such models).
    fn learns(&self) -> bool {
        false
    }
    /// The horizons the model learns at, as multiples of the forecaster's
    /// horizon, ascending; one of them is 1. Most models learn (if at all) at
    /// the horizon only.
    fn label_horizons(&self) -> &[f32] {
        &[1.0]
    }
    /// One labelled sample: the features a key had at some tick, and whether it was
    /// requested within `label_horizons()[head]` times the horizon after that tick.
    fn learn(&mut self, _head: usize, _features: &[f32; FEATURES], _requested: bool) {}
    /// P(requested within the horizon) for one feature vector, for a model
    /// whose score is not that probability ([`HoldValue`]); `None` when the
    /// score is. The forecaster scores itself by it ([`crate::forecaster::SelfScore`]).
    fn horizon_probability(&self, _features: &[f32; FEATURES]) -> Option<f32> {
        None
    }
    /// The score [`Model::score`] writes for one active row, whose feature
    /// vector is `features` (`view.vector(row)`): what the online choice
    /// ([`crate::online`]) scores each member by on the forecaster's samples.
    /// The same formula as the block loop; its last bits may differ where the
    /// block loop fuses multiply-adds.
    fn score_one(&self, view: &FeatureView<'_>, row: usize, features: &[f32; FEATURES]) -> f32;
    /// The forecaster sampled these active rows at this tick (with their
    /// feature vectors), to learn from and to score itself by; a model may
    /// tag each sample with what it needs at labelling time (pushed to `tags`,
    /// one per row). Only the online choice does.
    fn sampled(
        &mut self,
        _view: &FeatureView<'_>,
        rows: &[usize],
        _features: &[[f32; FEATURES]],
        tags: &mut Vec<u64>,
    ) {
        tags.extend(rows.iter().map(|_| 0));
    }
    /// One sample's label at `label_horizons()[head]`, with the tag it got
    /// when it was sampled at `at_us` (or the tag returned when it was
    /// labelled at the previous horizon); returns its tag for the next.
    /// Called in the order samples were taken, per horizon.
    fn labelled(&mut self, _head: usize, tag: u64, _at_us: u64, _requested: bool) -> u64 {
        tag
    }
    /// Every sample whose window had closed has been labelled.
    fn labels_done(&mut self) {}
    /// Whether [`Model::requested`] does anything.
    fn wants_requests(&self) -> bool {
        false
    }
    /// A request, seen before the features take it in (in time order, each
    /// between the tick before it and the next).
    fn requested(&mut self, _ts_us: u64, _key_hash: u64) {}
    /// An idle key a successor boost made active again, without a request
    /// (only if [`Model::wants_requests`]; after the request that woke it).
    fn woken(&mut self, _ts_us: u64, _key_hash: u64) {}
    /// The tick is over (scores written, samples taken): the online choice
    /// runs its miniature allocators ([`crate::simulated_allocator`]).
    fn ticked(&mut self, _features: &crate::features::FeatureStore) {}
    /// Which member the online choice follows, and how it stands
    /// (`None` for a single model).
    fn choice(&self) -> Option<crate::online::ChoiceStatus> {
        None
    }
    /// Human-readable parameters (for reports).
    fn describe(&self) -> String {
        self.kind().name().to_owned()
    }
}

/// Builds the model a configuration selects.
pub fn build(config: &PredictorConfig) -> Box<dyn Model> {
    match config.model {
        ModelKind::KeepAlive => Box::new(KeepAlive {
            keep_alive_s: config.keep_alive_ms as f32 * 1e-3,
        }),
        ModelKind::Frequency => Box::new(Frequency {
            scale: config.frequency_scale,
        }),
        ModelKind::Successor => Box::new(Successor),
        ModelKind::Logistic => Box::new(Logistic::new(config.learning_rate)),
        ModelKind::HoldValue => Box::new(HoldValue::new(config.learning_rate)),
        ModelKind::Online => Box::new(crate::online::Online::new(config)),
    }
}

/// Prepared for `keep_alive_s` after each use, fading linearly (so that, under a
/// budget, the most recently used keys win).
pub struct KeepAlive {
    pub keep_alive_s: f32,
}

impl Model for KeepAlive {
    fn kind(&self) -> ModelKind {
        ModelKind::KeepAlive
    }
    fn score(&self, view: &FeatureView<'_>, out: &mut [f32]) {
        assert_eq!(out.len(), view.len());
        let inverse = 1.0 / self.keep_alive_s;
        let now = view.now_us;
        for (score, &last) in out.iter_mut().zip(view.last_us) {
            let age_s = now.saturating_sub(last) as f32 * 1e-6;
            *score = (1.0 - age_s * inverse).max(0.0);
        }
        // (Exact ages from the u64 times: this model needs nothing else.)
    }
    fn score_one(&self, view: &FeatureView<'_>, row: usize, _: &[f32; FEATURES]) -> f32 {
        let age_s = view.now_us.saturating_sub(view.last_us[row]) as f32 * 1e-6;
        (1.0 - age_s * (1.0 / self.keep_alive_s)).max(0.0)
    }
    fn describe(&self) -> String {
        format!("keep-alive {} ms", (self.keep_alive_s * 1e3).round())
    }
}

/// Poisson probability of at least one request within the horizon, from the
/// request rate decayed at scale `scale`.
pub struct Frequency {
    pub scale: usize,
}

impl Model for Frequency {
    fn kind(&self) -> ModelKind {
        ModelKind::Frequency
    }
    fn score(&self, view: &FeatureView<'_>, out: &mut [f32]) {
        assert_eq!(out.len(), view.len());
        let to_expected = view.horizon_us as f32 / SCALE_TAU_US[self.scale] as f32;
        for (chunk_index, chunk) in out.chunks_mut(BLOCK).enumerate() {
            view.decayed_counts(chunk_index * BLOCK, self.scale, chunk);
            for score in chunk.iter_mut() {
                *score = poisson_within(*score, to_expected);
            }
        }
    }
    fn score_one(&self, view: &FeatureView<'_>, row: usize, _: &[f32; FEATURES]) -> f32 {
        let to_expected = view.horizon_us as f32 / SCALE_TAU_US[self.scale] as f32;
        poisson_within(view.decayed_count(row, self.scale), to_expected)
    }
    fn describe(&self) -> String {
        format!("frequency tau {} ms", SCALE_TAU_US[self.scale] / 1000)
    }
}

/// P(at least one request within the horizon) for a request count decayed with
/// time constant tau, read as a Poisson rate: `to_expected` is `horizon / tau`.
#[inline(always)]
fn poisson_within(count: f32, to_expected: f32) -> f32 {
    1.0 - fast_exp(-count * to_expected)
}

/// What [`Frequency`] at `scale` gives a key with this feature vector (its
/// rate feature is `saturate(count * RATE_FEATURE_SCALE[scale])`): the
/// baseline the forecaster scores itself against.
pub fn frequency_probability(features: &[f32; FEATURES], scale: usize, horizon_us: u64) -> f32 {
    let rate = features[scale].clamp(0.0, 1.0 - f32::EPSILON);
    let count = rate / (1.0 - rate) / RATE_FEATURE_SCALE[scale];
    poisson_within(count, horizon_us as f32 / SCALE_TAU_US[scale] as f32)
}

/// The successor boost alone: P(this key | a key requested within the horizon).
/// Self-transitions (A then A again by the same client) are successors too.
pub struct Successor;

impl Model for Successor {
    fn kind(&self) -> ModelKind {
        ModelKind::Successor
    }
    fn score(&self, view: &FeatureView<'_>, out: &mut [f32]) {
        for_each_block(
            view,
            out,
            FeatureSet {
                successor: true,
                ..FeatureSet::NONE
            },
            |block, scores| {
                scores.copy_from_slice(&block.features[8][..scores.len()]);
            },
        );
    }
    fn score_one(&self, _: &FeatureView<'_>, _: usize, features: &[f32; FEATURES]) -> f32 {
        features[8]
    }
}

/// Online logistic regression with AdaGrad steps and a small L2 penalty.
pub struct Logistic {
    weights: [f32; FEATURES],
    bias: f32,
    gradient_squares: [f32; FEATURES],
    bias_gradient_squares: f32,
    learning_rate: f32,
    pub samples_learned: u64,
    pub positives_learned: u64,
}

const L2_PENALTY: f32 = 1e-5;
/// Start near "rarely requested" rather than at P = 0.5 for everything.
const INITIAL_BIAS: f32 = -4.0;

impl Logistic {
    pub fn new(learning_rate: f32) -> Logistic {
        Logistic {
            weights: [0.0; FEATURES],
            bias: INITIAL_BIAS,
            gradient_squares: [1e-3; FEATURES],
            bias_gradient_squares: 1e-3,
            learning_rate,
            samples_learned: 0,
            positives_learned: 0,
        }
    }

    pub fn weights(&self) -> (&[f32; FEATURES], f32) {
        (&self.weights, self.bias)
    }

    #[inline(always)]
    fn logit(&self, features: &[f32; FEATURES]) -> f32 {
        self.bias
            + self
                .weights
                .iter()
                .zip(features)
                .map(|(w, x)| w * x)
                .sum::<f32>()
    }
}

impl Model for Logistic {
    fn kind(&self) -> ModelKind {
        ModelKind::Logistic
    }
    fn learns(&self) -> bool {
        true
    }
    fn score(&self, view: &FeatureView<'_>, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: `score_avx2` requires AVX2 and FMA, and the CPU has both
            // (checked just above).
            unsafe { score_avx2(self.weights, self.bias, view, out) };
            return;
        }
        logistic_scores(self.weights, self.bias, view, out);
    }
    fn learn(&mut self, _head: usize, features: &[f32; FEATURES], requested: bool) {
        self.step(features, requested);
    }
    fn score_one(&self, _: &FeatureView<'_>, _: usize, features: &[f32; FEATURES]) -> f32 {
        sigmoid(self.logit(features))
    }
    fn describe(&self) -> String {
        format!("logistic: {}", self.terms())
    }
}

impl Logistic {
    /// One AdaGrad step on one labelled sample.
    fn step(&mut self, features: &[f32; FEATURES], requested: bool) {
        let label = if requested { 1.0 } else { 0.0 };
        let error = sigmoid(self.logit(features)) - label;
        for ((weight, squares), &feature) in self
            .weights
            .iter_mut()
            .zip(&mut self.gradient_squares)
            .zip(features)
        {
            let gradient = error * feature + L2_PENALTY * *weight;
            *squares += gradient * gradient;
            *weight -= self.learning_rate * gradient / squares.sqrt();
        }
        self.bias_gradient_squares += error * error;
        self.bias -= self.learning_rate * error / self.bias_gradient_squares.sqrt();
        self.samples_learned += 1;
        self.positives_learned += u64::from(requested);
    }

    fn terms(&self) -> String {
        let terms: Vec<String> = FEATURE_NAMES
            .iter()
            .zip(self.weights)
            .map(|(name, weight)| format!("{name} {weight:+.2}"))
            .collect();
        format!("bias {:+.2}, {}", self.bias, terms.join(", "))
    }
}

/// The scoring loop of [`Logistic`], inlined into each instruction-set variant.
#[inline(always)]
fn logistic_scores(weights: [f32; FEATURES], bias: f32, view: &FeatureView<'_>, out: &mut [f32]) {
    for_each_block(view, out, FeatureSet::ALL, |block, scores| {
        let len = scores.len();
        scores.fill(bias);
        for (feature, weight) in block.features.iter().zip(weights) {
            for (z, &x) in scores.iter_mut().zip(&feature[..len]) {
                *z += weight * x;
            }
        }
        for score in scores.iter_mut() {
            *score = sigmoid(*score);
        }
    });
}

/// [`logistic_scores`] compiled for AVX2 + FMA: 8 lanes instead of the
/// baseline's 4 (the workspace builds for baseline x86-64).
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn score_avx2(weights: [f32; FEATURES], bias: f32, view: &FeatureView<'_>, out: &mut [f32]) {
    logistic_scores(weights, bias, view, out);
}

/// The learned hold value: how many hits per slot-second a slot given to the
/// key now can expect, at the best of several hold times.
///
/// # Why several hold times
///
/// One probability at one horizon serves the allocator's three decisions
/// (prepare, keep, evict) badly when a key's requests come back after a gap
/// longer than the horizon: a key used every 3 s is worth keeping if slots
/// are plentiful for that long, yet its P(within 500 ms) is low. So this
/// model estimates `P_k` = P(requested within `H_k`) for the hold times
/// `H_k` = [`HOLD_HORIZONS`] x horizon (500 ms, 2 s and 5 s at the default
/// horizon), and scores
///
/// ```text
/// score = max_k P_k * horizon / H_k
/// ```
///
/// `P_k / H_k` is a lower bound on the hits per slot-second of holding the
/// key's slot for up to `H_k` (the slot earns `P_k` hits, on average, and
/// costs at most `H_k`), and the factor `horizon` puts it on the scale of a
/// probability within the horizon: the allocator's threshold then reads as a
/// price, "prepare or keep a key while its best hold earns at least
/// `threshold / horizon` hits per slot-second". The `H = horizon` term is a
/// plain P(requested within the horizon).
///
/// # Why experts beside the regression
///
/// Each `P_k` is the highest of three estimates, each learnt from the same
/// labelled samples:
///
/// - a logistic regression over all [`FEATURES`], as [`Logistic`];
/// - for each of [`HISTOGRAMS`] (the successor boost; the 60 s rate by the
///   time since the last request), the share of samples requested within
///   `H_k` among those whose values fell in the same bin: calibrated by
///   construction, and no other feature dilutes it.
///
/// A regression fitted by log-loss over uniformly sampled keys averages a
/// rare, sharp signal away: on the build trace it gave the successor boost a
/// negative weight, on the block trace +1, where keys with a strong boost are
/// requested within the horizon tens of times more often than the rest
/// (docs/forecasting.md). The histogram keeps what the feature alone says,
/// and the maximum lets whichever estimate is confident about a key rank it.
/// A bin with no opinion says 0: the lowest level of the first feature (no
/// boost, no recent rate), and any bin until samples land in it
/// (`positives / (samples + 4)`, shrunk toward 0).
///
/// The score is not a calibrated P(requested within the horizon): Brier
/// scores and AUC-PR against the 500 ms label judge it as if it were.
pub struct HoldValue {
    heads: [Logistic; HOLD_HORIZONS.len()],
    /// Per hold time, per histogram, per bin: (requested, samples).
    histograms: [[[(f32, f32); CALIBRATION_BINS]; HISTOGRAMS.len()]; HOLD_HORIZONS.len()],
}

/// The hold times of [`HoldValue`], as multiples of the horizon.
pub const HOLD_HORIZONS: [f32; 3] = [1.0, 4.0, 10.0];
/// The head whose hold time is the horizon itself.
const BASE_HEAD: usize = 0;
const _: () = assert!(HOLD_HORIZONS[BASE_HEAD] == 1.0);

/// A calibrated histogram of [`HoldValue`]: 16 bins over one feature, or
/// 4 x 4 over two (the first feature's quarter, then the second's).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Histogram {
    /// Index into [`FEATURE_NAMES`].
    pub feature: usize,
    pub by: Option<usize>,
}

/// The histograms of [`HoldValue`]: the successor boost (which fades by
/// itself once its prediction is past), and the 60 s rate by the time since
/// the last request on the 5 s scale (a key used a thousand times in the
/// last minute and then not at all for ten seconds has stopped, and the rate
/// alone would not say so for a minute).
pub const HISTOGRAMS: [Histogram; 2] = [
    // successor
    Histogram {
        feature: 8,
        by: None,
    },
    // rate_60s by recency_5s (a test checks the names)
    Histogram {
        feature: 3,
        by: Some(6),
    },
];
const CALIBRATION_BINS: usize = 16;
/// Pseudo-samples labelled "not requested" in each bin: a bin speaks once it
/// has evidence.
const CALIBRATION_PRIOR: f32 = 4.0;
/// A bin's counts are halved when its samples reach this, so that it follows
/// a drifting workload and stays exact in f32.
const CALIBRATION_SAMPLES_MAX: f32 = (1 << 20) as f32;

/// Which of `levels` equal parts of [0, 1) `value` falls in (NaN and
/// negatives in the first, 1 and more in the last).
#[inline(always)]
fn quantize(value: f32, levels: usize) -> usize {
    // `as` saturates (NaN and negatives go to 0).
    ((value * levels as f32) as usize).min(levels - 1)
}

impl Histogram {
    /// The bin of a row whose features are `x` (`feature`) and `y` (`by`;
    /// ignored without one).
    #[inline(always)]
    fn bin(self, x: f32, y: f32) -> usize {
        match self.by {
            None => quantize(x, CALIBRATION_BINS),
            Some(_) => quantize(x, 4) * 4 + quantize(y, 4),
        }
    }

    fn bin_of(self, features: &[f32; FEATURES]) -> usize {
        self.bin(
            features[self.feature],
            features[self.by.unwrap_or(self.feature)],
        )
    }

    /// Bins below this have no opinion: the first feature at its lowest level
    /// (no boost, no recent rate).
    fn first_opinion_bin(self) -> usize {
        if self.by.is_none() { 1 } else { 4 }
    }

    fn describe(self) -> String {
        match self.by {
            None => format!("{} by sixteenths", FEATURE_NAMES[self.feature]),
            Some(by) => format!(
                "{} by quarters x {} by quarters",
                FEATURE_NAMES[self.feature], FEATURE_NAMES[by]
            ),
        }
    }
}

impl HoldValue {
    pub fn new(learning_rate: f32) -> HoldValue {
        HoldValue {
            heads: std::array::from_fn(|_| Logistic::new(learning_rate)),
            histograms: [[[(0.0, 0.0); CALIBRATION_BINS]; HISTOGRAMS.len()]; HOLD_HORIZONS.len()],
        }
    }

    /// P(requested within `H_head`) in one bin of histogram `h`.
    fn calibrated_bin(&self, head: usize, h: usize, bin: usize) -> f32 {
        let (requested, samples) = self.histograms[head][h][bin];
        if bin < HISTOGRAMS[h].first_opinion_bin() {
            0.0
        } else {
            requested / (samples + CALIBRATION_PRIOR)
        }
    }

    /// P(requested within `H_k`) by bin, per hold time and histogram.
    fn calibrated(&self) -> [[[f32; CALIBRATION_BINS]; HISTOGRAMS.len()]; HOLD_HORIZONS.len()] {
        std::array::from_fn(|head| {
            std::array::from_fn(|h| std::array::from_fn(|bin| self.calibrated_bin(head, h, bin)))
        })
    }

    /// What the scoring loop needs. The maximum distributes over the heads,
    /// `max_k c_k max(a_k, b_k) = max(max_k c_k a_k, max_k c_k b_k)` for
    /// `c_k > 0`, so each histogram needs one table, the best over the
    /// heads, and one lookup per row.
    fn scoring(&self) -> Scoring {
        let calibrated = self.calibrated();
        Scoring {
            heads: std::array::from_fn(|k| ScoringHead {
                weights: self.heads[k].weights,
                bias: self.heads[k].bias,
                per_horizon: 1.0 / HOLD_HORIZONS[k],
            }),
            tables: std::array::from_fn(|f| {
                std::array::from_fn(|bin| {
                    (0..HOLD_HORIZONS.len())
                        .map(|k| calibrated[k][f][bin] / HOLD_HORIZONS[k])
                        .fold(0.0, f32::max)
                })
            }),
        }
    }
}

/// [`HoldValue`] as the scoring loop needs it.
struct Scoring {
    heads: [ScoringHead; HOLD_HORIZONS.len()],
    /// Per histogram, by bin: `max_k P_k(bin) * horizon / H_k`.
    tables: [[f32; CALIBRATION_BINS]; HISTOGRAMS.len()],
}

/// One hold time of [`HoldValue`] as the scoring loop needs it.
#[derive(Clone, Copy)]
struct ScoringHead {
    weights: [f32; FEATURES],
    bias: f32,
    /// `horizon / H_k`.
    per_horizon: f32,
}

impl Model for HoldValue {
    fn kind(&self) -> ModelKind {
        ModelKind::HoldValue
    }
    fn learns(&self) -> bool {
        true
    }
    fn label_horizons(&self) -> &[f32] {
        &HOLD_HORIZONS
    }
    fn score(&self, view: &FeatureView<'_>, out: &mut [f32]) {
        let scoring = self.scoring();
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            if std::is_x86_feature_detected!("avx512f") {
                // SAFETY: `hold_value_avx512` requires AVX-512F, AVX2 and
                // FMA, and the CPU has all three (checked just above).
                unsafe { hold_value_avx512(&scoring, view, out) };
            } else {
                // SAFETY: `hold_value_avx2` requires AVX2 and FMA, and the
                // CPU has both (checked just above).
                unsafe { hold_value_avx2(&scoring, view, out) };
            }
            return;
        }
        hold_value_scores::<false>(&scoring, view, out);
    }
    fn horizon_probability(&self, features: &[f32; FEATURES]) -> Option<f32> {
        // The head at the horizon itself, as the scoring loop computes it.
        let regression = sigmoid(self.heads[BASE_HEAD].logit(features));
        Some(
            HISTOGRAMS
                .iter()
                .enumerate()
                .map(|(h, histogram)| self.calibrated_bin(BASE_HEAD, h, histogram.bin_of(features)))
                .fold(regression, f32::max),
        )
    }
    fn score_one(&self, _: &FeatureView<'_>, _: usize, features: &[f32; FEATURES]) -> f32 {
        let regressions = self
            .heads
            .iter()
            .zip(HOLD_HORIZONS)
            .map(|(head, factor)| sigmoid(head.logit(features)) / factor)
            .fold(0.0, f32::max);
        // The histograms' best over the heads, as `scoring` builds its tables.
        HISTOGRAMS
            .iter()
            .enumerate()
            .flat_map(|(h, histogram)| {
                let bin = histogram.bin_of(features);
                (0..HOLD_HORIZONS.len())
                    .map(move |k| self.calibrated_bin(k, h, bin) / HOLD_HORIZONS[k])
            })
            .fold(regressions, f32::max)
    }
    fn learn(&mut self, head: usize, features: &[f32; FEATURES], requested: bool) {
        self.heads[head].step(features, requested);
        for (bins, histogram) in self.histograms[head].iter_mut().zip(&HISTOGRAMS) {
            let (positives, samples) = &mut bins[histogram.bin_of(features)];
            *positives += f32::from(u8::from(requested));
            *samples += 1.0;
            if *samples >= CALIBRATION_SAMPLES_MAX {
                *positives *= 0.5;
                *samples *= 0.5;
            }
        }
    }
    fn describe(&self) -> String {
        let heads: Vec<String> = self
            .calibrated()
            .iter()
            .zip(&self.heads)
            .zip(HOLD_HORIZONS)
            .map(|((calibrated, head), factor)| {
                let histograms: Vec<String> = HISTOGRAMS
                    .iter()
                    .zip(calibrated)
                    .map(|(histogram, bins)| {
                        let bins: Vec<String> = bins.iter().map(|p| format!("{p:.2}")).collect();
                        format!("{} {}", histogram.describe(), bins.join(" "))
                    })
                    .collect();
                format!(
                    "[{factor} x horizon: {}; {}]",
                    head.terms(),
                    histograms.join("; ")
                )
            })
            .collect();
        format!("hold-value: {}", heads.join(" "))
    }
}

/// The scoring loop of [`HoldValue`], inlined into each instruction-set variant.
#[inline(always)]
fn hold_value_scores<const AVX2: bool>(scoring: &Scoring, view: &FeatureView<'_>, out: &mut [f32]) {
    // Not `for_each_block`: a closure this large is not inlined, and a closure
    // that is not inlined is compiled for the baseline instruction set, not
    // for the AVX2 variant that calls it (measured: twice as slow).
    assert_eq!(out.len(), view.len());
    let mut block = FeatureBlock::new();
    // The gap features are read where they are stored (`FeatureView::gaps`).
    let set = FeatureSet {
        gaps: false,
        ..FeatureSet::ALL
    };
    for (chunk_index, scores) in out.chunks_mut(BLOCK).enumerate() {
        let start = chunk_index * BLOCK;
        view.block_of(start, &mut block, set);
        let gaps = view.gaps(start, scores.len());
        hold_value_block::<AVX2>(scoring, &block, gaps, scores);
    }
}

/// The first of the two gap features, which [`hold_value_block`] reads
/// from the feature store rather than from the block.
const GAP_RATE: usize = 9;
const _: () = assert!(
    GAP_RATE + 2 == FEATURES,
    "the gap features are the last two"
);

/// One block of [`hold_value_scores`].
#[inline(always)]
fn hold_value_block<const AVX2: bool>(
    scoring: &Scoring,
    block: &FeatureBlock,
    [gap_rate, gap_confidence]: [&[f32]; 2],
    scores: &mut [f32],
) {
    // Row by row, each head's logit in registers: the loops over heads and
    // features have constant trip counts and unroll, and the loop over rows
    // vectorises (one pass over the block, no logits written back). Rows
    // by index below a bound the compiler can see: with `enumerate` over
    // `scores`, `feature[row]` kept its bounds check, and the vectorised
    // loop left the last eight rows of every block to a scalar loop (3 %
    // of the rows, about a fifth of the heads' time in a profile).
    let len = scores.len().min(BLOCK);
    let (gap_rate, gap_confidence) = (&gap_rate[..len], &gap_confidence[..len]);
    // One instruction with FMA; a library call without it.
    let multiply_add = |z: f32, weight: f32, x: f32| {
        if AVX2 {
            weight.mul_add(x, z)
        } else {
            z + weight * x
        }
    };
    for row in 0..len {
        let score = &mut scores[row];
        let mut best = 0.0f32;
        for head in &scoring.heads {
            // In feature order: the order of the sums is part of the scores.
            let mut z = head.bias;
            for (feature, &weight) in block.features[..GAP_RATE].iter().zip(&head.weights) {
                z = multiply_add(z, weight, feature[row]);
            }
            z = multiply_add(z, head.weights[GAP_RATE], gap_rate[row]);
            z = multiply_add(z, head.weights[GAP_RATE + 1], gap_confidence[row]);
            best = best.max(sigmoid(z) * head.per_horizon);
        }
        *score = best;
    }
    for (&histogram, table) in HISTOGRAMS.iter().zip(&scoring.tables) {
        let xs = &block.features[histogram.feature][..len];
        let ys = &block.features[histogram.by.unwrap_or(histogram.feature)][..len];
        #[cfg(target_arch = "x86_64")]
        if AVX2 {
            // SAFETY: `AVX2` is true only in `hold_value_avx2`, which runs
            // only on a CPU with AVX2 (its caller checks).
            unsafe { calibrated_max_avx2(histogram, scores, xs, ys, table) };
            continue;
        }
        calibrated_max(histogram, scores, xs, ys, table);
    }
}

/// `score = max(score, table[histogram.bin(x, y)])` for each row.
#[inline(always)]
fn calibrated_max(
    histogram: Histogram,
    scores: &mut [f32],
    xs: &[f32],
    ys: &[f32],
    table: &[f32; CALIBRATION_BINS],
) {
    for ((score, &x), &y) in scores.iter_mut().zip(xs).zip(ys) {
        *score = score.max(table[histogram.bin(x, y)]);
    }
}

/// [`calibrated_max`] eight rows at a time: the table's 16 entries are two
/// registers, and a lookup is two in-register permutes and a blend (the
/// scalar loop's lookups cost as much as two more heads; a gather is slower
/// than the permutes on the CPUs we run on). Gives exactly the scalar
/// results, for every input (a test compares them).
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn calibrated_max_avx2(
    histogram: Histogram,
    scores: &mut [f32],
    xs: &[f32],
    ys: &[f32],
    table: &[f32; CALIBRATION_BINS],
) {
    use std::arch::x86_64::{
        __m256, __m256i, _mm256_add_epi32, _mm256_blendv_ps, _mm256_castsi256_ps,
        _mm256_cmpgt_epi32, _mm256_cvttps_epi32, _mm256_loadu_ps, _mm256_max_ps, _mm256_min_ps,
        _mm256_mul_ps, _mm256_permutevar8x32_ps, _mm256_set1_epi32, _mm256_set1_ps,
        _mm256_setzero_ps, _mm256_slli_epi32, _mm256_storeu_ps,
    };
    const _: () = assert!(CALIBRATION_BINS == 16, "two registers of eight entries");
    let load = |eight: &[f32]| -> __m256 {
        assert_eq!(eight.len(), 8);
        // SAFETY: `eight` is 8 readable f32s (checked just above); loadu
        // has no alignment requirement.
        unsafe { _mm256_loadu_ps(eight.as_ptr()) }
    };
    // As `quantize`: clamp to [0, levels - 1] first (maxps returns its
    // second operand, 0, for a NaN), then truncate.
    let quantize = |values: __m256, levels: f32| -> __m256i {
        let scaled = _mm256_mul_ps(values, _mm256_set1_ps(levels));
        let clamped = _mm256_min_ps(
            _mm256_max_ps(scaled, _mm256_setzero_ps()),
            _mm256_set1_ps(levels - 1.0),
        );
        _mm256_cvttps_epi32(clamped)
    };
    let (low, high) = (load(&table[..8]), load(&table[8..]));
    let seven = _mm256_set1_epi32(7);
    let rows = scores.len().min(xs.len()).min(ys.len());
    let (scores, tail_scores) = scores[..rows].split_at_mut(rows / 8 * 8);
    let (xs, tail_xs) = xs[..rows].split_at(rows / 8 * 8);
    let (ys, tail_ys) = ys[..rows].split_at(rows / 8 * 8);
    for ((score_chunk, x_chunk), y_chunk) in scores
        .chunks_exact_mut(8)
        .zip(xs.chunks_exact(8))
        .zip(ys.chunks_exact(8))
    {
        let bin = match histogram.by {
            None => quantize(load(x_chunk), CALIBRATION_BINS as f32),
            Some(_) => _mm256_add_epi32(
                _mm256_slli_epi32::<2>(quantize(load(x_chunk), 4.0)),
                quantize(load(y_chunk), 4.0),
            ),
        };
        // permutevar8x32 reads the low 3 bits of each index.
        let from_low = _mm256_permutevar8x32_ps(low, bin);
        let from_high = _mm256_permutevar8x32_ps(high, bin);
        let in_high = _mm256_castsi256_ps(_mm256_cmpgt_epi32(bin, seven));
        let looked_up = _mm256_blendv_ps(from_low, from_high, in_high);
        let best = _mm256_max_ps(load(score_chunk), looked_up);
        // SAFETY: `score_chunk` is 8 writable f32s (`chunks_exact_mut(8)`).
        unsafe { _mm256_storeu_ps(score_chunk.as_mut_ptr(), best) };
    }
    calibrated_max(histogram, tail_scores, tail_xs, tail_ys, table);
}

/// [`hold_value_scores`] compiled for AVX2 + FMA.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn hold_value_avx2(scoring: &Scoring, view: &FeatureView<'_>, out: &mut [f32]) {
    hold_value_scores::<true>(scoring, view, out);
}

/// [`hold_value_scores`] compiled for AVX-512: the same loop, the same
/// operations lane by lane (so the same scores, bit for bit, as
/// [`hold_value_avx2`]; `recorded_scores` checks it on a CPU with
/// AVX-512), 16 rows per instruction instead of 8.
///
/// # Safety
/// The CPU must support AVX-512F, AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn hold_value_avx512(scoring: &Scoring, view: &FeatureView<'_>, out: &mut [f32]) {
    hold_value_scores::<true>(scoring, view, out);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logistic_regression_learns_a_separable_rule() {
        let mut model = Logistic::new(0.1);
        let mut features = [0.0f32; FEATURES];
        for i in 0..20_000 {
            let on = i % 3 == 0;
            features[8] = if on { 0.9 } else { 0.05 };
            features[3] = (i % 7) as f32 / 7.0; // noise
            model.learn(0, &features, on);
        }
        features[8] = 0.9;
        let high = sigmoid(model.logit(&features));
        features[8] = 0.05;
        let low = sigmoid(model.logit(&features));
        assert!(high > 0.8 && low < 0.2, "high {high} low {low}");
        assert!(model.describe().contains("successor"));
    }

    #[test]
    fn hold_value_histograms_estimate_each_bin_and_say_nothing_below_the_first() {
        assert_eq!(FEATURE_NAMES[HISTOGRAMS[0].feature], "successor");
        assert_eq!(FEATURE_NAMES[HISTOGRAMS[1].feature], "rate_60s");
        assert_eq!(
            HISTOGRAMS[1].by.map(|by| FEATURE_NAMES[by]),
            Some("recency_5s")
        );
        let mut model = HoldValue::new(0.3);
        let mut features = [0.0f32; FEATURES];
        for i in 0..(3 << 20) {
            // Strong boost: requested half the time; no boost: 1 in 8.
            features[8] = if i % 2 == 0 { 0.97 } else { 0.01 };
            let requested = if i % 2 == 0 { i % 4 == 0 } else { i % 16 == 1 };
            model.learn(1, &features, requested);
        }
        let calibrated = model.calibrated();
        let successor = &calibrated[1][0];
        assert!((successor[15] - 0.5).abs() < 0.01, "{successor:?}");
        assert_eq!(successor[0], 0.0, "the lowest bin has no opinion");
        assert_eq!(successor[7], 0.0, "a bin without samples has none either");
        assert!(
            calibrated[0][0].iter().all(|&p| p == 0.0),
            "other heads untouched"
        );
        // Scored through the table of the best head: the second, at 1/4.
        let table = model.scoring().tables[0];
        assert_eq!(table[15], successor[15] / HOLD_HORIZONS[1]);
        // Counts were halved on the way (3M samples per bin would not fit the
        // cap): the estimate is a ratio and survives.
        assert!(model.histograms[1][0][15].1 < CALIBRATION_SAMPLES_MAX);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_avx2_lookup_gives_exactly_the_scalar_results() {
        if !std::is_x86_feature_detected!("avx2") {
            return;
        }
        let table: [f32; CALIBRATION_BINS] =
            std::array::from_fn(|bin| (bin * 7 % 16) as f32 / 16.0);
        let mut values = vec![
            f32::NAN,
            -1.0,
            -0.0,
            0.0,
            1.0,
            16.0,
            1e30,
            f32::INFINITY,
            f32::NEG_INFINITY,
            0.999_999,
        ];
        values.extend((0..=64).map(|i| i as f32 / 64.0)); // every bin edge
        values.extend((0..1000).map(|i| ((i * 7919) % 1000) as f32 / 997.0));
        // The second feature: the same values in another order.
        let others: Vec<f32> = values.iter().rev().copied().collect();
        for histogram in HISTOGRAMS {
            for start in 0..8 {
                // Every remainder length, and scores both below and above the table.
                let (xs, ys) = (&values[start..], &others[start..]);
                let scores: Vec<f32> = (0..xs.len()).map(|i| (i % 5) as f32 / 4.0).collect();
                let mut scalar = scores.clone();
                let mut avx2 = scores.clone();
                calibrated_max(histogram, &mut scalar, xs, ys, &table);
                // SAFETY: the CPU has AVX2 (checked at the top).
                unsafe { calibrated_max_avx2(histogram, &mut avx2, xs, ys, &table) };
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&scalar), bits(&avx2), "{histogram:?} from {start}");
            }
        }
    }

    #[test]
    fn logistic_regression_is_calibrated_on_coin_flips() {
        let mut model = Logistic::new(0.05);
        let features = [0.5f32; FEATURES];
        for i in 0..50_000 {
            model.learn(0, &features, i % 4 == 0);
        }
        let p = sigmoid(model.logit(&features));
        assert!((p - 0.25).abs() < 0.05, "{p}");
    }
}
