//! TC egress for IPv6, a program of its own entered by a tail call from
//! the egress program (`jump`): client → IPv6 ClusterIP packets are
//! DNATed to a backend, as `crate::egress` does for IPv4 — conntrack
//! first (a hit pays one hash lookup and three array reads), `SERVICES6`
//! only to open a flow, entries written only on new flows, state changes
//! and once a refresh interval.
//!
//! Packets with extension headers or fragments continue in
//! `up_tc_egress6_ext` (`extended_run`), ICMPv6 errors in
//! `crate::icmp6`, a pod's flow to itself in `crate::hairpin6`, each a
//! program of its own entered by a tail call, and so is every flow whose
//! client port moves on a tuple clash (`crate::clash6`). A backend the
//! pod routes by another of its interfaces is sent that way
//! (`crate::route`, `POD_ROUTES6`).

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::bpf_get_prandom_u32,
    programs::TcContext,
};
use datapath_common::{
    HAIRPIN_SOURCE6_BE, IPPROTO_TCP, SKB_CB_FLOW_OPENED,
    conntrack::{self, Direction, TCP_ACK, TCP_SYN},
    lb,
    maps::{
        AFFINITY_CLIENT_ADDRESS, CtEntry6, CtKey6, Ipv6Words, L2_HAIRPIN, L2_UNRESOLVED,
        ServiceKey6, ServiceValue,
    },
    metrics::Counter,
};

use crate::{
    affinity, backends, clash, clash6, ct, ct6, direct6, events, frag6, hairpin6, icmp6, l2,
    maps::{CONNTRACK6_TCP, CONNTRACK6_UDP, CtMap6, SERVICE_FILTER, SERVICES6, SLOTS, TC_JUMPS},
    metrics::{count, count_service},
    nat::End,
    nat6,
    parse6::{self, Packet6},
    reject, reply_filter, route,
};

/// Continues an IPv6 packet in `up_tc_egress6`, a program of its own
/// entered by a tail call: its stack does not add to the IPv4 path's
/// (together they would pass the 512-byte limit), and the IPv4 path pays
/// nothing for it. Without the jump (an empty slot) the packet passes.
#[inline(always)]
pub fn jump(ctx: &TcContext) -> i32 {
    // SAFETY: a tail call on the program's own context; on success it
    // does not return.
    unsafe { TC_JUMPS.tail_call(ctx, datapath_common::jumps::EGRESS6) };
    TC_ACT_UNSPEC
}

/// `up_tc_egress6`.
#[inline(always)]
pub fn run(ctx: &TcContext) -> i32 {
    let Some(packet) = parse6::ipv6_l4(ctx) else {
        // Not TCP or UDP: an ICMPv6 error may be about a reply of a
        // translated flow.
        return icmp6::jump_if_error(ctx, datapath_common::jumps::ICMP6_EGRESS);
    };
    if !packet.plain {
        // Extension headers or a fragment: rare, in a program of its own
        // (`extended_run`). Without the jump the packet passes, counted.
        // SAFETY: a tail call on the program's own context; on success
        // it does not return.
        unsafe { TC_JUMPS.tail_call(ctx, datapath_common::jumps::EGRESS6_EXT) };
        count(Counter::Ipv6Untranslated);
        return TC_ACT_UNSPEC;
    }
    if packet.daddr_be == HAIRPIN_SOURCE6_BE {
        // The pod answering a connection it made to its own service.
        return hairpin6::jump(ctx);
    }
    if !maybe_service(&packet) {
        return direct(ctx, &packet);
    }
    by_protocol(ctx, &packet)
}

