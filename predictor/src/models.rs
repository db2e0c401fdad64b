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
//! | [`Logistic`] | online logistic regression over all [`FEATURES`](crate::features::FEATURES) |
//! | [`HoldValue`] | one such regression per hold time (200 ms ... 5 s); the best hits per slot-second, on the scale of a probability within the horizon |
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

/// A model of the ladder.
pub trait Model: Send {
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
/// One probability at one horizon serves the allocator's three decisions
/// (prepare, keep, evict) badly when a key's requests come back after a gap
/// longer than the horizon: a key used every 3 s is worth keeping if slots
/// are plentiful for that long, yet its P(within 500 ms) is low. So this
/// model learns `P_k` = P(requested within `HOLD_HORIZONS[k]` x horizon), one
/// logistic regression per hold time `H_k` over the same features, and
/// scores
///
/// ```text
/// score = max_k min(1, P_k * horizon / H_k)
/// ```
///
/// `P_k / H_k` is a lower bound on the hits per slot-second of holding the
/// key's slot for up to `H_k` (the slot serves `P_k` requests' worth of hits
/// and costs at most `H_k`), and multiplying by the horizon puts it on the
/// scale of a probability within the horizon, so that the allocator's
/// threshold reads as a price: prepare or keep a key while its best hold
/// earns at least `threshold / horizon` hits per slot-second. At `H = horizon`
/// the term is the plain logistic model's P; a key whose requests come
/// sharply within 200 ms scores higher through the short head, and a key that
/// reliably returns within seconds scores through the long ones.
///
/// The score is not a calibrated P(requested within the horizon): Brier
/// scores and AUC-PR against the 500 ms label judge it as if it were.
pub struct HoldValue {
    heads: [Logistic; HOLD_HORIZONS.len()],
}

/// The hold times of [`HoldValue`], as multiples of the horizon (200 ms, 500
/// ms, 2 s and 5 s at the default 500 ms).
pub const HOLD_HORIZONS: [f32; 4] = [0.4, 1.0, 4.0, 10.0];

impl HoldValue {
    pub fn new(learning_rate: f32) -> HoldValue {
        HoldValue {
            heads: std::array::from_fn(|_| Logistic::new(learning_rate)),
        }
    }

    fn weights(&self) -> [HeadWeights; HOLD_HORIZONS.len()] {
        std::array::from_fn(|k| HeadWeights {
            weights: self.heads[k].weights,
            bias: self.heads[k].bias,
            per_horizon: 1.0 / HOLD_HORIZONS[k],
        })
    }
}

/// One head of [`HoldValue`] as the scoring loop needs it.
#[derive(Clone, Copy)]
struct HeadWeights {
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
        let heads = self.weights();
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: `hold_value_avx2` requires AVX2 and FMA, and the CPU has
            // both (checked just above).
            unsafe { hold_value_avx2(&heads, view, out) };
            return;
        }
        hold_value_scores(&heads, view, out);
    }
    fn learn(&mut self, head: usize, features: &[f32; FEATURES], requested: bool) {
        self.heads[head].step(features, requested);
    }
    fn describe(&self) -> String {
        let heads: Vec<String> = self
            .heads
            .iter()
            .zip(HOLD_HORIZONS)
            .map(|(head, factor)| format!("[x{factor} horizon: {}]", head.terms()))
            .collect();
        format!("hold-value: {}", heads.join(" "))
    }
}

/// The scoring loop of [`HoldValue`], inlined into each instruction-set variant.
#[inline(always)]
fn hold_value_scores(heads: &[HeadWeights], view: &FeatureView<'_>, out: &mut [f32]) {
    let mut logits = [0.0f32; BLOCK];
    for_each_block(view, out, FeatureSet::ALL, |block, scores| {
        let len = scores.len();
        scores.fill(0.0);
        for head in heads {
            let logits = &mut logits[..len];
            logits.fill(head.bias);
            for (feature, weight) in block.features.iter().zip(head.weights) {
                for (z, &x) in logits.iter_mut().zip(&feature[..len]) {
                    *z += weight * x;
                }
            }
            for (score, &z) in scores.iter_mut().zip(logits.iter()) {
                *score = score.max((sigmoid(z) * head.per_horizon).min(1.0));
            }
        }
    });
}

/// [`hold_value_scores`] compiled for AVX2 + FMA.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn hold_value_avx2(heads: &[HeadWeights], view: &FeatureView<'_>, out: &mut [f32]) {
    hold_value_scores(heads, view, out);
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
