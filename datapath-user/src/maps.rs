//! Typed handles on the datapath's maps, and the one place that writes a
//! service into them (make-before-break, so a packet never meets a
//! frontend whose slots point at nothing).

use std::{net::Ipv4Addr, path::Path};

use aya::{
    Ebpf,
    maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray},
};
use datapath_common::{
    IPPROTO_TCP, IPPROTO_UDP, ipv4_be, ipv4_octets,
    lb::service_filter_index,
    maps::{
        self as m, Backend, BackendId, CtEntry, CtKey, FragmentKey, FragmentPorts, RevNatId,
        RevNatValue, ServiceKey, ServiceValue, SockRevNatKey, SockRevNatValue,
    },
    metrics::Counter,
    port_be, port_host,
};

use crate::error::LoaderError;

/// L4 protocol of a frontend.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum Protocol {
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
}

impl Protocol {
    pub const fn number(self) -> u8 {
        match self {
            Protocol::Tcp => IPPROTO_TCP,
            Protocol::Udp => IPPROTO_UDP,
        }
    }

    pub const fn from_number(number: u8) -> Option<Self> {
        match number {
            IPPROTO_TCP => Some(Protocol::Tcp),
            IPPROTO_UDP => Some(Protocol::Udp),
            _ => None,
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        })
    }
}

/// A service address: what clients connect to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend {
    pub address: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
}

impl Frontend {
    pub fn key(&self, slot: u16) -> ServiceKey {
        ServiceKey::new(
            ipv4_be(self.address.octets()),
            port_be(self.port),
            self.protocol.number(),
            slot,
        )
    }
}

impl Frontend {
    /// The frontend a `SERVICES` key belongs to (any slot).
    pub fn from_key(key: &ServiceKey) -> Option<Self> {
        Some(Self {
            address: Ipv4Addr::from(ipv4_octets(key.address_be)),
            port: port_host(key.port_be),
            protocol: Protocol::from_number(key.protocol)?,
        })
    }
}

impl std::fmt::Display for Frontend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}/{}", self.address, self.port, self.protocol)
    }
}

/// A backend's identity: two frontends with the same backend address,
/// port and protocol share one `BACKENDS` entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct BackendAddress {
    pub address: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
}

impl std::fmt::Display for BackendAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}/{}", self.address, self.port, self.protocol)
    }
}

/// One backend of a frontend, with the id the caller allocated for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BackendEntry {
    pub id: BackendId,
    pub address: Ipv4Addr,
    pub port: u16,
}

#[derive(Debug, thiserror::Error)]
pub enum ProgramError {
    #[error(
        "{frontend}: {count} backends exceed the limit of {max} per service; this node serves its own subset of {max} (set --node-name so that every node picks a different one)"
    )]
    TooManyBackends {
        frontend: Frontend,
        count: usize,
        max: u16,
    },
    #[error("{frontend}: backend id {id} is outside 1..{capacity} (the BACKENDS map's size)")]
    BackendIdOutOfRange {
        frontend: Frontend,
        id: BackendId,
        capacity: u32,
    },
    #[error(
        "{frontend}: reverse-NAT id {id} is outside 1..{capacity} (the REVERSE_NAT map's size)"
    )]
    RevNatIdOutOfRange {
        frontend: Frontend,
        id: RevNatId,
        capacity: u32,
    },
    #[error("{frontend}: port 0 is not a valid {what} port")]
    PortZero {
        frontend: Frontend,
        what: &'static str,
    },
    #[error("{frontend}: writing {map}: {}", crate::error::with_causes(&**.error))]
    Map {
        frontend: Frontend,
        map: &'static str,
        error: Box<MapError>,
    },
}

/// Handles on every map of a loaded (or pinned) datapath.
pub struct DatapathMaps {
    pub services: HashMap<MapData, ServiceKey, ServiceValue>,
    /// Indexed by backend id; a zeroed slot holds no backend.
    pub backends: Array<MapData, Backend>,
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
}

impl DatapathMaps {
    /// Takes the maps out of a freshly loaded object.
    pub fn take_from(ebpf: &mut Ebpf) -> Result<Self, LoaderError> {
        Self::from_maps(|name| {
            ebpf.take_map(name)
                .ok_or_else(|| LoaderError::map(name, MapError::InvalidName { name: name.into() }))
        })
    }

    /// Opens the maps an agent pinned under `pin_dir` (no object needed).
    pub fn open_pinned(pin_dir: &Path) -> Result<Self, LoaderError> {
        Self::from_maps(|name| {
            let data = MapData::from_pin(pin_dir.join(name))
                .map_err(|source| LoaderError::map(name, source))?;
            Map::from_map_data(data).map_err(|source| LoaderError::map(name, source))
        })
    }

