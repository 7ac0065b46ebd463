//! The node-port preset's testbed: north-south on the two-node topology.
//! A client outside the cluster (a namespace on the wire, beside node2)
//! reaches node1's nodePorts: of a service whose pod (server-a) is on
//! node1, and of one whose pod (server-b) is on node2. Through
//! kube-proxy's rules in node1 (iptables or nftables, installed only
//! while their mode runs; the pod on node1 reached through its
//! Spiderpool coordinator veth, as kube-proxy's DNAT needs), or through
//! underpass's XDP program on node1's uplink (the agent runs, with
//! `--uplink`, only while an XDP mode runs: the other modes' packets
//! meet no program of ours). The limit: the same client straight to
//! server-a's Pod IP. For the packet rate, a UDP sink beside each echo
//! server, and the ceiling: an `XDP_DROP` program on node1's uplink
//! while its mode runs.

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use datapath_user::loader::{XdpVerdict, XdpVerdictLink, attach_xdp_verdict};
use k8s_openapi::api::{
    core::v1::{Service, ServicePort as K8sServicePort},
    discovery::v1::{EndpointPort, EndpointSlice},
};
use lab::{
    Namespace, Offloads, PodSpec, Topology, standard_pods,
    topology::{NODE_ADDRESSES, WIRE},
};

use super::{modes::Mode, testbed::Endpoint};
use crate::{
    agent_process::{AgentProcess, underpass_binary},
    cluster::{KubeProxy, install_kube_proxy, remove_kube_proxy, service_objects},
    family::IpFamily,
    kubeproxy::{ServicePort, service_ports},
    leftovers::{close_time_wait, ensure_no_rules, flush_conntrack},
    workload::{
        Arrivals, BenchCgroups, ClientPlace, ECHO_PORT, IPERF_PORT, Kind, PACKET_PORT, REDIS_PORT,
        SERVER_CPU, SOCKPERF_PORT, ServerProcess, start_echo_server_and_sink, start_tool_servers,
    },
};

/// The client outside the cluster, on the wire's subnet.
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 200);
/// The services' ClusterIPs (kube-proxy's rules need one; nothing
/// connects to them here).
const HERE_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);
const ELSEWHERE_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 31);
/// The agent's SNAT ports: node1's own sockets get the rest
/// (`ip_local_port_range`), so that a TCP_CRR run's tens of thousands of
/// flows to the pod on node2 find ports as kube-proxy's MASQUERADE
/// (1024-65535) does; the default 61000-65535 is sized for a node whose
/// own connections use the kernel's ephemeral range.
pub(super) const SNAT_PORTS: &str = "10000-59999";
const NODE_LOCAL_PORTS: &str = "60000 65535";

/// The nodePort of the service port for `port`, for the service whose
/// pod is on node1 (`elsewhere` false) or on node2.
fn node_port(port: u16, elsewhere: bool) -> u16 {
    30_000 + port % 1_000 + if elsewhere { 1_000 } else { 0 }
}

fn node1() -> Ipv4Addr {
    NODE_ADDRESSES[0]
}

pub(super) struct NodePortTestbed {
    topo: Topology,
    outside: Namespace,
    _servers: Vec<ServerProcess>,
    /// kube-proxy's view of both services.
    ports: Vec<ServicePort>,
    /// The flavour of kube-proxy's rules loaded in node1.
    installed: Option<KubeProxy>,
    /// The agent while an XDP mode runs, and whether its program is
    /// attached in generic mode.
    agent: Option<(AgentProcess, bool)>,
    /// The `XDP_DROP` program on node1's uplink while the ceiling runs.
    ceiling: Option<XdpVerdictLink>,
    /// node2's end of the wire takes what node1's uplink program sends
    /// back out (`XDP_TX`), as a NIC's wire would, only while it runs
    /// an XDP program (this `XDP_PASS`): held while an XDP mode runs
    /// alone, since a veth whose peer runs XDP loses its GSO.
    xdp_tx_receiver: Option<XdpVerdictLink>,
    binary: PathBuf,
    manifests: tempfile::TempDir,
    // Last: dropped after the processes in them are gone.
    cgroups: BenchCgroups,
}

