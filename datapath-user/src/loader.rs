//! Loading the datapath once, pinning its maps, and attaching its programs
//! to pod interfaces (TC) and cgroups (socket-LB).
//!
//! Attachments made with a pin directory are pinned bpf_links: they stay
//! in place when the process exits (an agent restart keeps traffic
//! flowing) and are removed by deleting the pin. Without a pin directory
//! (tests) they live as long as the returned handle.

use std::{
    fs, io,
    path::{Path, PathBuf},
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{
        CgroupAttachMode, CgroupSockAddr, LinkOrder, ProgramError, SchedClassifier, TcAttachType,
        TestRun, TestRunOptions,
        links::{FdLink, LinkError, PinnedLink},
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions},
    },
    util::KernelVersion,
};
use datapath_common::{
    conntrack::{LIFETIMES_GLOBAL, Lifetimes},
    maps,
    sock_lb::{SOCK_LB_SCOPE_GLOBAL, SockLbScope},
};

use crate::{
    clock, features,
    map_pins::{self, PinPolicy},
    maps::DatapathMaps,
    netns, object, probe,
};
pub use crate::{
    error::{LoaderError, with_causes},
    tc_mode::TcMode,
};

/// Where the agent pins maps and links by default.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/underpass";

/// Capacities of the maps, set at load time.
#[derive(Clone, Debug)]
pub struct MapSizes {
    pub services: u32,
    pub backends: u32,
    pub reverse_nat: u32,
    /// TCP flows the TC path can track (the map holds two entries each).
    pub conntrack_tcp_flows: u32,
    /// UDP flows the TC path can track (two entries each).
    pub conntrack_udp_flows: u32,
    pub sock_reverse_nat: u32,
}

impl MapSizes {
    /// `max_entries` of each sized map, as the loader sets them.
    pub fn max_entries(&self) -> [(&'static str, u32); 6] {
        [
            (maps::SERVICES_MAP, self.services),
            (maps::BACKENDS_MAP, self.backends),
            (maps::REVERSE_NAT_MAP, self.reverse_nat),
            (
                maps::CONNTRACK_TCP_MAP,
                self.conntrack_tcp_flows
                    .saturating_mul(maps::CT_ENTRIES_PER_FLOW),
            ),
            (
                maps::CONNTRACK_UDP_MAP,
                self.conntrack_udp_flows
                    .saturating_mul(maps::CT_ENTRIES_PER_FLOW),
            ),
            (maps::SOCK_REVERSE_NAT_MAP, self.sock_reverse_nat),
        ]
    }
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            services: maps::DEFAULT_SERVICES_MAX,
            backends: maps::DEFAULT_BACKENDS_MAX,
            reverse_nat: maps::DEFAULT_REVERSE_NAT_MAX,
            conntrack_tcp_flows: maps::DEFAULT_CONNTRACK_TCP_FLOWS,
            conntrack_udp_flows: maps::DEFAULT_CONNTRACK_UDP_FLOWS,
            sock_reverse_nat: maps::DEFAULT_SOCK_REVERSE_NAT_MAX,
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Pin maps (create or reuse) and links under this bpffs directory.
    /// `None` keeps everything private to this process.
    pub pin_dir: Option<PathBuf>,
    pub sizes: MapSizes,
    /// Conntrack lifetimes (default: Cilium's).
    pub ct_timeouts: CtTimeouts,
    /// What to do with pinned maps this object defines differently
    /// (`map_pins`): the agent replaces them, everyone else adopts them
    /// or stops.
    pub pin_policy: PinPolicy,
    /// `datapath_common::features` bits to load with; `None`: what the
    /// probes found (`crate::probe`). Tests set fewer to show fallbacks.
    pub feature_bits: Option<u32>,
    /// Which sockets socket-LB translates (default: all).
    pub sock_lb_scope: SockLbScope,
}

/// How long idle flows are remembered, by state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtTimeouts {
    pub tcp_syn: Duration,
    pub tcp_established: Duration,
    pub tcp_closing: Duration,
    pub udp: Duration,
    /// How stale a busy flow's timestamp may get before a packet refreshes
    /// it (bounds the write rate to conntrack).
    pub refresh: Duration,
    /// How long next-hop MACs learned from replies are used without a
    /// newer reply confirming them.
    pub l2_fresh: Duration,
}

impl Default for CtTimeouts {
    fn default() -> Self {
        use datapath_common::conntrack as c;
        Self {
            tcp_syn: Duration::from_secs(c::TCP_SYN_LIFETIME_SECS),
            tcp_established: Duration::from_secs(c::TCP_ESTABLISHED_LIFETIME_SECS),
            tcp_closing: Duration::from_secs(c::TCP_CLOSING_LIFETIME_SECS),
            udp: Duration::from_secs(c::UDP_LIFETIME_SECS),
            refresh: Duration::from_secs(c::REFRESH_INTERVAL_SECS),
            l2_fresh: Duration::from_secs(c::L2_FRESH_SECS),
        }
    }
}

