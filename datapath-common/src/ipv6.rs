//! Finding an IPv6 packet's upper-layer header: the walk over its
//! extension headers (RFC 8200 §4), as pure logic over a reader, so that
//! the eBPF programs (reading the skb) and the tests (reading a buffer)
//! run the same code.
//!
//! Bounded for the verifier and against crafted chains: at most
//! `MAX_EXTENSION_HEADERS` headers are walked. What the walk cannot (or
//! must not) look past leaves the packet untouched: ESP (the rest is
//! encrypted), "no next header", a hop-by-hop header anywhere but first
//! (the kernel drops those), a chain longer than the bound, a header cut
//! short by the end of the packet.

/// Length of the fixed IPv6 header.
pub const IPV6_HEADER_LEN: usize = 40;

/// Extension headers walked at most before the walk gives up.
pub const MAX_EXTENSION_HEADERS: usize = 4;

/// Next-header values the walk knows (IANA).
pub const NEXTHDR_HOP_BY_HOP: u8 = 0;
pub const NEXTHDR_ROUTING: u8 = 43;
pub const NEXTHDR_FRAGMENT: u8 = 44;
pub const NEXTHDR_ESP: u8 = 50;
pub const NEXTHDR_AUTH: u8 = 51;
pub const NEXTHDR_ICMPV6: u8 = 58;
pub const NEXTHDR_NONE: u8 = 59;
pub const NEXTHDR_DEST_OPTIONS: u8 = 60;

/// A fragment header's fields (RFC 8200 §4.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fragment {
    /// Identification, as the packet carries it.
    pub id_be: u32,
    /// Fragment offset in 8-byte units: 0 for the first fragment, whose
    /// upper-layer header (and ports) follow.
    pub offset: u16,
    /// The M flag: more fragments follow.
    pub more: bool,
}

impl Fragment {
    /// A later fragment carries no upper-layer header: its ports are the
    /// first fragment's.
    pub const fn is_later(&self) -> bool {
        self.offset != 0
    }
}

/// What the walk found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Upper {
    /// The upper-layer protocol (TCP, UDP, ICMPv6, or any other), its
    /// header `offset` bytes from the start of the IPv6 header (for a
    /// later fragment: where its payload starts), and the fragment header
    /// if there was one.
    Found {
        protocol: u8,
        offset: usize,
        fragment: Option<Fragment>,
    },
    /// Not to be looked past: leave the packet as it is.
    NotParsed,
}

/// Walks the extension headers that follow a fixed header whose next
/// header is `next_header`. `read(offset)` gives the 8 bytes at `offset`
/// from the start of the IPv6 header, or `None` past the packet's end
/// (every extension header is at least 8 bytes long).
#[inline(always)]
pub fn upper_layer(next_header: u8, mut read: impl FnMut(usize) -> Option<[u8; 8]>) -> Upper {
    let mut protocol = next_header;
    let mut offset = IPV6_HEADER_LEN;
    let mut fragment = None;
    for walked in 0..=MAX_EXTENSION_HEADERS {
        let length = match protocol {
            NEXTHDR_HOP_BY_HOP if walked > 0 => return Upper::NotParsed,
            NEXTHDR_HOP_BY_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST_OPTIONS => {
                let Some(header) = read(offset) else {
                    return Upper::NotParsed;
                };
                protocol = header[0];
                (usize::from(header[1]) + 1) * 8
            }
            NEXTHDR_AUTH => {
                let Some(header) = read(offset) else {
                    return Upper::NotParsed;
                };
                protocol = header[0];
                (usize::from(header[1]) + 2) * 4
            }
            NEXTHDR_FRAGMENT => {
                let Some(header) = read(offset) else {
                    return Upper::NotParsed;
                };
                // Two fragment headers: not a packet any host sends.
                if fragment.is_some() {
                    return Upper::NotParsed;
                }
                protocol = header[0];
                let offset_and_flags = u16::from_be_bytes([header[2], header[3]]);
                let found = Fragment {
                    id_be: u32::from_ne_bytes([header[4], header[5], header[6], header[7]]),
                    offset: offset_and_flags >> 3,
                    more: offset_and_flags & 1 != 0,
                };
                fragment = Some(found);
                if found.is_later() {
                    // Nothing after this header is an extension header
                    // or the upper-layer header: payload.
                    return Upper::Found {
                        protocol,
                        offset: offset + 8,
                        fragment,
                    };
                }
                8
            }
            NEXTHDR_ESP | NEXTHDR_NONE => return Upper::NotParsed,
            _ => {
                return Upper::Found {
                    protocol,
                    offset,
                    fragment,
                };
            }
        };
        offset += length;
    }
    Upper::NotParsed
}

