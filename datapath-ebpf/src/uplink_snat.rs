//! Flows from outside to a backend on another node (`crate::uplink`):
//! DNAT to the backend, SNAT to this node's address and a port of its
//! own (`NorthSouthConfig::snat_*`), sent back out of the uplink
//! (`XDP_TX`) to the next hop the kernel's routes and neighbours name.
//! The backend answers this node; its replies, found in `UPLINK_SNAT` by
//! their tuple, get the frontend as source and the client as destination
//! again and go back to the hop the flow came in from. Kube-proxy's
//! default for `externalTrafficPolicy: Cluster` (its MASQUERADE), without
//! the stack.

use aya_ebpf::{
    bindings::{
        BPF_EXIST, BPF_NOEXIST,
        xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
    },
    helpers::bpf_get_prandom_u32,
    programs::XdpContext,
};
use datapath_common::{
    conntrack::{self, Direction},
    maps::{Backend, CtEntry, CtKey, L2_UPLINK_SNAT, NorthSouthConfig, UplinkSnat},
    metrics::Counter,
    port_be,
};

use crate::{
    atomic, ct,
    maps::{CtMap, NORTH_SOUTH, UPLINK_SNAT},
    metrics::{count, count_service},
    parse::Packet,
    uplink_frame::{self, NoNextHop, next_hop, rewrite_destination, rewrite_source, set_macs},
};

/// Random ports tried for a new flow before it is passed to the stack
/// (each try an insert, and a lookup when the port is held; counted as
/// `north_south_no_port` when all are held by live flows). With a share
/// `h` of the range held, a flow finds none with chance `h^tries`: at
/// 8 tries and a third held (TCP_CRR at 8,000 connections a second,
/// each port held 2 s after its close) one flow in 5,000 was reset;
/// at 32, one in 10^15. Netfilter's NAT tries up to 128.
const PORT_TRIES: u32 = 32;

#[inline(always)]
fn config() -> Option<NorthSouthConfig> {
    NORTH_SOUTH
        .get(0)
        .copied()
        .filter(|c| c.snat_address_be != 0 && c.snat_port_count != 0)
}

/// The backend Maglev chose for a new flow, and for which frontend.
pub struct Choice {
    pub backend: Backend,
    pub backend_id: u32,
    pub rev_nat_id: u32,
}

