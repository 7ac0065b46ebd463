//! `ethtool -k` / `ethtool -K IFACE tx on|off` without ethtool(8): the
//! SIOCETHTOOL ioctl, in the calling thread's namespace.

use std::io;

use serde::{Deserialize, Serialize};

// The legacy per-feature ethtool commands (uapi/linux/ethtool.h).
const ETHTOOL_GTXCSUM: u32 = 0x16;
const ETHTOOL_STXCSUM: u32 = 0x17;
const ETHTOOL_GSG: u32 = 0x18;
const ETHTOOL_GTSO: u32 = 0x1e;
const ETHTOOL_GGSO: u32 = 0x23;
const ETHTOOL_GGRO: u32 = 0x2b;
const ETHTOOL_SGRO: u32 = 0x2c;

/// `ethtool -K IFACE tx on|off` (turning tx checksumming off also turns
/// off what depends on it: scatter-gather, TSO, GSO's hardware half).
pub fn set_tx_csum(iface: &str, enabled: bool) -> io::Result<()> {
    ethtool_value(iface, ETHTOOL_STXCSUM, u32::from(enabled)).map(drop)
}

/// `ethtool -K IFACE gro on|off`.
pub fn set_gro(iface: &str, enabled: bool) -> io::Result<()> {
    ethtool_value(iface, ETHTOOL_SGRO, u32::from(enabled)).map(drop)
}

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
    let get = |cmd| ethtool_value(iface, cmd, 0).map(|v| v != 0);
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

/// One `struct ethtool_value` command; the value it returns.
fn ethtool_value(iface: &str, cmd: u32, data: u32) -> io::Result<u32> {
    // `Ioctl` is c_ulong on glibc and c_int on musl (the static image).
    const SIOCETHTOOL: libc::Ioctl = 0x8946;
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        data: *mut EthtoolValue,
        _pad: [u8; 16],
    }
    if iface.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "interface name too long",
        ));
    }
    let mut value = EthtoolValue { cmd, data };
    let mut request = IfReq {
        name: [0; libc::IFNAMSIZ],
        data: &mut value,
        _pad: [0; 16],
    };
    request.name[..iface.len()].copy_from_slice(iface.as_bytes());
    // SAFETY: a datagram socket used only for the ioctl, closed below.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: SIOCETHTOOL with a valid ifreq pointing at a valid command.
    let rc = unsafe { libc::ioctl(sock, SIOCETHTOOL, &mut request) };
    let result = if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(value.data)
    };
    // SAFETY: closing the socket we opened.
    unsafe { libc::close(sock) };
    result
}
