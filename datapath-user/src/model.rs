//! The datapath's vocabulary, as the control plane speaks it: a frontend
//! (service address, port, protocol), a backend address, a backend with
//! its id. What `k8s::translate` produces and the maps consume; neither
//! the Kubernetes types nor the map handles are needed to use it.

use std::net::Ipv4Addr;

use datapath_common::{
    IPPROTO_TCP, IPPROTO_UDP, ipv4_be, ipv4_octets,
    maps::{BackendId, ServiceKey},
    port_be, port_host,
};

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
pub struct Frontend {
    pub address: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
}

impl Frontend {
    pub fn key(&self) -> ServiceKey {
        ServiceKey::new(
            ipv4_be(self.address.octets()),
            port_be(self.port),
            self.protocol.number(),
        )
    }
}

impl Frontend {
    /// The frontend a `SERVICES` key names.
    pub fn from_key(key: &ServiceKey) -> Option<Self> {
        Some(Self {
            address: Ipv4Addr::from(ipv4_octets(key.address_be)),
            port: port_host(key.port_be),
            protocol: Protocol::from_number(key.protocol)?,
        })
    }
}

impl std::fmt::Display for Frontend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}/{}", self.address, self.port, self.protocol)
    }
}

/// A backend's identity: two frontends with the same backend address,
/// port and protocol share one `BACKENDS` entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct BackendAddress {
    pub address: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
}

impl std::fmt::Display for BackendAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}/{}", self.address, self.port, self.protocol)
    }
}

/// One backend of a frontend, with the id the caller allocated for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BackendEntry {
    pub id: BackendId,
    pub address: Ipv4Addr,
    pub port: u16,
}
