//! The percentile plot of `forelock hist`: latency (log scale) against
//! percentile, on the "nines" axis HdrHistogram's plotter uses
//! (x = log10(1 / (1 - q)): 90% at 1, 99% at 2, 99.9% at 3).

use anyhow::anyhow;
use hdrhistogram::Histogram;
use plotters::prelude::*;
use std::path::Path;

/// The plot's right edge: 99.999%.
const MAX_NINES: f64 = 5.0;

const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

fn nines(q: f64) -> f64 {
    if q >= 1.0 {
        MAX_NINES
    } else {
        (1.0 / (1.0 - q)).log10().min(MAX_NINES)
    }
}

/// (x in nines, latency ns) along each histogram's percentile curve.
fn curve(h: &Histogram<u64>) -> Vec<(f64, f64)> {
    let mut points: Vec<(f64, f64)> = h
        .iter_quantiles(5)
        .map(|v| {
            (
                nines(v.quantile_iterated_to()),
                v.value_iterated_to().max(1) as f64,
            )
        })
        .collect();
    points.push((MAX_NINES, h.max().max(1) as f64));
    points
}

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing the plot: {e:?}")
}

/// Draw `hist.png`; returns whether the text could be drawn (a font was found).
pub fn percentile_plot(path: &Path, totals: &[(String, Histogram<u64>)]) -> anyhow::Result<bool> {
    let text = crate::fonts::loaded();
    let curves: Vec<(&str, Vec<(f64, f64)>)> = totals
        .iter()
        .filter(|(_, h)| !h.is_empty())
        .map(|(tag, h)| (tag.as_str(), curve(h)))
        .collect();
    let low = curves
        .iter()
        .flat_map(|(_, c)| c.iter().map(|p| p.1))
        .fold(f64::MAX, f64::min)
        .min(1e3)
        / 2.0;
    let high = curves
        .iter()
        .flat_map(|(_, c)| c.iter().map(|p| p.1))
        .fold(1e4, f64::max)
        * 2.0;
    let root = BitMapBackend::new(path, (1200, 700)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut builder = ChartBuilder::on(&root);
    builder.margin(20);
    if text {
        builder
            .caption(
                "forelockd latency by percentile (broker side, log scale)",
                (crate::fonts::FAMILY, 22),
            )
            .x_label_area_size(40)
            .y_label_area_size(80);
    }
    let mut chart = builder
        .build_cartesian_2d(0f64..MAX_NINES, (low..high).log_scale())
        .map_err(err)?;
    let mut mesh = chart.configure_mesh();
    if text {
        let x_formatter = |x: &f64| {
            let labels = ["0%", "90%", "99%", "99.9%", "99.99%", "99.999%"];
            let nearest = x.round();
            if (x - nearest).abs() < 1e-6 {
                labels
                    .get(nearest as usize)
                    .copied()
                    .unwrap_or("")
                    .to_string()
            } else {
                String::new()
            }
        };
        let y_formatter = |y: &f64| super::format_ns(*y);
        mesh.x_labels(6)
            .x_label_formatter(&x_formatter)
            .y_label_formatter(&y_formatter)
            .x_desc("percentile")
            .y_desc("latency")
            .label_style((crate::fonts::FAMILY, 14));
        mesh.draw().map_err(err)?;
    } else {
        mesh.x_labels(0).y_labels(0);
        mesh.draw().map_err(err)?;
    }
    for (i, (tag, points)) in curves.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let series = chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                color.stroke_width(2),
            ))
            .map_err(err)?;
        if text {
            let label = tag.to_string();
            series.label(label).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
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
            .map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(text)
}
