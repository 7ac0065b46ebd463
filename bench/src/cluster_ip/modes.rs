//! The rows of the ClusterIP bench: the datapath a measurement crosses,
//! its label, the seed's figure for it, and the presets (the seed's
//! ClusterIP table, its Pod IP table).

use clap::ValueEnum;
use serde::{Deserialize, Serialize};

use crate::{
    seed::{self, ClusterIpRow, PodIpRow},
    workload::Kind,
};

/// The datapath a measurement crosses.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, ValueEnum, Serialize, Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// macvlan client, kube-proxy's iptables rules through the
    /// coordinator veth.
    KubeProxy,
    /// macvlan client, kube-proxy's nftables rules through the
    /// coordinator veth.
    KubeProxyNft,
    /// macvlan client, underpass TC programs on its macvlan.
    Ebpf,
    /// macvlan client, underpass socket-LB (connect-time translation).
    SocketLb,
    /// veth client routed by its node, kube-proxy's iptables rules on
    /// that node (the seed's Calico row).
    VethKubeProxy,
    /// veth client routed by its node, underpass TC programs on its veth
    /// (the seed's Cilium row).
    VethEbpf,
    /// No service: straight to the server pod from a client with nothing
    /// of ours attached — the limit every ratio is taken against.
    PodIpBare,
    /// The limit measured a second time in every round (an A/A control):
    /// its ratio to the limit shows the noise floor of the run.
    AaControl,
    /// No service: straight to the server pod from the client that has
    /// underpass's TC programs attached (their miss path).
    PodIp,
    /// No service: macvlan pods on two subnets, through the gateway.
    PodIpRouted,
    /// No service: veth pods routed by their nodes (Calico's wiring).
    VethRouted,
    /// Node namespace to node namespace.
    Node,
    /// From outside the cluster to node1's nodePort, kube-proxy's
    /// iptables rules: DNAT to the pod on node1, MASQUERADE, through
    /// the pod's coordinator veth (`--preset node-port`).
    NodePortKubeProxy,
    /// The same with kube-proxy's nftables rules.
    NodePortKubeProxyNft,
    /// From outside to node1's nodePort, underpass's XDP program on
    /// node1's uplink: DNAT and the pod's MAC, the client's address kept.
    NodePortXdp,
    /// From outside to node1's nodePort of a service whose pod is on
    /// node2: kube-proxy's iptables rules on node1 (DNAT, MASQUERADE,
    /// forwarded back out of the wire).
    NodePortRemoteKubeProxy,
    /// The same with kube-proxy's nftables rules.
    NodePortRemoteKubeProxyNft,
    /// The same through underpass's XDP program: SNAT to node1, `XDP_TX`.
    NodePortRemoteXdp,
    /// From outside to node1's nodePort, the same XDP program attached in
    /// generic mode: it runs on the kernel's socket buffers where TC's
    /// ingress hook does (after the buffer is built, before the stack),
    /// the skb path Cilium takes without XDP acceleration.
    NodePortSkb,
    /// The same to the pod on node2.
    NodePortRemoteSkb,
    /// The packet rate's ceiling: an `XDP_DROP` program on node1's
    /// uplink, the same sender (no agent, no rules: the least a packet
    /// can cost node1 on this device).
    XdpDropCeiling,
}

