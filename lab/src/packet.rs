//! Crafting and checking Ethernet/IPv4/TCP|UDP frames, for the
//! BPF_PROG_TEST_RUN suite and the per-packet cost bench. Checksums are
//! always computed from scratch here, independently of the datapath's
//! incremental updates.

use std::net::Ipv4Addr;

use datapath_common::{IPPROTO_TCP, IPPROTO_UDP, csum};

pub const ETH_LEN: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;

/// TCP flag bits.
pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;

/// The L4 part of a frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum L4 {
    Tcp {
        flags: u8,
    },
    /// `checksum: false` sends a zero ("no checksum") UDP checksum.
    Udp {
        checksum: bool,
    },
    /// Another IP protocol, carried as opaque payload.
    Other {
        protocol: u8,
    },
}

/// A frame description; `build()` renders it.
#[derive(Clone, Debug)]
pub struct Frame {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub l4: L4,
    /// IP options (padded to a multiple of 4 bytes by `build`).
    pub ip_options: Vec<u8>,
    /// Fragment offset in 8-byte units, and the more-fragments bit.
    pub fragment_offset: u16,
    pub more_fragments: bool,
    pub payload: Vec<u8>,
    /// TCP sequence number.
    pub seq: u32,
}

impl Frame {
    pub fn tcp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), flags: u8) -> Self {
        Self::new(src, dst, L4::Tcp { flags })
    }

    pub fn udp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> Self {
        Self::new(src, dst, L4::Udp { checksum: true })
    }

    fn new(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), l4: L4) -> Self {
        Self {
            src_mac: [0x02, 0, 0, 0, 0, 0x01],
            dst_mac: [0x02, 0, 0, 0, 0, 0xfe],
            src: src.0,
            dst: dst.0,
            sport: src.1,
            dport: dst.1,
            l4,
            ip_options: Vec::new(),
            fragment_offset: 0,
            more_fragments: false,
            seq: 1000,
            payload: b"underpass".to_vec(),
        }
    }

    /// Another TCP sequence number (a different connection's ISN).
    pub fn with_seq(mut self, seq: u32) -> Self {
        self.seq = seq;
        self
    }

    pub fn with_payload(mut self, payload: &[u8]) -> Self {
        self.payload = payload.to_vec();
        self
    }

    pub fn with_ip_options(mut self, options: &[u8]) -> Self {
        self.ip_options = options.to_vec();
        self
    }

    pub fn with_macs(mut self, src: [u8; 6], dst: [u8; 6]) -> Self {
        self.src_mac = src;
        self.dst_mac = dst;
        self
    }

    pub fn without_udp_checksum(mut self) -> Self {
        self.l4 = L4::Udp { checksum: false };
        self
    }

    pub fn fragment(mut self, offset_units: u16, more: bool) -> Self {
        self.fragment_offset = offset_units;
        self.more_fragments = more;
        self
    }

    /// The same flow's packet in the other direction (addresses, ports and
    /// MACs swapped), with `l4` flags.
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

    pub fn protocol(&self) -> u8 {
        match self.l4 {
            L4::Tcp { .. } => IPPROTO_TCP,
            L4::Udp { .. } => IPPROTO_UDP,
            L4::Other { protocol } => protocol,
        }
    }

    /// Renders the frame with correct IPv4 and L4 checksums.
    pub fn build(&self) -> Vec<u8> {
        let mut options = self.ip_options.clone();
        while !options.len().is_multiple_of(4) {
            options.push(0); // End of Option List
        }
        let ihl = 20 + options.len();
        let l4 = self.l4_bytes();
        let total = ihl + l4.len();
        let mut frame = Vec::with_capacity(ETH_LEN + total);
        frame.extend_from_slice(&self.dst_mac);
        frame.extend_from_slice(&self.src_mac);
        frame.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());

        let mut ip = vec![0u8; 20];
        ip[0] = 0x40 | (ihl / 4) as u8;
        ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        ip[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
        let frag = (u16::from(self.more_fragments) << 13) | (self.fragment_offset & 0x1fff);
        ip[6..8].copy_from_slice(&frag.to_be_bytes());
        ip[8] = 64;
        ip[9] = self.protocol();
        ip[12..16].copy_from_slice(&self.src.octets());
        ip[16..20].copy_from_slice(&self.dst.octets());
        ip.extend_from_slice(&options);
        let check = csum::checksum(&ip);
        ip[10..12].copy_from_slice(&check.to_ne_bytes());
        frame.extend_from_slice(&ip);
        frame.extend_from_slice(&l4);
        frame
    }

    fn l4_bytes(&self) -> Vec<u8> {
        let (src, dst) = (self.src.octets(), self.dst.octets());
        match self.l4 {
            L4::Tcp { flags } => {
                let mut tcp = vec![0u8; 20];
                tcp[0..2].copy_from_slice(&self.sport.to_be_bytes());
                tcp[2..4].copy_from_slice(&self.dport.to_be_bytes());
                tcp[4..8].copy_from_slice(&self.seq.to_be_bytes());
                tcp[8..12]
                    .copy_from_slice(&(if flags & ACK != 0 { 2000u32 } else { 0 }).to_be_bytes());
                tcp[12] = 5 << 4;
                tcp[13] = flags;
                tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
                tcp.extend_from_slice(&self.payload);
                let check = csum::l4_checksum(src, dst, IPPROTO_TCP, &tcp);
                tcp[16..18].copy_from_slice(&check.to_ne_bytes());
                tcp
            }
            L4::Udp { checksum } => {
                let mut udp = vec![0u8; 8];
                udp[0..2].copy_from_slice(&self.sport.to_be_bytes());
                udp[2..4].copy_from_slice(&self.dport.to_be_bytes());
                udp[4..6].copy_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
                udp.extend_from_slice(&self.payload);
                if checksum {
                    let check = csum::l4_checksum(src, dst, IPPROTO_UDP, &udp);
                    udp[6..8].copy_from_slice(&check.to_ne_bytes());
                }
                udp
            }
            L4::Other { .. } => self.payload.clone(),
        }
    }
}

