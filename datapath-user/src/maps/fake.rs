//! In-memory maps for the reconciler's tests and the bench, with the
//! real maps' rules (`validate_service`).

use std::collections::BTreeMap;

use aya::maps::MapError;
use datapath_common::maps::{BackendId, RevNatId, ServiceKey};

use super::lb_maps::{DumpedFrontend, LbMaps, MapDump, ProgramError, validate_service};
use crate::model::{BackendAddress, BackendEntry, Frontend};

/// The maps as plain collections, with the real maps' validation; the
/// reconciler's tests run against it and against the real maps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FakeMaps {
    pub capacity: u32,
    pub services: BTreeMap<Frontend, (RevNatId, Vec<BackendId>)>,
    pub backends: BTreeMap<BackendId, BackendAddress>,
    pub rev_nats: BTreeMap<RevNatId, std::net::SocketAddrV4>,
    /// Every write, in order, to check make-before-break.
    pub log: Vec<String>,
    /// Makes the next `set_service` fail after writing the backends (a
    /// map that filled up midway).
    pub fail_next_write: bool,
}

impl FakeMaps {
    pub fn with_capacity(capacity: u32) -> Self {
        Self {
            capacity,
            ..Self::default()
        }
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
            frontends: self
                .services
                .iter()
                .map(|(frontend, (rev_nat_id, ids))| DumpedFrontend {
                    frontend: *frontend,
                    rev_nat_id: *rev_nat_id,
                    slots: ids.iter().map(|&id| Some(id)).collect(),
                })
                .collect(),
            stray_entries: Vec::new(),
            backends: self.backends.iter().map(|(k, v)| (*k, *v)).collect(),
            rev_nats: self.rev_nats.iter().map(|(k, v)| (*k, *v)).collect(),
            ..MapDump::default()
        })
    }
    fn set_service(
        &mut self,
        frontend: &Frontend,
        rev_nat_id: RevNatId,
        backends: &[BackendEntry],
    ) -> Result<(), ProgramError> {
        validate_service(frontend, rev_nat_id, backends, self.capacity, self.capacity)?;
        let fail = std::mem::take(&mut self.fail_next_write);
        for b in backends {
            self.backends.insert(
                b.id,
                BackendAddress {
                    address: b.address,
                    port: b.port,
                    protocol: frontend.protocol,
                },
            );
            self.log
                .push(format!("backend {} = {}:{}", b.id, b.address, b.port));
        }
        if fail {
            return Err(ProgramError::Map {
                frontend: *frontend,
                map: "SERVICES",
                error: Box::new(MapError::KeyNotFound),
            });
        }
        self.rev_nats.insert(
            rev_nat_id,
            std::net::SocketAddrV4::new(frontend.address, frontend.port),
        );
        let old = self.services.insert(
            *frontend,
            (rev_nat_id, backends.iter().map(|b| b.id).collect()),
        );
        if let Some((old_rev_nat, _)) = old
            && old_rev_nat != rev_nat_id
        {
            self.clear_rev_nat_of(old_rev_nat, frontend);
        }
        self.log.push(format!("service {frontend}"));
        Ok(())
    }
    fn remove_service(&mut self, frontend: &Frontend) -> Result<(), ProgramError> {
        if let Some((rev_nat_id, _)) = self.services.remove(frontend) {
            self.clear_rev_nat_of(rev_nat_id, frontend);
            self.log.push(format!("remove service {frontend}"));
        }
        Ok(())
    }
    fn remove_backend(&mut self, id: BackendId) -> Result<(), MapError> {
        self.backends.remove(&id);
        self.log.push(format!("remove backend {id}"));
        Ok(())
    }
    fn remove_rev_nat(&mut self, id: RevNatId) -> Result<(), MapError> {
        self.rev_nats.remove(&id);
        Ok(())
    }
    fn restore_rev_nat(&mut self, id: RevNatId, frontend: &Frontend) -> Result<(), MapError> {
        self.rev_nats.insert(
            id,
            std::net::SocketAddrV4::new(frontend.address, frontend.port),
        );
        Ok(())
    }
    fn remove_service_key(&mut self, _key: &ServiceKey) -> Result<(), MapError> {
        Ok(())
    }
    fn rebuild_filter(&mut self, _frontends: &[Frontend]) -> Result<usize, MapError> {
        Ok(0)
    }
}

impl FakeMaps {
    /// As the real maps: only an entry that still names `frontend`.
    fn clear_rev_nat_of(&mut self, id: RevNatId, frontend: &Frontend) {
        if self
            .rev_nats
            .get(&id)
            .is_none_or(|a| a.ip() == &frontend.address && a.port() == frontend.port)
        {
            self.rev_nats.remove(&id);
        }
    }
}
