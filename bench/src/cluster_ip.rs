//! `bench cluster-ip`: the seed's ClusterIP table on our two-node
//! topology, every mode interleaved in one run: kube-proxy (iptables and
//! nftables, through the Spiderpool coordinator veth), underpass on the
//! TC path and with socket-LB (programmed by `underpass agent --from-dir`
//! from the same objects), the direct Pod IP, and node to node.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail, ensure};
use clap::{Parser, ValueEnum};
use lab::{Cgroup, PodSpec, Topology, standard_pods, topology::NODE_ADDRESSES};
use serde::Serialize;

use crate::{
    agent_process::start_bench_agent,
    cluster::{KubeProxy, SERVICE_CIDR, install_kube_proxy, remove_kube_proxy, service_objects},
    kubeproxy::service_ports,
    plot::Bar,
    workload::{
        ECHO_PORT, IPERF_PORT, Kind, Measurement, REDIS_PORT, SOCKPERF_PORT, start_echo_server,
        start_tool_servers,
    },
};

/// The datapath a measurement crosses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// kube-proxy's iptables rules, through the coordinator veth.
    KubeProxy,
    /// kube-proxy's nftables rules, through the coordinator veth.
    KubeProxyNft,
    /// underpass TC programs on the pod's macvlan.
    Ebpf,
    /// underpass socket-LB (connect-time translation).
    SocketLb,
    /// No service: straight to the server pod (the limit).
    PodIp,
    /// No service: macvlan pods on two subnets, through the gateway (the
    /// seed's Pod IP section, "across subnets").
    PodIpRouted,
    /// No service: veth pods routed by their nodes (the seed's Pod IP
    /// section, Calico's wiring).
    VethRouted,
    /// Node namespace to node namespace.
    Node,
}

/// A row of the seed's tables: a label and the seed's figure.
pub trait SeedRow: Copy + Ord + std::fmt::Debug {
    fn label(self) -> &'static str;
    fn seed(self, kind: Kind) -> Option<f64>;
}

impl SeedRow for Mode {
    fn label(self) -> &'static str {
        Mode::label(self)
    }
    fn seed(self, kind: Kind) -> Option<f64> {
        Mode::seed(self, kind)
    }
}

impl Mode {
    pub const ALL: [Mode; 8] = [
        Mode::KubeProxy,
        Mode::KubeProxyNft,
        Mode::Ebpf,
        Mode::SocketLb,
        Mode::PodIp,
        Mode::PodIpRouted,
        Mode::VethRouted,
        Mode::Node,
    ];

    fn label(self) -> &'static str {
        match self {
            Mode::KubeProxy => "macvlan + kube-proxy (iptables)",
            Mode::KubeProxyNft => "macvlan + kube-proxy (nftables)",
            Mode::Ebpf => "macvlan + underpass TC (eBPF)",
            Mode::SocketLb => "macvlan + underpass socket-LB",
            Mode::PodIp => "macvlan, Pod IP (no service)",
            Mode::PodIpRouted => "macvlan across subnets, Pod IP",
            Mode::VethRouted => "veth routed by the nodes, Pod IP",
            Mode::Node => "node to node",
        }
    }

    /// The seed's figure for this row (Spiderpool page, ClusterIP and
    /// Pod IP sections), if it has one.
    fn seed(self, kind: Kind) -> Option<f64> {
        use crate::seed::{PodIpRow, pod_ip};
        match self {
            Mode::PodIpRouted => return pod_ip(PodIpRow::MacvlanRouted, kind),
            Mode::VethRouted => return pod_ip(PodIpRow::VethRouted, kind),
            _ => {}
        }
        match (kind, self) {
            (Kind::Latency, Mode::KubeProxy) => Some(36.8),
            (Kind::Latency, Mode::Ebpf | Mode::SocketLb) => Some(27.7),
            (Kind::Latency, Mode::PodIp) => Some(24.3),
            (Kind::Latency, Mode::Node) => Some(32.2),
            (Kind::Rr, Mode::KubeProxy) => Some(16002.3),
            (Kind::Rr, Mode::Ebpf | Mode::SocketLb) => Some(18992.9),
            (Kind::Rr, Mode::PodIp) => Some(19793.9),
            (Kind::Rr, Mode::Node) => Some(47560.5),
            (Kind::Sockperf, m) => Mode::seed(m, Kind::Latency),
            (Kind::Iperf1, Mode::KubeProxy) => Some(3.42),
            (Kind::Iperf2, Mode::KubeProxy) => Some(6.75),
            (Kind::Iperf4, Mode::KubeProxy) => Some(9.24),
            (Kind::Iperf1, Mode::Ebpf | Mode::SocketLb) => Some(9.36),
            (Kind::Iperf2, Mode::Ebpf | Mode::SocketLb) => Some(9.38),
            (Kind::Iperf4, Mode::Ebpf | Mode::SocketLb) => Some(9.39),
            (Kind::Iperf1, Mode::PodIp) => Some(9.36),
            (Kind::Iperf2, Mode::PodIp) => Some(9.37),
            (Kind::Iperf4, Mode::PodIp) => Some(9.38),
            (Kind::Iperf1, Mode::Node) => Some(9.41),
            (Kind::Iperf2, Mode::Node) => Some(9.40),
            (Kind::Iperf4, Mode::Node) => Some(9.42),
            (Kind::RedisGet, Mode::KubeProxy) => Some(45578.85),
            (Kind::RedisSet, Mode::KubeProxy) => Some(46274.87),
            (Kind::RedisGet, Mode::Ebpf | Mode::SocketLb) => Some(63211.12),
            (Kind::RedisSet, Mode::Ebpf | Mode::SocketLb) => Some(64061.50),
            (Kind::RedisGet, Mode::PodIp) => Some(66357.00),
            (Kind::RedisSet, Mode::PodIp) => Some(66800.27),
            _ => None,
        }
    }
}

