//! The ClusterIP bench's testbed: the two-node topology with every
//! mode's client and server, the Services (kube-proxy's rules and the
//! underpass agent programmed from the same objects), and the one place
//! that maps a mode to where its client runs and what it connects to.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
};

use anyhow::{Context, Result};
use aya::programs::{SchedClassifier, TcAttachType};
use datapath_user::{
    Datapath, LoadOptions,
    loader::{MapSizes, TcAttachment},
    object::{SOCK_CONNECT4, SOCK_CONNECT6},
};
use lab::{
    Cgroup, Offloads, Pod, PodSpec, Topology, standard_pods,
    topology::{NODE_ADDRESSES, NODE_ADDRESSES6},
};

use super::modes::Mode;
use crate::{
    agent_process::{AgentProcess, start_bench_agent},
    cluster::{KubeProxy, install_kube_proxy, remove_kube_proxy, service_cidr, service_objects},
    family::IpFamily,
    kubeproxy::{ServicePort, service_ports},
    leftovers::{close_time_wait, ensure_no_rules, flush_conntrack},
    program_stats::{LiveCost, ProgramSelection, ProgramTotals, RunTimeStats},
    workload::{
        Arrivals, BenchCgroups, ClientPlace, ECHO_PORT, IPERF_PORT, Kind, Parameters, REDIS_PORT,
        SERVER_CPU, SOCKPERF_PORT, ServerProcess, run_worker, start_echo_server,
        start_tool_servers,
    },
};

/// The service of the macvlan modes (its endpoint: server-b).
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// The service of the veth modes (its endpoint: vserver).
const VETH_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
/// Their IPv6 twins, in `SERVICE_CIDR6`.
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x10);
const VETH_VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x11);
/// The limit's client: outside the agent's `<prefix>-client*` filter.
const BARE_CLIENT: &str = "bare-client";

/// Where a mode's client runs and what it connects to.
pub(super) struct Endpoint<'a> {
    pub(super) place: ClientPlace<'a>,
    pub(super) target: SocketAddr,
    /// Where the packet rate counts its packets (north-south only).
    pub(super) arrivals: Option<Arrivals>,
}

pub(super) struct Testbed {
    topo: Topology,
    /// Every mode's traffic is of this family.
    family: IpFamily,
    _servers: Vec<ServerProcess>,
    agent: Option<(AgentProcess, tempfile::TempDir)>,
    /// kube-proxy's view of the Services.
    ports: Vec<ServicePort>,
    /// The flavour of kube-proxy's rules loaded in the client's node.
    installed: Option<KubeProxy>,
    /// Our object loaded by the bench itself, for the do-nothing program
    /// it attaches to the limit's client during a statistics pass.
    pass_program: Option<Datapath>,
    // Last: dropped after the processes in them are gone.
    /// The socket-LB mode's client joins this one.
    cgroup: Cgroup,
    cgroups: BenchCgroups,
}

