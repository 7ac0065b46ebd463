//! Refusing a new flow to a service without endpoints, as kube-proxy's
//! `REJECT` does: the packet becomes the ICMP port unreachable that
//! answers it (`datapath_common::reject`) and goes straight back into the
//! pod, so `connect()` fails at once with ECONNREFUSED instead of
//! retrying SYNs into a silent drop.

use aya_ebpf::{
    bindings::{BPF_F_INGRESS, TC_ACT_SHOT},
    helpers::{bpf_redirect, bpf_skb_change_tail, bpf_skb_load_bytes},
    programs::TcContext,
};
use datapath_common::reject::{self, FRAME_LEN, QUOTED_LEN};
use network_types::eth::EthHdr;

use crate::parse::{ETH_LEN, Packet};

/// Rewrites the packet in `ctx` into its refusal and redirects it to the
/// pod's own ingress; returns the TC verdict. A packet with IP options
/// (pods do not send them) or one the kernel cannot resize is dropped.
#[inline(always)]
pub fn refuse(ctx: &TcContext, packet: &Packet) -> i32 {
    if packet.l4_off != ETH_LEN + 20 {
        return TC_ACT_SHOT;
    }
    let Ok(eth) = ctx.load::<EthHdr>(0) else {
        return TC_ACT_SHOT;
    };
    let mut quoted = [0u8; QUOTED_LEN];
    // The raw helper with a constant length: `TcContext::load_bytes`
    // clamps the length to the packet, which the verifier then sees as
    // possibly zero.
    // SAFETY: writes QUOTED_LEN bytes into `quoted`, which has them.
    let loaded = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb as *const _,
            ETH_LEN as u32,
            quoted.as_mut_ptr() as *mut _,
            QUOTED_LEN as u32,
        )
    };
    if loaded != 0 {
        return TC_ACT_SHOT;
    }
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
