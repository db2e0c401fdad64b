//! The resource allocator's POLICY: which keys to prepare, which preparations to
//! reclaim, which idle slots to evict. Pure: no I/O, no shared memory, no clock.
//! The live broker (which owns the slots) and `forelock replay` (which simulates
//! them) call the same code.
//!
//! # How the broker calls it, every tick (default 10 ms)
//!
//! ```text
//! let mut policy: Box<dyn Policy> = Box::new(Predictive::new(PredictiveConfig::default()));
//! //  or Box::new(KeepAlive { keep_alive_us: 500_000 }) when no predictor runs
//! let mut actions = Vec::new();
//! loop {                                    // each tick
//!     let input = TickInput {
//!         now_us,                           // the broker's monotonic clock
//!         budget_slots,                     // slots the allocator may keep prepared
//!         slots: &slot_views,               // EVERY prepared slot (held or idle), with its score
//!         candidates: &scores,              // scored keys NOT currently prepared, any order
//!         feedback: &feedback,              // cumulative counters since start
//!         load,                             // 0.0 (idle) ..= 1.0 (saturated) broker busy fraction
//!     };
//!     policy.tick(&input, &mut actions);    // clears `actions`, then fills it
//!     for action in &actions { /* apply in order */ }
//! }
//! ```
//!
//! - `Action::Prepare { key_hash }`: allocate a slot for the key, initialise it,
//!   touch its cache lines. The key text comes from the broker's hash -> key map;
//!   skip the action if the key is unknown, already prepared, or no slot is free.
//! - `Action::Reclaim { slot, key_hash }`: the preparation went unused (or the
//!   slot idle) past its timeout and its score is below the threshold: free it.
//! - `Action::Evict { slot, key_hash }`: budget pressure; free this idle slot,
//!   the lowest scored. Reclaim and Evict name only slots that were idle (not
//!   held) in the input; the broker re-checks under its own lock and skips the
//!   action if the slot has been taken since.
//! - `Action::PrepareContention { key_hash }`: the key is predicted contended
//!   (its contention probability is at or above `contention_threshold`):
//!   prepare its contention-resolution state: place its slot as for `Prepare`
//!   if it has none, and reserve its waiter queue. Named once per slot: a slot
//!   whose `SlotView::contention_prepared` is set gets no second one.
//!
//! # Contended keys
//!
//! With `PredictiveConfig::contention_threshold > 0`, a slot whose key is
//! predicted contended is neither reclaimed (whatever its timeouts) nor
//! displaced by a candidate; under budget pressure it is evicted only after
//! every other idle slot (its eviction rank is `1 + contention`, above any
//! access score). A predicted-contended candidate without a slot takes a free
//! slot within the budget before the access-score candidates; it does not
//! evict anything to get one. `KeepAlive` ignores contention (it runs without
//! a forecaster).
//!
//! # The tie rule
//!
//! `Predictive`'s orders are total, so its actions depend on the slots and
//! candidates it is shown, never on the order it is shown them in:
//! - eviction victims, lowest first, by [`victim_order`]: score, then last
//!   activity (least recent first), then key hash (lower first);
//! - candidates (and predicted-contended candidates), best first, by
//!   [`rank_order`]: probability (contention probability) descending, then
//!   key hash (lower first), the order in which the forecaster ranks its top
//!   keys for the score file.
//!
//! The key hash breaks ties because it names a key the same way in the
//! forecaster, the score file, the broker and `forelock replay`, where slot
//! numbers are each broker's (or simulation's) own bookkeeping; xxh3 spreads
//! it, so no class of keys wins ties. Before this rule, ties (frequent: idle
//! slots of score 0 last used in the same millisecond) went the way the
//! standard library's unstable selection left them, which depended on the
//! slot order and so on every earlier eviction.
//!
//! Scores are advisory (the predictor may die, lag, or write nonsense): a NaN, a
//! negative or a > 1 probability counts as 0, and `SlotView::score = None` means
//! "no score" (also 0). With no scores at all, `Predictive` degrades to
//! reclaiming idle slots after `idle_timeout_us`, like `KeepAlive`.
//!
//! # Feedback and the adaptive threshold
//!
//! The broker counts, cumulatively ([`Feedback`]): hits (a request found its key
//! prepared), misses (slow path), late (the request arrived while its key was
//! being prepared), prepared (Prepare actions carried out) and wasted (a slot
//! prepared by a Prepare action and freed without serving a single request).
//! Every `control_period_us`, [`Predictive`] looks at the deltas: it raises the
//! threshold (x1.1) when the wasted share `wasted / prepared` is above target,
//! lowers it (/1.1) when
//! waste is on target but the hit rate `hits / (hits + misses + late)` is below
//! target, and under load (`load >= load_high`) raises it (x1.25) and prepares at
//! most a quarter as many keys per tick. Set `adaptive = false` for a fixed
//! threshold (the replay's threshold sweep does).

pub use shm_layout::scores::rank_order;

