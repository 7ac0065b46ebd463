//! The latency bench's results: latency.json, one table per response
//! size and rate, one chart per size and rate.

use std::{collections::BTreeMap, path::Path};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::designs::{Design, Tuning};
use lab::DeviceOffloads;

use crate::{
    loadgen::{LoadResult, QUANTILES},
    machine::Machine,
    plot::{self, Axes, Series},
    stats::median,
};

/// What latency.json holds.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Document {
    /// Where it was measured (absent in results of older versions).
    #[serde(default)]
    pub(super) machine: Option<Machine>,
    /// `ethtool -k` of every device of the topology.
    #[serde(default)]
    pub(super) offloads: Vec<DeviceOffloads>,
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
    /// Which run of this point (from 0).
    #[serde(default)]
    pub run: usize,
    pub result: LoadResult,
}

fn percentile_label(q: f64) -> String {
    let text = format!("{:.3}", q * 100.0);
    let text = text.trim_end_matches('0').trim_end_matches('.');
    format!("p{text}")
}

/// A percentile is shown only where a run has at least this many
/// requests beyond it (p99.99 needs 100,000 requests): with fewer, it is
/// the maximum of a handful, not a percentile.
pub(super) const MIN_SAMPLES_BEYOND: f64 = 10.0;

/// One setup at one point over its runs: each figure's median over them.
struct Summary<'a> {
    first: &'a Row,
    runs: usize,
    achieved_rate: f64,
    /// Per quantile: the median over runs, if every run has enough
    /// requests beyond it.
    percentiles_ms: Vec<Option<f64>>,
    sustained: usize,
    errors: u64,
    max_backlog: usize,
}

/// (response size, point label).
type PointKey = (usize, String);

/// The rows grouped by (size, point) in measurement order, and within
/// each by setup in measurement order, summarized over runs.
fn summaries(rows: &[Row]) -> Vec<(PointKey, Vec<Summary<'_>>)> {
    let mut groups: Vec<(PointKey, Vec<Vec<&Row>>)> = Vec::new();
    for row in rows {
        let key = (row.size, row.point.clone());
        let at = match groups.iter().position(|(k, _)| *k == key) {
            Some(at) => at,
            None => {
                groups.push((key, Vec::new()));
                groups.len() - 1
            }
        };
        let setups = &mut groups[at].1;
        match setups
            .iter_mut()
            .find(|runs| runs[0].design == row.design && runs[0].tuning == row.tuning)
        {
            Some(runs) => runs.push(row),
            None => setups.push(vec![row]),
        }
    }
    groups
        .into_iter()
        .map(|(key, setups)| {
            (
                key,
                setups.into_iter().map(|runs| summarize(&runs)).collect(),
            )
        })
        .collect()
}

fn summarize<'a>(runs: &[&'a Row]) -> Summary<'a> {
    let fewest = runs.iter().map(|r| r.result.requests).min().unwrap_or(0) as f64;
    let percentiles_ms = QUANTILES
        .iter()
        .enumerate()
        .map(|(i, &q)| {
            (fewest * (1.0 - q) >= MIN_SAMPLES_BEYOND).then(|| {
                let values: Vec<f64> = runs.iter().map(|r| r.result.percentiles_us[i]).collect();
                median(&values) / 1e3
            })
        })
        .collect();
    let rates: Vec<f64> = runs.iter().map(|r| r.result.achieved_rate).collect();
    Summary {
        first: runs[0],
        runs: runs.len(),
        achieved_rate: median(&rates),
        percentiles_ms,
        sustained: runs.iter().filter(|r| r.result.sustained).count(),
        errors: runs.iter().map(|r| r.result.errors).sum(),
        max_backlog: runs.iter().map(|r| r.result.max_backlog).max().unwrap_or(0),
    }
}

pub(super) fn print_tables(rows: &[Row], unavailable: &BTreeMap<Design, String>) {
    for ((size, point), setups) in summaries(rows) {
        let bytes = setups
            .first()
            .map(|s| s.first.result.response_bytes)
            .unwrap_or_default();
        let point = if point == "max" {
            "maximum (closed loop, median run)".to_owned()
        } else {
            point
        };
        println!("\n### {size}-byte responses ({bytes} B received), {point}\n");
        let header: Vec<String> = QUANTILES.iter().map(|&q| percentile_label(q)).collect();
        println!(
            "| design | runs | requests/s (asked) | {} | kept the rate |",
            header.join(" | ")
        );
        println!("|---|---|---|{}---|", "---|".repeat(QUANTILES.len()));
        for summary in &setups {
            let row = summary.first;
            let asked = row
                .result
                .target_rate
                .map(|t| format!(" ({t:.0})"))
                .unwrap_or_default();
            let cells: Vec<String> = summary
                .percentiles_ms
                .iter()
                .map(|ms| ms.map_or("–".into(), |ms| format!("{ms:.3}")))
                .collect();
            let kept = match (row.result.target_rate, summary.errors) {
                (_, e) if e > 0 => format!("{e} errors"),
                (None, _) => "closed loop".into(),
                (Some(_), _) if summary.sustained == summary.runs => "yes".into(),
                (Some(_), _) => format!(
                    "{}/{} runs (backlog up to {})",
                    summary.sustained, summary.runs, summary.max_backlog
                ),
            };
            println!(
                "| {}{} | {} | {:.0}{asked} | {} | {kept} |",
                row.design.label(),
                row.tuning.suffix(),
                summary.runs,
                summary.achieved_rate,
                cells.join(" | "),
            );
        }
        println!(
            "\nLatency in ms from each request's scheduled send time, the median over runs; \
             – where a run has fewer than {MIN_SAMPLES_BEYOND} requests beyond the percentile."
        );
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
    for ((size, point), setups) in summaries(rows) {
        if point == "max" {
            continue;
        }
        let series: Vec<Series> = setups
            .iter()
            .map(|summary| (summary.first, summary))
            .map(|(row, summary)| Series {
                label: format!("{}{}", row.design.label(), row.tuning.suffix()),
                // Only the percentiles the table prints.
                points: QUANTILES
                    .iter()
                    .zip(&summary.percentiles_ms)
                    .filter_map(|(&q, ms)| Some((nines(q), (*ms)?)))
                    .collect(),
                colour: Design::ALL
                    .iter()
                    .position(|d| *d == row.design)
                    .unwrap_or(0),
                dashed: row.tuning != Tuning::Baseline || row.design.is_cluster_ip(),
                crosses: false,
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
