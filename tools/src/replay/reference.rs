//! The replay's simulated brokers as they were before they shared work
//! between them (commit da880d4, copied unchanged but for this header and
//! the entry point at the end): each broker looks each slot's score up in
//! the forecaster, keys its slots by hash, and every pass runs on one
//! thread. It shows the policy every slot every tick and ranks with the
//! forecaster's `top_k`, so it is the plain implementation of the tie rule
//! (`forelockd::allocator`, "The tie rule"). Kept only for the test that
//! the fast replay reports exactly what this one does
//! (`the_fast_replay_reports_what_the_reference_replay_does`).

use std::collections::HashMap;

use forelock_predictor::config::{ModelKind, PredictorConfig};
use forelock_predictor::features::IdentityBuildHasher;
use forelock_predictor::forecaster::Forecaster;
use forelock_predictor::trace::{Trace, TraceEvent};
use forelockd::allocator::{
    Action, Feedback, KeepAlive, Policy, Predictive, PredictiveConfig, Score, SlotView, TickInput,
};

use super::{
    HalfReport, NONE_US, Quality, ReplayReport, ReplaySettings, RunReport, Source, TraceIndex,
    contention, oracle_score,
};

/// [`super::replay`] the old way: every pass in turn on this thread.
pub(super) fn replay(
    name: &str,
    trace: &Trace,
    config: &PredictorConfig,
    models: &[ModelKind],
    settings: &ReplaySettings,
) -> ReplayReport {
    let index = TraceIndex::new(trace);
    let mut runs = no_prediction_runs(trace, &index, config, settings);
    for (name, model_config) in super::variants(config, models, settings) {
        runs.extend(model_runs(
            trace,
            &index,
            config,
            &name,
            &model_config,
            settings,
        ));
    }
    runs.push(oracle_run(trace, &index, config, settings));
    let contention = contention::score(
        &trace.events,
        &index.contended,
        config,
        settings.eval_every_ticks,
        forelockd::config::Config::default_config()
            .allocator
            .contention_threshold,
    );
    super::assemble(name, trace, &index, config, settings, runs, contention)
}

// ---------------------------------------------------------------------------
// One simulated broker: slots, policy, counters.

#[derive(Debug, Clone, Copy)]
struct SimSlot {
    slot: u32,
    prepared_at_us: u64,
    ready_at_us: u64,
    last_use_us: Option<u64>,
    uses: u32,
    held_until_us: u64,
    idle_since_us: u64,
}

#[derive(Debug, Default, Clone, Copy)]
struct Counters {
    requests: u64,
    hits: u64,
    late: u64,
    seen_before_requests: u64,
    seen_before_hits: u64,
    prepares: u64,
    wasted: u64,
    wasted_slot_us: u128,
}

struct Sim {
    policy: Box<dyn Policy>,
    policy_name: String,
    setting: String,
    fixed_threshold: Option<f32>,
    keep_alive_ms: Option<u64>,
    adaptive: bool,
    budget_slots: usize,
    prepare_latency_us: u64,
    slots: Vec<(u64, SimSlot)>,
    slot_of_key: HashMap<u64, usize, IdentityBuildHasher>,
    next_slot_id: u32,
    feedback: Feedback,
    counters: Counters,
    /// The same counters for the trace's first and second half (split at
    /// `mid_us`): thresholds are chosen on one, reported on the other.
    halves: [Counters; 2],
    mid_us: u64,
    views: Vec<SlotView>,
    candidates: Vec<Score>,
    actions: Vec<Action>,
}

impl Sim {
    fn new(
        policy: Box<dyn Policy>,
        policy_name: &str,
        setting: String,
        settings: &ReplaySettings,
    ) -> Sim {
        Sim {
            policy,
            policy_name: policy_name.to_owned(),
            setting,
            fixed_threshold: None,
            keep_alive_ms: None,
            adaptive: false,
            budget_slots: settings.budget_slots,
            prepare_latency_us: settings.prepare_latency_us,
            slots: Vec::new(),
            slot_of_key: HashMap::default(),
            next_slot_id: 0,
            feedback: Feedback::default(),
            counters: Counters::default(),
            halves: [Counters::default(); 2],
            mid_us: settings.mid_us,
            views: Vec::new(),
            candidates: Vec::new(),
            actions: Vec::new(),
        }
    }

