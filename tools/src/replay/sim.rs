//! One simulated broker of the replay: its slots, the allocator policy it
//! runs (the broker's own, `broker/src/allocator.rs`), and its counters.
//! `replay.rs` runs many of them per pass, one per model and threshold.

use super::*;

/// How the policy sees a simulated slot at `now_us`.
pub(super) fn slot_view(
    key_hash: u64,
    slot: &SimSlot,
    now_us: u64,
    score: Option<f32>,
) -> SlotView {
    SlotView {
        // The policy only echoes it in its actions: the key's dense number
        // (a broker has one slot per key) finds the slot without hashing.
        slot: slot.key_id,
        key_hash,
        prepared_at_us: slot.prepared_at_us,
        last_use_us: slot.last_use_us,
        uses_since_prepared: slot.uses,
        held: slot.held_until_us > now_us,
        score,
        // The simulated brokers get no contention forecast: they
        // simulate access preparation only (the contention estimate
        // is scored on its own, replay/contention.rs).
        contention: None,
        contention_prepared: false,
    }
}

#[derive(Debug, Clone, Copy)]
pub(super) struct SimSlot {
    /// The key's dense number ([`TraceIndex::key_id`]).
    pub(super) key_id: u32,
    pub(super) prepared_at_us: u64,
    pub(super) ready_at_us: u64,
    pub(super) last_use_us: Option<u64>,
    pub(super) uses: u32,
    pub(super) held_until_us: u64,
    pub(super) idle_since_us: u64,
}

#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Counters {
    requests: u64,
    hits: u64,
    late: u64,
    seen_before_requests: u64,
    seen_before_hits: u64,
    prepares: u64,
    wasted: u64,
    wasted_slot_us: u128,
}

pub(super) struct Sim {
    pub(super) policy: Box<dyn Policy>,
    policy_name: String,
    setting: String,
    pub(super) fixed_threshold: Option<f32>,
    pub(super) keep_alive_ms: Option<u64>,
    pub(super) adaptive: bool,
    pub(super) budget_slots: usize,
    prepare_latency_us: u64,
    slots: Vec<(u64, SimSlot)>,
    /// Per dense key number, its position in `slots`, or [`NO_SLOT`].
    slot_of_key: Vec<u32>,
    /// This broker's bit in [`TickShared::holders`] (0: not tracked there,
    /// in a pass of more brokers than [`HolderBits`] has bits).
    pub(super) holder_bit: HolderBits,
    feedback: Feedback,
    counters: Counters,
    /// The same counters for the trace's first and second half (split at
    /// `mid_us`): thresholds are chosen on one, reported on the other.
    halves: [Counters; 2],
    mid_us: u64,
    views: Vec<SlotView>,
    candidates: Vec<Score>,
    actions: Vec<Action>,
    /// When the policy could reclaim each slot of `slots` (same positions).
    eligible_at_us: Vec<u64>,
    /// What [`Sim::tick`] reads of each slot of `slots` (same positions)
    /// when it looks for the lowest-ranked idle slots.
    hot: Vec<Hot>,
    /// Positions in `slots` shown to the policy this tick, ascending.
    shown: Vec<u32>,
    /// The lowest-ranked idle slots ([`Sim::lowest_idle`]).
    lowest: Vec<Victim>,
    /// How many of them beyond the evictions it must make
    /// [`Sim::evict_among_the_lowest`] shows first: twice the other
    /// evictions (displacements) of the last tick that evicted, at least 8.
    lowest_extra: usize,
    /// The slots shown before the lowest were added (scratch).
    shown_before: Vec<u32>,
    /// Positions of the slots the policy reclaims this tick, ascending.
    reclaimed: Vec<u32>,
    /// Ticks in which the policy was shown: only the slots it may free;
    /// those and the lowest-ranked idle slots; every slot.
    pub(super) shown_counts: [u64; 3],
    /// The policy's reclaim rule and prepare cap, for [`Sim::tick`]'s
    /// shortcut (see [`Reclaim`]).
    rule: Reclaim,
}

