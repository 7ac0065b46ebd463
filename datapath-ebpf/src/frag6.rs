//! IPv6 fragments (`crate::frag`'s twin): only a datagram's first
//! fragment carries the upper-layer header, so only it can be matched to
//! a flow by its ports. When a first fragment is translated its ports are
//! remembered in `FRAGMENTS6` under the datagram's identity (source,
//! destination, protocol and the fragment header's 32-bit
//! identification: RFC 8200's reassembly key); the later fragments find
//! them there and are translated like it. Fragments that arrive before
//! their first fragment are not known and pass untouched (counted).

use aya_ebpf::programs::TcContext;
use datapath_common::{
    maps::{FragmentKey6, FragmentPorts},
    metrics::Counter,
};

use crate::{events, maps::FRAGMENTS6, metrics::count, parse6::Packet6};

#[inline(always)]
fn key(packet: &Packet6) -> FragmentKey6 {
    FragmentKey6 {
        source_be: packet.saddr_be,
        destination_be: packet.daddr_be,
        id_be: packet.fragment_id_be,
        protocol: packet.protocol,
        _pad: [0; 3],
    }
}

/// After `packet` was translated: a first fragment's ports are
/// remembered for the rest of its datagram (`key` holds the addresses it
/// carried before), a later fragment is counted.
#[inline(always)]
pub fn translated(ctx: &TcContext, packet: &Packet6) {
    if packet.first_fragment {
        let ports = FragmentPorts {
            source_port_be: packet.sport_be,
            destination_port_be: packet.dport_be,
        };
        if FRAGMENTS6.insert(key(packet), ports, 0).is_err() {
            // The later fragments will pass untranslated.
            count(Counter::Error);
            events::fragment_table_full(ctx);
        }
    } else if packet.later_fragment {
        count(Counter::FragmentTranslated);
    }
}

/// Fills in a later fragment's ports from its first fragment. False when
/// its datagram is not known.
#[inline(always)]
pub fn resolve(packet: &mut Packet6) -> bool {
    // SAFETY: copied out at once.
    match unsafe { FRAGMENTS6.get(key(packet)) }.copied() {
        Some(ports) => {
            packet.sport_be = ports.source_port_be;
            packet.dport_be = ports.destination_port_be;
            true
        }
        None => false,
    }
}
