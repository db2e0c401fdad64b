//! Runs the allocator policy ([`crate::allocator`]) every tick against the
//! live lock manager: builds the policy's view of the slots, the forecaster's
//! candidates and the feedback counters, and applies the actions it returns.
//!
//! Policy by configuration: `keep-alive` and `none` run
//! [`allocator::KeepAlive`] (with `none` the manager never lets a key onto the
//! fast path, and idle slots are still freed); `forecast` runs
//! [`allocator::Predictive`] over the forecaster's scores.
//!
//! Scores are advisory: stale ones (the forecaster stopped) are ignored, and
//! every value (score and contention probability) was already clamped to
//! [0, 1] by `ScoresView::read_into`.
//!
//! `PrepareContention` actions reserve `allocator.contention_waiters` waiters
//! in the key's queue ([`LockManager::prepare_contention`]).

use crate::allocator::{self, Action, Feedback, Score, SlotView, TickInput};
use crate::config::{Config, Policy};
use crate::files::RuntimeFiles;
use crate::locks::LockManager;
use shm_layout::events::EventsView;
use shm_layout::scores::{Scored, ScoresView};
use shm_layout::sync::shm::Ordering;
use shm_layout::table::TableView;
use std::collections::HashMap;

/// Scores older than this are ignored (the forecaster died or lags).
const STALE_SCORES_NS: u64 = 2_000_000_000;
/// Reads of the score file tried per tick before the last good snapshot is
/// kept (a write takes microseconds; the reader does not wait between tries).
const TORN_READ_ATTEMPTS: usize = 4;

pub struct Allocation {
    policy: Box<dyn allocator::Policy>,
    forecast: bool,
    /// The last good snapshot of the score file.
    scores: Vec<Scored>,
    /// Scratch for the next read (swapped in when the read is not torn).
    fresh: Vec<Scored>,
    score_of: HashMap<u64, Scored>,
    /// Waiters reserved per key predicted contended.
    contention_waiters: usize,
    /// Keyed slots the policy is shown per tick (`allocator.sweep_slots`).
    sweep_slots: usize,
    candidates: Vec<Score>,
    views: Vec<SlotView>,
    actions: Vec<Action>,
    /// The broker's busy share over the last tick, 0..=1.
    load: f32,
}

impl Allocation {
    pub fn new(config: &Config) -> Allocation {
        let keep_alive_us = config.allocator.keep_alive_ms * 1000;
        let forecast = config.allocator.policy == Policy::Forecast;
        let policy: Box<dyn allocator::Policy> = if forecast {
            Box::new(allocator::Predictive::new(allocator::PredictiveConfig {
                threshold_initial: config.allocator.threshold,
                waste_share_target: config.allocator.target_waste,
                idle_timeout_us: keep_alive_us,
                contention_threshold: config.allocator.contention_threshold,
                ..allocator::PredictiveConfig::default()
            }))
        } else {
            Box::new(allocator::KeepAlive::new(keep_alive_us))
        };
        Allocation {
            policy,
            forecast,
            scores: Vec::new(),
            fresh: Vec::new(),
            score_of: HashMap::new(),
            contention_waiters: config.allocator.contention_waiters as usize,
            sweep_slots: config.allocator.sweep_slots as usize,
            candidates: Vec::new(),
            views: Vec::new(),
            actions: Vec::new(),
            load: 0.0,
        }
    }

    /// Report the broker's busy share (0..=1) for the next tick: the
    /// forecast policy prepares less under load.
    pub fn set_load(&mut self, load: f32) {
        self.load = load;
    }

    pub fn tick(&mut self, manager: &mut LockManager, files: &RuntimeFiles, now_ms: u64) {
        self.tick_on(
            manager,
            &files.table,
            &files.events,
            Some(&files.scores),
            now_ms,
        );
    }

