//! Services × EndpointSlices → the frontends the datapath should serve.
//!
//! Pure: no I/O, no clock, no maps. The rules follow kube-proxy's
//! (`pkg/proxy/servicechangetracker.go`, `endpointslicecache.go`) so an
//! operator sees the same endpoints through underpass as through
//! kube-proxy:
//!
//! * every address of `clusterIPs` (or `clusterIP`) × every port, and
//!   every `externalIPs` and load-balancer ingress IP (not `ipMode:
//!   Proxy`) × every port, and this node's addresses × every nodePort,
//!   these with the cluster's endpoints (what kube-proxy gives pod traffic
//!   to them, whatever the traffic policies);
//! * endpoint ports are found by the service port's *name* (and protocol)
//!   in each EndpointSlice: the EndpointSlice controller has already
//!   resolved a named `targetPort` per pod, so the slice is the truth;
//! * endpoints are deduplicated across slices (a pod moving between
//!   slices appears in both for a while);
//! * ready endpoints are used; when none is ready, the serving-and-
//!   terminating ones (graceful termination, KEP-1669);
//!   `publishNotReadyAddresses` makes every endpoint usable;
//! * every other endpoint still listed is *draining*: it gets no new flow,
//!   but flows already on it keep it (as netfilter's conntrack keeps a
//!   DNAT after kube-proxy drops the endpoint's rule) until it leaves every
//!   slice;
//! * headless and ExternalName services, and services that name another
//!   proxy in `service.kubernetes.io/service-proxy-name`, are not ours.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use serde::Serialize;

pub use super::keys::{HEADLESS_LABEL, ObjectKey, SERVICE_NAME_LABEL, SERVICE_PROXY_NAME_LABEL};
use super::view::{
    EndpointAddress, Hint, HintKind, OtherAddresses, ParsedAddress, ServiceView, SliceView,
    TopologyName,
};
use crate::model::{Family, Frontend, Protocol};

/// One endpoint address and port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Endpoint<A = Ipv4Addr> {
    pub address: A,
    pub port: u16,
}

impl<A: Family> fmt::Display for Endpoint<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}",
            std::net::SocketAddr::new(self.address.into(), self.port)
        )
    }
}

/// Where a frontend's address comes from, strongest claim first: when two
/// services ask for one frontend, the stronger claim holds it. A ClusterIP
/// is allocated by the API server and a load-balancer IP written by a
/// controller, but anyone who may create a Service may write any address
/// in `externalIPs` (CVE-2020-8554): such a claim never takes another
/// service's ClusterIP, load-balancer IP or nodePort.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Claim {
    ClusterIp,
    LoadBalancerIp,
    NodePort,
    ExternalIp,
}

impl Claim {
    /// The field that asked, for issues.
    pub const fn field(self) -> &'static str {
        match self {
            Claim::ClusterIp => "spec.clusterIPs",
            Claim::LoadBalancerIp => "status.loadBalancer.ingress",
            Claim::NodePort => "spec.ports[].nodePort",
            Claim::ExternalIp => "spec.externalIPs",
        }
    }
}

/// What one frontend should balance over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredFrontend<A = Ipv4Addr> {
    pub frontend: Frontend<A>,
    /// Where its address comes from.
    pub claim: Claim,
    /// The service port's name ("" when unnamed), for display.
    pub port_name: std::sync::Arc<str>,
    /// Sorted and deduplicated: the slot order in the maps.
    pub backends: Vec<Endpoint<A>>,
    /// Endpoints still listed in a slice but not usable for new flows (not
    /// ready, terminating, or on another node under `Local`): flows
    /// already on them keep going. Sorted, deduplicated, disjoint from
    /// `backends`.
    pub draining: Vec<Endpoint<A>>,
    /// `sessionAffinity: ClientIP`: a client's new flows go to the
    /// backend its last one went to, for this many seconds after it.
    pub affinity: Option<u32>,
    /// Reached from outside the cluster (a nodePort, load-balancer or
    /// external IP; north-south, on the node's uplink): the backends new
    /// flows from outside go to — `backends` under
    /// `externalTrafficPolicy: Cluster`, those of them on this node under
    /// `Local` (empty: none here; the node does not serve it from
    /// outside). `None`: a ClusterIP, not reached from outside. A subset
    /// of `backends`, in their order.
    pub external: Option<Vec<Endpoint<A>>>,
}

