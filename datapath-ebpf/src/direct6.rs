//! Connections a pod opens straight to another pod's address over IPv6,
//! when their wire tuple clashes with a service flow's (`crate::clash6`
//! says why; `crate::egress`'s `direct`/`direct_syn` are the IPv4 twins):
//! a SYN whose tuple a live service flow holds moves to another source
//! port and is tracked from then on, its destination marked in
//! `CLASH_FILTER`, so that its later packets (only packets to a marked
//! destination come here) get the same port. A program of its own
//! (`up_tc_direct6`), entered by a tail call from the egress programs'
//! `direct`.

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    programs::TcContext,
};
use datapath_common::{
    IPPROTO_TCP,
    conntrack::{self, Direction, TCP_ACK, TCP_SYN},
    maps::CtEntry6,
    metrics::Counter,
};

use crate::{
    clash, clash6, ct, ct6, events, flags,
    maps::{CLASH_FILTER, CONNTRACK6_TCP, CONNTRACK6_UDP, CtMap6, TC_JUMPS},
    metrics::count,
    nat::End,
    nat6,
    parse6::{self, Packet6},
    reply_filter,
};

/// Continues a packet to a pod in `up_tc_direct6`. Without the jump (an
/// older generation's table) it passes as it is, as before this program.
#[inline(always)]
pub fn jump(ctx: &TcContext) -> i32 {
    // SAFETY: a tail call on the program's own context; on success it
    // does not return.
    unsafe { TC_JUMPS.tail_call(ctx, datapath_common::jumps::DIRECT6) };
    TC_ACT_UNSPEC
}

/// `up_tc_direct6`.
#[inline(always)]
pub fn run(ctx: &TcContext) -> i32 {
    let Some(packet) = parse6::ipv6_l4(ctx) else {
        return TC_ACT_UNSPEC;
    };
    if packet.later_fragment {
        // Only TCP is ever moved; a later fragment has no port anyway.
        return TC_ACT_UNSPEC;
    }
    let now = ct::now();
    // One call site per table: the verifier then inlines each lookup.
    let tracked = if packet.protocol == IPPROTO_TCP {
        tracked(ctx, &packet, &CONNTRACK6_TCP, now)
    } else {
        tracked(ctx, &packet, &CONNTRACK6_UDP, now)
    };
    if let Some(verdict) = tracked {
        return verdict;
    }
    if packet.protocol == IPPROTO_TCP && packet.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        return syn(ctx, &packet, now);
    }
    TC_ACT_UNSPEC
}

/// A later packet of a connection straight to a pod whose source port was
/// moved (`syn`). `None`: not such a connection (any more).
#[inline(always)]
fn tracked(ctx: &TcContext, packet: &Packet6, table: &CtMap6, now: u64) -> Option<i32> {
    let flow = table.get_ptr_mut(ct6::packet_service_key(packet))?;
    // SAFETY: a pointer into the map value, valid for this program run.
    let flow = unsafe { &mut *flow };
    if flow.rev_nat_id() != 0
        || flow.nat_port_be == 0
        || ct::is_expired(flow, packet.protocol, now)
        || conntrack::syn_reopens(flow, packet.protocol, packet.tcp_flags)
    {
        return None;
    }
    let state = conntrack::next_state(
        flow.state,
        packet.protocol,
        packet.tcp_flags,
        Direction::Original,
    );
    if ct::needs_write(flow, state, now) {
        ct::record(flow, state, now);
        reply_filter::mark6(packet.daddr_be, packet.dport_be, packet.protocol);
        let reply = ct6::backend_key(
            packet.saddr_be,
            flow.nat_port_be,
            packet.daddr_be,
            packet.dport_be,
            packet.protocol,
        );
        let _ = ct::mirror(table, &reply, state, now);
    }
    if nat6::rewrite_port(ctx, packet, End::Source, flow.nat_port_be).is_err() {
        count(Counter::Error);
        return Some(TC_ACT_SHOT);
    }
    Some(TC_ACT_UNSPEC)
}

/// The SYN of a connection straight to a pod: a service flow that has ended and still holds its wire
/// tuple is forgotten; a live one keeps it, and this connection moves to
/// another source port, tracked from now on, its destination marked in
/// `CLASH_FILTER`.
#[inline(always)]
fn syn(ctx: &TcContext, packet: &Packet6, now: u64) -> i32 {
    let mut key = ct6::backend_key(
        packet.saddr_be,
        packet.sport_be,
        packet.daddr_be,
        packet.dport_be,
        packet.protocol,
    );
    // SAFETY: the fields are copied out before any other map call.
    let Some((service_address_be, service_port_be, nat_port_be, live)) =
        (unsafe { CONNTRACK6_TCP.get(key) }).map(|holder| {
            (
                holder.service_address_be,
                holder.service_port_be,
                holder.nat_port_be,
                clash::held_by_live_flow(holder, IPPROTO_TCP, now),
            )
        })
    else {
        return TC_ACT_UNSPEC;
    };
    if !live {
        ct6::forget_ended_flow(
            packet,
            &key,
            service_address_be,
            service_port_be,
            nat_port_be,
        );
        return TC_ACT_UNSPEC;
    }
    if !clash6::claim(ctx, &mut key, &[0; 4], 0, now) {
        return TC_ACT_UNSPEC;
    }
    let port = key.client_port_be;
    let state = conntrack::initial_state(IPPROTO_TCP, packet.tcp_flags);
    // One entry on the stack, written twice. First the backend-tuple
    // one: replies come from the pod itself, their source stays, their
    // destination port becomes the client's own again.
    let mut entry = CtEntry6 {
        last_seen: now,
        state,
        service_address_be: packet.daddr_be,
        service_port_be: packet.dport_be,
        nat_port_be: packet.sport_be,
        ..CtEntry6::default()
    };
    if !ct::insert(&CONNTRACK6_TCP, &key, &entry) {
        count(Counter::Error);
        events::conntrack_insert_failed(ctx, packet.protocol);
        return TC_ACT_UNSPEC;
    }
    // Then the connection's own, with the port it leaves by.
    entry.service_address_be = [0; 4];
    entry.service_port_be = 0;
    entry.nat_port_be = port;
    if !ct::insert(&CONNTRACK6_TCP, &ct6::packet_service_key(packet), &entry) {
        count(Counter::Error);
        events::conntrack_insert_failed(ctx, packet.protocol);
        return TC_ACT_UNSPEC;
    }
    // After the entries (`crate::reply_filter`), before the packet leaves.
    reply_filter::mark6(packet.daddr_be, packet.dport_be, packet.protocol);
    flags::set6(
        &CLASH_FILTER,
        packet.daddr_be,
        packet.dport_be,
        packet.protocol,
    );
    count(Counter::PortClash);
    if nat6::rewrite_port(ctx, packet, End::Source, port).is_err() {
        count(Counter::Error);
        return TC_ACT_SHOT;
    }
    TC_ACT_UNSPEC
}
