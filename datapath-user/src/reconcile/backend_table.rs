//! The backend entries in use: each backend's address, its id, and how
//! many frontends' slots name it. Programming a frontend finds a backend
//! by address; adoption and broken frontends ask whether an id is held.
//!
//! Kept by id, with an index of ids by address, rather than as a map from
//! address to id: an entry is 12 bytes in a vector plus 4 in the index
//! (at 500,000 backends 11 MiB where a map took 17: its 16-byte entries in
//! 2^20 buckets), finding by id needs no scan, and an IPv6 address would
//! grow only the vector's entries.

use std::hash::BuildHasher;

use datapath_common::maps::BackendId;
use hashbrown::HashTable;

use crate::model::{BackendAddress, Family};

/// One backend entry in use.
#[derive(Clone, Copy, Debug)]
struct InUse<A> {
    address: BackendAddress<A>,
    /// Frontends whose slots (or adopted slots) name it; at least 1.
    frontends: u32,
}

/// One family's backends (ids are shared by both families: an id is in
/// use in one table at most).
pub(super) struct BackendTable<A> {
    /// By id (ids are small: the allocator hands them out below the
    /// BACKENDS map's size).
    by_id: Vec<Option<InUse<A>>>,
    /// The ids in `by_id`, found by their backend's address.
    index: HashTable<BackendId>,
    // foldhash, randomly seeded per process: addresses are users' choice.
    hasher: foldhash::fast::RandomState,
}

impl<A> Default for BackendTable<A> {
    fn default() -> Self {
        Self {
            by_id: Vec::new(),
            index: HashTable::new(),
            hasher: foldhash::fast::RandomState::default(),
        }
    }
}

impl<A: Family> std::fmt::Debug for BackendTable<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(
                self.iter()
                    .map(|(id, address, frontends)| (id, (address, frontends))),
            )
            .finish()
    }
}

impl<A: Family> BackendTable<A> {
    pub(super) fn len(&self) -> usize {
        self.index.len()
    }

    fn entry(&self, id: BackendId) -> Option<&InUse<A>> {
        self.by_id.get(id as usize)?.as_ref()
    }

    /// The id `address` is in use under.
    pub(super) fn id_of(&self, address: &BackendAddress<A>) -> Option<BackendId> {
        let by_id = &self.by_id;
        self.index
            .find(self.hasher.hash_one(address), |&id| {
                by_id[id as usize].is_some_and(|e| e.address == *address)
            })
            .copied()
    }

    pub(super) fn contains(&self, address: &BackendAddress<A>) -> bool {
        self.id_of(address).is_some()
    }

    /// The address of the backend in use under `id`.
    pub(super) fn address_of(&self, id: BackendId) -> Option<BackendAddress<A>> {
        self.entry(id).map(|e| e.address)
    }

    /// Whether `id` is in use by any backend.
    pub(super) fn holds_id(&self, id: BackendId) -> bool {
        self.entry(id).is_some()
    }

    /// Takes one more reference on `address`'s entry, if in use.
    pub(super) fn reference(&mut self, address: &BackendAddress<A>) -> Option<BackendId> {
        let id = self.id_of(address)?;
        if let Some(entry) = self.by_id[id as usize].as_mut() {
            entry.frontends += 1;
        }
        Some(id)
    }

    /// Puts `address` in use under `id` with one reference. The caller
    /// made sure neither is in use.
    pub(super) fn insert(&mut self, address: BackendAddress<A>, id: BackendId) {
        debug_assert!(!self.contains(&address) && !self.holds_id(id));
        let at = id as usize;
        if self.by_id.len() <= at {
            self.by_id.resize(at + 1, None);
        }
        self.by_id[at] = Some(InUse {
            address,
            frontends: 1,
        });
        let (by_id, hasher) = (&self.by_id, &self.hasher);
        self.index
            .insert_unique(hasher.hash_one(address), id, |&id| {
                by_id[id as usize].map_or(0, |e| hasher.hash_one(e.address))
            });
    }

    /// Drops one reference on `address`'s entry; returns its id when that
    /// was the last one (the entry is gone from the table then).
    pub(super) fn release(&mut self, address: &BackendAddress<A>) -> Option<BackendId> {
        let id = self.id_of(address)?;
        let entry = self.by_id[id as usize].as_mut()?;
        entry.frontends = entry.frontends.saturating_sub(1);
        if entry.frontends > 0 {
            return None;
        }
        self.by_id[id as usize] = None;
        if let Ok(found) = self
            .index
            .find_entry(self.hasher.hash_one(address), |&held| held == id)
        {
            found.remove();
        }
        Some(id)
    }

    /// Every entry: id, address, references.
    pub(super) fn iter(&self) -> impl Iterator<Item = (BackendId, BackendAddress<A>, u32)> + '_ {
        self.by_id
            .iter()
            .enumerate()
            .filter_map(|(id, e)| e.map(|e| (id as BackendId, e.address, e.frontends)))
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::model::Protocol;

    fn backend(last: u8, port: u16) -> BackendAddress {
        BackendAddress {
            address: Ipv4Addr::new(10, 0, 0, last),
            port,
            protocol: Protocol::Tcp,
        }
    }

    #[test]
    fn entries_are_found_by_address_and_id_and_leave_with_their_last_reference() {
        let mut table = BackendTable::<Ipv4Addr>::default();
        let (a, b) = (backend(1, 80), backend(2, 80));
        table.insert(a, 7);
        table.insert(b, 3);
        assert_eq!(table.reference(&a), Some(7));
        assert_eq!((table.id_of(&a), table.id_of(&b)), (Some(7), Some(3)));
        assert!(table.holds_id(3) && table.holds_id(7) && !table.holds_id(4));
        assert_eq!(table.reference(&backend(1, 81)), None, "another port");
        assert_eq!(table.release(&a), None, "one reference left");
        assert_eq!(table.release(&a), Some(7), "the last one");
        assert!(!table.contains(&a) && !table.holds_id(7));
        assert_eq!(table.release(&a), None, "gone");
        assert_eq!(table.len(), 1);
        assert_eq!(table.iter().collect::<Vec<_>>(), vec![(3, b, 1)]);
        // The id and the address can be used again, apart.
        table.insert(a, 4);
        table.insert(backend(9, 80), 7);
        assert_eq!((table.id_of(&a), table.len()), (Some(4), 3));
    }

    #[test]
    fn many_entries_survive_the_index_growing() {
        let mut table = BackendTable::<Ipv4Addr>::default();
        for i in 0..10_000u32 {
            let address = BackendAddress {
                address: Ipv4Addr::from(0x0a00_0000 + i),
                port: 8080,
                protocol: Protocol::Udp,
            };
            table.insert(address, 10_000 - i);
        }
        for i in 0..10_000u32 {
            let address = BackendAddress {
                address: Ipv4Addr::from(0x0a00_0000 + i),
                port: 8080,
                protocol: Protocol::Udp,
            };
            assert_eq!(table.id_of(&address), Some(10_000 - i));
        }
    }
}