    /// Every map, each got by name from `get` and typed.
    fn from_maps(
        mut get: impl FnMut(&'static str) -> Result<Map, LoaderError>,
    ) -> Result<Self, LoaderError> {
        fn typed<T: TryFrom<Map, Error = MapError>>(
            get: &mut impl FnMut(&'static str) -> Result<Map, LoaderError>,
            name: &'static str,
        ) -> Result<T, LoaderError> {
            T::try_from(get(name)?).map_err(|source| LoaderError::map(name, source))
        }
        Ok(Self {
            services: typed(&mut get, m::SERVICES_MAP)?,
            backends: typed(&mut get, m::BACKENDS_MAP)?,
            reverse_nat: typed(&mut get, m::REVERSE_NAT_MAP)?,
            conntrack_tcp: typed(&mut get, m::CONNTRACK_TCP_MAP)?,
            conntrack_udp: typed(&mut get, m::CONNTRACK_UDP_MAP)?,
            sock_reverse_nat: typed(&mut get, m::SOCK_REVERSE_NAT_MAP)?,
            counters: typed(&mut get, m::COUNTERS_MAP)?,
            service_filter: typed(&mut get, m::SERVICE_FILTER_MAP)?,
            fragments: typed(&mut get, m::FRAGMENTS_MAP)?,
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

    /// Entries in both conntrack tables (two per flow).
    pub fn conntrack_entries(&self) -> usize {
        self.conntrack_tables()
            .iter()
            .map(|(_, table)| table.keys().count())
            .sum()
    }

    /// Every counter summed over the CPUs.
    pub fn counters(&self) -> Result<Vec<(Counter, u64)>, MapError> {
        Counter::ALL
            .iter()
            .map(|&c| Ok((c, self.counters.get(&(c as u32), 0)?.iter().sum())))
            .collect()
    }

    /// One counter summed over the CPUs.
    pub fn counter(&self, counter: Counter) -> Result<u64, MapError> {
        Ok(self.counters.get(&(counter as u32), 0)?.iter().sum())
    }

    /// Programs `frontend` to balance over `backends` (in slot order),
    /// replacing what it had. Make-before-break: backends and slots are
    /// written before the frontend entry that counts them, and slots beyond
    /// the new count are deleted only after it. A packet therefore sees
    /// either the old or the new set, never a slot naming nothing.
    ///
    /// Backends no longer used by any frontend are the caller's to delete
    /// (`remove_backend`) after this returns.
    pub fn set_service(
        &mut self,
        frontend: &Frontend,
        rev_nat_id: RevNatId,
        backends: &[BackendEntry],
    ) -> Result<(), ProgramError> {
        let map_err = |map: &'static str| {
            move |source| ProgramError::Map {
                frontend: *frontend,
                map,
                error: Box::new(source),
            }
        };
        let count = validate_service(
            frontend,
            rev_nat_id,
            backends,
            self.backends.len(),
            self.reverse_nat.len(),
        )?;
        let old_head = self.services.get(&frontend.key(0), 0).ok();
        let old_count = old_head.map_or(0, |h| h.backend_count);

        for backend in backends {
            let value = Backend {
                address_be: ipv4_be(backend.address.octets()),
                port_be: port_be(backend.port),
                protocol: frontend.protocol.number(),
                flags: m::BACKEND_FLAG_PRESENT,
            };
            self.backends
                .set(backend.id, value, 0)
                .map_err(map_err(m::BACKENDS_MAP))?;
        }
        let rev_nat = RevNatValue {
            address_be: ipv4_be(frontend.address.octets()),
            port_be: port_be(frontend.port),
            flags: m::REV_NAT_FLAG_PRESENT,
            _pad: 0,
        };
        self.reverse_nat
            .set(u32::from(rev_nat_id), rev_nat, 0)
            .map_err(map_err(m::REVERSE_NAT_MAP))?;
        for (i, backend) in backends.iter().enumerate() {
            let slot = ServiceValue {
                backend_id: backend.id,
                rev_nat_id,
                ..ServiceValue::default()
            };
            self.services
                .insert(frontend.key(i as u16 + 1), slot, 0)
                .map_err(map_err(m::SERVICES_MAP))?;
        }
        let head = ServiceValue {
            backend_count: count,
            rev_nat_id,
            ..ServiceValue::default()
        };
        if old_head.is_none() {
            self.adjust_filter(frontend, 1)
                .map_err(map_err(m::SERVICE_FILTER_MAP))?;
        }
        self.services
            .insert(frontend.key(0), head, 0)
            .map_err(map_err(m::SERVICES_MAP))?;
        for slot in (count + 1)..=old_count {
            remove_if_present(&mut self.services, &frontend.key(slot))
                .map_err(map_err(m::SERVICES_MAP))?;
        }
        if let Some(old) = old_head
            && old.rev_nat_id != rev_nat_id
        {
            // A new incarnation: flows of the old one re-balance.
            self.reverse_nat
                .set(u32::from(old.rev_nat_id), RevNatValue::default(), 0)
                .map_err(map_err(m::REVERSE_NAT_MAP))?;
        }
        Ok(())
    }

    /// Counts a frontend in (+1) or out (-1) of its `SERVICE_FILTER` bucket.
    fn adjust_filter(&mut self, frontend: &Frontend, delta: i32) -> Result<(), MapError> {
        let key = frontend.key(0);
        let bucket = service_filter_index(key.address_be, key.port_be, key.protocol);
        let count = self.service_filter.get(&bucket, 0)?;
        self.service_filter
            .set(bucket, count.saturating_add_signed(delta), 0)
    }

    /// Removes `frontend`: the frontend entry first (new flows stop), then
    /// its slots and reverse-NAT entry.
    pub fn remove_service(&mut self, frontend: &Frontend) -> Result<(), ProgramError> {
        let map_err = |map: &'static str| {
            move |source| ProgramError::Map {
                frontend: *frontend,
                map,
                error: Box::new(source),
            }
        };
        let Ok(head) = self.services.get(&frontend.key(0), 0) else {
            return Ok(());
        };
        remove_if_present(&mut self.services, &frontend.key(0))
            .map_err(map_err(m::SERVICES_MAP))?;
        self.adjust_filter(frontend, -1)
            .map_err(map_err(m::SERVICE_FILTER_MAP))?;
        for slot in 1..=head.backend_count {
            remove_if_present(&mut self.services, &frontend.key(slot))
                .map_err(map_err(m::SERVICES_MAP))?;
        }
        self.reverse_nat
            .set(u32::from(head.rev_nat_id), RevNatValue::default(), 0)
            .map_err(map_err(m::REVERSE_NAT_MAP))?;
        Ok(())
    }

    /// Deletes a backend. Tracked flows still pinned to it are re-balanced
    /// by the datapath on their next packet.
    pub fn remove_backend(&mut self, id: BackendId) -> Result<(), MapError> {
        self.backends.set(id, Backend::default(), 0)
    }
}

/// Checks what `set_service` would write, before anything is written;
/// returns the backend count. Shared with the in-memory map fake so both
/// refuse the same input.
pub fn validate_service(
    frontend: &Frontend,
    rev_nat_id: RevNatId,
    backends: &[BackendEntry],
    backend_capacity: u32,
    rev_nat_capacity: u32,
) -> Result<u16, ProgramError> {
    let count = u16::try_from(backends.len())
        .ok()
        .filter(|&n| n <= m::MAX_BACKENDS_PER_SERVICE)
        .ok_or(ProgramError::TooManyBackends {
            frontend: *frontend,
            count: backends.len(),
            max: m::MAX_BACKENDS_PER_SERVICE,
        })?;
    if rev_nat_id == 0 || u32::from(rev_nat_id) >= rev_nat_capacity {
        return Err(ProgramError::RevNatIdOutOfRange {
            frontend: *frontend,
            id: rev_nat_id,
            capacity: rev_nat_capacity,
        });
    }
    if frontend.port == 0 {
        return Err(ProgramError::PortZero {
            frontend: *frontend,
            what: "service",
        });
    }
    for backend in backends {
        if backend.id == 0 || backend.id >= backend_capacity {
            return Err(ProgramError::BackendIdOutOfRange {
                frontend: *frontend,
                id: backend.id,
                capacity: backend_capacity,
            });
        }
        if backend.port == 0 {
            return Err(ProgramError::PortZero {
                frontend: *frontend,
                what: "backend",
            });
        }
    }
    Ok(count)
}

/// A frontend as found in the maps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DumpedFrontend {
    pub frontend: Frontend,
    pub rev_nat_id: RevNatId,
    /// Slots 1..=count in order; `None` where a slot is missing (an
    /// interrupted write: the frontend must be re-programmed).
    pub slots: Vec<Option<BackendId>>,
}

/// Everything the service maps hold (not conntrack).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapDump {
    pub frontends: Vec<DumpedFrontend>,
    /// Slot entries with no frontend entry, or beyond its count.
    pub stray_slots: Vec<ServiceKey>,
    pub backends: Vec<(BackendId, BackendAddress)>,
    /// Present reverse-NAT entries: the service address replies get.
    pub rev_nats: Vec<(RevNatId, std::net::SocketAddrV4)>,
}

impl DatapathMaps {
    /// Reads every service, backend and reverse-NAT entry.
    pub fn dump(&self) -> Result<MapDump, MapError> {
        let mut heads = std::collections::BTreeMap::new();
        let mut slots = Vec::new();
        for entry in self.services.iter() {
            let (key, value) = entry?;
            if key.backend_slot == 0 {
                heads.insert(key, value);
            } else {
                slots.push((key, value));
            }
        }
        let mut dump = MapDump::default();
        let mut by_head: std::collections::BTreeMap<ServiceKey, Vec<Option<BackendId>>> = heads
            .iter()
            .map(|(key, head)| (*key, vec![None; usize::from(head.backend_count)]))
            .collect();
        for (key, value) in slots {
            let head_key = ServiceKey {
                backend_slot: 0,
                ..key
            };
            match by_head.get_mut(&head_key) {
                Some(list) if usize::from(key.backend_slot) <= list.len() => {
                    list[usize::from(key.backend_slot) - 1] = Some(value.backend_id);
                }
                _ => dump.stray_slots.push(key),
            }
        }
        for (key, slots) in by_head {
            match Frontend::from_key(&key) {
                Some(frontend) => dump.frontends.push(DumpedFrontend {
                    frontend,
                    rev_nat_id: heads[&key].rev_nat_id,
                    slots,
                }),
                None => dump.stray_slots.push(key),
            }
        }
        let backends: Vec<Backend> = read_array(&self.backends)?;
        for (id, backend) in backends.into_iter().enumerate().skip(1) {
            let id = id as BackendId;
            if backend.is_present() {
                let Some(protocol) = Protocol::from_number(backend.protocol) else {
                    continue;
                };
                dump.backends.push((
                    id,
                    BackendAddress {
                        address: Ipv4Addr::from(ipv4_octets(backend.address_be)),
                        port: port_host(backend.port_be),
                        protocol,
                    },
                ));
            }
        }
        let rev_nats: Vec<RevNatValue> = read_array(&self.reverse_nat)?;
        for (id, value) in rev_nats.into_iter().enumerate().skip(1) {
            if value.is_present() {
                dump.rev_nats.push((
                    id as RevNatId,
                    std::net::SocketAddrV4::new(
                        Ipv4Addr::from(ipv4_octets(value.address_be)),
                        port_host(value.port_be),
                    ),
                ));
            }
        }
        Ok(dump)
    }

