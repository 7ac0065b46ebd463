//! `underpass agent`: sources → store → translate → reconcile, plus pod
//! attachment, socket-LB and the metrics endpoint.
//!
//! Restart safety comes from pins: maps and links live in bpffs, so the
//! datapath keeps translating while no agent runs, and a starting agent
//! adopts them (same maps, same ids, programs replaced in their links).
//!
//! One step per file: `core` (store and reconciler, one batch at a time),
//! `attach_loop` (programs onto pods and the cgroup, after the first
//! sync), `kube_client` (the API server's client); `run` here wires them.

mod attach_loop;
mod core;
mod kube_client;
mod node_lock;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result};
use datapath_common::sock_lb::SockLbScope;
use tokio::sync::mpsc;
use tracing::{info, warn};

use self::{attach_loop::AttachLoop, kube_client::kube_client, node_lock::NodeLock};
pub use self::{
    core::{AgentCore, SyncStats},
    kube_client::with_api_server,
};
use crate::{
    Datapath, LoadOptions, TcMode,
    attach::{PodAttacher, Selector},
    datapath_events,
    features::{self, Plan},
    http,
    k8s::{NodeContext, node_facts, source},
    loader::{CtTimeouts, DatapathLog, L4Checksums, MapSizes},
    map_pins::PinPolicy,
    maps::DatapathMaps,
    metrics::Metrics,
    reconcile::Reconciler,
    sock_lb_skip::SockLbSkip,
    udp_terminate::UdpSocketTerminator,
};

/// Where the agent reads the cluster from.
#[derive(Clone, Debug)]
pub enum SourceConfig {
    /// The API server: in-cluster config, or this kubeconfig file; at
    /// `api_server` when given (`with_api_server`).
    Kubernetes {
        kubeconfig: Option<PathBuf>,
        api_server: Option<String>,
    },
    /// A directory of manifests, polled.
    Directory { dir: PathBuf, interval: Duration },
}

#[derive(Clone, Debug)]
pub struct AgentOptions {
    pub pin_dir: PathBuf,
    pub source: SourceConfig,
    pub node: NodeContext,
    /// None: do not attach to pods (socket-LB only, or `underpass
    /// attach` by hand / CNI).
    pub netns_dir: Option<PathBuf>,
    pub selector: Selector,
    pub netns_interval: Duration,
    pub tc_mode: TcMode,
    /// None: no socket-LB.
    pub cgroup: Option<PathBuf>,
    /// Socket-LB for host processes only: pods take the TC path.
    pub socket_lb_host_only: bool,
    /// Pods (netns names) socket-LB leaves to the TC path.
    pub socket_lb_skip: Option<glob::Pattern>,
    /// Which pods get the TC pair once socket-LB is attached
    /// (`crate::pod_tc`).
    pub pod_tc: crate::pod_tc::PodTcPolicy,
    pub metrics_address: SocketAddr,
    pub debounce: Duration,
    pub sizes: MapSizes,
    pub ct_timeouts: CtTimeouts,
    /// Which rare datapath events are logged (fixed at load).
    pub datapath_log: DatapathLog,
    /// How translated packets get their L4 checksums (fixed at load).
    pub l4_checksums: L4Checksums,
    /// Traffic from outside served on this uplink (None: not served; an
    /// uplink program an earlier run attached is detached).
    pub uplink: Option<crate::uplink::UplinkOptions>,
}

