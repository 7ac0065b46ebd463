//! The datapath's vocabulary, as the control plane speaks it: a frontend
//! (service address, port, protocol), a backend address, a backend with
//! its id. What `k8s::translate` produces and the maps consume; neither
//! the Kubernetes types nor the map handles are needed to use it.

use std::{
    fmt::{Debug, Display},
    hash::Hash,
    net::{Ipv4Addr, Ipv6Addr},
};

use datapath_common::{
    IPPROTO_TCP, IPPROTO_UDP, ipv4_be, ipv4_octets,
    maps::{BackendId, Ipv6Words, ServiceKey, ServiceKey6},
    port_be, port_host,
};

/// An address family: its address type, and the key its frontends have
/// in the maps (`SERVICES` or `SERVICES6`). Frontends and backends are
/// generic over it, so that each family's tables hold its own addresses
/// unboxed (an IPv4 frontend stays 8 bytes, where an `IpAddr` would make
/// it 20 and cost the agent ~6 MiB at 50,000 services).
pub trait Family:
    Copy + Eq + Hash + Ord + Debug + Display + Send + Sync + Into<std::net::IpAddr> + 'static
{
    /// `SERVICES` or `SERVICES6`'s key.
    type ServiceKey: Copy + Eq + Hash + Ord + Debug;
    /// "IPv4" or "IPv6", as `addressType` and `ipFamilies` spell them.
    const NAME: &'static str;
    /// Whether the uplink program serves this family's frontends from
    /// outside (north-south; IPv4 for now).
    const FROM_OUTSIDE: bool;

    fn service_key(address: Self, port: u16, protocol: Protocol) -> Self::ServiceKey;
    /// `ip` if it is of this family.
    fn from_ip(ip: std::net::IpAddr) -> Option<Self>;
    /// The frontend a key names (None: a protocol this build does not
    /// know).
    fn frontend_of(key: &Self::ServiceKey) -> Option<Frontend<Self>>;
}

impl Family for Ipv4Addr {
    type ServiceKey = ServiceKey;
    const NAME: &'static str = "IPv4";
    const FROM_OUTSIDE: bool = true;

    fn service_key(address: Self, port: u16, protocol: Protocol) -> ServiceKey {
        ServiceKey::new(ipv4_be(address.octets()), port_be(port), protocol.number())
    }

    fn from_ip(ip: std::net::IpAddr) -> Option<Self> {
        match ip {
            std::net::IpAddr::V4(v4) => Some(v4),
            std::net::IpAddr::V6(_) => None,
        }
    }

    fn frontend_of(key: &ServiceKey) -> Option<Frontend<Self>> {
        Some(Frontend {
            address: Ipv4Addr::from(ipv4_octets(key.address_be)),
            port: port_host(key.port_be),
            protocol: Protocol::from_number(key.protocol)?,
        })
    }
}

impl Family for Ipv6Addr {
    type ServiceKey = ServiceKey6;
    const NAME: &'static str = "IPv6";
    const FROM_OUTSIDE: bool = false;

    fn service_key(address: Self, port: u16, protocol: Protocol) -> ServiceKey6 {
        ServiceKey6::new(ipv6_words(address), port_be(port), protocol.number())
    }

    /// Not an IPv4-mapped one (`::ffff:a.b.c.d`): the API server refuses
    /// them, and a socket cannot be sent to one over IPv6.
    fn from_ip(ip: std::net::IpAddr) -> Option<Self> {
        match ip {
            std::net::IpAddr::V6(v6) if v6.to_ipv4_mapped().is_none() => Some(v6),
            std::net::IpAddr::V6(_) | std::net::IpAddr::V4(_) => None,
        }
    }

    fn frontend_of(key: &ServiceKey6) -> Option<Frontend<Self>> {
        Some(Frontend {
            address: ipv6_from_words(key.address_be),
            port: port_host(key.port_be),
            protocol: Protocol::from_number(key.protocol)?,
        })
    }
}

/// `address` as the maps hold it: four words in network order.
pub fn ipv6_words(address: Ipv6Addr) -> Ipv6Words {
    let octets = address.octets();
    std::array::from_fn(|i| {
        u32::from_ne_bytes([
            octets[4 * i],
            octets[4 * i + 1],
            octets[4 * i + 2],
            octets[4 * i + 3],
        ])
    })
}

