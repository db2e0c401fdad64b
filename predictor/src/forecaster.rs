//! The forecaster: features + one model + online training, ticked in time order.
//!
//! Call [`Forecaster::ingest`] for each request in time order and
//! [`Forecaster::tick`] every tick; after a tick, [`Forecaster::scores`] gives
//! P(requested within the horizon) for every active key.
//!
//! # Training without look-ahead
//!
//! At each tick the forecaster samples `train_samples_per_tick` active keys
//! uniformly and remembers their feature vectors. A sample taken at tick `t` is
//! labelled when its window `(t, t + horizon]` has closed, that is when an event
//! later than `t + horizon` arrives or a tick at or after `t + horizon` runs: the
//! label is "the key's last request is after `t`", and at that moment every event
//! up to `t + horizon`, and none after, has been ingested. So the model at time
//! `T` has learnt only from windows that closed by `T`.
//!
//! # Scoring itself
//!
//! The same samples score the forecaster as it runs ([`SelfScore`]): each
//! keeps the probability the model wrote for its key at its tick, before its
//! label existed, and the probability the decayed-frequency baseline (5 s
//! scale) gives the same features; when the label comes, both Brier scores
//! are updated. Every model samples for this, learning or not. The
//! hold-value model's score is a price, not a probability: it is judged by
//! its own estimate of P(requested within the horizon), the one of its
//! head at the horizon.

use std::collections::VecDeque;

use shm_layout::scores::rank_order;

use crate::config::PredictorConfig;
use crate::features::{BLOCK, FEATURES, FeatureStore, FeatureView};
use crate::models::{self, Model};

/// Samples waiting at most for one label horizon, whatever the
/// configuration: 72 bytes each, so 18 MiB per horizon. The defaults need
/// 3,328 at 500 ms and 32,000 at 5 s (64 samples per 10 ms tick).
pub const PENDING_PER_HORIZON_MAX: usize = 1 << 18;

/// Samples waiting for the windows of one label horizon to close.
struct Stage {
    horizon_us: u64,
    queue: VecDeque<Sample>,
}

struct Sample {
    key_hash: u64,
    at_us: u64,
    features: [f32; FEATURES],
    /// The model's P(requested within the horizon) for the key at `at_us`:
    /// the score it wrote, or for a model whose score is not that
    /// probability, [`Model::horizon_probability`].
    probability: f32,
    /// What the model tagged the sample with ([`Model::sampled`]).
    tag: u64,
}

/// Samples the recent means of [`SelfScore`] weigh, about.
pub const SELF_SCORE_WINDOW: f32 = 4096.0;
/// The decay scale of the frequency baseline in [`SelfScore`] (5 s).
const BASELINE_SCALE: usize = 2;

/// How well the forecaster's probabilities have done on its own samples,
/// against the decayed-frequency baseline on the same samples. Brier scores
/// (mean squared error of the probability against the 0/1 label, lower is
/// better) are means over about the last [`SELF_SCORE_WINDOW`] samples.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SelfScore {
    /// Samples labelled since the start.
    pub samples: u64,
    pub brier: f32,
    /// The frequency model's (5 s scale) Brier score on the same samples.
    pub brier_baseline: f32,
    /// Share of the samples whose key was requested within the horizon.
    pub positive_share: f32,
}

impl SelfScore {
    fn add(&mut self, probability: f32, baseline: f32, requested: bool) {
        let label = if requested { 1.0 } else { 0.0 };
        self.samples += 1;
        // The mean of all samples so far, then an exponential one.
        let weight = (1.0 / self.samples as f32).max(1.0 / SELF_SCORE_WINDOW);
        let update = |mean: &mut f32, value: f32| *mean += weight * (value - *mean);
        update(&mut self.brier, (probability - label).powi(2));
        update(&mut self.brier_baseline, (baseline - label).powi(2));
        update(&mut self.positive_share, label);
    }
}

/// Below this many rows a tick scores on one thread (a thread's start costs
/// tens of microseconds).
const ROWS_PER_THREAD_MIN: usize = 1 << 16;
/// Rows scored, then clamped, at a time: their scores (256 KB) are still in
/// the core's cache when the clamp reads them, instead of a second pass
/// over every row's score from memory.
const ROWS_PER_CLAMP: usize = 1 << 16;
const _: () = assert!(ROWS_PER_CLAMP.is_multiple_of(BLOCK));

