//! `bench scale`: cost against the number of services, for kube-proxy's
//! iptables and nftables rules and for underpass. At each point (N
//! services × M endpoints) every datapath is programmed from nothing in
//! the client's node (kube-proxy) or on the client pod (underpass TC) of
//! the two-node topology, then measured:
//! - the time to program all N services (the full restore, the nft
//!   script, the agent's full sync into sized maps),
//! - TCP_CRR rate and p99 from the client pod to one service through it
//!   (the service in the middle of kube-proxy's sorted rule list; its one
//!   endpoint is the server pod; the others point at unused addresses and
//!   carry no traffic),
//! - the time to apply one changed EndpointSlice (kube-proxy's partial
//!   restore / nft transaction; the agent's incremental update).
//!
//! A datapath whose programming outlasts `--time-limit` is killed,
//! reported as such and skipped at larger points.
//!
//! One step per file: `testbed` (the topology, each point's objects, and
//! programming and measuring each datapath), `report` (table, plots,
//! JSON).

mod report;
mod testbed;

use std::{collections::BTreeSet, path::PathBuf, time::Duration};

use anyhow::{Context, Result, ensure};
use clap::{Parser, ValueEnum};
use serde::{Deserialize, Serialize};

use self::{
    report::{plot_points, print_table, report},
    testbed::{Crr, Sweep, Testbed},
};
use crate::{
    cluster::{KubeProxy, TimedOut},
    options::{Output, Repetition},
    workload::Measurement,
};

/// A datapath the sweep programs.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, ValueEnum, Serialize, Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum ScaleDatapath {
    /// kube-proxy's iptables rules (iptables-restore), in the client's node.
    Iptables,
    /// kube-proxy's nftables ruleset (nft -f), in the client's node.
    Nftables,
    /// underpass: the agent's reconciler into sized maps, TC on the pod.
    Underpass,
}

impl ScaleDatapath {
    pub const ALL: [ScaleDatapath; 3] = [
        ScaleDatapath::Iptables,
        ScaleDatapath::Nftables,
        ScaleDatapath::Underpass,
    ];

    pub fn label(self) -> &'static str {
        match self {
            ScaleDatapath::Iptables => "kube-proxy iptables",
            ScaleDatapath::Nftables => "kube-proxy nftables",
            ScaleDatapath::Underpass => "underpass",
        }
    }
}

