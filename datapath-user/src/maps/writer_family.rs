//! What writing a frontend does differently per address family: its
//! service map, how a backend and a reverse-NAT entry are stored, its
//! filter bucket; `writer` is written once over it.

use std::net::{Ipv4Addr, Ipv6Addr};

use aya::maps::{HashMap, MapData, MapError};
use datapath_common::{
    ipv4_be,
    lb::{service_filter_index, service_filter_index6},
    maps::{
        self as m, Backend, BackendAddress6, BackendId, RevNatId, RevNatValue, RevNatValue6,
        ServiceKey, ServiceKey6, ServiceValue,
    },
    port_be,
};

use super::{
    handles::{DatapathMaps, Ipv6Maps},
    lb_maps::{LbMaps, MapFamily},
    mapped_array::MappedArray,
};
use crate::model::{BackendEntry, Family, Frontend, Protocol, ipv6_words};

/// The IPv6 maps, or why there are none.
pub(super) fn v6_maps(v6: &mut Option<Ipv6Maps>) -> Result<&mut Ipv6Maps, MapError> {
    v6.as_mut().ok_or_else(|| {
        MapError::IoError(std::io::Error::other(
            "the pinned maps have no IPv6 maps (an agent without IPv6 made them: restart with the IPv6 maps replaced)",
        ))
    })
}

