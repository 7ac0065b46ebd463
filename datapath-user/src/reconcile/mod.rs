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

use std::collections::BTreeSet;

// foldhash, randomly seeded per process: SipHash was a tenth of a full
// sync, and the keys (names, addresses) are chosen by users.
use foldhash::{HashMap, HashSet};

use datapath_common::maps::{BackendId, RevNatId};

use crate::{
    by_owner::ByOwner,
    k8s::{
        Issue, IssueKind, ObjectKey, ServiceTranslation,
        translate::{Claim, DesiredFrontend, conflict_issue},
    },
    maps::{LbMaps, MapFamily},
    model::{BackendAddress, Family, Frontend},
};
use std::net::{Ipv4Addr, Ipv6Addr};

mod adopt;
mod backend_table;
mod ids;
mod issues;
mod maglev;
mod program;
mod subset;

pub use ids::IdAllocator;
use issues::with_object;
use subset::fnv1a;
pub use subset::node_subset;

/// A frontend as programmed: 32 bytes and its backends' ids (a cluster
/// has tens of thousands; the backend table knows each id's address).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Programmed<A = Ipv4Addr> {
    rev_nat_id: RevNatId,
    /// The maps may not match `backends` (an interrupted or failed
    /// write): the next update rewrites the frontend.
    broken: bool,
    /// Backends this frontend holds a reference on, by id: its slots, in
    /// order, when `broken` is false. After a failed write, the union of
    /// the old and the new set (the maps may name either).
    backends: Box<[BackendId]>,
    /// What else it holds, when anything (most frontends hold nothing
    /// else, and pay one pointer).
    besides: Option<Box<HeldBesides<A>>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct HeldBesides<A> {
    /// Draining backends this frontend holds a reference on (their
    /// `BACKENDS` entries stay; no slot names them).
    draining: Vec<BackendAddress<A>>,
    /// Backend ids the maps' slots may name that no `backends` entry
    /// tracks (found broken at adoption); freed once the frontend is
    /// rewritten.
    untracked_ids: Vec<BackendId>,
}

impl<A: Family> Programmed<A> {
    fn new(
        rev_nat_id: RevNatId,
        broken: bool,
        backends: Vec<BackendId>,
        draining: Vec<BackendAddress<A>>,
        untracked_ids: Vec<BackendId>,
    ) -> Self {
        let held_besides = !draining.is_empty() || !untracked_ids.is_empty();
        Self {
            rev_nat_id,
            broken,
            backends: backends.into(),
            besides: held_besides.then(|| {
                Box::new(HeldBesides {
                    draining,
                    untracked_ids,
                })
            }),
        }
    }

    fn draining(&self) -> &[BackendAddress<A>] {
        self.besides.as_ref().map_or(&[], |b| &b.draining)
    }

    fn untracked_ids(&self) -> &[BackendId] {
        self.besides.as_ref().map_or(&[], |b| &b.untracked_ids)
    }
}

/// A backend that left a UDP frontend (not even draining any more):
/// sockets that socket-LB connected to it for that frontend must go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Departed<A = Ipv4Addr> {
    /// The frontend it left, and that frontend's incarnation.
    pub frontend: Frontend<A>,
    pub rev_nat_id: RevNatId,
    pub backend: BackendAddress<A>,
}

/// A programmed frontend with the service holding it (`holders_of`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    pub rev_nat_id: RevNatId,
    pub service: ObjectKey,
    /// Which of the service's fields asked for it (a nodePort frontend's
    /// port is the nodePort, not the service port).
    pub claim: Claim,
    pub frontend: Frontend<std::net::IpAddr>,
}

/// What an update did.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Backends that left UDP frontends.
    pub departed: Vec<Departed>,
    /// The same of IPv6 frontends.
    pub departed6: Vec<Departed<Ipv6Addr>>,
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
    pub stray_entries: usize,
    pub filter_buckets: usize,
}

pub struct Reconciler<M> {
    maps: M,
    /// What the IPv4 frontends are.
    v4: FamilyTables<Ipv4Addr>,
    /// What the IPv6 frontends are (programmed only when the maps serve
    /// IPv6: `LbMaps::serves_ipv6`).
    v6: FamilyTables<Ipv6Addr>,
    /// Backend ids, shared by both families (one `BACKENDS` array).
    backend_ids: IdAllocator,
    /// Reverse-NAT ids, shared by both families.
    rev_nat_ids: IdAllocator,
    /// Picks this node's subset of an over-limit service (a hash of the
    /// node's name), so nodes spread over all endpoints.
    node_seed: u64,
    /// The Maglev tables of frontends served from outside, shared by both
    /// families.
    maglev: maglev::MaglevTables,
}

