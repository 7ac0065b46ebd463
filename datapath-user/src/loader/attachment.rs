//! What an attach returns: the links it made, pinned or held, and how
//! to detach them or leave them attached.

use std::path::{Path, PathBuf};

use aya::programs::{links::FdLink, tc::SchedClassifierLink};

use super::bpffs::remove_pin;
use crate::{error::LoaderError, netns, tc_mode::TcMode};

/// One attached program.
#[derive(Debug)]
pub(super) enum AttachedLink {
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
    pub(super) netns: Option<PathBuf>,
    pub(super) iface: String,
    pub(super) links: Vec<AttachedLink>,
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

    pub(super) fn detach_all(&mut self) -> Result<(), LoaderError> {
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
    pub(super) cgroup: PathBuf,
    pub(super) links: Vec<AttachedLink>,
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