/// Scores `view` into `out` as probabilities (NaN and negatives 0, at most
/// 1), its rows split between up to `threads` threads at block boundaries.
/// Every row's score is computed by the same code from the same inputs
/// whatever the split, so the result does not depend on `threads` (a test
/// compares them bit for bit).
fn score_on_threads(model: &dyn Model, view: &FeatureView<'_>, out: &mut [f32], threads: usize) {
    let rows = view.len();
    let threads = threads.clamp(1, rows / ROWS_PER_THREAD_MIN + 1);
    if threads == 1 {
        score_and_clamp(model, view, out);
        return;
    }
    let per_thread = rows.div_ceil(threads).next_multiple_of(BLOCK);
    std::thread::scope(|scope| {
        let mut parts = out.chunks_mut(per_thread).enumerate();
        let first = parts.next();
        for (index, part) in parts {
            let start = index * per_thread;
            let sub = view.rows(start, start + part.len());
            scope.spawn(move || score_and_clamp(model, &sub, part));
        }
        if let Some((_, part)) = first {
            score_and_clamp(model, &view.rows(0, part.len()), part);
        }
    });
}

/// [`Model::score`], then each score made a probability, [`ROWS_PER_CLAMP`]
/// rows at a time (split at block boundaries, so the same scores).
fn score_and_clamp(model: &dyn Model, view: &FeatureView<'_>, out: &mut [f32]) {
    for (index, part) in out.chunks_mut(ROWS_PER_CLAMP).enumerate() {
        let start = index * ROWS_PER_CLAMP;
        model.score(&view.rows(start, start + part.len()), part);
        for probability in part {
            // NaN fails both comparisons and becomes 0.
            *probability = if *probability >= 0.0 {
                probability.min(1.0)
            } else {
                0.0
            };
        }
    }
}

/// See the module docs.
pub struct Forecaster {
    config: PredictorConfig,
    features: FeatureStore,
    model: Box<dyn Model>,
    probabilities: Vec<f32>,
    /// False between an ingest and the next tick: rows may have moved.
    scores_current: bool,
    /// Samples waiting for their labels, one queue per label horizon of the
    /// model (ascending); a sample labelled at one goes on to the next.
    stages: Vec<Stage>,
    /// The stage whose horizon is the forecaster's: the self-score's.
    base_stage: usize,
    /// At most this many samples wait in the first stage (later stages hold
    /// at most [`PENDING_PER_HORIZON_MAX`]).
    pending_max: usize,
    /// Samples labelled at the horizon itself (given to the model, and to the
    /// self-score); a model that learns at several horizons gets each sample
    /// once per horizon.
    pub samples_labelled: u64,
    /// Labels dropped because their key was evicted before they were known,
    /// or because [`PENDING_PER_HORIZON_MAX`] samples were already waiting
    /// for a longer horizon (counted once per horizon).
    pub samples_dropped: u64,
    /// See [`SelfScore`].
    pub self_score: SelfScore,
    /// This tick's sampled rows, their features and tags (reused).
    sampled_rows: Vec<usize>,
    sampled_features: Vec<[f32; FEATURES]>,
    sampled_tags: Vec<u64>,
}

impl Forecaster {
    /// A forecaster with the model the configuration selects.
    pub fn new(config: PredictorConfig) -> Forecaster {
        let model = models::build(&config);
        Forecaster::with_model(config, model)
    }

    /// A forecaster with a given model (tests, experiments).
    pub fn with_model(config: PredictorConfig, model: Box<dyn Model>) -> Forecaster {
        let mut features = FeatureStore::new(
            config.max_tracked_keys,
            config.horizon_us(),
            config.activity_window_ms * 1000,
            config.seed,
        );
        let stages: Vec<Stage> = model
            .label_horizons()
            .iter()
            .map(|factor| Stage {
                horizon_us: (config.horizon_us() as f64 * f64::from(*factor)).round() as u64,
                queue: VecDeque::new(),
            })
            .collect();
        let base_stage = model
            .label_horizons()
            .iter()
            .position(|&factor| factor == 1.0)
            .expect("a model's label horizons include the horizon itself");
        assert!(
            stages.windows(2).all(|w| w[0].horizon_us < w[1].horizon_us),
            "label horizons ascend"
        );
        if model.wants_requests() {
            features.watch_woken();
        }
        let ticks_per_horizon = stages[0].horizon_us / config.tick_us() + 2;
        let pending_max = (ticks_per_horizon as usize * config.train_samples_per_tick)
            .clamp(1, PENDING_PER_HORIZON_MAX);
        Forecaster {
            config,
            features,
            model,
            probabilities: Vec::new(),
            scores_current: false,
            stages,
            base_stage,
            pending_max,
            samples_labelled: 0,
            samples_dropped: 0,
            self_score: SelfScore::default(),
            sampled_rows: Vec::new(),
            sampled_features: Vec::new(),
            sampled_tags: Vec::new(),
        }
    }

