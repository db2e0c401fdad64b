//! `forelock-predictor [--config FILE] [--runtime-dir DIR]`: the live forecaster.
//!
//! Attaches to a running broker's runtime directory, drains the access-event
//! ring (`events`) every tick, feeds the requests (fast-path hits, slow-path
//! grants, contended requests) to the forecaster and to the contention
//! estimator, and writes the top-K scores, each with its key's P(contended),
//! then the keys predicted contended outside the top-K, into the score table
//! (`scores`), which the broker's allocator reads.
//!
//! Everything it writes is advisory: if it dies or lags the broker ignores the
//! stale table, and locking goes on, only with fewer fast-path hits. When the
//! broker restarts and re-creates the files, the predictor re-attaches.

use std::fs::OpenOptions;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use forelock_predictor::config::PredictorConfig;
use forelock_predictor::contention::ContentionEstimator;
use forelock_predictor::forecaster::Forecaster;
use shm_layout::events::{EventCursor, EventsView, Outcome};
use shm_layout::scores::ScoresView;

#[derive(Parser, Debug)]
#[command(
    name = "forelock-predictor",
    about = "Forecasts which lock keys will be requested soon"
)]
struct Args {
    /// Configuration file (TOML); every field has a default (see the config module).
    #[arg(long)]
    config: Option<PathBuf>,
    /// The broker's runtime directory [default: $FORELOCK_RUNTIME_DIR, else /run/forelock
    /// if it exists or for root, else $XDG_RUNTIME_DIR/forelock, else /tmp/forelock-UID].
    #[arg(long)]
    runtime_dir: Option<PathBuf>,
    /// How long to wait for the broker's files to appear at start, ms.
    #[arg(long, default_value_t = 10_000)]
    wait_ms: u64,
    /// Stop after this many ticks (tests); default: run until killed.
    #[arg(long)]
    ticks: Option<u64>,
}

/// The two mapped files, kept alive with their views.
struct Attached {
    events: EventsView,
    scores: ScoresView,
    events_inode: u64,
    _events_map: memmap2::Mmap,
    _scores_map: memmap2::MmapMut,
}

fn attach(dir: &Path) -> anyhow::Result<Attached> {
    let events_path = dir.join(shm_layout::EVENTS_FILE);
    let scores_path = dir.join(shm_layout::SCORES_FILE);
    let events_file = OpenOptions::new()
        .read(true)
        .open(&events_path)
        .with_context(|| {
            format!(
                "opening {}: is forelockd running with this runtime dir?",
                events_path.display()
            )
        })?;
    let scores_file = OpenOptions::new().read(true).write(true).open(&scores_path).with_context(|| {
        format!(
            "opening {} for writing: is forelockd running, and does this user own the runtime dir?",
            scores_path.display()
        )
    })?;
    let events_inode = events_file.metadata()?.ino();
    // SAFETY: a shared read-only mapping of a file others write only through
    // atomics (shm-layout's contract); we never form a non-atomic reference to
    // its contents except through EventsView, which validates it.
    let events_map = unsafe { memmap2::Mmap::map(&events_file) }
        .with_context(|| format!("mapping {}", events_path.display()))?;
    // SAFETY: a shared writable mapping; every access goes through ScoresView,
    // whose fields are atomics, so concurrent writers and readers are sound.
    let scores_map = unsafe { memmap2::MmapMut::map_mut(&scores_file) }
        .with_context(|| format!("mapping {}", scores_path.display()))?;
    // SAFETY:
    // - the base is page-aligned (so 64-aligned) and `len` bytes are mapped;
    // - the mapping lives in `Attached` beside the view and outlives it (fields
    //   drop in declaration order: views first);
    // - others write the file only through atomics.
    let events = unsafe { EventsView::new(events_map.as_ptr(), events_map.len()) }
        .with_context(|| format!("validating {}", events_path.display()))?;
    // SAFETY: as for the events view, for the scores mapping.
    let scores = unsafe { ScoresView::new(scores_map.as_ptr(), scores_map.len()) }
        .with_context(|| format!("validating {}", scores_path.display()))?;
    Ok(Attached {
        events,
        scores,
        events_inode,
        _events_map: events_map,
        _scores_map: scores_map,
    })
}