impl CtTimeouts {
    /// In kernel ticks at `hz`, as the datapath uses them.
    pub fn in_ticks(&self, hz: u64) -> Lifetimes {
        Lifetimes {
            tcp_syn: clock::ticks(self.tcp_syn, hz),
            tcp_established: clock::ticks(self.tcp_established, hz),
            tcp_closing: clock::ticks(self.tcp_closing, hz),
            udp: clock::ticks(self.udp, hz),
            refresh: clock::ticks(self.refresh, hz),
            l2_fresh: clock::ticks(self.l2_fresh, hz),
        }
    }
}

/// The loaded datapath: its programs (loaded, not yet attached) and maps.
pub struct Datapath {
    ebpf: Ebpf,
    pin_dir: Option<PathBuf>,
    pub maps: DatapathMaps,
}

impl Datapath {
    /// Loads the embedded object. With a pin directory, existing pinned
    /// maps are reused (their contents survive) and missing ones are
    /// created and pinned.
    pub fn load(options: &LoadOptions) -> Result<Self, LoaderError> {
        crate::raise_memlock_limit();
        let bytes = object::bytes().ok_or(LoaderError::ObjectMissing)?;
        let pin_dir = options.pin_dir.clone();
        let map_pins: Vec<(&str, PathBuf)> = match &pin_dir {
            Some(dir) => {
                ensure_bpffs(dir)?;
                maps::ALL_MAPS
                    .iter()
                    .map(|name| (*name, dir.join(name)))
                    .collect()
            }
            None => Vec::new(),
        };
        let max_entries = options.sizes.max_entries();
        let expected = map_pins::expected_layouts(bytes, &max_entries)?;
        let replaced = match &pin_dir {
            Some(dir) => map_pins::reconcile_pins(dir, &map_pins, &expected, options.pin_policy)?,
            None => Vec::new(),
        };
        for replaced in replaced {
            tracing::warn!(
                map = %replaced.map,
                "pinned map replaced ({}); its contents are made afresh",
                replaced.reason
            );
        }
        let mut loader = EbpfLoader::new();
        for (name, max) in max_entries {
            loader.map_max_entries(name, max);
        }
        let hz = clock::hz().map_err(|e| LoaderError::KernelFeature {
            kernel: KernelVersion::current()
                .map(|v| v.to_string())
                .unwrap_or_else(|_| "?".into()),
            feature: "the jiffies clock (bpf_jiffies64 run with BPF_PROG_TEST_RUN)",
            hint: e.to_string(),
        })?;
        let lifetimes = options.ct_timeouts.in_ticks(hz);
        loader.override_global(LIFETIMES_GLOBAL, &lifetimes, true);
        let feature_bits = match options.feature_bits {
            Some(bits) => bits,
            None => {
                let wants = features::Wants {
                    tc_mode: TcMode::Auto,
                    socket_lb: false,
                };
                features::plan(probe::kernel(), wants)
                    .map_err(|missing| LoaderError::KernelFeature {
                        kernel: missing.kernel.clone(),
                        feature: missing.feature.name,
                        hint: missing.to_string(),
                    })?
                    .feature_bits
            }
        };
        loader.override_global(
            datapath_common::features::FEATURES_GLOBAL,
            &feature_bits,
            true,
        );
        loader.override_global(SOCK_LB_SCOPE_GLOBAL, &options.sock_lb_scope, true);
        for (name, path) in &map_pins {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(bytes)?;
        if let Some(dir) = &pin_dir {
            // The pins now hold this version's layouts (made, replaced or
            // adopted as matching).
            map_pins::mark_abi(dir)?;
        }
        for name in [object::TC_EGRESS, object::TC_INGRESS] {
            sched_classifier(&mut ebpf, name)?
                .load()
                .map_err(|source| LoaderError::program(name, source))?;
        }
        for name in object::SOCK_PROGRAMS {
            sock_program(&mut ebpf, name)?
                .load()
                .map_err(|source| LoaderError::program(name, source))?;
        }
        if let Some(dir) = &pin_dir {
            // The TC pair, for the CNI plugin to attach without loading
            // and verifying the object on every pod start: pinned here
            // where none are; the agent replaces an earlier agent's once
            // its maps are filled (`pin_tc_programs`).
            pin_programs(&mut ebpf, dir, false)?;
        }
        let maps = DatapathMaps::take_from(&mut ebpf)?;
        Ok(Self {
            ebpf,
            pin_dir,
            maps,
        })
    }

    /// The kernel's ids of our TC programs (egress, ingress): what an
    /// interface carrying our pair has attached.
    pub fn tc_program_ids(&mut self) -> Result<(u32, u32), LoaderError> {
        let mut id = |name: &'static str| {
            sched_classifier(&mut self.ebpf, name)?
                .info()
                .map(|info| info.id())
                .map_err(|source| LoaderError::program(name, source))
        };
        Ok((id(object::TC_EGRESS)?, id(object::TC_INGRESS)?))
    }