impl NodePortTestbed {
    pub(super) fn build(kinds: &[Kind], underpass: Option<&Path>) -> Result<Self> {
        let binary = underpass_binary(underpass)?;
        let pods: Vec<PodSpec> = standard_pods()
            .into_iter()
            .filter(|p| matches!(p.role, "server-a" | "server-b"))
            .collect();
        let topo = Topology::build_with(&pods, Offloads::AsRealDevices)?;
        // What reaches node1's uplink carries complete checksums, as a
        // frame from a real wire does: node2's end of the wire (and so
        // the outside client's and server-b's macvlans on it) computes
        // them in software. With transmit offload a veth hands its peer
        // half-done ones (`CHECKSUM_PARTIAL`), which no NIC receives,
        // which an XDP program cannot tell from complete ones, and which
        // `XDP_TX` sends on unfinished. node1's end keeps its offloads
        // (kube-proxy's forwarded packets are segmented and checksummed
        // as a NIC would).
        topo.nodes[1].disable_tx_checksum(WIRE)?;
        let node = &topo.nodes[0];
        // A Kubernetes node forwards (kube-proxy's DNAT to another node,
        // and the kernel answers the XDP program's route lookups only on
        // an interface that forwards).
        node.sysctl("net.ipv4.ip_forward", "1")?;
        node.sysctl("net.ipv4.ip_local_port_range", NODE_LOCAL_PORTS)?;
        let outside = topo.add_outside_client(1, OUTSIDE)?;
        // The ceiling's XDP_DROP drops ARP too: the client keeps node1's
        // MAC as a host keeps its gateway's, whatever node1 answers.
        topo.pin_neighbour(&outside, 0)?;
        // TCP_CRR's thousands of connections a second (see cluster-ip's
        // testbed).
        outside.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
        outside.sysctl("net.ipv4.ip_local_port_range", "10000 65535")?;
        // kube-proxy reaches the pod on node1 as Spiderpool does: DNAT,
        // then the coordinator veth; the pod answers node1's (masqueraded)
        // address back through it.
        topo.add_coordinator_veth("server-a")?;
        topo.route_via_node("server-a", (node1(), 32), true)?;
        let cgroups = BenchCgroups::create(&topo.prefix)?;
        let servers = start_servers(&topo, kinds, cgroups.servers.path())?;
        let services = [
            node_port_service("here", HERE_VIP, topo.pod("server-a").address, false),
            node_port_service(
                "elsewhere",
                ELSEWHERE_VIP,
                topo.pod("server-b").address,
                true,
            ),
        ];
        let (all_services, all_slices): (Vec<_>, Vec<_>) = services.iter().cloned().unzip();
        let ports = service_ports(&all_services, &all_slices);
        let manifests = tempfile::Builder::new()
            .prefix("underpass-bench-")
            .tempdir()?;
        let mut text = String::new();
        for (service, slice) in &services {
            text += &format!(
                "{}---\n{}---\n",
                serde_yaml::to_string(service)?,
                serde_yaml::to_string(slice)?
            );
        }
        std::fs::write(manifests.path().join("bench.yaml"), text)?;
        Ok(Self {
            topo,
            outside,
            _servers: servers,
            ports,
            installed: None,
            agent: None,
            ceiling: None,
            xdp_tx_receiver: None,
            binary,
            manifests,
            cgroups,
        })
    }

    /// Readies node1 for `mode`: kube-proxy's rules of its flavour only
    /// while a kube-proxy mode runs (removed whole and checked gone
    /// otherwise), the agent and its XDP program only while an XDP mode
    /// runs (stopped otherwise: its pins go, and with them the program
    /// and the pod's TC pair); every conntrack table flushed and every
    /// TIME_WAIT socket closed.
    pub(super) fn prepare(&mut self, mode: Mode) -> Result<()> {
        let node = &self.topo.nodes[0];
        // Off first: node1's uplink takes one XDP program at a time.
        if mode != Mode::XdpDropCeiling {
            self.ceiling = None;
        }
        let want = mode.kube_proxy();
        if self.installed != want {
            if let Some(old) = self.installed.take() {
                remove_kube_proxy(node, old, IpFamily::V4)?;
            }
            if let Some(flavour) = want {
                install_kube_proxy(node, &self.ports, flavour, IpFamily::V4, None)?;
                self.installed = Some(flavour);
            }
        }
        if want.is_none() {
            ensure_no_rules(node, mode.label())?;
        }
        let keep = self
            .agent
            .as_ref()
            .is_some_and(|(_, generic)| mode.xdp() && *generic == mode.skb_path());
        if !keep && let Some((mut agent, _)) = self.agent.take() {
            agent.stop();
            // Dropped: its pins removed, the XDP link and TC pair with them.
            drop(agent);
            anyhow::ensure!(
                !xdp_pinned(&self.pin_dir()),
                "the agent's XDP link is still pinned after it stopped"
            );
        }
        if !mode.xdp() {
            self.xdp_tx_receiver = None;
        } else if self.xdp_tx_receiver.is_none() {
            let path = self.topo.nodes[1].path().to_owned();
            self.xdp_tx_receiver = Some(
                attach_xdp_verdict(Some(&path), WIRE, XdpVerdict::Pass)
                    .context("attaching XDP_PASS to node2's end of the wire")?,
            );
        }
        // Generic XDP runs after GRO, on merged packets whose TCP
        // checksum holds only the pseudo-header's sum (`CHECKSUM_PARTIAL`),
        // which the program's port rewrite would spoil: the skb path runs
        // with GRO off on the uplink, as generic mode needs.
        self.topo.nodes[0].set_gro(WIRE, !mode.skb_path())?;
        if mode.xdp() && self.agent.is_none() {
            self.agent = Some((self.start_agent(mode.skb_path())?, mode.skb_path()));
        }
        if mode == Mode::XdpDropCeiling && self.ceiling.is_none() {
            let path = self.topo.nodes[0].path().to_owned();
            self.ceiling = Some(
                attach_xdp_verdict(Some(&path), WIRE, XdpVerdict::Drop)
                    .context("attaching XDP_DROP to node1's uplink (the ceiling)")?,
            );
        }
        for namespace in self.namespaces() {
            flush_conntrack(namespace)?;
            close_time_wait(namespace)?;
        }
        Ok(())
    }