/// `up_tc_egress6_ext`: a packet whose TCP/UDP header is past extension
/// headers, or a fragment (only `run` jumps here). A later fragment takes
/// its ports from its first fragment (`crate::frag6`); then the packet is
/// translated as `run` translates a plain one.
#[inline(always)]
pub fn extended_run(ctx: &TcContext) -> i32 {
    let Some(mut packet) = parse6::ipv6_l4(ctx) else {
        return TC_ACT_UNSPEC;
    };
    if packet.daddr_be == HAIRPIN_SOURCE6_BE {
        return hairpin6::jump(ctx);
    }
    if packet.later_fragment {
        if !frag6::resolve(&mut packet) {
            // Its first fragment was not translated (not for a service,
            // or not seen yet).
            count(Counter::Fragment);
            return TC_ACT_UNSPEC;
        }
    } else if !maybe_service(&packet) {
        return direct(ctx, &packet);
    }
    by_protocol(ctx, &packet)
}

/// True when `packet`'s destination may be a frontend (its filter bucket
/// is set): the rest pass after one array read.
#[inline(always)]
fn maybe_service(packet: &Packet6) -> bool {
    let bucket = lb::service_filter_index6(packet.daddr_be, packet.dport_be, packet.protocol);
    SERVICE_FILTER.get(bucket).is_some_and(|&n| n > 0)
}

/// `service_packet` with its protocol's conntrack: one call site per
/// table, so that the verifier inlines each lookup.
#[inline(always)]
fn by_protocol(ctx: &TcContext, packet: &Packet6) -> i32 {
    if packet.protocol == IPPROTO_TCP {
        service_packet(ctx, packet, &CONNTRACK6_TCP)
    } else {
        service_packet(ctx, packet, &CONNTRACK6_UDP)
    }
}

/// A packet that may be for a service, with its protocol's conntrack.
#[inline(always)]
fn service_packet(ctx: &TcContext, packet: &Packet6, table: &CtMap6) -> i32 {
    let key = ct6::packet_service_key(packet);
    let now = ct::now();
    if let Some(flow) = table.get_ptr_mut(key) {
        // SAFETY: a pointer into the map value, valid for this program run.
        let flow = unsafe { &mut *flow };
        if let Some(backend) = ct6::tracked_backend(flow, packet, now) {
            if flow.nat_port_be != 0 && !packet.later_fragment {
                // Its client port was moved on a tuple clash: translated
                // in a program of its own (a later fragment has no port).
                return clash6::jump(ctx);
            }
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
                // Keyed by the port on the wire: a later fragment of a
                // moved flow comes this way too.
                let mut reply = ct6::backend_key(
                    packet.saddr_be,
                    ct6::moved_port(flow, packet.sport_be),
                    backend.0,
                    backend.1,
                    packet.protocol,
                );
                hairpin6::key_reply_client(&mut reply);
                if !ct::mirror(table, &reply, state, now) {
                    // Evicted: without it the replies would not be
                    // reverse-translated.
                    let _ = ct::insert(table, &reply, &reply_entry(flow, packet));
                }
                // After the entry (`crate::reply_filter`).
                reply_filter::mark6(backend.0, backend.1, packet.protocol);
            }
            return translate(ctx, packet, backend, flow, now);
        }
    }
    // A new flow continues in a program of its own (`new_flow_run`).
    // SAFETY: a tail call on the program's own context; on success it
    // does not return.
    unsafe { TC_JUMPS.tail_call(ctx, datapath_common::jumps::NEW_FLOW6) };
    // No jump (an empty slot): a packet to a frontend is dropped, never
    // sent on untranslated; another destination passes.
    let frontend = ServiceKey6::new(packet.daddr_be, packet.dport_be, packet.protocol);
    // SAFETY: only tested for presence.
    if unsafe { SERVICES6.get(frontend) }.is_none() {
        return direct(ctx, packet);
    }
    count(Counter::Error);
    TC_ACT_SHOT
}

