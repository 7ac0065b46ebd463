//! The Kubernetes source through kube's real HTTP client, against a
//! scripted API server (no kube-apiserver can run here): list, watch
//! events, a watch that ends, a 410 Gone that forces a re-list, and the
//! store following all of it.

use std::{
    collections::{BTreeSet, HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::Duration,
};

use datapath_user::k8s::{
    IssueKind, NodeContext, ObjectKey,
    node_facts::{GivenFacts, watch_node},
    source::{Backoff, SourceMessage, watch_api, watch_api_with},
    store::{Change, Kind, Store},
};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    sync::mpsc,
};

fn service(name: &str, ip: &str, resource_version: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default", "resourceVersion": resource_version,
                     "uid": format!("uid-{name}")},
        "spec": {"type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip],
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]}
    })
}

fn slice(service: &str, address: &str, resource_version: &str) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{service}-abcde"), "namespace": "default",
                     "resourceVersion": resource_version,
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": [address], "conditions": {"ready": true}}]
    })
}

/// List items come without apiVersion/kind, as the API server sends them.
fn list(kind: &str, resource_version: &str, items: Vec<Value>) -> Value {
    let items: Vec<Value> = items
        .into_iter()
        .map(|mut item| {
            let object = item.as_object_mut().unwrap();
            object.remove("apiVersion");
            object.remove("kind");
            item
        })
        .collect();
    json!({"apiVersion": "v1", "kind": kind, "metadata": {"resourceVersion": resource_version},
           "items": items})
}

fn event(kind: &str, object: Value) -> Value {
    json!({"type": kind, "object": object})
}

fn gone() -> Value {
    event(
        "ERROR",
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": "too old resource version: 3 (10)", "reason": "Expired", "code": 410}),
    )
}

/// What the server answers, per resource, in order.
enum Reply {
    /// A list response.
    List(Value),
    /// Watch events, then the stream ends.
    Watch(Vec<Value>),
    /// A watch that stays open with nothing to say.
    Hang,
}

#[derive(Default)]
struct Script {
    replies: HashMap<&'static str, VecDeque<Reply>>,
    /// Every request line seen, for the assertions.
    seen: Vec<String>,
    /// Every request's arrival and target (path and query).
    requests: Vec<(std::time::Instant, String)>,
}

