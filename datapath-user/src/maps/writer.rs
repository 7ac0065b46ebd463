//! The one place that writes a service into the real maps:
//! make-before-break, so a packet never meets a frontend whose slots point
//! at nothing.

use std::net::{Ipv4Addr, Ipv6Addr};

use aya::maps::{Array, HashMap, IterableMap, MapData, MapError};
use datapath_common::{
    ipv4_octets,
    maps::{
        self as m, Backend, BackendId, RevNatId, RevNatValue, RevNatValue6, ServiceKey,
        ServiceValue, Slot,
    },
    port_host,
};

use super::{
    handles::{DatapathMaps, Ipv6Maps, slot_backend},
    lb_maps::{DumpedFrontend, LbMaps, MapDump, ProgramError, validate_service},
    slot_blocks::SlotBlocks,
    writer_family::{WriterFamily, v6_maps},
};
use crate::model::{BackendAddress, BackendEntry, Family, Frontend, Protocol, ipv6_from_words};

impl LbMaps for DatapathMaps {
    fn backend_capacity(&self) -> u32 {
        self.backends.len()
    }

    fn rev_nat_capacity(&self) -> u32 {
        self.reverse_nat.len().min(m::REV_NAT_ID_LIMIT)
    }

    /// Programs `frontend` to balance over `backends` (`write_service`).
    fn set_service(
        &mut self,
        frontend: &Frontend,
        rev_nat_id: RevNatId,
        backends: &[BackendEntry],
    ) -> Result<(), ProgramError> {
        self.write_service(frontend, rev_nat_id, backends)
    }

    /// Removes `frontend` (`erase_service`).
    fn remove_service(&mut self, frontend: &Frontend) -> Result<(), ProgramError> {
        self.erase_service(frontend)
    }

    fn serves_ipv6(&self) -> bool {
        // Loaded without IPv6 sizing, the IPv6 maps hold one entry each.
        self.v6
            .as_ref()
            .is_some_and(|v6| v6.backend_addrs6.len() > 1 && v6.reverse_nat6.len() > 1)
    }

    fn set_service6(
        &mut self,
        frontend: &Frontend<Ipv6Addr>,
        rev_nat_id: RevNatId,
        backends: &[BackendEntry<Ipv6Addr>],
    ) -> Result<(), ProgramError> {
        self.write_service(frontend, rev_nat_id, backends)
    }

    fn remove_service6(&mut self, frontend: &Frontend<Ipv6Addr>) -> Result<(), ProgramError> {
        self.erase_service(frontend)
    }

    fn remove_rev_nat6(&mut self, id: RevNatId) -> Result<(), MapError> {
        self.write_pending();
        v6_maps(&mut self.v6)?
            .reverse_nat6
            .set(id, RevNatValue6::default(), 0)
    }

    fn restore_rev_nat6(
        &mut self,
        id: RevNatId,
        frontend: &Frontend<Ipv6Addr>,
    ) -> Result<(), MapError> {
        self.write_pending();
        Ipv6Addr::set_rev_nat(self, id, frontend)
    }

    fn remove_service_key6(&mut self, key: &m::ServiceKey6) -> Result<(), MapError> {
        self.write_pending();
        self.blocks_or_scan()?;
        let services6 = &mut v6_maps(&mut self.v6)?.services6;
        let Ok(head) = services6.get(key, 0) else {
            return Ok(());
        };
        remove_if_present(services6, key)?;
        self.blocks().retire(head.first_slot, head.slot_order);
        Ok(())
    }

    fn set_affinity(
        &mut self,
        rev_nat_id: RevNatId,
        affinity: Option<(u32, &[BackendId])>,
    ) -> Result<(), MapError> {
        // Beside the frontends a bulk write still holds back (no program
        // reads these before the frontend's entry exists).
        self.write_affinity(rev_nat_id, affinity)
    }

    fn prune_affinity(&mut self, keep: &dyn Fn(RevNatId) -> bool) -> Result<usize, MapError> {
        self.prune_affinity_of(keep)
    }