pub async fn run(options: AgentOptions) -> Result<()> {
    crate::raise_open_files_limit();
    // What this kernel allows, before anything is loaded: a missing
    // feature the datapath cannot do without stops here, named.
    let plan = features::plan(
        crate::probe::kernel(),
        features::Wants {
            tc_mode: options.tc_mode,
            socket_lb: options.cgroup.is_some(),
        },
    )?;
    for missing in &plan.degraded {
        warn!(
            feature = missing.name,
            since = %format!("Linux {}", missing.since),
            "kernel feature missing: {}",
            missing.without
        );
    }
    // The API server's configuration first: a wrong kubeconfig fails
    // before anything is loaded or attached.
    let client = match &options.source {
        SourceConfig::Kubernetes {
            kubeconfig,
            api_server,
        } => Some(kube_client(kubeconfig.as_ref(), api_server.as_deref()).await?),
        SourceConfig::Directory { .. } => None,
    };
    // Before anything touches the pins: a second agent waits here.
    let _node_lock = NodeLock::acquire(&options.pin_dir)
        .await
        .context("taking the one-agent-per-node lock (an abstract Unix socket)")?;
    let mut datapath =
        Datapath::load(&load_options(&options, &plan)?).context("loading the datapath")?;
    // The programs this start replaces may not have flagged their flows'
    // peers: every reply is looked up until the attach loop has swapped
    // ours in everywhere and flagged what conntrack holds.
    datapath
        .maps
        .distrust_reply_filter()
        .context("resetting REPLY_FILTER's completeness flag")?;
    let maps_made_here = datapath.made_the_service_maps();
    // Before the maps are adopted: the reconciler reads the Maglev
    // settings from them.
    let uplink_index = serve_from_outside(&options, &mut datapath)?;
    // Read from the start: an event of the first packets is kept.
    let logger =
        datapath_events::RateLimited::new(log::logger(), datapath_events::EVENTS_PER_SECOND);
    if let Some(events) = datapath
        .take_event_log(logger)
        .context("reading the datapath's event log")?
    {
        tokio::spawn(datapath_events::forward(events));
    }
    info!(
        pin_dir = %options.pin_dir.display(),
        l4_checksums = ?datapath.l4_checksums(),
        "datapath loaded; maps pinned (existing pins adopted)"
    );
    let maps = DatapathMaps::open_pinned(&options.pin_dir).context("opening the pinned maps")?;
    let metrics = Metrics::new(Some(&options.pin_dir));

    let listener = http::bind(options.metrics_address).await?;
    info!(address = %options.metrics_address, "serving /metrics, /healthz, /readyz");
    tokio::spawn(http::serve(listener, metrics.clone()));

    let stop = Arc::new(AtomicBool::new(false));
    let attach_thread =
        attach_loop(&options, &plan, datapath, metrics.clone(), uplink_index)?.spawn(stop.clone());

    let (tx, rx) = mpsc::channel(1024);
    let mut node_watched = false;
    let source = match &options.source {
        SourceConfig::Kubernetes { .. } => {
            let client = client.context("the Kubernetes client was built above")?;
            // The zone and addresses from the Node, unless the operator
            // gave both.
            let node = &options.node;
            match &node.node_name {
                Some(node_name) if node.zone.is_none() || node.addresses.is_empty() => {
                    info!(node = %node_name, "following this Node's zone and addresses");
                    node_watched = true;
                    tokio::spawn(node_facts::watch_node(
                        client.clone(),
                        node_name.clone(),
                        node_facts::GivenFacts {
                            zone: node.zone.clone(),
                            addresses: node.addresses.clone(),
                        },
                        tx.clone(),
                        source::Backoff::default(),
                    ));
                }
                Some(_) => info!("this node's zone and addresses as given"),
                None => info!(
                    "no --node-name: topology hints, internalTrafficPolicy: Local and nodePorts at \
                     this node's addresses cannot be honoured"
                ),
            }
            tokio::spawn(source::watch_api(client, tx))
        }
        SourceConfig::Directory { dir, interval } => {
            info!(dir = %dir.display(), "reading manifests from a directory");
            tokio::spawn(source::watch_dir(dir.clone(), *interval, tx))
        }
    };
    let reconciler = if maps_made_here {
        // A first start (or maps replaced): nothing to adopt.
        Reconciler::new_on_empty(maps)
    } else {
        Reconciler::adopt(maps).context("reading the pinned maps")?
    };
    let (label_tx, label_rx) = mpsc::channel(8);
    metrics.serve_service_figures(crate::service_metrics::ServiceFigures::open(
        &options.pin_dir,
        label_tx,
    ));
    let mut core = AgentCore::new(reconciler, options.node.clone(), metrics.clone())
        .with_label_requests(label_rx);
    if let Some(uplink) = &options.uplink {
        // Where load balancers reach this node: the uplink's namespace.
        core = core.with_health_checks(Box::new(crate::health_check::HealthCheckServers::new(
            uplink.netns.clone(),
        )));
        if let Some(port) = uplink.node_health_port {
            let ready = metrics.clone();
            match crate::health_check::serve_node_health(
                uplink.netns.clone(),
                port,
                Arc::new(move || ready.ready.load(Ordering::Relaxed)),
            ) {
                Ok(_) => info!(
                    port,
                    "serving kube-proxy's node health endpoint (/healthz) for load balancers"
                ),
                Err(error) => {
                    warn!(port, %error, "cannot serve the node health endpoint: load balancers of Cluster services that probe it will take this node for unhealthy")
                }
            }
        }
    }
    if node_watched {
        // Bounded: an unreadable Node (RBAC, a slow API server) must not
        // keep the agent from serving.
        core = core.with_node_wait(Duration::from_secs(10));
    }
    if plan.udp_socket_termination {
        let terminator =
            UdpSocketTerminator::open(&options.pin_dir, netns_dir(&options), metrics.clone())
                .context("opening SOCK_REVERSE_NAT for UDP socket termination")?;
        core = core.with_terminator(Box::new(terminator));
    }
    let core = tokio::spawn(core.run(rx, options.debounce));

    shutdown_signal().await;
    info!("stopping; maps and links stay pinned, traffic keeps flowing");
    source.abort();
    core.abort();
    stop.store(true, Ordering::Relaxed);
    let _ = attach_thread.join();
    Ok(())
}

