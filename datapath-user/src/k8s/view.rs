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
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::{Arc, Mutex},
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use super::{
    interned::Interned,
    keys::{HEADLESS_LABEL, ObjectKey, SERVICE_PROXY_NAME_LABEL},
};

/// An address of a Service as written: parsed, or the text that did not
/// parse (reported by translation, naming the field).
pub type ParsedAddress = Result<IpAddr, Box<str>>;

/// What translation reads of a Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceView {
    pub key: ObjectKey,
    /// Not headless, not ExternalName, no other proxy's label.
    pub proxied: bool,
    pub has_spec: bool,
    /// `clusterIPs` when set, else `[clusterIP]`: parsed, or the text
    /// that did not parse (reported by translation, naming the field).
    pub cluster_ips: Box<[ParsedAddress]>,
    /// Whether `cluster_ips` came from `clusterIPs` (for field names).
    pub from_cluster_ips: bool,
    /// Its external and load-balancer addresses: most services have
    /// none, so they cost a pointer, not three fields.
    pub other_addresses: Option<Box<OtherAddresses>>,
    /// Shared (`Interned`): services repeat a few port lists.
    pub ports: Arc<[ServicePortView]>,
    pub publish_not_ready: bool,
    /// `internalTrafficPolicy: Local`.
    pub node_local: bool,
    /// `externalTrafficPolicy: Local`: traffic from outside goes to this
    /// node's endpoints only, its source kept.
    pub external_local: bool,
    /// `healthCheckNodePort` (a `Local` LoadBalancer service's), as
    /// written.
    pub health_check_node_port: Option<i32>,
    /// `sessionAffinity: ClientIP` (None: any other affinity), with its
    /// `sessionAffinityConfig.clientIP.timeoutSeconds` as written (None:
    /// absent), reported by translation when out of range.
    pub client_ip_affinity: Option<Option<i32>>,
}

/// A service's addresses besides its ClusterIPs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OtherAddresses {
    /// `spec.externalIPs`, parsed as `cluster_ips` are.
    pub external_ips: Box<[ParsedAddress]>,
    /// `status.loadBalancer.ingress[i].ip` by index `i`, for entries
    /// with an IP whose `ipMode` is not Proxy (a proxying load balancer
    /// sends its traffic to nodes, not to the IP: kube-proxy skips those).
    pub load_balancer_ips: Box<[(u32, ParsedAddress)]>,
    /// `spec.loadBalancerSourceRanges` (or kube-proxy's annotation
    /// `service.beta.kubernetes.io/load-balancer-source-ranges`) is set.
    pub load_balancer_source_ranges: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ServicePortView {
    /// Shared (`shared`): services repeat a few port names.
    pub name: Arc<str>,
    pub port: i32,
    /// As written (None = TCP), shared.
    pub protocol: Option<Arc<str>>,
    /// `nodePort` (NodePort and LoadBalancer services).
    pub node_port: Option<i32>,
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
    /// Shared (`Interned`): slices repeat a few port lists.
    pub ports: Arc<[SlicePortView]>,
    endpoints: EndpointList,
    /// Unparsed addresses and topology hints: most slices have neither,
    /// and pay one pointer for them.
    extras: Option<Box<SliceExtras>>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct SliceExtras {
    /// The text of each endpoint address that did not parse, by endpoint
    /// index.
    unparsed: Box<[(u32, Box<str>)]>,
    /// Every endpoint's topology hints, sorted by endpoint index.
    hints: Box<[Hint]>,
}

/// A slice's endpoints, as compactly as their addresses allow: a
/// cluster's slices hold hundreds of thousands of endpoints, nearly all
/// of them one IPv4 address on one node.
#[derive(Clone, Debug, PartialEq, Eq)]
enum EndpointList {
    /// Every endpoint has an IPv4 address and a node number below 2^24:
    /// 8 bytes each.
    V4(Box<[PackedV4]>),
    /// Any other slice (IPv6, missing or unparsed addresses): 24 bytes
    /// each.
    Any(Box<[EndpointView]>),
}

/// An IPv4 endpoint in 8 bytes: its address, and its node's number
/// shifted above its condition bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct PackedV4 {
    address: [u8; 4],
    node_and_conditions: u32,
}

