//! TC ingress on the pod interface: replies from a backend get their
//! source rewritten back to the service address, from the flow's
//! backend-tuple conntrack entry. Packets of untracked (or expired) flows
//! pass untouched.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT, TC_ACT_UNSPEC},
    programs::TcContext,
};
use datapath_common::{
    conntrack::{self, Direction},
    maps::L2_REWRITE,
    metrics::Counter,
};

use crate::{
    ct, l2,
    maps::CONNTRACK,
    metrics::count,
    nat::{self, End},
    parse,
};

pub fn run(ctx: &TcContext) -> i32 {
    let Some(packet) = parse::ipv4_l4(ctx) else {
        return TC_ACT_UNSPEC;
    };
    let Some(flow) = CONNTRACK.get_ptr_mut(ct::reply_key(&packet)) else {
        return TC_ACT_UNSPEC;
    };
    // SAFETY: a pointer into the map value, valid for this program run.
    let flow = unsafe { &mut *flow };
    let now = ct::now();
    if ct::is_expired(flow, packet.protocol, now) {
        return TC_ACT_UNSPEC;
    }
    let state = conntrack::next_state(
        flow.state,
        packet.protocol,
        packet.tcp_flags,
        Direction::Reply,
    );
    // `l2_mode` of a backend-tuple entry records whether the service-tuple
    // entry has learned this flow's L2 addresses yet.
    if ct::needs_write(flow, state, now) || flow.l2_mode != L2_REWRITE {
        flow.state = state;
        flow.last_seen = now;
        flow.l2_mode = L2_REWRITE;
        let service = ct::service_key(
            packet.daddr_be,
            packet.dport_be,
            flow.service_address_be,
            flow.service_port_be,
            packet.protocol,
        );
        if let Some(forward) = CONNTRACK.get_ptr_mut(service) {
            // SAFETY: a pointer into the map value, valid for this program run.
            let forward = unsafe { &mut *forward };
            forward.state |= state;
            forward.last_seen = now;
            l2::learn_from_reply(ctx, forward);
        }
    }
    if nat::rewrite(
        ctx,
        &packet,
        End::Source,
        flow.service_address_be,
        flow.service_port_be,
    )
    .is_err()
    {
        count(Counter::Error);
        return TC_ACT_SHOT;
    }
    count(Counter::ReverseTranslated);
    TC_ACT_OK
}
