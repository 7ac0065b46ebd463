//! IPv6 address and port rewriting with the L4 checksum kept right, for
//! packets whose TCP/UDP header follows the fixed header (`Packet6::plain`,
//! the only IPv6 packets the TC path translates yet).
//!
//! IPv6 has no header checksum; the TCP/UDP checksum covers the addresses
//! through the pseudo header. When the skb's checksum state is known
//! (`crate::kernel_skb`) our own arithmetic updates the field in every
//! state (`datapath_common::skb_checksum::l4_field_after_nat6`: over
//! IPv6 even `CHECKSUM_COMPLETE`'s packet sum stays as it is). Otherwise
//! the helper does it with `BPF_F_IPV6` (Linux 6.16), without which it
//! would put `skb->csum` out of step on a `CHECKSUM_COMPLETE` skb (older
//! kernels: the helper without the flag, then `bpf_csum_update`).

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    helpers::{bpf_csum_diff, bpf_csum_update},
    programs::TcContext,
};
use datapath_common::{IPPROTO_TCP, maps::Ipv6Words, skb_checksum};

use crate::{
    kernel_skb,
    nat::End,
    parse::{ETH_LEN, TCP_CSUM_OFF, UDP_CSUM_OFF, ptr_at},
    parse6::{PLAIN_L4_OFF, Packet6},
};

/// `bpf_l4_csum_replace`'s flag for IPv6 (`BPF_F_IPV6`, Linux 6.16; not
/// in our bindings yet).
const BPF_F_IPV6: u64 = 1 << 7;

/// Offsets of the addresses in the IPv6 header.
const IP6_SRC_OFF: usize = 8;
const IP6_DST_OFF: usize = 24;

/// Rewrites one end of `packet` to `address_be:port_be`, keeping the L4
/// checksum valid.
#[inline(always)]
pub fn rewrite(
    ctx: &TcContext,
    packet: &Packet6,
    end: End,
    address_be: Ipv6Words,
    port_be: u16,
) -> Result<(), ()> {
    let (old_address, old_port, ip_off, port_off) = match end {
        End::Destination => (packet.daddr_be, packet.dport_be, IP6_DST_OFF, 2),
        End::Source => (packet.saddr_be, packet.sport_be, IP6_SRC_OFF, 0),
    };
    let ip_addr: *mut Ipv6Words = ptr_at(ctx, ETH_LEN + ip_off).ok_or(())?;
    let l4_port: *mut u16 = ptr_at(ctx, PLAIN_L4_OFF + port_off).ok_or(())?;
    // SAFETY: both pointers are bounds-checked by ptr_at; TC programs may
    // write packet data (the verifier makes the skb writable first).
    unsafe {
        *ip_addr = address_be;
        *l4_port = port_be;
    }
    let (at, udp, mangled_0) = checksum_field(packet);
    if let Some(state) = kernel_skb::checksum_state(ctx) {
        let field: *mut u16 = ptr_at(ctx, at).ok_or(())?;
        // SAFETY: bounds-checked by ptr_at.
        unsafe {
            *field = skb_checksum::l4_field_after_nat6(
                state,
                *field,
                old_address,
                address_be,
                old_port,
                port_be,
                udp,
            );
        }
        return Ok(());
    }
    // SAFETY: the helper only reads the two 16-byte arrays (its
    // prototype says `*mut`).
    let diff = unsafe {
        bpf_csum_diff(
            old_address.as_ptr().cast_mut(),
            16,
            address_be.as_ptr().cast_mut(),
            16,
            0,
        )
    };
    if diff < 0 {
        return Err(());
    }
    // Size 0: `to` is a difference (the address is 16 bytes).
    let flags = BPF_F_PSEUDO_HDR as u64 | mangled_0;
    if ctx
        .l4_csum_replace(at, 0, diff as u64, flags | BPF_F_IPV6)
        .is_err()
    {
        // A kernel before 6.16 refuses the flag (EINVAL, nothing
        // written): without it the helper also takes the difference out
        // of a CHECKSUM_COMPLETE skb's `skb->csum`, as IPv4 needs, which
        // `bpf_csum_update` puts back (it acts on CHECKSUM_COMPLETE only).
        ctx.l4_csum_replace(at, 0, diff as u64, flags)
            .map_err(|_| ())?;
        // SAFETY: plain helper call on the program's own skb.
        unsafe { bpf_csum_update(ctx.skb.skb, diff as u32) };
    }
    if old_port != port_be {
        ctx.l4_csum_replace(at, old_port as u64, port_be as u64, mangled_0 | 2)
            .map_err(|_| ())?;
    }
    Ok(())
}

/// Where `packet`'s L4 checksum field is, whether it is UDP's, and the
/// helper flag UDP needs (a computed zero is sent as all-ones).
#[inline(always)]
fn checksum_field(packet: &Packet6) -> (usize, bool, u64) {
    if packet.protocol == IPPROTO_TCP {
        (PLAIN_L4_OFF + TCP_CSUM_OFF, false, 0)
    } else {
        (
            PLAIN_L4_OFF + UDP_CSUM_OFF,
            true,
            BPF_F_MARK_MANGLED_0 as u64,
        )
    }
}
