//! The measurement plan: every setup's maximum rate (median of a few
//! closed-loop runs), then fixed fractions of it and absolute rates, each
//! point several times, the setups in a fresh shuffled order each time so
//! the machine's drift (and what one setup leaves behind) hits them
//! alike.

use std::collections::BTreeMap;

use anyhow::{Context, Result};

use super::{
    LatencyOpts,
    designs::{Design, Tuning},
    report::Row,
    testbed::{Shape, Testbed},
};
use crate::{
    loadgen::LoadResult,
    stats::{Shuffler, fresh_seed},
};

/// A rate every design is measured at.
pub(super) enum RatePoint {
    /// Percent of the design's own maximum.
    OfMax(f64),
    /// Requests per second, the same for all designs.
    Fixed(f64),
}

impl RatePoint {
    fn label(&self) -> String {
        match self {
            RatePoint::OfMax(percent) => format!("{percent} % of max"),
            RatePoint::Fixed(rate) => format!("{rate}/s"),
        }
    }

    fn rate(&self, max: f64) -> f64 {
        match self {
            RatePoint::OfMax(percent) => max * percent / 100.0,
            RatePoint::Fixed(rate) => *rate,
        }
    }
}

/// What a run measures, in which order.
pub(super) struct Sweep {
    /// Every (design, tuning) measured, in measurement order.
    setups: Vec<(Design, Tuning)>,
    /// Setups that cannot be measured, and why.
    pub(super) skipped: Vec<String>,
    shape: Shape,
    max_runs: usize,
    /// Runs of every rated point.
    pub(super) point_runs: usize,
    /// Seeds the setup order.
    pub(super) seed: u64,
    fractions: Vec<f64>,
    /// Absolute rates; empty: 30 % and 50 % of the host network's
    /// maximum at each size.
    absolute: Vec<f64>,
    quick: bool,
}

impl Sweep {
    pub(super) fn plan(opts: &LatencyOpts, designs: &[Design], testbed: &Testbed) -> Self {
        let (shape, fractions, absolute) = if opts.quick {
            (
                Shape {
                    connections: 16,
                    seconds: 0.5,
                    warmup: 0.2,
                },
                vec![30.0],
                Vec::new(),
            )
        } else {
            (
                Shape {
                    connections: opts.connections.max(1),
                    seconds: opts.seconds,
                    warmup: opts.warmup,
                },
                opts.fractions.clone(),
                opts.rates.clone(),
            )
        };
        let mut setups = Vec::new();
        let mut skipped = Vec::new();
        for &tuning in &opts.tuning {
            for &design in designs.iter().filter(|d| testbed.endpoints.contains_key(d)) {
                if design.through_kube_proxy() && tuning == Tuning::Notrack {
                    skipped.push(format!(
                        "{}: not measured — kube-proxy's NAT needs conntrack",
                        label((design, tuning))
                    ));
                    continue;
                }
                setups.push((design, tuning));
            }
        }
        Self {
            setups,
            skipped,
            shape,
            max_runs: if opts.quick { 1 } else { opts.max_runs.max(1) },
            point_runs: if opts.quick {
                1
            } else {
                opts.point_runs.max(1)
            },
            seed: opts.seed.unwrap_or_else(fresh_seed),
            fractions,
            absolute,
            quick: opts.quick,
        }
    }

    /// Measures every setup at every point for each response size.
    pub(super) fn run(&self, testbed: &Testbed, sizes: &[usize]) -> Result<Vec<Row>> {
        let derive_rates = self.absolute.is_empty() && !self.quick;
        let absolute_count = if derive_rates { 2 } else { self.absolute.len() };
        let per_size = self.setups.len()
            * (self.max_runs + (self.fractions.len() + absolute_count) * self.point_runs);
        let mut shuffler = Shuffler::new(self.seed);
        let mut progress = Progress {
            done: 0,
            total: per_size * sizes.len(),
        };
        let mut rows = Vec::new();
        for &size in sizes {
            let max = self.maxima(testbed, size, &mut progress, &mut rows, &mut shuffler)?;
            let absolute = if derive_rates {
                let reference = max
                    .get(&(Design::Host, Tuning::Baseline))
                    .or_else(|| max.values().next())
                    .copied()
                    .unwrap_or(1000.0);
                [0.3, 0.5]
                    .iter()
                    .map(|f| ((reference * f / 500.0).floor() * 500.0).max(500.0))
                    .collect()
            } else {
                self.absolute.clone()
            };
            let points: Vec<RatePoint> = self
                .fractions
                .iter()
                .map(|&f| RatePoint::OfMax(f))
                .chain(absolute.iter().map(|&r| RatePoint::Fixed(r)))
                .collect();
            for point in &points {
                let point_label = point.label();
                // Every setup at this rate before the next run of it, in
                // a fresh order: drift on the machine hits them alike.
                for run in 0..self.point_runs {
                    for setup in shuffler.shuffled(&self.setups) {
                        progress.step(&format!(
                            "{size} B, {point_label} ({}/{}), {}",
                            run + 1,
                            self.point_runs,
                            label(setup)
                        ));
                        let rate = point.rate(max[&setup]).max(1.0);
                        let result = testbed
                            .measure(setup, size, Some(rate), &self.shape)
                            .with_context(|| format!("{} at {rate:.0} requests/s", label(setup)))?;
                        rows.push(Row {
                            design: setup.0,
                            tuning: setup.1,
                            size,
                            point: point_label.clone(),
                            run,
                            result,
                        });
                    }
                }
            }
        }
        eprintln!();
        Ok(rows)
    }

    /// Each setup's maximum rate at `size`: the median of `max_runs`
    /// closed-loop runs (it swings by ±20 % run to run on a small VM),
    /// setups interleaved. The median runs become the "max" rows.
    fn maxima(
        &self,
        testbed: &Testbed,
        size: usize,
        progress: &mut Progress,
        rows: &mut Vec<Row>,
        shuffler: &mut Shuffler,
    ) -> Result<BTreeMap<(Design, Tuning), f64>> {
        let mut runs: BTreeMap<(Design, Tuning), Vec<LoadResult>> = BTreeMap::new();
        for run in 0..self.max_runs {
            for setup in shuffler.shuffled(&self.setups) {
                progress.step(&format!(
                    "{size} B, maximum rate ({}/{}), {}",
                    run + 1,
                    self.max_runs,
                    label(setup)
                ));
                let result = testbed
                    .measure(setup, size, None, &self.shape)
                    .with_context(|| format!("{} at the maximum rate", label(setup)))?;
                runs.entry(setup).or_default().push(result);
            }
        }
        let mut max = BTreeMap::new();
        for &setup in &self.setups {
            let mut results = runs.remove(&setup).unwrap_or_default();
            results.sort_by(|a, b| a.achieved_rate.total_cmp(&b.achieved_rate));
            let result = results.swap_remove(results.len() / 2);
            max.insert(setup, result.achieved_rate);
            rows.push(Row {
                design: setup.0,
                tuning: setup.1,
                size,
                point: "max".into(),
                run: 0,
                result,
            });
        }
        Ok(max)
    }
}

/// `[done/total] what` on one line of stderr.
struct Progress {
    done: usize,
    total: usize,
}

impl Progress {
    fn step(&mut self, what: &str) {
        self.done += 1;
        eprint!("\r[{}/{}] {what:<64}", self.done, self.total);
    }
}

fn label((design, tuning): (Design, Tuning)) -> String {
    format!("{}{}", design.label(), tuning.suffix())
}
