//! Contention in the replay: which requests of a trace are contended, and how
//! well the contention estimator (`forelock_predictor::contention`) forecasts
//! them.
//!
//! # Which requests are contended
//!
//! The trace is taken as recorded: every request holds its key over
//! `[ts_us, ts_us + hold_us)`, and nothing is delayed. A request is contended
//! when an EARLIER row of the trace (earlier `ts_us`, or the same `ts_us` and
//! an earlier line) for the same key, by ANOTHER client, in a conflicting mode
//! (exclusive against anything, shared against exclusive), still holds the key
//! at its `ts_us`: `earlier.ts_us + earlier.hold_us > ts_us`. In the broker
//! that request would find the key held and queue (`Outcome::Contended`).
//! Computed once per trace, in one pass ([`contended_flags`]).
//!
//! Not modelled: the waiting itself (a contended request is not pushed back
//! to the holder's release; the traces record real runs, whose times already
//! contain the waits of the system they were captured on), and a shared
//! request queueing behind a queued exclusive waiter while the key is held
//! shared (the broker queues it; here it is not contended). A client's own
//! earlier hold never makes its request contended (re-entry, S to X upgrades).
//!
//! # How the estimate is scored
//!
//! One pass over the trace in the replay's ticks, independent of the access
//! model. The estimator gets exactly the live predictor's calls: `record(ts,
//! key, contended)` for every request in time order (a request's flag is known
//! at its own time: it queued), then at each tick `contended(now, ...)` (which
//! also forgets idle rows, as live).
//!
//! - AUC-PR and Brier: every `eval_every` ticks, over the keys with an
//!   estimate (P > 0), label "the key has a contended request within
//!   (t, t + horizon]". Keys contended within the window but without an
//!   estimate count as positives at P = 0, as in the access quality.
//! - At the broker's default `contention_threshold` (the embedded
//!   configuration's): precision is the share of the predicted key-ticks (P at or
//!   above it, at the evaluated ticks) whose label is true; recall is the share
//!   of contended requests whose key was predicted at the last tick before the
//!   request (the tick whose scores the broker would have used: ticks at or after
//!   the request have ingested it).
//! - The trivial baseline, with the same labels: a key is predicted contended
//!   at t when it had a contended request within (t - horizon, t].
//! - For a comparison at equal volume: the precision of the estimator's most
//!   probable key-ticks, as many as the baseline predicts.

use std::collections::{HashMap, HashSet};

use forelock_predictor::config::PredictorConfig;
use forelock_predictor::contention::ContentionEstimator;
use forelock_predictor::features::IdentityBuildHasher;
use forelock_predictor::trace::{Mode, TraceEvent};
use serde::Serialize;

use super::Quality;

/// For each event of `events` (sorted by time), whether it is contended (see
/// the module's documentation).
pub(super) fn contended_flags(events: &[TraceEvent]) -> Vec<bool> {
    let mut holds: HashMap<u64, KeyHolds, IdentityBuildHasher> = HashMap::default();
    events
        .iter()
        .map(|event| {
            let holds = holds.entry(event.key_hash).or_default();
            let conflicting = match event.mode {
                Mode::Exclusive => &holds.any,
                Mode::Shared => &holds.exclusive,
            };
            let contended = conflicting.latest_release_by_other_than(event.client) > event.ts_us;
            let release_us = event.ts_us.saturating_add(event.hold_us);
            holds.any.add(release_us, event.client);
            if event.mode == Mode::Exclusive {
                holds.exclusive.add(release_us, event.client);
            }
            contended
        })
        .collect()
}

/// Per key: the latest releases of its holds, all modes and exclusive only.
#[derive(Debug, Default, Clone, Copy)]
struct KeyHolds {
    any: LatestReleases,
    exclusive: LatestReleases,
}

/// The latest release time (`until_us`, 0 = none) of any client, and the
/// latest of any other client: enough to answer "the latest release by a
/// client other than c" for every c.
#[derive(Debug, Default, Clone, Copy)]
struct LatestReleases {
    first: (u64, u32),
    second: (u64, u32),
}

impl LatestReleases {
    fn add(&mut self, until_us: u64, client: u32) {
        if self.first.1 == client {
            self.first.0 = self.first.0.max(until_us);
        } else if self.second.1 == client {
            self.second.0 = self.second.0.max(until_us);
        } else if until_us > self.second.0 {
            self.second = (until_us, client);
        }
        if self.second.0 > self.first.0 {
            std::mem::swap(&mut self.first, &mut self.second);
        }
    }