/// `up_tc_new_flow6`: a packet of no live flow to a possible IPv6
/// frontend (only `run` and `extended_run` jump here), parsed again:
/// opens its flow.
#[inline(always)]
pub fn new_flow_run(ctx: &TcContext) -> i32 {
    if flow_opened(ctx) {
        // `extended_run` did not find the flow opened for this very
        // packet (an entry not written, or not taken): dropped rather
        // than opened again.
        count(Counter::Error);
        return TC_ACT_SHOT;
    }
    let Some(packet) = parse6::ipv6_l4(ctx) else {
        count(Counter::Error);
        return TC_ACT_SHOT;
    };
    if packet.later_fragment {
        // Its flow ended between the first fragment and this one: the
        // datagram cannot be completed anyway.
        count(Counter::Fragment);
        return TC_ACT_UNSPEC;
    }
    new_flow(ctx, &packet)
}

/// A new flow's frontend (refused without endpoints) and backend, then
/// the flow itself (`open`).
#[inline(always)]
fn new_flow(ctx: &TcContext, packet: &Packet6) -> i32 {
    let frontend = ServiceKey6::new(packet.daddr_be, packet.dport_be, packet.protocol);
    // SAFETY: the value is copied out before any other map call.
    let Some(service) = (unsafe { SERVICES6.get(frontend) }).copied() else {
        // Another destination sharing the filter bucket.
        return direct(ctx, packet);
    };
    if service.backend_count == 0 {
        count(Counter::NoBackend);
        events::no_backend6(ctx, packet.daddr_be, packet.dport_be, packet.protocol);
        if !packet.plain {
            // The refusal answers (and quotes) a header right after the
            // fixed one; past extension headers its error would name no
            // socket. Dropped: the client's retransmissions meet the same.
            return TC_ACT_SHOT;
        }
        return refuse(ctx);
    }
    // SAFETY: plain helper call.
    let slot = lb::select_slot(unsafe { bpf_get_prandom_u32() }, service.backend_count);
    let Some(mut backend_id) = slot_backend(&service, slot) else {
        // A slot naming no IPv6 backend: dropped, as over IPv4 (the
        // client retransmits once the agent's write is complete).
        count(Counter::Error);
        return TC_ACT_SHOT;
    };
    let timeout = affinity::timeout(service.rev_nat_id());
    if timeout != 0 {
        // A client of a frontend with sessionAffinity (`crate::affinity`).
        // SAFETY: 16 bytes either way.
        let [low, high]: [u64; 2] = unsafe { core::mem::transmute(packet.saddr_be) };
        let client = affinity::id_kind(service.rev_nat_id(), AFFINITY_CLIENT_ADDRESS);
        let kept = affinity::backend(low, high, client, timeout, backend_id);
        // A remembered backend without its entry (being removed) is not
        // taken.
        if backends::ipv6(kept).is_some() {
            backend_id = kept;
        }
    }
    let Some(backend) = backends::ipv6(backend_id) else {
        count(Counter::Error);
        return TC_ACT_SHOT;
    };
    let key = ct6::packet_service_key(packet);
    // One call site for both tables (unlike the per-packet paths, whose
    // lookups the verifier inlines per site): the flow's frame is made
    // once, and leaves room for `clash6::taken`'s.
    let table = if packet.protocol == IPPROTO_TCP {
        &CONNTRACK6_TCP
    } else {
        &CONNTRACK6_UDP
    };
    open(
        ctx,
        packet,
        table,
        &key,
        (backend_id, backend, service.rev_nat_id()),
        ct::now(),
    )
}