/// An ICMP error from `src` to `dst` quoting `quoted` (an IP packet, as
/// much of it as the sender quotes): `icmp_type`/`code` (3/4 with
/// `next_hop_mtu` for "fragmentation needed"), checksum filled in.
pub fn icmp_error(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    icmp_type: u8,
    code: u8,
    next_hop_mtu: u16,
    quoted: &[u8],
) -> Frame {
    let mut icmp = vec![icmp_type, code, 0, 0, 0, 0];
    icmp.extend_from_slice(&next_hop_mtu.to_be_bytes());
    icmp.extend_from_slice(quoted);
    let check = csum::checksum(&icmp);
    icmp[2..4].copy_from_slice(&check.to_ne_bytes());
    Frame {
        l4: L4::Other { protocol: 1 },
        ..Frame::udp((src, 0), (dst, 0))
    }
    .with_payload(&icmp)
}

/// `frame` cut into IPv4 fragments of at most `fragment_payload` bytes of
/// IP payload each (a multiple of 8, as RFC 791 requires for all but the
/// last), as the kernel's IP output would send a datagram over a smaller
/// MTU. The first fragment carries the L4 header.
pub fn fragments(frame: &Frame, fragment_payload: usize) -> Vec<Vec<u8>> {
    assert!(fragment_payload.is_multiple_of(8) && fragment_payload > 0);
    let whole = frame.build();
    let ihl = usize::from(whole[ETH_LEN] & 0x0f) * 4;
    let header = &whole[..ETH_LEN + ihl];
    let payload = &whole[ETH_LEN + ihl..];
    let mut out = Vec::new();
    for (i, chunk) in payload.chunks(fragment_payload).enumerate() {
        let offset = i * fragment_payload;
        let more = offset + chunk.len() < payload.len();
        let mut piece = header.to_vec();
        piece.extend_from_slice(chunk);
        let ip = &mut piece[ETH_LEN..ETH_LEN + ihl];
        ip[2..4].copy_from_slice(&((ihl + chunk.len()) as u16).to_be_bytes());
        let field = (u16::from(more) << 13) | (offset / 8) as u16;
        ip[6..8].copy_from_slice(&field.to_be_bytes());
        ip[10..12].copy_from_slice(&[0, 0]);
        let check = csum::checksum(ip);
        ip[10..12].copy_from_slice(&check.to_ne_bytes());
        out.push(piece);
    }
    out
}

