//! The namespace topology shared by the e2e tests, the demo and the bench:
//! two node namespaces joined by a veth "wire", a gateway that answers ARP
//! and routes between two pod subnets, and macvlan pods on each node's end
//! of the wire. Dual-stack: every macvlan pod also has an IPv6 address in
//! its subnet's twin (10.77.0.x is fd77::x, 10.78.0.x fd78::x; the
//! gateway is ::fe of each), reached by NDP on the wire.
//!
//! ```text
//!   pod c (10.77.0.2)  pod a (.3)             pod b (.4)  pod r (10.78.0.5)  gw (.254 / 10.78.0.254)
//!        \             /                           \          |            /
//!       macvlan (bridge) on "wire"                 macvlan (bridge) on "wire"
//!   node1 [wire 10.77.0.101] ========= veth ========= [wire 10.77.0.102] node2
//! ```
//!
//! Every namespace is named `<prefix>-<role>`, where the prefix carries our
//! pid, so that a run removes exactly what it made: on drop (also while
//! unwinding from a failed test) and, for runs killed outright, by the
//! next run's sweep of prefixes whose process is gone.

mod addresses;
mod overlay;
mod routed;
mod wiring;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use rtnetlink::RouteMessageBuilder;

pub use self::addresses::*;
pub use self::wiring::IPVLAN_WIRE;
use self::wiring::{WireChild, add_wire_child, join_nodes, wire_veth_to_node};
pub use crate::error::IPVLAN_UNSUPPORTED;
use crate::{
    error::Result,
    links::{add_address, add_route, index_of, link_by_name, set_up},
    namespace::Namespace,
    prefix::{sweep_stale, unique_prefix},
};

/// A pod: a namespace whose `eth0` is a macvlan on its node's wire.
#[derive(Debug)]
pub struct Pod {
    pub role: String,
    pub namespace: Namespace,
    pub node: usize,
    pub address: Ipv4Addr,
    pub gateway: Ipv4Addr,
    /// Its IPv6 address (fd77::/64, fd78::/64) on a macvlan or ipvlan
    /// pod: IPv6 reaches its neighbours by NDP on the wire and other
    /// subnets through the gateway's `::fe`; fd79:n::h on a veth pod its
    /// nodes route. `None` on overlay pods and pods behind the router.
    pub address6: Option<Ipv6Addr>,
    pub mac: [u8; 6],
}

impl Pod {
    pub const IFACE: &'static str = POD_IFACE;
}

/// What to build.
#[derive(Clone, Debug)]
pub struct PodSpec {
    pub role: &'static str,
    /// 0 = node1, 1 = node2.
    pub node: usize,
    pub address: Ipv4Addr,
}

/// The standard e2e/demo layout: a client and a same-subnet server on
/// node1, a same-subnet server and a routed (other subnet) server on node2.
pub fn standard_pods() -> Vec<PodSpec> {
    vec![
        PodSpec {
            role: "client",
            node: 0,
            address: Ipv4Addr::new(10, 77, 0, 2),
        },
        PodSpec {
            role: "server-a",
            node: 0,
            address: Ipv4Addr::new(10, 77, 0, 3),
        },
        PodSpec {
            role: "server-b",
            node: 1,
            address: Ipv4Addr::new(10, 77, 0, 4),
        },
        PodSpec {
            role: "server-c",
            node: 1,
            address: Ipv4Addr::new(10, 78, 0, 5),
        },
    ]
}

/// What the topology's devices do with offloads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offloads {
    /// Transmit checksum offload off on every veth (and so TSO): every
    /// checksum is computed in software and a wrong one is caught by the
    /// receiver — for tests of packet rewriting.
    ChecksumsInSoftware,
    /// As real devices have them: a veth's as the kernel makes it (tx
    /// checksumming, scatter-gather, TSO, GSO on; GRO off), and the
    /// wire, which stands for the nodes' NICs, with GRO on as a NIC has
    /// it — forwarding hops carry 64 KB GSO packets as on a real node.
    /// For benches.
    AsRealDevices,
}

