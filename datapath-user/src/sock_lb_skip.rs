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

use crate::{error::LoaderError, pod_routes};

pub struct SockLbSkip {
    map: HashMap<MapData, u64, u8>,
    netns_dir: PathBuf,
    pattern: glob::Pattern,
    /// Namespace name → (its nsfs inode, its cookie), as written. The
    /// inode tells a namespace recreated under the same name (a pod named
    /// again, a StatefulSet's) from the one before.
    listed: BTreeMap<String, (u64, u64)>,
}

impl SockLbSkip {
    /// Opens `SOCK_LB_SKIP` and empties it: the agent owns it and lists
    /// it again from the namespaces there are (an earlier agent's entries
    /// for pods deleted meanwhile would otherwise stay).
    pub fn open(
        pin_dir: &std::path::Path,
        netns_dir: PathBuf,
        pattern: glob::Pattern,
    ) -> Result<Self, LoaderError> {
        let data = MapData::from_pin(pin_dir.join(SOCK_LB_SKIP_MAP))
            .map_err(|e| LoaderError::map(SOCK_LB_SKIP_MAP, e))?;
        let mut map: HashMap<MapData, u64, u8> = HashMap::try_from(Map::HashMap(data))
            .map_err(|e| LoaderError::map(SOCK_LB_SKIP_MAP, e))?;
        let stale: Vec<u64> = map.keys().filter_map(Result::ok).collect();
        for cookie in stale {
            let _ = map.remove(&cookie);
        }
        Ok(Self {
            map,
            netns_dir,
            pattern,
            listed: BTreeMap::new(),
        })
    }

    /// Lists the matching namespaces and brings the map in line; returns
    /// the names added and removed, and per-namespace errors (one failing
    /// namespace does not stop the others).
    pub fn sync(&mut self) -> io::Result<SkipReport> {
        use std::os::unix::fs::MetadataExt;
        let mut report = SkipReport::default();
        let mut present = BTreeMap::new();
        for entry in fs::read_dir(&self.netns_dir)?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !self.pattern.matches(&name) {
                continue;
            }
            // A namespace being created or deleted: next time.
            let Ok(inode) = fs::metadata(entry.path()).map(|m| m.ino()) else {
                continue;
            };
            let cookie = match self.listed.get(&name) {
                Some((known, cookie)) if *known == inode => *cookie,
                _ => match pod_routes::netns_cookie(&entry.path()) {
                    Ok(cookie) => cookie,
                    Err(_) => continue,
                },
            };
            present.insert(name, (inode, cookie));
        }
        for (name, (_, cookie)) in &self.listed {
            if present.get(name).is_none_or(|(_, now)| now != cookie) {
                let _ = self.map.remove(cookie);
                if !present.contains_key(name) {
                    report.removed.push(name.clone());
                }
            }
        }
        let mut listed = BTreeMap::new();
        for (name, (inode, cookie)) in present {
            let known = self.listed.get(&name).is_some_and(|(_, c)| *c == cookie);
            if !known {
                if let Err(e) = self.map.insert(cookie, 1, 0) {
                    report.errors.push((name, e.to_string()));
                    continue;
                }
                report.added.push(name.clone());
            }
            listed.insert(name, (inode, cookie));
        }
        self.listed = listed;
        Ok(report)
    }
}

/// What one `sync` changed.
#[derive(Debug, Default)]
pub struct SkipReport {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// (namespace, why it could not be listed): the map is full, say.
    pub errors: Vec<(String, String)>,
}
