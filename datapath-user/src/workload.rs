//! Small servers and clients that run inside topology namespaces, for the
//! e2e tests and the demo. Each server answers every request line (TCP) or
//! datagram (UDP) with its own name, so the client learns which backend a
//! ClusterIP request reached.

use std::{
    io::{self, BufRead, BufReader, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use crate::topology::{Namespace, TopologyError};

/// A server thread; stopped and joined on drop.
pub struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    pub address: SocketAddrV4,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Opens a socket bound to `address:port` inside `namespace` (where it
/// stays, whichever thread uses it later).
fn bind_in<S: Send>(
    namespace: &Namespace,
    address: Ipv4Addr,
    port: u16,
    protocol: &str,
    bind: impl FnOnce(SocketAddrV4) -> io::Result<S> + Send,
) -> Result<(S, SocketAddrV4), TopologyError> {
    let at = SocketAddrV4::new(address, port);
    let socket = namespace.run(|| bind(at))?.map_err(|e| TopologyError {
        netns: namespace.name().into(),
        step: format!("bind {at}/{protocol}"),
        reason: e.to_string(),
    })?;
    Ok((socket, at))
}

/// Starts a TCP server in `namespace` on `address:port` answering each
/// request line with `name`. Connections stay open (keep-alive).
pub fn tcp_server(
    namespace: &Namespace,
    address: Ipv4Addr,
    port: u16,
    name: &str,
) -> Result<Server, TopologyError> {
    let (listener, bind) = bind_in(namespace, address, port, "TCP", TcpListener::bind)?;
    listener
        .set_nonblocking(true)
        .expect("nonblocking listener");
    let stop = Arc::new(AtomicBool::new(false));
    let name = name.to_owned();
    let thread = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let name = name.clone();
                        let stop = stop.clone();
                        std::thread::spawn(move || serve_tcp(stream, &name, &stop));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(2))
                    }
                    Err(_) => break,
                }
            }
        })
    };
    Ok(Server {
        stop,
        thread: Some(thread),
        address: bind,
    })
}

fn serve_tcp(stream: TcpStream, name: &str, stop: &AtomicBool) {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    while !stop.load(Ordering::Relaxed) {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) => {
                if writer.write_all(format!("{name}\n").as_bytes()).is_err() {
                    return;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

/// Starts a UDP server answering each datagram with `name`.
pub fn udp_server(
    namespace: &Namespace,
    address: Ipv4Addr,
    port: u16,
    name: &str,
) -> Result<Server, TopologyError> {
    let (socket, bind) = bind_in(namespace, address, port, "UDP", UdpSocket::bind)?;
    socket
        .set_read_timeout(Some(Duration::from_millis(50)))
        .expect("read timeout");
    let stop = Arc::new(AtomicBool::new(false));
    let name = name.to_owned();
    let thread = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((n, from)) = socket.recv_from(&mut buf) {
                    let _ = socket.send_to(&answer_for(&name, n), from);
                }
            }
        })
    };
    Ok(Server {
        stop,
        thread: Some(thread),
        address: bind,
    })
}

/// A request longer than this gets an answer as long as itself (its
/// name, a newline, padding): large datagrams both ways, as DNS with EDNS
/// or NFS send them.
pub const LARGE_REQUEST: usize = 512;

/// What the UDP server sends back for an `n`-byte request.
fn answer_for(name: &str, n: usize) -> Vec<u8> {
    let mut answer = name.as_bytes().to_vec();
    if n > LARGE_REQUEST {
        answer.push(b'\n');
        answer.resize(n.max(answer.len()), b'.');
    }
    answer
}

/// One `size`-byte UDP request (larger than the MTU, it leaves in
/// fragments) on a connected socket; the answer is as large. Returns the
/// answer and its size.
pub fn large_udp_request(
    target: SocketAddrV4,
    size: usize,
    timeout: Duration,
) -> io::Result<(Answer, usize)> {
    let socket = UdpSocket::bind("0.0.0.0:0")?;
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
    pub fn open_from(port: u16, target: SocketAddrV4, timeout: Duration) -> io::Result<Self> {
        use socket2::{Domain, Socket, Type};
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        socket.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)).into())?;
        socket.connect_timeout(&SocketAddr::V4(target).into(), timeout)?;
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