impl Offloads {
    /// Applies the policy to `iface` in `namespace` (just made).
    pub(crate) fn apply(self, namespace: &Namespace, iface: &str) -> Result<()> {
        match self {
            Offloads::ChecksumsInSoftware => namespace.disable_tx_checksum(iface),
            Offloads::AsRealDevices => Ok(()),
        }
    }

    /// Applies the policy to `iface`, a device standing for a node's NIC.
    pub(crate) fn apply_to_nic(self, namespace: &Namespace, iface: &str) -> Result<()> {
        match self {
            Offloads::ChecksumsInSoftware => namespace.disable_tx_checksum(iface),
            Offloads::AsRealDevices => namespace.enable_gro(iface),
        }
    }
}

/// The built topology. Dropping it deletes every namespace it made.
#[derive(Debug)]
pub struct Topology {
    pub prefix: String,
    pub pods: Vec<Pod>,
    pub gateway: Namespace,
    pub nodes: [Namespace; 2],
    /// A router joined to each node by its own link (a cloud VPC's route
    /// table), made by the first pod routed through it.
    pub router: Option<Namespace>,
    /// Whether the VXLAN overlay (bridges, tunnel) exists.
    overlay: bool,
    /// Whether the ipvlan pods' wire exists.
    ipvlan_wire: bool,
    /// Offloads of every device it makes.
    offloads: Offloads,
    /// XDP programs on the wire's ends (`receive_xdp_tx`).
    xdp_links: Vec<datapath_user::loader::XdpVerdictLink>,
}

impl Topology {
    /// Builds the two-node topology with `pods`, checksums in software
    /// (the tests').
    pub fn build(pods: &[PodSpec]) -> Result<Self> {
        Self::build_with(pods, Offloads::ChecksumsInSoftware)
    }

    /// Builds the two-node topology with `pods` and `offloads`.
    pub fn build_with(pods: &[PodSpec], offloads: Offloads) -> Result<Self> {
        sweep_stale();
        let prefix = unique_prefix();
        let node1 = Namespace::create(&format!("{prefix}-node1"))?;
        let node2 = Namespace::create(&format!("{prefix}-node2"))?;
        let gateway = Namespace::create(&format!("{prefix}-gw"))?;
        // Every device the nodes get has its IPv6 addresses at once (no
        // duplicate detection to wait for).
        for node in [&node1, &node2] {
            node.sysctl("net.ipv6.conf.default.accept_dad", "0")?;
            node.sysctl("net.ipv6.conf.all.accept_dad", "0")?;
        }

        // The wire: a veth pair, one end per node.
        join_nodes(&node1, &node2, WIRE, offloads)?;
        for (node, address, address6) in [
            (&node1, NODE_ADDRESSES[0], NODE_ADDRESSES6[0]),
            (&node2, NODE_ADDRESSES[1], NODE_ADDRESSES6[1]),
        ] {
            node.netlink("address the wire", |h| async move {
                let wire = index_of(&h, WIRE).await?;
                add_address(&h, wire, address.into(), 24).await?;
                add_address(&h, wire, address6.into(), 64).await?;
                set_up(&h, WIRE).await
            })?;
        }

        // The gateway: a macvlan on node2's wire holding both subnets'
        // gateway addresses, forwarding between them.
        let gateway_mac = [0x02, 0x77, 0xfe, 0, 0, 0xfe];
        add_wire_child(&node2, &gateway, "mvgw", WireChild::Macvlan(gateway_mac))?;
        // IPv6 before the link is up: no duplicate detection to wait for
        // (its link-local address included), forwarding on.
        gateway.sysctl("net.ipv6.conf.all.accept_dad", "0")?;
        gateway.sysctl("net.ipv6.conf.eth0.accept_dad", "0")?;
        gateway.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        gateway.netlink("address the gateway", |h| async move {
            let eth0 = index_of(&h, Pod::IFACE).await?;
            for (_, gw) in SUBNETS {
                add_address(&h, eth0, gw.into(), 24).await?;
            }
            for (_, gw) in SUBNETS6 {
                add_address(&h, eth0, gw.into(), 64).await?;
            }
            set_up(&h, Pod::IFACE).await
        })?;
        gateway.sysctl("net.ipv4.ip_forward", "1")?;
        // Same-interface forwarding between subnets would otherwise make it
        // send redirects, which the pods would learn from.
        gateway.sysctl("net.ipv4.conf.all.send_redirects", "0")?;
        gateway.sysctl("net.ipv4.conf.eth0.send_redirects", "0")?;

        let mut topology = Self {
            prefix,
            pods: Vec::new(),
            gateway,
            nodes: [node1, node2],
            router: None,
            overlay: false,
            ipvlan_wire: false,
            offloads,
            xdp_links: Vec::new(),
        };
        for spec in pods {
            topology.add_pod(spec)?;
        }
        Ok(topology)
    }