    fn latest_release_by_other_than(&self, client: u32) -> u64 {
        if self.first.1 == client {
            self.second.0
        } else {
            self.first.0
        }
    }
}

/// Precision and recall of one way of predicting contention.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ContentionPoint {
    /// (key, evaluated tick) pairs predicted contended.
    pub predicted_key_ticks: u64,
    /// Those with a contended request within the horizon.
    pub true_key_ticks: u64,
    /// true_key_ticks / predicted_key_ticks.
    pub precision: Option<f64>,
    /// Contended requests whose key was predicted at the last tick before.
    pub predicted_requests: u64,
    /// predicted_requests / contended requests.
    pub recall: Option<f64>,
}

impl ContentionPoint {
    fn finish(&mut self, contended_requests: u64) {
        let share = |part: u64, whole: u64| (whole > 0).then(|| part as f64 / whole as f64);
        self.precision = share(self.true_key_ticks, self.predicted_key_ticks);
        self.recall = share(self.predicted_requests, contended_requests);
    }
}

/// How well the contention estimate forecasts the trace's contended requests.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ContentionReport {
    pub requests: u64,
    pub contended_requests: u64,
    /// Distinct keys with at least one contended request.
    pub contended_keys: u64,
    /// The broker's default `allocator.contention_threshold`.
    pub threshold: f32,
    /// (key, evaluated tick) pairs with an estimate above 0.
    pub scored_key_ticks: u64,
    /// (key, evaluated tick) pairs contended within the horizon.
    pub positive_key_ticks: u64,
    /// Those of them without an estimate (scored as P = 0).
    pub unscored_positive_key_ticks: u64,
    /// None when the trace has no contended request.
    pub auc_pr: Option<f64>,
    pub brier: Option<f64>,
    /// For reference, the Brier score of one constant for every key-tick
    /// scored: the positive share among them, known in hindsight.
    pub brier_base_rate: Option<f64>,
    /// The estimator at `threshold`.
    pub estimator: ContentionPoint,
    /// "Contended within the last horizon".
    pub recent: ContentionPoint,
    /// The estimator's most probable key-ticks, as many as `recent` predicts
    /// (to the resolution of the score bins, 0.001): precision at the
    /// baseline's volume (no per-request recall).
    pub estimator_at_recent_volume: ContentionPoint,
}

impl ContentionReport {
    /// The text output's table.
    pub fn table(&self, horizon_ms: u64) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let optional = |v: Option<f64>, scale: f64, digits: usize| {
            v.map_or_else(|| "-".to_owned(), |v| format!("{:.*}", digits, v * scale))
        };
        let _ = writeln!(
            out,
            "\ncontention forecast: {} of {} requests contended ({}%), {} keys; label: a contended request within {} ms",
            self.contended_requests,
            self.requests,
            optional(
                (self.requests > 0).then(|| self.contended_requests as f64 / self.requests as f64),
                100.0,
                2
            ),
            self.contended_keys,
            horizon_ms
        );
        let _ = writeln!(
            out,
            "{:<28} {:>7} {:>7} {:>13} {:>7} {:>7}",
            "predictor", "AUC-PR", "Brier", "pred. k-ticks", "prec%", "recall%"
        );
        for (name, point, auc_pr, brier) in [
            (
                format!("estimator, P >= {}", self.threshold),
                &self.estimator,
                self.auc_pr,
                self.brier,
            ),
            (
                format!("contended in last {horizon_ms} ms"),
                &self.recent,
                None,
                None,
            ),
            (
                "estimator, same k-ticks".to_owned(),
                &self.estimator_at_recent_volume,
                None,
                None,
            ),
        ] {
            let _ = writeln!(
                out,
                "{:<28} {:>7} {:>7} {:>13} {:>7} {:>7}",
                name,
                optional(auc_pr, 1.0, 3),
                optional(brier, 1.0, 4),
                point.predicted_key_ticks,
                optional(point.precision, 100.0, 1),
                optional(point.recall, 100.0, 1)
            );
        }
        if let Some(brier) = self.brier_base_rate {
            let _ = writeln!(
                out,
                "(Brier of the positive share as a constant, in hindsight: {brier:.4}; recall: of contended requests, at the tick before)"
            );
        }
        out
    }
}

