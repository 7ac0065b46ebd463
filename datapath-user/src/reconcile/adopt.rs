//! Taking over the maps at start: what a previous agent programmed is
//! remembered with its ids (so the first sync rewrites only what differs),
//! and what nothing asks for after that sync is pruned.

use std::net::{Ipv4Addr, Ipv6Addr};

use foldhash::{HashMap, HashSet};

use aya::maps::MapError;
use datapath_common::maps::{BackendId, RevNatId};

use super::{
    FamilyView, HoldsIds, IdAllocator, Programmed, PruneReport, Reconciler, TableFamily,
    issues::datapath_issue,
};
use crate::{
    k8s::Issue,
    maps::{DumpedFrontend, LbMaps, MapDump},
    model::{BackendAddress, Frontend},
};

/// What one family's maps hold, as `dump` read it.
struct FamilyDump<A> {
    frontends: Vec<DumpedFrontend<A>>,
    backends: Vec<(BackendId, BackendAddress<A>)>,
    /// Reverse-NAT id → service address and port.
    rev_nats: Vec<(RevNatId, (A, u16))>,
}

impl<M: LbMaps> Reconciler<M> {
    /// Takes over `maps`, remembering what they hold (with its ids) so the
    /// first sync rewrites only what differs.
    pub fn adopt(mut maps: M) -> Result<Self, MapError> {
        // What the maps hold once every frontend owns its slots alone.
        maps.learn_slot_blocks()?;
        let dump = maps.dump()?;
        // The first sync may be a while (a large cluster's first list).
        maps.unmap();
        Ok(Self::from_dump(maps, dump))
    }

    /// Takes over maps known to be empty (made by this very load:
    /// `Datapath::made_the_service_maps`), without reading them.
    pub fn new_on_empty(maps: M) -> Self {
        Self::from_dump(maps, MapDump::default())
    }