    /// Pins this datapath's TC pair for the CNI plugin, replacing an
    /// earlier one (each pin atomically). The agent calls it after its
    /// first full sync, so that pods started meanwhile get programs whose
    /// maps are filled: the earlier agent's, until then.
    pub fn pin_tc_programs(&mut self) -> Result<(), LoaderError> {
        match self.pin_dir.clone() {
            Some(dir) => pin_programs(&mut self.ebpf, &dir, true),
            None => Ok(()),
        }
    }

    pub fn pin_dir(&self) -> Option<&Path> {
        self.pin_dir.as_deref()
    }

    /// The loaded program `name`, for BPF_PROG_TEST_RUN.
    pub fn classifier(&mut self, name: &'static str) -> Result<&mut SchedClassifier, LoaderError> {
        sched_classifier(&mut self.ebpf, name)
    }

    /// Runs TC program `name` on `frame` with BPF_PROG_TEST_RUN, `repeat`
    /// times (the kernel reports the mean duration per run).
    pub fn test_run_tc(
        &mut self,
        name: &'static str,
        frame: &[u8],
        repeat: u32,
    ) -> Result<TestRunOutcome, LoaderError> {
        self.test_run_tc_with_cb(name, frame, repeat, [0; SKB_CB_WORDS])
    }

    /// As `test_run_tc`, with the skb's control block (`__sk_buff.cb`, the
    /// TC programs' scratch area) set to `cb`; the outcome has it as the
    /// program left it.
    pub fn test_run_tc_with_cb(
        &mut self,
        name: &'static str,
        frame: &[u8],
        repeat: u32,
        cb: [u32; SKB_CB_WORDS],
    ) -> Result<TestRunOutcome, LoaderError> {
        let program = sched_classifier(&mut self.ebpf, name)?;
        let mut out = vec![0u8; frame.len() + 256];
        let mut ctx_in = [0u8; SKB_CB_END];
        for (word, value) in ctx_in[SKB_CB_OFFSET..].chunks_exact_mut(4).zip(cb) {
            word.copy_from_slice(&value.to_ne_bytes());
        }
        // The whole context comes back (the kernel refuses a shorter
        // buffer): 192 bytes on 6.18, room for growth.
        let mut ctx_out = [0u8; 256];
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx_in),
                ctx_out: Some(&mut ctx_out),
                repeat,
                ..TestRunOptions::default()
            })
            .map_err(|source| LoaderError::program(name, source))?;
        out.truncate(result.data_size_out as usize);
        let mut cb = [0; SKB_CB_WORDS];
        for (value, word) in cb.iter_mut().zip(ctx_out[SKB_CB_OFFSET..].chunks_exact(4)) {
            *value = u32::from_ne_bytes(word.try_into().expect("four bytes"));
        }
        Ok(TestRunOutcome {
            verdict: result.return_value as i32,
            frame: out,
            duration: result.duration,
            cb,
        })
    }

    /// Attaches the TC pair (egress DNAT, ingress reverse NAT) to `iface`
    /// inside `netns` (a name under /var/run/netns or a path; `None` = this
    /// process's namespace).
    pub fn attach_tc(
        &mut self,
        netns: Option<&str>,
        iface: &str,
        mode: TcMode,
    ) -> Result<TcAttachment, LoaderError> {
        attach_tc_programs(
            &mut self.ebpf,
            self.pin_dir.as_deref(),
            netns,
            iface,
            mode,
            TC_LINKS,
            &[
                (object::TC_EGRESS, TcAttachType::Egress),
                (object::TC_INGRESS, TcAttachType::Ingress),
            ],
        )
    }

    /// Attaches only the ingress program to `iface`: another interface of
    /// an attached pod, by which some backends' replies come back (the
    /// pod's veth to its node, say). Pinned under `links/reply`.
    pub fn attach_tc_reply(
        &mut self,
        netns: Option<&str>,
        iface: &str,
        mode: TcMode,
    ) -> Result<TcAttachment, LoaderError> {
        attach_tc_programs(
            &mut self.ebpf,
            self.pin_dir.as_deref(),
            netns,
            iface,
            mode,
            REPLY_LINKS,
            &[(object::TC_INGRESS, TcAttachType::Ingress)],
        )
    }

    /// Attaches the socket-LB programs to the cgroup v2 directory `cgroup`
    /// (every process below it is translated at connect/sendmsg time).
    pub fn attach_sock(&mut self, cgroup: &Path) -> Result<SockAttachment, LoaderError> {
        let cgroup_err = |reason: String| LoaderError::Cgroup {
            path: cgroup.to_owned(),
            reason,
        };
        let dir = fs::File::open(cgroup).map_err(|e| cgroup_err(e.to_string()))?;
        if !cgroup.join("cgroup.procs").exists() {
            return Err(cgroup_err(
                "not a cgroup v2 directory (no cgroup.procs)".into(),
            ));
        }
        let pin_base = self
            .pin_dir
            .as_ref()
            .map(|dir| dir.join("links/cgroup").join(cgroup_label(cgroup)));
        if let Some(base) = &pin_base {
            create_pin_dir(base)?;
        }
        let mut links = Vec::new();
        for program in object::SOCK_PROGRAMS {
            let prog = sock_program(&mut self.ebpf, program)?;
            // bpf_link attachments to a cgroup take no flags (the kernel
            // rejects them) and always coexist with other programs.
            let id = prog
                .attach(&dir, CgroupAttachMode::Single)
                .map_err(|source| LoaderError::program(program, source))?;
            let link: FdLink = prog
                .take_link(id)
                .map_err(|source| LoaderError::program(program, source))?
                .try_into()
                .map_err(|e: LinkError| {
                    cgroup_err(format!("{program}: kernel gave no bpf_link ({e})"))
                })?;
            links.push(match &pin_base {
                Some(base) => {
                    let path = base.join(program);
                    // A previous agent's link: replaced by ours.
                    remove_pin(&path)?;
                    pin(link, &path)?;
                    AttachedLink::Pinned(path)
                }
                None => AttachedLink::Fd(link),
            });
        }
        Ok(SockAttachment {
            cgroup: cgroup.to_owned(),
            links,
        })
    }
}