    fn prune_service_counters(
        &mut self,
        keep: &dyn Fn(RevNatId) -> bool,
    ) -> Result<usize, MapError> {
        match self.service_counters.as_mut() {
            Some(counters) => counters.prune(keep),
            None => Ok(0),
        }
    }

    fn maglev_tables(&self) -> super::MaglevSettings {
        let Some(ns) = &self.north_south else {
            return super::MaglevSettings::default();
        };
        match ns.config() {
            Ok(config) if config.maglev_table_size != 0 => super::MaglevSettings {
                tables: ns.table_capacity(config.maglev_table_size),
                table_size: config.maglev_table_size,
                seed: config.maglev_seed,
            },
            _ => super::MaglevSettings::default(),
        }
    }

    fn write_maglev_table(
        &mut self,
        table: u32,
        backend_ids: &[BackendId],
    ) -> Result<(), MapError> {
        let settings = self.maglev_tables();
        let ns = self.north_south.as_ref().ok_or(MapError::OutOfBounds {
            index: table,
            max_entries: 0,
        })?;
        ns.write_table(table, settings.table_size, backend_ids)
            .map_err(|e| match e {
                super::MaglevWriteError::Map(e) => e,
                _ => MapError::OutOfBounds {
                    index: table,
                    max_entries: settings.tables,
                },
            })
    }

    fn set_maglev_table_of(
        &mut self,
        rev_nat_id: RevNatId,
        table: Option<u32>,
    ) -> Result<(), MapError> {
        match self.north_south.as_mut() {
            Some(ns) => ns.set_table_of(rev_nat_id, table),
            // Maps without them never served anything from outside.
            None if table.is_none() => Ok(()),
            None => Err(MapError::OutOfBounds {
                index: rev_nat_id,
                max_entries: 0,
            }),
        }
    }

    /// Deletes a backend. Tracked flows still pinned to it are re-balanced
    /// by the datapath on their next packet.
    fn remove_backend(&mut self, id: BackendId) -> Result<(), MapError> {
        self.write_pending();
        // No client may be kept on it (its id may go to another pod).
        self.forget_affine_backend(id)?;
        if self.backends.set(id, Backend::default())? {
            Ok(())
        } else {
            Err(MapError::OutOfBounds {
                index: id,
                max_entries: self.backends.len(),
            })
        }
    }

    fn learn_slot_blocks(&mut self) -> Result<(), MapError> {
        self.blocks_or_scan().map(|_| ())
    }

