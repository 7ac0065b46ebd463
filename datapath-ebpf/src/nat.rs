//! Address and port rewriting with checksum fix-ups.
//!
//! The IPv4 header checksum is updated in place with the pure RFC 1624
//! arithmetic (`datapath_common::csum`): the IP header is always fully
//! checksummed in the packet. So is the L4 checksum when the skb's
//! checksum state is known (`crate::kernel_skb`) and is not
//! CHECKSUM_COMPLETE (`datapath_common::skb_checksum`); otherwise it goes
//! through `bpf_l4_csum_replace`, which knows whether the skb carries a
//! full checksum, a partial one (offload: only the pseudo header is in the
//! field) or a CHECKSUM_COMPLETE sum to keep in step.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use datapath_common::{
    IPPROTO_TCP, csum,
    skb_checksum::{self, ChecksumState},
};

use crate::{
    kernel_skb,
    parse::{
        ETH_LEN, IP_CSUM_OFF, IP_DST_OFF, IP_SRC_OFF, Packet, TCP_CSUM_OFF, UDP_CSUM_OFF, ptr_at,
    },
};

/// Which end of the packet to rewrite.
#[derive(Clone, Copy)]
pub enum End {
    /// Egress DNAT: destination becomes the backend.
    Destination,
    /// Ingress reverse NAT: source becomes the service again.
    Source,
}

/// Rewrites one end of `packet` to `address_be:port_be`, keeping the IP and
/// L4 checksums valid. UDP packets without a checksum keep none.
#[inline(always)]
pub fn rewrite(
    ctx: &TcContext,
    packet: &Packet,
    end: End,
    address_be: u32,
    port_be: u16,
) -> Result<(), ()> {
    let (old_address, old_port, ip_off, port_off) = match end {
        End::Destination => (packet.daddr_be, packet.dport_be, IP_DST_OFF, 2),
        End::Source => (packet.saddr_be, packet.sport_be, IP_SRC_OFF, 0),
    };
    let ip_csum: *mut u16 = ptr_at(ctx, ETH_LEN + IP_CSUM_OFF).ok_or(())?;
    let ip_addr: *mut u32 = ptr_at(ctx, ETH_LEN + ip_off).ok_or(())?;
    if packet.is_later_fragment() {
        // No L4 header here: the first fragment's checksum update covered
        // the whole datagram.
        // SAFETY: bounds-checked by ptr_at; TC programs may write packet
        // data (the verifier makes the skb writable first).
        unsafe {
            *ip_csum = csum::replace_u32(*ip_csum, old_address, address_be);
            *ip_addr = address_be;
        }
        return Ok(());
    }
    let l4_port: *mut u16 = ptr_at(ctx, packet.l4_off + port_off).ok_or(())?;
    // SAFETY: all three pointers are bounds-checked by ptr_at; TC programs
    // may write packet data (the verifier makes the skb writable first).
    unsafe {
        *ip_csum = csum::replace_u32(*ip_csum, old_address, address_be);
        *ip_addr = address_be;
        *l4_port = port_be;
    }
    let (at, udp, mangled_0) = l4_checksum_field(packet);
    let direct = update_l4_checksum(ctx, at, |state, field| {
        skb_checksum::l4_field_after_nat(
            state,
            field,
            old_address,
            address_be,
            old_port,
            port_be,
            udp,
        )
    })?;
    if direct {
        return Ok(());
    }
    ctx.l4_csum_replace(
        at,
        old_address as u64,
        address_be as u64,
        BPF_F_PSEUDO_HDR as u64 | mangled_0 | 4,
    )
    .map_err(|_| ())?;
    if old_port != port_be {
        // A service whose port is its target port (DNS, many others)
        // saves this helper call.
        ctx.l4_csum_replace(at, old_port as u64, port_be as u64, mangled_0 | 2)
            .map_err(|_| ())?;
    }
    Ok(())
}

/// Rewrites only the port at one end of `packet` (a moved source port, or
/// the client's own port restored on a reply), keeping the L4 checksum
/// valid. A later fragment has no port: nothing to do.
#[inline(always)]
pub fn rewrite_port(ctx: &TcContext, packet: &Packet, end: End, port_be: u16) -> Result<(), ()> {
    if packet.is_later_fragment() {
        return Ok(());
    }
    let (old_port, port_off) = match end {
        End::Destination => (packet.dport_be, 2),
        End::Source => (packet.sport_be, 0),
    };
    let l4_port: *mut u16 = ptr_at(ctx, packet.l4_off + port_off).ok_or(())?;
    // SAFETY: bounds-checked by ptr_at; TC programs may write packet data.
    unsafe { *l4_port = port_be };
    let (at, udp, mangled_0) = l4_checksum_field(packet);
    let direct = update_l4_checksum(ctx, at, |state, field| {
        skb_checksum::l4_field_after_port_change(state, field, old_port, port_be, udp)
    })?;
    if direct {
        return Ok(());
    }
    ctx.l4_csum_replace(at, old_port as u64, port_be as u64, mangled_0 | 2)
        .map_err(|_| ())
}

/// Where `packet`'s L4 checksum field is, whether it is UDP's, and the
/// helper flag UDP needs: a zero UDP checksum means "none" and stays zero,
/// and a real sum of zero is sent as all-ones.
#[inline(always)]
fn l4_checksum_field(packet: &Packet) -> (usize, bool, u64) {
    if packet.protocol == IPPROTO_TCP {
        (packet.l4_off + TCP_CSUM_OFF, false, 0)
    } else {
        (
            packet.l4_off + UDP_CSUM_OFF,
            true,
            BPF_F_MARK_MANGLED_0 as u64,
        )
    }
}

/// Writes the L4 checksum field at `at` with our own arithmetic when the
/// skb's checksum state is known and `update` has a value for it (not
/// CHECKSUM_COMPLETE). Returns false when the helper must do it.
#[inline(always)]
fn update_l4_checksum(
    ctx: &TcContext,
    at: usize,
    update: impl FnOnce(ChecksumState, u16) -> Option<u16>,
) -> Result<bool, ()> {
    let Some(state) = kernel_skb::checksum_state(ctx) else {
        return Ok(false);
    };
    let field: *mut u16 = ptr_at(ctx, at).ok_or(())?;
    // SAFETY: bounds-checked by ptr_at; TC programs may write packet data.
    unsafe {
        match update(state, *field) {
            Some(check) => {
                *field = check;
                Ok(true)
            }
            None => Ok(false),
        }
    }
}
