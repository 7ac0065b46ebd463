//! Clients, from the calling thread's namespace: one request per
//! connection or datagram, or a socket held and asked again and again.

use std::{
    io::{self, BufRead, BufReader, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    time::Duration,
};

/// One `size`-byte UDP request (larger than the MTU, it leaves in
/// fragments) on a connected socket; the answer is as large. Returns the
/// answer and its size.
pub fn large_udp_request(
    target: impl Into<SocketAddr>,
    size: usize,
    timeout: Duration,
) -> io::Result<(Answer, usize)> {
    let target = target.into();
    let socket = udp_socket_for(&target)?;
    socket.set_read_timeout(Some(timeout))?;
    socket.connect(target)?;
    let request: Vec<u8> = (0..size).map(|i| b'a' + (i % 26) as u8).collect();
    socket.send(&request)?;
    let mut buf = vec![0u8; 65536];
    let (n, peer) = socket.recv_from(&mut buf)?;
    let text = String::from_utf8_lossy(&buf[..n]);
    let server = text.split('\n').next().unwrap_or_default().to_owned();
    Ok((Answer { server, peer }, n))
}

/// What one request saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    /// The name of the server that answered.
    pub server: String,
    /// The peer as the client's socket reports it (getpeername for TCP,
    /// the datagram's source for UDP).
    pub peer: SocketAddr,
}

/// One TCP request on a new connection, from the calling thread's namespace.
pub fn tcp_request(target: impl Into<SocketAddr>, timeout: Duration) -> io::Result<Answer> {
    let mut stream = TcpStream::connect_timeout(&target.into(), timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_nodelay(true)?;
    let peer = stream.peer_addr()?;
    stream.write_all(b"hello\n")?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    if line.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed without an answer",
        ));
    }
    Ok(Answer {
        server: line.trim_end().to_owned(),
        peer,
    })
}

/// A UDP socket of `target`'s family (AF_INET6 for an IPv4-mapped one).
fn udp_socket_for(target: &SocketAddr) -> io::Result<UdpSocket> {
    if target.is_ipv6() {
        UdpSocket::bind("[::]:0")
    } else {
        UdpSocket::bind("0.0.0.0:0")
    }
}

/// `target` as an AF_INET6 socket reaches it: `[::ffff:a.b.c.d]:port`.
pub fn ipv4_mapped(target: SocketAddrV4) -> SocketAddr {
    SocketAddr::from((target.ip().to_ipv6_mapped(), target.port()))
}

/// One UDP request with sendto/recvfrom on an unconnected socket.
pub fn udp_request(target: impl Into<SocketAddr>, timeout: Duration) -> io::Result<Answer> {
    let target = target.into();
    let socket = udp_socket_for(&target)?;
    socket.set_read_timeout(Some(timeout))?;
    socket.send_to(b"hello", target)?;
    let mut buf = [0u8; 512];
    let (n, peer) = socket.recv_from(&mut buf)?;
    Ok(Answer {
        server: String::from_utf8_lossy(&buf[..n]).into_owned(),
        peer,
    })
}

/// One UDP request on a connected socket (connect/send/recv; the peer is
/// what getpeername reports).
pub fn connected_udp_request(
    target: impl Into<SocketAddr>,
    timeout: Duration,
) -> io::Result<Answer> {
    let target = target.into();
    let socket = udp_socket_for(&target)?;
    socket.set_read_timeout(Some(timeout))?;
    socket.connect(target)?;
    let peer = socket.peer_addr()?;
    socket.send(b"hello")?;
    let mut buf = [0u8; 512];
    let n = socket.recv(&mut buf)?;
    Ok(Answer {
        server: String::from_utf8_lossy(&buf[..n]).into_owned(),
        peer,
    })
}

/// How a probe process talks to its target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeKind {
    Tcp,
    Udp,
    UdpConnected,
}

impl ProbeKind {
    pub fn arg(self) -> &'static str {
        match self {
            ProbeKind::Tcp => "tcp",
            ProbeKind::Udp => "udp",
            ProbeKind::UdpConnected => "udp-connected",
        }
    }
}

