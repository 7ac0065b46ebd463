//! What the reconciler needs from the maps, implemented once by the real
//! pinned maps (the fake is beside it, in `fake_maps`).

use aya::maps::MapError;
use datapath_common::maps::{BackendId, RevNatId, ServiceKey};

use crate::maps::{BackendEntry, DatapathMaps, Frontend, MapDump, ProgramError};

/// What the reconciler needs from the maps; implemented by the real pinned
/// maps and by [`FakeMaps`].
pub trait LbMaps {
    /// Sizes of the id spaces: ids are `1..capacity`.
    fn backend_capacity(&self) -> u32;
    fn rev_nat_capacity(&self) -> u32;
    fn dump(&self) -> Result<MapDump, MapError>;
    fn set_service(
        &mut self,
        frontend: &Frontend,
        rev_nat_id: RevNatId,
        backends: &[BackendEntry],
    ) -> Result<(), ProgramError>;
    fn remove_service(&mut self, frontend: &Frontend) -> Result<(), ProgramError>;
    fn remove_backend(&mut self, id: BackendId) -> Result<(), MapError>;
    fn remove_rev_nat(&mut self, id: RevNatId) -> Result<(), MapError>;
    fn remove_service_key(&mut self, key: &ServiceKey) -> Result<(), MapError>;
    fn rebuild_filter(&mut self, frontends: &[Frontend]) -> Result<usize, MapError>;
}

impl LbMaps for DatapathMaps {
    fn backend_capacity(&self) -> u32 {
        self.backends.len()
    }
    fn rev_nat_capacity(&self) -> u32 {
        self.reverse_nat.len().min(u32::from(RevNatId::MAX) + 1)
    }
    fn dump(&self) -> Result<MapDump, MapError> {
        DatapathMaps::dump(self)
    }
    fn set_service(
        &mut self,
        frontend: &Frontend,
        rev_nat_id: RevNatId,
        backends: &[BackendEntry],
    ) -> Result<(), ProgramError> {
        DatapathMaps::set_service(self, frontend, rev_nat_id, backends)
    }
    fn remove_service(&mut self, frontend: &Frontend) -> Result<(), ProgramError> {
        DatapathMaps::remove_service(self, frontend)
    }
    fn remove_backend(&mut self, id: BackendId) -> Result<(), MapError> {
        DatapathMaps::remove_backend(self, id)
    }
    fn remove_rev_nat(&mut self, id: RevNatId) -> Result<(), MapError> {
        DatapathMaps::remove_rev_nat(self, id)
    }
    fn remove_service_key(&mut self, key: &ServiceKey) -> Result<(), MapError> {
        DatapathMaps::remove_service_key(self, key)
    }
    fn rebuild_filter(&mut self, frontends: &[Frontend]) -> Result<usize, MapError> {
        DatapathMaps::rebuild_filter(self, frontends)
    }
}

impl<T: LbMaps + ?Sized> LbMaps for &mut T {
    fn backend_capacity(&self) -> u32 {
        (**self).backend_capacity()
    }
    fn rev_nat_capacity(&self) -> u32 {
        (**self).rev_nat_capacity()
    }
    fn dump(&self) -> Result<MapDump, MapError> {
        (**self).dump()
    }
    fn set_service(
        &mut self,
        frontend: &Frontend,
        rev_nat_id: RevNatId,
        backends: &[BackendEntry],
    ) -> Result<(), ProgramError> {
        (**self).set_service(frontend, rev_nat_id, backends)
    }
    fn remove_service(&mut self, frontend: &Frontend) -> Result<(), ProgramError> {
        (**self).remove_service(frontend)
    }
    fn remove_backend(&mut self, id: BackendId) -> Result<(), MapError> {
        (**self).remove_backend(id)
    }
    fn remove_rev_nat(&mut self, id: RevNatId) -> Result<(), MapError> {
        (**self).remove_rev_nat(id)
    }
    fn remove_service_key(&mut self, key: &ServiceKey) -> Result<(), MapError> {
        (**self).remove_service_key(key)
    }
    fn rebuild_filter(&mut self, frontends: &[Frontend]) -> Result<usize, MapError> {
        (**self).rebuild_filter(frontends)
    }
}
