//! The scale bench's testbed: the two-node topology with a client pod
//! and a server pod, each point's Service objects and the change applied
//! to them, and each datapath programmed from the objects, resynced,
//! changed, measured and removed — like with like: kube-proxy from
//! objects to rules (its translation and payload generation included) as
//! the agent from objects to maps (loading, attaching and adopting
//! included).

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use datapath_user::{
    Datapath, DatapathMaps, LoadOptions,
    agent::AgentCore,
    k8s::{NodeContext, Object, store::Change, store::Kind as StoreKind},
    loader::{MapSizes, TcMode},
    metrics::Metrics,
    reconcile::Reconciler,
};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use lab::{Offloads, PodSpec, Topology, standard_pods};

use crate::{
    cluster::{
        KubeProxy, SERVICE_CIDR, install_kube_proxy, kube_proxy_options, remove_kube_proxy,
        run_in_limited,
    },
    family::IpFamily,
    kubeproxy::{self, ServicePort, service_ports},
    leftovers::close_time_wait,
    sweep_objects::{endpoint_address, service, service_address, slice},
    workload::{
        BenchCgroups, ClientPlace, Kind, Measurement, Parameters, SERVER_CPU, ServerProcess,
        run_worker, start_echo_server,
    },
};

use super::ScaleDatapath;

/// The measured services' port and their endpoint's (the echo server's).
const SERVICE_PORT: u16 = 80;
const TARGET_PORT: u16 = 8080;

/// Which service TCP_CRR connects to: where it sits in kube-proxy's
/// KUBE-SERVICES list decides how many rules a new connection walks.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Position {
    Middle,
    Last,
}

/// The objects of one point, and the change applied to them.
pub(super) struct Sweep {
    services: Vec<Service>,
    slices: Vec<EndpointSlice>,
    /// Endpoints per service.
    endpoints: usize,
    /// The measured services: the middle and the last of kube-proxy's
    /// sorted rules; the server pod is their one endpoint.
    middle: usize,
    last: usize,
    /// The rollout step: service 0's first endpoint replaced, and back.
    original_slice: EndpointSlice,
    changed_slice: EndpointSlice,
    /// kube-proxy's cached view (its service and endpoints maps) before
    /// and after the change: a sync translates only what changed.
    ports: Vec<ServicePort>,
    changed_ports: Vec<ServicePort>,
}

impl Sweep {
    pub(super) fn new(n: usize, m: usize, server: Ipv4Addr) -> Result<Self> {
        let (services, mut slices) = objects(n, m);
        let sorted = service_ports(&services, &slices);
        let index = |port: &ServicePort| -> Result<usize> {
            port.name
                .strip_prefix("svc-")
                .and_then(|i| i.parse().ok())
                .with_context(|| format!("service name {}", port.name))
        };
        let middle = index(&sorted[sorted.len() / 2])?;
        let last = index(sorted.last().context("no service")?)?;
        for target in [middle, last] {
            slices[target] = slice(target, [server]);
        }
        let fresh = endpoint_address((n * m + 7) as u64);
        let original_slice = slices[0].clone();
        let mut changed_slice = original_slice.clone();
        if let Some(endpoints) = changed_slice.endpoints.as_mut() {
            endpoints[0].addresses = vec![fresh.to_string()];
        }
        let ports = service_ports(&services, &slices);
        let mut changed_slices = slices.clone();
        changed_slices[0] = changed_slice.clone();
        let changed_ports = service_ports(&services, &changed_slices);
        Ok(Self {
            services,
            slices,
            ports,
            changed_ports,
            endpoints: m,
            middle,
            last,
            original_slice,
            changed_slice,
        })
    }

    pub(super) fn target(&self, position: Position) -> SocketAddrV4 {
        let index = match position {
            Position::Middle => self.middle,
            Position::Last => self.last,
        };
        SocketAddrV4::new(service_address(index), SERVICE_PORT)
    }

    /// kube-proxy's view with service 0 changed or not.
    fn ports_with(&self, changed: bool) -> &[ServicePort] {
        if changed {
            &self.changed_ports
        } else {
            &self.ports
        }
    }
}

/// A datapath programmed at one point, while `Testbed::programmed`'s
/// body runs.
pub(super) enum Programmed<'a> {
    KubeProxy(KubeProxy),
    Underpass(Box<AgentCore<&'a mut DatapathMaps>>),
}

/// The two-node topology: a macvlan client pod on node 0 with its
/// coordinator veth (kube-proxy's path), the echo server pod on node 1.
pub(super) struct Testbed {
    topo: Topology,
    _server: ServerProcess,
    /// After the server: removed once it has exited.
    cgroups: BenchCgroups,
    pub(super) server_address: Ipv4Addr,
}

