//! `bench pod-ip`: the seed's Pod IP section on our two-node topology —
//! macvlan pods on one subnet, macvlan pods across subnets (through the
//! gateway), veth pods routed by their nodes (the Calico/Cilium wiring,
//! no tunnel), and node to node — interleaved in one run.

use std::{collections::BTreeMap, net::SocketAddrV4, path::PathBuf};

use anyhow::{Context, Result, ensure};
use clap::{Parser, ValueEnum};
use lab::{PodSpec, Topology, standard_pods, topology::NODE_ADDRESSES};
use serde::Serialize;

use crate::{
    cluster_ip::{SeedRow, print_tables, run_worker, write_charts},
    seed::{self, PodIpRow},
    workload::{ECHO_PORT, Kind, Measurement, start_echo_server, start_tool_servers},
};

/// How the client reaches the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Topo {
    /// macvlan pods on the same subnet (server on the other node).
    Macvlan,
    /// macvlan pods on two subnets, routed through the gateway.
    MacvlanRouted,
    /// veth pods routed by their nodes, no tunnel.
    VethRouted,
    /// Node namespace to node namespace.
    Node,
}

impl Topo {
    pub const ALL: [Topo; 4] = [
        Topo::Macvlan,
        Topo::MacvlanRouted,
        Topo::VethRouted,
        Topo::Node,
    ];
}

impl SeedRow for Topo {
    fn label(self) -> &'static str {
        match self {
            Topo::Macvlan => "macvlan, same subnet",
            Topo::MacvlanRouted => "macvlan, across subnets",
            Topo::VethRouted => "veth, routed by the nodes",
            Topo::Node => "node to node",
        }
    }

    /// The seed's Pod IP figures (`seed::pod_ip`).
    fn seed(self, kind: Kind) -> Option<f64> {
        let row = match self {
            Topo::Macvlan => PodIpRow::Macvlan,
            Topo::MacvlanRouted => PodIpRow::MacvlanRouted,
            Topo::VethRouted => PodIpRow::VethRouted,
            Topo::Node => PodIpRow::Node,
        };
        seed::pod_ip(row, kind)
    }
}

#[derive(Parser, Debug)]
pub struct PodIpOpts {
    /// Topologies (comma-separated); default: all.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub topology: Vec<Topo>,
    /// Workloads (comma-separated); default: all.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub workload: Vec<Kind>,
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Every row in seconds (one run, short measurements).
    #[arg(long)]
    pub quick: bool,
    /// Also write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write pod-ip.json and one SVG bar chart per workload
    /// (pod-ip-<workload>.svg) into this directory.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct Row {
    workload: Kind,
    topology: Topo,
    runs: Vec<Measurement>,
}

pub fn run(opts: &PodIpOpts) -> Result<()> {
    crate::require_root("the Pod IP bench (network namespaces)")?;
    if let Some(dir) = &opts.out {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let topos = if opts.topology.is_empty() {
        Topo::ALL.to_vec()
    } else {
        opts.topology.clone()
    };
    let kinds = if opts.workload.is_empty() {
        Kind::ALL.to_vec()
    } else {
        opts.workload.clone()
    };
    let (runs, seconds) = if opts.quick {
        (1, 0.3)
    } else {
        (opts.runs.max(1), opts.seconds)
    };
    lab::cleanup_on_signals();
    eprintln!("building the topologies…");
    let pods: Vec<PodSpec> = standard_pods()
        .into_iter()
        .filter(|p| p.role != "server-a")
        .collect();
    let mut topo = Topology::build(&pods)?;
    for (role, node, address) in [
        ("vclient", 0, [10, 79, 1, 2]),
        ("vserver", 1, [10, 79, 2, 2]),
    ] {
        topo.add_veth_pod(&PodSpec {
            role,
            node,
            address: address.into(),
        })?;
    }
    let tools = kinds
        .iter()
        .any(|k| !matches!(k, Kind::Latency | Kind::Rr | Kind::Crr));
    let mut servers = Vec::new();
    let server_ends = [
        (
            &topo.pod("server-b").namespace,
            topo.pod("server-b").address,
        ),
        (
            &topo.pod("server-c").namespace,
            topo.pod("server-c").address,
        ),
        (&topo.pod("vserver").namespace, topo.pod("vserver").address),
        (&topo.nodes[1], NODE_ADDRESSES[1]),
    ];
    for (namespace, address) in server_ends {
        start_echo_server(namespace, address, ECHO_PORT, Some(1))?;
        if tools {
            servers.extend(start_tool_servers(namespace, address, 1)?);
        }
    }
    for namespace in [
        &topo.pod("client").namespace,
        &topo.pod("vclient").namespace,
        &topo.nodes[0],
    ] {
        namespace.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
        namespace.sysctl("net.ipv4.ip_local_port_range", "10000 65535")?;
    }

    let mut rows: BTreeMap<(Kind, Topo), Vec<Measurement>> = BTreeMap::new();
    let total = runs * kinds.len() * topos.len();
    let mut done = 0;
    for run in 0..runs {
        for &kind in &kinds {
            for &path in &topos {
                done += 1;
                eprint!(
                    "\r[{done}/{total}] run {} {kind:?} {:<28}",
                    run + 1,
                    path.label()
                );
                let (netns, server) = match path {
                    Topo::Macvlan => (
                        topo.pod("client").namespace.path(),
                        topo.pod("server-b").address,
                    ),
                    Topo::MacvlanRouted => (
                        topo.pod("client").namespace.path(),
                        topo.pod("server-c").address,
                    ),
                    Topo::VethRouted => (
                        topo.pod("vclient").namespace.path(),
                        topo.pod("vserver").address,
                    ),
                    Topo::Node => (topo.nodes[0].path(), NODE_ADDRESSES[1]),
                };
                let target = SocketAddrV4::new(server, kind.port());
                let measurement = run_worker(netns, None, kind, target.into(), seconds)
                    .with_context(|| format!("{kind:?} over {}", path.label()))?;
                ensure!(
                    measurement.transactions > 0,
                    "{kind:?} over {}: nothing completed",
                    path.label()
                );
                rows.entry((kind, path)).or_default().push(measurement);
            }
        }
    }
    eprintln!();
    print_tables(
        &rows,
        &kinds,
        &topos,
        &[
            (Topo::MacvlanRouted, Topo::Macvlan),
            (Topo::VethRouted, Topo::Macvlan),
            (Topo::Macvlan, Topo::Node),
        ],
    );
    if let Some(dir) = &opts.out {
        write_charts(&rows, &kinds, &topos, dir, "pod-ip")?;
    }
    let rows: Vec<Row> = rows
        .into_iter()
        .map(|((workload, topology), runs)| Row {
            workload,
            topology,
            runs,
        })
        .collect();
    crate::write_results(
        &rows,
        opts.json.as_deref(),
        opts.out.as_deref(),
        "pod-ip.json",
    )?;
    if let Some(dir) = &opts.out {
        eprintln!("wrote pod-ip.json and the charts to {}", dir.display());
    }
    drop(servers);
    drop(topo);
    Ok(())
}
