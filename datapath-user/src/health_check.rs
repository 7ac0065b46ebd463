//! Health-check nodePorts, kube-proxy's way: for each
//! `externalTrafficPolicy: Local` service reached from outside, an HTTP
//! listener on its `healthCheckNodePort` that answers every request with
//! 200 when this node has endpoints for flows from outside and 503 when
//! it has none, the count in kube-proxy's JSON body and in
//! `X-Load-Balancing-Endpoint-Weight`. A cloud load balancer asks it
//! before sending a node traffic, so nodes without endpoints are skipped.
//! Listeners are bound in the uplink's namespace (the node's own on a
//! real node), where the load balancer reaches the node's addresses.
//!
//! Beside them, kube-proxy's node health endpoint (`:10256/healthz`,
//! `serve_node_health`), which load balancers of `Cluster` services
//! probe (KEP-3836): 200 once the agent has synced the maps, 503 before.

use std::{
    collections::HashMap,
    net::Ipv4Addr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};
use tracing::{info, warn};

use crate::k8s::{HealthCheck, ObjectKey};

/// Told what each service asks for after every translation.
pub trait HealthChecks: Send {
    /// `service` asks for `check` now (None: for none).
    fn set(&mut self, service: &ObjectKey, check: Option<HealthCheck>);
}

/// One listener.
struct Listener {
    service: ObjectKey,
    local_endpoints: Arc<AtomicU32>,
    task: JoinHandle<()>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The listeners, by port.
pub struct HealthCheckServers {
    /// Where to bind (None: the agent's own namespace).
    netns: Option<PathBuf>,
    by_port: HashMap<u16, Listener>,
    by_service: HashMap<ObjectKey, u16>,
}

impl HealthCheckServers {
    pub fn new(netns: Option<PathBuf>) -> Self {
        Self {
            netns,
            by_port: HashMap::new(),
            by_service: HashMap::new(),
        }
    }

    fn remove(&mut self, service: &ObjectKey) {
        if let Some(port) = self.by_service.remove(service) {
            self.by_port.remove(&port);
            info!(%service, port, "health-check nodePort closed");
        }
    }
}

/// A listener on `port` of every address of the namespace at `netns`
/// (None: ours), where it stays whichever thread accepts.
fn bind_in(netns: Option<&std::path::Path>, port: u16) -> std::io::Result<TcpListener> {
    let listener = crate::netns::run_in(netns, || {
        let listener = std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))?;
        listener.set_nonblocking(true)?;
        Ok::<_, std::io::Error>(listener)
    })??;
    TcpListener::from_std(listener)
}

impl HealthChecks for HealthCheckServers {
    fn set(&mut self, service: &ObjectKey, check: Option<HealthCheck>) {
        let Some(check) = check else {
            self.remove(service);
            return;
        };
        if self
            .by_service
            .get(service)
            .is_some_and(|&p| p != check.node_port)
        {
            self.remove(service);
        }
        if let Some(listener) = self.by_port.get(&check.node_port) {
            if listener.service == *service {
                listener
                    .local_endpoints
                    .store(check.local_endpoints, Ordering::Relaxed);
            } else {
                warn!(
                    %service,
                    port = check.node_port,
                    holder = %listener.service,
                    "healthCheckNodePort already serves another service: not served for this one"
                );
            }
            return;
        }
        let listener = match bind_in(self.netns.as_deref(), check.node_port) {
            Ok(listener) => listener,
            Err(error) => {
                warn!(%service, port = check.node_port, %error, "cannot listen on the health-check nodePort: load balancers will take this node for unhealthy");
                return;
            }
        };
        let local_endpoints = Arc::new(AtomicU32::new(check.local_endpoints));
        let task = tokio::spawn(serve(listener, service.clone(), local_endpoints.clone()));
        info!(%service, port = check.node_port, "health-check nodePort open");
        self.by_service.insert(service.clone(), check.node_port);
        self.by_port.insert(
            check.node_port,
            Listener {
                service: service.clone(),
                local_endpoints,
                task,
            },
        );
    }
}

/// kube-proxy's `--healthz-bind-address` default port.
pub const NODE_HEALTH_PORT: u16 = 10256;

