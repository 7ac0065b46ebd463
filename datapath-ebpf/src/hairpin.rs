//! A pod that reaches its own service and is chosen as the backend
//! (hairpin). Translated and sent on, its packet would leave the pod
//! addressed to the pod itself, and be lost. kube-proxy masquerades this
//! case (`KUBE-MARK-MASQ` for a hairpin endpoint); Cilium loops it back
//! with a link-local source. So does this path: the forward packet's
//! source becomes `HAIRPIN_SOURCE_BE`, its destination MAC the pod's own,
//! and it is redirected to the ingress of the interface it was leaving
//! by, so the pod's stack receives a connection from 169.254.42.1. The
//! pod's replies to that address meet the egress program before they
//! leave: the flow's backend-tuple entry, keyed with the hairpin source
//! as the client, turns each into a reply from the service to the pod,
//! looped back the same way. Nothing leaves the pod; socket-LB never
//! needs this (it connects the socket to the pod's own address).

use aya_ebpf::{
    bindings::{BPF_F_INGRESS, TC_ACT_SHOT},
    helpers::bpf_redirect,
    programs::TcContext,
};
use datapath_common::{
    HAIRPIN_SOURCE_BE, IPPROTO_TCP,
    conntrack::{self, Direction},
    metrics::Counter,
};
use network_types::eth::EthHdr;

use crate::{
    ct, frag,
    maps::{CONNTRACK_TCP, CONNTRACK_UDP, CtMap},
    metrics::count,
    nat::{self, End},
    parse::{Packet, ptr_at},
};

/// True when `packet`'s flow goes to the pod that sends it.
#[inline(always)]
pub fn is_hairpin(packet: &Packet, backend_be: u32) -> bool {
    packet.saddr_be == backend_be
}

/// The client address of a flow's backend-tuple key: the hairpin source
/// when the backend is the pod itself (its replies are addressed there).
#[inline(always)]
pub fn reply_client(packet: &Packet, backend_be: u32) -> u32 {
    if is_hairpin(packet, backend_be) {
        HAIRPIN_SOURCE_BE
    } else {
        packet.saddr_be
    }
}

/// Rewrites a translated forward packet's source to the hairpin source
/// (and `wire_port_be`), then loops it back into the pod.
#[inline(always)]
pub fn send_forward(ctx: &TcContext, packet: &Packet, wire_port_be: u16) -> i32 {
    if nat::rewrite(ctx, packet, End::Source, HAIRPIN_SOURCE_BE, wire_port_be).is_err() {
        count(Counter::Error);
        return TC_ACT_SHOT;
    }
    frag::translated(ctx, packet);
    loop_back(ctx)
}

/// A packet the pod sends to the hairpin source: the reply of a hairpin
/// flow, translated and looped back.
#[inline(always)]
pub fn reply(ctx: &TcContext, packet: &Packet) -> i32 {
    // One call site per table: the verifier then inlines each lookup.
    if packet.protocol == IPPROTO_TCP {
        reply_in(ctx, packet, &CONNTRACK_TCP)
    } else {
        reply_in(ctx, packet, &CONNTRACK_UDP)
    }
}

/// Without a live flow (expired, evicted, conntrack replaced) the packet
/// is dropped: 169.254.42.1 is ours, and link-local traffic must not leak
/// to the pod's gateway.
#[inline(always)]
fn reply_in(ctx: &TcContext, packet: &Packet, table: &CtMap) -> i32 {
    let Some(flow) = table.get_ptr_mut(ct::reply_key(packet)) else {
        return TC_ACT_SHOT;
    };
    // SAFETY: a pointer into the map value, valid for this program run.
    let flow = unsafe { &mut *flow };
    let now = ct::now();
    if ct::is_expired(flow, packet.protocol, now) {
        return TC_ACT_SHOT;
    }
    // The client's own port (moved on a tuple clash: restored).
    let client_port = if flow.nat_port_be != 0 {
        flow.nat_port_be
    } else {
        packet.dport_be
    };
    let state = conntrack::next_state(
        flow.state,
        packet.protocol,
        packet.tcp_flags,
        Direction::Reply,
    );
    if ct::needs_write(flow, state, now) {
        ct::record(flow, state, now);
        let service = ct::service_key(
            packet.saddr_be,
            client_port,
            flow.service_address_be,
            flow.service_port_be,
            packet.protocol,
        );
        let _ = ct::mirror(table, &service, state, now);
    }
    // From the service, to the pod (the backend is the client).
    if nat::rewrite(
        ctx,
        packet,
        End::Source,
        flow.service_address_be,
        flow.service_port_be,
    )
    .is_err()
        || nat::rewrite(ctx, packet, End::Destination, packet.saddr_be, client_port).is_err()
    {
        count(Counter::Error);
        return TC_ACT_SHOT;
    }
    frag::translated(ctx, packet);
    count(Counter::ReverseTranslated);
    loop_back(ctx)
}

/// Redirects the frame to the ingress of the interface it is on,
/// addressed to the interface's own MAC (its source: the frame was
/// leaving by it), which the receiving stack requires.
#[inline(always)]
pub fn loop_back(ctx: &TcContext) -> i32 {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return TC_ACT_SHOT;
    };
    // SAFETY: bounds-checked by ptr_at; the skb pointer is the context.
    unsafe {
        (*eth).dst_addr = (*eth).src_addr;
        bpf_redirect((*ctx.skb.skb).ifindex, BPF_F_INGRESS as u64) as i32
    }
}
