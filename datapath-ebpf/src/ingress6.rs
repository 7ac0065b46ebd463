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
    ct, ct6, icmp6, l2,
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
    if !packet.plain || !reply_filter::may_be_reply6(&packet) {
        // Only plain packets are translated on egress (`crate::egress6`);
        // others cannot be replies of a flow opened here.
        return TC_ACT_UNSPEC;
    }
    // One call site per table: the verifier then inlines each lookup.
    if packet.protocol == IPPROTO_TCP {
        reply(ctx, &packet, &CONNTRACK6_TCP)
    } else {
        reply(ctx, &packet, &CONNTRACK6_UDP)
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
    if ct::needs_write(flow, state, now) || teach_l2 {
        flow.state = state;
        flow.last_seen = now;
        flow.l2_seen = now;
        let service = ct6::service_key(
            packet.daddr_be,
            packet.dport_be,
            flow.service_address_be,
            flow.service_port_be,
            packet.protocol,
        );
        if let Some(forward) = table.get_ptr_mut(service) {
            // SAFETY: a pointer into the map value, valid for this program run.
            let forward = unsafe { &mut *forward };
            forward.state |= state;
            forward.last_seen = now;
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
    {
        count(Counter::Error);
        return TC_ACT_SHOT;
    }
    count(Counter::ReverseTranslated);
    TC_ACT_OK
}
