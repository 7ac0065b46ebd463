//! The TC pair onto an interface inside a namespace: TCX links pinned
//! per interface (an earlier run's swapped atomically), or cls_bpf
//! filters at a fixed priority and handle; and their removal.

use std::{
    fs,
    path::{Path, PathBuf},
};

use aya::{
    programs::{
        LinkOrder, ProgramError, SchedClassifier, TcAttachType,
        links::{FdLink, LinkError},
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions},
    },
    util::KernelVersion,
};

use super::{
    attachment::{AttachedLink, TcAttachment},
    bpffs::{create_pin_dir, open_pinned, pin, remove_pin},
    load::Datapath,
    programs::{PinnedTcPrograms, TcPrograms},
};
use crate::{error::LoaderError, netns, object, probe, tc_mode::TcMode};

/// The TC pair: egress DNAT, ingress reverse NAT.
const TC_PAIR: &[(&str, TcAttachType)] = &[
    (object::TC_EGRESS, TcAttachType::Egress),
    (object::TC_INGRESS, TcAttachType::Ingress),
];
/// The ingress program alone, on other interfaces replies come back by.
const INGRESS_ONLY: &[(&str, TcAttachType)] = &[(object::TC_INGRESS, TcAttachType::Ingress)];

impl Datapath {
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
            TC_PAIR,
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
            INGRESS_ONLY,
        )
    }
}

impl PinnedTcPrograms {
    /// As `Datapath::attach_tc`, with the pinned programs.
    pub fn attach_tc(
        &mut self,
        netns: Option<&str>,
        iface: &str,
        mode: TcMode,
    ) -> Result<TcAttachment, LoaderError> {
        let pin_dir = self.pin_dir.clone();
        attach_tc_programs(self, Some(&pin_dir), netns, iface, mode, TC_LINKS, TC_PAIR)
    }
}

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

/// Attaches `prog` to one direction of `iface` (in the calling thread's
/// namespace). A new TCX link takes its place in the chain by `order`.
#[allow(clippy::too_many_arguments)]
pub(super) fn attach_one(
    prog: &mut SchedClassifier,
    program: &'static str,
    iface: &str,
    netns: &str,
    attach_type: TcAttachType,
    mode: TcMode,
    pin_path: Option<&Path>,
    order: LinkOrder,
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
                .attach_with_options(iface, attach_type, TcAttachOptions::TcxOrder(order))
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
                LinkOrder::default(),
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

/// Our cls_bpf filters' priority (tc's `pref`) and handle, the same on
/// every interface and direction, so that a later attach finds and
/// replaces them.
const NETLINK_PRIORITY: u16 = 0x5550;
const NETLINK_HANDLE: tc::TcHandle = tc::TcHandle::new(0, 0x5550);

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
