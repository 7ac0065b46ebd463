//! The latency bench's lab: every design's pods and nginx servers on
//! the two-node topology, the ClusterIPs (kube-proxy's rules, the
//! underpass agent), the node tunings, and one measurement: the load
//! generator run in a design's client namespace.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use lab::{
    Cgroup, Offloads, PodSpec, Topology,
    topology::{self, NODE_ADDRESSES},
};

use super::{
    LatencyOpts,
    designs::{Design, Tuning},
};
use crate::{
    agent_process::{AgentProcess, start_bench_agent},
    cluster::{
        KubeProxy, SERVICE_CIDR, install_kube_proxy, remove_kube_proxy, run_in, service_objects,
    },
    family::IpFamily,
    kubeproxy::service_ports,
    leftovers::{delete_table, flush_conntrack},
    loadgen::LoadResult,
    nginx::{self, HTTP_PORT, Nginx},
};

/// The ClusterIPs: of the macvlan server, the veth server, the VXLAN
/// server.
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 80);
const VETH_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 81);
const VXLAN_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 82);
const CLIENT_CPU: usize = 0;
const SERVER_CPU: usize = 1;

/// Where each design's client runs and what it connects to.
pub(super) struct Endpoint {
    netns: PathBuf,
    cgroup: Option<PathBuf>,
    target: SocketAddr,
}

pub(super) struct Testbed {
    pub(super) topo: Topology,
    servers: Vec<Nginx>,
    pub(super) endpoints: BTreeMap<Design, Endpoint>,
    pub(super) unavailable: BTreeMap<Design, String>,
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

impl Testbed {
    /// Builds `designs`: the macvlan pods and the host network always (the
    /// ClusterIP designs use them), the others as asked.
    pub(super) fn build(designs: &[Design], opts: &LatencyOpts) -> Result<Self> {
        let pods = [
            pod("client", 0, [10, 77, 0, 2]),
            pod("mclient", 0, [10, 77, 0, 6]),
            pod("server", 1, [10, 77, 0, 4]),
        ];
        let topo = Topology::build_with(&pods, Offloads::AsRealDevices)?;
        let servers = vec![
            nginx::start(&topo.nodes[1], NODE_ADDRESSES[1], SERVER_CPU)?,
            nginx::start(
                &topo.pod("server").namespace,
                topo.pod("server").address,
                SERVER_CPU,
            )?,
        ];
        let mut testbed = Self {
            topo,
            servers,
            endpoints: BTreeMap::new(),
            unavailable: BTreeMap::new(),
            kube_proxy: None,
            state: Default::default(),
            agent: None,
            _cgroup: None,
        };
        testbed.reach(Design::Host, 0, NODE_ADDRESSES[1], None);
        let server = testbed.topo.pod("server").address;
        testbed.reach(Design::Macvlan, testbed.netns_of("mclient"), server, None);
        if designs.contains(&Design::Ipvlan) {
            testbed.add_ipvlan()?;
        }
        // Service and EndpointSlice objects for kube-proxy's rules.
        let mut services = testbed.add_routed_designs(designs)?;
        let (service, slice) =
            service_objects("latency", VIP, &[(HTTP_PORT, HTTP_PORT)], &[server]);
        services.push((service.clone(), slice.clone()));
        let (all_services, all_slices): (Vec<_>, Vec<_>) = services.into_iter().unzip();
        testbed.kube_proxy = Some(service_ports(&all_services, &all_slices));
        if designs.contains(&Design::KubeProxy) {
            testbed.topo.add_coordinator_veth("client")?;
            testbed.reach(Design::KubeProxy, testbed.netns_of("client"), VIP, None);
        }
        if designs
            .iter()
            .any(|d| matches!(d, Design::Underpass | Design::SocketLb))
        {
            testbed.start_underpass(opts, &service, &slice)?;
        }
        // Many short-lived sockets per run: as in the other benches.
        for namespace in [&testbed.topo.nodes[0]]
            .into_iter()
            .chain(testbed.topo.pods.iter().map(|p| &p.namespace))
        {
            namespace.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
            namespace.sysctl("net.ipv4.ip_local_port_range", "10000 65535")?;
        }
        Ok(testbed)
    }

    /// `design`'s client runs in `netns` (an index of `netns_paths`) and
    /// connects to `address`.
    fn reach(&mut self, design: Design, netns: usize, address: Ipv4Addr, cgroup: Option<PathBuf>) {
        let netns = self.netns_paths()[netns].clone();
        self.endpoints.insert(
            design,
            Endpoint {
                netns,
                cgroup,
                target: SocketAddr::V4(SocketAddrV4::new(address, HTTP_PORT)),
            },
        );
    }

    /// Every namespace a client can run in: the first node, then the pods.
    fn netns_paths(&self) -> Vec<PathBuf> {
        std::iter::once(self.topo.nodes[0].path().to_owned())
            .chain(self.topo.pods.iter().map(|p| p.namespace.path().to_owned()))
            .collect()
    }

