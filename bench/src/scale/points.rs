//! What the scale bench records: one point per (services, endpoints,
//! datapath) with every run's figures and their medians, and the JSON of
//! a run.

use lab::DeviceOffloads;
use serde::{Deserialize, Serialize};

use super::{ScaleDatapath, testbed::Position};
use crate::{machine::Machine, stats::median, workload::Measurement};

/// One TCP_CRR run of a point.
#[derive(Debug, Serialize, Deserialize)]
pub struct CrrRun {
    pub round: usize,
    pub target: Position,
    pub measurement: Measurement,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ScalePoint {
    pub services: usize,
    pub endpoints: usize,
    pub datapath: ScaleDatapath,
    /// Objects → rules or maps from nothing (kube-proxy: translation,
    /// payload generation, restore; underpass: load, attach, adopt,
    /// translation, map writes), median over rounds; absent when it
    /// outlasted the limit.
    pub program_ms: Option<f64>,
    pub program_runs_ms: Vec<f64>,
    /// A full resync with everything in place (steady state), median.
    pub resync_ms: Option<f64>,
    pub resync_runs_ms: Vec<f64>,
    /// One changed EndpointSlice applied, from the objects: p50 and the
    /// maximum over `change_samples` (at 50 samples a p99 would be the
    /// maximum; it is called by its name).
    pub change_p50_ms: Option<f64>,
    pub change_max_ms: Option<f64>,
    pub change_samples: usize,
    /// Median TCP_CRR rate and p99 to the service in the middle of
    /// kube-proxy's KUBE-SERVICES and to the last one.
    pub crr_middle_per_second: Option<f64>,
    pub crr_middle_p99_us: Option<f64>,
    pub crr_last_per_second: Option<f64>,
    pub crr_last_p99_us: Option<f64>,
    pub crr_runs: Vec<CrrRun>,
    /// Killed at the time limit.
    pub killed: bool,
    /// The step that was killed: program, resync or change.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub killed_in: Option<Step>,
    /// Why figures are missing (time limit, skipped).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl ScalePoint {
    pub(super) fn new(services: usize, endpoints: usize, datapath: ScaleDatapath) -> Self {
        Self {
            services,
            endpoints,
            datapath,
            program_ms: None,
            program_runs_ms: Vec::new(),
            resync_ms: None,
            resync_runs_ms: Vec::new(),
            change_p50_ms: None,
            change_max_ms: None,
            change_samples: 0,
            crr_middle_per_second: None,
            crr_middle_p99_us: None,
            crr_last_per_second: None,
            crr_last_p99_us: None,
            crr_runs: Vec::new(),
            killed: false,
            killed_in: None,
            note: None,
        }
    }
}

/// A step of a round, for saying which one a time limit killed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Step {
    Program,
    Resync,
    Change,
}

/// What scale.json holds.
#[derive(Debug, Serialize, Deserialize)]
pub struct ScaleResults {
    pub machine: Machine,
    /// `--time-limit`, seconds (killed points are drawn at it).
    pub time_limit_s: u64,
    /// Seeds the datapath order per round (`--seed` repeats it).
    pub seed: u64,
    pub rounds: usize,
    /// `ethtool -k` of every device of the topology.
    pub offloads: Vec<DeviceOffloads>,
    pub points: Vec<ScalePoint>,
}

/// Medians over the rounds.
pub(super) fn summarize(point: &mut ScalePoint) {
    if !point.program_runs_ms.is_empty() && !point.killed {
        point.program_ms = Some(median(&point.program_runs_ms));
    }
    if !point.resync_runs_ms.is_empty() {
        point.resync_ms = Some(median(&point.resync_runs_ms));
    }
    for target in [Position::Middle, Position::Last] {
        let runs: Vec<&Measurement> = point
            .crr_runs
            .iter()
            .filter(|r| r.target == target)
            .map(|r| &r.measurement)
            .collect();
        if runs.is_empty() {
            continue;
        }
        let rate = median(&runs.iter().map(|m| m.per_second).collect::<Vec<_>>());
        let p99 = median(
            &runs
                .iter()
                .map(|m| m.p99_us.unwrap_or(f64::NAN))
                .collect::<Vec<_>>(),
        );
        match target {
            Position::Middle => {
                point.crr_middle_per_second = Some(rate);
                point.crr_middle_p99_us = Some(p99);
            }
            Position::Last => {
                point.crr_last_per_second = Some(rate);
                point.crr_last_p99_us = Some(p99);
            }
        }
    }
}
