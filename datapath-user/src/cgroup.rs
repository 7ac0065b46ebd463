//! Finding the cgroup v2 hierarchy (unified or hybrid mode).

use std::{
    fs, io,
    path::{Path, PathBuf},
};

/// The cgroup2 mount point: `/sys/fs/cgroup` on unified hosts,
/// `/sys/fs/cgroup/unified` on hybrid ones, or wherever /proc/mounts says.
pub fn unified_root() -> io::Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mounts")?;
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_, target, fstype) = (fields.next()?, fields.next()?, fields.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(target))
        })
        .min_by_key(|path| path.as_os_str().len())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                "no cgroup2 filesystem is mounted (socket-LB needs cgroup v2: mount -t cgroup2 none /sys/fs/cgroup/unified)",
            )
        })
}

/// Whether `dir` is the root of its cgroup v2 hierarchy, so that every
/// process on the node is below it. Told by a file only non-root cgroups
/// have (`cgroup.events`), not by path: in a container the host's root
/// is mounted wherever the DaemonSet puts it, and the container's own
/// cgroup2 mount may be a namespaced view.
pub fn is_root(dir: &Path) -> bool {
    dir.join("cgroup.procs").exists() && !dir.join("cgroup.events").exists()
}

/// The cgroup v2 directory `given` means: itself when it is one, else the
/// hybrid layout's `unified` below it. The DaemonSet mounts the host's
/// /sys/fs/cgroup, which on hybrid hosts (systemd's default before v247)
/// is a tmpfs of v1 hierarchies with the v2 one at `unified`.
pub fn resolve(given: &Path) -> io::Result<PathBuf> {
    if given.join("cgroup.procs").exists() {
        return Ok(given.to_owned());
    }
    let unified = given.join("unified");
    if unified.join("cgroup.procs").exists() {
        return Ok(unified);
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!(
            "{} is not a cgroup v2 directory, nor has one at unified/ (socket-LB needs cgroup v2)",
            given.display()
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hybrid_hosts_unified_hierarchy_is_found_below_the_given_root() {
        let root = tempfile::tempdir().unwrap();
        let unified = root.path().join("unified");
        fs::create_dir(&unified).unwrap();
        assert!(
            resolve(root.path()).is_err(),
            "neither is a cgroup v2 directory"
        );
        fs::write(unified.join("cgroup.procs"), "").unwrap();
        assert_eq!(resolve(root.path()).unwrap(), unified);
        fs::write(root.path().join("cgroup.procs"), "").unwrap();
        assert_eq!(resolve(root.path()).unwrap(), root.path());
    }

    #[test]
    fn the_root_is_told_by_the_files_only_child_cgroups_have() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!is_root(dir.path()), "not a cgroup at all");
        fs::write(dir.path().join("cgroup.procs"), "").unwrap();
        assert!(is_root(dir.path()), "a root: no cgroup.events");
        fs::write(dir.path().join("cgroup.events"), "").unwrap();
        assert!(!is_root(dir.path()), "a child cgroup");
    }
}
