//! `ethtool -k` of the topology's devices, as a result records them (the
//! ioctl is the product's: `datapath_user::ethtool`).

use std::io;

use datapath_user::ethtool::{
    ETHTOOL_GGRO, ETHTOOL_GGSO, ETHTOOL_GSG, ETHTOOL_GTSO, ETHTOOL_GTXCSUM, feature,
};
pub use datapath_user::ethtool::{set_gro, set_tx_csum};
use serde::{Deserialize, Serialize};

/// The offloads `ethtool -k` shows first for one device, as a result
/// records them: whether the path measured is the path a real device
/// takes (64 KB GSO packets through forwarding hops, or 1.5 KB segments).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceOffloads {
    pub namespace: String,
    pub device: String,
    pub tx_checksumming: bool,
    pub scatter_gather: bool,
    pub tcp_segmentation_offload: bool,
    pub generic_segmentation_offload: bool,
    pub generic_receive_offload: bool,
}

/// `ethtool -k IFACE`'s main features.
pub fn offloads_of(namespace: &str, iface: &str) -> io::Result<DeviceOffloads> {
    let get = |cmd| feature(iface, cmd);
    Ok(DeviceOffloads {
        namespace: namespace.to_owned(),
        device: iface.to_owned(),
        tx_checksumming: get(ETHTOOL_GTXCSUM)?,
        scatter_gather: get(ETHTOOL_GSG)?,
        tcp_segmentation_offload: get(ETHTOOL_GTSO)?,
        generic_segmentation_offload: get(ETHTOOL_GGSO)?,
        generic_receive_offload: get(ETHTOOL_GGRO)?,
    })
}
