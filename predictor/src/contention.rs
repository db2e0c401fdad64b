//! P(a key is contended within the horizon): some request for it finds it
//! held and queues (`Outcome::Contended` in the access-event rings).
//!
//! The estimator treats a key's requests as a Poisson stream of rate `r`, each
//! request contended with probability `s`, independently. Contended requests
//! are then Poisson of rate `r * s`, and
//!
//! ```text
//! P(contended within horizon h) = 1 - exp(-r * s * h)
//! ```
//!
//! - `r`: requests (fast-path hits, slow-path grants, contended) counted with
//!   exponential decay at the horizon's time scale, divided by that scale; it
//!   follows the key's current activity, so the prediction falls within a few
//!   horizons once the key goes quiet;
//! - `s`: contended / (requests + 1), both decayed at `window` (default 30 s):
//!   the key's contention share over a longer memory, shrunk towards 0 while
//!   few requests have been seen (the +1 is one pseudo-request, uncontended).
//!
//! Bounded memory: a key gets a row at its first contended request only (a key
//! never contended has P = 0 and costs nothing), at most `max_keys` rows; a new
//! key in a full table replaces the least recently seen row (an O(rows) scan,
//! only when a never-tracked key is contended while the table is full). Rows
//! idle for more than ten windows are dropped at [`ContentionEstimator::contended`].
//!
//! [`ContentionEstimator::merge_into`] builds the score table's entries: the
//! top keys by access score, each with its contention probability, then the
//! keys predicted contended that are not among them, so that the broker learns
//! of them whatever their access score.

use shm_layout::scores::Scored;
use std::collections::HashMap;

/// One pseudo-request, uncontended, in the share's denominator.
const SHARE_PRIOR: f32 = 1.0;
/// Rows idle for this many windows are forgotten.
const FORGET_AFTER_WINDOWS: u64 = 10;

/// Settings of [`ContentionEstimator`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ContentionConfig {
    /// The horizon of the prediction, and the time scale of the request rate.
    pub horizon_us: u64,
    /// Time scale of the contention share.
    pub window_us: u64,
    /// At most this many keys are tracked.
    pub max_keys: usize,
}

#[derive(Debug, Clone, Copy)]
struct Row {
    key_hash: u64,
    /// Time of the latest request seen; the counts below are as of then.
    last_us: u64,
    /// Requests decayed at the horizon's scale.
    requests_recent: f32,
    /// Requests and contended requests decayed at the window's scale.
    requests: f32,
    contended: f32,
}

impl Row {
    fn probability(&self, now_us: u64, config: &ContentionConfig) -> f32 {
        let age = now_us.saturating_sub(self.last_us) as f64;
        let horizon = config.horizon_us.max(1) as f64;
        let window = config.window_us.max(1) as f64;
        let recent = f64::from(self.requests_recent) * (-age / horizon).exp();
        let decay = (-age / window).exp();
        let share = f64::from(self.contended) * decay
            / (f64::from(self.requests) * decay + f64::from(SHARE_PRIOR));
        // r * h = (recent / horizon) * horizon.
        let expected_contended = recent * share.clamp(0.0, 1.0);
        let p = 1.0 - (-expected_contended).exp();
        if p.is_finite() {
            p.clamp(0.0, 1.0) as f32
        } else {
            0.0
        }
    }
}

/// Per-key P(contended within the horizon) from the request stream.
#[derive(Debug, Clone)]
pub struct ContentionEstimator {
    config: ContentionConfig,
    rows: Vec<Row>,
    row_of: HashMap<u64, usize>,
    /// Scratch for [`ContentionEstimator::merge_into`]: contended key ->
    /// (probability, already written).
    merge: HashMap<u64, (f32, bool)>,
}

impl ContentionEstimator {
    pub fn new(config: ContentionConfig) -> ContentionEstimator {
        assert!(config.max_keys > 0, "max_keys must be at least 1");
        ContentionEstimator {
            config,
            rows: Vec::new(),
            row_of: HashMap::new(),
            merge: HashMap::new(),
        }
    }

    /// Keys tracked now (at most `max_keys`).
    pub fn tracked(&self) -> usize {
        self.rows.len()
    }

