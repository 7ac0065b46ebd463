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
//! refresh interval, never per packet; so is the flag that lets the
//! ingress program skip conntrack for packets that cannot be replies
//! (`crate::reply_filter`). A new flow whose wire tuple another
//! flow holds gets another source port (`crate::clash`).

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::bpf_get_prandom_u32,
    programs::TcContext,
};
use datapath_common::{
    HAIRPIN_SOURCE_BE, IPPROTO_TCP,
    conntrack::{self, Direction, TCP_ACK, TCP_SYN},
    lb,
    maps::{AFFINITY_CLIENT_ADDRESS, Backend, CtEntry, CtKey, L2_UNRESOLVED, ServiceKey},
    metrics::Counter,
};

use crate::{
    affinity, clash, ct, egress6, events, frag, hairpin, icmp, l2,
    maps::{
        BACKENDS, CONNTRACK_TCP, CONNTRACK_UDP, CtMap, REVERSE_NAT, SERVICE_FILTER, SERVICES, SLOTS,
    },
    metrics::{count, count_service},
    nat::{self, End},
    parse::{self, Packet},
    parse6, reject, reply_filter, route, uplink_reply,
};

#[inline(always)]
pub fn run(ctx: &TcContext) -> i32 {
    if l2::take_redirected(ctx) {
        // Our own packet again, after bpf_redirect_neigh (`crate::l2`).
        return TC_ACT_UNSPEC;
    }
    let Some(mut packet) = parse::ipv4_l4(ctx) else {
        if parse6::is_ipv6(ctx) {
            return egress6::jump(ctx);
        }
        // Not TCP or UDP: an ICMP error may be about a translated flow.
        return icmp::on_egress(ctx);
    };
    if packet.is_later_fragment() && !frag::resolve(&mut packet) {
        count(Counter::Fragment);
        return TC_ACT_UNSPEC;
    }
    if packet.daddr_be == HAIRPIN_SOURCE_BE {
        // The pod answering a connection it made to its own service.
        return hairpin::reply(ctx, &packet);
    }
    if !maybe_service(&packet) {
        return direct(ctx, &packet);
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
            count_service(flow.rev_nat_id(), 1, 0);
            let state = conntrack::next_state(
                flow.state,
                packet.protocol,
                packet.tcp_flags,
                Direction::Original,
            );
            if ct::needs_write(flow, state, now) {
                ct::record(flow, state, now);
                let reply = ct::backend_key(
                    hairpin::reply_client(packet, backend.address_be),
                    wire_port(flow, packet),
                    backend.address_be,
                    backend.port_be,
                    packet.protocol,
                );
                if !ct::mirror(table, &reply, state, now) {
                    // Evicted: without it the replies would not be
                    // reverse-translated.
                    let _ = ct::insert(table, &reply, &reply_entry(flow, packet));
                }
                // After the entry (`crate::reply_filter`); flows an older
                // build opened get their flag here too.
                reply_filter::mark(backend.address_be, backend.port_be, packet.protocol);
            }
            let flow = *flow;
            return translate(ctx, packet, &backend, &flow, now);
        }
    }
    new_flow(ctx, packet, table, &key, now)
}

/// The client port a flow uses on the wire.
#[inline(always)]
fn wire_port(flow: &CtEntry, packet: &Packet) -> u16 {
    if flow.nat_port_be != 0 {
        flow.nat_port_be
    } else {
        packet.sport_be
    }
}

/// A packet to an address that is not a service: a connection straight to
/// a pod (or anything else). It passes untouched, unless it answers a
/// client from outside (`crate::uplink_reply`) or its wire tuple clashes
/// with a service flow's (`crate::clash`).
#[inline(always)]
fn direct(ctx: &TcContext, packet: &Packet) -> i32 {
    if let Some(verdict) = uplink_reply::reply(ctx, packet) {
        // The pod answering a client from outside (`crate::uplink`).
        return verdict;
    }
    if clash::marked(packet.daddr_be, packet.dport_be, packet.protocol) {
        let tracked = if packet.protocol == IPPROTO_TCP {
            direct_tracked(ctx, packet, &CONNTRACK_TCP)
        } else {
            direct_tracked(ctx, packet, &CONNTRACK_UDP)
        };
        if let Some(verdict) = tracked {
            return verdict;
        }
    }
    if packet.protocol == IPPROTO_TCP && packet.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        return direct_syn(ctx, packet);
    }
    TC_ACT_UNSPEC
}