/// Opens the flow to the backend `new_flow` chose (its id, address and
/// port, and the frontend's reverse-NAT id): the wire tuple claimed
/// (`crate::clash6`), the two conntrack entries, the translation.
#[inline(always)]
fn open(
    ctx: &TcContext,
    packet: &Packet6,
    table: &CtMap6,
    key: &CtKey6,
    (backend_id, backend, rev_nat_id): (u32, (Ipv6Words, u16), u32),
    now: u64,
) -> i32 {
    // One entry on the stack, written twice: first as the reply entry
    // (a reply can only arrive after the packet leaves), then, without
    // the frontend to restore, as the flow's own.
    let mut flow = CtEntry6 {
        last_seen: now,
        backend_id,
        state: conntrack::initial_state(packet.protocol, packet.tcp_flags),
        l2_mode: if hairpin6::is_hairpin(packet, &backend.0) {
            L2_HAIRPIN
        } else {
            L2_UNRESOLVED
        },
        service_address_be: packet.daddr_be,
        service_port_be: packet.dport_be,
        ..CtEntry6::default()
    };
    flow.set_rev_nat_id(rev_nat_id);
    let mut reply = ct6::backend_key(
        packet.saddr_be,
        packet.sport_be,
        backend.0,
        backend.1,
        packet.protocol,
    );
    hairpin6::key_reply_client(&mut reply);
    // The wire tuple must be this flow's alone (`crate::clash6`): if it is
    // taken, the key gets another client port, and the reply entry the
    // client's own to restore.
    let moved = clash6::claim(ctx, &mut reply, &packet.daddr_be, packet.dport_be, now);
    if moved {
        count(Counter::PortClash);
        flow.nat_port_be = packet.sport_be;
    }
    // The interface the pod's route to the backend leaves by, when not
    // this one (`crate::route`). After the claim, from the key: fewer
    // values live across the two calls, so the frame stays within what
    // the calls' frames leave of 512 bytes.
    // SAFETY: the skb pointer is the program's context.
    flow.out_ifindex =
        route::other_interface6(ctx.skb.skb as *mut c_void, &reply.peer_address_be, unsafe {
            (*ctx.skb.skb).ifindex
        });
    let reply_written = ct::insert(table, &reply, &flow);
    flow.service_address_be = [0; 4];
    flow.service_port_be = 0;
    if moved {
        flow.nat_port_be = reply.client_port_be;
    }
    if !reply_written || !ct::insert(table, key, &flow) {
        count(Counter::Error);
        events::conntrack_insert_failed(ctx, packet.protocol);
    }
    // After the entries, before the packet leaves (`crate::reply_filter`).
    reply_filter::mark6(backend.0, backend.1, packet.protocol);
    count(Counter::ConntrackMiss);
    // The packet itself is counted where it is translated: below, or as
    // a hit by the program jumped to.
    count_service(rev_nat_id, 0, 1);
    if moved {
        // The port rewrite happens in `up_tc_clash6`, which finds the
        // flow just opened (and drops the packet if it was not written).
        return clash6::jump(ctx);
    }
    if !packet.plain {
        // The rewrite past extension headers does not fit beside this
        // frame: `extended_run` finds the flow just opened and translates
        // it (counted there as a hit too). Without the jump: dropped,
        // never sent on untranslated.
        // SAFETY: the skb pointer is the program's context; cb is
        // writable from TC programs.
        unsafe { (*ctx.skb.skb).cb[1] = SKB_CB_FLOW_OPENED };
        // SAFETY: a tail call on the program's own context; on success
        // it does not return.
        unsafe { TC_JUMPS.tail_call(ctx, datapath_common::jumps::EGRESS6_EXT) };
        count(Counter::Error);
        return TC_ACT_SHOT;
    }
    count_service(rev_nat_id, 1, 0);
    translate(ctx, packet, backend, &flow, now)
}

/// True when this packet's flow was opened by `up_tc_new_flow6` already
/// (`SKB_CB_FLOW_OPENED`).
#[inline(always)]
fn flow_opened(ctx: &TcContext) -> bool {
    // SAFETY: the skb pointer is the program's context.
    unsafe { (*ctx.skb.skb).cb[1] == SKB_CB_FLOW_OPENED }
}

/// The id of the IPv6 backend in `slot` of `service`.
#[inline(always)]
fn slot_backend(service: &ServiceValue, slot: u16) -> Option<u32> {
    let id = SLOTS.get(service.slot_index(slot))?.backend_id;
    backends::ipv6(id)?;
    Some(id)
}

