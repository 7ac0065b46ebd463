//! The kube-proxy baseline works as on a Spiderpool node: the client's
//! ClusterIP traffic takes the coordinator veth to its node, where
//! kube-proxy's own rules (iptables, then nftables; ip6tables and the
//! `ip6` table over IPv6) DNAT and masquerade it to a server on the other
//! node. In namespaces this test creates. The server sees the address of
//! the client's node (`node1`, `nodes[0]`) as the peer (kube-proxy's
//! masquerade), not the client's.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    process::Command,
    time::Duration,
};

use bench::{
    cluster::{KubeProxy, install_kube_proxy, remove_kube_proxy, service_cidr, service_objects},
    family::IpFamily,
    kubeproxy::service_ports,
};
use lab::{
    Namespace, PodSpec, Topology, standard_pods,
    topology::{NODE_ADDRESSES, NODE_ADDRESSES6},
    workload,
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 9, 9);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x99);

/// The peer addresses of the established TCP connections to `port` in
/// `namespace`, as its sockets see them (`ss`).
fn peers_of(namespace: &Namespace, port: u16) -> Vec<IpAddr> {
    let out = namespace
        .run(|| {
            Command::new("ss")
                .args(["-Htn", "state", "established"])
                .arg(format!("( sport = :{port} )"))
                .output()
        })
        .unwrap()
        .expect("running ss");
    assert!(
        out.status.success(),
        "ss: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|line| {
            // Recv-Q Send-Q Local:Port Peer:Port
            line.split_whitespace()
                .nth(3)
                .and_then(|peer| peer.rsplit_once(':'))
                .and_then(|(address, _)| address.trim_matches(['[', ']']).parse().ok())
                .unwrap_or_else(|| panic!("an `ss` line not understood: {line:?}"))
        })
        .collect()
}

fn through_the_node(family: IpFamily) {
    let pods: Vec<PodSpec> = standard_pods()
        .into_iter()
        .filter(|p| p.role == "client" || p.role == "server-b")
        .collect();
    let topo = Topology::build(&pods).expect("building the topology");
    let server = topo.pod("server-b");
    let (vip, server_address): (IpAddr, IpAddr) = match family {
        IpFamily::V4 => (VIP.into(), server.address.into()),
        IpFamily::V6 => (VIP6.into(), server.address6.unwrap().into()),
    };
    let _server =
        workload::tcp_server(&server.namespace, server_address, 8080, "server-b").unwrap();
    topo.add_coordinator_veth("client").unwrap();
    let route = |via_node: bool| topo.route_via_node("client", service_cidr(family), via_node);
    route(true).unwrap();
    let (service, slice) = service_objects("echo", vip, &[(80, 8080)], &[server_address]);
    let ports = service_ports(&[service], &[slice]);
    assert_eq!(ports.len(), 1, "{ports:?}");
    let frontend = SocketAddr::new(vip, 80);
    let ask = || {
        topo.pod("client")
            .namespace
            .run(|| workload::tcp_request(frontend, Duration::from_secs(2)))
            .unwrap()
    };

    // The client's node (node 0, where the rules run) as server-b sees it
    // on the wire after the masquerade.
    let (client_node, client_address): (IpAddr, IpAddr) = match family {
        IpFamily::V4 => (NODE_ADDRESSES[0].into(), topo.pod("client").address.into()),
        IpFamily::V6 => (
            NODE_ADDRESSES6[0].into(),
            topo.pod("client").address6.unwrap().into(),
        ),
    };
    for flavour in [KubeProxy::Iptables, KubeProxy::Nftables] {
        install_kube_proxy(&topo.nodes[0], &ports, flavour, family, None).unwrap();
        for _ in 0..3 {
            let answer = ask().unwrap_or_else(|e| panic!("{family} {flavour:?}: {e}"));
            assert_eq!(answer.server, "server-b");
            assert_eq!(answer.peer, frontend, "replies come back from the VIP");
        }
        let mut held = topo
            .pod("client")
            .namespace
            .run(|| workload::Conversation::open(frontend, Duration::from_secs(2)))
            .unwrap()
            .unwrap();
        assert_eq!(held.ask().unwrap(), "server-b");
        let peers = peers_of(&server.namespace, 8080);
        // (Earlier requests' connections may still be closing: all of
        // them came from the node too.)
        assert!(
            !peers.is_empty() && peers.iter().all(|&peer| peer == client_node),
            "{family} {flavour:?}: masqueraded to the node {client_node}, not the client \
             {client_address}: {peers:?}"
        );
        drop(held);
        remove_kube_proxy(&topo.nodes[0], flavour, family).unwrap();
    }
    // Without the rules, the ClusterIP leads nowhere: the test can fail.
    assert!(ask().is_err());
    // And without the route, the client's own gateway has no service CIDR.
    route(false).unwrap();
    assert!(ask().is_err());
}

#[test]
fn clusterip_through_the_node_with_kube_proxy_rules() {
    bench::require_root("the kube-proxy path test").unwrap();
    through_the_node(IpFamily::V4);
}

#[test]
fn ipv6_clusterip_through_the_node_with_kube_proxy_rules() {
    bench::require_root("the kube-proxy path test").unwrap();
    through_the_node(IpFamily::V6);
}
