//! Veth pods routed by their nodes (Calico without a tunnel, Cilium's
//! native routing, flannel's host-gw), directly or through a router
//! standing for a cloud VPC's route table (flannel's aws-vpc).

use std::net::{Ipv4Addr, Ipv6Addr};

use rtnetlink::{LinkUnspec, RouteMessageBuilder};

use super::{
    COORDINATOR_GATEWAY, NODE_ADDRESSES, NODE_ADDRESSES6, Pod, PodSpec, Topology, routed_ipv6_of,
    router_link_address,
    wiring::{veth_across, wire_veth_to_node},
};
use crate::{
    error::Result,
    links::{add_address, add_route, index_of, set_up},
    namespace::Namespace,
};

impl Topology {
    /// A pod wired as Calico (no tunnel) or Cilium wire theirs: its only
    /// interface is a veth to its node, its address a /32, its default
    /// route the node's link-local address; the nodes route each other's
    /// pods over the wire (flannel's host-gw). Dual-stack: a pod at
    /// 10.79.n.h is also fd79:n::h/128, routed the same way over the
    /// nodes' IPv6 addresses.
    pub fn add_veth_pod(&mut self, spec: &PodSpec) -> Result<()> {
        self.add_routed_veth_pod(spec, false)
    }

    /// A veth pod as [`Topology::add_veth_pod`], but the other node routes
    /// to it through the gateway namespace, standing for a cloud VPC's
    /// route table (flannel's aws-vpc): node → router → node.
    pub fn add_veth_pod_via_router(&mut self, spec: &PodSpec) -> Result<()> {
        self.add_routed_veth_pod(spec, true)
    }

    fn add_routed_veth_pod(&mut self, spec: &PodSpec, via_router: bool) -> Result<()> {
        let index = self.pods.len();
        let namespace = Namespace::create(&format!("{}-{}", self.prefix, spec.role))?;
        // The router (a VPC route table) is IPv4 only.
        let address6 = routed_ipv6_of(spec.address).filter(|_| !via_router);
        wire_veth_to_node(
            &self.nodes[spec.node],
            &namespace,
            &format!("vp{index}"),
            Pod::IFACE,
            spec.address,
            address6,
            true,
            self.offloads,
        )?;
        let other = 1 - spec.node;
        let hops = if via_router {
            self.ensure_router()?;
            let router = self.router.as_ref().expect("ensured");
            vec![
                (&self.nodes[other], router_link_address(other, true)),
                (router, router_link_address(spec.node, false)),
            ]
        } else {
            vec![(&self.nodes[other], NODE_ADDRESSES[spec.node])]
        };
        for (namespace, via) in hops {
            let address = spec.address;
            namespace.netlink("route to the pod", |h| async move {
                let route = RouteMessageBuilder::<Ipv4Addr>::new()
                    .destination_prefix(address, 32)
                    .gateway(via)
                    .build();
                add_route(&h, route).await
            })?;
            namespace.sysctl("net.ipv4.ip_forward", "1")?;
        }
        if let Some(address6) = address6 {
            let via = NODE_ADDRESSES6[spec.node];
            self.nodes[other].netlink("route to the pod over IPv6", |h| async move {
                let route = RouteMessageBuilder::<Ipv6Addr>::new()
                    .destination_prefix(address6, 128)
                    .gateway(via)
                    .build();
                add_route(&h, route).await
            })?;
            self.nodes[other].sysctl("net.ipv6.conf.all.forwarding", "1")?;
        }
        self.pods.push(Pod {
            role: spec.role.to_owned(),
            namespace,
            node: spec.node,
            address: spec.address,
            gateway: COORDINATOR_GATEWAY,
            address6,
            mac: [0; 6],
        });
        Ok(())
    }

    /// The router namespace, made on first use: a veth `vpc` from each
    /// node to it (node `n` at 10.81.n.2/24, the router at 10.81.n.1).
    fn ensure_router(&mut self) -> Result<()> {
        if self.router.is_none() {
            let router = Namespace::create(&format!("{}-router", self.prefix))?;
            for n in 0..2 {
                let node = &self.nodes[n];
                let (router_side, temp) = (format!("vpc{n}"), format!("vpc{n}p"));
                veth_across(&router, node, &router_side, &temp, None)?;
                let local = router_link_address(n, true);
                let a = router_side.clone();
                router.netlink("address the router's link to a node", |h| async move {
                    let own = index_of(&h, &a).await?;
                    add_address(&h, own, local.into(), 24).await?;
                    set_up(&h, &a).await
                })?;
                let remote = router_link_address(n, false);
                node.netlink("address the node's router link", |h| async move {
                    let index = index_of(&h, &temp).await?;
                    h.link()
                        .set(
                            LinkUnspec::new_with_index(index)
                                .name("vpc".to_owned())
                                .up()
                                .build(),
                        )
                        .execute()
                        .await
                        .map_err(|e| e.to_string())?;
                    add_address(&h, index, remote.into(), 24).await
                })?;
                self.offloads.apply(node, "vpc")?;
                self.offloads.apply(&router, &router_side)?;
            }
            router.sysctl("net.ipv4.ip_forward", "1")?;
            self.router = Some(router);
        }
        Ok(())
    }
}