/// One value of `--mode`: a mode, or every mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModeArg {
    All,
    One(Mode),
}

impl ModeArg {
    /// The modes `args` name, in the order given, each once; all when
    /// none or `all` is given.
    pub fn expand(args: &[ModeArg]) -> Vec<Mode> {
        if args.is_empty() || args.contains(&ModeArg::All) {
            return Mode::ALL.to_vec();
        }
        let mut modes = Vec::new();
        for arg in args {
            if let ModeArg::One(mode) = arg
                && !modes.contains(mode)
            {
                modes.push(*mode);
            }
        }
        modes
    }
}

fn parse_mode(value: &str) -> Result<ModeArg, String> {
    if value == "all" {
        return Ok(ModeArg::All);
    }
    Mode::from_str(value, true).map(ModeArg::One)
}

#[derive(Parser, Debug)]
pub struct ClusterIpOpts {
    /// Modes to measure (comma-separated), or `all` (the default):
    /// kube-proxy, kube-proxy-nft, ebpf, socket-lb, pod-ip, pod-ip-routed,
    /// veth-routed, node.
    #[arg(long, value_delimiter = ',', value_parser = parse_mode)]
    pub mode: Vec<ModeArg>,
    /// Workloads (comma-separated); default: all.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub workload: Vec<Kind>,
    /// Repetitions of every measurement (min/median/max are reported).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Every row in seconds (0.3 s per measurement, one run): checks the
    /// whole pipeline; asserts nothing about speed.
    #[arg(long)]
    pub quick: bool,
    /// Also write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write cluster-ip.json and one SVG bar chart per workload
    /// (cluster-ip-<workload>.svg) into this directory.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The `underpass` binary (default: next to this one).
    #[arg(long)]
    pub underpass: Option<PathBuf>,
}

/// The service every mode reaches.
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const SERVER_PORT: u16 = ECHO_PORT;
/// Client and server on different CPUs (2-core machine: one each).
const CLIENT_CPU: usize = 0;
const SERVER_CPU: usize = 1;

#[derive(Debug, Serialize)]
pub struct Row {
    pub workload: Kind,
    pub mode: Mode,
    pub runs: Vec<Measurement>,
}