async fn serve(listener: TcpListener, script: Arc<Mutex<Script>>) {
    loop {
        let (mut stream, _) = listener.accept().await.unwrap();
        let script = script.clone();
        tokio::spawn(async move {
            let mut buffer = Vec::new();
            let mut chunk = [0u8; 4096];
            while !buffer.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buffer.extend_from_slice(&chunk[..n]),
                }
            }
            let head = String::from_utf8_lossy(&buffer).to_string();
            let target = head.split_whitespace().nth(1).unwrap_or("").to_owned();
            let resource = if target.starts_with("/api/v1/services") {
                "services"
            } else if target.starts_with("/apis/discovery.k8s.io/v1/endpointslices") {
                "endpointslices"
            } else if target.starts_with("/api/v1/nodes") {
                "nodes"
            } else {
                "other"
            };
            let is_watch = target.contains("watch=true");
            let reply = {
                let mut script = script.lock().unwrap();
                script.seen.push(format!(
                    "{resource} {}",
                    if is_watch { "watch" } else { "list" }
                ));
                script
                    .requests
                    .push((std::time::Instant::now(), target.clone()));
                script
                    .replies
                    .get_mut(resource)
                    .and_then(VecDeque::pop_front)
            };
            let header =
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n";
            match reply {
                Some(Reply::List(body)) if !is_watch => {
                    let body = body.to_string();
                    let response = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(response.as_bytes()).await;
                }
                Some(Reply::Watch(events)) if is_watch => {
                    let _ = stream.write_all(header.as_bytes()).await;
                    for event in events {
                        let _ = stream.write_all(format!("{event}\n").as_bytes()).await;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                Some(Reply::Hang) | None if is_watch => {
                    let _ = stream.write_all(header.as_bytes()).await;
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                }
                _ => {
                    let body = r#"{"kind":"Status","apiVersion":"v1","status":"Failure","message":"unscripted request","reason":"InternalError","code":500}"#;
                    let response = format!(
                        "HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(response.as_bytes()).await;
                }
            }
            let _ = stream.shutdown().await;
        });
    }
}

/// A kube client of a scripted API server that answers with `script`.
async fn scripted(script: Script) -> (kube::Client, Arc<Mutex<Script>>) {
    let script = Arc::new(Mutex::new(script));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(serve(listener, script.clone()));
    let client = kube::Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap();
    (client, script)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_watch_end_gone_relist() {
    let mut script = Script::default();
    script.replies.insert(
        "services",
        VecDeque::from([
            Reply::List(list(
                "ServiceList",
                "1",
                vec![service("a", "10.96.0.1", "1")],
            )),
            // Watch 1: b added, a changed; then the stream ends (as API
            // servers end watches after timeoutSeconds).
            Reply::Watch(vec![
                event("ADDED", service("b", "10.96.0.2", "2")),
                event("MODIFIED", service("a", "10.96.0.11", "3")),
            ]),
            // Watch 2, resumed from resourceVersion 3: too old.
            Reply::Watch(vec![gone()]),
            // The re-list: a was deleted while we were not watching.
            Reply::List(list(
                "ServiceList",
                "10",
                vec![service("b", "10.96.0.2", "2")],
            )),
            Reply::Hang,
        ]),
    );
    script.replies.insert(
        "endpointslices",
        VecDeque::from([
            Reply::List(list(
                "EndpointSliceList",
                "1",
                vec![slice("b", "10.244.0.7", "1")],
            )),
            Reply::Hang,
        ]),
    );
    let (client, script) = scripted(script).await;
    let (tx, mut rx) = mpsc::channel(64);
    let source = tokio::spawn(watch_api(client, tx));

    let mut store = Store::default();
    let mut synced = BTreeSet::new();
    let mut replaced = Vec::new();
    let mut applied = Vec::new();
    let mut problems = Vec::new();
    let names = |store: &Store| -> BTreeSet<String> {
        store.service_keys().map(|k| k.name().to_owned()).collect()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    // Until the re-list has removed `a`, after the watch had added `b`.
    loop {
        let message = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "timed out; requests seen: {:?}",
                    script.lock().unwrap().seen
                )
            })
            .expect("source ended");
        match message {
            SourceMessage::Synced(kind) => {
                synced.insert(kind);
            }
            SourceMessage::Problem { message, .. } | SourceMessage::Incomplete(message) => {
                problems.push(message)
            }
            SourceMessage::Changes(_) => panic!("the API source sends changes one by one"),
            SourceMessage::Node(_) => panic!("no Node is watched without a node name"),
            SourceMessage::Change(change) => {
                match &change {
                    Change::Replaced(kind, objects) => replaced.push((*kind, objects.len())),
                    Change::Applied(object) => applied.push(object.describe()),
                    Change::Deleted(kind, key) => applied.push(format!("deleted {kind:?} {key}")),
                }
                store.apply(change);
            }
        }
        let relisted = replaced.iter().filter(|(k, _)| *k == Kind::Service).count() == 2;
        if relisted && names(&store) == BTreeSet::from(["b".to_owned()]) {
            break;
        }
    }
    source.abort();

    assert_eq!(synced, BTreeSet::from([Kind::Service, Kind::EndpointSlice]));
    assert_eq!(
        applied,
        ["Service default/b", "Service default/a"],
        "watch events arrive as applied changes"
    );
    assert!(
        replaced.contains(&(Kind::Service, 1)) && replaced.contains(&(Kind::EndpointSlice, 1)),
        "{replaced:?}"
    );
    assert!(
        problems.is_empty(),
        "a 410 Gone is routine (the watcher lists again at once): not a problem: {problems:?}"
    );
    let seen = script.lock().unwrap().seen.clone();
    let services: Vec<&String> = seen.iter().filter(|s| s.starts_with("services")).collect();
    // (The watch after the re-list may not have been sent yet.)
    assert_eq!(
        services[..4],
        [
            "services list",
            "services watch",
            "services watch",
            "services list"
        ],
        "list, watch, re-watch after the end, re-list after 410"
    );

    // What the store now asks for: b's frontend with its endpoint.
    let translation = store.translate(&ObjectKey::new("default", "b"), &NodeContext::default());
    assert_eq!(translation.frontends.len(), 1);
    assert_eq!(
        translation.frontends[0].frontend.to_string(),
        "10.96.0.2:80/TCP"
    );
    assert_eq!(
        translation.frontends[0].backends[0].to_string(),
        "10.244.0.7:8080"
    );
}