    /// Deletes one `SERVICES` entry (a stray slot found by `dump`).
    pub fn remove_service_key(&mut self, key: &ServiceKey) -> Result<(), MapError> {
        remove_if_present(&mut self.services, key)
    }

    /// Clears a reverse-NAT entry no frontend uses.
    pub fn remove_rev_nat(&mut self, id: RevNatId) -> Result<(), MapError> {
        self.reverse_nat
            .set(u32::from(id), RevNatValue::default(), 0)
    }

    /// Rewrites `SERVICE_FILTER` to count exactly `frontends`: repairs
    /// counts an interrupted update left too high (a count too low is
    /// impossible: it is raised before a frontend is written and lowered
    /// after it is deleted). Returns how many buckets changed.
    pub fn rebuild_filter<'a>(
        &mut self,
        frontends: impl IntoIterator<Item = &'a Frontend>,
    ) -> Result<usize, MapError> {
        let mut want = std::collections::HashMap::<u32, u32>::new();
        for frontend in frontends {
            let key = frontend.key(0);
            *want
                .entry(service_filter_index(
                    key.address_be,
                    key.port_be,
                    key.protocol,
                ))
                .or_default() += 1;
        }
        let mut changed = 0;
        let counts: Vec<u32> = read_array(&self.service_filter)?;
        for (bucket, have) in counts.into_iter().enumerate() {
            let bucket = bucket as u32;
            let should = want.get(&bucket).copied().unwrap_or(0);
            if have != should {
                self.service_filter.set(bucket, should, 0)?;
                changed += 1;
            }
        }
        Ok(changed)
    }
}

/// Every entry of an array map, read in batches.
fn read_array<V: aya::Pod + Default>(array: &Array<MapData, V>) -> Result<Vec<V>, MapError> {
    use std::os::fd::{AsFd, AsRawFd};
    let fd = aya::maps::IterableMap::map(array).fd().as_fd().as_raw_fd();
    crate::bpfsys::read_array(fd, array.len()).map_err(|io_error| {
        MapError::SyscallError(aya::sys::SyscallError {
            call: "bpf_map_lookup_batch",
            io_error,
        })
    })
}

fn remove_if_present<K: aya::Pod, V: aya::Pod>(
    map: &mut HashMap<MapData, K, V>,
    key: &K,
) -> Result<(), MapError> {
    match map.remove(key) {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(e) => Err(e),
    }
}
