//! nginx (Debian's) in a server namespace, serving fixed-size static
//! responses as in the second seed: `/350` (a 350-byte response: headers
//! and a small body) and `/4096` (a 4 KiB response).

use std::{
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use lab::Namespace;

use crate::workload::pin_to_cpu;

pub const HTTP_PORT: u16 = 80;

/// The response sizes the bench asks for (bytes on the wire, headers
/// included), each served at `/<size>`.
pub const RESPONSE_SIZES: [usize; 2] = [350, 4096];

/// nginx's response headers for a static file, near enough: status line,
/// Server, Date, Content-Type, Content-Length, Last-Modified, Connection,
/// ETag, Accept-Ranges. The bench reports the size it really received.
const HEADER_BYTES: usize = 238;

/// A running nginx; stopped (and its directory removed) on drop.
pub struct Nginx {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        lab::disown_child(self.child.id());
    }
}

fn config(dir: &Path) -> String {
    let d = dir.display();
    // One process (no master), so pinning it pins the server; keep-alive
    // connections live for the whole run (nginx closes one after 1000
    // requests by default, which would show as reconnects).
    format!(
        "daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    keepalive_requests 1000000000;
    keepalive_timeout 3600s;
    client_body_temp_path {d}/tmp;
    proxy_temp_path {d}/tmp;
    fastcgi_temp_path {d}/tmp;
    uwsgi_temp_path {d}/tmp;
    scgi_temp_path {d}/tmp;
    default_type application/octet-stream;
    server {{
        listen {HTTP_PORT} reuseport backlog=16384;
        root {d}/www;
    }}
}}
"
    )
}

/// Starts nginx inside `namespace` on port 80, pinned to `cpu`, and waits
/// until `address` accepts connections.
pub fn start(namespace: &Namespace, address: Ipv4Addr, cpu: usize) -> Result<Nginx> {
    let dir = tempfile::Builder::new()
        .prefix("underpass-bench-nginx-")
        .tempdir()?;
    std::fs::create_dir_all(dir.path().join("www"))?;
    std::fs::create_dir_all(dir.path().join("tmp"))?;
    for size in RESPONSE_SIZES {
        let body = vec![b'x'; size.saturating_sub(HEADER_BYTES).max(1)];
        std::fs::write(dir.path().join("www").join(size.to_string()), body)?;
    }
    let conf = dir.path().join("nginx.conf");
    std::fs::write(&conf, config(dir.path()))?;
    let error_log = dir.path().join("error.log");
    let child = namespace
        .run(|| {
            let _ = pin_to_cpu(cpu);
            Command::new("nginx")
                .arg("-p")
                .arg(dir.path())
                .arg("-e")
                .arg(&error_log)
                .arg("-c")
                .arg(&conf)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
        })?
        .context("starting nginx (installed by `cargo xtask bench`)")?;
    lab::own_child(child.id());
    let mut nginx = Nginx { child, _dir: dir };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let up = namespace
            .run(|| {
                TcpStream::connect_timeout(
                    &SocketAddrV4::new(address, HTTP_PORT).into(),
                    Duration::from_millis(200),
                )
                .is_ok()
            })
            .unwrap_or(false);
        if up {
            return Ok(nginx);
        }
        if let Some(status) = nginx.child.try_wait()? {
            let log = std::fs::read_to_string(&error_log).unwrap_or_default();
            bail!(
                "nginx in {} exited ({status}): {}",
                namespace.name(),
                log.trim()
            );
        }
        if Instant::now() > deadline {
            bail!("nginx in {} not answering after 10 s", namespace.name());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
