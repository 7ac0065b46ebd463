//! What the latency bench compares: container network designs, and the
//! node tunings the seed measured as rows of their own.

use clap::ValueEnum;
use serde::{Deserialize, Serialize};

/// A container network design (how the client reaches the server).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, ValueEnum, Serialize, Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Design {
    /// Host network: node namespace to node namespace (the reference).
    Host,
    /// macvlan pods on the nodes' wire, same subnet.
    Macvlan,
    /// ipvlan (L2) pods on the nodes' wire; needs CONFIG_IPVLAN.
    Ipvlan,
    /// veth pods routed by their nodes (flannel host-gw, Calico).
    VethRouted,
    /// veth pods on a bridge per node, the nodes joined by VXLAN
    /// (flannel vxlan).
    Vxlan,
    /// veth pods, the nodes routing through a third "router" namespace
    /// (flannel aws-vpc: the VPC's route table).
    Router,
    /// macvlan client to a ClusterIP through kube-proxy's iptables rules
    /// (Spiderpool's coordinator veth), server a macvlan pod.
    KubeProxy,
    /// macvlan client to a ClusterIP through underpass TC.
    Underpass,
    /// macvlan client (in the socket-LB cgroup) to a ClusterIP through
    /// underpass socket-LB.
    SocketLb,
    /// veth pod (host-gw) to a ClusterIP through kube-proxy's rules on its
    /// node (Calico or flannel host-gw with kube-proxy).
    VethKubeProxy,
    /// VXLAN overlay pod to a ClusterIP through kube-proxy's rules on its
    /// node (flannel vxlan with kube-proxy).
    VxlanKubeProxy,
}

impl Design {
    pub const ALL: [Design; 11] = [
        Design::Host,
        Design::Macvlan,
        Design::Ipvlan,
        Design::VethRouted,
        Design::Vxlan,
        Design::Router,
        Design::KubeProxy,
        Design::Underpass,
        Design::SocketLb,
        Design::VethKubeProxy,
        Design::VxlanKubeProxy,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Design::Host => "host network",
            Design::Macvlan => "macvlan",
            Design::Ipvlan => "ipvlan L2",
            Design::VethRouted => "veth, routed (host-gw)",
            Design::Vxlan => "veth + bridge, VXLAN overlay",
            Design::Router => "veth, via router (aws-vpc)",
            Design::KubeProxy => "macvlan → ClusterIP, kube-proxy",
            Design::Underpass => "macvlan → ClusterIP, underpass TC",
            Design::SocketLb => "macvlan → ClusterIP, underpass socket-LB",
            Design::VethKubeProxy => "veth (host-gw) → ClusterIP, kube-proxy",
            Design::VxlanKubeProxy => "VXLAN → ClusterIP, kube-proxy",
        }
    }

    /// Reaches its server through kube-proxy's rules on the client's node.
    pub(super) fn through_kube_proxy(self) -> bool {
        matches!(
            self,
            Design::KubeProxy | Design::VethKubeProxy | Design::VxlanKubeProxy
        )
    }

    /// Reaches a ClusterIP (any datapath).
    pub(super) fn is_cluster_ip(self) -> bool {
        self.through_kube_proxy() || matches!(self, Design::Underpass | Design::SocketLb)
    }

    /// The Pod IP design whose pods a ClusterIP design uses.
    pub(super) fn pods_of(self) -> Design {
        match self {
            Design::VethKubeProxy => Design::VethRouted,
            Design::VxlanKubeProxy => Design::Vxlan,
            Design::KubeProxy | Design::Underpass | Design::SocketLb => Design::Macvlan,
            other => other,
        }
    }
}

/// A node tuning the seed used, measured as its own rows.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, ValueEnum, Serialize, Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Tuning {
    /// Nothing changed.
    Baseline,
    /// RPS and XPS masks (every CPU) on the wire's queues in both nodes,
    /// as the seed set on its NIC.
    RpsXps,
    /// kube-proxy's rules loaded in both nodes, so conntrack follows every
    /// flow the node sees (what a kube-proxy node costs traffic that is
    /// not for a service).
    Conntrack,
    /// As `conntrack`, plus the seed's NOTRACK rules (raw table) for all
    /// traffic not to the service CIDR. Not for ClusterIPs through
    /// kube-proxy: its NAT needs conntrack.
    Notrack,
}

impl Tuning {
    pub(super) fn suffix(self) -> &'static str {
        match self {
            Tuning::Baseline => "",
            Tuning::RpsXps => " [RPS/XPS]",
            Tuning::Conntrack => " [kube-proxy loaded]",
            Tuning::Notrack => " [kube-proxy + NOTRACK]",
        }
    }

    pub(super) fn kube_proxy_on_nodes(self) -> bool {
        matches!(self, Tuning::Conntrack | Tuning::Notrack)
    }
}