    fn half(&self, at_us: u64) -> usize {
        usize::from(at_us >= self.mid_us)
    }

    /// Adds the slot-time `[from_us, to_us)` that served nothing, split
    /// between the halves.
    fn add_waste(&mut self, from_us: u64, to_us: u64) {
        self.counters.wasted_slot_us += u128::from(to_us.saturating_sub(from_us));
        let mid = self.mid_us.clamp(from_us, to_us.max(from_us));
        self.halves[0].wasted_slot_us += u128::from(mid.saturating_sub(from_us));
        self.halves[1].wasted_slot_us += u128::from(to_us.saturating_sub(mid));
    }

    fn request(&mut self, event: &TraceEvent, seen_before: bool) {
        let half = self.half(event.ts_us);
        for counters in [&mut self.counters, &mut self.halves[half]] {
            counters.requests += 1;
            counters.seen_before_requests += u64::from(seen_before);
        }
        let release_us = event.ts_us + event.hold_us;
        match self.slot_of_key.get(&event.key_hash) {
            Some(&index) => {
                let slot = &mut self.slots[index].1;
                if event.ts_us >= slot.ready_at_us {
                    for counters in [&mut self.counters, &mut self.halves[half]] {
                        counters.hits += 1;
                        counters.seen_before_hits += u64::from(seen_before);
                    }
                    self.feedback.hits += 1;
                } else {
                    for counters in [&mut self.counters, &mut self.halves[half]] {
                        counters.late += 1;
                    }
                    self.feedback.late += 1;
                }
                slot.last_use_us = Some(event.ts_us);
                slot.uses = slot.uses.saturating_add(1);
                slot.held_until_us = slot.held_until_us.max(release_us);
                slot.idle_since_us = slot.held_until_us;
            }
            None => {
                self.feedback.misses += 1;
                let slot = SimSlot {
                    slot: self.next_slot_id,
                    prepared_at_us: event.ts_us,
                    ready_at_us: event.ts_us,
                    last_use_us: Some(event.ts_us),
                    uses: 1,
                    held_until_us: release_us,
                    idle_since_us: release_us,
                };
                self.insert(event.key_hash, slot);
            }
        }
    }

    fn insert(&mut self, key_hash: u64, slot: SimSlot) {
        self.next_slot_id = self.next_slot_id.wrapping_add(1);
        self.slot_of_key.insert(key_hash, self.slots.len());
        self.slots.push((key_hash, slot));
    }

    fn remove(&mut self, key_hash: u64, now_us: u64) {
        let Some(&index) = self.slot_of_key.get(&key_hash) else {
            return;
        };
        let slot = self.slots[index].1;
        if slot.held_until_us > now_us {
            return; // the broker re-checks: a held slot is never freed
        }
        self.slot_of_key.remove(&key_hash);
        self.slots.swap_remove(index);
        if index < self.slots.len() {
            self.slot_of_key.insert(self.slots[index].0, index);
        }
        if slot.uses == 0 {
            let half = self.half(now_us);
            self.counters.wasted += 1;
            self.halves[half].wasted += 1;
            self.feedback.wasted += 1;
        }
        self.add_waste(slot.idle_since_us, now_us);
    }

    fn count_idle_tails(&mut self, now_us: u64) {
        for index in 0..self.slots.len() {
            let slot = self.slots[index].1;
            if slot.held_until_us <= now_us {
                self.add_waste(slot.idle_since_us, now_us);
            }
        }
    }

