//! ICMP errors about north-south flows (`crate::uplink`). A router between
//! the client and this node that cannot forward a reply ("fragmentation
//! needed" for path-MTU discovery, "time exceeded", "unreachable") sends
//! its error to the reply's source, the frontend, quoting the reply as it
//! left: from the frontend to the client. The socket that sent the reply
//! is the backend's: a pod on this node (which sent it from its own
//! address and port to the client) or, SNATed, a backend elsewhere (which
//! sent it to this node's address and one of its SNAT ports). Untranslated,
//! the error reaches this node's stack, which has no such socket, and a
//! path MTU below the pod's black-holes its large segments; kube-proxy's
//! conntrack translates such errors as RELATED.
//!
//! The error goes to that backend: the outer destination and the quoted
//! reply become what the backend sent. The router stays the source for a
//! pod here (its flow kept the client's address); a backend elsewhere
//! knows only this node, so its error comes from this node's address (as
//! netfilter's NAT rewrites it for a masqueraded flow). Every checksum
//! stays valid: the outer IP header's, the quoted IP header's, the quoted
//! L4 checksum when it was quoted, and the ICMP checksum over all of the
//! quote. Only a live flow's error is translated, and for an SNATed one
//! only while its port is still its own.
//!
//! Only outer and quoted IPv4 headers without options are translated
//! (routers' errors and our flows' packets carry none): the offsets are
//! then constants the verifier needs no help with. Anything else passes
//! to the stack as before. The frames that come here are those the
//! uplink program does not parse as TCP or UDP (ARP, IPv6, ICMP,
//! fragments); all but ICMP errors leave after the first checks.
//!
//! The other way too: a router between this node and a backend
//! elsewhere that cannot forward what this node sent it (SNATed: from
//! this node's address and port) sends its error to this node; it goes
//! to the client, quoting what the client sent, from the frontend.

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
    programs::XdpContext,
};
use datapath_common::{
    IPPROTO_TCP, IPPROTO_UDP, csum,
    maps::{Backend, CtEntry, L2_UPLINK_LOCAL, L2_UPLINK_SNAT},
    metrics::Counter,
};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::Ipv4Hdr,
};

use crate::{
    ct,
    maps::{BACKENDS, CONNTRACK_TCP, CONNTRACK_UDP, LOCAL_PODS, NORTH_SOUTH, UPLINK_SNAT},
    metrics::count,
    parse::{ETH_LEN, IP_CSUM_OFF, IP_DST_OFF, IP_SRC_OFF, TCP_CSUM_OFF, UDP_CSUM_OFF},
    uplink_frame::{next_hop, ptr_at, set_destination_mac, set_macs},
};

const IPPROTO_ICMP: u8 = 1;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
/// Version 4, a 20-byte header: no options.
const IPV4_NO_OPTIONS: u8 = 0x45;
/// Fragment offset and more-fragments bits (host order).
const IP_FRAGMENT_BITS: u16 = 0x3fff;
/// The fragment offset alone: a first fragment still has the L4 header.
const IP_FRAGMENT_OFFSET: u16 = 0x1fff;
const ICMP_OFF: usize = ETH_LEN + 20;
const ICMP_CSUM_OFF: usize = ICMP_OFF + 2;
/// The ICMP header before the quote.
const QUOTED_IP_OFF: usize = ICMP_OFF + 8;
const QUOTED_L4_OFF: usize = QUOTED_IP_OFF + 20;

/// An address and a port of the quoted packet, as they sit in the frame.
#[derive(Clone, Copy)]
struct End {
    address_be: u32,
    port_be: u16,
}

/// The quoted packet as the rewrites need it.
#[derive(Clone, Copy)]
struct Quote {
    /// Where the error's IP packet ends in the frame (a trailer after it
    /// is not the quote's).
    end: usize,
    /// TCP or UDP.
    protocol: u8,
}

