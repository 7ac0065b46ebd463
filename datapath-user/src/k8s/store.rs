//! The agent's copy of the cluster: every Service and EndpointSlice the
//! sources reported, indexed so that a change names the services whose
//! frontends it can affect.

use std::collections::BTreeSet;

use super::{
    NodeContext, Object, ObjectKey, ServiceTranslation, translate_view,
    view::{ServiceView, SliceView},
    view_table::ViewTable,
};
use crate::by_owner::ByOwner;

/// The kinds a source reports on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Service,
    EndpointSlice,
}

/// What a source reports.
#[derive(Clone, Debug)]
pub enum Change {
    /// Created or updated.
    Applied(Object),
    Deleted(Kind, ObjectKey),
    /// The complete current set of one kind (a (re)list, or a directory
    /// re-read): objects not in it are gone.
    Replaced(Kind, Vec<Object>),
}

#[derive(Debug, Default)]
pub struct Store {
    services: ViewTable<ServiceView>,
    slices: ViewTable<SliceView>,
    /// The keys of slices with an owner (the service-name label), found
    /// by that owner (`slices` names it).
    slices_of: ByOwner<ObjectKey>,
}

impl Store {
    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    pub fn slice_count(&self) -> usize {
        self.slices.len()
    }

    pub fn service_keys(&self) -> impl Iterator<Item = &ObjectKey> {
        self.services.iter().map(|s| &s.key)
    }

    /// The service `key` names, as translation reads it.
    pub fn service(&self, key: &ObjectKey) -> Option<&ServiceView> {
        self.services.get(key)
    }

    /// Applies `change`; returns the services to translate again.
    pub fn apply(&mut self, change: Change) -> BTreeSet<ObjectKey> {
        let mut dirty = BTreeSet::new();
        match change {
            Change::Applied(object) => self.upsert(object, &mut dirty),
            Change::Deleted(kind, key) => self.delete(kind, &key, &mut dirty),
            Change::Replaced(kind, objects) => {
                let mut keep = foldhash::HashSet::default();
                for object in objects {
                    keep.insert(object.key().clone());
                    self.upsert(object, &mut dirty);
                }
                match kind {
                    Kind::Service => self.services.retain(
                        |s| keep.contains(&s.key),
                        |s| {
                            dirty.insert(s.key);
                        },
                    ),
                    Kind::EndpointSlice => {
                        let gone: Vec<ObjectKey> = self
                            .slices
                            .iter()
                            .filter(|s| !keep.contains(&s.key))
                            .map(|s| s.key.clone())
                            .collect();
                        for key in gone {
                            self.remove_slice(&key, &mut dirty);
                        }
                    }
                }
            }
        }
        dirty
    }

    fn upsert(&mut self, object: Object, dirty: &mut BTreeSet<ObjectKey>) {
        match object {
            Object::Service(service) => {
                if self.services.get(&service.key) != Some(&service) {
                    dirty.insert(service.key.clone());
                    self.services.insert(service);
                }
            }
            Object::EndpointSlice(mut slice) => {
                let key = slice.key.clone();
                if self.slices.get(&key) == Some(&slice) {
                    return;
                }
                // Its owner may have changed (relabelled): both are dirty.
                self.remove_slice(&key, dirty);
                if let Some(owner) = slice.owner.take() {
                    // One copy of the owner's name: the service's own key
                    // when it is known, else another slice's (equal keys,
                    // shared text).
                    let known = match self.services.get(&owner) {
                        Some(service) => Some(service.key.clone()),
                        None => self
                            .slices_of_owner(&owner)
                            .next()
                            .and_then(|other| other.owner.clone()),
                    };
                    let owner = known.unwrap_or(owner);
                    slice.owner = Some(owner.clone());
                    self.slices.insert(slice);
                    let slices = &self.slices;
                    self.slices_of.insert(&owner, key, |key| {
                        slices.get(key).and_then(|s| s.owner.as_ref())
                    });
                    dirty.insert(owner);
                } else {
                    self.slices.insert(slice);
                }
            }
        }
    }

    fn delete(&mut self, kind: Kind, key: &ObjectKey, dirty: &mut BTreeSet<ObjectKey>) {
        match kind {
            Kind::Service => {
                if self.services.remove(key).is_some() {
                    dirty.insert(key.clone());
                }
            }
            Kind::EndpointSlice => self.remove_slice(key, dirty),
        }
    }

    fn remove_slice(&mut self, key: &ObjectKey, dirty: &mut BTreeSet<ObjectKey>) {
        // Out of the owner index while the slice still names its owner.
        if let Some(owner) = self.slices.get(key).and_then(|s| s.owner.clone()) {
            self.slices_of.remove(&owner, key);
            dirty.insert(owner);
        }
        self.slices.remove(key);
    }

    /// What `service` asks for now (nothing when it is gone).
    pub fn translate(&self, service: &ObjectKey, node: &NodeContext) -> ServiceTranslation {
        let Some(object) = self.services.get(service) else {
            return ServiceTranslation::default();
        };
        // In name order, whatever order the index holds them in.
        let mut slices: Vec<&SliceView> = self.slices_of_owner(service).collect();
        slices.sort_unstable_by(|a, b| a.key.cmp(&b.key));
        translate_view(object, slices, node)
    }

    /// The slices whose service-name label names `owner`.
    fn slices_of_owner<'a>(&'a self, owner: &'a ObjectKey) -> impl Iterator<Item = &'a SliceView> {
        let slices = &self.slices;
        self.slices_of
            .of(owner, move |key| {
                slices.get(key).and_then(|s| s.owner.as_ref())
            })
            .filter_map(move |key| slices.get(key))
    }
}
