//! Layer 2 after DNAT. TC egress runs after the kernel resolved the next
//! hop for the VIP (a fake gateway), so the frame must be re-addressed for
//! the backend.
//!
//! A new flow is sent with `bpf_redirect_neigh`, which makes the kernel
//! route the rewritten packet and resolve its neighbour (same subnet or via
//! a router alike). That redirect runs this egress program a second time,
//! so it is only used until the flow's first reply arrives: the ingress
//! program then learns the next hop's MAC (the reply's source MAC) into the
//! conntrack entry and later packets get their MACs written in place. A FIB
//! lookup is not used because it refuses interfaces without forwarding
//! enabled, which is every pod interface.
//!
//! Learned MACs belong to the interface the reply came in on and hold only
//! while replies keep confirming them (`Lifetimes::l2_fresh`; replies
//! refresh them once a refresh interval): a flow leaving by another
//! interface, or one whose replies stopped (a gateway failed over), goes
//! back to the kernel's neighbour resolution.
//!
//! The second pass through egress that `bpf_redirect_neigh` causes must
//! leave the packet alone: it is already translated, and its tuple (client
//! port → backend) may be the one a moved direct connection was opened on
//! (`crate::clash`), whose port rewrite must not touch it. The packet is
//! tagged in the skb's control block (`skb->cb`, private to TC programs
//! and never seen outside the host's stack) before either redirect, and
//! the egress program passes a tagged packet at once, clearing the tag.

use core::ptr::null_mut;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::{bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};
use datapath_common::{
    SKB_CB_REDIRECTED,
    maps::{CtEntry, CtEntry6, L2_REWRITE},
};
use network_types::eth::EthHdr;

use crate::{ct, parse::ptr_at};

/// The next-hop fields of a conntrack entry of either family (same names,
/// other places in each layout).
pub trait NextHop {
    /// The interface the route to the backend leaves by (0: this one).
    fn out_ifindex(&self) -> u32;
    /// `L2_*`, the interface the MACs were learned on, and when.
    fn learned(&self) -> (u8, u32, u64);
    /// The next hop's MAC and ours.
    fn macs(&self) -> ([u8; 6], [u8; 6]);
    /// Records what a reply taught.
    fn learn(&mut self, dst_mac: [u8; 6], src_mac: [u8; 6], ifindex: u32, now: u64);
}

macro_rules! next_hop {
    ($entry:ty) => {
        impl NextHop for $entry {
            #[inline(always)]
            fn out_ifindex(&self) -> u32 {
                self.out_ifindex
            }
            #[inline(always)]
            fn learned(&self) -> (u8, u32, u64) {
                (self.l2_mode, self.ifindex, self.l2_seen)
            }
            #[inline(always)]
            fn macs(&self) -> ([u8; 6], [u8; 6]) {
                (self.dst_mac, self.src_mac)
            }
            #[inline(always)]
            fn learn(&mut self, dst_mac: [u8; 6], src_mac: [u8; 6], ifindex: u32, now: u64) {
                self.dst_mac = dst_mac;
                self.src_mac = src_mac;
                self.ifindex = ifindex;
                self.l2_seen = now;
                self.l2_mode = L2_REWRITE;
            }
        }
    };
}
next_hop!(CtEntry);
next_hop!(CtEntry6);

/// The interface the packet is on.
#[inline(always)]
fn ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: the skb pointer is the program's context.
    unsafe { (*ctx.skb.skb).ifindex }
}

/// Tags the packet as already translated, before a redirect that runs the
/// egress program again.
#[inline(always)]
fn tag_redirected(ctx: &TcContext) {
    // SAFETY: the skb pointer is the program's context; cb is writable
    // from TC programs.
    unsafe { (*ctx.skb.skb).cb[0] = SKB_CB_REDIRECTED };
}

/// True (and the tag cleared) when this is the second pass of a packet
/// this program already translated and redirected.
#[inline(always)]
pub fn take_redirected(ctx: &TcContext) -> bool {
    // SAFETY: the skb pointer is the program's context.
    unsafe {
        if (*ctx.skb.skb).cb[0] != SKB_CB_REDIRECTED {
            return false;
        }
        (*ctx.skb.skb).cb[0] = 0;
    }
    true
}

/// Sends a DNATed packet on its way; returns the TC verdict. It leaves by
/// the flow's own interface when the route to its backend names one
/// (`crate::route`), else by the one it is on.
#[inline(always)]
pub fn forward(ctx: &TcContext, flow: &impl NextHop, now: u64) -> i32 {
    let here = ifindex(ctx);
    let out = match flow.out_ifindex() {
        0 => here,
        other => other,
    };
    let (mode, learned_on, learned_at) = flow.learned();
    if mode == L2_REWRITE && learned_on == out && ct::l2_is_fresh(learned_at, now) {
        let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
            return TC_ACT_SHOT;
        };
        let (dst_mac, src_mac) = flow.macs();
        // SAFETY: bounds-checked by ptr_at.
        unsafe {
            (*eth).dst_addr = dst_mac;
            (*eth).src_addr = src_mac;
        }
        if out == here {
            return TC_ACT_OK;
        }
        // Another interface of the pod, whose egress program (when it is
        // attached there too) must leave the packet alone.
        tag_redirected(ctx);
        // SAFETY: plain helper call.
        return unsafe { bpf_redirect(out, 0) as i32 };
    }
    tag_redirected(ctx);
    // SAFETY: plain helper call.
    unsafe { bpf_redirect_neigh(out, null_mut(), 0, 0) as i32 }
}

/// The L2 addresses a reply teaches: its source is our next hop, its
/// destination is us, both on the interface it arrived on.
#[inline(always)]
pub fn learn_from_reply(ctx: &TcContext, flow: &mut impl NextHop, now: u64) {
    if let Some(eth) = ptr_at::<EthHdr>(ctx, 0) {
        // SAFETY: bounds-checked by ptr_at.
        let (next_hop, ours) = unsafe { ((*eth).src_addr, (*eth).dst_addr) };
        flow.learn(next_hop, ours, ifindex(ctx), now);
    }
}
