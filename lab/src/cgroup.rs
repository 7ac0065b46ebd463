//! A cgroup of the lab's own (a "pod" for socket-LB), removed on drop.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use crate::cleanup::{register, unregister};

/// A cgroup v2 directory this process created; removed on drop (it must
/// be empty by then: processes in it have exited).
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    /// Creates `<cgroup2 root>/<name>`.
    pub fn create(name: &str) -> io::Result<Self> {
        let path = datapath_user::cgroup::unified_root()?.join(name);
        fs::create_dir(&path)?;
        register(&path);
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        unregister(&self.path);
        // Processes that just exited may still be accounted for a moment.
        for _ in 0..50 {
            match fs::remove_dir(&self.path) {
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    std::thread::sleep(std::time::Duration::from_millis(20))
                }
                _ => return,
            }
        }
    }
}
