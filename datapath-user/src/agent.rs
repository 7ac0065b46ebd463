//! `underpass agent`: sources → store → translate → reconcile, plus pod
//! attachment, socket-LB and the metrics endpoint.
//!
//! Restart safety comes from pins: maps and links live in bpffs, so the
//! datapath keeps translating while no agent runs, and a starting agent
//! adopts them (same maps, same ids, programs replaced in their links).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use datapath_common::sock_lb::SockLbScope;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::{
    Datapath, LoadOptions, TcMode,
    attach::{PodAttacher, Selector},
    datapath_events, features, http,
    k8s::{
        Issue, IssueKind, NodeContext, ObjectKey,
        source::{self, SourceMessage},
        store::{Change, Kind, Store},
    },
    loader::{CtTimeouts, DatapathLog, MapSizes},
    map_pins::PinPolicy,
    maps::{DatapathMaps, LbMaps},
    metrics::{IssueLabels, Metrics, SyncLabels},
    reconcile::Reconciler,
    sock_lb_skip::SockLbSkip,
    udp_terminate::{SocketTerminator, UdpSocketTerminator},
};

/// How often services whose map writes failed are tried again.
const RETRY_INTERVAL: Duration = Duration::from_secs(10);

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
    pub metrics_address: SocketAddr,
    pub debounce: Duration,
    pub sizes: MapSizes,
    pub ct_timeouts: CtTimeouts,
    /// Which rare datapath events are logged (fixed at load).
    pub datapath_log: DatapathLog,
}

/// Store and reconciler, driven one batch of changes at a time. The async
/// loop below feeds it; the bench drives it directly.
pub struct AgentCore<M> {
    pub store: Store,
    reconciler: Reconciler<M>,
    node: NodeContext,
    metrics: Arc<Metrics>,
    /// Standing issues per service (logged when they change).
    issues: BTreeMap<ObjectKey, Vec<Issue>>,
    /// Services whose last update hit a map write failure: retried after
    /// the start-up prune and periodically.
    failed: BTreeSet<ObjectKey>,
    /// A source could not read everything at start: no pruning of
    /// frontends that nothing seems to ask for.
    incomplete: bool,
    /// Moves connected UDP sockets off departed backends (none: nobody
    /// does, e.g. without socket-LB).
    terminator: Option<Box<dyn SocketTerminator>>,
}

/// What one sync did.
#[derive(Debug, Default, Clone, Copy)]
pub struct SyncStats {
    pub services: usize,
    pub written: usize,
    pub removed: usize,
    pub issues: usize,
}

impl<M: LbMaps> AgentCore<M> {
    pub fn new(mut reconciler: Reconciler<M>, node: NodeContext, metrics: Arc<Metrics>) -> Self {
        reconciler.set_node_name(node.node_name.as_deref());
        Self {
            store: Store::default(),
            reconciler,
            node,
            metrics,
            issues: BTreeMap::new(),
            failed: BTreeSet::new(),
            incomplete: false,
            terminator: None,
        }
    }

    /// Hands the backends that leave UDP frontends to `terminator`.
    pub fn with_terminator(mut self, terminator: Box<dyn SocketTerminator>) -> Self {
        self.terminator = Some(terminator);
        self
    }

    pub fn reconciler(&self) -> &Reconciler<M> {
        &self.reconciler
    }