/// Replays `events` (with their `contended` flags) through a contention
/// estimator configured as the live predictor's, in `config`'s ticks, and
/// scores it every `eval_every_ticks` ticks; `threshold`: the broker's.
pub(super) fn score(
    events: &[TraceEvent],
    contended: &[bool],
    config: &PredictorConfig,
    eval_every_ticks: u64,
    threshold: f32,
) -> ContentionReport {
    assert_eq!(events.len(), contended.len());
    let mut report = ContentionReport {
        requests: events.len() as u64,
        contended_requests: contended.iter().filter(|&&c| c).count() as u64,
        contended_keys: events
            .iter()
            .zip(contended)
            .filter(|(_, c)| **c)
            .map(|(e, _)| e.key_hash)
            .collect::<HashSet<_>>()
            .len() as u64,
        threshold,
        ..ContentionReport::default()
    };
    let Some(first) = events.first() else {
        return report;
    };
    let tick_us = config.tick_us();
    let horizon_us = config.horizon_us();
    let mut estimator = ContentionEstimator::new(config.contention());
    let mut quality = Quality::new();
    let mut estimates: Vec<(u64, f32)> = Vec::new();
    // Keys at or above the threshold at the previous tick.
    let mut predicted: HashSet<u64, IdentityBuildHasher> = HashSet::default();
    // Baseline: each key's latest contended request, as of the previous tick.
    let mut last_contended_us: HashMap<u64, u64, IdentityBuildHasher> = HashMap::default();
    let mut contended_now: Vec<(u64, u64)> = Vec::new();
    let mut upcoming: HashSet<u64, IdentityBuildHasher> = HashSet::default();
    let mut previous_tick: Option<u64> = None;
    let mut now_us = first.ts_us - first.ts_us % tick_us;
    let mut next = 0usize;
    let mut tick_number = 0u64;
    loop {
        // The requests since the previous tick, against its predictions.
        contended_now.clear();
        while next < events.len() && events[next].ts_us <= now_us {
            let event = &events[next];
            if contended[next] {
                if let Some(tick) = previous_tick {
                    let recent = last_contended_us
                        .get(&event.key_hash)
                        .is_some_and(|&ts| ts + horizon_us > tick);
                    report.recent.predicted_requests += u64::from(recent);
                    report.estimator.predicted_requests +=
                        u64::from(predicted.contains(&event.key_hash));
                }
                contended_now.push((event.key_hash, event.ts_us));
            }
            estimator.record(event.ts_us, event.key_hash, contended[next]);
            next += 1;
        }
        last_contended_us.extend(contended_now.iter().copied());
        last_contended_us.retain(|_, ts| *ts + horizon_us > now_us);

        estimator.contended(now_us, 0.0, &mut estimates);
        predicted.clear();
        predicted.extend(
            estimates
                .iter()
                .take_while(|(_, p)| *p >= threshold)
                .map(|&(key_hash, _)| key_hash),
        );

        if tick_number % eval_every_ticks.max(1) == 0 {
            // Labels: keys with a contended request in (now, now + horizon].
            upcoming.clear();
            let mut j = next;
            while j < events.len() && events[j].ts_us <= now_us + horizon_us {
                if contended[j] {
                    upcoming.insert(events[j].key_hash);
                }
                j += 1;
            }
            report.positive_key_ticks += upcoming.len() as u64;
            let mut scored_positives = 0u64;
            for &(key_hash, p) in &estimates {
                let label = upcoming.contains(&key_hash);
                quality.add(p, label);
                scored_positives += u64::from(label);
                if p >= threshold {
                    report.estimator.predicted_key_ticks += 1;
                    report.estimator.true_key_ticks += u64::from(label);
                }
            }
            report.scored_key_ticks += estimates.len() as u64;
            report.unscored_positive_key_ticks += upcoming.len() as u64 - scored_positives;
            for key_hash in last_contended_us.keys() {
                report.recent.predicted_key_ticks += 1;
                report.recent.true_key_ticks += u64::from(upcoming.contains(key_hash));
            }
        }

        if next >= events.len() {
            break;
        }
        previous_tick = Some(now_us);
        now_us += tick_us;
        tick_number += 1;
    }
    if report.contended_requests > 0 {
        quality.unscored_positives = report.unscored_positive_key_ticks;
        let (auc_pr, brier) = quality.result();
        report.auc_pr = Some(auc_pr);
        report.brier = Some(brier);
        let total = report.scored_key_ticks + report.unscored_positive_key_ticks;
        let q = report.positive_key_ticks as f64 / total.max(1) as f64;
        report.brier_base_rate = Some(q * (1.0 - q));
    }
    report.estimator_at_recent_volume = top_of_bins(&quality, report.recent.predicted_key_ticks);
    let contended_requests = report.contended_requests;
    report.estimator.finish(contended_requests);
    report.recent.finish(contended_requests);
    report
}