/// One prepared slot as the broker sees it this tick.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SlotView {
    /// The broker's slot number, echoed back in Reclaim/Evict.
    pub slot: u32,
    pub key_hash: u64,
    /// When the slot was prepared (by a Prepare action or by the slow path).
    pub prepared_at_us: u64,
    /// Time of the last grant on this slot, if any since it was prepared.
    pub last_use_us: Option<u64>,
    /// Grants since the slot was prepared.
    pub uses_since_prepared: u32,
    /// Held (or with waiters) right now: never reclaimed or evicted.
    pub held: bool,
    /// The key's latest score, if the predictor gave one.
    pub score: Option<f32>,
    /// The key's latest P(contended within the horizon), if the predictor gave one.
    pub contention: Option<f32>,
    /// The broker already prepared this slot's contention state.
    pub contention_prepared: bool,
}

/// A scored key that is not prepared.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Score {
    pub key_hash: u64,
    /// P(key requested within the horizon).
    pub probability: f32,
    /// P(key contended within the horizon); 0 when none is predicted.
    pub contention: f32,
}

/// What the policy asks the broker to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Prepare { key_hash: u64 },
    Reclaim { slot: u32, key_hash: u64 },
    Evict { slot: u32, key_hash: u64 },
    PrepareContention { key_hash: u64 },
}

/// Cumulative counters kept by the broker (monotonic; the policy takes deltas).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Feedback {
    /// Requests that found their key prepared (fast path).
    pub hits: u64,
    /// Requests that took the slow path because their key was not prepared.
    pub misses: u64,
    /// Requests that arrived while their key was being prepared.
    pub late: u64,
    /// Slots prepared by Prepare actions.
    pub prepared: u64,
    /// Slots prepared by Prepare actions and freed (reclaimed or evicted)
    /// without serving a single request.
    pub wasted: u64,
}

/// Everything the policy sees in one tick.
#[derive(Debug, Clone, Copy)]
pub struct TickInput<'a> {
    pub now_us: u64,
    pub budget_slots: usize,
    pub slots: &'a [SlotView],
    pub candidates: &'a [Score],
    pub feedback: &'a Feedback,
    /// Broker busy fraction, 0.0 ..= 1.0 (event-loop utilisation, queue depth share).
    pub load: f32,
}

/// A preparation policy. `tick` clears `actions` and fills it.
pub trait Policy: Send {
    fn tick(&mut self, input: &TickInput<'_>, actions: &mut Vec<Action>);
    /// The current score threshold (0 for policies that use none).
    fn threshold(&self) -> f32;
    fn name(&self) -> &'static str;
    /// Whether the policy wants `candidate` (a key without a slot) prepared:
    /// its probability clears the threshold or it is predicted contended.
    /// The same rule as `tick`'s, for the broker's "late, not missed" count.
    fn wants(&self, _candidate: &Score) -> bool {
        false
    }
    /// Whether a slot whose contention probability is `contention` keeps its
    /// contention state prepared (the same rule as `tick`'s).
    fn predicts_contended(&self, _contention: Option<f32>) -> bool {
        false
    }
}

/// Counters a policy keeps about its own decisions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PolicyStats {
    pub prepares: u64,
    pub reclaims: u64,
    pub evictions: u64,
    /// Scores that were NaN or outside [0, 1] (taken as 0).
    pub invalid_scores: u64,
    pub threshold_raises: u64,
    pub threshold_lowerings: u64,
    /// PrepareContention actions.
    pub contention_prepares: u64,
}

/// The stand-in policy with no predictor: a slot stays prepared for
/// `keep_alive_us` after its last use (or after it was prepared, if unused),
/// and under budget pressure the least recently used idle slots go first.
/// It never prepares: the slow path prepares a key on a miss.
#[derive(Debug, Clone, Default)]
pub struct KeepAlive {
    pub keep_alive_us: u64,
    pub stats: PolicyStats,
}

impl KeepAlive {
    pub fn new(keep_alive_us: u64) -> KeepAlive {
        KeepAlive {
            keep_alive_us,
            stats: PolicyStats::default(),
        }
    }
}

fn last_activity_us(slot: &SlotView) -> u64 {
    slot.last_use_us
        .unwrap_or(slot.prepared_at_us)
        .max(slot.prepared_at_us)
}

impl Policy for KeepAlive {
    fn tick(&mut self, input: &TickInput<'_>, actions: &mut Vec<Action>) {
        actions.clear();
        let mut kept = 0usize;
        let mut idle_kept: Vec<(u64, usize)> = Vec::new();
        for (index, slot) in input.slots.iter().enumerate() {
            if slot.held {
                kept += 1;
                continue;
            }
            let last = last_activity_us(slot);
            if input.now_us.saturating_sub(last) > self.keep_alive_us {
                actions.push(Action::Reclaim {
                    slot: slot.slot,
                    key_hash: slot.key_hash,
                });
                self.stats.reclaims += 1;
            } else {
                kept += 1;
                idle_kept.push((last, index));
            }
        }
        if kept > input.budget_slots {
            let excess = (kept - input.budget_slots).min(idle_kept.len());
            if excess > 0 && excess < idle_kept.len() {
                idle_kept.select_nth_unstable(excess - 1);
            }
            for &(_, index) in &idle_kept[..excess] {
                let slot = &input.slots[index];
                actions.push(Action::Evict {
                    slot: slot.slot,
                    key_hash: slot.key_hash,
                });
                self.stats.evictions += 1;
            }
        }
    }
    fn threshold(&self) -> f32 {
        0.0
    }
    fn name(&self) -> &'static str {
        "keep-alive"
    }
}

