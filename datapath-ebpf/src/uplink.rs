//! XDP on the node's uplink (the parent of the macvlan pods): traffic
//! from outside to a north-south frontend (nodePort at this node's
//! address, load-balancer IP, external IP) is balanced with Maglev
//! (`crate::maglev`) and DNATed; a backend on this node is handed to its
//! macvlan by the frame's destination MAC (`XDP_PASS`), the client's
//! address kept, and the pod's TC egress turns its replies back
//! (`crate::uplink_reply`); a backend on another node gets the flow
//! SNATed to this node and sent back out (`crate::uplink_snat`), whose
//! replies this program turns back.
//!
//! ICMP errors about these flows go to their backends
//! (`crate::uplink_icmp`). Anything else leaves after the `SERVICE_FILTER`
//! read: not IPv4 TCP or UDP, a fragment, a destination no frontend hashes to (after one
//! `NORTH_SOUTH` read: is it a reply to an SNATed flow?). A frontend not
//! served from outside here passes to the stack untranslated (counted).

use aya_ebpf::{bindings::xdp_action::XDP_PASS, programs::XdpContext};
use datapath_common::{
    IPPROTO_TCP,
    conntrack::{self, Direction},
    lb,
    maps::{Backend, CtEntry, CtKey, L2_UPLINK_LOCAL, L2_UPLINK_SNAT, ServiceKey},
    metrics::Counter,
};

use crate::{
    ct, egress, maglev,
    maps::{BACKENDS, CONNTRACK_TCP, CONNTRACK_UDP, CtMap, LOCAL_PODS, SERVICE_FILTER, SERVICES},
    metrics::{count, count_service},
    parse::Packet,
    reply_filter,
    uplink_frame::{self, rewrite_destination, set_destination_mac},
    uplink_icmp, uplink_snat,
};

#[inline(always)]
pub fn run(ctx: &XdpContext) -> u32 {
    let Some(packet) = uplink_frame::ipv4_l4(ctx) else {
        // An ICMP error about one of our flows goes to its backend (path
        // MTU); anything else passes untouched.
        return uplink_icmp::run(ctx).unwrap_or(XDP_PASS);
    };
    // A reply to a flow SNATed to this node (`crate::uplink_snat`).
    let replied = if packet.protocol == IPPROTO_TCP {
        uplink_snat::reply(ctx, &packet, &CONNTRACK_TCP)
    } else {
        uplink_snat::reply(ctx, &packet, &CONNTRACK_UDP)
    };
    if let Some(verdict) = replied {
        return verdict;
    }
    let bucket = lb::service_filter_index(packet.daddr_be, packet.dport_be, packet.protocol);
    if SERVICE_FILTER.get(bucket).is_none_or(|&n| n == 0) {
        return XDP_PASS;
    }
    // One call site per table: the verifier then inlines each lookup.
    if packet.protocol == IPPROTO_TCP {
        service_packet(ctx, &packet, &CONNTRACK_TCP)
    } else {
        service_packet(ctx, &packet, &CONNTRACK_UDP)
    }
}

