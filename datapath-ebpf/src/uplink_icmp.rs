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
//! reply become what the backend sent; the router stays the source.
//! Every checksum stays valid: the outer IP header's, the quoted IP
//! header's, the quoted L4 checksum when it was quoted, and the ICMP
//! checksum over all of the quote.
//!
//! Only outer and quoted IPv4 headers without options are translated
//! (routers' errors and our flows' packets carry none): the offsets are
//! then constants the verifier needs no help with. Anything else passes
//! to the stack as before. Only ICMP frames come here.

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
    maps::{BACKENDS, CONNTRACK_TCP, CONNTRACK_UDP, LOCAL_PODS, NORTH_SOUTH},
    metrics::count,
    parse::{ETH_LEN, IP_CSUM_OFF, IP_DST_OFF, IP_SRC_OFF, TCP_CSUM_OFF, UDP_CSUM_OFF},
    uplink_frame::{ptr_at, set_destination_mac, set_macs},
};

const IPPROTO_ICMP: u8 = 1;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
/// Version 4, a 20-byte header: no options.
const IPV4_NO_OPTIONS: u8 = 0x45;
/// Fragment offset and more-fragments bits (host order).
const IP_FRAGMENT_BITS: u16 = 0x3fff;
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
    let (vihl, protocol, frags, outer_dst_be) = unsafe {
        (
            (*outer).vihl,
            (*outer).proto,
            (*outer).frags,
            u32::from_ne_bytes((*outer).dst_addr),
        )
    };
    if protocol != IPPROTO_ICMP
        || vihl != IPV4_NO_OPTIONS
        || u16::from_be_bytes(frags) & IP_FRAGMENT_BITS != 0
    {
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
    let (quoted_vihl, quoted_protocol, frontend, client) = unsafe {
        (
            (*quoted).vihl,
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
    if quoted_vihl != IPV4_NO_OPTIONS
        || (quoted_protocol != IPPROTO_TCP && quoted_protocol != IPPROTO_UDP)
        || outer_dst_be != frontend.address_be
    {
        return None;
    }
    // The reply it quotes went from the frontend to the client: the
    // flow's service-tuple entry names its backend.
    let key = ct::service_key(
        client.address_be,
        client.port_be,
        frontend.address_be,
        frontend.port_be,
        quoted_protocol,
    );
    let table = if quoted_protocol == IPPROTO_TCP {
        &CONNTRACK_TCP
    } else {
        &CONNTRACK_UDP
    };
    // SAFETY: the value is copied out before any other map call.
    let flow: CtEntry = *unsafe { table.get(key) }?;
    if flow.l2_mode != L2_UPLINK_LOCAL && flow.l2_mode != L2_UPLINK_SNAT {
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
        rewrite_outer_destination(ctx, frontend.address_be, backend.address_be)
            .and_then(|()| {
                rewrite_quoted(ctx, quoted_protocol, IP_SRC_OFF, 0, frontend, to_backend)
            })
            .and_then(|()| set_destination_mac(ctx, mac))
            .map(|()| XDP_PASS)
    } else {
        // The backend elsewhere sent it to this node's SNAT address and
        // the flow's port.
        let snat_address_be = NORTH_SOUTH.get(0)?.snat_address_be;
        let to_node = End {
            address_be: snat_address_be,
            port_be: flow.nat_port_be,
        };
        rewrite_outer_destination(ctx, frontend.address_be, backend.address_be)
            .and_then(|()| {
                rewrite_quoted(ctx, quoted_protocol, IP_SRC_OFF, 0, frontend, to_backend)
            })
            .and_then(|()| rewrite_quoted(ctx, quoted_protocol, IP_DST_OFF, 2, client, to_node))
            .and_then(|()| set_macs(ctx, flow.dst_mac, flow.src_mac))
            .map(|()| XDP_TX)
    };
    Some(match translated {
        Ok(verdict) => {
            count(Counter::NorthSouthTranslated);
            verdict
        }
        Err(()) => {
            count(Counter::Error);
            XDP_DROP
        }
    })
}

/// The outer destination `old_be` becomes `new_be`, the outer IP
/// checksum kept valid (the ICMP checksum does not cover it).
#[inline(always)]
fn rewrite_outer_destination(ctx: &XdpContext, old_be: u32, new_be: u32) -> Result<(), ()> {
    let ip_csum: *mut u16 = ptr_at(ctx, ETH_LEN + IP_CSUM_OFF).ok_or(())?;
    let ip_dst: *mut u32 = ptr_at(ctx, ETH_LEN + IP_DST_OFF).ok_or(())?;
    // SAFETY: bounds-checked by ptr_at; XDP programs may write the frame.
    unsafe {
        *ip_csum = csum::replace_u32(*ip_csum, old_be, new_be);
        *ip_dst = new_be;
    }
    Ok(())
}

/// One end of the quoted packet (the address at `ip_off` of its IP
/// header, the port at `port_off` of its L4 header) goes from `old` to
/// `new`: the quoted IP checksum, the quoted L4 checksum when the quote
/// holds it (a UDP one of zero stays zero), and the ICMP checksum over
/// every changed word.
#[inline(always)]
fn rewrite_quoted(
    ctx: &XdpContext,
    protocol: u8,
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
    let l4_csum: Option<*mut u16> = ptr_at(ctx, QUOTED_L4_OFF + csum_off);
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
