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
//! One step per file: `modes` (the rows, the seed's figures, presets),
//! `testbed` (topology, servers, Services, and where each mode's client
//! runs), `report` (tables, charts, JSON); the client itself runs as a
//! `bench worker` process (`crate::workload`).

mod modes;
mod report;
mod testbed;

use std::{collections::BTreeMap, path::PathBuf};

use anyhow::{Context, Result, ensure};
use clap::Parser;

use self::{
    modes::parse_mode,
    report::{print_tables, rows, write_charts},
    testbed::Testbed,
};
pub use self::{
    modes::{Mode, ModeArg, Preset},
    report::Row,
};
use crate::{
    options::{Output, Repetition},
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
    /// veth-kube-proxy, veth-ebpf, pod-ip, pod-ip-routed, veth-routed,
    /// node.
    #[arg(long, value_delimiter = ',', value_parser = parse_mode)]
    pub mode: Vec<ModeArg>,
    /// Workloads (comma-separated); default: all.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub workload: Vec<Kind>,
    #[command(flatten)]
    pub repetition: Repetition,
    /// (--out gets <preset>.json and <preset>-<workload>.svg.)
    #[command(flatten)]
    pub output: Output,
    /// The `underpass` binary (default: next to this one).
    #[arg(long)]
    pub underpass: Option<PathBuf>,
}

pub fn run(opts: &ClusterIpOpts) -> Result<()> {
    crate::require_root("the ClusterIP bench (namespaces, eBPF, iptables)")?;
    opts.output.prepare()?;
    let modes = ModeArg::expand(&opts.mode, opts.preset);
    let kinds: Vec<Kind> = if opts.workload.is_empty() {
        Kind::ALL.to_vec()
    } else {
        opts.workload.clone()
    };
    let (runs, seconds) = opts.repetition.plan(0.3);
    lab::cleanup_on_signals();
    eprintln!("building the two-node topology…");
    let mut testbed = Testbed::build(&modes, &kinds, opts.underpass.as_deref())?;
    let mut measured: BTreeMap<(Kind, Mode), Vec<Measurement>> = BTreeMap::new();
    let total = runs * kinds.len() * modes.len();
    let mut done = 0;
    for run in 0..runs {
        for &kind in &kinds {
            // Modes interleaved: drift on the machine hits all of them.
            for &mode in &modes {
                done += 1;
                eprint!(
                    "\r[{done}/{total}] run {} {kind:?} {:<42}",
                    run + 1,
                    mode.label()
                );
                testbed.prepare(mode)?;
                let client = testbed.endpoint(mode, kind);
                let measurement = run_worker(
                    client.netns,
                    client.cgroup,
                    kind,
                    client.target.into(),
                    seconds,
                )
                .with_context(|| format!("{kind:?} over {}", mode.label()))?;
                ensure!(
                    measurement.transactions > 0,
                    "{kind:?} over {}: no transaction completed",
                    mode.label()
                );
                measured.entry((kind, mode)).or_default().push(measurement);
            }
        }
    }
    eprintln!();
    testbed.finish()?;
    print_tables(&measured, &kinds, &modes, opts.preset.ratios());
    let name = opts.preset.name();
    if let Some(dir) = opts.output.dir() {
        write_charts(&measured, &kinds, &modes, dir, name)?;
    }
    opts.output
        .write(&rows(measured), &format!("{name}.json"))?;
    if let Some(dir) = opts.output.dir() {
        eprintln!("wrote {name}.json and the charts to {}", dir.display());
    }
    Ok(())
}
