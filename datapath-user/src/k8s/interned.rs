//! The one copy of a value many objects repeat — port names, protocols,
//! address types, whole port lists (a cluster's services mostly expose
//! the same few: `http`/80, `https`/443, `grpc`, `metrics`) — which every
//! view holding it shares. Such values come and go with services; a set
//! is pruned of those nothing holds once it doubles.

use std::{
    collections::HashSet,
    hash::Hash,
    sync::{Arc, Mutex},
};

pub struct Interned<T: ?Sized + 'static> {
    values: Mutex<Option<Values<T>>>,
}

struct Values<T: ?Sized> {
    set: HashSet<Arc<T>>,
    /// Prune when the set reaches this size.
    prune_at: usize,
}

/// Below this many values a set is not pruned.
const PRUNE_FLOOR: usize = 1024;

impl<T: ?Sized + Hash + Eq> Interned<T> {
    pub const fn new() -> Self {
        Self {
            values: Mutex::new(None),
        }
    }

    /// The shared copy of `value`.
    pub fn get(&self, value: &T) -> Arc<T>
    where
        for<'a> Arc<T>: From<&'a T>,
    {
        let mut guard = self
            .values
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let values = guard.get_or_insert_with(|| Values {
            set: HashSet::new(),
            prune_at: PRUNE_FLOOR,
        });
        if let Some(shared) = values.set.get(value) {
            return shared.clone();
        }
        if values.set.len() >= values.prune_at {
            values.set.retain(|v| Arc::strong_count(v) > 1);
            values.prune_at = (values.set.len() * 2).max(PRUNE_FLOOR);
        }
        let shared: Arc<T> = value.into();
        values.set.insert(shared.clone());
        shared
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_values_share_one_copy_and_unheld_ones_are_pruned() {
        static LISTS: Interned<[u32]> = Interned::new();
        let (a, b) = (LISTS.get(&[80, 443]), LISTS.get(&[80, 443]));
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &LISTS.get(&[80])));
        // Past the floor, values nothing holds go; held ones stay shared.
        for i in 0..(PRUNE_FLOOR as u32 * 2) {
            LISTS.get(&[i, i]);
        }
        let size = || LISTS.values.lock().unwrap().as_ref().unwrap().set.len();
        assert!(size() < PRUNE_FLOOR + 2, "{} values kept", size());
        assert!(Arc::ptr_eq(&a, &LISTS.get(&[80, 443])));
    }
}
