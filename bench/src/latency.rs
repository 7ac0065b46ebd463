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

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use lab::{
    Cgroup, PodSpec, Topology,
    topology::{self, NODE_ADDRESSES},
};
use serde::{Deserialize, Serialize};

use crate::{
    agent_process::{AgentProcess, start_bench_agent},
    cluster::{
        KubeProxy, SERVICE_CIDR, install_kube_proxy, remove_kube_proxy, run_in, service_objects,
    },
    kubeproxy::service_ports,
    loadgen::{LoadResult, LoadSpec, QUANTILES, run_load},
    nginx::{self, HTTP_PORT, Nginx},
    plot::{self, Axes, Series},
    workload::enter_client,
};

/// A container network design (how the client reaches the server).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, ValueEnum, Serialize, Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Design {
    /// Host network: node namespace to node namespace (the reference).
    Host,
    /// macvlan pods on the nodes' wire, same subnet.
    Macvlan,
    /// ipvlan (L2) pods on the nodes' wire; needs CONFIG_IPVLAN.
    Ipvlan,
    /// veth pods routed by their nodes (flannel host-gw, Calico).
    VethRouted,
    /// veth pods on a bridge per node, the nodes joined by VXLAN
    /// (flannel vxlan).
    Vxlan,
    /// veth pods, the nodes routing through a third "router" namespace
    /// (flannel aws-vpc: the VPC's route table).
    Router,
    /// macvlan client to a ClusterIP through kube-proxy's iptables rules
    /// (Spiderpool's coordinator veth), server a macvlan pod.
    KubeProxy,
    /// macvlan client to a ClusterIP through underpass TC.
    Underpass,
    /// macvlan client (in the socket-LB cgroup) to a ClusterIP through
    /// underpass socket-LB.
    SocketLb,
    /// veth pod (host-gw) to a ClusterIP through kube-proxy's rules on its
    /// node (Calico or flannel host-gw with kube-proxy).
    VethKubeProxy,
    /// VXLAN overlay pod to a ClusterIP through kube-proxy's rules on its
    /// node (flannel vxlan with kube-proxy).
    VxlanKubeProxy,
}

impl Design {
    pub const ALL: [Design; 11] = [
        Design::Host,
        Design::Macvlan,
        Design::Ipvlan,
        Design::VethRouted,
        Design::Vxlan,
        Design::Router,
        Design::KubeProxy,
        Design::Underpass,
        Design::SocketLb,
        Design::VethKubeProxy,
        Design::VxlanKubeProxy,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Design::Host => "host network",
            Design::Macvlan => "macvlan",
            Design::Ipvlan => "ipvlan L2",
            Design::VethRouted => "veth, routed (host-gw)",
            Design::Vxlan => "veth + bridge, VXLAN overlay",
            Design::Router => "veth, via router (aws-vpc)",
            Design::KubeProxy => "macvlan → ClusterIP, kube-proxy",
            Design::Underpass => "macvlan → ClusterIP, underpass TC",
            Design::SocketLb => "macvlan → ClusterIP, underpass socket-LB",
            Design::VethKubeProxy => "veth (host-gw) → ClusterIP, kube-proxy",
            Design::VxlanKubeProxy => "VXLAN → ClusterIP, kube-proxy",
        }
    }

    /// Reaches its server through kube-proxy's rules on the client's node.
    fn through_kube_proxy(self) -> bool {
        matches!(
            self,
            Design::KubeProxy | Design::VethKubeProxy | Design::VxlanKubeProxy
        )
    }

    /// Reaches a ClusterIP (any datapath).
    fn is_cluster_ip(self) -> bool {
        self.through_kube_proxy() || matches!(self, Design::Underpass | Design::SocketLb)
    }

    /// The Pod IP design whose pods a ClusterIP design uses.
    fn pods_of(self) -> Design {
        match self {
            Design::VethKubeProxy => Design::VethRouted,
            Design::VxlanKubeProxy => Design::Vxlan,
            Design::KubeProxy | Design::Underpass | Design::SocketLb => Design::Macvlan,
            other => other,
        }
    }
}