    /// The index in `netns_paths` of pod `role`.
    fn netns_of(&self, role: &str) -> usize {
        1 + self
            .topo
            .pods
            .iter()
            .position(|p| p.role == role)
            .unwrap_or_else(|| panic!("no pod {role}"))
    }

    /// The ipvlan design, or why this kernel cannot build it.
    fn add_ipvlan(&mut self) -> Result<()> {
        let added = self
            .topo
            .add_ipvlan_pod(&pod("iclient", 0, [10, 77, 0, 12]))
            .map(drop)
            .and_then(|()| {
                self.topo
                    .add_ipvlan_pod(&pod("iserver", 1, [10, 77, 0, 14]))
                    .map(drop)
            });
        match added {
            Ok(()) => {
                let iserver = self.topo.pod("iserver");
                let address = iserver.address;
                self.servers
                    .push(nginx::start(&iserver.namespace, address, SERVER_CPU)?);
                self.reach(Design::Ipvlan, self.netns_of("iclient"), address, None);
            }
            Err(error) if error.is_unsupported() => {
                self.unavailable
                    .insert(Design::Ipvlan, error.reason.clone());
            }
            Err(error) => return Err(error.into()),
        }
        Ok(())
    }

    /// The veth designs (routed, VXLAN, via a router) asked for directly
    /// or by a ClusterIP design on their pods; returns the Service
    /// objects of those ClusterIP designs.
    fn add_routed_designs(
        &mut self,
        designs: &[Design],
    ) -> Result<Vec<(k8s_openapi::api::core::v1::Service, EndpointSlice)>> {
        let mut services = Vec::new();
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
                    Design::Vxlan => self.topo.add_overlay_pod(spec),
                    Design::Router => self.topo.add_veth_pod_via_router(spec),
                    _ => self.topo.add_veth_pod(spec),
                }
                .with_context(building)?;
            }
            let server_pod = self.topo.pod(server_spec.role);
            let server = server_pod.address;
            self.servers.push(
                nginx::start(&server_pod.namespace, server, SERVER_CPU).with_context(building)?,
            );
            let client_netns = self.netns_of(client.role);
            self.reach(design, client_netns, server, None);
            let through_node = match design {
                Design::VethRouted => Some((Design::VethKubeProxy, VETH_VIP)),
                Design::Vxlan => Some((Design::VxlanKubeProxy, VXLAN_VIP)),
                _ => None,
            };
            if let Some((service_design, vip)) = through_node
                && designs.contains(&service_design)
            {
                services.push(service_objects(
                    &format!("latency-{}", server_spec.role),
                    vip,
                    &[(HTTP_PORT, HTTP_PORT)],
                    &[server],
                ));
                self.reach(service_design, client_netns, vip, None);
            }
        }
        Ok(services)
    }

    /// The underpass agent serving the macvlan server's ClusterIP: the
    /// TC design's client is attached by it, the socket-LB design's client
    /// runs in its cgroup (and has no TC program).
    fn start_underpass(
        &mut self,
        opts: &LatencyOpts,
        service: &k8s_openapi::api::core::v1::Service,
        slice: &EndpointSlice,
    ) -> Result<()> {
        let group = Cgroup::create(&format!("{}-latency", self.topo.prefix))?;
        self.agent = Some(start_bench_agent(
            opts.underpass.as_deref(),
            &self.topo,
            &group,
            &[(service.clone(), slice.clone())],
            &["client"],
            false,
        )?);
        self.reach(Design::Underpass, self.netns_of("client"), VIP, None);
        let cgroup = Some(group.path().to_owned());
        self.reach(Design::SocketLb, self.netns_of("mclient"), VIP, cgroup);
        self._cgroup = Some(group);
        Ok(())
    }

    /// Stops the agent (its pins go with it); the rest goes on drop.
    pub(super) fn stop(self) {
        if let Some((mut agent, _manifests)) = self.agent {
            agent.stop();
        }
    }

    /// Readies the nodes for `design` under `tuning`: kube-proxy's rules
    /// where the design or tuning has them and only then (removed whole,
    /// checked gone), the client's service route through its node for the
    /// kube-proxy design, NOTRACK, RPS/XPS; and every namespace's
    /// conntrack table flushed, so no measurement meets another's
    /// entries.
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
                if state.kube_proxy[n] {
                    remove_kube_proxy(node, KubeProxy::Iptables, IpFamily::V4)?;
                } else {
                    install_kube_proxy(node, ports, KubeProxy::Iptables, IpFamily::V4, None)?;
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
        let namespaces = self
            .topo
            .nodes
            .iter()
            .chain(self.topo.pods.iter().map(|p| &p.namespace));
        for namespace in namespaces {
            flush_conntrack(namespace)?;
        }
        if self.endpoints.contains_key(&Design::KubeProxy) {
            self.topo
                .route_via_node("client", SERVICE_CIDR, design == Design::KubeProxy)?;
        }
        Ok(())
    }

    pub(super) fn measure(
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
        // The table whole: flushed chains would stay hooked in.
        return delete_table(node, "ip raw");
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

/// How every measurement is shaped.
pub(super) struct Shape {
    pub(super) connections: usize,
    pub(super) seconds: f64,
    pub(super) warmup: f64,
}