    /// Every service, then prune what nothing asks for. The first sync
    /// after adopting the maps.
    pub fn full_sync(&mut self) -> SyncStats {
        let started = Instant::now();
        let all: BTreeSet<ObjectKey> = self.store.service_keys().cloned().collect();
        // Services the maps hold but the store lacks are gone: nothing
        // asks for their frontends, so prune removes them.
        let mut stats = self.sync(all);
        if self.incomplete {
            warn!("not pruning frontends nothing asks for: a source could not read everything");
        }
        match self.reconciler.prune(self.incomplete) {
            Ok(report) => info!(
                frontends = report.frontends,
                backends = report.backends,
                reverse_nat = report.rev_nats,
                stray_slots = report.stray_slots,
                filter_buckets = report.filter_buckets,
                "pruned entries nothing asks for"
            ),
            Err(issues) => {
                for issue in &issues {
                    warn!("prune: {issue}");
                }
                stats.issues += issues.len();
            }
        }
        // What failed for lack of room may fit now that prune freed some.
        let failed = std::mem::take(&mut self.failed);
        let retry = self.sync(failed);
        stats.written += retry.written;
        self.metrics
            .sync_duration
            .get_or_create(&SyncLabels { kind: "full" })
            .observe(started.elapsed().as_secs_f64());
        self.update_gauges();
        stats
    }

    /// Re-translates `dirty` services and applies the difference.
    pub fn sync(&mut self, dirty: BTreeSet<ObjectKey>) -> SyncStats {
        let mut stats = SyncStats::default();
        // In name order, so a contested frontend goes to the first service
        // by namespace/name, as `translate()` gives it.
        let mut queue: std::collections::VecDeque<ObjectKey> = dirty.into_iter().collect();
        let mut done = BTreeSet::new();
        // Retries are bounded: each one follows a frontend's release.
        let mut budget = queue.len() * 4 + 64;
        let mut departed = Vec::new();
        while let Some(service) = queue.pop_front() {
            if !done.insert(service.clone()) {
                continue;
            }
            budget = budget.saturating_sub(1);
            let translation = self.store.translate(&service, &self.node);
            let mut outcome = self.reconciler.update_service(&service, &translation);
            departed.append(&mut outcome.departed);
            stats.services += 1;
            stats.written += outcome.frontends_written;
            stats.removed += outcome.frontends_removed;
            let mut issues = translation.issues;
            issues.extend(outcome.issues);
            stats.issues += issues.len();
            if issues.iter().any(|i| i.kind == IssueKind::Datapath) {
                self.failed.insert(service.clone());
            } else {
                self.failed.remove(&service);
            }
            self.record_issues(&service, issues);
            if budget > 0 {
                for waiter in outcome.retry {
                    done.remove(&waiter);
                    queue.push_back(waiter);
                }
            }
        }
        if !departed.is_empty()
            && let Some(terminator) = &mut self.terminator
        {
            terminator.terminate(&departed);
        }
        stats
    }

    /// Logs and counts issues that are new for `service`.
    fn record_issues(&mut self, service: &ObjectKey, issues: Vec<Issue>) {
        let previous = self.issues.remove(service).unwrap_or_default();
        for issue in &issues {
            if !previous.contains(issue) {
                warn!("{issue}");
                self.metrics
                    .issues_total
                    .get_or_create(&IssueLabels {
                        kind: issue.kind.as_str(),
                    })
                    .inc();
            }
        }
        for issue in &previous {
            self.metrics
                .issues
                .get_or_create(&IssueLabels {
                    kind: issue.kind.as_str(),
                })
                .dec();
        }
        for issue in &issues {
            self.metrics
                .issues
                .get_or_create(&IssueLabels {
                    kind: issue.kind.as_str(),
                })
                .inc();
        }
        if !issues.is_empty() {
            self.issues.insert(service.clone(), issues);
        }
    }

    pub fn update_gauges(&self) {
        self.metrics.services.set(self.store.service_count() as i64);
        self.metrics
            .frontends
            .set(self.reconciler.frontend_count() as i64);
        self.metrics
            .backends
            .set(self.reconciler.backend_count() as i64);
    }

