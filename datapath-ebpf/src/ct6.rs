//! The IPv6 conntrack (`CONNTRACK6_TCP`/`_UDP`): `crate::ct`'s keys with
//! IPv6 addresses, a tracked flow's live backend, an ended flow's
//! removal. The rules, the refresh and the entry writes are `crate::ct`'s,
//! for both families.

use datapath_common::{
    conntrack,
    maps::{CT_KIND_BACKEND, CT_KIND_SERVICE, CtEntry6, CtKey6, Ipv6Words},
};

use crate::{
    backends, ct,
    maps::{CONNTRACK6_TCP, REVERSE_NAT6},
    parse6::Packet6,
};

/// The port an entry's flow uses in place of `port`: its `nat_port_be`
/// when the client port moved on a tuple clash (`crate::clash6`: on a
/// service-tuple entry the port on the wire, on a backend-tuple entry the
/// client's own), else `port` itself.
#[inline(always)]
pub fn moved_port(entry: &CtEntry6, port: u16) -> u16 {
    if entry.nat_port_be != 0 {
        entry.nat_port_be
    } else {
        port
    }
}

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

/// The backend of a live tracked flow, or `None` when the flow must be
/// balanced afresh (`crate::egress`'s rules: expired, its frontend gone or
/// re-created, a SYN reusing a closed flow's tuple, its backend deleted).
#[inline(always)]
pub fn tracked_backend(flow: &CtEntry6, packet: &Packet6, now: u64) -> Option<(Ipv6Words, u16)> {
    if ct::is_expired(flow, packet.protocol, now)
        || conntrack::syn_reopens(flow, packet.protocol, packet.tcp_flags)
    {
        return None;
    }
    let frontend = REVERSE_NAT6.get(flow.rev_nat_id())?;
    if !frontend.is_present()
        || frontend.address_be != packet.daddr_be
        || frontend.port_be != packet.dport_be
    {
        return None;
    }
    backends::ipv6(flow.backend_id)
}

/// Removes both entries of an ended service flow whose backend-tuple
/// entry (`reply`) holds `packet`'s wire tuple: a flow never has one
/// without the other. Its service-tuple entry has the client's own port
/// (`nat_port_be` when the flow's was moved).
#[inline(always)]
pub fn forget_ended_flow(
    packet: &Packet6,
    reply: &CtKey6,
    service_address_be: Ipv6Words,
    service_port_be: u16,
    nat_port_be: u16,
) {
    let service = service_key(
        packet.saddr_be,
        if nat_port_be != 0 {
            nat_port_be
        } else {
            packet.sport_be
        },
        service_address_be,
        service_port_be,
        packet.protocol,
    );
    let _ = CONNTRACK6_TCP.remove(service);
    let _ = CONNTRACK6_TCP.remove(reply);
}
