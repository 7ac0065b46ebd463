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

/// Where the TCP/UDP header of a `plain` packet starts in the frame: the
/// only packets the TC path translates yet.
pub const PLAIN_L4_OFF: usize = ETH_LEN + ipv6::IPV6_HEADER_LEN;

/// An IPv6 TCP/UDP packet's addresses and ports, and where its upper-layer
/// header is.
pub struct Packet6 {
    pub saddr_be: Ipv6Words,
    pub daddr_be: Ipv6Words,
    /// Zero in a later fragment (no upper-layer header there).
    pub sport_be: u16,
    /// Zero in a later fragment (no upper-layer header there).
    pub dport_be: u16,
    pub protocol: u8,
    /// TCP flags (0 for UDP and later fragments).
    pub tcp_flags: u8,
    /// The upper-layer header follows the fixed header at once (at
    /// `PLAIN_L4_OFF`): no extension header, no fragment header.
    pub plain: bool,
    /// A fragment other than the first: its ports are the first one's.
    pub later_fragment: bool,
    /// The first fragment of a fragmented datagram: its ports are
    /// remembered for the later ones (`crate::frag6`).
    pub first_fragment: bool,
    /// The fragment header's identification (a fragment only).
    pub fragment_id_be: u32,
    /// Where the upper-layer header starts in the frame (`PLAIN_L4_OFF`
    /// for a plain packet; unused in a later fragment).
    pub l4_off: usize,
}

/// True when the frame is IPv6.
#[inline(always)]
pub fn is_ipv6(ctx: &TcContext) -> bool {
    ptr_at::<EthHdr>(ctx, 0)
        // SAFETY: bounds-checked by ptr_at.
        .is_some_and(|eth| unsafe { (*eth).ether_type } == EtherType::Ipv6 as u16)
}

/// Parses an IPv6 TCP or UDP frame; `None` for anything else (another
/// upper layer, a chain not walked, a frame too short).
#[inline(always)]
pub fn ipv6_l4(ctx: &TcContext) -> Option<Packet6> {
    let ip: *const Ipv6Hdr = ptr_at(ctx, ETH_LEN)?;
    // SAFETY: bounds-checked by ptr_at.
    let (vcf, next_header) = unsafe { ((*ip).vcf[0], (*ip).next_hdr) };
    if vcf >> 4 != 6 {
        return None;
    }
    if next_header == IPPROTO_TCP || next_header == IPPROTO_UDP {
        // The bytes read in place below (ports, TCP flags) must be in the
        // linear area: pulled in when they are not (rare; as over IPv4).
        let needed = PLAIN_L4_OFF
            + if next_header == IPPROTO_TCP {
                TCP_FLAGS_OFF + 1
            } else {
                4
            };
        if ctx.data() + needed > ctx.data_end()
            && ((ctx.len() as usize) < needed || ctx.pull_data(needed as u32).is_err())
        {
            return None;
        }
    }
    // The addresses as four words each, read in place (no 16-byte copies
    // on the stack, which the IPv6 programs need for their entries); after
    // any pull, which moves the data.
    let addresses: *const [Ipv6Words; 2] = ptr_at(ctx, ETH_LEN + 8)?;
    // SAFETY: bounds-checked by ptr_at; the frame's words need not be
    // aligned (Ethernet puts the IPv6 header at 2 mod 4).
    let [src, dst] = unsafe { core::ptr::read_unaligned(addresses) };
    let (saddr_be, daddr_be) = (src, dst);
    let plain = next_header == IPPROTO_TCP || next_header == IPPROTO_UDP;
    let (protocol, l4_off, fragment_id_be, first_fragment) = if plain {
        // What pods send: the header right after the fixed one, read in
        // place below (no walk, no helper call).
        (next_header, PLAIN_L4_OFF, 0, false)
    } else {
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
        let fragment_id_be = fragment.map_or(0, |f| f.id_be);
        if fragment.is_some_and(|f| f.is_later()) {
            return Some(Packet6 {
                saddr_be,
                daddr_be,
                sport_be: 0,
                dport_be: 0,
                protocol,
                tcp_flags: 0,
                plain: false,
                later_fragment: true,
                first_fragment: false,
                fragment_id_be,
                l4_off: ETH_LEN + offset,
            });
        }
        (
            protocol,
            ETH_LEN + offset,
            fragment_id_be,
            fragment.is_some_and(|f| f.more),
        )
    };
    // The ports (the first two words of TCP's and UDP's header) and the
    // TCP flags: in place for a plain packet, by the helper after
    // extension headers (an offset the verifier cannot bound for a
    // direct read).
    let (ports, tcp_flags) = if plain {
        let ports: *const [u16; 2] = ptr_at(ctx, PLAIN_L4_OFF)?;
        let flags = if protocol == IPPROTO_TCP {
            let flags: *const u8 = ptr_at(ctx, PLAIN_L4_OFF + TCP_FLAGS_OFF)?;
            // SAFETY: bounds-checked by ptr_at.
            unsafe { *flags }
        } else {
            0
        };
        // SAFETY: bounds-checked by ptr_at.
        (unsafe { *ports }, flags)
    } else {
        let ports = ctx.load::<[u16; 2]>(l4_off).ok()?;
        let flags = if protocol == IPPROTO_TCP {
            ctx.load::<u8>(l4_off + TCP_FLAGS_OFF).ok()?
        } else {
            0
        };
        (ports, flags)
    };
    Some(Packet6 {
        saddr_be,
        daddr_be,
        sport_be: ports[0],
        dport_be: ports[1],
        protocol,
        tcp_flags,
        plain,
        later_fragment: false,
        first_fragment,
        fragment_id_be,
        l4_off,
    })
}
