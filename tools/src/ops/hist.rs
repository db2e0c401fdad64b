//! `forelock hist`: the broker's latency histograms.
//!
//! forelockd appends one interval histogram per path about every second to
//! `<runtime dir>/histograms.hlog` (rotated to `histograms.hlog.1`), an
//! HdrHistogram V2 interval log (see `broker/src/metrics.rs`). This command
//! reads both files, prints a percentile table per path, writes one interval
//! log per path under `--out` (for HdrHistogram's own tools, e.g.
//! HistogramLogAnalyzer) and a percentile plot, `--out/hist.png`.

use super::{RuntimeDirArg, format_ns};
use anyhow::{Context, anyhow};
use base64::Engine as _;
use hdrhistogram::Histogram;
use hdrhistogram::serialization::interval_log::{
    IntervalLogIterator, IntervalLogWriterBuilder, LogEntry, Tag,
};
use hdrhistogram::serialization::{Deserializer, V2DeflateSerializer};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

/// The files forelockd writes (kept equal to `forelockd::metrics`).
pub const LOG_FILE: &str = forelockd::metrics::HISTOGRAM_LOG_FILE;
pub const ROTATED_LOG_FILE: &str = forelockd::metrics::HISTOGRAM_LOG_ROTATED_FILE;

#[derive(clap::Args, Debug)]
pub struct HistArgs {
    #[command(flatten)]
    pub runtime: RuntimeDirArg,
    /// Directory for the per-path interval logs and hist.png (created).
    #[arg(long, value_name = "DIR", default_value = "forelock-hist")]
    pub out: PathBuf,
}

/// One interval read from the broker's log.
pub struct Interval {
    /// Seconds since the Unix epoch.
    pub start: Duration,
    pub length: Duration,
    pub histogram: Histogram<u64>,
}

/// Every path's intervals, in log order, keyed by tag.
pub type Intervals = BTreeMap<String, Vec<Interval>>;

/// Read the rotated log, then the current one.
pub fn read_logs(dir: &Path) -> anyhow::Result<Intervals> {
    let files = [dir.join(ROTATED_LOG_FILE), dir.join(LOG_FILE)];
    if !files.iter().any(|f| f.exists()) {
        if !dir.join(shm_layout::TABLE_FILE).exists() {
            return Err(anyhow!(
                "forelockd is not running at {}: no lock table and no histogram log there; \
                 start it, or pass --runtime-dir / set FORELOCK_RUNTIME_DIR",
                dir.display()
            ));
        }
        return Err(anyhow!(
            "no histogram log at {}: forelockd writes it about once a second after it served \
             a request; is this forelockd a release that writes it (forelock status)?",
            files[1].display()
        ));
    }
    let mut out = Intervals::new();
    let mut deserializer = Deserializer::new();
    for file in files {
        let bytes = match std::fs::read(&file) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                return Err(anyhow!(
                    "permission denied on {}: run as a user who may read forelockd's runtime \
                     directory",
                    file.display()
                ));
            }
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", file.display())),
        };
        let mut base = Duration::ZERO;
        for entry in IntervalLogIterator::new(&bytes) {
            // A line cut short by a broker writing right now ends the file.
            let Ok(entry) = entry else { break };
            let interval = match entry {
                LogEntry::BaseTime(t) => {
                    base = t;
                    continue;
                }
                LogEntry::StartTime(_) => continue,
                LogEntry::Interval(i) => i,
            };
            let Some(tag) = interval.tag() else { continue };
            let Ok(raw) =
                base64::engine::general_purpose::STANDARD.decode(interval.encoded_histogram())
            else {
                continue;
            };
            let Ok(histogram) = deserializer.deserialize::<u64, _>(&mut raw.as_slice()) else {
                continue;
            };
            out.entry(tag.as_str().to_owned())
                .or_default()
                .push(Interval {
                    start: base + interval.start_timestamp(),
                    length: interval.duration(),
                    histogram,
                });
        }
    }
    Ok(out)
}

/// The order paths are printed in: the broker's order, then any other tag.
fn path_order(tag: &str) -> usize {
    forelockd::metrics::LatencyPath::ALL
        .iter()
        .position(|p| p.tag() == tag)
        .unwrap_or(usize::MAX)
}