impl PackedV4 {
    const NODE_SHIFT: u32 = 8;

    fn pack(endpoint: &EndpointView) -> Option<Self> {
        let EndpointAddress::V4(address) = endpoint.address else {
            return None;
        };
        let node = endpoint.node.map_or(0, |n| n.0.get());
        (node < 1 << (32 - Self::NODE_SHIFT)).then_some(Self {
            address: address.octets(),
            node_and_conditions: node << Self::NODE_SHIFT | u32::from(endpoint.conditions),
        })
    }

    fn unpack(self) -> EndpointView {
        EndpointView {
            address: EndpointAddress::V4(Ipv4Addr::from(self.address)),
            conditions: self.node_and_conditions as u8,
            node: std::num::NonZeroU32::new(self.node_and_conditions >> Self::NODE_SHIFT)
                .map(TopologyName),
        }
    }
}

impl EndpointList {
    fn new(endpoints: Vec<EndpointView>) -> Self {
        match endpoints.iter().map(PackedV4::pack).collect::<Option<_>>() {
            Some(packed) => Self::V4(packed),
            None => Self::Any(endpoints.into()),
        }
    }
}

/// One topology hint of an endpoint: `hints.forZones[].name` or
/// `hints.forNodes[].name`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hint {
    pub endpoint: u32,
    pub kind: HintKind,
    pub name: TopologyName,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HintKind {
    Zone,
    Node,
}

impl SliceView {
    /// Its endpoints, in order.
    pub fn endpoints(&self) -> impl Iterator<Item = EndpointView> + '_ {
        let (v4, any): (&[PackedV4], &[EndpointView]) = match &self.endpoints {
            EndpointList::V4(packed) => (packed, &[]),
            EndpointList::Any(views) => (&[], views),
        };
        // One of the two is empty.
        v4.iter().map(|p| p.unpack()).chain(any.iter().copied())
    }

    /// The hints of endpoint `index`.
    pub fn hints_of(&self, index: usize) -> &[Hint] {
        let Some(extras) = &self.extras else {
            return &[];
        };
        let index = index as u32;
        let start = extras.hints.partition_point(|h| h.endpoint < index);
        let end = extras.hints.partition_point(|h| h.endpoint <= index);
        &extras.hints[start..end]
    }

    /// Every endpoint's hints, sorted by endpoint index.
    pub fn hints(&self) -> &[Hint] {
        self.extras.as_ref().map_or(&[], |extras| &extras.hints)
    }

    /// The text of endpoint `index`'s address, when it did not parse.
    pub fn unparsed_address(&self, index: usize) -> &str {
        self.extras
            .iter()
            .flat_map(|extras| extras.unparsed.iter())
            .find(|(i, _)| *i as usize == index)
            .map_or("", |(_, text)| text)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SlicePortView {
    /// Shared (`shared`).
    pub name: Arc<str>,
    pub port: Option<i32>,
    /// As written, shared.
    pub protocol: Option<Arc<str>>,
}

/// An endpoint's first address (kube-proxy uses only that one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndpointAddress {
    /// The endpoint lists no address.
    Missing,
    V4(Ipv4Addr),
    V6(Ipv6Addr),
    /// Not an IP address: the text is in the slice's `unparsed`.
    Unparsed,
}

/// One endpoint, in 24 bytes: a cluster's slices hold hundreds of
/// thousands (as a k8s-openapi `Endpoint`, ~350 bytes before its
/// strings). An IPv6 address fits inline, so dual-stack slices cost no
/// allocation per endpoint either.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointView {
    pub address: EndpointAddress,
    /// `conditions`: ready, serving, terminating, each set or not
    /// (`Condition` bits).
    conditions: u8,
    /// The endpoint's `nodeName`.
    node: Option<TopologyName>,
}

/// Bit pairs of `EndpointView::conditions`: whether the condition is
/// written, and its value.
#[derive(Clone, Copy)]
enum Condition {
    Ready = 0,
    Serving = 2,
    Terminating = 4,
}

