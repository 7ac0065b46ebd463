//! Tuple clashes over IPv6 (`crate::clash`'s twin, its rules and reasons):
//! the flow that comes second onto a wire tuple (client, port, backend,
//! port) another live flow or a socket of the pod holds gets another
//! source port, remembered in conntrack (`nat_port_be`); replies get the
//! client's own port back (`crate::ingress6`, `crate::hairpin6`,
//! `crate::icmp6`).
//!
//! The IPv6 per-packet program has no stack left for a port rewrite
//! (`docs/ipv6-plan.md`, stack figures), so a service flow whose port
//! moved is translated in `up_tc_clash6`, a program of its own entered by
//! a tail call: from the hit path (one compare sends it here) and from
//! `up_tc_new_flow6` right after it opened the flow with a moved port (the
//! check, `taken`/`free_port`, runs there, before the entries are
//! written). Connections straight to a pod that clash are
//! `crate::direct6`'s.

use core::{ffi::c_void, mem::size_of, ptr::read_volatile};

use aya_ebpf::{
    bindings::{
        BPF_F_CURRENT_NETNS, TC_ACT_SHOT, TC_ACT_UNSPEC, bpf_sock_tuple,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2 as SockTuple6,
    },
    helpers::{bpf_get_prandom_u32, bpf_sk_lookup_udp, bpf_sk_release, bpf_skc_lookup_tcp},
    programs::TcContext,
};
use datapath_common::{
    IPPROTO_TCP,
    conntrack::{self, Direction},
    lb,
    maps::{CtEntry6, CtKey6, Ipv6Words, L2_HAIRPIN, L2_UNRESOLVED},
    metrics::Counter,
};

use crate::{
    clash, ct, ct6, flags, frag6, hairpin6, l2,
    maps::{CLASH_FILTER, CONNTRACK6_TCP, CONNTRACK6_UDP, CtMap6, TC_JUMPS},
    metrics::{count, count_service},
    nat::End,
    nat6,
    parse6::{self, Packet6},
    reply_filter,
};

/// `BPF_TCP_LISTEN`: a listening socket holds no tuple.
const TCP_LISTEN: u32 = 10;
/// `BPF_TCP_ESTABLISHED`: a connected UDP socket's state.
const ESTABLISHED: u32 = 1;
/// Random ports tried before giving up (and keeping the clash).
const TRIES: usize = 4;

/// Continues in `up_tc_clash6` a packet that must have its port moved.
/// Without the jump it is dropped: sent on, it would leave with the
/// clashing tuple (or untranslated).
#[inline(always)]
pub fn jump(ctx: &TcContext) -> i32 {
    // SAFETY: a tail call on the program's own context; on success it
    // does not return.
    unsafe { TC_JUMPS.tail_call(ctx, datapath_common::jumps::CLASH6) };
    count(Counter::Error);
    TC_ACT_SHOT
}

/// True when connections straight to `packet`'s destination may be
/// tracked with a moved port (its `CLASH_FILTER` bucket is set).
#[inline(always)]
pub fn marked(packet: &Packet6) -> bool {
    flags::is_set6(
        &CLASH_FILTER,
        packet.daddr_be,
        packet.dport_be,
        packet.protocol,
    )
}

/// Makes `key` (a new flow's backend-tuple key, the client as on the
/// wire) this flow's alone: when a live flow or a socket of the pod holds
/// its wire tuple (`taken`), its client port becomes a random one nothing
/// holds. True when the port moved; false when it was free, or when no
/// free one was found in a few tries (then the port is as it was and the
/// clash stays, counted as an error).
#[inline(always)]
pub fn claim(
    ctx: &TcContext,
    key: &mut CtKey6,
    frontend_be: &Ipv6Words,
    frontend_port_be: u16,
    now: u64,
) -> bool {
    let skb = ctx.skb.skb as *mut c_void;
    if !taken(skb, key, frontend_be, frontend_port_be, now) {
        return false;
    }
    let own = key.client_port_be;
    for _ in 0..TRIES {
        // SAFETY: plain helper call.
        key.client_port_be =
            datapath_common::port_be(lb::clash_port(unsafe { bpf_get_prandom_u32() }));
        // No exception for this frontend here: an entry under a random
        // port is another flow's (its own port), never this one's.
        if !taken(skb, key, &[0; 4], 0, now) {
            return true;
        }
    }
    key.client_port_be = own;
    count(Counter::Error);
    false
}

