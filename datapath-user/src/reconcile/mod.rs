//! Keeps the maps equal to the translated cluster state.
//!
//! The reconciler owns id allocation and remembers what it programmed, so
//! an update touches only the frontends whose backends changed. On start
//! it adopts what the maps already hold (a previous agent's work): ids
//! stay stable, so established flows, which conntrack pins to backend
//! and reverse-NAT ids, keep their backend across an agent restart.
//!
//! Ids are handed out round-robin rather than lowest-first: a released
//! backend id is reused as late as possible, because a tracked flow of
//! the deleted backend that is still in conntrack would otherwise follow
//! the id to whichever backend got it next.
//!
//! Draining: an endpoint that is still listed but no longer usable (not
//! ready, terminating) loses its slot, so it gets no new flow, but keeps
//! its `BACKENDS` entry and id, so the flows conntrack pins to it keep
//! going. Only when it leaves every slice is the entry deleted and its
//! flows re-balanced.

use std::collections::{BTreeSet, HashMap, HashSet};

use aya::maps::MapError;
use datapath_common::maps::{BackendId, RevNatId, ServiceKey};

use crate::{
    k8s::{Endpoint, Issue, IssueKind, ObjectKey, ServiceTranslation, translate::conflict_issue},
    maps::{LbMaps, ProgramError},
    model::{BackendAddress, BackendEntry, Frontend},
};

mod ids;
mod subset;

pub use ids::IdAllocator;
use subset::fnv1a;
pub use subset::node_subset;

/// A frontend as programmed.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Programmed {
    rev_nat_id: RevNatId,
    /// Backends this frontend holds a reference on: its slots, in order,
    /// when `broken` is false. After a failed write, the union of the old
    /// and the new set (the maps may name either).
    backends: Vec<BackendAddress>,
    /// Draining backends this frontend holds a reference on (their
    /// `BACKENDS` entries stay; no slot names them).
    draining: Vec<BackendAddress>,
    /// The maps may not match `backends` (an interrupted or failed
    /// write): the next update rewrites the frontend.
    broken: bool,
    /// Backend ids the maps' slots may name that no `BackendUse` tracks
    /// (found broken at adoption); freed once the frontend is rewritten.
    untracked_ids: Vec<BackendId>,
}

/// One backend entry in use.
#[derive(Clone, Copy, Debug)]
struct BackendUse {
    id: BackendId,
    /// Frontends whose slots name it.
    frontends: u32,
}

/// A backend that left a UDP frontend (not even draining any more):
/// sockets that socket-LB connected to it for that frontend must go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Departed {
    pub rev_nat_id: RevNatId,
    pub backend: BackendAddress,
}

/// What an update did.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Backends that left UDP frontends.
    pub departed: Vec<Departed>,
    /// Problems, each naming the object (Conflict, Limit, Datapath).
    pub issues: Vec<Issue>,
    /// Services that wanted a frontend another service just released:
    /// translate and update them again.
    pub retry: Vec<ObjectKey>,
    pub frontends_written: usize,
    pub frontends_removed: usize,
}

/// What adopting the maps found and repaired.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PruneReport {
    pub frontends: usize,
    pub backends: usize,
    pub rev_nats: usize,
    pub stray_slots: usize,
    pub filter_buckets: usize,
}

pub struct Reconciler<M> {
    maps: M,
    programmed: HashMap<Frontend, Programmed>,
    backends: HashMap<BackendAddress, BackendUse>,
    backend_ids: IdAllocator,
    rev_nat_ids: IdAllocator,
    /// Which service holds each frontend.
    owner: HashMap<Frontend, ObjectKey>,
    /// Frontends each service holds.
    held: HashMap<ObjectKey, BTreeSet<Frontend>>,
    /// Services that asked for a frontend someone else holds.
    waiting: HashMap<Frontend, BTreeSet<ObjectKey>>,
    /// Entries found in the maps at adoption that no slot names; freed by
    /// `prune` unless the first sync takes them into use (a draining
    /// backend keeps its id across an agent restart this way).
    adopted_unused_backends: Vec<BackendId>,
    adopted_by_address: HashMap<BackendAddress, BackendId>,
    /// Filled by `program`/`remove`, handed out with the next `Outcome`.
    departed: Vec<Departed>,
    /// Picks this node's subset of an over-limit service (a hash of the
    /// node's name), so nodes spread over all endpoints.
    node_seed: u64,
    adopted_unused_rev_nats: Vec<RevNatId>,
    stray_slots: Vec<ServiceKey>,
}

