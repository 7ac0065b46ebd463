//! What the reconciler needs from the maps, the errors of writing a
//! service, and the rules every implementation checks first.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::maps::MapError;
use datapath_common::maps::{self as m, BackendId, RevNatId, ServiceKey, ServiceKey6};

use crate::model::{BackendAddress, BackendEntry, Family, Frontend};

#[derive(Debug, thiserror::Error)]
pub enum ProgramError {
    #[error(
        "{frontend}: {count} backends exceed the limit of {max} per service; this node serves its own subset of {max} (set --node-name so that every node picks a different one)"
    )]
    TooManyBackends {
        frontend: Frontend<IpAddr>,
        count: usize,
        max: u16,
    },
    #[error(
        "{frontend}: backend id {id} is outside 1..{capacity} (the BACKENDS map's size: raise it with --backends-max)"
    )]
    BackendIdOutOfRange {
        frontend: Frontend<IpAddr>,
        id: BackendId,
        capacity: u32,
    },
    #[error(
        "{frontend}: reverse-NAT id {id} is outside 1..{capacity} (one id per frontend, the REVERSE_NAT map's size: raise it with --frontends-max)"
    )]
    RevNatIdOutOfRange {
        frontend: Frontend<IpAddr>,
        id: RevNatId,
        capacity: u32,
    },
    #[error(
        "{frontend}: no free block of {needed} backend slots ({taken} of the SLOTS map's {capacity} are taken: raise it with --backend-slots-max)"
    )]
    SlotsFull {
        frontend: Frontend<IpAddr>,
        needed: u32,
        capacity: u32,
        taken: u64,
    },
    #[error("{frontend}: port 0 is not a valid {what} port")]
    PortZero {
        frontend: Frontend<IpAddr>,
        what: &'static str,
    },
    #[error("{frontend}: writing {map}: {}", crate::error::with_causes(&**.error))]
    Map {
        frontend: Frontend<IpAddr>,
        map: &'static str,
        error: Box<MapError>,
    },
}

