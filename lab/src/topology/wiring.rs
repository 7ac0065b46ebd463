//! The links that join namespaces: a veth across two, the wire between
//! the nodes, a macvlan or ipvlan child of a node's wire moved into a
//! pod, a veth from a pod to its node with the routes either way.

use std::{
    fs,
    net::{Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd,
};

use rtnetlink::{
    LinkIpVlan, LinkMacVlan, LinkUnspec, LinkVeth, RouteMessageBuilder,
    packet_route::link::{IpVlanMode, MacVlanMode},
};

use super::{
    COORDINATOR_GATEWAY, COORDINATOR_GATEWAY6, COORDINATOR_POD_SIDE6, Offloads, POD_IFACE, WIRE,
};
use crate::{
    error::{IPVLAN_UNSUPPORTED, Result, err},
    links::{add_address, add_route, index_of, set_up},
    namespace::Namespace,
};

/// A veth pair: `local` in `from`, its peer moved into `to` under the
/// name `peer` (each caller names, addresses and raises its ends).
pub(super) fn veth_across(
    from: &Namespace,
    to: &Namespace,
    local: &str,
    peer: &str,
    mtu: Option<u32>,
) -> Result<()> {
    let to_fd = fs::File::open(to.path()).map_err(|e| err(to.name(), "open", e))?;
    let to_raw = to_fd.as_raw_fd();
    let (a, b) = (local.to_owned(), peer.to_owned());
    from.netlink("create a veth pair", |h| async move {
        let mut pair = LinkVeth::new(&a, &b);
        if let Some(mtu) = mtu {
            pair = pair.mtu(mtu);
        }
        h.link()
            .add(pair.build())
            .execute()
            .await
            .map_err(|e| e.to_string())?;
        let index = index_of(&h, &b).await?;
        h.link()
            .set(
                LinkUnspec::new_with_index(index)
                    .setns_by_fd(to_raw)
                    .build(),
            )
            .execute()
            .await
            .map_err(|e| e.to_string())
    })
}

/// A veth pair named `name` in both nodes, up, no addresses, offloads
/// as `offloads` says for a node's NIC.
pub(super) fn join_nodes(
    node1: &Namespace,
    node2: &Namespace,
    name: &str,
    offloads: Offloads,
) -> Result<()> {
    let peer_name = format!("{name}peer");
    veth_across(node1, node2, name, &peer_name, None)?;
    let a = name.to_owned();
    node1.netlink("raise the wire", |h| async move { set_up(&h, &a).await })?;
    let (a, b) = (name.to_owned(), peer_name);
    node2.netlink("name the wire", |h| async move {
        let peer = index_of(&h, &b).await?;
        h.link()
            .set(LinkUnspec::new_with_index(peer).name(a).up().build())
            .execute()
            .await
            .map_err(|e| e.to_string())
    })?;
    for node in [node1, node2] {
        offloads.apply_to_nic(node, name)?;
    }
    Ok(())
}

/// The second wire, for ipvlan pods: a device takes macvlan or ipvlan
/// children, not both (the kernel answers EBUSY).
pub const IPVLAN_WIRE: &str = "ivwire";

/// The kinds of interface a pod can have on its node's wire.
#[derive(Clone, Copy, Debug)]
pub(super) enum WireChild {
    /// Bridge mode, with this MAC address.
    Macvlan([u8; 6]),
    /// L2 mode (the wire's MAC address).
    Ipvlan,
}

const IPVLAN_STEP: &str = "create an ipvlan";
/// Creates a `child` of `node`'s wire, moves it into `into` and names it
/// eth0 there.
pub(super) fn add_wire_child(
    node: &Namespace,
    into: &Namespace,
    temp_name: &str,
    child: WireChild,
) -> Result<()> {
    let target = fs::File::open(into.path()).map_err(|e| err(into.name(), "open", e))?;
    let target_fd = target.as_raw_fd();
    let temp = temp_name.to_owned();
    let step = match child {
        WireChild::Macvlan(_) => "create a macvlan",
        WireChild::Ipvlan => IPVLAN_STEP,
    };
    node.netlink(step, |h| async move {
        let parent = match child {
            WireChild::Macvlan(_) => WIRE,
            WireChild::Ipvlan => IPVLAN_WIRE,
        };
        let wire = index_of(&h, parent).await?;
        let link = match child {
            WireChild::Macvlan(mac) => LinkMacVlan::new(&temp, wire, MacVlanMode::Bridge)
                .address(mac.to_vec())
                .build(),
            WireChild::Ipvlan => LinkIpVlan::new(&temp, wire, IpVlanMode::L2).build(),
        };
        h.link().add(link).execute().await.map_err(|e| match e {
            rtnetlink::Error::NetlinkError(m)
                if matches!(child, WireChild::Ipvlan)
                    && (m.raw_code() == -libc::EOPNOTSUPP || m.raw_code() == -libc::ENOENT) =>
            {
                format!("{IPVLAN_UNSUPPORTED}: {m}")
            }
            e => e.to_string(),
        })?;
        let index = index_of(&h, &temp).await?;
        h.link()
            .set(
                LinkUnspec::new_with_index(index)
                    .setns_by_fd(target_fd)
                    .build(),
            )
            .execute()
            .await
            .map_err(|e| e.to_string())
    })?;
    drop(target);
    let temp = temp_name.to_owned();
    into.netlink("rename the pod's interface to eth0", |h| async move {
        let index = index_of(&h, &temp).await?;
        h.link()
            .set(
                LinkUnspec::new_with_index(index)
                    .name(POD_IFACE.to_owned())
                    .build(),
            )
            .execute()
            .await
            .map_err(|e| e.to_string())
    })
}

/// A veth from `pod` (named `pod_iface` there) to `node` (`host_side`):
/// the node answers on [`COORDINATOR_GATEWAY`] (and, with `address6`, on
/// the link-local [`COORDINATOR_GATEWAY6`]), routes `address`/32 (and
/// `address6`/128) back into the veth and forwards; the pod reaches the
/// gateway on the link. With `own_address`, the veth is the pod's
/// interface: it carries the pod's /32 (and /128) and default routes.
#[allow(clippy::too_many_arguments)]
pub(super) fn wire_veth_to_node(
    node: &Namespace,
    pod: &Namespace,
    host_side: &str,
    pod_iface: &str,
    address: Ipv4Addr,
    address6: Option<Ipv6Addr>,
    own_address: bool,
    offloads: Offloads,
) -> Result<()> {
    // Both ends' IPv6 addresses usable at once: the veth's ends take
    // their namespace's defaults when made (or moved), and a tentative
    // gateway would not answer neighbour solicitations for a second.
    // (The kernel skips duplicate detection only when `all` says so too.)
    for namespace in [node, pod] {
        namespace.sysctl("net.ipv6.conf.default.accept_dad", "0")?;
        namespace.sysctl("net.ipv6.conf.all.accept_dad", "0")?;
    }
    let temp = format!("{host_side}p");
    veth_across(node, pod, host_side, &temp, None)?;
    let host = host_side.to_owned();
    node.netlink("address the node's end of the pod's veth", |h| async move {
        let host_index = index_of(&h, &host).await?;
        add_address(&h, host_index, COORDINATOR_GATEWAY.into(), 32).await?;
        if address6.is_some() {
            add_address(&h, host_index, COORDINATOR_GATEWAY6.into(), 64).await?;
        }
        set_up(&h, &host).await?;
        // The host routes back to the pod.
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(address, 32)
            .output_interface(host_index)
            .build();
        add_route(&h, route).await?;
        if let Some(address6) = address6 {
            let route = RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(address6, 128)
                .output_interface(host_index);
            // On the veth itself the address answers for itself; held
            // by the pod's other interface, through the pod's own
            // link-local address on the veth.
            let route = if own_address {
                route
            } else {
                route.gateway(COORDINATOR_POD_SIDE6)
            };
            add_route(&h, route.build()).await?;
        }
        Ok(())
    })?;
    node.sysctl("net.ipv4.ip_forward", "1")?;
    if address6.is_some() {
        node.sysctl("net.ipv6.conf.all.forwarding", "1")?;
    }
    offloads.apply(node, host_side)?;
    let name = pod_iface.to_owned();
    pod.netlink("set up the pod's veth", |h| async move {
        let index = index_of(&h, &temp).await?;
        h.link()
            .set(LinkUnspec::new_with_index(index).name(name).up().build())
            .execute()
            .await
            .map_err(|e| e.to_string())?;
        if own_address {
            add_address(&h, index, address.into(), 32).await?;
            if let Some(address6) = address6 {
                add_address(&h, index, address6.into(), 128).await?;
            }
        } else if address6.is_some() {
            add_address(&h, index, COORDINATOR_POD_SIDE6.into(), 64).await?;
        }
        let link = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(COORDINATOR_GATEWAY, 32)
            .output_interface(index)
            .scope(rtnetlink::packet_route::route::RouteScope::Link)
            .build();
        add_route(&h, link).await?;
        if own_address {
            let default = RouteMessageBuilder::<Ipv4Addr>::new()
                .gateway(COORDINATOR_GATEWAY)
                .build();
            add_route(&h, default).await?;
            if address6.is_some() {
                // A link-local next hop names its interface.
                let default = RouteMessageBuilder::<Ipv6Addr>::new()
                    .gateway(COORDINATOR_GATEWAY6)
                    .output_interface(index)
                    .build();
                add_route(&h, default).await?;
            }
        }
        Ok(())
    })?;
    offloads.apply(pod, pod_iface)
}