/// True when a live flow holds `key`'s wire tuple, or a socket of the pod
/// is connected with it. With the client's own port, a backend-tuple
/// entry for this very frontend (`frontend_be:frontend_port_be`; port 0:
/// no such exception, for a connection straight to a pod and for the
/// random ports tried) that moved nothing is this flow's, re-balanced
/// onto the same backend: not a clash.
///
/// Not inlined, and nothing on its own stack but spills: a BPF-to-BPF
/// call adds its frame to the caller's, and the programs calling it
/// (`up_tc_new_flow6`, `up_tc_direct6`) have ~100 bytes left of 512. So
/// the socket tuple is `key` itself, rearranged in place (`as_socket_tuple`)
/// and put back. No tail call is made from here, so the call may sit
/// under a frame of any size.
#[inline(never)]
fn taken(
    skb: *mut c_void,
    key: &mut CtKey6,
    frontend_be: &Ipv6Words,
    frontend_port_be: u16,
    now: u64,
) -> bool {
    let table = if key.protocol == IPPROTO_TCP {
        &CONNTRACK6_TCP
    } else {
        &CONNTRACK6_UDP
    };
    // SAFETY: fields read at once, before any other map call. By
    // reference: a copy of the key would take 40 bytes of a frame that
    // must stay small.
    #[allow(clippy::needless_borrows_for_generic_args)]
    let held = unsafe { table.get(&*key) }.is_some_and(|held| {
        clash::held_by_live_flow(held, key.protocol, now)
            && !(frontend_port_be != 0
                && held.nat_port_be == 0
                && held.service_port_be == frontend_port_be
                && hairpin6::same_address(&held.service_address_be, frontend_be))
    });
    held || socket_holds(skb, key)
}

/// Swaps `key`'s two ends: a backend-tuple key (client, peer, client
/// port, peer port) becomes the ipv6 member of a `bpf_sock_tuple` as a
/// packet from the peer to the client carries it (source, destination,
/// source port, destination port — the same offsets, asserted below),
/// and back again.
#[inline(always)]
fn swap_ends(key: &mut CtKey6) {
    for word in 0..4 {
        core::mem::swap(
            &mut key.client_address_be[word],
            &mut key.peer_address_be[word],
        );
    }
    core::mem::swap(&mut key.client_port_be, &mut key.peer_port_be);
}

const _: () = {
    use core::mem::offset_of;
    assert!(offset_of!(CtKey6, client_address_be) == offset_of!(SockTuple6, saddr));
    assert!(offset_of!(CtKey6, peer_address_be) == offset_of!(SockTuple6, daddr));
    assert!(offset_of!(CtKey6, client_port_be) == offset_of!(SockTuple6, sport));
    assert!(offset_of!(CtKey6, peer_port_be) == offset_of!(SockTuple6, dport));
    assert!(size_of::<SockTuple6>() <= size_of::<CtKey6>());
};

/// True when a socket in the pod's namespace is connected with `key`'s
/// wire tuple.
#[inline(always)]
fn socket_holds(skb: *mut c_void, key: &mut CtKey6) -> bool {
    let protocol = key.protocol;
    swap_ends(key);
    let tuple = (key as *mut CtKey6).cast::<bpf_sock_tuple>();
    let size = size_of::<SockTuple6>() as u32;
    let netns = BPF_F_CURRENT_NETNS as u64;
    // Each branch reads its own socket's fields: the two helpers return
    // different pointer types (a `sock_common`, a full socket), and one
    // load instruction shared by both (what LLVM makes of a common tail)
    // is refused by the verifier ("same insn cannot be used with
    // different pointers"). Volatile reads are not merged.
    if protocol == IPPROTO_TCP {
        // SAFETY: `size` bytes of `key` are the tuple (the layout asserted
        // above); the socket found is released before returning.
        let sock = unsafe { bpf_skc_lookup_tcp(skb, tuple, size, netns, 0) };
        swap_ends(key);
        if sock.is_null() {
            return false;
        }
        // SAFETY: a socket the helper returned, read before release.
        // Word by word: the verifier takes this field in 4-byte reads only.
        let (state, dst, dst_port) = unsafe {
            (
                read_volatile(&(*sock).state),
                [
                    read_volatile(&(*sock).dst_ip6[0]),
                    read_volatile(&(*sock).dst_ip6[1]),
                    read_volatile(&(*sock).dst_ip6[2]),
                    read_volatile(&(*sock).dst_ip6[3]),
                ],
                read_volatile(&(*sock).dst_port),
            )
        };
        // SAFETY: releases the reference the lookup took.
        unsafe { bpf_sk_release(sock as *mut c_void) };
        // A listening socket holds no tuple.
        state != TCP_LISTEN && holds(key, dst, dst_port)
    } else {
        // SAFETY: as for TCP.
        let sock = unsafe { bpf_sk_lookup_udp(skb, tuple, size, netns, 0) };
        swap_ends(key);
        if sock.is_null() {
            return false;
        }
        // SAFETY: a socket the helper returned, read before release,
        // word by word as for TCP (in another order: not merged).
        let (dst_port, dst, state) = unsafe {
            (
                read_volatile(&(*sock).dst_port),
                [
                    read_volatile(&(*sock).dst_ip6[0]),
                    read_volatile(&(*sock).dst_ip6[1]),
                    read_volatile(&(*sock).dst_ip6[2]),
                    read_volatile(&(*sock).dst_ip6[3]),
                ],
                read_volatile(&(*sock).state),
            )
        };
        // SAFETY: releases the reference the lookup took.
        unsafe { bpf_sk_release(sock as *mut c_void) };
        // Only a connected UDP socket holds a tuple.
        state == ESTABLISHED && holds(key, dst, dst_port)
    }
}

