//! Finding pod interfaces and keeping the TC pair attached to them.
//!
//! Pods are network namespaces bind-mounted in a directory (containerd
//! and `ip netns` use /var/run/netns). Each scan lists the namespaces,
//! the interfaces inside each, attaches to the new ones and removes the
//! pins of those that went away. A namespace appears before its
//! interface is moved in, so every scan looks inside every namespace.
//!
//! `selector` says which interfaces are pods'; `routes` follows each
//! attached pod's routes (other interfaces replies come back by);
//! `pinned` lists what is attached from the pins alone; `local_pods`
//! tells the uplink program which pods are children of the uplink.

mod local_pods;
mod pinned;
mod routes;
mod selector;
mod uplink_neighbours;

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

use self::pinned::pinned_links;
pub use self::{
    pinned::{pinned_reply_links, pinned_tc_links},
    selector::{LinkSummary, Selector, list_links},
};
use crate::{Datapath, TcMode, loader, pod_routes::PodRoutes, pod_tc::PodTcPolicy};

/// What one scan changed.
#[derive(Debug, Default)]
pub struct ScanReport {
    pub attached: Vec<(String, String)>,
    /// Attached interfaces found without our programs (detached by
    /// someone else: a pod with NET_ADMIN, a tool) and attached again.
    pub repaired: Vec<(String, String)>,
    /// Interfaces attached by others (the CNI plugin) that ran other
    /// programs than ours (an earlier agent's), given ours.
    pub refreshed: Vec<(String, String)>,
    pub detached: Vec<(String, String)>,
    /// Pod interfaces seen for the first time that the policy leaves to
    /// socket-LB alone (`crate::pod_tc`): no TC pair.
    pub socket_lb_only: Vec<(String, String)>,
    /// `(netns, iface or "", error)`, each reported once until it changes.
    pub errors: Vec<(String, String, String)>,
}

/// Keeps the TC pair on every selected pod interface.
///
/// Pins are only removed when their interface or namespace is gone: an
/// interface that exists but is not selected (attached by the CNI plugin
/// or by hand) keeps what it has.
pub struct PodAttacher {
    datapath: Datapath,
    dir: PathBuf,
    selector: Selector,
    mode: TcMode,
    /// Which pods get the pair (`Every` until socket-LB is attached).
    policy: PodTcPolicy,
    /// Selected interfaces the policy leaves without the pair (reported
    /// once).
    socket_lb_only: BTreeSet<(String, String)>,
    /// (netns, iface) with our pinned links → the ifindex attached to
    /// (None: adopted from an earlier agent, not yet seen).
    attached: BTreeMap<(String, String), Option<u32>>,
    /// Other interfaces of attached pods that some routes leave by, with
    /// the ingress program alone (replies come back there) → ifindex.
    replies: BTreeMap<(String, String), Option<u32>>,
    /// The pods' routing tables in `POD_ROUTES` (None: no pin directory).
    routes: Option<PodRoutes>,
    last_errors: BTreeMap<(String, String), String>,
    /// Whether the ingress program trusts `REPLY_FILTER` (the agent
    /// distrusts it at start; `crate::maps::DatapathMaps`'s
    /// `complete_reply_filter` makes it trusted). Swapping our programs in
    /// over another build's distrusts it first: that build's flows may
    /// have no flags.
    reply_filter_trusted: bool,
    /// The pods on the uplink, when north-south is served.
    local_pods: Option<local_pods::LocalPods>,
    /// Managed neighbour entries on the uplink for backends elsewhere.
    neighbours: Option<uplink_neighbours::UplinkNeighbours>,
}

impl PodAttacher {
    /// `datapath` must have been loaded with a pin directory: attachments
    /// are pinned so that they outlive the agent.
    pub fn new(datapath: Datapath, dir: PathBuf, selector: Selector, mode: TcMode) -> Self {
        let attached = datapath
            .pin_dir()
            .map(pinned_tc_links)
            .unwrap_or_default()
            .into_iter()
            .filter(|(netns, _)| selector.netns.matches(netns))
            .map(|key| (key, None))
            .collect();
        let replies = datapath
            .pin_dir()
            .map(|dir| pinned_links(dir, loader::REPLY_LINKS))
            .unwrap_or_default()
            .into_iter()
            .filter(|(netns, _)| selector.netns.matches(netns))
            .map(|key| (key, None))
            .collect();
        let routes = datapath.pin_dir().and_then(|dir| match PodRoutes::open(dir) {
            Ok(routes) => Some(routes),
            Err(e) => {
                tracing::warn!("pod routes unavailable: backends behind another pod interface will not be reached ({e})");
                None
            }
        });
        Self {
            datapath,
            dir,
            selector,
            mode,
            policy: PodTcPolicy::Every,
            socket_lb_only: BTreeSet::new(),
            attached,
            replies,
            routes,
            last_errors: BTreeMap::new(),
            reply_filter_trusted: false,
            local_pods: None,
            neighbours: None,
        }
    }