/// Settings of [`Predictive`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PredictiveConfig {
    /// Prepare keys whose probability is at least this (start value if adaptive).
    pub threshold_initial: f32,
    pub threshold_min: f32,
    pub threshold_max: f32,
    /// Adapt the threshold to the targets below; false keeps it fixed.
    pub adaptive: bool,
    /// A slot prepared and never used is reclaimed after this, unless its score
    /// is still at or above the threshold.
    pub unused_timeout_us: u64,
    /// A used slot idle for this long is reclaimed unless its score is at or above
    /// the threshold.
    pub idle_timeout_us: u64,
    /// Target for wasted / prepared.
    pub waste_share_target: f32,
    /// Target for hits / (hits + misses + late).
    pub hit_rate_target: f32,
    pub control_period_us: u64,
    /// At most this many Prepare actions per tick (a quarter of it under load).
    pub prepares_per_tick_max: usize,
    /// Load at or above which the policy backs off.
    pub load_high: f32,
    /// A candidate displaces an idle slot only if its probability beats the
    /// slot's score by this much (hysteresis against churn).
    pub eviction_margin: f32,
    /// Prepare the contention state of keys whose P(contended within the
    /// horizon) is at least this, and keep their slots (see the module docs).
    /// 0 turns contention preparation off.
    pub contention_threshold: f32,
}

impl Default for PredictiveConfig {
    fn default() -> Self {
        PredictiveConfig {
            threshold_initial: 0.3,
            threshold_min: 0.02,
            threshold_max: 0.95,
            adaptive: true,
            unused_timeout_us: 1_000_000,
            idle_timeout_us: 500_000,
            waste_share_target: 0.5,
            hit_rate_target: 0.9,
            control_period_us: 1_000_000,
            prepares_per_tick_max: 4096,
            load_high: 0.8,
            eviction_margin: 0.05,
            contention_threshold: 0.5,
        }
    }
}

/// The order of eviction victims, lowest first (see "The tie rule" in the
/// module docs): `(score, last_activity_us, key_hash)` ascending, the score
/// as `f32::total_cmp` orders it. `forelock replay` ranks its simulated
/// slots with it.
pub fn victim_order(a: (f32, u64, u64), b: (f32, u64, u64)) -> std::cmp::Ordering {
    a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2))
}

/// An idle slot `Predictive` may evict: its rank for [`victim_order`] and
/// its index in the tick's slots.
#[derive(Debug, Clone, Copy)]
struct Victim {
    rank: (f32, u64, u64),
    index: usize,
}

/// Prepares keys above an adaptive threshold, reclaims preparations unused past
/// a timeout, evicts the lowest-scored idle slots under budget pressure.
#[derive(Debug, Clone)]
pub struct Predictive {
    pub config: PredictiveConfig,
    threshold: f32,
    feedback_at_last_control: Feedback,
    last_control_us: Option<u64>,
    pub stats: PolicyStats,
    victims: Vec<Victim>,
    wanted: Vec<Score>,
    contended: Vec<Score>,
}

/// Keep the `max` best of `scores` by [`rank_order`] on the
/// `(probability, key_hash)` that `rank` gives each, sorted best first.
fn best_first(scores: &mut Vec<Score>, max: usize, rank: impl Fn(&Score) -> (f32, u64)) {
    let order = |a: &Score, b: &Score| rank_order(rank(a), rank(b));
    if scores.len() > max {
        if max == 0 {
            scores.clear();
        } else {
            scores.select_nth_unstable_by(max - 1, &order);
            scores.truncate(max);
        }
    }
    scores.sort_unstable_by(order);
}

/// A probability in [0, 1], or `None` (NaN, out of range).
fn in_range(probability: f32) -> Option<f32> {
    (0.0..=1.0).contains(&probability).then_some(probability)
}

/// The probability if valid, else 0 (counted).
fn valid(probability: f32, stats: &mut PolicyStats) -> f32 {
    in_range(probability).unwrap_or_else(|| {
        stats.invalid_scores += 1;
        0.0
    })
}

impl Predictive {
    pub fn new(config: PredictiveConfig) -> Predictive {
        assert!(
            config.threshold_min <= config.threshold_max,
            "threshold_min must not exceed threshold_max"
        );
        Predictive {
            threshold: config
                .threshold_initial
                .clamp(config.threshold_min, config.threshold_max),
            config,
            feedback_at_last_control: Feedback::default(),
            last_control_us: None,
            stats: PolicyStats::default(),
            victims: Vec::new(),
            wanted: Vec::new(),
            contended: Vec::new(),
        }
    }

