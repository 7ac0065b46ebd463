//! TC ingress for IPv6, a program of its own entered by a tail call from
//! the ingress program (`jump`): replies from a backend get their source
//! rewritten back to the IPv6 service address from the flow's
//! backend-tuple entry, as `crate::ingress` does for IPv4. Packets from a
//! peer no tracked flow was opened to pass after one array read
//! (`crate::reply_filter`).

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT, TC_ACT_UNSPEC},
    programs::TcContext,
};
use datapath_common::{
    IPPROTO_TCP,
    conntrack::{self, Direction},
    metrics::Counter,
};

use crate::{
    ct, ct6, frag6, icmp6, l2,
    maps::{CONNTRACK6_TCP, CONNTRACK6_UDP, CtMap6, TC_JUMPS},
    metrics::count,
    nat::End,
    nat6,
    parse6::{self, Packet6},
    reply_filter,
};

/// Continues an IPv6 packet in `up_tc_ingress6` (`crate::egress6::jump`'s
/// twin). Without the jump the packet passes.
#[inline(always)]
pub fn jump(ctx: &TcContext) -> i32 {
    // SAFETY: a tail call on the program's own context; on success it
    // does not return.
    unsafe { TC_JUMPS.tail_call(ctx, datapath_common::jumps::INGRESS6) };
    TC_ACT_UNSPEC
}

/// `up_tc_ingress6`.
#[inline(always)]
pub fn run(ctx: &TcContext) -> i32 {
    let Some(packet) = parse6::ipv6_l4(ctx) else {
        // Not TCP or UDP: an ICMPv6 error may be about a translated flow.
        return icmp6::jump_if_error(ctx, datapath_common::jumps::ICMP6_INGRESS);
    };
    if !packet.plain {
        // Extension headers or a fragment: rare, in a program of its own
        // (`extended_run`). Without the jump the packet passes.
        // SAFETY: a tail call on the program's own context; on success
        // it does not return.
        unsafe { TC_JUMPS.tail_call(ctx, datapath_common::jumps::INGRESS6_EXT) };
        return TC_ACT_UNSPEC;
    }
    by_protocol(ctx, &packet)
}

/// `up_tc_ingress6_ext`: a reply whose TCP/UDP header is past extension
/// headers, or a fragment of one (only `run` jumps here): a later
/// fragment takes its ports from its first fragment (`crate::frag6`),
/// then the packet is reverse-translated as `run` does a plain one.
#[inline(always)]
pub fn extended_run(ctx: &TcContext) -> i32 {
    let Some(mut packet) = parse6::ipv6_l4(ctx) else {
        return TC_ACT_UNSPEC;
    };
    if packet.later_fragment && !frag6::resolve(&mut packet) {
        count(Counter::Fragment);
        return TC_ACT_UNSPEC;
    }
    by_protocol(ctx, &packet)
}

/// `reply` with its protocol's conntrack, for a packet from a peer some
/// tracked flow was opened to (`crate::reply_filter`; the rest pass after
/// one array read). One call site per table: the verifier then inlines
/// each lookup.
#[inline(always)]
fn by_protocol(ctx: &TcContext, packet: &Packet6) -> i32 {
    if !reply_filter::may_be_reply6(packet) {
        return TC_ACT_UNSPEC;
    }
    if packet.protocol == IPPROTO_TCP {
        reply(ctx, packet, &CONNTRACK6_TCP)
    } else {
        reply(ctx, packet, &CONNTRACK6_UDP)
    }
}

#[inline(always)]
fn reply(ctx: &TcContext, packet: &Packet6, table: &CtMap6) -> i32 {
    let Some(flow) = table.get_ptr_mut(ct6::reply_key(packet)) else {
        return TC_ACT_UNSPEC;
    };
    // SAFETY: a pointer into the map value, valid for this program run.
    let flow = unsafe { &mut *flow };
    let now = ct::now();
    if ct::is_expired(flow, packet.protocol, now) {
        return TC_ACT_UNSPEC;
    }
    let state = conntrack::next_state(
        flow.state,
        packet.protocol,
        packet.tcp_flags,
        Direction::Reply,
    );
    // As `crate::ingress`: the service-tuple entry learns its next hop
    // once a refresh interval.
    let teach_l2 = ct::refresh_due(flow.l2_seen, now);
    // The client's own port, if it was moved on a tuple clash
    // (`crate::clash6`).
    let client_port_be = ct6::moved_port(flow, packet.dport_be);
    if ct::needs_write(flow, state, now) || teach_l2 {
        ct::record(flow, state, now);
        flow.l2_seen = now;
        let service = ct6::service_key(
            packet.daddr_be,
            client_port_be,
            flow.service_address_be,
            flow.service_port_be,
            packet.protocol,
        );
        if let Some(forward) = table.get_ptr_mut(service) {
            // SAFETY: a pointer into the map value, valid for this program run.
            let forward = unsafe { &mut *forward };
            ct::record(forward, state, now);
            l2::learn_from_reply(ctx, forward, now);
        }
    }
    if nat6::rewrite(
        ctx,
        packet,
        End::Source,
        flow.service_address_be,
        flow.service_port_be,
    )
    .is_err()
        || (client_port_be != packet.dport_be
            && nat6::rewrite_port(ctx, packet, End::Destination, client_port_be).is_err())
    {
        count(Counter::Error);
        return TC_ACT_SHOT;
    }
    frag6::translated(ctx, packet);
    count(Counter::ReverseTranslated);
    TC_ACT_OK
}