/// True when a socket connected to `dst:dst_port` holds `key`'s tuple
/// (the lookup matched its local end).
#[inline(always)]
fn holds(key: &CtKey6, dst: Ipv6Words, dst_port: u16) -> bool {
    dst_port == key.peer_port_be && hairpin6::same_address(&dst, &key.peer_address_be)
}

/// `up_tc_clash6`: a packet of a tracked service flow whose client port
/// was moved (the egress hit path sends it here, and the new-flow program
/// right after opening it).
#[inline(always)]
pub fn run(ctx: &TcContext) -> i32 {
    let Some(packet) = parse6::ipv6_l4(ctx) else {
        count(Counter::Error);
        return TC_ACT_SHOT;
    };
    if packet.later_fragment {
        // Never sent here: a later fragment has no port to move.
        return TC_ACT_UNSPEC;
    }
    // One call site per table: the verifier then inlines each lookup.
    if packet.protocol == IPPROTO_TCP {
        by_flow(ctx, &packet, &CONNTRACK6_TCP)
    } else {
        by_flow(ctx, &packet, &CONNTRACK6_UDP)
    }
}

#[inline(always)]
fn by_flow(ctx: &TcContext, packet: &Packet6, table: &CtMap6) -> i32 {
    let now = ct::now();
    if let Some(flow) = table.get_ptr_mut(ct6::packet_service_key(packet)) {
        // SAFETY: a pointer into the map value, valid for this program run.
        let flow = unsafe { &mut *flow };
        if flow.rev_nat_id() != 0 && flow.nat_port_be != 0 {
            return service_flow(ctx, packet, table, flow, now);
        }
    }
    // Its entries were not written (or it ended since the egress
    // program's look): dropped, never sent on untranslated; the client
    // retransmits and opens a flow afresh.
    count(Counter::Error);
    TC_ACT_SHOT
}

/// A packet of a tracked service flow whose client port was moved: the
/// egress hit path with the port rewritten too.
#[inline(always)]
fn service_flow(
    ctx: &TcContext,
    packet: &Packet6,
    table: &CtMap6,
    flow: &mut CtEntry6,
    now: u64,
) -> i32 {
    let Some(backend) = ct6::tracked_backend(flow, packet, now) else {
        // Ended between the egress program's look and this one.
        count(Counter::Error);
        return TC_ACT_SHOT;
    };
    count(Counter::ConntrackHit);
    count_service(flow.rev_nat_id(), 1, 0);
    let state = conntrack::next_state(
        flow.state,
        packet.protocol,
        packet.tcp_flags,
        Direction::Original,
    );
    if ct::needs_write(flow, state, now) {
        ct::record(flow, state, now);
        let mut reply = ct6::backend_key(
            packet.saddr_be,
            flow.nat_port_be,
            backend.0,
            backend.1,
            packet.protocol,
        );
        hairpin6::key_reply_client(&mut reply);
        if !ct::mirror(table, &reply, state, now) {
            // Evicted: without it the replies would not be
            // reverse-translated.
            let back = CtEntry6 {
                service_address_be: packet.daddr_be,
                service_port_be: packet.dport_be,
                l2_mode: L2_UNRESOLVED,
                nat_port_be: packet.sport_be,
                ..*flow
            };
            let _ = ct::insert(table, &reply, &back);
        }
        // After the entry (`crate::reply_filter`).
        reply_filter::mark6(backend.0, backend.1, packet.protocol);
    }
    if nat6::rewrite(ctx, packet, End::Destination, backend.0, backend.1).is_err()
        || nat6::rewrite_port(ctx, packet, End::Source, flow.nat_port_be).is_err()
    {
        count(Counter::Error);
        return TC_ACT_SHOT;
    }
    frag6::translated(ctx, packet);
    if flow.l2_mode == L2_HAIRPIN {
        // To the pod itself, from the moved port (`crate::hairpin6`
        // keeps the source port it finds).
        return hairpin6::jump(ctx);
    }
    l2::forward(ctx, flow, now)
}
