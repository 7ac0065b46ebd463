//! `bench cluster-ip`: the seed's ClusterIP table on our two-node
//! topology, every mode interleaved in one run: kube-proxy (iptables and
//! nftables, through the Spiderpool coordinator veth), underpass on the
//! TC path and with socket-LB (programmed by `underpass agent --from-dir`
//! from the same objects), veth pods routed by their nodes through
//! kube-proxy (the seed's Calico row) and through underpass on their veth
//! (its Cilium row), the direct Pod IP, and node to node. `--preset
//! pod-ip` (`bench pod-ip`) is the seed's Pod IP table from the same
//! modes.
//!
//! Every ratio is taken round by round against the limit: a macvlan
//! client with nothing of ours attached, straight to the Pod IP. An A/A
//! row (the limit measured twice per round) shows the run's noise floor.
//!
//! One step per file: `modes` (the rows, the seed's figures, presets),
//! `testbed` (topology, servers, Services, and where each mode's client
//! runs), `report` (tables, charts, JSON); the client itself runs as a
//! `bench worker` process (`crate::workload`), statistics in
//! `crate::stats`.

mod bed;
mod live;
mod modes;
mod node_port_testbed;
mod report;
mod testbed;

use std::{collections::BTreeMap, path::PathBuf, time::Instant};

use anyhow::{Context, Result, ensure};
use clap::Parser;

use self::{bed::Bed, modes::parse_mode};
pub use self::{
    live::LiveRow,
    modes::{Mode, ModeArg, Preset},
    report::{Ratio, Results, RoundOrder, Row, WorkloadSetup},
};
use crate::{
    family::IpFamily,
    machine::Machine,
    options::{Output, Repetition},
    stats::{Shuffler, fresh_seed},
    workload::{Kind, Measurement, run_worker},
};

#[derive(Parser, Debug)]
pub struct ClusterIpOpts {
    /// Which of the seed's tables: its ClusterIP table (every mode) or
    /// its Pod IP table (the no-service modes; `bench pod-ip`).
    #[arg(long, value_enum, default_value_t = Preset::ClusterIp)]
    pub preset: Preset,
    /// Modes to measure (comma-separated), or `all` (the preset's, the
    /// default): kube-proxy, kube-proxy-nft, ebpf, socket-lb,
    /// veth-kube-proxy, veth-ebpf, pod-ip-bare (the limit, always
    /// measured), aa-control, pod-ip, pod-ip-routed, veth-routed, node;
    /// under `--preset node-port`: node-port-kube-proxy,
    /// node-port-kube-proxy-nft, node-port-xdp (the pod on node1) and
    /// node-port-remote-kube-proxy, node-port-remote-kube-proxy-nft,
    /// node-port-remote-xdp (the pod on node2).
    #[arg(long, value_delimiter = ',', value_parser = parse_mode)]
    pub mode: Vec<ModeArg>,
    /// Workloads (comma-separated); default: all (packet-rate: `bench
    /// node-port` only).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub workload: Vec<Kind>,
    /// Address family of every row: 4, or 6 — IPv6 Services and
    /// EndpointSlices, kube-proxy's ip6tables and `ip6 kube-proxy` rules,
    /// underpass with `--ipv6 on`, the pods' and nodes' IPv6 addresses
    /// (the topology is dual-stack either way). Under 6 the sockperf
    /// workload is left out: Debian's sockperf 3.7 has no IPv6
    /// (`latency` is the same ping-pong by our own client). Results go
    /// to <preset>-ipv6.json.
    #[arg(long, default_value = "4", value_name = "4|6")]
    pub family: IpFamily,
    /// (Without --seconds every workload runs the seed's way: sockperf
    /// 30 s, TCP_RR and iperf3 10 s, redis 100,000 requests; --seconds
    /// sets every time-bound one, and the tables say so.)
    #[command(flatten)]
    pub repetition: Repetition,
    /// Seed of the per-round mode order (printed with the results; the
    /// same seed repeats the order).
    #[arg(long)]
    pub seed: Option<u64>,
    /// (--out gets <preset>.json and <preset>-<workload>.svg.)
    #[command(flatten)]
    pub output: Output,
    /// The `underpass` binary (default: next to this one).
    #[arg(long)]
    pub underpass: Option<PathBuf>,
    /// Measure nothing: print the tables and redraw the charts of an
    /// earlier run from DIR/<preset>.json, with this version's statistics.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["out", "json", "quick"])]
    pub replot: Option<PathBuf>,
}