/// The verdict for an ICMP error about a north-south flow, `None` for any
/// other frame (the caller passes it to the stack).
#[inline(always)]
pub fn run(ctx: &XdpContext) -> Option<u32> {
    let eth: *const EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: bounds-checked by ptr_at.
    if unsafe { (*eth).ether_type } != EtherType::Ipv4 as u16 {
        return None;
    }
    let outer: *const Ipv4Hdr = ptr_at(ctx, ETH_LEN)?;
    // SAFETY: bounds-checked by ptr_at.
    let (vihl, protocol, frags, tot_len, outer_dst_be) = unsafe {
        (
            (*outer).vihl,
            (*outer).proto,
            (*outer).frags,
            (*outer).tot_len,
            u32::from_ne_bytes((*outer).dst_addr),
        )
    };
    if protocol != IPPROTO_ICMP
        || vihl != IPV4_NO_OPTIONS
        || u16::from_be_bytes(frags) & IP_FRAGMENT_BITS != 0
    {
        return None;
    }
    // Where the IP packet ends: bytes after it (an Ethernet trailer) are
    // neither read as the quote nor summed into its checksum. Compared as
    // lengths, not pointers: from a pointer comparison the compiler
    // would drop the bounds checks below that it implies, which the
    // verifier cannot follow through a variable offset. (The verifier
    // takes the difference of two packet pointers from a loader with
    // CAP_PERFMON, as the agent's DaemonSet has.)
    let end = ETH_LEN + u16::from_be_bytes(tot_len) as usize;
    let frame_len = ctx.data_end().wrapping_sub(ctx.data());
    if end < QUOTED_L4_OFF + 4 || end > frame_len {
        return None;
    }
    let icmp_type: *const u8 = ptr_at(ctx, ICMP_OFF)?;
    // SAFETY: bounds-checked by ptr_at.
    let icmp_type = unsafe { *icmp_type };
    if icmp_type != ICMP_DEST_UNREACH && icmp_type != ICMP_TIME_EXCEEDED {
        return None;
    }
    let quoted: *const Ipv4Hdr = ptr_at(ctx, QUOTED_IP_OFF)?;
    let ports: *const [u16; 2] = ptr_at(ctx, QUOTED_L4_OFF)?;
    // SAFETY: bounds-checked by ptr_at.
    let (quoted_vihl, quoted_frags, quoted_protocol, frontend, client) = unsafe {
        (
            (*quoted).vihl,
            (*quoted).frags,
            (*quoted).proto,
            End {
                address_be: u32::from_ne_bytes((*quoted).src_addr),
                port_be: (*ports)[0],
            },
            End {
                address_be: u32::from_ne_bytes((*quoted).dst_addr),
                port_be: (*ports)[1],
            },
        )
    };
    // A later fragment quoted carries no ports where they would be.
    if quoted_vihl != IPV4_NO_OPTIONS
        || u16::from_be_bytes(quoted_frags) & IP_FRAGMENT_OFFSET != 0
        || (quoted_protocol != IPPROTO_TCP && quoted_protocol != IPPROTO_UDP)
        || outer_dst_be != frontend.address_be
    {
        return None;
    }
    let quote = Quote {
        end,
        protocol: quoted_protocol,
    };
    let config = NORTH_SOUTH.get(0)?;
    // Not a reply, perhaps: what this node sent a backend elsewhere,
    // SNATed (the quote's source is this node and one of its SNAT ports,
    // its destination the backend). If no such flow holds the port, a
    // frontend at this address with a port in that range may.
    if frontend.address_be == config.snat_address_be
        && config.is_snat_port(frontend.port_be)
        && let Some(translated) = toward_the_client(ctx, quote, frontend, client)
    {
        return Some(verdict(translated));
    }
    // The reply it quotes went from the frontend to the client: the
    // flow's service-tuple entry names its backend.
    let flow = service_flow(client, frontend, quoted_protocol)?;
    let now = ct::now();
    if (flow.l2_mode != L2_UPLINK_LOCAL && flow.l2_mode != L2_UPLINK_SNAT)
        || ct::is_expired(&flow, quoted_protocol, now)
    {
        return None;
    }
    let backend = BACKENDS
        .get(flow.backend_id)
        .copied()
        .filter(Backend::is_present_v4)?;
    let to_backend = End {
        address_be: backend.address_be,
        port_be: backend.port_be,
    };
    let translated = if flow.l2_mode == L2_UPLINK_LOCAL {
        // The pod sent it from its own address and port to the client.
        // SAFETY: the value is copied out before any other map call.
        let mac =
            (unsafe { LOCAL_PODS.get(backend.address_be) }).map_or(flow.dst_mac, |pod| pod.mac);
        rewrite_outer(ctx, IP_DST_OFF, frontend.address_be, backend.address_be)
            .and_then(|()| quoted_source(ctx, quote, frontend, to_backend))
            .and_then(|()| set_destination_mac(ctx, mac))
            .map(|()| XDP_PASS)
    } else {
        // The backend elsewhere sent it to this node's SNAT address and
        // the flow's port, if the port is still the flow's own.
        let snat_address_be = config.snat_address_be;
        let to_node = End {
            address_be: snat_address_be,
            port_be: flow.nat_port_be,
        };
        let port = ct::backend_key(
            snat_address_be,
            flow.nat_port_be,
            backend.address_be,
            backend.port_be,
            quoted_protocol,
        );
        // SAFETY: the value is copied out before any other map call.
        let owner = *unsafe { UPLINK_SNAT.get(port) }?;
        if owner.client_address_be != client.address_be
            || owner.client_port_be != client.port_be
            || owner.frontend_address_be != frontend.address_be
            || owner.frontend_port_be != frontend.port_be
        {
            return None;
        }
        // The backend's next hop as the flow last learned it, or the
        // kernel's answer now when that is stale.
        let (next_mac, uplink_mac) = if ct::l2_is_fresh(flow.l2_seen, now) {
            (flow.dst_mac, flow.src_mac)
        } else {
            next_hop(ctx, quoted_protocol, snat_address_be, backend.address_be).ok()?
        };
        // The source the backend knows: this node (the router's address
        // would meet anti-spoofing on the way, and the backend never
        // heard of the client).
        let outer_src: *const u32 = ptr_at(ctx, ETH_LEN + IP_SRC_OFF)?;
        // SAFETY: bounds-checked by ptr_at.
        let router_be = unsafe { *outer_src };
        rewrite_outer(ctx, IP_DST_OFF, frontend.address_be, backend.address_be)
            .and_then(|()| rewrite_outer(ctx, IP_SRC_OFF, router_be, snat_address_be))
            .and_then(|()| quoted_source(ctx, quote, frontend, to_backend))
            .and_then(|()| quoted_destination(ctx, quote, client, to_node))
            .and_then(|()| set_macs(ctx, next_mac, uplink_mac))
            .map(|()| XDP_TX)
    };
    Some(verdict(translated))
}

