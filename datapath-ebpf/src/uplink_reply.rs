//! The pod's side of a north-south flow the uplink program handed to it
//! (`crate::uplink`): its replies leave by its own interface, not back
//! through the node, so the TC egress program turns their source back
//! into the frontend the client reached (`nodeIP:nodePort`, the
//! load-balancer IP), from the flow's backend-tuple entry. Only entries
//! the uplink opened (`L2_UPLINK_LOCAL`) are taken: an east-west flow's
//! replies are the client's ingress's to translate.
//!
//! Looked up only for packets whose source (the pod's address and port)
//! is flagged in `REPLY_FILTER`, which the uplink program sets when it
//! opens a flow: the rest of the pod's traffic pays one array read.

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    programs::TcContext,
};
use datapath_common::{
    IPPROTO_TCP,
    conntrack::{self, Direction},
    maps::L2_UPLINK_LOCAL,
    metrics::Counter,
};

use crate::{
    ct,
    maps::{CONNTRACK_TCP, CONNTRACK_UDP, CtMap, NORTH_SOUTH},
    metrics::count,
    nat::{self, End},
    parse::Packet,
    reply_filter,
};

/// The verdict for `packet` when it is a reply of a flow from outside
/// (translated), `None` otherwise.
#[inline(always)]
pub fn reply(ctx: &TcContext, packet: &Packet) -> Option<i32> {
    if packet.is_later_fragment() || !reply_filter::may_be_reply(packet) || !serving() {
        return None;
    }
    if packet.protocol == IPPROTO_TCP {
        translate(ctx, packet, &CONNTRACK_TCP)
    } else {
        translate(ctx, packet, &CONNTRACK_UDP)
    }
}

/// Whether this node serves anything from outside: an east-west
/// backend's replies, flagged too, then skip the lookup.
#[inline(always)]
fn serving() -> bool {
    NORTH_SOUTH
        .get(0)
        .is_some_and(|config| config.maglev_table_size != 0)
}

#[inline(always)]
fn translate(ctx: &TcContext, packet: &Packet, table: &CtMap) -> Option<i32> {
    let flow = table.get_ptr_mut(ct::reply_key(packet))?;
    // SAFETY: a pointer into the map value, valid for this program run.
    let flow = unsafe { &mut *flow };
    let now = ct::now();
    if flow.l2_mode != L2_UPLINK_LOCAL || ct::is_expired(flow, packet.protocol, now) {
        return None;
    }
    let state = conntrack::next_state(
        flow.state,
        packet.protocol,
        packet.tcp_flags,
        Direction::Reply,
    );
    if ct::needs_write(flow, state, now) {
        ct::record(flow, state, now);
        let service = ct::service_key(
            packet.daddr_be,
            packet.dport_be,
            flow.service_address_be,
            flow.service_port_be,
            packet.protocol,
        );
        let _ = ct::mirror(table, &service, state, now);
    }
    if nat::rewrite(
        ctx,
        packet,
        End::Source,
        flow.service_address_be,
        flow.service_port_be,
    )
    .is_err()
    {
        count(Counter::Error);
        return Some(TC_ACT_SHOT);
    }
    count(Counter::NorthSouthReverseTranslated);
    Some(TC_ACT_UNSPEC)
}
