//! underpass user space: the node agent and what it is made of. It loads
//! the datapath, pins and inspects its maps, attaches it to pod interfaces
//! and cgroups, and keeps the maps equal to the cluster's Services. The
//! network lab the tests, the demo and the bench use is the `lab` crate.

pub mod agent;
pub mod attach;
mod bpfsys;
pub mod by_owner;
pub mod cgroup;
pub mod clock;
pub mod cni;
pub mod datapath_events;
pub mod error;
pub mod ethtool;
pub mod features;
pub mod health_check;
pub mod http;
pub mod inspect;
pub mod k8s;
pub mod kernel_btf;
pub mod loader;
pub mod map_pins;
pub mod maps;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod netns;
pub mod object;
pub mod pod_routes;
pub mod pod_tc;
pub mod probe;
pub mod reconcile;
pub mod service_metrics;
pub mod sock_lb_skip;
pub mod sockdiag;
pub mod tc_mode;
pub mod udp_terminate;
pub mod uninstall;
pub mod uplink;

pub use error::LoaderError;
pub use loader::{Datapath, LoadOptions};
pub use maps::DatapathMaps;
pub use tc_mode::TcMode;

/// Raises this process's soft limit on open files to its hard limit (the
/// soft one is often 1024): the agent holds a descriptor per map, link
/// and namespace it works in, and per metrics connection.
pub fn raise_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// Lifts the locked-memory limit: kernels before 5.11 charge BPF maps and
/// programs to RLIMIT_MEMLOCK (64 KiB by default), later ones to the
/// memory cgroup. Needs CAP_SYS_RESOURCE (the DaemonSet grants it); where
/// it fails, the load reports its own error.
pub fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads the struct we pass.
    let _ = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
}
