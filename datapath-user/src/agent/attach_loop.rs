//! The agent's attach loop, on a thread of its own (attaching enters
//! namespaces): after the first full sync it pins the TC programs for the
//! CNI plugin and attaches socket-LB, then scans pods (attach, repair,
//! detach) and syncs the socket-LB skip list every interval. Until
//! socket-LB is attached every pod gets the TC pair; from then on only
//! those the policy names (`crate::pod_tc`).
//!
//! Programs are attached (swapped into existing links) only after the
//! first full sync: a map this start replaced (`map_pins`) is empty until
//! then, and programs using it would drop service traffic that the
//! previous ones still translate. Ready means synced and attached.

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use tracing::{info, warn};

use crate::{
    Datapath, attach::PodAttacher, metrics::Metrics, pod_tc::PodTcPolicy, sock_lb_skip::SockLbSkip,
};

pub(super) struct AttachLoop {
    /// The pods' attacher, which holds the datapath; `None` with
    /// --no-pod-attach, when `bare` holds it.
    pub(super) pods: Option<PodAttacher>,
    pub(super) bare: Option<Datapath>,
    pub(super) skip: Option<SockLbSkip>,
    /// The socket-LB cgroup, if any.
    pub(super) cgroup: Option<PathBuf>,
    /// Which pods get the TC pair once socket-LB is attached.
    pub(super) pod_tc: PodTcPolicy,
    pub(super) interval: Duration,
    pub(super) metrics: Arc<Metrics>,
    /// Without pod attachment: whether the ingress program trusts
    /// `REPLY_FILTER` yet (`crate::maps::DatapathMaps::complete_reply_filter`;
    /// with pods, `PodAttacher` keeps it, as its swaps may undo it).
    pub(super) reply_filter_complete: bool,
    /// A reason it is not trusted yet was logged (said once).
    pub(super) reply_filter_waiting: bool,
}

