//! Which blocks of `SLOTS` are whose: a buddy allocation. A frontend owns
//! one block of `1 << order` slots, aligned to its size, the smallest at
//! or above its backend count; its set may change in place while it fits,
//! and moves to a new block when it outgrows it (or shrinks to a quarter).
//!
//! A block a frontend left is not handed out again at once: a program
//! that read the frontend's entry just before the move may still read the
//! old block's slots. Left blocks rest until the programs running when
//! they were left have finished (`crate::bpfsys::GracePeriod`: the kernel
//! waits for an RCU grace period), which the agent waits for at the end
//! of a sync that left any, or when nothing else fits. Where that wait
//! cannot be had, they rest `FALLBACK_REST`.

use std::{
    collections::{BTreeSet, VecDeque},
    time::{Duration, Instant},
};

use datapath_common::maps::{MAX_BACKENDS_PER_SERVICE, MAX_SLOT_ORDER};

/// How long a left block rests when no grace period can be waited for:
/// far beyond any program run, however long a vCPU is stopped within it.
pub const FALLBACK_REST: Duration = Duration::from_secs(2);

/// Largest order the free lists know (blocks of the space's size).
const TOP_ORDER: usize = 31;

#[derive(Debug)]
pub struct SlotBlocks {
    capacity: u32,
    /// Free blocks by order: `free[k]` holds the starts of free blocks of
    /// `1 << k` slots.
    free: Vec<BTreeSet<u32>>,
    /// Blocks left by frontends, with when they were left.
    resting: VecDeque<(Instant, u32, u8)>,
    /// Slots in blocks handed out (resting ones included).
    taken: u64,
    /// Made at the first wait (`None` until then; `Err` when the kernel
    /// refused, then the time fallback).
    grace: Option<std::io::Result<crate::bpfsys::GracePeriod>>,
}

impl SlotBlocks {
    /// All of `capacity` slots free.
    pub fn new(capacity: u32) -> Self {
        let mut free = vec![BTreeSet::new(); TOP_ORDER + 1];
        // The largest aligned blocks that tile 0..capacity, from the start.
        let mut start = 0u32;
        for order in (0..=TOP_ORDER).rev() {
            if capacity & (1 << order) != 0 {
                free[order].insert(start);
                start += 1 << order;
            }
        }
        Self {
            capacity,
            free,
            resting: VecDeque::new(),
            taken: 0,
            grace: None,
        }
    }

    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Slots in blocks some frontend owns, or left and not yet free.
    pub fn taken(&self) -> u64 {
        self.taken
    }

    /// The order of the block for `count` backends: the smallest power of
    /// two holding them (a frontend without backends owns one slot).
    pub fn order_for(count: u16) -> u8 {
        let count = count.clamp(1, MAX_BACKENDS_PER_SERVICE);
        (u32::from(count).next_power_of_two().trailing_zeros() as u8).min(MAX_SLOT_ORDER)
    }

    /// Whether a frontend owning a block of `order` keeps it for `count`
    /// backends: they fit, and use more than a quarter of it.
    pub fn keeps(order: u8, count: u16) -> bool {
        let Some(capacity) = 1u32.checked_shl(u32::from(order)) else {
            return false;
        };
        u32::from(count) <= capacity && (order <= 1 || u32::from(count) * 4 > capacity)
    }

    /// A free block of `order`, or `None` when the space has none, even
    /// once the resting blocks are free.
    pub fn allocate(&mut self, order: u8) -> Option<u32> {
        if let Some(start) = self.take(order) {
            return Some(start);
        }
        if self.resting.is_empty() {
            return None;
        }
        if !self.settle() {
            // No grace period to wait for: the oldest rests its time out.
            let (left, _, _) = *self.resting.front()?;
            std::thread::sleep(FALLBACK_REST.saturating_sub(left.elapsed()));
            self.release_rested(Instant::now());
        }
        self.take(order)
    }

    /// Whether blocks are resting (a grace period would free them).
    pub fn has_resting(&self) -> bool {
        !self.resting.is_empty()
    }