/// What one BPF_PROG_TEST_RUN call returned.
#[derive(Debug)]
pub struct TestRunOutcome {
    /// The program's return value (a `TC_ACT_*` verdict).
    pub verdict: i32,
    /// The frame as the program left it.
    pub frame: Vec<u8>,
    /// Mean time per run, as the kernel measured it.
    pub duration: std::time::Duration,
    /// The skb's control block (`__sk_buff.cb`) after the run.
    pub cb: [u32; SKB_CB_WORDS],
}

/// Words in `__sk_buff.cb`.
pub const SKB_CB_WORDS: usize = 5;
/// Where `cb` sits in `struct __sk_buff` (after twelve u32 fields, from
/// `len` to `tc_index`); the test-run context passed in ends with it.
const SKB_CB_OFFSET: usize = 48;
const SKB_CB_END: usize = SKB_CB_OFFSET + 4 * SKB_CB_WORDS;

/// Removes the pinned TC links of `iface` in `netns` (what an earlier
/// `attach_tc` with the same pin directory left), detaching them.
pub fn detach_pinned_tc(
    pin_dir: &Path,
    netns: Option<&str>,
    iface: &str,
) -> Result<usize, LoaderError> {
    detach_pinned(pin_dir, TC_LINKS, netns, iface)
}

/// `detach_pinned_tc` for a reply-only attachment (`attach_tc_reply`).
pub fn detach_pinned_reply(
    pin_dir: &Path,
    netns: Option<&str>,
    iface: &str,
) -> Result<usize, LoaderError> {
    detach_pinned(pin_dir, REPLY_LINKS, netns, iface)
}

fn detach_pinned(
    pin_dir: &Path,
    links_dir: &str,
    netns: Option<&str>,
    iface: &str,
) -> Result<usize, LoaderError> {
    let base = pin_dir.join(links_dir).join(netns_label(netns)).join(iface);
    let mut removed = 0;
    for attach_type in [TcAttachType::Egress, TcAttachType::Ingress] {
        let path = base.join(attach_type_name(attach_type));
        if path.exists() {
            remove_pin(&path)?;
            removed += 1;
        }
    }
    let _ = fs::remove_dir(&base);
    let _ = fs::remove_dir(base.parent().unwrap_or(&base));
    Ok(removed)
}

/// Under the pin directory: the TC pair of each attached interface, and
/// the ingress program alone on other interfaces replies come back by.
pub const TC_LINKS: &str = "links/tc";
pub const REPLY_LINKS: &str = "links/reply";

/// One attached program.
#[derive(Debug)]
enum AttachedLink {
    /// A pinned bpf_link (TCX or cgroup): lives until the pin is removed.
    Pinned(PathBuf),
    /// An unpinned bpf_link: detached when dropped.
    Fd(FdLink),
    /// A cls_bpf filter: detached explicitly (dropping it would leave it).
    Netlink(Option<SchedClassifierLink>),
}

/// The TC pair on one interface.
#[derive(Debug)]
pub struct TcAttachment {
    netns: Option<PathBuf>,
    iface: String,
    links: Vec<AttachedLink>,
}

