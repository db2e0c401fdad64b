//! The online choice: the whole ladder on one event stream, each member
//! scored prequentially on what the allocator cares about, the written scores
//! those of the member that is best now.
//!
//! # Members
//!
//! [`MEMBERS`]: keep-alive 500 ms, frequency at 0.5 s, 5 s and 60 s, the
//! successor table, the logistic regression and hold-value. They share the
//! forecaster's features (one [`crate::features::FeatureStore`]); the two
//! learned ones learn from the same labelled samples as they would alone.
//! Only the leader scores every active key each tick; the others score the
//! forecaster's samples (64 a tick) and the requested keys only
//! ([`Model::score_one`]), so the tick costs about as much as the leader alone.
//!
//! # The loss: hits and waste at the allocator's operating points
//!
//! The chooser follows experts: each member at each cut of
//! [`CHOICE_THRESHOLDS`] (the broker's threshold sweeps that range; a
//! member is judged at its best cut, as the replay judges it at its best
//! threshold). An expert "selects" a key if the member's score is at or
//! above `max(cut, q)`, where `q` is the score of the member's `budget`-th
//! best key (estimated from its recent sampled scores: samples are uniform
//! over the active keys, so the `1 - budget / active` quantile), or 0 with
//! no budget (`choice_budget_slots`). Per tick (a round):
//!
//! - misses: every request that arrives before the next tick is a miss for
//!   each expert that did not select its key as scored at this tick (the
//!   forecaster reports requests before their features change,
//!   `Model::requested`); a key not scored (new, idle) is a miss for all;
//! - waste: each of the tick's samples that an expert selected and that was
//!   not requested within the longest label horizon (10 x the horizon, 5
//!   s) is a slot kept for nothing for one tick, scaled up to the active
//!   keys (`active / samples`) and priced `p / (1 - p)` hits per horizon
//!   (`tick / horizon` of that per tick) with `p` = [`WASTE_PRICE`] (0.1: a
//!   key is worth its slot for a horizon when P(requested within it) >= 0.1). A key requested
//!   later than the horizon but within 5 s is not waste: the allocator keeps
//!   a selected key's slot, and the replay counts an idle slot as waste
//!   only if it is freed before its next use.
//!
//! The round's loss is `(misses + price x waste) / (requests + price x
//! active)`, in [0, 1]. It is known when the tick's samples are labelled
//! at 5 s.
//!
//! # The choice and its margin
//!
//! [`Chooser`] follows the leader of the discounted losses
//! `D_m(T) = sum_t g^(T - t) l_m(t)` (`g = 1 - 1 / W`, `W` rounds, 60 s by
//! default), with hysteresis: it switches only when its current member's
//! discounted loss exceeds the best one's by more than `delta`. Losses come
//! `d` rounds late (the longest label horizon, in ticks, plus one: 501). For ANY loss sequence
//! in [0, 1], the choice's own discounted loss satisfies
//!
//! ```text
//! D_choice(T) <= min_m D_m(T) + delta + (d + 1) + (d + 1 + delta) g^-d S(T),
//! S(T) = sum over switches k of g^(T - t_k)
//! ```
//!
//! (follow-the-leader's "be the leader" argument, period by period: a
//! period played with one member starts where it was best, and ends at most
//! `delta` above the best plus the `d + 1` rounds played before the switch
//! was seen; the periods' best losses telescope). Divided by `sum g^k`
//! (about `W` rounds), this is a margin in mean loss per round:
//! `(delta + d + 1) / W` without recent switches, 8.4 % of a round's
//! maximum loss at the defaults (W = 6000, d = 501, delta = 1), plus about
//! 9 % per switch in the last `W` rounds: a worst case, in which every
//! sample the leader scores in the 5 s before a switch is lost; the
//! measured trail is published beside it. [`ChoiceStatus`] publishes the
//! actual trail and the bound; the unit tests check the bound on
//! adversarial streams and that the choice tracks a winner that changes.
//!
//! The margin is on the loss above, not on the replay's hit rate: a
//! member's losses on its samples are what it would earn; the slots it
//! inherits from the member before it are not counted (docs/forecasting.md
//! measures the real thing).

use crate::config::{ModelKind, PredictorConfig};
use crate::features::{FEATURES, FeatureView};
use crate::models::{self, Model};