/// What the reconciler needs from the maps; implemented by the real pinned
/// maps ([`super::DatapathMaps`]) and by [`super::FakeMaps`].
pub trait LbMaps {
    /// Sizes of the id spaces: ids are `1..capacity`.
    fn backend_capacity(&self) -> u32;
    fn rev_nat_capacity(&self) -> u32;
    /// Reads every service, backend and reverse-NAT entry.
    fn dump(&self) -> Result<MapDump, MapError>;
    /// Learns which slots each frontend found in the maps owns, parting
    /// frontends that share them (before `dump`, at adoption).
    fn learn_slot_blocks(&mut self) -> Result<(), MapError> {
        Ok(())
    }
    /// Programs `frontend` to balance over `backends` (in slot order),
    /// replacing what it had, make-before-break. Backends no longer used
    /// by any frontend are the caller's to delete (`remove_backend`).
    fn set_service(
        &mut self,
        frontend: &Frontend,
        rev_nat_id: RevNatId,
        backends: &[BackendEntry],
    ) -> Result<(), ProgramError>;
    /// Removes `frontend`: new flows stop first, then its slots go.
    fn remove_service(&mut self, frontend: &Frontend) -> Result<(), ProgramError>;
    /// Whether the IPv6 maps can hold frontends (the datapath was loaded
    /// with them sized, `MapSizes::ipv6`); the reconciler programs IPv6
    /// frontends only then.
    fn serves_ipv6(&self) -> bool;
    /// `set_service` of an IPv6 frontend: its backends' addresses go to
    /// `BACKEND_ADDRS6` before their `BACKENDS` entries (flagged IPv6)
    /// name them; slots, ids and blocks are shared with IPv4.
    fn set_service6(
        &mut self,
        frontend: &Frontend<Ipv6Addr>,
        rev_nat_id: RevNatId,
        backends: &[BackendEntry<Ipv6Addr>],
    ) -> Result<(), ProgramError>;
    /// `remove_service` of an IPv6 frontend.
    fn remove_service6(&mut self, frontend: &Frontend<Ipv6Addr>) -> Result<(), ProgramError>;
    /// `remove_rev_nat` of the IPv6 table (`REVERSE_NAT6`).
    fn remove_rev_nat6(&mut self, id: RevNatId) -> Result<(), MapError>;
    /// `restore_rev_nat` of an IPv6 frontend.
    fn restore_rev_nat6(
        &mut self,
        id: RevNatId,
        frontend: &Frontend<Ipv6Addr>,
    ) -> Result<(), MapError>;
    /// `remove_service_key` of `SERVICES6`.
    fn remove_service_key6(&mut self, key: &ServiceKey6) -> Result<(), MapError>;
    /// Gives frontend `rev_nat_id` `sessionAffinity: ClientIP` with a
    /// timeout of `seconds` over `backends` (the ids its slots name
    /// now), or takes it away (`None`): its `AFFINITY_TIMEOUT` entry, and
    /// an `AFFINITY_MATCH` entry per backend (added for new ones, removed
    /// for those that left, whose clients then re-balance). Called after
    /// `set_service` and before any backend that left is deleted (a client
    /// must never be kept on an id that could name another pod), and with
    /// `None` before a removed frontend's id is freed.
    fn set_affinity(
        &mut self,
        rev_nat_id: RevNatId,
        affinity: Option<(u32, &[BackendId])>,
    ) -> Result<(), MapError>;
    /// Takes affinity from every frontend `keep` says no (what a previous
    /// agent wrote for frontends gone or changed since; the first full
    /// sync's prune). Returns how many lost it.
    fn prune_affinity(&mut self, keep: &dyn Fn(RevNatId) -> bool) -> Result<usize, MapError>;
    /// Zeroes the per-frontend counters of every id `keep` says no to
    /// (what frontends gone since a previous agent counted; the first full
    /// sync's prune). `remove_service` and a new incarnation in
    /// `set_service` zero the counters of an id they clear themselves.
    /// Returns how many were zeroed. By default there are none to keep.
    fn prune_service_counters(
        &mut self,
        _keep: &dyn Fn(RevNatId) -> bool,
    ) -> Result<usize, MapError> {
        Ok(0)
    }
    /// The Maglev tables these maps hold (none by default).
    fn maglev_tables(&self) -> MaglevSettings {
        MaglevSettings::default()
    }
    /// Writes Maglev table `table`: entry i's backend id. Written whole
    /// before any frontend is pointed at it.
    fn write_maglev_table(
        &mut self,
        _table: u32,
        _backend_ids: &[BackendId],
    ) -> Result<(), MapError> {
        Ok(())
    }
    /// Points frontend `rev_nat_id`'s flows from outside at Maglev table
    /// `table`, or (`None`) leaves them to the node's stack. Called after
    /// `set_service`, and with `None` before a removed frontend's id is
    /// freed.
    fn set_maglev_table_of(
        &mut self,
        _rev_nat_id: RevNatId,
        _table: Option<u32>,
    ) -> Result<(), MapError> {
        Ok(())
    }
    /// Deletes a backend no frontend uses any more (and first every
    /// `AFFINITY_MATCH` entry naming it: no client is ever kept on an id
    /// that could be handed to another pod, whatever affinity write
    /// failed before).
    fn remove_backend(&mut self, id: BackendId) -> Result<(), MapError>;
    /// Clears a reverse-NAT entry no frontend uses. (Its id's affinity is
    /// the caller's to take when it frees the id: the other family may
    /// hold it. `remove_service` and a new incarnation in `set_service`
    /// take the affinity of an id they clear themselves.)
    fn remove_rev_nat(&mut self, id: RevNatId) -> Result<(), MapError>;
    /// Writes `frontend`'s reverse-NAT entry alone (found missing at
    /// adoption: the table was made afresh).
    fn restore_rev_nat(&mut self, id: RevNatId, frontend: &Frontend) -> Result<(), MapError>;
    /// Deletes one `SERVICES` entry (one naming no frontend, found by
    /// `dump`).
    fn remove_service_key(&mut self, key: &ServiceKey) -> Result<(), MapError>;
    /// Makes the frontend filter (shared by both families) count exactly
    /// `frontends` and `frontends6`; returns how many buckets changed.
    fn rebuild_filter(
        &mut self,
        frontends: &[Frontend],
        frontends6: &[Frontend<Ipv6Addr>],
    ) -> Result<usize, MapError>;
    /// From now until `flush`, `set_service` may only note a frontend the
    /// maps do not hold yet, to write all such frontends at once
    /// (`super::bulk`). By default every write is made at once.
    fn defer_new_frontends(&mut self) {}
    /// Writes what was noted and stops noting; returns the frontends that
    /// could not be written (`set_service` said Ok for them).
    fn flush(&mut self) -> Vec<(Frontend, ProgramError)> {
        Vec::new()
    }
    /// Lets go of memory mapped for reading (after adoption's `dump`,
    /// which may be long before the first sync's `flush`).
    fn unmap(&mut self) {}
    /// Returns once every program run that began before the call has
    /// finished (an entry cleared before it is read by none of them any
    /// more); false when that cannot be known.
    fn wait_for_readers(&mut self) -> bool {
        true
    }
}

