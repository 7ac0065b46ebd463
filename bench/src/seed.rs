//! The seed's figures (Spiderpool's performance page) that the tables
//! print beside ours: its Pod IP section and its ClusterIP section, as
//! the page gives them (sockperf µs, TCP_RR trans/s, iperf3 Gbit/s,
//! redis-benchmark requests/s).

use crate::workload::Kind;

/// A row of the seed's Pod IP section.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodIpRow {
    /// macvlan pods on one subnet.
    Macvlan,
    /// macvlan pods on two subnets, through the gateway.
    MacvlanRouted,
    /// veth pods routed by their nodes: Calico's figures (iptables, no
    /// tunnel), the seed's veth-wired row.
    VethRouted,
    /// Node to node.
    Node,
}

/// The seed's figure for `row` and `kind`, if it has one.
pub fn pod_ip(row: PodIpRow, kind: Kind) -> Option<f64> {
    let column = match row {
        PodIpRow::Macvlan => 0,
        PodIpRow::MacvlanRouted => 1,
        PodIpRow::VethRouted => 2,
        PodIpRow::Node => 3,
    };
    let table: [Option<f64>; 4] = match kind {
        Kind::Latency | Kind::Sockperf => [Some(24.3), Some(26.2), Some(51.3), Some(32.2)],
        Kind::Rr => [Some(19793.9), Some(19215.2), Some(9985.7), Some(47560.5)],
        Kind::Iperf1 => [Some(9.36), Some(9.36), Some(3.26), Some(9.41)],
        Kind::Iperf2 => [Some(9.37), Some(9.37), Some(4.56), Some(9.40)],
        Kind::Iperf4 => [Some(9.38), Some(9.38), Some(8.05), Some(9.42)],
        Kind::RedisGet => [Some(66357.00), Some(67444.45), Some(45682.96), None],
        Kind::RedisSet => [Some(66800.27), Some(67783.67), Some(46992.48), None],
        Kind::Crr | Kind::PacketRate => [None; 4],
    };
    table[column]
}

/// A row of the seed's ClusterIP section.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClusterIpRow {
    /// macvlan pods through kube-proxy (Spiderpool's coordinator veth).
    MacvlanKubeProxy,
    /// macvlan pods, "fully eBPF accelerated".
    MacvlanEbpf,
    /// Calico: veth pods routed by their nodes, kube-proxy's iptables.
    CalicoKubeProxy,
    /// Cilium: veth pods routed by their nodes, eBPF kube-proxy
    /// replacement.
    CiliumEbpf,
}

/// The seed's ClusterIP figure for `row` and `kind`, if it has one.
pub fn cluster_ip(row: ClusterIpRow, kind: Kind) -> Option<f64> {
    let column = match row {
        ClusterIpRow::MacvlanKubeProxy => 0,
        ClusterIpRow::MacvlanEbpf => 1,
        ClusterIpRow::CalicoKubeProxy => 2,
        ClusterIpRow::CiliumEbpf => 3,
    };
    let table: [Option<f64>; 4] = match kind {
        Kind::Latency | Kind::Sockperf => [Some(36.8), Some(27.7), Some(51.9), Some(30.2)],
        Kind::Rr => [Some(16002.3), Some(18992.9), Some(9782.2), Some(17236.5)],
        Kind::Iperf1 => [Some(3.42), Some(9.36), Some(3.06), Some(9.35)],
        Kind::Iperf2 => [Some(6.75), Some(9.38), Some(4.63), Some(9.35)],
        Kind::Iperf4 => [Some(9.24), Some(9.39), Some(8.02), Some(9.38)],
        Kind::RedisGet => [
            Some(45578.85),
            Some(63211.12),
            Some(46082.95),
            Some(60496.07),
        ],
        Kind::RedisSet => [
            Some(46274.87),
            Some(64061.50),
            Some(46728.97),
            Some(58927.52),
        ],
        Kind::Crr | Kind::PacketRate => [None; 4],
    };
    table[column]
}