/// A frontend served from outside, as programmed: its Maglev table and
/// the backend ids it was built for (sorted).
#[derive(Clone, Debug, PartialEq, Eq)]
struct NorthSouth {
    table: u32,
    set: Box<[BackendId]>,
}

/// One address family's frontends and backends: what is programmed, who
/// holds each frontend, what adoption found. Frontends of one family
/// balance over backends of that family only.
pub(super) struct FamilyTables<A: Family> {
    programmed: HashMap<Frontend<A>, Programmed<A>>,
    backends: backend_table::BackendTable<A>,
    /// Which service holds each frontend, and by what claim (a stronger
    /// claim takes it over: `Claim`).
    owner: HashMap<Frontend<A>, (ObjectKey, Claim)>,
    /// The frontends each service holds (`owner` names it), found by
    /// that service.
    held: ByOwner<Frontend<A>>,
    /// Services that asked for a frontend someone else holds.
    waiting: HashMap<Frontend<A>, BTreeSet<ObjectKey>>,
    /// Filled by `program`/`remove`, handed out with the next `Outcome`.
    departed: Vec<Departed<A>>,
    /// Backends adoption found that no slot names, by address (the first
    /// sync takes them back into use under the same id).
    adopted_by_address: HashMap<BackendAddress<A>, BackendId>,
    /// Entries found in the maps at adoption that no slot names; freed by
    /// `prune` unless the first sync takes them into use (a draining
    /// backend keeps its id across an agent restart this way).
    adopted_unused_backends: Vec<BackendId>,
    /// Reverse-NAT entries adoption found unused, each whose address and
    /// port no other unused entry has: a frontend at that address gets
    /// its id back (the service map was made afresh, the reverse-NAT map
    /// kept), so that the flows conntrack holds for it, which name the
    /// id, keep their backends.
    adopted_rev_nat_by_address: HashMap<(A, u16), RevNatId>,
    /// Reverse-NAT entries adoption found unused; cleared by `prune`
    /// unless a frontend took the id meanwhile.
    adopted_unused_rev_nats: Vec<RevNatId>,
    /// Service-map entries naming no frontend this build knows.
    stray_entries: Vec<A::ServiceKey>,
    /// Frontends with `sessionAffinity: ClientIP` as written to the
    /// maps: the timeout in seconds (few frontends have one), or
    /// `AFFINITY_UNKNOWN`.
    affinity: HashMap<Frontend<A>, u32>,
    /// Backend ids whose delete failed: out of use until a retry works.
    undeleted: Vec<BackendId>,
    /// Frontends served from outside (`MAGLEV_TABLE_OF` names a table).
    north_south: HashMap<Frontend<A>, NorthSouth>,
}

/// `FamilyTables::affinity` of a frontend whose affinity in the maps is
/// not known (found with one at adoption: written by an earlier agent;
/// or a write that failed): no timeout a service can ask for, so the next
/// update writes what it asks.
const AFFINITY_UNKNOWN: u32 = 0;

impl<A: Family> Default for FamilyTables<A> {
    fn default() -> Self {
        Self {
            programmed: HashMap::default(),
            backends: Default::default(),
            owner: HashMap::default(),
            held: Default::default(),
            waiting: HashMap::default(),
            departed: Vec::new(),
            adopted_by_address: HashMap::default(),
            adopted_unused_backends: Vec::new(),
            adopted_rev_nat_by_address: HashMap::default(),
            adopted_unused_rev_nats: Vec::new(),
            stray_entries: Vec::new(),
            affinity: HashMap::default(),
            undeleted: Vec::new(),
            north_south: HashMap::default(),
        }
    }
}

/// What one family's tables say about the ids both families share.
pub(super) trait HoldsIds {
    /// A backend entry of this family has `id`, or a broken frontend's
    /// slot names it (a scan of the frontends: for the rare rewrite of a
    /// broken one; bulk checks take the sets below).
    fn holds_backend_id(&self, id: BackendId) -> bool;
    /// A backend entry of this family has `id`.
    fn has_backend(&self, id: BackendId) -> bool;
    /// The backend ids broken frontends' slots may name.
    fn untracked_backend_ids(&self) -> HashSet<BackendId>;
    /// The reverse-NAT ids programmed frontends have.
    fn rev_nat_ids(&self) -> HashSet<RevNatId>;
}

