//! The latency bench's results: latency.json, one table per response
//! size and rate, one chart per size and rate.

use std::{collections::BTreeMap, path::Path};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::designs::{Design, Tuning};
use crate::{
    loadgen::{LoadResult, QUANTILES},
    plot::{self, Axes, Series},
};

/// What latency.json holds.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Document {
    pub(super) rows: Vec<Row>,
    /// Designs this kernel cannot build, and why.
    pub(super) unavailable: BTreeMap<Design, String>,
}

/// One measurement.
#[derive(Debug, Serialize, Deserialize)]
pub struct Row {
    pub design: Design,
    pub tuning: Tuning,
    pub size: usize,
    /// "max", "30 % of max" or "4000/s".
    pub point: String,
    pub result: LoadResult,
}

fn percentile_label(q: f64) -> String {
    let text = format!("{:.3}", q * 100.0);
    let text = text.trim_end_matches('0').trim_end_matches('.');
    format!("p{text}")
}

pub(super) fn print_tables(rows: &[Row], unavailable: &BTreeMap<Design, String>) {
    let mut groups: BTreeMap<(usize, usize), (&str, Vec<&Row>)> = BTreeMap::new();
    // Keep the measurement order of points within a size.
    let mut order: Vec<(usize, String)> = Vec::new();
    for row in rows {
        if !order.contains(&(row.size, row.point.clone())) {
            order.push((row.size, row.point.clone()));
        }
        let index = order
            .iter()
            .position(|o| *o == (row.size, row.point.clone()))
            .unwrap_or(0);
        groups
            .entry((row.size, index))
            .or_insert((row.point.as_str(), Vec::new()))
            .1
            .push(row);
    }
    for ((size, _), (point, rows)) in groups {
        let bytes = rows
            .first()
            .map(|r| r.result.response_bytes)
            .unwrap_or_default();
        let point = if point == "max" {
            "maximum (closed loop, median run)"
        } else {
            point
        };
        println!("\n### {size}-byte responses ({bytes} B received), {point}\n");
        let header: Vec<String> = QUANTILES.iter().map(|&q| percentile_label(q)).collect();
        println!(
            "| design | requests/s (asked) | {} | max | kept the rate |",
            header.join(" | ")
        );
        println!("|---|---|{}---|---|", "---|".repeat(QUANTILES.len()));
        for row in rows {
            let r = &row.result;
            let asked = r
                .target_rate
                .map(|t| format!(" ({t:.0})"))
                .unwrap_or_default();
            let cells: Vec<String> = r
                .percentiles_us
                .iter()
                .map(|us| format!("{:.3}", us / 1e3))
                .collect();
            println!(
                "| {}{} | {:.0}{asked} | {} | {:.3} | {} |",
                row.design.label(),
                row.tuning.suffix(),
                r.achieved_rate,
                cells.join(" | "),
                r.max_us / 1e3,
                match (r.target_rate, r.sustained, r.errors) {
                    (_, _, e) if e > 0 => format!("{e} errors"),
                    (None, _, _) => "closed loop".into(),
                    (Some(_), true, _) => "yes".into(),
                    (Some(_), false, _) => format!("no (backlog {})", r.max_backlog),
                }
            );
        }
        println!("\nLatency in ms from each request's scheduled send time.");
    }
    for (design, reason) in unavailable {
        println!("\n{}: not measured — {reason}", design.label());
    }
}

/// Charts of an earlier run in `dir` (their rates differ from this
/// run's): removed so the folder shows one run.
pub(super) fn remove_old_charts(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if name.starts_with("latency-") && name.ends_with(".svg") {
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    Ok(())
}

/// One chart per size and rate: latency against percentile (log scale),
/// a line per design.
pub(super) fn plot_rows(dir: &Path, rows: &[Row]) -> Result<()> {
    let mut charts: BTreeMap<(usize, String), Vec<&Row>> = BTreeMap::new();
    for row in rows.iter().filter(|r| r.point != "max") {
        charts
            .entry((row.size, row.point.clone()))
            .or_default()
            .push(row);
    }
    for ((size, point), rows) in charts {
        let series: Vec<Series> = rows
            .iter()
            .map(|row| Series {
                label: format!("{}{}", row.design.label(), row.tuning.suffix()),
                points: QUANTILES
                    .iter()
                    .zip(&row.result.percentiles_us)
                    .map(|(&q, &us)| (nines(q), us / 1e3))
                    .collect(),
                colour: Design::ALL
                    .iter()
                    .position(|d| *d == row.design)
                    .unwrap_or(0),
                dashed: row.tuning != Tuning::Baseline || row.design.is_cluster_ip(),
            })
            .collect();
        let slug: String = point
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect::<String>()
            .split('-')
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join("-");
        let title = format!("{size}-byte responses, {point}");
        plot::lines(
            &dir.join(format!("latency-{size}-{slug}.svg")),
            &Axes {
                title: &title,
                x: "percentile",
                y: "latency (ms)",
                log_x: false,
                log_y: true,
                x_label: nines_label,
                x_ticks: Some((0.0, 5.0, 6)),
            },
            &series,
        )?;
    }
    Ok(())
}

/// A percentile on the "nines" axis: 0.9 → 1, 0.99 → 2, 0.999 → 3.
fn nines(q: f64) -> f64 {
    -(1.0 - q).log10()
}

fn nines_label(x: f64) -> String {
    if x < 0.5 {
        return String::new();
    }
    percentile_label(1.0 - 10f64.powf(-x))
}