impl Testbed {
    /// Pods: client → server-b (the macvlan modes), → server-c (the other
    /// subnet); bare-client → server-b (the limit: a macvlan client the
    /// agent does not attach to) and → the ClusterIP through socket-LB
    /// alone (a pod socket-LB translates gets no TC pair, `--pod-tc`); vclient → vserver (veth pods, routed by
    /// their nodes); with the Cilium row, client-veth → vserver (a veth
    /// client the agent attaches, so that vclient carries nothing of
    /// ours). Offloads as real devices have them. Services, kube-proxy's
    /// rules, servers and targets of `family` (the pods are dual-stack).
    pub(super) fn build(
        modes: &[Mode],
        kinds: &[Kind],
        underpass: Option<&Path>,
        family: IpFamily,
    ) -> Result<Self> {
        let mut pods: Vec<PodSpec> = standard_pods()
            .into_iter()
            .filter(|p| p.role != "server-a")
            .collect();
        pods.push(PodSpec {
            role: BARE_CLIENT,
            node: 0,
            address: Ipv4Addr::new(10, 77, 0, 7),
        });
        let mut topo = Topology::build_with(&pods, Offloads::AsRealDevices)?;
        let mut veth_pods = vec![
            ("vclient", 0, [10, 79, 1, 2]),
            ("vserver", 1, [10, 79, 2, 2]),
        ];
        if modes.contains(&Mode::VethEbpf) {
            veth_pods.push(("client-veth", 0, [10, 79, 1, 3]));
        }
        for (role, node, address) in veth_pods {
            topo.add_veth_pod(&PodSpec {
                role,
                node,
                address: address.into(),
            })?;
        }
        check_addresses(&topo, family)?;
        let cgroups = BenchCgroups::create(&topo.prefix)?;
        let servers = start_servers(&topo, kinds, cgroups.servers.path(), family)?;
        topo.add_coordinator_veth("client")?;
        // TCP_CRR opens thousands of connections a second; without these
        // the clients' TIME_WAIT sockets fill the ephemeral port space and
        // connect() spends milliseconds searching it, which would be
        // measured instead of the datapath (the tuning tcpkali's manual
        // gives).
        let clients = topo
            .pods
            .iter()
            .filter(|p| p.role.contains("client"))
            .map(|p| &p.namespace);
        for namespace in clients.chain([&topo.nodes[0]]) {
            namespace.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
            namespace.sysctl("net.ipv4.ip_local_port_range", "10000 65535")?;
        }
        let every_port: Vec<(u16, u16)> = [ECHO_PORT, SOCKPERF_PORT, IPERF_PORT, REDIS_PORT]
            .iter()
            .map(|&p| (p, p))
            .collect();
        let (vip, veth_vip) = vips(family);
        let services = [
            service_objects(
                "bench",
                vip,
                &every_port,
                &[address_of(&topo, "server-b", family)],
            ),
            service_objects(
                "bench-veth",
                veth_vip,
                &every_port,
                &[address_of(&topo, "vserver", family)],
            ),
        ];
        let (all_services, all_slices): (Vec<_>, Vec<_>) = services.iter().cloned().unzip();
        let ports = service_ports(&all_services, &all_slices);
        let cgroup = Cgroup::create(&format!("{}-socklb", topo.prefix))?;
        let agent = if modes.iter().any(|m| m.underpass()) {
            let tc_clients: &[&str] = if modes.contains(&Mode::VethEbpf) {
                &["client", "client-veth"]
            } else {
                &["client"]
            };
            let (agent, manifests) = start_bench_agent(
                underpass,
                &topo,
                &cgroup,
                &services,
                tc_clients,
                family == IpFamily::V6,
            )?;
            cgroups.adopt_agent(agent.pid())?;
            Some((agent, manifests))
        } else {
            None
        };
        Ok(Self {
            topo,
            family,
            _servers: servers,
            cgroup,
            cgroups,
            agent,
            ports,
            installed: None,
            pass_program: None,
        })
    }

    /// Readies the client's node for `mode`: kube-proxy's rules of its
    /// flavour while a kube-proxy mode runs and only then — removed whole
    /// and checked gone otherwise (a mode without them must neither pay
    /// its node's hooks and conntrack nor be served by them: the Cilium
    /// row's ClusterIP would otherwise be translated by kube-proxy if
    /// underpass did not); every conntrack table flushed and every
    /// TIME_WAIT socket closed (one mode's TCP_CRR must not leave the next
    /// mode's connect() searching past its sockets, nor its conntrack
    /// entries); and the macvlan client's
    /// route to the service CIDR through its node only for the macvlan
    /// kube-proxy modes.
    pub(super) fn prepare(&mut self, mode: Mode) -> Result<()> {
        let node = &self.topo.nodes[0];
        let want = mode.kube_proxy();
        if self.installed != want {
            if let Some(old) = self.installed.take() {
                remove_kube_proxy(node, old, self.family)?;
            }
            if let Some(flavour) = want {
                install_kube_proxy(node, &self.ports, flavour, self.family, None)?;
                self.installed = Some(flavour);
            }
        }
        if want.is_none() {
            ensure_no_rules(node, mode.label())?;
        }
        for namespace in self.namespaces() {
            flush_conntrack(namespace)?;
            close_time_wait(namespace)?;
        }
        let macvlan_through_node = matches!(mode, Mode::KubeProxy | Mode::KubeProxyNft);
        self.topo
            .route_via_node("client", service_cidr(self.family), macvlan_through_node)?;
        Ok(())
    }

