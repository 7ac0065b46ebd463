//! The statistics a claim rests on: the median of per-round (paired)
//! ratios with a distribution-free confidence interval, and the mode
//! order shuffled per round from a seed the report prints.
//!
//! Why paired: the machine drifts (another tenant, frequency, caches)
//! by more than the differences measured; two modes measured in the same
//! round share the drift, so their ratio cancels most of it, where a
//! ratio of two medians taken from different rounds does not.
//!
//! Why order statistics: with n rounds, the interval between the k-th
//! smallest and the k-th largest value covers the true median with a
//! probability the binomial distribution gives exactly, whatever the
//! distribution of the figures; a bootstrap of five values cannot do
//! better than the range and would call it 95 %. With six rounds or more
//! an interval reaches 95 %; with fewer, the level it does reach is
//! printed beside it.

use rand::{Rng, SeedableRng, rngs::StdRng, seq::SliceRandom};
use serde::{Deserialize, Serialize};

/// The confidence the interval aims for.
pub const CONFIDENCE: f64 = 0.95;

/// A median and its confidence interval.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Interval {
    pub median: f64,
    pub low: f64,
    pub high: f64,
    /// The probability that [low, high] holds the true median (exact,
    /// from the binomial distribution); 0 with one sample.
    pub confidence: f64,
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
        )?;
        if self.confidence < CONFIDENCE {
            write!(f, " ({:.1} %)", self.confidence * 100.0)?;
        }
        Ok(())
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

/// The median of `values` and the narrowest order-statistic interval
/// [x(k), x(n+1-k)] that covers the true median with at least
/// [`CONFIDENCE`]; with too few values for that, the range [min, max]
/// and the confidence it has (1 − 2/2ⁿ).
pub fn median_interval(values: &[f64]) -> Interval {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let center = median(&sorted);
    if n < 2 {
        return Interval {
            median: center,
            low: center,
            high: center,
            confidence: 0.0,
            samples: n,
        };
    }
    // P(X < k) for X ~ Binomial(n, ½): the chance that fewer than k
    // values fall below the median; the interval misses it with twice
    // that probability.
    let below =
        |k: usize| -> f64 { (0..k).map(|i| binomial(n, i)).sum::<f64>() / 2f64.powi(n as i32) };
    let mut k = 1;
    while k < n / 2 && 1.0 - 2.0 * below(k + 1) >= CONFIDENCE {
        k += 1;
    }
    Interval {
        median: center,
        low: sorted[k - 1],
        high: sorted[n - k],
        confidence: 1.0 - 2.0 * below(k),
        samples: n,
    }
}

/// n choose k, as a float (n is a round count: small).
fn binomial(n: usize, k: usize) -> f64 {
    (0..k).fold(1.0, |acc, i| acc * (n - i) as f64 / (i + 1) as f64)
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
    fn the_interval_is_exact_for_the_median_whatever_the_distribution() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        // Five rounds: only the range, 1 − 2/32 = 93.75 %, and it says so.
        let five = median_interval(&[1.03, 0.98, 1.01, 1.00, 0.99]);
        assert_eq!((five.low, five.high, five.median), (0.98, 1.03, 1.00));
        assert!((five.confidence - 0.9375).abs() < 1e-12);
        assert!(five.to_string().ends_with("(93.8 %)"), "{five}");
        // Six rounds reach 95 % with the range (1 − 2/64).
        let six = median_interval(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        assert!((six.confidence - 0.96875).abs() < 1e-12);
        assert_eq!(six.to_string(), "3.500 [1.000, 6.000]");
        // Twenty rounds: the 6th smallest to the 6th largest (95.9 %).
        let twenty: Vec<f64> = (1..=20).map(f64::from).collect();
        let interval = median_interval(&twenty);
        assert_eq!((interval.low, interval.high), (6.0, 15.0));
        assert!(interval.confidence >= CONFIDENCE, "{interval:?}");
        assert!(interval.contains(interval.median));
        assert_eq!(median_interval(&[2.0]).to_string(), "2.000");
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
