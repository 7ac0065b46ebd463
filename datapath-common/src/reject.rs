//! The ICMP "port unreachable" the TC path answers with when a service has
//! no endpoint, as kube-proxy's `REJECT` rule does: TCP's `connect()`
//! fails at once with ECONNREFUSED and a UDP socket sees ECONNREFUSED,
//! instead of retrying into a silent drop for minutes.
//!
//! The whole frame is built here, pure, from the refused packet's L2
//! addresses and the first bytes it carried; the datapath only resizes the
//! packet, stores the frame and turns it around into the pod.

use crate::csum::{self, accumulate};

/// Bytes of the refused packet an ICMP error quotes: its IP header
/// (without options: the datapath refuses only such packets, which is
/// every packet a pod sends) and the first 8 bytes of its L4 header (RFC
/// 792), where the ports are.
pub const QUOTED_LEN: usize = 20 + 8;
/// Ethernet + IPv4 + ICMP header + the quoted bytes.
pub const FRAME_LEN: usize = 14 + 20 + 8 + QUOTED_LEN;

const ETHERTYPE_IPV4: [u8; 2] = [0x08, 0x00];
const IPPROTO_ICMP: u8 = 1;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;
const TTL: u8 = 64;

/// The frame that refuses a packet: addressed back to its sender (the MACs
/// swapped, so it arrives as addressed to the pod's interface), from the
/// address it was sent to (the ClusterIP, as the socket expects), quoting
/// `quoted` (the refused packet's IP header and first 8 L4 bytes).
pub fn port_unreachable(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    quoted: &[u8; QUOTED_LEN],
) -> [u8; FRAME_LEN] {
    let mut frame = [0u8; FRAME_LEN];
    // Ethernet: back to the sender.
    frame[0..6].copy_from_slice(&src_mac);
    frame[6..12].copy_from_slice(&dst_mac);
    frame[12..14].copy_from_slice(&ETHERTYPE_IPV4);
    // IPv4: from the refused packet's destination to its source.
    let ip = 14;
    let total = (FRAME_LEN - 14) as u16;
    frame[ip] = 0x45;
    frame[ip + 2..ip + 4].copy_from_slice(&total.to_be_bytes());
    frame[ip + 8] = TTL;
    frame[ip + 9] = IPPROTO_ICMP;
    frame[ip + 12..ip + 16].copy_from_slice(&quoted[16..20]);
    frame[ip + 16..ip + 20].copy_from_slice(&quoted[12..16]);
    let ip_check = csum::checksum(&frame[ip..ip + 20]);
    frame[ip + 10..ip + 12].copy_from_slice(&ip_check.to_ne_bytes());
    // ICMP destination unreachable, port unreachable, quoting the packet.
    let icmp = ip + 20;
    frame[icmp] = ICMP_DEST_UNREACH;
    frame[icmp + 1] = ICMP_PORT_UNREACH;
    frame[icmp + 8..].copy_from_slice(quoted);
    let icmp_check = csum::checksum(&frame[icmp..]);
    frame[icmp + 2..icmp + 4].copy_from_slice(&icmp_check.to_ne_bytes());
    frame
}

/// Bytes of a refused IPv6 packet its ICMPv6 error quotes: the fixed
/// header and the 8 bytes after it (the ports, when no extension header
/// comes first). RFC 4443 asks for as much as fits; this is what
/// identifies the socket.
pub const QUOTED6_LEN: usize = 40 + 8;
/// Ethernet + IPv6 + ICMPv6 header + the quoted bytes.
pub const FRAME6_LEN: usize = 14 + 40 + 8 + QUOTED6_LEN;

/// Ethernet type of IPv6.
pub const ETHERTYPE_IPV6: [u8; 2] = [0x86, 0xdd];
const NEXTHDR_ICMPV6: u8 = 58;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PORT_UNREACH: u8 = 4;

/// The headers of the ICMPv6 refusal of an IPv6 packet whose first
/// `QUOTED6_LEN` bytes (from its IPv6 header on) are `quoted`: ICMPv6
/// destination unreachable, port unreachable (type 1, code 4:
/// ECONNREFUSED for TCP and UDP sockets), from the refused packet's
/// destination to its source, its checksum over the IPv6 pseudo-header,
/// the ICMPv6 header and the quote. Apart from the quote, so that the
/// datapath stores the pieces without a whole frame on its stack.
pub struct Refusal6 {
    /// The IPv6 header.
    pub ip: [u8; 40],
    /// The ICMPv6 header (type, code, checksum, unused word); the quote
    /// follows it.
    pub icmp: [u8; 8],
}