/// North-south: with `--uplink`, writes the uplink program's settings
/// (tables built with other ones are let go) and attaches it; without,
/// detaches one an earlier run attached. Returns the uplink's index.
fn serve_from_outside(options: &AgentOptions, datapath: &mut Datapath) -> Result<Option<u32>> {
    let Some(uplink) = &options.uplink else {
        let detached = crate::loader::detach_pinned_uplinks(&options.pin_dir)
            .context("detaching an earlier run's uplink program")?;
        if detached > 0 {
            info!(
                "no --uplink: the uplink program an earlier run attached is detached (traffic from outside is not served)"
            );
        }
        return Ok(None);
    };
    let facts = crate::uplink::read_facts(uplink.netns.as_deref(), &uplink.iface)?;
    let config = crate::uplink::settings(uplink, &facts, &options.node.addresses);
    let maps = datapath
        .maps
        .north_south
        .as_mut()
        .context("the north-south maps are missing from this load")?;
    let earlier = maps.config().context("reading NORTH_SOUTH")?;
    if earlier.maglev_table_size != 0
        && (earlier.maglev_seed, earlier.maglev_table_size)
            != (config.maglev_seed, config.maglev_table_size)
    {
        let cleared = maps.clear_tables_of().context("clearing MAGLEV_TABLE_OF")?;
        warn!(
            frontends = cleared,
            "the Maglev seed or table size changed: tables are built anew (until then new flows from outside go to the node's stack; every node must use the same)"
        );
    }
    maps.set_config(config).context("writing NORTH_SOUTH")?;
    if config.snat_address_be == 0 {
        warn!(uplink = %uplink.iface, "the uplink has no IPv4 address: flows from outside to backends on other nodes pass to the node's stack (give --snat-address)");
    }
    if !facts.forwarding {
        warn!(uplink = %uplink.iface, "the uplink does not forward (net.ipv4.conf.<uplink>.forwarding=0): the kernel answers no route lookup of the uplink program, so flows from outside to backends on other nodes pass to the node's stack");
    }
    let attached = datapath
        .attach_uplink(uplink.netns.as_deref(), &uplink.iface, uplink.xdp_mode)
        .context("attaching the uplink program")?;
    info!(
        uplink = %uplink.iface,
        how = attached.how,
        snat = %std::net::Ipv4Addr::from(config.snat_address_be.to_ne_bytes()),
        "serving nodePorts, load-balancer and external IPs from outside on the uplink (XDP)"
    );
    if let Some(caveat) =
        crate::uplink::generic_mode_caveat(attached.how, uplink.xdp_mode, &facts, &uplink.iface)
    {
        warn!("{caveat}");
    }
    Ok(Some(facts.ifindex))
}

