//! Per-frontend figures in `/metrics`: `SERVICE_COUNTERS` read at scrape
//! time, each id that counted something labelled with the service holding
//! its frontend. The labels come from the agent's core (`LabelRequest`),
//! which alone knows who holds what: nothing is kept between scrapes, so
//! a node with 50,000 services pays no memory for figures nobody reads,
//! and the change path never builds a label table.

use std::{
    collections::HashMap,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use aya::maps::{Map, MapData, PerCpuArray};
use datapath_common::maps::{self as m, RevNatId, ServiceCounters};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::counter::ConstCounter,
    registry::Registry,
};
use tokio::sync::{mpsc, oneshot};

use crate::{
    k8s::{
        ObjectKey,
        translate::Claim,
        view::{ServicePortView, ServiceView},
    },
    maps::ServiceCounterMap,
    model::{Frontend, Protocol},
    reconcile::Holder,
};
use std::net::IpAddr;

/// How long a scrape waits for the core's labels (it answers between
/// syncs; a first sync of a large cluster takes seconds). Without them
/// the per-frontend series are left out of that scrape.
pub const LABEL_WAIT: Duration = Duration::from_secs(2);

/// The labels of one frontend's series, as the core hands them over:
/// shared and copied values only (the core answers 50,000 of them
/// between two changes); the texts are made by the scrape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendLabels {
    /// Its namespace and name.
    pub service: ObjectKey,
    /// The service port the frontend serves (a nodePort frontend's too:
    /// its `port`, not the nodePort); None when the store no longer has
    /// the service.
    pub port: Option<i32>,
    /// That port's name ("" when unnamed).
    pub port_name: Arc<str>,
    /// The frontend itself (a service port has a ClusterIP per family,
    /// external and load-balancer IPs, nodePorts).
    pub frontend: Frontend<IpAddr>,
}

impl FrontendLabels {
    /// The labels of `holder`'s frontend (`view`: its service as the
    /// store has it, when it does).
    pub fn new(holder: Holder, view: Option<&ServiceView>) -> Self {
        let frontend = holder.frontend;
        let number = i32::from(frontend.port);
        // A nodePort frontend's port is a nodePort (which may equal
        // another port's number); every other frontend's, the port's own.
        let serves = |p: &ServicePortView| {
            p.protocol
                .as_deref()
                .unwrap_or("TCP")
                .eq_ignore_ascii_case(protocol_name(frontend.protocol))
                && match holder.claim {
                    Claim::NodePort => p.node_port == Some(number),
                    _ => p.port == number,
                }
        };
        let port = view.and_then(|v| v.ports.iter().find(|p| serves(p)));
        Self {
            service: holder.service,
            port: port.map(|p| p.port),
            port_name: port.map_or_else(|| Arc::from(""), |p| p.name.clone()),
            frontend,
        }
    }

    /// The `port` label: "80/TCP" ("" when unknown).
    pub fn port_text(&self) -> String {
        self.port.map_or_else(String::new, |port| {
            format!("{port}/{}", protocol_name(self.frontend.protocol))
        })
    }
}

/// A protocol as Services spell it.
fn protocol_name(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Tcp => "TCP",
        Protocol::Udp => "UDP",
    }
}

/// A scrape asking the core which services hold these reverse-NAT ids.
#[derive(Debug)]
pub struct LabelRequest {
    pub ids: Vec<RevNatId>,
    /// Each id's labels; ids no frontend holds now are left out.
    pub reply: oneshot::Sender<Vec<(RevNatId, FrontendLabels)>>,
}

impl LabelRequest {
    /// A request for `ids`, and where its answer arrives.
    pub fn new(ids: Vec<RevNatId>) -> (Self, oneshot::Receiver<Vec<(RevNatId, FrontendLabels)>>) {
        let (reply, answer) = oneshot::channel();
        (Self { ids, reply }, answer)
    }
}

/// What `/metrics` needs for per-frontend series: the counters' pin and
/// the way to the core.
pub struct ServiceFigures {
    /// `None`: the pins have no `SERVICE_COUNTERS`, or it counts nothing
    /// (`--service-counters off`).
    counters: Arc<Mutex<Option<ServiceCounterMap>>>,
    requests: mpsc::Sender<LabelRequest>,
}

impl std::fmt::Debug for ServiceFigures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceFigures").finish_non_exhaustive()
    }
}

impl ServiceFigures {
    /// Reads the counters pinned under `pin_dir`, asking `requests`
    /// (the core) for labels.
    pub fn open(pin_dir: &Path, requests: mpsc::Sender<LabelRequest>) -> Self {
        let opened = MapData::from_pin(pin_dir.join(m::SERVICE_COUNTERS_MAP))
            .and_then(|data| PerCpuArray::try_from(Map::PerCpuArray(data)))
            .and_then(ServiceCounterMap::new);
        let counters = match opened {
            Ok(map) => Some(map).filter(ServiceCounterMap::is_counting),
            Err(error) => {
                tracing::warn!(
                    %error,
                    "opening SERVICE_COUNTERS: /metrics has no per-service series"
                );
                None
            }
        };
        Self {
            counters: Arc::new(Mutex::new(counters)),
            requests,
        }
    }

