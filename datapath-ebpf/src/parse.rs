//! Header parsing with direct packet access: every pointer is bounds-checked
//! against `data_end` before use, which is also what the verifier demands.

use core::mem::size_of;

use aya_ebpf::programs::TcContext;
use datapath_common::{IPPROTO_TCP, IPPROTO_UDP, metrics::Counter};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::Ipv4Hdr,
};

use crate::metrics::count;

pub const ETH_LEN: usize = size_of::<EthHdr>();
/// Bytes of the L4 header the datapath reads or writes: TCP up to and
/// including the checksum (offset 16..18), the whole UDP header.
const TCP_NEEDED: usize = 18;
const UDP_NEEDED: usize = 8;
/// Offsets inside the L4 header.
pub const TCP_CSUM_OFF: usize = 16;
pub const UDP_CSUM_OFF: usize = 6;
const TCP_FLAGS_OFF: usize = 13;
/// Offsets inside the IPv4 header.
pub const IP_CSUM_OFF: usize = 10;
pub const IP_SRC_OFF: usize = 12;
pub const IP_DST_OFF: usize = 16;
/// Bits of the IPv4 flags/fragment-offset field (host order).
const IP_OFFSET_MASK: u16 = 0x1fff;
const IP_MORE_FRAGMENTS: u16 = 0x2000;

/// `Packet::fragment`: a whole datagram.
pub const NOT_FRAGMENTED: u8 = 0;
/// `Packet::fragment`: the first fragment (offset 0, more to come): it
/// carries the L4 header.
pub const FIRST_FRAGMENT: u8 = 1;
/// `Packet::fragment`: a later fragment: no L4 header; its ports are the
/// first fragment's (`crate::frag`), zero until looked up.
pub const LATER_FRAGMENT: u8 = 2;

/// The fields of an IPv4 TCP/UDP packet the datapath works with.
pub struct Packet {
    /// Offset of the L4 header (14 + IHL·4: IP options are skipped).
    pub l4_off: usize,
    pub saddr_be: u32,
    pub daddr_be: u32,
    pub sport_be: u16,
    pub dport_be: u16,
    pub protocol: u8,
    /// TCP flags byte (0 for UDP and for later fragments).
    pub tcp_flags: u8,
    /// `NOT_FRAGMENTED`, `FIRST_FRAGMENT` or `LATER_FRAGMENT`.
    pub fragment: u8,
    /// The IPv4 identification field (names a fragmented datagram).
    pub ip_id_be: u16,
}

impl Packet {
    /// True for a fragment without an L4 header.
    #[inline(always)]
    pub fn is_later_fragment(&self) -> bool {
        self.fragment == LATER_FRAGMENT
    }
}

#[inline(always)]
pub fn ptr_at<T>(ctx: &TcContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// Parses an IPv4 TCP or UDP frame. `None` means "not for us": not IPv4,
/// another protocol, or a frame too short to hold what its headers claim
/// (counted). A later fragment is returned without ports (see
/// `Packet::fragment`).
#[inline(always)]
pub fn ipv4_l4(ctx: &TcContext) -> Option<Packet> {
    let eth: *const EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: bounds-checked by ptr_at.
    if unsafe { (*eth).ether_type } != EtherType::Ipv4 as u16 {
        return None;
    }
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, ETH_LEN) else {
        count(Counter::NotParsed);
        return None;
    };
    // SAFETY: bounds-checked by ptr_at.
    let (vihl, protocol, frags, tot_len, ip_id) = unsafe {
        (
            (*ip).vihl,
            (*ip).proto,
            (*ip).frags,
            (*ip).tot_len,
            (*ip).id,
        )
    };
    if protocol != IPPROTO_TCP && protocol != IPPROTO_UDP {
        return None;
    }
    let ihl = ((vihl & 0x0f) as usize) << 2;
    if vihl >> 4 != 4 || ihl < size_of::<Ipv4Hdr>() {
        count(Counter::NotParsed);
        return None;
    }
    let frags = u16::from_be_bytes(frags);
    let l4_off = ETH_LEN + ihl;
    let tot_len = u16::from_be_bytes(tot_len) as usize;
    if frags & IP_OFFSET_MASK != 0 {
        // A later fragment: its ports are its first fragment's.
        if tot_len < ihl || (ctx.len() as usize) < ETH_LEN + tot_len {
            count(Counter::NotParsed);
            return None;
        }
        let ip: *const Ipv4Hdr = ptr_at(ctx, ETH_LEN)?;
        // SAFETY: bounds-checked by ptr_at.
        let (saddr_be, daddr_be) = unsafe {
            (
                u32::from_ne_bytes((*ip).src_addr),
                u32::from_ne_bytes((*ip).dst_addr),
            )
        };
        return Some(Packet {
            l4_off,
            saddr_be,
            daddr_be,
            sport_be: 0,
            dport_be: 0,
            protocol,
            tcp_flags: 0,
            fragment: LATER_FRAGMENT,
            ip_id_be: u16::from_ne_bytes(ip_id),
        });
    }
    let fragment = if frags & IP_MORE_FRAGMENTS != 0 {
        FIRST_FRAGMENT
    } else {
        NOT_FRAGMENTED
    };
    let needed = if protocol == IPPROTO_TCP {
        TCP_NEEDED
    } else {
        UDP_NEEDED
    };
    // A frame shorter than its IP header claims (truncated) or an IP
    // length too small for the L4 header is malformed: never rewrite it.
    // (tot_len 0 is how BIG TCP marks a GSO packet over 64 KiB.)
    if tot_len != 0 && (tot_len < ihl + needed || (ctx.len() as usize) < ETH_LEN + tot_len) {
        count(Counter::NotParsed);
        return None;
    }
    let mut data_ok = ctx.data() + l4_off + needed <= ctx.data_end();
    if !data_ok && (ctx.len() as usize) >= l4_off + needed {
        // Headers beyond the linear area (rare; e.g. after some tunnels).
        data_ok = ctx.pull_data((l4_off + needed) as u32).is_ok()
            && ctx.data() + l4_off + needed <= ctx.data_end();
    }
    if !data_ok {
        count(Counter::NotParsed);
        return None;
    }
    // Re-derive every pointer: pull_data invalidates the earlier ones.
    let ip: *const Ipv4Hdr = ptr_at(ctx, ETH_LEN)?;
    let ports: *const [u16; 2] = ptr_at(ctx, l4_off)?;
    // SAFETY: bounds-checked above (ports) and by ptr_at.
    let (saddr_be, daddr_be, [sport_be, dport_be]) = unsafe {
        (
            u32::from_ne_bytes((*ip).src_addr),
            u32::from_ne_bytes((*ip).dst_addr),
            *ports,
        )
    };
    let tcp_flags = if protocol == IPPROTO_TCP {
        let flags: *const u8 = ptr_at(ctx, l4_off + TCP_FLAGS_OFF)?;
        // SAFETY: bounds-checked by ptr_at.
        unsafe { *flags }
    } else {
        0
    };
    Some(Packet {
        l4_off,
        saddr_be,
        daddr_be,
        sport_be,
        dport_be,
        protocol,
        tcp_flags,
        fragment,
        ip_id_be: u16::from_ne_bytes(ip_id),
    })
}
