//! The one place that writes a service into the real maps:
//! make-before-break, so a packet never meets a frontend whose slots point
//! at nothing.

use std::net::Ipv4Addr;

use aya::maps::{Array, HashMap, IterableMap, MapData, MapError};
use datapath_common::{
    ipv4_be, ipv4_octets,
    lb::service_filter_index,
    maps::{self as m, Backend, BackendId, RevNatId, RevNatValue, ServiceKey, ServiceValue},
    port_be, port_host,
};

use super::{
    handles::DatapathMaps,
    lb_maps::{DumpedFrontend, LbMaps, MapDump, ProgramError, validate_service},
};
use crate::model::{BackendAddress, BackendEntry, Frontend, Protocol};

impl LbMaps for DatapathMaps {
    fn backend_capacity(&self) -> u32 {
        self.backends.len()
    }

    fn rev_nat_capacity(&self) -> u32 {
        self.reverse_nat.len().min(m::REV_NAT_ID_LIMIT)
    }

    /// Programs `frontend` to balance over `backends` (in slot order),
    /// replacing what it had. Make-before-break: backends and slots are
    /// written before the frontend entry that counts them, and slots beyond
    /// the new count are deleted only after it. A packet therefore sees
    /// either the old or the new set, never a slot naming nothing.
    ///
    /// Backends no longer used by any frontend are the caller's to delete
    /// (`remove_backend`) after this returns.
    fn set_service(
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
        if self.pending.deferring {
            // A frontend new to the maps is noted for the flush (`bulk`);
            // any other write goes after what is noted.
            let absent = !self.pending.is_noted(frontend)
                && matches!(
                    self.services.get(&frontend.key(0), 0),
                    Err(MapError::KeyNotFound)
                );
            if absent {
                self.pending.note(*frontend, rev_nat_id, backends);
                return Ok(());
            }
            self.write_pending();
        }
        let old_head = self.services.get(&frontend.key(0), 0).ok();
        let old_count = old_head.map_or(0, |h| h.backend_count);

        // One batch per map: a service's backends, then its slots.
        let ids: Vec<BackendId> = backends.iter().map(|b| b.id).collect();
        let values: Vec<Backend> = backends
            .iter()
            .map(|backend| Backend {
                address_be: ipv4_be(backend.address.octets()),
                port_be: port_be(backend.port),
                protocol: frontend.protocol.number(),
                flags: m::BACKEND_FLAG_PRESENT,
            })
            .collect();
        write_batch(IterableMap::map(&self.backends), &ids, &values)
            .map_err(|(_, error)| map_err(m::BACKENDS_MAP)(error))?;
        self.restore_rev_nat(rev_nat_id, frontend)
            .map_err(map_err(m::REVERSE_NAT_MAP))?;
        let slot_keys: Vec<ServiceKey> = (1..=backends.len())
            .map(|slot| frontend.key(slot as u16))
            .collect();
        let slots: Vec<ServiceValue> = backends
            .iter()
            .map(|backend| ServiceValue::new(backend.id, 0, rev_nat_id, 0))
            .collect();
        if let Err((written, error)) =
            write_batch(IterableMap::map(&self.services), &slot_keys, &slots)
        {
            // Slots beyond the old count that made it in name nothing a
            // frontend counts: take them out again, so that a service that
            // does not fit leaves no stray entries filling the map.
            for key in &slot_keys[usize::from(old_count).min(written)..written] {
                let _ = remove_if_present(&mut self.services, key);
            }
            return Err(map_err(m::SERVICES_MAP)(error));
        }
        let head = ServiceValue::new(0, count, rev_nat_id, 0);
        if old_head.is_none() {
            adjust_filter(&mut self.service_filter, frontend, 1)
                .map_err(map_err(m::SERVICE_FILTER_MAP))?;
        }
        if let Err(error) = self.services.insert(frontend.key(0), head, 0) {
            // As above: the slots beyond the old count are counted by
            // nothing (a frontend new to the maps has none); a full map
            // must not keep them, nor the filter count just raised.
            for key in slot_keys.iter().skip(usize::from(old_count)) {
                let _ = remove_if_present(&mut self.services, key);
            }
            if old_head.is_none() {
                let _ = adjust_filter(&mut self.service_filter, frontend, -1);
            }
            return Err(map_err(m::SERVICES_MAP)(error));
        }
        for slot in (count + 1)..=old_count {
            remove_if_present(&mut self.services, &frontend.key(slot))
                .map_err(map_err(m::SERVICES_MAP))?;
        }
        if let Some(old) = old_head
            && old.rev_nat_id() != rev_nat_id
        {
            // A new incarnation: flows of the old one re-balance.
            self.clear_rev_nat_of(old.rev_nat_id(), frontend)
                .map_err(map_err(m::REVERSE_NAT_MAP))?;
        }
        Ok(())
    }