/// An error about what this node sent a backend elsewhere for a flow
/// from outside (`node`: this node's SNAT address and the flow's port;
/// `backend`): it goes to the client, quoting what the client sent (to
/// the frontend), from the frontend (as netfilter rewrites it for a
/// DNATed and masqueraded flow: the client knows only the frontend),
/// back to the hop the flow came in from. `None`: no live flow holds
/// that port for that backend.
#[inline(always)]
fn toward_the_client(
    ctx: &XdpContext,
    quote: Quote,
    node: End,
    backend: End,
) -> Option<Result<u32, ()>> {
    let protocol = quote.protocol;
    let port = ct::backend_key(
        node.address_be,
        node.port_be,
        backend.address_be,
        backend.port_be,
        protocol,
    );
    // SAFETY: the value is copied out before any other map call.
    let flow = *unsafe { UPLINK_SNAT.get(port) }?;
    if ct::is_expired(&flow, protocol, ct::now()) {
        return None;
    }
    let client = End {
        address_be: flow.client_address_be,
        port_be: flow.client_port_be,
    };
    let frontend = End {
        address_be: flow.frontend_address_be,
        port_be: flow.frontend_port_be,
    };
    // Only while the client's flow still goes out by this port (it may
    // have been reopened on another since), as `uplink_snat::reply`.
    let forward = service_flow(client, frontend, protocol)?;
    if forward.l2_mode != L2_UPLINK_SNAT || forward.nat_port_be != node.port_be {
        return None;
    }
    let outer_src: *const u32 = ptr_at(ctx, ETH_LEN + IP_SRC_OFF)?;
    // SAFETY: bounds-checked by ptr_at.
    let router_be = unsafe { *outer_src };
    Some(
        rewrite_outer(ctx, IP_DST_OFF, node.address_be, client.address_be)
            .and_then(|()| rewrite_outer(ctx, IP_SRC_OFF, router_be, frontend.address_be))
            .and_then(|()| quoted_source(ctx, quote, node, client))
            .and_then(|()| quoted_destination(ctx, quote, backend, frontend))
            .and_then(|()| set_macs(ctx, flow.client_mac, flow.uplink_mac))
            .map(|()| XDP_TX),
    )
}

/// The service-tuple entry of the flow from `client` to `frontend`.
#[inline(always)]
fn service_flow(client: End, frontend: End, protocol: u8) -> Option<CtEntry> {
    let key = ct::service_key(
        client.address_be,
        client.port_be,
        frontend.address_be,
        frontend.port_be,
        protocol,
    );
    let table = if protocol == IPPROTO_TCP {
        &CONNTRACK_TCP
    } else {
        &CONNTRACK_UDP
    };
    // SAFETY: the value is copied out before any other map call.
    unsafe { table.get(key) }.copied()
}

