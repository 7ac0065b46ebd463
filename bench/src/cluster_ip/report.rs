//! The ClusterIP bench's results: per workload, every row's median with
//! its 95 % interval, its paired ratio to the limit (the bare Pod IP
//! row) with its interval, CPU per unit from the same runs, the seed's
//! figure beside it; the preset's other ratios; every deviation from the
//! seed's parameters; and the JSON of everything (machine, offloads,
//! mode orders, every run).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

use anyhow::Result;
use lab::DeviceOffloads;
use serde::{Deserialize, Serialize};

use super::{
    live::{self, LiveRow},
    modes::Mode,
};
use crate::{
    family::IpFamily,
    machine::Machine,
    plot::Bar,
    stats::{Interval, median, median_interval, paired_ratios},
    workload::{Kind, Measurement, Parameters},
};

/// Every run of one workload over one mode, in round order.
#[derive(Debug, Serialize, Deserialize)]
pub struct Row {
    pub workload: Kind,
    pub mode: Mode,
    pub runs: Vec<Measurement>,
}

/// How one workload ran, and how that differs from the seed.
#[derive(Debug, Serialize, Deserialize)]
pub struct WorkloadSetup {
    pub workload: Kind,
    pub parameters: Parameters,
    pub deviations: Vec<String>,
}

/// The order the modes ran in, one round of one workload.
#[derive(Debug, Serialize, Deserialize)]
pub struct RoundOrder {
    pub round: usize,
    pub workload: Kind,
    pub modes: Vec<Mode>,
}

/// A paired ratio `mode / to` over the rounds.
#[derive(Debug, Serialize, Deserialize)]
pub struct Ratio {
    pub workload: Kind,
    pub mode: Mode,
    pub to: Mode,
    /// `figure` (the table's figure) or `cpu` (CPU per unit).
    pub of: String,
    pub interval: Interval,
}

/// A run's JSON: what a reader needs to judge its figures.
#[derive(Debug, Serialize, Deserialize)]
pub struct Results {
    pub preset: String,
    /// Every row's address family (runs before `--family`: IPv4).
    #[serde(default)]
    pub family: IpFamily,
    pub machine: Machine,
    /// Seeds the mode order (`--seed` repeats it).
    pub seed: u64,
    pub rounds: usize,
    pub workloads: Vec<WorkloadSetup>,
    /// `ethtool -k` of every device of the topology.
    pub offloads: Vec<DeviceOffloads>,
    pub orders: Vec<RoundOrder>,
    /// The statistics passes (`super::live`); none in runs before them.
    #[serde(default)]
    pub live: Vec<LiveRow>,
    pub rows: Vec<Row>,
    pub ratios: Vec<Ratio>,
}

/// The stem of a run's files: the preset's name, `-ipv6` for IPv6 runs.
pub(super) fn result_stem(preset: &str, family: IpFamily) -> String {
    match family {
        IpFamily::V4 => preset.to_owned(),
        IpFamily::V6 => format!("{preset}-ipv6"),
    }
}

/// A workload's table title, unit, the figure shown for it, and the CPU
/// unit.
fn presentation(kind: Kind) -> (&'static str, &'static str, fn(&Measurement) -> f64) {
    let latency: fn(&Measurement) -> f64 = |m| m.mean_us.unwrap_or(f64::NAN);
    let rate: fn(&Measurement) -> f64 = |m| m.per_second;
    match kind {
        Kind::Latency => ("ping-pong latency, ours (one-way, 64 B)", "µs", latency),
        Kind::Rr => ("TCP_RR (100 B request/response)", "trans/s", rate),
        Kind::Crr => (
            "TCP_CRR (connect, 100 B request/response, close)",
            "trans/s",
            rate,
        ),
        Kind::Sockperf => ("sockperf ping-pong --tcp (one-way latency)", "µs", latency),
        Kind::Iperf1 => ("iperf3, 1 stream", "Gbit/s", rate),
        Kind::Iperf2 => ("iperf3, 2 streams", "Gbit/s", rate),
        Kind::Iperf4 => ("iperf3, 4 streams", "Gbit/s", rate),
        Kind::RedisGet => ("redis-benchmark -d 1000 -t get", "requests/s", rate),
        Kind::RedisSet => ("redis-benchmark -d 1000 -t set", "requests/s", rate),
        Kind::PacketRate => (
            "packet rate, 60-byte UDP frames from one sending CPU",
            "packets/s",
            rate,
        ),
    }
}

fn cpu_unit(kind: Kind) -> &'static str {
    match kind {
        Kind::Iperf1 | Kind::Iperf2 | Kind::Iperf4 => "MB",
        Kind::Sockperf | Kind::Latency => "message",
        Kind::RedisGet | Kind::RedisSet => "request",
        Kind::Rr | Kind::Crr => "transaction",
        Kind::PacketRate => "packet",
    }
}