/// `Refusal6` for `quoted`.
#[inline(always)]
pub fn refusal6(quoted: &[u8; QUOTED6_LEN]) -> Refusal6 {
    let mut ip = [0u8; 40];
    ip[0] = 0x60;
    let payload = (8 + QUOTED6_LEN) as u16;
    ip[4..6].copy_from_slice(&payload.to_be_bytes());
    ip[6] = NEXTHDR_ICMPV6;
    ip[7] = TTL;
    ip[8..24].copy_from_slice(&quoted[24..40]);
    ip[24..40].copy_from_slice(&quoted[8..24]);
    let mut icmp = [ICMPV6_DEST_UNREACH, ICMPV6_PORT_UNREACH, 0, 0, 0, 0, 0, 0];
    // The pseudo-header: source, destination, length, next header.
    let mut sum = accumulate(&ip[8..40], 0);
    sum = accumulate(&u32::from(payload).to_be_bytes(), sum);
    sum = accumulate(&[0, 0, 0, NEXTHDR_ICMPV6], sum);
    sum = accumulate(&icmp, sum);
    sum = accumulate(quoted, sum);
    icmp[2..4].copy_from_slice(&(!csum::fold(sum)).to_ne_bytes());
    Refusal6 { ip, icmp }
}

/// Ethernet + IPv6 + a TCP header without options: the reset that
/// refuses an IPv6 TCP SYN.
pub const RESET6_FRAME_LEN: usize = 14 + 40 + 20;

const NEXTHDR_TCP: u8 = 6;
const TCP_RST_ACK: u8 = 0x14;

/// The headers of the TCP reset that refuses an IPv6 SYN whose first
/// `QUOTED6_LEN` bytes are `quoted` (its TCP header right after the fixed
/// one): RST+ACK from the SYN's destination to its source, sequence 0,
/// acknowledging the SYN (RFC 9293 §3.10.7.1), its checksum over the IPv6
/// pseudo header. A socket refused this way fails with ECONNREFUSED at
/// once even when the refusal arrives while `connect()` still holds the
/// socket (the refusal is made on the SYN's own transmit path): a segment
/// waits in the socket's backlog for the lock, where an ICMPv6 error
/// would only be kept as a soft error until the SYN's retransmission.
pub struct Reset6 {
    /// The IPv6 header.
    pub ip: [u8; 40],
    /// The TCP header.
    pub tcp: [u8; 20],
}

