//! Measures the forecaster against its targets: scoring 1M tracked keys in
//! under 10 ms per tick, ingesting 5M events/s on one core.
//!
//! ```text
//! CARGO_TARGET_DIR=/work/target-a cargo run --release -p forelock-predictor --example predictor_bench [KEYS] [EVENTS] [TRACE...]
//! ```
//!
//! Ingest goes through [`Forecaster::ingest_batch`] in batches of
//! [`BATCH`] events (as the live process drains its rings); one more run
//! measures one-by-one [`Forecaster::ingest`] for comparison. With TRACE files,
//! it also measures ingestion (with a tick every 10 ms of trace time, the
//! events between two ticks in one batch) on each real trace.
//!
//! Each tick is timed on the wall clock and in the process's CPU time
//! (all its threads): on a shared machine the wall clock also counts the
//! time other processes held the core, the CPU time does not.
//!
//! Prints figures only; nothing here asserts a timing.

use std::time::Instant;

use forelock_predictor::config::{ModelKind, PredictorConfig};
use forelock_predictor::features::FeatureStore;
use forelock_predictor::forecaster::Forecaster;

/// Events per [`Forecaster::ingest_batch`] call.
const BATCH: usize = 1024;

/// CPU time used by this process so far (every thread), in seconds.
fn process_cpu_s() -> f64 {
    let mut time = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY:
    // - `time` is a valid, writable `timespec` for the call's duration;
    // - CLOCK_PROCESS_CPUTIME_ID is a clock every Linux has, so the call
    //   cannot fail with EINVAL (checked anyway below).
    let result = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut time) };
    assert_eq!(result, 0, "clock_gettime(CLOCK_PROCESS_CPUTIME_ID)");
    time.tv_sec as f64 + time.tv_nsec as f64 * 1e-9
}