#[derive(Parser, Debug)]
#[command(
    mut_arg("seconds", |a| a
        .default_value("3")
        .help("Seconds of TCP_CRR at each point (0 skips the data plane)")),
    mut_arg("runs", |a| a
        .default_value("3")
        .help("TCP_CRR runs at each point (the median is reported)")),
    mut_arg("quick", |a| a.help("Small sizes only (1 and 100 services, 0.3 s of TCP_CRR), for CI")),
)]
pub struct ScaleOpts {
    /// Service counts (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,1000,10000,50000")]
    pub services: Vec<usize>,
    /// Endpoints per service (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,10")]
    pub endpoints: Vec<usize>,
    /// Datapaths (comma-separated); default: all.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub datapath: Vec<ScaleDatapath>,
    #[command(flatten)]
    pub repetition: Repetition,
    /// Seconds a datapath may take to program all services (or apply the
    /// change) before it is killed; it is then skipped at larger points.
    #[arg(long, default_value_t = 120)]
    pub time_limit: u64,
    /// --out gets scale.json and the SVG plots (program time, one change,
    /// TCP_CRR rate and p99 against N).
    #[command(flatten)]
    pub output: Output,
    /// Measure nothing: print the table and redraw the plots of an
    /// earlier run from DIR/scale.json.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["out", "json", "quick"])]
    pub replot: Option<PathBuf>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ScalePoint {
    pub services: usize,
    pub endpoints: usize,
    pub datapath: ScaleDatapath,
    /// Time to program all services; absent when it outlasted the limit.
    pub program_ms: Option<f64>,
    pub one_change_ms: Option<f64>,
    /// Median TCP_CRR rate to the measured service, transactions/s.
    pub crr_per_second: Option<f64>,
    /// Median of the runs' TCP_CRR p99, µs.
    pub crr_p99_us: Option<f64>,
    #[serde(default)]
    pub crr_runs: Vec<Measurement>,
    /// Why figures are missing (time limit, skipped).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

pub fn run(opts: &ScaleOpts) -> Result<()> {
    if let Some(dir) = &opts.replot {
        let path = dir.join("scale.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let points: Vec<ScalePoint> = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a `bench scale` result", path.display()))?;
        print_table(&points);
        plot_points(dir, &points)?;
        eprintln!("redrew the plots in {}", dir.display());
        return Ok(());
    }
    crate::require_root("the scale bench (namespaces, iptables, nft, BPF maps)")?;
    let (runs, seconds) = opts.repetition.plan(0.3);
    let sizes = if opts.repetition.quick {
        vec![1, 100]
    } else {
        opts.services.clone()
    };
    ensure!(
        sizes.iter().chain(&opts.endpoints).all(|&v| v > 0),
        "--services and --endpoints must be positive"
    );
    let datapaths: Vec<ScaleDatapath> = if opts.datapath.is_empty() {
        ScaleDatapath::ALL.to_vec()
    } else {
        opts.datapath.clone()
    };
    opts.output.prepare()?;
    lab::cleanup_on_signals();
    eprintln!("building the two-node topology…");
    let lab = Testbed::build()?;
    let limit = Duration::from_secs(opts.time_limit);
    let mut points = Vec::new();
    let mut timed_out: BTreeSet<(ScaleDatapath, usize, usize)> = BTreeSet::new();
    for &n in &sizes {
        for &m in &opts.endpoints {
            eprintln!("{n} services × {m} endpoints…");
            let sweep = Sweep::new(n, m, lab.server_address)?;
            for &datapath in &datapaths {
                let mut point = ScalePoint {
                    services: n,
                    endpoints: m,
                    datapath,
                    program_ms: None,
                    one_change_ms: None,
                    crr_per_second: None,
                    crr_p99_us: None,
                    crr_runs: Vec::new(),
                    note: None,
                };
                let smaller_timed_out = timed_out
                    .iter()
                    .any(|&(d, tn, tm)| d == datapath && tn <= n && tm <= m);
                if smaller_timed_out {
                    point.note = Some(format!(
                        "skipped: exceeded the {} s limit at a smaller point",
                        opts.time_limit
                    ));
                } else {
                    let crr = Crr { seconds, runs };
                    let outcome = match datapath {
                        ScaleDatapath::Iptables => {
                            lab.kube_proxy(&sweep, KubeProxy::Iptables, limit, &crr)
                        }
                        ScaleDatapath::Nftables => {
                            lab.kube_proxy(&sweep, KubeProxy::Nftables, limit, &crr)
                        }
                        ScaleDatapath::Underpass => lab.underpass(&sweep, &crr),
                    };
                    match outcome {
                        Ok(outcome) => {
                            outcome.fill(&mut point);
                            // In-process programming cannot be killed:
                            // past the limit, larger points are skipped.
                            if point
                                .program_ms
                                .is_some_and(|ms| ms > limit.as_secs_f64() * 1e3)
                            {
                                timed_out.insert((datapath, n, m));
                                point.note = Some(format!(
                                    "programming took over the {} s limit: larger points skipped",
                                    opts.time_limit
                                ));
                            }
                        }
                        Err(error) if error.downcast_ref::<TimedOut>().is_some() => {
                            timed_out.insert((datapath, n, m));
                            point.note = Some(format!("{error:#}"));
                        }
                        Err(error) => {
                            return Err(error.context(format!(
                                "{} at {n} services × {m} endpoints",
                                datapath.label()
                            )));
                        }
                    }
                }
                points.push(report(point));
            }
        }
    }
    drop(lab);
    print_table(&points);
    opts.output.write(&points, "scale.json")?;
    if let Some(dir) = opts.output.dir() {
        plot_points(dir, &points)?;
        eprintln!("wrote scale.json and the plots to {}", dir.display());
    }
    Ok(())
}
