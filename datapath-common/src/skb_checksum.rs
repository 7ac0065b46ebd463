//! How a translated packet's L4 checksum is kept right without a helper
//! call per field.
//!
//! `bpf_l4_csum_replace` exists because only the kernel knows the skb's
//! checksum state (`ip_summed`): the field may hold a full checksum
//! (`CHECKSUM_NONE` / `CHECKSUM_UNNECESSARY`), only the pseudo header's sum
//! for the device or the stack to finish (`CHECKSUM_PARTIAL`, every
//! locally sent TCP segment on an offloading device), or the skb may carry
//! a sum of its data that must stay in step (`CHECKSUM_COMPLETE`). A DNAT
//! needs two calls (address, then port: a port is not in the pseudo
//! header), 40–48 ns of a conntrack hit's ~130 (`bench datapath`).
//!
//! The programs read `ip_summed` themselves through the kernel's
//! `struct sk_buff` (`bpf_cast_to_kern_ctx`, a kfunc the verifier turns
//! into a register move) at the byte and bit the loader found in the
//! running kernel's BTF, and then update the field with the pure arithmetic
//! below. Over IPv4, `CHECKSUM_COMPLETE` still goes through the helper,
//! which also updates `skb->csum` (a field programs cannot write); over
//! IPv6 that sum does not move (`l4_field_after_nat6`).

use crate::maps::Ipv6Words;

/// Name of the read-only global the loader sets.
pub const SKB_CHECKSUM_GLOBAL: &str = "SKB_CHECKSUM";

/// The kfunc the programs call to reach the kernel's `struct sk_buff`.
pub const CAST_TO_KERN_CTX: &str = "bpf_cast_to_kern_ctx";

/// The immediate of our kfunc call instructions in the object
/// (`BPF_CALL` with `src_reg = BPF_PSEUDO_KFUNC_CALL`): a placeholder
/// ("kctx") the loader replaces with the kfunc's BTF id in the running
/// kernel, as libbpf does for `__ksym` externs (aya 0.14 does not yet).
pub const CAST_TO_KERN_CTX_PLACEHOLDER: i32 = 0x6b63_7478;

/// Where `ip_summed` sits in the running kernel's `struct sk_buff`. A zero
/// `byte` means "not known": the programs then use the helpers only (the
/// verifier sees the value and never explores the other path).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SkbChecksumField {
    /// Byte offset of the byte holding the 2-bit field (never 0: that is
    /// the `next` pointer).
    pub byte: u32,
    /// Bit position of the field inside that byte (little-endian bit order,
    /// as BTF gives it on little-endian machines).
    pub shift: u32,
}

impl SkbChecksumField {
    /// The layout is unknown: helpers only.
    pub const UNKNOWN: Self = Self { byte: 0, shift: 0 };

    /// The checksum state held in `byte` read from the skb.
    #[inline(always)]
    pub const fn state_of(self, byte: u8) -> ChecksumState {
        ChecksumState::from_bits((byte >> self.shift) & 0b11)
    }
}

/// `skb->ip_summed` (include/linux/skbuff.h).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChecksumState {
    /// `CHECKSUM_NONE`: the field holds the full checksum.
    None,
    /// `CHECKSUM_UNNECESSARY`: verified by the device; the field holds the
    /// full checksum, which must stay right for anyone forwarding it.
    Unnecessary,
    /// `CHECKSUM_COMPLETE`: `skb->csum` holds the data's sum; only the
    /// helper can keep it in step.
    Complete,
    /// `CHECKSUM_PARTIAL`: the field holds the pseudo header's sum (not
    /// complemented); the device or the stack adds the segment's.
    Partial,
}

impl ChecksumState {
    #[inline(always)]
    const fn from_bits(bits: u8) -> Self {
        match bits {
            0 => Self::None,
            1 => Self::Unnecessary,
            2 => Self::Complete,
            _ => Self::Partial,
        }
    }
}

