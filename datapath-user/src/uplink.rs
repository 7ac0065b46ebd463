//! The node's uplink for traffic from outside the cluster (north-south):
//! what the agent is told (`UplinkOptions`), what it reads of the device
//! (`UplinkFacts`, netlink in the uplink's namespace), and the settings
//! it writes for the uplink program (`settings`).

use std::{
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use datapath_common::maps::NorthSouthConfig;

use crate::{attach::list_links, loader::XdpAttachMode};

/// `--uplink` and what goes with it.
#[derive(Clone, Debug)]
pub struct UplinkOptions {
    /// The parent device of the macvlan pods.
    pub iface: String,
    /// The namespace it is in (None: the agent's own, as on a node).
    pub netns: Option<PathBuf>,
    pub xdp_mode: XdpAttachMode,
    /// The cluster's Maglev seed and table size: the same on every node.
    pub maglev_seed: u64,
    pub maglev_table_size: u32,
    /// SNAT ports: the first and how many.
    pub snat_ports: (u16, u16),
    /// The SNAT address (None: this node's address on the uplink).
    pub snat_address: Option<Ipv4Addr>,
    /// kube-proxy's node health port (`:10256/healthz`; None: not
    /// served).
    pub node_health_port: Option<u16>,
}

/// What the agent reads of the uplink.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UplinkFacts {
    pub ifindex: u32,
    pub ipv4: Vec<Ipv4Addr>,
    /// Whether it forwards (`net.ipv4.conf.<uplink>.forwarding`): the
    /// kernel answers the uplink program's route lookups only then.
    pub forwarding: bool,
    /// Whether it merges received packets (GRO): generic-mode XDP then
    /// sees merged TCP packets (see `generic_mode_caveat`).
    pub gro: bool,
}

/// Reads `iface` in the namespace at `netns` (None: our own).
pub fn read_facts(netns: Option<&Path>, iface: &str) -> Result<UplinkFacts> {
    let path = netns.unwrap_or(Path::new("/proc/self/ns/net"));
    let links = list_links(path)
        .with_context(|| format!("listing the interfaces of {}", path.display()))?;
    let Some(link) = links.into_iter().find(|l| l.name == iface) else {
        bail!(
            "--uplink {iface}: no such interface in {} (the parent device of the macvlan pods, as `ip link` names it)",
            path.display()
        );
    };
    let forwarding = crate::netns::run_in(netns, || {
        std::fs::read_to_string(format!("/proc/sys/net/ipv4/conf/{iface}/forwarding"))
    })
    .ok()
    .and_then(Result::ok)
    .is_some_and(|v| v.trim() == "1");
    let gro = crate::netns::run_in(netns, || {
        crate::ethtool::feature(iface, crate::ethtool::ETHTOOL_GGRO)
    })
    .ok()
    .and_then(Result::ok)
    .unwrap_or(false);
    Ok(UplinkFacts {
        ifindex: link.index,
        ipv4: link.ipv4,
        forwarding,
        gro,
    })
}

/// What an operator must hear when the uplink program runs in generic
/// mode (`how`, as the attach said; a kept link counts when generic mode
/// was asked for) on a device that merges packets:
/// generic XDP runs after GRO, on merged TCP packets whose checksum field
/// holds only the pseudo-header's sum (`CHECKSUM_PARTIAL`), which the
/// program's port rewrite spoils — the NIC's segmentation then sends bad
/// checksums.
pub fn generic_mode_caveat(
    how: &str,
    asked: XdpAttachMode,
    facts: &UplinkFacts,
    iface: &str,
) -> Option<String> {
    let generic =
        how == "generic" || (how == "pinned link kept" && asked == XdpAttachMode::Generic);
    (generic && facts.gro).then(|| {
        format!(
            "the uplink program runs in generic mode on {iface}, which merges received \
             packets (GRO): TCP flows it translates would leave with bad checksums; turn GRO \
             off (`ethtool -K {iface} gro off`) or use a driver with native XDP"
        )
    })
}

