//! `forelock replay TRACE`: replays a lock trace in simulated time through the
//! forecaster and the allocator policy, the same code the live system runs
//! (`forelock_predictor::forecaster` and `forelockd::allocator`), at a slot
//! budget, and reports how each model would have done.
//!
//! # What is simulated
//!
//! Time advances in ticks (10 ms by default). Each tick: the requests up to the
//! tick are served against the slots as the previous tick left them, then the
//! forecaster ticks, then each simulated broker calls its allocator policy and
//! applies the actions. A request finds its key:
//! - prepared and ready: a HIT (fast path);
//! - being prepared (within `--prepare-latency-us` of the Prepare): LATE;
//! - not prepared: a MISS; the slow path prepares a slot for it, as the broker does.
//!
//! A slot is held from a request for its `hold_us` and is never reclaimed while held.
//!
//! # What is reported
//!
//! - hit rate: hits / requests, overall and over requests whose key had been
//!   requested before in the trace ("seen before": no history foresees a new key);
//! - AUC-PR and Brier score of the forecaster's probabilities, sampled every
//!   `--eval-every` ticks over every active key (label: requested within the
//!   horizon after the tick); keys requested within the horizon but not scored
//!   count as positives at P = 0, so recall is bounded by what the model tracks;
//! - waste: a slot prepared ahead (a Prepare action) and freed without serving a
//!   single request is a wasted preparation; waste share = wasted / prepared.
//!   Wasted slot-seconds counts every slot-second that served nothing: unused
//!   preparations from prepare to free, and kept slots from their last release
//!   to free, or to the end of the trace for slots still prepared then (so
//!   keep-alive, which never prepares ahead, has waste too); "waste
//!   per budget" is that divided by (budget x trace duration), the mean share of
//!   the budget spent on nothing, the axis on which policies are compared;
//! - lateness: requests that arrived while their key was being prepared;
//! - the contention forecast: which requests find their key held by another
//!   client in a conflicting mode, and how well the contention estimator
//!   (fed as live) forecasts them, against "contended in the last horizon"
//!   (`replay/contention.rs`; once per replay, not per model).
//!
//! Baselines: "no prediction" is the slow path plus the stand-in
//! `KeepAlive` policy (a slot stays for T after its last use); the "oracle" knows
//! the future: it prepares, within the same budget, the keys whose next request
//! is soonest within the horizon.
//!
//! Each model runs once with the adaptive threshold (as live) and once per fixed
//! threshold of the sweep (`--thresholds`), all in one pass over the trace.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use forelock_predictor::config::{ModelKind, PredictorConfig};
use forelock_predictor::features::IdentityBuildHasher;
use forelock_predictor::forecaster::{Forecaster, select_top_k};
use forelock_predictor::trace::{Mode, Trace, TraceEvent, read_trace_file};
use forelockd::allocator::{
    Action, Feedback, KeepAlive, Policy, Predictive, PredictiveConfig, Score, SlotView, TickInput,
    rank_order, victim_order,
};
use serde::Serialize;

mod contention;
mod sim;
use sim::*;
#[cfg(test)]
mod reference;

/// Arguments of `forelock replay`.
#[derive(clap::Args, Debug, Clone)]
pub struct ReplayArgs {
    /// Trace to replay: CSV `ts_us,client,key,mode,hold_us`, plain or gzip.
    #[arg(required_unless_present = "synthetic")]
    pub trace: Option<PathBuf>,
    /// Replay a synthetic negative control instead: `uniform` or `zipf` keys,
    /// Poisson arrivals, no temporal structure (nothing should beat frequency).
    #[arg(long, value_parser = ["uniform", "zipf"])]
    pub synthetic: Option<String>,
    /// Slots the allocator may keep prepared [default: 10% of the trace's distinct keys, at least 64].
    #[arg(long)]
    pub budget: Option<usize>,
    /// Models to evaluate, comma-separated: keep-alive, frequency, successor, logistic, hold-value, online [default: all].
    #[arg(long, value_delimiter = ',')]
    pub model: Vec<String>,
    /// Fixed thresholds swept for each model (beside the adaptive run).
    #[arg(long, value_delimiter = ',', default_values_t = [0.7f32, 0.5, 0.3, 0.2, 0.15, 0.1, 0.07, 0.05, 0.03, 0.02, 0.015, 0.01, 0.007, 0.005])]
    pub thresholds: Vec<f32>,
    /// Keep-alive times (ms) swept for the no-prediction baseline; the first is the headline one.
    #[arg(long, value_delimiter = ',', default_values_t = [500u64, 100, 250, 1000, 2000, 5000, 15000])]
    pub keep_alive_ms: Vec<u64>,
    /// Replay only the first N rows.
    #[arg(long)]
    pub rows: Option<usize>,
    /// Forecaster configuration (TOML, as for forelock-predictor --config).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Time a preparation takes in the simulation, microseconds.
    #[arg(long, default_value_t = 50)]
    pub prepare_latency_us: u64,
    /// Score quality (AUC-PR, Brier) is sampled every this many ticks.
    #[arg(long, default_value_t = 10)]
    pub eval_every: u64,
    /// Write a PNG of hit rate (seen-before keys) against waste per budget as the threshold sweeps.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Threads for the independent passes (one per model, the baseline, the
    /// oracle) [default: one per core]; the results do not depend on it.
    #[arg(long)]
    pub threads: Option<usize>,
}

/// Entry point of `forelock replay`.
pub fn run(args: ReplayArgs) -> anyhow::Result<()> {
    let (name, mut trace) = match (&args.synthetic, &args.trace) {
        (Some(kind), _) => (
            format!("synthetic-{kind}"),
            synthetic_trace(kind, 200_000, 20_000, 7),
        ),
        (None, Some(path)) => (
            path.file_name().map_or_else(
                || path.display().to_string(),
                |n| n.to_string_lossy().into_owned(),
            ),
            read_trace_file(path).with_context(|| format!("replaying {}", path.display()))?,
        ),
        (None, None) => bail!("give a TRACE file or --synthetic uniform|zipf"),
    };
    if let Some(rows) = args.rows {
        trace = trace.head(rows);
    }
    let config = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            PredictorConfig::from_toml(&text)?
        }
        None => PredictorConfig::default(),
    };
    let models = if args.model.is_empty() {
        ModelKind::ALL.to_vec()
    } else {
        args.model
            .iter()
            .map(|name| {
                ModelKind::from_name(name).with_context(|| {
                    format!("unknown model {name:?}: expected keep-alive, frequency, successor, logistic, hold-value or online")
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?
    };
    let settings = ReplaySettings {
        budget_slots: args.budget.unwrap_or_else(|| default_budget(&trace)),
        thresholds: args.thresholds.clone(),
        keep_alive_ms: args.keep_alive_ms.clone(),
        prepare_latency_us: args.prepare_latency_us,
        eval_every_ticks: args.eval_every.max(1),
        mid_us: split_time(&trace),
        threads: args.threads.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        }),
    };
    let report = replay(&name, &trace, &config, &models, &settings);
    if let Some(path) = &args.plot {
        plot(&report, path).with_context(|| format!("writing the plot {}", path.display()))?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(())
}

/// The default budget: 10% of the distinct keys, at least 64 slots.
pub fn default_budget(trace: &Trace) -> usize {
    (trace.keys_distinct / 10).max(64)
}

/// Everything a replay needs beside the trace and the forecaster configuration.
#[derive(Debug, Clone)]
pub struct ReplaySettings {
    pub budget_slots: usize,
    pub thresholds: Vec<f32>,
    pub keep_alive_ms: Vec<u64>,
    pub prepare_latency_us: u64,
    pub eval_every_ticks: u64,
    /// Where the trace is split into the half thresholds are chosen on and
    /// the half they are reported on ([`split_time`]).
    pub mid_us: u64,
    /// Passes run on this many threads (the results do not depend on it).
    pub threads: usize,
}

/// The middle of the trace in time (the first and last request's mean).
pub fn split_time(trace: &Trace) -> u64 {
    match (trace.events.first(), trace.events.last()) {
        (Some(first), Some(last)) => first.ts_us + (last.ts_us - first.ts_us) / 2,
        _ => 0,
    }
}

/// One simulated configuration's results.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// "no prediction", "oracle", or a model name.
    pub policy: String,
    /// "adaptive", "threshold 0.30", "keep-alive 500 ms", ...
    pub setting: String,
    pub threshold: Option<f32>,
    pub requests: u64,
    pub hits: u64,
    pub hit_rate: f64,
    pub seen_before_requests: u64,
    pub hit_rate_seen_before: f64,
    pub late: u64,
    pub late_share: f64,
    pub prepares: u64,
    pub wasted: u64,
    /// Wasted preparations / preparations ahead.
    pub waste_share: f64,
    pub wasted_slot_seconds: f64,
    /// wasted_slot_seconds / (budget x duration).
    pub waste_per_budget: f64,
    /// Score quality of the model (same for every setting of one model).
    pub auc_pr: Option<f64>,
    pub brier: Option<f64>,
    /// The threshold the adaptive controller ended at.
    pub threshold_final: Option<f32>,
    /// The keep-alive time of a no-prediction run.
    pub keep_alive_ms: Option<u64>,
    /// The model at the end of the replay (learnt weights, for the logistic one).
    pub model: Option<String>,
    /// The same counts over the trace's first and second half.
    pub halves: [HalfReport; 2],
}

/// One run's results over half of the trace.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct HalfReport {
    pub requests: u64,
    pub hit_rate_seen_before: f64,
    pub prepares: u64,
    pub wasted: u64,
    /// Wasted slot-seconds in this half / (budget x half the duration).
    pub waste_per_budget: f64,
}

