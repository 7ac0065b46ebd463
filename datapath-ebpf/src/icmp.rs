//! ICMP errors about translated flows. A router's "fragmentation needed"
//! or "time exceeded", or a host's "port unreachable", quotes the packet
//! that caused it as it was on the wire: translated. The client's socket
//! only knows the ClusterIP, so on ingress the quoted packet's backend
//! becomes the service again (and the outer source too when the backend
//! itself answered); on egress, an error the client sends about a reply
//! it got from the ClusterIP goes to the backend that really sent it.
//! Without this, path-MTU discovery through a ClusterIP black-holes large
//! segments and "port unreachable" is never seen.
//!
//! Every checksum stays valid: the quoted IP header's, the quoted L4
//! checksum when it was quoted, the ICMP checksum over all of it, and the
//! outer IP header's. The packet's total sum does not change, so a
//! CHECKSUM_COMPLETE skb stays consistent.
//!
//! Only non-TCP/UDP packets come here, so this costs TCP and UDP nothing;
//! the fields are read with `bpf_skb_load_bytes` (simple for the verifier
//! at two variable header lengths; errors are rare).

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT, TC_ACT_UNSPEC},
    programs::TcContext,
};
use datapath_common::{
    HAIRPIN_SOURCE_BE, IPPROTO_TCP, IPPROTO_UDP,
    csum::{replace_u16, replace_u32},
    maps::{Backend, CtEntry},
    metrics::Counter,
};

use crate::{
    ct, l2,
    maps::{BACKENDS, CONNTRACK_TCP, CONNTRACK_UDP},
    metrics::count,
    parse::{ETH_LEN, IP_CSUM_OFF, IP_DST_OFF, IP_SRC_OFF, TCP_CSUM_OFF, UDP_CSUM_OFF, ptr_at},
};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::Ipv4Hdr,
};

const IPPROTO_ICMP: u8 = 1;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_CSUM_OFF: usize = 2;
/// The ICMP header before the quoted packet.
const ICMP_HEADER_LEN: usize = 8;

/// An ICMP error quoting a TCP or UDP packet.
struct QuotedError {
    icmp_off: usize,
    quoted_ip_off: usize,
    quoted_l4_off: usize,
    outer_src_be: u32,
    outer_dst_be: u32,
    /// The quoted packet's addresses, ports and protocol.
    src_be: u32,
    dst_be: u32,
    sport_be: u16,
    dport_be: u16,
    protocol: u8,
}

#[inline(always)]
fn parse(ctx: &TcContext) -> Option<QuotedError> {
    // Direct reads first: ARP, IPv6 and other protocols leave after two
    // bounds-checked loads, no helper call.
    let eth: *const EthHdr = ptr_at(ctx, 0)?;
    let ip: *const Ipv4Hdr = ptr_at(ctx, ETH_LEN)?;
    // SAFETY: both bounds-checked by ptr_at.
    if unsafe { (*eth).ether_type } != EtherType::Ipv4 as u16
        || unsafe { (*ip).proto } != IPPROTO_ICMP
    {
        return None;
    }
    let vihl: u8 = ctx.load(ETH_LEN).ok()?;
    let ihl = usize::from(vihl & 0x0f) * 4;
    if vihl >> 4 != 4 || ihl < 20 {
        return None;
    }
    if u16::from_be_bytes(ctx.load::<[u8; 2]>(ETH_LEN + 6).ok()?) & 0x1fff != 0 {
        return None; // a later fragment of an ICMP message
    }
    let icmp_off = ETH_LEN + ihl;
    let icmp_type: u8 = ctx.load(icmp_off).ok()?;
    if icmp_type != ICMP_DEST_UNREACH && icmp_type != ICMP_TIME_EXCEEDED {
        return None;
    }
    let quoted_ip_off = icmp_off + ICMP_HEADER_LEN;
    let quoted_vihl: u8 = ctx.load(quoted_ip_off).ok()?;
    let quoted_ihl = usize::from(quoted_vihl & 0x0f) * 4;
    let protocol: u8 = ctx.load(quoted_ip_off + 9).ok()?;
    if quoted_vihl >> 4 != 4
        || quoted_ihl < 20
        || (protocol != IPPROTO_TCP && protocol != IPPROTO_UDP)
    {
        return None;
    }
    let quoted_l4_off = quoted_ip_off + quoted_ihl;
    let [sport_be, dport_be]: [u16; 2] = ctx.load(quoted_l4_off).ok()?;
    Some(QuotedError {
        icmp_off,
        quoted_ip_off,
        quoted_l4_off,
        outer_src_be: ctx.load(ETH_LEN + IP_SRC_OFF).ok()?,
        outer_dst_be: ctx.load(ETH_LEN + IP_DST_OFF).ok()?,
        src_be: ctx.load(quoted_ip_off + IP_SRC_OFF).ok()?,
        dst_be: ctx.load(quoted_ip_off + IP_DST_OFF).ok()?,
        sport_be,
        dport_be,
        protocol,
    })
}