    /// A request for `key_hash` at `ts_us`; `contended`: it found the key held
    /// and queued. Out-of-order timestamps count as the latest one seen.
    pub fn record(&mut self, ts_us: u64, key_hash: u64, contended: bool) {
        let index = match self.row_of.get(&key_hash) {
            Some(&index) => index,
            None if !contended => return,
            None => self.insert(ts_us, key_hash),
        };
        let row = &mut self.rows[index];
        let age = ts_us.saturating_sub(row.last_us) as f64;
        let recent = (-age / self.config.horizon_us.max(1) as f64).exp() as f32;
        let decay = (-age / self.config.window_us.max(1) as f64).exp() as f32;
        row.requests_recent = row.requests_recent * recent + 1.0;
        row.requests = row.requests * decay + 1.0;
        row.contended = row.contended * decay + if contended { 1.0 } else { 0.0 };
        row.last_us = row.last_us.max(ts_us);
    }

    fn insert(&mut self, ts_us: u64, key_hash: u64) -> usize {
        let row = Row {
            key_hash,
            last_us: ts_us,
            requests_recent: 0.0,
            requests: 0.0,
            contended: 0.0,
        };
        if self.rows.len() < self.config.max_keys {
            self.rows.push(row);
            self.row_of.insert(key_hash, self.rows.len() - 1);
            return self.rows.len() - 1;
        }
        let victim = self
            .rows
            .iter()
            .enumerate()
            .min_by_key(|(_, r)| r.last_us)
            .map(|(i, _)| i)
            .expect("a full table has rows");
        self.row_of.remove(&self.rows[victim].key_hash);
        self.rows[victim] = row;
        self.row_of.insert(key_hash, victim);
        victim
    }

    /// P(the key is contended within the horizon) at `now_us`; 0 for a key
    /// not tracked.
    pub fn probability_of(&self, key_hash: u64, now_us: u64) -> f32 {
        self.row_of
            .get(&key_hash)
            .map_or(0.0, |&i| self.rows[i].probability(now_us, &self.config))
    }

    /// The keys whose probability at `now_us` is at least `min_probability`
    /// (and above 0), most likely first, into `out`; forgets rows idle past
    /// ten windows.
    pub fn contended(&mut self, now_us: u64, min_probability: f32, out: &mut Vec<(u64, f32)>) {
        let forget_us = self.config.window_us.saturating_mul(FORGET_AFTER_WINDOWS);
        let mut i = 0;
        while i < self.rows.len() {
            if now_us.saturating_sub(self.rows[i].last_us) > forget_us {
                self.row_of.remove(&self.rows[i].key_hash);
                self.rows.swap_remove(i);
                if let Some(moved) = self.rows.get(i) {
                    self.row_of.insert(moved.key_hash, i);
                }
            } else {
                i += 1;
            }
        }
        out.clear();
        for row in &self.rows {
            let p = row.probability(now_us, &self.config);
            if p >= min_probability && p > 0.0 {
                out.push((row.key_hash, p));
            }
        }
        out.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    }

    /// The score table's entries, at most `capacity`, into `out`: `top` (keys
    /// by access score, best first) with each key's contention probability
    /// from `contended` (as from [`ContentionEstimator::contended`]), then the
    /// contended keys not in `top`, with their access score from
    /// `access_score`. Contended keys get room for up to half the capacity:
    /// `top` is cut from its low end if need be.
    pub fn merge_into(
        &mut self,
        top: &[(u64, f32)],
        contended: &[(u64, f32)],
        capacity: usize,
        access_score: impl Fn(u64) -> f32,
        out: &mut Vec<Scored>,
    ) {
        out.clear();
        let contended = &contended[..contended.len().min(capacity / 2)];
        let top = &top[..top.len().min(capacity - contended.len())];
        if contended.is_empty() {
            out.extend(top.iter().map(|&entry| Scored::from(entry)));
            return;
        }
        self.merge.clear();
        self.merge.extend(
            contended
                .iter()
                .map(|&(key_hash, p)| (key_hash, (p, false))),
        );
        for &(key_hash, score) in top {
            let contention = match self.merge.get_mut(&key_hash) {
                Some((p, written)) => {
                    *written = true;
                    *p
                }
                None => 0.0,
            };
            out.push(Scored {
                key_hash,
                score,
                contention,
            });
        }
        for &(key_hash, contention) in contended {
            if self
                .merge
                .get(&key_hash)
                .is_some_and(|&(_, written)| written)
            {
                continue;
            }
            out.push(Scored {
                key_hash,
                score: access_score(key_hash),
                contention,
            });
        }
        debug_assert!(out.len() <= capacity);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1000;

    fn estimator(max_keys: usize) -> ContentionEstimator {
        ContentionEstimator::new(ContentionConfig {
            horizon_us: 500 * MS,
            window_us: 30_000 * MS,
            max_keys,
        })
    }

    #[test]
    fn a_key_never_contended_costs_no_row_and_is_not_predicted() {
        let mut e = estimator(16);
        for i in 0..1000 {
            e.record(i * MS, 7, false);
        }
        assert_eq!(e.tracked(), 0);
        assert_eq!(e.probability_of(7, 1000 * MS), 0.0);
    }

    #[test]
    fn a_busy_key_contended_half_the_time_is_predicted_contended() {
        let mut e = estimator(16);
        // Two workers, 200 requests/s in all, every other one queues.
        for i in 0..2000u64 {
            e.record(i * 5 * MS, 1, i % 2 == 1);
        }
        let p = e.probability_of(1, 10_000 * MS);
        assert!(p > 0.99, "{p}");
        let mut out = vec![];
        e.contended(10_000 * MS, 0.5, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].0, 1);
    }