/// Why part of an object was not programmed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum IssueKind {
    /// Valid Kubernetes, not supported by underpass yet (IPv6, SCTP…).
    Unsupported,
    /// Not valid: a field a correct object cannot have.
    Invalid,
    /// Valid, but in conflict with another object (the same frontend).
    Conflict,
    /// Beyond a limit of the datapath (backends per service, map size).
    Limit,
    /// A map write failed.
    Datapath,
    /// The API server could not be read (a list or watch failed; retried
    /// with a growing back-off).
    Api,
}

impl IssueKind {
    pub const ALL: [IssueKind; 6] = [
        IssueKind::Unsupported,
        IssueKind::Invalid,
        IssueKind::Conflict,
        IssueKind::Limit,
        IssueKind::Datapath,
        IssueKind::Api,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            IssueKind::Unsupported => "unsupported",
            IssueKind::Invalid => "invalid",
            IssueKind::Conflict => "conflict",
            IssueKind::Limit => "limit",
            IssueKind::Datapath => "datapath",
            IssueKind::Api => "api",
        }
    }
}

/// A problem with one field of one object. The rest of the object, and
/// every other object, is still programmed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Issue {
    pub kind: IssueKind,
    /// "Service ns/name" or "EndpointSlice ns/name".
    pub object: String,
    /// JSON path of the field, e.g. `spec.ports[1].protocol`.
    pub field: String,
    pub reason: String,
}

impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}: {} ({})",
            self.object,
            self.field,
            self.reason,
            self.kind.as_str()
        )
    }
}

/// Everything one Service asks for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceTranslation {
    /// IPv4 frontends.
    pub frontends: Vec<DesiredFrontend>,
    /// IPv6 frontends (from IPv6 ClusterIPs and other addresses, over
    /// `addressType: IPv6` slices).
    pub frontends6: Vec<DesiredFrontend<Ipv6Addr>>,
    pub issues: Vec<Issue>,
    /// The health-check nodePort of an `externalTrafficPolicy: Local`
    /// service reached from outside: what a load balancer asks a node
    /// before sending it traffic.
    pub health_check: Option<HealthCheck>,
}

/// A health-check nodePort and what it answers (kube-proxy's: 200 with
/// local endpoints, 503 without).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub node_port: u16,
    /// This node's endpoints that flows from outside go to (distinct
    /// addresses, every port and family).
    pub local_endpoints: u32,
}

/// Facts about the node the agent runs on.
#[derive(Clone, Debug, Default)]
pub struct NodeContext {
    /// Needed by `internalTrafficPolicy: Local` and node hints.
    pub node_name: Option<String>,
    /// The node's `topology.kubernetes.io/zone` label, for zone hints.
    pub zone: Option<String>,
    /// The node's addresses, where pods reach services' nodePorts.
    pub addresses: Vec<IpAddr>,
    /// Whether and how the agent serves IPv6 frontends (`--ipv6`).
    pub ipv6: Ipv6Serving,
}

/// Whether IPv6 frontends are served (`--ipv6`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Ipv6Serving {
    /// Not programmed (`--ipv6 off`): each service's IPv6 family is
    /// reported as not served.
    #[default]
    Off,
    /// Programmed: socket-LB and the TC path translate them.
    On,
}

fn service_issue(service: &ObjectKey, kind: IssueKind, field: String, reason: String) -> Issue {
    Issue {
        kind,
        object: format!("Service {service}"),
        field,
        reason,
    }
}

fn slice_issue(slice: &SliceView, kind: IssueKind, field: String, reason: String) -> Issue {
    Issue {
        kind,
        object: format!("EndpointSlice {}", slice.key),
        field,
        reason,
    }
}

/// Translates one Service with the EndpointSlices that name it (slices of
/// other services are ignored, so callers may pass more).
pub fn translate_service<'a>(
    service: &Service,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    node: &NodeContext,
) -> ServiceTranslation {
    let views: Vec<SliceView> = slices.into_iter().map(SliceView::from).collect();
    translate_view(&ServiceView::from(service), &views, node)
}