/// The members, in order: (name, model, frequency scale).
pub const MEMBERS: [(&str, ModelKind, usize); 7] = [
    ("keep-alive", ModelKind::KeepAlive, 0),
    ("frequency 0.5s", ModelKind::Frequency, 1),
    ("frequency 5s", ModelKind::Frequency, 2),
    ("frequency 60s", ModelKind::Frequency, 3),
    ("successor", ModelKind::Successor, 0),
    ("logistic", ModelKind::Logistic, 0),
    ("hold-value", ModelKind::HoldValue, 0),
];
/// The member followed until losses say otherwise (all are equal then).
const FIRST_LEADER: usize = 6;
/// The experts the chooser follows: each member at each cut.
const EXPERTS: usize = MEMBERS.len() * CHOICE_THRESHOLDS.len();
/// A slot kept for nothing costs `p / (1 - p)` hits, `p` this: a key is
/// worth a slot when P(requested) >= `p`.
const WASTE_PRICE: f64 = 0.1;

/// The allocator thresholds a member's loss averages over: the operating
/// range of the broker's adaptive threshold (0.3 at start, 0.02 at its floor).
pub const CHOICE_THRESHOLDS: [f32; 4] = [0.3, 0.1, 0.03, 0.01];
const _: () = assert!(
    MEMBERS.len() * CHOICE_THRESHOLDS.len() <= 32,
    "a tag's low 32 bits"
);

/// Sampled scores per member kept for the budget's cut.
const RECENT_SCORES: usize = 1024;

/// Follow-the-leader over discounted losses with hysteresis (module docs).
#[derive(Debug, Clone)]
pub struct Chooser {
    discount: f64,
    hysteresis: f64,
    delay_rounds: f64,
    losses: Vec<f64>,
    choice_loss: f64,
    /// `sum_t g^(T - t)` over the rounds seen.
    weight: f64,
    /// `S(T)`: switches, each decayed since.
    switch_weight: f64,
    leader: usize,
    pub rounds: u64,
    pub switches: u64,
}

impl Chooser {
    /// `window_rounds`: `W`; `delay_rounds`: `d`.
    pub fn new(
        members: usize,
        first: usize,
        window_rounds: f64,
        hysteresis: f64,
        delay_rounds: u64,
    ) -> Chooser {
        assert!(first < members);
        assert!(window_rounds >= 1.0 && hysteresis >= 0.0);
        Chooser {
            discount: 1.0 - 1.0 / window_rounds,
            hysteresis,
            delay_rounds: delay_rounds as f64,
            losses: vec![0.0; members],
            choice_loss: 0.0,
            weight: 0.0,
            switch_weight: 0.0,
            leader: first,
            rounds: 0,
            switches: 0,
        }
    }

    /// The member followed now.
    pub fn leader(&self) -> usize {
        self.leader
    }

    /// One round's losses (each in [0, 1]): the members', and the choice's
    /// (the loss of the member that was followed when the round was played).
    pub fn observe(&mut self, member_losses: &[f64], choice_loss: f64) {
        assert_eq!(member_losses.len(), self.losses.len());
        let g = self.discount;
        for (total, &loss) in self.losses.iter_mut().zip(member_losses) {
            debug_assert!((0.0..=1.0).contains(&loss), "{loss}");
            *total = *total * g + loss;
        }
        self.choice_loss = self.choice_loss * g + choice_loss;
        self.weight = self.weight * g + 1.0;
        self.switch_weight *= g;
        self.rounds += 1;
        let best = self.best();
        if self.losses[self.leader] - self.losses[best] > self.hysteresis {
            self.leader = best;
            self.switches += 1;
            self.switch_weight += 1.0;
        }
    }

    /// The member with the lowest discounted loss (the first on a tie).
    fn best(&self) -> usize {
        let mut best = 0;
        for (m, &loss) in self.losses.iter().enumerate() {
            if loss < self.losses[best] {
                best = m;
            }
        }
        best
    }

    /// `D_choice(T) - min_m D_m(T)`.
    pub fn trail(&self) -> f64 {
        self.choice_loss - self.losses[self.best()]
    }

    /// The bound on [`Chooser::trail`] of the module docs.
    pub fn bound(&self) -> f64 {
        let d = self.delay_rounds;
        self.hysteresis
            + (d + 1.0)
            + (d + 1.0 + self.hysteresis) * self.discount.powf(-d) * self.switch_weight
    }

    /// Discounted losses per member.
    pub fn losses(&self) -> &[f64] {
        &self.losses
    }

    /// `sum_t g^(T - t)`: divides a discounted loss into a mean per round.
    pub fn weight(&self) -> f64 {
        self.weight
    }

