//! Flag arrays indexed by `lb::service_filter_index` buckets
//! (`CLASH_FILTER`, `REPLY_FILTER`): a program sets a bucket's flag, no
//! program clears one.

use aya_ebpf::maps::Array;
use datapath_common::lb;

/// Sets the flag of `address_be:port_be`'s bucket. Written only when not
/// yet set (no shared cache line dirtied again; two CPUs setting it at
/// once both write the same 1).
#[inline(always)]
pub fn set(flags: &Array<u32>, address_be: u32, port_be: u16, protocol: u8) {
    let bucket = lb::service_filter_index(address_be, port_be, protocol);
    if let Some(slot) = flags.get_ptr_mut(bucket) {
        // SAFETY: a map value of this program run.
        unsafe {
            if *slot == 0 {
                *slot = 1;
            }
        }
    }
}

/// True when the flag of `address_be:port_be`'s bucket is set.
#[inline(always)]
pub fn is_set(flags: &Array<u32>, address_be: u32, port_be: u16, protocol: u8) -> bool {
    let bucket = lb::service_filter_index(address_be, port_be, protocol);
    flags.get(bucket).is_some_and(|&flag| flag != 0)
}