impl EndpointView {
    pub fn new(
        address: EndpointAddress,
        ready: Option<bool>,
        serving: Option<bool>,
        terminating: Option<bool>,
        node_name: Option<&str>,
    ) -> Self {
        let bits = |condition: Condition, value: Option<bool>| match value {
            None => 0,
            Some(v) => (1 | (u8::from(v) << 1)) << condition as u8,
        };
        Self {
            address,
            conditions: bits(Condition::Ready, ready)
                | bits(Condition::Serving, serving)
                | bits(Condition::Terminating, terminating),
            node: node_name.map(TopologyName::intern),
        }
    }

    fn condition(&self, condition: Condition) -> Option<bool> {
        let bits = self.conditions >> condition as u8;
        (bits & 1 == 1).then_some(bits & 2 == 2)
    }

    pub fn ready(&self) -> Option<bool> {
        self.condition(Condition::Ready)
    }

    pub fn serving(&self) -> Option<bool> {
        self.condition(Condition::Serving)
    }

    pub fn terminating(&self) -> Option<bool> {
        self.condition(Condition::Terminating)
    }

    pub fn node(&self) -> Option<TopologyName> {
        self.node
    }
}

/// A node's or a zone's name as a number: endpoints name a few nodes and
/// zones hundreds of thousands of times. Each name seen is kept for the
/// agent's life (a few dozen bytes per node or zone the cluster ever
/// had), so a number always means the same name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TopologyName(std::num::NonZeroU32);

#[derive(Default)]
struct TopologyNames {
    numbers: std::collections::HashMap<Box<str>, TopologyName>,
}

static TOPOLOGY_NAMES: Mutex<Option<TopologyNames>> = Mutex::new(None);

impl TopologyName {
    pub fn intern(name: &str) -> Self {
        let mut guard = TOPOLOGY_NAMES
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let names = guard.get_or_insert_with(TopologyNames::default);
        if let Some(&number) = names.numbers.get(name) {
            return number;
        }
        // Non-zero, so that `Option<TopologyName>` takes four bytes.
        let number = Self(
            std::num::NonZeroU32::new(names.numbers.len() as u32 + 1)
                .expect("fewer than 4 billion node names"),
        );
        names.numbers.insert(name.into(), number);
        number
    }

    /// The number of `name` if any endpoint ever named it (no endpoint
    /// names a node that has none).
    pub fn find(name: &str) -> Option<Self> {
        let guard = TOPOLOGY_NAMES
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        guard.as_ref()?.numbers.get(name).copied()
    }
}