/// `translate_service` on the fields it reads (what the agent's store
/// keeps).
pub fn translate_view<'a>(
    service: &ServiceView,
    slices: impl IntoIterator<Item = &'a SliceView>,
    node: &NodeContext,
) -> ServiceTranslation {
    let key = &service.key;
    let mut out = ServiceTranslation::default();
    if !service.proxied {
        return out;
    }
    if !service.has_spec {
        out.issues.push(service_issue(
            key,
            IssueKind::Invalid,
            "spec".into(),
            "missing".into(),
        ));
        return out;
    }

    // Every address as written, each family's apart; one that does not
    // parse is reported once, naming its field.
    let mut addresses: Vec<IpAddr> = Vec::new();
    // Which families have a ClusterIP written (one that does not parse
    // counts by its text: its family's other addresses are still served),
    // and the field of the first IPv6 one.
    let (mut has_v4, mut has_v6) = (false, false);
    let mut v6_field = None;
    for (i, address) in service.cluster_ips.iter().enumerate() {
        let field = if service.from_cluster_ips {
            format!("spec.clusterIPs[{i}]")
        } else {
            "spec.clusterIP".to_owned()
        };
        let is_v6 = match address {
            Ok(ip) => ip.is_ipv6(),
            Err(text) => text.contains(':'),
        };
        if is_v6 {
            has_v6 = true;
            v6_field.get_or_insert_with(|| field.clone());
        } else {
            has_v4 = true;
        }
        if let Some(ip) = parsed_ip(key, address, field, &mut out.issues) {
            addresses.push(ip);
        }
    }
    // The service's other addresses, reached from pods: kube-proxy sends
    // pod traffic to them to the cluster's endpoints whatever
    // `externalTrafficPolicy` says (KUBE-EXT's "pod traffic for …
    // external destinations" rule jumps to KUBE-SVC), as for a ClusterIP.
    let mut other_addresses: Vec<(IpAddr, Claim)> = Vec::new();
    let no_others = OtherAddresses::default();
    let other = service.other_addresses.as_deref().unwrap_or(&no_others);
    // An address is served with the ClusterIP of its family; without one,
    // neither family serves it (kube-proxy's per-family trackers skip the
    // service), which is said.
    let served = |ip: IpAddr, field: String, issues: &mut Vec<Issue>| {
        let family = if ip.is_ipv4() { has_v4 } else { has_v6 };
        if !family {
            issues.push(service_issue(
                key,
                IssueKind::Unsupported,
                field,
                format!(
                    "{ip} is not served: the service has no {} ClusterIP",
                    if ip.is_ipv4() { "IPv4" } else { "IPv6" }
                ),
            ));
        }
        family
    };
    for (i, address) in other.external_ips.iter().enumerate() {
        let field = format!("spec.externalIPs[{i}]");
        if let Some(ip) = parsed_ip(key, address, field.clone(), &mut out.issues)
            && served(ip, field, &mut out.issues)
        {
            other_addresses.push((ip, Claim::ExternalIp));
        }
    }
    if other.load_balancer_source_ranges && !other.load_balancer_ips.is_empty() {
        // kube-proxy drops traffic from outside the ranges (KUBE-FW), pods
        // included; until underpass filters sources, pods reach the load
        // balancer itself, which enforces them.
        out.issues.push(service_issue(
            key,
            IssueKind::Unsupported,
            "spec.loadBalancerSourceRanges".into(),
            "source ranges are not enforced yet: pods reach its load-balancer IPs through the load balancer".into(),
        ));
    } else {
        for (i, address) in other.load_balancer_ips.iter() {
            let field = format!("status.loadBalancer.ingress[{i}].ip");
            if let Some(ip) = parsed_ip(key, address, field.clone(), &mut out.issues)
                && served(ip, field, &mut out.issues)
            {
                other_addresses.push((ip, Claim::LoadBalancerIp));
            }
        }
    }
    // One frontend per address and port, however often it is listed, with
    // its strongest claim.
    other_addresses.sort_unstable();
    other_addresses.dedup_by_key(|(address, _)| *address);
    other_addresses.retain(|(a, _)| !addresses.contains(a));

    // Each family balances over the slices of its `addressType` (as
    // kube-proxy's per-family proxiers do; a slice of a family the
    // service has no address of is not used).
    let mut slices_v4 = Vec::new();
    let mut slices_v6 = Vec::new();
    for slice in slices {
        if slice.owner.as_ref() != Some(key) || slice.headless {
            continue;
        }
        match &*slice.address_type {
            "IPv4" => slices_v4.push(slice),
            "IPv6" => slices_v6.push(slice),
            other => out.issues.push(slice_issue(
                slice,
                IssueKind::Unsupported,
                "addressType".into(),
                format!("address type {other:?} is not supported"),
            )),
        }
    }

    let affinity = service
        .client_ip_affinity
        .map(|timeout| affinity_seconds(key, timeout, &mut out.issues));
    if service.external_local && node.node_name.is_none() && reached_from_outside(service) {
        out.issues.push(service_issue(
            key,
            IssueKind::Unsupported,
            "spec.externalTrafficPolicy".into(),
            "Local needs the agent's --node-name: not served from outside on this node".into(),
        ));
    }
    if service.node_local && node.node_name.is_none() {
        out.issues.push(service_issue(
            key,
            IssueKind::Unsupported,
            "spec.internalTrafficPolicy".into(),
            "Local needs the agent's --node-name; using endpoints on every node".into(),
        ));
    }

    let ports = valid_ports(service, &mut out.issues);
    let context = FamilyContext {
        service,
        node,
        here: Here {
            node: node.node_name.as_deref().and_then(TopologyName::find),
            zone: node.zone.as_deref().and_then(TopologyName::find),
        },
        ports: &ports,
        addresses: &addresses,
        other_addresses: &other_addresses,
        affinity,
    };
    if has_v4 {
        out.frontends = family_frontends::<Ipv4Addr>(&context, &slices_v4, &mut out.issues);
    }
    if has_v6 {
        out.frontends6 = family_frontends::<Ipv6Addr>(&context, &slices_v6, &mut out.issues);
    }
    match health_check(service, node, &out) {
        Ok(check) => out.health_check = check,
        Err(issue) => out.issues.push(issue),
    }
    if let (Some(field), false) = (v6_field, out.frontends6.is_empty()) {
        let (count, first) = (out.frontends6.len(), out.frontends6[0].frontend);
        let reason = match node.ipv6 {
            Ipv6Serving::On => None,
            Ipv6Serving::Off => Some(format!(
                "IPv6 frontends are not served: the agent runs without --ipv6 on ({count} of them, {first} first); {}",
                if has_v4 {
                    "its IPv4 family is served"
                } else {
                    "nothing of this service is served"
                }
            )),
        };
        if let Some(reason) = reason {
            out.issues
                .push(service_issue(key, IssueKind::Unsupported, field, reason));
        }
    }
    out
}

