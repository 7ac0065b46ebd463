//! The IPv6 hairpin (`crate::hairpin`'s twin): a pod that reaches its own
//! IPv6 service and is chosen as the backend gets its connection, looped
//! back inside the pod with the source `HAIRPIN_SOURCE6_BE`
//! (100::a9fe:2a01; why not a link-local address: its definition). The
//! pod's replies to that address take its default route and meet the
//! egress program before they leave: the flow's backend-tuple entry,
//! keyed with the hairpin source as the client, turns each into a reply
//! from the service to the pod, looped back the same way. Nothing leaves
//! the pod; socket-LB never needs this (it connects the socket to the
//! pod's own address).
//!
//! A program of its own (`up_tc_hairpin6`), entered by a tail call from
//! the egress programs: after a translation whose backend is the sending
//! pod (the packet now goes from the pod to the pod), and for a packet
//! to the hairpin source. The per-packet path keeps its stack.

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    programs::TcContext,
};
use datapath_common::{
    HAIRPIN_SOURCE6_BE, IPPROTO_TCP,
    conntrack::{self, Direction},
    maps::{CtKey6, Ipv6Words},
    metrics::Counter,
};

use crate::{
    ct, ct6, frag6, hairpin,
    maps::{CONNTRACK6_TCP, CONNTRACK6_UDP, CtMap6, TC_JUMPS},
    metrics::count,
    nat::End,
    nat6,
    parse6::{self, Packet6},
};

/// True when a flow to `backend_be` from `packet`'s sender goes to the
/// sender itself.
#[inline(always)]
pub fn is_hairpin(packet: &Packet6, backend_be: &Ipv6Words) -> bool {
    same_address(&packet.saddr_be, backend_be)
}

/// Two IPv6 addresses compared word by word: compared as arrays, two
/// runtime values made LLVM's BPF backend crash on this program (a
/// `bcmp` left for post-RA expansion); against a constant, or elsewhere,
/// `==` compiles.
#[inline(always)]
pub fn same_address(a: &Ipv6Words, b: &Ipv6Words) -> bool {
    a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3]
}

/// A flow's backend-tuple key made with the sender as the client: the
/// hairpin source instead when the backend is the sender itself (its
/// replies are addressed there). In place: the per-packet program has no
/// stack for a second key.
#[inline(always)]
pub fn key_reply_client(key: &mut CtKey6) {
    if same_address(&key.client_address_be, &key.peer_address_be) {
        key.client_address_be = HAIRPIN_SOURCE6_BE;
    }
}

/// Continues in `up_tc_hairpin6`. Without the jump the packet is dropped:
/// sent on it would leave the pod addressed to the pod itself, or to the
/// hairpin source.
#[inline(always)]
pub fn jump(ctx: &TcContext) -> i32 {
    // SAFETY: a tail call on the program's own context; on success it
    // does not return.
    unsafe { TC_JUMPS.tail_call(ctx, datapath_common::jumps::HAIRPIN6) };
    count(Counter::Error);
    TC_ACT_SHOT
}

/// `up_tc_hairpin6`.
#[inline(always)]
pub fn run(ctx: &TcContext) -> i32 {
    let Some(mut packet) = parse6::ipv6_l4(ctx) else {
        return TC_ACT_SHOT;
    };
    if packet.daddr_be == HAIRPIN_SOURCE6_BE {
        if packet.later_fragment && !frag6::resolve(&mut packet) {
            count(Counter::Fragment);
            return TC_ACT_SHOT;
        }
        // One call site per table: the verifier then inlines each lookup.
        return if packet.protocol == IPPROTO_TCP {
            reply(ctx, &packet, &CONNTRACK6_TCP)
        } else {
            reply(ctx, &packet, &CONNTRACK6_UDP)
        };
    }
    if same_address(&packet.saddr_be, &packet.daddr_be) {
        // A forward packet the egress program translated to the pod
        // itself: from the hairpin source (its port kept), looped back.
        if nat6::rewrite(
            ctx,
            &packet,
            End::Source,
            HAIRPIN_SOURCE6_BE,
            packet.sport_be,
        )
        .is_err()
        {
            count(Counter::Error);
            return TC_ACT_SHOT;
        }
        return hairpin::loop_back(ctx);
    }
    TC_ACT_UNSPEC
}

/// A packet the pod sends to the hairpin source: the reply of a hairpin
/// flow, translated (from the service, to the pod) and looped back.
/// Without a live flow it is dropped: the hairpin source must not leak
/// to the pod's gateway.
#[inline(always)]
fn reply(ctx: &TcContext, packet: &Packet6, table: &CtMap6) -> i32 {
    let Some(flow) = table.get_ptr_mut(ct6::reply_key(packet)) else {
        return TC_ACT_SHOT;
    };
    // SAFETY: a pointer into the map value, valid for this program run.
    let flow = unsafe { &mut *flow };
    let now = ct::now();
    if ct::is_expired(flow, packet.protocol, now) {
        return TC_ACT_SHOT;
    }
    let state = conntrack::next_state(
        flow.state,
        packet.protocol,
        packet.tcp_flags,
        Direction::Reply,
    );
    // The client's own port, if it was moved on a tuple clash.
    let client_port_be = ct6::moved_port(flow, packet.dport_be);
    if ct::needs_write(flow, state, now) {
        ct::record(flow, state, now);
        let service = ct6::service_key(
            packet.saddr_be,
            client_port_be,
            flow.service_address_be,
            flow.service_port_be,
            packet.protocol,
        );
        let _ = ct::mirror(table, &service, state, now);
    }
    let (service_address_be, service_port_be) = (flow.service_address_be, flow.service_port_be);
    if nat6::rewrite(
        ctx,
        packet,
        End::Source,
        service_address_be,
        service_port_be,
    )
    .is_err()
        || nat6::rewrite(
            ctx,
            packet,
            End::Destination,
            packet.saddr_be,
            client_port_be,
        )
        .is_err()
    {
        count(Counter::Error);
        return TC_ACT_SHOT;
    }
    frag6::translated(ctx, packet);
    count(Counter::ReverseTranslated);
    hairpin::loop_back(ctx)
}
