//! The ClusterIP bench's results: one table per workload (ours beside
//! the seed's, the preset's ratios under it), one bar chart per workload,
//! and the JSON of every run.

use std::{collections::BTreeMap, path::Path};

use anyhow::Result;
use serde::Serialize;

use super::modes::Mode;
use crate::{
    plot::Bar,
    workload::{Kind, Measurement},
};

/// One row of the JSON: every run of one workload over one mode.
#[derive(Debug, Serialize)]
pub struct Row {
    pub workload: Kind,
    pub mode: Mode,
    pub runs: Vec<Measurement>,
}

/// The rows in the JSON's shape.
pub(super) fn rows(measured: BTreeMap<(Kind, Mode), Vec<Measurement>>) -> Vec<Row> {
    measured
        .into_iter()
        .map(|((workload, mode), runs)| Row {
            workload,
            mode,
            runs,
        })
        .collect()
}

/// Median, min and max of `values`.
fn spread(mut values: Vec<f64>) -> (f64, f64, f64) {
    values.sort_by(f64::total_cmp);
    (
        values[values.len() / 2],
        values[0],
        values[values.len() - 1],
    )
}

/// A workload's table title, unit and the figure shown for it.
fn presentation(kind: Kind) -> (&'static str, &'static str, fn(&Measurement) -> f64) {
    match kind {
        Kind::Latency => (
            "sockperf-style ping-pong latency (one-way, 64 B)",
            "µs",
            |m| m.mean_us,
        ),
        Kind::Rr => ("TCP_RR (100 B request/response)", "trans/s", |m| {
            m.per_second
        }),
        Kind::Crr => (
            "TCP_CRR (connect, 100 B request/response, close)",
            "trans/s",
            |m| m.per_second,
        ),
        Kind::Sockperf => (
            "sockperf ping-pong --tcp -m 64 (one-way latency)",
            "µs",
            |m| m.mean_us,
        ),
        Kind::Iperf1 => ("iperf3, 1 stream", "Gbit/s", |m| m.per_second),
        Kind::Iperf2 => ("iperf3, 2 streams", "Gbit/s", |m| m.per_second),
        Kind::Iperf4 => ("iperf3, 4 streams", "Gbit/s", |m| m.per_second),
        Kind::RedisGet => ("redis-benchmark -d 1000 -t get", "requests/s", |m| {
            m.per_second
        }),
        Kind::RedisSet => ("redis-benchmark -d 1000 -t set", "requests/s", |m| {
            m.per_second
        }),
    }
}

/// Writes `<prefix>-<workload>.svg` into `dir` for every workload: one bar
/// per row (median, whiskers min–max).
pub(super) fn write_charts(
    rows: &BTreeMap<(Kind, Mode), Vec<Measurement>>,
    kinds: &[Kind],
    modes: &[Mode],
    dir: &Path,
    prefix: &str,
) -> Result<()> {
    for &kind in kinds {
        let (title, unit, pick) = presentation(kind);
        let bars: Vec<Bar> = modes
            .iter()
            .filter_map(|&mode| {
                let runs = rows.get(&(kind, mode))?;
                let (median, min, max) = spread(runs.iter().map(pick).collect());
                Some(Bar {
                    label: mode.label().to_owned(),
                    median,
                    min,
                    max,
                })
            })
            .collect();
        let path = dir.join(format!("{prefix}-{}.svg", kind.arg()));
        crate::plot::bars(&path, title, unit, &bars)?;
    }
    Ok(())
}

pub(super) fn print_tables(
    rows: &BTreeMap<(Kind, Mode), Vec<Measurement>>,
    kinds: &[Kind],
    modes: &[Mode],
    ratios: &[(Mode, Mode)],
) {
    for &kind in kinds {
        let (title, unit, pick) = presentation(kind);
        let cpu_unit = match kind {
            Kind::Iperf1 | Kind::Iperf2 | Kind::Iperf4 => "CPU µs/MB",
            Kind::Sockperf | Kind::Latency => "CPU µs/message",
            _ => "CPU µs/transaction",
        };
        println!("\n### {title}\n");
        println!(
            "| datapath | ours, median ({unit}) | min–max | seed ({unit}) | {cpu_unit}: user + sys + softirq |"
        );
        println!("| --- | --- | --- | --- | --- |");
        let mut medians: BTreeMap<Mode, f64> = BTreeMap::new();
        for &mode in modes {
            let Some(runs) = rows.get(&(kind, mode)) else {
                continue;
            };
            let (median, min, max) = spread(runs.iter().map(pick).collect());
            medians.insert(mode, median);
            let seed = mode
                .seed(kind)
                .map(|v| format!("{v}"))
                .unwrap_or_else(|| "–".into());
            let (user, _, _) = spread(runs.iter().map(|m| m.cpu_user_us).collect());
            let (system, _, _) = spread(runs.iter().map(|m| m.cpu_system_us).collect());
            let (softirq, _, _) = spread(runs.iter().map(|m| m.cpu_softirq_us).collect());
            println!(
                "| {} | {median:.1} | {min:.1}–{max:.1} | {seed} | {user:.1} + {system:.1} + {softirq:.1} |",
                mode.label()
            );
        }
        let ratio = |a: Mode, b: Mode| -> Option<f64> { Some(medians.get(&a)? / medians.get(&b)?) };
        let seed_ratio = |a: Mode, b: Mode| -> Option<f64> { Some(a.seed(kind)? / b.seed(kind)?) };
        for &(a, b) in ratios {
            if let Some(r) = ratio(a, b) {
                let seed = seed_ratio(a, b)
                    .map(|s| format!("{s:.3}"))
                    .unwrap_or_else(|| "–".into());
                println!("| ratio {:?}/{:?} | {r:.3} | | {seed} | |", a, b);
            }
        }
    }
}