/// The health-check nodePort `service` asks for, with this node's
/// endpoints for flows from outside (as `frontends` say); an invalid port
/// is an issue naming the field.
fn health_check(
    service: &ServiceView,
    node: &NodeContext,
    out: &ServiceTranslation,
) -> Result<Option<HealthCheck>, Issue> {
    let Some(port) = service.health_check_node_port else {
        return Ok(None);
    };
    if !service.external_local || node.node_name.is_none() || !reached_from_outside(service) {
        return Ok(None);
    }
    let Some(node_port) = u16::try_from(port).ok().filter(|&p| p != 0) else {
        return Err(service_issue(
            &service.key,
            IssueKind::Invalid,
            "spec.healthCheckNodePort".into(),
            format!("{port} is not a port number (1-65535)"),
        ));
    };
    let mut local: BTreeSet<IpAddr> = BTreeSet::new();
    for external in out.frontends.iter().filter_map(|f| f.external.as_ref()) {
        local.extend(external.iter().map(|e| IpAddr::V4(e.address)));
    }
    for external in out.frontends6.iter().filter_map(|f| f.external.as_ref()) {
        local.extend(external.iter().map(|e| IpAddr::V6(e.address)));
    }
    Ok(Some(HealthCheck {
        node_port,
        local_endpoints: local.len() as u32,
    }))
}

/// Whether anything of `service` is reached from outside the cluster:
/// a nodePort, an external or a load-balancer IP.
fn reached_from_outside(service: &ServiceView) -> bool {
    service.ports.iter().any(|p| p.node_port.is_some())
        || service
            .other_addresses
            .as_deref()
            .is_some_and(|o| !o.external_ips.is_empty() || !o.load_balancer_ips.is_empty())
}

/// A service port that can be served: valid, TCP or UDP, not a duplicate.
struct ValidPort {
    name: std::sync::Arc<str>,
    protocol: Protocol,
    number: u16,
    /// `nodePort`, when valid.
    node_port: Option<u16>,
}

