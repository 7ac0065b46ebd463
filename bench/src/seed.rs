//! The seed's figures (Spiderpool's performance page) that the tables
//! print beside ours: here the Pod IP section, which `cluster-ip` and
//! `pod-ip` both show.

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
        Kind::Crr => [None; 4],
    };
    table[column]
}