    /// Frees every resting block once no program can still be reading it:
    /// after an RCU grace period that began after they were left. False
    /// when the kernel refused to wait for one (only blocks older than
    /// `FALLBACK_REST` are freed then).
    pub fn settle(&mut self) -> bool {
        let waited = self.wait_for_readers();
        let count = if waited {
            self.resting.len()
        } else {
            self.release_rested(Instant::now());
            0
        };
        for _ in 0..count {
            if let Some((_, start, order)) = self.resting.pop_front() {
                self.release(start, order);
            }
        }
        waited
    }

    /// Takes back a block that was never published (its frontend's entry
    /// was not written): free at once.
    pub fn release(&mut self, start: u32, order: u8) {
        self.taken = self.taken.saturating_sub(1 << order);
        self.give_back(start, order);
    }

    /// A block its frontend left (or that a removed frontend owned): free
    /// after the next grace period (`settle`).
    pub fn retire(&mut self, start: u32, order: u8) {
        self.resting.push_back((Instant::now(), start, order));
    }

    /// Marks the block `start` of `order` as owned (a frontend found in
    /// pinned maps). False when it is not free: misaligned, beyond the
    /// space, or (part of) a block already owned.
    pub fn claim(&mut self, start: u32, order: u8) -> bool {
        let size = 1u64 << order;
        if usize::from(order) > TOP_ORDER
            || u64::from(start) % size != 0
            || u64::from(start) + size > u64::from(self.capacity)
        {
            return false;
        }
        // The free block holding it, at its order or above.
        let Some(mut at) = (usize::from(order)..=TOP_ORDER)
            .find(|&k| self.free[k].contains(&(start & !((1u32 << k) - 1))))
        else {
            return false;
        };
        let mut block = start & !((1u32 << at) - 1);
        self.free[at].remove(&block);
        // Split down to `order`, freeing each half that does not hold it.
        while at > usize::from(order) {
            at -= 1;
            let half = 1u32 << at;
            if start >= block + half {
                self.free[at].insert(block);
                block += half;
            } else {
                self.free[at].insert(block + half);
            }
        }
        self.taken += size;
        true
    }

    fn take(&mut self, order: u8) -> Option<u32> {
        let order = usize::from(order);
        let from = (order..=TOP_ORDER).find(|&k| !self.free[k].is_empty())?;
        let start = self.free[from].pop_first()?;
        // Split: the upper halves stay free.
        for k in (order..from).rev() {
            self.free[k].insert(start + (1 << k));
        }
        self.taken += 1 << order;
        Some(start)
    }

    /// Waits for the programs running now to finish; false when the
    /// kernel will not say.
    fn wait_for_readers(&mut self) -> bool {
        let grace = self.grace.get_or_insert_with(|| {
            crate::bpfsys::GracePeriod::new().inspect_err(|e| {
                tracing::warn!(
                    "cannot wait for running programs ({e}): slot blocks left by frontends rest {FALLBACK_REST:?} instead"
                );
            })
        });
        grace.as_ref().is_ok_and(|grace| grace.wait().is_ok())
    }

    fn release_rested(&mut self, now: Instant) {
        while let Some(&(left, start, order)) = self.resting.front() {
            if now.duration_since(left) < FALLBACK_REST {
                break;
            }
            self.resting.pop_front();
            self.release(start, order);
        }
    }