/// What a simulated broker's policy does with a slot that is not held, as
/// far as [`Sim::tick`] needs it to leave out the slots the policy cannot
/// act on: the rules of `forelockd::allocator`'s `KeepAlive` and
/// `Predictive` restated (`a_slot_is_left_out_only_when_its_policy_keeps_it`
/// checks them against the policies).
#[derive(Debug, Clone, Copy)]
pub(super) enum Reclaim {
    /// `KeepAlive`: reclaimed `keep_alive_us` after its last activity; never prepares.
    KeepAlive { keep_alive_us: u64 },
    /// `Predictive`: an unused preparation may be reclaimed `unused_us` after
    /// it was prepared, a used slot `idle_us` after its last activity (both
    /// only when the key's score is under the threshold); at most
    /// `prepares_max` candidates are wanted per tick.
    Predictive {
        unused_us: u64,
        idle_us: u64,
        prepares_max: usize,
        adaptive: bool,
    },
}

impl Reclaim {
    pub(super) fn of_predictive(config: &PredictiveConfig) -> Reclaim {
        Reclaim::Predictive {
            unused_us: config.unused_timeout_us,
            idle_us: config.idle_timeout_us,
            prepares_max: config.prepares_per_tick_max,
            adaptive: config.adaptive,
        }
    }

    /// The first time at which the policy may free `slot` (not held, and
    /// past its timeout): before it, the policy keeps the slot whatever its
    /// score. The policies' "expired" is `now - t0 > timeout`.
    pub(super) fn eligible_at_us(self, slot: &SimSlot) -> u64 {
        let last_activity = slot
            .last_use_us
            .unwrap_or(slot.prepared_at_us)
            .max(slot.prepared_at_us);
        let (t0, timeout) = match self {
            Reclaim::KeepAlive { keep_alive_us } => (last_activity, keep_alive_us),
            Reclaim::Predictive {
                unused_us, idle_us, ..
            } => {
                if slot.uses == 0 {
                    (slot.prepared_at_us, unused_us)
                } else {
                    (last_activity, idle_us)
                }
            }
        };
        slot.held_until_us
            .max(t0.saturating_add(timeout).saturating_add(1))
    }

    /// How many of the ranked candidates (at most `budget_slots`, as a
    /// broker with every candidate in view gets) the policy is shown: the
    /// first `prepares_max` in ranked order for `Predictive`, which takes
    /// its wanted keys best first by `rank_order`, the ranking's own order,
    /// at most `prepares_max` of them, so it never reads further; none for
    /// `KeepAlive`, which reads none.
    pub(super) fn candidates_max(self, budget_slots: usize) -> usize {
        match self {
            Reclaim::KeepAlive { .. } => 0,
            Reclaim::Predictive { prepares_max, .. } => prepares_max.min(budget_slots),
        }
    }

    /// At least as many candidates as the policy wants prepared this tick
    /// at `threshold` (its post-control one): those at or above it and
    /// above 0, at most `prepares_max`.
    pub(super) fn wanted(self, candidates: &[Score], threshold: f32) -> usize {
        match self {
            Reclaim::KeepAlive { .. } => 0,
            Reclaim::Predictive { prepares_max, .. } => candidates
                .iter()
                .filter(|c| c.probability >= threshold && c.probability > 0.0)
                .count()
                .min(prepares_max),
        }
    }
}

/// A slot as [`Sim::lowest_idle`] reads it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Hot {
    held_until_us: u64,
    /// The policies' last activity: the last use, or the preparation.
    last_activity_us: u64,
    key_hash: u64,
    key_id: u32,
}

impl Hot {
    pub(super) fn of(key_hash: u64, slot: &SimSlot) -> Hot {
        Hot {
            held_until_us: slot.held_until_us,
            last_activity_us: slot
                .last_use_us
                .unwrap_or(slot.prepared_at_us)
                .max(slot.prepared_at_us),
            key_hash,
            key_id: slot.key_id,
        }
    }
}

/// An idle slot ranked as `Predictive` ranks its eviction victims, by
/// `victim_order` (score, last activity, key hash: a total order), and its
/// position in slot order.
#[derive(Debug, Clone, Copy)]
pub(super) struct Victim {
    score: f32,
    last_activity_us: u64,
    key_hash: u64,
    position: u32,
}

impl Victim {
    pub(super) fn rank(&self, other: &Victim) -> std::cmp::Ordering {
        victim_order(
            (self.score, self.last_activity_us, self.key_hash),
            (other.score, other.last_activity_us, other.key_hash),
        )
    }
}

