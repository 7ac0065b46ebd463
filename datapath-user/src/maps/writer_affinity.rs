//! The real writer's `sessionAffinity` calls (`LbMaps::set_affinity`,
//! `prune_affinity`) and the invariants it keeps on its own: a deleted
//! backend's match entries and a cleared frontend's affinity go with them
//! (`super::affinity` holds the maps).

use aya::maps::MapError;
use datapath_common::maps::{BackendId, RevNatId};

use super::handles::DatapathMaps;

impl DatapathMaps {
    /// `LbMaps::set_affinity`: the timeout in jiffies at the kernel's HZ.
    pub(super) fn write_affinity(
        &mut self,
        rev_nat_id: RevNatId,
        affinity: Option<(u32, &[BackendId])>,
    ) -> Result<(), MapError> {
        let Some(maps) = self.affinity.as_mut() else {
            // Pins without the affinity maps are an older agent's, which
            // the CLI reads but never writes.
            return match affinity {
                Some(_) => Err(MapError::InvalidName {
                    name: datapath_common::maps::AFFINITY_MATCH_MAP.into(),
                }),
                None => Ok(()),
            };
        };
        let affinity = match affinity {
            Some((seconds, ids)) => {
                let hz = crate::clock::hz().map_err(|io_error| {
                    MapError::SyscallError(aya::sys::SyscallError {
                        call: "reading the kernel's HZ",
                        io_error,
                    })
                })?;
                Some((u64::from(seconds) * hz, ids))
            }
            None => None,
        };
        maps.set(rev_nat_id, affinity)
    }

    /// `LbMaps::prune_affinity`.
    pub(super) fn prune_affinity_of(
        &mut self,
        keep: &dyn Fn(RevNatId) -> bool,
    ) -> Result<usize, MapError> {
        match self.affinity.as_mut() {
            Some(maps) => maps.prune(keep),
            None => Ok(0),
        }
    }

    /// Takes the affinity of reverse-NAT id `id` away (its frontend is
    /// gone, or the id is freed).
    pub(super) fn clear_affinity_of(&mut self, id: RevNatId) -> Result<(), MapError> {
        match self.affinity.as_mut() {
            Some(maps) => maps.set(id, None),
            None => Ok(()),
        }
    }

    /// Removes the match entries naming backend `id` (`remove_backend`).
    pub(super) fn forget_affine_backend(&mut self, id: BackendId) -> Result<(), MapError> {
        match self.affinity.as_mut() {
            Some(maps) => maps.forget_backend(id),
            None => Ok(()),
        }
    }

    /// The reverse-NAT ids with affinity (`LbMaps::dump`).
    pub(super) fn affine_rev_nats(&self) -> Result<Vec<RevNatId>, MapError> {
        match self.affinity.as_ref() {
            Some(maps) => maps.affine(),
            None => Ok(Vec::new()),
        }
    }

    /// Lets go of the timeouts' mapping (`LbMaps::unmap`).
    pub(super) fn unmap_affinity(&mut self) {
        if let Some(maps) = self.affinity.as_mut() {
            maps.unmap_timeouts();
        }
    }
}