/// A reconciler may borrow its maps (the agent keeps them).
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
    fn learn_slot_blocks(&mut self) -> Result<(), MapError> {
        (**self).learn_slot_blocks()
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
    fn serves_ipv6(&self) -> bool {
        (**self).serves_ipv6()
    }
    fn set_service6(
        &mut self,
        frontend: &Frontend<Ipv6Addr>,
        rev_nat_id: RevNatId,
        backends: &[BackendEntry<Ipv6Addr>],
    ) -> Result<(), ProgramError> {
        (**self).set_service6(frontend, rev_nat_id, backends)
    }
    fn remove_service6(&mut self, frontend: &Frontend<Ipv6Addr>) -> Result<(), ProgramError> {
        (**self).remove_service6(frontend)
    }
    fn remove_rev_nat6(&mut self, id: RevNatId) -> Result<(), MapError> {
        (**self).remove_rev_nat6(id)
    }
    fn restore_rev_nat6(
        &mut self,
        id: RevNatId,
        frontend: &Frontend<Ipv6Addr>,
    ) -> Result<(), MapError> {
        (**self).restore_rev_nat6(id, frontend)
    }
    fn remove_service_key6(&mut self, key: &ServiceKey6) -> Result<(), MapError> {
        (**self).remove_service_key6(key)
    }
    fn set_affinity(
        &mut self,
        rev_nat_id: RevNatId,
        affinity: Option<(u32, &[BackendId])>,
    ) -> Result<(), MapError> {
        (**self).set_affinity(rev_nat_id, affinity)
    }
    fn prune_affinity(&mut self, keep: &dyn Fn(RevNatId) -> bool) -> Result<usize, MapError> {
        (**self).prune_affinity(keep)
    }
    fn prune_service_counters(
        &mut self,
        keep: &dyn Fn(RevNatId) -> bool,
    ) -> Result<usize, MapError> {
        (**self).prune_service_counters(keep)
    }
    fn maglev_tables(&self) -> MaglevSettings {
        (**self).maglev_tables()
    }
    fn write_maglev_table(
        &mut self,
        table: u32,
        backend_ids: &[BackendId],
    ) -> Result<(), MapError> {
        (**self).write_maglev_table(table, backend_ids)
    }
    fn set_maglev_table_of(
        &mut self,
        rev_nat_id: RevNatId,
        table: Option<u32>,
    ) -> Result<(), MapError> {
        (**self).set_maglev_table_of(rev_nat_id, table)
    }
    fn remove_backend(&mut self, id: BackendId) -> Result<(), MapError> {
        (**self).remove_backend(id)
    }
    fn remove_rev_nat(&mut self, id: RevNatId) -> Result<(), MapError> {
        (**self).remove_rev_nat(id)
    }
    fn restore_rev_nat(&mut self, id: RevNatId, frontend: &Frontend) -> Result<(), MapError> {
        (**self).restore_rev_nat(id, frontend)
    }
    fn remove_service_key(&mut self, key: &ServiceKey) -> Result<(), MapError> {
        (**self).remove_service_key(key)
    }
    fn rebuild_filter(
        &mut self,
        frontends: &[Frontend],
        frontends6: &[Frontend<Ipv6Addr>],
    ) -> Result<usize, MapError> {
        (**self).rebuild_filter(frontends, frontends6)
    }
    fn defer_new_frontends(&mut self) {
        (**self).defer_new_frontends()
    }
    fn flush(&mut self) -> Vec<(Frontend, ProgramError)> {
        (**self).flush()
    }
    fn unmap(&mut self) {
        (**self).unmap()
    }
    fn wait_for_readers(&mut self) -> bool {
        (**self).wait_for_readers()
    }
}

