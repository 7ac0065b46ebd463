//! The scale bench's results: a line per point as it is measured, the
//! table, the plots against N.

use std::{collections::BTreeSet, time::Duration};

use anyhow::Result;
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};

use super::{ScaleDatapath, ScalePoint, Step};
use crate::plot::{self, Axes, Series};

pub(super) fn print_table(points: &[ScalePoint]) {
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED).set_header(vec![
        "services",
        "endpoints",
        "datapath",
        "program from objects (ms)",
        "full resync (ms)",
        "one change p50 / max (ms)",
        "TCP_CRR middle / last (trans/s)",
        "TCP_CRR p99 middle / last (µs)",
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
            if p.killed {
                "killed at the limit".into()
            } else {
                figure(p.program_ms, 1)
            },
            figure(p.resync_ms, 1),
            format!(
                "{} / {}",
                figure(p.change_p50_ms, 2),
                figure(p.change_max_ms, 2)
            ),
            format!(
                "{} / {}",
                figure(p.crr_middle_per_second, 0),
                figure(p.crr_last_per_second, 0)
            ),
            format!(
                "{} / {}",
                figure(p.crr_middle_p99_us, 0),
                figure(p.crr_last_p99_us, 0)
            ),
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
    let rate = |v: Option<f64>| v.map(|v| format!("{v:.0}")).unwrap_or_else(|| "–".into());
    eprintln!(
        "  {:<20} program {:>10} ms   resync {:>10} ms   change max {:>8} ms   TCP_CRR {:>6}/{:>6}/s{}",
        point.datapath.label(),
        show(point.program_ms),
        show(point.resync_ms),
        show(point.change_max_ms),
        rate(point.crr_middle_per_second),
        rate(point.crr_last_per_second),
        point
            .note
            .as_ref()
            .map(|n| format!("   ({n})"))
            .unwrap_or_default()
    );
    point
}

/// The SVG curves against N: one colour per datapath, dashed for the
/// second (and later) endpoint count; a step killed at `limit` is a
/// cross at the limit on its chart.
pub(super) fn plot_points(
    dir: &std::path::Path,
    points: &[ScalePoint],
    limit: Duration,
) -> Result<()> {
    let endpoint_counts: BTreeSet<usize> = points.iter().map(|p| p.endpoints).collect();
    /// File, title, unit, logarithmic figure axis, the figure.
    type Chart = (
        &'static str,
        &'static str,
        &'static str,
        bool,
        fn(&ScalePoint) -> Option<f64>,
    );
    let charts: [Chart; 7] = [
        (
            "scale-program.svg",
            "Program N services from the objects, from nothing",
            "milliseconds",
            true,
            |p| p.program_ms,
        ),
        (
            "scale-resync.svg",
            "Full resync with everything in place",
            "milliseconds",
            true,
            |p| p.resync_ms,
        ),
        (
            "scale-change.svg",
            "Apply one changed EndpointSlice (the slowest of the samples)",
            "milliseconds",
            true,
            |p| p.change_max_ms,
        ),
        (
            "scale-crr-rate.svg",
            "TCP_CRR to the middle service of KUBE-SERVICES",
            "transactions/s",
            false,
            |p| p.crr_middle_per_second,
        ),
        (
            "scale-crr-rate-last.svg",
            "TCP_CRR to the last service of KUBE-SERVICES",
            "transactions/s",
            false,
            |p| p.crr_last_per_second,
        ),
        (
            "scale-crr-p99.svg",
            "TCP_CRR p99 to the middle service",
            "microseconds",
            false,
            |p| p.crr_middle_p99_us,
        ),
        (
            "scale-crr-p99-last.svg",
            "TCP_CRR p99 to the last service",
            "microseconds",
            false,
            |p| p.crr_last_p99_us,
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
                    crosses: false,
                });
                let step = match file {
                    "scale-program.svg" => Some(Step::Program),
                    "scale-resync.svg" => Some(Step::Resync),
                    "scale-change.svg" => Some(Step::Change),
                    _ => None,
                };
                let killed: Vec<(f64, f64)> = points
                    .iter()
                    .filter(|p| p.datapath == datapath && p.endpoints == m)
                    .filter(|p| p.killed_in.is_some() && p.killed_in == step)
                    .map(|p| (p.services as f64, limit.as_secs_f64() * 1e3))
                    .collect();
                if !killed.is_empty() {
                    series.push(Series {
                        label: format!("{} ({m}): killed at the limit", datapath.label()),
                        points: killed,
                        colour,
                        dashed: nth > 0,
                        crosses: true,
                    });
                }
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
