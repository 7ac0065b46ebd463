//! The ClusterIP bench's program statistics: after each measured run of
//! a mode whose packets run our programs, a pass of its own with the
//! kernel's run-time statistics on (`crate::program_stats`), and the
//! limit's client with the do-nothing program for their floor. Per
//! round, each program's time per packet less that round's floor; the
//! table gives the median over rounds with its interval.

use serde::{Deserialize, Serialize};

use super::modes::Mode;
use crate::{
    program_stats::LiveCost,
    stats::median_interval,
    workload::{Kind, Parameters},
};

/// One statistics pass.
#[derive(Debug, Serialize, Deserialize)]
pub struct LiveRow {
    pub workload: Kind,
    pub mode: Mode,
    pub round: usize,
    pub cost: LiveCost,
}

/// The programs a table shows, with their column titles.
const COLUMNS: [(&str, &str); 3] = [
    (
        datapath_user::object::TC_EGRESS,
        "egress ns/packet (packets per {unit})",
    ),
    (
        datapath_user::object::TC_INGRESS,
        "ingress ns/packet (packets per {unit})",
    ),
    (
        datapath_user::object::SOCK_CONNECT4,
        "connect4 ns/run (runs per {unit})",
    ),
];

/// A statistics pass runs shorter than the measured run: per-packet
/// figures need packets, not the seed's duration.
pub fn pass_parameters(measured: &Parameters) -> Parameters {
    Parameters {
        seconds: measured.seconds.min(2.0),
        requests: measured.requests.min(20_000),
        omit_seconds: measured.omit_seconds.min(1),
    }
}

/// The floor of `round`'s statistics in `kind`: the do-nothing
/// program's time per run on the limit's client.
fn floor(rows: &[LiveRow], kind: Kind, round: usize) -> Option<f64> {
    rows.iter()
        .find(|r| r.workload == kind && r.mode == Mode::LIMIT && r.round == round)
        .and_then(|r| r.cost.program(datapath_user::object::TC_PASS))
        .map(|p| p.ns_per_run())
}

/// The table of `kind`'s statistics passes (nothing when there were
/// none).
pub fn print_table(rows: &[LiveRow], kind: Kind, modes: &[Mode], unit: &str) {
    let floors: Vec<f64> = rows
        .iter()
        .filter(|r| r.workload == kind && r.mode == Mode::LIMIT)
        .filter_map(|r| floor(rows, kind, r.round))
        .collect();
    if floors.is_empty() {
        return;
    }
    let floor_interval = median_interval(&floors);
    println!(
        "\nOur programs' own run time in live traffic (the kernel's BPF statistics, on only \
         during a pass of their own after each measured run; their floor — a do-nothing \
         program on the limit's client, same workload — {floor_interval:.1} ns per run, \
         taken off round by round). A packet is an skb: one GSO/GRO batch counts once.\n"
    );
    let titles: Vec<String> = COLUMNS
        .iter()
        .map(|(_, title)| title.replace("{unit}", unit))
        .collect();
    println!("| datapath | {} |", titles.join(" | "));
    println!("|{}", " --- |".repeat(COLUMNS.len() + 1));
    for &mode in modes.iter().filter(|&&m| m != Mode::LIMIT) {
        let passes: Vec<&LiveRow> = rows
            .iter()
            .filter(|r| r.workload == kind && r.mode == mode)
            .collect();
        if passes.is_empty() {
            continue;
        }
        let cells: Vec<String> = COLUMNS
            .iter()
            .map(|&(program, _)| {
                let own: Vec<f64> = passes
                    .iter()
                    .filter_map(|r| {
                        r.cost
                            .own_ns(program, floor(rows, kind, r.round).unwrap_or(0.0))
                    })
                    .collect();
                let per: Vec<f64> = passes
                    .iter()
                    .filter_map(|r| r.cost.runs_per_transaction(program))
                    .collect();
                if own.is_empty() {
                    return "–".to_owned();
                }
                format!(
                    "{:.1} ({:.2})",
                    median_interval(&own),
                    crate::stats::median(&per)
                )
            })
            .collect();
        println!("| {} | {} |", mode.label(), cells.join(" | "));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::program_stats::ProgramRuns;

    fn pass(mode: Mode, round: usize, program: &str, runs: u64, ns: u64) -> LiveRow {
        LiveRow {
            workload: Kind::Rr,
            mode,
            round,
            cost: LiveCost {
                transactions: runs / 2,
                programs: vec![ProgramRuns {
                    program: program.into(),
                    runs,
                    ns,
                }],
            },
        }
    }

    #[test]
    fn each_round_pays_its_own_floor() {
        let rows = [
            pass(Mode::LIMIT, 0, datapath_user::object::TC_PASS, 100, 2_000),
            pass(Mode::LIMIT, 1, datapath_user::object::TC_PASS, 100, 3_000),
            pass(Mode::Ebpf, 0, datapath_user::object::TC_EGRESS, 10, 700),
            pass(Mode::Ebpf, 1, datapath_user::object::TC_EGRESS, 10, 800),
        ];
        assert_eq!(floor(&rows, Kind::Rr, 0), Some(20.0));
        assert_eq!(floor(&rows, Kind::Rr, 1), Some(30.0));
        let own: Vec<f64> = rows[2..]
            .iter()
            .filter_map(|r| {
                r.cost.own_ns(
                    datapath_user::object::TC_EGRESS,
                    floor(&rows, Kind::Rr, r.round).unwrap(),
                )
            })
            .collect();
        assert_eq!(own, [50.0, 50.0]);
    }

    #[test]
    fn a_pass_is_short_but_keeps_the_workloads_shape() {
        let seed = Kind::Iperf1.parameters(None, false);
        let pass = pass_parameters(&seed);
        assert_eq!(pass.seconds, 2.0);
        assert_eq!(pass.omit_seconds, 1);
        let quick = Kind::RedisGet.parameters(None, true);
        assert_eq!(pass_parameters(&quick), quick);
    }
}
