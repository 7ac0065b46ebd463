//! The agent's Prometheus metrics and its health endpoints, served over a
//! minimal HTTP/1.1 responder (GET only; a scrape is one request).

use std::{
    net::SocketAddr,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

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
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

use crate::k8s::IssueKind;

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
    /// The first full sync finished: the maps match the cluster.
    pub ready: AtomicBool,
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
            ready: AtomicBool::new(false),
        })
    }

    pub fn encode(&self) -> String {
        let mut text = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            text = format!("# encoding failed: {e}\n");
        }
        text
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

/// Serves `/metrics`, `/healthz` (the process answers) and `/readyz` (the
/// first full sync is done) until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut request = vec![0u8; 2048];
            let mut filled = 0;
            // Read up to the end of the headers (or a full buffer).
            while filled < request.len() {
                match stream.read(&mut request[filled..]).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => filled += n,
                }
                if request[..filled].windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            let head = String::from_utf8_lossy(&request[..filled]);
            let path = head
                .lines()
                .next()
                .and_then(|line| line.split_whitespace().nth(1))
                .unwrap_or("");
            let (status, content_type, body) = match path {
                "/metrics" => (
                    "200 OK",
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    metrics.encode(),
                ),
                "/healthz" => ("200 OK", "text/plain", "ok\n".to_owned()),
                "/readyz" if metrics.ready.load(Ordering::Relaxed) => {
                    ("200 OK", "text/plain", "ready\n".to_owned())
                }
                "/readyz" => (
                    "503 Service Unavailable",
                    "text/plain",
                    "waiting for the first full sync\n".to_owned(),
                ),
                _ => (
                    "404 Not Found",
                    "text/plain",
                    "try /metrics, /healthz or /readyz\n".to_owned(),
                ),
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

/// Binds the metrics address with an error that names it.
pub async fn bind(address: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(address).await.map_err(|e| {
        anyhow::anyhow!("binding the metrics and health address {address} (--metrics-address): {e}")
    })
}
