//! The scale bench's testbed: the two-node topology with a client pod
//! and a server pod, each point's Service objects and the change applied
//! to them, and each datapath programmed, changed and measured.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use datapath_user::{
    Datapath, LoadOptions,
    agent::AgentCore,
    k8s::{NodeContext, Object, store::Change, store::Kind as StoreKind},
    loader::{MapSizes, TcMode},
    metrics::Metrics,
    reconcile::Reconciler,
};
use lab::{Offloads, PodSpec, Topology, standard_pods};

use super::ScalePoint;
use crate::{
    agent::{endpoint_address, service, service_address, slice},
    cluster::{
        KubeProxy, SERVICE_CIDR, install_kube_proxy, kube_proxy_options, remove_kube_proxy,
        run_in_limited,
    },
    kubeproxy::{self, ServicePort, service_ports},
    workload::{
        BenchCgroups, ClientPlace, Kind, Measurement, Parameters, SERVER_CPU, ServerProcess,
        run_worker, start_echo_server,
    },
};

/// The measured service's port and its endpoint's (the echo server's).
const SERVICE_PORT: u16 = 80;
const TARGET_PORT: u16 = 8080;

/// The objects of one point, and the change applied to them.
pub(super) struct Sweep {
    services: Vec<k8s_openapi::api::core::v1::Service>,
    slices: Vec<k8s_openapi::api::discovery::v1::EndpointSlice>,
    ports: Vec<ServicePort>,
    /// Endpoints per service.
    endpoints: usize,
    /// The measured service: the middle of kube-proxy's sorted rules.
    target: usize,
    /// The rollout step: service 0's first endpoint replaced.
    changed_ports: Vec<ServicePort>,
    before: ServicePort,
    after: ServicePort,
    changed_slice: k8s_openapi::api::discovery::v1::EndpointSlice,
}

impl Sweep {
    pub(super) fn new(n: usize, m: usize, server: Ipv4Addr) -> Result<Self> {
        let (services, mut slices) = objects(n, m);
        let sorted = service_ports(&services, &slices);
        let middle = &sorted[sorted.len() / 2].name;
        let target: usize = middle
            .strip_prefix("svc-")
            .and_then(|i| i.parse().ok())
            .with_context(|| format!("service name {middle}"))?;
        slices[target] = slice(target, [server]);
        let ports = service_ports(&services, &slices);
        let fresh = endpoint_address((n * m + 7) as u64);
        let mut changed_ports = ports.clone();
        let changed = changed_ports
            .iter_mut()
            .find(|p| p.name == "svc-0")
            .context("service 0")?;
        let before = changed.clone();
        changed.endpoints[0] = (fresh, TARGET_PORT);
        changed.endpoints.sort_by_key(|(a, p)| format!("{a}:{p}"));
        let after = changed.clone();
        let mut changed_slice = slices[0].clone();
        if let Some(endpoints) = changed_slice.endpoints.as_mut() {
            endpoints[0].addresses = vec![fresh.to_string()];
        }
        Ok(Self {
            services,
            slices,
            ports,
            endpoints: m,
            target,
            changed_ports,
            before,
            after,
            changed_slice,
        })
    }

    pub(super) fn target_address(&self) -> SocketAddrV4 {
        SocketAddrV4::new(service_address(self.target), SERVICE_PORT)
    }
}

/// What one datapath measured at one point.
pub(super) struct Outcome {
    program: Duration,
    change: Duration,
    crr: Vec<Measurement>,
}

impl Outcome {
    pub(super) fn fill(self, point: &mut ScalePoint) {
        point.program_ms = Some(self.program.as_secs_f64() * 1e3);
        point.one_change_ms = Some(self.change.as_secs_f64() * 1e3);
        if !self.crr.is_empty() {
            let median = |pick: fn(&Measurement) -> f64| {
                let mut values: Vec<f64> = self.crr.iter().map(pick).collect();
                values.sort_by(f64::total_cmp);
                values[values.len() / 2]
            };
            point.crr_per_second = Some(median(|m| m.per_second));
            point.crr_p99_us = Some(median(|m| m.p99_us.unwrap_or(f64::NAN)));
        }
        point.crr_runs = self.crr;
    }
}

/// How much TCP_CRR to run at each point.
pub(super) struct Crr {
    pub(super) seconds: f64,
    pub(super) runs: usize,
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

    pub(super) fn crr(&self, sweep: &Sweep, crr: &Crr) -> Result<Vec<Measurement>> {
        if crr.seconds <= 0.0 {
            return Ok(Vec::new());
        }
        (0..crr.runs)
            .map(|_| {
                let place = ClientPlace {
                    netns: self.topo.pod("client").namespace.path(),
                    cgroup: self.cgroups.clients.path(),
                    server_cgroup: self.cgroups.servers.path(),
                    agent_cgroup: None,
                };
                let run = Parameters {
                    seconds: crr.seconds,
                    ..Kind::Crr.seed_parameters()
                };
                let measurement =
                    run_worker(place, Kind::Crr, sweep.target_address().into(), &run)?;
                ensure!(
                    measurement.transactions > 0,
                    "TCP_CRR to {}: no transaction completed",
                    sweep.target_address()
                );
                Ok(measurement)
            })
            .collect()
    }