impl TcAttachment {
    pub fn iface(&self) -> &str {
        &self.iface
    }

    /// True when the attachment outlives this process (pinned links).
    pub fn is_pinned(&self) -> bool {
        self.links
            .iter()
            .all(|l| matches!(l, AttachedLink::Pinned(_)))
    }

    /// Detaches both programs, whatever the mode.
    pub fn detach(mut self) -> Result<(), LoaderError> {
        self.detach_all()
    }

    fn detach_all(&mut self) -> Result<(), LoaderError> {
        let netns = self.netns.clone();
        for link in self.links.drain(..) {
            match link {
                AttachedLink::Pinned(path) => remove_pin(&path)?,
                AttachedLink::Fd(link) => drop(link),
                AttachedLink::Netlink(Some(link)) => {
                    let label = netns
                        .as_deref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_else(|| "host".into());
                    netns::run_in(netns.as_deref(), || {
                        aya::programs::links::Link::detach(link)
                    })
                    .map_err(|source| LoaderError::Netns {
                        netns: label.clone(),
                        error: source,
                    })?
                    .map_err(|source| LoaderError::Attach {
                        program: "tc",
                        iface: self.iface.clone(),
                        netns: label,
                        mode: TcMode::Netlink,
                        error: Box::new(source),
                    })?;
                }
                AttachedLink::Netlink(None) => {}
            }
        }
        Ok(())
    }

    /// Leaves the programs attached after this handle goes: pinned links
    /// stay with their pins (restart safety); netlink filters and unpinned
    /// links are forgotten, i.e. left attached.
    pub fn keep(mut self) {
        for link in self.links.drain(..) {
            match link {
                AttachedLink::Pinned(_) | AttachedLink::Netlink(None) => {}
                AttachedLink::Fd(link) => std::mem::forget(link),
                AttachedLink::Netlink(Some(link)) => std::mem::forget(link),
            }
        }
    }
}

impl Drop for TcAttachment {
    fn drop(&mut self) {
        // Pinned links stay (that is what pinning is for); netlink filters
        // would stay attached by accident, so they are removed here.
        self.links.retain(|l| !matches!(l, AttachedLink::Pinned(_)));
        if let Err(e) = self.detach_all() {
            tracing::warn!("detaching TC from {}: {e}", self.iface);
        }
    }
}

/// The socket-LB programs on one cgroup.
#[derive(Debug)]
pub struct SockAttachment {
    cgroup: PathBuf,
    links: Vec<AttachedLink>,
}

impl SockAttachment {
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    pub fn detach(mut self) -> Result<(), LoaderError> {
        for link in self.links.drain(..) {
            match link {
                AttachedLink::Pinned(path) => remove_pin(&path)?,
                AttachedLink::Fd(link) => drop(link),
                AttachedLink::Netlink(_) => {}
            }
        }
        Ok(())
    }
}