    /// Tells the uplink program which pods are children of the uplink
    /// (index `uplink` in the namespace at `netns`), and keeps the
    /// uplink's neighbour entries for backends elsewhere, from the next
    /// scan on.
    pub fn follow_uplink(&mut self, netns: Option<PathBuf>, uplink: u32) {
        self.local_pods = Some(local_pods::LocalPods::new(uplink));
        self.neighbours = Some(uplink_neighbours::UplinkNeighbours::new(netns, uplink));
    }

    /// The program ids of `(netns, iface)`'s pinned links (egress,
    /// ingress; None where there is no pin).
    fn pinned_program_ids(&self, (netns, iface): &(String, String)) -> (Option<u32>, Option<u32>) {
        use aya::programs::links::{FdLink, PinnedLink};
        let Some(pin_dir) = self.datapath.pin_dir() else {
            return (None, None);
        };
        let base = pin_dir.join(loader::TC_LINKS).join(netns).join(iface);
        let program_of = |direction: &str| {
            PinnedLink::from_pin(base.join(direction))
                .ok()
                .and_then(|link| FdLink::from(link).info().ok())
                .map(|info| info.program_id())
        };
        (program_of("egress"), program_of("ingress"))
    }

    /// Before our programs replace others on `key`: makes the ingress
    /// program look every reply up, unless `key` carries no programs or
    /// ours already. False when that failed (then nothing may be swapped).
    fn before_swap(&mut self, key: &(String, String), ours: Option<(u32, u32)>) -> bool {
        if !self.reply_filter_trusted {
            return true;
        }
        let others = match (self.mode, self.pinned_program_ids(key), ours) {
            // Netlink filters are not pinned: what runs there is unknown.
            (TcMode::Netlink, _, _) => true,
            (_, (None, None), _) => false,
            (_, (egress, ingress), Some((e, i))) => egress != Some(e) || ingress != Some(i),
            (_, _, None) => true,
        };
        if !others {
            return true;
        }
        match self.datapath.maps.distrust_reply_filter() {
            Ok(()) => {
                self.reply_filter_trusted = false;
                tracing::info!(
                    netns = key.0,
                    iface = key.1,
                    "replacing another build's programs: replies are looked up until the flows in conntrack are flagged again"
                );
                true
            }
            Err(e) => {
                tracing::warn!(
                    "distrusting REPLY_FILTER before replacing another build's programs: {e}"
                );
                false
            }
        }
    }

    /// Whether the ingress program trusts `REPLY_FILTER`.
    pub fn reply_filter_trusted(&self) -> bool {
        self.reply_filter_trusted
    }

    /// Flags the peers of the flows in conntrack and trusts the flags
    /// (call after a clean scan). Returns the flags set.
    pub fn trust_reply_filter(&mut self) -> anyhow::Result<usize> {
        let set = self.datapath.maps.complete_reply_filter()?;
        self.reply_filter_trusted = true;
        Ok(set)
    }

    /// Whether `(netns, iface)` still carries our TC pair (`ids`: egress,
    /// ingress program ids), by TCX query inside the namespace. A query
    /// that fails (the namespace is going) counts as intact: the next
    /// scan sees it gone.
    fn still_attached(
        &self,
        (netns, iface): &(String, String),
        (egress, ingress): (u32, u32),
    ) -> bool {
        use aya::programs::{SchedClassifier, TcAttachType};
        let path = self.dir.join(netns);
        let has = |attach_type, id| {
            SchedClassifier::query_tcx(iface, attach_type)
                .map(|(_, programs)| programs.iter().any(|p| p.id() == id))
        };
        match crate::netns::run_in(Some(&path), || {
            Ok::<bool, aya::programs::ProgramError>(
                has(TcAttachType::Egress, egress)? && has(TcAttachType::Ingress, ingress)?,
            )
        }) {
            Ok(Ok(intact)) => intact,
            _ => true,
        }
    }

