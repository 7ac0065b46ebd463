//! What this process made and must remove even when interrupted:
//! namespaces, cgroups and pin directories (by path), servers and agents
//! (by pid). Drops remove them in the normal case; the signal handler and
//! `remove_all_live` cover Ctrl-C and kills.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use datapath_user::netns::NETNS_RUN_DIR;

/// Paths this process created and must remove even when interrupted:
/// namespaces and cgroups. `remove_all_live` runs from the signal handler.
static LIVE: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

pub(crate) fn register(path: &Path) {
    LIVE.lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(path.to_owned());
}

pub(crate) fn unregister(path: &Path) {
    LIVE.lock()
        .unwrap_or_else(|p| p.into_inner())
        .retain(|p| p != path);
}

/// Removes every namespace and cgroup this process created and still holds.
pub fn remove_all_live() {
    // Servers and agents first: they hold the namespaces, cgroups and pins.
    let children = std::mem::take(&mut *CHILDREN.lock().unwrap_or_else(|p| p.into_inner()));
    for &pid in &children {
        // SAFETY: plain syscalls on a pid this process spawned.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    }
    for &pid in &children {
        // SAFETY: as above; reaps our own child.
        unsafe { libc::waitpid(pid as libc::pid_t, std::ptr::null_mut(), 0) };
    }
    let paths = std::mem::take(&mut *LIVE.lock().unwrap_or_else(|p| p.into_inner()));
    for path in paths.iter().rev() {
        if path.starts_with(NETNS_RUN_DIR) {
            let _ = unmount_and_remove(path);
        } else if path.starts_with("/sys/fs/bpf") {
            let _ = fs::remove_dir_all(path);
        } else {
            let _ = fs::remove_dir(path);
        }
    }
}

/// Child processes (servers, agents) to kill if the run is interrupted.
static CHILDREN: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());

/// Kills `pid` (a child of this process) if the run is interrupted
/// ([`cleanup_on_signals`]); [`disown_child`] once it is stopped.
pub fn own_child(pid: u32) {
    CHILDREN.lock().unwrap_or_else(|p| p.into_inner()).push(pid);
}

pub fn disown_child(pid: u32) {
    CHILDREN
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .retain(|&p| p != pid);
}

/// Removes `dir` (a pin directory under /sys/fs/bpf) if the run is
/// interrupted; [`disown_pin_dir`] once removed.
pub fn own_pin_dir(dir: &Path) {
    register(dir);
}

pub fn disown_pin_dir(dir: &Path) {
    unregister(dir);
}

/// On SIGINT/SIGTERM: remove what we created, then exit (130/143). For
/// long-running commands (demo, bench); tests clean up by unwinding.
pub fn cleanup_on_signals() {
    std::thread::spawn(|| {
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        runtime.block_on(async {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut int), Ok(mut term)) = (
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
            ) else {
                return;
            };
            let code = tokio::select! {
                _ = int.recv() => 130,
                _ = term.recv() => 143,
            };
            eprintln!("\ninterrupted: removing the namespaces and cgroups this run created");
            remove_all_live();
            std::process::exit(code);
        });
    });
}

pub(crate) fn unmount_and_remove(path: &Path) -> io::Result<()> {
    let target =
        std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    // SAFETY: umount2 with a NUL-terminated path.
    unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    fs::remove_file(path)
}
