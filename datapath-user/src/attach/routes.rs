//! Following an attached pod's routes: copied into `POD_ROUTES`, and
//! the ingress program kept on the other interfaces they leave by.

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    path::Path,
};

use super::{PodAttacher, ScanReport};
use crate::loader;

impl PodAttacher {
    /// Copies every attached pod's routes into `POD_ROUTES` and keeps the
    /// ingress program on the other interfaces they leave by; removes it
    /// where no route leaves any more (or the interface is gone).
    pub(super) fn follow_routes(
        &mut self,
        existing: &BTreeMap<(String, String), u32>,
        unknown_netns: &BTreeSet<String>,
        report: &mut ScanReport,
    ) {
        let Some(routes) = &mut self.routes else {
            return;
        };
        let mut want: BTreeMap<(String, String), u32> = BTreeMap::new();
        let mut errors = Vec::new();
        let mut read = Vec::new();
        for ((netns_name, iface), index) in &self.attached {
            let Some(own) =
                index.or_else(|| existing.get(&(netns_name.clone(), iface.clone())).copied())
            else {
                continue;
            };
            let path = self.dir.join(netns_name);
            if !path.exists() {
                continue; // the pod is going; its pins go below
            }
            match routes.sync(netns_name, &path) {
                Ok(table) => {
                    read.push((netns_name.clone(), iface.clone()));
                    for route in table.iter().filter(|r| r.ifindex != own) {
                        if let Some(((_, name), _)) = existing
                            .iter()
                            .find(|((ns, _), i)| ns == netns_name && **i == route.ifindex)
                        {
                            want.insert((netns_name.clone(), name.clone()), route.ifindex);
                        }
                    }
                }
                // Deleted between the check and the read.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => errors.push((
                    netns_name.clone(),
                    iface.clone(),
                    format!("reading routes: {e}"),
                )),
            }
        }
        // An error stands only until the same step succeeds.
        for key in read {
            self.last_errors.remove(&key);
        }
        for (netns, iface, error) in errors {
            self.note_error(report, netns, iface, error);
        }
        for (key, index) in &want {
            if self.replies.get(key) == Some(&Some(*index)) {
                continue;
            }
            let (netns_name, iface) = key;
            let path = self.dir.join(netns_name);
            match self
                .datapath
                .attach_tc_reply(Some(&path.to_string_lossy()), iface, self.mode)
            {
                Ok(attachment) => {
                    attachment.keep();
                    self.last_errors.remove(key);
                    if self.replies.insert(key.clone(), Some(*index)).is_none() {
                        report
                            .attached
                            .push((netns_name.clone(), format!("{iface} (replies)")));
                    }
                }
                Err(e) => self.note_error(report, netns_name.clone(), iface.clone(), e.to_string()),
            }
        }
        let Some(pin_dir) = self.datapath.pin_dir().map(Path::to_path_buf) else {
            return;
        };
        let stale: Vec<(String, String)> = self
            .replies
            .keys()
            .filter(|key| !want.contains_key(*key) && !unknown_netns.contains(&key.0))
            .cloned()
            .collect();
        for key in stale {
            let (netns_name, iface) = &key;
            match loader::detach_pinned_reply(&pin_dir, Some(netns_name), iface) {
                Ok(_) => {
                    self.replies.remove(&key);
                    self.last_errors.remove(&key);
                    report
                        .detached
                        .push((netns_name.clone(), format!("{iface} (replies)")));
                }
                Err(e) => self.note_error(report, netns_name.clone(), iface.clone(), e.to_string()),
            }
        }
    }
}
