//! TC egress on the pod interface: client → ClusterIP packets are DNATed
//! to a backend. A new flow picks a backend uniformly at random and is
//! tracked; later packets of the flow keep that backend.
//!
//! Lookup order follows the packets. Traffic that is not for a service
//! meets an empty `SERVICE_FILTER` bucket and leaves after that one array
//! read. Nearly all service packets belong to tracked flows, so conntrack
//! comes next: a tracked packet pays that one hash lookup plus two O(1)
//! array reads (its frontend and its backend still exist). Only a packet
//! without a live flow consults `SERVICES`, to open one.
//! Conntrack is written only on new flows, on TCP state changes and once a
//! refresh interval, never per packet.

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::bpf_get_prandom_u32,
    programs::TcContext,
};
use datapath_common::{
    IPPROTO_TCP,
    conntrack::{self, Direction, STATE_ANY_CLOSE, TCP_ACK, TCP_SYN},
    lb,
    maps::{Backend, CtEntry, CtKey, L2_UNRESOLVED, ServiceKey},
    metrics::Counter,
};

use crate::{
    ct, frag, icmp, l2,
    maps::{BACKENDS, CONNTRACK_TCP, CONNTRACK_UDP, CtMap, REVERSE_NAT, SERVICE_FILTER, SERVICES},
    metrics::count,
    nat::{self, End},
    parse::{self, Packet},
    reject,
};

pub fn run(ctx: &TcContext) -> i32 {
    let Some(mut packet) = parse::ipv4_l4(ctx) else {
        // Not TCP or UDP: an ICMP error may be about a translated flow.
        return icmp::on_egress(ctx);
    };
    if packet.is_later_fragment() && !frag::resolve(&mut packet) {
        count(Counter::Fragment);
        return TC_ACT_UNSPEC;
    }
    if !maybe_service(&packet) {
        forget_reused_reply_tuple(&packet);
        return TC_ACT_UNSPEC;
    }
    // One call site per table: the verifier then inlines each lookup.
    if packet.protocol == IPPROTO_TCP {
        service_packet(ctx, &packet, &CONNTRACK_TCP)
    } else {
        service_packet(ctx, &packet, &CONNTRACK_UDP)
    }
}

/// A packet that may be for a service, with its protocol's conntrack.
#[inline(always)]
fn service_packet(ctx: &TcContext, packet: &Packet, table: &CtMap) -> i32 {
    let key = ct::service_key(
        packet.saddr_be,
        packet.sport_be,
        packet.daddr_be,
        packet.dport_be,
        packet.protocol,
    );
    let now = ct::now();
    if let Some(flow) = table.get_ptr_mut(key) {
        // SAFETY: a pointer into the map value, valid for this program run.
        let flow = unsafe { &mut *flow };
        if let Some(backend) = tracked_backend(flow, packet, now) {
            count(Counter::ConntrackHit);
            let state = conntrack::next_state(
                flow.state,
                packet.protocol,
                packet.tcp_flags,
                Direction::Original,
            );
            if ct::needs_write(flow, state, now) {
                flow.state = state;
                flow.last_seen = now;
                let reply = ct::backend_key(
                    packet.saddr_be,
                    packet.sport_be,
                    backend.address_be,
                    backend.port_be,
                    packet.protocol,
                );
                if !ct::mirror(table, &reply, state, now) {
                    // Evicted: without it the replies would not be
                    // reverse-translated.
                    let _ = ct::insert(table, &reply, &reply_entry(flow, packet));
                }
            }
            let flow = *flow;
            return translate(ctx, packet, &backend, &flow, now);
        }
    }
    new_flow(ctx, packet, table, &key, now)
}

/// A connection opened straight to an address (not through a service:
/// a Pod IP, or a socket-LB translated `connect()`) may reuse the tuple a
/// closed service flow had towards its backend. That flow's reply entry
/// would reverse-translate the new connection's replies to the old VIP,
/// and the socket would drop them. Its SYN removes that flow from
/// conntrack (both entries: a service flow never has one without the
/// other) once the flow is closing or expired. A live flow is kept: the
/// translated SYN itself comes through here again after
/// `bpf_redirect_neigh`, and a live flow on the same wire tuple would
/// collide anyway. Only SYNs pay for this (one lookup).
#[inline(always)]
fn forget_reused_reply_tuple(packet: &Packet) {
    if packet.protocol != IPPROTO_TCP || packet.tcp_flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
        return;
    }
    let reply = ct::backend_key(
        packet.saddr_be,
        packet.sport_be,
        packet.daddr_be,
        packet.dport_be,
        packet.protocol,
    );
    // SAFETY: the value is copied out before any other map call.
    let Some(stale) = (unsafe { CONNTRACK_TCP.get(reply) }).copied() else {
        return;
    };
    let closing = stale.state & STATE_ANY_CLOSE != 0;
    if !closing && !ct::is_expired(&stale, packet.protocol, ct::now()) {
        return;
    }
    let service = ct::service_key(
        packet.saddr_be,
        packet.sport_be,
        stale.service_address_be,
        stale.service_port_be,
        packet.protocol,
    );
    let _ = CONNTRACK_TCP.remove(service);
    let _ = CONNTRACK_TCP.remove(reply);
}