/// What the datapath is loaded with: the agent's sizes and lifetimes, the
/// probed feature bits, the socket-LB scope.
fn load_options(options: &AgentOptions, plan: &Plan) -> Result<LoadOptions> {
    let scoped = options.socket_lb_host_only || options.socket_lb_skip.is_some();
    let sock_lb_scope = if scoped {
        SockLbScope {
            // SO_NETNS_COOKIE: Linux 5.14, needed only when scoped.
            host_netns_cookie: crate::pod_routes::netns_cookie(Path::new("/proc/self/ns/net"))
                .context(
                    "reading this (the host's) network namespace cookie for --socket-lb scoping (Linux 5.14+)",
                )?,
            host_only: u32::from(options.socket_lb_host_only),
            skip_listed: u32::from(options.socket_lb_skip.is_some()),
        }
    } else {
        SockLbScope::ALL
    };
    Ok(LoadOptions {
        pin_dir: Some(options.pin_dir.clone()),
        sizes: options.sizes.clone(),
        ct_timeouts: options.ct_timeouts,
        // The agent owns the pins: one made by another version, or with
        // another size, is replaced.
        pin_policy: PinPolicy::Own,
        feature_bits: Some(plan.feature_bits),
        sock_lb_scope,
        datapath_log: options.datapath_log,
        l4_checksums: options.l4_checksums,
    })
}

/// Where pods' namespaces are looked for (also without pod attachment:
/// socket-LB's skip list and UDP socket termination look there).
fn netns_dir(options: &AgentOptions) -> PathBuf {
    options
        .netns_dir
        .clone()
        .unwrap_or_else(|| crate::netns::NETNS_RUN_DIR.into())
}

/// The attach loop over `datapath`: pods (unless --no-pod-attach), the
/// socket-LB cgroup, the skip list.
fn attach_loop(
    options: &AgentOptions,
    plan: &Plan,
    datapath: Datapath,
    metrics: Arc<Metrics>,
    uplink_index: Option<u32>,
) -> Result<AttachLoop> {
    let (pods, bare) = match &options.netns_dir {
        Some(dir) => {
            let mut pods = PodAttacher::new(
                datapath,
                dir.clone(),
                options.selector.clone(),
                plan.tc_mode,
            );
            if plan.feature_bits & datapath_common::features::NETNS_COOKIE_TC == 0 {
                // The programs cannot look pod routes up: do not keep them.
                pods.without_pod_routes();
            }
            if let (Some(index), Some(uplink)) = (uplink_index, &options.uplink) {
                pods.follow_uplink(uplink.netns.clone(), index);
            }
            (Some(pods), None)
        }
        None => (None, Some(datapath)),
    };
    let skip = match (&options.socket_lb_skip, &options.cgroup) {
        (Some(pattern), Some(_)) => Some(
            SockLbSkip::open(&options.pin_dir, netns_dir(options), pattern.clone())
                .context("opening SOCK_LB_SKIP")?,
        ),
        _ => None,
    };
    Ok(AttachLoop {
        pods,
        bare,
        skip,
        cgroup: options.cgroup.clone(),
        pod_tc: options.pod_tc.clone(),
        interval: options.netns_interval,
        metrics,
        reply_filter_complete: false,
        reply_filter_waiting: false,
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