impl Testbed {
    pub(super) fn build() -> Result<Self> {
        let pods: Vec<PodSpec> = standard_pods()
            .into_iter()
            .filter(|p| p.role == "client" || p.role == "server-b")
            .collect();
        let topo = Topology::build_with(&pods, Offloads::AsRealDevices)?;
        let server = topo.pod("server-b");
        let cgroups = BenchCgroups::create(&topo.prefix)?;
        let server_process = start_echo_server(
            &server.namespace,
            server.address,
            TARGET_PORT,
            SERVER_CPU,
            cgroups.servers.path(),
        )?;
        let server_address = server.address;
        topo.add_coordinator_veth("client")?;
        // As in the ClusterIP bench: TCP_CRR's TIME_WAIT sockets must
        // not exhaust the client's ports.
        for namespace in [&topo.pod("client").namespace, &topo.nodes[0]] {
            namespace.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
            namespace.sysctl("net.ipv4.ip_local_port_range", "10000 65535")?;
        }
        Ok(Self {
            topo,
            _server: server_process,
            cgroups,
            server_address,
        })
    }

    /// `ethtool -k` of every device, for the result.
    pub(super) fn offloads(&self) -> Result<Vec<lab::DeviceOffloads>> {
        Ok(self.topo.offloads()?)
    }