fn main() {
    let mut arguments = std::env::args().skip(1);
    let keys: u64 = arguments
        .next()
        .map_or(1 << 20, |a| a.parse().expect("KEYS must be an integer"));
    let events: usize = arguments.next().map_or(10_000_000, |a| {
        a.parse().expect("EVENTS must be an integer")
    });
    let traces: Vec<String> = arguments.collect();
    let clients = 64u32;

    // Pre-generate the stream: every key once (so all are tracked and active),
    // then a skewed mix (key index = KEYS * u^3), 0.2 us apart (5M/s of simulated time).
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut random = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let hashes: Vec<u64> = (0..keys)
        .map(|k| forelock_predictor::key_hash(&k.to_le_bytes()))
        .collect();
    let stream: Vec<(u64, u32, u64)> = (0..events)
        .map(|i| {
            let r = random();
            let key = if (i as u64) < keys {
                i as u64
            } else {
                let u = (r >> 11) as f64 / (1u64 << 53) as f64;
                ((u * u * u) * keys as f64) as u64 % keys
            };
            (
                i as u64 / 5,
                (r >> 40) as u32 % clients,
                hashes[key as usize],
            )
        })
        .collect();

    println!("forelock-predictor bench: {keys} keys, {events} events, {clients} clients, 1 core");
    println!(
        "{:<24} {:>14} {:>12} {:>12} {:>12} {:>12} {:>12} {:>10}",
        "model",
        "ingest ev/s",
        "1st tick ms",
        "tick ms",
        "tick cpu ms",
        "tick p max",
        "top-k ms",
        "active"
    );
    // Every model on one thread, then the two costliest scoring on two
    // (`score_threads`; the scores are the same).
    // `BENCH_MODELS=hold-value,online` runs only those (each on one and,
    // where listed above, two threads); `BENCH_THREADS=1` only the runs on
    // one thread.
    let only: Option<Vec<String>> = std::env::var("BENCH_MODELS")
        .ok()
        .map(|list| list.split(',').map(str::to_owned).collect());
    let threads_only: Option<usize> = std::env::var("BENCH_THREADS")
        .ok()
        .map(|t| t.parse().expect("BENCH_THREADS must be an integer"));
    // The online choice's tick is its leader's scoring plus a bounded part,
    // so it is also timed with its costliest member, hold-value (its first
    // leader), kept in the lead: a hysteresis no loss gap reaches
    // ("online, hold-value leads"). Its leader is printed after each online run.
    let runs = ModelKind::ALL
        .into_iter()
        .map(|model| (model, 1, false))
        .chain([
            (ModelKind::Online, 1, true),
            (ModelKind::HoldValue, 2, false),
            (ModelKind::Online, 2, false),
            (ModelKind::Online, 2, true),
        ])
        .filter(|(model, _, _)| {
            only.as_ref()
                .is_none_or(|names| names.iter().any(|n| n == model.name()))
        })
        .filter(|(_, score_threads, _)| threads_only.is_none_or(|t| t == *score_threads));
    for (model, score_threads, hold_value_leads) in runs {
        let config = PredictorConfig {
            model,
            score_threads,
            max_tracked_keys: keys as usize,
            activity_window_ms: 600_000,
            choice_hysteresis: if hold_value_leads {
                1e6
            } else {
                PredictorConfig::default().choice_hysteresis
            },
            ..PredictorConfig::default()
        };
        let mut forecaster = Forecaster::new(config);
        let started = Instant::now();
        for batch in stream.chunks(BATCH) {
            forecaster.ingest_batch(batch);
        }
        let ingest_s = started.elapsed().as_secs_f64();
        let end_us = stream.last().map_or(0, |e| e.0);

        // The first tick also publishes every row changed by the ingest (see
        // features.rs): timed on its own.
        let started = Instant::now();
        forecaster.tick(end_us + 10_000);
        let first_tick_s = started.elapsed().as_secs_f64();
        // `BENCH_TICKS=300` times more ticks (for a profile of the tick alone).
        let ticks: u64 = std::env::var("BENCH_TICKS")
            .map_or(30, |t| t.parse().expect("BENCH_TICKS must be an integer"));
        let mut tick_total_s = 0.0;
        let mut tick_max_s: f64 = 0.0;
        let cpu_started_s = process_cpu_s();
        for tick in 1..=ticks {
            let started = Instant::now();
            forecaster.tick(end_us + (tick + 1) * 10_000);
            let elapsed = started.elapsed().as_secs_f64();
            tick_total_s += elapsed;
            tick_max_s = tick_max_s.max(elapsed);
        }
        let tick_cpu_s = (process_cpu_s() - cpu_started_s) / ticks as f64;
        // The live loop reuses its output vector: time a call after a first one
        // has grown it (the first also pays the page faults of a fresh one).
        let mut top = Vec::new();
        forecaster.top_k(65_536, 0.01, &mut top);
        let started = Instant::now();
        forecaster.top_k(65_536, 0.01, &mut top);
        let top_k_s = started.elapsed().as_secs_f64();
        println!(
            "{:<24} {:>14.0} {:>12.2} {:>12.2} {:>12.2} {:>12.2} {:>12.2} {:>10}",
            format!(
                "{}{}{}",
                model.name(),
                if hold_value_leads { " (h-v leads)" } else { "" },
                if score_threads == 1 {
                    String::new()
                } else {
                    format!(" x{score_threads}")
                }
            ),
            events as f64 / ingest_s,
            first_tick_s * 1e3,
            tick_total_s / ticks as f64 * 1e3,
            tick_cpu_s * 1e3,
            tick_max_s * 1e3,
            top_k_s * 1e3,
            forecaster.features().active()
        );
        // The online choice's tick is its leader's scoring plus a bounded
        // part: say which member led, or the figure means little.
        if let Some(choice) = forecaster.model().choice() {
            println!(
                "  online choice after the ticks: leader {} (switches {}, rounds {})",
                choice.leader, choice.switches, choice.rounds
            );
        }
    }

    {
        // Ingest does not depend on the model: one run of each variant suffices.
        let config = PredictorConfig {
            max_tracked_keys: keys as usize,
            activity_window_ms: 600_000,
            ..PredictorConfig::default()
        };
        let mut forecaster = Forecaster::new(config.clone());
        let started = Instant::now();
        for &(ts, client, key) in &stream {
            forecaster.ingest(ts, client, key);
        }
        let ingest_s = started.elapsed().as_secs_f64();
        println!(
            "one-by-one ingest (Forecaster::ingest): {:.0} events/s",
            events as f64 / ingest_s
        );

        // Batched ingest plus the feature upkeep a tick does every 10 ms of
        // stream time (publishing changed rows, the activity scan), no scoring.
        let mut features = FeatureStore::new(
            config.max_tracked_keys,
            config.horizon_us(),
            config.activity_window_ms * 1000,
            config.seed,
        );
        let started = Instant::now();
        let mut next_tick = 10_000;
        let mut start = 0;
        while start < stream.len() {
            let end = start
                + stream[start..]
                    .iter()
                    .take(BATCH)
                    .take_while(|e| e.0 < next_tick)
                    .count();
            features.ingest_batch(&stream[start..end]);
            start = end;
            if stream.get(start).is_some_and(|e| e.0 >= next_tick) {
                features.decay_to(next_tick);
                next_tick += 10_000;
            }
        }
        features.decay_to(next_tick);
        let ingest_s = started.elapsed().as_secs_f64();
        println!(
            "batched ingest + decay_to every 10 ms of stream time: {:.0} events/s",
            events as f64 / ingest_s
        );
    }

    for path in traces {
        let trace = forelock_predictor::trace::read_trace_file(std::path::Path::new(&path))
            .expect("readable trace");
        for model in [
            ModelKind::Frequency,
            ModelKind::Logistic,
            ModelKind::HoldValue,
        ] {
            let mut forecaster = Forecaster::new(PredictorConfig {
                model,
                ..PredictorConfig::default()
            });
            let started = Instant::now();
            let mut next_tick = 0;
            let mut ticks = 0u64;
            let mut batch = Vec::with_capacity(BATCH);
            for event in &trace.events {
                if event.ts_us >= next_tick || batch.len() == BATCH {
                    forecaster.ingest_batch(&batch);
                    batch.clear();
                }
                while event.ts_us >= next_tick {
                    forecaster.tick(next_tick);
                    next_tick += 10_000;
                    ticks += 1;
                }
                batch.push((event.ts_us, event.client, event.key_hash));
            }
            forecaster.ingest_batch(&batch);
            let elapsed = started.elapsed().as_secs_f64();
            println!(
                "trace {path}: {} {} events + {ticks} ticks in {:.2} s: {:.0} events/s including ticks",
                model.name(),
                trace.events.len(),
                elapsed,
                trace.events.len() as f64 / elapsed
            );
        }
    }
}
