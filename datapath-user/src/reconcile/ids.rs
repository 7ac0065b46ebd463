//! Backend and reverse-NAT ids, handed out round-robin.

/// Round-robin allocator over `1..capacity`, its ids in a bitmap: one bit
/// per id the maps can hold (a million backend ids take 128 KiB; a hash
/// set of the half used took 5 MB).
#[derive(Clone, Debug)]
pub struct IdAllocator {
    pub(super) capacity: u32,
    next: u32,
    used: Vec<u64>,
    /// Bits set in `used` (resting ids included).
    in_use: usize,
    /// Ids retired since the last grace period: still taken, so that a
    /// program that read the entry before it was cleared never meets
    /// another backend's address under the same id (an IPv6 backend is
    /// two reads: its `BACKENDS` word, then its `BACKEND_ADDRS6` address).
    resting: Vec<u32>,
    /// The same as a bitmap (a retire is checked in O(1)).
    resting_bits: Vec<u64>,
}

impl IdAllocator {
    pub fn new(capacity: u32) -> Self {
        Self {
            capacity,
            next: 1,
            used: vec![0; (capacity as usize).div_ceil(64)],
            in_use: 0,
            resting: Vec::new(),
            resting_bits: vec![0; (capacity as usize).div_ceil(64)],
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
            if self.take(id) {
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
        self.take(id);
        if id >= self.next {
            self.next = if id + 1 >= self.capacity { 1 } else { id + 1 };
        }
    }

    pub fn release(&mut self, id: u32) {
        if id >= self.capacity {
            return;
        }
        let (word, bit) = Self::position(id);
        if self.resting_bits[word] & bit != 0 {
            // Released while resting: no longer resting.
            self.resting_bits[word] &= !bit;
            self.resting.retain(|&r| r != id);
        }
        if self.used[word] & bit != 0 {
            self.used[word] &= !bit;
            self.in_use -= 1;
        }
    }

    /// A published id its entry was cleared from: handed out again only
    /// after `wake_resting` (which the caller calls once no program can
    /// still be reading the old entry).
    pub fn retire(&mut self, id: u32) {
        if id == 0 || id >= self.capacity {
            return;
        }
        let (word, bit) = Self::position(id);
        if self.used[word] & bit != 0 && self.resting_bits[word] & bit == 0 {
            self.resting_bits[word] |= bit;
            self.resting.push(id);
        }
    }

    /// Whether ids are resting (`wake_resting` would free them).
    pub fn has_resting(&self) -> bool {
        !self.resting.is_empty()
    }

    /// Frees every resting id (after a grace period).
    pub fn wake_resting(&mut self) {
        for id in std::mem::take(&mut self.resting) {
            let (word, bit) = Self::position(id);
            self.resting_bits[word] &= !bit;
            if self.used[word] & bit != 0 {
                self.used[word] &= !bit;
                self.in_use -= 1;
            }
        }
    }

    /// Ids held (resting ones not counted).
    pub fn in_use(&self) -> usize {
        self.in_use - self.resting.len()
    }

    /// Takes `id` (below the capacity); false when it was taken already.
    fn take(&mut self, id: u32) -> bool {
        let (word, bit) = Self::position(id);
        if self.used[word] & bit != 0 {
            return false;
        }
        self.used[word] |= bit;
        self.in_use += 1;
        true
    }

    fn position(id: u32) -> (usize, u64) {
        (id as usize / 64, 1 << (id % 64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_go_round_robin_skipping_taken_ones_until_none_is_free() {
        let mut ids = IdAllocator::new(5);
        assert_eq!(
            (0..4).map(|_| ids.allocate()).collect::<Vec<_>>(),
            [Some(1), Some(2), Some(3), Some(4)]
        );
        assert_eq!(ids.allocate(), None, "ids are 1..capacity");
        assert_eq!(ids.in_use(), 4);
        ids.release(2);
        ids.release(2);
        assert_eq!(ids.in_use(), 3, "a double release counts once");
        assert_eq!(ids.allocate(), Some(2));
        ids.release(3);
        ids.release(1);
        assert_eq!(ids.allocate(), Some(3), "round robin: after 2 comes 3");
    }

    #[test]
    fn retired_ids_rest_until_woken() {
        let mut ids = IdAllocator::new(3);
        assert_eq!((ids.allocate(), ids.allocate()), (Some(1), Some(2)));
        ids.retire(1);
        ids.retire(1);
        ids.retire(0);
        assert_eq!(ids.in_use(), 1, "a resting id is not in use");
        assert!(ids.has_resting());
        assert_eq!(ids.allocate(), None, "a resting id is not handed out");
        ids.wake_resting();
        assert!(!ids.has_resting());
        assert_eq!(ids.allocate(), Some(1));
        assert_eq!(ids.in_use(), 2);
        // Released while resting: free at once, and not resting any more.
        ids.retire(2);
        ids.release(2);
        assert_eq!((ids.in_use(), ids.has_resting()), (1, false));
        assert_eq!(ids.allocate(), Some(2));
    }

    #[test]
    fn adopted_ids_are_taken_and_new_ones_follow_them() {
        let mut ids = IdAllocator::new(200);
        ids.adopt(70);
        ids.adopt(0);
        ids.adopt(200);
        assert_eq!(ids.in_use(), 1, "0 and ids beyond the capacity are not ids");
        assert_eq!(ids.allocate(), Some(71));
        ids.adopt(199);
        assert_eq!(ids.allocate(), Some(1), "past the last id, back to 1");
    }
}
