//! Refusing a new flow, as kube-proxy's `REJECT` does: to a service
//! without endpoints (`refuse`, `refuse6` over IPv6). The packet becomes
//! the ICMP port unreachable that answers it (over IPv6: the ICMPv6 one,
//! or a TCP reset for a SYN; `datapath_common::reject`) and goes straight
//! back into the pod, so `connect()` fails at once with ECONNREFUSED
//! instead of retrying SYNs into a silent drop.

use aya_ebpf::{
    bindings::{BPF_F_INGRESS, TC_ACT_SHOT},
    helpers::{bpf_redirect, bpf_skb_change_tail, bpf_skb_load_bytes},
    programs::TcContext,
};
use datapath_common::{
    IPPROTO_TCP,
    conntrack::{TCP_ACK, TCP_SYN},
    reject::{self, FRAME_LEN, FRAME6_LEN, QUOTED_LEN, QUOTED6_LEN, RESET6_FRAME_LEN},
};
use network_types::eth::EthHdr;

use crate::parse::{ETH_LEN, Packet};

/// The refused packet's Ethernet header and its first `N` bytes past it
/// (what the ICMP error quotes); `None` when it is shorter.
#[inline(always)]
fn quote<const N: usize>(ctx: &TcContext) -> Option<(EthHdr, [u8; N])> {
    let eth = ctx.load::<EthHdr>(0).ok()?;
    let mut quoted = [0u8; N];
    // The raw helper with a constant length: `TcContext::load_bytes`
    // clamps the length to the packet, which the verifier then sees as
    // possibly zero.
    // SAFETY: writes N bytes into `quoted`, which has them.
    let loaded = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb as *const _,
            ETH_LEN as u32,
            quoted.as_mut_ptr() as *mut _,
            N as u32,
        )
    };
    (loaded == 0).then_some((eth, quoted))
}

/// Rewrites the packet in `ctx` into its refusal and redirects it to the
/// pod's own ingress; returns the TC verdict. A packet with IP options
/// (pods do not send them) or one the kernel cannot resize is dropped.
#[inline(always)]
pub fn refuse(ctx: &TcContext, packet: &Packet) -> i32 {
    if packet.l4_off != ETH_LEN + 20 {
        return TC_ACT_SHOT;
    }
    let Some((eth, quoted)) = quote::<QUOTED_LEN>(ctx) else {
        return TC_ACT_SHOT;
    };
    let frame = reject::port_unreachable(eth.dst_addr, eth.src_addr, &quoted);
    // SAFETY: plain helper call on the program's own skb.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, FRAME_LEN as u32, 0) } != 0 {
        return TC_ACT_SHOT;
    }
    if ctx.store(0, &frame, 0).is_err() {
        return TC_ACT_SHOT;
    }
    // SAFETY: plain helper call; the skb pointer is the program's context.
    unsafe { bpf_redirect((*ctx.skb.skb).ifindex, BPF_F_INGRESS as u64) as i32 }
}

/// `refuse` of an IPv6 packet whose TCP/UDP header follows the fixed
/// one: a TCP SYN gets a reset (`datapath_common::reject::reset6`), any
/// other packet an ICMPv6 port unreachable quoting its first 48 bytes
/// (`datapath_common::reject::refusal6`); stored piece by piece.
#[inline(always)]
pub fn refuse6(ctx: &TcContext) -> i32 {
    // (A TCP or UDP packet over IPv6 is at least that long.)
    let Some((eth, quoted)) = quote::<QUOTED6_LEN>(ctx) else {
        return TC_ACT_SHOT;
    };
    // Ethernet back to the sender (its MACs swapped).
    let mut l2 = [0u8; ETH_LEN];
    l2[0..6].copy_from_slice(&eth.src_addr);
    l2[6..12].copy_from_slice(&eth.dst_addr);
    l2[12..14].copy_from_slice(&reject::ETHERTYPE_IPV6);
    const L4_AT: usize = ETH_LEN + 40;
    // TCP's flags byte (past the quote).
    let flags = ctx.load::<u8>(L4_AT + 13).unwrap_or(0);
    if quoted[6] == IPPROTO_TCP && flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        // A SYN is answered with a reset
        // (`datapath_common::reject::Reset6`: refused at once where an
        // ICMPv6 error would wait for the SYN's retransmission).
        let reset = reject::reset6(&quoted);
        // SAFETY: plain helper call on the program's own skb.
        if unsafe { bpf_skb_change_tail(ctx.skb.skb, RESET6_FRAME_LEN as u32, 0) } != 0
            || ctx.store(0, &l2, 0).is_err()
            || ctx.store(ETH_LEN, &reset.ip, 0).is_err()
            || ctx.store(L4_AT, &reset.tcp, 0).is_err()
        {
            return TC_ACT_SHOT;
        }
    } else {
        let headers = reject::refusal6(&quoted);
        // SAFETY: plain helper call on the program's own skb.
        if unsafe { bpf_skb_change_tail(ctx.skb.skb, FRAME6_LEN as u32, 0) } != 0
            || ctx.store(0, &l2, 0).is_err()
            || ctx.store(ETH_LEN, &headers.ip, 0).is_err()
            || ctx.store(L4_AT, &headers.icmp, 0).is_err()
            || ctx.store(L4_AT + headers.icmp.len(), &quoted, 0).is_err()
        {
            return TC_ACT_SHOT;
        }
    }
    // SAFETY: plain helper call; the skb pointer is the program's context.
    unsafe { bpf_redirect((*ctx.skb.skb).ifindex, BPF_F_INGRESS as u64) as i32 }
}