    /// Drives the core from `rx` until it closes: waits until every kind
    /// has been delivered once, syncs everything, then applies changes in
    /// batches (what arrives within `debounce` of the first).
    pub async fn run(mut self, mut rx: mpsc::Receiver<SourceMessage>, debounce: Duration) {
        let mut waiting: BTreeSet<Kind> = [Kind::Service, Kind::EndpointSlice].into();
        while !waiting.is_empty() {
            match rx.recv().await {
                None => return,
                Some(SourceMessage::Synced(kind)) => {
                    waiting.remove(&kind);
                }
                Some(message) => {
                    self.take(message);
                }
            }
        }
        let stats = self.full_sync();
        info!(
            services = self.store.service_count(),
            slices = self.store.slice_count(),
            frontends = self.reconciler.frontend_count(),
            backends = self.reconciler.backend_count(),
            written = stats.written,
            issues = stats.issues,
            "first full sync done: the maps match the cluster"
        );
        self.metrics.synced.store(true, Ordering::Relaxed);
        release_free_memory();
        let mut retry = tokio::time::interval(RETRY_INTERVAL);
        retry.tick().await;
        loop {
            let message = tokio::select! {
                message = rx.recv() => message,
                _ = retry.tick() => {
                    if !self.failed.is_empty() {
                        let failed = std::mem::take(&mut self.failed);
                        self.sync(failed);
                        self.update_gauges();
                    }
                    continue;
                }
            };
            let Some(message) = message else {
                return;
            };
            let started = Instant::now();
            let mut dirty = self.take(message);
            if !debounce.is_zero() {
                tokio::time::sleep(debounce).await;
            }
            while let Ok(message) = rx.try_recv() {
                dirty.extend(self.take(message));
            }
            if dirty.is_empty() {
                continue;
            }
            let stats = self.sync(dirty);
            self.metrics
                .sync_duration
                .get_or_create(&SyncLabels {
                    kind: "incremental",
                })
                .observe(started.elapsed().as_secs_f64());
            self.update_gauges();
            tracing::debug!(?stats, "incremental sync");
        }
    }

    fn take(&mut self, message: SourceMessage) -> BTreeSet<ObjectKey> {
        match message {
            SourceMessage::Change(change) => self.store.apply(change),
            SourceMessage::Synced(_) => BTreeSet::new(),
            SourceMessage::Incomplete(reason) => {
                warn!("{reason}");
                self.incomplete = true;
                BTreeSet::new()
            }
            SourceMessage::Problem { kind, message } => {
                warn!("{message}");
                self.metrics
                    .issues_total
                    .get_or_create(&IssueLabels {
                        kind: kind.as_str(),
                    })
                    .inc();
                BTreeSet::new()
            }
        }
    }

    /// Applies one change now (the bench's entry point).
    pub fn apply_now(&mut self, change: Change) -> SyncStats {
        let dirty = self.store.apply(change);
        self.sync(dirty)
    }
}