/// An API server that keeps failing lists (thousands of agents are
/// retrying): each retry waits longer than the last, up to the cap, and
/// never resets while nothing succeeds; lists are served from the watch
/// cache (resourceVersion=0) and carry both of kube-proxy's label
/// selectors; the failures are reported as API problems, not datapath ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_api_server_is_retried_ever_more_slowly_from_the_watch_cache() {
    let mut script = Script::default();
    // Services: no reply scripted, so every request fails (500).
    script.replies.insert(
        "endpointslices",
        VecDeque::from([
            Reply::List(list("EndpointSliceList", "1", vec![])),
            Reply::Hang,
        ]),
    );
    let (client, script) = scripted(script).await;
    let (tx, mut rx) = mpsc::channel(64);
    let backoff = Backoff {
        initial: Duration::from_millis(50),
        max: Duration::from_millis(400),
    };
    let source = tokio::spawn(watch_api_with(client, tx, backoff));
    let mut problems = Vec::new();
    let until = tokio::time::Instant::now() + Duration::from_secs(3);
    while let Ok(Some(message)) = tokio::time::timeout_at(until, rx.recv()).await {
        if let SourceMessage::Problem { kind, message } = message {
            problems.push((kind, message));
        }
    }
    source.abort();

    let requests = script.lock().unwrap().requests.clone();
    let lists: Vec<_> = requests
        .iter()
        .filter(|(_, target)| {
            target.starts_with("/api/v1/services") && !target.contains("watch=true")
        })
        .collect();
    for (_, target) in &requests {
        assert!(
            target.contains("labelSelector=%21service.kubernetes.io%2Fservice-proxy-name%2C%21service.kubernetes.io%2Fheadless"),
            "both of kube-proxy's selectors: {target}"
        );
    }
    for (_, target) in &lists {
        assert!(
            target.contains("resourceVersion=0"),
            "from the watch cache: {target}"
        );
    }
    let pauses: Vec<Duration> = lists.windows(2).map(|w| w[1].0 - w[0].0).collect();
    assert!(pauses.len() >= 5, "{pauses:?}");
    // 50, 100, 200, 400, 400… ms, each ±20 %: growing until the cap.
    for pair in pauses[..4].windows(2) {
        assert!(
            pair[1] > pair[0],
            "each pause longer than the last: {pauses:?}"
        );
    }
    for pause in &pauses {
        assert!(
            *pause < Duration::from_millis(400 * 12 / 10 + 100),
            "capped: {pauses:?}"
        );
    }
    assert!(
        pauses[4..]
            .iter()
            .all(|p| *p >= Duration::from_millis(400 * 8 / 10)),
        "at the cap from then on, not reset: {pauses:?}"
    );
    assert!(!problems.is_empty());
    assert!(
        problems.iter().all(|(kind, _)| *kind == IssueKind::Api),
        "{problems:?}"
    );
}

fn node(name: &str, zone: Option<&str>, resource_version: &str) -> Value {
    let labels = match zone {
        Some(zone) => json!({"kubernetes.io/hostname": name, "topology.kubernetes.io/zone": zone}),
        None => json!({"kubernetes.io/hostname": name}),
    };
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "resourceVersion": resource_version, "labels": labels},
        "status": {"addresses": [
            {"type": "Hostname", "address": name},
            {"type": "InternalIP", "address": "192.168.7.1"},
            {"type": "ExternalIP", "address": "203.0.113.7"},
            {"type": "InternalIP", "address": "fd00::7"},
        ]}
    })
}

/// The agent's own Node, found by a field selector on its name: its zone
/// and addresses at first, and again each time they change (an unrelated
/// change says nothing; a removed label says None).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nodes_zone_and_addresses_are_read_from_its_node_and_followed() {
    let mut script = Script::default();
    script.replies.insert(
        "nodes",
        VecDeque::from([
            Reply::List(list(
                "NodeList",
                "1",
                vec![node("node-1", Some("zone-a"), "1")],
            )),
            Reply::Watch(vec![
                event("MODIFIED", node("node-1", Some("zone-a"), "2")),
                event("MODIFIED", node("node-1", Some("zone-b"), "3")),
                event("MODIFIED", node("node-1", None, "4")),
            ]),
            Reply::Hang,
        ]),
    );
    let (client, script) = scripted(script).await;
    let (tx, mut rx) = mpsc::channel(64);
    let source = tokio::spawn(watch_node(
        client,
        "node-1".into(),
        GivenFacts::default(),
        tx,
        Backoff::default(),
    ));
    let mut zones = Vec::new();
    let until = tokio::time::Instant::now() + Duration::from_secs(3);
    while zones.len() < 3
        && let Ok(Some(message)) = tokio::time::timeout_at(until, rx.recv()).await
    {
        match message {
            SourceMessage::Node(facts) => {
                assert_eq!(
                    facts.addresses,
                    ["192.168.7.1", "fd00::7"].map(|a| a.parse::<std::net::IpAddr>().unwrap()),
                    "the InternalIP addresses, sorted (an ExternalIP may be a NAT's)"
                );
                zones.push(facts.zone)
            }
            other => panic!("{other:?}"),
        }
    }
    source.abort();
    assert_eq!(
        zones,
        [Some("zone-a".to_owned()), Some("zone-b".to_owned()), None]
    );
    let requests = script.lock().unwrap().requests.clone();
    assert!(
        requests
            .iter()
            .all(|(_, target)| target.contains("fieldSelector=metadata.name%3Dnode-1")),
        "only its own Node: {requests:?}"
    );
}
