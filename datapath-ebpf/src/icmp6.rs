//! ICMPv6 errors about translated IPv6 flows (`crate::icmp`'s twin). A
//! router's "packet too big" or "time exceeded", or a host's "port
//! unreachable", quotes the packet that caused it as it was on the wire:
//! translated. Over IPv6 this matters more than over IPv4: routers never
//! fragment, so path-MTU discovery through a ClusterIP works only if the
//! client's socket sees "packet too big" about the ClusterIP it knows.
//! On ingress the quoted packet's backend becomes the service again (and
//! the outer source too when the backend itself answered); on egress, an
//! error the client sends about a reply it got from the ClusterIP goes to
//! the backend that really sent it.
//!
//! Every checksum stays valid: the quoted L4 checksum when it was quoted
//! (its pseudo header holds the quoted addresses), and the ICMPv6
//! checksum, whose own pseudo header holds the outer addresses. The
//! packet's total sum does not change, so a `CHECKSUM_COMPLETE` skb stays
//! consistent.
//!
//! The work runs in programs of their own (`up_tc_icmp6_ingress`,
//! `up_tc_icmp6_egress`), entered by a tail call only for ICMPv6 errors
//! (`jump_if_error`: two bytes read in place), so neither the per-packet
//! IPv6 path nor NDP pays for it. Errors whose own ICMPv6 header follows
//! the fixed header are translated (what routers and hosts send); the
//! quoted packet's extension headers are walked as a packet's are
//! (`datapath_common::ipv6::upper_layer`): a "packet too big" about a
//! fragmented UDP datagram quotes its first fragment, whose ports name
//! the flow. A quoted later fragment has no ports: left as it is.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT, TC_ACT_UNSPEC},
    programs::TcContext,
};
use datapath_common::{
    HAIRPIN_SOURCE6_BE, IPPROTO_TCP, IPPROTO_UDP,
    csum::{replace_u16, replace_u128},
    ipv6::{self, IPV6_HEADER_LEN, NEXTHDR_ICMPV6},
    maps::{CtEntry6, CtKey6, Ipv6Words},
    metrics::Counter,
};
use network_types::ip::Ipv6Hdr;

use crate::{
    backends, ct, ct6, l2,
    maps::{CONNTRACK6_TCP, CONNTRACK6_UDP, TC_JUMPS},
    metrics::count,
    parse::{ETH_LEN, TCP_CSUM_OFF, UDP_CSUM_OFF, ptr_at},
};

/// ICMPv6 error types (RFC 4443 §2.1: 0–127 are errors; these four quote
/// the packet that caused them).
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PARAM_PROBLEM: u8 = 4;
/// Where the ICMPv6 header starts (right after the fixed header).
const ICMP_OFF: usize = ETH_LEN + IPV6_HEADER_LEN;
const ICMP_CSUM_OFF: usize = ICMP_OFF + 2;
/// The ICMPv6 error header before the quoted packet.
const ICMP_HEADER_LEN: usize = 8;
/// The quoted packet's fixed header.
const QUOTED_IP_OFF: usize = ICMP_OFF + ICMP_HEADER_LEN;
/// Offsets of the addresses and of the next-header field in an IPv6
/// header.
const IP6_NEXT_HEADER_OFF: usize = 6;
const IP6_SRC_OFF: usize = 8;
const IP6_DST_OFF: usize = 24;

/// Continues an ICMPv6 error in its own program (`slot`: one of
/// `jumps::ICMP6_*`); anything else, NDP included, returns at once with
/// `TC_ACT_UNSPEC`, as does an error when the slot is empty.
#[inline(always)]
pub fn jump_if_error(ctx: &TcContext, slot: u32) -> i32 {
    let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, ETH_LEN) else {
        return TC_ACT_UNSPEC;
    };
    // SAFETY: bounds-checked by ptr_at.
    if unsafe { (*ip).next_hdr } != NEXTHDR_ICMPV6 {
        return TC_ACT_UNSPEC;
    }
    let Some(icmp_type) = ptr_at::<u8>(ctx, ICMP_OFF) else {
        return TC_ACT_UNSPEC;
    };
    // SAFETY: bounds-checked by ptr_at.
    let icmp_type = unsafe { *icmp_type };
    if !(ICMPV6_DEST_UNREACH..=ICMPV6_PARAM_PROBLEM).contains(&icmp_type) {
        return TC_ACT_UNSPEC;
    }
    // SAFETY: a tail call on the program's own context; on success it
    // does not return.
    unsafe { TC_JUMPS.tail_call(ctx, slot) };
    TC_ACT_UNSPEC
}

