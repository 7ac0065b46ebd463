//! A set of views found by their own key: the key is stored once, inside
//! the view, instead of again as a map's key beside it (24 bytes and a
//! share of the table's slack per object: ~3 MB at 50,000 services with
//! their slices).

use std::hash::BuildHasher;

use hashbrown::{HashTable, hash_table::Entry};

use super::{
    ObjectKey,
    view::{ServiceView, SliceView},
};

/// A view that names itself.
pub trait Keyed {
    fn key(&self) -> &ObjectKey;
}

impl Keyed for ServiceView {
    fn key(&self) -> &ObjectKey {
        &self.key
    }
}

impl Keyed for SliceView {
    fn key(&self) -> &ObjectKey {
        &self.key
    }
}

pub struct ViewTable<V> {
    views: HashTable<V>,
    // foldhash, randomly seeded per process: the keys are chosen by users.
    hasher: foldhash::fast::RandomState,
}

impl<V> Default for ViewTable<V> {
    fn default() -> Self {
        Self {
            views: HashTable::new(),
            hasher: foldhash::fast::RandomState::default(),
        }
    }
}

impl<V: std::fmt::Debug> std::fmt::Debug for ViewTable<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.views.iter()).finish()
    }
}

impl<V: Keyed> ViewTable<V> {
    fn hash(&self, key: &ObjectKey) -> u64 {
        self.hasher.hash_one(key)
    }

    pub fn len(&self) -> usize {
        self.views.len()
    }

    pub fn get(&self, key: &ObjectKey) -> Option<&V> {
        self.views.find(self.hash(key), |v| v.key() == key)
    }

    /// Adds `view`, or replaces the one with its key.
    pub fn insert(&mut self, view: V) {
        let hash = self.hash(view.key());
        let hasher = &self.hasher;
        match self.views.entry(
            hash,
            |v| v.key() == view.key(),
            |v| hasher.hash_one(v.key()),
        ) {
            Entry::Occupied(mut entry) => *entry.get_mut() = view,
            Entry::Vacant(entry) => {
                entry.insert(view);
            }
        }
    }

    pub fn remove(&mut self, key: &ObjectKey) -> Option<V> {
        let hash = self.hash(key);
        self.views
            .find_entry(hash, |v| v.key() == key)
            .ok()
            .map(|entry| entry.remove().0)
    }

    pub fn iter(&self) -> impl Iterator<Item = &V> {
        self.views.iter()
    }

    /// Removes every view `keep` rejects, handing each to `removed`.
    pub fn retain(&mut self, mut keep: impl FnMut(&V) -> bool, mut removed: impl FnMut(V)) {
        for view in self.views.extract_if(|v| !keep(v)) {
            removed(view);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(name: &str, owner: &str) -> SliceView {
        let mut labels = std::collections::BTreeMap::new();
        labels.insert(
            super::super::keys::SERVICE_NAME_LABEL.to_owned(),
            owner.to_owned(),
        );
        SliceView::from(&k8s_openapi::api::discovery::v1::EndpointSlice {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                namespace: Some("ns".into()),
                name: Some(name.into()),
                labels: Some(labels),
                ..Default::default()
            },
            address_type: "IPv4".into(),
            ..Default::default()
        })
    }

    #[test]
    fn views_are_found_replaced_and_removed_by_their_key() {
        let mut table = ViewTable::default();
        table.insert(slice("a", "x"));
        table.insert(slice("b", "x"));
        table.insert(slice("a", "y"));
        assert_eq!(table.len(), 2, "a replaced, not added");
        let a = ObjectKey::new("ns", "a");
        assert_eq!(
            table.get(&a).and_then(|s| s.owner.clone()),
            Some(ObjectKey::new("ns", "y"))
        );
        assert!(table.remove(&a).is_some());
        assert!(table.get(&a).is_none() && table.remove(&a).is_none());
        let mut gone = Vec::new();
        table.retain(|_| false, |v| gone.push(v.key.clone()));
        assert_eq!(gone, vec![ObjectKey::new("ns", "b")]);
        assert_eq!(table.len(), 0);
    }
}