/// Out of sample: per policy and waste level, the setting that was best on
/// the first half, reported on the second; in sample, the best on the second
/// half in hindsight.
#[derive(Debug, Clone, Serialize)]
pub struct SplitRow {
    pub policy: String,
    /// Per level of [`EQUAL_WASTE_MULTIPLES`]: (setting chosen on the first
    /// half, its seen-before hit rate on the second, whether its waste on the
    /// second half stayed within the level), or None if no setting was
    /// within the level on the first half.
    pub out_of_sample: Vec<Option<(String, f64, bool)>>,
    /// Per level: the best seen-before hit rate on the second half among
    /// settings within the level there.
    pub in_sample: Vec<Option<f64>>,
}

/// A whole replay's results.
#[derive(Debug, Clone, Serialize)]
pub struct ReplayReport {
    pub trace: String,
    pub rows: usize,
    pub keys_distinct: usize,
    pub duration_s: f64,
    pub budget_slots: usize,
    pub horizon_ms: u64,
    pub tick_ms: u64,
    pub prepare_latency_us: u64,
    pub runs: Vec<RunReport>,
    /// Per policy: the best seen-before hit rate among its runs whose waste per
    /// budget is at most each of `equal_waste_levels`.
    pub equal_waste_levels: Vec<f64>,
    pub equal_waste: Vec<(String, Vec<Option<f64>>)>,
    /// Thresholds chosen on the first half, reported on the second.
    pub split: Vec<SplitRow>,
    /// Seen-before hit rates of demand-filled caches of the budget's size
    /// (no prediction, no waste limit): LRU and Belady's MIN, which evicts
    /// the key whose next request is farthest (the best any retention
    /// policy can do). Over the whole trace, and over the second half.
    pub retention: Retention,
    /// The contention estimate against the trace's contended requests
    /// (independent of the access model; see `replay/contention.rs`).
    pub contention: contention::ContentionReport,
}

/// Policies are compared at waste per budget up to these multiples of the
/// no-prediction baseline's (its first keep-alive setting, 500 ms by default):
/// absolute levels would mean nothing on a trace whose traffic fills 0.2% of
/// the budget and everything on one that fills it.
const EQUAL_WASTE_MULTIPLES: [f64; 4] = [1.0, 2.0, 4.0, 10.0];

impl ReplayReport {
    /// The headline table (adaptive runs, no prediction at its first keep-alive,
    /// oracle), then equal-waste comparison, then the sweep.
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "trace {}: {} rows, {} distinct keys, {:.1} s; budget {} slots; horizon {} ms, tick {} ms, prepare latency {} us",
            self.trace,
            self.rows,
            self.keys_distinct,
            self.duration_s,
            self.budget_slots,
            self.horizon_ms,
            self.tick_ms,
            self.prepare_latency_us
        );
        let header = format!(
            "{:<14} {:<18} {:>7} {:>9} {:>7} {:>7} {:>9} {:>9} {:>10} {:>7}\n",
            "policy",
            "setting",
            "hit%",
            "seen hit%",
            "AUC-PR",
            "Brier",
            "prep w.%",
            "waste/bud",
            "waste s.s",
            "late%"
        );
        let row = |run: &RunReport| {
            let optional =
                |value: Option<f64>| value.map_or_else(|| "-".to_owned(), |v| format!("{v:.3}"));
            format!(
                "{:<14} {:<18} {:>7.2} {:>9.2} {:>7} {:>7} {:>9.1} {:>9.3} {:>10.1} {:>7.3}\n",
                run.policy,
                run.setting,
                run.hit_rate * 100.0,
                run.hit_rate_seen_before * 100.0,
                optional(run.auc_pr),
                optional(run.brier),
                run.waste_share * 100.0,
                run.waste_per_budget,
                run.wasted_slot_seconds,
                run.late_share * 100.0
            )
        };
        out.push_str(&header);
        let headline_keep_alive = self.runs.iter().find(|run| run.policy == "no prediction");
        for run in self.runs.iter().filter(|run| {
            run.setting == "adaptive" || run.policy == "oracle" || Some(*run) == headline_keep_alive
        }) {
            out.push_str(&row(run));
        }
        let _ = writeln!(
            out,
            "\nbest seen-before hit% at waste per budget <= {:?} (1, 2, 4, 10 x no prediction's):",
            self.equal_waste_levels
                .iter()
                .map(|l| format!("{l:.4}"))
                .collect::<Vec<_>>()
        );
        for (policy, values) in &self.equal_waste {
            let cells: Vec<String> = values
                .iter()
                .map(|v| v.map_or_else(|| "-".to_owned(), |v| format!("{:.2}", v * 100.0)))
                .collect();
            let _ = writeln!(out, "{:<14} {}", policy, cells.join("  "));
        }
        let _ = writeln!(
            out,
            "\nout of sample: the setting best on the first half at waste per budget <= 1, 2, 4, 10 x no prediction's, \
             its seen-before hit% on the second half (* its waste there exceeds the level); in sample: the best on the second half"
        );
        for row in &self.split {
            let cells: Vec<String> = row
                .out_of_sample
                .iter()
                .zip(&row.in_sample)
                .map(|(out, inside)| {
                    let out = out.as_ref().map_or_else(
                        || "-".to_owned(),
                        |(_, v, within)| {
                            format!("{:.2}{}", v * 100.0, if *within { "" } else { "*" })
                        },
                    );
                    let inside =
                        inside.map_or_else(|| "-".to_owned(), |v| format!("{:.2}", v * 100.0));
                    format!("{out:>7} ({inside:>6})")
                })
                .collect();
            let _ = writeln!(out, "{:<14} {}", row.policy, cells.join("  "));
        }
        let r = &self.retention;
        let _ = writeln!(
            out,
            "\nretention with {} slots, seen-before hit%: LRU {:.2}, Belady's MIN {:.2} (second half: {:.2}, {:.2})",
            self.budget_slots,
            r.lru * 100.0,
            r.belady * 100.0,
            r.lru_second_half * 100.0,
            r.belady_second_half * 100.0
        );
        let _ = writeln!(out, "\nsweep:");
        out.push_str(&header);
        for run in &self.runs {
            out.push_str(&row(run));
        }
        out.push_str(&self.contention.table(self.horizon_ms));
        out
    }
}

impl PartialEq for RunReport {
    fn eq(&self, other: &Self) -> bool {
        self.policy == other.policy && self.setting == other.setting
    }
}

// ---------------------------------------------------------------------------
// Trace facts the simulation needs, computed once.

const NONE_US: u64 = u64::MAX;
/// No slot for the key (in [`Sim::slot_of_key`]).
const NO_SLOT: u32 = u32::MAX;
/// No dense key number known (in [`TickShared::row_ids`]).
const NO_ID: u32 = u32::MAX;
/// One bit per simulated broker of a pass ([`TickShared::holders`]): 32,
/// enough for the adaptive run and the default 14 thresholds; a `u32` per
/// key rather than a `u64` keeps the array, read at random, half as large.
type HolderBits = u32;

struct TraceIndex {
    /// Time of the previous request of the same key, or NONE_US.
    previous_us: Vec<u64>,
    /// Time of the next request of the same key, or NONE_US.
    next_us: Vec<u64>,
    /// First request time of every key.
    first_us: HashMap<u64, u64, IdentityBuildHasher>,
    /// Whether the request found its key held by another client in a
    /// conflicting mode (see `replay/contention.rs`).
    contended: Vec<bool>,
    /// Each request's key as a dense number (0, 1, ... in order of first
    /// request): the simulated brokers index their slots by it instead of
    /// hashing the key at every request and every tick.
    key_id: Vec<u32>,
    /// Key hash to its dense number.
    id_of: HashMap<u64, u32, IdentityBuildHasher>,
}

