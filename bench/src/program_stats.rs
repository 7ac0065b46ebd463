//! Each program's own run time in live traffic, from the kernel's BPF
//! run-time statistics (`BPF_ENABLE_STATS`, `run_time_ns` and `run_cnt`
//! of `bpf_prog_info`).
//!
//! The statistics cost something themselves: while they are on, the
//! kernel reads its clock before and after every run of every program.
//! So they are on only while `RunTimeStats` is held (a pass of its own,
//! never during the figures), and the floor they add — measured as the
//! run time of a program that does nothing (`up_tc_pass`), attached first
//! on the same interface, so on the same packets — is subtracted from our
//! TC programs' time (`LiveCost::own_ns`).
//!
//! A pass reads the programs attached to the client's interface by their
//! ids (another instance of the same program elsewhere on the machine is
//! not counted), and the socket-LB programs by name.

use std::{collections::BTreeMap, os::fd::OwnedFd};

use anyhow::{Context, Result};
use aya::sys::{Stats, enable_stats};
use serde::{Deserialize, Serialize};

/// The kernel's run-time statistics, on while this is held.
pub struct RunTimeStats {
    _enabled: OwnedFd,
}

impl RunTimeStats {
    /// Turns the statistics on (off again on drop). Says so when the
    /// machine has them on for good (`kernel.bpf_stats_enabled = 1`):
    /// then every figure of every mode with programs pays their floor.
    pub fn enable() -> Result<Self> {
        let enabled = enable_stats(Stats::RunTime)
            .context("BPF_ENABLE_STATS (the kernel's per-program run time, Linux 5.8)")?;
        Ok(Self { _enabled: enabled })
    }

    /// True when the sysctl keeps the statistics on outside our passes.
    pub fn always_on() -> bool {
        std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").is_ok_and(|v| v.trim() == "1")
    }
}

/// Runs and run time of the programs a pass reads, by name (summed over
/// programs of the same name).
#[derive(Clone, Debug, Default)]
pub struct ProgramTotals(BTreeMap<String, (u64, u64)>);

/// Which loaded programs a pass reads: those with one of `ids` (the ones
/// attached to the client's interface, found by querying its TCX chains)
/// and those named in `names` (the socket-LB programs, attached to the
/// client's cgroup).
#[derive(Clone, Debug, Default)]
pub struct ProgramSelection {
    pub ids: Vec<u32>,
    pub names: Vec<&'static str>,
}

impl ProgramTotals {
    pub fn read(selection: &ProgramSelection) -> Result<Self> {
        let mut totals = BTreeMap::new();
        for info in aya::programs::loaded_programs() {
            let info = info.context("reading loaded programs (bpf_prog_get_next_id)")?;
            let Some(name) = info.name_as_str() else {
                continue;
            };
            if selection.ids.contains(&info.id()) || selection.names.contains(&name) {
                let entry = totals.entry(name.to_owned()).or_insert((0, 0));
                entry.0 += info.run_count();
                entry.1 += info.run_time().as_nanos() as u64;
            }
        }
        Ok(Self(totals))
    }

    /// What ran between `earlier` and this reading, per program; programs
    /// that did not run are left out.
    pub fn since(&self, earlier: &ProgramTotals) -> Vec<ProgramRuns> {
        self.0
            .iter()
            .filter_map(|(name, &(runs, ns))| {
                let (runs0, ns0) = earlier.0.get(name).copied().unwrap_or_default();
                let runs = runs.saturating_sub(runs0);
                (runs > 0).then(|| ProgramRuns {
                    program: name.clone(),
                    runs,
                    ns: ns.saturating_sub(ns0),
                })
            })
            .collect()
    }
}

/// One program's runs over a measurement.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProgramRuns {
    pub program: String,
    pub runs: u64,
    /// Their total run time as the statistics count it (floor included).
    pub ns: u64,
}

impl ProgramRuns {
    /// Mean time per run, floor included.
    pub fn ns_per_run(&self) -> f64 {
        self.ns as f64 / self.runs as f64
    }
}

/// A measurement's programs and the transactions they served.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LiveCost {
    pub transactions: u64,
    pub programs: Vec<ProgramRuns>,
}

impl LiveCost {
    pub fn program(&self, name: &str) -> Option<&ProgramRuns> {
        self.programs.iter().find(|p| p.program == name)
    }

    /// `name`'s own time per run: the statistics' floor (`floor_ns`, the
    /// do-nothing program's time per run in the same workload) taken off.
    pub fn own_ns(&self, name: &str, floor_ns: f64) -> Option<f64> {
        self.program(name).map(|p| p.ns_per_run() - floor_ns)
    }

    /// Runs of `name` per transaction (packets per message, say).
    pub fn runs_per_transaction(&self, name: &str) -> Option<f64> {
        self.program(name)
            .map(|p| p.runs as f64 / self.transactions.max(1) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deltas_per_program_and_the_floor_taken_off() {
        let before = ProgramTotals(BTreeMap::from([
            ("up_tc_egress".into(), (10, 1_000)),
            ("up_tc_ingress".into(), (5, 500)),
        ]));
        let after = ProgramTotals(BTreeMap::from([
            ("up_tc_egress".into(), (110, 6_000)),
            ("up_tc_ingress".into(), (5, 500)),
            ("up_tc_pass".into(), (40, 800)),
        ]));
        let runs = after.since(&before);
        assert_eq!(
            runs,
            [
                ProgramRuns {
                    program: "up_tc_egress".into(),
                    runs: 100,
                    ns: 5_000
                },
                ProgramRuns {
                    program: "up_tc_pass".into(),
                    runs: 40,
                    ns: 800
                },
            ]
        );
        let cost = LiveCost {
            transactions: 50,
            programs: runs,
        };
        assert_eq!(cost.own_ns("up_tc_egress", 20.0), Some(30.0));
        assert_eq!(cost.runs_per_transaction("up_tc_egress"), Some(2.0));
        assert_eq!(cost.own_ns("up_tc_ingress", 20.0), None);
    }
}