impl Results {
    /// Paired ratios of every row to the limit and of the preset's pairs,
    /// for the figure and for CPU per unit.
    pub(super) fn ratios_of(
        rows: &BTreeMap<(Kind, Mode), Vec<Measurement>>,
        pairs: &[(Mode, Mode)],
    ) -> Vec<Ratio> {
        let mut ratios = Vec::new();
        let kinds: BTreeSet<Kind> = rows.keys().map(|(k, _)| *k).collect();
        for kind in kinds {
            let (_, _, pick) = presentation(kind);
            let to_limit = rows
                .keys()
                .filter(|(k, m)| *k == kind && *m != Mode::LIMIT)
                .map(|&(_, m)| (m, Mode::LIMIT));
            for (mode, to) in to_limit.chain(pairs.iter().copied()) {
                let (Some(a), Some(b)) = (rows.get(&(kind, mode)), rows.get(&(kind, to))) else {
                    continue;
                };
                let figures = |runs: &[Measurement], f: &dyn Fn(&Measurement) -> f64| {
                    runs.iter().map(f).collect::<Vec<f64>>()
                };
                for (of, f) in [
                    ("figure", &pick as &dyn Fn(&Measurement) -> f64),
                    ("cpu", &|m: &Measurement| m.cpu.total_us),
                ] {
                    let per_round = paired_ratios(&figures(a, f), &figures(b, f));
                    if per_round.is_empty() {
                        continue;
                    }
                    ratios.push(Ratio {
                        workload: kind,
                        mode,
                        to,
                        of: of.to_owned(),
                        interval: median_interval(&per_round),
                    });
                }
            }
        }
        ratios
    }

    fn ratio(&self, kind: Kind, mode: Mode, to: Mode, of: &str) -> Option<&Interval> {
        self.ratios
            .iter()
            .find(|r| r.workload == kind && r.mode == mode && r.to == to && r.of == of)
            .map(|r| &r.interval)
    }

    fn runs(&self, kind: Kind, mode: Mode) -> Option<&[Measurement]> {
        self.rows
            .iter()
            .find(|r| r.workload == kind && r.mode == mode)
            .map(|r| r.runs.as_slice())
    }

    /// The tables, one per workload, and what a reader must know to
    /// trust them.
    pub(super) fn print(&self, kinds: &[Kind], modes: &[Mode], pairs: &[(Mode, Mode)]) {
        println!(
            "\n{}: every row's traffic, Services and kube-proxy rules in this family.",
            self.family
        );
        println!(
            "{} rounds on {}; in each round every mode once per workload, in a shuffled \
             order (seed {}: `--seed {}` repeats it); conntrack flushed between modes; \
             kube-proxy's tables present only while a kube-proxy mode runs (checked). \
             Medians with distribution-free 95 % intervals of the median (order \
             statistics; with fewer than 6 rounds the range, its level in brackets); \
             ratios are per round (paired) to the limit, \"{}\". With this many \
             intervals, about one in twenty misses by chance: read the A/A row first.",
            self.rounds,
            self.machine,
            self.seed,
            self.seed,
            Mode::LIMIT.label()
        );
        if self.rounds < 2 {
            println!(
                "One round: figures without intervals, ratios of one pair (a pipeline check)."
            );
        }
        println!("{}", offload_summary(&self.offloads));
        for &kind in kinds {
            self.print_table(kind, modes, pairs);
        }
    }