/// False when no frontend hashes to the packet's destination bucket.
#[inline(always)]
fn maybe_service(packet: &Packet) -> bool {
    let bucket = lb::service_filter_index(packet.daddr_be, packet.dport_be, packet.protocol);
    SERVICE_FILTER.get(bucket).is_some_and(|&n| n > 0)
}

/// The backend of a live tracked flow, or `None` when the flow must be
/// balanced afresh: expired, its frontend deleted or re-created (its
/// reverse-NAT slot no longer names this VIP:port), a TCP SYN reusing a
/// closed flow's tuple, or a backend the agent has deleted (then a TCP flow
/// gets a RST from its new backend and the client fails fast instead of
/// hanging; a UDP flow simply moves).
#[inline(always)]
fn tracked_backend(flow: &CtEntry, packet: &Packet, now: u64) -> Option<Backend> {
    if ct::is_expired(flow, packet.protocol, now)
        || conntrack::syn_reopens(flow, packet.protocol, packet.tcp_flags)
    {
        return None;
    }
    let frontend = REVERSE_NAT.get(flow.rev_nat_id as u32)?;
    if !frontend.is_present()
        || frontend.address_be != packet.daddr_be
        || frontend.port_be != packet.dport_be
    {
        return None;
    }
    BACKENDS
        .get(flow.backend_id)
        .copied()
        .filter(Backend::is_present)
}

#[inline(always)]
fn new_flow(ctx: &TcContext, packet: &Packet, table: &CtMap, key: &CtKey, now: u64) -> i32 {
    if packet.is_later_fragment() {
        // Its flow ended between the first fragment and this one: the
        // datagram cannot be completed anyway.
        count(Counter::Fragment);
        return TC_ACT_UNSPEC;
    }
    let frontend = ServiceKey::new(packet.daddr_be, packet.dport_be, packet.protocol, 0);
    // SAFETY: the value is copied out before any other map call.
    let Some(service) = (unsafe { SERVICES.get(frontend) }).copied() else {
        forget_reused_reply_tuple(packet);
        return TC_ACT_UNSPEC;
    };
    if service.backend_count == 0 {
        count(Counter::NoBackend);
        return reject::refuse(ctx, packet);
    }
    // SAFETY: plain helper call.
    let slot = lb::select_slot(unsafe { bpf_get_prandom_u32() }, service.backend_count);
    let slot_key = ServiceKey::new(packet.daddr_be, packet.dport_be, packet.protocol, slot);
    // SAFETY: copied out at once.
    let Some(slot_value) = (unsafe { SERVICES.get(slot_key) }).copied() else {
        count(Counter::Error);
        return TC_ACT_SHOT;
    };
    let Some(backend) = BACKENDS
        .get(slot_value.backend_id)
        .copied()
        .filter(Backend::is_present)
    else {
        count(Counter::Error);
        return TC_ACT_SHOT;
    };
    let flow = CtEntry {
        last_seen: now,
        backend_id: slot_value.backend_id,
        rev_nat_id: service.rev_nat_id,
        state: conntrack::initial_state(packet.protocol, packet.tcp_flags),
        l2_mode: L2_UNRESOLVED,
        ..CtEntry::default()
    };
    // Reply entry first: a reply can only arrive after the packet leaves.
    let reply = ct::backend_key(
        packet.saddr_be,
        packet.sport_be,
        backend.address_be,
        backend.port_be,
        packet.protocol,
    );
    if !ct::insert(table, &reply, &reply_entry(&flow, packet)) || !ct::insert(table, key, &flow) {
        count(Counter::Error);
    }
    count(Counter::ConntrackMiss);
    translate(ctx, packet, &backend, &flow, now)
}

/// The backend-tuple entry of a flow: same state, plus the frontend the
/// replies must be rewritten to.
#[inline(always)]
fn reply_entry(flow: &CtEntry, packet: &Packet) -> CtEntry {
    CtEntry {
        service_address_be: packet.daddr_be,
        service_port_be: packet.dport_be,
        l2_mode: L2_UNRESOLVED,
        ..*flow
    }
}

#[inline(always)]
fn translate(ctx: &TcContext, packet: &Packet, backend: &Backend, flow: &CtEntry, now: u64) -> i32 {
    if nat::rewrite(
        ctx,
        packet,
        End::Destination,
        backend.address_be,
        backend.port_be,
    )
    .is_err()
    {
        count(Counter::Error);
        return TC_ACT_SHOT;
    }
    frag::translated(packet);
    l2::forward(ctx, flow, now)
}