    /// Adds a macvlan pod on its node (also after the topology is built:
    /// a pod appearing while an agent watches).
    pub fn add_pod(&mut self, spec: &PodSpec) -> Result<&Pod> {
        let octets = spec.address.octets();
        let mac = [
            0x02,
            0x77,
            octets[1],
            octets[2],
            octets[3],
            self.pods.len() as u8,
        ];
        self.add_wire_pod(spec, WireChild::Macvlan(mac))
    }

    /// Adds an ipvlan (L2 mode) pod on its node's wire: like a macvlan pod
    /// but sharing the wire's MAC address. Fails with
    /// [`TopologyError::is_unsupported`] when the kernel has no IPVLAN.
    pub fn add_ipvlan_pod(&mut self, spec: &PodSpec) -> Result<&Pod> {
        if !self.ipvlan_wire {
            join_nodes(&self.nodes[0], &self.nodes[1], IPVLAN_WIRE, self.offloads)?;
            self.ipvlan_wire = true;
        }
        self.add_wire_pod(spec, WireChild::Ipvlan)
    }

    /// A pod whose eth0 is a child of its node's wire: its address in the
    /// subnet's /24, its default route the subnet's gateway.
    fn add_wire_pod(&mut self, spec: &PodSpec, child: WireChild) -> Result<&Pod> {
        let i = self.pods.len();
        let namespace = Namespace::create(&format!("{}-{}", self.prefix, spec.role))?;
        add_wire_child(&self.nodes[spec.node], &namespace, &format!("wc{i}"), child)?;
        let gateway_address = subnet_gateway(spec.address);
        let address = spec.address;
        let address6 = ipv6_of(address);
        // The address is usable at once (no duplicate detection); no
        // router advertisement or redirect changes what the test set up
        // (the gateway forwards between subnets on one interface).
        for (key, value) in [
            ("accept_dad", "0"),
            ("accept_ra", "0"),
            ("accept_redirects", "0"),
        ] {
            namespace.sysctl(&format!("net.ipv6.conf.{}.{key}", Pod::IFACE), value)?;
        }
        // The kernel skips duplicate detection only when `all` says so
        // too: without it a server bound at once could meet a tentative
        // address ("Cannot assign requested address").
        namespace.sysctl("net.ipv6.conf.all.accept_dad", "0")?;
        namespace.netlink("address the pod", |h| async move {
            let eth0 = index_of(&h, Pod::IFACE).await?;
            add_address(&h, eth0, address.into(), 24).await?;
            if let Some(address6) = address6 {
                add_address(&h, eth0, address6.into(), 64).await?;
            }
            set_up(&h, Pod::IFACE).await?;
            let route = RouteMessageBuilder::<Ipv4Addr>::new()
                .gateway(gateway_address)
                .build();
            add_route(&h, route).await?;
            if let Some(address6) = address6 {
                let route = RouteMessageBuilder::<Ipv6Addr>::new()
                    .gateway(subnet_gateway6(address6))
                    .build();
                add_route(&h, route).await?;
            }
            Ok(())
        })?;
        if let Some(address6) = address6 {
            usable_at_once(&namespace, address6)?;
        }
        self.pods.push(Pod {
            role: spec.role.to_owned(),
            namespace,
            node: spec.node,
            address,
            gateway: gateway_address,
            address6,
            mac: match child {
                WireChild::Macvlan(mac) => mac,
                WireChild::Ipvlan => [0; 6],
            },
        });
        Ok(self.pods.last().expect("just pushed"))
    }