    /// Reads every service, backend and reverse-NAT entry.
    fn dump(&self) -> Result<MapDump, MapError> {
        let mut dump = MapDump {
            affine: self.affine_rev_nats()?,
            maglev_tables_of: match &self.north_south {
                Some(ns) => ns.tables_of()?,
                None => Vec::new(),
            },
            ..MapDump::default()
        };
        if let Some(ns) = &self.north_south {
            let size = self.maglev_tables().table_size;
            let mut tables: Vec<u32> = dump.maglev_tables_of.iter().map(|(_, t)| *t).collect();
            tables.sort_unstable();
            tables.dedup();
            for table in tables {
                dump.maglev_sets.push((table, ns.table_set(table, size)?));
            }
        }
        (dump.frontends, dump.stray_entries) =
            dumped_frontends::<Ipv4Addr>(&self.services, &self.slots)?;
        if let Some(v6) = &self.v6 {
            self.dump_v6(v6, &mut dump)?;
        }
        let backends: Vec<Backend> = self.backends.read_all()?;
        for (id, backend) in backends.into_iter().enumerate().skip(1) {
            let id = id as BackendId;
            if !backend.is_present() {
                continue;
            }
            let Some(protocol) = Protocol::from_number(backend.protocol) else {
                continue;
            };
            if backend.is_v6() {
                // Its address, if the IPv6 maps hold it; reserved either way.
                let address = match &self.v6 {
                    Some(v6) => v6.backend_addrs6.get(id)?,
                    None => None,
                }
                .map_or(Ipv6Addr::UNSPECIFIED, |a| ipv6_from_words(a.address_be));
                dump.backends6.push((
                    id,
                    BackendAddress {
                        address,
                        port: port_host(backend.port_be),
                        protocol,
                    },
                ));
            } else {
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
        let rev_nats: Vec<RevNatValue> = super::batch::read_array(&self.reverse_nat)?;
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

    /// Deletes one `SERVICES` entry (one naming no frontend, found by
    /// `dump`); its block rests, then is free.
    fn remove_service_key(&mut self, key: &ServiceKey) -> Result<(), MapError> {
        self.write_pending();
        self.blocks_or_scan()?;
        let Ok(head) = self.services.get(key, 0) else {
            return Ok(());
        };
        remove_if_present(&mut self.services, key)?;
        self.blocks().retire(head.first_slot, head.slot_order);
        Ok(())
    }

    fn restore_rev_nat(&mut self, id: RevNatId, frontend: &Frontend) -> Result<(), MapError> {
        self.write_pending();
        Ipv4Addr::set_rev_nat(self, id, frontend)
    }

    fn defer_new_frontends(&mut self) {
        self.pending.deferring = true;
    }

    fn flush(&mut self) -> Vec<(Frontend, ProgramError)> {
        self.write_pending();
        self.pending.deferring = false;
        // Blocks this sync's moves and removals left are free once no
        // program can still be reading them (a grace period, waited for
        // here rather than at the next change).
        if let Some(blocks) = &mut self.slot_blocks
            && blocks.has_resting()
        {
            blocks.settle();
        }
        // The pass is over: its windows of the mapped arrays go (their
        // pages would count in the agent's memory until the next change).
        self.unmap();
        self.pending.take_failed()
    }

    fn wait_for_readers(&mut self) -> bool {
        let grace = self.readers.get_or_insert_with(|| {
            crate::bpfsys::GracePeriod::new().inspect_err(|e| {
                tracing::warn!(
                    "cannot wait for running programs ({e}): freed backend ids rest {:?} instead",
                    super::slot_blocks::FALLBACK_REST
                );
            })
        });
        if !grace.as_ref().is_ok_and(|grace| grace.wait().is_ok()) {
            // Far beyond any program run.
            std::thread::sleep(super::slot_blocks::FALLBACK_REST);
        }
        true
    }

    fn unmap(&mut self) {
        self.slots.unmap();
        self.backends.unmap();
        if let Some(v6) = &mut self.v6 {
            v6.backend_addrs6.unmap();
        }
        self.unmap_affinity();
    }

    /// Clears a reverse-NAT entry no frontend uses.
    fn remove_rev_nat(&mut self, id: RevNatId) -> Result<(), MapError> {
        self.write_pending();
        self.reverse_nat.set(id, RevNatValue::default(), 0)
    }

    /// Rewrites `SERVICE_FILTER` to count exactly `frontends` and
    /// `frontends6` (both families share its buckets): repairs
    /// counts an interrupted update left too high (a count too low is
    /// impossible: it is raised before a frontend is written and lowered
    /// after it is deleted). Returns how many buckets changed.
    fn rebuild_filter(
        &mut self,
        frontends: &[Frontend],
        frontends6: &[Frontend<Ipv6Addr>],
    ) -> Result<usize, MapError> {
        self.write_pending();
        // Both families' frontends share the buckets.
        let mut want = std::collections::HashMap::<u32, u32>::new();
        for bucket in frontends
            .iter()
            .map(Ipv4Addr::filter_bucket)
            .chain(frontends6.iter().map(Ipv6Addr::filter_bucket))
        {
            *want.entry(bucket).or_default() += 1;
        }
        let mut changed = 0;
        let counts: Vec<u32> = super::batch::read_array(&self.service_filter)?;
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

impl DatapathMaps {
    /// Programs `frontend` to balance over `backends` (in slot order),
    /// replacing what it had. Make-before-break: backends and slots are
    /// written before the frontend entry that counts them and names their
    /// block. Within the block it owns (when the new set fits it and uses
    /// more than a quarter) the slots are rewritten in place, one atomic
    /// store each, so a packet reading them meanwhile gets an old or a new
    /// backend, both present; otherwise the set goes to a new block, the
    /// entry switches to it, and the old block rests before anyone else
    /// gets it (`slot_blocks::REST`).
    ///
    /// Backends no longer used by any frontend are the caller's to delete
    /// (`remove_backend`) after this returns.
    fn write_service<A: WriterFamily>(
        &mut self,
        frontend: &Frontend<A>,
        rev_nat_id: RevNatId,
        backends: &[BackendEntry<A>],
    ) -> Result<(), ProgramError> {
        let map_err = |map| map_error(frontend, map);
        let count = validate_service(
            frontend,
            rev_nat_id,
            backends,
            A::backend_capacity(self),
            A::rev_nat_capacity(self),
        )?;
        if let Some(frontend) = A::deferrable(frontend)
            && self.pending.deferring
        {
            // A frontend new to the maps is noted for the flush (`bulk`);
            // any other write goes after what is noted.
            let absent = !self.pending.is_noted(frontend)
                && matches!(
                    self.services.get(&frontend.key(), 0),
                    Err(MapError::KeyNotFound)
                );
            if absent {
                let backends = A::deferrable_entries(backends);
                self.pending.note(*frontend, rev_nat_id, backends);
                return Ok(());
            }
            self.write_pending();
        }
        // Which blocks are whose, before any entry is read (learning may
        // move an entry whose block was not its own).
        self.blocks_or_scan().map_err(map_err(A::SERVICES_MAP))?;
        let old_head = A::services(self)
            .map_err(map_err(A::SERVICES_MAP))?
            .get(&frontend.key(), 0)
            .ok();
        // The block first: a set that finds no room is refused before
        // anything is written (the reconciler then releases its ids).
        let (first_slot, order, moved) = match old_head {
            Some(old) if SlotBlocks::keeps(old.slot_order, count) => {
                (old.first_slot, old.slot_order, false)
            }
            _ => {
                let order = SlotBlocks::order_for(count);
                let first = self.allocate_block(frontend, order)?;
                (first, order, true)
            }
        };
        if let Err(error) = self.write_backends_and_rev_nat(frontend, rev_nat_id, backends) {
            if moved {
                self.blocks().release(first_slot, order);
            }
            return Err(error);
        }
        let ids: Vec<BackendId> = backends.iter().map(|b| b.id).collect();
        // Inside the array: the allocator's blocks are, and so are the
        // entries learning kept.
        // A write that cannot map its window writes nothing; either
        // failure leaves a new block unnamed, so it goes back.
        let written = self
            .slots
            .write(first_slot, ids.iter().map(|&id| Slot::of(id)))
            .and_then(|fits| {
                fits.then_some(()).ok_or(MapError::OutOfBounds {
                    index: first_slot,
                    max_entries: self.slots.len(),
                })
            });
        if let Err(error) = written {
            if moved {
                self.blocks().release(first_slot, order);
            }
            return Err(map_err(m::SLOTS_MAP)(error));
        }
        let head = ServiceValue::new(first_slot, order, count, rev_nat_id, 0);
        if old_head.is_none()
            && let Err(error) =
                adjust_filter(&mut self.service_filter, A::filter_bucket(frontend), 1)
        {
            if moved {
                self.blocks().release(first_slot, order);
            }
            return Err(map_err(m::SERVICE_FILTER_MAP)(error));
        }
        let inserted =
            A::services(self).and_then(|services| services.insert(frontend.key(), head, 0));
        if let Err(error) = inserted {
            // Nothing names the new block; a full map must not keep the
            // filter count just raised either.
            if moved {
                self.blocks().release(first_slot, order);
            }
            if old_head.is_none() {
                let _ = adjust_filter(&mut self.service_filter, A::filter_bucket(frontend), -1);
            }
            return Err(map_err(A::SERVICES_MAP)(error));
        }
        if let Some(old) = old_head {
            if moved {
                self.blocks().retire(old.first_slot, old.slot_order);
            }
            if old.rev_nat_id() != rev_nat_id {
                // A new incarnation: flows of the old one re-balance, and
                // its id (if no other frontend holds it) keeps no
                // affinity for whoever gets it next.
                let ours = A::clear_rev_nat_of(self, old.rev_nat_id(), frontend)
                    .map_err(map_err(A::REVERSE_NAT_MAP))?;
                if ours {
                    self.clear_affinity_of(old.rev_nat_id())
                        .map_err(map_err(m::AFFINITY_TIMEOUT_MAP))?;
                    self.zero_service_counters(old.rev_nat_id());
                }
            }
        }
        Ok(())
    }

    /// Removes `frontend`: its entry first (new flows stop), then its
    /// reverse-NAT entry; its block rests, then is free.
    fn erase_service<A: WriterFamily>(
        &mut self,
        frontend: &Frontend<A>,
    ) -> Result<(), ProgramError> {
        self.write_pending();
        let map_err = |map| map_error(frontend, map);
        self.blocks_or_scan().map_err(map_err(A::SERVICES_MAP))?;
        let services = A::services(self).map_err(map_err(A::SERVICES_MAP))?;
        let Ok(head) = services.get(&frontend.key(), 0) else {
            return Ok(());
        };
        remove_if_present(services, &frontend.key()).map_err(map_err(A::SERVICES_MAP))?;
        self.blocks().retire(head.first_slot, head.slot_order);
        adjust_filter(&mut self.service_filter, A::filter_bucket(frontend), -1)
            .map_err(map_err(m::SERVICE_FILTER_MAP))?;
        let ours = A::clear_rev_nat_of(self, head.rev_nat_id(), frontend)
            .map_err(map_err(A::REVERSE_NAT_MAP))?;
        // Its id (if no other frontend holds it) keeps no affinity for
        // whoever gets it next.
        if ours {
            self.clear_affinity_of(head.rev_nat_id())
                .map_err(map_err(m::AFFINITY_TIMEOUT_MAP))?;
            self.zero_service_counters(head.rev_nat_id());
        }
        Ok(())
    }
}

impl DatapathMaps {
    /// Zeroes the counters of reverse-NAT id `id`, cleared from its
    /// frontend, so that whoever gets the id next starts at zero. A
    /// failure is logged, not returned: the frontend is gone from the
    /// datapath either way, and the first sync's prune zeroes what is
    /// left (`LbMaps::prune_service_counters`).
    fn zero_service_counters(&mut self, id: RevNatId) {
        if let Some(counters) = self.service_counters.as_mut()
            && let Err(error) = counters.zero(id)
        {
            tracing::warn!(id, %error, "zeroing a freed frontend id's counters in SERVICE_COUNTERS");
        }
    }

    /// The IPv6 maps' frontends and reverse-NAT entries, into `dump`.
    fn dump_v6(&self, v6: &Ipv6Maps, dump: &mut MapDump) -> Result<(), MapError> {
        (dump.frontends6, dump.stray_entries6) =
            dumped_frontends::<Ipv6Addr>(&v6.services6, &self.slots)?;
        let rev_nats6: Vec<RevNatValue6> = super::batch::read_array(&v6.reverse_nat6)?;
        for (id, value) in rev_nats6.into_iter().enumerate().skip(1) {
            if value.is_present() {
                dump.rev_nats6.push((
                    id as RevNatId,
                    std::net::SocketAddrV6::new(
                        ipv6_from_words(value.address_be),
                        port_host(value.port_be),
                        0,
                        0,
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Every frontend of one family's service map with the backends its
/// slots name, in key order; and the entries that name no frontend (a
/// protocol this build does not know).
#[allow(clippy::type_complexity)]
fn dumped_frontends<A: Family>(
    services: &HashMap<MapData, A::ServiceKey, ServiceValue>,
    slots: &super::mapped_array::MappedArray<Slot>,
) -> Result<(Vec<DumpedFrontend<A>>, Vec<A::ServiceKey>), MapError>
where
    A::ServiceKey: aya::Pod + Default,
{
    let mut heads = read_hash::<A::ServiceKey, ServiceValue>(services)?;
    heads.sort_unstable_by_key(|(key, _)| *key);
    let (mut frontends, mut stray) = (Vec::new(), Vec::new());
    for (key, head) in heads {
        let Some(frontend) = Frontend::<A>::from_key(&key) else {
            stray.push(key);
            continue;
        };
        let slots = (1..=head.backend_count)
            .map(|slot| {
                let id = slot_backend(slots, head.slot_index(slot))?;
                Ok(Some(id).filter(|&id| id != 0))
            })
            .collect::<Result<_, MapError>>()?;
        frontends.push(DumpedFrontend {
            frontend,
            rev_nat_id: head.rev_nat_id(),
            slots,
        });
    }
    Ok((frontends, stray))
}

/// A frontend whose block is not its own alone, with the backend ids its
/// slots named when the maps were read.
type Homeless<K> = (K, ServiceValue, Vec<BackendId>);

/// Claims the block of every frontend in `services` (either family's
/// map); returns those whose block is not theirs alone, with their slots.
fn claim_blocks<K: aya::Pod + Default>(
    blocks: &mut SlotBlocks,
    services: &HashMap<MapData, K, ServiceValue>,
    slots: &super::mapped_array::MappedArray<Slot>,
) -> Result<Vec<Homeless<K>>, MapError> {
    let mut homeless = Vec::new();
    for (key, head) in read_hash::<K, ServiceValue>(services)? {
        let fits = u32::from(head.backend_count) <= head.slot_capacity();
        if !(fits && blocks.claim(head.first_slot, head.slot_order)) {
            let count = head
                .backend_count
                .min(1 << SlotBlocks::order_for(head.backend_count));
            let ids = (1..=count)
                .map(|slot| slot_backend(slots, head.slot_index(slot)))
                .collect::<Result<_, _>>()?;
            homeless.push((key, head, ids));
        }
    }
    Ok(homeless)
}

/// Gives each of `homeless` (frontends of `services`) a block of its own
/// with a copy of its slots; one that finds none is removed (`then` says
/// who writes it again).
fn rehome<K: aya::Pod + std::fmt::Debug>(
    blocks: &mut SlotBlocks,
    services: &mut HashMap<MapData, K, ServiceValue>,
    slots: &super::mapped_array::MappedArray<Slot>,
    homeless: Vec<Homeless<K>>,
    then: &str,
) -> Result<(), MapError> {
    for (key, head, ids) in homeless {
        let order = SlotBlocks::order_for(head.backend_count);
        let Some(first) = blocks.allocate(order) else {
            // Left as it is, its rewrites would land in another
            // frontend's slots: out (adoption learns before it reads the
            // maps).
            tracing::warn!(
                ?key,
                "a frontend entry whose slot block is not its own, and no free block to move it to: removed; {then}"
            );
            remove_if_present(services, &key)?;
            continue;
        };
        let count = ids.len() as u16;
        slots.write(first, ids.into_iter().map(Slot::of))?;
        let moved = ServiceValue::new(first, order, count, head.rev_nat_id(), head.flags);
        services.insert(key, moved, 0)?;
    }
    Ok(())
}

/// Turns a map's error into `frontend`'s, naming the map.
fn map_error<A: Family>(
    frontend: &Frontend<A>,
    map: &'static str,
) -> impl Fn(MapError) -> ProgramError + use<A> {
    let frontend = frontend.erased();
    move |error| ProgramError::Map {
        frontend,
        map,
        error: Box::new(error),
    }
}

/// Every entry of a hash map, read in batches.
pub(super) fn read_hash<K: aya::Pod + Default, V: aya::Pod + Default>(
    map: &HashMap<MapData, K, V>,
) -> Result<Vec<(K, V)>, MapError> {
    use std::os::fd::{AsFd, AsRawFd};
    let fd = IterableMap::map(map).fd().as_fd().as_raw_fd();
    crate::bpfsys::read_hash(fd).map_err(|io_error| {
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

/// Counts a frontend in (+1) or out (-1) of its `SERVICE_FILTER` bucket.
pub(super) fn adjust_filter(
    filter: &mut Array<MapData, u32>,
    bucket: u32,
    delta: i32,
) -> Result<(), MapError> {
    let count = filter.get(&bucket, 0)?;
    filter.set(bucket, count.saturating_add_signed(delta), 0)
}

impl DatapathMaps {
    /// The owners of `SLOTS`' blocks; read from `SERVICES` the first time
    /// (`blocks_or_scan`).
    pub(super) fn blocks(&mut self) -> &mut SlotBlocks {
        debug_assert!(self.slot_blocks.is_some(), "learned before use");
        self.slot_blocks
            .get_or_insert_with(|| SlotBlocks::new(self.slots.len()))
    }

    /// Learns which blocks the frontends in `SERVICES` and `SERVICES6`
    /// own (pins an earlier agent wrote), once. A frontend whose block is
    /// not its own alone (beyond the array, misaligned, shared with
    /// another, smaller than its count: nothing this agent writes) is
    /// given a new block with a copy of its slots, so that every entry
    /// owns its block.
    pub(super) fn blocks_or_scan(&mut self) -> Result<&mut SlotBlocks, MapError> {
        if self.slot_blocks.is_none() {
            let mut blocks = SlotBlocks::new(self.slots.len());
            // Every claim of both maps first, and every homeless
            // frontend's slots read before any is moved: a frontend moved
            // out of a shared block goes where no frontend of either
            // family is, and a move never copies slots another move wrote.
            let homeless = claim_blocks(&mut blocks, &self.services, &self.slots)?;
            let homeless6 = match &self.v6 {
                Some(v6) => claim_blocks(&mut blocks, &v6.services6, &self.slots)?,
                None => Vec::new(),
            };
            rehome(
                &mut blocks,
                &mut self.services,
                &self.slots,
                homeless,
                "the sync writes it anew",
            )?;
            if let Some(v6) = &mut self.v6 {
                rehome(
                    &mut blocks,
                    &mut v6.services6,
                    &self.slots,
                    homeless6,
                    "an agent with the IPv6 datapath writes it anew",
                )?;
            }
            self.slot_blocks = Some(blocks);
        }
        Ok(self.blocks())
    }

    /// A service's backends and its reverse-NAT entry.
    fn write_backends_and_rev_nat<A: WriterFamily>(
        &mut self,
        frontend: &Frontend<A>,
        rev_nat_id: RevNatId,
        backends: &[BackendEntry<A>],
    ) -> Result<(), ProgramError> {
        let map_err = |map| map_error(frontend, map);
        // Stores into the mapping (validated: every id is inside it).
        for backend in backends {
            A::write_backend(self, frontend.protocol, backend)
                .map_err(|(map, error)| map_err(map)(error))?;
        }
        A::set_rev_nat(self, rev_nat_id, frontend).map_err(map_err(A::REVERSE_NAT_MAP))
    }

    /// A free block of `order` for `frontend`.
    pub(super) fn allocate_block<A: Family>(
        &mut self,
        frontend: &Frontend<A>,
        order: u8,
    ) -> Result<u32, ProgramError> {
        let blocks = self.blocks_or_scan().map_err(|source| ProgramError::Map {
            frontend: frontend.erased(),
            map: m::SERVICES_MAP,
            error: Box::new(source),
        })?;
        blocks.allocate(order).ok_or(ProgramError::SlotsFull {
            frontend: frontend.erased(),
            needed: 1 << order,
            capacity: blocks.capacity(),
            taken: blocks.taken(),
        })
    }
}
