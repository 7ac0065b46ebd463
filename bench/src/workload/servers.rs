//! The bench's echo server: fixed-size answers, a thread per
//! connection, inside a namespace and on a CPU.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
};

use anyhow::{Context, Result};
use lab::Namespace;

use super::pin_to_cpu;

/// Starts an echo server on `address:port` inside `namespace` (a thread
/// per connection, on `cpu` if given). Runs until the process exits.
pub fn start_echo_server(
    namespace: &Namespace,
    address: Ipv4Addr,
    port: u16,
    cpu: Option<usize>,
) -> Result<()> {
    let listener = namespace
        .run(|| TcpListener::bind(SocketAddrV4::new(address, port)))
        .context("entering the server namespace")?
        .with_context(|| format!("binding {address}:{port} in {}", namespace.name()))?;
    std::thread::spawn(move || {
        if let Some(cpu) = cpu {
            let _ = pin_to_cpu(cpu);
        }
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || echo(stream));
        }
    });
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
