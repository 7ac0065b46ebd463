//! The socket-LB programs onto a cgroup v2 directory, as pinned
//! bpf_links (an earlier agent's replaced).

use std::{fs, path::Path};

use aya::programs::{
    CgroupAttachMode,
    links::{FdLink, LinkError},
};

use super::{
    attachment::{AttachedLink, SockAttachment},
    bpffs::{create_pin_dir, pin, remove_pin},
    load::Datapath,
    programs::sock_program,
};
use crate::{error::LoaderError, object};

impl Datapath {
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