    pub fn config(&self) -> &PredictorConfig {
        &self.config
    }
    pub fn features(&self) -> &FeatureStore {
        &self.features
    }
    pub fn model(&self) -> &dyn Model {
        self.model.as_ref()
    }

    /// Records one request (in time order).
    pub fn ingest(&mut self, ts_us: u64, client: u32, key_hash: u64) {
        // Windows (at, at + horizon] with at + horizon < ts_us are complete.
        self.label_closed(ts_us.saturating_sub(1));
        self.report_requests(&[(ts_us, client, key_hash)]);
        self.features.ingest(ts_us, client, key_hash);
        self.report_woken();
        self.scores_current = false;
    }

    /// Records requests `(ts_us, client, key_hash)` (in time order): the same as
    /// [`Forecaster::ingest`] on each in turn, labelling included, but faster
    /// (the features' memory accesses are prefetched a few events ahead).
    pub fn ingest_batch(&mut self, events: &[(u64, u32, u64)]) {
        if let Some(&(first_us, _, _)) = events.first() {
            self.label_closed(first_us.saturating_sub(1));
        }
        self.report_requests(events);
        let mut rest = events;
        while let Some(&(first_us, _, _)) = rest.first() {
            // As `ingest` would before the first event: label the windows closed before it.
            self.label_closed(first_us.saturating_sub(1));
            // No sample is due until an event later than the first window's end.
            let due_after_us = self.next_window_end_us();
            let run = rest
                .iter()
                .position(|&(ts_us, _, _)| ts_us > due_after_us)
                .unwrap_or(rest.len());
            self.features.ingest_batch(&rest[..run]);
            self.report_woken();
            rest = &rest[run..];
            self.scores_current = false;
        }
    }

    /// Tells the model which keys are requested, before the features take
    /// them in. The online choice serves them in its miniature allocators.
    fn report_requests(&mut self, events: &[(u64, u32, u64)]) {
        if !self.model.wants_requests() {
            return;
        }
        for &(ts_us, _, key_hash) in events {
            self.model.requested(ts_us, key_hash);
        }
    }

    /// Tells the model which idle keys the requests just taken in woke
    /// through a successor boost (watched only if it wants requests).
    fn report_woken(&mut self) {
        for (ts_us, key_hash) in self.features.drain_woken() {
            self.model.woken(ts_us, key_hash);
        }
    }

    /// The end of the earliest window still open, or `u64::MAX` if none.
    fn next_window_end_us(&self) -> u64 {
        self.stages
            .iter()
            .filter_map(|stage| Some(stage.queue.front()?.at_us + stage.horizon_us))
            .min()
            .unwrap_or(u64::MAX)
    }

    /// Labels every sample whose window `(at, at + horizon_k]` ends at or before
    /// `closed_us`: every event up to then, and none after, has been ingested.
    fn label_closed(&mut self, closed_us: u64) {
        // Stage by stage, ascending: a sample labelled at one stage moves on
        // to the next, where it is due in this same pass if that window has
        // closed too (after a long gap between calls).
        for stage_index in 0..self.stages.len() {
            let horizon_us = self.stages[stage_index].horizon_us;
            while self.stages[stage_index]
                .queue
                .front()
                .is_some_and(|sample| sample.at_us + horizon_us <= closed_us)
            {
                let sample = self.stages[stage_index].queue.pop_front();
                self.label(stage_index, sample.expect("the front, checked just above"));
            }
        }
        self.model.labels_done();
    }

    fn label(&mut self, stage: usize, mut sample: Sample) {
        if self.features.row_of(sample.key_hash).is_none() {
            self.samples_dropped += 1;
            return;
        }
        let last = self.features.last_request_us(sample.key_hash).unwrap_or(0);
        let requested = last > sample.at_us;
        if self.model.learns() {
            self.model.learn(stage, &sample.features, requested);
        }
        if stage == self.base_stage {
            let baseline = models::frequency_probability(
                &sample.features,
                BASELINE_SCALE,
                self.config.horizon_us(),
            );
            self.self_score.add(sample.probability, baseline, requested);
            self.samples_labelled += 1;
        }
        sample.tag = self
            .model
            .labelled(stage, sample.tag, sample.at_us, requested);
        if let Some(next) = self.stages.get_mut(stage + 1) {
            if next.queue.len() < PENDING_PER_HORIZON_MAX {
                next.queue.push_back(sample);
            } else {
                self.samples_dropped += 1;
            }
        }
    }