    /// [`Allocation::tick`] on explicit views (the unit tests run it on heap
    /// memory, without a score file).
    pub fn tick_on(
        &mut self,
        manager: &mut LockManager,
        table: &TableView,
        events: &EventsView,
        scores: Option<&ScoresView>,
        now_ms: u64,
    ) {
        if let Some(scores) = scores {
            self.read_scores(scores, manager);
        }
        let scores = &self.score_of;
        let left_out = manager.tick(
            table,
            now_ms,
            |h| scores.get(&h).copied(),
            &mut self.views,
            self.sweep_slots,
        );
        let stats = &table.header().stats;
        let feedback = Feedback {
            hits: stats.hits.load(Ordering::Relaxed),
            misses: stats.misses.load(Ordering::Relaxed),
            late: stats.late.load(Ordering::Relaxed),
            prepared: stats.preparations.load(Ordering::Relaxed),
            wasted: stats.wasted.load(Ordering::Relaxed),
        };
        let slot_count = table.geometry().slot_count as usize;
        let input = TickInput {
            now_us: now_ms * 1000,
            // Leave a tenth of the table to the slow path's own preparations.
            // The slots this tick's sweep left out count as kept: the
            // policy acts on the slots it is shown, within what is left.
            budget_slots: (slot_count - slot_count / 10).saturating_sub(left_out),
            slots: &self.views,
            candidates: &self.candidates,
            feedback: &feedback,
            load: self.load,
        };
        self.policy.tick(&input, &mut self.actions);
        let policy = &self.policy;
        let wanted = self.candidates.iter().filter(|c| policy.wants(c));
        manager.set_predicted(wanted.map(|c| c.key_hash));
        // Publish each keyed slot's score for observers (`forelock locks`),
        // and end the contention preparations no longer predicted.
        for view in &self.views {
            if let Some(slot) = table.slot(view.slot) {
                // Written only when it changed: a store dirties the slot's
                // line in every client's cache, every tick.
                let bits = view.score.unwrap_or(0.0).to_bits();
                if slot.score_bits.load(Ordering::Relaxed) != bits {
                    slot.score_bits.store(bits, Ordering::Relaxed);
                }
            }
            if view.contention_prepared && !self.policy.predicts_contended(view.contention) {
                manager.end_contention_preparation(view.slot);
            }
        }
        for action in &self.actions {
            match *action {
                Action::Prepare { key_hash } => {
                    manager.prepare(table, events, key_hash);
                }
                Action::Reclaim { slot, .. } | Action::Evict { slot, .. } => {
                    manager.evict(table, events, slot);
                }
                Action::PrepareContention { key_hash } => {
                    manager.prepare_contention(table, events, key_hash, self.contention_waiters);
                }
            }
        }
    }

    /// Fresh scores from the forecaster, split into those of keyed slots and
    /// candidates (keys without a slot).
    ///
    /// A torn read (the forecaster was writing) is retried a few times; if
    /// every attempt is torn, the last good snapshot stands for this tick.
    /// Dropping every score for one tick instead would let the policy reclaim
    /// the slots it keeps on purpose (those predicted contended lose their
    /// reserved queue) and place them again at the next tick. Stale scores
    /// (the forecaster stopped) and the keep-alive policy clear them.
    fn read_scores(&mut self, scores: &ScoresView, manager: &LockManager) {
        let written = scores.header().written_at_ns.load(Ordering::Relaxed);
        if !self.forecast || shm_layout::monotonic_ns().saturating_sub(written) > STALE_SCORES_NS {
            self.scores.clear();
        } else if (0..TORN_READ_ATTEMPTS).any(|_| scores.read_into(&mut self.fresh)) {
            std::mem::swap(&mut self.scores, &mut self.fresh);
        }
        self.score_of.clear();
        self.candidates.clear();
        for &scored in &self.scores {
            self.score_of.insert(scored.key_hash, scored);
            if !manager.has_key_hash(scored.key_hash) {
                self.candidates.push(Score {
                    key_hash: scored.key_hash,
                    probability: scored.score,
                    contention: scored.contention,
                });
            }
        }
    }
}
