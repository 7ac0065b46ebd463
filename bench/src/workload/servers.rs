//! The servers a measurement talks to, each its own process inside the
//! server pod's namespace, on the server CPU and in the servers' cgroup
//! (whose `cpu.stat` is the server's CPU): the bench's echo server
//! (`bench echo-server`, fixed-size answers, a thread per connection;
//! with a UDP sink for the packet rate if asked), and the spawning, port-waiting and killing every server shares.

use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use clap::Parser;
use lab::Namespace;

use super::pin_to_cpu;

/// `bench echo-server`: echoes every connection on `address:port`
/// inside `netns` until killed.
#[derive(Parser, Debug)]
pub struct EchoServerOpts {
    #[arg(long)]
    pub netns: PathBuf,
    /// Either family.
    #[arg(long)]
    pub address: IpAddr,
    #[arg(long)]
    pub port: u16,
    /// Also take UDP datagrams on this port and drop them (the packet
    /// rate's sink: what arrives is counted by the kernel).
    #[arg(long)]
    pub udp_sink_port: Option<u16>,
}

pub fn echo_server(opts: &EchoServerOpts) -> Result<()> {
    datapath_user::netns::enter(&opts.netns)
        .with_context(|| format!("entering {}", opts.netns.display()))?;
    if let Some(port) = opts.udp_sink_port {
        let local = SocketAddr::new(opts.address, port);
        let sink = UdpSocket::bind(local).with_context(|| format!("binding {local} (UDP)"))?;
        std::thread::spawn(move || {
            let mut buffer = [0u8; 2048];
            while sink.recv(&mut buffer).is_ok() {}
        });
    }
    let local = SocketAddr::new(opts.address, opts.port);
    let listener = TcpListener::bind(local).with_context(|| format!("binding {local}"))?;
    for stream in listener.incoming().flatten() {
        std::thread::spawn(move || echo(stream));
    }
    Ok(())
}

fn echo(mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let mut buffer = [0u8; 4096];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if stream.write_all(&buffer[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

/// Starts the echo server on `address:port` inside `namespace`, on
/// `cpu`, in `cgroup`; killed when the handle drops.
pub fn start_echo_server(
    namespace: &Namespace,
    address: impl Into<IpAddr>,
    port: u16,
    cpu: usize,
    cgroup: &Path,
) -> Result<ServerProcess> {
    start_echo_server_and_sink(namespace, address, port, None, cpu, cgroup)
}

/// [`start_echo_server`], with a UDP sink on `udp_sink_port` if given
/// (bound before the echo port answers).
pub fn start_echo_server_and_sink(
    namespace: &Namespace,
    address: impl Into<IpAddr>,
    port: u16,
    udp_sink_port: Option<u16>,
    cpu: usize,
    cgroup: &Path,
) -> Result<ServerProcess> {
    let address = address.into();
    let mut command = Command::new(std::env::current_exe()?);
    command
        .arg("echo-server")
        .arg("--netns")
        .arg(namespace.path())
        .args(["--address", &address.to_string()])
        .args(["--port", &port.to_string()]);
    if let Some(sink) = udp_sink_port {
        command.args(["--udp-sink-port", &sink.to_string()]);
    }
    let server = spawn_server(namespace, command, cpu, cgroup, "the echo server")?;
    wait_for_port(namespace, address, port)?;
    Ok(server)
}

/// Spawns `command` inside `namespace`, pinned to `cpu` and moved into
/// `cgroup` before it serves anything.
pub(super) fn spawn_server(
    namespace: &Namespace,
    mut command: Command,
    cpu: usize,
    cgroup: &Path,
    what: &str,
) -> Result<ServerProcess> {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let child = namespace
        .run(|| {
            let _ = pin_to_cpu(cpu);
            command.spawn()
        })?
        .with_context(|| format!("starting {what} (installed by `cargo xtask bench`)"))?;
    lab::own_child(child.id());
    let server = ServerProcess(child);
    std::fs::write(cgroup.join("cgroup.procs"), server.0.id().to_string())
        .with_context(|| format!("moving {what} into {}", cgroup.display()))?;
    Ok(server)
}

/// Waits until `address:port` accepts connections in `namespace`.
pub(super) fn wait_for_port(namespace: &Namespace, address: IpAddr, port: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let server = SocketAddr::new(address, port);
    loop {
        let up = namespace
            .run(|| TcpStream::connect_timeout(&server, Duration::from_millis(200)).is_ok())
            .unwrap_or(false);
        if up {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "no server on {server} in {} after 10 s",
            namespace.name()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A server process, killed on drop.
pub struct ServerProcess(Child);

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        lab::disown_child(self.0.id());
    }
}