/// A later packet of a direct connection whose source port was moved.
#[inline(always)]
fn direct_tracked(ctx: &TcContext, packet: &Packet, table: &CtMap) -> Option<i32> {
    let key = ct::service_key(
        packet.saddr_be,
        packet.sport_be,
        packet.daddr_be,
        packet.dport_be,
        packet.protocol,
    );
    let flow = table.get_ptr_mut(key)?;
    // SAFETY: a pointer into the map value, valid for this program run.
    let flow = unsafe { &mut *flow };
    let now = ct::now();
    if flow.rev_nat_id() != 0
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
        reply_filter::mark(packet.daddr_be, packet.dport_be, packet.protocol);
        let reply = ct::backend_key(
            packet.saddr_be,
            flow.nat_port_be,
            packet.daddr_be,
            packet.dport_be,
            packet.protocol,
        );
        let _ = ct::mirror(table, &reply, state, now);
    }
    if nat::rewrite_port(ctx, packet, End::Source, flow.nat_port_be).is_err() {
        count(Counter::Error);
        return Some(TC_ACT_SHOT);
    }
    Some(TC_ACT_UNSPEC)
}

/// The SYN of a connection straight to a pod. Its wire tuple may be held
/// in conntrack by a service flow: a closed or expired one is forgotten
/// (its reply entry would reverse-translate this connection's replies to
/// the old ClusterIP); a live one keeps it, and this connection moves to
/// another source port, tracked from now on. Only SYNs pay for this (one
/// lookup).
#[inline(always)]
fn direct_syn(ctx: &TcContext, packet: &Packet) -> i32 {
    let reply = ct::backend_key(
        packet.saddr_be,
        packet.sport_be,
        packet.daddr_be,
        packet.dport_be,
        packet.protocol,
    );
    // SAFETY: the value is copied out before any other map call.
    let Some(holder) = (unsafe { CONNTRACK_TCP.get(reply) }).copied() else {
        return TC_ACT_UNSPEC;
    };
    let now = ct::now();
    if !clash::held_by_live_flow(&holder, IPPROTO_TCP, now) {
        // Both entries: a flow never has one without the other.
        let client_port = if holder.nat_port_be != 0 {
            holder.nat_port_be
        } else {
            packet.sport_be
        };
        let service = ct::service_key(
            packet.saddr_be,
            client_port,
            holder.service_address_be,
            holder.service_port_be,
            packet.protocol,
        );
        let _ = CONNTRACK_TCP.remove(service);
        let _ = CONNTRACK_TCP.remove(reply);
        return TC_ACT_UNSPEC;
    }
    let tuple = clash::WireTuple {
        client_be: packet.saddr_be,
        port_be: packet.sport_be,
        peer_be: packet.daddr_be,
        peer_port_be: packet.dport_be,
        protocol: IPPROTO_TCP,
        frontend_be: 0,
        frontend_port_be: 0,
    };
    let Some(port) = clash::free_port(ctx, &CONNTRACK_TCP, tuple, now) else {
        count(Counter::Error);
        return TC_ACT_UNSPEC;
    };
    let state = conntrack::initial_state(IPPROTO_TCP, packet.tcp_flags);
    let forward = CtEntry {
        last_seen: now,
        state,
        nat_port_be: port,
        ..CtEntry::default()
    };
    // Replies come from the pod itself: their source stays, their
    // destination port becomes the client's own again.
    let back = CtEntry {
        last_seen: now,
        state,
        service_address_be: packet.daddr_be,
        service_port_be: packet.dport_be,
        nat_port_be: packet.sport_be,
        ..CtEntry::default()
    };
    let moved = ct::backend_key(
        packet.saddr_be,
        port,
        packet.daddr_be,
        packet.dport_be,
        packet.protocol,
    );
    let own = ct::service_key(
        packet.saddr_be,
        packet.sport_be,
        packet.daddr_be,
        packet.dport_be,
        packet.protocol,
    );
    if !ct::insert(&CONNTRACK_TCP, &moved, &back) || !ct::insert(&CONNTRACK_TCP, &own, &forward) {
        count(Counter::Error);
        events::conntrack_insert_failed(ctx, packet.protocol);
        return TC_ACT_UNSPEC;
    }
    // After the entries (`crate::reply_filter`), before the packet leaves.
    reply_filter::mark(packet.daddr_be, packet.dport_be, packet.protocol);
    clash::mark(packet.daddr_be, packet.dport_be, packet.protocol);
    count(Counter::PortClash);
    if nat::rewrite_port(ctx, packet, End::Source, port).is_err() {
        count(Counter::Error);
        return TC_ACT_SHOT;
    }
    TC_ACT_UNSPEC
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
pub fn tracked_backend(flow: &CtEntry, packet: &Packet, now: u64) -> Option<Backend> {
    if ct::is_expired(flow, packet.protocol, now)
        || conntrack::syn_reopens(flow, packet.protocol, packet.tcp_flags)
    {
        return None;
    }
    let frontend = REVERSE_NAT.get(flow.rev_nat_id())?;
    if !frontend.is_present()
        || frontend.address_be != packet.daddr_be
        || frontend.port_be != packet.dport_be
    {
        return None;
    }
    BACKENDS
        .get(flow.backend_id)
        .copied()
        .filter(Backend::is_present_v4)
}

#[inline(always)]
fn new_flow(ctx: &TcContext, packet: &Packet, table: &CtMap, key: &CtKey, now: u64) -> i32 {
    if packet.is_later_fragment() {
        // Its flow ended between the first fragment and this one: the
        // datagram cannot be completed anyway.
        count(Counter::Fragment);
        return TC_ACT_UNSPEC;
    }
    let frontend = ServiceKey::new(packet.daddr_be, packet.dport_be, packet.protocol);
    // SAFETY: the value is copied out before any other map call.
    let Some(service) = (unsafe { SERVICES.get(frontend) }).copied() else {
        // Another destination sharing the filter bucket.
        return direct(ctx, packet);
    };
    if service.backend_count == 0 {
        count(Counter::NoBackend);
        events::no_backend(ctx, packet.daddr_be, packet.dport_be, packet.protocol);
        return reject::refuse(ctx, packet);
    }
    // SAFETY: plain helper call.
    let slot = lb::select_slot(unsafe { bpf_get_prandom_u32() }, service.backend_count);
    let Some(mut backend_id) = SLOTS.get(service.slot_index(slot)).map(|s| s.backend_id) else {
        count(Counter::Error);
        return TC_ACT_SHOT;
    };
    let timeout = affinity::timeout(service.rev_nat_id());
    if timeout != 0 {
        // A client of a frontend with sessionAffinity (`crate::affinity`);
        // a remembered backend without its entry (being removed) is not
        // taken.
        let client = affinity::id_kind(service.rev_nat_id(), AFFINITY_CLIENT_ADDRESS);
        let kept = affinity::backend(packet.saddr_be as u64, 0, client, timeout, backend_id);
        if BACKENDS.get(kept).is_some_and(Backend::is_present_v4) {
            backend_id = kept;
        }
    }
    let Some(backend) = BACKENDS
        .get(backend_id)
        .copied()
        .filter(Backend::is_present_v4)
    else {
        count(Counter::Error);
        return TC_ACT_SHOT;
    };
    // The wire tuple must be this flow's alone.
    let tuple = clash::WireTuple {
        client_be: hairpin::reply_client(packet, backend.address_be),
        port_be: packet.sport_be,
        peer_be: backend.address_be,
        peer_port_be: backend.port_be,
        protocol: packet.protocol,
        frontend_be: packet.daddr_be,
        frontend_port_be: packet.dport_be,
    };
    let wire = clash::wire_port(ctx, table, tuple, now).unwrap_or_else(|| {
        count(Counter::Error);
        packet.sport_be
    });
    let moved = wire != packet.sport_be;
    if moved {
        count(Counter::PortClash);
    }
    let mut flow = CtEntry {
        last_seen: now,
        backend_id,
        state: conntrack::initial_state(packet.protocol, packet.tcp_flags),
        l2_mode: L2_UNRESOLVED,
        nat_port_be: if moved { wire } else { 0 },
        // SAFETY: the skb pointer is the program's context.
        out_ifindex: route::other_interface(ctx, backend.address_be, unsafe {
            (*ctx.skb.skb).ifindex
        }),
        ..CtEntry::default()
    };
    flow.set_rev_nat_id(service.rev_nat_id());
    // Reply entry first: a reply can only arrive after the packet leaves.
    let back = reply_entry(&flow, packet);
    let reply = ct::backend_key(
        hairpin::reply_client(packet, backend.address_be),
        wire,
        backend.address_be,
        backend.port_be,
        packet.protocol,
    );
    if !ct::insert(table, &reply, &back) || !ct::insert(table, key, &flow) {
        count(Counter::Error);
        events::conntrack_insert_failed(ctx, packet.protocol);
    }
    // After the entries, before the packet leaves (`crate::reply_filter`).
    reply_filter::mark(backend.address_be, backend.port_be, packet.protocol);
    count(Counter::ConntrackMiss);
    count_service(service.rev_nat_id(), 1, 1);
    translate(ctx, packet, &backend, &flow, now)
}

/// The backend-tuple entry of a flow: same state, plus the frontend the
/// replies must be rewritten to (and the client's own port, if moved).
#[inline(always)]
fn reply_entry(flow: &CtEntry, packet: &Packet) -> CtEntry {
    CtEntry {
        service_address_be: packet.daddr_be,
        service_port_be: packet.dport_be,
        l2_mode: L2_UNRESOLVED,
        nat_port_be: if flow.nat_port_be != 0 {
            packet.sport_be
        } else {
            0
        },
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
    if hairpin::is_hairpin(packet, backend.address_be) {
        return hairpin::send_forward(ctx, packet, wire_port(flow, packet));
    }
    if flow.nat_port_be != 0
        && nat::rewrite_port(ctx, packet, End::Source, flow.nat_port_be).is_err()
    {
        count(Counter::Error);
        return TC_ACT_SHOT;
    }
    frag::translated(ctx, packet);
    l2::forward(ctx, flow, now)
}