    /// Takes over `maps`, which hold what `dump` says. Both families share
    /// the id spaces: every id either family's maps hold is taken before
    /// any frontend is given a new one.
    fn from_dump(maps: M, dump: MapDump) -> Self {
        let maglev_tables = maps.maglev_tables().tables;
        let mut reconciler = Self {
            backend_ids: IdAllocator::new(maps.backend_capacity()),
            rev_nat_ids: IdAllocator::new(maps.rev_nat_capacity()),
            maps,
            v4: Default::default(),
            v6: Default::default(),
            node_seed: 0,
            maglev: super::maglev::MaglevTables::new(maglev_tables),
        };
        let affine: HashSet<RevNatId> = dump.affine.iter().copied().collect();
        reconciler.v4.stray_entries = dump.stray_entries;
        reconciler.v6.stray_entries = dump.stray_entries6;
        let v4 = FamilyDump {
            frontends: dump.frontends,
            backends: dump.backends,
            rev_nats: (dump.rev_nats.iter())
                .map(|(id, s)| (*id, (*s.ip(), s.port())))
                .collect(),
        };
        let v6 = FamilyDump {
            frontends: dump.frontends6,
            backends: dump.backends6,
            rev_nats: (dump.rev_nats6.iter())
                .map(|(id, s)| (*id, (*s.ip(), s.port())))
                .collect(),
        };
        // An id the REVERSE_NAT map no longer holds (made smaller with
        // `--frontends-max`), or one an earlier frontend of either family
        // already has (a build with narrower ids ran meanwhile): the
        // frontend gets a new id and is re-programmed by the first sync
        // (its tracked flows re-balance, as for a re-created service).
        // Every usable id is taken first, so that no new id is one a later
        // frontend holds; IPv6 first, as an earlier build kept them.
        let capacity = reconciler.rev_nat_ids.capacity;
        let mut holders = HashSet::default();
        let mut unusable = |rev_nat_ids: &mut dyn Iterator<Item = RevNatId>| -> Vec<bool> {
            rev_nat_ids
                .map(|id| id >= capacity || !holders.insert(id))
                .collect()
        };
        let unusable6 = unusable(&mut v6.frontends.iter().map(|f| f.rev_nat_id));
        let unusable4 = unusable(&mut v4.frontends.iter().map(|f| f.rev_nat_id));
        for id in &holders {
            reconciler.rev_nat_ids.adopt(*id);
        }
        // And every id an entry holds, used or not: a renumbered frontend
        // must not take the id of an entry a returning frontend gets back.
        for id in (v4.rev_nats.iter().map(|(id, _)| id)).chain(v6.rev_nats.iter().map(|(id, _)| id))
        {
            reconciler.rev_nat_ids.adopt(*id);
        }
        for id in (v4.backends.iter().map(|(id, _)| id)).chain(v6.backends.iter().map(|(id, _)| id))
        {
            reconciler.backend_ids.adopt(*id);
        }
        Ipv6Addr::view(&mut reconciler).adopt_frontends(&v6, unusable6);
        Ipv4Addr::view(&mut reconciler).adopt_frontends(&v4, unusable4);
        Ipv6Addr::view(&mut reconciler).adopt_unused(&v6);
        Ipv4Addr::view(&mut reconciler).adopt_unused(&v4);
        // Affinity an earlier agent wrote: the first sync writes what each
        // frontend asks now (its backends may have changed meanwhile).
        Ipv4Addr::view(&mut reconciler).adopt_affinity(&affine);
        Ipv6Addr::view(&mut reconciler).adopt_affinity(&affine);
        // Tables a previous agent pointed frontends at: a table whose ids
        // are all adopted backends was built for that set, and frontends
        // keep it (the first sync rewrites only what changed). Any other
        // (another seed or size, a write cut short) is let go: its
        // frontends leave new flows from outside to the stack until the
        // first sync gives them a table, rather than to backends not
        // known; so is the table of an id no adopted frontend holds.
        let by_id: HashMap<RevNatId, crate::model::Frontend> = (reconciler.v4.programmed.iter())
            .map(|(f, p)| (p.rev_nat_id, *f))
            .collect();
        let sets: HashMap<u32, &Vec<BackendId>> =
            dump.maglev_sets.iter().map(|(t, set)| (*t, set)).collect();
        for &(id, table) in &dump.maglev_tables_of {
            let set = sets.get(&table).filter(|set| {
                !set.is_empty()
                    && set
                        .iter()
                        .all(|&b| reconciler.v4.backends.address_of(b).is_some())
            });
            match (by_id.get(&id), set) {
                (Some(frontend), Some(set)) if reconciler.maglev.adopt_set(table, set) => {
                    reconciler.v4.north_south.insert(
                        *frontend,
                        super::NorthSouth {
                            table,
                            set: set.as_slice().into(),
                        },
                    );
                }
                _ => {
                    if let Err(error) = reconciler.maps.set_maglev_table_of(id, None) {
                        tracing::warn!(id, %error, "taking a stale Maglev table away failed");
                    }
                }
            }
        }
        // Affinity of ids no adopted frontend holds (an agent stopped
        // between a frontend's removal and its affinity's) goes now, before
        // any frontend can be given the id; what fails, the prune retries.
        let held: HashSet<RevNatId> = (reconciler.v4.programmed.values())
            .map(|p| p.rev_nat_id)
            .chain(reconciler.v6.programmed.values().map(|p| p.rev_nat_id))
            .collect();
        for &id in affine.difference(&held) {
            if let Err(error) = reconciler.maps.set_affinity(id, None) {
                tracing::warn!(id, %error, "taking a stale affinity away failed");
            }
        }
        // Counts of ids no adopted frontend holds (the same stop, or a
        // zeroing that failed): zero before the first sync can hand the
        // id to a frontend, which would inherit them; the prune retries.
        if let Err(error) = reconciler
            .maps
            .prune_service_counters(&|id| held.contains(&id))
        {
            tracing::warn!(%error, "zeroing stale counts in SERVICE_COUNTERS failed");
        }
        reconciler
    }

