//! `bench scale`: cost against the number of services, for kube-proxy's
//! iptables and nftables rules and for underpass. At each point (N
//! services × M endpoints) every datapath is programmed from nothing in
//! the client's node (kube-proxy) or on the client pod (underpass TC) of
//! the two-node topology, then measured:
//! - the time to program all N services (the full restore, the nft
//!   script, the agent's full sync into sized maps),
//! - TCP_CRR rate and p99 from the client pod to one service through it
//!   (the service in the middle of kube-proxy's sorted rule list; its one
//!   endpoint is the server pod; the others point at unused addresses and
//!   carry no traffic),
//! - the time to apply one changed EndpointSlice (kube-proxy's partial
//!   restore / nft transaction; the agent's incremental update).
//!
//! A datapath whose programming outlasts `--time-limit` is killed,
//! reported as such and skipped at larger points.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use clap::{Parser, ValueEnum};
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use datapath_user::{
    Datapath, LoadOptions,
    agent::AgentCore,
    k8s::{NodeContext, Object, store::Change, store::Kind as StoreKind},
    loader::{MapSizes, TcMode},
    metrics::Metrics,
    reconcile::Reconciler,
};
use lab::{PodSpec, Topology, standard_pods};
use serde::{Deserialize, Serialize};

use crate::{
    agent::{endpoint_address, service, service_address, slice},
    cluster::{
        KubeProxy, SERVICE_CIDR, TimedOut, install_kube_proxy, kube_proxy_options,
        remove_kube_proxy, run_in_limited,
    },
    kubeproxy::{self, ServicePort, service_ports},
    options::{Output, Repetition},
    plot::{self, Axes, Series},
    workload::{Kind, Measurement, run_worker, start_echo_server},
};

/// A datapath the sweep programs.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, ValueEnum, Serialize, Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum ScaleDatapath {
    /// kube-proxy's iptables rules (iptables-restore), in the client's node.
    Iptables,
    /// kube-proxy's nftables ruleset (nft -f), in the client's node.
    Nftables,
    /// underpass: the agent's reconciler into sized maps, TC on the pod.
    Underpass,
}

impl ScaleDatapath {
    pub const ALL: [ScaleDatapath; 3] = [
        ScaleDatapath::Iptables,
        ScaleDatapath::Nftables,
        ScaleDatapath::Underpass,
    ];

    pub fn label(self) -> &'static str {
        match self {
            ScaleDatapath::Iptables => "kube-proxy iptables",
            ScaleDatapath::Nftables => "kube-proxy nftables",
            ScaleDatapath::Underpass => "underpass",
        }
    }
}