    /// The leader's lead over the next best member, in mean loss per round.
    pub fn lead(&self) -> (usize, f64) {
        let runner_up = (0..self.losses.len())
            .filter(|&m| m != self.leader)
            .min_by(|&a, &b| self.losses[a].total_cmp(&self.losses[b]))
            .unwrap_or(self.leader);
        let gap = self.losses[runner_up] - self.losses[self.leader];
        (runner_up, gap / self.weight.max(1.0))
    }
}

/// How the online choice stands (for the score file and `forelock status`).
/// Losses are means per round (per sample, averaged over the thresholds).
#[derive(Debug, Clone, PartialEq)]
pub struct ChoiceStatus {
    pub leader: &'static str,
    pub runner_up: &'static str,
    /// Runner-up's mean loss minus the leader's (negative within the hysteresis).
    pub lead: f32,
    /// The choice's mean loss minus the best member's.
    pub trail: f32,
    /// The bound on `trail` (module docs).
    pub bound: f32,
    pub rounds: u64,
    pub switches: u64,
}

/// The online choice as a [`Model`] (module docs).
pub struct Online {
    members: Vec<Box<dyn Model>>,
    /// Per member, which of [`Online::label_horizons`] each of its own label
    /// horizons is (`None`: it does not learn at that one).
    heads: Vec<Vec<Option<usize>>>,
    chooser: Chooser,
    budget_slots: usize,
    /// What a slot kept for nothing for one tick costs, in hits:
    /// `p / (1 - p)` per horizon, `p` = [`WASTE_PRICE`].
    waste_price_per_tick: f64,
    /// Per member, the last [`RECENT_SCORES`] sampled scores (a ring).
    recent: Vec<Vec<f32>>,
    recent_next: usize,
    /// Per member, per threshold: the cut at the last sampling.
    cuts: Vec<[f32; CHOICE_THRESHOLDS.len()]>,
    scratch: Vec<f32>,
    /// The round being labelled: its tick, per expert the samples it
    /// selected that were kept for nothing, the choice's, samples.
    round_at_us: Option<u64>,
    round_losses: Vec<f64>,
    round_choice: f64,
    round_samples: u32,
    /// Per tick since, the requests that came before the next tick, and
    /// which experts had their keys selected (misses counted).
    request_rounds: std::collections::VecDeque<RequestRound>,
}

/// The requests after one tick (until the next), as each expert would have
/// served them.
struct RequestRound {
    at_us: u64,
    /// Active keys when the round's samples were taken.
    active: usize,
    /// The expert followed at that tick.
    followed: usize,
    requests: u32,
    misses: [u32; EXPERTS],
}

/// Ticks whose requests wait for their samples' labels (5 s of 10 ms
/// ticks, and room to spare); older ones are dropped.
const REQUEST_ROUNDS_MAX: usize = 1024;

impl Online {
    pub fn new(config: &PredictorConfig) -> Online {
        let members: Vec<Box<dyn Model>> = MEMBERS
            .iter()
            .map(|&(_, kind, scale)| {
                models::build(&PredictorConfig {
                    model: kind,
                    frequency_scale: scale,
                    ..config.clone()
                })
            })
            .collect();
        let heads = members
            .iter()
            .map(|member| {
                Self::LABEL_HORIZONS
                    .iter()
                    .map(|factor| member.label_horizons().iter().position(|f| f == factor))
                    .collect()
            })
            .collect();
        let window_rounds = (config.choice_window_ms as f64 / config.tick_ms as f64).max(1.0);
        // Losses are known when the longest label window closes.
        let longest_ms =
            (config.horizon_ms as f64 * f64::from(Self::LABEL_HORIZONS[WASTE_HEAD])).ceil() as u64;
        let delay_rounds = longest_ms.div_ceil(config.tick_ms) + 1;
        Online {
            chooser: Chooser::new(
                EXPERTS,
                FIRST_LEADER * CHOICE_THRESHOLDS.len(),
                window_rounds,
                f64::from(config.choice_hysteresis),
                delay_rounds,
            ),
            members,
            heads,
            budget_slots: config.choice_budget_slots,
            waste_price_per_tick: WASTE_PRICE / (1.0 - WASTE_PRICE) * config.tick_ms as f64
                / config.horizon_ms as f64,
            recent: vec![Vec::with_capacity(RECENT_SCORES); MEMBERS.len()],
            recent_next: 0,
            cuts: vec![CHOICE_THRESHOLDS; MEMBERS.len()],
            scratch: Vec::with_capacity(RECENT_SCORES),
            round_at_us: None,
            round_losses: vec![0.0; EXPERTS],
            round_choice: 0.0,
            round_samples: 0,
            request_rounds: std::collections::VecDeque::new(),
        }
    }