    /// The valid contention probability if it is at or above the contention
    /// threshold (so the key's contention state is to be prepared and kept).
    fn predicted_contended(&mut self, contention: Option<f32>) -> Option<f32> {
        if self.config.contention_threshold <= 0.0 {
            return None;
        }
        let contention = valid(contention?, &mut self.stats);
        self.clears_contention(contention).then_some(contention)
    }

    /// Whether a valid contention probability clears the contention threshold.
    fn clears_contention(&self, contention: f32) -> bool {
        let threshold = self.config.contention_threshold;
        threshold > 0.0 && contention >= threshold
    }

    /// Whether a valid access probability clears the threshold.
    fn clears_threshold(&self, probability: f32) -> bool {
        probability >= self.threshold && probability > 0.0
    }

    fn control(&mut self, input: &TickInput<'_>) {
        let Some(last_control_us) = self.last_control_us else {
            self.last_control_us = Some(input.now_us);
            self.feedback_at_last_control = *input.feedback;
            return;
        };
        if input.now_us.saturating_sub(last_control_us) < self.config.control_period_us {
            return;
        }
        let before = self.feedback_at_last_control;
        let now = *input.feedback;
        let hits = now.hits.saturating_sub(before.hits) as f64;
        let misses = now.misses.saturating_sub(before.misses) as f64;
        let late = now.late.saturating_sub(before.late) as f64;
        let wasted = now.wasted.saturating_sub(before.wasted) as f64;
        let prepared = now.prepared.saturating_sub(before.prepared) as f64;
        self.last_control_us = Some(input.now_us);
        self.feedback_at_last_control = now;
        if !self.config.adaptive {
            return;
        }
        let (low, high) = (self.config.threshold_min, self.config.threshold_max);
        if input.load >= self.config.load_high {
            self.threshold = (self.threshold * 1.25).clamp(low, high);
            self.stats.threshold_raises += 1;
            return;
        }
        let waste_share = if prepared > 0.0 {
            (wasted / prepared).min(1.0)
        } else {
            0.0
        };
        let requests = hits + misses + late;
        let hit_rate = if requests > 0.0 { hits / requests } else { 1.0 };
        if waste_share > f64::from(self.config.waste_share_target) {
            self.threshold = (self.threshold * 1.1).clamp(low, high);
            self.stats.threshold_raises += 1;
        } else if hit_rate < f64::from(self.config.hit_rate_target) && requests > 0.0 {
            self.threshold = (self.threshold / 1.1).clamp(low, high);
            self.stats.threshold_lowerings += 1;
        }
    }
}