    #[test]
    fn a_key_rarely_contended_is_unlikely_to_be_contended_within_the_horizon() {
        let mut e = estimator(16);
        // 10 requests/s, one in a hundred queues: 0.05 contended per 500 ms.
        for i in 0..3000u64 {
            e.record(i * 100 * MS, 2, i % 100 == 0);
        }
        let p = e.probability_of(2, 300_000 * MS);
        assert!((0.01..0.15).contains(&p), "{p}");
    }

    #[test]
    fn the_prediction_fades_once_the_key_goes_quiet_and_the_row_is_forgotten() {
        let mut e = estimator(16);
        for i in 0..200u64 {
            e.record(i * 5 * MS, 3, true);
        }
        let last = 200 * 5 * MS;
        assert!(e.probability_of(3, last) > 0.99);
        assert!(e.probability_of(3, last + 5_000 * MS) < 0.05);
        let mut out = vec![];
        e.contended(last + 301_000 * MS, 0.0, &mut out);
        assert!(out.is_empty());
        assert_eq!(e.tracked(), 0, "idle for more than ten windows");
    }

    #[test]
    fn memory_is_bounded_and_the_least_recently_seen_key_goes_first() {
        let mut e = estimator(3);
        for key in 0..3u64 {
            e.record(key * MS, key, true);
        }
        e.record(10 * MS, 0, false); // key 0 seen again: key 1 is now the oldest
        e.record(11 * MS, 99, true);
        assert_eq!(e.tracked(), 3);
        assert_eq!(e.probability_of(1, 12 * MS), 0.0, "evicted");
        for key in [0, 2, 99] {
            assert!(e.probability_of(key, 12 * MS) > 0.0, "{key} kept");
        }
    }

    #[test]
    fn out_of_order_and_extreme_timestamps_never_give_nonsense() {
        let mut e = estimator(4);
        e.record(u64::MAX, 5, true);
        e.record(0, 5, true);
        e.record(u64::MAX / 2, 5, false);
        for now in [0, 1, u64::MAX / 2, u64::MAX] {
            let p = e.probability_of(5, now);
            assert!((0.0..=1.0).contains(&p), "{p} at {now}");
        }
    }

    #[test]
    fn entries_carry_contention_and_contended_keys_outside_the_top_are_appended() {
        let mut e = estimator(4);
        let top = [(10, 0.9), (11, 0.8), (12, 0.7)];
        let contended = [(11, 0.95), (50, 0.6)];
        let mut out = vec![];
        e.merge_into(
            &top,
            &contended,
            8,
            |h| if h == 50 { 0.02 } else { 0.0 },
            &mut out,
        );
        let entry = |key_hash, score, contention| Scored {
            key_hash,
            score,
            contention,
        };
        assert_eq!(
            out,
            vec![
                entry(10, 0.9, 0.0),
                entry(11, 0.8, 0.95),
                entry(12, 0.7, 0.0),
                entry(50, 0.02, 0.6)
            ]
        );
    }

    #[test]
    fn a_full_table_makes_room_for_contended_keys_from_the_low_end_of_the_top() {
        let mut e = estimator(4);
        let top: Vec<(u64, f32)> = (0..8).map(|k| (k, 1.0 - k as f32 / 10.0)).collect();
        let contended = [(100, 0.9), (101, 0.8), (102, 0.7), (103, 0.6), (104, 0.5)];
        let mut out = vec![];
        e.merge_into(&top, &contended, 8, |_| 0.0, &mut out);
        let keys: Vec<u64> = out.iter().map(|s| s.key_hash).collect();
        assert_eq!(keys, vec![0, 1, 2, 3, 100, 101, 102, 103], "half for each");
        e.merge_into(&top, &[], 8, |_| 0.0, &mut out);
        assert_eq!(out.len(), 8, "no contention: the top fills the table");
    }
}