impl PartialEq for Victim {
    fn eq(&self, other: &Victim) -> bool {
        self.rank(other).is_eq()
    }
}
impl Eq for Victim {}
impl PartialOrd for Victim {
    fn partial_cmp(&self, other: &Victim) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Victim {
    fn cmp(&self, other: &Victim) -> std::cmp::Ordering {
        self.rank(other)
    }
}

/// A slot's score as `Predictive` ranks it: a NaN or out-of-range score, or
/// none, counts as 0.
pub(super) fn effective(score: Option<f32>) -> f32 {
    score.map_or(0.0, |p| if (0.0..=1.0).contains(&p) { p } else { 0.0 })
}

impl Sim {
    /// The score the policy would see on the slot at `position`.
    pub(super) fn score_at(
        &self,
        position: usize,
        source: &Source,
        shared: &mut TickShared,
        now_us: u64,
        horizon_us: u64,
    ) -> Option<f32> {
        let key_id = self.hot[position].key_id;
        if shared.filled {
            return Some(shared.filled_score(key_id));
        }
        shared.score(source, key_id, self.slots[position].0, now_us, horizon_us)
    }

    /// Asks the policy for this tick's actions, showing it the slots at
    /// `self.shown` (ascending) with the budget less the slots left out.
    pub(super) fn show(
        &mut self,
        actions: &mut Vec<Action>,
        source: &Source,
        shared: &mut TickShared,
        now_us: u64,
        horizon_us: u64,
    ) {
        self.views.clear();
        for &position in &self.shown {
            let position = position as usize;
            let score = self.score_at(position, source, shared, now_us, horizon_us);
            let (key_hash, slot) = &self.slots[position];
            self.views.push(slot_view(*key_hash, slot, now_us, score));
        }
        let left_out = self.slots.len() - self.views.len();
        let input = TickInput {
            now_us,
            budget_slots: self.budget_slots.saturating_sub(left_out),
            slots: &self.views,
            candidates: &self.candidates,
            feedback: &self.feedback,
            load: 0.0,
        };
        self.policy.tick(&input, actions);
    }

    /// Asks the policy, which must evict `evictions_min` slots (those over
    /// the budget) and may evict up to `evictions_max`, with
    /// the slots in `self.shown` and the `count` lowest-ranked idle slots it
    /// keeps ([`Sim::lowest_idle`]) in view, and says whether its `actions`
    /// are those it gives with every slot in view. For `Predictive` they
    /// are (unless the budget left would not cover the slots left out) when
    /// those are every idle slot it keeps, when `count` is `evictions_max`,
    /// or when it evicted fewer than `count`: it sorts its victims by
    /// `victim_order`, a total order, evicts from the lowest and stops on
    /// the score of the next one, so it reads only the first `e + 1`, the
    /// same among these slots as among all; and it evicts at most
    /// `evictions_max`. `count` starts above `evictions_min`, so that the
    /// budget left covers the slots left out. Otherwise `count` doubles and
    /// it is asked again (the
    /// first call moved the adaptive threshold's clock to now: a second
    /// call's control step changes nothing). `KeepAlive` names its victims
    /// in the order its selection leaves them, which depends on every idle
    /// slot: it is always shown all.
    #[allow(clippy::too_many_arguments)]
    fn evict_among_the_lowest(
        &mut self,
        evictions_min: usize,
        evictions_max: usize,
        actions: &mut Vec<Action>,
        source: &Source,
        shared: &mut TickShared,
        now_us: u64,
        horizon_us: u64,
    ) -> bool {
        if !matches!(self.rule, Reclaim::Predictive { .. }) {
            return false;
        }
        std::mem::swap(&mut self.shown, &mut self.shown_before);
        let mut count = (evictions_min + self.lowest_extra).min(evictions_max);
        loop {
            let every_idle_slot = self.lowest_idle(count, source, shared, now_us, horizon_us);
            let mut lowest: Vec<u32> = self.lowest.iter().map(|victim| victim.position).collect();
            lowest.sort_unstable();
            self.shown.clear();
            let (before, mut b) = (&self.shown_before, 0);
            for &position in before {
                while b < lowest.len() && lowest[b] < position {
                    self.shown.push(lowest[b]);
                    b += 1;
                }
                if lowest.get(b) == Some(&position) {
                    b += 1;
                }
                self.shown.push(position);
            }
            self.shown.extend_from_slice(&lowest[b..]);
            let last_try = every_idle_slot || count == evictions_max;
            if self.slots.len() - self.shown.len() <= self.budget_slots {
                self.show(actions, source, shared, now_us, horizon_us);
                let evicted = actions
                    .iter()
                    .filter(|action| matches!(action, Action::Evict { .. }))
                    .count();
                if last_try || evicted < count {
                    if evicted > 0 {
                        self.lowest_extra = (2 * evicted.saturating_sub(evictions_min)).max(8);
                    }
                    return true;
                }
            } else if last_try {
                return false; // the budget left would not cover the slots left out
            }
            count = (2 * count).min(evictions_max);
        }
    }

