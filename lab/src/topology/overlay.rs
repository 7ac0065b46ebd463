//! Pods on a flannel-vxlan style overlay: a bridge per node, the nodes
//! joined by a VXLAN tunnel over the wire.

use std::net::Ipv4Addr;

use rtnetlink::{LinkBridge, LinkUnspec, LinkVxlan, RouteMessageBuilder};

use super::{
    NODE_ADDRESSES, Pod, PodSpec, Topology, WIRE, overlay_gateway, overlay_subnet, overlay_vtep,
    wiring::veth_across,
};
use crate::{
    error::Result,
    links::{add_address, add_route, index_of},
    namespace::Namespace,
};

/// The overlay's bridge and VXLAN device names (flannel's).
const OVERLAY_BRIDGE: &str = "cni0";
const OVERLAY_VXLAN: &str = "flannel.1";
/// The wire's 1500 minus VXLAN's 50 bytes of headers.
const OVERLAY_MTU: u32 = 1450;

impl Topology {
    /// A pod on a flannel-vxlan style overlay: a veth into its node's
    /// bridge `cni0` (10.244.<node+1>.1/24), the nodes joined by a VXLAN
    /// device `flannel.1` (VNI 1, UDP 8472, over the wire) that carries
    /// each node's pod subnet; `spec.address` must lie in 10.244.<node+1>.0/24.
    pub fn add_overlay_pod(&mut self, spec: &PodSpec) -> Result<()> {
        self.ensure_overlay()?;
        let index = self.pods.len();
        let namespace = Namespace::create(&format!("{}-{}", self.prefix, spec.role))?;
        let node = &self.nodes[spec.node];
        let (host, temp) = (format!("vx{index}"), format!("vx{index}p"));
        veth_across(node, &namespace, &host, &temp, Some(OVERLAY_MTU))?;
        let h1 = host.clone();
        node.netlink("plug the pod into cni0", |h| async move {
            let bridge = index_of(&h, OVERLAY_BRIDGE).await?;
            let own = index_of(&h, &h1).await?;
            h.link()
                .set(
                    LinkUnspec::new_with_index(own)
                        .controller(bridge)
                        .up()
                        .build(),
                )
                .execute()
                .await
                .map_err(|e| e.to_string())
        })?;
        self.offloads.apply(node, &host)?;
        let (address, gateway) = (spec.address, overlay_gateway(spec.node));
        namespace.netlink("address the overlay pod", |h| async move {
            let index = index_of(&h, &temp).await?;
            h.link()
                .set(
                    LinkUnspec::new_with_index(index)
                        .name(Pod::IFACE.to_owned())
                        .mtu(OVERLAY_MTU)
                        .up()
                        .build(),
                )
                .execute()
                .await
                .map_err(|e| e.to_string())?;
            add_address(&h, index, address.into(), 24).await?;
            let default = RouteMessageBuilder::<Ipv4Addr>::new()
                .gateway(gateway)
                .build();
            add_route(&h, default).await
        })?;
        self.offloads.apply(&namespace, Pod::IFACE)?;
        self.pods.push(Pod {
            role: spec.role.to_owned(),
            namespace,
            node: spec.node,
            address: spec.address,
            gateway,
            address6: None,
            mac: [0; 6],
        });
        Ok(())
    }

    /// The overlay's bridges and VXLAN devices, made on first use.
    fn ensure_overlay(&mut self) -> Result<()> {
        if self.overlay {
            return Ok(());
        }
        for n in 0..2 {
            let node = &self.nodes[n];
            let (local, remote) = (NODE_ADDRESSES[n], NODE_ADDRESSES[1 - n]);
            let (bridge_address, vtep, remote_vtep) =
                (overlay_gateway(n), overlay_vtep(n), overlay_vtep(1 - n));
            node.netlink("build the overlay", |h| async move {
                h.link()
                    .add(LinkBridge::new(OVERLAY_BRIDGE).build())
                    .execute()
                    .await
                    .map_err(|e| e.to_string())?;
                let bridge = index_of(&h, OVERLAY_BRIDGE).await?;
                add_address(&h, bridge, bridge_address.into(), 24).await?;
                let wire = index_of(&h, WIRE).await?;
                // Unicast to the one peer node: ARP for the peer's VTEP
                // address crosses the tunnel, as flannel's static
                // neighbour and FDB entries would arrange.
                h.link()
                    .add(
                        LinkVxlan::new(OVERLAY_VXLAN, 1)
                            .dev(wire)
                            .local(local)
                            .remote(remote)
                            .port(8472)
                            .learning(false)
                            .up()
                            .build(),
                    )
                    .execute()
                    .await
                    .map_err(|e| e.to_string())?;
                let vxlan = index_of(&h, OVERLAY_VXLAN).await?;
                add_address(&h, vxlan, vtep.into(), 32).await?;
                let route = RouteMessageBuilder::<Ipv4Addr>::new()
                    .destination_prefix(overlay_subnet(1 - n), 24)
                    .gateway(remote_vtep)
                    .output_interface(vxlan)
                    .onlink()
                    .build();
                add_route(&h, route).await
            })?;
            node.sysctl("net.ipv4.ip_forward", "1")?;
        }
        self.overlay = true;
        Ok(())
    }
}
