//! Writing one frontend (its backends referenced, slots written
//! make-before-break, departed backends noted) and removing one, with the
//! issues either can raise.

use datapath_common::maps::BackendId;

use super::{
    Departed, FamilyView, HoldsIds, Programmed, Reconciler, TableFamily,
    issues::{limit_issue, program_issue, with_object},
    node_subset,
};
use crate::{
    k8s::{Endpoint, Issue, ObjectKey},
    maps::{LbMaps, ProgramError},
    model::{BackendAddress, BackendEntry, Frontend},
};

/// `write_north_south` failed: why, and whether the frontend may still
/// point at a table naming its old backends (whose ids must then be held).
pub(super) struct NorthSouthFailure {
    issue: Issue,
    hold: bool,
}

fn map_issue<A: crate::model::Family>(
    frontend: &Frontend<A>,
    map: &'static str,
    error: aya::maps::MapError,
) -> Issue {
    program_issue(ProgramError::Map {
        frontend: frontend.erased(),
        map,
        error: Box::new(error),
    })
}

impl<M: LbMaps, A: TableFamily> FamilyView<'_, M, A> {
    /// Writes `frontend` if its backends (or its `sessionAffinity`
    /// timeout, `affinity`, or the backends its flows from outside go to,
    /// `external`) differ from what is programmed, and holds the draining
    /// ones. Returns whether it wrote.
    pub(super) fn program(
        &mut self,
        frontend: &Frontend<A>,
        endpoints: &[Endpoint<A>],
        draining: &[Endpoint<A>],
        affinity: Option<u32>,
        external: Option<&[Endpoint<A>]>,
    ) -> Result<bool, Issue> {
        // Over the per-service limit: this node serves its own subset (so
        // the nodes together use every endpoint) and says so; the rest
        // drain like endpoints that left the ready set.
        let limit = usize::from(datapath_common::maps::MAX_BACKENDS_PER_SERVICE);
        let total = endpoints.len();
        let capped = total > limit;
        let (endpoints, left_out) = node_subset(endpoints, limit, self.node_seed);
        let as_address = |e: &Endpoint<A>| BackendAddress {
            address: e.address,
            port: e.port,
            protocol: frontend.protocol,
        };
        let addresses: Vec<BackendAddress<A>> = endpoints.iter().map(as_address).collect();
        // Only a backend that has an id can have flows to drain.
        let mut draining: Vec<BackendAddress<A>> = draining
            .iter()
            .chain(&left_out)
            .map(as_address)
            .filter(|a| self.t.backends.contains(a) || self.t.adopted_by_address.contains_key(a))
            .collect();
        draining.sort();
        let capped_issue = || {
            program_issue(ProgramError::TooManyBackends {
                frontend: frontend.erased(),
                count: total,
                max: datapath_common::maps::MAX_BACKENDS_PER_SERVICE,
            })
        };
        let existing = self.t.programmed.get(frontend);
        let slots_unchanged = existing.is_some_and(|p| {
            !p.broken
                && p.backends.len() == addresses.len()
                && p.backends
                    .iter()
                    .zip(&addresses)
                    .all(|(&id, address)| self.t.backends.address_of(id) == Some(*address))
        });
        let affinity_unchanged = self.t.affinity.get(frontend).copied() == affinity;
        // Served from outside: the backends among this node's slots its
        // flows from outside go to (a Maglev table's).
        let external: Option<Vec<BackendAddress<A>>> = external
            .filter(|_| A::FROM_OUTSIDE && self.maglev.enabled())
            .map(|external| {
                external
                    .iter()
                    .map(as_address)
                    .filter(|a| addresses.contains(a))
                    .collect()
            });
        let north_south_unchanged = self.north_south_unchanged(frontend, external.as_deref());
        if slots_unchanged
            && affinity_unchanged
            && north_south_unchanged
            && existing.is_some_and(|p| p.draining() == draining)
        {
            return if capped {
                Err(capped_issue())
            } else {
                Ok(false)
            };
        }
        let socket = (frontend.address, frontend.port);
        let (rev_nat_id, fresh_rev_nat, readopted) = match existing {
            // 0: adoption found its id unusable and none free.
            Some(p) if p.rev_nat_id != 0 => (p.rev_nat_id, false, false),
            _ => match self.t.adopted_rev_nat_by_address.remove(&socket) {
                Some(id) => (id, false, true),
                None => {
                    let id = self.rev_nat_ids.allocate().ok_or_else(|| {
                        limit_issue(frontend, "REVERSE_NAT", self.rev_nat_ids.capacity)
                    })?;
                    (id, true, false)
                }
            },
        };
        // Take references on the new set first; released below on failure.
        let mut entries = Vec::with_capacity(addresses.len());
        for (taken, address) in addresses.iter().enumerate() {
            let Some(id) = self.reference(address) else {
                let issue = limit_issue(frontend, "BACKENDS", self.backend_ids.capacity);
                self.release_backends(&addresses[..taken]);
                if fresh_rev_nat {
                    self.rev_nat_ids.release(rev_nat_id);
                }
                if readopted {
                    self.t.adopted_rev_nat_by_address.insert(socket, rev_nat_id);
                }
                return Err(issue);
            };
            entries.push(BackendEntry {
                id,
                address: address.address,
                port: address.port,
            });
        }
        for address in &draining {
            // Known to have an id (filtered above): never allocates.
            let _ = self.reference(address);
        }
        let written = !slots_unchanged;
        if written && let Err(e) = A::set_service(self.maps, frontend, rev_nat_id, &entries) {
            if !matches!(e, ProgramError::Map { .. }) {
                // Refused before anything was written.
                self.release_backends(&addresses);
                self.release_backends(&draining);
                if fresh_rev_nat {
                    self.rev_nat_ids.release(rev_nat_id);
                }
                if readopted {
                    self.t.adopted_rev_nat_by_address.insert(socket, rev_nat_id);
                }
                return Err(program_issue(e));
            }
            // A write failed midway: slots (and perhaps the frontend) may
            // name the old or the new backends. Hold both sets and the
            // reverse-NAT id until a rewrite succeeds; deleting either now
            // could leave a slot naming a freed id.
            let mut held: Vec<BackendId> = entries.iter().map(|e| e.id).collect();
            let mut held_draining = draining;
            let mut untracked_ids = Vec::new();
            if let Some(old) = self.t.programmed.remove(frontend) {
                held.extend(old.backends.iter().copied());
                held_draining.extend(old.draining().iter().copied());
                untracked_ids = old.untracked_ids().to_vec();
            }
            self.t.programmed.insert(
                *frontend,
                Programmed::new(rev_nat_id, true, held, held_draining, untracked_ids),
            );
            return Err(program_issue(e));
        }
        let ids: Vec<BackendId> = entries.iter().map(|e| e.id).collect();
        // After the slots, before any backend that left is deleted.
        let affinity_written = self.write_affinity(frontend, rev_nat_id, &ids, affinity);
        let external_ids = external.map(|external| {
            let mut ids: Vec<BackendId> = entries
                .iter()
                .filter(|e| {
                    external.contains(&BackendAddress {
                        address: e.address,
                        port: e.port,
                        protocol: frontend.protocol,
                    })
                })
                .map(|e| e.id)
                .collect();
            ids.sort_unstable();
            ids
        });
        let north_south_written = self.write_north_south(frontend, rev_nat_id, external_ids);
        if let Err(NorthSouthFailure { issue, hold: true }) = &north_south_written {
            // Its table may still name the old backends: hold both sets,
            // as after a slot write that failed midway; the next update
            // rewrites it.
            let mut held = ids;
            let mut held_draining = draining;
            let mut untracked_ids = Vec::new();
            if let Some(old) = self.t.programmed.remove(frontend) {
                held.extend(old.backends.iter().copied());
                held_draining.extend(old.draining().iter().copied());
                untracked_ids = old.untracked_ids().to_vec();
            }
            self.t.programmed.insert(
                *frontend,
                Programmed::new(rev_nat_id, true, held, held_draining, untracked_ids),
            );
            return Err(issue.clone());
        }
        let old = self.t.programmed.insert(
            *frontend,
            Programmed::new(rev_nat_id, false, ids, draining, Vec::new()),
        );
        // Break after make: the old set's entries go only now.
        if let Some(old) = old {
            let now = &self.t.programmed[frontend];
            // Every backend the old set held is still in the table (its
            // references are released below), as is every one `now` holds.
            let stays = |address: &BackendAddress<A>| {
                now.draining().contains(address)
                    || self
                        .t
                        .backends
                        .id_of(address)
                        .is_some_and(|id| now.backends.contains(&id))
            };
            let departed: Vec<Departed<A>> = old
                .backends
                .iter()
                .filter_map(|&id| self.t.backends.address_of(id))
                .chain(old.draining().iter().copied())
                .filter(|b| !stays(b))
                .map(|backend| Departed {
                    frontend: *frontend,
                    rev_nat_id,
                    backend,
                })
                .collect();
            self.note_departed(frontend, departed);
            self.release_backend_ids(&old.backends);
            self.release_backends(old.draining());
            self.release_untracked(old.untracked_ids());
        }
        affinity_written?;
        north_south_written.map_err(|failure| failure.issue)?;
        if capped {
            return Err(capped_issue());
        }
        Ok(written || !affinity_unchanged || !north_south_unchanged)
    }

    /// Whether `frontend`'s Maglev table is the one `external` (its flows
    /// from outside, `None`: not served from outside) asks for.
    fn north_south_unchanged(
        &self,
        frontend: &Frontend<A>,
        external: Option<&[BackendAddress<A>]>,
    ) -> bool {
        let programmed = self.t.north_south.get(frontend);
        match external.filter(|e| !e.is_empty()) {
            None => programmed.is_none(),
            Some(wanted) => programmed.map(|p| &*p.set).is_some_and(|set| {
                set.len() == wanted.len()
                    && wanted.iter().all(|a| {
                        self.t
                            .backends
                            .id_of(a)
                            .is_some_and(|id| set.binary_search(&id).is_ok())
                    })
            }),
        }
    }

    /// Points `frontend` (`rev_nat_id`) at the Maglev table of `wanted`
    /// (sorted backend ids; `None` or empty: not served from outside),
    /// building the table when no frontend shares it; only what differs.
    /// The table is written before the frontend points at it, and the
    /// one it leaves is freed after. With every table in use, a table the
    /// frontend alone uses is rewritten in place (its old entries name
    /// backends still referenced until the caller releases them).
    ///
    /// On failure the frontend is left to the stack rather than on a
    /// table naming backends the caller is about to release: the error
    /// says `hold` when even that failed, and the caller must then keep
    /// its old backends' ids.
    fn write_north_south(
        &mut self,
        frontend: &Frontend<A>,
        rev_nat_id: datapath_common::maps::RevNatId,
        wanted: Option<Vec<BackendId>>,
    ) -> Result<(), NorthSouthFailure> {
        let wanted = wanted.filter(|ids| !ids.is_empty());
        let current = self.t.north_south.get(frontend).cloned();
        let Some(ids) = wanted else {
            if current.is_some() {
                self.unpoint(frontend, rev_nat_id)?;
            }
            return Ok(());
        };
        if current.as_ref().map(|c| &*c.set) == Some(ids.as_slice()) {
            return Ok(());
        }
        let acquired = self.maglev.acquire(&ids).or_else(|| {
            let current = current.as_ref()?;
            self.maglev
                .replace_sole(&current.set, &ids)
                .map(|table| (table, true))
        });
        let Some((table, fresh)) = acquired else {
            let issue = limit_issue(
                frontend,
                datapath_common::maps::MAGLEV_MAP,
                self.maglev.capacity(),
            );
            return Err(self.left_to_the_stack(frontend, rev_nat_id, issue));
        };
        let in_place = current.as_ref().is_some_and(|c| c.table == table);
        if fresh {
            let content = self.maglev_table(&ids);
            if let Err(e) = self.maps.write_maglev_table(table, &content) {
                if in_place {
                    // Half rewritten: its entries name old and new
                    // backends. Recorded under a set no frontend can ask
                    // for, so that nothing shares it and the next write
                    // rewrites it (or it is freed once unpointed).
                    let poisoned: Box<[BackendId]> = [BackendId::MAX, table].into();
                    let _ = self.maglev.replace_sole(&ids, &poisoned);
                    self.t.north_south.insert(
                        *frontend,
                        super::NorthSouth {
                            table,
                            set: poisoned,
                        },
                    );
                    let issue = map_issue(frontend, datapath_common::maps::MAGLEV_MAP, e);
                    return Err(self.left_to_the_stack(frontend, rev_nat_id, issue));
                }
                self.maglev.release(&ids);
                let issue = map_issue(frontend, datapath_common::maps::MAGLEV_MAP, e);
                return Err(self.left_to_the_stack(frontend, rev_nat_id, issue));
            }
        }
        if !in_place {
            if let Err(e) = self.maps.set_maglev_table_of(rev_nat_id, Some(table)) {
                self.maglev.release(&ids);
                let issue = map_issue(frontend, datapath_common::maps::MAGLEV_TABLE_OF_MAP, e);
                return Err(self.left_to_the_stack(frontend, rev_nat_id, issue));
            }
            if let Some(current) = current {
                self.release_table(&current);
            }
        }
        self.t.north_south.insert(
            *frontend,
            super::NorthSouth {
                table,
                set: ids.into(),
            },
        );
        Ok(())
    }

    /// Takes `frontend`'s table away (its flows from outside go to the
    /// stack). A failure keeps it pointed: the caller must hold.
    fn unpoint(
        &mut self,
        frontend: &Frontend<A>,
        rev_nat_id: datapath_common::maps::RevNatId,
    ) -> Result<(), NorthSouthFailure> {
        let Some(current) = self.t.north_south.get(frontend).cloned() else {
            return Ok(());
        };
        self.maps
            .set_maglev_table_of(rev_nat_id, None)
            .map_err(|e| NorthSouthFailure {
                issue: map_issue(frontend, datapath_common::maps::MAGLEV_TABLE_OF_MAP, e),
                hold: true,
            })?;
        self.release_table(&current);
        self.t.north_south.remove(frontend);
        Ok(())
    }

    /// `issue`, with `frontend` no longer pointed at a table its old
    /// backends' ids are named in (or `hold` when that failed too).
    fn left_to_the_stack(
        &mut self,
        frontend: &Frontend<A>,
        rev_nat_id: datapath_common::maps::RevNatId,
        issue: Issue,
    ) -> NorthSouthFailure {
        match self.unpoint(frontend, rev_nat_id) {
            Ok(()) => NorthSouthFailure { issue, hold: false },
            Err(failure) => NorthSouthFailure {
                issue,
                hold: failure.hold,
            },
        }
    }

    /// The Maglev table of backends `ids`: every node builds it from the
    /// backends' addresses (never from ids, which are this node's own).
    fn maglev_table(&self, ids: &[BackendId]) -> Vec<BackendId> {
        let settings = self.maps.maglev_tables();
        let keys: Vec<Vec<u8>> = ids
            .iter()
            .map(|&id| match self.t.backends.address_of(id) {
                Some(b) => match b.address.into() {
                    std::net::IpAddr::V4(a) => datapath_common::maglev::backend_key4(
                        a.octets(),
                        b.port,
                        b.protocol.number(),
                    )
                    .to_vec(),
                    std::net::IpAddr::V6(a) => datapath_common::maglev::backend_key6(
                        a.octets(),
                        b.port,
                        b.protocol.number(),
                    )
                    .to_vec(),
                },
                None => id.to_le_bytes().to_vec(),
            })
            .collect();
        datapath_common::maglev::build_table(settings.table_size, settings.seed, &keys)
            .into_iter()
            .map(|i| ids[i as usize])
            .collect()
    }

    /// A frontend stops using its table.
    fn release_table(&mut self, north_south: &super::NorthSouth) {
        self.maglev.release(&north_south.set);
    }

    /// Gives `frontend` (`rev_nat_id`, whose slots name `ids`) the
    /// `sessionAffinity` timeout `affinity`, or takes it away; only what
    /// differs from what the maps hold. A write that fails leaves the
    /// frontend's affinity unknown (`AFFINITY_UNKNOWN`), so that the next
    /// update writes it again, whatever it asks. (Whatever failed, the
    /// maps keep no client on a backend once it is deleted, nor any
    /// affinity on a freed id: `LbMaps::remove_backend`, `remove_rev_nat`.)
    fn write_affinity(
        &mut self,
        frontend: &Frontend<A>,
        rev_nat_id: datapath_common::maps::RevNatId,
        ids: &[BackendId],
        affinity: Option<u32>,
    ) -> Result<(), Issue> {
        if affinity.is_none() && !self.t.affinity.contains_key(frontend) {
            return Ok(());
        }
        let written = self
            .maps
            .set_affinity(rev_nat_id, affinity.map(|seconds| (seconds, ids)));
        match (written, affinity) {
            (Ok(()), Some(seconds)) => {
                self.t.affinity.insert(*frontend, seconds);
                Ok(())
            }
            (Ok(()), None) => {
                self.t.affinity.remove(frontend);
                Ok(())
            }
            (Err(error), _) => {
                self.t.affinity.insert(*frontend, super::AFFINITY_UNKNOWN);
                Err(program_issue(ProgramError::Map {
                    frontend: frontend.erased(),
                    map: datapath_common::maps::AFFINITY_MATCH_MAP,
                    error: Box::new(error),
                }))
            }
        }
    }

    /// Remembers backends that left `frontend`, when it is UDP (a TCP
    /// connection fails fast on its own; a connected UDP socket would
    /// keep sending into the void).
    pub(super) fn note_departed(&mut self, frontend: &Frontend<A>, mut departed: Vec<Departed<A>>) {
        if frontend.protocol == crate::model::Protocol::Udp {
            departed.sort();
            departed.dedup();
            self.t.departed.extend(departed);
        }
    }

    /// Takes a reference on `address`'s backend entry: the one in use, the
    /// one adoption found in the maps, or a new id. `None` when the id
    /// space is full.
    pub(super) fn reference(&mut self, address: &BackendAddress<A>) -> Option<BackendId> {
        if let Some(id) = self.t.backends.reference(address) {
            return Some(id);
        }
        let id = match self.t.adopted_by_address.remove(address) {
            Some(id) => id,
            None => match self.backend_ids.allocate() {
                Some(id) => id,
                // Only retired ids left: free once no program can still
                // be reading their old entries (`IdAllocator::retire`).
                None if self.backend_ids.has_resting() && self.maps.wait_for_readers() => {
                    self.backend_ids.wake_resting();
                    self.backend_ids.allocate()?
                }
                None => return None,
            },
        };
        self.t.backends.insert(*address, id);
        Some(id)
    }

    /// Removes `frontend` if programmed. Returns whether it was.
    pub(super) fn remove(&mut self, frontend: &Frontend<A>) -> Result<bool, Issue> {
        let Some(programmed) = self.t.programmed.get(frontend).cloned() else {
            return Ok(false);
        };
        // Its affinity first: the reverse-NAT id is freed below, and the
        // next frontend to get it must not inherit a timeout (the maps
        // clear it with the frontend too: this makes a failure an issue).
        if self.t.affinity.contains_key(frontend) {
            self.maps
                .set_affinity(programmed.rev_nat_id, None)
                .map_err(|error| {
                    program_issue(ProgramError::Map {
                        frontend: frontend.erased(),
                        map: datapath_common::maps::AFFINITY_TIMEOUT_MAP,
                        error: Box::new(error),
                    })
                })?;
            self.t.affinity.remove(frontend);
        }
        // Its table before its id is freed (the next frontend to get the
        // id must not be served from outside by this one's table).
        self.unpoint(frontend, programmed.rev_nat_id)
            .map_err(|failure| failure.issue)?;
        A::remove_service(self.maps, frontend).map_err(program_issue)?;
        self.t.programmed.remove(frontend);
        let departed = programmed
            .backends
            .iter()
            .filter_map(|&id| self.t.backends.address_of(id))
            .chain(programmed.draining().iter().copied())
            .map(|backend| Departed {
                frontend: *frontend,
                rev_nat_id: programmed.rev_nat_id,
                backend,
            })
            .collect();
        self.note_departed(frontend, departed);
        self.rev_nat_ids.release(programmed.rev_nat_id);
        self.release_backend_ids(&programmed.backends);
        self.release_backends(programmed.draining());
        self.release_untracked(programmed.untracked_ids());
        Ok(true)
    }

    /// Frees ids a broken frontend's slots named, unless now in use.
    pub(super) fn release_untracked(&mut self, ids: &[BackendId]) {
        for &id in ids {
            // Either family's (ids are shared).
            if self.t.holds_backend_id(id) || self.other.holds_backend_id(id) {
                continue;
            }
            self.delete_backend(id);
        }
    }

    /// Deletes backend `id`'s entry and frees the id. A failed delete
    /// keeps the id out of use (its entry, or a match entry that keeps
    /// clients of a frontend with affinity on it, may still be there) and
    /// is tried again at the next update; said, since until then flows
    /// conntrack pins to it are not re-balanced.
    fn delete_backend(&mut self, id: BackendId) {
        match self.maps.remove_backend(id) {
            Ok(()) => self.backend_ids.retire(id),
            Err(error) => {
                tracing::warn!(id, %error, "deleting a backend entry failed; tried again at the next update");
                self.t.undeleted.push(id);
            }
        }
    }

    /// Tries again the deletes that failed (`delete_backend`).
    pub(super) fn retry_undeleted(&mut self) {
        for id in std::mem::take(&mut self.t.undeleted) {
            self.delete_backend(id);
        }
    }

    /// Drops one frontend's reference on each backend named by id (as a
    /// programmed frontend holds them); deletes backends nothing
    /// references any more.
    pub(super) fn release_backend_ids(&mut self, ids: &[BackendId]) {
        for &id in ids {
            // An id named twice (a broken frontend's union of two sets)
            // holds two references: still in the table at the second.
            if let Some(address) = self.t.backends.address_of(id) {
                self.release_backends(&[address]);
            }
        }
    }

    /// Drops one frontend's reference on each backend; deletes backends
    /// nothing references any more.
    pub(super) fn release_backends(&mut self, addresses: &[BackendAddress<A>]) {
        for address in addresses {
            if let Some(id) = self.t.backends.release(address) {
                self.delete_backend(id);
            }
        }
    }
}

impl<M: LbMaps> Reconciler<M> {
    /// From now until `flush`, frontends new to the maps are written
    /// together at the flush (one batch per map) instead of one by one.
    pub fn defer_new_frontends(&mut self) {
        self.maps.defer_new_frontends();
    }

    /// Writes the frontends noted since `defer_new_frontends`. Each that
    /// could not be written is held as a write that failed midway (its
    /// backends and id kept, rewritten on the next try) and returned as
    /// an issue of the service that owns it.
    pub fn flush(&mut self) -> Vec<(ObjectKey, Issue)> {
        let mut issues = Vec::new();
        for (frontend, error) in self.maps.flush() {
            if let Some(programmed) = self.v4.programmed.get_mut(&frontend) {
                programmed.broken = true;
            }
            // Every programmed frontend has an owner; one without is no
            // service's to retry.
            if let Some((owner, _)) = self.v4.owner.get(&frontend) {
                issues.push((owner.clone(), with_object(program_issue(error), owner)));
            }
        }
        issues
    }
}