    /// Where `mode`'s client runs and what it connects to for `kind`.
    pub(super) fn endpoint(&self, mode: Mode, kind: Kind) -> Endpoint<'_> {
        let pod = |role: &str| self.topo.pod(role).namespace.path();
        let address = |role: &str| address_of(&self.topo, role, self.family);
        let (vip, veth_vip) = vips(self.family);
        let (netns, server) = match mode {
            Mode::KubeProxy | Mode::KubeProxyNft | Mode::Ebpf => (pod("client"), vip),
            // A pod socket-LB translates has no TC pair (the agent's
            // `--pod-tc`): the bare client, in socket-LB's cgroup.
            Mode::SocketLb => (pod(BARE_CLIENT), vip),
            Mode::VethKubeProxy => (pod("vclient"), veth_vip),
            Mode::VethEbpf => (pod("client-veth"), veth_vip),
            Mode::PodIpBare | Mode::AaControl => (pod(BARE_CLIENT), address("server-b")),
            Mode::PodIp => (pod("client"), address("server-b")),
            Mode::PodIpRouted => (pod("client"), address("server-c")),
            Mode::VethRouted => (pod("vclient"), address("vserver")),
            Mode::Node => (self.topo.nodes[0].path(), node_address(1, self.family)),
            // `run` refuses a mode its preset does not have.
            other => unreachable!("{other:?} runs on the node-port testbed"),
        };
        let cgroup = match mode {
            Mode::SocketLb => self.cgroup.path(),
            _ => self.cgroups.clients.path(),
        };
        Endpoint {
            place: ClientPlace {
                netns,
                cgroup,
                server_cgroup: self.cgroups.servers.path(),
                agent_cgroup: self.agent.as_ref().map(|_| self.cgroups.agent.path()),
            },
            target: SocketAddr::new(server, kind.port()),
            arrivals: None,
        }
    }

    /// A statistics pass of `mode` (`crate::program_stats`): `kind` run
    /// again with `parameters` while the kernel counts each program's run
    /// time, with the do-nothing program first on the client's interface
    /// (the statistics' floor, on the same packets) for the pass only.
    /// `None` for a mode whose packets run none of our programs.
    pub(super) fn live_pass(
        &mut self,
        mode: Mode,
        kind: Kind,
        parameters: &Parameters,
    ) -> Result<Option<LiveCost>> {
        let Some(role) = tc_client(mode) else {
            return Ok(None);
        };
        if !datapath_user::probe::has_tcx() {
            // The floor program is attached with TCX (first in the chain);
            // without it there is no floor on the same packets.
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(|| {
                eprintln!("\nnote: this kernel has no TCX (Linux 6.6): no live program statistics")
            });
            return Ok(None);
        }
        self.prepare(mode)?;
        let floor_program = self.attach_pass_program(role)?;
        // The socket-LB program a pass reads besides the interface's.
        let connect = match self.family {
            IpFamily::V4 => SOCK_CONNECT4,
            IpFamily::V6 => SOCK_CONNECT6,
        };
        let selection = ProgramSelection {
            ids: self.attached_programs(role)?,
            names: vec![connect],
        };
        let client = self.endpoint(mode, kind);
        let stats = RunTimeStats::enable()?;
        let before = ProgramTotals::read(&selection)?;
        let measurement = run_worker(client.place, kind, client.target, parameters, None)
            .with_context(|| format!("{kind:?} over {} (statistics pass)", mode.label()))?;
        let after = ProgramTotals::read(&selection)?;
        drop(stats);
        floor_program
            .detach()
            .context("detaching the do-nothing program")?;
        let programs = after.since(&before);
        Ok((programs.len() > 1).then_some(LiveCost {
            transactions: measurement.transactions,
            programs,
        }))
    }

    /// The ids of the programs in both TCX chains of `role`'s interface.
    fn attached_programs(&self, role: &str) -> Result<Vec<u32>> {
        let netns = self.topo.pod(role).namespace.path().to_owned();
        let ids = datapath_user::netns::run_in(Some(&netns), || {
            let mut ids = Vec::new();
            for direction in [TcAttachType::Egress, TcAttachType::Ingress] {
                let (_, programs) = SchedClassifier::query_tcx(Pod::IFACE, direction)?;
                ids.extend(programs.iter().map(|p| p.id()));
            }
            Ok::<_, aya::programs::ProgramError>(ids)
        })
        .context("entering the client's namespace")?
        .with_context(|| format!("querying the TCX chains of {role}'s {}", Pod::IFACE))?;
        Ok(ids)
    }

    /// The do-nothing program first on both directions of `role`'s
    /// interface.
    fn attach_pass_program(&mut self, role: &str) -> Result<TcAttachment> {
        if self.pass_program.is_none() {
            // Only its do-nothing program is used: the maps as small as
            // the loader allows.
            let tiny = MapSizes {
                services: 16,
                slots: 16,
                backends: 16,
                reverse_nat: 16,
                conntrack_tcp_flows: 16,
                conntrack_udp_flows: 16,
                sock_reverse_nat: 16,
                affinity_clients: 16,
                service_counters: false,
                ipv6: false,
                ..MapSizes::default()
            };
            let datapath = Datapath::load(&LoadOptions {
                sizes: tiny,
                ..LoadOptions::default()
            })
            .context("loading our object for its do-nothing program")?;
            self.pass_program = Some(datapath);
        }
        let netns = self.topo.pod(role).namespace.path();
        let datapath = self.pass_program.as_mut().expect("loaded above");
        Ok(datapath.attach_tc_pass(Some(&netns.to_string_lossy()), Pod::IFACE)?)
    }

    /// Every namespace of the testbed.
    fn namespaces(&self) -> impl Iterator<Item = &lab::Namespace> {
        self.topo
            .nodes
            .iter()
            .chain([&self.topo.gateway])
            .chain(self.topo.pods.iter().map(|p| &p.namespace))
    }

    /// `ethtool -k` of every device, for the result.
    pub(super) fn offloads(&self) -> Result<Vec<lab::DeviceOffloads>> {
        Ok(self.topo.offloads()?)
    }

    /// Removes kube-proxy's rules and stops the agent; the namespaces go
    /// on drop.
    pub(super) fn finish(mut self) -> Result<()> {
        if let Some(flavour) = self.installed.take() {
            remove_kube_proxy(&self.topo.nodes[0], flavour, self.family)?;
        }
        if let Some((mut agent, _manifests)) = self.agent.take() {
            agent.stop();
        }
        Ok(())
    }
}

