//! latency.png: p50 (dot) to p99 (bar top) per system, grouped by workload,
//! on a logarithmic axis. Text needs a TTF font from /usr/share/fonts; without
//! one the chart is drawn without text.

use std::path::Path;

use anyhow::Context;
use plotters::prelude::*;

use super::driver::Outcome;
use super::report::{format_ns, summarize};

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
    let text = crate::fonts::loaded();
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
                (crate::fonts::FAMILY, 22),
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
            .label_style((crate::fonts::FAMILY, 14));
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
            .label_font((crate::fonts::FAMILY, 14))
            .position(SeriesLabelPosition::UpperLeft)
            .draw()
            .map_err(|error| anyhow::anyhow!("{error:?}"))?;
    }
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
