//! Typed handles on every map of a loaded (or pinned) datapath.

use std::path::Path;

use aya::{
    Ebpf,
    maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray},
};
use datapath_common::{
    IPPROTO_TCP,
    maps::{
        self as m, Backend, BackendAddress6, CtEntry, CtEntry6, CtKey, CtKey6, FragmentKey,
        FragmentPorts, RevNatValue, RevNatValue6, ServiceKey, ServiceKey6, ServiceValue, Slot,
        SockRevNatKey, SockRevNatValue,
    },
    metrics::Counter,
};

use super::mapped_array::MappedArray;
use crate::error::LoaderError;

/// The backend id in slot `index` (0: none, or beyond the array).
pub(super) fn slot_backend(
    slots: &MappedArray<Slot>,
    index: u32,
) -> Result<m::BackendId, MapError> {
    Ok(slots.get(index)?.map_or(0, |slot| slot.backend_id))
}

/// Handles on every map of a loaded (or pinned) datapath.
pub struct DatapathMaps {
    /// Frontends, each naming its block of `slots`.
    pub services: HashMap<MapData, ServiceKey, ServiceValue>,
    /// Every frontend's backend slots, mapped into this process.
    pub slots: MappedArray<Slot>,
    /// Which blocks of `slots` are whose: read from `services` at the
    /// first write (`writer`), kept up to date after.
    pub(super) slot_blocks: Option<super::slot_blocks::SlotBlocks>,
    /// Indexed by backend id; a zeroed entry holds no backend. Mapped
    /// into memory, as `slots`.
    pub backends: MappedArray<Backend>,
    /// Indexed by reverse-NAT id; a zeroed slot holds no frontend.
    pub reverse_nat: Array<MapData, RevNatValue>,
    /// TCP flows of the TC path (two entries each).
    pub conntrack_tcp: HashMap<MapData, CtKey, CtEntry>,
    /// UDP flows of the TC path (two entries each).
    pub conntrack_udp: HashMap<MapData, CtKey, CtEntry>,
    pub sock_reverse_nat: HashMap<MapData, SockRevNatKey, SockRevNatValue>,
    pub counters: PerCpuArray<MapData, u64>,
    /// Frontends per `lb::service_filter_index` bucket.
    pub service_filter: Array<MapData, u32>,
    /// Ports of fragmented datagrams in flight.
    pub fragments: HashMap<MapData, FragmentKey, FragmentPorts>,
    /// Peers tracked flows were opened to, and whether those flags are
    /// complete (`super::reply_filter`).
    pub reply_filter: Array<MapData, u32>,
    /// New frontends noted for one batched write (`super::bulk`).
    pub(super) pending: super::pending::PendingWrites,
    /// The IPv6 maps; `None` in pins an agent without them made (the
    /// CLI reading an older agent's pins).
    pub v6: Option<Ipv6Maps>,
    /// The `sessionAffinity` maps the agent writes; `None` in pins an
    /// agent without them made.
    pub affinity: Option<super::affinity::AffinityMaps>,
    /// Packets and new flows per frontend; `None` in pins an agent
    /// without it made.
    pub service_counters: Option<super::service_counters::ServiceCounterMap>,
    /// The north-south maps; `None` in pins an agent without them made.
    pub north_south: Option<super::north_south::NorthSouthMaps>,
    /// Waits for running programs (`LbMaps::wait_for_readers`), made at
    /// the first wait.
    pub(super) readers: Option<std::io::Result<crate::bpfsys::GracePeriod>>,
}

/// Handles on the IPv6 twins that hold frontends and backends.
pub struct Ipv6Maps {
    /// IPv6 frontends, each naming its block of `slots` (shared with
    /// `services`: one slot allocator for both families).
    pub services6: HashMap<MapData, ServiceKey6, ServiceValue>,
    /// The address of each IPv6 backend, under its `backends` id.
    pub backend_addrs6: MappedArray<BackendAddress6>,
    /// Reverse-NAT id → IPv6 frontend (ids shared with `reverse_nat`).
    pub reverse_nat6: Array<MapData, RevNatValue6>,
    /// IPv6 TCP flows of the TC path (two entries each).
    pub conntrack6_tcp: HashMap<MapData, CtKey6, CtEntry6>,
    /// IPv6 UDP flows of the TC path (two entries each).
    pub conntrack6_udp: HashMap<MapData, CtKey6, CtEntry6>,
}

