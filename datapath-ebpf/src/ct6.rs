//! The IPv6 conntrack keys (`CONNTRACK6_TCP`/`_UDP`): `crate::ct`'s keys
//! with IPv6 addresses. The rules, the refresh and the entry writes are
//! `crate::ct`'s, for both families.

use datapath_common::maps::{CT_KIND_BACKEND, CT_KIND_SERVICE, CtKey6, Ipv6Words};

use crate::parse6::Packet6;

/// The service-tuple key of a client packet (destination = VIP).
#[inline(always)]
pub fn service_key(
    client_address_be: Ipv6Words,
    client_port_be: u16,
    service_address_be: Ipv6Words,
    service_port_be: u16,
    protocol: u8,
) -> CtKey6 {
    CtKey6 {
        client_address_be,
        peer_address_be: service_address_be,
        client_port_be,
        peer_port_be: service_port_be,
        protocol,
        kind: CT_KIND_SERVICE,
        _pad: [0; 2],
    }
}

/// The backend-tuple key of a flow (destination = backend), as the client
/// sees it; replies are looked up with their addresses swapped into it.
#[inline(always)]
pub fn backend_key(
    client_address_be: Ipv6Words,
    client_port_be: u16,
    backend_address_be: Ipv6Words,
    backend_port_be: u16,
    protocol: u8,
) -> CtKey6 {
    CtKey6 {
        client_address_be,
        peer_address_be: backend_address_be,
        client_port_be,
        peer_port_be: backend_port_be,
        protocol,
        kind: CT_KIND_BACKEND,
        _pad: [0; 2],
    }
}

/// The service-tuple key of a client packet as it is.
#[inline(always)]
pub fn packet_service_key(packet: &Packet6) -> CtKey6 {
    service_key(
        packet.saddr_be,
        packet.sport_be,
        packet.daddr_be,
        packet.dport_be,
        packet.protocol,
    )
}

/// The backend-tuple key of a reply packet (source = backend).
#[inline(always)]
pub fn reply_key(packet: &Packet6) -> CtKey6 {
    backend_key(
        packet.daddr_be,
        packet.dport_be,
        packet.saddr_be,
        packet.sport_be,
        packet.protocol,
    )
}