    fn print_table(&self, kind: Kind, modes: &[Mode], pairs: &[(Mode, Mode)]) {
        let (title, unit, pick) = presentation(kind);
        let per = cpu_unit(kind);
        println!("\n### {title}\n");
        println!(
            "| datapath | ours ({unit}) | ÷ limit | seed ({unit}) | seed ÷ its Pod IP | \
             CPU µs/{per}: total (client, server; softirq) | CPU ÷ limit |"
        );
        println!("| --- | --- | --- | --- | --- | --- | --- |");
        let seed_limit = Mode::LIMIT.seed(kind);
        let mut agent_cpu = Vec::new();
        for &mode in modes {
            let Some(runs) = self.runs(kind, mode) else {
                continue;
            };
            let figures: Vec<f64> = runs.iter().map(pick).collect();
            let figure = median_interval(&figures);
            let ratio = |of| {
                if mode == Mode::LIMIT {
                    "1".to_owned()
                } else {
                    self.ratio(kind, mode, Mode::LIMIT, of)
                        .map_or("–".into(), |i| format!("{i:.3}"))
                }
            };
            let seed = mode.seed(kind);
            let seed_ratio = match (seed, seed_limit) {
                (Some(s), Some(l)) => format!("{:.3}", s / l),
                _ => "–".into(),
            };
            println!(
                "| {} | {figure:.1} | {} | {} | {seed_ratio} | {} | {} |",
                mode.label(),
                ratio("figure"),
                seed.map_or("–".into(), |v| v.to_string()),
                cpu_split(runs),
                ratio("cpu"),
            );
            let agent: Vec<f64> = runs.iter().filter_map(|m| m.cpu.agent_us).collect();
            if !agent.is_empty() {
                agent_cpu.push((mode, median(&agent)));
            }
        }
        for &(a, b) in pairs {
            let Some(interval) = self.ratio(kind, a, b, "figure") else {
                continue;
            };
            let seed = match (a.seed(kind), b.seed(kind)) {
                (Some(x), Some(y)) => format!("; the seed's {:.3}", x / y),
                _ => String::new(),
            };
            println!("\n{} ÷ {}: {interval:.3}{seed}", a.label(), b.label());
        }
        for &mode in modes {
            let Some(runs) = self.runs(kind, mode) else {
                continue;
            };
            let errors: u64 = runs.iter().map(|m| m.errors).sum();
            if kind == Kind::PacketRate {
                let arrived: u64 = runs.iter().map(|m| m.transactions).sum();
                let sent = arrived + errors;
                let cpu: Vec<f64> = runs.iter().map(|m| m.cpu.total_us).collect();
                let softirq: Vec<f64> = runs.iter().map(|m| m.cpu.softirq_us).collect();
                println!(
                    "\n{}: {:.0} packets per CPU-second ({:.0} per softirq CPU-second); \
                     {:.1} % of those sent did not arrive",
                    mode.label(),
                    1e6 / median(&cpu),
                    1e6 / median(&softirq),
                    100.0 * errors as f64 / sent.max(1) as f64
                );
            } else if errors > 0 {
                println!(
                    "\n{}: {errors} failed transactions (reconnects) in {} runs — its figure \
                     includes the time they cost",
                    mode.label(),
                    runs.len()
                );
            }
        }
        live::print_table(&self.live, kind, modes, per, self.family);
        if let Some(setup) = self.workloads.iter().find(|w| w.workload == kind) {
            for deviation in &setup.deviations {
                println!("\n- {deviation}");
            }
        }
        if !agent_cpu.is_empty() {
            let said: Vec<String> = agent_cpu
                .iter()
                .map(|(mode, us)| format!("{} {us:.3}", mode.label()))
                .collect();
            println!(
                "\nThe agent's own CPU, µs/{per} (not in the columns above): {}",
                said.join(", ")
            );
        }
        let steal: Vec<f64> = self
            .rows
            .iter()
            .filter(|r| r.workload == kind)
            .flat_map(|r| r.runs.iter().map(|m| m.cpu.steal_us))
            .collect();
        let worst = steal.iter().copied().fold(0.0, f64::max);
        if worst > 0.0 {
            println!("\nSteal (the hypervisor ran others on our CPUs): up to {worst:.2} µs/{per}");
        }
    }

    /// One chart per workload: every row's median, whiskers its 95 %
    /// interval.
    pub(super) fn write_charts(&self, kinds: &[Kind], modes: &[Mode], dir: &Path) -> Result<()> {
        for &kind in kinds {
            let (title, unit, pick) = presentation(kind);
            let bars: Vec<Bar> = modes
                .iter()
                .filter_map(|&mode| {
                    let runs = self.runs(kind, mode)?;
                    let figures: Vec<f64> = runs.iter().map(pick).collect();
                    let interval = median_interval(&figures);
                    Some(Bar {
                        label: mode.label().to_owned(),
                        median: interval.median,
                        min: interval.low,
                        max: interval.high,
                    })
                })
                .collect();
            let stem = result_stem(&self.preset, self.family);
            let path = dir.join(format!("{stem}-{}.svg", kind.arg()));
            crate::plot::bars(&path, title, unit, &bars)?;
        }
        Ok(())
    }
}

/// CPU per unit of the run whose total is the median, with that run's
/// breakdown (the client's and the servers' cgroups, machine-wide
/// softirq and irq; they overlap: see `workload::cpu`).
fn cpu_split(runs: &[Measurement]) -> String {
    let mut sorted: Vec<&Measurement> = runs.iter().collect();
    sorted.sort_by(|a, b| a.cpu.total_us.total_cmp(&b.cpu.total_us));
    let middle = sorted[sorted.len() / 2].cpu;
    format!(
        "{:.2} ({:.2}, {:.2}; {:.2})",
        middle.total_us,
        middle.client_user_us + middle.client_system_us,
        middle.server_user_us + middle.server_system_us,
        middle.softirq_us + middle.irq_us
    )
}

/// One line: which offloads the devices had.
fn offload_summary(devices: &[DeviceOffloads]) -> String {
    let all = |f: fn(&DeviceOffloads) -> bool| devices.iter().filter(|d| f(d)).count();
    format!(
        "Offloads on {} devices (`ethtool -k`, every device in the JSON): tx-checksumming on {}, \
         TSO on {}, GSO on {}, GRO on {}.",
        devices.len(),
        all(|d| d.tx_checksumming),
        all(|d| d.tcp_segmentation_offload),
        all(|d| d.generic_segmentation_offload),
        all(|d| d.generic_receive_offload),
    )
}
