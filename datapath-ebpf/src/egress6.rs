//! TC egress for IPv6. The TC path does not translate IPv6 yet (socket-LB
//! does, `crate::sock`): a packet to an IPv6 frontend reaches TC only
//! from a process socket-LB leaves alone (`--socket-lb host`, a pod
//! opted out) or a socket connected before its service was programmed.
//! Untranslated it would leave the pod for a ClusterIP nothing answers
//! (or a router sends wherever), so it is refused at once with an ICMPv6
//! port unreachable, as a service without endpoints is (`crate::reject`):
//! the socket fails with ECONNREFUSED instead of hanging. Everything else
//! passes untouched after one array read (the `SERVICE_FILTER` bucket).

use aya_ebpf::{bindings::TC_ACT_UNSPEC, programs::TcContext};
use datapath_common::{lb, maps::ServiceKey6, metrics::Counter};

use crate::{
    maps::{SERVICE_FILTER, SERVICES6, TC_JUMPS},
    metrics::count,
    parse6, reject,
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
        return TC_ACT_UNSPEC;
    };
    if packet.later_fragment {
        // Its first fragment was refused (or was not for a service).
        return TC_ACT_UNSPEC;
    }
    let bucket = lb::service_filter_index6(packet.daddr_be, packet.dport_be, packet.protocol);
    if !SERVICE_FILTER.get(bucket).is_some_and(|&n| n > 0) {
        return TC_ACT_UNSPEC;
    }
    let key = ServiceKey6::new(packet.daddr_be, packet.dport_be, packet.protocol);
    // SAFETY: only tested for presence.
    if unsafe { SERVICES6.get(key) }.is_none() {
        return TC_ACT_UNSPEC;
    }
    count(Counter::Ipv6Refused);
    reject::refuse6(ctx)
}