impl AttachLoop {
    /// Runs until `stop`.
    pub(super) fn spawn(mut self, stop: Arc<AtomicBool>) -> JoinHandle<()> {
        std::thread::spawn(move || {
            while !self.metrics.synced.load(Ordering::Relaxed) {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            if let Err(e) = self.datapath().pin_tc_programs() {
                warn!("pinning the TC programs for the CNI plugin: {e}");
            }
            // Socket-LB is attached before the first scan, and tried again
            // every scan while it fails (pods are served meanwhile; the
            // agent is not ready until it is attached).
            // Every pod gets the pair until socket-LB is attached (the CNI
            // plugin reads the same).
            self.apply_pod_tc(PodTcPolicy::Every);
            let mut socket_lb_pending = self.cgroup.clone();
            let mut last_error = String::new();
            while !stop.load(Ordering::Relaxed) {
                if let Some(cgroup) = socket_lb_pending.clone()
                    && self.attach_socket_lb(&cgroup, &mut last_error)
                {
                    socket_lb_pending = None;
                    self.apply_pod_tc(self.pod_tc.clone());
                }
                self.scan_pods();
                self.complete_reply_filter();
                self.sync_skip_list();
                self.metrics
                    .ready
                    .store(socket_lb_pending.is_none(), Ordering::Relaxed);
                let deadline = Instant::now() + self.interval;
                while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(20).min(self.interval));
                }
            }
        })
    }

    fn datapath(&mut self) -> &mut Datapath {
        match (self.pods.as_mut(), self.bare.as_mut()) {
            (Some(pods), _) => pods.datapath_mut(),
            (None, Some(datapath)) => datapath,
            (None, None) => unreachable!("one of the two holds the datapath"),
        }
    }

    /// Makes `policy` the one new pods are attached by, here and (through
    /// the pin directory) in the CNI plugin.
    fn apply_pod_tc(&mut self, policy: PodTcPolicy) {
        if let Some(pin_dir) = self.datapath().pin_dir().map(std::path::Path::to_path_buf)
            && let Err(e) = policy.store(&pin_dir)
        {
            warn!("writing the pod TC policy for the CNI plugin: {e}");
        }
        if let PodTcPolicy::SocketLbSkipped { skip } = &policy {
            info!(
                skipped = skip.as_ref().map_or("none", glob::Pattern::as_str),
                "socket-LB covers the pods: new pods get the TC pair only if socket-LB skips them"
            );
        }
        if let Some(pods) = self.pods.as_mut() {
            pods.set_policy(policy);
        }
    }

    /// Attaches socket-LB to `cgroup`; true once attached. A failure is
    /// logged when it differs from the last one.
    fn attach_socket_lb(&mut self, cgroup: &std::path::Path, last_error: &mut String) -> bool {
        match self.datapath().attach_sock(cgroup) {
            Ok(_) => {
                info!(cgroup = %cgroup.display(), "socket-LB attached");
                true
            }
            Err(e) => {
                if e.to_string() != *last_error {
                    *last_error = e.to_string();
                    tracing::error!(
                        cgroup = %cgroup.display(),
                        "attaching socket-LB to the cgroup (--cgroup), retrying: {e}"
                    );
                }
                false
            }
        }
    }

    /// One scan of the pods' namespaces, its outcome logged and counted.
    fn scan_pods(&mut self) {
        let Some(attacher) = self.pods.as_mut() else {
            return;
        };
        let report = attacher.scan();
        for (netns, iface) in &report.attached {
            info!(netns, iface, "attached");
        }
        for (netns, iface) in &report.socket_lb_only {
            info!(netns, iface, "socket-LB translates this pod: no TC pair");
        }
        for (netns, iface) in &report.detached {
            info!(netns, iface, "detached (gone)");
        }
        for (netns, iface) in &report.repaired {
            warn!(
                netns,
                iface, "our programs were detached by someone else: attached again"
            );
            self.metrics.attachments_repaired.inc();
        }
        for (netns, iface) in &report.refreshed {
            info!(
                netns,
                iface, "attached by the CNI plugin with other programs: ours swapped in"
            );
        }
        for (netns, iface, error) in &report.errors {
            warn!(netns, iface, "attach: {error}");
        }
        self.metrics
            .attached_interfaces
            .set(attacher.attached().len() as i64);
    }

    /// Once this build's programs run on every pod (a scan without a
    /// failure; at once without pod attachment, where pods keep the
    /// programs they were attached with, a pair from one build), flags the
    /// peers of the flows conntrack holds and lets the ingress program
    /// skip conntrack for packets from anything else. Until then, and if
    /// this fails, every reply is looked up: slower, never wrong.
    fn complete_reply_filter(&mut self) {
        self.try_complete_reply_filter();
        let trusted = match self.pods.as_ref() {
            Some(pods) => pods.reply_filter_trusted(),
            None => self.reply_filter_complete,
        };
        self.metrics.reply_filter_trusted.set(i64::from(trusted));
    }

    fn try_complete_reply_filter(&mut self) {
        let started = Instant::now();
        let outcome = match self.pods.as_mut() {
            Some(pods) => {
                if pods.reply_filter_trusted() {
                    return;
                }
                if !pods.clean() {
                    if !self.reply_filter_waiting {
                        self.reply_filter_waiting = true;
                        info!(
                            "an attach failed: every reply is looked up in conntrack until a scan puts our programs on every pod"
                        );
                    }
                    return;
                }
                pods.trust_reply_filter()
            }
            None if self.reply_filter_complete => return,
            None => self.datapath().maps.complete_reply_filter(),
        };
        match outcome {
            Ok(flagged) => {
                self.reply_filter_complete = true;
                self.reply_filter_waiting = false;
                info!(
                    flagged,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "our programs run on every pod: replies are looked up only from flagged peers"
                );
            }
            Err(e) => {
                if !self.reply_filter_waiting {
                    self.reply_filter_waiting = true;
                    warn!(
                        "completing REPLY_FILTER (replies are all looked up meanwhile; tried again every scan): {e:#}"
                    );
                }
            }
        }
    }

    /// The pods socket-LB leaves to the TC path, made equal to the
    /// namespaces that match --socket-lb-skip-netns.
    fn sync_skip_list(&mut self) {
        let Some(skip) = self.skip.as_mut() else {
            return;
        };
        match skip.sync() {
            Ok(report) => {
                for netns in report.added {
                    info!(netns, "socket-LB skips this pod: TC path");
                }
                for netns in report.removed {
                    info!(netns, "socket-LB skip list: pod gone");
                }
                for (netns, error) in report.errors {
                    warn!(netns, "socket-LB skip list: {error}");
                }
            }
            Err(e) => warn!("socket-LB skip list: {e}"),
        }
    }
}