impl TraceIndex {
    fn new(trace: &Trace) -> TraceIndex {
        let n = trace.events.len();
        let mut previous_us = vec![NONE_US; n];
        let mut next_us = vec![NONE_US; n];
        let mut last_index: HashMap<u64, usize, IdentityBuildHasher> = HashMap::default();
        let mut first_us: HashMap<u64, u64, IdentityBuildHasher> = HashMap::default();
        let mut key_id = Vec::with_capacity(n);
        let mut id_of: HashMap<u64, u32, IdentityBuildHasher> = HashMap::default();
        for (i, event) in trace.events.iter().enumerate() {
            if let Some(&before) = last_index.get(&event.key_hash) {
                previous_us[i] = trace.events[before].ts_us;
                next_us[before] = event.ts_us;
            }
            first_us.entry(event.key_hash).or_insert(event.ts_us);
            last_index.insert(event.key_hash, i);
            let next_id = u32::try_from(id_of.len()).expect("fewer than 2^32 keys in a trace");
            key_id.push(*id_of.entry(event.key_hash).or_insert(next_id));
        }
        TraceIndex {
            previous_us,
            next_us,
            first_us,
            contended: contention::contended_flags(&trace.events),
            key_id,
            id_of,
        }
    }

    /// Distinct keys (dense numbers are below this).
    fn keys(&self) -> usize {
        self.id_of.len()
    }

    /// The dense number of a key the policy names: every such key came from
    /// the trace (the forecaster and the oracle know no other).
    fn id(&self, key_hash: u64) -> u32 {
        *self
            .id_of
            .get(&key_hash)
            .expect("every key a policy names was requested in the trace")
    }
}

// ---------------------------------------------------------------------------
// Where scores come from.

enum Source {
    /// No scores (the no-prediction baseline).
    Nothing,
    Forecaster(Box<Forecaster>),
    /// Knows every key's next request.
    Oracle {
        next_us: HashMap<u64, u64, IdentityBuildHasher>,
    },
}

impl Source {
    /// P for a key, as the allocator sees it on a prepared slot.
    fn score_of(&self, key_hash: u64, now_us: u64, horizon_us: u64) -> Option<f32> {
        match self {
            Source::Nothing => None,
            Source::Forecaster(forecaster) => forecaster.probability_of(key_hash),
            Source::Oracle { next_us } => Some(
                next_us
                    .get(&key_hash)
                    .map_or(0.0, |&next| oracle_score(next, now_us, horizon_us)),
            ),
        }
    }
}

/// What the simulated brokers of one pass share: the source's score of
/// each key at this tick, looked up once for all of them (each slot of each
/// broker asks, and the brokers of a pass hold mostly the same keys), the
/// dense numbers of the ranked keys, and which brokers hold each key. The
/// source does not change between [`TickShared::next_tick`] calls, so a
/// remembered score is the one `Source::score_of` would give again: the
/// results are those of asking every time
/// (`the_fast_replay_reports_what_the_reference_replay_does`).
struct TickShared {
    /// Per key, in a tick not filled (the oracle's, or a forecaster's
    /// asked lazily): (the tick it was looked up at, its score then; NaN
    /// for `None`, which no source gives as a score: the forecaster's are
    /// clamped to [0, 1], the oracle's are in [0, 1]).
    scores: Vec<(u32, f32)>,
    /// The current tick's stamp (never 0, the stamp of "not looked up").
    stamp: u32,
    /// Whether this tick's scores were all filled in from the forecaster
    /// ([`TickShared::fill`]), into `filled_scores`.
    filled: bool,
    /// Per key, its score at the tick last filled: the forecaster's for an
    /// active key, 0 for any other, as `Forecaster::probability_of` says of
    /// a key not active. Plain `f32`s, half the size of `scores`, because
    /// every slot of every broker reads its key's score here at random:
    /// on tpcc-pg-a (378,000 keys) this array fits a core's 2 MB L2 cache.
    filled_scores: Vec<f32>,
    /// Per forecaster row: the key hash it held when last seen and its
    /// dense number (rows move, hashes do not: a changed hash is looked up
    /// again).
    row_ids: Vec<(u64, u32)>,
    /// Per key, bit `b` set while the broker with [`Sim::holder_bit`] `b`
    /// has the key in a slot (empty when a pass has more brokers than
    /// [`HolderBits`] has bits).
    holders: Vec<HolderBits>,
    /// Dense numbers of the first ranked keys, and their holders when the
    /// tick began (as far as a broker asked). A broker's own bit changes
    /// only in its own tick, after it has read the candidates, so the
    /// bits read at any time in the tick are those at its start.
    ranked_ids: Vec<u32>,
    ranked_holders: Vec<HolderBits>,
    /// This tick's ranking, highest first ([`TickShared::ranked`]), and,
    /// from the forecaster, the keys not yet in it ([`top_rows`], less
    /// those no broker takes: [`TickShared::keep_wanted`]): ranked in
    /// chunks, as far as a broker reads.
    ranked: Vec<Score>,
    unranked: Vec<(u64, f32, u32)>,
}

impl TickShared {
    fn new(keys: usize, brokers: usize) -> TickShared {
        TickShared {
            scores: vec![(0, f32::NAN); keys],
            filled_scores: vec![0.0; keys],
            stamp: 0,
            filled: false,
            row_ids: Vec::new(),
            holders: if brokers <= HolderBits::BITS as usize {
                vec![0; keys]
            } else {
                Vec::new()
            },
            ranked_ids: Vec::new(),
            ranked_holders: Vec::new(),
            ranked: Vec::new(),
            unranked: Vec::new(),
        }
    }

    /// A new tick: forget every remembered score and number.
    fn next_tick(&mut self) {
        self.stamp = self.stamp.wrapping_add(1);
        if self.stamp == 0 {
            // 2^32 ticks: clear rather than confuse a stamp from long ago.
            self.scores.fill((0, f32::NAN));
            self.stamp = 1;
        }
        self.ranked_ids.clear();
        self.ranked_holders.clear();
        self.ranked.clear();
        self.unranked.clear();
        self.filled = false;
    }

    /// Takes every active key's score from the forecaster in one pass over
    /// its rows (in row order, where looking each slot's key up would jump
    /// about its index and arrays).
    fn fill(&mut self, forecaster: &Forecaster, index: &TraceIndex) {
        let Some((keys, probabilities)) = forecaster.scores() else {
            return; // not current: `probability_of` says None, asked lazily
        };
        // The keys of the last fill back to 0 (every key filled then is in
        // `row_ids`), then this tick's scores.
        for &(_, key_id) in &self.row_ids {
            if key_id != NO_ID {
                self.filled_scores[key_id as usize] = 0.0;
            }
        }
        if self.row_ids.len() < keys.len() {
            self.row_ids.resize(keys.len(), (0, NO_ID));
        }
        for ((&key_hash, &probability), cached) in
            keys.iter().zip(probabilities).zip(&mut self.row_ids)
        {
            if cached.0 != key_hash || cached.1 == NO_ID {
                *cached = (key_hash, index.id(key_hash));
            }
            self.filled_scores[cached.1 as usize] = probability;
        }
        self.filled = true;
    }

    fn score(
        &mut self,
        source: &Source,
        key_id: u32,
        key_hash: u64,
        now_us: u64,
        horizon_us: u64,
    ) -> Option<f32> {
        if matches!(source, Source::Nothing) {
            return None;
        }
        if self.filled {
            return Some(self.filled_score(key_id));
        }
        let entry = &mut self.scores[key_id as usize];
        if entry.0 != self.stamp {
            let score = source.score_of(key_hash, now_us, horizon_us);
            debug_assert!(score.is_none_or(|p| !p.is_nan()), "{score:?}");
            *entry = (self.stamp, score.unwrap_or(f32::NAN));
        }
        (!entry.1.is_nan()).then_some(entry.1)
    }

    /// A key's score in a tick whose scores were [`TickShared::fill`]ed.
    fn filled_score(&self, key_id: u32) -> f32 {
        self.filled_scores[key_id as usize]
    }

    /// The key at `rank` in this tick's ranking (highest first), if any,
    /// its dense number (and holders) known, as of every key before it.
    /// The rows from the forecaster are ranked in chunks, each the best of
    /// those left, sorted ([`rank_next`]): the same order as sorting them
    /// all at once, since `rank_order` is total.
    fn ranked(&mut self, rank: usize, index: &TraceIndex) -> Option<Score> {
        while self.ranked.len() <= rank && !self.unranked.is_empty() {
            let chunk = rank_next(&mut self.unranked, self.ranked.len().max(1024));
            self.ranked
                .extend(chunk.iter().map(|&(key_hash, probability, _)| Score {
                    key_hash,
                    probability,
                    contention: 0.0,
                }));
            self.ranked_ids
                .extend(chunk.iter().map(|&(_, _, key_id)| key_id));
            let taken = chunk.len();
            self.unranked.drain(..taken);
        }
        let score = *self.ranked.get(rank)?;
        self.rank_known(rank, index);
        Some(score)
    }