    /// Puts into `self.lowest` the `count` lowest-ranked idle slots that
    /// the policy keeps (not held, not reclaimed: not in `self.reclaimed`),
    /// lowest first; says whether those are all of them.
    pub(super) fn lowest_idle(
        &mut self,
        count: usize,
        source: &Source,
        shared: &mut TickShared,
        now_us: u64,
        horizon_us: u64,
    ) -> bool {
        self.lowest.clear();
        let mut idle = 0usize;
        let mut heap: std::collections::BinaryHeap<Victim> =
            std::collections::BinaryHeap::with_capacity(count + 1);
        let mut next_reclaimed = 0;
        for position in 0..self.hot.len() {
            let hot = self.hot[position];
            if hot.held_until_us > now_us {
                continue;
            }
            if self.reclaimed.get(next_reclaimed) == Some(&(position as u32)) {
                next_reclaimed += 1;
                continue;
            }
            idle += 1;
            let score = effective(self.score_at(position, source, shared, now_us, horizon_us));
            let victim = Victim {
                score,
                last_activity_us: hot.last_activity_us,
                key_hash: hot.key_hash,
                position: position as u32,
            };
            if heap.len() < count {
                heap.push(victim);
            } else if let Some(mut top) = heap.peek_mut()
                && victim < *top
            {
                *top = victim;
            }
        }
        self.lowest.extend(heap.into_sorted_vec());
        idle == self.lowest.len()
    }

    /// What [`Sim::tick`] will take from the ranking, as of now: `None`
    /// if nothing; `Some(Some((threshold, holder_bit)))` if the keys scored
    /// at or above `threshold` that it holds no slot for, by its bit in
    /// [`TickShared::holders`]; `Some(None)` if it takes keys but has no
    /// such bit (a pass of more brokers than [`HolderBits`] has bits).
    pub(super) fn takes(&self) -> Option<Option<(f32, HolderBits)>> {
        if self.rule.candidates_max(self.budget_slots) == 0 {
            return None;
        }
        Some((self.holder_bit != 0).then(|| (self.policy.threshold(), self.holder_bit)))
    }

    /// `keys`: the trace's distinct keys ([`TraceIndex::keys`]).
    pub(super) fn new(
        policy: Box<dyn Policy>,
        rule: Reclaim,
        policy_name: &str,
        setting: String,
        settings: &ReplaySettings,
        keys: usize,
    ) -> Sim {
        Sim {
            policy,
            rule,
            eligible_at_us: Vec::new(),
            hot: Vec::new(),
            shown: Vec::new(),
            lowest: Vec::new(),
            lowest_extra: 8,
            shown_before: Vec::new(),
            reclaimed: Vec::new(),
            shown_counts: [0; 3],
            policy_name: policy_name.to_owned(),
            setting,
            fixed_threshold: None,
            keep_alive_ms: None,
            adaptive: false,
            budget_slots: settings.budget_slots,
            prepare_latency_us: settings.prepare_latency_us,
            slots: Vec::new(),
            slot_of_key: vec![NO_SLOT; keys],
            holder_bit: 0,
            feedback: Feedback::default(),
            counters: Counters::default(),
            halves: [Counters::default(); 2],
            mid_us: settings.mid_us,
            views: Vec::new(),
            candidates: Vec::new(),
            actions: Vec::new(),
        }
    }

    pub(super) fn half(&self, at_us: u64) -> usize {
        usize::from(at_us >= self.mid_us)
    }

    /// Adds the slot-time `[from_us, to_us)` that served nothing, split
    /// between the halves.
    pub(super) fn add_waste(&mut self, from_us: u64, to_us: u64) {
        self.counters.wasted_slot_us += u128::from(to_us.saturating_sub(from_us));
        let mid = self.mid_us.clamp(from_us, to_us.max(from_us));
        self.halves[0].wasted_slot_us += u128::from(mid.saturating_sub(from_us));
        self.halves[1].wasted_slot_us += u128::from(to_us.saturating_sub(mid));
    }