/// The settings the uplink program reads: the Maglev seed and size, and
/// the SNAT address — `--snat-address`, else the first `--node-ip` the
/// uplink holds, else the uplink's first IPv4 address; none (0): flows
/// to backends on other nodes pass to the stack, said in the log.
pub fn settings(
    options: &UplinkOptions,
    facts: &UplinkFacts,
    node_ips: &[IpAddr],
) -> NorthSouthConfig {
    let snat = options.snat_address.or_else(|| {
        node_ips
            .iter()
            .filter_map(|ip| match ip {
                IpAddr::V4(v4) => Some(*v4),
                IpAddr::V6(_) => None,
            })
            .find(|ip| facts.ipv4.contains(ip))
            .or_else(|| facts.ipv4.first().copied())
    });
    NorthSouthConfig {
        maglev_seed: options.maglev_seed,
        maglev_table_size: options.maglev_table_size,
        snat_address_be: snat.map_or(0, |a| datapath_common::ipv4_be(a.octets())),
        snat_port_first: options.snat_ports.0,
        snat_port_count: options.snat_ports.1,
        _pad: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> UplinkOptions {
        UplinkOptions {
            iface: "eth0".into(),
            netns: None,
            xdp_mode: XdpAttachMode::Auto,
            maglev_seed: 9,
            maglev_table_size: 16_381,
            snat_ports: (61_000, 4_536),
            snat_address: None,
            node_health_port: None,
        }
    }

    #[test]
    fn generic_mode_on_a_merging_device_is_said() {
        let facts = |gro| UplinkFacts {
            ifindex: 2,
            ipv4: vec![],
            forwarding: true,
            gro,
        };
        let auto = XdpAttachMode::Auto;
        let said = generic_mode_caveat("generic", auto, &facts(true), "eth0").unwrap();
        assert!(said.contains("ethtool -K eth0 gro off"), "{said}");
        assert_eq!(
            generic_mode_caveat("native", auto, &facts(true), "eth0"),
            None
        );
        assert_eq!(
            generic_mode_caveat("generic", auto, &facts(false), "eth0"),
            None
        );
        let kept = "pinned link kept";
        assert!(generic_mode_caveat(kept, XdpAttachMode::Generic, &facts(true), "eth0").is_some());
        assert_eq!(generic_mode_caveat(kept, auto, &facts(true), "eth0"), None);
    }

    #[test]
    fn the_snat_address_is_the_node_ip_the_uplink_holds() {
        let facts = UplinkFacts {
            ifindex: 2,
            ipv4: vec![Ipv4Addr::new(10, 0, 0, 9), Ipv4Addr::new(10, 0, 0, 5)],
            forwarding: true,
            gro: false,
        };
        let node_ips: Vec<IpAddr> =
            vec!["192.168.1.1".parse().unwrap(), "10.0.0.5".parse().unwrap()];
        let config = settings(&options(), &facts, &node_ips);
        assert_eq!(
            config.snat_address_be,
            datapath_common::ipv4_be([10, 0, 0, 5])
        );
        assert_eq!(
            settings(&options(), &facts, &[]).snat_address_be,
            datapath_common::ipv4_be([10, 0, 0, 9]),
            "else its first"
        );
        let given = UplinkOptions {
            snat_address: Some(Ipv4Addr::new(10, 0, 0, 77)),
            ..options()
        };
        assert_eq!(
            settings(&given, &facts, &node_ips).snat_address_be,
            datapath_common::ipv4_be([10, 0, 0, 77])
        );
        let bare = UplinkFacts {
            ipv4: vec![],
            ..facts
        };
        assert_eq!(settings(&options(), &bare, &[]).snat_address_be, 0);
        assert_eq!(
            (config.snat_port_first, config.snat_port_count),
            (61_000, 4_536)
        );
        assert_eq!((config.maglev_seed, config.maglev_table_size), (9, 16_381));
    }
}