    /// Every member's label horizons (hold-value's include the others').
    const LABEL_HORIZONS: [f32; 3] = models::HOLD_HORIZONS;

    pub fn chooser(&self) -> &Chooser {
        &self.chooser
    }

    fn leader(&self) -> &dyn Model {
        self.members[self.leader_member()].as_ref()
    }

    /// The member of the expert the chooser follows.
    fn leader_member(&self) -> usize {
        self.chooser.leader() / CHOICE_THRESHOLDS.len()
    }

    /// Each member's cut per threshold, from its recent sampled scores.
    fn update_cuts(&mut self, active: usize) {
        for (m, recent) in self.recent.iter().enumerate() {
            let mut quantile = 0.0f32;
            if self.budget_slots > 0 && active > self.budget_slots && !recent.is_empty() {
                // The budget-th best of `active` keys: this share of them score higher.
                let above = self.budget_slots as f64 / active as f64;
                self.scratch.clear();
                self.scratch.extend_from_slice(recent);
                let index = ((1.0 - above) * self.scratch.len() as f64) as usize;
                let index = index.min(self.scratch.len() - 1);
                let (_, value, _) = self.scratch.select_nth_unstable_by(index, f32::total_cmp);
                quantile = *value;
            }
            self.cuts[m] = CHOICE_THRESHOLDS.map(|tau| tau.max(quantile));
        }
    }

    fn close_round(&mut self) {
        let (Some(at_us), samples) = (self.round_at_us, self.round_samples) else {
            return;
        };
        // The requests after this round's tick (older rounds without
        // samples of their own are dropped).
        while self
            .request_rounds
            .front()
            .is_some_and(|round| round.at_us < at_us)
        {
            self.request_rounds.pop_front();
        }
        let requests = match self.request_rounds.front() {
            Some(round) if round.at_us == at_us => self.request_rounds.pop_front(),
            _ => None,
        };
        let (active, misses, choice_misses, count) = match &requests {
            Some(round) => (
                round.active as f64,
                round.misses.map(f64::from),
                f64::from(round.misses[round.followed]),
                f64::from(round.requests),
            ),
            None => (0.0, [0.0; EXPERTS], 0.0, 0.0),
        };
        // Misses counted on every request; slots kept for nothing estimated
        // from the samples (uniform over the active keys); the sum divided
        // by its largest possible value, so the loss is in [0, 1].
        let price = self.waste_price_per_tick;
        let per_sample = active.max(f64::from(samples)) / f64::from(samples.max(1));
        let most = count + price * active.max(f64::from(samples));
        if most <= 0.0 {
            self.reset_round();
            return;
        }
        let loss = |misses: f64, wasted_samples: f64| {
            ((misses + price * wasted_samples * per_sample) / most).clamp(0.0, 1.0)
        };
        let losses: Vec<f64> = self
            .round_losses
            .iter()
            .zip(misses)
            .map(|(&wasted, misses)| loss(misses, wasted))
            .collect();
        self.chooser
            .observe(&losses, loss(choice_misses, self.round_choice));
        self.reset_round();
    }

    fn reset_round(&mut self) {
        self.round_losses.iter_mut().for_each(|sum| *sum = 0.0);
        self.round_choice = 0.0;
        self.round_samples = 0;
        self.round_at_us = None;
    }

    /// Which experts select a row now (bit `e` for expert `e`); records the
    /// members' scores for the budget's cut if `remember`.
    fn selection(
        &mut self,
        view: &FeatureView<'_>,
        row: usize,
        features: &[f32; FEATURES],
        remember: bool,
    ) -> u32 {
        let mut bits = 0u32;
        for (m, member) in self.members.iter().enumerate() {
            let score = member.score_one(view, row, features);
            for (j, &cut) in self.cuts[m].iter().enumerate() {
                // As the allocator: at or above the threshold, and above 0.
                if score >= cut && score > 0.0 {
                    bits |= 1 << (m * CHOICE_THRESHOLDS.len() + j);
                }
            }
            if remember {
                let recent = &mut self.recent[m];
                if recent.len() < RECENT_SCORES {
                    recent.push(score);
                } else {
                    recent[self.recent_next] = score;
                }
            }
        }
        bits
    }
}