impl DatapathMaps {
    /// Takes the maps out of a freshly loaded object.
    pub fn take_from(ebpf: &mut Ebpf) -> Result<Self, LoaderError> {
        Self::from_maps(
            |name| {
                ebpf.take_map(name).ok_or_else(|| {
                    LoaderError::map(name, MapError::InvalidName { name: name.into() })
                })
            },
            |_| true,
        )
    }

    /// Opens the maps an agent pinned under `pin_dir` (no object needed).
    pub fn open_pinned(pin_dir: &Path) -> Result<Self, LoaderError> {
        Self::from_maps(
            |name| {
                let data = MapData::from_pin(pin_dir.join(name))
                    .map_err(|source| LoaderError::map(name, source))?;
                Map::from_map_data(data).map_err(|source| LoaderError::map(name, source))
            },
            |name| pin_dir.join(name).exists(),
        )
    }

    /// Every map, each got by name from `get` and typed.
    fn from_maps(
        mut get: impl FnMut(&'static str) -> Result<Map, LoaderError>,
        present: impl Fn(&'static str) -> bool,
    ) -> Result<Self, LoaderError> {
        fn typed<T: TryFrom<Map, Error = MapError>>(
            get: &mut impl FnMut(&'static str) -> Result<Map, LoaderError>,
            name: &'static str,
        ) -> Result<T, LoaderError> {
            T::try_from(get(name)?).map_err(|source| LoaderError::map(name, source))
        }
        fn mapped<T: aya::Pod>(
            get: &mut impl FnMut(&'static str) -> Result<Map, LoaderError>,
            name: &'static str,
        ) -> Result<MappedArray<T>, LoaderError> {
            Ok(MappedArray::new(typed(get, name)?))
        }
        let slots = mapped(&mut get, m::SLOTS_MAP)?;
        let backends = mapped(&mut get, m::BACKENDS_MAP)?;
        Ok(Self {
            services: typed(&mut get, m::SERVICES_MAP)?,
            slots,
            slot_blocks: None,
            backends,
            reverse_nat: typed(&mut get, m::REVERSE_NAT_MAP)?,
            conntrack_tcp: typed(&mut get, m::CONNTRACK_TCP_MAP)?,
            conntrack_udp: typed(&mut get, m::CONNTRACK_UDP_MAP)?,
            sock_reverse_nat: typed(&mut get, m::SOCK_REVERSE_NAT_MAP)?,
            counters: typed(&mut get, m::COUNTERS_MAP)?,
            service_filter: typed(&mut get, m::SERVICE_FILTER_MAP)?,
            fragments: typed(&mut get, m::FRAGMENTS_MAP)?,
            reply_filter: typed(&mut get, m::REPLY_FILTER_MAP)?,
            pending: Default::default(),
            readers: None,
            service_counters: if present(m::SERVICE_COUNTERS_MAP) {
                let map = typed(&mut get, m::SERVICE_COUNTERS_MAP)?;
                Some(
                    super::service_counters::ServiceCounterMap::new(map)
                        .map_err(|source| LoaderError::map(m::SERVICE_COUNTERS_MAP, source))?,
                )
            } else {
                None
            },
            north_south: if [
                m::NORTH_SOUTH_MAP,
                m::MAGLEV_TABLE_OF_MAP,
                m::MAGLEV_MAP,
                m::LOCAL_PODS_MAP,
                m::UPLINK_SNAT_MAP,
            ]
            .into_iter()
            .all(&present)
            {
                Some(super::north_south::NorthSouthMaps::new(
                    typed(&mut get, m::NORTH_SOUTH_MAP)?,
                    typed(&mut get, m::MAGLEV_TABLE_OF_MAP)?,
                    mapped(&mut get, m::MAGLEV_MAP)?,
                    typed(&mut get, m::LOCAL_PODS_MAP)?,
                    typed(&mut get, m::UPLINK_SNAT_MAP)?,
                ))
            } else {
                None
            },
            affinity: if [
                m::AFFINITY_MAP,
                m::AFFINITY_MATCH_MAP,
                m::AFFINITY_TIMEOUT_MAP,
            ]
            .into_iter()
            .all(&present)
            {
                Some(super::affinity::AffinityMaps::new(
                    mapped(&mut get, m::AFFINITY_TIMEOUT_MAP)?,
                    typed(&mut get, m::AFFINITY_MATCH_MAP)?,
                    typed(&mut get, m::AFFINITY_MAP)?,
                ))
            } else {
                None
            },
            v6: if [
                m::SERVICES6_MAP,
                m::BACKEND_ADDRS6_MAP,
                m::REVERSE_NAT6_MAP,
                m::CONNTRACK6_TCP_MAP,
                m::CONNTRACK6_UDP_MAP,
            ]
            .into_iter()
            .all(present)
            {
                Some(Ipv6Maps {
                    services6: typed(&mut get, m::SERVICES6_MAP)?,
                    backend_addrs6: mapped(&mut get, m::BACKEND_ADDRS6_MAP)?,
                    reverse_nat6: typed(&mut get, m::REVERSE_NAT6_MAP)?,
                    conntrack6_tcp: typed(&mut get, m::CONNTRACK6_TCP_MAP)?,
                    conntrack6_udp: typed(&mut get, m::CONNTRACK6_UDP_MAP)?,
                })
            } else {
                None
            },
        })
    }

    /// The conntrack table of `protocol` (`IPPROTO_TCP` or anything else:
    /// UDP).
    pub fn conntrack(&self, protocol: u8) -> &HashMap<MapData, CtKey, CtEntry> {
        if protocol == IPPROTO_TCP {
            &self.conntrack_tcp
        } else {
            &self.conntrack_udp
        }
    }

    /// Both conntrack tables with their names.
    pub fn conntrack_tables(&self) -> [(&'static str, &HashMap<MapData, CtKey, CtEntry>); 2] {
        [
            (m::CONNTRACK_TCP_MAP, &self.conntrack_tcp),
            (m::CONNTRACK_UDP_MAP, &self.conntrack_udp),
        ]
    }

    /// Both IPv6 conntrack tables with their names (none in pins
    /// without them).
    pub fn conntrack6_tables(&self) -> Vec<(&'static str, &HashMap<MapData, CtKey6, CtEntry6>)> {
        self.v6
            .iter()
            .flat_map(|v6| {
                [
                    (m::CONNTRACK6_TCP_MAP, &v6.conntrack6_tcp),
                    (m::CONNTRACK6_UDP_MAP, &v6.conntrack6_udp),
                ]
            })
            .collect()
    }

    /// Entries in the conntrack tables of both families (two per flow).
    pub fn conntrack_entries(&self) -> usize {
        let v4: usize = self
            .conntrack_tables()
            .iter()
            .map(|(_, table)| table.keys().count())
            .sum();
        let v6: usize = self
            .conntrack6_tables()
            .iter()
            .map(|(_, table)| table.keys().count())
            .sum();
        v4 + v6
    }

    /// The backend ids `key`'s frontend balances over now, in slot order
    /// (`None`: no such frontend).
    pub fn backend_ids_of(&self, key: &ServiceKey) -> Result<Option<Vec<m::BackendId>>, MapError> {
        let head = match self.services.get(key, 0) {
            Ok(head) => head,
            Err(MapError::KeyNotFound) => return Ok(None),
            Err(e) => return Err(e),
        };
        (1..=head.backend_count)
            .map(|slot| slot_backend(&self.slots, head.slot_index(slot)))
            .collect::<Result<_, _>>()
            .map(Some)
    }

    /// Slots in blocks frontends own (or left moments ago), once this
    /// process has learned them (its first write).
    pub fn slots_taken(&self) -> Option<u64> {
        self.slot_blocks.as_ref().map(|blocks| blocks.taken())
    }

    /// Every counter summed over the CPUs; those an older build's
    /// smaller `COUNTERS` does not hold are left out.
    pub fn counters(&self) -> Result<Vec<(Counter, u64)>, MapError> {
        let held = self.counters.len();
        Counter::ALL
            .iter()
            .filter(|&&c| (c as u32) < held)
            .map(|&c| Ok((c, self.counters.get(&(c as u32), 0)?.iter().sum())))
            .collect()
    }

    /// One counter summed over the CPUs.
    pub fn counter(&self, counter: Counter) -> Result<u64, MapError> {
        Ok(self.counters.get(&(counter as u32), 0)?.iter().sum())
    }
}