    /// Removes every programmed frontend no service holds, and every
    /// entry adoption found unused; rebuilds the service filter. Run once
    /// after the first full sync.
    ///
    /// With `keep_unowned` (the sources could not read everything),
    /// frontends no service holds are kept: they may belong to an object
    /// that could not be read.
    pub fn prune(&mut self, keep_unowned: bool) -> Result<PruneReport, Vec<Issue>> {
        let mut report = PruneReport::default();
        let mut issues = Vec::new();
        Ipv4Addr::view(self).prune(keep_unowned, &mut report, &mut issues);
        Ipv6Addr::view(self).prune(keep_unowned, &mut report, &mut issues);
        // Affinity a previous agent gave ids no frontend holds now (the
        // frontends it holds are in `affinity`, adopted unknown: kept with
        // the unowned ones it may belong to): one id space for both
        // families.
        let affine: HashSet<RevNatId> = (self.v4.affinity.keys())
            .filter_map(|f| self.v4.programmed.get(f).map(|p| p.rev_nat_id))
            .chain(
                (self.v6.affinity.keys())
                    .filter_map(|f| self.v6.programmed.get(f).map(|p| p.rev_nat_id)),
            )
            .collect();
        if let Err(e) = self.maps.prune_affinity(&|id| affine.contains(&id)) {
            issues.push(datapath_issue("AFFINITY_TIMEOUT", e.to_string()));
        }
        // Counts of ids no frontend holds now (frontends gone while no
        // agent ran, ids the prune freed): zero, so that the next
        // frontend to get one starts at zero.
        let held: HashSet<RevNatId> = self
            .v4
            .rev_nat_ids()
            .into_iter()
            .chain(self.v6.rev_nat_ids())
            .collect();
        if let Err(e) = self.maps.prune_service_counters(&|id| held.contains(&id)) {
            issues.push(datapath_issue(
                datapath_common::maps::SERVICE_COUNTERS_MAP,
                e.to_string(),
            ));
        }
        let frontends: Vec<Frontend> = self.v4.programmed.keys().copied().collect();
        let frontends6: Vec<Frontend<Ipv6Addr>> = self.v6.programmed.keys().copied().collect();
        match self.maps.rebuild_filter(&frontends, &frontends6) {
            Ok(n) => report.filter_buckets = n,
            Err(e) => issues.push(datapath_issue("SERVICE_FILTER", e.to_string())),
        }
        if issues.is_empty() {
            Ok(report)
        } else {
            Err(issues)
        }
    }
}

