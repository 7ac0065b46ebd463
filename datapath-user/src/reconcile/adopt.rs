//! Taking over the maps at start: what a previous agent programmed is
//! remembered with its ids (so the first sync rewrites only what differs),
//! and what nothing asks for after that sync is pruned.

use foldhash::{HashMap, HashSet};

use aya::maps::MapError;
use datapath_common::maps::{BackendId, RevNatId};

use super::{IdAllocator, Programmed, PruneReport, Reconciler, issues::datapath_issue};
use crate::{
    k8s::Issue,
    maps::{LbMaps, MapDump},
    model::{BackendAddress, Frontend},
};

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

    /// Takes over `maps`, which hold what `dump` says.
    fn from_dump(maps: M, dump: MapDump) -> Self {
        let mut reconciler = Self {
            backend_ids: IdAllocator::new(maps.backend_capacity()),
            rev_nat_ids: IdAllocator::new(maps.rev_nat_capacity()),
            maps,
            v4: Default::default(),
            adopted_unused_backends: Vec::new(),
            departed: Vec::new(),
            node_seed: 0,
            adopted_unused_rev_nats: Vec::new(),
            stray_entries: dump.stray_entries,
        };
        let by_id: HashMap<BackendId, BackendAddress> = dump.backends.iter().copied().collect();
        let reverse_nat: HashMap<RevNatId, std::net::SocketAddrV4> =
            dump.rev_nats.iter().copied().collect();
        let mut referenced = HashSet::default();
        let mut rev_nats_used = HashSet::default();
        // An id the REVERSE_NAT map no longer holds (made smaller with
        // `--frontends-max`), or one an earlier frontend already has (a
        // build with narrower ids ran meanwhile): the frontend gets a new
        // id and is re-programmed by the first sync (its tracked flows
        // re-balance, as for a re-created service). Every usable id is
        // taken first, so that no new id is one a later frontend holds.
        // IPv6 entries (an agent with the IPv6 datapath wrote them) first:
        // their ids are taken before any IPv4 frontend is renumbered, so
        // that none is given one while they stand; this build neither
        // rewrites nor prunes them.
        let mut held6_rev_nats = HashSet::default();
        for found in &dump.frontends6 {
            held6_rev_nats.insert(found.rev_nat_id);
            for id in found.slots.iter().flatten() {
                reconciler.backend_ids.adopt(*id);
            }
        }
        held6_rev_nats.extend(dump.rev_nats6.iter().map(|(id, _)| *id));
        for id in &held6_rev_nats {
            reconciler.rev_nat_ids.adopt(*id);
        }
        for (id, _) in &dump.backends6 {
            reconciler.backend_ids.adopt(*id);
        }
        // An IPv4 frontend holding an IPv6 frontend's id gets another.
        let mut holders = held6_rev_nats.clone();
        let unusable: Vec<bool> = dump
            .frontends
            .iter()
            .map(|f| {
                f.rev_nat_id >= reconciler.rev_nat_ids.capacity || !holders.insert(f.rev_nat_id)
            })
            .collect();
        for id in &holders {
            reconciler.rev_nat_ids.adopt(*id);
        }
        for (mut found, id_unusable) in dump.frontends.into_iter().zip(unusable) {
            if id_unusable {
                // None free: 0, so that the first sync takes one when it
                // can and reports the full table until then (the entry of
                // the frontend that holds the id is never touched).
                found.rev_nat_id = reconciler.rev_nat_ids.allocate().unwrap_or(0);
            }
            // The REVERSE_NAT map was made afresh (resized), or a write
            // was interrupted: the entry is written again at once under
            // the same id, so tracked flows (which name the id) keep their
            // backends. If that fails, the first sync re-programs it.
            let rev_nat_lost = !id_unusable
                && reverse_nat.get(&found.rev_nat_id)
                    != Some(&std::net::SocketAddrV4::new(
                        found.frontend.address,
                        found.frontend.port,
                    ))
                && reconciler
                    .maps
                    .restore_rev_nat(found.rev_nat_id, &found.frontend)
                    .is_err();
            let slots: Option<Vec<(BackendId, BackendAddress)>> = found
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
                        reconciler
                            .v4
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
                    referenced.insert(*id);
                    reconciler.backend_ids.adopt(*id);
                    untracked_ids.push(*id);
                }
            } else {
                for (id, address) in slots.unwrap_or_default() {
                    referenced.insert(id);
                    if reconciler.v4.backends.reference(&address).is_none() {
                        reconciler.v4.backends.insert(address, id);
                    }
                    backends.push(id);
                }
            }
            rev_nats_used.insert(found.rev_nat_id);
            reconciler.rev_nat_ids.adopt(found.rev_nat_id);
            reconciler.v4.programmed.insert(
                found.frontend,
                Programmed::new(
                    found.rev_nat_id,
                    broken,
                    backends,
                    Vec::new(),
                    untracked_ids,
                ),
            );
        }
        for (id, address) in &dump.backends {
            reconciler.backend_ids.adopt(*id);
            if !referenced.contains(id) {
                reconciler.adopted_unused_backends.push(*id);
                reconciler
                    .v4
                    .adopted_by_address
                    .entry(*address)
                    .or_insert(*id);
            }
        }
        let mut ambiguous = HashSet::default();
        for (id, socket) in &dump.rev_nats {
            let address = (*socket.ip(), socket.port());
            // (A stale IPv4 entry under an IPv6 frontend's id: left, and
            // the id kept.)
            if !rev_nats_used.contains(id) && !held6_rev_nats.contains(id) {
                reconciler.rev_nat_ids.adopt(*id);
                reconciler.adopted_unused_rev_nats.push(*id);
                // Two at one address (its TCP and UDP frontends): which
                // is which is not in the entry.
                if reconciler
                    .v4
                    .adopted_rev_nat_by_address
                    .insert(address, *id)
                    .is_some()
                {
                    ambiguous.insert(address);
                }
            }
        }
        for address in ambiguous {
            reconciler.v4.adopted_rev_nat_by_address.remove(&address);
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
        let stale: Vec<Frontend> = self
            .v4
            .programmed
            .keys()
            .filter(|f| !keep_unowned && !self.v4.owner.contains_key(f))
            .copied()
            .collect();
        for frontend in stale {
            match self.remove(&frontend) {
                Ok(_) => report.frontends += 1,
                Err(issue) => issues.push(issue),
            }
        }
        self.v4.adopted_by_address.clear();
        self.v4.adopted_rev_nat_by_address.clear();
        for id in std::mem::take(&mut self.adopted_unused_backends) {
            if self.v4.backends.holds_id(id) {
                continue; // taken into use since adoption
            }
            match self.maps.remove_backend(id) {
                Ok(()) => {
                    self.backend_ids.release(id);
                    report.backends += 1;
                }
                Err(e) => issues.push(datapath_issue("BACKENDS", format!("backend {id}: {e}"))),
            }
        }
        for id in std::mem::take(&mut self.adopted_unused_rev_nats) {
            if self.v4.programmed.values().any(|p| p.rev_nat_id == id) {
                continue;
            }
            match self.maps.remove_rev_nat(id) {
                Ok(()) => {
                    self.rev_nat_ids.release(id);
                    report.rev_nats += 1;
                }
                Err(e) => issues.push(datapath_issue(
                    "REVERSE_NAT",
                    format!("reverse-NAT {id}: {e}"),
                )),
            }
        }
        for key in std::mem::take(&mut self.stray_entries) {
            // An entry naming no frontend this build knows (another
            // protocol): nothing will ever ask for it.
            match self.maps.remove_service_key(&key) {
                Ok(()) => report.stray_entries += 1,
                Err(e) => issues.push(datapath_issue("SERVICES", format!("stray entry: {e}"))),
            }
        }
        let frontends: Vec<Frontend> = self.v4.programmed.keys().copied().collect();
        match self.maps.rebuild_filter(&frontends) {
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