/// A new flow (its service-tuple `key` in `table`) to `choice`'s backend.
#[inline(always)]
pub fn open(
    ctx: &XdpContext,
    packet: &Packet,
    table: &CtMap,
    key: &CtKey,
    choice: &Choice,
    now: u64,
) -> u32 {
    let Choice {
        backend,
        backend_id,
        rev_nat_id,
    } = choice;
    let (backend_id, rev_nat_id) = (*backend_id, *rev_nat_id);
    let Some(config) = config() else {
        count(Counter::NorthSouthPassed);
        return XDP_PASS;
    };
    let (next_mac, uplink_mac) = match next_hop(
        ctx,
        packet.protocol,
        config.snat_address_be,
        backend.address_be,
    ) {
        Ok(macs) => macs,
        // Being resolved (the agent keeps a managed entry for every
        // such backend): dropped, so that the client retransmits
        // instead of meeting the stack's reset.
        Err(NoNextHop::Unresolved) => {
            count(Counter::NorthSouthNoNeighbour);
            return XDP_DROP;
        }
        // No route out of the uplink: the stack decides.
        Err(NoNextHop::NoRoute) => {
            count(Counter::NorthSouthPassed);
            return XDP_PASS;
        }
    };
    let Some((client_mac, _)) = uplink_frame::macs(ctx) else {
        return XDP_PASS;
    };
    let state = conntrack::initial_state(packet.protocol, packet.tcp_flags);
    let back = UplinkSnat {
        last_seen: now,
        client_address_be: packet.saddr_be,
        frontend_address_be: packet.daddr_be,
        client_port_be: packet.sport_be,
        frontend_port_be: packet.dport_be,
        client_mac,
        uplink_mac,
        state,
        _pad: [0; 7],
    };
    let mut port = 0;
    for _ in 0..PORT_TRIES {
        // SAFETY: plain helper call.
        let random = unsafe { bpf_get_prandom_u32() };
        let candidate =
            port_be(config.snat_port_first + (random % config.snat_port_count as u32) as u16);
        let reply = ct::backend_key(
            config.snat_address_be,
            candidate,
            backend.address_be,
            backend.port_be,
            packet.protocol,
        );
        if UPLINK_SNAT.insert(reply, back, BPF_NOEXIST as u64).is_ok() {
            port = candidate;
            break;
        }
        // Held: by an expired flow (a closed TCP one once the backend
        // has left TIME_WAIT), the port is free again — nothing else
        // frees it, the LRU evicts only when the whole table is full.
        if let Some(held) = UPLINK_SNAT.get_ptr_mut(reply) {
            // SAFETY: a pointer into the map value, valid for this run.
            let held = unsafe { &mut *held };
            let seen = held.last_seen;
            // Ours once claimed. A new element rather than a rewrite in
            // place: a CPU still reading the old one (a late packet of the
            // old flow) mostly sees it whole rather than half of each
            // (mostly: the LRU may hand the old element out again at
            // once). Should the kernel refuse the new element (none free,
            // or the old one evicted meanwhile and perhaps another key's
            // now), the next candidate is tried: writing through `held`
            // could write another flow's entry.
            if ct::snat_port_free(held, packet.protocol, now)
                && claim(held, seen, now)
                && UPLINK_SNAT.insert(reply, back, BPF_EXIST as u64).is_ok()
            {
                port = candidate;
                break;
            }
        }
    }
    if port == 0 {
        count(Counter::NorthSouthNoPort);
        return XDP_PASS;
    }
    let mut flow = CtEntry {
        last_seen: now,
        l2_seen: now,
        backend_id,
        state,
        l2_mode: L2_UPLINK_SNAT,
        nat_port_be: port,
        dst_mac: next_mac,
        src_mac: uplink_mac,
        ..CtEntry::default()
    };
    flow.set_rev_nat_id(rev_nat_id);
    if !ct::insert(table, key, &flow) {
        count(Counter::Error);
    }
    count_service(rev_nat_id, 1, 1);
    send(ctx, packet, backend, &flow, config.snat_address_be)
}

/// Takes over the port of `held`, found free while its `last_seen` was
/// `seen`: a compare-and-swap of `last_seen` from `seen` to `now`. False
/// when another CPU's new flow claimed the port first (or a late packet
/// of the old flow refreshed it): check-then-write would hand the port
/// to both new flows, and the replies of one would reach the other's
/// client. Once claimed, the entry looks live to every other CPU.
#[inline(always)]
fn claim(held: &mut UplinkSnat, seen: u64, now: u64) -> bool {
    // SAFETY: `last_seen` is the entry's first field, 8-byte aligned in a
    // map value that lives for this program run.
    unsafe { atomic::compare_exchange(&mut held.last_seen, seen, now) }
}

