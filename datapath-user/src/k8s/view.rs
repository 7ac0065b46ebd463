//! The fields of Services and EndpointSlices that translation reads, and
//! nothing else.
//!
//! The agent keeps every Service and EndpointSlice of the cluster; as
//! k8s-openapi objects 10,000 services with 10 endpoints each take ~60 MB
//! (an `Endpoint` alone is ~350 bytes before its strings, and real objects
//! carry managedFields and annotations on top). These views take a tenth
//! of that, and compare equal when nothing that matters changed (a new
//! resourceVersion alone does not make a service dirty).

use std::{
    net::Ipv4Addr,
    sync::{Arc, Mutex},
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use super::keys::{HEADLESS_LABEL, ObjectKey, SERVICE_PROXY_NAME_LABEL};

/// What translation reads of a Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceView {
    pub key: ObjectKey,
    /// Not headless, not ExternalName, no other proxy's label.
    pub proxied: bool,
    pub has_spec: bool,
    /// `clusterIPs` when set, else `[clusterIP]`.
    pub cluster_ips: Vec<Box<str>>,
    /// Whether `cluster_ips` came from `clusterIPs` (for field names).
    pub from_cluster_ips: bool,
    pub ports: Vec<ServicePortView>,
    pub publish_not_ready: bool,
    /// `internalTrafficPolicy: Local`.
    pub node_local: bool,
    /// `sessionAffinity: ClientIP`.
    pub client_ip_affinity: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePortView {
    /// Shared (`shared`): services repeat a few port names.
    pub name: Arc<str>,
    pub port: i32,
    /// As written (None = TCP), shared.
    pub protocol: Option<Arc<str>>,
}

/// What translation reads of an EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceView {
    pub key: ObjectKey,
    /// From the `kubernetes.io/service-name` label.
    pub owner: Option<ObjectKey>,
    pub headless: bool,
    /// Shared (`shared`).
    pub address_type: Arc<str>,
    pub ports: Vec<SlicePortView>,
    pub endpoints: Vec<EndpointView>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlicePortView {
    /// Shared (`shared`).
    pub name: Arc<str>,
    pub port: Option<i32>,
    /// As written, shared.
    pub protocol: Option<Arc<str>>,
}

/// One endpoint, in 40 bytes: a cluster's slices hold hundreds of
/// thousands (as a k8s-openapi `Endpoint`, ~350 bytes before its strings).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointView {
    /// The first address (kube-proxy uses only that one): parsed, or the
    /// text that did not parse (rare: boxed behind a thin pointer, so
    /// that the field takes 16 bytes).
    pub address: Option<Result<Ipv4Addr, Box<String>>>,
    pub ready: Option<bool>,
    pub serving: Option<bool>,
    pub terminating: Option<bool>,
    /// Shared with every endpoint on the same node (`shared`).
    pub node_name: Option<Arc<str>>,
}

/// The one copy of a text many objects repeat (node names, port names,
/// protocols, address types): every view holding it shares it. Such
/// texts come and go with nodes and services; the set is pruned of those
/// nothing holds once it doubles.
fn shared(name: &str) -> Arc<str> {
    static NODES: Mutex<Option<NodeNames>> = Mutex::new(None);
    let mut guard = NODES
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let nodes = guard.get_or_insert_with(NodeNames::default);
    if let Some(shared) = nodes.names.get(name) {
        return shared.clone();
    }
    if nodes.names.len() >= nodes.prune_at {
        nodes.names.retain(|n| Arc::strong_count(n) > 1);
        nodes.prune_at = (nodes.names.len() * 2).max(1024);
    }
    let shared: Arc<str> = name.into();
    nodes.names.insert(shared.clone());
    shared
}

struct NodeNames {
    names: std::collections::HashSet<Arc<str>>,
    prune_at: usize,
}

impl Default for NodeNames {
    fn default() -> Self {
        Self {
            names: std::collections::HashSet::new(),
            prune_at: 1024,
        }
    }
}

impl From<&Service> for ServiceView {
    fn from(service: &Service) -> Self {
        let labels = service.metadata.labels.as_ref();
        let labelled_elsewhere = labels.is_some_and(|l| l.contains_key(SERVICE_PROXY_NAME_LABEL));
        let spec = service.spec.as_ref();
        let external_name = spec.and_then(|s| s.type_.as_deref()) == Some("ExternalName");
        let headless = spec.is_some()
            && matches!(
                spec.and_then(|s| s.cluster_ip.as_deref()),
                None | Some("") | Some("None")
            );
        let (cluster_ips, from_cluster_ips) = match spec.and_then(|s| s.cluster_ips.as_ref()) {
            Some(ips) if !ips.is_empty() => {
                (ips.iter().map(|ip| ip.as_str().into()).collect(), true)
            }
            _ => (
                vec![
                    spec.and_then(|s| s.cluster_ip.as_deref())
                        .unwrap_or_default()
                        .into(),
                ],
                false,
            ),
        };
        Self {
            key: ObjectKey::of_service(service),
            proxied: !(labelled_elsewhere || external_name || headless),
            has_spec: spec.is_some(),
            cluster_ips,
            from_cluster_ips,
            ports: spec
                .and_then(|s| s.ports.as_ref())
                .into_iter()
                .flatten()
                .map(|p| ServicePortView {
                    name: shared(p.name.as_deref().unwrap_or_default()),
                    port: p.port,
                    protocol: p.protocol.as_deref().map(shared),
                })
                .collect(),
            publish_not_ready: spec.and_then(|s| s.publish_not_ready_addresses) == Some(true),
            node_local: spec.and_then(|s| s.internal_traffic_policy.as_deref()) == Some("Local"),
            client_ip_affinity: spec.and_then(|s| s.session_affinity.as_deref())
                == Some("ClientIP"),
        }
    }
}

impl From<&EndpointSlice> for SliceView {
    fn from(slice: &EndpointSlice) -> Self {
        Self {
            key: ObjectKey::of_slice(slice),
            owner: ObjectKey::owner_of_slice(slice),
            headless: slice
                .metadata
                .labels
                .as_ref()
                .is_some_and(|l| l.contains_key(HEADLESS_LABEL)),
            address_type: shared(&slice.address_type),
            ports: slice
                .ports
                .iter()
                .flatten()
                .map(|p| SlicePortView {
                    name: shared(p.name.as_deref().unwrap_or_default()),
                    port: p.port,
                    protocol: p.protocol.as_deref().map(shared),
                })
                .collect(),
            endpoints: slice
                .endpoints
                .iter()
                .flatten()
                .map(|e| {
                    let conditions = e.conditions.as_ref();
                    EndpointView {
                        address: e
                            .addresses
                            .first()
                            .map(|a| a.parse::<Ipv4Addr>().map_err(|_| Box::new(a.clone()))),
                        ready: conditions.and_then(|c| c.ready),
                        serving: conditions.and_then(|c| c.serving),
                        terminating: conditions.and_then(|c| c.terminating),
                        node_name: e.node_name.as_deref().map(shared),
                    }
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endpoint_stays_small_and_node_names_are_shared() {
        assert!(
            std::mem::size_of::<EndpointView>() <= 40,
            "{} bytes",
            std::mem::size_of::<EndpointView>()
        );
        let (a, b) = (shared("node-7"), shared("node-7"));
        assert!(Arc::ptr_eq(&a, &b), "one copy per node name");
    }
}
