//! Backends behind another interface of the pod. Underlay pods often also
//! have a veth to their node (Spiderpool's coordinator adds one, with host
//! routes), and some backends are only reachable that way: host-network
//! endpoints on the pod's own node, veth-based pods. The egress program
//! runs after the kernel routed the packet for the ClusterIP; once it is
//! DNATed, the route to the backend may leave by another interface. The
//! agent copies each attached pod's routing table into `POD_ROUTES` under
//! the pod's network namespace cookie; a new flow looks its backend up
//! there (longest prefix, as the pod's routing would) and remembers the
//! interface. Replies arrive on that interface, where the agent attaches
//! the ingress program too.

use core::ffi::c_void;

use aya_ebpf::{helpers::bpf_get_netns_cookie, maps::lpm_trie::Key, programs::TcContext};
use datapath_common::{
    features::NETNS_COOKIE_TC,
    maps::{Ipv6Words, POD_ROUTE_COOKIE_BITS, PodRouteKey, PodRouteKey6},
};

use crate::{
    features,
    maps::{POD_ROUTES, POD_ROUTES6},
};

/// The interface the pod's route to `address_be` leaves by, when it is not
/// `here` (0: here, or no route known).
#[inline(always)]
pub fn other_interface(ctx: &TcContext, address_be: u32, here: u32) -> u32 {
    if !features::has(NETNS_COOKIE_TC) {
        // No pod routes without the netns cookie: the interface it is on.
        return 0;
    }
    // SAFETY: plain helper call on the program's own skb.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.skb.skb as *mut c_void) };
    let key = Key::new(
        POD_ROUTE_COOKIE_BITS + 32,
        PodRouteKey {
            netns_cookie,
            address_be,
            _pad: 0,
        },
    );
    match POD_ROUTES.get(&key) {
        Some(&ifindex) if ifindex != here => ifindex,
        _ => 0,
    }
}

/// [`other_interface`] for an IPv6 backend (`POD_ROUTES6`). Not inlined:
/// a BPF-to-BPF call with a frame of its own for the 28-byte trie key,
/// which the IPv6 new-flow program has no room for (no tail call is made
/// from here, so the call may sit under a frame of any size).
#[inline(never)]
pub fn other_interface6(skb: *mut c_void, address_be: &Ipv6Words, here: u32) -> u32 {
    if !features::has(NETNS_COOKIE_TC) {
        return 0;
    }
    // SAFETY: plain helper call on the program's own skb.
    let netns_cookie = unsafe { bpf_get_netns_cookie(skb) };
    let key = Key::new(
        POD_ROUTE_COOKIE_BITS + 128,
        PodRouteKey6 {
            netns_cookie,
            address_be: *address_be,
        },
    );
    match POD_ROUTES6.get(&key) {
        Some(&ifindex) if ifindex != here => ifindex,
        _ => 0,
    }
}
