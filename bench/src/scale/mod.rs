//! `bench scale`: cost against the number of services, for kube-proxy's
//! iptables and nftables rules and for underpass, like with like. At each
//! point (N services × M endpoints), in every round, every datapath (in a
//! shuffled order) is
//! - programmed from the objects, from nothing: kube-proxy's translation,
//!   payload generation and restore in the client's node; the agent's
//!   start-up (maps loaded, TC attached, state adopted), translation and
//!   map writes — timed;
//! - resynced in full with everything in place (the steady state of a
//!   periodic sync) — timed;
//! - measured with TCP_CRR from the client pod to the service in the
//!   middle of kube-proxy's sorted KUBE-SERVICES and to the last one, in
//!   a shuffled order, TIME_WAIT sockets closed before each (the
//!   server pod is their one endpoint; the others point at unused
//!   addresses and carry no traffic);
//! - in the first round, changed: one EndpointSlice, `--change-samples`
//!   times from the objects (kube-proxy's partial restore or nft
//!   transaction with its generation; the agent's incremental update),
//!   p50 and the maximum;
//! - removed (kube-proxy's tables whole, checked gone).
//!
//! A datapath whose programming outlasts `--time-limit` is killed,
//! reported as such (and drawn as a cross at the limit) and skipped at
//! larger points.
//!
//! One step per file: `testbed` (the topology, each point's objects, and
//! programming, changing, measuring and removing each datapath), `points`
//! (what a point records, its medians, the run's JSON), `report` (table,
//! plots).

mod points;
mod report;
mod testbed;

use std::{collections::BTreeSet, path::PathBuf, time::Duration};

use anyhow::{Context, Result, ensure};
use clap::{Parser, ValueEnum};
use serde::{Deserialize, Serialize};

use self::{
    points::summarize,
    report::{plot_points, print_table, report},
    testbed::{Sweep, Testbed},
};
pub use self::{
    points::{CrrRun, ScalePoint, ScaleResults, Step},
    testbed::Position,
};
use crate::{
    cluster::{KubeProxy, TimedOut},
    machine::Machine,
    options::{Output, Repetition},
    stats::{Shuffler, fresh_seed, median},
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

    /// The kube-proxy flavour this datapath is, if it is one.
    pub fn kube_proxy(self) -> Option<KubeProxy> {
        match self {
            ScaleDatapath::Iptables => Some(KubeProxy::Iptables),
            ScaleDatapath::Nftables => Some(KubeProxy::Nftables),
            ScaleDatapath::Underpass => None,
        }
    }

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
        .help("Seconds of each TCP_CRR run (0 skips the data plane)")),
    mut_arg("runs", |a| a
        .default_value("3")
        .help("Rounds at each point: every datapath programmed, resynced and measured with \
               TCP_CRR once per round (medians are reported)")),
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
    /// Changes of one EndpointSlice timed at each point (p50 and p99 are
    /// reported).
    #[arg(long, default_value_t = 50)]
    pub change_samples: usize,
    /// Seed of the datapath order per round (printed; repeats it).
    #[arg(long)]
    pub seed: Option<u64>,
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

/// How much of each figure a point takes.
struct Plan {
    rounds: usize,
    crr_seconds: f64,
    change_samples: usize,
    limit: Duration,
}