    /// Makes the dense numbers (and holders) of `ranked[..=rank]` known:
    /// those ranked from the forecaster's rows came with their numbers;
    /// the oracle's are looked up.
    fn rank_known(&mut self, rank: usize, index: &TraceIndex) {
        while self.ranked_ids.len() <= rank {
            let key_hash = self.ranked[self.ranked_ids.len()].key_hash;
            self.ranked_ids.push(index.id(key_hash));
        }
        debug_assert_eq!(self.ranked_ids[rank], index.id(self.ranked[rank].key_hash));
        if !self.holders.is_empty() {
            while self.ranked_holders.len() <= rank {
                let key_id = self.ranked_ids[self.ranked_holders.len()];
                self.ranked_holders.push(self.holders[key_id as usize]);
            }
        }
    }

    /// Leaves in `unranked` only the keys some broker may take as a
    /// candidate this tick: scored at or above its threshold and held by it
    /// in no slot, for some `(threshold, holder bit)` of `takers`, each
    /// broker's as its tick will read them (a broker's threshold and its
    /// own holder bit change only in its own tick, after it has read its
    /// candidates). A broker walks the ranking past the keys it holds and
    /// stops at the first under its threshold, so with the others left out
    /// it takes the same candidates in the same order, without the ranking
    /// sorting the many keys every broker already holds.
    fn keep_wanted(&mut self, takers: &mut [(f32, HolderBits)]) {
        // Ascending thresholds, each with the bits of the brokers at or
        // under it: a key scored `p` may go to the brokers of the last
        // threshold at or under `p`.
        takers.sort_unstable_by(|a, b| a.0.total_cmp(&b.0));
        let mut bits = 0;
        for (_, bit) in takers.iter_mut() {
            bits |= *bit;
            *bit = bits;
        }
        let holders = &self.holders;
        self.unranked.retain(|&(_, probability, key_id)| {
            match takers.partition_point(|&(threshold, _)| threshold <= probability) {
                0 => false,
                under => takers[under - 1].1 & !holders[key_id as usize] != 0,
            }
        });
    }

    /// Marks key `key_id` held, or not, by the broker with `bit`.
    fn set_holder(&mut self, key_id: u32, bit: HolderBits, held: bool) {
        if let Some(holders) = self.holders.get_mut(key_id as usize) {
            if held {
                *holders |= bit;
            } else {
                *holders &= !bit;
            }
        }
    }
}

/// The oracle's "probability": in [0.5, 1] for keys requested within the horizon,
/// sooner is higher; 0 otherwise.
fn oracle_score(next_us: u64, now_us: u64, horizon_us: u64) -> f32 {
    if next_us == NONE_US || next_us <= now_us || next_us - now_us > horizon_us {
        0.0
    } else {
        1.0 - 0.5 * (next_us - now_us) as f32 / horizon_us as f32
    }
}

// ---------------------------------------------------------------------------
// Score quality: binned precision-recall and Brier score.

const QUALITY_BINS: usize = 1000;

struct Quality {
    positives: Vec<u64>,
    negatives: Vec<u64>,
    unscored_positives: u64,
    brier_sum: f64,
    brier_count: u64,
}

impl Quality {
    fn new() -> Quality {
        Quality {
            positives: vec![0; QUALITY_BINS],
            negatives: vec![0; QUALITY_BINS],
            unscored_positives: 0,
            brier_sum: 0.0,
            brier_count: 0,
        }
    }

    fn add(&mut self, probability: f32, requested: bool) {
        let bin = ((probability * QUALITY_BINS as f32) as usize).min(QUALITY_BINS - 1);
        let label = if requested { 1.0 } else { 0.0 };
        if requested {
            self.positives[bin] += 1;
        } else {
            self.negatives[bin] += 1;
        }
        self.brier_sum += f64::from(probability - label).powi(2);
        self.brier_count += 1;
    }

    /// (average precision over thresholds above 0, Brier score).
    fn result(&self) -> (f64, f64) {
        let positives_total = self.positives.iter().sum::<u64>() + self.unscored_positives;
        let mut true_positives = 0u64;
        let mut predicted = 0u64;
        let mut area = 0.0;
        for bin in (1..QUALITY_BINS).rev() {
            if self.positives[bin] + self.negatives[bin] == 0 {
                continue;
            }
            true_positives += self.positives[bin];
            predicted += self.positives[bin] + self.negatives[bin];
            let precision = true_positives as f64 / predicted as f64;
            area += precision * self.positives[bin] as f64 / positives_total.max(1) as f64;
        }
        let brier_count = self.brier_count + self.unscored_positives;
        let brier = (self.brier_sum + self.unscored_positives as f64) / brier_count.max(1) as f64;
        (area, brier)
    }
}

// ---------------------------------------------------------------------------
// The replay.

/// Replays `trace` for every model, the no-prediction baseline and the oracle.
pub fn replay(
    name: &str,
    trace: &Trace,
    config: &PredictorConfig,
    models: &[ModelKind],
    settings: &ReplaySettings,
) -> ReplayReport {
    let index = TraceIndex::new(trace);
    let variants = variants(config, models, settings);

    // Every pass is independent of the others (its own forecaster, its own
    // sims; the trace and its index are shared read-only): the passes run
    // on every core, the costliest first, and their results are put back
    // in the order of the report, so the output is the same whatever the
    // threads (`replay_in_parallel_gives_the_results_of_one_thread`).
    let mut jobs: Vec<Job> = vec![Job::NoPrediction, Job::Oracle, Job::Contention];
    jobs.extend((0..variants.len()).map(Job::Variant));
    let cost = |job: &Job| match job {
        Job::Variant(i) => match variants[*i].1.model {
            ModelKind::Online => 6,
            ModelKind::HoldValue => 5,
            ModelKind::Logistic => 4,
            _ => 2,
        },
        Job::Contention => 3,
        Job::NoPrediction | Job::Oracle => 1,
    };
    let mut order: Vec<usize> = (0..jobs.len()).collect();
    order.sort_by_key(|&j| std::cmp::Reverse(cost(&jobs[j])));
    let threads = settings.threads.clamp(1, jobs.len());
    let next_job = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<std::sync::Mutex<Option<JobResult>>> =
        jobs.iter().map(|_| std::sync::Mutex::new(None)).collect();
    let run_job = |job: &Job| -> JobResult {
        match *job {
            Job::NoPrediction => {
                JobResult::Runs(no_prediction_runs(trace, &index, config, settings))
            }
            Job::Oracle => JobResult::Runs(vec![oracle_run(trace, &index, config, settings)]),
            Job::Contention => JobResult::Contention(Box::new(contention::score(
                &trace.events,
                &index.contended,
                config,
                settings.eval_every_ticks,
                forelockd::config::Config::default_config()
                    .allocator
                    .contention_threshold,
            ))),
            Job::Variant(i) => {
                let (name, model_config) = &variants[i];
                JobResult::Runs(model_runs(
                    trace,
                    &index,
                    config,
                    name,
                    model_config,
                    settings,
                ))
            }
        }
    };
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                loop {
                    let taken = next_job.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(&j) = order.get(taken) else { break };
                    let result = run_job(&jobs[j]);
                    *results[j].lock().expect("no job panics while holding it") = Some(result);
                }
            });
        }
    });
    let mut results: Vec<Option<JobResult>> = results
        .into_iter()
        .map(|cell| cell.into_inner().expect("no job panicked"))
        .collect();
    let mut take = |j: usize| results[j].take().expect("every job ran");
    let mut runs = Vec::new();
    let mut contention = None;
    // The report's order: no prediction, the models, the oracle.
    let mut report_order = vec![0];
    report_order.extend(3..jobs.len());
    report_order.push(1);
    report_order.push(2);
    for j in report_order {
        match take(j) {
            JobResult::Runs(more) => runs.extend(more),
            JobResult::Contention(report) => contention = Some(*report),
        }
    }
    let contention = contention.expect("the contention job ran");

    assemble(name, trace, &index, config, settings, runs, contention)
}

