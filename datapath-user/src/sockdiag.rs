//! Connected UDP sockets, listed and destroyed through NETLINK_SOCK_DIAG
//! (`SOCK_DIAG_BY_FAMILY`, `SOCK_DESTROY`; the kernel needs
//! `CONFIG_INET_DIAG_DESTROY`), one network namespace at a time.
//!
//! A UDP socket that socket-LB connected to a backend keeps that backend
//! for good: no packet passes the datapath again to move it. When the
//! backend leaves its service, the agent destroys such sockets, as
//! kube-proxy flushes UDP conntrack and Cilium runs `bpf_sock_destroy`:
//! the application sees ECONNABORTED and connects again, through
//! socket-LB, to a live backend. Only connected sockets are listed (the
//! `TCP_ESTABLISHED` state, which a connected UDP socket is in), never
//! unconnected ones: their every datagram is translated afresh.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
/// `1 << TCP_ESTABLISHED`: the state of a connected UDP socket.
const CONNECTED: u32 = 1 << 1;
const NLMSG_HDR_LEN: usize = 16;
const REQ_LEN: usize = 56;
const SOCKID_LEN: usize = 48;

/// One connected UDP socket as the kernel lists it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpSocketId {
    /// The same cookie `bpf_get_socket_cookie()` returns.
    pub cookie: u64,
    /// The peer (an IPv4-mapped IPv6 peer is given as IPv4).
    pub peer: (IpAddr, u16),
    family: u8,
    /// `inet_diag_sockid` as the kernel sent it: sent back to destroy.
    raw_id: [u8; SOCKID_LEN],
}

/// A NETLINK_SOCK_DIAG socket in the calling thread's namespace.
struct DiagSocket {
    fd: OwnedFd,
    seq: u32,
}

impl DiagSocket {
    fn open() -> io::Result<Self> {
        // SAFETY: plain socket(2); the fd is owned below.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { fd, seq: 0 })
    }

    fn send(&mut self, kind: u16, flags: u16, request: &[u8; REQ_LEN]) -> io::Result<u32> {
        self.seq += 1;
        let mut message = Vec::with_capacity(NLMSG_HDR_LEN + REQ_LEN);
        message.extend_from_slice(&((NLMSG_HDR_LEN + REQ_LEN) as u32).to_ne_bytes());
        message.extend_from_slice(&kind.to_ne_bytes());
        message.extend_from_slice(&flags.to_ne_bytes());
        message.extend_from_slice(&self.seq.to_ne_bytes());
        message.extend_from_slice(&0u32.to_ne_bytes());
        message.extend_from_slice(request);
        // SAFETY: send(2) of a buffer we own.
        let sent = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                message.as_ptr().cast(),
                message.len(),
                0,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(self.seq)
    }

    /// Reads messages of request `seq` until DONE (a dump) or its ACK;
    /// returns the payloads of data messages.
    fn receive(&mut self, seq: u32) -> io::Result<Vec<Vec<u8>>> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 65536];
        loop {
            // SAFETY: recv(2) into a buffer we own.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut at = 0;
            let n = n as usize;
            while at + NLMSG_HDR_LEN <= n {
                let len = u32::from_ne_bytes(buf[at..at + 4].try_into().expect("4 bytes")) as usize;
                let kind = u16::from_ne_bytes(buf[at + 4..at + 6].try_into().expect("2 bytes"));
                let msg_seq = u32::from_ne_bytes(buf[at + 8..at + 12].try_into().expect("4 bytes"));
                if len < NLMSG_HDR_LEN || at + len > n {
                    return Err(io::Error::other("truncated netlink message"));
                }
                let payload = &buf[at + NLMSG_HDR_LEN..at + len];
                at += (len + 3) & !3;
                if msg_seq != seq {
                    continue;
                }
                match kind {
                    NLMSG_DONE => return Ok(out),
                    NLMSG_ERROR => {
                        let errno = i32::from_ne_bytes(
                            payload
                                .get(..4)
                                .ok_or_else(|| io::Error::other("short netlink error"))?
                                .try_into()
                                .expect("4 bytes"),
                        );
                        return if errno == 0 {
                            Ok(out) // the ACK
                        } else {
                            Err(io::Error::from_raw_os_error(-errno))
                        };
                    }
                    _ => out.push(payload.to_vec()),
                }
            }
        }
    }
}

fn request(family: u8, states: u32, id: &[u8; SOCKID_LEN]) -> [u8; REQ_LEN] {
    let mut req = [0u8; REQ_LEN];
    req[0] = family;
    req[1] = libc::IPPROTO_UDP as u8;
    req[4..8].copy_from_slice(&states.to_ne_bytes());
    req[8..].copy_from_slice(id);
    req
}

/// The peer of a listed socket (an IPv4-mapped IPv6 one as IPv4, as
/// socket-LB translated it through the IPv4 maps).
fn peer_of(family: u8, id: &[u8; SOCKID_LEN]) -> Option<(IpAddr, u16)> {
    let port = u16::from_be_bytes([id[2], id[3]]);
    let dst = &id[20..36];
    let address = if i32::from(family) == libc::AF_INET {
        IpAddr::V4(Ipv4Addr::new(dst[0], dst[1], dst[2], dst[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(dst).ok()?)).to_canonical()
    };
    Some((address, port))
}

/// Every connected UDP socket (IPv4 and IPv6) in the calling thread's
/// namespace.
fn list_here(diag: &mut DiagSocket) -> io::Result<Vec<UdpSocketId>> {
    let mut sockets = Vec::new();
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
        let seq = diag.send(
            SOCK_DIAG_BY_FAMILY,
            flags,
            &request(family, CONNECTED, &[0; SOCKID_LEN]),
        )?;
        for message in diag.receive(seq)? {
            // inet_diag_msg: family, state, timer, retrans, then the id.
            let Some(raw) = message.get(4..4 + SOCKID_LEN) else {
                continue;
            };
            let raw_id: [u8; SOCKID_LEN] = raw.try_into().expect("48 bytes");
            let Some(peer) = peer_of(message[0], &raw_id) else {
                continue;
            };
            let cookie = u64::from(u32::from_ne_bytes(raw_id[40..44].try_into().expect("4")))
                | u64::from(u32::from_ne_bytes(raw_id[44..48].try_into().expect("4"))) << 32;
            sockets.push(UdpSocketId {
                cookie,
                peer,
                family: message[0],
                raw_id,
            });
        }
    }
    Ok(sockets)
}

/// Destroys the connected UDP sockets in namespace `netns` (`None`: the
/// caller's) that `doomed` picks; returns how many. A socket that closed
/// meanwhile is not an error.
pub fn destroy_connected_udp(
    netns: Option<&Path>,
    doomed: impl Fn(&UdpSocketId) -> bool + Send + Sync,
) -> io::Result<usize> {
    crate::netns::run_in(netns, || -> io::Result<usize> {
        let mut diag = DiagSocket::open()?;
        let mut destroyed = 0;
        for socket in list_here(&mut diag)?.into_iter().filter(|s| doomed(s)) {
            let flags = (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16;
            let seq = diag.send(
                SOCK_DESTROY,
                flags,
                &request(socket.family, 0, &socket.raw_id),
            )?;
            match diag.receive(seq) {
                Ok(_) => destroyed += 1,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                    return Err(io::Error::new(
                        e.kind(),
                        "the kernel cannot destroy sockets (build it with CONFIG_INET_DIAG_DESTROY=y)",
                    ));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(destroyed)
    })?
}
