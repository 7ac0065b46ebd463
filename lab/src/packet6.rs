//! Crafting and checking Ethernet/IPv6 frames — TCP, UDP, ICMPv6 (NDP
//! and errors), with extension headers and fragments — for the IPv6
//! BPF_PROG_TEST_RUN cases. As `packet` does for IPv4, checksums are
//! computed from scratch here, and `parse6` walks the headers itself
//! (not with the datapath's walk), so that a fixture is an independent
//! oracle.

use std::net::Ipv6Addr;

use datapath_common::{IPPROTO_TCP, IPPROTO_UDP, csum};

use crate::packet::{ACK, ETH_LEN, L4};

/// Next-header values the builder writes (IANA's numbers, named once in
/// `datapath_common::ipv6`).
pub use datapath_common::ipv6::{
    IPV6_HEADER_LEN as IPV6_LEN, NEXTHDR_DEST_OPTIONS as DEST_OPTIONS,
    NEXTHDR_FRAGMENT as FRAGMENT, NEXTHDR_HOP_BY_HOP as HOP_BY_HOP, NEXTHDR_ICMPV6 as ICMPV6,
    NEXTHDR_ROUTING as ROUTING,
};

const ETHERTYPE_IPV6: u16 = 0x86dd;

/// An extension header before the upper layer: an options-like header
/// (hop-by-hop, routing, destination options) of `units` 8-byte units
/// beyond the first, its contents padding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extension {
    pub kind: u8,
    pub units: u8,
}

/// An IPv6 frame description; `build()` renders it.
#[derive(Clone, Debug)]
pub struct Frame6 {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    pub sport: u16,
    pub dport: u16,
    pub l4: L4,
    pub extensions: Vec<Extension>,
    /// A fragment header after the extensions: offset in 8-byte units,
    /// more-fragments, identification.
    pub fragment: Option<(u16, bool, u32)>,
    pub payload: Vec<u8>,
    pub hop_limit: u8,
}

impl Frame6 {
    pub fn tcp(src: (Ipv6Addr, u16), dst: (Ipv6Addr, u16), flags: u8) -> Self {
        Self::new(src, dst, L4::Tcp { flags })
    }

    pub fn udp(src: (Ipv6Addr, u16), dst: (Ipv6Addr, u16)) -> Self {
        Self::new(src, dst, L4::Udp { checksum: true })
    }

    fn new(src: (Ipv6Addr, u16), dst: (Ipv6Addr, u16), l4: L4) -> Self {
        Self {
            src_mac: [0x02, 0, 0, 0, 0, 0x01],
            dst_mac: [0x02, 0, 0, 0, 0, 0xfe],
            src: src.0,
            dst: dst.0,
            sport: src.1,
            dport: dst.1,
            l4,
            extensions: Vec::new(),
            fragment: None,
            payload: b"underpass".to_vec(),
            hop_limit: 64,
        }
    }

    pub fn with_payload(mut self, payload: &[u8]) -> Self {
        self.payload = payload.to_vec();
        self
    }

    pub fn with_extension(mut self, kind: u8, units: u8) -> Self {
        self.extensions.push(Extension { kind, units });
        self
    }

    pub fn fragment(mut self, offset_units: u16, more: bool, id: u32) -> Self {
        self.fragment = Some((offset_units, more, id));
        self
    }

    pub fn with_macs(mut self, src: [u8; 6], dst: [u8; 6]) -> Self {
        self.src_mac = src;
        self.dst_mac = dst;
        self
    }

    /// The same flow's packet in the other direction.
    pub fn reply(&self, l4: L4) -> Self {
        Self {
            src_mac: self.dst_mac,
            dst_mac: self.src_mac,
            src: self.dst,
            dst: self.src,
            sport: self.dport,
            dport: self.sport,
            l4,
            ..self.clone()
        }
    }

    /// The upper-layer protocol.
    pub fn protocol(&self) -> u8 {
        match self.l4 {
            L4::Tcp { .. } => IPPROTO_TCP,
            L4::Udp { .. } => IPPROTO_UDP,
            L4::Other { protocol } => protocol,
        }
    }