/// An ICMPv6 error quoting a TCP or UDP packet.
struct QuotedError {
    /// Where the quoted TCP/UDP header starts in the frame.
    quoted_l4_off: usize,
    outer_src_be: Ipv6Words,
    outer_dst_be: Ipv6Words,
    /// The quoted packet's addresses, ports and protocol.
    src_be: Ipv6Words,
    dst_be: Ipv6Words,
    sport_be: u16,
    dport_be: u16,
    protocol: u8,
}

#[inline(always)]
fn parse(ctx: &TcContext) -> Option<QuotedError> {
    let next_header: u8 = ctx.load(ETH_LEN + IP6_NEXT_HEADER_OFF).ok()?;
    let icmp_type: u8 = ctx.load(ICMP_OFF).ok()?;
    if next_header != NEXTHDR_ICMPV6
        || !(ICMPV6_DEST_UNREACH..=ICMPV6_PARAM_PROBLEM).contains(&icmp_type)
    {
        return None;
    }
    let quoted_version: u8 = ctx.load(QUOTED_IP_OFF).ok()?;
    let next_header: u8 = ctx.load(QUOTED_IP_OFF + IP6_NEXT_HEADER_OFF).ok()?;
    if quoted_version >> 4 != 6 {
        return None;
    }
    let (protocol, quoted_l4_off) = if next_header == IPPROTO_TCP || next_header == IPPROTO_UDP {
        (next_header, QUOTED_IP_OFF + IPV6_HEADER_LEN)
    } else {
        let ipv6::Upper::Found {
            protocol,
            offset,
            fragment,
        } = ipv6::upper_layer(next_header, |at| {
            ctx.load::<[u8; 8]>(QUOTED_IP_OFF + at).ok()
        })
        else {
            return None;
        };
        if fragment.is_some_and(|f| f.is_later()) {
            return None;
        }
        (protocol, QUOTED_IP_OFF + offset)
    };
    if protocol != IPPROTO_TCP && protocol != IPPROTO_UDP {
        return None;
    }
    let [sport_be, dport_be]: [u16; 2] = ctx.load(quoted_l4_off).ok()?;
    Some(QuotedError {
        quoted_l4_off,
        outer_src_be: ctx.load(ETH_LEN + IP6_SRC_OFF).ok()?,
        outer_dst_be: ctx.load(ETH_LEN + IP6_DST_OFF).ok()?,
        src_be: ctx.load(QUOTED_IP_OFF + IP6_SRC_OFF).ok()?,
        dst_be: ctx.load(QUOTED_IP_OFF + IP6_DST_OFF).ok()?,
        sport_be,
        dport_be,
        protocol,
    })
}

/// Which end of the quoted packet (and of the outer header) changes
/// (`crate::icmp`'s rule).
#[derive(Clone, Copy, PartialEq, Eq)]
enum End {
    /// Ingress: the quoted packet went client → backend; its destination
    /// becomes the service, and so does the outer source if it was the
    /// backend.
    QuotedDestination,
    /// Egress: the quoted packet came service → client; its source
    /// becomes the backend, and so does the outer destination if it was
    /// the service.
    QuotedSource,
}

