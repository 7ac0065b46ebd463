//! Pods opted out of socket-LB: the namespaces in the netns directory
//! whose name matches `--socket-lb-skip-netns` go into `SOCK_LB_SKIP` (by
//! namespace cookie), and leave it when they are gone. Their sockets are
//! not translated at `connect()`; their packets take the TC path.
//!
//! The agent learns pods from the netns directory, not from Pod objects
//! (it watches Services and EndpointSlices only), so the opt-out is by
//! namespace name: with containerd, `cni-<uuid>` names carry nothing of
//! the pod, and a pattern suits runtimes or CNI setups that name
//! namespaces after pods (`<namespace>_<pod>`, Multus' `--netns`), or one
//! node's sidecar-injected pods by convention.

use std::{collections::BTreeMap, fs, io, path::PathBuf};

use aya::maps::{HashMap, Map, MapData};
use datapath_common::maps::SOCK_LB_SKIP_MAP;

use crate::{loader::LoaderError, pod_routes};

pub struct SockLbSkip {
    map: HashMap<MapData, u64, u8>,
    netns_dir: PathBuf,
    pattern: glob::Pattern,
    /// Namespace name → cookie, as written.
    listed: BTreeMap<String, u64>,
}

impl SockLbSkip {
    pub fn open(
        pin_dir: &std::path::Path,
        netns_dir: PathBuf,
        pattern: glob::Pattern,
    ) -> Result<Self, LoaderError> {
        let data = MapData::from_pin(pin_dir.join(SOCK_LB_SKIP_MAP))
            .map_err(|e| LoaderError::map(SOCK_LB_SKIP_MAP, e))?;
        let map = HashMap::try_from(Map::HashMap(data))
            .map_err(|e| LoaderError::map(SOCK_LB_SKIP_MAP, e))?;
        Ok(Self {
            map,
            netns_dir,
            pattern,
            listed: BTreeMap::new(),
        })
    }

    /// Lists the matching namespaces and brings the map in line; returns
    /// the names added and removed.
    pub fn sync(&mut self) -> io::Result<(Vec<String>, Vec<String>)> {
        let mut present = BTreeMap::new();
        for entry in fs::read_dir(&self.netns_dir)?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !self.pattern.matches(&name) {
                continue;
            }
            let cookie = match self.listed.get(&name) {
                Some(cookie) => *cookie,
                // A namespace being created or deleted: next time.
                None => match pod_routes::netns_cookie(&entry.path()) {
                    Ok(cookie) => cookie,
                    Err(_) => continue,
                },
            };
            present.insert(name, cookie);
        }
        let mut added = Vec::new();
        for (name, cookie) in &present {
            if !self.listed.contains_key(name) {
                self.map.insert(cookie, 1, 0).map_err(io::Error::other)?;
                added.push(name.clone());
            }
        }
        let mut removed = Vec::new();
        for (name, cookie) in &self.listed {
            if !present.contains_key(name) {
                let _ = self.map.remove(cookie);
                removed.push(name.clone());
            }
        }
        self.listed = present;
        Ok((added, removed))
    }
}
