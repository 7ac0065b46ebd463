//! The agent's Prometheus metrics and readiness (served by `crate::http`).

use std::{
    path::Path,
    sync::{Arc, Mutex, OnceLock, atomic::AtomicBool},
};

use crate::k8s::IssueKind;
use aya::maps::{Map, MapData, PerCpuArray};
use datapath_common::{maps as m, metrics::Counter as DatapathCounter};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::Gauge,
        histogram::Histogram,
    },
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SyncLabels {
    /// "full" (start-up, every service) or "incremental".
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IssueLabels {
    pub kind: &'static str,
}

/// Everything the agent exports.
pub struct Metrics {
    registry: Registry,
    pub sync_duration: Family<SyncLabels, Histogram>,
    pub services: Gauge,
    pub frontends: Gauge,
    pub backends: Gauge,
    pub attached_interfaces: Gauge,
    /// Problems currently standing, by kind.
    pub issues: Family<IssueLabels, Gauge>,
    /// Problems ever raised, by kind.
    pub issues_total: Family<IssueLabels, Counter>,
    /// Connected UDP sockets destroyed because their backend left.
    pub udp_sockets_terminated: Counter,
    /// Pod interfaces found without our programs and attached again.
    pub attachments_repaired: Counter,
    /// 1 while the ingress program trusts `REPLY_FILTER` (skips
    /// conntrack for packets from unflagged peers).
    pub reply_filter_trusted: Gauge,
    /// Metrics/health connections closed at once: the cap was reached.
    pub http_connections_refused: Counter,
    /// Failed accepts on the metrics/health port (out of descriptors).
    pub http_accept_errors: Counter,
    /// The first full sync finished: the maps match the cluster.
    pub synced: AtomicBool,
    /// Synced, and then the programs attached (what /readyz reports).
    pub ready: AtomicBool,
    /// Per-frontend packets and new flows, once the agent serves them.
    service_figures: OnceLock<crate::service_metrics::ServiceFigures>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// `pin_dir`: where the datapath's counters are pinned (None: not
    /// exported).
    pub fn new(pin_dir: Option<&Path>) -> Arc<Self> {
        let mut registry = Registry::with_prefix("underpass");
        let sync_duration = Family::<SyncLabels, Histogram>::new_with_constructor(|| {
            // 100 µs … ~6.5 s.
            Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                1e-4, 2.0, 17,
            ))
        });
        registry.register(
            "sync_duration_seconds",
            "Time to bring the maps in line with a batch of changes",
            sync_duration.clone(),
        );
        let services = Gauge::default();
        registry.register(
            "services",
            "Services known to the agent (all, proxied or not)",
            services.clone(),
        );
        let frontends = Gauge::default();
        registry.register(
            "frontends",
            "Frontends (address:port/protocol) programmed",
            frontends.clone(),
        );
        let backends = Gauge::default();
        registry.register("backends", "Backend entries programmed", backends.clone());
        let attached_interfaces = Gauge::default();
        registry.register(
            "attached_interfaces",
            "Pod interfaces with the TC programs attached",
            attached_interfaces.clone(),
        );
        let issues = Family::<IssueLabels, Gauge>::default();
        registry.register(
            "issues",
            "Problems standing now (objects or fields not programmed), by kind",
            issues.clone(),
        );
        let issues_total = Family::<IssueLabels, Counter>::default();
        registry.register(
            "issues",
            "Problems raised since start, by kind",
            issues_total.clone(),
        );
        for kind in IssueKind::ALL {
            let labels = IssueLabels {
                kind: kind.as_str(),
            };
            let _ = issues.get_or_create(&labels);
            let _ = issues_total.get_or_create(&labels);
        }
        let udp_sockets_terminated = Counter::default();
        registry.register(
            "udp_sockets_terminated",
            "Connected UDP sockets destroyed because their backend left the service (the application reconnects)",
            udp_sockets_terminated.clone(),
        );
        let attachments_repaired = Counter::default();
        registry.register(
            "attachments_repaired",
            "Pod interfaces found without underpass's programs (detached by someone else) and attached again",
            attachments_repaired.clone(),
        );
        let reply_filter_trusted = Gauge::default();
        registry.register(
            "reply_filter_trusted",
            "1 while the TC ingress program skips conntrack for packets from peers no tracked flow was opened to; 0 at start and after another build's programs were replaced, until the flows in conntrack are flagged",
            reply_filter_trusted.clone(),
        );
        let http_connections_refused = Counter::default();
        registry.register(
            "http_connections_refused",
            "Connections to the metrics and health port closed unanswered because the connection cap was reached",
            http_connections_refused.clone(),
        );
        let http_accept_errors = Counter::default();
        registry.register(
            "http_accept_errors",
            "Failed accepts on the metrics and health port (the agent backs off)",
            http_accept_errors.clone(),
        );
        if let Some(dir) = pin_dir {
            registry.register_collector(Box::new(DatapathCounters::open(dir)));
        }
        Arc::new(Self {
            registry,
            sync_duration,
            services,
            frontends,
            backends,
            attached_interfaces,
            issues,
            issues_total,
            udp_sockets_terminated,
            attachments_repaired,
            reply_filter_trusted,
            http_connections_refused,
            http_accept_errors,
            synced: AtomicBool::new(false),
            ready: AtomicBool::new(false),
            service_figures: OnceLock::new(),
        })
    }

    /// Adds the per-frontend series to every scrape from now on (the
    /// agent, once its core answers label requests).
    pub fn serve_service_figures(&self, figures: crate::service_metrics::ServiceFigures) {
        let _ = self.service_figures.set(figures);
    }

    /// Everything but the per-frontend series (which need the core).
    pub fn encode(&self) -> String {
        let mut text = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            text = format!("# encoding failed: {e}\n");
        }
        text
    }

    /// What `/metrics` answers: `encode`'s families, then the
    /// per-frontend series when served.
    pub async fn encode_with_services(&self) -> String {
        use prometheus_client::encoding::text;
        let Some(figures) = self.service_figures.get() else {
            return self.encode();
        };
        let services = figures.encode().await;
        let mut out = String::new();
        let encoded = text::encode_registry(&mut out, &self.registry)
            .and_then(|()| {
                out.push_str(&services?);
                Ok(())
            })
            .and_then(|()| text::encode_eof(&mut out));
        match encoded {
            Ok(()) => out,
            Err(e) => format!("# encoding failed: {e}\n"),
        }
    }
}

/// The datapath's per-CPU counters, summed at scrape time.
struct DatapathCounters {
    map: Mutex<Option<PerCpuArray<MapData, u64>>>,
}

impl std::fmt::Debug for DatapathCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatapathCounters").finish_non_exhaustive()
    }
}

impl DatapathCounters {
    fn open(pin_dir: &Path) -> Self {
        let map = MapData::from_pin(pin_dir.join(m::COUNTERS_MAP))
            .ok()
            .and_then(|data| PerCpuArray::try_from(Map::PerCpuArray(data)).ok());
        Self {
            map: Mutex::new(map),
        }
    }
}

impl Collector for DatapathCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let guard = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let Some(map) = guard.as_ref() else {
            return Ok(());
        };
        let metric = ConstCounter::new(0u64);
        let mut family = encoder.encode_descriptor(
            "datapath_events",
            "Datapath events summed over CPUs: translations, conntrack hits and misses, drops",
            None,
            metric.metric_type(),
        )?;
        for counter in DatapathCounter::ALL {
            let Ok(values) = map.get(&(counter as u32), 0) else {
                continue;
            };
            let total: u64 = values.iter().sum();
            let labels = [("event", counter.name())];
            ConstCounter::new(total).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}
