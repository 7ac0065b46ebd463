//! The underlay pods on this node's uplink (`LOCAL_PODS`), for the
//! uplink program: a backend found there is handed to its macvlan by MAC
//! (its replies leave by the pod's own interface, where its TC egress
//! program turns them back), any other goes back out SNATed. Found by
//! each scan among the pods with the TC pair: interfaces whose parent is
//! the uplink (by index: the parents of pods' macvlans live in the host's
//! namespace, where the uplink is), with their MAC and IPv4 addresses.

use std::{collections::BTreeMap, net::Ipv4Addr};

use crate::maps::NorthSouthMaps;

use super::LinkSummary;

/// What `LOCAL_PODS` holds, kept equal to what the scans find.
#[derive(Debug)]
pub(super) struct LocalPods {
    /// The uplink's index.
    uplink: u32,
    /// Written: each pod address with its interface's MAC.
    written: BTreeMap<Ipv4Addr, [u8; 6]>,
}

impl LocalPods {
    pub(super) fn new(uplink: u32) -> Self {
        Self {
            uplink,
            written: BTreeMap::new(),
        }
    }

    /// The pod addresses written.
    pub(super) fn addresses(&self) -> impl Iterator<Item = &Ipv4Addr> {
        self.written.keys()
    }

    /// Whether `link` is a child of the uplink.
    pub(super) fn is_child(&self, link: &LinkSummary) -> bool {
        link.parent == Some(self.uplink)
    }

    /// Adds `link` (a pod's interface with the TC pair) to `found` when
    /// it is a child of the uplink.
    pub(super) fn note(&self, link: &LinkSummary, found: &mut BTreeMap<Ipv4Addr, [u8; 6]>) {
        if !self.is_child(link) {
            return;
        }
        if let Some(mac) = link.mac {
            for address in &link.ipv4 {
                found.insert(*address, mac);
            }
        }
    }

    /// Makes `LOCAL_PODS` hold `found`: new and changed pods first, then
    /// (with `removals`: every namespace was read) the gone ones. Returns
    /// the errors (each retried by the next scan).
    pub(super) fn sync(
        &mut self,
        maps: &mut NorthSouthMaps,
        found: BTreeMap<Ipv4Addr, [u8; 6]>,
        removals: bool,
    ) -> Vec<String> {
        let mut errors = Vec::new();
        for (address, mac) in &found {
            if self.written.get(address) != Some(mac) {
                match maps.set_local_pod(*address, *mac) {
                    Ok(()) => {
                        tracing::info!(%address, "a pod on the uplink: served from outside by MAC");
                        self.written.insert(*address, *mac);
                    }
                    Err(e) => errors.push(format!("writing LOCAL_PODS {address}: {e}")),
                }
            }
        }
        let gone: Vec<Ipv4Addr> = self
            .written
            .keys()
            .filter(|a| removals && !found.contains_key(a))
            .copied()
            .collect();
        for address in gone {
            match maps.remove_local_pod(address) {
                Ok(()) => {
                    self.written.remove(&address);
                }
                Err(e) => errors.push(format!("removing {address} from LOCAL_PODS: {e}")),
            }
        }
        errors
    }
}
