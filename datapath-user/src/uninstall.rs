//! `underpass uninstall`: removes the datapath from a node, as
//! kube-proxy's `--cleanup` does for its rules. Run it after the DaemonSet
//! is gone (a running agent would attach again).
//!
//! Everything the agent and the CNI plugin leave behind is under the pin
//! directory: a pinned bpf_link per attached program (TC on pod
//! interfaces, reply-only TC on their other interfaces, socket-LB on
//! cgroups, the uplink program on the uplink) and the pinned maps. Each link is detached at once
//! (BPF_LINK_DETACH, whoever else holds it), then the pins go; programs
//! and maps are freed with their last reference. Filters attached in
//! netlink (clsact) mode are not pinned: they are found by our programs'
//! names (`up_tc_egress`, `up_tc_ingress`) on every interface of the host
//! and of every namespace in the netns directory.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use aya::programs::{TcAttachType, tc};

use crate::{bpfsys, netns, object};

/// What `uninstall` removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Removed {
    /// Pinned links detached (each one program on one hook).
    pub links: usize,
    /// Interface directions whose netlink filters of ours were removed.
    pub filters: usize,
    /// Whether the pin directory (maps and all) was there and is gone.
    pub pin_dir: bool,
}

/// Detaches and removes everything under `pin_dir`, and our netlink
/// filters in the host's namespace and those under `netns_dir`.
pub fn uninstall(pin_dir: &Path, netns_dir: &Path) -> io::Result<Removed> {
    let mut removed = Removed::default();
    let links = pin_dir.join("links");
    for pin in files_below(&links)? {
        bpfsys::detach_and_unpin(&pin).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("detaching the link pinned at {}: {e}", pin.display()),
            )
        })?;
        removed.links += 1;
    }
    let mut namespaces = vec![None];
    if let Ok(entries) = fs::read_dir(netns_dir) {
        namespaces.extend(entries.filter_map(|e| e.ok()).map(|e| Some(e.path())));
    }
    for namespace in namespaces {
        // A namespace that vanished meanwhile has nothing left to remove.
        if let Ok(count) = netns::run_in(namespace.as_deref(), remove_filters_here) {
            removed.filters += count;
        }
    }
    if pin_dir.exists() {
        fs::remove_dir_all(pin_dir).map_err(|e| {
            io::Error::new(e.kind(), format!("removing {}: {e}", pin_dir.display()))
        })?;
        removed.pin_dir = true;
    }
    Ok(removed)
}

/// Every file below `dir` (the link pins), deepest first; none when
/// `dir` does not exist.
fn files_below(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let Ok(entries) = fs::read_dir(dir) else {
        return Ok(files);
    };
    for entry in entries {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            files.extend(files_below(&entry.path())?);
        } else {
            files.push(entry.path());
        }
    }
    Ok(files)
}

/// Removes our cls_bpf filters from every interface of the calling
/// thread's namespace; returns how many interface directions had some.
fn remove_filters_here() -> usize {
    let mut count = 0;
    for name in interface_names() {
        for (attach_type, program) in [
            (TcAttachType::Egress, object::TC_EGRESS),
            (TcAttachType::Ingress, object::TC_INGRESS),
        ] {
            // NotFound (none of ours, or no clsact qdisc) is the common case.
            if tc::qdisc_detach_program(&name, attach_type, program).is_ok() {
                count += 1;
            }
        }
    }
    count
}

/// The interfaces of the calling thread's namespace.
fn interface_names() -> Vec<String> {
    let mut names = Vec::new();
    // SAFETY: if_nameindex returns an array ended by a zero entry, or
    // null; it is freed with if_freenameindex.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return names;
        }
        let mut entry = list;
        while (*entry).if_index != 0 {
            names.push(
                std::ffi::CStr::from_ptr((*entry).if_name)
                    .to_string_lossy()
                    .into_owned(),
            );
            entry = entry.add(1);
        }
        libc::if_freenameindex(list);
    }
    names
}
