//! What the agent needs to know of its own node, from its Node object:
//! its zone (topology hints name zones; the `topology.kubernetes.io/zone`
//! label says which this node is in) and its addresses (pods reach a
//! service's nodePort at them). kube-proxy watches its Node the same way,
//! by a field selector on its name, and resyncs everything when its
//! labels change.

use std::{net::IpAddr, time::Duration};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::{Api, Client, runtime::watcher};
use tokio::sync::mpsc;

use super::source::{Backoff, NodeFacts, SourceMessage};

/// The well-known label a node's zone is in.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// What the operator gave on the command line, which the Node does not
/// override.
#[derive(Clone, Debug, Default)]
pub struct GivenFacts {
    pub zone: Option<String>,
    /// Empty: from the Node.
    pub addresses: Vec<IpAddr>,
}

/// The facts `node` states: its zone label and the addresses in its
/// status of type InternalIP (those that parse). Not ExternalIP: in a
/// cloud it is often a NAT address the node does not hold, which
/// kube-proxy (`--dst-type LOCAL`) would not take either.
pub fn facts_of(node: &Node) -> NodeFacts {
    let zone = node
        .metadata
        .labels
        .as_ref()
        .and_then(|labels| labels.get(ZONE_LABEL))
        .cloned();
    let mut addresses: Vec<IpAddr> = node
        .status
        .as_ref()
        .and_then(|status| status.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP")
        .filter_map(|a| a.address.parse().ok())
        .collect();
    addresses.sort_unstable();
    addresses.dedup();
    NodeFacts { zone, addresses }
}

/// Watches the Node named `node_name` through `client` and sends its
/// facts (`SourceMessage::Node`), with what `given` fixes, at first and
/// whenever they change, until the receiver is dropped. A deleted Node
/// changes nothing (as for kube-proxy). Failures are reported and retried
/// with `backoff`.
pub async fn watch_node(
    client: Client,
    node_name: String,
    given: GivenFacts,
    tx: mpsc::Sender<SourceMessage>,
    backoff: Backoff,
) {
    let config = watcher::Config::default()
        .fields(&format!("metadata.name={node_name}"))
        .any_semantic();
    let stream = watcher(Api::<Node>::all(client), config);
    futures::pin_mut!(stream);
    // None until the Node was read once.
    let mut sent: Option<NodeFacts> = None;
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
                let describe = |next| {
                    format!(
                        "watching Node {node_name} for its zone and addresses: {e} \
                         (retrying in {next:?}); what was last read is used meanwhile"
                    )
                };
                if !backoff.report_and_wait(&mut pause, &tx, describe).await {
                    return;
                }
                continue;
            }
        };
        pause = None;
        let mut facts = facts_of(&node);
        if given.zone.is_some() {
            facts.zone = given.zone.clone();
        }
        if !given.addresses.is_empty() {
            facts.addresses = given.addresses.clone();
        }
        if sent.as_ref() == Some(&facts) {
            continue;
        }
        sent = Some(facts.clone());
        if tx.send(SourceMessage::Node(facts)).await.is_err() {
            return;
        }
    }
}