    pub(super) fn request(
        &mut self,
        event: &TraceEvent,
        key_id: u32,
        seen_before: bool,
        shared: &mut TickShared,
    ) {
        let half = self.half(event.ts_us);
        for counters in [&mut self.counters, &mut self.halves[half]] {
            counters.requests += 1;
            counters.seen_before_requests += u64::from(seen_before);
        }
        let release_us = event.ts_us + event.hold_us;
        match self.slot_of_key[key_id as usize] {
            NO_SLOT => {
                self.feedback.misses += 1;
                let slot = SimSlot {
                    key_id,
                    prepared_at_us: event.ts_us,
                    ready_at_us: event.ts_us,
                    last_use_us: Some(event.ts_us),
                    uses: 1,
                    held_until_us: release_us,
                    idle_since_us: release_us,
                };
                self.insert(event.key_hash, slot, shared);
            }
            index => {
                let (key_hash, slot) = &mut self.slots[index as usize];
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
                self.eligible_at_us[index as usize] = self.rule.eligible_at_us(slot);
                self.hot[index as usize] = Hot::of(*key_hash, slot);
            }
        }
    }

    pub(super) fn insert(&mut self, key_hash: u64, slot: SimSlot, shared: &mut TickShared) {
        shared.set_holder(slot.key_id, self.holder_bit, true);
        self.slot_of_key[slot.key_id as usize] =
            u32::try_from(self.slots.len()).expect("fewer than 2^32 slots");
        self.eligible_at_us.push(self.rule.eligible_at_us(&slot));
        self.hot.push(Hot::of(key_hash, &slot));
        self.slots.push((key_hash, slot));
    }

    pub(super) fn remove(&mut self, key_id: u32, now_us: u64, shared: &mut TickShared) {
        let index = match self.slot_of_key[key_id as usize] {
            NO_SLOT => return,
            index => index as usize,
        };
        let slot = self.slots[index].1;
        if slot.held_until_us > now_us {
            return; // the broker re-checks: a held slot is never freed
        }
        self.slot_of_key[key_id as usize] = NO_SLOT;
        shared.set_holder(key_id, self.holder_bit, false);
        self.slots.swap_remove(index);
        self.eligible_at_us.swap_remove(index);
        self.hot.swap_remove(index);
        if index < self.slots.len() {
            self.slot_of_key[self.slots[index].1.key_id as usize] = index as u32;
        }
        if slot.uses == 0 {
            let half = self.half(now_us);
            self.counters.wasted += 1;
            self.halves[half].wasted += 1;
            self.feedback.wasted += 1;
        }
        self.add_waste(slot.idle_since_us, now_us);
    }

    pub(super) fn count_idle_tails(&mut self, now_us: u64) {
        for index in 0..self.slots.len() {
            let slot = self.slots[index].1;
            if slot.held_until_us <= now_us {
                self.add_waste(slot.idle_since_us, now_us);
            }
        }
    }

