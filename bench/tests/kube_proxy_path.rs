//! The kube-proxy baseline works as on a Spiderpool node: the client's
//! ClusterIP traffic takes the coordinator veth to its node, where
//! kube-proxy's own rules (iptables, then nftables) DNAT and masquerade
//! it to a server on the other node. In namespaces this test creates.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use bench::{
    cluster::{KubeProxy, SERVICE_CIDR, install_kube_proxy, remove_kube_proxy, service_objects},
    kubeproxy::service_ports,
};
use lab::{PodSpec, Topology, standard_pods, workload};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 9, 9);

#[test]
fn clusterip_through_the_node_with_kube_proxy_rules() {
    bench::require_root("the kube-proxy path test").unwrap();
    let pods: Vec<PodSpec> = standard_pods()
        .into_iter()
        .filter(|p| p.role == "client" || p.role == "server-b")
        .collect();
    let topo = Topology::build(&pods).expect("building the topology");
    let server = topo.pod("server-b");
    let _server =
        workload::tcp_server(&server.namespace, server.address, 8080, "server-b").unwrap();
    topo.add_coordinator_veth("client").unwrap();
    topo.route_via_node("client", SERVICE_CIDR, true).unwrap();
    let (service, slice) = service_objects("echo", VIP, &[(80, 8080)], &[server.address]);
    let ports = service_ports(&[service], &[slice]);
    let ask = || {
        topo.pod("client")
            .namespace
            .run(|| workload::tcp_request(SocketAddrV4::new(VIP, 80), Duration::from_secs(2)))
            .unwrap()
    };

    for flavour in [KubeProxy::Iptables, KubeProxy::Nftables] {
        install_kube_proxy(&topo.nodes[0], &ports, flavour, None).unwrap();
        for _ in 0..3 {
            let answer = ask().unwrap_or_else(|e| panic!("{flavour:?}: {e}"));
            assert_eq!(answer.server, "server-b");
            assert_eq!(
                answer.peer,
                SocketAddrV4::new(VIP, 80).into(),
                "replies come back from the VIP"
            );
        }
        remove_kube_proxy(&topo.nodes[0], flavour).unwrap();
    }
    // Without the rules, the ClusterIP leads nowhere: the test can fail.
    assert!(ask().is_err());
    // And without the route, the client's own gateway has no service CIDR.
    topo.route_via_node("client", SERVICE_CIDR, false).unwrap();
    assert!(ask().is_err());
}