    /// Interfaces pinned by someone else (the CNI plugin, `underpass
    /// attach`), outside what this agent selects: their links keep
    /// whatever programs they were given, which after an upgrade that
    /// replaced the maps would be an earlier agent's, on maps nothing
    /// updates any more. Each whose links run other programs than ours
    /// gets ours swapped in (the links stay, so does the pod's traffic).
    fn refresh_others(&mut self, (egress, ingress): (u32, u32), report: &mut ScanReport) {
        let Some(pin_dir) = self.datapath.pin_dir().map(Path::to_path_buf) else {
            return;
        };
        for key in pinned_tc_links(&pin_dir) {
            if self.attached.contains_key(&key) {
                continue;
            }
            let (netns_name, iface) = &key;
            let current = self.pinned_program_ids(&key);
            if current == (Some(egress), Some(ingress)) || current == (None, None) {
                continue;
            }
            let path = self.dir.join(netns_name);
            if !path.exists() || !self.before_swap(&key, Some((egress, ingress))) {
                continue;
            }
            match self
                .datapath
                .attach_tc(Some(&path.to_string_lossy()), iface, TcMode::Tcx)
            {
                Ok(attachment) => {
                    attachment.keep();
                    self.last_errors.remove(&key);
                    report.refreshed.push(key.clone());
                }
                Err(e) => self.note_error(report, netns_name.clone(), iface.clone(), e.to_string()),
            }
        }
    }

    /// Stops copying pods' routing tables into `POD_ROUTES` (a kernel
    /// whose TC programs cannot read netns cookies has no use for them).
    pub fn without_pod_routes(&mut self) {
        self.routes = None;
    }

    /// From the next scan on, new pod interfaces get the pair only if
    /// `policy` says so; attached ones keep it.
    pub fn set_policy(&mut self, policy: PodTcPolicy) {
        self.policy = policy;
    }

    pub fn attached(&self) -> BTreeSet<(String, String)> {
        self.attached.keys().cloned().collect()
    }

    /// True when no interface or namespace failed at its last attempt
    /// (every selected pod runs our programs).
    pub fn clean(&self) -> bool {
        self.last_errors.is_empty()
    }

    pub fn datapath_mut(&mut self) -> &mut Datapath {
        &mut self.datapath
    }