impl Mode {
    pub const ALL: [Mode; 21] = [
        Mode::KubeProxy,
        Mode::KubeProxyNft,
        Mode::Ebpf,
        Mode::SocketLb,
        Mode::VethKubeProxy,
        Mode::VethEbpf,
        Mode::PodIpBare,
        Mode::AaControl,
        Mode::PodIp,
        Mode::PodIpRouted,
        Mode::VethRouted,
        Mode::Node,
        Mode::NodePortKubeProxy,
        Mode::NodePortKubeProxyNft,
        Mode::NodePortXdp,
        Mode::NodePortRemoteKubeProxy,
        Mode::NodePortRemoteKubeProxyNft,
        Mode::NodePortRemoteXdp,
        Mode::NodePortSkb,
        Mode::NodePortRemoteSkb,
        Mode::XdpDropCeiling,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Mode::KubeProxy => "macvlan + kube-proxy (iptables)",
            Mode::KubeProxyNft => "macvlan + kube-proxy (nftables)",
            Mode::Ebpf => "macvlan + underpass TC (eBPF)",
            Mode::SocketLb => "macvlan + underpass socket-LB",
            Mode::VethKubeProxy => "veth routed + kube-proxy (Calico's row)",
            Mode::VethEbpf => "veth routed + underpass TC (Cilium's row)",
            Mode::PodIpBare => "macvlan, Pod IP, no programs (the limit)",
            Mode::AaControl => "the limit again (A/A control)",
            Mode::PodIp => "macvlan, Pod IP, our programs attached",
            Mode::PodIpRouted => "macvlan across subnets, Pod IP",
            Mode::VethRouted => "veth routed by the nodes, Pod IP",
            Mode::Node => "node to node",
            Mode::NodePortKubeProxy => "nodePort, pod here: kube-proxy (iptables)",
            Mode::NodePortKubeProxyNft => "nodePort, pod here: kube-proxy (nftables)",
            Mode::NodePortXdp => "nodePort, pod here: underpass XDP",
            Mode::NodePortRemoteKubeProxy => "nodePort, pod elsewhere: kube-proxy (iptables)",
            Mode::NodePortRemoteKubeProxyNft => "nodePort, pod elsewhere: kube-proxy (nftables)",
            Mode::NodePortRemoteXdp => "nodePort, pod elsewhere: underpass XDP",
            Mode::NodePortSkb => "nodePort, pod here: underpass, skb path (generic XDP)",
            Mode::NodePortRemoteSkb => "nodePort, pod elsewhere: underpass, skb path (generic XDP)",
            Mode::XdpDropCeiling => "XDP_DROP on node1's uplink (the ceiling)",
        }
    }

    /// The seed's figure for this row, if it has one.
    pub fn seed(self, kind: Kind) -> Option<f64> {
        match self {
            Mode::KubeProxy => seed::cluster_ip(ClusterIpRow::MacvlanKubeProxy, kind),
            // The page has no nftables row.
            Mode::KubeProxyNft => None,
            Mode::Ebpf | Mode::SocketLb => seed::cluster_ip(ClusterIpRow::MacvlanEbpf, kind),
            Mode::VethKubeProxy => seed::cluster_ip(ClusterIpRow::CalicoKubeProxy, kind),
            Mode::VethEbpf => seed::cluster_ip(ClusterIpRow::CiliumEbpf, kind),
            // The seed's pods had nothing of ours attached.
            Mode::PodIpBare | Mode::AaControl => seed::pod_ip(PodIpRow::Macvlan, kind),
            Mode::PodIp => None,
            Mode::PodIpRouted => seed::pod_ip(PodIpRow::MacvlanRouted, kind),
            Mode::VethRouted => seed::pod_ip(PodIpRow::VethRouted, kind),
            Mode::Node => seed::pod_ip(PodIpRow::Node, kind),
            // The seeds measured no nodePort.
            _ => None,
        }
    }

    /// Reaches its server through kube-proxy's rules on the client's node.
    pub fn kube_proxy(self) -> Option<crate::cluster::KubeProxy> {
        use crate::cluster::KubeProxy;
        match self {
            Mode::KubeProxy
            | Mode::VethKubeProxy
            | Mode::NodePortKubeProxy
            | Mode::NodePortRemoteKubeProxy => Some(KubeProxy::Iptables),
            Mode::KubeProxyNft | Mode::NodePortKubeProxyNft | Mode::NodePortRemoteKubeProxyNft => {
                Some(KubeProxy::Nftables)
            }
            _ => None,
        }
    }

    /// Needs the underpass agent (its programs on the client).
    pub fn underpass(self) -> bool {
        matches!(
            self,
            Mode::Ebpf | Mode::SocketLb | Mode::VethEbpf | Mode::PodIp
        )
    }

    /// Reaches its server through a ClusterIP (the others: straight to
    /// a Pod IP or node address, the seed's Pod IP section).
    pub fn through_service(self) -> bool {
        matches!(
            self,
            Mode::KubeProxy
                | Mode::KubeProxyNft
                | Mode::Ebpf
                | Mode::SocketLb
                | Mode::VethKubeProxy
                | Mode::VethEbpf
        )
    }

    /// Reaches its server through a nodePort from outside the cluster.
    pub fn node_port(self) -> bool {
        matches!(
            self,
            Mode::NodePortKubeProxy
                | Mode::NodePortKubeProxyNft
                | Mode::NodePortXdp
                | Mode::NodePortRemoteKubeProxy
                | Mode::NodePortRemoteKubeProxyNft
                | Mode::NodePortRemoteXdp
                | Mode::NodePortSkb
                | Mode::NodePortRemoteSkb
        )
    }

    /// Needs underpass's XDP program on node1's uplink (in native mode,
    /// or in generic mode: [`Mode::skb_path`]).
    pub fn xdp(self) -> bool {
        matches!(
            self,
            Mode::NodePortXdp
                | Mode::NodePortRemoteXdp
                | Mode::NodePortSkb
                | Mode::NodePortRemoteSkb
        )
    }

    /// Its XDP program runs in generic mode, on socket buffers.
    pub fn skb_path(self) -> bool {
        matches!(self, Mode::NodePortSkb | Mode::NodePortRemoteSkb)
    }

    /// A row of the north-south testbed only (`--preset node-port`).
    pub fn north_south(self) -> bool {
        self.node_port() || self == Mode::XdpDropCeiling
    }

    /// Whether this row measures `kind`: the ceiling drops every packet,
    /// so it measures the packet rate alone.
    pub fn measures(self, kind: Kind) -> bool {
        self != Mode::XdpDropCeiling || kind == Kind::PacketRate
    }

    /// The row every ratio is taken against.
    pub const LIMIT: Mode = Mode::PodIpBare;
}