    /// Renders the frame: headers chained in order, payload length and
    /// the L4 checksum (over the IPv6 pseudo-header) filled in. A UDP
    /// checksum of zero is sent as all ones (RFC 8200 §8.1: zero is not
    /// allowed over IPv6).
    pub fn build(&self) -> Vec<u8> {
        let upper = self.upper_bytes();
        let mut chain: Vec<u8> = Vec::new();
        let mut kinds: Vec<u8> = self.extensions.iter().map(|e| e.kind).collect();
        if self.fragment.is_some() {
            kinds.push(FRAGMENT);
        }
        kinds.push(self.protocol());
        for (i, extension) in self.extensions.iter().enumerate() {
            let mut header = vec![0u8; (usize::from(extension.units) + 1) * 8];
            header[0] = kinds[i + 1];
            header[1] = extension.units;
            chain.extend_from_slice(&header);
        }
        if let Some((offset, more, id)) = self.fragment {
            chain.push(self.protocol());
            chain.push(0);
            chain.extend_from_slice(&((offset << 3) | u16::from(more)).to_be_bytes());
            chain.extend_from_slice(&id.to_be_bytes());
        }
        let mut frame = Vec::with_capacity(ETH_LEN + IPV6_LEN + chain.len() + upper.len());
        frame.extend_from_slice(&self.dst_mac);
        frame.extend_from_slice(&self.src_mac);
        frame.extend_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
        frame.extend_from_slice(&[0x60, 0, 0, 0]);
        frame.extend_from_slice(&((chain.len() + upper.len()) as u16).to_be_bytes());
        frame.push(kinds[0]);
        frame.push(self.hop_limit);
        frame.extend_from_slice(&self.src.octets());
        frame.extend_from_slice(&self.dst.octets());
        frame.extend_from_slice(&chain);
        frame.extend_from_slice(&upper);
        frame
    }

    /// The upper-layer bytes, checksummed (a later fragment carries only
    /// payload).
    fn upper_bytes(&self) -> Vec<u8> {
        if self.fragment.is_some_and(|(offset, ..)| offset != 0) {
            return self.payload.clone();
        }
        let (src, dst) = (self.src.octets(), self.dst.octets());
        match self.l4 {
            L4::Tcp { flags } => {
                let mut tcp = vec![0u8; 20];
                tcp[0..2].copy_from_slice(&self.sport.to_be_bytes());
                tcp[2..4].copy_from_slice(&self.dport.to_be_bytes());
                tcp[4..8].copy_from_slice(&1000u32.to_be_bytes());
                tcp[8..12]
                    .copy_from_slice(&(if flags & ACK != 0 { 2000u32 } else { 0 }).to_be_bytes());
                tcp[12] = 5 << 4;
                tcp[13] = flags;
                tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
                tcp.extend_from_slice(&self.payload);
                let check = csum::l4_checksum6(src, dst, IPPROTO_TCP, &tcp);
                tcp[16..18].copy_from_slice(&check.to_ne_bytes());
                tcp
            }
            L4::Udp { .. } => {
                let mut udp = vec![0u8; 8];
                udp[0..2].copy_from_slice(&self.sport.to_be_bytes());
                udp[2..4].copy_from_slice(&self.dport.to_be_bytes());
                udp[4..6].copy_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
                udp.extend_from_slice(&self.payload);
                let mut check = csum::l4_checksum6(src, dst, IPPROTO_UDP, &udp);
                if check == 0 {
                    check = 0xffff;
                }
                udp[6..8].copy_from_slice(&check.to_ne_bytes());
                udp
            }
            L4::Other { .. } => self.payload.clone(),
        }
    }
}

/// `frame` (whole, without extension headers) cut into IPv6 fragments of
/// at most `fragment_payload` bytes of its upper-layer bytes each (a
/// multiple of 8, as RFC 8200 §4.5 requires for all but the last), with
/// identification `id`, as the kernel's IPv6 output sends a datagram
/// larger than the path MTU. The first fragment carries the TCP/UDP
/// header, whose checksum is the whole datagram's.
pub fn fragments(frame: &Frame6, fragment_payload: usize, id: u32) -> Vec<Vec<u8>> {
    assert!(fragment_payload.is_multiple_of(8) && fragment_payload > 0);
    assert!(frame.extensions.is_empty() && frame.fragment.is_none());
    let whole = frame.build();
    let header = &whole[..ETH_LEN + IPV6_LEN];
    let upper = &whole[ETH_LEN + IPV6_LEN..];
    let mut out = Vec::new();
    for (i, chunk) in upper.chunks(fragment_payload).enumerate() {
        let offset = i * fragment_payload;
        let more = offset + chunk.len() < upper.len();
        let mut piece = header.to_vec();
        piece[ETH_LEN + 4..ETH_LEN + 6].copy_from_slice(&((8 + chunk.len()) as u16).to_be_bytes());
        piece[ETH_LEN + 6] = FRAGMENT;
        piece.extend_from_slice(&[frame.protocol(), 0]);
        piece.extend_from_slice(&(((offset / 8) as u16) << 3 | u16::from(more)).to_be_bytes());
        piece.extend_from_slice(&id.to_be_bytes());
        piece.extend_from_slice(chunk);
        out.push(piece);
    }
    out
}

