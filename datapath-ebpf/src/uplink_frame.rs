//! Frames on the uplink (XDP): parsing into the TC path's `Packet` (so
//! conntrack keys and filters are the same code) and rewriting with
//! checksum fix-ups. An XDP frame is linear (the program does not take
//! multi-buffer frames) and, having come in from a wire, carries full
//! checksums: RFC 1624 updates need no skb checksum state.

use core::mem::size_of;

use aya_ebpf::programs::XdpContext;
use datapath_common::{IPPROTO_TCP, IPPROTO_UDP, csum, metrics::Counter};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::Ipv4Hdr,
};

use crate::{
    metrics::count,
    parse::{
        ETH_LEN, IP_CSUM_OFF, IP_DST_OFF, IP_SRC_OFF, NOT_FRAGMENTED, Packet, TCP_CSUM_OFF,
        UDP_CSUM_OFF,
    },
};

/// Bytes of the L4 header read or written (as `parse`): TCP through its
/// checksum, the whole UDP header.
const TCP_NEEDED: usize = 18;
const UDP_NEEDED: usize = 8;
const TCP_FLAGS_OFF: usize = 13;
/// Fragment offset and more-fragments bits (host order).
const IP_FRAGMENT_BITS: u16 = 0x3fff;

#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    if start + offset + size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// An unfragmented IPv4 TCP or UDP frame; `None` for anything else
/// (passed to the stack untouched). Fragments are not translated here:
/// the later ones carry no ports, and the stack reassembles them.
#[inline(always)]
pub fn ipv4_l4(ctx: &XdpContext) -> Option<Packet> {
    let eth: *const EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: bounds-checked by ptr_at.
    if unsafe { (*eth).ether_type } != EtherType::Ipv4 as u16 {
        return None;
    }
    let ip: *const Ipv4Hdr = ptr_at(ctx, ETH_LEN)?;
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
    if u16::from_be_bytes(frags) & IP_FRAGMENT_BITS != 0 {
        return None;
    }
    let needed = if protocol == IPPROTO_TCP {
        TCP_NEEDED
    } else {
        UDP_NEEDED
    };
    let l4_off = ETH_LEN + ihl;
    let tot_len = u16::from_be_bytes(tot_len) as usize;
    if tot_len < ihl + needed || ctx.data() + ETH_LEN + tot_len > ctx.data_end() {
        // Truncated, or an IP length too short for its L4 header: never
        // rewrite it.
        count(Counter::NotParsed);
        return None;
    }
    let ports: *const [u16; 2] = ptr_at(ctx, l4_off)?;
    // SAFETY: bounds-checked by ptr_at.
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
        fragment: NOT_FRAGMENTED,
        ip_id_be: u16::from_ne_bytes(ip_id),
    })
}

/// Rewrites the destination to `address_be:port_be`, keeping the IPv4
/// and L4 checksums valid (a UDP datagram without a checksum keeps none;
/// a sum of zero goes out as all-ones).
#[inline(always)]
pub fn rewrite_destination(
    ctx: &XdpContext,
    packet: &Packet,
    address_be: u32,
    port_be: u16,
) -> Result<(), ()> {
    rewrite_end(
        ctx,
        packet,
        IP_DST_OFF,
        2,
        (packet.daddr_be, packet.dport_be),
        (address_be, port_be),
    )
}

/// Rewrites the address at `ip_off` of the IPv4 header and the port at
/// `port_off` of the L4 header from `old` to `new`.
#[inline(always)]
fn rewrite_end(
    ctx: &XdpContext,
    packet: &Packet,
    ip_off: usize,
    port_off: usize,
    old: (u32, u16),
    new: (u32, u16),
) -> Result<(), ()> {
    let ip_csum: *mut u16 = ptr_at(ctx, ETH_LEN + IP_CSUM_OFF).ok_or(())?;
    let ip_addr: *mut u32 = ptr_at(ctx, ETH_LEN + ip_off).ok_or(())?;
    let l4_port: *mut u16 = ptr_at(ctx, packet.l4_off + port_off).ok_or(())?;
    let (csum_off, udp) = if packet.protocol == IPPROTO_TCP {
        (TCP_CSUM_OFF, false)
    } else {
        (UDP_CSUM_OFF, true)
    };
    let l4_csum: *mut u16 = ptr_at(ctx, packet.l4_off + csum_off).ok_or(())?;
    // SAFETY: every pointer is bounds-checked by ptr_at; XDP programs may
    // write the frame.
    unsafe {
        *ip_csum = csum::replace_u32(*ip_csum, old.0, new.0);
        *ip_addr = new.0;
        *l4_port = new.1;
        let sum = *l4_csum;
        if !(udp && sum == 0) {
            let check = csum::replace_u16(csum::replace_u32(sum, old.0, new.0), old.1, new.1);
            *l4_csum = if udp && check == 0 { 0xffff } else { check };
        }
    }
    Ok(())
}