/// The one copy of a text many objects repeat (port names, protocols,
/// address types).
fn shared(text: &str) -> Arc<str> {
    static TEXTS: Interned<str> = Interned::new();
    TEXTS.get(text)
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
        let parse = |text: &str| text.parse::<IpAddr>().map_err(|_| text.into());
        let (cluster_ips, from_cluster_ips) = match spec.and_then(|s| s.cluster_ips.as_ref()) {
            Some(ips) if !ips.is_empty() => (ips.iter().map(|ip| parse(ip)).collect(), true),
            _ => (
                [parse(
                    spec.and_then(|s| s.cluster_ip.as_deref())
                        .unwrap_or_default(),
                )]
                .into(),
                false,
            ),
        };
        let external_ips = spec
            .and_then(|s| s.external_ips.as_ref())
            .into_iter()
            .flatten()
            .map(|ip| parse(ip))
            .collect();
        let load_balancer_ips = service
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref())
            .into_iter()
            .flatten()
            .enumerate()
            .filter(|(_, ingress)| ingress.ip_mode.as_deref() != Some("Proxy"))
            .filter_map(|(i, ingress)| Some((i as u32, parse(ingress.ip.as_deref()?))))
            .collect();
        let load_balancer_source_ranges = spec
            .and_then(|s| s.load_balancer_source_ranges.as_ref())
            .is_some_and(|ranges| !ranges.is_empty())
            || service.metadata.annotations.as_ref().is_some_and(|a| {
                a.get("service.beta.kubernetes.io/load-balancer-source-ranges")
                    .is_some_and(|r| !r.trim().is_empty())
            });
        let other = OtherAddresses {
            external_ips,
            load_balancer_ips,
            load_balancer_source_ranges,
        };
        Self {
            key: ObjectKey::of_service(service),
            other_addresses: (other != OtherAddresses::default()).then(|| Box::new(other)),
            proxied: !(labelled_elsewhere || external_name || headless),
            has_spec: spec.is_some(),
            cluster_ips,
            from_cluster_ips,
            ports: {
                static PORT_LISTS: Interned<[ServicePortView]> = Interned::new();
                let ports: Vec<ServicePortView> = spec
                    .and_then(|s| s.ports.as_ref())
                    .into_iter()
                    .flatten()
                    .map(|p| ServicePortView {
                        name: shared(p.name.as_deref().unwrap_or_default()),
                        port: p.port,
                        protocol: p.protocol.as_deref().map(shared),
                        node_port: p.node_port,
                    })
                    .collect();
                PORT_LISTS.get(&ports)
            },
            publish_not_ready: spec.and_then(|s| s.publish_not_ready_addresses) == Some(true),
            node_local: spec.and_then(|s| s.internal_traffic_policy.as_deref()) == Some("Local"),
            external_local: spec.and_then(|s| s.external_traffic_policy.as_deref())
                == Some("Local"),
            health_check_node_port: spec.and_then(|s| s.health_check_node_port),
            client_ip_affinity: (spec.and_then(|s| s.session_affinity.as_deref())
                == Some("ClientIP"))
            .then(|| {
                spec.and_then(|s| s.session_affinity_config.as_ref())
                    .and_then(|c| c.client_ip.as_ref())
                    .and_then(|c| c.timeout_seconds)
            }),
        }
    }
}