/// The service's ports that can be served; each other one is an issue
/// naming its field.
fn valid_ports(service: &ServiceView, issues: &mut Vec<Issue>) -> Vec<ValidPort> {
    let key = &service.key;
    let mut seen_ports = BTreeSet::new();
    let mut ports = Vec::new();
    for (i, port) in service.ports.iter().enumerate() {
        let protocol = match port.protocol.as_deref().unwrap_or("TCP") {
            "TCP" => Protocol::Tcp,
            "UDP" => Protocol::Udp,
            "SCTP" => {
                issues.push(service_issue(
                    key,
                    IssueKind::Unsupported,
                    format!("spec.ports[{i}].protocol"),
                    "SCTP is not supported: underpass translates TCP and UDP only, and leaves packets to this port untouched".into(),
                ));
                continue;
            }
            other => {
                issues.push(service_issue(
                    key,
                    IssueKind::Invalid,
                    format!("spec.ports[{i}].protocol"),
                    format!("unknown protocol {other:?} (expected TCP, UDP or SCTP)"),
                ));
                continue;
            }
        };
        let Some(number) = u16::try_from(port.port).ok().filter(|&p| p != 0) else {
            issues.push(service_issue(
                key,
                IssueKind::Invalid,
                format!("spec.ports[{i}].port"),
                format!("{} is not a port number (1-65535)", port.port),
            ));
            continue;
        };
        if !seen_ports.insert((number, protocol)) {
            issues.push(service_issue(
                key,
                IssueKind::Invalid,
                format!("spec.ports[{i}]"),
                format!("duplicate port {number}/{protocol}"),
            ));
            continue;
        }
        // The nodePort at this node's addresses: kube-proxy's
        // KUBE-NODEPORTS (`--dst-type LOCAL`), which pod traffic also
        // leaves through KUBE-EXT to the cluster's endpoints.
        let node_port = match port.node_port {
            None => None,
            Some(n) => match u16::try_from(n).ok().filter(|&p| p != 0) {
                Some(n) => Some(n),
                None => {
                    issues.push(service_issue(
                        key,
                        IssueKind::Invalid,
                        format!("spec.ports[{i}].nodePort"),
                        format!("{n} is not a port number (1-65535)"),
                    ));
                    None
                }
            },
        };
        ports.push(ValidPort {
            name: port.name.clone(),
            protocol,
            number,
            node_port,
        });
    }
    ports
}

/// What both families' translations read.
struct FamilyContext<'a> {
    service: &'a ServiceView,
    node: &'a NodeContext,
    here: Here,
    ports: &'a [ValidPort],
    /// ClusterIPs, both families.
    addresses: &'a [IpAddr],
    /// External and load-balancer addresses, both families.
    other_addresses: &'a [(IpAddr, Claim)],
    /// `sessionAffinity: ClientIP`'s timeout in seconds, valid.
    affinity: Option<u32>,
}

/// The timeout of a service with `sessionAffinity: ClientIP` whose
/// `timeoutSeconds` reads `written`: the API server's default when
/// absent; out of range (only a file can hold that: the API server
/// refuses it) reported, and served with the default.
fn affinity_seconds(service: &ObjectKey, written: Option<i32>, issues: &mut Vec<Issue>) -> u32 {
    use datapath_common::affinity::{DEFAULT_TIMEOUT_SECONDS, MAX_TIMEOUT_SECONDS};
    match written {
        None => DEFAULT_TIMEOUT_SECONDS,
        Some(seconds) if (1..=MAX_TIMEOUT_SECONDS as i32).contains(&seconds) => seconds as u32,
        Some(seconds) => {
            issues.push(service_issue(
                service,
                IssueKind::Invalid,
                "spec.sessionAffinityConfig.clientIP.timeoutSeconds".into(),
                format!(
                    "{seconds} is outside 1..={MAX_TIMEOUT_SECONDS}; \
                     using the default of {DEFAULT_TIMEOUT_SECONDS} seconds"
                ),
            ));
            DEFAULT_TIMEOUT_SECONDS
        }
    }
}