    /// One pass over the namespace directory.
    pub fn scan(&mut self) -> ScanReport {
        let mut report = ScanReport::default();
        // Every interface that exists, with its index; and those to attach.
        let mut existing: BTreeMap<(String, String), u32> = BTreeMap::new();
        let mut want = BTreeSet::new();
        let mut unknown_netns = BTreeSet::new();
        // Children of the uplink, noted once attached (`LOCAL_PODS`).
        let mut uplink_children: Vec<((String, String), LinkSummary)> = Vec::new();
        let entries = match fs::read_dir(&self.dir) {
            Ok(entries) => {
                self.last_errors.remove(&(String::new(), String::new()));
                entries
            }
            Err(e) => {
                let message = format!(
                    "reading the namespace directory {}: {e}",
                    self.dir.display()
                );
                self.note_error(&mut report, String::new(), String::new(), message);
                return report;
            }
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !self.selector.netns.matches(&name) {
                continue;
            }
            match list_links(&entry.path()) {
                Ok(links) => {
                    self.last_errors.remove(&(name.clone(), String::new()));
                    for link in links {
                        let key = (name.clone(), link.name.clone());
                        let attached = self.attached.contains_key(&key);
                        // A pod on the uplink always gets the pair: flows
                        // from outside reach it by its MAC, and its replies
                        // are turned back on its own interface.
                        let on_uplink = self.local_pods.as_ref().is_some_and(|p| p.is_child(&link));
                        if (link.up && attached)
                            || (self.selector.selects(&link)
                                && (self.policy.wants_tc(&name) || on_uplink))
                        {
                            if on_uplink {
                                uplink_children.push((key.clone(), link.clone()));
                            }
                            want.insert(key.clone());
                        } else if self.selector.selects(&link)
                            && self.socket_lb_only.insert(key.clone())
                        {
                            report.socket_lb_only.push(key.clone());
                        }
                        existing.insert(key, link.index);
                    }
                }
                // A namespace being created or deleted: next scan.
                Err(e) => {
                    self.note_error(
                        &mut report,
                        name.clone(),
                        String::new(),
                        format!("listing interfaces: {e}"),
                    );
                    unknown_netns.insert(name);
                }
            }
        }
        // Errors of interfaces and namespaces that are gone are over: an
        // error stands (and keeps `clean` false) only while its subject
        // exists.
        let dir = self.dir.clone();
        self.last_errors.retain(|(netns, iface), _| {
            if netns.is_empty() {
                true
            } else if iface.is_empty() {
                dir.join(netns).exists()
            } else {
                unknown_netns.contains(netns)
                    || existing.contains_key(&(netns.clone(), iface.clone()))
            }
        });
        let ours = self.datapath.tc_program_ids().ok();
        for key in &want {
            let index = existing[key];
            let mut repairing = false;
            if self.attached.get(key) == Some(&Some(index)) {
                if self.mode == TcMode::Netlink
                    || ours.is_none_or(|ids| self.still_attached(key, ids))
                {
                    continue;
                }
                repairing = true;
            }
            let (netns_name, iface) = key;
            let path = self.dir.join(netns_name);
            // Ours detached by someone: whatever runs there is not ours.
            let ours_here = if repairing { None } else { ours };
            if !self.before_swap(key, ours_here) {
                continue;
            }
            match self
                .datapath
                .attach_tc(Some(&path.to_string_lossy()), iface, self.mode)
            {
                Ok(attachment) => {
                    attachment.keep();
                    self.last_errors.remove(key);
                    if repairing {
                        report.repaired.push(key.clone());
                    }
                    if self.attached.insert(key.clone(), Some(index)).is_none() {
                        report.attached.push(key.clone());
                    }
                }
                Err(e) => self.note_error(
                    &mut report,
                    netns_name.clone(),
                    iface.clone(),
                    e.to_string(),
                ),
            }
        }
        self.follow_routes(&existing, &unknown_netns, &mut report);
        if let (Some(pods), Some(maps)) = (
            &mut self.local_pods,
            self.datapath.maps.north_south.as_mut(),
        ) {
            // Only pods whose TC pair is attached: their replies must be
            // turned back on their interface.
            let mut local = BTreeMap::new();
            for (key, link) in &uplink_children {
                if self.attached.contains_key(key) {
                    pods.note(link, &mut local);
                }
            }
            // A namespace that could not be read keeps its pods.
            let errors = pods.sync(maps, local, unknown_netns.is_empty());
            let key = (String::new(), "LOCAL_PODS".to_owned());
            match errors.into_iter().next() {
                None => {
                    self.last_errors.remove(&key);
                }
                Some(error) if self.last_errors.get(&key) != Some(&error) => {
                    self.last_errors.insert(key, error.clone());
                    report
                        .errors
                        .push((String::new(), "LOCAL_PODS".into(), error));
                }
                Some(_) => {}
            }
        }
        self.keep_uplink_neighbours(&mut report);
        if let Some(ids) = ours {
            self.refresh_others(ids, &mut report);
        }
        self.socket_lb_only
            .retain(|key| existing.contains_key(key) || unknown_netns.contains(&key.0));
        let gone: Vec<(String, String)> = self
            .attached
            .keys()
            .filter(|key| !existing.contains_key(*key) && !unknown_netns.contains(&key.0))
            .cloned()
            .collect();
        let Some(pin_dir) = self.datapath.pin_dir().map(Path::to_path_buf) else {
            return report;
        };
        for key in gone {
            let (netns_name, iface) = &key;
            match loader::detach_pinned_tc(&pin_dir, Some(netns_name), iface) {
                Ok(_) => {
                    self.attached.remove(&key);
                    report.detached.push(key.clone());
                }
                Err(e) => self.note_error(
                    &mut report,
                    netns_name.clone(),
                    iface.clone(),
                    e.to_string(),
                ),
            }
        }
        // Namespace label directories left empty.
        for (netns_name, _) in &report.detached {
            let _ = fs::remove_dir(pin_dir.join(loader::TC_LINKS).join(netns_name));
            if let Some(routes) = &mut self.routes {
                routes.forget(netns_name);
            }
        }
        report
    }
    /// Managed neighbour entries for the backends the Maglev tables name
    /// that are not pods on the uplink.
    fn keep_uplink_neighbours(&mut self, report: &mut ScanReport) {
        let (Some(neighbours), Some(pods), Some(maps)) = (
            &mut self.neighbours,
            &self.local_pods,
            self.datapath.maps.north_south.as_ref(),
        ) else {
            return;
        };
        let local: BTreeSet<std::net::Ipv4Addr> = pods.addresses().copied().collect();
        let wanted = maps.backends_in_use().map(|ids| {
            ids.into_iter()
                .filter_map(|id| self.datapath.maps.backends.get(id).ok().flatten())
                .filter(|b| b.is_present_v4())
                .map(|b| std::net::Ipv4Addr::from(b.address_be.to_ne_bytes()))
                .filter(|a| !local.contains(a))
                .collect::<BTreeSet<_>>()
        });
        let result = match wanted {
            Ok(wanted) => neighbours.sync(wanted).map_err(|e| e.to_string()),
            Err(e) => Err(format!("reading the Maglev tables: {e}")),
        };
        let key = (String::new(), "uplink neighbours".to_owned());
        match result {
            Ok(()) => {
                self.last_errors.remove(&key);
            }
            Err(error) if self.last_errors.get(&key) != Some(&error) => {
                self.last_errors.insert(key, error.clone());
                report
                    .errors
                    .push((String::new(), "uplink neighbours".into(), error));
            }
            Err(_) => {}
        }
    }

    fn note_error(&mut self, report: &mut ScanReport, netns: String, iface: String, error: String) {
        let key = (netns.clone(), iface.clone());
        if self.last_errors.get(&key) != Some(&error) {
            self.last_errors.insert(key, error.clone());
            report.errors.push((netns, iface, error));
        }
    }
}