/// An ICMPv6 message from `src` to `dst`: `icmp_type`, `code`, the
/// 4-byte field after the checksum (`rest`: an MTU for Packet Too Big, a
/// pointer for Parameter Problem), then `body`; checksummed over the
/// pseudo-header.
pub fn icmp6(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    icmp_type: u8,
    code: u8,
    rest: u32,
    body: &[u8],
) -> Frame6 {
    let mut icmp = vec![icmp_type, code, 0, 0];
    icmp.extend_from_slice(&rest.to_be_bytes());
    icmp.extend_from_slice(body);
    let check = csum::l4_checksum6(src.octets(), dst.octets(), ICMPV6, &icmp);
    icmp[2..4].copy_from_slice(&check.to_ne_bytes());
    Frame6 {
        l4: L4::Other { protocol: ICMPV6 },
        hop_limit: 255,
        ..Frame6::udp((src, 0), (dst, 0))
    }
    .with_payload(&icmp)
}

/// A neighbour solicitation (NDP, type 135) from `src` for `target`, to
/// its solicited-node multicast address, with a source link-layer option.
pub fn neighbour_solicitation(src: Ipv6Addr, src_mac: [u8; 6], target: Ipv6Addr) -> Frame6 {
    let t = target.octets();
    let group = Ipv6Addr::new(
        0xff02,
        0,
        0,
        0,
        0,
        1,
        0xff00 | u16::from(t[13]),
        u16::from_be_bytes([t[14], t[15]]),
    );
    let mut body = t.to_vec();
    body.extend_from_slice(&[1, 1]);
    body.extend_from_slice(&src_mac);
    let g = group.octets();
    icmp6(src, group, 135, 0, 0, &body).with_macs(src_mac, [0x33, 0x33, g[12], g[13], g[14], g[15]])
}

/// What an IPv6 frame says, parsed back (for assertions).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed6 {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    /// The upper-layer protocol after the extension headers.
    pub protocol: u8,
    /// Ports (TCP/UDP; zero otherwise or in a later fragment).
    pub sport: u16,
    pub dport: u16,
    /// The upper-layer checksum verifies from scratch over the
    /// pseudo-header (`None`: a later fragment, or a protocol without
    /// one here).
    pub l4_checksum_ok: Option<bool>,
}