/// Which of the seed's tables a run reproduces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Preset {
    /// Every mode: the ClusterIP table with the Pod IP rows beside it.
    ClusterIp,
    /// The Pod IP table: macvlan on one subnet and across subnets, veth
    /// pods routed by their nodes, node to node; no service.
    PodIp,
    /// North-south: a client outside the cluster to node1's nodePort, of
    /// a pod on node1 and of one on node2, through kube-proxy (iptables,
    /// nftables) and underpass's XDP program; the limit is the same
    /// client straight to the pod on node1 (IPv4).
    NodePort,
}

impl Preset {
    /// The modes measured when `--mode` names none.
    pub fn modes(self) -> Vec<Mode> {
        match self {
            Preset::ClusterIp => Mode::ALL.into_iter().filter(|m| !m.north_south()).collect(),
            Preset::PodIp => Mode::ALL
                .into_iter()
                .filter(|m| !m.through_service() && !m.north_south())
                .collect(),
            Preset::NodePort => [Mode::PodIpBare, Mode::AaControl]
                .into_iter()
                .chain(Mode::ALL.into_iter().filter(|m| m.node_port()))
                .chain([Mode::XdpDropCeiling])
                .collect(),
        }
    }

    /// The ratios printed under each table (a / b) besides every row's
    /// ratio to the limit.
    pub fn ratios(self) -> &'static [(Mode, Mode)] {
        match self {
            Preset::ClusterIp => &[
                (Mode::Ebpf, Mode::KubeProxy),
                (Mode::VethEbpf, Mode::VethKubeProxy),
                (Mode::KubeProxyNft, Mode::KubeProxy),
            ],
            Preset::PodIp => &[(Mode::PodIpBare, Mode::Node)],
            Preset::NodePort => &[
                (Mode::NodePortXdp, Mode::NodePortKubeProxy),
                (Mode::NodePortRemoteXdp, Mode::NodePortRemoteKubeProxy),
                (Mode::NodePortKubeProxyNft, Mode::NodePortKubeProxy),
                (Mode::NodePortXdp, Mode::NodePortSkb),
                (Mode::NodePortXdp, Mode::XdpDropCeiling),
                (Mode::NodePortRemoteXdp, Mode::XdpDropCeiling),
            ],
        }
    }

    /// The result files' name: `<name>.json`, `<name>-<workload>.svg`.
    pub fn name(self) -> &'static str {
        match self {
            Preset::ClusterIp => "cluster-ip",
            Preset::PodIp => "pod-ip",
            Preset::NodePort => "node-port",
        }
    }
}

