//! Servers that answer with their own name, each a thread bound inside
//! a namespace.

use std::{
    io::{self, BufRead, BufReader, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use crate::{error::TopologyError, namespace::Namespace};

/// A server thread; stopped and joined on drop.
pub struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    pub address: SocketAddr,
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
    address: IpAddr,
    port: u16,
    protocol: &str,
    bind: impl FnOnce(SocketAddr) -> io::Result<S> + Send,
) -> Result<(S, SocketAddr), TopologyError> {
    let at = SocketAddr::new(address, port);
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
    address: impl Into<IpAddr>,
    port: u16,
    name: &str,
) -> Result<Server, TopologyError> {
    let name = name.to_owned();
    tcp_server_answering(namespace, address, port, move |_| name.clone())
}

/// As `tcp_server`, answering `name` and the client's address as the
/// server sees it (`server-a 192.0.2.7`): whether a translation kept the
/// client's source.
pub fn tcp_server_telling_peer(
    namespace: &Namespace,
    address: impl Into<IpAddr>,
    port: u16,
    name: &str,
) -> Result<Server, TopologyError> {
    let name = name.to_owned();
    tcp_server_answering(namespace, address, port, move |peer| {
        format!("{name} {}", peer.ip())
    })
}

/// A TCP server answering each request line of a connection from `peer`
/// with `answer(peer)`.
fn tcp_server_answering(
    namespace: &Namespace,
    address: impl Into<IpAddr>,
    port: u16,
    answer: impl Fn(SocketAddr) -> String + Send + Clone + 'static,
) -> Result<Server, TopologyError> {
    let (listener, bind) = bind_in(namespace, address.into(), port, "TCP", TcpListener::bind)?;
    listener
        .set_nonblocking(true)
        .expect("nonblocking listener");
    let stop = Arc::new(AtomicBool::new(false));
    let thread = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, peer)) => {
                        let name = answer(peer);
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
    address: impl Into<IpAddr>,
    port: u16,
    name: &str,
) -> Result<Server, TopologyError> {
    let name = name.to_owned();
    udp_server_answering(namespace, address, port, move |_| name.clone())
}

/// As `udp_server`, answering `name` and the sender's address
/// (`tcp_server_telling_peer`'s twin).
pub fn udp_server_telling_peer(
    namespace: &Namespace,
    address: impl Into<IpAddr>,
    port: u16,
    name: &str,
) -> Result<Server, TopologyError> {
    let name = name.to_owned();
    udp_server_answering(namespace, address, port, move |peer| {
        format!("{name} {}", peer.ip())
    })
}

/// A UDP server answering each datagram from `peer` with `answer(peer)`.
fn udp_server_answering(
    namespace: &Namespace,
    address: impl Into<IpAddr>,
    port: u16,
    answer: impl Fn(SocketAddr) -> String + Send + 'static,
) -> Result<Server, TopologyError> {
    let (socket, bind) = bind_in(namespace, address.into(), port, "UDP", UdpSocket::bind)?;
    socket
        .set_read_timeout(Some(Duration::from_millis(50)))
        .expect("read timeout");
    let stop = Arc::new(AtomicBool::new(false));
    let thread = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((n, from)) = socket.recv_from(&mut buf) {
                    let _ = socket.send_to(&answer_for(&answer(from), n), from);
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
