//! Maglev backend choice for new north-south flows
//! (`datapath_common::maglev`): the flow's hash under the cluster's seed,
//! modulo the table size, in the frontend's table. Every node holds the
//! same table for the same backends, so a flow sprayed to any node goes
//! to the same backend.

use datapath_common::maglev;
use datapath_common::maps::{BackendId, maglev_position};

use crate::{
    maps::{MAGLEV, MAGLEV_TABLE_OF, NORTH_SOUTH},
    parse::Packet,
};

/// The backend Maglev picks for `packet`'s flow to frontend `rev_nat_id`,
/// or `None` when the frontend is not served from outside on this node
/// (no table: not north-south, or `externalTrafficPolicy: Local` without
/// a local endpoint) or the agent has not written the settings yet.
#[inline(always)]
pub fn pick(packet: &Packet, rev_nat_id: u32) -> Option<BackendId> {
    let table = *MAGLEV_TABLE_OF.get(rev_nat_id)?;
    if table == 0 {
        return None;
    }
    let config = NORTH_SOUTH.get(0)?;
    let size = config.maglev_table_size;
    if size == 0 {
        return None;
    }
    let hash = maglev::flow_hash4(
        packet.saddr_be,
        packet.daddr_be,
        packet.sport_be,
        packet.dport_be,
        packet.protocol,
        config.maglev_seed,
    );
    let (element, lane) = maglev_position(table - 1, maglev::table_index(hash, size), size);
    let backend_id = MAGLEV.get(element)?.backend_ids[lane & 1];
    (backend_id != 0).then_some(backend_id)
}