/// A later packet of a tracked flow to `backend`.
#[inline(always)]
pub fn forward(
    ctx: &XdpContext,
    packet: &Packet,
    flow: &mut CtEntry,
    backend: &Backend,
    now: u64,
) -> u32 {
    let Some(config) = config() else {
        count(Counter::NorthSouthPassed);
        return XDP_PASS;
    };
    if !ct::l2_is_fresh(flow.l2_seen, now)
        && let Ok((next_mac, uplink_mac)) = next_hop(
            ctx,
            packet.protocol,
            config.snat_address_be,
            backend.address_be,
        )
    {
        // Once a freshness interval: a backend's next hop may change.
        flow.dst_mac = next_mac;
        flow.src_mac = uplink_mac;
        flow.l2_seen = now;
    }
    let state = conntrack::next_state(
        flow.state,
        packet.protocol,
        packet.tcp_flags,
        Direction::Original,
    );
    if ct::needs_write(flow, state, now) {
        ct::record(flow, state, now);
        let reply = ct::backend_key(
            config.snat_address_be,
            flow.nat_port_be,
            backend.address_be,
            backend.port_be,
            packet.protocol,
        );
        let held = UPLINK_SNAT.get_ptr_mut(reply);
        if let Some(held) = held {
            // SAFETY: a pointer into the map value, valid for this run.
            let held = unsafe { &mut *held };
            // Only this flow's own entry (after an eviction, another
            // flow may have taken the port).
            if held.client_address_be != packet.saddr_be || held.client_port_be != packet.sport_be {
                // Another flow holds this port now (this one's entry
                // was evicted and the port handed out again): this flow
                // cannot go on with it. Expired, its next packet opens
                // it anew; this one goes nowhere rather than into the
                // other flow's connection.
                flow.last_seen = 0;
                count(Counter::Error);
                return XDP_DROP;
            }
            ct::record(held, state, now);
        } else if let Some((client_mac, _)) = uplink_frame::macs(ctx) {
            // Evicted: without it the replies would reach the stack.
            let back = UplinkSnat {
                last_seen: now,
                client_address_be: packet.saddr_be,
                frontend_address_be: packet.daddr_be,
                client_port_be: packet.sport_be,
                frontend_port_be: packet.dport_be,
                client_mac,
                uplink_mac: flow.src_mac,
                state,
                _pad: [0; 7],
            };
            // Not over a claim another CPU's new flow just made.
            let _ = UPLINK_SNAT.insert(reply, back, BPF_NOEXIST as u64);
        }
    }
    count_service(flow.rev_nat_id(), 1, 0);
    let flow = *flow;
    send(ctx, packet, backend, &flow, config.snat_address_be)
}

/// DNAT to the backend, SNAT to the node, the next hop's MAC: out again.
#[inline(always)]
fn send(ctx: &XdpContext, packet: &Packet, backend: &Backend, flow: &CtEntry, snat_be: u32) -> u32 {
    if rewrite_destination(ctx, packet, backend.address_be, backend.port_be).is_err()
        || rewrite_source(ctx, packet, snat_be, flow.nat_port_be).is_err()
        || set_macs(ctx, flow.dst_mac, flow.src_mac).is_err()
    {
        count(Counter::Error);
        return XDP_DROP;
    }
    count(Counter::NorthSouthTranslated);
    XDP_TX
}

/// The verdict for `packet` when it is a reply to an SNATed flow
/// (translated back and sent to the client), `None` otherwise.
#[inline(always)]
pub fn reply(ctx: &XdpContext, packet: &Packet, table: &CtMap) -> Option<u32> {
    let config = config()?;
    if packet.daddr_be != config.snat_address_be || !config.is_snat_port(packet.dport_be) {
        return None;
    }
    let entry = UPLINK_SNAT.get_ptr_mut(ct::reply_key(packet))?;
    // SAFETY: a pointer into the map value, valid for this program run.
    let entry = unsafe { &mut *entry };
    let now = ct::now();
    if ct::is_expired(entry, packet.protocol, now) {
        return None;
    }
    let state = conntrack::next_state(
        entry.state,
        packet.protocol,
        packet.tcp_flags,
        Direction::Reply,
    );
    if ct::needs_write(entry, state, now) {
        ct::record(entry, state, now);
        let service = ct::service_key(
            entry.client_address_be,
            entry.client_port_be,
            entry.frontend_address_be,
            entry.frontend_port_be,
            packet.protocol,
        );
        // Only onto the flow that holds this port now: the client's tuple
        // may have been reopened to another port since.
        if let Some(forward) = table.get_ptr_mut(service) {
            // SAFETY: a pointer into the map value, valid for this run.
            let forward = unsafe { &mut *forward };
            if forward.l2_mode == L2_UPLINK_SNAT && forward.nat_port_be == packet.dport_be {
                ct::record(forward, state, now);
            }
        }
    }
    let back = *entry;
    if rewrite_source(ctx, packet, back.frontend_address_be, back.frontend_port_be).is_err()
        || rewrite_destination(ctx, packet, back.client_address_be, back.client_port_be).is_err()
        || set_macs(ctx, back.client_mac, back.uplink_mac).is_err()
    {
        count(Counter::Error);
        return Some(XDP_DROP);
    }
    count(Counter::NorthSouthReverseTranslated);
    Some(XDP_TX)
}
