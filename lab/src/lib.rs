//! The network lab: everything the tests, the demo and the bench build
//! around the datapath, and nothing the agent needs. Namespaces and
//! cgroups of our own (removed on drop, on Ctrl-C, and by the next run's
//! sweep), the two-node topology and its wiring kinds, servers and
//! clients that run inside it, crafted packets for PROG_TEST_RUN, and
//! the demo.
//!
//! Layers, each importing only those above it in this list:
//! `error`, `cleanup`, `links`, `ethtool` → `namespace`, `cgroup` →
//! `prefix` → `topology` → `workload`, `packet`, `packet6` → `demo`.

pub mod cgroup;
pub mod cleanup;
pub mod demo;
pub mod error;
mod ethtool;
mod links;
pub mod namespace;
pub mod packet;
pub mod packet6;
pub mod prefix;
pub mod topology;
pub mod workload;

pub use cgroup::Cgroup;
pub use cleanup::{
    cleanup_on_signals, disown_child, disown_pin_dir, own_child, own_pin_dir, remove_all_live,
};
pub use error::TopologyError;
pub use ethtool::DeviceOffloads;
pub use namespace::Namespace;
pub use prefix::{sweep_stale, unique_prefix};
pub use topology::{Offloads, Pod, PodSpec, Topology, standard_pods};
