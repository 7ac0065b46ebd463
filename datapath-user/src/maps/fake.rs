//! In-memory maps for the reconciler's tests and the bench, with the
//! real maps' rules (`validate_service`).

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr},
};

use aya::maps::MapError;
use datapath_common::maps::{BackendId, RevNatId, ServiceKey, ServiceKey6};

use super::lb_maps::{
    DumpedFrontend, LbMaps, MaglevSettings, MapDump, ProgramError, validate_service,
};
use crate::model::{BackendAddress, BackendEntry, Family, Frontend};

/// The maps as plain collections, with the real maps' validation; the
/// reconciler's tests run against it and against the real maps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FakeMaps {
    /// Both id spaces are `1..capacity`.
    pub capacity: u32,
    /// `SERVICES` with its slots, `BACKENDS`' IPv4 entries, `REVERSE_NAT`.
    pub v4: FakeFamily<Ipv4Addr>,
    /// The IPv6 twins (`BACKENDS`' IPv6 entries share the id space).
    pub v6: FakeFamily<Ipv6Addr>,
    /// Whether IPv6 frontends are taken (`serves_ipv6`).
    pub ipv6: bool,
    /// Every write, in order, to check make-before-break.
    pub log: Vec<String>,
    /// Makes the next `set_service` fail after writing the backends (a
    /// map that filled up midway).
    pub fail_next_write: bool,
    /// Frontends with `sessionAffinity` (both families: one id space):
    /// reverse-NAT id → timeout in seconds and the backends matched.
    pub affinity: BTreeMap<RevNatId, (u32, Vec<BackendId>)>,
    /// Makes the next `set_affinity` fail having written nothing (a full
    /// `AFFINITY_MATCH`).
    pub fail_next_affinity: bool,
    /// Makes the next `remove_backend` fail having removed nothing.
    pub fail_next_remove_backend: bool,
    /// The Maglev tables it holds (none unless a test gives it some).
    pub maglev: MaglevSettings,
    /// Each written Maglev table's entries.
    pub maglev_tables: BTreeMap<u32, Vec<BackendId>>,
    /// Reverse-NAT id → its Maglev table (served from outside).
    pub maglev_table_of: BTreeMap<RevNatId, u32>,
    /// Makes the next `write_maglev_table` fail having written nothing.
    pub fail_next_maglev_write: bool,
}

/// One family's maps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FakeFamily<A> {
    /// Frontend → its reverse-NAT id and its slots' backend ids.
    pub services: BTreeMap<Frontend<A>, (RevNatId, Vec<BackendId>)>,
    pub backends: BTreeMap<BackendId, BackendAddress<A>>,
    /// Reverse-NAT id → service address and port.
    pub rev_nats: BTreeMap<RevNatId, (A, u16)>,
}

impl<A> Default for FakeFamily<A> {
    fn default() -> Self {
        Self {
            services: BTreeMap::new(),
            backends: BTreeMap::new(),
            rev_nats: BTreeMap::new(),
        }
    }
}

impl Default for FakeMaps {
    fn default() -> Self {
        Self {
            capacity: 0,
            v4: FakeFamily::default(),
            v6: FakeFamily::default(),
            ipv6: true,
            log: Vec::new(),
            fail_next_write: false,
            affinity: BTreeMap::new(),
            fail_next_affinity: false,
            fail_next_remove_backend: false,
            maglev: MaglevSettings::default(),
            maglev_tables: BTreeMap::new(),
            maglev_table_of: BTreeMap::new(),
            fail_next_maglev_write: false,
        }
    }
}

impl FakeMaps {
    pub fn with_capacity(capacity: u32) -> Self {
        Self {
            capacity,
            ..Self::default()
        }
    }

    fn set<A: Picks>(
        &mut self,
        frontend: &Frontend<A>,
        rev_nat_id: RevNatId,
        backends: &[BackendEntry<A>],
    ) -> Result<(), ProgramError> {
        validate_service(frontend, rev_nat_id, backends, self.capacity, self.capacity)?;
        let fail = std::mem::take(&mut self.fail_next_write);
        for b in backends {
            // One id space: an id is either family's (the reconciler
            // frees it before handing it to the other family).
            assert!(
                !A::Other::pick_mut(self).backends.contains_key(&b.id),
                "backend id {} is the other family's",
                b.id
            );
            A::pick_mut(self).backends.insert(
                b.id,
                BackendAddress {
                    address: b.address,
                    port: b.port,
                    protocol: frontend.protocol,
                },
            );
            let socket = std::net::SocketAddr::new(b.address.into(), b.port);
            self.log.push(format!("backend {} = {socket}", b.id));
        }
        if fail {
            return Err(ProgramError::Map {
                frontend: frontend.erased(),
                map: "SERVICES",
                error: Box::new(MapError::KeyNotFound),
            });
        }
        let family = A::pick_mut(self);
        family
            .rev_nats
            .insert(rev_nat_id, (frontend.address, frontend.port));
        let old = family.services.insert(
            *frontend,
            (rev_nat_id, backends.iter().map(|b| b.id).collect()),
        );
        if let Some((old_rev_nat, _)) = old
            && old_rev_nat != rev_nat_id
            && family.clear_rev_nat_of(old_rev_nat, frontend)
        {
            self.affinity.remove(&old_rev_nat);
        }
        self.log.push(format!("service {frontend}"));
        Ok(())
    }