    /// Spiderpool's coordinator path for `role`: a veth from the pod
    /// (`veth0`) to its node, the node answering on the link-local
    /// [`COORDINATOR_GATEWAY`] and [`COORDINATOR_GATEWAY6`], host routes
    /// back to the pod's addresses, forwarding on. Which destinations use
    /// it is the caller's choice ([`Topology::route_via_node`]): with
    /// kube-proxy, the service CIDR of each family.
    pub fn add_coordinator_veth(&self, role: &str) -> Result<()> {
        let index = self
            .pods
            .iter()
            .position(|p| p.role == role)
            .unwrap_or_else(|| panic!("no pod {role} in this topology"));
        let pod = &self.pods[index];
        wire_veth_to_node(
            &self.nodes[pod.node],
            &pod.namespace,
            &format!("veth-{index}"),
            COORDINATOR_IFACE,
            pod.address,
            pod.address6,
            false,
            self.offloads,
        )
    }

    /// `ethtool -k` of every device in every namespace of the topology,
    /// for a result to record the offloads it was measured with.
    pub fn offloads(&self) -> Result<Vec<crate::DeviceOffloads>> {
        let namespaces = self
            .nodes
            .iter()
            .chain([&self.gateway])
            .chain(&self.router)
            .chain(self.pods.iter().map(|p| &p.namespace));
        let mut devices = Vec::new();
        for namespace in namespaces {
            devices.extend(namespace.offloads()?);
        }
        Ok(devices)
    }

    /// Routes `prefix` (either family) from pod `role` through its
    /// coordinator veth (to the node), or, with `via_node` false, removes
    /// that route (back to the pod's own interface and gateway).
    pub fn route_via_node(
        &self,
        role: &str,
        prefix: (impl Into<IpAddr>, u8),
        via_node: bool,
    ) -> Result<()> {
        let pod = self.pod(role);
        let (destination, length) = (prefix.0.into(), prefix.1);
        pod.namespace
            .netlink("route through the node", |h| async move {
                let index = index_of(&h, COORDINATOR_IFACE).await?;
                let route = match destination {
                    IpAddr::V4(destination) => RouteMessageBuilder::<Ipv4Addr>::new()
                        .destination_prefix(destination, length)
                        .gateway(COORDINATOR_GATEWAY)
                        .output_interface(index)
                        .build(),
                    IpAddr::V6(destination) => RouteMessageBuilder::<Ipv6Addr>::new()
                        .destination_prefix(destination, length)
                        .gateway(COORDINATOR_GATEWAY6)
                        .output_interface(index)
                        .build(),
                };
                if via_node {
                    h.route()
                        .add(route)
                        .replace()
                        .execute()
                        .await
                        .map_err(|e| e.to_string())
                } else {
                    match h.route().del(route).execute().await {
                        Ok(()) => Ok(()),
                        // Not there: nothing to remove.
                        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ESRCH => {
                            Ok(())
                        }
                        Err(e) => Err(e.to_string()),
                    }
                }
            })
    }