/// `Reset6` for `quoted`.
#[inline(always)]
pub fn reset6(quoted: &[u8; QUOTED6_LEN]) -> Reset6 {
    let mut ip = [0u8; 40];
    ip[0] = 0x60;
    ip[4..6].copy_from_slice(&20u16.to_be_bytes());
    ip[6] = NEXTHDR_TCP;
    ip[7] = TTL;
    ip[8..24].copy_from_slice(&quoted[24..40]);
    ip[24..40].copy_from_slice(&quoted[8..24]);
    let mut tcp = [0u8; 20];
    // Ports swapped; sequence 0; acknowledging the SYN's one sequence
    // number; header length 5 words; RST+ACK; window 0.
    tcp[0..2].copy_from_slice(&quoted[42..44]);
    tcp[2..4].copy_from_slice(&quoted[40..42]);
    let syn_seq = u32::from_be_bytes([quoted[44], quoted[45], quoted[46], quoted[47]]);
    tcp[8..12].copy_from_slice(&syn_seq.wrapping_add(1).to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = TCP_RST_ACK;
    let mut sum = accumulate(&ip[8..40], 0);
    sum = accumulate(&20u32.to_be_bytes(), sum);
    sum = accumulate(&[0, 0, 0, NEXTHDR_TCP], sum);
    sum = accumulate(&tcp, sum);
    tcp[16..18].copy_from_slice(&(!csum::fold(sum)).to_ne_bytes());
    Reset6 { ip, tcp }
}

/// The whole refusal frame of an IPv6 packet (`refusal6` with Ethernet
/// back to the sender and the quote), for tests and tools.
pub fn port_unreachable6(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    quoted: &[u8; QUOTED6_LEN],
) -> [u8; FRAME6_LEN] {
    let headers = refusal6(quoted);
    let mut frame = [0u8; FRAME6_LEN];
    frame[0..6].copy_from_slice(&src_mac);
    frame[6..12].copy_from_slice(&dst_mac);
    frame[12..14].copy_from_slice(&ETHERTYPE_IPV6);
    frame[14..54].copy_from_slice(&headers.ip);
    frame[54..62].copy_from_slice(&headers.icmp);
    frame[62..].copy_from_slice(quoted);
    frame
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A TCP SYN 10.244.0.5:40000 → 10.96.0.10:80 (IP header + 8 bytes).
    fn syn_quote() -> [u8; QUOTED_LEN] {
        let mut q = [0u8; QUOTED_LEN];
        q[0] = 0x45;
        q[2..4].copy_from_slice(&60u16.to_be_bytes());
        q[8] = 64;
        q[9] = 6;
        q[12..16].copy_from_slice(&[10, 244, 0, 5]);
        q[16..20].copy_from_slice(&[10, 96, 0, 10]);
        let check = csum::checksum(&q[..20]);
        q[10..12].copy_from_slice(&check.to_ne_bytes());
        q[20..22].copy_from_slice(&40000u16.to_be_bytes());
        q[22..24].copy_from_slice(&80u16.to_be_bytes());
        q[24..28].copy_from_slice(&[1, 2, 3, 4]);
        q
    }

    #[test]
    fn the_frame_goes_back_to_the_sender_from_the_service_with_valid_checksums() {
        let pod = [2, 0, 0, 0, 0, 5];
        let gateway = [2, 0, 0, 0, 0, 1];
        let frame = port_unreachable(gateway, pod, &syn_quote());
        assert_eq!(&frame[0..6], &pod, "to the pod's MAC");
        assert_eq!(&frame[6..12], &gateway);
        assert_eq!(&frame[12..14], &[0x08, 0x00]);
        let ip = &frame[14..34];
        assert!(csum::verifies(ip), "IP header checksum");
        assert_eq!(u16::from_be_bytes([ip[2], ip[3]]) as usize, FRAME_LEN - 14);
        assert_eq!(ip[9], 1, "ICMP");
        assert_eq!(&ip[12..16], &[10, 96, 0, 10], "from the ClusterIP");
        assert_eq!(&ip[16..20], &[10, 244, 0, 5], "to the client");
        let icmp = &frame[34..];
        assert_eq!((icmp[0], icmp[1]), (3, 3), "port unreachable");
        assert!(csum::verifies(icmp), "ICMP checksum over header and quote");
        assert_eq!(&icmp[8..], &syn_quote(), "quotes the refused packet");
    }

    #[test]
    fn an_ipv6_syn_is_reset_from_the_service_acknowledging_it_with_a_valid_checksum() {
        let client: [u8; 16] = [0xfd, 0x77, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5];
        let vip: [u8; 16] = [0xfd, 0, 0, 0x10, 0, 0x96, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x0a];
        let mut q = [0u8; QUOTED6_LEN];
        q[0] = 0x60;
        q[6] = 6;
        q[8..24].copy_from_slice(&client);
        q[24..40].copy_from_slice(&vip);
        q[40..42].copy_from_slice(&40000u16.to_be_bytes());
        q[42..44].copy_from_slice(&80u16.to_be_bytes());
        q[44..48].copy_from_slice(&0xffff_ffffu32.to_be_bytes());
        let reset = reset6(&q);
        assert_eq!(u16::from_be_bytes([reset.ip[4], reset.ip[5]]), 20);
        assert_eq!(reset.ip[6], 6, "TCP");
        assert_eq!(
            (&reset.ip[8..24], &reset.ip[24..40]),
            (&vip[..], &client[..])
        );
        let tcp = &reset.tcp;
        assert_eq!(u16::from_be_bytes([tcp[0], tcp[1]]), 80);
        assert_eq!(u16::from_be_bytes([tcp[2], tcp[3]]), 40000);
        assert_eq!(&tcp[4..8], &[0; 4], "sequence 0");
        assert_eq!(&tcp[8..12], &[0; 4], "acknowledges the SYN (wrapping)");
        assert_eq!((tcp[12], tcp[13]), (0x50, 0x14), "5 words, RST+ACK");
        assert!(csum::l4_verifies6(vip, client, 6, tcp), "TCP checksum");
    }

    #[test]
    fn the_ipv6_frame_goes_back_to_the_sender_from_the_service_with_a_valid_checksum() {
        // A TCP SYN [fd77::5]:40000 → [fd00:10:96::a]:80, header + 8 bytes.
        let client: [u8; 16] = [0xfd, 0x77, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5];
        let vip: [u8; 16] = [0xfd, 0, 0, 0x10, 0, 0x96, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x0a];
        let mut q = [0u8; QUOTED6_LEN];
        q[0] = 0x60;
        q[4..6].copy_from_slice(&40u16.to_be_bytes());
        q[6] = 6;
        q[7] = 64;
        q[8..24].copy_from_slice(&client);
        q[24..40].copy_from_slice(&vip);
        q[40..42].copy_from_slice(&40000u16.to_be_bytes());
        q[42..44].copy_from_slice(&80u16.to_be_bytes());
        let pod = [2, 0, 0, 0, 0, 5];
        let gateway = [2, 0, 0, 0, 0, 1];
        let frame = port_unreachable6(gateway, pod, &q);
        assert_eq!((&frame[0..6], &frame[6..12]), (&pod[..], &gateway[..]));
        assert_eq!(&frame[12..14], &[0x86, 0xdd]);
        let ip = &frame[14..54];
        assert_eq!(ip[0] >> 4, 6);
        assert_eq!(u16::from_be_bytes([ip[4], ip[5]]) as usize, FRAME6_LEN - 54);
        assert_eq!(ip[6], 58, "ICMPv6");
        assert_eq!(&ip[8..24], &vip, "from the ClusterIP");
        assert_eq!(&ip[24..40], &client, "to the client");
        let icmp = &frame[54..];
        assert_eq!((icmp[0], icmp[1]), (1, 4), "port unreachable");
        assert!(csum::l4_verifies6(vip, client, 58, icmp), "ICMPv6 checksum");
        assert_eq!(&icmp[8..], &q, "quotes the refused packet");
    }
}