/// Counts a translation: its verdict, or a drop when a rewrite failed
/// halfway.
#[inline(always)]
fn verdict(translated: Result<u32, ()>) -> u32 {
    match translated {
        Ok(verdict) => {
            count(Counter::IcmpErrorTranslated);
            verdict
        }
        Err(()) => {
            count(Counter::Error);
            XDP_DROP
        }
    }
}

/// The outer address at `ip_off` (source or destination) goes from
/// `old_be` to `new_be`, the outer IP checksum kept valid (the ICMP
/// checksum does not cover it).
#[inline(always)]
fn rewrite_outer(ctx: &XdpContext, ip_off: usize, old_be: u32, new_be: u32) -> Result<(), ()> {
    let ip_csum: *mut u16 = ptr_at(ctx, ETH_LEN + IP_CSUM_OFF).ok_or(())?;
    let ip_addr: *mut u32 = ptr_at(ctx, ETH_LEN + ip_off).ok_or(())?;
    // SAFETY: bounds-checked by ptr_at; XDP programs may write the frame.
    unsafe {
        *ip_csum = csum::replace_u32(*ip_csum, old_be, new_be);
        *ip_addr = new_be;
    }
    Ok(())
}

/// The quoted packet's source goes from `old` to `new` (`rewrite_quoted`).
#[inline(always)]
fn quoted_source(ctx: &XdpContext, quote: Quote, old: End, new: End) -> Result<(), ()> {
    rewrite_quoted(ctx, quote, IP_SRC_OFF, 0, old, new)
}

/// The quoted packet's destination goes from `old` to `new`.
#[inline(always)]
fn quoted_destination(ctx: &XdpContext, quote: Quote, old: End, new: End) -> Result<(), ()> {
    rewrite_quoted(ctx, quote, IP_DST_OFF, 2, old, new)
}

/// One end of the quoted packet (the address at `ip_off` of its IP
/// header, the port at `port_off` of its L4 header) goes from `old` to
/// `new`: the quoted IP checksum, the quoted L4 checksum when the quote
/// holds it (a UDP one of zero stays zero), and the ICMP checksum over
/// every changed word.
#[inline(always)]
fn rewrite_quoted(
    ctx: &XdpContext,
    Quote { end, protocol }: Quote,
    ip_off: usize,
    port_off: usize,
    old: End,
    new: End,
) -> Result<(), ()> {
    let icmp_csum: *mut u16 = ptr_at(ctx, ICMP_CSUM_OFF).ok_or(())?;
    let ip_csum: *mut u16 = ptr_at(ctx, QUOTED_IP_OFF + IP_CSUM_OFF).ok_or(())?;
    let ip_addr: *mut u32 = ptr_at(ctx, QUOTED_IP_OFF + ip_off).ok_or(())?;
    let l4_port: *mut u16 = ptr_at(ctx, QUOTED_L4_OFF + port_off).ok_or(())?;
    let (csum_off, udp) = if protocol == IPPROTO_TCP {
        (TCP_CSUM_OFF, false)
    } else {
        (UDP_CSUM_OFF, true)
    };
    // Routers quote at least 8 bytes of the L4 header (RFC 792), which
    // holds a UDP checksum but not a TCP one; Linux quotes up to 576.
    let l4_csum: Option<*mut u16> = if QUOTED_L4_OFF + csum_off + 2 <= end {
        ptr_at(ctx, QUOTED_L4_OFF + csum_off)
    } else {
        None
    };
    // SAFETY: every pointer is bounds-checked by ptr_at.
    unsafe {
        let mut icmp = *icmp_csum;
        let old_ip_csum = *ip_csum;
        let new_ip_csum = csum::replace_u32(old_ip_csum, old.address_be, new.address_be);
        *ip_csum = new_ip_csum;
        *ip_addr = new.address_be;
        *l4_port = new.port_be;
        icmp = csum::replace_u32(icmp, old.address_be, new.address_be);
        icmp = csum::replace_u16(icmp, old.port_be, new.port_be);
        icmp = csum::replace_u16(icmp, old_ip_csum, new_ip_csum);
        if let Some(l4_csum) = l4_csum {
            let old_l4 = *l4_csum;
            if !(udp && old_l4 == 0) {
                let check = csum::replace_u16(
                    csum::replace_u32(old_l4, old.address_be, new.address_be),
                    old.port_be,
                    new.port_be,
                );
                let new_l4 = if udp && check == 0 { 0xffff } else { check };
                *l4_csum = new_l4;
                icmp = csum::replace_u16(icmp, old_l4, new_l4);
            }
        }
        *icmp_csum = icmp;
    }
    Ok(())
}
