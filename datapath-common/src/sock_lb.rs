//! Which sockets socket-LB translates. By default every process below the
//! cgroup it is attached to; an operator may keep it to host processes
//! (pods then use the TC path, as service-mesh sidecars need: a
//! translated `connect()` hides the service from their redirect rules),
//! or opt single pods out by their network namespace (`SOCK_LB_SKIP`).

/// Name of the read-only global the loader sets (`SockLbScope`).
pub const SOCK_LB_SCOPE_GLOBAL: &str = "SOCK_LB_SCOPE";

/// Name of the read-only global (a u32) the loader sets non-zero when the
/// IPv6 maps are sized (the agent's `--ipv6 on`): native IPv6 addresses
/// are looked up only then, so that an IPv4-only node's IPv6 sockets pay
/// nothing (the verifier drops the lookups).
pub const SOCK_LB_IPV6_GLOBAL: &str = "SOCK_LB_IPV6";

/// Socket-LB's scope, fixed when the agent loads the programs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockLbScope {
    /// The host's network namespace cookie (`SO_NETNS_COOKIE`).
    pub host_netns_cookie: u64,
    /// Non-zero: only sockets in the host's namespace are translated.
    pub host_only: u32,
    /// Non-zero: namespaces listed in `SOCK_LB_SKIP` are not translated.
    pub skip_listed: u32,
}

impl SockLbScope {
    /// Every socket (no namespace check: the programs skip it).
    pub const ALL: Self = Self {
        host_netns_cookie: 0,
        host_only: 0,
        skip_listed: 0,
    };

    /// Whether the programs must look at the socket's namespace at all.
    pub const fn is_scoped(&self) -> bool {
        self.host_only != 0 || self.skip_listed != 0
    }

    /// Whether a socket in the namespace `netns_cookie` (`listed`: found in
    /// `SOCK_LB_SKIP`) is translated.
    pub const fn translates(&self, netns_cookie: u64, listed: bool) -> bool {
        if self.host_only != 0 && netns_cookie != self.host_netns_cookie {
            return false;
        }
        !(self.skip_listed != 0 && listed)
    }
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for SockLbScope {}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: u64 = 4096;
    const POD: u64 = 8192;

    #[test]
    fn all_translates_everything() {
        assert!(!SockLbScope::ALL.is_scoped());
        assert!(SockLbScope::ALL.translates(POD, true));
    }

    #[test]
    fn host_only_leaves_pods_to_the_tc_path() {
        let scope = SockLbScope {
            host_netns_cookie: HOST,
            host_only: 1,
            skip_listed: 0,
        };
        assert!(scope.translates(HOST, false));
        assert!(!scope.translates(POD, false));
    }

    #[test]
    fn listed_namespaces_are_skipped_others_translated() {
        let scope = SockLbScope {
            host_netns_cookie: HOST,
            host_only: 0,
            skip_listed: 1,
        };
        assert!(!scope.translates(POD, true));
        assert!(scope.translates(POD, false));
        assert!(scope.translates(HOST, false));
    }
}
