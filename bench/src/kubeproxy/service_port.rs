//! A service port as kube-proxy sees it, the names and hashes its
//! chains are given, and the choices its configuration makes.

use std::net::{IpAddr, SocketAddr};

use crate::family::IpFamily;

use data_encoding::BASE32;
use datapath_user::{
    k8s::{DesiredFrontend, Ipv6Serving, NodeContext, ObjectKey, translate, translate::Claim},
    model::Protocol,
};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use sha2::{Digest, Sha256};

/// One service port as kube-proxy sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub namespace: String,
    pub name: String,
    /// "" when the port is unnamed.
    pub port_name: String,
    pub protocol: Protocol,
    pub cluster_ip: IpAddr,
    pub port: u16,
    /// Sorted as kube-proxy sorts them: by the "IP:port" string
    /// ([`endpoint_string`]). Of the ClusterIP's family.
    pub endpoints: Vec<(IpAddr, u16)>,
    /// The port's nodePort, under `externalTrafficPolicy: Cluster` (the
    /// generator writes no `Local` nodePorts: `service_ports` leaves
    /// them out).
    pub node_port: Option<u16>,
}

/// An endpoint as kube-proxy writes it (`BaseEndpointInfo.String()`,
/// Go's `net.JoinHostPort`): "10.180.0.1:80", "[fd00::1]:80". Its
/// chain hashes, comments, DNAT targets and sort order use this text.
pub fn endpoint_string(endpoint: (IpAddr, u16)) -> String {
    SocketAddr::new(endpoint.0, endpoint.1).to_string()
}

impl ServicePort {
    /// `ServicePortName.String()`: "ns/name:port", or "ns/name" unnamed.
    pub fn service_port_name(&self) -> String {
        if self.port_name.is_empty() {
            format!("{}/{}", self.namespace, self.name)
        } else {
            format!("{}/{}:{}", self.namespace, self.name, self.port_name)
        }
    }

    pub(super) fn proto(&self) -> &'static str {
        match self.protocol {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }

    /// `KUBE-SVC-…`.
    pub fn svc_chain(&self) -> String {
        format!(
            "KUBE-SVC-{}",
            port_proto_hash(&self.service_port_name(), self.proto())
        )
    }

    /// `KUBE-EXT-…`: where nodePort (and load-balancer, external IP)
    /// traffic goes.
    pub fn ext_chain(&self) -> String {
        format!(
            "KUBE-EXT-{}",
            port_proto_hash(&self.service_port_name(), self.proto())
        )
    }

    /// `KUBE-SEP-…` of one endpoint.
    pub fn sep_chain(&self, endpoint: (IpAddr, u16)) -> String {
        let text = format!(
            "{}{}{}",
            self.service_port_name(),
            self.proto(),
            endpoint_string(endpoint)
        );
        format!("KUBE-SEP-{}", hash16(&text))
    }

    /// nftables base name: "ns/svc/proto/portName".
    pub fn nft_base(&self) -> String {
        format!(
            "{}/{}/{}/{}",
            self.namespace,
            self.name,
            self.proto(),
            self.port_name
        )
    }

    /// `servicePortEndpointChainNameBase`: an IPv6 address's colons,
    /// not allowed in a chain name, become dots.
    pub(super) fn nft_endpoint_base(&self, endpoint: (IpAddr, u16)) -> String {
        let address = endpoint.0.to_string().replace(':', ".");
        format!("{}__{address}/{}", self.nft_base(), endpoint.1)
    }

    pub fn family(&self) -> IpFamily {
        IpFamily::of(self.cluster_ip)
    }
}

fn hash16(text: &str) -> String {
    BASE32.encode(&Sha256::digest(text.as_bytes()))[..16].to_owned()
}

/// `portProtoHash`: base32(sha256(servicePortName + protocol))[:16].
pub fn port_proto_hash(service_port_name: &str, protocol: &str) -> String {
    hash16(&format!("{service_port_name}{protocol}"))
}

/// nftables `hashAndTruncate`: base32(sha256(name))[:8] + "-" + name.
pub fn nft_chain_suffix(name: &str) -> String {
    let hash = &BASE32.encode(&Sha256::digest(name.as_bytes()))[..8];
    format!("{hash}-{name}")
}

