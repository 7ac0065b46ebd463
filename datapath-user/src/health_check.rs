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
    net::TcpListener,
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
            let Ok((mut stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let healthy = ready();
            tokio::spawn(async move {
                let mut request = [0u8; 1024];
                let _ =
                    tokio::time::timeout(Duration::from_secs(2), stream.read(&mut request)).await;
                let _ = stream.write_all(node_health(healthy).as_bytes()).await;
                let _ = stream.shutdown().await;
            });
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
        let Ok((mut stream, _)) = listener.accept().await else {
            // Out of descriptors, say: not a tight loop.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let (service, count) = (service.clone(), local_endpoints.load(Ordering::Relaxed));
        tokio::spawn(async move {
            // The request itself does not matter (kube-proxy answers any
            // path); read what came, bounded, then answer.
            let mut request = [0u8; 1024];
            let _ = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut request)).await;
            let _ = stream.write_all(response(&service, count).as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
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
