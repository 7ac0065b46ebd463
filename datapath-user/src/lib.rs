//! underpass user space: loads the datapath, pins and inspects its maps,
//! attaches it to pod interfaces and cgroups, and builds the namespace
//! topology shared by the e2e tests, the demo and the bench.

pub mod agent;
pub mod attach;
mod bpfsys;
pub mod cgroup;
pub mod clock;
pub mod cni;
pub mod demo;
pub mod inspect;
pub mod k8s;
pub mod loader;
pub mod map_pins;
pub mod maps;
pub mod metrics;
pub mod netns;
pub mod object;
pub mod packet;
pub mod pod_routes;
pub mod reconcile;
pub mod sockdiag;
pub mod topology;
pub mod udp_terminate;
pub mod workload;

pub use loader::{Datapath, LoadOptions, LoaderError, TcMode};
pub use maps::DatapathMaps;