/// A new L4 checksum field after the segment's destination (or source)
/// address and port changed, for a state other than `Complete`. `udp`:
/// a zero field means "no checksum" and stays zero, and a computed zero is
/// sent as all-ones (RFC 768). Returns `None` for `Complete`.
#[inline(always)]
pub const fn l4_field_after_nat(
    state: ChecksumState,
    field: u16,
    old_address: u32,
    new_address: u32,
    old_port: u16,
    new_port: u16,
    udp: bool,
) -> Option<u16> {
    let check = match state {
        ChecksumState::Complete => return None,
        // A UDP datagram without a checksum keeps none.
        _ if udp && field == 0 => return Some(0),
        // The pseudo header's sum, not complemented: the address's
        // difference only; the port is in the data the device will sum.
        ChecksumState::Partial => !crate::csum::replace_u32(!field, old_address, new_address),
        ChecksumState::None | ChecksumState::Unnecessary => crate::csum::replace_u16(
            crate::csum::replace_u32(field, old_address, new_address),
            old_port,
            new_port,
        ),
    };
    Some(udp_nonzero(check, udp))
}

/// [`l4_field_after_nat`] for a port-only change.
#[inline(always)]
pub const fn l4_field_after_port_change(
    state: ChecksumState,
    field: u16,
    old_port: u16,
    new_port: u16,
    udp: bool,
) -> Option<u16> {
    let check = match state {
        ChecksumState::Complete => return None,
        _ if udp && field == 0 => return Some(0),
        // Not in the pseudo header: nothing to do.
        ChecksumState::Partial => field,
        ChecksumState::None | ChecksumState::Unnecessary => {
            crate::csum::replace_u16(field, old_port, new_port)
        }
    };
    Some(udp_nonzero(check, udp))
}

/// [`l4_field_after_nat`] for IPv6, where every state has an answer:
/// with no header checksum, `CHECKSUM_COMPLETE`'s `skb->csum` (the sum of
/// the packet) does not move when an address and the L4 field change
/// together (the address's difference and the field's are opposite),
/// which is what `BPF_F_IPV6` tells the helper since Linux 6.16. A UDP
/// datagram without a checksum (not allowed over IPv6: its receiver drops
/// it) is left without one.
#[inline(always)]
pub const fn l4_field_after_nat6(
    state: ChecksumState,
    field: u16,
    old_address: Ipv6Words,
    new_address: Ipv6Words,
    old_port: u16,
    new_port: u16,
    udp: bool,
) -> u16 {
    let check = match state {
        _ if udp && field == 0 => return 0,
        ChecksumState::Partial => !crate::csum::replace_u128(!field, old_address, new_address),
        ChecksumState::None | ChecksumState::Unnecessary | ChecksumState::Complete => {
            crate::csum::replace_u16(
                crate::csum::replace_u128(field, old_address, new_address),
                old_port,
                new_port,
            )
        }
    };
    udp_nonzero(check, udp)
}

/// [`l4_field_after_port_change`] for IPv6: `CHECKSUM_COMPLETE` holds a
/// full checksum whose change cancels the port's in `skb->csum`.
#[inline(always)]
pub const fn l4_field_after_port_change6(
    state: ChecksumState,
    field: u16,
    old_port: u16,
    new_port: u16,
    udp: bool,
) -> u16 {
    let state = match state {
        ChecksumState::Complete => ChecksumState::None,
        other => other,
    };
    match l4_field_after_port_change(state, field, old_port, new_port, udp) {
        Some(check) => check,
        None => field,
    }
}

/// A computed zero UDP checksum is sent as all-ones (RFC 768), as
/// `BPF_F_MARK_MANGLED_0` makes the helper do.
#[inline(always)]
const fn udp_nonzero(check: u16, udp: bool) -> u16 {
    if udp && check == 0 { 0xffff } else { check }
}