impl From<&EndpointSlice> for SliceView {
    fn from(slice: &EndpointSlice) -> Self {
        let mut unparsed = Vec::new();
        let mut hints = Vec::new();
        let endpoints: Vec<EndpointView> = slice
            .endpoints
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, e)| {
                let address = match e.addresses.first().map(|a| (a, a.parse::<IpAddr>())) {
                    None => EndpointAddress::Missing,
                    Some((_, Ok(IpAddr::V4(v4)))) => EndpointAddress::V4(v4),
                    Some((_, Ok(IpAddr::V6(v6)))) => EndpointAddress::V6(v6),
                    Some((text, Err(_))) => {
                        unparsed.push((i as u32, text.as_str().into()));
                        EndpointAddress::Unparsed
                    }
                };
                if let Some(written) = &e.hints {
                    let hint = |kind, name: &str| Hint {
                        endpoint: i as u32,
                        kind,
                        name: TopologyName::intern(name),
                    };
                    hints.extend(
                        written
                            .for_zones
                            .iter()
                            .flatten()
                            .map(|z| hint(HintKind::Zone, &z.name)),
                    );
                    hints.extend(
                        written
                            .for_nodes
                            .iter()
                            .flatten()
                            .map(|n| hint(HintKind::Node, &n.name)),
                    );
                }
                let conditions = e.conditions.as_ref();
                EndpointView::new(
                    address,
                    conditions.and_then(|c| c.ready),
                    conditions.and_then(|c| c.serving),
                    conditions.and_then(|c| c.terminating),
                    e.node_name.as_deref(),
                )
            })
            .collect();
        let extras = SliceExtras {
            unparsed: unparsed.into(),
            hints: hints.into(),
        };
        Self {
            key: ObjectKey::of_slice(slice),
            owner: ObjectKey::owner_of_slice(slice),
            headless: slice
                .metadata
                .labels
                .as_ref()
                .is_some_and(|l| l.contains_key(HEADLESS_LABEL)),
            address_type: shared(&slice.address_type),
            ports: {
                static PORT_LISTS: Interned<[SlicePortView]> = Interned::new();
                let ports: Vec<SlicePortView> = slice
                    .ports
                    .iter()
                    .flatten()
                    .map(|p| SlicePortView {
                        name: shared(p.name.as_deref().unwrap_or_default()),
                        port: p.port,
                        protocol: p.protocol.as_deref().map(shared),
                    })
                    .collect();
                PORT_LISTS.get(&ports)
            },
            endpoints: EndpointList::new(endpoints),
            extras: (extras != SliceExtras::default()).then(|| Box::new(extras)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endpoint_stays_small_and_repeated_texts_are_shared() {
        assert!(
            std::mem::size_of::<EndpointView>() <= 24,
            "{} bytes",
            std::mem::size_of::<EndpointView>()
        );
        let (a, b) = (shared("http"), shared("http"));
        assert!(Arc::ptr_eq(&a, &b), "one copy per port name");
        assert_eq!(
            TopologyName::intern("node-7"),
            TopologyName::intern("node-7")
        );
        assert_ne!(
            TopologyName::intern("node-7"),
            TopologyName::intern("node-8")
        );
        assert_eq!(
            TopologyName::find("node-7"),
            Some(TopologyName::intern("node-7"))
        );
        assert_eq!(TopologyName::find("never-named"), None);
    }

    /// Endpoints as `SliceView::endpoints` gives them back, and how they
    /// were stored.
    fn stored(addresses: &[&str]) -> (Vec<EndpointView>, Vec<EndpointView>, bool) {
        use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions};
        let conditions = [None, Some(false), Some(true)];
        let endpoints: Vec<Endpoint> = addresses
            .iter()
            .enumerate()
            .map(|(i, address)| Endpoint {
                // "": an endpoint without an address.
                addresses: [*address]
                    .iter()
                    .filter(|a| !a.is_empty())
                    .map(|a| (*a).to_owned())
                    .collect(),
                conditions: Some(EndpointConditions {
                    ready: conditions[i % 3],
                    serving: conditions[(i / 3) % 3],
                    terminating: conditions[(i / 9) % 3],
                }),
                node_name: (i % 4 != 0).then(|| format!("packed-node-{i}")),
                ..Default::default()
            })
            .collect();
        let expected = endpoints
            .iter()
            .map(|e| {
                let c = e.conditions.as_ref().unwrap();
                let address = match e.addresses.first().map(|a| a.parse::<IpAddr>()) {
                    None => EndpointAddress::Missing,
                    Some(Ok(IpAddr::V4(v4))) => EndpointAddress::V4(v4),
                    Some(Ok(IpAddr::V6(v6))) => EndpointAddress::V6(v6),
                    Some(Err(_)) => EndpointAddress::Unparsed,
                };
                EndpointView::new(
                    address,
                    c.ready,
                    c.serving,
                    c.terminating,
                    e.node_name.as_deref(),
                )
            })
            .collect();
        let view = SliceView::from(&EndpointSlice {
            endpoints: Some(endpoints),
            ..Default::default()
        });
        let packed = matches!(view.endpoints, EndpointList::V4(_));
        (view.endpoints().collect(), expected, packed)
    }

    #[test]
    fn ipv4_endpoints_are_packed_and_read_back_as_written() {
        let addresses: Vec<String> = (0..30).map(|i| format!("10.1.{i}.{}", 255 - i)).collect();
        let addresses: Vec<&str> = addresses.iter().map(String::as_str).collect();
        let (read, expected, packed) = stored(&addresses);
        assert!(packed, "an IPv4 slice takes 8 bytes per endpoint");
        assert_eq!(read, expected);
        // One address of another kind: the slice is kept whole as views.
        for odd in ["fd00::7", "not-an-address", ""] {
            let mut mixed = addresses.clone();
            mixed.insert(5, odd);
            let (read, expected, packed) = stored(&mixed);
            assert!(!packed, "{odd}");
            assert_eq!(read, expected, "{odd}");
        }
    }

    #[test]
    fn endpoint_conditions_read_back_as_written() {
        let values = [None, Some(false), Some(true)];
        for ready in values {
            for serving in values {
                for terminating in values {
                    let e = EndpointView::new(
                        EndpointAddress::Missing,
                        ready,
                        serving,
                        terminating,
                        None,
                    );
                    assert_eq!(
                        (e.ready(), e.serving(), e.terminating()),
                        (ready, serving, terminating)
                    );
                }
            }
        }
    }
}