pub fn run(opts: &ClusterIpOpts) -> Result<()> {
    crate::require_root("the ClusterIP bench (namespaces, eBPF, iptables)")?;
    if let Some(dir) = &opts.out {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let modes = ModeArg::expand(&opts.mode);
    let kinds: Vec<Kind> = if opts.workload.is_empty() {
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
    // client → server-b: the ClusterIP modes, Pod IP; → server-c (the
    // other subnet): across subnets; vclient → vserver: veth pods.
    let pods: Vec<PodSpec> = standard_pods()
        .into_iter()
        .filter(|p| p.role != "server-a")
        .collect();
    eprintln!("building the two-node topology…");
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
    let topo = topo;
    let server = topo.pod("server-b");
    let server_ends = [
        (&server.namespace, server.address),
        (
            &topo.pod("server-c").namespace,
            topo.pod("server-c").address,
        ),
        (&topo.pod("vserver").namespace, topo.pod("vserver").address),
        (&topo.nodes[1], NODE_ADDRESSES[1]),
    ];
    for (namespace, address) in server_ends {
        start_echo_server(namespace, address, SERVER_PORT, Some(SERVER_CPU))?;
    }
    let tools = kinds
        .iter()
        .any(|k| !matches!(k, Kind::Latency | Kind::Rr | Kind::Crr));
    let mut tool_servers = Vec::new();
    if tools {
        eprintln!("starting sockperf, iperf3 and redis servers…");
        for (namespace, address) in server_ends {
            tool_servers.extend(start_tool_servers(namespace, address, SERVER_CPU)?);
        }
    }
    topo.add_coordinator_veth("client")?;
    // TCP_CRR opens thousands of connections a second; without these the
    // client's TIME_WAIT sockets fill the ephemeral port space and
    // connect() spends milliseconds searching it, which would be measured
    // instead of the datapath (the tuning tcpkali's manual gives).
    for namespace in [
        &topo.pod("client").namespace,
        &topo.pod("vclient").namespace,
        &topo.nodes[0],
    ] {
        namespace.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
        namespace.sysctl("net.ipv4.ip_local_port_range", "10000 65535")?;
    }

    let service_ports_list: Vec<(u16, u16)> = [ECHO_PORT, SOCKPERF_PORT, IPERF_PORT, REDIS_PORT]
        .iter()
        .map(|&p| (p, p))
        .collect();
    let (service, slice) = service_objects("bench", VIP, &service_ports_list, &[server.address]);
    let ports = service_ports(std::slice::from_ref(&service), std::slice::from_ref(&slice));
    let cgroup = Cgroup::create(&format!("{}-socklb", topo.prefix))?;
    let needs_agent = modes
        .iter()
        .any(|m| matches!(m, Mode::Ebpf | Mode::SocketLb));
    let agent = if needs_agent {
        Some(start_bench_agent(
            opts.underpass.as_deref(),
            &topo,
            &cgroup,
            &service,
            &slice,
        )?)
    } else {
        None
    };

    let mut rows: BTreeMap<(Kind, Mode), Vec<Measurement>> = BTreeMap::new();
    let mut installed: Option<KubeProxy> = None;
    let total = runs * kinds.len() * modes.len();
    let mut done = 0;
    for run in 0..runs {
        for &kind in &kinds {
            // Modes interleaved: drift on the machine hits all of them.
            for &mode in &modes {
                done += 1;
                eprint!(
                    "\r[{done}/{total}] run {} {kind:?} {:<34}",
                    run + 1,
                    mode.label()
                );
                let flavour = match mode {
                    Mode::KubeProxy => Some(KubeProxy::Iptables),
                    Mode::KubeProxyNft => Some(KubeProxy::Nftables),
                    _ => None,
                };
                if let Some(flavour) = flavour
                    && installed != Some(flavour)
                {
                    if let Some(old) = installed.take() {
                        remove_kube_proxy(&topo.nodes[0], old)?;
                    }
                    install_kube_proxy(&topo.nodes[0], &ports, flavour, None)?;
                    installed = Some(flavour);
                }
                topo.route_via_node("client", SERVICE_CIDR, flavour.is_some())?;
                let (netns, target, in_cgroup) = match mode {
                    Mode::PodIp => (
                        topo.pod("client").namespace.path(),
                        SocketAddrV4::new(server.address, kind.port()),
                        false,
                    ),
                    Mode::PodIpRouted => (
                        topo.pod("client").namespace.path(),
                        SocketAddrV4::new(topo.pod("server-c").address, kind.port()),
                        false,
                    ),
                    Mode::VethRouted => (
                        topo.pod("vclient").namespace.path(),
                        SocketAddrV4::new(topo.pod("vserver").address, kind.port()),
                        false,
                    ),
                    Mode::Node => (
                        topo.nodes[0].path(),
                        SocketAddrV4::new(NODE_ADDRESSES[1], kind.port()),
                        false,
                    ),
                    Mode::SocketLb => (
                        topo.pod("client").namespace.path(),
                        SocketAddrV4::new(VIP, kind.port()),
                        true,
                    ),
                    _ => (
                        topo.pod("client").namespace.path(),
                        SocketAddrV4::new(VIP, kind.port()),
                        false,
                    ),
                };
                let measurement = run_worker(
                    netns,
                    in_cgroup.then(|| cgroup.path()),
                    kind,
                    target.into(),
                    seconds,
                )
                .with_context(|| format!("{kind:?} over {}", mode.label()))?;
                ensure!(
                    measurement.transactions > 0,
                    "{kind:?} over {}: no transaction completed",
                    mode.label()
                );
                rows.entry((kind, mode)).or_default().push(measurement);
            }
        }
    }
    eprintln!();
    if let Some(flavour) = installed {
        remove_kube_proxy(&topo.nodes[0], flavour)?;
    }
    if let Some((mut agent, _manifests)) = agent {
        agent.stop();
    }
    print_tables(
        &rows,
        &kinds,
        &modes,
        &[
            (Mode::Ebpf, Mode::KubeProxy),
            (Mode::Ebpf, Mode::PodIp),
            (Mode::SocketLb, Mode::PodIp),
            (Mode::KubeProxyNft, Mode::KubeProxy),
        ],
    );
    if let Some(dir) = &opts.out {
        write_charts(&rows, &kinds, &modes, dir, "cluster-ip")?;
    }
    let rows: Vec<Row> = rows
        .into_iter()
        .map(|((workload, mode), runs)| Row {
            workload,
            mode,
            runs,
        })
        .collect();
    crate::write_results(
        &rows,
        opts.json.as_deref(),
        opts.out.as_deref(),
        "cluster-ip.json",
    )?;
    if let Some(dir) = &opts.out {
        eprintln!("wrote cluster-ip.json and the charts to {}", dir.display());
    }
    drop(cgroup);
    drop(topo);
    Ok(())
}

pub(crate) fn run_worker(
    netns: &Path,
    cgroup: Option<&Path>,
    kind: Kind,
    target: SocketAddr,
    seconds: f64,
) -> Result<Measurement> {
    let mut command = Command::new(std::env::current_exe()?);
    command
        .arg("worker")
        .arg("--netns")
        .arg(netns)
        .args(["--cpu", &CLIENT_CPU.to_string()])
        .args(["--kind", kind.arg()])
        .args(["--target", &target.to_string()])
        .args(["--seconds", &seconds.to_string()])
        .stderr(Stdio::inherit());
    if let Some(cgroup) = cgroup {
        command.arg("--cgroup").arg(cgroup);
    }
    let output = crate::workload::owned_output(&mut command)?;
    if !output.status.success() {
        bail!("worker failed ({})", output.status);
    }
    serde_json::from_slice(&output.stdout).context("reading the worker's result")
}

/// Median, min and max of `values`.
fn spread(mut values: Vec<f64>) -> (f64, f64, f64) {
    values.sort_by(f64::total_cmp);
    (
        values[values.len() / 2],
        values[0],
        values[values.len() - 1],
    )
}

/// A workload's table title, unit and the figure shown for it.
fn presentation(kind: Kind) -> (&'static str, &'static str, fn(&Measurement) -> f64) {
    match kind {
        Kind::Latency => (
            "sockperf-style ping-pong latency (one-way, 64 B)",
            "µs",
            |m| m.mean_us,
        ),
        Kind::Rr => ("TCP_RR (100 B request/response)", "trans/s", |m| {
            m.per_second
        }),
        Kind::Crr => (
            "TCP_CRR (connect, 100 B request/response, close)",
            "trans/s",
            |m| m.per_second,
        ),
        Kind::Sockperf => (
            "sockperf ping-pong --tcp -m 64 (one-way latency)",
            "µs",
            |m| m.mean_us,
        ),
        Kind::Iperf1 => ("iperf3, 1 stream", "Gbit/s", |m| m.per_second),
        Kind::Iperf2 => ("iperf3, 2 streams", "Gbit/s", |m| m.per_second),
        Kind::Iperf4 => ("iperf3, 4 streams", "Gbit/s", |m| m.per_second),
        Kind::RedisGet => ("redis-benchmark -d 1000 -t get", "requests/s", |m| {
            m.per_second
        }),
        Kind::RedisSet => ("redis-benchmark -d 1000 -t set", "requests/s", |m| {
            m.per_second
        }),
    }
}

/// Writes `<prefix>-<workload>.svg` into `dir` for every workload: one bar
/// per row (median, whiskers min–max).
pub(crate) fn write_charts<M: SeedRow>(
    rows: &BTreeMap<(Kind, M), Vec<Measurement>>,
    kinds: &[Kind],
    modes: &[M],
    dir: &Path,
    prefix: &str,
) -> Result<()> {
    for &kind in kinds {
        let (title, unit, pick) = presentation(kind);
        let bars: Vec<Bar> = modes
            .iter()
            .filter_map(|&mode| {
                let runs = rows.get(&(kind, mode))?;
                let (median, min, max) = spread(runs.iter().map(pick).collect());
                Some(Bar {
                    label: mode.label().to_owned(),
                    median,
                    min,
                    max,
                })
            })
            .collect();
        let path = dir.join(format!("{prefix}-{}.svg", kind.arg()));
        crate::plot::bars(&path, title, unit, &bars)?;
    }
    Ok(())
}

pub(crate) fn print_tables<M: SeedRow>(
    rows: &BTreeMap<(Kind, M), Vec<Measurement>>,
    kinds: &[Kind],
    modes: &[M],
    ratios: &[(M, M)],
) {
    for &kind in kinds {
        let (title, unit, pick) = presentation(kind);
        let cpu_unit = match kind {
            Kind::Iperf1 | Kind::Iperf2 | Kind::Iperf4 => "CPU µs/MB",
            Kind::Sockperf | Kind::Latency => "CPU µs/message",
            _ => "CPU µs/transaction",
        };
        println!("\n### {title}\n");
        println!(
            "| datapath | ours, median ({unit}) | min–max | seed ({unit}) | {cpu_unit}: user + sys + softirq |"
        );
        println!("| --- | --- | --- | --- | --- |");
        let mut medians: BTreeMap<M, f64> = BTreeMap::new();
        for &mode in modes {
            let Some(runs) = rows.get(&(kind, mode)) else {
                continue;
            };
            let (median, min, max) = spread(runs.iter().map(pick).collect());
            medians.insert(mode, median);
            let seed = mode
                .seed(kind)
                .map(|v| format!("{v}"))
                .unwrap_or_else(|| "–".into());
            let (user, _, _) = spread(runs.iter().map(|m| m.cpu_user_us).collect());
            let (system, _, _) = spread(runs.iter().map(|m| m.cpu_system_us).collect());
            let (softirq, _, _) = spread(runs.iter().map(|m| m.cpu_softirq_us).collect());
            println!(
                "| {} | {median:.1} | {min:.1}–{max:.1} | {seed} | {user:.1} + {system:.1} + {softirq:.1} |",
                mode.label()
            );
        }
        let ratio = |a: M, b: M| -> Option<f64> { Some(medians.get(&a)? / medians.get(&b)?) };
        let seed_ratio = |a: M, b: M| -> Option<f64> { Some(a.seed(kind)? / b.seed(kind)?) };
        for &(a, b) in ratios {
            if let Some(r) = ratio(a, b) {
                let seed = seed_ratio(a, b)
                    .map(|s| format!("{s:.3}"))
                    .unwrap_or_else(|| "–".into());
                println!("| ratio {:?}/{:?} | {r:.3} | | {seed} | |", a, b);
            }
        }
    }
}

#[cfg(test)]
mod mode_arg_tests {
    use super::*;

    #[test]
    fn all_or_nothing_means_every_mode_and_a_list_keeps_its_order() {
        assert_eq!(ModeArg::expand(&[]), Mode::ALL.to_vec());
        assert_eq!(parse_mode("all"), Ok(ModeArg::All));
        assert_eq!(
            ModeArg::expand(&[ModeArg::One(Mode::Ebpf), ModeArg::All]),
            Mode::ALL.to_vec()
        );
        let picked = ["socket-lb", "kube-proxy", "socket-lb"].map(|v| parse_mode(v).unwrap());
        assert_eq!(
            ModeArg::expand(&picked),
            vec![Mode::SocketLb, Mode::KubeProxy]
        );
        assert!(parse_mode("ebpff").is_err());
    }
}