fn attach_one(
    prog: &mut SchedClassifier,
    program: &'static str,
    iface: &str,
    netns: &str,
    attach_type: TcAttachType,
    mode: TcMode,
    pin_path: Option<&Path>,
) -> Result<AttachedLink, LoaderError> {
    let attach_err = |source| LoaderError::Attach {
        program,
        iface: iface.to_owned(),
        netns: netns.to_owned(),
        mode,
        error: Box::new(source),
    };
    // SAFETY: if_nametoindex on a NUL-terminated copy of the name.
    let ifindex = std::ffi::CString::new(iface)
        .map(|name| unsafe { libc::if_nametoindex(name.as_ptr()) })
        .unwrap_or(0);
    if ifindex == 0 {
        return Err(LoaderError::NoInterface {
            netns: netns.to_owned(),
            iface: iface.to_owned(),
        });
    }
    match mode {
        TcMode::Netlink => {
            // EEXIST: the qdisc is already there (ours or someone else's).
            if let Err(e) = tc::qdisc_add_clsact(iface)
                && !matches!(&e, tc::TcError::NetlinkError(ne) if ne.raw_os_error() == Some(libc::EEXIST))
            {
                return Err(attach_err(ProgramError::from(e)));
            }
            // Filters are not pinned. Ours sit at one fixed priority and
            // handle per direction: the first attach creates the filter, a
            // restarted agent's replaces the program in it atomically (no
            // moment without translation, which would reset connections
            // whose replies came then), so every interface keeps one.
            let options = NlOptions {
                priority: NETLINK_PRIORITY,
                handle: NETLINK_HANDLE,
                classid: None,
            };
            let id = match prog.attach_with_options(
                iface,
                attach_type,
                TcAttachOptions::Netlink(options),
            ) {
                Ok(id) => id,
                Err(ProgramError::TcError(tc::TcError::NetlinkError(e)))
                    if e.raw_os_error() == Some(libc::EEXIST) =>
                {
                    let existing = tc::SchedClassifierLink::attached(
                        iface,
                        attach_type,
                        NETLINK_PRIORITY,
                        NETLINK_HANDLE,
                        None,
                    )
                    .map_err(|e| attach_err(ProgramError::from(tc::TcError::IoError(e))))?;
                    prog.attach_to_link(existing).map_err(attach_err)?
                }
                Err(e) => return Err(attach_err(e)),
            };
            let link = prog.take_link(id).map_err(attach_err)?;
            Ok(AttachedLink::Netlink(Some(link)))
        }
        TcMode::Tcx | TcMode::Auto => {
            if let Some(path) = pin_path
                && let Some(existing) = open_pinned(path)?
            {
                // A link pinned by an earlier run: swap our program into it
                // atomically (no moment without translation).
                let link =
                    SchedClassifierLink::try_from(existing).map_err(|e| LoaderError::Pin {
                        path: path.to_owned(),
                        reason: format!("not a TCX link: {e}"),
                    })?;
                match prog.attach_to_link(link) {
                    Ok(id) => {
                        // The pin keeps the link; our handle can go.
                        drop(prog.take_link(id).map_err(attach_err)?);
                        return Ok(AttachedLink::Pinned(path.to_owned()));
                    }
                    // The pinned link's interface is gone (deleted and
                    // re-created under the same name): that link is
                    // defunct; replace it with a fresh one below.
                    Err(e) => {
                        tracing::info!("replacing the defunct pinned link {}: {e}", path.display());
                        remove_pin(path)?;
                    }
                }
            }
            let id = prog
                .attach_with_options(
                    iface,
                    attach_type,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )
                .map_err(attach_err)?;
            let link: FdLink =
                prog.take_link(id)
                    .map_err(attach_err)?
                    .try_into()
                    .map_err(|e: LinkError| LoaderError::Pin {
                        path: PathBuf::from(iface),
                        reason: format!("TCX attach returned no bpf_link: {e}"),
                    })?;
            match pin_path {
                Some(path) => {
                    pin(link, path)?;
                    Ok(AttachedLink::Pinned(path.to_owned()))
                }
                None => Ok(AttachedLink::Fd(link)),
            }
        }
    }
}

fn resolve_mode(mode: TcMode) -> Result<TcMode, LoaderError> {
    let tcx = probe::has_tcx();
    match mode {
        TcMode::Auto if tcx => Ok(TcMode::Tcx),
        TcMode::Auto => Ok(TcMode::Netlink),
        TcMode::Tcx if !tcx => Err(LoaderError::KernelFeature {
            kernel: KernelVersion::current()
                .map(|v| v.to_string())
                .unwrap_or_else(|_| "?".into()),
            feature: "TCX (BPF_LINK_TYPE_TCX, Linux 6.6)",
            hint: "use --tc-mode netlink (clsact) instead".into(),
        }),
        other => Ok(other),
    }
}

