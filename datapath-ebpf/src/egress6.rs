//! TC egress for IPv6. The TC path does not translate IPv6 yet (socket-LB
//! does, `crate::sock`): a packet to an IPv6 frontend reaches TC only
//! from a process socket-LB leaves alone (`--socket-lb host`, a pod
//! opted out) or a socket connected before its service was programmed.
//! Untranslated it would leave the pod for a ClusterIP nothing answers
//! (or a router sends wherever), so the packet that opens a flow (a TCP
//! SYN, a UDP datagram) is refused at once with an ICMPv6 port
//! unreachable, as a service without endpoints is (`crate::reject`): the
//! socket fails with ECONNREFUSED instead of hanging. Only packets whose
//! TCP or UDP header follows the fixed header: the refusal quotes 48
//! bytes, and the kernel finds the socket by the ports in the quote (a
//! packet with extension headers or a fragment header passes, as every
//! other IPv6 packet does, untouched after one array read).

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    programs::TcContext,
};
use datapath_common::{
    IPPROTO_TCP,
    conntrack::{TCP_ACK, TCP_SYN},
    lb,
    maps::ServiceKey6,
    metrics::Counter,
};

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
    let opens_flow =
        packet.protocol != IPPROTO_TCP || packet.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    if packet.later_fragment || !packet.plain || !opens_flow {
        // Not one the refusal could name the socket of, or one of a flow
        // already open (its first packet was refused, or it predates the
        // frontend): left as it is.
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
    let verdict = reject::refuse6(ctx);
    count(if verdict == TC_ACT_SHOT {
        // The packet could not be rewritten (dropped): said as an error.
        Counter::Error
    } else {
        Counter::Ipv6Refused
    });
    verdict
}