    /// Advances to `now_us`: labels closed windows, decays, scores every active key,
    /// and samples keys for training.
    pub fn tick(&mut self, now_us: u64) {
        self.label_closed(now_us);
        self.features.decay_to(now_us);
        let view = self.features.view();
        // Every row is written by the scoring: no need to clear the rows
        // kept from the last tick.
        self.probabilities.resize(view.len(), 0.0);
        score_on_threads(
            self.model.as_ref(),
            &view,
            &mut self.probabilities,
            self.config.score_threads,
        );
        self.scores_current = true;

        // Samples to learn from (if the model learns) and to score it by.
        let now = self.features.decayed_to_us();
        self.sampled_rows.clear();
        for _ in 0..self.config.train_samples_per_tick {
            if self.stages[0].queue.len() + self.sampled_rows.len() >= self.pending_max {
                break;
            }
            let Some(row) = self.features.random_active_row() else {
                break;
            };
            self.sampled_rows.push(row);
        }
        let view = self.features.view();
        self.sampled_features.clear();
        self.sampled_features
            .extend(self.sampled_rows.iter().map(|&row| view.vector(row)));
        self.sampled_tags.clear();
        self.model.sampled(
            &view,
            &self.sampled_rows,
            &self.sampled_features,
            &mut self.sampled_tags,
        );
        debug_assert_eq!(self.sampled_tags.len(), self.sampled_rows.len());
        for ((&row, features), &tag) in self
            .sampled_rows
            .iter()
            .zip(&self.sampled_features)
            .zip(&self.sampled_tags)
        {
            let probability = self
                .model
                .horizon_probability(features)
                .unwrap_or(self.probabilities[row]);
            self.stages[0].queue.push_back(Sample {
                key_hash: view.key_hash[row],
                at_us: now,
                features: *features,
                probability,
                tag,
            });
        }
        self.model.ticked(&self.features);
    }

    /// Key hashes and probabilities of every active key as of the last tick, or
    /// `None` if events were ingested since (rows may have moved: tick first).
    pub fn scores(&self) -> Option<(&[u64], &[f32])> {
        if !self.scores_current {
            return None;
        }
        let view = self.features.view();
        Some((view.key_hash, &self.probabilities))
    }

    /// P(key requested within the horizon) as of the last tick; 0 for a key that
    /// is not active. `None` if events were ingested since the last tick.
    pub fn probability_of(&self, key_hash: u64) -> Option<f32> {
        if !self.scores_current {
            return None;
        }
        Some(match self.features.row_of(key_hash) {
            Some(row) if row < self.probabilities.len() => self.probabilities[row],
            _ => 0.0,
        })
    }

    /// The `k` highest probabilities at or above `min_probability`, highest first.
    pub fn top_k(&self, k: usize, min_probability: f32, out: &mut Vec<(u64, f32)>) {
        out.clear();
        let Some((keys, probabilities)) = self.scores() else {
            return;
        };
        out.extend(
            keys.iter()
                .zip(probabilities)
                .filter(|(_, p)| **p >= min_probability)
                .map(|(&key, &p)| (key, p)),
        );
        keep_top_k(out, k, |&(key_hash, probability)| (probability, key_hash));
    }
}

/// Keep the `k` highest-ranked entries of `out`, highest first, ranked by
/// [`rank_order`] on the `(probability, key_hash)` that `rank` gives each
/// entry: a total order, so the same keys in the same order whatever the
/// input order. The live forecaster ranks `(key_hash, probability)`
/// entries with it ([`Forecaster::top_k`]); the replay ranks its rows.
pub fn keep_top_k<T>(out: &mut Vec<T>, k: usize, rank: impl Fn(&T) -> (f32, u64)) {
    select_top_k(out, k, &rank);
    out.sort_unstable_by(|a, b| rank_order(rank(a), rank(b)));
}