fn attach_tc_programs(
    programs_from: &mut dyn TcPrograms,
    pin_dir: Option<&Path>,
    netns: Option<&str>,
    iface: &str,
    mode: TcMode,
    links_dir: &str,
    programs: &[(&'static str, TcAttachType)],
) -> Result<TcAttachment, LoaderError> {
    let netns_path = netns.map(netns::path_of);
    let label = netns_label(netns);
    let mode = resolve_mode(mode)?;
    let pin_base = match (pin_dir, mode) {
        (Some(dir), TcMode::Tcx) => Some(dir.join(links_dir).join(&label).join(iface)),
        _ => None,
    };
    // A first attachment that fails half-way is undone entirely: no pin
    // or directory that `status` would report as attached is left. (A
    // failed re-attachment leaves the earlier, working one alone.)
    // (Netlink filters are never pinned: a failed attach is always
    // undone.)
    let first = pin_base.as_ref().is_none_or(|base| !base.exists());
    if let Some(base) = &pin_base {
        create_pin_dir(base)?;
    }
    let mut attachment = TcAttachment {
        netns: netns_path.clone(),
        iface: iface.to_owned(),
        links: Vec::new(),
    };
    let attached = attach_each(
        programs_from,
        &mut attachment,
        programs,
        &label,
        mode,
        pin_base.as_deref(),
    );
    if let Err(error) = attached {
        if first {
            if let Err(e) = attachment.detach_all() {
                tracing::warn!("undoing a failed attachment to {iface}: {e}");
            }
            if let Some(base) = &pin_base {
                let _ = fs::remove_dir(base);
                // The namespace's directory, when this was its only
                // interface.
                if let Some(parent) = base.parent() {
                    let _ = fs::remove_dir(parent);
                }
            }
        } else {
            attachment.keep();
        }
        return Err(error);
    }
    Ok(attachment)
}

/// Attaches `programs` one by one into `attachment` (`attach_tc_programs`).
fn attach_each(
    programs_from: &mut dyn TcPrograms,
    attachment: &mut TcAttachment,
    programs: &[(&'static str, TcAttachType)],
    label: &str,
    mode: TcMode,
    pin_base: Option<&Path>,
) -> Result<(), LoaderError> {
    let iface = attachment.iface.clone();
    let netns_path = attachment.netns.clone();
    for &(program, attach_type) in programs {
        let prog = programs_from.classifier(program)?;
        let pin = pin_base
            .as_ref()
            .map(|base| base.join(attach_type_name(attach_type)));
        let link = netns::run_in(netns_path.as_deref(), || {
            attach_one(
                prog,
                program,
                &iface,
                label,
                attach_type,
                mode,
                pin.as_deref(),
            )
        })
        .map_err(|source| LoaderError::Netns {
            netns: label.to_owned(),
            error: source,
        })??;
        attachment.links.push(link);
    }
    Ok(())
}

/// Pins the TC pair under `dir/programs`; an existing pin is kept, or,
/// with `replace`, swapped for ours atomically (pinned beside it, then
/// renamed over it: a CNI ADD meanwhile finds one or the other).
fn pin_programs(ebpf: &mut Ebpf, dir: &Path, replace: bool) -> Result<(), LoaderError> {
    let programs = dir.join(PROGRAM_PINS);
    create_pin_dir(&programs)?;
    for name in [object::TC_EGRESS, object::TC_INGRESS] {
        let path = programs.join(name);
        if path.exists() && !replace {
            continue;
        }
        // (bpffs refuses names with a dot.)
        let staging = programs.join(format!("{name}_new"));
        let pin_err = |path: &Path, reason: String| LoaderError::Pin {
            path: path.to_owned(),
            reason,
        };
        let _ = fs::remove_file(&staging);
        sched_classifier(ebpf, name)?
            .pin(&staging)
            .map_err(|e| pin_err(&staging, e.to_string()))?;
        fs::rename(&staging, &path).map_err(|e| pin_err(&path, e.to_string()))?;
    }
    Ok(())
}

/// Our cls_bpf filters' priority (tc's `pref`) and handle, the same on
/// every interface and direction, so that a later attach finds and
/// replaces them.
const NETLINK_PRIORITY: u16 = 0x5550;
const NETLINK_HANDLE: tc::TcHandle = tc::TcHandle::new(0, 0x5550);

/// Where the TC programs are pinned, under the pin directory.
pub const PROGRAM_PINS: &str = "programs";

/// Where TC programs to attach come from: the loaded object, or the
/// programs an agent pinned (`PinnedTcPrograms`).
trait TcPrograms {
    fn classifier(&mut self, name: &'static str) -> Result<&mut SchedClassifier, LoaderError>;
}

impl TcPrograms for Ebpf {
    fn classifier(&mut self, name: &'static str) -> Result<&mut SchedClassifier, LoaderError> {
        sched_classifier(self, name)
    }
}

/// The TC pair as an agent pinned it, attached without loading the object
/// (what the CNI plugin does on every pod start: no verification, no
/// clock calibration).
pub struct PinnedTcPrograms {
    pin_dir: PathBuf,
    egress: SchedClassifier,
    ingress: SchedClassifier,
}

impl TcPrograms for PinnedTcPrograms {
    fn classifier(&mut self, name: &'static str) -> Result<&mut SchedClassifier, LoaderError> {
        match name {
            object::TC_EGRESS => Ok(&mut self.egress),
            object::TC_INGRESS => Ok(&mut self.ingress),
            _ => Err(LoaderError::program(
                name,
                ProgramError::UnexpectedProgramType,
            )),
        }
    }
}

impl PinnedTcPrograms {
    /// The pinned pair under `pin_dir`; `None` when nothing is pinned (no
    /// agent or plugin has loaded the datapath on this node yet).
    pub fn open(pin_dir: &Path) -> Result<Option<Self>, LoaderError> {
        let programs = pin_dir.join(PROGRAM_PINS);
        let open = |name: &str| {
            let path = programs.join(name);
            SchedClassifier::from_pin(&path).map_err(|e| LoaderError::Pin {
                path,
                reason: format!("opening the pinned program: {e}"),
            })
        };
        if !programs.join(object::TC_EGRESS).exists() || !programs.join(object::TC_INGRESS).exists()
        {
            return Ok(None);
        }
        Ok(Some(Self {
            pin_dir: pin_dir.to_owned(),
            egress: open(object::TC_EGRESS)?,
            ingress: open(object::TC_INGRESS)?,
        }))
    }

    /// As `Datapath::attach_tc`, with the pinned programs.
    pub fn attach_tc(
        &mut self,
        netns: Option<&str>,
        iface: &str,
        mode: TcMode,
    ) -> Result<TcAttachment, LoaderError> {
        let pin_dir = self.pin_dir.clone();
        attach_tc_programs(
            self,
            Some(&pin_dir),
            netns,
            iface,
            mode,
            TC_LINKS,
            &[
                (object::TC_EGRESS, TcAttachType::Egress),
                (object::TC_INGRESS, TcAttachType::Ingress),
            ],
        )
    }
}

/// The program `name` of the object, as its concrete type.
fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, LoaderError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let program = ebpf.program_mut(name).ok_or(LoaderError::program(
        name,
        ProgramError::UnexpectedProgramType,
    ))?;
    program
        .try_into()
        .map_err(|source| LoaderError::program(name, source))
}

fn sched_classifier<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, LoaderError> {
    program(ebpf, name)
}

fn sock_program<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut CgroupSockAddr, LoaderError> {
    program(ebpf, name)
}

fn attach_type_name(attach_type: TcAttachType) -> &'static str {
    match attach_type {
        TcAttachType::Egress => "egress",
        _ => "ingress",
    }
}

/// A directory name for a namespace: its name under /var/run/netns, or
/// "host" for our own.
pub(crate) fn netns_label(netns: Option<&str>) -> String {
    match netns {
        None => "host".into(),
        // Runtimes that pass /proc/<pid>/ns/net: the file name ("net")
        // would be the same for every pod.
        Some(path) if path.starts_with("/proc/") && path.ends_with("/ns/net") => {
            format!(
                "proc-{}",
                path.trim_start_matches("/proc/")
                    .trim_end_matches("/ns/net")
                    .replace('/', "-")
            )
        }
        Some(name) => Path::new(name)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| name.replace('/', "_")),
    }
}

/// A directory name for a cgroup: its path below the cgroup2 root, with
/// '/' spelled ':' ("root" for the root itself).
fn cgroup_label(cgroup: &Path) -> String {
    let relative = crate::cgroup::unified_root()
        .ok()
        .and_then(|root| cgroup.strip_prefix(root).ok().map(Path::to_path_buf));
    match relative {
        Some(rel) if rel.as_os_str().is_empty() => "root".into(),
        Some(rel) => rel.to_string_lossy().replace('/', ":"),
        None => cgroup
            .to_string_lossy()
            .trim_start_matches('/')
            .replace('/', ":"),
    }
}

fn create_pin_dir(dir: &Path) -> Result<(), LoaderError> {
    fs::create_dir_all(dir).map_err(|e| LoaderError::Pin {
        path: dir.to_owned(),
        reason: e.to_string(),
    })
}

fn pin(link: FdLink, path: &Path) -> Result<(), LoaderError> {
    link.pin(path).map(drop).map_err(|e| LoaderError::Pin {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

fn open_pinned(path: &Path) -> Result<Option<FdLink>, LoaderError> {
    if !path.exists() {
        return Ok(None);
    }
    let pinned = PinnedLink::from_pin(path).map_err(|e| LoaderError::Pin {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    Ok(Some(FdLink::from(pinned)))
}

/// Detaches the link pinned at `path` at once and removes the pin.
fn remove_pin(path: &Path) -> Result<(), LoaderError> {
    match crate::bpfsys::detach_and_unpin(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(LoaderError::Pin {
            path: path.to_owned(),
            reason: format!("detach: {e}"),
        }),
    }
}

/// Makes sure `dir` lies on a bpffs, mounting one at /sys/fs/bpf when
/// nothing is mounted there yet, and creates `dir`.
pub fn ensure_bpffs(dir: &Path) -> Result<(), LoaderError> {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let bpffs_err = |source| LoaderError::Bpffs {
        path: dir.to_owned(),
        error: source,
    };
    let root = Path::new("/sys/fs/bpf");
    if dir.starts_with(root) && !is_fs(root, BPF_FS_MAGIC) {
        let (src, target, fstype) = (c"bpf", c"/sys/fs/bpf", c"bpf");
        // SAFETY: mount(2) with NUL-terminated strings and no data.
        if unsafe {
            libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                0,
                std::ptr::null(),
            )
        } != 0
        {
            return Err(bpffs_err(io::Error::last_os_error()));
        }
    }
    fs::create_dir_all(dir).map_err(bpffs_err)?;
    if !is_fs(dir, BPF_FS_MAGIC) {
        return Err(bpffs_err(io::Error::other("not on a bpf filesystem")));
    }
    Ok(())
}

fn is_fs(path: &Path, magic: i64) -> bool {
    let Ok(cpath) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs into a zeroed struct with a NUL-terminated path.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(cpath.as_ptr(), &mut st) == 0 && st.f_type as i64 == magic
    }
}
