//! latency.png: p50 (dot) to p99 (bar top) per system, grouped by workload,
//! on a logarithmic axis. Text needs a TTF font from /usr/share/fonts; without
//! one the chart is drawn without text.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::Context;
use plotters::prelude::*;

use super::driver::Outcome;
use super::report::{format_ns, summarize};

const FONT_FAMILY: &str = "sans-serif";
/// Fonts tried first, then any .ttf under /usr/share/fonts.
const PREFERRED_FONTS: [&str; 2] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

fn find_font() -> Option<PathBuf> {
    if std::env::var_os("FORELOCK_BENCH_NO_FONT").is_some() {
        return None;
    }
    if let Some(path) = PREFERRED_FONTS
        .iter()
        .map(PathBuf::from)
        .find(|path| path.is_file())
    {
        return Some(path);
    }
    // A bounded walk: three levels, at most 10,000 entries.
    let mut pending = vec![(PathBuf::from("/usr/share/fonts"), 0)];
    let mut seen = 0;
    while let Some((dir, depth)) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            seen += 1;
            if seen > 10_000 {
                return None;
            }
            let path = entry.path();
            if path.is_dir() && depth < 3 {
                pending.push((path, depth + 1));
            } else if path.extension().is_some_and(|extension| extension == "ttf") {
                return Some(path);
            }
        }
    }
    None
}

/// Registers a font once per process; false if none could be loaded.
fn font_loaded() -> bool {
    static LOADED: OnceLock<bool> = OnceLock::new();
    *LOADED.get_or_init(|| {
        let Some(path) = find_font() else {
            return false;
        };
        let Ok(bytes) = std::fs::read(&path) else {
            return false;
        };
        // Leaked once per process: plotters keeps fonts for 'static.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font(FONT_FAMILY, FontStyle::Normal, bytes).is_ok()
    })
}

const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

pub fn draw(path: &Path, outcome: &Outcome) -> anyhow::Result<()> {
    let text = font_loaded();
    let workloads: Vec<String> = outcome
        .workloads
        .iter()
        .map(|workload| workload.name())
        .collect();
    let systems: Vec<String> = outcome
        .systems
        .iter()
        .map(|system| system.name.clone())
        .collect();
    // (workload index, system index, p50, p99)
    let mut points = Vec::new();
    for cell in &outcome.cells {
        let Some(summary) = summarize(&cell.runs) else {
            continue;
        };
        let workload = workloads.iter().position(|name| *name == cell.workload);
        let system = systems.iter().position(|name| *name == cell.system);
        if let (Some(workload), Some(system)) = (workload, system) {
            points.push((
                workload,
                system,
                summary.p50_ns.max(1),
                summary.p99_ns.max(1),
            ));
        }
    }
    let low = points.iter().map(|point| point.2).min().unwrap_or(1).max(1) as f64 / 2.0;
    let high = points
        .iter()
        .map(|point| point.3)
        .max()
        .unwrap_or(1_000)
        .max(10) as f64
        * 2.0;

    let root = BitMapBackend::new(path, (1400, 700)).into_drawing_area();
    root.fill(&WHITE)
        .map_err(|error| anyhow::anyhow!("{error:?}"))?;
    let mut builder = ChartBuilder::on(&root);
    builder.margin(20);
    if text {
        builder
            .caption(
                "forelock bench: latency p50 (dot) to p99 (bar top), log scale",
                (FONT_FAMILY, 22),
            )
            .x_label_area_size(40)
            .y_label_area_size(80);
    }
    let workload_count = workloads.len().max(1) as f64;
    let mut chart = builder
        .build_cartesian_2d(-0.5f64..(workload_count - 0.5), (low..high).log_scale())
        .map_err(|error| anyhow::anyhow!("{error:?}"))?;
    let mut mesh = chart.configure_mesh();
    mesh.disable_x_mesh();
    if text {
        let names = workloads.clone();
        let x_formatter = move |x: &f64| {
            let nearest = x.round();
            if (x - nearest).abs() < 1e-6 && nearest >= 0.0 {
                names.get(nearest as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        };
        let y_formatter = |y: &f64| format_ns(*y as u64);
        mesh.x_labels(workloads.len() * 2 + 1)
            .x_label_formatter(&x_formatter)
            .y_label_formatter(&y_formatter)
            .y_desc("latency")
            .label_style((FONT_FAMILY, 14));
        mesh.draw().map_err(|error| anyhow::anyhow!("{error:?}"))?;
    } else {
        mesh.x_labels(0).y_labels(0);
        mesh.draw().map_err(|error| anyhow::anyhow!("{error:?}"))?;
    }

    let slot = 0.8 / systems.len().max(1) as f64;
    for (system_index, system) in systems.iter().enumerate() {
        let color = PALETTE[system_index % PALETTE.len()];
        let offset = -0.4 + slot * (system_index as f64 + 0.5);
        let mine: Vec<_> = points
            .iter()
            .filter(|point| point.1 == system_index)
            .collect();
        let bars = mine.iter().map(|&&(workload, _, p50, p99)| {
            let x = workload as f64 + offset;
            Rectangle::new(
                [(x - slot * 0.35, p50 as f64), (x + slot * 0.35, p99 as f64)],
                color.mix(0.5).filled(),
            )
        });
        chart
            .draw_series(bars)
            .map_err(|error| anyhow::anyhow!("{error:?}"))?;
        let dots = mine.iter().map(|&&(workload, _, p50, _)| {
            Circle::new((workload as f64 + offset, p50 as f64), 4, color.filled())
        });
        let series = chart
            .draw_series(dots)
            .map_err(|error| anyhow::anyhow!("{error:?}"))?;
        if text {
            series
                .label(system.clone())
                .legend(move |(x, y)| Circle::new((x + 5, y), 5, color.filled()));
        }
    }
    if text {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font((FONT_FAMILY, 14))
            .position(SeriesLabelPosition::UpperLeft)
            .draw()
            .map_err(|error| anyhow::anyhow!("{error:?}"))?;
    }
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