/// [`keep_top_k`] without the sort: the same `k` entries, in no order.
pub fn select_top_k<T>(out: &mut Vec<T>, k: usize, rank: impl Fn(&T) -> (f32, u64)) {
    if out.len() > k {
        if k == 0 {
            out.clear();
            return;
        }
        out.select_nth_unstable_by(k - 1, |a, b| rank_order(rank(a), rank(b)));
        out.truncate(k);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelKind;
    use proptest::prelude::*;

    fn config(model: ModelKind) -> PredictorConfig {
        PredictorConfig {
            model,
            max_tracked_keys: 256,
            train_samples_per_tick: 16,
            ..PredictorConfig::default()
        }
    }

    /// Runs a stream, ticking every 10 ms up to `end_us`; returns every tick's scores.
    fn run(
        config: &PredictorConfig,
        events: &[(u64, u32, u64)],
        end_us: u64,
    ) -> Vec<Vec<(u64, u32)>> {
        let mut forecaster = Forecaster::new(config.clone());
        let mut next = 0;
        let mut ticks = Vec::new();
        let mut now = 0;
        while now <= end_us {
            while next < events.len() && events[next].0 <= now {
                let (ts, client, key) = events[next];
                forecaster.ingest(ts, client, key);
                next += 1;
            }
            forecaster.tick(now);
            let (keys, probabilities) = forecaster.scores().unwrap();
            let mut tick: Vec<(u64, u32)> = keys
                .iter()
                .zip(probabilities)
                .map(|(&k, p)| (k, p.to_bits()))
                .collect();
            tick.sort_unstable();
            ticks.push(tick);
            now += config.tick_us();
        }
        ticks
    }

    fn stream(seed: u64, n: usize, keys: u64) -> Vec<(u64, u32, u64)> {
        let mut state = seed | 1;
        let mut t = 0;
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                t += state % 20_000;
                (t, (state >> 20) as u32 % 4, (state >> 32) % keys + 1)
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

        /// Scores at a tick depend only on events at or before it: changing
        /// everything after a cut changes no score up to the cut.
        #[test]
        fn scores_never_look_ahead(seed in 1u64..u64::MAX, cut_share in 0.2f64..0.8, model_index in 0usize..ModelKind::ALL.len()) {
            let config = config(ModelKind::ALL[model_index]);
            let events = stream(seed, 600, 40);
            let end_us = events.last().unwrap().0 + 1_000_000;
            let cut_us = (events.last().unwrap().0 as f64 * cut_share) as u64;
            let mut altered: Vec<_> = events.iter().copied().filter(|e| e.0 <= cut_us).collect();
            altered.extend(stream(seed ^ 0xdead_beef, 300, 40).into_iter()
                .map(|(t, c, k)| (cut_us + 1 + t / 2, c, k)));
            altered.sort_by_key(|e| e.0);
            let original = run(&config, &events, end_us);
            let changed = run(&config, &altered, end_us);
            let ticks_before_cut = (cut_us / config.tick_us()) as usize + 1;
            for tick in 0..ticks_before_cut {
                prop_assert_eq!(&original[tick], &changed[tick], "tick {} (cut at {} us)", tick, cut_us);
            }
        }
    }

    /// Runs `events` with a tick every 10 ms up to `end_us`.
    fn run_to(forecaster: &mut Forecaster, events: &[(u64, u32, u64)], end_us: u64) {
        let mut next = 0;
        let mut now = 0;
        while now <= end_us {
            while next < events.len() && events[next].0 <= now {
                forecaster.ingest(events[next].0, events[next].1, events[next].2);
                next += 1;
            }
            forecaster.tick(now);
            now += 10_000;
        }
    }

    #[test]
    fn a_periodic_key_is_learnt_by_the_logistic_model() {
        // Key 1 every 200 ms (always within the horizon); keys 100.. once each.
        let mut events = Vec::new();
        for i in 0..300u64 {
            events.push((i * 200_000, 0, 1));
            events.push((i * 200_000 + 50_000, 1, 100 + i));
        }
        let mut forecaster = Forecaster::new(config(ModelKind::Logistic));
        run_to(&mut forecaster, &events, 5999 * 10_000);
        let periodic = forecaster.probability_of(1).unwrap();
        let one_off = forecaster.probability_of(100 + 299).unwrap();
        assert!(
            periodic > 0.8,
            "periodic key {periodic}; {}",
            forecaster.model().describe()
        );
        assert!(one_off < 0.3, "one-off key {one_off}");
        assert!(forecaster.samples_labelled > 1000);
        let score = forecaster.self_score;
        assert_eq!(score.samples, forecaster.samples_labelled);
        assert!(
            score.brier < score.brier_baseline,
            "the learnt model scores better than the frequency baseline here: {score:?}"
        );
    }

    #[test]
    fn the_frequency_model_at_the_baseline_scale_scores_as_the_baseline() {
        // Same model as the baseline: the two Brier scores agree, and both
        // come from labels of the closed windows only.
        let config = PredictorConfig {
            frequency_scale: BASELINE_SCALE,
            ..config(ModelKind::Frequency)
        };
        let mut forecaster = Forecaster::new(config);
        let events = stream(7, 3000, 30);
        run_to(&mut forecaster, &events, events.last().unwrap().0);
        let score = forecaster.self_score;
        assert!(score.samples > 1000, "{score:?}");
        assert!(score.positive_share > 0.0 && score.positive_share < 1.0);
        assert!(
            (score.brier - score.brier_baseline).abs() < 1e-4,
            "{score:?}"
        );
    }

    #[test]
    fn the_successor_model_predicts_the_follower_only_after_its_leader() {
        let mut events = Vec::new();
        for i in 0..100u64 {
            events.push((i * 2_000_000, 0, 7));
            events.push((i * 2_000_000 + 100_000, 0, 8));
        }
        let mut forecaster = Forecaster::new(config(ModelKind::Successor));
        for &(ts, client, key) in &events[..events.len() - 1] {
            forecaster.ingest(ts, client, key);
        }
        let leader_at = events[events.len() - 2].0;
        forecaster.tick(leader_at + 10_000);
        assert!(forecaster.probability_of(8).unwrap() > 0.9);
        forecaster.tick(leader_at + 1_500_000);
        assert!(forecaster.probability_of(8).unwrap() < 0.1);
    }

    #[test]
    fn keep_alive_and_frequency_rank_as_expected() {
        let mut keep_alive = Forecaster::new(config(ModelKind::KeepAlive));
        let mut frequency = Forecaster::new(config(ModelKind::Frequency));
        for forecaster in [&mut keep_alive, &mut frequency] {
            for i in 0..50u64 {
                forecaster.ingest(i * 50_000, 0, 1); // hot
            }
            forecaster.ingest(2_455_000, 0, 2); // once, most recent
            forecaster.tick(2_460_000);
        }
        assert!(keep_alive.probability_of(2).unwrap() > keep_alive.probability_of(1).unwrap());
        assert!(frequency.probability_of(1).unwrap() > frequency.probability_of(2).unwrap());
        assert_eq!(keep_alive.probability_of(12345), Some(0.0));
        keep_alive.ingest(2_470_000, 0, 3);
        assert_eq!(
            keep_alive.probability_of(1),
            None,
            "stale until the next tick"
        );
    }

    #[test]
    fn top_k_returns_the_highest_first() {
        let mut forecaster = Forecaster::new(config(ModelKind::Frequency));
        for key in 1..=20u64 {
            for i in 0..key {
                forecaster.ingest(i * 1000 + key, 0, key);
            }
        }
        forecaster.tick(100_000);
        let mut top = Vec::new();
        forecaster.top_k(5, 0.0, &mut top);
        let keys: Vec<u64> = top.iter().map(|t| t.0).collect();
        assert_eq!(keys, vec![20, 19, 18, 17, 16]);
    }

    #[test]
    fn keep_top_k_breaks_ties_by_the_lower_key_hash_whatever_the_input_order() {
        let mut entries: Vec<(u64, f32)> = (0..40u64)
            .map(|i| {
                (
                    (i * 0x9e37_79b9) % 1000,
                    if i % 3 == 0 { 0.5 } else { 0.25 },
                )
            })
            .collect();
        let mut expected = entries.clone();
        expected.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        expected.truncate(20);
        for rotation in 0..entries.len() {
            entries.rotate_left(1);
            let mut top = entries.clone();
            keep_top_k(&mut top, 20, |&(key_hash, p)| (p, key_hash));
            assert_eq!(top, expected, "rotation {rotation}");
        }
    }

    #[test]
    fn the_hold_value_model_keeps_a_key_that_returns_after_the_horizon() {
        // Key 1 every 3 s, six times the horizon; a new key every 3 s too,
        // never seen again. 1 s after key 1's last request, neither is due
        // within 500 ms, and the logistic model sees no difference worth a
        // slot; the hold-value model's 5 s head does.
        let mut events = Vec::new();
        for i in 0..200u64 {
            events.push((i * 3_000_000, 0, 1));
            events.push((i * 3_000_000 + 10_000, 1, 100 + i));
        }
        let end_us = 199 * 3_000_000 + 1_000_000;
        let mut hold = Forecaster::new(config(ModelKind::HoldValue));
        let mut logistic = Forecaster::new(config(ModelKind::Logistic));
        run_to(&mut hold, &events, end_us);
        run_to(&mut logistic, &events, end_us);
        let returning = hold.probability_of(1).unwrap();
        let one_off = hold.probability_of(100 + 199).unwrap();
        assert!(
            returning > 0.1 && returning > 3.0 * one_off,
            "returning {returning}, one-off {one_off}: {}",
            hold.model().describe()
        );
        let logistic_returning = logistic.probability_of(1).unwrap();
        assert!(
            returning > 2.0 * logistic_returning,
            "hold value {returning} against logistic {logistic_returning}"
        );
        // Its self-score is taken at the horizon itself, once per sample, on
        // its estimate of P(within the horizon), and beats the baseline's.
        let score = hold.self_score;
        assert_eq!(score.samples, hold.samples_labelled);
        assert!(hold.samples_labelled > 1000);
        assert!(score.brier < score.brier_baseline, "{score:?}");
    }

    #[test]
    fn the_hold_value_model_ranks_a_strong_successor_first() {
        // Every 2 s, client 0 takes 20 leader keys 50 ms apart, each followed
        // 100 ms later by its follower, which is taken at no other time.
        // Clients 1-8 take 100 new keys a second, each once. Among the active
        // keys that uniform training samples draw, a follower within 100 ms
        // of its leader is rare (about 1 in 300).
        let mut events = Vec::new();
        for i in 0..30u64 {
            for pair in 0..20u64 {
                let at = i * 2_000_000 + pair * 50_000;
                events.push((at, 0, 1 + pair));
                events.push((at + 100_000, 0, 101 + pair));
            }
        }
        events.extend((0..6_000u64).map(|i| (i * 10_000 + 1, 1 + (i % 8) as u32, 1000 + i)));
        events.sort_by_key(|e| e.0);
        let leader_at = 29 * 2_000_000 + 19 * 50_000;
        let mut hold = Forecaster::new(PredictorConfig {
            max_tracked_keys: 16_384,
            ..config(ModelKind::HoldValue)
        });
        let before: Vec<_> = events
            .iter()
            .copied()
            .filter(|e| e.0 <= leader_at)
            .collect();
        run_to(&mut hold, &before, leader_at + 20_000);
        let (_, scores) = hold.scores().unwrap();
        let follower = hold.probability_of(120).unwrap();
        let above = scores.iter().filter(|&&p| p >= follower).count();
        assert!(
            follower > 0.3 && above <= 5,
            "the follower scores {follower}, {above} keys at or above it: {}",
            hold.model().describe()
        );
    }

    #[test]
    fn scores_on_several_threads_are_those_of_one() {
        let events = stream(11, 1000, 3000);
        for kind in [ModelKind::Frequency, ModelKind::HoldValue] {
            let mut forecaster = Forecaster::new(PredictorConfig {
                max_tracked_keys: 4096,
                ..config(kind)
            });
            run_to(&mut forecaster, &events, events.last().unwrap().0);
            let view = forecaster.features().view();
            let bits = |threads| {
                let mut out = vec![0.0f32; view.len()];
                // Rows per thread as if there were 64 times more, so the split runs.
                let model = forecaster.model();
                let per_thread = view.len().div_ceil(threads).next_multiple_of(BLOCK);
                let mut start = 0;
                for part in out.chunks_mut(per_thread) {
                    model.score(&view.rows(start, start + part.len()), part);
                    start += part.len();
                }
                out.iter().map(|p| p.to_bits()).collect::<Vec<_>>()
            };
            assert!(view.len() > 2 * BLOCK, "{}", view.len());
            assert_eq!(bits(1), bits(2), "{kind:?}");
            assert_eq!(bits(1), bits(3), "{kind:?}");
            let mut threaded = vec![0.0f32; view.len()];
            score_on_threads(model_of(&forecaster), &view, &mut threaded, 2);
            assert_eq!(
                threaded.iter().map(|p| p.to_bits()).collect::<Vec<_>>(),
                bits(1)
            );
        }
    }

    fn model_of(forecaster: &Forecaster) -> &dyn Model {
        forecaster.model()
    }

    #[test]
    fn each_model_scores_one_row_as_its_block_loop_does() {
        let events = stream(5, 3000, 50);
        for kind in ModelKind::ALL {
            let mut forecaster = Forecaster::new(config(kind));
            run_to(&mut forecaster, &events, events.last().unwrap().0);
            let view = forecaster.features().view();
            // The block loop run now, on the same view: the online choice's
            // calibration moves at the end of each round, after the scores
            // are written.
            let mut scores = vec![0.0f32; view.len()];
            score_on_threads(forecaster.model(), &view, &mut scores, 1);
            assert!(!scores.is_empty());
            for (row, &score) in scores.iter().enumerate() {
                let one = forecaster
                    .model()
                    .score_one(&view, row, &view.vector(row))
                    .clamp(0.0, 1.0);
                assert!(
                    (one - score).abs() < 1e-4,
                    "{kind:?} row {row}: {one} {score}"
                );
            }
        }
    }

    #[test]
    fn the_online_choice_follows_the_member_with_the_least_loss() {
        // Each of 200 leaders is followed by its own key 3 ms later, every
        // 2 s: keep-alive and the successor table (which boosts the
        // follower only 3 ms ahead, between two ticks) lose to the rest.
        let mut events = Vec::new();
        for i in 0..3000u64 {
            let leader = 1000 + i % 200;
            events.push((i * 10_000, 0, leader));
            events.push((i * 10_000 + 3_000, 0, leader + 1000));
        }
        let mut forecaster = Forecaster::new(PredictorConfig {
            max_tracked_keys: 4096,
            ..config(ModelKind::Online)
        });
        run_to(&mut forecaster, &events, 30_000_000);
        let status = forecaster.model().choice().unwrap();
        let described = forecaster.model().describe();
        assert!(
            !["keep-alive", "successor"].contains(&status.leader),
            "{described}"
        );
        // The best member leads, or one within the hysteresis (1 in
        // discounted loss, over about 2,500 rounds).
        assert!(status.lead >= -1.0 / 2000.0, "{status:?}");
        assert!(status.trail <= status.bound, "{status:?}");
    }

    #[test]
    fn with_a_small_budget_the_online_choice_follows_the_member_that_prepares_ahead() {
        // 300 chains of two keys, a chain every 10 ms: its head, then its
        // tail 60 ms later; each chain comes back every 3 s. 40 slots
        // cannot keep 600 keys between returns, so a tail is a hit only if
        // it is prepared when its head is seen: the successor table and
        // hold-value (whose successor histogram learns it) do that;
        // keep-alive and the frequencies cannot.
        let mut events = Vec::new();
        for i in 0..4000u64 {
            let head = 10_000 + i % 300;
            events.push((i * 10_000, (i % 4) as u32, head));
            events.push((i * 10_000 + 60_000, (i % 4) as u32, head + 10_000));
        }
        events.sort_by_key(|e| e.0);
        let mut forecaster = Forecaster::new(PredictorConfig {
            max_tracked_keys: 4096,
            choice_budget_slots: 40,
            ..config(ModelKind::Online)
        });
        run_to(&mut forecaster, &events, 40_000_000);
        let status = forecaster.model().choice().unwrap();
        let described = forecaster.model().describe();
        assert!(
            ["successor", "hold-value"].contains(&status.leader),
            "{described}"
        );
        assert!(status.trail <= status.bound, "{status:?}");
    }

    #[test]
    fn samples_waiting_for_labels_are_bounded_whatever_the_configuration() {
        // 65,536 samples a tick, horizons of 10, 40 and 100 s: unbounded,
        // that would be up to 650 million samples waiting.
        let config = PredictorConfig {
            horizon_ms: 10_000,
            activity_window_ms: 60_000,
            train_samples_per_tick: 65_536,
            ..config(ModelKind::HoldValue)
        };
        let mut forecaster = Forecaster::new(config);
        // 25 s: the first horizon's queue fills in 4 ticks, and hands its
        // samples on at 10 s and at 20 s, more than the second one may hold.
        for tick in 0..2_500u64 {
            let now = tick * 10_000;
            forecaster.ingest(now, 0, tick % 7);
            forecaster.tick(now);
        }
        assert!(
            forecaster
                .stages
                .iter()
                .all(|stage| stage.queue.len() <= PENDING_PER_HORIZON_MAX)
        );
        assert!(forecaster.stages[1].queue.len() > PENDING_PER_HORIZON_MAX / 2);
        assert!(forecaster.samples_dropped > 0);
    }

    #[test]
    fn batched_ingest_labels_and_scores_as_one_by_one_ingest() {
        for model in [ModelKind::Logistic, ModelKind::HoldValue] {
            batched_ingest_matches_one_by_one(model);
        }
    }

    fn batched_ingest_matches_one_by_one(model: ModelKind) {
        let config = config(model);
        let events = stream(99, 4000, 60);
        let mut one_by_one = Forecaster::new(config.clone());
        let mut batched = Forecaster::new(config.clone());
        let mut next = 0;
        let mut now = 0;
        while next < events.len() {
            // A tick every 700 ms: each sample's label deadline (500 ms after its
            // tick) falls inside the next batch, which must label it mid-batch.
            now += 70 * config.tick_us();
            let end = next + events[next..].iter().take_while(|e| e.0 <= now).count();
            for &(ts, client, key) in &events[next..end] {
                one_by_one.ingest(ts, client, key);
            }
            batched.ingest_batch(&events[next..end]);
            next = end;
            one_by_one.tick(now);
            batched.tick(now);
            assert_eq!(one_by_one.samples_labelled, batched.samples_labelled);
            assert_eq!(one_by_one.samples_dropped, batched.samples_dropped);
            let (keys_a, scores_a) = one_by_one.scores().unwrap();
            let (keys_b, scores_b) = batched.scores().unwrap();
            assert_eq!(keys_a, keys_b);
            let bits = |scores: &[f32]| scores.iter().map(|p| p.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(scores_a), bits(scores_b), "tick at {now} us");
        }
        assert!(batched.samples_labelled > 100);
        assert_eq!(one_by_one.model().describe(), batched.model().describe());
    }
}
