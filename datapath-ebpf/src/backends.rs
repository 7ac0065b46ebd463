//! Backend lookups by id shared by the TC and socket-LB paths.

use datapath_common::maps::Ipv6Words;

use crate::maps::{BACKEND_ADDRS6, BACKENDS};

/// The IPv6 backend under `backend_id`: its address and port, or `None`
/// when the id holds no IPv6 backend. The `BACKENDS` word publishes the
/// address written before it (`datapath_common::maps::v6::BackendAddress6`);
/// never the unspecified address (sent there a packet reaches the node
/// itself): an entry whose address is not there (yet) is no backend.
#[inline(always)]
pub fn ipv6(backend_id: u32) -> Option<(Ipv6Words, u16)> {
    let backend = BACKENDS
        .get(backend_id)
        .copied()
        .filter(|b| b.is_present() && b.is_v6())?;
    let address = BACKEND_ADDRS6.get(backend_id)?.address_be;
    (address != [0; 4]).then_some((address, backend.port_be))
}