/// The frontends of family `A`, for a service with a ClusterIP of it
/// (kube-proxy's per-family trackers skip a service without one, its
/// other addresses of that family included): its ClusterIPs, other
/// addresses and node addresses × the valid ports, over `slices` (of its
/// `addressType`).
fn family_frontends<A: Family>(
    context: &FamilyContext<'_>,
    slices: &[&SliceView],
    issues: &mut Vec<Issue>,
) -> Vec<DesiredFrontend<A>> {
    let service = context.service;
    let addresses: Vec<A> = context
        .addresses
        .iter()
        .filter_map(|&ip| A::from_ip(ip))
        .collect();
    let other_addresses: Vec<(A, Claim)> = context
        .other_addresses
        .iter()
        .filter_map(|&(ip, claim)| Some((A::from_ip(ip)?, claim)))
        .collect();
    let node_addresses: Vec<A> = context
        .node
        .addresses
        .iter()
        .filter_map(|&ip| A::from_ip(ip))
        .collect();
    let mut frontends = Vec::new();
    for port in context.ports {
        let cluster_ip_scope = match (service.node_local, context.node.node_name.as_deref()) {
            (true, Some(name)) => Scope::Node(TopologyName::find(name)),
            _ => Scope::Cluster(context.here),
        };
        let (backends, draining) = endpoints_for_port::<A>(
            slices,
            &port.name,
            port.protocol,
            service.publish_not_ready,
            cluster_ip_scope,
            issues,
        );
        let node_addresses: &[A] = match port.node_port {
            Some(_) => &node_addresses,
            None => &[],
        };
        // `internalTrafficPolicy: Local` is the ClusterIP's alone: the
        // other addresses take the cluster's endpoints (its slice issues
        // were reported above).
        let (other_backends, other_draining) = match cluster_ip_scope {
            Scope::Node(_) if !other_addresses.is_empty() || !node_addresses.is_empty() => {
                endpoints_for_port::<A>(
                    slices,
                    &port.name,
                    port.protocol,
                    service.publish_not_ready,
                    Scope::Cluster(context.here),
                    &mut Vec::new(),
                )
            }
            _ => (backends.clone(), draining.clone()),
        };
        // From outside (north-south): the cluster's endpoints, or under
        // `externalTrafficPolicy: Local` this node's among them (kube-proxy's
        // KUBE-EXT to KUBE-SVL); none without a node name to find them by.
        let external: Vec<Endpoint<A>> = if other_addresses.is_empty() && node_addresses.is_empty()
        {
            Vec::new()
        } else if service.external_local {
            match context.node.node_name.as_deref() {
                Some(name) => {
                    let (local, _) = endpoints_for_port::<A>(
                        slices,
                        &port.name,
                        port.protocol,
                        service.publish_not_ready,
                        Scope::Node(TopologyName::find(name)),
                        &mut Vec::new(),
                    );
                    other_backends
                        .iter()
                        .filter(|b| local.contains(b))
                        .copied()
                        .collect()
                }
                None => Vec::new(),
            }
        } else {
            other_backends.clone()
        };
        let desired =
            |address, number, claim, backends: &Vec<Endpoint<A>>, draining: &Vec<Endpoint<A>>| {
                DesiredFrontend {
                    frontend: Frontend {
                        address,
                        port: number,
                        protocol: port.protocol,
                    },
                    claim,
                    port_name: port.name.clone(),
                    backends: backends.clone(),
                    draining: draining.clone(),
                    affinity: context.affinity,
                    external: (claim != Claim::ClusterIp).then(|| external.clone()),
                }
            };
        for &address in &addresses {
            frontends.push(desired(
                address,
                port.number,
                Claim::ClusterIp,
                &backends,
                &draining,
            ));
        }
        for &(address, claim) in &other_addresses {
            frontends.push(desired(
                address,
                port.number,
                claim,
                &other_backends,
                &other_draining,
            ));
        }
        if let Some(node_port) = port.node_port {
            for &address in node_addresses {
                frontends.push(desired(
                    address,
                    node_port,
                    Claim::NodePort,
                    &other_backends,
                    &other_draining,
                ));
            }
        }
    }
    // One frontend once per service, with its strongest claim (an
    // external IP that is also this node's address, at the nodePort).
    frontends.sort_by_key(|d| (d.frontend, d.claim));
    frontends.dedup_by_key(|d| d.frontend);
    frontends
}

/// An address of `service` as written, or the issue that says it is not
/// one (naming `field`).
fn parsed_ip(
    service: &ObjectKey,
    address: &ParsedAddress,
    field: String,
    issues: &mut Vec<Issue>,
) -> Option<IpAddr> {
    match address {
        Ok(ip) => Some(*ip),
        Err(text) => {
            issues.push(service_issue(
                service,
                IssueKind::Invalid,
                field,
                format!("{text:?} is not an IP address"),
            ));
            None
        }
    }
}

/// Where the agent's node is, for topology hints: its name and zone as
/// numbers (None: no endpoint names it, so no hint can).
#[derive(Clone, Copy, Debug)]
struct Here {
    node: Option<TopologyName>,
    zone: Option<TopologyName>,
}

/// Which endpoints a service port may use, readiness aside.
#[derive(Clone, Copy, Debug)]
enum Scope {
    /// `internalTrafficPolicy: Local`: this node's endpoints only (None:
    /// no endpoint names the node); hints are not looked at.
    Node(Option<TopologyName>),
    /// Every node's, narrowed by topology hints as kube-proxy narrows them.
    Cluster(Here),
}

