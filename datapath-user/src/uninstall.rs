//! `underpass uninstall`: removes the datapath from a node, as
//! kube-proxy's `--cleanup` does for its rules. Run it after the DaemonSet
//! is gone (a running agent would attach again).
//!
//! Everything the agent and the CNI plugin leave behind is under the pin
//! directory: a pinned bpf_link per attached program (TC on pod
//! interfaces, reply-only TC on their other interfaces, socket-LB on
//! cgroups) and the pinned maps. Each link is detached at once
//! (BPF_LINK_DETACH, whoever else holds it), then the pins go; programs
//! and maps are freed with their last reference. (Filters attached in
//! netlink (clsact) mode are not pinned and not found here: the programs'
//! names are too generic to remove other products' filters safely by
//! name. `underpass detach` removes a hand-made one.)

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use crate::bpfsys;

/// What `uninstall` removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Removed {
    /// Pinned links detached (each one program on one hook).
    pub links: usize,
    /// Whether the pin directory (maps and all) was there and is gone.
    pub pin_dir: bool,
}

/// Detaches and removes everything under `pin_dir`.
pub fn uninstall(pin_dir: &Path) -> io::Result<Removed> {
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
