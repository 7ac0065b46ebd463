//! What the datapath does with the kernel it finds: pure decisions from
//! probe results (`crate::probe`), so that each fallback is unit-tested
//! with made-up kernels.
//!
//! Every feature is in `TABLE`, with the kernel that brought it and what
//! happens without it; the table in docs/operations.md is checked
//! against it.

use datapath_common::features as bits;

use crate::TcMode;

/// What the probes found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelFeatures {
    /// The running kernel's version, for messages.
    pub kernel: String,
    pub jiffies64: bool,
    pub redirect_neigh: bool,
    /// `BPF_ATOMIC` OR and `BPF_CMPXCHG` on memory the program owns.
    pub atomics: bool,
    pub tcx: bool,
    pub netns_cookie_tc: bool,
    pub set_retval: bool,
    pub cgroup_sock_addr_peername: bool,
    pub sock_destroy: bool,
}

impl KernelFeatures {
    /// A kernel with everything (tests, and the baseline for made-up ones).
    pub fn all(kernel: &str) -> Self {
        Self {
            kernel: kernel.to_owned(),
            jiffies64: true,
            redirect_neigh: true,
            atomics: true,
            tcx: true,
            netns_cookie_tc: true,
            set_retval: true,
            cgroup_sock_addr_peername: true,
            sock_destroy: true,
        }
    }
}

/// One row of the feature table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Feature {
    pub name: &'static str,
    /// The first Linux version that has it (or the config option).
    pub since: &'static str,
    /// What happens on a kernel without it.
    pub without: &'static str,
}

pub const JIFFIES64: Feature = Feature {
    name: "bpf_jiffies64 (the conntrack clock)",
    since: "5.5",
    without: "the agent stops: conntrack has no clock",
};
pub const REDIRECT_NEIGH: Feature = Feature {
    name: "bpf_redirect_neigh in TC programs",
    since: "5.10",
    without: "the agent stops: translated packets cannot be re-addressed",
};
pub const ATOMICS: Feature = Feature {
    name: "BPF atomic OR and compare-and-swap (conntrack state bits, SNAT port takeover)",
    since: "5.12 on x86-64, 5.18 on arm64",
    without: "the agent stops: the programs do not load",
};
pub const TCX: Feature = Feature {
    name: "TCX links (BPF_LINK_TYPE_TCX)",
    since: "6.6",
    without: "clsact + cls_bpf filters over netlink (--tc-mode auto); not pinned, so an agent restart re-attaches; --tc-mode tcx stops",
};
pub const NETNS_COOKIE_TC: Feature = Feature {
    name: "bpf_get_netns_cookie in TC programs",
    since: "6.15",
    without: "no pod routes: a flow to a backend behind another interface of the pod (Spiderpool's coordinator veth) leaves by the pod's own interface",
};
pub const SET_RETVAL: Feature = Feature {
    name: "bpf_set_retval in cgroup socket programs",
    since: "5.18",
    without: "socket-LB refuses a connect() to a service without endpoints with EPERM, not ECONNREFUSED",
};
pub const CGROUP_PEERNAME: Feature = Feature {
    name: "cgroup getpeername/recvmsg hooks (socket-LB)",
    since: "5.8",
    without: "the agent stops unless --no-socket-lb (pods then use the TC path)",
};
pub const SOCK_DESTROY: Feature = Feature {
    name: "SOCK_DESTROY over sock_diag (CONFIG_INET_DIAG_DESTROY)",
    since: "4.5, when built in",
    without: "connected UDP sockets keep a backend that left the service until the application reconnects",
};

/// Every feature, in the order of the docs' table.
pub const TABLE: [Feature; 8] = [
    JIFFIES64,
    REDIRECT_NEIGH,
    ATOMICS,
    CGROUP_PEERNAME,
    SET_RETVAL,
    TCX,
    NETNS_COOKIE_TC,
    SOCK_DESTROY,
];

/// What the operator asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Wants {
    pub tc_mode: TcMode,
    pub socket_lb: bool,
}

/// How the datapath runs on this kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// TCX or netlink, never Auto.
    pub tc_mode: TcMode,
    /// `datapath_common::features` bits for the object's `FEATURES`.
    pub feature_bits: u32,
    /// Whether connected UDP sockets can be destroyed.
    pub udp_socket_termination: bool,
    /// Features missing, with what the datapath does instead.
    pub degraded: Vec<Feature>,
}

/// A feature the datapath cannot run without (as asked).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("kernel {kernel} lacks {} (Linux {}+): {}{}", feature.name, feature.since, feature.without, hint.map(|h| format!("; {h}")).unwrap_or_default())]
pub struct Missing {
    pub kernel: String,
    pub feature: Feature,
    pub hint: Option<&'static str>,
}