    fn pin_dir(&self) -> PathBuf {
        PathBuf::from(format!("/sys/fs/bpf/{}", self.topo.prefix))
    }

    /// The agent of node1, with its uplink on node1's end of the wire,
    /// returned once its XDP link is pinned, the pod on node1 has its TC
    /// pair, and both nodePorts answer from outside through it.
    fn start_agent(&self, generic: bool) -> Result<AgentProcess> {
        let netns = self.topo.nodes[0].path().to_string_lossy().into_owned();
        let server_a = self.topo.pod("server-a").namespace.name().to_owned();
        let node_ip = node1().to_string();
        let mut agent = AgentProcess::spawn(
            &self.binary,
            self.pin_dir(),
            self.manifests.path(),
            [
                "--no-socket-lb",
                "--uplink",
                "wire",
                "--uplink-netns",
                &netns,
                "--node-ip",
                &node_ip,
                "--node-name",
                "node-1",
                "--netns-filter",
                &server_a,
                "--iface-name",
                "eth0",
                "--snat-ports",
                SNAT_PORTS,
                "--xdp-mode",
                if generic { "generic" } else { "native" },
            ],
        )?;
        self.cgroups.adopt_agent(agent.pid())?;
        agent.wait_until(
            Duration::from_secs(30),
            "ready, XDP attached, the pod on node1 attached",
            |a| {
                xdp_pinned(a.pin_dir())
                    && datapath_user::attach::pinned_tc_links(a.pin_dir())
                        .contains(&(server_a.clone(), "eth0".to_owned()))
                    && a.is_ready()
            },
        )?;
        // The pod's MAC and the remote pod's neighbour are the agent's
        // next scans; the first measured connection must not wait for
        // them (a SYN dropped for an unresolved neighbour costs a second).
        for elsewhere in [false, true] {
            let target = SocketAddrV4::new(node1(), node_port(ECHO_PORT, elsewhere));
            self.wait_for_answer(target)?;
        }
        Ok(agent)
    }

    /// Connects from outside to `target` until it accepts (10 s).
    fn wait_for_answer(&self, target: SocketAddrV4) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let connected = self
                .outside
                .run(|| {
                    std::net::TcpStream::connect_timeout(&target.into(), Duration::from_millis(300))
                })?
                .is_ok();
            if connected {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{target} did not answer from outside through the agent's XDP program within 10 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Where `mode`'s client runs (always outside) and what it connects
    /// to for `kind`.
    /// For the packet rate, where its packets are counted: at the UDP
    /// layer of the pod they are for, or (the ceiling, which drops them
    /// all) at node1's uplink.
    pub(super) fn endpoint(&self, mode: Mode, kind: Kind) -> Endpoint<'_> {
        let (server, backend) = match mode {
            Mode::PodIpBare | Mode::AaControl => (
                SocketAddrV4::new(self.topo.pod("server-a").address, kind.port()),
                "server-a",
            ),
            Mode::NodePortKubeProxy
            | Mode::NodePortKubeProxyNft
            | Mode::NodePortXdp
            | Mode::NodePortSkb
            | Mode::XdpDropCeiling => (
                SocketAddrV4::new(node1(), node_port(kind.port(), false)),
                "server-a",
            ),
            Mode::NodePortRemoteKubeProxy
            | Mode::NodePortRemoteKubeProxyNft
            | Mode::NodePortRemoteXdp
            | Mode::NodePortRemoteSkb => (
                SocketAddrV4::new(node1(), node_port(kind.port(), true)),
                "server-b",
            ),
            other => unreachable!("{other:?} is not a node-port preset mode"),
        };
        let arrivals = (kind == Kind::PacketRate).then(|| match mode {
            Mode::XdpDropCeiling => Arrivals::WireReceived(self.topo.nodes[0].path().to_owned()),
            _ => Arrivals::UdpIn(self.topo.pod(backend).namespace.path().to_owned()),
        });
        Endpoint {
            place: ClientPlace {
                netns: self.outside.path(),
                cgroup: self.cgroups.clients.path(),
                server_cgroup: self.cgroups.servers.path(),
                agent_cgroup: self.agent.as_ref().map(|_| self.cgroups.agent.path()),
            },
            target: SocketAddr::V4(server),
            arrivals,
        }
    }

