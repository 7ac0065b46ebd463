//! Per-run name prefixes (`up<pid>x<n>`), and the sweep of what runs
//! killed outright left behind.

use std::{
    fs,
    path::Path,
    sync::atomic::{AtomicU32, Ordering},
};

use datapath_user::netns::NETNS_RUN_DIR;

use crate::namespace::Namespace;

/// A prefix unique to this process and call: `up<pid>x<n>`.
pub fn unique_prefix() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "up{}x{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// The pid in a name this module gave (`up<pid>x<n>-…`), if it is one.
fn owner_pid(name: &str) -> Option<u32> {
    name.strip_prefix("up")?.split('x').next()?.parse().ok()
}

/// Removes namespaces and cgroups named `up<pid>x…` whose process no
/// longer exists: what an earlier run killed by a signal left behind.
/// Those of live processes and anything not named by us are left alone.
pub fn sweep_stale() -> usize {
    let dead = |name: &str| {
        owner_pid(name).is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
    };
    let mut removed = 0;
    for entry in fs::read_dir(NETNS_RUN_DIR).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if dead(&name) {
            drop(Namespace::adopt(name, entry.path()));
            removed += 1;
        }
    }
    let cgroups = datapath_user::cgroup::unified_root().and_then(fs::read_dir);
    for entry in cgroups.into_iter().flatten().flatten() {
        if dead(&entry.file_name().to_string_lossy()) && fs::remove_dir(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_our_names_have_an_owner() {
        assert_eq!(owner_pid("up4242x0-node1"), Some(4242));
        assert_eq!(owner_pid("up4242x17-demo"), Some(4242));
        assert_eq!(owner_pid("upstream"), None);
        assert_eq!(owner_pid("cni-1234"), None);
        assert_eq!(owner_pid("up"), None);
    }
}
