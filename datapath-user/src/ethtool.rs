//! The ethtool ioctl (`SIOCETHTOOL`), in the calling thread's namespace:
//! the agent reads its uplink's offloads (generic XDP needs GRO off), the
//! test lab reads and sets the topology's.

use std::io;

// The legacy per-feature ethtool commands (uapi/linux/ethtool.h).
pub const ETHTOOL_GTXCSUM: u32 = 0x16;
const ETHTOOL_STXCSUM: u32 = 0x17;
pub const ETHTOOL_GSG: u32 = 0x18;
pub const ETHTOOL_GTSO: u32 = 0x1e;
pub const ETHTOOL_GGSO: u32 = 0x23;
pub const ETHTOOL_GGRO: u32 = 0x2b;
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

/// Whether one of the `ETHTOOL_G*` features above is on for `iface`.
pub fn feature(iface: &str, get: u32) -> io::Result<bool> {
    ethtool_value(iface, get, 0).map(|v| v != 0)
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
