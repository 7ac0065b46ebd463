//! Everything both sides of underpass must agree on: the layout of every BPF
//! map key and value, and the pure logic (checksums, backend selection,
//! conntrack lifetimes) that the eBPF programs run and user space tests.
//!
//! Byte order is part of every name: a field ending in `_be` holds network
//! byte order bytes read as a native integer (`u32::from_ne_bytes(octets)`),
//! exactly what the packet and `bpf_sock_addr` carry, so the datapath never
//! swaps bytes. Fields without the suffix are host order.
#![no_std]

#[cfg(test)]
extern crate std;

pub mod conntrack;
pub mod csum;
pub mod lb;
pub mod maps;
pub mod metrics;

/// IANA protocol numbers used in keys.
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