    /// Every namespace of the testbed.
    fn namespaces(&self) -> impl Iterator<Item = &Namespace> {
        self.topo
            .nodes
            .iter()
            .chain([&self.topo.gateway, &self.outside])
            .chain(self.topo.pods.iter().map(|p| &p.namespace))
    }

    /// `ethtool -k` of every device, for the result.
    pub(super) fn offloads(&self) -> Result<Vec<lab::DeviceOffloads>> {
        let mut devices = self.topo.offloads()?;
        devices.extend(self.outside.offloads()?);
        Ok(devices)
    }

    /// Removes kube-proxy's rules and stops the agent; the namespaces go
    /// on drop.
    pub(super) fn finish(mut self) -> Result<()> {
        self.ceiling = None;
        self.xdp_tx_receiver = None;
        if let Some(flavour) = self.installed.take() {
            remove_kube_proxy(&self.topo.nodes[0], flavour, IpFamily::V4)?;
        }
        if let Some((mut agent, _)) = self.agent.take() {
            agent.stop();
        }
        Ok(())
    }
}

/// True when an XDP link is pinned under `pin_dir`.
fn xdp_pinned(pin_dir: &Path) -> bool {
    walk(&pin_dir.join(datapath_user::loader::XDP_LINKS))
}

/// True when `dir` holds a file at any depth (`links/xdp/<netns>/<iface>`).
fn walk(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries
            .flatten()
            .any(|e| e.file_type().is_ok_and(|t| !t.is_dir()) || walk(&e.path()))
    })
}

/// A NodePort service `name` over `endpoint`, every bench port with its
/// nodePort (`externalTrafficPolicy: Cluster`, the default).
fn node_port_service(
    name: &str,
    vip: Ipv4Addr,
    endpoint: Ipv4Addr,
    elsewhere: bool,
) -> (Service, EndpointSlice) {
    let ports: Vec<(u16, u16)> = [ECHO_PORT, SOCKPERF_PORT, IPERF_PORT, REDIS_PORT]
        .iter()
        .map(|&p| (p, p))
        .collect();
    let (mut service, mut slice) = service_objects(name, vip, &ports, &[endpoint]);
    let spec = service.spec.as_mut().expect("service_objects gives a spec");
    spec.type_ = Some("NodePort".into());
    // The packet rate's sink: UDP.
    let sink = format!("p{PACKET_PORT}");
    spec.ports.get_or_insert_default().push(K8sServicePort {
        name: Some(sink.clone()),
        port: i32::from(PACKET_PORT),
        protocol: Some("UDP".into()),
        ..K8sServicePort::default()
    });
    slice.ports.get_or_insert_default().push(EndpointPort {
        name: Some(sink),
        port: Some(i32::from(PACKET_PORT)),
        protocol: Some("UDP".into()),
        ..EndpointPort::default()
    });
    for port in spec.ports.iter_mut().flatten() {
        port.node_port = Some(i32::from(node_port(port.port as u16, elsewhere)));
    }
    (service, slice)
}

/// The echo server (and, for the tools' workloads, sockperf, iperf3 and
/// redis) on server-a and server-b, in the servers' `cgroup`.
fn start_servers(topo: &Topology, kinds: &[Kind], cgroup: &Path) -> Result<Vec<ServerProcess>> {
    let mut servers = Vec::new();
    for role in ["server-a", "server-b"] {
        let pod = topo.pod(role);
        let sink = kinds.contains(&Kind::PacketRate).then_some(PACKET_PORT);
        servers.push(
            start_echo_server_and_sink(
                &pod.namespace,
                pod.address,
                ECHO_PORT,
                sink,
                SERVER_CPU,
                cgroup,
            )
            .with_context(|| format!("the echo server on {role}"))?,
        );
        if kinds
            .iter()
            .any(|k| !matches!(k, Kind::Latency | Kind::Rr | Kind::Crr | Kind::PacketRate))
        {
            servers.extend(start_tool_servers(
                &pod.namespace,
                pod.address.into(),
                SERVER_CPU,
                cgroup,
            )?);
        }
    }
    Ok(servers)
}
