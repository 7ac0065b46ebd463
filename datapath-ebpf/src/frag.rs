//! IPv4 fragments: only a datagram's first fragment carries the L4
//! header, so only it can be matched to a flow by its ports. When a first
//! fragment is translated, its ports are remembered under the datagram's
//! identity (source, destination, protocol, IP id: RFC 791's reassembly
//! key, as Cilium's fragment map keeps them); the later fragments find
//! them there and are translated like it. Fragments that arrive before
//! their first fragment are not known and pass untouched (counted).

use aya_ebpf::programs::TcContext;
use datapath_common::{
    maps::{FragmentKey, FragmentPorts},
    metrics::Counter,
};

use crate::{
    events,
    maps::FRAGMENTS,
    metrics::count,
    parse::{FIRST_FRAGMENT, LATER_FRAGMENT, Packet},
};

#[inline(always)]
fn key(packet: &Packet) -> FragmentKey {
    FragmentKey {
        source_be: packet.saddr_be,
        destination_be: packet.daddr_be,
        id_be: packet.ip_id_be,
        protocol: packet.protocol,
        _pad: 0,
    }
}

/// After `packet` was translated: a first fragment's ports are remembered
/// for the rest of its datagram, a later fragment is counted. A whole
/// datagram (nearly every packet) pays one compare.
#[inline(always)]
pub fn translated(ctx: &TcContext, packet: &Packet) {
    if packet.fragment == FIRST_FRAGMENT {
        if !remember(packet) {
            count(Counter::Error);
            events::fragment_table_full(ctx);
        }
    } else if packet.fragment == LATER_FRAGMENT {
        count(Counter::FragmentTranslated);
    }
}

/// Remembers a translated first fragment's ports for the rest of its
/// datagram. Returns false when the table refused (the later fragments
/// will then pass untranslated).
#[inline(always)]
fn remember(packet: &Packet) -> bool {
    let ports = FragmentPorts {
        source_port_be: packet.sport_be,
        destination_port_be: packet.dport_be,
    };
    FRAGMENTS.insert(key(packet), ports, 0).is_ok()
}

/// Fills in a later fragment's ports from its first fragment. False when
/// its datagram is not known.
#[inline(always)]
pub fn resolve(packet: &mut Packet) -> bool {
    // SAFETY: copied out at once.
    match unsafe { FRAGMENTS.get(key(packet)) }.copied() {
        Some(ports) => {
            packet.sport_be = ports.source_port_be;
            packet.dport_be = ports.destination_port_be;
            true
        }
        None => false,
    }
}
