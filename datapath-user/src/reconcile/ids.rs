//! Backend and reverse-NAT ids, handed out round-robin.

use foldhash::HashSet;

/// Round-robin allocator over `1..capacity`.
#[derive(Clone, Debug)]
pub struct IdAllocator {
    pub(super) capacity: u32,
    next: u32,
    used: HashSet<u32>,
}

impl IdAllocator {
    pub fn new(capacity: u32) -> Self {
        Self {
            capacity,
            next: 1,
            used: HashSet::default(),
        }
    }

    pub fn allocate(&mut self) -> Option<u32> {
        let span = self.capacity.saturating_sub(1);
        for _ in 0..span {
            let id = self.next;
            self.next = if self.next + 1 >= self.capacity {
                1
            } else {
                self.next + 1
            };
            if self.used.insert(id) {
                return Some(id);
            }
        }
        None
    }

    /// Marks an id found in the maps as taken, and moves the cursor past
    /// it so new ids come after the adopted ones.
    pub fn adopt(&mut self, id: u32) {
        if id == 0 || id >= self.capacity {
            return;
        }
        self.used.insert(id);
        if id >= self.next {
            self.next = if id + 1 >= self.capacity { 1 } else { id + 1 };
        }
    }

    pub fn release(&mut self, id: u32) {
        self.used.remove(&id);
    }

    pub fn in_use(&self) -> usize {
        self.used.len()
    }
}