#[cfg(test)]
mod tests {
    use std::{vec, vec::Vec};

    use super::*;
    use crate::{IPPROTO_TCP, IPPROTO_UDP};

    /// A packet's bytes from its IPv6 header on: a 40-byte header (its
    /// contents do not matter to the walk), then `rest`.
    fn packet(rest: &[u8]) -> Vec<u8> {
        let mut bytes = vec![0u8; IPV6_HEADER_LEN];
        bytes.extend_from_slice(rest);
        bytes
    }

    fn walk(next_header: u8, bytes: &[u8]) -> Upper {
        upper_layer(next_header, |offset| {
            bytes.get(offset..offset + 8)?.try_into().ok()
        })
    }

    /// An extension header of `units` 8-byte units after the first,
    /// naming `next`.
    fn options(next: u8, units: u8) -> Vec<u8> {
        let mut header = vec![0u8; (usize::from(units) + 1) * 8];
        header[0] = next;
        header[1] = units;
        header
    }

    fn fragment_header(next: u8, offset: u16, more: bool, id: [u8; 4]) -> Vec<u8> {
        let field = (offset << 3) | u16::from(more);
        let mut header = vec![next, 0];
        header.extend_from_slice(&field.to_be_bytes());
        header.extend_from_slice(&id);
        header
    }

    const TCP_HEADER: [u8; 20] = [0; 20];

    fn found(protocol: u8, offset: usize, fragment: Option<Fragment>) -> Upper {
        Upper::Found {
            protocol,
            offset,
            fragment,
        }
    }

