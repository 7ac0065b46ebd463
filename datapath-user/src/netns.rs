//! Network namespaces, entered with `setns` on a thread of our own.
//!
//! `ip netns exec` is never used: it remounts /sys, which hides bpffs and
//! the cgroup2 mount. `setns(CLONE_NEWNET)` changes only the calling
//! thread's network namespace, so work that must happen "inside" a pod
//! (resolving an interface name, attaching TC, opening a socket) runs on a
//! short-lived thread that enters the namespace first.

use std::{
    fs::File,
    io,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

/// Where iproute2 and containerd keep named network namespaces.
pub const NETNS_RUN_DIR: &str = "/var/run/netns";

/// The path of a named namespace (`/var/run/netns/NAME`), or the argument
/// itself when it already is a path.
pub fn path_of(name_or_path: &str) -> PathBuf {
    if name_or_path.contains('/') {
        PathBuf::from(name_or_path)
    } else {
        Path::new(NETNS_RUN_DIR).join(name_or_path)
    }
}

/// Moves the calling thread into the namespace at `path`.
pub fn enter(path: &Path) -> io::Result<()> {
    let file = File::open(path)?;
    // SAFETY: setns on a valid fd; affects only this thread.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `work` on a new thread inside the namespace at `path` (or in the
/// caller's namespace when `None`) and returns its result.
pub fn run_in<T, F>(path: Option<&Path>, work: F) -> io::Result<T>
where
    T: Send,
    F: FnOnce() -> T + Send,
{
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                if let Some(path) = path {
                    enter(path)?;
                }
                Ok(work())
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}
