//! What is attached, read from the pins alone (no netlink, no
//! namespace entered): `status`, the tests and the bench use it.

use std::{collections::BTreeSet, fs, path::Path};

use crate::loader;

/// (netns, iface) pairs with pinned TC links under `pin_dir`, skipping
/// the agent's own namespace.
pub fn pinned_tc_links(pin_dir: &Path) -> BTreeSet<(String, String)> {
    pinned_links(pin_dir, loader::TC_LINKS)
}

/// (netns, iface) pairs with the ingress program alone pinned (other
/// interfaces of attached pods, `loader::REPLY_LINKS`).
pub fn pinned_reply_links(pin_dir: &Path) -> BTreeSet<(String, String)> {
    pinned_links(pin_dir, loader::REPLY_LINKS)
}

pub(super) fn pinned_links(pin_dir: &Path, links_dir: &str) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    let Ok(namespaces) = fs::read_dir(pin_dir.join(links_dir)) else {
        return out;
    };
    for namespace in namespaces.flatten() {
        let netns_name = namespace.file_name().to_string_lossy().into_owned();
        if netns_name == "host" {
            continue;
        }
        for iface in fs::read_dir(namespace.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            // Attached once its ingress link is pinned (the last of the
            // pair): the directory exists a moment before.
            if !iface.path().join("ingress").exists() {
                continue;
            }
            out.insert((
                netns_name.clone(),
                iface.file_name().to_string_lossy().into_owned(),
            ));
        }
    }
    out
}
