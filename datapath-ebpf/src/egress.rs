//! TC egress on the pod interface: client → ClusterIP packets are DNATed
//! to a backend. A new flow picks a backend uniformly at random and is
//! tracked; later packets of the flow keep that backend.
//!
//! Cost budget: traffic that is not for a service pays one failed
//! `SERVICES` lookup and nothing else. A tracked flow pays the service,
//! conntrack and backend lookups; conntrack is only written when the flow's
//! state changes or its timestamp is older than the refresh interval.

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns},
    programs::TcContext,
};
use datapath_common::{
    conntrack::{self, Direction},
    lb,
    maps::{Backend, CtEntry, L2_UNRESOLVED, ServiceKey, ServiceValue},
    metrics::Counter,
};

use crate::{
    ct, l2,
    maps::{BACKENDS, CONNTRACK, SERVICES},
    metrics::count,
    nat::{self, End},
    parse::{self, Packet},
};

pub fn run(ctx: &TcContext) -> i32 {
    let Some(packet) = parse::ipv4_l4(ctx) else {
        return TC_ACT_UNSPEC;
    };
    let frontend = ServiceKey::new(packet.daddr_be, packet.dport_be, packet.protocol, 0);
    // SAFETY: the value is copied out before any other map call.
    let Some(service) = (unsafe { SERVICES.get(frontend) }).copied() else {
        return TC_ACT_UNSPEC;
    };
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    let key = ct::service_key(
        packet.saddr_be,
        packet.sport_be,
        packet.daddr_be,
        packet.dport_be,
        packet.protocol,
    );

    if let Some(flow) = CONNTRACK.get_ptr_mut(key) {
        // SAFETY: a pointer into the map value, valid for this program run.
        let flow = unsafe { &mut *flow };
        if let Some(backend) = tracked_backend(flow, &service, &packet, now) {
            count(Counter::ConntrackHit);
            let state = conntrack::next_state(
                flow.state,
                packet.protocol,
                packet.tcp_flags,
                Direction::Original,
            );
            if conntrack::needs_write(flow, state, now) {
                flow.state = state;
                flow.last_seen_ns = now;
                let reply = ct::backend_key(
                    packet.saddr_be,
                    packet.sport_be,
                    backend.address_be,
                    backend.port_be,
                    packet.protocol,
                );
                if !ct::mirror(&reply, state, now) {
                    // Evicted: without it the replies would not be
                    // reverse-translated.
                    let _ = ct::insert(&reply, &reply_entry(flow, &packet));
                }
            }
            let flow = *flow;
            return translate(ctx, &packet, &backend, &flow);
        }
    }
    new_flow(ctx, &packet, &service, &key, now)
}

/// The backend of a live tracked flow, or `None` when the flow must be
/// balanced afresh: expired, opened to a previous incarnation of the
/// service, a TCP SYN reusing a closed flow's tuple, or a backend the agent
/// has deleted (then a TCP flow gets a RST from its new backend and the
/// client fails fast instead of hanging; a UDP flow simply moves).
#[inline(always)]
fn tracked_backend(
    flow: &CtEntry,
    service: &ServiceValue,
    packet: &Packet,
    now: u64,
) -> Option<Backend> {
    if ct::is_expired(flow, packet.protocol, now)
        || flow.rev_nat_id != service.rev_nat_id
        || conntrack::syn_reopens(flow, packet.protocol, packet.tcp_flags)
    {
        return None;
    }
    // SAFETY: copied out at once.
    unsafe { BACKENDS.get(flow.backend_id) }.copied()
}

#[inline(always)]
fn new_flow(
    ctx: &TcContext,
    packet: &Packet,
    service: &ServiceValue,
    key: &datapath_common::maps::CtKey,
    now: u64,
) -> i32 {
    count(Counter::ConntrackMiss);
    if service.backend_count == 0 {
        count(Counter::NoBackend);
        return TC_ACT_SHOT;
    }
    // SAFETY: plain helper call.
    let slot = lb::select_slot(unsafe { bpf_get_prandom_u32() }, service.backend_count);
    let slot_key = ServiceKey::new(packet.daddr_be, packet.dport_be, packet.protocol, slot);
    // SAFETY: copied out at once.
    let Some(slot_value) = (unsafe { SERVICES.get(slot_key) }).copied() else {
        count(Counter::Error);
        return TC_ACT_SHOT;
    };
    // SAFETY: copied out at once.
    let Some(backend) = (unsafe { BACKENDS.get(slot_value.backend_id) }).copied() else {
        count(Counter::Error);
        return TC_ACT_SHOT;
    };
    let flow = CtEntry {
        last_seen_ns: now,
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
    if !ct::insert(&reply, &reply_entry(&flow, packet)) || !ct::insert(key, &flow) {
        count(Counter::Error);
    }
    translate(ctx, packet, &backend, &flow)
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
fn translate(ctx: &TcContext, packet: &Packet, backend: &Backend, flow: &CtEntry) -> i32 {
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
    count(Counter::Translated);
    l2::forward(ctx, flow)
}
