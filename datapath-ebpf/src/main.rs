//! underpass eBPF object. Entry points stay thin; each concern lives in its
//! own module (parse, ct, nat, l2, metrics, events, sock) and the pure logic in
//! `datapath_common`. Program names are `datapath_common::programs::*`.
#![no_std]
#![no_main]
// Inline asm for the one kfunc call (`kernel_skb`).
#![feature(asm_experimental_arch)]
// Atomic OR and compare-and-swap on map values (`atomic`), which the BPF
// target's `core::sync::atomic` lacks.
#![feature(core_intrinsics)]
#![allow(internal_features, reason = "core_intrinsics: see `atomic`")]

mod affinity;
mod atomic;
mod backends;
mod clash;
mod clash6;
mod ct;
mod ct6;
mod direct6;
mod egress;
mod egress6;
mod events;
mod features;
mod flags;
mod frag;
mod frag6;
mod hairpin;
mod hairpin6;
mod icmp;
mod icmp6;
mod ingress;
mod ingress6;
mod kernel_skb;
mod l2;
mod maglev;
mod maps;
mod metrics;
mod nat;
mod nat6;
mod parse;
mod parse6;
mod reject;
mod reply_filter;
mod route;
mod sock;
mod uplink;
mod uplink_frame;
mod uplink_icmp;
mod uplink_reply;
mod uplink_snat;

use aya_ebpf::{
    macros::{cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, TcContext, XdpContext},
};

/// TC egress on the pod interface: ClusterIP → backend DNAT. Inlined
/// into the entry point the macro makes: a BPF-to-BPF call costs every
/// packet ~10 ns (`bench datapath`, paired).
#[classifier]
#[inline(always)]
pub fn up_tc_egress(ctx: TcContext) -> i32 {
    egress::run(&ctx)
}

/// TC egress for IPv6 packets, entered from `up_tc_egress` by a tail call
/// (`datapath_common::jumps`); never attached itself.
#[classifier]
pub fn up_tc_egress6(ctx: TcContext) -> i32 {
    egress6::run(&ctx)
}

/// IPv6 packets with extension headers or fragments, entered from
/// `up_tc_egress6` by a tail call; never attached itself.
#[classifier]
pub fn up_tc_egress6_ext(ctx: TcContext) -> i32 {
    egress6::extended_run(&ctx)
}

/// The IPv6 hairpin (a pod's flow to itself, looped back), entered from
/// `up_tc_egress6` and `up_tc_egress6_ext` by a tail call; never attached
/// itself.
#[classifier]
pub fn up_tc_hairpin6(ctx: TcContext) -> i32 {
    hairpin6::run(&ctx)
}

/// IPv6 service flows whose client port moved on a tuple clash, entered
/// from `up_tc_egress6`, `up_tc_egress6_ext` and `up_tc_new_flow6` by a
/// tail call; never attached itself.
#[classifier]
pub fn up_tc_clash6(ctx: TcContext) -> i32 {
    clash6::run(&ctx)
}

/// IPv6 connections straight to a pod whose wire tuple clashes with a
/// service flow's, entered from `up_tc_egress6`, `up_tc_egress6_ext` and
/// `up_tc_new_flow6` by a tail call; never attached itself.
#[classifier]
pub fn up_tc_direct6(ctx: TcContext) -> i32 {
    direct6::run(&ctx)
}

/// The IPv6 new flow (service lookup, backend pick, wire tuple claimed,
/// conntrack entries), entered from `up_tc_egress6` by a tail call; never attached itself.
#[classifier]
pub fn up_tc_new_flow6(ctx: TcContext) -> i32 {
    egress6::new_flow_run(&ctx)
}

/// The IPv6 refusal (a reset for a TCP SYN, an ICMPv6 port unreachable
/// for anything else, into the pod), entered
/// from `up_tc_egress6` by a tail call; never attached itself.
#[classifier]
pub fn up_tc_refuse6(ctx: TcContext) -> i32 {
    egress6::refusal(&ctx)
}

/// Replies with extension headers or fragments, entered from
/// `up_tc_ingress6` by a tail call; never attached itself.
#[classifier]
pub fn up_tc_ingress6_ext(ctx: TcContext) -> i32 {
    ingress6::extended_run(&ctx)
}

/// ICMPv6 errors about translated flows, on ingress (turned back to the
/// ClusterIP), entered from `up_tc_ingress6` by a tail call; never
/// attached itself.
#[classifier]
pub fn up_tc_icmp6_ingress(ctx: TcContext) -> i32 {
    icmp6::on_ingress(&ctx)
}

/// Its egress twin (an error about a reply goes to the backend), entered
/// from `up_tc_egress6`.
#[classifier]
pub fn up_tc_icmp6_egress(ctx: TcContext) -> i32 {
    icmp6::on_egress(&ctx)
}

/// TC ingress on the pod interface: backend → ClusterIP reverse NAT.
#[classifier]
pub fn up_tc_ingress(ctx: TcContext) -> i32 {
    ingress::run(&ctx)
}

/// TC ingress for IPv6 packets, entered from `up_tc_ingress` by a tail
/// call (`datapath_common::jumps`); never attached itself.
#[classifier]
pub fn up_tc_ingress6(ctx: TcContext) -> i32 {
    ingress6::run(&ctx)
}

/// Does nothing (returns "next"): the benches attach it first in an
/// interface's TCX chains, to measure on the same packets what the
/// kernel's run-time statistics add to a program's own time (the floor
/// subtracted from our programs' live figures). Never attached by the
/// agent.
#[classifier]
pub fn up_tc_pass(_ctx: TcContext) -> i32 {
    aya_ebpf::bindings::TC_ACT_UNSPEC
}

/// XDP on the node's uplink: traffic from outside to nodePorts,
/// load-balancer and external IPs (`uplink`).
#[xdp]
pub fn up_xdp_uplink(ctx: XdpContext) -> u32 {
    uplink::run(&ctx)
}

#[cgroup_sock_addr(connect4)]
pub fn sock_connect4(ctx: SockAddrContext) -> i32 {
    sock::connect4(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock::sendmsg4(&ctx)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::reverse4(&ctx)
}

#[cgroup_sock_addr(getpeername4)]
pub fn sock_peername4(ctx: SockAddrContext) -> i32 {
    sock::reverse4(&ctx)
}

#[cgroup_sock_addr(connect6)]
pub fn sock_connect6(ctx: SockAddrContext) -> i32 {
    sock::connect6(&ctx)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sock_sendmsg6(ctx: SockAddrContext) -> i32 {
    sock::sendmsg6(&ctx)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn sock_recvmsg6(ctx: SockAddrContext) -> i32 {
    sock::reverse6(&ctx)
}

#[cgroup_sock_addr(getpeername6)]
pub fn sock_peername6(ctx: SockAddrContext) -> i32 {
    sock::reverse6(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier proves no panic path is reachable; this only
    // satisfies the compiler.
    unsafe { core::hint::unreachable_unchecked() }
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