#[derive(Parser, Debug)]
#[command(
    mut_arg("seconds", |a| a
        .default_value("3")
        .help("Seconds of TCP_CRR at each point (0 skips the data plane)")),
    mut_arg("runs", |a| a.help("TCP_CRR runs at each point (the median is reported)")),
    mut_arg("quick", |a| a.help("Small sizes only (1 and 100 services, 0.3 s of TCP_CRR), for CI")),
)]
pub struct ScaleOpts {
    /// Service counts (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,1000,10000,50000")]
    pub services: Vec<usize>,
    /// Endpoints per service (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,10")]
    pub endpoints: Vec<usize>,
    /// Datapaths (comma-separated); default: all.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub datapath: Vec<ScaleDatapath>,
    #[command(flatten)]
    pub repetition: Repetition,
    /// Seconds a datapath may take to program all services (or apply the
    /// change) before it is killed; it is then skipped at larger points.
    #[arg(long, default_value_t = 120)]
    pub time_limit: u64,
    /// --out gets scale.json and the SVG plots (program time, one change,
    /// TCP_CRR rate and p99 against N).
    #[command(flatten)]
    pub output: Output,
    /// Measure nothing: print the table and redraw the plots of an
    /// earlier run from DIR/scale.json.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["out", "json", "quick"])]
    pub replot: Option<PathBuf>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ScalePoint {
    pub services: usize,
    pub endpoints: usize,
    pub datapath: ScaleDatapath,
    /// Time to program all services; absent when it outlasted the limit.
    pub program_ms: Option<f64>,
    pub one_change_ms: Option<f64>,
    /// Median TCP_CRR rate to the measured service, transactions/s.
    pub crr_per_second: Option<f64>,
    /// Median of the runs' TCP_CRR p99, µs.
    pub crr_p99_us: Option<f64>,
    #[serde(default)]
    pub crr_runs: Vec<Measurement>,
    /// Why figures are missing (time limit, skipped).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// The measured service's port and its endpoint's (the echo server's).
const SERVICE_PORT: u16 = 80;
const TARGET_PORT: u16 = 8080;
const SERVER_CPU: usize = 1;

pub fn run(opts: &ScaleOpts) -> Result<()> {
    if let Some(dir) = &opts.replot {
        let path = dir.join("scale.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let points: Vec<ScalePoint> = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a `bench scale` result", path.display()))?;
        print_table(&points);
        plot_points(dir, &points)?;
        eprintln!("redrew the plots in {}", dir.display());
        return Ok(());
    }
    crate::require_root("the scale bench (namespaces, iptables, nft, BPF maps)")?;
    let (runs, seconds) = opts.repetition.plan(0.3);
    let sizes = if opts.repetition.quick {
        vec![1, 100]
    } else {
        opts.services.clone()
    };
    ensure!(
        sizes.iter().chain(&opts.endpoints).all(|&v| v > 0),
        "--services and --endpoints must be positive"
    );
    let datapaths: Vec<ScaleDatapath> = if opts.datapath.is_empty() {
        ScaleDatapath::ALL.to_vec()
    } else {
        opts.datapath.clone()
    };
    opts.output.prepare()?;
    lab::cleanup_on_signals();
    eprintln!("building the two-node topology…");
    let lab = Lab::build()?;
    let limit = Duration::from_secs(opts.time_limit);
    let mut points = Vec::new();
    let mut timed_out: BTreeSet<(ScaleDatapath, usize, usize)> = BTreeSet::new();
    for &n in &sizes {
        for &m in &opts.endpoints {
            eprintln!("{n} services × {m} endpoints…");
            let sweep = Sweep::new(n, m, lab.server_address)?;
            for &datapath in &datapaths {
                let mut point = ScalePoint {
                    services: n,
                    endpoints: m,
                    datapath,
                    program_ms: None,
                    one_change_ms: None,
                    crr_per_second: None,
                    crr_p99_us: None,
                    crr_runs: Vec::new(),
                    note: None,
                };
                let smaller_timed_out = timed_out
                    .iter()
                    .any(|&(d, tn, tm)| d == datapath && tn <= n && tm <= m);
                if smaller_timed_out {
                    point.note = Some(format!(
                        "skipped: exceeded the {} s limit at a smaller point",
                        opts.time_limit
                    ));
                } else {
                    let crr = Crr { seconds, runs };
                    let outcome = match datapath {
                        ScaleDatapath::Iptables => {
                            lab.kube_proxy(&sweep, KubeProxy::Iptables, limit, &crr)
                        }
                        ScaleDatapath::Nftables => {
                            lab.kube_proxy(&sweep, KubeProxy::Nftables, limit, &crr)
                        }
                        ScaleDatapath::Underpass => lab.underpass(&sweep, &crr),
                    };
                    match outcome {
                        Ok(outcome) => {
                            outcome.fill(&mut point);
                            // In-process programming cannot be killed:
                            // past the limit, larger points are skipped.
                            if point
                                .program_ms
                                .is_some_and(|ms| ms > limit.as_secs_f64() * 1e3)
                            {
                                timed_out.insert((datapath, n, m));
                                point.note = Some(format!(
                                    "programming took over the {} s limit: larger points skipped",
                                    opts.time_limit
                                ));
                            }
                        }
                        Err(error) if error.downcast_ref::<TimedOut>().is_some() => {
                            timed_out.insert((datapath, n, m));
                            point.note = Some(format!("{error:#}"));
                        }
                        Err(error) => {
                            return Err(error.context(format!(
                                "{} at {n} services × {m} endpoints",
                                datapath.label()
                            )));
                        }
                    }
                }
                points.push(report(point));
            }
        }
    }
    drop(lab);
    print_table(&points);
    opts.output.write(&points, "scale.json")?;
    if let Some(dir) = opts.output.dir() {
        plot_points(dir, &points)?;
        eprintln!("wrote scale.json and the plots to {}", dir.display());
    }
    Ok(())
}

fn print_table(points: &[ScalePoint]) {
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED).set_header(vec![
        "services",
        "endpoints",
        "datapath",
        "program all (ms)",
        "one EndpointSlice change (ms)",
        "TCP_CRR (trans/s)",
        "TCP_CRR p99 (µs)",
    ]);
    let figure = |v: Option<f64>, digits: usize| {
        v.map(|v| format!("{v:.digits$}"))
            .unwrap_or_else(|| "–".into())
    };
    for p in points {
        table.add_row(vec![
            p.services.to_string(),
            p.endpoints.to_string(),
            p.datapath.label().to_owned(),
            p.program_ms
                .map(|v| format!("{v:.1}"))
                .or_else(|| p.note.as_ref().map(|_| "over the limit".into()))
                .unwrap_or_else(|| "–".into()),
            figure(p.one_change_ms, 2),
            figure(p.crr_per_second, 0),
            figure(p.crr_p99_us, 0),
        ]);
    }
    println!("{table}");
    for p in points.iter().filter(|p| p.note.is_some()) {
        println!(
            "{} at {} × {}: {}",
            p.datapath.label(),
            p.services,
            p.endpoints,
            p.note.as_deref().unwrap_or_default()
        );
    }
}

