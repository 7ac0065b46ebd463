//! `bench worker`: a client run as its own process, so that it can join
//! the client pod's namespace, the socket-LB cgroup and a CPU of its own;
//! and running one from the bench.

use std::{
    io,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};
use clap::Parser;

use super::{
    Arrivals, CLIENT_CPU, CpuPlaces, Kind, Measurement, Parameters, measure, measure_packet_rate,
};

/// `bench worker`: one client run inside a namespace (and cgroup, and on
/// a CPU), printing its [`Measurement`] as JSON.
#[derive(Parser, Debug)]
pub struct WorkerOpts {
    #[arg(long)]
    pub netns: PathBuf,
    /// cgroup v2 directory to join first (socket-LB translates only
    /// processes below the cgroup it is attached to); its `cpu.stat` is
    /// the client's CPU.
    #[arg(long)]
    pub cgroup: PathBuf,
    /// The servers' cgroup (read, not joined).
    #[arg(long)]
    pub server_cgroup: PathBuf,
    /// The agent's cgroup, if an agent runs (read, not joined).
    #[arg(long)]
    pub agent_cgroup: Option<PathBuf>,
    /// CPU to pin the client to.
    #[arg(long)]
    pub cpu: Option<usize>,
    #[arg(long, value_enum)]
    pub kind: Kind,
    #[arg(long)]
    pub target: SocketAddr,
    /// Seconds measured (time-bound workloads).
    #[arg(long, default_value_t = 2.0)]
    pub seconds: f64,
    /// Requests (redis-benchmark `-n`).
    #[arg(long, default_value_t = 100_000)]
    pub requests: u64,
    /// Leading seconds left out (iperf3 `-O`).
    #[arg(long, default_value_t = 0)]
    pub omit_seconds: u64,
    /// Where the packet-rate workload counts what arrived:
    /// `udp:<netns path>` (datagrams at that namespace's UDP layer) or
    /// `wire:<netns path>` (frames its wire received).
    #[arg(long, value_parser = Arrivals::parse)]
    pub arrivals: Option<Arrivals>,
}

pub fn worker(opts: &WorkerOpts) -> Result<()> {
    enter_client(&opts.netns, Some(&opts.cgroup), opts.cpu)?;
    let places = CpuPlaces {
        client: opts.cgroup.clone(),
        server: opts.server_cgroup.clone(),
        agent: opts.agent_cgroup.clone(),
    };
    let run = Parameters {
        seconds: opts.seconds,
        requests: opts.requests,
        omit_seconds: opts.omit_seconds,
    };
    let measurement = match (opts.kind, &opts.arrivals) {
        (Kind::PacketRate, Some(arrivals)) => {
            measure_packet_rate(opts.target, &run, &places, arrivals)?
        }
        (Kind::PacketRate, None) => bail!("--kind packet-rate needs --arrivals"),
        (kind, _) => measure(kind, opts.target, &run, &places)?,
    };
    println!("{}", serde_json::to_string(&measurement)?);
    Ok(())
}

/// Where a client runs and whose CPU it reads.
#[derive(Clone, Copy, Debug)]
pub struct ClientPlace<'a> {
    pub netns: &'a Path,
    /// Joined by the client; its CPU.
    pub cgroup: &'a Path,
    pub server_cgroup: &'a Path,
    pub agent_cgroup: Option<&'a Path>,
}

/// Runs one `bench worker` (this binary) at `place`, on [`CLIENT_CPU`],
/// and reads its measurement; `arrivals`: where the packet rate counts.
pub fn run_worker(
    place: ClientPlace<'_>,
    kind: Kind,
    target: SocketAddr,
    run: &Parameters,
    arrivals: Option<&Arrivals>,
) -> Result<Measurement> {
    let mut command = Command::new(std::env::current_exe()?);
    command
        .arg("worker")
        .arg("--netns")
        .arg(place.netns)
        .arg("--cgroup")
        .arg(place.cgroup)
        .arg("--server-cgroup")
        .arg(place.server_cgroup)
        .args(["--cpu", &CLIENT_CPU.to_string()])
        .args(["--kind", kind.arg()])
        .args(["--target", &target.to_string()])
        .args(["--seconds", &run.seconds.to_string()])
        .args(["--requests", &run.requests.to_string()])
        .args(["--omit-seconds", &run.omit_seconds.to_string()])
        .stderr(Stdio::inherit());
    if let Some(agent) = place.agent_cgroup {
        command.arg("--agent-cgroup").arg(agent);
    }
    if let Some(arrivals) = arrivals {
        command.args(["--arrivals", &arrivals.arg()]);
    }
    let output = crate::workload::owned_output(&mut command)?;
    if !output.status.success() {
        bail!("worker failed ({})", output.status);
    }
    serde_json::from_slice(&output.stdout).context("reading the worker's result")
}

/// Runs `command` to completion (stdout captured) as a child an
/// interrupted run kills ([`lab::own_child`]): a
/// worker must not outlive the namespaces and cgroup it is in.
pub fn owned_output(command: &mut std::process::Command) -> Result<std::process::Output> {
    let child = command
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("starting a bench worker")?;
    let pid = child.id();
    lab::own_child(pid);
    let output = child.wait_with_output();
    lab::disown_child(pid);
    Ok(output?)
}

/// Puts this (single-threaded, client) process where a measurement runs:
/// into `cgroup` (socket-LB translates only processes below the cgroup it
/// is attached to), onto `cpu`, then into the namespace `netns`.
pub fn enter_client(
    netns: &std::path::Path,
    cgroup: Option<&std::path::Path>,
    cpu: Option<usize>,
) -> Result<()> {
    if let Some(cgroup) = cgroup {
        std::fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string())
            .with_context(|| format!("joining cgroup {}", cgroup.display()))?;
    }
    if let Some(cpu) = cpu {
        pin_to_cpu(cpu)?;
    }
    datapath_user::netns::enter(netns).with_context(|| format!("entering {}", netns.display()))
}

/// Pins the calling thread (and what it spawns) to `cpu`.
pub fn pin_to_cpu(cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes inside it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(io::Error::last_os_error())
                .with_context(|| format!("pinning to CPU {cpu}"));
        }
    }
    Ok(())
}