    /// `ranked`: scored keys, highest first (shared by every sim of a pass).
    fn tick(&mut self, now_us: u64, horizon_us: u64, source: &Source, ranked: &[Score]) {
        self.views.clear();
        for (key_hash, slot) in &self.slots {
            self.views.push(SlotView {
                slot: slot.slot,
                key_hash: *key_hash,
                prepared_at_us: slot.prepared_at_us,
                last_use_us: slot.last_use_us,
                uses_since_prepared: slot.uses,
                held: slot.held_until_us > now_us,
                score: source.score_of(*key_hash, now_us, horizon_us),
                // The simulated brokers get no contention forecast: they
                // simulate access preparation only (the contention estimate
                // is scored on its own, replay/contention.rs).
                contention: None,
                contention_prepared: false,
            });
        }
        self.candidates.clear();
        let threshold = self.policy.threshold();
        for score in ranked {
            if score.probability < threshold || self.candidates.len() >= self.budget_slots {
                break;
            }
            if !self.slot_of_key.contains_key(&score.key_hash) {
                self.candidates.push(*score);
            }
        }
        let input = TickInput {
            now_us,
            budget_slots: self.budget_slots,
            slots: &self.views,
            candidates: &self.candidates,
            feedback: &self.feedback,
            load: 0.0,
        };
        let mut actions = std::mem::take(&mut self.actions);
        self.policy.tick(&input, &mut actions);
        for action in &actions {
            match *action {
                // PrepareContention also places the slot; the sims get no
                // contention forecast, so it only appears for symmetry.
                Action::Prepare { key_hash } | Action::PrepareContention { key_hash } => {
                    if self.slot_of_key.contains_key(&key_hash) {
                        continue;
                    }
                    self.counters.prepares += 1;
                    let half = self.half(now_us);
                    self.halves[half].prepares += 1;
                    self.feedback.prepared += 1;
                    let slot = SimSlot {
                        slot: self.next_slot_id,
                        prepared_at_us: now_us,
                        ready_at_us: now_us + self.prepare_latency_us,
                        last_use_us: None,
                        uses: 0,
                        held_until_us: 0,
                        idle_since_us: now_us,
                    };
                    self.insert(key_hash, slot);
                }
                Action::Reclaim { key_hash, .. } | Action::Evict { key_hash, .. } => {
                    self.remove(key_hash, now_us)
                }
            }
        }
        self.actions = actions;
    }

    fn report(&self, quality: Option<(f64, f64)>, duration_us: u64) -> RunReport {
        let c = &self.counters;
        let share = |part: u64, whole: u64| {
            if whole == 0 {
                0.0
            } else {
                part as f64 / whole as f64
            }
        };
        RunReport {
            policy: self.policy_name.clone(),
            setting: self.setting.clone(),
            threshold: self.fixed_threshold,
            requests: c.requests,
            hits: c.hits,
            hit_rate: share(c.hits, c.requests),
            seen_before_requests: c.seen_before_requests,
            hit_rate_seen_before: share(c.seen_before_hits, c.seen_before_requests),
            late: c.late,
            late_share: share(c.late, c.requests),
            prepares: c.prepares,
            wasted: c.wasted,
            waste_share: share(c.wasted, c.prepares),
            wasted_slot_seconds: c.wasted_slot_us as f64 * 1e-6,
            waste_per_budget: c.wasted_slot_us as f64
                / (self.budget_slots as f64 * duration_us.max(1) as f64),
            auc_pr: quality.map(|q| q.0),
            brier: quality.map(|q| q.1),
            threshold_final: self.adaptive.then(|| self.policy.threshold()),
            keep_alive_ms: self.keep_alive_ms,
            model: None,
            halves: self.halves.map(|c| HalfReport {
                requests: c.requests,
                hit_rate_seen_before: share(c.seen_before_hits, c.seen_before_requests),
                prepares: c.prepares,
                wasted: c.wasted,
                waste_per_budget: c.wasted_slot_us as f64
                    / (self.budget_slots as f64 * (duration_us.max(2) / 2) as f64),
            }),
        }
    }
}