/// A node tuning the seed used, measured as its own rows.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, ValueEnum, Serialize, Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Tuning {
    /// Nothing changed.
    Baseline,
    /// RPS and XPS masks (every CPU) on the wire's queues in both nodes,
    /// as the seed set on its NIC.
    RpsXps,
    /// kube-proxy's rules loaded in both nodes, so conntrack follows every
    /// flow the node sees (what a kube-proxy node costs traffic that is
    /// not for a service).
    Conntrack,
    /// As `conntrack`, plus the seed's NOTRACK rules (raw table) for all
    /// traffic not to the service CIDR. Not for ClusterIPs through
    /// kube-proxy: its NAT needs conntrack.
    Notrack,
}

impl Tuning {
    fn suffix(self) -> &'static str {
        match self {
            Tuning::Baseline => "",
            Tuning::RpsXps => " [RPS/XPS]",
            Tuning::Conntrack => " [kube-proxy loaded]",
            Tuning::Notrack => " [kube-proxy + NOTRACK]",
        }
    }

    fn kube_proxy_on_nodes(self) -> bool {
        matches!(self, Tuning::Conntrack | Tuning::Notrack)
    }
}

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
    #[arg(long, default_value_t = 3)]
    pub max_runs: usize,
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
    /// Also write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write latency.json and one SVG per size and rate (latency against
    /// percentile) into this directory.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The `underpass` binary (default: next to this one).
    #[arg(long)]
    pub underpass: Option<PathBuf>,
    /// Measure nothing: print the tables and redraw the charts of an
    /// earlier run from DIR/latency.json.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["out", "json", "quick"])]
    pub replot: Option<PathBuf>,
}

/// What latency.json holds.
#[derive(Debug, Serialize, Deserialize)]
struct Document {
    rows: Vec<Row>,
    /// Designs this kernel cannot build, and why.
    unavailable: BTreeMap<Design, String>,
}

/// One measurement.
#[derive(Debug, Serialize, Deserialize)]
pub struct Row {
    pub design: Design,
    pub tuning: Tuning,
    pub size: usize,
    /// "max", "30 % of max" or "4000/s".
    pub point: String,
    pub result: LoadResult,
}

/// The ClusterIPs: of the macvlan server, the veth server, the VXLAN
/// server.
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 80);
const VETH_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 81);
const VXLAN_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 82);
const CLIENT_CPU: usize = 0;
const SERVER_CPU: usize = 1;

/// Where each design's client runs and what it connects to.
struct Endpoint {
    netns: PathBuf,
    cgroup: Option<PathBuf>,
    target: SocketAddr,
}

struct Lab {
    topo: Topology,
    _servers: Vec<Nginx>,
    endpoints: BTreeMap<Design, Endpoint>,
    unavailable: BTreeMap<Design, String>,
    kube_proxy: Option<Vec<crate::kubeproxy::ServicePort>>,
    /// What `prepare` last set up: kube-proxy's rules per node, NOTRACK,
    /// RPS/XPS.
    state: std::cell::RefCell<NodeState>,
    agent: Option<(AgentProcess, tempfile::TempDir)>,
    _cgroup: Option<Cgroup>,
}

fn pod(role: &'static str, node: usize, address: [u8; 4]) -> PodSpec {
    PodSpec {
        role,
        node,
        address: address.into(),
    }
}

