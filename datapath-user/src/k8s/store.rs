//! The agent's copy of the cluster: every Service and EndpointSlice the
//! sources reported, indexed so that a change names the services whose
//! frontends it can affect.

use std::collections::BTreeSet;

// foldhash, randomly seeded per process: SipHash was a tenth of a full
// sync, and the keys (object names) are chosen by users.
use foldhash::HashMap;

use super::{
    NodeContext, Object, ObjectKey, ServiceTranslation, translate_view,
    view::{ServiceView, SliceView},
    view_table::ViewTable,
};

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
    /// Service → its slices (by the service-name label), sorted: a
    /// service has one slice or a few, and a set's node would cost ~0.5
    /// KiB per service (27 MB at 50k services).
    slices_of: HashMap<ObjectKey, Vec<ObjectKey>>,
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
                    // when it is known (equal keys, shared text).
                    let owner = match self.slices_of.get_key_value(&owner) {
                        Some((known, _)) => known.clone(),
                        None => self
                            .services
                            .get(&owner)
                            .map_or(owner, |service| service.key.clone()),
                    };
                    let slices = self.slices_of.entry(owner.clone()).or_default();
                    if let Err(at) = slices.binary_search(&key) {
                        slices.insert(at, key);
                    }
                    slice.owner = Some(owner.clone());
                    dirty.insert(owner);
                }
                self.slices.insert(slice);
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
        let Some(old) = self.slices.remove(key) else {
            return;
        };
        if let Some(owner) = old.owner {
            if let Some(slices) = self.slices_of.get_mut(&owner) {
                slices.retain(|k| k != key);
                if slices.is_empty() {
                    self.slices_of.remove(&owner);
                }
            }
            dirty.insert(owner);
        }
    }

    /// What `service` asks for now (nothing when it is gone).
    pub fn translate(&self, service: &ObjectKey, node: &NodeContext) -> ServiceTranslation {
        let Some(object) = self.services.get(service) else {
            return ServiceTranslation::default();
        };
        let slices = self
            .slices_of
            .get(service)
            .into_iter()
            .flatten()
            .filter_map(|k| self.slices.get(k));
        translate_view(object, slices, node)
    }
}