/// No prediction: slow path + keep-alive, one sim per keep-alive time.
fn no_prediction_runs(
    trace: &Trace,
    index: &TraceIndex,
    config: &PredictorConfig,
    settings: &ReplaySettings,
) -> Vec<RunReport> {
    let mut sims: Vec<Sim> = settings
        .keep_alive_ms
        .iter()
        .map(|&ms| {
            let mut sim = Sim::new(
                Box::new(KeepAlive::new(ms * 1000)),
                "no prediction",
                format!("keep-alive {ms} ms"),
                settings,
            );
            sim.keep_alive_ms = Some(ms);
            sim
        })
        .collect();
    run_pass(
        trace,
        index,
        config,
        &mut Source::Nothing,
        &mut sims,
        None,
        settings,
    );
    sims.iter()
        .map(|sim| sim.report(None, trace.duration_us()))
        .collect()
}

/// One model (or variant) with the adaptive threshold and the sweep.
fn model_runs(
    trace: &Trace,
    index: &TraceIndex,
    config: &PredictorConfig,
    name: &str,
    model_config: &PredictorConfig,
    settings: &ReplaySettings,
) -> Vec<RunReport> {
    let mut sims = predictive_sims(name, settings);
    let mut source = Source::Forecaster(Box::new(Forecaster::new(model_config.clone())));
    let mut quality = Quality::new();
    run_pass(
        trace,
        index,
        config,
        &mut source,
        &mut sims,
        Some(&mut quality),
        settings,
    );
    let result = quality.result();
    let description = match &source {
        Source::Forecaster(forecaster) => Some(forecaster.model().describe()),
        _ => None,
    };
    sims.iter()
        .map(|sim| RunReport {
            model: description.clone(),
            ..sim.report(Some(result), trace.duration_us())
        })
        .collect()
}

/// The oracle: knows each key's next request.
fn oracle_run(
    trace: &Trace,
    index: &TraceIndex,
    config: &PredictorConfig,
    settings: &ReplaySettings,
) -> RunReport {
    let mut oracle = Sim::new(
        Box::new(Predictive::new(PredictiveConfig {
            threshold_initial: 0.4,
            adaptive: false,
            // Free a slot as soon as its key is not needed within the horizon.
            unused_timeout_us: 0,
            idle_timeout_us: 0,
            prepares_per_tick_max: usize::MAX / 8,
            eviction_margin: 0.0,
            ..PredictiveConfig::default()
        })),
        "oracle",
        "hindsight".to_owned(),
        settings,
    );
    let mut source = Source::Oracle {
        next_us: index.first_us.clone(),
    };
    run_pass(
        trace,
        index,
        config,
        &mut source,
        std::slice::from_mut(&mut oracle),
        None,
        settings,
    );
    oracle.report(None, trace.duration_us())
}

fn predictive_sims(model_name: &str, settings: &ReplaySettings) -> Vec<Sim> {
    let mut sims = vec![{
        let mut sim = Sim::new(
            Box::new(Predictive::new(PredictiveConfig::default())),
            model_name,
            "adaptive".to_owned(),
            settings,
        );
        sim.adaptive = true;
        sim
    }];
    for &threshold in &settings.thresholds {
        let policy = Predictive::new(PredictiveConfig {
            threshold_initial: threshold,
            threshold_min: threshold.min(PredictiveConfig::default().threshold_min),
            adaptive: false,
            ..PredictiveConfig::default()
        });
        let mut sim = Sim::new(
            Box::new(policy),
            model_name,
            format!("threshold {threshold}"),
            settings,
        );
        sim.fixed_threshold = Some(threshold);
        sims.push(sim);
    }
    sims
}

