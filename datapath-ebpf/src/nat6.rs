//! IPv6 address and port rewriting with the L4 checksum kept right: in
//! place for packets whose TCP/UDP header follows the fixed header
//! (`Packet6::plain`, what pods send), by the helpers past extension
//! headers and in fragments.
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
    if !packet.plain {
        return rewrite_extended(ctx, packet, end, address_be, port_be);
    }
    let (old_address, old_port, ip_off, port_off) = fields(packet, end);
    let ip_addr: *mut Ipv6Words = ptr_at(ctx, ETH_LEN + ip_off).ok_or(())?;
    let l4_port: *mut u16 = ptr_at(ctx, PLAIN_L4_OFF + port_off).ok_or(())?;
    // SAFETY: both pointers are bounds-checked by ptr_at; TC programs may
    // write packet data (the verifier makes the skb writable first).
    unsafe {
        *ip_addr = address_be;
        *l4_port = port_be;
    }
    let (at, udp, mangled_0) = checksum_field(packet, PLAIN_L4_OFF);
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
    by_helpers(
        ctx,
        at,
        old_address,
        address_be,
        old_port,
        port_be,
        mangled_0,
    )
}

/// `rewrite` for a packet whose upper-layer header is past extension
/// headers (a fragment header among them), at an offset the verifier
/// cannot bound for a direct access: read and written with the helpers.
/// A later fragment has no upper-layer header: only its address changes.
#[inline(always)]
fn rewrite_extended(
    ctx: &TcContext,
    packet: &Packet6,
    end: End,
    address_be: Ipv6Words,
    port_be: u16,
) -> Result<(), ()> {
    let (old_address, old_port, ip_off, port_off) = fields(packet, end);
    let ip_addr: *mut Ipv6Words = ptr_at(ctx, ETH_LEN + ip_off).ok_or(())?;
    // SAFETY: bounds-checked by ptr_at (before any helper call that
    // would invalidate the pointer).
    unsafe { *ip_addr = address_be };
    if packet.later_fragment {
        // No checksum follows the address here, so the packet's sum
        // changes: a CHECKSUM_COMPLETE skb's `skb->csum` follows it
        // (`bpf_csum_update` acts on that state only), or reassembly
        // would see a hardware checksum that no longer matches.
        let diff = address_difference(&old_address, &address_be)?;
        // SAFETY: plain helper call on the program's own skb.
        unsafe { bpf_csum_update(ctx.skb.skb, diff) };
        return Ok(());
    }
    ctx.store(packet.l4_off + port_off, &port_be, 0)
        .map_err(|_| ())?;
    let (at, udp, mangled_0) = checksum_field(packet, packet.l4_off);
    if let Some(state) = kernel_skb::checksum_state(ctx) {
        let field: u16 = ctx.load(at).map_err(|_| ())?;
        let updated = skb_checksum::l4_field_after_nat6(
            state,
            field,
            old_address,
            address_be,
            old_port,
            port_be,
            udp,
        );
        return ctx.store(at, &updated, 0).map_err(|_| ());
    }
    by_helpers(
        ctx,
        at,
        old_address,
        address_be,
        old_port,
        port_be,
        mangled_0,
    )
}

/// Rewrites one port of `packet` alone (a client port moved on a tuple
/// clash, `crate::clash6`), keeping the L4 checksum valid. A later
/// fragment has no port: nothing to do.
#[inline(always)]
pub fn rewrite_port(ctx: &TcContext, packet: &Packet6, end: End, port_be: u16) -> Result<(), ()> {
    if packet.later_fragment {
        return Ok(());
    }
    let (_, old_port, _, port_off) = fields(packet, end);
    let l4_off = if packet.plain {
        PLAIN_L4_OFF
    } else {
        packet.l4_off
    };
    ctx.store(l4_off + port_off, &port_be, 0).map_err(|_| ())?;
    let (at, udp, mangled_0) = checksum_field(packet, l4_off);
    if let Some(state) = kernel_skb::checksum_state(ctx) {
        let field: u16 = ctx.load(at).map_err(|_| ())?;
        let updated =
            skb_checksum::l4_field_after_port_change6(state, field, old_port, port_be, udp);
        return ctx.store(at, &updated, 0).map_err(|_| ());
    }
    // Not in the pseudo header: the helper's plain replacement, which
    // also keeps a CHECKSUM_COMPLETE sum (the field's change cancels the
    // port's).
    ctx.l4_csum_replace(at, old_port as u64, port_be as u64, mangled_0 | 2)
        .map_err(|_| ())
}

/// The old address and port of `end`, and where they are (the address
/// in the IPv6 header, the port in the upper-layer header).
#[inline(always)]
fn fields(packet: &Packet6, end: End) -> (Ipv6Words, u16, usize, usize) {
    match end {
        End::Destination => (packet.daddr_be, packet.dport_be, IP6_DST_OFF, 2),
        End::Source => (packet.saddr_be, packet.sport_be, IP6_SRC_OFF, 0),
    }
}

/// The one's-complement difference between two addresses (as
/// `bpf_csum_diff` gives it).
#[inline(always)]
fn address_difference(old: &Ipv6Words, new: &Ipv6Words) -> Result<u32, ()> {
    // SAFETY: the helper only reads the two 16-byte arrays (its
    // prototype says `*mut`).
    let diff =
        unsafe { bpf_csum_diff(old.as_ptr().cast_mut(), 16, new.as_ptr().cast_mut(), 16, 0) };
    if diff < 0 {
        return Err(());
    }
    Ok(diff as u32)
}

/// The checksum field at `at` updated by the helpers, when the skb's
/// checksum state is not known (`crate::kernel_skb`).
#[inline(always)]
fn by_helpers(
    ctx: &TcContext,
    at: usize,
    old_address: Ipv6Words,
    address_be: Ipv6Words,
    old_port: u16,
    port_be: u16,
    mangled_0: u64,
) -> Result<(), ()> {
    let diff = address_difference(&old_address, &address_be)?;
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
        unsafe { bpf_csum_update(ctx.skb.skb, diff) };
    }
    if old_port != port_be {
        ctx.l4_csum_replace(at, old_port as u64, port_be as u64, mangled_0 | 2)
            .map_err(|_| ())?;
    }
    Ok(())
}

/// Where `packet`'s L4 checksum field is (its upper-layer header at
/// `l4_off`), whether it is UDP's, and the helper flag UDP needs (a
/// computed zero is sent as all-ones).
#[inline(always)]
fn checksum_field(packet: &Packet6, l4_off: usize) -> (usize, bool, u64) {
    if packet.protocol == IPPROTO_TCP {
        (l4_off + TCP_CSUM_OFF, false, 0)
    } else {
        (l4_off + UDP_CSUM_OFF, true, BPF_F_MARK_MANGLED_0 as u64)
    }
}