/// kube-proxy's topology modes (`pkg/proxy/topology.go`,
/// `topologyModeFromHints`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TopologyMode {
    /// No hints used: every endpoint.
    Everywhere,
    /// Endpoints hinted for this node (`hints.forNodes`).
    SameNode,
    /// Endpoints hinted for this node's zone (`hints.forZones`).
    SameZone,
}

/// One listing of an endpoint that the port's scope lets in (an endpoint
/// may be listed by more than one slice).
struct Candidate<'a, A> {
    endpoint: Endpoint<A>,
    /// Ready, or any endpoint under `publishNotReadyAddresses`.
    ready: bool,
    serving_terminating: bool,
    hints: &'a [Hint],
}

impl<A> Candidate<'_, A> {
    fn hinted(&self, kind: HintKind) -> bool {
        self.hints.iter().any(|h| h.kind == kind)
    }

    fn hinted_for(&self, kind: HintKind, name: Option<TopologyName>) -> bool {
        name.is_some_and(|name| self.hints.iter().any(|h| h.kind == kind && h.name == name))
    }
}

/// Hints are used only when every ready endpoint has them and one is for
/// here: node hints first, then zone hints; otherwise none (kube-proxy's
/// rule: a half-hinted set, or hints that leave this node or zone
/// nothing, mean every endpoint).
fn topology_mode<A>(candidates: &[Candidate<A>], here: Here) -> TopologyMode {
    let ready = || candidates.iter().filter(|c| c.ready);
    let usable = |kind, name| {
        ready().next().is_some()
            && ready().all(|c| c.hinted(kind))
            && ready().any(|c| c.hinted_for(kind, name))
    };
    if usable(HintKind::Node, here.node) {
        TopologyMode::SameNode
    } else if usable(HintKind::Zone, here.zone) {
        TopologyMode::SameZone
    } else {
        TopologyMode::Everywhere
    }
}

/// The endpoints of the service port named `port_name`, following
/// kube-proxy's readiness and topology rules, and the listed ones those
/// rules leave out (draining).
fn endpoints_for_port<A: Family>(
    slices: &[&SliceView],
    port_name: &str,
    protocol: Protocol,
    publish_not_ready: bool,
    scope: Scope,
    issues: &mut Vec<Issue>,
) -> (Vec<Endpoint<A>>, Vec<Endpoint<A>>) {
    let mut listed = BTreeSet::new();
    let mut candidates = Vec::new();
    let protocol_name = protocol.to_string();
    for slice in slices {
        let Some((port_index, slice_port)) = slice.ports.iter().enumerate().find(|(_, p)| {
            &*p.name == port_name && p.protocol.as_deref().unwrap_or("TCP") == protocol_name
        }) else {
            continue;
        };
        let Some(port) = slice_port
            .port
            .and_then(|p| u16::try_from(p).ok())
            .filter(|&p| p != 0)
        else {
            issues.push(slice_issue(
                slice,
                IssueKind::Invalid,
                format!("ports[{port_index}].port"),
                format!(
                    "{:?} is not a port number (1-65535)",
                    slice_port.port.unwrap_or(0)
                ),
            ));
            continue;
        };
        for (i, endpoint) in slice.endpoints().enumerate() {
            let ip = match endpoint.address {
                EndpointAddress::Missing => continue,
                EndpointAddress::V4(v4) => Some(IpAddr::V4(v4)),
                EndpointAddress::V6(v6) => Some(IpAddr::V6(v6)),
                EndpointAddress::Unparsed => None,
            };
            let Some(address) = ip.and_then(A::from_ip) else {
                issues.push(slice_issue(
                    slice,
                    IssueKind::Invalid,
                    format!("endpoints[{i}].addresses[0]"),
                    format!(
                        "{:?} is not an {} address",
                        ip.map_or_else(
                            || slice.unparsed_address(i).to_owned(),
                            |ip| ip.to_string()
                        ),
                        A::NAME
                    ),
                ));
                continue;
            };
            let endpoint_here = Endpoint { address, port };
            listed.insert(endpoint_here);
            if let Scope::Node(node) = scope
                && endpoint.node().is_none_or(|n| Some(n) != node)
            {
                continue;
            }
            // kube-proxy: a missing `ready` or `serving` counts as true.
            let ready = endpoint.ready().unwrap_or(true) || publish_not_ready;
            let serving = endpoint.serving().unwrap_or(true);
            let terminating = endpoint.terminating().unwrap_or(false);
            candidates.push(Candidate {
                endpoint: endpoint_here,
                ready,
                serving_terminating: serving && terminating,
                hints: slice.hints_of(i),
            });
        }
    }
    let (mode, here) = match scope {
        Scope::Node(_) => (
            TopologyMode::Everywhere,
            Here {
                node: None,
                zone: None,
            },
        ),
        Scope::Cluster(here) => (topology_mode(&candidates, here), here),
    };
    let admitted = |c: &Candidate<A>| match mode {
        TopologyMode::Everywhere => true,
        TopologyMode::SameNode => c.hinted_for(HintKind::Node, here.node),
        TopologyMode::SameZone => c.hinted_for(HintKind::Zone, here.zone),
    };
    let ready: BTreeSet<Endpoint<A>> = candidates
        .iter()
        .filter(|c| c.ready && admitted(c))
        .map(|c| c.endpoint)
        .collect();
    // None ready: the serving-and-terminating ones, wherever they are
    // (graceful termination; kube-proxy does not narrow them by hints).
    let chosen = if ready.is_empty() {
        candidates
            .iter()
            .filter(|c| !c.ready && c.serving_terminating)
            .map(|c| c.endpoint)
            .collect()
    } else {
        ready
    };
    let draining = listed.difference(&chosen).copied().collect();
    (chosen.into_iter().collect(), draining)
}