impl Lab {
    fn build(designs: &[Design], opts: &LatencyOpts) -> Result<Self> {
        let pods = [
            pod("client", 0, [10, 77, 0, 2]),
            pod("mclient", 0, [10, 77, 0, 6]),
            pod("server", 1, [10, 77, 0, 4]),
        ];
        let mut topo = Topology::build(&pods)?;
        let mut servers = vec![nginx::start(&topo.nodes[1], NODE_ADDRESSES[1], SERVER_CPU)?];
        let server = topo.pod("server").address;
        servers.push(nginx::start(
            &topo.pod("server").namespace,
            server,
            SERVER_CPU,
        )?);
        let mut endpoints = BTreeMap::new();
        let mut unavailable = BTreeMap::new();
        // Service and EndpointSlice objects for kube-proxy's rules.
        let mut services = Vec::new();
        let at = |address: Ipv4Addr| SocketAddr::V4(SocketAddrV4::new(address, HTTP_PORT));
        endpoints.insert(
            Design::Host,
            Endpoint {
                netns: topo.nodes[0].path().to_owned(),
                cgroup: None,
                target: at(NODE_ADDRESSES[1]),
            },
        );
        endpoints.insert(
            Design::Macvlan,
            Endpoint {
                netns: topo.pod("mclient").namespace.path().to_owned(),
                cgroup: None,
                target: at(server),
            },
        );
        if designs.contains(&Design::Ipvlan) {
            let added = topo
                .add_ipvlan_pod(&pod("iclient", 0, [10, 77, 0, 12]))
                .map(drop)
                .and_then(|()| {
                    topo.add_ipvlan_pod(&pod("iserver", 1, [10, 77, 0, 14]))
                        .map(drop)
                });
            match added {
                Ok(()) => {
                    let iserver = topo.pod("iserver");
                    servers.push(nginx::start(
                        &iserver.namespace,
                        iserver.address,
                        SERVER_CPU,
                    )?);
                    endpoints.insert(
                        Design::Ipvlan,
                        Endpoint {
                            netns: topo.pod("iclient").namespace.path().to_owned(),
                            cgroup: None,
                            target: at(iserver.address),
                        },
                    );
                }
                Err(error) if error.is_unsupported() => {
                    unavailable.insert(Design::Ipvlan, error.reason.clone());
                }
                Err(error) => return Err(error.into()),
            }
        }
        for (design, client, server_spec) in [
            (
                Design::VethRouted,
                pod("vclient", 0, [10, 79, 1, 2]),
                pod("vserver", 1, [10, 79, 2, 2]),
            ),
            (
                Design::Vxlan,
                pod("xclient", 0, [10, 244, 1, 2]),
                pod("xserver", 1, [10, 244, 2, 2]),
            ),
            (
                Design::Router,
                pod("rclient", 0, [10, 80, 1, 2]),
                pod("rserver", 1, [10, 80, 2, 2]),
            ),
        ] {
            if !designs.iter().any(|d| d.pods_of() == design) {
                continue;
            }
            let building = || format!("building the {} design", design.label());
            for spec in [&client, &server_spec] {
                match design {
                    Design::Vxlan => topo.add_overlay_pod(spec),
                    Design::Router => topo.add_veth_pod_via_router(spec),
                    _ => topo.add_veth_pod(spec),
                }
                .with_context(building)?;
            }
            let server_pod = topo.pod(server_spec.role);
            servers.push(
                nginx::start(&server_pod.namespace, server_pod.address, SERVER_CPU)
                    .with_context(building)?,
            );
            let client_netns = topo.pod(client.role).namespace.path().to_owned();
            endpoints.insert(
                design,
                Endpoint {
                    netns: client_netns.clone(),
                    cgroup: None,
                    target: at(server_pod.address),
                },
            );
            let through_node = match design {
                Design::VethRouted => Some((Design::VethKubeProxy, VETH_VIP)),
                Design::Vxlan => Some((Design::VxlanKubeProxy, VXLAN_VIP)),
                _ => None,
            };
            if let Some((service_design, vip)) = through_node
                && designs.contains(&service_design)
            {
                let (service, slice) = service_objects(
                    &format!("latency-{}", server_spec.role),
                    vip,
                    &[(HTTP_PORT, HTTP_PORT)],
                    &[server_pod.address],
                );
                services.push((service, slice));
                endpoints.insert(
                    service_design,
                    Endpoint {
                        netns: client_netns,
                        cgroup: None,
                        target: at(vip),
                    },
                );
            }
        }
        let (service, slice) =
            service_objects("latency", VIP, &[(HTTP_PORT, HTTP_PORT)], &[server]);
        services.push((service.clone(), slice.clone()));
        let (all_services, all_slices): (Vec<_>, Vec<_>) = services.into_iter().unzip();
        let kube_proxy = service_ports(&all_services, &all_slices);
        if designs.contains(&Design::KubeProxy) {
            topo.add_coordinator_veth("client")?;
            endpoints.insert(
                Design::KubeProxy,
                Endpoint {
                    netns: topo.pod("client").namespace.path().to_owned(),
                    cgroup: None,
                    target: at(VIP),
                },
            );
        }
        let mut agent = None;
        let mut cgroup = None;
        if designs
            .iter()
            .any(|d| matches!(d, Design::Underpass | Design::SocketLb))
        {
            let group = Cgroup::create(&format!("{}-latency", topo.prefix))?;
            agent = Some(start_bench_agent(
                opts.underpass.as_deref(),
                &topo,
                &group,
                &service,
                &slice,
            )?);
            endpoints.insert(
                Design::Underpass,
                Endpoint {
                    netns: topo.pod("client").namespace.path().to_owned(),
                    cgroup: None,
                    target: at(VIP),
                },
            );
            // The client without TC: only connect-time translation.
            endpoints.insert(
                Design::SocketLb,
                Endpoint {
                    netns: topo.pod("mclient").namespace.path().to_owned(),
                    cgroup: Some(group.path().to_owned()),
                    target: at(VIP),
                },
            );
            cgroup = Some(group);
        }
        // Many short-lived sockets per run: as in the other benches.
        for namespace in [&topo.nodes[0]]
            .into_iter()
            .chain(topo.pods.iter().map(|p| &p.namespace))
        {
            namespace.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
            namespace.sysctl("net.ipv4.ip_local_port_range", "10000 65535")?;
        }
        Ok(Self {
            topo,
            _servers: servers,
            endpoints,
            unavailable,
            kube_proxy: Some(kube_proxy),
            state: Default::default(),
            agent,
            _cgroup: cgroup,
        })
    }