pub fn run(opts: &ScaleOpts) -> Result<()> {
    if let Some(dir) = &opts.replot {
        let path = dir.join("scale.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let results: ScaleResults = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a `bench scale` result", path.display()))?;
        print_table(&results.points);
        let limit = Duration::from_secs(results.time_limit_s);
        plot_points(dir, &results.points, limit)?;
        eprintln!("redrew the plots in {}", dir.display());
        return Ok(());
    }
    crate::require_root("the scale bench (namespaces, iptables, nft, BPF maps)")?;
    let (rounds, crr_seconds) = opts.repetition.plan(0.3);
    let plan = Plan {
        rounds,
        crr_seconds,
        change_samples: if opts.repetition.quick {
            4
        } else {
            opts.change_samples.max(2)
        },
        limit: Duration::from_secs(opts.time_limit),
    };
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
    let seed = opts.seed.unwrap_or_else(fresh_seed);
    let mut shuffler = Shuffler::new(seed);
    opts.output.prepare()?;
    lab::cleanup_on_signals();
    eprintln!("building the two-node topology…");
    let lab = Testbed::build()?;
    let offloads = lab.offloads()?;
    let mut points = Vec::new();
    let mut killed: BTreeSet<(ScaleDatapath, usize, usize)> = BTreeSet::new();
    for &n in &sizes {
        for &m in &opts.endpoints {
            eprintln!("{n} services × {m} endpoints…");
            let sweep = Sweep::new(n, m, lab.server_address)?;
            let mut here: Vec<ScalePoint> = datapaths
                .iter()
                .map(|&d| ScalePoint::new(n, m, d))
                .collect();
            for point in &mut here {
                let d = point.datapath;
                if killed
                    .iter()
                    .any(|&(k, kn, km)| k == d && kn <= n && km <= m)
                {
                    point.note = Some(format!(
                        "skipped: killed at the {} s limit at a smaller point",
                        opts.time_limit
                    ));
                }
            }
            for round in 0..plan.rounds {
                // Every datapath once per round, in a fresh order: TCP_CRR
                // of one meets the drift the others meet.
                for datapath in shuffler.shuffled(&datapaths) {
                    let point = here
                        .iter_mut()
                        .find(|p| p.datapath == datapath)
                        .expect("one point per datapath");
                    if point.note.is_some() {
                        continue;
                    }
                    let mut step = Step::Program;
                    match measure_round(&lab, &sweep, point, round, &plan, &mut shuffler, &mut step)
                    {
                        Ok(()) => {}
                        Err(error) if error.downcast_ref::<TimedOut>().is_some() => {
                            killed.insert((datapath, n, m));
                            point.killed = true;
                            point.killed_in = Some(step);
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
            }
            for mut point in here {
                summarize(&mut point);
                points.push(report(point));
            }
        }
    }
    drop(lab);
    println!(
        "\n{} rounds per point, the datapaths in a shuffled order each round (seed {seed}: \
         `--seed {seed}` repeats it); one change: {} samples, p50 and the maximum.",
        plan.rounds, plan.change_samples
    );
    print_table(&points);
    let results = ScaleResults {
        machine: Machine::describe(),
        time_limit_s: opts.time_limit,
        seed,
        rounds: plan.rounds,
        offloads,
        points,
    };
    opts.output.write(&results, "scale.json")?;
    if let Some(dir) = opts.output.dir() {
        plot_points(dir, &results.points, plan.limit)?;
        eprintln!("wrote scale.json and the plots to {}", dir.display());
    }
    Ok(())
}

/// One round of one datapath at one point: programmed from the objects,
/// resynced, TCP_CRR to the middle and to the last service, (the first
/// round) the change samples, removed.
fn measure_round(
    lab: &Testbed,
    sweep: &Sweep,
    point: &mut ScalePoint,
    round: usize,
    plan: &Plan,
    shuffler: &mut Shuffler,
    step: &mut Step,
) -> Result<()> {
    let label = point.datapath.label();
    lab.programmed(sweep, point.datapath, plan.limit, |took, programmed| {
        point.program_runs_ms.push(took.as_secs_f64() * 1e3);
        // In-process programming cannot be killed: past the limit the
        // datapath counts as killed all the same.
        if took > plan.limit {
            return Err(TimedOut {
                program: label.to_owned(),
                namespace: "the bench".into(),
                limit: plan.limit,
            }
            .into());
        }
        *step = Step::Resync;
        let resync = lab.resync(sweep, programmed, plan.limit)?;
        point.resync_runs_ms.push(resync.as_secs_f64() * 1e3);
        if plan.crr_seconds > 0.0 {
            for target in shuffler.shuffled(&[Position::Middle, Position::Last]) {
                let measurement = lab.crr(sweep, target, plan.crr_seconds)?;
                point.crr_runs.push(CrrRun {
                    round,
                    target,
                    measurement,
                });
            }
        }
        if round == 0 {
            *step = Step::Change;
            let samples = lab.changes(sweep, programmed, plan.change_samples, plan.limit)?;
            let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
            ms.sort_by(f64::total_cmp);
            point.change_samples = ms.len();
            point.change_p50_ms = Some(median(&ms));
            point.change_max_ms = ms.last().copied();
        }
        Ok(())
    })
}
