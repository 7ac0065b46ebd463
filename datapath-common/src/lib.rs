//! Everything both sides of underpass must agree on: the layout of every BPF
//! map key and value, and the pure logic (checksums, backend selection,
//! conntrack lifetimes) that the eBPF programs run and user space tests.
//!
//! Byte order is part of every name: a field ending in `_be` holds network
//! byte order bytes read as a native integer (`u32::from_ne_bytes(octets)`),
//! exactly what the packet and `bpf_sock_addr` carry, so the datapath never
//! swaps bytes. Fields without the suffix are host order.
#![no_std]

#[cfg(test)]
extern crate std;

pub mod affinity;
pub mod conntrack;
pub mod csum;
pub mod features;
pub mod ipv6;
pub mod lb;
pub mod maglev;
pub mod maps;
pub mod metrics;
pub mod reject;
pub mod skb_checksum;
pub mod sock_lb;

/// The TC egress program's jump table (`TC_JUMPS`, a program array):
/// IPv6 packets continue in their own program, by a tail call, with a
/// stack of their own (the IPv4 path's frame leaves no room for theirs
/// beside it) and nothing added to the IPv4 path.
pub mod jumps {
    /// The map's name in the object (not one of `maps::ALL_MAPS`: made
    /// with each load and pinned beside the programs it holds).
    pub const TC_JUMPS_MAP: &str = "TC_JUMPS";
    /// Slot of the IPv6 egress program (`up_tc_egress6`).
    pub const EGRESS6: u32 = 0;
    /// Slot of the IPv6 ingress program (`up_tc_ingress6`).
    pub const INGRESS6: u32 = 1;
    /// Slot of the IPv6 refusal (`up_tc_refuse6`), entered from
    /// `up_tc_egress6`: the refusal's frame does not fit beside the
    /// translation's in one 512-byte stack.
    pub const REFUSE6: u32 = 2;
    /// Slot of the IPv6 new-flow program (`up_tc_new_flow6`), entered from
    /// `up_tc_egress6` on a conntrack miss: the new flow's frame (service
    /// lookup, backend pick, two entries) gets a stack of its own, so the
    /// per-packet path keeps room.
    pub const NEW_FLOW6: u32 = 3;
    /// Slot of the ICMPv6 error translation on ingress
    /// (`up_tc_icmp6_ingress`), entered from `up_tc_ingress6` for ICMPv6
    /// errors only: neither the per-packet path nor NDP pays for it.
    pub const ICMP6_INGRESS: u32 = 4;
    /// Slot of its egress twin (`up_tc_icmp6_egress`), entered from
    /// `up_tc_egress6`.
    pub const ICMP6_EGRESS: u32 = 5;
    /// Slot of the IPv6 egress program for packets with extension
    /// headers or fragments (`up_tc_egress6_ext`), entered from
    /// `up_tc_egress6`: what pods send (the TCP/UDP header right after the
    /// fixed one) keeps the short program.
    pub const EGRESS6_EXT: u32 = 6;
    /// Its ingress twin (`up_tc_ingress6_ext`), entered from
    /// `up_tc_ingress6`.
    pub const INGRESS6_EXT: u32 = 7;
    /// Slot of the IPv6 hairpin (`up_tc_hairpin6`), entered from
    /// `up_tc_egress6` and `up_tc_egress6_ext`: a pod's packet to its own
    /// service that chose the pod itself, and the pod's replies to the
    /// hairpin source, looped back into the pod.
    pub const HAIRPIN6: u32 = 8;
    /// Slot of the IPv6 flows whose client port moved on a tuple clash
    /// (`up_tc_clash6`), entered from `up_tc_egress6`,
    /// `up_tc_egress6_ext` and `up_tc_new_flow6`: the port rewrite does
    /// not fit beside the per-packet frame.
    pub const CLASH6: u32 = 9;
    /// Slot of the IPv6 connections straight to a pod whose wire tuple
    /// clashes with a service flow's (`up_tc_direct6`), entered from the
    /// egress programs for a SYN whose tuple a live service flow holds and
    /// for packets to a destination marked in `CLASH_FILTER`.
    pub const DIRECT6: u32 = 10;
    /// Slots in the table: room to spare, because the table is kept
    /// across builds (a table replaced for its size would be emptied
    /// under the programs still attached to pods). A slot is never
    /// renumbered; a new program takes a new slot.
    pub const SLOTS: u32 = 16;
}

/// IANA protocol numbers used in keys.
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// `skb->cb[0]` of a packet the egress program translated and sent with
/// `bpf_redirect_neigh`, which runs egress again: that second pass leaves
/// the packet alone ("upas").
pub const SKB_CB_REDIRECTED: u32 = 0x7570_6173;

/// `skb->cb[1]` of an IPv6 packet with extension headers whose new flow
/// `up_tc_new_flow6` opened before handing it to `up_tc_egress6_ext` to
/// translate ("upof"): if that program does not find the flow and jumps
/// back, the new-flow program drops the packet instead of opening the
/// flow again (the two would enter each other up to the kernel's
/// tail-call limit).
pub const SKB_CB_FLOW_OPENED: u32 = 0x7570_6f66;

/// Network-order bytes of an IPv4 address as the `_be` fields hold them.
#[inline(always)]
pub const fn ipv4_be(octets: [u8; 4]) -> u32 {
    u32::from_ne_bytes(octets)
}

/// The source a pod's packet to its own service gets on the TC path when
/// the pod itself is the backend chosen (hairpin): link-local, so never
/// routed off the host; the address Cilium uses for the same purpose.
pub const HAIRPIN_SOURCE_BE: u32 = ipv4_be([169, 254, 42, 1]);

/// The same over IPv6: `100::a9fe:2a01`, from the discard-only prefix
/// 100::/64 (RFC 6666: any router drops a leak), its low 32 bits spelling
/// 169.254.42.1. Not link-local: fe80::/64 is on-link, so the pod's
/// replies would wait for a neighbour that never answers instead of
/// taking its default route to the egress program, which loops them back.
pub const HAIRPIN_SOURCE6_BE: maps::Ipv6Words = [
    ipv4_be([0x01, 0x00, 0, 0]),
    0,
    0,
    ipv4_be([169, 254, 42, 1]),
];

/// The octets of a `_be` address field.
#[inline(always)]
pub const fn ipv4_octets(address_be: u32) -> [u8; 4] {
    address_be.to_ne_bytes()
}

/// A host-order port as the `_be` fields hold it.
#[inline(always)]
pub const fn port_be(port: u16) -> u16 {
    u16::from_ne_bytes(port.to_be_bytes())
}

/// The host-order value of a `_be` port field.
#[inline(always)]
pub const fn port_host(port_be: u16) -> u16 {
    u16::from_be_bytes(port_be.to_ne_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_order_helpers_round_trip_and_match_the_wire() {
        assert_eq!(ipv4_octets(ipv4_be([10, 96, 0, 1])), [10, 96, 0, 1]);
        assert_eq!(port_host(port_be(8080)), 8080);
        assert_eq!(port_be(0x1234).to_ne_bytes(), [0x12, 0x34]);
    }
}