/// Checks what `set_service` would write, before anything is written;
/// returns the backend count. Shared with the in-memory map fake so both
/// refuse the same input.
pub fn validate_service<A: Family>(
    frontend: &Frontend<A>,
    rev_nat_id: RevNatId,
    backends: &[BackendEntry<A>],
    backend_capacity: u32,
    rev_nat_capacity: u32,
) -> Result<u16, ProgramError> {
    let count = u16::try_from(backends.len())
        .ok()
        .filter(|&n| n <= m::MAX_BACKENDS_PER_SERVICE)
        .ok_or(ProgramError::TooManyBackends {
            frontend: frontend.erased(),
            count: backends.len(),
            max: m::MAX_BACKENDS_PER_SERVICE,
        })?;
    if rev_nat_id == 0 || rev_nat_id >= rev_nat_capacity {
        return Err(ProgramError::RevNatIdOutOfRange {
            frontend: frontend.erased(),
            id: rev_nat_id,
            capacity: rev_nat_capacity,
        });
    }
    if frontend.port == 0 {
        return Err(ProgramError::PortZero {
            frontend: frontend.erased(),
            what: "service",
        });
    }
    for backend in backends {
        if backend.id == 0 || backend.id >= backend_capacity {
            return Err(ProgramError::BackendIdOutOfRange {
                frontend: frontend.erased(),
                id: backend.id,
                capacity: backend_capacity,
            });
        }
        if backend.port == 0 {
            return Err(ProgramError::PortZero {
                frontend: frontend.erased(),
                what: "backend",
            });
        }
    }
    Ok(count)
}

/// A frontend as found in the maps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DumpedFrontend<A = std::net::Ipv4Addr> {
    pub frontend: Frontend<A>,
    pub rev_nat_id: RevNatId,
    /// Slots 1..=count in order; `None` where a slot is missing (an
    /// interrupted write: the frontend must be re-programmed).
    pub slots: Vec<Option<BackendId>>,
}

/// Everything the service maps hold (not conntrack).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapDump {
    pub frontends: Vec<DumpedFrontend>,
    /// `SERVICES` entries that name no frontend (a protocol this build
    /// does not know).
    pub stray_entries: Vec<ServiceKey>,
    pub backends: Vec<(BackendId, BackendAddress)>,
    /// Present reverse-NAT entries: the service address replies get.
    pub rev_nats: Vec<(RevNatId, std::net::SocketAddrV4)>,
    /// The same of the IPv6 maps (`SERVICES6`, the `BACKENDS` entries
    /// flagged IPv6 with their `BACKEND_ADDRS6` addresses, `REVERSE_NAT6`).
    pub frontends6: Vec<DumpedFrontend<std::net::Ipv6Addr>>,
    pub stray_entries6: Vec<m::ServiceKey6>,
    pub backends6: Vec<(BackendId, BackendAddress<std::net::Ipv6Addr>)>,
    pub rev_nats6: Vec<(RevNatId, std::net::SocketAddrV6)>,
    /// Reverse-NAT ids (either family) with a `sessionAffinity` timeout.
    pub affine: Vec<RevNatId>,
    /// Reverse-NAT ids served from outside, with their Maglev table.
    pub maglev_tables_of: Vec<(RevNatId, u32)>,
    /// The backend ids each of those tables names (sorted, once each).
    pub maglev_sets: Vec<(u32, Vec<BackendId>)>,
}

/// The Maglev tables the maps hold for frontends served from outside
/// (`datapath_common::maps::north_south`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MaglevSettings {
    /// Tables (0: nothing is served from outside).
    pub tables: u32,
    /// Entries each.
    pub table_size: u32,
    /// The cluster's seed.
    pub seed: u64,
}