/// `fmt.Sprintf("%0.10f", 1.0/float64(n))`.
pub fn probability(n: usize) -> String {
    format!("{:.10}", 1.0 / n as f64)
}

/// Choices kube-proxy makes from its configuration.
#[derive(Clone, Debug)]
pub struct Options {
    /// `--cluster-cidr`: the local-traffic detector (`! -s CIDR`). None:
    /// the no-op detector, no masquerade rule in service chains.
    pub cluster_cidr: Option<String>,
    /// `1 << masqueradeBit` (default bit 14).
    pub masquerade_mark: u32,
    /// `--random-fully` on MASQUERADE (iptables ≥ 1.6.2).
    pub random_fully: bool,
    /// Service CIDR, for the nftables "drop unallocated ClusterIPs" rule.
    pub service_cidr: Option<String>,
    /// The family of this proxier: the renderers write its rules and
    /// leave the other family's service ports out, as kube-proxy's
    /// per-family proxiers do. The CIDRs above are of this family.
    pub family: IpFamily,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            cluster_cidr: Some("10.0.0.0/8".into()),
            masquerade_mark: 0x4000,
            random_fully: true,
            service_cidr: None,
            family: IpFamily::V4,
        }
    }
}

/// Above this many endpoints in total, kube-proxy drops comments from
/// the per-endpoint rules (`largeClusterEndpointsThreshold`).
pub const LARGE_CLUSTER_ENDPOINTS: usize = 1000;

/// The service ports kube-proxy would program for these objects, both
/// families (its endpoint selection is the one underpass's translate
/// implements; each renderer takes its own family's).
pub fn service_ports(services: &[Service], slices: &[EndpointSlice]) -> Vec<ServicePort> {
    let both = NodeContext {
        ipv6: Ipv6Serving::On,
        ..NodeContext::default()
    };
    let translation = translate(services, slices, &both);
    let node_port = |owner: &ObjectKey, port_name: &str, protocol: Protocol| {
        let spec = services
            .iter()
            .find(|s| {
                s.metadata.namespace.as_deref() == Some(owner.namespace())
                    && s.metadata.name.as_deref() == Some(owner.name())
            })?
            .spec
            .as_ref()?;
        if spec.external_traffic_policy.as_deref() == Some("Local") {
            return None;
        }
        let port = spec.ports.iter().flatten().find(|p| {
            p.name.as_deref().unwrap_or_default() == port_name
                && p.protocol.as_deref().unwrap_or("TCP") == protocol.to_string()
        })?;
        u16::try_from(port.node_port?).ok().filter(|&p| p != 0)
    };
    let mut out: Vec<ServicePort> = translation
        .frontends
        .values()
        .filter(|(_, desired)| desired.claim == Claim::ClusterIp)
        .map(|(owner, desired)| service_port(owner, desired))
        .chain(
            translation
                .frontends6
                .values()
                .filter(|(_, desired)| desired.claim == Claim::ClusterIp)
                .map(|(owner, desired)| service_port(owner, desired)),
        )
        .map(|mut port| {
            let owner = ObjectKey::new(&port.namespace, &port.name);
            port.node_port = node_port(&owner, &port.port_name, port.protocol);
            port
        })
        .collect();
    out.sort_by(|a, b| {
        (a.service_port_name(), a.proto(), a.family() == IpFamily::V6).cmp(&(
            b.service_port_name(),
            b.proto(),
            b.family() == IpFamily::V6,
        ))
    });
    out
}

/// One translated frontend as kube-proxy's service port.
fn service_port<A>(owner: &ObjectKey, desired: &DesiredFrontend<A>) -> ServicePort
where
    A: Copy + Into<IpAddr>,
{
    let mut endpoints: Vec<(IpAddr, u16)> = desired
        .backends
        .iter()
        .map(|b| (b.address.into(), b.port))
        .collect();
    endpoints.sort_by_key(|&e| endpoint_string(e));
    ServicePort {
        namespace: owner.namespace().to_owned(),
        name: owner.name().to_owned(),
        port_name: desired.port_name.to_string(),
        protocol: desired.frontend.protocol,
        cluster_ip: desired.frontend.address.into(),
        port: desired.frontend.port,
        endpoints,
        node_port: None,
    }
}