fn run_pass(
    trace: &Trace,
    index: &TraceIndex,
    config: &PredictorConfig,
    source: &mut Source,
    sims: &mut [Sim],
    mut quality: Option<&mut Quality>,
    settings: &ReplaySettings,
) {
    let events = &trace.events;
    let Some(first) = events.first() else { return };
    let tick_us = config.tick_us();
    let horizon_us = config.horizon_us();
    let mut now_us = first.ts_us - first.ts_us % tick_us;
    let mut next = 0usize;
    let mut window_start = 0usize; // first event after now (for the oracle and labels)
    let mut ranked: Vec<Score> = Vec::new();
    let mut top: Vec<(u64, f32)> = Vec::new();
    let mut tick_number = 0u64;
    let min_threshold = sims
        .iter()
        .map(|sim| sim.policy.threshold())
        .fold(1.0f32, f32::min)
        .max(1e-3);
    let mut key_next_us: HashMap<u64, u64, IdentityBuildHasher> = if quality.is_some() {
        index.first_us.clone()
    } else {
        HashMap::default()
    };
    // This tick's requests, for the forecaster (which sees them only at the
    // tick anyway: one prefetched batch, as the live predictor does).
    let mut batch: Vec<(u64, u32, u64)> = Vec::new();
    loop {
        while next < events.len() && events[next].ts_us <= now_us {
            let event = &events[next];
            let seen_before = index.previous_us[next] != NONE_US;
            for sim in sims.iter_mut() {
                sim.request(event, seen_before);
            }
            match source {
                Source::Nothing => {}
                Source::Forecaster(_) => batch.push((event.ts_us, event.client, event.key_hash)),
                Source::Oracle { next_us } => {
                    next_us.insert(event.key_hash, index.next_us[next]);
                }
            }
            if quality.is_some() {
                key_next_us.insert(event.key_hash, index.next_us[next]);
            }
            next += 1;
        }
        if let Source::Forecaster(forecaster) = source {
            forecaster.ingest_batch(&batch);
            batch.clear();
        }
        while window_start < events.len() && events[window_start].ts_us <= now_us {
            window_start += 1;
        }

        ranked.clear();
        match source {
            Source::Nothing => {}
            Source::Forecaster(forecaster) => {
                forecaster.tick(now_us);
                let budget = sims.first().map_or(0, |sim| sim.budget_slots);
                forecaster.top_k(budget, min_threshold, &mut top);
                ranked.extend(top.iter().map(|&(key_hash, probability)| Score {
                    key_hash,
                    probability,
                    contention: 0.0,
                }));
                if let Some(quality) = quality.as_deref_mut()
                    && tick_number % settings.eval_every_ticks == 0
                {
                    evaluate(
                        forecaster,
                        &key_next_us,
                        events,
                        index,
                        window_start,
                        now_us,
                        horizon_us,
                        quality,
                    );
                }
            }
            Source::Oracle { .. } => {
                let mut j = window_start;
                while j < events.len() && events[j].ts_us <= now_us + horizon_us {
                    // First request of its key within the window.
                    if index.previous_us[j] == NONE_US || index.previous_us[j] <= now_us {
                        ranked.push(Score {
                            key_hash: events[j].key_hash,
                            probability: oracle_score(events[j].ts_us, now_us, horizon_us),
                            contention: 0.0,
                        });
                    }
                    j += 1;
                }
            }
        }
        for sim in sims.iter_mut() {
            sim.tick(now_us, horizon_us, source, &ranked);
        }
        if next >= events.len() {
            // Slots still prepared at the end: their idle tail served nothing
            // (yet); count it, or policies that never free a slot look free.
            for sim in sims.iter_mut() {
                sim.count_idle_tails(now_us);
            }
            break;
        }
        now_us += tick_us;
        tick_number += 1;
    }
}

#[allow(clippy::too_many_arguments)]
fn evaluate(
    forecaster: &Forecaster,
    key_next_us: &HashMap<u64, u64, IdentityBuildHasher>,
    events: &[TraceEvent],
    index: &TraceIndex,
    window_start: usize,
    now_us: u64,
    horizon_us: u64,
    quality: &mut Quality,
) {
    let Some((keys, probabilities)) = forecaster.scores() else {
        return;
    };
    let mut scored_positives = 0u64;
    for (key_hash, &probability) in keys.iter().zip(probabilities) {
        let requested = key_next_us
            .get(key_hash)
            .is_some_and(|&next| next != NONE_US && next <= now_us + horizon_us);
        scored_positives += u64::from(requested);
        quality.add(probability, requested);
    }
    let mut positives = 0u64;
    let mut j = window_start;
    while j < events.len() && events[j].ts_us <= now_us + horizon_us {
        if index.previous_us[j] == NONE_US || index.previous_us[j] <= now_us {
            positives += 1;
        }
        j += 1;
    }
    quality.unscored_positives += positives.saturating_sub(scored_positives);
}