/// The address four network-order words hold.
pub fn ipv6_from_words(words: Ipv6Words) -> Ipv6Addr {
    let mut octets = [0u8; 16];
    for (chunk, word) in octets.chunks_exact_mut(4).zip(words) {
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    Ipv6Addr::from(octets)
}

/// L4 protocol of a frontend.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum Protocol {
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
}

impl Protocol {
    pub const fn number(self) -> u8 {
        match self {
            Protocol::Tcp => IPPROTO_TCP,
            Protocol::Udp => IPPROTO_UDP,
        }
    }

    pub const fn from_number(number: u8) -> Option<Self> {
        match number {
            IPPROTO_TCP => Some(Protocol::Tcp),
            IPPROTO_UDP => Some(Protocol::Udp),
            _ => None,
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        })
    }
}

/// A service address: what clients connect to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend<A = Ipv4Addr> {
    pub address: A,
    pub port: u16,
    pub protocol: Protocol,
}

impl<A: Family> Frontend<A> {
    /// Its key in `SERVICES` (or `SERVICES6`).
    pub fn key(&self) -> A::ServiceKey {
        A::service_key(self.address, self.port, self.protocol)
    }

    /// The frontend a `SERVICES` (or `SERVICES6`) key names.
    pub fn from_key(key: &A::ServiceKey) -> Option<Self> {
        A::frontend_of(key)
    }

    /// The same frontend with its address as either family's (what an
    /// error that may name a frontend of either family holds).
    pub fn erased(&self) -> Frontend<std::net::IpAddr> {
        Frontend {
            address: self.address.into(),
            port: self.port,
            protocol: self.protocol,
        }
    }
}

impl<A: Copy + Into<std::net::IpAddr>> Display for Frontend<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let socket = std::net::SocketAddr::new(self.address.into(), self.port);
        write!(f, "{socket}/{}", self.protocol)
    }
}

/// A backend's identity: two frontends with the same backend address,
/// port and protocol share one `BACKENDS` entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct BackendAddress<A = Ipv4Addr> {
    pub address: A,
    pub port: u16,
    pub protocol: Protocol,
}

impl<A: Family> Display for BackendAddress<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let socket = std::net::SocketAddr::new(self.address.into(), self.port);
        write!(f, "{socket}/{}", self.protocol)
    }
}

/// One backend of a frontend, with the id the caller allocated for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BackendEntry<A = Ipv4Addr> {
    pub id: BackendId,
    pub address: A,
    pub port: u16,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keys hold what the packet carries; each family's frontends come
    /// back from their keys, and print as socket addresses do.
    #[test]
    fn frontends_round_trip_through_their_keys_in_both_families() {
        let v4 = Frontend {
            address: Ipv4Addr::new(10, 96, 0, 10),
            port: 53,
            protocol: Protocol::Udp,
        };
        assert_eq!(Frontend::from_key(&v4.key()), Some(v4));
        assert_eq!(v4.to_string(), "10.96.0.10:53/UDP");
        let address: Ipv6Addr = "2001:db8::a".parse().unwrap();
        let v6 = Frontend {
            address,
            port: 443,
            protocol: Protocol::Tcp,
        };
        let key = v6.key();
        assert_eq!(Frontend::<Ipv6Addr>::from_key(&key), Some(v6));
        // SAFETY: ServiceKey6 is repr(C), 20 bytes, no implicit padding.
        let bytes: [u8; 20] = unsafe { std::mem::transmute(key) };
        assert_eq!(bytes[..16], address.octets());
        assert_eq!(bytes[16..], [1, 187, IPPROTO_TCP, 0]);
        assert_eq!(v6.to_string(), "[2001:db8::a]:443/TCP");
        assert_eq!(ipv6_from_words(ipv6_words(address)), address);
        let backend = BackendAddress {
            address,
            port: 8443,
            protocol: Protocol::Tcp,
        };
        assert_eq!(backend.to_string(), "[2001:db8::a]:8443/TCP");
        assert_eq!(size_of::<Frontend>(), 8, "an IPv4 frontend stays small");
    }
}