/// A `underpass probe --hold` process: one socket inside a namespace and
/// cgroup (so socket-LB sees it as a pod's process), asked on demand.
/// Killed on drop.
pub struct HeldProbe {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    stdout: BufReader<std::process::ChildStdout>,
}

impl HeldProbe {
    pub fn spawn(
        exe: &std::path::Path,
        netns: &std::path::Path,
        cgroup: Option<&std::path::Path>,
        kind: ProbeKind,
        target: SocketAddrV4,
    ) -> io::Result<Self> {
        let mut cmd = std::process::Command::new(exe);
        cmd.arg("probe")
            .arg("--netns")
            .arg(netns)
            .args(["--target", &target.to_string()])
            .args(["--protocol", kind.arg(), "--timeout-ms", "1500", "--hold"]);
        if let Some(cgroup) = cgroup {
            cmd.arg("--cgroup").arg(cgroup);
        }
        let mut child = cmd
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        let stdin = child.stdin.take().expect("piped");
        let stdout = BufReader::new(child.stdout.take().expect("piped"));
        Ok(Self {
            child,
            stdin,
            stdout,
        })
    }

    /// Asks once on the held socket.
    pub fn ask(&mut self) -> io::Result<ProbeResult> {
        writeln!(self.stdin)?;
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            return Err(io::Error::other("the probe process exited"));
        }
        parse_probe_line(&line)
    }
}

impl Drop for HeldProbe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a probe process reported for one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeResult {
    Answer(Answer),
    Failed { error: String, errno: Option<i32> },
}

/// Runs `underpass probe` (at `exe`) inside `netns` and `cgroup`, the way a
/// pod's process would run under socket-LB, and collects its results.
pub fn probe_process(
    exe: &std::path::Path,
    netns: &std::path::Path,
    cgroup: Option<&std::path::Path>,
    kind: ProbeKind,
    target: SocketAddrV4,
    count: u32,
) -> io::Result<Vec<ProbeResult>> {
    probe_process_with(exe, netns, cgroup, kind, target, count, &[])
}

/// `probe_process` with more `underpass probe` flags (e.g.
/// `--ipv4-mapped`).
pub fn probe_process_with(
    exe: &std::path::Path,
    netns: &std::path::Path,
    cgroup: Option<&std::path::Path>,
    kind: ProbeKind,
    target: SocketAddrV4,
    count: u32,
    extra: &[&str],
) -> io::Result<Vec<ProbeResult>> {
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("probe")
        .arg("--netns")
        .arg(netns)
        .arg("--target")
        .arg(target.to_string());
    cmd.args([
        "--count",
        &count.to_string(),
        "--protocol",
        kind.arg(),
        "--timeout-ms",
        "1500",
    ]);
    cmd.args(extra);
    if let Some(cgroup) = cgroup {
        cmd.arg("--cgroup").arg(cgroup);
    }
    let output = cmd.output()?;
    if !output.status.success() {
        return Err(io::Error::other(format!(
            "probe failed: {}",
            String::from_utf8_lossy(&output.stderr)
        )));
    }
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(parse_probe_line)
        .collect()
}

/// One JSON line of `underpass probe`'s output.
fn parse_probe_line(line: &str) -> io::Result<ProbeResult> {
    let value: serde_json::Value = serde_json::from_str(line).map_err(io::Error::other)?;
    Ok(match (value["server"].as_str(), value["peer"].as_str()) {
        (Some(server), Some(peer)) => ProbeResult::Answer(Answer {
            server: server.to_owned(),
            peer: peer.parse().map_err(io::Error::other)?,
        }),
        _ => ProbeResult::Failed {
            error: value["error"].as_str().unwrap_or("?").to_owned(),
            errno: value["errno"].as_i64().map(|e| e as i32),
        },
    })
}