/// Runs the agent until SIGINT/SIGTERM. Leaves maps and links pinned:
/// the datapath keeps serving while no agent runs.
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
    let load = LoadOptions {
        pin_dir: Some(options.pin_dir.clone()),
        sizes: options.sizes.clone(),
        ct_timeouts: options.ct_timeouts,
        // The agent owns the pins: one made by another version, or with
        // another size, is replaced.
        pin_policy: PinPolicy::Own,
        feature_bits: Some(plan.feature_bits),
        sock_lb_scope: if options.socket_lb_host_only || options.socket_lb_skip.is_some() {
            SockLbScope {
                // SO_NETNS_COOKIE: Linux 5.14, needed only when scoped.
                host_netns_cookie: crate::pod_routes::netns_cookie(Path::new(
                    "/proc/self/ns/net",
                ))
                .context("reading this (the host's) network namespace cookie for --socket-lb scoping (Linux 5.14+)")?,
                host_only: u32::from(options.socket_lb_host_only),
                skip_listed: u32::from(options.socket_lb_skip.is_some()),
            }
        } else {
            SockLbScope::ALL
        },
        datapath_log: options.datapath_log,
    };
    let mut datapath = Datapath::load(&load).context("loading the datapath")?;
    // Read from the start: an event of the first packets is kept.
    if let Some(events) = datapath
        .take_event_log(log::logger())
        .context("reading the datapath's event log")?
    {
        tokio::spawn(datapath_events::forward(events));
    }
    info!(pin_dir = %options.pin_dir.display(), "datapath loaded; maps pinned (existing pins adopted)");
    let maps = DatapathMaps::open_pinned(&options.pin_dir).context("opening the pinned maps")?;
    let metrics = Metrics::new(Some(&options.pin_dir));

    let listener = http::bind(options.metrics_address).await?;
    info!(address = %options.metrics_address, "serving /metrics, /healthz, /readyz");
    tokio::spawn(http::serve(listener, metrics.clone()));

    let stop = Arc::new(AtomicBool::new(false));
    let (mut pods, mut bare) = match &options.netns_dir {
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
            (Some(pods), None)
        }
        None => (None, Some(datapath)),
    };
    let mut skip = match (&options.socket_lb_skip, &options.cgroup) {
        (Some(pattern), Some(_)) => Some(
            SockLbSkip::open(
                &options.pin_dir,
                options
                    .netns_dir
                    .clone()
                    .unwrap_or_else(|| crate::netns::NETNS_RUN_DIR.into()),
                pattern.clone(),
            )
            .context("opening SOCK_LB_SKIP")?,
        ),
        _ => None,
    };
    // Programs are attached (swapped into existing links) only after the
    // first full sync: a map this start replaced (`map_pins`) is empty
    // until then, and programs using it would drop service traffic that
    // the previous ones still translate. Ready means synced and attached.
    let attach_thread = {
        let stop = stop.clone();
        let metrics = metrics.clone();
        let interval = options.netns_interval;
        let cgroup = options.cgroup.clone();
        std::thread::spawn(move || {
            while !metrics.synced.load(Ordering::Relaxed) {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            {
                let datapath = match (pods.as_mut(), bare.as_mut()) {
                    (Some(pods), _) => pods.datapath_mut(),
                    (None, Some(datapath)) => datapath,
                    (None, None) => unreachable!("one of the two holds the datapath"),
                };
                if let Err(e) = datapath.pin_tc_programs() {
                    warn!("pinning the TC programs for the CNI plugin: {e}");
                }
            }
            // Socket-LB is attached before the first scan, and tried again
            // every scan while it fails (pods are served meanwhile; the
            // agent is not ready until it is attached).
            let mut socket_lb_pending = cgroup.clone();
            let mut last_socket_lb_error = String::new();
            while !stop.load(Ordering::Relaxed) {
                if let Some(cgroup) = socket_lb_pending.clone() {
                    let datapath = match (pods.as_mut(), bare.as_mut()) {
                        (Some(pods), _) => pods.datapath_mut(),
                        (None, Some(datapath)) => datapath,
                        (None, None) => unreachable!("one of the two holds the datapath"),
                    };
                    match datapath.attach_sock(&cgroup) {
                        Ok(_) => {
                            info!(cgroup = %cgroup.display(), "socket-LB attached");
                            socket_lb_pending = None;
                        }
                        Err(e) if e.to_string() != last_socket_lb_error => {
                            last_socket_lb_error = e.to_string();
                            tracing::error!(
                                cgroup = %cgroup.display(),
                                "attaching socket-LB to the cgroup (--cgroup), retrying: {e}"
                            );
                        }
                        Err(_) => {}
                    }
                }
                if let Some(attacher) = pods.as_mut() {
                    let report = attacher.scan();
                    for (netns, iface) in &report.attached {
                        info!(netns, iface, "attached");
                    }
                    for (netns, iface) in &report.detached {
                        info!(netns, iface, "detached (gone)");
                    }
                    for (netns, iface) in &report.repaired {
                        warn!(
                            netns,
                            iface, "our programs were detached by someone else: attached again"
                        );
                        metrics.attachments_repaired.inc();
                    }
                    for (netns, iface) in &report.refreshed {
                        info!(
                            netns,
                            iface,
                            "attached by the CNI plugin with other programs: ours swapped in"
                        );
                    }
                    for (netns, iface, error) in &report.errors {
                        warn!(netns, iface, "attach: {error}");
                    }
                    metrics
                        .attached_interfaces
                        .set(attacher.attached().len() as i64);
                }
                if let Some(skip) = skip.as_mut() {
                    match skip.sync() {
                        Ok(report) => {
                            for netns in report.added {
                                info!(netns, "socket-LB skips this pod: TC path");
                            }
                            for netns in report.removed {
                                info!(netns, "socket-LB skip list: pod gone");
                            }
                            for (netns, error) in report.errors {
                                warn!(netns, "socket-LB skip list: {error}");
                            }
                        }
                        Err(e) => warn!("socket-LB skip list: {e}"),
                    }
                }
                metrics
                    .ready
                    .store(socket_lb_pending.is_none(), Ordering::Relaxed);
                let deadline = Instant::now() + interval;
                while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(20).min(interval));
                }
            }
        })
    };

    let (tx, rx) = mpsc::channel(1024);
    let source = match &options.source {
        SourceConfig::Kubernetes { .. } => {
            let client = client.context("the Kubernetes client was built above")?;
            tokio::spawn(source::watch_api(client, tx))
        }
        SourceConfig::Directory { dir, interval } => {
            info!(dir = %dir.display(), "reading manifests from a directory");
            tokio::spawn(source::watch_dir(dir.clone(), *interval, tx))
        }
    };
    let reconciler = Reconciler::adopt(maps).context("reading the pinned maps")?;
    let mut core = AgentCore::new(reconciler, options.node.clone(), metrics.clone());
    if plan.udp_socket_termination {
        let netns_dir = options
            .netns_dir
            .clone()
            .unwrap_or_else(|| crate::netns::NETNS_RUN_DIR.into());
        let terminator = UdpSocketTerminator::open(&options.pin_dir, netns_dir, metrics.clone())
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

async fn kube_client(
    kubeconfig: Option<&PathBuf>,
    api_server: Option<&str>,
) -> Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading --kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &Default::default())
                .await
                .with_context(|| format!("using --kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer().await.context(
            "finding the API server (in-cluster service account, KUBECONFIG or ~/.kube/config); \
             use --from-dir to run without one",
        )?,
    };
    let config = match api_server {
        Some(address) => with_api_server(config, address)?,
        None => config,
    };
    kube::Client::try_from(config).context("building the Kubernetes client")
}

