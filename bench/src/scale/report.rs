//! The scale bench's results: a line per point as it is measured, the
//! table, the plots against N.

use std::collections::BTreeSet;

use anyhow::Result;
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};

use super::{ScaleDatapath, ScalePoint};
use crate::plot::{self, Axes, Series};

pub(super) fn print_table(points: &[ScalePoint]) {
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED).set_header(vec![
        "services",
        "endpoints",
        "datapath",
        "program all (ms)",
        "one EndpointSlice change (ms)",
        "TCP_CRR (trans/s)",
        "TCP_CRR p99 (µs)",
    ]);
    let figure = |v: Option<f64>, digits: usize| {
        v.map(|v| format!("{v:.digits$}"))
            .unwrap_or_else(|| "–".into())
    };
    for p in points {
        table.add_row(vec![
            p.services.to_string(),
            p.endpoints.to_string(),
            p.datapath.label().to_owned(),
            p.program_ms
                .map(|v| format!("{v:.1}"))
                .or_else(|| p.note.as_ref().map(|_| "over the limit".into()))
                .unwrap_or_else(|| "–".into()),
            figure(p.one_change_ms, 2),
            figure(p.crr_per_second, 0),
            figure(p.crr_p99_us, 0),
        ]);
    }
    println!("{table}");
    for p in points.iter().filter(|p| p.note.is_some()) {
        println!(
            "{} at {} × {}: {}",
            p.datapath.label(),
            p.services,
            p.endpoints,
            p.note.as_deref().unwrap_or_default()
        );
    }
}

/// Prints a point as soon as it is measured (long sweeps keep what they
/// measured if stopped).
pub(super) fn report(point: ScalePoint) -> ScalePoint {
    let show = |v: Option<f64>| v.map(|v| format!("{v:.2}")).unwrap_or_else(|| "–".into());
    eprintln!(
        "  {:<20} program {:>10} ms   one change {:>8} ms   TCP_CRR {:>8}/s p99 {:>8} µs{}",
        point.datapath.label(),
        show(point.program_ms),
        show(point.one_change_ms),
        point
            .crr_per_second
            .map(|v| format!("{v:.0}"))
            .unwrap_or_else(|| "–".into()),
        point
            .crr_p99_us
            .map(|v| format!("{v:.0}"))
            .unwrap_or_else(|| "–".into()),
        point
            .note
            .as_ref()
            .map(|n| format!("   ({n})"))
            .unwrap_or_default()
    );
    point
}

/// The SVG curves against N: one colour per datapath, dashed for the
/// second (and later) endpoint count.
pub(super) fn plot_points(dir: &std::path::Path, points: &[ScalePoint]) -> Result<()> {
    let endpoint_counts: BTreeSet<usize> = points.iter().map(|p| p.endpoints).collect();
    /// File, title, unit, logarithmic figure axis, the figure.
    type Chart = (
        &'static str,
        &'static str,
        &'static str,
        bool,
        fn(&ScalePoint) -> Option<f64>,
    );
    let charts: [Chart; 4] = [
        (
            "scale-program.svg",
            "Program N services from nothing",
            "milliseconds",
            true,
            |p| p.program_ms,
        ),
        (
            "scale-change.svg",
            "Apply one changed EndpointSlice",
            "milliseconds",
            true,
            |p| p.one_change_ms,
        ),
        (
            "scale-crr-rate.svg",
            "TCP_CRR to one service",
            "transactions/s",
            false,
            |p| p.crr_per_second,
        ),
        (
            "scale-crr-p99.svg",
            "TCP_CRR p99 to one service",
            "microseconds",
            false,
            |p| p.crr_p99_us,
        ),
    ];
    for (file, title, unit, log_y, pick) in charts {
        let mut series = Vec::new();
        for (colour, datapath) in ScaleDatapath::ALL.into_iter().enumerate() {
            for (nth, &m) in endpoint_counts.iter().enumerate() {
                let curve: Vec<(f64, f64)> = points
                    .iter()
                    .filter(|p| p.datapath == datapath && p.endpoints == m)
                    .filter_map(|p| Some((p.services as f64, pick(p)?)))
                    .collect();
                series.push(Series {
                    label: format!("{} ({m} endpoint{})", datapath.label(), plural(m)),
                    points: curve,
                    colour,
                    dashed: nth > 0,
                });
            }
        }
        plot::lines(
            &dir.join(file),
            &Axes {
                title,
                x: "services",
                y: unit,
                log_x: true,
                log_y,
                x_label: plot::number,
                x_ticks: None,
            },
            &series,
        )?;
    }
    Ok(())
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}