/// A packet to an address that is not a service passes untouched,
/// unless its wire tuple clashes with a service flow's: its destination
/// has connections tracked with a moved port (`CLASH_FILTER`), or it is a
/// TCP SYN whose wire tuple a live service flow holds; both continue in
/// `up_tc_direct6`. A SYN whose tuple an ended service flow still holds
/// frees it (as `crate::egress`'s `direct_syn` does): that flow's reply
/// entry would rewrite this connection's replies to the ClusterIP. Only
/// SYNs pay for this (one lookup), and packets to a marked destination.
#[inline(always)]
fn direct(ctx: &TcContext, packet: &Packet6) -> i32 {
    if clash6::marked(packet) {
        return direct6::jump(ctx);
    }
    if packet.protocol != IPPROTO_TCP || packet.tcp_flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
        return TC_ACT_UNSPEC;
    }
    let reply = ct6::backend_key(
        packet.saddr_be,
        packet.sport_be,
        packet.daddr_be,
        packet.dport_be,
        packet.protocol,
    );
    // SAFETY: the fields are copied out before any other map call.
    let Some((service_address_be, service_port_be, nat_port_be, live)) =
        (unsafe { CONNTRACK6_TCP.get(reply) }).map(|holder| {
            (
                holder.service_address_be,
                holder.service_port_be,
                holder.nat_port_be,
                clash::held_by_live_flow(holder, IPPROTO_TCP, ct::now()),
            )
        })
    else {
        return TC_ACT_UNSPEC;
    };
    if live {
        return direct6::jump(ctx);
    }
    ct6::forget_ended_flow(
        packet,
        &reply,
        service_address_be,
        service_port_be,
        nat_port_be,
    );
    TC_ACT_UNSPEC
}

/// Refuses the packet into the pod (`refusal`, entered by a tail call),
/// as over IPv4 every packet to a frontend without endpoints is: a TCP
/// SYN with a reset, anything else with an ICMPv6 port unreachable.
/// Without the jump the packet is dropped (never sent on untranslated).
#[inline(always)]
fn refuse(ctx: &TcContext) -> i32 {
    // SAFETY: a tail call on the program's own context; on success it
    // does not return.
    unsafe { TC_JUMPS.tail_call(ctx, datapath_common::jumps::REFUSE6) };
    count(Counter::Error);
    TC_ACT_SHOT
}

/// `up_tc_refuse6`: the refusal itself (`crate::reject::refuse6`), in a
/// program of its own (its answer and 48-byte quote do not fit in one
/// 512-byte stack beside the translation's frame).
#[inline(always)]
pub fn refusal(ctx: &TcContext) -> i32 {
    let verdict = reject::refuse6(ctx);
    if verdict == TC_ACT_SHOT {
        // The packet could not be rewritten (dropped).
        count(Counter::Error);
    }
    verdict
}

/// The backend-tuple entry of a flow: same state, plus the frontend the
/// replies must be rewritten to (and the client's own port, if moved).
#[inline(always)]
fn reply_entry(flow: &CtEntry6, packet: &Packet6) -> CtEntry6 {
    CtEntry6 {
        service_address_be: packet.daddr_be,
        service_port_be: packet.dport_be,
        l2_mode: L2_UNRESOLVED,
        // A moved flow's replies get the client's own port back.
        nat_port_be: if flow.nat_port_be != 0 {
            packet.sport_be
        } else {
            0
        },
        ..*flow
    }
}

#[inline(always)]
fn translate(
    ctx: &TcContext,
    packet: &Packet6,
    backend: (Ipv6Words, u16),
    flow: &CtEntry6,
    now: u64,
) -> i32 {
    if nat6::rewrite(ctx, packet, End::Destination, backend.0, backend.1).is_err() {
        count(Counter::Error);
        return TC_ACT_SHOT;
    }
    frag6::translated(ctx, packet);
    if flow.l2_mode == L2_HAIRPIN {
        // To the pod itself: looped back from the hairpin source (the
        // mode, set when the flow opened, is one compare where the
        // addresses would be four and a stack slot this program has not).
        return hairpin6::jump(ctx);
    }
    l2::forward(ctx, flow, now)
}
