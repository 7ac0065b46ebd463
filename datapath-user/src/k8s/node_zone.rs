//! This node's zone, from its own Node object: topology hints name
//! zones, and a node learns which one it is in from its
//! `topology.kubernetes.io/zone` label (kube-proxy watches its Node the
//! same way, by a field selector on its name, and resyncs everything when
//! the label changes).

use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::{Api, Client, runtime::watcher};
use tokio::sync::mpsc;

use super::{
    IssueKind,
    source::{Backoff, SourceMessage},
};

/// The well-known label a node's zone is in.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// The zone `node` says it is in.
pub fn zone_of(node: &Node) -> Option<String> {
    node.metadata.labels.as_ref()?.get(ZONE_LABEL).cloned()
}

/// Watches the Node named `node_name` through `client` and sends its zone
/// (`SourceMessage::Zone`) at first and whenever it changes, until the
/// receiver is dropped. A deleted Node changes nothing (as for
/// kube-proxy). Failures are reported and retried with `backoff`.
pub async fn watch_node_zone(
    client: Client,
    node_name: String,
    tx: mpsc::Sender<SourceMessage>,
    backoff: Backoff,
) {
    let config = watcher::Config::default()
        .fields(&format!("metadata.name={node_name}"))
        .any_semantic();
    let stream = watcher(Api::<Node>::all(client), config);
    futures::pin_mut!(stream);
    // None until the Node was read once.
    let mut sent: Option<Option<String>> = None;
    let mut pause: Option<Duration> = None;
    while let Some(item) = stream.next().await {
        let node = match item {
            Ok(watcher::Event::Apply(node) | watcher::Event::InitApply(node)) => node,
            Ok(_) => {
                pause = None;
                continue;
            }
            Err(watcher::Error::WatchError(status)) if status.code == 410 => continue,
            Err(e) => {
                let next = backoff.next(pause);
                pause = Some(next);
                let problem = SourceMessage::Problem {
                    kind: IssueKind::Api,
                    message: format!(
                        "watching Node {node_name} for its zone: {e} (retrying in {next:?}); \
                         topology hints are used with the zone last read"
                    ),
                };
                if tx.send(problem).await.is_err() {
                    return;
                }
                tokio::time::sleep(Backoff::jittered(next)).await;
                continue;
            }
        };
        pause = None;
        let zone = zone_of(&node);
        if sent.as_ref() == Some(&zone) {
            continue;
        }
        sent = Some(zone.clone());
        if tx.send(SourceMessage::Zone(zone)).await.is_err() {
            return;
        }
    }
}