// SAFETY: repr(C), two u32 fields, no padding.
#[cfg(feature = "user")]
unsafe impl aya::Pod for SkbChecksumField {}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng, rngs::StdRng};

    use super::*;
    use crate::csum::{accumulate, fold, l4_checksum, l4_verifies, pseudo_header};

    const CHECK: usize = 16; // TCP's checksum field

    fn word(data: &[u8], at: usize) -> u16 {
        u16::from_ne_bytes([data[at], data[at + 1]])
    }

    /// A DNAT of destination address and port: every state but Complete
    /// leaves a field that ends up right — for Partial, once the device
    /// (or `skb_checksum_help`) has summed the segment into it.
    #[test]
    fn the_field_is_right_after_nat_in_every_state() {
        let mut rng = StdRng::seed_from_u64(0x6b637478);
        for round in 0..50_000 {
            let src: [u8; 4] = rng.random();
            let (old_dst, new_dst): ([u8; 4], [u8; 4]) = (rng.random(), rng.random());
            let len = 20 + rng.random_range(0..60usize);
            let mut segment = std::vec![0u8; len];
            rng.fill(&mut segment[..]);
            segment[CHECK..CHECK + 2].fill(0);
            let (old_port, new_port) = (word(&segment, 2), rng.random::<u16>());
            let full = l4_checksum(src, old_dst, 6, &segment);
            let partial = fold(pseudo_header(src, old_dst, 6, len as u16));
            let (old_be, new_be) = (u32::from_ne_bytes(old_dst), u32::from_ne_bytes(new_dst));
            segment[2..4].copy_from_slice(&new_port.to_ne_bytes());
            let state = if round % 2 == 0 {
                ChecksumState::None
            } else {
                ChecksumState::Unnecessary
            };

            let after = l4_field_after_nat(state, full, old_be, new_be, old_port, new_port, false);
            segment[CHECK..CHECK + 2].copy_from_slice(&after.unwrap().to_ne_bytes());
            assert!(
                l4_verifies(src, new_dst, 6, &segment),
                "{state:?} round {round}"
            );

            let after = l4_field_after_nat(
                ChecksumState::Partial,
                partial,
                old_be,
                new_be,
                old_port,
                new_port,
                false,
            )
            .unwrap();
            segment[CHECK..CHECK + 2].copy_from_slice(&after.to_ne_bytes());
            // What the device does: sum the segment (the field holding the
            // pseudo header's sum) and put the complement in the field.
            let finished = !fold(accumulate(&segment, 0));
            segment[CHECK..CHECK + 2].copy_from_slice(&finished.to_ne_bytes());
            assert!(
                l4_verifies(src, new_dst, 6, &segment),
                "Partial round {round}"
            );

            assert_eq!(
                l4_field_after_nat(
                    ChecksumState::Complete,
                    full,
                    old_be,
                    new_be,
                    old_port,
                    new_port,
                    false
                ),
                None,
                "Complete is the helper's"
            );
        }
    }

    /// A port-only change: Partial leaves the field alone (the port is
    /// not in the pseudo header); a full checksum follows the port.
    #[test]
    fn a_port_change_moves_only_full_checksums() {
        let (src, dst) = ([10, 0, 0, 1], [10, 0, 0, 2]);
        let mut segment = [7u8; 24];
        segment[CHECK..CHECK + 2].fill(0);
        let full = l4_checksum(src, dst, 6, &segment);
        let old_port = word(&segment, 0);
        segment[0..2].copy_from_slice(&0x1234u16.to_ne_bytes());
        let after =
            l4_field_after_port_change(ChecksumState::None, full, old_port, 0x1234, false).unwrap();
        segment[CHECK..CHECK + 2].copy_from_slice(&after.to_ne_bytes());
        assert!(l4_verifies(src, dst, 6, &segment));
        assert_eq!(
            l4_field_after_port_change(ChecksumState::Partial, 0xabcd, old_port, 0x1234, false),
            Some(0xabcd)
        );
    }

    /// UDP: no checksum stays none in every state; a sum that comes out
    /// zero is sent as all-ones.
    #[test]
    fn udp_without_checksum_keeps_none_and_zero_becomes_all_ones() {
        for state in [
            ChecksumState::None,
            ChecksumState::Unnecessary,
            ChecksumState::Partial,
        ] {
            assert_eq!(l4_field_after_nat(state, 0, 1, 2, 3, 4, true), Some(0));
            assert_eq!(l4_field_after_port_change(state, 0, 3, 4, true), Some(0));
        }
        // 0xfffe with a one added becomes 0xffff, whose complement is 0.
        let check = crate::csum::replace_u16(0x0001, 0x0000, 0x0001);
        assert_eq!(check, 0);
        assert_eq!(
            l4_field_after_port_change(ChecksumState::None, 0x0001, 0x0000, 0x0001, true),
            Some(0xffff)
        );
    }

    /// IPv6: a DNAT (address and port) or a port change leaves a field
    /// that verifies from scratch in every state — Complete included,
    /// whose packet sum (`skb->csum`) stays the same.
    #[test]
    fn the_ipv6_field_is_right_after_nat_in_every_state_and_the_packet_sum_stays() {
        use crate::csum::{l4_checksum6, l4_verifies6, pseudo_header6};
        let mut rng = StdRng::seed_from_u64(0x36363636);
        for round in 0..20_000 {
            let src: [u8; 16] = rng.random();
            let (old_dst, new_dst): ([u8; 16], [u8; 16]) = (rng.random(), rng.random());
            let udp = round % 3 == 0;
            let (protocol, check_at) = if udp { (17, 6) } else { (6, CHECK) };
            let len = 20 + rng.random_range(0..60usize);
            let mut segment = std::vec![0u8; len];
            rng.fill(&mut segment[..]);
            segment[check_at..check_at + 2].fill(0);
            let (old_port, new_port) = (word(&segment, 2), rng.random::<u16>());
            let full = l4_checksum6(src, old_dst, protocol, &segment);
            let partial = fold(pseudo_header6(src, old_dst, protocol, len as u32));
            let words = |a: [u8; 16]| -> Ipv6Words { unsafe { core::mem::transmute(a) } };
            // The packet sum Complete keeps: addresses and segment.
            let packet_sum = |dst: [u8; 16], segment: &[u8]| {
                fold(accumulate(segment, accumulate(&dst, accumulate(&src, 0))))
            };
            let before = {
                let mut s = segment.clone();
                s[check_at..check_at + 2].copy_from_slice(&full.to_ne_bytes());
                packet_sum(old_dst, &s)
            };
            segment[2..4].copy_from_slice(&new_port.to_ne_bytes());
            let state = [
                ChecksumState::None,
                ChecksumState::Unnecessary,
                ChecksumState::Complete,
            ][round % 3];
            let after = l4_field_after_nat6(
                state,
                full,
                words(old_dst),
                words(new_dst),
                old_port,
                new_port,
                udp,
            );
            segment[check_at..check_at + 2].copy_from_slice(&after.to_ne_bytes());
            assert!(
                l4_verifies6(src, new_dst, protocol, &segment),
                "{state:?} round {round}"
            );
            let sum_after = packet_sum(new_dst, &segment);
            assert!(
                sum_after == before || (sum_after | before) == 0xffff && sum_after & before == 0,
                "the packet's sum moved: {before:#x} → {sum_after:#x}"
            );

            // A port change after it.
            let moved = rng.random::<u16>();
            let old = word(&segment, 0);
            segment[0..2].copy_from_slice(&moved.to_ne_bytes());
            let after = l4_field_after_port_change6(state, after, old, moved, udp);
            segment[check_at..check_at + 2].copy_from_slice(&after.to_ne_bytes());
            assert!(
                l4_verifies6(src, new_dst, protocol, &segment),
                "port, round {round}"
            );
            segment[0..2].copy_from_slice(&old.to_ne_bytes());

            let after = l4_field_after_nat6(
                ChecksumState::Partial,
                partial,
                words(old_dst),
                words(new_dst),
                old_port,
                new_port,
                udp,
            );
            segment[check_at..check_at + 2].copy_from_slice(&after.to_ne_bytes());
            let mut finished = !fold(accumulate(&segment, 0));
            if udp && finished == 0 {
                finished = 0xffff;
            }
            segment[check_at..check_at + 2].copy_from_slice(&finished.to_ne_bytes());
            assert!(
                l4_verifies6(src, new_dst, protocol, &segment),
                "Partial round {round}"
            );
        }
        assert_eq!(
            l4_field_after_nat6(ChecksumState::None, 0, [1; 4], [2; 4], 3, 4, true),
            0,
            "a UDP datagram without a checksum keeps none"
        );
    }

    #[test]
    fn the_state_is_read_from_its_bits() {
        let field = SkbChecksumField {
            byte: 128,
            shift: 5,
        };
        assert_eq!(field.state_of(0b0110_0000), ChecksumState::Partial);
        assert_eq!(field.state_of(0b0100_0111), ChecksumState::Complete);
        assert_eq!(field.state_of(0b0010_0000), ChecksumState::Unnecessary);
        assert_eq!(field.state_of(0b1001_1111), ChecksumState::None);
    }
}
