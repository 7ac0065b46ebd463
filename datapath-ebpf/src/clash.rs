//! Tuple clashes. Linux reuses an ephemeral port for different
//! destinations, and services share backends, so two flows can end up
//! with one wire tuple (client, port, backend, port): two service flows to
//! one backend (two Services, or two ports, with one target), or a service
//! flow and a connection the pod opened straight to that backend. Their
//! replies could not be told apart. As netfilter's NAT does, the flow that
//! comes second gets another source port (conntrack remembers it, replies
//! get the client's own port back) and the clash is counted.
//!
//! A new service flow checks the wire tuple against conntrack and against
//! the pod's own sockets (`bpf_skc_lookup_tcp`/`bpf_sk_lookup_udp`). A
//! connection straight to a pod is not tracked, so it is caught at its
//! SYN, which already looks its wire tuple up in conntrack; if a live
//! service flow holds it, that connection is tracked from then on with a
//! moved source port, and its destination is flagged in `CLASH_FILTER` so
//! that its later packets find their entry. Only SYNs and new flows pay
//! for any of this; a packet to an unmarked destination pays one array
//! read.

use core::{ffi::c_void, mem::size_of};

use aya_ebpf::{
    bindings::{BPF_F_CURRENT_NETNS, bpf_sock, bpf_sock_tuple},
    helpers::{bpf_get_prandom_u32, bpf_sk_lookup_udp, bpf_sk_release, bpf_skc_lookup_tcp},
    programs::TcContext,
};
use datapath_common::{
    IPPROTO_TCP,
    conntrack::{self, Tracked},
    lb,
};

use crate::{
    ct, flags,
    maps::{CLASH_FILTER, CtMap},
};

/// `BPF_TCP_LISTEN`: a listening socket holds no tuple.
const TCP_LISTEN: u32 = 10;
/// `BPF_TCP_ESTABLISHED`: a connected UDP socket's state.
const ESTABLISHED: u32 = 1;
/// Random ports tried before giving up (and keeping the clash).
const TRIES: usize = 4;

/// A flow's tuple as it would leave on the wire, oriented from the client.
#[derive(Clone, Copy)]
pub struct WireTuple {
    pub client_be: u32,
    pub port_be: u16,
    pub peer_be: u32,
    pub peer_port_be: u16,
    pub protocol: u8,
    /// The ClusterIP and port of a service flow (zero for a connection
    /// straight to a pod): a backend-tuple entry for this very frontend
    /// and the client's own port is this flow's, re-balanced onto the same
    /// backend (its service-tuple entry was evicted, or the service
    /// re-created), not a clash.
    pub frontend_be: u32,
    pub frontend_port_be: u16,
}

/// True when a live flow in `table` holds `tuple`, or a socket of the pod
/// is connected with it.
#[inline(always)]
fn taken(ctx: &TcContext, table: &CtMap, tuple: &WireTuple, now: u64) -> bool {
    let key = ct::backend_key(
        tuple.client_be,
        tuple.port_be,
        tuple.peer_be,
        tuple.peer_port_be,
        tuple.protocol,
    );
    // SAFETY: copied out at once.
    if let Some(held) = unsafe { table.get(key) }.copied()
        && held_by_live_flow(&held, tuple.protocol, now)
        && !(tuple.frontend_be != 0
            && held.nat_port_be == 0
            && held.service_address_be == tuple.frontend_be
            && held.service_port_be == tuple.frontend_port_be)
    {
        return true;
    }
    socket_holds(ctx, tuple)
}

/// A backend-tuple entry still in use: not expired, and (TCP) not over.
#[inline(always)]
pub fn held_by_live_flow(entry: &impl Tracked, protocol: u8, now: u64) -> bool {
    // A half-closed stream still carries data: only a RST or both FINs
    // free the tuple.
    !ct::is_expired(entry, protocol, now)
        && (protocol != IPPROTO_TCP || !conntrack::is_closed(entry.state()))
}

/// True when a socket in the pod's namespace is connected with `tuple`.
#[inline(always)]
fn socket_holds(ctx: &TcContext, tuple: &WireTuple) -> bool {
    // SAFETY: an all-zero tuple is valid; the ipv4 member is written next.
    let mut lookup: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    // As a packet from the peer to the client would carry it.
    lookup.__bindgen_anon_1.ipv4.saddr = tuple.peer_be;
    lookup.__bindgen_anon_1.ipv4.daddr = tuple.client_be;
    lookup.__bindgen_anon_1.ipv4.sport = tuple.peer_port_be;
    lookup.__bindgen_anon_1.ipv4.dport = tuple.port_be;
    let size = (size_of::<u32>() * 2 + size_of::<u16>() * 2) as u32;
    let netns = BPF_F_CURRENT_NETNS as u64;
    let skb = ctx.skb.skb as *mut c_void;
    // SAFETY: helper calls with a tuple on our stack; every socket found
    // is released below.
    let sock: *mut bpf_sock = unsafe {
        if tuple.protocol == IPPROTO_TCP {
            bpf_skc_lookup_tcp(skb, &mut lookup, size, netns, 0)
        } else {
            bpf_sk_lookup_udp(skb, &mut lookup, size, netns, 0)
        }
    };
    if sock.is_null() {
        return false;
    }
    // SAFETY: a socket the helper returned, read before release.
    let (state, dst, dst_port) = unsafe { ((*sock).state, (*sock).dst_ip4, (*sock).dst_port) };
    // SAFETY: releases the reference the lookup took.
    unsafe { bpf_sk_release(sock as *mut c_void) };
    let connected = if tuple.protocol == IPPROTO_TCP {
        state != TCP_LISTEN
    } else {
        state == ESTABLISHED
    };
    connected && dst == tuple.peer_be && dst_port == tuple.peer_port_be
}

/// The source port a new flow should use on the wire: the client's own
/// (`tuple.port_be`), or, when that tuple is taken, a free one (`None`:
/// none found, the client's own is used and the clash stays).
#[inline(always)]
pub fn wire_port(ctx: &TcContext, table: &CtMap, tuple: WireTuple, now: u64) -> Option<u16> {
    if !taken(ctx, table, &tuple, now) {
        return Some(tuple.port_be);
    }
    free_port(ctx, table, tuple, now)
}

/// A random source port for `tuple` that nothing holds.
#[inline(always)]
pub fn free_port(ctx: &TcContext, table: &CtMap, mut tuple: WireTuple, now: u64) -> Option<u16> {
    // An entry under a random port is another flow's (its own port),
    // never this one's re-balanced: no exception for the frontend.
    tuple.frontend_be = 0;
    tuple.frontend_port_be = 0;
    for _ in 0..TRIES {
        // SAFETY: plain helper call.
        tuple.port_be = datapath_common::port_be(lb::clash_port(unsafe { bpf_get_prandom_u32() }));
        if !taken(ctx, table, &tuple, now) {
            return Some(tuple.port_be);
        }
    }
    None
}

/// Marks `destination` as having tracked connections straight to it
/// (source port moved): its packets look their flow up from now on.
#[inline(always)]
pub fn mark(address_be: u32, port_be: u16, protocol: u8) {
    flags::set(&CLASH_FILTER, address_be, port_be, protocol);
}

/// True when connections straight to `destination` may be tracked.
#[inline(always)]
pub fn marked(address_be: u32, port_be: u16, protocol: u8) -> bool {
    flags::is_set(&CLASH_FILTER, address_be, port_be, protocol)
}
