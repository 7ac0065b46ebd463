//! `bench http-load`: the load generator run inside a design's client
//! namespace (and cgroup, on its own CPU), as its own process so that
//! entering them changes nothing in the bench.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Result;
use clap::Parser;

use crate::{
    loadgen::{LoadSpec, run_load},
    workload::enter_client,
};

/// `bench http-load`: one load-generator run inside a namespace (and
/// cgroup, and on a CPU), printing its [`LoadResult`] as JSON.
#[derive(Parser, Debug)]
pub struct HttpLoadOpts {
    #[arg(long)]
    pub netns: PathBuf,
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    #[arg(long)]
    pub cpu: Option<usize>,
    #[arg(long)]
    pub target: SocketAddr,
    #[arg(long, default_value = "/350")]
    pub path: String,
    /// Requests per second; without it, closed loop (the maximum).
    #[arg(long)]
    pub rate: Option<f64>,
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
}

pub fn http_load(opts: &HttpLoadOpts) -> Result<()> {
    enter_client(&opts.netns, opts.cgroup.as_deref(), opts.cpu)?;
    let result = run_load(&LoadSpec {
        target: opts.target,
        path: opts.path.clone(),
        rate: opts.rate,
        connections: opts.connections,
        duration: Duration::from_secs_f64(opts.seconds),
        warmup: Duration::from_secs_f64(opts.warmup),
    })?;
    println!("{}", serde_json::to_string(&result)?);
    Ok(())
}