/// Which end of the quoted packet (and of the outer header) changes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum End {
    /// Ingress: the quoted packet went client → backend; its destination
    /// becomes the service, and so does the outer source if it was the
    /// backend.
    QuotedDestination,
    /// Egress: the quoted packet came service → client; its source becomes
    /// the backend, and so does the outer destination if it was the
    /// service.
    QuotedSource,
}

/// Rewrites one end of the quoted packet to `address_be:port_be` and the
/// matching end of the outer header, every checksum kept valid.
#[inline(always)]
fn rewrite(
    ctx: &TcContext,
    e: &QuotedError,
    end: End,
    address_be: u32,
    port_be: u16,
) -> Option<()> {
    let (old_address, old_port, ip_field, port_field) = match end {
        End::QuotedDestination => (e.dst_be, e.dport_be, IP_DST_OFF, 2),
        End::QuotedSource => (e.src_be, e.sport_be, IP_SRC_OFF, 0),
    };
    let icmp_csum_at = e.icmp_off + ICMP_CSUM_OFF;
    let mut icmp_csum: u16 = ctx.load(icmp_csum_at).ok()?;

    // The quoted IP header: address and header checksum.
    let quoted_csum_at = e.quoted_ip_off + IP_CSUM_OFF;
    let old_quoted_csum: u16 = ctx.load(quoted_csum_at).ok()?;
    let new_quoted_csum = replace_u32(old_quoted_csum, old_address, address_be);
    ctx.store(e.quoted_ip_off + ip_field, &address_be, 0).ok()?;
    ctx.store(quoted_csum_at, &new_quoted_csum, 0).ok()?;
    icmp_csum = replace_u32(icmp_csum, old_address, address_be);
    icmp_csum = replace_u16(icmp_csum, old_quoted_csum, new_quoted_csum);

    // The quoted port, and the quoted L4 checksum when the error quoted it
    // (UDP: at byte 6, always; TCP: byte 16, when more than 8 bytes were).
    ctx.store(e.quoted_l4_off + port_field, &port_be, 0).ok()?;
    icmp_csum = replace_u16(icmp_csum, old_port, port_be);
    let l4_csum_at = e.quoted_l4_off
        + if e.protocol == IPPROTO_TCP {
            TCP_CSUM_OFF
        } else {
            UDP_CSUM_OFF
        };
    if l4_csum_at + 2 <= ctx.len() as usize
        && let Ok(old_l4) = ctx.load::<u16>(l4_csum_at)
        && (old_l4 != 0 || e.protocol == IPPROTO_TCP)
    {
        let mut new_l4 = replace_u16(
            replace_u32(old_l4, old_address, address_be),
            old_port,
            port_be,
        );
        if new_l4 == 0 && e.protocol == IPPROTO_UDP {
            new_l4 = 0xffff; // zero means "no checksum" in UDP
        }
        ctx.store(l4_csum_at, &new_l4, 0).ok()?;
        icmp_csum = replace_u16(icmp_csum, old_l4, new_l4);
    }
    ctx.store(icmp_csum_at, &icmp_csum, 0).ok()?;

    // The outer header, when the error came from (or goes to) the very
    // address the translation hides.
    let (outer_field, outer_old) = match end {
        End::QuotedDestination => (IP_SRC_OFF, e.outer_src_be),
        End::QuotedSource => (IP_DST_OFF, e.outer_dst_be),
    };
    if outer_old == old_address {
        let outer_csum_at = ETH_LEN + IP_CSUM_OFF;
        let outer_csum: u16 = ctx.load(outer_csum_at).ok()?;
        ctx.store(ETH_LEN + outer_field, &address_be, 0).ok()?;
        ctx.store(
            outer_csum_at,
            &replace_u32(outer_csum, old_address, address_be),
            0,
        )
        .ok()?;
    }
    Some(())
}