/// Each path's intervals added up, in print order.
pub fn totals(intervals: &Intervals) -> Vec<(String, Histogram<u64>)> {
    let mut out: Vec<(String, Histogram<u64>)> = intervals
        .iter()
        .filter_map(|(tag, list)| {
            let mut total = list.first()?.histogram.clone();
            total.reset();
            for i in list {
                // Histograms with different bounds add with auto-resize; a
                // failure only drops that interval.
                let _ = total.add(&i.histogram);
            }
            Some((tag.clone(), total))
        })
        .collect();
    out.sort_by_key(|(tag, _)| (path_order(tag), tag.clone()));
    out
}

const TABLE_QUANTILES: [(f64, &str); 6] = [
    (0.5, "p50"),
    (0.9, "p90"),
    (0.99, "p99"),
    (0.999, "p99.9"),
    (0.9999, "p99.99"),
    (1.0, "max"),
];

/// The percentile table `forelock hist` prints.
pub fn render_table(totals: &[(String, Histogram<u64>)], seconds: f64) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = write!(out, "{:<16}{:>10}", "PATH", "COUNT");
    for (_, name) in TABLE_QUANTILES {
        let _ = write!(out, "{name:>11}");
    }
    let _ = writeln!(out);
    for (tag, h) in totals {
        let _ = write!(out, "{tag:<16}{:>10}", h.len());
        for (q, _) in TABLE_QUANTILES {
            let _ = write!(out, "{:>11}", format_ns(h.value_at_quantile(q) as f64));
        }
        let _ = writeln!(out);
    }
    let _ = writeln!(
        out,
        "(broker-side latencies over {seconds:.0} s of logged intervals; the fast path never \
         reaches the broker: see `forelock bench`)"
    );
    out
}

/// Write one V2 interval log per path under `out`, with a common base time.
fn write_logs(out: &Path, intervals: &Intervals) -> anyhow::Result<Vec<PathBuf>> {
    let base = intervals
        .values()
        .flatten()
        .map(|i| i.start)
        .min()
        .unwrap_or_default();
    let mut written = Vec::new();
    for (tag, list) in intervals {
        let path = out.join(format!("{tag}.hlog"));
        let mut file = std::io::BufWriter::new(
            std::fs::File::create(&path)
                .with_context(|| format!("cannot create {}", path.display()))?,
        );
        let mut serializer = V2DeflateSerializer::new();
        let mut log = IntervalLogWriterBuilder::new()
            .add_comment(&format!(
                "forelockd {tag} latencies in nanoseconds, dumped by forelock hist"
            ))
            .with_start_time(UNIX_EPOCH + base)
            .with_base_time(UNIX_EPOCH + base)
            .with_max_value_divisor(1_000_000.0)
            .begin_log_with(&mut file, &mut serializer)?;
        for i in list {
            log.write_histogram(
                &i.histogram,
                i.start.saturating_sub(base),
                i.length,
                Tag::new(tag),
            )
            .map_err(|e| anyhow!("writing {}: {e:?}", path.display()))?;
        }
        drop(log);
        std::io::Write::flush(&mut file)?;
        written.push(path);
    }
    Ok(written)
}

pub fn run(args: &HistArgs) -> anyhow::Result<i32> {
    let dir = args.runtime.dir();
    let intervals = read_logs(&dir)?;
    let totals = totals(&intervals);
    if totals.iter().all(|(_, h)| h.is_empty()) {
        println!(
            "no latencies recorded yet in {}: forelockd logs a path once a request took it",
            dir.join(LOG_FILE).display()
        );
        return Ok(0);
    }
    let seconds: f64 = {
        let starts = intervals.values().flatten().map(|i| i.start);
        let ends = intervals.values().flatten().map(|i| i.start + i.length);
        match (starts.min(), ends.max()) {
            (Some(a), Some(b)) => b.saturating_sub(a).as_secs_f64(),
            _ => 0.0,
        }
    };
    print!("{}", render_table(&totals, seconds));
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let logs = write_logs(&args.out, &intervals)?;
    let png = args.out.join("hist.png");
    let text = super::plot::percentile_plot(&png, &totals)?;
    println!(
        "wrote {} interval logs and {} to {}",
        logs.len(),
        png.file_name().unwrap_or_default().to_string_lossy(),
        args.out.display()
    );
    if !text {
        println!(
            "note: no TrueType font found under /usr/share/fonts (install fonts-dejavu-core): \
             the plot has no text"
        );
    }
    Ok(0)
}