/// `config` (its credentials and CA) pointed at `address` instead of the
/// server it names: `https://HOST:PORT`, or `HOST:PORT` (https implied).
pub fn with_api_server(mut config: kube::Config, address: &str) -> Result<kube::Config> {
    let url = if address.contains("://") {
        address.to_owned()
    } else {
        format!("https://{address}")
    };
    config.cluster_url = url
        .parse()
        .with_context(|| format!("--api-server {address:?} is not a URL (https://HOST:PORT)"))?;
    if config.cluster_url.host().is_none() {
        anyhow::bail!("--api-server {address:?} names no host (https://HOST:PORT)");
    }
    Ok(config)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Gives the memory freed after the first sync (the initial list, parsed
/// manifests) back to the kernel: glibc keeps freed heap otherwise, and
/// the agent's RSS would stay at its start-up peak.
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free heap pages.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_api_server_address_replaces_the_credentials_one_and_keeps_the_rest() {
        let mut base = kube::Config::new("https://10.96.0.1:443".parse().unwrap());
        base.default_namespace = "kube-system".into();
        let config = with_api_server(base.clone(), "192.0.2.10:6443").unwrap();
        assert_eq!(config.cluster_url.to_string(), "https://192.0.2.10:6443/");
        assert_eq!(config.default_namespace, "kube-system");
        let config = with_api_server(base.clone(), "https://api.example:6443").unwrap();
        assert_eq!(config.cluster_url.host(), Some("api.example"));
        let error = with_api_server(base, "https://").unwrap_err().to_string();
        assert!(error.contains("--api-server"), "{error}");
    }
}