    /// The per-frontend series, encoded as OpenMetrics families (no
    /// `# EOF`): frontends that counted nothing are left out, so an idle
    /// cluster's scrape stays small.
    pub async fn encode(&self) -> Result<String, std::fmt::Error> {
        // Off the async workers: a read of every id on every possible
        // CPU, batched (a few syscalls, but megabytes on large nodes).
        let counters = self.counters.clone();
        let read = tokio::task::spawn_blocking(move || {
            let guard = counters.lock().unwrap_or_else(|p| p.into_inner());
            guard.as_ref().map(ServiceCounterMap::nonzero)
        })
        .await;
        let counted = match read {
            Ok(Some(Ok(counted))) => counted,
            Ok(Some(Err(error))) => {
                tracing::warn!(%error, "reading SERVICE_COUNTERS for /metrics");
                Vec::new()
            }
            Ok(None) | Err(_) => Vec::new(),
        };
        let mut rows = Vec::new();
        if !counted.is_empty() {
            let (request, answer) = LabelRequest::new(counted.iter().map(|(id, _)| *id).collect());
            // Never waits to ask: with the core busy and scrapes queued,
            // this one goes without the series rather than stalling.
            if self.requests.try_send(request).is_ok()
                && let Ok(Ok(labels)) = tokio::time::timeout(LABEL_WAIT, answer).await
            {
                let counted: HashMap<RevNatId, ServiceCounters> = counted.into_iter().collect();
                rows = labels
                    .into_iter()
                    .filter_map(|(id, labels)| counted.get(&id).map(|c| (labels, *c)))
                    .collect();
            }
        }
        let mut registry = Registry::with_prefix("underpass");
        registry.register_collector(Box::new(Rows(rows)));
        let mut text = String::new();
        prometheus_client::encoding::text::encode_registry(&mut text, &registry)?;
        Ok(text)
    }
}

/// One scrape's series.
#[derive(Debug)]
struct Rows(Vec<(FrontendLabels, ServiceCounters)>);

impl Collector for Rows {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        type Pick = fn(&ServiceCounters) -> u64;
        let families: [(&str, &str, Pick); 2] = [
            (
                "service_packets",
                "Packets sent to a service frontend that the TC path translated (replies not counted), and datagrams socket-LB translated at sendmsg(); packets of connections socket-LB made at connect() go straight to the backend and are not seen",
                |c| c.packets,
            ),
            (
                "service_new_flows",
                "Flows balanced for a service frontend: new flows on the TC path, connect() calls socket-LB translated",
                |c| c.new_flows,
            ),
        ];
        for (name, help, pick) in families {
            let metric = ConstCounter::new(0u64);
            let mut family = encoder.encode_descriptor(name, help, None, metric.metric_type())?;
            for (labels, counters) in &self.0 {
                let (port, frontend) = (labels.port_text(), labels.frontend.to_string());
                let labels = [
                    ("namespace", labels.service.namespace()),
                    ("name", labels.service.name()),
                    ("port", port.as_str()),
                    ("port_name", &*labels.port_name),
                    ("frontend", frontend.as_str()),
                ];
                ConstCounter::new(pick(counters)).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        k8s::{ObjectKey, manifest},
        model::{Frontend, Protocol},
    };

    /// A nodePort frontend is labelled with the port whose nodePort it
    /// is, even when another port has that number; a ClusterIP frontend
    /// with its own port, of its protocol.
    #[test]
    fn each_frontend_is_labelled_with_the_port_it_serves() {
        let text = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.10\n  ports:\n  - {name: a, port: 80, nodePort: 30080}\n  - {name: b, port: 30080}\n  - {name: dns, port: 80, protocol: UDP}\n";
        let objects = manifest::parse_with(text, "web.yaml", |t| t.view()).objects;
        let Some(manifest::Object::Service(view)) = objects.first() else {
            panic!("a Service: {objects:?}");
        };
        let label = |address: [u8; 4], port, protocol, claim| {
            let holder = Holder {
                rev_nat_id: 1,
                service: ObjectKey::new("shop", "web"),
                claim,
                frontend: Frontend {
                    address: address.into(),
                    port,
                    protocol,
                },
            };
            let labels = FrontendLabels::new(holder, Some(view));
            (
                labels.port_text(),
                labels.port_name.to_string(),
                labels.frontend.to_string(),
            )
        };
        let cluster_ip = [10, 96, 0, 10];
        let node = [192, 168, 1, 5];
        assert_eq!(
            label(node, 30080, Protocol::Tcp, Claim::NodePort),
            ("80/TCP".into(), "a".into(), "192.168.1.5:30080/TCP".into())
        );
        assert_eq!(
            label(cluster_ip, 30080, Protocol::Tcp, Claim::ClusterIp),
            (
                "30080/TCP".into(),
                "b".into(),
                "10.96.0.10:30080/TCP".into()
            )
        );
        assert_eq!(
            label(cluster_ip, 80, Protocol::Udp, Claim::ClusterIp),
            ("80/UDP".into(), "dns".into(), "10.96.0.10:80/UDP".into())
        );
        // A service the store no longer has: its name, no port.
        let holder = Holder {
            rev_nat_id: 1,
            service: ObjectKey::new("shop", "web"),
            claim: Claim::ClusterIp,
            frontend: Frontend {
                address: std::net::Ipv4Addr::new(10, 96, 0, 10).into(),
                port: 80,
                protocol: Protocol::Tcp,
            },
        };
        let labels = FrontendLabels::new(holder, None);
        assert_eq!(
            (labels.service.name(), labels.port_text()),
            ("web", String::new())
        );
    }
}