    /// Frees a block, merging it with its free buddy as far as it goes.
    fn give_back(&mut self, mut start: u32, order: u8) {
        let mut order = usize::from(order);
        while order < TOP_ORDER {
            let buddy = start ^ (1 << order);
            if !self.free[order].remove(&buddy) {
                break;
            }
            start = start.min(buddy);
            order += 1;
        }
        self.free[order].insert(start);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_slots(blocks: &SlotBlocks) -> u64 {
        blocks
            .free
            .iter()
            .enumerate()
            .map(|(k, set)| set.len() as u64 * (1 << k))
            .sum()
    }

    #[test]
    fn a_count_gets_the_smallest_power_of_two_and_keeps_it_until_a_quarter() {
        assert_eq!(SlotBlocks::order_for(0), 0);
        assert_eq!(SlotBlocks::order_for(1), 0);
        assert_eq!(SlotBlocks::order_for(10), 4);
        assert_eq!(SlotBlocks::order_for(16), 4);
        assert_eq!(SlotBlocks::order_for(1024), MAX_SLOT_ORDER);
        assert!(SlotBlocks::keeps(4, 16) && SlotBlocks::keeps(4, 5));
        assert!(!SlotBlocks::keeps(4, 17) && !SlotBlocks::keeps(4, 4));
        assert!(SlotBlocks::keeps(1, 0) && SlotBlocks::keeps(0, 1));
    }

    #[test]
    fn blocks_are_aligned_disjoint_and_merge_back_into_the_whole_space() {
        // Not a power of two: 96 = 64 + 32.
        let mut blocks = SlotBlocks::new(96);
        let mut owned = Vec::new();
        for order in [4u8, 0, 3, 4, 1, 5, 2] {
            let start = blocks.allocate(order).expect("room");
            assert_eq!(start % (1 << order), 0, "aligned");
            assert!(start + (1 << order) <= 96);
            for &(s, o) in &owned {
                let (a, b) = (start, start + (1u32 << order));
                let (c, d) = (s, s + (1u32 << o));
                assert!(b <= c || d <= a, "{a}..{b} overlaps {c}..{d}");
            }
            owned.push((start, order));
        }
        assert_eq!(blocks.taken(), 16 + 1 + 8 + 16 + 2 + 32 + 4);
        assert_eq!(free_slots(&blocks) + blocks.taken(), 96);
        for (start, order) in owned {
            blocks.release(start, order);
        }
        assert_eq!(blocks.taken(), 0);
        assert_eq!(
            blocks.free[6].len() + blocks.free[5].len(),
            2,
            "64 + 32 again"
        );
    }

    #[test]
    fn a_full_space_says_so_and_a_left_block_is_free_after_a_grace_period() {
        let mut blocks = SlotBlocks::new(16);
        let a = blocks.allocate(3).expect("room");
        let b = blocks.allocate(3).expect("room");
        assert_eq!(blocks.allocate(0), None, "full, nothing resting");
        blocks.retire(a, 3);
        assert!(blocks.has_resting());
        assert_eq!(blocks.allocate(2), Some(a), "the left block, once rested");
        assert!(!blocks.has_resting());
        blocks.retire(b, 3);
        assert!(
            blocks.settle() && !blocks.has_resting(),
            "the kernel waits for running programs (a map-in-map update)"
        );
        assert_eq!(blocks.taken(), 4);
        assert_eq!(blocks.allocate(3), Some(b));
    }

    #[test]
    fn found_blocks_are_claimed_once_and_allocation_goes_around_them() {
        let mut blocks = SlotBlocks::new(64);
        assert!(blocks.claim(16, 3));
        assert!(!blocks.claim(16, 3), "owned already");
        assert!(!blocks.claim(20, 2), "inside an owned block");
        assert!(!blocks.claim(8, 4), "misaligned");
        assert!(!blocks.claim(64, 0), "beyond the space");
        assert!(blocks.claim(40, 2));
        let mut got = Vec::new();
        while let Some(start) = blocks.allocate(2) {
            got.push(start);
        }
        // 64 slots, 12 claimed: 13 blocks of 4, none inside a claimed one.
        assert_eq!(got.len(), 13);
        assert!(
            got.iter()
                .all(|&s| !(16..24).contains(&s) && !(40..44).contains(&s))
        );
        // Everything given back: the space whole again.
        for start in got {
            blocks.release(start, 2);
        }
        blocks.release(16, 3);
        blocks.release(40, 2);
        assert_eq!((blocks.taken(), blocks.free[6].len()), (0, 1));
    }
}
