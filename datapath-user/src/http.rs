//! The agent's HTTP endpoints (`/metrics`, `/healthz`, `/readyz`): a
//! minimal HTTP/1.1 responder, GET only, one request per connection.
//!
//! The port is the node's (host network), so anything on the node or the
//! network can connect. A slow or idle client must not stop the kubelet's
//! probes: each connection gets `READ_TIMEOUT` to send its request head
//! and `WRITE_TIMEOUT` to take the answer, at most `MAX_CONNECTIONS` are
//! served at once (a new one over the cap is closed at once and counted),
//! and accept errors (out of file descriptors) back off instead of
//! spinning.

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};

use crate::metrics::Metrics;

/// How long a client may take to send its request head.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client may take to read the answer.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; an idle one costs a task and a socket.
pub const MAX_CONNECTIONS: usize = 4096;
/// `/metrics`' content type.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Longest pause after failing accepts.
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// Serves until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut backoff = Duration::ZERO;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => {
                backoff = Duration::ZERO;
                stream
            }
            Err(e) => {
                // EMFILE and friends: the same error would come back at
                // once; wait for connections to close.
                backoff = (backoff * 2).clamp(Duration::from_millis(10), MAX_ACCEPT_BACKOFF);
                metrics.http_accept_errors.inc();
                tracing::debug!("accepting on the metrics address: {e}; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics.http_connections_refused.inc();
            drop(stream);
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            answer(stream, &metrics).await;
            drop(slot);
        });
    }
}

async fn answer(mut stream: TcpStream, metrics: &Metrics) {
    let Ok(Some(path)) = tokio::time::timeout(READ_TIMEOUT, request_path(&mut stream)).await else {
        return;
    };
    let (status, content_type, body) = if path == "/metrics" {
        // Per-frontend series ask the core for labels: not in `route`.
        ("200 OK", OPENMETRICS, metrics.encode_with_services().await)
    } else {
        route(&path, metrics)
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(WRITE_TIMEOUT, async {
        let _ = stream.write_all(response.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// Reads up to the end of the request head (2 KiB at most) and returns
/// the path; `None` when the client closes first.
async fn request_path(stream: &mut TcpStream) -> Option<String> {
    let mut request = vec![0u8; 2048];
    let mut filled = 0;
    while filled < request.len() {
        match stream.read(&mut request[filled..]).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => filled += n,
        }
        if request[..filled].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let head = String::from_utf8_lossy(&request[..filled]);
    Some(
        head.lines()
            .next()
            .and_then(|line| line.split_whitespace().nth(1))
            .unwrap_or("")
            .to_owned(),
    )
}

fn route(path: &str, metrics: &Metrics) -> (&'static str, &'static str, String) {
    match path {
        "/metrics" => ("200 OK", OPENMETRICS, metrics.encode()),
        "/healthz" => ("200 OK", "text/plain", "ok\n".to_owned()),
        "/readyz" if metrics.ready.load(Ordering::Relaxed) => {
            ("200 OK", "text/plain", "ready\n".to_owned())
        }
        "/readyz" => (
            "503 Service Unavailable",
            "text/plain",
            "waiting for the first full sync\n".to_owned(),
        ),
        _ => (
            "404 Not Found",
            "text/plain",
            "try /metrics, /healthz or /readyz\n".to_owned(),
        ),
    }
}

/// Binds the metrics address with an error that names it.
pub async fn bind(address: std::net::SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(address).await.map_err(|e| {
        anyhow::anyhow!("binding the metrics and health address {address} (--metrics-address): {e}")
    })
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn get(address: std::net::SocketAddr, path: &str) -> String {
        let mut stream = TcpStream::connect(address).await.unwrap();
        stream
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    }

    /// A thousand clients that connect and send nothing (a scanner, a
    /// stuck scraper) do not stop `/healthz` from answering at once; they
    /// are let go after the read timeout.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn healthz_answers_while_a_thousand_idle_connections_are_open() {
        crate::raise_open_files_limit();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(listener, Metrics::new(None)));
        let mut idle = Vec::new();
        for _ in 0..1000 {
            idle.push(TcpStream::connect(address).await.unwrap());
        }
        let started = Instant::now();
        let response = get(address, "/healthz").await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        // The idle ones are closed by the server after READ_TIMEOUT.
        tokio::time::sleep(READ_TIMEOUT + Duration::from_secs(1)).await;
        let mut byte = [0u8; 1];
        let closed = tokio::time::timeout(Duration::from_secs(1), idle[0].read(&mut byte))
            .await
            .expect("closed by the server, not still waiting");
        assert!(matches!(closed, Ok(0) | Err(_)));
        server.abort();
    }
}
