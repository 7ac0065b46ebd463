//! `bench`: speed figures for underpass. Speed goals live here, never in
//! timed tests.

pub mod agent;
pub mod agent_edit_latency;
pub mod agent_process;
pub mod cluster;
pub mod cluster_ip;
pub mod datapath;
pub mod family;
pub mod kubeproxy;
pub mod latency;
pub mod leftovers;
pub mod loadgen;
pub mod machine;
pub mod nginx;
pub mod options;
pub mod plot;
pub mod program_stats;
pub mod scale;
pub mod seed;
pub mod stats;
pub mod sweep_objects;
pub mod workload;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "bench",
    version,
    about = "Benchmarks for the underpass datapath"
)]
pub struct Opts {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Per-packet cost of the TC programs, measured in the kernel with
    /// BPF_PROG_TEST_RUN (repeat) on the real object: conntrack hit,
    /// reverse NAT, and traffic that is not for a service. Needs root.
    Datapath(datapath::DatapathOpts),
    /// The seed's ClusterIP table on the two-node topology: kube-proxy
    /// (iptables, nftables), underpass TC and socket-LB, veth pods through
    /// kube-proxy (Calico's row) and underpass (Cilium's), the Pod IP and
    /// node to node, interleaved in one run. Needs root.
    ClusterIp(cluster_ip::ClusterIpOpts),
    /// The seed's Pod IP table: macvlan on one subnet, macvlan across
    /// subnets, veth pods routed by their nodes, node to node; the same
    /// bench as `cluster-ip --preset pod-ip`. Needs root.
    PodIp(cluster_ip::ClusterIpOpts),
    /// North-south: a client outside the cluster to a node's nodePort,
    /// of a pod on that node and of one on the other, through
    /// kube-proxy's NodePort rules (iptables, nftables) and underpass's
    /// XDP program on the node's uplink, against the same client
    /// straight to the Pod IP; the same bench as `cluster-ip --preset
    /// node-port`. Needs root.
    NodePort(cluster_ip::ClusterIpOpts),
    /// Control-plane cost against the number of services: program N
    /// services × M endpoints from nothing, and apply one changed
    /// EndpointSlice, for kube-proxy iptables, nftables and underpass.
    /// Needs root.
    Scale(scale::ScaleOpts),
    /// The second seed: tail latency (p50 … p99.999) at fixed request
    /// rates, open loop, against nginx (350 B and 4 KiB responses), for
    /// host network, macvlan, ipvlan, veth routed (host-gw), veth through
    /// a router (aws-vpc) and ClusterIPs through kube-proxy and underpass.
    /// Needs root.
    Latency(latency::LatencyOpts),
    /// One load-generator run inside a namespace (used by latency).
    #[command(hide = true)]
    HttpLoad(latency::HttpLoadOpts),
    /// One client measurement inside a namespace (used by cluster-ip).
    #[command(hide = true)]
    Worker(workload::WorkerOpts),
    /// The benches' echo server inside a namespace (a process of its own,
    /// so that its CPU is counted in the servers' cgroup).
    #[command(hide = true)]
    EchoServer(workload::EchoServerOpts),
    /// The agent's control plane: sync N services × M endpoints into empty
    /// maps, apply one changed EndpointSlice (p50/p99), and the agent
    /// binary's RSS at that scale. Needs root (real BPF maps).
    Agent(agent::AgentOpts),
}

pub fn run(opts: Opts) -> anyhow::Result<()> {
    match opts.command {
        Command::Datapath(o) => datapath::run(&o),
        Command::Agent(o) => agent::run(&o),
        Command::ClusterIp(o) => cluster_ip::run(&o),
        Command::PodIp(o) => cluster_ip::run(&cluster_ip::ClusterIpOpts {
            preset: cluster_ip::Preset::PodIp,
            ..o
        }),
        Command::NodePort(o) => cluster_ip::run(&cluster_ip::ClusterIpOpts {
            preset: cluster_ip::Preset::NodePort,
            ..o
        }),
        Command::Scale(o) => scale::run(&o),
        Command::Worker(o) => workload::worker(&o),
        Command::EchoServer(o) => workload::echo_server(&o),
        Command::Latency(o) => latency::run(&o),
        Command::HttpLoad(o) => latency::http_load(&o),
    }
}

/// Fails with a message naming what needs root.
pub fn require_root(what: &str) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        anyhow::bail!("{what} needs root");
    }
    Ok(())
}