    fn remove<A: Picks>(&mut self, frontend: &Frontend<A>) -> Result<(), ProgramError> {
        let family = A::pick_mut(self);
        if let Some((rev_nat_id, _)) = family.services.remove(frontend) {
            if family.clear_rev_nat_of(rev_nat_id, frontend) {
                self.affinity.remove(&rev_nat_id);
            }
            self.log.push(format!("remove service {frontend}"));
        }
        Ok(())
    }
}

impl<A: Family> FakeFamily<A> {
    /// As the real maps: only an entry that still names `frontend`.
    /// Clears `id` if it is `frontend`'s; whether it was.
    fn clear_rev_nat_of(&mut self, id: RevNatId, frontend: &Frontend<A>) -> bool {
        let ours = self
            .rev_nats
            .get(&id)
            .is_none_or(|&(address, port)| address == frontend.address && port == frontend.port);
        if ours {
            self.rev_nats.remove(&id);
        }
        ours
    }

    fn dumped(&self) -> Vec<DumpedFrontend<A>> {
        self.services
            .iter()
            .map(|(frontend, (rev_nat_id, ids))| DumpedFrontend {
                frontend: *frontend,
                rev_nat_id: *rev_nat_id,
                slots: ids.iter().map(|&id| Some(id)).collect(),
            })
            .collect()
    }
}

/// Picks one family's tables out of the fake.
pub trait Picks: Family {
    /// The other family (an id is either family's).
    type Other: Picks;
    fn pick_mut(maps: &mut FakeMaps) -> &mut FakeFamily<Self>;
}

impl Picks for Ipv4Addr {
    type Other = Ipv6Addr;
    fn pick_mut(maps: &mut FakeMaps) -> &mut FakeFamily<Self> {
        &mut maps.v4
    }
}

impl Picks for Ipv6Addr {
    type Other = Ipv4Addr;
    fn pick_mut(maps: &mut FakeMaps) -> &mut FakeFamily<Self> {
        &mut maps.v6
    }
}