/// Rewrites one end of the quoted packet to `address_be:port_be` and the
/// matching end of the outer header, every checksum kept valid.
#[inline(always)]
fn rewrite(
    ctx: &TcContext,
    e: &QuotedError,
    end: End,
    address_be: Ipv6Words,
    port_be: u16,
) -> Option<()> {
    let (old_address, old_port, ip_field, port_field) = match end {
        End::QuotedDestination => (e.dst_be, e.dport_be, IP6_DST_OFF, 2),
        End::QuotedSource => (e.src_be, e.sport_be, IP6_SRC_OFF, 0),
    };
    let mut icmp_csum: u16 = ctx.load(ICMP_CSUM_OFF).ok()?;

    // The quoted address and port: bytes the ICMPv6 checksum covers.
    ctx.store(QUOTED_IP_OFF + ip_field, &address_be, 0).ok()?;
    ctx.store(e.quoted_l4_off + port_field, &port_be, 0).ok()?;
    icmp_csum = replace_u16(
        replace_u128(icmp_csum, old_address, address_be),
        old_port,
        port_be,
    );

    // The quoted L4 checksum when the error quoted it (UDP's at byte 6,
    // TCP's at 16): its pseudo header held the old address.
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
            replace_u128(old_l4, old_address, address_be),
            old_port,
            port_be,
        );
        if new_l4 == 0 && e.protocol == IPPROTO_UDP {
            new_l4 = 0xffff; // zero means "no checksum" in UDP
        }
        ctx.store(l4_csum_at, &new_l4, 0).ok()?;
        icmp_csum = replace_u16(icmp_csum, old_l4, new_l4);
    }

    // The outer header, when the error came from (or goes to) the very
    // address the translation hides: in the ICMPv6 pseudo header too.
    let (outer_field, outer_old) = match end {
        End::QuotedDestination => (IP6_SRC_OFF, e.outer_src_be),
        End::QuotedSource => (IP6_DST_OFF, e.outer_dst_be),
    };
    if outer_old == old_address {
        ctx.store(ETH_LEN + outer_field, &address_be, 0).ok()?;
        icmp_csum = replace_u128(icmp_csum, old_address, address_be);
    }
    ctx.store(ICMP_CSUM_OFF, &icmp_csum, 0).ok()?;
    Some(())
}

/// The conntrack entry under `key` in the quoted protocol's table, copied.
#[inline(always)]
fn lookup(protocol: u8, key: &CtKey6) -> Option<CtEntry6> {
    // SAFETY: copied out at once.
    unsafe {
        if protocol == IPPROTO_TCP {
            CONNTRACK6_TCP.get(key).copied()
        } else {
            CONNTRACK6_UDP.get(key).copied()
        }
    }
}

/// `up_tc_icmp6_ingress`: an ICMPv6 error about a translated flow is
/// turned back to the ClusterIP the client knows.
#[inline(always)]
pub fn on_ingress(ctx: &TcContext) -> i32 {
    let Some(e) = parse(ctx) else {
        return TC_ACT_UNSPEC;
    };
    // The quoted packet went client → backend: its backend-tuple entry.
    let key = ct6::backend_key(e.src_be, e.sport_be, e.dst_be, e.dport_be, e.protocol);
    let Some(flow) = lookup(e.protocol, &key) else {
        return TC_ACT_UNSPEC;
    };
    if ct::is_expired(&flow, e.protocol, ct::now()) {
        return TC_ACT_UNSPEC;
    }
    // A moved client port (`crate::clash6`): the client's own again
    // (same address).
    if rewrite(
        ctx,
        &e,
        End::QuotedDestination,
        flow.service_address_be,
        flow.service_port_be,
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

/// `up_tc_icmp6_egress`: an ICMPv6 error the client sends about a reply
/// it got from a ClusterIP goes to the backend that sent the reply.
#[inline(always)]
pub fn on_egress(ctx: &TcContext) -> i32 {
    let Some(e) = parse(ctx) else {
        return TC_ACT_UNSPEC;
    };
    if e.outer_dst_be == HAIRPIN_SOURCE6_BE {
        // About a packet of a hairpin flow the pod received looped back
        // (`crate::hairpin6`): it has nowhere to go (the hairpin source is
        // on no wire), and is not translated back through the loop.
        return TC_ACT_SHOT;
    }
    // The quoted packet came service → client: the flow's service tuple.
    let key = ct6::service_key(e.dst_be, e.dport_be, e.src_be, e.sport_be, e.protocol);
    let Some(flow) = lookup(e.protocol, &key) else {
        return TC_ACT_UNSPEC;
    };
    let now = ct::now();
    if ct::is_expired(&flow, e.protocol, now) {
        return TC_ACT_UNSPEC;
    }
    let Some((backend_address_be, backend_port_be)) = backends::ipv6(flow.backend_id) else {
        return TC_ACT_UNSPEC;
    };
    if backend_address_be == e.dst_be {
        // The pod is its own backend (hairpin): the error is about a
        // reply it received looped back; not translated back through the
        // loop (dropped, the flow times out instead).
        return TC_ACT_SHOT;
    }
    // A moved client port: the one on the wire (same address).
    if rewrite(
        ctx,
        &e,
        End::QuotedSource,
        backend_address_be,
        backend_port_be,
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