/// Serves kube-proxy's node health endpoint on `port` in the namespace
/// at `netns`: any path answers 200 with `nodeEligible: true` once
/// `ready` (the first full sync is done), 503 before.
pub fn serve_node_health(
    netns: Option<PathBuf>,
    port: u16,
    ready: Arc<dyn Fn() -> bool + Send + Sync>,
) -> std::io::Result<JoinHandle<()>> {
    let listener = bind_in(netns.as_deref(), port)?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            tokio::spawn(answer(stream, node_health(ready())));
        }
    }))
}

/// kube-proxy's node health answer (`pkg/proxy/healthcheck/proxy_health.go`).
pub fn node_health(healthy: bool) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (status, reason) = if healthy {
        (200, "OK")
    } else {
        (503, "Service Unavailable")
    };
    let body = serde_json::json!({
        "lastUpdated": now.to_string(),
        "currentTime": now.to_string(),
        "nodeEligible": healthy,
    })
    .to_string();
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nX-Content-Type-Options: nosniff\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

async fn serve(listener: TcpListener, service: ObjectKey, local_endpoints: Arc<AtomicU32>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of descriptors, say: not a tight loop.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let count = local_endpoints.load(Ordering::Relaxed);
        tokio::spawn(answer(stream, response(&service, count)));
    }
}

/// The longest request head read before answering: a probe's is a line
/// and a few headers.
const REQUEST_HEAD_LIMIT: usize = 4096;

/// Answers one probe with `answer`. The request itself does not matter
/// (kube-proxy answers any path), but all of its head is read first,
/// within a bound of size and time: a socket closed with unread bytes
/// resets, and the prober, still writing its request in pieces, sees a
/// broken pipe instead of the answer.
async fn answer(mut stream: TcpStream, answer: String) {
    let mut head = Vec::with_capacity(512);
    let read_head = async {
        let mut chunk = [0u8; 512];
        while head.len() < REQUEST_HEAD_LIMIT && !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&chunk[..n]),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), read_head).await;
    let _ = stream.write_all(answer.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// kube-proxy's answer (`pkg/proxy/healthcheck/service_health.go`).
pub fn response(service: &ObjectKey, local_endpoints: u32) -> String {
    let (status, reason) = if local_endpoints > 0 {
        (200, "OK")
    } else {
        (503, "Service Unavailable")
    };
    let body = serde_json::json!({
        "service": {"namespace": service.namespace(), "name": service.name()},
        "localEndpoints": local_endpoints,
        "serviceProxyHealthy": true,
    })
    .to_string();
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nX-Content-Type-Options: nosniff\r\nX-Load-Balancing-Endpoint-Weight: {local_endpoints}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_as_kube_proxy_does() {
        let service = ObjectKey::new("shop", "web");
        let healthy = response(&service, 2);
        assert!(healthy.starts_with("HTTP/1.1 200 OK\r\n"), "{healthy}");
        assert!(healthy.contains("X-Load-Balancing-Endpoint-Weight: 2\r\n"));
        let body = healthy.split("\r\n\r\n").nth(1).unwrap();
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["service"]["namespace"], "shop");
        assert_eq!(json["service"]["name"], "web");
        assert_eq!(json["localEndpoints"], 2);
        let none = response(&service, 0);
        assert!(
            none.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
            "{none}"
        );
        assert!(none.contains("\"localEndpoints\":0"));
    }

    /// A prober that writes its request in pieces gets the answer, not a
    /// reset: the head is read whole before the socket closes.
    #[tokio::test]
    async fn a_request_written_in_pieces_is_answered() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let address = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            answer(stream, node_health(true)).await;
        });
        let mut client = TcpStream::connect(address).await.unwrap();
        for piece in ["GET ", "/healthz", " HTTP/1.1\r\n", "Host: lb\r\n\r\n"] {
            client.write_all(piece.as_bytes()).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut response = String::new();
        client.read_to_string(&mut response).await.unwrap();
        assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
        server.await.unwrap();
    }

    #[test]
    fn the_node_health_endpoint_answers_as_kube_proxys() {
        let ready = node_health(true);
        assert!(ready.starts_with("HTTP/1.1 200 OK\r\n"), "{ready}");
        let body: serde_json::Value =
            serde_json::from_str(ready.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        assert_eq!(body["nodeEligible"], true);
        assert!(body["lastUpdated"].is_string() && body["currentTime"].is_string());
        assert!(node_health(false).starts_with("HTTP/1.1 503 "));
    }
}