/// One family's calls on the maps, so that the reconciler writes either
/// family with one code path (`set_service` or `set_service6`, …).
pub trait MapFamily: Family {
    /// The family's service map and reverse-NAT map, as issues name them.
    const SERVICES_MAP: &'static str;
    const REVERSE_NAT_MAP: &'static str;

    fn set_service<M: LbMaps + ?Sized>(
        maps: &mut M,
        frontend: &Frontend<Self>,
        rev_nat_id: RevNatId,
        backends: &[BackendEntry<Self>],
    ) -> Result<(), ProgramError>;
    fn remove_service<M: LbMaps + ?Sized>(
        maps: &mut M,
        frontend: &Frontend<Self>,
    ) -> Result<(), ProgramError>;
    fn remove_rev_nat<M: LbMaps + ?Sized>(maps: &mut M, id: RevNatId) -> Result<(), MapError>;
    fn restore_rev_nat<M: LbMaps + ?Sized>(
        maps: &mut M,
        id: RevNatId,
        frontend: &Frontend<Self>,
    ) -> Result<(), MapError>;
    fn remove_service_key<M: LbMaps + ?Sized>(
        maps: &mut M,
        key: &Self::ServiceKey,
    ) -> Result<(), MapError>;
}

impl MapFamily for Ipv4Addr {
    const SERVICES_MAP: &'static str = m::SERVICES_MAP;
    const REVERSE_NAT_MAP: &'static str = m::REVERSE_NAT_MAP;

    fn set_service<M: LbMaps + ?Sized>(
        maps: &mut M,
        frontend: &Frontend,
        rev_nat_id: RevNatId,
        backends: &[BackendEntry],
    ) -> Result<(), ProgramError> {
        maps.set_service(frontend, rev_nat_id, backends)
    }
    fn remove_service<M: LbMaps + ?Sized>(
        maps: &mut M,
        frontend: &Frontend,
    ) -> Result<(), ProgramError> {
        maps.remove_service(frontend)
    }
    fn remove_rev_nat<M: LbMaps + ?Sized>(maps: &mut M, id: RevNatId) -> Result<(), MapError> {
        maps.remove_rev_nat(id)
    }
    fn restore_rev_nat<M: LbMaps + ?Sized>(
        maps: &mut M,
        id: RevNatId,
        frontend: &Frontend,
    ) -> Result<(), MapError> {
        maps.restore_rev_nat(id, frontend)
    }
    fn remove_service_key<M: LbMaps + ?Sized>(
        maps: &mut M,
        key: &ServiceKey,
    ) -> Result<(), MapError> {
        maps.remove_service_key(key)
    }
}

impl MapFamily for Ipv6Addr {
    const SERVICES_MAP: &'static str = m::SERVICES6_MAP;
    const REVERSE_NAT_MAP: &'static str = m::REVERSE_NAT6_MAP;

    fn set_service<M: LbMaps + ?Sized>(
        maps: &mut M,
        frontend: &Frontend<Ipv6Addr>,
        rev_nat_id: RevNatId,
        backends: &[BackendEntry<Ipv6Addr>],
    ) -> Result<(), ProgramError> {
        maps.set_service6(frontend, rev_nat_id, backends)
    }
    fn remove_service<M: LbMaps + ?Sized>(
        maps: &mut M,
        frontend: &Frontend<Ipv6Addr>,
    ) -> Result<(), ProgramError> {
        maps.remove_service6(frontend)
    }
    fn remove_rev_nat<M: LbMaps + ?Sized>(maps: &mut M, id: RevNatId) -> Result<(), MapError> {
        maps.remove_rev_nat6(id)
    }
    fn restore_rev_nat<M: LbMaps + ?Sized>(
        maps: &mut M,
        id: RevNatId,
        frontend: &Frontend<Ipv6Addr>,
    ) -> Result<(), MapError> {
        maps.restore_rev_nat6(id, frontend)
    }
    fn remove_service_key<M: LbMaps + ?Sized>(
        maps: &mut M,
        key: &ServiceKey6,
    ) -> Result<(), MapError> {
        maps.remove_service_key6(key)
    }
}
