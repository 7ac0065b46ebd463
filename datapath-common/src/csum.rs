//! Internet checksum arithmetic (RFC 1071, incremental update RFC 1624).
//!
//! All values are "raw": 16-bit words read from packet bytes with
//! `from_ne_bytes`. The ones'-complement sum commutes with byte swapping,
//! so working on raw words gives the raw checksum on either endianness and
//! the datapath never converts byte order.

/// Folds a 32-bit ones'-complement accumulator to 16 bits.
#[inline(always)]
pub const fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// Adds `data` to a ones'-complement accumulator as raw 16-bit words (an
/// odd trailing byte is padded with zero, as RFC 1071 says).
pub fn accumulate(data: &[u8], mut sum: u32) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for word in &mut chunks {
        sum = fold_add(sum, u16::from_ne_bytes([word[0], word[1]]) as u32);
    }
    if let [last] = chunks.remainder() {
        sum = fold_add(sum, u16::from_ne_bytes([*last, 0]) as u32);
    }
    sum
}

#[inline(always)]
const fn fold_add(sum: u32, value: u32) -> u32 {
    let total = sum as u64 + value as u64;
    ((total & 0xffff_ffff) + (total >> 32)) as u32
}

/// The checksum (raw) that makes `data` sum to all-ones: what belongs in
/// the checksum field when the field itself is zero in `data`.
pub fn checksum(data: &[u8]) -> u16 {
    !fold(accumulate(data, 0))
}

/// True when `data` (with its checksum field filled in) verifies.
pub fn verifies(data: &[u8]) -> bool {
    fold(accumulate(data, 0)) == 0xffff
}

/// The IPv4 pseudo-header sum for a TCP/UDP segment of `l4_len` bytes.
pub fn pseudo_header(src: [u8; 4], dst: [u8; 4], protocol: u8, l4_len: u16) -> u32 {
    let mut sum = accumulate(&src, 0);
    sum = accumulate(&dst, sum);
    sum = accumulate(&[0, protocol], sum);
    accumulate(&l4_len.to_be_bytes(), sum)
}

/// True when a TCP/UDP segment (header + payload, checksum filled in)
/// verifies against its pseudo header.
pub fn l4_verifies(src: [u8; 4], dst: [u8; 4], protocol: u8, segment: &[u8]) -> bool {
    verifies_after(
        pseudo_header(src, dst, protocol, segment.len() as u16),
        segment,
    )
}

/// The L4 checksum (raw) for `segment` whose checksum field is zero.
/// Returns 0xffff instead of 0 for UDP, where 0 means "no checksum".
pub fn l4_checksum(src: [u8; 4], dst: [u8; 4], protocol: u8, segment: &[u8]) -> u16 {
    checksum_after(
        pseudo_header(src, dst, protocol, segment.len() as u16),
        protocol,
        segment,
    )
}

/// True when `segment` sums to all-ones after its pseudo header's `sum`.
fn verifies_after(sum: u32, segment: &[u8]) -> bool {
    fold(accumulate(segment, sum)) == 0xffff
}

/// The checksum of `segment` (its field zero) after its pseudo header's
/// `sum`; a UDP sum of 0 is sent as 0xffff (0 means "none" over IPv4 and
/// is not allowed over IPv6).
fn checksum_after(sum: u32, protocol: u8, segment: &[u8]) -> u16 {
    let check = !fold(accumulate(segment, sum));
    if check == 0 && protocol == crate::IPPROTO_UDP {
        0xffff
    } else {
        check
    }
}

/// The IPv6 pseudo-header sum (RFC 8200 §8.1) for an upper-layer packet
/// of `l4_len` bytes whose header is `next_header` (TCP, UDP, ICMPv6).
pub fn pseudo_header6(src: [u8; 16], dst: [u8; 16], next_header: u8, l4_len: u32) -> u32 {
    let mut sum = accumulate(&src, 0);
    sum = accumulate(&dst, sum);
    sum = accumulate(&l4_len.to_be_bytes(), sum);
    accumulate(&[0, 0, 0, next_header], sum)
}

/// True when an upper-layer packet (checksum filled in) verifies against
/// its IPv6 pseudo header.
pub fn l4_verifies6(src: [u8; 16], dst: [u8; 16], next_header: u8, segment: &[u8]) -> bool {
    verifies_after(
        pseudo_header6(src, dst, next_header, segment.len() as u32),
        segment,
    )
}

/// The checksum (raw) for an upper-layer packet over IPv6 whose checksum
/// field is zero. UDP over IPv6 must have one (RFC 8200 §8.1): a sum of
/// 0 is sent as 0xffff.
pub fn l4_checksum6(src: [u8; 16], dst: [u8; 16], next_header: u8, segment: &[u8]) -> u16 {
    let sum = pseudo_header6(src, dst, next_header, segment.len() as u32);
    checksum_after(sum, next_header, segment)
}

