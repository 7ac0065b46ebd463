//! Finding the cgroup v2 hierarchy (unified or hybrid mode).

use std::{fs, io, path::PathBuf};

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