impl<M: LbMaps, A: TableFamily> FamilyView<'_, M, A> {
    /// Remembers the frontends `found` holds, each with its ids; one whose
    /// reverse-NAT id is `unusable` gets a new one (or 0 when none is
    /// free: the first sync takes one when it can and reports the full
    /// table until then; the entry of the frontend that holds the id is
    /// never touched).
    fn adopt_frontends(&mut self, found: &FamilyDump<A>, unusable: Vec<bool>) {
        let by_id: HashMap<BackendId, BackendAddress<A>> = found.backends.iter().copied().collect();
        let reverse_nat: HashMap<RevNatId, (A, u16)> = found.rev_nats.iter().copied().collect();
        for (found, id_unusable) in found.frontends.iter().zip(unusable) {
            let mut rev_nat_id = found.rev_nat_id;
            if id_unusable {
                rev_nat_id = self.rev_nat_ids.allocate().unwrap_or(0);
            }
            let frontend = found.frontend;
            // The reverse-NAT map was made afresh (resized), or a write
            // was interrupted: the entry is written again at once under
            // the same id, so tracked flows (which name the id) keep their
            // backends. If that fails, the first sync re-programs it.
            let rev_nat_lost = !id_unusable
                && reverse_nat.get(&rev_nat_id) != Some(&(frontend.address, frontend.port))
                && A::restore_rev_nat(self.maps, rev_nat_id, &frontend).is_err();
            let slots: Option<Vec<(BackendId, BackendAddress<A>)>> = found
                .slots
                .iter()
                .map(|slot| slot.and_then(|id| by_id.get(&id).map(|a| (id, *a))))
                .collect();
            // Broken: a missing slot or backend, or an address that
            // another frontend reached under a different id. Re-programmed
            // by the first sync; until then its entries stay in place.
            let broken = rev_nat_lost
                || id_unusable
                || match &slots {
                    None => true,
                    Some(slots) => slots.iter().any(|(id, address)| {
                        self.t
                            .backends
                            .id_of(address)
                            .is_some_and(|using| using != *id)
                    }),
                };
            let mut backends = Vec::new();
            let mut untracked_ids = Vec::new();
            if broken {
                // Whatever its slots name stays reserved until the frontend
                // is rewritten: neither pruned nor handed out again.
                for id in found.slots.iter().flatten() {
                    self.backend_ids.adopt(*id);
                    untracked_ids.push(*id);
                }
            } else {
                for (id, address) in slots.unwrap_or_default() {
                    if self.t.backends.reference(&address).is_none() {
                        self.t.backends.insert(address, id);
                    }
                    backends.push(id);
                }
            }
            self.rev_nat_ids.adopt(rev_nat_id);
            self.t.programmed.insert(
                frontend,
                Programmed::new(rev_nat_id, broken, backends, Vec::new(), untracked_ids),
            );
        }
    }

    /// Remembers this family's entries no frontend names: backends (a
    /// draining one keeps its id if the first sync asks for it again;
    /// one a broken frontend of either family may name stays reserved
    /// until that frontend is rewritten) and reverse-NAT entries (a
    /// frontend at the same address gets its id back, unless a frontend
    /// of either family holds that id). Ids are checked against sets made
    /// once: tens of thousands of entries each.
    fn adopt_unused(&mut self, found: &FamilyDump<A>) {
        let untracked: HashSet<BackendId> = (self.t.untracked_backend_ids().into_iter())
            .chain(self.other.untracked_backend_ids())
            .collect();
        for (id, address) in &found.backends {
            if !self.t.has_backend(*id) && !untracked.contains(id) {
                self.t.adopted_unused_backends.push(*id);
                self.t.adopted_by_address.entry(*address).or_insert(*id);
            }
        }
        let own = self.t.rev_nat_ids();
        let other = self.other.rev_nat_ids();
        let mut ambiguous = HashSet::default();
        for (id, address) in &found.rev_nats {
            if own.contains(id) {
                continue;
            }
            self.t.adopted_unused_rev_nats.push(*id);
            if other.contains(id) {
                // A stale entry under another frontend's id: cleared by
                // prune, the id kept.
                continue;
            }
            // Two at one address (its TCP and UDP frontends): which is
            // which is not in the entry.
            if self
                .t
                .adopted_rev_nat_by_address
                .insert(*address, *id)
                .is_some()
            {
                ambiguous.insert(*address);
            }
        }
        for address in ambiguous {
            self.t.adopted_rev_nat_by_address.remove(&address);
        }
    }

    /// Marks every adopted frontend whose reverse-NAT id has affinity in
    /// the maps (`affine`) as `AFFINITY_UNKNOWN`.
    fn adopt_affinity(&mut self, affine: &HashSet<RevNatId>) {
        if affine.is_empty() {
            return;
        }
        for (frontend, programmed) in &self.t.programmed {
            if affine.contains(&programmed.rev_nat_id) {
                self.t.affinity.insert(*frontend, super::AFFINITY_UNKNOWN);
            }
        }
    }

    /// `Reconciler::prune` of this family's entries; an id is released
    /// only when neither family holds it.
    fn prune(&mut self, keep_unowned: bool, report: &mut PruneReport, issues: &mut Vec<Issue>) {
        let stale: Vec<Frontend<A>> = self
            .t
            .programmed
            .keys()
            .filter(|f| !keep_unowned && !self.t.owner.contains_key(f))
            .copied()
            .collect();
        for frontend in stale {
            match self.remove(&frontend) {
                Ok(_) => report.frontends += 1,
                Err(issue) => issues.push(issue),
            }
        }
        self.t.adopted_by_address.clear();
        self.t.adopted_rev_nat_by_address.clear();
        let untracked: HashSet<BackendId> = (self.t.untracked_backend_ids().into_iter())
            .chain(self.other.untracked_backend_ids())
            .collect();
        for id in std::mem::take(&mut self.t.adopted_unused_backends) {
            if self.t.has_backend(id) || self.other.has_backend(id) || untracked.contains(&id) {
                continue; // taken into use since adoption
            }
            match self.maps.remove_backend(id) {
                Ok(()) => {
                    self.backend_ids.retire(id);
                    report.backends += 1;
                }
                Err(e) => issues.push(datapath_issue("BACKENDS", format!("backend {id}: {e}"))),
            }
        }
        let (own, other) = (self.t.rev_nat_ids(), self.other.rev_nat_ids());
        for id in std::mem::take(&mut self.t.adopted_unused_rev_nats) {
            if own.contains(&id) {
                continue;
            }
            match A::remove_rev_nat(self.maps, id) {
                Ok(()) => {
                    // Freed only when the other family does not hold it,
                    // and only without affinity (its next frontend must
                    // not inherit any).
                    if !other.contains(&id) {
                        match self.maps.set_affinity(id, None) {
                            Ok(()) => self.rev_nat_ids.release(id),
                            Err(e) => issues.push(datapath_issue(
                                "AFFINITY_TIMEOUT",
                                format!("reverse-NAT {id}: {e}"),
                            )),
                        }
                    }
                    report.rev_nats += 1;
                }
                Err(e) => issues.push(datapath_issue(
                    A::REVERSE_NAT_MAP,
                    format!("reverse-NAT {id}: {e}"),
                )),
            }
        }
        for key in std::mem::take(&mut self.t.stray_entries) {
            // An entry naming no frontend this build knows (another
            // protocol): nothing will ever ask for it.
            match A::remove_service_key(self.maps, &key) {
                Ok(()) => report.stray_entries += 1,
                Err(e) => issues.push(datapath_issue(A::SERVICES_MAP, format!("stray entry: {e}"))),
            }
        }
    }
}
