//! Option groups the benches share, kept apart from what each bench
//! does with them (as oha keeps its `Opts` apart from `run()`): how often
//! and how long every measurement runs, and where the results go.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;

/// How often and how long every measurement runs.
#[derive(Args, Debug, Clone)]
pub struct Repetition {
    /// Rounds: every measurement once per round (medians and 95 %
    /// intervals are taken over the rounds; 6 is the fewest whose range
    /// is a 95 % interval of the median).
    #[arg(long, default_value_t = 6)]
    pub runs: usize,
    /// Seconds per measurement (each bench says its default).
    #[arg(long)]
    pub seconds: Option<f64>,
    /// Every row in seconds (short measurements, one run), for CI: checks
    /// the whole pipeline, asserts nothing about speed.
    #[arg(long)]
    pub quick: bool,
}

impl Repetition {
    /// Runs and seconds per measurement, `--quick` applied (`quick_seconds`
    /// per measurement, one run).
    pub fn plan(&self, quick_seconds: f64) -> (usize, f64) {
        if self.quick {
            (1, quick_seconds)
        } else {
            (self.runs.max(1), self.seconds.unwrap_or(10.0))
        }
    }

    /// Rounds, `--quick` applied (one).
    pub fn rounds(&self) -> usize {
        if self.quick { 1 } else { self.runs.max(1) }
    }
}

/// Where the results go.
#[derive(Args, Debug, Clone)]
pub struct Output {
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write the JSON and the charts into this directory (each bench
    /// names its files; an earlier run's charts there are replaced).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

impl Output {
    /// Creates `--out` before anything is measured: a bad path fails at
    /// once, not after an hour of measuring.
    pub fn prepare(&self) -> Result<()> {
        if let Some(dir) = &self.out {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        Ok(())
    }

    /// The `--out` directory, if any.
    pub fn dir(&self) -> Option<&Path> {
        self.out.as_deref()
    }

    /// Writes `value` as JSON to `--json FILE` and, with `--out DIR`, to
    /// `DIR/<file>`.
    pub fn write<T: serde::Serialize>(&self, value: &T, file: &str) -> Result<()> {
        let text = serde_json::to_string_pretty(value)?;
        let out_path = self.out.as_ref().map(|dir| dir.join(file));
        for path in self.json.iter().chain(out_path.as_ref()) {
            std::fs::write(path, &text).with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(())
    }
}