/// The passes of [`replay`]: the frequency model at its three scales, each
/// other model once.
fn variants(
    config: &PredictorConfig,
    models: &[ModelKind],
    settings: &ReplaySettings,
) -> Vec<(String, PredictorConfig)> {
    // The frequency model runs at three decay scales: on a stream without
    // temporal structure the longest one is the benchmark nothing should beat.
    let mut variants: Vec<(String, PredictorConfig)> = Vec::new();
    for &model in models {
        if model == ModelKind::Frequency {
            for (scale, name) in [
                (1, "frequency 0.5s"),
                (2, "frequency 5s"),
                (3, "frequency 60s"),
            ] {
                let scaled = PredictorConfig {
                    model,
                    frequency_scale: scale,
                    ..config.clone()
                };
                variants.push((name.to_owned(), scaled));
            }
        } else {
            variants.push((
                model.name().to_owned(),
                PredictorConfig {
                    model,
                    // The online choice judges its members at the budget the
                    // simulated broker has, as it would be told live.
                    choice_budget_slots: settings.budget_slots,
                    ..config.clone()
                },
            ));
        }
    }
    variants
}

/// Puts the passes' results together: the tables derived from the runs,
/// and the trace's retention bounds.
fn assemble(
    name: &str,
    trace: &Trace,
    index: &TraceIndex,
    config: &PredictorConfig,
    settings: &ReplaySettings,
    runs: Vec<RunReport>,
    contention: contention::ContentionReport,
) -> ReplayReport {
    let mut policies: Vec<String> = Vec::new();
    for run in &runs {
        if !policies.contains(&run.policy) {
            policies.push(run.policy.clone());
        }
    }
    let baseline_waste = runs
        .iter()
        .find(|run| run.policy == "no prediction")
        .map_or(0.1, |run| run.waste_per_budget.max(1e-9));
    let equal_waste_levels: Vec<f64> = EQUAL_WASTE_MULTIPLES
        .iter()
        .map(|m| m * baseline_waste)
        .collect();
    let equal_waste = policies
        .into_iter()
        .map(|policy| {
            let values = equal_waste_levels
                .iter()
                .map(|&level| {
                    runs.iter()
                        .filter(|run| run.policy == policy && run.waste_per_budget <= level)
                        .map(|run| run.hit_rate_seen_before)
                        .fold(None, |best: Option<f64>, v| {
                            Some(best.map_or(v, |b| b.max(v)))
                        })
                })
                .collect();
            (policy, values)
        })
        .collect();

    let split = split_rows(&runs);
    let retention = retention(trace, index, settings.budget_slots, settings.mid_us);
    ReplayReport {
        trace: name.to_owned(),
        rows: trace.events.len(),
        keys_distinct: trace.keys_distinct,
        duration_s: trace.duration_us() as f64 * 1e-6,
        budget_slots: settings.budget_slots,
        horizon_ms: config.horizon_ms,
        tick_ms: config.tick_ms,
        prepare_latency_us: settings.prepare_latency_us,
        runs,
        equal_waste_levels,
        equal_waste,
        split,
        retention,
        contention,
    }
}

/// The out-of-sample table (see [`SplitRow`]).
fn split_rows(runs: &[RunReport]) -> Vec<SplitRow> {
    let Some(baseline) = runs.iter().find(|run| run.policy == "no prediction") else {
        return Vec::new();
    };
    let level =
        |half: usize, multiple: f64| multiple * baseline.halves[half].waste_per_budget.max(1e-9);
    let mut policies: Vec<&str> = Vec::new();
    for run in runs {
        if !policies.contains(&run.policy.as_str()) && run.policy != "oracle" {
            policies.push(&run.policy);
        }
    }
    policies
        .into_iter()
        .map(|policy| {
            let mine: Vec<&RunReport> = runs.iter().filter(|run| run.policy == policy).collect();
            let best_on = |half: usize, limit: f64| {
                mine.iter()
                    .filter(|run| run.halves[half].waste_per_budget <= limit)
                    // The first of equals: the sweep's order decides ties.
                    .fold(None, |best: Option<&&RunReport>, run| match best {
                        Some(b)
                            if b.halves[half].hit_rate_seen_before
                                >= run.halves[half].hit_rate_seen_before =>
                        {
                            Some(b)
                        }
                        _ => Some(run),
                    })
                    .copied()
            };
            SplitRow {
                policy: policy.to_owned(),
                out_of_sample: EQUAL_WASTE_MULTIPLES
                    .iter()
                    .map(|&m| {
                        best_on(0, level(0, m)).map(|run| {
                            (
                                run.setting.clone(),
                                run.halves[1].hit_rate_seen_before,
                                run.halves[1].waste_per_budget <= level(1, m),
                            )
                        })
                    })
                    .collect(),
                in_sample: EQUAL_WASTE_MULTIPLES
                    .iter()
                    .map(|&m| best_on(1, level(1, m)).map(|run| run.halves[1].hit_rate_seen_before))
                    .collect(),
            }
        })
        .collect()
}

/// See [`ReplayReport::retention`].
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Retention {
    pub lru: f64,
    pub belady: f64,
    pub lru_second_half: f64,
    pub belady_second_half: f64,
}

/// LRU and Belady's MIN over the trace with `capacity` slots, filled on
/// demand (every request leaves its key cached).
fn retention(trace: &Trace, index: &TraceIndex, capacity: usize, mid_us: u64) -> Retention {
    use std::collections::BTreeSet;
    let capacity = capacity.max(1);
    let mut hits = [[0u64; 2]; 2]; // [lru, belady][half]
    let mut seen = [0u64; 2];
    // LRU: (last use sequence, key) ordered; key -> its sequence.
    let mut lru_order: BTreeSet<(u64, u64)> = BTreeSet::new();
    let mut lru_of: HashMap<u64, u64, IdentityBuildHasher> = HashMap::default();
    // MIN: (next use time, key) ordered; key -> its next use.
    let mut min_order: BTreeSet<(u64, u64)> = BTreeSet::new();
    let mut min_of: HashMap<u64, u64, IdentityBuildHasher> = HashMap::default();
    for (i, event) in trace.events.iter().enumerate() {
        let half = usize::from(event.ts_us >= mid_us);
        let seen_before = index.previous_us[i] != NONE_US;
        seen[half] += u64::from(seen_before);
        let key = event.key_hash;
        let sequence = i as u64;
        if let Some(old) = lru_of.insert(key, sequence) {
            lru_order.remove(&(old, key));
            hits[0][half] += u64::from(seen_before);
        } else if lru_order.len() >= capacity
            && let Some(victim) = lru_order.pop_first()
        {
            lru_of.remove(&victim.1);
        }
        lru_order.insert((sequence, key));
        // Ties on the next use (NONE_US: never again) are broken by key.
        let next = index.next_us[i];
        if let Some(old) = min_of.insert(key, next) {
            min_order.remove(&(old, key));
            hits[1][half] += u64::from(seen_before);
        } else if min_order.len() >= capacity
            && let Some(victim) = min_order.pop_last()
        {
            min_of.remove(&victim.1);
        }
        min_order.insert((next, key));
    }
    let share = |hits: u64, whole: u64| hits as f64 / whole.max(1) as f64;
    Retention {
        lru: share(hits[0][0] + hits[0][1], seen[0] + seen[1]),
        belady: share(hits[1][0] + hits[1][1], seen[0] + seen[1]),
        lru_second_half: share(hits[0][1], seen[1]),
        belady_second_half: share(hits[1][1], seen[1]),
    }
}

/// One independent pass of [`replay`].
enum Job {
    NoPrediction,
    Oracle,
    Contention,
    Variant(usize),
}