fn attach_waiting(dir: &Path, wait: Duration) -> anyhow::Result<Attached> {
    let started = Instant::now();
    loop {
        match attach(dir) {
            Ok(attached) => return Ok(attached),
            Err(error) if started.elapsed() < wait => {
                tracing::debug!("waiting for the broker's files: {error:#}");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(error) => return Err(error),
        }
    }
}

/// Counters from the event stream, logged periodically.
#[derive(Default, Debug)]
struct Observed {
    hits: u64,
    misses: u64,
    contended: u64,
    prepared: u64,
    reclaimed: u64,
}

fn main() {
    // The error's chain, one line, as a person reads it (anyhow's Debug form
    // would add a backtrace whenever RUST_BACKTRACE is set).
    if let Err(e) = run() {
        eprintln!("forelock-predictor: error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> anyhow::Result<()> {
    // Plain text (journald and log files), filtered like forelockd's logs.
    let filter = tracing_subscriber::EnvFilter::try_from_env("FORELOCK_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(std::io::stderr);
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder.without_time().with_target(false).init();
    } else {
        builder.init();
    }
    let args = Args::parse();
    let config = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            PredictorConfig::from_toml(&text).with_context(|| format!("in {}", path.display()))?
        }
        None => PredictorConfig::default(),
    };
    let dir = args
        .runtime_dir
        .clone()
        .unwrap_or_else(shm_layout::default_runtime_dir);
    let mut attached = attach_waiting(&dir, Duration::from_millis(args.wait_ms))?;
    tracing::info!(
        runtime_dir = %dir.display(),
        model = config.model.name(),
        horizon_ms = config.horizon_ms,
        tick_ms = config.tick_ms,
        "attached"
    );

    let model_name = config.model.name();
    let horizon_ms = u32::try_from(config.horizon_ms).unwrap_or(u32::MAX);
    let tick = Duration::from_millis(config.tick_ms);
    let top_k = config.top_k;
    let min_probability = config.min_probability;
    let mut contention = ContentionEstimator::new(config.contention());
    let mut contended = Vec::new();
    let mut entries = Vec::new();
    let mut forecaster = Forecaster::new(config);
    let mut cursor = EventCursor::new(&attached.events);
    let start_ns = shm_layout::monotonic_ns();
    let mut top = Vec::new();
    let mut batch: Vec<(u64, u32, u64)> = Vec::new();
    // The same requests for the contention estimator: (ts_us, key, contended).
    let mut contention_batch: Vec<(u64, u64, bool)> = Vec::new();
    let mut observed = Observed::default();
    let mut last_report = Instant::now();
    let mut last_inode_check = Instant::now();
    let mut ticks = 0u64;
    let mut next_tick = Instant::now();
    loop {
        let now_ns = shm_layout::monotonic_ns();
        cursor.drain(&attached.events, |event| {
            match event.outcome {
                Outcome::FastHit => observed.hits += 1,
                Outcome::SlowPath => observed.misses += 1,
                Outcome::Contended => observed.contended += 1,
                Outcome::Prepared => observed.prepared += 1,
                Outcome::Reclaimed => observed.reclaimed += 1,
                Outcome::Released => {}
            }
            if matches!(
                event.outcome,
                Outcome::FastHit | Outcome::SlowPath | Outcome::Contended
            ) {
                // Fast-path events carry no time: they happened since the last drain.
                let time_ns = if event.time_ns == 0 {
                    now_ns
                } else {
                    event.time_ns.min(now_ns)
                };
                let ts_us = time_ns.saturating_sub(start_ns) / 1000;
                batch.push((ts_us, event.client, event.key_hash));
                // Only the broker queues requests: a `Contended` event from a
                // client's ring is forged (it would pin the key's slot), and
                // counts as a plain request.
                let contended = event.outcome == Outcome::Contended && event.from_broker;
                contention_batch.push((ts_us, event.key_hash, contended));
            }
        });
        // The rings are drained one after the other: put the requests in time
        // order, then ingest them in one batch (prefetched, see features.rs).
        // The contention estimator gets them in time order too (it counts an
        // out-of-order request as the latest seen, undecayed), as the replay
        // feeds it (tools/src/replay/contention.rs).
        batch.sort_by_key(|&(ts_us, _, _)| ts_us);
        forecaster.ingest_batch(&batch);
        batch.clear();
        contention_batch.sort_by_key(|&(ts_us, _, _)| ts_us);
        for &(ts_us, key_hash, contended) in &contention_batch {
            contention.record(ts_us, key_hash, contended);
        }
        contention_batch.clear();
        let now_us = now_ns.saturating_sub(start_ns) / 1000;
        forecaster.tick(now_us);
        let capacity = attached.scores.capacity() as usize;
        forecaster.top_k(top_k.min(capacity), min_probability, &mut top);
        contention.contended(now_us, min_probability, &mut contended);
        contention.merge_into(
            &top,
            &contended,
            capacity,
            |key_hash| forecaster.probability_of(key_hash).unwrap_or(0.0),
            &mut entries,
        );
        attached.scores.write(
            model_name,
            horizon_ms,
            shm_layout::monotonic_ns(),
            entries.iter().copied(),
        );
        let score = forecaster.self_score;
        attached
            .scores
            .publish_self_score(shm_layout::scores::SelfScore {
                samples: score.samples,
                brier: score.brier,
                brier_baseline: score.brier_baseline,
            });
        if let Some(choice) = forecaster.model().choice() {
            attached.scores.publish_choice(&shm_layout::scores::Choice {
                leader: choice.leader.to_owned(),
                lead: choice.lead,
                trail: choice.trail,
                bound: choice.bound,
            });
        }

        ticks += 1;
        if args.ticks.is_some_and(|limit| ticks >= limit) {
            tracing::info!(
                ticks,
                written = entries.len(),
                contended = contended.len(),
                ?observed,
                lost = cursor.lost,
                "done"
            );
            return Ok(());
        }
        if last_report.elapsed() >= Duration::from_secs(10) {
            last_report = Instant::now();
            let features = forecaster.features();
            tracing::info!(
                tracked = features.tracked(),
                active = features.active(),
                written = entries.len(),
                contended = contended.len(),
                contention_tracked = contention.tracked(),
                lost_events = cursor.lost,
                ?observed,
                self_score = ?forecaster.self_score,
                choice = ?forecaster.model().choice(),
                model = forecaster.model().kind().name(),
                "forecaster"
            );
            // The learnt parameters: a few hundred numbers for hold-value,
            // too many for every 10 s at info level.
            tracing::debug!(model = %forecaster.model().describe(), "model");
        }
        if last_inode_check.elapsed() >= Duration::from_secs(1) {
            last_inode_check = Instant::now();
            let current = std::fs::metadata(dir.join(shm_layout::EVENTS_FILE))
                .map(|m| m.ino())
                .ok();
            if current != Some(attached.events_inode) {
                tracing::warn!("the broker re-created its runtime files; re-attaching");
                attached = attach_waiting(&dir, Duration::from_millis(args.wait_ms))?;
                cursor = EventCursor::new(&attached.events);
            }
        }
        next_tick += tick;
        let now = Instant::now();
        if next_tick > now {
            std::thread::sleep(next_tick - now);
        } else {
            next_tick = now; // lagging: do not try to catch up
        }
    }
}
