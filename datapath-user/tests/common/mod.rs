//! Shared by the privileged suites.
#![allow(dead_code, reason = "each suite uses a different subset")]

use datapath_common::conntrack::Lifetimes;
use datapath_user::{Datapath, LoadOptions, loader::MapSizes};

/// The privileged suites run in CI as root; elsewhere they fail loudly
/// rather than pass without having run.
pub fn require_root(suite: &str) {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!(
            "the {suite} suite needs root (BPF, network namespaces): run `cargo xtask test` as root"
        );
    }
}

/// A private (unpinned) datapath with small maps.
pub fn load_private() -> Datapath {
    load_private_with(Lifetimes::DEFAULT)
}

/// The same with chosen conntrack lifetimes.
pub fn load_private_with(ct_lifetimes: Lifetimes) -> Datapath {
    require_root("BPF_PROG_TEST_RUN");
    let options = LoadOptions {
        ct_lifetimes,
        pin_dir: None,
        sizes: MapSizes {
            services: 4096,
            backends: 4096,
            reverse_nat: 1024,
            conntrack: 4096,
            sock_reverse_nat: 1024,
        },
    };
    Datapath::load(&options).unwrap_or_else(|e| panic!("loading the datapath: {e}"))
}

/// CLOCK_MONOTONIC in ns: the clock `bpf_ktime_get_ns` reads.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime into a valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
