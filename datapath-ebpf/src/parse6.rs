//! IPv6 header parsing: the fixed header's fields, then the extension
//! headers walked by the pure `datapath_common::ipv6::upper_layer` (at
//! most four; ESP, "no next header" and longer chains are not looked
//! past), each read with `bpf_skb_load_bytes`.

use aya_ebpf::programs::TcContext;
use datapath_common::{IPPROTO_TCP, IPPROTO_UDP, ipv6, maps::Ipv6Words};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::Ipv6Hdr,
};

use crate::parse::{ETH_LEN, ptr_at};

/// Offset of the TCP flags byte in the TCP header.
const TCP_FLAGS_OFF: usize = 13;

/// Where an IPv6 TCP/UDP packet goes: what the egress program needs to
/// tell a packet to an IPv6 frontend (the translation to come,
/// `docs/ipv6-plan.md` step 7, adds the source).
pub struct Packet6 {
    pub daddr_be: Ipv6Words,
    /// Zero in a later fragment (no upper-layer header there).
    pub dport_be: u16,
    pub protocol: u8,
    /// TCP flags (0 for UDP and later fragments).
    pub tcp_flags: u8,
    /// The upper-layer header follows the fixed header at once: no
    /// extension header, no fragment header.
    pub plain: bool,
    /// A fragment other than the first: its ports are the first one's.
    pub later_fragment: bool,
}

/// True when the frame is IPv6.
#[inline(always)]
pub fn is_ipv6(ctx: &TcContext) -> bool {
    ptr_at::<EthHdr>(ctx, 0)
        // SAFETY: bounds-checked by ptr_at.
        .is_some_and(|eth| unsafe { (*eth).ether_type } == EtherType::Ipv6 as u16)
}

#[inline(always)]
fn words(octets: [u8; 16]) -> Ipv6Words {
    // SAFETY: 16 bytes are four words; both are plain integers.
    unsafe { core::mem::transmute(octets) }
}

/// Parses an IPv6 TCP or UDP frame; `None` for anything else (another
/// upper layer, a chain not walked, a frame too short).
#[inline(always)]
pub fn ipv6_l4(ctx: &TcContext) -> Option<Packet6> {
    let ip: *const Ipv6Hdr = ptr_at(ctx, ETH_LEN)?;
    // SAFETY: bounds-checked by ptr_at.
    let (vcf, next_header, dst) = unsafe { ((*ip).vcf[0], (*ip).next_hdr, (*ip).dst_addr) };
    if vcf >> 4 != 6 {
        return None;
    }
    let ipv6::Upper::Found {
        protocol,
        offset,
        fragment,
    } = ipv6::upper_layer(next_header, |at| ctx.load::<[u8; 8]>(ETH_LEN + at).ok())
    else {
        return None;
    };
    if protocol != IPPROTO_TCP && protocol != IPPROTO_UDP {
        return None;
    }
    let daddr_be = words(dst);
    if fragment.is_some_and(|f| f.is_later()) {
        return Some(Packet6 {
            daddr_be,
            dport_be: 0,
            protocol,
            tcp_flags: 0,
            plain: false,
            later_fragment: true,
        });
    }
    // The destination port: the second word of TCP's and UDP's header.
    let dport_be = ctx.load::<u16>(ETH_LEN + offset + 2).ok()?;
    let tcp_flags = if protocol == IPPROTO_TCP {
        ctx.load::<u8>(ETH_LEN + offset + TCP_FLAGS_OFF).ok()?
    } else {
        0
    };
    Some(Packet6 {
        daddr_be,
        dport_be,
        protocol,
        tcp_flags,
        plain: offset == ipv6::IPV6_HEADER_LEN && fragment.is_none(),
        later_fragment: false,
    })
}
