//! Which packets arriving on a pod can be replies of a tracked flow.
//!
//! Most of what a pod receives is not a reply from a service backend: its
//! own clients' requests, replies of its direct connections. Each such
//! packet used to pay a conntrack lookup (a hash of the tuple) only to
//! find nothing. The egress program flags the bucket of a flow's peer
//! (the backend, or the pod a moved direct connection goes to) when it
//! opens the flow; a packet whose source bucket is not flagged cannot be
//! a reply and skips the lookup.
//!
//! The programs never clear a flag (a flow's replies may come for as long
//! as it lives, drained backends included), so a bucket costs at most
//! what the lookup cost before. Flags are trusted only once the agent says
//! that every flow in conntrack has its flag (`REPLY_FILTER_COMPLETE`):
//! it rebuilds them from conntrack first (at start, and after replacing
//! another build's programs, whose flows may have none), which also drops
//! the flags of peers no flow names any more.

use datapath_common::maps::{Ipv6Words, REPLY_FILTER_COMPLETE};

use crate::{flags, maps::REPLY_FILTER, parse::Packet, parse6::Packet6};

/// Flags the bucket replies from `peer_be:peer_port_be` fall in. Written
/// only when not yet set: a flagged bucket costs new flows one read.
/// Called after the flow's conntrack entries are written (and before its
/// packet leaves): the agent's rebuild clears every flag, then walks
/// conntrack, so a flag it clears belongs to an entry already there.
#[inline(always)]
pub fn mark(peer_be: u32, peer_port_be: u16, protocol: u8) {
    flags::set(&REPLY_FILTER, peer_be, peer_port_be, protocol);
}

/// [`mark`] for an IPv6 peer (one array for both families).
#[inline(always)]
pub fn mark6(peer_be: Ipv6Words, peer_port_be: u16, protocol: u8) {
    flags::set6(&REPLY_FILTER, peer_be, peer_port_be, protocol);
}

/// False when `packet` (arriving on a pod) cannot be the reply of a
/// tracked flow: its source's bucket is not flagged and the flags are
/// complete.
#[inline(always)]
pub fn may_be_reply(packet: &Packet) -> bool {
    flags::is_set(
        &REPLY_FILTER,
        packet.saddr_be,
        packet.sport_be,
        packet.protocol,
    ) || !flags_complete()
}

/// [`may_be_reply`] for an IPv6 packet.
#[inline(always)]
pub fn may_be_reply6(packet: &Packet6) -> bool {
    flags::is_set6(
        &REPLY_FILTER,
        packet.saddr_be,
        packet.sport_be,
        packet.protocol,
    ) || !flags_complete()
}

#[inline(always)]
fn flags_complete() -> bool {
    REPLY_FILTER
        .get(REPLY_FILTER_COMPLETE)
        .is_some_and(|&complete| complete != 0)
}
