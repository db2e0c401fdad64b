//! Latency histograms and counters the broker keeps about itself.

use hdrhistogram::Histogram;
use shm_layout::wire::Response;
use std::time::Duration;

/// Per-path service-time histograms, in nanoseconds.
pub struct Metrics {
    pub slow_grant_ns: Histogram<u64>,
    pub queued_ns: Histogram<u64>,
    pub release_ns: Histogram<u64>,
}

impl Metrics {
    pub fn new(_config: &crate::config::Config, _runtime_dir: &std::path::Path) -> Metrics {
        let h =
            || Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid histogram bounds");
        Metrics {
            slow_grant_ns: h(),
            queued_ns: h(),
            release_ns: h(),
        }
    }

    /// Called every allocator tick (default 10 ms) with the broker's clock.
    pub fn on_tick(&mut self, _files: &crate::files::RuntimeFiles, _now_ms: u64) {}

    pub fn record_acquire(&mut self, response: &Response, took: Duration) {
        let ns = (took.as_nanos() as u64).max(1);
        match response {
            Response::Granted { .. } => self.slow_grant_ns.saturating_record(ns),
            Response::Queued { .. } => self.queued_ns.saturating_record(ns),
            _ => {}
        }
    }

    pub fn record_release(&mut self, took: Duration) {
        self.release_ns
            .saturating_record((took.as_nanos() as u64).max(1));
    }
}
