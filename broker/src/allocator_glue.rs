//! Runs the allocator every tick: the stand-in keep-alive reclaim (in
//! [`LockManager::tick`]) and, with `policy = "forecast"`, preparation of the
//! keys the forecaster scores above the threshold.
//!
//! Scores are advisory: stale ones (the forecaster stopped) are ignored, and
//! every value was already clamped to [0, 1] by `ScoresView::read_into`.

use crate::config::{Config, Policy};
use crate::files::RuntimeFiles;
use crate::locks::LockManager;

/// Scores older than this are ignored (the forecaster died or lags).
const STALE_SCORES_NS: u64 = 2_000_000_000;

pub struct Allocation {
    policy: Policy,
    threshold: f32,
    scores: Vec<(u64, f32)>,
}

impl Allocation {
    pub fn new(config: &Config) -> Allocation {
        Allocation {
            policy: config.allocator.policy,
            threshold: config.allocator.threshold,
            scores: Vec::new(),
        }
    }

    pub fn tick(&mut self, manager: &mut LockManager, files: &RuntimeFiles, now_ms: u64) {
        manager.tick(&files.table, &files.events, now_ms);
        if self.policy != Policy::Forecast {
            return;
        }
        let written = files
            .scores
            .header()
            .written_at_ns
            .load(std::sync::atomic::Ordering::Relaxed);
        if shm_layout::monotonic_ns().saturating_sub(written) > STALE_SCORES_NS {
            return;
        }
        if !files.scores.read_into(&mut self.scores) {
            return;
        }
        for &(hash, score) in &self.scores {
            if score < self.threshold || manager.free_slots() == 0 {
                break;
            }
            manager.prepare(&files.table, &files.events, hash);
        }
    }
}