    /// Readies the nodes for `design` under `tuning`: kube-proxy's rules
    /// where the design or tuning has them (and the client's service
    /// route through its node for the kube-proxy design), NOTRACK, RPS/XPS.
    fn prepare(&self, design: Design, tuning: Tuning) -> Result<()> {
        let ports = self.kube_proxy.as_deref().unwrap_or_default();
        let want = NodeState {
            kube_proxy: [
                design.through_kube_proxy() || tuning.kube_proxy_on_nodes(),
                tuning.kube_proxy_on_nodes(),
            ],
            notrack: tuning == Tuning::Notrack,
            rps_xps: tuning == Tuning::RpsXps,
        };
        let mut state = self.state.borrow_mut();
        for (n, node) in self.topo.nodes.iter().enumerate() {
            if state.kube_proxy[n] != want.kube_proxy[n] {
                let _ = remove_kube_proxy(node, KubeProxy::Iptables);
                if want.kube_proxy[n] {
                    install_kube_proxy(node, ports, KubeProxy::Iptables, None)?;
                }
            }
            if state.notrack != want.notrack {
                set_notrack(node, want.notrack)?;
            }
            if state.rps_xps != want.rps_xps {
                set_rps_xps(node, want.rps_xps)?;
            }
        }
        *state = want;
        if self.endpoints.contains_key(&Design::KubeProxy) {
            self.topo
                .route_via_node("client", SERVICE_CIDR, design == Design::KubeProxy)?;
        }
        Ok(())
    }

    fn measure(
        &self,
        (design, tuning): (Design, Tuning),
        size: usize,
        rate: Option<f64>,
        shape: &Shape,
    ) -> Result<LoadResult> {
        self.prepare(design, tuning)?;
        let endpoint = &self.endpoints[&design];
        let mut command = Command::new(std::env::current_exe()?);
        command
            .arg("http-load")
            .arg("--netns")
            .arg(&endpoint.netns)
            .args(["--cpu", &CLIENT_CPU.to_string()])
            .args(["--target", &endpoint.target.to_string()])
            .args(["--path", &format!("/{size}")])
            .args(["--connections", &shape.connections.to_string()])
            .args(["--seconds", &shape.seconds.to_string()])
            .args(["--warmup", &shape.warmup.to_string()])
            .stderr(Stdio::inherit());
        if let Some(rate) = rate {
            command.args(["--rate", &rate.to_string()]);
        }
        if let Some(cgroup) = &endpoint.cgroup {
            command.arg("--cgroup").arg(cgroup);
        }
        let output = crate::workload::owned_output(&mut command)?;
        if !output.status.success() {
            bail!("load generator failed ({})", output.status);
        }
        let result: LoadResult = serde_json::from_slice(&output.stdout)
            .context("reading the load generator's result")?;
        if result.requests == 0 {
            bail!(
                "no response from {} in {} s ({} errors, {} unanswered)",
                endpoint.target,
                shape.seconds,
                result.errors,
                result.unfinished
            );
        }
        Ok(result)
    }
}

/// What the nodes are set up with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct NodeState {
    kube_proxy: [bool; 2],
    notrack: bool,
    rps_xps: bool,
}