    /// kube-proxy's rules in the client's node: program, measure, change,
    /// remove.
    pub(super) fn kube_proxy(
        &self,
        sweep: &Sweep,
        flavour: KubeProxy,
        limit: Duration,
        crr: &Crr,
    ) -> Result<Outcome> {
        let node = &self.topo.nodes[0];
        let program = match install_kube_proxy(node, &sweep.ports, flavour, Some(limit)) {
            Ok(program) => program,
            Err(error) => {
                // Killed before its commit: nothing to keep; clear
                // whatever a partial load left.
                let _ = remove_kube_proxy(node, flavour);
                return Err(error);
            }
        };
        let measured = (|| -> Result<Outcome> {
            self.topo.route_via_node("client", SERVICE_CIDR, true)?;
            let crr = self.crr(sweep, crr)?;
            let change = match flavour {
                KubeProxy::Iptables => {
                    let removed: Vec<String> = sweep
                        .before
                        .endpoints
                        .iter()
                        .filter(|e| !sweep.after.endpoints.contains(e))
                        .map(|&e| sweep.before.sep_chain(e))
                        .collect();
                    let rewrite: BTreeSet<String> = [sweep.after.svc_chain()].into();
                    let partial = kubeproxy::iptables_restore_partial(
                        &sweep.changed_ports,
                        &kube_proxy_options(),
                        &|p| rewrite.contains(&p.svc_chain()),
                        &removed,
                    );
                    run_in_limited(
                        node,
                        "iptables-restore",
                        &["-w", "5", "--noflush"],
                        &partial,
                        Some(limit),
                    )?
                }
                KubeProxy::Nftables => {
                    let update =
                        kubeproxy::nft_update(&sweep.before, &sweep.after, &kube_proxy_options());
                    run_in_limited(node, "nft", &["-f", "-"], &update, Some(limit))?
                }
            };
            Ok(Outcome {
                program,
                change,
                crr,
            })
        })();
        let removed = remove_kube_proxy(node, flavour);
        let outcome = measured?;
        removed?;
        Ok(outcome)
    }

    /// underpass: fresh sized maps, TC on the client pod, the agent's
    /// reconciler programs every service; measure; one change.
    pub(super) fn underpass(&self, sweep: &Sweep, crr: &Crr) -> Result<Outcome> {
        let n = sweep.services.len();
        let m = sweep.endpoints;
        let need_slots = (n * (m + 1) + 1024) as u32;
        let need_backends = (n * m + 1024) as u32;
        let options = LoadOptions {
            sizes: MapSizes {
                services: need_slots.max(MapSizes::default().services),
                backends: need_backends.max(MapSizes::default().backends),
                ..MapSizes::default()
            },
            ..LoadOptions::default()
        };
        let mut datapath = Datapath::load(&options).context("loading the datapath")?;
        let client = self.topo.pod("client");
        let _attachment = datapath
            .attach_tc(Some(client.namespace.name()), "eth0", TcMode::Auto)
            .context("attaching TC to the client pod")?;
        self.topo.route_via_node("client", SERVICE_CIDR, false)?;
        let reconciler = Reconciler::adopt(&mut datapath.maps)?;
        let mut core = AgentCore::new(reconciler, NodeContext::default(), Metrics::new(None));
        let program = timed(|| {
            core.store.apply(Change::Replaced(
                StoreKind::Service,
                sweep.services.iter().map(Object::from).collect(),
            ));
            core.store.apply(Change::Replaced(
                StoreKind::EndpointSlice,
                sweep.slices.iter().map(Object::from).collect(),
            ));
            let stats = core.full_sync();
            ensure!(stats.issues == 0, "{} issues while syncing", stats.issues);
            Ok(())
        })?;
        let crr = self.crr(sweep, crr)?;
        let change = timed(|| {
            let stats = core.apply_now(Change::Applied(Object::from(&sweep.changed_slice)));
            ensure!(
                stats.written == 1,
                "the change wrote {} frontends",
                stats.written
            );
            Ok(())
        })?;
        Ok(Outcome {
            program,
            change,
            crr,
        })
    }
}

fn objects(
    n: usize,
    m: usize,
) -> (
    Vec<k8s_openapi::api::core::v1::Service>,
    Vec<k8s_openapi::api::discovery::v1::EndpointSlice>,
) {
    let m64 = m as u64;
    let services = (0..n).map(service).collect();
    let slices = (0..n)
        .map(|i| slice(i, (0..m64).map(|j| endpoint_address(i as u64 * m64 + j))))
        .collect();
    (services, slices)
}

fn timed(work: impl FnOnce() -> Result<()>) -> Result<Duration> {
    let started = Instant::now();
    work()?;
    Ok(started.elapsed())
}