    /// Removes `frontend`: the frontend entry first (new flows stop), then
    /// its slots and reverse-NAT entry.
    fn remove_service(&mut self, frontend: &Frontend) -> Result<(), ProgramError> {
        self.write_pending();
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
        adjust_filter(&mut self.service_filter, frontend, -1)
            .map_err(map_err(m::SERVICE_FILTER_MAP))?;
        for slot in 1..=head.backend_count {
            remove_if_present(&mut self.services, &frontend.key(slot))
                .map_err(map_err(m::SERVICES_MAP))?;
        }
        self.clear_rev_nat_of(head.rev_nat_id(), frontend)
            .map_err(map_err(m::REVERSE_NAT_MAP))?;
        Ok(())
    }

    /// Deletes a backend. Tracked flows still pinned to it are re-balanced
    /// by the datapath on their next packet.
    fn remove_backend(&mut self, id: BackendId) -> Result<(), MapError> {
        self.write_pending();
        self.backends.set(id, Backend::default(), 0)
    }

    /// Reads every service, backend and reverse-NAT entry.
    fn dump(&self) -> Result<MapDump, MapError> {
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
                    rev_nat_id: heads[&key].rev_nat_id(),
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
    fn remove_service_key(&mut self, key: &ServiceKey) -> Result<(), MapError> {
        self.write_pending();
        remove_if_present(&mut self.services, key)
    }

    fn restore_rev_nat(&mut self, id: RevNatId, frontend: &Frontend) -> Result<(), MapError> {
        self.write_pending();
        self.reverse_nat.set(id, rev_nat_value(frontend), 0)
    }

    fn defer_new_frontends(&mut self) {
        self.pending.deferring = true;
    }

    fn flush(&mut self) -> Vec<(Frontend, ProgramError)> {
        self.write_pending();
        self.pending.deferring = false;
        self.pending.take_failed()
    }

    /// Clears a reverse-NAT entry no frontend uses.
    fn remove_rev_nat(&mut self, id: RevNatId) -> Result<(), MapError> {
        self.write_pending();
        self.reverse_nat.set(id, RevNatValue::default(), 0)
    }

    /// Rewrites `SERVICE_FILTER` to count exactly `frontends`: repairs
    /// counts an interrupted update left too high (a count too low is
    /// impossible: it is raised before a frontend is written and lowered
    /// after it is deleted). Returns how many buckets changed.
    fn rebuild_filter(&mut self, frontends: &[Frontend]) -> Result<usize, MapError> {
        self.write_pending();
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

/// Writes `keys[i] → values[i]` into `map` in one BPF_MAP_UPDATE_BATCH;
/// on an error, also how many entries were written before it. `K` and
/// `V` must be the map's key and value types (the callers pass the typed
/// map's own).
pub(super) fn write_batch<K: Copy, V: Copy>(
    map: &MapData,
    keys: &[K],
    values: &[V],
) -> Result<(), (usize, MapError)> {
    use std::os::fd::{AsFd, AsRawFd};
    let fd = map.fd().as_fd().as_raw_fd();
    crate::bpfsys::update_batch(fd, keys, values).map_err(|(written, io_error)| {
        (
            written,
            MapError::SyscallError(aya::sys::SyscallError {
                call: "bpf_map_update_batch",
                io_error,
            }),
        )
    })
}

/// Every entry of an array map, read in batches.
pub(super) fn read_array<V: aya::Pod + Default>(
    array: &Array<MapData, V>,
) -> Result<Vec<V>, MapError> {
    use std::os::fd::{AsFd, AsRawFd};
    let fd = aya::maps::IterableMap::map(array).fd().as_fd().as_raw_fd();
    crate::bpfsys::read_array(fd, array.len()).map_err(|io_error| {
        MapError::SyscallError(aya::sys::SyscallError {
            call: "bpf_map_lookup_batch",
            io_error,
        })
    })
}

/// `frontend`'s reverse-NAT entry: the address replies get as source.
pub(super) fn rev_nat_value(frontend: &Frontend) -> RevNatValue {
    RevNatValue {
        address_be: ipv4_be(frontend.address.octets()),
        port_be: port_be(frontend.port),
        flags: m::REV_NAT_FLAG_PRESENT,
        _pad: 0,
    }
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

/// Counts a frontend in (+1) or out (-1) of its `SERVICE_FILTER` bucket.
pub(super) fn adjust_filter(
    filter: &mut Array<MapData, u32>,
    frontend: &Frontend,
    delta: i32,
) -> Result<(), MapError> {
    let key = frontend.key(0);
    let bucket = service_filter_index(key.address_be, key.port_be, key.protocol);
    let count = filter.get(&bucket, 0)?;
    filter.set(bucket, count.saturating_add_signed(delta), 0)
}

impl DatapathMaps {
    /// Clears reverse-NAT entry `id` if it still names `frontend`: an id
    /// beyond the table (made smaller since) has no entry, and one that
    /// names another frontend is that frontend's (the id was taken twice,
    /// and adoption gave this frontend another).
    fn clear_rev_nat_of(&mut self, id: RevNatId, frontend: &Frontend) -> Result<(), MapError> {
        if id >= self.reverse_nat.len() {
            return Ok(());
        }
        let entry = self.reverse_nat.get(&id, 0)?;
        if entry.is_present()
            && (entry.address_be != ipv4_be(frontend.address.octets())
                || entry.port_be != port_be(frontend.port))
        {
            return Ok(());
        }
        self.reverse_nat.set(id, RevNatValue::default(), 0)
    }
}
