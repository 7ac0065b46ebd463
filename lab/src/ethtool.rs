//! `ethtool -K IFACE tx on|off` without ethtool(8).

use std::io;

/// `ethtool -K IFACE tx on|off` through the SIOCETHTOOL ioctl (ethtool(8)
/// need not be installed), in the calling thread's namespace.
pub fn set_tx_csum(iface: &str, enabled: bool) -> io::Result<()> {
    // `Ioctl` is c_ulong on glibc and c_int on musl (the static image).
    const SIOCETHTOOL: libc::Ioctl = 0x8946;
    const ETHTOOL_STXCSUM: u32 = 0x17;
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
    let mut value = EthtoolValue {
        cmd: ETHTOOL_STXCSUM,
        data: u32::from(enabled),
    };
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
        Ok(())
    };
    // SAFETY: closing the socket we opened.
    unsafe { libc::close(sock) };
    result
}
