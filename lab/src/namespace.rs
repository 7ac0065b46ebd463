//! A named network namespace this process made, and how to work inside
//! it: threads, netlink, sysctls, ethtool.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use datapath_user::netns::{self, NETNS_RUN_DIR};
use rtnetlink::Handle;

use crate::{
    cleanup::{register, unmount_and_remove, unregister},
    error::{Result, err},
    ethtool::{DeviceOffloads, offloads_of, set_gro, set_tx_csum},
    links::{link_names, set_up},
};

/// A named network namespace this process created; deleted on drop.
#[derive(Debug)]
pub struct Namespace {
    name: String,
    path: PathBuf,
}

impl Namespace {
    /// Creates `/var/run/netns/NAME` (as `ip netns add` does, without
    /// forking): a thread unshares its network namespace and bind-mounts it
    /// there, so the namespace outlives the thread.
    pub fn create(name: &str) -> Result<Self> {
        let dir = Path::new(NETNS_RUN_DIR);
        fs::create_dir_all(dir).map_err(|e| err(name, "create /var/run/netns", e))?;
        let path = dir.join(name);
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| err(name, "create the mount point", e))?;
        register(&path);
        let namespace = Self {
            name: name.to_owned(),
            path: path.clone(),
        };
        std::thread::scope(|scope| {
            scope
                .spawn(|| -> io::Result<()> {
                    // SAFETY: unshare affects only this thread.
                    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    let source = c"/proc/thread-self/ns/net";
                    let target = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
                        .map_err(io::Error::other)?;
                    // SAFETY: bind mount with NUL-terminated paths.
                    if unsafe {
                        libc::mount(
                            source.as_ptr(),
                            target.as_ptr(),
                            std::ptr::null(),
                            libc::MS_BIND,
                            std::ptr::null(),
                        )
                    } != 0
                    {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                })
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
        .map_err(|e| err(name, "unshare and bind-mount", e))?;
        namespace.netlink("bring lo up", |handle| async move {
            set_up(&handle, "lo").await
        })?;
        Ok(namespace)
    }

    /// A namespace a run killed outright left behind: dropping it
    /// removes it.
    pub(crate) fn adopt(name: String, path: PathBuf) -> Self {
        Self { name, path }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `work` on a thread inside this namespace.
    pub fn run<T: Send>(&self, work: impl FnOnce() -> T + Send) -> Result<T> {
        netns::run_in(Some(&self.path), work).map_err(|e| err(&self.name, "setns", e))
    }

    /// Runs netlink requests inside this namespace.
    pub fn netlink<T, F, Fut>(&self, step: &str, work: F) -> Result<T>
    where
        T: Send,
        F: FnOnce(Handle) -> Fut + Send,
        Fut: Future<Output = std::result::Result<T, String>>,
    {
        self.run(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime.block_on(async {
                let (connection, handle, _) =
                    rtnetlink::new_connection().map_err(|e| e.to_string())?;
                tokio::spawn(connection);
                work(handle).await
            })
        })?
        .map_err(|reason| err(&self.name, step, reason))
    }

    /// Writes a sysctl of this namespace (`net.ipv4.ip_forward` → 1).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = PathBuf::from("/proc/sys").join(key.replace('.', "/"));
        self.run(|| fs::write(&path, value))?
            .map_err(|e| err(&self.name, format!("sysctl {key}={value}"), e))
    }

    /// Turns off transmit checksum offload on `iface`, so that checksums
    /// are computed in software on the way out and a wrong one is caught
    /// by the receiver instead of being hidden by offload.
    pub fn disable_tx_checksum(&self, iface: &str) -> Result<()> {
        self.run(|| set_tx_csum(iface, false))?
            .map_err(|e| err(&self.name, format!("ethtool -K {iface} tx off"), e))
    }

    /// Turns on generic receive offload on `iface` (a NIC's default; a
    /// veth's is off).
    pub fn enable_gro(&self, iface: &str) -> Result<()> {
        self.set_gro(iface, true)
    }

    /// Turns generic receive offload on `iface` on or off.
    pub fn set_gro(&self, iface: &str, on: bool) -> Result<()> {
        let verb = if on { "on" } else { "off" };
        self.run(|| set_gro(iface, on))?
            .map_err(|e| err(&self.name, format!("ethtool -K {iface} gro {verb}"), e))
    }

    /// `ethtool -k` of every device in this namespace but loopback.
    pub fn offloads(&self) -> Result<Vec<DeviceOffloads>> {
        let names = self.netlink(
            "list the interfaces",
            |h| async move { link_names(&h).await },
        )?;
        names
            .iter()
            .filter(|name| name.as_str() != "lo")
            .map(|name| {
                self.run(|| offloads_of(&self.name, name))?
                    .map_err(|e| err(&self.name, format!("ethtool -k {name}"), e))
            })
            .collect()
    }

    fn delete(&self) -> io::Result<()> {
        unregister(&self.path);
        unmount_and_remove(&self.path)
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        if let Err(e) = self.delete() {
            eprintln!("removing network namespace {}: {e}", self.name);
        }
    }
}