    /// A client outside the cluster: a namespace on the wire that is no
    /// node and no pod (a macvlan on node `beside`'s end of the wire at
    /// `address`, reaching the nodes' addresses by ARP), for traffic to
    /// nodePorts. Deleted when the returned namespace is dropped.
    pub fn add_outside_client(&self, beside: usize, address: Ipv4Addr) -> Result<Namespace> {
        let namespace = Namespace::create(&format!("{}-outside", self.prefix))?;
        let octets = address.octets();
        let mac = [0x02, 0x77, 0x0f, octets[1], octets[2], octets[3]];
        add_wire_child(
            &self.nodes[beside],
            &namespace,
            "wcout",
            WireChild::Macvlan(mac),
        )?;
        namespace.netlink("address the outside client", |h| async move {
            let eth0 = index_of(&h, Pod::IFACE).await?;
            add_address(&h, eth0, address.into(), 24).await?;
            set_up(&h, Pod::IFACE).await
        })?;
        Ok(namespace)
    }

    /// Makes node `node`'s end of the wire receive the frames its peer's
    /// XDP program sends back out (`XDP_TX`): a veth hands them only to a
    /// peer running XDP itself, which a NIC's wire does not need. Held
    /// until the topology is dropped.
    pub fn receive_xdp_tx(&mut self, node: usize) -> Result<()> {
        let path = self.nodes[node].path().to_owned();
        let link = datapath_user::loader::attach_xdp_verdict(
            Some(&path),
            WIRE,
            datapath_user::loader::XdpVerdict::Pass,
        )
        .map_err(|e| crate::error::TopologyError {
            netns: self.nodes[node].name().to_owned(),
            step: "attach XDP_PASS to the wire".into(),
            reason: e.to_string(),
        })?;
        self.xdp_links.push(link);
        Ok(())
    }

    /// Routes `destination` (a load-balancer IP) from the outside client
    /// `client` to node `node`'s address, as a load balancer hands its
    /// traffic to a node.
    pub fn route_to_node(
        &self,
        client: &Namespace,
        destination: Ipv4Addr,
        node: usize,
    ) -> Result<()> {
        let via = NODE_ADDRESSES[node];
        client.netlink("route a load-balancer IP to a node", |h| async move {
            let route = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(destination, 32)
                .gateway(via)
                .build();
            add_route(&h, route).await
        })
    }

    /// Makes `client`'s neighbour entry for node `node`'s address
    /// permanent, with the MAC of that node's wire: a client that must
    /// keep sending while the node's XDP program drops everything, ARP
    /// too (as a host keeps its gateway's MAC).
    pub fn pin_neighbour(&self, client: &Namespace, node: usize) -> Result<()> {
        use rtnetlink::packet_route::{link::LinkAttribute, neighbour::NeighbourState};
        let mac = self.nodes[node].netlink("read the wire's MAC", |h| async move {
            link_by_name(&h, WIRE)
                .await?
                .attributes
                .into_iter()
                .find_map(|a| match a {
                    LinkAttribute::Address(mac) => Some(mac),
                    _ => None,
                })
                .ok_or_else(|| "the wire has no MAC".to_owned())
        })?;
        let address = NODE_ADDRESSES[node];
        client.netlink("pin the node's neighbour entry", |h| async move {
            let eth0 = index_of(&h, Pod::IFACE).await?;
            h.neighbours()
                .add(eth0, address.into())
                .link_layer_address(&mac)
                .state(NeighbourState::Permanent)
                .replace()
                .execute()
                .await
                .map_err(|e| e.to_string())
        })
    }

    pub fn pod(&self, role: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.role == role)
            .unwrap_or_else(|| panic!("no pod {role} in this topology"))
    }
}

/// Waits (up to 3 s) until `address` can be bound in `namespace`: even
/// without duplicate detection an IPv6 address stays tentative until its
/// interface has a carrier, which a macvlan gets from its lower device a
/// moment after it is up; a server started at once would meet "Cannot
/// assign requested address".
fn usable_at_once(namespace: &Namespace, address: Ipv6Addr) -> Result<()> {
    let bindable = || std::net::UdpSocket::bind(std::net::SocketAddr::from((address, 0))).is_ok();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    loop {
        if namespace.run(bindable)? {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            return Err(crate::error::TopologyError {
                netns: namespace.name().to_owned(),
                step: format!("wait for {address} to leave tentative"),
                reason: "still not bindable after 3 s (no carrier?)".into(),
            });
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}