/// Prints a point as soon as it is measured (long sweeps keep what they
/// measured if stopped).
fn report(point: ScalePoint) -> ScalePoint {
    let show = |v: Option<f64>| v.map(|v| format!("{v:.2}")).unwrap_or_else(|| "–".into());
    eprintln!(
        "  {:<20} program {:>10} ms   one change {:>8} ms   TCP_CRR {:>8}/s p99 {:>8} µs{}",
        point.datapath.label(),
        show(point.program_ms),
        show(point.one_change_ms),
        point
            .crr_per_second
            .map(|v| format!("{v:.0}"))
            .unwrap_or_else(|| "–".into()),
        point
            .crr_p99_us
            .map(|v| format!("{v:.0}"))
            .unwrap_or_else(|| "–".into()),
        point
            .note
            .as_ref()
            .map(|n| format!("   ({n})"))
            .unwrap_or_default()
    );
    point
}

/// The SVG curves against N: one colour per datapath, dashed for the
/// second (and later) endpoint count.
fn plot_points(dir: &std::path::Path, points: &[ScalePoint]) -> Result<()> {
    let endpoint_counts: BTreeSet<usize> = points.iter().map(|p| p.endpoints).collect();
    /// File, title, unit, logarithmic figure axis, the figure.
    type Chart = (
        &'static str,
        &'static str,
        &'static str,
        bool,
        fn(&ScalePoint) -> Option<f64>,
    );
    let charts: [Chart; 4] = [
        (
            "scale-program.svg",
            "Program N services from nothing",
            "milliseconds",
            true,
            |p| p.program_ms,
        ),
        (
            "scale-change.svg",
            "Apply one changed EndpointSlice",
            "milliseconds",
            true,
            |p| p.one_change_ms,
        ),
        (
            "scale-crr-rate.svg",
            "TCP_CRR to one service",
            "transactions/s",
            false,
            |p| p.crr_per_second,
        ),
        (
            "scale-crr-p99.svg",
            "TCP_CRR p99 to one service",
            "microseconds",
            false,
            |p| p.crr_p99_us,
        ),
    ];
    for (file, title, unit, log_y, pick) in charts {
        let mut series = Vec::new();
        for (colour, datapath) in ScaleDatapath::ALL.into_iter().enumerate() {
            for (nth, &m) in endpoint_counts.iter().enumerate() {
                let curve: Vec<(f64, f64)> = points
                    .iter()
                    .filter(|p| p.datapath == datapath && p.endpoints == m)
                    .filter_map(|p| Some((p.services as f64, pick(p)?)))
                    .collect();
                series.push(Series {
                    label: format!("{} ({m} endpoint{})", datapath.label(), plural(m)),
                    points: curve,
                    colour,
                    dashed: nth > 0,
                });
            }
        }
        plot::lines(
            &dir.join(file),
            &Axes {
                title,
                x: "services",
                y: unit,
                log_x: true,
                log_y,
                x_label: plot::number,
                x_ticks: None,
            },
            &series,
        )?;
    }
    Ok(())
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// The objects of one point, and the change applied to them.
struct Sweep {
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
    fn new(n: usize, m: usize, server: Ipv4Addr) -> Result<Self> {
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

    fn target_address(&self) -> SocketAddrV4 {
        SocketAddrV4::new(service_address(self.target), SERVICE_PORT)
    }
}

/// What one datapath measured at one point.
struct Outcome {
    program: Duration,
    change: Duration,
    crr: Vec<Measurement>,
}

impl Outcome {
    fn fill(self, point: &mut ScalePoint) {
        point.program_ms = Some(self.program.as_secs_f64() * 1e3);
        point.one_change_ms = Some(self.change.as_secs_f64() * 1e3);
        if !self.crr.is_empty() {
            let median = |pick: fn(&Measurement) -> f64| {
                let mut values: Vec<f64> = self.crr.iter().map(pick).collect();
                values.sort_by(f64::total_cmp);
                values[values.len() / 2]
            };
            point.crr_per_second = Some(median(|m| m.per_second));
            point.crr_p99_us = Some(median(|m| m.p99_us));
        }
        point.crr_runs = self.crr;
    }
}

/// How much TCP_CRR to run at each point.
struct Crr {
    seconds: f64,
    runs: usize,
}

/// The two-node topology: a macvlan client pod on node 0 with its
/// coordinator veth (kube-proxy's path), the echo server pod on node 1.
struct Lab {
    topo: Topology,
    server_address: Ipv4Addr,
}

impl Lab {
    fn build() -> Result<Self> {
        let pods: Vec<PodSpec> = standard_pods()
            .into_iter()
            .filter(|p| p.role == "client" || p.role == "server-b")
            .collect();
        let topo = Topology::build(&pods)?;
        let server = topo.pod("server-b");
        start_echo_server(
            &server.namespace,
            server.address,
            TARGET_PORT,
            Some(SERVER_CPU),
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
            server_address,
        })
    }

    fn crr(&self, sweep: &Sweep, crr: &Crr) -> Result<Vec<Measurement>> {
        if crr.seconds <= 0.0 {
            return Ok(Vec::new());
        }
        (0..crr.runs)
            .map(|_| {
                let measurement = run_worker(
                    self.topo.pod("client").namespace.path(),
                    None,
                    Kind::Crr,
                    sweep.target_address().into(),
                    crr.seconds,
                )?;
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
    fn kube_proxy(
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
    fn underpass(&self, sweep: &Sweep, crr: &Crr) -> Result<Outcome> {
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