/// RFC 1624 eqn. 3: the checksum after a 16-bit word changes from `old`
/// to `new`. `HC' = ~(~HC + ~m + m')`.
#[inline(always)]
pub const fn replace_u16(check: u16, old: u16, new: u16) -> u16 {
    let sum = (!check) as u32 + (!old) as u32 + new as u32;
    !fold(sum)
}

/// The checksum after a 32-bit field (two words) changes.
#[inline(always)]
pub const fn replace_u32(check: u16, old: u32, new: u32) -> u16 {
    let sum = (!check) as u32 + ((!old) & 0xffff) + ((!old) >> 16) + (new & 0xffff) + (new >> 16);
    !fold(sum)
}

/// The checksum after a 128-bit field (an IPv6 address in the pseudo
/// header: four raw 32-bit words) changes. As RFC 1624 eqn. 3 it may
/// give 0x0000: a UDP caller must send that as 0xffff (0 means "no
/// checksum", which IPv6 forbids), as the helpers' `BPF_F_MARK_MANGLED_0`
/// does.
#[inline(always)]
pub const fn replace_u128(check: u16, old: [u32; 4], new: [u32; 4]) -> u16 {
    // At most 0xffff + 8 × 0x1fffe: no overflow before the fold.
    let mut sum = (!check) as u32;
    let mut i = 0;
    while i < 4 {
        sum += ((!old[i]) & 0xffff) + ((!old[i]) >> 16) + (new[i] & 0xffff) + (new[i] >> 16);
        i += 1;
    }
    !fold(sum)
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng, rngs::StdRng};

    use super::*;

    /// RFC 1071 §3 example: words 0001 f203 f4f5 f6f7 sum to ddf2.
    #[test]
    fn rfc1071_example() {
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(u16::from_be(fold(accumulate(&data, 0))), 0xddf2);
    }

    /// A real IPv4 header (from a capture) verifies and recomputes.
    #[test]
    fn ipv4_header_from_capture() {
        let mut header = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert!(verifies(&header));
        header[10] = 0;
        header[11] = 0;
        assert_eq!(checksum(&header).to_ne_bytes(), [0xb8, 0x61]);
    }

    /// Incremental updates agree with from-scratch sums on random headers
    /// and random rewrites, at random word offsets.
    #[test]
    fn incremental_matches_from_scratch() {
        let mut rng = StdRng::seed_from_u64(0x756e_6465_7270);
        for _ in 0..100_000 {
            let len = 2 * rng.random_range(4..40usize);
            let mut data: [u8; 80] = rng.random();
            let data = &mut data[..len];
            data[0] = 0;
            data[1] = 0;
            let check = checksum(data);
            data[..2].copy_from_slice(&check.to_ne_bytes());
            assert!(verifies(data));

            // Rewrite one aligned 32-bit field and one 16-bit field.
            let at32 = 2 + 2 * rng.random_range(0..(len - 6) / 2);
            let old32 = u32::from_ne_bytes(data[at32..at32 + 4].try_into().unwrap());
            let new32: u32 = rng.random();
            data[at32..at32 + 4].copy_from_slice(&new32.to_ne_bytes());
            let at16 = 2 + 2 * rng.random_range(0..(len - 2) / 2);
            let old16 = u16::from_ne_bytes(data[at16..at16 + 2].try_into().unwrap());
            let new16: u16 = rng.random();
            data[at16..at16 + 2].copy_from_slice(&new16.to_ne_bytes());

            let updated = replace_u16(replace_u32(check, old32, new32), old16, new16);
            data[..2].copy_from_slice(&updated.to_ne_bytes());
            assert!(
                verifies(data),
                "incremental update broke the sum: {data:x?}"
            );
        }
    }

    #[test]
    fn incremental_handles_all_ones_and_zero_words() {
        // The corner RFC 1624 fixes over RFC 1141 (results of -0). Real
        // headers always hold a non-zero word besides the one rewritten.
        for (old, new) in [(0u16, 0xffffu16), (0xffff, 0), (0, 0), (0xffff, 0xffff)] {
            let mut data = [0u8, 0, 0x45, 0x00, 0, 0];
            data[4..].copy_from_slice(&old.to_ne_bytes());
            let check = checksum(&data);
            data[..2].copy_from_slice(&check.to_ne_bytes());
            data[4..].copy_from_slice(&new.to_ne_bytes());
            data[..2].copy_from_slice(&replace_u16(check, old, new).to_ne_bytes());
            assert!(verifies(&data), "old {old:#x} new {new:#x}");
        }
    }

    /// RFC 8200's pseudo header, computed independently: the sum of
    /// source, destination, a 32-bit length and three zero bytes before
    /// the next header, over big-endian words.
    fn reference_l4_sum6(src: [u8; 16], dst: [u8; 16], next: u8, segment: &[u8]) -> u16 {
        let mut bytes = std::vec::Vec::new();
        bytes.extend_from_slice(&src);
        bytes.extend_from_slice(&dst);
        bytes.extend_from_slice(&(segment.len() as u32).to_be_bytes());
        bytes.extend_from_slice(&[0, 0, 0, next]);
        bytes.extend_from_slice(segment);
        if bytes.len() % 2 == 1 {
            bytes.push(0);
        }
        let mut sum: u64 = bytes
            .chunks(2)
            .map(|w| u64::from(u16::from_be_bytes([w[0], w[1]])))
            .sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    /// IPv6 L4 checksums agree with the reference, verify, and stay right
    /// when an address is rewritten incrementally (a DNAT of the
    /// destination, the port rewritten beside it).
    #[test]
    fn ipv6_l4_checksums_and_address_rewrites() {
        let mut rng = StdRng::seed_from_u64(0x0006_0006);
        for _ in 0..20_000 {
            let (src, dst): ([u8; 16], [u8; 16]) = (rng.random(), rng.random());
            let next = if rng.random() {
                crate::IPPROTO_TCP
            } else {
                crate::IPPROTO_UDP
            };
            let len = rng.random_range(8..200usize);
            let mut segment: std::vec::Vec<u8> = (0..len).map(|_| rng.random()).collect();
            // The checksum field: TCP's at 16, UDP's at 6.
            let at = if next == crate::IPPROTO_TCP && len >= 20 {
                16
            } else {
                6
            };
            segment[at..at + 2].fill(0);
            let check = l4_checksum6(src, dst, next, &segment);
            let reference = reference_l4_sum6(src, dst, next, &segment);
            let expected = if reference == 0 && next == crate::IPPROTO_UDP {
                0xffff
            } else {
                reference
            };
            assert_eq!(u16::from_be_bytes(check.to_ne_bytes()), expected);
            segment[at..at + 2].copy_from_slice(&check.to_ne_bytes());
            assert!(l4_verifies6(src, dst, next, &segment));

            let words = |a: [u8; 16]| {
                [0, 4, 8, 12].map(|i| u32::from_ne_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]]))
            };
            let new_dst: [u8; 16] = rng.random();
            let new_port: u16 = rng.random();
            let old_port = u16::from_ne_bytes([segment[2], segment[3]]);
            let updated = replace_u16(
                replace_u128(check, words(dst), words(new_dst)),
                old_port,
                new_port,
            );
            segment[2..4].copy_from_slice(&new_port.to_ne_bytes());
            segment[at..at + 2].copy_from_slice(&updated.to_ne_bytes());
            assert!(
                l4_verifies6(src, new_dst, next, &segment),
                "incremental IPv6 rewrite broke the sum"
            );
        }
    }

    #[test]
    fn udp_zero_sum_over_ipv6_is_sent_as_all_ones() {
        let (src, dst) = ([0xfd; 16], [0x77; 16]);
        // A last word chosen so that the whole sum is all-ones, i.e. the
        // checksum computes to 0: UDP sends 0xffff, TCP keeps 0.
        for (protocol, sent) in [(crate::IPPROTO_UDP, 0xffff), (crate::IPPROTO_TCP, 0)] {
            let mut segment = [0u8; 10];
            segment[4..6].copy_from_slice(&10u16.to_be_bytes());
            let sum = fold(accumulate(&segment, pseudo_header6(src, dst, protocol, 10)));
            segment[8..].copy_from_slice(&(!sum).to_ne_bytes());
            assert_eq!(l4_checksum6(src, dst, protocol, &segment), sent);
        }
    }

    #[test]
    fn udp_zero_sum_is_sent_as_all_ones() {
        let (src, dst) = ([10, 0, 0, 1], [10, 0, 0, 2]);
        // 8-byte UDP header (checksum zero) + one payload word chosen so
        // that the whole sum is all-ones, i.e. the checksum computes to 0.
        let mut segment = [0u8; 10];
        segment[4..6].copy_from_slice(&10u16.to_be_bytes());
        let sum = fold(accumulate(&segment, pseudo_header(src, dst, 17, 10)));
        segment[8..].copy_from_slice(&(!sum).to_ne_bytes());
        assert_eq!(l4_checksum(src, dst, 17, &segment), 0xffff);
    }
}