/// The pod whose interface carries `mode`'s client packets, for a mode
/// that runs any of our programs (the TC pair, or socket-LB's alone on a
/// pod without the pair).
fn tc_client(mode: Mode) -> Option<&'static str> {
    match mode {
        Mode::Ebpf | Mode::PodIp | Mode::PodIpRouted => Some("client"),
        Mode::SocketLb => Some(BARE_CLIENT),
        Mode::VethEbpf => Some("client-veth"),
        _ => None,
    }
}

/// The services' addresses in `family`: the macvlan modes', the veth
/// modes'.
fn vips(family: IpFamily) -> (IpAddr, IpAddr) {
    match family {
        IpFamily::V4 => (VIP.into(), VETH_VIP.into()),
        IpFamily::V6 => (VIP6.into(), VETH_VIP6.into()),
    }
}

/// Node `n`'s address on the wire in `family`.
fn node_address(n: usize, family: IpFamily) -> IpAddr {
    match family {
        IpFamily::V4 => NODE_ADDRESSES[n].into(),
        IpFamily::V6 => NODE_ADDRESSES6[n].into(),
    }
}

/// Pod `role`'s address in `family`.
fn address_of(topo: &Topology, role: &str, family: IpFamily) -> IpAddr {
    let pod = topo.pod(role);
    match family {
        IpFamily::V4 => pod.address.into(),
        IpFamily::V6 => pod
            .address6
            .expect("every pod's IPv6 address is checked when the testbed is built")
            .into(),
    }
}

/// An error naming the first pod without an address of `family` (the
/// built-in topology gives every pod both; a topology that did not would
/// otherwise stop the bench halfway).
fn check_addresses(topo: &Topology, family: IpFamily) -> Result<()> {
    if family == IpFamily::V6
        && let Some(pod) = topo.pods.iter().find(|pod| pod.address6.is_none())
    {
        anyhow::bail!(
            "pod {} ({}) has no IPv6 address in this topology: `--family 6` needs every pod dual-stack",
            pod.role,
            pod.namespace.name()
        );
    }
    Ok(())
}

/// The echo server (and, for the tools' workloads, sockperf, iperf3 and
/// redis) on every server end: server-b, server-c, vserver, node 2; all
/// in the servers' `cgroup`, on their `family` addresses.
fn start_servers(
    topo: &Topology,
    kinds: &[Kind],
    cgroup: &Path,
    family: IpFamily,
) -> Result<Vec<ServerProcess>> {
    let server_ends = [
        (
            &topo.pod("server-b").namespace,
            address_of(topo, "server-b", family),
        ),
        (
            &topo.pod("server-c").namespace,
            address_of(topo, "server-c", family),
        ),
        (
            &topo.pod("vserver").namespace,
            address_of(topo, "vserver", family),
        ),
        (&topo.nodes[1], node_address(1, family)),
    ];
    let mut servers = Vec::new();
    for (namespace, address) in server_ends {
        servers.push(start_echo_server(
            namespace, address, ECHO_PORT, SERVER_CPU, cgroup,
        )?);
    }
    if kinds
        .iter()
        .any(|k| !matches!(k, Kind::Latency | Kind::Rr | Kind::Crr))
    {
        eprintln!("starting sockperf, iperf3 and redis servers…");
        for (namespace, address) in server_ends {
            servers.extend(start_tool_servers(namespace, address, SERVER_CPU, cgroup)?);
        }
    }
    Ok(servers)
}
