//! Kernel features the programs use only when the loader says the kernel
//! has them. The loader probes the kernel and writes the bits into the
//! object's read-only global `FEATURES` before loading; the verifier then
//! knows the value and skips the code behind a missing bit, helper calls
//! included, so one object loads on every kernel the agent supports.

/// Name of the read-only global the loader sets.
pub const FEATURES_GLOBAL: &str = "FEATURES";

/// `bpf_get_netns_cookie` in TC programs (Linux 6.15): the pod-route
/// lookup that sends a flow out of another interface of the pod
/// (`POD_ROUTES`). Without it flows always leave by the interface they
/// are on.
pub const NETNS_COOKIE_TC: u32 = 1 << 0;
/// `bpf_set_retval` in cgroup socket programs (Linux 5.18): a refused
/// `connect()` fails with ECONNREFUSED. Without it, with EPERM.
pub const SET_RETVAL: u32 = 1 << 1;

/// Every feature bit.
pub const ALL: u32 = NETNS_COOKIE_TC | SET_RETVAL;
