//! `sessionAffinity: ClientIP` in the real maps: each frontend's timeout
//! (`AFFINITY_TIMEOUT`, mapped into memory) and the backends clients may
//! be kept on (`AFFINITY_MATCH`). The programs keep the clients
//! themselves (`AFFINITY`); the agent never writes those.

use std::collections::{BTreeMap, BTreeSet};

use aya::maps::{HashMap, MapData, MapError};
use datapath_common::maps::{AffinityKey, AffinityMatchKey, AffinityValue, BackendId, RevNatId};

use super::mapped_array::MappedArray;

/// Handles on the maps the agent writes for `sessionAffinity`.
pub struct AffinityMaps {
    /// Reverse-NAT id → timeout in jiffies (0: no affinity).
    timeouts: MappedArray<u64>,
    /// (backend id, reverse-NAT id) pairs of frontends with affinity.
    matches: HashMap<MapData, AffinityMatchKey, u8>,
    /// What `matches` holds, by frontend: read from the map at the first
    /// write (a previous agent's entries), kept up to date after.
    written: Option<BTreeMap<RevNatId, BTreeSet<BackendId>>>,
    /// The same by backend (a deleted backend's entries, found without a
    /// scan of every frontend with affinity).
    by_backend: BTreeMap<BackendId, BTreeSet<RevNatId>>,
    /// The clients the programs remember (read only: for inspection).
    pub clients: HashMap<MapData, AffinityKey, AffinityValue>,
}

impl AffinityMaps {
    pub(super) fn new(
        timeouts: MappedArray<u64>,
        matches: HashMap<MapData, AffinityMatchKey, u8>,
        clients: HashMap<MapData, AffinityKey, AffinityValue>,
    ) -> Self {
        Self {
            timeouts,
            matches,
            written: None,
            by_backend: BTreeMap::new(),
            clients,
        }
    }

    /// Lets go of the timeouts' mapping.
    pub(super) fn unmap_timeouts(&mut self) {
        self.timeouts.unmap();
    }

    /// Frontend `rev_nat_id`'s timeout in jiffies (0: no affinity).
    pub fn timeout(&self, rev_nat_id: RevNatId) -> Result<u64, MapError> {
        Ok(self.timeouts.get(rev_nat_id)?.unwrap_or(0))
    }

    /// Every `AFFINITY_MATCH` entry, by frontend, as the map holds them.
    pub fn matched(&self) -> Result<BTreeMap<RevNatId, BTreeSet<BackendId>>, MapError> {
        let mut by_frontend: BTreeMap<RevNatId, BTreeSet<BackendId>> = BTreeMap::new();
        for key in self.matches.keys() {
            let key = key?;
            by_frontend
                .entry(key.rev_nat_id)
                .or_default()
                .insert(key.backend_id);
        }
        Ok(by_frontend)
    }

    /// `written`, read from the map the first time.
    fn written(&mut self) -> Result<&mut BTreeMap<RevNatId, BTreeSet<BackendId>>, MapError> {
        if self.written.is_none() {
            let written = self.matched()?;
            self.by_backend.clear();
            for (&rev_nat_id, ids) in &written {
                for &backend_id in ids {
                    self.by_backend
                        .entry(backend_id)
                        .or_default()
                        .insert(rev_nat_id);
                }
            }
            self.written = Some(written);
        }
        Ok(self.written.get_or_insert_default())
    }

    /// Writes `rev_nat_id`'s affinity (`LbMaps::set_affinity`): match
    /// entries of new backends first, then the timeout, then the entries
    /// of backends that left; taking it away, the timeout first.
    pub(super) fn set(
        &mut self,
        rev_nat_id: RevNatId,
        affinity: Option<(u64, &[BackendId])>,
    ) -> Result<(), MapError> {
        let wanted: BTreeSet<BackendId> = affinity
            .map(|(_, ids)| ids.iter().copied().collect())
            .unwrap_or_default();
        let had = self
            .written()?
            .get(&rev_nat_id)
            .cloned()
            .unwrap_or_default();
        for &backend_id in wanted.difference(&had) {
            let key = AffinityMatchKey {
                backend_id,
                rev_nat_id,
            };
            self.matches.insert(key, 1, 0)?;
            self.note(rev_nat_id, backend_id, true);
        }
        let timeout = affinity.map_or(0, |(jiffies, _)| jiffies.max(1));
        // An id past the array (made smaller with --frontends-max) has no
        // timeout to clear; its match entries still go.
        let beyond = rev_nat_id >= self.timeouts.len();
        if !(beyond && timeout == 0)
            && self.timeouts.get(rev_nat_id)? != Some(timeout)
            && !self.timeouts.set(rev_nat_id, timeout)?
        {
            return Err(MapError::OutOfBounds {
                index: rev_nat_id,
                max_entries: self.timeouts.len(),
            });
        }
        for &backend_id in had.difference(&wanted) {
            let key = AffinityMatchKey {
                backend_id,
                rev_nat_id,
            };
            match self.matches.remove(&key) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(error) => return Err(error),
            }
            self.note(rev_nat_id, backend_id, false);
        }
        Ok(())
    }

    /// Removes every match entry naming `backend_id` (the backend is
    /// about to be deleted).
    pub(super) fn forget_backend(&mut self, backend_id: BackendId) -> Result<(), MapError> {
        self.written()?;
        let holders: Vec<RevNatId> = self
            .by_backend
            .get(&backend_id)
            .map(|ids| ids.iter().copied().collect())
            .unwrap_or_default();
        for rev_nat_id in holders {
            match self.matches.remove(&AffinityMatchKey {
                backend_id,
                rev_nat_id,
            }) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(error) => return Err(error),
            }
            self.note(rev_nat_id, backend_id, false);
        }
        Ok(())
    }

    /// The reverse-NAT ids with a timeout (for the dump; `unmap` lets
    /// go of the mapping after).
    pub(super) fn affine(&self) -> Result<Vec<RevNatId>, MapError> {
        Ok(self
            .timeouts
            .read_all()?
            .into_iter()
            .enumerate()
            .filter(|&(_, timeout)| timeout != 0)
            .map(|(id, _)| id as RevNatId)
            .collect())
    }

    /// Records one match entry written or removed.
    fn note(&mut self, rev_nat_id: RevNatId, backend_id: BackendId, present: bool) {
        let Some(written) = self.written.as_mut() else {
            return;
        };
        if present {
            written.entry(rev_nat_id).or_default().insert(backend_id);
            self.by_backend
                .entry(backend_id)
                .or_default()
                .insert(rev_nat_id);
        } else {
            if let Some(ids) = written.get_mut(&rev_nat_id) {
                ids.remove(&backend_id);
                if ids.is_empty() {
                    written.remove(&rev_nat_id);
                }
            }
            if let Some(ids) = self.by_backend.get_mut(&backend_id) {
                ids.remove(&rev_nat_id);
                if ids.is_empty() {
                    self.by_backend.remove(&backend_id);
                }
            }
        }
    }

    /// Takes affinity from every frontend `keep` says no.
    pub(super) fn prune(&mut self, keep: &dyn Fn(RevNatId) -> bool) -> Result<usize, MapError> {
        let mut stale: BTreeSet<RevNatId> = self
            .written()?
            .keys()
            .copied()
            .filter(|&id| !keep(id))
            .collect();
        for (id, timeout) in self.timeouts.read_all()?.into_iter().enumerate() {
            let id = id as RevNatId;
            if timeout != 0 && !keep(id) {
                stale.insert(id);
            }
        }
        self.timeouts.unmap();
        for &id in &stale {
            self.set(id, None)?;
        }
        Ok(stale.len())
    }
}