/// The seed's NOTRACK: every packet not to a ClusterIP skips conntrack.
fn set_notrack(node: &lab::Namespace, on: bool) -> Result<()> {
    let cidr = format!("{}/{}", SERVICE_CIDR.0, SERVICE_CIDR.1);
    let script = if on {
        format!(
            "*raw\n-A PREROUTING ! -d {cidr} -j CT --notrack\n-A OUTPUT ! -d {cidr} -j CT --notrack\nCOMMIT\n"
        )
    } else {
        "*raw\n-F PREROUTING\n-F OUTPUT\nCOMMIT\n".to_owned()
    };
    run_in(node, "iptables-restore", &["-w", "5", "--noflush"], &script)
}

/// RPS and XPS on the node's wire: every CPU may process its receive
/// queue and send on its transmit queue (mask 0 restores the default).
/// Queue files are per network namespace in sysfs, which `ip netns exec`
/// mounts for the namespace.
fn set_rps_xps(node: &lab::Namespace, on: bool) -> Result<()> {
    let cpus = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(32);
    let mask = if on { (1u64 << cpus) - 1 } else { 0 };
    let wire = topology::WIRE;
    let script = format!(
        "echo {mask:x} > /sys/class/net/{wire}/queues/rx-0/rps_cpus && \
         echo {mask:x} > /sys/class/net/{wire}/queues/tx-0/xps_cpus"
    );
    let output = Command::new("ip")
        .args(["netns", "exec", node.name(), "sh", "-c", &script])
        .output()
        .context("running ip netns exec")?;
    if !output.status.success() {
        bail!(
            "setting RPS/XPS on {wire} in {}: {}",
            node.name(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// A rate every design is measured at.
enum RatePoint {
    /// Percent of the design's own maximum.
    OfMax(f64),
    /// Requests per second, the same for all designs.
    Fixed(f64),
}

impl RatePoint {
    fn label(&self) -> String {
        match self {
            RatePoint::OfMax(percent) => format!("{percent} % of max"),
            RatePoint::Fixed(rate) => format!("{rate}/s"),
        }
    }

    fn rate(&self, max: f64) -> f64 {
        match self {
            RatePoint::OfMax(percent) => max * percent / 100.0,
            RatePoint::Fixed(rate) => *rate,
        }
    }
}

/// How every measurement is shaped.
struct Shape {
    connections: usize,
    seconds: f64,
    warmup: f64,
}

pub fn run(opts: &LatencyOpts) -> Result<()> {
    if let Some(dir) = &opts.replot {
        let path = dir.join("latency.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let document: Document = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a `bench latency` result", path.display()))?;
        print_tables(&document.rows, &document.unavailable);
        plot_rows(dir, &document.rows)?;
        eprintln!("redrew the charts in {}", dir.display());
        return Ok(());
    }
    crate::require_root("the latency bench (namespaces, nginx, eBPF, iptables)")?;
    if let Some(dir) = &opts.out {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
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
    let max_runs = if opts.quick { 1 } else { opts.max_runs.max(1) };
    let (shape, fractions, mut absolute) = if opts.quick {
        (
            Shape {
                connections: 16,
                seconds: 0.5,
                warmup: 0.2,
            },
            vec![30.0],
            Vec::new(),
        )
    } else {
        (
            Shape {
                connections: opts.connections.max(1),
                seconds: opts.seconds,
                warmup: opts.warmup,
            },
            opts.fractions.clone(),
            opts.rates.clone(),
        )
    };
    lab::cleanup_on_signals();
    eprintln!("building the designs' topologies and starting nginx…");
    let lab = Lab::build(&designs, opts)?;
    for (design, reason) in &lab.unavailable {
        eprintln!("{}: unavailable — {reason}", design.label());
    }
    let mut setups: Vec<(Design, Tuning)> = Vec::new();
    let mut skipped: Vec<String> = Vec::new();
    for &tuning in &opts.tuning {
        for &design in designs.iter().filter(|d| lab.endpoints.contains_key(d)) {
            if design.through_kube_proxy() && tuning == Tuning::Notrack {
                skipped.push(format!(
                    "{}{}: not measured — kube-proxy's NAT needs conntrack",
                    design.label(),
                    tuning.suffix()
                ));
                continue;
            }
            setups.push((design, tuning));
        }
    }
    let label =
        |(design, tuning): (Design, Tuning)| format!("{}{}", design.label(), tuning.suffix());
    let mut rows = Vec::new();
    // Without --rates: 30 % and 50 % of the host network's maximum at each
    // response size.
    let derive_rates = absolute.is_empty() && !opts.quick;
    let absolute_count = if derive_rates {
        2 // derived from the host network's maximum, below
    } else {
        absolute.len()
    };
    let per_size = setups.len() * (max_runs + fractions.len() + absolute_count);
    let total = per_size * opts.size.len();
    let mut done = 0;
    let mut progress = |what: &str| {
        done += 1;
        eprint!("\r[{done}/{total}] {what:<64}");
    };
    for &size in &opts.size {
        // The closed-loop maximum swings by ±20 % run to run on a small
        // VM: take the median of `max_runs`, setups interleaved.
        let mut maxima: BTreeMap<(Design, Tuning), Vec<LoadResult>> = BTreeMap::new();
        for run in 0..max_runs {
            for &setup in &setups {
                progress(&format!(
                    "{size} B, maximum rate ({}/{max_runs}), {}",
                    run + 1,
                    label(setup)
                ));
                let result = lab
                    .measure(setup, size, None, &shape)
                    .with_context(|| format!("{} at the maximum rate", label(setup)))?;
                maxima.entry(setup).or_default().push(result);
            }
        }
        let mut max = BTreeMap::new();
        for &setup in &setups {
            let mut results = maxima.remove(&setup).unwrap_or_default();
            results.sort_by(|a, b| a.achieved_rate.total_cmp(&b.achieved_rate));
            let result = results.swap_remove(results.len() / 2);
            max.insert(setup, result.achieved_rate);
            rows.push(Row {
                design: setup.0,
                tuning: setup.1,
                size,
                point: "max".into(),
                result,
            });
        }
        if derive_rates {
            let reference = max
                .get(&(Design::Host, Tuning::Baseline))
                .or_else(|| max.values().next())
                .copied()
                .unwrap_or(1000.0);
            absolute = [0.3, 0.5]
                .iter()
                .map(|f| ((reference * f / 500.0).floor() * 500.0).max(500.0))
                .collect();
        }
        let points: Vec<RatePoint> = fractions
            .iter()
            .map(|&f| RatePoint::OfMax(f))
            .chain(absolute.iter().map(|&r| RatePoint::Fixed(r)))
            .collect();
        for point in &points {
            let point_label = point.label();
            // Every setup at this rate before the next: drift on the
            // machine hits them alike.
            for &setup in &setups {
                progress(&format!("{size} B, {point_label}, {}", label(setup)));
                let rate = point.rate(max[&setup]).max(1.0);
                let result = lab
                    .measure(setup, size, Some(rate), &shape)
                    .with_context(|| format!("{} at {rate:.0} requests/s", label(setup)))?;
                rows.push(Row {
                    design: setup.0,
                    tuning: setup.1,
                    size,
                    point: point_label.clone(),
                    result,
                });
            }
        }
    }
    eprintln!();
    for node in &lab.topo.nodes {
        let _ = remove_kube_proxy(node, KubeProxy::Iptables);
    }
    print_tables(&rows, &lab.unavailable);
    for line in &skipped {
        println!("\n{line}");
    }
    if let Some(dir) = &opts.out {
        remove_old_charts(dir)?;
        plot_rows(dir, &rows)?;
    }
    let document = Document {
        rows,
        unavailable: lab.unavailable.clone(),
    };
    crate::write_results(
        &document,
        opts.json.as_deref(),
        opts.out.as_deref(),
        "latency.json",
    )?;
    let Lab { agent, .. } = lab;
    if let Some((mut agent, _manifests)) = agent {
        agent.stop();
    }
    Ok(())
}

fn percentile_label(q: f64) -> String {
    let text = format!("{:.3}", q * 100.0);
    let text = text.trim_end_matches('0').trim_end_matches('.');
    format!("p{text}")
}

fn print_tables(rows: &[Row], unavailable: &BTreeMap<Design, String>) {
    let mut groups: BTreeMap<(usize, usize), (&str, Vec<&Row>)> = BTreeMap::new();
    // Keep the measurement order of points within a size.
    let mut order: Vec<(usize, String)> = Vec::new();
    for row in rows {
        if !order.contains(&(row.size, row.point.clone())) {
            order.push((row.size, row.point.clone()));
        }
        let index = order
            .iter()
            .position(|o| *o == (row.size, row.point.clone()))
            .unwrap_or(0);
        groups
            .entry((row.size, index))
            .or_insert((row.point.as_str(), Vec::new()))
            .1
            .push(row);
    }
    for ((size, _), (point, rows)) in groups {
        let bytes = rows
            .first()
            .map(|r| r.result.response_bytes)
            .unwrap_or_default();
        let point = if point == "max" {
            "maximum (closed loop, median run)"
        } else {
            point
        };
        println!("\n### {size}-byte responses ({bytes} B received), {point}\n");
        let header: Vec<String> = QUANTILES.iter().map(|&q| percentile_label(q)).collect();
        println!(
            "| design | requests/s (asked) | {} | max | kept the rate |",
            header.join(" | ")
        );
        println!("|---|---|{}---|---|", "---|".repeat(QUANTILES.len()));
        for row in rows {
            let r = &row.result;
            let asked = r
                .target_rate
                .map(|t| format!(" ({t:.0})"))
                .unwrap_or_default();
            let cells: Vec<String> = r
                .percentiles_us
                .iter()
                .map(|us| format!("{:.3}", us / 1e3))
                .collect();
            println!(
                "| {}{} | {:.0}{asked} | {} | {:.3} | {} |",
                row.design.label(),
                row.tuning.suffix(),
                r.achieved_rate,
                cells.join(" | "),
                r.max_us / 1e3,
                match (r.target_rate, r.sustained, r.errors) {
                    (_, _, e) if e > 0 => format!("{e} errors"),
                    (None, _, _) => "closed loop".into(),
                    (Some(_), true, _) => "yes".into(),
                    (Some(_), false, _) => format!("no (backlog {})", r.max_backlog),
                }
            );
        }
        println!("\nLatency in ms from each request's scheduled send time.");
    }
    for (design, reason) in unavailable {
        println!("\n{}: not measured — {reason}", design.label());
    }
}

/// Charts of an earlier run in `dir` (their rates differ from this
/// run's): removed so the folder shows one run.
fn remove_old_charts(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if name.starts_with("latency-") && name.ends_with(".svg") {
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    Ok(())
}

/// One chart per size and rate: latency against percentile (log scale),
/// a line per design.
fn plot_rows(dir: &Path, rows: &[Row]) -> Result<()> {
    let mut charts: BTreeMap<(usize, String), Vec<&Row>> = BTreeMap::new();
    for row in rows.iter().filter(|r| r.point != "max") {
        charts
            .entry((row.size, row.point.clone()))
            .or_default()
            .push(row);
    }
    for ((size, point), rows) in charts {
        let series: Vec<Series> = rows
            .iter()
            .map(|row| Series {
                label: format!("{}{}", row.design.label(), row.tuning.suffix()),
                points: QUANTILES
                    .iter()
                    .zip(&row.result.percentiles_us)
                    .map(|(&q, &us)| (nines(q), us / 1e3))
                    .collect(),
                colour: Design::ALL
                    .iter()
                    .position(|d| *d == row.design)
                    .unwrap_or(0),
                dashed: row.tuning != Tuning::Baseline || row.design.is_cluster_ip(),
            })
            .collect();
        let slug: String = point
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect::<String>()
            .split('-')
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join("-");
        let title = format!("{size}-byte responses, {point}");
        plot::lines(
            &dir.join(format!("latency-{size}-{slug}.svg")),
            &Axes {
                title: &title,
                x: "percentile",
                y: "latency (ms)",
                log_x: false,
                log_y: true,
                x_label: nines_label,
                x_ticks: Some((0.0, 5.0, 6)),
            },
            &series,
        )?;
    }
    Ok(())
}

/// A percentile on the "nines" axis: 0.9 → 1, 0.99 → 2, 0.999 → 3.
fn nines(q: f64) -> f64 {
    -(1.0 - q).log10()
}

fn nines_label(x: f64) -> String {
    if x < 0.5 {
        return String::new();
    }
    percentile_label(1.0 - 10f64.powf(-x))
}

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