/// All frontends of all services, keyed by frontend. Two services claiming
/// one frontend: the first in namespace/name order keeps it, the other
/// gets a `Conflict` issue.
#[derive(Clone, Debug, Default)]
pub struct Translation {
    pub frontends: BTreeMap<Frontend, (ObjectKey, DesiredFrontend)>,
    pub frontends6: BTreeMap<Frontend<Ipv6Addr>, (ObjectKey, DesiredFrontend<Ipv6Addr>)>,
    pub issues: Vec<Issue>,
}

/// Translates every Service (the reference for the incremental path, and
/// what a full sync programs).
pub fn translate<'a>(
    services: impl IntoIterator<Item = &'a Service>,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    node: &NodeContext,
) -> Translation {
    let mut by_service: BTreeMap<ObjectKey, Vec<SliceView>> = BTreeMap::new();
    for slice in slices {
        let view = SliceView::from(slice);
        if let Some(owner) = view.owner.clone() {
            by_service.entry(owner).or_default().push(view);
        }
    }
    let mut services: Vec<ServiceView> = services.into_iter().map(ServiceView::from).collect();
    services.sort_by(|a, b| a.key.cmp(&b.key));
    let mut out = Translation::default();
    for service in &services {
        let key = service.key.clone();
        let slices = by_service.get(&key).map(Vec::as_slice).unwrap_or_default();
        let translation = translate_view(service, slices, node);
        out.issues.extend(translation.issues);
        claim(
            &mut out.frontends,
            &key,
            translation.frontends,
            &mut out.issues,
        );
        claim(
            &mut out.frontends6,
            &key,
            translation.frontends6,
            &mut out.issues,
        );
    }
    out
}

/// `service`'s frontends into `frontends`, where a stronger claim takes a
/// frontend from the service that held it and an equal or weaker one is a
/// conflict.
fn claim<A: Family>(
    frontends: &mut BTreeMap<Frontend<A>, (ObjectKey, DesiredFrontend<A>)>,
    service: &ObjectKey,
    desired: Vec<DesiredFrontend<A>>,
    issues: &mut Vec<Issue>,
) {
    for desired in desired {
        if let Some((owner, held)) = frontends.get(&desired.frontend) {
            if desired.claim >= held.claim {
                issues.push(conflict_issue(
                    service,
                    owner,
                    &desired.frontend,
                    desired.claim,
                ));
                continue;
            }
            // A stronger claim takes it from the service that held it.
            issues.push(conflict_issue(
                owner,
                service,
                &desired.frontend,
                held.claim,
            ));
        }
        frontends.insert(desired.frontend, (service.clone(), desired));
    }
}

/// The issue raised when `service`'s `claim` asks for a frontend `owner`
/// holds.
pub fn conflict_issue<A: Family>(
    service: &ObjectKey,
    owner: &ObjectKey,
    frontend: &Frontend<A>,
    claim: Claim,
) -> Issue {
    service_issue(
        service,
        IssueKind::Conflict,
        claim.field().into(),
        format!("{frontend} is already served for Service {owner}"),
    )
}
