//! `underpass`: the node agent and its tools.

use std::{net::SocketAddrV4, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use datapath_user::{demo, netns, workload};

#[derive(Parser)]
#[command(
    name = "underpass",
    version,
    about = "eBPF ClusterIP datapath for underlay (macvlan/SR-IOV/ipvlan) pods",
    long_about = "underpass translates Kubernetes ClusterIPs to endpoints on the pod's own \
                  interface (TC egress/ingress) and at connect() time (cgroup socket-LB), \
                  replacing kube-proxy's veth detour for underlay pods."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build a two-node topology in fresh network namespaces, program a
    /// Service, and show requests crossing its ClusterIP on the TC path and
    /// the socket-LB path, with the datapath's counters. Removes everything
    /// it created on exit (also on Ctrl-C). Needs root.
    Demo,
    /// Send requests from inside a namespace (and cgroup) and print, per
    /// request, the answering server and the peer address the socket
    /// reports, as JSON lines. Used by the tests and the demo to run a
    /// client under socket-LB, which only sees processes in its cgroup.
    #[command(hide = true)]
    Probe(ProbeArgs),
}

#[derive(Parser)]
struct ProbeArgs {
    /// Network namespace to enter (name under /var/run/netns, or a path).
    #[arg(long)]
    netns: Option<String>,
    /// cgroup v2 directory to join before opening any socket.
    #[arg(long)]
    cgroup: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = ProbeProtocol::Tcp)]
    protocol: ProbeProtocol,
    /// Where to send: the ClusterIP and port.
    #[arg(long)]
    target: SocketAddrV4,
    /// Number of requests, each on a new connection / socket.
    #[arg(long, default_value_t = 1)]
    count: u32,
    /// Per-request timeout in milliseconds.
    #[arg(long, default_value_t = 2000)]
    timeout_ms: u64,
}

#[derive(Clone, Copy, ValueEnum)]
enum ProbeProtocol {
    /// A TCP connection per request.
    Tcp,
    /// An unconnected UDP socket per request (sendto/recvfrom, like DNS).
    Udp,
    /// A connected UDP socket per request (connect/send/recv).
    UdpConnected,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo => demo::run(),
        Command::Probe(args) => probe(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn probe(args: ProbeArgs) -> Result<()> {
    // Still single-threaded: joining the cgroup and the namespace here
    // covers every socket this process opens.
    if let Some(cgroup) = &args.cgroup {
        std::fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string())
            .with_context(|| format!("joining cgroup {}", cgroup.display()))?;
    }
    if let Some(name) = &args.netns {
        let path = netns::path_of(name);
        netns::enter(&path)
            .with_context(|| format!("entering network namespace {}", path.display()))?;
    }
    let timeout = Duration::from_millis(args.timeout_ms);
    for _ in 0..args.count {
        let answer = match args.protocol {
            ProbeProtocol::Tcp => workload::tcp_request(args.target, timeout),
            ProbeProtocol::Udp => workload::udp_request(args.target, timeout),
            ProbeProtocol::UdpConnected => workload::connected_udp_request(args.target, timeout),
        };
        let line = match answer {
            Ok(a) => serde_json::json!({ "server": a.server, "peer": a.peer.to_string() }),
            Err(e) => serde_json::json!({ "error": e.to_string(), "errno": e.raw_os_error() }),
        };
        println!("{line}");
    }
    Ok(())
}
