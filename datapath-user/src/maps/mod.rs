//! The datapath's maps as the agent uses them. `handles` opens them
//! (from a loaded object or from their pins); `LbMaps` is what the
//! reconciler needs, implemented once by the real maps (`writer`, the one
//! place that writes a service into them) and once by `FakeMaps` beside
//! it, with the same validation, as Cilium keeps `LBMaps` and its fakes;
//! `bulk` writes many new frontends at once; `slot_blocks` says which
//! block of the slot array (mapped into memory: `mapped_array`) each
//! frontend owns; `reply_filter` says when the ingress program may skip
//! conntrack; `affinity` writes `sessionAffinity`'s timeouts and
//! backend sets; `service_counters` reads and zeroes the per-frontend
//! counters; `north_south` writes the Maglev tables and this node's
//! underlay pods for the uplink program.

mod affinity;
mod batch;
mod bulk;
mod fake;
mod handles;
mod lb_maps;
mod mapped_array;
mod north_south;
mod pending;
mod reply_filter;
mod service_counters;
mod slot_blocks;
mod writer;
mod writer_affinity;
mod writer_family;

pub use self::{
    affinity::AffinityMaps,
    fake::FakeMaps,
    handles::DatapathMaps,
    lb_maps::{
        DumpedFrontend, LbMaps, MaglevSettings, MapDump, MapFamily, ProgramError, validate_service,
    },
    north_south::{MaglevWriteError, NorthSouthMaps},
    service_counters::ServiceCounterMap,
};