enum JobResult {
    Runs(Vec<RunReport>),
    Contention(Box<contention::ContentionReport>),
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
                Reclaim::KeepAlive {
                    keep_alive_us: ms * 1000,
                },
                "no prediction",
                format!("keep-alive {ms} ms"),
                settings,
                index.keys(),
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
    let mut sims = predictive_sims(name, settings, index.keys());
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
    let oracle_config = PredictiveConfig {
        threshold_initial: 0.4,
        adaptive: false,
        // Free a slot as soon as its key is not needed within the horizon.
        unused_timeout_us: 0,
        idle_timeout_us: 0,
        prepares_per_tick_max: usize::MAX / 8,
        eviction_margin: 0.0,
        ..PredictiveConfig::default()
    };
    let mut oracle = Sim::new(
        Box::new(Predictive::new(oracle_config)),
        Reclaim::of_predictive(&oracle_config),
        "oracle",
        "hindsight".to_owned(),
        settings,
        index.keys(),
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

fn predictive_sims(model_name: &str, settings: &ReplaySettings, keys: usize) -> Vec<Sim> {
    let mut sims = vec![{
        let mut sim = Sim::new(
            Box::new(Predictive::new(PredictiveConfig::default())),
            Reclaim::of_predictive(&PredictiveConfig::default()),
            model_name,
            "adaptive".to_owned(),
            settings,
            keys,
        );
        sim.adaptive = true;
        sim
    }];
    for &threshold in &settings.thresholds {
        let policy_config = PredictiveConfig {
            threshold_initial: threshold,
            threshold_min: threshold.min(PredictiveConfig::default().threshold_min),
            adaptive: false,
            ..PredictiveConfig::default()
        };
        let mut sim = Sim::new(
            Box::new(Predictive::new(policy_config)),
            Reclaim::of_predictive(&policy_config),
            model_name,
            format!("threshold {threshold}"),
            settings,
            keys,
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
    let mut shared = TickShared::new(index.keys(), sims.len());
    if sims.len() <= HolderBits::BITS as usize {
        for (i, sim) in sims.iter_mut().enumerate() {
            sim.holder_bit = 1 << i;
        }
    }
    let mut tick_number = 0u64;
    let min_threshold = sims
        .iter()
        .map(|sim| sim.policy.threshold())
        .fold(1.0f32, f32::min)
        .max(1e-3);
    // Per key (dense number): its next request after the events served so
    // far, or its first one before it is requested (for the labels).
    let mut key_next_us: Vec<u64> = if quality.is_some() {
        let mut first = vec![NONE_US; index.keys()];
        for (i, event) in events.iter().enumerate() {
            if index.previous_us[i] == NONE_US {
                first[index.key_id[i] as usize] = event.ts_us;
            }
        }
        first
    } else {
        Vec::new()
    };
    // This tick's requests, for the forecaster (which sees them only at the
    // tick anyway: one prefetched batch, as the live predictor does).
    let mut batch: Vec<(u64, u32, u64)> = Vec::new();
    loop {
        while next < events.len() && events[next].ts_us <= now_us {
            let event = &events[next];
            let seen_before = index.previous_us[next] != NONE_US;
            let key_id = index.key_id[next];
            for sim in sims.iter_mut() {
                sim.request(event, key_id, seen_before, &mut shared);
            }
            match source {
                Source::Nothing => {}
                Source::Forecaster(_) => batch.push((event.ts_us, event.client, event.key_hash)),
                Source::Oracle { next_us } => {
                    next_us.insert(event.key_hash, index.next_us[next]);
                }
            }
            if quality.is_some() {
                key_next_us[key_id as usize] = index.next_us[next];
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

        shared.next_tick();
        match source {
            Source::Nothing => {}
            Source::Forecaster(forecaster) => {
                forecaster.tick(now_us);
                shared.fill(forecaster, index);
                let budget = sims.first().map_or(0, |sim| sim.budget_slots);
                top_rows(
                    forecaster,
                    &shared.row_ids,
                    budget,
                    min_threshold,
                    &mut shared.unranked,
                );
                let takers: Option<Vec<(f32, HolderBits)>> =
                    sims.iter().filter_map(|sim| sim.takes()).collect();
                if let Some(mut takers) = takers {
                    shared.keep_wanted(&mut takers);
                }
                if let Some(quality) = quality.as_deref_mut()
                    && tick_number % settings.eval_every_ticks == 0
                {
                    evaluate(
                        forecaster,
                        &key_next_us,
                        &shared,
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
                        shared.ranked.push(Score {
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
            sim.tick(now_us, horizon_us, source, &mut shared, index);
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

/// `Forecaster::top_k`'s keys, unsorted, with each key's dense number
/// beside it (`row_ids`, per forecaster row, as [`TickShared::fill`] left
/// them this tick): `(key_hash, probability, key_id)`, the same selection
/// (`select_top_k`, by probability, then key hash); [`rank_next`] sorts
/// them, so the same keys in the same order (`top_rows_ranks_as_top_k`).
/// The numbers are read here, in row order, rather than per ranked key,
/// which would jump about `row_ids`.
fn top_rows(
    forecaster: &Forecaster,
    row_ids: &[(u64, u32)],
    k: usize,
    min_probability: f32,
    out: &mut Vec<(u64, f32, u32)>,
) {
    out.clear();
    let Some((keys, probabilities)) = forecaster.scores() else {
        return;
    };
    out.extend(
        keys.iter()
            .zip(probabilities)
            .zip(row_ids)
            .filter(|((_, p), _)| **p >= min_probability)
            .map(|((&key_hash, &p), &(row_key_hash, key_id))| {
                debug_assert_eq!(key_hash, row_key_hash);
                (key_hash, p, key_id)
            }),
    );
    debug_assert!(row_ids.len() >= keys.len());
    select_top_k(out, k, row_rank);
}

fn row_rank(&(key_hash, probability, _): &(u64, f32, u32)) -> (f32, u64) {
    (probability, key_hash)
}

/// Moves the best `count` of `rows` (all, if fewer) to its front, sorted
/// best first by `rank_order`, and returns them.
fn rank_next(rows: &mut [(u64, f32, u32)], count: usize) -> &[(u64, f32, u32)] {
    let count = count.min(rows.len());
    let order = |a: &(u64, f32, u32), b: &(u64, f32, u32)| rank_order(row_rank(a), row_rank(b));
    if count < rows.len() {
        rows.select_nth_unstable_by(count - 1, order);
    }
    rows[..count].sort_unstable_by(order);
    &rows[..count]
}

#[allow(clippy::too_many_arguments)]
fn evaluate(
    forecaster: &Forecaster,
    key_next_us: &[u64],
    shared: &TickShared,
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
    for (row, (key_hash, &probability)) in keys.iter().zip(probabilities).enumerate() {
        // The key's number as `TickShared::fill` found it this tick, else
        // looked up.
        let key_id = match shared.row_ids.get(row) {
            Some(&(hash, id)) if shared.filled && hash == *key_hash && id != NO_ID => id,
            _ => index.id(*key_hash),
        };
        let next = key_next_us[key_id as usize];
        let requested = next != NONE_US && next <= now_us + horizon_us;
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

// ---------------------------------------------------------------------------
// Synthetic negative controls.

/// Poisson arrivals at 2000 requests/s over `keys` keys, uniform or Zipf(1),
/// 8 clients, no temporal structure: the best predictor is each key's long-run rate.
pub fn synthetic_trace(kind: &str, rows: usize, keys: u64, seed: u64) -> Trace {
    let mut state = seed | 1;
    let mut random = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    let cumulative: Vec<f64> = if kind == "zipf" {
        let mut total = 0.0;
        let mut cdf: Vec<f64> = (1..=keys)
            .map(|rank| {
                total += 1.0 / rank as f64;
                total
            })
            .collect();
        cdf.iter_mut().for_each(|c| *c /= total);
        cdf
    } else {
        Vec::new()
    };
    let mut ts_us = 0u64;
    let events = (0..rows)
        .map(|_| {
            ts_us += (-(1.0 - random()).ln() * 500.0) as u64; // mean gap 500 us
            let key = if cumulative.is_empty() {
                (random() * keys as f64) as u64
            } else {
                let u = random();
                cumulative.partition_point(|&c| c < u) as u64
            };
            TraceEvent {
                ts_us,
                client: (random() * 8.0) as u32,
                key_hash: forelock_predictor::key_hash(format!("k{key}").as_bytes()),
                mode: Mode::Exclusive,
                hold_us: 100,
            }
        })
        .collect();
    Trace::from_events(events)
}

// ---------------------------------------------------------------------------
// The plot.

/// Hit rate on seen-before keys against waste share, one line per policy.
pub fn plot(report: &ReplayReport, path: &Path) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let with_text = crate::fonts::loaded();
    let root = BitMapBackend::new(path, (1000, 700)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut builder = ChartBuilder::on(&root);
    builder.margin(20);
    if with_text {
        builder
            .caption(
                format!(
                    "{}: hit rate vs waste ({} slots, horizon {} ms)",
                    report.trace, report.budget_slots, report.horizon_ms
                ),
                ("sans-serif", 22),
            )
            .x_label_area_size(45)
            .y_label_area_size(60);
    } else {
        builder.x_label_area_size(10).y_label_area_size(10);
    }
    // Log-scaled waste: the traces' interesting points lie between 0.001 and
    // 1 (cloudphysics keeps its budget nearly empty, build-strace-a full).
    let waste_floor = report
        .runs
        .iter()
        .map(|run| run.waste_per_budget)
        .chain(report.equal_waste_levels.iter().copied())
        .filter(|&waste| waste > 0.0)
        .fold(1.0f64, f64::min)
        * 0.5;
    let at = |waste: f64| waste.clamp(waste_floor, 1.0);
    let mut chart = builder.build_cartesian_2d((waste_floor..1.0).log_scale(), 0.0f64..1.0)?;
    {
        let mut mesh = chart.configure_mesh();
        if with_text {
            mesh.x_desc(
                "waste per budget: slot-seconds that served nothing / (budget x duration); \
                 log scale; dashed: 1, 2, 4, 10 x no prediction's",
            )
            .y_desc("hit rate, requests for seen-before keys");
        } else {
            mesh.x_labels(0).y_labels(0);
        }
        mesh.draw()?;
    }
    for &level in &report.equal_waste_levels {
        chart.draw_series(DashedLineSeries::new(
            [(at(level), 0.0), (at(level), 1.0)],
            6,
            4,
            RGBColor(150, 150, 150).stroke_width(1),
        ))?;
    }
    let colors = [
        RGBColor(200, 0, 0),
        RGBColor(0, 90, 200),
        RGBColor(0, 160, 60),
        RGBColor(200, 0, 200),
        RGBColor(0, 190, 190),
        RGBColor(120, 120, 120),
        RGBColor(255, 140, 0),
        RGBColor(0, 0, 0),
        RGBColor(140, 90, 40),
    ];
    let mut policies: Vec<&str> = Vec::new();
    for run in &report.runs {
        if !policies.contains(&run.policy.as_str()) {
            policies.push(&run.policy);
        }
    }
    for (i, policy) in policies.iter().enumerate() {
        let color = colors[i % colors.len()];
        // In sweep order: threshold descending, or keep-alive ascending.
        let mut sweep: Vec<(f64, (f64, f64))> = report
            .runs
            .iter()
            .filter(|run| run.policy == *policy && run.setting != "adaptive")
            .map(|run| {
                let order = run.threshold.map_or_else(
                    || run.keep_alive_ms.map_or(0.0, |ms| ms as f64),
                    |t| -f64::from(t),
                );
                (order, (at(run.waste_per_budget), run.hit_rate_seen_before))
            })
            .collect();
        sweep.sort_by(|a, b| a.0.total_cmp(&b.0));
        let points: Vec<(f64, f64)> = sweep.into_iter().map(|(_, point)| point).collect();
        let series = chart.draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?;
        if with_text {
            let label = policy.to_string();
            series.label(label).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        }
        chart.draw_series(
            points
                .iter()
                .map(|&(x, y)| Circle::new((x, y), 4, color.filled())),
        )?;
        // The adaptive run: a hollow square.
        let adaptive: Vec<(f64, f64)> = report
            .runs
            .iter()
            .filter(|run| run.policy == *policy && run.setting == "adaptive")
            .map(|run| (at(run.waste_per_budget), run.hit_rate_seen_before))
            .collect();
        chart.draw_series(adaptive.iter().map(|&point| {
            EmptyElement::at(point) + Rectangle::new([(-6, -6), (6, 6)], color.stroke_width(2))
        }))?;
    }
    if with_text {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 16))
            .draw()?;
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(budget_slots: usize) -> ReplaySettings {
        ReplaySettings {
            budget_slots,
            thresholds: vec![0.5, 0.1],
            keep_alive_ms: vec![500, 5000],
            prepare_latency_us: 50,
            eval_every_ticks: 5,
            mid_us: 6_000_000,
            threads: 2,
        }
    }

    /// 50 keys, each requested every 300 ms, `spacing_us` apart: perfectly predictable.
    fn periodic_trace_spaced(spacing_us: u64) -> Trace {
        let mut events = Vec::new();
        for round in 0..40u64 {
            for key in 0..50u64 {
                events.push(TraceEvent {
                    ts_us: round * 300_000 + key * spacing_us,
                    client: (key % 4) as u32,
                    key_hash: forelock_predictor::key_hash(format!("p{key}").as_bytes()),
                    mode: Mode::Exclusive,
                    hold_us: 100,
                });
            }
        }
        Trace::from_events(events)
    }

    fn periodic_trace() -> Trace {
        periodic_trace_spaced(5_000)
    }

    #[test]
    fn a_periodic_trace_is_served_mostly_on_the_fast_path() {
        let trace = periodic_trace();
        let report = replay(
            "periodic",
            &trace,
            &PredictorConfig::default(),
            &ModelKind::ALL,
            &settings(64),
        );
        let oracle = report
            .runs
            .iter()
            .find(|run| run.policy == "oracle")
            .unwrap();
        assert!(oracle.hit_rate > 0.99, "oracle {}", oracle.hit_rate);
        for model in ["frequency 0.5s", "logistic", "keep-alive"] {
            let best = report
                .runs
                .iter()
                .filter(|run| run.policy == model)
                .map(|run| run.hit_rate_seen_before)
                .fold(0.0, f64::max);
            assert!(best > 0.9, "{model}: {best}");
        }
        assert!(report.table().contains("oracle"));
        for run in &report.runs {
            assert_eq!(run.requests, 2000);
            assert_eq!(run.seen_before_requests, 1950);
        }
    }

    #[test]
    fn the_budget_bounds_what_stays_prepared() {
        // All 50 keys of a round within 1 ms: 8 slots serve at most 8 of them.
        let trace = periodic_trace_spaced(20);
        let report = replay(
            "burst",
            &trace,
            &PredictorConfig::default(),
            &[ModelKind::Frequency],
            &settings(8),
        );
        for run in &report.runs {
            assert!(
                run.hit_rate <= 8.0 / 50.0 + 0.01,
                "{} {}: {}",
                run.policy,
                run.setting,
                run.hit_rate
            );
        }
        let oracle = report
            .runs
            .iter()
            .find(|run| run.policy == "oracle")
            .unwrap();
        assert!(
            oracle.hit_rate > 0.1,
            "the oracle uses its 8 slots: {}",
            oracle.hit_rate
        );
    }

    #[test]
    fn on_a_uniform_negative_control_no_model_beats_frequency() {
        let trace = synthetic_trace("uniform", 20_000, 400, 3);
        let report = replay(
            "uniform",
            &trace,
            &PredictorConfig::default(),
            &ModelKind::ALL,
            &settings(64),
        );
        let best = |policy: &str| {
            report
                .runs
                .iter()
                .filter(|run| run.policy == policy)
                .map(|run| run.hit_rate)
                .fold(0.0, f64::max)
        };
        let frequency = best("frequency 60s");
        for model in [
            "keep-alive",
            "successor",
            "logistic",
            "no prediction",
            "frequency 0.5s",
            "frequency 5s",
            "online",
        ] {
            assert!(
                best(model) <= frequency + 0.02,
                "{model} {} beats frequency {frequency}: labels leak?",
                best(model)
            );
        }
    }

    #[test]
    fn replay_in_parallel_gives_the_results_of_one_thread() {
        let trace = synthetic_trace("zipf", 6_000, 300, 5);
        let run = |threads| {
            let report = replay(
                "zipf",
                &trace,
                &PredictorConfig::default(),
                &[ModelKind::Frequency, ModelKind::Logistic],
                &ReplaySettings {
                    threads,
                    ..settings(64)
                },
            );
            serde_json::to_string(&report).unwrap()
        };
        assert_eq!(run(1), run(3));
    }

    #[test]
    fn the_fast_replay_reports_what_the_reference_replay_does() {
        // Every model (online included) over a Zipf trace whose budget is
        // tight (evictions, displacements) and the first rows of the two
        // bundled real traces (pgbench, a build under strace), on two
        // threads, against the plain replay (`reference.rs`: every slot
        // shown to the policy every tick, its full sort; the same tie
        // rule): the whole report, every run and table, must be the same
        // text.
        let bundled = |file: &str, rows: usize| {
            read_trace_file(
                &Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("../predictor/traces")
                    .join(file),
            )
            .expect("the trace is in the repository")
            .head(rows)
        };
        for (name, trace, budget_slots) in [
            ("zipf", synthetic_trace("zipf", 3_000, 400, 11), 24),
            ("pgbench", bundled("pgbench-pg-a.csv.gz", 2_500), 64),
            (
                "compileall",
                bundled("compileall-strace-a.csv.gz", 2_500),
                32,
            ),
        ] {
            let settings = ReplaySettings {
                mid_us: split_time(&trace),
                threads: 2,
                thresholds: vec![0.5, 0.1, 0.02],
                ..settings(budget_slots)
            };
            let config = PredictorConfig::default();
            let fast = replay(name, &trace, &config, &ModelKind::ALL, &settings);
            let reference = reference::replay(name, &trace, &config, &ModelKind::ALL, &settings);
            assert!(
                fast.runs
                    .iter()
                    .any(|run| run.prepares > 0 && run.wasted > 0)
            );
            assert_eq!(
                serde_json::to_string_pretty(&fast).unwrap(),
                serde_json::to_string_pretty(&reference).unwrap(),
                "{name}"
            );
            assert_eq!(fast.table(), reference.table(), "{name}");
        }
    }

    #[test]
    fn a_slot_is_left_out_only_when_its_policy_keeps_it() {
        // A slot shown alone, scored 0 (under any threshold), is reclaimed
        // exactly from `Reclaim::eligible_at_us` on: before it the policy
        // keeps it whatever its score, so leaving it out changes nothing.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut random = move |below: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % below
        };
        let predictive = PredictiveConfig {
            threshold_initial: 0.1,
            adaptive: false,
            ..PredictiveConfig::default()
        };
        let oracle = PredictiveConfig {
            unused_timeout_us: 0,
            idle_timeout_us: 0,
            ..predictive
        };
        let mut checked = [0u64; 2];
        for _ in 0..20_000 {
            let prepared_at_us = 1_000_000 + random(3_000_000);
            let used = random(2) == 0;
            let last_use_us = used.then(|| prepared_at_us + random(2_000_000));
            let held_until_us = match last_use_us {
                Some(last) if random(2) == 0 => last + random(1_500_000),
                _ => 0,
            };
            let slot = SimSlot {
                key_id: 0,
                prepared_at_us,
                ready_at_us: prepared_at_us,
                last_use_us,
                uses: u32::from(used) * (1 + random(3) as u32),
                held_until_us,
                idle_since_us: held_until_us.max(prepared_at_us),
            };
            let keep_alive_us = [100_000, 500_000, 5_000_000][random(3) as usize];
            let (mut policy, rule): (Box<dyn Policy>, Reclaim) = match random(3) {
                0 => (
                    Box::new(KeepAlive::new(keep_alive_us)),
                    Reclaim::KeepAlive { keep_alive_us },
                ),
                1 => (
                    Box::new(Predictive::new(predictive)),
                    Reclaim::of_predictive(&predictive),
                ),
                _ => (
                    Box::new(Predictive::new(oracle)),
                    Reclaim::of_predictive(&oracle),
                ),
            };
            let eligible_at_us = rule.eligible_at_us(&slot);
            let now_us = match random(3) {
                0 => eligible_at_us,
                1 => eligible_at_us - 1,
                _ => 1_000_000 + random(8_000_000),
            };
            let views = [slot_view(1, &slot, now_us, Some(0.0))];
            let feedback = Feedback::default();
            let mut actions = Vec::new();
            policy.tick(
                &TickInput {
                    now_us,
                    budget_slots: 10,
                    slots: &views,
                    candidates: &[],
                    feedback: &feedback,
                    load: 0.0,
                },
                &mut actions,
            );
            let reclaimed = actions
                .iter()
                .any(|action| matches!(action, Action::Reclaim { .. }));
            assert_eq!(
                reclaimed,
                now_us >= eligible_at_us,
                "{slot:?} {rule:?} at {now_us}"
            );
            checked[usize::from(reclaimed)] += 1;
        }
        assert!(checked[0] > 1000 && checked[1] > 1000, "{checked:?}");
    }

    #[test]
    fn top_rows_ranks_as_top_k() {
        // Many equal probabilities (a Zipf tail seen once), so that ties
        // are ordered by the selection and the sort themselves.
        let trace = synthetic_trace("zipf", 20_000, 4_000, 5);
        for model in [
            ModelKind::Frequency,
            ModelKind::Successor,
            ModelKind::HoldValue,
        ] {
            let mut forecaster = Forecaster::new(PredictorConfig {
                model,
                ..PredictorConfig::default()
            });
            let (mut top, mut rows) = (Vec::new(), Vec::new());
            let mut compared = 0;
            for (i, chunk) in trace.events.chunks(500).enumerate() {
                let batch: Vec<(u64, u32, u64)> = chunk
                    .iter()
                    .map(|e| (e.ts_us, e.client, e.key_hash))
                    .collect();
                forecaster.ingest_batch(&batch);
                forecaster.tick(chunk.last().unwrap().ts_us + 1);
                let (keys, _) = forecaster.scores().unwrap();
                for (k, min) in [(50, 0.001), (1_000, 0.001), (100_000, 0.0), (0, 0.5)] {
                    forecaster.top_k(k, min, &mut top);
                    // Row numbers as the dense numbers, to check each row's key.
                    let row_ids: Vec<(u64, u32)> = keys
                        .iter()
                        .enumerate()
                        .map(|(row, &key_hash)| (key_hash, row as u32))
                        .collect();
                    top_rows(&forecaster, &row_ids, k, min, &mut rows);
                    let mut sorted = 0;
                    while sorted < rows.len() {
                        sorted += rank_next(&mut rows[sorted..], sorted.max(7)).len();
                    }
                    let by_rows: Vec<(u64, f32)> = rows
                        .iter()
                        .map(|&(key_hash, p, row)| {
                            assert_eq!(keys[row as usize], key_hash);
                            (key_hash, p)
                        })
                        .collect();
                    assert_eq!(top, by_rows, "{model:?} tick {i} k {k}");
                    compared += top.len();
                }
            }
            assert!(compared > 10_000, "{compared}");
        }
    }

    #[test]
    fn every_way_of_showing_the_slots_to_the_policy_is_taken() {
        // The reference test compares the replay with the policy shown
        // every slot: on its tight Zipf trace, both shortcuts of
        // `Sim::tick` for `Predictive` are taken (only the slots it may
        // free; those and the lowest-ranked idle slots). Every slot is
        // shown to `KeepAlive` under pressure, and to `Predictive` only
        // when the slots left out would exceed the budget.
        let trace = synthetic_trace("zipf", 3_000, 400, 11);
        let index = TraceIndex::new(&trace);
        let settings = ReplaySettings {
            mid_us: split_time(&trace),
            thresholds: vec![0.5, 0.1, 0.02],
            ..settings(24)
        };
        let config = PredictorConfig::default();
        let mut counts = [0u64; 3];
        for model in [ModelKind::Frequency, ModelKind::Successor] {
            let mut sims = predictive_sims(model.name(), &settings, index.keys());
            let mut source = Source::Forecaster(Box::new(Forecaster::new(PredictorConfig {
                model,
                ..config.clone()
            })));
            run_pass(
                &trace,
                &index,
                &config,
                &mut source,
                &mut sims,
                None,
                &settings,
            );
            for sim in &sims {
                for (count, more) in counts.iter_mut().zip(sim.shown_counts) {
                    *count += more;
                }
            }
        }
        assert!(counts[0] > 0 && counts[1] > 0, "{counts:?}");
    }

    #[test]
    fn belady_retains_at_least_what_lru_does_and_the_halves_split_the_counts() {
        let trace = synthetic_trace("zipf", 20_000, 2_000, 9);
        let index = TraceIndex::new(&trace);
        let mid = split_time(&trace);
        let retention = retention(&trace, &index, 100, mid);
        assert!(retention.belady >= retention.lru, "{retention:?}");
        assert!(retention.belady > retention.lru + 0.05, "{retention:?}");
        let report = replay(
            "zipf",
            &trace,
            &PredictorConfig::default(),
            &[ModelKind::Frequency],
            &ReplaySettings {
                mid_us: mid,
                ..settings(100)
            },
        );
        for run in &report.runs {
            assert_eq!(
                run.halves[0].requests + run.halves[1].requests,
                run.requests
            );
            assert_eq!(
                run.halves[0].prepares + run.halves[1].prepares,
                run.prepares
            );
            assert_eq!(run.halves[0].wasted + run.halves[1].wasted, run.wasted);
            let mean = (run.halves[0].waste_per_budget + run.halves[1].waste_per_budget) / 2.0;
            assert!(
                (mean - run.waste_per_budget).abs() < 1e-3,
                "{} {mean}",
                run.waste_per_budget
            );
        }
        assert!(report.split.iter().any(|row| row.policy == "frequency 60s"));
    }

    #[test]
    fn quality_of_perfect_scores_is_perfect() {
        let mut quality = Quality::new();
        for i in 0..100 {
            quality.add(if i % 2 == 0 { 0.999 } else { 0.0 }, i % 2 == 0);
        }
        let (auc_pr, brier) = quality.result();
        assert!(auc_pr > 0.99 && brier < 0.01, "{auc_pr} {brier}");
        quality.unscored_positives = 50;
        assert!(
            (quality.result().0 - 0.5).abs() < 0.01,
            "recall is bounded by unscored positives"
        );
    }

    #[test]
    fn the_plot_is_written() {
        let trace = periodic_trace().head(500);
        let report = replay(
            "periodic",
            &trace,
            &PredictorConfig::default(),
            &[ModelKind::Frequency],
            &settings(64),
        );
        let path =
            std::env::temp_dir().join(format!("forelock-replay-plot-{}.png", std::process::id()));
        plot(&report, &path).unwrap();
        assert!(std::fs::metadata(&path).unwrap().len() > 1000);
        std::fs::remove_file(&path).unwrap();
    }
}