/// The key-ticks in `quality`'s highest bins, down to the first bin at which
/// they number at least `volume`.
fn top_of_bins(quality: &Quality, volume: u64) -> ContentionPoint {
    let mut point = ContentionPoint::default();
    for bin in (1..quality.positives.len()).rev() {
        if point.predicted_key_ticks >= volume {
            break;
        }
        point.predicted_key_ticks += quality.positives[bin] + quality.negatives[bin];
        point.true_key_ticks += quality.positives[bin];
    }
    point.finish(0);
    point
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(ts_us: u64, client: u32, key: u64, mode: Mode, hold_us: u64) -> TraceEvent {
        TraceEvent {
            ts_us,
            client,
            key_hash: key,
            mode,
            hold_us,
        }
    }

    use Mode::{Exclusive as X, Shared as S};

    #[test]
    fn contended_flags_on_a_hand_made_trace() {
        let events = [
            event(0, 0, 1, X, 100),  // 0: free
            event(50, 1, 1, S, 10),  // 1: X by 0 until 100: contended
            event(50, 0, 1, X, 10),  // 2: own hold; S by 1 until 60: contended
            event(60, 2, 1, S, 100), // 3: X by 0 until 100: contended
            event(100, 1, 1, S, 5),  // 4: X released at 100; S by 2 is shared: free
            event(100, 3, 2, S, 50), // 5: another key: free
            event(120, 4, 2, S, 50), // 6: shared with shared: free
            event(130, 4, 2, X, 10), // 7: S by 3 until 150: contended
            event(200, 5, 3, X, 10), // 8: free
            event(200, 5, 3, X, 10), // 9: same client, same time: not contended
            event(205, 6, 3, S, 1),  // 10: X by 5 until 210: contended
            event(210, 6, 3, X, 1),  // 11: held until 210 exclusive of 210: free
            event(210, 7, 3, S, 1),  // 12: X by 6 until 211, same ts, earlier row: contended
        ];
        let expected = [
            false, true, true, true, false, false, false, true, false, false, true, false, true,
        ];
        assert_eq!(contended_flags(&events), expected);
    }

    #[test]
    fn the_latest_release_by_another_client_survives_many_clients() {
        let mut latest = LatestReleases::default();
        for (until, client) in [(10, 0), (30, 1), (20, 2), (25, 0), (40, 1), (35, 3)] {
            latest.add(until, client);
        }
        assert_eq!(latest.latest_release_by_other_than(1), 35);
        assert_eq!(latest.latest_release_by_other_than(3), 40);
        assert_eq!(latest.latest_release_by_other_than(0), 40);
        let mut one_client = LatestReleases::default();
        one_client.add(100, 0);
        assert_eq!(one_client.latest_release_by_other_than(0), 0);
        assert_eq!(one_client.latest_release_by_other_than(9), 100);
    }

    #[test]
    fn a_steadily_contended_key_is_forecast_and_a_lone_client_never_is() {
        // Two clients take key 1 exclusively every 20 ms, each for 15 ms,
        // 10 ms apart: every request but the first is contended.
        let mut events = Vec::new();
        for i in 0..500u64 {
            events.push(event(i * 10_000, (i % 2) as u32, 1, X, 15_000));
            events.push(event(i * 10_000 + 3_000, 9, 2, X, 15_000)); // alone
        }
        let flags = contended_flags(&events);
        let report = score(&events, &flags, &PredictorConfig::default(), 10, 0.5);
        assert_eq!(report.requests, 1000);
        assert_eq!(report.contended_requests, 499);
        assert_eq!(report.contended_keys, 1);
        let auc_pr = report.auc_pr.unwrap();
        assert!(auc_pr > 0.9, "{auc_pr}");
        let recall = report.estimator.recall.unwrap();
        assert!(recall > 0.9, "{recall}");
        // Key 2 is never predicted; key 1's label is false only at the last tick.
        for precision in [report.estimator.precision, report.recent.precision] {
            assert!(precision.unwrap() > 0.9, "{precision:?}");
        }
        assert!(report.table(500).contains("contention forecast"));

        let lone: Vec<TraceEvent> = events.iter().filter(|e| e.client == 9).copied().collect();
        let report = score(
            &lone,
            &contended_flags(&lone),
            &PredictorConfig::default(),
            10,
            0.5,
        );
        assert_eq!(report.contended_requests, 0);
        assert_eq!((report.auc_pr, report.estimator.recall), (None, None));
        assert_eq!(report.estimator.predicted_key_ticks, 0);
    }
}
