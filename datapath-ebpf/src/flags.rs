//! Flag arrays indexed by `lb::service_filter_index` buckets
//! (`CLASH_FILTER`, `REPLY_FILTER`): a program sets a bucket's flag, no
//! program clears one.

use aya_ebpf::maps::Array;
use datapath_common::{lb, maps::Ipv6Words};

/// Sets the flag of `address_be:port_be`'s bucket. Written only when not
/// yet set (no shared cache line dirtied again; two CPUs setting it at
/// once both write the same 1).
#[inline(always)]
pub fn set(flags: &Array<u32>, address_be: u32, port_be: u16, protocol: u8) {
    set_bucket(
        flags,
        lb::service_filter_index(address_be, port_be, protocol),
    );
}

/// [`set`] for an IPv6 address.
#[inline(always)]
pub fn set6(flags: &Array<u32>, address_be: Ipv6Words, port_be: u16, protocol: u8) {
    set_bucket(
        flags,
        lb::service_filter_index6(address_be, port_be, protocol),
    );
}

#[inline(always)]
fn set_bucket(flags: &Array<u32>, bucket: u32) {
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
    is_bucket_set(
        flags,
        lb::service_filter_index(address_be, port_be, protocol),
    )
}

/// [`is_set`] for an IPv6 address.
#[inline(always)]
pub fn is_set6(flags: &Array<u32>, address_be: Ipv6Words, port_be: u16, protocol: u8) -> bool {
    is_bucket_set(
        flags,
        lb::service_filter_index6(address_be, port_be, protocol),
    )
}

#[inline(always)]
fn is_bucket_set(flags: &Array<u32>, bucket: u32) -> bool {
    flags.get(bucket).is_some_and(|&flag| flag != 0)
}