/// Parses an Ethernet/IPv6 frame with the headers `Frame6` writes
/// (hop-by-hop, routing, destination options, fragment), verifying the
/// upper-layer checksum from scratch. `None` if it is not such a frame.
pub fn parse6(frame: &[u8]) -> Option<Parsed6> {
    if frame.len() < ETH_LEN + IPV6_LEN
        || u16::from_be_bytes([frame[12], frame[13]]) != ETHERTYPE_IPV6
    {
        return None;
    }
    let ip = &frame[ETH_LEN..];
    let payload_len = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
    let end = IPV6_LEN + payload_len;
    if ip.len() < end {
        return None;
    }
    let src = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[8..24]).ok()?);
    let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[24..40]).ok()?);
    let mut next = ip[6];
    let mut at = IPV6_LEN;
    let mut later_fragment = false;
    loop {
        match next {
            HOP_BY_HOP | ROUTING | DEST_OPTIONS => {
                let header = ip.get(at..at + 2)?;
                next = header[0];
                at += (usize::from(header[1]) + 1) * 8;
            }
            FRAGMENT => {
                let header = ip.get(at..at + 8)?;
                next = header[0];
                later_fragment = u16::from_be_bytes([header[2], header[3]]) >> 3 != 0;
                at += 8;
            }
            _ => break,
        }
    }
    let upper = ip.get(at..end)?;
    let ports = |upper: &[u8]| -> Option<(u16, u16)> {
        Some((
            u16::from_be_bytes(upper.get(0..2)?.try_into().ok()?),
            u16::from_be_bytes(upper.get(2..4)?.try_into().ok()?),
        ))
    };
    let (sport, dport, l4_checksum_ok) = match next {
        _ if later_fragment => (0, 0, None),
        IPPROTO_TCP | IPPROTO_UDP => {
            let (sport, dport) = ports(upper)?;
            let ok = csum::l4_verifies6(src.octets(), dst.octets(), next, upper);
            (sport, dport, Some(ok))
        }
        ICMPV6 => (
            0,
            0,
            Some(csum::l4_verifies6(src.octets(), dst.octets(), next, upper)),
        ),
        _ => (0, 0, None),
    };
    Some(Parsed6 {
        dst_mac: frame[0..6].try_into().ok()?,
        src_mac: frame[6..12].try_into().ok()?,
        src,
        dst,
        protocol: next,
        sport,
        dport,
        l4_checksum_ok,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::SYN;

    fn a() -> (Ipv6Addr, u16) {
        ("fd77::2".parse().unwrap(), 40000)
    }

    fn b() -> (Ipv6Addr, u16) {
        ("fd00:10:96::a".parse().unwrap(), 80)
    }

    #[test]
    fn built_frames_parse_back_with_valid_checksums() {
        for frame in [
            Frame6::tcp(a(), b(), SYN),
            Frame6::udp(a(), b()),
            Frame6::tcp(a(), b(), ACK)
                .with_extension(HOP_BY_HOP, 0)
                .with_extension(DEST_OPTIONS, 2),
            Frame6::udp(a(), b())
                .with_extension(ROUTING, 1)
                .fragment(0, true, 7),
        ] {
            let parsed = parse6(&frame.build()).unwrap();
            assert_eq!(parsed.l4_checksum_ok, Some(true), "{frame:?}");
            assert_eq!(
                (parsed.src, parsed.sport, parsed.dst, parsed.dport),
                (a().0, a().1, b().0, b().1)
            );
            assert_eq!(parsed.protocol, frame.protocol());
        }
        let later = parse6(&Frame6::udp(a(), b()).fragment(3, false, 7).build()).unwrap();
        assert_eq!(
            (later.protocol, later.sport, later.l4_checksum_ok),
            (IPPROTO_UDP, 0, None)
        );
        let ns = neighbour_solicitation(a().0, [2, 0, 0, 0, 0, 2], b().0);
        let parsed = parse6(&ns.build()).unwrap();
        assert_eq!(parsed.protocol, ICMPV6);
        assert_eq!(parsed.l4_checksum_ok, Some(true));
        assert_eq!(parsed.dst, "ff02::1:ff00:a".parse::<Ipv6Addr>().unwrap());
        assert_eq!(parsed.dst_mac, [0x33, 0x33, 0xff, 0, 0, 0x0a]);
    }

    /// The frames agree with the datapath's header walk on where the
    /// upper layer is (the walk is tested on its own table; this checks
    /// the two were not written to the same mistake by one reader).
    #[test]
    fn the_datapath_walk_finds_the_upper_layer_where_the_builder_put_it() {
        use datapath_common::ipv6::{Upper, upper_layer};
        let frame = Frame6::tcp(a(), b(), SYN)
            .with_extension(HOP_BY_HOP, 1)
            .with_extension(ROUTING, 0)
            .build();
        let ip = &frame[ETH_LEN..];
        let found = upper_layer(ip[6], |at| ip.get(at..at + 8)?.try_into().ok());
        assert_eq!(
            found,
            Upper::Found {
                protocol: IPPROTO_TCP,
                offset: IPV6_LEN + 16 + 8,
                fragment: None
            }
        );
        assert_eq!(
            u16::from_be_bytes([ip[IPV6_LEN + 24], ip[IPV6_LEN + 25]]),
            a().1,
            "the source port is there"
        );
    }

    #[test]
    fn a_flipped_bit_is_caught() {
        let mut bytes = Frame6::tcp(a(), b(), ACK).build();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        assert_eq!(parse6(&bytes).unwrap().l4_checksum_ok, Some(false));
        // An address bit: the pseudo-header no longer matches.
        let mut bytes = Frame6::udp(a(), b()).build();
        bytes[ETH_LEN + 8 + 15] ^= 1;
        assert_eq!(parse6(&bytes).unwrap().l4_checksum_ok, Some(false));
    }
}