/// What writing a frontend does differently per family: its service map,
/// how a backend and a reverse-NAT entry are stored, its filter bucket.
pub(super) trait WriterFamily: MapFamily + Family<ServiceKey: aya::Pod> {
    /// `SERVICES` or `SERVICES6`.
    fn services(
        maps: &mut DatapathMaps,
    ) -> Result<&mut HashMap<MapData, <Self as Family>::ServiceKey, ServiceValue>, MapError>;
    /// Backend ids are `1..this`.
    fn backend_capacity(maps: &DatapathMaps) -> u32;
    /// Reverse-NAT ids are `1..this`.
    fn rev_nat_capacity(maps: &DatapathMaps) -> u32;
    /// Writes one backend; on failure, the map that refused.
    fn write_backend(
        maps: &mut DatapathMaps,
        protocol: Protocol,
        backend: &BackendEntry<Self>,
    ) -> Result<(), (&'static str, MapError)>;
    fn set_rev_nat(
        maps: &mut DatapathMaps,
        id: RevNatId,
        frontend: &Frontend<Self>,
    ) -> Result<(), MapError>;
    /// Clears reverse-NAT entry `id` if it still names `frontend`: an id
    /// beyond the table (made smaller since) has no entry, and one that
    /// names another frontend is that frontend's (the id was taken twice,
    /// and adoption gave this frontend another).
    /// Clears reverse-NAT entry `id` if it is `frontend`'s (or empty);
    /// returns whether it was (false: another frontend holds the id).
    fn clear_rev_nat_of(
        maps: &mut DatapathMaps,
        id: RevNatId,
        frontend: &Frontend<Self>,
    ) -> Result<bool, MapError>;
    fn filter_bucket(frontend: &Frontend<Self>) -> u32;
    /// The frontend as the flush's batches take it, when they do: IPv4's
    /// (a large cluster's first sync). IPv6 frontends are written one by
    /// one; they share no entry with a noted IPv4 frontend (an id is freed,
    /// and so reusable, only by a removal, which writes what is noted
    /// first), so the order between the two does not matter.
    fn deferrable(frontend: &Frontend<Self>) -> Option<&Frontend>;
    fn deferrable_entries(backends: &[BackendEntry<Self>]) -> &[BackendEntry];
}

impl WriterFamily for Ipv4Addr {
    fn services(
        maps: &mut DatapathMaps,
    ) -> Result<&mut HashMap<MapData, ServiceKey, ServiceValue>, MapError> {
        Ok(&mut maps.services)
    }
    fn backend_capacity(maps: &DatapathMaps) -> u32 {
        maps.backends.len()
    }
    fn rev_nat_capacity(maps: &DatapathMaps) -> u32 {
        maps.reverse_nat.len()
    }
    fn write_backend(
        maps: &mut DatapathMaps,
        protocol: Protocol,
        backend: &BackendEntry,
    ) -> Result<(), (&'static str, MapError)> {
        let value = backend_value(protocol, backend);
        store_backend(&maps.backends, m::BACKENDS_MAP, backend.id, value)
    }
    fn set_rev_nat(
        maps: &mut DatapathMaps,
        id: RevNatId,
        frontend: &Frontend,
    ) -> Result<(), MapError> {
        maps.reverse_nat.set(id, rev_nat_value(frontend), 0)
    }
    fn clear_rev_nat_of(
        maps: &mut DatapathMaps,
        id: RevNatId,
        frontend: &Frontend,
    ) -> Result<bool, MapError> {
        if id >= maps.reverse_nat.len() {
            return Ok(false);
        }
        let entry = maps.reverse_nat.get(&id, 0)?;
        if entry.is_present()
            && (entry.address_be != ipv4_be(frontend.address.octets())
                || entry.port_be != port_be(frontend.port))
        {
            return Ok(false);
        }
        maps.reverse_nat.set(id, RevNatValue::default(), 0)?;
        Ok(true)
    }
    fn filter_bucket(frontend: &Frontend) -> u32 {
        let key = frontend.key();
        service_filter_index(key.address_be, key.port_be, key.protocol)
    }
    fn deferrable(frontend: &Frontend) -> Option<&Frontend> {
        Some(frontend)
    }
    fn deferrable_entries(backends: &[BackendEntry]) -> &[BackendEntry] {
        backends
    }
}

impl WriterFamily for Ipv6Addr {
    fn services(
        maps: &mut DatapathMaps,
    ) -> Result<&mut HashMap<MapData, ServiceKey6, ServiceValue>, MapError> {
        Ok(&mut v6_maps(&mut maps.v6)?.services6)
    }
    fn backend_capacity(maps: &DatapathMaps) -> u32 {
        let addresses = maps.v6.as_ref().map_or(0, |v6| v6.backend_addrs6.len());
        maps.backends.len().min(addresses)
    }
    fn rev_nat_capacity(maps: &DatapathMaps) -> u32 {
        let entries = maps.v6.as_ref().map_or(0, |v6| v6.reverse_nat6.len());
        maps.rev_nat_capacity().min(entries)
    }
    /// The address first, then the flagged word that publishes it: a
    /// program that sees the word reads the address it belongs to.
    fn write_backend(
        maps: &mut DatapathMaps,
        protocol: Protocol,
        backend: &BackendEntry<Ipv6Addr>,
    ) -> Result<(), (&'static str, MapError)> {
        let address = BackendAddress6 {
            address_be: ipv6_words(backend.address),
        };
        let addresses = &v6_maps(&mut maps.v6)
            .map_err(|e| (m::BACKEND_ADDRS6_MAP, e))?
            .backend_addrs6;
        store_backend(addresses, m::BACKEND_ADDRS6_MAP, backend.id, address)?;
        let value = Backend {
            address_be: 0,
            port_be: port_be(backend.port),
            protocol: protocol.number(),
            flags: m::BACKEND_FLAG_PRESENT | m::BACKEND_FLAG_V6,
        };
        store_backend(&maps.backends, m::BACKENDS_MAP, backend.id, value)
    }
    fn set_rev_nat(
        maps: &mut DatapathMaps,
        id: RevNatId,
        frontend: &Frontend<Ipv6Addr>,
    ) -> Result<(), MapError> {
        let value = RevNatValue6 {
            address_be: ipv6_words(frontend.address),
            port_be: port_be(frontend.port),
            flags: m::REV_NAT_FLAG_PRESENT,
            ..RevNatValue6::default()
        };
        v6_maps(&mut maps.v6)?.reverse_nat6.set(id, value, 0)
    }
    fn clear_rev_nat_of(
        maps: &mut DatapathMaps,
        id: RevNatId,
        frontend: &Frontend<Ipv6Addr>,
    ) -> Result<bool, MapError> {
        let table = &mut v6_maps(&mut maps.v6)?.reverse_nat6;
        if id >= table.len() {
            return Ok(false);
        }
        let entry = table.get(&id, 0)?;
        if entry.is_present()
            && (entry.address_be != ipv6_words(frontend.address)
                || entry.port_be != port_be(frontend.port))
        {
            return Ok(false);
        }
        table.set(id, RevNatValue6::default(), 0)?;
        Ok(true)
    }
    fn filter_bucket(frontend: &Frontend<Ipv6Addr>) -> u32 {
        let key = frontend.key();
        service_filter_index6(key.address_be, key.port_be, key.protocol)
    }
    fn deferrable(_: &Frontend<Ipv6Addr>) -> Option<&Frontend> {
        None
    }
    fn deferrable_entries(_: &[BackendEntry<Ipv6Addr>]) -> &[BackendEntry] {
        &[]
    }
}

/// One store into a mapped array (`BACKENDS` or `BACKEND_ADDRS6`); an id
/// outside it is refused.
fn store_backend<V: aya::Pod>(
    array: &MappedArray<V>,
    name: &'static str,
    id: BackendId,
    value: V,
) -> Result<(), (&'static str, MapError)> {
    match array.set(id, value) {
        Ok(true) => Ok(()),
        Ok(false) => Err((
            name,
            MapError::OutOfBounds {
                index: id,
                max_entries: array.len(),
            },
        )),
        Err(error) => Err((name, error)),
    }
}

/// An IPv4 backend's `BACKENDS` value, for its frontend's protocol.
pub(super) fn backend_value(protocol: Protocol, backend: &BackendEntry) -> Backend {
    Backend {
        address_be: ipv4_be(backend.address.octets()),
        port_be: port_be(backend.port),
        protocol: protocol.number(),
        flags: m::BACKEND_FLAG_PRESENT,
    }
}

/// An IPv4 `frontend`'s reverse-NAT entry: the address replies get as source.
pub(super) fn rev_nat_value(frontend: &Frontend) -> RevNatValue {
    RevNatValue {
        address_be: ipv4_be(frontend.address.octets()),
        port_be: port_be(frontend.port),
        flags: m::REV_NAT_FLAG_PRESENT,
        _pad: 0,
    }
}