#[inline(always)]
fn service_packet(ctx: &XdpContext, packet: &Packet, table: &CtMap) -> u32 {
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
        if flow.l2_mode == L2_UPLINK_SNAT
            && let Some(backend) = egress::tracked_backend(flow, packet, now)
        {
            return uplink_snat::forward(ctx, packet, flow, &backend, now);
        }
        if flow.l2_mode == L2_UPLINK_LOCAL
            && let Some(backend) = egress::tracked_backend(flow, packet, now)
        {
            let state = conntrack::next_state(
                flow.state,
                packet.protocol,
                packet.tcp_flags,
                Direction::Original,
            );
            if ct::needs_write(flow, state, now) {
                ct::record(flow, state, now);
                let reply = ct::backend_key(
                    packet.saddr_be,
                    packet.sport_be,
                    backend.address_be,
                    backend.port_be,
                    packet.protocol,
                );
                if !ct::mirror(table, &reply, state, now) {
                    // Evicted: without it the pod's replies would leave
                    // with its own address.
                    let _ = ct::insert(table, &reply, &reply_entry(flow, packet));
                }
                reply_filter::mark(backend.address_be, backend.port_be, packet.protocol);
            }
            count_service(flow.rev_nat_id(), 1, 0);
            // The pod's MAC as it is now (a pod re-created with the same
            // address has another), the flow's own if it left the node.
            // SAFETY: the value is copied out before any other map call.
            let mac =
                (unsafe { LOCAL_PODS.get(backend.address_be) }).map_or(flow.dst_mac, |pod| pod.mac);
            return deliver(ctx, packet, &backend, mac);
        }
    }
    new_flow(ctx, packet, table, &key, now)
}

#[inline(always)]
fn new_flow(ctx: &XdpContext, packet: &Packet, table: &CtMap, key: &CtKey, now: u64) -> u32 {
    let frontend = ServiceKey::new(packet.daddr_be, packet.dport_be, packet.protocol);
    // SAFETY: the value is copied out before any other map call.
    let Some(service) = (unsafe { SERVICES.get(frontend) }).copied() else {
        // Another destination sharing the filter bucket.
        return XDP_PASS;
    };
    let rev_nat_id = service.rev_nat_id();
    let Some(backend_id) = maglev::pick(packet, rev_nat_id) else {
        // Not served from outside on this node: the stack decides.
        count(Counter::NorthSouthPassed);
        return XDP_PASS;
    };
    let Some(backend) = BACKENDS
        .get(backend_id)
        .copied()
        .filter(Backend::is_present_v4)
    else {
        count(Counter::NorthSouthPassed);
        return XDP_PASS;
    };
    // SAFETY: the value is copied out before any other map call.
    let Some(pod) = (unsafe { LOCAL_PODS.get(backend.address_be) }).copied() else {
        // A backend elsewhere: SNAT to this node.
        let choice = uplink_snat::Choice {
            backend,
            backend_id,
            rev_nat_id,
        };
        return uplink_snat::open(ctx, packet, table, key, &choice, now);
    };
    let mut flow = CtEntry {
        last_seen: now,
        backend_id,
        state: conntrack::initial_state(packet.protocol, packet.tcp_flags),
        l2_mode: L2_UPLINK_LOCAL,
        dst_mac: pod.mac,
        ..CtEntry::default()
    };
    flow.set_rev_nat_id(rev_nat_id);
    // Reply entry first: a reply can only come after the packet is in.
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
    // After the entries (`crate::reply_filter`): the pod's egress looks
    // its replies up only when their source is flagged.
    reply_filter::mark(backend.address_be, backend.port_be, packet.protocol);
    count_service(rev_nat_id, 1, 1);
    deliver(ctx, packet, &backend, pod.mac)
}

/// The backend-tuple entry of a flow from outside: the frontend the
/// pod's replies get back as their source.
#[inline(always)]
fn reply_entry(flow: &CtEntry, packet: &Packet) -> CtEntry {
    CtEntry {
        service_address_be: packet.daddr_be,
        service_port_be: packet.dport_be,
        dst_mac: [0; 6],
        ..*flow
    }
}

/// DNAT to `backend`, the pod's MAC as the destination, up the stack:
/// the macvlan with that MAC takes it.
#[inline(always)]
fn deliver(ctx: &XdpContext, packet: &Packet, backend: &Backend, mac: [u8; 6]) -> u32 {
    if rewrite_destination(ctx, packet, backend.address_be, backend.port_be).is_err()
        || set_destination_mac(ctx, mac).is_err()
    {
        count(Counter::Error);
        return aya_ebpf::bindings::xdp_action::XDP_DROP;
    }
    count(Counter::NorthSouthTranslated);
    XDP_PASS
}