impl<A: Family> HoldsIds for FamilyTables<A> {
    fn holds_backend_id(&self, id: BackendId) -> bool {
        self.backends.holds_id(id)
            || self
                .programmed
                .values()
                .any(|p| p.untracked_ids().contains(&id))
    }
    fn has_backend(&self, id: BackendId) -> bool {
        self.backends.holds_id(id)
    }
    fn untracked_backend_ids(&self) -> HashSet<BackendId> {
        self.programmed
            .values()
            .flat_map(|p| p.untracked_ids().iter().copied())
            .collect()
    }
    fn rev_nat_ids(&self) -> HashSet<RevNatId> {
        self.programmed.values().map(|p| p.rev_nat_id).collect()
    }
}

/// One family's tables with what both families share, borrowed apart,
/// so that one code path programs either family.
pub(super) struct FamilyView<'r, M, A: Family> {
    maps: &'r mut M,
    t: &'r mut FamilyTables<A>,
    /// The other family's tables: ids are shared.
    other: &'r dyn HoldsIds,
    backend_ids: &'r mut IdAllocator,
    rev_nat_ids: &'r mut IdAllocator,
    node_seed: u64,
    maglev: &'r mut maglev::MaglevTables,
}

/// A family the reconciler programs: its tables (with what both families
/// share) and which of a translation's frontends are its.
pub(super) trait TableFamily: MapFamily {
    fn view<M>(reconciler: &mut Reconciler<M>) -> FamilyView<'_, M, Self>;
    fn desired(translation: &ServiceTranslation) -> &[DesiredFrontend<Self>];
}

impl TableFamily for Ipv4Addr {
    fn view<M>(r: &mut Reconciler<M>) -> FamilyView<'_, M, Self> {
        FamilyView {
            maps: &mut r.maps,
            t: &mut r.v4,
            other: &r.v6,
            backend_ids: &mut r.backend_ids,
            rev_nat_ids: &mut r.rev_nat_ids,
            node_seed: r.node_seed,
            maglev: &mut r.maglev,
        }
    }
    fn desired(translation: &ServiceTranslation) -> &[DesiredFrontend<Self>] {
        &translation.frontends
    }
}

impl TableFamily for Ipv6Addr {
    fn view<M>(r: &mut Reconciler<M>) -> FamilyView<'_, M, Self> {
        FamilyView {
            maps: &mut r.maps,
            t: &mut r.v6,
            other: &r.v4,
            backend_ids: &mut r.backend_ids,
            rev_nat_ids: &mut r.rev_nat_ids,
            node_seed: r.node_seed,
            maglev: &mut r.maglev,
        }
    }
    fn desired(translation: &ServiceTranslation) -> &[DesiredFrontend<Self>] {
        &translation.frontends6
    }
}

impl<M: LbMaps> Reconciler<M> {
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

    /// Frontends currently programmed (both families).
    pub fn frontend_count(&self) -> usize {
        self.v4.programmed.len() + self.v6.programmed.len()
    }

    /// Backend entries currently in use (both families).
    pub fn backend_count(&self) -> usize {
        self.v4.backends.len() + self.v6.backends.len()
    }

    /// The frontends (both families) whose reverse-NAT id is in `ids`,
    /// each with the service holding it: what `/metrics` labels their
    /// counters with. A scan of every frontend, made once a scrape (and
    /// only when something was counted), never on the change path.
    pub fn holders_of(&self, ids: &HashSet<RevNatId>) -> Vec<Holder> {
        fn family<A: Family>(t: &FamilyTables<A>, ids: &HashSet<RevNatId>, out: &mut Vec<Holder>) {
            for (frontend, programmed) in &t.programmed {
                if !ids.contains(&programmed.rev_nat_id) {
                    continue;
                }
                if let Some((service, claim)) = t.owner.get(frontend) {
                    out.push(Holder {
                        rev_nat_id: programmed.rev_nat_id,
                        service: service.clone(),
                        claim: *claim,
                        frontend: Frontend {
                            address: frontend.address.into(),
                            port: frontend.port,
                            protocol: frontend.protocol,
                        },
                    });
                }
            }
        }
        let mut out = Vec::new();
        if !ids.is_empty() {
            family(&self.v4, ids, &mut out);
            family(&self.v6, ids, &mut out);
        }
        out
    }

    /// Maglev tables in use (shared ones once) and the map's room for
    /// them.
    pub fn maglev_tables_in_use(&self) -> (usize, u32) {
        (self.maglev.in_use(), self.maglev.capacity())
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
        Ipv4Addr::view(self).update(
            service,
            Ipv4Addr::desired(translation),
            keep_dropped,
            &mut outcome,
        );
        outcome.departed = std::mem::take(&mut self.v4.departed);
        // Maps without room for IPv6 frontends never held one: the
        // translation says the service's IPv6 family is not served.
        let desired6 = if self.maps.serves_ipv6() {
            Ipv6Addr::desired(translation)
        } else {
            &[]
        };
        Ipv6Addr::view(self).update(service, desired6, keep_dropped, &mut outcome);
        outcome.departed6 = std::mem::take(&mut self.v6.departed);
        outcome
    }
}