/// A long-lived TCP connection that sends a request whenever asked.
pub struct Conversation {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Conversation {
    pub fn open(target: impl Into<SocketAddr>, timeout: Duration) -> io::Result<Self> {
        Self::from_stream(
            TcpStream::connect_timeout(&target.into(), timeout)?,
            timeout,
        )
    }

    /// Opens the conversation from local port `port` (SO_REUSEADDR, so
    /// several connections to different peers can share it, as the
    /// kernel's own port choice does).
    pub fn open_from(
        port: u16,
        target: impl Into<SocketAddr>,
        timeout: Duration,
    ) -> io::Result<Self> {
        use socket2::{Domain, Socket, Type};
        let target = target.into();
        let socket = Socket::new(Domain::for_address(target), Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        let any: IpAddr = match target {
            SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
            SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
        };
        socket.bind(&SocketAddr::new(any, port).into())?;
        socket.connect_timeout(&target.into(), timeout)?;
        Self::from_stream(socket.into(), timeout)
    }

    fn from_stream(stream: TcpStream, timeout: Duration) -> io::Result<Self> {
        stream.set_read_timeout(Some(timeout))?;
        // A bulk request into a black hole must fail, not block forever.
        stream.set_write_timeout(Some(timeout))?;
        stream.set_nodelay(true)?;
        let reader = BufReader::new(stream.try_clone()?);
        Ok(Self { stream, reader })
    }

    /// Sends one request and returns the answering server's name.
    pub fn ask(&mut self) -> io::Result<String> {
        self.ask_with(b"again")
    }

    /// Sends one `size`-byte request (a bulk transfer on the same
    /// connection) and returns the answering server's name.
    pub fn ask_large(&mut self, size: usize) -> io::Result<String> {
        self.ask_with(&vec![b'x'; size])
    }

    fn ask_with(&mut self, request: &[u8]) -> io::Result<String> {
        self.stream.write_all(request)?;
        self.stream.write_all(b"\n")?;
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        if line.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed",
            ));
        }
        Ok(line.trim_end().to_owned())
    }
}

/// One long-lived socket of any probe kind, asked again and again: a TCP
/// connection, a connected UDP socket (the backend is chosen once, at
/// `connect()`), or an unconnected UDP socket (`sendto` each time).
pub enum HeldSocket {
    Tcp(Conversation),
    Udp {
        socket: UdpSocket,
        target: SocketAddr,
        connected: bool,
    },
}

impl HeldSocket {
    pub fn open(kind: ProbeKind, target: SocketAddr, timeout: Duration) -> io::Result<Self> {
        if kind == ProbeKind::Tcp {
            return Conversation::open(target, timeout).map(HeldSocket::Tcp);
        }
        let socket = udp_socket_for(&target)?;
        socket.set_read_timeout(Some(timeout))?;
        let connected = kind == ProbeKind::UdpConnected;
        if connected {
            socket.connect(target)?;
        }
        Ok(HeldSocket::Udp {
            socket,
            target,
            connected,
        })
    }

    /// One request on the held socket; the answer names the server.
    pub fn ask(&mut self) -> io::Result<Answer> {
        match self {
            HeldSocket::Tcp(conversation) => {
                let peer = conversation.stream.peer_addr()?;
                let server = conversation.ask()?;
                Ok(Answer { server, peer })
            }
            HeldSocket::Udp {
                socket,
                target,
                connected,
            } => {
                let exchange = || -> io::Result<Answer> {
                    if *connected {
                        socket.send(b"hello")?;
                    } else {
                        socket.send_to(b"hello", *target)?;
                    }
                    let mut buf = [0u8; 512];
                    let (n, peer) = socket.recv_from(&mut buf)?;
                    Ok(Answer {
                        server: String::from_utf8_lossy(&buf[..n]).into_owned(),
                        peer,
                    })
                };
                let answer = exchange();
                if *connected
                    && answer.as_ref().is_err_and(|e| {
                        matches!(
                            e.raw_os_error(),
                            Some(libc::ECONNABORTED | libc::EDESTADDRREQ)
                        )
                    })
                {
                    // What an application does when its socket is
                    // destroyed: clear the error still pending on it
                    // (SO_ERROR) and connect again (socket-LB picks anew).
                    let _ = socket.take_error();
                    socket.connect(*target)?;
                }
                answer
            }
        }
    }
}