impl Policy for Predictive {
    fn tick(&mut self, input: &TickInput<'_>, actions: &mut Vec<Action>) {
        actions.clear();
        self.control(input);
        let threshold = self.threshold;
        let now = input.now_us;

        // 1. Reclaim what went unused or idle past its timeout and is not wanted.
        //    Keys predicted contended get their contention state prepared (held
        //    ones too: the queue may be needed now) and are kept.
        self.victims.clear();
        let mut kept = 0usize;
        for (index, slot) in input.slots.iter().enumerate() {
            let contended = self.predicted_contended(slot.contention);
            if contended.is_some() && !slot.contention_prepared {
                actions.push(Action::PrepareContention {
                    key_hash: slot.key_hash,
                });
                self.stats.contention_prepares += 1;
            }
            if slot.held {
                kept += 1;
                continue;
            }
            if let Some(contention) = contended {
                // Ranked above every access score: evicted last, never displaced.
                kept += 1;
                self.victims.push(Victim {
                    rank: (1.0 + contention, last_activity_us(slot), slot.key_hash),
                    index,
                });
                continue;
            }
            let score = slot.score.map_or(0.0, |p| valid(p, &mut self.stats));
            let expired = if slot.uses_since_prepared == 0 {
                now.saturating_sub(slot.prepared_at_us) > self.config.unused_timeout_us
            } else {
                now.saturating_sub(last_activity_us(slot)) > self.config.idle_timeout_us
            };
            if expired && score < threshold {
                actions.push(Action::Reclaim {
                    slot: slot.slot,
                    key_hash: slot.key_hash,
                });
                self.stats.reclaims += 1;
            } else {
                kept += 1;
                self.victims.push(Victim {
                    rank: (score, last_activity_us(slot), slot.key_hash),
                    index,
                });
            }
        }

        // 2. Candidates at or above the threshold, best first, bounded per tick.
        let prepares_max = if input.load >= self.config.load_high {
            self.config.prepares_per_tick_max / 4
        } else {
            self.config.prepares_per_tick_max
        };
        //    Predicted-contended candidates go to their own list (their action
        //    places the slot too), ranked by contention probability.
        self.wanted.clear();
        self.contended.clear();
        for candidate in input.candidates {
            let probability = valid(candidate.probability, &mut self.stats);
            if let Some(contention) = self.predicted_contended(Some(candidate.contention)) {
                self.contended.push(Score {
                    key_hash: candidate.key_hash,
                    probability,
                    contention,
                });
            } else if self.clears_threshold(probability) {
                self.wanted.push(Score {
                    key_hash: candidate.key_hash,
                    probability,
                    contention: 0.0,
                });
            }
        }
        best_first(&mut self.contended, prepares_max, |c| {
            (c.contention, c.key_hash)
        });
        let prepares_left = prepares_max - self.contended.len();
        best_first(&mut self.wanted, prepares_left, |c| {
            (c.probability, c.key_hash)
        });

        // 3. Fill free slots: predicted-contended keys first.
        let mut free = input.budget_slots.saturating_sub(kept);
        let contended_fill = free.min(self.contended.len());
        for contended in &self.contended[..contended_fill] {
            actions.push(Action::PrepareContention {
                key_hash: contended.key_hash,
            });
            self.stats.contention_prepares += 1;
        }
        free -= contended_fill;
        let fill = free.min(self.wanted.len());
        for wanted in &self.wanted[..fill] {
            actions.push(Action::Prepare {
                key_hash: wanted.key_hash,
            });
            self.stats.prepares += 1;
        }
        let mut occupied = kept + contended_fill + fill;

        // 4. Budget pressure: evict the lowest-ranked idle slots ([`victim_order`]),
        //    to get back under budget, then to make room for better candidates.
        let remaining = &self.wanted[fill..];
        let over_budget = occupied.saturating_sub(input.budget_slots);
        let victims_needed = (over_budget + remaining.len()).min(self.victims.len());
        if victims_needed == 0 {
            return;
        }
        let order = |a: &Victim, b: &Victim| victim_order(a.rank, b.rank);
        if victims_needed < self.victims.len() {
            self.victims
                .select_nth_unstable_by(victims_needed - 1, order);
        }
        let victims = &mut self.victims[..victims_needed];
        victims.sort_unstable_by(order);
        let mut next_victim = 0;
        while occupied > input.budget_slots && next_victim < victims.len() {
            let slot = &input.slots[victims[next_victim].index];
            actions.push(Action::Evict {
                slot: slot.slot,
                key_hash: slot.key_hash,
            });
            self.stats.evictions += 1;
            occupied -= 1;
            next_victim += 1;
        }
        for wanted in remaining {
            let Some(victim) = victims.get(next_victim) else {
                break;
            };
            if wanted.probability < victim.rank.0 + self.config.eviction_margin {
                break; // candidates are sorted descending, victims ascending: no later pair qualifies
            }
            let slot = &input.slots[victim.index];
            actions.push(Action::Evict {
                slot: slot.slot,
                key_hash: slot.key_hash,
            });
            actions.push(Action::Prepare {
                key_hash: wanted.key_hash,
            });
            self.stats.evictions += 1;
            self.stats.prepares += 1;
            next_victim += 1;
        }
    }
    fn threshold(&self) -> f32 {
        self.threshold
    }
    fn name(&self) -> &'static str {
        "predictive"
    }
    fn wants(&self, candidate: &Score) -> bool {
        let probability = in_range(candidate.probability).unwrap_or(0.0);
        let contention = in_range(candidate.contention).unwrap_or(0.0);
        self.clears_threshold(probability) || self.clears_contention(contention)
    }
    fn predicts_contended(&self, contention: Option<f32>) -> bool {
        contention
            .and_then(in_range)
            .is_some_and(|contention| self.clears_contention(contention))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(
        slot: u32,
        key_hash: u64,
        prepared_at_us: u64,
        last_use_us: Option<u64>,
        score: Option<f32>,
    ) -> SlotView {
        SlotView {
            slot,
            key_hash,
            prepared_at_us,
            last_use_us,
            uses_since_prepared: u32::from(last_use_us.is_some()),
            held: false,
            score,
            contention: None,
            contention_prepared: false,
        }
    }

    fn input<'a>(
        now_us: u64,
        budget_slots: usize,
        slots: &'a [SlotView],
        candidates: &'a [Score],
        feedback: &'a Feedback,
    ) -> TickInput<'a> {
        TickInput {
            now_us,
            budget_slots,
            slots,
            candidates,
            feedback,
            load: 0.0,
        }
    }

    /// One tick with no feedback; the actions it asks for.
    fn run_tick(
        policy: &mut impl Policy,
        now_us: u64,
        budget_slots: usize,
        slots: &[SlotView],
        candidates: &[Score],
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        let feedback = Feedback::default();
        policy.tick(
            &input(now_us, budget_slots, slots, candidates, &feedback),
            &mut actions,
        );
        actions
    }

    fn fixed_config(threshold: f32) -> PredictiveConfig {
        PredictiveConfig {
            threshold_initial: threshold,
            adaptive: false,
            ..PredictiveConfig::default()
        }
    }

    fn fixed(threshold: f32) -> Predictive {
        Predictive::new(fixed_config(threshold))
    }

    #[test]
    fn keep_alive_reclaims_slots_idle_past_the_keep_alive() {
        let mut policy = KeepAlive::new(500_000);
        let slots = [
            slot(1, 10, 0, Some(100_000), None),
            slot(2, 20, 0, Some(900_000), None),
        ];
        let actions = run_tick(&mut policy, 1_000_000, 10, &slots, &[]);
        assert_eq!(
            actions,
            vec![Action::Reclaim {
                slot: 1,
                key_hash: 10
            }]
        );
    }

    #[test]
    fn keep_alive_evicts_least_recently_used_under_pressure_and_never_held_slots() {
        let mut policy = KeepAlive::new(10_000_000);
        let mut slots = [
            slot(1, 10, 0, Some(300), None),
            slot(2, 20, 0, Some(100), None),
            slot(3, 30, 0, Some(200), None),
            slot(4, 40, 0, Some(50), None),
        ];
        slots[3].held = true;
        let actions = run_tick(&mut policy, 1_000, 2, &slots, &[]);
        assert_eq!(
            actions,
            vec![
                Action::Evict {
                    slot: 2,
                    key_hash: 20
                },
                Action::Evict {
                    slot: 3,
                    key_hash: 30
                }
            ]
        );
    }

    #[test]
    fn predictive_prepares_candidates_above_threshold_best_first_within_budget() {
        let mut policy = fixed(0.5);
        let candidates = [
            candidate(1, 0.6, 0.0),
            candidate(2, 0.9, 0.0),
            candidate(3, 0.4, 0.0),
            candidate(4, 0.7, 0.0),
        ];
        let actions = run_tick(&mut policy, 0, 2, &[], &candidates);
        assert_eq!(
            actions,
            vec![
                Action::Prepare { key_hash: 2 },
                Action::Prepare { key_hash: 4 }
            ]
        );
    }

    #[test]
    fn ties_are_broken_by_key_hash_whatever_the_order_the_policy_is_shown() {
        // Six idle slots: four tied on score 0 and last activity (keys 50,
        // 20, 40, 30), one older (key 90), one scored (key 10). Budget 3
        // with candidates tied at 0.9 (keys 8, 3, 5, 7, 6; 3 prepares per
        // tick): the oldest slot goes first, then the tied ones by key hash,
        // and the 3 lowest key hashes of the tied candidates come in.
        let slots_in_order = [
            slot(1, 50, 0, Some(100), Some(0.0)),
            slot(2, 20, 0, Some(100), Some(0.0)),
            slot(3, 10, 0, Some(100), Some(0.2)),
            slot(4, 40, 0, Some(100), None),
            slot(5, 90, 0, Some(50), Some(0.0)),
            slot(6, 30, 0, Some(100), Some(0.0)),
        ];
        let candidates_in_order = [
            candidate(8, 0.9, 0.0),
            candidate(3, 0.9, 0.0),
            candidate(5, 0.9, 0.0),
            candidate(7, 0.9, 0.0),
            candidate(6, 0.9, 0.0),
        ];
        let evict = |slot, key_hash| Action::Evict { slot, key_hash };
        let prepare = |key_hash| Action::Prepare { key_hash };
        let expected = vec![
            evict(5, 90),
            evict(2, 20),
            evict(6, 30),
            evict(4, 40),
            prepare(3),
            evict(1, 50),
            prepare(5),
            evict(3, 10),
            prepare(6),
        ];
        for rotation in 0..slots_in_order.len() {
            let mut slots = slots_in_order;
            slots.rotate_left(rotation);
            let mut candidates = candidates_in_order;
            candidates.rotate_left(rotation % candidates_in_order.len());
            slots.reverse();
            let mut policy = Predictive::new(PredictiveConfig {
                prepares_per_tick_max: 3,
                ..fixed_config(0.5)
            });
            let actions = run_tick(&mut policy, 1_000, 3, &slots, &candidates);
            assert_eq!(actions, expected, "rotation {rotation}");
        }
    }

    #[test]
    fn predictive_reclaims_unused_preparations_after_the_timeout_unless_still_wanted() {
        let mut policy = fixed(0.5);
        let slots = [
            slot(1, 10, 0, None, Some(0.1)),
            slot(2, 20, 0, None, Some(0.8)),
            slot(3, 30, 1_500_000, None, Some(0.0)),
        ];
        let actions = run_tick(&mut policy, 2_000_000, 10, &slots, &[]);
        assert_eq!(
            actions,
            vec![Action::Reclaim {
                slot: 1,
                key_hash: 10
            }]
        );
    }

    #[test]
    fn predictive_swaps_a_low_idle_slot_for_a_much_better_candidate() {
        let mut policy = fixed(0.3);
        let mut slots = [
            slot(1, 10, 0, Some(10), Some(0.35)),
            slot(2, 20, 0, Some(10), Some(0.9)),
        ];
        slots[1].held = true;
        let candidates = [candidate(3, 0.8, 0.0), candidate(4, 0.37, 0.0)];
        let actions = run_tick(&mut policy, 100, 2, &slots, &candidates);
        assert_eq!(
            actions,
            vec![
                Action::Evict {
                    slot: 1,
                    key_hash: 10
                },
                Action::Prepare { key_hash: 3 }
            ]
        );
    }

    #[test]
    fn predictive_gets_back_under_budget_without_touching_held_slots() {
        let mut policy = fixed(0.5);
        let mut slots: Vec<SlotView> = (0..6)
            .map(|i| {
                slot(
                    i,
                    u64::from(i) + 100,
                    0,
                    Some(10),
                    Some(i as f32 / 10.0 + 0.5),
                )
            })
            .collect();
        slots[0].held = true;
        let actions = run_tick(&mut policy, 100, 3, &slots, &[]);
        assert_eq!(
            actions,
            vec![
                Action::Evict {
                    slot: 1,
                    key_hash: 101
                },
                Action::Evict {
                    slot: 2,
                    key_hash: 102
                },
                Action::Evict {
                    slot: 3,
                    key_hash: 103
                }
            ]
        );
    }

    #[test]
    fn nonsense_scores_count_as_zero() {
        let mut policy = fixed(0.1);
        let slots = [
            slot(1, 10, 0, None, Some(f32::NAN)),
            slot(2, 20, 0, None, Some(7.0)),
        ];
        let candidates = [
            candidate(3, f32::NAN, 0.0),
            candidate(4, -1.0, 0.0),
            candidate(5, f32::INFINITY, 0.0),
        ];
        let actions = run_tick(&mut policy, 5_000_000, 10, &slots, &candidates);
        assert_eq!(
            actions,
            vec![
                Action::Reclaim {
                    slot: 1,
                    key_hash: 10
                },
                Action::Reclaim {
                    slot: 2,
                    key_hash: 20
                }
            ]
        );
        assert_eq!(policy.stats.invalid_scores, 5);
    }

    #[test]
    fn the_threshold_rises_with_waste_falls_with_misses_and_backs_off_under_load() {
        let mut policy = Predictive::new(PredictiveConfig {
            threshold_initial: 0.3,
            ..PredictiveConfig::default()
        });
        let mut actions = Vec::new();
        let mut feedback = Feedback::default();
        policy.tick(&input(0, 10, &[], &[], &feedback), &mut actions);
        feedback.prepared += 100;
        feedback.wasted += 90;
        feedback.hits += 10;
        policy.tick(&input(1_000_000, 10, &[], &[], &feedback), &mut actions);
        let after_waste = policy.threshold();
        assert!(after_waste > 0.3, "{after_waste}");
        feedback.misses += 100;
        feedback.hits += 10;
        policy.tick(&input(2_000_000, 10, &[], &[], &feedback), &mut actions);
        assert!(policy.threshold() < after_waste);
        let before_load = policy.threshold();
        let mut loaded = input(3_000_000, 10, &[], &[], &feedback);
        loaded.load = 0.95;
        policy.tick(&loaded, &mut actions);
        assert!(policy.threshold() > before_load);
    }

    #[test]
    fn under_load_fewer_keys_are_prepared_per_tick() {
        let mut policy = Predictive::new(PredictiveConfig {
            threshold_initial: 0.1,
            adaptive: false,
            prepares_per_tick_max: 8,
            ..PredictiveConfig::default()
        });
        let candidates: Vec<Score> = (0..100).map(|k| candidate(k, 0.9, 0.0)).collect();
        let mut actions = Vec::new();
        let feedback = Feedback::default();
        let mut loaded = input(0, 1000, &[], &candidates, &feedback);
        loaded.load = 1.0;
        policy.tick(&loaded, &mut actions);
        assert_eq!(actions.len(), 2);
    }

    fn contended_slot(slot_number: u32, key_hash: u64, contention: f32) -> SlotView {
        SlotView {
            contention: Some(contention),
            ..slot(slot_number, key_hash, 0, None, Some(0.0))
        }
    }

    fn candidate(key_hash: u64, probability: f32, contention: f32) -> Score {
        Score {
            key_hash,
            probability,
            contention,
        }
    }

    #[test]
    fn wants_and_predicts_contended_follow_the_rule_tick_applies() {
        let policy = fixed(0.5);
        let candidates = [
            candidate(1, 0.6, 0.0),
            candidate(2, 0.4, 0.0),
            candidate(3, 0.0, 0.7),
            candidate(4, f32::NAN, 2.0),
            candidate(5, 1.5, 0.2),
        ];
        let wanted: Vec<u64> = candidates
            .iter()
            .filter(|c| policy.wants(c))
            .map(|c| c.key_hash)
            .collect();
        assert_eq!(wanted, vec![1, 3]);
        let mut prepared: Vec<u64> = run_tick(&mut fixed(0.5), 0, 10, &[], &candidates)
            .iter()
            .map(|action| match *action {
                Action::Prepare { key_hash } | Action::PrepareContention { key_hash } => key_hash,
                other => panic!("{other:?}"),
            })
            .collect();
        prepared.sort_unstable();
        assert_eq!(prepared, wanted, "tick prepares exactly what it wants");
        assert!(policy.predicts_contended(Some(0.8)));
        assert!(!policy.predicts_contended(Some(0.2)));
        assert!(!policy.predicts_contended(Some(f32::NAN)));
        assert!(!policy.predicts_contended(None));
        let keep_alive = KeepAlive::new(500_000);
        assert!(!keep_alive.wants(&candidates[0]));
        assert!(!keep_alive.predicts_contended(Some(0.8)));
    }

    #[test]
    fn a_slot_predicted_contended_gets_its_contention_state_prepared_once() {
        let mut policy = fixed(0.5);
        let mut slots = [contended_slot(1, 10, 0.8), contended_slot(2, 20, 0.8)];
        slots[1].contention_prepared = true;
        let actions = run_tick(&mut policy, 100, 10, &slots, &[]);
        assert_eq!(actions, vec![Action::PrepareContention { key_hash: 10 }]);
        assert_eq!(policy.stats.contention_prepares, 1);
    }

    #[test]
    fn a_held_slot_predicted_contended_gets_its_contention_state_prepared() {
        let mut policy = fixed(0.5);
        let mut slots = [contended_slot(1, 10, 0.9)];
        slots[0].held = true;
        let actions = run_tick(&mut policy, 100, 10, &slots, &[]);
        assert_eq!(actions, vec![Action::PrepareContention { key_hash: 10 }]);
    }

    #[test]
    fn a_slot_predicted_contended_is_not_reclaimed_while_the_prediction_lasts() {
        let mut policy = fixed(0.5);
        // Prepared at 0, never used, score 0: past the unused timeout at 5 s.
        let mut slots = [contended_slot(1, 10, 0.8)];
        slots[0].contention_prepared = true;
        let mut actions = run_tick(&mut policy, 5_000_000, 10, &slots, &[]);
        assert_eq!(actions, vec![], "kept while contention is predicted");
        slots[0].contention = Some(0.1);
        actions = run_tick(&mut policy, 5_010_000, 10, &slots, &[]);
        assert_eq!(
            actions,
            vec![Action::Reclaim {
                slot: 1,
                key_hash: 10
            }],
            "reclaimed as usual once the prediction falls below the threshold"
        );
    }

    #[test]
    fn a_candidate_predicted_contended_takes_a_free_slot_before_access_scored_ones() {
        let mut policy = fixed(0.5);
        let candidates = [candidate(1, 0.9, 0.0), candidate(2, 0.05, 0.7)];
        let mut actions = run_tick(&mut policy, 0, 1, &[], &candidates);
        assert_eq!(actions, vec![Action::PrepareContention { key_hash: 2 }]);
        actions = run_tick(&mut policy, 0, 2, &[], &candidates);
        assert_eq!(
            actions,
            vec![
                Action::PrepareContention { key_hash: 2 },
                Action::Prepare { key_hash: 1 }
            ]
        );
    }

    #[test]
    fn under_budget_pressure_a_contended_slot_is_evicted_last_and_never_displaced() {
        let mut policy = fixed(0.3);
        let mut slots = [
            contended_slot(1, 10, 0.9),
            slot(2, 20, 0, Some(10), Some(0.6)),
            slot(3, 30, 0, Some(10), Some(0.5)),
        ];
        slots[0].contention_prepared = true;
        let candidates = [candidate(4, 1.0, 0.0)];
        let mut actions = run_tick(&mut policy, 100, 2, &slots, &candidates);
        assert_eq!(
            actions,
            vec![
                Action::Evict {
                    slot: 3,
                    key_hash: 30
                },
                Action::Evict {
                    slot: 2,
                    key_hash: 20
                },
                Action::Prepare { key_hash: 4 }
            ],
            "the access-scored slots go (one for budget, one for the candidate); the contended one stays"
        );
        // Over budget with nothing else idle: the contended slot goes too.
        actions = run_tick(&mut policy, 100, 0, &slots[..1], &[]);
        assert_eq!(
            actions,
            vec![Action::Evict {
                slot: 1,
                key_hash: 10
            }]
        );
    }

    #[test]
    fn contention_threshold_zero_turns_contention_preparation_off() {
        let mut policy = Predictive::new(PredictiveConfig {
            threshold_initial: 0.5,
            adaptive: false,
            contention_threshold: 0.0,
            ..PredictiveConfig::default()
        });
        let slots = [contended_slot(1, 10, 1.0)];
        let candidates = [candidate(2, 0.0, 1.0)];
        let actions = run_tick(&mut policy, 5_000_000, 10, &slots, &candidates);
        assert_eq!(
            actions,
            vec![Action::Reclaim {
                slot: 1,
                key_hash: 10
            }]
        );
    }

    #[test]
    fn nonsense_contention_probabilities_count_as_zero() {
        let mut policy = fixed(0.5);
        let slots = [contended_slot(1, 10, f32::NAN)];
        let candidates = [candidate(2, 0.0, f32::INFINITY), candidate(3, 0.0, -1.0)];
        let actions = run_tick(&mut policy, 5_000_000, 10, &slots, &candidates);
        assert_eq!(
            actions,
            vec![Action::Reclaim {
                slot: 1,
                key_hash: 10
            }]
        );
        assert!(policy.stats.invalid_scores >= 3);
    }
}