    /// Katran-style table: description, next header, bytes after the
    /// fixed header, what the walk must find.
    #[test]
    fn the_walk_finds_the_upper_layer_or_leaves_the_packet_alone() {
        let id = [0xde, 0xad, 0xbe, 0xef];
        let first = Fragment {
            id_be: u32::from_ne_bytes(id),
            offset: 0,
            more: true,
        };
        let later = Fragment {
            id_be: u32::from_ne_bytes(id),
            offset: 185,
            more: false,
        };
        let mut auth = vec![IPPROTO_TCP, 4, 0, 0];
        auth.extend_from_slice(&[0u8; 20]); // (4 + 2) * 4 = 24 bytes
        let chain = |parts: &[Vec<u8>]| parts.concat();
        let cases: Vec<(&str, u8, Vec<u8>, Upper)> = vec![
            (
                "TCP straight after the header",
                IPPROTO_TCP,
                TCP_HEADER.to_vec(),
                found(IPPROTO_TCP, 40, None),
            ),
            (
                "hop-by-hop, then UDP",
                NEXTHDR_HOP_BY_HOP,
                chain(&[options(IPPROTO_UDP, 0), vec![0; 8]]),
                found(IPPROTO_UDP, 48, None),
            ),
            (
                "destination options of 16 bytes, routing, then TCP",
                NEXTHDR_DEST_OPTIONS,
                chain(&[
                    options(NEXTHDR_ROUTING, 1),
                    options(IPPROTO_TCP, 0),
                    TCP_HEADER.to_vec(),
                ]),
                found(IPPROTO_TCP, 40 + 16 + 8, None),
            ),
            (
                "authentication header (length in 4-byte units), then TCP",
                NEXTHDR_AUTH,
                chain(&[auth.clone(), TCP_HEADER.to_vec()]),
                found(IPPROTO_TCP, 40 + 24, None),
            ),
            (
                "first fragment: the UDP header follows, with the fragment's id",
                NEXTHDR_FRAGMENT,
                chain(&[fragment_header(IPPROTO_UDP, 0, true, id), vec![0; 8]]),
                found(IPPROTO_UDP, 48, Some(first)),
            ),
            (
                "later fragment: payload follows, not a header",
                NEXTHDR_FRAGMENT,
                chain(&[fragment_header(IPPROTO_UDP, 185, false, id), vec![0; 8]]),
                found(IPPROTO_UDP, 48, Some(later)),
            ),
            (
                "later fragment whose payload looks like an extension header",
                NEXTHDR_FRAGMENT,
                chain(&[
                    fragment_header(NEXTHDR_ROUTING, 185, false, id),
                    options(IPPROTO_TCP, 0),
                ]),
                found(NEXTHDR_ROUTING, 48, Some(later)),
            ),
            (
                "ICMPv6 (NDP among it) is found, for the caller to pass",
                NEXTHDR_ICMPV6,
                vec![135, 0, 0, 0, 0, 0, 0, 0],
                found(NEXTHDR_ICMPV6, 40, None),
            ),
            (
                "ESP: encrypted from here on",
                NEXTHDR_ESP,
                vec![0; 16],
                Upper::NotParsed,
            ),
            (
                "no next header",
                NEXTHDR_HOP_BY_HOP,
                options(NEXTHDR_NONE, 0),
                Upper::NotParsed,
            ),
            (
                "hop-by-hop after another header",
                NEXTHDR_DEST_OPTIONS,
                chain(&[options(NEXTHDR_HOP_BY_HOP, 0), options(IPPROTO_TCP, 0)]),
                Upper::NotParsed,
            ),
            (
                "two fragment headers",
                NEXTHDR_FRAGMENT,
                chain(&[
                    fragment_header(NEXTHDR_FRAGMENT, 0, true, id),
                    fragment_header(IPPROTO_UDP, 0, true, id),
                    vec![0; 8],
                ]),
                Upper::NotParsed,
            ),
            (
                "four extension headers: the most walked",
                NEXTHDR_HOP_BY_HOP,
                chain(&[
                    options(NEXTHDR_DEST_OPTIONS, 0),
                    options(NEXTHDR_ROUTING, 0),
                    options(NEXTHDR_DEST_OPTIONS, 0),
                    options(IPPROTO_TCP, 0),
                    TCP_HEADER.to_vec(),
                ]),
                found(IPPROTO_TCP, 40 + 32, None),
            ),
            (
                "five extension headers: too many",
                NEXTHDR_HOP_BY_HOP,
                chain(&[
                    options(NEXTHDR_DEST_OPTIONS, 0),
                    options(NEXTHDR_ROUTING, 0),
                    options(NEXTHDR_DEST_OPTIONS, 0),
                    options(NEXTHDR_DEST_OPTIONS, 0),
                    options(IPPROTO_TCP, 0),
                    TCP_HEADER.to_vec(),
                ]),
                Upper::NotParsed,
            ),
            (
                "an extension header cut short by the packet's end",
                NEXTHDR_ROUTING,
                vec![IPPROTO_TCP, 0, 0, 0],
                Upper::NotParsed,
            ),
            (
                "a fragment header cut short",
                NEXTHDR_FRAGMENT,
                vec![IPPROTO_UDP, 0, 0],
                Upper::NotParsed,
            ),
        ];
        for (description, next_header, rest, expected) in cases {
            assert_eq!(walk(next_header, &packet(&rest)), expected, "{description}");
        }
    }

    /// A header's length field is used, not assumed: the same chain with a
    /// longer first header puts the upper layer further on.
    #[test]
    fn header_lengths_come_from_the_packet() {
        for units in 0..=5u8 {
            let rest = [options(IPPROTO_UDP, units), vec![0; 8]].concat();
            assert_eq!(
                walk(NEXTHDR_DEST_OPTIONS, &packet(&rest)),
                found(IPPROTO_UDP, 40 + (usize::from(units) + 1) * 8, None),
                "{units} units"
            );
        }
    }
}