pub fn run(opts: &ClusterIpOpts) -> Result<()> {
    if let Some(dir) = &opts.replot {
        return replot(dir, opts.preset, opts.family);
    }
    crate::require_root("the ClusterIP bench (namespaces, eBPF, iptables)")?;
    opts.output.prepare()?;
    let modes = ModeArg::expand(&opts.mode, opts.preset);
    let preset_modes = opts.preset.modes();
    if let Some(mode) = modes.iter().find(|m| !preset_modes.contains(m)) {
        anyhow::bail!(
            "--mode {}: not a mode of --preset {} (its modes: {})",
            mode_arg(*mode),
            opts.preset.name(),
            preset_modes
                .iter()
                .map(|m| mode_arg(*m))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if opts.preset == Preset::NodePort && opts.family == IpFamily::V6 {
        anyhow::bail!(
            "--preset node-port --family 6: underpass serves nodePorts from outside over IPv4 \
             only so far (its XDP program has no IPv6 path yet)"
        );
    }
    let kinds = workloads_of(opts)?;
    if let Some(mode) = modes.iter().find(|m| !kinds.iter().any(|&k| m.measures(k))) {
        anyhow::bail!(
            "--mode {} measures --workload packet-rate only, which this run leaves out",
            mode_arg(*mode)
        );
    }
    let rounds = opts.repetition.rounds();
    let workloads: Vec<WorkloadSetup> = kinds
        .iter()
        .map(|&kind| {
            let parameters = kind.parameters(opts.repetition.seconds, opts.repetition.quick);
            WorkloadSetup {
                workload: kind,
                deviations: kind.deviations(&parameters),
                parameters,
            }
        })
        .collect();
    let seed = opts.seed.unwrap_or_else(fresh_seed);
    let mut shuffler = Shuffler::new(seed);
    lab::cleanup_on_signals();
    if crate::program_stats::RunTimeStats::always_on() {
        eprintln!(
            "note: kernel.bpf_stats_enabled is 1: every run of every program pays the \
             statistics' clock reads, in the figures too, not only in the statistics passes"
        );
    }
    eprintln!("building the two-node topology…");
    let mut testbed = Bed::build(
        opts.preset,
        &modes,
        &kinds,
        opts.underpass.as_deref(),
        opts.family,
    )?;
    let offloads = testbed.offloads()?;
    let mut measured: BTreeMap<(Kind, Mode), Vec<Measurement>> = BTreeMap::new();
    let mut orders = Vec::new();
    let mut live = Vec::new();
    let total = rounds
        * kinds
            .iter()
            .map(|&k| modes.iter().filter(|m| m.measures(k)).count())
            .sum::<usize>();
    let started = Instant::now();
    let mut done = 0;
    for round in 0..rounds {
        for setup in &workloads {
            let kind = setup.workload;
            // Every mode once per round, in a fresh order: drift on the
            // machine and what one mode leaves behind hit all of them.
            let runnable: Vec<Mode> = modes.iter().copied().filter(|m| m.measures(kind)).collect();
            let order = shuffler.shuffled(&runnable);
            for &mode in &order {
                eprint!(
                    "\r[{}/{total}] round {} {kind:?} {:<42}{}",
                    done + 1,
                    round + 1,
                    mode.label(),
                    remaining(started, done, total)
                );
                testbed.prepare(mode)?;
                let client = testbed.endpoint(mode, kind);
                let measurement = run_worker(
                    client.place,
                    kind,
                    client.target,
                    &setup.parameters,
                    client.arrivals.as_ref(),
                )
                .with_context(|| format!("{kind:?} over {}", mode.label()))?;
                ensure!(
                    measurement.transactions > 0,
                    "{kind:?} over {}: no transaction completed",
                    mode.label()
                );
                measured.entry((kind, mode)).or_default().push(measurement);
                done += 1;
            }
            // The statistics passes after every measured run of the round:
            // no measured run follows a pass more often than another.
            let pass = live::pass_parameters(&setup.parameters);
            for &mode in &order {
                if let Some(cost) = testbed.live_pass(mode, kind, &pass)? {
                    live.push(LiveRow {
                        workload: kind,
                        mode,
                        round,
                        cost,
                    });
                }
            }
            orders.push(RoundOrder {
                round,
                workload: kind,
                modes: order,
            });
        }
    }
    eprintln!();
    testbed.finish()?;
    let pairs = opts.preset.ratios();
    let results = Results {
        preset: opts.preset.name().to_owned(),
        family: opts.family,
        machine: Machine::describe(),
        seed,
        rounds,
        workloads,
        offloads,
        orders,
        live,
        ratios: Results::ratios_of(&measured, pairs),
        rows: measured
            .into_iter()
            .map(|((workload, mode), runs)| Row {
                workload,
                mode,
                runs,
            })
            .collect(),
    };
    results.print(&kinds, &modes, pairs);
    let name = report::result_stem(opts.preset.name(), opts.family);
    if let Some(dir) = opts.output.dir() {
        results.write_charts(&kinds, &modes, dir)?;
    }
    opts.output.write(&results, &format!("{name}.json"))?;
    if let Some(dir) = opts.output.dir() {
        eprintln!("wrote {name}.json and the charts to {}", dir.display());
    }
    Ok(())
}

/// The workloads to measure: those asked for (all by default), less
/// those whose tool has no IPv6 under `--family 6` (said on stderr; an
/// error when asked for by name).
fn workloads_of(opts: &ClusterIpOpts) -> Result<Vec<Kind>> {
    let ipv6 = opts.family == IpFamily::V6;
    let north_south = opts.preset == Preset::NodePort;
    if !north_south && let Some(kind) = opts.workload.iter().find(|k| k.north_south_only()) {
        anyhow::bail!(
            "--workload {} runs in `bench node-port` only: its testbed has the UDP sinks and \
             the counters it is judged by",
            kind.arg()
        );
    }
    if opts.workload.is_empty() {
        let every = Kind::ALL
            .into_iter()
            .chain(north_south.then_some(Kind::PacketRate));
        let (kept, left): (Vec<Kind>, Vec<Kind>) = every.partition(|k| !(ipv6 && k.ipv4_only()));
        for kind in left {
            eprintln!(
                "note: --family 6 leaves out --workload {}: its Debian tool takes IPv4 \
                 addresses only",
                kind.arg()
            );
        }
        return Ok(kept);
    }
    if ipv6 && let Some(kind) = opts.workload.iter().find(|k| k.ipv4_only()) {
        anyhow::bail!(
            "--workload {} cannot run with --family 6: its Debian tool (sockperf 3.7) takes \
             IPv4 addresses only; `latency` measures the same ping-pong with our own client",
            kind.arg()
        );
    }
    Ok(opts.workload.clone())
}

/// `--replot DIR`: an earlier run's tables and charts, its ratios
/// recomputed from its runs.
fn replot(dir: &std::path::Path, preset: Preset, family: IpFamily) -> Result<()> {
    let path = dir.join(format!(
        "{}.json",
        report::result_stem(preset.name(), family)
    ));
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut results: Results = serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is not a `bench cluster-ip` result of this version",
            path.display()
        )
    })?;
    let measured: BTreeMap<(Kind, Mode), Vec<Measurement>> = results
        .rows
        .drain(..)
        .map(|row| ((row.workload, row.mode), row.runs))
        .collect();
    let kinds: Vec<Kind> = results.workloads.iter().map(|w| w.workload).collect();
    let modes: Vec<Mode> = Mode::ALL
        .into_iter()
        .filter(|m| measured.keys().any(|(_, mode)| mode == m))
        .collect();
    let pairs = preset.ratios();
    results.ratios = Results::ratios_of(&measured, pairs);
    results.rows = measured
        .into_iter()
        .map(|((workload, mode), runs)| Row {
            workload,
            mode,
            runs,
        })
        .collect();
    results.print(&kinds, &modes, pairs);
    results.write_charts(&kinds, &modes, dir)?;
    eprintln!("redrew the charts in {}", dir.display());
    Ok(())
}

/// `mode` as `--mode` spells it.
fn mode_arg(mode: Mode) -> String {
    use clap::ValueEnum;
    mode.to_possible_value()
        .map_or_else(|| format!("{mode:?}"), |v| v.get_name().to_owned())
}

/// "  ~12 min left" from the pace so far.
fn remaining(started: Instant, done: usize, total: usize) -> String {
    if done == 0 {
        return String::new();
    }
    let left = started.elapsed().as_secs_f64() / done as f64 * (total - done) as f64;
    if left >= 90.0 {
        format!("  ~{:.0} min left", left / 60.0)
    } else {
        format!("  ~{left:.0} s left")
    }
}
