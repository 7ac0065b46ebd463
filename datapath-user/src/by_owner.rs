//! Items found by their owner, where another table already says each
//! item's owner (a slice's service, a frontend's service): the index holds
//! each item once, hashed by its owner, and a lookup filters the items
//! under that hash by the owner the other table names. 1 + `size_of::<T>()`
//! bytes per item, where a map from each owner to a list of its items
//! costs the owner's key, the list's header and its allocation (~100
//! bytes per service: 4.7 MiB for the slices of 50,000 services, 3.5 MiB
//! for their frontends).
//!
//! The other table must name an item's owner for as long as the item is
//! here (growing rehashes every item by its owner): insert after the owner
//! is recorded, remove before it is forgotten or changed. An owner's items
//! share one hash: fine for the few slices or frontends a service has; an
//! owner of thousands would make its inserts quadratic.

use std::hash::{BuildHasher, Hash};

use hashbrown::HashTable;

pub struct ByOwner<T> {
    items: HashTable<T>,
    // foldhash, randomly seeded per process: owners' names are chosen by
    // users.
    hasher: foldhash::fast::RandomState,
}

impl<T> Default for ByOwner<T> {
    fn default() -> Self {
        Self {
            items: HashTable::new(),
            hasher: foldhash::fast::RandomState::default(),
        }
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for ByOwner<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.items.iter()).finish()
    }
}

impl<T: Eq> ByOwner<T> {
    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Notes `item` as `owner`'s (once: noting it again does nothing).
    /// `owner_of` is the other table, which names `owner` for `item`
    /// already.
    pub fn insert<'o, O: Hash + ?Sized + 'o>(
        &mut self,
        owner: &O,
        item: T,
        owner_of: impl Fn(&T) -> Option<&'o O>,
    ) {
        let hash = self.hasher.hash_one(owner);
        if self.items.find(hash, |held| *held == item).is_some() {
            return;
        }
        let hasher = &self.hasher;
        self.items.insert_unique(hash, item, |held| {
            let owner = owner_of(held);
            debug_assert!(owner.is_some(), "an item whose owner is forgotten");
            owner.map_or(0, |owner| hasher.hash_one(owner))
        });
    }

    /// Forgets `item` as `owner`'s.
    pub fn remove<O: Hash + ?Sized>(&mut self, owner: &O, item: &T) {
        if let Ok(entry) = self
            .items
            .find_entry(self.hasher.hash_one(owner), |held| held == item)
        {
            entry.remove();
        }
    }

    /// `owner`'s items, in no particular order: those under its hash that
    /// `owner_of` says are its.
    pub fn of<'a, O: Hash + Eq + ?Sized + 'a>(
        &'a self,
        owner: &'a O,
        owner_of: impl Fn(&T) -> Option<&'a O> + 'a,
    ) -> impl Iterator<Item = &'a T> + 'a {
        self.items
            .iter_hash(self.hasher.hash_one(owner))
            .filter(move |item| owner_of(item) == Some(owner))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// Items are found by their owner across the index's growth (rehashed
    /// by each item's owner as the other table says), after one moves to
    /// another owner, and after removals; nothing of another owner leaks
    /// in, even under the same hash.
    #[test]
    fn items_are_found_by_their_owner_across_growth_and_moves() {
        let mut owners: HashMap<u32, String> = HashMap::new();
        let mut index = ByOwner::default();
        let owner = |i: u32| format!("svc-{}", i / 3);
        for item in 0..3000u32 {
            owners.insert(item, owner(item));
            index.insert(owner(item).as_str(), item, |i| {
                owners.get(i).map(String::as_str)
            });
        }
        index.insert("svc-5", 15, |i| owners.get(i).map(String::as_str));
        assert_eq!(index.len(), 3000, "noted once");
        let of = |index: &ByOwner<u32>, owners: &HashMap<u32, String>, o: &str| {
            let mut items: Vec<u32> = index
                .of(o, |i| owners.get(i).map(String::as_str))
                .copied()
                .collect();
            items.sort();
            items
        };
        for o in 0..1000 {
            let expected: Vec<u32> = (o * 3..o * 3 + 3).collect();
            assert_eq!(of(&index, &owners, &format!("svc-{o}")), expected);
        }
        // Item 7 moves from svc-2 to svc-3: out under the old owner first.
        index.remove("svc-2", &7);
        owners.insert(7, "svc-3".into());
        index.insert("svc-3", 7, |i| owners.get(i).map(String::as_str));
        assert_eq!(of(&index, &owners, "svc-2"), vec![6, 8]);
        assert_eq!(of(&index, &owners, "svc-3"), vec![7, 9, 10, 11]);
        index.remove("svc-3", &9);
        owners.remove(&9);
        assert_eq!(of(&index, &owners, "svc-3"), vec![7, 10, 11]);
        index.remove("svc-3", &9);
        assert_eq!(index.len(), 2999);
        assert!(of(&index, &owners, "svc-1000").is_empty(), "no such owner");
    }
}
