//! The agent's core: the store of Services and EndpointSlices and the
//! reconciler, driven one debounced batch of changes at a time, with the
//! issues and figures each sync leaves. The async loop feeds it; the
//! bench drives it directly.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::{
    k8s::{
        Issue, IssueKind, NodeContext, ObjectKey,
        source::SourceMessage,
        store::{Change, Kind, Store},
    },
    maps::LbMaps,
    metrics::{IssueLabels, Metrics, SyncLabels},
    reconcile::Reconciler,
    service_metrics::{FrontendLabels, LabelRequest},
    udp_terminate::SocketTerminator,
};
use datapath_common::maps::RevNatId;

/// The next label request, or never when nobody asks.
async fn next_request(requests: &mut Option<mpsc::Receiver<LabelRequest>>) -> LabelRequest {
    match requests {
        Some(rx) => match rx.recv().await {
            Some(request) => request,
            None => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

/// How often services whose map writes failed are tried again.
const RETRY_INTERVAL: Duration = Duration::from_secs(10);

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
    /// How long the first full sync waits for this node's facts (its
    /// Node is being read): without its addresses the sync would prune
    /// the nodePort frontends a previous agent programmed at them, and
    /// their flows with them. None: nothing to wait for.
    node_wait: Option<Duration>,
    /// Node facts arrived since start.
    node_read: bool,
    /// Scrapes asking who holds the frontends that counted something
    /// (`crate::service_metrics`); answered between syncs.
    label_requests: Option<mpsc::Receiver<LabelRequest>>,
    /// Health-check nodePorts (served with `--uplink`).
    health_checks: Option<Box<dyn crate::health_check::HealthChecks>>,
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
            node_wait: None,
            node_read: false,
            label_requests: None,
            health_checks: None,
        }
    }

    /// Opens, updates and closes each service's health-check nodePort.
    pub fn with_health_checks(
        mut self,
        checks: Box<dyn crate::health_check::HealthChecks>,
    ) -> Self {
        self.health_checks = Some(checks);
        self
    }

    /// Answers the per-frontend series' label requests from `requests`.
    pub fn with_label_requests(mut self, requests: mpsc::Receiver<LabelRequest>) -> Self {
        self.label_requests = Some(requests);
        self
    }

    /// Which services hold the frontends of `request`'s ids, with their
    /// ports (before the first full sync: none yet).
    pub fn answer_labels(&self, request: LabelRequest) {
        if request.reply.is_closed() {
            // The scrape gave up waiting.
            return;
        }
        let ids: foldhash::HashSet<RevNatId> = request.ids.iter().copied().collect();
        let labels = self
            .reconciler
            .holders_of(&ids)
            .into_iter()
            .map(|holder| {
                let view = self.store.service(&holder.service);
                (holder.rev_nat_id, FrontendLabels::new(holder, view))
            })
            .collect();
        let _ = request.reply.send(labels);
    }

    /// Makes the first full sync wait up to `wait` for this node's facts
    /// (`SourceMessage::Node`), as well as for the objects.
    pub fn with_node_wait(mut self, wait: Duration) -> Self {
        self.node_wait = Some(wait);
        self
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
                stray_entries = report.stray_entries,
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
        // Hashed, not ordered: at 100,000 services the name comparisons
        // of two ordered sets were a seventh of a full sync.
        let mut done = foldhash::HashSet::default();
        // Retries are bounded: each one follows a frontend's release.
        let mut budget = queue.len() * 4 + 64;
        let mut departed = Vec::new();
        let mut departed6 = Vec::new();
        // Each service's issues (its last pass, if retried).
        let mut found: foldhash::HashMap<ObjectKey, Vec<Issue>> = foldhash::HashMap::default();
        // New frontends are written together after the loop (one batch
        // per map: a first sync's 100,000 frontends are not 700,000
        // syscalls).
        self.reconciler.defer_new_frontends();
        while let Some(service) = queue.pop_front() {
            if !done.insert(service.clone()) {
                continue;
            }
            budget = budget.saturating_sub(1);
            let translation = self.store.translate(&service, &self.node);
            let mut outcome = self.reconciler.update_service(&service, &translation);
            if let Some(checks) = &mut self.health_checks {
                checks.set(&service, translation.health_check);
            }
            departed.append(&mut outcome.departed);
            departed6.append(&mut outcome.departed6);
            stats.services += 1;
            stats.written += outcome.frontends_written;
            stats.removed += outcome.frontends_removed;
            let mut issues = translation.issues;
            issues.extend(outcome.issues);
            // Recorded after the flush, with what it could not write: an
            // issue that stands across retries is not logged anew.
            found.insert(service.clone(), issues);
            if budget > 0 {
                for waiter in outcome.retry {
                    done.remove(&waiter);
                    queue.push_back(waiter);
                }
            }
        }
        for (service, issue) in self.reconciler.flush() {
            found.entry(service).or_default().push(issue);
        }
        // Services with issues are logged in name order.
        let mut found: Vec<(ObjectKey, Vec<Issue>)> = found.into_iter().collect();
        let with_issues = issues_first(&mut found);
        found[..with_issues].sort_unstable_by(|a, b| a.0.cmp(&b.0));
        for (service, issues) in found {
            stats.issues += issues.len();
            if issues.iter().any(|i| i.kind == IssueKind::Datapath) {
                self.failed.insert(service.clone());
            } else {
                self.failed.remove(&service);
            }
            self.record_issues(&service, issues);
        }
        if !(departed.is_empty() && departed6.is_empty())
            && let Some(terminator) = &mut self.terminator
        {
            terminator.terminate(&departed, &departed6);
        }
        stats
    }

    /// Every service's standing issues (what `/metrics` counts).
    pub fn standing_issues(&self) -> impl Iterator<Item = &Issue> {
        self.issues.values().flatten()
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
    /// has been delivered once, syncs everything, then applies changes: at
    /// once after a quiet spell, in batches within `debounce` of the last
    /// update.
    pub async fn run(mut self, mut rx: mpsc::Receiver<SourceMessage>, debounce: Duration) {
        let mut waiting: BTreeSet<Kind> = [Kind::Service, Kind::EndpointSlice].into();
        let node_deadline = self
            .node_wait
            .map(|wait| tokio::time::Instant::now() + wait);
        let mut node_pending = node_deadline.is_some();
        let mut requests = self.label_requests.take();
        while !waiting.is_empty() || (node_pending && !self.node_read) {
            let deadline = node_deadline.filter(|_| node_pending && !self.node_read);
            let message = tokio::select! {
                message = rx.recv() => message,
                request = next_request(&mut requests) => {
                    self.answer_labels(request);
                    continue;
                }
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)),
                    if deadline.is_some() => {
                    warn!(
                        "this node's Node was not read in time: syncing without its zone and \
                         addresses (nodePort frontends at them, and topology hints, follow once it is)"
                    );
                    node_pending = false;
                    continue;
                }
            };
            match message {
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
        crate::memory::release_free_memory();
        let mut retry = tokio::time::interval(RETRY_INTERVAL);
        retry.tick().await;
        let mut last_update = Instant::now();
        loop {
            let message = tokio::select! {
                message = rx.recv() => message,
                request = next_request(&mut requests) => {
                    self.answer_labels(request);
                    continue;
                }
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
            // A change after a quiet spell is applied at once (a lone
            // edit costs no wait); one that follows an update within
            // `debounce` waits out the rest of it, and what arrives
            // meanwhile is applied with it (a rollout's burst becomes a
            // few updates, not one per object).
            if let Some(wait) = debounce.checked_sub(last_update.elapsed())
                && !wait.is_zero()
            {
                tokio::time::sleep(wait).await;
            }
            while let Ok(message) = rx.try_recv() {
                dirty.extend(self.take(message));
            }
            if dirty.is_empty() {
                continue;
            }
            let stats = self.sync(dirty);
            last_update = Instant::now();
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
            SourceMessage::Changes(changes) => changes
                .into_iter()
                .flat_map(|change| self.store.apply(change))
                .collect(),
            SourceMessage::Synced(_) => BTreeSet::new(),
            SourceMessage::Node(facts) => {
                self.node_read = true;
                if facts.zone == self.node.zone && facts.addresses == self.node.addresses {
                    return BTreeSet::new();
                }
                info!(
                    zone = facts.zone.as_deref().unwrap_or("(none)"),
                    addresses = ?facts.addresses,
                    "this node's zone or addresses changed: every service is translated again"
                );
                self.node.zone = facts.zone;
                self.node.addresses = facts.addresses;
                self.store.service_keys().cloned().collect()
            }
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

/// Moves the services with issues to the front; returns how many there are.
fn issues_first(found: &mut [(ObjectKey, Vec<Issue>)]) -> usize {
    let mut front = 0;
    for i in 0..found.len() {
        if !found[i].1.is_empty() {
            found.swap(front, i);
            front += 1;
        }
    }
    front
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        k8s::{
            manifest,
            store::{Change, Kind},
        },
        maps::FakeMaps,
    };

    fn zone(zone: Option<&str>) -> SourceMessage {
        SourceMessage::Node(crate::k8s::source::NodeFacts {
            zone: zone.map(Into::into),
            addresses: Vec::new(),
        })
    }

    /// Slots of the one frontend programmed.
    fn slots(core: &AgentCore<FakeMaps>) -> usize {
        let services = &core.reconciler().maps().v4.services;
        assert_eq!(services.len(), 1);
        services.values().next().unwrap().1.len()
    }

    #[test]
    fn a_new_zone_translates_every_service_again() {
        let mut core = AgentCore::new(
            Reconciler::new_on_empty(FakeMaps::with_capacity(64)),
            NodeContext::default(),
            Metrics::new(None),
        );
        let text = include_str!("../../tests/fixtures/k8s/topology-hints.yaml");
        for object in manifest::parse_with(text, "topology-hints.yaml", |t| t.view()).objects {
            core.store.apply(Change::Applied(object));
        }
        core.full_sync();
        assert_eq!(slots(&core), 3, "no zone known: every ready endpoint");
        let dirty = core.take(zone(Some("zone-a")));
        assert_eq!(dirty.len(), 1, "the one service, translated again");
        core.sync(dirty);
        assert_eq!(slots(&core), 2, "zone-a's endpoints");
        assert!(
            core.take(zone(Some("zone-a"))).is_empty(),
            "the same zone again changes nothing"
        );
        let dirty = core.take(zone(None));
        core.sync(dirty);
        assert_eq!(slots(&core), 3, "the label removed: every endpoint");
    }

    /// The objects of a manifest as the store takes them.
    fn objects(text: &str) -> Vec<crate::k8s::Object> {
        manifest::parse_with(text, "fixture", |t| t.view()).objects
    }

    fn core() -> AgentCore<FakeMaps> {
        AgentCore::new(
            Reconciler::new_on_empty(FakeMaps::with_capacity(64)),
            NodeContext::default(),
            Metrics::new(None),
        )
    }

    /// Incrementally as in a full sync: a service whose external IP names
    /// another's ClusterIP holds it only until that service appears, then
    /// reports the conflict, and gets it back when the other leaves.
    #[test]
    fn a_clusterip_takes_its_frontend_back_from_an_external_ip() {
        let text = include_str!("../../tests/fixtures/k8s/external-ip-takeover.yaml");
        let (evil, dns): (Vec<_>, Vec<_>) = objects(text)
            .into_iter()
            .partition(|o| o.key().namespace() == "aaa");
        let mut core = core();
        core.full_sync();
        let frontend = crate::model::Frontend {
            address: std::net::Ipv4Addr::new(10, 96, 96, 1),
            port: 53,
            protocol: crate::model::Protocol::Udp,
        };
        let backend_of = |core: &AgentCore<FakeMaps>| {
            let maps = core.reconciler().maps();
            let (_, slots) = maps.v4.services.get(&frontend)?;
            Some(maps.v4.backends[&slots[0]].address.to_string())
        };
        for object in evil {
            let dirty = core.store.apply(Change::Applied(object));
            core.sync(dirty);
        }
        assert_eq!(
            backend_of(&core).as_deref(),
            Some("10.244.96.66"),
            "no one else asks"
        );
        let mut dns_key = None;
        for object in dns {
            dns_key.get_or_insert_with(|| object.key().clone());
            let dirty = core.store.apply(Change::Applied(object));
            core.sync(dirty);
        }
        assert_eq!(
            backend_of(&core).as_deref(),
            Some("10.244.96.1"),
            "the ClusterIP's"
        );
        let conflicts: Vec<String> = core
            .standing_issues()
            .filter(|i| i.kind == IssueKind::Conflict)
            .map(|i| format!("{} {}", i.object, i.field))
            .collect();
        assert_eq!(conflicts, ["Service aaa/evil spec.externalIPs"]);

        let dirty = core
            .store
            .apply(Change::Deleted(Kind::Service, dns_key.unwrap()));
        core.sync(dirty);
        assert_eq!(
            backend_of(&core).as_deref(),
            Some("10.244.96.66"),
            "released"
        );
        assert_eq!(
            core.standing_issues()
                .filter(|i| i.kind == IssueKind::Conflict)
                .count(),
            0
        );
    }

    /// The first full sync waits for this node's facts while its Node is
    /// read, but not for ever.
    #[tokio::test]
    async fn the_first_sync_waits_for_the_node_a_bounded_time() {
        for send_node in [true, false] {
            let metrics = Metrics::new(None);
            let core = AgentCore::new(
                Reconciler::new_on_empty(FakeMaps::with_capacity(8)),
                NodeContext::default(),
                metrics.clone(),
            )
            .with_node_wait(Duration::from_millis(600));
            let (tx, rx) = mpsc::channel(8);
            let running = tokio::spawn(core.run(rx, Duration::ZERO));
            tx.send(SourceMessage::Synced(Kind::Service)).await.unwrap();
            tx.send(SourceMessage::Synced(Kind::EndpointSlice))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert!(
                !metrics.synced.load(Ordering::Relaxed),
                "waits for the Node"
            );
            if send_node {
                tx.send(zone(Some("zone-a"))).await.unwrap();
            }
            let started = tokio::time::Instant::now();
            while !metrics.synced.load(Ordering::Relaxed) {
                assert!(started.elapsed() < Duration::from_secs(10), "never synced");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            if send_node {
                assert!(
                    started.elapsed() < Duration::from_millis(400),
                    "synced once the Node was read, not at the deadline"
                );
            }
            drop(tx);
            running.await.unwrap();
        }
    }
}