    /// Programs `datapath` from the objects, from nothing, within `limit`
    /// (kube-proxy is killed past it; the agent's in-process start-up is
    /// judged after the fact), runs `body` with how long that took and
    /// the programmed datapath, then removes it (kube-proxy's tables
    /// whole, checked gone; the agent's maps and links dropped).
    pub(super) fn programmed(
        &self,
        sweep: &Sweep,
        datapath: ScaleDatapath,
        limit: Duration,
        body: impl FnOnce(Duration, &mut Programmed<'_>) -> Result<()>,
    ) -> Result<()> {
        let node = &self.topo.nodes[0];
        match datapath.kube_proxy() {
            Some(flavour) => {
                let started = Instant::now();
                // kube-proxy's own steps: objects → service ports →
                // payload → restore.
                let ports = service_ports(&sweep.services, &sweep.slices);
                let installed =
                    install_kube_proxy(node, &ports, flavour, IpFamily::V4, Some(limit));
                let took = started.elapsed();
                let measured = installed.and_then(|_| {
                    self.topo.route_via_node("client", SERVICE_CIDR, true)?;
                    body(took, &mut Programmed::KubeProxy(flavour))
                });
                // Also after a kill before its commit: whatever a partial
                // load left goes.
                let removed = remove_kube_proxy(node, flavour, IpFamily::V4);
                measured?;
                removed
            }
            None => {
                self.topo.route_via_node("client", SERVICE_CIDR, false)?;
                let started = Instant::now();
                let n = sweep.services.len();
                let m = sweep.endpoints;
                let options = LoadOptions {
                    sizes: MapSizes {
                        services: ((n + 1024) as u32).max(MapSizes::default().services),
                        slots: MapSizes::slots_for(n + 1024, m).max(MapSizes::default().slots),
                        backends: ((n * m + 1024) as u32).max(MapSizes::default().backends),
                        reverse_nat: ((n + 1024) as u32).max(MapSizes::default().reverse_nat),
                        ..MapSizes::default()
                    },
                    ..LoadOptions::default()
                };
                // The agent's start-up: load, attach, adopt; then the
                // objects into the maps.
                let mut datapath = Datapath::load(&options).context("loading the datapath")?;
                let client = self.topo.pod("client");
                let _attachment = datapath
                    .attach_tc(Some(client.namespace.name()), "eth0", TcMode::Auto)
                    .context("attaching TC to the client pod")?;
                // As the agent's first start: maps it made need no reading.
                let reconciler = if datapath.made_the_service_maps() {
                    Reconciler::new_on_empty(&mut datapath.maps)
                } else {
                    Reconciler::adopt(&mut datapath.maps)?
                };
                let mut core =
                    AgentCore::new(reconciler, NodeContext::default(), Metrics::new(None));
                sync_all(&mut core, sweep)?;
                let took = started.elapsed();
                body(took, &mut Programmed::Underpass(Box::new(core)))
            }
        }
    }

    /// A full resync with everything already in place (the steady state
    /// of a periodic sync): kube-proxy regenerates and restores every
    /// rule from its cached view; the agent translates every object and
    /// writes what differs.
    pub(super) fn resync(
        &self,
        sweep: &Sweep,
        programmed: &mut Programmed<'_>,
        limit: Duration,
    ) -> Result<Duration> {
        let node = &self.topo.nodes[0];
        let options = kube_proxy_options(IpFamily::V4);
        let started = Instant::now();
        match programmed {
            Programmed::KubeProxy(KubeProxy::Iptables) => {
                let payload = kubeproxy::iptables_restore(&sweep.ports, &options);
                run_in_limited(
                    node,
                    "iptables-restore",
                    &["-w", "5", "--noflush", "--counters"],
                    &payload,
                    Some(limit),
                )?;
            }
            Programmed::KubeProxy(KubeProxy::Nftables) => {
                // One transaction: the table flushed and written anew.
                let script = format!(
                    "flush table ip kube-proxy\n{}",
                    kubeproxy::nft_ruleset(&sweep.ports, &options)
                );
                run_in_limited(node, "nft", &["-f", "-"], &script, Some(limit))?;
            }
            Programmed::Underpass(core) => sync_all(core, sweep)?,
        }
        Ok(started.elapsed())
    }

    /// `samples` changes of service 0's EndpointSlice, alternately to the
    /// changed and back to the original (so the state ends as it began),
    /// each timed from the changed object: kube-proxy translates it into
    /// its cached view, generates the partial payload and restores it;
    /// the agent translates it and writes its maps.
    pub(super) fn changes(
        &self,
        sweep: &Sweep,
        programmed: &mut Programmed<'_>,
        samples: usize,
        limit: Duration,
    ) -> Result<Vec<Duration>> {
        let node = &self.topo.nodes[0];
        let options = kube_proxy_options(IpFamily::V4);
        let mut took = Vec::with_capacity(samples);
        for sample in 0..samples.next_multiple_of(2) {
            let to_changed = sample % 2 == 0;
            let started = Instant::now();
            match programmed {
                Programmed::KubeProxy(flavour) => {
                    let slice = if to_changed {
                        &sweep.changed_slice
                    } else {
                        &sweep.original_slice
                    };
                    // The changed object translated (kube-proxy's change
                    // tracker); the rest of its view is cached.
                    let translated = service_ports(
                        std::slice::from_ref(&sweep.services[0]),
                        std::slice::from_ref(slice),
                    );
                    let new = port_of(&translated, "svc-0")?;
                    let after = sweep.ports_with(to_changed);
                    let old = port_of(sweep.ports_with(!to_changed), "svc-0")?;
                    match flavour {
                        KubeProxy::Iptables => {
                            let removed: Vec<String> = old
                                .endpoints
                                .iter()
                                .filter(|e| !new.endpoints.contains(e))
                                .map(|&e| old.sep_chain(e))
                                .collect();
                            let rewrite: BTreeSet<String> = [new.svc_chain()].into();
                            let partial = kubeproxy::iptables_restore_partial(
                                after,
                                &options,
                                &|p| rewrite.contains(&p.svc_chain()),
                                &removed,
                            );
                            run_in_limited(
                                node,
                                "iptables-restore",
                                &["-w", "5", "--noflush", "--counters"],
                                &partial,
                                Some(limit),
                            )?;
                        }
                        KubeProxy::Nftables => {
                            let update = kubeproxy::nft_update(old, new, &options);
                            run_in_limited(node, "nft", &["-f", "-"], &update, Some(limit))?;
                        }
                    }
                }
                Programmed::Underpass(core) => {
                    let slice = if to_changed {
                        &sweep.changed_slice
                    } else {
                        &sweep.original_slice
                    };
                    let stats = core.apply_now(Change::Applied(Object::from(slice)));
                    ensure!(
                        stats.written == 1,
                        "the change wrote {} frontends",
                        stats.written
                    );
                }
            }
            took.push(started.elapsed());
        }
        Ok(took)
    }

    /// One TCP_CRR run to the service at `position`, the previous run's
    /// TIME_WAIT sockets closed first.
    pub(super) fn crr(
        &self,
        sweep: &Sweep,
        position: Position,
        seconds: f64,
    ) -> Result<Measurement> {
        for namespace in [&self.topo.pod("client").namespace, &self.topo.nodes[0]] {
            close_time_wait(namespace)?;
        }
        let place = ClientPlace {
            netns: self.topo.pod("client").namespace.path(),
            cgroup: self.cgroups.clients.path(),
            server_cgroup: self.cgroups.servers.path(),
            agent_cgroup: None,
        };
        let run = Parameters {
            seconds,
            ..Kind::Crr.seed_parameters()
        };
        let target = sweep.target(position);
        let measurement = run_worker(place, Kind::Crr, target.into(), &run, None)?;
        ensure!(
            measurement.transactions > 0,
            "TCP_CRR to {target}: no transaction completed"
        );
        Ok(measurement)
    }
}

/// Every Service and EndpointSlice into the agent's store, then a full
/// sync that must program them all.
fn sync_all(core: &mut AgentCore<&mut DatapathMaps>, sweep: &Sweep) -> Result<()> {
    core.store.apply(Change::Replaced(
        StoreKind::Service,
        sweep.services.iter().map(Object::from).collect(),
    ));
    core.store.apply(Change::Replaced(
        StoreKind::EndpointSlice,
        sweep.slices.iter().map(Object::from).collect(),
    ));
    let stats = core.full_sync();
    if stats.issues > 0 {
        let first = core
            .standing_issues()
            .next()
            .map_or(String::new(), |issue| format!("; the first: {issue}"));
        bail!("{} issues while syncing{first}", stats.issues);
    }
    Ok(())
}

fn port_of<'a>(ports: &'a [ServicePort], name: &str) -> Result<&'a ServicePort> {
    ports
        .iter()
        .find(|p| p.name == name)
        .with_context(|| format!("service {name}"))
}

fn objects(n: usize, m: usize) -> (Vec<Service>, Vec<EndpointSlice>) {
    let m64 = m as u64;
    let services = (0..n).map(service).collect();
    let slices = (0..n)
        .map(|i| slice(i, (0..m64).map(|j| endpoint_address(i as u64 * m64 + j))))
        .collect();
    (services, slices)
}