impl LbMaps for FakeMaps {
    fn backend_capacity(&self) -> u32 {
        self.capacity
    }
    fn rev_nat_capacity(&self) -> u32 {
        self.capacity
    }
    fn dump(&self) -> Result<MapDump, MapError> {
        Ok(MapDump {
            frontends: self.v4.dumped(),
            stray_entries: Vec::new(),
            backends: self.v4.backends.iter().map(|(k, v)| (*k, *v)).collect(),
            rev_nats: (self.v4.rev_nats.iter())
                .map(|(k, (a, p))| (*k, std::net::SocketAddrV4::new(*a, *p)))
                .collect(),
            frontends6: self.v6.dumped(),
            stray_entries6: Vec::new(),
            backends6: self.v6.backends.iter().map(|(k, v)| (*k, *v)).collect(),
            rev_nats6: (self.v6.rev_nats.iter())
                .map(|(k, (a, p))| (*k, std::net::SocketAddrV6::new(*a, *p, 0, 0)))
                .collect(),
            affine: self.affinity.keys().copied().collect(),
            maglev_tables_of: self.maglev_table_of.iter().map(|(k, v)| (*k, *v)).collect(),
            maglev_sets: (self.maglev_tables.iter())
                .filter(|(t, _)| self.maglev_table_of.values().any(|u| u == *t))
                .map(|(t, ids)| {
                    let mut set = ids.clone();
                    set.sort_unstable();
                    set.dedup();
                    (*t, set)
                })
                .collect(),
        })
    }
    fn set_service(
        &mut self,
        frontend: &Frontend,
        rev_nat_id: RevNatId,
        backends: &[BackendEntry],
    ) -> Result<(), ProgramError> {
        self.set(frontend, rev_nat_id, backends)
    }
    fn remove_service(&mut self, frontend: &Frontend) -> Result<(), ProgramError> {
        self.remove(frontend)
    }
    fn serves_ipv6(&self) -> bool {
        self.ipv6
    }
    fn set_service6(
        &mut self,
        frontend: &Frontend<Ipv6Addr>,
        rev_nat_id: RevNatId,
        backends: &[BackendEntry<Ipv6Addr>],
    ) -> Result<(), ProgramError> {
        self.set(frontend, rev_nat_id, backends)
    }
    fn remove_service6(&mut self, frontend: &Frontend<Ipv6Addr>) -> Result<(), ProgramError> {
        self.remove(frontend)
    }
    fn maglev_tables(&self) -> MaglevSettings {
        self.maglev
    }
    fn write_maglev_table(
        &mut self,
        table: u32,
        backend_ids: &[BackendId],
    ) -> Result<(), MapError> {
        if std::mem::take(&mut self.fail_next_maglev_write)
            || table >= self.maglev.tables
            || backend_ids.len() != self.maglev.table_size as usize
        {
            return Err(MapError::OutOfBounds {
                index: table,
                max_entries: self.maglev.tables,
            });
        }
        self.log.push(format!("maglev table {table}"));
        self.maglev_tables.insert(table, backend_ids.to_vec());
        Ok(())
    }
    fn set_maglev_table_of(
        &mut self,
        rev_nat_id: RevNatId,
        table: Option<u32>,
    ) -> Result<(), MapError> {
        self.log.push(format!("maglev of {rev_nat_id}: {table:?}"));
        match table {
            Some(table) => self.maglev_table_of.insert(rev_nat_id, table),
            None => self.maglev_table_of.remove(&rev_nat_id),
        };
        Ok(())
    }
    fn set_affinity(
        &mut self,
        rev_nat_id: RevNatId,
        affinity: Option<(u32, &[BackendId])>,
    ) -> Result<(), MapError> {
        if std::mem::take(&mut self.fail_next_affinity) {
            return Err(MapError::KeyNotFound);
        }
        match affinity {
            Some((seconds, backends)) => {
                self.log
                    .push(format!("affinity {rev_nat_id} {seconds}s {backends:?}"));
                self.affinity
                    .insert(rev_nat_id, (seconds, backends.to_vec()));
            }
            None => {
                if self.affinity.remove(&rev_nat_id).is_some() {
                    self.log.push(format!("affinity {rev_nat_id} off"));
                }
            }
        }
        Ok(())
    }
    fn prune_affinity(&mut self, keep: &dyn Fn(RevNatId) -> bool) -> Result<usize, MapError> {
        let before = self.affinity.len();
        self.affinity.retain(|&id, _| keep(id));
        Ok(before - self.affinity.len())
    }
    fn remove_backend(&mut self, id: BackendId) -> Result<(), MapError> {
        if std::mem::take(&mut self.fail_next_remove_backend) {
            return Err(MapError::KeyNotFound);
        }
        for (_, matched) in self.affinity.values_mut() {
            matched.retain(|&matched| matched != id);
        }
        self.v4.backends.remove(&id);
        self.v6.backends.remove(&id);
        self.log.push(format!("remove backend {id}"));
        Ok(())
    }
    fn remove_rev_nat(&mut self, id: RevNatId) -> Result<(), MapError> {
        self.v4.rev_nats.remove(&id);
        Ok(())
    }
    fn remove_rev_nat6(&mut self, id: RevNatId) -> Result<(), MapError> {
        self.v6.rev_nats.remove(&id);
        Ok(())
    }
    fn restore_rev_nat(&mut self, id: RevNatId, frontend: &Frontend) -> Result<(), MapError> {
        self.v4
            .rev_nats
            .insert(id, (frontend.address, frontend.port));
        Ok(())
    }
    fn restore_rev_nat6(
        &mut self,
        id: RevNatId,
        frontend: &Frontend<Ipv6Addr>,
    ) -> Result<(), MapError> {
        self.v6
            .rev_nats
            .insert(id, (frontend.address, frontend.port));
        Ok(())
    }
    fn remove_service_key(&mut self, _key: &ServiceKey) -> Result<(), MapError> {
        Ok(())
    }
    fn remove_service_key6(&mut self, _key: &ServiceKey6) -> Result<(), MapError> {
        Ok(())
    }
    fn rebuild_filter(
        &mut self,
        _frontends: &[Frontend],
        _frontends6: &[Frontend<Ipv6Addr>],
    ) -> Result<usize, MapError> {
        Ok(0)
    }

    fn wait_for_readers(&mut self) -> bool {
        self.log.push("wait for readers".into());
        true
    }
}
