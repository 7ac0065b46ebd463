//! `bench latency`: the second seed's question — tail latency at fixed,
//! non-overloaded request rates — across container network designs on
//! the two-node topology. nginx serves 350-byte and 4 KiB responses in the
//! server namespace of each design; the open-loop generator
//! ([`crate::loadgen`]) runs in the client's, on its own CPU.
//!
//! For each response size: every design's maximum rate (closed loop over
//! the same connections), then each design at fixed fractions of its own
//! maximum and at absolute rates shared by all designs, the designs
//! interleaved at each rate so drift hits them alike.
//!
//! One step per file: `designs` (what is compared), `testbed` (building
//! the designs and measuring one), `sweep` (the maxima, then every rate,
//! designs interleaved), `report` (tables, charts, JSON), `http_load`
//! (the generator run inside a design's client namespace).

mod designs;
mod http_load;
mod report;
mod sweep;
mod testbed;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;

pub use self::{
    designs::{Design, Tuning},
    http_load::{HttpLoadOpts, http_load},
    report::Row,
};
use self::{
    report::{Document, MIN_SAMPLES_BEYOND, plot_rows, print_tables, remove_old_charts},
    sweep::Sweep,
    testbed::Testbed,
};
use crate::{
    cluster::{KubeProxy, remove_kube_proxy},
    family::IpFamily,
    machine::Machine,
    nginx,
    options::Output,
};

#[derive(Parser, Debug)]
pub struct LatencyOpts {
    /// Designs (comma-separated); default: all.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub design: Vec<Design>,
    /// Response sizes in bytes (comma-separated): 350 and/or 4096.
    #[arg(long, value_delimiter = ',', default_values_t = nginx::RESPONSE_SIZES)]
    pub size: Vec<usize>,
    /// Fractions of each design's own maximum rate, in percent.
    #[arg(long, value_delimiter = ',', default_values_t = [20.0, 30.0, 50.0, 70.0])]
    pub fractions: Vec<f64>,
    /// Absolute rates (requests/s) every design is measured at; default:
    /// 30 % and 50 % of the host network's maximum.
    #[arg(long, value_delimiter = ',')]
    pub rates: Vec<f64>,
    /// Closed-loop maximum runs per setup (the median is used).
    #[arg(long, default_value_t = 5)]
    pub max_runs: usize,
    /// Runs of every rated point (the setups in a shuffled order each
    /// time); tables and charts show each percentile's median over them.
    #[arg(long, default_value_t = 5)]
    pub point_runs: usize,
    /// Seed of the setup order at each run (printed; repeats the order).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Node tunings (comma-separated), each measured as its own rows.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Tuning::Baseline])]
    pub tuning: Vec<Tuning>,
    /// Keep-alive connections the load is spread over.
    #[arg(long, default_value_t = 128)]
    pub connections: usize,
    /// Seconds recorded per measurement.
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// Seconds run before recording starts.
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
    /// Every design in seconds (0.5 s per measurement, 30 % only, 16
    /// connections), for CI; asserts nothing about speed.
    #[arg(long)]
    pub quick: bool,
    /// --out gets latency.json and one SVG per size and rate (latency
    /// against percentile).
    #[command(flatten)]
    pub output: Output,
    /// The `underpass` binary (default: next to this one).
    #[arg(long)]
    pub underpass: Option<PathBuf>,
    /// Measure nothing: print the tables and redraw the charts of an
    /// earlier run from DIR/latency.json.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["out", "json", "quick"])]
    pub replot: Option<PathBuf>,
}

pub fn run(opts: &LatencyOpts) -> Result<()> {
    if let Some(dir) = &opts.replot {
        return replot(dir);
    }
    crate::require_root("the latency bench (namespaces, nginx, eBPF, iptables)")?;
    opts.output.prepare()?;
    for &size in &opts.size {
        anyhow::ensure!(
            nginx::RESPONSE_SIZES.contains(&size),
            "--size {size}: the server has responses of {:?} bytes",
            nginx::RESPONSE_SIZES
        );
    }
    let designs = if opts.design.is_empty() {
        Design::ALL.to_vec()
    } else {
        opts.design.clone()
    };
    lab::cleanup_on_signals();
    eprintln!("building the designs' topologies and starting nginx…");
    let testbed = Testbed::build(&designs, opts)?;
    for (design, reason) in &testbed.unavailable {
        eprintln!("{}: unavailable — {reason}", design.label());
    }
    let sweep = Sweep::plan(opts, &designs, &testbed);
    let rows = sweep.run(&testbed, &opts.size)?;
    for node in &testbed.topo.nodes {
        remove_kube_proxy(node, KubeProxy::Iptables, IpFamily::V4)?;
    }
    println!(
        "\nEvery rated point {} times, the setups in a shuffled order each time (seed {}: \
         `--seed {}` repeats it); a percentile is printed only where a run has at least {} \
         requests beyond it.",
        sweep.point_runs, sweep.seed, sweep.seed, MIN_SAMPLES_BEYOND
    );
    print_tables(&rows, &testbed.unavailable);
    for line in &sweep.skipped {
        println!("\n{line}");
    }
    if let Some(dir) = opts.output.dir() {
        remove_old_charts(dir)?;
        plot_rows(dir, &rows)?;
    }
    let document = Document {
        machine: Some(Machine::describe()),
        offloads: testbed.topo.offloads()?,
        rows,
        unavailable: testbed.unavailable.clone(),
    };
    opts.output.write(&document, "latency.json")?;
    testbed.stop();
    Ok(())
}

/// `--replot DIR`: the tables and charts of an earlier run.
fn replot(dir: &std::path::Path) -> Result<()> {
    let path = dir.join("latency.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let document: Document = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a `bench latency` result", path.display()))?;
    print_tables(&document.rows, &document.unavailable);
    plot_rows(dir, &document.rows)?;
    eprintln!("redrew the charts in {}", dir.display());
    Ok(())
}