impl<M: LbMaps, A: TableFamily> FamilyView<'_, M, A> {
    /// `update_service_keeping` of this family's frontends.
    fn update(
        &mut self,
        service: &ObjectKey,
        desired: &[DesiredFrontend<A>],
        keep_dropped: bool,
        outcome: &mut Outcome,
    ) {
        self.retry_undeleted();
        let wanted: BTreeSet<Frontend<A>> = desired.iter().map(|d| d.frontend).collect();
        let previously: BTreeSet<Frontend<A>> = self.held_by(service).collect();
        // A service that no longer asks stops waiting.
        for frontend in previously.iter().chain(self.waiting_for(service).iter()) {
            if !wanted.contains(frontend)
                && let Some(waiters) = self.t.waiting.get_mut(frontend)
            {
                waiters.remove(service);
                if waiters.is_empty() {
                    self.t.waiting.remove(frontend);
                }
            }
        }
        let mut held = BTreeSet::new();
        for desired in desired {
            let frontend = desired.frontend;
            match self.t.owner.get(&frontend) {
                Some((owner, claim)) if owner != service && desired.claim < *claim => {
                    // A stronger claim (a ClusterIP over an address anyone
                    // may write in `externalIPs`): the holder loses the
                    // frontend, waits for it, and is translated again so
                    // that it reports the conflict.
                    let holder = owner.clone();
                    self.t.held.remove(&holder, &frontend);
                    self.t
                        .waiting
                        .entry(frontend)
                        .or_default()
                        .insert(holder.clone());
                    outcome.retry.push(holder);
                }
                Some((owner, _)) if owner != service => {
                    outcome
                        .issues
                        .push(conflict_issue(service, owner, &frontend, desired.claim));
                    self.t
                        .waiting
                        .entry(frontend)
                        .or_default()
                        .insert(service.clone());
                    continue;
                }
                _ => {}
            }
            self.hold(service, frontend, desired.claim);
            held.insert(frontend);
            if let Some(waiters) = self.t.waiting.get_mut(&frontend) {
                waiters.remove(service);
                if waiters.is_empty() {
                    self.t.waiting.remove(&frontend);
                }
            }
            match self.program(
                &frontend,
                &desired.backends,
                &desired.draining,
                desired.affinity,
                desired.external.as_deref(),
            ) {
                Ok(true) => outcome.frontends_written += 1,
                Ok(false) => {}
                Err(issue) => outcome.issues.push(with_object(issue, service)),
            }
        }
        let mut dropped: Vec<Frontend<A>> = previously.difference(&held).copied().collect();
        if keep_dropped {
            held.extend(dropped.drain(..));
        }
        for frontend in &dropped {
            let claim = match self.t.owner.get(frontend) {
                Some((owner, claim)) if owner == service => *claim,
                _ => {
                    // `previously` lists only frontends the service holds.
                    debug_assert!(false, "{frontend} dropped by a service not holding it");
                    continue;
                }
            };
            self.t.held.remove(service, frontend);
            self.t.owner.remove(frontend);
            match self.remove(frontend) {
                Ok(true) => outcome.frontends_removed += 1,
                Ok(false) => {}
                Err(issue) => {
                    // Still programmed: keep holding it so a later update
                    // retries the removal.
                    self.hold(service, *frontend, claim);
                    outcome.issues.push(with_object(issue, service));
                    continue;
                }
            }
            if let Some(waiters) = self.t.waiting.get(frontend) {
                outcome.retry.extend(waiters.iter().cloned());
            }
        }
    }

    /// `service` holds `frontend` by `claim` (it held it, or no one
    /// did: a holder that loses it to a stronger claim is out of `held`
    /// already).
    fn hold(&mut self, service: &ObjectKey, frontend: Frontend<A>, claim: Claim) {
        self.t.owner.insert(frontend, (service.clone(), claim));
        let owner = &self.t.owner;
        self.t
            .held
            .insert(service, frontend, |f| owner.get(f).map(|(o, _)| o));
    }

    /// The frontends `service` holds.
    fn held_by<'a>(&'a self, service: &'a ObjectKey) -> impl Iterator<Item = Frontend<A>> + 'a {
        let owner = &self.t.owner;
        self.t
            .held
            .of(service, move |f| owner.get(f).map(|(o, _)| o))
            .copied()
    }

    fn waiting_for(&self, service: &ObjectKey) -> Vec<Frontend<A>> {
        self.t
            .waiting
            .iter()
            .filter(|(_, waiters)| waiters.contains(service))
            .map(|(f, _)| *f)
            .collect()
    }
}
