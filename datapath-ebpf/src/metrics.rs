//! Event counters: one per-CPU slot each, so increments never contend.

use datapath_common::metrics::Counter;

use crate::maps::{COUNTERS, SERVICE_COUNTERS};

#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: a per-CPU slot is only touched by this CPU, and programs
        // do not preempt each other on one CPU.
        unsafe { *slot += 1 };
    }
}

/// Counts what frontend `rev_nat_id` was sent: `packets` packets (or
/// datagrams) and `new_flows` flows balanced (`SERVICE_COUNTERS`).
/// Constants at every call site: the adds of a zero fold away.
#[inline(always)]
pub fn count_service(rev_nat_id: u32, packets: u64, new_flows: u64) {
    if let Some(slot) = SERVICE_COUNTERS.get_ptr_mut(rev_nat_id) {
        // SAFETY: as `count`: this CPU's slot, not preempted by another
        // program.
        unsafe {
            (*slot).packets += packets;
            (*slot).new_flows += new_flows;
        }
    }
}
