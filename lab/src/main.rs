//! `underpass-lab`: the lab's commands. `demo` shows the datapath on the
//! built-in topology; `probe` is the client the tests and the demo run as
//! a pod's process.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use datapath_user::netns;
use lab::{demo, workload};

#[derive(Parser)]
#[command(
    name = "underpass-lab",
    version,
    about = "underpass's network lab: the demo, and the probe client the tests run inside pods"
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
    /// Where to send: the ClusterIP and port (`10.96.0.10:53`,
    /// `[fd00:10:96::a]:53`).
    #[arg(long)]
    target: SocketAddr,
    /// Number of requests, each on a new connection / socket.
    #[arg(long, default_value_t = 1)]
    count: u32,
    /// Per-request timeout in milliseconds.
    #[arg(long, default_value_t = 2000)]
    timeout_ms: u64,
    /// Use an AF_INET6 socket and the target's IPv4-mapped address
    /// (`::ffff:<ClusterIP>`), as JVMs and dual-stack runtimes do.
    #[arg(long)]
    ipv4_mapped: bool,
    /// Keep one socket (a TCP connection, a connected or an unconnected
    /// UDP socket) and send a request on it for every line read from
    /// stdin, until stdin closes; --count is ignored.
    #[arg(long)]
    hold: bool,
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
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
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
    let target = match (args.ipv4_mapped, args.target) {
        (true, SocketAddr::V4(target)) => workload::ipv4_mapped(target),
        (true, SocketAddr::V6(_)) => anyhow::bail!("--ipv4-mapped needs an IPv4 --target"),
        (false, target) => target,
    };
    let print = |answer: std::io::Result<workload::Answer>| {
        let line = match answer {
            Ok(a) => serde_json::json!({ "server": a.server, "peer": a.peer.to_string() }),
            Err(e) => serde_json::json!({ "error": e.to_string(), "errno": e.raw_os_error() }),
        };
        println!("{line}");
    };
    if args.hold {
        let kind = match args.protocol {
            ProbeProtocol::Tcp => workload::ProbeKind::Tcp,
            ProbeProtocol::Udp => workload::ProbeKind::Udp,
            ProbeProtocol::UdpConnected => workload::ProbeKind::UdpConnected,
        };
        let mut held = workload::HeldSocket::open(kind, target, timeout);
        for line in std::io::stdin().lines() {
            line.context("reading stdin")?;
            print(match &mut held {
                Ok(socket) => socket.ask(),
                // The socket could not even be opened: every request
                // fails the same way (errno kept).
                Err(e) => Err(e.raw_os_error().map_or_else(
                    || std::io::Error::new(e.kind(), e.to_string()),
                    std::io::Error::from_raw_os_error,
                )),
            });
        }
        return Ok(());
    }
    for _ in 0..args.count {
        print(match args.protocol {
            ProbeProtocol::Tcp => workload::tcp_request(target, timeout),
            ProbeProtocol::Udp => workload::udp_request(target, timeout),
            ProbeProtocol::UdpConnected => workload::connected_udp_request(target, timeout),
        });
    }
    Ok(())
}