/// One value of `--mode`: a mode, or every mode of the preset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModeArg {
    All,
    One(Mode),
}

impl ModeArg {
    /// The modes `args` name, in the order given, each once, the limit
    /// first (every ratio is taken against it); the preset's when none or
    /// `all` is given.
    pub fn expand(args: &[ModeArg], preset: Preset) -> Vec<Mode> {
        if args.is_empty() || args.contains(&ModeArg::All) {
            return preset.modes();
        }
        let mut modes = vec![Mode::LIMIT];
        for arg in args {
            if let ModeArg::One(mode) = arg
                && !modes.contains(mode)
            {
                modes.push(*mode);
            }
        }
        modes
    }
}

pub fn parse_mode(value: &str) -> Result<ModeArg, String> {
    if value == "all" {
        return Ok(ModeArg::All);
    }
    Mode::from_str(value, true).map(ModeArg::One)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_or_nothing_means_the_presets_modes_and_a_list_keeps_its_order() {
        assert_eq!(
            ModeArg::expand(&[], Preset::ClusterIp),
            Mode::ALL[..12].to_vec()
        );
        assert_eq!(
            ModeArg::expand(&[], Preset::NodePort),
            [
                Mode::PodIpBare,
                Mode::AaControl,
                Mode::NodePortKubeProxy,
                Mode::NodePortKubeProxyNft,
                Mode::NodePortXdp,
                Mode::NodePortRemoteKubeProxy,
                Mode::NodePortRemoteKubeProxyNft,
                Mode::NodePortRemoteXdp,
                Mode::NodePortSkb,
                Mode::NodePortRemoteSkb,
                Mode::XdpDropCeiling
            ]
        );

        assert_eq!(ModeArg::expand(&[], Preset::PodIp), Preset::PodIp.modes());
        assert_eq!(
            Preset::PodIp.modes(),
            [
                Mode::PodIpBare,
                Mode::AaControl,
                Mode::PodIp,
                Mode::PodIpRouted,
                Mode::VethRouted,
                Mode::Node
            ]
        );
        assert_eq!(parse_mode("all"), Ok(ModeArg::All));
        assert_eq!(
            ModeArg::expand(&[ModeArg::One(Mode::Ebpf), ModeArg::All], Preset::ClusterIp),
            Preset::ClusterIp.modes()
        );
        let picked = ["socket-lb", "kube-proxy", "socket-lb"].map(|v| parse_mode(v).unwrap());
        assert_eq!(
            ModeArg::expand(&picked, Preset::PodIp),
            vec![Mode::PodIpBare, Mode::SocketLb, Mode::KubeProxy],
            "the limit first: every ratio is taken against it"
        );
        assert!(parse_mode("ebpff").is_err());
    }

    #[test]
    fn every_row_has_the_seeds_figure_where_the_page_gives_one() {
        // The page's sockperf figures, one per ClusterIP row.
        let latency: Vec<Option<f64>> = [
            Mode::KubeProxy,
            Mode::Ebpf,
            Mode::VethKubeProxy,
            Mode::VethEbpf,
            Mode::PodIpBare,
            Mode::Node,
        ]
        .map(|m| m.seed(Kind::Sockperf))
        .to_vec();
        assert_eq!(
            latency,
            [36.8, 27.7, 51.9, 30.2, 24.3, 32.2].map(Some).to_vec()
        );
        assert_eq!(Mode::Node.seed(Kind::RedisGet), None, "not on the page");
        assert_eq!(
            Mode::PodIp.seed(Kind::Sockperf),
            None,
            "the seed's pods had no programs attached"
        );
    }
}