impl<M: LbMaps> Reconciler<M> {
    /// Takes over `maps`, remembering what they hold (with its ids) so the
    /// first sync rewrites only what differs.
    pub fn adopt(maps: M) -> Result<Self, MapError> {
        let dump = maps.dump()?;
        let mut reconciler = Self {
            backend_ids: IdAllocator::new(maps.backend_capacity()),
            rev_nat_ids: IdAllocator::new(maps.rev_nat_capacity()),
            maps,
            programmed: HashMap::new(),
            backends: HashMap::new(),
            owner: HashMap::new(),
            held: HashMap::new(),
            waiting: HashMap::new(),
            adopted_unused_backends: Vec::new(),
            adopted_by_address: HashMap::new(),
            departed: Vec::new(),
            node_seed: 0,
            adopted_unused_rev_nats: Vec::new(),
            stray_slots: dump.stray_slots,
        };
        let by_id: HashMap<BackendId, BackendAddress> = dump.backends.iter().copied().collect();
        let mut referenced = HashSet::new();
        let mut rev_nats_used = HashSet::new();
        for found in dump.frontends {
            let slots: Option<Vec<(BackendId, BackendAddress)>> = found
                .slots
                .iter()
                .map(|slot| slot.and_then(|id| by_id.get(&id).map(|a| (id, *a))))
                .collect();
            // Broken: a missing slot or backend, or an address that
            // another frontend reached under a different id. Re-programmed
            // by the first sync; until then its entries stay in place.
            let broken = match &slots {
                None => true,
                Some(slots) => slots.iter().any(|(id, address)| {
                    reconciler
                        .backends
                        .get(address)
                        .is_some_and(|using| using.id != *id)
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
                    reconciler
                        .backends
                        .entry(address)
                        .or_insert(BackendUse { id, frontends: 0 })
                        .frontends += 1;
                    backends.push(address);
                }
            }
            rev_nats_used.insert(found.rev_nat_id);
            reconciler.rev_nat_ids.adopt(u32::from(found.rev_nat_id));
            reconciler.programmed.insert(
                found.frontend,
                Programmed {
                    rev_nat_id: found.rev_nat_id,
                    backends,
                    draining: Vec::new(),
                    broken,
                    untracked_ids,
                },
            );
        }
        for (id, address) in &dump.backends {
            reconciler.backend_ids.adopt(*id);
            if !referenced.contains(id) {
                reconciler.adopted_unused_backends.push(*id);
                reconciler.adopted_by_address.entry(*address).or_insert(*id);
            }
        }
        for (id, _) in &dump.rev_nats {
            if !rev_nats_used.contains(id) {
                reconciler.rev_nat_ids.adopt(u32::from(*id));
                reconciler.adopted_unused_rev_nats.push(*id);
            }
        }
        Ok(reconciler)
    }

    /// The node this agent serves: seeds the choice of an over-limit
    /// service's subset, so every node serves a different one.
    pub fn set_node_name(&mut self, node_name: Option<&str>) {
        self.node_seed = node_name.map_or(0, fnv1a);
    }

    pub fn maps(&self) -> &M {
        &self.maps
    }

    pub fn maps_mut(&mut self) -> &mut M {
        &mut self.maps
    }

    pub fn into_maps(self) -> M {
        self.maps
    }

    /// Frontends currently programmed.
    pub fn frontend_count(&self) -> usize {
        self.programmed.len()
    }

    /// Backend entries currently in use.
    pub fn backend_count(&self) -> usize {
        self.backends.len()
    }

    /// Ids handed out and not yet released: (backend, reverse-NAT).
    pub fn ids_in_use(&self) -> (usize, usize) {
        (self.backend_ids.in_use(), self.rev_nat_ids.in_use())
    }

    /// Sets what `service` asks for (`translation` from `translate_service`;
    /// empty when the Service is gone). Frontends it held and no longer
    /// asks for are removed.
    pub fn update_service(
        &mut self,
        service: &ObjectKey,
        translation: &ServiceTranslation,
    ) -> Outcome {
        // An object with an invalid field may have lost a port to it: what
        // it served before stays until it is valid again.
        let keep_dropped = translation
            .issues
            .iter()
            .any(|i| i.kind == IssueKind::Invalid);
        self.update_service_keeping(service, translation, keep_dropped)
    }

    /// `update_service`; with `keep_dropped`, frontends the service held
    /// and no longer asks for are kept instead of removed.
    pub fn update_service_keeping(
        &mut self,
        service: &ObjectKey,
        translation: &ServiceTranslation,
        keep_dropped: bool,
    ) -> Outcome {
        let mut outcome = Outcome::default();
        let wanted: BTreeSet<Frontend> = translation.frontends.iter().map(|d| d.frontend).collect();
        let previously = self.held.remove(service).unwrap_or_default();
        // A service that no longer asks stops waiting.
        for frontend in previously.iter().chain(self.waiting_for(service).iter()) {
            if !wanted.contains(frontend)
                && let Some(waiters) = self.waiting.get_mut(frontend)
            {
                waiters.remove(service);
                if waiters.is_empty() {
                    self.waiting.remove(frontend);
                }
            }
        }
        let mut held = BTreeSet::new();
        for desired in &translation.frontends {
            let frontend = desired.frontend;
            match self.owner.get(&frontend) {
                Some(owner) if owner != service => {
                    outcome
                        .issues
                        .push(conflict_issue(service, owner, &frontend));
                    self.waiting
                        .entry(frontend)
                        .or_default()
                        .insert(service.clone());
                    continue;
                }
                _ => {}
            }
            self.owner.insert(frontend, service.clone());
            held.insert(frontend);
            if let Some(waiters) = self.waiting.get_mut(&frontend) {
                waiters.remove(service);
                if waiters.is_empty() {
                    self.waiting.remove(&frontend);
                }
            }
            match self.program(&frontend, &desired.backends, &desired.draining) {
                Ok(true) => outcome.frontends_written += 1,
                Ok(false) => {}
                Err(issue) => outcome.issues.push(with_object(issue, service)),
            }
        }
        let mut dropped: Vec<Frontend> = previously.difference(&held).copied().collect();
        if keep_dropped {
            held.extend(dropped.drain(..));
        }
        for frontend in &dropped {
            if self.owner.get(frontend) == Some(service) {
                self.owner.remove(frontend);
            }
            match self.remove(frontend) {
                Ok(true) => outcome.frontends_removed += 1,
                Ok(false) => {}
                Err(issue) => {
                    // Still programmed: keep holding it so a later update
                    // retries the removal.
                    self.owner.insert(*frontend, service.clone());
                    held.insert(*frontend);
                    outcome.issues.push(with_object(issue, service));
                    continue;
                }
            }
            if let Some(waiters) = self.waiting.get(frontend) {
                outcome.retry.extend(waiters.iter().cloned());
            }
        }
        if !held.is_empty() {
            self.held.insert(service.clone(), held);
        }
        outcome.departed = std::mem::take(&mut self.departed);
        outcome
    }

    fn waiting_for(&self, service: &ObjectKey) -> Vec<Frontend> {
        self.waiting
            .iter()
            .filter(|(_, waiters)| waiters.contains(service))
            .map(|(f, _)| *f)
            .collect()
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
            .programmed
            .keys()
            .filter(|f| !keep_unowned && !self.owner.contains_key(f))
            .copied()
            .collect();
        for frontend in stale {
            match self.remove(&frontend) {
                Ok(_) => report.frontends += 1,
                Err(issue) => issues.push(issue),
            }
        }
        self.adopted_by_address.clear();
        for id in std::mem::take(&mut self.adopted_unused_backends) {
            if self.backends.values().any(|u| u.id == id) {
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
            if self.programmed.values().any(|p| p.rev_nat_id == id) {
                continue;
            }
            match self.maps.remove_rev_nat(id) {
                Ok(()) => {
                    self.rev_nat_ids.release(u32::from(id));
                    report.rev_nats += 1;
                }
                Err(e) => issues.push(datapath_issue(
                    "REVERSE_NAT",
                    format!("reverse-NAT {id}: {e}"),
                )),
            }
        }
        for key in std::mem::take(&mut self.stray_slots) {
            match self.maps.remove_service_key(&key) {
                Ok(()) => report.stray_slots += 1,
                Err(e) => issues.push(datapath_issue("SERVICES", format!("stray slot: {e}"))),
            }
        }
        let frontends: Vec<Frontend> = self.programmed.keys().copied().collect();
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

    /// Writes `frontend` if its backends differ from what is programmed,
    /// and holds the draining ones. Returns whether it wrote.
    fn program(
        &mut self,
        frontend: &Frontend,
        endpoints: &[Endpoint],
        draining: &[Endpoint],
    ) -> Result<bool, Issue> {
        // Over the per-service limit: this node serves its own subset (so
        // the nodes together use every endpoint) and says so; the rest
        // drain like endpoints that left the ready set.
        let limit = usize::from(datapath_common::maps::MAX_BACKENDS_PER_SERVICE);
        let total = endpoints.len();
        let capped = total > limit;
        let (endpoints, left_out) = node_subset(endpoints, limit, self.node_seed);
        let as_address = |e: &Endpoint| BackendAddress {
            address: e.address,
            port: e.port,
            protocol: frontend.protocol,
        };
        let addresses: Vec<BackendAddress> = endpoints.iter().map(as_address).collect();
        // Only a backend that has an id can have flows to drain.
        let mut draining: Vec<BackendAddress> = draining
            .iter()
            .chain(&left_out)
            .map(as_address)
            .filter(|a| self.backends.contains_key(a) || self.adopted_by_address.contains_key(a))
            .collect();
        draining.sort();
        let capped_issue = || {
            program_issue(ProgramError::TooManyBackends {
                frontend: *frontend,
                count: total,
                max: datapath_common::maps::MAX_BACKENDS_PER_SERVICE,
            })
        };
        let existing = self.programmed.get(frontend);
        let slots_unchanged = existing.is_some_and(|p| !p.broken && p.backends == addresses);
        if slots_unchanged && existing.is_some_and(|p| p.draining == draining) {
            return if capped {
                Err(capped_issue())
            } else {
                Ok(false)
            };
        }
        let (rev_nat_id, fresh_rev_nat) = match existing {
            Some(p) => (p.rev_nat_id, false),
            None => {
                let id = self.rev_nat_ids.allocate().ok_or_else(|| {
                    limit_issue(frontend, "REVERSE_NAT", self.rev_nat_ids.capacity)
                })?;
                (id as RevNatId, true)
            }
        };
        // Take references on the new set first; released below on failure.
        let mut entries = Vec::with_capacity(addresses.len());
        for (taken, address) in addresses.iter().enumerate() {
            let Some(id) = self.reference(address) else {
                let issue = limit_issue(frontend, "BACKENDS", self.backend_ids.capacity);
                self.release_backends(&addresses[..taken]);
                if fresh_rev_nat {
                    self.rev_nat_ids.release(u32::from(rev_nat_id));
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
        if written && let Err(e) = self.maps.set_service(frontend, rev_nat_id, &entries) {
            if !matches!(e, ProgramError::Map { .. }) {
                // Refused before anything was written.
                self.release_backends(&addresses);
                self.release_backends(&draining);
                if fresh_rev_nat {
                    self.rev_nat_ids.release(u32::from(rev_nat_id));
                }
                return Err(program_issue(e));
            }
            // A write failed midway: slots (and perhaps the frontend) may
            // name the old or the new backends. Hold both sets and the
            // reverse-NAT id until a rewrite succeeds; deleting either now
            // could leave a slot naming a freed id.
            let mut held = addresses;
            let mut held_draining = draining;
            let mut untracked_ids = Vec::new();
            if let Some(old) = self.programmed.remove(frontend) {
                held.extend(old.backends);
                held_draining.extend(old.draining);
                untracked_ids = old.untracked_ids;
            }
            self.programmed.insert(
                *frontend,
                Programmed {
                    rev_nat_id,
                    backends: held,
                    draining: held_draining,
                    broken: true,
                    untracked_ids,
                },
            );
            return Err(program_issue(e));
        }
        let old = self.programmed.insert(
            *frontend,
            Programmed {
                rev_nat_id,
                backends: addresses,
                draining,
                broken: false,
                untracked_ids: Vec::new(),
            },
        );
        // Break after make: the old set's entries go only now.
        if let Some(old) = old {
            let now = &self.programmed[frontend];
            let departed: Vec<Departed> = old
                .backends
                .iter()
                .chain(&old.draining)
                .filter(|b| !now.backends.contains(b) && !now.draining.contains(b))
                .map(|&backend| Departed {
                    rev_nat_id,
                    backend,
                })
                .collect();
            self.note_departed(frontend, departed);
            self.release_backends(&old.backends);
            self.release_backends(&old.draining);
            self.release_untracked(&old.untracked_ids);
        }
        if capped {
            return Err(capped_issue());
        }
        Ok(written)
    }

    /// Remembers backends that left `frontend`, when it is UDP (a TCP
    /// connection fails fast on its own; a connected UDP socket would
    /// keep sending into the void).
    fn note_departed(&mut self, frontend: &Frontend, mut departed: Vec<Departed>) {
        if frontend.protocol == crate::model::Protocol::Udp {
            departed.sort();
            departed.dedup();
            self.departed.extend(departed);
        }
    }

    /// Takes a reference on `address`'s backend entry: the one in use, the
    /// one adoption found in the maps, or a new id. `None` when the id
    /// space is full.
    fn reference(&mut self, address: &BackendAddress) -> Option<BackendId> {
        if let Some(using) = self.backends.get_mut(address) {
            using.frontends += 1;
            return Some(using.id);
        }
        let id = match self.adopted_by_address.remove(address) {
            Some(id) => id,
            None => self.backend_ids.allocate()?,
        };
        self.backends
            .insert(*address, BackendUse { id, frontends: 1 });
        Some(id)
    }

    /// Removes `frontend` if programmed. Returns whether it was.
    fn remove(&mut self, frontend: &Frontend) -> Result<bool, Issue> {
        let Some(programmed) = self.programmed.get(frontend).cloned() else {
            return Ok(false);
        };
        self.maps.remove_service(frontend).map_err(program_issue)?;
        self.programmed.remove(frontend);
        let departed = programmed
            .backends
            .iter()
            .chain(&programmed.draining)
            .map(|&backend| Departed {
                rev_nat_id: programmed.rev_nat_id,
                backend,
            })
            .collect();
        self.note_departed(frontend, departed);
        self.rev_nat_ids.release(u32::from(programmed.rev_nat_id));
        self.release_backends(&programmed.backends);
        self.release_backends(&programmed.draining);
        self.release_untracked(&programmed.untracked_ids);
        Ok(true)
    }

    /// Frees ids a broken frontend's slots named, unless now in use.
    fn release_untracked(&mut self, ids: &[BackendId]) {
        for &id in ids {
            if self.backends.values().any(|u| u.id == id)
                || self
                    .programmed
                    .values()
                    .any(|p| p.untracked_ids.contains(&id))
            {
                continue;
            }
            let _ = self.maps.remove_backend(id);
            self.backend_ids.release(id);
        }
    }

    /// Drops one frontend's reference on each backend; deletes backends
    /// nothing references any more.
    fn release_backends(&mut self, addresses: &[BackendAddress]) {
        for address in addresses {
            let Some(using) = self.backends.get_mut(address) else {
                continue;
            };
            using.frontends = using.frontends.saturating_sub(1);
            if using.frontends == 0 {
                let id = using.id;
                // A failed delete leaves a harmless unreferenced entry; the
                // next start's prune removes it.
                let _ = self.maps.remove_backend(id);
                self.backends.remove(address);
                self.backend_ids.release(id);
            }
        }
    }
}

fn limit_issue(frontend: &Frontend, map: &str, capacity: u32) -> Issue {
    Issue {
        kind: IssueKind::Limit,
        object: String::new(),
        field: "spec.ports".into(),
        reason: format!("{frontend}: the {map} map is full ({capacity} entries); raise its size"),
    }
}

fn program_issue(error: ProgramError) -> Issue {
    let (kind, field) = match &error {
        ProgramError::TooManyBackends { .. } => (IssueKind::Limit, "endpoints"),
        ProgramError::PortZero { .. } => (IssueKind::Invalid, "ports"),
        ProgramError::BackendIdOutOfRange { .. } | ProgramError::RevNatIdOutOfRange { .. } => {
            (IssueKind::Limit, "spec.ports")
        }
        ProgramError::Map { .. } => (IssueKind::Datapath, "spec.ports"),
    };
    Issue {
        kind,
        object: String::new(),
        field: field.into(),
        reason: error.to_string(),
    }
}

fn datapath_issue(map: &str, reason: String) -> Issue {
    Issue {
        kind: IssueKind::Datapath,
        object: format!("map {map}"),
        field: String::new(),
        reason,
    }
}

fn with_object(mut issue: Issue, service: &ObjectKey) -> Issue {
    if issue.object.is_empty() {
        issue.object = format!("Service {service}");
    }
    issue
}