/// The conntrack entry under `key` in the quoted protocol's table, copied.
#[inline(always)]
fn lookup(protocol: u8, key: &datapath_common::maps::CtKey) -> Option<CtEntry> {
    // SAFETY: copied out at once.
    unsafe {
        if protocol == IPPROTO_TCP {
            CONNTRACK_TCP.get(key).copied()
        } else {
            CONNTRACK_UDP.get(key).copied()
        }
    }
}

/// TC ingress, for packets that are not TCP or UDP: an ICMP error about a
/// translated flow is turned back to the ClusterIP the client knows.
#[inline(always)]
pub fn on_ingress(ctx: &TcContext) -> i32 {
    let Some(e) = parse(ctx) else {
        return TC_ACT_UNSPEC;
    };
    // The quoted packet went client → backend: its backend-tuple entry.
    let key = ct::backend_key(e.src_be, e.sport_be, e.dst_be, e.dport_be, e.protocol);
    let Some(flow) = lookup(e.protocol, &key) else {
        return TC_ACT_UNSPEC;
    };
    if ct::is_expired(&flow, e.protocol, ct::now()) {
        return TC_ACT_UNSPEC;
    }
    let (service_address_be, service_port_be) = (flow.service_address_be, flow.service_port_be);
    // A moved source port: the client's own again (same address).
    if rewrite(
        ctx,
        &e,
        End::QuotedDestination,
        service_address_be,
        service_port_be,
    )
    .is_none()
        || (flow.nat_port_be != 0
            && rewrite(ctx, &e, End::QuotedSource, e.src_be, flow.nat_port_be).is_none())
    {
        count(Counter::Error);
        return TC_ACT_SHOT;
    }
    count(Counter::IcmpErrorTranslated);
    TC_ACT_OK
}

/// TC egress, for packets that are not TCP or UDP: an ICMP error the
/// client sends about a reply it got from a ClusterIP goes to the backend.
#[inline(always)]
pub fn on_egress(ctx: &TcContext) -> i32 {
    let Some(e) = parse(ctx) else {
        return TC_ACT_UNSPEC;
    };
    if e.outer_dst_be == HAIRPIN_SOURCE_BE {
        // About a packet of a hairpin flow the pod received looped back
        // (`crate::hairpin`): it has nowhere to go (169.254.42.1 is not
        // on the wire), and is not translated back through the loop.
        return TC_ACT_SHOT;
    }
    // The quoted packet came service → client: the flow's service tuple.
    let key = ct::service_key(e.dst_be, e.dport_be, e.src_be, e.sport_be, e.protocol);
    let Some(flow) = lookup(e.protocol, &key) else {
        return TC_ACT_UNSPEC;
    };
    let now = ct::now();
    if ct::is_expired(&flow, e.protocol, now) {
        return TC_ACT_UNSPEC;
    }
    let Some(backend) = BACKENDS
        .get(flow.backend_id)
        .copied()
        .filter(Backend::is_present_v4)
    else {
        return TC_ACT_UNSPEC;
    };
    if backend.address_be == e.dst_be {
        // The pod is its own backend (hairpin): the error is about a reply
        // it received looped back from 169.254.42.1; translated as for any
        // other backend it would be sent to the pod's own address on the
        // wire. Not translated back through the loop: dropped, the flow
        // times out instead.
        return TC_ACT_SHOT;
    }
    // A moved source port: the client's port on the wire (same address).
    if rewrite(
        ctx,
        &e,
        End::QuotedSource,
        backend.address_be,
        backend.port_be,
    )
    .is_none()
        || (flow.nat_port_be != 0
            && rewrite(ctx, &e, End::QuotedDestination, e.dst_be, flow.nat_port_be).is_none())
    {
        count(Counter::Error);
        return TC_ACT_SHOT;
    }
    count(Counter::IcmpErrorTranslated);
    if e.outer_dst_be == e.src_be {
        // Now addressed to the backend: the flow's next hop, not the
        // ClusterIP's.
        return l2::forward(ctx, &flow, now);
    }
    TC_ACT_OK
}