/// The datagram `pieces` (fragments, in any order) reassemble to: source,
/// destination and L4 bytes. `None` when they disagree on the addresses,
/// a header checksum is wrong, or a piece is missing.
pub fn reassemble(pieces: &[Vec<u8>]) -> Option<([u8; 4], [u8; 4], Vec<u8>)> {
    let mut parts = Vec::new();
    let mut ends = None;
    for piece in pieces {
        let ip_start = ETH_LEN;
        let ihl = usize::from(piece[ip_start] & 0x0f) * 4;
        let ip = &piece[ip_start..ip_start + ihl];
        if !csum::verifies(ip) {
            return None;
        }
        let src: [u8; 4] = ip[12..16].try_into().ok()?;
        let dst: [u8; 4] = ip[16..20].try_into().ok()?;
        match ends {
            None => ends = Some((src, dst)),
            Some(known) if known != (src, dst) => return None,
            Some(_) => {}
        }
        let field = u16::from_be_bytes([ip[6], ip[7]]);
        let offset = usize::from(field & 0x1fff) * 8;
        parts.push((
            offset,
            field & 0x2000 != 0,
            piece[ip_start + ihl..].to_vec(),
        ));
    }
    parts.sort_by_key(|(offset, _, _)| *offset);
    let mut l4 = Vec::new();
    for (offset, _, bytes) in &parts {
        if *offset != l4.len() {
            return None;
        }
        l4.extend_from_slice(bytes);
    }
    if parts.last()?.1 {
        return None; // the last piece says more follow
    }
    let (src, dst) = ends?;
    Some((src, dst, l4))
}

/// What a frame says, parsed back (for assertions).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub protocol: u8,
    /// The IPv4 header checksum verifies from scratch.
    pub ip_checksum_ok: bool,
    /// The L4 checksum verifies from scratch (`None`: UDP sent without one).
    pub l4_checksum_ok: Option<bool>,
}

/// Parses an Ethernet/IPv4/TCP|UDP frame and verifies its checksums from
/// scratch. `None` if it is not such a frame.
pub fn parse(frame: &[u8]) -> Option<Parsed> {
    if frame.len() < ETH_LEN + 20 || u16::from_be_bytes([frame[12], frame[13]]) != ETHERTYPE_IPV4 {
        return None;
    }
    let ip = &frame[ETH_LEN..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if ihl < 20 || total < ihl || ip.len() < total {
        return None;
    }
    let src: [u8; 4] = ip[12..16].try_into().ok()?;
    let dst: [u8; 4] = ip[16..20].try_into().ok()?;
    let protocol = ip[9];
    let segment = &ip[ihl..total];
    if segment.len() < 8 {
        return None;
    }
    let l4_checksum_ok = match protocol {
        IPPROTO_UDP if segment[6..8] == [0, 0] => None,
        IPPROTO_TCP | IPPROTO_UDP => Some(csum::l4_verifies(src, dst, protocol, segment)),
        _ => None,
    };
    Some(Parsed {
        dst_mac: frame[0..6].try_into().ok()?,
        src_mac: frame[6..12].try_into().ok()?,
        src: src.into(),
        dst: dst.into(),
        sport: u16::from_be_bytes([segment[0], segment[1]]),
        dport: u16::from_be_bytes([segment[2], segment[3]]),
        protocol,
        ip_checksum_ok: csum::verifies(&ip[..ihl]),
        l4_checksum_ok,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_frames_parse_back_with_valid_checksums() {
        let a = (Ipv4Addr::new(10, 0, 0, 1), 40000);
        let b = (Ipv4Addr::new(10, 96, 0, 10), 80);
        for frame in [
            Frame::tcp(a, b, SYN),
            Frame::udp(a, b),
            Frame::tcp(a, b, ACK).with_ip_options(&[1, 1, 1, 1, 7, 3, 4]),
        ] {
            let parsed = parse(&frame.build()).unwrap();
            assert!(parsed.ip_checksum_ok);
            assert_eq!(parsed.l4_checksum_ok, Some(true));
            assert_eq!(
                (parsed.src, parsed.sport, parsed.dst, parsed.dport),
                (a.0, a.1, b.0, b.1)
            );
        }
        let no_sum = parse(&Frame::udp(a, b).without_udp_checksum().build()).unwrap();
        assert_eq!(no_sum.l4_checksum_ok, None);
    }

    #[test]
    fn a_flipped_bit_is_caught() {
        let mut bytes = Frame::tcp(
            (Ipv4Addr::new(10, 0, 0, 1), 1),
            (Ipv4Addr::new(10, 0, 0, 2), 2),
            ACK,
        )
        .build();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        assert_eq!(parse(&bytes).unwrap().l4_checksum_ok, Some(false));
        bytes[ETH_LEN + 8] ^= 1; // TTL
        assert!(!parse(&bytes).unwrap().ip_checksum_ok);
    }
}