    /// `shared.ranked`: scored keys, highest first (shared by every sim of
    /// a pass, as is `shared`, for this tick).
    pub(super) fn tick(
        &mut self,
        now_us: u64,
        horizon_us: u64,
        source: &Source,
        shared: &mut TickShared,
        index: &TraceIndex,
    ) {
        // The candidates: the ranked keys this broker has no slot for, as
        // many as it may want (`Reclaim::candidates_max`).
        self.candidates.clear();
        let threshold = self.policy.threshold();
        let candidates_max = self.rule.candidates_max(self.budget_slots);
        let mut rank = 0;
        while self.candidates.len() < candidates_max
            && let Some(score) = shared.ranked(rank, index)
            && score.probability >= threshold
        {
            let held = if self.holder_bit == 0 {
                self.slot_of_key[shared.ranked_ids[rank] as usize] != NO_SLOT
            } else {
                shared.ranked_holders[rank] & self.holder_bit != 0
            };
            if !held {
                self.candidates.push(score);
            }
            rank += 1;
        }

        // The policy is shown only the slots it may act on, in slot order,
        // with the budget less the slots left out (which it keeps whatever
        // their score), so that it reclaims, prepares and evicts exactly
        // what it would with every slot in view
        // (`the_fast_replay_reports_what_the_reference_replay_does`):
        // - first the slots it may free: not held and past their timeout
        //   ([`Reclaim::eligible_at_us`]), and under a fixed threshold only
        //   those scored under it (it keeps the others);
        // - if it may evict (more slots kept than the budget, or more keys
        //   wanted than free slots), the tick is asked again with, beside
        //   those, its lowest-ranked idle slots ([`Sim::evict_among_the_lowest`]):
        //   its victims are ranked by `victim_order`, a total order, so its
        //   victims among them are its victims among all. `KeepAlive`, or a
        //   budget too short for the slots left out, is asked again with
        //   every slot. The first call moved the adaptive threshold's clock
        //   to now, so a second call's control step changes nothing: its
        //   actions are those of the policy asked once.
        let total = self.slots.len();
        let threshold_before = self.policy.threshold();
        let keep_only_under = match self.rule {
            Reclaim::Predictive {
                adaptive: false, ..
            } => Some(threshold_before),
            _ => None,
        };
        self.shown.clear();
        for (position, &eligible_at_us) in self.eligible_at_us.iter().enumerate() {
            if now_us >= eligible_at_us {
                if let Some(threshold) = keep_only_under {
                    let score = self.score_at(position, source, shared, now_us, horizon_us);
                    if effective(score) >= threshold {
                        continue;
                    }
                }
                self.shown.push(position as u32);
            }
        }
        let mut actions = std::mem::take(&mut self.actions);
        // Under a fixed threshold the policy reclaims every slot shown so
        // far (not held, past its timeout, scored under the threshold, no
        // contention forecast) and its threshold does not move, so what it
        // may evict is known before it is asked: when it may, it is asked
        // once, with the victims in view (a first call would change nothing
        // the replay reads: a fixed threshold's control step only keeps time).
        let fixed = keep_only_under.is_some();
        self.reclaimed.clear();
        if fixed {
            self.reclaimed.extend_from_slice(&self.shown);
        } else {
            self.show(&mut actions, source, shared, now_us, horizon_us);
            for action in &actions {
                if let Action::Reclaim { slot, .. } = *action {
                    self.reclaimed.push(self.slot_of_key[slot as usize]);
                }
            }
            self.reclaimed.sort_unstable();
        }
        let kept = total - self.reclaimed.len();
        let free = self.budget_slots.saturating_sub(kept);
        let evictions_min = kept.saturating_sub(self.budget_slots);
        let evictions_max = evictions_min
            + self
                .rule
                .wanted(&self.candidates, self.policy.threshold())
                .saturating_sub(free);
        if evictions_max > 0 {
            let exact = self.evict_among_the_lowest(
                evictions_min,
                evictions_max,
                &mut actions,
                source,
                shared,
                now_us,
                horizon_us,
            );
            if exact {
                self.shown_counts[1] += 1;
            } else {
                self.shown.clear();
                self.shown.extend(0..total as u32);
                self.shown_counts[2] += 1;
                self.show(&mut actions, source, shared, now_us, horizon_us);
            }
        } else {
            if fixed {
                self.show(&mut actions, source, shared, now_us, horizon_us);
            }
            self.shown_counts[0] += 1;
        }
        for action in &actions {
            match *action {
                // PrepareContention also places the slot; the sims get no
                // contention forecast, so it only appears for symmetry.
                Action::Prepare { key_hash } | Action::PrepareContention { key_hash } => {
                    let key_id = index.id(key_hash);
                    if self.slot_of_key[key_id as usize] != NO_SLOT {
                        continue;
                    }
                    self.counters.prepares += 1;
                    let half = self.half(now_us);
                    self.halves[half].prepares += 1;
                    self.feedback.prepared += 1;
                    let slot = SimSlot {
                        key_id,
                        prepared_at_us: now_us,
                        ready_at_us: now_us + self.prepare_latency_us,
                        last_use_us: None,
                        uses: 0,
                        held_until_us: 0,
                        idle_since_us: now_us,
                    };
                    self.insert(key_hash, slot, shared);
                }
                // The slot number the policy echoes is the key's dense
                // number ([`slot_view`]).
                Action::Reclaim { slot, key_hash } | Action::Evict { slot, key_hash } => {
                    debug_assert_eq!(slot, index.id(key_hash));
                    self.remove(slot, now_us, shared);
                }
            }
        }
        self.actions = actions;
    }

    pub(super) fn report(&self, quality: Option<(f64, f64)>, duration_us: u64) -> RunReport {
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