/// The plan for `found` given `wants`, or the first feature it cannot do
/// without.
pub fn plan(found: &KernelFeatures, wants: Wants) -> Result<Plan, Missing> {
    let missing = |feature: Feature, hint: Option<&'static str>| Missing {
        kernel: found.kernel.clone(),
        feature,
        hint,
    };
    if !found.jiffies64 {
        return Err(missing(JIFFIES64, None));
    }
    if !found.redirect_neigh {
        return Err(missing(REDIRECT_NEIGH, None));
    }
    if !found.atomics {
        return Err(missing(ATOMICS, None));
    }
    if wants.socket_lb && !found.cgroup_sock_addr_peername {
        return Err(missing(CGROUP_PEERNAME, Some("run with --no-socket-lb")));
    }
    let mut degraded = Vec::new();
    let tc_mode = match (wants.tc_mode, found.tcx) {
        (TcMode::Tcx, false) => return Err(missing(TCX, Some("use --tc-mode auto or netlink"))),
        (TcMode::Netlink, _) => TcMode::Netlink,
        (_, true) => TcMode::Tcx,
        (_, false) => {
            degraded.push(TCX);
            TcMode::Netlink
        }
    };
    let mut feature_bits = 0;
    if found.netns_cookie_tc {
        feature_bits |= bits::NETNS_COOKIE_TC;
    } else {
        degraded.push(NETNS_COOKIE_TC);
    }
    if found.set_retval {
        feature_bits |= bits::SET_RETVAL;
    } else if wants.socket_lb {
        degraded.push(SET_RETVAL);
    }
    if wants.socket_lb && !found.sock_destroy {
        degraded.push(SOCK_DESTROY);
    }
    Ok(Plan {
        tc_mode,
        feature_bits,
        udp_socket_termination: wants.socket_lb && found.sock_destroy,
        degraded,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const EVERYTHING: Wants = Wants {
        tc_mode: TcMode::Auto,
        socket_lb: true,
    };

    fn kernel(change: impl FnOnce(&mut KernelFeatures)) -> KernelFeatures {
        let mut found = KernelFeatures::all("test");
        change(&mut found);
        found
    }

    #[test]
    fn a_kernel_with_everything_runs_everything() {
        let plan = plan(&KernelFeatures::all("6.18"), EVERYTHING).unwrap();
        assert_eq!(plan.tc_mode, TcMode::Tcx);
        assert_eq!(plan.feature_bits, bits::ALL);
        assert!(plan.udp_socket_termination);
        assert!(plan.degraded.is_empty());
    }

    #[test]
    fn without_tcx_auto_falls_back_to_netlink_and_tcx_stops() {
        let old = kernel(|k| k.tcx = false);
        let fallback = plan(&old, EVERYTHING).unwrap();
        assert_eq!(
            (fallback.tc_mode, fallback.degraded),
            (TcMode::Netlink, vec![TCX])
        );
        let error = plan(
            &old,
            Wants {
                tc_mode: TcMode::Tcx,
                ..EVERYTHING
            },
        )
        .unwrap_err();
        assert_eq!(error.feature, TCX);
        assert!(error.to_string().contains("Linux 6.6+"), "{error}");
    }

    #[test]
    fn before_6_15_pod_routes_are_off() {
        let plan = plan(&kernel(|k| k.netns_cookie_tc = false), EVERYTHING).unwrap();
        assert_eq!(plan.feature_bits, bits::SET_RETVAL);
        assert_eq!(plan.degraded, vec![NETNS_COOKIE_TC]);
    }

    #[test]
    fn without_set_retval_or_sock_destroy_socket_lb_degrades() {
        let plan = plan(
            &kernel(|k| {
                k.set_retval = false;
                k.sock_destroy = false;
            }),
            EVERYTHING,
        )
        .unwrap();
        assert_eq!(plan.feature_bits, bits::NETNS_COOKIE_TC);
        assert!(!plan.udp_socket_termination);
        assert_eq!(plan.degraded, vec![SET_RETVAL, SOCK_DESTROY]);
    }

    #[test]
    fn without_the_peername_hooks_socket_lb_stops_unless_turned_off() {
        let old = kernel(|k| k.cgroup_sock_addr_peername = false);
        let error = plan(&old, EVERYTHING).unwrap_err();
        assert_eq!(error.feature, CGROUP_PEERNAME);
        assert!(error.to_string().contains("--no-socket-lb"), "{error}");
        let tc_only = Wants {
            socket_lb: false,
            ..EVERYTHING
        };
        let plan = plan(&old, tc_only).unwrap();
        assert!(plan.degraded.is_empty() && !plan.udp_socket_termination);
    }

    #[test]
    fn without_the_clock_redirect_neigh_or_atomics_nothing_runs() {
        for (found, feature) in [
            (kernel(|k| k.jiffies64 = false), JIFFIES64),
            (kernel(|k| k.redirect_neigh = false), REDIRECT_NEIGH),
            (kernel(|k| k.atomics = false), ATOMICS),
        ] {
            assert_eq!(plan(&found, EVERYTHING).unwrap_err().feature, feature);
        }
    }

    /// The docs' kernel table (docs/operations.md) is this one.
    #[test]
    fn the_readme_lists_every_feature() {
        let readme = include_str!("../../docs/operations.md");
        for feature in TABLE {
            let row = format!(
                "| {} | {} | {} |",
                feature.name, feature.since, feature.without
            );
            assert!(
                readme.contains(&row),
                "docs/operations.md lacks the row:\n{row}"
            );
        }
    }
}
