//! `forelock status`: the broker's health and counters, read from the table
//! header and the score file header.

use super::{RuntimeDirArg, format_ms, open_scores, open_table, process_exists};
use serde::Serialize;
use shm_layout::sync::shm::Ordering;
use std::path::Path;

/// A heartbeat (or forecaster tick) older than this means "not alive". The
/// broker ticks every `allocator.tick_ms` (10 ms by default).
pub const FRESH_NS: u64 = 1_000_000_000;

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    pub runtime: RuntimeDirArg,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize, Debug)]
pub struct Status {
    pub runtime_dir: String,
    pub broker: Broker,
    pub table: Table,
    pub forecaster: Forecaster,
    pub counters: Counters,
}

#[derive(Serialize, Debug)]
pub struct Broker {
    /// Heartbeat fresh and the process exists.
    pub alive: bool,
    pub pid: u32,
    pub epoch: u64,
    pub started_unix_ms: u64,
    pub uptime_ms: u64,
    /// Age of the last heartbeat; None if the broker never ticked.
    pub heartbeat_age_ms: Option<u64>,
}

#[derive(Serialize, Debug)]
pub struct Table {
    pub slots_used: u64,
    pub slots_prepared: u64,
    pub slots_capacity: u32,
    pub clients: u64,
    pub clients_capacity: u32,
    pub token_floor: u64,
}

#[derive(Serialize, Debug)]
pub struct Forecaster {
    pub alive: bool,
    pub pid: u32,
    pub model: String,
    pub horizon_ms: u32,
    /// Age of the last score snapshot; None if none was ever written.
    pub last_scores_age_ms: Option<u64>,
    /// How the forecaster scores itself: samples labelled so far, its recent
    /// Brier score and the frequency baseline's on the same samples.
    pub self_score_samples: u64,
    pub brier: f32,
    pub brier_baseline: f32,
    /// The online choice: the member followed, and how it stands (None for
    /// a single model or a forecaster that does not publish it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub choice: Option<ChoiceStatus>,
    /// Why the score file could not be read, if it could not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The forecaster's online choice (`predictor/src/online.rs`); losses are
/// means per tick in its miniature allocators: a missed request costs 1, a
/// wasted slot-second the current waste price.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ChoiceStatus {
    pub leader: String,
    /// The next best member's loss minus the leader's.
    pub lead: f32,
    /// The choice's own loss minus the best member's, and its bound.
    pub trail: f32,
    pub bound: f32,
}

