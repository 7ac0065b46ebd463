//! The ClusterIP bench's program statistics: after each measured run of
//! a mode whose packets run our programs, a pass of its own with the
//! kernel's run-time statistics on (`crate::program_stats`) and the
//! do-nothing program first on the same interface: on the same packets,
//! at the same moment, its time per run is the statistics' floor. Per
//! pass, each program's time per packet less that pass's floor; the
//! table gives the median over rounds with its interval.

use serde::{Deserialize, Serialize};

use super::modes::Mode;
use crate::{
    family::IpFamily,
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

/// The programs a table shows, their column titles, and whether the
/// TC floor applies (the do-nothing program runs at the same TC hooks;
/// `connect4`/`connect6` run at another hook, so their figures keep their
/// clock reads). The socket-LB column of the run's family only.
const COLUMNS: [(&str, &str, bool); 4] = [
    (
        datapath_user::object::TC_EGRESS,
        "egress ns/skb (skbs per {unit})",
        true,
    ),
    (
        datapath_user::object::TC_INGRESS,
        "ingress ns/skb (skbs per {unit})",
        true,
    ),
    (
        datapath_user::object::SOCK_CONNECT4,
        "connect4 ns/run, clock reads included (runs per {unit})",
        false,
    ),
    (
        datapath_user::object::SOCK_CONNECT6,
        "connect6 ns/run, clock reads included (runs per {unit})",
        false,
    ),
];

/// A statistics pass runs shorter than the measured run (per-packet
/// figures need packets, not the seed's duration) and leaves nothing out
/// (iperf3's `-O`): the statistics count every packet of the pass, so
/// the work it is divided by must be the whole pass's too.
pub fn pass_parameters(measured: &Parameters) -> Parameters {
    Parameters {
        seconds: measured.seconds.min(2.0),
        requests: measured.requests.min(20_000),
        omit_seconds: 0,
    }
}

/// The statistics' floor in a pass: the do-nothing program's time per
/// run on the same packets.
fn floor(cost: &LiveCost) -> Option<f64> {
    cost.program(datapath_user::object::TC_PASS)
        .map(|p| p.ns_per_run())
}

/// The table of `kind`'s statistics passes (nothing when there were
/// none), in a run of `family`.
pub fn print_table(rows: &[LiveRow], kind: Kind, modes: &[Mode], unit: &str, family: IpFamily) {
    let passes = |mode: Mode| {
        rows.iter()
            .filter(move |r| r.workload == kind && r.mode == mode)
    };
    let floors: Vec<f64> = modes
        .iter()
        .flat_map(|&m| passes(m).filter_map(|r| floor(&r.cost)))
        .collect();
    if floors.is_empty() {
        return;
    }
    println!(
        "\nOur programs' own run time in live traffic: the kernel's BPF statistics, on only \
         during a pass of their own after each measured run, less their floor (a \
         do-nothing program attached first on the same interface for the pass, so on the \
         same packets: {:.1} ns per run, taken off pass by pass, from the TC programs). An \
         skb is a packet or a GSO/GRO batch of them. Skbs per unit count the whole pass \
         (sockperf's warm-up too).\n",
        median_interval(&floors)
    );
    let connect = match family {
        IpFamily::V4 => datapath_user::object::SOCK_CONNECT4,
        IpFamily::V6 => datapath_user::object::SOCK_CONNECT6,
    };
    let columns: Vec<(&str, &str, bool)> = COLUMNS
        .into_iter()
        .filter(|&(program, _, tc)| tc || program == connect)
        .collect();
    let titles: Vec<String> = columns
        .iter()
        .map(|(_, title, _)| title.replace("{unit}", unit))
        .collect();
    println!("| datapath | {} |", titles.join(" | "));
    println!("|{}", " --- |".repeat(columns.len() + 1));
    for &mode in modes {
        if passes(mode).next().is_none() {
            continue;
        }
        let cells: Vec<String> = columns
            .iter()
            .map(|&(program, _, tc)| {
                // A pass without its floor is left out, never taken as 0.
                let own: Vec<f64> = passes(mode)
                    .filter_map(|r| {
                        let floor = if tc { floor(&r.cost)? } else { 0.0 };
                        r.cost.own_ns(program, floor)
                    })
                    .collect();
                let per: Vec<f64> = passes(mode)
                    .filter_map(|r| r.cost.runs_per_transaction(program))
                    .collect();
                if own.is_empty() {
                    // Floors, but none of ours at this hook: the pod has
                    // no TC pair (socket-LB alone), so 0 by construction.
                    let bare = tc && passes(mode).all(|r| floor(&r.cost).is_some());
                    return if bare { "0 (no TC pair)" } else { "–" }.to_owned();
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

    fn runs(program: &str, runs: u64, ns: u64) -> ProgramRuns {
        ProgramRuns {
            program: program.into(),
            runs,
            ns,
        }
    }

    #[test]
    fn each_pass_pays_its_own_floor() {
        use datapath_user::object::{TC_EGRESS, TC_PASS};
        let cost = LiveCost {
            transactions: 5,
            programs: vec![runs(TC_EGRESS, 10, 700), runs(TC_PASS, 10, 200)],
        };
        assert_eq!(floor(&cost), Some(20.0));
        assert_eq!(cost.own_ns(TC_EGRESS, floor(&cost).unwrap()), Some(50.0));
    }

    #[test]
    fn a_pass_is_short_but_keeps_the_workloads_shape() {
        let seed = Kind::Iperf1.parameters(None, false);
        let pass = pass_parameters(&seed);
        assert_eq!(pass.seconds, 2.0);
        assert_eq!(pass.omit_seconds, 0, "every packet of the pass is counted");
        let quick = Kind::RedisGet.parameters(None, true);
        assert_eq!(pass_parameters(&quick), quick);
    }
}
