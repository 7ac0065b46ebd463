//! The statistics a claim rests on: the median of per-round (paired)
//! ratios with a bootstrap 95 % confidence interval, and the mode order
//! shuffled per round from a seed the report prints.
//!
//! Why paired: the machine drifts (another tenant, frequency, caches)
//! by more than the differences measured; two modes measured in the same
//! round share the drift, so their ratio cancels most of it, where a
//! ratio of two medians taken from different rounds does not.

use rand::{Rng, SeedableRng, rngs::StdRng, seq::SliceRandom};
use serde::Serialize;

/// Resamples per interval: enough that the 2.5th and 97.5th percentiles
/// of the resampled medians are stable to the digits printed.
const RESAMPLES: usize = 4000;

/// A median and its bootstrap 95 % confidence interval.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Interval {
    pub median: f64,
    pub low: f64,
    pub high: f64,
    /// Samples it rests on.
    pub samples: usize,
}

impl Interval {
    /// Whether `value` lies inside the interval.
    pub fn contains(&self, value: f64) -> bool {
        self.low <= value && value <= self.high
    }
}

impl std::fmt::Display for Interval {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = f.precision().unwrap_or(3);
        if self.samples < 2 {
            // One round: nothing to put an interval on (the report says so).
            return write!(f, "{:.p$}", self.median);
        }
        write!(
            f,
            "{:.p$} [{:.p$}, {:.p$}]",
            self.median, self.low, self.high
        )
    }
}

/// The median of `values` (the mean of the middle two for an even count).
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

/// The median of `values` with a percentile-bootstrap 95 % interval
/// (resampling with replacement; `seed` makes it reproducible). With
/// fewer than five values the interval is wide by construction: it says
/// how little such a run can claim.
pub fn bootstrap_median(values: &[f64], seed: u64) -> Interval {
    let samples = values.len();
    let center = median(values);
    if samples < 2 {
        return Interval {
            median: center,
            low: center,
            high: center,
            samples,
        };
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let mut resample = vec![0.0; samples];
    let mut medians: Vec<f64> = (0..RESAMPLES)
        .map(|_| {
            for slot in resample.iter_mut() {
                *slot = values[rng.random_range(0..samples)];
            }
            median(&resample)
        })
        .collect();
    medians.sort_by(f64::total_cmp);
    let at = |q: f64| medians[((RESAMPLES - 1) as f64 * q).round() as usize];
    Interval {
        median: center,
        low: at(0.025),
        high: at(0.975),
        samples,
    }
}

/// Per round, `numerator[i] / denominator[i]` — the paired ratios.
pub fn paired_ratios(numerator: &[f64], denominator: &[f64]) -> Vec<f64> {
    numerator
        .iter()
        .zip(denominator)
        .filter(|(_, d)| **d != 0.0)
        .map(|(n, d)| n / d)
        .collect()
}

/// `items` in a fresh order for each round, reproducible from `seed`.
pub struct Shuffler(StdRng);

impl Shuffler {
    pub fn new(seed: u64) -> Self {
        Self(StdRng::seed_from_u64(seed))
    }

    pub fn shuffled<T: Clone>(&mut self, items: &[T]) -> Vec<T> {
        let mut order = items.to_vec();
        order.shuffle(&mut self.0);
        order
    }
}

/// A seed for a run that was given none.
pub fn fresh_seed() -> u64 {
    rand::rng().random()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interval_holds_the_median_and_narrows_with_more_rounds() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        let noisy: Vec<f64> = (0..5)
            .map(|i| 1.0 + 0.02 * f64::from(i % 3) - 0.02)
            .collect();
        let few = bootstrap_median(&noisy, 7);
        assert!(few.contains(few.median) && few.low < few.high, "{few:?}");
        let many: Vec<f64> = noisy.iter().cycle().take(50).copied().collect();
        let more = bootstrap_median(&many, 7);
        assert!(
            more.high - more.low <= few.high - few.low,
            "{more:?} vs {few:?}"
        );
        assert_eq!(bootstrap_median(&[2.0], 1).to_string(), "2.000");
        // Reproducible from its seed.
        assert_eq!(bootstrap_median(&noisy, 9), bootstrap_median(&noisy, 9));
    }

    #[test]
    fn ratios_are_taken_round_by_round() {
        // The machine got 2× slower in round 2: paired ratios stay 1.1,
        // the ratio of medians would not be.
        let base = [10.0, 20.0, 10.0];
        let mode = [11.0, 22.0, 11.0];
        let ratios = paired_ratios(&mode, &base);
        for r in &ratios {
            assert!((r - 1.1).abs() < 1e-9);
        }
        let mut shuffler = Shuffler::new(3);
        let orders: Vec<Vec<u8>> = (0..8).map(|_| shuffler.shuffled(&[1, 2, 3, 4])).collect();
        assert!(orders.iter().any(|o| o != &orders[0]), "never shuffled");
    }
}
