//! The topology's fixed addresses and names: subnets, nodes, gateways,
//! the overlay's and the router's address plans.

use std::net::{Ipv4Addr, Ipv6Addr};

/// Every pod's own interface.
pub const POD_IFACE: &str = "eth0";
/// The pod subnets and their gateway addresses (on the gateway namespace).
pub const SUBNETS: [(Ipv4Addr, Ipv4Addr); 2] = [
    (Ipv4Addr::new(10, 77, 0, 0), Ipv4Addr::new(10, 77, 0, 254)),
    (Ipv4Addr::new(10, 78, 0, 0), Ipv4Addr::new(10, 78, 0, 254)),
];
/// The pod subnets' IPv6 twins (/64) and their gateway addresses: a
/// macvlan pod at 10.77.0.x is also fd77::x (`ipv6_of`), so the topology
/// is dual-stack as Spiderpool's pools are by default.
pub const SUBNETS6: [(Ipv6Addr, Ipv6Addr); 2] = [
    (
        Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 0),
        Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 0xfe),
    ),
    (
        Ipv6Addr::new(0xfd78, 0, 0, 0, 0, 0, 0, 0),
        Ipv6Addr::new(0xfd78, 0, 0, 0, 0, 0, 0, 0xfe),
    ),
];
pub const NODE_ADDRESSES: [Ipv4Addr; 2] =
    [Ipv4Addr::new(10, 77, 0, 101), Ipv4Addr::new(10, 77, 0, 102)];
/// The nodes' IPv6 addresses on the wire: their IPv4 ones' twins
/// (`ipv6_of`), so node to node and kube-proxy's masquerade work over
/// IPv6 as over IPv4.
pub const NODE_ADDRESSES6: [Ipv6Addr; 2] = [
    Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 101),
    Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 102),
];
/// The pod's side of the coordinator veth (Spiderpool's name).
pub const COORDINATOR_IFACE: &str = "veth0";
/// The node's address on every coordinator veth (link-local, as
/// Spiderpool and Calico use one such address per node).
pub const COORDINATOR_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// Its IPv6 twin: a link-local address of the node on every veth to a
/// pod, the next hop of the pod's IPv6 routes through its node.
pub const COORDINATOR_GATEWAY6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
/// The pod's link-local address on its coordinator veth: the node's
/// next hop back to the pod's IPv6 address, which lives on the pod's
/// other interface (an IPv6 node answers neighbour solicitations only
/// for the addresses of the interface asked, unlike ARP).
pub const COORDINATOR_POD_SIDE6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 2);
/// The wire's interface name in both node namespaces.
pub const WIRE: &str = "wire";

/// Node `n`'s overlay pod subnet (/24).
pub fn overlay_subnet(n: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, n as u8 + 1, 0)
}

/// Node `n`'s bridge address, its overlay pods' gateway.
pub(super) fn overlay_gateway(n: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, n as u8 + 1, 1)
}

/// Node `n`'s VXLAN device address (flannel gives it the subnet's .0).
pub(super) fn overlay_vtep(n: usize) -> Ipv4Addr {
    overlay_subnet(n)
}

/// Node `n`'s link to the router: the router's end (`router_end`) or the
/// node's.
pub(super) fn router_link_address(n: usize, router_end: bool) -> Ipv4Addr {
    Ipv4Addr::new(10, 81, n as u8, if router_end { 1 } else { 2 })
}

/// The gateway of the subnet `address` belongs to.
pub fn subnet_gateway(address: Ipv4Addr) -> Ipv4Addr {
    SUBNETS
        .iter()
        .find(|(net, _)| net.octets()[..3] == address.octets()[..3])
        .map(|(_, gw)| *gw)
        .unwrap_or(SUBNETS[0].1)
}

/// A pod's IPv6 address: its IPv4 address's host part in its subnet's
/// IPv6 twin (`None` outside the two pod subnets).
pub fn ipv6_of(address: Ipv4Addr) -> Option<Ipv6Addr> {
    let o = address.octets();
    let subnet = SUBNETS
        .iter()
        .position(|(net, _)| net.octets()[..3] == o[..3])?;
    let net = SUBNETS6[subnet].0.segments();
    Some(Ipv6Addr::new(net[0], 0, 0, 0, 0, 0, 0, u16::from(o[3])))
}

/// A routed veth pod's IPv6 address: 10.79.n.h is fd79:n::h (`None`
/// outside 10.79.0.0/16, the routed pods' addresses).
pub fn routed_ipv6_of(address: Ipv4Addr) -> Option<Ipv6Addr> {
    let o = address.octets();
    (o[..2] == [10, 79])
        .then(|| Ipv6Addr::new(0xfd79, u16::from(o[2]), 0, 0, 0, 0, 0, u16::from(o[3])))
}

/// The IPv6 gateway of the subnet `address` belongs to.
pub fn subnet_gateway6(address: Ipv6Addr) -> Ipv6Addr {
    SUBNETS6
        .iter()
        .find(|(net, _)| net.segments()[..4] == address.segments()[..4])
        .map(|(_, gw)| *gw)
        .unwrap_or(SUBNETS6[0].1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_have_an_ipv6_twin_in_their_subnets_twin() {
        let twin = ipv6_of(Ipv4Addr::new(10, 78, 0, 5)).unwrap();
        assert_eq!(twin, "fd78::5".parse::<Ipv6Addr>().unwrap());
        assert_eq!(
            subnet_gateway6(twin),
            "fd78::fe".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(
            ipv6_of(Ipv4Addr::new(10, 77, 0, 2)),
            Some("fd77::2".parse().unwrap())
        );
        assert_eq!(ipv6_of(Ipv4Addr::new(10, 244, 1, 2)), None, "overlay pods");
        assert_eq!(
            routed_ipv6_of(Ipv4Addr::new(10, 79, 2, 3)),
            Some("fd79:2::3".parse().unwrap())
        );
        assert_eq!(routed_ipv6_of(Ipv4Addr::new(10, 77, 0, 2)), None);
        assert_eq!(ipv6_of(NODE_ADDRESSES[1]), Some(NODE_ADDRESSES6[1]));
    }

    #[test]
    fn pods_route_via_their_own_subnet_gateway() {
        assert_eq!(
            subnet_gateway(Ipv4Addr::new(10, 78, 0, 5)),
            Ipv4Addr::new(10, 78, 0, 254)
        );
        assert_eq!(
            subnet_gateway(Ipv4Addr::new(10, 77, 0, 2)),
            Ipv4Addr::new(10, 77, 0, 254)
        );
    }
}