/// Sets the frame's destination MAC.
#[inline(always)]
pub fn set_destination_mac(ctx: &XdpContext, mac: [u8; 6]) -> Result<(), ()> {
    let dst: *mut [u8; 6] = ptr_at(ctx, 0).ok_or(())?;
    // SAFETY: bounds-checked by ptr_at.
    unsafe { *dst = mac };
    Ok(())
}

/// Rewrites the source to `address_be:port_be` (SNAT, or a reply's
/// frontend restored), checksums kept valid as `rewrite_destination`.
#[inline(always)]
pub fn rewrite_source(
    ctx: &XdpContext,
    packet: &Packet,
    address_be: u32,
    port_be: u16,
) -> Result<(), ()> {
    rewrite_end(
        ctx,
        packet,
        IP_SRC_OFF,
        0,
        (packet.saddr_be, packet.sport_be),
        (address_be, port_be),
    )
}

/// Sets both MACs: `destination` (the next hop) and `source` (ours).
#[inline(always)]
pub fn set_macs(ctx: &XdpContext, destination: [u8; 6], source: [u8; 6]) -> Result<(), ()> {
    let macs: *mut [u8; 12] = ptr_at(ctx, 0).ok_or(())?;
    let mut both = [0u8; 12];
    both[..6].copy_from_slice(&destination);
    both[6..].copy_from_slice(&source);
    // SAFETY: bounds-checked by ptr_at.
    unsafe { *macs = both };
    Ok(())
}

/// Why `next_hop` found none.
pub enum NoNextHop {
    /// The next hop is known but not resolved yet (worth a retry).
    Unresolved,
    /// No route out of the uplink, or the uplink does not forward (the
    /// kernel answers a program's lookup only where
    /// `net.ipv4.conf.<uplink>.forwarding` is on, as on every Kubernetes
    /// node).
    NoRoute,
}

/// The next hop towards `destination_be` from `source_be` out of the
/// interface the frame came in by, from the kernel's routes and
/// neighbours (`bpf_fib_lookup`): its MAC and the interface's. This
/// program only sends back out of the uplink: a route by another
/// interface is `NoRoute`.
#[inline(always)]
pub fn next_hop(
    ctx: &XdpContext,
    protocol: u8,
    source_be: u32,
    destination_be: u32,
) -> Result<([u8; 6], [u8; 6]), NoNextHop> {
    use aya_ebpf::bindings::{BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup};
    const AF_INET: u8 = 2;
    // SAFETY: all-zero is a valid `bpf_fib_lookup` (plain integers and
    // unions of them).
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    let ifindex = ctx.ingress_ifindex() as u32;
    params.family = AF_INET;
    params.l4_protocol = protocol;
    params.ifindex = ifindex;
    params.__bindgen_anon_3.ipv4_src = source_be;
    params.__bindgen_anon_4.ipv4_dst = destination_be;
    // SAFETY: the helper reads and writes `params` only.
    let rc = unsafe {
        aya_ebpf::helpers::bpf_fib_lookup(
            ctx.ctx.cast(),
            &mut params,
            size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    if rc == BPF_FIB_LKUP_RET_SUCCESS as i64 && params.ifindex == ifindex {
        Ok((params.dmac, params.smac))
    } else if rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64 && params.ifindex == ifindex {
        Err(NoNextHop::Unresolved)
    } else {
        Err(NoNextHop::NoRoute)
    }
}

/// The frame's source and destination MACs.
#[inline(always)]
pub fn macs(ctx: &XdpContext) -> Option<([u8; 6], [u8; 6])> {
    let eth: *const EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: bounds-checked by ptr_at.
    unsafe { Some(((*eth).src_addr, (*eth).dst_addr)) }
}
