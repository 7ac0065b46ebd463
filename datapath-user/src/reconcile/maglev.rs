//! Which Maglev table each frontend served from outside uses. A table is
//! built from a backend set (`datapath_common::maglev::build_table`), so
//! frontends with the same set share one: a service port's nodePort at
//! each node address, its load-balancer and external IPs. A table no set
//! uses any more is reused as late as possible, since a packet that read a
//! frontend's old table number may still be reading it. Tables a previous
//! agent built are taken over with the set they were built for.

use std::collections::VecDeque;

use foldhash::{HashMap, HashSet};

use datapath_common::maps::BackendId;

/// The pool of tables (`MAGLEV`).
#[derive(Debug, Default)]
pub(super) struct MaglevTables {
    /// Tables the map holds (0: nothing is served from outside).
    capacity: u32,
    /// The tables in use, by the sorted backend ids they were built for,
    /// with how many frontends use each.
    by_set: HashMap<Box<[BackendId]>, (u32, u32)>,
    /// Tables no set uses, the longest unused first.
    free: VecDeque<u32>,
    /// Tables never handed out: `fresh..capacity`.
    fresh: u32,
    /// Tables a previous agent's frontends point at, never handed out
    /// fresh (they may lie beyond `fresh`).
    adopted: HashSet<u32>,
}

impl MaglevTables {
    pub(super) fn new(capacity: u32) -> Self {
        Self {
            capacity,
            ..Self::default()
        }
    }

    /// Whether any frontend can be served from outside.
    pub(super) fn enabled(&self) -> bool {
        self.capacity > 0
    }

    pub(super) fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Takes `table`, built for `set` (sorted ids) by a previous agent,
    /// for one more frontend pointing at it. False (nothing taken) when
    /// the table is beyond the map, or another set holds it.
    pub(super) fn adopt_set(&mut self, table: u32, set: &[BackendId]) -> bool {
        if table >= self.capacity {
            return false;
        }
        if let Some((held, users)) = self.by_set.get_mut(set) {
            if *held != table {
                return false;
            }
            *users += 1;
            return true;
        }
        if self.by_set.values().any(|(held, _)| *held == table) {
            return false;
        }
        self.adopted.insert(table);
        self.by_set.insert(set.into(), (table, 1));
        true
    }

    /// A table for `set` (sorted ids): the one frontends with that set
    /// share, or a free one, which the caller must write before pointing
    /// anything at it (`true`). `None` when every table is in use.
    pub(super) fn acquire(&mut self, set: &[BackendId]) -> Option<(u32, bool)> {
        if let Some((table, users)) = self.by_set.get_mut(set) {
            *users += 1;
            return Some((*table, false));
        }
        let table = loop {
            if self.fresh < self.capacity {
                self.fresh += 1;
                let table = self.fresh - 1;
                if self.adopted.contains(&table) {
                    continue;
                }
                break table;
            }
            break self.free.pop_front()?;
        };
        self.by_set.insert(set.into(), (table, 1));
        Some((table, true))
    }

    /// The table of `old`, when one frontend alone uses it, taken for
    /// `new` instead (to be rewritten in place: every table is in use).
    pub(super) fn replace_sole(&mut self, old: &[BackendId], new: &[BackendId]) -> Option<u32> {
        let &(table, users) = self.by_set.get(old)?;
        if users != 1 || self.by_set.contains_key(new) {
            return None;
        }
        self.by_set.remove(old);
        self.by_set.insert(new.into(), (table, 1));
        Some(table)
    }

    /// One frontend stops using `set`'s table; the last one frees it.
    pub(super) fn release(&mut self, set: &[BackendId]) {
        if let Some((table, users)) = self.by_set.get_mut(set) {
            *users -= 1;
            if *users == 0 {
                let table = *table;
                self.by_set.remove(set);
                self.adopted.remove(&table);
                self.free.push_back(table);
            }
        }
    }

    /// Tables in use (shared ones once).
    pub(super) fn in_use(&self) -> usize {
        self.by_set.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frontends_with_one_backend_set_share_a_table_and_the_last_frees_it() {
        let mut tables = MaglevTables::new(2);
        assert_eq!(tables.acquire(&[1, 2]), Some((0, true)));
        assert_eq!(tables.acquire(&[1, 2]), Some((0, false)), "shared");
        assert_eq!(tables.acquire(&[3]), Some((1, true)));
        assert_eq!(tables.acquire(&[4]), None, "both in use");
        tables.release(&[1, 2]);
        assert_eq!(tables.acquire(&[4]), None, "still one user");
        tables.release(&[1, 2]);
        assert_eq!(tables.acquire(&[4]), Some((0, true)), "freed, reused");
        assert_eq!(tables.in_use(), 2);
    }

    #[test]
    fn a_freed_table_is_reused_as_late_as_possible_and_adopted_ones_are_kept() {
        let mut tables = MaglevTables::new(4);
        assert!(tables.adopt_set(1, &[7, 8]));
        assert!(tables.adopt_set(1, &[7, 8]), "a second frontend on it");
        assert!(!tables.adopt_set(1, &[9]), "another set cannot hold it too");
        assert!(!tables.adopt_set(4, &[9]), "beyond the map");
        assert_eq!(tables.acquire(&[10]), Some((0, true)));
        assert_eq!(tables.acquire(&[11]), Some((2, true)), "1 is adopted");
        assert_eq!(tables.acquire(&[7, 8]), Some((1, false)), "shared");
        tables.release(&[10]);
        assert_eq!(tables.acquire(&[12]), Some((3, true)), "never used first");
        assert_eq!(
            tables.acquire(&[13]),
            Some((0, true)),
            "then the oldest freed"
        );
        assert_eq!(tables.acquire(&[14]), None);
        for _ in 0..3 {
            tables.release(&[7, 8]);
        }
        assert_eq!(tables.acquire(&[14]), Some((1, true)));
        assert!(!MaglevTables::new(0).enabled());
    }
}