#[derive(Serialize, Debug)]
pub struct Counters {
    /// Grants on prepared slots (the client's own CAS).
    pub hits: u64,
    /// Grants through the broker for unprepared keys.
    pub misses: u64,
    /// hits / (hits + misses); None before the first grant.
    pub hit_rate: Option<f64>,
    pub preparations: u64,
    pub wasted_preparations: u64,
    pub late: u64,
    pub contended: u64,
    pub handoffs: u64,
    /// Keys whose waiter queue the broker prepared because contention was
    /// forecast, and how many of those preparations a waiter then used.
    pub contention_prepared: u64,
    pub contention_prepared_hits: u64,
    pub owner_deaths: u64,
    pub repairs: u64,
    pub table_full: u64,
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Read the status of the broker serving `dir`.
pub fn read(dir: &Path) -> anyhow::Result<Status> {
    let table = open_table(dir)?;
    let header = table.view.header();
    let geometry = table.view.geometry();
    let s = &header.stats;
    let load = |a: &shm_layout::sync::shm::AtomicU64| a.load(Ordering::Relaxed);
    let now_ns = shm_layout::monotonic_ns();
    let heartbeat = load(&header.heartbeat_ns);
    let heartbeat_age_ns = (heartbeat != 0).then(|| now_ns.saturating_sub(heartbeat));
    let pid = header.broker_pid.load(Ordering::Relaxed);
    let started = load(&header.broker_started_unix_ms);
    let uptime_ms = unix_ms().saturating_sub(started);
    // A broker that started less than FRESH_NS ago may not have ticked yet.
    let fresh =
        heartbeat_age_ns.is_some_and(|age| age < FRESH_NS) || uptime_ms < FRESH_NS / 1_000_000;
    let broker = Broker {
        alive: fresh && process_exists(pid),
        pid,
        epoch: load(&header.broker_epoch),
        started_unix_ms: started,
        uptime_ms,
        heartbeat_age_ms: heartbeat_age_ns.map(|ns| ns / 1_000_000),
    };
    let (hits, misses) = (load(&s.hits), load(&s.misses));
    let counters = Counters {
        hits,
        misses,
        hit_rate: (hits + misses > 0).then(|| hits as f64 / (hits + misses) as f64),
        preparations: load(&s.preparations),
        wasted_preparations: load(&s.wasted),
        late: load(&s.late),
        contended: load(&s.contended),
        handoffs: load(&s.handoffs),
        contention_prepared: load(&s.contention_prepared),
        contention_prepared_hits: load(&s.contention_prepared_hits),
        owner_deaths: load(&s.owner_deaths),
        repairs: load(&s.repairs),
        table_full: load(&s.table_full),
    };
    let forecaster = match open_scores(dir) {
        Ok(scores) => {
            let h = scores.view.header();
            let written = load(&h.written_at_ns);
            let age_ns = (written != 0).then(|| now_ns.saturating_sub(written));
            let pid = h.writer_pid.load(Ordering::Relaxed);
            let score = scores.view.self_score();
            Forecaster {
                alive: age_ns.is_some_and(|age| age < FRESH_NS) && process_exists(pid),
                pid,
                model: scores.view.model(),
                horizon_ms: h.horizon_ms.load(Ordering::Relaxed),
                last_scores_age_ms: age_ns.map(|ns| ns / 1_000_000),
                self_score_samples: score.samples,
                brier: score.brier,
                brier_baseline: score.brier_baseline,
                choice: scores.view.choice().map(|choice| ChoiceStatus {
                    leader: choice.leader,
                    lead: choice.lead,
                    trail: choice.trail,
                    bound: choice.bound,
                }),
                error: None,
            }
        }
        Err(e) => Forecaster {
            alive: false,
            pid: 0,
            model: String::new(),
            horizon_ms: 0,
            last_scores_age_ms: None,
            self_score_samples: 0,
            brier: 0.0,
            brier_baseline: 0.0,
            choice: None,
            error: Some(e.to_string()),
        },
    };
    Ok(Status {
        runtime_dir: dir.display().to_string(),
        broker,
        table: Table {
            slots_used: load(&s.slots_used),
            slots_prepared: load(&s.slots_prepared),
            slots_capacity: geometry.slot_count,
            clients: load(&s.clients),
            clients_capacity: geometry.client_count,
            token_floor: load(&header.token_floor),
        },
        forecaster,
        counters,
    })
}

pub fn run(args: &StatusArgs) -> anyhow::Result<i32> {
    let dir = args.runtime.dir();
    let status = read(&dir)?;
    let cluster = read_cluster(&dir);
    if args.json {
        let mut v = serde_json::to_value(&status)?;
        if let Some(c) = cluster {
            v["cluster"] = c;
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{}", render(&status));
        if let Some(c) = cluster {
            print!("{}", render_cluster(&c));
        }
    }
    // Like `systemctl status`: 0 when the broker is alive, 3 when it is not.
    Ok(if status.broker.alive { 0 } else { 3 })
}

/// The broker's `cluster.json` (written every 500 ms when `[cluster]` is
/// configured), if there is one.
pub fn read_cluster(dir: &std::path::Path) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(dir.join("cluster.json")).ok()?;
    serde_json::from_str(&text).ok()
}

/// Why the broker whose `cluster.json` is `c` grants no global key now
/// (not connected to etcd, or no lease it can vouch for), or `None` if it
/// grants them.
pub fn not_granting(c: &serde_json::Value) -> Option<String> {
    let granting = c["connected"] == true && c["lease"]["safe_for_ms"].as_u64() > Some(0);
    (!granting).then(|| {
        c["last_error"]
            .as_str()
            .unwrap_or("no lease yet")
            .to_string()
    })
}

/// The cluster part of `forelock status`: the lease, the members, and the
/// global keys this host holds, waits for or prefetched.
pub fn render_cluster(c: &serde_json::Value) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let lease = &c["lease"];
    let health = match not_granting(c) {
        None => format!(
            "lease {} safe for {} ms",
            lease["id"].as_str().unwrap_or("?"),
            lease["safe_for_ms"]
        ),
        Some(why) => format!("NOT GRANTING global keys: {why}"),
    };
    let _ = writeln!(
        out,
        "cluster:     node {}, {health}; fenced {} times",
        c["node"].as_str().unwrap_or("?"),
        c["fences"]
    );
    if let Some(members) = c["members"].as_array().filter(|m| !m.is_empty()) {
        let list: Vec<String> = members
            .iter()
            .map(|m| {
                let up = if m["up"] == true { "up" } else { "DOWN" };
                format!(
                    "{} {} {up}",
                    m["node"].as_str().unwrap_or("?"),
                    m["addr"].as_str().unwrap_or("?")
                )
            })
            .collect();
        let _ = writeln!(out, "  members:   {}", list.join(", "));
    }
    let keys: Vec<String> = c["keys"]
        .as_array()
        .map(|v| {
            v.iter()
                .map(|k| {
                    format!(
                        "{} ({})",
                        k["key"].as_str().unwrap_or("?"),
                        k["state"].as_str().unwrap_or("?")
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "  node grants: {}; lost holds {}; prefetch hits {}, unused {}",
        if keys.is_empty() {
            "none".into()
        } else {
            keys.join(", ")
        },
        c["lost_holds"],
        c["prefetch_hits"],
        c["prefetch_unused"]
    );
    out
}

fn percent(part: u64, whole: u64) -> String {
    if whole == 0 {
        "-".into()
    } else {
        format!("{:.1}%", part as f64 * 100.0 / whole as f64)
    }
}

/// The text form of `forelock status`.
pub fn render(s: &Status) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let b = &s.broker;
    let heartbeat = match b.heartbeat_age_ms {
        Some(age) => format!("last heartbeat {} ago", format_ms(age)),
        None => "never ticked".into(),
    };
    let state = if b.alive {
        format!("running, pid {}, up {}", b.pid, format_ms(b.uptime_ms))
    } else if process_exists(b.pid) {
        format!("NOT RESPONDING, pid {} exists but {heartbeat}", b.pid)
    } else {
        format!("NOT RUNNING (last pid {}, {heartbeat})", b.pid)
    };
    let _ = writeln!(out, "forelockd   {state}");
    let _ = writeln!(out, "  runtime   {}", s.runtime_dir);
    let _ = writeln!(
        out,
        "  epoch     {} (broker starts on this table), token floor {}",
        b.epoch, s.table.token_floor
    );
    let t = &s.table;
    let _ = writeln!(
        out,
        "  slots     {} used, {} prepared, {} capacity ({} used)",
        t.slots_used,
        t.slots_prepared,
        t.slots_capacity,
        percent(t.slots_used, u64::from(t.slots_capacity))
    );
    let _ = writeln!(out, "  clients   {} of {}", t.clients, t.clients_capacity);
    let f = &s.forecaster;
    let forecaster = if f.alive {
        format!(
            "alive, pid {}, model {}, horizon {} ms, scores {} old",
            f.pid,
            if f.model.is_empty() { "?" } else { &f.model },
            f.horizon_ms,
            format_ms(f.last_scores_age_ms.unwrap_or(0))
        )
    } else if let Some(error) = &f.error {
        format!("unknown: {error}")
    } else if let Some(age) = f.last_scores_age_ms {
        format!(
            "NOT RUNNING (last scores {} ago from pid {}, model {})",
            format_ms(age),
            f.pid,
            if f.model.is_empty() { "?" } else { &f.model }
        )
    } else {
        "NOT RUNNING (no scores ever written): keys are prepared by recency only".into()
    };
    let _ = writeln!(out, "forecaster  {forecaster}");
    if f.alive && f.self_score_samples > 0 {
        let _ = writeln!(
            out,
            "  self-score Brier {:.4} (frequency baseline {:.4}; lower is better) over {} labelled samples",
            f.brier, f.brier_baseline, f.self_score_samples
        );
    }
    if let (true, Some(choice)) = (f.alive, &f.choice)
        && choice.bound.is_nan()
    {
        let _ = writeln!(
            out,
            "  online choice follows {} (no losses yet: the first come with the first tick)",
            choice.leader
        );
    } else if let (true, Some(choice)) = (f.alive, &f.choice) {
        let _ = writeln!(
            out,
            "  online choice follows {}, ahead of the next best member by {:.4} loss per tick; \
             trails the best member by {:.4} (bound {:.4})",
            choice.leader, choice.lead, choice.trail, choice.bound
        );
    }
    let c = &s.counters;
    let _ = writeln!(
        out,
        "grants      {} prepared (hits), {} through the broker (misses): hit rate {}",
        c.hits,
        c.misses,
        c.hit_rate
            .map_or("-".into(), |r| format!("{:.1}%", r * 100.0))
    );
    let _ = writeln!(
        out,
        "prepared    {} preparations, {} wasted ({}), {} requests arrived late",
        c.preparations,
        c.wasted_preparations,
        percent(c.wasted_preparations, c.preparations),
        c.late
    );
    let _ = writeln!(
        out,
        "contention  {} queued, {} hand-offs, {} owner deaths; {} queues prepared ahead, {} used",
        c.contended, c.handoffs, c.owner_deaths, c.contention_prepared, c.contention_prepared_hits
    );
    let _ = writeln!(
        out,
        "trouble     {} refused (table full), {} malformed words repaired",
        c.table_full, c.repairs
    );
    out
}

#[cfg(test)]
mod cluster_tests {
    use super::render_cluster;

    #[test]
    fn the_cluster_line_says_when_global_keys_are_not_granted() {
        let fenced = serde_json::json!({
            "node": "h1", "connected": false, "last_error": "etcd did not answer",
            "lease": {"id": "0", "epoch": 1, "safe_for_ms": 0}, "fences": 2,
            "members": [], "keys": [], "lost_holds": 1, "prefetch_hits": 0, "prefetch_unused": 0
        });
        let text = render_cluster(&fenced);
        assert!(
            text.contains("NOT GRANTING global keys: etcd did not answer"),
            "{text}"
        );
        assert!(text.contains("lost holds 1"), "{text}");
        let healthy = serde_json::json!({
            "node": "h1", "connected": true, "last_error": "",
            "lease": {"id": "7a", "epoch": 1, "safe_for_ms": 8000}, "fences": 0,
            "members": [{"node": "h2", "addr": "10.0.0.2:7946", "up": true}],
            "keys": [{"key": "global/a", "state": "held"}],
            "lost_holds": 0, "prefetch_hits": 3, "prefetch_unused": 1
        });
        let text = render_cluster(&healthy);
        assert!(text.contains("lease 7a safe for 8000 ms"), "{text}");
        assert!(text.contains("h2 10.0.0.2:7946 up"), "{text}");
        assert!(text.contains("global/a (held)"), "{text}");
    }
}