/// The label horizon (of [`Online::LABEL_HORIZONS`]) that decides waste:
/// the longest, 10 x the horizon.
const WASTE_HEAD: usize = Online::LABEL_HORIZONS.len() - 1;

impl Model for Online {
    fn kind(&self) -> ModelKind {
        ModelKind::Online
    }
    fn score(&self, view: &FeatureView<'_>, out: &mut [f32]) {
        self.leader().score(view, out);
    }
    fn score_one(&self, view: &FeatureView<'_>, row: usize, features: &[f32; FEATURES]) -> f32 {
        self.leader().score_one(view, row, features)
    }
    fn learns(&self) -> bool {
        true
    }
    fn label_horizons(&self) -> &[f32] {
        &Self::LABEL_HORIZONS
    }
    fn learn(&mut self, head: usize, features: &[f32; FEATURES], requested: bool) {
        for (member, heads) in self.members.iter_mut().zip(&self.heads) {
            if let Some(own) = heads[head]
                && member.learns()
            {
                member.learn(own, features, requested);
            }
        }
    }
    fn horizon_probability(&self, features: &[f32; FEATURES]) -> Option<f32> {
        self.leader().horizon_probability(features)
    }
    fn sampled(
        &mut self,
        view: &FeatureView<'_>,
        rows: &[usize],
        features: &[[f32; FEATURES]],
        tags: &mut Vec<u64>,
    ) {
        self.update_cuts(view.len());
        let leader = self.chooser.leader();
        if self.request_rounds.len() >= REQUEST_ROUNDS_MAX {
            self.request_rounds.pop_front();
        }
        self.request_rounds.push_back(RequestRound {
            at_us: view.now_us,
            active: view.len(),
            followed: leader,
            requests: 0,
            misses: [0; EXPERTS],
        });
        for (&row, features) in rows.iter().zip(features) {
            let bits = self.selection(view, row, features, true);
            self.recent_next = (self.recent_next + 1) % RECENT_SCORES;
            tags.push(u64::from(bits) | (leader as u64) << 32);
        }
    }
    fn wants_requests(&self) -> bool {
        true
    }
    fn requested(&mut self, scored: Option<(&FeatureView<'_>, usize, &[f32; FEATURES])>) {
        if self.request_rounds.is_empty() {
            return;
        }
        let bits = match scored {
            Some((view, row, features)) => self.selection(view, row, features, false),
            None => 0,
        };
        let round = self.request_rounds.back_mut().expect("checked just above");
        round.requests += 1;
        for (e, misses) in round.misses.iter_mut().enumerate() {
            *misses += u32::from(bits >> e & 1 == 0);
        }
    }
    fn labelled(&mut self, head: usize, tag: u64, at_us: u64, requested: bool) -> u64 {
        if head != WASTE_HEAD {
            return tag;
        }
        let kept_for_nothing = !requested;
        if self.round_at_us.is_some_and(|at| at != at_us) {
            self.close_round();
        }
        self.round_at_us = Some(at_us);
        let bits = tag as u32;
        let followed = ((tag >> 32 & 0xff) as usize).min(EXPERTS - 1);
        for (e, wasted) in self.round_losses.iter_mut().enumerate() {
            let selected = bits >> e & 1 == 1;
            if selected && kept_for_nothing {
                *wasted += 1.0;
                if e == followed {
                    self.round_choice += 1.0;
                }
            }
        }
        self.round_samples += 1;
        tag
    }
    fn labels_done(&mut self) {
        self.close_round();
    }
    fn choice(&self) -> Option<ChoiceStatus> {
        let chooser = &self.chooser;
        let per_round = 1.0 / chooser.weight().max(1.0);
        let (runner_up, lead) = chooser.lead();
        // Before the first losses (5 s after the first samples) there is
        // nothing to say: NaN, which readers show as unknown.
        let figure = |value: f64| {
            if chooser.rounds == 0 {
                f32::NAN
            } else {
                value as f32
            }
        };
        Some(ChoiceStatus {
            leader: MEMBERS[chooser.leader() / CHOICE_THRESHOLDS.len()].0,
            runner_up: MEMBERS[runner_up / CHOICE_THRESHOLDS.len()].0,
            lead: figure(lead),
            trail: figure(chooser.trail() * per_round),
            bound: figure(chooser.bound() * per_round),
            rounds: chooser.rounds,
            switches: chooser.switches,
        })
    }
    fn describe(&self) -> String {
        let per_round = 1.0 / self.chooser.weight().max(1.0);
        // Each member at its best cut.
        let losses: Vec<String> = MEMBERS
            .iter()
            .zip(self.chooser.losses().chunks(CHOICE_THRESHOLDS.len()))
            .map(|((name, _, _), losses)| {
                let (j, loss) = losses
                    .iter()
                    .enumerate()
                    .min_by(|a, b| a.1.total_cmp(b.1))
                    .expect("one per cut");
                format!(
                    "{name} {:.4} (cut {})",
                    loss * per_round,
                    CHOICE_THRESHOLDS[j]
                )
            })
            .collect();
        let learnt: Vec<String> = self
            .members
            .iter()
            .filter(|member| member.learns())
            .map(|member| member.describe())
            .collect();
        format!(
            "online: leader {} after {} rounds and {} switches; mean loss per round: {}; {}",
            MEMBERS[self.leader_member()].0,
            self.chooser.rounds,
            self.chooser.switches,
            losses.join(", "),
            learnt.join(" ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator.
    fn random(state: &mut u64) -> f64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        (*state >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Plays `rounds` rounds of `losses(round, member)` with labels `delay`
    /// rounds late, as the forecaster does: the choice made when a round is
    /// played is the one whose loss counts. Checks the bound at every round;
    /// returns the leader at each round played.
    fn play(
        chooser: &mut Chooser,
        rounds: usize,
        delay: usize,
        mut losses: impl FnMut(usize, usize) -> f64,
    ) -> Vec<usize> {
        let members = chooser.losses().len();
        let mut played: Vec<(usize, Vec<f64>)> = Vec::new();
        let mut leaders = Vec::new();
        for round in 0..rounds + delay {
            if round < rounds {
                let row: Vec<f64> = (0..members).map(|m| losses(round, m)).collect();
                played.push((chooser.leader(), row));
                leaders.push(chooser.leader());
            }
            if round >= delay {
                let (followed, row) = &played[round - delay];
                chooser.observe(row, row[*followed]);
                assert!(
                    chooser.trail() <= chooser.bound() + 1e-9,
                    "round {round}: trail {} above the bound {}",
                    chooser.trail(),
                    chooser.bound()
                );
            }
        }
        leaders
    }

    #[test]
    fn the_choice_tracks_a_winner_that_changes_within_the_stated_margin() {
        // Three members; the winner changes every 2,000 rounds (0, 1, 2, 0, ...).
        // The winner's loss averages 0.05, the others' 0.15, with noise.
        let (window, delay) = (500.0, 51);
        let mut chooser = Chooser::new(3, 2, window, 1.0, delay as u64);
        let mut state = 7u64;
        let period = 2_000;
        let leaders = play(&mut chooser, 12_000, delay, |round, m| {
            let winner = (round / period) % 3;
            let mean = if m == winner { 0.05 } else { 0.15 };
            (mean + 0.1 * (random(&mut state) - 0.5)).clamp(0.0, 1.0)
        });
        for (period_index, chunk) in leaders.chunks(period).enumerate() {
            let winner = period_index % 3;
            // After the switch has had time (the window to forget the old
            // winner's lead, the delay to see it), the winner is followed.
            let settled = &chunk[period / 2..];
            assert!(
                settled.iter().all(|&l| l == winner),
                "period {period_index}: leaders {:?}",
                &settled[..10]
            );
        }
        // A mean margin per round: a few percent of a round's maximum loss.
        let margin = chooser.bound() / chooser.weight();
        assert!(margin < 0.25, "{margin}");
        assert!(
            chooser.switches >= 5 && chooser.switches < 20,
            "{}",
            chooser.switches
        );
    }

    #[test]
    fn the_bound_holds_on_adversarial_and_random_streams() {
        for seed in 1..20u64 {
            let mut state = seed;
            let members = 1 + (seed as usize % 7);
            let window = [10.0, 100.0, 3000.0][seed as usize % 3];
            let delay = (seed % 4) as usize * 17;
            let hysteresis = [0.0, 0.5, 3.0][seed as usize % 3];
            let mut chooser = Chooser::new(members, 0, window, hysteresis, delay as u64);
            let flip = 1 + (seed as usize * 13) % 60;
            play(&mut chooser, 3_000, delay, |round, m| {
                if seed % 2 == 0 {
                    // Adversarial: the member followed loses 1, the others 0,
                    // alternating in blocks against the delay.
                    f64::from(u8::from((round / flip + m) % members == 0))
                } else {
                    random(&mut state).powi(m as i32 + 1)
                }
            });
        }
    }
}
