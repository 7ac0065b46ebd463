//! Event counters: one per-CPU slot each, so increments never contend.

use datapath_common::metrics::Counter;

use crate::maps::COUNTERS;

#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: a per-CPU slot is only touched by this CPU, and programs
        // do not preempt each other on one CPU.
        unsafe { *slot += 1 };
    }
}
