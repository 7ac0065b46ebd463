//! TC ingress on the pod interface: replies from a backend get their
//! source rewritten back to the service address, from the flow's
//! backend-tuple conntrack entry. Packets of untracked (or expired) flows
//! pass untouched; those from a peer no tracked flow was opened to pass
//! without a conntrack lookup (`crate::reply_filter`).

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
    ct, frag, icmp, ingress6, l2,
    maps::{CONNTRACK_TCP, CONNTRACK_UDP, CtMap},
    metrics::count,
    nat::{self, End},
    parse::{self, Packet},
    parse6, reply_filter,
};

pub fn run(ctx: &TcContext) -> i32 {
    let Some(mut packet) = parse::ipv4_l4(ctx) else {
        if parse6::is_ipv6(ctx) {
            return ingress6::jump(ctx);
        }
        // Not TCP or UDP: an ICMP error may be about a translated flow.
        return icmp::on_ingress(ctx);
    };
    if packet.is_later_fragment() && !frag::resolve(&mut packet) {
        count(Counter::Fragment);
        return TC_ACT_UNSPEC;
    }
    if !reply_filter::may_be_reply(&packet) {
        // Not from a peer any tracked flow was opened to: no lookup.
        return TC_ACT_UNSPEC;
    }
    // One call site per table: the verifier then inlines each lookup.
    if packet.protocol == IPPROTO_TCP {
        reply(ctx, &packet, &CONNTRACK_TCP)
    } else {
        reply(ctx, &packet, &CONNTRACK_UDP)
    }
}

#[inline(always)]
fn reply(ctx: &TcContext, packet: &Packet, table: &CtMap) -> i32 {
    let Some(flow) = table.get_ptr_mut(ct::reply_key(packet)) else {
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
    // `l2_seen` of a backend-tuple entry: when this direction last taught
    // the service-tuple entry its next hop. Once a refresh interval, so
    // that learned MACs stay confirmed without a write per packet.
    let teach_l2 = ct::refresh_due(flow.l2_seen, now);
    if ct::needs_write(flow, state, now) || teach_l2 {
        ct::record(flow, state, now);
        flow.l2_seen = now;
        let client_port = if flow.nat_port_be != 0 {
            flow.nat_port_be
        } else {
            packet.dport_be
        };
        let service = ct::service_key(
            packet.daddr_be,
            client_port,
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
    if nat::rewrite(
        ctx,
        packet,
        End::Source,
        flow.service_address_be,
        flow.service_port_be,
    )
    .is_err()
        || (flow.nat_port_be != 0
            && nat::rewrite_port(ctx, packet, End::Destination, flow.nat_port_be).is_err())
    {
        count(Counter::Error);
        return TC_ACT_SHOT;
    }
    frag::translated(ctx, packet);
    count(Counter::ReverseTranslated);
    TC_ACT_OK
}
